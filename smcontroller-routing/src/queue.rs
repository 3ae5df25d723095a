//! A bounded queue from one stream's reader to its dispatcher that holds memory only for what
//! is queued.
//!
//! tokio's `mpsc` allocates a block of 32 slots when the channel is made; with one queue per
//! connected node that block was a good part of the controller's memory per node (N-PERF-3),
//! although a node whose receivers keep up has one or two messages queued at a time. This queue
//! is a `VecDeque` that grows with what is queued, up to the bound, and gives back what a burst
//! made it take once it is empty again.
//!
//! It is bounded twice (R-BAD-2): in items, and in bytes, each item weighing what the transport
//! says it took on the wire. A single item heavier than the byte bound still goes into an
//! empty queue, so no message can wedge the stream.

use std::{
    collections::VecDeque,
    sync::{Arc, Mutex, MutexGuard, PoisonError},
};

use tokio::sync::Notify;

/// Capacity kept once the queue is empty again after a burst.
const KEEP: usize = 4;

struct Shared<T> {
    state: Mutex<State<T>>,
    bound: usize,
    byte_bound: usize,
    /// Woken when an item is queued or the sender is gone.
    readable: Notify,
    /// Woken when an item is taken or the receiver is gone.
    writable: Notify,
}

struct State<T> {
    items: VecDeque<(T, usize)>,
    /// The sum of the queued items' weights.
    bytes: usize,
    sender_gone: bool,
    receiver_gone: bool,
}

impl<T> Shared<T> {
    fn state(&self) -> MutexGuard<'_, State<T>> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Why an item was not queued.
#[derive(Debug)]
pub(crate) enum TrySendError<T> {
    /// The queue holds `bound` items, or the item's weight would take it over the byte bound.
    Full(T),
    /// The receiver is gone.
    Closed,
}

/// The reader's end.
pub(crate) struct Sender<T>(Arc<Shared<T>>);

/// The dispatcher's end.
pub(crate) struct Receiver<T>(Arc<Shared<T>>);

/// A queue of at most `bound` items (at least 1) weighing at most `byte_bound` together.
pub(crate) fn bounded<T>(bound: usize, byte_bound: usize) -> (Sender<T>, Receiver<T>) {
    let shared = Arc::new(Shared {
        state: Mutex::new(State {
            items: VecDeque::new(),
            bytes: 0,
            sender_gone: false,
            receiver_gone: false,
        }),
        bound: bound.max(1),
        byte_bound,
        readable: Notify::new(),
        writable: Notify::new(),
    });
    (Sender(shared.clone()), Receiver(shared))
}

impl<T> Sender<T> {
    /// Queues `item` of `weight` bytes unless the queue is full or the receiver is gone.
    pub(crate) fn try_send(&self, item: T, weight: usize) -> Result<(), TrySendError<T>> {
        let mut state = self.0.state();
        if state.receiver_gone {
            return Err(TrySendError::Closed);
        }
        let heavy =
            !state.items.is_empty() && state.bytes.saturating_add(weight) > self.0.byte_bound;
        if state.items.len() >= self.0.bound || heavy {
            return Err(TrySendError::Full(item));
        }
        state.bytes = state.bytes.saturating_add(weight);
        state.items.push_back((item, weight));
        drop(state);
        self.0.readable.notify_one();
        Ok(())
    }

    /// Queues `item` of `weight` bytes, waiting for room; `Err` if the receiver is gone.
    pub(crate) async fn send(&self, mut item: T, weight: usize) -> Result<(), ()> {
        loop {
            // Registered before the check: a wake between the check and the wait is kept.
            let writable = self.0.writable.notified();
            match self.try_send(item, weight) {
                Ok(()) => return Ok(()),
                Err(TrySendError::Closed) => return Err(()),
                Err(TrySendError::Full(back)) => item = back,
            }
            writable.await;
        }
    }
}

impl<T> Drop for Sender<T> {
    fn drop(&mut self) {
        self.0.state().sender_gone = true;
        self.0.readable.notify_one();
    }
}

impl<T> Receiver<T> {
    /// The next item; `None` once the sender is gone and everything was taken.
    pub(crate) async fn recv(&mut self) -> Option<T> {
        loop {
            let readable = self.0.readable.notified();
            {
                let mut state = self.0.state();
                if let Some((item, weight)) = state.items.pop_front() {
                    state.bytes -= weight;
                    if state.items.is_empty() && state.items.capacity() > KEEP {
                        state.items.shrink_to(KEEP);
                    }
                    drop(state);
                    self.0.writable.notify_one();
                    return Some(item);
                }
                if state.sender_gone {
                    return None;
                }
            }
            readable.await;
        }
    }

