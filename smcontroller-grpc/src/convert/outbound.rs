//! Commands, controller -> SM: [`Outbound`] <-> `SMIncomingMessages` and what they carry
//! (instance infos, network and monitoring parameters, alert rules, log requests).

use smcontroller_api as api;
use smcontroller_routing::{LogQuery, Outbound};

use super::{
    ConvertError, common::idents_from_proto, common::required_ident, duration_from_proto,
    duration_to_proto, optional_timestamp, timestamp_to_proto, unknown_number,
};
use crate::proto::servicemanager::v5::{self as pb, sm_incoming_messages::SmIncomingMessage};

impl From<Outbound> for pb::SmIncomingMessages {
    /// Every command has a wire form. A node configuration goes as its JSON document, with its
    /// version beside it; a system log request carries no instance filter.
    fn from(command: Outbound) -> Self {
        let message = match command {
            Outbound::GetNodeConfigStatus => {
                SmIncomingMessage::GetNodeConfigStatus(pb::GetNodeConfigStatus {})
            }
            Outbound::CheckNodeConfig(config) => {
                let (node_config, version) = node_config_to_json(&config);
                SmIncomingMessage::CheckNodeConfig(pb::CheckNodeConfig {
                    node_config,
                    version,
                })
            }
            Outbound::SetNodeConfig(config) => {
                let (node_config, version) = node_config_to_json(&config);
                SmIncomingMessage::SetNodeConfig(pb::SetNodeConfig {
                    node_config,
                    version,
                })
            }
            Outbound::UpdateInstances { stop, start } => {
                SmIncomingMessage::UpdateInstances(pb::UpdateInstances {
                    start_instances: start.into_iter().map(Into::into).collect(),
                    stop_instances: stop.into_iter().map(Into::into).collect(),
                })
            }
            Outbound::UpdateNetworks(networks) => {
                SmIncomingMessage::UpdateNetworks(pb::UpdateNetworks {
                    networks: networks.into_iter().map(Into::into).collect(),
                })
            }
            Outbound::SystemLog(query) => SmIncomingMessage::SystemLogRequest((*query).into()),
            Outbound::InstanceLog(query) => SmIncomingMessage::InstanceLogRequest((*query).into()),
            Outbound::CrashLog(query) => {
                SmIncomingMessage::InstanceCrashLogRequest((*query).into())
            }
            Outbound::GetAverageMonitoring => {
                SmIncomingMessage::GetAverageMonitoring(pb::GetAverageMonitoring {})
            }
            Outbound::ConnectionStatus(connected) => {
                let status = if connected {
                    pb::ConnectionEnum::Connected
                } else {
                    pb::ConnectionEnum::Disconnected
                };
                SmIncomingMessage::ConnectionStatus(pb::ConnectionStatus {
                    cloud_status: status.into(),
                })
            }
        };
        Self {
            sm_incoming_message: Some(message),
        }
    }
}

impl TryFrom<pb::SmIncomingMessages> for Outbound {
    type Error = ConvertError;

    /// What an SM makes of a command. The node configuration's own `version` (inside the JSON)
    /// is authoritative; the `version` beside it is not checked. An absent instance filter means
    /// "any instance".
    fn try_from(message: pb::SmIncomingMessages) -> Result<Self, ConvertError> {
        let message = message.sm_incoming_message.ok_or(ConvertError::EmptyOneof(
            "sm_incoming_messages.SMIncomingMessage",
        ))?;
        Ok(match message {
            SmIncomingMessage::GetNodeConfigStatus(_) => Self::GetNodeConfigStatus,
            SmIncomingMessage::CheckNodeConfig(c) => Self::CheckNodeConfig(Box::new(
                node_config_from_json("check_node_config.node_config", &c.node_config)?,
            )),
            SmIncomingMessage::SetNodeConfig(c) => Self::SetNodeConfig(Box::new(
                node_config_from_json("set_node_config.node_config", &c.node_config)?,
            )),
            SmIncomingMessage::UpdateInstances(u) => Self::UpdateInstances {
                stop: idents_from_proto(u.stop_instances)?,
                start: u
                    .start_instances
                    .into_iter()
                    .map(TryInto::try_into)
                    .collect::<Result<_, _>>()?,
            },
            SmIncomingMessage::SystemLogRequest(r) => Self::SystemLog(Box::new(r.try_into()?)),
            SmIncomingMessage::InstanceLogRequest(r) => Self::InstanceLog(Box::new(r.try_into()?)),
            SmIncomingMessage::InstanceCrashLogRequest(r) => {
                Self::CrashLog(Box::new(r.try_into()?))
            }
            SmIncomingMessage::GetAverageMonitoring(_) => Self::GetAverageMonitoring,
            SmIncomingMessage::ConnectionStatus(s) => {
                match pb::ConnectionEnum::try_from(s.cloud_status) {
                    Ok(pb::ConnectionEnum::Connected) => Self::ConnectionStatus(true),
                    Ok(pb::ConnectionEnum::Disconnected) => Self::ConnectionStatus(false),
                    Err(_) => {
                        return Err(unknown_number(
                            "connection_status.cloud_status",
                            s.cloud_status,
                        ));
                    }
                }
            }
            SmIncomingMessage::UpdateNetworks(n) => {
                Self::UpdateNetworks(n.networks.into_iter().map(Into::into).collect())
            }
        })
    }
}

