//! Counters of a simulation: lock-free per node ([`NodeCounters`]), snapshots for callers
//! ([`NodeStats`], [`SimStats`]).

use std::fmt;
use std::sync::atomic::{AtomicI32, AtomicU64, Ordering};

use smcontroller_api::SmMessageKind;
use smcontroller_grpc::proto::servicemanager::v5::{
    ConnectionEnum, SmIncomingMessages, sm_incoming_messages::SmIncomingMessage,
};

/// The kinds of command (`SMIncomingMessages`) a node can receive.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CommandKind {
    /// `get_node_config_status`.
    GetNodeConfigStatus,
    /// `check_node_config`.
    CheckNodeConfig,
    /// `set_node_config`.
    SetNodeConfig,
    /// `update_instances`.
    UpdateInstances,
    /// `system_log_request`.
    SystemLogRequest,
    /// `instance_log_request`.
    InstanceLogRequest,
    /// `instance_crash_log_request`.
    InstanceCrashLogRequest,
    /// `get_average_monitoring`.
    GetAverageMonitoring,
    /// `connection_status`.
    ConnectionStatus,
    /// `update_networks`.
    UpdateNetworks,
    /// A message with an empty oneof.
    Empty,
}

impl CommandKind {
    /// Every kind, in wire order (empty last).
    pub const ALL: [Self; 11] = [
        Self::GetNodeConfigStatus,
        Self::CheckNodeConfig,
        Self::SetNodeConfig,
        Self::UpdateInstances,
        Self::SystemLogRequest,
        Self::InstanceLogRequest,
        Self::InstanceCrashLogRequest,
        Self::GetAverageMonitoring,
        Self::ConnectionStatus,
        Self::UpdateNetworks,
        Self::Empty,
    ];

    /// The kind of `msg`.
    pub fn of(msg: &SmIncomingMessages) -> Self {
        use SmIncomingMessage as M;
        match &msg.sm_incoming_message {
            Some(M::GetNodeConfigStatus(_)) => Self::GetNodeConfigStatus,
            Some(M::CheckNodeConfig(_)) => Self::CheckNodeConfig,
            Some(M::SetNodeConfig(_)) => Self::SetNodeConfig,
            Some(M::UpdateInstances(_)) => Self::UpdateInstances,
            Some(M::SystemLogRequest(_)) => Self::SystemLogRequest,
            Some(M::InstanceLogRequest(_)) => Self::InstanceLogRequest,
            Some(M::InstanceCrashLogRequest(_)) => Self::InstanceCrashLogRequest,
            Some(M::GetAverageMonitoring(_)) => Self::GetAverageMonitoring,
            Some(M::ConnectionStatus(_)) => Self::ConnectionStatus,
            Some(M::UpdateNetworks(_)) => Self::UpdateNetworks,
            None => Self::Empty,
        }
    }

    /// The oneof field name.
    pub fn name(self) -> &'static str {
        match self {
            Self::GetNodeConfigStatus => "get_node_config_status",
            Self::CheckNodeConfig => "check_node_config",
            Self::SetNodeConfig => "set_node_config",
            Self::UpdateInstances => "update_instances",
            Self::SystemLogRequest => "system_log_request",
            Self::InstanceLogRequest => "instance_log_request",
            Self::InstanceCrashLogRequest => "instance_crash_log_request",
            Self::GetAverageMonitoring => "get_average_monitoring",
            Self::ConnectionStatus => "connection_status",
            Self::UpdateNetworks => "update_networks",
            Self::Empty => "empty",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// The `NetworkService` calls a node makes under the 9.1 wire revision.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum NetworkCall {
    /// `SubscribeInstanceNetworkUpdates`.
    Subscribe,
    /// `SyncNetworkState`.
    SyncNetworkState,
    /// `GetNodeNetworkParams`.
    GetNodeNetworkParams,
    /// `AllocateInstanceNetwork`.
    AllocateInstanceNetwork,
    /// `ReleaseInstanceNetwork`.
    ReleaseInstanceNetwork,
    /// `ReleaseNodeNetwork`.
    ReleaseNodeNetwork,
}

impl NetworkCall {
    /// Every call, in the order of the service's definition but the subscription first.
    pub const ALL: [Self; 6] = [
        Self::Subscribe,
        Self::SyncNetworkState,
        Self::GetNodeNetworkParams,
        Self::AllocateInstanceNetwork,
        Self::ReleaseInstanceNetwork,
        Self::ReleaseNodeNetwork,
    ];

