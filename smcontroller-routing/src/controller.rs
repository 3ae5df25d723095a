//! The controller: node registry, command routing and sync calls, cloud status relay,
//! shutdown. Implements every provided interface of `smcontroller-api`.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex, RwLock,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
};

use async_trait::async_trait;
use futures::Stream;
use smcontroller_api::{
    CloudConnection, Error, InstanceIdent, InstanceInfo, InstanceRunner, LogProvider, LogRequest,
    LogType, MonitoringProvider, NodeConfig, NodeConfigHandler, NodeConfigStatus, NodeId,
    NodeMonitoringData, NodeNetwork, Result, UpdateNetworkParameters,
};
use tokio::{sync::mpsc, task::AbortHandle};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::{debug, info, warn};

use crate::{
    Receivers, Settings,
    message::{InboundEvent, LogQuery, Outbound},
    session::{self, Link},
    waiters::{Reply, ReplyKind},
};

/// What the router gives the transport to write on one SM stream, in order.
// Commands are nearly every item; `Close` comes once per stream, so boxing the large variant
// would add an allocation per command to save nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum Outgoing {
    /// A command to send.
    Command(Outbound),
    /// The stream is over: finish the response, with this error status if `Some`. Nothing
    /// follows it.
    Close(Option<EndStatus>),
}

/// Why the controller ended a stream, for the transport to turn into a status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndStatus {
    /// The kind of end.
    pub code: EndCode,
    /// Words for the SM's log.
    pub message: String,
}

/// The kinds of stream end the controller causes (mapped to gRPC codes by the transport).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EndCode {
    /// The SM broke the protocol (no `sm_info` first, empty or changed node id).
    InvalidArgument,
    /// No `sm_info` within the registration timeout.
    DeadlineExceeded,
    /// A newer stream of the same node replaced this one.
    Aborted,
    /// The controller is stopping or restarting.
    Unavailable,
}

/// The router is stopping; no new streams are taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the SM controller is shutting down")]
pub struct ShuttingDown;

pub(crate) struct Inner {
    pub(crate) settings: Settings,
    pub(crate) receivers: Receivers,
    pub(crate) nodes: RwLock<HashMap<NodeId, Arc<Link>>>,
    /// Serialises cloud status changes so the last one set is the last one sent.
    cloud_lock: Mutex<()>,
    pub(crate) cloud: AtomicBool,
    pub(crate) shutdown: CancellationToken,
    tracker: TaskTracker,
    next_session: AtomicU64,
    /// Abort handles of live session tasks, for a shutdown whose grace runs out.
    tasks: Mutex<HashMap<u64, Vec<AbortHandle>>>,
}

/// The SM controller's router. Cheap to clone; all clones are one controller.
///
/// A transport calls [`attach`](Self::attach) for each new SM stream; CM modules call the
/// provided traits (`NodeConfigHandler`, `InstanceRunner`, ...); [`shutdown`](Self::shutdown)
/// ends everything.
#[derive(Clone)]
pub struct Controller {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Controller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Controller")
            .field("settings", &self.inner.settings)
            .field("nodes", &self.node_count())
            .finish_non_exhaustive()
    }
}

impl Controller {
    /// A controller with no nodes; the cloud is taken as disconnected until told otherwise.
    pub fn new(settings: Settings, receivers: Receivers) -> Self {
        Self {
            inner: Arc::new(Inner {
                settings,
                receivers,
                nodes: RwLock::new(HashMap::new()),
                cloud_lock: Mutex::new(()),
                cloud: AtomicBool::new(false),
                shutdown: CancellationToken::new(),
                tracker: TaskTracker::new(),
                next_session: AtomicU64::new(0),
                tasks: Mutex::new(HashMap::new()),
            }),
        }
    }

    /// The settings in force.
    pub fn settings(&self) -> &Settings {
        &self.inner.settings
    }

    /// Takes a new SM stream. `inbound` is what the SM sends, converted by the transport; the
    /// returned receiver yields what to write back, ending with one [`Outgoing::Close`].
    /// The first item is always the current cloud status (R-REG-1).
    ///
    /// Must be called within a tokio runtime: it spawns the stream's reader task (and, once the
    /// SM registers, its dispatcher task).
    pub fn attach<S>(&self, inbound: S) -> Result<mpsc::UnboundedReceiver<Outgoing>, ShuttingDown>
    where
        S: Stream<Item = InboundEvent> + Send + Unpin + 'static,
    {
        if self.inner.shutdown.is_cancelled() {
            return Err(ShuttingDown);
        }
        let (out_tx, out_rx) = mpsc::unbounded_channel();
        let id = self.inner.next_session.fetch_add(1, Ordering::Relaxed);
        let link = Arc::new(Link::new(id, out_tx));
        link.send_cloud(self.inner.cloud.load(Ordering::SeqCst));
        let inner = self.inner.clone();
        let handle = self.inner.tracker.spawn(session::run(inner, link, inbound));
        self.inner.track(id, handle.abort_handle());
        Ok(out_rx)
    }

    /// The registered nodes, sorted.
    pub fn nodes(&self) -> Vec<NodeId> {
        let mut nodes: Vec<_> = read(&self.inner.nodes).keys().cloned().collect();
        nodes.sort();
        nodes
    }

    /// How many nodes are registered.
    pub fn node_count(&self) -> usize {
        read(&self.inner.nodes).len()
    }

