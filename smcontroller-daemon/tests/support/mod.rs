//! Shared pieces of the integration tests: a controller served over real loopback gRPC, a
//! receiver that logs every event in order, and a test SM driven by hand over the generated
//! client. Every wait has a deadline.

#![allow(dead_code, unreachable_pub, missing_docs)]

use std::{
    collections::HashSet,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use async_trait::async_trait;
use smcontroller_api::{
    Alert, AlertsReceiver, DisconnectReason, EnvVarsStatusSender, Error, InstanceEnvVarsStatus,
    InstanceStatus, InstanceStatusReceiver, ItemInfoProvider, LogPart, LogSender,
    MonitoringReceiver, NodeId, NodeMonitoringData, SmInfo, SmInfoReceiver,
};
use smcontroller_grpc::{
    proto::servicemanager::v5::{
        self as pb, SmIncomingMessages, SmOutgoingMessages,
        sm_incoming_messages::SmIncomingMessage, sm_outgoing_messages::SmOutgoingMessage,
        sm_service_client::SmServiceClient,
    },
    server::{self, ServerSettings},
};
use smcontroller_routing::{Controller, Receivers, Settings};
use tokio::sync::{Notify, mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Status, Streaming, transport::Channel};

/// The longest any test waits for an event that should come.
pub const DEADLINE: Duration = Duration::from_secs(10);

/// One thing a receiver heard.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    Connected(String),
    Disconnected(String, DisconnectReason),
    SmInfo(String, SmInfo),
    InstanceStatus(String, InstanceStatus),
    NodeInstances(String, Vec<InstanceStatus>),
    EnvVars(String, Vec<InstanceEnvVarsStatus>),
    Monitoring(String, NodeMonitoringData),
    Alert(String, Alert),
    Log(LogPart),
}

impl Event {
    pub fn node(&self) -> &str {
        match self {
            Event::Connected(n)
            | Event::Disconnected(n, _)
            | Event::SmInfo(n, _)
            | Event::InstanceStatus(n, _)
            | Event::NodeInstances(n, _)
            | Event::EnvVars(n, _)
            | Event::Monitoring(n, _)
            | Event::Alert(n, _) => n,
            Event::Log(part) => part.node_id.as_str(),
        }
    }
}

/// Logs every receiver call in order; lets a test block one node's monitoring delivery.
#[derive(Default)]
pub struct EventLog {
    events: Mutex<Vec<Event>>,
    changed: Notify,
    blocked: Mutex<HashSet<String>>,
    unblocked: Notify,
}

impl EventLog {
    fn push(&self, event: Event) {
        self.events.lock().unwrap().push(event);
        self.changed.notify_waiters();
    }

    pub fn events(&self) -> Vec<Event> {
        self.events.lock().unwrap().clone()
    }

    pub fn of(&self, node: &str) -> Vec<Event> {
        self.events()
            .into_iter()
            .filter(|e| e.node() == node)
            .collect()
    }

    pub fn count(&self, pred: impl Fn(&Event) -> bool) -> usize {
        self.events
            .lock()
            .unwrap()
            .iter()
            .filter(|e| pred(e))
            .count()
    }

    /// Waits until `pred` holds over the whole log, or the deadline passes.
    pub async fn wait_until(&self, what: &str, pred: impl Fn(&[Event]) -> bool) {
        let wait = async {
            loop {
                let notified = self.changed.notified();
                tokio::pin!(notified);
                notified.as_mut().enable();
                if pred(&self.events.lock().unwrap()) {
                    return;
                }
                notified.await;
            }
        };
        if tokio::time::timeout(DEADLINE, wait).await.is_err() {
            panic!("timed out waiting for {what}; events: {:#?}", self.events());
        }
    }

    pub async fn wait_count(&self, what: &str, n: usize, pred: impl Fn(&Event) -> bool) {
        self.wait_until(what, |events| {
            events.iter().filter(|e| pred(e)).count() >= n
        })
        .await;
    }

