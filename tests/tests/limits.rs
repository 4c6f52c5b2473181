//! Limits (issue 4): each is configurable, and exceeding it gets its own documented error code
//! (`docs/protocol.md` section 5): max payload (5), max frame (4), topic length and token count
//! (6 for a publish, 7 for a filter), subscriptions per connection (12), connections (14, an
//! `ERR` rather than a reset), handshake timeout (15), keep-alive (17); and the limits that keep
//! connection slots from being held for free: handshakes in progress and connections per address
//! (14, with their own close reasons), and the frame deadline (17, `frame-timeout`).
//!
//! Each test sets its limit well below the default so that it is cheap to reach, and checks that
//! the connection stays open when the protocol says it does.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use brokerd_client::{Client, ConnectOptions};
use brokerd_proto::{ErrorCode, Frame};
use brokerd_tests::{RawConn, TestBroker, wait_until, wire};
use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn code(c: ErrorCode) -> u16 {
    c as u16
}

#[tokio::test]
async fn payload_and_frame_limits() {
    let b = TestBroker::with_config(|c| {
        c.limits.max_payload = 1000;
        c.limits.max_frame = 2000;
    })
    .await;
    let mut c = RawConn::handshake(b.addr, "sizes", 0).await;
    c.send_bytes(&wire::sub(1, 1, "size")).await;
    assert_eq!(c.recv().await, Some(Frame::Ok(1)));

    // The largest payload passes; one byte more is refused for that PUB only.
    c.send_bytes(&wire::publish(2, true, "size", &[1; 1000]))
        .await;
    let Some(Frame::Msg(m)) = c.recv().await else {
        panic!("expected MSG")
    };
    assert_eq!(m.body.payload().len(), 1000);
    assert_eq!(
        c.recv().await,
        Some(Frame::Ack {
            req_id: 2,
            delivered: 1
        })
    );
    c.send_bytes(&wire::publish(3, true, "size", &[1; 1001]))
        .await;
    let e = c.expect_err().await;
    assert_eq!((e.req_id, e.code), (3, code(ErrorCode::PayloadTooLarge)));
    c.send_bytes(&wire::ping(4)).await;
    assert_eq!(
        c.recv().await,
        Some(Frame::Pong(4)),
        "connection stays open"
    );

    // A frame of exactly max_frame is decoded (and then fails only on its payload) ...
    let topic = "size";
    let exact = 2000 - (6 + 1 + 2 + topic.len());
    c.send_bytes(&wire::publish(5, true, topic, &vec![0; exact]))
        .await;
    let e = c.expect_err().await;
    assert_eq!((e.req_id, e.code), (5, code(ErrorCode::PayloadTooLarge)));
    // ... one byte more is fatal, and refused as soon as the length prefix arrives.
    c.send_bytes(&2001u32.to_be_bytes()).await;
    let e = c.expect_err().await;
    assert_eq!((e.req_id, e.code), (0, code(ErrorCode::FrameTooLarge)));
    c.expect_closed().await;
    b.stop().await;
}

#[tokio::test]
async fn before_the_handshake_no_frame_longer_than_the_longest_hello_is_taken() {
    // The default `max_frame` (1 MiB + 64 KiB) is far above the longest HELLO.
    let b = TestBroker::start().await;
    // The longest HELLO a client may send is read in full (and here refused as malformed).
    let mut c = RawConn::connect(b.addr).await;
    let mut longest = (brokerd_proto::MAX_HELLO_LEN as u32).to_be_bytes().to_vec();
    longest.push(0x01);
    longest.resize(4 + brokerd_proto::MAX_HELLO_LEN, 0);
    // Version 1; an empty name, then bytes no HELLO has.
    longest[10] = 1;
    c.send_bytes(&longest).await;
    assert_eq!(c.expect_err().await.code, code(ErrorCode::MalformedFrame));
    c.expect_closed().await;
    // One byte more is refused as soon as its length prefix arrives, with nothing else sent.
    let mut c = RawConn::connect(b.addr).await;
    c.send_bytes(&(brokerd_proto::MAX_HELLO_LEN as u32 + 1).to_be_bytes())
        .await;
    let e = c.expect_err().await;
    assert_eq!((e.req_id, e.code), (0, code(ErrorCode::FrameTooLarge)));
    c.expect_closed().await;
    // After the handshake the configured `max_frame` applies again.
    let mut c = RawConn::handshake(b.addr, "after", 0).await;
    c.send_bytes(&wire::publish(1, true, "big", &vec![0; 300_000]))
        .await;
    assert_eq!(
        c.recv().await,
        Some(Frame::Ack {
            req_id: 1,
            delivered: 0
        })
    );
    b.stop().await;
}

