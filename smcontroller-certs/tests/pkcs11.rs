//! The server's key in a real PKCS#11 token (contract R-TLS-5): SoftHSM2, the Debian package
//! `softhsm2`. Each test runs in a process of its own with a token directory of its own
//! (`SOFTHSM2_CONF` pointing at a temporary config, see `test_util::softhsm::isolated`),
//! creates its key in the token through cryptoki and certifies it with the test CA (rcgen);
//! then SMs' TLS clients handshake over 127.0.0.1 with the server whose signatures the token
//! makes. A test fails, naming the package, where SoftHSM2 is not installed.
#![cfg(feature = "pkcs11")]

mod support;

use std::{sync::Arc, time::Duration};

use rustls::pki_types::CertificateDer;
use smcontroller_api::CertInfo;
use smcontroller_certs::{
    AcceptSettings, CredentialsBuilder, CredentialsReloader, Error, FileCertLoader, ReloadSettings,
    ServerCredentials,
    test_util::{
        IssuedCert, LeafSpec, TestPki,
        softhsm::{
            self, SoftHsm, TestToken, TokenKeyKind, TokenKeyPair,
            cryptoki::{mechanism::MechanismType, object::Attribute},
        },
    },
};
use support::{EchoServer, FakeProvider, Logs, client_config, client_config_with, connect, ping};
use tokio::sync::watch;

const SECRET_PIN: &str = "s3cr3t-pin-4711";

/// A token with the server's key in it, the CA and the key's certificate in a directory.
struct Setup {
    token: TestToken,
    pki: TestPki,
    dir: tempfile::TempDir,
    key: TokenKeyPair,
}

impl Setup {
    /// A token `aos` (PIN [`SECRET_PIN`]) with a `kind` key `sm` (id 01), certified by the test
    /// CA as the server; `ca.pem` and `server.pem` written.
    fn new(hsm: &SoftHsm, kind: TokenKeyKind) -> Self {
        let token = hsm.init_token("aos", SECRET_PIN).expect("token");
        let key = token
            .generate_key(kind, "sm", &[1])
            .expect("key in the token");
        let pki = TestPki::new().unwrap();
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("ca.pem"), pki.ca_pem()).unwrap();
        let setup = Self {
            token,
            pki,
            dir,
            key,
        };
        setup.certify(&setup.key, "server.pem");
        setup
    }

    /// Certifies `key` as the server and writes the certificate to `file`.
    fn certify(&self, key: &TokenKeyPair, file: &str) -> IssuedCert {
        let cert = self
            .pki
            .issue_for(&LeafSpec::server(), &key.public_key)
            .unwrap();
        cert.write(&self.dir.path().join(file)).unwrap();
        cert
    }

    fn file_url(&self, file: &str) -> String {
        format!("file://{}", self.dir.path().join(file).display())
    }

    /// The URL of the server key `sm`, id 01.
    fn key_url(&self) -> String {
        self.token.url("sm", &[1])
    }

    fn info(&self, key_url: &str) -> CertInfo {
        CertInfo {
            cert_url: self.file_url("server.pem"),
            key_url: key_url.to_owned(),
            not_after: None,
        }
    }

    /// A builder of the server's credentials from `info`, with a provider that announces
    /// renewals when told.
    fn builder(&self, info: CertInfo) -> (CredentialsBuilder, FakeProvider) {
        let provider = FakeProvider::new(info);
        let builder = CredentialsBuilder::new(
            Arc::new(provider.clone()),
            Arc::new(FileCertLoader::new()),
            "sm",
            self.file_url("ca.pem"),
        );
        (builder, provider)
    }

    /// What building the credentials with the key at `key_url` fails with.
    async fn build_error(&self, key_url: &str) -> Error {
        let (builder, _) = self.builder(self.info(key_url));
        builder.build().await.expect_err("the build fails")
    }

    /// An SM's TLS client (TLS 1.3 and 1.2) with its client certificate from the CA.
    fn sm(&self) -> Arc<rustls::ClientConfig> {
        let node = self.pki.client("node-1").unwrap();
        client_config(self.pki.ca_der(), Some(&node))
    }
}

