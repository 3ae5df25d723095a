//! The floor of N-PERF-3: a bare relay.
//!
//! The thinnest `SMService` that can be built from the same generated code
//! (`smcontroller_grpc::proto`): `RegisterSM` reads the first message for the node id, files an
//! outgoing channel under it and spawns one task that reads the stream; a sync call puts a
//! oneshot in the node's queue and sends `get_node_config_status`, and the task completes the
//! oneshot with the `node_config_status` that comes back. No conversions into api types, no
//! receivers, no budgets, no tracing. It is served with the same transport settings as the
//! controller's insecure server (`smcontroller_grpc::server::serve_insecure_with`): the daemon's
//! default [`ServerSettings`], `TCP_NODELAY` on accepted sockets.

use std::{
    collections::{HashMap, VecDeque},
    pin::Pin,
    sync::{Arc, Mutex, atomic::Ordering},
};

use smcontroller_grpc::{
    proto::servicemanager::v5::{
        BlobsInfos, BlobsInfosRequest, GetNodeConfigStatus, NodeConfigStatus, SmIncomingMessages,
        SmOutgoingMessages, sm_incoming_messages::SmIncomingMessage,
        sm_outgoing_messages::SmOutgoingMessage, sm_service_server,
    },
    server::{ServeError, ServerSettings},
};
use tokio::{
    net::TcpListener,
    sync::{mpsc, oneshot},
};
use tokio_stream::{Stream, wrappers::ReceiverStream};
use tonic::{Request, Response, Status, Streaming, transport::server::TcpIncoming};

use super::Counting;

type Waiters = Arc<Mutex<VecDeque<oneshot::Sender<NodeConfigStatus>>>>;

/// One registered stream: where commands go, and who waits for a `node_config_status`.
struct Stream_ {
    tx: mpsc::Sender<Result<SmIncomingMessages, Status>>,
    waiters: Waiters,
}

/// The bare relay: streams by node id.
pub(crate) struct Relay {
    nodes: Mutex<HashMap<String, Stream_>>,
    counts: Arc<Counting>,
}

impl Relay {
    pub(crate) fn new(counts: Arc<Counting>) -> Arc<Self> {
        Arc::new(Self {
            nodes: Mutex::new(HashMap::new()),
            counts,
        })
    }

    /// `get_node_config_status` relayed to the node; `None` when it is not registered or its
    /// stream ended before the answer.
    pub(crate) async fn get_node_config_status(&self, node: &str) -> Option<NodeConfigStatus> {
        let (reply, answer) = oneshot::channel();
        let tx = {
            let nodes = self.nodes.lock().expect("relay registry");
            let stream = nodes.get(node)?;
            stream
                .waiters
                .lock()
                .expect("relay waiters")
                .push_back(reply);
            stream.tx.clone()
        };
        let command = SmIncomingMessages {
            sm_incoming_message: Some(SmIncomingMessage::GetNodeConfigStatus(
                GetNodeConfigStatus {},
            )),
        };
        tx.send(Ok(command)).await.ok()?;
        answer.await.ok()
    }

    pub(crate) fn node_count(&self) -> usize {
        self.nodes.lock().expect("relay registry").len()
    }
}

/// The tonic service around the relay.
pub(crate) struct RelayService(pub(crate) Arc<Relay>);

type Outgoing = Pin<Box<dyn Stream<Item = Result<SmIncomingMessages, Status>> + Send>>;

#[tonic::async_trait]
impl sm_service_server::SmService for RelayService {
    type RegisterSMStream = Outgoing;

    async fn register_sm(
        &self,
        request: Request<Streaming<SmOutgoingMessages>>,
    ) -> Result<Response<Outgoing>, Status> {
        let mut inbound = request.into_inner();
        let node_id = match inbound.message().await? {
            Some(SmOutgoingMessages {
                sm_outgoing_message: Some(SmOutgoingMessage::SmInfo(info)),
            }) => info.node_id,
            _ => return Err(Status::invalid_argument("sm_info first")),
        };
        let (tx, rx) = mpsc::channel(64);
        let waiters: Waiters = Arc::default();
        self.0.nodes.lock().expect("relay registry").insert(
            node_id.clone(),
            Stream_ {
                tx,
                waiters: waiters.clone(),
            },
        );
        self.0.counts.connected.fetch_add(1, Ordering::Relaxed);
        let relay = self.0.clone();
        tokio::spawn(async move {
            while let Ok(Some(message)) = inbound.message().await {
                if let Some(SmOutgoingMessage::NodeConfigStatus(status)) =
                    message.sm_outgoing_message
                {
                    let waiter = waiters.lock().expect("relay waiters").pop_front();
                    if let Some(waiter) = waiter {
                        let _ = waiter.send(status);
                    }
                }
            }
            let mut nodes = relay.nodes.lock().expect("relay registry");
            if nodes
                .get(&node_id)
                .is_some_and(|s| Arc::ptr_eq(&s.waiters, &waiters))
            {
                nodes.remove(&node_id);
            }
            drop(nodes);
            relay.counts.disconnected.fetch_add(1, Ordering::Relaxed);
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx)) as Outgoing))
    }

    async fn get_blobs_infos(
        &self,
        _request: Request<BlobsInfosRequest>,
    ) -> Result<Response<BlobsInfos>, Status> {
        Err(Status::unimplemented("bare relay"))
    }
}

/// Serves the relay on `listener` with the transport settings of the controller's insecure
/// server, until `shutdown` resolves.
pub(crate) async fn serve(
    listener: TcpListener,
    relay: Arc<Relay>,
    settings: ServerSettings,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServeError> {
    let service = sm_service_server::SmServiceServer::new(RelayService(relay))
        .max_decoding_message_size(settings.max_message_size)
        .max_encoding_message_size(settings.max_message_size);
    let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
    smcontroller_grpc::server::transport(&settings)
        .add_service(service)
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await?;
    Ok(())
}
