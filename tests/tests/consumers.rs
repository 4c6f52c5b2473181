//! Durable consumers end to end, over raw frames (`docs/protocol.md` section 8.3): members
//! share the work, unacknowledged messages come back after the ack wait or at once when their
//! holder leaves, `NAK` asks for a message again, `max_deliver` bounds the attempts, and the
//! position survives a restart of the broker.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use brokerd_proto::streams::{Fsync, StreamConfig};
use brokerd_proto::{
    AckKind, Body, ConsumerSpec, Frame, Mack, Publish, StartPosition, StreamStart, Subscribe,
};
use brokerd_tests::{RawConn, TempDir, TestBroker};
use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

async fn broker(dir: &Path) -> TestBroker {
    let dir = dir.to_path_buf();
    TestBroker::with_config(move |c| {
        c.data_dir = dir;
        c.streams = vec![StreamConfig {
            name: "JOBS".into(),
            filters: vec!["job.>".into()],
            fsync: Fsync::Interval,
            ..StreamConfig::default()
        }];
    })
    .await
}

fn join(req_id: u32, sid: u32, consumer: &str, ack_wait_ms: u32, max_deliver: u16) -> Frame {
    Frame::Sub(Subscribe {
        req_id,
        sid,
        filter: "job.>".into(),
        queue: None,
        stream: Some(StreamStart {
            stream: "JOBS".into(),
            start: StartPosition::All,
            consumer: Some(ConsumerSpec {
                name: consumer.into(),
                ack_wait_ms,
                max_deliver,
                max_in_flight: 0,
            }),
        }),
    })
}

async fn publish(p: &mut RawConn, from: u32, n: u32) {
    for i in from..from + n {
        let body = Body::encode("job.resize", None, None, i.to_string().as_bytes());
        p.send(&Frame::Pub(Publish {
            req_id: i,
            ack: true,
            body: Body::parse(body).unwrap(),
        }))
        .await;
    }
    for _ in 0..n {
        assert!(matches!(p.recv().await, Some(Frame::Stored(_))));
    }
}

/// The stream's state, asked with `$SYS.req.stream.info`.
async fn stream_info(c: &mut RawConn) -> brokerd_proto::streams::StreamInfo {
    c.send_bytes(&brokerd_tests::wire::sub(90, 90, "_INBOX.info"))
        .await;
    assert_eq!(c.recv().await, Some(Frame::Ok(90)));
    let body = Body::encode(
        "$SYS.req.stream.info",
        Some("_INBOX.info"),
        None,
        br#"{"name":"JOBS"}"#,
    );
    c.send(&Frame::Pub(Publish {
        req_id: 91,
        ack: false,
        body: Body::parse(body).unwrap(),
    }))
    .await;
    match c.recv().await {
        Some(Frame::Msg(m)) => {
            let a: brokerd_proto::streams::StreamAnswer =
                serde_json::from_slice(&m.body.payload()).unwrap();
            a.stream.unwrap()
        }
        other => panic!("expected the answer, got {other:?}"),
    }
}

async fn ack(c: &mut RawConn, sid: u32, seq: u64, kind: AckKind) {
    c.send(&Frame::Mack(Mack { sid, seq, kind })).await;
}

/// The next message's stream sequence, or `None` if nothing arrives within `wait`.
async fn next_msg(c: &mut RawConn, wait: Duration) -> Option<u64> {
    match tokio::time::timeout(wait, c.recv()).await {
        Ok(Some(Frame::Msg(m))) => Some(m.seq),
        Ok(other) => panic!("expected MSG, got {other:?}"),
        Err(_) => None,
    }
}

#[tokio::test]
async fn members_share_the_work_and_each_message_is_done_once() {
    let dir = TempDir::new("consumers-share");
    let b = broker(&dir.0).await;
    let mut w1 = b.raw("w1").await;
    let mut w2 = b.raw("w2").await;
    w1.send(&join(1, 1, "resize", 0, 0)).await;
    assert_eq!(w1.recv().await, Some(Frame::Ok(1)));
    w2.send(&join(1, 1, "resize", 0, 0)).await;
    assert_eq!(w2.recv().await, Some(Frame::Ok(1)));
    let mut p = b.raw("p").await;
    publish(&mut p, 1, 200).await;
    let mut seen = Vec::new();
    let (mut n1, mut n2) = (0, 0);
    while seen.len() < 200 {
        tokio::select! {
            Some(Frame::Msg(m)) = w1.recv() => { ack(&mut w1, 1, m.seq, AckKind::Ack).await; seen.push(m.seq); n1 += 1; }
            Some(Frame::Msg(m)) = w2.recv() => { ack(&mut w2, 1, m.seq, AckKind::Ack).await; seen.push(m.seq); n2 += 1; }
        }
    }
    let unique: BTreeSet<u64> = seen.iter().copied().collect();
    assert_eq!(unique, (1..=200).collect(), "every job once");
    assert_eq!(seen.len(), 200, "no job twice");
    assert!(n1 > 0 && n2 > 0, "both members worked: {n1} and {n2}");
    // Acknowledged: nothing comes back.
    assert_eq!(next_msg(&mut w1, Duration::from_millis(300)).await, None);
    b.stop().await;
}

