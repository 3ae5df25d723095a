//! The controller over real mTLS on 127.0.0.1, with a PKI made by the test: who reaches
//! `RegisterSM` (R-TLS-1), renewal of the server's certificate while SMs are connected and
//! calls are in flight (R-TLS-3), and node identity binding (R-TLS-4). Renewals go the way a
//! unit's do: the server's files are replaced, the file provider notices, the reloader builds
//! the new credentials, the server restarts its streams.

mod support;

use std::{path::PathBuf, sync::Arc, time::Duration};

use smcontroller_api::{Error, NodeConfigHandler, NodeId};
use smcontroller_certs::{
    CredentialsBuilder, CredentialsReloader, FileCertLoader, FileCertProvider, IdentityField,
    ReloadSettings,
    test_util::{LeafSpec, Signer, TestCert, TestPki, Usage},
};
use smcontroller_daemon as daemon;
use smcontroller_grpc::{
    connections::Connections,
    proto::servicemanager::v5::{
        SmOutgoingMessages, sm_incoming_messages::SmIncomingMessage,
        sm_outgoing_messages::SmOutgoingMessage, sm_service_client::SmServiceClient,
    },
    server::{self, ServerSettings},
    tls::{Tls, TlsSettings, serve_tls},
};
use smcontroller_routing::{Controller, Receivers, Settings};
use smcontroller_sim::{ClientCerts, SimConfig, SimEventKind, SimTls, Simulator};
use support::{Blobs, DEADLINE, Event, EventLog, sm_info};
use tokio::{
    net::TcpStream,
    sync::{broadcast, mpsc, watch},
};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{
    Code, Streaming,
    transport::{Certificate, ClientTlsConfig, Endpoint, Identity},
};

/// A controller served over mTLS with credentials from files the test can replace.
struct TlsHarness {
    pki: TestPki,
    dir: tempfile::TempDir,
    addr: std::net::SocketAddr,
    controller: Controller,
    log: Arc<EventLog>,
    stop: watch::Sender<bool>,
    server: tokio::task::JoinHandle<()>,
    _provider: Arc<FileCertProvider>,
    reloader: CredentialsReloader,
}

impl TlsHarness {
    async fn start(identity_binding: Option<IdentityField>) -> Self {
        let pki = TestPki::new().unwrap();
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("ca.pem"), pki.ca_pem()).unwrap();
        pki.server().unwrap().write(dir.path(), "server").unwrap();
        let url = |file: &str| format!("file://{}", dir.path().join(file).display());
        let provider = Arc::new(
            FileCertProvider::builder()
                .storage("sm", url("server.pem"), url("server.key"))
                .poll_interval(Duration::from_millis(20))
                .spawn()
                .unwrap(),
        );
        let builder = CredentialsBuilder::new(
            provider.clone(),
            Arc::new(FileCertLoader::new()),
            "sm",
            url("ca.pem"),
        );
        let reloader = CredentialsReloader::start(
            builder,
            ReloadSettings::default().with_retry(Duration::from_millis(100)),
        )
        .await
        .expect("the first credentials build");

