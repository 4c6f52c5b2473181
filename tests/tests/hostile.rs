//! Hostile input (issue 4), against a live server from many connections at once: random bytes,
//! truncated frames, lengths far larger than the data, invalid UTF-8 and wildcards in publish
//! topics, unknown frame types, frames before the handshake, a second handshake. Each gets its
//! documented error (`docs/protocol.md` section 5.1), while a canary publisher and subscriber
//! exchange messages the whole time.
//!
//! The server runs in this process, where a panicking connection task would be swallowed by
//! tokio; so the test also counts panics with a hook, checks that every hostile connection is gone
//! from the broker's statistics (a panicked task never deregisters), and that every close was
//! counted under the reason its outcome implies. The decoder alone is fuzzed by `fuzz/`
//! (`scripts/fuzz.sh`).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use brokerd_proto::{ErrorCode, Frame};
use brokerd_tests::{DEADLINE, RawConn, Rng, TestBroker, wire};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;
use tokio::io::AsyncWriteExt;

/// Hostile tasks running at once, and rounds of every kind each runs.
const TASKS: u64 = 50;
const ROUNDS: u64 = 6;

static PANICS: AtomicUsize = AtomicUsize::new(0);

/// How a hostile connection ended, as seen from the client.
#[derive(Debug, Default)]
struct Tally {
    /// Closed after an `ERR` with a closing code (counted as `protocol-error`).
    protocol: AtomicU64,
    /// Closed without an `ERR`, after the client half-closed (counted as `client-closed`).
    silent: AtomicU64,
    connections: AtomicU64,
}

#[derive(Debug, Clone, Copy)]
enum Kind {
    RandomBeforeHandshake,
    RandomAfterHandshake,
    RandomSmallFrames,
    CutOffMidFrame,
    FieldsCutShortByLength,
    LengthBeyondMaxFrame,
    LengthBeyondData,
    InvalidUtf8Topic,
    InvalidUtf8Filter,
    WildcardTopic,
    UnknownFrameType,
    ServerOnlyFrame,
    FrameBeforeHandshake,
    SecondHandshake,
    WrongVersion,
}

const KINDS: [Kind; 15] = [
    Kind::RandomBeforeHandshake,
    Kind::RandomAfterHandshake,
    Kind::RandomSmallFrames,
    Kind::CutOffMidFrame,
    Kind::FieldsCutShortByLength,
    Kind::LengthBeyondMaxFrame,
    Kind::LengthBeyondData,
    Kind::InvalidUtf8Topic,
    Kind::InvalidUtf8Filter,
    Kind::WildcardTopic,
    Kind::UnknownFrameType,
    Kind::ServerOnlyFrame,
    Kind::FrameBeforeHandshake,
    Kind::SecondHandshake,
    Kind::WrongVersion,
];

/// Expects a closing `ERR` with `code`, then the close.
async fn expect_fatal(c: &mut RawConn, code: ErrorCode, tally: &Tally, kind: Kind) {
    let e = c.expect_err().await;
    assert_eq!(e.code, code as u16, "{kind:?}: {e:?}");
    c.expect_closed().await;
    tally.protocol.fetch_add(1, Ordering::Relaxed);
}

/// Half-closes, then reads to the end: any `ERR` must be a documented code, and one that closes
/// must be the last frame; returns whether the server closed with an `ERR`.
async fn drain_after_half_close(c: &mut RawConn, tally: &Tally, kind: Kind) {
    // The server may have closed already; reading tells what it sent before.
    let _ = c.stream.shutdown().await;
    let mut fatal = false;
    let mut frames = 0;
    while let Some(f) = c.recv().await {
        frames += 1;
        assert!(frames < 100, "{kind:?}: endless replies");
        assert!(!fatal, "{kind:?}: {f:?} after a closing ERR");
        if let Frame::Err(e) = f {
            let code = ErrorCode::ALL
                .iter()
                .find(|c| **c as u16 == e.code)
                .unwrap_or_else(|| panic!("{kind:?}: undocumented code {}", e.code));
            fatal = code.closes_connection();
        }
    }
    if fatal {
        tally.protocol.fetch_add(1, Ordering::Relaxed);
    } else {
        tally.silent.fetch_add(1, Ordering::Relaxed);
    }
}

async fn handshaken(addr: SocketAddr) -> RawConn {
    RawConn::handshake(addr, "hostile", 0).await
}

