//! The bounded queue between the connection's reader task and one [`crate::Subscription`].
//!
//! A mutex-guarded `VecDeque`: the reader pushes a batch of messages per lock; the subscription takes
//! everything queued in one swap and then hands messages out without locking, so a burst of
//! deliveries costs the consumer one lock and at most one wake-up, not one per message. The
//! reader is woken only when it waited for room and the subscription has emptied the queue.
//!
//! The bound covers every message received and not yet handed out, in the shared queue and in
//! the subscription's local batch alike: at most `capacity` messages and `max_bytes` bytes (one
//! message of any size is taken when nothing is held, so a large message cannot wedge it).
//!
//! It also remembers the sequence number of the last message queued, under the same lock as the
//! queue itself: a replay subscription made again after a reconnect starts right after it, so
//! the position never runs ahead of, or behind, what the subscription will actually yield.

use crate::subscription::Message;
use parking_lot::Mutex;
use std::collections::VecDeque;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

struct State {
    queue: VecDeque<Message>,
    /// Bytes of the messages in `queue`.
    queue_bytes: usize,
    /// Messages and bytes the receiver took in its last swap and has not yet finished handing
    /// out (released when it comes back for more).
    local_msgs: usize,
    local_bytes: usize,
    senders: usize,
    receiver_closed: bool,
    receiver: Option<Waker>,
    sender: Option<Waker>,
    /// `seq` of the last message queued (0 before the first).
    last_seq: u64,
}

struct Shared {
    state: Mutex<State>,
    capacity: usize,
    max_bytes: usize,
}

impl State {
    /// How many of `batch`'s first messages fit, and their bytes.
    fn room(&self, capacity: usize, max_bytes: usize, batch: &[Message]) -> (usize, usize) {
        let held = self.queue.len() + self.local_msgs;
        let mut bytes = self.queue_bytes + self.local_bytes;
        let mut added = 0;
        for (n, m) in batch.iter().enumerate() {
            let size = size(m);
            let msgs = held + n;
            let fits = msgs == 0 || (msgs < capacity && bytes.saturating_add(size) <= max_bytes);
            if !fits {
                return (n, added);
            }
            bytes = bytes.saturating_add(size);
            added += size;
        }
        (batch.len(), added)
    }

    /// Hands the whole queue to the receiver's (empty) local batch.
    fn take_all(&mut self, local: &mut VecDeque<Message>) {
        std::mem::swap(&mut self.queue, local);
        self.local_msgs = local.len();
        self.local_bytes = std::mem::take(&mut self.queue_bytes);
    }
}

/// What a message counts for against the byte bound.
fn size(m: &Message) -> usize {
    m.body.len()
}

/// The reader's end. Cloning adds a sender; the queue ends when every sender is dropped.
pub(crate) struct Sender(Arc<Shared>);

/// The subscription's end.
pub(crate) struct Receiver {
    shared: Arc<Shared>,
    /// Messages already taken out of the shared queue.
    local: VecDeque<Message>,
}

/// A queue holding at most `capacity` messages and `max_bytes` bytes.
pub(crate) fn channel(capacity: usize, max_bytes: usize) -> (Sender, Receiver) {
    let shared = Arc::new(Shared {
        state: Mutex::new(State {
            queue: VecDeque::new(),
            queue_bytes: 0,
            local_msgs: 0,
            local_bytes: 0,
            senders: 1,
            receiver_closed: false,
            receiver: None,
            sender: None,
            last_seq: 0,
        }),
        capacity: capacity.max(1),
        max_bytes: max_bytes.max(1),
    });
    (
        Sender(shared.clone()),
        Receiver {
            shared,
            local: VecDeque::new(),
        },
    )
}

fn wake(w: Option<Waker>) {
    if let Some(w) = w {
        w.wake();
    }
}

impl Sender {
    /// Queues every message in `batch` (emptying it) in order, waiting for room as needed, with
    /// one lock and at most one wake-up of the subscription per time room is found. `Err` when
    /// the subscription is gone; what was not queued is dropped.
    pub(crate) async fn send_all(&self, batch: &mut Vec<Message>) -> Result<(), ()> {
        std::future::poll_fn(|cx| {
            let mut st = self.0.state.lock();
            if st.receiver_closed {
                batch.clear();
                return Poll::Ready(Err(()));
            }
            let (n, bytes) = st.room(self.0.capacity, self.0.max_bytes, batch);
            if let Some(last) = n.checked_sub(1).and_then(|i| batch.get(i)) {
                st.last_seq = last.seq;
            }
            st.queue_bytes += bytes;
            st.queue.extend(batch.drain(..n));
            let w = if n > 0 { st.receiver.take() } else { None };
            if batch.is_empty() {
                drop(st);
                wake(w);
                return Poll::Ready(Ok(()));
            }
            st.sender = Some(cx.waker().clone());
            drop(st);
            wake(w);
            Poll::Pending
        })
        .await
    }
}

