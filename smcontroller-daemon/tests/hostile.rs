//! Hostile peers (R-BAD-1, R-BAD-2, R-BAD-3, issue 9): each budget reached through a real
//! socket on 127.0.0.1 by an attacker written here, with five well-behaved SMs connected
//! first. Every test checks that the attacker got the documented status (or its connection was
//! closed), that the budget's refusal counter moved, that the five SMs are still registered and
//! answer a sync call, and that a new SM can register.
//!
//! The settings are lowered (few nodes, few streams, short timeouts) so that every attack loop
//! is small; each loop is bounded in count and in time.

mod hostile_support;
mod support;

use std::{
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use async_trait::async_trait;
use bytes::Bytes;
use hostile_support::{
    CANCEL, END_HEADERS, GET_BLOBS_INFOS, GOOD, Hostile, PING, REFUSED_STREAM, REGISTER_SM,
    RST_STREAM, RawH2, SETTINGS, SETTINGS_MAX_CONCURRENT_STREAMS, bomb_under, closed_within,
    end_status, eventually, frame, good, grpc_frame, grpc_headers, grpc_request, h2_client,
    len_field, open_stream, outgoing, settled, within,
};
use prost::Message as _;
use smcontroller_api::{
    EnvVarInfo, Error, InstanceIdent, InstanceInfo, InstanceRunner, ItemInfoProvider,
    NodeConfigHandler, NodeId,
};
use smcontroller_certs::{
    AcceptSettings, CredentialsBuilder, CredentialsReloader, FileCertLoader, FileCertProvider,
    ReloadSettings, test_util::TestPki,
};
use smcontroller_grpc::{
    connections::Connections,
    proto::servicemanager::v5::{
        self as pb, BlobsInfos, BlobsInfosRequest, sm_outgoing_messages::SmOutgoingMessage,
        sm_service_client::SmServiceClient,
    },
    server::{self, ServerSettings},
    tls::{Tls, TlsSettings, serve_tls},
};
use smcontroller_limits::Budget;
use smcontroller_routing::Settings;
use smcontroller_sim::messages;
use support::{Blobs, DEADLINE, Event, raw_stream};
use tokio::{io::AsyncWriteExt, net::TcpStream, sync::watch};
use tonic::Code;

const MIB: usize = 1024 * 1024;

fn counted(h: &Hostile, budget: Budget) -> u64 {
    h.controller.refusals().get(budget)
}

/// An `instant_monitoring` of about `bytes` on the wire: partitions with names of 200 bytes
/// (under the id and name limits), so that its decoded size is close to its wire size.
fn big_monitoring(bytes: usize) -> SmOutgoingMessage {
    let partitions = (0..bytes / 210)
        .map(|i| pb::PartitionUsage {
            name: format!("{i:0>200}"),
            used_size: i as u64,
        })
        .collect();
    SmOutgoingMessage::InstantMonitoring(pb::InstantMonitoring {
        node_monitoring: Some(pb::MonitoringData {
            timestamp: Some(messages::now()),
            ram: 1,
            cpu: 1,
            partitions,
            download: 0,
            upload: 0,
        }),
        instances_monitoring: vec![],
    })
}

// ---------------------------------------------------------------------------------------------
// Handshake and preface deadlines (R-BAD-3)
// ---------------------------------------------------------------------------------------------

/// Plain HTTP/2: a connection that never sends the client preface, or only half of it, is
/// closed once the handshake timeout has passed (issue 9, item 2).
#[tokio::test]
async fn r_bad_3_a_connection_without_the_http2_preface_is_closed_after_the_handshake_timeout() {
    let timeout = Duration::from_millis(500);
    let h = Hostile::start(
        Settings::default(),
        ServerSettings {
            accept: AcceptSettings::default().with_handshake_timeout(timeout),
            ..ServerSettings::default()
        },
    )
    .await;
    let before = counted(&h, Budget::Handshake);
    let started = Instant::now();
    let mut silent = TcpStream::connect(h.addr).await.unwrap();
    let mut half = TcpStream::connect(h.addr).await.unwrap();
    half.write_all(&hostile_support::PREFACE[..10])
        .await
        .unwrap();

    assert!(
        closed_within(&mut silent, DEADLINE).await,
        "a connection that sent nothing was left open"
    );
    assert!(
        closed_within(&mut half, DEADLINE).await,
        "a connection that sent half a preface was left open"
    );
    let took = started.elapsed();
    assert!(took >= timeout / 2, "closed before the timeout: {took:?}");
    assert!(
        took < timeout + Duration::from_secs(3),
        "closed late: {took:?}"
    );
    eventually("two handshake refusals counted", DEADLINE, || {
        counted(&h, Budget::Handshake) >= before + 2
    })
    .await;
    h.healthy("after the silent connections").await;
    h.stop().await;
}

/// mTLS: a connection that never starts its TLS handshake, and one that finishes it but never
/// sends the HTTP/2 preface, are both closed within the handshake timeout.
#[tokio::test]
async fn r_bad_3_over_mtls_handshake_and_preface_have_one_deadline() {
    let pki = TestPki::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("ca.pem"), pki.ca_pem()).unwrap();
    pki.server().unwrap().write(dir.path(), "server").unwrap();
    let url = |file: &str| format!("file://{}", dir.path().join(file).display());
    let provider = Arc::new(
        FileCertProvider::builder()
            .storage("sm", url("server.pem"), url("server.key"))
            .spawn()
            .unwrap(),
    );
    let reloader = CredentialsReloader::start(
        CredentialsBuilder::new(
            provider.clone(),
            Arc::new(FileCertLoader::new()),
            "sm",
            url("ca.pem"),
        ),
        ReloadSettings::default(),
    )
    .await
    .unwrap();
    let timeout = Duration::from_millis(500);
    let log = Arc::new(support::EventLog::default());
    let controller = smcontroller_routing::Controller::new(
        Settings::default(),
        smcontroller_routing::Receivers::all(log.clone()),
    );
    let listener = server::bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, mut stopped) = watch::channel(false);
    let tls_settings = TlsSettings::default();
    let server = tokio::spawn({
        let controller = controller.clone();
        let credentials = reloader.subscribe();
        async move {
            serve_tls(
                listener,
                controller,
                Arc::new(Blobs),
                ServerSettings {
                    accept: AcceptSettings::default().with_handshake_timeout(timeout),
                    ..ServerSettings::default()
                },
                Tls {
                    credentials,
                    settings: tls_settings,
                },
                Connections::new(),
                async move {
                    let _ = stopped.wait_for(|s| *s).await;
                },
            )
            .await
            .unwrap();
        }
    });
    let before = controller.refusals().get(Budget::Handshake);

    // No ClientHello at all.
    let mut silent = TcpStream::connect(addr).await.unwrap();
    assert!(
        closed_within(&mut silent, DEADLINE).await,
        "a connection without a TLS handshake was left open"
    );

    // A full mTLS handshake with a valid client certificate, then silence: no HTTP/2 preface.
    let client = pki.client("node-1").unwrap();
    let mut roots = rustls::RootCertStore::empty();
    roots.add(pki.ca_der()).unwrap();
    let mut config =
        rustls::ClientConfig::builder_with_provider(smcontroller_certs::crypto_provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_client_auth_cert(vec![client.cert_der()], client.key_der())
            .unwrap();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = TcpStream::connect(addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let started = Instant::now();
    let mut tls = within("the TLS handshake", connector.connect(name, tcp))
        .await
        .expect("the handshake succeeds");
    let closed = within("the TLS connection without preface closing", async {
        let mut buf = [0_u8; 1024];
        loop {
            match tokio::io::AsyncReadExt::read(&mut tls, &mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {} // the server's SETTINGS
            }
        }
    });
    closed.await;
    let took = started.elapsed();
    assert!(
        took < timeout + Duration::from_secs(3),
        "a TLS connection without preface was closed only after {took:?}"
    );
    eventually("handshake refusals counted", DEADLINE, || {
        controller.refusals().get(Budget::Handshake) >= before + 2
    })
    .await;

    let _ = stop.send(true);
    controller.shutdown().await;
    let _ = tokio::time::timeout(DEADLINE, server).await;
}

// ---------------------------------------------------------------------------------------------
// Connections and streams (R-BAD-2, R-BAD-3)
// ---------------------------------------------------------------------------------------------

/// Connections beyond `max_connections` are accepted and closed at once; the SMs connected
/// before keep working, and once the attacker lets go a new SM connects.
#[tokio::test]
async fn r_bad_3_connections_beyond_the_cap_are_closed_at_once() {
    let cap = 12;
    let h = Hostile::start(
        Settings::default(),
        ServerSettings {
            accept: AcceptSettings::default()
                .with_max_connections(cap)
                .with_handshake_timeout(Duration::from_secs(60)),
            ..ServerSettings::default()
        },
    )
    .await;
    let before = counted(&h, Budget::Connections);
    let mut attackers = Vec::new();
    for _ in 0..cap + 8 {
        attackers.push(TcpStream::connect(h.addr).await.unwrap());
    }
    let mut closed = 0;
    for tcp in &mut attackers {
        if closed_within(tcp, Duration::from_millis(300)).await {
            closed += 1;
        }
    }
    // GOOD connections are the SMs'; the cap leaves `cap - GOOD` for the attacker.
    assert!(
        closed >= 8,
        "{closed} of {} attacker connections closed; the cap is {cap} with {GOOD} SMs",
        cap + 8
    );
    assert!(
        counted(&h, Budget::Connections) >= before + 8,
        "refusals: {:?}",
        h.controller.refusals()
    );
    h.good_ones_answer("with the connections at the cap").await;
    drop(attackers);
    eventually("the attacker's connections gone", DEADLINE, || {
        h.connections.live() <= GOOD
    })
    .await;
    h.healthy("after the connection flood").await;
    h.stop().await;
}

/// The server advertises SETTINGS_MAX_CONCURRENT_STREAMS, and streams beyond it on one
/// connection are refused (issue 9, item 3: 30,000 streams on 10 connections were accepted).
#[tokio::test]
async fn r_bad_3_streams_per_connection_are_advertised_and_enforced() {
    let limit = 8_u32;
    let h = Hostile::start(
        Settings::default(),
        ServerSettings {
            max_streams_per_connection: limit,
            ..ServerSettings::default()
        },
    )
    .await;
    let mut raw = RawH2::connect(h.addr).await;
    let settings = raw.ack_settings().await;
    let advertised = settings
        .iter()
        .find(|(id, _)| *id == SETTINGS_MAX_CONCURRENT_STREAMS)
        .map(|(_, v)| *v);
    assert_eq!(
        advertised,
        Some(limit),
        "the server's SETTINGS: {settings:?}"
    );
    // Twice the limit of RegisterSM streams that never send anything.
    let headers = grpc_headers(REGISTER_SM);
    let mut burst = Vec::new();
    for i in 0..2 * limit {
        burst.extend(frame(
            hostile_support::HEADERS,
            END_HEADERS,
            2 * i + 1,
            &headers,
        ));
    }
    raw.send(&burst).await.unwrap();
    let seen = raw
        .wait("the extra streams refused", |s| {
            s.resets
                .iter()
                .filter(|(_, code)| *code == REFUSED_STREAM)
                .count()
                >= limit as usize
                || !s.goaways.is_empty()
                || s.closed
        })
        .await;
    let refused = seen
        .resets
        .iter()
        .filter(|(_, code)| *code == REFUSED_STREAM)
        .count();
    assert!(
        refused >= limit as usize || !seen.goaways.is_empty(),
        "streams beyond the limit were not refused: {seen:?}"
    );
    assert!(
        seen.headers.len() <= limit as usize,
        "more streams answered than the limit: {seen:?}"
    );
    h.good_ones_answer("with one connection's streams at the limit")
        .await;
    drop(raw);
    h.healthy("after the stream flood").await;
    h.stop().await;
}

/// RegisterSM streams that do not send `sm_info` are capped by `max_pending_streams`: one more
/// is refused with RESOURCE_EXHAUSTED (issue 9, item 5).
#[tokio::test]
async fn r_bad_2_streams_not_yet_registered_are_capped() {
    let cap = 6;
    let h = Hostile::start(
        Settings {
            max_pending_streams: cap,
            ..Settings::default()
        },
        ServerSettings::default(),
    )
    .await;
    let before = counted(&h, Budget::PendingStreams);
    let baseline_tasks = h.controller.live_tasks();
    let mut client = SmServiceClient::connect(h.url()).await.unwrap();
    let mut held = Vec::new();
    for _ in 0..cap + 4 {
        let (tx, rx) = tokio::sync::mpsc::channel::<pb::SmOutgoingMessages>(1);
        let call = client.register_sm(tokio_stream::wrappers::ReceiverStream::new(rx));
        let response = within("RegisterSM answered", call)
            .await
            .expect("a new stream takes the place of the oldest waiting one");
        held.push((tx, response.into_inner()));
    }
    // The four oldest streams gave their places to the newer ones: RESOURCE_EXHAUSTED.
    for (_, stream) in held.iter_mut().take(4) {
        let status = within("the oldest waiting streams end", async {
            loop {
                match stream.message().await {
                    Ok(Some(_)) => {}
                    Ok(None) => panic!("ended without a status"),
                    Err(status) => return status,
                }
            }
        })
        .await;
        assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
        assert!(status.message().contains("maxPendingStreams"), "{status:?}");
    }
    assert!(counted(&h, Budget::PendingStreams) >= before + 4);
    assert!(h.controller.pending_streams() <= cap);
    // At the cap, a new SM still registers (it takes the oldest waiting one's place).
    h.good_ones_answer("with the pending streams at the cap")
        .await;
    h.healthy("with the pending streams at the cap").await;
    drop(held);
    eventually("the pending streams gone", DEADLINE, || {
        h.controller.live_tasks() <= baseline_tasks
    })
    .await;
    h.healthy("after the pending-stream flood").await;
    h.stop().await;
}

/// `sm_info` for a new node id beyond `max_nodes` ends that stream with RESOURCE_EXHAUSTED; the
/// nodes already registered stay (issue 9, item 5).
#[tokio::test]
async fn r_bad_2_registered_nodes_are_capped() {
    let cap = GOOD + 3;
    let h = Hostile::start(
        Settings {
            max_nodes: cap,
            ..Settings::default()
        },
        ServerSettings::default(),
    )
    .await;
    let before = counted(&h, Budget::Nodes);
    let mut registered = Vec::new();
    let mut refused = Vec::new();
    for i in 0..6 {
        let id = format!("evil-{i}");
        let (tx, mut rx) = open_stream(&h.url()).await.expect("RegisterSM accepted");
        tx.send(messages::sm_info(&id)).await.unwrap();
        let node = NodeId::new(&id);
        let outcome = within(&format!("{id} registered or refused"), async {
            loop {
                if h.controller.node_status(&node).is_some() {
                    return None;
                }
                tokio::select! {
                    item = rx.message() => match item {
                        Ok(Some(_)) => {}
                        Ok(None) => panic!("{id}: stream ended without a status"),
                        Err(status) => return Some(status),
                    },
                    () = tokio::time::sleep(Duration::from_millis(5)) => {}
                }
            }
        })
        .await;
        match outcome {
            None => registered.push((tx, rx)),
            Some(status) => refused.push(status),
        }
    }
    assert_eq!(registered.len(), 3, "refused: {refused:?}");
    assert_eq!(refused.len(), 3);
    for status in &refused {
        assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    }
    assert_eq!(h.controller.node_count(), cap);
    assert!(counted(&h, Budget::Nodes) >= before + 3);
    h.good_ones_answer("with the nodes at the cap").await;
    drop(registered);
    eventually("the attacker's nodes gone", DEADLINE, || {
        h.controller.node_count() == GOOD
    })
    .await;
    h.healthy("after the node flood").await;
    h.stop().await;
}

// ---------------------------------------------------------------------------------------------
// What one message may carry (R-BAD-1, R-BAD-2, R-BAD-3)
// ---------------------------------------------------------------------------------------------

/// A 1 MiB node id is refused with INVALID_ARGUMENT naming `sm_info.node_id`, in a short
/// status; so is a runtime id over the limit (issue 9, item 4).
#[tokio::test]
async fn r_bad_3_an_overlong_node_id_is_refused_naming_the_field() {
    let h = Hostile::start(Settings::default(), ServerSettings::default()).await;
    let before = counted(&h, Budget::IdLength);

    let (tx, mut rx) = open_stream(&h.url()).await.unwrap();
    tx.send(messages::sm_info(&"n".repeat(MIB))).await.unwrap();
    let status = end_status(&mut rx).await;
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(
        status.message().contains("sm_info.node_id"),
        "the status names the field: {:?}",
        status.message()
    );
    assert!(
        status.message().len() < 512,
        "the status carries the id: {} bytes",
        status.message().len()
    );

    let mut info = messages::sm_info("long-runtime");
    if let Some(SmOutgoingMessage::SmInfo(sm)) = &mut info.sm_outgoing_message {
        sm.runtimes[0].runtime_id = "r".repeat(300);
    }
    let (tx, mut rx) = open_stream(&h.url()).await.unwrap();
    tx.send(info).await.unwrap();
    let status = end_status(&mut rx).await;
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(
        status.message().contains("runtime_id"),
        "the status names the field: {:?}",
        status.message()
    );
    assert!(counted(&h, Budget::IdLength) >= before + 2);
    assert_eq!(h.controller.node_count(), GOOD);
    h.healthy("after the overlong ids").await;
    h.stop().await;
}

/// A string field with invalid UTF-8 ends the stream with INVALID_ARGUMENT naming the field,
/// not INTERNAL (issue 9, item 6).
#[tokio::test]
async fn r_bad_1_invalid_utf8_is_invalid_argument_naming_the_field() {
    let h = Hostile::start(Settings::default(), ServerSettings::default()).await;
    // SMOutgoingMessages { sm_info { node_id: [0xff, 0xfe] } }
    let body = len_field(1, &len_field(1, &[0xff, 0xfe]));
    let (mut rx, _tx) = raw_stream(&h.url(), vec![body]).await;
    let status = end_status(&mut rx).await;
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(
        status.message().contains("node_id"),
        "the status names the field: {:?}",
        status.message()
    );
    h.healthy("after invalid UTF-8").await;
    h.stop().await;
}

/// A message just under the size limit made of empty repeated elements (two bytes each on the
/// wire, a whole `InstanceStatus` each decoded) is refused with RESOURCE_EXHAUSTED before it is
/// decoded (issue 9, item 5: ~100x inflation).
#[tokio::test]
async fn r_bad_2_a_decoded_size_bomb_is_refused_before_decoding() {
    let settings = ServerSettings::default();
    let limit = settings.max_message_size;
    let h = Hostile::start(Settings::default(), settings).await;
    let before = counted(&h, Budget::DecodedSize);
    let register = messages::sm_info("bomber").encode_to_vec();
    let bomb = bomb_under(limit);
    assert!(bomb.len() < limit && bomb.len() > limit - 64);
    let (mut rx, _tx) = raw_stream(&h.url(), vec![register, bomb]).await;
    let status = end_status(&mut rx).await;
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(counted(&h, Budget::DecodedSize) > before);
    assert_eq!(counted(&h, Budget::MessageSize), 0);
    h.healthy("after the decoded-size bomb").await;
    h.stop().await;
}

/// A message over `max_message_size` (default 4 MiB, R-BAD-1) ends its stream with
/// RESOURCE_EXHAUSTED.
#[tokio::test]
async fn r_bad_1_a_message_over_the_default_4_mib_limit_is_resource_exhausted() {
    let settings = ServerSettings::default();
    assert_eq!(settings.max_message_size, 4 * MIB, "R-BAD-1's default");
    let h = Hostile::start(Settings::default(), settings).await;
    let before = counted(&h, Budget::MessageSize);
    let (tx, mut rx) = open_stream(&h.url()).await.unwrap();
    tx.send(messages::sm_info("big-sender")).await.unwrap();
    tx.send(outgoing(big_monitoring(5 * MIB))).await.unwrap();
    let status = end_status(&mut rx).await;
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(counted(&h, Budget::MessageSize) > before);
    h.healthy("after an over-size message").await;
    h.stop().await;
}

/// A command whose encoding is over the message size limit fails its call with
/// InvalidArgument; the node stays registered on the same stream and answers the next call
/// (R-BAD-2).
#[tokio::test]
async fn r_bad_2_a_command_too_large_fails_its_call_and_the_stream_goes_on() {
    let h = Hostile::start(Settings::default(), ServerSettings::default()).await;
    let before = counted(&h, Budget::CommandSize);
    let node = good(0);
    let session = h.controller.node_status(&node).unwrap().session;
    let env_vars = (0..60_000)
        .map(|i| EnvVarInfo {
            name: format!("VAR_{i:0>40}"),
            value: format!("{i:0>40}"),
        })
        .collect();
    let instance = InstanceInfo {
        ident: InstanceIdent {
            item_id: "item".into(),
            subject_id: "subject".into(),
            instance: 0,
            ..InstanceIdent::default()
        },
        version: "1.0.0".into(),
        manifest_digest: "sha256:0".into(),
        runtime_id: "runc".into(),
        env_vars,
        ..InstanceInfo::default()
    };
    let result = within(
        "the oversized call failing",
        h.controller
            .update_instances(&node, &[], &[instance.into()]),
    )
    .await;
    match result {
        Err(Error::InvalidArgument(message)) => assert!(
            message.contains("bytes"),
            "the error names the size: {message}"
        ),
        other => panic!("an oversized command: {other:?}"),
    }
    assert!(counted(&h, Budget::CommandSize) > before);
    let status = within("the next call", h.controller.get_node_config_status(&node)).await;
    assert!(status.is_ok(), "{status:?}");
    assert_eq!(
        h.controller.node_status(&node).map(|s| s.session),
        Some(session),
        "the node's stream was replaced"
    );
    h.healthy("after an oversized command").await;
    h.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Queues and flow control (R-BAD-2)
// ---------------------------------------------------------------------------------------------

/// A node whose receivers are blocked fills its inbound queue by bytes, not by message count:
/// 20 messages of 60 KB against a budget of 128 KiB pause the stream (counted in
/// `node_status().stalls` and counter InboundQueue); nothing is dropped once the receivers go
/// on; the other SMs are not held up meanwhile.
#[tokio::test]
async fn r_bad_2_the_inbound_queue_is_bounded_in_bytes() {
    let h = Hostile::start(
        Settings {
            inbound_queue_bytes: 128 * 1024,
            ..Settings::default()
        },
        ServerSettings::default(),
    )
    .await;
    let before = counted(&h, Budget::InboundQueue);
    let id = "heavy";
    h.log.block(id);
    let (tx, _rx) = open_stream(&h.url()).await.unwrap();
    tx.send(messages::sm_info(id)).await.unwrap();
    let node = NodeId::new(id);
    eventually("heavy registered", DEADLINE, || {
        h.controller.node_status(&node).is_some()
    })
    .await;
    let sender = tokio::spawn(async move {
        for _ in 0..20 {
            if tx.send(outgoing(big_monitoring(60_000))).await.is_err() {
                break;
            }
        }
        tx
    });
    eventually(
        "heavy's stream paused by its queue's bytes",
        DEADLINE,
        || {
            h.controller
                .node_status(&node)
                .is_some_and(|s| s.stalls >= 1)
        },
    )
    .await;
    assert!(counted(&h, Budget::InboundQueue) > before);
    h.good_ones_answer("while one node is paused").await;
    h.log.unblock(id);
    let _tx = within("the sender done", sender).await.unwrap();
    let is_heavy = |e: &Event| matches!(e, Event::Monitoring(n, _) if n == id);
    within(
        "every message of the paused node delivered",
        h.log.wait_count("heavy's monitoring", 20, is_heavy),
    )
    .await;
    h.healthy("after the paused node").await;
    h.stop().await;
}

/// One SM connection with a paused `RegisterSM` (its receivers blocked, its stream window
/// used up) still gets `GetBlobsInfos` answered on the same connection: the connection window
/// is larger than a stream's (issue 9, item 5).
#[tokio::test]
async fn r_bad_2_a_paused_stream_does_not_stall_get_blobs_infos_on_its_connection() {
    let h = Hostile::start(
        Settings {
            inbound_queue_bytes: 64 * 1024,
            ..Settings::default()
        },
        ServerSettings::default(),
    )
    .await;
    let id = "paused";
    h.log.block(id);
    let (client, written) = h2_client(h.addr, 1 << 20).await;
    let mut client = within("h2 ready", client.ready()).await.unwrap();
    let (response, mut register) = client
        .send_request(grpc_request(REGISTER_SM), false)
        .unwrap();
    register
        .send_data(
            Bytes::from(grpc_frame(&messages::sm_info(id).encode_to_vec())),
            false,
        )
        .unwrap();
    let _response = within("RegisterSM headers", response).await.unwrap();
    let node = NodeId::new(id);
    eventually("paused registered", DEADLINE, || {
        h.controller.node_status(&node).is_some()
    })
    .await;
    // 2 MiB of monitoring: far more than the queue, the stream window and the connection
    // window of the old settings (256 KiB each) together. h2 buffers it and sends what flow
    // control allows.
    let message = grpc_frame(&outgoing(big_monitoring(60_000)).encode_to_vec());
    for _ in 0..(2 * MIB / message.len()) {
        register
            .send_data(Bytes::from(message.clone()), false)
            .unwrap();
    }
    eventually("the paused stream stalled", DEADLINE, || {
        h.controller.node_status(&node).is_some_and(|s| s.stalled)
    })
    .await;
    let sent = settled(&written, Duration::from_millis(300)).await;
    assert!(
        sent < 2 * MIB as u64,
        "flow control never stopped the paused stream ({sent} bytes sent)"
    );

    let mut client = within("h2 ready for a second stream", client.ready())
        .await
        .unwrap();
    let (response, mut blobs) = client
        .send_request(grpc_request(GET_BLOBS_INFOS), false)
        .unwrap();
    let request = BlobsInfosRequest {
        digests: vec!["sha256:aa".into()],
    };
    blobs
        .send_data(Bytes::from(grpc_frame(&request.encode_to_vec())), true)
        .unwrap();
    let answer = tokio::time::timeout(Duration::from_secs(5), async {
        let response = response.await.expect("GetBlobsInfos headers");
        let mut body = response.into_body();
        let mut bytes = Vec::new();
        while let Some(chunk) = body.data().await {
            let chunk = chunk.expect("GetBlobsInfos body");
            let _ = body.flow_control().release_capacity(chunk.len());
            bytes.extend_from_slice(&chunk);
        }
        let trailers = body.trailers().await.expect("trailers");
        (bytes, trailers)
    })
    .await
    .expect("GetBlobsInfos stalled behind the paused RegisterSM on the same connection");
    let (bytes, trailers) = answer;
    let status = trailers
        .as_ref()
        .and_then(|t| t.get("grpc-status"))
        .map(|v| v.to_str().unwrap().to_owned());
    assert_eq!(status.as_deref(), Some("0"), "trailers {trailers:?}");
    let infos = BlobsInfos::decode(&bytes[5..]).unwrap();
    assert_eq!(
        infos.urls,
        vec!["https://blobs.example/sha256:aa".to_owned()]
    );

    h.log.unblock(id);
    h.healthy("after the paused connection").await;
    drop(register);
    h.stop().await;
}

/// Blob URLs that take a while, with the most looked up at once recorded.
#[derive(Default)]
struct SlowBlobs {
    now: AtomicUsize,
    max: AtomicUsize,
}

#[async_trait]
impl ItemInfoProvider for SlowBlobs {
    async fn get_blob_url(&self, digest: &str) -> smcontroller_api::Result<String> {
        let now = self.now.fetch_add(1, Ordering::SeqCst) + 1;
        self.max.fetch_max(now, Ordering::SeqCst);
        // The provider's own latency (a store look-up), not a synchronisation.
        tokio::time::sleep(Duration::from_millis(10)).await;
        self.now.fetch_sub(1, Ordering::SeqCst);
        Ok(format!("https://blobs.example/{digest}"))
    }
}

/// `GetBlobsInfos` resolves at most `blob_lookups` digests at once, and answers in order.
#[tokio::test]
async fn r_bad_2_blob_lookups_of_one_call_are_bounded() {
    let lookups = 4;
    let blobs = Arc::new(SlowBlobs::default());
    let h = Hostile::start_with(
        Settings::default(),
        ServerSettings {
            blob_lookups: lookups,
            ..ServerSettings::default()
        },
        blobs.clone(),
    )
    .await;
    let digests: Vec<String> = (0..64).map(|i| format!("sha256:{i:04}")).collect();
    let mut client = SmServiceClient::connect(h.url()).await.unwrap();
    let urls = within(
        "GetBlobsInfos of 64 digests",
        client.get_blobs_infos(BlobsInfosRequest {
            digests: digests.clone(),
        }),
    )
    .await
    .unwrap()
    .into_inner()
    .urls;
    let want: Vec<String> = digests
        .iter()
        .map(|d| format!("https://blobs.example/{d}"))
        .collect();
    assert_eq!(urls, want);
    let max = blobs.max.load(Ordering::SeqCst);
    assert!(max <= lookups, "{max} look-ups at once, over {lookups}");
    assert!(max >= 2, "look-ups ran one at a time ({max})");
    h.healthy("after a large GetBlobsInfos").await;
    h.stop().await;
}

// ---------------------------------------------------------------------------------------------
// HTTP/2 control frames (R-BAD-3)
// ---------------------------------------------------------------------------------------------

/// Sends `one` over and over (bounded: 20,000 frames or 5 s) until the server ends the
/// connection; whether it did.
async fn flood(raw: &mut RawH2, one: &[u8]) -> bool {
    let batch: Vec<u8> = one.repeat(100);
    let started = Instant::now();
    for _ in 0..200 {
        if started.elapsed() > Duration::from_secs(5) || raw.ended_within(Duration::ZERO).await {
            break;
        }
        if raw.send(&batch).await.is_err() {
            break;
        }
        tokio::task::yield_now().await;
    }
    raw.ended_within(DEADLINE).await
}

/// A PING flood ends that connection (GOAWAY or close), counted as ControlFrames; the SMs are
/// not disturbed (issue 9, item 6).
#[tokio::test]
async fn r_bad_3_a_ping_flood_ends_the_connection() {
    let h = Hostile::start(
        Settings::default(),
        ServerSettings {
            control_frames_per_sec: 100,
            ..ServerSettings::default()
        },
    )
    .await;
    let before = counted(&h, Budget::ControlFrames);
    let mut raw = RawH2::connect(h.addr).await;
    raw.ack_settings().await;
    let ended = flood(&mut raw, &frame(PING, 0, 0, &[7; 8])).await;
    assert!(ended, "20,000 PINGs were accepted: {:?}", raw.snapshot());
    assert!(counted(&h, Budget::ControlFrames) > before);
    h.healthy("after a PING flood").await;
    h.stop().await;
}

/// A SETTINGS flood ends that connection, counted as ControlFrames.
#[tokio::test]
async fn r_bad_3_a_settings_flood_ends_the_connection() {
    let h = Hostile::start(
        Settings::default(),
        ServerSettings {
            control_frames_per_sec: 100,
            ..ServerSettings::default()
        },
    )
    .await;
    let before = counted(&h, Budget::ControlFrames);
    let mut raw = RawH2::connect(h.addr).await;
    raw.ack_settings().await;
    let ended = flood(&mut raw, &frame(SETTINGS, 0, 0, &[])).await;
    assert!(ended, "20,000 SETTINGS were accepted: {:?}", raw.snapshot());
    assert!(counted(&h, Budget::ControlFrames) > before);
    h.healthy("after a SETTINGS flood").await;
    h.stop().await;
}

/// Rapid reset: 2,000 RegisterSM streams opened and cancelled at once on one connection leave
/// no session behind, whether the server ends the connection or not.
#[tokio::test]
async fn r_bad_3_rapid_reset_leaves_nothing_behind() {
    let h = Hostile::start(Settings::default(), ServerSettings::default()).await;
    let baseline_tasks = h.controller.live_tasks();
    let mut raw = RawH2::connect(h.addr).await;
    raw.ack_settings().await;
    let headers = grpc_headers(REGISTER_SM);
    let started = Instant::now();
    for chunk in 0..20_u32 {
        if raw.ended_within(Duration::ZERO).await || started.elapsed() > Duration::from_secs(5) {
            break;
        }
        let mut burst = Vec::new();
        for i in 0..100 {
            let stream = 2 * (chunk * 100 + i) + 1;
            burst.extend(frame(
                hostile_support::HEADERS,
                END_HEADERS,
                stream,
                &headers,
            ));
            burst.extend(frame(RST_STREAM, 0, stream, &CANCEL.to_be_bytes()));
        }
        if raw.send(&burst).await.is_err() {
            break;
        }
    }
    eventually("the cancelled streams' sessions gone", DEADLINE, || {
        h.controller.live_tasks() <= baseline_tasks
    })
    .await;
    h.healthy("after a rapid-reset flood").await;
    drop(raw);
    h.stop().await;
}

/// The five SMs behind a controller whose connections may have `budget` messages refused.
async fn with_refusal_budget(budget: u32) -> Hostile {
    let server = ServerSettings {
        max_refused_messages: budget,
        ..ServerSettings::default()
    };
    Hostile::start(Settings::default(), server).await
}

/// A client channel: one HTTP/2 connection that every call through it shares.
async fn one_connection(h: &Hostile) -> tonic::transport::Channel {
    tonic::transport::Endpoint::from_shared(h.url())
        .unwrap()
        .connect()
        .await
        .unwrap()
}

/// N-BAD-1: a registered SM that keeps sending refused messages (empty ones here) is refused
/// each time, the stream going on, until its connection has used the budget: then its stream
/// ends with RESOURCE_EXHAUSTED naming the budget, the refusal is counted once, the node is gone
/// and the well-behaved SMs never noticed.
#[tokio::test]
async fn n_bad_1_a_connection_that_keeps_sending_refused_messages_is_closed() {
    const BUDGET: u32 = 4;
    let h = with_refusal_budget(BUDGET).await;
    let noisy = NodeId::new("noisy");
    let (tx, mut rx) = open_stream(&h.url()).await.unwrap();
    tx.send(messages::sm_info("noisy")).await.unwrap();
    eventually("noisy registered", DEADLINE, || {
        h.controller.node_status(&noisy).is_some()
    })
    .await;
    for _ in 1..BUDGET {
        tx.send(pb::SmOutgoingMessages::default()).await.unwrap();
    }
    // One under the budget: every refusal logged and skipped, the stream goes on (an alert
    // sent after them reaches the receiver, so every message before it was read).
    tx.send(messages::alert(
        0,
        &messages::instance_ident(0),
        false,
        true,
    ))
    .await
    .unwrap();
    h.log
        .wait_until("noisy's alert after the refusals", |events| {
            events
                .iter()
                .any(|e| matches!(e, Event::Alert(node, _) if node == "noisy"))
        })
        .await;
    assert!(h.controller.node_status(&noisy).is_some());
    assert_eq!(counted(&h, Budget::RefusedMessages), 0);

    tx.send(pb::SmOutgoingMessages::default()).await.unwrap();
    let status = end_status(&mut rx).await;
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(
        status.message().contains("refused_messages"),
        "the status names the budget: {:?}",
        status.message()
    );
    assert_eq!(counted(&h, Budget::RefusedMessages), 1);
    eventually("noisy gone", DEADLINE, || {
        h.controller.node_status(&noisy).is_none()
    })
    .await;
    h.healthy("after the refused messages").await;
    h.stop().await;
}

/// N-BAD-1: the budget is the connection's, not one stream's: streams opened one after the
/// other on one connection, each refused once (an overlong node id), use it up together; then
/// the connection is closed, and a new connection starts with a whole budget.
#[tokio::test]
async fn n_bad_1_refusals_on_separate_streams_of_one_connection_add_up() {
    const BUDGET: u32 = 3;
    let h = with_refusal_budget(BUDGET).await;
    let channel = one_connection(&h).await;
    let overlong = messages::sm_info(&"n".repeat(1024));
    let mut last = None;
    for i in 0..BUDGET {
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tx.send(overlong.clone()).await.unwrap();
        let mut client = SmServiceClient::new(channel.clone());
        let mut response = within(
            "RegisterSM on the shared connection",
            client.register_sm(tokio_stream::wrappers::ReceiverStream::new(rx)),
        )
        .await
        .unwrap()
        .into_inner();
        let status = end_status(&mut response).await;
        if i + 1 < BUDGET {
            assert_eq!(
                status.code(),
                Code::InvalidArgument,
                "stream {i}: {status:?}"
            );
        }
        last = Some((status, tx));
    }
    // The last refusal used the budget up: that stream ends with RESOURCE_EXHAUSTED instead of
    // its own INVALID_ARGUMENT when the budget wins the race, and either way the connection is
    // closed: a new stream on it fails.
    let (status, _tx) = last.unwrap();
    assert!(
        matches!(
            status.code(),
            Code::InvalidArgument | Code::ResourceExhausted
        ),
        "{status:?}"
    );
    assert_eq!(counted(&h, Budget::RefusedMessages), 1);
    within("the connection closed", async {
        loop {
            let (tx, rx) = tokio::sync::mpsc::channel(4);
            tx.send(messages::sm_info("late")).await.unwrap();
            let mut client = SmServiceClient::new(channel.clone());
            match client
                .register_sm(tokio_stream::wrappers::ReceiverStream::new(rx))
                .await
            {
                // Refused by a closed connection (or reset: it was closed unread).
                Err(status) if matches!(status.code(), Code::Unavailable | Code::Unknown) => {
                    break;
                }
                Err(status) => panic!("{status:?}"),
                Ok(response) => {
                    // Accepted before the close reached the client: it ends with the close.
                    let mut response = response.into_inner();
                    let status = end_status(&mut response).await;
                    assert_ne!(status.code(), Code::Ok, "{status:?}");
                    if status.code() == Code::Unavailable
                        || status.code() == Code::ResourceExhausted
                        || status.code() == Code::Unknown
                    {
                        continue;
                    }
                    panic!("{status:?}");
                }
            }
        }
    })
    .await;
    // A new connection: a whole budget again, and the first refusal is only a refusal.
    let (tx, mut rx) = open_stream(&h.url()).await.unwrap();
    tx.send(overlong).await.unwrap();
    assert_eq!(end_status(&mut rx).await.code(), Code::InvalidArgument);
    assert_eq!(counted(&h, Budget::RefusedMessages), 1);
    h.healthy("after a connection used its refusals").await;
    h.stop().await;
}

/// N-BAD-1: unary calls count too: `GetBlobsInfos` with an overlong digest is refused each time
/// and counts against its connection's budget, which closes the connection when used up.
#[tokio::test]
async fn n_bad_1_refused_get_blobs_infos_calls_count_against_the_connection() {
    const BUDGET: u32 = 2;
    let h = with_refusal_budget(BUDGET).await;
    let channel = one_connection(&h).await;
    let mut client = SmServiceClient::new(channel);
    let overlong = BlobsInfosRequest {
        digests: vec![format!("sha256:{}", "0".repeat(1024))],
    };
    for _ in 0..BUDGET {
        let status = within(
            "a refused GetBlobsInfos",
            client.get_blobs_infos(overlong.clone()),
        )
        .await
        .expect_err("an overlong digest is refused");
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    }
    assert_eq!(counted(&h, Budget::RefusedMessages), 1);
    within(
        "the connection closed",
        support::until_closed(|| {
            let mut client = client.clone();
            let request = overlong.clone();
            async move { client.get_blobs_infos(request).await }
        }),
    )
    .await;
    h.healthy("after the refused blob look-ups").await;
    h.stop().await;
}
