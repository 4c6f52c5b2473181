//! Durable streams in the broker: which streams exist, what each captures, and the requests
//! that manage them (`$SYS.req.stream.<op>`, `docs/protocol.md` section 8).
//!
//! Layout:
//! - `handle`: one open stream (its capture queue, recent messages, message ids).
//! - `writer`: the thread that appends a stream's captures and answers their publishers.
//! - `replay`: the task that feeds one replay subscription.
//! - `consumer`: durable consumers: a kept position, acknowledgements, redelivery.
//!
//! The storage itself is `brokerd-store`. A stream lives in `<data_dir>/<name>/`: its segment
//! files and `stream.json`, its definition. Streams declared in the configuration file are
//! opened at start-up (the file's definition wins over a stored one); streams added at runtime
//! are found again through their `stream.json`.

mod consumer;
mod handle;
mod replay;
mod writer;

pub(crate) use consumer::{Consumer, Joiner, open as open_consumer};
pub(crate) use handle::{AckTo, Admit, Capture, StreamHandle};
pub(crate) use replay::{run as run_replay, start_now};

use arc_swap::ArcSwap;
use brokerd_proto::streams::{Fsync, StreamConfig, StreamInfo, valid_stream_name};
use brokerd_proto::{Filter, StoredParts, TopicLimits};
use brokerd_store::{FsyncPolicy, Options, Stream};
use handle::{Ids, Pending, PerTopic, Recent};
use parking_lot::Mutex;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;
use tracing::{info, warn};

/// The most streams one broker holds: each costs a thread, and every publish is matched against
/// every stream's filters.
pub(crate) const MAX_STREAMS: usize = 64;
/// The most filters one stream has.
pub(crate) const MAX_FILTERS: usize = 16;
/// The largest segment a stream may ask for.
pub(crate) const MAX_SEGMENT_BYTES: u64 = 1 << 30;
/// The definition file in a stream's directory.
const DEFINITION: &str = "stream.json";
/// The most records recovery reads back to find the message ids within the duplicate window.
const MAX_ID_SCAN: u64 = 1_000_000;

/// Why a stream could not be added, opened or changed; the text goes back to the asker.
#[derive(Debug, thiserror::Error)]
pub(crate) enum StreamError {
    #[error("{0}")]
    Invalid(String),
    #[error("no stream named '{0}'")]
    NotFound(String),
    #[error("stream {name}: {source}")]
    Store {
        name: String,
        source: brokerd_store::StoreError,
    },
    #[error("stream {name}: {what}: {source}")]
    Io {
        name: String,
        what: &'static str,
        source: std::io::Error,
    },
}

/// Every open stream.
pub(crate) struct Streams {
    data_dir: PathBuf,
    list: ArcSwap<Vec<Arc<StreamHandle>>>,
    /// Serializes add, delete and close: they read the list, do I/O, then replace it.
    admin: Mutex<()>,
    closed: AtomicBool,
}

impl Streams {
    /// Opens the streams declared in `declared` and those found in `data_dir`.
    ///
    /// # Errors
    /// A declared stream is invalid or cannot be opened. A stream found on disk that cannot be
    /// opened is logged and left out.
    pub(crate) fn open(data_dir: &Path, declared: &[StreamConfig]) -> Result<Streams, StreamError> {
        let streams = Streams {
            data_dir: data_dir.to_path_buf(),
            list: ArcSwap::from_pointee(Vec::new()),
            admin: Mutex::new(()),
            closed: AtomicBool::new(false),
        };
        for c in declared {
            streams.add(c.clone(), "config")?;
        }
        let Ok(entries) = std::fs::read_dir(data_dir) else {
            return Ok(streams);
        };
        let mut found: Vec<PathBuf> = entries
            .filter_map(Result::ok)
            .map(|e| e.path().join(DEFINITION))
            .filter(|p| p.is_file())
            .collect();
        found.sort();
        for path in found {
            let config = std::fs::read_to_string(&path)
                .map_err(|e| e.to_string())
                .and_then(|t| serde_json::from_str::<StreamConfig>(&t).map_err(|e| e.to_string()));
            match config {
                Ok(c) if streams.get(&c.name).is_some() => {}
                Ok(c) => {
                    if let Err(e) = streams.add(c, "api") {
                        warn!(path = %path.display(), error = %e, "cannot open a stored stream; leaving it out");
                    }
                }
                Err(e) => {
                    warn!(path = %path.display(), error = %e, "cannot read a stream definition; leaving it out");
                }
            }
        }
        Ok(streams)
    }

