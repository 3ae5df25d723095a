//! Telemetry and replies, SM -> controller: `SMOutgoingMessages` <-> [`Inbound`] and what they
//! carry (node info, statuses, log parts, monitoring, alerts).

use smcontroller_api as api;
use smcontroller_routing::Inbound;

use super::{
    ConvertError,
    common::{error_from_proto, error_to_proto, required_ident},
    required, required_timestamp, timestamp_to_proto, vocabulary,
};
use crate::proto::servicemanager::v5::{
    self as pb, alert::AlertItem, sm_outgoing_messages::SmOutgoingMessage,
};

impl SmOutgoingMessage {
    /// Which message this oneof member is, known before (and whether or not) it converts.
    pub fn kind(&self) -> api::SmMessageKind {
        use api::SmMessageKind as K;
        match self {
            Self::SmInfo(_) => K::SmInfo,
            Self::NodeConfigStatus(_) => K::NodeConfigStatus,
            Self::UpdateInstancesStatus(_) => K::UpdateInstancesStatus,
            Self::NodeInstancesStatus(_) => K::NodeInstancesStatus,
            Self::Log(_) => K::Log,
            Self::InstantMonitoring(_) => K::InstantMonitoring,
            Self::AverageMonitoring(_) => K::AverageMonitoring,
            Self::Alert(_) => K::Alert,
        }
    }
}

impl TryFrom<pb::SmOutgoingMessages> for Inbound {
    type Error = ConvertError;

    /// Checks everything a node sends (contract R-TEL-4: the caller logs and skips a message
    /// that fails). A `log` part comes out with an empty `node_id`: the stream knows the node,
    /// and the router fills it in.
    fn try_from(message: pb::SmOutgoingMessages) -> Result<Self, ConvertError> {
        let message = message.sm_outgoing_message.ok_or(ConvertError::EmptyOneof(
            "sm_outgoing_messages.SMOutgoingMessage",
        ))?;
        Ok(match message {
            SmOutgoingMessage::SmInfo(info) => Self::SmInfo(info.try_into()?),
            SmOutgoingMessage::NodeConfigStatus(status) => {
                Self::NodeConfigStatus(status.try_into()?)
            }
            SmOutgoingMessage::UpdateInstancesStatus(s) => {
                Self::UpdateInstancesStatus(statuses_from_proto(s.instances)?)
            }
            SmOutgoingMessage::NodeInstancesStatus(s) => {
                Self::NodeInstancesStatus(statuses_from_proto(s.instances)?)
            }
            SmOutgoingMessage::Log(log) => Self::Log(log.try_into()?),
            SmOutgoingMessage::InstantMonitoring(m) => {
                Self::InstantMonitoring(node_monitoring_from_proto(
                    "instant_monitoring.node_monitoring",
                    m.node_monitoring,
                    m.instances_monitoring,
                )?)
            }
            SmOutgoingMessage::AverageMonitoring(m) => {
                Self::AverageMonitoring(node_monitoring_from_proto(
                    "average_monitoring.node_monitoring",
                    m.node_monitoring,
                    m.instances_monitoring,
                )?)
            }
            SmOutgoingMessage::Alert(alert) => Self::Alert(alert.try_into()?),
        })
    }
}

impl From<Inbound> for pb::SmOutgoingMessages {
    /// What a (simulated) SM sends. The `node_id` of a log part has no place on the wire.
    fn from(message: Inbound) -> Self {
        let message = match message {
            Inbound::SmInfo(info) => SmOutgoingMessage::SmInfo(info.into()),
            Inbound::NodeConfigStatus(status) => SmOutgoingMessage::NodeConfigStatus(status.into()),
            Inbound::UpdateInstancesStatus(instances) => {
                SmOutgoingMessage::UpdateInstancesStatus(pb::UpdateInstancesStatus {
                    instances: instances.into_iter().map(Into::into).collect(),
                })
            }
            Inbound::NodeInstancesStatus(instances) => {
                SmOutgoingMessage::NodeInstancesStatus(pb::NodeInstancesStatus {
                    instances: instances.into_iter().map(Into::into).collect(),
                })
            }
            Inbound::Log(part) => SmOutgoingMessage::Log(part.into()),
            Inbound::InstantMonitoring(data) => {
                let (node_monitoring, instances_monitoring) = node_monitoring_to_proto(data);
                SmOutgoingMessage::InstantMonitoring(pb::InstantMonitoring {
                    node_monitoring,
                    instances_monitoring,
                })
            }
            Inbound::AverageMonitoring(data) => {
                let (node_monitoring, instances_monitoring) = node_monitoring_to_proto(data);
                SmOutgoingMessage::AverageMonitoring(pb::AverageMonitoring {
                    node_monitoring,
                    instances_monitoring,
                })
            }
            Inbound::Alert(alert) => SmOutgoingMessage::Alert(alert.into()),
        };
        Self {
            sm_outgoing_message: Some(message),
        }
    }
}

