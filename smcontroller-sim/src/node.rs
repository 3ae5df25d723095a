//! One simulated node: its connection loop, its stream session and what it answers.
//!
//! A node handles its stream as a real SM does: serially, one command at a time, so its replies
//! come in the order of the commands. Everything it reports carries an `error`, empty when
//! nothing failed. A node config it cannot read gets no reply at all. Before it reports an
//! instance started it resolves the instance's manifest digest with `GetBlobsInfos` on its own
//! connection. Its reconnect delay is fixed. It ignores a `connection_status` that repeats the
//! cloud status it has.
//!
//! Under the 9.1 wire revision a session also does what [`network`](super::network) describes:
//! it subscribes to its network updates before `RegisterSM`, syncs its network state before it
//! reads its stream, and prepares and releases the networks of the instances it starts and
//! stops. Its commands come in the 9.1 envelope and are converted at the edge
//! ([`CommandStream`]) into the 9.0 one, so that everything else handles them alike.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use serde_json::Value;
use smcontroller_api::SmProtocol;
use smcontroller_grpc::proto::common::v2::InstanceIdent;
use smcontroller_grpc::proto::servicemanager::v5::{
    BlobsInfosRequest, InstanceStatus, SmIncomingMessages, SmOutgoingMessages, UpdateInstances,
    sm_incoming_messages::SmIncomingMessage, sm_outgoing_messages::SmOutgoingMessage,
    sm_service_client::SmServiceClient,
};
use smcontroller_grpc::proto::v91::servicemanager::v5 as pb91;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::{Instant, MissedTickBehavior};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::Streaming;
use tonic::transport::{Channel, ClientTlsConfig};
use tracing::{debug, info, warn};

use super::config::{Answers, Behaviour, Registration, SimConfig};
use super::events::{EventBus, SimEventKind};
use super::messages;
use super::network::{self, Calls, NetworkState, Networks};
use super::stats::{CommandKind, NodeCounters, NodeStats};
use super::{SimError, endpoint};

/// Largest message the simulator encodes or decodes.
const MAX_MESSAGE_SIZE: usize = 64 << 20;

/// Most messages one pacing tick sends; a backlog beyond it is dropped, not caught up.
const MAX_BATCH: u64 = 1_000;

/// Longest wait for the controller's answer to `GetBlobsInfos`.
const BLOBS_TIMEOUT: Duration = Duration::from_secs(10);

/// What all nodes of one simulation share.
pub(crate) struct SimContext {
    pub(crate) config: SimConfig,
    pub(crate) stop: CancellationToken,
    pub(crate) events: Arc<EventBus>,
    pub(crate) registered: watch::Sender<usize>,
}

impl SimContext {
    pub(crate) fn emit(&self, node: &NodeShared, kind: SimEventKind) {
        self.events.emit(&node.id, kind);
    }
}

/// The state of a node that outlives its streams (a real SM keeps it across reconnects).
#[derive(Debug)]
struct NodeState {
    config_state: String,
    config_version: String,
    instances: Vec<InstanceStatus>,
}

/// The open stream of a node, for sends on demand.
#[derive(Clone)]
pub(crate) struct Link {
    pub(crate) tx: mpsc::Sender<SmOutgoingMessages>,
    pub(crate) channel: Channel,
    pub(crate) session: CancellationToken,
}

