//! Real TLS over 127.0.0.1 with a PKI made at test time: who gets through the handshake, who
//! is refused and how it is logged, what the server learns about a client, and that new
//! handshakes take up renewed credentials.

mod support;

use std::{sync::Arc, time::Duration};

use smcontroller_certs::{
    AcceptSettings, CredentialsBuilder, CredentialsReloader, FileCertLoader, FileCertProvider,
    HandshakeRefusal, IdentityField, ReloadSettings,
    test_util::{LeafSpec, Signer, Usage},
};
use support::{
    EchoServer, Logs, Pki, client_config, client_config_with, connect, ping, session, within,
};
use tokio::{io::AsyncReadExt, net::TcpStream};

/// The credentials of `pki`'s files, published by a reloader.
async fn reloader(pki: &Pki) -> CredentialsReloader {
    let (builder, _provider) = pki.builder(Arc::new(FileCertLoader::new()));
    CredentialsReloader::start(builder, ReloadSettings::default())
        .await
        .expect("credentials")
}

#[tokio::test]
async fn a_client_with_a_certificate_from_the_ca_is_served() {
    let pki = Pki::new();
    let reloader = reloader(&pki).await;
    let mut server = EchoServer::start(reloader.subscribe(), AcceptSettings::default()).await;
    let client = pki.pki.client("node-1").unwrap();

    let mut stream = connect(server.addr, client_config(pki.pki.ca_der(), Some(&client)))
        .await
        .expect("handshake");
    assert_eq!(ping(&mut stream).await.unwrap(), b"ping");

    let (_, tls) = stream.get_ref();
    assert_eq!(tls.alpn_protocol(), Some(&b"h2"[..]));
    assert_eq!(
        tls.protocol_version(),
        Some(rustls::ProtocolVersion::TLSv1_3)
    );
    assert_eq!(tls.peer_certificates().unwrap()[0], pki.server.cert_der());

    let info = server.next_accepted().await;
    assert_eq!(info.peer_addr(), stream.get_ref().0.local_addr().unwrap());
    assert_eq!(info.generation(), 0);
    assert_eq!(info.peer_certificates(), &[client.cert_der()]);
    let identity = info
        .peer_identity()
        .expect("names of the client certificate");
    assert_eq!(identity.common_name(), Some("node-1"));
    assert_eq!(identity.dns_names(), ["node-1"]);
    assert!(identity.matches("node-1", IdentityField::CommonName));
    assert!(identity.matches("node-1", IdentityField::DnsSan));
    assert!(!identity.matches("node-2", IdentityField::Any));
}

#[tokio::test]
async fn tls_1_2_clients_are_served_too() {
    let pki = Pki::new();
    let reloader = reloader(&pki).await;
    let mut server = EchoServer::start(reloader.subscribe(), AcceptSettings::default()).await;
    let client = pki.pki.client("node-1").unwrap();
    let config = client_config_with(pki.pki.ca_der(), Some(&client), &[&rustls::version::TLS12]);

    let mut stream = connect(server.addr, config).await.expect("handshake");
    assert_eq!(ping(&mut stream).await.unwrap(), b"ping");
    assert_eq!(
        stream.get_ref().1.protocol_version(),
        Some(rustls::ProtocolVersion::TLSv1_2)
    );
    server.next_accepted().await;
}