    /// The RPC's name.
    pub fn name(self) -> &'static str {
        match self {
            Self::Subscribe => "SubscribeInstanceNetworkUpdates",
            Self::SyncNetworkState => "SyncNetworkState",
            Self::GetNodeNetworkParams => "GetNodeNetworkParams",
            Self::AllocateInstanceNetwork => "AllocateInstanceNetwork",
            Self::ReleaseInstanceNetwork => "ReleaseInstanceNetwork",
            Self::ReleaseNodeNetwork => "ReleaseNodeNetwork",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

impl fmt::Display for NetworkCall {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Live counters of one node (relaxed atomics: each node has its own, nothing is shared).
#[derive(Debug, Default)]
pub(crate) struct NodeCounters {
    pub(crate) connects: AtomicU64,
    pub(crate) connect_failures: AtomicU64,
    pub(crate) disconnects: AtomicU64,
    pub(crate) networks_received: AtomicU64,
    cloud_status_changes: AtomicU64,
    commands: [AtomicU64; CommandKind::ALL.len()],
    sent: [AtomicU64; SmMessageKind::ALL.len()],
    network_calls: [AtomicU64; NetworkCall::ALL.len()],
    network_failures: [AtomicU64; NetworkCall::ALL.len()],
    pub(crate) firewall_updates: AtomicU64,
    /// Messages sent with an empty oneof (garbage).
    sent_empty: AtomicU64,
    /// Last `connection_status.cloud_status`, -1 before the first.
    last_cloud_status: AtomicI32Cell,
}

/// An `AtomicI32` that starts at -1 (nothing received yet).
#[derive(Debug)]
struct AtomicI32Cell(AtomicI32);

impl Default for AtomicI32Cell {
    fn default() -> Self {
        Self(AtomicI32::new(-1))
    }
}

impl NodeCounters {
    pub(crate) fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn command(&self, kind: CommandKind) {
        Self::bump(&self.commands[kind.index()]);
    }

    /// Counts a message sent, by its kind (`None`: an empty oneof).
    pub(crate) fn sent(&self, kind: Option<SmMessageKind>) {
        match kind {
            Some(kind) => Self::bump(&self.sent[kind.index()]),
            None => Self::bump(&self.sent_empty),
        }
    }

    /// Counts a `NetworkService` call, and its failure when it `failed` (the call itself, or
    /// an `error` in its answer).
    pub(crate) fn network_call(&self, call: NetworkCall, failed: bool) {
        Self::bump(&self.network_calls[call.index()]);
        if failed {
            Self::bump(&self.network_failures[call.index()]);
        }
    }

    /// Counts a failure of a call counted already (a subscription's stream that broke).
    pub(crate) fn network_failure(&self, call: NetworkCall) {
        Self::bump(&self.network_failures[call.index()]);
    }

    /// Records `connection_status.cloud_status`; false when it repeats the value the node
    /// already has (a real SM ignores such a status). The value outlives the stream, as a real
    /// SM's does: the first status after a reconnect may be a repeat.
    pub(crate) fn set_cloud_status(&self, status: i32) -> bool {
        let changed = self.last_cloud_status.0.swap(status, Ordering::Relaxed) != status;
        if changed {
            Self::bump(&self.cloud_status_changes);
        }
        changed
    }

    pub(crate) fn last_cloud_status(&self) -> Option<i32> {
        let v = self.last_cloud_status.0.load(Ordering::Relaxed);
        (v >= 0).then_some(v)
    }

    pub(crate) fn snapshot(&self) -> Counters {
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let mut commands = CommandCounts::default();
        for kind in CommandKind::ALL {
            commands.add(kind, load(&self.commands[kind.index()]));
        }
        let mut sent = SentCounts {
            empty: load(&self.sent_empty),
            ..SentCounts::default()
        };
        for kind in SmMessageKind::ALL {
            sent.add(kind, load(&self.sent[kind.index()]));
        }
        let mut network_calls = NetworkCallCounts::default();
        let mut network_failures = NetworkCallCounts::default();
        for call in NetworkCall::ALL {
            network_calls.add(call, load(&self.network_calls[call.index()]));
            network_failures.add(call, load(&self.network_failures[call.index()]));
        }
        Counters {
            connects: load(&self.connects),
            connect_failures: load(&self.connect_failures),
            disconnects: load(&self.disconnects),
            networks_received: load(&self.networks_received),
            cloud_status_changes: load(&self.cloud_status_changes),
            commands,
            sent,
            network_calls,
            network_failures,
            firewall_updates: load(&self.firewall_updates),
        }
    }
}

/// `NetworkService` calls, by RPC (all 0 under the 9.0 wire revision).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NetworkCallCounts {
    /// `SubscribeInstanceNetworkUpdates`.
    pub subscribe: u64,
    /// `SyncNetworkState`.
    pub sync_network_state: u64,
    /// `GetNodeNetworkParams`.
    pub get_node_network_params: u64,
    /// `AllocateInstanceNetwork`.
    pub allocate_instance_network: u64,
    /// `ReleaseInstanceNetwork`.
    pub release_instance_network: u64,
    /// `ReleaseNodeNetwork`.
    pub release_node_network: u64,
}

impl NetworkCallCounts {
    /// The count of `call`.
    pub fn get(&self, call: NetworkCall) -> u64 {
        match call {
            NetworkCall::Subscribe => self.subscribe,
            NetworkCall::SyncNetworkState => self.sync_network_state,
            NetworkCall::GetNodeNetworkParams => self.get_node_network_params,
            NetworkCall::AllocateInstanceNetwork => self.allocate_instance_network,
            NetworkCall::ReleaseInstanceNetwork => self.release_instance_network,
            NetworkCall::ReleaseNodeNetwork => self.release_node_network,
        }
    }

    fn slot(&mut self, call: NetworkCall) -> &mut u64 {
        match call {
            NetworkCall::Subscribe => &mut self.subscribe,
            NetworkCall::SyncNetworkState => &mut self.sync_network_state,
            NetworkCall::GetNodeNetworkParams => &mut self.get_node_network_params,
            NetworkCall::AllocateInstanceNetwork => &mut self.allocate_instance_network,
            NetworkCall::ReleaseInstanceNetwork => &mut self.release_instance_network,
            NetworkCall::ReleaseNodeNetwork => &mut self.release_node_network,
        }
    }

    fn add(&mut self, call: NetworkCall, n: u64) {
        *self.slot(call) += n;
    }

    /// All calls together.
    pub fn total(&self) -> u64 {
        NetworkCall::ALL.iter().map(|c| self.get(*c)).sum()
    }
}

/// Commands received, by kind.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CommandCounts {
    /// `get_node_config_status`.
    pub get_node_config_status: u64,
    /// `check_node_config`.
    pub check_node_config: u64,
    /// `set_node_config`.
    pub set_node_config: u64,
    /// `update_instances`.
    pub update_instances: u64,
    /// `system_log_request`.
    pub system_log_request: u64,
    /// `instance_log_request`.
    pub instance_log_request: u64,
    /// `instance_crash_log_request`.
    pub instance_crash_log_request: u64,
    /// `get_average_monitoring`.
    pub get_average_monitoring: u64,
    /// `connection_status`.
    pub connection_status: u64,
    /// `update_networks`.
    pub update_networks: u64,
    /// Messages with an empty oneof.
    pub empty: u64,
}

impl CommandCounts {
    /// The count of `kind`.
    pub fn get(&self, kind: CommandKind) -> u64 {
        match kind {
            CommandKind::GetNodeConfigStatus => self.get_node_config_status,
            CommandKind::CheckNodeConfig => self.check_node_config,
            CommandKind::SetNodeConfig => self.set_node_config,
            CommandKind::UpdateInstances => self.update_instances,
            CommandKind::SystemLogRequest => self.system_log_request,
            CommandKind::InstanceLogRequest => self.instance_log_request,
            CommandKind::InstanceCrashLogRequest => self.instance_crash_log_request,
            CommandKind::GetAverageMonitoring => self.get_average_monitoring,
            CommandKind::ConnectionStatus => self.connection_status,
            CommandKind::UpdateNetworks => self.update_networks,
            CommandKind::Empty => self.empty,
        }
    }

