//! The daemon's default receivers: a [`Recorder`] that logs everything nodes send, keeps the
//! latest state of each connected node, and publishes every event to the admin API's
//! [`EventHub`], so an operator (`smctl`), the demo and tests can see what happens.
//!
//! Start reading at [`Recorder`]; [`Recorder::snapshot`] gives a [`RecorderSnapshot`], and
//! [`Recorder::wait_until`] waits, with a deadline, until a snapshot satisfies a predicate.
//!
//! Each event is a structured `tracing` event with a `node_id` field: `info` for connect,
//! disconnect, `sm_info`, instance snapshots, alerts and log parts; `debug` for each monitoring
//! sample, instance status and env-var status.
//!
//! Memory (contract R-BAD-3): the state of a node (its last `sm_info`, instances and
//! monitoring) is released when it disconnects. What remains of it is a summary (id, time,
//! reason, counts) in a history of the last [`DEPARTED_HISTORY`] departed nodes, so a stream of
//! new node ids cannot grow the daemon's memory. A node that comes back takes its counts from
//! its summary.
//!
//! Cost: an event takes a shared read lock of the node map (a write lock only when a node
//! connects or leaves) and its own node's mutex, held only to update counters and clone the
//! latest value. Nodes never contend with each other on a mutex, no snapshot is built per
//! event, waiters are woken only while someone waits, and events are built for the hub only
//! while an admin client subscribes.

use std::{
    collections::{HashMap, VecDeque},
    sync::{
        Arc, Mutex, MutexGuard, PoisonError, RwLock,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, SystemTime},
};

use async_trait::async_trait;
use smcontroller_admin::{
    directory::{DepartedView, MessageCounts, NodeDirectory, NodeView},
    events::{EventBody, EventHub},
};
use smcontroller_api::{
    AlertsReceiver, EnvVarsStatusSender, InstanceStatusReceiver, LogSender, MonitoringReceiver,
    SmInfoReceiver,
    types::{
        Alert, AlertKind, DisconnectReason, InstanceEnvVarsStatus, InstanceStatus, LogPart, NodeId,
        NodeMonitoringData, SmInfo,
    },
};
use tokio::sync::Notify;
use tracing::{debug, info};

/// How many departed nodes the [`Recorder`] remembers (summaries only).
pub const DEPARTED_HISTORY: usize = 64;

/// How many messages of each kind a node (or all nodes) sent.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    /// `sm_info` messages.
    pub sm_info: u64,
    /// Instance statuses (one per instance of each `update_instances_status`).
    pub instance_status: u64,
    /// `node_instances_status` snapshots.
    pub node_instances_status: u64,
    /// Env-var status batches (one per `update_instances_status` that carries any).
    pub env_vars: u64,
    /// `instant_monitoring` samples.
    pub monitoring: u64,
    /// Alerts.
    pub alert: u64,
    /// Log parts.
    pub log: u64,
}

impl Counts {
    /// All kinds together.
    pub fn total(&self) -> u64 {
        self.sm_info
            + self.instance_status
            + self.node_instances_status
            + self.env_vars
            + self.monitoring
            + self.alert
            + self.log
    }

    fn add(&mut self, other: &Counts) {
        self.sm_info += other.sm_info;
        self.instance_status += other.instance_status;
        self.node_instances_status += other.node_instances_status;
        self.env_vars += other.env_vars;
        self.monitoring += other.monitoring;
        self.alert += other.alert;
        self.log += other.log;
    }

    fn to_admin(self) -> MessageCounts {
        MessageCounts {
            sm_info: self.sm_info,
            instance_status: self.instance_status,
            node_instances_status: self.node_instances_status,
            monitoring: self.monitoring,
            alert: self.alert,
            log: self.log,
        }
    }
}

/// What the [`Recorder`] knows about one node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeSnapshot {
    /// The node.
    pub node_id: NodeId,
    /// Whether it is connected now.
    pub connected: bool,
    /// How many times it connected.
    pub connects: u64,
    /// How many times it disconnected.
    pub disconnects: u64,
    /// Why it last disconnected, if it ever did.
    pub last_disconnect: Option<DisconnectReason>,
    /// Its last `sm_info` (runtimes and resources); released when it disconnects.
    pub sm_info: Option<SmInfo>,
    /// Its last `node_instances_status` snapshot; released when it disconnects.
    pub instances: Option<Vec<InstanceStatus>>,
    /// Its last instant monitoring; released when it disconnects.
    pub monitoring: Option<NodeMonitoringData>,
    /// How many messages of each kind it sent.
    pub counts: Counts,
}

