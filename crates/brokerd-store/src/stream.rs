//! One stream's log: opening and recovering its directory, appending with the configured
//! durability, rolling segments, retention, purge, and the positions readers start from.
//!
//! A [`Stream`] is synchronous and owned by one thread (the broker's storage thread); it
//! takes no locks. It does not route messages, assign topics to streams or know about
//! consumers: those belong to the broker.

use std::collections::VecDeque;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::error::{Result, StoreError};
use crate::format::{self, Append, INDEX_ENTRY_BYTES, IndexEntry};
use crate::reader::Reader;
use crate::segment::{self, SegmentFile, Step};

/// When appended records are forced to disk with fdatasync.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FsyncPolicy {
    /// [`Stream::append`] and [`Stream::append_batch`] return only after the records are on
    /// disk. A batch costs one fdatasync however many records it holds (group commit).
    Always,
    /// The caller calls [`Stream::sync`] on a timer of this period; [`Stream::needs_sync`]
    /// says when one is due. A power failure loses at most the records appended since the
    /// last sync. Segments are also synced when they are rolled.
    Interval(Duration),
    /// The operating system writes pages back when it chooses. A process crash loses
    /// nothing (the data is in the page cache); a power failure may lose any unsynced tail.
    Never,
}

/// How a stream is stored and how much of it is kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Options {
    /// A segment is rolled when an append would take it past this many bytes. A segment
    /// holds at least one append, so a record or batch larger than this gets a segment of
    /// its own. Default 64 MiB.
    pub segment_bytes: u64,
    /// Every this many records of a segment get an index entry. Default 256.
    pub index_every: u32,
    /// Keep about this many records at most (whole oldest segments are deleted).
    pub max_msgs: Option<u64>,
    /// Keep about this many bytes of segment files at most.
    pub max_bytes: Option<u64>,
    /// Delete segments whose newest record is older than this, in [`Stream::enforce_retention`].
    pub max_age: Option<Duration>,
    /// When appends reach the disk. Default: every 100 ms.
    pub fsync: FsyncPolicy,
    /// Check every record's CRC of every segment when opening, instead of only the last
    /// segment's (and those whose index is missing or stale). Default false.
    pub verify_on_open: bool,
    /// A hard cap on the bytes of all segment files together. An append that would pass it
    /// fails with [`StoreError::DiskFull`] exactly as a full filesystem makes it fail: part
    /// of the write lands and is then removed. Meant for tests of the full-disk path and as a
    /// quota; retention (`max_bytes`) is the way to keep a stream within a size. Default none.
    pub max_disk_bytes: Option<u64>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            segment_bytes: 64 << 20,
            index_every: 256,
            max_msgs: None,
            max_bytes: None,
            max_age: None,
            fsync: FsyncPolicy::Interval(Duration::from_millis(100)),
            verify_on_open: false,
            max_disk_bytes: None,
        }
    }
}

/// Damaged bytes found in a segment: they hold no valid record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Corruption {
    /// The segment file.
    pub segment: PathBuf,
    /// Where the damage starts.
    pub offset: u64,
    /// How many bytes are unusable.
    pub len: u64,
}

/// What [`Stream::open`] found and repaired.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Recovery {
    /// Segment files in the stream.
    pub segments: usize,
    /// Valid records in the stream.
    pub records: u64,
    /// Bytes cut from the end of the last segment: a record torn by a crash (too short, or
    /// with a bad CRC, and no valid record after it).
    pub truncated_bytes: u64,
    /// Damaged ranges followed by valid records (and, in segments other than the last,
    /// damage running to the end of the file, which is reported but not cut). Readers skip
    /// them; the sequences they held are missing.
    pub corrupt_records: Vec<Corruption>,
    /// Index files that were missing, damaged or stale and were written anew.
    pub rebuilt_indexes: Vec<PathBuf>,
}

