//! Slow consumers (issue 4): a subscriber that stops reading costs the broker at most its
//! configured pending limit (plus the eighth backpressure may queue over it), holds the publisher
//! back for at most the bounded backpressure wait and a healthy subscriber not at all, and every
//! message it did not get is accounted for; the `disconnect` policy and the write deadline close
//! it with a counted reason. A subscriber that keeps reading loses nothing behind a small queue
//! (issue 15).
//!
//! The stalled subscribers here are raw sockets that simply do not read. The broker's resident
//! memory under the same load is measured on the real binary by
//! `crates/brokerd-server/tests/resources.rs`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use brokerd_client::{ConnectOptions, OverflowPolicy};
use brokerd_proto::{ErrorCode, Frame};
use brokerd_tests::{DEADLINE, RawConn, TestBroker, wait_until, wire};
use std::collections::HashMap;
use std::time::Duration;

/// Messages the publisher sends in the stalled-subscriber tests: 20 MiB, more than the stalled
/// connection's pending limit plus what loopback socket buffers absorb (a few MiB), so it must
/// drop; the limit is still a generous buffer for a subscriber that keeps reading, since the
/// limits are the same for every connection.
const N: u64 = 20_000;
const PAYLOAD: usize = 1024;
const PENDING_MSGS: usize = 8192;
const PENDING_BYTES: usize = 8 * 1024 * 1024;

fn payload(i: u64) -> Vec<u8> {
    let mut p = vec![b'.'; PAYLOAD];
    p[..8].copy_from_slice(&i.to_be_bytes());
    p
}

/// The outbox figures of the connected client called `name`.
fn pending(b: &TestBroker, name: &str) -> brokerd_core::OutboxStats {
    let client = b
        .broker
        .clients()
        .into_iter()
        .find(|c| c.name == name)
        .expect("client connected");
    client.outbox.stats()
}

