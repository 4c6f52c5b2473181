//! User registration: one publisher announces `user.created`; the welcome-email, analytics and
//! notification services each subscribe and each receive every event, without the publisher
//! knowing who they are.
//!
//! `cargo run -p brokerd-client --example user_registration` against a broker at
//! `BROKERD_SERVER` (default `127.0.0.1:7654`). The end-to-end tests run [`run`] too.

use brokerd_client::{Client, ConnectOptions};

/// The users the publisher registers.
pub const USERS: [(&str, &str); 3] = [
    ("alice", "alice@example.com"),
    ("bob", "bob@example.com"),
    ("carol", "carol@example.com"),
];

/// What happened: for each service, the user names it reacted to, in order; and the publisher's
/// delivered counts.
#[derive(Debug, Default)]
pub struct Report {
    /// `(service, users it received)`.
    pub received: Vec<(String, Vec<String>)>,
    /// Delivered count for each publish: this example's services plus any other matching
    /// subscription on the broker.
    pub delivered: Vec<u32>,
}

/// Runs the scenario against the broker at `addr`.
pub async fn run(addr: &str) -> anyhow::Result<Report> {
    let mut services = Vec::new();
    for (service, action) in [
        ("email", "sending welcome email to"),
        ("analytics", "recording signup of"),
        ("notification", "notifying the team about"),
    ] {
        let client =
            Client::connect(addr, ConnectOptions::new(format!("{service}-service"))).await?;
        let mut sub = client.subscribe("user.created").await?;
        let task = tokio::spawn(async move {
            let mut seen = Vec::new();
            while let Some(msg) = sub.next().await {
                let user: serde_json::Value = serde_json::from_slice(&msg.payload())?;
                let name = user["name"].as_str().unwrap_or("?").to_string();
                println!(
                    "[{service}] {action} {name} <{}>",
                    user["email"].as_str().unwrap_or("?")
                );
                seen.push(name);
            }
            anyhow::Ok(seen)
        });
        services.push((service, client, task));
    }

    let publisher = Client::connect(addr, ConnectOptions::new("registration-service")).await?;
    let mut report = Report::default();
    for (i, (name, email)) in USERS.iter().enumerate() {
        let event = serde_json::json!({ "id": i + 1, "name": name, "email": email });
        let n = publisher
            .publish("user.created", serde_json::to_vec(&event)?)
            .acked()
            .await?;
        // The count covers every subscription on the broker, this example's services and any
        // other subscriber that shares the broker (`brokerctl sub '>'`, say).
        println!(
            "[registration] user.created for {name}: delivered to {n} subscriptions ({} of them this example's services)",
            services.len()
        );
        report.delivered.push(n);
    }
    publisher.close().await?;

    for (service, client, task) in services {
        client.close().await?;
        report.received.push((service.to_string(), task.await??));
    }
    Ok(report)
}

#[allow(dead_code)]
#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let addr = std::env::var("BROKERD_SERVER").unwrap_or_else(|_| "127.0.0.1:7654".into());
    let report = run(&addr).await?;
    for (service, users) in &report.received {
        println!("{service}: received {} events", users.len());
    }
    Ok(())
}
