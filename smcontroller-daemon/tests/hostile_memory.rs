//! Memory under hostile peers (R-BAD-2, R-BAD-3, N-LEAK-1), in a test binary of its own so
//! that the resident memory it reads is not coloured by other tests; its tests take turns.
//!
//! - 10,000 distinct node ids come and go over real gRPC: the controller holds no slot for any
//!   of them afterwards, and resident memory is back within 64 MiB of its baseline (generous:
//!   the allocator keeps some of what it freed, and tonic's client side lives in this process
//!   too; a leak of even 1 KiB per id would be 10 MB, and the leak was per message).
//! - An SM that registers and then stops reading: its commands back up to the outbound budget,
//!   after which every call fails at once with `ResourceExhausted`, and memory stops growing.

mod hostile_support;
mod support;

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use bytes::Bytes;
use hostile_support::{
    GOOD, Hostile, REGISTER_SM, eventually, grpc_frame, grpc_request, h2_client, rss, within,
};
use prost::Message as _;
use smcontroller_api::{Error, NodeConfigHandler, NodeId, NodeNetwork, UpdateNetworkParameters};
use smcontroller_grpc::{
    proto::servicemanager::v5::sm_service_client::SmServiceClient,
    server::{self, ServerSettings},
};
use smcontroller_limits::Budget;
use smcontroller_routing::{Controller, Receivers, Settings};
use smcontroller_sim::messages;
use support::{Blobs, DEADLINE};
use tokio::sync::{Mutex, mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;

/// The tests of this binary take turns, so each reads its own memory figures.
static TURN: Mutex<()> = Mutex::const_new(());

const MIB: u64 = 1024 * 1024;

/// Receivers that keep nothing: the test's own memory must not grow with the ids.
#[derive(Default)]
struct Nothing;

#[async_trait::async_trait]
impl smcontroller_api::SmInfoReceiver for Nothing {
    async fn on_node_connected(&self, _: &NodeId) {}
    async fn on_node_disconnected(&self, _: &NodeId, _: &smcontroller_api::DisconnectReason) {}
    async fn on_sm_info_received(&self, _: &smcontroller_api::SmInfo) {}
}
#[async_trait::async_trait]
impl smcontroller_api::InstanceStatusReceiver for Nothing {
    async fn on_instance_status_received(&self, _: &NodeId, _: &smcontroller_api::InstanceStatus) {}
    async fn on_node_instances_statuses_received(
        &self,
        _: &NodeId,
        _: &[smcontroller_api::InstanceStatus],
    ) {
    }
}
#[async_trait::async_trait]
impl smcontroller_api::EnvVarsStatusSender for Nothing {
    async fn send_env_vars_statuses(
        &self,
        _: &NodeId,
        _: &[smcontroller_api::InstanceEnvVarsStatus],
    ) {
    }
}
#[async_trait::async_trait]
impl smcontroller_api::MonitoringReceiver for Nothing {
    async fn on_monitoring_received(&self, _: &NodeId, _: &smcontroller_api::NodeMonitoringData) {}
}
#[async_trait::async_trait]
impl smcontroller_api::AlertsReceiver for Nothing {
    async fn on_alert_received(&self, _: &NodeId, _: &smcontroller_api::Alert) {}
}
#[async_trait::async_trait]
impl smcontroller_api::LogSender for Nothing {
    async fn send_log(&self, _: &smcontroller_api::LogPart) {}
}

/// `count` node ids `{prefix}-{i}`, each registered on a stream of its own and gone again;
/// `workers` connections at once.
async fn churn(controller: &Controller, url: &str, prefix: &str, count: usize, workers: usize) {
    let started = Instant::now();
    let tasks: Vec<_> = (0..workers)
        .map(|w| {
            let controller = controller.clone();
            let url = url.to_owned();
            let prefix = prefix.to_owned();
            tokio::spawn(async move {
                let client = SmServiceClient::connect(url).await.unwrap();
                let mut i = w;
                while i < count {
                    assert!(
                        started.elapsed() < Duration::from_secs(120),
                        "the churn took over 120 s"
                    );
                    let id = format!("{prefix}-{i}");
                    let (tx, rx) = mpsc::channel(2);
                    tx.send(messages::sm_info(&id)).await.unwrap();
                    let response = client
                        .clone()
                        .register_sm(ReceiverStream::new(rx))
                        .await
                        .expect("RegisterSM accepted");
                    let node = NodeId::new(&id);
                    eventually(&format!("{id} registered"), DEADLINE, || {
                        controller.node_status(&node).is_some()
                    })
                    .await;
                    drop(tx);
                    drop(response);
                    i += workers;
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
}

/// Issue 9, item 1 (the controller's side): after 10,000 distinct node ids have come and gone
/// over real gRPC, the controller holds nothing for any of them and memory is back near its
/// baseline (R-BAD-3, N-LEAK-1).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn r_bad_3_ten_thousand_node_ids_come_and_go_and_leave_nothing() {
    let _turn = TURN.lock().await;
    let controller = Controller::new(Settings::default(), Receivers::all(Arc::new(Nothing)));
    let listener = server::bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let (stop, mut stopped) = watch::channel(false);
    let server = tokio::spawn({
        let controller = controller.clone();
        async move {
            server::serve_insecure(
                listener,
                controller,
                Arc::new(Blobs),
                ServerSettings::default(),
                async move {
                    let _ = stopped.wait_for(|s| *s).await;
                },
            )
            .await
            .unwrap();
        }
    });
    let settle = |what: &'static str| {
        let controller = controller.clone();
        async move {
            eventually(what, Duration::from_secs(30), || {
                controller.node_slots() == 0 && controller.node_count() == 0
            })
            .await;
        }
    };

    // Warm-up: the allocator's arenas, tonic's buffers, the runtime's tasks.
    churn(&controller, &url, "warm", 1_000, 8).await;
    settle("the warm-up ids released").await;
    let baseline = rss();

    churn(&controller, &url, "id", 10_000, 8).await;
    settle("every one of the 10,000 ids released").await;
    assert_eq!(controller.node_slots(), 0);
    assert_eq!(controller.node_count(), 0);
    let after = rss();
    println!(
        "RSS baseline {:.1} MiB, after 10,000 ids {:.1} MiB",
        baseline as f64 / MIB as f64,
        after as f64 / MIB as f64
    );
    assert!(
        after <= baseline + 64 * MIB,
        "resident memory grew from {baseline} to {after} bytes over 10,000 node ids"
    );

    let _ = stop.send(true);
    controller.shutdown().await;
    let _ = tokio::time::timeout(DEADLINE, server).await;
}

fn networks(bytes: usize) -> Vec<UpdateNetworkParameters> {
    (0..bytes / 100)
        .map(|i| UpdateNetworkParameters {
            network_id: format!("net-{i:0>60}"),
            subnet: "10.0.0.0/16".into(),
            ip: "10.0.0.1".into(),
            vlan_id: i as u64,
        })
        .collect()
}

/// Issue 9, item 5: an SM that keeps its connection but stops reading. Its commands back up to
/// the outbound budget; past it every call fails at once with `ResourceExhausted` (counter
/// OutboundBacklog), a sync call too, and memory stops growing; the other SMs and a newcomer
/// are not affected (R-BAD-2).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn r_bad_2_an_sm_that_stops_reading_gets_calls_refused_at_once() {
    let _turn = TURN.lock().await;
    let h = Hostile::start(
        Settings {
            outbound_backlog: 16,
            outbound_backlog_bytes: 2 * MIB as usize,
            ..Settings::default()
        },
        ServerSettings::default(),
    )
    .await;
    let before = h.controller.refusals().get(Budget::OutboundBacklog);
    let id = "deaf";
    // The deaf SM: a 64 KiB window and never a byte read or released.
    let (client, _written) = h2_client(h.addr, 65_535).await;
    let mut client = within("h2 ready", client.ready()).await.unwrap();
    let (response, mut register) = client
        .send_request(grpc_request(REGISTER_SM), false)
        .unwrap();
    register
        .send_data(
            Bytes::from(grpc_frame(&messages::sm_info(id).encode_to_vec())),
            false,
        )
        .unwrap();
    let _response = within("RegisterSM headers", response).await.unwrap();
    let node = NodeId::new(id);
    eventually("deaf registered", DEADLINE, || {
        h.controller.node_status(&node).is_some()
    })
    .await;

    // 60 KB commands until one is refused: bounded by 1,000 calls and 20 s.
    let payload = networks(60_000);
    let started = Instant::now();
    let mut sent = 0;
    let refusal = loop {
        assert!(
            sent < 1_000,
            "1,000 commands of 60 KB taken by a node that reads nothing"
        );
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "20 s of commands"
        );
        match h.controller.update_networks(&node, &payload).await {
            Ok(()) => sent += 1,
            Err(e) => break e,
        }
    };
    assert!(
        matches!(refusal, Error::ResourceExhausted(_)),
        "the first refusal: {refusal:?}"
    );
    println!("{sent} commands of 60 KB taken before the first refusal");
    assert!(h.controller.refusals().get(Budget::OutboundBacklog) > before);

    // From now on the calls fail at once, and memory stays where it is. On a loaded machine
    // the transport may not yet have taken what the SM's window admits when the first refusal
    // comes (65,535 bytes: the start of two 60 KB commands); a command it takes afterwards
    // frees a place, so at most two of these calls can still be queued.
    let rss_full = rss();
    let started = Instant::now();
    let mut late = 0;
    for _ in 0..1_000 {
        let result = h.controller.update_networks(&node, &payload).await;
        match result {
            Ok(()) => late += 1,
            Err(Error::ResourceExhausted(_)) => {}
            Err(other) => panic!("a call past the budget: {other:?}"),
        }
    }
    assert!(
        late <= 2,
        "{late} calls past the budget were queued for a node that reads nothing"
    );
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(5),
        "1,000 refusals took {took:?}"
    );
    let sync_started = Instant::now();
    let sync = h.controller.get_node_config_status(&node).await;
    assert!(
        matches!(sync, Err(Error::ResourceExhausted(_))),
        "a sync call to the deaf node: {sync:?}"
    );
    assert!(
        sync_started.elapsed() < Duration::from_secs(1),
        "the sync call waited {:?} instead of failing at once",
        sync_started.elapsed()
    );
    let rss_after = rss();
    assert!(
        rss_after <= rss_full + 24 * MIB,
        "memory grew from {rss_full} to {rss_after} bytes while every call was refused \
         (1,000 x 60 KB would be 60 MB)"
    );
    assert_eq!(h.controller.node_count(), GOOD + 1);
    h.healthy("with a deaf SM backed up").await;
    drop(register);
    drop(client);
    h.stop().await;
}
