//! The broker's memory budget: one bound over queued bytes, partly read frames and the match
//! cache, shared by every connection.
//!
//! Outboxes reserve what they queue (in steps, see [`Outbox`](crate::Outbox)), connection
//! readers charge what their read buffers hold beyond a small allowance, and the sublist charges
//! its cache. While the total is over the limit, deliveries to the queues holding more than
//! [`MemoryBudget::shed_above`] meet their overflow policy as if full (the largest queues first:
//! the server's monitor halves that threshold every tick the budget stays over, and lifts it
//! once back under 90%), and past the hard margin every queue holding more than [`HARD_FLOOR`]
//! does. Readers holding large partial frames stop reading until the total is back under. Nothing here waits or logs; the server's monitor task
//! reports each episode once.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

/// The smallest threshold shedding goes down to: queues holding less are never shed for the
/// budget's sake (their own limits still apply).
pub const MIN_SHED_ABOVE: usize = 64 * 1024;

/// Past the hard margin, the most any queue may hold: a queue that is read promptly keeps working,
/// everything else is shed.
pub const HARD_FLOOR: usize = 16 * 1024;

/// A value alone on its cache line: `used` is written by every core as queues fill and drain,
/// and the flags every push reads must not share its line.
#[derive(Debug)]
#[repr(align(64))]
struct Line<T>(T);

/// A broker-wide memory bound.
#[derive(Debug)]
pub struct MemoryBudget {
    limit: usize,
    used: Line<AtomicUsize>,
    /// Whether `used` is over `limit`: set and cleared as charges and credits cross it (and
    /// corrected by every [`MemoryBudget::tick`]), so that a push in calm times reads one
    /// line that is rarely written instead of the busy counter.
    over: Line<AtomicBool>,
    shed_above: AtomicUsize,
}

/// What [`MemoryBudget::tick`] observed, for the caller to report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pressure {
    /// Under the limit, as at the previous tick.
    Calm,
    /// Over the limit now, and not at the previous tick: an episode starts.
    Started {
        /// Bytes charged.
        used: usize,
        /// Queues above this many bytes are shed.
        shed_above: usize,
    },
    /// Still over the limit.
    Continues,
    /// Back under the limit: the episode ends.
    Ended {
        /// Bytes charged.
        used: usize,
    },
}

impl MemoryBudget {
    /// A budget of `limit` bytes.
    pub fn new(limit: usize) -> MemoryBudget {
        MemoryBudget {
            limit,
            used: Line(AtomicUsize::new(0)),
            over: Line(AtomicBool::new(false)),
            shed_above: AtomicUsize::new(usize::MAX),
        }
    }

    /// A budget that is never reached.
    pub fn unlimited() -> MemoryBudget {
        MemoryBudget::new(usize::MAX / 4)
    }

    /// The limit in bytes.
    pub fn limit(&self) -> usize {
        self.limit
    }

    /// Bytes charged now.
    pub fn used(&self) -> usize {
        self.used.0.load(Ordering::Relaxed)
    }

    /// Adds `n` bytes.
    pub fn charge(&self, n: usize) {
        if n > 0 {
            let now = self.used.0.fetch_add(n, Ordering::Relaxed) + n;
            if now > self.limit && !self.over.0.load(Ordering::Relaxed) {
                self.over.0.store(true, Ordering::Relaxed);
            }
        }
    }

    /// Gives back `n` bytes charged earlier.
    pub fn credit(&self, n: usize) {
        if n > 0 {
            let now = self.used.0.fetch_sub(n, Ordering::Relaxed) - n;
            if now <= self.limit && self.over.0.load(Ordering::Relaxed) {
                self.over.0.store(false, Ordering::Relaxed);
            }
        }
    }

    /// Charges or credits the difference between what a holder charged before and now.
    pub fn adjust(&self, before: usize, now: usize) {
        if now > before {
            self.charge(now - before);
        } else {
            self.credit(before - now);
        }
    }

    /// Whether the total is over the limit.
    pub fn over(&self) -> bool {
        self.over.0.load(Ordering::Relaxed) && self.used() > self.limit
    }

