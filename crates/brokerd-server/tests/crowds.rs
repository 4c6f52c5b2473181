//! Crowds and attackers against the release `brokerd` binary at full scale: a fleet of
//! subscribers dropping and reconnecting at once, a queue-group crowd filling the match cache, and
//! resident memory returning after a load that made the broker hold hundreds of MiB. Each runs a
//! canary pair (one publisher at 50 messages a second, one subscriber) that must lose nothing.
//!
//! The in-process versions are in `tests/tests/crowds.rs`; these run the binary as a child
//! process so that its resident memory is its own and a fleet of 10,000 needs 10,000 descriptors
//! in each process rather than 20,000 in one. The default scale runs in seconds; the environment
//! raises it (`BROKERD_FLEET`, `BROKERD_GROUP_SUBS`, `BROKERD_GROUP_TOPICS`, `BROKERD_LOAD_MIB`,
//! `BROKERD_LOAD_HALF_FRAMES`), as `scripts/reliability.sh` does. Each test prints its figures on
//! lines starting with `crowds-binary:`; none asserts a time, only counts and bounds.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use brokerd_proto::Frame;
use common::harness::{Brokerd, Conn, MIB, Stats, fd_limit_at_least, mib, scale, wait_until, wire};
use std::io::Write;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// The canary's period: 50 messages a second.
const TICK: Duration = Duration::from_millis(20);

/// The canary's last message, after which its subscriber stops.
const CANARY_END: &[u8] = b"end";

/// One publisher at 50 messages a second on `canary.tick`, each acknowledged, and one subscriber
/// reading it, each on a thread of its own with a blocking socket, so that the load the test
/// drives does not delay them.
struct Canary {
    stop: Arc<AtomicBool>,
    publisher: JoinHandle<u64>,
    subscriber: JoinHandle<Vec<Instant>>,
}

/// What the canary saw: every message arrived, in order, with contiguous sequence numbers.
struct CanaryReport {
    sent: u64,
    arrivals: Vec<Instant>,
}

impl Canary {
    fn start(b: &Brokerd) -> Canary {
        let lo = Ipv4Addr::LOCALHOST;
        let mut sub = Conn::handshake(b.addr, lo, "canary-sub");
        sub.send(&wire::sub(1, 1, "canary.tick"));
        assert_eq!(sub.recv(), Some(Frame::Ok(1)));
        let mut publ = Conn::handshake(b.addr, lo, "canary-pub");
        let stop = Arc::new(AtomicBool::new(false));
        let subscriber = std::thread::spawn(move || {
            let mut arrivals = Vec::new();
            loop {
                match sub.recv() {
                    Some(Frame::Msg(m)) => {
                        let payload = m.body.payload();
                        if payload[..] == *CANARY_END {
                            return arrivals;
                        }
                        let n = arrivals.len() as u64;
                        let i: u64 = std::str::from_utf8(&payload).unwrap().parse().unwrap();
                        assert_eq!(i, n, "canary message {n} arrived as {i}: one was lost");
                        assert_eq!(m.seq, n + 1, "the canary subscription saw a gap");
                        arrivals.push(Instant::now());
                    }
                    other => panic!("canary subscriber: expected MSG, got {other:?}"),
                }
            }
        });
        let publisher = std::thread::spawn({
            let stop = stop.clone();
            move || {
                let ack = |publ: &mut Conn, req_id: u32| match publ.recv() {
                    // Attackers subscribed to `>` count too.
                    Some(Frame::Ack {
                        req_id: r,
                        delivered,
                    }) if r == req_id => assert!(delivered >= 1, "canary publish {req_id}"),
                    other => panic!("canary publisher: expected ACK {req_id}, got {other:?}"),
                };
                let started = Instant::now();
                let mut i = 0u64;
                // Bounded: at most ten minutes of ticks.
                while !stop.load(Ordering::Relaxed) && i < 30_000 {
                    // Pacing, not waiting for a condition: tick i is due i periods after the
                    // start, whatever the previous one took.
                    let due = started + TICK * i as u32;
                    if let Some(early) = due.checked_duration_since(Instant::now()) {
                        std::thread::sleep(early);
                    }
                    publ.send(&wire::publish(
                        i as u32,
                        true,
                        "canary.tick",
                        i.to_string().as_bytes(),
                    ));
                    ack(&mut publ, i as u32);
                    i += 1;
                }
                publ.send(&wire::publish(u32::MAX, true, "canary.tick", CANARY_END));
                ack(&mut publ, u32::MAX);
                i
            }
        });
        Canary {
            stop,
            publisher,
            subscriber,
        }
    }