/// The JSON document and the version that `check_node_config`/`set_node_config` carry.
fn node_config_to_json(config: &api::NodeConfig) -> (String, String) {
    (config.to_json(), config.version.clone())
}

/// Parses a node configuration document as a real SM does (keys case-insensitively,
/// `nodeGroupSubject` required).
fn node_config_from_json(field: &'static str, json: &str) -> Result<api::NodeConfig, ConvertError> {
    api::NodeConfig::from_json(json).map_err(|e| ConvertError::InvalidNodeConfig {
        field,
        reason: e.to_string(),
    })
}

impl From<LogQuery> for pb::SystemLogRequest {
    /// The query's filter is not part of a system log request and is dropped.
    fn from(q: LogQuery) -> Self {
        Self {
            correlation_id: q.correlation_id,
            from: q.from.map(timestamp_to_proto),
            till: q.till.map(timestamp_to_proto),
        }
    }
}

impl From<LogQuery> for pb::InstanceLogRequest {
    fn from(q: LogQuery) -> Self {
        Self {
            correlation_id: q.correlation_id,
            filter: Some(q.filter.into()),
            from: q.from.map(timestamp_to_proto),
            till: q.till.map(timestamp_to_proto),
        }
    }
}

impl From<LogQuery> for pb::InstanceCrashLogRequest {
    fn from(q: LogQuery) -> Self {
        Self {
            correlation_id: q.correlation_id,
            filter: Some(q.filter.into()),
            from: q.from.map(timestamp_to_proto),
            till: q.till.map(timestamp_to_proto),
        }
    }
}

impl TryFrom<pb::SystemLogRequest> for LogQuery {
    type Error = ConvertError;

    /// The filter of the result is "any".
    fn try_from(r: pb::SystemLogRequest) -> Result<Self, ConvertError> {
        Ok(Self {
            correlation_id: r.correlation_id,
            filter: api::InstanceFilter::default(),
            from: optional_timestamp("system_log_request.from", r.from)?,
            till: optional_timestamp("system_log_request.till", r.till)?,
        })
    }
}

impl TryFrom<pb::InstanceLogRequest> for LogQuery {
    type Error = ConvertError;

    /// An absent filter means "any".
    fn try_from(r: pb::InstanceLogRequest) -> Result<Self, ConvertError> {
        Ok(Self {
            correlation_id: r.correlation_id,
            filter: r.filter.map(Into::into).unwrap_or_default(),
            from: optional_timestamp("instance_log_request.from", r.from)?,
            till: optional_timestamp("instance_log_request.till", r.till)?,
        })
    }
}

impl TryFrom<pb::InstanceCrashLogRequest> for LogQuery {
    type Error = ConvertError;

    /// An absent filter means "any".
    fn try_from(r: pb::InstanceCrashLogRequest) -> Result<Self, ConvertError> {
        Ok(Self {
            correlation_id: r.correlation_id,
            filter: r.filter.map(Into::into).unwrap_or_default(),
            from: optional_timestamp("instance_crash_log_request.from", r.from)?,
            till: optional_timestamp("instance_crash_log_request.till", r.till)?,
        })
    }
}

