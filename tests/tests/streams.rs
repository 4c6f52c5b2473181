//! Durable streams end to end, over raw frames as `docs/protocol.md` section 8 lays them out:
//! capture and `STORED`, replay from every start position with no seam to live delivery,
//! duplicate suppression, restarts, recovery of damaged segments, runtime management, and a
//! replay that waits for a slow subscriber instead of dropping.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use brokerd_proto::streams::{Fsync, StreamAnswer, StreamConfig};
use brokerd_proto::{
    Body, ErrorCode, Frame, Headers, Msg, Publish, StartPosition, Stored, StreamStart, Subscribe,
};
use brokerd_tests::{RawConn, Rng, TempDir, TestBroker};
use std::path::Path;

fn orders(fsync: Fsync) -> StreamConfig {
    StreamConfig {
        name: "ORDERS".into(),
        filters: vec!["order.>".into(), "payment.*".into()],
        fsync,
        ..StreamConfig::default()
    }
}

async fn broker(dir: &Path, streams: Vec<StreamConfig>) -> TestBroker {
    let dir = dir.to_path_buf();
    TestBroker::with_config(move |c| {
        c.data_dir = dir;
        c.streams = streams;
    })
    .await
}

fn publish(req_id: u32, ack: bool, topic: &str, payload: &[u8], msg_id: Option<&str>) -> Frame {
    let headers = msg_id.map(|id| {
        let mut h = Headers::new();
        h.insert("Brokerd-Msg-Id", id);
        h
    });
    Frame::Pub(Publish {
        req_id,
        ack,
        body: Body::parse(Body::encode(topic, None, headers.as_ref(), payload)).unwrap(),
    })
}

fn replay(req_id: u32, sid: u32, filter: &str, stream: &str, start: StartPosition) -> Frame {
    Frame::Sub(Subscribe {
        req_id,
        sid,
        filter: filter.into(),
        queue: None,
        stream: Some(StreamStart {
            stream: stream.into(),
            start,
            consumer: None,
        }),
    })
}

async fn expect_stored(c: &mut RawConn) -> Stored {
    match c.recv().await {
        Some(Frame::Stored(s)) => s,
        other => panic!("expected STORED, got {other:?}"),
    }
}

/// The next `n` messages: (sid, stream sequence, payload).
async fn msgs(c: &mut RawConn, n: usize) -> Vec<(u32, u64, Vec<u8>)> {
    let mut out = Vec::new();
    while out.len() < n {
        match c.recv().await {
            Some(Frame::Msg(Msg { sid, seq, body })) => {
                out.push((sid, seq, body.payload().to_vec()))
            }
            other => panic!("expected MSG, got {other:?} after {} messages", out.len()),
        }
    }
    out
}

/// Publishes `n` acked messages `order.created` with payloads `from..from+n` and returns their
/// sequences.
async fn publish_n(c: &mut RawConn, from: u32, n: u32) -> Vec<u64> {
    for i in from..from + n {
        c.send(&publish(
            i,
            true,
            "order.created",
            i.to_string().as_bytes(),
            None,
        ))
        .await;
    }
    let mut seqs = Vec::new();
    for _ in 0..n {
        seqs.push(expect_stored(c).await.seq);
    }
    seqs
}

#[tokio::test]
async fn acked_publishes_are_stored_in_order_and_still_routed_live() {
    let dir = TempDir::new("streams-store");
    let b = broker(&dir.0, vec![orders(Fsync::Always)]).await;
    let mut live = b.raw("live").await;
    live.send_bytes(&brokerd_tests::wire::sub(1, 9, "order.>"))
        .await;
    assert_eq!(live.recv().await, Some(Frame::Ok(1)));
    let mut p = b.raw("publisher").await;
    p.send(&publish(7, true, "order.created", b"{\"id\":1}", None))
        .await;
    let s = expect_stored(&mut p).await;
    assert_eq!(
        s,
        Stored {
            req_id: 7,
            delivered: 1,
            seq: 1,
            duplicate: false,
            stream: "ORDERS".into()
        }
    );
    assert_eq!(
        publish_n(&mut p, 100, 50).await,
        (2..=51).collect::<Vec<_>>()
    );
    // Live delivery is unchanged: per-subscription sequences.
    let got = msgs(&mut live, 51).await;
    assert_eq!(got[0], (9, 1, b"{\"id\":1}".to_vec()));
    assert_eq!(got[50].1, 51);
    // A topic no stream captures still gets a plain ACK.
    p.send(&publish(8, true, "user.created", b"x", None)).await;
    assert_eq!(
        p.recv().await,
        Some(Frame::Ack {
            req_id: 8,
            delivered: 0
        })
    );
    b.stop().await;
}