#[tokio::test]
async fn an_unacknowledged_message_comes_back_after_the_ack_wait_until_max_deliver() {
    let dir = TempDir::new("consumers-redeliver");
    let b = broker(&dir.0).await;
    let mut w = b.raw("w").await;
    w.send(&join(1, 1, "flaky", 150, 3)).await;
    assert_eq!(w.recv().await, Some(Frame::Ok(1)));
    let mut p = b.raw("p").await;
    publish(&mut p, 1, 1).await;
    // Three deliveries of sequence 1, then no more.
    for attempt in 1..=3 {
        assert_eq!(
            next_msg(&mut w, Duration::from_secs(5)).await,
            Some(1),
            "attempt {attempt}"
        );
    }
    assert_eq!(next_msg(&mut w, Duration::from_millis(600)).await, None);
    // A NAK brings a message back at once; an ACK ends it.
    publish(&mut p, 2, 1).await;
    assert_eq!(next_msg(&mut w, Duration::from_secs(5)).await, Some(2));
    ack(&mut w, 1, 2, AckKind::Nak).await;
    assert_eq!(next_msg(&mut w, Duration::from_millis(100)).await, Some(2));
    ack(&mut w, 1, 2, AckKind::Ack).await;
    assert_eq!(next_msg(&mut w, Duration::from_millis(400)).await, None);
    b.stop().await;
}

#[tokio::test]
async fn a_worker_killed_holding_messages_has_them_redelivered_to_another() {
    let dir = TempDir::new("consumers-kill");
    let b = broker(&dir.0).await;
    let mut doomed = b.raw("doomed").await;
    // A long ack wait: only the member's departure can bring its messages back in time.
    doomed.send(&join(1, 1, "work", 600_000, 0)).await;
    assert_eq!(doomed.recv().await, Some(Frame::Ok(1)));
    let mut p = b.raw("p").await;
    publish(&mut p, 1, 10).await;
    let mut held = BTreeSet::new();
    while held.len() < 10 {
        held.insert(next_msg(&mut doomed, Duration::from_secs(5)).await.unwrap());
    }
    doomed.reset();
    let mut heir = b.raw("heir").await;
    heir.send(&join(1, 7, "work", 600_000, 0)).await;
    assert_eq!(heir.recv().await, Some(Frame::Ok(1)));
    let mut got = BTreeSet::new();
    while got.len() < 10 {
        let seq = next_msg(&mut heir, Duration::from_secs(5))
            .await
            .expect("redelivered");
        ack(&mut heir, 7, seq, AckKind::Ack).await;
        got.insert(seq);
    }
    assert_eq!(got, held);
    b.stop().await;
}

#[tokio::test]
async fn the_position_survives_a_restart_of_the_broker() {
    let dir = TempDir::new("consumers-restart");
    let b = broker(&dir.0).await;
    let mut p = b.raw("p").await;
    publish(&mut p, 1, 100).await;
    let mut w = b.raw("w").await;
    w.send(&join(1, 1, "billing", 0, 0)).await;
    assert_eq!(w.recv().await, Some(Frame::Ok(1)));
    let mut acked = 0;
    while acked < 100 {
        let seq = next_msg(&mut w, Duration::from_secs(5)).await.unwrap();
        if seq <= 60 {
            ack(&mut w, 1, seq, AckKind::Ack).await;
            acked += 1;
        } else {
            acked += 1;
        }
    }
    // The position is saved at most every 100 ms.
    tokio::time::sleep(Duration::from_millis(400)).await;
    let info = stream_info(&mut p).await;
    let c = &info.consumers[0];
    assert_eq!(
        (
            c.name.as_str(),
            c.floor,
            c.in_flight,
            c.members,
            c.delivered
        ),
        ("billing", 60, 40, 1, 100)
    );
    b.stop().await;
    let b = broker(&dir.0).await;
    let mut w = b.raw("w").await;
    w.send(&join(1, 1, "billing", 0, 0)).await;
    assert_eq!(w.recv().await, Some(Frame::Ok(1)));
    let mut again = Vec::new();
    while again.len() < 40 {
        let seq = next_msg(&mut w, Duration::from_secs(5)).await.unwrap();
        ack(&mut w, 1, seq, AckKind::Ack).await;
        again.push(seq);
    }
    again.sort_unstable();
    assert_eq!(
        again,
        (61..=100).collect::<Vec<_>>(),
        "what was not acknowledged, and only that"
    );
    b.stop().await;
}

