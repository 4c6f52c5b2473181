//! Gives freed memory back to the operating system once the broker's threads fall idle.
//!
//! mimalloc, the binary's allocator, frees a page that empties into its arena and schedules the
//! page's return to the operating system for a second later, but carries that out only when some
//! thread later frees a page or collects its heap; blocks freed by another thread wait in their
//! page until the owning thread collects. A broker that goes quiet after a load does neither, and
//! kept its peak resident memory (measured: 290 MiB for a minute after a 290 MiB load). So each
//! runtime worker collects its own heap as it parks, at most once per [`EVERY`]: when a load ends
//! every worker parks, and the memory watcher's tick keeps one waking and parking, which carries
//! out the returns as they fall due. Returning pages sooner (mimalloc's `purge_delay` of 0)
//! halved `pubsub` at 1 KiB, so the delay stays; collecting costs a walk of the parking thread's
//! own pages.
//!
//! Called from the runtime's `on_thread_park` hook (`main.rs`). Without the `mimalloc` feature
//! it does nothing.

use std::cell::Cell;
use std::time::{Duration, Instant};

/// The least time between two collections by one thread.
const EVERY: Duration = Duration::from_millis(100);

thread_local! {
    static LAST: Cell<Option<Instant>> = const { Cell::new(None) };
}

/// Collects the calling thread's heap if it has not for [`EVERY`].
pub fn on_park() {
    let now = Instant::now();
    let due = LAST.with(|last| {
        let due = last.get().is_none_or(|t| now.duration_since(t) >= EVERY);
        if due {
            last.set(Some(now));
        }
        due
    });
    if due {
        collect();
    }
}

#[cfg(feature = "mimalloc")]
#[allow(unsafe_code)]
fn collect() {
    // SAFETY: `mi_collect` takes no pointers and may be called on any thread at any time; it only
    // returns memory the allocator owns and no live allocation refers to.
    unsafe { libmimalloc_sys::mi_collect(false) }
}

#[cfg(not(feature = "mimalloc"))]
fn collect() {}