#[tokio::test]
async fn topic_length_and_token_limits() {
    let b = TestBroker::with_config(|c| {
        c.limits.max_topic_len = 16;
        c.limits.max_topic_tokens = 3;
    })
    .await;
    let mut c = RawConn::handshake(b.addr, "topics", 0).await;
    let long = "a".repeat(17);
    let longest = "a".repeat(16);

    c.send_bytes(&wire::sub(1, 1, &longest)).await;
    assert_eq!(c.recv().await, Some(Frame::Ok(1)));
    c.send_bytes(&wire::sub(2, 2, &long)).await;
    let e = c.expect_err().await;
    assert_eq!((e.req_id, e.code), (2, code(ErrorCode::InvalidFilter)));
    c.send_bytes(&wire::sub(3, 3, "a.b.>")).await;
    assert_eq!(c.recv().await, Some(Frame::Ok(3)));
    c.send_bytes(&wire::sub(4, 4, "a.b.c.>")).await;
    let e = c.expect_err().await;
    assert_eq!((e.req_id, e.code), (4, code(ErrorCode::InvalidFilter)));

    c.send_bytes(&wire::publish(5, true, &longest, b"x")).await;
    assert!(matches!(c.recv().await, Some(Frame::Msg(_))));
    assert!(matches!(c.recv().await, Some(Frame::Ack { req_id: 5, .. })));
    c.send_bytes(&wire::publish(6, true, &long, b"x")).await;
    let e = c.expect_err().await;
    assert_eq!((e.req_id, e.code), (6, code(ErrorCode::InvalidTopic)));
    c.send_bytes(&wire::publish(7, true, "a.b.c", b"x")).await;
    assert!(matches!(c.recv().await, Some(Frame::Msg(_))));
    assert!(matches!(c.recv().await, Some(Frame::Ack { req_id: 7, .. })));
    c.send_bytes(&wire::publish(8, true, "a.b.c.d", b"x")).await;
    let e = c.expect_err().await;
    assert_eq!((e.req_id, e.code), (8, code(ErrorCode::InvalidTopic)));

    c.send_bytes(&wire::ping(9)).await;
    assert_eq!(
        c.recv().await,
        Some(Frame::Pong(9)),
        "connection stays open"
    );
    b.stop().await;
}

#[tokio::test]
async fn subscriptions_per_connection_limit() {
    let b = TestBroker::with_config(|c| c.limits.max_subs_per_connection = 3).await;
    let mut c = RawConn::handshake(b.addr, "subs", 0).await;
    for sid in 1..=3 {
        c.send_bytes(&wire::sub(sid, sid, format!("s.{sid}"))).await;
        assert_eq!(c.recv().await, Some(Frame::Ok(sid)));
    }
    c.send_bytes(&wire::sub(4, 4, "s.4")).await;
    let e = c.expect_err().await;
    assert_eq!(
        (e.req_id, e.code),
        (4, code(ErrorCode::TooManySubscriptions))
    );
    // Ending one makes room again; the limit counts live subscriptions.
    c.send_bytes(&wire::unsub(5, 1, 0)).await;
    assert_eq!(c.recv().await, Some(Frame::Ok(5)));
    c.send_bytes(&wire::sub(6, 4, "s.4")).await;
    assert_eq!(c.recv().await, Some(Frame::Ok(6)));
    // The limit is per connection: another connection has its own.
    let mut other = RawConn::handshake(b.addr, "other", 0).await;
    other.send_bytes(&wire::sub(1, 1, "s.1")).await;
    assert_eq!(other.recv().await, Some(Frame::Ok(1)));
    assert_eq!(b.broker.stats().subscriptions, 4);
    b.stop().await;
}

#[tokio::test]
async fn connection_limit_answers_with_an_error_not_a_reset() {
    let b = TestBroker::with_config(|c| c.limits.max_connections = 3).await;
    let mut held = Vec::new();
    for i in 0..3 {
        held.push(RawConn::handshake(b.addr, &format!("held-{i}"), 0).await);
    }
    // A raw client that sends its HELLO at once, as a real client does.
    for _ in 0..5 {
        let mut c = RawConn::connect(b.addr).await;
        c.send_bytes(&wire::hello(1, "over", 0)).await;
        let e = c.expect_err().await;
        assert_eq!((e.req_id, e.code), (0, code(ErrorCode::TooManyConnections)));
        c.expect_closed().await;
    }
    // The client library reports it as a typed error.
    let e = Client::connect(b.addr, ConnectOptions::new("library"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::TooManyConnections), "{e}");
    assert_eq!(b.closes("too-many-connections"), 6);

    // A slot freed is a slot available.
    drop(held.pop());
    wait_until("the freed slot", || b.broker.stats().connections == 2).await;
    let mut again = RawConn::handshake(b.addr, "again", 0).await;
    again.send_bytes(&wire::ping(1)).await;
    assert_eq!(again.recv().await, Some(Frame::Pong(1)));
    b.stop().await;
}