    /// The stream that captures `topic`, if any: one load when there are no streams.
    #[inline]
    pub(crate) fn capturing(&self, topic: &[u8]) -> Option<Arc<StreamHandle>> {
        let list = self.list.load();
        if list.is_empty() || topic.first() == Some(&b'$') {
            return None;
        }
        let topic = std::str::from_utf8(topic).ok()?;
        list.iter().find(|s| s.captures(topic)).cloned()
    }

    /// The stream named `name`.
    pub(crate) fn get(&self, name: &str) -> Option<Arc<StreamHandle>> {
        self.list
            .load()
            .iter()
            .find(|s| s.config.name == name)
            .cloned()
    }

    /// Every stream's definition and state.
    pub(crate) fn infos(&self) -> Vec<StreamInfo> {
        self.list.load().iter().map(|s| s.info()).collect()
    }

    /// Adds and opens a stream (`source`: `config` or `api`), storing its definition. Blocking:
    /// creates files and reads the stream's tail.
    ///
    /// # Errors
    /// An invalid definition, a name in use, filters that overlap another stream's, I/O.
    pub(crate) fn add(
        &self,
        mut config: StreamConfig,
        source: &'static str,
    ) -> Result<StreamInfo, StreamError> {
        let _admin = self.admin.lock();
        if self.closed.load(Ordering::Acquire) {
            return Err(StreamError::Invalid("the broker is shutting down".into()));
        }
        let filters = check(&mut config)?;
        let current = self.list.load();
        if current.iter().any(|s| s.config.name == config.name) {
            return Err(StreamError::Invalid(format!(
                "a stream named '{}' exists",
                config.name
            )));
        }
        if current.len() >= MAX_STREAMS {
            return Err(StreamError::Invalid(format!(
                "a broker holds at most {MAX_STREAMS} streams"
            )));
        }
        for other in current.iter() {
            for f in &filters {
                if let Some(g) = other
                    .filters
                    .iter()
                    .find(|g| overlap(f.as_str(), g.as_str()))
                {
                    return Err(StreamError::Invalid(format!(
                        "filter '{f}' overlaps '{g}' of stream '{}': a topic is captured by one stream at most",
                        other.config.name
                    )));
                }
            }
        }
        let dir = self.data_dir.join(&config.name);
        let stream_name = config.name.clone();
        let io = |what: &'static str| {
            let name = stream_name.clone();
            move |source| StreamError::Io { name, what, source }
        };
        std::fs::create_dir_all(&dir).map_err(io("create its directory"))?;
        write_definition(&dir, &config).map_err(io("write its definition"))?;
        let (store, rec) =
            Stream::open(&dir, options(&config)).map_err(|source| StreamError::Store {
                name: config.name.clone(),
                source,
            })?;
        if rec.truncated_bytes > 0 || !rec.corrupt_records.is_empty() {
            warn!(
                stream = %config.name,
                truncated_bytes = rec.truncated_bytes,
                corrupt_records = rec.corrupt_records.len(),
                "recovered the stream: a torn tail was cut off and corrupt records are skipped"
            );
        }
        for c in &rec.corrupt_records {
            warn!(stream = %config.name, segment = %c.segment.display(), offset = c.offset, len = c.len, "corrupt record skipped");
        }
        let (ids, claimed) = recent_ids(&store, &config);
        let per_topic =
            (config.max_msgs_per_topic > 0).then(|| Mutex::new(index_topics(&store, &config)));
        let last = store.last_seq();
        let first = store.first_seq();
        info!(
            stream = %config.name,
            source,
            msgs = store.len(),
            first_seq = store.first_seq(),
            last_seq = last,
            "stream open"
        );
        let handle = Arc::new(StreamHandle {
            filters,
            source,
            dir,
            queue: Mutex::new(Pending::default()),
            wake_writer: parking_lot::Condvar::new(),
            store: Mutex::new(Some(store)),
            recent: Mutex::new(Recent::default()),
            last_seq: AtomicU64::new(last),
            first_seq: AtomicU64::new(first),
            visible: tokio::sync::watch::Sender::new(last),
            room: tokio::sync::Notify::new(),
            ids: Mutex::new(claimed),
            store_errors: AtomicU64::new(0),
            stored: AtomicU64::new(0),
            batches: AtomicU64::new(0),
            duplicates: AtomicU64::new(0),
            readers: AtomicU64::new(0),
            deleted: AtomicBool::new(false),
            recovered_truncated: rec.truncated_bytes,
            recovered_corrupt: rec.corrupt_records.len() as u64,
            thread: Mutex::new(None),
            syncer: Mutex::new(None),
            consumers: Mutex::new(std::collections::HashMap::new()),
            per_topic,
            config,
        });
        let for_thread = handle.clone();
        let thread = std::thread::Builder::new()
            .name(format!("stream-{}", handle.config.name))
            .spawn(move || writer::run(for_thread, ids))
            .map_err(io("start its writer thread"))?;
        *handle.thread.lock() = Some(thread);
        if handle.config.fsync == Fsync::Interval {
            let for_syncer = handle.clone();
            let syncer = std::thread::Builder::new()
                .name(format!("sync-{}", handle.config.name))
                .spawn(move || writer::sync_every(for_syncer))
                .map_err(io("start its sync thread"))?;
            *handle.syncer.lock() = Some(syncer);
        }
        let mut next = (**current).clone();
        next.push(handle.clone());
        self.list.store(Arc::new(next));
        Ok(handle.info())
    }

    /// Deletes a stream added at runtime, and its files. Blocking.
    ///
    /// # Errors
    /// No such stream, one declared in the configuration file, or I/O.
    pub(crate) fn delete(&self, name: &str) -> Result<(), StreamError> {
        let _admin = self.admin.lock();
        let handle = self
            .get(name)
            .ok_or_else(|| StreamError::NotFound(name.to_string()))?;
        if handle.source == "config" {
            return Err(StreamError::Invalid(format!(
                "stream '{name}' is declared in the configuration file; remove it there"
            )));
        }
        let rest: Vec<Arc<StreamHandle>> = self
            .list
            .load()
            .iter()
            .filter(|s| !Arc::ptr_eq(s, &handle))
            .cloned()
            .collect();
        self.list.store(Arc::new(rest));
        handle.deleted.store(true, Ordering::Release);
        stop(&handle);
        handle.visible.send_replace(u64::MAX);
        std::fs::remove_dir_all(&handle.dir).map_err(|source| StreamError::Io {
            name: name.to_string(),
            what: "remove its directory",
            source,
        })?;
        info!(stream = %name, "stream deleted");
        Ok(())
    }

    /// Removes every message of a stream; sequences continue. Blocking.
    ///
    /// # Errors
    /// No such stream, or I/O.
    pub(crate) fn purge(&self, name: &str) -> Result<(StreamInfo, u64), StreamError> {
        let handle = self
            .get(name)
            .ok_or_else(|| StreamError::NotFound(name.to_string()))?;
        let purged = {
            let mut store = handle.store.lock();
            let s = store
                .as_mut()
                .ok_or_else(|| StreamError::NotFound(name.to_string()))?;
            let n = s.purge().map_err(|source| StreamError::Store {
                name: name.to_string(),
                source,
            })?;
            handle.first_seq.store(s.first_seq(), Ordering::Release);
            handle.recent.lock().clear();
            if let Some(p) = &handle.per_topic {
                p.lock().clear();
            }
            n
        };
        info!(stream = %name, purged, "stream purged");
        Ok((handle.info(), purged))
    }

    /// Stops every writer thread once what is queued is stored, and closes the stores.
    /// Blocking.
    pub(crate) fn close(&self) {
        let _admin = self.admin.lock();
        self.closed.store(true, Ordering::Release);
        for handle in self.list.load().iter() {
            stop(handle);
        }
    }
}

