//! The controller: node registry, command routing and sync calls, cloud status relay,
//! shutdown. Implements every provided interface of `smcontroller-api`.

use std::sync::{
    Arc,
    atomic::{AtomicU64, Ordering},
};

use async_trait::async_trait;
use futures::Stream;
use smcontroller_api::{
    CloudConnection, Error, InstanceIdent, InstanceInfo, InstanceRunner, LogProvider, LogRequest,
    LogType, MonitoringProvider, NodeConfig, NodeConfigHandler, NodeConfigStatus, NodeId,
    NodeMonitoringData, NodeNetwork, Result, UpdateNetworkParameters,
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::{debug, info, warn};

use crate::{
    Receivers, Settings,
    lifecycle::{Commands, Link, Registry},
    message::{InboundEvent, LogQuery, Outbound},
    session::{self, Context},
    waiters::{Reply, ReplyKind},
};

/// The router is stopping; no new streams are taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the SM controller is shutting down")]
pub struct ShuttingDown;

/// What the controller can tell of one registered node's stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeStatus {
    /// The stream's session number (unique per controller, increasing).
    pub session: u64,
    /// How often its inbound queue was full, pausing the stream (R-TEL-2).
    pub stalls: u64,
    /// Whether the stream is paused right now, waiting for the receivers.
    pub stalled: bool,
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
        Self {
            ctx: Arc::new(Context {
                registry: Arc::new(Registry::default()),
                receivers,
                registration_timeout: settings.registration_timeout,
                queue_bound: settings.queue_bound,
                shutdown: CancellationToken::new(),
                cut: CancellationToken::new(),
                tracker: TaskTracker::new(),
            }),
            settings: Arc::new(settings),
            next_session: Arc::new(AtomicU64::new(0)),
        }
    }

    /// The settings in force.
    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// Takes a new SM stream. `inbound` is what the SM sends, converted by the transport; the
    /// returned [`Commands`] yield what to write back, ending with one
    /// [`Outgoing::Close`](crate::Outgoing::Close). The first item is always the current cloud
    /// status (R-REG-1).
    ///
    /// Must be called within a tokio runtime: it spawns the stream's reader task (and, once the
    /// SM registers, its dispatcher task).
    pub fn attach<S>(&self, inbound: S) -> Result<Commands, ShuttingDown>
    where
        S: Stream<Item = InboundEvent> + Send + Unpin + 'static,
    {
        if self.ctx.shutdown.is_cancelled() {
            return Err(ShuttingDown);
        }
        let id = self.next_session.fetch_add(1, Ordering::Relaxed);
        let link = Arc::new(Link::new(id, self.settings.reply_expiry()));
        link.send_cloud(self.ctx.registry.cloud_connected());
        let commands = Commands::new(link.clone());
        self.ctx
            .spawn(session::run(self.ctx.clone(), link, inbound));
        Ok(commands)
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

    /// What the controller can tell of a registered node's stream; `None` if not registered.
    pub fn node_status(&self, node: &NodeId) -> Option<NodeStatus> {
        let link = self.ctx.registry.link(node)?;
        Some(NodeStatus {
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

    fn send(&self, node: &NodeId, command: Outbound) -> Result<()> {
        let request = command.name();
        self.link(node)?
            .send(command)
            .map_err(|_| Error::Disconnected {
                node: node.clone(),
                request,
            })
    }

    /// Sends `command` and waits for the reply of `kind` (R-SYNC-1, R-SYNC-3).
    async fn call(&self, node: &NodeId, command: Outbound, kind: ReplyKind) -> Result<Reply> {
        let request = command.name();
        let disconnected = || Error::Disconnected {
            node: node.clone(),
            request,
        };
        // The reply's place is taken with the command, so no reply can outrun it, and a caller
        // that gives up leaves the place to absorb its own late reply.
        let mut rx = self
            .link(node)?
            .send_sync(command, kind)
            .map_err(|_| disconnected())?;
        let after = self.settings.response_timeout;
        match tokio::time::timeout(after, &mut rx).await {
            Ok(Ok(reply)) => Ok(reply),
            Ok(Err(_)) => Err(disconnected()),
            // The reply may have landed just as the deadline passed.
            Err(_) => rx.try_recv().map_err(|_| Error::Timeout {
                node: node.clone(),
                request,
                after,
            }),
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
        start: &[InstanceInfo],
    ) -> Result<()> {
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
        let mut gone = Vec::new();
        for (node, link) in links {
            let command = match request.log_type {
                LogType::System => Outbound::SystemLog(Box::new(query.clone())),
                LogType::Instance => Outbound::InstanceLog(Box::new(query.clone())),
                LogType::Crash => Outbound::CrashLog(Box::new(query.clone())),
            };
            if link.send(command).is_err() {
                gone.push(node);
            }
        }
        match gone.first() {
            None => Ok(()),
            // It was registered a moment ago; it left while the request went out.
            Some(node) => Err(Error::Disconnected {
                node: node.clone(),
                request: "log request",
            }),
        }
    }
}
