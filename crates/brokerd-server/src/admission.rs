//! Who may hold a connection: the counts behind `limits.max_handshakes`,
//! `limits.max_connections` and `limits.max_connections_per_address`.
//!
//! A connection is admitted by the accept loop ([`Gate::admit`]) as a *handshake*, which counts
//! against `max_handshakes` and its address's share, never against `max_connections`; only when
//! its `HELLO` is accepted does the connection task ask for a full slot
//! ([`Ticket::establish`]). So sockets that never send a `HELLO` cannot keep a client that does
//! send one out of `max_connections`.
//!
//! Nor can they keep it out of `max_handshakes`: at that limit a new connection is admitted and
//! the *oldest* handshake is evicted (its task sees [`Ticket::eviction`] fire and closes it
//! with `too-many-handshakes`). Refusing the newest instead would let a few silent sockets,
//! reopened as they time out, lock every new client out, which is the attack this limit is for;
//! evicting the oldest means an attacker must open `max_handshakes` connections within one
//! honest client's round trip to keep it out. The per-address share refuses the newest: the one
//! refused is then the address over its share.
//!
//! The [`Ticket`] returns whatever it holds when dropped, so every way a connection task ends
//! releases its counts. This module counts and decides; writing the refusal and logging it is
//! the caller's job.

use brokerd_core::CloseReason;
use parking_lot::Mutex;
use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use tokio_util::sync::CancellationToken;

/// The limits and the live counts. Shared by the accept loop and every connection task.
#[derive(Debug)]
pub(crate) struct Gate {
    /// The three limits, changed by a configuration reload ([`Gate::set_limits`]); a lower
    /// limit turns new connections away, never ones already admitted.
    max_handshakes: AtomicUsize,
    max_connections: AtomicUsize,
    max_per_address: AtomicUsize,
    /// Connections holding a `max_connections` slot.
    established: AtomicUsize,
    /// A leaf lock: held only to look at or change the maps, never across an `.await`.
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    /// Handshakes in progress, oldest first, each with the token that evicts it. Its length is
    /// the handshake count.
    pending: BTreeMap<u64, CancellationToken>,
    /// The key of the next handshake admitted.
    next: u64,
    /// Connections per source address, handshakes and established alike. An entry exists only
    /// while its count is above zero, so the map holds at most `max_handshakes +
    /// max_connections` entries.
    per_address: HashMap<IpAddr, usize>,
}

/// What a [`Ticket`] holds besides its address's share.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    /// A handshake slot, unless evicted (then its entry in `pending` is gone).
    Handshake,
    /// A `max_connections` slot.
    Established,
    /// Nothing: refused at the connection limit.
    Refused,
}

/// A new connection's admission: its ticket, and whether admitting it evicted the oldest
/// handshake.
#[derive(Debug)]
pub(crate) struct Admitted {
    /// The new connection's share of the counts.
    pub(crate) ticket: Ticket,
    /// Whether the oldest handshake was evicted to make room.
    pub(crate) evicted_one: bool,
}

/// One connection's share of the [`Gate`]'s counts: its address's share and a handshake or an
/// established slot. Dropping it gives them back.
#[derive(Debug)]
pub(crate) struct Ticket {
    gate: Arc<Gate>,
    addr: IpAddr,
    key: u64,
    eviction: CancellationToken,
    stage: Stage,
}

impl Gate {
    /// A gate with no connections.
    pub(crate) fn new(
        max_handshakes: usize,
        max_connections: usize,
        max_per_address: usize,
    ) -> Gate {
        Gate {
            max_handshakes: AtomicUsize::new(max_handshakes),
            max_connections: AtomicUsize::new(max_connections),
            max_per_address: AtomicUsize::new(max_per_address),
            established: AtomicUsize::new(0),
            state: Mutex::new(State::default()),
        }
    }

    /// Replaces the limits, as a configuration reload does.
    pub(crate) fn set_limits(
        &self,
        max_handshakes: usize,
        max_connections: usize,
        max_per_address: usize,
    ) {
        self.max_handshakes.store(max_handshakes, Ordering::Relaxed);
        self.max_connections
            .store(max_connections, Ordering::Relaxed);
        self.max_per_address
            .store(max_per_address, Ordering::Relaxed);
    }

