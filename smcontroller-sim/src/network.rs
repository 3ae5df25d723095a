//! What a node does with `servicemanager.v5.NetworkService` under the 9.1 wire revision, as
//! the reference 9.1.1 SM does (`aos_core_cpp` `src/sm/smclient`, `aos_core_lib_cpp`
//! `src/core/sm/networkmanager`), on the node's own connection:
//!
//! - [`subscribe`]: `SubscribeInstanceNetworkUpdates{node_id}`, read until it ends, again after
//!   the reconnect delay; each update replaces its instance's firewall rules;
//! - [`Calls::sync`]: `SyncNetworkState` with the instances that run with a network, once the
//!   stream is open and before it is read;
//! - [`Calls::prepare`]: for an instance to start whose owner id is set, `GetNodeNetworkParams`
//!   when the node does not know the network yet, then `AllocateInstanceNetwork`; an error
//!   fails the instance;
//! - [`Calls::release`]: for an instance to stop, `ReleaseInstanceNetwork`, then
//!   `ReleaseNodeNetwork` when it was the network's last instance on the node.
//!
//! The reference sets no deadline on these calls; the simulator gives each
//! [`NETWORK_TIMEOUT`], so that a controller that never answers cannot hold a node forever.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use smcontroller_grpc::proto::common::v2::{ErrorInfo, InstanceIdent};
use smcontroller_grpc::proto::servicemanager::v5::{FirewallRule, InstanceInfo};
use smcontroller_grpc::proto::v91::servicemanager::v5::{
    AllocateInstanceNetworkRequest, AllocateInstanceNetworkResponse, GetNodeNetworkParamsRequest,
    GetNodeNetworkParamsResponse, InstanceNetworkStateInfo, InstanceNetworkUpdateNotification,
    ReleaseInstanceNetworkRequest, ReleaseInstanceNetworkResponse, ReleaseNodeNetworkRequest,
    ReleaseNodeNetworkResponse, SubscribeInstanceNetworkUpdatesRequest, SyncNetworkStateRequest,
    SyncNetworkStateResponse, UpdateItemNetworkParams,
    instance_network_update_notification::Update, network_service_client::NetworkServiceClient,
};
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;
use tracing::{debug, info, warn};

use super::SimError;
use super::events::{EventBus, SimEventKind};
use super::messages;
use super::node::{NodeShared, lock};
use super::stats::{NetworkCall, NodeCounters};

/// Longest wait for the answer to one `NetworkService` call (or for a subscription to open).
pub const NETWORK_TIMEOUT: Duration = Duration::from_secs(10);

/// A node's address in one network (the answer to `GetNodeNetworkParams`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeNetwork {
    /// The network id (the owner id of its instances).
    pub network_id: String,
    /// The network's subnet, CIDR.
    pub subnet: String,
    /// The node's address in it.
    pub ip: String,
    /// The network's VLAN.
    pub vlan_id: u64,
}

/// An instance's network (the answer to `AllocateInstanceNetwork`, with the firewall rules
/// the node applies for it now).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct InstanceNetwork {
    /// The instance.
    pub instance: InstanceIdent,
    /// Its network id (its owner id).
    pub network_id: String,
    /// The network's subnet, CIDR.
    pub subnet: String,
    /// The instance's address.
    pub ip: String,
    /// Its DNS servers.
    pub dns_servers: Vec<String>,
    /// Its firewall rules: from the allocation, replaced by each firewall update since.
    pub rules: Vec<FirewallRule>,
}

/// What a node has been given by `NetworkService` (9.1; empty under 9.0): see
/// [`NodeHandle::networks`](super::NodeHandle::networks).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Networks {
    /// The node's address in each network it is in, sorted by network id.
    pub nodes: Vec<NodeNetwork>,
    /// The instances that run with an address, sorted by item, subject and instance.
    pub instances: Vec<InstanceNetwork>,
}

impl Networks {
    /// The network of `instance` (matched by item, subject and instance index), if it has one.
    pub fn instance(&self, instance: &InstanceIdent) -> Option<&InstanceNetwork> {
        self.instances
            .iter()
            .find(|i| key(&i.instance) == key(instance))
    }

    /// The address of `instance`, if it has one.
    pub fn ip_of(&self, instance: &InstanceIdent) -> Option<&str> {
        self.instance(instance).map(|i| i.ip.as_str())
    }

