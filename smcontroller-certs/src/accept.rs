//! [`TlsIncoming`]: TCP connections accepted and put through the TLS handshake with the current
//! credentials, handed on as [`TlsConn`]s; [`PlainIncoming`]: the same accept loop without TLS,
//! for insecure mode.
//!
//! Both hold the listener to the same bounds (contract R-BAD-3): at most `max_connections`
//! open at once, a connection beyond it closed as soon as it is accepted (counted, and logged
//! at a bounded rate); `accept` errors such as running out of file descriptors pause the loop
//! (10 ms growing to 1 s) and are logged once per run, so the loop never spins.

use std::{
    fmt, io,
    net::SocketAddr,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use rustls::{CertificateError, pki_types::CertificateDer};
use smcontroller_limits::{Budget, Refusals, WarnGate};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
    sync::{OwnedSemaphorePermit, Semaphore, mpsc, watch},
    task::JoinHandle,
    time::Instant,
};
use tokio_rustls::{TlsAcceptor, server::TlsStream};
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};
use tracing::{debug, info, warn};

use crate::{PeerIdentity, ServerCredentials};

/// How long a TLS handshake may take unless told otherwise.
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// How many connections may be open at once unless told otherwise.
pub const DEFAULT_MAX_CONNECTIONS: usize = 4096;

/// The first pause after a failed `accept` (doubling up to [`MAX_ACCEPT_BACKOFF`]).
const MIN_ACCEPT_BACKOFF: Duration = Duration::from_millis(10);

/// The longest pause after failed `accept`s in a row.
const MAX_ACCEPT_BACKOFF: Duration = Duration::from_secs(1);

/// How long a new connection at the cap waits for an evicted one to free its place.
const EVICTION_WAIT: Duration = Duration::from_millis(100);

/// How many finished handshakes may wait for the server to take them.
const QUEUE: usize = 64;

/// Settings of [`TlsIncoming`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct AcceptSettings {
    /// How long a connection may take to finish its TLS handshake before it is closed (default
    /// [`DEFAULT_HANDSHAKE_TIMEOUT`]).
    pub handshake_timeout: Duration,
    /// How many connections may be open at once, handshaking or handed on (default
    /// [`DEFAULT_MAX_CONNECTIONS`]). At the cap a new connection is accepted and closed at once,
    /// counted as [`Budget::Connections`], rather than left in the kernel's backlog.
    pub max_connections: usize,
    /// Whether to set `TCP_NODELAY` on accepted sockets (default `true`: gRPC messages are
    /// small and latency matters more than packet count).
    pub nodelay: bool,
}

impl Default for AcceptSettings {
    fn default() -> Self {
        Self {
            handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            nodelay: true,
        }
    }
}

impl AcceptSettings {
    /// The settings with `timeout` as the handshake timeout.
    pub fn with_handshake_timeout(mut self, timeout: Duration) -> Self {
        self.handshake_timeout = timeout;
        self
    }

    /// The settings with `max` as the cap on open connections (at least 1).
    pub fn with_max_connections(mut self, max: usize) -> Self {
        self.max_connections = max.max(1);
        self
    }

    /// The settings with `TCP_NODELAY` on or off.
    pub fn with_nodelay(mut self, nodelay: bool) -> Self {
        self.nodelay = nodelay;
        self
    }
}

/// Connections accepted on a listener and through the TLS handshake, as a stream of
/// [`TlsConn`]s to serve (for instance with tonic's `serve_with_incoming`, through a wrapper
/// that implements tonic's `Connected`: this crate does not depend on tonic).
///
/// A background task accepts TCP connections and runs each one's handshake in a task of its own,
/// with the [`ServerCredentials`] current at that moment, under the handshake timeout. A
/// connection that fails its handshake is closed and logged once, as a warning with the peer's
/// address and the reason ([`HandshakeRefusal`]): no client certificate, unknown CA, expired,
/// not for client authentication, timeout, ... It is never handed on. Failing `accept`s (out of
/// file descriptors, ...) pause the loop, growing from 10 ms to 1 s, and are logged once per run
/// of failures.
///
/// Dropping the `TlsIncoming` stops accepting and drops the handshakes under way; connections
/// already handed on are not affected.
#[derive(Debug)]
pub struct TlsIncoming {
    accepted: mpsc::Receiver<TlsConn>,
    local_addr: Option<SocketAddr>,
    task: JoinHandle<()>,
}