    /// How many items are queued.
    pub(crate) fn len(&self) -> usize {
        self.0.state().items.len()
    }
}

impl<T> Sender<T> {
    /// How many items are queued, and their weight.
    pub(crate) fn depth(&self) -> (usize, usize) {
        let state = self.0.state();
        (state.items.len(), state.bytes)
    }
}

impl<T> Drop for Receiver<T> {
    fn drop(&mut self) {
        let mut state = self.0.state();
        state.receiver_gone = true;
        state.items.clear();
        state.bytes = 0;
        drop(state);
        self.0.writable.notify_one();
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    const WAIT: Duration = Duration::from_secs(5);

    #[tokio::test]
    async fn items_come_out_in_order_and_the_bound_holds() {
        let (tx, mut rx) = bounded(2, usize::MAX);
        tx.try_send(1, 1).unwrap();
        tx.try_send(2, 1).unwrap();
        assert!(matches!(tx.try_send(3, 1), Err(TrySendError::Full(3))));
        assert_eq!(rx.len(), 2);
        assert_eq!(rx.recv().await, Some(1));
        tx.try_send(3, 1).unwrap();
        assert_eq!(rx.recv().await, Some(2));
        assert_eq!(rx.recv().await, Some(3));
        drop(tx);
        assert_eq!(rx.recv().await, None);
    }

    #[tokio::test]
    async fn a_full_queue_makes_the_sender_wait_until_an_item_is_taken() {
        let (tx, mut rx) = bounded(1, usize::MAX);
        tx.try_send(1, 1).unwrap();
        let sender = tokio::spawn(async move {
            tx.send(2, 1).await.unwrap();
            tx
        });
        tokio::task::yield_now().await;
        assert!(!sender.is_finished());
        assert_eq!(rx.recv().await, Some(1));
        let _tx = tokio::time::timeout(WAIT, sender).await.unwrap().unwrap();
        assert_eq!(rx.recv().await, Some(2));
    }

    #[tokio::test]
    async fn a_waiting_receiver_is_woken_by_an_item_and_by_the_senders_end() {
        let (tx, mut rx) = bounded::<u32>(4, usize::MAX);
        let receiver = tokio::spawn(async move {
            let first = rx.recv().await;
            let end = rx.recv().await;
            (first, end)
        });
        tokio::task::yield_now().await;
        tx.try_send(7, 1).unwrap();
        drop(tx);
        let (first, end) = tokio::time::timeout(WAIT, receiver).await.unwrap().unwrap();
        assert_eq!((first, end), (Some(7), None));
    }

    #[tokio::test]
    async fn a_gone_receiver_fails_the_sender_also_while_it_waits() {
        let (tx, rx) = bounded(1, usize::MAX);
        tx.try_send(1, 1).unwrap();
        let sender = tokio::spawn(async move { tx.send(2, 1).await });
        tokio::task::yield_now().await;
        drop(rx);
        let sent = tokio::time::timeout(WAIT, sender).await.unwrap().unwrap();
        assert!(sent.is_err());
    }

    #[tokio::test]
    async fn the_byte_bound_holds_but_one_heavy_item_still_passes_alone() {
        let (tx, mut rx) = bounded(100, 10);
        tx.try_send(1, 6).unwrap();
        assert!(matches!(tx.try_send(2, 5), Err(TrySendError::Full(2))));
        tx.try_send(2, 4).unwrap();
        assert_eq!(tx.depth(), (2, 10));
        assert_eq!(rx.recv().await, Some(1));
        assert_eq!(rx.recv().await, Some(2));
        assert_eq!(tx.depth(), (0, 0));
        // Heavier than the whole bound: taken, but only into an empty queue.
        tx.try_send(3, 1000).unwrap();
        assert!(matches!(tx.try_send(4, 1), Err(TrySendError::Full(4))));
        assert_eq!(rx.recv().await, Some(3));
        tx.try_send(4, 1).unwrap();
    }

    #[tokio::test]
    async fn an_emptied_queue_gives_back_the_memory_of_a_burst() {
        let (tx, mut rx) = bounded(256, usize::MAX);
        for i in 0..256 {
            tx.try_send(i, 1).unwrap();
        }
        for _ in 0..256 {
            rx.recv().await.unwrap();
        }
        assert!(rx.0.state().items.capacity() <= KEEP);
    }
}
