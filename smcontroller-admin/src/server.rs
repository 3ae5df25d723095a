//! The admin server: `smcontroller.admin.v1.AdminService` on top of the router
//! ([`Controller`]), the daemon's receiver ([`NodeDirectory`]), its network provider if it has
//! one ([`NetworkDirectory`]) and the [`EventHub`], served on a local endpoint of its own
//! ([`AdminEndpoint`]): a Unix socket (mode 0660) or a loopback TCP port, never the SM
//! listener.

use std::{
    collections::{HashMap, HashSet},
    fmt,
    net::SocketAddr,
    path::{Path, PathBuf},
    pin::Pin,
    str::FromStr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, SystemTime},
};

use futures::Stream;
use smcontroller_api::{
    Error, InstanceIdent, InstanceRunner, LogProvider, LogRequest, LogStatus, LogType,
    MonitoringProvider, NodeConfig, NodeConfigHandler, NodeId, NodeNetwork, SmProtocol,
    StartInstance,
};
use smcontroller_grpc::proto::servicemanager::v5 as sm;
use smcontroller_routing::Controller;
use tokio::{
    net::{TcpListener, UnixListener},
    sync::{broadcast, mpsc, watch},
    task::JoinHandle,
};
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream, UnixListenerStream};
use tonic::{Request, Response, Status};
use tracing::{info, warn};

use crate::{
    directory::{NetworkDirectory, NodeDirectory},
    events::{Event, EventBody, EventHub, EventKind, average_monitoring_to_proto, timestamp},
    proto::v1::{self as pb, admin_service_server::AdminServiceServer},
};

/// How long a log request waits for all its parts unless the request says otherwise.
pub const DEFAULT_LOG_TIMEOUT: Duration = Duration::from_secs(30);

/// How long [`AdminServer::stop`] waits for the server to finish.
const STOP_GRACE: Duration = Duration::from_millis(500);

/// The file mode of the admin socket: owner and group may connect.
const SOCKET_MODE: u32 = 0o660;

/// Where the admin API is served.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AdminEndpoint {
    /// A Unix socket at this path.
    Unix(PathBuf),
    /// A TCP port on a loopback address.
    Tcp(SocketAddr),
}

impl AdminEndpoint {
    /// The endpoint `smcontrollerd` serves and `smctl` reaches when neither is told otherwise:
    /// the Unix socket [`default_socket_path`].
    pub fn default_local() -> Self {
        Self::Unix(default_socket_path())
    }
}

impl fmt::Display for AdminEndpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Unix(path) => write!(f, "unix:{}", path.display()),
            Self::Tcp(addr) => write!(f, "{addr}"),
        }
    }
}

/// Why an admin endpoint string is not one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "{value:?} is not an admin endpoint: give a Unix socket (unix:PATH or an absolute path) or a \
     loopback host:port ({reason})"
)]
pub struct BadEndpoint {
    /// The value given.
    pub value: String,
    /// What is wrong with it.
    pub reason: String,
}

impl FromStr for AdminEndpoint {
    type Err = BadEndpoint;

    /// `unix:PATH`, an absolute or `./` path, `host:port` or `http://host:port`. A TCP
    /// address is accepted here whatever it is; [`serve`] refuses non-loopback ones.
    fn from_str(value: &str) -> Result<Self, Self::Err> {
        let bad = |reason: &str| BadEndpoint {
            value: value.to_owned(),
            reason: reason.to_owned(),
        };
        if let Some(path) = value.strip_prefix("unix:") {
            if path.is_empty() {
                return Err(bad("empty socket path"));
            }
            return Ok(Self::Unix(PathBuf::from(path)));
        }
        if value.starts_with('/') || value.starts_with("./") || value.starts_with("../") {
            return Ok(Self::Unix(PathBuf::from(value)));
        }
        let addr = value.strip_prefix("http://").unwrap_or(value);
        let addr = addr.strip_suffix('/').unwrap_or(addr);
        let addr = addr.replace("localhost:", "127.0.0.1:");
        addr.parse::<SocketAddr>()
            .map(Self::Tcp)
            .map_err(|e| bad(&e.to_string()))
    }
}

