//! The tonic `servicemanager.v5.SMService`: `RegisterSM` hands each SM stream to the router,
//! `GetBlobsInfos` resolves digests through the [`ItemInfoProvider`].

use std::{
    net::SocketAddr,
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context as TaskContext, Poll, ready},
};

use futures::{Stream, StreamExt, TryStreamExt, stream};
use prost::Message;
use smcontroller_api::{Error, ItemInfoProvider};
use smcontroller_certs::{IdentityField, PeerIdentity, TlsConnInfo};
use smcontroller_limits::{Budget, Refusals, WarnGate, clip};
use smcontroller_routing::{
    AttachError, Commands, Controller, EndCode, EndStatus, InboundEvent, Outbound, Outgoing,
};
use tokio::time::Sleep;
use tonic::{Request, Response, Status, Streaming, transport::server::TcpConnectInfo};
use tracing::warn;

use crate::{
    codec::DECODED_SIZE_REFUSAL,
    convert::ConvertError,
    guard::{GuardedInfo, STRUCK_OUT_GRACE, Strikes},
    ids,
    proto::{
        servicemanager::v5::{
            BlobsInfos, BlobsInfosRequest, SmIncomingMessages, SmOutgoingMessages,
            sm_outgoing_messages::SmOutgoingMessage, sm_service_server,
        },
        v91::servicemanager::v5 as pb91,
    },
};

/// The response stream of `RegisterSM`: the commands in the envelope of the wire revision
/// (`SmIncomingMessages` of 9.0 by default, or of 9.1).
pub type CommandStream<M = SmIncomingMessages> =
    Pin<Box<dyn Stream<Item = Result<M, Status>> + Send>>;

/// The `SMService` implementation: a thin adapter between tonic and the router.
#[derive(Clone)]
pub struct SmService {
    controller: Controller,
    items: Arc<dyn ItemInfoProvider>,
    identity_binding: Option<IdentityField>,
    max_id_len: usize,
    blob_lookups: usize,
    /// Rate limit of the warnings about streams refused by the identity binding.
    denied_log: Arc<WarnGate>,
    /// Rate limit of the warnings about connections closed for their refused messages.
    struck_out_log: Arc<WarnGate>,
}

/// How many digests of one `GetBlobsInfos` are looked up at once, by default.
pub const DEFAULT_BLOB_LOOKUPS: usize = 8;

impl std::fmt::Debug for SmService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SmService")
            .field("controller", &self.controller)
            .finish_non_exhaustive()
    }
}

impl SmService {
    /// A service routing streams into `controller` and blob look-ups to `items`.
    pub fn new(controller: Controller, items: Arc<dyn ItemInfoProvider>) -> Self {
        Self {
            controller,
            items,
            identity_binding: None,
            max_id_len: ids::DEFAULT_MAX_ID_LEN,
            blob_lookups: DEFAULT_BLOB_LOOKUPS,
            denied_log: Arc::new(WarnGate::default()),
            struck_out_log: Arc::new(WarnGate::default()),
        }
    }

    /// The controller streams are routed into.
    pub fn controller(&self) -> &Controller {
        &self.controller
    }

    /// Refuses ids and names longer than `max` bytes (R-BAD-3), and resolves at most `lookups`
    /// digests of one `GetBlobsInfos` at once (R-BAD-2).
    pub fn with_limits(mut self, max_id_len: usize, blob_lookups: usize) -> Self {
        self.max_id_len = max_id_len;
        self.blob_lookups = blob_lookups.max(1);
        self
    }

    /// Requires each `sm_info.node_id` to be one of the client certificate's names that `field`
    /// selects (R-TLS-4); `None` turns the binding off. Only meaningful over mTLS: a stream
    /// without a client certificate is then refused.
    pub fn with_identity_binding(mut self, field: Option<IdentityField>) -> Self {
        self.identity_binding = field;
        self
    }
}

