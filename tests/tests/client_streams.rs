//! Streams through the client library, against a real broker: `Publish::stored` and message
//! ids, `acked` on a captured topic, the typed management calls and their errors, replay
//! subscriptions from each start position with stream sequences and gaps that are not losses,
//! a replay that resumes after a lost connection with no gap and no duplicate (the broker keeps
//! running and storing meanwhile, behind a relay the test cuts), a replay that ends when its
//! stream is deleted, and the `order_replay` example.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use brokerd_client::{
    Client, ConnectOptions, Error, ErrorCode, Event, Fsync, Reconnect, StartPosition, StreamConfig,
    Subscription,
};
use brokerd_tests::{DEADLINE, Relay, TempDir, TestBroker};
use std::path::Path;
use std::time::Duration;

#[allow(dead_code, missing_docs)]
#[path = "../../crates/brokerd-client/examples/order_replay.rs"]
mod order_replay;

fn orders() -> StreamConfig {
    StreamConfig {
        name: "ORDERS".into(),
        filters: vec!["order.>".into(), "payment.>".into()],
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

/// The next message's (topic, stream sequence, payload), failing after [`DEADLINE`].
async fn next(sub: &mut Subscription) -> (String, u64, String) {
    let m = tokio::time::timeout(DEADLINE, sub.next())
        .await
        .expect("a message within the deadline")
        .expect("the subscription is open");
    let seq = m.stream_seq().expect("a replay subscription's message");
    assert_eq!(seq, m.seq());
    assert_eq!(m.reply(), None, "stored messages carry no reply-to");
    (
        m.topic().to_string(),
        seq,
        String::from_utf8(m.payload().to_vec()).unwrap(),
    )
}

/// The stream sequences of the next `n` messages.
async fn seqs(sub: &mut Subscription, n: usize) -> Vec<u64> {
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        out.push(next(sub).await.1);
    }
    out
}

/// Stores `topic` with `payload` and returns its stream sequence.
async fn store(c: &Client, topic: &str, payload: &str) -> u64 {
    let s = c.publish(topic, payload).stored().await.unwrap();
    assert_eq!(s.stream, "ORDERS");
    assert!(!s.duplicate);
    s.seq
}

#[tokio::test]
async fn stored_publishes_name_their_sequence_and_ids_make_retries_safe() {
    let dir = TempDir::new("client-stored");
    let b = broker(&dir.0, vec![orders()]).await;
    let c = b.client("shop").await;
    let mut live = c.subscribe("order.*").await.unwrap();

    let first = c
        .publish("order.created", "o1")
        .msg_id("o1")
        .stored()
        .await
        .unwrap();
    assert_eq!(
        (
            first.stream.as_str(),
            first.seq,
            first.duplicate,
            first.delivered
        ),
        ("ORDERS", 1, false, 1)
    );
    // Routed live as before, with the id as a header.
    let m = live.next().await.unwrap();
    assert_eq!(m.headers().get(brokerd_client::MSG_ID_HEADER), Some("o1"));
    assert_eq!(m.stream_seq(), None);

    // The same id again: the first copy's sequence, nothing stored or routed.
    let again = c
        .publish("order.created", "o1 again")
        .msg_id("o1")
        .stored()
        .await
        .unwrap();
    assert_eq!((again.seq, again.duplicate, again.delivered), (1, true, 0));
    // `acked` counts deliveries whether a stream stored the message or not.
    assert_eq!(c.publish("order.paid", "o2").acked().await.unwrap(), 1);
    assert_eq!(c.publish("user.created", "u").acked().await.unwrap(), 0);
    // No stream captures user.*: a plain ACK, which `stored` reports as such.
    match c.publish("user.created", "u").stored().await {
        Err(Error::NotStored { topic, delivered }) => {
            assert_eq!((topic.as_str(), delivered), ("user.created", 0));
        }
        other => panic!("expected NotStored, got {other:?}"),
    }
    // Many stored publishes in flight at once on one connection: each gets its own answer,
    // in order.
    let pending: Vec<_> = (0..100)
        .map(|i| {
            let c = c.clone();
            tokio::spawn(async move {
                c.publish("payment.done", format!("{i}"))
                    .stored()
                    .await
                    .unwrap()
                    .seq
            })
        })
        .collect();
    let mut got = Vec::new();
    for p in pending {
        got.push(p.await.unwrap());
    }
    got.sort_unstable();
    assert_eq!(got, (3..103).collect::<Vec<u64>>());
    let info = c.streams().info("ORDERS").await.unwrap();
    assert_eq!((info.msgs, info.last_seq, info.duplicates), (102, 102, 1));
    drop(live);
    c.close().await.unwrap();
    b.stop().await;
}

#[tokio::test]
async fn streams_are_managed_with_typed_calls_and_the_brokers_reasons() {
    let dir = TempDir::new("client-admin");
    let b = broker(&dir.0, vec![orders()]).await;
    let c = b.client("admin").await;
    let streams = c.streams().timeout(Duration::from_secs(5));
    let added = streams
        .add(&StreamConfig {
            name: "EVENTS".into(),
            filters: vec!["user.>".into()],
            fsync: Fsync::Always,
            max_age_s: 3600,
            ..StreamConfig::default()
        })
        .await
        .unwrap();
    assert_eq!(added.config.fsync, Fsync::Always);
    assert_eq!((added.source.as_str(), added.msgs), ("api", 0));
    let names: Vec<String> = streams
        .list()
        .await
        .unwrap()
        .into_iter()
        .map(|s| s.config.name)
        .collect();
    assert_eq!(names, ["ORDERS", "EVENTS"]);

    for i in 0..3 {
        c.publish("user.created", format!("{i}"))
            .stored()
            .await
            .unwrap();
    }
    let info = streams.info("EVENTS").await.unwrap();
    assert_eq!((info.msgs, info.first_seq, info.last_seq), (3, 1, 3));
    assert_eq!(streams.purge("EVENTS").await.unwrap(), 3);
    let purged = streams.info("EVENTS").await.unwrap();
    assert_eq!((purged.msgs, purged.last_seq), (0, 3));

    // The broker's refusals carry its reason.
    match streams.add(&orders()).await {
        Err(Error::Stream { op: "add", message }) => assert!(!message.is_empty()),
        other => panic!("expected a refusal to add ORDERS twice, got {other:?}"),
    }
    match streams.delete("ORDERS").await {
        Err(Error::Stream {
            op: "delete",
            message,
        }) => {
            assert!(message.contains("configuration"), "{message}");
        }
        other => panic!("expected a refusal to delete a declared stream, got {other:?}"),
    }
    streams.delete("EVENTS").await.unwrap();
    match streams.info("EVENTS").await {
        Err(Error::Stream {
            op: "info",
            message,
        }) => assert!(message.contains("no stream")),
        other => panic!("expected no such stream, got {other:?}"),
    }
    // Checked before anything is sent.
    assert!(matches!(
        streams.info("not.a.name").await,
        Err(Error::InvalidStreamName(_))
    ));
    match c.subscribe_stream(">", "EVENTS", StartPosition::All).await {
        Err(e) => assert_eq!(e.code(), Some(ErrorCode::NoSuchStream)),
        Ok(_) => panic!("replayed a deleted stream"),
    }
    c.close().await.unwrap();
    b.stop().await;
}

#[tokio::test]
async fn replays_start_where_asked_and_their_gaps_are_not_losses() {
    let dir = TempDir::new("client-replay");
    let b = broker(&dir.0, vec![orders()]).await;
    let shop = b.client("shop").await;
    // Odd sequences are orders, even ones payments.
    for i in 1..=10 {
        let topic = if i % 2 == 1 {
            "order.created"
        } else {
            "payment.completed"
        };
        assert_eq!(store(&shop, topic, &format!("e{i}")).await, i);
    }
    let reader = b.client("reader").await;

    let mut all = reader
        .subscribe_stream(">", "ORDERS", StartPosition::All)
        .await
        .unwrap();
    assert_eq!(all.stream(), Some("ORDERS"));
    assert_eq!(seqs(&mut all, 10).await, (1..=10).collect::<Vec<_>>());

    // A filter narrower than the stream: gaps where the other topic's messages are.
    let mut payments = reader
        .subscribe_stream("payment.*", "ORDERS", StartPosition::FromSeq(5))
        .await
        .unwrap();
    assert_eq!(seqs(&mut payments, 3).await, [6, 8, 10]);
    let mut last = reader
        .subscribe_stream(">", "ORDERS", StartPosition::Last(2))
        .await
        .unwrap();
    assert_eq!(seqs(&mut last, 2).await, [9, 10]);
    let mut new = reader
        .subscribe_stream(">", "ORDERS", StartPosition::New)
        .await
        .unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;

    // Then live, every subscription from the same sequence, with no seam.
    assert_eq!(store(&shop, "payment.completed", "e11").await, 11);
    assert_eq!(store(&shop, "order.created", "e12").await, 12);
    assert_eq!(seqs(&mut all, 2).await, [11, 12]);
    assert_eq!(seqs(&mut payments, 1).await, [11]);
    assert_eq!(seqs(&mut last, 2).await, [11, 12]);
    assert_eq!(
        next(&mut new).await,
        ("payment.completed".to_string(), 11, "e11".to_string())
    );
    let mut since = reader
        .subscribe_stream(">", "ORDERS", StartPosition::FromTime(now))
        .await
        .unwrap();
    assert_eq!(seqs(&mut since, 2).await, [11, 12]);
    for sub in [&all, &payments, &last, &new, &since] {
        assert_eq!(sub.missed(), 0, "gaps are not losses");
    }
    reader.close().await.unwrap();
    shop.close().await.unwrap();
    b.stop().await;
}

/// A client through `relay` that reconnects quickly.
async fn reconnecting(relay: &Relay, name: &str) -> Client {
    let reconnect =
        Reconnect::default().delays(Duration::from_millis(20), Duration::from_millis(100));
    Client::connect(relay.addr, ConnectOptions::new(name).reconnect(reconnect))
        .await
        .unwrap()
}

/// Waits for the first event `pick` accepts.
async fn wait_for(events: &mut tokio::sync::broadcast::Receiver<Event>, pick: fn(&Event) -> bool) {
    tokio::time::timeout(DEADLINE, async {
        while !pick(&events.recv().await.unwrap()) {}
    })
    .await
    .expect("the event within the deadline");
}

#[tokio::test]
async fn a_replay_resumes_after_a_lost_connection_with_no_gap_and_no_duplicate() {
    let dir = TempDir::new("client-resume");
    let b = broker(&dir.0, vec![orders()]).await;
    let relay = Relay::start(b.addr).await;
    let shop = b.client("shop").await;
    let analytics = reconnecting(&relay, "analytics").await;
    let mut events = analytics.events();
    let mut all = analytics
        .subscribe_stream("order.>", "ORDERS", StartPosition::All)
        .await
        .unwrap();
    // Subscribed with `New` and given nothing before the outage (no payment is stored until
    // then): made again from the stream's position when it subscribed, so the payment stored
    // during the outage is not skipped.
    let mut new = analytics
        .subscribe_stream("payment.>", "ORDERS", StartPosition::New)
        .await
        .unwrap();
    for i in 1..=5 {
        store(&shop, "order.created", &format!("a{i}")).await;
    }
    assert_eq!(seqs(&mut all, 5).await, [1, 2, 3, 4, 5]);

    relay.cut();
    wait_for(&mut events, |e| matches!(e, Event::Disconnected { .. })).await;
    // Stored while the analytics service is away; a payment in between, which its order.>
    // filter skips.
    store(&shop, "order.created", "b6").await;
    store(&shop, "payment.completed", "b7").await;
    store(&shop, "order.created", "b8").await;
    relay.restore();
    wait_for(&mut events, |e| matches!(e, Event::Reconnected { .. })).await;
    store(&shop, "order.shipped", "c9").await;

    assert_eq!(
        next(&mut all).await,
        ("order.created".to_string(), 6, "b6".to_string())
    );
    assert_eq!(seqs(&mut all, 2).await, [8, 9]);
    assert_eq!(
        next(&mut new).await,
        ("payment.completed".to_string(), 7, "b7".to_string())
    );
    assert_eq!(all.resubscribed(), 1);
    assert_eq!((all.missed(), new.missed()), (0, 0));
    // Nothing more: no message came twice.
    analytics.flush().await.unwrap();
    assert!(all.try_next().is_none() && new.try_next().is_none());
    drop((all, new));
    analytics.close().await.unwrap();
    shop.close().await.unwrap();
    b.stop().await;
}

#[tokio::test]
async fn a_replay_ends_when_its_stream_is_deleted_and_says_why() {
    let dir = TempDir::new("client-deleted");
    let b = broker(&dir.0, Vec::new()).await;
    let c = b.client("admin").await;
    c.streams()
        .add(&StreamConfig {
            name: "TEMP".into(),
            filters: vec!["temp.>".into()],
            ..StreamConfig::default()
        })
        .await
        .unwrap();
    c.publish("temp.x", "1").stored().await.unwrap();
    let reader = b.client("reader").await;
    let mut sub = reader
        .subscribe_stream(">", "TEMP", StartPosition::All)
        .await
        .unwrap();
    assert_eq!(next(&mut sub).await.1, 1);
    c.streams().delete("TEMP").await.unwrap();
    let end = tokio::time::timeout(DEADLINE, sub.next())
        .await
        .expect("the replay ends within the deadline");
    assert!(end.is_none(), "no message after the stream was deleted");
    let why = sub.ended_by_broker().expect("a reason");
    assert!(why.contains("deleted"), "{why}");
    // The connection itself carries on.
    assert!(reader.is_connected());
    reader.flush().await.unwrap();
    reader.close().await.unwrap();
    c.close().await.unwrap();
    b.stop().await;
}

#[tokio::test]
async fn the_order_replay_example_processes_every_stored_event_exactly_once() {
    let dir = TempDir::new("client-example");
    let b = broker(&dir.0, Vec::new()).await;
    let report = order_replay::run(&b.addr()).await.unwrap();
    let per_order = order_replay::EVENTS_PER_ORDER;
    let [before, during, after] = order_replay::WAVES;
    assert_eq!(
        report.stored.len() as u64,
        (before + during + after) * per_order
    );
    assert_eq!(report.processed, report.stored);
    assert_eq!(report.down_after, before * per_order);
    assert_eq!(report.replayed, during * per_order);
    assert_eq!(
        report.retry,
        Some((true, report.down_after + during * per_order))
    );
    let orders = before + during + after;
    for topic in ["order.created", "payment.completed", "order.shipped"] {
        assert_eq!(report.per_topic[topic], orders, "{topic}");
    }
    // A second run against the same broker starts after the first one's events.
    let again = order_replay::run(&b.addr()).await.unwrap();
    assert_eq!(again.processed, again.stored);
    assert_eq!(again.stored[0], report.stored.last().unwrap() + 1);
    b.stop().await;
}

#[tokio::test]
async fn a_last_value_stream_replays_the_newest_message_of_each_topic() {
    let dir = TempDir::new("client-last-value");
    let prices = StreamConfig {
        name: "PRICES".into(),
        filters: vec!["price.>".into()],
        max_msgs_per_topic: 1,
        ..StreamConfig::default()
    };
    let b = broker(&dir.0, vec![orders(), prices]).await;
    let c = b.client("feed").await;
    for (topic, price) in [
        ("price.mug", "10"),
        ("price.tee", "20"),
        ("price.mug", "11"),
    ] {
        c.publish(topic, price).stored().await.unwrap();
    }
    let mut latest = c
        .subscribe_stream(">", "PRICES", StartPosition::LastPerTopic)
        .await
        .unwrap();
    assert_eq!(
        next(&mut latest).await,
        ("price.tee".to_string(), 2, "20".to_string())
    );
    assert_eq!(
        next(&mut latest).await,
        ("price.mug".to_string(), 3, "11".to_string())
    );
    c.publish("price.tee", "21").stored().await.unwrap();
    assert_eq!(next(&mut latest).await.1, 4);
    // Only a stream that keeps messages per topic can start there.
    match c
        .subscribe_stream(">", "ORDERS", StartPosition::LastPerTopic)
        .await
    {
        Err(e) => assert_eq!(e.code(), Some(ErrorCode::InvalidStart)),
        Ok(_) => panic!("LastPerTopic on a stream without max_msgs_per_topic"),
    }
    c.close().await.unwrap();
    b.stop().await;
}
