//! Durable consumers through the client library, against a real broker: clients sharing one
//! consumer as a work queue, each message done once; a worker whose client goes away holding
//! unacknowledged messages, which the other gets; `nak` and `term`; a member that unsubscribes;
//! the position across a restart of the broker (the same client reconnecting to the new one);
//! a client that loses its connection (behind a relay the test cuts) and keeps consuming,
//! losing nothing, while the acknowledgements of what it received before are refused; and the
//! refusals of a bad consumer.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use brokerd_client::{
    Client, ConnectOptions, ConsumerOptions, Error, ErrorCode, Event, Message, Reconnect,
    StreamConfig, Subscription,
};
use brokerd_proto::streams::ConsumerInfo;
use brokerd_tests::{DEADLINE, POLL, Relay, TempDir, TestBroker};
use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

fn jobs() -> StreamConfig {
    StreamConfig {
        name: "JOBS".into(),
        filters: vec!["job.>".into()],
        ..StreamConfig::default()
    }
}

async fn broker(dir: &Path) -> TestBroker {
    broker_on(dir, SocketAddr::from(([127, 0, 0, 1], 0))).await
}

async fn broker_on(dir: &Path, addr: SocketAddr) -> TestBroker {
    let dir = dir.to_path_buf();
    TestBroker::with_config(move |c| {
        c.listen = addr;
        c.data_dir = dir;
        c.streams = vec![jobs()];
    })
    .await
}

/// A long ack wait: only a member's departure, a `nak` or a lost connection brings a message
/// back within a test.
fn patient() -> ConsumerOptions {
    ConsumerOptions::new().ack_wait(Duration::from_secs(600))
}

/// Stores jobs `from..from + n` (the payload is the number) and returns their sequences.
async fn store(c: &Client, from: u64, n: u64) -> Vec<u64> {
    let mut seqs = Vec::new();
    for i in from..from + n {
        let s = c
            .publish("job.resize", i.to_string())
            .stored()
            .await
            .unwrap();
        seqs.push(s.seq);
    }
    seqs
}

/// The next message, failing after [`DEADLINE`].
async fn next(sub: &mut Subscription) -> Message {
    let m = tokio::time::timeout(DEADLINE, sub.next())
        .await
        .expect("a message within the deadline")
        .expect("the subscription is open");
    assert!(m.is_from_consumer());
    assert_eq!(m.stream_seq(), Some(m.seq()));
    assert_eq!(m.reply(), None);
    m
}

/// The state of consumer `name` of JOBS, asked by `c`.
///
/// `c` must not be a member of a consumer whose filter matches its own inbox (such as `>`): the
/// broker hands the answer to every subscription of the asker that matches the reply-to, a
/// consumer's included, where it looks like one of the consumer's messages.
async fn consumer(c: &Client, name: &str) -> ConsumerInfo {
    let info = c.streams().info("JOBS").await.unwrap();
    info.consumers
        .into_iter()
        .find(|k| k.name == name)
        .expect("the consumer is listed")
}

/// Waits until consumer `name` is done up to `floor` with nothing in flight, and returns its
/// state: from then on nothing can be delivered again.
async fn settled(c: &Client, name: &str, floor: u64) -> ConsumerInfo {
    let end = tokio::time::Instant::now() + DEADLINE;
    loop {
        let k = consumer(c, name).await;
        if k.floor == floor && k.in_flight == 0 {
            return k;
        }
        assert!(
            tokio::time::Instant::now() < end,
            "consumer {name} did not settle at {floor}: {k:?}"
        );
        tokio::time::sleep(POLL).await;
    }
}

/// Waits for the first event `pick` accepts.
async fn wait_for(events: &mut tokio::sync::broadcast::Receiver<Event>, pick: fn(&Event) -> bool) {
    tokio::time::timeout(DEADLINE, async {
        while !pick(&events.recv().await.unwrap()) {}
    })
    .await
    .expect("the event within the deadline");
}

/// A client to `addr` that reconnects quickly.
async fn reconnecting(addr: SocketAddr, name: &str) -> Client {
    let reconnect =
        Reconnect::default().delays(Duration::from_millis(20), Duration::from_millis(100));
    Client::connect(addr, ConnectOptions::new(name).reconnect(reconnect))
        .await
        .unwrap()
}

