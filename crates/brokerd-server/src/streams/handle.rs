//! One open stream as the broker sees it: its definition, the bounded queue of captured
//! messages its writer thread takes, the recent messages replays read from memory, and the
//! message ids it remembers for duplicate suppression.
//!
//! Connection tasks call [`StreamHandle::capture`] (and the checks before it) on their publish
//! path; the writer thread (`writer.rs`) drains the queue; replay tasks (`replay.rs`) read
//! [`StreamHandle::recent`] and the store. Nothing here does I/O but the store calls made under
//! `store`, which only the writer thread and short metadata reads take.

use brokerd_core::Outbox;
use brokerd_proto::streams::{StreamConfig, StreamInfo};
use brokerd_proto::{Filter, StoredParts};
use brokerd_store::Stream;
use bytes::Bytes;
use parking_lot::{Condvar, Mutex};
use std::collections::{BTreeSet, HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

/// Bytes of captured messages a stream's queue holds before publishers to it wait for its writer
/// (their readers pause, as for a full subscriber); at twice this a publish is refused with
/// `ERR stream-busy`.
pub(crate) const QUEUE_SOFT_BYTES: usize = 32 << 20;
/// Messages a stream's queue holds before publishers wait; refused at twice this.
pub(crate) const QUEUE_SOFT_MSGS: usize = 16_384;
/// Bytes of the newest messages a stream keeps in memory for replays that have caught up.
pub(crate) const RECENT_BYTES: usize = 8 << 20;
/// Messages kept in memory at most, whatever their size.
pub(crate) const RECENT_MSGS: usize = 65_536;
/// Message ids a stream remembers at most for duplicate suppression; the oldest go first.
pub(crate) const MAX_IDS: usize = 1_000_000;
/// The longest message id taken into account, in bytes; a longer one is not checked.
pub(crate) const MAX_ID_LEN: usize = 256;

/// A publish captured for a stream, waiting in its queue.
pub(crate) struct Capture {
    /// The body as the stream stores and delivers it: no reply-to.
    pub(crate) body: Bytes,
    pub(crate) topic_len: usize,
    pub(crate) header_len: usize,
    /// Unix nanoseconds when it was captured.
    pub(crate) timestamp: u64,
    pub(crate) msg_id: Option<Box<str>>,
    /// A duplicate: nothing to store, only an answer to send.
    pub(crate) duplicate: bool,
    /// Where to send `STORED` (or `ERR store-failed`), when the publisher asked for an ack.
    pub(crate) ack: Option<AckTo>,
}

impl Capture {
    /// A capture of the body `parts` came from.
    pub(crate) fn new(parts: &StoredParts<'_>, msg_id: Option<&str>, ack: Option<AckTo>) -> Self {
        Capture {
            body: parts.encode_stored(),
            topic_len: parts.topic.len(),
            header_len: parts.header_block.len(),
            timestamp: now_ns(),
            msg_id: msg_id.map(Into::into),
            duplicate: false,
            ack,
        }
    }

    /// A duplicate of an earlier publish with the id `msg_id`: only answered.
    pub(crate) fn duplicate(msg_id: &str, ack: AckTo) -> Self {
        Capture {
            body: Bytes::new(),
            topic_len: 0,
            header_len: 0,
            timestamp: 0,
            msg_id: Some(msg_id.into()),
            duplicate: true,
            ack: Some(ack),
        }
    }

    pub(crate) fn topic(&self) -> &[u8] {
        self.body.get(3..3 + self.topic_len).unwrap_or_default()
    }

    pub(crate) fn header_block(&self) -> &[u8] {
        let start = 3 + self.topic_len;
        self.body
            .get(start..start + self.header_len)
            .unwrap_or_default()
    }

    pub(crate) fn payload(&self) -> &[u8] {
        self.body
            .get(3 + self.topic_len + self.header_len..)
            .unwrap_or_default()
    }

    /// What it counts against the queue's byte limit.
    pub(crate) fn cost(&self) -> usize {
        self.body.len() + 64
    }
}

/// The publisher to answer once a capture is stored.
pub(crate) struct AckTo {
    pub(crate) outbox: Arc<Outbox>,
    pub(crate) req_id: u32,
    pub(crate) delivered: u32,
}

/// A stored message kept in memory: its sequence and the body a replay delivers.
#[derive(Clone)]
pub(crate) struct RecentMsg {
    pub(crate) seq: u64,
    pub(crate) body: Bytes,
    pub(crate) topic_len: usize,
}

impl RecentMsg {
    pub(crate) fn topic(&self) -> &str {
        self.body
            .get(3..3 + self.topic_len)
            .and_then(|t| std::str::from_utf8(t).ok())
            .unwrap_or_default()
    }
}

/// The newest stored messages, contiguous in sequence.
#[derive(Default)]
pub(crate) struct Recent {
    pub(crate) msgs: VecDeque<RecentMsg>,
    pub(crate) bytes: usize,
}

impl Recent {
    pub(crate) fn push(&mut self, m: RecentMsg) {
        if self.msgs.back().is_some_and(|b| b.seq + 1 != m.seq) {
            // Not contiguous (a purge moved on): start again.
            self.clear();
        }
        self.bytes += m.body.len();
        self.msgs.push_back(m);
        while self.bytes > RECENT_BYTES || self.msgs.len() > RECENT_MSGS {
            match self.msgs.pop_front() {
                Some(old) => self.bytes -= old.body.len(),
                None => break,
            }
        }
    }

    pub(crate) fn clear(&mut self) {
        self.msgs.clear();
        self.bytes = 0;
    }

    /// Up to `max_msgs` messages (and about `max_bytes`) from sequence `from`, or `None` when
    /// `from` is older than what is kept.
    pub(crate) fn from(
        &self,
        from: u64,
        max_msgs: usize,
        max_bytes: usize,
    ) -> Option<Vec<RecentMsg>> {
        let first = self.msgs.front()?.seq;
        if from < first {
            return None;
        }
        let skip = usize::try_from(from - first).ok()?;
        let mut out = Vec::new();
        let mut bytes = 0;
        for m in self.msgs.iter().skip(skip) {
            if out.len() >= max_msgs || (bytes > 0 && bytes + m.body.len() > max_bytes) {
                break;
            }
            bytes += m.body.len();
            out.push(m.clone());
        }
        Some(out)
    }
}

/// The newest messages of each topic, for a stream with `max_msgs_per_topic`: which stored
/// messages are still delivered. Bounded by the topics times the limit.
#[derive(Default)]
pub(crate) struct PerTopic {
    topics: HashMap<Box<str>, VecDeque<u64>>,
    pub(crate) kept: BTreeSet<u64>,
    /// The newest sequence added.
    pub(crate) last: u64,
}

impl PerTopic {
    /// Records message `seq` on `topic`, forgetting that topic's oldest beyond `max`.
    pub(crate) fn add(&mut self, topic: &str, seq: u64, max: u64) {
        let q = match self.topics.get_mut(topic) {
            Some(q) => q,
            None => self.topics.entry(topic.into()).or_default(),
        };
        q.push_back(seq);
        while q.len() as u64 > max {
            if let Some(old) = q.pop_front() {
                self.kept.remove(&old);
            }
        }
        self.kept.insert(seq);
        self.last = self.last.max(seq);
    }

    /// The newest message of each topic, in stream order, and the newest sequence added.
    pub(crate) fn newest_each(&self) -> (Vec<u64>, u64) {
        let mut v: Vec<u64> = self
            .topics
            .values()
            .filter_map(|q| q.back().copied())
            .collect();
        v.sort_unstable();
        (v, self.last)
    }

    pub(crate) fn topics(&self) -> usize {
        self.topics.len()
    }

    /// Forgets everything (a purge); sequences go on from `last`.
    pub(crate) fn clear(&mut self) {
        self.topics.clear();
        self.kept.clear();
    }
}

/// The captures waiting for the writer thread.
#[derive(Default)]
pub(crate) struct Pending {
    pub(crate) items: VecDeque<Capture>,
    /// Cost of the captures queued and of the batch being written.
    pub(crate) bytes: usize,
    pub(crate) msgs: usize,
    /// Set to stop the writer once the queue is empty.
    pub(crate) closed: bool,
}

/// Message ids seen within the duplicate window, in arrival order.
#[derive(Default)]
pub(crate) struct Ids {
    pub(crate) seen: HashMap<Box<str>, u64>,
    order: VecDeque<(u64, Box<str>)>,
}

impl Ids {
    /// Forgets ids older than `window` and beyond [`MAX_IDS`].
    pub(crate) fn expire(&mut self, now_ms: u64, window_ms: u64) {
        while let Some((at, _)) = self.order.front() {
            if now_ms.saturating_sub(*at) <= window_ms && self.order.len() <= MAX_IDS {
                break;
            }
            if let Some((_, id)) = self.order.pop_front() {
                self.seen.remove(&id);
            }
        }
    }

    /// Records `id` with `value`; `false` (and nothing changed) if it is already there.
    pub(crate) fn insert(&mut self, id: &str, value: u64, now_ms: u64, window_ms: u64) -> bool {
        self.expire(now_ms, window_ms);
        if self.seen.contains_key(id) {
            return false;
        }
        self.seen.insert(id.into(), value);
        self.order.push_back((now_ms, id.into()));
        true
    }
}

/// One open stream.
pub(crate) struct StreamHandle {
    pub(crate) config: StreamConfig,
    /// `config` or `api`.
    pub(crate) source: &'static str,
    pub(crate) filters: Vec<Filter>,
    pub(crate) dir: PathBuf,
    pub(crate) queue: Mutex<Pending>,
    /// Wakes the writer thread when the queue goes from empty to not empty, or closes.
    pub(crate) wake_writer: Condvar,
    /// Taken by the writer thread for each batch, and briefly by readers and admin requests.
    /// `None` once the stream is closed.
    pub(crate) store: Mutex<Option<Stream>>,
    pub(crate) recent: Mutex<Recent>,
    /// The newest sequence stored and visible to replays.
    pub(crate) last_seq: AtomicU64,
    /// The oldest sequence still stored (moved by retention and purges), for readers that must
    /// not take the store's lock on a runtime thread.
    pub(crate) first_seq: AtomicU64,
    /// Tells replays waiting at the end of the stream that `last_seq` moved.
    pub(crate) visible: tokio::sync::watch::Sender<u64>,
    /// Publishers waiting for the queue to fall under its soft limits.
    pub(crate) room: tokio::sync::Notify,
    /// Message ids claimed by publishes (checked on the publish path).
    pub(crate) ids: Mutex<Ids>,
    pub(crate) store_errors: AtomicU64,
    /// Messages stored and batches written since start-up.
    pub(crate) stored: AtomicU64,
    pub(crate) batches: AtomicU64,
    pub(crate) duplicates: AtomicU64,
    pub(crate) readers: AtomicU64,
    pub(crate) deleted: AtomicBool,
    pub(crate) recovered_truncated: u64,
    pub(crate) recovered_corrupt: u64,
    pub(crate) thread: Mutex<Option<std::thread::JoinHandle<()>>>,
    /// Under `fsync = interval`, the thread that syncs the active segment beside the writer.
    pub(crate) syncer: Mutex<Option<std::thread::JoinHandle<()>>>,
    /// With `max_msgs_per_topic`: which messages are still delivered.
    pub(crate) per_topic: Option<Mutex<PerTopic>>,
    /// Its durable consumers open in this process, by name.
    pub(crate) consumers: Mutex<HashMap<String, Arc<super::consumer::Consumer>>>,
}

/// Whether a stream takes a publish now.
pub(crate) enum Admit {
    /// Yes.
    Yes,
    /// Its queue is at twice its soft limits: refuse with `ERR stream-busy`.
    Busy,
}

impl StreamHandle {
    /// Whether one of its filters matches `topic`.
    pub(crate) fn captures(&self, topic: &str) -> bool {
        self.filters.iter().any(|f| f.matches(topic))
    }

    /// Whether its queue has room for one more publish.
    pub(crate) fn admit(&self) -> Admit {
        let q = self.queue.lock();
        if q.closed || q.bytes >= 2 * QUEUE_SOFT_BYTES || q.msgs >= 2 * QUEUE_SOFT_MSGS {
            Admit::Busy
        } else {
            Admit::Yes
        }
    }

    fn window_ms(&self) -> u64 {
        self.config.duplicate_window_s.saturating_mul(1000)
    }

    /// Claims message id `id` for a new publish: `false` if a publish within the window
    /// already claimed it (a duplicate).
    pub(crate) fn claim_id(&self, id: &str) -> bool {
        if self.window_ms() == 0 || id.is_empty() || id.len() > MAX_ID_LEN {
            return true;
        }
        self.ids
            .lock()
            .insert(id, 0, brokerd_core::clock::now_ms(), self.window_ms())
    }

    /// Gives a claimed id back (its publish was refused or could not be stored), so that a
    /// retry is stored.
    pub(crate) fn release_id(&self, id: &str) {
        self.ids.lock().seen.remove(id);
    }

    /// Queues a capture for the writer. Returns `Ok(true)` when the queue is now over its soft
    /// limits: the publisher should wait ([`StreamHandle::wait_room`]) before reading more.
    ///
    /// # Errors
    /// The stream is closed (deleted, or the broker is stopping): the capture comes back.
    pub(crate) fn capture(&self, c: Capture) -> Result<bool, Capture> {
        let mut q = self.queue.lock();
        if q.closed {
            return Err(c);
        }
        q.bytes += c.cost();
        q.msgs += 1;
        q.items.push_back(c);
        let wake = q.items.len() == 1;
        let over = q.bytes >= QUEUE_SOFT_BYTES || q.msgs >= QUEUE_SOFT_MSGS;
        drop(q);
        if wake {
            self.wake_writer.notify_one();
        }
        Ok(over)
    }

    fn over_soft(&self) -> bool {
        let q = self.queue.lock();
        !q.closed && (q.bytes >= QUEUE_SOFT_BYTES || q.msgs >= QUEUE_SOFT_MSGS)
    }

    /// Waits until the queue is under its soft limits (or the stream is closing), at most
    /// `bound`.
    pub(crate) async fn wait_room(&self, bound: Duration) {
        let wait = async {
            loop {
                let notified = self.room.notified();
                tokio::pin!(notified);
                notified.as_mut().enable();
                if !self.over_soft() {
                    return;
                }
                notified.await;
            }
        };
        let _ = tokio::time::timeout(bound, wait).await;
    }

    /// Its definition and state now.
    pub(crate) fn info(&self) -> StreamInfo {
        let mut info = StreamInfo {
            config: self.config.clone(),
            source: self.source.to_string(),
            store_errors: self.store_errors.load(Ordering::Relaxed),
            duplicates: self.duplicates.load(Ordering::Relaxed),
            stored: self.stored.load(Ordering::Relaxed),
            batches: self.batches.load(Ordering::Relaxed),
            readers: self.readers.load(Ordering::Relaxed),
            recovered_truncated_bytes: self.recovered_truncated,
            recovered_corrupt_records: self.recovered_corrupt,
            ..StreamInfo::default()
        };
        let mut consumers: Vec<_> = self.consumers.lock().values().map(|c| c.info()).collect();
        consumers.sort_by(|a, b| a.name.cmp(&b.name));
        info.consumers = consumers;
        if let Some(p) = &self.per_topic {
            let p = p.lock();
            info.topics = p.topics() as u64;
            info.kept = p.kept.len() as u64;
        }
        if let Some(s) = self.store.lock().as_ref() {
            info.first_seq = s.first_seq();
            info.last_seq = s.last_seq();
            info.msgs = s.len();
            info.bytes = s.bytes();
            info.segments = s.segment_count() as u64;
            info.first_ts = s.first_timestamp().unwrap_or(0);
            info.last_ts = s.last_timestamp();
        }
        info
    }
}

/// Unix time in nanoseconds.
pub(crate) fn now_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(seq: u64, len: usize) -> RecentMsg {
        RecentMsg {
            seq,
            body: Bytes::from(vec![0; len]),
            topic_len: 0,
        }
    }

    #[test]
    fn recent_keeps_the_newest_within_its_bytes_and_answers_by_sequence() {
        let mut r = Recent::default();
        for seq in 1..=100 {
            r.push(msg(seq, RECENT_BYTES / 10));
        }
        assert!(r.bytes <= RECENT_BYTES);
        let first = r.msgs.front().unwrap().seq;
        assert_eq!(first, 91);
        assert!(r.from(90, 10, usize::MAX).is_none());
        let got = r.from(95, 3, usize::MAX).unwrap();
        assert_eq!(
            got.iter().map(|m| m.seq).collect::<Vec<_>>(),
            vec![95, 96, 97]
        );
        assert!(r.from(101, 10, usize::MAX).unwrap().is_empty());
        // A gap (a purge) starts the window again.
        r.push(msg(500, 1));
        assert_eq!(r.msgs.len(), 1);
    }

    #[test]
    fn per_topic_keeps_the_newest_of_each_topic() {
        let mut p = PerTopic::default();
        for (seq, topic) in [(1, "a"), (2, "b"), (3, "a"), (4, "a"), (5, "c"), (6, "b")] {
            p.add(topic, seq, 2);
        }
        assert_eq!(
            p.kept.iter().copied().collect::<Vec<_>>(),
            vec![2, 3, 4, 5, 6]
        );
        assert_eq!(p.newest_each(), (vec![4, 5, 6], 6));
        p.add("a", 7, 1);
        assert!(!p.kept.contains(&3) && !p.kept.contains(&4));
    }

    #[test]
    fn ids_expire_by_age_and_are_refused_within_the_window() {
        let mut ids = Ids::default();
        assert!(ids.insert("a", 0, 1_000, 100));
        assert!(!ids.insert("a", 0, 1_050, 100));
        assert!(ids.insert("b", 0, 1_200, 100));
        // "a" is older than the window by now.
        assert!(ids.insert("a", 0, 1_250, 100));
    }
}