    /// The node's address in the network `network_id`, if it is in it.
    pub fn node(&self, network_id: &str) -> Option<&NodeNetwork> {
        self.nodes.iter().find(|n| n.network_id == network_id)
    }
}

/// An instance, as the reference tells instances apart: item, subject, instance index.
type Key = (String, String, u64);

fn key(ident: &InstanceIdent) -> Key {
    (
        ident.item_id.clone(),
        ident.subject_id.clone(),
        ident.instance,
    )
}

/// The networks of a node; it outlives the node's streams, as a real SM's database does.
#[derive(Debug, Default)]
pub(crate) struct NetworkState {
    nodes: BTreeMap<String, NodeNetwork>,
    instances: BTreeMap<Key, InstanceNetwork>,
}

impl NetworkState {
    pub(crate) fn snapshot(&self) -> Networks {
        Networks {
            nodes: self.nodes.values().cloned().collect(),
            instances: self.instances.values().cloned().collect(),
        }
    }
}

/// The `NetworkService` calls of one session of a node, on its connection.
#[derive(Clone)]
pub(crate) struct Calls {
    pub(crate) node: Arc<NodeShared>,
    pub(crate) events: Arc<EventBus>,
    pub(crate) channel: Channel,
    /// Cancelled when the session ends: every call and the subscription end with it.
    pub(crate) session: CancellationToken,
}

/// How a unary call ended: its answer, or the error that fails what it was made for.
type Outcome<T> = Result<T, ErrorInfo>;

impl Calls {
    fn client(&self) -> NetworkServiceClient<Channel> {
        NetworkServiceClient::new(self.channel.clone())
    }

    fn not_connected(&self) -> SimError {
        SimError::NotConnected(self.node.id.to_string())
    }

    /// Counts the call, logs a failure and tells the listeners.
    fn record(&self, call: NetworkCall, error: Option<&ErrorInfo>) {
        self.node.counters.network_call(call, error.is_some());
        if let Some(e) = error {
            warn!(node = %self.node.id, %call, aos_code = e.aos_code, error = %e.message, "NetworkService call failed");
        }
        self.events.emit(
            &self.node.id,
            SimEventKind::Network {
                call,
                error: error.map(|e| e.message.clone()),
            },
        );
    }

    /// Makes one unary call, within [`NETWORK_TIMEOUT`]: `Ok(Err(error))` when it failed or
    /// its answer carries an `error` (which the reference takes as a failure whenever it is
    /// set), `Err` when the session ended first.
    async fn unary<T>(
        &self,
        call: NetworkCall,
        request: impl Future<Output = Result<tonic::Response<T>, tonic::Status>>,
        error_of: fn(&T) -> Option<&ErrorInfo>,
    ) -> Result<Outcome<T>, SimError> {
        let answer = tokio::select! {
            () = self.session.cancelled() => return Err(self.not_connected()),
            r = tokio::time::timeout(NETWORK_TIMEOUT, request) => r,
        };
        let outcome = match answer {
            Err(_) => Err(messages::failure(format!(
                "{call} got no answer within {NETWORK_TIMEOUT:?}"
            ))),
            Ok(Err(status)) => Err(messages::failure(format!(
                "{call} failed: {:?}: {}",
                status.code(),
                status.message()
            ))),
            Ok(Ok(answer)) => {
                let answer = answer.into_inner();
                match error_of(&answer) {
                    Some(error) => Err(failed(error)),
                    None => Ok(answer),
                }
            }
        };
        self.record(call, outcome.as_ref().err());
        Ok(outcome)
    }

    /// `SyncNetworkState` with every instance the node runs with a network: its network id,
    /// address and firewall rules. A failure is logged and counted, nothing more.
    pub(crate) async fn sync(&self) -> Result<(), SimError> {
        let instances: Vec<InstanceNetworkStateInfo> = lock(&self.node.network)
            .instances
            .values()
            .map(|i| InstanceNetworkStateInfo {
                instance: Some(i.instance.clone()),
                network_id: i.network_id.clone(),
                ip: i.ip.clone(),
                firewall_rules: i.rules.clone(),
            })
            .collect();
        let count = instances.len();
        let request = SyncNetworkStateRequest {
            node_id: self.node.id.to_string(),
            instances,
        };
        let mut client = self.client();
        let outcome = self
            .unary(
                NetworkCall::SyncNetworkState,
                client.sync_network_state(request),
                |r: &SyncNetworkStateResponse| r.error.as_ref(),
            )
            .await?;
        if outcome.is_ok() {
            debug!(node = %self.node.id, instances = count, "network state synced");
        }
        Ok(())
    }

