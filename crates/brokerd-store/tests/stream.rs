//! Black-box tests of a stream: appending and reading across segment rolls, seeking by
//! sequence and time, retention, reopening, recovery from torn and damaged segments, and a
//! full disk.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use brokerd_store::format::MIN_RECORD_BYTES;
use brokerd_store::{Append, FsyncPolicy, Options, StoreError, Stream};
use common::{TempDir, payload, read_all, records, segment_files};

fn small() -> Options {
    Options {
        segment_bytes: 2000,
        index_every: 4,
        fsync: FsyncPolicy::Never,
        ..Options::default()
    }
}

fn topic(seq: u64) -> String {
    format!("orders.{}", seq % 5)
}

fn headers(seq: u64) -> Vec<u8> {
    if seq.is_multiple_of(3) {
        vec![1, 2, 3]
    } else {
        Vec::new()
    }
}

/// The size on disk of the record the tests store for `seq`.
fn record_len(seq: u64) -> u64 {
    (MIN_RECORD_BYTES + topic(seq).len() + headers(seq).len() + payload(seq).len()) as u64
}

/// Appends records `next_seq..=last` with timestamp `seq * 1000`.
fn fill(s: &mut Stream, last: u64) {
    while s.next_seq() <= last {
        let seq = s.next_seq();
        let got = s
            .append(&topic(seq), &headers(seq), &payload(seq), seq * 1000)
            .unwrap();
        assert_eq!(got, seq);
    }
}

fn check_record(r: &brokerd_store::Record, seq: u64) {
    assert_eq!(r.seq, seq);
    assert_eq!(r.topic_str(), Some(topic(seq).as_str()));
    assert_eq!(&r.headers[..], &headers(seq)[..]);
    assert_eq!(&r.payload[..], &payload(seq)[..]);
    assert_eq!(r.timestamp, seq * 1000);
}

#[test]
fn round_trip_across_segment_rolls() {
    let dir = TempDir::new("roundtrip");
    let (mut s, rec) = Stream::open(dir.path(), small()).unwrap();
    assert_eq!(rec.records, 0);
    assert_eq!((s.first_seq(), s.last_seq(), s.len()), (1, 0, 0));
    fill(&mut s, 500);
    // And a few batches, one larger than a segment.
    for size in [10usize, 100] {
        let owned: Vec<(String, Vec<u8>, Vec<u8>, u64)> = (0..size as u64)
            .map(|i| {
                let seq = s.next_seq() + i;
                (topic(seq), headers(seq), payload(seq), seq * 1000)
            })
            .collect();
        let batch: Vec<Append<'_>> = owned
            .iter()
            .map(|(t, h, p, ts)| Append {
                topic: t,
                headers: h,
                payload: p,
                timestamp: *ts,
            })
            .collect();
        let first = s.next_seq();
        assert_eq!(s.append_batch(&batch).unwrap(), first..first + size as u64);
    }
    assert_eq!(s.last_seq(), 610);
    assert_eq!(s.len(), 610);
    assert!(s.segment_count() > 10, "{} segments", s.segment_count());
    assert_eq!(s.segment_count(), segment_files(dir.path()).len());
    let disk: u64 = segment_files(dir.path())
        .iter()
        .map(|p| std::fs::metadata(p).unwrap().len())
        .sum();
    assert_eq!(s.bytes(), disk);
    let all = records(&s, 0);
    assert_eq!(all.len(), 610);
    for (i, r) in all.iter().enumerate() {
        check_record(r, i as u64 + 1);
    }
}

#[test]
fn read_from_every_sequence() {
    let dir = TempDir::new("readfrom");
    let (mut s, _) = Stream::open(dir.path(), small()).unwrap();
    fill(&mut s, 120);
    for from in 0..=122 {
        let got = records(&s, from);
        let expect_first = from.max(1);
        assert_eq!(
            got.len() as u64,
            121u64.saturating_sub(expect_first),
            "from {from}"
        );
        if let Some(r) = got.first() {
            check_record(r, expect_first);
        }
        assert!(got.windows(2).all(|w| w[1].seq == w[0].seq + 1));
    }
}

