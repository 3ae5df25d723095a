//! `smcontrollerd` as a service runs it: the blob URLs of its `blobUrlTemplate` (R-BLOB-1), its
//! readiness and stopping notices to systemd (`Type=notify`), and the sample config of
//! `config.sample.json`, which must load.

use std::{
    io::{BufRead, BufReader},
    net::SocketAddr,
    path::Path,
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use smcontroller_grpc::proto::servicemanager::v5::{
    BlobsInfosRequest, sm_service_client::SmServiceClient,
};
use tonic::Code;

const DAEMON: &str = env!("CARGO_BIN_EXE_smcontrollerd");

/// How long the daemon may take to log or notify what a test waits for.
const DEADLINE: Duration = Duration::from_secs(20);

/// A running `smcontrollerd`; killed when dropped (a failed test leaves no process behind).
struct Daemon {
    child: Child,
    addr: SocketAddr,
}

impl Daemon {
    /// Starts the daemon with `args` and `env` and waits for the address it logs.
    fn start(args: &[&str], env: &[(&str, &Path)]) -> Self {
        let mut command = Command::new(DAEMON);
        command
            .args(args)
            // No admin socket: tests run at once, and as root its default is in /run.
            .args(["--log", "info", "--admin-socket", "off"])
            .env("NO_COLOR", "1")
            .env_remove("NOTIFY_SOCKET")
            .stderr(Stdio::piped());
        for (key, value) in env {
            command.env(key, value);
        }
        let mut child = command.spawn().unwrap();
        let stderr = child.stderr.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let give_up = Instant::now() + DEADLINE;
        let mut log = Vec::new();
        let addr = loop {
            let left = give_up.saturating_duration_since(Instant::now());
            match lines.recv_timeout(left) {
                Ok(line) => {
                    if let Some(rest) = line.split("SM controller listening addr=").nth(1) {
                        let addr = rest.split_whitespace().next().unwrap_or_default();
                        break addr.parse().expect("a socket address");
                    }
                    log.push(line);
                }
                Err(e) => {
                    let _ = child.kill();
                    panic!("the daemon did not log its address ({e}); log: {log:#?}");
                }
            }
        };
        Self { child, addr }
    }

    async fn client(&self) -> SmServiceClient<tonic::transport::Channel> {
        SmServiceClient::connect(format!("http://{}", self.addr))
            .await
            .expect("the daemon accepts connections")
    }

    /// Sends SIGTERM and waits for the exit; whether it exited successfully.
    fn terminate(&mut self) -> bool {
        let kill = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(kill.success());
        self.child.wait().unwrap().success()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Writes `json` as the config file `name` in `dir`; its path.
fn config(dir: &Path, name: &str, json: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, json).unwrap();
    path.to_str().expect("a UTF-8 temp path").to_owned()
}

#[tokio::test]
async fn r_blob_1_the_daemon_answers_each_digest_with_its_url_template() {
    let dir = tempfile::tempdir().unwrap();
    let file = config(
        dir.path(),
        "blobs.json",
        r#"{"blobUrlTemplate": "https://cloud.example/blobs/{digest}"}"#,
    );
    let mut daemon = Daemon::start(
        &["--insecure", "--listen", "127.0.0.1:0", "--config", &file],
        &[],
    );
    let mut client = daemon.client().await;
    let manifest = format!("sha256:{}", "ab".repeat(32));
    let layer = format!("sha512:{}", "0f".repeat(64));
    let urls = client
        .get_blobs_infos(BlobsInfosRequest {
            digests: vec![manifest.clone(), layer.clone()],
        })
        .await
        .expect("both digests resolve")
        .into_inner()
        .urls;
    assert_eq!(
        urls,
        [
            format!("https://cloud.example/blobs/{manifest}"),
            format!("https://cloud.example/blobs/{layer}"),
        ]
    );
    let empty = client
        .get_blobs_infos(BlobsInfosRequest { digests: vec![] })
        .await
        .expect("an empty list is answered");
    assert!(empty.into_inner().urls.is_empty());

    // What is not a digest never reaches the URL.
    let status = client
        .get_blobs_infos(BlobsInfosRequest {
            digests: vec![manifest, "sha256:../../etc/passwd".to_owned()],
        })
        .await
        .expect_err("a path is not a digest");
    assert_eq!(status.code(), Code::NotFound);
    assert!(
        status.message().contains("sha256:../../etc/passwd")
            && status.message().contains("not a blob digest"),
        "{status:?}"
    );
    assert!(daemon.terminate());
}

#[tokio::test]
async fn r_blob_1_without_a_template_every_digest_is_not_found() {
    let mut daemon = Daemon::start(&["--insecure", "--listen", "127.0.0.1:0"], &[]);
    let status = daemon
        .client()
        .await
        .get_blobs_infos(BlobsInfosRequest {
            digests: vec![format!("sha256:{}", "ab".repeat(32))],
        })
        .await
        .expect_err("no blob store");
    assert_eq!(status.code(), Code::NotFound);
    assert!(status.message().contains("no blob store"), "{status:?}");
    assert!(daemon.terminate());
}

/// The notices a `Type=notify` unit waits for: `READY=1` once the SM listener is bound (its
/// status names the address), `STOPPING=1` on SIGTERM. systemd's side is a Unix datagram socket
/// named by `NOTIFY_SOCKET`; the test makes one.
#[cfg(unix)]
#[test]
fn systemd_hears_ready_once_the_daemon_listens_and_stopping_on_sigterm() {
    use std::os::unix::net::UnixDatagram;

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("notify.sock");
    let systemd = UnixDatagram::bind(&path).unwrap();
    systemd.set_read_timeout(Some(DEADLINE)).unwrap();
    let notice = || {
        let mut buf = [0u8; 1024];
        let n = systemd
            .recv(&mut buf)
            .expect("a notice before the deadline");
        String::from_utf8(buf[..n].to_vec()).expect("UTF-8")
    };

    let mut daemon = Daemon::start(
        &["--insecure", "--listen", "127.0.0.1:0"],
        &[("NOTIFY_SOCKET", &path)],
    );
    let ready = notice();
    let lines: Vec<&str> = ready.lines().collect();
    assert_eq!(
        lines,
        ["READY=1", &format!("STATUS=serving SMs on {}", daemon.addr)],
        "{ready:?}"
    );
    assert!(daemon.terminate(), "SIGTERM ends the daemon successfully");
    assert_eq!(notice(), "STOPPING=1\n");
}
