//! The routing core without a network: `Controller::attach` driven with in-memory streams and
//! a scripted receiver, one test per interleaving that broke the session core (issue 7). Each
//! names the requirement it proves.

mod support;

use std::time::Duration;

use smcontroller_api::{Error, MonitoringProvider, NodeConfig, NodeConfigHandler, NodeId};
use smcontroller_routing::{Inbound, Outbound, Settings};
use support::{Ev, PANIC, SLOW, Sm, assert_alternation, config_status, controller, monitoring};

const WAIT: Duration = Duration::from_secs(10);

fn node(id: &str) -> NodeId {
    NodeId::new(id)
}

/// Waits until `id`'s commands go to a stream other than its first (session 0).
async fn taken_over(controller: &smcontroller_routing::Controller, id: &str) {
    tokio::time::timeout(WAIT, async {
        while controller
            .node_status(&node(id))
            .is_none_or(|s| s.session == 0)
        {
            tokio::task::yield_now().await;
        }
    })
    .await
    .expect("a newer stream of the node registers");
}

/// Waits until `id` is addressable.
async fn registered(controller: &smcontroller_routing::Controller, id: &str) {
    tokio::time::timeout(WAIT, async {
        while controller.node_status(&node(id)).is_none() {
            tokio::task::yield_now().await;
        }
    })
    .await
    .expect("the node registers");
}

/// Item 1: an SM whose stream ended by itself reconnects at once, while the old stream's
/// telemetry is still with a slow receiver. The new stream's *connected* comes after the old
/// one's *disconnected*, and nothing of the old stream follows it.
#[tokio::test]
async fn r_reg_5_a_reconnect_right_after_the_stream_ended_by_itself_waits_for_its_disconnect() {
    let (controller, recorder) = controller(Settings::default());
    let mut old = Sm::register(&controller, "a", "s1");
    old.monitoring(1000, SLOW);
    old.monitoring(1001, 0);
    recorder
        .wait_for("the old stream's connect", WAIT, |e| e.len() >= 2)
        .await;
    old.close();
    old.closed(WAIT).await;

    let new = Sm::register(&controller, "a", "s2");
    new.monitoring(2000, 0);
    // The new stream is addressable at once, although its connect is not reported yet.
    taken_over(&controller, "a").await;
    recorder.release();
    recorder
        .wait_for("the new stream's telemetry", WAIT, |e| {
            e.contains(&Ev::Monitoring("a".into(), 2000))
        })
        .await;
    let events = recorder.of("a");
    assert_alternation(&events);
    assert_eq!(
        events,
        vec![
            Ev::Connected("a".into()),
            Ev::SmInfo("a".into(), "s1".into()),
            Ev::Monitoring("a".into(), 1000),
            Ev::Monitoring("a".into(), 1001),
            Ev::Disconnected(
                "a".into(),
                "stream ended (closed by the SM, or its connection was lost)".into()
            ),
            Ev::Connected("a".into()),
            Ev::SmInfo("a".into(), "s2".into()),
            Ev::Monitoring("a".into(), 2000),
        ]
    );
    assert_eq!(controller.nodes(), vec![node("a")]);
}

/// Item 2: a reply that comes after its caller timed out is absorbed, never handed to the next
/// caller of the same kind.
#[tokio::test(start_paused = true)]
async fn r_sync_3_a_late_average_monitoring_never_reaches_the_next_caller() {
    let (controller, _recorder) = controller(Settings::default());
    let mut sm = Sm::register(&controller, "a", "s1");
    registered(&controller, "a").await;
    let a = node("a");
    let first = controller.get_average_monitoring(&a);
    let (first, command) = tokio::join!(first, sm.command(WAIT));
    assert_eq!(command, Outbound::GetAverageMonitoring);
    assert!(matches!(first, Err(Error::Timeout { .. })), "{first:?}");

    let second = tokio::spawn({
        let controller = controller.clone();
        async move { controller.get_average_monitoring(&node("a")).await }
    });
    assert_eq!(sm.command(WAIT).await, Outbound::GetAverageMonitoring);
    sm.send(Inbound::AverageMonitoring(monitoring(1, 0))); // late: the first call's
    sm.send(Inbound::AverageMonitoring(monitoring(2, 0))); // the second call's own
    let second = second
        .await
        .unwrap()
        .expect("the second call gets its own reply");
    assert_eq!(second.node.ram, 2);
}

