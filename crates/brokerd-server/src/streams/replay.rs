//! A replay subscription's task: delivers a stream's stored messages from a start position,
//! in sequence order, then follows the stream as it grows.
//!
//! Everything it delivers comes from the stream, history and live alike, so there is no seam to
//! get wrong: a message is delivered once, at its place in the sequence. It reads the newest
//! messages from the stream's memory ([`super::handle::Recent`]) and older ones from disk, on the
//! blocking pool, a bounded batch at a time ([`BATCH_MSGS`], [`BATCH_BYTES`]), and offers each
//! to the subscriber's outbox only when it has room within the bounds of stored deliveries
//! ([`Outbox::push_stored`], two batches at most): a replay waits for its subscriber, with the
//! rest of the stream on disk, and never drops. It ends when the subscription ends (`UNSUB`, the
//! connection's end, an auto-unsubscribe), noticed within [`RECHECK`], or when the stream is
//! deleted.

use super::handle::{RecentMsg, StreamHandle};
use brokerd_core::{Broker, Client, Outbox, Stored, Subscription};
use brokerd_proto::{ErrorCode, ErrorFrame, Frame, StartPosition, encode_stored};
use brokerd_store::{Reader, StoreError};
use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;
use tracing::warn;

/// Most messages read in one batch.
const BATCH_MSGS: usize = 512;
/// About the most bytes read in one batch (one larger message is a batch of its own).
const BATCH_BYTES: usize = 1 << 20;
/// What a store reader holds while it reads (its chunk buffer), charged to the memory budget.
const READER_BYTES: usize = 256 * 1024;
/// How often a waiting replay checks whether its subscription is still live.
const RECHECK: Duration = Duration::from_millis(250);

/// Decrements the stream's reader count when the task ends, however it ends.
struct ReaderCount<'a>(&'a StreamHandle);