/// The default admin socket: `/run/smcontroller/admin.sock` for root (a system service);
/// for another user `$XDG_RUNTIME_DIR/smcontroller/admin.sock`, or
/// `/tmp/smcontroller-UID/admin.sock` without `XDG_RUNTIME_DIR`. The daemon and `smctl` of the
/// same user with the same environment compute the same path.
pub fn default_socket_path() -> PathBuf {
    let uid = current_uid();
    if uid == Some(0) {
        return PathBuf::from("/run/smcontroller/admin.sock");
    }
    if let Some(dir) = std::env::var_os("XDG_RUNTIME_DIR").filter(|d| !d.is_empty()) {
        return PathBuf::from(dir).join("smcontroller").join("admin.sock");
    }
    let uid = uid.map_or_else(|| "user".to_owned(), |u| u.to_string());
    PathBuf::from(format!("/tmp/smcontroller-{uid}")).join("admin.sock")
}

/// The uid of this process (the owner of `/proc/self`), where that can be read.
fn current_uid() -> Option<u32> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self").ok().map(|m| m.uid())
}

/// Why the admin server cannot serve.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// TCP admin endpoints must be loopback addresses: the admin API has no authentication of
    /// its own.
    #[error("admin endpoint {0} is not a loopback address; the admin API serves on loopback only")]
    NotLoopback(SocketAddr),
    /// Another live process serves on this socket.
    #[error("admin socket {} is in use by another process", .0.display())]
    InUse(PathBuf),
    /// Binding, creating the socket's directory or setting its mode failed.
    #[error("cannot serve the admin API on {endpoint}: {source}")]
    Io {
        /// The endpoint.
        endpoint: AdminEndpoint,
        /// What failed.
        #[source]
        source: std::io::Error,
    },
}

/// What `ListNetworks` answers when the admin service was given no network provider.
const NO_NETWORK_PROVIDER: &str = "this controller has no network provider of its own: it \
     speaks smProtocol 9.0, where networks are pushed to nodes with update_networks (smctl \
     networks update)";

/// The admin API's implementation. Build it with [`AdminService::new`] (and
/// [`with_networks`](AdminService::with_networks) under 9.1), serve it with [`serve`].
#[derive(Clone)]
pub struct AdminService {
    controller: Controller,
    directory: Arc<dyn NodeDirectory>,
    networks: Option<Arc<dyn NetworkDirectory>>,
    events: EventHub,
    stopping: watch::Receiver<bool>,
    stop: Arc<watch::Sender<bool>>,
    next_correlation: Arc<AtomicU64>,
}

impl fmt::Debug for AdminService {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AdminService").finish_non_exhaustive()
    }
}

impl AdminService {
    /// The admin API over `controller`, with per-node state from `directory` and events (and
    /// log parts) from `events`: the receiver that the controller calls must publish into it.
    pub fn new(
        controller: Controller,
        directory: Arc<dyn NodeDirectory>,
        events: EventHub,
    ) -> Self {
        let (stop, stopping) = watch::channel(false);
        Self {
            controller,
            directory,
            networks: None,
            events,
            stopping,
            stop: Arc::new(stop),
            next_correlation: Arc::new(AtomicU64::new(1)),
        }
    }

    /// Lists the networks of `networks` (the controller's own network provider, 9.1) in
    /// `ListNetworks`; without it, `ListNetworks` answers `FAILED_PRECONDITION`.
    pub fn with_networks(mut self, networks: Arc<dyn NetworkDirectory>) -> Self {
        self.networks = Some(networks);
        self
    }

