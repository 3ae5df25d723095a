//! Events of a simulation ([`SimEvent`]) and their delivery to tests ([`SimEvents`]).
//!
//! Events are built only while someone listens: the hot path checks an atomic listener count,
//! never the broadcast channel's lock, so benchmarks without listeners pay nothing.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use smcontroller_grpc::proto::servicemanager::v5::{SmIncomingMessages, SmOutgoingMessages};
use smcontroller_grpc::proto::v91::servicemanager::v5::PendingFirewallUpdate;
use tokio::sync::broadcast;
use tokio::time::Instant;

use super::stats::NetworkCall;

/// Something that happened to a node, for tests that assert exactly what went over the wire.
#[derive(Clone, Debug)]
pub struct SimEvent {
    /// The node it happened to.
    pub node_id: Arc<str>,
    /// When it happened (Tokio's clock, so paused time in tests applies).
    pub at: Instant,
    /// What happened.
    pub kind: SimEventKind,
}

/// The kinds of [`SimEvent`].
#[derive(Clone, Debug)]
pub enum SimEventKind {
    /// A stream opened (the controller answered `RegisterSM`).
    Connected {
        /// Streams opened by this node so far, this one included.
        connects: u64,
    },
    /// A connection or `RegisterSM` attempt failed before a stream was open.
    ConnectFailed {
        /// Why.
        reason: String,
    },
    /// A message arrived from the controller (under 9.1 in the 9.0 envelope, as the node
    /// handles it: `InstanceInfo.monitoring_parameters` in its place, no network).
    Received(SmIncomingMessages),
    /// A message was handed to the stream.
    Sent(SmOutgoingMessages),
    /// An open stream ended.
    Disconnected {
        /// Why.
        reason: String,
    },
    /// A `NetworkService` call was answered or failed (9.1). For a subscription: when the
    /// call was answered (the stream opened) or failed.
    Network {
        /// Which call.
        call: NetworkCall,
        /// Why it failed (the call, or the `error` of its answer); `None` when it succeeded.
        error: Option<String>,
    },
    /// A firewall update arrived on the node's subscription (9.1); it replaced the rules of
    /// its instance, if the node has that instance's network.
    FirewallUpdate(PendingFirewallUpdate),
}

/// The broadcast of events with a lock-free count of its listeners.
#[derive(Debug)]
pub(crate) struct EventBus {
    tx: broadcast::Sender<SimEvent>,
    listeners: Arc<AtomicUsize>,
}

impl EventBus {
    pub(crate) fn new(capacity: usize) -> Self {
        let (tx, _) = broadcast::channel(capacity.max(1));
        Self {
            tx,
            listeners: Arc::new(AtomicUsize::new(0)),
        }
    }

    /// Someone listens (cheap: one relaxed load).
    pub(crate) fn active(&self) -> bool {
        self.listeners.load(Ordering::Relaxed) > 0
    }

    /// Sends an event if someone listens.
    pub(crate) fn emit(&self, node_id: &Arc<str>, kind: SimEventKind) {
        if self.active() {
            // Fails only when the last listener just left, which is fine.
            let _ = self.tx.send(SimEvent {
                node_id: node_id.clone(),
                at: Instant::now(),
                kind,
            });
        }
    }

    pub(crate) fn subscribe(&self) -> SimEvents {
        self.listeners.fetch_add(1, Ordering::Relaxed);
        SimEvents {
            rx: self.tx.subscribe(),
            listeners: self.listeners.clone(),
        }
    }
}

/// A receiver of the events of every node of a simulation.
///
/// A receiver that falls more than [`SimConfig::event_capacity`](super::SimConfig::event_capacity)
/// events behind loses the oldest ones (`RecvError::Lagged`).
#[derive(Debug)]
pub struct SimEvents {
    rx: broadcast::Receiver<SimEvent>,
    listeners: Arc<AtomicUsize>,
}

impl SimEvents {
    /// The next event; `Lagged(n)` after `n` were lost, `Closed` once the simulator is gone.
    pub async fn recv(&mut self) -> Result<SimEvent, broadcast::error::RecvError> {
        self.rx.recv().await
    }

    /// The next event if one is waiting.
    pub fn try_recv(&mut self) -> Result<SimEvent, broadcast::error::TryRecvError> {
        self.rx.try_recv()
    }
}

impl Drop for SimEvents {
    fn drop(&mut self) {
        self.listeners.fetch_sub(1, Ordering::Relaxed);
    }
}