/// A simulated node: identity, behaviour, counters and persistent state.
pub(crate) struct NodeShared {
    pub(crate) index: usize,
    pub(crate) id: Arc<str>,
    pub(crate) behaviour: Behaviour,
    /// The node's TLS settings (its client certificate), when the simulation uses mTLS.
    tls: Option<ClientTlsConfig>,
    pub(crate) counters: NodeCounters,
    pub(crate) connected: AtomicBool,
    pub(crate) registered: AtomicBool,
    state: Mutex<NodeState>,
    /// The networks `NetworkService` gave the node (9.1), kept across reconnects.
    pub(crate) network: Mutex<NetworkState>,
    link: Mutex<Option<Link>>,
    instances_generation: AtomicU64,
    monitoring_seq: AtomicU64,
    alert_seq: AtomicU64,
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl NodeShared {
    pub(crate) fn new(index: usize, config: &SimConfig, tls: Option<ClientTlsConfig>) -> Self {
        Self {
            index,
            id: config.node_id(index).into(),
            behaviour: config.behaviour_for(index).clone(),
            tls,
            counters: NodeCounters::default(),
            connected: AtomicBool::new(false),
            registered: AtomicBool::new(false),
            state: Mutex::new(NodeState {
                config_state: config.initial_config_state.clone(),
                config_version: config.initial_config_version.clone(),
                instances: messages::initial_instances(config.instances),
            }),
            network: Mutex::default(),
            link: Mutex::new(None),
            instances_generation: AtomicU64::new(0),
            monitoring_seq: AtomicU64::new(0),
            alert_seq: AtomicU64::new(0),
        }
    }

    pub(crate) fn link(&self) -> Option<Link> {
        lock(&self.link).clone()
    }

    pub(crate) fn networks(&self) -> Networks {
        lock(&self.network).snapshot()
    }

    fn instances(&self) -> (u64, Vec<InstanceStatus>) {
        let state = lock(&self.state);
        (
            self.instances_generation.load(Ordering::Acquire),
            state.instances.clone(),
        )
    }

    fn config_status(&self) -> (String, String) {
        let state = lock(&self.state);
        (state.config_state.clone(), state.config_version.clone())
    }

    pub(crate) fn stats(&self) -> NodeStats {
        let (config_state, config_version) = self.config_status();
        NodeStats {
            node_id: self.id.to_string(),
            connected: self.connected.load(Ordering::Relaxed),
            registered: self.registered.load(Ordering::Relaxed),
            last_cloud_status: self.counters.last_cloud_status(),
            config_state,
            config_version,
            counters: self.counters.snapshot(),
        }
    }

    fn next_monitoring_seq(&self) -> u64 {
        self.monitoring_seq.fetch_add(1, Ordering::Relaxed)
    }
}

/// The sending half of one stream, counting what it sends.
#[derive(Clone)]
pub(crate) struct Outbound {
    pub(crate) tx: mpsc::Sender<SmOutgoingMessages>,
    pub(crate) node: Arc<NodeShared>,
    pub(crate) events: Arc<EventBus>,
    pub(crate) session: CancellationToken,
}

impl Outbound {
    /// Queues `msg` on the stream, waiting for room (HTTP/2 flow control) unless the session ends.
    pub(crate) async fn send(&self, msg: SmOutgoingMessages) -> Result<(), SimError> {
        let kind = msg
            .sm_outgoing_message
            .as_ref()
            .map(SmOutgoingMessage::kind);
        let copy = self.events.active().then(|| msg.clone());
        let sent = tokio::select! {
            biased;
            () = self.session.cancelled() => false,
            r = self.tx.send(msg) => r.is_ok(),
        };
        if !sent {
            return Err(SimError::NotConnected(self.node.id.to_string()));
        }
        self.node.counters.sent(kind);
        if let Some(msg) = copy {
            self.events.emit(&self.node.id, SimEventKind::Sent(msg));
        }
        Ok(())
    }