impl TlsIncoming {
    /// Starts accepting on `listener` with the credentials `credentials` holds (typically
    /// [`CredentialsReloader::subscribe`](crate::CredentialsReloader::subscribe)). Must be
    /// called within a Tokio runtime.
    ///
    /// The listener may be shared (`Arc`), so that a server restarted with another
    /// `TlsIncoming` keeps its port.
    pub fn new(
        listener: impl Into<Arc<TcpListener>>,
        credentials: watch::Receiver<ServerCredentials>,
        settings: AcceptSettings,
    ) -> Self {
        Self::counted(listener, credentials, settings, Refusals::new())
    }

    /// [`new`](Self::new), counting connections over the cap and handshakes that time out
    /// into `refusals`.
    pub fn counted(
        listener: impl Into<Arc<TcpListener>>,
        credentials: watch::Receiver<ServerCredentials>,
        settings: AcceptSettings,
        refusals: Refusals,
    ) -> Self {
        let listener = listener.into();
        let local_addr = listener.local_addr().ok();
        let (tx, accepted) = mpsc::channel(QUEUE);
        let acceptor = TcpAcceptor::new(listener, settings, refusals);
        let task = tokio::spawn(accept_loop(acceptor, credentials, settings, tx));
        Self {
            accepted,
            local_addr,
            task,
        }
    }

    /// The next connection that completed its handshake; `None` once accepting has stopped.
    pub async fn accept(&mut self) -> Option<TlsConn> {
        self.accepted.recv().await
    }

    /// The address the listener is bound to.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.local_addr
    }
}

impl Drop for TlsIncoming {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl tokio_stream::Stream for TlsIncoming {
    type Item = TlsConn;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<TlsConn>> {
        self.accepted.poll_recv(cx)
    }
}

/// A connection that completed its TLS handshake: a byte stream (`AsyncRead + AsyncWrite`) with
/// what the handshake established about the peer ([`TlsConnInfo`]).
///
/// While it is open it holds one of the [`max_connections`](AcceptSettings::max_connections)
/// slots.
pub struct TlsConn {
    stream: TlsStream<TcpStream>,
    info: TlsConnInfo,
    establishing: Option<Establishing>,
    _slot: OwnedSemaphorePermit,
}

impl fmt::Debug for TlsConn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsConn")
            .field("info", &self.info)
            .finish_non_exhaustive()
    }
}

impl TlsConn {
    /// What the handshake established about the peer.
    pub fn info(&self) -> &TlsConnInfo {
        &self.info
    }

    /// The connection's place among those not established yet: the server holds it until the
    /// peer has sent its HTTP/2 preface, and closes the connection if it is evicted first
    /// (R-BAD-3). `None` once taken.
    pub fn establishing(&mut self) -> Option<Establishing> {
        self.establishing.take()
    }

    /// The TLS stream, for what [`TlsConnInfo`] does not tell (the negotiated version, ...).
    pub fn get_ref(&self) -> &TlsStream<TcpStream> {
        &self.stream
    }
}

/// What the handshake of a [`TlsConn`] established. Cheap to clone (a tonic `Connected` wrapper
/// can hand it to every request).
#[derive(Debug, Clone)]
pub struct TlsConnInfo {
    peer_addr: SocketAddr,
    accepted_at: Instant,
    generation: u64,
    peer_certificates: Arc<[CertificateDer<'static>]>,
    peer_identity: Option<Arc<PeerIdentity>>,
}

impl TlsConnInfo {
    /// The peer's address.
    pub fn peer_addr(&self) -> SocketAddr {
        self.peer_addr
    }

    /// When the TCP connection was accepted: the handshake timeout counts from here, for the
    /// TLS handshake and what follows it (the HTTP/2 preface).
    pub fn accepted_at(&self) -> Instant {
        self.accepted_at
    }