#[test]
fn seek_by_time() {
    let dir = TempDir::new("seektime");
    let (mut s, _) = Stream::open(dir.path(), small()).unwrap();
    assert_eq!(s.seek_time(0).unwrap(), 1);
    fill(&mut s, 120);
    assert_eq!(s.seek_time(0).unwrap(), 1);
    for seq in 1..=120 {
        assert_eq!(s.seek_time(seq * 1000).unwrap(), seq);
        assert_eq!(s.seek_time(seq * 1000 - 1).unwrap(), seq);
    }
    assert_eq!(s.seek_time(120 * 1000 + 1).unwrap(), 121);
    // A clock stepping back: the timestamp is raised to the previous one.
    let seq = s.append("t", b"", b"late", 5).unwrap();
    assert_eq!(records(&s, seq)[0].timestamp, 120 * 1000);
}

#[test]
fn reopen_after_clean_close() {
    let dir = TempDir::new("reopen");
    let opts = Options {
        fsync: FsyncPolicy::Always,
        ..small()
    };
    let (mut s, _) = Stream::open(dir.path(), opts.clone()).unwrap();
    fill(&mut s, 300);
    let segments = s.segment_count();
    s.close().unwrap();

    let (mut s, rec) = Stream::open(dir.path(), opts.clone()).unwrap();
    assert_eq!(rec.truncated_bytes, 0);
    assert!(rec.corrupt_records.is_empty());
    assert!(rec.rebuilt_indexes.is_empty(), "{:?}", rec.rebuilt_indexes);
    assert_eq!((rec.segments, rec.records), (segments, 300));
    assert_eq!((s.first_seq(), s.last_seq(), s.len()), (1, 300, 300));
    fill(&mut s, 350);
    drop(s);

    let (s, _) = Stream::open(dir.path(), opts).unwrap();
    let all = records(&s, 1);
    assert_eq!(all.len(), 350);
    for (i, r) in all.iter().enumerate() {
        check_record(r, i as u64 + 1);
    }
}

#[test]
fn missing_or_damaged_indexes_are_rebuilt() {
    let dir = TempDir::new("index");
    let (mut s, _) = Stream::open(dir.path(), small()).unwrap();
    fill(&mut s, 200);
    drop(s);
    let logs = segment_files(dir.path());
    std::fs::remove_file(logs[0].with_extension("idx")).unwrap();
    let idx1 = logs[1].with_extension("idx");
    let mut bytes = std::fs::read(&idx1).unwrap();
    bytes[40] ^= 0xff;
    std::fs::write(&idx1, bytes).unwrap();
    std::fs::write(logs[2].with_extension("idx"), b"short").unwrap();

    let (s, rec) = Stream::open(dir.path(), small()).unwrap();
    assert_eq!(rec.rebuilt_indexes.len(), 3, "{:?}", rec.rebuilt_indexes);
    assert_eq!(s.len(), 200);
    for from in [1, 17, 60, 133, 200] {
        check_record(&records(&s, from)[0], from);
    }
    drop(s);
    let (_, rec) = Stream::open(dir.path(), small()).unwrap();
    assert!(rec.rebuilt_indexes.is_empty());
}

#[test]
fn retention_by_count_deletes_whole_segments() {
    let dir = TempDir::new("maxmsgs");
    let opts = Options {
        max_msgs: Some(100),
        ..small()
    };
    let (mut s, _) = Stream::open(dir.path(), opts).unwrap();
    fill(&mut s, 1000);
    // Whole segments only: at least 100 kept, and less than one segment more.
    assert!(s.len() >= 100, "{}", s.len());
    let per_segment = 2000 / record_len(1) + 1;
    assert!(s.len() < 100 + per_segment, "{}", s.len());
    assert_eq!(s.len(), s.last_seq() - s.first_seq() + 1);
    let all = records(&s, 0);
    assert_eq!(all.len() as u64, s.len());
    assert_eq!(all[0].seq, s.first_seq());
    assert_eq!(segment_files(dir.path()).len(), s.segment_count());
    assert!(segment_files(dir.path())[0].ends_with(format!("{:020}.log", s.first_seq())));
}