/// One segment as the stream keeps it in memory: a few numbers, not its index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SegmentMeta {
    /// The sequence in the file name: no record in it is lower.
    pub base: u64,
    /// The first valid record's sequence and timestamp.
    pub first: Option<(u64, u64)>,
    /// The last valid record's sequence and timestamp.
    pub last: Option<(u64, u64)>,
    /// Valid records.
    pub count: u64,
    /// The log file's length.
    pub bytes: u64,
}

#[derive(Debug)]
struct Active {
    meta: SegmentMeta,
    log: File,
    /// `None` once an index write failed: the index is rebuilt on the next open.
    idx: Option<File>,
}

/// An append-only log of one stream's records, in segment files in one directory.
///
/// Only one `Stream` may have a directory open at a time; nothing enforces it. Dropping a
/// `Stream` closes its files without a final fdatasync: call [`Stream::close`] for that.
#[derive(Debug)]
pub struct Stream {
    dir: PathBuf,
    opts: Options,
    sealed: VecDeque<SegmentMeta>,
    active: Active,
    next_seq: u64,
    last_ts: u64,
    count: u64,
    bytes: u64,
    dirty: bool,
    last_sync: Instant,
    poisoned: bool,
    buf: Vec<u8>,
    /// Appends so far, to tell whether a sync made elsewhere ([`Stream::begin_sync`]) covered
    /// the latest one.
    appends: u64,
}

/// An fdatasync of the active segment made away from the stream, so that appends go on while
/// it runs: from [`Stream::begin_sync`], run with [`PendingSync::run`] (blocking, holding
/// nothing), then given back to [`Stream::finish_sync`].
#[derive(Debug)]
pub struct PendingSync {
    file: File,
    base: u64,
    appends: u64,
    path: PathBuf,
}

impl PendingSync {
    /// Forces what was written to the segment to disk.
    ///
    /// # Errors
    /// The fdatasync's error.
    pub fn run(&self) -> io::Result<()> {
        self.file.sync_data()
    }
}

impl Stream {
    /// Opens the stream stored in `dir`, creating the directory and a first segment if
    /// needed, and recovers it: the last segment is scanned whole and a torn record at its
    /// end is cut off; other segments are trusted through their index (see
    /// [`Options::verify_on_open`]), and scanned whole if the index is missing or stale.
    ///
    /// # Errors
    /// I/O errors reading the directory or the segments, or [`StoreError::InvalidOptions`].
    pub fn open(dir: impl AsRef<Path>, opts: Options) -> Result<(Stream, Recovery)> {
        if opts.segment_bytes == 0 || opts.index_every == 0 {
            return Err(StoreError::InvalidOptions(
                "segment_bytes and index_every must be at least 1",
            ));
        }
        let dir = dir.as_ref().to_path_buf();
        fs::create_dir_all(&dir).map_err(|e| StoreError::io("create", &dir, e))?;
        let mut bases = Vec::new();
        for entry in fs::read_dir(&dir).map_err(|e| StoreError::io("list", &dir, e))? {
            let entry = entry.map_err(|e| StoreError::io("list", &dir, e))?;
            if let Some(base) = entry
                .file_name()
                .to_str()
                .and_then(format::parse_segment_name)
            {
                bases.push(base);
            }
        }
        bases.sort_unstable();
        let mut rec = Recovery::default();
        let mut sealed = VecDeque::new();
        let active = match bases.split_last() {
            None => create_segment(&dir, 1, opts.fsync != FsyncPolicy::Never)?,
            Some((&last, older)) => {
                for &base in older {
                    sealed.push_back(open_sealed(&dir, base, &opts, &mut rec)?);
                }
                open_last(&dir, last, &opts, &mut rec)?
            }
        };
        let all = || sealed.iter().chain(std::iter::once(&active.meta));
        let next_seq = all()
            .filter_map(|m| m.last.map(|(s, _)| s + 1))
            .fold(active.meta.base, u64::max);
        let last_ts = all()
            .filter_map(|m| m.last.map(|(_, t)| t))
            .max()
            .unwrap_or(0);
        let count = all().map(|m| m.count).sum();
        let bytes = all().map(|m| m.bytes).sum();
        rec.segments = sealed.len() + 1;
        rec.records = count;
        let stream = Stream {
            dir,
            opts,
            sealed,
            active,
            next_seq,
            last_ts,
            count,
            bytes,
            dirty: false,
            last_sync: Instant::now(),
            poisoned: false,
            buf: Vec::new(),
            appends: 0,
        };
        Ok((stream, rec))
    }

