//! Sync commands of one stream waiting for their replies, matched by send order (R-SYNC-2,
//! R-SYNC-3).
//!
//! The protocol carries no correlation id on `node_config_status` or `average_monitoring`. What
//! identifies a reply is its kind, its place on the stream and, for node config replies, the
//! version it carries. A real SM handles its stream serially, so it answers its commands in the
//! order it received them, and it answers some of them never (a check/set whose JSON it cannot
//! parse, a status read that fails). Hence:
//!
//! - Every sync command sent is a [`Pending`] entry, in send order, whether or not its caller
//!   still waits. A reply answers the oldest entry that can take it (same kind; for a check/set,
//!   the same version). A caller that timed out or gave up leaves its entry behind, which then
//!   absorbs its own late reply: it is never handed to a newer caller.
//! - When a reply answers an entry, every older entry is known to be unanswered (the SM has moved
//!   past it): those stop taking part in the matching at once. Their callers keep waiting until
//!   their timeout, which is the SM's only signal.
//! - An entry that nothing answers stops taking part in the matching after the reply expiry
//!   (twice the response timeout by default), so one lost reply cannot shift all later ones.
//! - The response timeout is kept here too: each entry has its caller's deadline, and the
//!   stream's reader runs [`Waiters::time_out`] on one timer per stream, set to the earliest
//!   deadline, rather than each call arming a timer of its own (a timer set and cleared per
//!   call was the largest cost of the call's own path, N-PERF-3).
//!
//! What evidence cannot tell apart: a status read left unanswered followed by a check whose
//! answer then arrives. The status read takes any version, so it takes that answer. The real SM
//! leaves a status read unanswered only when it cannot read its own status.

use std::{collections::VecDeque, time::Duration};

use smcontroller_api::{NodeConfigStatus, NodeMonitoringData};
use tokio::{sync::oneshot, time::Instant};

/// What a pending command accepts as its reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum ReplyKind {
    /// A `node_config_status`; with `Some(version)` (check/set) only one that carries that
    /// version, with `None` (status read) any.
    NodeConfig(Option<String>),
    /// An `average_monitoring`.
    AverageMonitoring,
}

/// What a caller gets: the reply, or word that its deadline passed first.
pub(crate) type Answer = Result<Reply, TimedOut>;

/// A sync call's deadline passed before its reply came (R-SYNC-1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct TimedOut {
    /// The command was still waiting to be written, and was taken back: the node never got
    /// it.
    pub(crate) withdrawn: bool,
}

/// A sync reply.
#[derive(Debug)]
pub(crate) enum Reply {
    NodeConfig(NodeConfigStatus),
    AverageMonitoring(NodeMonitoringData),
}

impl Reply {
    fn answers(&self, kind: &ReplyKind) -> bool {
        match (self, kind) {
            (Self::NodeConfig(_), ReplyKind::NodeConfig(None)) => true,
            (Self::NodeConfig(status), ReplyKind::NodeConfig(Some(version))) => {
                status.version == *version
            }
            (Self::AverageMonitoring(_), ReplyKind::AverageMonitoring) => true,
            _ => false,
        }
    }

    /// The wire name of the reply, for logs.
    pub(crate) fn name(&self) -> &'static str {
        match self {
            Self::NodeConfig(_) => "node_config_status",
            Self::AverageMonitoring(_) => "average_monitoring",
        }
    }
}

/// One sync command sent on the stream.
struct Pending {
    /// Names the entry for [`Waiters::withdraw`].
    id: u64,
    kind: ReplyKind,
    sent: Instant,
    /// When the caller stops waiting.
    deadline: Instant,
    /// `false` once a newer command was answered: the SM will not answer this one.
    answerable: bool,
    /// `None` once the caller was told it timed out, closed if it gave up (cancelled): the
    /// reply is then absorbed.
    tx: Option<oneshot::Sender<Answer>>,
}

impl Pending {
    /// Whether a caller still waits for this entry's answer.
    fn caller_waits(&self) -> bool {
        self.tx.as_ref().is_some_and(|tx| !tx.is_closed())
    }
}

