//! The client library across a broker restart: reconnect with resubscription (queue groups and
//! the request inbox included), publishes buffered while disconnected and their bound, calls
//! that need the server failing fast, giving up after the attempts allowed, and the frame limit
//! the server's `WELCOME` announced.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use brokerd_client::{Client, CloseReason, ConnectOptions, Error, Event, Reconnect};
use brokerd_proto::{Frame, OverflowPolicy, PROTOCOL_VERSION, Welcome, decode};
use brokerd_tests::TestBroker;
use bytes::BytesMut;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::broadcast::Receiver;

/// How long any wait may take.
const DEADLINE: Duration = Duration::from_secs(20);

fn quick() -> Reconnect {
    Reconnect::default().delays(Duration::from_millis(20), Duration::from_millis(200))
}

async fn restart_on(addr: SocketAddr) -> TestBroker {
    TestBroker::with_config(|c| c.listen = addr).await
}

/// Waits for the first event `pick` accepts, skipping the others.
async fn wait_for<T>(events: &mut Receiver<Event>, mut pick: impl FnMut(&Event) -> Option<T>) -> T {
    tokio::time::timeout(DEADLINE, async {
        loop {
            let e = events.recv().await.expect("event stream open");
            if let Some(t) = pick(&e) {
                return t;
            }
        }
    })
    .await
    .expect("event within the deadline")
}

