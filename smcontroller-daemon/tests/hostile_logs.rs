//! What hostile peers can make the controller write to its log (R-BAD-3, issue 9 item 4):
//! values a peer sends are cut, and the warnings one SM causes are rate-limited with a count
//! of what was suppressed.
//!
//! A binary of its own: it installs a process-wide tracing subscriber (as the daemon does, at
//! `info`) that writes into a buffer the tests read. The tests take turns, so each one's log
//! growth is its own.

mod hostile_support;
mod support;

use std::{
    io::Write,
    sync::{Arc, Mutex, OnceLock},
};

use hostile_support::{GOOD, Hostile, end_status, open_stream, outgoing, within};
use smcontroller_grpc::{
    proto::servicemanager::v5::{self as pb, sm_outgoing_messages::SmOutgoingMessage},
    server::ServerSettings,
};
use smcontroller_routing::Settings;
use smcontroller_sim::messages;
use support::{DEADLINE, Event};
use tonic::Code;

/// The log, as written.
fn log() -> &'static Arc<Mutex<Vec<u8>>> {
    static LOG: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    LOG.get_or_init(|| {
        let buffer = Arc::new(Mutex::new(Vec::new()));
        let writer = buffer.clone();
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new("info"))
            .with_ansi(false)
            .with_writer(move || Shared(writer.clone()))
            .init();
        buffer
    })
}

struct Shared(Arc<Mutex<Vec<u8>>>);

impl Write for Shared {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The tests take turns.
static TURN: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Bytes logged so far.
fn mark() -> usize {
    log().lock().unwrap().len()
}

/// What was logged since `mark`.
fn since(mark: usize) -> String {
    String::from_utf8_lossy(&log().lock().unwrap()[mark..]).into_owned()
}

/// A 1 MiB node id is refused, and the log gains at most one short line about it; the id
/// never appears whole (a 1 MiB id used to be repeated in every line about the node).
#[tokio::test]
async fn r_bad_3_a_1_mib_node_id_is_refused_with_one_short_log_line() {
    log();
    let _turn = TURN.lock().await;
    let h = Hostile::start(Settings::default(), ServerSettings::default()).await;
    let start = mark();
    let id = "Q".repeat(1 << 20);
    let (tx, mut rx) = open_stream(&h.url()).await.unwrap();
    tx.send(messages::sm_info(&id)).await.unwrap();
    let status = end_status(&mut rx).await;
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    drop(tx);
    h.healthy("after the 1 MiB node id").await;
    let written = since(start);
    let about: Vec<&str> = written
        .lines()
        .filter(|l| l.contains("QQQQQQQQQQQQQQQQ") || l.contains("1048576"))
        .collect();
    assert!(
        !written.contains(&"Q".repeat(65)),
        "more than 64 characters of the id reached the log"
    );
    assert!(
        about.len() <= 1,
        "{} lines about the id: {about:#?}",
        about.len()
    );
    for line in &about {
        assert!(line.len() < 1024, "a line of {} bytes", line.len());
    }
    assert!(
        written.len() < 16 * 1024,
        "the log grew by {} bytes around one refused id",
        written.len()
    );
    h.stop().await;
}

/// 2,000 rejected empty alerts from one SM write a handful of lines and a count of what was
/// suppressed, not 2,000 warnings (394 KB in the issue). The connection's budget of refused
/// messages (N-BAD-1, default 8) is off here: it would close the connection long before.
#[tokio::test]
async fn r_bad_3_two_thousand_rejected_alerts_write_a_handful_of_lines() {
    log();
    let _turn = TURN.lock().await;
    let server = ServerSettings {
        max_refused_messages: 0,
        ..ServerSettings::default()
    };
    let h = Hostile::start(Settings::default(), server).await;
    let id = "noisy";
    let (tx, _rx) = open_stream(&h.url()).await.unwrap();
    tx.send(messages::sm_info(id)).await.unwrap();
    let is_info = |e: &Event| matches!(e, Event::SmInfo(n, _) if n == id);
    within("noisy registered", h.log.wait_count(id, 1, is_info)).await;
    let start = mark();
    let empty_alert = pb::Alert {
        timestamp: None,
        alert_item: None,
    };
    for _ in 0..2_000 {
        tx.send(outgoing(SmOutgoingMessage::Alert(empty_alert.clone())))
            .await
            .unwrap();
    }
    // A valid message after them: once it is delivered, every alert before it was handled.
    tx.send(outgoing(SmOutgoingMessage::InstantMonitoring(
        pb::InstantMonitoring {
            node_monitoring: Some(messages::monitoring_data(1, messages::now())),
            instances_monitoring: vec![],
        },
    )))
    .await
    .unwrap();
    let is_monitoring = |e: &Event| matches!(e, Event::Monitoring(n, _) if n == id);
    within(
        "the message after the alerts delivered",
        h.log.wait_count(id, 1, is_monitoring),
    )
    .await;
    // The stream ends: the suppressed count is reported at the latest then.
    drop(tx);
    let is_gone = |e: &Event| matches!(e, Event::Disconnected(n, _) if n == id);
    within("noisy disconnected", h.log.wait_count(id, 1, is_gone)).await;
    tokio::time::timeout(DEADLINE, async {
        while !since(start).contains("suppressed") {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("no suppressed count was logged:\n{}", since(start)));
    let written = since(start);
    let lines: Vec<&str> = written.lines().filter(|l| l.contains(id)).collect();
    assert!(
        lines.len() <= 12,
        "{} lines about the noisy SM for 2,000 rejected alerts:\n{}",
        lines.len(),
        lines.join("\n")
    );
    assert!(
        written.len() < 8 * 1024,
        "the log grew by {} bytes for 2,000 rejected alerts",
        written.len()
    );
    assert_eq!(h.controller.node_count(), GOOD);
    h.healthy("after the noisy SM").await;
    h.stop().await;
}
