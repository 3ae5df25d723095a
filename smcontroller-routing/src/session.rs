//! One SM stream: its reader task and, once the SM has registered, its dispatcher task.
//!
//! The reader takes what the transport hands over. It registers the node on `sm_info`, matches
//! sync replies to their commands on the spot (R-TEL-2), and queues everything else to the
//! dispatcher through a bounded queue. When the queue is full the reader waits, so the stream is
//! not read and HTTP/2 flow control slows the SM down: nothing is dropped (R-TEL-3); each such
//! stall is logged and counted.
//!
//! The dispatcher hands the queued messages to the receivers in the order the SM sent them
//! (R-TEL-1), framed by *connected* and *disconnected*. It reports *connected* only once the
//! node id's previous session has finished (see `lifecycle`), and every receiver call is
//! contained: a receiver that panics loses that one event, logged, and nothing else (R-REC-1).

use std::{
    any::Any,
    future::Future,
    panic::AssertUnwindSafe,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    task::Poll,
    time::{Duration, SystemTime},
};

use futures::{FutureExt, Stream, StreamExt};
use smcontroller_api::{DisconnectReason, InstanceEnvVarsStatus, NodeId, SmInfo, SmMessageKind};
use smcontroller_limits::{Budget, Refusals, WarnGate, clip};
use tokio::{
    sync::{oneshot, watch},
    time::{Instant, Sleep},
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::{Instrument, debug, error, info, info_span, warn};

use crate::{
    Receivers,
    lifecycle::{Link, Registry, SessionEnd},
    message::{EndCode, EndStatus, Inbound, InboundEvent},
    meters,
    queue::{self, TrySendError},
    waiters::{Delivery, Reply},
};

/// What every session of one controller shares.
pub(crate) struct Context {
    pub(crate) registry: Arc<Registry>,
    pub(crate) receivers: Receivers,
    pub(crate) registration_timeout: Duration,
    pub(crate) queue_bound: usize,
    pub(crate) queue_bytes: usize,
    /// The budgets reached, for this controller and its transport (R-BAD-2).
    pub(crate) refusals: Refusals,
    /// Streams attached that have not registered (or ended) yet.
    pub(crate) pending: AtomicUsize,
    /// Those streams by session id, so oldest first: the oldest is evicted when a new stream
    /// finds the budget full. A stream's entry goes when it registers or ends (a `Weak` left
    /// behind would hold the stream's whole `Link` allocation: N-LEAK-2).
    pub(crate) waiting: std::sync::Mutex<std::collections::BTreeMap<u64, std::sync::Weak<Link>>>,
    /// Rate limit of the warnings about streams refused before they registered: such streams
    /// have no node id to limit by, and anyone can open them.
    pub(crate) refused_early: WarnGate,
    /// Cancelled when the controller stops: streams end, queued telemetry is dropped.
    pub(crate) shutdown: CancellationToken,
    /// Cancelled when the shutdown grace has run out: every task still running is cut.
    pub(crate) cut: CancellationToken,
    pub(crate) tracker: TaskTracker,
    /// Streams whose reader has ended, however it ended: with the session ids given out,
    /// what tells the daemon that streams came and went (`Controller::streams_ended`).
    pub(crate) ended: AtomicU64,
}

impl Context {
    /// Spawns a task of the controller: tracked for shutdown, and cut when the grace runs out.
    /// Nothing per task is kept beyond the task itself.
    pub(crate) fn spawn(&self, task: impl Future<Output = ()> + Send + 'static) {
        // The task is boxed: moved into the `select!` below, an unboxed future would be held
        // twice in the spawned one (the captured value and the select's copy), 6.8 KB for a
        // reader of 3.4 KB, per node (N-PERF-3 memory).
        let task = Box::pin(task);
        let cut = self.cut.clone();
        self.tracker.spawn(async move {
            tokio::select! {
                biased;
                () = cut.cancelled() => {}
                () = task => {}
            }
        });
    }
}

/// A message for the receivers: everything an SM sends but `sm_info` at registration and the
/// sync replies, which the reader matches itself.
enum Telemetry {
    SmInfo(SmInfo),
    UpdateInstancesStatus(Vec<smcontroller_api::InstanceStatus>),
    NodeInstancesStatus(Vec<smcontroller_api::InstanceStatus>),
    Log(smcontroller_api::LogPart),
    InstantMonitoring(smcontroller_api::NodeMonitoringData),
    Alert(smcontroller_api::Alert),
}

/// What the reader does with one message.
enum Read {
    Reply(Reply),
    Telemetry(Telemetry),
}

impl From<Inbound> for Read {
    fn from(message: Inbound) -> Self {
        match message {
            Inbound::NodeConfigStatus(status) => Self::Reply(Reply::NodeConfig(status)),
            Inbound::AverageMonitoring(data) => Self::Reply(Reply::AverageMonitoring(data)),
            Inbound::SmInfo(info) => Self::Telemetry(Telemetry::SmInfo(info)),
            Inbound::UpdateInstancesStatus(s) => {
                Self::Telemetry(Telemetry::UpdateInstancesStatus(s))
            }
            Inbound::NodeInstancesStatus(s) => Self::Telemetry(Telemetry::NodeInstancesStatus(s)),
            Inbound::Log(part) => Self::Telemetry(Telemetry::Log(part)),
            Inbound::InstantMonitoring(data) => Self::Telemetry(Telemetry::InstantMonitoring(data)),
            Inbound::Alert(alert) => Self::Telemetry(Telemetry::Alert(alert)),
        }
    }
}

/// The reader task of one stream; it spawns the dispatcher once the SM registers.
pub(crate) async fn run<S>(ctx: Arc<Context>, link: Arc<Link>, inbound: S)
where
    S: Stream<Item = InboundEvent> + Send + Unpin + 'static,
{
    let span = info_span!(
        "sm_stream",
        session = link.session,
        node_id = tracing::field::Empty
    );
    // However the reader ends (also when it is cut at shutdown), the transport is told and
    // the end is counted.
    let _ended = CountEnd(ctx.clone());
    let _closer = CloseOnDrop(link.clone());
    read(ctx, link, inbound).instrument(span).await;
}

/// Counts a stream's end when its reader goes, also when the reader is cut.
struct CountEnd(Arc<Context>);

impl Drop for CountEnd {
    fn drop(&mut self) {
        self.0.ended.fetch_add(1, Ordering::Relaxed);
    }
}

/// Holds one of the pending-stream places (`max_pending_streams`) until the stream registers
/// or ends. An evicted stream's place already went to a newer stream: it is not given back.
struct Pending<'a>(Option<(&'a Context, &'a Link)>);

impl Pending<'_> {
    /// Gives the place back; `false` if the stream was evicted.
    fn release(&mut self) -> bool {
        match self.0.take() {
            Some((ctx, link)) => {
                let left = link.leave_waiting();
                if left {
                    ctx.pending.fetch_sub(1, Ordering::AcqRel);
                }
                // An evicted stream's entry was taken by the eviction; this finds none.
                ctx.waiting
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .remove(&link.session);
                left
            }
            None => true,
        }
    }
}

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        self.release();
    }
}