    fn slot(&mut self, kind: CommandKind) -> &mut u64 {
        match kind {
            CommandKind::GetNodeConfigStatus => &mut self.get_node_config_status,
            CommandKind::CheckNodeConfig => &mut self.check_node_config,
            CommandKind::SetNodeConfig => &mut self.set_node_config,
            CommandKind::UpdateInstances => &mut self.update_instances,
            CommandKind::SystemLogRequest => &mut self.system_log_request,
            CommandKind::InstanceLogRequest => &mut self.instance_log_request,
            CommandKind::InstanceCrashLogRequest => &mut self.instance_crash_log_request,
            CommandKind::GetAverageMonitoring => &mut self.get_average_monitoring,
            CommandKind::ConnectionStatus => &mut self.connection_status,
            CommandKind::UpdateNetworks => &mut self.update_networks,
            CommandKind::Empty => &mut self.empty,
        }
    }

    fn add(&mut self, kind: CommandKind, n: u64) {
        *self.slot(kind) += n;
    }

    /// All commands together.
    pub fn total(&self) -> u64 {
        CommandKind::ALL.iter().map(|k| self.get(*k)).sum()
    }
}

/// Messages sent (handed to the stream), by kind.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SentCounts {
    /// `sm_info`.
    pub sm_info: u64,
    /// `node_config_status`.
    pub node_config_status: u64,
    /// `update_instances_status`.
    pub update_instances_status: u64,
    /// `node_instances_status`.
    pub node_instances_status: u64,
    /// `log`.
    pub log: u64,
    /// `instant_monitoring`.
    pub instant_monitoring: u64,
    /// `average_monitoring`.
    pub average_monitoring: u64,
    /// `alert`.
    pub alert: u64,
    /// Messages with an empty oneof.
    pub empty: u64,
}

impl SentCounts {
    /// The count of `kind` (messages with an empty oneof are [`SentCounts::empty`]).
    pub fn get(&self, kind: SmMessageKind) -> u64 {
        match kind {
            SmMessageKind::SmInfo => self.sm_info,
            SmMessageKind::NodeConfigStatus => self.node_config_status,
            SmMessageKind::UpdateInstancesStatus => self.update_instances_status,
            SmMessageKind::NodeInstancesStatus => self.node_instances_status,
            SmMessageKind::Log => self.log,
            SmMessageKind::InstantMonitoring => self.instant_monitoring,
            SmMessageKind::AverageMonitoring => self.average_monitoring,
            SmMessageKind::Alert => self.alert,
        }
    }

