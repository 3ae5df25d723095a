//! Serving `SMService` on a listener: HTTP/2 settings, keepalive, message limits.

use std::{future::Future, net::SocketAddr, sync::Arc, time::Duration};

use smcontroller_api::ItemInfoProvider;
use smcontroller_certs::{AcceptSettings, PlainIncoming};
use smcontroller_routing::{CommandLimit, Controller, Outbound};
use tokio::net::{TcpListener, TcpSocket};
use tokio_stream::StreamExt;
use tonic::transport::Server;
use tracing::{info, warn};

use smcontroller_api::SmProtocol;
use smcontroller_certs::IdentityField;

use crate::{
    connections::Connections,
    guard::{GuardSettings, Guarded},
    network::{NETWORK_SERVICE_NAME, NetworkService},
    proto::{
        file_descriptor_set,
        servicemanager::v5::{SmIncomingMessages, sm_service_server::SmServiceServer},
        v91::servicemanager::v5::{
            SmIncomingMessages as SmIncomingMessages91,
            network_service_server::NetworkServiceServer,
            sm_service_server::SmServiceServer as SmServiceServer91,
        },
    },
    service::{SmService, SmService91},
};

/// Settings of the gRPC server. `Default` gives the contract's defaults.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerSettings {
    /// Largest message accepted or sent, bytes (R-BAD-1). A larger message from an SM ends its
    /// stream with `RESOURCE_EXHAUSTED`; a larger command fails its caller. Default 4 MiB,
    /// gRPC's default and the reference controller's.
    pub max_message_size: usize,
    /// How often the server pings an SM's connection (R-DISC-2). Default 10 s.
    pub keepalive_interval: Duration,
    /// How long a ping may go unanswered before the connection is dropped. Default 5 s.
    pub keepalive_timeout: Duration,
    /// HTTP/2 flow-control window of each stream, bytes. A stream paused for backpressure
    /// (R-TEL-3) holds at most this much unread in the server beyond its queue. Default
    /// 256 KiB (hyper's own default is 1 MiB).
    pub flow_window: u32,
    /// HTTP/2 flow-control window of each connection, bytes: larger than a stream's, so one
    /// paused `RegisterSM` does not stop the other streams of that SM's connection
    /// (`GetBlobsInfos`). Default 1 MiB.
    pub connection_window: u32,
    /// Streams one HTTP/2 connection may have open at once, advertised in SETTINGS
    /// (R-BAD-3); HTTP/2 refuses the peer's extra streams. An SM needs two (`RegisterSM` and a
    /// `GetBlobsInfos`). Default 16.
    pub max_streams_per_connection: u32,
    /// Longest id or name an SM may send (node id, runtime ids, item and subject ids, log
    /// correlation ids, digests), bytes (R-BAD-3). Default 256.
    pub max_id_len: usize,
    /// Digests of one `GetBlobsInfos` looked up at once (R-BAD-2). Default 8.
    pub blob_lookups: usize,
    /// PING and SETTINGS frames a connection may send per second, on average; a connection
    /// that sends more (a flood, R-BAD-3) is no longer read and is closed 1.5 s later. Bursts
    /// of up to ten seconds' worth pass. Default 20.
    pub control_frames_per_sec: u32,
    /// Streams a connection may open per second, on average, bursts of two seconds' worth
    /// passing (R-BAD-3, N-BAD-1); more (a flood of new streams, which HTTP/2 would refuse one
    /// by one beyond `max_streams_per_connection`) ends the connection as a control frame
    /// flood does. A real SM opens one `RegisterSM`, and a unary call per blob look-up or, under
    /// 9.1, per instance network. Default 1,000.
    pub new_streams_per_sec: u32,
    /// Messages one connection's streams may have refused (empty or undecodable messages, ids
    /// over the limit, decode bombs, refused unary calls) before the connection is closed
    /// (N-BAD-1): its streams end with `RESOURCE_EXHAUSTED` a second later and it is closed, so
    /// a peer that floods refused messages stops costing the other nodes. 0 is no limit. Default 8
    /// ([`DEFAULT_MAX_REFUSED_MESSAGES`]).
    pub max_refused_messages: u32,
    /// Accepting connections (R-BAD-3): the time a new connection has for its TLS handshake
    /// and its HTTP/2 preface together (default 10 s; it is closed when that runs out), the
    /// cap on open connections (default 4,096; one beyond it is closed as soon as it is
    /// accepted), `TCP_NODELAY`.
    pub accept: AcceptSettings,
}