/// Ends the stream for the transport if the reader did not (it was cut at shutdown).
struct CloseOnDrop(Arc<Link>);

impl Drop for CloseOnDrop {
    fn drop(&mut self) {
        self.0.close(Some(EndStatus {
            code: EndCode::Unavailable,
            message: "the SM controller is stopping or restarting its server; reconnect".into(),
        }));
    }
}

async fn read<S>(ctx: Arc<Context>, link: Arc<Link>, mut inbound: S)
where
    S: Stream<Item = InboundEvent> + Send + Unpin + 'static,
{
    let mut pending = Pending(Some((&ctx, &link)));
    let info = match registration(&ctx, &link, &mut inbound).await {
        Ok(info) => info,
        Err(end) => {
            if let Some(end) = &end
                && let Some(gate) = ctx.refused_early.admit()
            {
                warn!(reason = %clip(&end.message), suppressed = gate.suppressed,
                    "SM stream refused before registration");
            }
            link.close(end);
            return;
        }
    };
    let node = info.node_id.clone();
    tracing::Span::current().record("node_id", tracing::field::display(&node));
    meters::message_in(SmMessageKind::SmInfo);

    if !pending.release() {
        // Evicted just as its sm_info came: it already gave its place away.
        link.close(Some(evicted()));
        return;
    }
    let registered = ctx.registry.register(&node, &link);
    let (registration, session_end) = match registered {
        Ok(registered) => registered,
        Err(limit) => {
            ctx.refusals.count(Budget::Nodes);
            if let Some(gate) = ctx.refused_early.admit() {
                warn!(
                    max_nodes = limit.0,
                    suppressed = gate.suppressed,
                    "SM stream refused: node limit reached"
                );
            }
            link.close(Some(EndStatus {
                code: EndCode::ResourceExhausted,
                message: format!(
                    "node limit reached: {} nodes are registered (maxNodes); node {} refused",
                    limit.0, node
                ),
            }));
            return;
        }
    };
    let _ = link.registered_at.set(SystemTime::now());
    link.touch(Instant::now());
    metrics::counter!("smcontroller_registrations_total").increment(1);
    if registration.replaced {
        info!("a new stream replaces the node's older one");
    }
    info!(runtimes = info.runtimes.len(), "node registered");

    let (queue, queued) = queue::bounded(ctx.queue_bound, ctx.queue_bytes);
    let queue = Arc::new(queue);
    let probe = Arc::downgrade(&queue);
    let _ = link.inbound_depth.set(Box::new(move || {
        probe.upgrade().map_or((0, 0), |queue| queue.depth())
    }));
    // Warnings this node's stream causes (rejected messages, unwanted replies, stalls) are
    // rate-limited; what was suppressed is said when the stream ends.
    let warnings = WarnGate::default().on_drop(|suppressed| {
        warn!(
            suppressed,
            "similar warnings of this stream were suppressed"
        );
    });
    let (reason_tx, reason_rx) = oneshot::channel();
    ctx.spawn(
        dispatch(
            ctx.clone(),
            info,
            queued,
            registration.predecessor,
            reason_rx,
            session_end,
        )
        .in_current_span(),
    );

    // Made once per stream, not per message. `replaced` is a child of the shutdown token, so it
    // also fires when the controller stops; `stopped` tells which end it was.
    let replaced = link.replaced.cancelled();
    tokio::pin!(replaced);
    let stopped = || {
        if ctx.shutdown.is_cancelled() {
            DisconnectReason::Shutdown
        } else {
            link.ending()
        }
    };
    let mut timer = CallTimer::default();
    let reason = loop {
        // Each message counts against the task's cooperative budget: a stream whose messages
        // are all buffered (a flood of small or rejected ones) would otherwise hold its worker
        // thread until its flow-control window is drained, and the other nodes' replies would
        // wait behind it (R-BAD-2).
        tokio::task::consume_budget().await;
        let event = tokio::select! {
            biased;
            () = &mut replaced => break stopped(),
            // Before the stream: a stream that always has a message ready must not hold off
            // its callers' timeouts.
            () = timer.due(&link) => {
                timer.run(&link);
                continue;
            }
            event = inbound.next() => event,
        };
        let (message, wire_size) = match event {
            None => break DisconnectReason::Closed,
            Some(InboundEvent::Failed(error)) => break DisconnectReason::Error(error),
            Some(InboundEvent::Denied(why)) => break DisconnectReason::ProtocolViolation(why),
            Some(InboundEvent::Rejected { message, reason }) => {
                if let Some(gate) = warnings.admit() {
                    warn!(message, reason = %clip(&reason), suppressed = gate.suppressed,
                        "message from SM rejected and skipped");
                }
                continue;
            }
            Some(InboundEvent::Message { message, wire_size }) => (message, wire_size),
        };
        // One clock read per message, for its time and the reply matching's expiry.
        let now = Instant::now();
        link.touch(now);
        meters::message_in(message.kind());
        if let Inbound::SmInfo(info) = &message
            && info.node_id != node
        {
            break DisconnectReason::ProtocolViolation(format!(
                "sm_info changed the node id from {node:?} to {:?} on one stream",
                info.node_id.as_str()
            ));
        }
        let telemetry = match Read::from(message) {
            Read::Reply(reply) => {
                match link.deliver(reply, now) {
                    Delivery::Answered => {}
                    Delivery::Absorbed(after) => {
                        metrics::counter!("smcontroller_replies_dropped_total").increment(1);
                        info!(?after, "late reply to a call that gave up; dropped");
                    }
                    Delivery::Unwanted(reply) => {
                        metrics::counter!("smcontroller_replies_dropped_total").increment(1);
                        if let Some(gate) = warnings.admit() {
                            warn!(
                                reply = reply.name(),
                                suppressed = gate.suppressed,
                                "reply nobody waits for; dropped"
                            );
                        }
                    }
                }
                continue;
            }
            Read::Telemetry(telemetry) => telemetry,
        };
        // Lossless backpressure: while the queue is full the stream is not read.
        let telemetry = match queue.try_send(telemetry, wire_size) {
            Ok(()) => continue,
            Err(TrySendError::Closed) => {
                break DisconnectReason::Error("dispatcher stopped".into());
            }
            Err(TrySendError::Full(telemetry)) => telemetry,
        };
        let stalls = link.stalls.fetch_add(1, Ordering::Relaxed) + 1;
        link.stalled.store(true, Ordering::Relaxed);
        ctx.refusals.count(Budget::InboundQueue);
        if let Some(gate) = warnings.admit() {
            let (messages, bytes) = queue.depth();
            warn!(
                stalls,
                messages,
                bytes,
                bound = ctx.queue_bound,
                byte_bound = ctx.queue_bytes,
                suppressed = gate.suppressed,
                "receivers are behind: inbound queue full, stream paused"
            );
        }
        let send = queue.send(telemetry, wire_size);
        tokio::pin!(send);
        let queued = loop {
            tokio::select! {
                biased;
                () = &mut replaced => break None,
                () = timer.due(&link) => timer.run(&link),
                queued = &mut send => break Some(queued),
            }
        };
        let Some(queued) = queued else {
            break stopped();
        };
        link.stalled.store(false, Ordering::Relaxed);
        if queued.is_err() {
            break DisconnectReason::Error("dispatcher stopped".into());
        }
    };

    ctx.registry.leave(&node, &link);
    let status = end_status(&node, &reason);
    metrics::counter!("smcontroller_disconnects_total", "reason" => reason_label(&reason))
        .increment(1);
    info!(reason = %clip(&reason.to_string()), "node stream ended");
    drop(warnings);
    link.close(status);
    drop(inbound);
    let _ = reason_tx.send(reason);
}