/// A copy of everything the [`Recorder`] knows, taken at one moment.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RecorderSnapshot {
    /// Every connected node, and the departed nodes still in the history, sorted by node id.
    pub nodes: Vec<NodeSnapshot>,
    /// The counts of those nodes added up.
    pub totals: Counts,
}

impl RecorderSnapshot {
    /// The node with this id, if it was seen.
    pub fn node(&self, node_id: &str) -> Option<&NodeSnapshot> {
        self.nodes
            .binary_search_by(|n| n.node_id.as_str().cmp(node_id))
            .ok()
            .map(|i| &self.nodes[i])
    }

    /// How many nodes are connected.
    pub fn connected_nodes(&self) -> usize {
        self.nodes.iter().filter(|n| n.connected).count()
    }
}

/// How much state the [`Recorder`] holds: see [`Recorder::retained`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retained {
    /// Nodes with full state (connected, or sending without having been reported connected).
    pub nodes: usize,
    /// Departed nodes in the history.
    pub departed: usize,
    /// An estimate of the bytes held by both (tables, ids, `sm_info`, instances, monitoring).
    pub bytes: usize,
}

/// The latest state of one node, behind its own mutex.
#[derive(Debug, Default)]
struct NodeState {
    connected: bool,
    connected_since: Option<SystemTime>,
    last_message_at: Option<SystemTime>,
    connects: u64,
    disconnects: u64,
    last_disconnect: Option<DisconnectReason>,
    sm_info: Option<SmInfo>,
    instances: Option<Vec<InstanceStatus>>,
    monitoring: Option<NodeMonitoringData>,
    counts: Counts,
}

/// What remains of a node that went away.
#[derive(Debug, Clone)]
struct Departed {
    node_id: NodeId,
    at: SystemTime,
    reason: DisconnectReason,
    connects: u64,
    disconnects: u64,
    counts: Counts,
}

#[derive(Debug, Default)]
struct Inner {
    nodes: RwLock<HashMap<NodeId, Arc<Mutex<NodeState>>>>,
    /// The last departed nodes, newest at the back; one entry per node id.
    departed: Mutex<VecDeque<Departed>>,
    /// Where admin subscribers hear of every event.
    events: EventHub,
    /// Wakes [`Recorder::wait_until`] callers.
    changed: Notify,
    /// Set by a waiter before it checks its predicate; the first event after that clears it and
    /// wakes the waiters. While nobody waits, an event only reads it.
    armed: AtomicBool,
}