/// Answers one stream management request: `op` is what follows `$SYS.req.stream.`, `payload`
/// its JSON. Blocking (file I/O); returns the JSON answer.
pub(crate) fn request(streams: &Streams, op: &str, payload: &[u8]) -> Vec<u8> {
    use brokerd_proto::streams::{StreamAnswer, StreamName};
    let name = || -> Result<String, StreamError> {
        if payload.is_empty() {
            return Err(StreamError::Invalid("the request names no stream".into()));
        }
        serde_json::from_slice::<StreamName>(payload)
            .map(|n| n.name)
            .map_err(|e| StreamError::Invalid(format!("invalid request: {e}")))
    };
    let result: Result<StreamAnswer, StreamError> = (|| match op {
        "add" => {
            let config: StreamConfig = serde_json::from_slice(payload)
                .map_err(|e| StreamError::Invalid(format!("invalid stream definition: {e}")))?;
            let info = streams.add(config, "api")?;
            Ok(StreamAnswer {
                stream: Some(info),
                ..StreamAnswer::default()
            })
        }
        "list" => Ok(StreamAnswer {
            streams: streams.infos(),
            ..StreamAnswer::default()
        }),
        "info" => {
            let name = name()?;
            let s = streams.get(&name).ok_or(StreamError::NotFound(name))?;
            Ok(StreamAnswer {
                stream: Some(s.info()),
                ..StreamAnswer::default()
            })
        }
        "purge" => {
            let (info, purged) = streams.purge(&name()?)?;
            Ok(StreamAnswer {
                stream: Some(info),
                purged,
                ..StreamAnswer::default()
            })
        }
        "delete" => {
            streams.delete(&name()?)?;
            Ok(StreamAnswer {
                deleted: true,
                ..StreamAnswer::default()
            })
        }
        other => Err(StreamError::Invalid(format!(
            "unknown stream request '{}': add, list, info, purge or delete",
            other.escape_debug()
        ))),
    })();
    let answer = result.unwrap_or_else(|e| StreamAnswer {
        error: Some(e.to_string()),
        ..StreamAnswer::default()
    });
    serde_json::to_vec(&answer).unwrap_or_default()
}

