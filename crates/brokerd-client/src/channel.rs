//! The bounded queue between the connection's reader task and one [`crate::Subscription`].
//!
//! A mutex-guarded `VecDeque`: the reader pushes a batch of messages per lock; the subscription takes
//! everything queued in one swap and then hands messages out without locking, so a burst of
//! deliveries costs the consumer one lock and at most one wake-up, not one per message. The
//! reader is woken only when it waited for room and the subscription has emptied the queue.

use crate::subscription::Message;
use parking_lot::Mutex;
use std::collections::VecDeque;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

struct State {
    queue: VecDeque<Message>,
    senders: usize,
    receiver_closed: bool,
    receiver: Option<Waker>,
    sender: Option<Waker>,
}

struct Shared {
    state: Mutex<State>,
    capacity: usize,
}

/// The reader's end. Cloning adds a sender; the queue ends when every sender is dropped.
pub(crate) struct Sender(Arc<Shared>);

/// The subscription's end.
pub(crate) struct Receiver {
    shared: Arc<Shared>,
    /// Messages already taken out of the shared queue.
    local: VecDeque<Message>,
}

/// A queue holding at most `capacity` messages.
pub(crate) fn channel(capacity: usize) -> (Sender, Receiver) {
    let shared = Arc::new(Shared {
        state: Mutex::new(State {
            queue: VecDeque::new(),
            senders: 1,
            receiver_closed: false,
            receiver: None,
            sender: None,
        }),
        capacity: capacity.max(1),
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
            let room = self.0.capacity.saturating_sub(st.queue.len());
            let n = room.min(batch.len());
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
        if !st.queue.is_empty() {
            std::mem::swap(&mut st.queue, &mut self.local);
            let w = st.sender.take();
            drop(st);
            wake(w);
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
        if st.queue.is_empty() {
            return None;
        }
        std::mem::swap(&mut st.queue, &mut self.local);
        let w = st.sender.take();
        drop(st);
        wake(w);
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
        let (tx, mut rx) = channel(2);
        assert_eq!(offer(&tx, &[1, 2, 3]), (2, false));
        let mut cx = Context::from_waker(Waker::noop());
        assert_eq!(
            rx.poll_recv(&mut cx).map(|m| m.map(|m| m.seq())),
            Poll::Ready(Some(1))
        );
        // The swap took both: the queue has room again while one is still local.
        assert_eq!(offer(&tx, &[3]), (1, false));
        assert_eq!(rx.try_recv().map(|m| m.seq()), Some(2));
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
        let (tx, mut rx) = channel(2);
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
    fn closing_or_dropping_the_receiver_refuses_senders() {
        let (tx, mut rx) = channel(4);
        assert_eq!(offer(&tx, &[1]), (1, false));
        rx.close();
        assert!(offer(&tx, &[2]).1);
        assert_eq!(rx.try_recv().map(|m| m.seq()), Some(1));
        let (tx, rx) = channel(1);
        drop(rx);
        assert!(offer(&tx, &[1]).1);
    }
}
