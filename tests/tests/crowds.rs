//! Routing under crowds and attackers: subscription changes, disconnects, cache growth, wildcard
//! walks, unread replies and memory pressure, each while a canary pair (one publisher at 50
//! messages a second, one subscriber on an unrelated topic) runs throughout and must lose
//! nothing.
//!
//! The default scale runs in seconds; `scripts/reliability.sh` raises it (`BROKERD_FLEET`,
//! `BROKERD_CACHE_TOPICS`, `BROKERD_DISCONNECT_SUBS`, `BROKERD_GROUP_SUBS`,
//! `BROKERD_WALK_DEPTH`) and records the times printed here in `docs/reliability.md`. No test
//! asserts a time: they assert counts and bounds, and that the canary lost nothing.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use brokerd_client::{Client, ConnectOptions};
use brokerd_proto::{Frame, Subscribe};
use brokerd_tests::{DEADLINE, RawConn, TestBroker, raise_fd_limit, scale, wait_until, wire};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// One publisher at 50 messages a second and one subscriber on `canary.tick`, on a thread and
/// runtime of their own, so that the load the test itself drives does not delay them.
struct Canary {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<(Vec<Instant>, Vec<Instant>)>,
}

/// What the canary saw: when each message was published, and when it arrived.
#[derive(Debug)]
struct CanaryReport {
    sent: Vec<Instant>,
    arrivals: Vec<Instant>,
}

impl CanaryReport {
    /// The 99th percentile and the largest of the canary's publish-to-delivery latencies.
    fn latency(&self) -> (Duration, Duration) {
        let mut l: Vec<Duration> = self
            .sent
            .iter()
            .zip(&self.arrivals)
            .map(|(s, a)| *a - *s)
            .collect();
        l.sort();
        let p99 = l.get(l.len() * 99 / 100).copied().unwrap_or_default();
        (p99, l.last().copied().unwrap_or_default())
    }

    /// The longest time without a canary message, anywhere in the run.
    fn largest_gap(&self) -> Duration {
        self.arrivals
            .windows(2)
            .map(|w| w[1] - w[0])
            .max()
            .unwrap_or_default()
    }

    /// The longest time without a canary message that overlaps `from..to`.
    fn largest_gap_during(&self, from: Instant, to: Instant) -> Duration {
        self.arrivals
            .windows(2)
            .filter(|w| w[1] >= from && w[0] <= to)
            .map(|w| w[1] - w[0])
            .max()
            .unwrap_or_default()
    }
}

impl std::fmt::Display for CanaryReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (p99, max) = self.latency();
        write!(
            f,
            "canary {} of {} received, largest gap {:?}, latency p99 {p99:?} max {max:?}",
            self.arrivals.len(),
            self.sent.len(),
            self.largest_gap()
        )
    }
}