    /// Sends `count` `instant_monitoring` messages as fast as flow control allows.
    pub(crate) async fn burst(&self, count: u64) -> Result<u64, SimError> {
        let (_, instances) = self.node.instances();
        for n in 0..count {
            let msg = messages::instant_monitoring(&instances, self.node.next_monitoring_seq());
            if let Err(e) = self.send(msg).await {
                debug!(node = %self.node.id, sent = n, "burst cut short");
                return Err(e);
            }
        }
        Ok(count)
    }
}

/// How a session ended.
enum SessionEnd {
    /// The simulator stops.
    Stopped,
    /// No stream could be opened.
    Failed(String),
    /// An open stream ended.
    Ended(String),
}

/// Runs node `node` until the simulation stops: connect, register, serve, reconnect after the
/// fixed [`SimConfig::reconnect_delay`] (the same every time, as a real SM's: no backoff).
pub(crate) async fn run_node(node: Arc<NodeShared>, ctx: Arc<SimContext>) {
    let stagger = ctx
        .config
        .start_stagger
        .saturating_mul(u32::try_from(node.index).unwrap_or(u32::MAX));
    if !stagger.is_zero() {
        tokio::select! {
            () = ctx.stop.cancelled() => return,
            () = tokio::time::sleep(stagger) => {}
        }
    }
    loop {
        match session(&node, &ctx).await {
            SessionEnd::Stopped => break,
            SessionEnd::Failed(reason) => {
                NodeCounters::bump(&node.counters.connect_failures);
                debug!(node = %node.id, %reason, "connection attempt failed");
                ctx.emit(&node, SimEventKind::ConnectFailed { reason });
            }
            SessionEnd::Ended(reason) => {
                info!(node = %node.id, %reason, "stream ended; reconnecting");
            }
        }
        tokio::select! {
            () = ctx.stop.cancelled() => break,
            () = tokio::time::sleep(ctx.config.reconnect_delay) => {}
        }
    }
    debug!(node = %node.id, "node stopped");
}

/// The command stream of a session, in the envelope of the node's wire revision. Commands
/// come out of it in the 9.0 envelope (a 9.1 one converted at this edge: the monitoring
/// parameters in their place, no network), so that the rest of the node handles both alike.
enum CommandStream {
    V9_0(Streaming<SmIncomingMessages>),
    V9_1(Streaming<pb91::SmIncomingMessages>),
}

impl CommandStream {
    /// Calls `RegisterSM` with the client of `protocol`, the node's messages coming from `rx`.
    async fn register(
        protocol: SmProtocol,
        channel: Channel,
        rx: mpsc::Receiver<SmOutgoingMessages>,
    ) -> Result<Self, tonic::Status> {
        let outgoing = ReceiverStream::new(rx);
        match protocol {
            SmProtocol::V9_0 => SmServiceClient::new(channel)
                .max_decoding_message_size(MAX_MESSAGE_SIZE)
                .max_encoding_message_size(MAX_MESSAGE_SIZE)
                .register_sm(outgoing)
                .await
                .map(|r| Self::V9_0(r.into_inner())),
            SmProtocol::V9_1 => pb91::sm_service_client::SmServiceClient::new(channel)
                .max_decoding_message_size(MAX_MESSAGE_SIZE)
                .max_encoding_message_size(MAX_MESSAGE_SIZE)
                .register_sm(outgoing)
                .await
                .map(|r| Self::V9_1(r.into_inner())),
        }
    }