/// The reader's one timer for its stream's sync calls (R-SYNC-1): set to the earliest deadline
/// of the callers waiting, and only while one is. A call arms no timer of its own; it wakes
/// the reader only when the timer is not set (see [`Link::time_out_calls`]).
#[derive(Default)]
struct CallTimer {
    /// Boxed, and only while set: an idle node holds none (N-PERF-3 memory).
    sleep: Option<Pin<Box<Sleep>>>,
}

impl CallTimer {
    /// Resolves when [`run`](Self::run) is due: the timer has fired, or, unset, a call wants it.
    fn due<'a>(&'a mut self, link: &'a Link) -> impl Future<Output = ()> + 'a {
        std::future::poll_fn(move |cx| {
            if let Some(sleep) = &mut self.sleep {
                return sleep.as_mut().poll(cx);
            }
            link.call_timer.register(cx.waker());
            if link.calls_timed() {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        })
    }

    /// Times out the callers whose deadline has passed, and sets the timer to the next one.
    fn run(&mut self, link: &Link) {
        match (link.time_out_calls(Instant::now()), &mut self.sleep) {
            (None, sleep) => *sleep = None,
            (Some(next), Some(sleep)) => sleep.as_mut().reset(next),
            (Some(next), sleep) => *sleep = Some(Box::pin(tokio::time::sleep_until(next))),
        }
    }
}

/// The status of a stream evicted from the unregistered ones (R-BAD-2).
fn evicted() -> EndStatus {
    EndStatus {
        code: EndCode::ResourceExhausted,
        message: "too many SM streams waiting to register (maxPendingStreams): this one, \
                  the oldest without sm_info, gave its place to a newer stream"
            .into(),
    }
}

/// The `reason` label of `smcontroller_disconnects_total`.
fn reason_label(reason: &DisconnectReason) -> &'static str {
    match reason {
        DisconnectReason::Closed => "closed",
        DisconnectReason::Error(_) => "error",
        DisconnectReason::Replaced => "replaced",
        DisconnectReason::ProtocolViolation(_) => "protocol_violation",
        DisconnectReason::Shutdown => "shutdown",
    }
}

