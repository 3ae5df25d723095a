//! What a peer of the SM port may make the controller spend (contract R-BAD-2, R-BAD-3).
//!
//! The SM port is reachable by anything on the unit's network. Every resource such a peer can
//! grow has a budget, set in the settings of the layer that owns it (the router's, the gRPC
//! server's, the TLS acceptor's). This crate holds what those layers share:
//!
//! - [`Budget`]: the name of each budget, as it appears in statuses, logs and the
//!   `smcontroller_budget_refusals_total{budget}` metric;
//! - [`Refusals`]: how often each budget was reached, for tests and operators (a cheap,
//!   clonable set of counters; every count also goes to the `metrics` facade);
//! - [`WarnGate`]: a rate limit for the warnings one connection or one node can cause, with the
//!   count of what was suppressed, under a process-wide ceiling;
//! - [`clip`]: a peer's string cut to a length fit for a log line.

use std::{
    borrow::Cow,
    fmt,
    sync::{
        Arc, Mutex, OnceLock,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

/// The budgets a peer (or a caller) can reach. Each has a setting with a documented default
/// in the layer that enforces it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[non_exhaustive]
pub enum Budget {
    /// Registered nodes (router `max_nodes`): an `sm_info` for a new node id beyond it ends its
    /// stream with `RESOURCE_EXHAUSTED`.
    Nodes,
    /// Streams that have not sent `sm_info` yet (router `max_pending_streams`): a new
    /// `RegisterSM` beyond it is refused with `RESOURCE_EXHAUSTED`.
    PendingStreams,
    /// Bytes queued from one node for the receivers (router `inbound_queue_bytes`): reaching it
    /// pauses that stream (backpressure), nothing is dropped.
    InboundQueue,
    /// Commands waiting to be written to one node (router `outbound_backlog`): a call beyond it
    /// fails at once.
    OutboundBacklog,
    /// One command larger than the message size limit: its call fails, the stream goes on.
    CommandSize,
    /// Open connections (acceptor `max_connections`): a connection beyond it is closed at once.
    Connections,
    /// A connection that did not finish its TLS handshake and HTTP/2 preface in time.
    Handshake,
    /// HTTP/2 PING and SETTINGS frames, or new streams, a connection may send per second
    /// (`control_frames_per_sec`, `new_streams_per_sec`): a flood ends the connection.
    ControlFrames,
    /// Streams per HTTP/2 connection (advertised in SETTINGS; the peer's extra streams are
    /// refused by HTTP/2 itself).
    StreamsPerConnection,
    /// An id or name longer than the id length limit: the message is refused naming the field.
    IdLength,
    /// A message whose decoded form would be far larger than its wire form (many empty
    /// repeated elements): refused before decoding.
    DecodedSize,
    /// A message over the message size limit: its stream ends with `RESOURCE_EXHAUSTED`.
    MessageSize,
    /// Messages refused on one connection (gRPC server `max_refused_messages`, N-BAD-1): an
    /// empty or undecodable message, an id over the limit, a decode bomb. When a connection has
    /// used its budget, its streams end with `RESOURCE_EXHAUSTED` and it is closed.
    RefusedMessages,
}

impl Budget {
    /// Every budget, in declaration order.
    pub const ALL: [Budget; 13] = [
        Budget::Nodes,
        Budget::PendingStreams,
        Budget::InboundQueue,
        Budget::OutboundBacklog,
        Budget::CommandSize,
        Budget::Connections,
        Budget::Handshake,
        Budget::ControlFrames,
        Budget::StreamsPerConnection,
        Budget::IdLength,
        Budget::DecodedSize,
        Budget::MessageSize,
        Budget::RefusedMessages,
    ];

    /// The budget's name in logs, statuses and metrics labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Budget::Nodes => "nodes",
            Budget::PendingStreams => "pending_streams",
            Budget::InboundQueue => "inbound_queue",
            Budget::OutboundBacklog => "outbound_backlog",
            Budget::CommandSize => "command_size",
            Budget::Connections => "connections",
            Budget::Handshake => "handshake",
            Budget::ControlFrames => "control_frames",
            Budget::StreamsPerConnection => "streams_per_connection",
            Budget::IdLength => "id_length",
            Budget::DecodedSize => "decoded_size",
            Budget::MessageSize => "message_size",
            Budget::RefusedMessages => "refused_messages",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

impl fmt::Display for Budget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How often each [`Budget`] was reached. Cheap to clone; clones share the counts.
///
/// Each layer of one server counts into the same set (the router hands its set to the gRPC
/// server, which hands it to the acceptor), so one snapshot shows everything a peer ran into.
/// Every count is also a `smcontroller_budget_refusals_total{budget="..."}` counter of the
/// `metrics` facade.
#[derive(Clone, Default)]
pub struct Refusals {
    counts: Arc<[AtomicU64; Budget::ALL.len()]>,
}

impl Refusals {
    /// A set of zero counts.
    pub fn new() -> Self {
        Self::default()
    }

    /// Counts one refusal by `budget`.
    pub fn count(&self, budget: Budget) {
        self.counts[budget.index()].fetch_add(1, Ordering::Relaxed);
        metrics::counter!("smcontroller_budget_refusals_total", "budget" => budget.as_str())
            .increment(1);
    }

    /// How often `budget` was reached.
    pub fn get(&self, budget: Budget) -> u64 {
        self.counts[budget.index()].load(Ordering::Relaxed)
    }

    /// Every budget with its count.
    pub fn snapshot(&self) -> Vec<(Budget, u64)> {
        Budget::ALL.iter().map(|&b| (b, self.get(b))).collect()
    }
}

impl fmt::Debug for Refusals {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map()
            .entries(
                self.snapshot()
                    .into_iter()
                    .filter(|(_, n)| *n > 0)
                    .map(|(b, n)| (b.as_str(), n)),
            )
            .finish()
    }
}

/// Lines of warning one [`WarnGate`] lets through at once.
pub const DEFAULT_WARN_BURST: u32 = 5;
/// After the burst, one line per this interval from one [`WarnGate`].
pub const DEFAULT_WARN_INTERVAL: Duration = Duration::from_secs(10);
/// Lines all gates of the process let through at once, and per second after that: the
/// ceiling on how fast peers can grow the log, however many connections they open.
pub const PROCESS_WARN_RATE: u32 = 50;

/// A rate limit for the warnings one source (a connection, a node's stream) can cause.
///
/// A token bucket: [`DEFAULT_WARN_BURST`] lines at once, then one per
/// [`DEFAULT_WARN_INTERVAL`]; on top of it a process-wide bucket of [`PROCESS_WARN_RATE`]
/// lines per second that every gate draws from. A line that is let through carries how many
/// were suppressed before it; a gate dropped with suppressed lines logs one last line saying
/// how many (through the `report` callback given at [`WarnGate::on_drop`]), so no count is
/// lost.
pub struct WarnGate {
    state: Mutex<GateState>,
    burst: u32,
    interval: Duration,
    on_drop: Option<Box<dyn Fn(u64) + Send + Sync>>,
    ceiling: &'static ProcessGate,
}

struct GateState {
    tokens: u32,
    refilled: Instant,
    suppressed: u64,
}

/// A line a [`WarnGate`] let through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Admitted {
    /// Lines of this gate suppressed since the last one let through.
    pub suppressed: u64,
}

impl Default for WarnGate {
    fn default() -> Self {
        Self::new(DEFAULT_WARN_BURST, DEFAULT_WARN_INTERVAL)
    }
}

impl fmt::Debug for WarnGate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WarnGate")
            .field("burst", &self.burst)
            .field("interval", &self.interval)
            .field("suppressed", &self.suppressed())
            .finish()
    }
}

