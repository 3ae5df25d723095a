//! What the integration tests share: a PKI written to a temporary directory, a TLS client, an
//! echo server over `TlsIncoming`, a fake certificate provider, and a capture of log events.
//! Every wait has a deadline.

// Each test file uses its own part of this module; `pub` is for those files.
#![allow(dead_code, unreachable_pub)]

use std::{
    collections::BTreeMap,
    fmt,
    future::Future,
    io,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{Arc, Mutex, OnceLock},
    thread::ThreadId,
    time::Duration,
};

use async_trait::async_trait;
use rustls::{
    ClientConfig, RootCertStore,
    pki_types::{CertificateDer, ServerName},
};
use smcontroller_api::{CertInfo, CertLoader, CertProvider};
use smcontroller_certs::{
    AcceptSettings, CredentialsBuilder, FileCertLoader, ServerCredentials, TlsConnInfo,
    TlsIncoming,
    test_util::{TestCert, TestPki},
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::{mpsc, watch},
    task::JoinHandle,
};
use tokio_rustls::{TlsConnector, client::TlsStream};
use tracing::{
    Event, Subscriber,
    field::{Field, Visit},
};
use tracing_subscriber::{Layer, layer::Context, prelude::*};

/// How long any one wait of a test may take before the test fails.
pub const DEADLINE: Duration = Duration::from_secs(10);

/// The deadline of waits in tests that run on Tokio's paused clock, where time jumps to the next
/// timer when every task waits: longer than any retry the tests wait through, and costing no
/// real time.
pub const PAUSED_DEADLINE: Duration = Duration::from_secs(3600);

/// `fut`, or a panic naming `what` if it takes longer than [`DEADLINE`].
pub async fn within<T>(what: &str, fut: impl Future<Output = T>) -> T {
    within_for(DEADLINE, what, fut).await
}

/// `fut`, or a panic naming `what` if it takes longer than `deadline`.
pub async fn within_for<T>(deadline: Duration, what: &str, fut: impl Future<Output = T>) -> T {
    match tokio::time::timeout(deadline, fut).await {
        Ok(value) => value,
        Err(_) => panic!("timed out after {deadline:?} waiting for {what}"),
    }
}

/// A test PKI with the CA and the server's chain and key written to a temporary directory.
pub struct Pki {
    pub pki: TestPki,
    pub dir: tempfile::TempDir,
    pub server: TestCert,
}

impl Pki {
    pub fn new() -> Self {
        let pki = TestPki::new().expect("test PKI");
        let dir = tempfile::tempdir().expect("temporary directory");
        std::fs::write(dir.path().join("ca.pem"), pki.ca_pem()).unwrap();
        let server = pki.server().unwrap();
        server.write(dir.path(), "server").unwrap();
        Self { pki, dir, server }
    }

    pub fn path(&self, file: &str) -> PathBuf {
        self.dir.path().join(file)
    }

    /// `file://` URL of `file` in the directory.
    pub fn url(&self, file: &str) -> String {
        format!("file://{}", self.path(file).display())
    }

    pub fn ca_url(&self) -> String {
        self.url("ca.pem")
    }

    pub fn server_info(&self) -> CertInfo {
        CertInfo {
            cert_url: self.url("server.pem"),
            key_url: self.url("server.key"),
            not_after: None,
        }
    }

    /// Replaces `file` with `contents` by a rename, as a renewal would.
    pub fn replace(&self, file: &str, contents: &str) {
        let tmp = self.path(&format!("{file}.new"));
        std::fs::write(&tmp, contents).unwrap();
        std::fs::rename(&tmp, self.path(file)).unwrap();
    }

    /// A builder over the files, with a fake provider that announces renewals when told.
    pub fn builder(&self, loader: Arc<dyn CertLoader>) -> (CredentialsBuilder, FakeProvider) {
        let provider = FakeProvider::new(self.server_info());
        let builder =
            CredentialsBuilder::new(Arc::new(provider.clone()), loader, "sm", self.ca_url());
        (builder, provider)
    }
}

/// A [`CertProvider`] of one storage whose renewals the test announces with [`notify`].
#[derive(Clone)]
pub struct FakeProvider {
    renewals: Arc<watch::Sender<CertInfo>>,
}

impl FakeProvider {
    pub fn new(info: CertInfo) -> Self {
        Self {
            renewals: Arc::new(watch::Sender::new(info)),
        }
    }

    /// Announces a renewal (the same URLs: the files were replaced).
    pub fn notify(&self) {
        self.renewals.send_modify(|_| {});
    }
}

