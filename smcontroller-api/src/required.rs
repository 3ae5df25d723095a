//! The interfaces the SM controller requires: CM modules implement them, the controller calls
//! them.
//!
//! Receivers get everything nodes send, with the node id attached, in the order each node sent
//! it. A receiver that takes long slows only its own node's telemetry (and, once that node's
//! bounded queue is full, that node's stream): never another node, never a sync reply.

use async_trait::async_trait;
use tokio::sync::watch;

use crate::{
    Result,
    types::{
        Alert, CertInfo, CertificateDer, DisconnectReason, InstanceEnvVarsStatus, InstanceIdent,
        InstanceNetworkState, InstanceStatus, ItemNetworkParameters, LogPart, NetworkParameters,
        NodeId, NodeMonitoringData, PrivateKeyDer, SmInfo, UpdateNetworkParameters,
    },
};

/// The unit's cloud connection, whose state the controller relays to every SM.
#[cfg_attr(any(test, feature = "mock"), mockall::automock)]
pub trait CloudConnection: Send + Sync {
    /// Whether the unit is connected to the cloud now.
    fn is_connected(&self) -> bool;

    /// The connection state, published: `true` while connected. The controller forwards each
    /// change as `connection_status` to every registered node.
    fn subscribe(&self) -> watch::Receiver<bool>;
}

/// Provides the server's TLS certificate.
#[cfg_attr(any(test, feature = "mock"), mockall::automock)]
#[async_trait]
pub trait CertProvider: Send + Sync {
    /// Where the certificate and key of `storage` (e.g. `"sm"`) are.
    async fn get_cert(&self, storage: &str) -> Result<CertInfo>;

    /// Renewals of `storage`'s certificate: the value changes to the new [`CertInfo`] at each
    /// renewal. The controller then rebuilds its credentials and restarts its server.
    fn subscribe_renewals(&self, storage: &str) -> watch::Receiver<CertInfo>;
}

/// Loads certificates and keys from the URLs a [`CertProvider`] gives.
#[cfg_attr(any(test, feature = "mock"), mockall::automock)]
#[async_trait]
pub trait CertLoader: Send + Sync {
    /// The certificate chain at `url` (`file://...`, later `pkcs11:...`), leaf first.
    async fn load_cert_chain(&self, url: &str) -> Result<Vec<CertificateDer>>;

    /// The private key at `url`.
    async fn load_private_key(&self, url: &str) -> Result<PrivateKeyDer>;
}

/// Resolves blob digests to download URLs (for `GetBlobsInfos`).
#[cfg_attr(any(test, feature = "mock"), mockall::automock)]
#[async_trait]
pub trait ItemInfoProvider: Send + Sync {
    /// The URL the blob with `digest` can be downloaded from.
    /// [`Error::NotFound`](crate::Error::NotFound) (or `InvalidArgument`, or `Failed` with the
    /// Aos code 5, "not found") when there is none: the SM is told `NOT_FOUND`. Any other error
    /// means the provider cannot answer now: the SM is told `UNAVAILABLE` (or
    /// `DEADLINE_EXCEEDED` for a `Timeout`) and may retry.
    async fn get_blob_url(&self, digest: &str) -> Result<String>;
}

/// The unit's network manager, as 9.1 nodes use it through `servicemanager.v5.NetworkService`
/// (contract R-NET-1): the CM implements it, the controller calls it for each request of a
/// node. Never called under the 9.0 wire revision.
///
/// An `Err` goes back to the node inside the response (`error`, with its Aos code), with the
/// call itself successful, as the reference does; [`Error::Failed`](crate::Error::Failed)
/// carries an Aos code of the implementer's choice. Calls come while the node's `RegisterSM`
/// stream may not be read yet (a node syncs first, R-NET-2): an implementation must not wait
/// on the node's registration. The node sets no deadline and holds its own sends meanwhile:
/// answer quickly.
#[cfg_attr(any(test, feature = "mock"), mockall::automock)]
#[async_trait]
pub trait NetworkProvider: Send + Sync {
    /// The node's address, subnet and VLAN in the network `network_id` (the instances' owner
    /// id), made if the network or the node's host in it is new; the same answer when asked
    /// again.
    async fn get_node_network_params(
        &self,
        network_id: &str,
        node: &NodeId,
    ) -> Result<UpdateNetworkParameters>;