    /// Sets the unit's cloud connection state and forwards it as `connection_status` to every
    /// registered node (R-CLOUD-1). Nodes that already have that state are not told twice.
    pub fn set_cloud_connected(&self, connected: bool) {
        let _order = self
            .inner
            .cloud_lock
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        self.inner.cloud.store(connected, Ordering::SeqCst);
        let links: Vec<Arc<Link>> = read(&self.inner.nodes).values().cloned().collect();
        for link in &links {
            link.send_cloud(connected);
        }
        info!(
            connected,
            nodes = links.len(),
            "cloud connection status relayed"
        );
    }

    /// Follows a [`CloudConnection`]: takes its current state, then relays every change
    /// until the controller shuts down.
    pub fn follow_cloud(&self, cloud: &dyn CloudConnection) {
        let mut changes = cloud.subscribe();
        self.set_cloud_connected(cloud.is_connected());
        let this = self.clone();
        let stop = self.inner.shutdown.clone();
        self.inner.tracker.spawn(async move {
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

    /// Stops: refuses new streams, closes every stream (each registered node's disconnect is
    /// reported), and returns once every task of the router has ended (R-STOP-1). Tasks still
    /// running after the shutdown grace (a receiver that never returns) are aborted.
    pub async fn shutdown(&self) {
        self.inner.shutdown.cancel();
        self.inner.tracker.close();
        if tokio::time::timeout(
            self.inner.settings.shutdown_grace,
            self.inner.tracker.wait(),
        )
        .await
        .is_err()
        {
            let stuck: Vec<AbortHandle> = lock(&self.inner.tasks)
                .drain()
                .flat_map(|(_, handles)| handles)
                .collect();
            warn!(
                tasks = stuck.len(),
                "sessions did not finish within the shutdown grace; aborting them"
            );
            for handle in stuck {
                handle.abort();
            }
            self.inner.tracker.wait().await;
        }
        info!("SM controller router stopped");
    }

    /// Whether [`shutdown`](Self::shutdown) has begun.
    pub fn is_shutting_down(&self) -> bool {
        self.inner.shutdown.is_cancelled()
    }

    fn link(&self, node: &NodeId) -> Result<Arc<Link>> {
        read(&self.inner.nodes)
            .get(node)
            .cloned()
            .ok_or_else(|| Error::not_found(node.clone()))
    }

    fn send(&self, node: &NodeId, command: Outbound) -> Result<()> {
        let name = command.name();
        self.link(node)?
            .send(command)
            .map_err(|()| Error::Disconnected {
                node: node.clone(),
                request: name,
            })
    }

    /// Sends `command` and waits for the reply of `kind` (R-SYNC-1).
    async fn call(&self, node: &NodeId, command: Outbound, kind: ReplyKind) -> Result<Reply> {
        let request = command.name();
        let disconnected = || Error::Disconnected {
            node: node.clone(),
            request,
        };
        let link = self.link(node)?;
        // The waiter exists before the command leaves, so no reply can outrun it.
        let mut waiter = link.wait_for(kind).ok_or_else(disconnected)?;
        link.send(command).map_err(|()| disconnected())?;
        let after = self.inner.settings.response_timeout;
        match tokio::time::timeout(after, &mut waiter.rx).await {
            Ok(Ok(reply)) => Ok(reply),
            Ok(Err(_)) => Err(disconnected()),
            Err(_) => {
                waiter.forget();
                // The reply may have landed between the deadline and forgetting the waiter.
                match waiter.rx.try_recv() {
                    Ok(reply) => Ok(reply),
                    Err(_) => Err(Error::Timeout {
                        node: node.clone(),
                        request,
                        after,
                    }),
                }
            }
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
        let command = Outbound::CheckNodeConfig(config.clone());
        self.node_config_change(node, command, &config.version)
            .await
    }

    async fn update_node_config(&self, node: &NodeId, config: &NodeConfig) -> Result<()> {
        let command = Outbound::SetNodeConfig(config.clone());
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
        let links: Vec<(NodeId, Arc<Link>)> = {
            let nodes = read(&self.inner.nodes);
            if request.node_ids.is_empty() {
                nodes.iter().map(|(n, l)| (n.clone(), l.clone())).collect()
            } else {
                let missing: Vec<NodeId> = request
                    .node_ids
                    .iter()
                    .filter(|n| !nodes.contains_key(*n))
                    .cloned()
                    .collect();
                if !missing.is_empty() {
                    return Err(Error::NotFound { nodes: missing });
                }
                request
                    .node_ids
                    .iter()
                    .map(|n| (n.clone(), nodes[n].clone()))
                    .collect()
            }
        };
        let query = LogQuery {
            correlation_id: request.correlation_id.clone(),
            filter: request.instance_filter.clone(),
            from: request.from,
            till: request.till,
        };
        let mut gone = Vec::new();
        for (node, link) in links {
            let command = match request.log_type {
                LogType::System => Outbound::SystemLog(query.clone()),
                LogType::Instance => Outbound::InstanceLog(query.clone()),
                LogType::Crash => Outbound::CrashLog(query.clone()),
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

impl Inner {
    pub(crate) fn tracker_spawn<F>(&self, task: F) -> AbortHandle
    where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        self.tracker.spawn(task).abort_handle()
    }

    pub(crate) fn track(&self, session: u64, handle: AbortHandle) {
        lock(&self.tasks).entry(session).or_default().push(handle);
    }

    pub(crate) fn untrack(&self, session: u64) {
        lock(&self.tasks).remove(&session);
    }
}

pub(crate) fn read<T>(lock: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    lock.read()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

pub(crate) fn write<T>(lock: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    lock.write()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

pub(crate) fn lock<T>(lock: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    lock.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}