async fn hostile(addr: SocketAddr, kind: Kind, rng: &mut Rng, tally: &Tally) {
    tally.connections.fetch_add(1, Ordering::Relaxed);
    match kind {
        Kind::RandomBeforeHandshake => {
            let mut c = RawConn::connect(addr).await;
            let n = 1 + rng.below(64);
            let _ = c.try_send_bytes(&rng.bytes(n)).await;
            drain_after_half_close(&mut c, tally, kind).await;
        }
        Kind::RandomAfterHandshake => {
            let mut c = handshaken(addr).await;
            let n = 1 + rng.below(256);
            let _ = c.try_send_bytes(&rng.bytes(n)).await;
            drain_after_half_close(&mut c, tally, kind).await;
        }
        Kind::RandomSmallFrames => {
            // Plausible lengths and types with random fields: reaches the per-type parsers.
            let mut c = handshaken(addr).await;
            let mut f = Vec::new();
            for _ in 0..4 {
                let len = 1 + rng.below(24);
                f.extend((len as u32).to_be_bytes());
                f.push(1 + rng.below(6) as u8);
                f.extend(rng.bytes(len - 1));
            }
            let _ = c.try_send_bytes(&f).await;
            drain_after_half_close(&mut c, tally, kind).await;
        }
        Kind::CutOffMidFrame => {
            let mut c = handshaken(addr).await;
            let f = wire::publish(2, true, "cut.off", b"payload");
            let cut = 1 + rng.below(f.len() - 1);
            c.send_bytes(&f[..cut]).await;
            drain_after_half_close(&mut c, tally, kind).await;
        }
        Kind::FieldsCutShortByLength => {
            // A PUB whose length ends inside its topic.
            let mut c = handshaken(addr).await;
            c.send_bytes(&[0, 0, 0, 9, 0x02, 0, 0, 0, 1, 0, 0, 0, 20])
                .await;
            expect_fatal(&mut c, ErrorCode::MalformedFrame, tally, kind).await;
        }
        Kind::LengthBeyondMaxFrame => {
            let mut c = handshaken(addr).await;
            let len = 0x0200_0000u32 + rng.below(1 << 30) as u32;
            let mut f = len.to_be_bytes().to_vec();
            f.extend([0x02, 1, 2, 3]);
            c.send_bytes(&f).await;
            expect_fatal(&mut c, ErrorCode::FrameTooLarge, tally, kind).await;
        }
        Kind::LengthBeyondData => {
            // Within max_frame, but the data never comes: the server waits, then sees the end.
            let mut c = handshaken(addr).await;
            let len = 1_000 + rng.below(1_000_000) as u32;
            let mut f = len.to_be_bytes().to_vec();
            f.extend([0x02, 0, 0, 0, 1, 0, 0, 4, b'a']);
            c.send_bytes(&f).await;
            drain_after_half_close(&mut c, tally, kind).await;
        }
        Kind::InvalidUtf8Topic => {
            let mut c = handshaken(addr).await;
            c.send_bytes(&wire::publish(2, true, b"user.\xff\xfe", b"x"))
                .await;
            expect_fatal(&mut c, ErrorCode::MalformedFrame, tally, kind).await;
        }
        Kind::InvalidUtf8Filter => {
            let mut c = handshaken(addr).await;
            c.send_bytes(&wire::sub(2, 1, b"a.\xc3")).await;
            expect_fatal(&mut c, ErrorCode::MalformedFrame, tally, kind).await;
        }
        Kind::WildcardTopic => {
            let mut c = handshaken(addr).await;
            let topic = ["user.*", "user.>", "*", "a.b*", ">"][rng.below(5)];
            c.send_bytes(&wire::publish(7, true, topic, b"x")).await;
            let e = c.expect_err().await;
            assert_eq!((e.req_id, e.code), (7, ErrorCode::InvalidTopic as u16));
            // Not fatal: the connection still answers.
            c.send_bytes(&wire::ping(8)).await;
            assert_eq!(c.recv().await, Some(Frame::Pong(8)));
            drain_after_half_close(&mut c, tally, kind).await;
        }
        Kind::UnknownFrameType => {
            let mut c = handshaken(addr).await;
            let kind_byte = [0x00, 0x08, 0x40, 0x7f, 0x80, 0x88, 0xff][rng.below(7)];
            c.send_bytes(&[0, 0, 0, 1, kind_byte]).await;
            expect_fatal(&mut c, ErrorCode::UnknownFrameType, tally, kind).await;
        }
        Kind::ServerOnlyFrame => {
            // A well-formed OK frame, which only servers send.
            let mut c = handshaken(addr).await;
            c.send_bytes(&[0, 0, 0, 5, 0x82, 0, 0, 0, 1]).await;
            expect_fatal(&mut c, ErrorCode::UnknownFrameType, tally, kind).await;
        }
        Kind::FrameBeforeHandshake => {
            let mut c = RawConn::connect(addr).await;
            let f = match rng.below(3) {
                0 => wire::sub(1, 1, "a"),
                1 => wire::publish(1, false, "a", b"x"),
                _ => wire::ping(1),
            };
            c.send_bytes(&f).await;
            expect_fatal(&mut c, ErrorCode::HandshakeRequired, tally, kind).await;
        }
        Kind::SecondHandshake => {
            let mut c = handshaken(addr).await;
            c.send_bytes(&wire::hello(5, "again", 0)).await;
            let e = c.expect_err().await;
            assert_eq!(
                (e.req_id, e.code),
                (5, ErrorCode::DuplicateHandshake as u16)
            );
            c.expect_closed().await;
            tally.protocol.fetch_add(1, Ordering::Relaxed);
        }
        Kind::WrongVersion => {
            let mut c = RawConn::connect(addr).await;
            c.send_bytes(&wire::hello_version(1, 2 + rng.below(100) as u16, "v", 0))
                .await;
            expect_fatal(&mut c, ErrorCode::UnsupportedVersion, tally, kind).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_hostile_connections_get_their_errors_while_a_canary_keeps_working() {
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        PANICS.fetch_add(1, Ordering::SeqCst);
        previous(info);
    }));
    let b = TestBroker::start().await;

    // The canary: one acknowledged round trip after another until told to stop.
    let canary_sub = b.client("canary-sub").await;
    let canary_pub = b.client("canary-pub").await;
    let mut stream = canary_sub.subscribe("canary.>").await.unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let exchanged = Arc::new(AtomicU64::new(0));
    let canary = tokio::spawn({
        let (stop, exchanged) = (stop.clone(), exchanged.clone());
        async move {
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) && i < 10_000_000 {
                let payload = i.to_string();
                let delivered = canary_pub.publish("canary.ping", &payload).acked().await;
                assert_eq!(delivered.unwrap(), 1, "canary publish {i}");
                let m = tokio::time::timeout(DEADLINE, stream.next())
                    .await
                    .expect("canary message within the deadline")
                    .expect("canary subscription open");
                assert_eq!(&m.payload()[..], payload.as_bytes());
                i += 1;
                exchanged.store(i, Ordering::Relaxed);
            }
            (canary_pub, stream)
        }
    });

    let tally = Arc::new(Tally::default());
    let before = exchanged.load(Ordering::Relaxed);
    let mut tasks = tokio::task::JoinSet::new();
    for t in 0..TASKS {
        let (addr, tally) = (b.addr, tally.clone());
        tasks.spawn(async move {
            let mut rng = Rng::new(0x5eed_0000 + t);
            for _ in 0..ROUNDS {
                // Every task runs every kind each round, starting at a different one.
                for k in 0..KINDS.len() {
                    let kind = KINDS[(k + t as usize) % KINDS.len()];
                    hostile(addr, kind, &mut rng, &tally).await;
                }
            }
        });
    }
    tokio::time::timeout(Duration::from_secs(120), async {
        while let Some(r) = tasks.join_next().await {
            r.expect("hostile task");
        }
    })
    .await
    .expect("hostile connections finish");
    let during = exchanged.load(Ordering::Relaxed) - before;

    stop.store(true, Ordering::Relaxed);
    let (canary_pub, _stream) = tokio::time::timeout(DEADLINE, canary)
        .await
        .expect("canary stops")
        .expect("canary task");
    assert!(
        during > 0,
        "the canary exchanged nothing while under attack"
    );

    // Every hostile connection is gone and was counted once, under the right reason.
    b.wait_for_connections(2).await;
    let stats = b.broker.stats();
    assert_eq!(
        stats.subscriptions, 1,
        "only the canary's subscription is left"
    );
    let n = tally.connections.load(Ordering::Relaxed);
    assert_eq!(n, TASKS * ROUNDS * KINDS.len() as u64);
    assert_eq!(
        b.closes("protocol-error"),
        tally.protocol.load(Ordering::Relaxed)
    );
    assert_eq!(
        b.closes("client-closed"),
        tally.silent.load(Ordering::Relaxed)
    );
    assert_eq!(
        tally.protocol.load(Ordering::Relaxed) + tally.silent.load(Ordering::Relaxed),
        n
    );
    assert_eq!(PANICS.load(Ordering::SeqCst), 0, "a task panicked");
    eprintln!(
        "hostile: {n} connections ({} closed with an ERR, {} silently); canary round trips during: {during}",
        tally.protocol.load(Ordering::Relaxed),
        tally.silent.load(Ordering::Relaxed)
    );
    canary_pub.flush().await.unwrap();
    b.stop().await;
}
