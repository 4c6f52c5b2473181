//! Connection teardown off the runtime's workers.
//!
//! When thousands of connections end at the same instant (a fleet that drops on a deploy or a
//! network blip), every one of their tasks becomes runnable at once, and whatever each does
//! before it ends is work that every other client's task waits behind in the run queue. So a
//! connection task does only what must happen on its own task (notice the end, close its outbox,
//! let its writer finish) and hands the rest to the reaper: one OS thread, outside the runtime,
//! that takes the connection out of the broker (its subscriptions leave the sublist), logs its
//! end, records it for monitoring, closes its socket and gives its admission ticket back. The
//! runtime's workers go back to routing at once, and the teardown runs beside them.
//!
//! Bound: the queue holds at most one job per connection that has ended and is not yet torn
//! down, and each job holds its connection's admission ticket, so queued teardowns still count
//! against `limits.max_connections`. The channel's capacity is that limit plus
//! `limits.max_handshakes` as configured at start-up; should a reload raise the limit and the
//! queue fill, the teardown runs on the connection's own task, as it did before the reaper. A
//! job's cost is its own connection's subscriptions and one socket close, not anything other
//! clients hold. The shutdown's drain waits for queued teardowns (each job holds a task tracker
//! token).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use tracing::error;

/// One connection's teardown.
pub(crate) type Job = Box<dyn FnOnce() + Send>;

/// The handle connection tasks queue their teardowns through. When the last handle is dropped
/// the thread finishes what is queued and ends.
pub(crate) struct Reaper {
    tx: mpsc::Sender<Job>,
    /// Jobs queued and not yet finished, at most `capacity`.
    queued: Arc<AtomicUsize>,
    capacity: usize,
}

impl Reaper {
    /// Starts the reaper thread. It logs to the caller's current `tracing` dispatcher (the
    /// global one in `brokerd`; a test's own where a test set one for its thread).
    ///
    /// # Errors
    /// The thread cannot be spawned.
    pub(crate) fn start(capacity: usize) -> std::io::Result<Reaper> {
        // Counted rather than a channel of that capacity, which would be allocated up front.
        let (tx, rx) = mpsc::channel::<Job>();
        let queued = Arc::new(AtomicUsize::new(0));
        let done = queued.clone();
        let dispatch = tracing::dispatcher::get_default(Clone::clone);
        std::thread::Builder::new()
            .name("brokerd-reaper".into())
            .spawn(move || {
                let _logs = tracing::dispatcher::set_default(&dispatch);
                lower_priority();
                while let Ok(job) = rx.recv() {
                    // A panic in one teardown must not leave every later one undone.
                    if std::panic::catch_unwind(std::panic::AssertUnwindSafe(job)).is_err() {
                        error!("a connection's teardown panicked");
                    }
                    done.fetch_sub(1, Ordering::Relaxed);
                }
            })?;
        Ok(Reaper {
            tx,
            queued,
            capacity: capacity.max(1),
        })
    }

    /// Queues `job`, never waiting; if the queue is full (see the module's bound) or the thread
    /// is gone, runs it here.
    pub(crate) fn reap(&self, job: Job) {
        if self.queued.fetch_add(1, Ordering::Relaxed) >= self.capacity {
            self.queued.fetch_sub(1, Ordering::Relaxed);
            job();
            return;
        }
        if let Err(mpsc::SendError(job)) = self.tx.send(job) {
            self.queued.fetch_sub(1, Ordering::Relaxed);
            job();
        }
    }
}

/// How far above the process's nice value the reaper's is: how much lower its priority is
/// than the runtime's workers'.
const NICENESS: i32 = 10;

