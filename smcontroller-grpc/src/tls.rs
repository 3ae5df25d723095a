//! Serving `SMService` over mTLS (R-TLS-1), restarting on renewed credentials (R-TLS-3), and
//! binding node ids to client certificates (R-TLS-4).
//!
//! The handshakes are `smcontroller-certs`' [`TlsIncoming`]: each new connection is put through
//! the TLS handshake with the credentials current at that moment, so new handshakes see a
//! renewed certificate at once. When the credentials' generation changes, the server ends every
//! SM stream (each node's disconnect is reported once) and, after a short grace that lets the
//! streams' statuses reach the SMs, closes the connections accepted with the older credentials.
//! The SMs reconnect and handshake with the new ones.

use std::{
    convert::Infallible,
    future::Future,
    io,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use smcontroller_api::ItemInfoProvider;
use smcontroller_certs::{IdentityField, ServerCredentials, TlsConn, TlsConnInfo, TlsIncoming};
use smcontroller_routing::Controller;
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpListener,
    sync::watch,
};
use tokio_stream::StreamExt;
use tokio_util::sync::CancellationToken;
use tonic::transport::server::Connected;
use tracing::{info, warn};

use crate::{
    connections::Connections,
    guard::{GuardSettings, Guarded},
    server::{Health, ServeError, ServerSettings},
    service::SmService,
};

/// Settings of the mTLS server beyond [`ServerSettings`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TlsSettings {
    /// Node identity binding (R-TLS-4): `Some(field)` requires `sm_info.node_id` to be one of
    /// the client certificate's names that `field` selects. Off (`None`) by default.
    pub identity_binding: Option<IdentityField>,
    /// After a renewal, how long the old connections may still carry the ends of their streams
    /// before they are closed. Default 200 ms.
    pub restart_grace: Duration,
}

impl Default for TlsSettings {
    fn default() -> Self {
        Self {
            identity_binding: None,
            restart_grace: Duration::from_millis(200),
        }
    }
}

/// What the mTLS server serves with: the credentials as a
/// [`CredentialsReloader`](smcontroller_certs::CredentialsReloader) publishes them (each change
/// of their generation restarts every SM stream, R-TLS-3), and its settings.
#[derive(Debug, Clone)]
pub struct Tls {
    /// The current credentials, and their renewals.
    pub credentials: watch::Receiver<ServerCredentials>,
    /// Identity binding, handshakes, restart grace.
    pub settings: TlsSettings,
}

/// One accepted mTLS connection as tonic sees it: its [`TlsConnInfo`] (peer address, client
/// certificate, credentials generation) reaches every request's extensions.
#[derive(Debug)]
pub struct SmConn(TlsConn);

impl Connected for SmConn {
    type ConnectInfo = TlsConnInfo;

    fn connect_info(&self) -> TlsConnInfo {
        self.0.info().clone()
    }
}

impl AsyncRead for SmConn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_read(cx, buf)
    }
}

impl AsyncWrite for SmConn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().0).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().0).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.0.is_write_vectored()
    }
}

/// Serves `SMService` over mTLS on `listener` until `shutdown` resolves (R-TLS-1), restarting
/// every SM stream when `tls.credentials` changes generation (R-TLS-3). Every accepted
/// connection is in `connections`, so that a stop can close them after its grace (R-STOP-1).
pub async fn serve_tls(
    listener: TcpListener,
    controller: Controller,
    items: Arc<dyn ItemInfoProvider>,
    settings: ServerSettings,
    tls: Tls,
    connections: Connections,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServeError> {
    let Tls {
        credentials,
        settings: tls,
    } = tls;
    let addr = listener.local_addr().ok();
    let generation = credentials.borrow().generation;
    info!(
        ?addr,
        generation,
        identity_binding = ?tls.identity_binding,
        "serving SMService over mTLS"
    );
    let refusals = controller.refusals();
    let service =
        SmService::new(controller.clone(), items).with_identity_binding(tls.identity_binding);
    let (router, health) =
        crate::server::endpoint(&settings, service, tls.identity_binding).await?;
    let stop = CancellationToken::new();
    let restarts = tokio::spawn(restart_on_renewal(
        controller,
        credentials.clone(),
        connections.clone(),
        tls.restart_grace,
        health,
        stop.clone(),
    ));

    let timeout = settings.accept.handshake_timeout;
    let rate = settings.control_frames_per_sec;
    let new_streams = settings.new_streams_per_sec;
    let max_refused = settings.max_refused_messages;
    let incoming = TlsIncoming::counted(listener, credentials, settings.accept, refusals.clone())
        .map(move |mut conn| {
            let epoch = conn.info().generation();
            let establishing = conn.establishing();
            // The TLS handshake and the HTTP/2 preface share one deadline (R-BAD-3).
            let guard = GuardSettings {
                preface_deadline: conn.info().accepted_at() + timeout,
                control_frames_per_sec: rate,
                new_streams_per_sec: new_streams,
                max_refused_messages: max_refused,
                refusals: refusals.clone(),
            };
            let conn = Guarded::establishing(SmConn(conn), guard, establishing);
            Ok::<_, Infallible>(connections.track_in(conn, epoch))
        });
    let result = router
        .serve_with_incoming_shutdown(incoming, async {
            shutdown.await;
            stop.cancel();
        })
        .await;
    stop.cancel();
    let _ = restarts.await;
    result?;
    info!("mTLS gRPC server stopped");
    Ok(())
}

/// On every new credentials generation: end every SM stream, then close the connections of
/// older generations once `grace` has passed. Health reports not serving meanwhile.
async fn restart_on_renewal(
    controller: Controller,
    mut credentials: watch::Receiver<ServerCredentials>,
    connections: Connections,
    grace: Duration,
    health: Health,
    stop: CancellationToken,
) {
    let mut serving = credentials.borrow_and_update().generation;
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            changed = credentials.changed() => {
                if changed.is_err() {
                    warn!("credentials publisher gone; no more renewals will be taken up");
                    stop.cancelled().await;
                    return;
                }
            }
        }
        let generation = credentials.borrow_and_update().generation;
        if generation == serving {
            continue;
        }
        serving = generation;
        health.set(false).await;
        let streams = controller.restart_streams();
        info!(
            generation,
            streams, "server credentials renewed: SM streams restarted"
        );
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(grace) => {}
        }
        connections.close_before(generation);
        health.set(true).await;
    }
}