/// The default receiver of everything nodes send: it implements all six receiver traits, logs
/// each event, keeps the latest state and message counts of each connected node, and publishes
/// each event to its [`EventHub`] (for the admin API).
///
/// Cheap to clone: clones share the same state.
#[derive(Debug, Clone, Default)]
pub struct Recorder {
    inner: Arc<Inner>,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Recorder {
    /// A recorder that has seen nothing yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// The hub where every event this recorder receives is published.
    pub fn events(&self) -> EventHub {
        self.inner.events.clone()
    }

    /// A copy of everything recorded so far: connected nodes and the departed history sorted
    /// by id, and totals.
    ///
    /// It copies every node's latest state, so call it for a summary or a check, not per event.
    pub fn snapshot(&self) -> RecorderSnapshot {
        let slots: Vec<(NodeId, Arc<Mutex<NodeState>>)> = self
            .inner
            .nodes
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .map(|(id, slot)| (id.clone(), Arc::clone(slot)))
            .collect();
        let mut totals = Counts::default();
        let mut nodes: Vec<NodeSnapshot> = slots
            .into_iter()
            .map(|(node_id, slot)| {
                let state = lock(&slot);
                totals.add(&state.counts);
                NodeSnapshot {
                    node_id,
                    connected: state.connected,
                    connects: state.connects,
                    disconnects: state.disconnects,
                    last_disconnect: state.last_disconnect.clone(),
                    sm_info: state.sm_info.clone(),
                    instances: state.instances.clone(),
                    monitoring: state.monitoring.clone(),
                    counts: state.counts,
                }
            })
            .collect();
        for d in lock(&self.inner.departed).iter() {
            // A node that came back is listed with its live state only.
            if nodes.iter().any(|n| n.node_id == d.node_id) {
                continue;
            }
            totals.add(&d.counts);
            nodes.push(NodeSnapshot {
                node_id: d.node_id.clone(),
                connected: false,
                connects: d.connects,
                disconnects: d.disconnects,
                last_disconnect: Some(d.reason.clone()),
                sm_info: None,
                instances: None,
                monitoring: None,
                counts: d.counts,
            });
        }
        nodes.sort_by(|a, b| a.node_id.cmp(&b.node_id));
        RecorderSnapshot { nodes, totals }
    }

    /// How much state is held: nodes with full state, departed summaries, and an estimate of
    /// their bytes. Bounded by the connected nodes plus [`DEPARTED_HISTORY`], however many node
    /// ids came and went (R-BAD-3).
    pub fn retained(&self) -> Retained {
        use std::mem::size_of;
        let nodes = self
            .inner
            .nodes
            .read()
            .unwrap_or_else(PoisonError::into_inner);
        let mut bytes = nodes.capacity()
            * (size_of::<NodeId>() + size_of::<Arc<Mutex<NodeState>>>() + size_of::<u64>());
        for (id, slot) in nodes.iter() {
            let state = lock(slot);
            bytes += id.as_str().len() + size_of::<Mutex<NodeState>>();
            if let Some(info) = &state.sm_info {
                bytes += sm_info_bytes(info);
            }
            if let Some(instances) = &state.instances {
                bytes += instances.capacity() * size_of::<InstanceStatus>();
            }
            if let Some(m) = &state.monitoring {
                bytes += m.instances.capacity() * size_of::<smcontroller_api::InstanceMonitoring>();
            }
        }
        let departed = lock(&self.inner.departed);
        bytes += departed.capacity() * size_of::<Departed>()
            + departed
                .iter()
                .map(|d| d.node_id.as_str().len())
                .sum::<usize>();
        Retained {
            nodes: nodes.len(),
            departed: departed.len(),
            bytes,
        }
    }

    /// Waits until `pred` holds for a snapshot, at most `deadline`. Returns whether it held.
    ///
    /// `pred` is checked at once and then after each change (no polling); a change that
    /// happens while it is being checked triggers another check, so none is missed. Each
    /// check takes a [`snapshot`](Self::snapshot).
    pub async fn wait_until(
        &self,
        deadline: Duration,
        pred: impl Fn(&RecorderSnapshot) -> bool,
    ) -> bool {
        let start = tokio::time::Instant::now();
        // A deadline too far to represent is no deadline.
        let until = start.checked_add(deadline);
        loop {
            // Register for the wake-up before arming and checking, so that a change made after
            // the check wakes this future.
            let notified = self.inner.changed.notified();
            self.inner.armed.store(true, Ordering::SeqCst);
            if pred(&self.snapshot()) {
                return true;
            }
            match until {
                Some(until) => {
                    if tokio::time::timeout_at(until, notified).await.is_err() {
                        return pred(&self.snapshot());
                    }
                }
                None => notified.await,
            }
        }
    }

    /// Runs `f` on `node`'s state (creating it on first sight), stamps its last message time,
    /// then wakes waiters if any.
    fn update<R>(&self, node: &NodeId, f: impl FnOnce(&mut NodeState) -> R) -> R {
        let now = SystemTime::now();
        let apply = |state: &mut NodeState| {
            state.last_message_at = Some(now);
            f(state)
        };
        let result = {
            let nodes = self
                .inner
                .nodes
                .read()
                .unwrap_or_else(PoisonError::into_inner);
            match nodes.get(node) {
                Some(slot) => apply(&mut lock(slot)),
                None => {
                    drop(nodes);
                    let slot = Arc::clone(
                        self.inner
                            .nodes
                            .write()
                            .unwrap_or_else(PoisonError::into_inner)
                            .entry(node.clone())
                            .or_insert_with(|| Arc::new(Mutex::new(self.returning(node)))),
                    );
                    apply(&mut lock(&slot))
                }
            }
        };
        self.wake();
        result
    }

    /// The state a node starts with: its counters from the departed history if it was there
    /// (the summary leaves the history), else nothing.
    fn returning(&self, node: &NodeId) -> NodeState {
        let mut departed = lock(&self.inner.departed);
        match departed.iter().position(|d| &d.node_id == node) {
            Some(i) => {
                let d = departed.remove(i).expect("index from position");
                NodeState {
                    connects: d.connects,
                    disconnects: d.disconnects,
                    last_disconnect: Some(d.reason),
                    counts: d.counts,
                    ..NodeState::default()
                }
            }
            None => NodeState::default(),
        }
    }

    /// Releases a disconnected node's state, keeping its summary in the history.
    fn depart(&self, node: &NodeId, reason: &DisconnectReason) {
        let removed = {
            let mut nodes = self
                .inner
                .nodes
                .write()
                .unwrap_or_else(PoisonError::into_inner);
            let removed = nodes.remove(node);
            // After a burst of nodes, give the table's memory back.
            if nodes.capacity() > 4 * nodes.len() + 64 {
                nodes.shrink_to_fit();
            }
            removed
        };
        let (connects, disconnects, counts) = match removed {
            Some(slot) => {
                let state = lock(&slot);
                (state.connects, state.disconnects + 1, state.counts)
            }
            // Disconnected without anything recorded (should not happen): keep the summary.
            None => (0, 1, Counts::default()),
        };
        let mut departed = lock(&self.inner.departed);
        departed.retain(|d| &d.node_id != node);
        if departed.len() >= DEPARTED_HISTORY {
            departed.pop_front();
        }
        departed.push_back(Departed {
            node_id: node.clone(),
            at: SystemTime::now(),
            reason: reason.clone(),
            connects,
            disconnects,
            counts,
        });
        drop(departed);
        self.wake();
    }

    /// Wakes the waiters if one is armed: a read of a rarely written flag while nobody waits.
    fn wake(&self) {
        let armed = &self.inner.armed;
        if armed.load(Ordering::SeqCst) && armed.swap(false, Ordering::SeqCst) {
            self.inner.changed.notify_waiters();
        }
    }
}

/// An estimate of the bytes an `sm_info` holds beyond its own struct.
fn sm_info_bytes(info: &SmInfo) -> usize {
    use std::mem::size_of;
    info.node_id.as_str().len()
        + info.runtimes.capacity() * size_of::<smcontroller_api::RuntimeInfo>()
        + info
            .runtimes
            .iter()
            .map(|r| r.runtime_id.capacity() + r.runtime_type.capacity())
            .sum::<usize>()
        + info.resources.capacity() * size_of::<smcontroller_api::ResourceInfo>()
        + info
            .resources
            .iter()
            .map(|r| r.name.capacity())
            .sum::<usize>()
}

impl NodeDirectory for Recorder {
    fn node(&self, node: &NodeId) -> Option<NodeView> {
        let slot = Arc::clone(
            self.inner
                .nodes
                .read()
                .unwrap_or_else(PoisonError::into_inner)
                .get(node)?,
        );
        let state = lock(&slot);
        Some(NodeView {
            node_id: node.clone(),
            connected_since: state.connected_since,
            last_message_at: state.last_message_at,
            sm_info: state.sm_info.clone(),
            connects: state.connects,
            counts: state.counts.to_admin(),
        })
    }

