//! The router's budgets (contract R-BAD-2) without a network: pending streams, nodes, the
//! outbound backlog, the command size limit and the inbound queue in bytes. Each budget, when
//! reached, gives its error or status and its counter, and the nodes that behave go on.

mod support;

use std::time::Duration;

use smcontroller_api::{Error, InstanceRunner, NodeConfigHandler, NodeId, StartInstance};
use smcontroller_routing::{Budget, CommandLimit, EndCode, Inbound, Outbound, Settings};
use support::{Ev, SLOW, Sm, config_status, controller, monitoring};

const WAIT: Duration = Duration::from_secs(5);

fn node(id: &str) -> NodeId {
    NodeId::new(id)
}

#[tokio::test]
async fn r_bad_2_at_the_pending_budget_the_oldest_unregistered_stream_gives_its_place() {
    let (controller, recorder) = controller(Settings {
        max_pending_streams: 3,
        ..Settings::default()
    });
    let mut oldest = Sm::attach(&controller);
    let _second = Sm::attach(&controller);
    let _third = Sm::attach(&controller);
    assert_eq!(controller.pending_streams(), 3);

    // A new SM is not kept out by streams that never register: the oldest one goes.
    let newcomer = Sm::attach(&controller);
    let end = oldest
        .end_status(WAIT)
        .await
        .expect("evicted with a status");
    assert_eq!(end.code, EndCode::ResourceExhausted);
    assert!(end.message.contains("maxPendingStreams"), "{}", end.message);
    assert_eq!(controller.refusals().get(Budget::PendingStreams), 1);
    assert_eq!(controller.pending_streams(), 3);
    newcomer.send(Inbound::SmInfo(support::sm_info("n1", "s1")));
    recorder
        .wait_for("the newcomer registered", WAIT, |e| {
            e.contains(&Ev::SmInfo("n1".into(), "s1".into()))
        })
        .await;
    tokio::time::timeout(WAIT, async {
        while controller.pending_streams() != 2 {
            tokio::task::yield_now().await;
        }
    })
    .await
    .expect("the registered stream gave its place back");

    // Many more: each evicts the oldest waiting one; the count never passes the budget and
    // the queue of waiting streams stays bounded.
    let mut flood: Vec<Sm> = (0..1000).map(|_| Sm::attach(&controller)).collect();
    assert!(controller.pending_streams() <= 3);
    for sm in flood.iter_mut().take(990) {
        assert_eq!(
            sm.end_status(WAIT).await.map(|e| e.code),
            Some(EndCode::ResourceExhausted)
        );
    }
    assert_eq!(controller.node_count(), 1);
    // Only the streams still waiting have an entry in the eviction order.
    assert_eq!(controller.waiting_streams(), controller.pending_streams());
}

#[tokio::test]
async fn r_bad_2_a_new_node_beyond_the_node_budget_is_refused_but_a_known_node_may_reconnect() {
    let (controller, recorder) = controller(Settings {
        max_nodes: 2,
        ..Settings::default()
    });
    let _a = Sm::register(&controller, "a", "s1");
    let _b = Sm::register(&controller, "b", "s1");
    recorder
        .wait_for("two nodes", WAIT, |e| {
            e.iter().filter(|e| matches!(e, Ev::SmInfo(..))).count() == 2
        })
        .await;

    let mut c = Sm::register(&controller, "c", "s1");
    let end = c.end_status(WAIT).await.expect("refused with a status");
    assert_eq!(end.code, EndCode::ResourceExhausted);
    assert!(end.message.contains("maxNodes"), "{}", end.message);
    assert_eq!(controller.refusals().get(Budget::Nodes), 1);
    assert_eq!(controller.node_count(), 2);
    assert!(recorder.of("c").is_empty(), "{:?}", recorder.of("c"));

    // A registered node replacing its own stream is not a new node.
    let _a2 = Sm::register(&controller, "a", "s2");
    recorder
        .wait_for("a's new stream", WAIT, |e| {
            e.contains(&Ev::SmInfo("a".into(), "s2".into()))
        })
        .await;
    assert_eq!(controller.node_count(), 2);
    assert_eq!(controller.pending_streams(), 0);
}