async fn serve(reloader: &CredentialsReloader) -> EchoServer {
    EchoServer::start(reloader.subscribe(), AcceptSettings::default()).await
}

/// One SM connection: the certificate the server showed and the scheme it signed with, once
/// the echo came back (the server accepted the SM's certificate too).
async fn handshake(
    server: &EchoServer,
    config: Arc<rustls::ClientConfig>,
) -> std::io::Result<(CertificateDer<'static>, Option<rustls::ProtocolVersion>)> {
    let mut stream = connect(server.addr, config).await?;
    assert_eq!(ping(&mut stream).await?, b"ping");
    let tls = stream.get_ref().1;
    Ok((
        tls.peer_certificates().expect("server certificate")[0].clone(),
        tls.protocol_version(),
    ))
}

#[tokio::test]
async fn pkcs11_an_sm_handshakes_over_mtls_with_the_server_key_in_the_token() {
    let Some(hsm) =
        softhsm::isolated("pkcs11_an_sm_handshakes_over_mtls_with_the_server_key_in_the_token")
    else {
        return;
    };
    let setup = Setup::new(&hsm, TokenKeyKind::EcP256);
    let cert = setup.certify(&setup.key, "server.pem");
    let (builder, _provider) = setup.builder(setup.info(&setup.key_url()));
    let reloader = CredentialsReloader::start(builder, ReloadSettings::default())
        .await
        .expect("credentials with the token key");
    let current = reloader.current();
    assert!(
        current.cert.key_url.ends_with("pin-value=***")
            && !current.cert.key_url.contains(SECRET_PIN),
        "the credentials keep the URL with its PIN masked: {}",
        current.cert.key_url
    );
    let mut server = serve(&reloader).await;

    for versions in [&rustls::version::TLS13, &rustls::version::TLS12] {
        let node = setup.pki.client("node-1").unwrap();
        let config = client_config_with(setup.pki.ca_der(), Some(&node), &[versions]);
        let (served, version) = handshake(&server, config).await.expect("handshake");
        assert_eq!(served, cert.cert_der(), "the token key's certificate");
        assert_eq!(version, Some(versions.version));
        let info = server.next_accepted().await;
        assert_eq!(info.peer_certificates(), &[node.cert_der()]);
        assert_eq!(
            info.peer_identity().and_then(|i| i.common_name()),
            Some("node-1")
        );
    }
    // An SM without a client certificate is still refused.
    let config = client_config(setup.pki.ca_der(), None);
    assert!(handshake(&server, config).await.is_err());
}

