//! `brokerctl bench stream-pub` and `stream-replay`: what storing messages and reading them back
//! cost, measured from the client side, through `brokerd-client` as an application would.
//!
//! `stream-pub`: `--pubs` connections publish flat out for `--duration`, publisher `i` to
//! `bench.stream.<i>`, each publish waiting for the stream's `STORED` ([`Publish::stored`]) and
//! each publisher keeping at most `--window` of them unanswered (a [`FuturesUnordered`] of that
//! many). The rate counts `STORED` answers, from the first publish to the last answer; the
//! acknowledgement latency of each publish runs from handing it to the client to its `STORED`,
//! into an HDR histogram, so it includes the time a publish waited in the client's write buffer.
//!
//! `stream-replay`: publishes `--count` messages into the stream the same way (unless
//! `--no-publish`), then one subscription on a connection of its own replays the stream from the
//! start ([`StartPosition::All`], filter `>`), and the clock runs from sending that subscription
//! to the `--count`-th message. A replay that stops delivering for [`REPLAY_IDLE`] ends the run
//! with what arrived.
//!
//! The stream is `--stream` (default `BENCH`). When it does not exist the run adds it, capturing
//! `bench.stream.>` with `--fsync`, and deletes it afterwards unless `--keep`; an existing one is
//! used as it is, and must capture `bench.stream.<i>` (the first answer that is a plain `ACK`
//! fails the run). Nothing here asserts a time.
//!
//! [`Publish::stored`]: brokerd_client::Publish::stored

use super::report::{self, CpuClock, Report, StreamRun};
use super::{Common, Counters, DRAIN_MAX, start_progress, stop_progress};
use crate::Global;
use crate::streams::FsyncArg;
use anyhow::{Context, Result, bail};
use brokerd_client::{Client, Error, StartPosition, StreamConfig};
use clap::Args;
use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use hdrhistogram::Histogram;
use std::future::IntoFuture;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;
use tokio::task::JoinHandle;
use tokio::time::{Instant, timeout_at};

/// Options both stream scenarios share.
#[derive(Debug, Clone, Args)]
pub(crate) struct StreamOpts {
    /// The stream to write or replay; added (capturing `bench.stream.>`) when it does not exist.
    #[arg(long, value_name = "NAME", default_value = "BENCH")]
    stream: String,
    /// The durability of a stream the run adds.
    #[arg(long, value_enum, default_value_t = FsyncArg::Interval)]
    fsync: FsyncArg,
    /// Keep a stream the run added instead of deleting it afterwards.
    #[arg(long)]
    keep: bool,
    /// Publishes each publisher keeps unanswered at most.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    window: u64,
}

/// Arguments of `brokerctl bench stream-pub`.
#[derive(Debug, Clone, Args)]
pub(crate) struct StreamPubArgs {
    /// Publisher connections; publisher i publishes to `bench.stream.<i>`.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pubs: u32,
    /// The stream and the window.
    #[command(flatten)]
    opts: StreamOpts,
}

/// Arguments of `brokerctl bench stream-replay`.
#[derive(Debug, Clone, Args)]
pub(crate) struct StreamReplayArgs {
    /// Messages to replay (and first to publish) [default: 1,000,000, or with --no-publish all
    /// the stream holds].
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    count: Option<u64>,
    /// Replay what the stream already holds instead of publishing first.
    #[arg(long)]
    no_publish: bool,
    /// The stream and the window.
    #[command(flatten)]
    opts: StreamOpts,
}

/// Messages replayed or published by default.
const DEFAULT_COUNT: u64 = 1_000_000;

/// How long a replay may go without a message before the run ends with what arrived.
const REPLAY_IDLE: Duration = Duration::from_secs(10);

/// Topics a run publishes to, `bench.stream.<i>`, are all under this filter.
const FILTER: &str = "bench.stream.>";

/// Messages between updates of the shared counter (and looks at the clock).
const BATCH: u64 = 256;

