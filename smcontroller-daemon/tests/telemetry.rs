//! What SMs send reaches the receivers, in order, with backpressure and without letting bad
//! input hurt the stream (R-TEL-1..4, R-BAD-1).

mod support;

use std::{
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use common::{ErrorInfo, InstanceIdent};
use pb::{sm_incoming_messages::SmIncomingMessage, sm_outgoing_messages::SmOutgoingMessage};
use smcontroller_api::{
    AlertKind, CoreComponent, DisconnectReason, InstanceState, LogStatus, NodeConfigHandler, NodeId,
};
use smcontroller_grpc::{
    proto::{common::v2 as common, servicemanager::v5 as pb},
    server::ServerSettings,
};
use smcontroller_routing::Settings;
use support::{Event, Harness, TestSm, monitoring, ram_of, timestamp};
use tonic::Code;

fn ident(item: &str) -> InstanceIdent {
    InstanceIdent {
        item_id: item.into(),
        subject_id: "subject".into(),
        instance: 0,
        r#type: 0,
        preinstalled: false,
    }
}

fn instance_status(item: &str, state: &str, env_error: bool) -> pb::InstanceStatus {
    pb::InstanceStatus {
        instance: Some(ident(item)),
        version: "1.0.0".into(),
        runtime_id: "runc".into(),
        manifest_digest: "sha256:m".into(),
        env_vars: if env_error {
            vec![pb::EnvVarStatus {
                name: "KEY".into(),
                error: Some(ErrorInfo {
                    aos_code: 1,
                    exit_code: 0,
                    message: "bad".into(),
                }),
            }]
        } else {
            vec![]
        },
        state: state.into(),
        error: None,
    }
}

#[tokio::test]
async fn r_tel_1_every_message_type_reaches_its_receiver_with_the_node_id_in_order() {
    let h = Harness::start().await;
    let sm = h.sm("n1").await;
    sm.send(SmOutgoingMessage::NodeInstancesStatus(
        pb::NodeInstancesStatus {
            instances: vec![instance_status("a", "active", false)],
        },
    ))
    .await;
    sm.send(SmOutgoingMessage::UpdateInstancesStatus(
        pb::UpdateInstancesStatus {
            instances: vec![
                instance_status("b", "activating", false),
                instance_status("c", "failed", true),
            ],
        },
    ))
    .await;
    sm.send(monitoring(10)).await;
    sm.send(SmOutgoingMessage::Alert(pb::Alert {
        timestamp: Some(timestamp()),
        alert_item: Some(pb::alert::AlertItem::CoreAlert(pb::CoreAlert {
            core_component: "IAM".into(),
            message: "restarted".into(),
        })),
    }))
    .await;
    sm.send(SmOutgoingMessage::Log(pb::LogData {
        correlation_id: "c1".into(),
        part_count: 1,
        part: 1,
        data: b"log line".to_vec(),
        status: "ok".into(),
        error: None,
    }))
    .await;

    h.log
        .wait_until("log part", |e| e.iter().any(|e| matches!(e, Event::Log(_))))
        .await;
    let events = h.log.of("n1");
    let kinds: Vec<&str> = events
        .iter()
        .map(|e| match e {
            Event::Connected(_) => "connected",
            Event::SmInfo(..) => "sm_info",
            Event::NodeInstances(..) => "node_instances",
            Event::InstanceStatus(..) => "instance_status",
            Event::EnvVars(..) => "env_vars",
            Event::Monitoring(..) => "monitoring",
            Event::Alert(..) => "alert",
            Event::Log(_) => "log",
            Event::Disconnected(..) => "disconnected",
        })
        .collect();
    assert_eq!(
        kinds,
        [
            "connected",
            "sm_info",
            "node_instances",
            "instance_status",
            "instance_status",
            "env_vars",
            "monitoring",
            "alert",
            "log"
        ]
    );
    let Event::InstanceStatus(_, c) = &events[4] else {
        unreachable!()
    };
    assert_eq!(c.state, InstanceState::Failed);
    let Event::EnvVars(_, env) = &events[5] else {
        unreachable!()
    };
    assert_eq!(env.len(), 1, "only the instance carrying env var statuses");
    assert_eq!(env[0].ident.item_id, "c");
    let Event::Alert(_, alert) = &events[7] else {
        unreachable!()
    };
    assert!(matches!(
        alert.kind,
        AlertKind::Core {
            component: CoreComponent::Iam,
            ..
        }
    ));
    let Event::Log(part) = &events[8] else {
        unreachable!()
    };
    assert_eq!(
        part.node_id.as_str(),
        "n1",
        "the router fills in the node id"
    );
    assert_eq!(part.status, LogStatus::Ok);
    assert_eq!(part.data, b"log line");
    h.stop().await;
}

#[tokio::test]
async fn r_tel_2_a_slow_receiver_does_not_delay_a_sync_reply() {
    let h = Harness::start().await;
    let mut sm = h.sm("slow").await;
    h.log.block("slow");
    sm.send(monitoring(1)).await;
    let call = tokio::spawn({
        let c = h.controller.clone();
        async move { c.get_node_config_status(&NodeId::new("slow")).await }
    });
    assert!(matches!(
        sm.recv().await,
        SmIncomingMessage::GetNodeConfigStatus(_)
    ));
    sm.config_status("installed", "7").await;
    assert_eq!(call.await.unwrap().unwrap().version, "7");
    assert_eq!(
        h.log.count(|e| ram_of(e).is_some()),
        0,
        "the sample is still held"
    );
    // The queue had room all along: the stream never paused.
    let status = h.controller.node_status(&NodeId::new("slow")).unwrap();
    assert_eq!((status.stalls, status.stalled), (0, false));
    h.log.unblock("slow");
    h.log
        .wait_count("held sample", 1, |e| ram_of(e).is_some())
        .await;
    h.stop().await;
}

/// A monitoring sample padded to about `size` bytes.
fn big_monitoring(n: u64, size: usize) -> SmOutgoingMessage {
    let SmOutgoingMessage::InstantMonitoring(mut m) = monitoring(n) else {
        unreachable!()
    };
    m.node_monitoring
        .as_mut()
        .unwrap()
        .partitions
        .push(pb::PartitionUsage {
            name: "p".repeat(size),
            used_size: n,
        });
    SmOutgoingMessage::InstantMonitoring(m)
}

#[tokio::test]
async fn r_tel_3_a_full_queue_stops_reading_and_nothing_is_dropped() {
    const N: usize = 400;
    let settings = Settings {
        queue_bound: 4,
        ..Settings::default()
    };
    let h = Harness::with(settings, ServerSettings::default()).await;
    let sm = h.sm("firehose").await;
    h.log.block("firehose");

    let sent = Arc::new(AtomicUsize::new(0));
    let sender = tokio::spawn({
        let tx = sm.tx.clone();
        let sent = sent.clone();
        async move {
            for n in 0..N as u64 {
                let message = pb::SmOutgoingMessages {
                    sm_outgoing_message: Some(big_monitoring(n, 32 * 1024)),
                };
                if tx.send(message).await.is_err() {
                    return;
                }
                sent.fetch_add(1, Ordering::Relaxed);
            }
        }
    });
    // 400 x 32 KiB = 12.5 MiB: far more than the queue, the channels and the HTTP/2 windows
    // hold. Wait (with a deadline) until the reader finds the queue full and pauses.
    let node = NodeId::new("firehose");
    tokio::time::timeout(Duration::from_secs(10), async {
        while !h.controller.node_status(&node).is_some_and(|s| s.stalled) {
            tokio::task::yield_now().await;
        }
    })
    .await
    .expect("the stream pauses once the queue is full");
    // While it is paused the SM cannot get it all out: flow control holds it back.
    assert!(
        sent.load(Ordering::Relaxed) < N,
        "the SM sent everything although nothing was read"
    );
    assert_eq!(h.controller.node_count(), 1, "the stream stays up");
    assert!(h.controller.node_status(&node).unwrap().stalls >= 1);

    h.log.unblock("firehose");
    sender.await.unwrap();
    h.log
        .wait_count("every sample", N, |e| ram_of(e).is_some())
        .await;
    let rams: Vec<u64> = h.log.events().iter().filter_map(ram_of).collect();
    assert_eq!(rams, (0..N as u64).collect::<Vec<_>>(), "all, in order");
    h.stop().await;
}

/// The other side of R-TEL-2's line: once the node's queue is full its stream is paused, so a
/// sync reply behind the queued telemetry cannot be read, the call times out, and the stall is
/// counted. When the receiver catches up, everything flows again.
#[tokio::test]
async fn r_tel_2_a_full_queue_pauses_the_stream_and_a_sync_call_can_time_out() {
    let settings = Settings {
        queue_bound: 2,
        response_timeout: Duration::from_millis(500),
        ..Settings::default()
    };
    let h = Harness::with(settings, ServerSettings::default()).await;
    let mut sm = h.sm("full").await;
    h.log.block("full");
    let node = NodeId::new("full");
    let sender = tokio::spawn({
        let tx = sm.tx.clone();
        async move {
            for n in 0..200_u64 {
                let message = pb::SmOutgoingMessages {
                    sm_outgoing_message: Some(big_monitoring(n, 32 * 1024)),
                };
                if tx.send(message).await.is_err() {
                    return;
                }
            }
        }
    });
    tokio::time::timeout(Duration::from_secs(10), async {
        while !h.controller.node_status(&node).is_some_and(|s| s.stalled) {
            tokio::task::yield_now().await;
        }
    })
    .await
    .expect("the stream pauses once the queue is full");

    let call = tokio::spawn({
        let c = h.controller.clone();
        let node = node.clone();
        async move { c.get_node_config_status(&node).await }
    });
    let answer = tokio::spawn(async move {
        loop {
            if let SmIncomingMessage::GetNodeConfigStatus(_) = sm.recv().await {
                break;
            }
        }
        sm.config_status("installed", "9").await;
        sm
    });
    let result = call.await.unwrap();
    assert!(
        matches!(result, Err(smcontroller_api::Error::Timeout { .. })),
        "{result:?}"
    );
    assert!(h.controller.node_status(&node).unwrap().stalls >= 1);

    h.log.unblock("full");
    let _sm = answer.await.unwrap();
    sender.await.unwrap();
    h.log
        .wait_count("every sample", 200, |e| ram_of(e).is_some())
        .await;
    h.stop().await;
}

#[tokio::test]
async fn r_tel_2_one_blocked_node_of_100_does_not_hold_up_the_other_99() {
    let h = Harness::start().await;
    let mut sms = Vec::new();
    for i in 0..100 {
        sms.push(h.sm(&format!("node-{i:03}")).await);
    }
    h.log.block("node-000");
    for n in 0..50 {
        sms[0].send(monitoring(n)).await;
    }
    for sm in &sms[1..] {
        for n in 0..10 {
            sm.send(monitoring(n)).await;
        }
    }
    h.log
        .wait_count("the 99 nodes' telemetry", 990, |e| {
            ram_of(e).is_some() && e.node() != "node-000"
        })
        .await;

    // Their sync calls are answered too.
    let mut responders = Vec::new();
    for mut sm in sms.drain(1..) {
        responders.push(tokio::spawn(async move {
            assert!(matches!(
                sm.recv().await,
                SmIncomingMessage::GetNodeConfigStatus(_)
            ));
            sm.config_status("installed", "v").await;
            sm
        }));
    }
    let calls = (1..100).map(|i| {
        let c = h.controller.clone();
        async move {
            c.get_node_config_status(&NodeId::new(format!("node-{i:03}")))
                .await
        }
    });
    for result in futures::future::join_all(calls).await {
        assert_eq!(result.unwrap().version, "v");
    }
    assert_eq!(
        h.log
            .count(|e| ram_of(e).is_some() && e.node() == "node-000"),
        0
    );

    h.log.unblock("node-000");
    h.log
        .wait_count("the blocked node's telemetry", 50, |e| {
            ram_of(e).is_some() && e.node() == "node-000"
        })
        .await;
    let _keep_open: Vec<TestSm> = futures::future::join_all(responders)
        .await
        .into_iter()
        .map(Result::unwrap)
        .collect();
    h.stop().await;
}

#[tokio::test]
async fn r_tel_4_an_unconvertible_message_is_skipped_and_the_stream_stays_up() {
    let h = Harness::start().await;
    let sm = h.sm("n1").await;
    // Bad vocabulary value.
    sm.send(SmOutgoingMessage::NodeInstancesStatus(
        pb::NodeInstancesStatus {
            instances: vec![instance_status("a", "bogus", false)],
        },
    ))
    .await;
    // Missing required part: an alert without timestamp.
    sm.send(SmOutgoingMessage::Alert(pb::Alert {
        timestamp: None,
        alert_item: Some(pb::alert::AlertItem::SystemAlert(pb::SystemAlert {
            message: "x".into(),
        })),
    }))
    .await;
    // R-BAD-1: an empty oneof is logged and ignored.
    sm.tx
        .send(pb::SmOutgoingMessages {
            sm_outgoing_message: None,
        })
        .await
        .unwrap();
    sm.send(monitoring(5)).await;
    h.log
        .wait_count("the valid sample", 1, |e| ram_of(e) == Some(5))
        .await;
    assert_eq!(
        h.log
            .count(|e| matches!(e, Event::NodeInstances(..) | Event::Alert(..))),
        0
    );
    assert_eq!(h.controller.node_count(), 1);
    assert_eq!(h.log.count(|e| matches!(e, Event::Disconnected(..))), 0);
    h.stop().await;
}

#[tokio::test]
async fn r_bad_1_an_over_size_message_ends_the_stream_with_resource_exhausted() {
    let server = ServerSettings {
        max_message_size: 64 * 1024,
        ..ServerSettings::default()
    };
    let h = Harness::with(Settings::default(), server).await;
    let mut sm = h.sm("n1").await;
    sm.send(big_monitoring(1, 128 * 1024)).await;
    let status = loop {
        match sm.next().await {
            Ok(Some(_)) => continue,
            Ok(None) => panic!("stream ended without a status"),
            Err(status) => break status,
        }
    };
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    h.log
        .wait_until("disconnect", |e| {
            e.iter()
                .any(|e| matches!(e, Event::Disconnected(_, DisconnectReason::Error(_))))
        })
        .await;
    assert_eq!(h.controller.node_count(), 0);

    // The controller is fine: the node registers again.
    let _again = h.sm("n1").await;
    h.log
        .wait_count("the second connect", 2, |e| {
            matches!(e, Event::Connected(_))
        })
        .await;
    assert_eq!(h.controller.node_count(), 1);
    h.stop().await;
}

#[tokio::test]
async fn r_bad_1_an_undecodable_frame_ends_the_stream_with_a_clear_status() {
    let h = Harness::start().await;
    let (mut raw, _tx) = support::raw_stream(
        &h.url(),
        vec![
            // A valid sm_info ...
            prost::Message::encode_to_vec(&pb::SmOutgoingMessages {
                sm_outgoing_message: Some(SmOutgoingMessage::SmInfo(support::sm_info("raw"))),
            }),
            // ... then field 1 (sm_info) claiming 100 bytes where 1 follows.
            vec![0x0a, 0x64, 0x01],
        ],
    )
    .await;
    let status = loop {
        match tokio::time::timeout(support::DEADLINE, raw.message())
            .await
            .unwrap()
        {
            Ok(Some(_)) => continue,
            Ok(None) => panic!("stream ended without a status"),
            Err(status) => break status,
        }
    };
    // The peer's bytes are at fault, not the server: INVALID_ARGUMENT (issue 9), naming what
    // could not be decoded.
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(
        status.message().to_lowercase().contains("decode"),
        "{status:?}"
    );
    h.log
        .wait_until("disconnect", |e| {
            e.iter().any(|e| matches!(e, Event::Disconnected(..)))
        })
        .await;
    h.stop().await;
}