/// P-384 and RSA keys sign too; an RSA key that allows only PKCS#1 v1.5 serves TLS 1.2
/// clients with `rsa_pkcs1_sha256`, whatever the key supports.
#[tokio::test]
async fn pkcs11_p384_and_rsa_keys_sign_with_the_schemes_they_support() {
    let Some(hsm) =
        softhsm::isolated("pkcs11_p384_and_rsa_keys_sign_with_the_schemes_they_support")
    else {
        return;
    };
    let setup = Setup::new(&hsm, TokenKeyKind::EcP384);
    let rsa = setup
        .token
        .generate_key(TokenKeyKind::Rsa2048, "rsa", &[2])
        .unwrap();
    let pkcs1_only = setup
        .token
        .generate_key_with(
            TokenKeyKind::Rsa2048,
            "rsa-pkcs1",
            &[3],
            &[Attribute::AllowedMechanisms(vec![
                MechanismType::SHA256_RSA_PKCS,
            ])],
        )
        .unwrap();
    // The PKCS#1-only key can serve TLS 1.2 only with rsa_pkcs1_sha256: the token refuses
    // anything else with it.
    let cases = [
        ("sm", [1u8], &setup.key, &rustls::version::TLS13),
        ("sm", [1u8], &setup.key, &rustls::version::TLS12),
        ("rsa", [2], &rsa, &rustls::version::TLS13),
        ("rsa", [2], &rsa, &rustls::version::TLS12),
        ("rsa-pkcs1", [3], &pkcs1_only, &rustls::version::TLS12),
    ];
    for (object, id, key, version) in cases {
        let cert = setup.certify(key, "server.pem");
        let (builder, _) = setup.builder(setup.info(&setup.token.url(object, &id)));
        let reloader = CredentialsReloader::start(builder, ReloadSettings::default())
            .await
            .unwrap_or_else(|e| panic!("{object}: {}", e.report()));
        let server = serve(&reloader).await;
        let node = setup.pki.client("node-1").unwrap();
        let config = client_config_with(setup.pki.ca_der(), Some(&node), &[version]);
        let mut stream = connect(server.addr, config)
            .await
            .unwrap_or_else(|e| panic!("{object} {version:?}: {e}"));
        assert_eq!(ping(&mut stream).await.unwrap(), b"ping");
        let tls = stream.get_ref().1;
        assert_eq!(tls.peer_certificates().unwrap()[0], cert.cert_der());
        assert_eq!(tls.protocol_version(), Some(version.version));
    }
    // A key that allows PKCS#1 v1.5 only cannot serve TLS 1.3 (which needs PSS): no scheme in
    // common, the handshake fails rather than sign with something the key refuses.
    let _ = setup.certify(&pkcs1_only, "server.pem");
    let (builder, _) = setup.builder(setup.info(&setup.token.url("rsa-pkcs1", &[3])));
    let reloader = CredentialsReloader::start(builder, ReloadSettings::default())
        .await
        .unwrap();
    let server = serve(&reloader).await;
    let node = setup.pki.client("node-1").unwrap();
    let tls13 = client_config_with(setup.pki.ca_der(), Some(&node), &[&rustls::version::TLS13]);
    assert!(handshake(&server, tls13).await.is_err());
}

/// The chain may come from the token too (`type=cert`).
#[tokio::test]
async fn pkcs11_the_certificate_chain_may_come_from_the_token() {
    let Some(hsm) = softhsm::isolated("pkcs11_the_certificate_chain_may_come_from_the_token")
    else {
        return;
    };
    let setup = Setup::new(&hsm, TokenKeyKind::EcP256);
    let cert = setup.certify(&setup.key, "server.pem");
    setup
        .token
        .import_cert("sm", &[1], cert.cert_der().as_ref())
        .unwrap();
    let cert_url = setup.token.url("sm", &[1]).replace('?', ";type=cert?");
    let info = CertInfo {
        cert_url,
        key_url: setup.key_url(),
        not_after: None,
    };
    let (builder, _) = setup.builder(info);
    let reloader = CredentialsReloader::start(builder, ReloadSettings::default())
        .await
        .unwrap_or_else(|e| panic!("{}", e.report()));
    assert!(reloader.current().cert.cert_url.contains("type=cert"));
    let server = serve(&reloader).await;
    let (served, _) = handshake(&server, setup.sm()).await.expect("handshake");
    assert_eq!(served, cert.cert_der());
}

