//! The `smcontrollerd` binary as an operator runs it (R-LISTEN-1, R-STOP-1, R-TLS-1, R-TLS-2,
//! exit codes).

use std::{net::SocketAddr, path::Path, process::Command, sync::Arc, time::Duration};

use rustls::{
    ClientConfig, RootCertStore,
    pki_types::{CertificateDer, ServerName},
};
use smcontroller_certs::test_util::{LeafSpec, TestPki};
use smcontroller_sim::{SimConfig, SimTls, Simulator};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};
use tokio_rustls::TlsConnector;

mod process;

use process::{DAEMON, DEADLINE, Daemon};

/// Runs the daemon with `args` to its exit; its exit code and stderr.
fn run_to_exit(args: &[&str]) -> (Option<i32>, String) {
    let out = Command::new(DAEMON)
        .args(args)
        .args(["--admin-socket", "off"])
        .env("NO_COLOR", "1")
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn path(p: &Path) -> &str {
    p.to_str().expect("a UTF-8 temp path")
}

#[test]
fn a_bad_config_exits_64_with_a_message_naming_the_problem() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("bad.json");
    std::fs::write(
        &file,
        r#"{"cmServerUrl": ":8093", "responseTimeout": "soon"}"#,
    )
    .unwrap();
    let relative_ca = dir.path().join("relative.json");
    std::fs::write(&relative_ca, r#"{"caCert": "ca.pem"}"#).unwrap();

    let cases: [(&[&str], &[&str]); 4] = [
        (&["--insecure", "--listen", ""], &["--listen"]),
        (
            &["--insecure", "--config", path(&file)],
            &["responseTimeout"],
        ),
        // The default config: no TLS settings, no --insecure.
        (
            &["--listen", "127.0.0.1:0"],
            &[
                "mTLS needs caCert, certStorage, certUrl and keyUrl",
                "--pki DIR",
                "--insecure",
            ],
        ),
        (
            &["--insecure", "--config", path(&relative_ca)],
            &[r#"caCert: "ca.pem" cannot be used"#],
        ),
    ];
    for (args, expected) in cases {
        let (code, stderr) = run_to_exit(args);
        assert_eq!(code, Some(64), "{args:?}: {stderr}");
        for text in expected {
            assert!(stderr.contains(text), "{args:?}: {stderr}");
        }
    }
}

#[test]
fn r_tls_1_credentials_that_cannot_be_loaded_exit_64_naming_the_file_and_the_reason() {
    let pki = TestPki::new().unwrap();
    let empty = tempfile::tempdir().unwrap();
    let mismatch = tempfile::tempdir().unwrap();
    pki.write_dev_pki(mismatch.path(), 1).unwrap();
    // Another certificate's key in place of the server's.
    std::fs::copy(
        mismatch.path().join("client-node-1.key"),
        mismatch.path().join("server.key"),
    )
    .unwrap();
    let expired = tempfile::tempdir().unwrap();
    pki.write_dev_pki(expired.path(), 1).unwrap();
    pki.issue(&LeafSpec::server().expired())
        .unwrap()
        .write(expired.path(), "server")
        .unwrap();

    let server_pem = |dir: &Path| dir.join("server.pem").display().to_string();
    let server_key = |dir: &Path| dir.join("server.key").display().to_string();
    let cases = [
        (
            empty.path(),
            vec![server_pem(empty.path()), "cannot read".into()],
        ),
        (
            mismatch.path(),
            vec![
                server_key(mismatch.path()),
                "key does not match certificate".into(),
            ],
        ),
        (
            expired.path(),
            vec![server_pem(expired.path()), "certificate expired".into()],
        ),
    ];
    for (dir, expected) in cases {
        let (code, stderr) = run_to_exit(&["--pki", path(dir), "--listen", "127.0.0.1:0"]);
        assert_eq!(code, Some(64), "{dir:?}: {stderr}");
        for text in &expected {
            assert!(stderr.contains(text.as_str()), "{dir:?}: {text}: {stderr}");
        }
    }
}

/// A TLS client that trusts the daemon's CA but has no client certificate of its own.
fn client_without_certificate(ca: CertificateDer<'static>, tls13: bool) -> TlsConnector {
    let mut roots = RootCertStore::empty();
    roots.add(ca).unwrap();
    let versions: &[&rustls::SupportedProtocolVersion] = if tls13 {
        &[&rustls::version::TLS13]
    } else {
        &[&rustls::version::TLS12]
    };
    let mut config =
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_protocol_versions(versions)
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    TlsConnector::from(Arc::new(config))
}

/// What happened to a client without a certificate: `Err` with where it failed, or `Ok` if it
/// got through the handshake and read something.
async fn try_without_certificate(
    addr: SocketAddr,
    connector: &TlsConnector,
) -> (SocketAddr, Result<String, String>) {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let local = tcp.local_addr().unwrap();
    let server_name = ServerName::from(addr.ip());
    let mut tls = match connector.connect(server_name, tcp).await {
        Ok(tls) => tls,
        Err(e) => return (local, Err(format!("handshake: {e}"))),
    };
    // With TLS 1.3 the client finishes its side of the handshake before the server has seen
    // its (missing) certificate: the refusal arrives as an alert on the first read.
    let preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
    if let Err(e) = tls.write_all(preface).await {
        return (local, Err(format!("write: {e}")));
    }
    let mut buf = [0u8; 256];
    let read = tokio::time::timeout(DEADLINE, tls.read(&mut buf))
        .await
        .expect("the server answers or refuses in time");
    match read {
        Ok(n) => (local, Ok(format!("read {n} bytes"))),
        Err(e) => (local, Err(format!("first read: {e}"))),
    }
}

/// Done-when of issue 8: `smcontrollerd` serving mTLS (here from `--pki`) accepts SMs that
/// present a client certificate from its CA, and a TLS client without one cannot complete a
/// handshake: it never reaches HTTP/2, let alone `RegisterSM`, and the refusal is logged with
/// its address.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn r_tls_1_the_daemon_with_pki_accepts_sms_over_mtls_and_refuses_a_client_without_a_certificate()
 {
    let dir = tempfile::tempdir().unwrap();
    let pki = TestPki::new().unwrap();
    pki.write_dev_pki(dir.path(), 3).unwrap();
    let mut daemon = Daemon::start(&["--pki", path(dir.path()), "--listen", "127.0.0.1:0"]);
    assert!(daemon.ready.mtls, "{:?}", daemon.ready);

    let sim = Simulator::start(SimConfig {
        tls: Some(SimTls::from_pki_dir(dir.path()).unwrap()),
        ..SimConfig::new(format!("https://{}", daemon.addr), 3)
    })
    .unwrap();
    assert!(
        sim.wait_connected(3, DEADLINE).await,
        "{}; log: {:#?}",
        sim.stats(),
        daemon.log
    );
    for node in ["node-1", "node-2", "node-3"] {
        daemon.wait_for_line(|l| l.contains("node connected") && l.contains(node));
    }

    for tls13 in [true, false] {
        let connector = client_without_certificate(pki.ca_der(), tls13);
        let (local, outcome) = try_without_certificate(daemon.addr, &connector).await;
        let version = if tls13 { "TLS 1.3" } else { "TLS 1.2" };
        assert!(outcome.is_err(), "{version}: {outcome:?}");
        let refused = daemon.wait_for_line(|l| {
            l.contains("TLS handshake refused") && l.contains(&local.to_string())
        });
        assert!(
            refused.contains("no client certificate"),
            "{version}: {refused}"
        );
    }

    sim.stop().await;
    let (success, _) = tokio::task::block_in_place(|| daemon.terminate());
    let log = &daemon.log;
    assert!(success, "log: {log:#?}");
    assert!(
        !log.iter().any(|l| l.contains("WITHOUT TLS")),
        "mTLS, not insecure: {log:#?}"
    );
    assert_eq!(
        log.iter().filter(|l| l.contains("node connected")).count(),
        3,
        "only the simulated SMs registered: {log:#?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn r_stop_1_sigterm_stops_the_daemon_within_a_second_with_smes_connected() {
    // Port 0: the daemon logs the address it got.
    let mut daemon = Daemon::start(&["--insecure", "--listen", "127.0.0.1:0"]);
    // Insecure mode is logged as a warning (R-TLS-2).
    let warning = daemon.wait_for_line(|l| l.contains("WITHOUT TLS"));
    assert!(warning.contains("WARN"), "{warning}");

    let mut config = SimConfig::new(format!("http://{}", daemon.addr), 5);
    config.monitoring_rate = 200.0;
    let sim = Simulator::start(config).unwrap();
    assert!(sim.wait_connected(5, Duration::from_secs(10)).await);
    // The SMs see their streams open before the receivers hear *connected*; a node stopped
    // before that is never reported at all (R-REG-5). Wait for the daemon's own word.
    for i in 1..=5 {
        let node = format!("node_id=node-{i} ");
        daemon.wait_for_line(|l| l.contains("node connected") && l.contains(&node));
    }

    let (success, took) = tokio::task::block_in_place(|| daemon.terminate());
    let log = &daemon.log;
    sim.stop().await;
    assert!(success, "log: {log:#?}");
    assert!(took < Duration::from_secs(1), "stopping took {took:?}");
    let disconnects = log
        .iter()
        .filter(|l| l.contains("node disconnected") && l.contains("shutting down"))
        .count();
    assert_eq!(
        disconnects, 5,
        "each node's disconnect is reported: {log:#?}"
    );
}
