//! Loading credentials from files: the formats the loader reads, the errors it and the builder
//! give (each naming the file and the reason), and the provider noticing replaced files.

mod support;

use std::{
    sync::Arc,
    time::{Duration, SystemTime},
};

use rustls::pki_types::PrivateKeyDer;
use smcontroller_api::{CertLoader as _, CertProvider as _};
use smcontroller_certs::{
    CredentialsBuilder, Error, FileCertLoader, FileCertProvider, test_util::LeafSpec,
};
use support::{Pki, names, within};

#[test]
fn a_chain_is_every_certificate_of_the_file_in_order() {
    let pki = Pki::new();
    let chain = format!("{}{}", pki.server.cert_pem(), pki.pki.ca_pem());
    std::fs::write(pki.path("chain.pem"), chain).unwrap();
    let loaded = FileCertLoader::new()
        .read_cert_chain(&pki.url("chain.pem"))
        .unwrap();
    assert_eq!(loaded, [pki.server.cert_der(), pki.pki.ca_der()]);
    // A plain absolute path works as well as a file:// URL.
    let path = pki.path("chain.pem").display().to_string();
    assert_eq!(
        FileCertLoader::new().read_cert_chain(&path).unwrap(),
        loaded
    );
}

#[test]
fn keys_are_read_in_pkcs8_sec1_and_pkcs1() {
    let pki = Pki::new();
    let loader = FileCertLoader::new();

    let pkcs8 = loader.read_private_key(&pki.url("server.key")).unwrap();
    assert!(matches!(pkcs8, PrivateKeyDer::Pkcs8(_)));
    assert_eq!(pkcs8, pki.server.key_der());

    std::fs::write(pki.path("sec1.key"), pki.server.key_sec1_pem()).unwrap();
    let sec1 = loader.read_private_key(&pki.url("sec1.key")).unwrap();
    assert!(matches!(sec1, PrivateKeyDer::Sec1(_)));

    // Only the PEM label and the DER's outline matter to the loader; this is not a usable RSA
    // key: SEQUENCE { INTEGER 0, INTEGER 0xc5, INTEGER 65537 }.
    let pkcs1_outline =
        "-----BEGIN RSA PRIVATE KEY-----\nMAsCAQACAgDFAgMBAAE=\n-----END RSA PRIVATE KEY-----\n";
    std::fs::write(pki.path("rsa.key"), pkcs1_outline).unwrap();
    let pkcs1 = loader.read_private_key(&pki.url("rsa.key")).unwrap();
    assert!(matches!(pkcs1, PrivateKeyDer::Pkcs1(_)));
    // Through the api's format-less DER the builder tells the formats apart again.
    for (key, expected) in [(&pkcs8, "Pkcs8"), (&sec1, "Sec1"), (&pkcs1, "Pkcs1")] {
        let again = PrivateKeyDer::try_from(key.secret_der().to_vec()).unwrap();
        assert!(format!("{again:?}").starts_with(expected), "{again:?}");
    }
}

#[tokio::test]
async fn a_sec1_key_serves_as_well_as_a_pkcs8_key() {
    let pki = Pki::new();
    std::fs::write(pki.path("server.key"), pki.server.key_sec1_pem()).unwrap();
    let (builder, _provider) = pki.builder(Arc::new(FileCertLoader::new()));
    builder.build().await.expect("credentials from a SEC1 key");
}

#[test]
fn a_missing_file_is_named_with_the_os_reason() {
    let pki = Pki::new();
    let error = FileCertLoader::new()
        .read_cert_chain(&pki.url("missing.pem"))
        .unwrap_err();
    assert!(matches!(error, Error::Read { .. }), "{error:?}");
    let report = error.report().to_string();
    assert!(names(&report, &pki.path("missing.pem")), "{report}");
    assert!(report.contains("cannot read"), "{report}");
    assert!(report.contains("No such file"), "{report}");
}

#[test]
fn a_file_that_is_not_pem_is_named() {
    let pki = Pki::new();
    std::fs::write(pki.path("garbage.pem"), b"\x30\x82\x01\x00 not pem at all").unwrap();
    let loader = FileCertLoader::new();
    for error in [
        loader.read_cert_chain(&pki.url("garbage.pem")).unwrap_err(),
        loader
            .read_private_key(&pki.url("garbage.pem"))
            .unwrap_err(),
    ] {
        assert!(matches!(error, Error::NotPem { .. }), "{error:?}");
        let report = error.report().to_string();
        assert!(names(&report, &pki.path("garbage.pem")), "{report}");
        assert!(report.contains("not PEM"), "{report}");
    }
}

