//! Reading one segment file in bounded chunks: stepping from record to record, recognising
//! damage and finding the next valid record after it, and scanning a whole segment to rebuild
//! its index. Used by [`crate::Stream::open`] (recovery) and by [`crate::Reader`]. Writing lives
//! in `stream.rs`; this module never modifies a file.

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::path::Path;

use crate::format::{self, IndexEntry, Probe, RECORD_MAGIC, RECORD_PREFIX};

/// The size of one read from disk. A record larger than this is read whole, once.
const CHUNK: usize = 256 << 10;

/// What lies at a position in a segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Step {
    /// A valid record starts here.
    Record {
        /// Its length on disk.
        len: usize,
        /// Its sequence.
        seq: u64,
        /// Its timestamp.
        timestamp: u64,
    },
    /// `len` damaged bytes start here. `resumes` says whether a valid record follows them;
    /// if not, they run to the end of the file.
    Damaged {
        /// How many bytes are unusable.
        len: u64,
        /// Whether a valid record starts right after them.
        resumes: bool,
    },
    /// The end of the file.
    End,
}

/// A read-only view of a segment file through one bounded buffer.
#[derive(Debug)]
pub(crate) struct SegmentFile {
    file: File,
    len: u64,
    buf: Vec<u8>,
    buf_start: u64,
}

impl SegmentFile {
    /// Opens `path` for reading; the view ends at the file's length now.
    pub fn open(path: &Path) -> io::Result<SegmentFile> {
        let file = File::open(path)?;
        let len = file.metadata()?.len();
        Ok(SegmentFile {
            file,
            len,
            buf: Vec::new(),
            buf_start: 0,
        })
    }

    /// The file's length when it was opened.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// The bytes from `pos`, at least `want` of them unless the file ends first.
    fn bytes_at(&mut self, pos: u64, want: usize) -> io::Result<&[u8]> {
        let avail = self.len.saturating_sub(pos);
        let want = (want as u64).min(avail) as usize;
        let buf_end = self.buf_start + self.buf.len() as u64;
        if pos < self.buf_start || pos + want as u64 > buf_end {
            let n = (want.max(CHUNK) as u64).min(avail) as usize;
            if n <= CHUNK && self.buf.capacity() > CHUNK {
                // An oversized record was read before; give that memory back.
                self.buf = Vec::with_capacity(CHUNK);
            }
            self.buf.resize(n, 0);
            self.file.seek(SeekFrom::Start(pos))?;
            let mut filled = 0;
            while filled < n {
                match self.file.read(&mut self.buf[filled..]) {
                    Ok(0) => break,
                    Ok(k) => filled += k,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(e),
                }
            }
            // A file that shrank under us (truncated by recovery elsewhere) ends here.
            if filled < n {
                self.buf.truncate(filled);
                self.len = pos + filled as u64;
            }
            self.buf_start = pos;
        }
        let from = (pos - self.buf_start) as usize;
        Ok(&self.buf[from..])
    }

    /// Judges the record that may start at `pos`, reading as much as it needs.
    fn probe_at(&mut self, pos: u64) -> io::Result<Probe> {
        let remaining = self.len.saturating_sub(pos);
        let mut want = RECORD_PREFIX;
        loop {
            let bytes = self.bytes_at(pos, want)?;
            match format::probe(bytes, remaining) {
                Probe::NeedMore { len } if len > want => want = len,
                Probe::NeedMore { .. } => return Ok(Probe::Invalid { claimed: None }),
                other => return Ok(other),
            }
        }
    }

    /// What lies at `pos`, where a record is expected. A record whose sequence is below
    /// `min_seq` (the one after the last valid record) counts as damage: sequences only grow.
    pub fn step(&mut self, pos: u64, min_seq: u64) -> io::Result<Step> {
        if pos >= self.len {
            return Ok(Step::End);
        }
        let claimed = match self.probe_at(pos)? {
            Probe::Valid {
                len,
                seq,
                timestamp,
            } if seq >= min_seq => {
                return Ok(Step::Record {
                    len,
                    seq,
                    timestamp,
                });
            }
            Probe::Valid { len, .. } => Some(len),
            Probe::Invalid { claimed } => claimed,
            Probe::NeedMore { .. } => None,
        };
        // A damaged record whose length survived: the next one most likely starts after it.
        if let Some(len) = claimed {
            let next = pos + len as u64;
            if self.valid_at(next, min_seq)? {
                return Ok(Step::Damaged {
                    len: len as u64,
                    resumes: true,
                });
            }
        }
        // Otherwise look for the next valid record byte by byte.
        let mut p = pos + 1;
        while p < self.len {
            let bytes = self.bytes_at(p, CHUNK)?;
            match bytes.iter().position(|&b| b == RECORD_MAGIC) {
                None => p += bytes.len() as u64,
                Some(i) => {
                    let candidate = p + i as u64;
                    if self.valid_at(candidate, min_seq)? {
                        return Ok(Step::Damaged {
                            len: candidate - pos,
                            resumes: true,
                        });
                    }
                    p = candidate + 1;
                }
            }
        }
        Ok(Step::Damaged {
            len: self.len - pos,
            resumes: false,
        })
    }

