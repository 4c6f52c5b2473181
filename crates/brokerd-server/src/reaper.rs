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
//! against `limits.max_connections`: the queue can never exceed the connection limit. A job's
//! cost is its own connection's subscriptions and one socket close, not anything other clients
//! hold. The shutdown's drain waits for queued teardowns (each job holds a task tracker token).

use std::sync::mpsc;
use tracing::error;

/// One connection's teardown.
pub(crate) type Job = Box<dyn FnOnce() + Send>;

/// The handle connection tasks queue their teardowns through. When the last handle is dropped
/// the thread finishes what is queued and ends.
pub(crate) struct Reaper {
    tx: mpsc::Sender<Job>,
}

impl Reaper {
    /// Starts the reaper thread. It logs to the caller's current `tracing` dispatcher (the
    /// global one in `brokerd`; a test's own where a test set one for its thread).
    ///
    /// # Errors
    /// The thread cannot be spawned.
    pub(crate) fn start() -> std::io::Result<Reaper> {
        let (tx, rx) = mpsc::channel::<Job>();
        let dispatch = tracing::dispatcher::get_default(Clone::clone);
        std::thread::Builder::new()
            .name("brokerd-reaper".into())
            .spawn(move || {
                let _logs = tracing::dispatcher::set_default(&dispatch);
                while let Ok(job) = rx.recv() {
                    // A panic in one teardown must not leave every later one undone.
                    if std::panic::catch_unwind(std::panic::AssertUnwindSafe(job)).is_err() {
                        error!("a connection's teardown panicked");
                    }
                }
            })?;
        Ok(Reaper { tx })
    }

    /// Queues `job`; if the thread is gone (it never is while a handle exists, unless it could
    /// not be started), runs it here.
    pub(crate) fn reap(&self, job: Job) {
        if let Err(mpsc::SendError(job)) = self.tx.send(job) {
            job();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    #[allow(clippy::unwrap_used)]
    fn jobs_run_in_order_and_a_panic_does_not_stop_the_rest() {
        let reaper = Reaper::start().unwrap();
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
}
