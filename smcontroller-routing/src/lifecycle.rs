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
        Arc, Mutex, MutexGuard, OnceLock, PoisonError, RwLock,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, SystemTime},
};

use futures::task::AtomicWaker;
use smcontroller_api::NodeId;
use smcontroller_limits::{Budget, Refusals};
use tokio::{
    sync::{Notify, oneshot, watch},
    time::Instant,
};
use tokio_util::sync::CancellationToken;

use crate::{
    message::{EndCode, EndStatus, Outbound, Outgoing},
    waiters::{Answer, Delivery, Reply, ReplyKind, Waiters},
};

/// [`Link::waiting`]: the stream holds a place among the unregistered streams.
pub(crate) const WAITING: u8 = 0;
/// [`Link::waiting`]: the stream gave its place back (it registered or ended).
pub(crate) const LEFT: u8 = 1;
/// [`Link::waiting`]: the stream's place went to a newer stream; it must end.
pub(crate) const EVICTED: u8 = 2;

/// The stream has been closed: nothing more can be sent on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Closed;

/// Why a command was not queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SendError {
    /// The stream has been closed.
    Closed,
    /// The node's backlog is full: it does not read its commands (R-BAD-2).
    Backlog {
        /// Commands queued.
        commands: usize,
        /// Their bytes.
        bytes: usize,
    },
}

impl From<Closed> for SendError {
    fn from(Closed: Closed) -> Self {
        Self::Closed
    }
}

/// How much may wait to be written to one node (R-BAD-2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Backlog {
    pub(crate) commands: usize,
    pub(crate) bytes: usize,
}

/// The inbound queue's depth as the reader sees it: messages and bytes.
pub(crate) type DepthProbe = Box<dyn Fn() -> (usize, usize) + Send + Sync>;

/// One SM stream's handle: what callers send through, and what the registry points at.
pub(crate) struct Link {
    pub(crate) session: u64,
    /// Woken when an item is queued for the transport to write.
    writer: Notify,
    /// Everything a send must see at once: a command and its reply entry go in one step, so
    /// the entries are in the order the commands are written (R-SYNC-3).
    state: Mutex<LinkState>,
    /// Cancelled when the stream must end from our side: a newer stream replaced it, the
    /// server restarts (see [`Link::ending`]), or the controller stops. A child of the
    /// controller's shutdown token, so the reader waits on this one token per message rather
    /// than two: each token polled takes two locks, and the shutdown token's are shared by
    /// every stream.
    pub(crate) replaced: CancellationToken,
    /// Set when the end is a server restart rather than a replacement.
    restart: AtomicBool,
    /// Set when the stream is ended because the SM does not read its commands.
    stalled_out: AtomicBool,
    /// Where the stream is with its place among the unregistered streams: [`WAITING`],
    /// [`LEFT`] (registered or ended) or [`EVICTED`] (its place given to a newer stream).
    pub(crate) waiting: std::sync::atomic::AtomicU8,
    /// Times the reader found the inbound queue full and paused the stream (R-TEL-2).
    pub(crate) stalls: AtomicU64,
    /// Whether the reader is waiting for room in the queue right now.
    pub(crate) stalled: AtomicBool,
    backlog: Backlog,
    refusals: Refusals,
    /// When the stream registered.
    pub(crate) registered_at: OnceLock<SystemTime>,
    /// When the link was made: the zero of `last_message_ns`.
    made: Instant,
    /// When the last message was read, in nanoseconds since `made`, plus one (0: none yet).
    last_message_ns: AtomicU64,
    /// The inbound queue's depth, once the stream has registered.
    pub(crate) inbound_depth: OnceLock<DepthProbe>,
    /// Whether the reader's call timer is wanted: set by the sync call that finds it unset,
    /// cleared (under the state lock) by the reader when no caller is left waiting. See
    /// [`Link::time_out_calls`].
    calls_timed: AtomicBool,
    /// The reader, woken when the call timer is wanted again.
    pub(crate) call_timer: AtomicWaker,
}