    fn valid_at(&mut self, pos: u64, min_seq: u64) -> io::Result<bool> {
        Ok(pos < self.len
            && matches!(self.probe_at(pos)?, Probe::Valid { seq, .. } if seq >= min_seq))
    }

    /// Decodes the record at `pos` that [`SegmentFile::step`] just reported with length `len`.
    pub fn record(&mut self, pos: u64, len: usize) -> io::Result<format::Record> {
        let bytes = self.bytes_at(pos, len)?;
        Ok(format::decode_valid(bytes, len))
    }
}

/// What a scan of (part of) a segment found.
#[derive(Debug, Default)]
pub(crate) struct Scan {
    /// Index entries for the records scanned, every `index_every`-th by ordinal.
    pub entries: Vec<IndexEntry>,
    /// Valid records in the segment (including those before the scan's start).
    pub count: u64,
    /// The first valid record scanned: sequence and timestamp.
    pub first: Option<(u64, u64)>,
    /// The last valid record: sequence and timestamp.
    pub last: Option<(u64, u64)>,
    /// The offset just past the last valid record or damaged range followed by one.
    pub valid_end: u64,
    /// Damaged ranges followed by a valid record: `(offset, len)`.
    pub damaged: Vec<(u64, u64)>,
    /// Damaged bytes running to the end of the file: `(offset, len)`.
    pub tail: Option<(u64, u64)>,
}

/// Scans a segment from `start` (a record boundary), where `ordinal` valid records precede it
/// and `min_seq` is the lowest acceptable sequence, to the end of the file.
pub(crate) fn scan(
    seg: &mut SegmentFile,
    start: u64,
    ordinal: u64,
    min_seq: u64,
    index_every: u64,
) -> io::Result<Scan> {
    let mut s = Scan {
        count: ordinal,
        valid_end: start,
        ..Scan::default()
    };
    let mut pos = start;
    let mut min_seq = min_seq;
    loop {
        match seg.step(pos, min_seq)? {
            Step::Record {
                len,
                seq,
                timestamp,
            } => {
                if s.count.is_multiple_of(index_every) {
                    s.entries.push(IndexEntry {
                        seq,
                        timestamp,
                        offset: pos,
                        // Ordinals past u32::MAX cannot occur: a segment is at most 4 GiB of
                        // records of at least 31 bytes.
                        ordinal: s.count as u32,
                    });
                }
                s.first.get_or_insert((seq, timestamp));
                s.last = Some((seq, timestamp));
                s.count += 1;
                min_seq = seq + 1;
                pos += len as u64;
                s.valid_end = pos;
            }
            Step::Damaged { len, resumes: true } => {
                s.damaged.push((pos, len));
                pos += len;
            }
            Step::Damaged {
                len,
                resumes: false,
            } => {
                s.tail = Some((pos, len));
                return Ok(s);
            }
            Step::End => return Ok(s),
        }
    }
}

/// Reads a segment's index file, keeping the valid prefix of entries: each entry's CRC must
/// match and sequences, offsets and ordinals must grow. Returns an empty list if the file is
/// missing or unreadable; the index is only ever a shortcut.
pub(crate) fn read_index(path: &Path, log_len: u64) -> Vec<IndexEntry> {
    let Ok(bytes) = std::fs::read(path) else {
        return Vec::new();
    };
    let mut out: Vec<IndexEntry> = Vec::with_capacity(bytes.len() / format::INDEX_ENTRY_BYTES);
    for chunk in bytes.chunks_exact(format::INDEX_ENTRY_BYTES) {
        let Some(e) = IndexEntry::decode(chunk) else {
            break;
        };
        let grows = out
            .last()
            .is_none_or(|p| e.seq > p.seq && e.offset > p.offset && e.ordinal > p.ordinal);
        if !grows || e.offset >= log_len {
            break;
        }
        out.push(e);
    }
    out
}
