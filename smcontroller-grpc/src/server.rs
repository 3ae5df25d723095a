//! Serving `SMService` on a listener: HTTP/2 settings, keepalive, message limits.

use std::{future::Future, net::SocketAddr, sync::Arc, time::Duration};

use smcontroller_api::ItemInfoProvider;
use smcontroller_routing::Controller;
use tokio::net::TcpListener;
use tokio_stream::StreamExt;
use tonic::transport::{Server, server::TcpIncoming};
use tracing::{info, warn};

use crate::{
    connections::Connections, proto::servicemanager::v5::sm_service_server::SmServiceServer,
    service::SmService,
};

/// Settings of the gRPC server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerSettings {
    /// Largest message accepted or sent, bytes (R-BAD-1). Default 16 MiB.
    pub max_message_size: usize,
    /// How often the server pings an SM's connection (R-DISC-2). Default 10 s.
    pub keepalive_interval: Duration,
    /// How long a ping may go unanswered before the connection is dropped. Default 5 s.
    pub keepalive_timeout: Duration,
    /// HTTP/2 flow-control window, bytes, used both as each stream's initial window and as each
    /// connection's. A stream paused for backpressure (R-TEL-3) holds at most this much unread
    /// in the server beyond its queue; since the connection's window is the same size, it also
    /// stops the other streams of that SM's connection (`GetBlobsInfos`) until the queue has
    /// room. Default 256 KiB (hyper's own defaults are 1 MiB for each).
    pub flow_window: u32,
}

impl Default for ServerSettings {
    fn default() -> Self {
        Self {
            max_message_size: 16 * 1024 * 1024,
            keepalive_interval: Duration::from_secs(10),
            keepalive_timeout: Duration::from_secs(5),
            flow_window: 256 * 1024,
        }
    }
}

/// Why serving failed.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The listen address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The HTTP/2 server failed.
    #[error("gRPC server failed: {0}")]
    Transport(#[from] tonic::transport::Error),
}

/// The tonic service with the message limits of `settings` applied (R-BAD-1).
pub fn sm_service(service: SmService, settings: &ServerSettings) -> SmServiceServer<SmService> {
    SmServiceServer::new(service)
        .max_decoding_message_size(settings.max_message_size)
        .max_encoding_message_size(settings.max_message_size)
}

/// The HTTP/2 server with the transport settings of `settings` (keepalive, flow-control
/// windows): the one place they are applied, for plain and mTLS serving alike.
pub fn transport(settings: &ServerSettings) -> Server {
    Server::builder()
        .http2_keepalive_interval(Some(settings.keepalive_interval))
        .http2_keepalive_timeout(Some(settings.keepalive_timeout))
        .initial_stream_window_size(Some(settings.flow_window))
        .initial_connection_window_size(Some(settings.flow_window))
}

/// Binds `addr` (port 0 picks a free port); the bound address is `listener.local_addr()`.
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, ServeError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| ServeError::Bind { addr, source })
}

/// Serves plain HTTP/2 (insecure mode, R-TLS-2) on `listener` until `shutdown` resolves.
///
/// When `shutdown` resolves the caller should also call [`Controller::shutdown`], which ends
/// every SM stream; the server then finishes its connections. To bound that wait, use
/// [`serve_insecure_with`] and close the connections after a grace.
pub async fn serve_insecure(
    listener: TcpListener,
    controller: Controller,
    items: Arc<dyn ItemInfoProvider>,
    settings: ServerSettings,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServeError> {
    let connections = Connections::new();
    serve_insecure_with(listener, controller, items, settings, connections, shutdown).await
}

/// [`serve_insecure`], with every accepted connection in `connections`: the caller can count
/// them and, when a stop's grace has run out, [`close_all`](Connections::close_all) so that the
/// server returns and no connection task is left (R-STOP-1).
pub async fn serve_insecure_with(
    listener: TcpListener,
    controller: Controller,
    items: Arc<dyn ItemInfoProvider>,
    settings: ServerSettings,
    connections: Connections,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServeError> {
    match listener.local_addr() {
        Ok(addr) => warn!(%addr, "serving SMService WITHOUT TLS (insecure mode, development only)"),
        Err(e) => warn!(error = %e, "serving SMService WITHOUT TLS (insecure mode)"),
    }
    let service = sm_service(SmService::new(controller, items), &settings);
    // `Server::tcp_nodelay` only reaches sockets tonic accepts itself; these are ours. Without
    // it, Nagle held small frames back until the peer's delayed ACK (40 ms on Linux).
    let incoming = TcpIncoming::from(listener)
        .with_nodelay(Some(true))
        .map(move |accepted| accepted.map(|socket| connections.track(socket)));
    transport(&settings)
        .add_service(service)
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await?;
    info!("gRPC server stopped");
    Ok(())
}