    /// The next command, in the 9.0 envelope; `None` when the stream ended.
    async fn message(&mut self) -> Result<Option<SmIncomingMessages>, tonic::Status> {
        match self {
            Self::V9_0(stream) => stream.message().await,
            Self::V9_1(stream) => Ok(stream.message().await?.map(SmIncomingMessages::from)),
        }
    }
}

/// One connection: open a channel, register, serve the stream until it ends.
///
/// Under 9.1 the node first subscribes to its network updates on the new connection (the
/// subscription lives as long as the session), and once the stream is open it syncs its
/// network state before it reads the first command.
async fn session(node: &Arc<NodeShared>, ctx: &Arc<SimContext>) -> SessionEnd {
    let endpoint = match endpoint(&ctx.config, node.tls.as_ref()) {
        Ok(e) => e,
        Err(e) => return SessionEnd::Failed(e.to_string()),
    };
    let channel = tokio::select! {
        () = ctx.stop.cancelled() => return SessionEnd::Stopped,
        r = endpoint.connect() => match r {
            Ok(c) => c,
            Err(e) => return SessionEnd::Failed(format!("connect: {e}")),
        },
    };
    let token = ctx.stop.child_token();
    // Whichever way the session ends, everything of it ends (the subscription too).
    let _end_of_session = token.clone().drop_guard();
    let calls = (ctx.config.sm_protocol == SmProtocol::V9_1).then(|| Calls {
        node: node.clone(),
        events: ctx.events.clone(),
        channel: channel.clone(),
        session: token.clone(),
    });
    let subscription = match &calls {
        Some(calls) => {
            // The reference's subscription thread races RegisterSM; here the first attempt
            // is answered (or fails) first, so that a controller sees the same order every
            // time.
            let (opened, first) = oneshot::channel();
            let task = tokio::spawn(network::subscribe(
                calls.clone(),
                ctx.config.reconnect_delay,
                opened,
            ));
            tokio::select! {
                () = ctx.stop.cancelled() => return SessionEnd::Stopped,
                _ = first => {}
            }
            Some(task)
        }
        None => None,
    };
    let (tx, rx) = mpsc::channel(ctx.config.outbound_capacity.max(8));
    let out = Outbound {
        tx,
        node: node.clone(),
        events: ctx.events.clone(),
        session: token.clone(),
    };
    // The registration messages go first, before the call even starts: the controller may
    // wait for `sm_info` before it answers the call.
    if let Err(e) = send_registration(node, &out).await {
        return SessionEnd::Failed(e.to_string());
    }
    let response = tokio::select! {
        () = ctx.stop.cancelled() => return SessionEnd::Stopped,
        r = CommandStream::register(ctx.config.sm_protocol, channel.clone(), rx) => r,
    };
    let mut inbound = match response {
        Ok(stream) => stream,
        Err(status) => return SessionEnd::Failed(format!("RegisterSM: {status}")),
    };

    let connects = node.counters.connects.fetch_add(1, Ordering::Relaxed) + 1;
    node.connected.store(true, Ordering::Relaxed);
    *lock(&node.link) = Some(Link {
        tx: out.tx.clone(),
        channel: channel.clone(),
        session: token.clone(),
    });
    debug!(node = %node.id, connects, "stream open");
    ctx.emit(node, SimEventKind::Connected { connects });

    let producer = tokio::spawn(produce(out.clone(), ctx.clone()));
    let mut serve = Serve {
        node: node.clone(),
        ctx: ctx.clone(),
        out,
        channel,
        calls,
    };
    let end = serve.run(&mut inbound).await;

    token.cancel();
    *lock(&node.link) = None;
    node.connected.store(false, Ordering::Relaxed);
    NodeCounters::bump(&node.counters.disconnects);
    drop(serve);
    drop(inbound);
    let _ = producer.await;
    if let Some(subscription) = subscription {
        let _ = subscription.await;
    }
    let reason = match &end {
        SessionEnd::Stopped => "simulator stopped".to_owned(),
        SessionEnd::Failed(r) | SessionEnd::Ended(r) => r.clone(),
    };
    ctx.emit(node, SimEventKind::Disconnected { reason });
    end
}

async fn send_registration(node: &NodeShared, out: &Outbound) -> Result<(), SimError> {
    let (_, instances) = node.instances();
    match node.behaviour.registration {
        Registration::Normal => {
            out.send(messages::sm_info(&node.id)).await?;
            out.send(messages::node_instances_status(&instances))
                .await?;
        }
        Registration::EmptyNodeId => {
            out.send(messages::sm_info("")).await?;
            out.send(messages::node_instances_status(&instances))
                .await?;
        }
        Registration::SkipSmInfo => {
            out.send(messages::node_instances_status(&instances))
                .await?;
        }
        Registration::Silent => {}
    }
    if node.behaviour.garbage.empty_oneof {
        out.send(messages::empty()).await?;
    }
    Ok(())
}

/// The reading side of one open stream: it handles one command at a time, in order.
struct Serve {
    node: Arc<NodeShared>,
    ctx: Arc<SimContext>,
    out: Outbound,
    /// The node's connection, for the unary calls a real SM makes on it (`GetBlobsInfos`).
    channel: Channel,
    /// Its `NetworkService` calls, under 9.1.
    calls: Option<Calls>,
}

impl Serve {
    /// Serves the open stream: under 9.1 the network state is synced first, before the first
    /// command is read (R-NET-2: the controller answers without reading the stream first).
    async fn run(&mut self, inbound: &mut CommandStream) -> SessionEnd {
        if let Some(calls) = &self.calls
            && calls.sync().await.is_err()
        {
            return if self.ctx.stop.is_cancelled() {
                SessionEnd::Stopped
            } else {
                SessionEnd::Ended("stream dropped by the simulator".to_owned())
            };
        }
        self.read_loop(inbound).await
    }

