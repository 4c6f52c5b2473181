//! `brokerctl bench many`: many publisher and subscriber connections at once, spread over the
//! tool's runtime threads (`--threads`), each publisher flat out or with a little traffic.
//!
//! Publisher `i` publishes to `bench.many.<i>` and subscriber `j` subscribes to
//! `bench.many.<j % pubs>`, so with as many subscribers as publishers each pair has a topic of its
//! own; with `--shared-topic` all use `bench.many` and every subscriber hears every publisher.
//! Connections are opened before the clock starts, subscribers first, `--connect-parallel` at a
//! time and all within `--connect-timeout`; the file descriptor limit is raised to hold them.
//!
//! Without `--rate` every publisher is a task publishing as fast as the broker confirms: it
//! asks for a confirmation (`PING`) after each `WINDOW` messages and waits for the one before,
//! so at most two windows are unconfirmed. Publishing only as fast as the client buffers takes
//! them, 100 publishers on a shared topic queued more in socket buffers than the broker could
//! fan out to 100 subscribers within the drain's bound, and the end of the run measured the
//! backlog rather than the broker. With `--rate R` the publishers share one fixed schedule of `pubs * R`
//! messages a second handed out round-robin, so that each sends `R` a second, evenly spaced and
//! out of phase with the others. As in the latency scenario each message carries the time it was
//! due, and latency is measured from then; subscribers record it into a few shared HDR
//! histograms (`SHARDS`), not one each, which for 10,000 subscribers would be 2 GB.
//!
//! The connections are `brokerd-client`'s, as an application's would be; with `--raw` (paced
//! runs only) they are lean sockets speaking brokerd's or NATS's protocol directly (`raw.rs`), to
//! compare brokers with the same tool. The broker's CPU and
//! resident memory come from `/proc` when `--broker-pid` names it; the tool's own cost per
//! connection (buffers, tasks) is in the tool's figures only.

mod raw;

use super::report::{self, CpuClock, Report};
use super::{
    Common, Counters, DRAIN_MAX, Schedule, drain, publish_paced, record_latency, start_progress,
    stop_progress,
};
use crate::Global;
use anyhow::{Context, Result, bail};
use brokerd_client::{Client, Subscription};
use clap::Args;
use hdrhistogram::Histogram;
use std::future::Future;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::{Instant, timeout_at};

/// Arguments of `brokerctl bench many`.
#[derive(Debug, Clone, Args)]
pub(crate) struct ManyArgs {
    /// Publisher connections; publisher i publishes to `bench.many.<i>`.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pubs: u32,
    /// Subscriber connections; subscriber j subscribes to `bench.many.<j % pubs>`.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(0..=100_000))]
    subs: u32,
    /// Put every publisher and subscriber on the one topic `bench.many` instead.
    #[arg(long)]
    shared_topic: bool,
    /// Messages per second per publisher, on a fixed schedule, with latency measured from when
    /// each message was due; without it, publishers send as fast as they can.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=10_000_000))]
    rate: Option<u64>,
    /// Connections being opened at once.
    #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    connect_parallel: u32,
    /// Longest time opening every connection may take.
    #[arg(long, default_value = "120s", value_parser = humantime::parse_duration)]
    connect_timeout: Duration,
    /// Lean connections speaking a broker's protocol directly instead of `brokerd-client`'s:
    /// `brokerd`, or `nats` against nats-server, so the two can be compared with the same tool.
    /// Needs `--rate`.
    #[arg(long, value_enum)]
    raw: Option<raw::Wire>,
}

impl ManyArgs {
    /// The topic of publisher `i` (and of the subscribers `j` with `j % pubs == i`).
    fn topic(&self, i: u32) -> String {
        if self.shared_topic {
            "bench.many".to_string()
        } else {
            format!("bench.many.{i}")
        }
    }
}

/// Messages an unpaced publisher sends between looks at the clock: fewer than one publisher
/// alone sends, so that thousands of them take turns often.
const BATCH: u64 = 64;

/// Messages an unpaced publisher sends per confirmation it asks for; a multiple of [`BATCH`].
const WINDOW: u64 = 16 * BATCH;

/// Latency histograms the subscribers share; subscriber `j` records into shard `j % SHARDS`, so
/// a lock is rarely contended and memory stays at `SHARDS` times ~200 KiB.
const SHARDS: usize = 16;

