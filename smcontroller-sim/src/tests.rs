//! Tests of the simulator against a tiny in-process `SMService` on 127.0.0.1.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use smcontroller_grpc::proto::common::v2::{ErrorInfo, InstanceFilter, InstanceIdent};
use smcontroller_grpc::proto::servicemanager::v5::{
    BlobsInfos, BlobsInfosRequest, CheckNodeConfig, ConnectionEnum, ConnectionStatus, EnvVarInfo,
    GetAverageMonitoring, GetNodeConfigStatus, InstanceCrashLogRequest, InstanceInfo,
    InstanceStatus, LogData, NodeConfigStatus, SetNodeConfig, SmIncomingMessages,
    SmOutgoingMessages, SystemLogRequest, UpdateInstances, UpdateInstancesStatus,
    UpdateNetworkParameters, UpdateNetworks,
    alert::AlertItem,
    sm_incoming_messages::SmIncomingMessage,
    sm_outgoing_messages::SmOutgoingMessage,
    sm_service_server::{SmService, SmServiceServer},
};
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, broadcast, mpsc};
use tokio::task::JoinHandle;
use tokio::time::{Instant, timeout};
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::transport::Endpoint;
use tonic::{Request, Response, Status, Streaming};

use smcontroller_certs::test_util::TestPki;

use super::messages::{BOGUS, CORE_COMPONENTS, QUOTA_STATUSES};
use super::node::Pacer;
use super::{
    Answers, Behaviour, EndpointHook, Garbage, Registration, SimConfig, SimEvent, SimEventKind,
    SimEvents, SimTls, Simulator,
};

const WAIT: Duration = Duration::from_secs(10);

/// Digests the test server cannot resolve: `GetBlobsInfos` fails with NOT_FOUND.
const MISSING: &str = "sha256:missing";
/// Digests whose `GetBlobsInfos` answer waits for a permit of [`TestServer::hold`].
const HOLD: &str = "sha256:hold";

/// The `error` a real SM sets when nothing failed: present and empty.
fn assert_no_error(error: Option<&ErrorInfo>, what: &str) {
    assert_eq!(
        error,
        Some(&ErrorInfo::default()),
        "{what}: a real SM sets an empty error when nothing failed"
    );
}

fn assert_instance_ok(status: &InstanceStatus) {
    assert_no_error(status.error.as_ref(), "InstanceStatus");
    for env in &status.env_vars {
        assert_no_error(env.error.as_ref(), "EnvVarStatus");
    }
}

fn assert_log_ok(log: &LogData) {
    assert_no_error(log.error.as_ref(), "LogData");
}

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

    /// The next message, a `node_config_status` reporting no failure (an empty error).
    async fn recv_config_status(&mut self) -> NodeConfigStatus {
        match self.recv_some().await {
            SmOutgoingMessage::NodeConfigStatus(s) => {
                assert_no_error(s.error.as_ref(), "node_config_status");
                s
            }
            other => panic!("expected node_config_status, got {other:?}"),
        }
    }

    async fn recv_instances_status(&mut self) -> UpdateInstancesStatus {
        match self.recv_some().await {
            SmOutgoingMessage::UpdateInstancesStatus(s) => s,
            other => panic!("expected update_instances_status, got {other:?}"),
        }
    }

    /// No message from the SM has arrived yet.
    fn nothing_yet(&mut self) -> bool {
        self.from_sm.try_recv().is_err()
    }
}

/// One `GetBlobsInfos` call as the test server saw it.
#[derive(Debug)]
struct BlobsCall {
    remote: Option<SocketAddr>,
    digests: Vec<String>,
}

/// A minimal controller: sends `connection_status` first, hands each stream to the test,
/// records each `GetBlobsInfos` call and answers it (see [`MISSING`], [`HOLD`]).
struct TestService {
    streams: mpsc::UnboundedSender<ServerStream>,
    blobs: mpsc::UnboundedSender<BlobsCall>,
    hold: Arc<Semaphore>,
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
        let remote = request.remote_addr();
        let digests = request.into_inner().digests;
        // Recorded before the answer: whoever got the answer finds the call recorded.
        let _ = self.blobs.send(BlobsCall {
            remote,
            digests: digests.clone(),
        });
        if digests.iter().any(|d| d.starts_with(HOLD)) {
            self.hold
                .acquire()
                .await
                .map_err(|_| Status::internal("closed"))?
                .forget();
        }
        if let Some(missing) = digests.iter().find(|d| d.starts_with(MISSING)) {
            return Err(Status::not_found(format!("no blob {missing}")));
        }
        let urls = digests
            .iter()
            .map(|d| format!("http://blobs/{d}"))
            .collect();
        Ok(Response::new(BlobsInfos { urls }))
    }
}

