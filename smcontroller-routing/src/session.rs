//! One SM stream: its link in the registry, its reader task and its dispatcher task.
//!
//! The reader takes what the transport hands over: it registers the node on `sm_info`, matches
//! sync replies to their callers on the spot (R-TEL-2), and queues everything else to the
//! dispatcher through a bounded queue. When the queue is full the reader waits, so the stream
//! is no longer read and HTTP/2 flow control slows the SM down: nothing is dropped (R-TEL-3).
//! The dispatcher hands the queued messages to the receivers in the order the SM sent them
//! (R-TEL-1), framed by *connected* and *disconnected* (R-REG-3, R-REG-4, R-DISC-1).

use std::sync::{
    Arc, Mutex,
    atomic::{AtomicBool, Ordering},
};

use futures::{Stream, StreamExt};
use smcontroller_api::{DisconnectReason, InstanceEnvVarsStatus, NodeId, SmInfo};
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::{
    controller::{EndCode, EndStatus, Inner, Outgoing, lock, write},
    message::{Inbound, InboundEvent, Outbound},
    waiters::{Reply, ReplyKind, Waiters},
};

/// One stream's handle: what the registry holds and callers send through.
pub(crate) struct Link {
    pub(crate) session: u64,
    out: mpsc::UnboundedSender<Outgoing>,
    closed: AtomicBool,
    /// The cloud status last queued to this SM.
    cloud_sent: Mutex<Option<bool>>,
    waiters: Mutex<Waiters>,
    /// Cancelled when a newer stream of the same node replaces this one.
    replaced: CancellationToken,
    /// Set once the dispatcher has reported *disconnected*: the successor waits for it.
    dispatched_all: watch::Sender<bool>,
}

impl Link {
    pub(crate) fn new(session: u64, out: mpsc::UnboundedSender<Outgoing>) -> Self {
        Self {
            session,
            out,
            closed: AtomicBool::new(false),
            cloud_sent: Mutex::new(None),
            waiters: Mutex::new(Waiters::default()),
            replaced: CancellationToken::new(),
            dispatched_all: watch::Sender::new(false),
        }
    }

    /// Queues a command to the SM, in call order (R-ASYNC-1). `Err` once the stream is closed.
    pub(crate) fn send(&self, command: Outbound) -> Result<(), ()> {
        if self.closed.load(Ordering::Acquire) {
            return Err(());
        }
        self.out.send(Outgoing::Command(command)).map_err(drop)
    }

    /// Queues `connection_status` unless the SM was already told this state.
    pub(crate) fn send_cloud(&self, connected: bool) {
        let mut sent = lock(&self.cloud_sent);
        if *sent != Some(connected) && self.send(Outbound::ConnectionStatus(connected)).is_ok() {
            *sent = Some(connected);
        }
    }

    /// Registers a caller waiting for a reply of `kind`; `None` once the stream is closed.
    pub(crate) fn wait_for(&self, kind: ReplyKind) -> Option<Waiter<'_>> {
        let (id, rx) = lock(&self.waiters).push(kind)?;
        Some(Waiter { link: self, id, rx })
    }

    /// Ends the stream: later sends fail, waiters fail with `Disconnected` at once, and the
    /// transport is told to finish the response.
    fn close(&self, status: Option<EndStatus>) {
        self.closed.store(true, Ordering::Release);
        lock(&self.waiters).close();
        let _ = self.out.send(Outgoing::Close(status));
    }

    /// A newer stream took this node id: stop reading, fail the waiters now.
    fn replace(&self) {
        lock(&self.waiters).close();
        self.replaced.cancel();
    }
}

/// A caller's place among a link's waiters; leaves it when dropped.
pub(crate) struct Waiter<'a> {
    link: &'a Link,
    id: u64,
    pub(crate) rx: oneshot::Receiver<Reply>,
}

impl Waiter<'_> {
    /// Leaves the queue now (the caller gave up).
    pub(crate) fn forget(&mut self) {
        lock(&self.link.waiters).remove(self.id);
    }
}

impl Drop for Waiter<'_> {
    fn drop(&mut self) {
        self.forget();
    }
}