/// Messages a subscriber takes, under its shard's lock, before counting them and waiting again.
const SUB_BATCH: u64 = 1024;

/// File descriptors the tool keeps for itself beyond one per connection.
const SPARE_FDS: u64 = 64;

/// Runs the many-connections scenario.
///
/// # Errors
/// The file descriptor limit cannot hold the connections, a connection cannot be opened in
/// time, a publish fails, or the broker does not confirm or deliver within the drain bounds.
pub(super) async fn run(global: &Global, common: &Common, args: &ManyArgs) -> Result<Report> {
    if let Some(wire) = args.raw {
        return raw::run(&global.server, common, args, wire).await;
    }
    if args.rate.is_some() && common.size < 8 {
        bail!("a paced run needs --size 8 or more (the due time is in the payload)");
    }
    let (pubs, subs) = (args.pubs, args.subs);
    let offered = match args.rate {
        Some(r) => Some(
            r.checked_mul(u64::from(pubs))
                .context("--rate times --pubs is too large")?,
        ),
        None => None,
    };
    raise_fd_limit(u64::from(pubs) + u64::from(subs) + SPARE_FDS)?;
    let topic = |i: u32| args.topic(i);
    let setup_start = Instant::now();
    let setup_deadline = setup_start + args.connect_timeout;
    let parallel = args.connect_parallel as usize;
    let opener = |role: String| {
        let server = global.server.clone();
        let options = global.options(format!("{}-{role}", global.name));
        async move {
            Client::connect(server.as_str(), options)
                .await
                .with_context(|| format!("cannot connect to {server}"))
        }
    };

    // Subscribers first: a message published before its subscription exists would count as lost.
    let subscribers = open_all("subscribers", subs, parallel, setup_deadline, |j| {
        let connect = opener(format!("many-sub-{j}"));
        let filter = topic(j % pubs);
        async move {
            let client = connect.await?;
            let sub = client
                .subscribe(&filter)
                .await
                .with_context(|| format!("cannot subscribe to {filter}"))?;
            anyhow::Ok((client, sub))
        }
    })
    .await?;
    let publishers = open_all("publishers", pubs, parallel, setup_deadline, |i| {
        opener(format!("many-pub-{i}"))
    })
    .await?;
    let setup = setup_start.elapsed();
    let topics: Vec<String> = (0..pubs).map(topic).collect();

    let counters = Arc::new(Counters::default());
    // Due times are nanoseconds since this instant, shared by the schedule and the subscribers.
    let epoch = std::time::Instant::now();
    let empty = report::latency_histogram().context("cannot make a latency histogram")?;
    let shards: Vec<Arc<Mutex<Histogram<u64>>>> = match args.rate {
        Some(_) => (0..SHARDS)
            .map(|_| Arc::new(Mutex::new(empty.clone())))
            .collect(),
        None => Vec::new(),
    };
    let mut sub_clients = Vec::with_capacity(subscribers.len());
    let mut sub_tasks = Vec::with_capacity(subscribers.len());
    for (j, (client, sub)) in subscribers.into_iter().enumerate() {
        let shard = shards.get(j % SHARDS).map(|h| (epoch, h.clone()));
        sub_tasks.push(tokio::spawn(subscriber(sub, counters.clone(), shard)));
        sub_clients.push(client);
    }

    let payload = vec![0u8; common.size];
    let cpu = CpuClock::start(common.broker_pid);
    let start = Instant::now();
    let progress = start_progress(common, &counters, subs, start);
    let mut send_lag = None;
    let per_pub: Vec<u64> = match offered {
        None => {
            let deadline = start + common.duration;
            let payload: Arc<[u8]> = payload.into();
            let tasks: Vec<JoinHandle<Result<u64>>> = publishers
                .iter()
                .zip(&topics)
                .map(|(c, t)| {
                    tokio::spawn(publish_unpaced(
                        c.clone(),
                        t.clone(),
                        payload.clone(),
                        deadline,
                        counters.clone(),
                    ))
                })
                .collect();
            let bound = deadline + DRAIN_MAX;
            let mut sent = Vec::with_capacity(tasks.len());
            for task in tasks {
                let n = timeout_at(bound, task)
                    .await
                    .context("a publisher could not stop in time")?
                    .context("a publisher task failed")??;
                sent.push(n);
            }
            sent
        }
        Some(offered) => {
            let schedule = Schedule {
                rate: offered,
                duration: common.duration,
            };
            let targets = publishers.iter().cloned().zip(topics.clone()).collect();
            let (total, lag) =
                publish_paced(targets, &payload, schedule, epoch, &counters, empty.clone()).await?;
            send_lag = Some(lag);
            // Message k went to publisher k % pubs.
            let p = u64::from(pubs);
            (0..p)
                .map(|i| total / p + u64::from(i < total % p))
                .collect()
        }
    };
    confirm(&publishers).await?;
    let published_at = Instant::now();

    let sent: u64 = per_pub.iter().sum();
    let expected = if args.shared_topic {
        sent * u64::from(subs)
    } else {
        (0..subs).map(|j| per_pub[(j % pubs) as usize]).sum()
    };
    let end = if subs == 0 {
        published_at
    } else {
        drain(&counters, expected, published_at).await
    };
    // Read while every connection is still open.
    let broker_rss_kib = common.broker_pid.and_then(report::rss_kib);
    let cpu = cpu.stop();
    stop_progress(progress).await;

    close_all(sub_clients.into_iter().chain(publishers)).await;
    let ends = Instant::now() + DRAIN_MAX;
    let mut missed = 0;
    for task in sub_tasks {
        missed += timeout_at(ends, task)
            .await
            .context("a subscription did not end after its connection closed")?
            .context("a subscriber task failed")?;
    }
    let latency = merge_shards(empty, &shards)?;
    Ok(Report {
        scenario: "many",
        size: common.size,
        duration: common.duration,
        pubs,
        subs,
        topics: if args.shared_topic { 1 } else { pubs },
        rate: args.rate,
        sent,
        expected,
        received: counters.received.load(Ordering::Relaxed),
        missed,
        elapsed: end.duration_since(start),
        publish_elapsed: published_at.duration_since(start),
        threads: common.threads,
        cpu,
        latency: args.rate.map(|_| report::Latency::from_histogram(&latency)),
        send_lag: send_lag.map(|h| report::Latency::from_histogram(&h)),
        setup: Some(setup),
        broker_rss_kib,
        stream: None,
    })
}

