//! Registration, replacement, disconnection and shutdown over real loopback gRPC
//! (R-REG-1..4, R-DISC-1, R-STOP-1).

mod support;

use std::time::{Duration, Instant};

use pb::{sm_incoming_messages::SmIncomingMessage, sm_outgoing_messages::SmOutgoingMessage};
use smcontroller_api::{DisconnectReason, Error, NodeConfigHandler, NodeId};
use smcontroller_grpc::{proto::servicemanager::v5 as pb, server::ServerSettings};
use smcontroller_routing::Settings;
use support::{Event, Harness, TestSm, monitoring};
use tonic::Code;

#[tokio::test]
async fn r_reg_1_the_current_cloud_status_is_the_first_message() {
    let h = Harness::start().await;
    h.controller.set_cloud_connected(true);
    let mut sm = TestSm::open_raw(&h.url()).await;
    // Sent before the SM says anything.
    assert_eq!(sm.recv().await, support::cloud_status(true));
    h.stop().await;
}

/// A refused stream reports nothing, now or later: a node registered after it is reported, and
/// its events are the only ones (waits with a deadline rather than looking once).
async fn nothing_reported_before_a_probe(h: &Harness) {
    let _probe = h.sm("probe").await;
    h.log
        .wait_until("the probe's connect", |e| {
            e.iter()
                .any(|e| matches!(e, Event::Connected(n) if n == "probe"))
        })
        .await;
    let others: Vec<Event> = h
        .log
        .events()
        .into_iter()
        .filter(|e| e.node() != "probe")
        .collect();
    assert!(
        others.is_empty(),
        "a refused stream was reported: {others:?}"
    );
}

#[tokio::test]
async fn r_reg_2_a_first_message_other_than_sm_info_ends_the_stream_unregistered() {
    let h = Harness::start().await;
    let mut sm = TestSm::open(&h.url()).await;
    sm.send(monitoring(1)).await;
    let status = sm.next().await.expect_err("stream refused");
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().contains("sm_info"), "{status:?}");
    assert_eq!(h.controller.node_count(), 0);
    nothing_reported_before_a_probe(&h).await;
    h.stop().await;
}

#[tokio::test]
async fn r_reg_2_an_empty_node_id_is_refused() {
    let h = Harness::start().await;
    let mut sm = TestSm::open(&h.url()).await;
    sm.register("").await;
    let status = sm.next().await.expect_err("stream refused");
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().contains("node_id"), "{status:?}");
    assert_eq!(h.controller.node_count(), 0);
    nothing_reported_before_a_probe(&h).await;
    h.stop().await;
}

#[tokio::test]
async fn r_reg_2_no_sm_info_within_the_registration_timeout() {
    let settings = Settings {
        registration_timeout: Duration::from_millis(200),
        ..Settings::default()
    };
    let h = Harness::with(settings, ServerSettings::default()).await;
    let mut sm = TestSm::open(&h.url()).await;
    let status = sm.next().await.expect_err("stream refused");
    assert_eq!(status.code(), Code::DeadlineExceeded);
    assert_eq!(h.controller.node_count(), 0);
    nothing_reported_before_a_probe(&h).await;
    h.stop().await;
}

#[tokio::test]
async fn r_reg_3_connected_then_sm_info_and_later_sm_info_updates() {
    let h = Harness::start().await;
    let sm = h.sm("n1").await;
    assert_eq!(h.controller.nodes(), vec![NodeId::new("n1")]);
    let events = h.log.of("n1");
    assert!(matches!(&events[0], Event::Connected(n) if n == "n1"));
    assert!(matches!(&events[1], Event::SmInfo(n, i) if n == "n1" && i.runtimes.len() == 1));

    let mut update = support::sm_info("n1");
    update.runtimes.clear();
    sm.send(SmOutgoingMessage::SmInfo(update)).await;
    h.log
        .wait_until("second sm_info", |events| {
            events
                .iter()
                .any(|e| matches!(e, Event::SmInfo(_, i) if i.runtimes.is_empty()))
        })
        .await;
    assert_eq!(h.log.count(|e| matches!(e, Event::Connected(_))), 1);
    h.stop().await;
}

#[tokio::test]
async fn r_reg_3_an_sm_info_with_another_node_id_ends_the_stream() {
    let h = Harness::start().await;
    let mut sm = h.sm("n1").await;
    sm.register("n2").await;
    let status = loop {
        match sm.next().await {
            Ok(Some(_)) => continue,
            Ok(None) => panic!("stream ended without a status"),
            Err(status) => break status,
        }
    };
    assert_eq!(status.code(), Code::InvalidArgument);
    h.log
        .wait_until("n1 disconnected", |events| {
            events.iter().any(|e| {
                matches!(e, Event::Disconnected(n, DisconnectReason::ProtocolViolation(_)) if n == "n1")
            })
        })
        .await;
    assert_eq!(h.controller.node_count(), 0);
    assert_eq!(
        h.log
            .count(|e| matches!(e, Event::Connected(n) if n == "n2")),
        0
    );
    h.stop().await;
}

