//! Domain types carried by the SM controller's interfaces.
//!
//! They mirror the `servicemanager.v5` messages with Rust types: identifiers as [`NodeId`] or
//! `String`, time as [`SystemTime`]/[`Duration`], the protocol's string vocabularies as enums and
//! optional parts as `Option`. Conversions to and from the wire live in `smcontroller-grpc`.

use std::{fmt, str::FromStr, sync::Arc, time::Duration, time::SystemTime};

use serde::{Deserialize, Serialize};

mod config_json;
pub mod iso8601;

pub use config_json::NodeConfigJsonError;

/// The id of a node: the `node_id` its SM sends in `sm_info`. Cheap to clone.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NodeId(Arc<str>);

impl NodeId {
    /// A node id from any string.
    pub fn new(id: impl AsRef<str>) -> Self {
        Self(Arc::from(id.as_ref()))
    }

    /// The id as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<&str> for NodeId {
    fn from(id: &str) -> Self {
        Self::new(id)
    }
}

impl From<String> for NodeId {
    fn from(id: String) -> Self {
        Self(Arc::from(id))
    }
}

impl AsRef<str> for NodeId {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl std::borrow::Borrow<str> for NodeId {
    fn borrow(&self) -> &str {
        &self.0
    }
}

/// A failure reported by a node: `common.v2.ErrorInfo`.
///
/// In the domain, `Option<ErrorInfo>` is `None` on success. On the wire the real SM puts an
/// `ErrorInfo` on every status, also when nothing failed: the transport turns an absent one, and
/// one with `aos_code` 0 and `exit_code` 0, into `None`. So a `Some` always means a failure:
/// `aos_code` non-zero is a failure of that Aos error kind, `aos_code` 0 with a non-zero
/// `exit_code` is a failure with that process exit code. An `ErrorInfo` whose codes are both 0
/// cannot say "failed" to the reference; the transport sends it as the generic Aos failure
/// ([`ErrorInfo::AOS_FAILED`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ErrorInfo {
    /// The Aos error kind, as a number.
    pub aos_code: i32,
    /// A process exit code, where one applies.
    pub exit_code: i32,
    /// What went wrong, in words.
    pub message: String,
}

impl ErrorInfo {
    /// The Aos error kind "failed" (`eFailed`), the generic failure.
    pub const AOS_FAILED: i32 = 1;

    /// A failure of the Aos error kind `aos_code` with `message`.
    pub fn new(aos_code: i32, message: impl Into<String>) -> Self {
        Self {
            aos_code,
            exit_code: 0,
            message: message.into(),
        }
    }

    /// Whether these codes say "failed" on the wire: `aos_code` or `exit_code` is not 0.
    pub fn is_failure(&self) -> bool {
        self.aos_code != 0 || self.exit_code != 0
    }
}