    /// Appends one record and returns its sequence. `timestamp` is unix nanoseconds; a value
    /// below the previous record's is raised to it, so timestamps never decrease along the
    /// stream (a clock stepping back does not break [`Stream::seek_time`]).
    ///
    /// # Errors
    /// [`StoreError::RecordTooLarge`], [`StoreError::DiskFull`], other I/O errors, or
    /// [`StoreError::Poisoned`]. On any error nothing of this record remains in the log.
    pub fn append(
        &mut self,
        topic: &str,
        headers: &[u8],
        payload: &[u8],
        timestamp: u64,
    ) -> Result<u64> {
        let range = self.append_batch(&[Append {
            topic,
            headers,
            payload,
            timestamp,
        }])?;
        Ok(range.start)
    }

    /// Appends several records with one write (and, under [`FsyncPolicy::Always`], one
    /// fdatasync) and returns their sequences. A batch is never split across segments.
    ///
    /// # Errors
    /// As [`Stream::append`]; the batch is stored whole or not at all.
    pub fn append_batch(&mut self, records: &[Append<'_>]) -> Result<Range<u64>> {
        if self.poisoned {
            return Err(StoreError::Poisoned);
        }
        if records.is_empty() {
            return Ok(self.next_seq..self.next_seq);
        }
        let mut total = 0u64;
        for r in records {
            let n = r.encoded_len().ok_or(StoreError::RecordTooLarge {
                len: r.topic.len() + r.headers.len() + r.payload.len(),
            })?;
            total += n as u64;
        }
        if self.active.meta.bytes > 0 && self.active.meta.bytes + total > self.opts.segment_bytes {
            self.roll()?;
        }

        let mut buf = std::mem::take(&mut self.buf);
        buf.clear();
        let mut entries = Vec::new();
        let every = u64::from(self.opts.index_every);
        let (first_seq, start) = (self.next_seq, self.active.meta.bytes);
        let mut last_ts = self.last_ts;
        let mut first = None;
        for (i, r) in records.iter().enumerate() {
            let seq = first_seq + i as u64;
            let ts = r.timestamp.max(last_ts);
            last_ts = ts;
            let ordinal = self.active.meta.count + i as u64;
            if ordinal.is_multiple_of(every) {
                entries.push(IndexEntry {
                    seq,
                    timestamp: ts,
                    offset: start + buf.len() as u64,
                    // A segment holds far fewer than 2^32 records: each is at least 31 bytes
                    // and an append that passes segment_bytes rolls first.
                    ordinal: ordinal as u32,
                });
            }
            first.get_or_insert((seq, ts));
            format::encode_record(
                &mut buf,
                seq,
                &Append {
                    timestamp: ts,
                    ..*r
                },
            );
        }
        let written = self.write_log(&buf);
        let len = buf.len() as u64;
        self.buf = buf;
        written?;
        if self.opts.fsync == FsyncPolicy::Always {
            if let Err(e) = self.active.log.sync_data() {
                // The page cache's state after a failed fdatasync is unknown; only a reopen,
                // which re-reads the file, can say what is stored.
                self.poisoned = true;
                let _ = self.active.log.set_len(start);
                return Err(StoreError::io(
                    "fdatasync",
                    self.log_path(self.active.meta.base),
                    e,
                ));
            }
            self.last_sync = Instant::now();
        } else {
            self.dirty = true;
        }
        self.appends += 1;

        let n = records.len() as u64;
        let meta = &mut self.active.meta;
        meta.first = meta.first.or(first);
        meta.last = Some((first_seq + n - 1, last_ts));
        meta.count += n;
        meta.bytes += len;
        self.count += n;
        self.bytes += len;
        self.next_seq += n;
        self.last_ts = last_ts;
        self.write_index(&entries);
        // The records are stored; a segment that cannot be deleted now is tried again after
        // the next append or by enforce_retention, which reports the error.
        let _ = self.trim_to_limits();
        Ok(first_seq..self.next_seq)
    }

    /// Forces the active segment's appended records to disk (fdatasync). Cheap when nothing
    /// was appended since the last sync.
    ///
    /// # Errors
    /// The fdatasync's error; the stream is then poisoned (see [`StoreError::Poisoned`]).
    pub fn sync(&mut self) -> Result<()> {
        if self.poisoned {
            return Err(StoreError::Poisoned);
        }
        if self.dirty {
            self.sync_active()?;
        }
        self.last_sync = Instant::now();
        Ok(())
    }

    /// fdatasyncs the active segment; a failure poisons the stream (what the disk holds is then
    /// unknown until it is reopened).
    fn sync_active(&mut self) -> Result<()> {
        if let Err(e) = self.active.log.sync_data() {
            self.poisoned = true;
            return Err(StoreError::io(
                "fdatasync",
                self.log_path(self.active.meta.base),
                e,
            ));
        }
        self.dirty = false;
        Ok(())
    }

    /// Starts a sync of the active segment that runs without the stream (`None` when nothing
    /// was appended since the last sync): appends may go on while [`PendingSync::run`] runs on
    /// another thread; give the result to [`Stream::finish_sync`].
    ///
    /// # Errors
    /// [`StoreError::Poisoned`], or the segment's file cannot be duplicated.
    pub fn begin_sync(&mut self) -> Result<Option<PendingSync>> {
        if self.poisoned {
            return Err(StoreError::Poisoned);
        }
        if !self.dirty {
            self.last_sync = Instant::now();
            return Ok(None);
        }
        let path = self.log_path(self.active.meta.base);
        let file = self
            .active
            .log
            .try_clone()
            .map_err(|e| StoreError::io("duplicate", &path, e))?;
        Ok(Some(PendingSync {
            file,
            base: self.active.meta.base,
            appends: self.appends,
            path,
        }))
    }

    /// Takes the result of a sync started by [`Stream::begin_sync`]: the stream is clean if
    /// nothing was appended since it began.
    ///
    /// # Errors
    /// The fdatasync's error; the stream is then poisoned, as by a failed [`Stream::sync`].
    pub fn finish_sync(&mut self, sync: PendingSync, result: io::Result<()>) -> Result<()> {
        if let Err(e) = result {
            self.poisoned = true;
            return Err(StoreError::io("fdatasync", sync.path, e));
        }
        if sync.base == self.active.meta.base && sync.appends == self.appends {
            self.dirty = false;
        }
        self.last_sync = Instant::now();
        Ok(())
    }

    /// Whether a sync is due under [`FsyncPolicy::Interval`]: records were appended since the
    /// last sync and the interval has passed since it. Always false for the other policies.
    pub fn needs_sync(&self) -> bool {
        match self.opts.fsync {
            FsyncPolicy::Interval(period) => self.dirty && self.last_sync.elapsed() >= period,
            FsyncPolicy::Always | FsyncPolicy::Never => false,
        }
    }

    /// When the active segment was last synced (or the stream opened).
    pub fn last_sync(&self) -> Instant {
        self.last_sync
    }

    /// Whether records were appended since the last sync.
    pub fn is_dirty(&self) -> bool {
        self.dirty
    }

    /// Syncs (unless the policy is [`FsyncPolicy::Never`]) and closes the stream.
    ///
    /// # Errors
    /// As [`Stream::sync`].
    pub fn close(mut self) -> Result<()> {
        if self.opts.fsync != FsyncPolicy::Never {
            self.sync()?;
        }
        Ok(())
    }

    /// A reader of the records from sequence `seq` on (from the first record if `seq` is
    /// older). It sees the segments that exist now, reading each to its end when it gets
    /// there; to follow later appends, make a new reader from the next sequence.
    ///
    /// # Errors
    /// None today; the signature leaves room for readers that open files eagerly.
    pub fn read_from(&self, seq: u64) -> Result<Reader> {
        let metas: Vec<&SegmentMeta> = self.segments().collect();
        // Bases grow along the stream, so the segment holding `seq` is the last one whose
        // base is not above it.
        let i = metas.partition_point(|m| m.base <= seq).saturating_sub(1);
        let (offset, min_seq) = self.index_floor(metas[i], |e| e.seq <= seq);
        let segs = metas[i..]
            .iter()
            .map(|m| (self.log_path(m.base), m.base))
            .collect();
        Ok(Reader::new(segs, offset, min_seq, seq))
    }

    /// The sequence of the first record whose timestamp is at or after `ts` (unix
    /// nanoseconds), or [`Stream::next_seq`] if every record is older.
    ///
    /// # Errors
    /// I/O errors reading the segment that holds the answer.
    pub fn seek_time(&self, ts: u64) -> Result<u64> {
        let Some(m) = self
            .segments()
            .find(|m| m.last.is_some_and(|(_, t)| t >= ts))
        else {
            return Ok(self.next_seq);
        };
        let path = self.log_path(m.base);
        let (mut pos, mut min_seq) = self.index_floor(m, |e| e.timestamp < ts);
        let mut file = SegmentFile::open(&path).map_err(|e| StoreError::io("open", &path, e))?;
        loop {
            match file
                .step(pos, min_seq)
                .map_err(|e| StoreError::io("read", &path, e))?
            {
                Step::Record {
                    len,
                    seq,
                    timestamp,
                } => {
                    if timestamp >= ts {
                        return Ok(seq);
                    }
                    pos += len as u64;
                    min_seq = seq + 1;
                }
                Step::Damaged { len, resumes: true } => pos += len,
                // The segment's last record is known to qualify; damage after the index
                // entry can only have hidden earlier candidates.
                Step::Damaged { .. } | Step::End => {
                    return Ok(m.last.map_or(self.next_seq, |(s, _)| s));
                }
            }
        }
    }

    /// The sequence of the oldest stored record, or [`Stream::next_seq`] if there is none.
    pub fn first_seq(&self) -> u64 {
        self.segments()
            .find_map(|m| m.first.map(|(s, _)| s))
            .unwrap_or(self.next_seq)
    }

    /// The timestamp of the oldest stored record (unix nanoseconds), if any.
    pub fn first_timestamp(&self) -> Option<u64> {
        self.segments().find_map(|m| m.first.map(|(_, t)| t))
    }

    /// The timestamp of the newest record ever appended (0 before the first append).
    pub fn last_timestamp(&self) -> u64 {
        self.last_ts
    }

    /// Whether an earlier write failure left the stream needing to be reopened.
    pub fn is_poisoned(&self) -> bool {
        self.poisoned
    }

    /// The sequence of the newest record ever appended (0 before the first append). After a
    /// purge or retention it may no longer be stored.
    pub fn last_seq(&self) -> u64 {
        self.next_seq - 1
    }

    /// The sequence the next append will get.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// The number of stored, valid records.
    pub fn len(&self) -> u64 {
        self.count
    }

    /// Whether no record is stored.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// The bytes of all segment files together.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// The number of segment files.
    pub fn segment_count(&self) -> usize {
        self.sealed.len() + 1
    }

    /// The directory the stream lives in.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The options the stream was opened with.
    pub fn options(&self) -> &Options {
        &self.opts
    }

    /// Deletes every record. Sequences continue: the next append gets [`Stream::next_seq`].
    /// Returns how many records were deleted.
    ///
    /// # Errors
    /// I/O errors deleting or creating segment files. If the new segment cannot be created
    /// the stream is poisoned.
    pub fn purge(&mut self) -> Result<u64> {
        let purged = self.count;
        while !self.sealed.is_empty() {
            self.delete_oldest()?;
        }
        let base = self.active.meta.base;
        self.remove_segment_files(base)?;
        self.count = 0;
        self.bytes = 0;
        self.dirty = false;
        match create_segment(
            &self.dir,
            self.next_seq,
            self.opts.fsync != FsyncPolicy::Never,
        ) {
            Ok(a) => self.active = a,
            Err(e) => {
                self.poisoned = true;
                return Err(e);
            }
        }
        Ok(purged)
    }

    /// Applies every retention limit, age included, with `now` in unix nanoseconds; returns
    /// how many segments were deleted. Count and byte limits are also applied after every
    /// append; age is applied only here, which the broker calls periodically.
    ///
    /// Retention deletes whole segments, oldest first, and never the active one: a segment
    /// goes when the stream stays within the count and byte limits without it, or when its
    /// newest record is older than `max_age`. The stream therefore keeps up to one segment
    /// more than the limits say.
    ///
    /// # Errors
    /// I/O errors deleting a segment file.
    pub fn enforce_retention(&mut self, now: u64) -> Result<usize> {
        let mut deleted = self.trim_to_limits()?;
        if let Some(age) = self.opts.max_age {
            let age = u64::try_from(age.as_nanos()).unwrap_or(u64::MAX);
            while let Some(old) = self.sealed.front() {
                let expired = old.last.is_none_or(|(_, t)| now.saturating_sub(t) > age);
                if !expired {
                    break;
                }
                self.delete_oldest()?;
                deleted += 1;
            }
        }
        Ok(deleted)
    }

    /// Deletes the oldest sealed segments whose every record has a sequence below `seq`: the
    /// caller no longer needs them (a stream that keeps only the newest messages of each topic).
    /// Returns how many were deleted.
    ///
    /// # Errors
    /// I/O errors deleting a segment file.
    pub fn trim_before(&mut self, seq: u64) -> Result<usize> {
        let mut deleted = 0;
        while let Some(old) = self.sealed.front() {
            if old.last.is_some_and(|(last, _)| last >= seq) {
                break;
            }
            self.delete_oldest()?;
            deleted += 1;
        }
        Ok(deleted)
    }

    fn trim_to_limits(&mut self) -> Result<usize> {
        let mut deleted = 0;
        while let Some(old) = self.sealed.front() {
            let over = old.count == 0
                || self
                    .opts
                    .max_msgs
                    .is_some_and(|m| self.count - old.count >= m)
                || self
                    .opts
                    .max_bytes
                    .is_some_and(|b| self.bytes - old.bytes >= b);
            if !over {
                break;
            }
            self.delete_oldest()?;
            deleted += 1;
        }
        Ok(deleted)
    }

    fn delete_oldest(&mut self) -> Result<()> {
        if let Some(old) = self.sealed.front() {
            let (base, count, bytes) = (old.base, old.count, old.bytes);
            self.remove_segment_files(base)?;
            self.sealed.pop_front();
            self.count -= count;
            self.bytes -= bytes;
        }
        Ok(())
    }

    fn remove_segment_files(&self, base: u64) -> Result<()> {
        let log = self.log_path(base);
        match fs::remove_file(&log) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(StoreError::io("remove", log, e)),
        }
        // The index is rebuildable; a leftover one is ignored without its log.
        let _ = fs::remove_file(self.idx_path(base));
        Ok(())
    }