    /// Admits a new connection from `addr` as a handshake, evicting the oldest handshake if
    /// there are already `max_handshakes`.
    ///
    /// # Errors
    /// [`CloseReason::TooManyFromAddress`] when `addr` already holds its share; nothing is
    /// counted then.
    pub(crate) fn admit(self: &Arc<Gate>, addr: IpAddr) -> Result<Admitted, CloseReason> {
        // An IPv4 client of a dual-stack listener is one address, however it is written.
        let addr = addr.to_canonical();
        let mut state = self.state.lock();
        let count = state.per_address.get(&addr).copied().unwrap_or(0);
        if count >= self.max_per_address.load(Ordering::Relaxed) {
            return Err(CloseReason::TooManyFromAddress);
        }
        let mut evicted_one = false;
        let max_handshakes = self.max_handshakes.load(Ordering::Relaxed);
        while state.pending.len() >= max_handshakes {
            let Some((_, oldest)) = state.pending.pop_first() else {
                break;
            };
            oldest.cancel();
            evicted_one = true;
        }
        let key = state.next;
        state.next += 1;
        let eviction = CancellationToken::new();
        state.pending.insert(key, eviction.clone());
        state.per_address.insert(addr, count + 1);
        Ok(Admitted {
            ticket: Ticket {
                gate: self.clone(),
                addr,
                key,
                eviction,
                stage: Stage::Handshake,
            },
            evicted_one,
        })
    }

    /// The connection limit in force.
    pub(crate) fn max_connections(&self) -> usize {
        self.max_connections.load(Ordering::Relaxed)
    }

    /// Connections in their handshake now.
    pub(crate) fn handshakes(&self) -> usize {
        self.state.lock().pending.len()
    }

    /// Connections holding a `max_connections` slot now.
    pub(crate) fn established(&self) -> usize {
        self.established.load(Ordering::Relaxed)
    }

    /// Source addresses with at least one connection now.
    #[cfg(test)]
    fn addresses(&self) -> usize {
        self.state.lock().per_address.len()
    }
}

impl Ticket {
    /// A token cancelled when this handshake is evicted to admit a newer connection.
    pub(crate) fn eviction(&self) -> CancellationToken {
        self.eviction.clone()
    }

    /// Trades the handshake slot for a `max_connections` slot, once the `HELLO` is accepted.
    /// Calling it again after a success changes nothing.
    ///
    /// # Errors
    /// [`CloseReason::TooManyHandshakes`] if the handshake was evicted meanwhile;
    /// [`CloseReason::TooManyConnections`] at the connection limit. Either way the ticket then
    /// holds only its address's share, until dropped.
    pub(crate) fn establish(&mut self) -> Result<(), CloseReason> {
        match self.stage {
            Stage::Established => return Ok(()),
            Stage::Refused => return Err(CloseReason::TooManyConnections),
            Stage::Handshake => {}
        }
        let evicted = self.gate.state.lock().pending.remove(&self.key).is_none();
        self.stage = Stage::Refused;
        if evicted {
            return Err(CloseReason::TooManyHandshakes);
        }
        take_slot(
            &self.gate.established,
            self.gate.max_connections.load(Ordering::Relaxed),
        )
        .ok_or(CloseReason::TooManyConnections)?;
        self.stage = Stage::Established;
        Ok(())
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if self.stage == Stage::Established {
            self.gate.established.fetch_sub(1, Ordering::Relaxed);
        }
        let mut state = self.gate.state.lock();
        if self.stage == Stage::Handshake {
            // Gone already if evicted.
            state.pending.remove(&self.key);
        }
        if let Some(count) = state.per_address.get_mut(&self.addr) {
            *count -= 1;
            if *count == 0 {
                state.per_address.remove(&self.addr);
            }
        }
    }
}