#[tokio::test]
async fn a_replay_starts_where_asked_and_continues_live_without_a_seam() {
    let dir = TempDir::new("streams-replay");
    let b = broker(&dir.0, vec![orders(Fsync::Interval)]).await;
    let mut p = b.raw("publisher").await;
    publish_n(&mut p, 1, 20).await;
    let mut c = b.raw("reader").await;
    for (sid, start, first) in [
        (1, StartPosition::All, 1),
        (2, StartPosition::FromSeq(15), 15),
        (3, StartPosition::Last(3), 18),
        (4, StartPosition::FromSeq(0), 1),
    ] {
        c.send(&replay(sid, sid, ">", "ORDERS", start)).await;
        assert_eq!(c.recv().await, Some(Frame::Ok(sid)));
        let n = (21 - first) as usize;
        let got = msgs(&mut c, n).await;
        let seqs: Vec<u64> = got.iter().map(|m| m.1).collect();
        assert_eq!(seqs, (first..=20).collect::<Vec<_>>(), "{start:?}");
        assert!(got.iter().all(|m| m.0 == sid));
        assert_eq!(
            got[0].2,
            first.to_string().into_bytes(),
            "payload of seq {first}"
        );
    }
    // New: nothing old, then whatever is stored after the OK.
    c.send(&replay(5, 5, ">", "ORDERS", StartPosition::New))
        .await;
    assert_eq!(c.recv().await, Some(Frame::Ok(5)));
    publish_n(&mut p, 21, 2).await;
    // Every live replay subscription (1 to 5) gets seq 21 and 22.
    let got = msgs(&mut c, 10).await;
    for sid in 1..=5 {
        let mine: Vec<u64> = got.iter().filter(|m| m.0 == sid).map(|m| m.1).collect();
        assert_eq!(mine, vec![21, 22], "sid {sid}");
    }
    // A filter narrower than the stream: only its topics, gaps in seq are other topics.
    p.send(&publish(900, true, "payment.completed", b"paid", None))
        .await;
    assert_eq!(expect_stored(&mut p).await.seq, 23);
    let mut d = b.raw("narrow").await;
    d.send(&replay(1, 1, "payment.*", "ORDERS", StartPosition::All))
        .await;
    assert_eq!(d.recv().await, Some(Frame::Ok(1)));
    assert_eq!(msgs(&mut d, 1).await, vec![(1, 23, b"paid".to_vec())]);
    // From a time: everything stored at or after it.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    publish_n(&mut p, 24, 1).await;
    d.send(&replay(2, 2, ">", "ORDERS", StartPosition::FromTime(now)))
        .await;
    assert_eq!(d.recv().await, Some(Frame::Ok(2)));
    assert_eq!(msgs(&mut d, 1).await[0].1, 24);
    b.stop().await;
}

#[tokio::test]
async fn replay_errors_are_reported_and_the_connection_stays() {
    let dir = TempDir::new("streams-errors");
    let b = broker(&dir.0, vec![orders(Fsync::Never)]).await;
    let mut c = b.raw("c").await;
    c.send(&replay(1, 1, ">", "NOPE", StartPosition::All)).await;
    let e = c.expect_err().await;
    assert_eq!((e.req_id, e.code), (1, ErrorCode::NoSuchStream as u16));
    let mut grouped = replay(2, 2, ">", "ORDERS", StartPosition::All);
    if let Frame::Sub(s) = &mut grouped {
        s.queue = Some("workers".into());
    }
    c.send(&grouped).await;
    assert_eq!(c.expect_err().await.code, ErrorCode::InvalidFilter as u16);
    c.send(&replay(3, 3, "a..b", "ORDERS", StartPosition::All))
        .await;
    assert_eq!(c.expect_err().await.code, ErrorCode::InvalidFilter as u16);
    // The sid is taken like any other.
    c.send(&replay(4, 4, ">", "ORDERS", StartPosition::New))
        .await;
    assert_eq!(c.recv().await, Some(Frame::Ok(4)));
    c.send_bytes(&brokerd_tests::wire::sub(5, 4, "x")).await;
    assert_eq!(
        c.expect_err().await.code,
        ErrorCode::DuplicateSubscription as u16
    );
    // A replay is checked like any SUB before its stream is looked up, so a request that fails
    // those checks learns nothing about which streams exist.
    c.send(&replay(7, 7, "a..b", "NOPE", StartPosition::All))
        .await;
    assert_eq!(c.expect_err().await.code, ErrorCode::InvalidFilter as u16);
    c.send(&replay(8, 4, ">", "NOPE", StartPosition::All)).await;
    assert_eq!(
        c.expect_err().await.code,
        ErrorCode::DuplicateSubscription as u16
    );
    // The sid of a replay refused for its stream is free again.
    c.send_bytes(&brokerd_tests::wire::sub(9, 1, "x")).await;
    assert_eq!(c.recv().await, Some(Frame::Ok(9)));
    // UNSUB ends it: nothing more arrives for sid 4.
    c.send_bytes(&brokerd_tests::wire::unsub(6, 4, 0)).await;
    assert_eq!(c.recv().await, Some(Frame::Ok(6)));
    let mut p = b.raw("p").await;
    publish_n(&mut p, 1, 3).await;
    c.send_bytes(&brokerd_tests::wire::ping(77)).await;
    assert_eq!(c.recv().await, Some(Frame::Pong(77)));
    b.stop().await;
}