#[test]
fn broken_pem_is_named() {
    let pki = Pki::new();
    let cut = &pki.server.cert_pem()[..pki.server.cert_pem().len() - 30];
    std::fs::write(pki.path("cut.pem"), cut).unwrap();
    let error = FileCertLoader::new()
        .read_cert_chain(&pki.url("cut.pem"))
        .unwrap_err();
    assert!(matches!(error, Error::BadPem { .. }), "{error:?}");
    let report = error.report().to_string();
    assert!(names(&report, &pki.path("cut.pem")), "{report}");
    assert!(report.contains("not valid PEM"), "{report}");
}

#[test]
fn a_key_where_a_certificate_belongs_and_the_reverse_are_named() {
    let pki = Pki::new();
    let loader = FileCertLoader::new();

    let error = loader.read_cert_chain(&pki.url("server.key")).unwrap_err();
    let report = error.report().to_string();
    assert!(matches!(error, Error::NoCertificate { .. }), "{error:?}");
    assert!(names(&report, &pki.path("server.key")), "{report}");
    assert!(
        report.contains("no certificate in it (PEM sections found: PRIVATE KEY)"),
        "{report}"
    );

    let error = loader.read_private_key(&pki.url("server.pem")).unwrap_err();
    let report = error.report().to_string();
    assert!(matches!(error, Error::NoPrivateKey { .. }), "{error:?}");
    assert!(names(&report, &pki.path("server.pem")), "{report}");
    assert!(
        report.contains("no private key in it (PEM sections found: CERTIFICATE)"),
        "{report}"
    );

    let encrypted =
        "-----BEGIN ENCRYPTED PRIVATE KEY-----\nMAA=\n-----END ENCRYPTED PRIVATE KEY-----\n";
    std::fs::write(pki.path("encrypted.key"), encrypted).unwrap();
    let error = loader
        .read_private_key(&pki.url("encrypted.key"))
        .unwrap_err();
    assert!(
        matches!(error, Error::EncryptedPrivateKey { .. }),
        "{error:?}"
    );
    assert!(error.to_string().contains("encrypted"), "{error}");
}

