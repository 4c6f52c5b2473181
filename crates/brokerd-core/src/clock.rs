//! A coarse clock: milliseconds since the process's first use of it, advanced by [`tick`].
//!
//! Reading it is one relaxed atomic load, cheap enough for the delivery path (an outbox notes
//! when its queue started waiting). The server calls [`tick`] every 10 ms; until something
//! does, it reads 0.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

static EPOCH: OnceLock<Instant> = OnceLock::new();
static NOW_MS: AtomicU64 = AtomicU64::new(0);

/// Milliseconds since the epoch, as of the last [`tick`].
pub fn now_ms() -> u64 {
    NOW_MS.load(Ordering::Relaxed)
}

/// Advances the clock to the real time; returns the new reading.
pub fn tick() -> u64 {
    let epoch = EPOCH.get_or_init(Instant::now);
    let now = epoch.elapsed().as_millis() as u64;
    NOW_MS.fetch_max(now, Ordering::Relaxed);
    now
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_move_forward_only() {
        let a = tick();
        std::thread::sleep(std::time::Duration::from_millis(3));
        let b = tick();
        assert!(b >= a + 2, "{a} then {b}");
        assert!(now_ms() >= b);
    }
}
