//! One connection's bounded outbound queue and its overflow policy.
//!
//! Publishers' reader tasks push deliveries; the connection's own reader pushes control frames
//! (`OK`, `ACK`, `ERR`, `PONG`); the connection's one writer task takes everything in a single swap
//! and writes it to the socket, then releases what it wrote. Deliveries are bounded by messages and
//! bytes, with the connection's [`OverflowPolicy`] deciding what a full queue drops; every drop is
//! counted per subscription and reported to the subscriber as a `LOST` frame ahead of the next batch.
//! Control frames are never dropped, but they count against the same limits: a delivery finds less
//! room behind them, and the connection's reader stops reading while its own unwritten replies
//! hold half the limits ([`Outbox::poll_room`]).
//!
//! Stored deliveries (replays and durable consumers, [`Outbox::push_stored`]) meet tighter bounds
//! of their own ([`STORED_MAX_MSGS`], [`STORED_MAX_BYTES`]): what they have not yet queued waits on
//! disk, so a subscriber that stops reading holds two replay batches here, not its whole limits.
//!
//! Everything queued is reserved from the broker's [`MemoryBudget`] in steps of at least
//! [`RESERVE_STEP`] (so that a busy queue touches the shared counter once per step, not per
//! message), and given back as the writer releases it. While the budget is over, a delivery to a
//! queue holding more than its shedding threshold meets the overflow policy as if the queue were
//! full.
//!
//! Runtime-free: the writer and the reader wait through `std::task::Waker`s. The lock is a leaf and
//! wakers are woken after it is released.

use crate::close::CloseReason;
use crate::memory::MemoryBudget;
use crate::permissions::{ResponsePermits, ResponsePolicy};
use crate::subscription::Subscription;
use brokerd_proto::{MSG_HEADER_LEN, OverflowPolicy};
use bytes::Bytes;
use parking_lot::Mutex;
use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll, Waker};

/// Limits of one outbox, from configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutboxLimits {
    /// Most deliveries pending (queued or being written).
    pub max_msgs: usize,
    /// Most delivery bytes pending, `MSG` headers included.
    pub max_bytes: usize,
    /// Backpressure: a delivery that finds the queue full is queued anyway, up to an eighth over
    /// the limits ([`Push::Pressed`]), and the publisher waits a bounded time for the queue to
    /// drain ([`Outbox::poll_drained`]) instead of the overflow policy dropping it; a queue that
    /// does not drain in that time is stalled ([`Outbox::mark_stalled`]) and gets its policy
    /// until it is down to half its limits. Off: the policy decides at once.
    pub press: bool,
}

/// Something the writer task writes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Item {
    /// A delivery: the writer prefixes the `MSG` header to the shared body.
    Msg {
        /// Subscription id.
        sid: u32,
        /// Per-subscription sequence number.
        seq: u64,
        /// The publisher's body bytes, shared by every subscriber.
        body: Bytes,
    },
    /// A `LOST` notice for a subscription.
    Lost {
        /// Subscription id.
        sid: u32,
        /// Drops since the previous notice.
        missed: u64,
    },
    /// A complete encoded control frame.
    Frame(Bytes),
}

impl Item {
    /// Bytes this item puts on the wire.
    pub fn wire_len(&self) -> usize {
        match self {
            Item::Msg { body, .. } => MSG_HEADER_LEN + body.len(),
            Item::Lost { .. } => 17,
            Item::Frame(b) => b.len(),
        }
    }
}

/// What happened to one delivery offered to an outbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Push {
    /// Queued.
    Queued,
    /// Queued, and it was the last one an auto-unsubscribe allowed: remove the subscription.
    QueuedLast,
    /// Dropped because the queue was full (drop-new), or queued by dropping an older one
    /// (drop-old reports `Queued`; the victim is counted against its own subscription).
    Dropped,
    /// Dropped, and it used up an auto-unsubscribe's allowance: remove the subscription.
    DroppedLast,
    /// The subscription is finished or the connection is closing: not counted at all.
    Skipped,
    /// The queue overflowed under the disconnect policy; the connection is now closing.
    Overflow,
    /// Queued over the limits (see [`OutboxLimits::press`]): the publisher should wait for this
    /// outbox ([`Outbox::poll_drained`]) before publishing more.
    Pressed,
    /// [`Push::Pressed`], and the last one an auto-unsubscribe allowed.
    PressedLast,
}

impl Push {
    /// Whether the message counts as delivered (queued for the subscriber).
    pub fn delivered(self) -> bool {
        matches!(
            self,
            Push::Queued | Push::QueuedLast | Push::Pressed | Push::PressedLast
        )
    }

    /// Whether the subscription reached its auto-unsubscribe limit with this message.
    pub fn finished(self) -> bool {
        matches!(
            self,
            Push::QueuedLast | Push::DroppedLast | Push::PressedLast
        )
    }

    /// Whether the publisher should wait for the outbox to drain.
    pub fn pressed(self) -> bool {
        matches!(self, Push::Pressed | Push::PressedLast)
    }
}

/// What happened to a stored message offered to a replay subscription
/// ([`Outbox::push_stored`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stored {
    /// Queued.
    Queued,
    /// Queued, and it was the last one an auto-unsubscribe allowed: remove the subscription.
    QueuedLast,
    /// No room: nothing happened; offer it again once there is room.
    Full,
    /// The subscription is finished or the connection is closing.
    Ended,
}

/// What [`Outbox::poll_take`] produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Take {
    /// Items were moved into the caller's batch.
    Items,
    /// Nothing more will come: write any error for this reason and close.
    Closed(CloseReason),
}

/// How far over a limit backpressure may queue: an eighth of it, at least one. Each waiting
/// publisher has put at most one delivery over the limit before it stopped to wait, so this
/// covers that many publishers pressing one queue at once.
fn headroom(limit: usize) -> usize {
    (limit / 8).max(1)
}

/// Publishers that may wait on one outbox at once ([`Outbox::poll_drained`]); more go on
/// without waiting.
const MAX_DRAIN_WAITERS: usize = 1024;

/// The smallest step in which an outbox reserves bytes from the broker's budget.
pub const RESERVE_STEP: usize = 4 * 1024;

/// Most messages a queue may hold for a stored delivery to be queued behind them
/// ([`Outbox::push_stored`]), or the client's `max_msgs` when lower: two replay batches of 512.
/// A replay or a durable consumer is refilled at half of it ([`Outbox::poll_replay_room`]), so the
/// writer always has a batch to write while the next is queued, and a subscriber that stops
/// reading holds no more than this while the rest waits on disk.
pub const STORED_MAX_MSGS: usize = 1024;

/// Most bytes a queue may hold for a stored delivery to be queued behind them, or the client's
/// `max_bytes` when lower: two replay batches of 1 MiB (see [`STORED_MAX_MSGS`]).
pub const STORED_MAX_BYTES: usize = 2 << 20;

/// Counters of one outbox, for monitoring.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct OutboxStats {
    /// Deliveries pending (queued or being written).
    pub pending_msgs: usize,
    /// Delivery bytes pending.
    pub pending_bytes: usize,
    /// Control frames (replies, errors, pongs) pending.
    pub pending_controls: usize,
    /// Control frame bytes pending.
    pub pending_control_bytes: usize,
    /// Deliveries ever queued.
    pub queued: u64,
    /// Deliveries ever dropped by the overflow policy.
    pub dropped: u64,
    /// Milliseconds (on the coarse [`crate::clock`]) the oldest pending delivery has at most
    /// been waiting: since the queue last went from empty to not empty, or since the writer
    /// took the batch before the one pending now. 0 when nothing is pending.
    pub pending_age_ms: u64,
}

struct Closing {
    reason: CloseReason,
    /// Deliver what is already queued before reporting the close.
    drain: bool,
}

struct State {
    queue: VecDeque<Item>,
    /// Deliveries counted against the limit: queued plus taken but not yet released.
    msgs: usize,
    bytes: usize,
    /// Control frames queued or being written, and their bytes.
    controls: usize,
    control_bytes: usize,
    /// Bytes reserved from the memory budget: at least `bytes + control_bytes`.
    reserved: usize,
    /// Unreported drops per subscription id.
    lost: HashMap<u32, u64>,
    queued: u64,
    dropped: u64,
    /// Coarse time since when the deliveries pending now have been waiting at most.
    pending_since_ms: u64,
    /// Set when a publisher waited for this queue to drain for its whole bounded wait: until the
    /// queue is down to half its limits, the overflow policy decides at once.
    stalled: bool,
    /// Publishers waiting for the queue to drain ([`Outbox::poll_drained`]).
    drain_waiters: Vec<Waker>,
    /// Replay and consumer tasks waiting for room ([`Outbox::poll_replay_room`]): at most one
    /// per replay subscription of this connection and one per durable consumer it is a member of.
    replay_waiters: Vec<Waker>,
    /// Coarse time of the writer's last take: deliveries still pending after that batch is
    /// released all arrived after it.
    taken_ms: u64,
    writer: Option<Waker>,
    reader: Option<Waker>,
    closing: Option<Closing>,
}