    /// The generation of the [`ServerCredentials`] the handshake used.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// The client's certificate chain as it presented it, leaf first (verified against the CA
    /// by the handshake).
    pub fn peer_certificates(&self) -> &[CertificateDer<'static>] {
        &self.peer_certificates
    }

    /// The names in the client's leaf certificate (CN and DNS SANs), to bind a node id to
    /// (contract R-TLS-4). `None` if the leaf could not be parsed for them.
    pub fn peer_identity(&self) -> Option<&PeerIdentity> {
        self.peer_identity.as_deref()
    }
}

/// `AsyncRead` and `AsyncWrite` for a connection type, by its `stream` field.
macro_rules! io_through_stream {
    ($conn:ty) => {
        impl AsyncRead for $conn {
            fn poll_read(
                mut self: Pin<&mut Self>,
                cx: &mut Context<'_>,
                buf: &mut ReadBuf<'_>,
            ) -> Poll<io::Result<()>> {
                Pin::new(&mut self.stream).poll_read(cx, buf)
            }
        }

        impl AsyncWrite for $conn {
            fn poll_write(
                mut self: Pin<&mut Self>,
                cx: &mut Context<'_>,
                buf: &[u8],
            ) -> Poll<io::Result<usize>> {
                Pin::new(&mut self.stream).poll_write(cx, buf)
            }

            fn poll_write_vectored(
                mut self: Pin<&mut Self>,
                cx: &mut Context<'_>,
                bufs: &[io::IoSlice<'_>],
            ) -> Poll<io::Result<usize>> {
                Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
            }

            fn is_write_vectored(&self) -> bool {
                self.stream.is_write_vectored()
            }

            fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
                Pin::new(&mut self.stream).poll_flush(cx)
            }

            fn poll_shutdown(
                mut self: Pin<&mut Self>,
                cx: &mut Context<'_>,
            ) -> Poll<io::Result<()>> {
                Pin::new(&mut self.stream).poll_shutdown(cx)
            }
        }
    };
}

io_through_stream!(TlsConn);
io_through_stream!(PlainConn);

/// Why a TLS handshake was refused, as logged (the `reason` field of the warning).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum HandshakeRefusal {
    /// The client presented no certificate.
    NoClientCertificate,
    /// The client's certificate is not signed by the CA.
    UnknownCa,
    /// The client's certificate has expired.
    Expired,
    /// The client's certificate is not valid yet.
    NotYetValid,
    /// The client's certificate is not for client authentication (its extended key usage does
    /// not include `clientAuth`, e.g. a server-only certificate).
    NotForClientAuth,
    /// The client's certificate was refused for another reason (bad signature, revoked,
    /// unparsable, unsupported algorithm, ...).
    BadCertificate,
    /// The client does not speak HTTP/2 (ALPN `h2`).
    NoCommonProtocol,
    /// The client offered no TLS version, cipher suite or key exchange the server supports.
    Incompatible,
    /// The client sent an alert and gave up (for instance because it does not trust the
    /// server's certificate).
    ClientAlert,
    /// What the client sent is not TLS (a plain-text HTTP/2 client, a port scanner, ...) or
    /// breaks the protocol.
    NotTls,
    /// The connection closed or failed before the handshake was done.
    ConnectionClosed,
    /// The handshake did not finish within the handshake timeout.
    TimedOut,
    /// Anything else.
    Other,
}

