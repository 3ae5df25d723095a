//! The controller: node registry, command routing and sync calls, cloud status relay,
//! shutdown. Implements every provided interface of `smcontroller-api`.

use std::{
    sync::{
        Arc, Mutex, OnceLock, PoisonError,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    time::SystemTime,
};

use async_trait::async_trait;
use futures::Stream;
use smcontroller_api::{
    CloudConnection, Error, InstanceIdent, InstanceRunner, LogProvider, LogRequest, LogType,
    MonitoringProvider, NetworkProvider, NodeConfig, NodeConfigHandler, NodeConfigStatus, NodeId,
    NodeMonitoringData, NodeNetwork, Result, SmProtocol, StartInstance, UpdateNetworkParameters,
};
use smcontroller_limits::{Budget, Refusals, WarnGate};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::{debug, info, warn};

use crate::{
    Receivers, Settings,
    lifecycle::{Backlog, Commands, Link, Registry, SendError},
    message::{InboundEvent, LogQuery, Outbound},
    meters,
    session::{self, Context},
    subscriptions::Subscriptions,
    waiters::{Reply, ReplyKind, TimedOut},
};

/// Why [`Controller::attach`] did not take a stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AttachError {
    /// The router is stopping; no new streams are taken.
    #[error("the SM controller is shutting down")]
    ShuttingDown,
    /// As many streams as allowed have not sent `sm_info` yet (R-BAD-2).
    #[error(
        "too many SM streams waiting to register: {0} have not sent sm_info yet \
         (maxPendingStreams)"
    )]
    PendingStreams(usize),
}

/// The largest command a transport can send, and how it measures one.
#[derive(Debug, Clone, Copy)]
pub struct CommandLimit {
    /// Bytes a command may take on the wire.
    pub max_bytes: usize,
    /// The size of a command as the transport would encode it.
    pub size_of: fn(&Outbound) -> usize,
}

/// The transport's [`CommandLimit`], with the sizes of the commands that have no body measured
/// once (the sync status reads are the most frequent commands).
#[derive(Debug)]
struct Measure {
    limit: CommandLimit,
    get_node_config_status: usize,
    get_average_monitoring: usize,
}

/// What the controller can tell of one registered node's stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeStatus {
    /// The stream's session number (unique per controller, increasing).
    pub session: u64,
    /// How often its inbound queue was full, pausing the stream (R-TEL-2).
    pub stalls: u64,
    /// Whether the stream is paused right now, waiting for the receivers.
    pub stalled: bool,
    /// When the stream registered.
    pub connected_at: Option<SystemTime>,
    /// When its last message was read.
    pub last_message_at: Option<SystemTime>,
    /// Messages queued for the receivers.
    pub queued_messages: usize,
    /// Their bytes, as sent on the wire (R-BAD-2).
    pub queued_bytes: usize,
    /// Commands waiting to be written to the node.
    pub backlog_commands: usize,
    /// Their bytes.
    pub backlog_bytes: usize,
}

/// The SM controller's router. Cheap to clone; all clones are one controller.
///
/// A transport calls [`attach`](Self::attach) for each new SM stream; CM modules call the
/// provided traits (`NodeConfigHandler`, `InstanceRunner`, ...); [`shutdown`](Self::shutdown)
/// ends everything. Which stream a node id's commands go to, and in which order the receivers
/// hear of its streams, is decided in one place: the registry of `lifecycle.rs`.
#[derive(Clone)]
pub struct Controller {
    ctx: Arc<Context>,
    settings: Arc<Settings>,
    next_session: Arc<AtomicU64>,
    command_limit: Arc<OnceLock<Measure>>,
    subscriptions: Subscriptions,
    network: Option<Arc<dyn NetworkProvider>>,
}

impl std::fmt::Debug for Controller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Controller")
            .field("settings", &self.settings)
            .field("nodes", &self.node_count())
            .finish_non_exhaustive()
    }
}