fn stale(r: Result<(), Error>, seq: u64) {
    assert!(
        matches!(r, Err(Error::StaleDelivery { seq: s }) if s == seq),
        "expected a stale delivery of #{seq}, got {r:?}"
    );
}

#[tokio::test]
async fn two_clients_share_one_consumer_and_each_message_is_done_once() {
    let dir = TempDir::new("client-consumers-share");
    let b = broker(&dir.0).await;
    let (c1, c2) = (b.client("worker-1").await, b.client("worker-2").await);
    let mut w1 = c1
        .consume("JOBS", "resize", ConsumerOptions::new())
        .await
        .unwrap();
    let mut w2 = c2
        .consume("JOBS", "resize", ConsumerOptions::new())
        .await
        .unwrap();
    assert_eq!((w1.stream(), w1.consumer()), (Some("JOBS"), Some("resize")));
    let shop = b.client("shop").await;
    assert_eq!(store(&shop, 1, 200).await, (1..=200).collect::<Vec<_>>());

    let mut seen = Vec::new();
    let (mut n1, mut n2) = (0, 0);
    tokio::time::timeout(DEADLINE, async {
        while seen.len() < 200 {
            tokio::select! {
                Some(m) = w1.next() => { m.ack().await.unwrap(); seen.push(m.seq()); n1 += 1; }
                Some(m) = w2.next() => { m.ack().await.unwrap(); seen.push(m.seq()); n2 += 1; }
            }
        }
    })
    .await
    .expect("200 jobs within the deadline");
    let unique: BTreeSet<u64> = seen.iter().copied().collect();
    assert_eq!(unique, (1..=200).collect(), "every job");
    assert_eq!(seen.len(), 200, "no job twice");
    assert!(n1 > 0 && n2 > 0, "both workers worked: {n1} and {n2}");
    // Done to the last with nothing in flight: nothing can come again.
    let k = settled(&shop, "resize", 200).await;
    assert_eq!((k.delivered, k.redelivered, k.members), (200, 0, 2));
    assert!(w1.try_next().is_none() && w2.try_next().is_none());
    drop((w1, w2));
    for c in [c1, c2, shop] {
        c.close().await.unwrap();
    }
    b.stop().await;
}

#[tokio::test]
async fn a_worker_dropped_holding_messages_has_them_redelivered_to_another() {
    let dir = TempDir::new("client-consumers-drop");
    let b = broker(&dir.0).await;
    let shop = b.client("shop").await;
    let doomed = b.client("doomed").await;
    let mut doomed_sub = doomed.consume("JOBS", "work", patient()).await.unwrap();
    store(&shop, 1, 10).await;
    let mut held = Vec::new();
    while held.len() < 10 {
        held.push(next(&mut doomed_sub).await);
    }
    // The worker's client goes away (its connection closes) without acknowledging anything;
    // its subscription and messages are still in hand.
    drop(doomed);

    let heir = b.client("heir").await;
    let mut sub = heir.consume("JOBS", "work", patient()).await.unwrap();
    let mut got = BTreeSet::new();
    while got.len() < 10 {
        let m = next(&mut sub).await;
        m.ack().await.unwrap();
        assert!(got.insert(m.seq()), "#{} twice", m.seq());
    }
    assert_eq!(got, (1..=10).collect());
    // The closed client's messages cannot be acknowledged any more, and its subscription ended.
    for m in &held {
        assert!(matches!(m.ack().await, Err(Error::Closed(_))));
    }
    assert!(doomed_sub.next().await.is_none());
    let k = settled(&shop, "work", 10).await;
    assert_eq!((k.delivered, k.redelivered, k.members), (20, 10, 1));
    drop(sub);
    heir.close().await.unwrap();
    shop.close().await.unwrap();
    b.stop().await;
}