/// Item 2, check and set: a late check reply of version 2 does not answer a later set of
/// version 2, and the set's own answer (a failure) reaches the set.
#[tokio::test(start_paused = true)]
async fn r_sync_3_a_late_check_reply_does_not_answer_a_set_of_the_same_version() {
    let (controller, _recorder) = controller(Settings::default());
    let mut sm = Sm::register(&controller, "a", "s1");
    registered(&controller, "a").await;
    let config = NodeConfig::new("2", "main");
    let a = node("a");
    let (check, command) =
        tokio::join!(controller.check_node_config(&a, &config), sm.command(WAIT));
    assert!(matches!(command, Outbound::CheckNodeConfig(_)));
    assert!(matches!(check, Err(Error::Timeout { .. })), "{check:?}");

    let set = tokio::spawn({
        let controller = controller.clone();
        let config = config.clone();
        async move { controller.update_node_config(&node("a"), &config).await }
    });
    assert!(matches!(sm.command(WAIT).await, Outbound::SetNodeConfig(_)));
    sm.send(config_status("2", false)); // the check's, late
    sm.send(config_status("2", true)); // the set's: it failed
    let set = set.await.unwrap();
    assert!(
        matches!(set, Err(Error::Failed { aos_code: 1, .. })),
        "{set:?}"
    );
}

/// The real SM sends nothing for a check whose config it cannot parse: its version shows the
/// next reply is not the check's, so the status read after it gets its own answer.
#[tokio::test(start_paused = true)]
async fn r_sync_3_an_unanswered_check_does_not_shift_the_next_reply() {
    let (controller, _recorder) = controller(Settings::default());
    let mut sm = Sm::register(&controller, "a", "s1");
    registered(&controller, "a").await;
    let check = tokio::spawn({
        let controller = controller.clone();
        async move {
            controller
                .check_node_config(&node("a"), &NodeConfig::new("3", "main"))
                .await
        }
    });
    assert!(matches!(
        sm.command(WAIT).await,
        Outbound::CheckNodeConfig(_)
    ));
    let get = tokio::spawn({
        let controller = controller.clone();
        async move { controller.get_node_config_status(&node("a")).await }
    });
    assert_eq!(sm.command(WAIT).await, Outbound::GetNodeConfigStatus);
    sm.send(config_status("1", false));
    let status = get.await.unwrap().expect("the status read is answered");
    assert_eq!(status.version, "1");
    let check = check.await.unwrap();
    assert!(matches!(check, Err(Error::Timeout { .. })), "{check:?}");
}

/// Item 3: a receiver that panics loses that event only: later telemetry is delivered, the
/// disconnect is reported, and the node leaves the registry (R-REC-1).
#[tokio::test]
async fn r_rec_1_a_panicking_receiver_does_not_stop_the_node() {
    let (controller, recorder) = controller(Settings::default());
    let mut sm = Sm::register(&controller, "a", "s1");
    sm.monitoring(1000, PANIC);
    sm.monitoring(1001, 0);
    recorder
        .wait_for("telemetry after the panic", WAIT, |e| {
            e.contains(&Ev::Monitoring("a".into(), 1001))
        })
        .await;
    sm.close();
    recorder
        .wait_for("the disconnect", WAIT, |e| {
            matches!(e.last(), Some(Ev::Disconnected(..)))
        })
        .await;
    let events = recorder.of("a");
    assert_alternation(&events);
    assert!(!events.contains(&Ev::Monitoring("a".into(), 1000)));
    assert_eq!(controller.node_slots(), 0);
}