    /// Prepares the network of an instance to start: none when its owner id is empty or it
    /// has one already (no call then, as in the reference); otherwise the node's address in
    /// the network (`GetNodeNetworkParams`, when the node is not in it yet), then the
    /// instance's (`AllocateInstanceNetwork`, the host `<instance>.<subject>.<item>`).
    /// `Ok(Some(error))`: a call failed, and so does the instance.
    pub(crate) async fn prepare(&self, info: &InstanceInfo) -> Result<Option<ErrorInfo>, SimError> {
        let network_id = &info.owner_id;
        let Some(ident) = info.instance.as_ref() else {
            return Ok(None);
        };
        if network_id.is_empty() {
            debug!(node = %self.node.id, item = %ident.item_id, "no owner id: no network");
            return Ok(None);
        }
        let known = {
            let state = lock(&self.node.network);
            if state.instances.contains_key(&key(ident)) {
                return Ok(None);
            }
            state.nodes.contains_key(network_id)
        };
        if !known {
            let request = GetNodeNetworkParamsRequest {
                network_id: network_id.clone(),
                node_id: self.node.id.to_string(),
            };
            let mut client = self.client();
            let params = match self
                .unary(
                    NetworkCall::GetNodeNetworkParams,
                    client.get_node_network_params(request),
                    |r: &GetNodeNetworkParamsResponse| r.error.as_ref(),
                )
                .await?
            {
                Ok(params) => params,
                Err(error) => return Ok(Some(error)),
            };
            lock(&self.node.network).nodes.insert(
                network_id.clone(),
                NodeNetwork {
                    network_id: network_id.clone(),
                    subnet: params.subnet,
                    ip: params.ip,
                    vlan_id: params.vlan_id,
                },
            );
        }
        let request = AllocateInstanceNetworkRequest {
            instance: Some(ident.clone()),
            network_id: network_id.clone(),
            node_id: self.node.id.to_string(),
            service_data: Some(UpdateItemNetworkParams {
                hosts: vec![format!(
                    "{}.{}.{}",
                    ident.instance, ident.subject_id, ident.item_id
                )],
                allowed_connections: Vec::new(),
                exposed_ports: Vec::new(),
            }),
        };
        let mut client = self.client();
        let allocated = match self
            .unary(
                NetworkCall::AllocateInstanceNetwork,
                client.allocate_instance_network(request),
                |r: &AllocateInstanceNetworkResponse| r.error.as_ref(),
            )
            .await?
        {
            Ok(allocated) => allocated,
            Err(error) => return Ok(Some(error)),
        };
        info!(node = %self.node.id, item = %ident.item_id, instance = ident.instance, network = %network_id, ip = %allocated.ip, "instance network allocated");
        lock(&self.node.network).instances.insert(
            key(ident),
            InstanceNetwork {
                instance: ident.clone(),
                network_id: network_id.clone(),
                subnet: allocated.subnet,
                ip: allocated.ip,
                dns_servers: allocated.dns_servers,
                rules: allocated.firewall_rules,
            },
        );
        Ok(None)
    }

    /// Releases the network of an instance that stops, if it has one: the node forgets it,
    /// then calls `ReleaseInstanceNetwork`, and `ReleaseNodeNetwork` when no other instance of
    /// the node is in that network. Failures are only logged, as in the reference.
    pub(crate) async fn release(&self, ident: &InstanceIdent) -> Result<(), SimError> {
        let (network_id, last) = {
            let mut state = lock(&self.node.network);
            let Some(released) = state.instances.remove(&key(ident)) else {
                return Ok(());
            };
            let last = !state
                .instances
                .values()
                .any(|i| i.network_id == released.network_id);
            if last {
                state.nodes.remove(&released.network_id);
            }
            (released.network_id, last)
        };
        let request = ReleaseInstanceNetworkRequest {
            instance: Some(ident.clone()),
            node_id: self.node.id.to_string(),
        };
        let mut client = self.client();
        // A failure is logged and counted (`unary`), nothing more, as in the reference.
        let _ = self
            .unary(
                NetworkCall::ReleaseInstanceNetwork,
                client.release_instance_network(request),
                |r: &ReleaseInstanceNetworkResponse| r.error.as_ref(),
            )
            .await?;
        if last {
            let request = ReleaseNodeNetworkRequest {
                network_id,
                node_id: self.node.id.to_string(),
            };
            let mut client = self.client();
            let _ = self
                .unary(
                    NetworkCall::ReleaseNodeNetwork,
                    client.release_node_network(request),
                    |r: &ReleaseNodeNetworkResponse| r.error.as_ref(),
                )
                .await?;
        }
        Ok(())
    }