#[tonic::async_trait]
impl sm_service_server::SmService for SmService {
    type RegisterSMStream = CommandStream;

    async fn register_sm(
        &self,
        request: Request<Streaming<SmOutgoingMessages>>,
    ) -> Result<Response<Self::RegisterSMStream>, Status> {
        self.register(request)
    }

    async fn get_blobs_infos(
        &self,
        request: Request<BlobsInfosRequest>,
    ) -> Result<Response<BlobsInfos>, Status> {
        self.blobs_infos(request).await
    }
}

/// `SMService` as a 9.1 unit serves it (R-REV-1): the same service, its commands in the 9.1
/// envelope (`InstanceInfo` renumbered). What SMs send is the same type in both revisions.
#[derive(Debug, Clone)]
pub struct SmService91(pub SmService);

#[tonic::async_trait]
impl pb91::sm_service_server::SmService for SmService91 {
    type RegisterSMStream = CommandStream<pb91::SmIncomingMessages>;

    async fn register_sm(
        &self,
        request: Request<Streaming<SmOutgoingMessages>>,
    ) -> Result<Response<Self::RegisterSMStream>, Status> {
        self.0.register(request)
    }

    async fn get_blobs_infos(
        &self,
        request: Request<BlobsInfosRequest>,
    ) -> Result<Response<BlobsInfos>, Status> {
        self.0.blobs_infos(request).await
    }
}

impl SmService {
    /// `RegisterSM`: hands the stream to the router; its commands go out in the envelope `M`.
    fn register<M: From<Outbound> + Send + 'static>(
        &self,
        request: Request<Streaming<SmOutgoingMessages>>,
    ) -> Result<Response<CommandStream<M>>, Status> {
        // A transport failure (undecodable or over-size frame, reset) is kept so the response
        // ends with its status (R-BAD-1); the router only needs to know the stream failed.
        let failure: Arc<Mutex<Option<Status>>> = Arc::default();
        let tls = tls_info(&request);
        let binding = self.identity_binding.map(|field| Binding {
            field,
            identity: tls.and_then(|c| c.peer_identity().cloned()),
            peer: tls.map(|c| c.peer_addr().to_string()),
            log: self.denied_log.clone(),
        });
        let inbound = Inbound {
            strikes: strikes(&request).cloned(),
            peer: peer_addr(&request),
            messages: request.into_inner(),
            binding,
            max_id_len: self.max_id_len,
            refusals: self.controller.refusals(),
            struck_out_log: self.struck_out_log.clone(),
            failure: failure.clone(),
            ending: None,
            ended: false,
        };
        let outgoing = self.controller.attach(inbound).map_err(|e| match e {
            AttachError::ShuttingDown => Status::unavailable(e.to_string()),
            AttachError::PendingStreams(_) => Status::resource_exhausted(e.to_string()),
        })?;
        Ok(Response::new(command_stream(outgoing, failure)))
    }

    /// `GetBlobsInfos`: each digest resolved through the provider.
    async fn blobs_infos(
        &self,
        request: Request<BlobsInfosRequest>,
    ) -> Result<Response<BlobsInfos>, Status> {
        let strikes = strikes(&request).cloned();
        let peer = peer_addr(&request);
        let digests = request.into_inner().digests;
        for (i, digest) in digests.iter().enumerate() {
            if digest.len() > self.max_id_len {
                let refusals = self.controller.refusals();
                refusals.count(Budget::IdLength);
                strike(strikes.as_ref(), &refusals, &self.struck_out_log, peer);
                return Err(Status::invalid_argument(format!(
                    "digests[{i}] is {} bytes, over the limit of {} bytes for ids",
                    digest.len(),
                    self.max_id_len
                )));
            }
        }
        // At most `blob_lookups` at once, answers in the order asked; the first failure ends
        // the call.
        let urls = stream::iter(digests.into_iter().map(|digest| {
            let items = self.items.clone();
            async move {
                items
                    .get_blob_url(&digest)
                    .await
                    .map_err(|e| blob_status(&digest, &e))
            }
        }))
        .buffered(self.blob_lookups)
        .try_collect()
        .await?;
        Ok(Response::new(BlobsInfos { urls }))
    }
}

