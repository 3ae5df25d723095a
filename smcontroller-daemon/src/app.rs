//! Wiring: the router and the gRPC server from [`Settings`], started and stopped as one.
//!
//! Unless the settings say `insecure`, the server speaks mTLS (contract R-TLS-1): a
//! [`FileCertProvider`] serves the storage `certStorage` from `certUrl` and `keyUrl` and watches
//! those files, a [`CredentialsReloader`] builds the credentials (with the CA `caCert`) at start
//! and again on each renewal, and `serve_tls` restarts the SM streams when they change
//! (R-TLS-3). In insecure mode the server logs a warning that it serves without TLS (R-TLS-2).
//!
//! For the operator, [`Running::serve_admin`] serves the admin API (`smctl`) on a local
//! endpoint of its own, over the router and the [`Recorder`]'s events, and [`serve_metrics`]
//! serves the metrics the crates record on `/metrics` (Prometheus text format).

use std::{net::SocketAddr, sync::Arc, time::Duration};

use async_trait::async_trait;
use smcontroller_admin::{
    directory::{self as admin_view, NetworkDirectory},
    server::{self as admin, AdminEndpoint, AdminServer, AdminService},
};
use smcontroller_api::{Error, InstanceIdent, ItemInfoProvider, NodeId, SmProtocol};
use smcontroller_certs::{
    AcceptSettings, CredentialsBuilder, CredentialsReloader, FileCertLoader, FileCertProvider,
    ReloadSettings,
};
use smcontroller_grpc::{
    connections::Connections,
    server::{self, ServeError, ServerSettings},
    tls::{self, Tls, TlsSettings},
};
use smcontroller_network::DefaultNetworks;
use smcontroller_routing::{Controller, Receivers};
use tokio::{sync::watch, task::JoinHandle};
use tracing::{info, warn};

use crate::{
    config::{BlobUrlTemplate, EXIT_BAD_CONFIG, Settings},
    memory::MemoryReturn,
    receivers::Recorder,
};

/// How long [`Running::stop`] lets the server finish its connections after the router has
/// closed every stream.
const SERVER_STOP_GRACE: Duration = Duration::from_millis(300);

/// The Aos error kind "not found" (`eNotFound`).
const AOS_NOT_FOUND: i32 = 5;

/// The router's settings from the daemon's.
pub fn router_settings(settings: &Settings) -> smcontroller_routing::Settings {
    smcontroller_routing::Settings {
        response_timeout: settings.response_timeout,
        reply_expiry: settings.reply_expiry,
        registration_timeout: settings.registration_timeout,
        queue_bound: settings.queue_bound,
        max_nodes: settings.max_nodes,
        max_pending_streams: settings.max_pending_streams,
        inbound_queue_bytes: settings.inbound_queue_bytes,
        outbound_backlog: settings.outbound_backlog,
        outbound_backlog_bytes: settings.outbound_backlog_bytes,
        sm_protocol: settings.sm_protocol,
        ..smcontroller_routing::Settings::default()
    }
}

/// The gRPC server's settings from the daemon's.
pub fn server_settings(settings: &Settings) -> ServerSettings {
    ServerSettings {
        max_message_size: settings.max_message_size,
        keepalive_interval: settings.keepalive_interval,
        keepalive_timeout: settings.keepalive_timeout,
        flow_window: settings.flow_window,
        connection_window: settings.connection_window.max(settings.flow_window),
        max_streams_per_connection: settings.max_streams_per_connection,
        max_id_len: settings.max_id_length,
        blob_lookups: settings.blob_lookups,
        control_frames_per_sec: settings.control_frames_per_second,
        new_streams_per_sec: settings.new_streams_per_second,
        max_refused_messages: settings.max_refused_messages,
        accept: AcceptSettings::default()
            .with_handshake_timeout(settings.handshake_timeout)
            .with_max_connections(settings.max_connections),
    }
}

/// The daemon's blob resolver when no `blobUrlTemplate` is configured: every digest is
/// unknown, so `GetBlobsInfos` answers `NOT_FOUND` naming it.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoBlobStore;

#[async_trait]
impl ItemInfoProvider for NoBlobStore {
    async fn get_blob_url(&self, digest: &str) -> smcontroller_api::Result<String> {
        Err(Error::Failed {
            aos_code: AOS_NOT_FOUND,
            exit_code: 0,
            message: format!("no blob store is configured in this daemon; cannot resolve {digest}"),
        })
    }
}

/// Blob URLs from the configured template (`blobUrlTemplate`): each digest is checked, then put
/// into the template. A string that is not a digest is refused, so `GetBlobsInfos` answers
/// `NOT_FOUND` naming it.
#[async_trait]
impl ItemInfoProvider for BlobUrlTemplate {
    async fn get_blob_url(&self, digest: &str) -> smcontroller_api::Result<String> {
        self.url(digest)
            .map_err(|e| Error::InvalidArgument(e.to_string()))
    }
}

