//! Monitoring: a request on `$SYS.req.stats` is answered by the broker itself with its
//! statistics as JSON, including what each connection dropped, so an operator can find a slow
//! consumer with `brokerctl stats`. The answer goes to the asker alone and counts as a delivery,
//! the request and refused publishes count nowhere, and neither asking nor a `$` reply-to opens a
//! way around the reserved `$` space.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use brokerd_client::{ConnectOptions, Error};
use brokerd_proto::topic::STATS_REQUEST;
use brokerd_proto::{ErrorCode, Frame};
use brokerd_tests::{DEADLINE, TestBroker, wire};
use serde_json::Value;

async fn stats(b: &TestBroker, opts: ConnectOptions) -> Value {
    let c = brokerd_client::Client::connect(b.addr, opts).await.unwrap();
    let reply = c.request(STATS_REQUEST, "", DEADLINE).await.unwrap();
    c.close().await.unwrap();
    serde_json::from_slice(&reply.payload()).expect("the answer is JSON")
}

fn n(v: &Value, key: &str) -> u64 {
    v[key]
        .as_u64()
        .unwrap_or_else(|| panic!("{key} missing in {v}"))
}

#[tokio::test]
async fn stats_count_traffic_and_name_the_connection_that_dropped() {
    let b = TestBroker::with_config(|c| {
        c.outbound.max_pending_msgs = 4;
        // The subscriber stalls on purpose; the write deadline must not end it first.
        c.outbound.write_deadline = std::time::Duration::from_secs(3600);
    })
    .await;
    let mut stalled = b.raw("stalled").await;
    stalled.send_bytes(&wire::sub(2, 1, "big")).await;
    assert_eq!(stalled.recv().await, Some(Frame::Ok(2)));
    let healthy = b.client("healthy").await;
    let mut small = healthy.subscribe("small").await.unwrap();

    // 16 MiB to a subscriber that reads nothing: more than its 4 pending messages plus what the
    // loopback socket buffers hold, so the broker must drop some.
    let p = b.client("publisher").await;
    let big = vec![7u8; 64 * 1024];
    const BIG: u64 = 256;
    for _ in 0..BIG {
        p.publish("big", &big).await.unwrap();
    }
    for _ in 0..3 {
        p.publish("small", "hi").await.unwrap();
    }
    p.publish("nobody.listens", "x").await.unwrap();
    p.flush().await.unwrap();
    for _ in 0..3 {
        small.next().await.unwrap();
    }

    let s = stats(&b, ConnectOptions::new("ops")).await;
    assert_eq!(n(&s, "msgs_in"), BIG + 4, "{s}");
    assert_eq!(n(&s, "unrouted"), 1, "{s}");
    assert_eq!(n(&s, "bytes_in"), BIG * big.len() as u64 + 3 * 2 + 1, "{s}");
    // stalled, healthy, publisher and the asker; the asker's inbox is the third subscription.
    assert_eq!(n(&s, "connections"), 4, "{s}");
    assert_eq!(n(&s, "subscriptions"), 3, "{s}");
    let dropped = n(&s, "dropped");
    assert!(dropped > 0, "the stalled subscriber must have dropped: {s}");
    assert_eq!(dropped, b.broker.stats().dropped, "{s}");
    assert_eq!(n(&s["closes"], "slow-consumer"), 0, "{s}");

    // The connection that dropped is listed first, with every drop; the others dropped nothing.
    let clients = s["clients"].as_array().unwrap();
    assert_eq!(clients.len(), 4, "{s}");
    assert_eq!(n(&s, "clients_listed"), 4, "{s}");
    assert_eq!(clients[0]["name"], "stalled", "{s}");
    assert_eq!(n(&clients[0], "dropped"), dropped, "{s}");
    assert_eq!(n(&clients[0], "subscriptions"), 1, "{s}");
    // Four, and one more that backpressure queued over the limit while the publisher waited.
    assert!(n(&clients[0], "pending_msgs") <= 5, "{s}");
    assert_eq!(clients[0]["overflow"], "drop-new", "{s}");
    for c in &clients[1..] {
        assert_eq!(n(c, "dropped"), 0, "{s}");
    }
    let publisher = clients.iter().find(|c| c["name"] == "publisher").unwrap();
    assert_eq!(n(publisher, "msgs_in"), BIG + 4, "{s}");
    let healthy = clients.iter().find(|c| c["name"] == "healthy").unwrap();
    assert_eq!(n(healthy, "deliveries"), 3, "{s}");
    // Gone at once, so shutdown does not wait out its grace period on the stalled queue.
    stalled.reset();
    b.stop().await;
}

#[tokio::test]
async fn the_answer_goes_to_the_asker_alone() {
    let b = TestBroker::start().await;
    let tapper = b.client("tap").await;
    let mut tap = tapper.subscribe(">").await.unwrap();
    let s = stats(&b, ConnectOptions::new("ops")).await;
    assert_eq!(n(&s, "connections"), 2, "{s}");
    // Published after the answer was delivered: had the tap been sent the answer (or the
    // request), it would come first.
    let p = b.client("publisher").await;
    p.publish("after.stats", "marker").await.unwrap();
    let first = tokio::time::timeout(DEADLINE, tap.next())
        .await
        .expect("the marker arrives")
        .unwrap();
    assert_eq!(first.topic(), "after.stats");
    b.stop().await;
}

