//! The daemon's default receivers: a [`Recorder`] that logs everything nodes send and keeps the
//! latest state of each node, so an operator (and the demo, and tests) can see what happens.
//!
//! Start reading at [`Recorder`]; [`Recorder::snapshot`] gives a [`RecorderSnapshot`], and
//! [`Recorder::wait_until`] waits, with a deadline, until a snapshot satisfies a predicate.
//!
//! Each event is a structured `tracing` event with a `node_id` field: `info` for connect,
//! disconnect, `sm_info`, instance snapshots, alerts and log parts; `debug` for each monitoring
//! sample, instance status and env-var status.
//!
//! Cost: an event takes a shared read lock of the node map (a write lock only the first time a
//! node is seen) and its own node's mutex, held only to update counters and clone the latest
//! value. Nodes never contend with each other on a mutex, no snapshot is built per event, and
//! waiters are woken only while someone waits.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex, MutexGuard, PoisonError, RwLock,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use async_trait::async_trait;
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
    /// Its last `sm_info` (runtimes and resources).
    pub sm_info: Option<SmInfo>,
    /// Its last `node_instances_status` snapshot.
    pub instances: Option<Vec<InstanceStatus>>,
    /// Its last instant monitoring.
    pub monitoring: Option<NodeMonitoringData>,
    /// How many messages of each kind it sent.
    pub counts: Counts,
}

/// A copy of everything the [`Recorder`] knows, taken at one moment.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RecorderSnapshot {
    /// Every node seen, sorted by node id.
    pub nodes: Vec<NodeSnapshot>,
    /// The counts of all nodes added up.
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

/// The latest state of one node, behind its own mutex.
#[derive(Debug, Default)]
struct NodeState {
    connected: bool,
    connects: u64,
    disconnects: u64,
    last_disconnect: Option<DisconnectReason>,
    sm_info: Option<SmInfo>,
    instances: Option<Vec<InstanceStatus>>,
    monitoring: Option<NodeMonitoringData>,
    counts: Counts,
}

#[derive(Debug, Default)]
struct Inner {
    nodes: RwLock<HashMap<NodeId, Arc<Mutex<NodeState>>>>,
    /// Wakes [`Recorder::wait_until`] callers.
    changed: Notify,
    /// Set by a waiter before it checks its predicate; the first event after that clears it and
    /// wakes the waiters. While nobody waits, an event only reads it.
    armed: AtomicBool,
}

/// The default receiver of everything nodes send: it implements all six receiver traits, logs
/// each event and keeps the latest state and message counts of each node.
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

    /// A copy of everything recorded so far: nodes sorted by id, and totals.
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
        nodes.sort_by(|a, b| a.node_id.cmp(&b.node_id));
        RecorderSnapshot { nodes, totals }
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

    /// Runs `f` on `node`'s state (creating it on first sight), then wakes waiters if any.
    fn update<R>(&self, node: &NodeId, f: impl FnOnce(&mut NodeState) -> R) -> R {
        let result = {
            let nodes = self
                .inner
                .nodes
                .read()
                .unwrap_or_else(PoisonError::into_inner);
            match nodes.get(node) {
                Some(slot) => f(&mut lock(slot)),
                None => {
                    drop(nodes);
                    let slot = Arc::clone(
                        self.inner
                            .nodes
                            .write()
                            .unwrap_or_else(PoisonError::into_inner)
                            .entry(node.clone())
                            .or_default(),
                    );
                    f(&mut lock(&slot))
                }
            }
        };
        self.wake();
        result
    }

    /// Wakes the waiters if one is armed: a read of a rarely written flag while nobody waits.
    fn wake(&self) {
        let armed = &self.inner.armed;
        if armed.load(Ordering::SeqCst) && armed.swap(false, Ordering::SeqCst) {
            self.inner.changed.notify_waiters();
        }
    }
}

#[async_trait]
impl SmInfoReceiver for Recorder {
    async fn on_node_connected(&self, node: &NodeId) {
        let connects = self.update(node, |s| {
            s.connected = true;
            s.connects += 1;
            s.connects
        });
        info!(node_id = %node, connects, "node connected");
    }

    async fn on_node_disconnected(&self, node: &NodeId, reason: &DisconnectReason) {
        self.update(node, |s| {
            s.connected = false;
            s.disconnects += 1;
            s.last_disconnect = Some(reason.clone());
        });
        info!(node_id = %node, reason = %reason, "node disconnected");
    }

    async fn on_sm_info_received(&self, sm_info: &SmInfo) {
        self.update(&sm_info.node_id, |s| {
            s.counts.sm_info += 1;
            s.sm_info = Some(sm_info.clone());
        });
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
        info!(node_id = %node, instances = statuses.len(), "node instances status");
    }
}

#[async_trait]
impl EnvVarsStatusSender for Recorder {
    async fn send_env_vars_statuses(&self, node: &NodeId, statuses: &[InstanceEnvVarsStatus]) {
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
        info!(node_id = %node, kind = alert_kind(&alert.kind), alert = ?alert.kind, "alert");
    }
}

#[async_trait]
impl LogSender for Recorder {
    async fn send_log(&self, part: &LogPart) {
        self.update(&part.node_id, |s| s.counts.log += 1);
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
        assert_eq!(nb.sm_info, None);
        assert_eq!(nb.monitoring.as_ref().unwrap().node.ram, 7);
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
}