    /// Monitoring deliveries of `node` wait until [`unblock`](Self::unblock).
    pub fn block(&self, node: &str) {
        self.blocked.lock().unwrap().insert(node.to_owned());
    }

    pub fn unblock(&self, node: &str) {
        self.blocked.lock().unwrap().remove(node);
        self.unblocked.notify_waiters();
    }

    async fn gate(&self, node: &str) {
        loop {
            let notified = self.unblocked.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if !self.blocked.lock().unwrap().contains(node) {
                return;
            }
            notified.await;
        }
    }
}

#[async_trait]
impl SmInfoReceiver for EventLog {
    async fn on_node_connected(&self, node: &NodeId) {
        self.push(Event::Connected(node.to_string()));
    }
    async fn on_node_disconnected(&self, node: &NodeId, reason: &DisconnectReason) {
        self.push(Event::Disconnected(node.to_string(), reason.clone()));
    }
    async fn on_sm_info_received(&self, info: &SmInfo) {
        self.push(Event::SmInfo(info.node_id.to_string(), info.clone()));
    }
}

#[async_trait]
impl InstanceStatusReceiver for EventLog {
    async fn on_instance_status_received(&self, node: &NodeId, status: &InstanceStatus) {
        self.push(Event::InstanceStatus(node.to_string(), status.clone()));
    }
    async fn on_node_instances_statuses_received(&self, node: &NodeId, s: &[InstanceStatus]) {
        self.push(Event::NodeInstances(node.to_string(), s.to_vec()));
    }
}

#[async_trait]
impl EnvVarsStatusSender for EventLog {
    async fn send_env_vars_statuses(&self, node: &NodeId, s: &[InstanceEnvVarsStatus]) {
        self.push(Event::EnvVars(node.to_string(), s.to_vec()));
    }
}

#[async_trait]
impl MonitoringReceiver for EventLog {
    async fn on_monitoring_received(&self, node: &NodeId, data: &NodeMonitoringData) {
        self.gate(node.as_str()).await;
        self.push(Event::Monitoring(node.to_string(), data.clone()));
    }
}

#[async_trait]
impl AlertsReceiver for EventLog {
    async fn on_alert_received(&self, node: &NodeId, alert: &Alert) {
        self.push(Event::Alert(node.to_string(), alert.clone()));
    }
}

#[async_trait]
impl LogSender for EventLog {
    async fn send_log(&self, part: &LogPart) {
        self.push(Event::Log(part.clone()));
    }
}

/// Blob URLs: `https://blobs.example/<digest>`, except digests starting with `missing`.
pub struct Blobs;

#[async_trait]
impl ItemInfoProvider for Blobs {
    async fn get_blob_url(&self, digest: &str) -> smcontroller_api::Result<String> {
        if digest.starts_with("missing") {
            Err(Error::InvalidArgument(format!("unknown digest {digest}")))
        } else {
            Ok(format!("https://blobs.example/{digest}"))
        }
    }
}

/// A controller served on 127.0.0.1 over plain HTTP/2.
pub struct Harness {
    pub addr: SocketAddr,
    pub controller: Controller,
    pub log: Arc<EventLog>,
    stop: watch::Sender<bool>,
    server: tokio::task::JoinHandle<()>,
}

impl Harness {
    pub async fn start() -> Self {
        Self::with(Settings::default(), ServerSettings::default()).await
    }

    pub async fn with(settings: Settings, server_settings: ServerSettings) -> Self {
        let log = Arc::new(EventLog::default());
        let controller = Controller::new(settings, Receivers::all(log.clone()));
        let listener = server::bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, mut stopped) = watch::channel(false);
        let server = tokio::spawn({
            let controller = controller.clone();
            async move {
                server::serve_insecure(
                    listener,
                    controller,
                    Arc::new(Blobs),
                    server_settings,
                    async move {
                        let _ = stopped.wait_for(|s| *s).await;
                    },
                )
                .await
                .unwrap();
            }
        });
        Self {
            addr,
            controller,
            log,
            stop,
            server,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub async fn client(&self) -> SmServiceClient<Channel> {
        SmServiceClient::connect(self.url()).await.unwrap()
    }

    /// Stops the router and the server; returns once both are done.
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        self.controller.shutdown().await;
        tokio::time::timeout(DEADLINE, self.server)
            .await
            .expect("server stops")
            .unwrap();
    }