#[test]
fn retention_by_bytes_deletes_whole_segments() {
    let dir = TempDir::new("maxbytes");
    let opts = Options {
        max_bytes: Some(5000),
        ..small()
    };
    let (mut s, _) = Stream::open(dir.path(), opts).unwrap();
    fill(&mut s, 1000);
    assert!(
        s.bytes() >= 5000 && s.bytes() < 5000 + 2000 + 100,
        "{}",
        s.bytes()
    );
    assert_eq!(records(&s, 0).len() as u64, s.len());
}

#[test]
fn retention_by_age() {
    let dir = TempDir::new("maxage");
    let opts = Options {
        max_age: Some(Duration::from_nanos(50_000)),
        ..small()
    };
    let (mut s, _) = Stream::open(dir.path(), opts).unwrap();
    fill(&mut s, 300);
    assert_eq!(s.enforce_retention(0).unwrap(), 0);
    // Records older than 50 us at now = 200 ms-ish: everything before seq 150.
    let now = 200 * 1000;
    let deleted = s.enforce_retention(now).unwrap();
    assert!(deleted > 0);
    let first = s.first_seq();
    assert!(first <= 150, "kept {first}");
    assert!(
        150 - first < 2000 / record_len(1) + 1,
        "kept too much: {first}"
    );
    // Far in the future: everything but the active segment goes.
    s.enforce_retention(u64::MAX).unwrap();
    assert_eq!(s.segment_count(), 1);
    assert_eq!(records(&s, 0).len() as u64, s.len());
}

#[test]
fn purge_keeps_sequences_going() {
    let dir = TempDir::new("purge");
    let (mut s, _) = Stream::open(dir.path(), small()).unwrap();
    fill(&mut s, 100);
    assert_eq!(s.purge().unwrap(), 100);
    assert_eq!(
        (s.len(), s.bytes(), s.first_seq(), s.last_seq()),
        (0, 0, 101, 100)
    );
    assert!(records(&s, 0).is_empty());
    fill(&mut s, 110);
    assert_eq!(records(&s, 0).len(), 10);
    drop(s);
    let (s, _) = Stream::open(dir.path(), small()).unwrap();
    assert_eq!((s.first_seq(), s.last_seq()), (101, 110));
}

#[test]
fn large_records_and_tiny_segments() {
    let dir = TempDir::new("large");
    let (mut s, _) = Stream::open(dir.path(), small()).unwrap();
    let big: Vec<u8> = (0..700_000u32).map(|i| i as u8).collect();
    s.append("big", b"", &big, 1).unwrap();
    s.append("small", b"", b"x", 2).unwrap();
    s.append("big", b"", &big, 3).unwrap();
    let all = records(&s, 0);
    assert_eq!(all.len(), 3);
    assert_eq!(&all[2].payload[..], &big[..]);
    assert_eq!(&all[1].payload[..], b"x");
    assert!(matches!(
        s.append(&"x".repeat(70_000), b"", b"", 4),
        Err(StoreError::RecordTooLarge { .. })
    ));
}