impl From<api::EnvVarInfo> for pb::EnvVarInfo {
    fn from(e: api::EnvVarInfo) -> Self {
        Self {
            name: e.name,
            value: e.value,
        }
    }
}

impl From<pb::EnvVarInfo> for api::EnvVarInfo {
    fn from(e: pb::EnvVarInfo) -> Self {
        Self {
            name: e.name,
            value: e.value,
        }
    }
}

impl From<api::StartInstance> for pb::InstanceInfo {
    /// The 9.0 `InstanceInfo`: the network beside the instance goes into field 12.
    fn from(start: api::StartInstance) -> Self {
        let i = start.info;
        Self {
            instance: Some(i.ident.into()),
            version: i.version,
            manifest_digest: i.manifest_digest,
            owner_id: i.owner_id,
            runtime_id: i.runtime_id,
            uid: i.uid,
            gid: i.gid,
            priority: i.priority,
            storage_path: i.storage_path,
            state_path: i.state_path,
            env_vars: i.env_vars.into_iter().map(Into::into).collect(),
            network_parameters: start.network.map(Into::into),
            monitoring_parameters: i.monitoring_parameters.map(Into::into),
        }
    }
}

impl TryFrom<pb::InstanceInfo> for api::StartInstance {
    type Error = ConvertError;

    /// `instance` is required; network and monitoring parameters are optional.
    fn try_from(i: pb::InstanceInfo) -> Result<Self, ConvertError> {
        Ok(Self {
            info: api::InstanceInfo {
                ident: required_ident("instance_info.instance", i.instance)?,
                version: i.version,
                manifest_digest: i.manifest_digest,
                owner_id: i.owner_id,
                runtime_id: i.runtime_id,
                uid: i.uid,
                gid: i.gid,
                priority: i.priority,
                storage_path: i.storage_path,
                state_path: i.state_path,
                env_vars: i.env_vars.into_iter().map(Into::into).collect(),
                monitoring_parameters: i
                    .monitoring_parameters
                    .map(TryInto::try_into)
                    .transpose()?,
            },
            network: i.network_parameters.map(Into::into),
        })
    }
}

impl From<api::FirewallRule> for pb::FirewallRule {
    fn from(r: api::FirewallRule) -> Self {
        Self {
            dst_ip: r.dst_ip,
            dst_port: r.dst_port,
            proto: r.proto,
            src_ip: r.src_ip,
        }
    }
}

impl From<pb::FirewallRule> for api::FirewallRule {
    fn from(r: pb::FirewallRule) -> Self {
        Self {
            dst_ip: r.dst_ip,
            dst_port: r.dst_port,
            proto: r.proto,
            src_ip: r.src_ip,
        }
    }
}

impl From<api::NetworkParameters> for pb::NetworkParameters {
    fn from(n: api::NetworkParameters) -> Self {
        Self {
            network_id: n.network_id,
            subnet: n.subnet,
            ip: n.ip,
            dns_servers: n.dns_servers,
            rules: n.rules.into_iter().map(Into::into).collect(),
        }
    }
}

impl From<pb::NetworkParameters> for api::NetworkParameters {
    fn from(n: pb::NetworkParameters) -> Self {
        Self {
            network_id: n.network_id,
            subnet: n.subnet,
            ip: n.ip,
            dns_servers: n.dns_servers,
            rules: n.rules.into_iter().map(Into::into).collect(),
        }
    }
}

impl From<api::UpdateNetworkParameters> for pb::UpdateNetworkParameters {
    fn from(n: api::UpdateNetworkParameters) -> Self {
        Self {
            network_id: n.network_id,
            subnet: n.subnet,
            ip: n.ip,
            vlan_id: n.vlan_id,
        }
    }
}

impl From<pb::UpdateNetworkParameters> for api::UpdateNetworkParameters {
    fn from(n: pb::UpdateNetworkParameters) -> Self {
        Self {
            network_id: n.network_id,
            subnet: n.subnet,
            ip: n.ip,
            vlan_id: n.vlan_id,
        }
    }
}