    fn slot(&mut self, kind: SmMessageKind) -> &mut u64 {
        match kind {
            SmMessageKind::SmInfo => &mut self.sm_info,
            SmMessageKind::NodeConfigStatus => &mut self.node_config_status,
            SmMessageKind::UpdateInstancesStatus => &mut self.update_instances_status,
            SmMessageKind::NodeInstancesStatus => &mut self.node_instances_status,
            SmMessageKind::Log => &mut self.log,
            SmMessageKind::InstantMonitoring => &mut self.instant_monitoring,
            SmMessageKind::AverageMonitoring => &mut self.average_monitoring,
            SmMessageKind::Alert => &mut self.alert,
        }
    }

    fn add(&mut self, kind: SmMessageKind, n: u64) {
        *self.slot(kind) += n;
    }

    /// All messages together, empty ones included.
    pub fn total(&self) -> u64 {
        SmMessageKind::ALL.iter().map(|k| self.get(*k)).sum::<u64>() + self.empty
    }
}

/// Counters of one node, or summed over all nodes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    /// Streams opened (`RegisterSM` answered by the controller).
    pub connects: u64,
    /// Connection or `RegisterSM` attempts that failed before a stream was open.
    pub connect_failures: u64,
    /// Streams that ended after they were open.
    pub disconnects: u64,
    /// Network entries received in `update_networks` commands.
    pub networks_received: u64,
    /// `connection_status` commands that changed the cloud status; the others repeated the
    /// value the node had and were ignored, as a real SM ignores them.
    pub cloud_status_changes: u64,
    /// Commands received, by kind.
    pub commands: CommandCounts,
    /// Messages sent, by kind.
    pub sent: SentCounts,
    /// `NetworkService` calls made (9.1), by RPC; a subscription counts once per call.
    pub network_calls: NetworkCallCounts,
    /// Of them, those that failed: the call itself (a gRPC error, no answer in time, a
    /// subscription's stream that broke), or an `error` in the answer.
    pub network_failures: NetworkCallCounts,
    /// `PendingFirewallUpdate`s received on the node's subscription (9.1).
    pub firewall_updates: u64,
}