        let log = Arc::new(EventLog::default());
        let controller = Controller::new(Settings::default(), Receivers::all(log.clone()));
        let listener = server::bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, mut stopped) = watch::channel(false);
        let tls = Tls {
            credentials: reloader.subscribe(),
            settings: TlsSettings {
                identity_binding,
                ..TlsSettings::default()
            },
        };
        let server = tokio::spawn({
            let controller = controller.clone();
            async move {
                serve_tls(
                    listener,
                    controller,
                    Arc::new(Blobs),
                    ServerSettings::default(),
                    tls,
                    Connections::new(),
                    async move {
                        let _ = stopped.wait_for(|s| *s).await;
                    },
                )
                .await
                .unwrap();
            }
        });
        Self {
            pki,
            dir,
            addr,
            controller,
            log,
            stop,
            server,
            _provider: provider,
            reloader,
        }
    }

    fn path(&self, file: &str) -> PathBuf {
        self.dir.path().join(file)
    }

    /// Replaces a server file by a rename, as a renewal does.
    fn replace(&self, file: &str, contents: &str) {
        let tmp = self.path(&format!("{file}.new"));
        std::fs::write(&tmp, contents).unwrap();
        std::fs::rename(&tmp, self.path(file)).unwrap();
    }

    /// Renews the server's certificate and key; returns the new certificate.
    fn renew(&self) -> TestCert {
        let cert = self.pki.server().unwrap();
        self.replace("server.key", cert.key_pem());
        self.replace("server.pem", cert.cert_pem());
        cert
    }

    /// A client channel presenting `identity` (or no certificate).
    async fn channel(
        &self,
        identity: Option<&TestCert>,
    ) -> Result<SmServiceClient<tonic::transport::Channel>, tonic::transport::Error> {
        let mut tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(self.pki.ca_pem()))
            .domain_name("localhost");
        if let Some(cert) = identity {
            tls = tls.identity(Identity::from_pem(cert.cert_pem(), cert.key_pem()));
        }
        let channel = Endpoint::from_shared(format!("https://{}", self.addr))
            .unwrap()
            .tls_config(tls)?
            .connect()
            .await?;
        Ok(SmServiceClient::new(channel))
    }

    /// Opens `RegisterSM` presenting `identity` and sends `sm_info` for `node`.
    async fn register(
        &self,
        identity: Option<&TestCert>,
        node: &str,
    ) -> Result<TlsSm, tonic::Status> {
        let mut client = self
            .channel(identity)
            .await
            .map_err(|e| tonic::Status::unavailable(format!("{e:?}")))?;
        let (tx, rx) = mpsc::channel(16);
        tx.send(SmOutgoingMessages {
            sm_outgoing_message: Some(SmOutgoingMessage::SmInfo(sm_info(node))),
        })
        .await
        .unwrap();
        let rx = client
            .register_sm(ReceiverStream::new(rx))
            .await?
            .into_inner();
        Ok(TlsSm { tx, rx })
    }

    /// An SM presenting the certificate of `cert_node` that registers as `node`, once the
    /// controller has reported `node` connected (its first time).
    async fn registered(&self, cert_node: &str, node: &str) -> TlsSm {
        let cert = self.pki.client(cert_node).unwrap();
        let sm = self.register(Some(&cert), node).await.expect("RegisterSM");
        self.log
            .wait_until("the node connected", |e| connected(e, node) == 1)
            .await;
        sm
    }

    /// The certificate a new handshake presents.
    async fn served_certificate(&self) -> Vec<u8> {
        let client = self.pki.client("node-1").unwrap();
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.pki.ca_der()).unwrap();
        let config =
            rustls::ClientConfig::builder_with_provider(smcontroller_certs::crypto_provider())
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_root_certificates(roots)
                .with_client_auth_cert(vec![client.cert_der()], client.key_der())
                .unwrap();
        let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
        let tcp = TcpStream::connect(self.addr).await.unwrap();
        let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
        let tls = tokio::time::timeout(DEADLINE, connector.connect(name, tcp))
            .await
            .expect("handshake in time")
            .expect("handshake");
        tls.get_ref().1.peer_certificates().unwrap()[0].to_vec()
    }

    async fn stop(self) {
        let _ = self.stop.send(true);
        self.controller.shutdown().await;
        let _ = tokio::time::timeout(DEADLINE, self.server).await;
    }
}

/// An SM over mTLS.
struct TlsSm {
    tx: mpsc::Sender<SmOutgoingMessages>,
    rx: Streaming<smcontroller_grpc::proto::servicemanager::v5::SmIncomingMessages>,
}

impl TlsSm {
    /// The next command, or the stream's end status.
    async fn next(&mut self) -> Result<Option<SmIncomingMessage>, tonic::Status> {
        tokio::time::timeout(DEADLINE, self.rx.message())
            .await
            .expect("the controller answers in time")
            .map(|m| m.and_then(|m| m.sm_incoming_message))
    }