impl HandshakeRefusal {
    /// The reason for a handshake that failed with `error` (as tokio-rustls returns it: an I/O
    /// error wrapping the rustls error, or a plain I/O error).
    pub fn of(error: &io::Error) -> Self {
        let Some(tls) = error
            .get_ref()
            .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        else {
            return match error.kind() {
                io::ErrorKind::UnexpectedEof
                | io::ErrorKind::ConnectionReset
                | io::ErrorKind::ConnectionAborted
                | io::ErrorKind::BrokenPipe => Self::ConnectionClosed,
                io::ErrorKind::InvalidData => Self::NotTls,
                _ => Self::Other,
            };
        };
        match tls {
            rustls::Error::NoCertificatesPresented => Self::NoClientCertificate,
            rustls::Error::InvalidCertificate(cert) => match cert {
                CertificateError::UnknownIssuer => Self::UnknownCa,
                CertificateError::Expired | CertificateError::ExpiredContext { .. } => {
                    Self::Expired
                }
                CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
                    Self::NotYetValid
                }
                CertificateError::InvalidPurpose
                | CertificateError::InvalidPurposeContext { .. } => Self::NotForClientAuth,
                _ => Self::BadCertificate,
            },
            rustls::Error::NoApplicationProtocol => Self::NoCommonProtocol,
            rustls::Error::PeerIncompatible(_) => Self::Incompatible,
            rustls::Error::AlertReceived(_) => Self::ClientAlert,
            rustls::Error::InappropriateMessage { .. }
            | rustls::Error::InappropriateHandshakeMessage { .. }
            | rustls::Error::InvalidMessage(_)
            | rustls::Error::PeerMisbehaved(_)
            | rustls::Error::PeerSentOversizedRecord
            | rustls::Error::DecryptError => Self::NotTls,
            _ => Self::Other,
        }
    }

    /// The reason in a few words, as logged.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::NoClientCertificate => "no client certificate",
            Self::UnknownCa => "client certificate not signed by the CA",
            Self::Expired => "client certificate expired",
            Self::NotYetValid => "client certificate not valid yet",
            Self::NotForClientAuth => "client certificate not for client authentication (EKU)",
            Self::BadCertificate => "bad client certificate",
            Self::NoCommonProtocol => "client does not offer ALPN h2",
            Self::Incompatible => "no TLS version, cipher suite or key exchange in common",
            Self::ClientAlert => "client aborted the handshake",
            Self::NotTls => "not TLS, or broke the protocol",
            Self::ConnectionClosed => "connection closed during the handshake",
            Self::TimedOut => "handshake timed out",
            Self::Other => "handshake failed",
        }
    }
}

impl fmt::Display for HandshakeRefusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Accepts TCP connections within the connection cap, backing off on `accept` errors.
struct TcpAcceptor {
    listener: Arc<TcpListener>,
    slots: Arc<Semaphore>,
    nodelay: bool,
    refusals: Refusals,
    failures: u32,
    backoff: Duration,
    /// Connections over the cap: one line now and then, with the count.
    over_cap: WarnGate,
    unestablished: Unestablished,
}

/// One accepted connection, holding its place under the cap.
struct Accepted {
    tcp: TcpStream,
    peer: SocketAddr,
    at: Instant,
    slot: OwnedSemaphorePermit,
    establishing: Establishing,
}

/// The accepted connections that have not yet shown they are SMs (TLS handshake and HTTP/2
/// preface not finished), oldest first. When the connection cap or the process's file
/// descriptors run out, the oldest of them is closed to make room, so that connections that
/// never speak (slowloris) cannot keep a new SM out: a real SM finishes both within
/// milliseconds.
#[derive(Clone, Default)]
struct Unestablished {
    inner: Arc<std::sync::Mutex<(u64, std::collections::BTreeMap<u64, CancellationToken>)>>,
}

impl Unestablished {
    fn lock(
        &self,
    ) -> std::sync::MutexGuard<'_, (u64, std::collections::BTreeMap<u64, CancellationToken>)> {
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn enter(&self) -> Establishing {
        let token = CancellationToken::new();
        let mut inner = self.lock();
        let id = inner.0;
        inner.0 += 1;
        inner.1.insert(id, token.clone());
        Establishing {
            id,
            token,
            list: self.clone(),
        }
    }

    /// Closes the oldest connection not established yet; `false` if there is none.
    fn evict_oldest(&self) -> bool {
        let oldest = self.lock().1.pop_first();
        match oldest {
            Some((_, token)) => {
                token.cancel();
                true
            }
            None => false,
        }
    }
}

/// A connection's place among those not established yet (see [`TlsConn::establishing`]).
/// Dropping it, once the peer has spoken HTTP/2, takes the connection out of the ones that
/// may be evicted; [`evicted`](Self::evicted) resolves if it is evicted before that.
pub struct Establishing {
    id: u64,
    token: CancellationToken,
    list: Unestablished,
}