/// One item for the transport: with its size, and for a sync command its reply entry.
struct Queued {
    item: Outgoing,
    size: usize,
    waiter: Option<u64>,
}

struct LinkState {
    /// No more commands: the stream is closed or being replaced.
    closed: bool,
    /// `Close` has been queued to the transport.
    close_sent: bool,
    /// What the transport has still to write, in order, with each command's size. A
    /// `VecDeque` rather than a channel: it takes memory only for what is queued (a channel
    /// allocates a block per stream).
    out: VecDeque<Queued>,
    /// Commands in `out`, and their bytes (R-BAD-2).
    out_commands: usize,
    out_bytes: usize,
    /// The transport took `Close`: nothing more comes.
    close_taken: bool,
    /// The transport dropped its [`Commands`]: nothing queued will be written.
    writer_gone: bool,
    /// The cloud status last queued to this SM.
    cloud_sent: Option<bool>,
    waiters: Waiters,
}

impl Link {
    pub(crate) fn new(
        session: u64,
        response_timeout: Duration,
        reply_expiry: Duration,
        backlog: Backlog,
        refusals: Refusals,
        shutdown: &CancellationToken,
    ) -> Self {
        Self {
            session,
            writer: Notify::new(),
            state: Mutex::new(LinkState {
                closed: false,
                close_sent: false,
                out: VecDeque::new(),
                out_commands: 0,
                out_bytes: 0,
                close_taken: false,
                writer_gone: false,
                cloud_sent: None,
                waiters: Waiters::new(reply_expiry, response_timeout),
            }),
            replaced: shutdown.child_token(),
            restart: AtomicBool::new(false),
            stalled_out: AtomicBool::new(false),
            waiting: std::sync::atomic::AtomicU8::new(WAITING),
            stalls: AtomicU64::new(0),
            stalled: AtomicBool::new(false),
            backlog,
            refusals,
            registered_at: OnceLock::new(),
            made: Instant::now(),
            last_message_ns: AtomicU64::new(0),
            inbound_depth: OnceLock::new(),
            calls_timed: AtomicBool::new(false),
            call_timer: AtomicWaker::new(),
        }
    }

    /// Gives the stream's place among the unregistered streams back; `false` if it was
    /// evicted (its place already went to a newer stream).
    pub(crate) fn leave_waiting(&self) -> bool {
        self.waiting
            .compare_exchange(WAITING, LEFT, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }

    /// Takes the stream's place among the unregistered streams for a newer one, if it still
    /// waits; it then ends (its registration wait is woken).
    pub(crate) fn evict(&self) -> bool {
        let evicted = self
            .waiting
            .compare_exchange(WAITING, EVICTED, Ordering::AcqRel, Ordering::Acquire)
            .is_ok();
        if evicted {
            self.replaced.cancel();
        }
        evicted
    }

    /// Notes that a message was read at `now`: on the monotonic clock the reader reads once
    /// per message anyway (for the reply matching), turned into wall-clock time only when
    /// asked for.
    pub(crate) fn touch(&self, now: Instant) {
        let nanos = u64::try_from(now.saturating_duration_since(self.made).as_nanos())
            .unwrap_or(u64::MAX - 1);
        self.last_message_ns.store(nanos + 1, Ordering::Relaxed);
    }

    /// When the last message was read, by the wall clock as it reads now.
    pub(crate) fn last_message_at(&self) -> Option<SystemTime> {
        let nanos = match self.last_message_ns.load(Ordering::Relaxed) {
            0 => return None,
            nanos => nanos,
        };
        let at = self.made + Duration::from_nanos(nanos - 1);
        let ago = Instant::now().saturating_duration_since(at);
        let wall = SystemTime::now();
        Some(wall.checked_sub(ago).unwrap_or(wall))
    }

    /// Commands waiting to be written, and their bytes.
    pub(crate) fn backlog(&self) -> (usize, usize) {
        let state = self.state();
        (state.out_commands, state.out_bytes)
    }

    fn state(&self) -> MutexGuard<'_, LinkState> {
        lock(&self.state)
    }

