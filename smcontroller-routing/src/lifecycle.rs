//! Who owns a node id: the registry of node slots, and the link of each SM stream.
//!
//! A node id has one [`Slot`] for as long as any stream of it is still being handled, which is
//! longer than the id is addressable. The slot holds
//!
//! - the *current* link: the stream commands for the node go to, if any (R-ROUTE-1);
//! - the end of the newest session given this id: a session reports *connected* only once the
//!   session before it has reported *disconnected*. Sessions of one node id form a chain, each
//!   waiting for its predecessor, so for one node id connected and disconnected alternate and
//!   nothing of an older stream reaches a receiver after the newer one's *connected* (R-REG-4,
//!   R-REG-5), whether the older stream was replaced, ended by itself a moment before, or is
//!   still draining a slow receiver;
//! - how many sessions of the id have not finished: the slot leaves the map with the last one,
//!   so a stream of new ids cannot grow it without bound (N-LEAK-1).
//!
//! The lock order is: cloud status, then registry, then a link's state. Cloud status changes and
//! registrations both take the cloud lock, so a node registering while the status changes is
//! told the last status set (R-CLOUD-1).

use std::{
    collections::{HashMap, VecDeque},
    sync::{
        Arc, Mutex, MutexGuard, PoisonError, RwLock,
        atomic::{AtomicBool, AtomicU64},
    },
    time::Duration,
};

use smcontroller_api::NodeId;
use tokio::{
    sync::{Notify, oneshot, watch},
    time::Instant,
};
use tokio_util::sync::CancellationToken;

use crate::{
    message::{EndStatus, Outbound, Outgoing},
    waiters::{Delivery, Reply, ReplyKind, Waiters},
};

/// The stream has been closed: nothing more can be sent on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Closed;

/// One SM stream's handle: what callers send through, and what the registry points at.
pub(crate) struct Link {
    pub(crate) session: u64,
    /// Woken when an item is queued for the transport to write.
    writer: Notify,
    /// Everything a send must see at once: a command and its reply entry go in one step, so
    /// the entries are in the order the commands are written (R-SYNC-3).
    state: Mutex<LinkState>,
    /// Cancelled when the stream must end from our side: a newer stream replaced it, or the
    /// server restarts (see [`Link::ending`]).
    pub(crate) replaced: CancellationToken,
    /// Set when the end is a server restart rather than a replacement.
    restart: AtomicBool,
    /// Times the reader found the inbound queue full and paused the stream (R-TEL-2).
    pub(crate) stalls: AtomicU64,
    /// Whether the reader is waiting for room in the queue right now.
    pub(crate) stalled: AtomicBool,
}

struct LinkState {
    /// No more commands: the stream is closed or being replaced.
    closed: bool,
    /// `Close` has been queued to the transport.
    close_sent: bool,
    /// What the transport has still to write, in order. A `VecDeque` rather than a channel:
    /// it takes memory only for what is queued (a channel allocates a block per stream).
    out: VecDeque<Outgoing>,
    /// The transport took `Close`: nothing more comes.
    close_taken: bool,
    /// The transport dropped its [`Commands`]: nothing queued will be written.
    writer_gone: bool,
    /// The cloud status last queued to this SM.
    cloud_sent: Option<bool>,
    waiters: Waiters,
}

impl Link {
    pub(crate) fn new(session: u64, reply_expiry: Duration) -> Self {
        Self {
            session,
            writer: Notify::new(),
            state: Mutex::new(LinkState {
                closed: false,
                close_sent: false,
                out: VecDeque::new(),
                close_taken: false,
                writer_gone: false,
                cloud_sent: None,
                waiters: Waiters::new(reply_expiry),
            }),
            replaced: CancellationToken::new(),
            restart: AtomicBool::new(false),
            stalls: AtomicU64::new(0),
            stalled: AtomicBool::new(false),
        }
    }