/// The client certificate a stream's `sm_info` must agree with (R-TLS-4).
struct Binding {
    field: IdentityField,
    identity: Option<PeerIdentity>,
    peer: Option<String>,
    log: Arc<WarnGate>,
}

impl Binding {
    /// `Some(Denied)` for an `sm_info` whose node id the certificate does not carry.
    fn refuse(&self, message: &SmOutgoingMessages) -> Option<InboundEvent> {
        let Some(SmOutgoingMessage::SmInfo(info)) = &message.sm_outgoing_message else {
            return None;
        };
        let node = &info.node_id;
        match &self.identity {
            Some(identity) if identity.matches(node, self.field) => None,
            Some(identity) => {
                let gate = self.log.admit();
                if let Some(gate) = gate {
                    warn!(
                        suppressed = gate.suppressed,
                        node_id = %clipped(node),
                        cert_common_name = ?identity.common_name().map(clipped),
                        cert_dns_names = ?identity.dns_names().iter().map(|n| clipped(n)).collect::<Vec<_>>(),
                        peer = ?self.peer,
                        field = ?self.field,
                        "refused: sm_info.node_id is not a name of the client certificate"
                    );
                }
                Some(InboundEvent::Denied(format!(
                    "sm_info.node_id {:?} is not a name of the client certificate ({:?}: common name {:?}, DNS names {:?})",
                    clipped(node),
                    self.field,
                    identity.common_name().map(clipped),
                    identity
                        .dns_names()
                        .iter()
                        .map(|n| clipped(n))
                        .collect::<Vec<_>>(),
                )))
            }
            None => {
                if let Some(gate) = self.log.admit() {
                    warn!(node_id = %clipped(node), peer = ?self.peer, suppressed = gate.suppressed,
                        "refused: no client certificate to bind the node id to");
                }
                Some(InboundEvent::Denied(
                    "node identity binding is on and the connection has no client certificate"
                        .into(),
                ))
            }
        }
    }
}

/// A peer's string cut to a length fit for a log line or a status.
fn clipped(value: &str) -> String {
    clip(value).into_owned()
}

/// The status of a blob look-up that failed: `NOT_FOUND` naming the digest for what the
/// provider cannot resolve (R-BLOB-1: not found, or a digest it does not take); a provider
/// that cannot answer now (timeout, transport, its own failure) is `DEADLINE_EXCEEDED` or
/// `UNAVAILABLE`, so the SM retries rather than giving the blob up.
fn blob_status(digest: &str, error: &Error) -> Status {
    let message = format!("blob {}: {error}", clip(digest));
    match error {
        Error::NotFound { .. } | Error::InvalidArgument(_) => Status::not_found(message),
        Error::Failed { aos_code, .. } if *aos_code == AOS_NOT_FOUND => Status::not_found(message),
        Error::Timeout { .. } => Status::deadline_exceeded(message),
        Error::ResourceExhausted(_) => Status::resource_exhausted(message),
        _ => Status::unavailable(message),
    }
}

/// The Aos error kind "not found" (`eNotFound`).
const AOS_NOT_FOUND: i32 = 5;

/// Counts a stream failure that is a budget: an over-size message, a decode bomb.
fn count_refusal(status: &Status, refusals: &Refusals) {
    if status.code() == tonic::Code::ResourceExhausted {
        if status.message().starts_with(DECODED_SIZE_REFUSAL) {
            refusals.count(Budget::DecodedSize);
        } else {
            refusals.count(Budget::MessageSize);
        }
    }
}