    async fn read_loop(&mut self, inbound: &mut CommandStream) -> SessionEnd {
        let mut first = true;
        loop {
            let next = tokio::select! {
                biased;
                () = self.out.session.cancelled() => {
                    return if self.ctx.stop.is_cancelled() {
                        SessionEnd::Stopped
                    } else {
                        SessionEnd::Ended("stream dropped by the simulator".to_owned())
                    };
                }
                m = inbound.message() => m,
            };
            match next {
                Ok(Some(msg)) => {
                    if first {
                        first = false;
                        self.mark_registered();
                    }
                    if let Err(e) = self.handle(msg).await {
                        debug!(node = %self.node.id, error = %e, "reply not sent");
                    }
                }
                Ok(None) => {
                    return SessionEnd::Ended("stream closed by the controller".to_owned());
                }
                Err(status) => return SessionEnd::Ended(format!("stream error: {status}")),
            }
        }
    }

    fn mark_registered(&self) {
        if self.node.behaviour.registration == Registration::Normal
            && !self.node.registered.swap(true, Ordering::AcqRel)
        {
            self.ctx.registered.send_modify(|n| *n += 1);
        }
    }

    fn not_connected(&self) -> SimError {
        SimError::NotConnected(self.node.id.to_string())
    }

    /// Waits as long as handling one command takes ([`Answers::Delayed`]; no time otherwise).
    /// The read loop awaits the handling, so the next command waits behind this one.
    async fn handling_time(&self) -> Result<(), SimError> {
        if let Answers::Delayed(delay) = self.node.behaviour.answers {
            tokio::select! {
                () = self.out.session.cancelled() => return Err(self.not_connected()),
                () = tokio::time::sleep(delay) => {}
            }
        }
        Ok(())
    }

    /// Sends the replies to the command being handled, once its handling time has passed.
    async fn answer(&self, replies: Vec<SmOutgoingMessages>) -> Result<(), SimError> {
        self.handling_time().await?;
        for reply in replies {
            self.out.send(reply).await?;
        }
        Ok(())
    }

    /// Like [`Serve::answer`] for a sync request, which [`Answers::Never`] leaves unanswered.
    async fn answer_sync(&self, reply: SmOutgoingMessages) -> Result<(), SimError> {
        if self.node.behaviour.answers == Answers::Never {
            return Ok(());
        }
        self.answer(vec![reply]).await
    }

    /// Whether the node can read the node config `document` of a `command`. When it cannot it
    /// logs why, and the command gets no reply at all, as from a real SM.
    fn readable_config(&self, command: &str, version: &str, document: &str) -> bool {
        match node_group_subject(document) {
            Ok(subject) => {
                debug!(node = %self.node.id, command, version, node_group_subject = %subject, "node config read");
                true
            }
            Err(why) => {
                warn!(node = %self.node.id, command, version, %why, "cannot parse the node config: no reply, as from a real SM");
                false
            }
        }
    }

