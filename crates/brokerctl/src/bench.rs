//! `brokerctl bench`: load scenarios against a running broker, measured from the client side.
//!
//! Each scenario opens one publisher connection and, where it has subscribers, one connection per
//! subscriber, all through `brokerd-client`. The publisher is pipelined: `Client::publish` only
//! buffers, and waits only when the client's write buffer is full. After `--duration` the
//! publisher sends a `PING` and waits for the `PONG` (everything before it has been routed), then
//! the subscribers are given time to drain what is already in flight.
//!
//! The tool measures itself too: its CPU time over the run (from `/proc/self/stat`), and the
//! broker's when `--broker-pid` names it, so a reader can tell whether the tool was the limit.
//! Report formatting lives in [`report`]; the hidden `hold` scenario (idle connections for memory
//! measurements) in [`hold`]. Nothing here asserts a time: these are measurements.

mod hold;
mod report;

use crate::Global;
use anyhow::{Context, Result, bail};
use brokerd_client::{Client, Subscription};
use clap::{Args, Subcommand};
use report::{CpuClock, Report};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
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
    /// One publisher at a fixed rate, the send time in the payload; reports latency percentiles.
    Latency {
        /// Messages per second.
        #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..=10_000_000))]
        rate: u64,
    },
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
    missed: u64,
    /// Latency samples in nanoseconds (latency scenario only).
    samples: Vec<u64>,
}

/// Runs `brokerctl bench`.
pub(crate) async fn cmd_bench(global: &Global, args: BenchArgs) -> Result<()> {
    let common = args.common;
    if let Scenario::Hold(h) = &args.scenario {
        return hold::run(global, h).await;
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
        Scenario::Hold(_) => unreachable!("handled above"),
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
    let mut sub_clients = Vec::with_capacity(subs as usize);
    let mut sub_tasks = Vec::with_capacity(subs as usize);
    for i in 0..subs {
        let client = connect(global, &format!("bench-sub-{i}")).await?;
        let sub = client
            .subscribe(&filter)
            .await
            .with_context(|| format!("cannot subscribe to {filter}"))?;
        sub_tasks.push(tokio::spawn(subscriber(
            sub,
            counters.clone(),
            rate.is_some().then_some(epoch),
        )));
        sub_clients.push(client);
    }

    let progress = tokio::spawn(progress(counters.clone(), subs));
    let mut payload = vec![0u8; common.size];
    let cpu = CpuClock::start(common.broker_pid);
    let start = Instant::now();
    let deadline = start + common.duration;
    let sent = match rate {
        None => publish_flat_out(&publisher, &topic_names, &payload, deadline, &counters).await?,
        Some(r) => {
            publish_paced(
                &publisher,
                &topic_names[0],
                &mut payload,
                r,
                deadline,
                epoch,
                &counters,
            )
            .await?
        }
    };
    publisher
        .flush()
        .await
        .context("connection closed before the broker confirmed the messages")?;
    let published_at = Instant::now();

    // Deliveries may still be in flight after the PONG; wait until all arrived or none arrive.
    let expected = sent * u64::from(subs);
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
    // Delivery rates end at the last delivery observed (to within the 1 ms poll), not at the
    // end of an idle drain.
    let end = if subs == 0 {
        published_at
    } else {
        last_change.max(published_at)
    };
    let elapsed = end.duration_since(start);
    let cpu = cpu.stop();
    progress.abort();
    report::clear_progress();

    for client in sub_clients {
        // Closing ends each subscription stream, which ends its task.
        let _ = client.close().await;
    }
    let _ = publisher.close().await;
    let mut missed = 0;
    let mut samples = Vec::new();
    for task in sub_tasks {
        let r = task.await.context("a subscriber task failed")?;
        missed += r.missed;
        samples.extend(r.samples);
    }
    let received = counters.received.load(Ordering::Relaxed);
    let report = Report {
        scenario: name,
        size: common.size,
        duration: common.duration,
        subs,
        topics,
        rate,
        sent,
        received,
        missed,
        elapsed,
        publish_elapsed: published_at.duration_since(start),
        threads: common.threads,
        cpu,
        latency: rate.map(|_| report::Latency::from_samples(samples)),
    };
    if common.json {
        println!("{}", report.json());
    } else {
        print!("{}", report.table());
    }
    Ok(())
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

/// Publishes `rate` messages per second until `deadline`, each stamped with its send time.
///
/// Tokio's timer has millisecond resolution, so messages go out in small bursts, one per timer
/// tick, each message stamped when it is handed to the client (not when it was due): the
/// latency measured is the broker's and the clients', not the pacing's.
async fn publish_paced(
    client: &Client,
    topic: &str,
    payload: &mut [u8],
    rate: u64,
    deadline: Instant,
    epoch: std::time::Instant,
    counters: &Counters,
) -> Result<u64> {
    let start = Instant::now();
    let mut sent = 0u64;
    loop {
        let now = Instant::now();
        if now >= deadline {
            return Ok(sent);
        }
        let due = (now.duration_since(start).as_nanos() * u128::from(rate) / 1_000_000_000) as u64;
        while sent < due {
            let stamp = epoch.elapsed().as_nanos() as u64;
            payload[..8].copy_from_slice(&stamp.to_be_bytes());
            client
                .publish(topic, &*payload)
                .await
                .context("cannot publish")?;
            sent += 1;
        }
        counters.sent.store(sent, Ordering::Relaxed);
        let next = start + Duration::from_nanos((sent + 1) * 1_000_000_000 / rate);
        tokio::time::sleep_until(next.min(deadline)).await;
    }
}

/// Counts deliveries until the stream ends; with `epoch`, records each message's latency.
async fn subscriber(
    mut sub: Subscription,
    counters: Arc<Counters>,
    epoch: Option<std::time::Instant>,
) -> SubResult {
    let mut samples = Vec::new();
    while let Some(first) = sub.next().await {
        let mut n = 1u64;
        let mut next = Some(first);
        while let Some(msg) = next {
            if let Some(epoch) = epoch {
                let now = epoch.elapsed().as_nanos() as u64;
                if let Some(stamp) = msg.payload().get(..8) {
                    let mut b = [0u8; 8];
                    b.copy_from_slice(stamp);
                    samples.push(now.saturating_sub(u64::from_be_bytes(b)));
                }
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
        samples,
    }
}

/// Rewrites one progress line on stderr every second until aborted.
async fn progress(counters: Arc<Counters>, subs: u32) {
    let start = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.tick().await;
    let (mut last_sent, mut last_recv) = (0u64, 0u64);
    loop {
        tick.tick().await;
        let sent = counters.sent.load(Ordering::Relaxed);
        let recv = counters.received.load(Ordering::Relaxed);
        report::show_progress(
            start.elapsed(),
            sent,
            sent - last_sent,
            (subs > 0).then_some((recv, recv - last_recv)),
        );
        (last_sent, last_recv) = (sent, recv);
    }
}
