//! Churn (issue 4): 10,000 cycles of connect, subscribe, publish and disconnect, a fifth of them
//! ended by a TCP reset in the middle of a frame, while messages keep flowing to the churning
//! subscriptions. Afterwards the broker reports zero connections and zero subscriptions, its
//! subscription trie is empty again, and every connection was counted closed exactly once.
//!
//! The broker's resident memory after the same churn is measured on the real binary by
//! `crates/brokerd-server/tests/resources.rs`. `BROKERD_CHURN_CYCLES` changes the cycle count
//! and `BROKERD_CHURN_UNIQUE_TOPICS=1` gives every cycle its own topic (`scripts/reliability.sh`
//! runs both).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use brokerd_proto::Frame;
use brokerd_tests::{RawConn, TestBroker, scale, wire};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// Cycles run at once.
const WORKERS: usize = 50;

/// One connection's life; `i` picks how it ends.
async fn cycle(addr: SocketAddr, worker: usize, i: usize, unique_topics: bool) {
    let topic = if unique_topics {
        format!("churn.w{worker}.c{i}")
    } else {
        format!("churn.w{worker}")
    };
    // Each worker connects from its own loopback address: clean closes leave TIME_WAIT sockets
    // on this side, and 10,000 of them would crowd one address's ephemeral ports.
    let from = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2 + worker as u8));
    let connect = || RawConn::connect_from(addr, from);
    match i % 10 {
        // Reset in the middle of a PUB frame, subscribed and with deliveries flowing.
        0 | 5 => {
            let mut c = connect().await.hello("reset-mid-pub", 0).await;
            c.send_bytes(&wire::sub(2, 1, "churn.all")).await;
            c.send_bytes(&wire::sub(3, 2, &topic)).await;
            let f = wire::publish(4, true, &topic, &[7; 300]);
            c.send_bytes(&f[..f.len() / 2]).await;
            c.reset();
        }
        // Reset in the middle of the HELLO.
        1 => {
            let mut c = connect().await;
            let f = wire::hello(1, "reset-mid-hello", 0);
            c.send_bytes(&f[..7]).await;
            c.reset();
        }
        // Reset right after the subscription is live, while a delivery may be half written.
        2 => {
            let mut c = connect().await.hello("reset-receiving", 0).await;
            c.send_bytes(&wire::sub(2, 1, "churn.all")).await;
            // A message routed while the SUB was being handled may come before its OK.
            loop {
                match c.recv().await {
                    Some(Frame::Ok(2)) => break,
                    Some(Frame::Msg(m)) => assert_eq!(m.sid, 1),
                    other => panic!("expected OK or MSG, got {other:?}"),
                }
            }
            c.reset();
        }
        // Unsubscribe, then a clean close.
        3 => {
            let mut c = connect().await.hello("unsub", 0).await;
            c.send_bytes(&wire::sub(2, 1, &topic)).await;
            c.send_bytes(&wire::unsub(3, 1, 0)).await;
            assert_eq!(c.recv().await, Some(Frame::Ok(2)));
            assert_eq!(c.recv().await, Some(Frame::Ok(3)));
        }
        // The client library's whole cycle.
        4 => {
            let client = brokerd_client::Client::connect(
                addr,
                brokerd_client::ConnectOptions::new("library"),
            )
            .await
            .unwrap();
            let mut s = client.subscribe(&topic).await.unwrap();
            assert_eq!(client.publish(&topic, "hi").acked().await.unwrap(), 1);
            assert_eq!(&s.next().await.unwrap().payload()[..], b"hi");
            client.close().await.unwrap();
        }
        // Subscribe, publish to itself, read it back, close cleanly.
        _ => {
            let mut c = connect().await.hello("clean", 0).await;
            c.send_bytes(&wire::sub(2, 1, &topic)).await;
            c.send_bytes(&wire::publish(3, true, &topic, b"round trip"))
                .await;
            assert_eq!(c.recv().await, Some(Frame::Ok(2)));
            loop {
                match c.recv().await {
                    Some(Frame::Msg(m)) => assert_eq!(m.sid, 1),
                    Some(Frame::Ack { req_id: 3, .. }) => break,
                    other => panic!("expected MSG or ACK, got {other:?}"),
                }
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_connect_subscribe_publish_disconnect_cycles_leave_nothing_behind() {
    let cycles = scale("BROKERD_CHURN_CYCLES", 10_000);
    // One topic per cycle instead of per worker: every publish then caches a new topic that no
    // subscription outlives, the case where a SUB or UNSUB that walked the whole match cache
    // was slow (see docs/reliability.md); kept as a mode for the script.
    let unique_topics = scale("BROKERD_CHURN_UNIQUE_TOPICS", 0) != 0;
    let b = TestBroker::start().await;
    let before = b.broker.stats();

    // Deliveries to `churn.all` flow the whole time, so resets land mid-delivery too.
    let stop = Arc::new(AtomicBool::new(false));
    let feeder = tokio::spawn({
        let (client, stop) = (b.client("feeder").await, stop.clone());
        async move {
            let mut sent = 0u64;
            while !stop.load(Ordering::Relaxed) && sent < 100_000_000 {
                for _ in 0..64 {
                    client.publish("churn.all", [1u8; 512]).await.unwrap();
                }
                client.flush().await.unwrap();
                sent += 64;
            }
            client.close().await.unwrap();
            sent
        }
    });

    let per_worker = cycles.div_ceil(WORKERS);
    let mut workers = tokio::task::JoinSet::new();
    for w in 0..WORKERS {
        let addr = b.addr;
        workers.spawn(async move {
            for i in 0..per_worker {
                cycle(addr, w, i, unique_topics).await;
            }
        });
    }
    let started = std::time::Instant::now();
    tokio::time::timeout(Duration::from_secs(300), async {
        while let Some(r) = workers.join_next().await {
            r.expect("churn worker");
        }
    })
    .await
    .expect("churn finishes");
    let elapsed = started.elapsed();
    stop.store(true, Ordering::Relaxed);
    let fed = feeder.await.unwrap();

    b.wait_for_connections(0).await;
    let after = b.broker.stats();
    assert_eq!(after.connections, 0);
    assert_eq!(after.subscriptions, 0);
    assert_eq!(
        after.sublist.nodes, 0,
        "the trie is pruned back to its root"
    );
    // Every connection, handshaken or not, was counted closed exactly once.
    let made = (per_worker * WORKERS + 1) as u64;
    let closed: u64 = after.closes.iter().map(|(_, n)| n).sum();
    assert_eq!(closed, made, "{:?}", after.closes);
    let reasons: Vec<_> = after.closes.iter().filter(|(_, n)| *n > 0).collect();
    for (reason, _) in &reasons {
        assert!(
            ["client-closed", "io-error"].contains(reason),
            "unexpected close reason {reason}: {reasons:?}"
        );
    }
    assert_eq!(before.connections, 0);
    eprintln!(
        "churn: {made} connections in {elapsed:.1?} with {fed} messages fed to churn.all; \
         closes {reasons:?}; sublist {:?}",
        after.sublist
    );
    b.stop().await;
}