/// Declares a closed string vocabulary of the protocol: an enum with its wire spelling,
/// `as_str`, `Display` and a `FromStr` that rejects anything else.
macro_rules! vocabulary {
    (
        $(#[$meta:meta])*
        $name:ident { $( $(#[$vmeta:meta])* $variant:ident = $wire:literal ),+ $(,)? }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum $name {
            $( $(#[$vmeta])* $variant ),+
        }

        impl $name {
            /// Every value, in declaration order.
            pub const ALL: &'static [Self] = &[$(Self::$variant),+];

            /// The value as it is spelled on the wire.
            pub fn as_str(self) -> &'static str {
                match self {
                    $(Self::$variant => $wire),+
                }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl FromStr for $name {
            type Err = UnknownValue;

            fn from_str(value: &str) -> Result<Self, Self::Err> {
                match value {
                    $($wire => Ok(Self::$variant),)+
                    _ => Err(UnknownValue {
                        vocabulary: stringify!($name),
                        value: value.to_owned(),
                    }),
                }
            }
        }
    };
}

/// A string that is not part of a protocol vocabulary.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{value:?} is not a valid {vocabulary}")]
pub struct UnknownValue {
    /// The vocabulary (the enum's name).
    pub vocabulary: &'static str,
    /// The value that was given.
    pub value: String,
}

vocabulary! {
    /// The state of a node's configuration (`NodeConfigStatus.state`).
    NodeConfigState {
        /// No configuration installed.
        Absent = "absent",
        /// The configuration is installed.
        Installed = "installed",
        /// Installing the configuration failed.
        Failed = "failed",
    }
}

vocabulary! {
    /// The state of a service instance (`InstanceStatus.state`).
    InstanceState {
        /// Starting.
        Activating = "activating",
        /// Running.
        Active = "active",
        /// Stopped.
        Inactive = "inactive",
        /// Failed to start or crashed.
        Failed = "failed",
    }
}

vocabulary! {
    /// The status of a log part (`LogData.status`).
    LogStatus {
        /// The part carries log data.
        Ok = "ok",
        /// Collecting the log failed; see the error.
        Error = "error",
        /// The log is empty.
        Empty = "empty",
        /// There is no such log.
        Absent = "absent",
    }
}

vocabulary! {
    /// The phase of a quota alert (`SystemQuotaAlert.status`, `InstanceQuotaAlert.status`).
    QuotaAlertState {
        /// The threshold has just been crossed.
        Raise = "raise",
        /// Still over the threshold.
        Continue = "continue",
        /// Back under the threshold.
        Fall = "fall",
    }
}

vocabulary! {
    /// The Aos core component that raised a core alert (`CoreAlert.core_component`).
    CoreComponent {
        /// Communication manager.
        Cm = "CM",
        /// Service manager.
        Sm = "SM",
        /// Identity and access manager.
        Iam = "IAM",
        /// Message proxy.
        Mp = "MP",
        /// Not known.
        Unknown = "unknown",
    }
}

/// The kind of an update item (`common.v2.ItemType`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum ItemType {
    /// A service.
    #[default]
    Service,
    /// A component.
    Component,
}

/// Identifies one service instance (`common.v2.InstanceIdent`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct InstanceIdent {
    /// The service (or component) id.
    pub item_id: String,
    /// The subject the instance runs for.
    pub subject_id: String,
    /// The instance index.
    pub instance: u64,
    /// Service or component.
    pub item_type: ItemType,
    /// Whether the item was preinstalled on the node.
    pub preinstalled: bool,
}

/// Selects instances (`common.v2.InstanceFilter`); `None` means "any".
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct InstanceFilter {
    /// Only this item, or any.
    pub item_id: Option<String>,
    /// Only this subject, or any.
    pub subject_id: Option<String>,
    /// Only this instance index, or any.
    pub instance: Option<u64>,
}

/// CPU architecture of a runtime (`common.v2.ArchInfo`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ArchInfo {
    /// Architecture, e.g. `amd64`.
    pub architecture: String,
    /// Variant, e.g. `v8`; may be empty.
    pub variant: String,
}

/// Operating system of a runtime (`common.v2.OSInfo`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OsInfo {
    /// OS name, e.g. `linux`.
    pub os: String,
    /// OS version; may be empty.
    pub version: String,
    /// OS features.
    pub features: Vec<String>,
}

/// One runtime a node offers (`RuntimeInfo`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RuntimeInfo {
    /// Runtime id.
    pub runtime_id: String,
    /// Runtime type, e.g. `runc`, `crun`, `xrun`.
    pub runtime_type: String,
    /// Maximum DMIPS.
    pub max_dmips: u64,
    /// DMIPS allowed to instances.
    pub allowed_dmips: u64,
    /// Total RAM, bytes.
    pub total_ram: u64,
    /// RAM allowed to instances, bytes.
    pub allowed_ram: u64,
    /// Maximum number of instances.
    pub max_instances: u64,
    /// Operating system, when the SM reports one.
    pub os_info: Option<OsInfo>,
    /// Architecture, when the SM reports one.
    pub arch_info: Option<ArchInfo>,
}

/// A shareable host resource (`ResourceInfo`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ResourceInfo {
    /// Resource name.
    pub name: String,
    /// How many instances may share it.
    pub shared_count: u64,
}

/// What an SM says about its node when it registers (`SMInfo`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SmInfo {
    /// The node id; never empty once accepted.
    pub node_id: NodeId,
    /// The runtimes the node offers.
    pub runtimes: Vec<RuntimeInfo>,
    /// The node's shareable resources.
    pub resources: Vec<ResourceInfo>,
}

/// The state of a node's configuration (`NodeConfigStatus`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeConfigStatus {
    /// Absent, installed or failed.
    pub state: NodeConfigState,
    /// The configuration version the node has (or was asked to check or set).
    pub version: String,
    /// The node's error, when the last operation failed.
    pub error: Option<ErrorInfo>,
}