impl WarnGate {
    /// `burst` lines at once, then one per `interval`.
    pub fn new(burst: u32, interval: Duration) -> Self {
        Self::under(burst, interval, process_gate())
    }

    fn under(burst: u32, interval: Duration, ceiling: &'static ProcessGate) -> Self {
        let burst = burst.max(1);
        Self {
            state: Mutex::new(GateState {
                tokens: burst,
                refilled: Instant::now(),
                suppressed: 0,
            }),
            burst,
            interval: interval.max(Duration::from_millis(1)),
            on_drop: None,
            ceiling,
        }
    }

    /// Calls `report(n)` when the gate is dropped with `n > 0` lines suppressed since the last
    /// one let through (to log "n similar warnings suppressed").
    pub fn on_drop(mut self, report: impl Fn(u64) + Send + Sync + 'static) -> Self {
        self.on_drop = Some(Box::new(report));
        self
    }

    /// Whether a warning may be logged now; `None` counts it as suppressed.
    pub fn admit(&self) -> Option<Admitted> {
        let mut state = self.lock();
        let now = Instant::now();
        let elapsed = now.saturating_duration_since(state.refilled);
        let earned = elapsed.as_nanos() / self.interval.as_nanos();
        if earned > 0 {
            let earned = u32::try_from(earned).unwrap_or(u32::MAX);
            state.tokens = state.tokens.saturating_add(earned).min(self.burst);
            state.refilled = if state.tokens == self.burst {
                now
            } else {
                state.refilled + self.interval * earned
            };
        }
        if state.tokens == 0 || !self.ceiling.take() {
            state.suppressed = state.suppressed.saturating_add(1);
            return None;
        }
        state.tokens -= 1;
        Some(Admitted {
            suppressed: std::mem::take(&mut state.suppressed),
        })
    }