    /// A test SM that has registered as `node` and read the cloud status.
    pub async fn sm(&self, node: &str) -> TestSm {
        let is_info = |e: &Event| matches!(e, Event::SmInfo(n, _) if n == node);
        let before = self.log.count(is_info);
        let sm = TestSm::open(&self.url()).await;
        sm.register(node).await;
        self.log
            .wait_count(&format!("{node} registered"), before + 1, is_info)
            .await;
        sm
    }
}

/// A hand-driven SM on its own connection.
pub struct TestSm {
    pub tx: mpsc::Sender<SmOutgoingMessages>,
    pub rx: Streaming<SmIncomingMessages>,
}

impl TestSm {
    /// Opens `RegisterSM` on a new connection and reads the first message (cloud status).
    pub async fn open(url: &str) -> Self {
        let mut sm = Self::open_raw(url).await;
        let first = sm.recv().await;
        assert!(
            matches!(first, SmIncomingMessage::ConnectionStatus(_)),
            "first message must be connection_status (R-REG-1), got {first:?}"
        );
        sm
    }

    /// Opens `RegisterSM` without reading anything.
    pub async fn open_raw(url: &str) -> Self {
        let mut client = SmServiceClient::connect(url.to_owned()).await.unwrap();
        let (tx, rx) = mpsc::channel(64);
        let response = client
            .register_sm(ReceiverStream::new(rx))
            .await
            .expect("RegisterSM accepted");
        Self {
            tx,
            rx: response.into_inner(),
        }
    }

    pub async fn send(&self, message: SmOutgoingMessage) {
        self.tx
            .send(SmOutgoingMessages {
                sm_outgoing_message: Some(message),
            })
            .await
            .expect("stream open");
    }

    pub async fn register(&self, node: &str) {
        self.send(SmOutgoingMessage::SmInfo(sm_info(node))).await;
    }

    /// The next command, within the deadline.
    pub async fn recv(&mut self) -> SmIncomingMessage {
        match self.next().await {
            Ok(Some(message)) => message,
            other => panic!("expected a command, got {other:?}"),
        }
    }

    /// The next item of the response stream: a command, its end, or its error status.
    pub async fn next(&mut self) -> Result<Option<SmIncomingMessage>, Status> {
        let item = tokio::time::timeout(DEADLINE, self.rx.message())
            .await
            .expect("an item within the deadline")?;
        Ok(item.map(|m| m.sm_incoming_message.expect("command has a body")))
    }

    /// Whether a command arrives within `wait` (for asserting that nothing was sent).
    pub async fn nothing_within(&mut self, wait: Duration) -> bool {
        tokio::time::timeout(wait, self.rx.message()).await.is_err()
    }

    /// Answers with a `node_config_status`.
    pub async fn config_status(&self, state: &str, version: &str) {
        self.send(SmOutgoingMessage::NodeConfigStatus(pb::NodeConfigStatus {
            state: state.into(),
            version: version.into(),
            error: None,
        }))
        .await;
    }
}

pub fn sm_info(node: &str) -> pb::SmInfo {
    pb::SmInfo {
        node_id: node.into(),
        runtimes: vec![pb::RuntimeInfo {
            runtime_id: "runc".into(),
            r#type: "runc".into(),
            max_dmips: 10_000,
            allowed_dmips: 8_000,
            total_ram: 1 << 30,
            allowed_ram: 1 << 29,
            max_instances: 10,
            os_info: None,
            arch_info: None,
        }],
        resources: vec![],
    }
}

pub fn timestamp() -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: 1_700_000_000,
        nanos: 0,
    }
}