impl State {
    /// Empties the queue and pending notices, releasing their room; with `count`, each delivery
    /// counts as dropped.
    fn abandon_queue(&mut self, count: bool) {
        for item in std::mem::take(&mut self.queue) {
            match item {
                Item::Msg { body, .. } => {
                    self.msgs -= 1;
                    self.bytes -= MSG_HEADER_LEN + body.len();
                    if count {
                        self.dropped += 1;
                    }
                }
                Item::Frame(f) => {
                    self.controls -= 1;
                    self.control_bytes -= f.len();
                }
                Item::Lost { .. } => {}
            }
        }
        self.lost.clear();
    }

    /// Everything pending, deliveries and control frames, in messages and bytes.
    fn held(&self) -> (usize, usize) {
        (self.msgs + self.controls, self.bytes + self.control_bytes)
    }

    /// Reserves from `budget` whatever is held beyond the reservation, in steps.
    fn reserve(&mut self, budget: &MemoryBudget) {
        let held = self.held().1;
        if held > self.reserved {
            let step = (held - self.reserved).max(RESERVE_STEP).max(held / 16);
            self.reserved += step;
            budget.charge(step);
        }
    }

    /// Gives back to `budget` what the reservation holds well beyond what is held. A drained
    /// queue keeps one step reserved (given back when the outbox goes), so that a subscriber whose
    /// writer keeps up does not touch the shared counter twice per batch.
    fn unreserve(&mut self, budget: &MemoryBudget) {
        let held = self.held().1;
        let keep = held + RESERVE_STEP;
        if self.reserved > keep + held / 4 + RESERVE_STEP {
            budget.credit(self.reserved - keep);
            self.reserved = keep;
        }
    }
}

/// A connection's bounded outbound queue.
pub struct Outbox {
    state: Mutex<State>,
    budget: Arc<MemoryBudget>,
    /// The id of the connection it belongs to.
    owner: u64,
    policy: OverflowPolicy,
    limits: OutboxLimits,
    /// Permits to answer requests queued here, for a user allowed to answer its requests.
    responses: Option<Box<ResponsePermits>>,
}

impl Outbox {
    /// An empty outbox for the connection with id `owner`, with a budget of its own that is
    /// never reached.
    pub fn new(owner: u64, policy: OverflowPolicy, limits: OutboxLimits) -> Outbox {
        Outbox::with_budget(owner, policy, limits, Arc::new(MemoryBudget::unlimited()))
    }

    /// An empty outbox for the connection with id `owner`, reserving what it queues from
    /// `budget`.
    pub fn with_budget(
        owner: u64,
        policy: OverflowPolicy,
        limits: OutboxLimits,
        budget: Arc<MemoryBudget>,
    ) -> Outbox {
        Outbox {
            owner,
            budget,
            state: Mutex::new(State {
                queue: VecDeque::new(),
                msgs: 0,
                bytes: 0,
                controls: 0,
                control_bytes: 0,
                reserved: 0,
                lost: HashMap::new(),
                queued: 0,
                pending_since_ms: 0,
                stalled: false,
                drain_waiters: Vec::new(),
                replay_waiters: Vec::new(),
                taken_ms: 0,
                dropped: 0,
                writer: None,
                reader: None,
                closing: None,
            }),
            policy,
            limits,
            responses: None,
        }
    }

    /// The same outbox, granting a permit to answer each request queued in it under `policy`.
    pub fn with_responses(mut self, policy: ResponsePolicy) -> Outbox {
        self.responses = Some(Box::new(ResponsePermits::new(policy)));
        self
    }

    /// Its permits to answer requests, if its user may answer requests.
    pub fn responses(&self) -> Option<&ResponsePermits> {
        self.responses.as_deref()
    }

    /// The id of the connection it belongs to.
    pub fn owner(&self) -> u64 {
        self.owner
    }

    /// The overflow policy in force.
    pub fn policy(&self) -> OverflowPolicy {
        self.policy
    }

    /// The limits in force.
    pub fn limits(&self) -> OutboxLimits {
        self.limits
    }

    /// Offers one delivery for `sub` (which must belong to this outbox's connection).
    ///
    /// Assigns the subscription's next sequence number whether or not the message is queued, so
    /// the subscriber sees every drop as a gap. Never blocks beyond the short queue lock.
    pub fn push_msg(&self, sub: &Subscription, body: &Bytes) -> Push {
        self.push(sub, body, false).unwrap_or(Push::Skipped)
    }

    /// Offers one delivery for `sub` only if the outbox has room for it: `None` when it is full,
    /// with nothing counted or dropped, so a queue group can offer the message to another member.
    pub fn try_push_msg(&self, sub: &Subscription, body: &Bytes) -> Option<Push> {
        self.push(sub, body, true)
    }

    fn push(&self, sub: &Subscription, body: &Bytes, only_if_room: bool) -> Option<Push> {
        let mut st = self.state.lock();
        if st.closing.is_some() || sub.dead.load(Ordering::Relaxed) {
            return Some(Push::Skipped);
        }
        let cost = MSG_HEADER_LEN + body.len();
        // Control frames count against the limits too; an empty queue takes one delivery of any
        // size, unless the broker's memory budget says otherwise.
        let fits = |st: &State| {
            let (msgs, bytes) = st.held();
            !self.budget.sheds(bytes + cost)
                && (st.msgs == 0
                    || (msgs < self.limits.max_msgs && bytes + cost <= self.limits.max_bytes))
        };
        if only_if_room && !fits(&st) {
            return None;
        }
        // The counters below are only written under this lock, so plain loads and stores suffice.
        let seq = sub.seq.load(Ordering::Relaxed) + 1;
        sub.seq.store(seq, Ordering::Relaxed);
        let last = match sub.remaining.load(Ordering::Relaxed) {
            u64::MAX => false,
            n => {
                sub.remaining.store(n - 1, Ordering::Relaxed);
                if n == 1 {
                    sub.dead.store(true, Ordering::Relaxed);
                }
                n == 1
            }
        };
        // Over the limits of a queue that is draining: its writer has not caught up yet, and the
        // publisher will wait for it, so the delivery is queued (up to an eighth over the limits).
        let pressed = !fits(&st) && self.presses(&st, cost);
        if !fits(&st) && !pressed {
            match self.policy {
                OverflowPolicy::DropNew => {
                    *st.lost.entry(sub.sid).or_insert(0) += 1;
                    st.dropped += 1;
                    return Some(if last {
                        Push::DroppedLast
                    } else {
                        Push::Dropped
                    });
                }
                OverflowPolicy::DropOld => {
                    // Evicting is only worth it if evicting every queued delivery would make room;
                    // otherwise it would lose older messages and still drop this one.
                    let (mut held_msgs, mut held_bytes) = st.held();
                    let mut deliveries = st.msgs;
                    for it in st.queue.iter().filter(|it| matches!(it, Item::Msg { .. })) {
                        held_msgs -= 1;
                        deliveries -= 1;
                        held_bytes -= it.wire_len();
                    }
                    let room_after_eviction = deliveries == 0
                        || (held_msgs < self.limits.max_msgs
                            && held_bytes + cost <= self.limits.max_bytes);
                    while room_after_eviction && !fits(&st) {
                        let Some(i) = st
                            .queue
                            .iter()
                            .position(|it| matches!(it, Item::Msg { .. }))
                        else {
                            break;
                        };
                        if let Some(Item::Msg { sid, body, .. }) = st.queue.remove(i) {
                            st.msgs -= 1;
                            st.bytes -= MSG_HEADER_LEN + body.len();
                            *st.lost.entry(sid).or_insert(0) += 1;
                            st.dropped += 1;
                        }
                    }
                    if !fits(&st) {
                        // Everything older is already with the writer: the new one goes instead.
                        *st.lost.entry(sub.sid).or_insert(0) += 1;
                        st.dropped += 1;
                        return Some(if last {
                            Push::DroppedLast
                        } else {
                            Push::Dropped
                        });
                    }
                }
                OverflowPolicy::Disconnect => {
                    let reason = CloseReason::SlowConsumer {
                        pending_msgs: st.msgs,
                        pending_bytes: st.bytes,
                    };
                    st.closing = Some(Closing {
                        reason,
                        drain: false,
                    });
                    // What is abandoned here counts as dropped, and leaves the limits.
                    st.abandon_queue(true);
                    st.unreserve(&self.budget);
                    let w = st.writer.take();
                    let r = st.reader.take();
                    drop(st);
                    wake(w);
                    wake(r);
                    return Some(Push::Overflow);
                }
            }
        }
        self.enqueue(st, sub.sid, seq, body, cost);
        Some(match (last, pressed) {
            (false, false) => Push::Queued,
            (true, false) => Push::QueuedLast,
            (false, true) => Push::Pressed,
            (true, true) => Push::PressedLast,
        })
    }