struct TestServer {
    url: String,
    streams: mpsc::UnboundedReceiver<ServerStream>,
    blobs: mpsc::UnboundedReceiver<BlobsCall>,
    /// Permits to answer `GetBlobsInfos` calls for [`HOLD`] digests.
    hold: Arc<Semaphore>,
    task: JoinHandle<()>,
}

impl TestServer {
    async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("local addr");
        let (tx, streams) = mpsc::unbounded_channel();
        let (blobs_tx, blobs) = mpsc::unbounded_channel();
        let hold = Arc::new(Semaphore::new(0));
        let service = SmServiceServer::new(TestService {
            streams: tx,
            blobs: blobs_tx,
            hold: hold.clone(),
        });
        let task = tokio::spawn(async move {
            let _ = tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(TcpListenerStream::new(listener))
                .await;
        });
        Self {
            url: format!("http://{addr}"),
            streams,
            blobs,
            hold,
            task,
        }
    }

    async fn next_blobs_call(&mut self) -> BlobsCall {
        timeout(WAIT, self.blobs.recv())
            .await
            .expect("a GetBlobsInfos call in time")
            .expect("server running")
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
            s.instances.iter().for_each(assert_instance_ok);
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

fn check(version: &str, node_config: &str) -> SmIncomingMessage {
    SmIncomingMessage::CheckNodeConfig(CheckNodeConfig {
        node_config: node_config.to_owned(),
        version: version.to_owned(),
    })
}

fn set(version: &str, node_config: &str) -> SmIncomingMessage {
    SmIncomingMessage::SetNodeConfig(SetNodeConfig {
        node_config: node_config.to_owned(),
        version: version.to_owned(),
    })
}

fn cloud(status: ConnectionEnum) -> SmIncomingMessage {
    SmIncomingMessage::ConnectionStatus(ConnectionStatus {
        cloud_status: status as i32,
    })
}

/// An instance to start, with one env var and manifest digest `digest`.
fn instance_info(item_id: &str, digest: &str) -> InstanceInfo {
    InstanceInfo {
        instance: Some(InstanceIdent {
            item_id: item_id.to_owned(),
            subject_id: "subject-2".to_owned(),
            instance: 7,
            ..InstanceIdent::default()
        }),
        version: "2.0.0".to_owned(),
        manifest_digest: digest.to_owned(),
        runtime_id: "runc".to_owned(),
        env_vars: vec![EnvVarInfo {
            name: "A".to_owned(),
            value: "1".to_owned(),
        }],
        ..InstanceInfo::default()
    }
}

fn update_instances(start: Vec<InstanceInfo>, stop: Vec<InstanceIdent>) -> SmIncomingMessage {
    SmIncomingMessage::UpdateInstances(UpdateInstances {
        start_instances: start,
        stop_instances: stop,
    })
}

#[tokio::test]
async fn registers_answers_config_requests_and_reconnects() {
    let mut server = TestServer::start().await;
    let config = server.config(1);
    let reconnect_delay = config.reconnect_delay;
    let (sim, mut events) = Simulator::start_with_events(config).expect("start");
    assert_eq!(sim.node_ids(), vec!["node-1".to_owned()]);

    let mut stream = server.next_stream().await;
    assert!(stream.remote.expect("remote addr").ip().is_loopback());
    expect_registration(&mut stream, "node-1").await;
    assert!(sim.wait_connected(1, WAIT).await);

    stream.send(get_status()).await;
    let status = stream.recv_config_status().await;
    assert_eq!(
        (status.state.as_str(), status.version.as_str()),
        ("absent", "")
    );

    let config = r#"{"version":"2.0.0","node":{"codename":"node-1"},"nodeGroupSubject":{"codename":"main"},"priority":1}"#;
    stream.send(check("2.0.0", config)).await;
    let status = stream.recv_config_status().await;
    assert_eq!(
        (status.state.as_str(), status.version.as_str()),
        ("absent", "2.0.0")
    );

    // Keys are read regardless of case, as a real SM reads them.
    let shouting = r#"{"VERSION":"2.0.0","NodeGroupSubject":{"CODENAME":"main"}}"#;
    stream.send(set("2.0.0", shouting)).await;
    let status = stream.recv_config_status().await;
    assert_eq!(
        (status.state.as_str(), status.version.as_str()),
        ("installed", "2.0.0")
    );

    let node = sim.stats().nodes[0].clone();
    assert_eq!(node.cloud_status(), Some(ConnectionEnum::Connected));
    assert_eq!(node.counters.commands.get_node_config_status, 1);
    assert_eq!(node.counters.commands.check_node_config, 1);
    assert_eq!(node.counters.commands.set_node_config, 1);
    assert_eq!(node.counters.commands.connection_status, 1);
    assert_eq!(node.counters.cloud_status_changes, 1);
    assert_eq!(node.counters.sent.sm_info, 1);
    assert_eq!(
        (node.config_state.as_str(), node.config_version.as_str()),
        ("installed", "2.0.0")
    );

    // The server drops the stream: the node reconnects after its fixed delay, with the same id
    // and its state.
    drop(stream);
    let gone = wait_event(&mut events, |e| {
        matches!(e.kind, SimEventKind::Disconnected { .. })
    })
    .await;
    let mut stream = server.next_stream().await;
    expect_registration(&mut stream, "node-1").await;
    let back = wait_event(&mut events, |e| {
        matches!(e.kind, SimEventKind::Connected { connects: 2 })
    })
    .await;
    assert!(
        back.at - gone.at >= reconnect_delay,
        "reconnected after {:?}, before the delay {reconnect_delay:?}",
        back.at - gone.at
    );
    stream.send(get_status()).await;
    let status = stream.recv_config_status().await;
    assert_eq!(
        (status.state.as_str(), status.version.as_str()),
        ("installed", "2.0.0")
    );
    let stats = sim.stats();
    assert_eq!(stats.total.connects, 2);
    assert_eq!(stats.total.disconnects, 1);
    // The new stream's first connection_status repeats the status the node kept: ignored.
    assert_eq!(stats.total.commands.connection_status, 2);
    assert_eq!(stats.total.cloud_status_changes, 1);

    // Stopping ends the stream: the server sees the SM's side close.
    timeout(WAIT, sim.stop()).await.expect("stop in time");
    let end = timeout(WAIT, stream.from_sm.recv())
        .await
        .expect("stream end in time");
    assert!(end.is_none());
}

#[tokio::test]
async fn an_unreadable_node_config_gets_no_reply() {
    let mut server = TestServer::start().await;
    let sim = Simulator::start(server.config(1)).expect("start");
    let mut stream = server.next_stream().await;
    expect_registration(&mut stream, "node-1").await;

    // Not JSON; no nodeGroupSubject (the reference's own example of what a real SM cannot
    // parse); a nodeGroupSubject without codename. Neither check nor set gets a reply, and the
    // set installs nothing: the next reply answers the next request.
    for document in [
        "{not json",
        r#"{"version":"3.0.0"}"#,
        r#"{"version":"3.0.0","node":{"codename":"node-1"},"nodeGroupSubject":{}}"#,
        r#"["nodeGroupSubject"]"#,
    ] {
        stream.send(check("3.0.0", document)).await;
        stream.send(set("3.0.0", document)).await;
    }
    stream.send(get_status()).await;
    let status = stream.recv_config_status().await;
    assert_eq!(
        (status.state.as_str(), status.version.as_str()),
        ("absent", ""),
        "an unreadable config must get no reply and change nothing"
    );
    let stats = sim.stats();
    assert_eq!(stats.total.commands.check_node_config, 4);
    assert_eq!(stats.total.commands.set_node_config, 4);
    assert_eq!(stats.total.sent.node_config_status, 1);
    sim.stop().await;
}

#[tokio::test]
async fn answers_instances_logs_monitoring_and_records_networks() {
    let mut server = TestServer::start().await;
    let (sim, mut events) = Simulator::start_with_events(server.config(1)).expect("start");
    let mut stream = server.next_stream().await;
    expect_registration(&mut stream, "node-1").await;

    let start = instance_info("new-service", "sha256:aaaa");
    let started = start.instance.clone().expect("ident");
    let stopped = super::messages::instance_ident(0);
    stream
        .send(update_instances(vec![start], vec![stopped.clone()]))
        .await;
    let status = stream.recv_instances_status().await;
    // The manifest was resolved on the node's own connection before the status was sent.
    let call = server
        .blobs
        .try_recv()
        .expect("GetBlobsInfos before the status");
    assert_eq!(call.digests, vec!["sha256:aaaa"]);
    assert_eq!(
        call.remote, stream.remote,
        "GetBlobsInfos on the node's connection"
    );
    // Only the started instance is reported, as by a real SM.
    assert_eq!(status.instances.len(), 1);
    let start = &status.instances[0];
    assert_eq!(start.instance.as_ref(), Some(&started));
    assert_eq!(start.state, "active");
    assert_eq!(start.version, "2.0.0");
    assert_eq!(start.manifest_digest, "sha256:aaaa");
    assert_eq!(start.env_vars.len(), 1);
    assert_eq!(start.env_vars[0].name, "A");
    assert_instance_ok(start);

    // A stop alone: an update_instances_status without instances, and no GetBlobsInfos.
    stream
        .send(update_instances(vec![], vec![started.clone()]))
        .await;
    let status = stream.recv_instances_status().await;
    assert!(status.instances.is_empty(), "{status:?}");
    assert!(server.blobs.try_recv().is_err(), "nothing to resolve");

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
                    assert_log_ok(&log);
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
            // Of instances 0 and 1, 0 stopped; "new-service" started, then stopped.
            let running: Vec<_> = m
                .instances_monitoring
                .iter()
                .map(|i| i.instance.clone())
                .collect();
            assert_eq!(running, vec![Some(super::messages::instance_ident(1))]);
        }
        other => panic!("expected average_monitoring, got {other:?}"),
    }
    let ev = wait_event(&mut events, |e| {
        matches!(&e.kind, SimEventKind::Received(m)
            if matches!(m.sm_incoming_message, Some(SmIncomingMessage::UpdateNetworks(_))))
    })
    .await;
    assert_eq!(&*ev.node_id, "node-1");
    let stats = sim.stats();
    assert_eq!(stats.total.networks_received, 2);
    assert_eq!(stats.total.commands.update_networks, 1);
    assert_eq!(stats.total.sent.log, 4);

    // On-demand sends (garbage included) and GetBlobsInfos on the node's connection.
    let node = sim.node("node-1").expect("node");
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
async fn a_manifest_that_cannot_be_resolved_fails_its_instances() {
    let mut server = TestServer::start().await;
    let sim = Simulator::start(server.config(1)).expect("start");
    let mut stream = server.next_stream().await;
    expect_registration(&mut stream, "node-1").await;

    let digests = ["sha256:cccc", "sha256:missing-1"];
    let start = vec![
        instance_info("service-c", digests[0]),
        instance_info("service-m", digests[1]),
    ];
    stream.send(update_instances(start, vec![])).await;
    let status = stream.recv_instances_status().await;
    assert_eq!(server.next_blobs_call().await.digests, digests);
    // The call failed as a whole: each instance is failed, its error naming its digest.
    assert_eq!(status.instances.len(), 2);
    for (instance, digest) in status.instances.iter().zip(digests) {
        assert_eq!(instance.state, "failed");
        let error = instance.error.as_ref().expect("an error");
        assert_ne!(error.aos_code, 0, "{error:?}");
        assert!(error.message.contains(digest), "{error:?}");
        assert!(error.message.contains("NotFound"), "{error:?}");
        // The env vars themselves did not fail.
        assert_no_error(instance.env_vars[0].error.as_ref(), "EnvVarStatus");
    }
    sim.stop().await;
}

