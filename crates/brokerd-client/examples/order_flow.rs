//! E-commerce order flow: the shop publishes `order.created`, `payment.completed` and
//! `order.shipped` as JSON events. Email (all three), inventory (`order.created`, reserving each
//! item), analytics (`order.created`, `payment.completed`) and push notifications
//! (`order.shipped`) each subscribe to what they care about; the shop learns from each
//! acknowledgement how many subscribers the event reached: 3, 2 and 2.
//!
//! `cargo run -p brokerd-client --example order_flow` against a broker at `BROKERD_SERVER`
//! (default `127.0.0.1:7654`). The end-to-end tests run [`run`] too.

use brokerd_client::{Client, ConnectOptions};
use serde_json::{Value, json};

/// Each service and the topics it subscribes to.
pub const SERVICES: [(&str, &[&str]); 4] = [
    (
        "email",
        &["order.created", "payment.completed", "order.shipped"],
    ),
    ("inventory", &["order.created"]),
    ("analytics", &["order.created", "payment.completed"]),
    ("push", &["order.shipped"]),
];

/// What happened.
#[derive(Debug, Default)]
pub struct Report {
    /// `(topic, delivered count)` for each published event, in order.
    pub delivered: Vec<(String, u32)>,
    /// `(service, actions)`: what each service did, one line per event, sorted.
    pub actions: Vec<(String, Vec<String>)>,
}

fn act(service: &str, topic: &str, event: &Value) -> Vec<String> {
    let order = event["order_id"].as_str().unwrap_or("?");
    match (service, topic) {
        ("inventory", _) => event["items"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|i| {
                format!(
                    "reserve {} x {} for {order}",
                    i["qty"],
                    i["sku"].as_str().unwrap_or("?")
                )
            })
            .collect(),
        ("email", "order.created") => vec![format!("email: order {order} confirmed")],
        ("email", "payment.completed") => vec![format!("email: receipt for {order}")],
        ("email", _) => vec![format!("email: {order} is on its way")],
        ("analytics", "order.created") => {
            vec![format!("record order {order} total {}", event["total"])]
        }
        ("analytics", _) => vec![format!("record revenue {} for {order}", event["amount"])],
        _ => vec![format!(
            "push: {order} shipped via {}",
            event["carrier"].as_str().unwrap_or("?")
        )],
    }
}

/// Runs the scenario against the broker at `addr`.
pub async fn run(addr: &str) -> anyhow::Result<Report> {
    let mut services = Vec::new();
    for (service, topics) in SERVICES {
        let client =
            Client::connect(addr, ConnectOptions::new(format!("{service}-service"))).await?;
        let mut tasks = Vec::new();
        for topic in topics {
            let mut sub = client.subscribe(topic).await?;
            tasks.push(tokio::spawn(async move {
                let mut done = Vec::new();
                while let Some(msg) = sub.next().await {
                    let event: Value = serde_json::from_slice(&msg.payload())?;
                    for line in act(service, msg.topic(), &event) {
                        println!("[{service}] {line}");
                        done.push(line);
                    }
                }
                anyhow::Ok(done)
            }));
        }
        services.push((service, client, tasks));
    }

    let shop = Client::connect(addr, ConnectOptions::new("shop")).await?;
    let events = [
        (
            "order.created",
            json!({"order_id": "ord-1001", "customer": "alice", "total": 59.97,
                   "items": [{"sku": "mug", "qty": 2}, {"sku": "tee", "qty": 1}]}),
        ),
        (
            "payment.completed",
            json!({"order_id": "ord-1001", "amount": 59.97, "method": "card"}),
        ),
        (
            "order.shipped",
            json!({"order_id": "ord-1001", "carrier": "parcelco", "tracking": "PC123"}),
        ),
    ];
    let mut report = Report::default();
    for (topic, event) in events {
        let n = shop
            .publish(topic, serde_json::to_vec(&event)?)
            .acked()
            .await?;
        // Every matching subscription on the broker counts, this example's and any other's.
        let ours = SERVICES.iter().filter(|(_, t)| t.contains(&topic)).count();
        println!(
            "[shop] {topic}: delivered to {n} subscriptions ({ours} of them this example's services)"
        );
        report.delivered.push((topic.to_string(), n));
    }
    shop.close().await?;

    for (service, client, tasks) in services {
        client.close().await?;
        let mut actions = Vec::new();
        for t in tasks {
            actions.extend(t.await??);
        }
        actions.sort();
        report.actions.push((service.to_string(), actions));
    }
    Ok(report)
}

#[allow(dead_code)]
#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let addr = std::env::var("BROKERD_SERVER").unwrap_or_else(|_| "127.0.0.1:7654".into());
    run(&addr).await?;
    Ok(())
}