    fn state(&self) -> MutexGuard<'_, LinkState> {
        lock(&self.state)
    }

    /// Queues an item for the transport (under the state lock, so items keep their order).
    fn push(&self, state: &mut LinkState, item: Outgoing) -> Result<(), Closed> {
        if state.writer_gone {
            return Err(Closed);
        }
        state.out.push_back(item);
        self.writer.notify_one();
        Ok(())
    }

    /// Queues a command to the SM, in call order (R-ASYNC-1).
    pub(crate) fn send(&self, command: Outbound) -> Result<(), Closed> {
        let mut state = self.state();
        if state.closed {
            return Err(Closed);
        }
        self.push(&mut state, Outgoing::Command(command))
    }

    /// Queues a sync command and the entry its reply will be matched to, in one step.
    pub(crate) fn send_sync(
        &self,
        command: Outbound,
        kind: ReplyKind,
    ) -> Result<oneshot::Receiver<Reply>, Closed> {
        let mut state = self.state();
        if state.closed {
            return Err(Closed);
        }
        let rx = state.waiters.push(kind, Instant::now()).ok_or(Closed)?;
        if self.push(&mut state, Outgoing::Command(command)).is_err() {
            state.waiters.pop_unsent();
            return Err(Closed);
        }
        Ok(rx)
    }

    /// Hands a reply read from the stream to the command it answers.
    pub(crate) fn deliver(&self, reply: Reply) -> Delivery {
        self.state().waiters.deliver(reply, Instant::now())
    }

    /// Queues `connection_status` unless the SM was already told this state.
    pub(crate) fn send_cloud(&self, connected: bool) {
        let mut state = self.state();
        if state.closed || state.cloud_sent == Some(connected) {
            return;
        }
        let status = Outgoing::Command(Outbound::ConnectionStatus(connected));
        if self.push(&mut state, status).is_ok() {
            state.cloud_sent = Some(connected);
        }
    }

    /// Stops taking commands and fails every waiting caller now (`Disconnected`).
    fn stop(state: &mut LinkState) {
        state.closed = true;
        state.waiters.close();
    }

    /// A newer stream took the node id: no more commands, callers fail now, the reader stops.
    pub(crate) fn replace(&self) {
        Self::stop(&mut self.state());
        self.replaced.cancel();
    }

    /// The server restarts (new credentials): no more commands, callers fail now, the reader
    /// ends the stream as at a shutdown, and the SM reconnects.
    pub(crate) fn restart(&self) {
        self.restart
            .store(true, std::sync::atomic::Ordering::Release);
        Self::stop(&mut self.state());
        self.replaced.cancel();
    }

    /// Why the stream was ended from our side.
    pub(crate) fn ending(&self) -> smcontroller_api::DisconnectReason {
        if self.restart.load(std::sync::atomic::Ordering::Acquire) {
            smcontroller_api::DisconnectReason::Shutdown
        } else {
            smcontroller_api::DisconnectReason::Replaced
        }
    }

    /// Ends the stream: no more commands, callers fail now, and the transport is told to finish
    /// the response (once) with `status`.
    pub(crate) fn close(&self, status: Option<EndStatus>) {
        let mut state = self.state();
        Self::stop(&mut state);
        if !state.close_sent {
            state.close_sent = true;
            let _ = self.push(&mut state, Outgoing::Close(status));
        }
    }
}

/// What a transport writes on one SM stream, in order, ending with one [`Outgoing::Close`];
/// returned by [`Controller::attach`](crate::Controller::attach). Dropping it tells the
/// controller that nothing more can be written: commands for the stream then fail.
pub struct Commands {
    link: Arc<Link>,
}

impl std::fmt::Debug for Commands {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Commands")
            .field("session", &self.link.session)
            .finish_non_exhaustive()
    }
}

/// Capacity a drained outgoing queue keeps.
const KEEP: usize = 4;

