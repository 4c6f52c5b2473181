//! Broker behaviour end to end: graceful shutdown delivers what is queued, bad input from one
//! client leaves every other client unaffected, request errors name their request, and overflow
//! policies account for every message.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use brokerd_client::{ConnectOptions, OverflowPolicy};
use brokerd_proto::{Body, ErrorCode, Frame, Hello, PROTOCOL_VERSION, Publish, Subscribe};
use brokerd_tests::{RawConn, TestBroker, wait_until, wire};

fn sub(req_id: u32, sid: u32, filter: &str) -> Frame {
    Frame::Sub(Subscribe {
        req_id,
        sid,
        filter: filter.into(),
        queue: None,
        stream: None,
    })
}

fn publish(req_id: u32, ack: bool, topic: &str, payload: &[u8]) -> Frame {
    Frame::Pub(Publish {
        req_id,
        ack,
        body: Body::parse(Body::encode(topic, None, None, payload)).unwrap(),
    })
}

fn err_code(f: Option<Frame>) -> u16 {
    match f {
        Some(Frame::Err(e)) => e.code,
        other => panic!("expected ERR, got {other:?}"),
    }
}

/// A subscriber and a publisher that keep working while something else misbehaves.
async fn canary_round_trip(b: &TestBroker, n: u32) {
    let s = b.client("canary-sub").await;
    let p = b.client("canary-pub").await;
    let mut subn = s.subscribe("canary.>").await.unwrap();
    for i in 0..n {
        assert_eq!(
            p.publish("canary.ping", format!("{i}"))
                .acked()
                .await
                .unwrap(),
            1
        );
        let m = subn.next().await.unwrap();
        assert_eq!(&m.payload()[..], format!("{i}").as_bytes());
    }
}

#[tokio::test]
async fn graceful_shutdown_delivers_everything_already_queued() {
    let b = TestBroker::start().await;
    let mut raw = b.raw("slow-reader").await;
    raw.send(&sub(2, 1, "load.>")).await;
    assert_eq!(raw.recv().await, Some(Frame::Ok(2)));
    let p = b.client("publisher").await;
    let payload = vec![b'x'; 1024];
    const N: u64 = 20_000;
    for _ in 0..N - 1 {
        p.publish("load.data", &payload).await.unwrap();
    }
    assert_eq!(p.publish("load.data", &payload).acked().await.unwrap(), 1);
    // Far more than the socket buffers hold is now waiting in the outbox.
    b.begin_shutdown();
    let mut seqs = 0u64;
    let last = loop {
        match raw.recv().await {
            Some(Frame::Msg(m)) => {
                seqs += 1;
                assert_eq!(m.seq, seqs);
            }
            other => break other,
        }
    };
    assert_eq!(seqs, N);
    assert_eq!(err_code(last), ErrorCode::ShuttingDown as u16);
    assert_eq!(raw.recv().await, None);
    b.stop().await;
}