    /// One node as the admin API shows it; `None` if it is not registered.
    fn node(&self, node_id: &NodeId) -> Option<pb::Node> {
        let status = self.controller.node_status(node_id)?;
        let view = self.directory.node(node_id);
        let info = view.as_ref().and_then(|v| v.sm_info.clone());
        Some(pb::Node {
            node_id: node_id.to_string(),
            connected_since: status
                .connected_at
                .or_else(|| view.as_ref().and_then(|v| v.connected_since))
                .map(timestamp),
            generation: status.session,
            runtimes: info
                .as_ref()
                .map(|i| i.runtimes.iter().cloned().map(Into::into).collect())
                .unwrap_or_default(),
            resources: info
                .as_ref()
                .map(|i| i.resources.iter().cloned().map(Into::into).collect())
                .unwrap_or_default(),
            queued_messages: status.queued_messages as u64,
            queued_bytes: status.queued_bytes as u64,
            last_message_at: status
                .last_message_at
                .or_else(|| view.as_ref().and_then(|v| v.last_message_at))
                .map(timestamp),
            stalls: status.stalls,
            stalled: status.stalled,
            connects: view.as_ref().map_or(0, |v| v.connects),
            counts: view.as_ref().map(|v| v.counts.to_proto()),
        })
    }

    /// A correlation id for a log request that has none.
    fn correlation_id(&self) -> String {
        let n = self.next_correlation.fetch_add(1, Ordering::Relaxed);
        let millis = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default()
            .as_millis();
        format!("admin-{millis}-{n}")
    }
}

/// The gRPC status of a controller error: `NOT_FOUND`, `DEADLINE_EXCEEDED`, `UNAVAILABLE`,
/// `INVALID_ARGUMENT`, `FAILED_PRECONDITION` (the node reported an error) or `INTERNAL`.
pub fn status_of(error: Error) -> Status {
    let message = error.to_string();
    match error {
        Error::NotFound { .. } => Status::not_found(message),
        Error::Timeout { .. } => Status::deadline_exceeded(message),
        Error::Disconnected { .. } => Status::unavailable(message),
        Error::InvalidArgument(_) => Status::invalid_argument(message),
        Error::Failed { .. } => {
            Status::failed_precondition(format!("the node reported: {message}"))
        }
        Error::ResourceExhausted(_) => Status::resource_exhausted(message),
        Error::Transport(_) => Status::internal(message),
        Error::NotSupported(_) => Status::unimplemented(message),
    }
}

/// The node id of a request: `INVALID_ARGUMENT` naming `node_id` when it is empty.
fn node_id(value: &str) -> Result<NodeId, Status> {
    if value.is_empty() {
        Err(Status::invalid_argument(
            "node_id: required, give the node's id",
        ))
    } else {
        Ok(NodeId::new(value))
    }
}

/// A system time from the wire: `INVALID_ARGUMENT` naming `field` when it is not one.
fn system_time(field: &str, ts: prost_types::Timestamp) -> Result<SystemTime, Status> {
    let nanos = u32::try_from(ts.nanos)
        .ok()
        .filter(|n| *n < 1_000_000_000)
        .ok_or_else(|| Status::invalid_argument(format!("{field}: nanos out of range")))?;
    let secs = u64::try_from(ts.seconds)
        .map_err(|_| Status::invalid_argument(format!("{field}: before 1970")))?;
    Ok(SystemTime::UNIX_EPOCH + Duration::new(secs, nanos))
}

type EventStream = Pin<Box<dyn Stream<Item = Result<pb::Event, Status>> + Send>>;
type LogStream = Pin<Box<dyn Stream<Item = Result<pb::LogPart, Status>> + Send>>;

#[tonic::async_trait]
impl pb::admin_service_server::AdminService for AdminService {
    async fn get_info(
        &self,
        _request: Request<pb::GetInfoRequest>,
    ) -> Result<Response<pb::Info>, Status> {
        let protocol = self.controller.settings().sm_protocol;
        Ok(Response::new(pb::Info {
            version: env!("CARGO_PKG_VERSION").to_owned(),
            sm_protocol: protocol.to_string(),
            network_service: protocol == SmProtocol::V9_1
                && self.controller.network_provider().is_some(),
            nodes: self.controller.nodes().len() as u64,
            pending_streams: self.controller.pending_streams() as u64,
        }))
    }