/// When a publisher stops.
#[derive(Debug, Clone, Copy)]
enum Until {
    /// Publish nothing new after this.
    Deadline(Instant),
    /// Publish this many.
    Count(u64),
}

/// Runs `bench stream-pub`.
///
/// # Errors
/// The stream cannot be added or does not capture the topics, a publish fails, or the broker
/// does not answer within [`DRAIN_MAX`] after the end.
pub(super) async fn run_pub(
    global: &Global,
    common: &Common,
    args: &StreamPubArgs,
) -> Result<Report> {
    let admin = super::connect(global, "stream-admin").await?;
    let stream = prepare(&admin, &args.opts, true).await?;
    let mut publishers = Vec::with_capacity(args.pubs as usize);
    for i in 0..args.pubs {
        publishers.push(super::connect(global, &format!("stream-pub-{i}")).await?);
    }
    let counters = Arc::new(Counters::default());
    let empty = report::latency_histogram().context("cannot make a latency histogram")?;
    let payload: Arc<[u8]> = vec![0u8; common.size].into();
    let cpu = CpuClock::start(common.broker_pid);
    let start = Instant::now();
    let progress = start_progress(common, &counters, 0, start);
    let deadline = start + common.duration;
    let tasks: Vec<JoinHandle<Result<Published>>> = publishers
        .iter()
        .enumerate()
        .map(|(i, client)| {
            tokio::spawn(publish_stored(
                client.clone(),
                format!("bench.stream.{i}"),
                payload.clone(),
                args.opts.window,
                Until::Deadline(deadline),
                counters.clone(),
                empty.clone(),
            ))
        })
        .collect();
    let mut stored = 0;
    let mut latency = empty;
    let mut last = start;
    let mut failure = None;
    for task in tasks {
        match timeout_at(deadline + DRAIN_MAX, task).await {
            Ok(Ok(Ok(p))) => {
                stored += p.stored;
                last = last.max(p.last);
                latency
                    .add(&p.latency)
                    .context("cannot merge the latency histograms")?;
            }
            Ok(Ok(Err(e))) => failure = failure.or(Some(e)),
            Ok(Err(e)) => failure = failure.or(Some(anyhow::Error::new(e))),
            Err(_) => {
                failure = failure.or(Some(anyhow::anyhow!(
                    "a publisher's answers did not come within {}",
                    humantime::format_duration(DRAIN_MAX)
                )));
            }
        }
    }
    let broker_rss_kib = common.broker_pid.and_then(report::rss_kib);
    let cpu = cpu.stop();
    stop_progress(progress).await;
    for client in publishers {
        let _ = client.close().await;
    }
    finish(admin, &stream, &args.opts).await;
    if let Some(e) = failure {
        return Err(e);
    }
    let elapsed = last.duration_since(start);
    Ok(Report {
        scenario: "stream-pub",
        size: common.size,
        duration: common.duration,
        pubs: args.pubs,
        subs: 0,
        topics: args.pubs,
        rate: None,
        sent: stored,
        // Deliveries owed: none, there are no subscribers (as in `pub`).
        expected: 0,
        received: 0,
        missed: 0,
        elapsed,
        publish_elapsed: elapsed,
        threads: common.threads,
        cpu,
        latency: Some(report::Latency::from_histogram(&latency)),
        send_lag: None,
        setup: None,
        broker_rss_kib,
        stream: Some(StreamRun {
            name: stream.name,
            window: args.opts.window,
            payload_bytes: None,
        }),
    })
}

/// Runs `bench stream-replay`.
///
/// # Errors
/// The stream cannot be added, does not exist (`--no-publish`) or does not capture the topic,
/// a publish fails, or the replay subscription is refused.
pub(super) async fn run_replay(
    global: &Global,
    common: &Common,
    args: &StreamReplayArgs,
) -> Result<Report> {
    let admin = super::connect(global, "stream-admin").await?;
    let stream = prepare(&admin, &args.opts, !args.no_publish).await?;
    let result = replay(global, common, args, &stream).await;
    finish(admin, &stream, &args.opts).await;
    result
}