#[tokio::test]
async fn a_client_reconnects_after_a_restart_and_makes_its_subscriptions_again() {
    let first = TestBroker::start().await;
    let addr = first.addr;
    let client = Client::connect(addr, ConnectOptions::new("survivor").reconnect(quick()))
        .await
        .unwrap();
    let mut events = client.events();
    let mut orders = client.subscribe("orders.*").await.unwrap();
    let mut jobs = client.subscribe_queue("jobs", "workers").await.unwrap();
    let responder = client.subscribe("price.quote").await.unwrap();
    // The request inbox exists before the restart and must exist after it.
    let publisher = first.client("before").await;
    assert_eq!(
        publisher.publish("orders.new", "1").acked().await.unwrap(),
        1
    );
    assert_eq!(orders.next().await.unwrap().seq(), 1);
    let _ = client
        .request("nobody.home", "x", Duration::from_millis(200))
        .await;
    drop(publisher);

    first.stop().await;
    wait_for(&mut events, |e| {
        matches!(e, Event::ServerShuttingDown).then_some(())
    })
    .await;
    wait_for(&mut events, |e| {
        matches!(e, Event::Disconnected { .. }).then_some(())
    })
    .await;
    assert!(!client.is_connected());

    let second = restart_on(addr).await;
    let server = wait_for(&mut events, |e| match e {
        Event::Reconnected { server, .. } => Some(server.clone()),
        _ => None,
    })
    .await;
    assert_eq!(server, addr.to_string());
    assert!(client.is_connected());
    assert_eq!(client.server_info().server_id, second_id(&second).await);

    let publisher = second.client("after").await;
    // The subscriptions are on the new broker as soon as the client says it reconnected: the
    // SUB frames were the first it sent. Wait for their OKs with a flush.
    client.flush().await.unwrap();
    assert_eq!(
        publisher.publish("orders.paid", "2").acked().await.unwrap(),
        1
    );
    assert_eq!(publisher.publish("jobs", "3").acked().await.unwrap(), 1);
    let m = orders.next().await.unwrap();
    assert_eq!((m.topic(), &m.payload()[..]), ("orders.paid", &b"2"[..]));
    // New on the server, so counted from 1 again; the subscription says it was made again.
    assert_eq!(m.seq(), 1);
    assert_eq!(orders.resubscribed(), 1);
    assert_eq!(&jobs.next().await.unwrap().payload()[..], b"3");

    // Requests work through the client's inbox, made again, and its responder subscription
    // answers requests from others.
    let mut responder = responder;
    let answer = tokio::spawn(async move {
        let req = responder.next().await.unwrap();
        req.respond("42").await.unwrap();
    });
    let reply = publisher
        .request("price.quote", "mug", Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(&reply.payload()[..], b"42");
    answer.await.unwrap();
    let mut echo = publisher.subscribe("echo").await.unwrap();
    let echoer = tokio::spawn(async move {
        let req = echo.next().await.unwrap();
        req.respond(req.payload()).await.unwrap();
    });
    let reply = client
        .request("echo", "hello", Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(&reply.payload()[..], b"hello");
    echoer.await.unwrap();
    client.close().await.unwrap();
    second.stop().await;
}

async fn second_id(b: &TestBroker) -> String {
    b.client("id").await.server_info().server_id.clone()
}

#[tokio::test]
async fn publishes_wait_in_a_bounded_buffer_while_calls_that_need_the_server_fail_fast() {
    let first = TestBroker::start().await;
    let addr = first.addr;
    let options = ConnectOptions::new("buffering")
        .reconnect(quick().buffer_bytes(4096))
        .no_echo(false);
    let client = Client::connect(addr, options).await.unwrap();
    let mut events = client.events();
    let mut own = client.subscribe("buffered.>").await.unwrap();
    first.stop().await;
    wait_for(&mut events, |e| {
        matches!(e, Event::Disconnected { .. }).then_some(())
    })
    .await;

    // Buffered: about 4 KiB of small publishes fit.
    let mut sent = 0u32;
    let refused = loop {
        match client.publish("buffered.n", sent.to_string()).await {
            Ok(()) => sent += 1,
            Err(e) => break e,
        }
        assert!(sent < 10_000, "the buffer has no bound");
    };
    assert!(
        matches!(refused, Error::ReconnectBufferFull { limit: 4096 }),
        "{refused:?}"
    );
    assert!(sent > 10, "only {sent} publishes were buffered");
    // Calls that need an answer fail at once.
    let started = tokio::time::Instant::now();
    let e = client.publish("buffered.x", "x").acked().await.unwrap_err();
    assert!(matches!(e, Error::Disconnected(_)), "{e:?}");
    let e = client
        .request("buffered.req", "x", Duration::from_secs(10))
        .await
        .unwrap_err();
    assert!(matches!(e, Error::Disconnected(_)), "{e:?}");
    let e = client.flush().await.unwrap_err();
    assert!(matches!(e, Error::Disconnected(_)), "{e:?}");
    assert!(started.elapsed() < Duration::from_secs(5));

    // After the reconnect the subscription is made before the buffered publishes are sent,
    // so the client receives its own buffered messages, in order.
    let second = restart_on(addr).await;
    for n in 0..sent {
        let m = tokio::time::timeout(DEADLINE, own.next())
            .await
            .expect("buffered message")
            .expect("stream open");
        assert_eq!(m.payload(), n.to_string().as_bytes());
    }
    client.close().await.unwrap();
    second.stop().await;
}

#[tokio::test]
async fn a_client_gives_up_after_its_attempts_and_closes() {
    let b = TestBroker::start().await;
    let client = Client::connect(
        b.addr,
        ConnectOptions::new("quitter").reconnect(
            Reconnect::default()
                .max_attempts(3)
                .delays(Duration::from_millis(10), Duration::from_millis(20)),
        ),
    )
    .await
    .unwrap();
    let mut events = client.events();
    let mut sub = client.subscribe("x").await.unwrap();
    b.stop().await;
    let reason = wait_for(&mut events, |e| match e {
        Event::Closed { reason } => Some(reason.clone()),
        _ => None,
    })
    .await;
    assert!(
        matches!(reason, CloseReason::ReconnectFailed { attempts: 3, .. }),
        "{reason}"
    );
    assert!(
        tokio::time::timeout(DEADLINE, sub.next())
            .await
            .unwrap()
            .is_none()
    );
    let e = client.publish("x", "y").await.unwrap_err();
    assert!(matches!(e, Error::Closed(_)), "{e:?}");
}

#[tokio::test]
async fn without_reconnect_a_lost_connection_closes_the_client() {
    let b = TestBroker::start().await;
    let client = b.client("plain").await;
    let mut events = client.events();
    let mut sub = client.subscribe("x").await.unwrap();
    b.stop().await;
    wait_for(&mut events, |e| {
        matches!(e, Event::Closed { .. }).then_some(())
    })
    .await;
    assert!(
        tokio::time::timeout(DEADLINE, sub.next())
            .await
            .unwrap()
            .is_none()
    );
    assert!(matches!(
        client.publish("x", "y").await.unwrap_err(),
        Error::Closed(_)
    ));
}

/// A server that announces a 1 KiB frame limit and then sends a frame announcing 1 MiB: the
/// client must not buffer it, and ends the connection instead.
#[tokio::test]
async fn the_reader_holds_the_server_to_its_own_frame_limit() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        let mut buf = BytesMut::new();
        loop {
            if let Some(Frame::Hello(_)) = decode(&mut buf, 1 << 16).unwrap() {
                break;
            }
            assert!(s.read_buf(&mut buf).await.unwrap() > 0);
        }
        let welcome = Frame::Welcome(Welcome {
            req_id: 0,
            version: PROTOCOL_VERSION,
            overflow: OverflowPolicy::DropNew,
            max_frame: 1024,
            max_payload: 512,
            max_topic_len: 256,
            max_topic_tokens: 16,
            max_subs: 16,
            max_pending_msgs: 16,
            max_pending_bytes: 1 << 20,
            server_id: "fake".into(),
        });
        s.write_all(&welcome.to_bytes()).await.unwrap();
        // A length prefix of 1 MiB, then a trickle that never completes it.
        s.write_all(&(1u32 << 20).to_be_bytes()).await.unwrap();
        s.write_all(&[0x85; 4096]).await.unwrap();
        // Read until the client hangs up.
        let mut sink = [0u8; 1024];
        while matches!(s.read(&mut sink).await, Ok(n) if n > 0) {}
    });
    let client = Client::connect(addr, ConnectOptions::new("wary"))
        .await
        .unwrap();
    assert_eq!(client.server_info().max_frame, 1024);
    // The client closes (it may already have, before this line ran).
    let reason = tokio::time::timeout(DEADLINE, async {
        loop {
            match client.publish("x", "y").await {
                Err(Error::Closed(reason)) => return reason,
                _ => tokio::time::sleep(Duration::from_millis(10)).await,
            }
        }
    })
    .await
    .expect("the client closes");
    assert!(
        matches!(&reason, CloseReason::Protocol(what) if what.contains("undecodable")),
        "{reason}"
    );
    tokio::time::timeout(DEADLINE, server)
        .await
        .unwrap()
        .unwrap();
}
