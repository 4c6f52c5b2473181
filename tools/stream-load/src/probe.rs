//! The disk's own durability cost: `count` appends of `size` bytes to a new file, each followed
//! by `fdatasync` (`File::sync_data`), timed one by one. This is the floor under any broker's
//! "acknowledge after fsync" latency on the same file system. Removes its file.

use std::fs::OpenOptions;
use std::io::Write;
use std::time::Instant;

use crate::measure::{Histogram, Json};

/// Runs the probe in `dir` and returns its JSON line.
///
/// # Errors
/// The file could not be created, written or synced.
pub fn fsync_probe(dir: &str, count: u64, size: usize, label: &str) -> Result<String, String> {
    let path =
        std::path::Path::new(dir).join(format!("stream-load-fsync-probe.{}", std::process::id()));
    let mut f = OpenOptions::new()
        .create_new(true)
        .append(true)
        .open(&path)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    let block = vec![0x5au8; size];
    let mut h = Histogram::new();
    let started = Instant::now();
    let r = (|| {
        for _ in 0..count {
            let t = Instant::now();
            f.write_all(&block)?;
            f.sync_data()?;
            h.record(t.elapsed().as_nanos() as u64);
        }
        Ok::<(), std::io::Error>(())
    })();
    let total = started.elapsed();
    let _ = std::fs::remove_file(&path);
    r.map_err(|e| format!("{}: {e}", path.display()))?;
    let us = |ns: u64| ns as f64 / 1000.0;
    Ok(Json::new()
        .str("tool", "stream-load")
        .str("mode", "fsync-probe")
        .str("dir", dir)
        .int("count", count)
        .int("size", size as u64)
        .num("p50_us", us(h.quantile(0.5)), 1)
        .num("p90_us", us(h.quantile(0.9)), 1)
        .num("p99_us", us(h.quantile(0.99)), 1)
        .num("max_us", us(h.max()), 1)
        .num(
            "syncs_per_s",
            count as f64 / total.as_secs_f64().max(1e-9),
            0,
        )
        .str("label", label)
        .finish())
}