    async fn list_nodes(
        &self,
        _request: Request<pb::ListNodesRequest>,
    ) -> Result<Response<pb::ListNodesResponse>, Status> {
        let nodes = self
            .controller
            .nodes()
            .iter()
            .filter_map(|id| self.node(id))
            .collect();
        let departed = self
            .directory
            .departed()
            .iter()
            .filter(|d| self.controller.node_status(&d.node_id).is_none())
            .map(|d| d.to_proto())
            .collect();
        Ok(Response::new(pb::ListNodesResponse { nodes, departed }))
    }

    async fn get_node(
        &self,
        request: Request<pb::NodeRequest>,
    ) -> Result<Response<pb::Node>, Status> {
        let node = node_id(&request.into_inner().node_id)?;
        self.node(&node)
            .map(Response::new)
            .ok_or_else(|| status_of(Error::not_found(node)))
    }

    async fn get_node_config_status(
        &self,
        request: Request<pb::NodeRequest>,
    ) -> Result<Response<sm::NodeConfigStatus>, Status> {
        let node = node_id(&request.into_inner().node_id)?;
        let status = self
            .controller
            .get_node_config_status(&node)
            .await
            .map_err(status_of)?;
        Ok(Response::new(status.into()))
    }

    async fn check_node_config(
        &self,
        request: Request<pb::NodeConfigRequest>,
    ) -> Result<Response<pb::NodeConfigResponse>, Status> {
        let (node, config) = node_config(request.into_inner())?;
        self.controller
            .check_node_config(&node, &config)
            .await
            .map_err(status_of)?;
        Ok(Response::new(pb::NodeConfigResponse {
            version: config.version,
        }))
    }

    async fn set_node_config(
        &self,
        request: Request<pb::NodeConfigRequest>,
    ) -> Result<Response<pb::NodeConfigResponse>, Status> {
        let (node, config) = node_config(request.into_inner())?;
        self.controller
            .update_node_config(&node, &config)
            .await
            .map_err(status_of)?;
        Ok(Response::new(pb::NodeConfigResponse {
            version: config.version,
        }))
    }

