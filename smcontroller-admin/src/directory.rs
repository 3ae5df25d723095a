//! What the admin server asks the daemon's receiver about each node: when it connected, when
//! it last sent something, its last `sm_info`, its message counts, and the nodes that left;
//! and what it asks the network provider about the unit's networks.
//!
//! The router knows which nodes are registered (and each stream's generation and queue); the
//! receiver knows what they sent. The daemon's `Recorder` implements [`NodeDirectory`]; its
//! default network provider (`DefaultNetworks`, 9.1) implements [`NetworkDirectory`].

use std::time::SystemTime;

use smcontroller_api::{DisconnectReason, InstanceIdent, NodeId, SmInfo};

use crate::proto::v1 as pb;

/// Messages of one node's stream by kind.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MessageCounts {
    /// `sm_info`.
    pub sm_info: u64,
    /// Instance statuses (one per instance of each `update_instances_status`).
    pub instance_status: u64,
    /// `node_instances_status` snapshots.
    pub node_instances_status: u64,
    /// `instant_monitoring` samples.
    pub monitoring: u64,
    /// Alerts.
    pub alert: u64,
    /// Log parts.
    pub log: u64,
}

impl MessageCounts {
    /// The counts on the admin wire.
    pub fn to_proto(self) -> pb::MessageCounts {
        pb::MessageCounts {
            sm_info: self.sm_info,
            instance_status: self.instance_status,
            node_instances_status: self.node_instances_status,
            monitoring: self.monitoring,
            alert: self.alert,
            log: self.log,
        }
    }
}

/// What the receiver knows of a connected node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeView {
    /// The node.
    pub node_id: NodeId,
    /// When its current stream was reported connected.
    pub connected_since: Option<SystemTime>,
    /// When it last sent anything.
    pub last_message_at: Option<SystemTime>,
    /// Its last `sm_info`.
    pub sm_info: Option<SmInfo>,
    /// How many times the id connected while remembered.
    pub connects: u64,
    /// What it sent, by kind.
    pub counts: MessageCounts,
}

/// A node that went away (a capped history: summaries only).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DepartedView {
    /// The node.
    pub node_id: NodeId,
    /// When it was reported disconnected.
    pub disconnected_at: SystemTime,
    /// Why.
    pub reason: DisconnectReason,
    /// How many times the id had connected.
    pub connects: u64,
    /// What it sent, by kind.
    pub counts: MessageCounts,
}

impl DepartedView {
    /// The departed node on the admin wire.
    pub fn to_proto(&self) -> pb::DepartedNode {
        pb::DepartedNode {
            node_id: self.node_id.to_string(),
            disconnected_at: Some(crate::events::timestamp(self.disconnected_at)),
            reason: crate::events::reason_name(&self.reason).to_owned(),
            detail: self.reason.to_string(),
            connects: self.connects,
            counts: Some(self.counts.to_proto()),
        }
    }
}

/// The receiver's per-node state, as the admin server reads it.
pub trait NodeDirectory: Send + Sync {
    /// What is known of a connected node, if anything.
    fn node(&self, node: &NodeId) -> Option<NodeView>;
    /// The nodes that went away most recently, newest first.
    fn departed(&self) -> Vec<DepartedView>;
}

/// A directory that knows nothing: the admin server then lists what the router knows alone.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoDirectory;

impl NodeDirectory for NoDirectory {
    fn node(&self, _node: &NodeId) -> Option<NodeView> {
        None
    }

    fn departed(&self) -> Vec<DepartedView> {
        Vec::new()
    }
}

/// The networks of a network provider, as the admin API lists them (`ListNetworks`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NetworksView {
    /// The address pool the subnets are cut from, e.g. `172.17.0.0/16`.
    pub pool: String,
    /// Every network, sorted by id.
    pub networks: Vec<NetworkView>,
}

/// One network id (the instances' owner id) and what is in it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NetworkView {
    /// The network id.
    pub network_id: String,
    /// Its subnet, CIDR.
    pub subnet: String,
    /// Its VLAN id.
    pub vlan_id: u32,
    /// The nodes' addresses in it, sorted by node.
    pub hosts: Vec<NetworkHostView>,
    /// The instances' addresses in it.
    pub instances: Vec<NetworkInstanceView>,
}

/// A node's address in a network.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetworkHostView {
    /// The node.
    pub node_id: NodeId,
    /// Its address.
    pub ip: String,
}

/// An instance's address in a network.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetworkInstanceView {
    /// The instance.
    pub instance: InstanceIdent,
    /// The node it was allocated from.
    pub node_id: NodeId,
    /// Its address.
    pub ip: String,
}

impl NetworksView {
    /// The networks on the admin wire.
    pub fn to_proto(&self) -> pb::ListNetworksResponse {
        pb::ListNetworksResponse {
            pool: self.pool.clone(),
            networks: self
                .networks
                .iter()
                .map(|n| pb::Network {
                    network_id: n.network_id.clone(),
                    subnet: n.subnet.clone(),
                    vlan_id: n.vlan_id,
                    hosts: n
                        .hosts
                        .iter()
                        .map(|h| pb::NetworkHost {
                            node_id: h.node_id.to_string(),
                            ip: h.ip.clone(),
                        })
                        .collect(),
                    instances: n
                        .instances
                        .iter()
                        .map(|i| pb::NetworkInstance {
                            instance: Some(i.instance.clone().into()),
                            node_id: i.node_id.to_string(),
                            ip: i.ip.clone(),
                        })
                        .collect(),
                })
                .collect(),
        }
    }
}

/// The unit's network provider, as the admin server reads it: the daemon's default one
/// implements it. A controller without one (smProtocol 9.0) gives the admin server none, and
/// `ListNetworks` then answers `FAILED_PRECONDITION`.
pub trait NetworkDirectory: Send + Sync {
    /// Every network now.
    fn networks(&self) -> NetworksView;
}