    /// Queues an item for the transport (under the state lock, so items keep their order).
    fn push(&self, state: &mut LinkState, item: Outgoing, size: usize) -> Result<(), Closed> {
        self.push_for(state, item, size, None)
    }

    fn push_for(
        &self,
        state: &mut LinkState,
        item: Outgoing,
        size: usize,
        waiter: Option<u64>,
    ) -> Result<(), Closed> {
        if state.writer_gone {
            return Err(Closed);
        }
        if matches!(item, Outgoing::Command(_)) {
            state.out_commands += 1;
            state.out_bytes = state.out_bytes.saturating_add(size);
        }
        state.out.push_back(Queued { item, size, waiter });
        self.writer.notify_one();
        Ok(())
    }

    /// Tells the sync callers whose deadline has passed at `now` that they timed out, and
    /// returns the earliest deadline of those still waiting: the reader runs this on its one
    /// timer per stream. The command of a caller that timed out is taken back if the transport
    /// has not taken it yet: an SM that reads again does not get a burst of commands nobody
    /// waits for.
    ///
    /// With no caller left waiting the timer is no longer wanted (`None`); the next sync call
    /// wakes the reader to set it again. While it is set, a new call needs no word: its
    /// deadline is after the one the timer is set to.
    pub(crate) fn time_out_calls(&self, now: Instant) -> Option<Instant> {
        let mut guard = self.state();
        let state = &mut *guard;
        let (out, out_commands, out_bytes) = (
            &mut state.out,
            &mut state.out_commands,
            &mut state.out_bytes,
        );
        let next = state.waiters.time_out(now, |waiter| {
            let Some(pos) = out.iter().position(|q| q.waiter == Some(waiter)) else {
                return false;
            };
            if let Some(queued) = out.remove(pos) {
                *out_commands -= 1;
                *out_bytes -= queued.size;
            }
            true
        });
        if next.is_none() {
            self.calls_timed.store(false, Ordering::Release);
        }
        next
    }

    /// Whether a sync call wants the reader's call timer set.
    pub(crate) fn calls_timed(&self) -> bool {
        self.calls_timed.load(Ordering::Acquire)
    }

    /// Whether one more command of `size` bytes fits the backlog; counts the refusal if not.
    fn room(&self, state: &LinkState, size: usize) -> Result<(), SendError> {
        let full = state.out_commands >= self.backlog.commands
            || (state.out_commands > 0
                && state.out_bytes.saturating_add(size) > self.backlog.bytes);
        if full {
            self.refusals.count(Budget::OutboundBacklog);
            return Err(SendError::Backlog {
                commands: state.out_commands,
                bytes: state.out_bytes,
            });
        }
        Ok(())
    }

    /// Queues a command of `size` bytes (as encoded) to the SM, in call order (R-ASYNC-1).
    pub(crate) fn send(&self, command: Outbound, size: usize) -> Result<(), SendError> {
        let mut state = self.state();
        if state.closed {
            return Err(SendError::Closed);
        }
        self.room(&state, size)?;
        Ok(self.push(&mut state, Outgoing::Command(command), size)?)
    }

    /// Queues a sync command and the entry its reply will be matched to, in one step. Returns
    /// where the answer will come (the reply, or word of the timeout), and when the command
    /// was queued.
    pub(crate) fn send_sync(
        &self,
        command: Outbound,
        size: usize,
        kind: ReplyKind,
    ) -> Result<(oneshot::Receiver<Answer>, Instant), SendError> {
        let mut state = self.state();
        if state.closed {
            return Err(SendError::Closed);
        }
        self.room(&state, size)?;
        let now = Instant::now();
        let (id, rx) = state.waiters.push(kind, now).ok_or(Closed)?;
        if self
            .push_for(&mut state, Outgoing::Command(command), size, Some(id))
            .is_err()
        {
            state.waiters.pop_unsent();
            return Err(SendError::Closed);
        }
        // Under the state lock, so that it cannot pass the reader finding no caller waiting.
        if !self.calls_timed.swap(true, Ordering::AcqRel) {
            self.call_timer.wake();
        }
        Ok((rx, now))
    }