/// Raises the calling thread's nice value by [`NICENESS`] (the kernel caps it at 19). On Linux a nice value
/// belongs to one thread, so the runtime's workers keep theirs. When a fleet closes at once the
/// workers (noticing which connections ended, and routing for everyone else) and the reaper
/// (tearing them down) all want the cores; at nice 10 the reaper gets about a tenth of a
/// worker's share while they are busy and every cycle they leave idle, so routing goes first
/// and the queue still drains. Ten alternating pairs of the 10,000-connection fleet test: the
/// canary's largest gap 105-182 ms (median 140) at the workers' priority, 60-131 ms (median
/// 118) at nice 10, lower in nine pairs; `docs/reliability.md`.
#[cfg(target_os = "linux")]
#[allow(unsafe_code)]
fn lower_priority() {
    // SAFETY: `nice` takes no pointers and changes only the calling thread's nice value (glibc
    // and musl implement it with `getpriority` and `setpriority` on `PRIO_PROCESS` 0, which
    // Linux applies to the calling thread); `errno` is thread-local, and cleared first because
    // -1 is also a valid result.
    let failed = unsafe {
        *libc::__errno_location() = 0;
        libc::nice(NICENESS) == -1 && *libc::__errno_location() != 0
    };
    if failed {
        tracing::debug!(
            error = %std::io::Error::last_os_error(),
            "the reaper runs at the workers' priority"
        );
    }
}

#[cfg(not(target_os = "linux"))]
fn lower_priority() {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[allow(clippy::unwrap_used)]
    fn jobs_run_in_order_and_a_panic_does_not_stop_the_rest() {
        let reaper = Reaper::start(1_000).unwrap();
        let done = Arc::new(AtomicUsize::new(0));
        let (tx, rx) = mpsc::channel();
        for i in 0..100 {
            let done = done.clone();
            reaper.reap(Box::new(move || {
                assert_eq!(done.fetch_add(1, Ordering::SeqCst), i);
            }));
            if i == 50 {
                reaper.reap(Box::new(|| panic!("a teardown that panics")));
            }
        }
        reaper.reap(Box::new(move || tx.send(()).unwrap()));
        rx.recv_timeout(std::time::Duration::from_secs(10)).unwrap();
        assert_eq!(done.load(Ordering::SeqCst), 100);
    }

    #[cfg(target_os = "linux")]
    #[test]
    #[allow(clippy::unwrap_used)]
    fn the_reaper_runs_below_the_workers_priority() {
        let reaper = Reaper::start(10).unwrap();
        let (tx, rx) = mpsc::channel();
        reaper.reap(Box::new(move || tx.send(this_threads_nice()).unwrap()));
        let nice = rx.recv_timeout(std::time::Duration::from_secs(10)).unwrap();
        assert_eq!(nice, (this_threads_nice() + NICENESS).min(19));
    }

    /// The calling thread's nice value: the 19th field of `/proc/thread-self/stat`, the 17th
    /// after the command name (which is in parentheses and may hold spaces).
    #[cfg(target_os = "linux")]
    #[allow(clippy::unwrap_used)]
    fn this_threads_nice() -> i32 {
        let stat = std::fs::read_to_string("/proc/thread-self/stat").unwrap();
        let after = stat.rsplit(')').next().unwrap();
        after.split_whitespace().nth(16).unwrap().parse().unwrap()
    }

    #[test]
    #[allow(clippy::unwrap_used)]
    fn a_full_queue_runs_the_job_in_place() {
        let reaper = Reaper::start(1).unwrap();
        // The first job holds the thread, and the one place in the queue, until released.
        let (release_tx, release_rx) = mpsc::channel::<()>();
        let (started_tx, started_rx) = mpsc::channel::<()>();
        reaper.reap(Box::new(move || {
            started_tx.send(()).unwrap();
            release_rx.recv().unwrap();
        }));
        started_rx
            .recv_timeout(std::time::Duration::from_secs(10))
            .unwrap();
        reaper.reap(Box::new(|| {}));
        let here = std::thread::current().id();
        let (ran_tx, ran_rx) = mpsc::channel();
        reaper.reap(Box::new(move || {
            ran_tx.send(std::thread::current().id()).unwrap();
        }));
        assert_eq!(
            ran_rx.try_recv().unwrap(),
            here,
            "ran on the caller's thread"
        );
        release_tx.send(()).unwrap();
    }
}