/// Closes a stream's queue and waits for its writer to store what it holds and exit.
fn stop(handle: &StreamHandle) {
    handle.queue.lock().closed = true;
    handle.wake_writer.notify_all();
    handle.room.notify_waiters();
    if let Some(t) = handle.thread.lock().take() {
        let _ = t.join();
    }
    if let Some(t) = handle.syncer.lock().take() {
        t.thread().unpark();
        let _ = t.join();
    }
}

/// Checks the streams a configuration declares: each valid, names unique, no two capturing
/// one topic.
///
/// # Errors
/// The first problem, naming the stream.
pub(crate) fn check_declared(declared: &[StreamConfig]) -> Result<(), String> {
    if declared.len() > MAX_STREAMS {
        return Err(format!(
            "{} streams are declared; a broker holds at most {MAX_STREAMS}",
            declared.len()
        ));
    }
    let mut seen: Vec<(String, Vec<Filter>)> = Vec::new();
    for c in declared {
        let mut c = c.clone();
        let filters = check(&mut c).map_err(|e| format!("stream '{}': {e}", c.name))?;
        for (name, other) in &seen {
            if *name == c.name {
                return Err(format!("two streams are named '{name}'"));
            }
            for f in &filters {
                if let Some(g) = other.iter().find(|g| overlap(f.as_str(), g.as_str())) {
                    return Err(format!(
                        "filter '{f}' of stream '{}' overlaps '{g}' of stream '{name}'",
                        c.name
                    ));
                }
            }
        }
        seen.push((c.name.clone(), filters));
    }
    Ok(())
}