/// What became of a reply.
#[derive(Debug)]
pub(crate) enum Delivery {
    /// Its caller has it.
    Answered,
    /// It answered a command whose caller had gone; dropped. Carries how long after the command
    /// it came.
    Absorbed(Duration),
    /// No pending command can take it.
    Unwanted(Reply),
}

/// The pending sync commands of one stream.
pub(crate) struct Waiters {
    /// How long an unanswered command takes part in the matching.
    expiry: Duration,
    /// How long a caller waits for its reply.
    timeout: Duration,
    closed: bool,
    pending: VecDeque<Pending>,
    next_id: u64,
}

impl Waiters {
    /// Waiters whose callers wait `timeout` for a reply, and whose commands take part in the
    /// matching for `expiry` (not less than `timeout`).
    pub(crate) fn new(expiry: Duration, timeout: Duration) -> Self {
        Self {
            expiry: expiry.max(timeout),
            timeout,
            closed: false,
            pending: VecDeque::new(),
            next_id: 0,
        }
    }

    /// Records a command about to be sent at `now`; `None` once the stream is closed. The id
    /// names the entry for [`time_out`](Self::time_out)'s `unsent`.
    pub(crate) fn push(
        &mut self,
        kind: ReplyKind,
        now: Instant,
    ) -> Option<(u64, oneshot::Receiver<Answer>)> {
        if self.closed {
            return None;
        }
        self.expire(now);
        let (tx, rx) = oneshot::channel();
        let id = self.next_id;
        self.next_id += 1;
        self.pending.push_back(Pending {
            id,
            kind,
            sent: now,
            deadline: now + self.timeout,
            answerable: true,
            tx: Some(tx),
        });
        Some((id, rx))
    }

    /// Tells every caller whose deadline has passed at `now` that it timed out. `unsent(id)`
    /// takes the command of entry `id` back if it is still waiting to be written (it then
    /// says `true`, and the entry goes: no reply can come for it); otherwise the entry stays,
    /// to absorb its late reply. Returns the earliest deadline of the callers still waiting.
    pub(crate) fn time_out(
        &mut self,
        now: Instant,
        mut unsent: impl FnMut(u64) -> bool,
    ) -> Option<Instant> {
        let mut next: Option<Instant> = None;
        self.pending.retain_mut(|p| {
            let Some(tx) = &p.tx else {
                return true;
            };
            if p.deadline > now {
                next = Some(next.map_or(p.deadline, |n| n.min(p.deadline)));
                return true;
            }
            let withdrawn = unsent(p.id);
            // A caller that gave up (cancelled) is not there to be told.
            if !tx.is_closed()
                && let Some(tx) = p.tx.take()
            {
                let _ = tx.send(Err(TimedOut { withdrawn }));
            }
            p.tx = None;
            !withdrawn
        });
        if self.pending.is_empty() {
            self.pending = VecDeque::new();
        }
        next
    }

    /// Takes back the newest entry: its command could not be sent after all.
    pub(crate) fn pop_unsent(&mut self) {
        self.pending.pop_back();
    }

    /// Hands `reply` to the oldest pending command it can answer.
    pub(crate) fn deliver(&mut self, reply: Reply, now: Instant) -> Delivery {
        self.expire(now);
        // The usual case, one call at a time: the oldest entry takes the reply, and nothing
        // older is left to mark.
        if self
            .pending
            .front()
            .is_some_and(|p| p.answerable && reply.answers(&p.kind))
        {
            let entry = self.pending.pop_front().expect("front is there");
            return self.answer(entry, reply, now);
        }
        let Some(pos) = self
            .pending
            .iter()
            .position(|p| p.answerable && reply.answers(&p.kind))
        else {
            return Delivery::Unwanted(reply);
        };
        // The SM answers in order: the commands before this one will not be answered. Forget
        // those whose caller has gone; keep the others out of the matching until their callers
        // time out.
        let mut index = 0;
        self.pending.retain_mut(|p| {
            let older = index < pos;
            index += 1;
            if older {
                p.answerable = false;
                p.caller_waits()
            } else {
                true
            }
        });
        let first = self
            .pending
            .iter()
            .position(|p| p.answerable)
            .expect("the answered entry is still there");
        let entry = self.pending.remove(first).expect("position is in range");
        self.answer(entry, reply, now)
    }

