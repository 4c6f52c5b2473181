//! Wildcard subscribers: all user events (`user.*`), all error events from any source
//! (`*.error`) and everything (`>`). Publishing `user.created`, `user.updated`, `api.error`,
//! `db.error` and `system.startup` reaches them 2, 2 and 5 times.
//!
//! `cargo run -p brokerd-client --example wildcards` against a broker at `BROKERD_SERVER`
//! (default `127.0.0.1:7654`). The end-to-end tests run [`run`] too.

use brokerd_client::{Client, ConnectOptions, Filter};

/// The topics published, in order.
pub const TOPICS: [&str; 5] = [
    "user.created",
    "user.updated",
    "api.error",
    "db.error",
    "system.startup",
];

/// The subscribers: a name and a filter.
pub const SUBSCRIBERS: [(&str, &str); 3] = [
    ("user-events", "user.*"),
    ("error-monitor", "*.error"),
    ("audit-log", ">"),
];

/// For each subscriber, the topics it received in order; and each publish's delivered count.
#[derive(Debug, Default)]
pub struct Report {
    /// `(subscriber, topics received)`.
    pub received: Vec<(String, Vec<String>)>,
    /// Delivered count per published topic.
    pub delivered: Vec<(String, u32)>,
}

/// Runs the scenario against the broker at `addr`.
pub async fn run(addr: &str) -> anyhow::Result<Report> {
    let mut subscribers = Vec::new();
    for (name, filter) in SUBSCRIBERS {
        let client = Client::connect(addr, ConnectOptions::new(name)).await?;
        let mut sub = client.subscribe(filter).await?;
        let task = tokio::spawn(async move {
            let mut topics = Vec::new();
            while let Some(msg) = sub.next().await {
                println!(
                    "[{name} {filter}] {}: {}",
                    msg.topic(),
                    String::from_utf8_lossy(&msg.payload())
                );
                topics.push(msg.topic().to_string());
            }
            topics
        });
        subscribers.push((name, client, task));
    }

    let publisher = Client::connect(addr, ConnectOptions::new("event-source")).await?;
    let mut report = Report::default();
    for topic in TOPICS {
        let n = publisher
            .publish(topic, format!("{topic} happened"))
            .acked()
            .await?;
        // Every matching subscription on the broker counts, this example's and any other's.
        let ours = SUBSCRIBERS
            .iter()
            .filter(|(_, f)| Filter::new(f).is_ok_and(|f| f.matches(topic)))
            .count();
        println!(
            "[event-source] {topic}: delivered to {n} subscriptions ({ours} of them this example's)"
        );
        report.delivered.push((topic.to_string(), n));
    }
    publisher.close().await?;

    for (name, client, task) in subscribers {
        client.close().await?;
        report.received.push((name.to_string(), task.await?));
    }
    Ok(report)
}

#[allow(dead_code)]
#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let addr = std::env::var("BROKERD_SERVER").unwrap_or_else(|_| "127.0.0.1:7654".into());
    let report = run(&addr).await?;
    for (name, topics) in &report.received {
        println!("{name}: {} messages", topics.len());
    }
    Ok(())
}