impl Controller {
    /// A controller with no nodes; the cloud is taken as disconnected until told otherwise.
    pub fn new(settings: Settings, receivers: Receivers) -> Self {
        let shutdown = CancellationToken::new();
        Self {
            subscriptions: Subscriptions::new(settings.max_nodes, shutdown.clone()),
            ctx: Arc::new(Context {
                registry: Arc::new(Registry::new(settings.max_nodes)),
                receivers,
                registration_timeout: settings.registration_timeout,
                queue_bound: settings.queue_bound,
                queue_bytes: settings.inbound_queue_bytes,
                refusals: Refusals::new(),
                pending: AtomicUsize::new(0),
                waiting: Mutex::default(),
                refused_early: WarnGate::default(),
                shutdown,
                cut: CancellationToken::new(),
                tracker: TaskTracker::new(),
                ended: AtomicU64::new(0),
            }),
            command_limit: Arc::new(OnceLock::new()),
            settings: Arc::new(settings),
            next_session: Arc::new(AtomicU64::new(0)),
            network: None,
        }
    }

    /// The CM's network manager, which answers 9.1 nodes' `NetworkService` calls (R-NET-1).
    /// Set it before the controller is cloned or served.
    pub fn with_network_provider(mut self, provider: Arc<dyn NetworkProvider>) -> Self {
        self.network = Some(provider);
        self
    }

    /// The network manager, if one was given.
    pub fn network_provider(&self) -> Option<Arc<dyn NetworkProvider>> {
        self.network.clone()
    }

    /// The settings in force.
    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// The firewall-update subscriptions of 9.1 nodes (R-NET-3): the transport subscribes
    /// nodes there, the network manager pushes through it ([`FirewallUpdates`](smcontroller_api::FirewallUpdates)). A handle of
    /// its own, so that the network manager need not hold the controller. All end at the
    /// [`shutdown`](Self::shutdown).
    pub fn firewall_updates(&self) -> Subscriptions {
        self.subscriptions.clone()
    }

