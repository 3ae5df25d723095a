//! The interfaces the SM controller provides: CM modules call them to command nodes.
//!
//! Every method addresses one node (or, for logs, a set of nodes) by [`NodeId`]; a node that is
//! not registered fails at once with [`Error::NotFound`](crate::Error::NotFound).

use async_trait::async_trait;

use crate::{
    Result,
    types::{
        InstanceIdent, LogRequest, NodeConfig, NodeConfigStatus, NodeId, NodeMonitoringData,
        PendingFirewallUpdate, StartInstance, UpdateNetworkParameters,
    },
};

/// Checks, applies and reads node configurations (used by the unit config module).
///
/// Each call sends one command and waits for the node's `node_config_status`, at most the
/// response timeout (5 s by default).
#[cfg_attr(any(test, feature = "mock"), mockall::automock)]
#[async_trait]
pub trait NodeConfigHandler: Send + Sync {
    /// Asks the node whether it would accept `config`. A node-reported error is
    /// [`Error::Failed`](crate::Error::Failed).
    async fn check_node_config(&self, node: &NodeId, config: &NodeConfig) -> Result<()>;

    /// Applies `config` on the node. A node-reported error is
    /// [`Error::Failed`](crate::Error::Failed).
    async fn update_node_config(&self, node: &NodeId, config: &NodeConfig) -> Result<()>;

    /// The node's configuration status whole: state, version and the node's error. A node whose
    /// configuration failed answers with state `failed` and its error inside the status; that is
    /// a normal answer, not an `Err` (contract R-SYNC-1, as the reference does). `Err` means the
    /// node could not be asked: not registered, no answer in time, or gone while waiting.
    async fn get_node_config_status(&self, node: &NodeId) -> Result<NodeConfigStatus>;
}

/// Starts and stops service instances (used by the launcher).
#[cfg_attr(any(test, feature = "mock"), mockall::automock)]
#[async_trait]
pub trait InstanceRunner: Send + Sync {
    /// Queues one `update_instances` to the node and returns once it is queued; the outcome
    /// arrives later through [`InstanceStatusReceiver`](crate::InstanceStatusReceiver).
    ///
    /// An instance's [`network`](StartInstance::network) is sent only under the 9.0 wire
    /// revision; under 9.1 one that carries a network fails the call with
    /// [`Error::NotSupported`](crate::Error::NotSupported) (9.1 nodes get their networks from
    /// the [`NetworkProvider`](crate::NetworkProvider)).
    async fn update_instances(
        &self,
        node: &NodeId,
        stop: &[InstanceIdent],
        start: &[StartInstance],
    ) -> Result<()>;
}

/// Reads averaged monitoring (used by the monitoring module).
#[cfg_attr(any(test, feature = "mock"), mockall::automock)]
#[async_trait]
pub trait MonitoringProvider: Send + Sync {
    /// The node's averaged monitoring, asked for and awaited (response timeout applies).
    async fn get_average_monitoring(&self, node: &NodeId) -> Result<NodeMonitoringData>;
}

/// Pushes network settings to nodes (used by the network manager).
#[cfg_attr(any(test, feature = "mock"), mockall::automock)]
#[async_trait]
pub trait NodeNetwork: Send + Sync {
    /// Queues one `update_networks` to the node; the node sends no answer. Only the 9.0 wire
    /// revision has it: under 9.1 it fails at once with
    /// [`Error::NotSupported`](crate::Error::NotSupported), naming the revision.
    async fn update_networks(
        &self,
        node: &NodeId,
        networks: &[UpdateNetworkParameters],
    ) -> Result<()>;
}

/// Pushes firewall updates to 9.1 nodes (used by the network manager, the
/// [`NetworkProvider`](crate::NetworkProvider)'s side): each node holds one
/// `SubscribeInstanceNetworkUpdates` stream, the newest replacing the older.
#[cfg_attr(any(test, feature = "mock"), mockall::automock)]
pub trait FirewallUpdates: Send + Sync {
    /// Sends `update` (the instance's whole rule set) on the node's subscription. `Err`
    /// ([`Error::NotFound`](crate::Error::NotFound)) when the node has no subscription, or
    /// ([`Error::ResourceExhausted`](crate::Error::ResourceExhausted)) when it does not read it:
    /// the caller keeps the update and pushes it again after the node's next
    /// [`sync_network_state`](crate::NetworkProvider::sync_network_state), as the reference
    /// network manager does.
    fn push_firewall_update(&self, node: &NodeId, update: &PendingFirewallUpdate) -> Result<()>;

    /// Whether the node has a subscription now.
    fn is_subscribed(&self, node: &NodeId) -> bool;
}

/// Requests logs from nodes (used by log forwarding).
#[cfg_attr(any(test, feature = "mock"), mockall::automock)]
#[async_trait]
pub trait LogProvider: Send + Sync {
    /// Queues the request to every node it names (every registered node when it names none).
    /// If a named node is not registered, nothing is sent and the error names every such node.
    /// The parts come back through [`LogSender`](crate::LogSender).
    async fn request_log(&self, request: &LogRequest) -> Result<()>;
}

/// All five provided interfaces together: what the SM controller is to the rest of the CM.
pub trait SmController:
    NodeConfigHandler + InstanceRunner + MonitoringProvider + NodeNetwork + LogProvider
{
}

impl<T> SmController for T where
    T: NodeConfigHandler + InstanceRunner + MonitoringProvider + NodeNetwork + LogProvider
{
}

#[cfg(any(test, feature = "mock"))]
mockall::mock! {
    /// A fake of the whole controller: one mock implementing all five provided interfaces.
    pub SmController {}

    #[async_trait]
    impl NodeConfigHandler for SmController {
        async fn check_node_config(&self, node: &NodeId, config: &NodeConfig) -> Result<()>;
        async fn update_node_config(&self, node: &NodeId, config: &NodeConfig) -> Result<()>;
        async fn get_node_config_status(&self, node: &NodeId) -> Result<NodeConfigStatus>;
    }

    #[async_trait]
    impl InstanceRunner for SmController {
        async fn update_instances(
            &self,
            node: &NodeId,
            stop: &[InstanceIdent],
            start: &[StartInstance],
        ) -> Result<()>;
    }

    #[async_trait]
    impl MonitoringProvider for SmController {
        async fn get_average_monitoring(&self, node: &NodeId) -> Result<NodeMonitoringData>;
    }

    #[async_trait]
    impl NodeNetwork for SmController {
        async fn update_networks(
            &self,
            node: &NodeId,
            networks: &[UpdateNetworkParameters],
        ) -> Result<()>;
    }

    #[async_trait]
    impl LogProvider for SmController {
        async fn request_log(&self, request: &LogRequest) -> Result<()>;
    }
}