/// Runs a client with `config` against a fresh server: it must not get through, the server must
/// log the refusal once with the client's address and `reason`, and must hand on the next,
/// good client as its first connection (so the refused one never reached it).
async fn refused(pki: &Pki, config: Arc<rustls::ClientConfig>, reason: HandshakeRefusal) {
    let logs = Logs::capture();
    let reloader = reloader(pki).await;
    let mut server = EchoServer::start(reloader.subscribe(), AcceptSettings::default()).await;

    let tcp = TcpStream::connect(server.addr).await.unwrap();
    let client_addr = tcp.local_addr().unwrap().to_string();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let outcome = match tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await
    {
        Ok(mut stream) => ping(&mut stream).await,
        Err(e) => Err(e),
    };
    assert!(
        outcome.is_err(),
        "{reason:?}: the client got through: {outcome:?}"
    );

    let logged = logs
        .wait_for("the refusal", |e| {
            e.field("peer") == Some(client_addr.as_str())
        })
        .await;
    assert_eq!(logged.level, tracing::Level::WARN);
    assert_eq!(logged.message, "TLS handshake refused");
    assert_eq!(logged.field("reason"), Some(reason.as_str()), "{logged:?}");

    let good = pki.pki.client("node-1").unwrap();
    let mut stream = connect(server.addr, client_config(pki.pki.ca_der(), Some(&good)))
        .await
        .unwrap();
    assert_eq!(ping(&mut stream).await.unwrap(), b"ping");
    let first = server.next_accepted().await;
    assert_eq!(first.peer_addr(), stream.get_ref().0.local_addr().unwrap());

    let about_client = logs.matching(|e| e.field("peer") == Some(client_addr.as_str()));
    assert_eq!(about_client.len(), 1, "logged once: {about_client:?}");
}

#[tokio::test]
async fn a_client_without_a_certificate_is_refused() {
    let pki = Pki::new();
    let config = client_config(pki.pki.ca_der(), None);
    refused(&pki, config, HandshakeRefusal::NoClientCertificate).await;
}

#[tokio::test]
async fn an_expired_client_certificate_is_refused() {
    let pki = Pki::new();
    let expired = pki
        .pki
        .issue(&LeafSpec::client("node-1").expired())
        .unwrap();
    let config = client_config(pki.pki.ca_der(), Some(&expired));
    refused(&pki, config, HandshakeRefusal::Expired).await;
}

#[tokio::test]
async fn a_client_certificate_from_another_ca_is_refused() {
    let pki = Pki::new();
    let foreign = pki
        .pki
        .issue(&LeafSpec::client("node-1").signed_by(Signer::ForeignCa))
        .unwrap();
    let config = client_config(pki.pki.ca_der(), Some(&foreign));
    refused(&pki, config, HandshakeRefusal::UnknownCa).await;
}

#[tokio::test]
async fn a_server_only_certificate_is_refused_as_a_client_certificate() {
    let pki = Pki::new();
    let server_only = pki
        .pki
        .issue(&LeafSpec::client("node-1").usage(Usage::Server))
        .unwrap();
    let config = client_config(pki.pki.ca_der(), Some(&server_only));
    refused(&pki, config, HandshakeRefusal::NotForClientAuth).await;
}

#[tokio::test]
async fn a_refused_tls_1_2_client_fails_its_handshake() {
    let pki = Pki::new();
    let config = client_config_with(pki.pki.ca_der(), None, &[&rustls::version::TLS12]);
    refused(&pki, config, HandshakeRefusal::NoClientCertificate).await;
}