/// Cuts the last segment at every byte offset within its last few records: recovery keeps
/// exactly the whole records before the cut and reports the rest as truncated.
#[test]
fn recovery_from_a_tail_torn_at_every_byte() {
    let dir = TempDir::new("torn");
    let opts = Options {
        segment_bytes: 100_000,
        ..small()
    };
    let (mut s, _) = Stream::open(dir.path(), opts.clone()).unwrap();
    fill(&mut s, 40);
    drop(s);
    let log = segment_files(dir.path()).pop().unwrap();
    let original = std::fs::read(&log).unwrap();
    // Record boundaries: ends[i] is where record i + 1 ends.
    let ends: Vec<u64> = (1..=40)
        .scan(0, |end, seq| {
            *end += record_len(seq);
            Some(*end)
        })
        .collect();
    assert_eq!(*ends.last().unwrap(), original.len() as u64);
    for cut in ends[35]..original.len() as u64 {
        std::fs::write(&log, &original[..cut as usize]).unwrap();
        let (mut s, rec) = Stream::open(dir.path(), opts.clone()).unwrap();
        let whole = ends.iter().filter(|&&e| e <= cut).count() as u64;
        let boundary = if whole == 0 {
            0
        } else {
            ends[whole as usize - 1]
        };
        assert_eq!(rec.truncated_bytes, cut - boundary, "cut {cut}");
        assert!(
            rec.corrupt_records.is_empty(),
            "cut {cut}: {:?}",
            rec.corrupt_records
        );
        assert_eq!((s.len(), s.last_seq()), (whole, whole), "cut {cut}");
        assert_eq!(std::fs::metadata(&log).unwrap().len(), boundary);
        // The next append continues the sequence on the cut-back tail.
        fill(&mut s, whole + 1);
        let all = records(&s, 0);
        assert_eq!(all.len() as u64, whole + 1, "cut {cut}");
        all.iter()
            .enumerate()
            .for_each(|(i, r)| check_record(r, i as u64 + 1));
    }
}

/// A flipped byte inside a record in the middle of the last segment: reported by recovery,
/// skipped by readers (who also report it), the rest still served.
#[test]
fn recovery_from_a_flipped_byte_in_the_last_segment() {
    let dir = TempDir::new("flip");
    let opts = Options {
        segment_bytes: 100_000,
        ..small()
    };
    let (mut s, _) = Stream::open(dir.path(), opts.clone()).unwrap();
    fill(&mut s, 40);
    drop(s);
    let log = segment_files(dir.path()).pop().unwrap();
    let original = std::fs::read(&log).unwrap();
    let start_of_20: u64 = (1..20).map(record_len).sum();
    // Every byte of record 20: magic, length, CRC, body.
    for i in 0..record_len(20) {
        let mut bytes = original.clone();
        bytes[(start_of_20 + i) as usize] ^= 0x10;
        std::fs::write(&log, &bytes).unwrap();
        let (mut s, rec) = Stream::open(dir.path(), opts.clone()).unwrap();
        assert_eq!(rec.truncated_bytes, 0, "byte {i}");
        assert_eq!(rec.corrupt_records.len(), 1, "byte {i}");
        let c = &rec.corrupt_records[0];
        assert_eq!((c.offset, c.len), (start_of_20, record_len(20)), "byte {i}");
        assert_eq!((s.len(), s.last_seq(), s.first_seq()), (39, 40, 1));
        let items = read_all(&s, 0);
        assert_eq!(items.len(), 40);
        assert!(
            matches!(items[19], Err(StoreError::Corrupt { offset, .. }) if offset == start_of_20)
        );
        let seqs: Vec<u64> = items
            .iter()
            .filter_map(|r| r.as_ref().ok())
            .map(|r| r.seq)
            .collect();
        assert_eq!(seqs, (1..=40).filter(|&q| q != 20).collect::<Vec<_>>());
        // Reading from the missing sequence reports the damage, then continues.
        let from20 = read_all(&s, 20);
        assert!(from20[0].is_err());
        assert_eq!(from20[1].as_ref().unwrap().seq, 21);
        assert!(read_all(&s, 21).iter().all(|r| r.is_ok()));
        // Appends continue after the last valid record.
        assert_eq!(s.append("t", b"", b"p", 1).unwrap(), 41);
    }
}