    async fn update_instances(
        &self,
        request: Request<pb::UpdateInstancesRequest>,
    ) -> Result<Response<pb::Queued>, Status> {
        let request = request.into_inner();
        let node = node_id(&request.node_id)?;
        let stop = request
            .stop_instances
            .into_iter()
            .enumerate()
            .map(|(i, ident)| {
                InstanceIdent::try_from(ident)
                    .map_err(|e| Status::invalid_argument(format!("stop_instances[{i}]: {e}")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let start = request
            .start_instances
            .into_iter()
            .enumerate()
            .map(|(i, info)| {
                StartInstance::try_from(info)
                    .map_err(|e| Status::invalid_argument(format!("start_instances[{i}]: {e}")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        self.controller
            .update_instances(&node, &stop, &start)
            .await
            .map_err(status_of)?;
        Ok(Response::new(pb::Queued {}))
    }

    async fn update_networks(
        &self,
        request: Request<pb::UpdateNetworksRequest>,
    ) -> Result<Response<pb::Queued>, Status> {
        let request = request.into_inner();
        let node = node_id(&request.node_id)?;
        let networks: Vec<_> = request.networks.into_iter().map(Into::into).collect();
        self.controller
            .update_networks(&node, &networks)
            .await
            .map_err(status_of)?;
        Ok(Response::new(pb::Queued {}))
    }

    async fn list_networks(
        &self,
        _request: Request<pb::ListNetworksRequest>,
    ) -> Result<Response<pb::ListNetworksResponse>, Status> {
        let networks = self
            .networks
            .as_ref()
            .ok_or_else(|| Status::failed_precondition(NO_NETWORK_PROVIDER))?;
        Ok(Response::new(networks.networks().to_proto()))
    }

    type RequestLogStream = LogStream;

    async fn request_log(
        &self,
        request: Request<pb::RequestLogRequest>,
    ) -> Result<Response<Self::RequestLogStream>, Status> {
        let request = request.into_inner();
        let log_type = match pb::LogType::try_from(request.log_type) {
            Ok(pb::LogType::System) => LogType::System,
            Ok(pb::LogType::Instance) => LogType::Instance,
            Ok(pb::LogType::Crash) => LogType::Crash,
            _ => {
                return Err(Status::invalid_argument(format!(
                    "log_type: {} is not system, instance or crash",
                    request.log_type
                )));
            }
        };
        let mut nodes = Vec::with_capacity(request.node_ids.len());
        for (i, id) in request.node_ids.iter().enumerate() {
            if id.is_empty() {
                return Err(Status::invalid_argument(format!("node_ids[{i}]: empty")));
            }
            nodes.push(NodeId::new(id));
        }
        if nodes.is_empty() {
            nodes = self.controller.nodes();
        }
        let correlation_id = if request.correlation_id.is_empty() {
            self.correlation_id()
        } else {
            request.correlation_id
        };
        let log_request = LogRequest {
            correlation_id: correlation_id.clone(),
            log_type,
            node_ids: nodes.clone(),
            instance_filter: request.filter.map(Into::into).unwrap_or_default(),
            from: request.from.map(|t| system_time("from", t)).transpose()?,
            till: request.till.map(|t| system_time("till", t)).transpose()?,
        };
        let timeout = match request.timeout_ms {
            0 => DEFAULT_LOG_TIMEOUT,
            ms => Duration::from_millis(ms),
        };
        let (tx, rx) = mpsc::channel(16);
        if nodes.is_empty() {
            // Nobody to ask: an empty answer.
            return Ok(Response::new(Box::pin(ReceiverStream::new(rx))));
        }
        // Subscribe before asking, so that no part can come before we listen.
        let events = self.events.subscribe();
        self.controller
            .request_log(&log_request)
            .await
            .map_err(status_of)?;
        let collector = LogCollector {
            correlation_id,
            waiting: nodes.iter().cloned().collect(),
            asked: nodes.iter().map(ToString::to_string).collect(),
        };
        tokio::spawn(collector.run(events, tx, timeout, self.stopping.clone()));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn get_average_monitoring(
        &self,
        request: Request<pb::NodeRequest>,
    ) -> Result<Response<sm::AverageMonitoring>, Status> {
        let node = node_id(&request.into_inner().node_id)?;
        let data = self
            .controller
            .get_average_monitoring(&node)
            .await
            .map_err(status_of)?;
        Ok(Response::new(average_monitoring_to_proto(data)))
    }

    async fn set_cloud_state(
        &self,
        request: Request<pb::SetCloudStateRequest>,
    ) -> Result<Response<pb::SetCloudStateResponse>, Status> {
        let connected = request.into_inner().connected;
        let nodes = self.controller.node_count() as u64;
        self.controller.set_cloud_connected(connected);
        info!(connected, "cloud state set through the admin API");
        Ok(Response::new(pb::SetCloudStateResponse { nodes }))
    }

    type WatchEventsStream = EventStream;

    async fn watch_events(
        &self,
        request: Request<pb::WatchEventsRequest>,
    ) -> Result<Response<Self::WatchEventsStream>, Status> {
        let request = request.into_inner();
        let mut kinds = HashSet::new();
        for (i, kind) in request.kinds.iter().enumerate() {
            let kind = pb::EventKind::try_from(*kind)
                .ok()
                .and_then(EventKind::from_proto)
                .ok_or_else(|| {
                    Status::invalid_argument(format!("kinds[{i}]: {kind} is not an event kind"))
                })?;
            kinds.insert(kind);
        }
        let filter = EventFilter {
            nodes: request.node_ids.into_iter().collect(),
            kinds,
        };
        let events = self.events.subscribe();
        let (tx, rx) = mpsc::channel(64);
        tokio::spawn(pump_events(events, filter, tx, self.stopping.clone()));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

/// The node and the configuration of a check or set request.
fn node_config(request: pb::NodeConfigRequest) -> Result<(NodeId, NodeConfig), Status> {
    let node = node_id(&request.node_id)?;
    if request.node_config.is_empty() {
        return Err(Status::invalid_argument(
            "node_config: required, give the node configuration JSON document",
        ));
    }
    let config = NodeConfig::from_json(&request.node_config)
        .map_err(|e| Status::invalid_argument(format!("node_config: {e}")))?;
    Ok((node, config))
}

/// Which events a subscriber wants: empty sets mean all.
struct EventFilter {
    nodes: HashSet<String>,
    kinds: HashSet<EventKind>,
}

impl EventFilter {
    fn accepts(&self, event: &Event) -> bool {
        (self.nodes.is_empty() || self.nodes.contains(event.node_id.as_str()))
            && (self.kinds.is_empty() || self.kinds.contains(&event.body.kind()))
    }
}

/// Returns once the server is stopping.
async fn stopped(stopping: &mut watch::Receiver<bool>) {
    let _ = stopping.wait_for(|s| *s).await;
}

/// Forwards a subscriber's events until it goes away or the server stops.
async fn pump_events(
    mut events: broadcast::Receiver<Arc<Event>>,
    filter: EventFilter,
    tx: mpsc::Sender<Result<pb::Event, Status>>,
    mut stopping: watch::Receiver<bool>,
) {
    loop {
        let item = tokio::select! {
            () = stopped(&mut stopping) => break,
            () = tx.closed() => break,
            item = events.recv() => item,
        };
        let event = match item {
            Ok(event) if filter.accepts(&event) => event.to_proto(),
            Ok(_) => continue,
            Err(broadcast::error::RecvError::Lagged(skipped)) => pb::Event {
                node_id: String::new(),
                time: Some(timestamp(SystemTime::now())),
                event: Some(pb::event::Event::Lagged(pb::Lagged { skipped })),
            },
            Err(broadcast::error::RecvError::Closed) => break,
        };
        if tx.send(Ok(event)).await.is_err() {
            break;
        }
    }
}

/// Collects the parts of one log request.
struct LogCollector {
    correlation_id: String,
    /// Nodes whose last part has not come yet.
    waiting: HashSet<NodeId>,
    /// Every node asked.
    asked: Vec<String>,
}

impl LogCollector {
    async fn run(
        mut self,
        mut events: broadcast::Receiver<Arc<Event>>,
        tx: mpsc::Sender<Result<pb::LogPart, Status>>,
        timeout: Duration,
        mut stopping: watch::Receiver<bool>,
    ) {
        let deadline = tokio::time::Instant::now() + timeout;
        // Parts seen per node, for a node whose parts come out of order.
        let mut seen: HashMap<NodeId, u64> = HashMap::new();
        while !self.waiting.is_empty() {
            let item = tokio::select! {
                () = stopped(&mut stopping) => {
                    let _ = tx.send(Err(Status::unavailable("the controller is stopping"))).await;
                    return;
                }
                () = tx.closed() => return,
                () = tokio::time::sleep_until(deadline) => {
                    let mut missing: Vec<String> =
                        self.waiting.iter().map(ToString::to_string).collect();
                    missing.sort();
                    let _ = tx.send(Err(Status::deadline_exceeded(format!(
                        "log {}: no complete answer within {timeout:?} from {}",
                        self.correlation_id,
                        missing.join(", ")
                    )))).await;
                    return;
                }
                item = events.recv() => item,
            };
            let event = match item {
                Ok(event) => event,
                Err(broadcast::error::RecvError::Lagged(skipped)) => {
                    let _ = tx
                        .send(Err(Status::data_loss(format!(
                            "log {}: {skipped} events were skipped while collecting parts",
                            self.correlation_id
                        ))))
                        .await;
                    return;
                }
                Err(broadcast::error::RecvError::Closed) => return,
            };
            if !self.waiting.contains(&event.node_id) {
                continue;
            }
            match &event.body {
                EventBody::Log(part) if part.correlation_id == self.correlation_id => {
                    let count = seen.entry(event.node_id.clone()).or_default();
                    *count += 1;
                    let last = part.status != LogStatus::Ok
                        || part.part_count == 0
                        || *count >= part.part_count;
                    if last {
                        self.waiting.remove(&event.node_id);
                    }
                    let message = pb::LogPart {
                        node_id: event.node_id.to_string(),
                        data: Some(part.clone().into()),
                        node_ids: self.asked.clone(),
                    };
                    if tx.send(Ok(message)).await.is_err() {
                        return;
                    }
                }
                EventBody::Disconnected(reason) => {
                    let _ = tx
                        .send(Err(Status::unavailable(format!(
                            "log {}: node {} went away before its log was complete ({reason})",
                            self.correlation_id, event.node_id
                        ))))
                        .await;
                    return;
                }
                _ => {}
            }
        }
    }
}

/// A serving admin API.
#[derive(Debug)]
pub struct AdminServer {
    endpoint: AdminEndpoint,
    stop: Arc<watch::Sender<bool>>,
    task: JoinHandle<()>,
}

impl AdminServer {
    /// Where it serves (for TCP, with the port actually bound).
    pub fn endpoint(&self) -> &AdminEndpoint {
        &self.endpoint
    }

    /// Stops serving: every event and log stream ends, the socket file is removed.
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        let mut task = self.task;
        if tokio::time::timeout(STOP_GRACE, &mut task).await.is_err() {
            task.abort();
        }
        if let AdminEndpoint::Unix(path) = &self.endpoint {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// Refuses a TCP endpoint that is not a loopback address: the admin API has no authentication
/// of its own, so it must never be reachable from the network (nor by SMs).
pub fn check_endpoint(endpoint: &AdminEndpoint) -> Result<(), ServeError> {
    match endpoint {
        AdminEndpoint::Tcp(addr) if !addr.ip().is_loopback() => Err(ServeError::NotLoopback(*addr)),
        _ => Ok(()),
    }
}

/// Serves `service` on `endpoint`: a Unix socket (its directory created if missing, a stale
/// socket file replaced, mode 0660) or a loopback TCP address. Fails if the address is not
/// loopback, or if another live process serves on the socket.
pub async fn serve(
    endpoint: &AdminEndpoint,
    service: AdminService,
) -> Result<AdminServer, ServeError> {
    let io = |source| ServeError::Io {
        endpoint: endpoint.clone(),
        source,
    };
    let stop = service.stop.clone();
    let mut stopping = service.stopping.clone();
    let shutdown = async move {
        let _ = stopping.wait_for(|s| *s).await;
    };
    let router = tonic::transport::Server::builder().add_service(AdminServiceServer::new(service));
    match endpoint {
        AdminEndpoint::Tcp(addr) => {
            check_endpoint(endpoint)?;
            let listener = TcpListener::bind(addr).await.map_err(io)?;
            let bound = listener.local_addr().map_err(io)?;
            let incoming = TcpListenerStream::new(listener);
            let task = tokio::spawn(async move {
                if let Err(e) = router
                    .serve_with_incoming_shutdown(incoming, shutdown)
                    .await
                {
                    warn!(error = %e, "admin server ended with an error");
                }
            });
            Ok(AdminServer {
                endpoint: AdminEndpoint::Tcp(bound),
                stop,
                task,
            })
        }
        AdminEndpoint::Unix(path) => {
            let listener = bind_unix(path).await.map_err(|e| match e {
                BindUnix::InUse => ServeError::InUse(path.clone()),
                BindUnix::Io(source) => io(source),
            })?;
            let incoming = UnixListenerStream::new(listener);
            let task = tokio::spawn(async move {
                if let Err(e) = router
                    .serve_with_incoming_shutdown(incoming, shutdown)
                    .await
                {
                    warn!(error = %e, "admin server ended with an error");
                }
            });
            Ok(AdminServer {
                endpoint: endpoint.clone(),
                stop,
                task,
            })
        }
    }
}

enum BindUnix {
    InUse,
    Io(std::io::Error),
}

/// Binds a Unix socket at `path` with mode 0660, replacing a stale socket file (one nobody
/// answers on).
async fn bind_unix(path: &Path) -> Result<UnixListener, BindUnix> {
    use std::os::unix::fs::{DirBuilderExt, FileTypeExt, PermissionsExt};
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o750)
            .create(dir)
            .map_err(BindUnix::Io)?;
    }
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(BindUnix::Io(std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                "the path exists and is not a socket",
            )));
        }
        if tokio::net::UnixStream::connect(path).await.is_ok() {
            return Err(BindUnix::InUse);
        }
        std::fs::remove_file(path).map_err(BindUnix::Io)?;
    }
    let listener = UnixListener::bind(path).map_err(BindUnix::Io)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(SOCKET_MODE))
        .map_err(BindUnix::Io)?;
    Ok(listener)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_parse() {
        assert_eq!(
            "unix:/run/x.sock".parse(),
            Ok(AdminEndpoint::Unix("/run/x.sock".into()))
        );
        assert_eq!(
            "/run/x.sock".parse(),
            Ok(AdminEndpoint::Unix("/run/x.sock".into()))
        );
        assert_eq!(
            "127.0.0.1:9000".parse(),
            Ok(AdminEndpoint::Tcp("127.0.0.1:9000".parse().unwrap()))
        );
        assert_eq!(
            "http://localhost:9000".parse(),
            Ok(AdminEndpoint::Tcp("127.0.0.1:9000".parse().unwrap()))
        );
        let bad = "nonsense".parse::<AdminEndpoint>().unwrap_err();
        assert!(bad.to_string().contains("nonsense"), "{bad}");
        assert!("unix:".parse::<AdminEndpoint>().is_err());
    }

    #[test]
    fn errors_map_to_grpc_codes() {
        use tonic::Code;
        let node = NodeId::new("n");
        let cases = [
            (Error::not_found(node.clone()), Code::NotFound),
            (
                Error::Timeout {
                    node: node.clone(),
                    request: "get_node_config_status",
                    after: Duration::from_secs(1),
                },
                Code::DeadlineExceeded,
            ),
            (
                Error::Disconnected {
                    node,
                    request: "get_average_monitoring",
                },
                Code::Unavailable,
            ),
            (Error::InvalidArgument("x".into()), Code::InvalidArgument),
            (
                Error::Failed {
                    aos_code: 1,
                    exit_code: 0,
                    message: "bad".into(),
                },
                Code::FailedPrecondition,
            ),
            (Error::Transport("t".into()), Code::Internal),
        ];
        for (error, code) in cases {
            assert_eq!(status_of(error).code(), code);
        }
    }

    #[test]
    fn empty_node_id_names_the_field() {
        let status = node_id("").unwrap_err();
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        assert!(status.message().starts_with("node_id:"));
    }

    #[test]
    fn bad_timestamps_name_the_field() {
        let status = system_time(
            "from",
            prost_types::Timestamp {
                seconds: 1,
                nanos: -1,
            },
        )
        .unwrap_err();
        assert!(status.message().starts_with("from:"), "{status:?}");
    }

    #[test]
    fn tcp_endpoints_must_be_loopback() {
        let err =
            check_endpoint(&AdminEndpoint::Tcp("192.0.2.1:9000".parse().unwrap())).unwrap_err();
        assert!(matches!(err, ServeError::NotLoopback(_)), "{err}");
        assert!(check_endpoint(&AdminEndpoint::Tcp("[::1]:9000".parse().unwrap())).is_ok());
        assert!(check_endpoint(&AdminEndpoint::Unix("/x".into())).is_ok());
    }
}