impl From<api::ResourceInfo> for pb::ResourceInfo {
    fn from(r: api::ResourceInfo) -> Self {
        Self {
            name: r.name,
            shared_count: r.shared_count,
        }
    }
}

impl From<pb::ResourceInfo> for api::ResourceInfo {
    fn from(r: pb::ResourceInfo) -> Self {
        Self {
            name: r.name,
            shared_count: r.shared_count,
        }
    }
}

impl From<api::RuntimeInfo> for pb::RuntimeInfo {
    fn from(r: api::RuntimeInfo) -> Self {
        Self {
            runtime_id: r.runtime_id,
            r#type: r.runtime_type,
            max_dmips: r.max_dmips,
            allowed_dmips: r.allowed_dmips,
            total_ram: r.total_ram,
            allowed_ram: r.allowed_ram,
            max_instances: r.max_instances,
            os_info: r.os_info.map(Into::into),
            arch_info: r.arch_info.map(Into::into),
        }
    }
}

impl From<pb::RuntimeInfo> for api::RuntimeInfo {
    /// `os_info` and `arch_info` are optional.
    fn from(r: pb::RuntimeInfo) -> Self {
        Self {
            runtime_id: r.runtime_id,
            runtime_type: r.r#type,
            max_dmips: r.max_dmips,
            allowed_dmips: r.allowed_dmips,
            total_ram: r.total_ram,
            allowed_ram: r.allowed_ram,
            max_instances: r.max_instances,
            os_info: r.os_info.map(Into::into),
            arch_info: r.arch_info.map(Into::into),
        }
    }
}

impl From<api::SmInfo> for pb::SmInfo {
    fn from(i: api::SmInfo) -> Self {
        Self {
            node_id: i.node_id.as_str().to_owned(),
            runtimes: i.runtimes.into_iter().map(Into::into).collect(),
            resources: i.resources.into_iter().map(Into::into).collect(),
        }
    }
}

impl TryFrom<pb::SmInfo> for api::SmInfo {
    type Error = ConvertError;

    /// An empty `node_id` counts as missing.
    fn try_from(i: pb::SmInfo) -> Result<Self, ConvertError> {
        if i.node_id.is_empty() {
            return Err(ConvertError::MissingField("sm_info.node_id"));
        }
        Ok(Self {
            node_id: api::NodeId::from(i.node_id),
            runtimes: i.runtimes.into_iter().map(Into::into).collect(),
            resources: i.resources.into_iter().map(Into::into).collect(),
        })
    }
}

impl From<api::NodeConfigStatus> for pb::NodeConfigStatus {
    fn from(s: api::NodeConfigStatus) -> Self {
        Self {
            state: s.state.as_str().to_owned(),
            version: s.version,
            error: error_to_proto(s.error),
        }
    }
}

impl TryFrom<pb::NodeConfigStatus> for api::NodeConfigStatus {
    type Error = ConvertError;

    fn try_from(s: pb::NodeConfigStatus) -> Result<Self, ConvertError> {
        Ok(Self {
            state: vocabulary("node_config_status.state", s.state)?,
            version: s.version,
            error: error_from_proto(s.error),
        })
    }
}

impl From<api::EnvVarStatus> for pb::EnvVarStatus {
    fn from(s: api::EnvVarStatus) -> Self {
        Self {
            name: s.name,
            error: error_to_proto(s.error),
        }
    }
}

impl From<pb::EnvVarStatus> for api::EnvVarStatus {
    fn from(s: pb::EnvVarStatus) -> Self {
        Self {
            name: s.name,
            error: error_from_proto(s.error),
        }
    }
}

