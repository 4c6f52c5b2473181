//! `brokerctl bench`: load scenarios against a running broker, measured from the client side.
//!
//! Each scenario here opens one publisher connection and, where it has subscribers, one
//! connection per subscriber, all through `brokerd-client`. The publisher is pipelined: `Client::publish` only
//! buffers, and waits only when the client's write buffer is full. After `--duration` the
//! publisher sends a `PING` and waits for the `PONG` (everything before it has been routed), then
//! the subscribers are given time to drain what is already in flight.
//!
//! The latency scenario publishes on a fixed schedule and stamps each message with the time it
//! was due, not the time it was sent, so a publisher that falls behind shows as latency instead
//! of hiding it (no coordinated omission); the subscriber records into an HDR histogram.
//!
//! The tool measures itself too: its CPU time over the run (from `/proc/self/stat`), and the
//! broker's when `--broker-pid` names it, so a reader can tell whether the tool was the limit.
//! A progress line is rewritten on stderr every second, only when stderr is a terminal and
//! without `--json`.
//! Report formatting lives in [`report`]; the scenario with thousands of connections in [`many`];
//! the plain TCP relay that pub->sub is compared with in [`relay`]; storing into a stream and
//! replaying it in [`stream`]; the hidden `hold` scenario (idle connections for memory
//! measurements) in [`hold`]. Nothing here asserts a time: these are measurements.

mod hold;
mod many;
mod relay;
mod report;
mod stream;

use crate::Global;
use anyhow::{Context, Result, bail};
use brokerd_client::{Client, Subscription};
use clap::{Args, Subcommand};
use hdrhistogram::Histogram;
use report::{CpuClock, Report};
use std::io::{IsTerminal, Write};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// Arguments of `brokerctl bench`.
#[derive(Debug, Args)]
pub(crate) struct BenchArgs {
    /// What to measure.
    #[command(subcommand)]
    scenario: Scenario,
    /// Options every scenario shares.
    #[command(flatten)]
    common: Common,
}

/// Options every scenario shares.
#[derive(Debug, Args, Clone)]
pub(crate) struct Common {
    /// Payload size in bytes.
    #[arg(long, global = true, default_value_t = 16)]
    size: usize,
    /// How long to publish, e.g. `5s`, `300ms`.
    #[arg(long, global = true, default_value = "5s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Print one JSON object on stdout instead of the table.
    #[arg(long, global = true)]
    json: bool,
    /// Runtime worker threads of the load tool; 1 runs everything on the main thread.
    #[arg(long, global = true, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=64))]
    threads: u16,
    /// Also report this process's CPU share over the run (normally the broker's pid).
    #[arg(long, global = true, value_name = "PID")]
    broker_pid: Option<u32>,
}

/// The scenarios.
#[derive(Debug, Clone, Subcommand)]
enum Scenario {
    /// One publisher, no subscribers; counts messages the broker confirmed with a PING/PONG.
    Pub,
    /// One publisher, one subscriber, one topic.
    Pubsub,
    /// One publisher, N subscribers on one topic; the rate is total deliveries.
    Fanout {
        /// Subscribers, each on its own connection.
        #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..=10_000))]
        subs: u32,
    },
    /// One publisher round-robin over N topics `bench.t<i>`, one subscriber on `bench.>`.
    Topics {
        /// Distinct topics.
        #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u32).range(1..=10_000_000))]
        topics: u32,
    },
    /// One publisher at a fixed rate, each message's due time in its payload; reports latency
    /// percentiles, timed from when each message was due to be sent.
    Latency {
        /// Messages per second.
        #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..=10_000_000))]
        rate: u64,
    },
    /// No broker: a plain TCP relay inside the tool copies one connection's PUB frames to
    /// another, as fast as loopback carries them; the ceiling `pubsub` is compared with.
    Relay,
    /// Many publisher and subscriber connections at once, over `--threads` runtime threads:
    /// publisher i on `bench.many.<i>` and subscriber j on `bench.many.<j % pubs>`, or all on
    /// one topic.
    Many(many::ManyArgs),
    /// Publishers storing into a stream, each waiting for STORED with up to --window
    /// publishes unanswered; reports stored msgs/s and the acknowledgement latency.
    StreamPub(stream::StreamPubArgs),
    /// Publishes --count messages into a stream (unless --no-publish), then times a replay
    /// subscription from the start until it has them all; reports msgs/s and MB/s.
    StreamReplay(stream::StreamReplayArgs),
    /// Opens idle connections holding subscriptions, for measuring the broker's memory.
    #[command(hide = true)]
    Hold(hold::HoldArgs),
}