/// Fills the stream (unless `--no-publish`), then times the replay.
async fn replay(
    global: &Global,
    common: &Common,
    args: &StreamReplayArgs,
    stream: &BenchStream,
) -> Result<Report> {
    let counters = Arc::new(Counters::default());
    let (count, sent, publish_elapsed) = if args.no_publish {
        let count = args.count.unwrap_or(stream.held);
        if count == 0 {
            bail!("stream {} holds nothing to replay", stream.name);
        }
        (count, 0, Duration::ZERO)
    } else {
        let count = args.count.unwrap_or(DEFAULT_COUNT);
        let publisher = super::connect(global, "stream-fill").await?;
        let empty = report::latency_histogram().context("cannot make a latency histogram")?;
        let start = Instant::now();
        let progress = start_progress(common, &counters, 0, start);
        let published = publish_stored(
            publisher.clone(),
            "bench.stream.0".to_string(),
            vec![0u8; common.size].into(),
            args.opts.window,
            Until::Count(count),
            counters.clone(),
            empty,
        )
        .await;
        stop_progress(progress).await;
        let _ = publisher.close().await;
        let published = published?;
        (
            count,
            published.stored,
            published.last.duration_since(start),
        )
    };

    let client = super::connect(global, "stream-replay").await?;
    let cpu = CpuClock::start(common.broker_pid);
    let start = Instant::now();
    let progress = start_progress(common, &counters, 1, start);
    let mut sub = client
        .subscribe_stream(">", &stream.name, StartPosition::All)
        .await
        .with_context(|| format!("cannot replay stream {}", stream.name))?;
    let (mut received, mut bytes, mut last) = (0u64, 0u64, start);
    while received < count {
        let Ok(Some(first)) = tokio::time::timeout(REPLAY_IDLE, sub.next()).await else {
            break;
        };
        let mut n = 1u64;
        bytes += first.payload().len() as u64;
        // Counted in runs of what is already buffered, so that the shared counter moves
        // without an atomic per message.
        while n < BATCH && received + n < count {
            let Some(msg) = sub.try_next() else { break };
            bytes += msg.payload().len() as u64;
            n += 1;
        }
        received += n;
        last = Instant::now();
        counters.received.store(received, Ordering::Relaxed);
    }
    let broker_rss_kib = common.broker_pid.and_then(report::rss_kib);
    let cpu = cpu.stop();
    stop_progress(progress).await;
    let missed = sub.missed();
    drop(sub);
    let _ = client.close().await;
    // Replaying what the stream held, the payloads are whatever was published: report their
    // average rather than a --size that played no part.
    let size = if sent == 0 {
        usize::try_from(bytes / received.max(1)).unwrap_or(usize::MAX)
    } else {
        common.size
    };
    Ok(Report {
        scenario: "stream-replay",
        size,
        duration: common.duration,
        pubs: u32::from(sent > 0),
        subs: 1,
        topics: 1,
        rate: None,
        sent,
        expected: count,
        received,
        missed,
        elapsed: last.duration_since(start),
        publish_elapsed,
        threads: common.threads,
        cpu,
        latency: None,
        send_lag: None,
        setup: None,
        broker_rss_kib,
        stream: Some(StreamRun {
            name: stream.name.clone(),
            window: args.opts.window,
            payload_bytes: Some(bytes),
        }),
    })
}

/// The stream a run uses.
#[derive(Debug)]
struct BenchStream {
    name: String,
    /// This run added it, so it deletes it afterwards (unless `--keep`).
    added: bool,
    /// Messages it held when the run started.
    held: u64,
}

