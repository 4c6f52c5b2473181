//! Real-time dashboard: a producer emits metrics (`metrics.cpu_usage`, `metrics.memory_usage`,
//! `metrics.disk_io`, `metrics.network_rx`) several times a second. An admin dashboard watches
//! everything from the start; an ops dashboard joins later and sees only what is published after
//! it joined; a capacity dashboard filters to CPU and memory and leaves early. Each prints its
//! counts when it leaves, and nothing reaches it after.
//!
//! `cargo run -p brokerd-client --example dashboard` against a broker at `BROKERD_SERVER`
//! (default `127.0.0.1:7654`). The end-to-end tests run [`run`] too.

use brokerd_client::{Client, ConnectOptions, Subscription};
use std::collections::BTreeMap;
use std::time::Duration;

/// The metric names the producer emits each round.
pub const METRICS: [&str; 4] = ["cpu_usage", "memory_usage", "disk_io", "network_rx"];
/// Rounds published in all.
pub const ROUNDS: u64 = 15;
/// The round before which the ops dashboard joins.
pub const OPS_JOINS: u64 = 6;
/// The round before which the capacity dashboard leaves.
pub const CAPACITY_LEAVES: u64 = 11;

/// What one dashboard saw.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Seen {
    /// Messages per metric name.
    pub per_metric: BTreeMap<String, u64>,
    /// The rounds it saw, in order of arrival.
    pub rounds: Vec<u64>,
}

/// What each dashboard saw, by name.
pub type Report = BTreeMap<String, Seen>;

struct Dashboard {
    name: &'static str,
    client: Client,
    task: tokio::task::JoinHandle<anyhow::Result<Seen>>,
}

async fn join(addr: &str, name: &'static str, filters: &[&str]) -> anyhow::Result<Dashboard> {
    let client = Client::connect(addr, ConnectOptions::new(name)).await?;
    let mut subs = Vec::new();
    for f in filters {
        subs.push(client.subscribe(f).await?);
    }
    println!("[{name}] joined, watching {}", filters.join(", "));
    let task = tokio::spawn(watch(name, subs));
    Ok(Dashboard { name, client, task })
}

async fn watch(name: &'static str, subs: Vec<Subscription>) -> anyhow::Result<Seen> {
    let (tx, mut rx) = tokio::sync::mpsc::channel(1024);
    for mut sub in subs {
        let tx = tx.clone();
        tokio::spawn(async move {
            while let Some(msg) = sub.next().await {
                if tx.send(msg).await.is_err() {
                    break;
                }
            }
        });
    }
    drop(tx);
    let mut seen = Seen::default();
    while let Some(msg) = rx.recv().await {
        let v: serde_json::Value = serde_json::from_slice(&msg.payload())?;
        let metric = msg.topic().trim_start_matches("metrics.").to_string();
        let round = v["round"].as_u64().unwrap_or(0);
        if round.is_multiple_of(5) {
            println!("[{name}] round {round}: {metric} = {}", v["value"]);
        }
        *seen.per_metric.entry(metric).or_default() += 1;
        seen.rounds.push(round);
    }
    Ok(seen)
}

async fn leave(d: Dashboard, report: &mut Report) -> anyhow::Result<()> {
    d.client.close().await?;
    let seen = d.task.await??;
    println!(
        "[{}] leaving after {} updates: {:?}",
        d.name,
        seen.rounds.len(),
        seen.per_metric
    );
    report.insert(d.name.to_string(), seen);
    Ok(())
}

/// Runs the scenario against the broker at `addr`, one round every `interval`.
pub async fn run(addr: &str, interval: Duration) -> anyhow::Result<Report> {
    let mut report = Report::new();
    let admin = join(addr, "admin-dashboard", &["metrics.>"]).await?;
    let capacity = join(
        addr,
        "capacity-dashboard",
        &["metrics.cpu_usage", "metrics.memory_usage"],
    )
    .await?;
    let mut capacity = Some(capacity);
    let mut ops = None;
    let producer = Client::connect(addr, ConnectOptions::new("metrics-producer")).await?;
    let mut ticker = tokio::time::interval(interval);
    for round in 1..=ROUNDS {
        ticker.tick().await;
        if round == OPS_JOINS {
            ops = Some(join(addr, "ops-dashboard", &["metrics.*"]).await?);
        }
        if round == CAPACITY_LEAVES
            && let Some(d) = capacity.take()
        {
            leave(d, &mut report).await?;
        }
        for (i, metric) in METRICS.iter().enumerate() {
            let value = (round * 7 + i as u64 * 13) % 100;
            let payload = serde_json::json!({ "round": round, "value": value });
            producer
                .publish(&format!("metrics.{metric}"), serde_json::to_vec(&payload)?)
                .await?;
        }
        // Everything this round published is routed before anyone joins or leaves.
        producer.flush().await?;
    }
    producer.close().await?;
    for d in [Some(admin), ops].into_iter().flatten() {
        leave(d, &mut report).await?;
    }
    Ok(report)
}

#[allow(dead_code)]
#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let addr = std::env::var("BROKERD_SERVER").unwrap_or_else(|_| "127.0.0.1:7654".into());
    run(&addr, Duration::from_millis(200)).await?;
    Ok(())
}