    /// Takes a new SM stream. `inbound` is what the SM sends, converted by the transport; the
    /// returned [`Commands`] yield what to write back, ending with one
    /// [`Outgoing::Close`](crate::Outgoing::Close). The first item is always the current cloud
    /// status (R-REG-1).
    ///
    /// Must be called within a tokio runtime: it spawns the stream's reader task (and, once the
    /// SM registers, its dispatcher task).
    ///
    /// At [`Settings::max_pending_streams`] (streams not registered yet) the oldest of them is
    /// ended (`RESOURCE_EXHAUSTED`) and its place goes to the new one, counted as
    /// [`Budget::PendingStreams`]: a real SM sends `sm_info` as soon as its stream is open, so
    /// streams that hold their place without registering are the ones to go, and a peer that
    /// opens streams and waits cannot keep a new SM out. A stream is refused only if no place
    /// can be freed.
    pub fn attach<S>(&self, inbound: S) -> Result<Commands, AttachError>
    where
        S: Stream<Item = InboundEvent> + Send + Unpin + 'static,
    {
        if self.ctx.shutdown.is_cancelled() {
            return Err(AttachError::ShuttingDown);
        }
        let max = self.settings.max_pending_streams;
        let mut waiting = self
            .ctx
            .waiting
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let taken = self
            .ctx
            .pending
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            });
        if taken.is_err() {
            // Full: the oldest stream still waiting gives its place (it is not given back, so
            // the count stays).
            self.ctx.refusals.count(Budget::PendingStreams);
            let freed = std::iter::from_fn(|| waiting.pop_first())
                .filter_map(|(_, link)| link.upgrade())
                .any(|link| link.evict());
            if !freed {
                return Err(AttachError::PendingStreams(max));
            }
        }
        let id = self.next_session.fetch_add(1, Ordering::Relaxed);
        let backlog = Backlog {
            commands: self.settings.outbound_backlog.max(1),
            bytes: self.settings.outbound_backlog_bytes,
        };
        let link = Arc::new(Link::new(
            id,
            self.settings.response_timeout,
            self.settings.reply_expiry(),
            backlog,
            self.ctx.refusals.clone(),
            &self.ctx.shutdown,
        ));
        // The entry goes when the stream registers or ends (`session::Pending`).
        waiting.insert(id, Arc::downgrade(&link));
        drop(waiting);
        link.send_cloud(self.ctx.registry.cloud_connected());
        let commands = Commands::new(link.clone());
        // The stream is boxed: held by value, it was stored three times over in the reader's
        // state (the arguments of `run` and of `read`, and the registration's state), 408
        // bytes each for the gRPC stream; boxed, the reader's future went from 2,504 to 1,304
        // bytes per node (N-PERF-3 memory).
        self.ctx
            .spawn(session::run(self.ctx.clone(), link, Box::new(inbound)));
        Ok(commands)
    }

    /// How many streams the eviction order of unregistered streams holds: one per stream that
    /// has neither registered nor ended, so 0 once every stream has, however many came and
    /// went (N-LEAK-2).
    pub fn waiting_streams(&self) -> usize {
        self.ctx
            .waiting
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    /// How many streams were attached since the controller was made (refused ones not
    /// counted). With [`streams_ended`](Self::streams_ended), what says that streams came and
    /// went: the daemon returns freed memory once both have stood still for a while.
    pub fn streams_attached(&self) -> u64 {
        self.next_session.load(Ordering::Relaxed)
    }

    /// How many attached streams have ended (their reader has), since the controller was
    /// made.
    pub fn streams_ended(&self) -> u64 {
        self.ctx.ended.load(Ordering::Relaxed)
    }

    /// The registered nodes, sorted.
    pub fn nodes(&self) -> Vec<NodeId> {
        let mut nodes = self.ctx.registry.nodes();
        nodes.sort();
        nodes
    }

    /// How many nodes are registered.
    pub fn node_count(&self) -> usize {
        self.ctx.registry.node_count()
    }

    /// How many node ids the controller holds state for: registered ones, and ones whose last
    /// stream has ended but whose *disconnected* is still being reported. It returns to 0 once
    /// every stream has ended, however many ids came and went (N-LEAK-1).
    pub fn node_slots(&self) -> usize {
        self.ctx.registry.slot_count()
    }

    /// How many tasks of the controller are running: two per registered stream (reader and
    /// dispatcher), one per stream not yet registered, one to follow the cloud connection.
    pub fn live_tasks(&self) -> usize {
        self.ctx.tracker.len()
    }

    /// How often each budget was reached (R-BAD-2), counted by this controller and by the
    /// transport serving it: one set per server.
    pub fn refusals(&self) -> Refusals {
        self.ctx.refusals.clone()
    }

    /// How many streams have not sent `sm_info` yet.
    pub fn pending_streams(&self) -> usize {
        self.ctx.pending.load(Ordering::Acquire)
    }

    /// Sets the largest command the transport can send: a call with a larger one fails with
    /// `InvalidArgument` and the stream goes on (R-BAD-2). Its measure also weighs the
    /// commands in each node's backlog. Only the first call takes effect; a transport makes
    /// it when it starts serving.
    pub fn limit_commands(&self, limit: CommandLimit) {
        let _ = self.command_limit.set(Measure {
            get_node_config_status: (limit.size_of)(&Outbound::GetNodeConfigStatus),
            get_average_monitoring: (limit.size_of)(&Outbound::GetAverageMonitoring),
            limit,
        });
    }

    /// What the controller can tell of a registered node's stream; `None` if not registered.
    pub fn node_status(&self, node: &NodeId) -> Option<NodeStatus> {
        let link = self.ctx.registry.link(node)?;
        let (queued_messages, queued_bytes) = link.inbound_depth.get().map_or((0, 0), |f| f());
        let (backlog_commands, backlog_bytes) = link.backlog();
        Some(NodeStatus {
            connected_at: link.registered_at.get().copied(),
            last_message_at: link.last_message_at(),
            queued_messages,
            queued_bytes,
            backlog_commands,
            backlog_bytes,
            session: link.session,
            stalls: link.stalls.load(Ordering::Relaxed),
            stalled: link.stalled.load(Ordering::Relaxed),
        })
    }

    /// Sets the unit's cloud connection state and forwards it as `connection_status` to every
    /// registered node (R-CLOUD-1). Nodes that already have that state are not told twice.
    pub fn set_cloud_connected(&self, connected: bool) {
        let nodes = self.ctx.registry.set_cloud(connected);
        info!(connected, nodes, "cloud connection status relayed");
    }

    /// Ends every registered SM stream with `UNAVAILABLE`, reporting each node's disconnect
    /// (reason [`Shutdown`](smcontroller_api::DisconnectReason::Shutdown)) once, without
    /// stopping: the SMs reconnect. For a server that restarts with renewed credentials
    /// (R-TLS-3). Calls waiting on those streams fail with `Disconnected`.
    pub fn restart_streams(&self) -> usize {
        let streams = self.ctx.registry.restart_all();
        info!(streams, "every SM stream ended for a server restart");
        streams
    }

    /// Follows a [`CloudConnection`]: takes its current state, then relays every change
    /// until the controller shuts down.
    pub fn follow_cloud(&self, cloud: &dyn CloudConnection) {
        let mut changes = cloud.subscribe();
        self.set_cloud_connected(cloud.is_connected());
        let this = self.clone();
        let stop = self.ctx.shutdown.clone();
        self.ctx.spawn(async move {
            loop {
                tokio::select! {
                    () = stop.cancelled() => break,
                    changed = changes.changed() => {
                        if changed.is_err() {
                            debug!("cloud connection publisher gone");
                            break;
                        }
                        let connected = *changes.borrow_and_update();
                        this.set_cloud_connected(connected);
                    }
                }
            }
        });
    }

    /// Stops: refuses new streams, closes every stream (each node the receivers heard of as
    /// connected is reported disconnected), and returns once every task of the router has ended
    /// (R-STOP-1). Tasks still running after the shutdown grace (a receiver that never returns)
    /// are cut.
    pub async fn shutdown(&self) {
        self.ctx.shutdown.cancel();
        self.ctx.tracker.close();
        let grace = self.settings.shutdown_grace;
        if tokio::time::timeout(grace, self.ctx.tracker.wait())
            .await
            .is_err()
        {
            warn!(
                tasks = self.ctx.tracker.len(),
                ?grace,
                "sessions did not finish within the shutdown grace; cutting them"
            );
            self.ctx.cut.cancel();
            self.ctx.tracker.wait().await;
        }
        info!("SM controller router stopped");
    }

    /// Whether [`shutdown`](Self::shutdown) has begun.
    pub fn is_shutting_down(&self) -> bool {
        self.ctx.shutdown.is_cancelled()
    }

    fn link(&self, node: &NodeId) -> Result<Arc<Link>> {
        self.ctx
            .registry
            .link(node)
            .ok_or_else(|| Error::not_found(node.clone()))
    }

    /// The size of `command` on the wire (0 with no transport limit), or `InvalidArgument` if
    /// it is too large to send.
    fn measure(&self, node: &NodeId, command: &Outbound) -> Result<usize> {
        let Some(measure) = self.command_limit.get() else {
            return Ok(0);
        };
        let limit = &measure.limit;
        let size = match command {
            Outbound::GetNodeConfigStatus => measure.get_node_config_status,
            Outbound::GetAverageMonitoring => measure.get_average_monitoring,
            _ => (limit.size_of)(command),
        };
        if size > limit.max_bytes {
            self.ctx.refusals.count(Budget::CommandSize);
            return Err(Error::InvalidArgument(format!(
                "{} for node {node} is {size} bytes encoded, over the message size limit of {} \
                 bytes; not sent",
                command.name(),
                limit.max_bytes
            )));
        }
        Ok(size)
    }

    /// The error of a send that did not queue.
    fn send_error(node: &NodeId, request: &'static str, error: SendError) -> Error {
        match error {
            SendError::Closed => Error::Disconnected {
                node: node.clone(),
                request,
            },
            SendError::Backlog { commands, bytes } => Error::ResourceExhausted(format!(
                "node {node} does not read its commands: {commands} commands ({bytes} bytes) \
                 wait to be written (outboundBacklog); {request} not sent"
            )),
        }
    }

    fn send(&self, node: &NodeId, command: Outbound) -> Result<()> {
        let request = command.name();
        let size = self.measure(node, &command)?;
        self.link(node)?
            .send(command, size)
            .map_err(|e| Self::send_error(node, request, e))
    }

    /// Sends `command` and waits for the reply of `kind` (R-SYNC-1, R-SYNC-3).
    async fn call(&self, node: &NodeId, command: Outbound, kind: ReplyKind) -> Result<Reply> {
        let request = command.name();
        let kind_index = command.kind_index();
        let disconnected = || Error::Disconnected {
            node: node.clone(),
            request,
        };
        // The reply's place is taken with the command, so no reply can outrun it, and a caller
        // that gives up leaves the place to absorb its own late reply. The deadline is kept
        // with it: the stream's reader tells the caller when it has passed (R-SYNC-1).
        let size = self.measure(node, &command)?;
        let (answer, sent) = self
            .link(node)?
            .send_sync(command, size, kind)
            .map_err(|e| Self::send_error(node, request, e))?;
        match answer.await {
            Ok(Ok(reply)) => {
                meters::round_trip(kind_index, request, sent.elapsed().as_secs_f64());
                Ok(reply)
            }
            Ok(Err(TimedOut { withdrawn })) => {
                metrics::counter!("smcontroller_sync_timeouts_total", "command" => request)
                    .increment(1);
                if withdrawn {
                    debug!(
                        request,
                        "the node did not read the command in time; not sent"
                    );
                }
                Err(Error::Timeout {
                    node: node.clone(),
                    request,
                    after: self.settings.response_timeout,
                })
            }
            Err(_) => Err(disconnected()),
        }
    }

    /// Sends a node config command and waits for its `node_config_status`, whole (R-SYNC-1).
    async fn node_config_call(
        &self,
        node: &NodeId,
        command: Outbound,
        version: Option<String>,
    ) -> Result<NodeConfigStatus> {
        match self
            .call(node, command, ReplyKind::NodeConfig(version))
            .await?
        {
            Reply::NodeConfig(status) => Ok(status),
            Reply::AverageMonitoring(_) => unreachable!("waiters only take matching replies"),
        }
    }

    /// Check and set: a node-reported error is `Failed` (R-SYNC-1).
    async fn node_config_change(
        &self,
        node: &NodeId,
        command: Outbound,
        version: &str,
    ) -> Result<()> {
        let status = self
            .node_config_call(node, command, Some(version.to_owned()))
            .await?;
        match status.error {
            Some(error) => Err(error.into()),
            None => Ok(()),
        }
    }
}