/// Finds the stream, or adds it when `add` allows.
async fn prepare(admin: &Client, opts: &StreamOpts, add: bool) -> Result<BenchStream> {
    match admin.streams().info(&opts.stream).await {
        Ok(info) => Ok(BenchStream {
            name: info.config.name,
            added: false,
            held: info.msgs,
        }),
        // The broker's refusal to show it: it does not exist (or is not shown to this user,
        // in which case adding it fails with the reason).
        Err(Error::Stream { message, .. }) => {
            if !add {
                bail!("cannot replay stream {}: {message}", opts.stream);
            }
            let config = StreamConfig {
                name: opts.stream.clone(),
                filters: vec![FILTER.to_string()],
                fsync: opts.fsync.into(),
                ..StreamConfig::default()
            };
            let info = admin
                .streams()
                .add(&config)
                .await
                .with_context(|| format!("cannot add stream {}", opts.stream))?;
            Ok(BenchStream {
                name: info.config.name,
                added: true,
                held: info.msgs,
            })
        }
        Err(e) => {
            Err(anyhow::Error::new(e).context(format!("cannot look up stream {}", opts.stream)))
        }
    }
}

/// Deletes a stream the run added (unless `--keep`) and closes the admin connection. A failure
/// is reported, not fatal: the figures are already measured.
async fn finish(admin: Client, stream: &BenchStream, opts: &StreamOpts) {
    if stream.added
        && !opts.keep
        && let Err(e) = admin.streams().delete(&stream.name).await
    {
        crate::note(format_args!(
            "brokerctl: cannot delete the bench stream {}: {e}",
            stream.name
        ));
    }
    let _ = admin.close().await;
}

/// What one publisher did.
struct Published {
    /// Publishes the stream confirmed.
    stored: u64,
    /// When the last confirmation arrived.
    last: Instant,
    /// Acknowledgement latencies in nanoseconds.
    latency: Histogram<u64>,
}

/// Publishes to `topic` until `until`, each publish waiting for its `STORED`, at most `window`
/// unanswered at a time; returns what was stored and how long each answer took.
///
/// # Errors
/// A publish fails, or the broker answers with a plain `ACK` (the stream does not capture
/// `topic`).
async fn publish_stored(
    client: Client,
    topic: String,
    payload: Arc<[u8]>,
    window: u64,
    until: Until,
    counters: Arc<Counters>,
    mut latency: Histogram<u64>,
) -> Result<Published> {
    let window = usize::try_from(window).unwrap_or(usize::MAX);
    let mut in_flight = FuturesUnordered::new();
    let (mut sent, mut stored, mut counted) = (0u64, 0u64, 0u64);
    let mut last = Instant::now();
    let mut open = true;
    loop {
        while open && in_flight.len() < window {
            let publish = client.publish(&topic, &payload[..]).stored().into_future();
            let at = std::time::Instant::now();
            in_flight.push(async move { (at, publish.await) });
            sent += 1;
            open = match until {
                Until::Count(n) => sent < n,
                Until::Deadline(d) => !sent.is_multiple_of(BATCH) || Instant::now() < d,
            };
        }
        let Some((at, answer)) = in_flight.next().await else {
            break;
        };
        match answer {
            Ok(_) => {}
            Err(Error::NotStored { topic, .. }) => bail!(
                "no stream captures {topic}: the broker answered with a plain ACK (does the \
                 bench's stream capture {FILTER}?)"
            ),
            Err(e) => return Err(anyhow::Error::new(e).context("a stored publish failed")),
        }
        latency.saturating_record((at.elapsed().as_nanos() as u64).max(1));
        stored += 1;
        last = Instant::now();
        if stored - counted >= BATCH {
            counters.sent.fetch_add(stored - counted, Ordering::Relaxed);
            counted = stored;
        }
    }
    counters.sent.fetch_add(stored - counted, Ordering::Relaxed);
    Ok(Published {
        stored,
        last,
        latency,
    })
}