/// The file loader reads files only: a key in a token is the builder's to find (R-TLS-5), and
/// the loader's refusal shows the URL with its PIN masked.
#[tokio::test]
async fn the_file_loader_refuses_pkcs11_urls_with_the_pin_masked() {
    let url = "pkcs11:token=aos;object=sm?module-path=/usr/lib/softhsm/libsofthsm2.so&pin-value=12";
    let error = FileCertLoader::new()
        .load_private_key(url)
        .await
        .unwrap_err();
    match error {
        smcontroller_api::Error::InvalidArgument(message) => {
            assert!(
                message.ends_with(
                    "pin-value=***: a pkcs11: URL names an object in a token, not a file"
                ),
                "{message}"
            );
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn loader_errors_reach_the_api_as_failures_naming_the_file() {
    let pki = Pki::new();
    let error = FileCertLoader::new()
        .load_cert_chain(&pki.url("missing.pem"))
        .await
        .unwrap_err();
    match error {
        smcontroller_api::Error::Failed { message, .. } => {
            assert!(names(&message, &pki.path("missing.pem")), "{message}");
            assert!(message.contains("cannot read"), "{message}");
        }
        other => panic!("{other:?}"),
    }
}

/// What [`CredentialsBuilder::build`] says about `pki`'s files as they are.
async fn build_error(pki: &Pki) -> (Error, String) {
    let (builder, _provider) = pki.builder(Arc::new(FileCertLoader::new()));
    let error = builder.build().await.expect_err("the build fails");
    let report = error.report().to_string();
    (error, report)
}

#[tokio::test]
async fn a_key_of_another_certificate_is_refused_naming_both_files() {
    let pki = Pki::new();
    let other = pki.pki.server().unwrap();
    std::fs::write(pki.path("server.key"), other.key_pem()).unwrap();
    let (error, report) = build_error(&pki).await;
    assert!(matches!(error, Error::KeyMismatch { .. }), "{error:?}");
    assert!(
        report.contains("key does not match certificate"),
        "{report}"
    );
    assert!(names(&report, &pki.path("server.key")), "{report}");
    assert!(names(&report, &pki.path("server.pem")), "{report}");
}

#[tokio::test]
async fn an_expired_server_certificate_is_refused_with_its_expiry() {
    let pki = Pki::new();
    let expired = pki.pki.issue(&LeafSpec::server().expired()).unwrap();
    expired.write(pki.dir.path(), "server").unwrap();
    let (error, report) = build_error(&pki).await;
    assert!(matches!(error, Error::Expired { .. }), "{error:?}");
    assert!(names(&report, &pki.path("server.pem")), "{report}");
    assert!(report.contains("certificate expired at "), "{report}");
}

#[tokio::test]
async fn missing_or_wrong_files_are_named_by_the_builder() {
    let pki = Pki::new();
    std::fs::remove_file(pki.path("ca.pem")).unwrap();
    let (error, report) = build_error(&pki).await;
    assert!(
        matches!(
            error,
            Error::Load {
                what: "CA certificates",
                ..
            }
        ),
        "{error:?}"
    );
    assert!(names(&report, &pki.path("ca.pem")), "{report}");
    assert!(report.contains("No such file"), "{report}");

    let pki = Pki::new();
    std::fs::write(pki.path("server.pem"), "just text\n").unwrap();
    let (error, report) = build_error(&pki).await;
    assert!(
        matches!(
            error,
            Error::Load {
                what: "certificate chain",
                ..
            }
        ),
        "{error:?}"
    );
    assert!(names(&report, &pki.path("server.pem")), "{report}");
    assert!(report.contains("not PEM"), "{report}");

    let pki = Pki::new();
    std::fs::remove_file(pki.path("server.key")).unwrap();
    let (error, report) = build_error(&pki).await;
    assert!(
        matches!(
            error,
            Error::Load {
                what: "private key",
                ..
            }
        ),
        "{error:?}"
    );
    assert!(names(&report, &pki.path("server.key")), "{report}");
}

#[tokio::test]
async fn built_credentials_carry_the_expiry_of_the_leaf() {
    let pki = Pki::new();
    let (builder, _provider) = pki.builder(Arc::new(FileCertLoader::new()));
    let credentials = builder.build().await.unwrap();
    let not_after = credentials.cert.not_after.expect("expiry");
    let in_a_year = SystemTime::now() + Duration::from_secs(365 * 24 * 3600);
    let off = in_a_year
        .duration_since(not_after)
        .unwrap_or_else(|e| e.duration());
    assert!(off < Duration::from_secs(3600), "{not_after:?}");
    assert_eq!(credentials.config.alpn_protocols, [b"h2".to_vec()]);
    assert_eq!(credentials.generation, 0);
    assert_eq!(credentials.cert.cert_url, pki.url("server.pem"));
}

#[tokio::test]
async fn the_provider_publishes_a_replaced_certificate() {
    let pki = Pki::new();
    let provider = FileCertProvider::builder()
        .storage("sm", pki.url("server.pem"), pki.url("server.key"))
        .poll_interval(Duration::from_millis(10))
        .spawn()
        .unwrap();
    let info = provider.get_cert("sm").await.unwrap();
    assert_eq!(info.cert_url, pki.url("server.pem"));
    assert_eq!(info.key_url, pki.url("server.key"));
    let first_expiry = info.not_after.expect("expiry of the current certificate");
    let mut renewals = provider.subscribe_renewals("sm");
    assert_eq!(*renewals.borrow_and_update(), info);

    let renewed = pki.pki.issue(&LeafSpec::server().valid_days(30)).unwrap();
    pki.replace("server.key", renewed.key_pem());
    pki.replace("server.pem", renewed.cert_pem());
    within(
        "the renewal with the new expiry",
        renewals.wait_for(|info| info.not_after.is_some_and(|t| t < first_expiry)),
    )
    .await
    .unwrap();
    let now = provider.get_cert("sm").await.unwrap();
    assert!(now.not_after.unwrap() < first_expiry);

    // A rewrite in place is seen too.
    renewals.borrow_and_update();
    std::fs::write(pki.path("server.pem"), pki.server.cert_pem()).unwrap();
    within("the rewrite", renewals.changed()).await.unwrap();
    within(
        "the original expiry",
        renewals.wait_for(|info| info.not_after == Some(first_expiry)),
    )
    .await
    .unwrap();
}

#[tokio::test]
async fn the_provider_knows_only_its_storages() {
    let pki = Pki::new();
    let provider = FileCertProvider::builder()
        .storage("sm", pki.url("server.pem"), pki.url("server.key"))
        .spawn()
        .unwrap();
    let error = provider.get_cert("iam").await.unwrap_err();
    assert!(
        matches!(error, smcontroller_api::Error::InvalidArgument(ref m) if m.contains("\"iam\"")),
        "{error:?}"
    );
    let mut renewals = provider.subscribe_renewals("iam");
    assert!(renewals.changed().await.is_err(), "closed at once");

    let error = FileCertProvider::builder()
        .storage("sm", "pkcs11:object=sm", pki.url("server.key"))
        .spawn()
        .unwrap_err();
    assert!(matches!(error, Error::UnsupportedUrl { .. }), "{error:?}");
}

#[tokio::test]
async fn a_builder_over_the_file_provider_serves_its_files() {
    let pki = Pki::new();
    let provider = FileCertProvider::builder()
        .storage("sm", pki.url("server.pem"), pki.url("server.key"))
        .spawn()
        .unwrap();
    let builder = CredentialsBuilder::new(
        Arc::new(provider),
        Arc::new(FileCertLoader::new()),
        "sm",
        pki.path("ca.pem").display().to_string(),
    );
    assert_eq!(builder.storage(), "sm");
    let credentials = builder.build().await.unwrap();
    assert_eq!(credentials.cert.key_url, pki.url("server.key"));
}
