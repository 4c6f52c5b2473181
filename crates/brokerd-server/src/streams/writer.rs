//! A stream's writer thread: the only writer of its store.
//!
//! It takes every capture queued since its last batch (at most [`MAX_BATCH_MSGS`] messages and
//! [`MAX_BATCH_BYTES`] bytes), appends them with one write, syncs as the stream's `fsync`
//! setting says (under `always`, before anything is acknowledged: group commit), then makes
//! them visible to replays and answers the publishers that asked, `STORED` or
//! `ERR store-failed`. Between batches it syncs under `interval`, applies retention once a
//! second and forgets expired message ids. It never waits for a client: answers go into
//! outboxes, which never block.

use super::handle::{Capture, Ids, RecentMsg, StreamHandle};
use brokerd_proto::{ErrorCode, ErrorFrame, Frame, Stored};
use brokerd_store::{Append, StoreError, Stream};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use tracing::{error, info, warn};

/// Most messages appended in one batch.
pub(crate) const MAX_BATCH_MSGS: usize = 8_192;
/// Most bytes appended in one batch (a larger single message is a batch of its own).
pub(crate) const MAX_BATCH_BYTES: usize = 8 << 20;
/// How often retention runs and expired ids are forgotten.
const HOUSEKEEPING: Duration = Duration::from_secs(1);

/// Runs until the stream's queue is closed and empty; then syncs and closes the store.
/// `ids` holds the message ids recovery found within the duplicate window, with their sequences.
pub(crate) fn run(handle: Arc<StreamHandle>, mut ids: Ids) {
    let mut last_housekeeping = Instant::now();
    let mut last_error_log: Option<Instant> = None;
    let window_ms = handle.config.duplicate_window_s.saturating_mul(1000);
    loop {
        let mut batch: Vec<Capture> = Vec::new();
        let mut cost = 0;
        // Worked out before the queue's lock is taken: the lock order is queue, then store, and
        // publishers take the queue's lock on their publish path.
        let wait = next_wake(last_housekeeping);
        {
            let mut q = handle.queue.lock();
            while q.items.is_empty() && !q.closed {
                if handle.wake_writer.wait_for(&mut q, wait).timed_out() {
                    break;
                }
            }
            if q.items.is_empty() && q.closed {
                break;
            }
            while let Some(c) = q.items.front() {
                let c_cost = c.cost();
                if !batch.is_empty()
                    && (batch.len() >= MAX_BATCH_MSGS || cost + c_cost > MAX_BATCH_BYTES)
                {
                    break;
                }
                cost += c_cost;
                if let Some(c) = q.items.pop_front() {
                    batch.push(c);
                }
            }
        }
        if !batch.is_empty() {
            let n = batch.len();
            write_batch(&handle, &mut ids, batch, window_ms, &mut last_error_log);
            let mut q = handle.queue.lock();
            q.bytes -= cost;
            q.msgs -= n;
            drop(q);
            handle.room.notify_waiters();
        }
        housekeeping(&handle, &mut ids, window_ms, &mut last_housekeeping);
    }
    let store = handle.store.lock().take();
    if let Some(s) = store
        && let Err(e) = s.close()
    {
        error!(stream = %handle.config.name, error = %e, "closing the stream failed");
    }
    handle.room.notify_waiters();
}

/// How long the writer may sleep: until the next housekeeping.
fn next_wake(last_housekeeping: Instant) -> Duration {
    HOUSEKEEPING
        .saturating_sub(last_housekeeping.elapsed())
        .max(Duration::from_millis(1))
}

/// Under `fsync = interval`: every `fsync_interval_ms`, syncs the active segment if anything
/// was appended since the last sync. The fdatasync runs on this thread, holding no lock, on a
/// duplicate of the segment's file (`Stream::begin_sync`), so the writer appends and answers
/// while it runs. Ends when the stream's queue closes.
pub(crate) fn sync_every(handle: Arc<StreamHandle>) {
    let period = Duration::from_millis(handle.config.fsync_interval_ms.max(1));
    let mut last_error_log: Option<Instant> = None;
    loop {
        std::thread::park_timeout(period);
        if handle.queue.lock().closed {
            return;
        }
        let pending = match handle.store.lock().as_mut() {
            Some(s) => s.begin_sync(),
            None => return,
        };
        let failed = match pending {
            Ok(None) => None,
            Ok(Some(sync)) => {
                let result = sync.run();
                match handle.store.lock().as_mut() {
                    Some(s) => s.finish_sync(sync, result).err(),
                    None => return,
                }
            }
            Err(e) => Some(e),
        };
        if let Some(e) = failed
            && last_error_log.is_none_or(|t| t.elapsed() >= Duration::from_secs(1))
        {
            last_error_log = Some(Instant::now());
            error!(stream = %handle.config.name, error = %e, "interval sync failed");
        }
    }
}

fn housekeeping(handle: &StreamHandle, ids: &mut Ids, window_ms: u64, last: &mut Instant) {
    if last.elapsed() < HOUSEKEEPING {
        return;
    }
    *last = Instant::now();
    let mut store = handle.store.lock();
    let Some(s) = store.as_mut() else { return };
    if let Some(p) = &handle.per_topic {
        // Whole segments holding only messages newer ones of their topics replaced.
        let oldest = p.lock().kept.first().copied();
        let keep_from = oldest.unwrap_or(s.last_seq() + 1);
        if let Err(e) = s.trim_before(keep_from) {
            warn!(stream = %handle.config.name, error = %e, "reclaiming replaced messages failed");
        }
    }
    match s.enforce_retention(super::handle::now_ns()) {
        Ok(0) => {}
        Ok(n) => info!(stream = %handle.config.name, segments = n, "retention deleted segments"),
        Err(e) => warn!(stream = %handle.config.name, error = %e, "retention failed"),
    }
    handle.first_seq.store(s.first_seq(), Ordering::Release);
    drop(store);
    let now = brokerd_core::clock::now_ms();
    ids.expire(now, window_ms);
    handle.ids.lock().expire(now, window_ms);
}