    /// A notification from the subscription: its rules replace those of its instance, as the
    /// reference does; one for an instance without a network here is ignored with a warning.
    fn firewall_update(&self, notification: InstanceNetworkUpdateNotification) {
        let Some(Update::PendingFirewallUpdate(update)) = notification.update else {
            warn!(node = %self.node.id, "network update notification without an update");
            return;
        };
        NodeCounters::bump(&self.node.counters.firewall_updates);
        let applied = update.instance.as_ref().is_some_and(|ident| {
            let mut state = lock(&self.node.network);
            match state.instances.get_mut(&key(ident)) {
                Some(instance) => {
                    instance.rules.clone_from(&update.firewall_rules);
                    true
                }
                None => false,
            }
        });
        if applied {
            debug!(node = %self.node.id, rules = update.firewall_rules.len(), "firewall rules replaced");
        } else {
            warn!(node = %self.node.id, instance = ?update.instance, "firewall update for an instance without a network here: ignored");
        }
        self.events
            .emit(&self.node.id, SimEventKind::FirewallUpdate(update));
    }
}

/// The error an instance fails with when an answer carries `error`: that error, with the
/// Aos code of a failure when it has none (the reference then goes by the exit code).
fn failed(error: &ErrorInfo) -> ErrorInfo {
    let mut error = error.clone();
    if error.aos_code == 0 {
        error.aos_code = messages::AOS_CODE_FAILED;
    }
    error
}

/// The node's subscription to its network updates for one session: subscribes, reads every
/// update until the stream ends or fails, then after `retry_delay` subscribes again, until
/// the session ends. `opened` hears when the first attempt was answered or failed.
pub(crate) async fn subscribe(calls: Calls, retry_delay: Duration, opened: oneshot::Sender<()>) {
    let mut opened = Some(opened);
    loop {
        let request = SubscribeInstanceNetworkUpdatesRequest {
            node_id: calls.node.id.to_string(),
        };
        let mut client = calls.client();
        let answer = tokio::select! {
            () = calls.session.cancelled() => return,
            r = tokio::time::timeout(
                NETWORK_TIMEOUT,
                client.subscribe_instance_network_updates(request),
            ) => r,
        };
        let stream = match answer {
            Ok(Ok(response)) => {
                calls.record(NetworkCall::Subscribe, None);
                Some(response.into_inner())
            }
            Ok(Err(status)) => {
                let error = messages::failure(format!(
                    "{}: {:?}: {}",
                    NetworkCall::Subscribe,
                    status.code(),
                    status.message()
                ));
                calls.record(NetworkCall::Subscribe, Some(&error));
                None
            }
            Err(_) => {
                let error = messages::failure(format!(
                    "{} got no answer within {NETWORK_TIMEOUT:?}",
                    NetworkCall::Subscribe
                ));
                calls.record(NetworkCall::Subscribe, Some(&error));
                None
            }
        };
        if let Some(opened) = opened.take() {
            let _ = opened.send(());
        }
        if let Some(mut stream) = stream {
            loop {
                let next = tokio::select! {
                    () = calls.session.cancelled() => return,
                    m = stream.message() => m,
                };
                match next {
                    Ok(Some(notification)) => calls.firewall_update(notification),
                    Ok(None) => {
                        debug!(node = %calls.node.id, "network update subscription ended");
                        break;
                    }
                    Err(status) => {
                        calls.node.counters.network_failure(NetworkCall::Subscribe);
                        debug!(node = %calls.node.id, %status, "network update subscription failed");
                        break;
                    }
                }
            }
        }
        tokio::select! {
            () = calls.session.cancelled() => return,
            () = tokio::time::sleep(retry_delay) => {}
        }
    }
}