    /// Lines suppressed since the last one let through.
    pub fn suppressed(&self) -> u64 {
        self.lock().suppressed
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, GateState> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl Drop for WarnGate {
    fn drop(&mut self) {
        let suppressed = self.lock().suppressed;
        if suppressed > 0
            && let Some(report) = &self.on_drop
        {
            report(suppressed);
        }
    }
}

/// The process-wide bucket every [`WarnGate`] draws from.
struct ProcessGate {
    state: Mutex<(u32, Instant)>,
}

impl ProcessGate {
    fn take(&self) -> bool {
        let mut state = self
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let now = Instant::now();
        let interval = Duration::from_secs(1) / PROCESS_WARN_RATE;
        let earned = now.saturating_duration_since(state.1).as_nanos() / interval.as_nanos();
        if earned > 0 {
            let earned = u32::try_from(earned).unwrap_or(u32::MAX);
            state.0 = state.0.saturating_add(earned).min(PROCESS_WARN_RATE);
            state.1 = if state.0 == PROCESS_WARN_RATE {
                now
            } else {
                state.1 + interval * earned
            };
        }
        if state.0 == 0 {
            return false;
        }
        state.0 -= 1;
        true
    }
}

impl ProcessGate {
    fn new() -> Self {
        ProcessGate {
            state: Mutex::new((PROCESS_WARN_RATE, Instant::now())),
        }
    }
}

fn process_gate() -> &'static ProcessGate {
    static GATE: OnceLock<ProcessGate> = OnceLock::new();
    GATE.get_or_init(ProcessGate::new)
}

/// Characters of a peer's value that reach a log line or a status; the rest is cut.
pub const LOG_VALUE_CHARS: usize = 64;

/// `value` cut to [`LOG_VALUE_CHARS`] characters, with its full length in bytes when it was
/// cut: what a log line or a status may carry of a peer's string. Control characters are
/// escaped, so a peer cannot forge log lines.
pub fn clip(value: &str) -> Cow<'_, str> {
    clip_to(value, LOG_VALUE_CHARS)
}