/// The daemon's blob resolver: the `blobUrlTemplate` if one is configured, otherwise
/// [`NoBlobStore`].
pub fn blob_resolver(settings: &Settings) -> Arc<dyn ItemInfoProvider> {
    match &settings.blob_url_template {
        Some(template) => Arc::new(template.clone()),
        None => Arc::new(NoBlobStore),
    }
}

/// The mTLS server's settings from the daemon's.
pub fn tls_settings(settings: &Settings) -> TlsSettings {
    TlsSettings {
        identity_binding: settings.identity_binding,
        ..TlsSettings::default()
    }
}

/// Why [`start`] failed.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The server's TLS credentials cannot be loaded or built: a missing or unreadable file, a
    /// key that does not match the certificate, an expired certificate, a bad CA file... The
    /// message names the file and the reason.
    #[error("cannot load the server's TLS credentials: {}", .0.report())]
    Credentials(smcontroller_certs::Error),
    /// The settings lack what mTLS needs (only when they were not made by
    /// [`config::load`](crate::config::load), which checks it).
    #[error("mTLS needs {0}; set it, or serve insecure")]
    MissingTls(&'static str),
    /// The server cannot listen.
    #[error(transparent)]
    Serve(#[from] ServeError),
    /// The default network provider's state file cannot be read or written (9.1); the
    /// message names the file.
    #[error("cannot open the network state (networkStateFile): {0}")]
    Networks(String),
}

impl StartError {
    /// The process exit code for this error: [`EXIT_BAD_CONFIG`] (64) when the TLS settings or
    /// files are bad, 1 otherwise.
    pub fn exit_code(&self) -> i32 {
        match self {
            Self::Credentials(_) | Self::MissingTls(_) => EXIT_BAD_CONFIG,
            Self::Serve(_) | Self::Networks(_) => 1,
        }
    }
}

/// What keeps the server's credentials current while it serves over mTLS.
#[derive(Debug)]
struct TlsState {
    /// Rebuilds the credentials on each renewal; the server watches what it publishes.
    reloader: CredentialsReloader,
    /// Watches the certificate and key files; the reloader's builder holds it too.
    _provider: Arc<FileCertProvider>,
}

/// A serving controller.
#[derive(Debug)]
pub struct Running {
    /// The address the server listens on.
    pub addr: SocketAddr,
    /// The router: call the provided traits on it.
    pub controller: Controller,
    /// What the receivers recorded.
    pub recorder: Recorder,
    /// The default network provider, under 9.1.
    pub networks: Option<Arc<DefaultNetworks>>,
    stop: watch::Sender<bool>,
    server: JoinHandle<Result<(), ServeError>>,
    connections: Connections,
    tls: Option<TlsState>,
    admin: Vec<AdminServer>,
    gauges: Option<JoinHandle<()>>,
    /// Gives freed memory back to the OS once streams have ended (`memoryReturnDelay`).
    memory: Option<MemoryReturn>,
}

/// Binds `settings.listen` and serves: over mTLS unless `settings.insecure` (see the module
/// documentation). With mTLS, the credentials are built before anything listens; if they
/// cannot be, this fails with [`StartError::Credentials`].
pub async fn start(
    settings: &Settings,
    recorder: Recorder,
    items: Arc<dyn ItemInfoProvider>,
) -> Result<Running, StartError> {
    let tls = if settings.insecure {
        None
    } else {
        Some(load_credentials(settings).await?)
    };
    let controller = Controller::new(
        router_settings(settings),
        Receivers::all(Arc::new(recorder.clone())),
    );
    // Under 9.1 the daemon is the unit's network manager too (R-NET-4). It pushes firewall
    // updates through the controller's subscriptions, not through the controller itself.
    let (controller, networks) = match settings.sm_protocol {
        SmProtocol::V9_0 => (controller, None),
        SmProtocol::V9_1 => {
            let networks = DefaultNetworks::open(
                settings.network_pool.clone(),
                settings.network_state_file.clone(),
                Arc::new(controller.firewall_updates()),
            )
            .map(Arc::new)
            .map_err(|e| StartError::Networks(e.to_string()))?;
            info!(pool = %settings.network_pool, state = ?settings.network_state_file,
                "default network provider");
            (
                controller.with_network_provider(networks.clone()),
                Some(networks),
            )
        }
    };
    let listener = server::bind_with_backlog(settings.listen, settings.listen_backlog)?;
    let addr = listener.local_addr().map_err(|source| ServeError::Bind {
        addr: settings.listen,
        source,
    })?;
    let (stop, mut stopped) = watch::channel(false);
    let shutdown = async move {
        let _ = stopped.wait_for(|s| *s).await;
    };
    let connections = Connections::new();
    let server = match &tls {
        Some(state) => tokio::spawn(tls::serve_tls(
            listener,
            controller.clone(),
            items,
            server_settings(settings),
            Tls {
                credentials: state.reloader.subscribe(),
                settings: tls_settings(settings),
            },
            connections.clone(),
            shutdown,
        )),
        None => tokio::spawn(server::serve_insecure_with(
            listener,
            controller.clone(),
            items,
            server_settings(settings),
            connections.clone(),
            shutdown,
        )),
    };
    let memory = settings
        .memory_return_delay
        .map(|quiet| MemoryReturn::spawn(controller.clone(), quiet));
    Ok(Running {
        addr,
        controller,
        recorder,
        networks,
        stop,
        server,
        connections,
        tls,
        admin: Vec::new(),
        gauges: None,
        memory,
    })
}

/// The file-backed provider of the storage `certStorage` and the reloader, with the first
/// credentials built.
async fn load_credentials(settings: &Settings) -> Result<TlsState, StartError> {
    let required = |value: &Option<String>, key: &'static str| {
        value.clone().ok_or(StartError::MissingTls(key))
    };
    let storage = required(&settings.cert_storage, "certStorage")?;
    let ca_cert = required(&settings.ca_cert, "caCert")?;
    let cert_url = required(&settings.cert_url, "certUrl")?;
    let key_url = required(&settings.key_url, "keyUrl")?;
    let provider = FileCertProvider::builder()
        .storage(storage.clone(), cert_url, key_url)
        .spawn()
        .map(Arc::new)
        .map_err(StartError::Credentials)?;
    let builder = CredentialsBuilder::new(
        provider.clone(),
        Arc::new(FileCertLoader::new()),
        storage,
        ca_cert.clone(),
    );
    let reloader = CredentialsReloader::start(
        builder,
        ReloadSettings::default().with_retry(settings.cert_reload_retry),
    )
    .await
    .map_err(StartError::Credentials)?;
    let current = reloader.current();
    info!(cert = %current.cert.cert_url, not_after = ?current.cert.not_after, ca = %ca_cert,
        identity_binding = ?settings.identity_binding,
        "mTLS: SMs must present a client certificate from this CA");
    Ok(TlsState {
        reloader,
        _provider: provider,
    })
}

