//! [`Reader`]: the records of a stream in sequence order, read from disk in bounded chunks.
//!
//! A reader owns its file handles and borrows nothing from the [`crate::Stream`] that made
//! it, so it can live on another thread or outlast appends. It holds one chunk buffer
//! (256 KiB, or one record if a record is larger), whatever the length of the stream.

use std::collections::VecDeque;
use std::io;
use std::path::PathBuf;

use crate::error::StoreError;
use crate::format::Record;
use crate::segment::{SegmentFile, Step};

/// An iterator over stored records from a starting sequence, made by
/// [`crate::Stream::read_from`].
///
/// It yields `Err(StoreError::Corrupt { .. })` for damaged bytes it steps over (the
/// sequences they held are missing, and the next item continues after them) and
/// `Err(StoreError::Io { .. })` when a segment cannot be read (the reader then moves on to the
/// next segment). Damage at the very end of the newest segment is not reported: it is a
/// record still being written, or one recovery will cut off. A segment deleted by retention
/// before the reader reaches it is skipped silently; compare sequences with
/// [`crate::Stream::first_seq`] to notice.
#[derive(Debug)]
pub struct Reader {
    /// Segments not yet opened: path and base sequence.
    segments: VecDeque<(PathBuf, u64)>,
    current: Option<Current>,
    /// Where to start in the first segment: offset and lowest sequence.
    start: Option<(u64, u64)>,
    /// Records below this are skipped.
    from_seq: u64,
    /// Damage seen just before the next record, reported once that record shows whether the
    /// damage could have held a sequence at or after `from_seq`.
    damage: Option<StoreError>,
    /// A record held back while the damage before it is reported.
    held: Option<Record>,
}

#[derive(Debug)]
struct Current {
    path: PathBuf,
    file: SegmentFile,
    pos: u64,
    min_seq: u64,
    newest: bool,
}

impl Reader {
    pub(crate) fn new(
        segments: VecDeque<(PathBuf, u64)>,
        offset: u64,
        min_seq: u64,
        from_seq: u64,
    ) -> Reader {
        Reader {
            segments,
            current: None,
            start: Some((offset, min_seq)),
            from_seq,
            damage: None,
            held: None,
        }
    }

    fn open_next(&mut self) -> Option<Result<(), StoreError>> {
        let (path, base) = self.segments.pop_front()?;
        let (pos, min_seq) = self.start.take().unwrap_or((0, base));
        match SegmentFile::open(&path) {
            Ok(file) => {
                self.current = Some(Current {
                    path,
                    file,
                    pos,
                    min_seq,
                    newest: self.segments.is_empty(),
                });
                Some(Ok(()))
            }
            // Deleted by retention or purge since the reader was made.
            Err(e) if e.kind() == io::ErrorKind::NotFound => Some(Ok(())),
            Err(e) => Some(Err(StoreError::io("open", path, e))),
        }
    }
}

impl Iterator for Reader {
    type Item = Result<Record, StoreError>;

    fn next(&mut self) -> Option<Self::Item> {
        if let Some(r) = self.held.take() {
            return Some(Ok(r));
        }
        loop {
            let Some(cur) = self.current.as_mut() else {
                match self.open_next()? {
                    Ok(()) => continue,
                    Err(e) => return Some(Err(e)),
                }
            };
            let step = match cur.file.step(cur.pos, cur.min_seq) {
                Ok(s) => s,
                Err(e) => {
                    let path = cur.path.clone();
                    self.current = None;
                    return Some(Err(StoreError::io("read", path, e)));
                }
            };
            match step {
                Step::Record { len, seq, .. } => {
                    let at = cur.pos;
                    cur.pos += len as u64;
                    cur.min_seq = seq + 1;
                    // Damage before this record held sequences below `seq` only.
                    let damage = self.damage.take().filter(|_| seq > self.from_seq);
                    if seq < self.from_seq {
                        continue;
                    }
                    let record = match cur.file.record(at, len) {
                        Ok(r) => r,
                        Err(e) => {
                            let path = cur.path.clone();
                            self.current = None;
                            return Some(Err(StoreError::io("read", path, e)));
                        }
                    };
                    return match damage {
                        Some(d) => {
                            self.held = Some(record);
                            Some(Err(d))
                        }
                        None => Some(Ok(record)),
                    };
                }
                Step::Damaged { len, resumes } => {
                    let err = StoreError::Corrupt {
                        segment: cur.path.clone(),
                        offset: cur.pos,
                        len,
                    };
                    cur.pos += len;
                    if resumes {
                        self.damage = Some(err);
                    } else {
                        let newest = cur.newest;
                        self.current = None;
                        if !newest {
                            return Some(Err(err));
                        }
                    }
                }
                Step::End => {
                    self.current = None;
                    // Damage at the end of a segment may have held any later sequence.
                    if let Some(d) = self.damage.take() {
                        return Some(Err(d));
                    }
                }
            }
        }
    }
}