#[tokio::test]
async fn a_plain_http2_client_is_refused_as_not_tls() {
    let pki = Pki::new();
    let logs = Logs::capture();
    let reloader = reloader(&pki).await;
    let server = EchoServer::start(reloader.subscribe(), AcceptSettings::default()).await;

    let mut tcp = TcpStream::connect(server.addr).await.unwrap();
    let client_addr = tcp.local_addr().unwrap().to_string();
    tokio::io::AsyncWriteExt::write_all(&mut tcp, b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        .await
        .unwrap();
    let mut rest = Vec::new();
    let _ = within("the server to close", tcp.read_to_end(&mut rest)).await;

    let logged = logs
        .wait_for("the refusal", |e| {
            e.field("peer") == Some(client_addr.as_str())
        })
        .await;
    assert_eq!(
        logged.field("reason"),
        Some(HandshakeRefusal::NotTls.as_str())
    );
}

#[tokio::test]
async fn a_client_that_stalls_its_handshake_is_closed_after_the_timeout() {
    let pki = Pki::new();
    let logs = Logs::capture();
    let reloader = reloader(&pki).await;
    let settings = AcceptSettings::default().with_handshake_timeout(Duration::from_millis(200));
    let server = EchoServer::start(reloader.subscribe(), settings).await;

    let mut tcp = TcpStream::connect(server.addr).await.unwrap();
    let client_addr = tcp.local_addr().unwrap().to_string();
    let started = std::time::Instant::now();
    let mut rest = Vec::new();
    let read = within("the server to close", tcp.read_to_end(&mut rest)).await;
    assert!(read.is_ok_and(|n| n == 0) || rest.is_empty());
    assert!(started.elapsed() >= Duration::from_millis(200));

    let logged = logs
        .wait_for("the refusal", |e| {
            e.field("peer") == Some(client_addr.as_str())
        })
        .await;
    assert_eq!(
        logged.field("reason"),
        Some(HandshakeRefusal::TimedOut.as_str())
    );
}

#[tokio::test]
async fn a_full_server_accepts_again_when_a_connection_closes() {
    let pki = Pki::new();
    let reloader = reloader(&pki).await;
    let settings = AcceptSettings::default().with_max_connections(1);
    let mut server = EchoServer::start(reloader.subscribe(), settings).await;
    let config = client_config(pki.pki.ca_der(), Some(&pki.pki.client("node-1").unwrap()));

    let mut first = connect(server.addr, Arc::clone(&config)).await.unwrap();
    assert_eq!(ping(&mut first).await.unwrap(), b"ping");
    server.next_accepted().await;

    // The second connection waits in the backlog: its handshake starts only once the first
    // connection is gone.
    let second = tokio::spawn(session(server.addr, Arc::clone(&config)));
    drop(first);
    assert_eq!(
        within("the second session", second).await.unwrap().unwrap(),
        b"ping"
    );
    server.next_accepted().await;
}

#[tokio::test]
async fn new_handshakes_see_the_renewed_server_certificate() {
    let pki = Pki::new();
    let provider = FileCertProvider::builder()
        .storage("sm", pki.url("server.pem"), pki.url("server.key"))
        .poll_interval(Duration::from_millis(10))
        .spawn()
        .unwrap();
    let builder = CredentialsBuilder::new(
        Arc::new(provider),
        Arc::new(FileCertLoader::new()),
        "sm",
        pki.ca_url(),
    );
    let reloader = CredentialsReloader::start(builder, ReloadSettings::default())
        .await
        .unwrap();
    let mut credentials = reloader.subscribe();
    let mut server = EchoServer::start(reloader.subscribe(), AcceptSettings::default()).await;
    let config = client_config(pki.pki.ca_der(), Some(&pki.pki.client("node-1").unwrap()));

    let mut before = connect(server.addr, Arc::clone(&config)).await.unwrap();
    assert_eq!(
        before.get_ref().1.peer_certificates().unwrap()[0],
        pki.server.cert_der()
    );
    assert_eq!(server.next_accepted().await.generation(), 0);

    let renewed = pki.pki.server().unwrap();
    pki.replace("server.key", renewed.key_pem());
    pki.replace("server.pem", renewed.cert_pem());
    // The provider may see the new key before the new certificate: the build it triggers then
    // fails (key does not match) and the next notice rebuilds. A successful build reads the key
    // after the notice, so after the key was replaced: generation 1 is the renewed pair.
    within("generation 1", credentials.wait_for(|c| c.generation >= 1))
        .await
        .unwrap();

    let mut after = connect(server.addr, config).await.unwrap();
    assert_eq!(
        after.get_ref().1.peer_certificates().unwrap()[0],
        renewed.cert_der()
    );
    assert_eq!(ping(&mut after).await.unwrap(), b"ping");
    assert!(server.next_accepted().await.generation() >= 1);
    // The connection made before the renewal is not cut by the acceptor: closing SM streams is
    // the server's part.
    assert_eq!(ping(&mut before).await.unwrap(), b"ping");
}