#[async_trait]
impl NodeConfigHandler for Controller {
    async fn check_node_config(&self, node: &NodeId, config: &NodeConfig) -> Result<()> {
        let command = Outbound::CheckNodeConfig(Box::new(config.clone()));
        self.node_config_change(node, command, &config.version)
            .await
    }

    async fn update_node_config(&self, node: &NodeId, config: &NodeConfig) -> Result<()> {
        let command = Outbound::SetNodeConfig(Box::new(config.clone()));
        self.node_config_change(node, command, &config.version)
            .await
    }

    /// The node's status whole, its error included: a node whose configuration failed answers
    /// with state `failed` and the error, and that is a normal answer (R-SYNC-1).
    async fn get_node_config_status(&self, node: &NodeId) -> Result<NodeConfigStatus> {
        self.node_config_call(node, Outbound::GetNodeConfigStatus, None)
            .await
    }
}

#[async_trait]
impl MonitoringProvider for Controller {
    async fn get_average_monitoring(&self, node: &NodeId) -> Result<NodeMonitoringData> {
        match self
            .call(
                node,
                Outbound::GetAverageMonitoring,
                ReplyKind::AverageMonitoring,
            )
            .await?
        {
            Reply::AverageMonitoring(data) => Ok(data),
            Reply::NodeConfig(_) => unreachable!("waiters only take matching replies"),
        }
    }
}

