//! `smcontrollerd` with its key in a PKCS#11 token (contract R-TLS-5): the binary, started with a
//! `pkcs11:` keyUrl, serves mTLS with signatures made by a real token (SoftHSM2, the Debian
//! package `softhsm2`), and a simulated SM registers with it. The test runs in a process of its
//! own with a token directory of its own (`SOFTHSM2_CONF`, which the daemon inherits); it fails,
//! naming the package, where SoftHSM2 is not installed.

use smcontroller_certs::test_util::{
    LeafSpec, TestPki,
    softhsm::{self, TokenKeyKind},
};
use smcontroller_sim::{SimConfig, SimTls, Simulator};

mod process;

use process::{DEADLINE, Daemon};

const PIN: &str = "pin-8472-never-logged";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pkcs11_smcontrollerd_with_a_token_key_serves_mtls_and_an_sm_registers() {
    let Some(hsm) =
        softhsm::isolated("pkcs11_smcontrollerd_with_a_token_key_serves_mtls_and_an_sm_registers")
    else {
        return;
    };
    // The token, with the server key in it; the unit's PKI around it.
    let token = hsm.init_token("aos", PIN).unwrap();
    let key = token
        .generate_key(TokenKeyKind::EcP256, "sm", &[1])
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let pki = TestPki::new().unwrap();
    pki.write_dev_pki(dir.path(), 1).unwrap();
    std::fs::remove_file(dir.path().join("server.key")).unwrap();
    let server_pem = dir.path().join("server.pem");
    pki.issue_for(&LeafSpec::server(), &key.public_key)
        .unwrap()
        .write(&server_pem)
        .unwrap();
    let key_url = token.url("sm", &[1]);
    let config = serde_json::json!({
        "certStorage": "sm",
        "certUrl": format!("file://{}", server_pem.display()),
        "keyUrl": key_url,
        "caCert": format!("file://{}", dir.path().join("ca.pem").display()),
    });
    let config_path = dir.path().join("smcontrollerd.json");
    std::fs::write(&config_path, config.to_string()).unwrap();

    let mut daemon = Daemon::start(&[
        "--config",
        config_path.to_str().expect("a UTF-8 temp path"),
        "--listen",
        "127.0.0.1:0",
        "--admin-socket",
        "off",
    ]);
    assert!(daemon.ready.mtls, "{:?}", daemon.ready);
    let addr = daemon.addr;

    let sim = Simulator::start(SimConfig {
        tls: Some(SimTls::from_pki_dir(dir.path()).unwrap()),
        ..SimConfig::new(format!("https://{addr}"), 1)
    })
    .unwrap();
    assert!(
        sim.wait_connected(1, DEADLINE).await,
        "{}; log: {:#?}",
        sim.stats(),
        daemon.log
    );
    daemon.wait_for_line(|l| l.contains("node connected") && l.contains("node-1"));
    sim.stop().await;

    let (success, _) = tokio::task::block_in_place(|| daemon.terminate());
    assert!(success, "log: {:#?}", daemon.log);
    assert!(
        !daemon.log.iter().any(|l| l.contains(PIN)),
        "the PIN never reaches the log: {:#?}",
        daemon.log
    );
    assert!(
        !dir.path().join("server.key").exists(),
        "no key file: the key is in the token"
    );
}