impl Sender {
    /// The `seq` of the last message queued, 0 before the first; a message the receiver
    /// refused (it was closed) does not count.
    pub(crate) fn last_seq(&self) -> u64 {
        self.0.state.lock().last_seq
    }
}

impl Clone for Sender {
    fn clone(&self) -> Sender {
        self.0.state.lock().senders += 1;
        Sender(self.0.clone())
    }
}

impl Drop for Sender {
    fn drop(&mut self) {
        let mut st = self.0.state.lock();
        st.senders -= 1;
        let w = if st.senders == 0 {
            st.receiver.take()
        } else {
            None
        };
        drop(st);
        wake(w);
    }
}

impl Receiver {
    /// The next message; `Ready(None)` once the queue is empty and closed or without senders.
    pub(crate) fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<Option<Message>> {
        if let Some(m) = self.local.pop_front() {
            return Poll::Ready(Some(m));
        }
        let mut st = self.shared.state.lock();
        if refill(&mut st, &mut self.local) {
            drop(st);
            return Poll::Ready(self.local.pop_front());
        }
        if st.senders == 0 || st.receiver_closed {
            return Poll::Ready(None);
        }
        if !st
            .receiver
            .as_ref()
            .is_some_and(|w| w.will_wake(cx.waker()))
        {
            st.receiver = Some(cx.waker().clone());
        }
        Poll::Pending
    }

    /// Waits for the next message; `None` once the queue has ended.
    pub(crate) async fn recv(&mut self) -> Option<Message> {
        std::future::poll_fn(|cx| self.poll_recv(cx)).await
    }

    /// A message already queued, without waiting.
    pub(crate) fn try_recv(&mut self) -> Option<Message> {
        if let Some(m) = self.local.pop_front() {
            return Some(m);
        }
        let mut st = self.shared.state.lock();
        refill(&mut st, &mut self.local);
        drop(st);
        self.local.pop_front()
    }

    /// Refuses further messages; those already queued can still be received.
    pub(crate) fn close(&mut self) {
        let mut st = self.shared.state.lock();
        st.receiver_closed = true;
        let w = st.sender.take();
        drop(st);
        wake(w);
    }
}

/// With the local batch handed out: releases its room, takes whatever is queued, and wakes a
/// reader that waits for room. Whether anything was taken.
fn refill(st: &mut State, local: &mut VecDeque<Message>) -> bool {
    let freed = st.local_msgs > 0;
    st.take_all(local);
    if freed || !local.is_empty() {
        wake(st.sender.take());
    }
    !local.is_empty()
}

impl Drop for Receiver {
    fn drop(&mut self) {
        // A reader waiting for room must not wait for a subscription that is gone.
        self.close();
    }
}

