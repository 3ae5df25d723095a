//! The firewall-update subscriptions of 9.1 nodes (R-NET-3): one per node id, the newest
//! replacing the older, which then ends. The network manager pushes through
//! [`FirewallUpdates`]; the transport turns each [`Subscription`] into the node's
//! `SubscribeInstanceNetworkUpdates` stream.
//!
//! Nothing here touches a node's `RegisterSM` stream or its registration (R-NET-2): a node
//! subscribes before it registers, and may stay subscribed while it reconnects.

use std::{
    collections::HashMap,
    pin::Pin,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll},
};

use futures::Stream;
use smcontroller_api::{Error, FirewallUpdates, NodeId, PendingFirewallUpdate, Result};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Updates a subscription holds that its node has not read yet; a push beyond it fails with
/// `ResourceExhausted` (the pusher keeps it for the next sync).
pub const SUBSCRIPTION_BACKLOG: usize = 64;

/// Every node's subscription. Cheap to clone: clones share the registry.
#[derive(Debug, Clone)]
pub struct Subscriptions {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    nodes: Mutex<HashMap<NodeId, Entry>>,
    next_id: AtomicU64,
    /// Node ids with a subscription at once: beyond it a new id is refused.
    max_nodes: usize,
    /// Cancelled when the controller stops: every subscription ends.
    stopped: CancellationToken,
}

#[derive(Debug)]
struct Entry {
    id: u64,
    tx: mpsc::Sender<PendingFirewallUpdate>,
}

/// Why [`Subscriptions::subscribe`] refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SubscribeError {
    /// The controller is stopping.
    #[error("the SM controller is shutting down")]
    ShuttingDown,
    /// As many node ids have a subscription as the node budget allows.
    #[error("{0} nodes have a network update subscription already (maxNodes)")]
    TooManyNodes(usize),
}

impl Subscriptions {
    /// No subscriptions; at most `max_nodes` node ids at once; all end when `stopped` is
    /// cancelled.
    pub(crate) fn new(max_nodes: usize, stopped: CancellationToken) -> Self {
        Self {
            inner: Arc::new(Inner {
                nodes: Mutex::default(),
                next_id: AtomicU64::new(0),
                max_nodes,
                stopped,
            }),
        }
    }

    /// The node's new subscription. An older one of the same node id ends now (its stream
    /// ends); it gets nothing more.
    pub fn subscribe(&self, node: &NodeId) -> std::result::Result<Subscription, SubscribeError> {
        if self.inner.stopped.is_cancelled() {
            return Err(SubscribeError::ShuttingDown);
        }
        let (tx, rx) = mpsc::channel(SUBSCRIPTION_BACKLOG);
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let mut nodes = self.lock();
        if !nodes.contains_key(node) && nodes.len() >= self.inner.max_nodes {
            return Err(SubscribeError::TooManyNodes(self.inner.max_nodes));
        }
        // Dropping the older entry's sender ends its stream.
        nodes.insert(node.clone(), Entry { id, tx });
        Ok(Subscription {
            node: node.clone(),
            id,
            rx,
            registry: self.clone(),
            stopped: Box::pin(self.inner.stopped.clone().cancelled_owned()),
        })
    }

    /// Node ids with a subscription now.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether no node has a subscription.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<NodeId, Entry>> {
        self.inner
            .nodes
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Forgets the subscription `id` of `node`, if it is still the node's.
    fn release(&self, node: &NodeId, id: u64) {
        let mut nodes = self.lock();
        if nodes.get(node).is_some_and(|e| e.id == id) {
            nodes.remove(node);
        }
    }
}

impl FirewallUpdates for Subscriptions {
    fn push_firewall_update(&self, node: &NodeId, update: &PendingFirewallUpdate) -> Result<()> {
        let mut nodes = self.lock();
        let Some(entry) = nodes.get(node) else {
            return Err(Error::not_found(node.clone()));
        };
        match entry.tx.try_send(update.clone()) {
            Ok(()) => Ok(()),
            Err(mpsc::error::TrySendError::Full(_)) => Err(Error::ResourceExhausted(format!(
                "node {node} has {SUBSCRIPTION_BACKLOG} network updates unread on its \
                 subscription"
            ))),
            Err(mpsc::error::TrySendError::Closed(_)) => {
                nodes.remove(node);
                Err(Error::not_found(node.clone()))
            }
        }
    }