#[tokio::test]
async fn a_no_echo_client_gets_the_answer_too() {
    let b = TestBroker::start().await;
    // The answer is the broker's own message, not this client's: no-echo does not hold it back.
    let s = stats(&b, ConnectOptions::new("quiet").no_echo(true)).await;
    assert_eq!(n(&s, "connections"), 1, "{s}");
    assert!(
        s["server_id"].as_str().is_some_and(|id| !id.is_empty()),
        "{s}"
    );
    assert!(s["version"].is_string(), "{s}");
    b.stop().await;
}

#[tokio::test]
async fn a_stats_request_without_reply_to_is_refused_and_other_sys_topics_stay_reserved() {
    let b = TestBroker::start().await;
    let mut raw = b.raw("raw").await;
    raw.send_bytes(&wire::publish(7, true, STATS_REQUEST, b""))
        .await;
    let err = raw.expect_err().await;
    assert_eq!(err.req_id, 7);
    assert_eq!(err.code, ErrorCode::ReservedTopic as u16);
    assert!(err.message.contains("reply-to"), "{}", err.message);
    raw.send_bytes(&wire::publish(8, true, "$SYS.req.other", b""))
        .await;
    let err = raw.expect_err().await;
    assert_eq!((err.req_id, err.code), (8, ErrorCode::ReservedTopic as u16));
    // Both refusals left the connection open.
    raw.send_bytes(&wire::ping(9)).await;
    assert_eq!(raw.recv().await, Some(Frame::Pong(9)));

    let c = b.client("asker").await;
    assert!(matches!(
        c.request("$SYS.req.other", "", DEADLINE).await,
        Err(Error::Server { code, .. }) if code == ErrorCode::ReservedTopic
    ));
    b.stop().await;
}

#[tokio::test]
async fn a_reserved_reply_to_opens_no_way_into_the_reserved_space() {
    let b = TestBroker::start().await;
    let mut raw = b.raw("raw").await;
    // Asking with a reply-to that none of the asker's subscriptions match: no answer, ACK 0.
    raw.send_bytes(&wire::publish_with_reply(
        3,
        true,
        STATS_REQUEST,
        "$SYS.req.stats",
        b"",
    ))
    .await;
    assert_eq!(
        raw.recv().await,
        Some(Frame::Ack {
            req_id: 3,
            delivered: 0
        })
    );
    // The reserved topics stay reserved, and the stats request keeps working.
    raw.send_bytes(&wire::publish(4, true, STATS_REQUEST, b""))
        .await;
    let err = raw.expect_err().await;
    assert_eq!((err.req_id, err.code), (4, ErrorCode::ReservedTopic as u16));
    let s = stats(&b, ConnectOptions::new("ops")).await;
    assert_eq!(n(&s, "connections"), 2, "{s}");
    b.stop().await;
}

#[tokio::test]
async fn the_request_and_refused_publishes_count_nowhere_and_the_answer_counts_as_a_delivery() {
    let b = TestBroker::start().await;
    let mut raw = b.raw("raw").await;
    raw.send_bytes(&wire::publish(1, true, "$SYS.x", b"x"))
        .await;
    assert_eq!(raw.expect_err().await.code, ErrorCode::ReservedTopic as u16);
    raw.send_bytes(&wire::publish(2, true, "bad..topic", b"x"))
        .await;
    assert_eq!(raw.expect_err().await.code, ErrorCode::InvalidTopic as u16);
    raw.send_bytes(&wire::publish_with_reply(
        3,
        true,
        STATS_REQUEST,
        "bad..reply",
        b"",
    ))
    .await;
    assert_eq!(raw.expect_err().await.code, ErrorCode::InvalidTopic as u16);
    let before = b.broker.stats();
    assert_eq!(
        (
            before.msgs_in,
            before.bytes_in,
            before.unrouted,
            before.deliveries
        ),
        (0, 0, 0, 0)
    );
    // An answered request: one delivery, and nothing published.
    let s = stats(&b, ConnectOptions::new("ops")).await;
    assert_eq!(n(&s, "msgs_in"), 0, "{s}");
    let after = b.broker.stats();
    assert_eq!(
        (
            after.msgs_in,
            after.bytes_in,
            after.unrouted,
            after.deliveries
        ),
        (0, 0, 0, 1)
    );
    b.stop().await;
}

#[tokio::test]
async fn a_reserved_reply_to_on_an_ordinary_publish_is_routed_but_cannot_be_answered() {
    let b = TestBroker::start().await;
    let mut responder = b.raw("responder").await;
    responder.send_bytes(&wire::sub(1, 1, "svc.time")).await;
    assert_eq!(responder.recv().await, Some(Frame::Ok(1)));
    let mut asker = b.raw("asker").await;
    asker
        .send_bytes(&wire::publish_with_reply(
            2,
            true,
            "svc.time",
            "$SYS.inbox.1",
            b"now?",
        ))
        .await;
    assert_eq!(
        asker.recv().await,
        Some(Frame::Ack {
            req_id: 2,
            delivered: 1
        })
    );
    let Some(Frame::Msg(m)) = responder.recv().await else {
        panic!("expected the request")
    };
    assert_eq!(m.body.reply(), Some("$SYS.inbox.1"));
    // The reply-to is a topic no client may publish to.
    responder
        .send_bytes(&wire::publish(3, true, "$SYS.inbox.1", b"12:00"))
        .await;
    let e = responder.expect_err().await;
    assert_eq!((e.req_id, e.code), (3, ErrorCode::ReservedTopic as u16));
    b.stop().await;
}