/// Each way a token key can fail to load gives its own error, naming the URL with the PIN
/// masked and what failed.
#[tokio::test]
async fn pkcs11_errors_name_the_url_with_the_pin_masked_and_what_failed() {
    let Some(hsm) =
        softhsm::isolated("pkcs11_errors_name_the_url_with_the_pin_masked_and_what_failed")
    else {
        return;
    };
    let setup = Setup::new(&hsm, TokenKeyKind::EcP256);
    let url = setup.key_url();
    let check = |error: &Error, shown_url: &str, what: &str| {
        let report = error.report().to_string();
        assert!(!report.contains(SECRET_PIN), "PIN shown: {report}");
        let masked = smcontroller_certs::mask_pin(shown_url);
        assert!(report.contains(&*masked), "{report}\nshould name {masked}");
        assert!(report.contains(what), "{report}\nshould say {what:?}");
    };

    let missing_module = url.replace(
        &hsm.module().display().to_string(),
        "/nonexistent/libpkcs11.so",
    );
    let e = setup.build_error(&missing_module).await;
    assert!(matches!(e, Error::Pkcs11Module { .. }), "{e:?}");
    check(
        &e,
        &missing_module,
        "cannot load the PKCS#11 module /nonexistent/libpkcs11.so",
    );

    let no_token = url.replace("token=aos", "token=elsewhere");
    let e = setup.build_error(&no_token).await;
    assert!(matches!(e, Error::NoToken { .. }), "{e:?}");
    check(&e, &no_token, "no such token (tokens present: \"aos\"");

    let wrong_pin = url.replace(SECRET_PIN, "0000");
    let e = setup.build_error(&wrong_pin).await;
    assert!(matches!(e, Error::WrongPin { .. }), "{e:?}");
    check(&e, &wrong_pin, "wrong PIN: token \"aos\" refused it");

    let pin_file = setup.dir.path().join("no-such-pin");
    let missing_pin_file = url.replace(
        &format!("pin-value={SECRET_PIN}"),
        &format!("pin-source={}", pin_file.display()),
    );
    let e = setup.build_error(&missing_pin_file).await;
    assert!(matches!(e, Error::PinFile { .. }), "{e:?}");
    check(&e, &missing_pin_file, "cannot read the PIN file");

    let no_key = setup.token.url("other", &[9]);
    let e = setup.build_error(&no_key).await;
    assert!(matches!(e, Error::NoTokenObject { .. }), "{e:?}");
    check(
        &e,
        &no_key,
        "no private key with object=\"other\", id=%09 in token \"aos\"",
    );

    // The certificate is another key's.
    let other = setup
        .token
        .generate_key(TokenKeyKind::EcP256, "other", &[9])
        .unwrap();
    let _ = other;
    let e = setup.build_error(&no_key).await;
    assert!(matches!(e, Error::KeyMismatch { .. }), "{e:?}");
    check(&e, &no_key, "key does not match certificate");

    // A key that may not make any signature TLS needs.
    let ecdh_only = setup
        .token
        .generate_key_with(
            TokenKeyKind::EcP256,
            "ecdh",
            &[7],
            &[Attribute::AllowedMechanisms(vec![
                MechanismType::ECDH1_DERIVE,
            ])],
        )
        .unwrap();
    setup.certify(&ecdh_only, "server.pem");
    let ecdh_url = setup.token.url("ecdh", &[7]);
    let e = setup.build_error(&ecdh_url).await;
    assert!(matches!(e, Error::UnsupportedTokenKey { .. }), "{e:?}");
    check(
        &e,
        &ecdh_url,
        "supports no mechanism a TLS signature can be made with",
    );
    check(&e, &ecdh_url, "CKM_ECDSA");

    // A good PIN from a pin-source file works.
    setup.certify(&setup.key, "server.pem");
    let pin_path = setup.dir.path().join("pin");
    std::fs::write(&pin_path, format!("{SECRET_PIN}\n")).unwrap();
    let from_file = url.replace(
        &format!("pin-value={SECRET_PIN}"),
        &format!("pin-source={}", pin_path.display()),
    );
    let (builder, _) = setup.builder(setup.info(&from_file));
    builder
        .build()
        .await
        .unwrap_or_else(|e| panic!("{}", e.report()));
}

