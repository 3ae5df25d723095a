//! The real `smcontrollerd` binary as an operator runs it, with its admin socket and its
//! Prometheus endpoint from the config file (`adminSocket`, `metricsListen`): simulated SMs
//! register over mTLS, the admin API answers on the socket, and the metrics scraped over HTTP
//! move with the traffic (registrations, messages in and out by kind, sync round trips and
//! timeouts, disconnects by reason, TLS handshake failures, certificate expiry).

use std::{net::SocketAddr, time::Duration};

use smcontroller_admin::{
    client,
    proto::v1::{NodeRequest, admin_service_client::AdminServiceClient},
    server::AdminEndpoint,
};
use smcontroller_certs::test_util::TestPki;
use smcontroller_sim::{Behaviour, SimConfig, SimTls, Simulator};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

mod process;

use process::{DEADLINE, Daemon};

/// A free loopback port (bound and released; the daemon binds it right after).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `GET /metrics` over plain HTTP/1.1; the body.
async fn scrape(addr: SocketAddr) -> String {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut response = String::new();
    tokio::time::timeout(DEADLINE, stream.read_to_string(&mut response))
        .await
        .expect("the metrics endpoint answers")
        .unwrap();
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    response
}

/// The sum of the samples whose line starts with `prefix` (a name, with labels if given).
fn value(text: &str, prefix: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#') && l.starts_with(prefix))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Scrapes until `pred` holds of the text (with a deadline); the last text.
async fn scrape_until(addr: SocketAddr, what: &str, pred: impl Fn(&str) -> bool) -> String {
    let give_up = tokio::time::Instant::now() + DEADLINE;
    loop {
        let text = scrape(addr).await;
        if pred(&text) {
            return text;
        }
        assert!(
            tokio::time::Instant::now() < give_up,
            "metrics never showed {what}:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_move_with_traffic_and_the_admin_socket_answers() {
    let dir = tempfile::tempdir().unwrap();
    TestPki::new()
        .unwrap()
        .write_dev_pki(dir.path(), 2)
        .unwrap();
    let metrics: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let socket = dir.path().join("run").join("admin.sock");
    let config = dir.path().join("config.json");
    std::fs::write(
        &config,
        serde_json::json!({
            "cmServerUrl": "127.0.0.1:0",
            "responseTimeout": "1s",
            "adminSocket": socket,
            "metricsListen": metrics.to_string(),
        })
        .to_string(),
    )
    .unwrap();
    let daemon = Daemon::start(&[
        "--config",
        config.to_str().unwrap(),
        "--pki",
        dir.path().to_str().unwrap(),
    ]);
    // Ready: every listener is up, the admin socket among them.
    assert_eq!(
        daemon.ready.admin,
        [format!("unix:{}", socket.display())],
        "{:?}",
        daemon.ready
    );
    assert_eq!(daemon.ready.metrics, Some(metrics), "{:?}", daemon.ready);

    // Before any SM: the endpoint serves, and the server certificate's expiry is there.
    let text = scrape_until(metrics, "the certificate expiry", |t| {
        value(t, "smcontroller_cert_expiry_timestamp_seconds") > 1.0e9
    })
    .await;
    assert_eq!(
        value(&text, "smcontroller_registrations_total"),
        0.0,
        "{text}"
    );

    // node-2 never answers the sync requests.
    let sim = Simulator::start(
        SimConfig {
            tls: Some(SimTls::from_pki_dir(dir.path()).unwrap()),
            monitoring_rate: 50.0,
            ..SimConfig::new(format!("https://{}", daemon.addr), 2)
        }
        .with_node_behaviour(1, Behaviour::never_answer()),
    )
    .unwrap();
    assert!(sim.wait_connected(2, DEADLINE).await, "{}", sim.stats());

    // The admin socket answers: a sync call that the node answers, one that times out.
    let mut admin: AdminServiceClient<_> = client::connect(&AdminEndpoint::Unix(socket.clone()))
        .await
        .expect("the admin socket");
    let status = admin
        .get_node_config_status(NodeRequest {
            node_id: "node-1".into(),
        })
        .await
        .expect("node-1 answers")
        .into_inner();
    assert_eq!(status.state, "absent");
    let timeout = admin
        .get_node_config_status(NodeRequest {
            node_id: "node-2".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(timeout.code(), tonic::Code::DeadlineExceeded);
    let nodes = admin
        .list_nodes(smcontroller_admin::proto::v1::ListNodesRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(nodes.nodes.len(), 2);
    // The gauges of the router's state, refreshed every second.
    scrape_until(metrics, "the node gauges", |t| {
        value(t, "smcontroller_nodes_connected") == 2.0
            && t.contains("smcontroller_inbound_queue_bytes{node=\"node-1\"}")
            && t.contains("smcontroller_inbound_queue_bytes{node=\"node-2\"}")
            && t.contains("smcontroller_messages_in_total{kind=\"sm_info\"}")
    })
    .await;

    // A client that is not TLS at all fails its handshake.
    let mut junk = tokio::net::TcpStream::connect(daemon.addr).await.unwrap();
    junk.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
    let mut sink = Vec::new();
    let _ = tokio::time::timeout(DEADLINE, junk.read_to_end(&mut sink)).await;

    // One node goes away (it reconnects).
    assert!(sim.node("node-1").unwrap().drop_stream());

    let text = scrape_until(metrics, "the traffic", |t| {
        value(t, "smcontroller_registrations_total") >= 3.0
            && value(
                t,
                "smcontroller_messages_in_total{kind=\"instant_monitoring\"}",
            ) >= 10.0
            && value(t, "smcontroller_disconnects_total") >= 1.0
            && value(t, "smcontroller_tls_handshake_failures_total") >= 1.0
    })
    .await;
    assert!(
        value(
            &text,
            "smcontroller_messages_in_total{kind=\"node_instances_status\"}"
        ) >= 2.0,
        "{text}"
    );
    assert!(
        value(
            &text,
            "smcontroller_messages_out_total{kind=\"get_node_config_status\"}"
        ) >= 2.0,
        "{text}"
    );
    assert!(
        value(
            &text,
            "smcontroller_sync_round_trip_seconds_count{command=\"get_node_config_status\"}"
        ) >= 1.0,
        "{text}"
    );
    assert!(
        value(&text, "smcontroller_sync_round_trip_seconds_bucket") > 0.0,
        "the round trip is a histogram: {text}"
    );
    assert_eq!(
        value(
            &text,
            "smcontroller_sync_timeouts_total{command=\"get_node_config_status\"}"
        ),
        1.0,
        "{text}"
    );

    // The counters keep moving while traffic flows.
    let before = value(
        &text,
        "smcontroller_messages_in_total{kind=\"instant_monitoring\"}",
    );
    scrape_until(metrics, "more monitoring", |t| {
        value(
            t,
            "smcontroller_messages_in_total{kind=\"instant_monitoring\"}",
        ) > before
    })
    .await;

    sim.stop().await;
    drop(daemon);
}

/// N-LEAK-2: once nodes have left and nothing has connected or left for `memoryReturnDelay`,
/// the daemon gives the memory they freed back to the OS, counted in
/// `smcontroller_memory_returns_total`; not while the nodes are connected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn n_leak_2_memory_is_returned_once_after_nodes_leave() {
    let dir = tempfile::tempdir().unwrap();
    let metrics: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let config = dir.path().join("config.json");
    std::fs::write(
        &config,
        serde_json::json!({
            "cmServerUrl": "127.0.0.1:0",
            "adminSocket": "off",
            "metricsListen": metrics.to_string(),
            "memoryReturnDelay": "300ms",
        })
        .to_string(),
    )
    .unwrap();
    let daemon = Daemon::start(&["--config", config.to_str().unwrap(), "--insecure"]);
    let sim = Simulator::start(SimConfig::new(format!("http://{}", daemon.addr), 8)).unwrap();
    assert!(sim.wait_connected(8, DEADLINE).await, "{}", sim.stats());
    // No node has left: nothing to return.
    let text = scrape_until(metrics, "the connected nodes", |t| {
        value(t, "smcontroller_nodes_connected") == 8.0
    })
    .await;
    assert_eq!(
        value(&text, "smcontroller_memory_returns_total"),
        0.0,
        "{text}"
    );

    sim.stop().await;
    // (One return per burst is proven under the paused clock, in `memory.rs`: here the nodes'
    // ends may straddle the delay on a busy machine.)
    scrape_until(metrics, "a memory return after the nodes left", |t| {
        value(t, "smcontroller_nodes_connected") == 0.0
            && value(t, "smcontroller_memory_returns_total") >= 1.0
    })
    .await;
    drop(daemon);
}