    /// Queues a delivery that fits (or was let through) under the lock `st`, then releases the
    /// lock and wakes the writer.
    fn enqueue(
        &self,
        mut st: parking_lot::MutexGuard<'_, State>,
        sid: u32,
        seq: u64,
        body: &Bytes,
        cost: usize,
    ) {
        if st.msgs == 0 {
            st.pending_since_ms = crate::clock::now_ms();
        }
        st.msgs += 1;
        st.bytes += cost;
        st.reserve(&self.budget);
        st.queued += 1;
        st.queue.push_back(Item::Msg {
            sid,
            seq,
            body: body.clone(),
        });
        let w = st.writer.take();
        drop(st);
        wake(w);
    }

    /// Offers one stored message to a replay or consumer subscription: queued only if it fits
    /// the stored bounds (the client's limits, or [`STORED_MAX_MSGS`] and [`STORED_MAX_BYTES`]
    /// when lower, counting everything the queue holds, live deliveries and replies too; an empty
    /// queue takes one of any size), and otherwise left with the caller, nothing counted or
    /// dropped, so a stored message is never lost and never held here beyond those bounds; the
    /// caller waits for [`Outbox::poll_replay_room`] and offers it again. `seq` is the message's
    /// stream sequence.
    pub fn push_stored(&self, sub: &Subscription, seq: u64, body: &Bytes) -> Stored {
        let st = self.state.lock();
        if st.closing.is_some() || sub.dead.load(Ordering::Relaxed) {
            return Stored::Ended;
        }
        let cost = MSG_HEADER_LEN + body.len();
        if !self.stored_fits(&st, cost) {
            return Stored::Full;
        }
        // Written only under this lock, as in `push`.
        sub.seq
            .store(sub.seq.load(Ordering::Relaxed) + 1, Ordering::Relaxed);
        let last = match sub.remaining.load(Ordering::Relaxed) {
            u64::MAX => false,
            n => {
                sub.remaining.store(n - 1, Ordering::Relaxed);
                if n == 1 {
                    sub.dead.store(true, Ordering::Relaxed);
                }
                n == 1
            }
        };
        self.enqueue(st, sub.sid, seq, body, cost);
        if last {
            Stored::QueuedLast
        } else {
            Stored::Queued
        }
    }

    /// Ready when a replay or consumer may offer its next stored message, whose body is
    /// `body_len` bytes: the queue holds at most half the stored bounds (so that it is refilled
    /// a batch at a time, not one message per write) and that message fits; or the outbox is
    /// closing. The waker is woken when a write brings the queue down to half the bounds (a
    /// message too large to fit yet polls again then) or when the outbox closes; not when the
    /// memory budget stops shedding, so a caller also waits with a timeout.
    pub fn poll_replay_room(&self, cx: &mut Context<'_>, body_len: usize) -> Poll<()> {
        let mut st = self.state.lock();
        if st.closing.is_some()
            || (self.at_most_half(&st) && self.stored_fits(&st, MSG_HEADER_LEN + body_len))
        {
            return Poll::Ready(());
        }
        if !st.replay_waiters.iter().any(|w| w.will_wake(cx.waker())) {
            st.replay_waiters.push(cx.waker().clone());
        }
        Poll::Pending
    }

    /// The bounds stored deliveries meet, in messages and bytes: the client's limits, or
    /// [`STORED_MAX_MSGS`] and [`STORED_MAX_BYTES`] when lower.
    fn stored_limits(&self) -> (usize, usize) {
        (
            self.limits.max_msgs.min(STORED_MAX_MSGS),
            self.limits.max_bytes.min(STORED_MAX_BYTES),
        )
    }

    /// Whether a stored delivery of `cost` bytes may be queued now.
    fn stored_fits(&self, st: &State, cost: usize) -> bool {
        let (max_msgs, max_bytes) = self.stored_limits();
        let (msgs, bytes) = st.held();
        !self.budget.sheds(bytes + cost)
            && (st.msgs == 0 || (msgs < max_msgs && bytes + cost <= max_bytes))
    }

    /// Whether the queue holds at most half the stored bounds, and nothing the budget sheds.
    fn at_most_half(&self, st: &State) -> bool {
        let (max_msgs, max_bytes) = self.stored_limits();
        let (msgs, bytes) = st.held();
        msgs <= max_msgs / 2 && bytes <= max_bytes / 2 && !self.budget.sheds(bytes)
    }

    /// Whether a delivery of `cost` bytes that does not fit is queued anyway, for the publisher
    /// to wait on: backpressure is on, no publisher has given up waiting on this queue, the
    /// memory budget does not shed it, and it stays within the limits plus an eighth.
    fn presses(&self, st: &State, cost: usize) -> bool {
        let (msgs, bytes) = st.held();
        self.limits.press
            && !st.stalled
            && !self.budget.sheds(bytes + cost)
            && msgs < self.limits.max_msgs + headroom(self.limits.max_msgs)
            // The first delivery past the byte limit is always taken, however large: with a
            // limit of a few messages an eighth of it may be less than one.
            && (bytes <= self.limits.max_bytes
                || bytes + cost <= self.limits.max_bytes + headroom(self.limits.max_bytes))
    }

    /// Whether the deliveries held are under the limits, so that a publisher need not wait.
    fn under_limits(&self, st: &State) -> bool {
        let (msgs, bytes) = st.held();
        msgs < self.limits.max_msgs && bytes < self.limits.max_bytes
    }

    /// Ready once a publisher that pressed this queue ([`Push::Pressed`]) may go on: the queue
    /// is back under its limits, another publisher gave up waiting on it, or it is closing. The caller bounds the wait and calls
    /// [`Outbox::mark_stalled`] when the bound passes.
    pub fn poll_drained(&self, cx: &mut Context<'_>) -> Poll<()> {
        let mut st = self.state.lock();
        if self.under_limits(&st) || st.stalled || st.closing.is_some() {
            return Poll::Ready(());
        }
        if !st.drain_waiters.iter().any(|w| w.will_wake(cx.waker())) {
            if st.drain_waiters.len() >= MAX_DRAIN_WAITERS {
                // More publishers than that waiting on one queue: the rest do not wait.
                return Poll::Ready(());
            }
            st.drain_waiters.push(cx.waker().clone());
        }
        Poll::Pending
    }

    /// A publisher waited its whole bound for this queue: until it is down to half its limits,
    /// deliveries that do not fit go to the overflow policy at once, and nobody waits on it.
    pub fn mark_stalled(&self) {
        let mut st = self.state.lock();
        if !self.under_limits(&st) {
            st.stalled = true;
        }
        let waiters = std::mem::take(&mut st.drain_waiters);
        drop(st);
        waiters.into_iter().for_each(Waker::wake);
    }

    /// Ends `sub` after `max` more matched messages (queued or dropped); `0` ends it now.
    ///
    /// Returns whether the subscription is now finished.
    pub fn set_allowance(&self, sub: &Subscription, max: u64) -> bool {
        let _st = self.state.lock();
        if max == 0 {
            sub.dead.store(true, Ordering::Relaxed);
        } else if !sub.dead.load(Ordering::Relaxed) {
            sub.remaining.store(max, Ordering::Relaxed);
        }
        sub.dead.load(Ordering::Relaxed)
    }

    /// Queues an encoded control frame. Returns `false` when the outbox is closing.
    pub fn push_frame(&self, frame: Bytes) -> bool {
        let mut st = self.state.lock();
        if st.closing.is_some() {
            return false;
        }
        st.controls += 1;
        st.control_bytes += frame.len();
        st.reserve(&self.budget);
        st.queue.push_back(Item::Frame(frame));
        let w = st.writer.take();
        drop(st);
        wake(w);
        true
    }

