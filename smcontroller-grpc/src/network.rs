//! `servicemanager.v5.NetworkService` (Aos 9.1, R-NET-1..3): what a 9.1 SM calls for its
//! networks, on the SM port beside `SMService`, answered through the CM's
//! [`NetworkProvider`].
//!
//! - Each call checks its ids first: an empty or over-long `node_id` or `network_id`, or an
//!   instance ident without item or subject, is `INVALID_ARGUMENT` naming the field, counted
//!   like every id refusal of the SM port. With the node identity binding on, the `node_id`
//!   must be a name of the client certificate (`PERMISSION_DENIED`), as for `RegisterSM`.
//! - The provider's `Err` goes back in the response's `error` (its Aos code, never 0) with
//!   the call itself OK, as the reference does; on success `error` is unset.
//! - Nothing here waits on the node's `RegisterSM` stream (R-NET-2): a real SM calls
//!   `SyncNetworkState` before it reads that stream.
//! - `SubscribeInstanceNetworkUpdates` holds the node's one subscription (R-NET-3): a newer one
//!   ends the older; nothing is sent on subscribe; the stream ends at the controller's stop.

use std::{pin::Pin, sync::Arc};

use futures::{Stream, StreamExt};
use smcontroller_api::{Error, InstanceIdent, NetworkProvider, NodeId};
use smcontroller_certs::{IdentityField, TlsConnInfo};

use crate::guard::GuardedInfo;
use smcontroller_limits::{Budget, Refusals, WarnGate, clip};
use smcontroller_routing::{SubscribeError, Subscriptions};
use tonic::{Request, Response, Status};
use tracing::warn;

use crate::proto::{
    common::v2 as common,
    v91::servicemanager::v5::{
        self as pb, network_service_server::NetworkService as NetworkServiceApi,
    },
};

/// The full name of the network service, as health checks and reflection name it.
pub const NETWORK_SERVICE_NAME: &str = "servicemanager.v5.NetworkService";

/// The stream of a node's firewall updates.
pub type UpdateStream =
    Pin<Box<dyn Stream<Item = Result<pb::InstanceNetworkUpdateNotification, Status>> + Send>>;

/// The `NetworkService` implementation: checks, then the provider.
#[derive(Clone)]
pub struct NetworkService {
    provider: Arc<dyn NetworkProvider>,
    subscriptions: Subscriptions,
    refusals: Refusals,
    max_id_len: usize,
    identity_binding: Option<IdentityField>,
    /// Rate limit of the warnings about refused calls.
    refused_log: Arc<WarnGate>,
}

impl std::fmt::Debug for NetworkService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NetworkService")
            .field("subscriptions", &self.subscriptions.len())
            .finish_non_exhaustive()
    }
}

impl NetworkService {
    /// Answers through `provider`, subscribes nodes in `subscriptions`, counts refusals in
    /// `refusals`; ids up to `max_id_len` bytes.
    pub fn new(
        provider: Arc<dyn NetworkProvider>,
        subscriptions: Subscriptions,
        refusals: Refusals,
        max_id_len: usize,
    ) -> Self {
        Self {
            provider,
            subscriptions,
            refusals,
            max_id_len,
            identity_binding: None,
            refused_log: Arc::new(WarnGate::default()),
        }
    }

    /// Requires each request's `node_id` to be a name of the client certificate that `field`
    /// selects (R-TLS-4); `None` turns the binding off.
    pub fn with_identity_binding(mut self, field: Option<IdentityField>) -> Self {
        self.identity_binding = field;
        self
    }

    /// A required id: not empty, not over the limit.
    fn id(&self, field: &str, value: &str) -> Result<(), Status> {
        if value.is_empty() {
            return Err(self.refuse(Status::invalid_argument(format!("{field} is empty"))));
        }
        self.id_len(field, value)
    }

    /// An id that may be empty, but not over the limit.
    fn id_len(&self, field: &str, value: &str) -> Result<(), Status> {
        if value.len() > self.max_id_len {
            self.refusals.count(Budget::IdLength);
            return Err(self.refuse(Status::invalid_argument(format!(
                "{field} is {} bytes, over the limit of {} bytes for ids",
                value.len(),
                self.max_id_len
            ))));
        }
        Ok(())
    }