/// Checks a definition and parses its filters.
fn check(config: &mut StreamConfig) -> Result<Vec<Filter>, StreamError> {
    let bad = |m: String| Err(StreamError::Invalid(m));
    if !valid_stream_name(&config.name) {
        return bad(format!(
            "invalid stream name '{}': 1 to 64 ASCII letters, digits, '-' or '_'",
            config.name.escape_debug()
        ));
    }
    if config.filters.is_empty() || config.filters.len() > MAX_FILTERS {
        return bad(format!("a stream has 1 to {MAX_FILTERS} filters"));
    }
    if config.fsync_interval_ms == 0 && config.fsync == Fsync::Interval {
        return bad("fsync_interval_ms must be at least 1".into());
    }
    // Retention drops whole segments: past a gigabyte `max_bytes` and `max_age_s` could no
    // longer free anything until a segment of that size had filled.
    if !(4096..=MAX_SEGMENT_BYTES).contains(&config.segment_bytes) {
        return bad(format!(
            "segment_bytes must be between 4096 and {MAX_SEGMENT_BYTES} (1 GiB)"
        ));
    }
    let mut out = Vec::new();
    for f in &config.filters {
        let filter = Filter::with_limits(
            f,
            &TopicLimits {
                max_len: 256,
                max_tokens: 16,
            },
        )
        .map_err(|e| StreamError::Invalid(format!("invalid filter '{}': {e}", f.escape_debug())))?;
        if f.starts_with('$') {
            return bad(format!("filter '{f}': reserved topics are not captured"));
        }
        if let Some(g) = out.iter().find(|g: &&Filter| overlap(g.as_str(), f)) {
            return bad(format!("filters '{g}' and '{f}' overlap"));
        }
        out.push(filter);
    }
    Ok(out)
}