/// Item 3, in the connect itself: the panic is contained, sm_info and telemetry still flow.
#[tokio::test]
async fn r_rec_1_a_panic_in_on_node_connected_is_contained() {
    let (controller, recorder) = controller(Settings::default());
    recorder.panic_on_connect("a");
    let mut sm = Sm::register(&controller, "a", "s1");
    sm.monitoring(1000, 0);
    sm.close();
    recorder
        .wait_for("the disconnect", WAIT, |e| {
            matches!(e.last(), Some(Ev::Disconnected(..)))
        })
        .await;
    assert_eq!(
        recorder.of("a")[..2],
        [
            Ev::SmInfo("a".into(), "s1".into()),
            Ev::Monitoring("a".into(), 1000)
        ]
    );
}

/// Item 4: shutdown while a replacement waits for the old stream's slow receiver: the old
/// stream's disconnect is reported, and the new stream, never reported connected, is not
/// reported at all.
#[tokio::test]
async fn r_reg_5_shutdown_during_a_replacement_keeps_the_alternation() {
    let (controller, recorder) = controller(Settings::default());
    let old = Sm::register(&controller, "a", "s1");
    old.monitoring(1000, SLOW);
    recorder
        .wait_for("the old stream's connect", WAIT, |e| e.len() >= 2)
        .await;
    let _new = Sm::register(&controller, "a", "s2");
    taken_over(&controller, "a").await;
    let stop = tokio::spawn({
        let controller = controller.clone();
        async move { controller.shutdown().await }
    });
    recorder.release();
    tokio::time::timeout(WAIT, stop).await.unwrap().unwrap();
    let events = recorder.of("a");
    assert_alternation(&events);
    assert_eq!(events.first(), Some(&Ev::Connected("a".into())));
    assert!(
        matches!(events.last(), Some(Ev::Disconnected(..))),
        "{events:#?}"
    );
    assert_eq!(
        events
            .iter()
            .filter(|e| matches!(e, Ev::Connected(_)))
            .count(),
        1,
        "{events:#?}"
    );
    assert_eq!(controller.node_slots(), 0);
}

/// Item 5: streams that end at once, registered or not, some of them ended before `attach`
/// even returns, leave nothing behind: no slot, no task, no entry in the eviction order of
/// unregistered streams (N-LEAK-1; N-LEAK-2: such entries of streams that had left, kept up to
/// twice `maxPendingStreams`, were what the churn bench's heap profile found growing).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn n_leak_1_streams_that_end_at_once_leave_nothing_behind() {
    // 20,000 streams at once: beyond the default node and pending-stream budgets, which are
    // not what this test is about.
    let (controller, recorder) = controller(Settings {
        max_nodes: usize::MAX,
        max_pending_streams: usize::MAX,
        ..Settings::default()
    });
    let mut sms = Vec::new();
    for i in 0..20_000 {
        let mut sm = match i % 4 {
            0 => Sm::attach(&controller),
            1 => Sm::register(&controller, &format!("n{i}"), "s1"),
            _ => Sm::attach_ended(&controller),
        };
        sm.close();
        sms.push(sm);
    }
    for sm in &mut sms {
        sm.closed(WAIT).await;
    }
    recorder
        .wait_for("every disconnect", WAIT, |e| {
            e.iter()
                .filter(|e| matches!(e, Ev::Disconnected(..)))
                .count()
                == 5_000
        })
        .await;
    tokio::time::timeout(WAIT, async {
        while controller.node_slots() != 0
            || controller.live_tasks() != 0
            || controller.waiting_streams() != 0
        {
            tokio::task::yield_now().await;
        }
    })
    .await
    .unwrap_or_else(|_| {
        panic!(
            "left behind: {} slots, {} tasks, {} waiting streams",
            controller.node_slots(),
            controller.live_tasks(),
            controller.waiting_streams()
        )
    });
    assert_eq!(controller.pending_streams(), 0);
    // What the daemon's memory return watches: every stream counted in, and out.
    assert_eq!(controller.streams_attached(), 20_000);
    assert_eq!(controller.streams_ended(), 20_000);
}