    fn vocabulary<'a>(&self, value: &'a str) -> &'a str {
        if self.node.behaviour.garbage.bad_vocabulary {
            messages::BOGUS
        } else {
            value
        }
    }

    async fn handle(&mut self, msg: SmIncomingMessages) -> Result<(), SimError> {
        let kind = CommandKind::of(&msg);
        self.node.counters.command(kind);
        if self.ctx.events.active() {
            self.ctx
                .emit(&self.node, SimEventKind::Received(msg.clone()));
        }
        let Some(msg) = msg.sm_incoming_message else {
            warn!(node = %self.node.id, "command with an empty oneof");
            return Ok(());
        };
        match msg {
            SmIncomingMessage::GetNodeConfigStatus(_) => {
                let (state, version) = self.node.config_status();
                let reply = messages::node_config_status(self.vocabulary(&state), &version, None);
                self.answer_sync(reply).await
            }
            SmIncomingMessage::CheckNodeConfig(req) => {
                if !self.readable_config("check_node_config", &req.version, &req.node_config) {
                    return Ok(());
                }
                let (state, _) = self.node.config_status();
                let reply =
                    messages::node_config_status(self.vocabulary(&state), &req.version, None);
                self.answer_sync(reply).await
            }
            SmIncomingMessage::SetNodeConfig(req) => {
                if !self.readable_config("set_node_config", &req.version, &req.node_config) {
                    return Ok(());
                }
                {
                    let mut state = lock(&self.node.state);
                    "installed".clone_into(&mut state.config_state);
                    state.config_version.clone_from(&req.version);
                }
                let reply =
                    messages::node_config_status(self.vocabulary("installed"), &req.version, None);
                self.answer_sync(reply).await
            }
            SmIncomingMessage::GetAverageMonitoring(_) => {
                let (_, instances) = self.node.instances();
                let seq = self.node.next_monitoring_seq();
                self.answer_sync(messages::average_monitoring(&instances, seq))
                    .await
            }
            SmIncomingMessage::UpdateInstances(req) => self.update_instances(req).await,
            SmIncomingMessage::SystemLogRequest(req) => self.send_log(&req.correlation_id).await,
            SmIncomingMessage::InstanceLogRequest(req) => self.send_log(&req.correlation_id).await,
            SmIncomingMessage::InstanceCrashLogRequest(req) => {
                self.send_log(&req.correlation_id).await
            }
            SmIncomingMessage::ConnectionStatus(status) => {
                let cloud_status = status.cloud_status;
                if self.node.counters.set_cloud_status(cloud_status) {
                    debug!(node = %self.node.id, cloud_status, "cloud status changed");
                } else {
                    debug!(node = %self.node.id, cloud_status, "cloud status repeated: ignored");
                }
                Ok(())
            }
            SmIncomingMessage::UpdateNetworks(req) => {
                self.node
                    .counters
                    .networks_received
                    .fetch_add(req.networks.len() as u64, Ordering::Relaxed);
                Ok(())
            }
        }
    }

    /// Stops and starts instances as a real SM does. It first resolves the manifest digests
    /// of the instances to start with `GetBlobsInfos` on the node's connection, and only then
    /// reports. The `update_instances_status` lists the started instances alone: `active`, or
    /// `failed` with an error naming the digest when the call failed; after a stop alone it
    /// lists none.
    ///
    /// Under 9.1 the networks of the instances to stop are released first, and each instance
    /// to start whose manifest was resolved gets its network before it is reported: `failed`
    /// with the error of `NetworkService` when that fails.
    async fn update_instances(&self, req: UpdateInstances) -> Result<(), SimError> {
        if let Some(calls) = &self.calls {
            for ident in &req.stop_instances {
                calls.release(ident).await?;
            }
        }
        let mut statuses = Vec::with_capacity(req.start_instances.len());
        if !req.start_instances.is_empty() {
            let digests = req
                .start_instances
                .iter()
                .map(|info| info.manifest_digest.clone())
                .collect();
            let resolved = self.resolve_blobs(digests).await?;
            for info in &req.start_instances {
                let network_error = match (&resolved, &self.calls) {
                    (Ok(()), Some(calls)) => calls.prepare(info).await?,
                    _ => None,
                };
                let status = match &resolved {
                    Ok(()) if network_error.is_some() => {
                        messages::instance_status(info, self.vocabulary("failed"), network_error)
                    }
                    Ok(()) => messages::instance_status(info, self.vocabulary("active"), None),
                    Err(why) => {
                        let error = messages::failure(format!(
                            "can't resolve manifest {}: {why}",
                            info.manifest_digest
                        ));
                        messages::instance_status(info, self.vocabulary("failed"), Some(error))
                    }
                };
                statuses.push(status);
            }
        }
        {
            let mut state = lock(&self.node.state);
            for ident in &req.stop_instances {
                state
                    .instances
                    .retain(|s| !same_instance(s.instance.as_ref(), ident));
            }
            for status in &statuses {
                if let Some(ident) = &status.instance {
                    state
                        .instances
                        .retain(|s| !same_instance(s.instance.as_ref(), ident));
                }
                state.instances.push(status.clone());
            }
            self.node
                .instances_generation
                .fetch_add(1, Ordering::Release);
        }
        self.answer(vec![messages::update_instances_status(statuses)])
            .await
    }

    /// Calls `GetBlobsInfos` with `digests` on the node's connection: `Ok(Ok(()))` when it
    /// answers one URL per digest, `Ok(Err(why))` when it fails, `Err` when the stream ends
    /// first.
    async fn resolve_blobs(&self, digests: Vec<String>) -> Result<Result<(), String>, SimError> {
        let count = digests.len();
        let mut client = SmServiceClient::new(self.channel.clone());
        let call = tokio::time::timeout(
            BLOBS_TIMEOUT,
            client.get_blobs_infos(BlobsInfosRequest { digests }),
        );
        let result = tokio::select! {
            () = self.out.session.cancelled() => return Err(self.not_connected()),
            r = call => r,
        };
        let resolved = match result {
            Err(_) => Err(format!(
                "GetBlobsInfos got no answer within {BLOBS_TIMEOUT:?}"
            )),
            Ok(Err(status)) => Err(format!(
                "GetBlobsInfos failed: {:?}: {}",
                status.code(),
                status.message()
            )),
            Ok(Ok(reply)) => match reply.into_inner().urls.len() {
                n if n == count => Ok(()),
                n => Err(format!(
                    "GetBlobsInfos answered {n} URLs for {count} digests"
                )),
            },
        };
        if let Err(why) = &resolved {
            warn!(node = %self.node.id, %why, "manifests not resolved: instances failed");
        }
        Ok(resolved)
    }

    async fn send_log(&self, correlation_id: &str) -> Result<(), SimError> {
        self.answer(messages::log_parts(
            correlation_id,
            2,
            self.vocabulary("ok"),
        ))
        .await
    }
}