impl BenchArgs {
    /// Runtime worker threads the load tool asks for.
    pub(crate) fn threads(&self) -> usize {
        self.common.threads.into()
    }
}

impl Scenario {
    fn name(&self) -> &'static str {
        match self {
            Scenario::Pub => "pub",
            Scenario::Pubsub => "pubsub",
            Scenario::Fanout { .. } => "fanout",
            Scenario::Topics { .. } => "topics",
            Scenario::Latency { .. } => "latency",
            Scenario::Relay => "relay",
            Scenario::Many(_) => "many",
            Scenario::StreamPub(_) => "stream-pub",
            Scenario::StreamReplay(_) => "stream-replay",
            Scenario::Hold(_) => "hold",
        }
    }
}

/// Messages published between checks of the clock and the stop condition; also the unit in
/// which the shared `sent` counter advances.
const BATCH: u64 = 1024;

/// How long the drain after publishing may go without a new delivery before giving up.
const DRAIN_IDLE: Duration = Duration::from_secs(1);

/// Upper bound on the whole drain, whatever happens.
const DRAIN_MAX: Duration = Duration::from_secs(30);

/// Counters the publisher, the subscribers and the progress line share.
#[derive(Debug, Default)]
struct Counters {
    sent: AtomicU64,
    received: AtomicU64,
}

/// What one subscriber task hands back when its stream ends.
struct SubResult {
    /// The `LOST` notices it got.
    missed: u64,
    /// Latencies in nanoseconds (latency scenario only).
    latency: Option<Histogram<u64>>,
}

/// Runs `brokerctl bench`.
pub(crate) async fn cmd_bench(global: &Global, args: BenchArgs) -> Result<()> {
    let common = args.common;
    match &args.scenario {
        Scenario::Hold(h) => return hold::run(global, h).await,
        Scenario::Relay => return emit(&relay::run(&common).await?, common.json),
        Scenario::Many(m) => return emit(&many::run(global, &common, m).await?, common.json),
        Scenario::StreamPub(a) => {
            return emit(&stream::run_pub(global, &common, a).await?, common.json);
        }
        Scenario::StreamReplay(a) => {
            return emit(&stream::run_replay(global, &common, a).await?, common.json);
        }
        _ => {}
    }
    if matches!(args.scenario, Scenario::Latency { .. }) && common.size < 8 {
        bail!("the latency scenario needs --size 8 or more (the send time is in the payload)");
    }
    let (subs, topics, rate) = match args.scenario {
        Scenario::Pub => (0, 1, None),
        Scenario::Pubsub => (1, 1, None),
        Scenario::Fanout { subs } => (subs, 1, None),
        Scenario::Topics { topics } => (1, topics, None),
        Scenario::Latency { rate } => (1, 1, Some(rate)),
        Scenario::Hold(_)
        | Scenario::Relay
        | Scenario::Many(_)
        | Scenario::StreamPub(_)
        | Scenario::StreamReplay(_) => unreachable!("handled above"),
    };
    let name = args.scenario.name();
    let topic_names: Vec<String> = if matches!(args.scenario, Scenario::Topics { .. }) {
        (0..topics).map(|i| format!("bench.t{i}")).collect()
    } else {
        vec![format!("bench.{name}")]
    };
    let filter = if topics > 1 {
        "bench.>".to_string()
    } else {
        topic_names[0].clone()
    };

    let publisher = connect(global, "bench-pub").await?;
    let counters = Arc::new(Counters::default());
    // Latency stamps are nanoseconds since this instant, shared by publisher and subscribers.
    let epoch = std::time::Instant::now();
    let empty = report::latency_histogram().context("cannot make a latency histogram")?;
    let mut sub_clients = Vec::with_capacity(subs as usize);
    let mut sub_tasks = Vec::with_capacity(subs as usize);
    for i in 0..subs {
        let client = connect(global, &format!("bench-sub-{i}")).await?;
        let sub = client
            .subscribe(&filter)
            .await
            .with_context(|| format!("cannot subscribe to {filter}"))?;
        let latency = rate.map(|_| (epoch, empty.clone()));
        sub_tasks.push(tokio::spawn(subscriber(sub, counters.clone(), latency)));
        sub_clients.push(client);
    }

    let payload = vec![0u8; common.size];
    let cpu = CpuClock::start(common.broker_pid);
    let start = Instant::now();
    let progress = start_progress(&common, &counters, subs, start);
    let mut send_lag = empty.clone();
    let sent = match rate {
        None => {
            let deadline = start + common.duration;
            publish_flat_out(&publisher, &topic_names, &payload, deadline, &counters).await?
        }
        Some(rate) => {
            let schedule = Schedule {
                rate,
                duration: common.duration,
            };
            let targets = vec![(publisher.clone(), topic_names[0].clone())];
            let (sent, lag) =
                publish_paced(targets, &payload, schedule, epoch, &counters, send_lag).await?;
            send_lag = lag;
            sent
        }
    };
    publisher
        .flush()
        .await
        .context("connection closed before the broker confirmed the messages")?;
    let published_at = Instant::now();

    let expected = sent * u64::from(subs);
    let end = if subs == 0 {
        published_at
    } else {
        drain(&counters, expected, published_at).await
    };
    let elapsed = end.duration_since(start);
    let broker_rss_kib = common.broker_pid.and_then(report::rss_kib);
    let cpu = cpu.stop();
    stop_progress(progress).await;

    for client in sub_clients {
        // Closing ends each subscription stream, which ends its task.
        let _ = client.close().await;
    }
    let _ = publisher.close().await;
    let mut missed = 0;
    let mut latency = empty;
    for task in sub_tasks {
        let r = task.await.context("a subscriber task failed")?;
        missed += r.missed;
        if let Some(h) = r.latency {
            latency
                .add(h)
                .context("cannot merge the latency histograms")?;
        }
    }
    let received = counters.received.load(Ordering::Relaxed);
    let report = Report {
        scenario: name,
        size: common.size,
        duration: common.duration,
        pubs: 1,
        subs,
        topics,
        rate,
        sent,
        expected,
        received,
        missed,
        elapsed,
        publish_elapsed: published_at.duration_since(start),
        threads: common.threads,
        cpu,
        latency: rate.map(|_| report::Latency::from_histogram(&latency)),
        send_lag: rate.map(|_| report::Latency::from_histogram(&send_lag)),
        setup: None,
        broker_rss_kib,
        stream: None,
    };
    emit(&report, common.json)
}