/// A node configuration: the JSON document that `CheckNodeConfig`/`SetNodeConfig` carry
/// (camelCase keys, ISO 8601 durations). Build one with [`NodeConfig::new`]: the node group
/// subject has no default. [`NodeConfig::to_json`] writes the keys as the reference controller
/// does; [`NodeConfig::from_json`] reads keys case-insensitively, as a real SM does.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeConfig {
    /// The configuration version; also sent beside the document.
    pub version: String,
    /// The node this configuration is for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<Codename>,
    /// The node group (node type) this configuration is for. Required: the reference
    /// controller always writes it, and a real SM cannot parse a configuration without it (it
    /// then sends no reply at all).
    pub node_group_subject: Codename,
    /// Thresholds that raise alerts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alert_rules: Option<AlertRules>,
    /// Shares of the node's resources given to instances, in percent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resource_ratios: Option<ResourceRatios>,
    /// Node labels.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub labels: Vec<String>,
    /// Node priority.
    #[serde(default)]
    pub priority: u64,
}

/// `{"codename": "..."}` in a node configuration.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Codename {
    /// The codename.
    pub codename: String,
}

/// Resource shares of a node configuration, in percent.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ResourceRatios {
    /// CPU share.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu: Option<f64>,
    /// RAM share.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ram: Option<f64>,
    /// Storage share.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage: Option<f64>,
    /// State share.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<f64>,
}

/// A percentage alert rule (`AlertRulePercents`; `minTimeout` in node config JSON).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AlertRulePercents {
    /// How long the value must stay over the threshold (`duration` on the wire).
    #[serde(
        with = "iso8601::serde_duration",
        default,
        skip_serializing_if = "Duration::is_zero"
    )]
    pub min_timeout: Duration,
    /// Lower threshold.
    pub min_threshold: f64,
    /// Upper threshold.
    pub max_threshold: f64,
}

/// An absolute alert rule (`AlertRulePoints`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AlertRulePoints {
    /// How long the value must stay over the threshold (`duration` on the wire).
    #[serde(
        with = "iso8601::serde_duration",
        default,
        skip_serializing_if = "Duration::is_zero"
    )]
    pub min_timeout: Duration,
    /// Lower threshold.
    pub min_threshold: u64,
    /// Upper threshold.
    pub max_threshold: u64,
}

/// A partition alert rule (`PartitionAlertRule`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PartitionAlertRule {
    /// Partition name.
    pub name: String,
    /// How long the value must stay over the threshold (`duration` on the wire).
    #[serde(
        with = "iso8601::serde_duration",
        default,
        skip_serializing_if = "Duration::is_zero"
    )]
    pub min_timeout: Duration,
    /// Lower threshold, percent.
    pub min_threshold: f64,
    /// Upper threshold, percent.
    pub max_threshold: f64,
}

/// Alert rules (`AlertRules`), in a node configuration or an instance's monitoring parameters.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct AlertRules {
    /// RAM usage rule.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ram: Option<AlertRulePercents>,
    /// CPU usage rule.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu: Option<AlertRulePercents>,
    /// Download traffic rule.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub download: Option<AlertRulePoints>,
    /// Upload traffic rule.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upload: Option<AlertRulePoints>,
    /// Partition usage rules (always written, also when empty, as the reference does).
    #[serde(default)]
    pub partitions: Vec<PartitionAlertRule>,
}

/// An environment variable of an instance (`EnvVarInfo`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EnvVarInfo {
    /// Name.
    pub name: String,
    /// Value.
    pub value: String,
}

/// A firewall rule of an instance network (`FirewallRule`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FirewallRule {
    /// Destination IP.
    pub dst_ip: String,
    /// Destination port (or range).
    pub dst_port: String,
    /// Protocol: `tcp`, `udp`, ...
    pub proto: String,
    /// Source IP.
    pub src_ip: String,
}

/// Network settings of an instance (`NetworkParameters` of 9.0; under 9.1 the answer to
/// `AllocateInstanceNetwork`, with the `network_id` of the request).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NetworkParameters {
    /// Network id.
    pub network_id: String,
    /// Subnet, CIDR.
    pub subnet: String,
    /// The instance's IP.
    pub ip: String,
    /// DNS servers.
    pub dns_servers: Vec<String>,
    /// Firewall rules.
    pub rules: Vec<FirewallRule>,
}

/// Monitoring settings of an instance (`MonitoringParameters`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct MonitoringParameters {
    /// Alert rules, if any.
    pub alert_rules: Option<AlertRules>,
}