impl From<api::InstanceStatus> for pb::InstanceStatus {
    fn from(s: api::InstanceStatus) -> Self {
        Self {
            instance: Some(s.ident.into()),
            version: s.version,
            runtime_id: s.runtime_id,
            manifest_digest: s.manifest_digest,
            env_vars: s.env_vars.into_iter().map(Into::into).collect(),
            state: s.state.as_str().to_owned(),
            error: error_to_proto(s.error),
        }
    }
}

impl TryFrom<pb::InstanceStatus> for api::InstanceStatus {
    type Error = ConvertError;

    /// `instance` is required; `state` must be in the vocabulary.
    fn try_from(s: pb::InstanceStatus) -> Result<Self, ConvertError> {
        Ok(Self {
            ident: required_ident("instance_status.instance", s.instance)?,
            version: s.version,
            runtime_id: s.runtime_id,
            manifest_digest: s.manifest_digest,
            env_vars: s.env_vars.into_iter().map(Into::into).collect(),
            state: vocabulary("instance_status.state", s.state)?,
            error: error_from_proto(s.error),
        })
    }
}

/// Converts every status of a list, stopping at the first bad one.
fn statuses_from_proto(
    statuses: Vec<pb::InstanceStatus>,
) -> Result<Vec<api::InstanceStatus>, ConvertError> {
    statuses.into_iter().map(TryInto::try_into).collect()
}

impl From<api::LogPart> for pb::LogData {
    /// The part's `node_id` is dropped: the stream it travels on identifies the node.
    fn from(p: api::LogPart) -> Self {
        Self {
            correlation_id: p.correlation_id,
            part_count: p.part_count,
            part: p.part,
            data: p.data,
            status: p.status.as_str().to_owned(),
            error: error_to_proto(p.error),
        }
    }
}

impl TryFrom<pb::LogData> for api::LogPart {
    type Error = ConvertError;

    /// The result's `node_id` is empty (`NodeId::new("")`); the router, which knows which
    /// stream the part came on, fills it in.
    fn try_from(l: pb::LogData) -> Result<Self, ConvertError> {
        Ok(Self {
            node_id: api::NodeId::new(""),
            correlation_id: l.correlation_id,
            part: l.part,
            part_count: l.part_count,
            data: l.data,
            status: vocabulary("log_data.status", l.status)?,
            error: error_from_proto(l.error),
        })
    }
}

impl From<api::PartitionUsage> for pb::PartitionUsage {
    fn from(p: api::PartitionUsage) -> Self {
        Self {
            name: p.name,
            used_size: p.used_size,
        }
    }
}

impl From<pb::PartitionUsage> for api::PartitionUsage {
    fn from(p: pb::PartitionUsage) -> Self {
        Self {
            name: p.name,
            used_size: p.used_size,
        }
    }
}

impl From<api::MonitoringData> for pb::MonitoringData {
    fn from(m: api::MonitoringData) -> Self {
        Self {
            timestamp: Some(timestamp_to_proto(m.timestamp)),
            ram: m.ram,
            cpu: m.cpu,
            partitions: m.partitions.into_iter().map(Into::into).collect(),
            download: m.download,
            upload: m.upload,
        }
    }
}

impl TryFrom<pb::MonitoringData> for api::MonitoringData {
    type Error = ConvertError;

    /// `timestamp` is required.
    fn try_from(m: pb::MonitoringData) -> Result<Self, ConvertError> {
        Ok(Self {
            timestamp: required_timestamp("monitoring_data.timestamp", m.timestamp)?,
            ram: m.ram,
            cpu: m.cpu,
            partitions: m.partitions.into_iter().map(Into::into).collect(),
            download: m.download,
            upload: m.upload,
        })
    }
}

impl From<api::InstanceMonitoring> for pb::InstanceMonitoring {
    fn from(m: api::InstanceMonitoring) -> Self {
        Self {
            instance: Some(m.ident.into()),
            runtime_id: m.runtime_id,
            monitoring_data: Some(m.data.into()),
        }
    }
}

impl TryFrom<pb::InstanceMonitoring> for api::InstanceMonitoring {
    type Error = ConvertError;

    /// `instance` and `monitoring_data` are required.
    fn try_from(m: pb::InstanceMonitoring) -> Result<Self, ConvertError> {
        Ok(Self {
            ident: required_ident("instance_monitoring.instance", m.instance)?,
            runtime_id: m.runtime_id,
            data: required("instance_monitoring.monitoring_data", m.monitoring_data)?.try_into()?,
        })
    }
}