/// A token that logs us out (reset, pulled and put back) fails the handshake under way only:
/// it is logged, and the next handshake logs in again. A key gone from the token fails
/// handshakes until the next renewal brings a key.
#[tokio::test]
async fn pkcs11_a_token_that_goes_away_fails_that_handshake_only_and_is_recovered_from() {
    let Some(hsm) = softhsm::isolated(
        "pkcs11_a_token_that_goes_away_fails_that_handshake_only_and_is_recovered_from",
    ) else {
        return;
    };
    let logs = Logs::capture();
    let setup = Setup::new(&hsm, TokenKeyKind::EcP256);
    let (builder, provider) = setup.builder(setup.info(&setup.key_url()));
    let reloader = CredentialsReloader::start(builder, ReloadSettings::default())
        .await
        .unwrap();
    let mut credentials = reloader.subscribe();
    credentials.borrow_and_update();
    let server = serve(&reloader).await;
    handshake(&server, setup.sm())
        .await
        .expect("first handshake");

    setup.token.log_everyone_out().unwrap();
    assert!(handshake(&server, setup.sm()).await.is_err());
    let warning = logs
        .wait_for("the failed signature", |e| {
            e.message.contains("the token could not sign")
        })
        .await;
    assert_eq!(warning.level, tracing::Level::WARN);
    let key = warning.field("key").unwrap_or_default();
    assert!(
        key.ends_with("pin-value=***") && !key.contains(SECRET_PIN),
        "{warning:?}"
    );
    handshake(&server, setup.sm())
        .await
        .expect("the next handshake logs in again");

    // The key is deleted: the handshakes fail (each logged) until a renewal.
    setup.token.destroy(&setup.key).unwrap();
    assert!(handshake(&server, setup.sm()).await.is_err());
    assert!(handshake(&server, setup.sm()).await.is_err());
    let renewed = setup
        .token
        .generate_key(TokenKeyKind::EcP256, "sm", &[1])
        .unwrap();
    let cert = setup.certify(&renewed, "server.pem");
    provider.notify();
    wait_generation(&mut credentials, 1).await;
    let (served, _) = handshake(&server, setup.sm()).await.expect("after renewal");
    assert_eq!(served, cert.cert_der());
}

/// A renewal to a new key in the token is taken up like a file renewal: built first, then
/// published, and new handshakes see the new certificate; the old key may still be there
/// under the same label. A renewal whose key is not there yet keeps the old credentials and is
/// retried until the key comes.
#[tokio::test]
async fn pkcs11_renewal_to_a_new_token_key_is_seen_by_new_handshakes() {
    let Some(hsm) =
        softhsm::isolated("pkcs11_renewal_to_a_new_token_key_is_seen_by_new_handshakes")
    else {
        return;
    };
    let logs = Logs::capture();
    let setup = Setup::new(&hsm, TokenKeyKind::EcP256);
    let first = setup.certify(&setup.key, "server.pem");
    // A URL by label only: during a renewal both keys carry it.
    let url = setup.key_url().replace(";id=%01", "");
    let (builder, provider) = setup.builder(setup.info(&url));
    let settings = ReloadSettings::default().with_retry(Duration::from_millis(200));
    let reloader = CredentialsReloader::start(builder, settings).await.unwrap();
    let mut credentials = reloader.subscribe();
    credentials.borrow_and_update();
    let server = serve(&reloader).await;
    let (served, _) = handshake(&server, setup.sm()).await.unwrap();
    assert_eq!(served, first.cert_der());

    // The new key is made under a staging label, the certificate for it lands first.
    let second_key = setup
        .token
        .generate_key(TokenKeyKind::EcP256, "sm-next", &[2])
        .unwrap();
    let second = setup.certify(&second_key, "server.pem");
    provider.notify();
    let warning = logs
        .wait_for("the failed rebuild", |e| e.field("attempt") == Some("1"))
        .await;
    assert!(
        warning.field("error").is_some_and(
            |e| e.contains("key does not match certificate") && !e.contains(SECRET_PIN)
        ),
        "{warning:?}"
    );
    let (served, _) = handshake(&server, setup.sm()).await.unwrap();
    assert_eq!(served, first.cert_der(), "still the old credentials");

    // The key is put in place: a retry picks it, beside the old one of the same label.
    setup.token.relabel(&second_key, "sm").unwrap();
    wait_generation(&mut credentials, 1).await;
    let (served, _) = handshake(&server, setup.sm()).await.unwrap();
    assert_eq!(served, second.cert_der());
    assert!(reloader.failed_builds() >= 1);

    // Once more, both in place before the notice: taken up at once.
    let third_key = setup
        .token
        .generate_key(TokenKeyKind::EcP256, "sm", &[3])
        .unwrap();
    let third = setup.certify(&third_key, "server.pem");
    let failed = reloader.failed_builds();
    provider.notify();
    wait_generation(&mut credentials, 2).await;
    assert_eq!(reloader.failed_builds(), failed);
    let (served, _) = handshake(&server, setup.sm()).await.unwrap();
    assert_eq!(served, third.cert_der());
}