#[tokio::test]
async fn a_late_ack_from_a_former_holder_does_not_end_the_message() {
    let dir = TempDir::new("consumers-late-ack");
    let b = broker(&dir.0).await;
    let mut w1 = b.raw("w1").await;
    w1.send(&join(1, 1, "work", 300, 0)).await;
    assert_eq!(w1.recv().await, Some(Frame::Ok(1)));
    let mut w2 = b.raw("w2").await;
    w2.send(&join(1, 1, "work", 300, 0)).await;
    assert_eq!(w2.recv().await, Some(Frame::Ok(1)));
    let mut p = b.raw("p").await;
    publish(&mut p, 1, 1).await;
    // Sequence 1 goes to one member (the former holder), expires after 300 ms unacknowledged,
    // and goes to the other (the holder).
    let former_is_w1 = tokio::select! {
        s = next_msg(&mut w1, Duration::from_secs(5)) => { assert_eq!(s, Some(1)); true }
        s = next_msg(&mut w2, Duration::from_secs(5)) => { assert_eq!(s, Some(1)); false }
    };
    let (former, holder) = if former_is_w1 {
        (&mut w1, &mut w2)
    } else {
        (&mut w2, &mut w1)
    };
    assert_eq!(next_msg(holder, Duration::from_secs(5)).await, Some(1));
    // The former holder's late ack is ignored; the holder's nak brings the message back.
    ack(former, 1, 1, AckKind::Ack).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    ack(holder, 1, 1, AckKind::Nak).await;
    let back = tokio::select! {
        s = next_msg(former, Duration::from_secs(2)) => s,
        s = next_msg(holder, Duration::from_secs(2)) => s,
    };
    assert_eq!(back, Some(1));
    b.stop().await;
}

#[tokio::test]
async fn a_new_consumer_keeps_its_start_across_a_restart_before_any_ack() {
    let dir = TempDir::new("consumers-fresh");
    let b = broker(&dir.0).await;
    let mut p = b.raw("p").await;
    publish(&mut p, 1, 5).await;
    let mut w = b.raw("w").await;
    let mut sub = join(1, 1, "fresh", 0, 0);
    if let Frame::Sub(s) = &mut sub {
        s.stream.as_mut().unwrap().start = StartPosition::New;
    }
    w.send(&sub).await;
    assert_eq!(w.recv().await, Some(Frame::Ok(1)));
    publish(&mut p, 6, 3).await;
    for want in 6..=8 {
        assert_eq!(next_msg(&mut w, Duration::from_secs(5)).await, Some(want));
    }
    b.stop().await;
    let b = broker(&dir.0).await;
    let mut w = b.raw("w").await;
    w.send(&sub).await;
    assert_eq!(w.recv().await, Some(Frame::Ok(1)));
    // Nothing was acknowledged: 6 to 8 come again, and not 1 to 5.
    for want in 6..=8 {
        let seq = next_msg(&mut w, Duration::from_secs(5)).await;
        assert_eq!(seq, Some(want));
        ack(&mut w, 1, want, AckKind::Ack).await;
    }
    b.stop().await;
}