    /// An address for the instance in `network_id` on the node, with the DNS servers and the
    /// firewall rules it gets; the same address when asked again for the same instance.
    async fn allocate_instance_network(
        &self,
        instance: &InstanceIdent,
        network_id: &str,
        node: &NodeId,
        params: &ItemNetworkParameters,
    ) -> Result<NetworkParameters>;

    /// Frees the instance's address (an unknown instance is not an error).
    async fn release_instance_network(&self, instance: &InstanceIdent, node: &NodeId)
    -> Result<()>;

    /// The node leaves the network: its instances there and its host are released.
    async fn release_node_network(&self, network_id: &str, node: &NodeId) -> Result<()>;

    /// What the node runs now, sent when it (re)connects: instances it no longer has are
    /// released; firewall updates it has not confirmed are pushed again (through
    /// [`FirewallUpdates`](crate::FirewallUpdates)).
    async fn sync_network_state(
        &self,
        node: &NodeId,
        instances: &[InstanceNetworkState],
    ) -> Result<()>;
}

/// Hears about nodes coming and going and what they offer.
///
/// For one node id, `on_node_connected` and `on_node_disconnected` strictly alternate, starting
/// with connected; `on_sm_info_received` comes between them.
#[cfg_attr(any(test, feature = "mock"), mockall::automock)]
#[async_trait]
pub trait SmInfoReceiver: Send + Sync {
    /// The node registered: it is addressable now.
    async fn on_node_connected(&self, node: &NodeId);

    /// The node's stream ended; it is no longer addressable.
    async fn on_node_disconnected(&self, node: &NodeId, reason: &DisconnectReason);

    /// The node sent its `sm_info` (on registration, and again whenever it sends a new one).
    async fn on_sm_info_received(&self, info: &SmInfo);
}

/// Hears instance statuses.
#[cfg_attr(any(test, feature = "mock"), mockall::automock)]
#[async_trait]
pub trait InstanceStatusReceiver: Send + Sync {
    /// One instance of an `update_instances_status`.
    async fn on_instance_status_received(&self, node: &NodeId, status: &InstanceStatus);

    /// A `node_instances_status`: the complete snapshot of the node's instances.
    async fn on_node_instances_statuses_received(&self, node: &NodeId, statuses: &[InstanceStatus]);
}

/// Hears the environment-variable statuses carried inside instance statuses.
#[cfg_attr(any(test, feature = "mock"), mockall::automock)]
#[async_trait]
pub trait EnvVarsStatusSender: Send + Sync {
    /// The env-var statuses of the instances of one `update_instances_status` that carry any.
    async fn send_env_vars_statuses(&self, node: &NodeId, statuses: &[InstanceEnvVarsStatus]);
}

/// Hears instant monitoring.
#[cfg_attr(any(test, feature = "mock"), mockall::automock)]
#[async_trait]
pub trait MonitoringReceiver: Send + Sync {
    /// One `instant_monitoring` of the node.
    async fn on_monitoring_received(&self, node: &NodeId, data: &NodeMonitoringData);
}

/// Hears alerts.
#[cfg_attr(any(test, feature = "mock"), mockall::automock)]
#[async_trait]
pub trait AlertsReceiver: Send + Sync {
    /// One alert of the node.
    async fn on_alert_received(&self, node: &NodeId, alert: &Alert);
}

/// Hears log parts (the log module's sender towards the cloud).
#[cfg_attr(any(test, feature = "mock"), mockall::automock)]
#[async_trait]
pub trait LogSender: Send + Sync {
    /// One part of a requested log, with the node it came from.
    async fn send_log(&self, part: &LogPart);
}