    /// Hands `reply` to `entry`, just taken out of the pending ones.
    fn answer(&mut self, entry: Pending, reply: Reply, now: Instant) -> Delivery {
        if self.pending.is_empty() {
            // An idle node holds no buffer (256 bytes per node at 1,000 nodes, N-PERF-3); the
            // next call allocates one again, which costs little next to its round trip.
            self.pending = VecDeque::new();
        }
        match entry.tx.map(|tx| tx.send(Ok(reply))) {
            Some(Ok(())) => Delivery::Answered,
            Some(Err(_)) | None => Delivery::Absorbed(now.saturating_duration_since(entry.sent)),
        }
    }

    /// Drops the entries no caller waits for that are past the expiry or out of the matching.
    /// (An entry whose caller still waits is kept until [`time_out`](Self::time_out) tells
    /// it: the expiry is never shorter than the timeout, so that is before its expiry unless
    /// the reader is late.)
    fn expire(&mut self, now: Instant) {
        let expiry = self.expiry;
        self.pending.retain(|p| {
            p.caller_waits() || (p.answerable && now.saturating_duration_since(p.sent) < expiry)
        });
    }

    /// Closes: every caller fails now (its receiver sees the sender dropped), no new entries.
    pub(crate) fn close(&mut self) {
        self.closed = true;
        self.pending.clear();
    }

    /// How many entries are kept (for tests of the bounds).
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.pending.len()
    }
}

#[cfg(test)]
mod tests {
    use smcontroller_api::NodeConfigState;
    use tokio::sync::oneshot::error::TryRecvError;

    use super::*;

    const EXPIRY: Duration = Duration::from_secs(10);
    const TIMEOUT: Duration = Duration::from_secs(5);

    fn status(version: &str) -> Reply {
        Reply::NodeConfig(NodeConfigStatus {
            state: NodeConfigState::Installed,
            version: version.into(),
            error: None,
        })
    }

    fn version_of(reply: Reply) -> String {
        match reply {
            Reply::NodeConfig(s) => s.version,
            Reply::AverageMonitoring(_) => panic!("not a node config reply"),
        }
    }

    fn check(version: &str) -> ReplyKind {
        ReplyKind::NodeConfig(Some(version.into()))
    }

    #[test]
    fn r_sync_2_replies_answer_commands_in_send_order() {
        let now = Instant::now();
        let mut w = Waiters::new(EXPIRY, TIMEOUT);
        let mut get_a = w.push(ReplyKind::NodeConfig(None), now).unwrap().1;
        let mut get_b = w.push(ReplyKind::NodeConfig(None), now).unwrap().1;
        assert!(matches!(w.deliver(status("1"), now), Delivery::Answered));
        assert_eq!(version_of(get_a.try_recv().unwrap().unwrap()), "1");
        assert!(get_b.try_recv().is_err());
        assert!(matches!(w.deliver(status("2"), now), Delivery::Answered));
        assert_eq!(version_of(get_b.try_recv().unwrap().unwrap()), "2");
        assert_eq!(w.len(), 0);
        assert_eq!(
            w.pending.capacity(),
            0,
            "an idle node holds no buffer (N-PERF-3)"
        );
    }

    #[test]
    fn r_sync_3_a_late_reply_is_absorbed_by_its_own_command() {
        let now = Instant::now();
        let mut w = Waiters::new(EXPIRY, TIMEOUT);
        let first = w.push(ReplyKind::AverageMonitoring, now).unwrap().1;
        drop(first); // the caller timed out
        let mut second = w.push(ReplyKind::AverageMonitoring, now).unwrap().1;
        let late = Reply::AverageMonitoring(monitoring(1));
        assert!(matches!(w.deliver(late, now), Delivery::Absorbed(_)));
        assert!(matches!(second.try_recv(), Err(TryRecvError::Empty)));
        let own = Reply::AverageMonitoring(monitoring(2));
        assert!(matches!(w.deliver(own, now), Delivery::Answered));
        let Reply::AverageMonitoring(data) = second.try_recv().unwrap().unwrap() else {
            panic!("wrong kind");
        };
        assert_eq!(data.node.ram, 2);
    }