#[tokio::test]
async fn handshake_timeout_closes_with_its_error() {
    let b = TestBroker::with_config(|c| c.timeouts.handshake = Duration::from_millis(200)).await;
    // Silent after connecting.
    let mut silent = RawConn::connect(b.addr).await;
    // Half a HELLO: the timeout covers the whole handshake, not the first byte.
    let mut partial = RawConn::connect(b.addr).await;
    partial.send_bytes(&wire::hello(1, "slow", 0)[..6]).await;
    for c in [&mut silent, &mut partial] {
        let e = c.expect_err().await;
        assert_eq!((e.req_id, e.code), (0, code(ErrorCode::HandshakeTimeout)));
        c.expect_closed().await;
    }
    assert_eq!(b.closes("handshake-timeout"), 2);
    // A prompt client is unaffected.
    let c = b.client("prompt").await;
    c.flush().await.unwrap();
    b.stop().await;
}

#[tokio::test]
async fn keepalive_closes_connections_that_do_not_answer_pings() {
    let b = TestBroker::with_config(|c| {
        c.timeouts.ping_interval = Duration::from_millis(100);
        c.timeouts.max_pings_outstanding = 2;
    })
    .await;
    // A half-open peer: handshaken, then never sends another byte.
    let mut mute = RawConn::handshake(b.addr, "mute", 0).await;
    // A raw peer that answers every PING, for six of them.
    let mut polite = RawConn::handshake(b.addr, "polite", 0).await;
    let polite = tokio::spawn(async move {
        for _ in 0..6 {
            match polite.recv().await {
                Some(Frame::Ping(t)) => polite.send_bytes(&wire::pong(t)).await,
                other => panic!("expected PING, got {other:?}"),
            }
        }
        polite
    });
    // The client library answers PINGs on its own.
    let library = b.client("library").await;

    let mut pings = Vec::new();
    let e = loop {
        match mute.recv().await {
            Some(Frame::Ping(t)) => pings.push(t),
            Some(Frame::Err(e)) => break e,
            other => panic!("expected PING or ERR, got {other:?}"),
        }
    };
    assert_eq!(
        pings.len(),
        2,
        "max_pings_outstanding pings, then the close"
    );
    assert_eq!((e.req_id, e.code), (0, code(ErrorCode::KeepaliveTimeout)));
    mute.expect_closed().await;

    // Meanwhile the answering peers were pinged too, and stay.
    let polite = polite.await.unwrap();
    library.flush().await.unwrap();
    let mut names: Vec<String> = b.broker.clients().iter().map(|c| c.name.clone()).collect();
    names.sort();
    assert_eq!(names, ["library", "polite"]);
    assert_eq!(b.closes("keepalive-timeout"), 1);
    drop(polite);
    b.stop().await;
}

#[tokio::test]
async fn silent_sockets_cannot_keep_clients_out() {
    let b = TestBroker::with_config(|c| {
        c.limits.max_connections = 20;
        c.limits.max_handshakes = 10;
    })
    .await;
    // Fifty sockets that never send a HELLO: more than both limits. Each one over the
    // handshake limit evicts the oldest, which gets ERR 14 and is closed.
    let mut silent = Vec::new();
    for _ in 0..50 {
        silent.push(RawConn::connect(b.addr).await);
    }
    wait_until("40 evictions", || b.closes("too-many-handshakes") == 40).await;
    for c in &mut silent[..40] {
        let e = c.expect_err().await;
        assert_eq!((e.req_id, e.code), (0, code(ErrorCode::TooManyConnections)));
        assert!(e.message.contains("handshake"), "{}", e.message);
        c.expect_closed().await;
    }
    // Clients that do send their HELLO get all of max_connections, silent sockets or not.
    let mut clients = Vec::new();
    for i in 0..20 {
        clients.push(b.client(&format!("real-{i}")).await);
    }
    b.wait_for_connections(20).await;
    // The connection limit is judged when the HELLO completes.
    let mut over = RawConn::connect(b.addr).await;
    over.send_bytes(&wire::hello(1, "over", 0)).await;
    let e = over.expect_err().await;
    assert_eq!((e.req_id, e.code), (0, code(ErrorCode::TooManyConnections)));
    over.expect_closed().await;
    wait_until("the refusal to be counted", || {
        b.closes("too-many-connections") == 1
    })
    .await;
    for c in &clients {
        c.flush().await.unwrap();
    }
    // The first client's handshake found the handshake limit full and evicted the oldest
    // silent socket; the others found the room it left, since each handshake ended at once.
    wait_until("41 evictions", || b.closes("too-many-handshakes") == 41).await;
    let e = silent[40].expect_err().await;
    assert_eq!((e.req_id, e.code), (0, code(ErrorCode::TooManyConnections)));
    assert_eq!(b.broker.stats().connections, 20);
    b.stop().await;
}

