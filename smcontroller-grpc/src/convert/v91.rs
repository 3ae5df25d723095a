//! The Aos 9.1 revision (R-REV-1): its commands, and the messages of `NetworkService`.
//!
//! A 9.1 command is the 9.0 one with `InstanceInfo` renumbered: everything else the two
//! `SMIncomingMessages` carry is the same Rust type (the 9.1 tree maps it onto 9.0's), so a
//! command is built once, as 9.0, and moved into its 9.1 envelope. 9.1 has no
//! `update_networks` and no instance network: the router refuses both under 9.1 before they
//! reach a stream; one that got here anyway is dropped (an empty envelope, never a 9.0 field on
//! a 9.1 wire).

use smcontroller_api as api;
use smcontroller_routing::Outbound;
use tracing::warn;

use super::{ConvertError, common::required_ident};
use crate::proto::{
    servicemanager::v5 as pb,
    v91::servicemanager::v5::{
        self as pb91, instance_network_update_notification::Update,
        sm_incoming_messages::SmIncomingMessage as Message91,
    },
};

use pb::sm_incoming_messages::SmIncomingMessage as Message90;

impl From<Outbound> for pb91::SmIncomingMessages {
    fn from(command: Outbound) -> Self {
        pb::SmIncomingMessages::from(command).into()
    }
}

impl From<pb::SmIncomingMessages> for pb91::SmIncomingMessages {
    /// The 9.1 envelope of a 9.0 command: `InstanceInfo.monitoring_parameters` moves to field
    /// 12; a network has no place (see the module documentation).
    fn from(message: pb::SmIncomingMessages) -> Self {
        let message = message.sm_incoming_message.and_then(|m| match m {
            Message90::GetNodeConfigStatus(m) => Some(Message91::GetNodeConfigStatus(m)),
            Message90::CheckNodeConfig(m) => Some(Message91::CheckNodeConfig(m)),
            Message90::SetNodeConfig(m) => Some(Message91::SetNodeConfig(m)),
            Message90::UpdateInstances(m) => Some(Message91::UpdateInstances(m.into())),
            Message90::SystemLogRequest(m) => Some(Message91::SystemLogRequest(m)),
            Message90::InstanceLogRequest(m) => Some(Message91::InstanceLogRequest(m)),
            Message90::InstanceCrashLogRequest(m) => Some(Message91::InstanceCrashLogRequest(m)),
            Message90::GetAverageMonitoring(m) => Some(Message91::GetAverageMonitoring(m)),
            Message90::ConnectionStatus(m) => Some(Message91::ConnectionStatus(m)),
            Message90::UpdateNetworks(_) => {
                warn!("update_networks has no 9.1 form; not sent");
                None
            }
        });
        Self {
            sm_incoming_message: message,
        }
    }
}

impl From<pb::UpdateInstances> for pb91::UpdateInstances {
    fn from(u: pb::UpdateInstances) -> Self {
        Self {
            start_instances: u.start_instances.into_iter().map(Into::into).collect(),
            stop_instances: u.stop_instances,
        }
    }
}

impl From<pb::InstanceInfo> for pb91::InstanceInfo {
    fn from(i: pb::InstanceInfo) -> Self {
        if i.network_parameters.is_some() {
            warn!("an instance network has no 9.1 form; not sent");
        }
        Self {
            instance: i.instance,
            version: i.version,
            manifest_digest: i.manifest_digest,
            owner_id: i.owner_id,
            runtime_id: i.runtime_id,
            uid: i.uid,
            gid: i.gid,
            priority: i.priority,
            storage_path: i.storage_path,
            state_path: i.state_path,
            env_vars: i.env_vars,
            monitoring_parameters: i.monitoring_parameters,
        }
    }
}