#[tokio::test]
async fn r_bad_2_a_node_that_does_not_read_fails_calls_at_once_and_nothing_grows() {
    let (controller, recorder) = controller(Settings {
        outbound_backlog: 4,
        ..Settings::default()
    });
    let mut sm = Sm::register(&controller, "n1", "s1");
    recorder
        .wait_for("registered", WAIT, |e| e.len() == 2)
        .await;
    // The cloud status went first; the transport took it. Then the SM stops reading.
    assert_eq!(sm.cloud_statuses(), vec![false]);
    for _ in 0..4 {
        controller
            .update_instances(&node("n1"), &[], &[])
            .await
            .expect("within the backlog");
    }
    for _ in 0..1000 {
        let refused = controller
            .update_instances(&node("n1"), &[], &[])
            .await
            .expect_err("over the backlog");
        assert!(
            matches!(&refused, Error::ResourceExhausted(m) if m.contains("outboundBacklog")),
            "{refused:?}"
        );
    }
    // A sync call fails at once too, not after the response timeout.
    let started = tokio::time::Instant::now();
    let refused = controller
        .get_node_config_status(&node("n1"))
        .await
        .expect_err("over the backlog");
    assert!(
        matches!(refused, Error::ResourceExhausted(_)),
        "{refused:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(1));
    assert_eq!(controller.refusals().get(Budget::OutboundBacklog), 1001);
    let status = controller.node_status(&node("n1")).unwrap();
    assert_eq!((status.backlog_commands, status.backlog_bytes), (4, 0));

    // The SM reads again: the backlog drains and calls go through.
    for _ in 0..4 {
        assert!(matches!(
            sm.command(WAIT).await,
            Outbound::UpdateInstances { .. }
        ));
    }
    controller
        .update_instances(&node("n1"), &[], &[])
        .await
        .expect("room again");
}

#[tokio::test]
async fn r_bad_2_a_cloud_change_for_a_node_that_does_not_read_closes_it_as_stalled() {
    let (controller, recorder) = controller(Settings {
        outbound_backlog: 2,
        ..Settings::default()
    });
    let mut sm = Sm::register(&controller, "n1", "s1");
    recorder
        .wait_for("registered", WAIT, |e| e.len() == 2)
        .await;
    assert_eq!(sm.cloud_statuses(), vec![false]);
    for _ in 0..2 {
        controller
            .update_instances(&node("n1"), &[], &[])
            .await
            .unwrap();
    }
    controller.set_cloud_connected(true);
    let end = sm.end_status(WAIT).await.expect("closed with a status");
    assert_eq!(end.code, EndCode::ResourceExhausted);
    assert!(end.message.contains("does not read"), "{}", end.message);
    recorder
        .wait_for("disconnected as stalled", WAIT, |e| {
            e.iter().any(
                |e| matches!(e, Ev::Disconnected(n, why) if n == "n1" && why.contains("stalled")),
            )
        })
        .await;
}

#[tokio::test]
async fn r_bad_2_a_command_over_the_size_limit_fails_its_call_and_the_stream_goes_on() {
    let (controller, recorder) = controller(Settings::default());
    // A transport measuring every start instance as 1 KiB, with a 4 KiB limit.
    controller.limit_commands(CommandLimit {
        max_bytes: 4096,
        size_of: |command| match command {
            Outbound::UpdateInstances { start, .. } => start.len() * 1024,
            _ => 8,
        },
    });
    let mut sm = Sm::register(&controller, "n1", "s1");
    recorder
        .wait_for("registered", WAIT, |e| e.len() == 2)
        .await;
    let big = vec![StartInstance::default(); 5];
    let refused = controller
        .update_instances(&node("n1"), &[], &big)
        .await
        .expect_err("too large to send");
    assert!(
        matches!(&refused, Error::InvalidArgument(m) if m.contains("5120 bytes") && m.contains("4096")),
        "{refused:?}"
    );
    assert_eq!(controller.refusals().get(Budget::CommandSize), 1);

    // The stream is still up and the next call goes out.
    let small = vec![StartInstance::default(); 2];
    controller
        .update_instances(&node("n1"), &[], &small)
        .await
        .unwrap();
    match sm.command(WAIT).await {
        Outbound::UpdateInstances { start, .. } => assert_eq!(start.len(), 2),
        other => panic!("{other:?}"),
    }
    let status = controller
        .node_status(&node("n1"))
        .expect("still registered");
    assert_eq!(status.backlog_bytes, 0);
    let check = tokio::spawn({
        let controller = controller.clone();
        async move { controller.get_node_config_status(&node("n1")).await }
    });
    assert_eq!(sm.command(WAIT).await, Outbound::GetNodeConfigStatus);
    sm.send(config_status("1", false));
    check.await.unwrap().expect("answered");
}

#[tokio::test]
async fn r_bad_2_the_inbound_queue_is_bounded_in_bytes_and_pauses_the_stream() {
    let (controller, recorder) = controller(Settings {
        queue_bound: 1000,
        inbound_queue_bytes: 10_000,
        ..Settings::default()
    });
    let sm = Sm::register(&controller, "n1", "s1");
    recorder
        .wait_for("registered", WAIT, |e| e.len() == 2)
        .await;
    // The first sample blocks its receiver; the rest wait in the queue, 3,000 bytes each.
    sm.send_sized(Inbound::InstantMonitoring(monitoring(1000, SLOW)), 3000);
    for i in 0..10 {
        sm.send_sized(Inbound::InstantMonitoring(monitoring(1000 + i, 0)), 3000);
    }
    support::until_stalled(
        &controller,
        "n1",
        WAIT,
        "the stream paused on the byte budget, far below the message bound",
    )
    .await;
    let status = controller.node_status(&node("n1")).unwrap();
    assert!(status.queued_bytes <= 10_000, "{status:?}");
    assert_eq!(status.queued_messages, 3, "{status:?}");
    assert!(controller.refusals().get(Budget::InboundQueue) >= 1);

    // Nothing is lost: released, every sample arrives in order.
    recorder.release();
    recorder
        .wait_for("every sample", WAIT, |e| {
            e.iter().filter(|e| matches!(e, Ev::Monitoring(..))).count() == 11
        })
        .await;
}

#[tokio::test(start_paused = true)]
async fn r_bad_2_commands_of_calls_that_timed_out_unsent_are_taken_back() {
    let (controller, recorder) = controller(Settings::default());
    let mut sm = Sm::register(&controller, "n1", "s1");
    recorder
        .wait_for("registered", WAIT, |e| e.len() == 2)
        .await;
    assert_eq!(sm.cloud_statuses(), vec![false]);
    // The SM stops reading; three status reads time out with their commands still queued.
    for _ in 0..3 {
        let timed_out = controller
            .get_node_config_status(&node("n1"))
            .await
            .expect_err("nobody reads");
        assert!(matches!(timed_out, Error::Timeout { .. }), "{timed_out:?}");
    }
    let status = controller.node_status(&node("n1")).unwrap();
    assert_eq!(status.backlog_commands, 0, "{status:?}");

    // When it reads again, it gets the next call's command only, and its reply answers it.
    let call = tokio::spawn({
        let controller = controller.clone();
        async move { controller.get_node_config_status(&node("n1")).await }
    });
    assert_eq!(sm.command(WAIT).await, Outbound::GetNodeConfigStatus);
    sm.send(config_status("7", false));
    assert_eq!(call.await.unwrap().unwrap().version, "7");
    assert!(sm.out.try_recv().is_none(), "no stale command followed");
}
