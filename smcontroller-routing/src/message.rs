//! The wire-neutral envelopes between a transport and the router: what the controller sends to
//! an SM ([`Outbound`]) and what an SM sends to the controller ([`Inbound`]). The transport
//! (`smcontroller-grpc`) converts them to and from `servicemanager.v5` messages.

use std::time::SystemTime;

use smcontroller_api::{
    Alert, InstanceFilter, InstanceIdent, InstanceInfo, InstanceStatus, LogPart, NodeConfig,
    NodeConfigStatus, NodeMonitoringData, SmInfo, UpdateNetworkParameters,
};

/// A command to one SM (`SMIncomingMessages`).
#[derive(Debug, Clone, PartialEq)]
pub enum Outbound {
    /// `get_node_config_status`.
    GetNodeConfigStatus,
    /// `check_node_config`.
    CheckNodeConfig(NodeConfig),
    /// `set_node_config`.
    SetNodeConfig(NodeConfig),
    /// `update_instances`.
    UpdateInstances {
        /// Instances to stop.
        stop: Vec<InstanceIdent>,
        /// Instances to start.
        start: Vec<InstanceInfo>,
    },
    /// `update_networks`.
    UpdateNetworks(Vec<UpdateNetworkParameters>),
    /// `system_log_request`.
    SystemLog(LogQuery),
    /// `instance_log_request`.
    InstanceLog(LogQuery),
    /// `instance_crash_log_request`.
    CrashLog(LogQuery),
    /// `get_average_monitoring`.
    GetAverageMonitoring,
    /// `connection_status`: `true` when the unit is connected to the cloud.
    ConnectionStatus(bool),
}

impl Outbound {
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
    /// The wire name of the message (its oneof field), for logs.
    pub fn name(&self) -> &'static str {
        match self {
            Self::SmInfo(_) => "sm_info",
            Self::NodeConfigStatus(_) => "node_config_status",
            Self::UpdateInstancesStatus(_) => "update_instances_status",
            Self::NodeInstancesStatus(_) => "node_instances_status",
            Self::Log(_) => "log",
            Self::InstantMonitoring(_) => "instant_monitoring",
            Self::AverageMonitoring(_) => "average_monitoring",
            Self::Alert(_) => "alert",
        }
    }
}

/// One item a transport hands the router for a stream.
#[derive(Debug)]
pub enum InboundEvent {
    /// A message that converted cleanly.
    Message(Inbound),
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
}