/// Prints a report on stdout: one JSON object on a line of its own, or the table.
fn emit(report: &Report, json: bool) -> Result<()> {
    let text = if json {
        format!("{}\n", report.json())
    } else {
        report.table()
    };
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes())
        .and_then(|()| out.flush())
        .context("cannot write to stdout")
}

/// Waits, after the broker confirmed every publish, for deliveries still in flight: until
/// `expected` arrived, none arrived for [`DRAIN_IDLE`], or [`DRAIN_MAX`] passed. Returns when
/// the last delivery was seen (to within the 1 ms poll), or `published_at` if none came after
/// it, so that delivery rates end there and not at the end of an idle drain.
async fn drain(counters: &Counters, expected: u64, published_at: Instant) -> Instant {
    let mut last_seen = counters.received.load(Ordering::Relaxed);
    let mut last_change = published_at;
    while last_seen < expected
        && last_change.elapsed() < DRAIN_IDLE
        && published_at.elapsed() < DRAIN_MAX
    {
        tokio::time::sleep(Duration::from_millis(1)).await;
        let now = counters.received.load(Ordering::Relaxed);
        if now != last_seen {
            last_seen = now;
            last_change = Instant::now();
        }
    }
    last_change.max(published_at)
}

/// Connects with the bench's client options.
async fn connect(global: &Global, role: &str) -> Result<Client> {
    Client::connect(
        global.server.as_str(),
        global.options(format!("{}-{role}", global.name)),
    )
    .await
    .with_context(|| format!("cannot connect to {}", global.server))
}

/// Publishes as fast as the client takes messages, round-robin over `topics`, until `deadline`.
/// Returns how many were published.
async fn publish_flat_out(
    client: &Client,
    topics: &[String],
    payload: &[u8],
    deadline: Instant,
    counters: &Counters,
) -> Result<u64> {
    let mut sent = 0u64;
    let mut next_topic = 0usize;
    loop {
        for _ in 0..BATCH {
            client
                .publish(&topics[next_topic], payload)
                .await
                .context("cannot publish")?;
            next_topic += 1;
            if next_topic == topics.len() {
                next_topic = 0;
            }
        }
        sent += BATCH;
        counters.sent.store(sent, Ordering::Relaxed);
        if Instant::now() >= deadline {
            return Ok(sent);
        }
        // On a single-threaded runtime the subscribers and the progress line run only when the
        // publisher yields; publish itself yields only when the write buffer is full.
        tokio::task::yield_now().await;
    }
}