impl From<api::MonitoringParameters> for pb::MonitoringParameters {
    fn from(m: api::MonitoringParameters) -> Self {
        Self {
            alert_rules: m.alert_rules.map(Into::into),
        }
    }
}

impl TryFrom<pb::MonitoringParameters> for api::MonitoringParameters {
    type Error = ConvertError;

    fn try_from(m: pb::MonitoringParameters) -> Result<Self, ConvertError> {
        Ok(Self {
            alert_rules: m.alert_rules.map(TryInto::try_into).transpose()?,
        })
    }
}

impl From<api::AlertRules> for pb::AlertRules {
    fn from(r: api::AlertRules) -> Self {
        Self {
            ram: r.ram.map(Into::into),
            cpu: r.cpu.map(Into::into),
            partitions: r.partitions.into_iter().map(Into::into).collect(),
            download: r.download.map(Into::into),
            upload: r.upload.map(Into::into),
        }
    }
}

impl TryFrom<pb::AlertRules> for api::AlertRules {
    type Error = ConvertError;

    fn try_from(r: pb::AlertRules) -> Result<Self, ConvertError> {
        Ok(Self {
            ram: r.ram.map(TryInto::try_into).transpose()?,
            cpu: r.cpu.map(TryInto::try_into).transpose()?,
            partitions: r
                .partitions
                .into_iter()
                .map(TryInto::try_into)
                .collect::<Result<_, _>>()?,
            download: r.download.map(TryInto::try_into).transpose()?,
            upload: r.upload.map(TryInto::try_into).transpose()?,
        })
    }
}

impl From<api::AlertRulePercents> for pb::AlertRulePercents {
    /// `min_timeout` goes in the wire's `duration`.
    fn from(r: api::AlertRulePercents) -> Self {
        Self {
            duration: Some(duration_to_proto(r.min_timeout)),
            min_threshold: r.min_threshold,
            max_threshold: r.max_threshold,
        }
    }
}

impl TryFrom<pb::AlertRulePercents> for api::AlertRulePercents {
    type Error = ConvertError;

    /// An absent `duration` is a zero `min_timeout`; a negative one is an error.
    fn try_from(r: pb::AlertRulePercents) -> Result<Self, ConvertError> {
        Ok(Self {
            min_timeout: duration_from_proto("alert_rule_percents.duration", r.duration)?,
            min_threshold: r.min_threshold,
            max_threshold: r.max_threshold,
        })
    }
}

impl From<api::AlertRulePoints> for pb::AlertRulePoints {
    /// `min_timeout` goes in the wire's `duration`.
    fn from(r: api::AlertRulePoints) -> Self {
        Self {
            duration: Some(duration_to_proto(r.min_timeout)),
            min_threshold: r.min_threshold,
            max_threshold: r.max_threshold,
        }
    }
}

impl TryFrom<pb::AlertRulePoints> for api::AlertRulePoints {
    type Error = ConvertError;

    /// An absent `duration` is a zero `min_timeout`; a negative one is an error.
    fn try_from(r: pb::AlertRulePoints) -> Result<Self, ConvertError> {
        Ok(Self {
            min_timeout: duration_from_proto("alert_rule_points.duration", r.duration)?,
            min_threshold: r.min_threshold,
            max_threshold: r.max_threshold,
        })
    }
}

impl From<api::PartitionAlertRule> for pb::PartitionAlertRule {
    /// `min_timeout` goes in the wire's `duration`.
    fn from(r: api::PartitionAlertRule) -> Self {
        Self {
            name: r.name,
            duration: Some(duration_to_proto(r.min_timeout)),
            min_threshold: r.min_threshold,
            max_threshold: r.max_threshold,
        }
    }
}

impl TryFrom<pb::PartitionAlertRule> for api::PartitionAlertRule {
    type Error = ConvertError;

    /// An absent `duration` is a zero `min_timeout`; a negative one is an error.
    fn try_from(r: pb::PartitionAlertRule) -> Result<Self, ConvertError> {
        Ok(Self {
            name: r.name,
            min_timeout: duration_from_proto("partition_alert_rule.duration", r.duration)?,
            min_threshold: r.min_threshold,
            max_threshold: r.max_threshold,
        })
    }
}