    /// Seals the active segment (synced unless the policy is `Never`) and starts a new one
    /// named by the next sequence.
    fn roll(&mut self) -> Result<()> {
        let durable = self.opts.fsync != FsyncPolicy::Never;
        if durable && self.dirty {
            self.sync_active()?;
            self.last_sync = Instant::now();
        }
        let next = create_segment(&self.dir, self.next_seq, durable)?;
        let old = std::mem::replace(&mut self.active, next);
        self.sealed.push_back(old.meta);
        Ok(())
    }

    /// Writes `buf` at the end of the active segment, or nothing: a failed write is cut back.
    fn write_log(&mut self, buf: &[u8]) -> Result<()> {
        let good = self.active.meta.bytes;
        let room = self
            .opts
            .max_disk_bytes
            .map_or(u64::MAX, |cap| cap.saturating_sub(self.bytes));
        let result = if buf.len() as u64 > room {
            // As a full filesystem does: what fits is written, then the write fails.
            let part = &buf[..room as usize];
            self.active
                .log
                .write_all(part)
                .and(Err(io::Error::from(io::ErrorKind::StorageFull)))
        } else {
            self.active.log.write_all(buf)
        };
        let Err(e) = result else {
            return Ok(());
        };
        let path = self.log_path(self.active.meta.base);
        // The log is opened in append mode, so after this the next write lands at `good`.
        if self.active.log.set_len(good).is_err() {
            self.poisoned = true;
        }
        Err(StoreError::io("write", path, e))
    }