    /// The node of a request: its id checked, and bound to the client certificate if asked.
    fn node<T>(&self, request: &Request<T>, field: &str, node_id: &str) -> Result<NodeId, Status> {
        self.id(field, node_id)?;
        if let Some(binding) = self.identity_binding {
            let identity = request
                .extensions()
                .get::<GuardedInfo<TlsConnInfo>>()
                .and_then(|c| c.conn.peer_identity());
            let allowed = identity.is_some_and(|identity| identity.matches(node_id, binding));
            if !allowed {
                return Err(self.refuse(Status::permission_denied(format!(
                    "{field} {:?} is not a name of the client certificate",
                    clip(node_id)
                ))));
            }
        }
        Ok(NodeId::new(node_id))
    }

    /// A required instance ident with its ids checked; `field` names it.
    fn instance(
        &self,
        field: &str,
        ident: Option<common::InstanceIdent>,
    ) -> Result<InstanceIdent, Status> {
        let ident = ident.ok_or_else(|| {
            self.refuse(Status::invalid_argument(format!(
                "{field}: required field is missing"
            )))
        })?;
        self.id(&format!("{field}.item_id"), &ident.item_id)?;
        self.id(&format!("{field}.subject_id"), &ident.subject_id)?;
        InstanceIdent::try_from(ident)
            .map_err(|e| self.refuse(Status::invalid_argument(format!("{field}: {e}"))))
    }

    /// Runs `handler` on `request`; a call it refuses (any error but `UNAVAILABLE`: provider
    /// failures are answers with an `error`, not statuses) counts against the connection's
    /// budget of refused messages (N-BAD-1).
    async fn counting<T, R>(
        &self,
        request: Request<T>,
        handler: impl AsyncFnOnce(Request<T>) -> Result<R, Status>,
    ) -> Result<R, Status> {
        let strikes = crate::service::strikes(&request).cloned();
        let peer = crate::service::peer_addr(&request);
        let result = handler(request).await;
        if let Err(status) = &result
            && status.code() != tonic::Code::Unavailable
        {
            crate::service::strike(strikes.as_ref(), &self.refusals, &self.refused_log, peer);
        }
        result
    }

    /// Logs a refused call, at a bounded rate, and gives its status back.
    fn refuse(&self, status: Status) -> Status {
        if let Some(gate) = self.refused_log.admit() {
            warn!(code = ?status.code(), message = %clip(status.message()),
                suppressed = gate.suppressed, "NetworkService call refused");
        }
        status
    }
}

/// The Aos error kinds a domain error goes back as (`aos_core_lib_cpp` `ErrorEnum`).
mod aos {
    pub(super) const FAILED: i32 = 1;
    pub(super) const NO_MEMORY: i32 = 3;
    pub(super) const NOT_FOUND: i32 = 5;
    pub(super) const INVALID_ARGUMENT: i32 = 6;
    pub(super) const TIMEOUT: i32 = 7;
}

/// A provider's error as the response's `error`: its Aos code (never 0, so the SM sees a
/// failure), its exit code, its message.
fn error_info(error: &Error) -> common::ErrorInfo {
    let (aos_code, exit_code) = match error {
        Error::Failed {
            aos_code,
            exit_code,
            ..
        } => (
            if *aos_code == 0 {
                aos::FAILED
            } else {
                *aos_code
            },
            *exit_code,
        ),
        Error::NotFound { .. } => (aos::NOT_FOUND, 0),
        Error::InvalidArgument(_) => (aos::INVALID_ARGUMENT, 0),
        Error::Timeout { .. } => (aos::TIMEOUT, 0),
        Error::ResourceExhausted(_) => (aos::NO_MEMORY, 0),
        _ => (aos::FAILED, 0),
    };
    let message = match error {
        Error::Failed { message, .. } => message.clone(),
        other => other.to_string(),
    };
    common::ErrorInfo {
        aos_code,
        exit_code,
        message,
    }
}

/// `Some(error)` for a provider's `Err`, `None` for success.
fn error_of<T>(result: &smcontroller_api::Result<T>) -> Option<common::ErrorInfo> {
    result.as_ref().err().map(error_info)
}

#[tonic::async_trait]
impl NetworkServiceApi for NetworkService {
    type SubscribeInstanceNetworkUpdatesStream = UpdateStream;

    async fn get_node_network_params(
        &self,
        request: Request<pb::GetNodeNetworkParamsRequest>,
    ) -> Result<Response<pb::GetNodeNetworkParamsResponse>, Status> {
        self.counting(request, async |request| {
            let node = self.node(&request, "node_id", &request.get_ref().node_id)?;
            let network_id = &request.get_ref().network_id;
            self.id("network_id", network_id)?;
            let result = self
                .provider
                .get_node_network_params(network_id, &node)
                .await;
            let error = error_of(&result);
            let params = result.unwrap_or_default();
            Ok(Response::new(pb::GetNodeNetworkParamsResponse {
                subnet: params.subnet,
                ip: params.ip,
                vlan_id: params.vlan_id,
                error,
            }))
        })
        .await
    }