/// Adds one to `count` unless it is already `max`; whether it did.
fn take_slot(count: &AtomicUsize, max: usize) -> Option<()> {
    count
        .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
            (n < max).then_some(n + 1)
        })
        .ok()
        .map(|_| ())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, Ipv6Addr};

    fn ip(last: u8) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(127, 0, 0, last))
    }

    fn admit(gate: &Arc<Gate>, last: u8) -> Ticket {
        gate.admit(ip(last)).unwrap().ticket
    }

    #[test]
    fn handshakes_do_not_take_connection_slots() {
        let gate = Arc::new(Gate::new(3, 2, 100));
        let mut a = admit(&gate, 1);
        let mut b = admit(&gate, 1);
        let mut c = admit(&gate, 1);
        assert_eq!((gate.handshakes(), gate.established()), (3, 0));
        a.establish().unwrap();
        b.establish().unwrap();
        assert_eq!(c.establish().unwrap_err(), CloseReason::TooManyConnections);
        assert_eq!((gate.handshakes(), gate.established()), (0, 2));
        a.establish().unwrap();
        assert_eq!(gate.established(), 2, "establishing twice takes one slot");
        drop(a);
        assert_eq!(gate.established(), 1);
        drop((b, c));
        assert_eq!((gate.handshakes(), gate.established()), (0, 0));
        assert_eq!(gate.addresses(), 0);
    }

    #[test]
    fn at_the_handshake_limit_the_oldest_handshake_is_evicted() {
        let gate = Arc::new(Gate::new(2, 10, 100));
        let mut oldest = admit(&gate, 1);
        let middle = admit(&gate, 2);
        assert!(!oldest.eviction().is_cancelled());
        let newest = gate.admit(ip(3)).unwrap();
        assert!(newest.evicted_one);
        assert!(oldest.eviction().is_cancelled());
        assert!(!middle.eviction().is_cancelled());
        assert_eq!(gate.handshakes(), 2);
        // The evicted connection cannot establish, and dropping it frees no one else's slot.
        assert_eq!(
            oldest.establish().unwrap_err(),
            CloseReason::TooManyHandshakes
        );
        drop(oldest);
        assert_eq!((gate.handshakes(), gate.addresses()), (2, 2));
        let mut newest = newest.ticket;
        newest.establish().unwrap();
        assert_eq!((gate.handshakes(), gate.established()), (1, 1));
        // Room again: no eviction.
        assert!(!gate.admit(ip(4)).unwrap().evicted_one);
        drop((middle, newest));
    }

    #[test]
    fn each_address_has_its_own_share() {
        let gate = Arc::new(Gate::new(100, 100, 2));
        let mut a1 = admit(&gate, 2);
        a1.establish().unwrap();
        let a2 = admit(&gate, 2);
        assert_eq!(
            gate.admit(ip(2)).unwrap_err(),
            CloseReason::TooManyFromAddress
        );
        let b = admit(&gate, 3);
        drop(a1);
        let a3 = admit(&gate, 2);
        assert_eq!(gate.addresses(), 2);
        drop((a2, a3, b));
        assert_eq!(gate.addresses(), 0, "emptied entries are removed");
    }

    #[test]
    fn ipv4_mapped_addresses_count_as_ipv4() {
        let gate = Arc::new(Gate::new(100, 100, 1));
        let _v4 = admit(&gate, 5);
        let mapped = IpAddr::V6(Ipv4Addr::new(127, 0, 0, 5).to_ipv6_mapped());
        assert_eq!(
            gate.admit(mapped).unwrap_err(),
            CloseReason::TooManyFromAddress
        );
        let _v6 = gate.admit(IpAddr::V6(Ipv6Addr::LOCALHOST)).unwrap();
    }

    #[test]
    fn a_refusal_counts_nothing() {
        let gate = Arc::new(Gate::new(10, 10, 1));
        let held = admit(&gate, 1);
        assert!(gate.admit(ip(1)).is_err());
        assert_eq!((gate.handshakes(), gate.addresses()), (1, 1));
        drop(held);
        assert_eq!((gate.handshakes(), gate.addresses()), (0, 0));
    }
}