/// The reader task of one stream (its dispatcher is spawned once the SM registers).
pub(crate) async fn run<S>(inner: Arc<Inner>, link: Arc<Link>, inbound: S)
where
    S: Stream<Item = InboundEvent> + Send + Unpin + 'static,
{
    let span = info_span!(
        "sm_stream",
        session = link.session,
        node_id = tracing::field::Empty
    );
    read(inner.clone(), link.clone(), inbound)
        .instrument(span)
        .await;
}

async fn read<S>(inner: Arc<Inner>, link: Arc<Link>, mut inbound: S)
where
    S: Stream<Item = InboundEvent> + Send + Unpin + 'static,
{
    let info = match registration(&inner, &mut inbound).await {
        Ok(info) => info,
        Err(end) => {
            if let Some(end) = &end {
                warn!(reason = %end.message, "SM stream refused before registration");
            }
            link.close(end);
            inner.untrack(link.session);
            return;
        }
    };
    let node = info.node_id.clone();
    tracing::Span::current().record("node_id", tracing::field::display(&node));

    // Register, displacing an older stream of the same node (R-REG-4).
    let predecessor = write(&inner.nodes).insert(node.clone(), link.clone());
    let predecessor = predecessor.map(|old| {
        info!("a new stream replaces the node's older one");
        old.replace();
        old.dispatched_all.subscribe()
    });
    link.send_cloud(inner.cloud.load(Ordering::SeqCst));
    info!(runtimes = info.runtimes.len(), "node registered");

    let (queue, queued) = mpsc::channel(inner.settings.queue_bound.max(1));
    let (reason_tx, reason_rx) = oneshot::channel();
    let dispatcher = inner.tracker_spawn(
        dispatch(
            inner.clone(),
            link.clone(),
            info,
            queued,
            predecessor,
            reason_rx,
        )
        .in_current_span(),
    );
    inner.track(link.session, dispatcher);

    // Made once per stream, not per message: every stream shares the shutdown token, so a fresh
    // `cancelled()` per message would contend on its lock.
    let shutdown = inner.shutdown.cancelled();
    let replaced = link.replaced.cancelled();
    tokio::pin!(shutdown, replaced);
    let reason = loop {
        let event = tokio::select! {
            biased;
            () = &mut shutdown => break DisconnectReason::Shutdown,
            () = &mut replaced => break DisconnectReason::Replaced,
            event = inbound.next() => event,
        };
        let message = match event {
            None => break DisconnectReason::Closed,
            Some(InboundEvent::Failed(error)) => break DisconnectReason::Error(error),
            Some(InboundEvent::Rejected { message, reason }) => {
                warn!(message, %reason, "message from SM rejected and skipped");
                continue;
            }
            Some(InboundEvent::Message(message)) => message,
        };
        let message = match message {
            Inbound::NodeConfigStatus(status) => {
                reply(&link, Reply::NodeConfig(status));
                continue;
            }
            Inbound::AverageMonitoring(data) => {
                reply(&link, Reply::AverageMonitoring(data));
                continue;
            }
            Inbound::SmInfo(info) if info.node_id != node => {
                break DisconnectReason::ProtocolViolation(format!(
                    "sm_info changed the node id from {node:?} to {:?} on one stream",
                    info.node_id.as_str()
                ));
            }
            other => other,
        };
        // Lossless backpressure: while the queue is full the stream is not read.
        let queued = tokio::select! {
            biased;
            () = &mut shutdown => break DisconnectReason::Shutdown,
            () = &mut replaced => break DisconnectReason::Replaced,
            queued = queue.send(message) => queued,
        };
        if queued.is_err() {
            break DisconnectReason::Error("dispatcher stopped".into());
        }
    };

    // Leave the registry, unless a newer stream of this node already took the place.
    {
        let mut nodes = write(&inner.nodes);
        if nodes.get(&node).is_some_and(|l| Arc::ptr_eq(l, &link)) {
            nodes.remove(&node);
        }
    }
    let status = match &reason {
        DisconnectReason::Closed | DisconnectReason::Error(_) => None,
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
            message: "the SM controller is stopping".into(),
        }),
    };
    info!(%reason, "node stream ended");
    link.close(status);
    drop(inbound);
    let _ = reason_tx.send(reason);
}