/// Reads a node config document as far as a real SM needs to accept it: a JSON object with
/// `nodeGroupSubject.codename` a string, keys matched regardless of case (`node` and the rest
/// are optional). Returns the node group subject, or why the document cannot be read.
///
/// Written here rather than taken from the api crate, so that the simulator checks the
/// documents the controller writes with code of its own.
fn node_group_subject(document: &str) -> Result<String, String> {
    fn key<'a>(value: &'a Value, name: &str) -> Option<&'a Value> {
        value
            .as_object()?
            .iter()
            .find_map(|(k, v)| k.eq_ignore_ascii_case(name).then_some(v))
    }
    let value: Value = serde_json::from_str(document).map_err(|e| format!("not JSON: {e}"))?;
    if !value.is_object() {
        return Err("not a JSON object".to_owned());
    }
    let subject = key(&value, "nodeGroupSubject").ok_or("no nodeGroupSubject")?;
    match key(subject, "codename").and_then(Value::as_str) {
        Some(codename) => Ok(codename.to_owned()),
        None => Err("nodeGroupSubject has no codename string".to_owned()),
    }
}

fn same_instance(a: Option<&InstanceIdent>, b: &InstanceIdent) -> bool {
    a.is_some_and(|a| {
        a.item_id == b.item_id && a.subject_id == b.subject_id && a.instance == b.instance
    })
}

