//! The interfaces the SM controller provides: CM modules call them to command nodes.
//!
//! Every method addresses one node (or, for logs, a set of nodes) by [`NodeId`]; a node that is
//! not registered fails at once with [`Error::NotFound`](crate::Error::NotFound).

use async_trait::async_trait;

use crate::{
    Result,
    types::{
        InstanceIdent, InstanceInfo, LogRequest, NodeConfig, NodeConfigStatus, NodeId,
        NodeMonitoringData, UpdateNetworkParameters,
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
    async fn update_instances(
        &self,
        node: &NodeId,
        stop: &[InstanceIdent],
        start: &[InstanceInfo],
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
    /// Queues one `update_networks` to the node; the node sends no answer.
    async fn update_networks(
        &self,
        node: &NodeId,
        networks: &[UpdateNetworkParameters],
    ) -> Result<()>;
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
            start: &[InstanceInfo],
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