#[async_trait]
impl InstanceRunner for Controller {
    async fn update_instances(
        &self,
        node: &NodeId,
        stop: &[InstanceIdent],
        start: &[StartInstance],
    ) -> Result<()> {
        if self.settings.sm_protocol == SmProtocol::V9_1
            && let Some(with_network) = start.iter().find(|s| s.network.is_some())
        {
            let ident = &with_network.info.ident;
            return Err(Error::NotSupported(format!(
                "instance {}/{}/{} carries network parameters, but this unit speaks the Aos 9.1 \
                 wire revision (smProtocol 9.1), where nodes get their networks from \
                 NetworkService",
                ident.item_id, ident.subject_id, ident.instance
            )));
        }
        self.send(
            node,
            Outbound::UpdateInstances {
                stop: stop.to_vec(),
                start: start.to_vec(),
            },
        )
    }
}

#[async_trait]
impl NodeNetwork for Controller {
    async fn update_networks(
        &self,
        node: &NodeId,
        networks: &[UpdateNetworkParameters],
    ) -> Result<()> {
        if self.settings.sm_protocol == SmProtocol::V9_1 {
            return Err(Error::NotSupported(
                "update_networks is not part of the Aos 9.1 wire revision this unit speaks \
                 (smProtocol 9.1): 9.1 nodes get their networks from NetworkService"
                    .to_owned(),
            ));
        }
        self.send(node, Outbound::UpdateNetworks(networks.to_vec()))
    }
}