/// The status the transport ends the response with, for the end we caused.
fn end_status(node: &NodeId, reason: &DisconnectReason) -> Option<EndStatus> {
    match reason {
        DisconnectReason::Closed => None,
        // Ended from our side for not reading (the link queued its own status); a transport
        // failure has its own status too.
        DisconnectReason::Error(_) => None,
        DisconnectReason::Replaced => Some(EndStatus {
            code: EndCode::Aborted,
            message: format!("replaced by a newer stream of node {node}"),
        }),
        DisconnectReason::ProtocolViolation(why) => Some(EndStatus {
            code: EndCode::InvalidArgument,
            message: why.clone(),
        }),
        DisconnectReason::Shutdown => Some(EndStatus {
            code: EndCode::Unavailable,
            message: "the SM controller is stopping or restarting its server; reconnect".into(),
        }),
    }
}

/// Waits for the first message: it must be `sm_info` with a node id (R-REG-2). `Err(None)`:
/// the stream ended quietly; `Err(Some(..))`: end it with that status.
async fn registration<S>(
    ctx: &Context,
    link: &Link,
    inbound: &mut S,
) -> Result<SmInfo, Option<EndStatus>>
where
    S: Stream<Item = InboundEvent> + Unpin,
{
    let timeout = ctx.registration_timeout;
    let first = tokio::select! {
        // A child of the shutdown token: it fires when the controller stops, too.
        () = link.replaced.cancelled() => {
            if ctx.shutdown.is_cancelled() {
                return Err(Some(EndStatus {
                    code: EndCode::Unavailable,
                    message: "the SM controller is stopping".into(),
                }));
            }
            return Err(Some(evicted()));
        }
        first = tokio::time::timeout(timeout, inbound.next()) => first,
    };
    let invalid = |message: String| {
        Err(Some(EndStatus {
            code: EndCode::InvalidArgument,
            message,
        }))
    };
    match first {
        Err(_) => Err(Some(EndStatus {
            code: EndCode::DeadlineExceeded,
            message: format!("no sm_info within the registration timeout of {timeout:?}"),
        })),
        Ok(None) => Err(None),
        Ok(Some(InboundEvent::Failed(error))) => {
            debug!(%error, "stream failed before registration");
            Err(None)
        }
        Ok(Some(InboundEvent::Denied(why))) => Err(Some(EndStatus {
            code: EndCode::PermissionDenied,
            message: why,
        })),
        Ok(Some(InboundEvent::Message {
            message: Inbound::SmInfo(info),
            ..
        })) => {
            if info.node_id.as_str().is_empty() {
                invalid("sm_info.node_id is empty".into())
            } else {
                Ok(info)
            }
        }
        Ok(Some(InboundEvent::Message { message: other, .. })) => invalid(format!(
            "the first message must be sm_info, got {}",
            other.name()
        )),
        Ok(Some(InboundEvent::Rejected { message, reason })) => invalid(format!(
            "the first message must be a valid sm_info, got an invalid {message}: {reason}"
        )),
    }
}

