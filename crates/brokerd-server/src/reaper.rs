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
//! against `limits.max_connections` and `limits.max_connections_per_address`. Two rules keep it
//! short:
//! - **Lag.** The reaper runs at a low priority (see [`NICENESS`]), so while the cores stay busy
//!   (steady churn beside steady traffic) it may fall behind for as long as they do. Once the
//!   oldest queued teardown has waited [`MAX_LAG`], each connection that ends tears itself down
//!   on its own task and takes the oldest queued teardown with it, so the queue shrinks by one
//!   per ended connection until it is within the lag again. A burst (a fleet that drops at once)
//!   is handed over whole as long as the reaper clears it within the lag; a steady churn cannot
//!   keep tickets of connections long gone (which the per-address limit then counted, refusing a
//!   client that reconnects in a loop) or their memory for longer than about the lag.
//! - **Count.** The queue holds at most `limits.max_connections` plus `limits.max_handshakes`
//!   as configured at start-up; should a reload raise the limit and the queue fill, the teardown
//!   runs on the connection's own task.
//!
//! A job's cost is its own connection's subscriptions and one socket close, not anything other
//! clients hold. The queue's lock is held to push or pop one job, never while one runs. The
//! shutdown's drain waits for queued teardowns (each job holds a task tracker token).

use parking_lot::{Condvar, Mutex};
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tracing::error;

/// One connection's teardown.
pub(crate) type Job = Box<dyn FnOnce() + Send>;

/// How long the oldest queued teardown may wait before ended connections tear themselves down
/// (see the module's bound). Longer than a fleet of 10,000 takes to clear when it drops at once
/// (about 200 ms on two cores, `docs/reliability.md`).
pub(crate) const MAX_LAG: Duration = Duration::from_millis(500);

/// The handle connection tasks queue their teardowns through. When it is dropped the thread
/// finishes what is queued and ends.
pub(crate) struct Reaper {
    queue: Arc<Queue>,
    capacity: usize,
    max_lag: Duration,
}

struct Queue {
    state: Mutex<State>,
    /// Signalled when a job is queued or the handle is dropped.
    ready: Condvar,
}

#[derive(Default)]
struct State {
    /// Queued teardowns, oldest first, each with the time it was queued.
    jobs: VecDeque<(Instant, Job)>,
    /// The handle is gone: the thread ends once `jobs` is empty.
    closed: bool,
}

impl Reaper {
    /// Starts the reaper thread. It logs to the caller's current `tracing` dispatcher (the
    /// global one in `brokerd`; a test's own where a test set one for its thread).
    ///
    /// # Errors
    /// The thread cannot be spawned.
    pub(crate) fn start(capacity: usize) -> std::io::Result<Reaper> {
        Reaper::with_lag(capacity, MAX_LAG)
    }

    fn with_lag(capacity: usize, max_lag: Duration) -> std::io::Result<Reaper> {
        let queue = Arc::new(Queue {
            state: Mutex::new(State::default()),
            ready: Condvar::new(),
        });
        let theirs = queue.clone();
        let dispatch = tracing::dispatcher::get_default(Clone::clone);
        std::thread::Builder::new()
            .name("brokerd-reaper".into())
            .spawn(move || {
                let _logs = tracing::dispatcher::set_default(&dispatch);
                lower_priority();
                while let Some(job) = theirs.next() {
                    run(job);
                }
            })?;
        Ok(Reaper {
            queue,
            capacity: capacity.max(1),
            max_lag,
        })
    }

    /// Queues `job`, never waiting. If the queue is full, or its oldest job has waited longer
    /// than the lag allows (see the module's bound), runs `job` here instead, and then the
    /// oldest queued job.
    pub(crate) fn reap(&self, job: Job) {
        let now = Instant::now();
        let oldest = {
            let mut st = self.queue.state.lock();
            let behind = st
                .jobs
                .front()
                .is_some_and(|(at, _)| now.saturating_duration_since(*at) > self.max_lag);
            if !behind && st.jobs.len() < self.capacity {
                st.jobs.push_back((now, job));
                drop(st);
                self.queue.ready.notify_one();
                return;
            }
            if behind { st.jobs.pop_front() } else { None }
        };
        run(job);
        if let Some((_, job)) = oldest {
            run(job);
        }
    }
}

impl Drop for Reaper {
    fn drop(&mut self) {
        self.queue.state.lock().closed = true;
        self.queue.ready.notify_one();
    }
}

impl Queue {
    /// The next job for the thread, waiting for one; `None` once the handle is gone and nothing
    /// is left.
    fn next(&self) -> Option<Job> {
        let mut st = self.state.lock();
        loop {
            if let Some((_, job)) = st.jobs.pop_front() {
                return Some(job);
            }
            if st.closed {
                return None;
            }
            self.ready.wait(&mut st);
        }
    }
}

/// Runs one teardown; a panic in it must not leave any later one undone.
fn run(job: Job) {
    if std::panic::catch_unwind(std::panic::AssertUnwindSafe(job)).is_err() {
        error!("a connection's teardown panicked");
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
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::mpsc;

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

    #[test]
    #[allow(clippy::unwrap_used)]
    fn once_the_oldest_has_waited_past_the_lag_a_teardown_runs_in_place_with_the_oldest() {
        let lag = Duration::from_millis(10);
        let reaper = Reaper::with_lag(1_000, lag).unwrap();
        let here = std::thread::current().id();
        // The first job holds the thread until released.
        let (release_tx, release_rx) = mpsc::channel::<()>();
        let (started_tx, started_rx) = mpsc::channel::<()>();
        reaper.reap(Box::new(move || {
            started_tx.send(()).unwrap();
            release_rx.recv().unwrap();
        }));
        started_rx.recv_timeout(Duration::from_secs(10)).unwrap();
        let (ran_tx, ran_rx) = mpsc::channel();
        let tx = ran_tx.clone();
        reaper.reap(Box::new(move || {
            tx.send(("queued", std::thread::current().id())).unwrap();
        }));
        assert!(
            ran_rx.try_recv().is_err(),
            "within the lag it waits its turn"
        );
        // Not a race: the queued job cannot run before the release below, and a sleep lasts at
        // least as long as asked.
        std::thread::sleep(lag * 2);
        let tx = ran_tx.clone();
        reaper.reap(Box::new(move || {
            tx.send(("late", std::thread::current().id())).unwrap();
        }));
        assert_eq!(ran_rx.try_recv().unwrap(), ("late", here));
        assert_eq!(ran_rx.try_recv().unwrap(), ("queued", here));
        // Caught up: the next one is the thread's again.
        release_tx.send(()).unwrap();
        reaper.reap(Box::new(move || {
            ran_tx.send(("after", std::thread::current().id())).unwrap();
        }));
        let (which, on) = ran_rx.recv_timeout(Duration::from_secs(10)).unwrap();
        assert_eq!(which, "after");
        assert_ne!(on, here);
    }

    #[test]
    #[allow(clippy::unwrap_used)]
    fn dropping_the_handle_finishes_what_is_queued() {
        let reaper = Reaper::start(1_000).unwrap();
        let (tx, rx) = mpsc::channel();
        for i in 0..100 {
            let tx = tx.clone();
            reaper.reap(Box::new(move || tx.send(i).unwrap()));
        }
        drop(tx);
        drop(reaper);
        for i in 0..100 {
            assert_eq!(rx.recv_timeout(Duration::from_secs(10)).unwrap(), i);
        }
    }
}