#[tokio::test]
async fn bad_frames_get_errors_and_close_only_their_own_connection() {
    let b = TestBroker::start().await;
    let s = b.client("bystander-sub").await;
    let p = b.client("bystander-pub").await;
    let mut bystander = s.subscribe("orders.*").await.unwrap();

    // Unknown frame type after the handshake.
    let mut c = b.raw("bad-type").await;
    c.send_bytes(&[0, 0, 0, 1, 0x7f]).await;
    assert_eq!(err_code(c.recv().await), ErrorCode::UnknownFrameType as u16);
    assert_eq!(c.recv().await, None);

    // A frame before the handshake.
    let mut c = RawConn::connect(b.addr).await;
    c.send(&sub(1, 1, "x")).await;
    assert_eq!(
        err_code(c.recv().await),
        ErrorCode::HandshakeRequired as u16
    );
    assert_eq!(c.recv().await, None);

    // A protocol version the server does not speak.
    let mut c = RawConn::connect(b.addr).await;
    c.send(&Frame::Hello(Hello {
        req_id: 1,
        version: PROTOCOL_VERSION + 1,
        no_echo: false,
        overflow: None,
        name: "future".into(),
        credentials: None,
    }))
    .await;
    assert_eq!(
        err_code(c.recv().await),
        ErrorCode::UnsupportedVersion as u16
    );
    assert_eq!(c.recv().await, None);

    // A later version's HELLO that does not parse as version 1 (here: bytes after the name) is
    // still refused as a version, not as a malformed frame.
    let mut c = RawConn::connect(b.addr).await;
    let mut hello = wire::hello_version(1, PROTOCOL_VERSION + 1, "future", 0);
    hello.extend_from_slice(&[0xAA, 0xBB]);
    let len = u32::try_from(hello.len() - 4).unwrap();
    hello[..4].copy_from_slice(&len.to_be_bytes());
    c.send_bytes(&hello).await;
    assert_eq!(
        err_code(c.recv().await),
        ErrorCode::UnsupportedVersion as u16
    );
    assert_eq!(c.recv().await, None);
    // The same bytes with version 1 are malformed.
    let mut c = RawConn::connect(b.addr).await;
    hello[9..11].copy_from_slice(&PROTOCOL_VERSION.to_be_bytes());
    c.send_bytes(&hello).await;
    assert_eq!(err_code(c.recv().await), ErrorCode::MalformedFrame as u16);

    // A well-formed HELLO asking for an overflow policy this version does not define.
    let mut c = RawConn::connect(b.addr).await;
    c.send_bytes(&[0, 0, 0, 12, 0x01, 0, 0, 0, 1, 0, 1, 0, 7, 0, 1, b'x'])
        .await;
    assert_eq!(err_code(c.recv().await), ErrorCode::InvalidOption as u16);
    assert_eq!(c.recv().await, None);

    // A length far beyond the maximum frame.
    let mut c = b.raw("huge").await;
    c.send_bytes(&[0x7f, 0xff, 0xff, 0xff, 0x02]).await;
    assert_eq!(err_code(c.recv().await), ErrorCode::FrameTooLarge as u16);
    assert_eq!(c.recv().await, None);

    // A truncated body inside a well-formed length.
    let mut c = b.raw("truncated").await;
    c.send_bytes(&[0, 0, 0, 8, 0x02, 0, 0, 0, 1, 0, 0, 0]).await;
    assert_eq!(err_code(c.recv().await), ErrorCode::MalformedFrame as u16);
    assert_eq!(c.recv().await, None);

    // A second handshake.
    let mut c = b.raw("twice").await;
    c.send(&Frame::Hello(Hello {
        req_id: 9,
        version: PROTOCOL_VERSION,
        no_echo: false,
        overflow: None,
        name: "again".into(),
        credentials: None,
    }))
    .await;
    assert_eq!(
        err_code(c.recv().await),
        ErrorCode::DuplicateHandshake as u16
    );
    assert_eq!(c.recv().await, None);

    // Everyone else is unaffected.
    assert_eq!(
        p.publish("orders.new", "still here").acked().await.unwrap(),
        1
    );
    assert_eq!(
        &bystander.next().await.unwrap().payload()[..],
        b"still here"
    );
    canary_round_trip(&b, 10).await;
    wait_until("bad connections to be gone", || {
        b.broker.stats().connections == 4
    })
    .await;
    b.stop().await;
}

