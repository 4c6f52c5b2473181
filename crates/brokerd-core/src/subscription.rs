//! One live subscription: its id, filter, owning connection's outbox and delivery counters.
//!
//! Held by the sublist (for matching), by its connection's subscription map (for `UNSUB` and
//! disconnect) and briefly by publishers' match results. The counters are written only under the
//! owning [`Outbox`]'s lock, which is what makes sequence numbers and auto-unsubscribe exact under
//! concurrent publishers.

use crate::outbox::Outbox;
use brokerd_proto::Filter;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// A live subscription.
pub struct Subscription {
    /// Client-chosen id, unique among the connection's live subscriptions.
    pub sid: u32,
    /// The filter it was made with.
    pub filter: Filter,
    /// The queue group it belongs to, if any, behind a thin pointer: most subscriptions have
    /// none, and this keeps the whole object within 80 bytes.
    queue: Option<Box<Arc<str>>>,
    /// The owning connection's outbox; dropping the last subscription does not close it.
    pub outbox: Arc<Outbox>,
    /// Last sequence number assigned (written under the outbox lock).
    pub(crate) seq: AtomicU64,
    /// Deliveries left before auto-unsubscribe; `u64::MAX` for none (written under the outbox lock).
    pub(crate) remaining: AtomicU64,
    /// Set when unsubscribed or its allowance is used up; pushes then skip it.
    pub(crate) dead: AtomicBool,
    /// A replay subscription: fed from a stream by a task of its own, never in the sublist.
    replay: bool,
}

impl Subscription {
    /// A new subscription with no allowance limit.
    pub fn new(
        sid: u32,
        filter: Filter,
        queue: Option<Arc<str>>,
        outbox: Arc<Outbox>,
    ) -> Subscription {
        Subscription {
            sid,
            filter,
            queue: queue.map(Box::new),
            outbox,
            seq: AtomicU64::new(0),
            remaining: AtomicU64::new(u64::MAX),
            dead: AtomicBool::new(false),
            replay: false,
        }
    }

    /// A replay subscription (see [`Subscription::is_replay`]).
    pub fn replay(sid: u32, filter: Filter, outbox: Arc<Outbox>) -> Subscription {
        Subscription {
            replay: true,
            ..Subscription::new(sid, filter, None, outbox)
        }
    }

    /// Whether it is a replay subscription: fed from a stream, not by routing.
    pub fn is_replay(&self) -> bool {
        self.replay
    }

    /// The queue group it belongs to, if any.
    pub fn queue(&self) -> Option<&Arc<str>> {
        self.queue.as_deref()
    }

    /// The owning connection's id (kept by its outbox, not per subscription).
    pub fn client_id(&self) -> u64 {
        self.outbox.owner()
    }

    /// Messages matched so far (queued or dropped), which is also the last sequence number.
    pub fn matched(&self) -> u64 {
        self.seq.load(Ordering::Relaxed)
    }

    /// Whether the subscription has ended.
    pub fn is_dead(&self) -> bool {
        self.dead.load(Ordering::Relaxed)
    }
}

impl std::fmt::Debug for Subscription {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Subscription")
            .field("sid", &self.sid)
            .field("filter", &self.filter)
            .field("client_id", &self.client_id())
            .finish()
    }
}

/// A subscription handle that compares by identity, as the sublist needs.
#[derive(Clone, Debug)]
pub struct SubRef(pub Arc<Subscription>);

impl PartialEq for SubRef {
    fn eq(&self, other: &SubRef) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl Eq for SubRef {}

// By identity, as equality is: a crowded sublist slot finds a subscription by its address.
impl std::hash::Hash for SubRef {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        std::ptr::hash(Arc::as_ptr(&self.0), state);
    }
}

impl std::ops::Deref for SubRef {
    type Target = Subscription;
    fn deref(&self) -> &Subscription {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_subscription_fits_eighty_bytes_with_its_reference_counts() {
        // Per-subscription memory depends on it (docs/performance.md): the allocation is the
        // object plus two reference counts.
        assert!(std::mem::size_of::<Subscription>() + 16 <= 80);
    }
}