    #[test]
    fn r_sync_3_a_late_check_reply_never_reaches_a_set_of_the_same_version() {
        let now = Instant::now();
        let mut w = Waiters::new(EXPIRY, TIMEOUT);
        drop(w.push(check("2"), now).unwrap().1); // check 2 timed out
        let mut set = w.push(check("2"), now).unwrap().1;
        assert!(matches!(w.deliver(status("2"), now), Delivery::Absorbed(_)));
        assert!(matches!(set.try_recv(), Err(TryRecvError::Empty)));
        assert!(matches!(w.deliver(status("2"), now), Delivery::Answered));
        assert_eq!(version_of(set.try_recv().unwrap().unwrap()), "2");
    }

    #[test]
    fn r_sync_3_the_version_shows_a_check_went_unanswered() {
        let now = Instant::now();
        let mut w = Waiters::new(EXPIRY, TIMEOUT);
        // The SM could not parse check 3 and said nothing; then answered the status read.
        let mut unparsed = w.push(check("3"), now).unwrap().1;
        let mut get = w.push(ReplyKind::NodeConfig(None), now).unwrap().1;
        assert!(matches!(w.deliver(status("1"), now), Delivery::Answered));
        assert_eq!(version_of(get.try_recv().unwrap().unwrap()), "1");
        // The check is out of the matching, but its caller still waits for its own timeout.
        assert!(matches!(unparsed.try_recv(), Err(TryRecvError::Empty)));
        assert!(matches!(w.deliver(status("3"), now), Delivery::Unwanted(_)));
    }

    #[test]
    fn r_sync_3_a_reply_of_another_kind_shows_older_commands_went_unanswered() {
        let now = Instant::now();
        let mut w = Waiters::new(EXPIRY, TIMEOUT);
        drop(w.push(ReplyKind::NodeConfig(None), now).unwrap().1);
        let mut monitoring_rx = w.push(ReplyKind::AverageMonitoring, now).unwrap().1;
        let reply = Reply::AverageMonitoring(monitoring(5));
        assert!(matches!(w.deliver(reply, now), Delivery::Answered));
        assert!(monitoring_rx.try_recv().is_ok());
        // The abandoned status read was dropped with the evidence; nothing is left.
        assert_eq!(w.len(), 0);
        assert!(matches!(w.deliver(status("1"), now), Delivery::Unwanted(_)));
    }

    #[test]
    fn r_sync_3_an_unanswered_command_stops_shifting_the_match_after_the_expiry() {
        let start = Instant::now();
        let mut w = Waiters::new(EXPIRY, TIMEOUT);
        drop(w.push(ReplyKind::AverageMonitoring, start).unwrap().1); // never answered
        let later = start + EXPIRY;
        let mut next = w.push(ReplyKind::AverageMonitoring, later).unwrap().1;
        let reply = Reply::AverageMonitoring(monitoring(3));
        assert!(matches!(w.deliver(reply, later), Delivery::Answered));
        assert!(next.try_recv().is_ok());
        assert_eq!(w.len(), 0);
    }

    #[test]
    fn r_sync_2_a_reply_nobody_waits_for_is_given_back() {
        let now = Instant::now();
        let mut w = Waiters::new(EXPIRY, TIMEOUT);
        let _monitoring = w.push(ReplyKind::AverageMonitoring, now).unwrap().1;
        assert!(matches!(w.deliver(status("1"), now), Delivery::Unwanted(_)));
        assert_eq!(w.len(), 1);
    }