/// The latency shards merged into `into`, which must have their bounds.
fn merge_shards(
    mut into: Histogram<u64>,
    shards: &[Arc<Mutex<Histogram<u64>>>],
) -> anyhow::Result<Histogram<u64>> {
    for shard in shards {
        let h = shard.lock().unwrap_or_else(PoisonError::into_inner);
        into.add(&*h)
            .context("cannot merge the latency histograms")?;
    }
    Ok(into)
}

/// Raises the soft file descriptor limit to at least `need`: to the hard limit, and past it
/// where the process may (with `CAP_SYS_RESOURCE`).
///
/// # Errors
/// The limit stays below `need`.
fn raise_fd_limit(need: u64) -> Result<()> {
    let soft = rlimit::increase_nofile_limit(u64::MAX)
        .context("cannot raise the file descriptor limit")?;
    if soft >= need {
        return Ok(());
    }
    // Past the hard limit needs CAP_SYS_RESOURCE; without it this fails and the check below says
    // what is missing.
    let _ = rlimit::setrlimit(rlimit::Resource::NOFILE, need, need);
    let (soft, _) = rlimit::getrlimit(rlimit::Resource::NOFILE)
        .context("cannot read the file descriptor limit")?;
    if soft < need {
        bail!("{need} file descriptors needed and {soft} allowed: raise the limit (ulimit -n)");
    }
    Ok(())
}

/// Opens `n` things with `open(i)`, `parallel` at a time, every one by `deadline`, and returns
/// them in the order of `i`. On an error or at the deadline the tasks still running are
/// aborted (dropping the set does it).
async fn open_all<T, F>(
    what: &str,
    n: u32,
    parallel: usize,
    deadline: Instant,
    mut open: impl FnMut(u32) -> F,
) -> Result<Vec<T>>
where
    T: Send + 'static,
    F: Future<Output = Result<T>> + Send + 'static,
{
    let mut slots: Vec<Option<T>> = (0..n).map(|_| None).collect();
    let mut set = JoinSet::new();
    let (mut next, mut done) = (0u32, 0u32);
    while done < n {
        while next < n && set.len() < parallel {
            let (i, opening) = (next, open(next));
            set.spawn(async move { (i, opening.await) });
            next += 1;
        }
        let Ok(joined) = timeout_at(deadline, set.join_next()).await else {
            bail!("only {done} of {n} {what} were set up in time (see --connect-timeout)");
        };
        let Some(joined) = joined else {
            break;
        };
        let (i, opened) = joined.context("a setup task failed")?;
        let opened = opened.with_context(|| format!("cannot set up {what} number {i}"))?;
        if let Some(slot) = slots.get_mut(i as usize) {
            *slot = Some(opened);
        }
        done += 1;
    }
    slots
        .into_iter()
        .collect::<Option<Vec<T>>>()
        .with_context(|| format!("not every one of the {what} was set up"))
}