/// One stalled subscriber with two subscriptions matching every message, one healthy subscriber,
/// one publisher at full speed; then the stalled subscriber resumes and accounts for everything.
async fn stalled_then_resumed(policy: OverflowPolicy, wire_policy: u8) {
    let b = TestBroker::with_config(|c| {
        c.outbound.max_pending_msgs = PENDING_MSGS;
        c.outbound.max_pending_bytes = PENDING_BYTES;
        c.outbound.overflow = OverflowPolicy::DropNew;
        // The stall is the point of the test: on a loaded machine it can outlast the default
        // write deadline, which would end the connection this test needs to resume.
        c.outbound.write_deadline = Duration::from_secs(3600);
    })
    .await;
    let mut stalled = RawConn::handshake(b.addr, "stalled", wire_policy).await;
    stalled.send_bytes(&wire::sub(2, 1, "feed.>")).await;
    stalled.send_bytes(&wire::sub(3, 2, "feed.data")).await;
    assert_eq!(stalled.recv().await, Some(Frame::Ok(2)));
    assert_eq!(stalled.recv().await, Some(Frame::Ok(3)));
    assert_eq!(pending(&b, "stalled").queued, 0);

    let healthy = brokerd_client::Client::connect(
        b.addr,
        ConnectOptions::new("healthy").subscription_capacity(N as usize + 16, usize::MAX),
    )
    .await
    .unwrap();
    let mut healthy_sub = healthy.subscribe("feed.data").await.unwrap();
    // The healthy subscriber reports its progress, so that the publisher can stay within one
    // pending limit of it: every connection has the same limits, and in a debug build a reader
    // in this process is not guaranteed to keep pace with a publisher at full speed. Nothing
    // reports the stalled subscriber's progress; it never makes any.
    let (progress_tx, mut progress) = tokio::sync::watch::channel(0u64);
    let reader = tokio::spawn(async move {
        for i in 0..N {
            let m = tokio::time::timeout(DEADLINE, healthy_sub.next())
                .await
                .unwrap_or_else(|_| panic!("healthy subscriber stuck after {i} messages"))
                .expect("healthy subscription open");
            assert_eq!(
                &m.payload()[..8],
                &i.to_be_bytes(),
                "in order, none missing"
            );
            assert_eq!(m.seq(), i + 1);
            if i % 256 == 255 {
                progress_tx.send_replace(i + 1);
            }
        }
        healthy_sub.missed()
    });

    let publisher = b.client("publisher").await;
    // The publisher must finish while the stalled subscriber reads nothing at all; the deadline
    // only bounds the test, it is not a performance figure.
    tokio::time::timeout(DEADLINE, async {
        for i in 0..N {
            while i >= *progress.borrow_and_update() + PENDING_MSGS as u64 / 2 {
                publisher.flush().await.unwrap();
                progress.changed().await.unwrap();
            }
            publisher.publish("feed.data", payload(i)).await.unwrap();
        }
        publisher.flush().await.unwrap();
    })
    .await
    .expect("the publisher is not held back by the stalled subscriber");
    let missed_by_healthy = tokio::time::timeout(DEADLINE, reader)
        .await
        .expect("healthy subscriber got everything")
        .unwrap();
    assert_eq!(missed_by_healthy, 0);

    // Everything is routed (the flush's PONG came after every PUB was routed), so what the stalled
    // connection holds now is all it will hold: within its limits, plus the eighth backpressure
    // may queue over them while a publisher waits (`outbound.backpressure_wait`).
    let held = pending(&b, "stalled");
    assert!(held.pending_msgs <= PENDING_MSGS * 9 / 8, "{held:?}");
    assert!(held.pending_bytes <= PENDING_BYTES * 9 / 8, "{held:?}");
    assert!(
        held.dropped > 0,
        "the stalled subscriber must have lost messages: {held:?}"
    );
    // drop-new never queues what it drops; drop-old queues everything and drops from the queue.
    let matched = match policy {
        OverflowPolicy::DropOld => held.queued,
        _ => held.queued + held.dropped,
    };
    assert_eq!(matched, 2 * N, "{held:?}");

    // Resume: per subscription, received + reported missed = published, exactly.
    let mut received: HashMap<u32, u64> = HashMap::new();
    let mut missed: HashMap<u32, u64> = HashMap::new();
    let mut last_seq: HashMap<u32, u64> = HashMap::new();
    let done = |r: &HashMap<u32, u64>, m: &HashMap<u32, u64>| {
        [1u32, 2]
            .iter()
            .all(|sid| r.get(sid).copied().unwrap_or(0) + m.get(sid).copied().unwrap_or(0) == N)
    };
    let mut frames = 0u64;
    while !done(&received, &missed) {
        frames += 1;
        assert!(frames <= 4 * N, "far more frames than were published");
        match stalled.recv().await {
            Some(Frame::Msg(m)) => {
                let last = last_seq.entry(m.sid).or_insert(0);
                assert!(m.seq > *last && m.seq <= N, "seq {} after {}", m.seq, last);
                *last = m.seq;
                *received.entry(m.sid).or_insert(0) += 1;
            }
            Some(Frame::Lost(l)) => *missed.entry(l.sid).or_insert(0) += l.missed,
            other => panic!("{policy:?}: unexpected {other:?}"),
        }
    }
    for sid in [1u32, 2] {
        assert!(
            missed.get(&sid).copied().unwrap_or(0) > 0,
            "{policy:?} sid {sid}"
        );
    }
    // Nothing else is owed: a PING now is answered by the very next frame.
    stalled.send_bytes(&wire::ping(7)).await;
    assert_eq!(stalled.recv().await, Some(Frame::Pong(7)));

    // Caught up, the resumed subscriber gets new messages again, on both subscriptions.
    let delivered = publisher
        .publish("feed.data", payload(N))
        .acked()
        .await
        .unwrap();
    assert!(delivered >= 2, "delivered to {delivered} subscriptions");
    let mut sids = Vec::new();
    for _ in 0..2 {
        match stalled.recv().await {
            Some(Frame::Msg(m)) => sids.push((m.sid, m.seq)),
            other => panic!("expected MSG, got {other:?}"),
        }
    }
    sids.sort_unstable();
    assert_eq!(sids, [(1, N + 1), (2, N + 1)]);
    drop(healthy);
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drop_new_stalled_subscriber_is_bounded_and_accounts_per_subscription() {
    stalled_then_resumed(OverflowPolicy::DropNew, 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drop_old_stalled_subscriber_is_bounded_and_accounts_per_subscription() {
    stalled_then_resumed(OverflowPolicy::DropOld, 2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disconnect_policy_reports_pending_figures_and_counts_the_close_once() {
    let b = TestBroker::with_config(|c| {
        c.outbound.max_pending_msgs = 1024;
        c.outbound.max_pending_bytes = 64 * 1024;
    })
    .await;
    let mut stalled = RawConn::handshake(b.addr, "stalled", 3).await;
    stalled.send_bytes(&wire::sub(2, 1, "big")).await;
    assert_eq!(stalled.recv().await, Some(Frame::Ok(2)));
    let publisher = b.client("publisher").await;
    // 32 MiB: more than the loopback socket buffers and the 64 KiB pending limit together.
    let body = vec![0u8; 16 * 1024];
    for _ in 0..2048 {
        publisher.publish("big", &body).await.unwrap();
    }
    publisher.flush().await.unwrap();
    // Closed as a slow consumer: either already gone (its socket had room for the ERR), or
    // waiting for its socket to drain.
    wait_until("the outbox to close as a slow consumer", || {
        b.closes("slow-consumer") == 1
            || b.broker.clients().iter().any(|c| {
                c.name == "stalled"
                    && matches!(
                        c.outbox.close_reason(),
                        Some(brokerd_core::CloseReason::SlowConsumer { .. })
                    )
            })
    })
    .await;
    // Reading again lets the writer finish its batch, if any, and send the ERR.
    let err = loop {
        match stalled.recv().await {
            Some(Frame::Msg(_)) => {}
            Some(Frame::Err(e)) => break e,
            other => panic!("expected MSG or ERR, got {other:?}"),
        }
    };
    assert_eq!(err.code, ErrorCode::SlowConsumer as u16);
    assert_eq!(err.req_id, 0);
    assert!(
        err.message.contains("slow consumer")
            && err.message.contains("messages")
            && err.message.contains("bytes pending"),
        "the ERR names the condition and its pending figures: {:?}",
        err.message
    );
    stalled.expect_closed().await;
    b.wait_for_connections(1).await;
    assert_eq!(b.closes("slow-consumer"), 1);
    assert_eq!(b.closes("write-timeout"), 0);
    assert_eq!(publisher.publish("big", "x").acked().await.unwrap(), 0);
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn socket_not_drained_within_the_write_deadline_is_closed_and_counted() {
    let b = TestBroker::with_config(|c| {
        c.outbound.write_deadline = Duration::from_millis(200);
    })
    .await;
    let mut stalled = RawConn::stalled_subscriber(b.addr, "never-reads", "big").await;
    let publisher = b.client("publisher").await;
    // 32 MiB, within the default 64 MiB pending limit: only the write deadline can end this.
    let body = vec![0u8; 64 * 1024];
    for _ in 0..512 {
        publisher.publish("big", &body).await.unwrap();
    }
    publisher.flush().await.unwrap();
    wait_until("the stalled connection to be closed", || {
        b.closes("write-timeout") == 1
    })
    .await;
    b.wait_for_connections(1).await;
    // The socket was stuck mid-frame, so no ERR can follow; what arrives is deliveries, then the
    // close (a frame cut short at the end is not decoded).
    loop {
        match stalled.recv().await {
            Some(Frame::Msg(_)) => {}
            None => break,
            other => panic!("expected MSG or close, got {other:?}"),
        }
    }
    assert_eq!(b.closes("slow-consumer"), 0);
    assert_eq!(publisher.publish("big", "x").acked().await.unwrap(), 0);
    b.stop().await;
}

/// Backpressure (issue 15): a subscriber that keeps reading loses nothing even when its queue is
/// far smaller than what the publisher sends at full speed, because the publisher waits for that
/// queue to drain instead of the overflow policy dropping. The wait is made long here so that a
/// loaded machine, where the subscriber's writer may not run for a while, cannot turn it into a
/// stall; with the default 100 ms the result is the same on a quiet machine.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_that_keeps_reading_loses_nothing_behind_a_small_queue() {
    const TOTAL: u64 = 50_000;
    let b = TestBroker::with_config(|c| {
        c.outbound.max_pending_msgs = 16;
        c.outbound.max_pending_bytes = 64 * 1024;
        c.outbound.backpressure_wait = Duration::from_secs(5);
    })
    .await;
    let subscriber = b.client("reader").await;
    let mut sub = subscriber.subscribe("fast.>").await.unwrap();
    let reader = tokio::spawn(async move {
        for i in 0..TOTAL {
            let m = tokio::time::timeout(DEADLINE, sub.next())
                .await
                .unwrap_or_else(|_| panic!("stuck after {i}"))
                .expect("subscription open");
            assert_eq!(m.seq(), i + 1, "a gap: the broker dropped");
        }
        sub.missed()
    });
    let publisher = b.client("writer").await;
    let body = vec![1u8; 512];
    for _ in 0..TOTAL {
        publisher.publish("fast.x", &body).await.unwrap();
    }
    publisher.flush().await.unwrap();
    let missed = tokio::time::timeout(DEADLINE, reader)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(missed, 0);
    assert_eq!(b.broker.stats().dropped, 0);
    let held = pending(&b, "reader");
    assert!(held.pending_msgs <= 16 + 2, "{held:?}");
    b.stop().await;
}

/// With backpressure off (`backpressure_wait = "0s"`), the same small queue gets its overflow
/// policy at once: the publisher is never held back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_backpressure_off_a_full_queue_gets_its_policy_at_once() {
    let b = TestBroker::with_config(|c| {
        c.outbound.max_pending_msgs = 4;
        c.outbound.backpressure_wait = Duration::ZERO;
        c.outbound.write_deadline = Duration::from_secs(3600);
    })
    .await;
    let _stalled = RawConn::stalled_subscriber(b.addr, "never-reads", "t").await;
    let publisher = b.client("publisher").await;
    let body = vec![0u8; 64 * 1024];
    for _ in 0..200 {
        publisher.publish("t", &body).await.unwrap();
    }
    publisher.flush().await.unwrap();
    let held = pending(&b, "never-reads");
    assert!(held.pending_msgs <= 4, "{held:?}");
    assert!(held.dropped > 0, "{held:?}");
    b.stop().await;
}