    /// Hands a reply read from the stream at `now` to the command it answers.
    pub(crate) fn deliver(&self, reply: Reply, now: Instant) -> Delivery {
        self.state().waiters.deliver(reply, now)
    }

    /// Queues `connection_status` unless the SM was already told this state. A node whose
    /// backlog is full is not reading its stream: it cannot be told, and its stream is ended as
    /// a stalled node (R-BAD-2), so it reconnects and learns the state at registration.
    pub(crate) fn send_cloud(&self, connected: bool) {
        let mut state = self.state();
        if state.closed || state.cloud_sent == Some(connected) {
            return;
        }
        if let Err(SendError::Backlog { commands, bytes }) = self.room(&state, 0) {
            Self::stop(&mut state);
            state.close_sent = true;
            let end = EndStatus {
                code: EndCode::ResourceExhausted,
                message: format!(
                    "the SM does not read its stream: {commands} commands ({bytes} bytes) \
                     wait to be written; closed as a stalled node"
                ),
            };
            let _ = self.push(&mut state, Outgoing::Close(Some(end)), 0);
            drop(state);
            self.stalled_out.store(true, Ordering::Release);
            self.replaced.cancel();
            return;
        }
        let status = Outgoing::Command(Outbound::ConnectionStatus(connected));
        if self.push(&mut state, status, 0).is_ok() {
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
        if self.stalled_out.load(Ordering::Acquire) {
            smcontroller_api::DisconnectReason::Error(
                "stalled: the SM does not read its commands (outbound backlog full)".into(),
            )
        } else if self.restart.load(Ordering::Acquire) {
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
            let _ = self.push(&mut state, Outgoing::Close(status), 0);
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

/// Capacity a drained outgoing queue keeps: none. Commands are rare next to telemetry (a sync
/// call, an update now and then), so a fresh buffer per burst costs little, and an idle node
/// does not hold one (288 bytes per node at 1,000 nodes, N-PERF-3).
const KEEP: usize = 0;

impl Commands {
    pub(crate) fn new(link: Arc<Link>) -> Self {
        Self { link }
    }

    /// The next item to write; `None` once `Close` has been taken.
    pub async fn recv(&mut self) -> Option<Outgoing> {
        loop {
            // Registered before the check: a wake between the check and the wait is kept.
            let queued = self.link.writer.notified();
            match self.take_or_end() {
                Ok(item) => return Some(item),
                Err(true) => return None,
                Err(false) => queued.await,
            }
        }
    }

    /// The next item if one is queued now.
    pub fn try_recv(&mut self) -> Option<Outgoing> {
        self.take()
    }

    fn take(&self) -> Option<Outgoing> {
        self.take_or_end().ok()
    }

    /// The next item, or, if none is queued, whether `Close` was already taken (under one lock
    /// of the state: this runs for every command written).
    fn take_or_end(&self) -> Result<Outgoing, bool> {
        let mut state = self.link.state();
        let Some(Queued { item, size, .. }) = state.out.pop_front() else {
            return Err(state.close_taken);
        };
        match &item {
            Outgoing::Close(_) => state.close_taken = true,
            Outgoing::Command(command) => {
                state.out_commands -= 1;
                state.out_bytes -= size;
                crate::meters::message_out(command);
            }
        }
        if state.out.is_empty() && state.out.capacity() > KEEP {
            state.out.shrink_to(KEEP);
        }
        Ok(item)
    }
}

impl Drop for Commands {
    fn drop(&mut self) {
        let mut state = self.link.state();
        state.writer_gone = true;
        state.out.clear();
        state.out_commands = 0;
        state.out_bytes = 0;
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

/// The node limit is reached: a new node id cannot register (R-BAD-2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct NodeLimit(pub(crate) usize);

/// The registry: node id to slot, plus the cloud status that every registered node is told.
pub(crate) struct Registry {
    slots: RwLock<HashMap<NodeId, Slot>>,
    /// Slots with a current link: the registered nodes (kept under the `slots` write lock).
    registered: AtomicU64,
    max_nodes: usize,
    /// Orders cloud status changes against each other and against registrations.
    cloud: Mutex<bool>,
}

impl Registry {
    /// An empty registry taking at most `max_nodes` registered nodes.
    pub(crate) fn new(max_nodes: usize) -> Self {
        Self {
            slots: RwLock::default(),
            registered: AtomicU64::new(0),
            max_nodes,
            cloud: Mutex::default(),
        }
    }

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
        usize::try_from(self.registered.load(Ordering::Acquire)).unwrap_or(usize::MAX)
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
    ///
    /// A new node id beyond the node limit is refused (R-BAD-2); a node replacing its own
    /// stream is always taken.
    pub(crate) fn register(
        self: &Arc<Self>,
        node: &NodeId,
        link: &Arc<Link>,
    ) -> Result<(Registration, SessionEnd), NodeLimit> {
        let (end_tx, end_rx) = watch::channel(());
        let cloud = lock(&self.cloud);
        let mut slots = write(&self.slots);
        let known = slots.get(node).is_some_and(|s| s.current.is_some());
        if !known && self.node_count() >= self.max_nodes {
            return Err(NodeLimit(self.max_nodes));
        }
        let registration = match slots.get_mut(node) {
            Some(slot) => {
                let old = slot.current.replace(link.clone());
                match &old {
                    Some(old) => old.replace(),
                    None => {
                        self.registered.fetch_add(1, Ordering::AcqRel);
                    }
                }
                slot.sessions += 1;
                Registration {
                    predecessor: Some(std::mem::replace(&mut slot.last_end, end_rx)),
                    replaced: old.is_some(),
                }
            }
            None => {
                self.registered.fetch_add(1, Ordering::AcqRel);
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
        Ok((registration, end))
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
            self.registered.fetch_sub(1, Ordering::AcqRel);
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

#[cfg(test)]
mod tests {
    use super::*;

    fn link() -> Link {
        Link::new(
            0,
            Duration::from_secs(5),
            Duration::from_secs(10),
            Backlog {
                commands: 8,
                bytes: 1 << 20,
            },
            Refusals::new(),
            &CancellationToken::new(),
        )
    }

    #[test]
    fn the_last_message_time_is_none_until_a_message_is_read() {
        assert_eq!(link().last_message_at(), None);
    }

    #[tokio::test]
    async fn the_last_message_time_is_the_wall_clock_time_it_was_read() {
        let link = link();
        let before = SystemTime::now();
        link.touch(Instant::now());
        let after = SystemTime::now();
        let at = link.last_message_at().expect("a message was read");
        // The conversion from the monotonic clock may round by a few microseconds.
        let slack = Duration::from_millis(5);
        assert!(
            at + slack >= before && at <= after + slack,
            "{at:?} not in {before:?}..{after:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn the_last_message_time_stays_put_as_the_clock_moves_on() {
        let link = link();
        link.touch(Instant::now());
        let first = link.last_message_at().unwrap();
        tokio::time::advance(Duration::from_secs(30)).await;
        // Read 30 s later (on the paused clock), it is 30 s in the past; the wall clock has
        // hardly moved meanwhile.
        let last = link.last_message_at().unwrap();
        let ago = SystemTime::now().duration_since(last).expect("in the past");
        assert!(
            ago >= Duration::from_secs(30) && ago < Duration::from_secs(31),
            "{ago:?}"
        );
        assert!(first > last);
    }
}