/// Publishes to `topic` until `deadline`, as fast as the broker confirms windows of
/// [`WINDOW`] messages; returns how many. Waits at most [`DRAIN_MAX`] for a confirmation.
async fn publish_unpaced(
    client: Client,
    topic: String,
    payload: Arc<[u8]>,
    deadline: Instant,
    counters: Arc<Counters>,
) -> Result<u64> {
    let mut sent = 0u64;
    // The confirmation of the window before the last, awaited once the next window is written.
    let mut confirming: Option<JoinHandle<Result<(), brokerd_client::Error>>> = None;
    loop {
        for _ in 0..BATCH {
            client
                .publish(&topic, &payload[..])
                .await
                .context("cannot publish")?;
        }
        sent += BATCH;
        counters.sent.fetch_add(BATCH, Ordering::Relaxed);
        if Instant::now() >= deadline {
            return Ok(sent);
        }
        if sent.is_multiple_of(WINDOW) {
            if let Some(previous) = confirming.take() {
                tokio::time::timeout(DRAIN_MAX, previous)
                    .await
                    .context("the broker did not confirm a window in time")?
                    .context("a confirmation task failed")?
                    .context("the connection closed while waiting for a confirmation")?;
            }
            let client = client.clone();
            confirming = Some(tokio::spawn(async move { client.flush().await }));
        }
        tokio::task::yield_now().await;
    }
}

/// Waits until the broker has confirmed every publisher's messages (a `PING`/`PONG` each, all
/// at once), for at most [`DRAIN_MAX`].
async fn confirm(publishers: &[Client]) -> Result<()> {
    let deadline = Instant::now() + DRAIN_MAX;
    let mut set = JoinSet::new();
    for client in publishers {
        let client = client.clone();
        set.spawn(async move { client.flush().await });
    }
    while let Some(flushed) = timeout_at(deadline, set.join_next())
        .await
        .context("the broker did not confirm every publisher's messages in time")?
    {
        flushed
            .context("a confirmation task failed")?
            .context("a connection closed before the broker confirmed its messages")?;
    }
    Ok(())
}

/// Closes every client at once, waiting at most [`DRAIN_MAX`]; a client that does not close in
/// time is left to the end of the process. Closing ends each subscription stream.
async fn close_all(clients: impl Iterator<Item = Client>) {
    let deadline = Instant::now() + DRAIN_MAX;
    let mut set = JoinSet::new();
    for client in clients {
        set.spawn(async move {
            let _ = client.close().await;
        });
    }
    while let Ok(Some(_)) = timeout_at(deadline, set.join_next()).await {}
}

/// Counts deliveries until the stream ends; with `latency`, records each message's latency from
/// the due time in its first 8 bytes into the shared histogram. Returns the `LOST` count.
async fn subscriber(
    mut sub: Subscription,
    counters: Arc<Counters>,
    latency: Option<(std::time::Instant, Arc<Mutex<Histogram<u64>>>)>,
) -> u64 {
    while let Some(first) = sub.next().await {
        let mut n = 0u64;
        {
            // Held for one batch of messages already received, never across an await.
            let mut hist = latency
                .as_ref()
                .map(|(epoch, h)| (*epoch, h.lock().unwrap_or_else(PoisonError::into_inner)));
            let mut next = Some(first);
            while let Some(msg) = next {
                n += 1;
                if let Some((epoch, h)) = &mut hist {
                    record_latency(h, *epoch, &msg.payload());
                }
                next = if n < SUB_BATCH { sub.try_next() } else { None };
            }
        }
        counters.received.fetch_add(n, Ordering::Relaxed);
    }
    sub.missed()
}