/// tonic reports a message over the decoding limit as `OUT_OF_RANGE`; the contract (R-BAD-1)
/// and gRPC's own convention call that `RESOURCE_EXHAUSTED`.
fn over_size_is_resource_exhausted(status: Status) -> Status {
    if status.code() == tonic::Code::OutOfRange && status.message().contains("too large") {
        Status::resource_exhausted(status.message().to_owned())
    } else {
        status
    }
}

/// The `RegisterSM` request stream as the router reads it: each message checked against the
/// identity binding and the id limit and converted; each refusal a strike of the connection
/// (N-BAD-1). When the strikes are out (this stream's or another's of the same connection),
/// the stream waits [`STRUCK_OUT_GRACE`], reading nothing, then ends with `RESOURCE_EXHAUSTED`.
struct Inbound {
    messages: Streaming<SmOutgoingMessages>,
    binding: Option<Binding>,
    max_id_len: usize,
    refusals: Refusals,
    strikes: Option<Strikes>,
    peer: Option<SocketAddr>,
    struck_out_log: Arc<WarnGate>,
    /// The status the response ends with, when the stream fails.
    failure: Arc<Mutex<Option<Status>>>,
    /// Struck out: when the stream ends.
    ending: Option<Pin<Box<Sleep>>>,
    ended: bool,
}

impl Inbound {
    /// Counts a refusal against the connection.
    fn strike(&self) {
        strike(
            self.strikes.as_ref(),
            &self.refusals,
            &self.struck_out_log,
            self.peer,
        );
    }

    fn fail(&self, status: Status) -> InboundEvent {
        let event = InboundEvent::Failed(format!("{:?}: {}", status.code(), status.message()));
        *self
            .failure
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(status);
        event
    }
}

impl Stream for Inbound {
    type Item = InboundEvent;