    /// Moves everything pending into `batch` (which the writer keeps empty between calls).
    ///
    /// `LOST` notices for drops since the last take come first. Returns `Pending` and remembers
    /// the waker when there is nothing to write.
    pub fn poll_take(&self, cx: &mut Context<'_>, batch: &mut VecDeque<Item>) -> Poll<Take> {
        let mut st = self.state.lock();
        if let Some(c) = &st.closing
            && (!c.drain || (st.queue.is_empty() && st.lost.is_empty()))
        {
            return Poll::Ready(Take::Closed(c.reason.clone()));
        }
        std::mem::swap(&mut st.queue, batch);
        st.taken_ms = crate::clock::now_ms();
        for (sid, missed) in st.lost.drain() {
            batch.push_front(Item::Lost { sid, missed });
        }
        if batch.is_empty() {
            if !st.writer.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                st.writer = Some(cx.waker().clone());
            }
            return Poll::Pending;
        }
        Poll::Ready(Take::Items)
    }

    /// Tells the outbox the writer has put these items on the wire, freeing their room:
    /// `msgs` deliveries of `bytes` in all, and `controls` control frames of `control_bytes`.
    pub fn release(&self, msgs: usize, bytes: usize, controls: usize, control_bytes: usize) {
        let mut st = self.state.lock();
        st.msgs -= msgs;
        if msgs > 0 {
            // What is still pending was queued after the take this batch came from.
            st.pending_since_ms = st.taken_ms;
        }
        st.bytes -= bytes;
        st.controls -= controls;
        st.control_bytes -= control_bytes;
        st.unreserve(&self.budget);
        let r = if self.has_room(&st) {
            st.reader.take()
        } else {
            None
        };
        let (held_msgs, held_bytes) = st.held();
        if st.stalled
            && held_msgs <= self.limits.max_msgs / 2
            && held_bytes <= self.limits.max_bytes / 2
        {
            st.stalled = false;
        }
        let waiters = if !st.drain_waiters.is_empty() && self.under_limits(&st) {
            std::mem::take(&mut st.drain_waiters)
        } else {
            Vec::new()
        };
        let replays = if !st.replay_waiters.is_empty() && self.at_most_half(&st) {
            std::mem::take(&mut st.replay_waiters)
        } else {
            Vec::new()
        };
        drop(st);
        wake(r);
        waiters.into_iter().for_each(Waker::wake);
        replays.into_iter().for_each(Waker::wake);
    }

    /// Whether the connection's own unwritten replies leave its reader room to read more
    /// requests: less than half of each limit, and nothing the memory budget would shed.
    fn has_room(&self, st: &State) -> bool {
        st.controls < self.limits.max_msgs.div_ceil(2)
            && st.control_bytes < self.limits.max_bytes / 2
            && !self.budget.sheds(st.held().1)
    }

    /// Whether the reader may go on reading requests now (see [`Outbox::poll_room`]).
    pub fn has_room_now(&self) -> bool {
        let st = self.state.lock();
        self.has_room(&st) || st.closing.is_some()
    }

    /// Ready while the connection's reader may read more requests: its own replies pending hold
    /// less than half the limits and the budget does not shed this queue, or the outbox is
    /// closing.
    pub fn poll_room(&self, cx: &mut Context<'_>) -> Poll<()> {
        let mut st = self.state.lock();
        if self.has_room(&st) || st.closing.is_some() {
            return Poll::Ready(());
        }
        st.reader = Some(cx.waker().clone());
        Poll::Pending
    }

    /// Starts closing: no more pushes are accepted. With `drain`, the writer first writes what is
    /// queued; without, it stops at once. A second call keeps the first reason.
    pub fn close(&self, reason: CloseReason, drain: bool) {
        let mut st = self.state.lock();
        if st.closing.is_none() {
            st.closing = Some(Closing { reason, drain });
        }
        if !drain {
            // Nothing queued will be written: free it now rather than when the last handle to
            // this outbox goes (a publisher's route memo may hold one for a while).
            st.abandon_queue(false);
            st.unreserve(&self.budget);
        }
        let w = st.writer.take();
        let r = st.reader.take();
        let mut waiters = std::mem::take(&mut st.drain_waiters);
        waiters.append(&mut st.replay_waiters);
        drop(st);
        wake(w);
        wake(r);
        waiters.into_iter().for_each(Waker::wake);
    }

    /// The first reason given for closing, if closing.
    pub fn close_reason(&self) -> Option<CloseReason> {
        self.state.lock().closing.as_ref().map(|c| c.reason.clone())
    }

    /// Whether [`Outbox::close`] was called or the disconnect policy fired.
    pub fn is_closing(&self) -> bool {
        self.state.lock().closing.is_some()
    }

    /// Current counters.
    pub fn stats(&self) -> OutboxStats {
        let st = self.state.lock();
        OutboxStats {
            pending_msgs: st.msgs,
            pending_bytes: st.bytes,
            pending_controls: st.controls,
            pending_control_bytes: st.control_bytes,
            queued: st.queued,
            dropped: st.dropped,
            pending_age_ms: if st.msgs == 0 {
                0
            } else {
                crate::clock::now_ms().saturating_sub(st.pending_since_ms)
            },
        }
    }
}

impl Drop for Outbox {
    fn drop(&mut self) {
        // Whatever is still queued goes with the outbox.
        self.budget.credit(self.state.get_mut().reserved);
    }
}