/// Paces messages at a rate: how many are due at each tick.
#[derive(Debug)]
pub(crate) struct Pacer {
    rate: f64,
    start: Instant,
    sent: u64,
}

impl Pacer {
    pub(crate) fn new(rate: f64, start: Instant) -> Self {
        Self {
            rate,
            start,
            sent: 0,
        }
    }

    /// The period one message takes at this rate (`None` when off).
    pub(crate) fn period(&self) -> Option<Duration> {
        (self.rate > 0.0).then(|| Duration::from_secs_f64(1.0 / self.rate))
    }

    /// Messages due at `now` and not sent yet (at most [`MAX_BATCH`]; counted as sent).
    pub(crate) fn due(&mut self, now: Instant) -> u64 {
        if self.rate <= 0.0 {
            return 0;
        }
        let elapsed = now.saturating_duration_since(self.start).as_secs_f64();
        // Truncation is the point: whole messages only.
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        let target = (self.rate * elapsed + 1e-9).floor() as u64;
        let due = target.saturating_sub(self.sent);
        if due > MAX_BATCH {
            // Too far behind (flow control): forget the backlog.
            self.sent = target;
            return MAX_BATCH;
        }
        self.sent = target;
        due
    }
}

/// Sends the unsolicited messages of one session: the burst, then monitoring and alerts.
async fn produce(out: Outbound, ctx: Arc<SimContext>) {
    let node = out.node.clone();
    if ctx.config.burst > 0 && out.burst(ctx.config.burst).await.is_err() {
        return;
    }
    let start = Instant::now();
    let mut monitoring = Pacer::new(ctx.config.monitoring_rate, start);
    let mut alerts = Pacer::new(ctx.config.alert_rate, start);
    let period = match (monitoring.period(), alerts.period()) {
        (Some(a), Some(b)) => a.min(b),
        (Some(p), None) | (None, Some(p)) => p,
        (None, None) => return,
    };
    let period = period.max(Duration::from_millis(1));
    let mut ticker = tokio::time::interval_at(start + period, period);
    ticker.set_missed_tick_behavior(MissedTickBehavior::Skip);
    let (mut generation, mut instances) = node.instances();
    let garbage = node.behaviour.garbage;
    loop {
        tokio::select! {
            () = out.session.cancelled() => return,
            _ = ticker.tick() => {}
        }
        let now = Instant::now();
        let current = node.instances_generation.load(Ordering::Acquire);
        if current != generation {
            (generation, instances) = node.instances();
        }
        for _ in 0..monitoring.due(now) {
            let msg = messages::instant_monitoring(&instances, node.next_monitoring_seq());
            if out.send(msg).await.is_err() {
                return;
            }
        }
        for _ in 0..alerts.due(now) {
            if garbage.empty_oneof && out.send(messages::empty()).await.is_err() {
                return;
            }
            let seq = node.alert_seq.fetch_add(1, Ordering::Relaxed);
            let ident = instances
                .get(seq as usize % instances.len().max(1))
                .and_then(|s| s.instance.clone())
                .unwrap_or_else(|| messages::instance_ident(0));
            let msg = messages::alert(
                seq,
                &ident,
                garbage.bad_vocabulary,
                !garbage.alert_without_timestamp,
            );
            if out.send(msg).await.is_err() {
                return;
            }
        }
    }
}