#[async_trait]
impl CertProvider for FakeProvider {
    async fn get_cert(&self, _storage: &str) -> smcontroller_api::Result<CertInfo> {
        Ok(self.renewals.borrow().clone())
    }

    fn subscribe_renewals(&self, _storage: &str) -> watch::Receiver<CertInfo> {
        self.renewals.subscribe()
    }
}

/// A [`FileCertLoader`] that counts the private keys it loads (one per build) and, when gated,
/// holds each load until the test opens the gate.
pub struct CountingLoader {
    inner: FileCertLoader,
    builds: watch::Sender<usize>,
    gate: tokio::sync::Semaphore,
    gated: bool,
}

impl CountingLoader {
    pub fn new() -> Arc<Self> {
        Self::with_gate(false)
    }

    /// A loader whose loads wait for [`open`](Self::open).
    pub fn gated() -> Arc<Self> {
        Self::with_gate(true)
    }

    fn with_gate(gated: bool) -> Arc<Self> {
        Arc::new(Self {
            inner: FileCertLoader::new(),
            builds: watch::Sender::new(0),
            gate: tokio::sync::Semaphore::new(0),
            gated,
        })
    }

    /// Lets `builds` more builds through the gate.
    pub fn open(&self, builds: usize) {
        self.gate.add_permits(builds);
    }

    /// How many builds have started.
    pub fn builds(&self) -> usize {
        *self.builds.borrow()
    }

    /// Waits until `n` builds have started (on the paused clock).
    pub async fn wait_builds(&self, n: usize) {
        let mut builds = self.builds.subscribe();
        within_for(
            PAUSED_DEADLINE,
            &format!("build #{n}"),
            builds.wait_for(|&b| b >= n),
        )
        .await
        .unwrap();
    }
}

#[async_trait]
impl CertLoader for CountingLoader {
    async fn load_cert_chain(
        &self,
        url: &str,
    ) -> smcontroller_api::Result<Vec<smcontroller_api::CertificateDer>> {
        self.inner.load_cert_chain(url).await
    }

    async fn load_private_key(
        &self,
        url: &str,
    ) -> smcontroller_api::Result<smcontroller_api::PrivateKeyDer> {
        self.builds.send_modify(|b| *b += 1);
        if self.gated {
            self.gate.acquire().await.unwrap().forget();
        }
        self.inner.load_private_key(url).await
    }
}

/// A client's TLS settings: trusts `ca`, offers ALPN `h2`, presents `cert` if given.
pub fn client_config(ca: CertificateDer<'static>, cert: Option<&TestCert>) -> Arc<ClientConfig> {
    client_config_with(
        ca,
        cert,
        &[&rustls::version::TLS13, &rustls::version::TLS12],
    )
}

/// [`client_config`] limited to the TLS `versions` given.
pub fn client_config_with(
    ca: CertificateDer<'static>,
    cert: Option<&TestCert>,
    versions: &[&'static rustls::SupportedProtocolVersion],
) -> Arc<ClientConfig> {
    let mut roots = RootCertStore::empty();
    roots.add(ca).unwrap();
    let builder = ClientConfig::builder_with_provider(smcontroller_certs::crypto_provider())
        .with_protocol_versions(versions)
        .unwrap()
        .with_root_certificates(roots);
    let mut config = match cert {
        Some(cert) => builder
            .with_client_auth_cert(vec![cert.cert_der()], cert.key_der())
            .unwrap(),
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    Arc::new(config)
}

/// Connects to `addr` as `localhost` and completes the client's side of the handshake.
pub async fn connect(
    addr: SocketAddr,
    config: Arc<ClientConfig>,
) -> io::Result<TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await?;
    let name = ServerName::try_from("localhost").unwrap();
    TlsConnector::from(config).connect(name, tcp).await
}

/// Sends `ping` and reads the echo: what a client of the echo server gets back.
pub async fn ping(stream: &mut TlsStream<TcpStream>) -> io::Result<Vec<u8>> {
    stream.write_all(b"ping").await?;
    stream.flush().await?;
    let mut echo = vec![0; 4];
    stream.read_exact(&mut echo).await?;
    Ok(echo)
}

/// Connects, then pings: `Ok(echo)` for a client the server serves, an error for one it
/// refuses (TLS 1.3 clients only learn it when they read: the server checks their certificate
/// after their side of the handshake is done).
pub async fn session(addr: SocketAddr, config: Arc<ClientConfig>) -> io::Result<Vec<u8>> {
    let mut stream = connect(addr, config).await?;
    ping(&mut stream).await
}

/// An echo server over [`TlsIncoming`]: reports each connection it accepts, echoes its bytes.
pub struct EchoServer {
    pub addr: SocketAddr,
    pub accepted: mpsc::UnboundedReceiver<TlsConnInfo>,
    task: JoinHandle<()>,
}

impl EchoServer {
    pub async fn start(
        credentials: watch::Receiver<ServerCredentials>,
        settings: AcceptSettings,
    ) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut incoming = TlsIncoming::new(listener, credentials, settings);
        assert_eq!(incoming.local_addr(), Some(addr));
        let (tx, accepted) = mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            while let Some(mut conn) = incoming.accept().await {
                let _ = tx.send(conn.info().clone());
                tokio::spawn(async move {
                    let mut buf = [0; 1024];
                    loop {
                        match conn.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => {
                                if conn.write_all(&buf[..n]).await.is_err() {
                                    return;
                                }
                            }
                        }
                    }
                });
            }
        });
        Self {
            addr,
            accepted,
            task,
        }
    }

    /// The next connection the server accepted.
    pub async fn next_accepted(&mut self) -> TlsConnInfo {
        within("an accepted connection", self.accepted.recv())
            .await
            .expect("server stopped")
    }
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// One log event: its level, message and other fields, as text.
#[derive(Debug, Clone)]
pub struct Logged {
    pub level: tracing::Level,
    pub message: String,
    pub fields: BTreeMap<String, String>,
}