impl Running {
    /// Serves the admin API on `endpoint` (a Unix socket, mode 0660, or a loopback TCP port;
    /// never the SM listener), over this controller and the recorder's events. Returns where it
    /// serves (for TCP, with the port bound). Call it once per endpoint; they all stop with
    /// [`stop`](Self::stop).
    pub async fn serve_admin(
        &mut self,
        endpoint: &AdminEndpoint,
    ) -> Result<AdminEndpoint, admin::ServeError> {
        let mut service = AdminService::new(
            self.controller.clone(),
            Arc::new(self.recorder.clone()),
            self.recorder.events(),
        );
        if let Some(networks) = &self.networks {
            service = service.with_networks(Arc::new(NetworksView(networks.clone())));
        }
        let server = admin::serve(endpoint, service).await?;
        let bound = server.endpoint().clone();
        info!(endpoint = %bound, "admin API listening");
        self.admin.push(server);
        Ok(bound)
    }

    /// How often freed memory was given back to the OS after streams ended
    /// (`smcontroller_memory_returns_total`); 0 when `memoryReturnDelay` is off.
    pub fn memory_returns(&self) -> u64 {
        self.memory.as_ref().map_or(0, MemoryReturn::returns)
    }

    /// Where the admin API serves.
    pub fn admin_endpoints(&self) -> Vec<&AdminEndpoint> {
        self.admin.iter().map(AdminServer::endpoint).collect()
    }