    /// Appends index entries to the active segment's index file, best effort: on failure the
    /// file is cut back to whole entries and indexing stops until the next open rebuilds it.
    fn write_index(&mut self, entries: &[IndexEntry]) {
        let Some(idx) = self.active.idx.as_mut() else {
            return;
        };
        if entries.is_empty() {
            return;
        }
        let bytes: Vec<u8> = entries.iter().flat_map(|e| e.encode()).collect();
        if idx.write_all(&bytes).is_err() {
            if let Ok(m) = idx.metadata() {
                let whole = m.len() / INDEX_ENTRY_BYTES as u64 * INDEX_ENTRY_BYTES as u64;
                let _ = idx.set_len(whole);
            }
            self.active.idx = None;
        }
    }

    /// Where to start reading segment `m` to find the first record satisfying a search: the
    /// last index entry for which `before` holds, as (offset, lowest sequence).
    fn index_floor(&self, m: &SegmentMeta, before: impl Fn(&IndexEntry) -> bool) -> (u64, u64) {
        let entries = segment::read_index(&self.idx_path(m.base), m.bytes);
        let i = entries.partition_point(before);
        match i.checked_sub(1) {
            Some(i) => (entries[i].offset, entries[i].seq),
            None => (0, m.base),
        }
    }

    pub(crate) fn segments(&self) -> impl Iterator<Item = &SegmentMeta> {
        self.sealed.iter().chain(std::iter::once(&self.active.meta))
    }