    /// Stops the canary and checks that it lost nothing.
    fn finish(self) -> CanaryReport {
        self.stop.store(true, Ordering::Relaxed);
        let sent = self.publisher.join().expect("the canary publisher");
        let arrivals = self.subscriber.join().expect("the canary subscriber");
        assert_eq!(
            sent,
            arrivals.len() as u64,
            "the canary lost messages: {} of {sent} arrived",
            arrivals.len()
        );
        CanaryReport { sent, arrivals }
    }
}

impl CanaryReport {
    /// The longest time without a canary message that overlaps `from..to`.
    fn largest_gap_during(&self, from: Instant, to: Instant) -> Duration {
        self.arrivals
            .windows(2)
            .filter(|w| w[1] >= from && w[0] <= to)
            .map(|w| w[1] - w[0])
            .max()
            .unwrap_or_default()
    }

    /// The longest time without a canary message, anywhere in the run.
    fn largest_gap(&self) -> Duration {
        self.arrivals
            .windows(2)
            .map(|w| w[1] - w[0])
            .max()
            .unwrap_or_default()
    }
}

impl std::fmt::Display for CanaryReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "canary {} of {} received in order, largest gap {:.1?}",
            self.arrivals.len(),
            self.sent,
            self.largest_gap()
        )
    }
}

/// Threads, and source addresses, that connect a fleet.
const FLEET_THREADS: usize = 8;