/// A file loader that counts the loads of the server's chain (one per build) and holds each
/// until the test lets it through.
struct GatedChain {
    inner: FileCertLoader,
    url: String,
    builds: watch::Sender<usize>,
    gate: tokio::sync::Semaphore,
}

#[async_trait::async_trait]
impl smcontroller_api::CertLoader for GatedChain {
    async fn load_cert_chain(
        &self,
        url: &str,
    ) -> smcontroller_api::Result<Vec<smcontroller_api::CertificateDer>> {
        if url == self.url {
            self.builds.send_modify(|b| *b += 1);
            self.gate.acquire().await.unwrap().forget();
        }
        self.inner.load_cert_chain(url).await
    }

    async fn load_private_key(
        &self,
        url: &str,
    ) -> smcontroller_api::Result<smcontroller_api::PrivateKeyDer> {
        self.inner.load_private_key(url).await
    }
}

/// Renewal notices that arrive while a build with a token key runs coalesce into one more
/// build, as with files (on Tokio's paused clock: an idle hour passes at once).
#[tokio::test(start_paused = true)]
async fn pkcs11_renewal_notices_during_a_build_coalesce_as_for_files() {
    let Some(hsm) =
        softhsm::isolated("pkcs11_renewal_notices_during_a_build_coalesce_as_for_files")
    else {
        return;
    };
    let setup = Setup::new(&hsm, TokenKeyKind::EcP256);
    let url = setup.key_url().replace(";id=%01", "");
    let loader = Arc::new(GatedChain {
        inner: FileCertLoader::new(),
        url: setup.file_url("server.pem"),
        builds: watch::Sender::new(0),
        gate: tokio::sync::Semaphore::new(1),
    });
    let provider = FakeProvider::new(setup.info(&url));
    let builder = CredentialsBuilder::new(
        Arc::new(provider.clone()),
        loader.clone(),
        "sm",
        setup.file_url("ca.pem"),
    );
    let reloader = CredentialsReloader::start(builder, ReloadSettings::default())
        .await
        .unwrap();
    let mut credentials = reloader.subscribe();
    credentials.borrow_and_update();

    let renewed = setup
        .token
        .generate_key(TokenKeyKind::EcP256, "sm", &[2])
        .unwrap();
    setup.certify(&renewed, "server.pem");
    provider.notify();
    let mut builds = loader.builds.subscribe();
    support::within_for(
        support::PAUSED_DEADLINE,
        "build #2",
        builds.wait_for(|&b| b >= 2),
    )
    .await
    .unwrap();
    for _ in 0..5 {
        provider.notify();
        tokio::task::yield_now().await;
    }
    loader.gate.add_permits(100);
    support::within_for(
        support::PAUSED_DEADLINE,
        "generation 2",
        credentials.wait_for(|c| c.generation == 2),
    )
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_secs(3600)).await;
    assert_eq!(*loader.builds.borrow(), 3, "one build for the five notices");
    assert_eq!(reloader.current().generation, 2);
    assert_eq!(reloader.failed_builds(), 0);
}

async fn wait_generation(credentials: &mut watch::Receiver<ServerCredentials>, generation: u64) {
    support::within(
        &format!("generation {generation}"),
        credentials.wait_for(|c| c.generation == generation),
    )
    .await
    .unwrap();
}
