//! Replaying the order flow after an outage: the shop publishes `order.created`,
//! `payment.completed` and `order.shipped` JSON events, which the stream `ORDERS` (capturing
//! `order.>` and `payment.>`) stores. The analytics service reads them through a replay
//! subscription and records the stream sequence of the last event it processed. It goes down
//! after the first wave of orders; the second wave is published while it is away (one event
//! twice, as a shop retrying a publish whose answer it never saw, with the same message id); it
//! comes back, replays from the sequence after the one it last processed, and takes the third
//! wave live. It ends having processed every stored event exactly once.
//!
//! `cargo run -p brokerd-client --example order_replay [ADDR]` against a broker at `ADDR`,
//! else `BROKERD_SERVER`, else `127.0.0.1:7654`; the broker needs a data directory for
//! streams. The example adds `ORDERS` if it is missing and otherwise uses it as it is,
//! starting after whatever it already holds. The end-to-end tests run [`run`] too.

use brokerd_client::{Client, ConnectOptions, StartPosition, StreamConfig, Subscription};
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::time::Duration;

/// The stream.
pub const STREAM: &str = "ORDERS";

/// Orders in each wave: before the outage, during it, after it.
pub const WAVES: [u64; 3] = [3, 4, 2];

/// Events per order: created, paid, shipped.
pub const EVENTS_PER_ORDER: u64 = 3;

/// How long the analytics service waits for an event before giving up.
const PATIENCE: Duration = Duration::from_secs(10);

/// What happened.
#[derive(Debug, Default)]
pub struct Report {
    /// The stream sequences the shop's events were stored as, in publish order (the retried
    /// one once).
    pub stored: Vec<u64>,
    /// The retried publish: stored again or recognized as a duplicate, and its sequence.
    pub retry: Option<(bool, u64)>,
    /// The stream sequences the analytics service processed, in order.
    pub processed: Vec<u64>,
    /// The sequence it had processed last when it went down.
    pub down_after: u64,
    /// Events it replayed from the stream after coming back (stored while it was down).
    pub replayed: u64,
    /// Events processed, by topic.
    pub per_topic: BTreeMap<String, u64>,
    /// Revenue from `payment.completed`, in cents.
    pub revenue_cents: u64,
}