impl std::fmt::Debug for Receiver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Receiver")
            .field("local", &self.local.len())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::task::Waker;

    fn msg(seq: u64) -> Message {
        Message::for_test(seq)
    }

    /// Offers messages `seqs` once, without waiting: how many were queued, and whether the
    /// subscription was gone.
    fn offer(tx: &Sender, seqs: &[u64]) -> (usize, bool) {
        let mut batch: Vec<Message> = seqs.iter().map(|&s| msg(s)).collect();
        let mut cx = Context::from_waker(Waker::noop());
        let outcome = std::pin::pin!(tx.send_all(&mut batch)).poll(&mut cx);
        match outcome {
            Poll::Ready(r) => (seqs.len(), r.is_err()),
            Poll::Pending => (seqs.len() - batch.len(), false),
        }
    }

    #[test]
    fn bounded_fifo_that_ends_when_senders_go() {
        let (tx, mut rx) = channel(2, usize::MAX);
        assert_eq!(offer(&tx, &[1, 2, 3]), (2, false));
        let mut cx = Context::from_waker(Waker::noop());
        assert_eq!(
            rx.poll_recv(&mut cx).map(|m| m.map(|m| m.seq())),
            Poll::Ready(Some(1))
        );
        // The swap took both, and one is still held locally: no room until it is read.
        assert_eq!(offer(&tx, &[3]), (0, false));
        assert_eq!(rx.try_recv().map(|m| m.seq()), Some(2));
        assert_eq!(offer(&tx, &[3]), (0, false));
        // Coming back for more releases the local batch's room.
        assert_eq!(rx.try_recv().map(|m| m.seq()), None);
        assert_eq!(offer(&tx, &[3]), (1, false));
        assert_eq!(rx.try_recv().map(|m| m.seq()), Some(3));
        assert!(rx.poll_recv(&mut cx).is_pending());
        drop(tx);
        assert_eq!(
            rx.poll_recv(&mut cx).map(|m| m.is_none()),
            Poll::Ready(true)
        );
    }

    #[test]
    fn a_batch_larger_than_the_queue_waits_for_room_and_keeps_order() {
        let (tx, mut rx) = channel(2, usize::MAX);
        let mut batch: Vec<Message> = (1..=5).map(msg).collect();
        let mut cx = Context::from_waker(Waker::noop());
        let mut fut = std::pin::pin!(tx.send_all(&mut batch));
        let mut got = Vec::new();
        let mut polls = 0;
        while fut.as_mut().poll(&mut cx).is_pending() {
            polls += 1;
            assert!(polls < 10, "the batch never went through");
            while let Some(m) = rx.try_recv() {
                got.push(m.seq());
            }
        }
        // Two at a time: 1-2, then 3-4, then 5.
        assert_eq!(polls, 2);
        while let Some(m) = rx.try_recv() {
            got.push(m.seq());
        }
        assert_eq!(got, [1, 2, 3, 4, 5]);
    }

    #[test]
    fn the_byte_bound_counts_queued_and_local_messages_and_takes_one_large_one() {
        let sized = |seq, n: usize| {
            let mut m = msg(seq);
            m.body = brokerd_proto::Body::parse(brokerd_proto::Body::encode(
                "t",
                None,
                None,
                &vec![0u8; n],
            ))
            .expect("valid body");
            m
        };
        let one = size(&sized(0, 100));
        let (tx, mut rx) = channel(100, 2 * one + one / 2);
        let offer_sized = |seqs: &[u64], n: usize| {
            let mut batch: Vec<Message> = seqs.iter().map(|&s| sized(s, n)).collect();
            let mut cx = Context::from_waker(Waker::noop());
            let before = batch.len();
            let _ = std::pin::pin!(tx.send_all(&mut batch)).poll(&mut cx);
            before - batch.len()
        };
        assert_eq!(offer_sized(&[1, 2, 3], 100), 2);
        // Taken into the local batch, they still count.
        assert_eq!(rx.try_recv().map(|m| m.seq()), Some(1));
        assert_eq!(offer_sized(&[3], 100), 0);
        assert_eq!(rx.try_recv().map(|m| m.seq()), Some(2));
        assert_eq!(rx.try_recv().map(|m| m.seq()), None);
        // Nothing held: one message over the whole bound still goes in, and alone.
        assert_eq!(offer_sized(&[3, 4], 10 * one), 1);
        assert_eq!(rx.try_recv().map(|m| m.seq()), Some(3));
    }

    #[test]
    fn the_last_seq_is_the_last_message_actually_queued() {
        let (tx, mut rx) = channel(2, usize::MAX);
        assert_eq!(tx.last_seq(), 0);
        // Only 7 and 9 fit: 12 was not queued, so it is not the position.
        assert_eq!(offer(&tx, &[7, 9, 12]), (2, false));
        assert_eq!(tx.last_seq(), 9);
        assert_eq!(rx.try_recv().map(|m| m.seq()), Some(7));
        assert_eq!(rx.try_recv().map(|m| m.seq()), Some(9));
        assert_eq!(rx.try_recv().map(|m| m.seq()), None);
        assert_eq!(offer(&tx, &[12]), (1, false));
        assert_eq!(tx.last_seq(), 12);
        rx.close();
        assert!(offer(&tx, &[13]).1);
        assert_eq!(tx.last_seq(), 12);
    }

    #[test]
    fn closing_or_dropping_the_receiver_refuses_senders() {
        let (tx, mut rx) = channel(4, usize::MAX);
        assert_eq!(offer(&tx, &[1]), (1, false));
        rx.close();
        assert!(offer(&tx, &[2]).1);
        assert_eq!(rx.try_recv().map(|m| m.seq()), Some(1));
        let (tx, rx) = channel(1, usize::MAX);
        drop(rx);
        assert!(offer(&tx, &[1]).1);
    }
}