/// Whether some topic matches both filters.
pub(crate) fn overlap(a: &str, b: &str) -> bool {
    let mut x = a.split('.');
    let mut y = b.split('.');
    loop {
        match (x.next(), y.next()) {
            (Some(">"), Some(_)) | (Some(_), Some(">")) => return true,
            (Some(p), Some(q)) if p == "*" || q == "*" || p == q => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// The store's options for a definition.
fn options(c: &StreamConfig) -> Options {
    let some = |n: u64| (n > 0).then_some(n);
    Options {
        segment_bytes: c.segment_bytes,
        max_msgs: some(c.max_msgs),
        max_bytes: some(c.max_bytes),
        max_age: some(c.max_age_s).map(Duration::from_secs),
        fsync: match c.fsync {
            Fsync::Always => FsyncPolicy::Always,
            Fsync::Interval => FsyncPolicy::Interval(Duration::from_millis(c.fsync_interval_ms)),
            Fsync::Never => FsyncPolicy::Never,
        },
        ..Options::default()
    }
}

/// Writes `stream.json` so that a crash leaves the old definition or the new one, never half.
/// A definition already stored as is is not written again, so that a stream on a full disk
/// still opens.
fn write_definition(dir: &Path, config: &StreamConfig) -> std::io::Result<()> {
    let tmp = dir.join(format!("{DEFINITION}.tmp"));
    let text = serde_json::to_string_pretty(config).map_err(std::io::Error::other)?;
    if std::fs::read(dir.join(DEFINITION)).is_ok_and(|old| old == text.as_bytes()) {
        return Ok(());
    }
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(text.as_bytes())?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, dir.join(DEFINITION))?;
    std::fs::File::open(dir)?.sync_all()
}

/// The message ids stored within the duplicate window, read back from the stream's tail (at
/// most [`MAX_ID_SCAN`] records): the writer's map (id to sequence) and the publish path's.
fn recent_ids(store: &Stream, config: &StreamConfig) -> (Ids, Ids) {
    let mut ids = Ids::default();
    let mut claimed = Ids::default();
    if config.duplicate_window_s == 0 || store.is_empty() {
        return (ids, claimed);
    }
    let window_ns = config.duplicate_window_s.saturating_mul(1_000_000_000);
    let since = handle::now_ns().saturating_sub(window_ns);
    let from = store
        .seek_time(since)
        .unwrap_or(store.first_seq())
        .max((store.last_seq() + 1).saturating_sub(MAX_ID_SCAN));
    let Ok(reader) = store.read_from(from) else {
        return (ids, claimed);
    };
    let now_ms = brokerd_core::clock::now_ms();
    let window_ms = config.duplicate_window_s.saturating_mul(1000);
    for rec in reader.flatten() {
        if let Some(id) =
            brokerd_proto::header_in_block(&rec.headers, brokerd_proto::streams::MSG_ID_HEADER)
        {
            // Aged from now: a restart gives every id found a whole window again, erring on
            // the side of suppressing a retry.
            ids.insert(id, rec.seq, now_ms, window_ms);
            claimed.insert(id, 0, now_ms, window_ms);
        }
    }
    (ids, claimed)
}

/// Reads the whole stream once to learn the newest messages of each topic (a stream with
/// `max_msgs_per_topic`; such a stream holds little more than its topics times the limit).
fn index_topics(store: &Stream, config: &StreamConfig) -> PerTopic {
    let mut p = PerTopic::default();
    if let Ok(reader) = store.read_from(store.first_seq()) {
        for rec in reader.flatten() {
            p.add(
                rec.topic_str().unwrap_or_default(),
                rec.seq,
                config.max_msgs_per_topic,
            );
        }
    }
    p
}

/// The parts of a publish a stream stores, and its message id.
pub(crate) fn parts(raw: &[u8]) -> Option<(StoredParts<'_>, Option<&str>)> {
    let parts = StoredParts::of(raw).ok()?;
    let id = parts.header(brokerd_proto::streams::MSG_ID_HEADER);
    Some((parts, id))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overlap_is_whether_one_topic_matches_both() {
        for (a, b, want) in [
            ("order.>", "order.created", true),
            ("order.*", "order.created", true),
            ("order.*", "order.a.b", false),
            ("order.>", "payment.>", false),
            ("*.created", "order.*", true),
            ("a", "a.>", false),
            (">", "x.y.z", true),
            ("a.b", "a.b", true),
            ("a.b", "a.c", false),
        ] {
            assert_eq!(overlap(a, b), want, "{a} {b}");
            assert_eq!(overlap(b, a), want, "{b} {a}");
        }
    }

    #[test]
    fn definitions_are_checked() {
        let mut c = StreamConfig {
            name: "ORDERS".into(),
            filters: vec!["order.>".into()],
            ..StreamConfig::default()
        };
        assert!(check(&mut c).is_ok());
        for bad in [
            StreamConfig {
                name: "a/b".into(),
                ..c.clone()
            },
            StreamConfig {
                filters: vec![],
                ..c.clone()
            },
            StreamConfig {
                filters: vec!["a..b".into()],
                ..c.clone()
            },
            StreamConfig {
                filters: vec!["$SYS.>".into()],
                ..c.clone()
            },
            StreamConfig {
                filters: vec!["a.>".into(), "a.b".into()],
                ..c.clone()
            },
            StreamConfig {
                segment_bytes: 10,
                ..c.clone()
            },
            StreamConfig {
                segment_bytes: MAX_SEGMENT_BYTES + 1,
                ..c.clone()
            },
        ] {
            let mut bad = bad;
            assert!(check(&mut bad).is_err(), "{bad:?}");
        }
    }
}
