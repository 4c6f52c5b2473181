//! Helpers shared by the black-box tests: a self-deleting directory under the system's
//! temporary directory, and shorthand for reading a whole stream.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use brokerd_store::{Record, StoreError, Stream};

/// A fresh directory, removed with everything in it when dropped.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let path = std::env::temp_dir().join(format!(
            "brokerd-store-{tag}-{}-{n}-{nanos}",
            std::process::id()
        ));
        std::fs::create_dir_all(&path).unwrap();
        TempDir(path)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Every item a reader from `seq` yields.
pub fn read_all(s: &Stream, seq: u64) -> Vec<Result<Record, StoreError>> {
    s.read_from(seq).unwrap().collect()
}

/// The records a reader from `seq` yields, panicking on any error item.
pub fn records(s: &Stream, seq: u64) -> Vec<Record> {
    read_all(s, seq).into_iter().map(|r| r.unwrap()).collect()
}

/// The payload the tests store for sequence `seq`: its number, padded to vary the length.
pub fn payload(seq: u64) -> Vec<u8> {
    let mut p = format!("payload-{seq}-").into_bytes();
    p.resize(p.len() + (seq % 17) as usize, b'x');
    p
}

/// The segment log files in `dir`, oldest first.
pub fn segment_files(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "log"))
        .collect();
    v.sort();
    v
}