/// Damage in an older segment is found by readers (and by recovery with `verify_on_open`).
#[test]
fn a_flipped_byte_in_a_sealed_segment() {
    let dir = TempDir::new("flipsealed");
    let (mut s, _) = Stream::open(dir.path(), small()).unwrap();
    fill(&mut s, 200);
    drop(s);
    let first = segment_files(dir.path())[0].clone();
    let mut bytes = std::fs::read(&first).unwrap();
    let offset = record_len(1) + record_len(2);
    // In record 3's payload.
    bytes[(offset + record_len(3) - 2) as usize] ^= 1;
    std::fs::write(&first, &bytes).unwrap();

    let (s, rec) = Stream::open(dir.path(), small()).unwrap();
    assert!(rec.corrupt_records.is_empty(), "lazy: the index is trusted");
    let items = read_all(&s, 0);
    assert_eq!(items.len(), 200);
    assert!(
        matches!(&items[2], Err(StoreError::Corrupt { segment, offset: o, .. })
        if *segment == first && *o == offset)
    );
    assert_eq!(items.iter().filter(|r| r.is_err()).count(), 1);
    drop(s);

    let verify = Options {
        verify_on_open: true,
        ..small()
    };
    let (s, rec) = Stream::open(dir.path(), verify).unwrap();
    assert_eq!(rec.corrupt_records.len(), 1);
    assert_eq!(rec.corrupt_records[0].offset, offset);
    assert_eq!(s.len(), 199);
}

/// A damaged length field: the next record is found by searching forward.
#[test]
fn a_damaged_length_is_skipped_by_search() {
    let dir = TempDir::new("length");
    let opts = Options {
        segment_bytes: 100_000,
        ..small()
    };
    let (mut s, _) = Stream::open(dir.path(), opts.clone()).unwrap();
    fill(&mut s, 30);
    drop(s);
    let log = segment_files(dir.path()).pop().unwrap();
    let mut bytes = std::fs::read(&log).unwrap();
    let at: u64 = (1..10).map(record_len).sum();
    bytes[at as usize + 3] ^= 0x80; // length grows by 32 KiB: past the end of the file
    std::fs::write(&log, &bytes).unwrap();
    let (s, rec) = Stream::open(dir.path(), opts).unwrap();
    assert_eq!(rec.corrupt_records.len(), 1);
    assert_eq!(rec.corrupt_records[0].len, record_len(10));
    assert_eq!(s.len(), 29);
}

#[test]
fn a_full_disk_fails_the_append_and_keeps_what_was_stored() {
    let dir = TempDir::new("full");
    let opts = Options {
        max_disk_bytes: Some(5000),
        fsync: FsyncPolicy::Always,
        ..small()
    };
    let (mut s, _) = Stream::open(dir.path(), opts.clone()).unwrap();
    let mut stored = 0;
    let err = loop {
        let seq = s.next_seq();
        match s.append(&topic(seq), &headers(seq), &payload(seq), seq * 1000) {
            Ok(_) => stored = seq,
            Err(e) => break e,
        }
    };
    assert!(matches!(err, StoreError::DiskFull { .. }), "{err}");
    assert!(err.to_string().starts_with("no space left for"));
    assert!(s.bytes() <= 5000 && s.bytes() > 5000 - 200);
    let disk: u64 = segment_files(dir.path())
        .iter()
        .map(|p| std::fs::metadata(p).unwrap().len())
        .sum();
    assert_eq!(disk, s.bytes(), "the partial write was cut back");
    // A batch that does not fit is refused whole.
    let batch = [Append {
        topic: "t",
        headers: b"",
        payload: b"1",
        timestamp: 0,
    }; 100];
    assert!(matches!(
        s.append_batch(&batch),
        Err(StoreError::DiskFull { .. })
    ));
    assert_eq!(s.last_seq(), stored);
    let all = records(&s, 0);
    assert_eq!(all.len() as u64, stored);
    all.iter()
        .enumerate()
        .for_each(|(i, r)| check_record(r, i as u64 + 1));
    drop(s);
    let (mut s, rec) = Stream::open(dir.path(), opts).unwrap();
    assert_eq!((rec.truncated_bytes, rec.records), (0, stored));
    // Space freed, appends work again with the next sequence.
    s.purge().unwrap();
    assert_eq!(s.append("t", b"", b"again", 0).unwrap(), stored + 1);
}