    /// The hard margin: past `limit + limit / 8`, every delivery to a queue holding more than
    /// [`HARD_FLOOR`] meets its overflow policy, whatever the shedding threshold.
    pub fn hard_limit(&self) -> usize {
        self.limit.saturating_add(self.limit / 8)
    }

    /// Queues holding more than this are shed while the budget is over (`usize::MAX` when calm).
    pub fn shed_above(&self) -> usize {
        self.shed_above.load(Ordering::Relaxed)
    }

    /// Whether a queue that would hold `held` bytes must refuse a delivery for the budget's sake.
    pub fn sheds(&self, held: usize) -> bool {
        if !self.over.0.load(Ordering::Relaxed) {
            return false;
        }
        let used = self.used();
        used > self.limit
            && (held > self.shed_above() || (held > HARD_FLOOR && used > self.hard_limit()))
    }

    /// Called periodically (the server does every 100 ms): lowers the shedding threshold while
    /// the budget is over, raises it back once under, and says what changed.
    pub fn tick(&self) -> Pressure {
        let used = self.used();
        // A charge and a credit racing across the limit may leave the flag wrong; not for long.
        self.over.0.store(used > self.limit, Ordering::Relaxed);
        let shed = self.shed_above();
        if used > self.limit {
            if shed == usize::MAX {
                // An episode starts: queues holding more than an eighth of the budget go first.
                let first = (self.limit / 8).max(MIN_SHED_ABOVE);
                self.shed_above.store(first, Ordering::Relaxed);
                return Pressure::Started {
                    used,
                    shed_above: first,
                };
            }
            self.shed_above
                .store((shed / 2).max(MIN_SHED_ABOVE), Ordering::Relaxed);
            return Pressure::Continues;
        }
        if shed == usize::MAX {
            return Pressure::Calm;
        }
        if used < self.limit / 10 * 9 {
            self.shed_above.store(usize::MAX, Ordering::Relaxed);
            return Pressure::Ended { used };
        }
        Pressure::Continues
    }
}

/// What one holder charges to a budget now: [`Charge::set`] adjusts it, and dropping the guard
/// gives it all back.
#[derive(Debug)]
pub struct Charge<'a> {
    budget: &'a MemoryBudget,
    bytes: usize,
}

impl<'a> Charge<'a> {
    /// A holder charging nothing yet.
    pub fn new(budget: &'a MemoryBudget) -> Charge<'a> {
        Charge { budget, bytes: 0 }
    }

    /// Charges `bytes` in all from now on.
    pub fn set(&mut self, bytes: usize) {
        if bytes != self.bytes {
            self.budget.adjust(self.bytes, bytes);
            self.bytes = bytes;
        }
    }
}

impl Drop for Charge<'_> {
    fn drop(&mut self) {
        self.budget.credit(self.bytes);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_episode_sheds_the_largest_first_then_ends() {
        let b = MemoryBudget::new(8 * 1024 * 1024);
        assert_eq!(b.tick(), Pressure::Calm);
        assert!(!b.sheds(usize::MAX / 8));
        b.charge(8 * 1024 * 1024 + 512 * 1024);
        // Until the monitor's tick, only the hard margin applies.
        assert!(!b.sheds(4 * 1024 * 1024));
        assert!(
            matches!(b.tick(), Pressure::Started { shed_above, .. } if shed_above == 1024 * 1024)
        );
        assert!(b.sheds(2 * 1024 * 1024));
        assert!(!b.sheds(100 * 1024));
        assert_eq!(b.tick(), Pressure::Continues);
        assert_eq!(b.shed_above(), 512 * 1024);
        for _ in 0..20 {
            b.tick();
        }
        assert_eq!(b.shed_above(), MIN_SHED_ABOVE);
        b.charge(1024 * 1024);
        assert!(
            b.sheds(HARD_FLOOR + 1),
            "past the hard margin all but the smallest are shed"
        );
        assert!(!b.sheds(HARD_FLOOR));
        b.credit(9 * 1024 * 1024 + 512 * 1024);
        assert!(matches!(b.tick(), Pressure::Ended { .. }));
        assert!(!b.sheds(usize::MAX / 8));
        assert_eq!(b.used(), 0);
    }
}