#[tokio::test]
async fn the_seam_between_replay_and_live_holds_under_concurrent_publishing() {
    let runs = brokerd_tests::scale("BROKERD_SEAM_RUNS", 100);
    let per_run = 200u32;
    let dir = TempDir::new("streams-seam");
    let b = broker(&dir.0, vec![orders(Fsync::Never)]).await;
    let mut rng = Rng::new(0x5ea1);
    let mut p = b.raw("publisher").await;
    let mut c = b.raw("reader").await;
    let mut stored_before = 0u64;
    for run in 0..runs {
        let at = rng.below(per_run as usize) as u32;
        // Publish without waiting, and subscribe somewhere in the middle of the burst.
        for i in 0..per_run {
            if i == at {
                let sid = run as u32 + 1;
                c.send(&replay(
                    sid,
                    sid,
                    ">",
                    "ORDERS",
                    StartPosition::FromSeq(stored_before + 1),
                ))
                .await;
            }
            p.send(&publish(
                i + 1,
                false,
                "order.created",
                &i.to_be_bytes(),
                None,
            ))
            .await;
        }
        let sid = run as u32 + 1;
        let mut seqs = Vec::new();
        while seqs.len() < per_run as usize {
            match c.recv().await {
                Some(Frame::Ok(id)) => assert_eq!(id, sid),
                Some(Frame::Msg(m)) => {
                    assert_eq!(m.sid, sid);
                    seqs.push(m.seq);
                }
                other => panic!("run {run}: unexpected {other:?}"),
            }
        }
        let want: Vec<u64> = (stored_before + 1..=stored_before + u64::from(per_run)).collect();
        assert_eq!(seqs, want, "run {run}: a gap or a duplicate at the seam");
        c.send_bytes(&brokerd_tests::wire::unsub(1_000_000 + sid, sid, 0))
            .await;
        assert_eq!(c.recv().await, Some(Frame::Ok(1_000_000 + sid)));
        stored_before += u64::from(per_run);
    }
    b.stop().await;
}

#[tokio::test]
async fn duplicate_message_ids_are_stored_once_even_across_a_restart() {
    let dir = TempDir::new("streams-dedupe");
    let b = broker(&dir.0, vec![orders(Fsync::Always)]).await;
    let mut live = b.raw("live").await;
    live.send_bytes(&brokerd_tests::wire::sub(1, 1, "order.>"))
        .await;
    assert_eq!(live.recv().await, Some(Frame::Ok(1)));
    let mut p = b.raw("p").await;
    p.send(&publish(1, true, "order.created", b"a", Some("order-1")))
        .await;
    assert_eq!(expect_stored(&mut p).await.seq, 1);
    p.send(&publish(
        2,
        true,
        "order.created",
        b"a again",
        Some("order-1"),
    ))
    .await;
    let dup = expect_stored(&mut p).await;
    assert_eq!(
        (dup.req_id, dup.seq, dup.duplicate, dup.delivered),
        (2, 1, true, 0)
    );
    p.send(&publish(3, true, "order.created", b"b", Some("order-2")))
        .await;
    assert_eq!(expect_stored(&mut p).await.seq, 2);
    // The live subscriber saw each message once.
    let got = msgs(&mut live, 2).await;
    assert_eq!(
        got.iter().map(|m| m.2.clone()).collect::<Vec<_>>(),
        vec![b"a".to_vec(), b"b".to_vec()]
    );
    b.stop().await;
    let b = broker(&dir.0, vec![orders(Fsync::Always)]).await;
    let mut p = b.raw("p").await;
    p.send(&publish(
        4,
        true,
        "order.created",
        b"retry",
        Some("order-2"),
    ))
    .await;
    let dup = expect_stored(&mut p).await;
    assert_eq!((dup.seq, dup.duplicate), (2, true));
    p.send(&publish(5, true, "order.created", b"c", Some("order-3")))
        .await;
    assert_eq!(expect_stored(&mut p).await.seq, 3);
    b.stop().await;
}