    fn log_path(&self, base: u64) -> PathBuf {
        self.dir.join(format::segment_file_name(base, "log"))
    }

    fn idx_path(&self, base: u64) -> PathBuf {
        self.dir.join(format::segment_file_name(base, "idx"))
    }
}

/// Creates an empty segment named `base`, with its index, and (if `durable`) makes the new
/// directory entry durable.
fn create_segment(dir: &Path, base: u64, durable: bool) -> Result<Active> {
    let path = dir.join(format::segment_file_name(base, "log"));
    let log = OpenOptions::new()
        .create_new(true)
        .append(true)
        .open(&path)
        .map_err(|e| StoreError::io("create", &path, e))?;
    let idx = File::create(dir.join(format::segment_file_name(base, "idx"))).ok();
    if durable && let Err(e) = File::open(dir).and_then(|d| d.sync_all()) {
        let _ = fs::remove_file(&path);
        return Err(StoreError::io("fsync", dir, e));
    }
    Ok(Active {
        meta: SegmentMeta {
            base,
            first: None,
            last: None,
            count: 0,
            bytes: 0,
        },
        log,
        idx,
    })
}

/// Opens a sealed segment: through its index when that checks out (only the records after
/// the last index entry are read), by a whole scan otherwise.
fn open_sealed(dir: &Path, base: u64, opts: &Options, rec: &mut Recovery) -> Result<SegmentMeta> {
    let path = dir.join(format::segment_file_name(base, "log"));
    let idx_path = dir.join(format::segment_file_name(base, "idx"));
    let mut file = SegmentFile::open(&path).map_err(|e| StoreError::io("open", &path, e))?;
    let every = u64::from(opts.index_every);
    let old = segment::read_index(&idx_path, file.len());
    let read_err = |e| StoreError::io("read", &path, e);

    let mut trusted = None;
    if let (false, Some(head), Some(last)) = (opts.verify_on_open, old.first(), old.last())
        && head.ordinal == 0
    {
        let tail = segment::scan(
            &mut file,
            last.offset,
            u64::from(last.ordinal),
            last.seq,
            every,
        )
        .map_err(read_err)?;
        // The entry must name the record found where it points.
        let starts_right = tail.first == Some((last.seq, last.timestamp))
            && tail.damaged.first().is_none_or(|d| d.0 != last.offset);
        if starts_right {
            let mut entries = old[..old.len() - 1].to_vec();
            entries.extend(tail.entries.iter().copied());
            trusted = Some((tail, entries, (head.seq, head.timestamp)));
        }
    }
    let (scan, entries, first) = match trusted {
        Some((tail, entries, first)) => (tail, entries, Some(first)),
        None => {
            let full = segment::scan(&mut file, 0, 0, base, every).map_err(read_err)?;
            let entries = full.entries.clone();
            let first = full.first;
            (full, entries, first)
        }
    };
    for &(offset, len) in scan.damaged.iter().chain(scan.tail.iter()) {
        rec.corrupt_records.push(Corruption {
            segment: path.clone(),
            offset,
            len,
        });
    }
    if entries != old {
        write_index_file(&idx_path, &entries);
        rec.rebuilt_indexes.push(idx_path);
    }
    Ok(SegmentMeta {
        base,
        first,
        last: scan.last,
        count: scan.count,
        bytes: file.len(),
    })
}

