//! `smcontrollerd` as a service runs it: the blob URLs of its `blobUrlTemplate` (R-BLOB-1), its
//! readiness and stopping notices to systemd (`Type=notify`), and the sample config of
//! `config.sample.json`, which must load.

use std::path::Path;

use smcontroller_grpc::proto::servicemanager::v5::{
    BlobsInfosRequest, sm_service_client::SmServiceClient,
};
use tonic::Code;

mod process;

use process::{DEADLINE, Daemon};

/// A client of the daemon's SM endpoint (plain HTTP/2).
async fn client(daemon: &Daemon) -> SmServiceClient<tonic::transport::Channel> {
    SmServiceClient::connect(format!("http://{}", daemon.addr))
        .await
        .expect("the daemon accepts connections")
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
    let mut daemon = Daemon::start(&[
        "--insecure",
        "--listen",
        "127.0.0.1:0",
        "--config",
        &file,
        "--admin-socket",
        "off",
    ]);
    let mut client = client(&daemon).await;
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
    assert!(daemon.terminate().0);
}

#[tokio::test]
async fn r_blob_1_without_a_template_every_digest_is_not_found() {
    let mut daemon = Daemon::start(&["--insecure", "--listen", "127.0.0.1:0"]);
    let status = client(&daemon)
        .await
        .get_blobs_infos(BlobsInfosRequest {
            digests: vec![format!("sha256:{}", "ab".repeat(32))],
        })
        .await
        .expect_err("no blob store");
    assert_eq!(status.code(), Code::NotFound);
    assert!(status.message().contains("no blob store"), "{status:?}");
    assert!(daemon.terminate().0);
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

    let mut daemon = Daemon::start_with(
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
    let (success, _) = daemon.terminate();
    assert!(
        success,
        "SIGTERM ends the daemon successfully: {:#?}",
        daemon.log
    );
    assert_eq!(notice(), "STOPPING=1\n");
}