fn write_batch(
    handle: &StreamHandle,
    ids: &mut Ids,
    batch: Vec<Capture>,
    window_ms: u64,
    last_error_log: &mut Option<Instant>,
) {
    let appends: Vec<Append<'_>> = batch
        .iter()
        .filter(|c| !c.duplicate)
        .map(|c| Append {
            // Captured topics passed the broker's checks, so they are UTF-8.
            topic: std::str::from_utf8(c.topic()).unwrap_or_default(),
            headers: c.header_block(),
            payload: c.payload(),
            timestamp: c.timestamp,
        })
        .collect();
    let result = {
        let mut store = handle.store.lock();
        match store.as_mut() {
            Some(s) => {
                let r = s.append_batch(&appends);
                if matches!(r, Err(StoreError::Poisoned)) || s.is_poisoned() {
                    reopen(handle, &mut store);
                }
                r
            }
            None => Err(StoreError::Poisoned),
        }
    };
    drop(appends);
    let stream_name = &handle.config.name;
    match result {
        Ok(range) => {
            let mut seq = range.start;
            let mut answers = Vec::new();
            {
                let mut recent = handle.recent.lock();
                for c in &batch {
                    if c.duplicate {
                        continue;
                    }
                    recent.push(RecentMsg {
                        seq,
                        body: c.body.clone(),
                        topic_len: c.topic_len,
                    });
                    seq += 1;
                }
            }
            if let Some(per_topic) = &handle.per_topic {
                let max = handle.config.max_msgs_per_topic;
                let mut p = per_topic.lock();
                for (seq, c) in (range.start..).zip(batch.iter().filter(|c| !c.duplicate)) {
                    p.add(std::str::from_utf8(c.topic()).unwrap_or_default(), seq, max);
                }
            }
            if range.end > range.start {
                handle
                    .stored
                    .fetch_add(range.end - range.start, Ordering::Relaxed);
                handle.batches.fetch_add(1, Ordering::Relaxed);
                handle.last_seq.store(range.end - 1, Ordering::Release);
                handle.visible.send_replace(range.end - 1);
            }
            let now = brokerd_core::clock::now_ms();
            let mut seq = range.start;
            for c in batch {
                let (my_seq, duplicate) = if c.duplicate {
                    let first = c
                        .msg_id
                        .as_deref()
                        .and_then(|id| ids.seen.get(id).copied())
                        .unwrap_or(0);
                    (first, true)
                } else {
                    let s = seq;
                    seq += 1;
                    if let Some(id) = c.msg_id.as_deref()
                        && window_ms > 0
                    {
                        ids.insert(id, s, now, window_ms);
                    }
                    (s, false)
                };
                if let Some(ack) = c.ack {
                    answers.push((ack, my_seq, duplicate));
                }
            }
            for (ack, seq, duplicate) in answers {
                let frame = Frame::Stored(Stored {
                    req_id: ack.req_id,
                    delivered: if duplicate { 0 } else { ack.delivered },
                    seq,
                    duplicate,
                    stream: stream_name.clone(),
                });
                ack.outbox.push_frame(frame.to_bytes());
            }
        }
        Err(e) => {
            let failed = batch.iter().filter(|c| !c.duplicate).count() as u64;
            handle.store_errors.fetch_add(failed, Ordering::Relaxed);
            if last_error_log.is_none_or(|t| t.elapsed() >= Duration::from_secs(1)) {
                *last_error_log = Some(Instant::now());
                error!(stream = %stream_name, error = %e, messages = failed, "could not store messages");
            }
            let message = format!("stream {stream_name} could not store the message: {e}");
            for c in batch {
                if let Some(id) = c.msg_id.as_deref()
                    && !c.duplicate
                {
                    handle.release_id(id);
                }
                if let Some(ack) = c.ack {
                    let frame = Frame::Err(ErrorFrame {
                        req_id: ack.req_id,
                        code: ErrorCode::StoreFailed as u16,
                        message: message.clone(),
                    });
                    ack.outbox.push_frame(frame.to_bytes());
                }
            }
        }
    }
}

/// After a failed write or sync, what the disk holds is unknown: open the stream again, which
/// recovers it as at start-up (a torn tail is cut off).
fn reopen(handle: &StreamHandle, store: &mut Option<Stream>) {
    let Some(old) = store.take() else { return };
    let opts = old.options().clone();
    drop(old);
    match Stream::open(&handle.dir, opts) {
        Ok((s, rec)) => {
            warn!(
                stream = %handle.config.name,
                truncated_bytes = rec.truncated_bytes,
                "reopened the stream after a write failure"
            );
            handle.last_seq.store(s.last_seq(), Ordering::Release);
            handle.first_seq.store(s.first_seq(), Ordering::Release);
            handle.recent.lock().clear();
            *store = Some(s);
        }
        Err(e) => {
            error!(stream = %handle.config.name, error = %e, "cannot reopen the stream; it stores nothing until the broker restarts");
        }
    }
}