fn wake(w: Option<Waker>) {
    if let Some(w) = w {
        w.wake();
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use brokerd_proto::Filter;
    use std::sync::Arc;
    use std::sync::atomic::AtomicUsize;
    use std::task::Wake;

    const UNLIMITED: usize = usize::MAX / 2;

    fn outbox(policy: OverflowPolicy, max_msgs: usize, max_bytes: usize) -> Arc<Outbox> {
        Arc::new(Outbox::new(
            1,
            policy,
            OutboxLimits {
                max_msgs,
                max_bytes,
                press: false,
            },
        ))
    }

    fn sub(sid: u32, outbox: &Arc<Outbox>) -> Subscription {
        Subscription::new(sid, Filter::new("t").unwrap(), None, outbox.clone())
    }

    /// A body of `len` bytes whose first byte is `tag`, so items can be told apart.
    fn body(tag: u8, len: usize) -> Bytes {
        let mut v = vec![0u8; len];
        if let Some(b) = v.first_mut() {
            *b = tag;
        }
        Bytes::from(v)
    }

    fn cost(len: usize) -> usize {
        MSG_HEADER_LEN + len
    }

    #[derive(Default)]
    struct CountingWaker(AtomicUsize);

    impl Wake for CountingWaker {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    impl CountingWaker {
        fn count(&self) -> usize {
            self.0.load(Ordering::SeqCst)
        }
    }

    /// One `poll_take` on a noop waker.
    fn take(ob: &Outbox) -> Poll<(Take, Vec<Item>)> {
        let mut batch = VecDeque::new();
        let mut cx = Context::from_waker(Waker::noop());
        ob.poll_take(&mut cx, &mut batch)
            .map(|t| (t, batch.into_iter().collect()))
    }

    /// Takes one batch, expecting items.
    fn take_items(ob: &Outbox) -> Vec<Item> {
        match take(ob) {
            Poll::Ready((Take::Items, items)) => {
                assert!(!items.is_empty());
                items
            }
            other => panic!("expected items, got {other:?}"),
        }
    }

    /// Releases what `items` counted against the outbox, as the writer does after writing them.
    fn release(ob: &Outbox, items: &[Item]) {
        let (mut msgs, mut bytes, mut controls, mut control_bytes) = (0, 0, 0, 0);
        for it in items {
            match it {
                Item::Msg { .. } => {
                    msgs += 1;
                    bytes += it.wire_len();
                }
                Item::Frame(f) => {
                    controls += 1;
                    control_bytes += f.len();
                }
                Item::Lost { .. } => {}
            }
        }
        ob.release(msgs, bytes, controls, control_bytes);
    }

    fn msg(sid: u32, seq: u64, body: &Bytes) -> Item {
        Item::Msg {
            sid,
            seq,
            body: body.clone(),
        }
    }

    fn pressing(policy: OverflowPolicy, max_msgs: usize) -> Arc<Outbox> {
        Arc::new(Outbox::new(
            1,
            policy,
            OutboxLimits {
                max_msgs,
                max_bytes: UNLIMITED,
                press: true,
            },
        ))
    }

    fn drained(ob: &Outbox, waker: &Arc<CountingWaker>) -> Poll<()> {
        let waker = Waker::from(waker.clone());
        ob.poll_drained(&mut Context::from_waker(&waker))
    }

    #[test]
    fn a_full_queue_whose_socket_drains_takes_the_message_and_makes_the_publisher_wait() {
        for policy in [
            OverflowPolicy::DropNew,
            OverflowPolicy::DropOld,
            OverflowPolicy::Disconnect,
        ] {
            let ob = pressing(policy, 2);
            let s = sub(1, &ob);
            assert_eq!(ob.push_msg(&s, &body(0, 4)), Push::Queued);
            assert_eq!(ob.push_msg(&s, &body(1, 4)), Push::Queued);
            // Full, the socket takes bytes: queued over the limit, nothing dropped.
            assert_eq!(ob.push_msg(&s, &body(2, 4)), Push::Pressed);
            // An eighth over the limit (at least one) is as far as it goes: then the policy.
            assert_ne!(ob.push_msg(&s, &body(3, 4)), Push::Pressed, "{policy:?}");
            let st = ob.stats();
            assert!(st.pending_msgs <= 3, "{policy:?}: {st:?}");
            if policy == OverflowPolicy::Disconnect {
                continue;
            }
            let w = Arc::new(CountingWaker::default());
            assert!(drained(&ob, &w).is_pending());
            // The writer takes and writes everything: the publisher is woken and goes on.
            let items = take_items(&ob);
            release(&ob, &items);
            assert_eq!(w.count(), 1);
            assert!(drained(&ob, &w).is_ready());
        }
    }

    #[test]
    fn a_byte_limit_of_a_few_messages_still_takes_one_message_over() {
        // Room for four 900-byte messages and a little more, and an eighth of it (500 bytes) is
        // less than one message.
        let limit = 4 * cost(900) + 100;
        let ob = Arc::new(Outbox::new(
            1,
            OverflowPolicy::DropNew,
            OutboxLimits {
                max_msgs: UNLIMITED,
                max_bytes: limit,
                press: true,
            },
        ));
        let s = sub(1, &ob);
        for i in 0..4 {
            assert_eq!(ob.push_msg(&s, &body(i, 900)), Push::Queued);
        }
        assert_eq!(ob.push_msg(&s, &body(4, 900)), Push::Pressed);
        // Past the limit, only the eighth applies: the next one gets the policy.
        assert_eq!(ob.push_msg(&s, &body(5, 900)), Push::Dropped);
        assert!(ob.stats().pending_bytes <= limit + cost(900));
    }

    #[test]
    fn a_queue_that_did_not_drain_in_time_is_stalled_until_half_empty() {
        let ob = pressing(OverflowPolicy::DropNew, 4);
        let s = sub(1, &ob);
        for i in 0..4 {
            ob.push_msg(&s, &body(i, 4));
        }
        assert_eq!(ob.push_msg(&s, &body(4, 4)), Push::Pressed);
        ob.mark_stalled();
        assert_eq!(ob.push_msg(&s, &body(5, 4)), Push::Dropped);
        let w = Arc::new(CountingWaker::default());
        assert!(
            drained(&ob, &w).is_ready(),
            "nobody waits on a stalled queue"
        );
        // Written: the queue is empty, below half, and takes part in backpressure again.
        let items = take_items(&ob);
        release(&ob, &items);
        for i in 0..4 {
            assert_eq!(ob.push_msg(&s, &body(i, 4)), Push::Queued);
        }
        assert_eq!(ob.push_msg(&s, &body(9, 4)), Push::Pressed);
        // Closing lets waiters go.
        assert!(drained(&ob, &w).is_pending());
        ob.close(CloseReason::ClientClosed, false);
        assert!(w.count() >= 1);
        assert!(drained(&ob, &w).is_ready());
    }

    #[test]
    fn limit_by_messages() {
        let ob = outbox(OverflowPolicy::DropNew, 3, UNLIMITED);
        let s = sub(1, &ob);
        for i in 0..3 {
            assert_eq!(ob.push_msg(&s, &body(i, 4)), Push::Queued);
        }
        assert_eq!(ob.push_msg(&s, &body(3, 0)), Push::Dropped);
        let st = ob.stats();
        assert_eq!((st.pending_msgs, st.pending_bytes), (3, 3 * cost(4)));
        assert_eq!((st.queued, st.dropped), (3, 1));
    }

    #[test]
    fn limit_by_bytes_counts_headers_and_is_inclusive() {
        // Room for exactly two 10-byte bodies plus one empty body, headers included.
        let ob = outbox(OverflowPolicy::DropNew, 100, 2 * cost(10) + cost(0));
        let s = sub(1, &ob);
        assert_eq!(ob.push_msg(&s, &body(1, 10)), Push::Queued);
        assert_eq!(ob.push_msg(&s, &body(2, 10)), Push::Queued);
        assert_eq!(ob.push_msg(&s, &body(3, 1)), Push::Dropped);
        assert_eq!(ob.push_msg(&s, &body(4, 0)), Push::Queued);
        assert_eq!(ob.push_msg(&s, &body(5, 0)), Push::Dropped);
        assert_eq!(ob.stats().pending_bytes, 2 * cost(10) + cost(0));
        assert_eq!(ob.stats().pending_msgs, 3);
    }

    #[test]
    fn drop_new_keeps_oldest_and_reports_the_gap() {
        let ob = outbox(OverflowPolicy::DropNew, 2, UNLIMITED);
        let s = sub(1, &ob);
        let b: Vec<Bytes> = (0..5).map(|i| body(i, 3)).collect();
        assert_eq!(ob.push_msg(&s, &b[0]), Push::Queued);
        assert_eq!(ob.push_msg(&s, &b[1]), Push::Queued);
        assert_eq!(ob.push_msg(&s, &b[2]), Push::Dropped);
        assert_eq!(ob.push_msg(&s, &b[3]), Push::Dropped);
        // Drops still consume sequence numbers, so the subscriber sees a gap.
        assert_eq!(s.matched(), 4);
        assert_eq!(ob.stats().dropped, 2);

        let items = take_items(&ob);
        assert_eq!(
            items,
            vec![
                Item::Lost { sid: 1, missed: 2 },
                msg(1, 1, &b[0]),
                msg(1, 2, &b[1]),
            ]
        );
        release(&ob, &items);

        assert_eq!(ob.push_msg(&s, &b[4]), Push::Queued);
        // The loss was reported once; the next batch carries only the message, after the gap.
        assert_eq!(take_items(&ob), vec![msg(1, 5, &b[4])]);
    }

    #[test]
    fn drop_new_reports_losses_per_subscription() {
        let ob = outbox(OverflowPolicy::DropNew, 1, UNLIMITED);
        let a = sub(1, &ob);
        let b = sub(2, &ob);
        let x = body(0, 1);
        assert_eq!(ob.push_msg(&a, &x), Push::Queued);
        for _ in 0..3 {
            assert_eq!(ob.push_msg(&a, &x), Push::Dropped);
        }
        assert_eq!(ob.push_msg(&b, &x), Push::Dropped);
        let items = take_items(&ob);
        assert_eq!(items.len(), 3);
        // LOST notices come before the deliveries; their order among themselves is unspecified.
        let mut lost: Vec<&Item> = items[..2].iter().collect();
        lost.sort_by_key(|it| match it {
            Item::Lost { sid, .. } => *sid,
            _ => u32::MAX,
        });
        assert_eq!(
            lost,
            vec![
                &Item::Lost { sid: 1, missed: 3 },
                &Item::Lost { sid: 2, missed: 1 }
            ]
        );
        assert_eq!(items[2], msg(1, 1, &x));
    }

    #[test]
    fn drop_old_evicts_the_oldest_delivery_but_not_control_frames() {
        let ob = outbox(OverflowPolicy::DropOld, 4, UNLIMITED);
        let a = sub(1, &ob);
        let b = sub(2, &ob);
        let ctl1 = Bytes::from_static(b"ok-1");
        let ctl2 = Bytes::from_static(b"ok-2");
        let m: Vec<Bytes> = (0..4).map(|i| body(i, 5)).collect();

        assert!(ob.push_frame(ctl1.clone()));
        assert_eq!(ob.push_msg(&a, &m[0]), Push::Queued);
        assert_eq!(ob.push_msg(&b, &m[1]), Push::Queued);
        assert!(ob.push_frame(ctl2.clone()));
        // Full: the oldest delivery (a's) goes, the control frame ahead of it stays.
        assert_eq!(ob.push_msg(&b, &m[2]), Push::Queued);
        let st = ob.stats();
        assert_eq!((st.pending_msgs, st.pending_bytes), (2, 2 * cost(5)));
        assert_eq!((st.queued, st.dropped), (3, 1));

        let items = take_items(&ob);
        assert_eq!(
            items,
            vec![
                // Counted against the victim's subscription, not the newcomer's.
                Item::Lost { sid: 1, missed: 1 },
                Item::Frame(ctl1),
                msg(2, 1, &m[1]),
                Item::Frame(ctl2),
                msg(2, 2, &m[2]),
            ]
        );

        // Everything older is with the writer and cannot be evicted: the new one is dropped.
        assert_eq!(ob.push_msg(&a, &m[3]), Push::Dropped);
        assert_eq!(a.matched(), 2);
        assert_eq!(take_items(&ob), vec![Item::Lost { sid: 1, missed: 1 }]);
        release(&ob, &items);
        assert_eq!(ob.push_msg(&a, &m[3]), Push::Queued);
        assert_eq!(take_items(&ob), vec![msg(1, 3, &m[3])]);
    }

    #[test]
    fn drop_old_evicts_as_many_as_the_bytes_need() {
        let ob = outbox(OverflowPolicy::DropOld, 100, 3 * cost(10));
        let s = sub(1, &ob);
        let small: Vec<Bytes> = (0..3).map(|i| body(i, 10)).collect();
        for b in &small {
            assert_eq!(ob.push_msg(&s, b), Push::Queued);
        }
        let big = body(9, 2 * cost(10) - MSG_HEADER_LEN);
        assert_eq!(ob.push_msg(&s, &big), Push::Queued);
        assert_eq!(ob.stats().dropped, 2);
        assert_eq!(ob.stats().pending_bytes, 3 * cost(10));
        assert_eq!(
            take_items(&ob),
            vec![
                Item::Lost { sid: 1, missed: 2 },
                msg(1, 3, &small[2]),
                msg(1, 4, &big),
            ]
        );
    }

    #[test]
    fn drop_old_does_not_evict_when_eviction_cannot_make_room() {
        let ob = outbox(OverflowPolicy::DropOld, 100, 100);
        let s = sub(1, &ob);
        let held = body(1, 60 - MSG_HEADER_LEN);
        let queued = body(2, 20 - MSG_HEADER_LEN);
        assert_eq!(ob.push_msg(&s, &held), Push::Queued);
        let with_writer = take_items(&ob);
        assert_eq!(ob.push_msg(&s, &queued), Push::Queued);
        // 60 bytes are with the writer; even with the queued 20 evicted, 50 more would not fit.
        let new = body(3, 50 - MSG_HEADER_LEN);
        assert_eq!(ob.push_msg(&s, &new), Push::Dropped);
        assert_eq!(ob.stats().dropped, 1);
        assert_eq!(
            take_items(&ob),
            vec![Item::Lost { sid: 1, missed: 1 }, msg(1, 2, &queued)]
        );
        release(&ob, &with_writer);
    }

    #[test]
    fn disconnect_policy_overflows_and_closes_with_the_figures_at_overflow() {
        let ob = outbox(OverflowPolicy::Disconnect, 2, UNLIMITED);
        let s = sub(1, &ob);
        assert_eq!(ob.push_msg(&s, &body(1, 5)), Push::Queued);
        assert_eq!(ob.push_msg(&s, &body(2, 5)), Push::Queued);
        assert!(ob.push_frame(Bytes::from_static(b"ok")));
        assert_eq!(ob.push_msg(&s, &body(3, 5)), Push::Overflow);
        assert!(ob.is_closing());

        // The queue was cleared: the writer is told to close, with nothing left to write.
        let reason = CloseReason::SlowConsumer {
            pending_msgs: 2,
            pending_bytes: 2 * cost(5),
        };
        assert_eq!(
            take(&ob),
            Poll::Ready((Take::Closed(reason.clone()), vec![]))
        );
        assert_eq!(ob.push_msg(&s, &body(4, 5)), Push::Skipped);
        assert!(!ob.push_frame(Bytes::from_static(b"ok")));
        // A later close keeps the first reason.
        ob.close(CloseReason::ClientClosed, true);
        assert_eq!(take(&ob), Poll::Ready((Take::Closed(reason), vec![])));
    }

    #[test]
    fn disconnect_policy_counts_what_the_writer_holds() {
        let ob = outbox(OverflowPolicy::Disconnect, 2, UNLIMITED);
        let s = sub(1, &ob);
        let w = Arc::new(CountingWaker::default());
        let waker = Waker::from(w.clone());
        let mut cx = Context::from_waker(&waker);
        assert_eq!(ob.push_msg(&s, &body(1, 7)), Push::Queued);
        let _held = take_items(&ob);
        assert_eq!(ob.push_msg(&s, &body(2, 3)), Push::Queued);
        let mut batch = VecDeque::new();
        assert_eq!(ob.poll_take(&mut cx, &mut batch), Poll::Ready(Take::Items));
        batch.clear();
        // The writer holds both and waits for more.
        assert!(ob.poll_take(&mut cx, &mut batch).is_pending());
        assert_eq!(ob.push_msg(&s, &body(3, 3)), Push::Overflow);
        assert_eq!(w.count(), 1, "overflow must wake the writer");
        let reason = CloseReason::SlowConsumer {
            pending_msgs: 2,
            pending_bytes: cost(7) + cost(3),
        };
        assert_eq!(take(&ob), Poll::Ready((Take::Closed(reason), vec![])));
    }

    #[test]
    fn release_frees_room() {
        let ob = outbox(OverflowPolicy::DropNew, 1, UNLIMITED);
        let s = sub(1, &ob);
        let x = body(1, 8);
        assert_eq!(ob.push_msg(&s, &x), Push::Queued);
        assert_eq!(ob.push_msg(&s, &x), Push::Dropped);
        let items = take_items(&ob);
        // Taken but not yet written still counts against the limit.
        assert_eq!(ob.push_msg(&s, &x), Push::Dropped);
        assert_eq!(ob.stats().pending_msgs, 1);
        release(&ob, &items);
        assert_eq!(
            ob.stats(),
            OutboxStats {
                queued: 1,
                dropped: 2,
                ..OutboxStats::default()
            }
        );
        assert_eq!(ob.push_msg(&s, &x), Push::Queued);
        assert_eq!(
            take_items(&ob),
            vec![Item::Lost { sid: 1, missed: 1 }, msg(1, 4, &x)]
        );
    }

    #[test]
    fn one_oversize_message_is_accepted_into_an_empty_outbox() {
        for policy in [
            OverflowPolicy::DropNew,
            OverflowPolicy::DropOld,
            OverflowPolicy::Disconnect,
        ] {
            let ob = outbox(policy, 4, 10);
            let s = sub(1, &ob);
            let big = body(1, 100);
            assert_eq!(ob.push_msg(&s, &big), Push::Queued, "{policy:?}");
            assert_eq!(ob.stats().pending_bytes, cost(100));
            let items = take_items(&ob);
            assert_eq!(items, vec![msg(1, 1, &big)]);
            release(&ob, &items);
            assert_eq!(ob.push_msg(&s, &big), Push::Queued, "{policy:?}");
        }

        // Drop-old makes the outbox empty by evicting what is queued, then accepts it.
        let ob = outbox(OverflowPolicy::DropOld, 4, 40);
        let s = sub(1, &ob);
        let small = body(1, 1);
        let big = body(2, 100);
        assert_eq!(ob.push_msg(&s, &small), Push::Queued);
        assert_eq!(ob.push_msg(&s, &big), Push::Queued);
        assert_eq!(
            take_items(&ob),
            vec![Item::Lost { sid: 1, missed: 1 }, msg(1, 2, &big)]
        );

        // Drop-new does not accept it behind anything pending.
        let ob = outbox(OverflowPolicy::DropNew, 4, 40);
        let s = sub(1, &ob);
        assert_eq!(ob.push_msg(&s, &small), Push::Queued);
        assert_eq!(ob.push_msg(&s, &big), Push::Dropped);

        // Replies pending do not make the queue non-empty: no delivery is, so it takes one.
        let ob = outbox(OverflowPolicy::DropNew, 4, 40);
        let s = sub(1, &ob);
        assert!(ob.push_frame(Bytes::from_static(&[0, 0, 0, 5, 0x82, 0, 0, 0, 1])));
        assert_eq!(ob.push_msg(&s, &big), Push::Queued);
    }

    #[test]
    fn control_frames_are_never_dropped_and_hold_back_the_reader() {
        for policy in [
            OverflowPolicy::DropNew,
            OverflowPolicy::DropOld,
            OverflowPolicy::Disconnect,
        ] {
            let ob = outbox(policy, 4, UNLIMITED);
            let s = sub(1, &ob);
            let w = Arc::new(CountingWaker::default());
            let waker = Waker::from(w.clone());
            let mut cx = Context::from_waker(&waker);

            assert_eq!(ob.push_msg(&s, &body(1, 1)), Push::Queued);
            assert_eq!(ob.push_msg(&s, &body(2, 1)), Push::Queued);
            assert!(ob.poll_room(&mut cx).is_ready());
            // Control frames are accepted past every limit.
            for i in 0..5u8 {
                assert!(ob.push_frame(Bytes::from(vec![i])), "{policy:?}");
            }
            assert!(!ob.is_closing());
            // They count: a delivery finds no room behind them (drop-old makes room by dropping
            // an older delivery).
            let pushed = ob.push_msg(&s, &body(3, 1));
            assert!(
                pushed != Push::Queued || ob.stats().dropped >= 1,
                "{policy:?}: {pushed:?}"
            );
            if policy == OverflowPolicy::Disconnect {
                continue;
            }
            assert!(ob.poll_room(&mut cx).is_pending());
            assert_eq!(w.count(), 0);

            let items = take_items(&ob);
            let frames: Vec<&Item> = items
                .iter()
                .filter(|it| matches!(it, Item::Frame(_)))
                .collect();
            assert_eq!(frames.len(), 5);
            // Half the message limit is still held after writing three of five: the reader
            // stays asleep.
            ob.release(0, 0, 3, 3);
            assert_eq!(w.count(), 0);
            assert!(ob.poll_room(&mut cx).is_pending());
            ob.release(0, 0, 1, 1);
            assert_eq!(w.count(), 1, "{policy:?}");
            assert!(ob.poll_room(&mut cx).is_ready());
        }
    }

    #[test]
    fn control_bytes_hold_back_the_reader_at_half_the_byte_limit() {
        let ob = outbox(OverflowPolicy::DropNew, 1000, 4096);
        let mut cx = Context::from_waker(Waker::noop());
        assert!(ob.push_frame(Bytes::from(vec![0u8; 2000])));
        assert!(ob.poll_room(&mut cx).is_ready());
        assert!(ob.push_frame(Bytes::from(vec![0u8; 100])));
        assert!(ob.poll_room(&mut cx).is_pending());
        let st = ob.stats();
        assert_eq!((st.pending_controls, st.pending_control_bytes), (2, 2100));
        let items = take_items(&ob);
        release(&ob, &items);
        assert!(ob.poll_room(&mut cx).is_ready());
    }

    #[test]
    fn queued_bytes_are_reserved_from_the_budget_and_given_back() {
        let budget = Arc::new(MemoryBudget::new(1 << 30));
        let limits = OutboxLimits {
            max_msgs: 1000,
            max_bytes: 1 << 20,
            press: false,
        };
        let ob = Arc::new(Outbox::with_budget(
            1,
            OverflowPolicy::DropNew,
            limits,
            budget.clone(),
        ));
        let s = sub(1, &ob);
        for _ in 0..100 {
            assert_eq!(ob.push_msg(&s, &body(1, 1000)), Push::Queued);
        }
        assert!(ob.push_frame(Bytes::from(vec![0u8; 50])));
        let held = 100 * cost(1000) + 50;
        assert!(budget.used() >= held, "{} < {held}", budget.used());
        assert!(budget.used() <= held + held / 4 + 2 * RESERVE_STEP);
        let items = take_items(&ob);
        release(&ob, &items);
        // A drained queue keeps one step.
        assert_eq!(budget.used(), RESERVE_STEP);
        // What a dropped outbox still held goes back too.
        assert_eq!(ob.push_msg(&s, &body(1, 1000)), Push::Queued);
        assert!(budget.used() > 0);
        drop(s);
        drop(ob);
        assert_eq!(budget.used(), 0);
    }

    #[test]
    fn an_outbox_over_the_shedding_threshold_meets_its_policy() {
        let budget = Arc::new(MemoryBudget::new(1 << 20));
        let limits = OutboxLimits {
            max_msgs: 100_000,
            max_bytes: 64 << 20,
            press: false,
        };
        let big = Arc::new(Outbox::with_budget(
            1,
            OverflowPolicy::DropNew,
            limits,
            budget.clone(),
        ));
        let small = Arc::new(Outbox::with_budget(
            2,
            OverflowPolicy::DropNew,
            limits,
            budget.clone(),
        ));
        let (b, sm) = (sub(1, &big), sub(2, &small));
        let x = body(1, 1024);
        // Fill one queue just past the budget (short of the hard margin).
        while budget.used() <= budget.limit() {
            assert_eq!(big.push_msg(&b, &x), Push::Queued);
        }
        assert!(matches!(budget.tick(), crate::Pressure::Started { .. }));
        // The largest queue is shed; a small one still takes deliveries.
        assert_eq!(big.push_msg(&b, &x), Push::Dropped);
        assert_eq!(small.push_msg(&sm, &x), Push::Queued);
        assert_eq!(big.stats().dropped, 1);
    }

    #[test]
    fn close_wakes_a_reader_waiting_for_room() {
        let ob = outbox(OverflowPolicy::DropNew, 1, UNLIMITED);
        let w = Arc::new(CountingWaker::default());
        let waker = Waker::from(w.clone());
        let mut cx = Context::from_waker(&waker);
        assert!(ob.push_frame(Bytes::from_static(b"x")));
        assert!(ob.poll_room(&mut cx).is_pending());
        ob.close(CloseReason::ServerShutdown, true);
        assert_eq!(w.count(), 1);
        assert!(ob.poll_room(&mut cx).is_ready());
    }

    #[test]
    fn push_wakes_a_waiting_writer() {
        let ob = outbox(OverflowPolicy::DropNew, 4, UNLIMITED);
        let s = sub(1, &ob);
        let w = Arc::new(CountingWaker::default());
        let waker = Waker::from(w.clone());
        let mut cx = Context::from_waker(&waker);
        let mut batch = VecDeque::new();
        assert!(ob.poll_take(&mut cx, &mut batch).is_pending());
        assert!(ob.poll_take(&mut cx, &mut batch).is_pending());
        assert_eq!(ob.push_msg(&s, &body(1, 1)), Push::Queued);
        assert_eq!(w.count(), 1);
        // The waker was consumed: a second push has no one to wake until the writer polls again.
        assert!(ob.push_frame(Bytes::from_static(b"x")));
        assert_eq!(w.count(), 1);
        assert_eq!(ob.poll_take(&mut cx, &mut batch), Poll::Ready(Take::Items));
        assert_eq!(batch.len(), 2);
    }

    #[test]
    fn close_with_drain_hands_over_the_queue_then_reports_closed() {
        let ob = outbox(OverflowPolicy::DropNew, 2, UNLIMITED);
        let s = sub(1, &ob);
        let w = Arc::new(CountingWaker::default());
        let waker = Waker::from(w.clone());
        let mut cx = Context::from_waker(&waker);
        let mut batch = VecDeque::new();
        assert!(ob.poll_take(&mut cx, &mut batch).is_pending());

        let x = body(1, 2);
        let ctl = Bytes::from_static(b"err");
        assert_eq!(ob.push_msg(&s, &x), Push::Queued);
        assert_eq!(ob.push_msg(&s, &x), Push::Queued);
        assert_eq!(ob.push_msg(&s, &x), Push::Dropped);
        assert!(ob.push_frame(ctl.clone()));
        ob.close(CloseReason::ServerShutdown, true);
        // The first push woke the writer; it has not polled since, so there is no one to wake.
        assert_eq!(w.count(), 1);
        assert!(ob.is_closing());

        assert_eq!(ob.push_msg(&s, &x), Push::Skipped);
        assert!(!ob.push_frame(ctl.clone()));
        assert_eq!(
            take_items(&ob),
            vec![
                Item::Lost { sid: 1, missed: 1 },
                msg(1, 1, &x),
                msg(1, 2, &x),
                Item::Frame(ctl),
            ]
        );
        let closed = Poll::Ready((Take::Closed(CloseReason::ServerShutdown), vec![]));
        assert_eq!(take(&ob), closed);
        assert_eq!(take(&ob), closed);
    }

    #[test]
    fn close_wakes_an_idle_writer() {
        let ob = outbox(OverflowPolicy::DropNew, 2, UNLIMITED);
        let w = Arc::new(CountingWaker::default());
        let waker = Waker::from(w.clone());
        let mut cx = Context::from_waker(&waker);
        let mut batch = VecDeque::new();
        assert!(ob.poll_take(&mut cx, &mut batch).is_pending());
        ob.close(CloseReason::ClientClosed, true);
        assert_eq!(w.count(), 1);
        assert_eq!(
            ob.poll_take(&mut cx, &mut batch),
            Poll::Ready(Take::Closed(CloseReason::ClientClosed))
        );
    }

    #[test]
    fn close_without_drain_is_immediate() {
        let ob = outbox(OverflowPolicy::DropNew, 8, UNLIMITED);
        let s = sub(1, &ob);
        assert_eq!(ob.push_msg(&s, &body(1, 2)), Push::Queued);
        assert!(ob.push_frame(Bytes::from_static(b"ok")));
        ob.close(CloseReason::KeepaliveTimeout, false);
        ob.close(CloseReason::ClientClosed, true);
        assert_eq!(
            take(&ob),
            Poll::Ready((Take::Closed(CloseReason::KeepaliveTimeout), vec![]))
        );
    }

    #[test]
    fn pushes_after_close_are_skipped_and_not_counted() {
        let ob = outbox(OverflowPolicy::DropNew, 8, UNLIMITED);
        let s = sub(1, &ob);
        assert_eq!(ob.push_msg(&s, &body(1, 2)), Push::Queued);
        ob.close(CloseReason::ClientClosed, true);
        for _ in 0..3 {
            let p = ob.push_msg(&s, &body(2, 2));
            assert_eq!(p, Push::Skipped);
            assert!(!p.delivered() && !p.finished());
        }
        assert_eq!(s.matched(), 1);
        let st = ob.stats();
        assert_eq!((st.queued, st.dropped, st.pending_msgs), (1, 0, 1));
    }

    #[test]
    fn allowance_gives_exactly_n_then_skips() {
        let ob = outbox(OverflowPolicy::DropNew, 100, UNLIMITED);
        let s = sub(1, &ob);
        let x = body(1, 1);
        assert_eq!(ob.push_msg(&s, &x), Push::Queued);
        // The allowance counts from now, not from the subscription's start.
        assert!(!ob.set_allowance(&s, 3));
        assert_eq!(ob.push_msg(&s, &x), Push::Queued);
        assert_eq!(ob.push_msg(&s, &x), Push::Queued);
        let last = ob.push_msg(&s, &x);
        assert_eq!(last, Push::QueuedLast);
        assert!(last.delivered() && last.finished());
        assert!(s.is_dead());
        assert_eq!(ob.push_msg(&s, &x), Push::Skipped);
        assert_eq!(s.matched(), 4);
        // A finished subscription stays finished.
        assert!(ob.set_allowance(&s, 10));
        assert_eq!(ob.push_msg(&s, &x), Push::Skipped);
        let items = take_items(&ob);
        let seqs: Vec<u64> = items
            .iter()
            .map(|it| match it {
                Item::Msg { seq, .. } => *seq,
                other => panic!("unexpected {other:?}"),
            })
            .collect();
        assert_eq!(seqs, vec![1, 2, 3, 4]);
    }

    #[test]
    fn allowance_counts_drops_and_ends_with_dropped_last() {
        let ob = outbox(OverflowPolicy::DropNew, 1, UNLIMITED);
        let s = sub(1, &ob);
        let x = body(1, 1);
        assert!(!ob.set_allowance(&s, 2));
        assert_eq!(ob.push_msg(&s, &x), Push::Queued);
        let last = ob.push_msg(&s, &x);
        assert_eq!(last, Push::DroppedLast);
        assert!(!last.delivered() && last.finished());
        assert!(s.is_dead());
        assert_eq!(ob.push_msg(&s, &x), Push::Skipped);
        assert_eq!(
            take_items(&ob),
            vec![Item::Lost { sid: 1, missed: 1 }, msg(1, 1, &x)]
        );
    }

    #[test]
    fn zero_allowance_ends_the_subscription_now() {
        let ob = outbox(OverflowPolicy::DropNew, 4, UNLIMITED);
        let s = sub(1, &ob);
        assert!(ob.set_allowance(&s, 0));
        assert!(s.is_dead());
        assert_eq!(ob.push_msg(&s, &body(1, 1)), Push::Skipped);
        assert_eq!(s.matched(), 0);
    }

    #[test]
    fn concurrent_publishers_get_gapless_ordered_sequence_numbers() {
        const THREADS: u8 = 4;
        const PER_THREAD: u32 = 10_000;
        let total = usize::from(THREADS) * PER_THREAD as usize;
        let ob = outbox(OverflowPolicy::DropNew, total, total * cost(5));
        let s = sub(7, &ob);
        std::thread::scope(|scope| {
            for t in 0..THREADS {
                let (ob, s) = (&ob, &s);
                scope.spawn(move || {
                    for i in 0..PER_THREAD {
                        // Tag each body with its thread and its index within the thread.
                        let mut b = vec![t];
                        b.extend_from_slice(&i.to_be_bytes());
                        assert_eq!(ob.push_msg(s, &Bytes::from(b)), Push::Queued);
                    }
                });
            }
        });
        let items = take_items(&ob);
        assert_eq!(items.len(), total);
        let mut next_per_thread = [0u32; THREADS as usize];
        for (i, it) in items.iter().enumerate() {
            let Item::Msg { sid, seq, body } = it else {
                panic!("unexpected {it:?}");
            };
            assert_eq!(*sid, 7);
            assert_eq!(*seq, i as u64 + 1, "queue order must be sequence order");
            // Each publisher's own messages keep the order it pushed them in.
            let t = usize::from(body[0]);
            let n = u32::from_be_bytes([body[1], body[2], body[3], body[4]]);
            assert_eq!(n, next_per_thread[t]);
            next_per_thread[t] += 1;
        }
        assert_eq!(next_per_thread, [PER_THREAD; THREADS as usize]);
        assert_eq!(s.matched(), total as u64);
        assert_eq!(ob.stats().queued, total as u64);
    }

    fn replay_room(ob: &Outbox, waker: &Arc<CountingWaker>, body_len: usize) -> Poll<()> {
        let waker = Waker::from(waker.clone());
        ob.poll_replay_room(&mut Context::from_waker(&waker), body_len)
    }

    #[test]
    fn stored_deliveries_stop_at_their_own_bounds_and_are_refilled_at_half() {
        // The client's limits are far larger than the stored bounds.
        let ob = outbox(OverflowPolicy::DropNew, 100_000, 64 << 20);
        let s = sub(1, &ob);
        let len = 4000;
        let x = body(1, len);
        let mut seq = 0;
        while ob.push_stored(&s, seq + 1, &x) == Stored::Queued {
            seq += 1;
        }
        // Bytes bind first with 4 KB messages; nothing was counted for the one refused.
        let n = STORED_MAX_BYTES / cost(len);
        assert_eq!(seq as usize, n);
        assert_eq!(ob.stats().pending_bytes, n * cost(len));
        assert_eq!(s.seq.load(Ordering::Relaxed), seq);
        // Live deliveries keep the client's limits.
        assert_eq!(ob.push_msg(&s, &x), Push::Queued);
        let w = Arc::new(CountingWaker::default());
        assert!(replay_room(&ob, &w, len).is_pending());
        // The writer takes everything and writes it in pieces: the replay is woken once the
        // queue is down to half the stored bytes, not before.
        let items = take_items(&ob);
        assert_eq!(items.len(), n + 1);
        let over_half = STORED_MAX_BYTES / 2 / cost(len) + 1;
        let first = n + 1 - over_half;
        ob.release(first, first * cost(len), 0, 0);
        assert_eq!(w.count(), 0);
        assert!(replay_room(&ob, &w, len).is_pending());
        ob.release(1, cost(len), 0, 0);
        assert_eq!(w.count(), 1);
        assert!(replay_room(&ob, &w, len).is_ready());
        assert_eq!(ob.push_stored(&s, seq + 1, &x), Stored::Queued);

        // Small messages: the count binds.
        let ob = outbox(OverflowPolicy::DropNew, 100_000, 64 << 20);
        let s = sub(1, &ob);
        let mut seq = 0;
        while ob.push_stored(&s, seq + 1, &body(1, 10)) == Stored::Queued {
            seq += 1;
        }
        assert_eq!(seq as usize, STORED_MAX_MSGS);
    }

    #[test]
    fn stored_deliveries_meet_the_clients_limits_when_lower() {
        let ob = outbox(OverflowPolicy::DropNew, 4, UNLIMITED);
        let s = sub(1, &ob);
        for seq in 1..=4 {
            assert_eq!(ob.push_stored(&s, seq, &body(1, 10)), Stored::Queued);
        }
        assert_eq!(ob.push_stored(&s, 5, &body(1, 10)), Stored::Full);
        assert_eq!(ob.stats().pending_msgs, 4);
        // Replies count too.
        let ob = outbox(OverflowPolicy::DropNew, 4, 1024);
        let s = sub(1, &ob);
        assert_eq!(ob.push_stored(&s, 1, &body(1, 10)), Stored::Queued);
        assert!(ob.push_frame(Bytes::from(vec![0u8; 1000])));
        assert_eq!(ob.push_stored(&s, 2, &body(1, 10)), Stored::Full);
    }

    #[test]
    fn a_stored_message_larger_than_half_the_bound_waits_until_it_fits() {
        let ob = outbox(OverflowPolicy::DropNew, 100_000, 64 << 20);
        let s = sub(1, &ob);
        let big = body(1, STORED_MAX_BYTES * 3 / 4);
        // An empty queue takes one of any size.
        assert_eq!(ob.push_stored(&s, 1, &big), Stored::Queued);
        assert_eq!(ob.push_stored(&s, 2, &big), Stored::Full);
        let items = take_items(&ob);
        let w = Arc::new(CountingWaker::default());
        assert!(replay_room(&ob, &w, big.len()).is_pending());
        release(&ob, &items);
        assert_eq!(w.count(), 1);
        assert!(replay_room(&ob, &w, big.len()).is_ready());
        assert_eq!(ob.push_stored(&s, 2, &big), Stored::Queued);
        // A small message behind it is not ready either: the queue holds more than half.
        assert!(replay_room(&ob, &w, 10).is_pending());
        // Closing lets the waiter go.
        ob.close(CloseReason::ClientClosed, true);
        assert_eq!(w.count(), 2);
        assert!(replay_room(&ob, &w, 10).is_ready());
        assert_eq!(ob.push_stored(&s, 3, &big), Stored::Ended);
    }
}
