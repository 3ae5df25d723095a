//! Tests of the simulator against a tiny in-process `SMService` on 127.0.0.1.

use std::net::SocketAddr;
use std::time::Duration;

use smcontroller_grpc::proto::common::v2::{InstanceFilter, InstanceIdent};
use smcontroller_grpc::proto::servicemanager::v5::{
    BlobsInfos, BlobsInfosRequest, CheckNodeConfig, ConnectionEnum, ConnectionStatus, EnvVarInfo,
    GetAverageMonitoring, GetNodeConfigStatus, InstanceCrashLogRequest, InstanceInfo,
    NodeConfigStatus, SetNodeConfig, SmIncomingMessages, SmOutgoingMessages, SystemLogRequest,
    UpdateInstances, UpdateNetworkParameters, UpdateNetworks,
    alert::AlertItem,
    sm_incoming_messages::SmIncomingMessage,
    sm_outgoing_messages::SmOutgoingMessage,
    sm_service_server::{SmService, SmServiceServer},
};
use tokio::net::TcpListener;
use tokio::sync::{broadcast, mpsc};
use tokio::task::JoinHandle;
use tokio::time::{Instant, timeout};
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::{Request, Response, Status, Streaming};

use super::messages::{BOGUS, CORE_COMPONENTS, QUOTA_STATUSES};
use super::node::Pacer;
use super::{
    Answers, Behaviour, Garbage, Registration, SimConfig, SimEvent, SimEventKind, SimEvents,
    Simulator,
};

const WAIT: Duration = Duration::from_secs(10);

/// One `RegisterSM` stream as the test server sees it.
struct ServerStream {
    remote: Option<SocketAddr>,
    /// Dropping it ends the stream from the server side.
    to_sm: mpsc::Sender<Result<SmIncomingMessages, Status>>,
    from_sm: mpsc::UnboundedReceiver<SmOutgoingMessages>,
}

impl ServerStream {
    async fn send(&self, msg: SmIncomingMessage) {
        self.to_sm
            .send(Ok(SmIncomingMessages {
                sm_incoming_message: Some(msg),
            }))
            .await
            .expect("stream open");
    }

    async fn recv(&mut self) -> SmOutgoingMessages {
        timeout(WAIT, self.from_sm.recv())
            .await
            .expect("a message from the SM in time")
            .expect("the SM stream is open")
    }

    async fn recv_some(&mut self) -> SmOutgoingMessage {
        self.recv()
            .await
            .sm_outgoing_message
            .expect("a message with its oneof set")
    }

    async fn recv_config_status(&mut self) -> NodeConfigStatus {
        match self.recv_some().await {
            SmOutgoingMessage::NodeConfigStatus(s) => s,
            other => panic!("expected node_config_status, got {other:?}"),
        }
    }
}

/// A minimal controller: sends `connection_status` first, hands each stream to the test.
struct TestService {
    streams: mpsc::UnboundedSender<ServerStream>,
}

#[tonic::async_trait]
impl SmService for TestService {
    type RegisterSMStream = ReceiverStream<Result<SmIncomingMessages, Status>>;