impl Default for ServerSettings {
    fn default() -> Self {
        Self {
            max_message_size: 4 * 1024 * 1024,
            keepalive_interval: Duration::from_secs(10),
            keepalive_timeout: Duration::from_secs(5),
            flow_window: 256 * 1024,
            connection_window: 1024 * 1024,
            max_streams_per_connection: 16,
            max_id_len: crate::ids::DEFAULT_MAX_ID_LEN,
            blob_lookups: crate::service::DEFAULT_BLOB_LOOKUPS,
            control_frames_per_sec: 20,
            new_streams_per_sec: 1000,
            max_refused_messages: DEFAULT_MAX_REFUSED_MESSAGES,
            accept: AcceptSettings::default(),
        }
    }
}

/// Refused messages one connection may send before it is closed, by default: a real SM sends
/// none (an SM of another revision or a buggy one may send a few, and is told why in each
/// refusal's log line).
pub const DEFAULT_MAX_REFUSED_MESSAGES: u32 = 8;

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
    /// The reflection service could not read the compiled descriptor set (a build error).
    #[error("cannot serve reflection: {0}")]
    Reflection(String),
}

/// The health of the SM endpoint as `grpc.health.v1` reports it: `SERVING` once the server
/// listens, `NOT_SERVING` while a credential restart closes the SM streams (R-TLS-3). Both the
/// server as a whole (`""`), `servicemanager.v5.SMService` and, under 9.1,
/// `servicemanager.v5.NetworkService` are reported.
#[derive(Clone)]
pub struct Health {
    reporter: tonic_health::server::HealthReporter,
    /// Whether `NetworkService` is served (9.1), and so reported.
    network: bool,
}

impl std::fmt::Debug for Health {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Health").finish_non_exhaustive()
    }
}

impl Health {
    /// Reports the SM endpoint as serving or not.
    pub async fn set(&self, serving: bool) {
        let status = if serving {
            tonic_health::ServingStatus::Serving
        } else {
            tonic_health::ServingStatus::NotServing
        };
        self.reporter.set_service_status("", status).await;
        self.reporter
            .set_service_status(SM_SERVICE_NAME, status)
            .await;
        if self.network {
            self.reporter
                .set_service_status(NETWORK_SERVICE_NAME, status)
                .await;
        }
    }
}

/// The full name of the SM service, as health checks and reflection name it.
pub const SM_SERVICE_NAME: &str = "servicemanager.v5.SMService";

/// The HTTP/2 server of `settings` with every service of the SM endpoint: `SMService` in the
/// controller's wire revision (R-REV-1), and under 9.1 `NetworkService` beside it (R-NET-1),
/// their health (`grpc.health.v1`, reported serving) and server reflection of that revision
/// (so `grpcurl` and other generic clients can discover it). The one place the endpoint's
/// services are put together.
pub(crate) async fn endpoint(
    settings: &ServerSettings,
    service: SmService,
    identity_binding: Option<IdentityField>,
) -> Result<(tonic::transport::server::Router, Health), ServeError> {
    let protocol = service.controller().settings().sm_protocol;
    let (reporter, health_service) = tonic_health::server::health_reporter();
    let health = Health {
        reporter,
        network: protocol == SmProtocol::V9_1,
    };
    health.set(true).await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(file_descriptor_set(protocol))
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|e| ServeError::Reflection(e.to_string()))?;
    let router = transport(settings)
        .add_service(health_service)
        .add_service(reflection);
    info!(sm_protocol = %protocol, "SM wire revision");
    let router = match protocol {
        SmProtocol::V9_0 => router.add_service(sm_service(service, settings)),
        SmProtocol::V9_1 => {
            let controller = service.controller().clone();
            let router = router.add_service(sm_service_91(service, settings));
            match controller.network_provider() {
                Some(provider) => {
                    let network = NetworkService::new(
                        provider,
                        controller.firewall_updates(),
                        controller.refusals(),
                        settings.max_id_len,
                    )
                    .with_identity_binding(identity_binding);
                    router.add_service(
                        NetworkServiceServer::new(network)
                            .max_decoding_message_size(settings.max_message_size)
                            .max_encoding_message_size(settings.max_message_size),
                    )
                }
                None => {
                    warn!(
                        "smProtocol 9.1 without a network provider: NetworkService is not \
                         served, so 9.1 nodes cannot start instances with a network"
                    );
                    router
                }
            }
        }
    };
    Ok((router, health))
}

