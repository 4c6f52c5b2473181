//! `brokerctl stats`: asks a running broker for its statistics (a request on
//! `$SYS.req.stats`) and prints them as a summary and a table of the busiest connections, or as
//! the broker's JSON with `--json`.

use crate::{Global, connect};
use anyhow::{Context, Result};
use brokerd_proto::topic::STATS_REQUEST;
use clap::Args;
use serde_json::Value;
use std::fmt::Write as _;
use std::io::Write;
use std::time::Duration;

/// Arguments of `brokerctl stats`.
#[derive(Debug, Args)]
pub(crate) struct StatsArgs {
    /// Print the broker's JSON object as it came, on one line.
    #[arg(long)]
    json: bool,
    /// How long to wait for the answer, e.g. `500ms`, `5s`.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    timeout: Duration,
}

/// Asks for the statistics and prints them.
pub(crate) async fn cmd_stats(global: &Global, args: StatsArgs) -> Result<()> {
    let client = connect(global).await?;
    let reply = client
        .request(STATS_REQUEST, "", args.timeout)
        .await
        .context("the broker did not answer the statistics request")?;
    let _ = client.close().await;
    let text = if args.json {
        let mut line = String::from_utf8_lossy(&reply.payload()).into_owned();
        line.push('\n');
        line
    } else {
        let stats: Value =
            serde_json::from_slice(&reply.payload()).context("the answer is not JSON")?;
        render(&stats)
    };
    std::io::stdout()
        .lock()
        .write_all(text.as_bytes())
        .context("cannot write to stdout")
}

/// The summary and the connection table, as text.
fn render(s: &Value) -> String {
    let n = |v: &Value, key: &str| v.get(key).and_then(Value::as_u64).unwrap_or(0);
    let text = |v: &Value, key: &str| printable(v.get(key).and_then(Value::as_str).unwrap_or(""));
    let mut out = String::new();
    let uptime = s.get("uptime_s").and_then(Value::as_f64).unwrap_or(0.0);
    let _ = writeln!(
        out,
        "brokerd {}  server {}  up {}",
        text(s, "version"),
        text(s, "server_id"),
        humantime::format_duration(Duration::from_secs(uptime as u64))
    );
    let _ = writeln!(
        out,
        "connections {} now, {} since start; subscriptions {}",
        n(s, "connections"),
        n(s, "total_connections"),
        n(s, "subscriptions")
    );
    let _ = writeln!(
        out,
        "messages in {} ({} payload bytes); deliveries {}; dropped {}; matched nothing {}",
        n(s, "msgs_in"),
        n(s, "bytes_in"),
        n(s, "deliveries"),
        n(s, "dropped"),
        n(s, "unrouted")
    );
    if let Some(sl) = s.get("sublist") {
        let (hits, misses) = (n(sl, "cache_hits"), n(sl, "cache_misses"));
        let share = if hits + misses == 0 {
            0.0
        } else {
            100.0 * hits as f64 / (hits + misses) as f64
        };
        let _ = writeln!(
            out,
            "match cache: {} topics, {share:.1}% of lookups answered from it",
            n(sl, "cache_entries")
        );
    }
    let closes: Vec<String> = s
        .get("closes")
        .and_then(Value::as_object)
        .map(|m| {
            m.iter()
                .filter_map(|(k, v)| v.as_u64().filter(|&c| c > 0).map(|c| format!("{k} {c}")))
                .collect()
        })
        .unwrap_or_default();
    let _ = writeln!(
        out,
        "closed connections: {}",
        if closes.is_empty() {
            "none".to_string()
        } else {
            closes.join(", ")
        }
    );
    let clients = s.get("clients").and_then(Value::as_array);
    if let Some(clients) = clients.filter(|c| !c.is_empty()) {
        let _ = writeln!(
            out,
            "\n{:>6}  {:<20} {:<22} {:>5} {:>10} {:>10} {:>8} {:>8} {:>10}",
            "ID", "NAME", "PEER", "SUBS", "IN", "DELIVERED", "DROPPED", "PENDING", "PENDING B"
        );
        for c in clients {
            let _ = writeln!(
                out,
                "{:>6}  {:<20} {:<22} {:>5} {:>10} {:>10} {:>8} {:>8} {:>10}",
                n(c, "id"),
                text(c, "name"),
                text(c, "peer"),
                n(c, "subscriptions"),
                n(c, "msgs_in"),
                n(c, "deliveries"),
                n(c, "dropped"),
                n(c, "pending_msgs"),
                n(c, "pending_bytes")
            );
        }
    }
    out
}

/// `s` with control characters (a client names itself) shown as `?`, so that nothing in the
/// answer can move the terminal's cursor or change its colours.
fn printable(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_control() { '?' } else { c })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_in_names_do_not_reach_the_terminal() {
        let stats = serde_json::json!({
            "clients": [{"id": 1, "name": "evil\u{1b}[2Jname\n", "peer": "127.0.0.1:1"}],
        });
        let out = render(&stats);
        assert!(out.contains("evil?[2Jname?"), "{out}");
        assert!(!out.contains('\u{1b}'));
    }
}