impl fmt::Debug for Establishing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Establishing")
            .field("id", &self.id)
            .field("evicted", &self.token.is_cancelled())
            .finish()
    }
}

impl Establishing {
    /// Resolves when the connection is evicted: close it.
    pub fn evicted(&self) -> WaitForCancellationFutureOwned {
        self.token.clone().cancelled_owned()
    }

    /// Whether the connection has been evicted.
    pub fn is_evicted(&self) -> bool {
        self.token.is_cancelled()
    }
}

impl Drop for Establishing {
    fn drop(&mut self) {
        self.list.lock().1.remove(&self.id);
    }
}

impl TcpAcceptor {
    fn new(listener: Arc<TcpListener>, settings: AcceptSettings, refusals: Refusals) -> Self {
        Self {
            listener,
            slots: Arc::new(Semaphore::new(settings.max_connections.max(1))),
            nodelay: settings.nodelay,
            refusals,
            failures: 0,
            backoff: MIN_ACCEPT_BACKOFF,
            over_cap: WarnGate::default(),
            unestablished: Unestablished::default(),
        }
    }

    /// Evicts the oldest connection not established yet, counted and logged (rate-limited).
    fn evict(&self, why: &str) -> bool {
        if !self.unestablished.evict_oldest() {
            return false;
        }
        self.refusals.count(Budget::Connections);
        if let Some(gate) = self.over_cap.admit() {
            warn!(
                suppressed = gate.suppressed,
                why, "closed the oldest connection that has not finished its handshake and preface"
            );
        }
        true
    }

    /// The next connection under the cap. Connections over it are closed as they come.
    async fn next(&mut self) -> Accepted {
        loop {
            let (tcp, peer) = match self.listener.accept().await {
                Ok(accepted) => accepted,
                Err(e) if is_per_connection(&e) => {
                    debug!(error = %e, "a connection failed before it was accepted");
                    continue;
                }
                Err(e) => {
                    // Out of file descriptors: a connection that never spoke gives its own.
                    if self.evict("out of file descriptors") {
                        tokio::time::sleep(MIN_ACCEPT_BACKOFF).await;
                        continue;
                    }
                    if self.failures == 0 {
                        warn!(error = %e, "cannot accept connections; pausing and retrying \
                            (further failures logged at debug level)");
                    } else {
                        debug!(error = %e, failures = self.failures, "still cannot accept connections");
                    }
                    self.failures = self.failures.saturating_add(1);
                    tokio::time::sleep(self.backoff).await;
                    self.backoff = (self.backoff * 2).min(MAX_ACCEPT_BACKOFF);
                    continue;
                }
            };
            if self.failures > 0 {
                info!(failures = self.failures, "accepting connections again");
                self.failures = 0;
                self.backoff = MIN_ACCEPT_BACKOFF;
            }
            let slot = match Arc::clone(&self.slots).try_acquire_owned() {
                Ok(slot) => Some(slot),
                // At the cap: a connection that never spoke gives its place, if there is one.
                Err(_) if self.evict("connection cap (maxConnections)") => {
                    tokio::time::timeout(EVICTION_WAIT, Arc::clone(&self.slots).acquire_owned())
                        .await
                        .ok()
                        .and_then(Result::ok)
                }
                Err(_) => None,
            };
            let Some(slot) = slot else {
                self.refusals.count(Budget::Connections);
                if let Some(gate) = self.over_cap.admit() {
                    warn!(peer = %peer, suppressed = gate.suppressed,
                        "connection refused: too many open connections (maxConnections)");
                }
                drop(tcp);
                continue;
            };
            if self.nodelay
                && let Err(e) = tcp.set_nodelay(true)
            {
                debug!(peer = %peer, error = %e, "cannot set TCP_NODELAY");
            }
            return Accepted {
                tcp,
                peer,
                at: Instant::now(),
                slot,
                establishing: self.unestablished.enter(),
            };
        }
    }
}