    /// Reads until the controller asks for the node config status.
    async fn status_request(&mut self) {
        while !matches!(
            self.next().await.expect("stream open"),
            Some(SmIncomingMessage::GetNodeConfigStatus(_))
        ) {}
    }

    /// Reads until the stream ends; the status it ended with.
    async fn end(&mut self) -> Option<tonic::Status> {
        loop {
            match self.next().await {
                Ok(Some(_)) => {}
                Ok(None) => return None,
                Err(status) => return Some(status),
            }
        }
    }
}

/// `get_node_config_status(node)` on its own task.
fn status_call(
    controller: &Controller,
    node: &str,
) -> tokio::task::JoinHandle<smcontroller_api::Result<smcontroller_api::NodeConfigStatus>> {
    let controller = controller.clone();
    let node = NodeId::new(node);
    tokio::spawn(async move { controller.get_node_config_status(&node).await })
}

/// How many times `node` was reported connected.
fn connected(events: &[Event], node: &str) -> usize {
    events
        .iter()
        .filter(|e| matches!(e, Event::Connected(n) if n == node))
        .count()
}

#[tokio::test]
async fn r_tls_1_a_client_with_a_certificate_of_the_unit_ca_registers() {
    let h = TlsHarness::start(None).await;
    let client = h.pki.client("node-1").unwrap();
    let mut sm = h
        .register(Some(&client), "node-1")
        .await
        .expect("RegisterSM");
    assert!(matches!(
        sm.next().await.unwrap(),
        Some(SmIncomingMessage::ConnectionStatus(_))
    ));
    h.log
        .wait_until("node-1 connected", |e| connected(e, "node-1") == 1)
        .await;
    assert_eq!(h.controller.nodes(), vec![NodeId::new("node-1")]);
    h.stop().await;
}

#[tokio::test]
async fn r_tls_1_clients_without_a_good_certificate_never_reach_register_sm() {
    let h = TlsHarness::start(None).await;
    let refused = [
        ("no certificate", None),
        (
            "expired",
            Some(h.pki.issue(&LeafSpec::client("node-1").expired()).unwrap()),
        ),
        (
            "another CA",
            Some(
                h.pki
                    .issue(&LeafSpec::client("node-1").signed_by(Signer::ForeignCa))
                    .unwrap(),
            ),
        ),
        (
            "server-only",
            Some(
                h.pki
                    .issue(&LeafSpec::client("node-1").usage(Usage::Server))
                    .unwrap(),
            ),
        ),
    ];
    for (what, identity) in &refused {
        let result = h.register(identity.as_ref(), "node-1").await;
        let status = match result {
            Err(status) => status,
            // With TLS 1.3 the client may only learn of the refusal on its first read.
            Ok(mut sm) => sm.next().await.expect_err(what),
        };
        // The client sees the TLS alert as a transport error, never a gRPC answer.
        assert!(
            matches!(status.code(), Code::Unavailable | Code::Unknown),
            "{what}: {status:?}"
        );
        assert!(
            format!("{status:?}").to_lowercase().contains("alert")
                || format!("{status:?}").contains("transport"),
            "{what}: {status:?}"
        );
    }
    // None of them became a stream of the controller: no task, no node, no event.
    assert_eq!(h.controller.live_tasks(), 0);
    assert_eq!(h.controller.node_count(), 0);
    assert!(h.log.events().is_empty());
    // And the server is fine: a good client registers.
    let _sm = h.registered("node-1", "node-1").await;
    h.stop().await;
}

