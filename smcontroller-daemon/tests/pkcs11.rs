//! `smcontrollerd` with its key in a PKCS#11 token (contract R-TLS-5): the binary, started with a
//! `pkcs11:` keyUrl, serves mTLS with signatures made by a real token (SoftHSM2, the Debian
//! package `softhsm2`), and a simulated SM registers with it. The test runs in a process of its
//! own with a token directory of its own (`SOFTHSM2_CONF`, which the daemon inherits); it fails,
//! naming the package, where SoftHSM2 is not installed.

use std::{
    io::{BufRead, BufReader},
    process::{Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use smcontroller_certs::test_util::{
    LeafSpec, TestPki,
    softhsm::{self, TokenKeyKind},
};
use smcontroller_daemon::sim::{SimConfig, SimTls, Simulator};

const DAEMON: &str = env!("CARGO_BIN_EXE_smcontrollerd");

/// How long the daemon may take to log what the test waits for.
const DEADLINE: Duration = Duration::from_secs(20);

const PIN: &str = "pin-8472-never-logged";

/// The daemon's log lines, read as they come.
struct Log {
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl Log {
    /// The first line `pred` accepts, waiting for it; panics with the log after [`DEADLINE`].
    fn wait_for(&mut self, pred: impl Fn(&str) -> bool) -> String {
        if let Some(line) = self.seen.iter().find(|l| pred(l)) {
            return line.clone();
        }
        let give_up = Instant::now() + DEADLINE;
        loop {
            let left = give_up.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if pred(&line) {
                        return line;
                    }
                }
                Err(e) => panic!("line not logged ({e}); log: {:#?}", self.seen),
            }
        }
    }
}

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

    let mut child = Command::new(DAEMON)
        .arg("--config")
        .arg(&config_path)
        .args([
            "--listen",
            "127.0.0.1:0",
            "--log",
            "info",
            "--admin-socket",
            "off",
        ])
        .env("NO_COLOR", "1")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, lines) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut log = Log {
        lines,
        seen: Vec::new(),
    };
    let listening = log.wait_for(|l| l.contains("SM controller listening"));
    let addr = listening
        .split("addr=")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .expect("the daemon logs its address")
        .to_owned();
    log.wait_for(|l| l.contains("serving SMService over mTLS"));

    let sim = Simulator::start(SimConfig {
        tls: Some(SimTls::from_pki_dir(dir.path()).unwrap()),
        ..SimConfig::new(format!("https://{addr}"), 1)
    })
    .unwrap();
    assert!(
        sim.wait_connected(1, DEADLINE).await,
        "{}; log: {:#?}",
        sim.stats(),
        log.seen
    );
    log.wait_for(|l| l.contains("node connected") && l.contains("node-1"));
    sim.stop().await;

    let kill = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    let status = tokio::task::spawn_blocking(move || child.wait())
        .await
        .unwrap()
        .unwrap();
    log.seen.extend(log.lines.iter());
    assert!(status.success(), "log: {:#?}", log.seen);
    assert!(
        !log.seen.iter().any(|l| l.contains(PIN)),
        "the PIN never reaches the log: {:#?}",
        log.seen
    );
    assert!(
        !dir.path().join("server.key").exists(),
        "no key file: the key is in the token"
    );
}