    #[test]
    fn r_sync_1_close_fails_every_waiter_and_refuses_new_ones() {
        let now = Instant::now();
        let mut w = Waiters::new(EXPIRY, TIMEOUT);
        let mut rx = w.push(ReplyKind::AverageMonitoring, now).unwrap().1;
        w.close();
        assert!(matches!(rx.try_recv(), Err(TryRecvError::Closed)));
        assert!(w.push(ReplyKind::AverageMonitoring, now).is_none());
    }

    #[test]
    fn r_sync_1_a_caller_is_told_at_its_deadline_and_its_entry_absorbs_the_late_reply() {
        let start = Instant::now();
        let mut w = Waiters::new(EXPIRY, TIMEOUT);
        let (first_id, mut first) = w.push(ReplyKind::AverageMonitoring, start).unwrap();
        let later = start + Duration::from_secs(1);
        let mut second = w.push(ReplyKind::AverageMonitoring, later).unwrap().1;
        let none_written = |_| false;
        // Not yet: the earliest deadline is the first call's.
        assert_eq!(
            w.time_out(start + TIMEOUT - Duration::from_millis(1), none_written),
            Some(start + TIMEOUT)
        );
        assert!(matches!(first.try_recv(), Err(TryRecvError::Empty)));
        // At its deadline the first caller is told (its command was written), the second is next.
        let mut asked = Vec::new();
        let next = w.time_out(start + TIMEOUT, |id| {
            asked.push(id);
            false
        });
        assert_eq!(asked, [first_id]);
        assert_eq!(next, Some(later + TIMEOUT));
        assert_eq!(
            first.try_recv().unwrap().unwrap_err(),
            TimedOut { withdrawn: false }
        );
        assert!(matches!(second.try_recv(), Err(TryRecvError::Empty)));
        // The first command's late reply is absorbed by its own entry, not handed to the second.
        let late = Reply::AverageMonitoring(monitoring(1));
        assert!(matches!(
            w.deliver(late, start + TIMEOUT),
            Delivery::Absorbed(_)
        ));
        assert!(matches!(second.try_recv(), Err(TryRecvError::Empty)));
        // Once the second is told too, no deadline is left.
        assert_eq!(w.time_out(later + TIMEOUT, none_written), None);
        assert!(second.try_recv().unwrap().is_err());
    }

    #[test]
    fn r_sync_1_a_command_never_written_is_taken_back_at_its_deadline() {
        let start = Instant::now();
        let mut w = Waiters::new(EXPIRY, TIMEOUT);
        let (id, mut rx) = w.push(ReplyKind::NodeConfig(None), start).unwrap();
        assert_eq!(w.time_out(start + TIMEOUT, |unsent| unsent == id), None);
        assert_eq!(
            rx.try_recv().unwrap().unwrap_err(),
            TimedOut { withdrawn: true }
        );
        // No reply can come for it: the entry is gone, and with it the buffer.
        assert_eq!(w.len(), 0);
        assert_eq!(w.pending.capacity(), 0);
        assert!(matches!(
            w.deliver(status("1"), start + TIMEOUT),
            Delivery::Unwanted(_)
        ));
    }

    #[test]
    fn r_sync_1_a_waiting_caller_keeps_its_entry_past_the_expiry_until_it_is_told() {
        // The reader may be late to run the timer; the entry must not vanish under its caller
        // (which would read as a disconnection).
        let start = Instant::now();
        let mut w = Waiters::new(TIMEOUT, TIMEOUT);
        let mut rx = w.push(ReplyKind::AverageMonitoring, start).unwrap().1;
        let _other = w
            .push(ReplyKind::AverageMonitoring, start + EXPIRY)
            .unwrap();
        assert!(matches!(rx.try_recv(), Err(TryRecvError::Empty)));
        w.time_out(start + EXPIRY, |_| false);
        assert!(rx.try_recv().unwrap().is_err());
    }

    fn monitoring(ram: u64) -> NodeMonitoringData {
        NodeMonitoringData {
            node: smcontroller_api::MonitoringData {
                timestamp: std::time::SystemTime::UNIX_EPOCH,
                ram,
                cpu: 0,
                partitions: Vec::new(),
                download: 0,
                upload: 0,
            },
            instances: Vec::new(),
        }
    }
}