#[test]
fn sync_bookkeeping() {
    let dir = TempDir::new("sync");
    let opts = Options {
        fsync: FsyncPolicy::Interval(Duration::ZERO),
        ..small()
    };
    let (mut s, _) = Stream::open(dir.path(), opts).unwrap();
    assert!(!s.needs_sync());
    s.append("t", b"", b"p", 0).unwrap();
    assert!(s.is_dirty() && s.needs_sync());
    s.sync().unwrap();
    assert!(!s.is_dirty() && !s.needs_sync());
    let (mut always, _) = Stream::open(
        dir.path().join("always"),
        Options {
            fsync: FsyncPolicy::Always,
            ..small()
        },
    )
    .unwrap();
    always.append("t", b"", b"p", 0).unwrap();
    assert!(!always.is_dirty() && !always.needs_sync());
}

#[test]
fn a_sync_made_away_from_the_stream_leaves_it_clean_only_if_nothing_came_after() {
    let dir = TempDir::new("pending-sync");
    let opts = Options {
        fsync: FsyncPolicy::Interval(Duration::ZERO),
        ..small()
    };
    let (mut s, _) = Stream::open(dir.path(), opts).unwrap();
    assert!(s.begin_sync().unwrap().is_none(), "nothing to sync");
    s.append("t", b"", b"one", 0).unwrap();
    let pending = s.begin_sync().unwrap().expect("dirty");
    // An append while the sync runs elsewhere: that sync does not cover it.
    s.append("t", b"", b"two", 0).unwrap();
    let result = pending.run();
    s.finish_sync(pending, result).unwrap();
    assert!(s.is_dirty());
    let pending = s.begin_sync().unwrap().expect("still dirty");
    let result = pending.run();
    s.finish_sync(pending, result).unwrap();
    assert!(!s.is_dirty() && !s.needs_sync());
    // A failed sync poisons the stream.
    s.append("t", b"", b"three", 0).unwrap();
    let pending = s.begin_sync().unwrap().unwrap();
    assert!(
        s.finish_sync(pending, Err(std::io::Error::other("EIO")))
            .is_err()
    );
    assert!(matches!(
        s.append("t", b"", b"x", 0),
        Err(StoreError::Poisoned)
    ));
}

#[test]
fn invalid_options_are_refused() {
    let dir = TempDir::new("invalid");
    let bad = Options {
        segment_bytes: 0,
        ..Options::default()
    };
    assert!(matches!(
        Stream::open(dir.path(), bad),
        Err(StoreError::InvalidOptions(_))
    ));
}

/// A segment many read chunks long, read whole, from the middle, and after reopening.
#[test]
fn a_segment_longer_than_many_read_chunks() {
    let dir = TempDir::new("long");
    let opts = Options {
        fsync: FsyncPolicy::Never,
        ..Options::default()
    };
    let (mut s, _) = Stream::open(dir.path(), opts.clone()).unwrap();
    fill(&mut s, 30_000);
    assert_eq!(s.segment_count(), 1);
    assert!(s.bytes() > 6 * (256 << 10), "{}", s.bytes());
    let all = records(&s, 0);
    assert_eq!(all.len(), 30_000);
    all.iter()
        .enumerate()
        .for_each(|(i, r)| check_record(r, i as u64 + 1));
    check_record(&records(&s, 17_777)[0], 17_777);
    assert_eq!(s.seek_time(23_456 * 1000).unwrap(), 23_456);
    drop(s);
    let (s, rec) = Stream::open(dir.path(), opts).unwrap();
    assert_eq!((rec.records, rec.truncated_bytes), (30_000, 0));
    assert_eq!(records(&s, 29_990).len(), 11);
}