impl Commands {
    pub(crate) fn new(link: Arc<Link>) -> Self {
        Self { link }
    }

    /// The next item to write; `None` once `Close` has been taken.
    pub async fn recv(&mut self) -> Option<Outgoing> {
        loop {
            // Registered before the check: a wake between the check and the wait is kept.
            let queued = self.link.writer.notified();
            if let Some(item) = self.take() {
                return Some(item);
            }
            if self.link.state().close_taken {
                return None;
            }
            queued.await;
        }
    }

    /// The next item if one is queued now.
    pub fn try_recv(&mut self) -> Option<Outgoing> {
        self.take()
    }

    fn take(&self) -> Option<Outgoing> {
        let mut state = self.link.state();
        let item = state.out.pop_front()?;
        if matches!(item, Outgoing::Close(_)) {
            state.close_taken = true;
        }
        if state.out.is_empty() && state.out.capacity() > KEEP {
            state.out.shrink_to(KEEP);
        }
        Some(item)
    }
}

impl Drop for Commands {
    fn drop(&mut self) {
        let mut state = self.link.state();
        state.writer_gone = true;
        state.out.clear();
    }
}

/// One node id's place in the registry.
struct Slot {
    current: Option<Arc<Link>>,
    /// Closes when the newest session given this id has finished (reported *disconnected*, or
    /// decided it has nothing to report).
    last_end: watch::Receiver<()>,
    /// Sessions of this id that have not finished.
    sessions: usize,
}

/// What a registration found.
pub(crate) struct Registration {
    /// The session before this one: wait for its end before reporting *connected*.
    pub(crate) predecessor: Option<watch::Receiver<()>>,
    /// Whether a live stream of the node was displaced.
    pub(crate) replaced: bool,
}

/// Held by a session from its registration on; dropping it finishes the session: its slot is
/// released and its successor may report *connected*. Dropped also when the task is cut at
/// shutdown, so no slot outlives its sessions.
pub(crate) struct SessionEnd {
    registry: Arc<Registry>,
    node: NodeId,
    /// Dropped last: closing it is the successor's signal.
    end: Option<watch::Sender<()>>,
}

impl Drop for SessionEnd {
    fn drop(&mut self) {
        self.registry.finish(&self.node);
        drop(self.end.take());
    }
}

/// The registry: node id to slot, plus the cloud status that every registered node is told.
#[derive(Default)]
pub(crate) struct Registry {
    slots: RwLock<HashMap<NodeId, Slot>>,
    /// Orders cloud status changes against each other and against registrations.
    cloud: Mutex<bool>,
}

impl Registry {
    /// The link commands for `node` go to.
    pub(crate) fn link(&self, node: &NodeId) -> Option<Arc<Link>> {
        read(&self.slots).get(node)?.current.clone()
    }

    /// The links of `nodes` (all registered nodes when empty), or the nodes not registered.
    pub(crate) fn links(&self, nodes: &[NodeId]) -> Result<Vec<(NodeId, Arc<Link>)>, Vec<NodeId>> {
        let slots = read(&self.slots);
        if nodes.is_empty() {
            return Ok(slots
                .iter()
                .filter_map(|(n, s)| Some((n.clone(), s.current.clone()?)))
                .collect());
        }
        let mut found = Vec::with_capacity(nodes.len());
        let mut missing = Vec::new();
        for node in nodes {
            match slots.get(node).and_then(|s| s.current.clone()) {
                Some(link) => found.push((node.clone(), link)),
                None => missing.push(node.clone()),
            }
        }
        if missing.is_empty() {
            Ok(found)
        } else {
            Err(missing)
        }
    }

    /// The registered (addressable) nodes.
    pub(crate) fn nodes(&self) -> Vec<NodeId> {
        read(&self.slots)
            .iter()
            .filter(|(_, s)| s.current.is_some())
            .map(|(n, _)| n.clone())
            .collect()
    }