#[tokio::test]
async fn r_reg_4_a_new_stream_replaces_the_old_one_and_events_alternate() {
    let h = Harness::start().await;
    let mut old = h.sm("n1").await;

    // A call pending on the old stream fails with Disconnected when the new stream registers.
    let pending = tokio::spawn({
        let c = h.controller.clone();
        async move { c.get_node_config_status(&NodeId::new("n1")).await }
    });
    assert_eq!(
        old.recv().await,
        SmIncomingMessage::GetNodeConfigStatus(pb::GetNodeConfigStatus {})
    );

    let mut new = TestSm::open(&h.url()).await;
    new.register("n1").await;
    let pending = pending.await.unwrap();
    assert!(
        matches!(pending, Err(Error::Disconnected { .. })),
        "{pending:?}"
    );

    // The old stream is closed with ABORTED.
    let status = old.next().await.expect_err("old stream ended");
    assert_eq!(status.code(), Code::Aborted);

    h.log
        .wait_count("second connect", 2, |e| matches!(e, Event::Connected(_)))
        .await;
    let lifecycle: Vec<_> = h
        .log
        .of("n1")
        .into_iter()
        .filter(|e| matches!(e, Event::Connected(_) | Event::Disconnected(..)))
        .collect();
    assert!(matches!(
        lifecycle.as_slice(),
        [
            Event::Connected(_),
            Event::Disconnected(_, DisconnectReason::Replaced),
            Event::Connected(_)
        ]
    ));

    // Commands now reach the new stream.
    let call = tokio::spawn({
        let c = h.controller.clone();
        async move { c.get_node_config_status(&NodeId::new("n1")).await }
    });
    assert_eq!(
        new.recv().await,
        SmIncomingMessage::GetNodeConfigStatus(pb::GetNodeConfigStatus {})
    );
    new.config_status("installed", "2.0.0").await;
    assert_eq!(call.await.unwrap().unwrap().version, "2.0.0");
    h.stop().await;
}

#[tokio::test]
async fn r_reg_4_connected_and_disconnected_alternate_under_rapid_reconnects() {
    let h = Harness::start().await;
    let mut streams = Vec::new();
    for _ in 0..10 {
        let sm = TestSm::open(&h.url()).await;
        sm.register("flappy").await;
        streams.push(sm);
    }
    drop(streams);
    h.log
        .wait_until("every stream reported", |events| {
            let c = events
                .iter()
                .filter(|e| matches!(e, Event::Connected(_)))
                .count();
            let d = events
                .iter()
                .filter(|e| matches!(e, Event::Disconnected(..)))
                .count();
            c >= 1 && c == d
        })
        .await;
    let mut connected = false;
    for event in h.log.of("flappy") {
        match event {
            Event::Connected(_) => {
                assert!(!connected, "two connects in a row");
                connected = true;
            }
            Event::Disconnected(..) => {
                assert!(connected, "disconnect without connect");
                connected = false;
            }
            _ => {}
        }
    }
    assert!(!connected);
    h.stop().await;
}

#[tokio::test]
async fn r_disc_1_a_closed_stream_leaves_the_registry_once_and_fails_its_waiters() {
    let settings = support::router_settings(Duration::from_secs(30));
    let h = Harness::with(settings, ServerSettings::default()).await;
    let mut sm = h.sm("n1").await;
    let started = Instant::now();
    let pending = tokio::spawn({
        let c = h.controller.clone();
        async move { c.get_node_config_status(&NodeId::new("n1")).await }
    });
    assert!(matches!(
        sm.recv().await,
        SmIncomingMessage::GetNodeConfigStatus(_)
    ));
    drop(sm);

    let result = pending.await.unwrap();
    assert!(
        matches!(result, Err(Error::Disconnected { .. })),
        "{result:?}"
    );
    // Well before the 30 s response timeout: the waiter failed when the node went.
    assert!(started.elapsed() < Duration::from_secs(15));
    h.log
        .wait_until("disconnect", |events| {
            events.iter().any(|e| matches!(e, Event::Disconnected(..)))
        })
        .await;
    assert_eq!(h.controller.node_count(), 0);
    assert_eq!(h.log.count(|e| matches!(e, Event::Disconnected(..))), 1);
    let gone = h
        .controller
        .get_node_config_status(&NodeId::new("n1"))
        .await;
    assert!(matches!(gone, Err(Error::NotFound { .. })), "{gone:?}");
    h.stop().await;
}

#[tokio::test]
async fn r_stop_1_stop_returns_within_a_second_while_smes_keep_sending() {
    let h = Harness::start().await;
    let mut senders = Vec::new();
    let mut streams = Vec::new();
    for i in 0..10 {
        let node = format!("chatty-{i}");
        let sm = h.sm(&node).await;
        let tx = sm.tx.clone();
        senders.push(tokio::spawn(async move {
            // Bounded: stops at the first failed send (the stream ended) or after 100,000.
            for n in 0..100_000u64 {
                let message = pb::SmOutgoingMessages {
                    sm_outgoing_message: Some(monitoring(n)),
                };
                if tx.send(message).await.is_err() {
                    break;
                }
            }
        }));
        streams.push(sm);
    }
    h.log
        .wait_count("telemetry flowing", 100, |e| {
            matches!(e, Event::Monitoring(..))
        })
        .await;

    let log = h.log.clone();
    let started = Instant::now();
    h.stop().await;
    let took = started.elapsed();
    assert!(took < Duration::from_secs(1), "stop took {took:?}");
    assert_eq!(
        log.count(|e| matches!(e, Event::Disconnected(_, DisconnectReason::Shutdown))),
        10
    );
    for mut sm in streams {
        let end = loop {
            match sm.next().await {
                Ok(Some(_)) => continue,
                other => break other,
            }
        };
        assert!(end.is_err() || matches!(end, Ok(None)));
    }
    for s in senders {
        s.abort();
    }
}