/// The tonic service with the message and id limits of `settings` applied (R-BAD-1, R-BAD-3).
/// The controller is told the command size limit too, so a command too large to send fails
/// its caller instead of the stream.
pub fn sm_service(service: SmService, settings: &ServerSettings) -> SmServiceServer<SmService> {
    service.controller().limit_commands(CommandLimit {
        max_bytes: settings.max_message_size,
        size_of: command_size::<SmIncomingMessages>,
    });
    let service = service.with_limits(settings.max_id_len, settings.blob_lookups);
    SmServiceServer::new(service)
        .max_decoding_message_size(settings.max_message_size)
        .max_encoding_message_size(settings.max_message_size)
}

/// [`sm_service`] in the 9.1 revision.
pub fn sm_service_91(
    service: SmService,
    settings: &ServerSettings,
) -> SmServiceServer91<SmService91> {
    service.controller().limit_commands(CommandLimit {
        max_bytes: settings.max_message_size,
        size_of: command_size::<SmIncomingMessages91>,
    });
    let service = service.with_limits(settings.max_id_len, settings.blob_lookups);
    SmServiceServer91::new(SmService91(service))
        .max_decoding_message_size(settings.max_message_size)
        .max_encoding_message_size(settings.max_message_size)
}

/// A command's size on the wire, in the envelope `M` of a revision.
fn command_size<M: From<Outbound> + prost::Message>(command: &Outbound) -> usize {
    prost::Message::encoded_len(&M::from(command.clone()))
}

/// The HTTP/2 server with the transport settings of `settings` (keepalive, flow-control
/// windows): the one place they are applied, for plain and mTLS serving alike.
pub fn transport(settings: &ServerSettings) -> Server {
    Server::builder()
        .http2_keepalive_interval(Some(settings.keepalive_interval))
        .http2_keepalive_timeout(Some(settings.keepalive_timeout))
        .initial_stream_window_size(Some(settings.flow_window))
        .initial_connection_window_size(Some(settings.connection_window.max(settings.flow_window)))
        .max_concurrent_streams(Some(settings.max_streams_per_connection.max(1)))
}

/// The listen backlog the SM port asks for unless told otherwise (`listenBacklog`): how many
/// connections the kernel may hold handshaken but not accepted yet. Linux caps it at
/// `net.core.somaxconn` (4,096 by default since Linux 5.4, 128 before).
///
/// Tokio's `TcpListener::bind` asks for 128, as the standard library does. When thousands of
/// SMs connect at once (a controller restart), the accept queue fills faster than the server
/// takes connections off it: the kernel then drops the clients' final ACK of the handshake
/// (`TcpExtListenOverflows`), the client believes it is connected and sends its HTTP/2
/// preface, and when the kernel gives up on the half-open connection the client's next segment
/// is answered with a reset (`ConnectionReset` in the SM's `RegisterSM`).
pub const DEFAULT_LISTEN_BACKLOG: u32 = 4096;

/// Binds `addr` (port 0 picks a free port) with the default listen backlog
/// ([`DEFAULT_LISTEN_BACKLOG`]); the bound address is `listener.local_addr()`.
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, ServeError> {
    bind_with_backlog(addr, DEFAULT_LISTEN_BACKLOG)
}