impl Counters {
    fn accumulate(&mut self, other: &Self) {
        self.connects += other.connects;
        self.connect_failures += other.connect_failures;
        self.disconnects += other.disconnects;
        self.networks_received += other.networks_received;
        self.cloud_status_changes += other.cloud_status_changes;
        for kind in CommandKind::ALL {
            self.commands.add(kind, other.commands.get(kind));
        }
        for kind in SmMessageKind::ALL {
            self.sent.add(kind, other.sent.get(kind));
        }
        self.sent.empty += other.sent.empty;
        for call in NetworkCall::ALL {
            self.network_calls.add(call, other.network_calls.get(call));
            self.network_failures
                .add(call, other.network_failures.get(call));
        }
        self.firewall_updates += other.firewall_updates;
    }
}

/// A snapshot of one node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeStats {
    /// The node id.
    pub node_id: String,
    /// A stream is open now.
    pub connected: bool,
    /// The node has registered at least once (sent `sm_info`, then received a message).
    pub registered: bool,
    /// The last `connection_status.cloud_status` received, if any (raw enum value).
    pub last_cloud_status: Option<i32>,
    /// The node config state the node reports now.
    pub config_state: String,
    /// The node config version the node reports now.
    pub config_version: String,
    /// The node's counters.
    pub counters: Counters,
}

impl NodeStats {
    /// The last cloud status as the protocol enum (`None` before the first or if unknown).
    pub fn cloud_status(&self) -> Option<ConnectionEnum> {
        self.last_cloud_status
            .and_then(|v| ConnectionEnum::try_from(v).ok())
    }
}

/// A snapshot of a whole simulation.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SimStats {
    /// Every node, in index order.
    pub nodes: Vec<NodeStats>,
    /// The counters of all nodes summed.
    pub total: Counters,
}

impl SimStats {
    /// Builds the totals from `nodes`.
    pub fn from_nodes(nodes: Vec<NodeStats>) -> Self {
        let mut total = Counters::default();
        for node in &nodes {
            total.accumulate(&node.counters);
        }
        Self { nodes, total }
    }

    /// Nodes with a stream open now.
    pub fn connected(&self) -> usize {
        self.nodes.iter().filter(|n| n.connected).count()
    }

    /// Nodes that registered at least once.
    pub fn registered(&self) -> usize {
        self.nodes.iter().filter(|n| n.registered).count()
    }
}

impl fmt::Display for SimStats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let t = &self.total;
        writeln!(
            f,
            "nodes: {} (connected now {}, registered at least once {})",
            self.nodes.len(),
            self.connected(),
            self.registered()
        )?;
        writeln!(
            f,
            "streams: {} opened, {} ended, {} failed attempts",
            t.connects, t.disconnects, t.connect_failures
        )?;
        write!(f, "received {} commands:", t.commands.total())?;
        for kind in CommandKind::ALL {
            let n = t.commands.get(kind);
            if n > 0 {
                write!(f, " {}={n}", kind.name())?;
            }
        }
        writeln!(
            f,
            " (networks: {}, cloud status changes: {})",
            t.networks_received, t.cloud_status_changes
        )?;
        write!(f, "sent {} messages:", t.sent.total())?;
        for kind in SmMessageKind::ALL {
            let n = t.sent.get(kind);
            if n > 0 {
                write!(f, " {}={n}", kind.name())?;
            }
        }
        if t.sent.empty > 0 {
            write!(f, " empty={}", t.sent.empty)?;
        }
        if t.network_calls.total() > 0 || t.firewall_updates > 0 {
            write!(f, "\nNetworkService: {} calls", t.network_calls.total())?;
            for call in NetworkCall::ALL {
                let n = t.network_calls.get(call);
                if n > 0 {
                    write!(f, " {}={n}", call.name())?;
                }
            }
            write!(
                f,
                " ({} failed; firewall updates received: {})",
                t.network_failures.total(),
                t.firewall_updates
            )?;
        }
        Ok(())
    }
}