/// Everything a node needs to start one instance (`InstanceInfo`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct InstanceInfo {
    /// Which instance.
    pub ident: InstanceIdent,
    /// Item version.
    pub version: String,
    /// Digest of the item's manifest.
    pub manifest_digest: String,
    /// Owner id.
    pub owner_id: String,
    /// Runtime to run it in.
    pub runtime_id: String,
    /// User id.
    pub uid: u32,
    /// Group id.
    pub gid: u32,
    /// Priority.
    pub priority: u64,
    /// Storage path.
    pub storage_path: String,
    /// State path.
    pub state_path: String,
    /// Environment variables.
    pub env_vars: Vec<EnvVarInfo>,
    /// Monitoring settings, if any.
    pub monitoring_parameters: Option<MonitoringParameters>,
}

/// One instance to start, as [`InstanceRunner::update_instances`](crate::InstanceRunner) takes
/// it: the instance, and beside it the network the CM computed for it, which only the 9.0 wire
/// revision carries (`InstanceInfo.network_parameters`, field 12). Under 9.1 a node asks for
/// its networks itself (`NetworkService`), so `network` must be `None` there.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StartInstance {
    /// The instance.
    pub info: InstanceInfo,
    /// Its network settings (9.0 only).
    pub network: Option<NetworkParameters>,
}

impl From<InstanceInfo> for StartInstance {
    /// An instance without network settings: what every instance is under 9.1.
    fn from(info: InstanceInfo) -> Self {
        Self {
            info,
            network: None,
        }
    }
}

/// The revision of `servicemanager.v5` a unit's SMs speak. Nothing on the wire tells them
/// apart, so it is set per unit (`smProtocol`); one controller speaks one.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum SmProtocol {
    /// Aos 9.0: networks pushed with `update_networks` and carried in `InstanceInfo` field 12,
    /// monitoring parameters in field 13.
    #[default]
    #[serde(rename = "9.0")]
    V9_0,
    /// Aos 9.1 and later releases: no `update_networks`; `InstanceInfo` field 12 is the
    /// monitoring parameters; nodes call `servicemanager.v5.NetworkService` on the same port.
    #[serde(rename = "9.1")]
    V9_1,
}

impl SmProtocol {
    /// `"9.0"` or `"9.1"`, as the config and the operator's tools write it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::V9_0 => "9.0",
            Self::V9_1 => "9.1",
        }
    }
}

impl fmt::Display for SmProtocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for SmProtocol {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "9.0" => Ok(Self::V9_0),
            "9.1" => Ok(Self::V9_1),
            other => Err(format!(
                "{other:?} is not an SM protocol revision: give \"9.0\" or \"9.1\""
            )),
        }
    }
}

/// What an instance's item declares of its network (`UpdateItemNetworkParams`, 9.1): the host
/// names it answers to, the connections it may open (`itemID/port[/proto]`) and the ports it
/// exposes (`port[/proto]`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ItemNetworkParameters {
    /// Host names of the instance.
    pub hosts: Vec<String>,
    /// Connections it may open: `itemID/port[/proto]`.
    pub allowed_connections: Vec<String>,
    /// Ports it exposes: `port[/proto]`.
    pub exposed_ports: Vec<String>,
}

/// What a node reports of one running instance's network (`InstanceNetworkStateInfo`, 9.1).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct InstanceNetworkState {
    /// The instance.
    pub instance: InstanceIdent,
    /// Its network.
    pub network_id: String,
    /// Its address there.
    pub ip: String,
    /// The firewall rules the node applies for it.
    pub rules: Vec<FirewallRule>,
}

/// New firewall rules of one instance, pushed to its node (`PendingFirewallUpdate`, 9.1): the
/// instance's whole rule set, which replaces what the node had.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PendingFirewallUpdate {
    /// The instance.
    pub instance: InstanceIdent,
    /// Its complete set of rules.
    pub rules: Vec<FirewallRule>,
}

/// One network of a node (`UpdateNetworkParameters` of 9.0; under 9.1 the answer to
/// `GetNodeNetworkParams`, with the `network_id` of the request).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UpdateNetworkParameters {
    /// Network id.
    pub network_id: String,
    /// Subnet, CIDR.
    pub subnet: String,
    /// The node's IP in it.
    pub ip: String,
    /// VLAN id.
    pub vlan_id: u64,
}

/// The status of one environment variable of an instance (`EnvVarStatus`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EnvVarStatus {
    /// Variable name.
    pub name: String,
    /// Why applying it failed, if it did.
    pub error: Option<ErrorInfo>,
}