#[tokio::test]
async fn a_restarted_broker_replays_everything_and_continues_the_sequence() {
    let dir = TempDir::new("streams-restart");
    let b = broker(&dir.0, vec![orders(Fsync::Interval)]).await;
    let mut p = b.raw("p").await;
    publish_n(&mut p, 1, 300).await;
    b.stop().await;
    let b = broker(&dir.0, vec![orders(Fsync::Interval)]).await;
    let mut p = b.raw("p").await;
    assert_eq!(publish_n(&mut p, 301, 1).await, vec![301]);
    let mut c = b.raw("c").await;
    c.send(&replay(1, 1, "order.*", "ORDERS", StartPosition::All))
        .await;
    assert_eq!(c.recv().await, Some(Frame::Ok(1)));
    let got = msgs(&mut c, 301).await;
    for (i, m) in got.iter().enumerate() {
        assert_eq!(m.1, i as u64 + 1);
        assert_eq!(m.2, (i + 1).to_string().into_bytes());
    }
    b.stop().await;
}

/// Segment files of the stream in `dir`, oldest first.
fn segments(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut v: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "log"))
        .collect();
    v.sort();
    v
}

#[tokio::test]
async fn a_torn_tail_and_a_flipped_byte_are_recovered_and_the_rest_served() {
    let dir = TempDir::new("streams-damage");
    // Small segments: the damage lands in a sealed segment and in the active one's tail.
    let config = StreamConfig {
        segment_bytes: 8 * 1024,
        ..orders(Fsync::Always)
    };
    let b = broker(&dir.0, vec![config.clone()]).await;
    let mut p = b.raw("p").await;
    // In rounds: a batch is never split across segments.
    for round in 0..20 {
        publish_n(&mut p, round * 20 + 1, 20).await;
    }
    b.stop().await;
    let stream_dir = dir.0.join("ORDERS");
    let segs = segments(&stream_dir);
    assert!(segs.len() >= 3, "{} segments", segs.len());
    // A flipped byte in the middle of the first segment.
    let mut first = std::fs::read(&segs[0]).unwrap();
    let mid = first.len() / 2;
    first[mid] ^= 0x5a;
    std::fs::write(&segs[0], &first).unwrap();
    // The active segment cut at an arbitrary byte inside its last record.
    let last = segs.last().unwrap();
    let len = std::fs::metadata(last).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(last)
        .unwrap()
        .set_len(len - 7)
        .unwrap();
    let b = broker(&dir.0, vec![config]).await;
    let mut c = b.raw("c").await;
    c.send(&replay(1, 1, ">", "ORDERS", StartPosition::All))
        .await;
    assert_eq!(c.recv().await, Some(Frame::Ok(1)));
    // Everything but the corrupt record(s) and the torn last one, in order, payloads intact.
    let mut seqs = Vec::new();
    loop {
        c.send_bytes(&brokerd_tests::wire::ping(5)).await;
        let mut done = false;
        while let Some(f) = c.recv().await {
            match f {
                Frame::Msg(m) => {
                    assert_eq!(m.body.payload().to_vec(), m.seq.to_string().into_bytes());
                    seqs.push(m.seq);
                }
                Frame::Pong(_) => {
                    done = true;
                    break;
                }
                other => panic!("unexpected {other:?}"),
            }
        }
        if done && seqs.last() == Some(&399) {
            break;
        }
        assert!(done);
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "in order");
    let missing = 399 - seqs.len();
    assert!(
        (1..=3).contains(&missing),
        "{missing} records lost to one flipped byte"
    );
    // The stream goes on after the torn record: the next publish gets 400 again.
    let mut p = b.raw("p").await;
    assert_eq!(publish_n(&mut p, 400, 1).await, vec![400]);
    b.stop().await;
}

async fn request(c: &mut RawConn, req_id: u32, op: &str, json: &str) -> StreamAnswer {
    let inbox = format!("_INBOX.test.{req_id}");
    c.send_bytes(&brokerd_tests::wire::sub(req_id, req_id, &inbox))
        .await;
    assert_eq!(c.recv().await, Some(Frame::Ok(req_id)));
    let body = Body::encode(
        &format!("$SYS.req.stream.{op}"),
        Some(&inbox),
        None,
        json.as_bytes(),
    );
    c.send(&Frame::Pub(Publish {
        req_id,
        ack: false,
        body: Body::parse(body).unwrap(),
    }))
    .await;
    let m = msgs(c, 1).await.remove(0);
    serde_json::from_slice(&m.2).unwrap()
}