#[tokio::test]
async fn r_tls_3_a_renewal_restarts_20_sms_and_new_handshakes_see_the_new_certificate() {
    const SMS: usize = 20;
    let h = Arc::new(TlsHarness::start(None).await);
    let old = h.served_certificate().await;
    let (done_tx, mut done) = mpsc::channel(SMS);
    for i in 0..SMS {
        let h = h.clone();
        let done = done_tx.clone();
        tokio::spawn(async move {
            let node = format!("node-{i}");
            let client = h.pki.client(&node).unwrap();
            // Connect, and reconnect at once when the stream ends (bounded), as a benchmark
            // client does.
            for _ in 0..5 {
                let Ok(mut sm) = h.register(Some(&client), &node).await else {
                    continue;
                };
                let end = sm.end().await;
                if end.as_ref().is_some_and(|s| s.code() == Code::Unavailable) {
                    let _ = done.send(()).await;
                    // Stay on the new stream.
                    if let Ok(mut sm) = h.register(Some(&client), &node).await {
                        let _ = sm.end().await;
                    }
                    return;
                }
            }
        });
    }
    h.log
        .wait_until("20 registered", |_| h.controller.node_count() == SMS)
        .await;

    let new = h.renew();
    for _ in 0..SMS {
        tokio::time::timeout(DEADLINE, done.recv())
            .await
            .expect("every SM's stream ends with UNAVAILABLE");
    }
    // Each node: disconnected once (Shutdown: the server restarted), then connected again.
    h.log
        .wait_until("all 20 back", |events| {
            (0..SMS).all(|i| {
                events
                    .iter()
                    .filter(|e| matches!(e, Event::Connected(n) if *n == format!("node-{i}")))
                    .count()
                    == 2
            })
        })
        .await;
    for i in 0..SMS {
        let node = format!("node-{i}");
        let disconnects: Vec<_> = h
            .log
            .of(&node)
            .into_iter()
            .filter(|e| matches!(e, Event::Disconnected(..)))
            .collect();
        assert_eq!(disconnects.len(), 1, "{node}: {disconnects:?}");
        assert!(matches!(
            disconnects[0],
            Event::Disconnected(_, smcontroller_api::DisconnectReason::Shutdown)
        ));
    }
    let served = h.served_certificate().await;
    assert_ne!(served, old);
    assert_eq!(served, new.cert_der().to_vec());
    assert_eq!(h.controller.node_count(), SMS);
    match Arc::try_unwrap(h) {
        Ok(h) => h.stop().await,
        Err(h) => h.controller.shutdown().await,
    }
}

#[tokio::test]
async fn r_tls_3_a_broken_renewal_keeps_the_old_server_and_the_retry_takes_the_fixed_files() {
    let h = TlsHarness::start(None).await;
    let old = h.served_certificate().await;
    let _sm = h.registered("node-1", "node-1").await;

    // A renewal whose key does not match its certificate.
    let new = h.pki.server().unwrap();
    let wrong_key = h.pki.server().unwrap();
    h.replace("server.key", wrong_key.key_pem());
    h.replace("server.pem", new.cert_pem());
    // The reloader tries (and retries) the broken renewal; meanwhile the old server answers
    // with the old certificate and the SM is not disturbed.
    tokio::time::timeout(DEADLINE, async {
        while h.reloader.failed_builds() < 2 {
            tokio::task::yield_now().await;
        }
    })
    .await
    .expect("the reloader tries the broken renewal, and retries");
    assert_eq!(h.served_certificate().await, old, "served a broken renewal");
    assert_eq!(connected(&h.log.events(), "node-1"), 1);
    assert_eq!(
        h.log.count(|e| matches!(e, Event::Disconnected(..))),
        0,
        "a failed renewal disturbed the SMs"
    );

    // Fixing the files lets the retry succeed.
    h.replace("server.key", new.key_pem());
    tokio::time::timeout(DEADLINE, async {
        while h.served_certificate().await != new.cert_der().to_vec() {}
    })
    .await
    .expect("the retry takes up the fixed files");
    h.stop().await;
}

#[tokio::test]
async fn r_tls_3_a_renewal_during_a_sync_call_ends_it_with_disconnected() {
    let h = TlsHarness::start(None).await;
    let mut sm = h.registered("node-1", "node-1").await;
    let call = status_call(&h.controller, "node-1");
    // The SM gets the command and never answers it.
    sm.status_request().await;
    let started = tokio::time::Instant::now();
    h.renew();
    let result = tokio::time::timeout(DEADLINE, call)
        .await
        .expect("the call ends")
        .unwrap();
    assert!(
        matches!(result, Err(Error::Disconnected { .. })),
        "{result:?}"
    );
    // Well before the 5 s response timeout: the renewal ended it, not the timeout.
    assert!(started.elapsed() < Duration::from_secs(4));
    h.stop().await;
}