/// Item 6: a node registering while the cloud status flips is left with the last status set.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn r_cloud_1_a_registration_during_a_status_change_ends_with_the_last_status() {
    for round in 0..50 {
        let (controller, _recorder) = controller(Settings::default());
        let flipper = tokio::spawn({
            let controller = controller.clone();
            async move {
                for i in 0..50 {
                    controller.set_cloud_connected(i % 2 == 0);
                    tokio::task::yield_now().await;
                }
                controller.set_cloud_connected(round % 2 == 0);
            }
        });
        let mut sms: Vec<Sm> = (0..20)
            .map(|i| Sm::register(&controller, &format!("n{i}"), "s1"))
            .collect();
        flipper.await.unwrap();
        tokio::time::timeout(WAIT, async {
            while controller.node_count() != 20 {
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("all register");
        controller.set_cloud_connected(round % 2 == 0);
        for sm in &mut sms {
            let told = sm.cloud_statuses();
            assert_eq!(
                told.last(),
                Some(&(round % 2 == 0)),
                "round {round}: {told:?}"
            );
        }
        controller.shutdown().await;
    }
}

/// A stream's one stop signal is a child of the controller's shutdown (so the reader polls one
/// token per message): at a shutdown, a stream still waiting for `sm_info` is told the
/// controller is stopping, not that it was evicted, and a registered node's stream ends as a
/// shutdown (Unavailable; *disconnected* says so), not as a replacement.
#[tokio::test]
async fn r_reg_4_a_shutdown_is_told_as_a_shutdown_to_waiting_and_registered_streams() {
    let (controller, recorder) = controller(Settings::default());
    let mut waiting = Sm::attach(&controller);
    let mut node = Sm::register(&controller, "a", "s1");
    registered(&controller, "a").await;
    recorder
        .wait_for("the node's connect", WAIT, |e| e.len() >= 2)
        .await;
    tokio::time::timeout(WAIT, controller.shutdown())
        .await
        .expect("the controller stops");

    let end = waiting.end_status(WAIT).await.expect("a status");
    assert_eq!(
        end.code,
        smcontroller_routing::EndCode::Unavailable,
        "{end:?}"
    );
    assert!(end.message.contains("stopping"), "{end:?}");
    let end = node.end_status(WAIT).await.expect("a status");
    assert_eq!(
        end.code,
        smcontroller_routing::EndCode::Unavailable,
        "{end:?}"
    );
    assert!(!end.message.contains("replaced"), "{end:?}");
    assert_eq!(
        recorder.of("a").last(),
        Some(&Ev::Disconnected(
            "a".into(),
            smcontroller_api::DisconnectReason::Shutdown.to_string()
        ))
    );
}

/// Each call times out at its own deadline, counted from when it was sent, on the stream's one
/// call timer: a later call does not move an earlier one's, and a call made after the timer
/// was left unset (no caller waiting for longer than the timeout) sets it again (R-SYNC-1).
#[tokio::test(start_paused = true)]
async fn r_sync_1_calls_time_out_at_their_own_deadlines_on_the_one_timer_of_the_stream() {
    let timeout = Settings::default().response_timeout;
    let (controller, _recorder) = controller(Settings::default());
    let mut sm = Sm::register(&controller, "a", "s1");
    registered(&controller, "a").await;
    let call = |after: Duration| {
        let controller = controller.clone();
        tokio::spawn(async move {
            tokio::time::sleep(after).await;
            let sent = tokio::time::Instant::now();
            let result = controller.get_average_monitoring(&node("a")).await;
            (result, sent.elapsed())
        })
    };
    let first = call(Duration::ZERO);
    let second = call(Duration::from_secs(2));
    for _ in 0..2 {
        assert_eq!(sm.command(WAIT).await, Outbound::GetAverageMonitoring);
    }
    for call in [first, second] {
        let (result, took) = tokio::time::timeout(WAIT, call)
            .await
            .expect("the call ends")
            .unwrap();
        assert!(matches!(result, Err(Error::Timeout { .. })), "{result:?}");
        assert_eq!(took, timeout, "timed out after {took:?}, not {timeout:?}");
    }

    // Idle for longer than the timeout: the timer is unset. A new call sets it again.
    tokio::time::sleep(timeout * 3).await;
    let third = call(Duration::ZERO);
    assert_eq!(sm.command(WAIT).await, Outbound::GetAverageMonitoring);
    let (result, took) = tokio::time::timeout(WAIT, third)
        .await
        .expect("the call made after the timer was unset ends too")
        .unwrap();
    assert!(matches!(result, Err(Error::Timeout { .. })), "{result:?}");
    assert_eq!(took, timeout);
}

/// A stream paused because its receivers are behind (R-TEL-2) still times its calls out on
/// time: the reader waiting for room in the queue keeps the call timer running.
#[tokio::test(start_paused = true)]
async fn r_sync_1_a_call_times_out_on_time_while_its_stream_is_paused_for_the_receivers() {
    let settings = Settings {
        queue_bound: 2,
        ..Settings::default()
    };
    let timeout = settings.response_timeout;
    let (controller, recorder) = controller(settings);
    let mut sm = Sm::register(&controller, "a", "s1");
    registered(&controller, "a").await;
    // The first sample blocks its receiver, the next two fill the queue, the fourth waits.
    sm.monitoring(1000, SLOW);
    for i in 1..4 {
        sm.monitoring(1000 + i, 0);
    }
    support::until_stalled(&controller, "a", WAIT, "the stream pauses").await;
    let a = node("a");
    let sent = tokio::time::Instant::now();
    let call = tokio::time::timeout(WAIT, controller.get_average_monitoring(&a));
    let (result, command) = tokio::join!(call, sm.command(WAIT));
    let result = result.expect("the call ends while the stream is paused");
    assert_eq!(command, Outbound::GetAverageMonitoring);
    assert!(matches!(result, Err(Error::Timeout { .. })), "{result:?}");
    assert_eq!(sent.elapsed(), timeout);
    assert!(
        controller.node_status(&node("a")).unwrap().stalled,
        "still paused: the timeout did not wait for the receivers"
    );
    recorder.release();
}

/// A stream that always has a message ready (here, replies nobody waits for, which are
/// dropped without queueing) does not hold off its callers' timeouts: the reader looks at its
/// call timer before the stream. Real clock: a paused one would not move while the reader is
/// never idle.
#[tokio::test]
async fn r_sync_1_a_stream_that_never_pauses_does_not_hold_off_the_timeouts() {
    use futures::StreamExt;
    use smcontroller_routing::InboundEvent;

    let timeout = Duration::from_millis(200);
    let (controller, _recorder) = controller(Settings {
        response_timeout: timeout,
        ..Settings::default()
    });
    let registration = InboundEvent::Message {
        message: Inbound::SmInfo(support::sm_info("a", "s1")),
        wire_size: 64,
    };
    // Bounded: at about a microsecond each, far more than the reader gets through in WAIT.
    let flood = futures::stream::iter(0..50_000_000u64).map(|i| InboundEvent::Message {
        message: config_status(&i.to_string(), false),
        wire_size: 64,
    });
    let _commands = controller
        .attach(futures::stream::iter([registration]).chain(flood))
        .expect("controller is running");
    registered(&controller, "a").await;
    let sent = std::time::Instant::now();
    let result = tokio::time::timeout(WAIT, controller.get_average_monitoring(&node("a")))
        .await
        .expect("the call times out, although the stream is never idle");
    assert!(matches!(result, Err(Error::Timeout { .. })), "{result:?}");
    assert!(sent.elapsed() >= timeout);
    controller.shutdown().await;
}