impl Canary {
    async fn start(b: &TestBroker) -> Canary {
        let addr = b.addr.to_string();
        let stop = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        let thread = std::thread::spawn({
            let stop = stop.clone();
            move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                rt.block_on(Canary::run(addr, stop, ready_tx))
            }
        });
        ready_rx.await.expect("the canary starts");
        Canary { stop, thread }
    }

    async fn run(
        addr: String,
        stop: Arc<AtomicBool>,
        ready: tokio::sync::oneshot::Sender<()>,
    ) -> (Vec<Instant>, Vec<Instant>) {
        let sub = Client::connect(&addr, ConnectOptions::new("canary-sub"))
            .await
            .unwrap();
        let publ = Client::connect(&addr, ConnectOptions::new("canary-pub"))
            .await
            .unwrap();
        let mut stream = sub.subscribe("canary.tick").await.unwrap();
        let subscriber = tokio::spawn(async move {
            let _keep = sub;
            let mut arrivals = Vec::new();
            while let Some(m) = stream.next().await {
                let i: u64 = std::str::from_utf8(&m.payload()).unwrap().parse().unwrap();
                if i == u64::MAX {
                    break;
                }
                let n = arrivals.len() as u64;
                assert_eq!(i, n, "canary message {n} arrived as {i}: one was lost");
                assert_eq!(m.seq(), n + 1, "the canary subscription saw a gap");
                arrivals.push(Instant::now());
            }
            arrivals
        });
        let _ = ready.send(());
        let mut tick = tokio::time::interval(Duration::from_millis(20));
        let mut sent = Vec::new();
        // Bounded: at most ten minutes of ticks.
        while !stop.load(Ordering::Relaxed) && sent.len() < 30_000 {
            tick.tick().await;
            let i = sent.len();
            sent.push(Instant::now());
            // Attackers subscribed to `>` count too.
            let delivered = publ.publish("canary.tick", i.to_string()).acked().await;
            assert!(delivered.unwrap() >= 1, "canary publish {i}");
        }
        publ.publish("canary.tick", u64::MAX.to_string())
            .acked()
            .await
            .unwrap();
        let arrivals = tokio::time::timeout(DEADLINE, subscriber)
            .await
            .expect("canary subscriber stops")
            .expect("canary subscriber");
        (sent, arrivals)
    }

    async fn finish(self) -> CanaryReport {
        self.stop.store(true, Ordering::Relaxed);
        let thread = self.thread;
        let (sent, arrivals) = tokio::task::spawn_blocking(move || thread.join())
            .await
            .unwrap()
            .expect("the canary did not fail");
        let r = CanaryReport { sent, arrivals };
        assert_eq!(
            r.sent.len(),
            r.arrivals.len(),
            "the canary lost messages: {r}"
        );
        r
    }
}

/// Reads `n` `OK`s from `c`, passing over deliveries (a `>` subscription also receives the
/// canary's messages).
async fn expect_oks(c: &mut RawConn, n: usize) {
    let mut oks = 0;
    while oks < n {
        match c.recv().await {
            Some(Frame::Ok(_)) => oks += 1,
            Some(Frame::Msg(_)) | Some(Frame::Lost(_)) => {}
            other => panic!("expected OK, got {other:?}"),
        }
    }
}

/// Fills the match cache with `n` topics under `prefix`, each published once (acknowledged, so
/// every one has been routed).
async fn fill_cache(publisher: &Client, prefix: &str, n: usize) {
    for i in 0..n {
        publisher
            .publish(&format!("{prefix}.t{i}"), b"x")
            .await
            .unwrap();
    }
    publisher
        .publish(&format!("{prefix}.last"), b"x")
        .acked()
        .await
        .unwrap();
}

