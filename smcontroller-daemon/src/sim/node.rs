//! One simulated node: its connection loop, its stream session and what it answers.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use smcontroller_grpc::proto::common::v2::{ErrorInfo, InstanceIdent};
use smcontroller_grpc::proto::servicemanager::v5::{
    InstanceStatus, SmIncomingMessages, SmOutgoingMessages,
    sm_incoming_messages::SmIncomingMessage, sm_service_client::SmServiceClient,
};
use tokio::sync::{mpsc, watch};
use tokio::time::{Instant, MissedTickBehavior};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::Streaming;
use tonic::transport::Channel;
use tracing::{debug, info, warn};

use super::config::{Answers, Behaviour, Registration, SimConfig};
use super::events::{EventBus, SimEventKind};
use super::messages;
use super::stats::{CommandKind, NodeCounters, NodeStats, SentKind};
use super::{SimError, endpoint};

/// Largest message the simulator encodes or decodes.
const MAX_MESSAGE_SIZE: usize = 64 << 20;

/// Most messages one pacing tick sends; a backlog beyond it is dropped, not caught up.
const MAX_BATCH: u64 = 1_000;

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
    pub(crate) counters: NodeCounters,
    pub(crate) connected: AtomicBool,
    pub(crate) registered: AtomicBool,
    state: Mutex<NodeState>,
    link: Mutex<Option<Link>>,
    instances_generation: AtomicU64,
    monitoring_seq: AtomicU64,
    alert_seq: AtomicU64,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl NodeShared {
    pub(crate) fn new(index: usize, config: &SimConfig) -> Self {
        Self {
            index,
            id: config.node_id(index).into(),
            behaviour: config.behaviour_for(index).clone(),
            counters: NodeCounters::default(),
            connected: AtomicBool::new(false),
            registered: AtomicBool::new(false),
            state: Mutex::new(NodeState {
                config_state: config.initial_config_state.clone(),
                config_version: config.initial_config_version.clone(),
                instances: messages::initial_instances(config.instances),
            }),
            link: Mutex::new(None),
            instances_generation: AtomicU64::new(0),
            monitoring_seq: AtomicU64::new(0),
            alert_seq: AtomicU64::new(0),
        }
    }

    pub(crate) fn link(&self) -> Option<Link> {
        lock(&self.link).clone()
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
        let kind = SentKind::of(&msg);
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

/// Runs node `node` until the simulation stops: connect, register, serve, reconnect.
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

/// One connection: open a channel, register, serve the stream until it ends.
async fn session(node: &Arc<NodeShared>, ctx: &Arc<SimContext>) -> SessionEnd {
    let endpoint = match endpoint(&ctx.config) {
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
    let mut client = SmServiceClient::new(channel.clone())
        .max_decoding_message_size(MAX_MESSAGE_SIZE)
        .max_encoding_message_size(MAX_MESSAGE_SIZE);
    let response = tokio::select! {
        () = ctx.stop.cancelled() => return SessionEnd::Stopped,
        r = client.register_sm(ReceiverStream::new(rx)) => r,
    };
    let mut inbound = match response {
        Ok(r) => r.into_inner(),
        Err(status) => return SessionEnd::Failed(format!("RegisterSM: {status}")),
    };

    let connects = node.counters.connects.fetch_add(1, Ordering::Relaxed) + 1;
    node.connected.store(true, Ordering::Relaxed);
    *lock(&node.link) = Some(Link {
        tx: out.tx.clone(),
        channel,
        session: token.clone(),
    });
    debug!(node = %node.id, connects, "stream open");
    ctx.emit(node, SimEventKind::Connected { connects });

    let producer = tokio::spawn(produce(out.clone(), ctx.clone()));
    let (replies, delayer) = match node.behaviour.answers {
        Answers::Delayed(delay) => {
            let (dtx, drx) = mpsc::channel(1024);
            let task = tokio::spawn(delay_replies(out.clone(), drx));
            (Replies::Delayed(dtx, delay), Some(task))
        }
        Answers::Normal | Answers::Never => (Replies::Direct, None),
    };
    let mut serve = Serve {
        node: node.clone(),
        ctx: ctx.clone(),
        out,
        replies,
    };
    let end = serve.read_loop(&mut inbound).await;

    token.cancel();
    *lock(&node.link) = None;
    node.connected.store(false, Ordering::Relaxed);
    NodeCounters::bump(&node.counters.disconnects);
    drop(serve);
    drop(inbound);
    let _ = producer.await;
    if let Some(task) = delayer {
        let _ = task.await;
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

/// Where replies go.
enum Replies {
    /// Straight onto the stream.
    Direct,
    /// Through the delay queue.
    Delayed(mpsc::Sender<(Instant, SmOutgoingMessages)>, Duration),
}

/// Sends queued replies once they are due, in order.
async fn delay_replies(out: Outbound, mut rx: mpsc::Receiver<(Instant, SmOutgoingMessages)>) {
    loop {
        let (due, msg) = tokio::select! {
            () = out.session.cancelled() => return,
            m = rx.recv() => match m {
                Some(m) => m,
                None => return,
            },
        };
        tokio::select! {
            () = out.session.cancelled() => return,
            () = tokio::time::sleep_until(due) => {}
        }
        if out.send(msg).await.is_err() {
            return;
        }
    }
}

/// The reading side of one open stream.
struct Serve {
    node: Arc<NodeShared>,
    ctx: Arc<SimContext>,
    out: Outbound,
    replies: Replies,
}

impl Serve {
    async fn read_loop(&mut self, inbound: &mut Streaming<SmIncomingMessages>) -> SessionEnd {
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

    async fn reply(&self, msg: SmOutgoingMessages) -> Result<(), SimError> {
        match &self.replies {
            Replies::Direct => self.out.send(msg).await,
            Replies::Delayed(tx, delay) => {
                let due = Instant::now() + *delay;
                tokio::select! {
                    () = self.out.session.cancelled() => Err(SimError::NotConnected(self.node.id.to_string())),
                    r = tx.send((due, msg)) => r.map_err(|_| SimError::NotConnected(self.node.id.to_string())),
                }
            }
        }
    }

    async fn reply_sync(&self, msg: SmOutgoingMessages) -> Result<(), SimError> {
        if self.node.behaviour.answers == Answers::Never {
            return Ok(());
        }
        self.reply(msg).await
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
                self.reply_sync(reply).await
            }
            SmIncomingMessage::CheckNodeConfig(req) => {
                if !valid_node_config(&req.node_config) {
                    // A real SM sends nothing back for a config it cannot parse.
                    warn!(node = %self.node.id, version = %req.version, "unparseable node config: no answer");
                    return Ok(());
                }
                let (state, _) = self.node.config_status();
                let reply =
                    messages::node_config_status(self.vocabulary(&state), &req.version, None);
                self.reply_sync(reply).await
            }
            SmIncomingMessage::SetNodeConfig(req) => {
                let reply = if valid_node_config(&req.node_config) {
                    let mut state = lock(&self.node.state);
                    "installed".clone_into(&mut state.config_state);
                    state.config_version.clone_from(&req.version);
                    drop(state);
                    messages::node_config_status(self.vocabulary("installed"), &req.version, None)
                } else {
                    let error = ErrorInfo {
                        aos_code: messages::AOS_CODE_FAILED,
                        exit_code: 0,
                        message: "can't parse node config".to_owned(),
                    };
                    messages::node_config_status(
                        self.vocabulary("failed"),
                        &req.version,
                        Some(error),
                    )
                };
                self.reply_sync(reply).await
            }
            SmIncomingMessage::GetAverageMonitoring(_) => {
                let (_, instances) = self.node.instances();
                let seq = self.node.next_monitoring_seq();
                self.reply_sync(messages::average_monitoring(&instances, seq))
                    .await
            }
            SmIncomingMessage::UpdateInstances(req) => {
                let mut statuses =
                    Vec::with_capacity(req.stop_instances.len() + req.start_instances.len());
                {
                    let mut state = lock(&self.node.state);
                    for ident in &req.stop_instances {
                        state
                            .instances
                            .retain(|s| !same_instance(s.instance.as_ref(), ident));
                        statuses.push(messages::stopped_status(ident, self.vocabulary("inactive")));
                    }
                    for info in &req.start_instances {
                        let status = messages::started_status(info, self.vocabulary("active"));
                        if let Some(ident) = &info.instance {
                            state
                                .instances
                                .retain(|s| !same_instance(s.instance.as_ref(), ident));
                        }
                        state.instances.push(status.clone());
                        statuses.push(status);
                    }
                    self.node
                        .instances_generation
                        .fetch_add(1, Ordering::Release);
                }
                self.reply(messages::update_instances_status(statuses))
                    .await
            }
            SmIncomingMessage::SystemLogRequest(req) => self.send_log(&req.correlation_id).await,
            SmIncomingMessage::InstanceLogRequest(req) => self.send_log(&req.correlation_id).await,
            SmIncomingMessage::InstanceCrashLogRequest(req) => {
                self.send_log(&req.correlation_id).await
            }
            SmIncomingMessage::ConnectionStatus(status) => {
                self.node.counters.set_cloud_status(status.cloud_status);
                debug!(node = %self.node.id, cloud_status = status.cloud_status, "cloud status");
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

    async fn send_log(&self, correlation_id: &str) -> Result<(), SimError> {
        for part in messages::log_parts(correlation_id, 2, self.vocabulary("ok")) {
            self.reply(part).await?;
        }
        Ok(())
    }
}

/// A node config is valid when it is a JSON object.
fn valid_node_config(text: &str) -> bool {
    matches!(
        serde_json::from_str::<serde_json::Value>(text),
        Ok(serde_json::Value::Object(_))
    )
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