/// The status of one instance (`InstanceStatus`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstanceStatus {
    /// Which instance.
    pub ident: InstanceIdent,
    /// Item version.
    pub version: String,
    /// Runtime it runs in.
    pub runtime_id: String,
    /// Digest of its manifest.
    pub manifest_digest: String,
    /// Statuses of its environment variables.
    pub env_vars: Vec<EnvVarStatus>,
    /// Its state.
    pub state: InstanceState,
    /// Its error, if it failed.
    pub error: Option<ErrorInfo>,
}

/// The environment-variable statuses of one instance, as [`EnvVarsStatusSender`] gets them.
///
/// [`EnvVarsStatusSender`]: crate::EnvVarsStatusSender
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstanceEnvVarsStatus {
    /// Which instance.
    pub ident: InstanceIdent,
    /// Its environment-variable statuses.
    pub statuses: Vec<EnvVarStatus>,
}

/// Usage of one partition (`PartitionUsage`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PartitionUsage {
    /// Partition name.
    pub name: String,
    /// Bytes used.
    pub used_size: u64,
}

/// One monitoring sample (`MonitoringData`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MonitoringData {
    /// When it was taken.
    pub timestamp: SystemTime,
    /// RAM used, bytes.
    pub ram: u64,
    /// CPU used (DMIPS).
    pub cpu: u64,
    /// Partition usage.
    pub partitions: Vec<PartitionUsage>,
    /// Download traffic.
    pub download: u64,
    /// Upload traffic.
    pub upload: u64,
}

/// Monitoring of one instance (`InstanceMonitoring`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstanceMonitoring {
    /// Which instance.
    pub ident: InstanceIdent,
    /// Runtime it runs in.
    pub runtime_id: String,
    /// The sample.
    pub data: MonitoringData,
}

/// Monitoring of a node and its instances (`InstantMonitoring`, `AverageMonitoring`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeMonitoringData {
    /// The node as a whole.
    pub node: MonitoringData,
    /// Each instance.
    pub instances: Vec<InstanceMonitoring>,
}

/// What an alert is about (`Alert.AlertItem`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AlertKind {
    /// A node resource crossed its quota.
    SystemQuota {
        /// Resource (`cpu`, `ram`, `download`, `upload` or a partition name).
        parameter: String,
        /// Current value.
        value: u64,
        /// Raise, continue or fall.
        status: QuotaAlertState,
    },
    /// An instance resource crossed its quota.
    InstanceQuota {
        /// Which instance.
        ident: InstanceIdent,
        /// Resource name.
        parameter: String,
        /// Current value.
        value: u64,
        /// Raise, continue or fall.
        status: QuotaAlertState,
    },
    /// A resource could not be allocated to an instance.
    ResourceAllocate {
        /// Which instance.
        ident: InstanceIdent,
        /// The resource.
        resource: String,
        /// What happened.
        message: String,
    },
    /// A system event.
    System {
        /// What happened.
        message: String,
    },
    /// An event of an Aos core component.
    Core {
        /// Which component.
        component: CoreComponent,
        /// What happened.
        message: String,
    },
    /// An event of an instance.
    Instance {
        /// Which instance.
        ident: InstanceIdent,
        /// The service version.
        service_version: String,
        /// What happened.
        message: String,
    },
}

/// An alert raised by a node (`Alert`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Alert {
    /// When it was raised.
    pub timestamp: SystemTime,
    /// What it is about.
    pub kind: AlertKind,
}

/// The kind of log a [`LogRequest`] asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LogType {
    /// The node's system log (`system_log_request`).
    System,
    /// Instance logs (`instance_log_request`).
    Instance,
    /// Instance crash logs (`instance_crash_log_request`).
    Crash,
}

/// A request for logs from one or more nodes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogRequest {
    /// Echoed in every [`LogPart`] of the answer.
    pub correlation_id: String,
    /// Which log.
    pub log_type: LogType,
    /// The nodes to ask; empty means every registered node.
    pub node_ids: Vec<NodeId>,
    /// Which instances (ignored for [`LogType::System`]).
    pub instance_filter: InstanceFilter,
    /// Entries from this time on, if set.
    pub from: Option<SystemTime>,
    /// Entries up to this time, if set.
    pub till: Option<SystemTime>,
}