/// A fixed-rate schedule: message `k` (from 0) is due `k / rate` seconds after the start, and
/// every message due before `duration` is sent.
#[derive(Debug, Clone, Copy)]
struct Schedule {
    /// Messages per second.
    rate: u64,
    /// How long the schedule runs.
    duration: Duration,
}

impl Schedule {
    /// When message `k` is due, from the start of the schedule (rounded down to the nanosecond).
    fn due(&self, k: u64) -> Duration {
        let ns = u128::from(k) * 1_000_000_000 / u128::from(self.rate.max(1));
        Duration::from_nanos(u64::try_from(ns).unwrap_or(u64::MAX))
    }

    /// How many messages are due before `duration`: the `k` with `due(k) < duration`.
    fn messages(&self) -> u64 {
        let scaled = self.duration.as_nanos() * u128::from(self.rate);
        u64::try_from(scaled.div_ceil(1_000_000_000)).unwrap_or(u64::MAX)
    }

    /// The stamp of message `k` given the schedule's start as nanoseconds since the epoch.
    fn stamp(&self, start_ns: u64, k: u64) -> u64 {
        start_ns.saturating_add(self.due(k).as_nanos() as u64)
    }
}

/// Publishes every message of `schedule`, each stamped with the time it was due (nanoseconds
/// since `epoch`), recording in `lag` how late each was handed over. Message `k` goes to
/// `targets[k % targets.len()]` (a client and its topic), so `n` targets on a schedule of
/// `n * r` messages per second each get `r` a second, evenly spaced and out of phase with each
/// other. Returns how many were published, and `lag`.
///
/// The pacing runs on a thread of its own that sleeps with the operating system's timer
/// (tens of microseconds late, where tokio's timer rounds to a millisecond) and hands each
/// message to the client on the runtime. Each message carries its own slot in the schedule, so
/// the latency measured includes any lateness of the sleep, a full write buffer or a busy
/// runtime (`lag` says how much of it was the tool's). A publisher that falls behind sends what
/// is overdue at once instead of skipping it, and takes longer than `duration` to finish: the
/// slow-down shows as latency rather than as messages never sent.
///
/// # Errors
/// A publish fails, or waits longer than [`DRAIN_MAX`] for room in its client's write buffer.
async fn publish_paced(
    targets: Vec<(Client, String)>,
    payload: &[u8],
    schedule: Schedule,
    epoch: std::time::Instant,
    counters: &Arc<Counters>,
    hist: Histogram<u64>,
) -> Result<(u64, Histogram<u64>)> {
    if targets.is_empty() {
        bail!("nothing to publish to");
    }
    let payload = payload.to_vec();
    let counters = counters.clone();
    let runtime = tokio::runtime::Handle::current();
    tokio::task::spawn_blocking(move || {
        pace(schedule, epoch, payload, &counters, hist, |k, payload| {
            let (client, topic) = &targets[(k % targets.len() as u64) as usize];
            // A plain publish into a buffer with room completes without waiting.
            runtime
                .block_on(tokio::time::timeout(
                    DRAIN_MAX,
                    std::future::IntoFuture::into_future(client.publish(topic, payload)),
                ))
                .context("a publish waited too long for room in the write buffer")?
                .context("cannot publish")?;
            Ok(())
        })
    })
    .await
    .context("the publishing thread failed")?
}

/// The pacing loop of [`publish_paced`], on the calling thread: for each message `k` of
/// `schedule`, sleeps until it is due, stamps `payload`'s first 8 bytes with its due time
/// (nanoseconds since `epoch`), records in `lag` how late it is handed over, and hands it to
/// `send(k, payload)`. Returns how many were sent, and `lag`.
///
/// # Errors
/// What `send` returns.
fn pace(
    schedule: Schedule,
    epoch: std::time::Instant,
    mut payload: Vec<u8>,
    counters: &Counters,
    mut lag: Histogram<u64>,
    mut send: impl FnMut(u64, &[u8]) -> Result<()>,
) -> Result<(u64, Histogram<u64>)> {
    let start = std::time::Instant::now();
    let start_ns = start.duration_since(epoch).as_nanos() as u64;
    let total = schedule.messages();
    let mut sent = 0u64;
    while sent < total {
        let due = schedule.due(sent);
        let now = start.elapsed();
        if due > now {
            std::thread::sleep(due - now);
        }
        payload[..8].copy_from_slice(&schedule.stamp(start_ns, sent).to_be_bytes());
        let late = start.elapsed().saturating_sub(due);
        lag.saturating_record((late.as_nanos() as u64).max(1));
        send(sent, &payload)?;
        sent += 1;
        if sent.is_multiple_of(256) || sent == total {
            counters.sent.store(sent, Ordering::Relaxed);
        }
    }
    Ok((sent, lag))
}