    /// Stops listening, closes every SM stream (each disconnect is reported) and returns once
    /// everything has ended: about half a second at most (R-STOP-1).
    pub async fn stop(self) -> Result<(), ServeError> {
        if let Some(gauges) = &self.gauges {
            gauges.abort();
        }
        // The file provider and the reloader live until the server has stopped.
        let _tls = self.tls;
        for admin in self.admin {
            admin.stop().await;
        }
        let _ = self.stop.send(true);
        self.controller.shutdown().await;
        let mut server = self.server;
        let result = match tokio::time::timeout(SERVER_STOP_GRACE, &mut server).await {
            Ok(result) => result,
            Err(_) => {
                // Peers that keep their connections open: close them for good, so that no
                // connection task outlives the stop (R-STOP-1).
                warn!(
                    connections = self.connections.live(),
                    "connections still open after the stop grace; closing them"
                );
                self.connections.close_all();
                match tokio::time::timeout(SERVER_STOP_GRACE, &mut server).await {
                    Ok(result) => result,
                    Err(_) => {
                        server.abort();
                        Ok(Ok(()))
                    }
                }
            }
        };
        if tokio::time::timeout(SERVER_STOP_GRACE, self.connections.closed())
            .await
            .is_err()
        {
            warn!(
                connections = self.connections.live(),
                "connections still open after the stop"
            );
        }
        match result {
            Ok(result) => result,
            Err(join) => {
                warn!(error = %join, "server task failed");
                Ok(())
            }
        }
    }
}

/// How often the node gauges are refreshed.
const GAUGE_PERIOD: Duration = Duration::from_secs(1);

/// How long a gauge nobody refreshes stays in `/metrics`: a departed node's queue gauge goes
/// after this, so the series a stream of new node ids leaves behind are bounded (R-BAD-3).
const GAUGE_IDLE: Duration = Duration::from_secs(60);

impl Running {
    /// Refreshes, every second until [`stop`](Self::stop), the gauges of the router's state:
    /// `smcontroller_nodes_connected`, `smcontroller_pending_streams` and
    /// `smcontroller_inbound_queue_bytes{node}` / `smcontroller_inbound_queue_messages{node}`
    /// (read from [`Controller::node_status`], not counted on the message path).
    pub fn publish_gauges(&mut self) {
        let controller = self.controller.clone();
        self.gauges = Some(tokio::spawn(async move {
            let mut tick = tokio::time::interval(GAUGE_PERIOD);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let nodes = controller.nodes();
                metrics::gauge!("smcontroller_nodes_connected").set(nodes.len() as f64);
                metrics::gauge!("smcontroller_pending_streams")
                    .set(controller.pending_streams() as f64);
                for node in nodes {
                    if let Some(status) = controller.node_status(&node) {
                        let id = node.as_str().to_owned();
                        metrics::gauge!("smcontroller_inbound_queue_bytes", "node" => id.clone())
                            .set(status.queued_bytes as f64);
                        metrics::gauge!("smcontroller_inbound_queue_messages", "node" => id)
                            .set(status.queued_messages as f64);
                    }
                }
            }
        }));
    }
}

/// Buckets of the sync round-trip histogram, seconds: 50 µs to 10 s.
const ROUND_TRIP_BUCKETS: &[f64] = &[
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0,
];

/// Installs the Prometheus exporter as the process's metrics recorder and serves `/metrics`
/// (text format) on `addr`. Call it once, within the tokio runtime, before anything records.
/// The sync round trip is a histogram (`smcontroller_sync_round_trip_seconds_bucket`).
pub fn serve_metrics(addr: SocketAddr) -> Result<(), metrics_exporter_prometheus::BuildError> {
    use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};
    use metrics_util::MetricKindMask;
    PrometheusBuilder::new()
        .with_http_listener(addr)
        .idle_timeout(MetricKindMask::GAUGE, Some(GAUGE_IDLE))
        .set_buckets_for_metric(
            Matcher::Full("smcontroller_sync_round_trip_seconds".to_owned()),
            ROUND_TRIP_BUCKETS,
        )?
        .install()?;
    info!(%addr, "metrics served on /metrics");
    Ok(())
}

/// The network provider's allocations as the admin API shows them (`smctl networks list`).
struct NetworksView(Arc<DefaultNetworks>);

impl NetworkDirectory for NetworksView {
    fn networks(&self) -> admin_view::NetworksView {
        let snapshot = self.0.snapshot();
        admin_view::NetworksView {
            pool: snapshot.pool,
            networks: snapshot
                .networks
                .into_iter()
                .map(|n| admin_view::NetworkView {
                    network_id: n.network_id,
                    subnet: n.subnet,
                    vlan_id: n.vlan_id,
                    hosts: n
                        .hosts
                        .into_iter()
                        .map(|h| admin_view::NetworkHostView {
                            node_id: NodeId::from(h.node_id),
                            ip: h.ip,
                        })
                        .collect(),
                    instances: n
                        .instances
                        .into_iter()
                        .map(|i| admin_view::NetworkInstanceView {
                            instance: InstanceIdent {
                                item_id: i.item_id,
                                subject_id: i.subject_id,
                                instance: i.instance,
                                item_type: i.item_type.item_type(),
                                preinstalled: i.preinstalled,
                            },
                            node_id: NodeId::from(i.node_id),
                            ip: i.ip,
                        })
                        .collect(),
                })
                .collect(),
        }
    }
}