/// The dispatcher task of one registered stream.
async fn dispatch(
    ctx: Arc<Context>,
    info: SmInfo,
    mut queued: queue::Receiver<Telemetry>,
    predecessor: Option<watch::Receiver<()>>,
    reason: oneshot::Receiver<DisconnectReason>,
    session_end: SessionEnd,
) {
    let node = info.node_id.clone();
    let receivers = &ctx.receivers;
    // The previous session of this node id reports *disconnected* first (R-REG-4, R-REG-5). No
    // short cut at shutdown: the predecessor ends then too (or is cut with every other task).
    if let Some(mut predecessor) = predecessor {
        // Only the sender's end (drop) wakes this; nothing is ever sent on it.
        let _ = predecessor.changed().await;
    }
    if ctx.shutdown.is_cancelled() {
        // Stopping before the receivers heard of this stream: they hear nothing of it.
        debug!("controller stopping before the node was reported connected");
        let _ = reason.await;
        drop(session_end);
        return;
    }
    contained(&node, "SmInfoReceiver::on_node_connected", async {
        receivers.sm_info.on_node_connected(&node).await;
    })
    .await;
    contained(&node, "SmInfoReceiver::on_sm_info_received", async {
        receivers.sm_info.on_sm_info_received(&info).await;
    })
    .await;
    drop(info);

    let shutdown = ctx.shutdown.cancelled();
    tokio::pin!(shutdown);
    loop {
        let message = tokio::select! {
            biased;
            () = &mut shutdown => {
                let dropped = queued.len();
                if dropped != 0 {
                    warn!(dropped, "stopping: queued messages not delivered");
                }
                break;
            }
            message = queued.recv() => match message {
                Some(message) => message,
                None => break,
            },
        };
        deliver(receivers, &node, message).await;
    }
    drop(queued);

    let reason = reason.await.unwrap_or(DisconnectReason::Shutdown);
    contained(&node, "SmInfoReceiver::on_node_disconnected", async {
        receivers.sm_info.on_node_disconnected(&node, &reason).await;
    })
    .await;
    drop(session_end);
}