/// Counts deliveries until the stream ends; with `latency`, records each message's latency into
/// the histogram: the time since the stamp in its first 8 bytes (nanoseconds since the epoch).
async fn subscriber(
    mut sub: Subscription,
    counters: Arc<Counters>,
    mut latency: Option<(std::time::Instant, Histogram<u64>)>,
) -> SubResult {
    while let Some(first) = sub.next().await {
        let mut n = 1u64;
        let mut next = Some(first);
        while let Some(msg) = next {
            if let Some((epoch, h)) = &mut latency {
                record_latency(h, *epoch, &msg.payload());
            }
            // Bounded so the shared counter (and the progress line) keeps moving.
            next = if n < 1024 { sub.try_next() } else { None };
            if next.is_some() {
                n += 1;
            }
        }
        counters.received.fetch_add(n, Ordering::Relaxed);
    }
    SubResult {
        missed: sub.missed(),
        latency: latency.map(|(_, h)| h),
    }
}

/// Starts the progress line, when stderr is a terminal and the report is not JSON.
fn start_progress(
    common: &Common,
    counters: &Arc<Counters>,
    subs: u32,
    start: Instant,
) -> Option<JoinHandle<()>> {
    (!common.json && std::io::stderr().is_terminal())
        .then(|| tokio::spawn(progress(counters.clone(), subs, start)))
}

/// Stops the progress line started by [`start_progress`] and clears it.
async fn stop_progress(progress: Option<JoinHandle<()>>) {
    if let Some(progress) = progress {
        progress.abort();
        // Awaited so that a line being written on another worker is finished before the clear.
        let _ = progress.await;
        report::clear_progress();
    }
}

/// Records the time since the stamp in the first 8 bytes of `payload` (nanoseconds since
/// `epoch`, big-endian); a payload too short for a stamp is not counted.
fn record_latency(h: &mut Histogram<u64>, epoch: std::time::Instant, payload: &[u8]) {
    let now = epoch.elapsed().as_nanos() as u64;
    if let Some(stamp) = payload.first_chunk::<8>() {
        h.saturating_record(now.saturating_sub(u64::from_be_bytes(*stamp)));
    }
}

/// Rewrites one progress line on stderr every second until aborted. Rates are over the time
/// since the previous line as measured, so a late tick (a busy runtime) does not inflate them.
async fn progress(counters: Arc<Counters>, subs: u32, start: Instant) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    let (mut last_at, mut last_sent, mut last_recv) = (start, 0u64, 0u64);
    loop {
        tick.tick().await;
        let now = Instant::now();
        let sent = counters.sent.load(Ordering::Relaxed);
        let recv = counters.received.load(Ordering::Relaxed);
        let span = now.duration_since(last_at);
        report::show_progress(
            now.duration_since(start),
            sent,
            report::per_sec(sent - last_sent, span),
            (subs > 0).then(|| (recv, report::per_sec(recv - last_recv, span))),
        );
        (last_at, last_sent, last_recv) = (now, sent, recv);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_are_due_on_a_fixed_schedule() {
        let s = Schedule {
            rate: 1000,
            duration: Duration::from_millis(300),
        };
        assert_eq!(s.due(0), Duration::ZERO);
        assert_eq!(s.due(1), Duration::from_millis(1));
        assert_eq!(s.due(250), Duration::from_millis(250));
        assert_eq!(s.messages(), 300);
        // Stamps are the slots, whenever the messages are actually sent.
        assert_eq!(s.stamp(5_000, 3), 5_000 + 3_000_000);
    }

    #[test]
    fn uneven_rates_round_down_to_the_nanosecond() {
        let s = Schedule {
            rate: 3,
            duration: Duration::from_secs(1),
        };
        assert_eq!(s.due(1), Duration::from_nanos(333_333_333));
        assert_eq!(s.due(3), Duration::from_secs(1));
        // Due at 0, 1/3 and 2/3 s: three messages before the end of the second.
        assert_eq!(s.messages(), 3);
        let s = Schedule {
            rate: 3,
            duration: Duration::from_millis(1001),
        };
        assert_eq!(s.messages(), 4);
    }

    #[test]
    fn long_schedules_do_not_overflow() {
        let s = Schedule {
            rate: 10_000_000,
            duration: Duration::from_secs(365 * 24 * 3600),
        };
        let last = s.messages() - 1;
        assert!(s.due(last) < s.duration);
        assert!(s.due(last + 1) >= s.duration);
    }
}
