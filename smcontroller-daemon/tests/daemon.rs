//! The `smcontrollerd` binary as an operator runs it (R-LISTEN-1, R-STOP-1, exit codes).

use std::{
    io::{BufRead, BufReader},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use smcontroller_daemon::sim::{SimConfig, Simulator};

const DAEMON: &str = env!("CARGO_BIN_EXE_smcontrollerd");

#[test]
fn a_bad_config_exits_64_with_a_message_naming_the_problem() {
    let dir = std::env::temp_dir().join(format!("smcontrollerd-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("bad.json");
    std::fs::write(
        &file,
        r#"{"cmServerUrl": ":8093", "responseTimeout": "soon"}"#,
    )
    .unwrap();

    let cases: [(&[&str], &str); 3] = [
        (&["--insecure", "--listen", ""], "--listen"),
        (
            &["--insecure", "--config", file.to_str().unwrap()],
            "responseTimeout",
        ),
        (
            &["--listen", "127.0.0.1:0"],
            "mTLS needs caCert and certStorage",
        ),
    ];
    for (args, expected) in cases {
        let out = Command::new(DAEMON).args(args).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{args:?}: {stderr}");
        assert!(stderr.contains(expected), "{args:?}: {stderr}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn r_stop_1_sigterm_stops_the_daemon_within_a_second_with_smes_connected() {
    // Port 0: the daemon logs the address it got.
    let mut child = Command::new(DAEMON)
        .args(["--insecure", "--listen", "127.0.0.1:0", "--log", "info"])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (addr_tx, addr_rx) = std::sync::mpsc::channel();
    let reader = std::thread::spawn(move || {
        let mut lines = Vec::new();
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if line.contains("SM controller listening")
                && let Some(addr) = line.split("addr=").nth(1)
            {
                let _ = addr_tx.send(addr.split_whitespace().next().unwrap_or("").to_owned());
            }
            lines.push(line);
        }
        lines
    });
    let addr = addr_rx
        .recv_timeout(Duration::from_secs(20))
        .expect("the daemon logs its address");

    let mut config = SimConfig::new(format!("http://{addr}"), 5);
    config.monitoring_rate = 200.0;
    let sim = Simulator::start(config).unwrap();
    assert!(sim.wait_connected(5, Duration::from_secs(10)).await);

    let started = Instant::now();
    let kill = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    let status = tokio::task::spawn_blocking(move || child.wait())
        .await
        .unwrap()
        .unwrap();
    let took = started.elapsed();
    sim.stop().await;
    let log = reader.join().unwrap();
    assert!(status.success(), "exit status {status:?}; log: {log:#?}");
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