/// Accepts connections and spawns their handshakes, until `tx`'s receiver is gone.
async fn accept_loop(
    mut acceptor: TcpAcceptor,
    credentials: watch::Receiver<ServerCredentials>,
    settings: AcceptSettings,
    tx: mpsc::Sender<TlsConn>,
) {
    // Refused handshakes are logged once each, and at a bounded rate all together.
    let refused = Arc::new(WarnGate::default());
    loop {
        let accepted = tokio::select! {
            accepted = acceptor.next() => accepted,
            () = tx.closed() => return,
        };
        let credentials = credentials.borrow().clone();
        tokio::spawn(handshake(
            accepted,
            credentials,
            settings.handshake_timeout,
            Refused {
                gate: refused.clone(),
                refusals: acceptor.refusals.clone(),
            },
            tx.clone(),
        ));
    }
}

/// Where a refused handshake is logged and counted.
struct Refused {
    gate: Arc<WarnGate>,
    refusals: Refusals,
}

/// Errors of `accept` that concern one connection only: the next `accept` may succeed at once.
fn is_per_connection(error: &io::Error) -> bool {
    matches!(
        error.kind(),
        io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionRefused
            | io::ErrorKind::Interrupted
            | io::ErrorKind::WouldBlock
    )
}

/// One connection's handshake: handed on if it succeeds, logged (at a bounded rate) if not.
async fn handshake(
    accepted: Accepted,
    credentials: ServerCredentials,
    timeout: Duration,
    refused: Refused,
    tx: mpsc::Sender<TlsConn>,
) {
    let Accepted {
        tcp,
        peer,
        at,
        slot,
        establishing,
    } = accepted;
    let acceptor = TlsAcceptor::from(Arc::clone(&credentials.config));
    let handshake = tokio::select! {
        handshake = tokio::time::timeout_at(at + timeout, acceptor.accept(tcp)) => handshake,
        () = establishing.evicted() => {
            debug!(peer = %peer, "evicted during its TLS handshake");
            return;
        }
    };
    let stream = match handshake {
        Ok(Ok(stream)) => stream,
        Ok(Err(e)) => {
            let reason = HandshakeRefusal::of(&e);
            metrics::counter!("smcontroller_tls_handshake_failures_total", "reason" => reason.as_str())
                .increment(1);
            if let Some(gate) = refused.gate.admit() {
                warn!(peer = %peer, reason = %reason, error = %e, suppressed = gate.suppressed,
                    generation = credentials.generation, "TLS handshake refused");
            }
            return;
        }
        Err(_) => {
            refused.refusals.count(Budget::Handshake);
            metrics::counter!("smcontroller_tls_handshake_failures_total",
                "reason" => HandshakeRefusal::TimedOut.as_str())
            .increment(1);
            if let Some(gate) = refused.gate.admit() {
                warn!(peer = %peer, reason = %HandshakeRefusal::TimedOut, timeout = ?timeout,
                    suppressed = gate.suppressed, generation = credentials.generation,
                    "TLS handshake refused");
            }
            return;
        }
    };
    let peer_certificates: Arc<[CertificateDer<'static>]> = stream
        .get_ref()
        .1
        .peer_certificates()
        .map(Arc::from)
        .unwrap_or_else(|| Arc::from(Vec::new()));
    let peer_identity = peer_certificates.first().and_then(|leaf| {
        PeerIdentity::from_der(leaf)
            .inspect_err(|e| {
                debug!(peer = %peer, error = %e, "cannot read the names of the client certificate");
            })
            .ok()
            .map(Arc::new)
    });
    debug!(peer = %peer, generation = credentials.generation,
        common_name = ?peer_identity.as_ref().and_then(|id| id.common_name().map(str::to_owned)),
        "TLS handshake done");
    let conn = TlsConn {
        stream,
        info: TlsConnInfo {
            peer_addr: peer,
            accepted_at: at,
            generation: credentials.generation,
            peer_certificates,
            peer_identity,
        },
        establishing: Some(establishing),
        _slot: slot,
    };
    // If the server is gone, the connection is just closed.
    let _ = tx.send(conn).await;
}

/// Connections accepted on a listener without TLS (insecure mode), under the same cap and
/// backoff as [`TlsIncoming`]'s, as a stream of [`PlainConn`]s.
#[derive(Debug)]
pub struct PlainIncoming {
    accepted: mpsc::Receiver<PlainConn>,
    task: JoinHandle<()>,
}

impl PlainIncoming {
    /// Starts accepting on `listener`, counting connections over the cap into `refusals`.
    /// Must be called within a Tokio runtime.
    pub fn new(
        listener: impl Into<Arc<TcpListener>>,
        settings: AcceptSettings,
        refusals: Refusals,
    ) -> Self {
        let (tx, accepted) = mpsc::channel(QUEUE);
        let mut acceptor = TcpAcceptor::new(listener.into(), settings, refusals);
        let task = tokio::spawn(async move {
            loop {
                let accepted = tokio::select! {
                    accepted = acceptor.next() => accepted,
                    () = tx.closed() => return,
                };
                let conn = PlainConn {
                    stream: accepted.tcp,
                    peer_addr: accepted.peer,
                    accepted_at: accepted.at,
                    establishing: Some(accepted.establishing),
                    _slot: accepted.slot,
                };
                if tx.send(conn).await.is_err() {
                    return;
                }
            }
        });
        Self { accepted, task }
    }
}

impl Drop for PlainIncoming {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl tokio_stream::Stream for PlainIncoming {
    type Item = PlainConn;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<PlainConn>> {
        self.accepted.poll_recv(cx)
    }
}

/// A connection accepted by [`PlainIncoming`]; it holds its place under the cap while open.
#[derive(Debug)]
pub struct PlainConn {
    stream: TcpStream,
    peer_addr: SocketAddr,
    accepted_at: Instant,
    establishing: Option<Establishing>,
    _slot: OwnedSemaphorePermit,
}

impl PlainConn {
    /// The peer's address.
    pub fn peer_addr(&self) -> SocketAddr {
        self.peer_addr
    }

    /// When the connection was accepted.
    pub fn accepted_at(&self) -> Instant {
        self.accepted_at
    }

    /// The connection's place among those not established yet (see
    /// [`TlsConn::establishing`]). `None` once taken.
    pub fn establishing(&mut self) -> Option<Establishing> {
        self.establishing.take()
    }

    /// The TCP stream.
    pub fn get_ref(&self) -> &TcpStream {
        &self.stream
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::AsyncReadExt;
    use tokio_stream::StreamExt;

    use super::*;

    const WAIT: Duration = Duration::from_secs(5);

    async fn next(incoming: &mut PlainIncoming) -> PlainConn {
        tokio::time::timeout(WAIT, incoming.next())
            .await
            .expect("a connection in time")
            .expect("accepting goes on")
    }

    /// R-BAD-3: at the connection cap, the oldest connection not established yet gives its
    /// place to the new one; an established one never does.
    #[tokio::test]
    async fn r_bad_3_at_the_cap_the_oldest_unestablished_connection_is_evicted() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let refusals = Refusals::new();
        let settings = AcceptSettings::default().with_max_connections(2);
        let mut incoming = PlainIncoming::new(listener, settings, refusals.clone());

        // One established (its place taken out of the eviction order), one idle.
        let _established_client = TcpStream::connect(addr).await.unwrap();
        let mut established = next(&mut incoming).await;
        drop(established.establishing());
        let mut idle_client = TcpStream::connect(addr).await.unwrap();
        let mut idle = next(&mut incoming).await;
        let idle_place = idle.establishing().unwrap();

        // A third: the idle one is told to go; once it has, the newcomer is handed on.
        let _newcomer_client = TcpStream::connect(addr).await.unwrap();
        let newcomer = tokio::spawn(async move { next(&mut incoming).await });
        tokio::time::timeout(WAIT, idle_place.evicted())
            .await
            .expect("the idle connection is evicted");
        drop((idle_place, idle));
        let newcomer = tokio::time::timeout(WAIT, newcomer)
            .await
            .expect("the newcomer is accepted")
            .unwrap();
        assert_eq!(refusals.get(Budget::Connections), 1);
        let mut buf = [0_u8; 1];
        let read = tokio::time::timeout(WAIT, idle_client.read(&mut buf)).await;
        assert!(
            matches!(read, Ok(Ok(0)) | Ok(Err(_))),
            "the evicted connection is closed: {read:?}"
        );
        drop((newcomer, established));
    }
}