/// Before the handshake only HELLO is read: a PING, a PONG or a server-only frame gets `ERR 8`,
/// an undefined type byte `ERR 3`. Every `ERR` that closes a connection carries `req_id` 0, even
/// one refusing a HELLO, except a second HELLO's `ERR 9`, which names it.
#[tokio::test]
async fn closing_errors_name_no_request_except_a_second_hello() {
    let b = TestBroker::start().await;
    let server_only = vec![0, 0, 0, 5, 0x82, 0, 0, 0, 7];
    let undefined = vec![0, 0, 0, 5, 0x7f, 0, 0, 0, 7];
    let before = [
        (wire::ping(7), ErrorCode::HandshakeRequired),
        (wire::pong(7), ErrorCode::HandshakeRequired),
        (wire::sub(7, 1, "a"), ErrorCode::HandshakeRequired),
        (server_only.clone(), ErrorCode::HandshakeRequired),
        (undefined.clone(), ErrorCode::UnknownFrameType),
        (
            wire::hello_version(7, PROTOCOL_VERSION + 1, "v", 0),
            ErrorCode::UnsupportedVersion,
        ),
        (wire::hello(7, "x", 7), ErrorCode::InvalidOption),
    ];
    for (bytes, code) in before {
        let mut c = RawConn::connect(b.addr).await;
        c.send_bytes(&bytes).await;
        let e = c.expect_err().await;
        assert_eq!((e.req_id, e.code), (0, code as u16), "{bytes:02x?}");
        c.expect_closed().await;
    }
    let after = [
        (server_only, ErrorCode::UnknownFrameType),
        (undefined, ErrorCode::UnknownFrameType),
        (
            vec![0, 0, 0, 8, 0x02, 0, 0, 0, 7, 0, 0, 0],
            ErrorCode::MalformedFrame,
        ),
    ];
    for (bytes, code) in after {
        let mut c = b.raw("after").await;
        c.send_bytes(&bytes).await;
        let e = c.expect_err().await;
        assert_eq!((e.req_id, e.code), (0, code as u16), "{bytes:02x?}");
        c.expect_closed().await;
    }
    let mut c = b.raw("twice").await;
    c.send_bytes(&wire::hello(9, "again", 0)).await;
    let e = c.expect_err().await;
    assert_eq!(
        (e.req_id, e.code),
        (9, ErrorCode::DuplicateHandshake as u16)
    );
    c.expect_closed().await;
    b.stop().await;
}

#[tokio::test]
async fn request_errors_name_the_request_and_keep_the_connection() {
    let b = TestBroker::start().await;
    let mut c = b.raw("errors").await;
    c.send(&publish(10, true, "bad.*.topic", b"x")).await;
    let Some(Frame::Err(e)) = c.recv().await else {
        panic!("expected ERR")
    };
    assert_eq!((e.req_id, e.code), (10, ErrorCode::InvalidTopic as u16));
    c.send(&publish(11, false, "$SYS.x", b"x")).await;
    let Some(Frame::Err(e)) = c.recv().await else {
        panic!("expected ERR")
    };
    assert_eq!((e.req_id, e.code), (11, ErrorCode::ReservedTopic as u16));
    c.send(&sub(12, 1, "a.>.b")).await;
    let Some(Frame::Err(e)) = c.recv().await else {
        panic!("expected ERR")
    };
    assert_eq!((e.req_id, e.code), (12, ErrorCode::InvalidFilter as u16));
    c.send(&sub(13, 1, "a.>")).await;
    assert_eq!(c.recv().await, Some(Frame::Ok(13)));
    c.send(&sub(14, 1, "b.>")).await;
    let Some(Frame::Err(e)) = c.recv().await else {
        panic!("expected ERR")
    };
    assert_eq!(
        (e.req_id, e.code),
        (14, ErrorCode::DuplicateSubscription as u16)
    );
    // Subscribed and acknowledged: its own publish comes back.
    c.send(&publish(15, true, "a.b", b"mine")).await;
    let Some(Frame::Msg(m)) = c.recv().await else {
        panic!("expected MSG")
    };
    assert_eq!((m.sid, m.seq, &m.body.payload()[..]), (1, 1, &b"mine"[..]));
    assert_eq!(
        c.recv().await,
        Some(Frame::Ack {
            req_id: 15,
            delivered: 1
        })
    );
    c.send(&Frame::Ping(77)).await;
    assert_eq!(c.recv().await, Some(Frame::Pong(77)));
    b.stop().await;
}