#[tokio::test]
async fn nak_brings_a_message_back_and_term_ends_it() {
    let dir = TempDir::new("client-consumers-nak");
    let b = broker(&dir.0).await;
    let c = b.client("worker").await;
    let mut sub = c
        .consume("JOBS", "flaky", patient().max_deliver(5))
        .await
        .unwrap();
    // Stream requests from another client: see `consumer`.
    let shop = b.client("shop").await;
    store(&shop, 1, 2).await;
    let (m1, m2) = (next(&mut sub).await, next(&mut sub).await);
    assert_eq!((m1.seq(), m2.seq()), (1, 2));
    m1.nak().await.unwrap();
    m2.ack().await.unwrap();
    let again = next(&mut sub).await;
    assert_eq!(again.seq(), 1, "the refused message, delivered again");
    assert_eq!(again.payload(), m1.payload());
    again.ack().await.unwrap();
    let k = settled(&shop, "flaky", 2).await;
    assert_eq!((k.delivered, k.redelivered), (3, 1));

    store(&shop, 3, 1).await;
    let poison = next(&mut sub).await;
    assert_eq!(poison.seq(), 3);
    poison.term().await.unwrap();
    let k = settled(&shop, "flaky", 3).await;
    assert_eq!((k.delivered, k.redelivered, k.given_up), (4, 1, 0));
    assert!(
        sub.try_next().is_none(),
        "a terminated message never comes back"
    );
    // Only a consumer's messages are acknowledged.
    let mut live = c.subscribe("job.>").await.unwrap();
    c.publish("job.resize", "x").await.unwrap();
    let plain = tokio::time::timeout(DEADLINE, live.next())
        .await
        .unwrap()
        .unwrap();
    assert!(!plain.is_from_consumer());
    assert!(matches!(plain.ack().await, Err(Error::NotFromConsumer)));
    drop((sub, live));
    c.close().await.unwrap();
    shop.close().await.unwrap();
    b.stop().await;
}

#[tokio::test]
async fn a_member_that_unsubscribes_hands_what_it_held_to_the_others() {
    let dir = TempDir::new("client-consumers-leave");
    let b = broker(&dir.0).await;
    let c = b.client("leaver").await;
    let mut leaving = c.consume("JOBS", "work", patient()).await.unwrap();
    store(&c, 1, 5).await;
    let first = next(&mut leaving).await;
    let second = next(&mut leaving).await;
    first.ack().await.unwrap();
    leaving.unsubscribe().await.unwrap();
    // From then on nothing it received is acknowledged, and what it had not read is gone.
    stale(second.ack().await, 2);
    assert!(leaving.next().await.is_none());

    let stays = b.client("stays").await;
    let mut sub = stays.consume("JOBS", "work", patient()).await.unwrap();
    let mut got = Vec::new();
    while got.len() < 4 {
        let m = next(&mut sub).await;
        m.ack().await.unwrap();
        got.push(m.seq());
    }
    got.sort_unstable();
    assert_eq!(got, [2, 3, 4, 5]);
    settled(&c, "work", 5).await;
    drop(sub);
    stays.close().await.unwrap();
    c.close().await.unwrap();
    b.stop().await;
}

/// The floor consumer `name` of JOBS has written to its file (`docs/storage.md`), if any.
fn saved_floor(dir: &Path, name: &str) -> Option<u64> {
    let path = dir
        .join("JOBS")
        .join("consumers")
        .join(format!("{name}.json"));
    let bytes = std::fs::read(path).ok()?;
    let v: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    v["floor"].as_u64()
}

#[tokio::test]
async fn the_position_survives_a_restart_of_the_broker_and_the_worker_reconnects() {
    let dir = TempDir::new("client-consumers-restart");
    let b = broker(&dir.0).await;
    let addr = b.addr;
    let shop = b.client("shop").await;
    store(&shop, 1, 100).await;
    shop.close().await.unwrap();
    let worker = reconnecting(addr, "billing-worker").await;
    let mut events = worker.events();
    let mut sub = worker.consume("JOBS", "billing", patient()).await.unwrap();
    let mut unacked = Vec::new();
    for seq in 1..=100 {
        let m = next(&mut sub).await;
        assert_eq!(m.seq(), seq, "in stream order");
        if seq <= 60 {
            m.ack().await.unwrap();
        } else {
            unacked.push(m);
        }
    }
    // The position is written at most every 100 ms: wait until the file holds it.
    brokerd_tests::wait_until("the consumer's position on disk", || {
        saved_floor(&dir.0, "billing") == Some(60)
    })
    .await;

    b.stop().await;
    wait_for(&mut events, |e| matches!(e, Event::Disconnected { .. })).await;
    let b = broker_on(&dir.0, addr).await;
    wait_for(&mut events, |e| matches!(e, Event::Reconnected { .. })).await;
    assert_eq!(sub.resubscribed(), 1);
    // What was held on the lost connection is the new broker's to deliver again.
    for m in &unacked {
        stale(m.ack().await, m.seq());
    }
    for seq in 61..=100 {
        let m = next(&mut sub).await;
        assert_eq!(m.seq(), seq, "after what was acknowledged, in order");
        m.ack().await.unwrap();
    }
    let admin = b.client("admin").await;
    let k = settled(&admin, "billing", 100).await;
    assert_eq!(k.delivered, 40, "only what was not acknowledged");
    assert!(sub.try_next().is_none());
    drop(sub);
    worker.close().await.unwrap();
    admin.close().await.unwrap();
    b.stop().await;
}