/// Runs one receiver call; a panic in it is logged with the node and the receiver, and the
/// session goes on (R-REC-1).
async fn contained(node: &NodeId, receiver: &'static str, call: impl Future<Output = ()>) {
    if let Err(panic) = AssertUnwindSafe(call).catch_unwind().await {
        error!(
            node_id = %node,
            receiver,
            panic = panic_message(panic.as_ref()),
            "receiver panicked; its event is lost, the stream goes on"
        );
    }
}

fn panic_message(panic: &(dyn Any + Send)) -> &str {
    if let Some(text) = panic.downcast_ref::<&'static str>() {
        text
    } else if let Some(text) = panic.downcast_ref::<String>() {
        text
    } else {
        "(not a string)"
    }
}

async fn deliver(receivers: &Receivers, node: &NodeId, message: Telemetry) {
    match message {
        Telemetry::SmInfo(info) => {
            contained(node, "SmInfoReceiver::on_sm_info_received", async {
                receivers.sm_info.on_sm_info_received(&info).await;
            })
            .await;
        }
        Telemetry::UpdateInstancesStatus(statuses) => {
            for status in &statuses {
                contained(
                    node,
                    "InstanceStatusReceiver::on_instance_status_received",
                    async {
                        receivers
                            .instance_status
                            .on_instance_status_received(node, status)
                            .await;
                    },
                )
                .await;
            }
            let env_vars: Vec<InstanceEnvVarsStatus> = statuses
                .into_iter()
                .filter(|s| !s.env_vars.is_empty())
                .map(|s| InstanceEnvVarsStatus {
                    ident: s.ident,
                    statuses: s.env_vars,
                })
                .collect();
            if !env_vars.is_empty() {
                contained(node, "EnvVarsStatusSender::send_env_vars_statuses", async {
                    receivers
                        .env_vars
                        .send_env_vars_statuses(node, &env_vars)
                        .await;
                })
                .await;
            }
        }
        Telemetry::NodeInstancesStatus(statuses) => {
            contained(
                node,
                "InstanceStatusReceiver::on_node_instances_statuses_received",
                async {
                    receivers
                        .instance_status
                        .on_node_instances_statuses_received(node, &statuses)
                        .await;
                },
            )
            .await;
        }
        Telemetry::Log(mut part) => {
            part.node_id = node.clone();
            contained(node, "LogSender::send_log", async {
                receivers.logs.send_log(&part).await;
            })
            .await;
        }
        Telemetry::InstantMonitoring(data) => {
            contained(node, "MonitoringReceiver::on_monitoring_received", async {
                receivers
                    .monitoring
                    .on_monitoring_received(node, &data)
                    .await;
            })
            .await;
        }
        Telemetry::Alert(alert) => {
            contained(node, "AlertsReceiver::on_alert_received", async {
                receivers.alerts.on_alert_received(node, &alert).await;
            })
            .await;
        }
    }
}