    /// How many nodes are registered (addressable).
    pub(crate) fn node_count(&self) -> usize {
        read(&self.slots)
            .values()
            .filter(|s| s.current.is_some())
            .count()
    }

    /// How many node ids have a slot (registered, or a session still finishing).
    pub(crate) fn slot_count(&self) -> usize {
        read(&self.slots).len()
    }

    /// The cloud status to tell a new stream first (R-REG-1).
    pub(crate) fn cloud_connected(&self) -> bool {
        *lock(&self.cloud)
    }

    /// Sets the cloud status and tells every registered node, under the cloud lock. Returns
    /// how many nodes were told.
    pub(crate) fn set_cloud(&self, connected: bool) -> usize {
        let mut cloud = lock(&self.cloud);
        *cloud = connected;
        let links: Vec<Arc<Link>> = read(&self.slots)
            .values()
            .filter_map(|s| s.current.clone())
            .collect();
        for link in &links {
            link.send_cloud(connected);
        }
        links.len()
    }

    /// Makes `link` the node's current stream. A live older stream is replaced (it stops taking
    /// commands and its callers fail now). The returned guard finishes the session when dropped.
    pub(crate) fn register(
        self: &Arc<Self>,
        node: &NodeId,
        link: &Arc<Link>,
    ) -> (Registration, SessionEnd) {
        let (end_tx, end_rx) = watch::channel(());
        let cloud = lock(&self.cloud);
        let mut slots = write(&self.slots);
        let registration = match slots.get_mut(node) {
            Some(slot) => {
                let old = slot.current.replace(link.clone());
                if let Some(old) = &old {
                    old.replace();
                }
                slot.sessions += 1;
                Registration {
                    predecessor: Some(std::mem::replace(&mut slot.last_end, end_rx)),
                    replaced: old.is_some(),
                }
            }
            None => {
                slots.insert(
                    node.clone(),
                    Slot {
                        current: Some(link.clone()),
                        last_end: end_rx,
                        sessions: 1,
                    },
                );
                Registration {
                    predecessor: None,
                    replaced: false,
                }
            }
        };
        // Under the cloud lock: a status change cannot slip between reading and sending.
        link.send_cloud(*cloud);
        drop(slots);
        drop(cloud);
        let end = SessionEnd {
            registry: self.clone(),
            node: node.clone(),
            end: Some(end_tx),
        };
        (registration, end)
    }

    /// Ends every registered stream for a server restart; returns how many.
    pub(crate) fn restart_all(&self) -> usize {
        let links: Vec<Arc<Link>> = read(&self.slots)
            .values()
            .filter_map(|s| s.current.clone())
            .collect();
        for link in &links {
            link.restart();
        }
        links.len()
    }

    /// The stream of `link` has ended: the node is no longer addressable through it.
    pub(crate) fn leave(&self, node: &NodeId, link: &Arc<Link>) {
        let mut slots = write(&self.slots);
        if let Some(slot) = slots.get_mut(node)
            && slot.current.as_ref().is_some_and(|c| Arc::ptr_eq(c, link))
        {
            slot.current = None;
        }
    }

    /// One session of `node` has finished; the slot goes with the last.
    fn finish(&self, node: &NodeId) {
        let mut slots = write(&self.slots);
        if let Some(slot) = slots.get_mut(node) {
            slot.sessions = slot.sessions.saturating_sub(1);
            if slot.sessions == 0 {
                slots.remove(node);
            }
        }
    }
}

pub(crate) fn read<T>(lock: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    lock.read().unwrap_or_else(PoisonError::into_inner)
}

pub(crate) fn write<T>(lock: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    lock.write().unwrap_or_else(PoisonError::into_inner)
}

pub(crate) fn lock<T>(lock: &Mutex<T>) -> MutexGuard<'_, T> {
    lock.lock().unwrap_or_else(PoisonError::into_inner)
}