    fn is_subscribed(&self, node: &NodeId) -> bool {
        self.lock().get(node).is_some_and(|e| !e.tx.is_closed())
    }
}

/// One node's subscription: the updates pushed to it, in order. It ends when a newer
/// subscription of the node replaces it or the controller stops; dropping it (the node went
/// away) unsubscribes the node unless a newer one has replaced it.
pub struct Subscription {
    node: NodeId,
    id: u64,
    rx: mpsc::Receiver<PendingFirewallUpdate>,
    registry: Subscriptions,
    stopped: Pin<Box<tokio_util::sync::WaitForCancellationFutureOwned>>,
}

impl std::fmt::Debug for Subscription {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Subscription")
            .field("node", &self.node)
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

impl Subscription {
    /// The node it belongs to.
    pub fn node(&self) -> &NodeId {
        &self.node
    }
}

impl Stream for Subscription {
    type Item = PendingFirewallUpdate;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.stopped.as_mut().poll(cx).is_ready() {
            return Poll::Ready(None);
        }
        self.rx.poll_recv(cx)
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.registry.release(&self.node, self.id);
    }
}

#[cfg(test)]
mod tests {
    use futures::StreamExt;
    use smcontroller_api::{FirewallRule, InstanceIdent};

    use super::*;

    fn update(item: &str) -> PendingFirewallUpdate {
        PendingFirewallUpdate {
            instance: InstanceIdent {
                item_id: item.into(),
                ..InstanceIdent::default()
            },
            rules: vec![FirewallRule {
                dst_ip: "172.17.1.2".into(),
                dst_port: "8080".into(),
                proto: "tcp".into(),
                src_ip: "172.17.0.2".into(),
            }],
        }
    }

    fn node(id: &str) -> NodeId {
        NodeId::new(id)
    }

    #[tokio::test]
    async fn r_net_3_a_newer_subscription_replaces_the_older_which_ends() {
        let subs = Subscriptions::new(8, CancellationToken::new());
        let mut old = subs.subscribe(&node("n1")).unwrap();
        let mut new = subs.subscribe(&node("n1")).unwrap();
        assert_eq!(subs.len(), 1);
        assert_eq!(old.next().await, None, "the replaced one ends");
        drop(old);
        assert!(
            subs.is_subscribed(&node("n1")),
            "dropping the old one keeps the new"
        );
        subs.push_firewall_update(&node("n1"), &update("a"))
            .unwrap();
        assert_eq!(new.next().await, Some(update("a")));
        drop(new);
        assert!(!subs.is_subscribed(&node("n1")));
        assert!(subs.is_empty());
    }

    #[test]
    fn a_push_without_a_subscription_is_not_found_and_a_full_one_is_exhausted() {
        let subs = Subscriptions::new(8, CancellationToken::new());
        let e = subs
            .push_firewall_update(&node("n1"), &update("a"))
            .unwrap_err();
        assert!(matches!(e, Error::NotFound { .. }), "{e}");
        let _unread = subs.subscribe(&node("n1")).unwrap();
        for _ in 0..SUBSCRIPTION_BACKLOG {
            subs.push_firewall_update(&node("n1"), &update("a"))
                .unwrap();
        }
        let e = subs
            .push_firewall_update(&node("n1"), &update("a"))
            .unwrap_err();
        assert!(matches!(e, Error::ResourceExhausted(_)), "{e}");
    }

    #[tokio::test]
    async fn every_subscription_ends_at_the_stop_and_none_is_taken_after() {
        let stop = CancellationToken::new();
        let subs = Subscriptions::new(8, stop.clone());
        let mut sub = subs.subscribe(&node("n1")).unwrap();
        stop.cancel();
        assert_eq!(sub.next().await, None);
        assert_eq!(
            subs.subscribe(&node("n2")).unwrap_err(),
            SubscribeError::ShuttingDown
        );
    }

    #[test]
    fn node_ids_beyond_the_budget_are_refused_but_a_known_one_resubscribes() {
        let subs = Subscriptions::new(2, CancellationToken::new());
        let _a = subs.subscribe(&node("a")).unwrap();
        let _b = subs.subscribe(&node("b")).unwrap();
        assert_eq!(
            subs.subscribe(&node("c")).unwrap_err(),
            SubscribeError::TooManyNodes(2)
        );
        assert!(subs.subscribe(&node("a")).is_ok());
    }
}