    async fn allocate_instance_network(
        &self,
        request: Request<pb::AllocateInstanceNetworkRequest>,
    ) -> Result<Response<pb::AllocateInstanceNetworkResponse>, Status> {
        self.counting(request, async |request| {
            let node = self.node(&request, "node_id", &request.get_ref().node_id)?;
            let request = request.into_inner();
            self.id("network_id", &request.network_id)?;
            let instance = self.instance("instance", request.instance)?;
            let params = request.service_data.unwrap_or_default().into();
            let result = self
                .provider
                .allocate_instance_network(&instance, &request.network_id, &node, &params)
                .await;
            let error = error_of(&result);
            let network = result.unwrap_or_default();
            Ok(Response::new(pb::AllocateInstanceNetworkResponse {
                subnet: network.subnet,
                ip: network.ip,
                dns_servers: network.dns_servers,
                error,
                firewall_rules: network.rules.into_iter().map(Into::into).collect(),
            }))
        })
        .await
    }

    async fn release_instance_network(
        &self,
        request: Request<pb::ReleaseInstanceNetworkRequest>,
    ) -> Result<Response<pb::ReleaseInstanceNetworkResponse>, Status> {
        self.counting(request, async |request| {
            let node = self.node(&request, "node_id", &request.get_ref().node_id)?;
            let instance = self.instance("instance", request.into_inner().instance)?;
            let result = self
                .provider
                .release_instance_network(&instance, &node)
                .await;
            Ok(Response::new(pb::ReleaseInstanceNetworkResponse {
                error: error_of(&result),
            }))
        })
        .await
    }

    async fn release_node_network(
        &self,
        request: Request<pb::ReleaseNodeNetworkRequest>,
    ) -> Result<Response<pb::ReleaseNodeNetworkResponse>, Status> {
        self.counting(request, async |request| {
            let node = self.node(&request, "node_id", &request.get_ref().node_id)?;
            let network_id = &request.get_ref().network_id;
            self.id("network_id", network_id)?;
            let result = self.provider.release_node_network(network_id, &node).await;
            Ok(Response::new(pb::ReleaseNodeNetworkResponse {
                error: error_of(&result),
            }))
        })
        .await
    }

    async fn subscribe_instance_network_updates(
        &self,
        request: Request<pb::SubscribeInstanceNetworkUpdatesRequest>,
    ) -> Result<Response<Self::SubscribeInstanceNetworkUpdatesStream>, Status> {
        self.counting(request, async |request| {
            let node = self.node(&request, "node_id", &request.get_ref().node_id)?;
            let subscription = self.subscriptions.subscribe(&node).map_err(|e| match e {
                SubscribeError::ShuttingDown => Status::unavailable(e.to_string()),
                SubscribeError::TooManyNodes(_) => {
                    self.refusals.count(Budget::Nodes);
                    self.refuse(Status::resource_exhausted(e.to_string()))
                }
            })?;
            let updates: UpdateStream = Box::pin(subscription.map(|update| Ok(update.into())));
            Ok(Response::new(updates))
        })
        .await
    }

    async fn sync_network_state(
        &self,
        request: Request<pb::SyncNetworkStateRequest>,
    ) -> Result<Response<pb::SyncNetworkStateResponse>, Status> {
        self.counting(request, async |request| {
            let node = self.node(&request, "node_id", &request.get_ref().node_id)?;
            let mut instances = Vec::with_capacity(request.get_ref().instances.len());
            for (i, state) in request.into_inner().instances.into_iter().enumerate() {
                let field = format!("instances[{i}]");
                self.id_len(&format!("{field}.network_id"), &state.network_id)?;
                self.id_len(&format!("{field}.ip"), &state.ip)?;
                let instance = self.instance(&format!("{field}.instance"), state.instance)?;
                instances.push(smcontroller_api::InstanceNetworkState {
                    instance,
                    network_id: state.network_id,
                    ip: state.ip,
                    rules: state.firewall_rules.into_iter().map(Into::into).collect(),
                });
            }
            let result = self.provider.sync_network_state(&node, &instances).await;
            Ok(Response::new(pb::SyncNetworkStateResponse {
                error: error_of(&result),
            }))
        })
        .await
    }
}