    fn poll_next(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<Option<InboundEvent>> {
        let this = self.get_mut();
        if this.ended {
            return Poll::Ready(None);
        }
        if this.ending.is_none() && this.strikes.as_ref().is_some_and(Strikes::is_out) {
            this.ending = Some(Box::pin(tokio::time::sleep(STRUCK_OUT_GRACE)));
        }
        if let Some(ending) = this.ending.as_mut() {
            ready!(ending.as_mut().poll(cx));
            this.ended = true;
            let strikes = this.strikes.as_ref().map_or(0, Strikes::count);
            let status = Status::resource_exhausted(format!(
                "{strikes} messages refused on this connection, over the budget of {} \
                 (refused_messages); the connection is closed",
                this.strikes.as_ref().map_or(0, Strikes::max)
            ));
            return Poll::Ready(Some(this.fail(status)));
        }
        let event = match ready!(this.messages.poll_next_unpin(cx)) {
            None => {
                this.ended = true;
                return Poll::Ready(None);
            }
            Some(Ok(message)) => match this.binding.as_ref().and_then(|b| b.refuse(&message)) {
                Some(denied) => denied,
                None => inbound_event(message, this.max_id_len, &this.refusals),
            },
            Some(Err(status)) => {
                let status = over_size_is_resource_exhausted(status);
                count_refusal(&status, &this.refusals);
                if matches!(
                    status.code(),
                    tonic::Code::ResourceExhausted | tonic::Code::InvalidArgument
                ) {
                    this.strike();
                }
                this.ended = true;
                return Poll::Ready(Some(this.fail(status)));
            }
        };
        if matches!(
            event,
            InboundEvent::Rejected { .. } | InboundEvent::Denied(_)
        ) {
            this.strike();
        }
        Poll::Ready(Some(event))
    }
}

/// Counts a refused message against its connection's `strikes` (N-BAD-1); the one that uses the
/// budget up is counted as `refused_messages` and logged through `log`.
pub(crate) fn strike(
    strikes: Option<&Strikes>,
    refusals: &Refusals,
    log: &WarnGate,
    peer: Option<SocketAddr>,
) {
    let Some(strikes) = strikes else {
        return;
    };
    if strikes.strike() {
        refusals.count(Budget::RefusedMessages);
        if let Some(gate) = log.admit() {
            warn!(?peer, refused = strikes.count(), budget = %Budget::RefusedMessages,
                suppressed = gate.suppressed,
                "connection closed: too many refused messages");
        }
    }
}

/// The TLS info of a request's connection, if it came over mTLS.
fn tls_info<T>(request: &Request<T>) -> Option<&TlsConnInfo> {
    request
        .extensions()
        .get::<GuardedInfo<TlsConnInfo>>()
        .map(|info| &info.conn)
}

/// The refused messages of a request's connection.
pub(crate) fn strikes<T>(request: &Request<T>) -> Option<&Strikes> {
    let extensions = request.extensions();
    extensions
        .get::<GuardedInfo<TlsConnInfo>>()
        .map(|info| &info.strikes)
        .or_else(|| {
            extensions
                .get::<GuardedInfo<TcpConnectInfo>>()
                .map(|info| &info.strikes)
        })
}

/// The peer's address of a request's connection.
pub(crate) fn peer_addr<T>(request: &Request<T>) -> Option<SocketAddr> {
    let extensions = request.extensions();
    extensions
        .get::<GuardedInfo<TlsConnInfo>>()
        .map(|info| info.conn.peer_addr())
        .or_else(|| {
            extensions
                .get::<GuardedInfo<TcpConnectInfo>>()
                .and_then(|info| info.conn.remote_addr)
        })
}

/// Converts one received message for the router (R-TEL-4: a bad one is rejected, not fatal;
/// R-BAD-3: ids over the length limit are refused, naming the field).
fn inbound_event(
    message: SmOutgoingMessages,
    max_id_len: usize,
    refusals: &Refusals,
) -> InboundEvent {
    let name = message
        .sm_outgoing_message
        .as_ref()
        .map_or("SMOutgoingMessages", |m| m.kind().name());
    if let Some(body) = &message.sm_outgoing_message
        && let Err(too_long) = ids::check(body, max_id_len)
    {
        refusals.count(Budget::IdLength);
        return InboundEvent::Rejected {
            message: name,
            reason: too_long.to_string(),
        };
    }
    let wire_size = message.encoded_len();
    match message.try_into() {
        Ok(message) => InboundEvent::Message { message, wire_size },
        Err(error @ ConvertError::EmptyOneof(_)) => InboundEvent::Rejected {
            message: name,
            reason: format!("{error} (empty message ignored)"),
        },
        Err(error) => InboundEvent::Rejected {
            message: name,
            reason: error.to_string(),
        },
    }
}

/// The router's outgoing items as the `RegisterSM` response: commands converted to the wire,
/// ending at `Close` with its status (or the transport failure's).
fn command_stream<M: From<Outbound> + Send + 'static>(
    outgoing: Commands,
    failure: Arc<Mutex<Option<Status>>>,
) -> CommandStream<M> {
    Box::pin(stream::unfold(Some(outgoing), move |state| {
        let failure = failure.clone();
        async move {
            let mut outgoing = state?;
            match outgoing.recv().await {
                Some(Outgoing::Command(command)) => Some((Ok(command.into()), Some(outgoing))),
                Some(Outgoing::Close(Some(end))) => Some((Err(end_status(end)), None)),
                Some(Outgoing::Close(None)) | None => {
                    let failed = failure
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .take();
                    failed.map(|status| (Err(status), None))
                }
            }
        }
    }))
}

fn end_status(end: EndStatus) -> Status {
    match end.code {
        EndCode::InvalidArgument => Status::invalid_argument(end.message),
        EndCode::DeadlineExceeded => Status::deadline_exceeded(end.message),
        EndCode::Aborted => Status::aborted(end.message),
        EndCode::Unavailable => Status::unavailable(end.message),
        EndCode::PermissionDenied => Status::permission_denied(end.message),
        EndCode::ResourceExhausted => Status::resource_exhausted(end.message),
    }
}