pub fn monitoring(ram: u64) -> SmOutgoingMessage {
    SmOutgoingMessage::InstantMonitoring(pb::InstantMonitoring {
        node_monitoring: Some(pb::MonitoringData {
            timestamp: Some(timestamp()),
            ram,
            cpu: 1,
            partitions: vec![],
            download: 0,
            upload: 0,
        }),
        instances_monitoring: vec![],
    })
}

pub fn average_monitoring(ram: u64) -> SmOutgoingMessage {
    match monitoring(ram) {
        SmOutgoingMessage::InstantMonitoring(m) => {
            SmOutgoingMessage::AverageMonitoring(pb::AverageMonitoring {
                node_monitoring: m.node_monitoring,
                instances_monitoring: m.instances_monitoring,
            })
        }
        _ => unreachable!(),
    }
}

/// The ram value of a monitoring event (tests number their samples with it).
pub fn ram_of(event: &Event) -> Option<u64> {
    match event {
        Event::Monitoring(_, data) => Some(data.node.ram),
        _ => None,
    }
}

pub fn router_settings(response_timeout: Duration) -> Settings {
    Settings {
        response_timeout,
        ..Settings::default()
    }
}

/// Sends pre-encoded protobuf bodies (valid or not) on a `RegisterSM` stream; returns the
/// response stream and the sender (keep it alive to keep the request stream open).
pub async fn raw_stream(
    url: &str,
    frames: Vec<Vec<u8>>,
) -> (Streaming<SmIncomingMessages>, mpsc::Sender<Vec<u8>>) {
    let channel = tonic::transport::Endpoint::from_shared(url.to_owned())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.unwrap();
    let (tx, rx) = mpsc::channel(16);
    for frame in frames {
        tx.send(frame).await.unwrap();
    }
    let path = tonic::codegen::http::uri::PathAndQuery::from_static(
        "/servicemanager.v5.SMService/RegisterSM",
    );
    let response = grpc
        .streaming(tonic::Request::new(ReceiverStream::new(rx)), path, RawCodec)
        .await
        .expect("RegisterSM accepted");
    (response.into_inner(), tx)
}

/// Writes bodies as given; reads `SMIncomingMessages`.
struct RawCodec;

impl tonic::codec::Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = SmIncomingMessages;
    type Encoder = RawEncoder;
    type Decoder = tonic_prost::ProstDecoder<SmIncomingMessages>;

    fn encoder(&mut self) -> Self::Encoder {
        RawEncoder
    }

    fn decoder(&mut self) -> Self::Decoder {
        tonic_prost::ProstDecoder::default()
    }
}

struct RawEncoder;

impl tonic::codec::Encoder for RawEncoder {
    type Item = Vec<u8>;
    type Error = Status;

    fn encode(
        &mut self,
        item: Vec<u8>,
        dst: &mut tonic::codec::EncodeBuf<'_>,
    ) -> Result<(), Status> {
        use bytes::BufMut;
        dst.put_slice(&item);
        Ok(())
    }
}

/// The `connection_status` command the controller sends for a cloud state.
pub fn cloud_status(connected: bool) -> SmIncomingMessage {
    let status = if connected {
        pb::ConnectionEnum::Connected
    } else {
        pb::ConnectionEnum::Disconnected
    };
    SmIncomingMessage::ConnectionStatus(pb::ConnectionStatus {
        cloud_status: status as i32,
    })
}

/// Repeats `call` on a connection the server is closing (N-BAD-1) until one fails as a closed
/// connection does (UNAVAILABLE or UNKNOWN). Calls sent before the close reached the client
/// may still be refused (INVALID_ARGUMENT); any other outcome fails the test.
pub async fn until_closed<T, F>(mut call: impl FnMut() -> F)
where
    T: std::fmt::Debug,
    F: Future<Output = Result<T, Status>>,
{
    loop {
        match call().await {
            Err(status)
                if matches!(
                    status.code(),
                    tonic::Code::Unavailable | tonic::Code::Unknown
                ) =>
            {
                return;
            }
            Err(status) if status.code() == tonic::Code::InvalidArgument => {}
            other => panic!("{other:?}"),
        }
    }
}