    fn departed(&self) -> Vec<DepartedView> {
        lock(&self.inner.departed)
            .iter()
            .rev()
            .map(|d| DepartedView {
                node_id: d.node_id.clone(),
                disconnected_at: d.at,
                reason: d.reason.clone(),
                connects: d.connects,
                counts: d.counts.to_admin(),
            })
            .collect()
    }
}

#[async_trait]
impl SmInfoReceiver for Recorder {
    async fn on_node_connected(&self, node: &NodeId) {
        let connects = self.update(node, |s| {
            s.connected = true;
            s.connected_since = s.last_message_at;
            s.connects += 1;
            s.connects
        });
        self.inner.events.publish(node, || EventBody::Connected);
        info!(node_id = %node, connects, "node connected");
    }

    async fn on_node_disconnected(&self, node: &NodeId, reason: &DisconnectReason) {
        self.depart(node, reason);
        self.inner
            .events
            .publish(node, || EventBody::Disconnected(reason.clone()));
        info!(node_id = %node, reason = %reason, "node disconnected");
    }

    async fn on_sm_info_received(&self, sm_info: &SmInfo) {
        self.update(&sm_info.node_id, |s| {
            s.counts.sm_info += 1;
            s.sm_info = Some(sm_info.clone());
        });
        self.inner
            .events
            .publish(&sm_info.node_id, || EventBody::SmInfo(sm_info.clone()));
        let runtimes: Vec<&str> = sm_info
            .runtimes
            .iter()
            .map(|r| r.runtime_id.as_str())
            .collect();
        info!(
            node_id = %sm_info.node_id,
            runtimes = ?runtimes,
            resources = sm_info.resources.len(),
            "sm_info received"
        );
    }
}

#[async_trait]
impl InstanceStatusReceiver for Recorder {
    async fn on_instance_status_received(&self, node: &NodeId, status: &InstanceStatus) {
        self.update(node, |s| s.counts.instance_status += 1);
        self.inner
            .events
            .publish(node, || EventBody::InstanceStatus(status.clone()));
        debug!(
            node_id = %node,
            item_id = %status.ident.item_id,
            subject_id = %status.ident.subject_id,
            instance = status.ident.instance,
            state = %status.state,
            error = ?status.error.as_ref().map(|e| &e.message),
            "instance status"
        );
    }

