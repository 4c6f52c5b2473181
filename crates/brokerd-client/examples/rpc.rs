//! Request/reply: a pricing service answers `price.quote` requests; a shop client asks for quotes
//! with a timeout, and also asks `price.refund`, which nobody serves, and is told so at once. (When
//! another subscriber shares the broker and its filter covers `price.refund`, such as
//! `brokerctl sub '>'`, the request reaches it, nobody answers, and the shop's request times out
//! instead.)
//!
//! `cargo run -p brokerd-client --example rpc` against a broker at `BROKERD_SERVER` (default
//! `127.0.0.1:7654`). The end-to-end tests run [`run`] too.

use brokerd_client::{Client, ConnectOptions, Error};
use serde_json::{Value, json};
use std::time::Duration;

/// The catalogue the pricing service knows, in cents.
pub const PRICES: [(&str, u64); 3] = [("mug", 1299), ("tee", 2499), ("cap", 1799)];

/// How long the shop waits for an answer to `price.refund`.
pub const REFUND_TIMEOUT: Duration = Duration::from_secs(2);

/// Each request and what came back: a price in cents or an error.
pub type Report = Vec<(String, Result<u64, String>)>;

/// Runs the scenario against the broker at `addr`.
pub async fn run(addr: &str) -> anyhow::Result<Report> {
    let service = Client::connect(addr, ConnectOptions::new("pricing-service")).await?;
    let mut requests = service.subscribe_queue("price.quote", "pricing").await?;
    let server = tokio::spawn(async move {
        while let Some(req) = requests.next().await {
            let ask: Value = serde_json::from_slice(&req.payload()).unwrap_or(Value::Null);
            let sku = ask["sku"].as_str().unwrap_or("");
            let answer = match PRICES.iter().find(|(name, _)| *name == sku) {
                Some((_, cents)) => json!({ "sku": sku, "cents": cents }),
                None => json!({ "sku": sku, "error": "unknown sku" }),
            };
            println!("[pricing] quote for {sku:?}");
            if let Err(e) = req.respond(serde_json::to_vec(&answer)?).await {
                eprintln!("[pricing] cannot reply: {e}");
            }
        }
        anyhow::Ok(())
    });

    let shop = Client::connect(addr, ConnectOptions::new("shop")).await?;
    let mut report = Report::new();
    for sku in ["mug", "cap", "umbrella"] {
        let reply = shop
            .request(
                "price.quote",
                json!({ "sku": sku }).to_string(),
                Duration::from_secs(5),
            )
            .await?;
        let v: Value = serde_json::from_slice(&reply.payload())?;
        let outcome = match v["cents"].as_u64() {
            Some(c) => Ok(c),
            None => Err(v["error"].as_str().unwrap_or("bad reply").to_string()),
        };
        println!("[shop] {sku}: {outcome:?}");
        report.push((sku.to_string(), outcome));
    }
    match shop.request("price.refund", "{}", REFUND_TIMEOUT).await {
        Err(e @ Error::NoResponders(_)) => {
            println!("[shop] price.refund: {e}");
            report.push(("refund".into(), Err(e.to_string())));
        }
        Err(Error::Timeout) => {
            let outcome = format!(
                "no answer within {} s (another subscriber received the request)",
                REFUND_TIMEOUT.as_secs()
            );
            println!("[shop] price.refund: {outcome}");
            report.push(("refund".into(), Err(outcome)));
        }
        other => anyhow::bail!("expected no responders for price.refund, got {other:?}"),
    }
    shop.close().await?;
    service.close().await?;
    server.await??;
    Ok(report)
}

#[allow(dead_code)]
#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let addr = std::env::var("BROKERD_SERVER").unwrap_or_else(|_| "127.0.0.1:7654".into());
    run(&addr).await?;
    Ok(())
}