#[tokio::test]
async fn commands_wait_behind_get_blobs_infos() {
    let mut server = TestServer::start().await;
    let sim = Simulator::start(server.config(1)).expect("start");
    let mut stream = server.next_stream().await;
    expect_registration(&mut stream, "node-1").await;

    // The server holds its answer to GetBlobsInfos; meanwhile another command arrives.
    stream
        .send(update_instances(
            vec![instance_info("held", "sha256:hold-1")],
            vec![],
        ))
        .await;
    stream.send(get_status()).await;
    let call = server.next_blobs_call().await;
    assert_eq!(call.digests, vec!["sha256:hold-1"]);
    assert!(
        stream.nothing_yet(),
        "no status before GetBlobsInfos answers"
    );
    server.hold.add_permits(1);
    // One command at a time: the instance status first, then the config status.
    let status = stream.recv_instances_status().await;
    assert_eq!(status.instances.len(), 1);
    assert_eq!(status.instances[0].state, "active");
    stream.recv_config_status().await;
    sim.stop().await;
}

#[tokio::test]
async fn delayed_answers_keep_command_order_and_wait_behind_each_other() {
    let mut server = TestServer::start().await;
    let delay = Duration::from_millis(150);
    let sim = Simulator::start(SimConfig {
        behaviour: Behaviour::answer_delay(delay),
        ..server.config(1)
    })
    .expect("start");
    let mut stream = server.next_stream().await;
    expect_registration(&mut stream, "node-1").await;

    let asked = Instant::now();
    let config = r#"{"version":"1.0.0","nodeGroupSubject":{"codename":"main"}}"#;
    stream.send(get_status()).await;
    stream.send(check("1.0.0", r#"{"version":"1.0.0"}"#)).await; // no reply
    stream.send(check("1.0.0", config)).await;
    stream
        .send(SmIncomingMessage::GetAverageMonitoring(
            GetAverageMonitoring {},
        ))
        .await;
    stream
        .send(SmIncomingMessage::SystemLogRequest(SystemLogRequest {
            correlation_id: "log-1".to_owned(),
            ..SystemLogRequest::default()
        }))
        .await;
    stream.send(set("1.0.0", config)).await;

    let first = stream.recv_config_status().await;
    assert_eq!(
        (first.state.as_str(), first.version.as_str()),
        ("absent", "")
    );
    assert!(asked.elapsed() >= delay);
    let second = stream.recv_config_status().await;
    assert_eq!(second.version, "1.0.0");
    assert!(matches!(
        stream.recv_some().await,
        SmOutgoingMessage::AverageMonitoring(_)
    ));
    for part in 1..=2 {
        match stream.recv_some().await {
            SmOutgoingMessage::Log(log) => assert_eq!(log.part, part),
            other => panic!("expected log part {part}, got {other:?}"),
        }
    }
    let last = stream.recv_config_status().await;
    assert_eq!(last.state, "installed");
    // Five commands with a reply, each handled after the one before: none overtook.
    let took = asked.elapsed();
    assert!(
        took >= delay * 5,
        "five delayed replies came after {took:?}: the commands did not wait behind each other"
    );
    sim.stop().await;
}

#[tokio::test]
async fn a_repeated_connection_status_is_ignored() {
    let mut server = TestServer::start().await;
    let sim = Simulator::start(server.config(1)).expect("start");
    let mut stream = server.next_stream().await;
    expect_registration(&mut stream, "node-1").await;

    // The server's first command was CONNECTED.
    use ConnectionEnum::{Connected, Disconnected};
    for status in [Connected, Disconnected, Disconnected, Connected, Connected] {
        stream.send(cloud(status)).await;
    }
    // Commands are handled in order: once this is answered, every status above was handled.
    stream.send(get_status()).await;
    stream.recv_config_status().await;
    let node = sim.stats().nodes[0].clone();
    assert_eq!(node.counters.commands.connection_status, 6);
    assert_eq!(
        node.counters.cloud_status_changes, 3,
        "connected, disconnected, connected: the repeats are ignored"
    );
    assert_eq!(node.cloud_status(), Some(Connected));
    sim.stop().await;
}

/// A hook that lets the first endpoint through (the configuration check at start) and fails
/// every connection attempt after it, without any I/O.
fn failing_attempts() -> EndpointHook {
    let calls = Arc::new(AtomicUsize::new(0));
    Arc::new(move |endpoint| {
        if calls.fetch_add(1, Ordering::Relaxed) == 0 {
            Ok(endpoint)
        } else {
            Endpoint::from_shared("not a uri".to_owned())
        }
    })
}

#[tokio::test(start_paused = true)]
async fn the_reconnect_delay_is_fixed() {
    let delay = Duration::from_millis(700);
    let config = SimConfig {
        reconnect_delay: delay,
        endpoint_hook: Some(failing_attempts()),
        ..SimConfig::new("http://127.0.0.1:1", 1)
    };
    let (sim, mut events) = Simulator::start_with_events(config).expect("start");
    let mut attempts = Vec::new();
    while attempts.len() < 6 {
        let ev = wait_event(&mut events, |e| {
            matches!(e.kind, SimEventKind::ConnectFailed { .. })
        })
        .await;
        attempts.push(ev.at);
    }
    // Paused time: the clock moves only when every task waits, so the gaps are exact.
    let gaps: Vec<Duration> = attempts.windows(2).map(|w| w[1] - w[0]).collect();
    assert_eq!(
        gaps,
        vec![delay; 5],
        "the same delay before every attempt, no backoff"
    );
    assert!(sim.stats().total.connect_failures >= 6);
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
    expect_registration(&mut stream, "node-1").await;
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
            SmOutgoingMessage::SmInfo(info) if info.node_id == "node-1" => {
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
    // Only the well-registering node counts (none here is well-behaved except garbage node-1, index 0).
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
    expect_registration(&mut stream, "node-1").await;
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
    expect_registration(&mut stream, "node-1").await;
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
    assert_eq!(ids, vec!["sim-1", "sim-2", "sim-3"]);
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

#[tokio::test]
async fn tls_configuration_is_checked_at_start() {
    let dir = tempfile::tempdir().expect("temp dir");
    TestPki::new()
        .expect("test PKI")
        .write_dev_pki(dir.path(), 1)
        .expect("PKI written");
    let tls = SimTls::from_pki_dir(dir.path()).expect("the CA file");
    let start = |url: &str, tls: Option<SimTls>, nodes| {
        Simulator::start(SimConfig {
            tls,
            ..SimConfig::new(url, nodes)
        })
        .map(drop)
        .map_err(|e| e.to_string())
    };
    let e = start("http://127.0.0.1:1", Some(tls.clone()), 1).unwrap_err();
    assert!(e.contains("mTLS needs an https:// URL"), "{e}");
    let e = start("https://127.0.0.1:1", None, 1).unwrap_err();
    assert!(e.contains("no TLS is configured"), "{e}");
    // node-1 has a certificate, node-2 has none.
    let e = start("https://127.0.0.1:1", Some(tls.clone()), 2).unwrap_err();
    let missing = dir.path().join("client-node-2.pem");
    assert!(
        e.contains("the client certificate of node-2") && e.contains(&*missing.to_string_lossy()),
        "{e}"
    );
    let e = SimTls::from_pki_dir(dir.path().join("nowhere")).unwrap_err();
    assert!(
        e.to_string().contains("cannot read the CA certificate"),
        "{e}"
    );
    start("https://127.0.0.1:1", Some(tls), 1).expect("node-1 has its certificate");
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

fn from_hex(hex: &str) -> Vec<u8> {
    (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).expect("hex"))
        .collect()
}

/// The simulator's replies are byte for byte what the real Aos SM sent in the recording
/// `shared/fixtures/real-aos/sm-session.jsonl` (the hex copied from its lines), empty errors
/// included.
#[test]
fn replies_have_the_bytes_of_the_recorded_real_sm() {
    use super::messages;
    use prost::Message as _;

    let encode = |msg: &SmOutgoingMessages| msg.encode_to_vec();
    // `node_config_status` after the valid check_node_config of version 2.0.0.
    assert_eq!(
        encode(&messages::node_config_status("installed", "2.0.0", None)),
        from_hex("12140a09696e7374616c6c65641205322e302e301a00")
    );
    // The recorded update_instances (start one instance), and the status the SM sent for it.
    let command = SmIncomingMessages::decode(
        &from_hex(
            "22b4010ab1010a0f0a057376632d3112067375626a2d311205312e302e301a47736861323536\
             3a61626162616261626162616261626162616261626162616261626162616261626162616261\
             6261626162616261626162616261626162616261626162616261622a0472756e633089273889\
             27400a4a162f7661722f616f732f73746f726167652f7376632d3152142f7661722f616f732f\
             73746174652f7376632d315a120a094c4f475f4c4556454c12056465627567",
        )[..],
    )
    .expect("the recorded update_instances");
    let Some(SmIncomingMessage::UpdateInstances(update)) = command.sm_incoming_message else {
        panic!("not update_instances: {command:?}");
    };
    let started = messages::instance_status(&update.start_instances[0], "active", None);
    assert_eq!(
        encode(&messages::update_instances_status(vec![started])),
        from_hex(
            "1a83010a80010a0f0a057376632d3112067375626a2d311205312e302e301a0472756e632247\
             7368613235363a61626162616261626162616261626162616261626162616261626162616261\
             6261626162616261626162616261626162616261626162616261626162616261622a0d0a094c\
             4f475f4c4556454c120032066163746976653a00"
        )
    );
    // After the stop: no instances.
    assert_eq!(
        encode(&messages::update_instances_status(vec![])),
        from_hex("1a00")
    );
    // The first log part of `log-sys-1`, with the recorded data.
    let mut part = messages::log_parts("log-sys-1", 2, "ok").remove(0);
    if let Some(SmOutgoingMessage::Log(log)) = &mut part.sm_outgoing_message {
        log.data = b"peer log part 1 from node-a\n".to_vec();
    }
    assert_eq!(
        encode(&part),
        from_hex(
            "2a330a096c6f672d7379732d3110021801221c70656572206c6f67207061727420312066726f6d\
             206e6f64652d610a2a026f6b3200"
        )
    );
}