    async fn on_node_instances_statuses_received(
        &self,
        node: &NodeId,
        statuses: &[InstanceStatus],
    ) {
        self.update(node, |s| {
            s.counts.node_instances_status += 1;
            s.instances = Some(statuses.to_vec());
        });
        self.inner
            .events
            .publish(node, || EventBody::NodeInstancesStatus(statuses.to_vec()));
        info!(node_id = %node, instances = statuses.len(), "node instances status");
    }
}

#[async_trait]
impl EnvVarsStatusSender for Recorder {
    async fn send_env_vars_statuses(&self, node: &NodeId, statuses: &[InstanceEnvVarsStatus]) {
        // The hub's subscribers see env-var statuses inside the instance statuses.
        self.update(node, |s| s.counts.env_vars += 1);
        let failed = statuses
            .iter()
            .flat_map(|i| &i.statuses)
            .filter(|v| v.error.is_some())
            .count();
        debug!(node_id = %node, instances = statuses.len(), failed, "env vars status");
    }
}

#[async_trait]
impl MonitoringReceiver for Recorder {
    async fn on_monitoring_received(&self, node: &NodeId, data: &NodeMonitoringData) {
        self.update(node, |s| {
            s.counts.monitoring += 1;
            s.monitoring = Some(data.clone());
        });
        self.inner
            .events
            .publish(node, || EventBody::Monitoring(data.clone()));
        debug!(
            node_id = %node,
            ram = data.node.ram,
            cpu = data.node.cpu,
            instances = data.instances.len(),
            "monitoring"
        );
    }
}

#[async_trait]
impl AlertsReceiver for Recorder {
    async fn on_alert_received(&self, node: &NodeId, alert: &Alert) {
        self.update(node, |s| s.counts.alert += 1);
        self.inner
            .events
            .publish(node, || EventBody::Alert(alert.clone()));
        info!(node_id = %node, kind = alert_kind(&alert.kind), alert = ?alert.kind, "alert");
    }
}

#[async_trait]
impl LogSender for Recorder {
    async fn send_log(&self, part: &LogPart) {
        self.update(&part.node_id, |s| s.counts.log += 1);
        self.inner
            .events
            .publish(&part.node_id, || EventBody::Log(part.clone()));
        info!(
            node_id = %part.node_id,
            correlation_id = %part.correlation_id,
            part = part.part,
            part_count = part.part_count,
            status = %part.status,
            bytes = part.data.len(),
            error = ?part.error.as_ref().map(|e| &e.message),
            "log part"
        );
    }
}

/// A short name of an alert's kind, for the `kind` field.
fn alert_kind(kind: &AlertKind) -> &'static str {
    match kind {
        AlertKind::SystemQuota { .. } => "system_quota",
        AlertKind::InstanceQuota { .. } => "instance_quota",
        AlertKind::ResourceAllocate { .. } => "resource_allocate",
        AlertKind::System { .. } => "system",
        AlertKind::Core { .. } => "core",
        AlertKind::Instance { .. } => "instance",
    }
}

#[cfg(test)]
mod tests {
    use std::time::SystemTime;

    use smcontroller_api::types::{
        EnvVarStatus, ErrorInfo, InstanceIdent, InstanceState, LogStatus, MonitoringData,
        RuntimeInfo,
    };

    use super::*;

    const SHORT: Duration = Duration::from_millis(50);
    const LONG: Duration = Duration::from_secs(5);

    fn id(s: &str) -> NodeId {
        NodeId::new(s)
    }