/// Connects `n` clients from `FLEET_THREADS` threads, thread `t` from `127.{subnet}.0.{t + 1}`,
/// each sending HELLO and `SUB alerts.>` in one write and waiting for the `OK`. Returns them and
/// the time from the first connect to the last `OK`.
fn connect_fleet(to: SocketAddr, n: usize, subnet: u8) -> (Vec<Vec<Conn>>, Duration) {
    let started = Instant::now();
    let (fleet, last_ok): (Vec<Vec<Conn>>, Vec<Instant>) = std::thread::scope(|s| {
        let handles: Vec<_> = (0..FLEET_THREADS)
            .map(|t| {
                s.spawn(move || {
                    let from = Ipv4Addr::new(127, subnet, 0, 1 + t as u8);
                    let count = n / FLEET_THREADS + usize::from(t < n % FLEET_THREADS);
                    let mut mine = Vec::with_capacity(count);
                    let mut hello = wire::hello("fleet");
                    hello.extend(wire::sub(2, 1, "alerts.>"));
                    for _ in 0..count {
                        // A small receive buffer, as idle clients on a real network would not
                        // need more.
                        let mut c = Conn::connect(to, from, Some(4096));
                        c.send(&hello);
                        assert!(matches!(c.recv(), Some(Frame::Welcome(_))));
                        assert_eq!(c.recv(), Some(Frame::Ok(2)));
                        mine.push(c);
                    }
                    (mine, Instant::now())
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).unzip()
    });
    let last = last_ok.into_iter().max().unwrap_or(started);
    (fleet, last - started)
}

/// Has every member of `fleet` read one alert, from one thread per part; returns the fleet.
fn read_one_alert_each(fleet: Vec<Vec<Conn>>) -> Vec<Vec<Conn>> {
    std::thread::scope(|s| {
        let handles: Vec<_> = fleet
            .into_iter()
            .map(|mut part| {
                s.spawn(move || {
                    for c in &mut part {
                        match c.recv() {
                            Some(Frame::Msg(m)) => assert!(m.body.topic().starts_with("alerts.")),
                            other => panic!("a fleet member: expected an alert, got {other:?}"),
                        }
                    }
                    part
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

/// Publishes to `topic` with an `ACK` and returns how many subscriptions took it.
fn acked(publisher: &mut Conn, req_id: u32, topic: &str, payload: &[u8]) -> u32 {
    publisher.send(&wire::publish(req_id, true, topic, payload));
    match publisher.recv() {
        Some(Frame::Ack {
            req_id: r,
            delivered,
        }) if r == req_id => delivered,
        other => panic!("expected ACK {req_id}, got {other:?}"),
    }
}

#[test]
fn a_fleet_dropping_and_reconnecting_at_once_keeps_routing() {
    let n = scale("BROKERD_FLEET", 1_000);
    let topics = 1_000;
    // The broker inherits this process's limit, and each side holds one descriptor per member.
    if let Err(why) = fd_limit_at_least(n as u64 + 512) {
        eprintln!(
            "SKIPPED: a fleet of {n} needs {} file descriptors per process: {why}; \
             see docs/operations.md",
            n + 512
        );
        return;
    }
    let b = Brokerd::start(
        "crowds-fleet",
        &format!(
            "[limits]\nmax_connections = {}\nmax_connections_per_address = {}\n\
             max_handshakes = {}\n",
            n + 100,
            n + 100,
            n + 100
        ),
    );
    let lo = Ipv4Addr::LOCALHOST;
    let canary = Canary::start(&b);
    let mut stats = Stats::connect(b.addr, lo);
    let mut publisher = Conn::handshake(b.addr, lo, "alerts-pub");
    // One member of the filter stays throughout, and reads everything published to it.
    let mut seed = Conn::handshake(b.addr, lo, "alerts-seed");
    seed.send(&wire::sub(2, 1, "alerts.>"));
    assert_eq!(seed.recv(), Some(Frame::Ok(2)));
    let seed = std::thread::spawn(move || {
        let mut read = 0u64;
        loop {
            match seed.recv() {
                Some(Frame::Msg(m)) if m.body.topic() == "alerts.end" => return read,
                Some(Frame::Msg(m)) => {
                    read += 1;
                    assert_eq!(m.seq, read, "the staying member missed an alert");
                }
                other => panic!("the staying member: expected MSG, got {other:?}"),
            }
        }
    });
    let mut published = 0u64;
    // The alert topics, each published once, so that every one is in the match cache.
    for i in 0..topics {
        publisher.send(&wire::publish(0, false, &format!("alerts.t{i}"), b"x"));
    }
    assert_eq!(acked(&mut publisher, 1, "alerts.last", b"x"), 1);
    published += topics as u64 + 1;
    let base = stats.subscriptions();
    let idle = b.rss();

    let (fleet, connected) = connect_fleet(b.addr, n, 13);
    stats.wait_subscriptions(base + n as u64);
    assert_eq!(acked(&mut publisher, 2, "alerts.t1", b"x") as usize, n + 1);
    published += 1;
    let cached = stats.get()["sublist"]["cache_entries"].as_u64().unwrap();
    assert!(cached >= topics as u64, "{cached} topics cached");
    let with_fleet = b.rss();
    // Each member reads that alert, so the fleet is idle when it drops: the drop measured is the
    // closes alone, not a delivery to 10,000 connections still being written as they close.
    let fleet = read_one_alert_each(fleet);

    // The whole fleet closes at once, from several threads.
    let cpu_before = b.cpu_time();
    let drop_start = Instant::now();
    std::thread::scope(|s| {
        for part in fleet {
            s.spawn(move || drop(part));
        }
    });
    // The closing side's own kernel work: on loopback it also runs the broker sockets' receive
    // path for each FIN, on this process's time and cores.
    let closed_in = drop_start.elapsed();
    // Routing first: an acknowledged publish counts the subscriptions it reached, exactly and
    // at once; the statistics are a snapshot up to 100 ms old.
    let mut probes = 0;
    wait_until("the fleet's subscriptions to stop matching", || {
        probes += 1;
        acked(&mut publisher, 3, "alerts.t1", b"probe") == 1
    });
    published += probes;
    let routed_gone = drop_start.elapsed();
    let drop_cpu = b.cpu_time() - cpu_before;
    stats.wait_subscriptions(base);
    let drop_end = Instant::now();
    let after_drop = b.rss();

    // And the fleet comes back, from other addresses.
    let back_start = Instant::now();
    let (fleet, reconnected) = connect_fleet(b.addr, n, 14);
    let back_end = back_start + reconnected;
    stats.wait_subscriptions(base + n as u64);
    assert_eq!(acked(&mut publisher, 4, "alerts.t2", b"x") as usize, n + 1);
    published += 1;
    let cached_after = stats.get()["sublist"]["cache_entries"].as_u64().unwrap();
    let after_reconnect = b.rss();

    assert_eq!(acked(&mut publisher, 5, "alerts.end", b"x") as usize, n + 1);
    assert_eq!(
        seed.join().unwrap(),
        published,
        "the staying member read every alert"
    );
    let report = canary.finish();
    eprintln!(
        "crowds-binary: fleet of {n} on alerts.> ({cached} cached topics, {cached_after} after): \
         connected in {connected:.1?}; dropped at once (closed by this side in {closed_in:.1?}): \
         routes gone in {routed_gone:.1?} using {drop_cpu:.1?} of the broker's CPU, stats \
         reported in {:.1?} (canary's largest gap {:.1?}); reconnected and re-subscribed in \
         {reconnected:.1?} (largest gap {:.1?}); RSS idle {:.1} MiB, with the fleet {:.1} MiB, \
         after the drop {:.1} MiB, after the reconnect {:.1} MiB; {report}",
        drop_end - drop_start,
        report.largest_gap_during(drop_start, drop_end),
        report.largest_gap_during(back_start, back_end),
        mib(idle),
        mib(with_fleet),
        mib(after_drop),
        mib(after_reconnect),
    );
    drop(fleet);
    drop(publisher);
    drop(stats);
    b.wait_idle();
    let (status, _) = b.terminate();
    assert_eq!(status.code(), Some(0));
}

#[test]
fn a_queue_group_crowd_on_everything_keeps_memory_bounded_and_stats_answered() {
    // What the attack may add to the resident set: the match cache is bounded at 32 MiB and the
    // crowd's queue at 64 MiB by default.
    const BOUND: u64 = 256 * MIB;
    let members = scale("BROKERD_GROUP_SUBS", 4_096);
    let topics = scale("BROKERD_GROUP_TOPICS", 4_096);
    let b = Brokerd::start(
        "crowds-group",
        &format!(
            "[limits]\nmax_subs_per_connection = {}\n[timeouts]\nshutdown_grace = \"2s\"\n",
            members + 10
        ),
    );
    let lo = Ipv4Addr::LOCALHOST;
    let canary = Canary::start(&b);
    let mut stats = Stats::connect(b.addr, lo);
    let base = stats.subscriptions();
    let baseline = b.rss();

    // One connection, every member of one queue group on `>`; after its OKs it reads nothing.
    let mut crowd = Conn::connect(b.addr, lo, Some(4096));
    crowd.send(&wire::hello("crowd"));
    assert!(matches!(crowd.recv(), Some(Frame::Welcome(_))));
    let mut frames = Vec::new();
    for i in 0..members {
        frames.extend(wire::sub_queue(i as u32, i as u32 + 1, ">", "workers"));
    }
    let subscribed = Instant::now();
    let mut writer = crowd.s.try_clone().unwrap();
    // Written on a thread of its own while the OKs are read here, so neither side's buffers
    // fill.
    let sending = std::thread::spawn(move || writer.write_all(&frames).unwrap());
    let mut oks = 0;
    while oks < members {
        match crowd.recv() {
            Some(Frame::Ok(_)) => oks += 1,
            // The canary's messages reach the group too.
            Some(Frame::Msg(_)) => {}
            other => panic!("expected OK, got {other:?}"),
        }
    }
    sending.join().unwrap();
    let subscribed = subscribed.elapsed();
    stats.wait_subscriptions(base + members as u64);

    // A publisher sends to distinct topics, each a cache miss matching every member.
    let mut publisher = Conn::handshake(b.addr, lo, "distinct-pub");
    let sent = Arc::new(AtomicUsize::new(0));
    let attack_start = Instant::now();
    let attack = std::thread::spawn({
        let sent = sent.clone();
        move || {
            let mut batch = Vec::new();
            for i in 0..topics {
                batch.extend(wire::publish(0, false, &format!("distinct.t{i}"), b"x"));
                if i % 256 == 255 || i + 1 == topics {
                    publisher.send(&batch);
                    batch.clear();
                    sent.store(i + 1, Ordering::Relaxed);
                }
            }
            // Every publish was routed once this is acknowledged; the crowd's queue may be full.
            let delivered = acked(&mut publisher, 1, "distinct.last", b"x");
            assert!(delivered <= 1, "a queue group takes a message once");
            (publisher, Instant::now())
        }
    });
    wait_until("half the attack to be sent", || {
        sent.load(Ordering::Relaxed) >= topics / 2
    });
    let asked = Instant::now();
    let during = stats.get();
    let answered_during = asked.elapsed();
    let (publisher, attack_end) = attack.join().unwrap();
    let asked = Instant::now();
    let mut after = stats.get();
    let answered_after = asked.elapsed();
    // A snapshot built after the attack: requests within 100 ms share one.
    wait_until("a snapshot taken after the attack", || {
        let fresh = after["uptime_s"] != during["uptime_s"];
        if !fresh {
            after = stats.get();
        }
        fresh
    });
    assert!(during["subscriptions"].as_u64().is_some(), "{during}");
    let sublist = &after["sublist"];
    let peak = b.peak_rss();
    let report = canary.finish();
    eprintln!(
        "crowds-binary: queue group of {members} on '>' (subscribed in {subscribed:.1?}) and \
         {topics} distinct topics (sent and routed in {:.1?}, canary's largest gap {:.1?}): \
         stats answered in {answered_during:.1?} during the attack and {answered_after:.1?} \
         after; cache {} entries in {} bytes; {} deliveries dropped; memory budget charged {} \
         bytes; RSS baseline \
         {:.1} MiB, peak {:.1} MiB (+{:.1} MiB; bound +{} MiB); {report}",
        attack_end - attack_start,
        report.largest_gap_during(attack_start, attack_end),
        sublist["cache_entries"],
        sublist["cache_bytes"],
        after["dropped"],
        after["memory"]["used"],
        mib(baseline),
        mib(peak),
        mib(peak.saturating_sub(baseline)),
        BOUND / MIB,
    );
    assert!(
        peak <= baseline + BOUND,
        "peak {:.1} MiB over baseline {:.1} MiB + {} MiB",
        mib(peak),
        mib(baseline),
        BOUND / MIB
    );
    // SIGTERM with the crowd still connected and its queue unread.
    let (status, took) = b.terminate();
    eprintln!(
        "crowds-binary: queue group of {members}: SIGTERM with the crowd connected and unread \
         exited with {status} after {took:.2?} (shutdown_grace 2s)"
    );
    assert_eq!(status.code(), Some(0));
    drop((crowd, publisher, stats));
}

// The release binary's allocator is mimalloc 3 (libmimalloc-sys 0.1.49 builds its v3 sources),
// which returns a freed page to the operating system only once some thread later frees a page
// or collects its heap; without the broker's collect-on-park hook (`src/allocator.rs`) RSS stayed
// at the loaded figure for the whole minute.
#[test]
fn resident_memory_returns_after_the_load_leaves() {
    // How often RSS is sampled while the load leaves: the series is part of the report.
    const RSS_SAMPLE: Duration = Duration::from_millis(100);
    // Within this much of the baseline counts as returned; waited for at most `GIVE_BACK`.
    const SLACK: u64 = 64 * MIB;
    const GIVE_BACK: Duration = Duration::from_secs(60);
    const SUBS: usize = 4;
    const PAYLOAD: usize = 64 * 1024;
    const MAX_FRAME: u32 = 1_114_112;
    let load = scale("BROKERD_LOAD_MIB", 256) as u64 * MIB;
    let half_frames = scale("BROKERD_LOAD_HALF_FRAMES", 32);
    let per_sub = load / SUBS as u64;
    // A budget and queues large enough that they do not bound the load; stalled subscribers and
    // partial frames are not closed by the broker while it is applied.
    let b = Brokerd::start(
        "crowds-rss",
        &format!(
            "[limits]\nmax_memory = {}\nmax_frame = {MAX_FRAME}\n[outbound]\nmax_pending_msgs = 1000000\n\
             max_pending_bytes = {}\nwrite_deadline = \"600s\"\n[timeouts]\nframe = \"600s\"\n",
            2048 * MIB,
            per_sub + 8 * MIB
        ),
    );
    let lo = Ipv4Addr::LOCALHOST;
    let canary = Canary::start(&b);
    let mut stats = Stats::connect(b.addr, lo);
    let mut publisher = Conn::handshake(b.addr, lo, "flood");
    publisher.send(&wire::ping(1));
    assert_eq!(publisher.recv(), Some(Frame::Pong(1)));
    let baseline = b.rss();
    let idle_charge = stats.get()["memory"]["used"].as_u64().unwrap() + MIB;

    let load_start = Instant::now();
    // Stalled subscribers, each on a topic of its own so that each queue holds payloads of its
    // own; small receive buffers, so that the broker, not the kernel, holds the messages.
    let mut stalled = Vec::new();
    for i in 0..SUBS {
        let mut c = Conn::connect(b.addr, lo, Some(4096));
        let mut f = wire::hello("stalled");
        f.extend(wire::sub(2, 1, &format!("load.{i}")));
        c.send(&f);
        assert!(matches!(c.recv(), Some(Frame::Welcome(_))));
        assert_eq!(c.recv(), Some(Frame::Ok(2)));
        stalled.push(c);
    }
    // Connections each stalled halfway through a frame of the largest size.
    let mut head = MAX_FRAME.to_be_bytes().to_vec();
    head.push(0x02);
    head.extend(vec![0u8; MAX_FRAME as usize / 2]);
    let mut partial = Vec::new();
    for _ in 0..half_frames {
        let mut c = Conn::handshake(b.addr, lo, "half-frame");
        c.send(&head);
        partial.push(c);
    }
    let payload = vec![0x5a; PAYLOAD];
    let frames: Vec<Vec<u8>> = (0..SUBS)
        .map(|i| wire::publish(0, false, &format!("load.{i}"), &payload))
        .collect();
    for _ in 0..per_sub / PAYLOAD as u64 {
        for f in &frames {
            publisher.send(f);
        }
    }
    // Its PONG means every PUB before it was routed.
    publisher.send(&wire::ping(2));
    assert_eq!(publisher.recv(), Some(Frame::Pong(2)));
    // The partial frames are charged to the budget once they are read.
    let queued = per_sub / PAYLOAD as u64 * PAYLOAD as u64 * SUBS as u64;
    let held = queued + half_frames as u64 * u64::from(MAX_FRAME) / 2;
    wait_until("the queues and partial frames to be held", || {
        stats.get()["memory"]["used"].as_u64().unwrap() >= held
    });
    let load_end = Instant::now();
    let loaded = b.rss();
    let charged = stats.get()["memory"]["used"].as_u64().unwrap();

    // Every load client leaves.
    let leave_start = Instant::now();
    for c in stalled {
        c.reset();
    }
    drop(partial);
    drop(publisher);
    // RSS every 100 ms (a sampling period, not a wait for a condition), and when the broker's own
    // charge falls back: the difference is what the allocator keeps.
    let mut series = Vec::new();
    let mut given_back = None;
    let returned = loop {
        let rss = b.rss();
        let at = leave_start.elapsed();
        series.push((at, rss));
        if given_back.is_none() && stats.get()["memory"]["used"].as_u64().unwrap() <= idle_charge {
            given_back = Some(at);
        }
        if rss <= baseline + SLACK && given_back.is_some() {
            break Some(at);
        }
        if at >= GIVE_BACK {
            break None;
        }
        std::thread::sleep(RSS_SAMPLE);
    };
    let leave_end = Instant::now();
    let peak = b.peak_rss();
    let report = canary.finish();
    let allocator: Vec<String> = std::env::vars()
        .filter(|(k, _)| k.starts_with("MIMALLOC_"))
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    eprintln!(
        "crowds-binary: {} MiB queued for {SUBS} stalled subscribers and {half_frames} half \
         frames (loaded in {:.1?}, charged {:.1} MiB): RSS baseline {:.1} MiB, loaded {:.1} MiB, \
         peak {:.1} MiB; broker's charge back under {:.1} MiB {}, RSS back within {} MiB of the \
         baseline {} (environment: [{}]); canary's largest gap {:.1?} loading, {:.1?} giving back; {report}",
        load / MIB,
        load_end - load_start,
        mib(charged),
        mib(baseline),
        mib(loaded),
        mib(peak),
        mib(idle_charge),
        match given_back {
            Some(t) => format!("after {t:.1?}"),
            None => format!("NOT within {GIVE_BACK:?}"),
        },
        SLACK / MIB,
        match returned {
            Some(t) => format!("after {t:.1?}"),
            None => format!("NOT within {GIVE_BACK:?}"),
        },
        allocator.join(" "),
        report.largest_gap_during(load_start, load_end),
        report.largest_gap_during(leave_start, leave_end),
    );
    // RSS over time after the load left: every sample for the first two seconds, then one a
    // second.
    let shown: Vec<String> = series
        .iter()
        .filter(|(at, _)| *at < Duration::from_secs(2) || at.subsec_millis() < 100)
        .map(|(at, rss)| format!("{:.1}s {:.0}", at.as_secs_f64(), mib(*rss)))
        .collect();
    eprintln!(
        "crowds-binary: RSS (MiB) after the load left: {}",
        shown.join(", ")
    );
    assert!(
        returned.is_some(),
        "RSS still {:.1} MiB after {GIVE_BACK:?} (baseline {:.1} MiB)",
        mib(b.rss()),
        mib(baseline)
    );
    drop(stats);
    let (status, _) = b.terminate();
    assert_eq!(status.code(), Some(0));
}