/// The body shared by `InstantMonitoring` and `AverageMonitoring`.
fn node_monitoring_to_proto(
    data: api::NodeMonitoringData,
) -> (Option<pb::MonitoringData>, Vec<pb::InstanceMonitoring>) {
    (
        Some(data.node.into()),
        data.instances.into_iter().map(Into::into).collect(),
    )
}

/// The body shared by `InstantMonitoring` and `AverageMonitoring`; `node_field` names the
/// required node sample.
fn node_monitoring_from_proto(
    node_field: &'static str,
    node: Option<pb::MonitoringData>,
    instances: Vec<pb::InstanceMonitoring>,
) -> Result<api::NodeMonitoringData, ConvertError> {
    Ok(api::NodeMonitoringData {
        node: required(node_field, node)?.try_into()?,
        instances: instances
            .into_iter()
            .map(TryInto::try_into)
            .collect::<Result<_, _>>()?,
    })
}

impl From<api::Alert> for pb::Alert {
    fn from(a: api::Alert) -> Self {
        let item = match a.kind {
            api::AlertKind::SystemQuota {
                parameter,
                value,
                status,
            } => AlertItem::SystemQuotaAlert(pb::SystemQuotaAlert {
                parameter,
                value,
                status: status.as_str().to_owned(),
            }),
            api::AlertKind::InstanceQuota {
                ident,
                parameter,
                value,
                status,
            } => AlertItem::InstanceQuotaAlert(pb::InstanceQuotaAlert {
                instance: Some(ident.into()),
                parameter,
                value,
                status: status.as_str().to_owned(),
            }),
            api::AlertKind::ResourceAllocate {
                ident,
                resource,
                message,
            } => AlertItem::ResourceAllocateAlert(pb::ResourceAllocateAlert {
                instance: Some(ident.into()),
                resource,
                message,
            }),
            api::AlertKind::System { message } => {
                AlertItem::SystemAlert(pb::SystemAlert { message })
            }
            api::AlertKind::Core { component, message } => AlertItem::CoreAlert(pb::CoreAlert {
                core_component: component.as_str().to_owned(),
                message,
            }),
            api::AlertKind::Instance {
                ident,
                service_version,
                message,
            } => AlertItem::InstanceAlert(pb::InstanceAlert {
                instance: Some(ident.into()),
                service_version,
                message,
            }),
        };
        Self {
            timestamp: Some(timestamp_to_proto(a.timestamp)),
            alert_item: Some(item),
        }
    }
}

impl TryFrom<pb::Alert> for api::Alert {
    type Error = ConvertError;

    /// `timestamp` and the item are required, and so is the instance ident of an instance
    /// quota, resource allocation or instance alert. Quota statuses and core components must be
    /// in their vocabularies; a quota `parameter` is free text.
    fn try_from(a: pb::Alert) -> Result<Self, ConvertError> {
        let timestamp = required_timestamp("alert.timestamp", a.timestamp)?;
        let kind = match required_item(a.alert_item)? {
            AlertItem::SystemQuotaAlert(q) => api::AlertKind::SystemQuota {
                parameter: q.parameter,
                value: q.value,
                status: vocabulary("system_quota_alert.status", q.status)?,
            },
            AlertItem::InstanceQuotaAlert(q) => api::AlertKind::InstanceQuota {
                ident: required_ident("instance_quota_alert.instance", q.instance)?,
                parameter: q.parameter,
                value: q.value,
                status: vocabulary("instance_quota_alert.status", q.status)?,
            },
            AlertItem::ResourceAllocateAlert(r) => api::AlertKind::ResourceAllocate {
                ident: required_ident("resource_allocate_alert.instance", r.instance)?,
                resource: r.resource,
                message: r.message,
            },
            AlertItem::SystemAlert(s) => api::AlertKind::System { message: s.message },
            AlertItem::CoreAlert(c) => api::AlertKind::Core {
                component: vocabulary("core_alert.core_component", c.core_component)?,
                message: c.message,
            },
            AlertItem::InstanceAlert(i) => api::AlertKind::Instance {
                ident: required_ident("instance_alert.instance", i.instance)?,
                service_version: i.service_version,
                message: i.message,
            },
        };
        Ok(Self { timestamp, kind })
    }
}

/// The alert's oneof, which must be set.
fn required_item(item: Option<AlertItem>) -> Result<AlertItem, ConvertError> {
    item.ok_or(ConvertError::EmptyOneof("alert.AlertItem"))
}
