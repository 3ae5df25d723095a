//! Callers waiting for a sync reply from one node, matched on the read path (R-SYNC-2).
//!
//! The protocol carries no correlation id on `node_config_status` or `average_monitoring`: a
//! reply is recognised by its kind and its place on the stream. A reply goes to the first waiter,
//! in call order, that it can answer: any waiter of its kind, except that a reply to
//! `check_node_config`/`set_node_config` must carry the version that request sent.

use std::collections::VecDeque;

use smcontroller_api::{NodeConfigStatus, NodeMonitoringData};
use tokio::sync::oneshot;

/// What a waiter accepts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum ReplyKind {
    /// A `node_config_status`; with `Some(version)` only one that carries that version.
    NodeConfig(Option<String>),
    /// An `average_monitoring`.
    AverageMonitoring,
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
}

struct Waiter {
    id: u64,
    kind: ReplyKind,
    tx: oneshot::Sender<Reply>,
}

/// The waiters of one node's stream.
#[derive(Default)]
pub(crate) struct Waiters {
    next_id: u64,
    closed: bool,
    queue: VecDeque<Waiter>,
}

impl Waiters {
    /// Adds a waiter; `None` once the stream is closed.
    pub(crate) fn push(&mut self, kind: ReplyKind) -> Option<(u64, oneshot::Receiver<Reply>)> {
        if self.closed {
            return None;
        }
        let (tx, rx) = oneshot::channel();
        self.next_id += 1;
        let id = self.next_id;
        self.queue.push_back(Waiter { id, kind, tx });
        Some((id, rx))
    }

    /// Forgets a waiter (timed out or its caller went away).
    pub(crate) fn remove(&mut self, id: u64) {
        if let Some(pos) = self.queue.iter().position(|w| w.id == id) {
            self.queue.remove(pos);
        }
    }

    /// Hands the reply to the first waiter it answers; gives it back when nobody waits for it.
    pub(crate) fn deliver(&mut self, reply: Reply) -> Result<(), Reply> {
        let mut reply = reply;
        while let Some(pos) = self.queue.iter().position(|w| reply.answers(&w.kind)) {
            let waiter = self.queue.remove(pos).expect("position is in range");
            match waiter.tx.send(reply) {
                Ok(()) => return Ok(()),
                // That caller has gone; the next matching waiter may still want it.
                Err(back) => reply = back,
            }
        }
        Err(reply)
    }

    /// Closes: every waiter fails now (its receiver sees the sender dropped), no new ones.
    pub(crate) fn close(&mut self) {
        self.closed = true;
        self.queue.clear();
    }

    /// How many callers are waiting.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.queue.len()
    }
}

#[cfg(test)]
mod tests {
    use smcontroller_api::NodeConfigState;

    use super::*;

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

    #[test]
    fn r_sync_2_replies_go_first_come_first_served_among_matching_waiters() {
        let mut w = Waiters::default();
        let (_, mut check_v2) = w.push(ReplyKind::NodeConfig(Some("2".into()))).unwrap();
        let (_, mut get_a) = w.push(ReplyKind::NodeConfig(None)).unwrap();
        let (_, mut get_b) = w.push(ReplyKind::NodeConfig(None)).unwrap();

        // A reply carrying version 1 cannot answer the check for version 2: it goes to the
        // first get.
        w.deliver(status("1")).unwrap();
        assert!(check_v2.try_recv().is_err());
        assert_eq!(version_of(get_a.try_recv().unwrap()), "1");

        w.deliver(status("2")).unwrap();
        assert_eq!(version_of(check_v2.try_recv().unwrap()), "2");
        assert!(get_b.try_recv().is_err());
        assert_eq!(w.len(), 1);
    }

    #[test]
    fn r_sync_2_a_reply_nobody_waits_for_is_given_back() {
        let mut w = Waiters::default();
        let (_, _monitoring) = w.push(ReplyKind::AverageMonitoring).unwrap();
        assert!(w.deliver(status("1")).is_err());
        assert_eq!(w.len(), 1);
    }

    #[test]
    fn a_removed_or_abandoned_waiter_does_not_swallow_a_reply() {
        let mut w = Waiters::default();
        let (gone, rx_gone) = w.push(ReplyKind::NodeConfig(None)).unwrap();
        let (_, rx_dropped) = w.push(ReplyKind::NodeConfig(None)).unwrap();
        let (_, mut live) = w.push(ReplyKind::NodeConfig(None)).unwrap();
        w.remove(gone);
        drop(rx_gone);
        drop(rx_dropped);
        w.deliver(status("7")).unwrap();
        assert_eq!(version_of(live.try_recv().unwrap()), "7");
    }

    #[test]
    fn r_sync_1_close_fails_every_waiter_and_refuses_new_ones() {
        let mut w = Waiters::default();
        let (_, mut rx) = w.push(ReplyKind::AverageMonitoring).unwrap();
        w.close();
        assert!(matches!(
            rx.try_recv(),
            Err(oneshot::error::TryRecvError::Closed)
        ));
        assert!(w.push(ReplyKind::AverageMonitoring).is_none());
    }
}
