//! Shutdown under load (issue 4): publishers and subscribers busy, then the graceful shutdown a
//! SIGTERM starts. Every message the broker acknowledged to a publisher reaches every subscriber
//! still connected, and the server finishes within its grace period.
//!
//! A publisher's connection is handled in order, so an `ACK` also vouches for every message that
//! publisher sent before it: each publisher sends 127 unacknowledged messages then one with an ack,
//! and the highest acknowledged index bounds what every subscriber must have received. The real
//! binary's exit code 0 on SIGTERM, under load, is checked by
//! `crates/brokerd-server/tests/resources.rs`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use brokerd_client::{Client, ConnectOptions};
use brokerd_tests::{DEADLINE, TestBroker, wait_until};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

const PUBLISHERS: usize = 4;
const SUBSCRIBERS: usize = 3;
const GRACE: Duration = Duration::from_secs(5);

fn payload(publisher: usize, i: u64) -> Vec<u8> {
    let mut p = vec![0u8; 128];
    p[..8].copy_from_slice(&(publisher as u64).to_be_bytes());
    p[8..16].copy_from_slice(&i.to_be_bytes());
    p
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_messages_reach_every_connected_subscriber_before_exit() {
    let b = TestBroker::with_config(|c| {
        c.timeouts.shutdown_grace = GRACE;
        // Room enough that no subscriber drops anything: a drop would be accounted, but this
        // test is about what shutdown does to queued messages.
        c.outbound.max_pending_msgs = 1 << 20;
        c.outbound.max_pending_bytes = 512 << 20;
    })
    .await;
    let broker = b.broker.clone();

    // Subscribers record, per publisher, how many consecutive messages they received.
    let mut subscribers = Vec::new();
    for s in 0..SUBSCRIBERS {
        let client = Client::connect(
            b.addr,
            ConnectOptions::new(format!("sub-{s}")).subscription_capacity(1 << 20, usize::MAX),
        )
        .await
        .unwrap();
        let mut stream = client.subscribe("load.>").await.unwrap();
        subscribers.push(tokio::spawn(async move {
            let mut next = [0u64; PUBLISHERS];
            // Ends when the server closes the connection after draining it.
            while let Some(m) = stream.next().await {
                let p = m.payload();
                let publisher = u64::from_be_bytes(p[..8].try_into().unwrap()) as usize;
                let i = u64::from_be_bytes(p[8..16].try_into().unwrap());
                assert_eq!(
                    i, next[publisher],
                    "publisher {publisher}: in order, none lost"
                );
                next[publisher] += 1;
            }
            assert_eq!(stream.missed(), 0);
            drop(client);
            next
        }));
    }

    // Publishers run until the shutdown stops them; `acked[p]` is one past the highest index
    // the broker acknowledged.
    let acked: Arc<Vec<AtomicU64>> = Arc::new((0..PUBLISHERS).map(|_| AtomicU64::new(0)).collect());
    let mut publishers = Vec::new();
    for p in 0..PUBLISHERS {
        let client = b.client(&format!("pub-{p}")).await;
        let acked = acked.clone();
        publishers.push(tokio::spawn(async move {
            let topic = format!("load.p{p}");
            for i in 0..10_000_000u64 {
                let sent = if i % 128 == 127 {
                    client
                        .publish(&topic, payload(p, i))
                        .acked()
                        .await
                        .map(|delivered| {
                            assert_eq!(delivered as usize, SUBSCRIBERS);
                            acked[p].store(i + 1, Ordering::SeqCst);
                        })
                } else {
                    client.publish(&topic, payload(p, i)).await
                };
                if sent.is_err() {
                    return i;
                }
            }
            panic!("publisher {p} was never stopped");
        }));
    }

    // Shut down mid-stream, once every publisher has had a good number of messages acknowledged.
    wait_until("publishers under way", || {
        acked.iter().all(|a| a.load(Ordering::SeqCst) >= 10_000)
    })
    .await;
    b.begin_shutdown();
    let took = b.finish_shutdown(GRACE + DEADLINE).await;

    let mut stopped_at = Vec::new();
    for p in publishers {
        stopped_at.push(tokio::time::timeout(DEADLINE, p).await.unwrap().unwrap());
    }
    let acked: Vec<u64> = acked.iter().map(|a| a.load(Ordering::SeqCst)).collect();
    for s in subscribers {
        let received = tokio::time::timeout(DEADLINE, s).await.unwrap().unwrap();
        for p in 0..PUBLISHERS {
            assert!(
                received[p] >= acked[p],
                "publisher {p}: {} acknowledged, only {} received",
                acked[p],
                received[p]
            );
        }
    }
    assert_eq!(broker.stats().dropped, 0);
    assert!(
        took <= GRACE,
        "shutdown took {took:?}, more than the {GRACE:?} grace period"
    );
    eprintln!(
        "shutdown under load: acknowledged {acked:?}, publishers stopped at {stopped_at:?}, \
         server done {took:.2?} after the shutdown began"
    );
}