#[tokio::test]
async fn streams_are_managed_at_runtime_and_their_definitions_survive_a_restart() {
    let dir = TempDir::new("streams-admin");
    let b = broker(&dir.0, vec![orders(Fsync::Interval)]).await;
    let mut c = b.raw("admin").await;
    let a = request(
        &mut c,
        1,
        "add",
        r#"{"name":"EVENTS","filters":["user.>"],"fsync":"always"}"#,
    )
    .await;
    assert_eq!(a.error, None);
    assert_eq!(a.stream.unwrap().config.fsync, Fsync::Always);
    let overlap = request(
        &mut c,
        2,
        "add",
        r#"{"name":"X","filters":["order.created"]}"#,
    )
    .await;
    assert!(overlap.error.unwrap().contains("overlaps"));
    let bad = request(
        &mut c,
        3,
        "add",
        r#"{"name":"Y","filters":["a"],"unknown":1}"#,
    )
    .await;
    assert!(bad.error.is_some());
    let mut p = b.raw("p").await;
    p.send(&publish(1, true, "user.created", b"u", None)).await;
    assert_eq!(expect_stored(&mut p).await.stream, "EVENTS");
    let list = request(&mut c, 4, "list", "{}").await;
    let names: Vec<_> = list.streams.iter().map(|s| s.config.name.clone()).collect();
    assert_eq!(names, vec!["ORDERS", "EVENTS"]);
    let info = request(&mut c, 5, "info", r#"{"name":"EVENTS"}"#)
        .await
        .stream
        .unwrap();
    assert_eq!(
        (info.msgs, info.last_seq, info.source.as_str()),
        (1, 1, "api")
    );
    assert_eq!((info.stored, info.batches), (1, 1));
    let purge = request(&mut c, 6, "purge", r#"{"name":"EVENTS"}"#).await;
    assert_eq!(purge.purged, 1);
    assert_eq!(purge.stream.unwrap().msgs, 0);
    let refused = request(&mut c, 7, "delete", r#"{"name":"ORDERS"}"#).await;
    assert!(refused.error.unwrap().contains("configuration"));
    b.stop().await;
    // EVENTS comes back from its stored definition; sequences continue after the purge.
    let b = broker(&dir.0, vec![orders(Fsync::Interval)]).await;
    let mut c = b.raw("admin").await;
    let mut p = b.raw("p").await;
    p.send(&publish(1, true, "user.created", b"u2", None)).await;
    let s = expect_stored(&mut p).await;
    assert_eq!((s.stream.as_str(), s.seq), ("EVENTS", 2));
    let del = request(&mut c, 8, "delete", r#"{"name":"EVENTS"}"#).await;
    assert!(del.deleted, "{del:?}");
    assert!(!dir.0.join("EVENTS").exists());
    p.send(&publish(2, true, "user.created", b"u3", None)).await;
    assert_eq!(
        p.recv().await,
        Some(Frame::Ack {
            req_id: 2,
            delivered: 0
        })
    );
    let missing = request(&mut c, 9, "info", r#"{"name":"EVENTS"}"#).await;
    assert!(missing.error.unwrap().contains("no stream"));
    b.stop().await;
}

#[tokio::test]
async fn a_replay_waits_for_a_slow_subscriber_and_loses_nothing() {
    let dir = TempDir::new("streams-slow");
    let b = TestBroker::with_config({
        let dir = dir.0.clone();
        move |c| {
            c.data_dir = dir;
            c.streams = vec![orders(Fsync::Never)];
            // A small outbound queue: the replay fills it many times over.
            c.outbound.max_pending_msgs = 64;
        }
    })
    .await;
    let mut p = b.raw("p").await;
    let n = 5_000u32;
    let payload = vec![7u8; 512];
    for i in 0..n {
        p.send(&publish(i + 1, false, "order.created", &payload, None))
            .await;
    }
    p.send_bytes(&brokerd_tests::wire::ping(1)).await;
    assert_eq!(p.recv().await, Some(Frame::Pong(1)));
    let mut c = b.raw("slow").await;
    c.send(&replay(1, 1, ">", "ORDERS", StartPosition::All))
        .await;
    assert_eq!(c.recv().await, Some(Frame::Ok(1)));
    let mut next = 1u64;
    while next <= u64::from(n) {
        match c.recv().await {
            Some(Frame::Msg(m)) => {
                assert_eq!(m.seq, next, "no gap");
                next += 1;
                if next.is_multiple_of(500) {
                    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                }
            }
            other => panic!("unexpected {other:?} (a LOST would be a drop)"),
        }
    }
    b.stop().await;
}

#[tokio::test]
async fn replays_that_never_read_hold_only_the_stored_bound_and_live_subscribers_lose_nothing() {
    use brokerd_core::outbox::{STORED_MAX_BYTES, STORED_MAX_MSGS};
    const REPLAYERS: usize = 4;
    const BUDGET: usize = 32 << 20;
    let dir = TempDir::new("streams-stalled-replays");
    let b = TestBroker::with_config({
        let dir = dir.0.clone();
        move |c| {
            c.data_dir = dir;
            c.streams = vec![orders(Fsync::Never)];
            // Each replay held its whole stream (12 MiB here) under the client's 64 MiB limit,
            // which put four of them over this budget and shed the live subscriber.
            c.limits.max_memory = BUDGET;
            // The replayers never read: they must not be closed before the test is done.
            c.outbound.write_deadline = std::time::Duration::from_secs(120);
        }
    })
    .await;
    let payload = vec![7u8; 4096];
    let mut p = b.raw("p").await;
    for i in 0..3_000u32 {
        p.send(&publish(i + 1, false, "order.created", &payload, None))
            .await;
    }
    p.send_bytes(&brokerd_tests::wire::ping(1)).await;
    assert_eq!(p.recv().await, Some(Frame::Pong(1)));
    let mut live = b.raw("live").await;
    live.send_bytes(&brokerd_tests::wire::sub(1, 1, "order.>"))
        .await;
    assert_eq!(live.recv().await, Some(Frame::Ok(1)));
    let mut replayers = Vec::new();
    for i in 0..REPLAYERS {
        let name = format!("replayer-{i}");
        let mut r = RawConn::connect_with_receive_buffer(b.addr, 64 * 1024)
            .await
            .hello(&name, 0)
            .await;
        r.send(&replay(2, 1, ">", "ORDERS", StartPosition::All))
            .await;
        assert_eq!(r.recv().await, Some(Frame::Ok(2)));
        replayers.push(r);
    }
    let stalled = |b: &TestBroker| {
        b.broker
            .clients()
            .into_iter()
            .filter(|c| c.name.starts_with("replayer-"))
            .map(|c| c.outbox.stats())
            .collect::<Vec<_>>()
    };
    let within_bound = |b: &TestBroker| {
        for st in stalled(b) {
            assert!(
                st.pending_bytes <= STORED_MAX_BYTES && st.pending_msgs <= STORED_MAX_MSGS,
                "a replay that does not read holds {} messages, {} bytes",
                st.pending_msgs,
                st.pending_bytes
            );
        }
    };
    // Each replay fills its subscriber's queue up to the bound and waits there.
    brokerd_tests::wait_until("every replayer's queue filled", || {
        let st = stalled(&b);
        st.len() == REPLAYERS && st.iter().all(|s| s.pending_bytes >= STORED_MAX_BYTES / 2)
    })
    .await;
    within_bound(&b);
    // Live traffic goes on meanwhile: the subscriber reading it loses nothing.
    let more = 2_000u32;
    for i in 0..more {
        p.send(&publish(10_000 + i, false, "order.created", &payload, None))
            .await;
    }
    let mut got = 0u32;
    while got < more {
        match live.recv().await {
            Some(Frame::Msg(m)) => {
                got += 1;
                assert_eq!(m.seq, u64::from(got), "no gap");
                if got.is_multiple_of(500) {
                    within_bound(&b);
                }
            }
            other => panic!("unexpected {other:?} after {got} messages (a LOST is a drop)"),
        }
    }
    within_bound(&b);
    let used = b.broker.memory().used();
    assert!(used < BUDGET, "{used} bytes charged of {BUDGET}");
    let live_stats = b
        .broker
        .clients()
        .into_iter()
        .find(|c| c.name == "live")
        .map(|c| c.outbox.stats())
        .unwrap();
    assert_eq!(live_stats.dropped, 0);
    drop(replayers);
    b.stop().await;
}

#[tokio::test]
async fn a_last_value_stream_keeps_the_newest_of_each_topic_and_reclaims_the_rest() {
    let dir = TempDir::new("streams-last-value");
    let config = StreamConfig {
        name: "DEVICES".into(),
        filters: vec!["device.*.state".into()],
        max_msgs_per_topic: 1,
        segment_bytes: 4096,
        fsync: Fsync::Never,
        ..StreamConfig::default()
    };
    let b = broker(&dir.0, vec![config.clone(), orders(Fsync::Never)]).await;
    let mut p = b.raw("p").await;
    // 3 devices, 200 updates each, interleaved: the payload is "<device>:<round>".
    let mut req = 0;
    for round in 0..200 {
        for device in 1..=3 {
            req += 1;
            let topic = format!("device.{device}.state");
            p.send(&publish(
                req,
                true,
                &topic,
                format!("{device}:{round}").as_bytes(),
                None,
            ))
            .await;
        }
    }
    for _ in 0..req {
        expect_stored(&mut p).await;
    }
    let mut c = b.raw("c").await;
    // From the start: only what is still kept, the newest of each device.
    c.send(&replay(1, 1, ">", "DEVICES", StartPosition::All))
        .await;
    assert_eq!(c.recv().await, Some(Frame::Ok(1)));
    let got = msgs(&mut c, 3).await;
    let payloads: Vec<Vec<u8>> = got.iter().map(|m| m.2.clone()).collect();
    assert_eq!(
        payloads,
        vec![b"1:199".to_vec(), b"2:199".to_vec(), b"3:199".to_vec()]
    );
    assert_eq!(
        got.iter().map(|m| m.1).collect::<Vec<_>>(),
        vec![598, 599, 600]
    );
    // The newest of each topic, then live.
    c.send(&replay(2, 2, ">", "DEVICES", StartPosition::LastPerTopic))
        .await;
    assert_eq!(c.recv().await, Some(Frame::Ok(2)));
    let got = msgs(&mut c, 3).await;
    assert_eq!(
        got.iter().map(|m| (m.0, m.1)).collect::<Vec<_>>(),
        vec![(2, 598), (2, 599), (2, 600)]
    );
    p.send(&publish(10_000, true, "device.2.state", b"2:live", None))
        .await;
    assert_eq!(expect_stored(&mut p).await.seq, 601);
    let live = msgs(&mut c, 2).await;
    assert!(live.iter().all(|m| m.1 == 601 && m.2 == b"2:live"));
    // Replaced messages' segments are reclaimed (retention runs once a second).
    let mut admin = b.raw("admin").await;
    let mut info = request(&mut admin, 100, "info", r#"{"name":"DEVICES"}"#)
        .await
        .stream
        .unwrap();
    for n in 0..40 {
        if info.segments <= 3 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        info = request(&mut admin, 101 + n, "info", r#"{"name":"DEVICES"}"#)
            .await
            .stream
            .unwrap();
    }
    assert!(info.segments <= 3, "{info:?}");
    assert_eq!((info.topics, info.kept), (3, 3));
    // Not on a stream without the per-topic limit.
    c.send(&replay(3, 3, ">", "ORDERS", StartPosition::LastPerTopic))
        .await;
    assert_eq!(c.expect_err().await.code, ErrorCode::InvalidStart as u16);
    b.stop().await;
    // The index is read back at start-up.
    let b = broker(&dir.0, vec![config, orders(Fsync::Never)]).await;
    let mut c = b.raw("c").await;
    c.send(&replay(1, 1, ">", "DEVICES", StartPosition::LastPerTopic))
        .await;
    assert_eq!(c.recv().await, Some(Frame::Ok(1)));
    let got = msgs(&mut c, 3).await;
    assert_eq!(
        got.iter().map(|m| m.1).collect::<Vec<_>>(),
        vec![598, 600, 601]
    );
    b.stop().await;
}

/// Copies a stream directory as `docs/operations.md` ("Backup") says: the definition, then the
/// segment and index files in name order, while the broker writes to it.
fn copy_stream(from: &Path, to: &Path) -> usize {
    std::fs::create_dir_all(to).unwrap();
    std::fs::copy(from.join("stream.json"), to.join("stream.json")).unwrap();
    let mut names: Vec<_> = std::fs::read_dir(from)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .filter(|n| n.to_string_lossy().ends_with(".log") || n.to_string_lossy().ends_with(".idx"))
        .collect();
    names.sort();
    for n in &names {
        std::fs::copy(from.join(n), to.join(n)).unwrap();
    }
    names.len()
}

#[tokio::test]
async fn a_stream_copied_while_it_is_written_opens_as_a_consistent_prefix() {
    let dir = TempDir::new("streams-backup");
    let config = StreamConfig {
        segment_bytes: 16 * 1024,
        ..orders(Fsync::Never)
    };
    let b = broker(&dir.0, vec![config.clone()]).await;
    let mut p = b.raw("p").await;
    publish_n(&mut p, 1, 200).await;
    let writer = tokio::spawn(async move {
        for round in 0..40u32 {
            publish_n(&mut p, 201 + round * 50, 50).await;
        }
        p
    });
    // Copy while the writer runs.
    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    let copy = TempDir::new("streams-backup-copy");
    let files = tokio::task::spawn_blocking({
        let (from, to) = (dir.0.join("ORDERS"), copy.0.join("ORDERS"));
        move || copy_stream(&from, &to)
    })
    .await
    .unwrap();
    let _p = writer.await.unwrap();
    b.stop().await;
    assert!(files >= 2);
    let restored = broker(&copy.0, vec![config]).await;
    let mut c = restored.raw("c").await;
    let mut admin = restored.raw("admin").await;
    let info = request(&mut admin, 1, "info", r#"{"name":"ORDERS"}"#)
        .await
        .stream
        .unwrap();
    assert!(
        info.last_seq >= 200,
        "the copy holds at least what was stored before it began"
    );
    c.send(&replay(1, 1, ">", "ORDERS", StartPosition::All))
        .await;
    assert_eq!(c.recv().await, Some(Frame::Ok(1)));
    let got = msgs(&mut c, info.last_seq as usize).await;
    for (i, m) in got.iter().enumerate() {
        assert_eq!(m.1, i as u64 + 1, "contiguous from 1");
        assert_eq!(m.2, (i + 1).to_string().into_bytes(), "intact");
    }
    restored.stop().await;
}

#[tokio::test]
async fn retention_by_count_bytes_and_age_drops_the_oldest_segments() {
    let dir = TempDir::new("streams-retention");
    let small = |name: &str, filter: &str| StreamConfig {
        name: name.into(),
        filters: vec![filter.into()],
        segment_bytes: 4096,
        fsync: Fsync::Never,
        ..StreamConfig::default()
    };
    let streams = vec![
        StreamConfig {
            max_msgs: 100,
            ..small("BYCOUNT", "count.>")
        },
        StreamConfig {
            max_bytes: 16 * 1024,
            ..small("BYBYTES", "bytes.>")
        },
        StreamConfig {
            max_age_s: 1,
            ..small("BYAGE", "age.>")
        },
    ];
    let b = broker(&dir.0, streams).await;
    let mut p = b.raw("p").await;
    let payload = [b'x'; 100];
    let mut req = 0;
    for topic in ["count.a", "bytes.a", "age.a"] {
        for i in 0..1_000 {
            req += 1;
            // Every tenth asks for its STORED and waits for it, so that the writer's batches,
            // and with them the segments, stay small however busy the machine is: a segment
            // holds at least one whole batch, and retention drops only whole segments.
            let ack = i % 10 == 9;
            p.send(&publish(req, ack, topic, &payload, None)).await;
            if ack {
                assert_eq!(expect_stored(&mut p).await.req_id, req);
            }
        }
    }
    p.send_bytes(&brokerd_tests::wire::ping(1)).await;
    assert_eq!(p.recv().await, Some(Frame::Pong(1)));
    let mut admin = b.raw("admin").await;
    let mut n = 10;
    let mut info = async |name: &str| {
        n += 1;
        request(&mut admin, n, "info", &format!(r#"{{"name":"{name}"}}"#))
            .await
            .stream
            .unwrap()
    };
    // Count and bytes apply after every append: whole segments go, so a stream keeps up to
    // one segment more than its limit (a segment holds at least one whole write batch).
    let count = info("BYCOUNT").await;
    assert!(count.msgs >= 100 && count.msgs < 300, "{count:?}");
    assert_eq!(count.last_seq, 1_000);
    assert!(count.first_seq > 700, "{count:?}");
    let bytes = info("BYBYTES").await;
    assert!(
        bytes.bytes >= 16 * 1024 && bytes.bytes < 48 * 1024,
        "{bytes:?}"
    );
    // Age: checked once a second; the active segment stays.
    let age = info("BYAGE").await;
    assert_eq!(age.first_seq, 1);
    let mut aged = age;
    for _ in 0..40 {
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        aged = info("BYAGE").await;
        if aged.first_seq > 1 {
            break;
        }
    }
    assert!(aged.first_seq > 700 && aged.segments == 1, "{aged:?}");
    // A replay starts at what is left.
    let mut c = b.raw("c").await;
    c.send(&replay(1, 1, ">", "BYCOUNT", StartPosition::All))
        .await;
    assert_eq!(c.recv().await, Some(Frame::Ok(1)));
    assert_eq!(msgs(&mut c, 1).await[0].1, count.first_seq);
    b.stop().await;
}