    fn sm_info(node: &str) -> SmInfo {
        SmInfo {
            node_id: id(node),
            runtimes: vec![RuntimeInfo {
                runtime_id: "runc".into(),
                runtime_type: "runc".into(),
                ..RuntimeInfo::default()
            }],
            resources: vec![],
        }
    }

    fn status(item: &str) -> InstanceStatus {
        InstanceStatus {
            ident: InstanceIdent {
                item_id: item.into(),
                ..InstanceIdent::default()
            },
            version: "1.0.0".into(),
            runtime_id: "runc".into(),
            manifest_digest: String::new(),
            env_vars: vec![],
            state: InstanceState::Active,
            error: None,
        }
    }

    fn monitoring(ram: u64) -> NodeMonitoringData {
        NodeMonitoringData {
            node: MonitoringData {
                timestamp: SystemTime::UNIX_EPOCH,
                ram,
                cpu: 1,
                partitions: vec![],
                download: 0,
                upload: 0,
            },
            instances: vec![],
        }
    }

    fn log_part(node: &str) -> LogPart {
        LogPart {
            node_id: id(node),
            correlation_id: "c1".into(),
            part: 1,
            part_count: 1,
            data: b"hello".to_vec(),
            status: LogStatus::Ok,
            error: None,
        }
    }

    #[tokio::test]
    async fn records_every_kind_per_node() {
        let r = Recorder::new();
        let (a, b) = (id("node-a"), id("node-b"));
        // node-b first: the snapshot must still be sorted.
        r.on_node_connected(&b).await;
        r.on_node_connected(&a).await;
        r.on_sm_info_received(&sm_info("node-a")).await;
        r.on_instance_status_received(&a, &status("s1")).await;
        r.on_instance_status_received(&a, &status("s2")).await;
        r.on_node_instances_statuses_received(&a, &[status("s1"), status("s2")])
            .await;
        r.send_env_vars_statuses(
            &a,
            &[InstanceEnvVarsStatus {
                ident: InstanceIdent::default(),
                statuses: vec![EnvVarStatus {
                    name: "X".into(),
                    error: Some(ErrorInfo::default()),
                }],
            }],
        )
        .await;
        r.on_monitoring_received(&a, &monitoring(1)).await;
        r.on_monitoring_received(&a, &monitoring(2)).await;
        r.on_monitoring_received(&b, &monitoring(7)).await;
        r.on_alert_received(
            &b,
            &Alert {
                timestamp: SystemTime::UNIX_EPOCH,
                kind: AlertKind::System {
                    message: "disk".into(),
                },
            },
        )
        .await;
        r.send_log(&log_part("node-b")).await;
        r.on_node_disconnected(&b, &DisconnectReason::Closed).await;

        let snap = r.snapshot();
        let ids: Vec<&str> = snap.nodes.iter().map(|n| n.node_id.as_str()).collect();
        assert_eq!(ids, ["node-a", "node-b"]);

        let na = snap.node("node-a").unwrap();
        assert!(na.connected);
        assert_eq!((na.connects, na.disconnects), (1, 0));
        assert_eq!(na.last_disconnect, None);
        assert_eq!(na.sm_info.as_ref().unwrap().runtimes[0].runtime_id, "runc");
        assert_eq!(na.instances.as_ref().unwrap().len(), 2);
        assert_eq!(na.monitoring.as_ref().unwrap().node.ram, 2);
        assert_eq!(
            na.counts,
            Counts {
                sm_info: 1,
                instance_status: 2,
                node_instances_status: 1,
                env_vars: 1,
                monitoring: 2,
                alert: 0,
                log: 0,
            }
        );

        let nb = snap.node("node-b").unwrap();
        assert!(!nb.connected);
        assert_eq!((nb.connects, nb.disconnects), (1, 1));
        assert_eq!(nb.last_disconnect, Some(DisconnectReason::Closed));
        // Released at the disconnect (R-BAD-3): only the summary remains.
        assert_eq!(nb.sm_info, None);
        assert_eq!(nb.monitoring, None);
        assert_eq!(
            nb.counts,
            Counts {
                monitoring: 1,
                alert: 1,
                log: 1,
                ..Counts::default()
            }
        );

        assert_eq!(
            snap.totals,
            Counts {
                sm_info: 1,
                instance_status: 2,
                node_instances_status: 1,
                env_vars: 1,
                monitoring: 3,
                alert: 1,
                log: 1,
            }
        );
        assert_eq!(snap.totals.total(), 10);
        assert_eq!(snap.connected_nodes(), 1);
        assert!(snap.node("node-c").is_none());
    }

