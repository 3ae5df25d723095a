//! The wire-neutral envelopes between a transport and the router: what the controller sends to
//! an SM ([`Outbound`]) and what an SM sends to the controller ([`Inbound`]). The transport
//! (`smcontroller-grpc`) converts them to and from `servicemanager.v5` messages.

use std::time::SystemTime;

use smcontroller_api::{
    Alert, InstanceFilter, InstanceIdent, InstanceStatus, LogPart, NodeConfig, NodeConfigStatus,
    NodeMonitoringData, SmInfo, SmMessageKind, StartInstance, UpdateNetworkParameters,
};

/// A command to one SM (`SMIncomingMessages`).
///
/// Its large bodies are boxed: every stream's outgoing queue allocates room for a block of
/// commands as soon as it is made, so the size of this enum is memory per connected node.
#[derive(Debug, Clone, PartialEq)]
pub enum Outbound {
    /// `get_node_config_status`.
    GetNodeConfigStatus,
    /// `check_node_config`.
    CheckNodeConfig(Box<NodeConfig>),
    /// `set_node_config`.
    SetNodeConfig(Box<NodeConfig>),
    /// `update_instances`.
    UpdateInstances {
        /// Instances to stop.
        stop: Vec<InstanceIdent>,
        /// Instances to start (with their networks under 9.0).
        start: Vec<StartInstance>,
    },
    /// `update_networks`.
    UpdateNetworks(Vec<UpdateNetworkParameters>),
    /// `system_log_request`.
    SystemLog(Box<LogQuery>),
    /// `instance_log_request`.
    InstanceLog(Box<LogQuery>),
    /// `instance_crash_log_request`.
    CrashLog(Box<LogQuery>),
    /// `get_average_monitoring`.
    GetAverageMonitoring,
    /// `connection_status`: `true` when the unit is connected to the cloud.
    ConnectionStatus(bool),
}

impl Outbound {
    /// How many kinds of command there are: [`kind_index`](Self::kind_index) is below it.
    pub const KINDS: usize = 10;

    /// The command's kind as a number below [`KINDS`](Self::KINDS), for tables indexed by kind.
    pub fn kind_index(&self) -> usize {
        match self {
            Self::GetNodeConfigStatus => 0,
            Self::CheckNodeConfig(_) => 1,
            Self::SetNodeConfig(_) => 2,
            Self::UpdateInstances { .. } => 3,
            Self::UpdateNetworks(_) => 4,
            Self::SystemLog(_) => 5,
            Self::InstanceLog(_) => 6,
            Self::CrashLog(_) => 7,
            Self::GetAverageMonitoring => 8,
            Self::ConnectionStatus(_) => 9,
        }
    }

    /// The wire name of the command (its oneof field), for logs and errors.
    pub fn name(&self) -> &'static str {
        match self {
            Self::GetNodeConfigStatus => "get_node_config_status",
            Self::CheckNodeConfig(_) => "check_node_config",
            Self::SetNodeConfig(_) => "set_node_config",
            Self::UpdateInstances { .. } => "update_instances",
            Self::UpdateNetworks(_) => "update_networks",
            Self::SystemLog(_) => "system_log_request",
            Self::InstanceLog(_) => "instance_log_request",
            Self::CrashLog(_) => "instance_crash_log_request",
            Self::GetAverageMonitoring => "get_average_monitoring",
            Self::ConnectionStatus(_) => "connection_status",
        }
    }
}

/// The body of a log request as one node receives it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LogQuery {
    /// Echoed in every log part of the answer.
    pub correlation_id: String,
    /// Which instances (not sent with a system log request).
    pub filter: InstanceFilter,
    /// From this time on, if set.
    pub from: Option<SystemTime>,
    /// Up to this time, if set.
    pub till: Option<SystemTime>,
}

/// A message from one SM (`SMOutgoingMessages`), converted to domain types.
#[derive(Debug, Clone, PartialEq)]
pub enum Inbound {
    /// `sm_info`.
    SmInfo(SmInfo),
    /// `node_config_status`: the reply to get/check/set node config.
    NodeConfigStatus(NodeConfigStatus),
    /// `update_instances_status`.
    UpdateInstancesStatus(Vec<InstanceStatus>),
    /// `node_instances_status`.
    NodeInstancesStatus(Vec<InstanceStatus>),
    /// `log`; the node id of the part is filled in by the router.
    Log(LogPart),
    /// `instant_monitoring`.
    InstantMonitoring(NodeMonitoringData),
    /// `average_monitoring`: the reply to `get_average_monitoring`.
    AverageMonitoring(NodeMonitoringData),
    /// `alert`.
    Alert(Alert),
}

impl Inbound {
    /// Which message this is.
    pub fn kind(&self) -> SmMessageKind {
        match self {
            Self::SmInfo(_) => SmMessageKind::SmInfo,
            Self::NodeConfigStatus(_) => SmMessageKind::NodeConfigStatus,
            Self::UpdateInstancesStatus(_) => SmMessageKind::UpdateInstancesStatus,
            Self::NodeInstancesStatus(_) => SmMessageKind::NodeInstancesStatus,
            Self::Log(_) => SmMessageKind::Log,
            Self::InstantMonitoring(_) => SmMessageKind::InstantMonitoring,
            Self::AverageMonitoring(_) => SmMessageKind::AverageMonitoring,
            Self::Alert(_) => SmMessageKind::Alert,
        }
    }

    /// The wire name of the message (its oneof field), for logs.
    pub fn name(&self) -> &'static str {
        self.kind().name()
    }
}

/// One item a transport hands the router for a stream.
#[derive(Debug)]
pub enum InboundEvent {
    /// A message that converted cleanly.
    Message {
        /// The message.
        message: Inbound,
        /// Its size on the wire, bytes: what it counts against the node's inbound queue budget
        /// (R-BAD-2).
        wire_size: usize,
    },
    /// A message that arrived but could not be converted (R-TEL-4) or had an empty oneof
    /// (R-BAD-1): logged with the node id and skipped; the stream stays up.
    Rejected {
        /// The message's wire name, when known.
        message: &'static str,
        /// Why it was rejected (names the field and the value).
        reason: String,
    },
    /// The stream failed (reset, decode error, over-size message, keepalive timeout); it ends.
    Failed(String),
    /// The transport refuses what the SM claims (an `sm_info` whose node id its client
    /// certificate does not carry, R-TLS-4): the stream ends with `PERMISSION_DENIED` and, if it
    /// was not registered yet, never registers, so it cannot displace the real node.
    Denied(String),
}

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
    /// The SM is not allowed what it asked (its certificate does not carry its node id).
    PermissionDenied,
    /// A budget is used up (R-BAD-2): too many nodes, too many streams not yet registered, or
    /// the node does not read its commands.
    ResourceExhausted,
}