impl Drop for ReaderCount<'_> {
    fn drop(&mut self) {
        self.0.readers.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Where a replay that starts now begins, for the positions that need no I/O; `None` for the
/// ones the task works out from disk.
pub(crate) fn start_now(handle: &StreamHandle, start: StartPosition) -> Option<u64> {
    let last = handle.last_seq.load(Ordering::Acquire);
    match start {
        StartPosition::New => Some(last + 1),
        StartPosition::FromSeq(n) => Some(n.max(1)),
        StartPosition::All
        | StartPosition::Last(_)
        | StartPosition::FromTime(_)
        | StartPosition::LastPerTopic => None,
    }
}

/// Runs the replay of `handle` for `sub` (a replay subscription of `client`).
pub(crate) async fn run(
    handle: Arc<StreamHandle>,
    broker: Arc<Broker>,
    client: Arc<Client>,
    sub: Arc<Subscription>,
    start: StartPosition,
    fixed_start: Option<u64>,
) {
    handle.readers.fetch_add(1, Ordering::Relaxed);
    let _count = ReaderCount(&handle);
    let outbox: &Outbox = &sub.outbox;
    // For the newest message of each topic: those sequences, up to the newest one then.
    let mut only: Option<(std::collections::HashSet<u64>, u64)> = None;
    let mut next = match (fixed_start, start, &handle.per_topic) {
        (Some(n), _, _) => n,
        (None, StartPosition::LastPerTopic, Some(per_topic)) => {
            let (newest, last) = per_topic.lock().newest_each();
            let first = newest.first().copied().unwrap_or(last + 1);
            only = Some((newest.into_iter().collect(), last));
            first
        }
        (None, _, _) => match resolve(&handle, start).await {
            Some(n) => n,
            None => return end(&broker, &client, &sub, &handle, "could not be read"),
        },
    };
    let mut visible = handle.visible.subscribe();
    let mut pending: VecDeque<RecentMsg> = VecDeque::new();
    let mut reader: Option<Reader> = None;
    // What was read from disk and is not yet queued, and the reader's buffer, count against the
    // broker's memory budget; messages taken from `recent` are shared with it.
    let budget = broker.memory().clone();
    let mut charged = brokerd_core::Charge::new(&budget);
    let mut from_disk = 0usize;
    loop {
        if sub.is_dead() || outbox.is_closing() {
            return;
        }
        if handle.deleted.load(Ordering::Acquire) {
            return end(&broker, &client, &sub, &handle, "was deleted");
        }
        // Offer what is read, as long as the subscriber has room.
        while let Some(m) = pending.front() {
            if !sub.filter.matches(m.topic()) {
                pending.pop_front();
                continue;
            }
            match outbox.push_stored(&sub, m.seq, &m.body) {
                Stored::Queued => {
                    from_disk = from_disk.saturating_sub(m.body.len());
                    pending.pop_front();
                }
                Stored::QueuedLast => {
                    broker.end_subscription(&client, &sub);
                    return;
                }
                Stored::Full => break,
                Stored::Ended => return,
            }
        }
        if pending.is_empty() {
            from_disk = 0;
        }
        charged.set(from_disk + if reader.is_some() { READER_BYTES } else { 0 });
        if let Some(m) = pending.front() {
            let len = m.body.len();
            let room = std::future::poll_fn(|cx| outbox.poll_replay_room(cx, len));
            let _ = tokio::time::timeout(RECHECK, room).await;
            continue;
        }
        let last = handle.last_seq.load(Ordering::Acquire);
        if next > last {
            reader = None;
            let _ = tokio::time::timeout(RECHECK, visible.changed()).await;
            continue;
        }
        // Caught up with memory: read from there, and let go of the files.
        let from_memory = handle.recent.lock().from(next, BATCH_MSGS, BATCH_BYTES);
        let batch = match from_memory {
            Some(b) => {
                reader = None;
                b
            }
            None => {
                if budget.over() {
                    // The broker is over its memory budget: history waits, it is on disk.
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
                let h = handle.clone();
                let r = reader.take();
                let read =
                    tokio::task::spawn_blocking(move || read_disk(&h, r, next, BATCH_MSGS)).await;
                match read {
                    Ok((r, batch)) => {
                        reader = r;
                        from_disk += batch.iter().map(|m| m.body.len()).sum::<usize>();
                        batch
                    }
                    Err(_) => return end(&broker, &client, &sub, &handle, "could not be read"),
                }
            }
        };
        let mut batch = batch;
        let read_up_to = batch.last().map(|m| m.seq);
        if let Some((wanted, upto)) = &only {
            batch.retain(|m| m.seq > *upto || wanted.contains(&m.seq));
            if read_up_to.is_some_and(|s| s >= *upto) {
                only = None;
            }
        }
        keep_current(&handle, &mut batch);
        match read_up_to {
            Some(last) => next = last + 1,
            None => {
                // Nothing readable at `next` although the stream is longer: it was removed by
                // retention or a purge (read again from what is stored), or is still being
                // written. Wait a little rather than spin.
                next = next.max(handle.first_seq.load(Ordering::Acquire));
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
        pending.extend(batch);
    }
}

/// On a stream with `max_msgs_per_topic`, drops from `batch` the messages newer ones of their
/// topic have replaced.
pub(crate) fn keep_current(handle: &StreamHandle, batch: &mut Vec<RecentMsg>) {
    if let Some(p) = &handle.per_topic {
        let p = p.lock();
        batch.retain(|m| p.kept.contains(&m.seq));
    }
}

/// The first sequence for the positions that need the store.
async fn resolve(handle: &Arc<StreamHandle>, start: StartPosition) -> Option<u64> {
    let h = handle.clone();
    tokio::task::spawn_blocking(move || {
        let store = h.store.lock();
        let s = store.as_ref()?;
        Some(match start {
            StartPosition::All => s.first_seq(),
            StartPosition::Last(n) => s.first_seq().max((s.last_seq() + 1).saturating_sub(n)),
            StartPosition::FromTime(t) => s.seek_time(t).ok()?,
            StartPosition::New => s.last_seq() + 1,
            StartPosition::FromSeq(n) => n.max(1),
            // Only with a topic index, which `run` reads instead.
            StartPosition::LastPerTopic => s.first_seq(),
        })
    })
    .await
    .ok()
    .flatten()
}

/// Reads one batch (at most `max_msgs`) from disk at `next`, continuing with `reader` if it has one; returns the
/// reader to continue with (`None` once it reached the end of what was on disk).
pub(crate) fn read_disk(
    handle: &StreamHandle,
    reader: Option<Reader>,
    next: u64,
    max_msgs: usize,
) -> (Option<Reader>, Vec<RecentMsg>) {
    let mut reader = match reader {
        Some(r) => r,
        None => {
            let store = handle.store.lock();
            match store.as_ref().map(|s| s.read_from(next)) {
                Some(Ok(r)) => r,
                _ => return (None, Vec::new()),
            }
        }
    };
    let mut out = Vec::new();
    let mut bytes = 0;
    while out.len() < max_msgs && bytes < BATCH_BYTES {
        match reader.next() {
            Some(Ok(rec)) => {
                if rec.seq < next {
                    continue;
                }
                let body = encode_stored(&rec.topic, &rec.headers, &rec.payload);
                bytes += body.len();
                out.push(RecentMsg {
                    seq: rec.seq,
                    topic_len: rec.topic.len(),
                    body,
                });
            }
            Some(Err(e @ StoreError::Corrupt { .. })) => {
                warn!(stream = %handle.config.name, error = %e, "replay stepped over a corrupt record");
            }
            Some(Err(e)) => {
                warn!(stream = %handle.config.name, error = %e, "replay could not read a segment");
            }
            None => return (None, out),
        }
    }
    (Some(reader), out)
}

/// Ends the subscription because its stream went away, telling its owner.
pub(crate) fn end(
    broker: &Broker,
    client: &Client,
    sub: &Arc<Subscription>,
    handle: &StreamHandle,
    why: &str,
) {
    if sub.is_dead() {
        return;
    }
    broker.end_subscription(client, sub);
    let notice = Frame::Err(ErrorFrame {
        req_id: 0,
        code: ErrorCode::StoreFailed as u16,
        message: format!(
            "replay subscription {} ended: stream {} {why}",
            sub.sid, handle.config.name
        ),
    });
    client.outbox.push_frame(notice.to_bytes());
}