impl From<pb91::SmIncomingMessages> for pb::SmIncomingMessages {
    /// What a 9.1 SM reads, in the 9.0 envelope (no network anywhere), for the simulator.
    fn from(message: pb91::SmIncomingMessages) -> Self {
        let message = message.sm_incoming_message.map(|m| match m {
            Message91::GetNodeConfigStatus(m) => Message90::GetNodeConfigStatus(m),
            Message91::CheckNodeConfig(m) => Message90::CheckNodeConfig(m),
            Message91::SetNodeConfig(m) => Message90::SetNodeConfig(m),
            Message91::UpdateInstances(m) => Message90::UpdateInstances(pb::UpdateInstances {
                start_instances: m
                    .start_instances
                    .into_iter()
                    .map(|i| pb::InstanceInfo {
                        instance: i.instance,
                        version: i.version,
                        manifest_digest: i.manifest_digest,
                        owner_id: i.owner_id,
                        runtime_id: i.runtime_id,
                        uid: i.uid,
                        gid: i.gid,
                        priority: i.priority,
                        storage_path: i.storage_path,
                        state_path: i.state_path,
                        env_vars: i.env_vars,
                        network_parameters: None,
                        monitoring_parameters: i.monitoring_parameters,
                    })
                    .collect(),
                stop_instances: m.stop_instances,
            }),
            Message91::SystemLogRequest(m) => Message90::SystemLogRequest(m),
            Message91::InstanceLogRequest(m) => Message90::InstanceLogRequest(m),
            Message91::InstanceCrashLogRequest(m) => Message90::InstanceCrashLogRequest(m),
            Message91::GetAverageMonitoring(m) => Message90::GetAverageMonitoring(m),
            Message91::ConnectionStatus(m) => Message90::ConnectionStatus(m),
        });
        Self {
            sm_incoming_message: message,
        }
    }
}

impl TryFrom<pb91::SmIncomingMessages> for Outbound {
    type Error = ConvertError;

    /// What a 9.1 SM makes of a command (the simulator's side).
    fn try_from(message: pb91::SmIncomingMessages) -> Result<Self, ConvertError> {
        pb::SmIncomingMessages::from(message).try_into()
    }
}

impl From<pb91::UpdateItemNetworkParams> for api::ItemNetworkParameters {
    fn from(p: pb91::UpdateItemNetworkParams) -> Self {
        Self {
            hosts: p.hosts,
            allowed_connections: p.allowed_connections,
            exposed_ports: p.exposed_ports,
        }
    }
}

impl From<api::ItemNetworkParameters> for pb91::UpdateItemNetworkParams {
    fn from(p: api::ItemNetworkParameters) -> Self {
        Self {
            hosts: p.hosts,
            allowed_connections: p.allowed_connections,
            exposed_ports: p.exposed_ports,
        }
    }
}

impl From<api::InstanceNetworkState> for pb91::InstanceNetworkStateInfo {
    fn from(s: api::InstanceNetworkState) -> Self {
        Self {
            instance: Some(s.instance.into()),
            network_id: s.network_id,
            ip: s.ip,
            firewall_rules: s.rules.into_iter().map(Into::into).collect(),
        }
    }
}

impl From<api::PendingFirewallUpdate> for pb91::InstanceNetworkUpdateNotification {
    fn from(u: api::PendingFirewallUpdate) -> Self {
        Self {
            update: Some(Update::PendingFirewallUpdate(pb91::PendingFirewallUpdate {
                instance: Some(u.instance.into()),
                firewall_rules: u.rules.into_iter().map(Into::into).collect(),
            })),
        }
    }
}

impl TryFrom<pb91::InstanceNetworkUpdateNotification> for api::PendingFirewallUpdate {
    type Error = ConvertError;

    /// What a 9.1 SM makes of a notification (the simulator's side).
    fn try_from(n: pb91::InstanceNetworkUpdateNotification) -> Result<Self, ConvertError> {
        let Some(Update::PendingFirewallUpdate(u)) = n.update else {
            return Err(ConvertError::EmptyOneof(
                "instance_network_update_notification.update",
            ));
        };
        Ok(Self {
            instance: required_ident("pending_firewall_update.instance", u.instance)?,
            rules: u.firewall_rules.into_iter().map(Into::into).collect(),
        })
    }
}