impl Logged {
    pub fn field(&self, name: &str) -> Option<&str> {
        self.fields.get(name).map(String::as_str)
    }
}

/// The log events of the current thread (where `#[tokio::test]` runs every task of a test),
/// kept for the test to look at.
///
/// Events are collected by one process-wide subscriber and told apart by thread. (A
/// thread-local `set_default` per test is not enough: tracing caches whether a callsite is
/// enabled from the thread that reaches it first, so a test without a capture running beside
/// one with it can switch its events off.)
#[derive(Clone)]
pub struct Logs {
    thread: ThreadId,
    collector: &'static Collector,
}

struct Collector {
    events: Mutex<Vec<(ThreadId, Logged)>>,
    added: watch::Sender<usize>,
}

static COLLECTOR: OnceLock<&'static Collector> = OnceLock::new();

impl Logs {
    /// The events of this thread from now on.
    pub fn capture() -> Self {
        let collector = *COLLECTOR.get_or_init(|| {
            let collector: &'static Collector = Box::leak(Box::new(Collector {
                events: Mutex::default(),
                added: watch::Sender::new(0),
            }));
            tracing::subscriber::set_global_default(
                tracing_subscriber::registry().with(CollectorLayer(collector)),
            )
            .expect("no other global subscriber in these tests");
            collector
        });
        Self {
            thread: std::thread::current().id(),
            collector,
        }
    }

    /// The events so far that `pick` selects.
    pub fn matching(&self, pick: impl Fn(&Logged) -> bool) -> Vec<Logged> {
        self.collector
            .events
            .lock()
            .unwrap()
            .iter()
            .filter(|(thread, event)| *thread == self.thread && pick(event))
            .map(|(_, event)| event.clone())
            .collect()
    }

    /// Waits for an event that `pick` selects, and returns it.
    pub async fn wait_for(&self, what: &str, pick: impl Fn(&Logged) -> bool) -> Logged {
        let mut added = self.collector.added.subscribe();
        within(&format!("a log event: {what}"), async {
            loop {
                if let Some(found) = self.matching(&pick).into_iter().next() {
                    return found;
                }
                added.changed().await.unwrap();
            }
        })
        .await
    }
}

struct CollectorLayer(&'static Collector);

impl<S: Subscriber> Layer<S> for CollectorLayer {
    fn on_event(&self, event: &Event<'_>, _ctx: Context<'_, S>) {
        let mut visitor = Fields::default();
        event.record(&mut visitor);
        let message = visitor.0.remove("message").unwrap_or_default();
        let logged = Logged {
            level: *event.metadata().level(),
            message,
            fields: visitor.0,
        };
        let thread = std::thread::current().id();
        self.0.events.lock().unwrap().push((thread, logged));
        self.0.added.send_modify(|n| *n += 1);
    }
}

#[derive(Default)]
struct Fields(BTreeMap<String, String>);

impl Visit for Fields {
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.0.insert(field.name().to_owned(), format!("{value:?}"));
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().to_owned(), value.to_owned());
    }
}

/// Whether `path`'s text appears in `text`.
pub fn names(text: &str, path: &Path) -> bool {
    text.contains(&path.display().to_string())
}
