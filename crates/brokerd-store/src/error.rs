//! The error type of every store operation.

use std::io;
use std::path::PathBuf;

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The filesystem is full (ENOSPC), or a segment reached [`crate::Options::max_file_bytes`].
    /// Nothing of the failed append remains on disk; earlier records are intact.
    #[error("no space left for {path}")]
    DiskFull {
        /// The file that could not grow.
        path: PathBuf,
        /// The error the operating system returned.
        #[source]
        source: io::Error,
    },
    /// Any other I/O failure, with what was being done and to which file.
    #[error("{op} {path}")]
    Io {
        /// The operation that failed, such as "write" or "fdatasync".
        op: &'static str,
        /// The file or directory involved.
        path: PathBuf,
        /// The error the operating system returned.
        #[source]
        source: io::Error,
    },
    /// A record's topic is longer than 65535 bytes or the record exceeds 64 MiB on disk.
    #[error("record too large: {len} bytes of topic, headers and payload")]
    RecordTooLarge {
        /// The topic, headers and payload bytes together.
        len: usize,
    },
    /// An earlier write or fdatasync failed and the segment could not be restored to its last
    /// good length, or a failed fdatasync left the page cache in an unknown state. Appends are
    /// refused until the stream is reopened, which recovers the tail.
    #[error("stream needs recovery after an earlier write failure; reopen it")]
    Poisoned,
    /// A reader met damaged bytes: `len` bytes at `offset` in `segment` hold no valid record.
    /// The reader continues after them; the sequences they held are missing.
    #[error("corrupt record: {len} bytes at offset {offset} in {segment}")]
    Corrupt {
        /// The segment file.
        segment: PathBuf,
        /// Where the damage starts.
        offset: u64,
        /// How many bytes are unusable.
        len: u64,
    },
    /// The options cannot work, for example `segment_bytes` of 0.
    #[error("invalid options: {0}")]
    InvalidOptions(&'static str),
}

impl StoreError {
    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>, source: io::Error) -> Self {
        let path = path.into();
        if source.kind() == io::ErrorKind::StorageFull {
            StoreError::DiskFull { path, source }
        } else {
            StoreError::Io { op, path, source }
        }
    }
}

/// The result of a store operation.
pub type Result<T, E = StoreError> = std::result::Result<T, E>;