/// One part of a log a node sends back (`LogData`), with the node it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogPart {
    /// The node that sent it.
    pub node_id: NodeId,
    /// The request's correlation id.
    pub correlation_id: String,
    /// 1-based part number (0 may come with an error).
    pub part: u64,
    /// Total number of parts.
    pub part_count: u64,
    /// The log bytes of this part.
    pub data: Vec<u8>,
    /// Ok, error, empty or absent.
    pub status: LogStatus,
    /// The node's error, with status `error`.
    pub error: Option<ErrorInfo>,
}

/// Why a node's stream ended, as [`SmInfoReceiver::on_node_disconnected`] hears it.
///
/// [`SmInfoReceiver::on_node_disconnected`]: crate::SmInfoReceiver::on_node_disconnected
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DisconnectReason {
    /// The stream ended without an error: the SM closed it, or its connection was shut down
    /// (a keepalive ping went unanswered, the peer's TCP connection closed).
    Closed,
    /// The stream failed (reset, I/O error, keepalive timeout, undecodable frame).
    Error(String),
    /// A newer stream with the same node id replaced this one.
    Replaced,
    /// The SM broke the protocol (e.g. changed its node id); the controller ended the stream.
    ProtocolViolation(String),
    /// The controller is stopping or restarting its server.
    Shutdown,
}

impl fmt::Display for DisconnectReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Closed => {
                f.write_str("stream ended (closed by the SM, or its connection was lost)")
            }
            Self::Error(e) => write!(f, "stream failed: {e}"),
            Self::Replaced => f.write_str("replaced by a newer stream of the same node"),
            Self::ProtocolViolation(e) => write!(f, "protocol violation: {e}"),
            Self::Shutdown => f.write_str("controller shutting down"),
        }
    }
}

/// The kinds of message an SM sends to the controller: the members of the oneof of
/// `SMOutgoingMessages`, without their bodies.
///
/// The one list of them and of their wire names: the router names what it receives with it
/// (in its log and in the `smcontroller_messages_in_total{kind}` metric), the transport names a
/// message with it before the message converts, and the SM simulator counts what it sends by it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SmMessageKind {
    /// `sm_info`.
    SmInfo,
    /// `node_config_status`.
    NodeConfigStatus,
    /// `update_instances_status`.
    UpdateInstancesStatus,
    /// `node_instances_status`.
    NodeInstancesStatus,
    /// `log`.
    Log,
    /// `instant_monitoring`.
    InstantMonitoring,
    /// `average_monitoring`.
    AverageMonitoring,
    /// `alert`.
    Alert,
}

impl SmMessageKind {
    /// Every kind, in wire order (by field number, `sm_info` = 1 first).
    pub const ALL: [Self; 8] = [
        Self::SmInfo,
        Self::NodeConfigStatus,
        Self::UpdateInstancesStatus,
        Self::NodeInstancesStatus,
        Self::Log,
        Self::InstantMonitoring,
        Self::AverageMonitoring,
        Self::Alert,
    ];

    /// The wire name: the oneof field of `SMOutgoingMessages`.
    pub fn name(self) -> &'static str {
        match self {
            Self::SmInfo => "sm_info",
            Self::NodeConfigStatus => "node_config_status",
            Self::UpdateInstancesStatus => "update_instances_status",
            Self::NodeInstancesStatus => "node_instances_status",
            Self::Log => "log",
            Self::InstantMonitoring => "instant_monitoring",
            Self::AverageMonitoring => "average_monitoring",
            Self::Alert => "alert",
        }
    }

    /// The kind's place in [`SmMessageKind::ALL`], for tables indexed by kind.
    pub fn index(self) -> usize {
        self as usize
    }
}

impl fmt::Display for SmMessageKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Where the server's certificate and key are (`CertProvider::get_cert`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertInfo {
    /// URL of the certificate chain, e.g. `file:///var/aos/crypt/sm.pem` (later `pkcs11:...`).
    pub cert_url: String,
    /// URL of the private key.
    pub key_url: String,
    /// When the certificate expires, if known.
    pub not_after: Option<SystemTime>,
}

/// A DER-encoded certificate.
#[derive(Clone, PartialEq, Eq)]
pub struct CertificateDer(pub Vec<u8>);

impl fmt::Debug for CertificateDer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CertificateDer({} bytes)", self.0.len())
    }
}

/// A DER-encoded private key (PKCS#8, PKCS#1 or SEC1). Its `Debug` never prints the key.
#[derive(Clone, PartialEq, Eq)]
pub struct PrivateKeyDer(pub Vec<u8>);

impl fmt::Debug for PrivateKeyDer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PrivateKeyDer(<redacted>)")
    }
}