/// Connects `n` raw clients that each subscribe to `filter`, all at once; returns them once
/// every `OK` has arrived.
async fn connect_fleet(b: &TestBroker, n: usize, filter: &str) -> Vec<RawConn> {
    let mut set = tokio::task::JoinSet::new();
    for i in 0..n {
        let (addr, filter) = (b.addr, filter.to_string());
        set.spawn(async move {
            let mut c = RawConn::handshake(addr, &format!("fleet-{i}"), 0).await;
            c.send_bytes(&wire::sub(1, 1, &filter)).await;
            expect_oks(&mut c, 1).await;
            c
        });
    }
    let mut members = Vec::with_capacity(n);
    while let Some(r) = set.join_next().await {
        members.push(r.unwrap());
    }
    members
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fleet_dropping_and_reconnecting_on_one_wildcard_keeps_routing() {
    let fleet = scale("BROKERD_FLEET", 1_000);
    let topics = scale("BROKERD_ALERT_TOPICS", 1_000);
    raise_fd_limit(2 * fleet as u64 + 512).expect("file descriptors for the fleet");
    let b = TestBroker::with_config(|c| {
        c.routing.match_cache = topics + 1_024;
        c.limits.max_connections = 2 * fleet + 100;
        // The whole fleet connects from one address, and at once.
        c.limits.max_connections_per_address = 2 * fleet + 100;
        c.limits.max_handshakes = fleet + 100;
    })
    .await;
    let canary = Canary::start(&b).await;
    let publisher = b.client("alerts-pub").await;
    // One member of the filter stays throughout; the alert topics are cached.
    let seed = b.client("alerts-seed").await;
    let _seed_sub = seed.subscribe("alerts.>").await.unwrap();
    fill_cache(&publisher, "alerts", topics).await;
    let members = connect_fleet(&b, fleet, "alerts.>").await;
    let cached = b.broker.stats().sublist.cache_entries;
    assert!(cached >= topics, "{cached} topics cached");
    assert_eq!(
        publisher.publish("alerts.t1", b"x").acked().await.unwrap() as usize,
        fleet + 1
    );
    let misses = b.broker.stats().sublist.cache_misses;

    // The whole fleet drops at once.
    let base = b.broker.stats().subscriptions - fleet;
    let drop_start = Instant::now();
    drop(members);
    wait_until("the fleet's subscriptions are gone", || {
        b.broker.stats().subscriptions == base
    })
    .await;
    let drop_end = Instant::now();
    assert_eq!(
        publisher.publish("alerts.t1", b"x").acked().await.unwrap(),
        1
    );

    // And comes back.
    let back_start = Instant::now();
    let members = connect_fleet(&b, fleet, "alerts.>").await;
    let back_end = Instant::now();
    assert_eq!(b.broker.stats().subscriptions, base + fleet);
    assert_eq!(
        publisher.publish("alerts.t2", b"x").acked().await.unwrap() as usize,
        fleet + 1
    );
    // Nothing the fleet did touched the cached results: every alert topic is still a hit.
    fill_cache(&publisher, "alerts", topics).await;
    let after = b.broker.stats().sublist;
    assert_eq!(after.cache_misses, misses, "{after:?}");
    let report = canary.finish().await;
    eprintln!(
        "crowds: fleet of {fleet} on alerts.> with {cached} cached topics: dropped in {:?} (canary's \
         largest gap then {:?}), reconnected and re-subscribed in {:?} (largest gap {:?}); {report}",
        drop_end - drop_start,
        report.largest_gap_during(drop_start, drop_end),
        back_end - back_start,
        report.largest_gap_during(back_start, back_end),
    );
    drop(members);
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closing_a_connection_with_many_subscriptions_costs_only_its_own() {
    let n = scale("BROKERD_DISCONNECT_SUBS", 10_000);
    let topics = scale("BROKERD_CACHE_TOPICS", 10_000);
    let b = TestBroker::with_config(|c| {
        c.routing.match_cache = topics + 1_024;
        c.limits.max_subs_per_connection = n + 10;
        // The connection never reads what its `>` subscriptions receive while the cache is
        // filled; on a slow debug build that can pass the default 10 s write deadline, which
        // would close it before its departure is measured.
        c.outbound.write_deadline = Duration::from_secs(600);
    })
    .await;
    let canary = Canary::start(&b).await;
    let publisher = b.client("pub").await;
    // Many others share one of its filters, so a change costs nothing per sharer either.
    let mut sharers = Vec::new();
    for i in 0..50 {
        let c = b.client(&format!("sharer-{i}")).await;
        let s = c.subscribe(">").await.unwrap();
        sharers.push((c, s));
    }
    let big = b.raw("big").await;
    let mut big = big;
    // Its subscriptions: a quarter wildcards, the rest literal topics; a tenth are `>`.
    let mut frames = Vec::new();
    for i in 0..n {
        let filter = match i % 10 {
            0 => ">".to_string(),
            1 | 2 => format!("load.*.{i}"),
            _ => format!("load.s{i}"),
        };
        frames.extend_from_slice(&wire::sub(i as u32, i as u32 + 1, filter));
    }
    big.send_bytes(&frames).await;
    expect_oks(&mut big, n).await;
    fill_cache(&publisher, "load", topics).await;
    let before = b.broker.stats();
    assert!(before.sublist.cache_entries >= topics);
    assert!(
        before.subscriptions >= n,
        "{} subscriptions before the close: the connection holding {n} ended early",
        before.subscriptions
    );
    let started = Instant::now();
    drop(big);
    wait_until("its subscriptions are gone", || {
        b.broker.stats().subscriptions == before.subscriptions - n
    })
    .await;
    let closed_in = started.elapsed();
    // The cache was not emptied by the departure: results hold slots, not copies.
    let after = b.broker.stats().sublist;
    assert!(
        after.cache_entries >= topics,
        "cache went from {} to {} entries",
        before.sublist.cache_entries,
        after.cache_entries
    );
    assert_eq!(
        publisher.publish("load.t5", b"x").acked().await.unwrap() as usize,
        sharers.len()
    );
    let report = canary.finish().await;
    eprintln!(
        "crowds: closing a connection with {n} subscriptions ({} cached topics, 50 sharers of '>') \
         took {closed_in:?}; {report}",
        before.sublist.cache_entries
    );
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queue_group_crowd_keeps_the_match_cache_within_its_bytes() {
    let members = scale("BROKERD_GROUP_SUBS", 8_192);
    let topics = scale("BROKERD_CACHE_TOPICS", 10_000);
    let cache_bytes = 4 * 1024 * 1024;
    let b = TestBroker::with_config(|c| {
        c.routing.match_cache_bytes = cache_bytes;
        c.limits.max_subs_per_connection = members + 10;
        c.limits.max_memory = 256 * 1024 * 1024;
    })
    .await;
    let canary = Canary::start(&b).await;
    let mut crowd = b.raw("crowd").await;
    let mut frames = Vec::new();
    for i in 0..members {
        frames.extend_from_slice(
            &Frame::Sub(Subscribe {
                req_id: i as u32,
                sid: i as u32 + 1,
                filter: ">".into(),
                queue: Some("workers".into()),
                stream: None,
            })
            .to_bytes(),
        );
    }
    crowd.send_bytes(&frames).await;
    expect_oks(&mut crowd, members).await;
    let publisher = b.client("pub").await;
    for i in 0..topics {
        publisher
            .publish(&format!("distinct.t{i}"), b"x")
            .await
            .unwrap();
        if i % 1024 == 0 {
            // The crowd reads nothing: its queue is bounded, and the budget holds.
            let s = b.broker.stats();
            assert!(s.sublist.cache_bytes <= cache_bytes, "{:?}", s.sublist);
        }
    }
    assert_eq!(
        publisher
            .publish("distinct.last", b"x")
            .acked()
            .await
            .unwrap(),
        1
    );
    let s = b.broker.stats();
    assert!(s.sublist.cache_bytes <= cache_bytes, "{:?}", s.sublist);
    assert!(s.sublist.cache_entries > 1_000, "{:?}", s.sublist);
    // Each cached topic holds one slot pointer, however many members the group has.
    assert!(
        s.sublist.cache_bytes < s.sublist.cache_entries * 256,
        "{:?}",
        s.sublist
    );
    let used = b.broker.memory().used();
    let report = canary.finish().await;
    eprintln!(
        "crowds: queue group of {members} on '>' and {topics} distinct topics: cache {} entries in \
         {} bytes; memory budget charged {used} bytes; {report}",
        s.sublist.cache_entries, s.sublist.cache_bytes
    );
    drop(crowd);
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wildcard_walk_attacker_does_not_starve_the_canary() {
    let depth = scale("BROKERD_WALK_DEPTH", 12);
    let publishes = scale("BROKERD_WALK_PUBLISHES", 300);
    let filters = 1usize << depth;
    let b = TestBroker::with_config(|c| {
        c.limits.max_subs_per_connection = filters + 10;
    })
    .await;
    let canary = Canary::start(&b).await;
    // Every filter of `depth` tokens, each `a` or `*`, then `>`: a topic of `a`s walks them all.
    let mut attacker = b.raw("walker").await;
    let mut frames = Vec::new();
    for i in 0..filters {
        let f: Vec<&str> = (0..depth)
            .map(|k| if (i >> k) & 1 == 1 { "*" } else { "a" })
            .collect();
        frames.extend_from_slice(&wire::sub(
            i as u32,
            i as u32 + 1,
            format!("{}.>", f.join(".")),
        ));
    }
    attacker.send_bytes(&frames).await;
    expect_oks(&mut attacker, filters).await;
    // A second connection publishes to distinct topics, each a cache miss walking every path.
    let mut walker = b.raw("walk-pub").await;
    let prefix = vec!["a"; depth].join(".");
    let started = Instant::now();
    let mut frames = Vec::new();
    for i in 0..publishes {
        frames.extend_from_slice(&wire::publish(0, false, format!("{prefix}.x{i}"), b""));
    }
    frames.extend_from_slice(&wire::publish(7, true, format!("{prefix}.end"), b""));
    walker.send_bytes(&frames).await;
    match walker.recv().await {
        Some(Frame::Ack {
            req_id: 7,
            delivered,
        }) => assert!(delivered as usize <= filters),
        other => panic!("expected the ACK, got {other:?}"),
    }
    // The attacker reads nothing: most deliveries are dropped, and counted.
    assert!(b.broker.stats().dropped > 0);
    let walked_in = started.elapsed();
    let report = canary.finish().await;
    eprintln!(
        "crowds: {filters} wildcard filters, {publishes} distinct-topic publishes each matching all \
         of them took {walked_in:?}; {report}"
    );
    drop(attacker);
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unread_replies_count_against_the_limits_and_close_a_slow_consumer() {
    let max_bytes = 1024 * 1024;
    let b = TestBroker::with_config(|c| {
        c.outbound.max_pending_bytes = max_bytes;
        c.outbound.max_pending_msgs = 4_096;
        c.outbound.write_deadline = Duration::from_millis(500);
    })
    .await;
    let canary = Canary::start(&b).await;
    let mut attacker = b.raw("amplifier").await;
    // SUBs with a 13 KB invalid queue name, each answered by an ERR; it never reads.
    let queue = "q ".repeat(6_500);
    let one = Frame::Sub(Subscribe {
        req_id: 1,
        sid: 1,
        filter: "amp".into(),
        queue: Some(queue),
        stream: None,
    })
    .to_bytes();
    let mut sent = 0usize;
    let mut peak = 0usize;
    let id = b
        .broker
        .clients()
        .iter()
        .find(|c| c.name == "amplifier")
        .unwrap()
        .id;
    // Bounded: at most 400 MB sent, or until the broker closes the connection.
    for _ in 0..30_000 {
        if attacker.try_send_bytes(&one).await.is_err() {
            break;
        }
        sent += one.len();
        if let Some(c) = b.broker.client(id) {
            let st = c.outbox.stats();
            peak = peak.max(st.pending_bytes + st.pending_control_bytes);
        } else {
            break;
        }
        if sent.is_multiple_of(64 * one.len()) {
            tokio::task::yield_now().await;
        }
    }
    wait_until("the amplifier is closed", || b.broker.client(id).is_none()).await;
    let closed = b.closes("slow-consumer") + b.closes("write-timeout");
    assert_eq!(closed, 1, "closed as a slow consumer");
    // Half the byte limit for replies, plus one read's worth of frames acted on before the
    // reader noticed: each ERR is at most 9 + 256 bytes.
    assert!(
        peak <= max_bytes / 2 + 256 * 1024 / one.len() * 300 + 300,
        "{peak} bytes pending"
    );
    let report = canary.finish().await;
    eprintln!(
        "crowds: amplifier sent {} KiB of SUBs before it was closed; its pending replies peaked at {} KiB; {report}",
        sent / 1024,
        peak / 1024
    );
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_memory_budget_bounds_stalled_partial_frames() {
    let budget = 32 * 1024 * 1024;
    let conns = scale("BROKERD_STALLED_FRAMES", 100);
    raise_fd_limit(2 * conns as u64 + 512).expect("file descriptors");
    let b = TestBroker::with_config(|c| {
        c.limits.max_memory = budget;
        c.timeouts.frame = Duration::from_secs(2);
        c.limits.min_frame_rate = 64 * 1024 * 1024;
    })
    .await;
    let canary = Canary::start(&b).await;
    let hard = b.broker.memory().hard_limit();
    // Connections each sending just over half of a maximum frame, then stalling: each would
    // make the broker give the frame a buffer of its own.
    let frame_len = b.broker.limits().max_frame;
    let half = vec![0u8; frame_len / 2 + 4096];
    let mut stalled = Vec::new();
    let mut peak = 0;
    for i in 0..conns {
        let mut c = b.raw(&format!("stall-{i}")).await;
        let mut head = Vec::new();
        head.extend_from_slice(&(frame_len as u32).to_be_bytes());
        head.push(0x02);
        // A write the broker stops reading must not hold the test up.
        let _ = tokio::time::timeout(Duration::from_millis(100), async {
            c.try_send_bytes(&head).await.ok();
            c.try_send_bytes(&half).await.ok();
        })
        .await;
        stalled.push(c);
        peak = peak.max(b.broker.memory().used());
    }
    wait_until("the stalled frames are charged", || {
        b.broker.memory().used() > budget / 2
    })
    .await;
    peak = peak.max(b.broker.memory().used());
    // The stated margin (docs/operations.md): one large frame per core allocated while the
    // budget looked free, and each connection's read buffer (up to 256 KiB) and reservation step.
    let margin = 2 * frame_len + conns * (256 + 4) * 1024;
    assert!(
        peak <= budget + margin,
        "peak {peak} over {budget} + {margin}"
    );
    // Their frame deadline closes them and gives everything back.
    wait_until("the stalled frames time out", || {
        b.closes("frame-timeout") == conns as u64
    })
    .await;
    wait_until("everything charged is given back", || {
        b.broker.memory().used() < 1024 * 1024
    })
    .await;
    let report = canary.finish().await;
    eprintln!(
        "crowds: {conns} stalled half frames of {frame_len} bytes under a {budget}-byte budget \
         (hard margin {hard}): peak charge {peak}; {report}"
    );
    drop(stalled);
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_memory_budget_sheds_the_largest_queues_first() {
    let budget = 16 * 1024 * 1024;
    let b = TestBroker::with_config(|c| {
        c.limits.max_memory = budget;
        // The stalled subscribers must stay for the whole flood, even in a debug build.
        c.outbound.write_deadline = Duration::from_secs(120);
    })
    .await;
    let canary = Canary::start(&b).await;
    let hard = b.broker.memory().hard_limit();
    // Stalled subscribers on distinct topics, each sent more than the whole budget.
    let subs = 8;
    let mut stalled = Vec::new();
    for i in 0..subs {
        let c = RawConn::connect_with_receive_buffer(b.addr, 4096).await;
        let mut c = c.hello(&format!("stalled-sub-{i}"), 0).await;
        c.send_bytes(&wire::sub(1, 1, format!("stalled.{i}"))).await;
        expect_oks(&mut c, 1).await;
        stalled.push(c);
    }
    let publisher = b.client("flood").await;
    let payload = vec![7u8; 16 * 1024];
    let mut peak = 0;
    for round in 0..512 {
        for i in 0..subs {
            tokio::time::timeout(
                DEADLINE,
                publisher.publish(&format!("stalled.{i}"), &payload),
            )
            .await
            .expect("the publisher is not held up")
            .unwrap();
        }
        if round % 16 == 0 {
            tokio::time::timeout(DEADLINE, publisher.flush())
                .await
                .expect("the publisher is not held up")
                .unwrap();
            peak = peak.max(b.broker.memory().used());
        }
    }
    tokio::time::timeout(DEADLINE, publisher.publish("stalled.0", b"x").acked())
        .await
        .expect("the publisher is not held up")
        .unwrap();
    peak = peak.max(b.broker.memory().used());
    let dropped = b.broker.stats().dropped;
    assert!(
        dropped > 0,
        "the budget shed deliveries (peak {peak}, {:?})",
        b.broker.stats()
    );
    // The stated margin: past the hard limit a queue holds at most HARD_FLOOR more, plus one
    // reservation step each.
    let margin = (subs + 3) * (brokerd_core::memory::HARD_FLOOR + 2 * 16 * 1024);
    assert!(peak <= hard + margin, "peak {peak} over {hard} + {margin}");
    let report = canary.finish().await;
    drop(stalled);
    wait_until("everything charged is given back", || {
        b.broker.memory().used() < 1024 * 1024
    })
    .await;
    eprintln!(
        "crowds: {subs} stalled subscribers sent 64 MiB under a {budget}-byte budget: peak charge \
         {peak}, {dropped} deliveries shed; {report}"
    );
    b.stop().await;
}