#[tokio::test]
async fn client_errors_are_typed() {
    let b = TestBroker::with_config(|c| c.limits.max_subs_per_connection = 1).await;
    let c = b.client("typed").await;
    // A fresh client has published nothing yet: an empty topic is still refused, and the topic
    // is judged before the payload's size.
    assert!(matches!(
        c.publish("", "x").await,
        Err(brokerd_client::Error::InvalidTopic(_))
    ));
    let oversized = vec![0u8; c.server_info().max_payload as usize + 1];
    assert!(matches!(
        c.publish("bad topic", &oversized).await,
        Err(brokerd_client::Error::InvalidTopic(_))
    ));
    assert!(matches!(
        c.publish("fine", &oversized).await,
        Err(brokerd_client::Error::PayloadTooLarge { .. })
    ));
    let _first = c.subscribe("a").await.unwrap();
    let e = c.subscribe("b").await.unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::TooManySubscriptions));
    assert!(matches!(
        c.publish("bad topic", "x").await,
        Err(brokerd_client::Error::InvalidTopic(_))
    ));
    // The client remembers the last valid topic; a different, invalid one is still refused,
    // before and after the valid one is published again.
    c.publish("good.topic", "x").await.unwrap();
    assert!(matches!(
        c.publish("good.*", "x").await,
        Err(brokerd_client::Error::InvalidTopic(_))
    ));
    c.publish("good.topic", "x").await.unwrap();
    assert!(matches!(
        c.publish("good.topic.", "x").await,
        Err(brokerd_client::Error::InvalidTopic(_))
    ));
    b.stop().await;
}

/// A subscriber that does not read while 64 MiB is published to it, then reads everything.
async fn stalled_subscriber(policy: OverflowPolicy) -> (u64, u64, Option<Frame>) {
    let b = TestBroker::with_config(|c| {
        c.outbound.max_pending_msgs = 8;
        c.outbound.overflow = policy;
        // The subscriber stalls on purpose; the write deadline must not end it first.
        c.outbound.write_deadline = std::time::Duration::from_secs(3600);
    })
    .await;
    let mut raw = b.raw("stalled").await;
    raw.send(&sub(2, 1, "big")).await;
    assert_eq!(raw.recv().await, Some(Frame::Ok(2)));
    let p = b.client("fast-publisher").await;
    let payload = vec![7u8; 64 * 1024];
    const N: u64 = 1024;
    for _ in 0..N {
        p.publish("big", &payload).await.unwrap();
    }
    p.flush().await.unwrap();
    let (mut received, mut missed, mut last_seq) = (0u64, 0u64, 0u64);
    let end = loop {
        if received + missed == N {
            break None;
        }
        match raw.recv().await {
            Some(Frame::Msg(m)) => {
                assert!(m.seq > last_seq, "sequence numbers increase");
                last_seq = m.seq;
                received += 1;
            }
            Some(Frame::Lost(l)) => missed += l.missed,
            other => break other,
        }
    };
    canary_round_trip(&b, 3).await;
    b.stop().await;
    (received, missed, end)
}

#[tokio::test]
async fn drop_new_reports_exactly_what_it_dropped() {
    let (received, missed, end) = stalled_subscriber(OverflowPolicy::DropNew).await;
    assert_eq!(end, None);
    assert_eq!(received + missed, 1024);
    assert!(missed > 0, "the stalled subscriber must have lost messages");
}

#[tokio::test]
async fn drop_old_reports_exactly_what_it_dropped() {
    let (received, missed, end) = stalled_subscriber(OverflowPolicy::DropOld).await;
    assert_eq!(end, None);
    assert_eq!(received + missed, 1024);
    assert!(missed > 0, "the stalled subscriber must have lost messages");
}

#[tokio::test]
async fn disconnect_policy_closes_with_slow_consumer() {
    let (_, _, end) = stalled_subscriber(OverflowPolicy::Disconnect).await;
    assert_eq!(err_code(end), ErrorCode::SlowConsumer as u16);
}

#[tokio::test]
async fn client_chooses_its_overflow_policy_in_the_handshake() {
    let b = TestBroker::start().await;
    let c = brokerd_client::Client::connect(
        b.addr,
        ConnectOptions::new("picky").overflow(OverflowPolicy::DropOld),
    )
    .await
    .unwrap();
    assert_eq!(c.server_info().overflow, OverflowPolicy::DropOld);
    assert_eq!(
        b.client("default").await.server_info().overflow,
        OverflowPolicy::DropNew
    );
    b.stop().await;
}
