//! Work distribution: a producer publishes 1,000 jobs to `jobs.resize`; three workers in the queue
//! group `resizers` share them, each job handled by exactly one worker; an auditor subscribed
//! without a group sees all 1,000.
//!
//! `cargo run -p brokerd-client --example work_queue` against a broker at `BROKERD_SERVER`
//! (default `127.0.0.1:7654`). The end-to-end tests run [`run`] too.

use brokerd_client::{Client, ConnectOptions};

/// Jobs published.
pub const JOBS: u32 = 1_000;

/// What happened: the job ids each worker handled, and how many the auditor saw.
#[derive(Debug, Default)]
pub struct Report {
    /// `(worker, job ids it handled)`.
    pub workers: Vec<(String, Vec<u32>)>,
    /// Jobs the auditor received.
    pub audited: Vec<u32>,
}

async fn collect(mut sub: brokerd_client::Subscription) -> anyhow::Result<Vec<u32>> {
    let mut ids = Vec::new();
    while let Some(msg) = sub.next().await {
        ids.push(std::str::from_utf8(&msg.payload())?.parse()?);
    }
    Ok(ids)
}

/// Runs the scenario against the broker at `addr`.
pub async fn run(addr: &str) -> anyhow::Result<Report> {
    let mut workers = Vec::new();
    for i in 1..=3 {
        let name = format!("resize-worker-{i}");
        let client = Client::connect(addr, ConnectOptions::new(name.clone())).await?;
        let sub = client.subscribe_queue("jobs.resize", "resizers").await?;
        workers.push((name, client, tokio::spawn(collect(sub))));
    }
    let auditor = Client::connect(addr, ConnectOptions::new("auditor")).await?;
    let audit = tokio::spawn(collect(auditor.subscribe("jobs.>").await?));

    let producer = Client::connect(addr, ConnectOptions::new("job-producer")).await?;
    for id in 0..JOBS {
        let delivered = producer
            .publish("jobs.resize", id.to_string())
            .acked()
            .await?;
        // One worker of the group plus the auditor (a group counts once), plus any other
        // subscriber sharing the broker.
        anyhow::ensure!(delivered >= 2, "job {id} reached {delivered} subscriptions");
    }
    producer.close().await?;
    println!("[producer] published {JOBS} jobs to jobs.resize");

    let mut report = Report::default();
    for (name, client, task) in workers {
        client.close().await?;
        let ids = task.await??;
        println!("[{name}] resized {} images", ids.len());
        report.workers.push((name, ids));
    }
    auditor.close().await?;
    report.audited = audit.await??;
    println!("[auditor] saw {} jobs", report.audited.len());
    Ok(report)
}

#[allow(dead_code)]
#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let addr = std::env::var("BROKERD_SERVER").unwrap_or_else(|_| "127.0.0.1:7654".into());
    run(&addr).await?;
    Ok(())
}