/// The three events of order number `n`.
fn order_events(n: u64) -> [(&'static str, Value); 3] {
    let order = format!("ord-{}", 1000 + n);
    let cents = 1999 * (n % 3 + 1);
    [
        (
            "order.created",
            json!({"order_id": order, "customer": format!("customer-{n}"), "total_cents": cents,
                   "items": [{"sku": "mug", "qty": n % 3 + 1}]}),
        ),
        (
            "payment.completed",
            json!({"order_id": order, "amount_cents": cents, "method": "card"}),
        ),
        (
            "order.shipped",
            json!({"order_id": order, "carrier": "parcelco", "tracking": format!("PC{n:04}")}),
        ),
    ]
}

/// The message id of an event: the run, its order and its topic, so that publishing it again is
/// harmless and another run of the example stores its own events.
fn msg_id(run: u64, topic: &str, event: &Value) -> String {
    let order = event["order_id"].as_str().unwrap_or("?");
    format!("run-{run}/{order}/{topic}")
}

/// Publishes orders `range` of run `run` and returns the stream sequence of each event.
async fn publish_wave(
    shop: &Client,
    run: u64,
    range: std::ops::Range<u64>,
) -> anyhow::Result<Vec<u64>> {
    let mut seqs = Vec::new();
    for n in range {
        for (topic, event) in order_events(n) {
            let stored = shop
                .publish(topic, serde_json::to_vec(&event)?)
                .msg_id(msg_id(run, topic, &event))
                .stored()
                .await?;
            println!(
                "[shop] {topic} {} stored in {} as #{}",
                event["order_id"].as_str().unwrap_or("?"),
                stored.stream,
                stored.seq
            );
            seqs.push(stored.seq);
        }
    }
    Ok(seqs)
}

/// The analytics service's state: what it has counted, and the position it records after each
/// event (in a real service, in its own database, with the counts, in one transaction).
#[derive(Debug, Default)]
struct Analytics {
    last_seq: u64,
    processed: Vec<u64>,
    per_topic: BTreeMap<String, u64>,
    revenue_cents: u64,
}

impl Analytics {
    /// Processes events until `total` have been processed in all.
    async fn process_until(&mut self, events: &mut Subscription, total: u64) -> anyhow::Result<()> {
        while (self.processed.len() as u64) < total {
            let msg = tokio::time::timeout(PATIENCE, events.next())
                .await
                .map_err(|_| anyhow::anyhow!("no event for {PATIENCE:?}"))?
                .ok_or_else(|| anyhow::anyhow!("the replay subscription ended"))?;
            let seq = msg
                .stream_seq()
                .ok_or_else(|| anyhow::anyhow!("not a replay subscription's message"))?;
            let event: Value = serde_json::from_slice(&msg.payload())?;
            if msg.topic() == "payment.completed" {
                self.revenue_cents += event["amount_cents"].as_u64().unwrap_or(0);
            }
            *self.per_topic.entry(msg.topic().to_string()).or_default() += 1;
            self.processed.push(seq);
            self.last_seq = seq;
            println!(
                "[analytics] #{seq} {} {}",
                msg.topic(),
                event["order_id"].as_str().unwrap_or("?")
            );
        }
        Ok(())
    }
}

/// Adds the stream unless it exists; returns the first sequence this run's events will have.
async fn ensure_stream(client: &Client) -> anyhow::Result<u64> {
    let info = match client.streams().info(STREAM).await {
        Ok(info) => info,
        Err(brokerd_client::Error::Stream { .. }) => {
            let config = StreamConfig {
                name: STREAM.into(),
                filters: vec!["order.>".into(), "payment.>".into()],
                ..StreamConfig::default()
            };
            client.streams().add(&config).await?
        }
        Err(e) => return Err(e.into()),
    };
    println!(
        "[admin] stream {STREAM} captures {} and holds {} events",
        info.config.filters.join(", "),
        info.msgs
    );
    Ok(info.last_seq + 1)
}

/// Runs the scenario against the broker at `addr`.
pub async fn run(addr: &str) -> anyhow::Result<Report> {
    let shop = Client::connect(addr, ConnectOptions::new("shop")).await?;
    let first = ensure_stream(&shop).await?;
    let mut report = Report::default();
    let mut analytics = Analytics::default();
    let [before, during, after] = WAVES;

    // Analytics starts with what the stream stores from now on.
    let service = Client::connect(addr, ConnectOptions::new("analytics")).await?;
    let mut events = service
        .subscribe_stream(">", STREAM, StartPosition::FromSeq(first))
        .await?;
    report
        .stored
        .extend(publish_wave(&shop, first, 0..before).await?);
    analytics
        .process_until(&mut events, before * EVENTS_PER_ORDER)
        .await?;

    // The outage: the service's connection and subscription are gone; only the position it
    // recorded survives.
    drop(events);
    service.close().await?;
    report.down_after = analytics.last_seq;
    println!(
        "[analytics] down, having processed up to #{}",
        analytics.last_seq
    );
    report
        .stored
        .extend(publish_wave(&shop, first, before..before + during).await?);
    // The shop retries the last event of the wave, as if its answer had been lost.
    let (topic, event) = order_events(before + during - 1)[2].clone();
    let retry = shop
        .publish(topic, serde_json::to_vec(&event)?)
        .msg_id(msg_id(first, topic, &event))
        .stored()
        .await?;
    println!(
        "[shop] retried {topic}: {}",
        if retry.duplicate {
            format!("a duplicate of #{}, not stored again", retry.seq)
        } else {
            format!("stored again as #{}", retry.seq)
        }
    );
    report.retry = Some((retry.duplicate, retry.seq));
    if !retry.duplicate {
        report.stored.push(retry.seq);
    }

    // Back: a new process would read its recorded position and resume right after it.
    let service = Client::connect(addr, ConnectOptions::new("analytics")).await?;
    let resume = analytics.last_seq + 1;
    println!("[analytics] back, replaying {STREAM} from #{resume}");
    let mut events = service
        .subscribe_stream(">", STREAM, StartPosition::FromSeq(resume))
        .await?;
    let stored_while_down = report.stored.len() as u64 - before * EVENTS_PER_ORDER;
    analytics
        .process_until(&mut events, before * EVENTS_PER_ORDER + stored_while_down)
        .await?;
    report.replayed = stored_while_down;
    report
        .stored
        .extend(publish_wave(&shop, first, before + during..before + during + after).await?);
    analytics
        .process_until(&mut events, report.stored.len() as u64)
        .await?;
    drop(events);
    service.close().await?;
    shop.close().await?;

    println!(
        "[analytics] processed {} events ({} stored): {} replayed after the outage, revenue {}.{:02}; {:?}",
        analytics.processed.len(),
        report.stored.len(),
        report.replayed,
        analytics.revenue_cents / 100,
        analytics.revenue_cents % 100,
        analytics.per_topic
    );
    report.processed = analytics.processed;
    report.per_topic = analytics.per_topic;
    report.revenue_cents = analytics.revenue_cents;
    Ok(report)
}

#[allow(dead_code)]
#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let addr = std::env::args()
        .nth(1)
        .or_else(|| std::env::var("BROKERD_SERVER").ok())
        .unwrap_or_else(|| "127.0.0.1:7654".into());
    let report = run(&addr).await?;
    anyhow::ensure!(
        report.processed == report.stored,
        "processed {:?}, stored {:?}",
        report.processed,
        report.stored
    );
    Ok(())
}