/// Waits for the first message: it must be `sm_info` with a node id (R-REG-2). `Err(None)`:
/// the stream ended quietly; `Err(Some(..))`: end it with that status.
async fn registration<S>(inner: &Inner, inbound: &mut S) -> Result<SmInfo, Option<EndStatus>>
where
    S: Stream<Item = InboundEvent> + Unpin,
{
    let timeout = inner.settings.registration_timeout;
    let first = tokio::select! {
        () = inner.shutdown.cancelled() => {
            return Err(Some(EndStatus {
                code: EndCode::Unavailable,
                message: "the SM controller is stopping".into(),
            }));
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
        Ok(Some(InboundEvent::Message(Inbound::SmInfo(info)))) => {
            if info.node_id.as_str().is_empty() {
                invalid("sm_info.node_id is empty".into())
            } else {
                Ok(info)
            }
        }
        Ok(Some(InboundEvent::Message(other))) => invalid(format!(
            "the first message must be sm_info, got {}",
            other.name()
        )),
        Ok(Some(InboundEvent::Rejected { message, reason })) => invalid(format!(
            "the first message must be a valid sm_info, got an invalid {message}: {reason}"
        )),
    }
}

fn reply(link: &Link, reply: Reply) {
    if let Err(unwanted) = lock(&link.waiters).deliver(reply) {
        warn!(reply = ?unwanted, "reply nobody waits for; dropped");
    }
}

/// The dispatcher task of one registered stream.
async fn dispatch(
    inner: Arc<Inner>,
    link: Arc<Link>,
    info: SmInfo,
    mut queued: mpsc::Receiver<Inbound>,
    predecessor: Option<watch::Receiver<bool>>,
    reason: oneshot::Receiver<DisconnectReason>,
) {
    let node = info.node_id.clone();
    let receivers = &inner.receivers;
    // Connected and disconnected alternate per node id: the older stream's disconnect is
    // reported before this one's connect (R-REG-4).
    if let Some(mut predecessor) = predecessor {
        tokio::select! {
            () = inner.shutdown.cancelled() => {}
            _ = predecessor.wait_for(|done| *done) => {}
        }
    }
    receivers.sm_info.on_node_connected(&node).await;
    receivers.sm_info.on_sm_info_received(&info).await;

    let shutdown = inner.shutdown.cancelled();
    tokio::pin!(shutdown);
    loop {
        let message = tokio::select! {
            biased;
            () = &mut shutdown => {
                if !queued.is_empty() {
                    warn!(dropped = queued.len(), "stopping: queued messages not delivered");
                }
                break;
            }
            message = queued.recv() => match message {
                Some(message) => message,
                None => break,
            },
        };
        deliver(&inner, &node, message).await;
    }

    let reason = reason.await.unwrap_or(DisconnectReason::Shutdown);
    receivers.sm_info.on_node_disconnected(&node, &reason).await;
    link.dispatched_all.send_replace(true);
    inner.untrack(link.session);
}

async fn deliver(inner: &Inner, node: &NodeId, message: Inbound) {
    let receivers = &inner.receivers;
    match message {
        Inbound::SmInfo(info) => receivers.sm_info.on_sm_info_received(&info).await,
        Inbound::UpdateInstancesStatus(statuses) => {
            for status in &statuses {
                receivers
                    .instance_status
                    .on_instance_status_received(node, status)
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
                receivers
                    .env_vars
                    .send_env_vars_statuses(node, &env_vars)
                    .await;
            }
        }
        Inbound::NodeInstancesStatus(statuses) => {
            receivers
                .instance_status
                .on_node_instances_statuses_received(node, &statuses)
                .await;
        }
        Inbound::Log(mut part) => {
            part.node_id = node.clone();
            receivers.logs.send_log(&part).await;
        }
        Inbound::InstantMonitoring(data) => {
            receivers
                .monitoring
                .on_monitoring_received(node, &data)
                .await;
        }
        Inbound::Alert(alert) => receivers.alerts.on_alert_received(node, &alert).await,
        Inbound::NodeConfigStatus(_) | Inbound::AverageMonitoring(_) => {
            debug!("sync reply reached the dispatcher; replies are matched by the reader");
        }
    }
}