#[tokio::test]
async fn r_tls_4_with_binding_a_node_id_not_in_the_certificate_is_refused_and_displaces_nothing() {
    let h = TlsHarness::start(Some(IdentityField::CommonName)).await;
    let mut real = h.registered("node-1", "node-1").await;

    // node-2's certificate claiming to be node-1.
    let node_2 = h.pki.client("node-2").unwrap();
    let mut impostor = h
        .register(Some(&node_2), "node-1")
        .await
        .expect("stream opened");
    let status = impostor.end().await.expect("refused with a status");
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    assert!(status.message().contains("node-1"), "{status:?}");
    assert!(status.message().contains("node-2"), "{status:?}");

    // The real node-1 is still the registered one, undisturbed.
    assert_eq!(h.controller.nodes(), vec![NodeId::new("node-1")]);
    assert_eq!(h.log.count(|e| matches!(e, Event::Disconnected(..))), 0);
    let call = status_call(&h.controller, "node-1");
    real.status_request().await;
    real.tx
        .send(SmOutgoingMessages {
            sm_outgoing_message: Some(SmOutgoingMessage::NodeConfigStatus(
                smcontroller_grpc::proto::servicemanager::v5::NodeConfigStatus {
                    state: "installed".into(),
                    version: "1".into(),
                    error: None,
                },
            )),
        })
        .await
        .unwrap();
    assert_eq!(call.await.unwrap().unwrap().version, "1");
    h.stop().await;
}

#[tokio::test]
async fn r_tls_4_without_binding_any_good_certificate_may_register_any_node_id() {
    let h = TlsHarness::start(None).await;
    let _sm = h.registered("node-2", "node-1").await;
    h.stop().await;
}

/// Issue 10: `grpc.health.v1` on the SM endpoint reports serving, not serving while a renewal
/// restarts the streams, and serving again on the new credentials; server reflection lets a
/// generic client (grpcurl) discover `SMService`.
#[tokio::test]
async fn health_is_not_serving_during_a_credential_restart_and_reflection_lists_the_service() {
    use tonic_health::pb::{
        HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
    };

    let h = TlsHarness::start(None).await;
    let client = h.pki.client("node-1").unwrap();
    let channel = |h: &TlsHarness| {
        let tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(h.pki.ca_pem()))
            .domain_name("localhost")
            .identity(Identity::from_pem(client.cert_pem(), client.key_pem()));
        Endpoint::from_shared(format!("https://{}", h.addr))
            .unwrap()
            .tls_config(tls)
            .unwrap()
    };
    let service = |name: &str| HealthCheckRequest {
        service: name.into(),
    };

    let mut health = HealthClient::new(channel(&h).connect().await.unwrap());
    for name in ["", "servicemanager.v5.SMService"] {
        let status = health
            .check(service(name))
            .await
            .unwrap()
            .into_inner()
            .status();
        assert_eq!(status, ServingStatus::Serving, "{name:?}");
    }

    // Reflection names the service, as `grpcurl list` asks it.
    let mut reflection =
        tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient::new(
            channel(&h).connect().await.unwrap(),
        );
    let request = tonic_reflection::pb::v1::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(
            tonic_reflection::pb::v1::server_reflection_request::MessageRequest::ListServices(
                String::new(),
            ),
        ),
    };
    let mut answers = reflection
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .unwrap()
        .into_inner();
    let answer = answers.message().await.unwrap().expect("an answer");
    let listed = format!("{answer:?}");
    assert!(listed.contains("servicemanager.v5.SMService"), "{listed}");
    assert!(listed.contains("grpc.health.v1.Health"), "{listed}");

    // Watch the SM service, then renew: the watcher hears NOT_SERVING before its connection
    // (of the old credentials) is closed.
    let mut watch = health
        .watch(service("servicemanager.v5.SMService"))
        .await
        .unwrap()
        .into_inner();
    let first = tokio::time::timeout(DEADLINE, watch.message())
        .await
        .unwrap();
    assert_eq!(first.unwrap().unwrap().status(), ServingStatus::Serving);
    h.renew();
    let next = tokio::time::timeout(DEADLINE, watch.message())
        .await
        .expect("a status change during the restart");
    assert_eq!(next.unwrap().unwrap().status(), ServingStatus::NotServing);

    // A new connection (new credentials) finds it serving again once the restart is over.
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        assert!(
            tokio::time::Instant::now() < deadline,
            "never serving again"
        );
        if let Ok(conn) = channel(&h).connect().await
            && let Ok(answer) = HealthClient::new(conn)
                .check(service("servicemanager.v5.SMService"))
                .await
            && answer.into_inner().status() == ServingStatus::Serving
        {
            break;
        }
        tokio::task::yield_now().await;
    }
    h.stop().await;
}