/// Binds `addr` with a listen backlog of `backlog` connections (see [`DEFAULT_LISTEN_BACKLOG`]),
/// `SO_REUSEADDR` set as tokio's `TcpListener::bind` sets it. The kernel caps the backlog at
/// `net.core.somaxconn`: the value in effect is logged (read from
/// `/proc/sys/net/core/somaxconn`), as a warning when it is below `backlog`. Must be called
/// within a Tokio runtime.
pub fn bind_with_backlog(addr: SocketAddr, backlog: u32) -> Result<TcpListener, ServeError> {
    let error = |source| ServeError::Bind { addr, source };
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()
    } else {
        TcpSocket::new_v6()
    }
    .map_err(error)?;
    socket.set_reuseaddr(true).map_err(error)?;
    socket.bind(addr).map_err(error)?;
    let listener = socket.listen(backlog.max(1)).map_err(error)?;
    match somaxconn() {
        Some(max) if max < backlog => warn!(
            requested = backlog,
            effective = max,
            "listen backlog capped by net.core.somaxconn; raise it (sysctl) so that SMs \
             connecting at once are not reset"
        ),
        Some(max) => info!(
            requested = backlog,
            effective = backlog,
            somaxconn = max,
            "listen backlog"
        ),
        None => info!(
            requested = backlog,
            "listen backlog (net.core.somaxconn unknown)"
        ),
    }
    Ok(listener)
}

/// The backlog a listen socket gets at most: `net.core.somaxconn` of this network namespace;
/// `None` where it cannot be read (not Linux).
pub fn somaxconn() -> Option<u32> {
    std::fs::read_to_string("/proc/sys/net/core/somaxconn")
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// The listen backlog in effect for a listener bound with `requested`: the smaller of it and
/// `net.core.somaxconn` (where that can be read).
pub fn effective_backlog(requested: u32) -> u32 {
    let requested = requested.max(1);
    somaxconn().map_or(requested, |max| requested.min(max))
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
    let refusals = controller.refusals();
    let (router, _health) = endpoint(&settings, SmService::new(controller, items), None).await?;
    // Our own accept loop: the connection cap and a backoff on accept errors (R-BAD-3), and
    // `TCP_NODELAY` (without it, Nagle held small frames back until the peer's delayed ACK).
    let timeout = settings.accept.handshake_timeout;
    let rate = settings.control_frames_per_sec;
    let new_streams = settings.new_streams_per_sec;
    let max_refused = settings.max_refused_messages;
    let incoming =
        PlainIncoming::new(listener, settings.accept, refusals.clone()).map(move |mut conn| {
            let guard = GuardSettings {
                preface_deadline: conn.accepted_at() + timeout,
                control_frames_per_sec: rate,
                new_streams_per_sec: new_streams,
                max_refused_messages: max_refused,
                refusals: refusals.clone(),
            };
            let establishing = conn.establishing();
            let conn = Guarded::establishing(PlainSm(conn), guard, establishing);
            Ok::<_, std::convert::Infallible>(connections.track(conn))
        });
    router
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await?;
    info!("gRPC server stopped");
    Ok(())
}

/// A plain connection as tonic sees it: the peer's address reaches every request, as with
/// tonic's own `TcpIncoming`.
#[derive(Debug)]
pub struct PlainSm(smcontroller_certs::PlainConn);

impl tonic::transport::server::Connected for PlainSm {
    type ConnectInfo = tonic::transport::server::TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        tonic::transport::server::TcpConnectInfo {
            local_addr: self.0.get_ref().local_addr().ok(),
            remote_addr: Some(self.0.peer_addr()),
        }
    }
}

impl tokio::io::AsyncRead for PlainSm {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().0).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for PlainSm {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.get_mut().0).poll_write(cx, buf)
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().0).poll_flush(cx)
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().0).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.get_mut().0).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.0.is_write_vectored()
    }
}
