//! Property: whatever sequence of appends, syncs, clean reopens and crashes (the newest
//! segment cut at any byte after what was last synced) a stream goes through, it keeps a
//! contiguous run of sequences, every record it holds is the one appended with that
//! sequence, and every synced record survives.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::PathBuf;
use std::time::Duration;

use brokerd_store::{Append, FsyncPolicy, Options, Stream};
use common::{TempDir, records, segment_files};
use proptest::prelude::*;

#[derive(Debug, Clone)]
enum Op {
    /// Append a batch of records with these payload sizes.
    Append(Vec<usize>),
    Sync,
    Reopen,
    /// Cut the newest segment at this fraction of the way from its synced length to its end,
    /// then reopen.
    Crash(f64),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        5 => prop::collection::vec(0usize..300, 1..6).prop_map(Op::Append),
        2 => Just(Op::Sync),
        1 => Just(Op::Reopen),
        2 => (0.0f64..=1.0).prop_map(Op::Crash),
    ]
}

fn options() -> Options {
    Options {
        segment_bytes: 700,
        index_every: 3,
        // Only the test's explicit syncs (and rolls) make records durable.
        fsync: FsyncPolicy::Interval(Duration::from_secs(3600)),
        ..Options::default()
    }
}

fn payload(seq: u64, size: usize) -> Vec<u8> {
    (0..size).map(|i| (seq as usize * 31 + i) as u8).collect()
}

/// The model: every stored record's payload, by sequence, starting at sequence 1.
fn check(s: &Stream, model: &[Vec<u8>]) {
    let got = records(s, 0);
    assert_eq!(got.len(), model.len());
    for (i, r) in got.iter().enumerate() {
        assert_eq!(r.seq, i as u64 + 1);
        assert_eq!(&r.payload[..], &model[i][..], "seq {}", r.seq);
    }
    assert_eq!(s.len(), model.len() as u64);
    assert_eq!(s.last_seq(), model.len() as u64);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn appends_reopens_and_crashes_keep_the_invariants(ops in prop::collection::vec(op(), 1..40)) {
        let dir = TempDir::new("props");
        let (mut s, _) = Stream::open(dir.path(), options()).unwrap();
        let mut model: Vec<Vec<u8>> = Vec::new();
        // Records 1..=synced are durable; `synced_at` is the newest segment and its length
        // when they were made so (a roll syncs the segment it seals).
        let mut synced = 0usize;
        let mut synced_at: Option<(PathBuf, u64)> = None;
        for op in ops {
            match op {
                Op::Append(sizes) => {
                    let first = s.next_seq();
                    let payloads: Vec<Vec<u8>> = sizes
                        .iter()
                        .enumerate()
                        .map(|(i, &n)| payload(first + i as u64, n))
                        .collect();
                    let batch: Vec<Append<'_>> = payloads
                        .iter()
                        .map(|p| Append { topic: "t", headers: b"", payload: p, timestamp: 0 })
                        .collect();
                    let before = s.segment_count();
                    let range = s.append_batch(&batch).unwrap();
                    prop_assert_eq!(range.start, model.len() as u64 + 1);
                    if s.segment_count() != before {
                        // The sealed segment was synced: everything before this batch.
                        synced = model.len();
                        synced_at = None;
                    }
                    model.extend(payloads);
                }
                Op::Sync => {
                    s.sync().unwrap();
                    synced = model.len();
                    let newest = segment_files(dir.path()).pop().unwrap();
                    let len = std::fs::metadata(&newest).unwrap().len();
                    synced_at = Some((newest, len));
                }
                Op::Reopen => {
                    drop(s);
                    let (reopened, rec) = Stream::open(dir.path(), options()).unwrap();
                    prop_assert_eq!(rec.truncated_bytes, 0);
                    prop_assert!(rec.corrupt_records.is_empty());
                    s = reopened;
                    check(&s, &model);
                }
                Op::Crash(at) => {
                    drop(s);
                    let newest = segment_files(dir.path()).pop().unwrap();
                    let len = std::fs::metadata(&newest).unwrap().len();
                    let floor = match &synced_at {
                        Some((p, l)) if *p == newest => *l,
                        _ => 0,
                    };
                    let cut = floor + ((len - floor) as f64 * at) as u64;
                    let f = std::fs::OpenOptions::new().write(true).open(&newest).unwrap();
                    f.set_len(cut.min(len)).unwrap();
                    drop(f);
                    let (reopened, rec) = Stream::open(dir.path(), options()).unwrap();
                    prop_assert!(rec.corrupt_records.is_empty(), "{:?}", rec.corrupt_records);
                    s = reopened;
                    let kept = s.len() as usize;
                    prop_assert!(kept >= synced, "kept {} of {} synced", kept, synced);
                    prop_assert!(kept <= model.len());
                    model.truncate(kept);
                    check(&s, &model);
                    // What survived is on disk now as far as this test's crashes go.
                    let newest = segment_files(dir.path()).pop().unwrap();
                    let len = std::fs::metadata(&newest).unwrap().len();
                    synced = kept;
                    synced_at = Some((newest, len));
                }
            }
        }
        check(&s, &model);
    }
}