/// [`clip`] to `max` characters.
pub fn clip_to(value: &str, max: usize) -> Cow<'_, str> {
    let cut = value.char_indices().nth(max).map(|(end, _)| end);
    let kept = &value[..cut.unwrap_or(value.len())];
    if cut.is_none() && !kept.chars().any(char::is_control) {
        return Cow::Borrowed(value);
    }
    let mut out: String = kept.chars().flat_map(char::escape_debug).collect();
    if cut.is_some() {
        out.push_str(&format!("... ({} bytes)", value.len()));
    }
    Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A gate under a ceiling of its own, so that tests running at once do not share one.
    fn gate(burst: u32, interval: Duration) -> WarnGate {
        WarnGate::under(burst, interval, Box::leak(Box::new(ProcessGate::new())))
    }

    #[test]
    fn refusals_count_per_budget_and_clones_share() {
        let refusals = Refusals::new();
        let clone = refusals.clone();
        clone.count(Budget::Nodes);
        clone.count(Budget::Nodes);
        refusals.count(Budget::IdLength);
        assert_eq!(refusals.get(Budget::Nodes), 2);
        assert_eq!(refusals.get(Budget::IdLength), 1);
        assert_eq!(refusals.get(Budget::Connections), 0);
        assert_eq!(format!("{refusals:?}"), r#"{"nodes": 2, "id_length": 1}"#);
    }

    #[test]
    fn budget_names_are_distinct() {
        let mut names: Vec<_> = Budget::ALL.iter().map(|b| b.as_str()).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), Budget::ALL.len());
        for (i, b) in Budget::ALL.iter().enumerate() {
            assert_eq!(b.index(), i, "{b} out of order in ALL");
        }
    }

    #[test]
    fn a_gate_lets_a_burst_through_then_counts_what_it_suppresses() {
        let gate = gate(3, Duration::from_secs(3600));
        for _ in 0..3 {
            assert_eq!(gate.admit(), Some(Admitted { suppressed: 0 }));
        }
        for _ in 0..1000 {
            assert_eq!(gate.admit(), None);
        }
        assert_eq!(gate.suppressed(), 1000);
    }

    #[test]
    fn a_refilled_gate_reports_the_suppressed_count_once() {
        let gate = gate(1, Duration::from_millis(1));
        assert!(gate.admit().is_some());
        // Suppress until the interval has passed; bounded by a deadline, not a sleep.
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut suppressed = 0;
        let admitted = loop {
            assert!(Instant::now() < deadline, "the gate never refilled");
            match gate.admit() {
                Some(a) => break a,
                None => suppressed += 1,
            }
        };
        assert_eq!(admitted.suppressed, suppressed);
        assert_eq!(gate.suppressed(), 0);
    }

    #[test]
    fn a_dropped_gate_reports_what_it_suppressed() {
        let seen = Arc::new(AtomicU64::new(0));
        let seen2 = seen.clone();
        let gate =
            gate(1, Duration::from_secs(3600)).on_drop(move |n| seen2.store(n, Ordering::SeqCst));
        assert!(gate.admit().is_some());
        assert!(gate.admit().is_none());
        assert!(gate.admit().is_none());
        drop(gate);
        assert_eq!(seen.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn the_process_ceiling_holds_across_many_gates() {
        // Many fresh gates, each with its own burst: together they get no more than the
        // process bucket (plus what refills while the loop runs).
        let ceiling: &'static ProcessGate = Box::leak(Box::new(ProcessGate::new()));
        let started = Instant::now();
        let admitted = (0..10_000)
            .filter(|_| {
                WarnGate::under(5, Duration::from_secs(3600), ceiling)
                    .admit()
                    .is_some()
            })
            .count() as u64;
        let secs = started.elapsed().as_secs() + 1;
        assert!(
            admitted <= u64::from(PROCESS_WARN_RATE) * (secs + 1),
            "{admitted} lines in {secs} s"
        );
    }

    #[test]
    fn clip_cuts_long_values_and_escapes_control_characters() {
        assert_eq!(clip("node-1"), "node-1");
        let long = "x".repeat(1 << 20);
        let cut = clip(&long);
        assert!(cut.len() < 100, "{cut}");
        assert!(cut.ends_with("... (1048576 bytes)"), "{cut}");
        assert_eq!(clip("a\nb"), "a\\nb");
        assert_eq!(clip_to("ééé", 2), "éé... (6 bytes)");
    }
}