#[async_trait]
impl LogProvider for Controller {
    async fn request_log(&self, request: &LogRequest) -> Result<()> {
        if request
            .instance_filter
            .instance
            .is_some_and(|i| i64::try_from(i).is_err())
        {
            return Err(Error::InvalidArgument(format!(
                "log request {}: instance filter {} does not fit the wire's int64",
                request.correlation_id,
                request.instance_filter.instance.unwrap_or_default()
            )));
        }
        // Look every node up first, under one lock: either all are there or nothing is sent.
        let links = self
            .ctx
            .registry
            .links(&request.node_ids)
            .map_err(|nodes| Error::NotFound { nodes })?;
        let query = LogQuery {
            correlation_id: request.correlation_id.clone(),
            filter: request.instance_filter.clone(),
            from: request.from,
            till: request.till,
        };
        let mut failed = None;
        for (node, link) in links {
            let command = match request.log_type {
                LogType::System => Outbound::SystemLog(Box::new(query.clone())),
                LogType::Instance => Outbound::InstanceLog(Box::new(query.clone())),
                LogType::Crash => Outbound::CrashLog(Box::new(query.clone())),
            };
            let request = command.name();
            let sent = self.measure(&node, &command).and_then(|size| {
                link.send(command, size)
                    .map_err(|e| Self::send_error(&node, request, e))
            });
            // A node that left a moment ago, or does not read: the others still get theirs.
            if let Err(e) = sent {
                failed.get_or_insert(e);
            }
        }
        match failed {
            None => Ok(()),
            Some(e) => Err(e),
        }
    }
}