/// The simulator against the daemon's own mTLS server, with a PKI written as `cargo xtask
/// gen-certs` writes it: each node presents `client-<node id>.pem` and registers; nodes without
/// a client certificate are refused before `RegisterSM` and never become nodes. (It was a test
/// of the simulator while the simulator lived in this crate.)
#[tokio::test]
async fn nodes_register_over_mtls_with_their_client_certificates() {
    let dir = tempfile::tempdir().expect("temp dir");
    let pki = TestPki::new().expect("test PKI");
    pki.write_dev_pki(dir.path(), 2).expect("PKI written");
    let mut settings = daemon::config::Settings {
        listen: "127.0.0.1:0".parse().expect("addr"),
        ..daemon::config::Settings::default()
    };
    settings.use_dev_pki(dir.path()).expect("PKI dir");
    let running = daemon::app::start(
        &settings,
        daemon::receivers::Recorder::new(),
        Arc::new(daemon::app::NoBlobStore),
    )
    .await
    .expect("the controller serves mTLS");
    let url = format!("https://{}", running.addr);
    let tls = SimTls::from_pki_dir(dir.path()).expect("the CA file");

    let sim = Simulator::start(SimConfig {
        tls: Some(tls.clone()),
        reconnect_delay: Duration::from_millis(50),
        ..SimConfig::new(url.clone(), 2)
    })
    .expect("start");
    assert!(sim.wait_connected(2, DEADLINE).await, "{:?}", sim.stats());
    assert!(
        running
            .recorder
            .wait_until(DEADLINE, |s| s.connected_nodes() == 2)
            .await
    );
    let mut nodes = running.controller.nodes();
    nodes.sort();
    assert_eq!(nodes, [NodeId::new("node-1"), NodeId::new("node-2")]);
    sim.stop().await;

    let (sim, mut events) = Simulator::start_with_events(SimConfig {
        tls: Some(SimTls {
            client_certs: ClientCerts::None,
            ..tls
        }),
        node_prefix: "anonymous".to_owned(),
        reconnect_delay: Duration::from_millis(50),
        ..SimConfig::new(url, 1)
    })
    .expect("start");
    let failed = tokio::time::timeout(DEADLINE, async {
        loop {
            match events.recv().await {
                Ok(e) if matches!(e.kind, SimEventKind::ConnectFailed { .. }) => break e,
                Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {}
                Err(broadcast::error::RecvError::Closed) => panic!("events closed"),
            }
        }
    })
    .await
    .expect("the anonymous node's connection fails in time");
    assert_eq!(&*failed.node_id, "anonymous-1");
    let stats = sim.finish().await;
    assert_eq!(stats.registered(), 0, "{stats}");
    assert_eq!(stats.total.connects, 0, "{stats}");
    assert!(
        !running
            .controller
            .nodes()
            .contains(&NodeId::new("anonymous-1")),
        "a node without a client certificate never registers"
    );
    running.stop().await.expect("stops");
}