    #[tokio::test]
    async fn reconnect_updates_state_and_clones_share_it() {
        let r = Recorder::new();
        let clone = r.clone();
        let a = id("a");
        r.on_node_connected(&a).await;
        r.on_node_disconnected(&a, &DisconnectReason::Replaced)
            .await;
        clone.on_node_connected(&a).await;
        let snap = r.snapshot();
        let na = snap.node("a").unwrap();
        assert!(na.connected);
        assert_eq!((na.connects, na.disconnects), (2, 1));
        assert_eq!(na.last_disconnect, Some(DisconnectReason::Replaced));
    }

    #[tokio::test]
    async fn wait_until_true_at_once() {
        let r = Recorder::new();
        r.on_node_connected(&id("a")).await;
        assert!(r.wait_until(SHORT, |s| s.connected_nodes() == 1).await);
    }

    #[tokio::test]
    async fn wait_until_sees_later_events() {
        let r = Recorder::new();
        let sender = r.clone();
        let task = tokio::spawn(async move {
            for i in 0..100u64 {
                let node = id(&format!("n{}", i % 10));
                sender.on_monitoring_received(&node, &monitoring(i)).await;
                tokio::task::yield_now().await;
            }
        });
        assert!(
            r.wait_until(LONG, |s| s.totals.monitoring == 100 && s.nodes.len() == 10)
                .await
        );
        task.await.unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_waiters_and_senders() {
        let r = Recorder::new();
        let waiters: Vec<_> = (0..4u64)
            .map(|k| {
                let r = r.clone();
                tokio::spawn(async move {
                    r.wait_until(LONG, move |s| s.totals.alert >= 1_000 + k)
                        .await
                })
            })
            .collect();
        let senders: Vec<_> = (0..4)
            .map(|n| {
                let r = r.clone();
                tokio::spawn(async move {
                    let node = id(&format!("node-{n}"));
                    let alert = Alert {
                        timestamp: SystemTime::UNIX_EPOCH,
                        kind: AlertKind::System {
                            message: "x".into(),
                        },
                    };
                    for _ in 0..300 {
                        r.on_alert_received(&node, &alert).await;
                    }
                })
            })
            .collect();
        for s in senders {
            s.await.unwrap();
        }
        for w in waiters {
            assert!(w.await.unwrap());
        }
        assert_eq!(r.snapshot().totals.alert, 1_200);
    }

    #[tokio::test]
    async fn wait_until_deadline_expires() {
        let r = Recorder::new();
        r.on_node_connected(&id("a")).await;
        let start = std::time::Instant::now();
        assert!(!r.wait_until(SHORT, |s| s.connected_nodes() == 2).await);
        assert!(start.elapsed() >= SHORT);
        // Events that do not satisfy the predicate do not end the wait early.
        let sender = r.clone();
        let task = tokio::spawn(async move {
            for _ in 0..10 {
                sender
                    .on_monitoring_received(&id("a"), &monitoring(0))
                    .await;
                tokio::task::yield_now().await;
            }
        });
        assert!(!r.wait_until(SHORT, |s| s.connected_nodes() == 2).await);
        task.await.unwrap();
    }

    /// An `sm_info` as large as a hostile peer could make it (within the message limit's
    /// spirit): many runtimes with long ids.
    fn big_sm_info(node: &str) -> SmInfo {
        SmInfo {
            node_id: id(node),
            runtimes: (0..64)
                .map(|i| RuntimeInfo {
                    runtime_id: format!("{i:0>200}"),
                    runtime_type: "runc".into(),
                    ..RuntimeInfo::default()
                })
                .collect(),
            resources: vec![],
        }
    }

    #[tokio::test]
    async fn r_bad_3_state_of_departed_nodes_is_bounded() {
        let r = Recorder::new();
        // One node stays connected throughout: its state is kept.
        let stay = id("stay");
        r.on_node_connected(&stay).await;
        r.on_sm_info_received(&big_sm_info("stay")).await;
        let one_node = r.retained();
        assert_eq!((one_node.nodes, one_node.departed), (1, 0));
        assert!(
            one_node.bytes > 64 * 200,
            "the sm_info is counted: {one_node:?}"
        );

        for n in 0..10_000 {
            let node = format!("churn-{n}");
            r.on_node_connected(&id(&node)).await;
            r.on_sm_info_received(&big_sm_info(&node)).await;
            r.on_monitoring_received(&id(&node), &monitoring(n)).await;
            r.on_node_disconnected(&id(&node), &DisconnectReason::Closed)
                .await;
        }
        let after = r.retained();
        assert_eq!(after.nodes, 1, "{after:?}");
        assert_eq!(after.departed, DEPARTED_HISTORY, "{after:?}");
        // The connected node, plus 64 summaries of about 200 bytes; 10,000 sm_infos of ~20 KiB
        // each would be ~200 MiB.
        assert!(
            after.bytes < one_node.bytes + 64 * 1024,
            "retained {} bytes after 10,000 ids (one node: {})",
            after.bytes,
            one_node.bytes
        );
        let snap = r.snapshot();
        assert_eq!(snap.nodes.len(), 1 + DEPARTED_HISTORY);
        assert!(snap.node("stay").unwrap().sm_info.is_some());
        // The history keeps the newest: churn-9936 .. churn-9999.
        assert!(snap.node("churn-9999").is_some());
        assert!(snap.node("churn-9936").is_some());
        assert!(snap.node("churn-9935").is_none());
        let newest = NodeDirectory::departed(&r);
        assert_eq!(newest[0].node_id.as_str(), "churn-9999");
        assert_eq!(newest[0].counts.monitoring, 1);
        assert!(NodeDirectory::node(&r, &id("churn-9999")).is_none());
    }

    #[tokio::test]
    async fn a_returning_node_keeps_its_counts_and_leaves_the_history() {
        let r = Recorder::new();
        let a = id("a");
        r.on_node_connected(&a).await;
        r.on_alert_received(
            &a,
            &Alert {
                timestamp: SystemTime::UNIX_EPOCH,
                kind: AlertKind::System {
                    message: "x".into(),
                },
            },
        )
        .await;
        r.on_node_disconnected(&a, &DisconnectReason::Closed).await;
        assert_eq!(NodeDirectory::departed(&r).len(), 1);
        r.on_node_connected(&a).await;
        assert!(NodeDirectory::departed(&r).is_empty());
        let view = NodeDirectory::node(&r, &a).unwrap();
        assert_eq!((view.connects, view.counts.alert), (2, 1));
        assert!(view.connected_since.is_some());
        assert!(view.last_message_at >= view.connected_since);
        // Many disconnects of one id take one place in the history.
        for _ in 0..100 {
            r.on_node_disconnected(&a, &DisconnectReason::Replaced)
                .await;
            r.on_node_connected(&a).await;
        }
        r.on_node_disconnected(&a, &DisconnectReason::Shutdown)
            .await;
        let departed = NodeDirectory::departed(&r);
        assert_eq!(departed.len(), 1);
        assert_eq!(departed[0].reason, DisconnectReason::Shutdown);
        assert_eq!(departed[0].connects, 102);
    }

    #[tokio::test]
    async fn every_event_reaches_the_hub() {
        use smcontroller_admin::events::EventKind;
        let r = Recorder::new();
        let mut rx = r.events().subscribe();
        let a = id("node-a");
        r.on_node_connected(&a).await;
        r.on_sm_info_received(&sm_info("node-a")).await;
        r.on_instance_status_received(&a, &status("s1")).await;
        r.on_node_instances_statuses_received(&a, &[status("s1")])
            .await;
        r.on_monitoring_received(&a, &monitoring(3)).await;
        r.on_alert_received(
            &a,
            &Alert {
                timestamp: SystemTime::UNIX_EPOCH,
                kind: AlertKind::System {
                    message: "disk".into(),
                },
            },
        )
        .await;
        r.send_log(&log_part("node-a")).await;
        r.on_node_disconnected(&a, &DisconnectReason::Closed).await;
        let mut kinds = Vec::new();
        while let Ok(event) = rx.try_recv() {
            assert_eq!(event.node_id, a);
            kinds.push(event.body.kind());
        }
        assert_eq!(
            kinds,
            [
                EventKind::Connected,
                EventKind::SmInfo,
                EventKind::InstanceStatus,
                EventKind::NodeInstancesStatus,
                EventKind::Monitoring,
                EventKind::Alert,
                EventKind::Log,
                EventKind::Disconnected,
            ]
        );
    }
}