/// Opens the last segment for appending after scanning it whole and cutting off a torn tail.
fn open_last(dir: &Path, base: u64, opts: &Options, rec: &mut Recovery) -> Result<Active> {
    let path = dir.join(format::segment_file_name(base, "log"));
    let idx_path = dir.join(format::segment_file_name(base, "idx"));
    let mut file = SegmentFile::open(&path).map_err(|e| StoreError::io("open", &path, e))?;
    let scan = segment::scan(&mut file, 0, 0, base, u64::from(opts.index_every))
        .map_err(|e| StoreError::io("read", &path, e))?;
    for &(offset, len) in &scan.damaged {
        rec.corrupt_records.push(Corruption {
            segment: path.clone(),
            offset,
            len,
        });
    }
    let log = OpenOptions::new()
        .append(true)
        .open(&path)
        .map_err(|e| StoreError::io("open", &path, e))?;
    let mut bytes = file.len();
    if let Some((offset, len)) = scan.tail {
        log.set_len(offset)
            .map_err(|e| StoreError::io("truncate", &path, e))?;
        if opts.fsync != FsyncPolicy::Never {
            log.sync_data()
                .map_err(|e| StoreError::io("fdatasync", &path, e))?;
        }
        rec.truncated_bytes += len;
        bytes = offset;
    }
    if segment::read_index(&idx_path, bytes) != scan.entries {
        rec.rebuilt_indexes.push(idx_path.clone());
    }
    write_index_file(&idx_path, &scan.entries);
    let idx = OpenOptions::new().append(true).open(&idx_path).ok();
    Ok(Active {
        meta: SegmentMeta {
            base,
            first: scan.first,
            last: scan.last,
            count: scan.count,
            bytes,
        },
        log,
        idx,
    })
}

/// Replaces an index file, best effort: a failed write leaves an index that readers check
/// entry by entry and the next open rebuilds.
fn write_index_file(path: &Path, entries: &[IndexEntry]) {
    let bytes: Vec<u8> = entries.iter().flat_map(|e| e.encode()).collect();
    let _ = fs::write(path, bytes);
}