#[tokio::test]
async fn a_worker_that_loses_its_connection_keeps_consuming_and_loses_nothing() {
    let dir = TempDir::new("client-consumers-reconnect");
    let b = broker(&dir.0).await;
    let relay = Relay::start(b.addr).await;
    let shop = b.client("shop").await;
    let worker = reconnecting(relay.addr, "worker").await;
    let mut events = worker.events();
    let mut sub = worker.consume("JOBS", "work", patient()).await.unwrap();
    store(&shop, 1, 10).await;
    let mut before = Vec::new();
    for seq in 1..=10 {
        let m = next(&mut sub).await;
        assert_eq!(m.seq(), seq);
        if seq <= 5 {
            m.ack().await.unwrap();
        } else {
            before.push(m);
        }
    }
    settled_in_flight(&shop, "work", 5).await;

    relay.cut();
    wait_for(&mut events, |e| matches!(e, Event::Disconnected { .. })).await;
    // Lost with its connection: not acknowledged, and not sent later under the same sid.
    stale(before[0].ack().await, 6);
    store(&shop, 11, 5).await;
    relay.restore();
    wait_for(&mut events, |e| matches!(e, Event::Reconnected { .. })).await;
    for m in &before {
        stale(m.ack().await, m.seq());
    }
    store(&shop, 16, 5).await;

    let mut got = Vec::new();
    while got.len() < 15 {
        let m = next(&mut sub).await;
        m.ack().await.unwrap();
        got.push(m.seq());
    }
    got.sort_unstable();
    assert_eq!(
        got,
        (6..=20).collect::<Vec<_>>(),
        "nothing lost, nothing twice"
    );
    let k = settled(&shop, "work", 20).await;
    assert_eq!((k.delivered, k.redelivered, k.members), (25, 5, 1));
    assert!(sub.try_next().is_none());
    assert_eq!(sub.resubscribed(), 1);
    drop(sub);
    worker.close().await.unwrap();
    shop.close().await.unwrap();
    b.stop().await;
}

/// Waits until consumer `name` has `n` messages in flight.
async fn settled_in_flight(c: &Client, name: &str, n: u64) {
    let end = tokio::time::Instant::now() + DEADLINE;
    while consumer(c, name).await.in_flight != n {
        assert!(
            tokio::time::Instant::now() < end,
            "{name}: never {n} in flight"
        );
        tokio::time::sleep(POLL).await;
    }
}

#[tokio::test]
async fn a_bad_consumer_is_refused_with_a_reason() {
    let dir = TempDir::new("client-consumers-refused");
    let b = broker(&dir.0).await;
    let c = b.client("worker").await;
    let _sub = c
        .consume(
            "JOBS",
            "resize",
            ConsumerOptions::new().filter("job.resize"),
        )
        .await
        .unwrap();
    // Every member subscribes with the consumer's filter.
    match c
        .consume("JOBS", "resize", ConsumerOptions::new().filter("job.>"))
        .await
    {
        Err(e) => {
            assert_eq!(e.code(), Some(ErrorCode::InvalidFilter));
            assert!(e.to_string().contains("job.resize"), "{e}");
        }
        Ok(_) => panic!("joined with another filter"),
    }
    match c.consume("NOPE", "resize", ConsumerOptions::new()).await {
        Err(e) => assert_eq!(e.code(), Some(ErrorCode::NoSuchStream)),
        Ok(_) => panic!("consumed a stream that does not exist"),
    }
    // Checked before sending.
    assert!(matches!(
        c.consume("JOBS", "re.size", ConsumerOptions::new()).await,
        Err(Error::InvalidConsumerName(_))
    ));
    assert!(matches!(
        c.consume("JOBS", "resize", ConsumerOptions::new().max_deliver(0))
            .await,
        Err(Error::InvalidOption {
            option: "max_deliver",
            ..
        })
    ));
    // The connection carries on.
    c.flush().await.unwrap();
    c.close().await.unwrap();
    b.stop().await;
}