    async fn register_sm(
        &self,
        request: Request<Streaming<SmOutgoingMessages>>,
    ) -> Result<Response<Self::RegisterSMStream>, Status> {
        let remote = request.remote_addr();
        let mut inbound = request.into_inner();
        let (to_sm, rx) = mpsc::channel(64);
        to_sm
            .send(Ok(SmIncomingMessages {
                sm_incoming_message: Some(SmIncomingMessage::ConnectionStatus(ConnectionStatus {
                    cloud_status: ConnectionEnum::Connected as i32,
                })),
            }))
            .await
            .map_err(|_| Status::internal("closed"))?;
        let (from_tx, from_sm) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Ok(Some(msg)) = inbound.message().await {
                if from_tx.send(msg).is_err() {
                    break;
                }
            }
        });
        let _ = self.streams.send(ServerStream {
            remote,
            to_sm,
            from_sm,
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn get_blobs_infos(
        &self,
        request: Request<BlobsInfosRequest>,
    ) -> Result<Response<BlobsInfos>, Status> {
        let urls = request
            .into_inner()
            .digests
            .iter()
            .map(|d| format!("http://blobs/{d}"))
            .collect();
        Ok(Response::new(BlobsInfos { urls }))
    }
}

struct TestServer {
    url: String,
    streams: mpsc::UnboundedReceiver<ServerStream>,
    task: JoinHandle<()>,
}

impl TestServer {
    async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("local addr");
        let (tx, streams) = mpsc::unbounded_channel();
        let service = SmServiceServer::new(TestService { streams: tx });
        let task = tokio::spawn(async move {
            let _ = tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(TcpListenerStream::new(listener))
                .await;
        });
        Self {
            url: format!("http://{addr}"),
            streams,
            task,
        }
    }

    async fn next_stream(&mut self) -> ServerStream {
        timeout(WAIT, self.streams.recv())
            .await
            .expect("a RegisterSM stream in time")
            .expect("server running")
    }

    fn config(&self, nodes: usize) -> SimConfig {
        SimConfig {
            reconnect_delay: Duration::from_millis(50),
            instances: 2,
            ..SimConfig::new(self.url.clone(), nodes)
        }
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Registration of a well-behaved node: `sm_info` then `node_instances_status`.
async fn expect_registration(stream: &mut ServerStream, node_id: &str) {
    match stream.recv_some().await {
        SmOutgoingMessage::SmInfo(info) => {
            assert_eq!(info.node_id, node_id);
            assert_eq!(info.runtimes.len(), 2);
            assert!(
                info.runtimes
                    .iter()
                    .all(|r| r.max_dmips > 0 && r.total_ram > 0)
            );
            assert!(!info.resources.is_empty());
        }
        other => panic!("expected sm_info first, got {other:?}"),
    }
    match stream.recv_some().await {
        SmOutgoingMessage::NodeInstancesStatus(s) => {
            assert!(!s.instances.is_empty());
            assert!(s.instances.iter().all(|i| i.state == "active"));
        }
        other => panic!("expected node_instances_status second, got {other:?}"),
    }
}

async fn wait_event(events: &mut SimEvents, mut pred: impl FnMut(&SimEvent) -> bool) -> SimEvent {
    let deadline = Instant::now() + WAIT;
    loop {
        match tokio::time::timeout_at(deadline, events.recv()).await {
            Ok(Ok(ev)) if pred(&ev) => return ev,
            Ok(Ok(_) | Err(broadcast::error::RecvError::Lagged(_))) => {}
            Ok(Err(broadcast::error::RecvError::Closed)) => panic!("events closed"),
            Err(_) => panic!("event not seen in time"),
        }
    }
}

fn get_status() -> SmIncomingMessage {
    SmIncomingMessage::GetNodeConfigStatus(GetNodeConfigStatus {})
}

#[tokio::test]
async fn registers_answers_config_requests_and_reconnects() {
    let mut server = TestServer::start().await;
    let (sim, mut events) = Simulator::start_with_events(server.config(1)).expect("start");
    assert_eq!(sim.node_ids(), vec!["node-0".to_owned()]);

    let mut stream = server.next_stream().await;
    assert!(stream.remote.expect("remote addr").ip().is_loopback());
    expect_registration(&mut stream, "node-0").await;
    assert!(sim.wait_connected(1, WAIT).await);

    stream.send(get_status()).await;
    let status = stream.recv_config_status().await;
    assert_eq!(
        (status.state.as_str(), status.version.as_str()),
        ("absent", "")
    );
    assert!(status.error.is_none());

    // Unparseable config: no answer at all; the next message answers the next request.
    stream
        .send(SmIncomingMessage::CheckNodeConfig(CheckNodeConfig {
            node_config: "{not json".to_owned(),
            version: "9.9.9".to_owned(),
        }))
        .await;
    stream.send(get_status()).await;
    let status = stream.recv_config_status().await;
    assert_eq!(
        status.version, "",
        "an unparseable check must get no answer"
    );

    let config = r#"{"version":"2.0.0","node":{"codename":"node-0"},"priority":1}"#;
    stream
        .send(SmIncomingMessage::CheckNodeConfig(CheckNodeConfig {
            node_config: config.to_owned(),
            version: "2.0.0".to_owned(),
        }))
        .await;
    let status = stream.recv_config_status().await;
    assert_eq!(
        (status.state.as_str(), status.version.as_str()),
        ("absent", "2.0.0")
    );

    stream
        .send(SmIncomingMessage::SetNodeConfig(SetNodeConfig {
            node_config: config.to_owned(),
            version: "2.0.0".to_owned(),
        }))
        .await;
    let status = stream.recv_config_status().await;
    assert_eq!(
        (status.state.as_str(), status.version.as_str()),
        ("installed", "2.0.0")
    );

    let node = sim.stats().nodes[0].clone();
    assert_eq!(node.cloud_status(), Some(ConnectionEnum::Connected));
    assert_eq!(node.counters.commands.get_node_config_status, 2);
    assert_eq!(node.counters.commands.check_node_config, 2);
    assert_eq!(node.counters.commands.set_node_config, 1);
    assert_eq!(node.counters.commands.connection_status, 1);
    assert_eq!(node.counters.sent.sm_info, 1);
    assert_eq!(
        (node.config_state.as_str(), node.config_version.as_str()),
        ("installed", "2.0.0")
    );

    // The server drops the stream: the node reconnects with the same id and its state.
    drop(stream);
    wait_event(&mut events, |e| {
        matches!(e.kind, SimEventKind::Disconnected { .. })
    })
    .await;
    let mut stream = server.next_stream().await;
    expect_registration(&mut stream, "node-0").await;
    wait_event(&mut events, |e| {
        matches!(e.kind, SimEventKind::Connected { connects: 2 })
    })
    .await;
    stream.send(get_status()).await;
    let status = stream.recv_config_status().await;
    assert_eq!(
        (status.state.as_str(), status.version.as_str()),
        ("installed", "2.0.0")
    );
    let stats = sim.stats();
    assert_eq!(stats.total.connects, 2);
    assert_eq!(stats.total.disconnects, 1);

    // Stopping ends the stream: the server sees the SM's side close.
    timeout(WAIT, sim.stop()).await.expect("stop in time");
    let end = timeout(WAIT, stream.from_sm.recv())
        .await
        .expect("stream end in time");
    assert!(end.is_none());
}

#[tokio::test]
async fn answers_instances_logs_monitoring_and_records_networks() {
    let mut server = TestServer::start().await;
    let (sim, mut events) = Simulator::start_with_events(server.config(1)).expect("start");
    let mut stream = server.next_stream().await;
    expect_registration(&mut stream, "node-0").await;

    let started = InstanceIdent {
        item_id: "new-service".to_owned(),
        subject_id: "subject-2".to_owned(),
        instance: 7,
        ..InstanceIdent::default()
    };
    let stopped = super::messages::instance_ident(0);
    stream
        .send(SmIncomingMessage::UpdateInstances(UpdateInstances {
            start_instances: vec![InstanceInfo {
                instance: Some(started.clone()),
                version: "2.0.0".to_owned(),
                runtime_id: "runc".to_owned(),
                env_vars: vec![EnvVarInfo {
                    name: "A".to_owned(),
                    value: "1".to_owned(),
                }],
                ..InstanceInfo::default()
            }],
            stop_instances: vec![stopped.clone()],
        }))
        .await;
    match stream.recv_some().await {
        SmOutgoingMessage::UpdateInstancesStatus(s) => {
            assert_eq!(s.instances.len(), 2);
            let stop = &s.instances[0];
            assert_eq!(stop.instance.as_ref(), Some(&stopped));
            assert_eq!(stop.state, "inactive");
            let start = &s.instances[1];
            assert_eq!(start.instance.as_ref(), Some(&started));
            assert_eq!(start.state, "active");
            assert_eq!(start.version, "2.0.0");
            assert_eq!(start.env_vars.len(), 1);
            assert_eq!(start.env_vars[0].name, "A");
            assert!(start.env_vars[0].error.is_none());
        }
        other => panic!("expected update_instances_status, got {other:?}"),
    }

    stream
        .send(SmIncomingMessage::SystemLogRequest(SystemLogRequest {
            correlation_id: "log-1".to_owned(),
            ..SystemLogRequest::default()
        }))
        .await;
    stream
        .send(SmIncomingMessage::InstanceCrashLogRequest(
            InstanceCrashLogRequest {
                correlation_id: "crash-1".to_owned(),
                filter: Some(InstanceFilter {
                    instance: -1,
                    ..InstanceFilter::default()
                }),
                ..InstanceCrashLogRequest::default()
            },
        ))
        .await;
    for id in ["log-1", "crash-1"] {
        for part in 1..=2 {
            match stream.recv_some().await {
                SmOutgoingMessage::Log(log) => {
                    assert_eq!(log.correlation_id, id);
                    assert_eq!((log.part, log.part_count), (part, 2));
                    assert_eq!(log.status, "ok");
                    assert!(!log.data.is_empty());
                }
                other => panic!("expected log, got {other:?}"),
            }
        }
    }

    // update_networks gets no answer: the next message answers the next request.
    stream
        .send(SmIncomingMessage::UpdateNetworks(UpdateNetworks {
            networks: vec![
                UpdateNetworkParameters {
                    network_id: "net-1".to_owned(),
                    subnet: "172.17.0.0/16".to_owned(),
                    ip: "172.17.0.2".to_owned(),
                    vlan_id: 1,
                },
                UpdateNetworkParameters::default(),
            ],
        }))
        .await;
    stream
        .send(SmIncomingMessage::GetAverageMonitoring(
            GetAverageMonitoring {},
        ))
        .await;
    match stream.recv_some().await {
        SmOutgoingMessage::AverageMonitoring(m) => {
            let node = m.node_monitoring.expect("node monitoring");
            assert!(node.timestamp.is_some());
            // Instance 0 stopped, "new-service" started: still two instances.
            assert_eq!(m.instances_monitoring.len(), 2);
            assert!(
                m.instances_monitoring
                    .iter()
                    .any(|i| i.instance.as_ref() == Some(&started))
            );
        }
        other => panic!("expected average_monitoring, got {other:?}"),
    }
    let ev = wait_event(&mut events, |e| {
        matches!(&e.kind, SimEventKind::Received(m)
            if matches!(m.sm_incoming_message, Some(SmIncomingMessage::UpdateNetworks(_))))
    })
    .await;
    assert_eq!(&*ev.node_id, "node-0");
    let stats = sim.stats();
    assert_eq!(stats.total.networks_received, 2);
    assert_eq!(stats.total.commands.update_networks, 1);
    assert_eq!(stats.total.sent.log, 4);

    // On-demand sends (garbage included) and GetBlobsInfos on the node's connection.
    let node = sim.node("node-0").expect("node");
    node.send(super::messages::empty()).await.expect("send");
    assert!(stream.recv().await.sm_outgoing_message.is_none());
    let urls = node
        .get_blobs_infos(vec!["sha256:a".to_owned(), "sha256:b".to_owned()])
        .await
        .expect("blobs");
    assert_eq!(urls, vec!["http://blobs/sha256:a", "http://blobs/sha256:b"]);

    sim.stop().await;
}

#[tokio::test]
async fn misbehaving_nodes() {
    let mut server = TestServer::start().await;
    let config = SimConfig {
        behaviour: Behaviour::never_answer(),
        ..server.config(1)
    };
    let sim = Simulator::start(config).expect("start");
    let mut stream = server.next_stream().await;
    expect_registration(&mut stream, "node-0").await;
    stream.send(get_status()).await;
    stream
        .send(SmIncomingMessage::SystemLogRequest(SystemLogRequest {
            correlation_id: "after".to_owned(),
            ..SystemLogRequest::default()
        }))
        .await;
    assert!(
        matches!(stream.recv_some().await, SmOutgoingMessage::Log(l) if l.correlation_id == "after"),
        "a never-answering node must not answer get_node_config_status"
    );
    sim.stop().await;

    let delay = Duration::from_millis(200);
    let sim = Simulator::start(SimConfig {
        behaviour: Behaviour::answer_delay(delay),
        ..server.config(1)
    })
    .expect("start");
    let mut stream = server.next_stream().await;
    expect_registration(&mut stream, "node-0").await;
    let asked = Instant::now();
    stream.send(get_status()).await;
    let status = stream.recv_config_status().await;
    assert_eq!(status.state, "absent");
    assert!(asked.elapsed() >= delay);
    sim.stop().await;

    let sim = Simulator::start(
        SimConfig {
            alert_rate: 200.0,
            ..server.config(3)
        }
        .with_node_behaviour(0, Behaviour::garbage())
        .with_node_behaviour(1, Behaviour::registration(Registration::SkipSmInfo))
        .with_node_behaviour(2, Behaviour::registration(Registration::EmptyNodeId)),
    )
    .expect("start");
    let mut seen = 0;
    while seen < 3 {
        let mut stream = server.next_stream().await;
        match stream.recv_some().await {
            SmOutgoingMessage::SmInfo(info) if info.node_id == "node-0" => {
                assert!(matches!(
                    stream.recv_some().await,
                    SmOutgoingMessage::NodeInstancesStatus(_)
                ));
                assert!(
                    stream.recv().await.sm_outgoing_message.is_none(),
                    "empty oneof"
                );
                stream.send(get_status()).await;
                // Alerts flow too: skip them until the reply, check them on the way.
                loop {
                    match stream.recv().await.sm_outgoing_message {
                        Some(SmOutgoingMessage::NodeConfigStatus(s)) => {
                            assert_eq!(s.state, BOGUS);
                            break;
                        }
                        Some(SmOutgoingMessage::Alert(a)) => assert!(a.timestamp.is_none()),
                        None => {}
                        Some(other) => panic!("unexpected {other:?}"),
                    }
                }
            }
            SmOutgoingMessage::SmInfo(info) => assert_eq!(info.node_id, "", "empty node id"),
            SmOutgoingMessage::NodeInstancesStatus(_) => {}
            other => panic!("unexpected first message {other:?}"),
        }
        seen += 1;
    }
    // Only the well-registering node counts (none here is well-behaved except garbage node-0).
    assert!(sim.wait_connected(1, WAIT).await);
    assert!(!sim.wait_connected(2, Duration::from_millis(1)).await);
    sim.stop().await;
    assert_eq!(Behaviour::never_answer().answers, Answers::Never);
    assert_eq!(Behaviour::garbage().garbage, Garbage::all());
}

#[tokio::test]
async fn unsolicited_monitoring_alerts_and_burst() {
    let mut server = TestServer::start().await;
    let sim = Simulator::start(SimConfig {
        monitoring_rate: 200.0,
        alert_rate: 200.0,
        ..server.config(1)
    })
    .expect("start");
    let mut stream = server.next_stream().await;
    expect_registration(&mut stream, "node-0").await;
    let (mut alerts, mut monitoring) = (Vec::new(), 0);
    while alerts.len() < 12 || monitoring < 3 {
        match stream.recv_some().await {
            SmOutgoingMessage::Alert(a) => alerts.push(a),
            SmOutgoingMessage::InstantMonitoring(m) => {
                monitoring += 1;
                let node = m.node_monitoring.expect("node monitoring");
                assert!(node.timestamp.is_some());
                assert_eq!(m.instances_monitoring.len(), 2);
                assert!(m.instances_monitoring.iter().all(|i| {
                    i.monitoring_data
                        .as_ref()
                        .is_some_and(|d| d.timestamp.is_some())
                }));
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    for (n, alert) in alerts.iter().enumerate() {
        assert!(alert.timestamp.is_some());
        let kind = match alert.alert_item.as_ref().expect("alert item") {
            AlertItem::SystemQuotaAlert(a) => {
                assert!(QUOTA_STATUSES.contains(&a.status.as_str()));
                0
            }
            AlertItem::InstanceQuotaAlert(a) => {
                assert!(QUOTA_STATUSES.contains(&a.status.as_str()));
                1
            }
            AlertItem::ResourceAllocateAlert(_) => 2,
            AlertItem::SystemAlert(_) => 3,
            AlertItem::CoreAlert(a) => {
                assert!(CORE_COMPONENTS.contains(&a.core_component.as_str()));
                4
            }
            AlertItem::InstanceAlert(_) => 5,
        };
        assert_eq!(kind, n % 6, "alert kinds rotate");
    }
    sim.stop().await;

    let sim = Simulator::start(server.config(1)).expect("start");
    let mut stream = server.next_stream().await;
    expect_registration(&mut stream, "node-0").await;
    assert!(sim.wait_connected(1, WAIT).await);
    assert_eq!(sim.burst(1000).await, 1000);
    for _ in 0..1000 {
        assert!(matches!(
            stream.recv_some().await,
            SmOutgoingMessage::InstantMonitoring(_)
        ));
    }
    assert_eq!(sim.stats().total.sent.instant_monitoring, 1000);
    sim.stop().await;
}

#[tokio::test]
async fn nodes_use_separate_connections() {
    let mut server = TestServer::start().await;
    let sim = Simulator::start(SimConfig {
        node_prefix: "sim".to_owned(),
        ..server.config(3)
    })
    .expect("start");
    let mut ids = Vec::new();
    let mut remotes = Vec::new();
    for _ in 0..3 {
        let mut stream = server.next_stream().await;
        remotes.push(stream.remote.expect("remote addr"));
        match stream.recv_some().await {
            SmOutgoingMessage::SmInfo(info) => ids.push(info.node_id),
            other => panic!("expected sm_info, got {other:?}"),
        }
    }
    ids.sort();
    assert_eq!(ids, vec!["sim-0", "sim-1", "sim-2"]);
    remotes.sort();
    remotes.dedup();
    assert_eq!(remotes.len(), 3, "one TCP connection per node");
    assert!(sim.wait_connected(3, WAIT).await);
    let stats = sim.finish().await;
    assert_eq!(stats.registered(), 3);
    assert_eq!(stats.connected(), 0);
    assert_eq!(stats.total.connects, 3);
}

#[tokio::test]
async fn bad_configuration_is_refused() {
    let bad_url = SimConfig::new("not a url", 1);
    assert!(Simulator::start(bad_url).is_err());
    let bad_rate = SimConfig {
        monitoring_rate: f64::NAN,
        ..SimConfig::default()
    };
    assert!(Simulator::start(bad_rate).is_err());
}

#[test]
fn pacer_sends_whole_messages_at_the_rate() {
    let start = Instant::now();
    let mut pacer = Pacer::new(10.0, start);
    assert_eq!(pacer.period(), Some(Duration::from_millis(100)));
    assert_eq!(pacer.due(start + Duration::from_millis(50)), 0);
    assert_eq!(pacer.due(start + Duration::from_millis(100)), 1);
    assert_eq!(pacer.due(start + Duration::from_millis(1_000)), 9);
    assert_eq!(pacer.due(start + Duration::from_millis(1_050)), 0);
    assert_eq!(Pacer::new(0.0, start).period(), None);
    assert_eq!(
        Pacer::new(0.0, start).due(start + Duration::from_secs(5)),
        0
    );
}
