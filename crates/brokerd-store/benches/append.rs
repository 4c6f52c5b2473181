//! Criterion benchmarks of appending to a stream: 128 B and 1 KiB payloads, in batches of
//! 1,000 records, with fsync `Never` (page cache only) and `Always` (one fdatasync per batch:
//! group commit). Throughput is in records. Run with `cargo bench -p brokerd-store`; each
//! benchmark appends to a fresh stream in the system's temporary directory, which is
//! removed afterwards, so the figures depend on that filesystem.

#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

use brokerd_store::{Append, FsyncPolicy, Options, Stream};
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use std::time::Duration;

const BATCH: usize = 1_000;

fn append(c: &mut Criterion) {
    let mut group = c.benchmark_group("append");
    group.measurement_time(Duration::from_secs(5));
    group.throughput(Throughput::Elements(BATCH as u64));
    for (policy, fsync) in [
        ("never", FsyncPolicy::Never),
        ("always", FsyncPolicy::Always),
    ] {
        for size in [128usize, 1024] {
            let dir = std::env::temp_dir().join(format!(
                "brokerd-store-bench-{}-{policy}-{size}",
                std::process::id()
            ));
            let _ = std::fs::remove_dir_all(&dir);
            let opts = Options {
                fsync,
                // Keep the disk footprint bounded however long criterion runs.
                max_bytes: Some(256 << 20),
                ..Options::default()
            };
            let (mut stream, _) = Stream::open(&dir, opts).unwrap();
            let payload = vec![0x5a; size];
            let batch = vec![
                Append {
                    topic: "orders.eu.created",
                    headers: b"",
                    payload: &payload,
                    timestamp: 1,
                };
                BATCH
            ];
            group.bench_function(
                BenchmarkId::new(format!("{policy}/batch{BATCH}"), size),
                |b| {
                    b.iter(|| stream.append_batch(&batch).unwrap());
                },
            );
            drop(stream);
            let _ = std::fs::remove_dir_all(&dir);
        }
    }
    group.finish();
}

criterion_group!(benches, append);
criterion_main!(benches);