#[tokio::test]
async fn deleting_the_stream_ends_its_consumers_members() {
    let dir = TempDir::new("consumers-delete");
    let dir2 = dir.0.clone();
    let b = TestBroker::with_config(move |c| c.data_dir = dir2).await;
    let mut admin = b.raw("admin").await;
    admin
        .send_bytes(&brokerd_tests::wire::sub(1, 1, "_INBOX.a"))
        .await;
    assert_eq!(admin.recv().await, Some(Frame::Ok(1)));
    let req = |req_id: u32, op: &str, json: &str| {
        Frame::Pub(Publish {
            req_id,
            ack: false,
            body: Body::parse(Body::encode(
                &format!("$SYS.req.stream.{op}"),
                Some("_INBOX.a"),
                None,
                json.as_bytes(),
            ))
            .unwrap(),
        })
    };
    admin
        .send(&req(2, "add", r#"{"name":"JOBS","filters":["job.>"]}"#))
        .await;
    assert!(matches!(admin.recv().await, Some(Frame::Msg(_))));
    let mut w = b.raw("w").await;
    w.send(&join(1, 4, "work", 0, 0)).await;
    assert_eq!(w.recv().await, Some(Frame::Ok(1)));
    admin.send(&req(3, "delete", r#"{"name":"JOBS"}"#)).await;
    assert!(matches!(admin.recv().await, Some(Frame::Msg(_))));
    let e = w.expect_err().await;
    assert_eq!(
        (e.req_id, e.code),
        (0, brokerd_proto::ErrorCode::StoreFailed as u16)
    );
    assert!(
        e.message.starts_with("replay subscription 4 ended:"),
        "{}",
        e.message
    );
    b.stop().await;
}

#[tokio::test]
async fn a_request_answer_never_lands_in_a_consumer_subscription() {
    let dir = TempDir::new("consumers-answer");
    let b = broker(&dir.0).await;
    let mut w = b.raw("w").await;
    let mut everything = join(1, 1, "all", 0, 0);
    if let Frame::Sub(s) = &mut everything {
        s.filter = ">".into();
    }
    w.send(&everything).await;
    assert_eq!(w.recv().await, Some(Frame::Ok(1)));
    // The stream info request answers on an inbox only the consumer's `>` matches.
    let body = Body::encode(
        "$SYS.req.stream.info",
        Some("_INBOX.x"),
        None,
        br#"{"name":"JOBS"}"#,
    );
    w.send(&Frame::Pub(Publish {
        req_id: 2,
        ack: true,
        body: Body::parse(body).unwrap(),
    }))
    .await;
    assert_eq!(
        w.recv().await,
        Some(Frame::Ack {
            req_id: 2,
            delivered: 0
        })
    );
    assert_eq!(next_msg(&mut w, Duration::from_millis(300)).await, None);
    b.stop().await;
}

/// The consumer `name` as the stream's info shows it, asked on a connection of its own.
async fn consumer_info(b: &TestBroker, name: &str) -> brokerd_proto::streams::ConsumerInfo {
    let mut q = b.raw("info").await;
    let info = stream_info(&mut q).await;
    info.consumers
        .into_iter()
        .find(|c| c.name == name)
        .expect("the consumer")
}

#[tokio::test]
async fn a_consumer_whose_member_does_not_read_waits_for_room_instead_of_polling() {
    use brokerd_core::outbox::STORED_MAX_BYTES;
    let dir = TempDir::new("consumers-blocked");
    let b = broker(&dir.0).await;
    // A small receive buffer: the member's socket stops taking bytes early.
    let mut w = RawConn::connect_with_receive_buffer(b.addr, 64 * 1024)
        .await
        .hello("stuck", 0)
        .await;
    let mut sub = join(1, 1, "big", 600_000, 0);
    if let Frame::Sub(Subscribe {
        stream: Some(StreamStart {
            consumer: Some(c), ..
        }),
        ..
    }) = &mut sub
    {
        // The largest window: every pass that scanned what is in flight scanned all of it.
        c.max_in_flight = 100_000;
    }
    w.send(&sub).await;
    assert_eq!(w.recv().await, Some(Frame::Ok(1)));
    let mut p = b.raw("p").await;
    let n = 2_000u32;
    let payload = vec![1u8; 4096];
    for i in 0..n {
        let body = Body::encode("job.resize", None, None, &payload);
        p.send(&Frame::Pub(Publish {
            req_id: i + 1,
            ack: false,
            body: Body::parse(body).unwrap(),
        }))
        .await;
    }
    p.send_bytes(&brokerd_tests::wire::ping(1)).await;
    assert_eq!(p.recv().await, Some(Frame::Pong(1)));
    let pending = || {
        b.broker
            .clients()
            .into_iter()
            .find(|c| c.name == "stuck")
            .map(|c| c.outbox.stats().pending_bytes)
            .unwrap_or(0)
    };
    // Full: the next 4 KiB message does not fit the bound of stored deliveries.
    brokerd_tests::wait_until("the member's queue at the bound", || {
        pending() > STORED_MAX_BYTES - 2 * 4200
    })
    .await;
    let before = consumer_info(&b, "big").await;
    assert!(before.delivered < u64::from(n), "{before:?}");
    // A period in which nothing happens: the member reads nothing, acknowledges nothing, no
    // deadline passes. The task wakes at most every 250 ms then; a 5 ms poll made ~200 passes.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let after = consumer_info(&b, "big").await;
    assert_eq!(after.delivered, before.delivered, "still blocked");
    assert!(
        after.passes - before.passes <= 20,
        "{} passes while blocked",
        after.passes - before.passes
    );
    assert!(pending() <= STORED_MAX_BYTES, "{}", pending());
    drop(w);
    b.stop().await;
}

#[tokio::test]
async fn a_consumer_cannot_be_created_with_an_ack_wait_below_the_minimum() {
    let dir = TempDir::new("consumers-min-ack-wait");
    let b = broker(&dir.0).await;
    let mut w = b.raw("w").await;
    w.send(&join(1, 1, "hasty", 99, 0)).await;
    let e = w.expect_err().await;
    assert_eq!(e.req_id, 1);
    assert!(e.message.contains("ack_wait_ms 99"), "{}", e.message);
    w.send(&join(2, 2, "hasty", 100, 0)).await;
    assert_eq!(w.recv().await, Some(Frame::Ok(2)));
    b.stop().await;
}
