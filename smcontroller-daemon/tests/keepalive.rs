//! HTTP/2 keepalive (R-DISC-2): the SM's own pings are accepted, and a peer that goes silent
//! without closing its connection is found and dropped by the server's pings.

mod support;

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use pb::sm_incoming_messages::SmIncomingMessage;
use smcontroller_api::{DisconnectReason, NodeConfigHandler, NodeId};
use smcontroller_grpc::{
    proto::servicemanager::v5::{self as pb, sm_service_client::SmServiceClient},
    server::ServerSettings,
};
use smcontroller_routing::Settings;
use support::{Event, Harness, TestSm};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::mpsc,
};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Endpoint;

#[tokio::test]
async fn r_disc_2_the_sms_own_keepalive_pings_are_accepted_without_goaway() {
    let h = Harness::start().await;
    // A real SM pings every 10 s; this one pings 50 times faster, also while idle.
    let channel = Endpoint::from_shared(h.url())
        .unwrap()
        .http2_keep_alive_interval(Duration::from_millis(200))
        .keep_alive_timeout(Duration::from_secs(3))
        .keep_alive_while_idle(true)
        .connect()
        .await
        .unwrap();
    let mut client = SmServiceClient::new(channel);
    let (tx, rx) = mpsc::channel(8);
    tx.send(pb::SmOutgoingMessages {
        sm_outgoing_message: Some(pb::sm_outgoing_messages::SmOutgoingMessage::SmInfo(
            support::sm_info("pinger"),
        )),
    })
    .await
    .unwrap();
    let mut sm = TestSm {
        tx,
        rx: client
            .register_sm(ReceiverStream::new(rx))
            .await
            .unwrap()
            .into_inner(),
    };
    assert!(matches!(
        sm.recv().await,
        SmIncomingMessage::ConnectionStatus(_)
    ));

    // The behaviour under test is time passing with pings in flight: about ten pings.
    tokio::time::sleep(Duration::from_secs(2)).await;

    assert_eq!(h.controller.node_count(), 1);
    assert_eq!(h.log.count(|e| matches!(e, Event::Disconnected(..))), 0);
    let call = tokio::spawn({
        let c = h.controller.clone();
        async move { c.get_node_config_status(&NodeId::new("pinger")).await }
    });
    assert!(matches!(
        sm.recv().await,
        SmIncomingMessage::GetNodeConfigStatus(_)
    ));
    sm.config_status("installed", "1").await;
    assert_eq!(call.await.unwrap().unwrap().version, "1");
    // The unary call works on the same connection too.
    client
        .get_blobs_infos(pb::BlobsInfosRequest { digests: vec![] })
        .await
        .unwrap();
    h.stop().await;
}

/// A loopback TCP proxy that can go silent: once frozen it neither reads nor writes, and
/// keeps both connections open (a half-open peer, as after a cable pull).
struct FreezingProxy {
    addr: std::net::SocketAddr,
    frozen: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl FreezingProxy {
    async fn start(upstream: std::net::SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let frozen = Arc::new(AtomicBool::new(false));
        let task = tokio::spawn({
            let frozen = frozen.clone();
            async move {
                // One connection is all the test makes.
                let (client, _) = listener.accept().await.unwrap();
                let server = TcpStream::connect(upstream).await.unwrap();
                let (cr, cw) = client.into_split();
                let (sr, sw) = server.into_split();
                let a = tokio::spawn(pump(cr, sw, frozen.clone()));
                let b = tokio::spawn(pump(sr, cw, frozen));
                let _ = tokio::join!(a, b);
            }
        });
        Self { addr, frozen, task }
    }

    fn freeze(&self) {
        self.frozen.store(true, Ordering::SeqCst);
    }
}

impl Drop for FreezingProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    frozen: Arc<AtomicBool>,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if frozen.load(Ordering::SeqCst) {
            // Silent from now on, with both sockets held open.
            std::future::pending::<()>().await;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

#[tokio::test]
async fn r_disc_2_a_silent_half_open_sm_is_dropped_by_the_servers_keepalive() {
    let server = ServerSettings {
        keepalive_interval: Duration::from_millis(200),
        keepalive_timeout: Duration::from_millis(300),
        ..ServerSettings::default()
    };
    let h = Harness::with(Settings::default(), server).await;
    let proxy = FreezingProxy::start(h.addr).await;
    let _sm = {
        let sm = TestSm::open(&format!("http://{}", proxy.addr)).await;
        sm.register("half-open").await;
        h.log
            .wait_until("registration", |e| {
                e.iter().any(|e| matches!(e, Event::Connected(_)))
            })
            .await;
        sm
    };

    proxy.freeze();
    // hyper answers a missed ping with GOAWAY and ends the request body without an error, so
    // the reason seen is `Closed`; without the server's pings nothing would ever end it.
    h.log
        .wait_until("the dead peer dropped", |e| {
            e.iter().any(|e| {
                matches!(
                    e,
                    Event::Disconnected(_, DisconnectReason::Closed | DisconnectReason::Error(_))
                )
            })
        })
        .await;
    assert_eq!(h.controller.node_count(), 0);
    h.stop().await;
}