#[tokio::test]
async fn connections_per_address_are_limited() {
    let b = TestBroker::with_config(|c| c.limits.max_connections_per_address = 3).await;
    let busy = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 7));
    let other = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 8));
    // Handshakes and established connections both count.
    let mut held = vec![
        RawConn::connect_from(b.addr, busy)
            .await
            .hello("a", 0)
            .await,
        RawConn::connect_from(b.addr, busy)
            .await
            .hello("b", 0)
            .await,
        RawConn::connect_from(b.addr, busy).await,
    ];
    // The next one is refused at once, before it sends anything.
    let mut refused = RawConn::connect_from(b.addr, busy).await;
    let e = refused.expect_err().await;
    assert_eq!((e.req_id, e.code), (0, code(ErrorCode::TooManyConnections)));
    assert!(e.message.contains("address"), "{}", e.message);
    refused.expect_closed().await;
    wait_until("the refusal to be counted", || {
        b.closes("too-many-from-address") == 1
    })
    .await;
    // Another address is not affected.
    let mut elsewhere = RawConn::connect_from(b.addr, other)
        .await
        .hello("c", 0)
        .await;
    elsewhere.send_bytes(&wire::ping(1)).await;
    assert_eq!(elsewhere.recv().await, Some(Frame::Pong(1)));
    // A connection closed gives its address's share back.
    drop(held.remove(0));
    wait_until("the closed connection to be counted", || {
        b.closes("client-closed") == 1
    })
    .await;
    let mut again = RawConn::connect_from(b.addr, busy)
        .await
        .hello("d", 0)
        .await;
    again.send_bytes(&wire::ping(2)).await;
    assert_eq!(again.recv().await, Some(Frame::Pong(2)));
    assert_eq!(b.closes("too-many-from-address"), 1);
    b.stop().await;
}

#[tokio::test]
async fn a_trickled_frame_is_closed_at_its_deadline() {
    let b = TestBroker::with_config(|c| {
        c.timeouts.frame = Duration::from_millis(300);
        // 1 MiB/s: a 100-byte frame gets a tenth of a millisecond more.
        c.limits.min_frame_rate = 1 << 20;
    })
    .await;
    // Idle between frames, for longer than the frame deadline: not affected.
    let mut idle = RawConn::handshake(b.addr, "idle", 0).await;
    let trickler = RawConn::handshake(b.addr, "trickler", 0).await;
    let frame = wire::publish(2, true, "trickle", &[7; 100]);
    let (mut rd, mut wr) = trickler.stream.into_split();
    let replies = tokio::spawn(async move {
        let mut got = Vec::new();
        let _ = rd.read_to_end(&mut got).await;
        got
    });
    wr.write_all(&frame[..5]).await.unwrap();
    // One byte every 100 ms: each resets the keep-alive (30 s here anyway), none may move the
    // frame's deadline. The pace is what is tested, so it is a timer, not a wait for a condition.
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    let mut sent = 5;
    while sent < frame.len() - 1 && !replies.is_finished() {
        tick.tick().await;
        if wr.write_all(&frame[sent..=sent]).await.is_err() {
            break;
        }
        sent += 1;
    }
    assert!(sent < frame.len() - 1, "the frame was never cut off");
    let got = tokio::time::timeout(brokerd_tests::DEADLINE, replies)
        .await
        .unwrap()
        .unwrap();
    let mut got = bytes::BytesMut::from(&got[..]);
    let Some(Frame::Err(e)) = brokerd_proto::decode(&mut got, usize::MAX).unwrap() else {
        panic!("expected ERR, got {got:?}")
    };
    assert_eq!((e.req_id, e.code), (0, code(ErrorCode::KeepaliveTimeout)));
    assert!(e.message.contains("frame"), "{}", e.message);
    assert!(got.is_empty(), "nothing after the closing ERR");
    wait_until("the frame timeout to be counted", || {
        b.closes("frame-timeout") == 1
    })
    .await;
    assert_eq!(b.closes("keepalive-timeout"), 0);
    idle.send_bytes(&wire::ping(3)).await;
    assert_eq!(idle.recv().await, Some(Frame::Pong(3)));
    b.stop().await;
}
