//! `brokerctl stats`: asks a running broker for its statistics (a request on
//! `$SYS.req.stats`) and prints them as a summary and a table of the busiest connections, or as
//! the broker's JSON with `--json`.
//!
//! The request goes out on a connection of its own with a name no other connection has
//! ([`own_name`]), so that the human output can leave that connection out of the table and the
//! totals: the answer identifies connections only by id (which the client is not told) and name.
//! The answer has no per-connection filters, only subscription counts, so those are what the
//! table shows. `--json` prints the answer untouched, this connection included.

use crate::human::group;
use crate::{Global, note};
use anyhow::{Context, Result};
use brokerd_client::Client;
use brokerd_proto::topic::STATS_REQUEST;
use clap::Args;
use serde_json::Value;
use std::fmt::Write as _;
use std::io::Write;
use std::time::Duration;

/// Arguments of `brokerctl stats`.
#[derive(Debug, Args)]
pub(crate) struct StatsArgs {
    /// Print the broker's JSON object as it came, on one line (this tool's own connection
    /// included).
    #[arg(long)]
    json: bool,
    /// How long to wait for the answer, e.g. `500ms`, `5s`.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    timeout: Duration,
}

/// The per-connection figures the totals include, subtracted for this tool's own connection:
/// (key in the totals, key in a `clients` row).
const OWN_SHARE: [(&str, &str); 7] = [
    ("connections", ""),
    ("total_connections", ""),
    ("subscriptions", "subscriptions"),
    ("msgs_in", "msgs_in"),
    ("bytes_in", "bytes_in"),
    ("deliveries", "deliveries"),
    ("dropped", "dropped"),
];

/// Asks for the statistics and prints them.
pub(crate) async fn cmd_stats(global: &Global, args: StatsArgs) -> Result<()> {
    let name = own_name(&global.name);
    let client = Client::connect(global.server.as_str(), global.options(name.clone()))
        .await
        .with_context(|| format!("cannot connect to {}", global.server))?;
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
        let mut stats: Value =
            serde_json::from_slice(&reply.payload()).context("the answer is not JSON")?;
        if !leave_out(&mut stats, &name) {
            note(format_args!(
                "note: the answer does not list this tool's connection; the totals may count it"
            ));
        }
        render(&stats)
    };
    std::io::stdout()
        .lock()
        .write_all(text.as_bytes())
        .context("cannot write to stdout")
}

/// The name of the connection that asks: `NAME-stats-PID-NONCE`, which no other connection
/// has (the process id tells apart tools on one host, the clock's nanoseconds tools on others).
fn own_name(base: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    format!("{base}-stats-{}-{nanos:x}", std::process::id())
}

/// Removes the connection named `own` from `clients` and its figures from the totals. Returns
/// false, changing nothing, when the answer does not list it (it was built for an earlier
/// request, which the broker may share for 100 ms, or listed only the top 100 connections).
fn leave_out(stats: &mut Value, own: &str) -> bool {
    let Some(clients) = stats.get_mut("clients").and_then(Value::as_array_mut) else {
        return false;
    };
    let Some(at) = clients
        .iter()
        .position(|c| c.get("name").and_then(Value::as_str) == Some(own))
    else {
        return false;
    };
    let me = clients.remove(at);
    for (total, own_key) in OWN_SHARE {
        let mine = if own_key.is_empty() {
            1
        } else {
            count(&me, own_key)
        };
        if let Some(v) = stats.get_mut(total).filter(|v| v.is_u64()) {
            *v = count(v, "").saturating_sub(mine).into();
        }
    }
    if let Some(listed) = stats.get_mut("clients_listed").filter(|v| v.is_u64()) {
        *listed = count(listed, "").saturating_sub(1).into();
    }
    true
}

/// The unsigned integer at `key` of `v` (or `v` itself for an empty key); 0 when absent.
fn count(v: &Value, key: &str) -> u64 {
    let v = if key.is_empty() { Some(v) } else { v.get(key) };
    v.and_then(Value::as_u64).unwrap_or(0)
}

/// The unsigned integer at `key` of `v` with thousands separators.
fn grouped(v: &Value, key: &str) -> String {
    group(count(v, key))
}

/// The summary and the connection table, as text.
fn render(s: &Value) -> String {
    let mut out = summary(s);
    let clients = s.get("clients").and_then(Value::as_array);
    if let Some(clients) = clients.filter(|c| !c.is_empty()) {
        out.push('\n');
        out.push_str(&table(clients));
        let (listed, now) = (clients.len() as u64, count(s, "connections"));
        if listed < now {
            let _ = writeln!(
                out,
                "(the {} connections dropping the most of {} listed)",
                group(listed),
                group(now)
            );
        }
    }
    out
}

/// The lines above the table: the broker, its totals, the match cache, closes by reason.
fn summary(s: &Value) -> String {
    let text = |key: &str| printable(s.get(key).and_then(Value::as_str).unwrap_or(""));
    let mut out = String::new();
    let uptime = s.get("uptime_s").and_then(Value::as_f64).unwrap_or(0.0);
    let _ = writeln!(
        out,
        "brokerd {}  server {}  up {}",
        text("version"),
        text("server_id"),
        humantime::format_duration(Duration::from_secs(uptime as u64))
    );
    let _ = writeln!(
        out,
        "connections {} now, {} since start; subscriptions {}",
        grouped(s, "connections"),
        grouped(s, "total_connections"),
        grouped(s, "subscriptions")
    );
    let _ = writeln!(
        out,
        "messages in {} ({} payload bytes); deliveries {}; dropped {}; matched nothing {}",
        grouped(s, "msgs_in"),
        grouped(s, "bytes_in"),
        grouped(s, "deliveries"),
        grouped(s, "dropped"),
        grouped(s, "unrouted")
    );
    if let Some(sl) = s.get("sublist") {
        let (hits, misses) = (count(sl, "cache_hits"), count(sl, "cache_misses"));
        let share = if hits + misses == 0 {
            0.0
        } else {
            100.0 * hits as f64 / (hits + misses) as f64
        };
        let _ = writeln!(
            out,
            "match cache: {} topics, {share:.1}% of lookups answered from it",
            grouped(sl, "cache_entries")
        );
    }
    let closes: Vec<String> = s
        .get("closes")
        .and_then(Value::as_object)
        .map(|m| {
            m.iter()
                .filter_map(|(k, v)| {
                    v.as_u64()
                        .filter(|&c| c > 0)
                        .map(|c| format!("{} {}", printable(k), group(c)))
                })
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
    out
}

/// One line per connection. The name comes last: a client chooses it, and a long one would
/// push every column after it out of line.
fn table(clients: &[Value]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:>6}  {:<22} {:>5} {:>11} {:>11} {:>9} {:>9} {:>11}  NAME",
        "ID", "PEER", "SUBS", "IN", "DELIVERED", "DROPPED", "PENDING", "PENDING B"
    );
    for c in clients {
        let _ = writeln!(
            out,
            "{:>6}  {:<22} {:>5} {:>11} {:>11} {:>9} {:>9} {:>11}  {}",
            count(c, "id"),
            printable(c.get("peer").and_then(Value::as_str).unwrap_or("")),
            grouped(c, "subscriptions"),
            grouped(c, "msgs_in"),
            grouped(c, "deliveries"),
            grouped(c, "dropped"),
            grouped(c, "pending_msgs"),
            grouped(c, "pending_bytes"),
            printable(c.get("name").and_then(Value::as_str).unwrap_or(""))
        );
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

    /// An answer as the broker gives it: the asker (`me`) listed among the others.
    fn answer() -> Value {
        serde_json::json!({
            "version": "0.1.0",
            "connections": 3,
            "total_connections": 1_234_567,
            "subscriptions": 12,
            "msgs_in": 2_000_000,
            "bytes_in": 32_000_000,
            "deliveries": 1_500_001,
            "dropped": 0,
            "unrouted": 0,
            "closes": {"client-closed": 1_234_560, "slow-consumer": 0},
            "clients_listed": 3,
            "clients": [
                {"id": 7, "name": "ingest", "peer": "10.0.0.2:5000", "subscriptions": 0,
                 "msgs_in": 2_000_000, "deliveries": 0},
                {"id": 8, "name": "me", "peer": "10.0.0.3:5000", "subscriptions": 1,
                 "msgs_in": 0, "deliveries": 1},
                {"id": 9, "name": "mailer", "peer": "10.0.0.4:5000", "subscriptions": 11,
                 "msgs_in": 0, "deliveries": 1_500_000},
            ],
        })
    }

    #[test]
    fn counts_have_thousands_separators() {
        let out = render(&answer());
        assert!(
            out.contains("connections 3 now, 1,234,567 since start; subscriptions 12"),
            "{out}"
        );
        assert!(
            out.contains("messages in 2,000,000 (32,000,000 payload bytes)"),
            "{out}"
        );
        assert!(
            out.contains("closed connections: client-closed 1,234,560\n"),
            "{out}"
        );
        let mailer = out.lines().find(|l| l.ends_with("mailer")).unwrap();
        let cols: Vec<&str> = mailer.split_whitespace().collect();
        assert_eq!(
            cols[..5],
            ["9", "10.0.0.4:5000", "11", "0", "1,500,000"],
            "{out}"
        );
    }

    #[test]
    fn its_own_connection_is_left_out_of_the_table_and_the_totals() {
        let mut stats = answer();
        assert!(leave_out(&mut stats, "me"));
        let out = render(&stats);
        assert!(!out.lines().any(|l| l.ends_with(" me")), "{out}");
        assert!(
            out.contains("connections 2 now, 1,234,566 since start; subscriptions 11"),
            "{out}"
        );
        assert!(out.contains("deliveries 1,500,000;"), "{out}");
        assert_eq!(stats["clients_listed"], 2);
        // An answer built before this connection existed is left as it is.
        assert!(!leave_out(&mut stats, "someone else"));
        assert_eq!(stats["connections"], 2);
    }

    #[test]
    fn a_partial_list_says_so() {
        let mut stats = answer();
        stats["connections"] = 250.into();
        let out = render(&stats);
        assert!(
            out.contains("(the 3 connections dropping the most of 250 listed)"),
            "{out}"
        );
    }

    #[test]
    fn own_names_differ_from_the_base() {
        let name = own_name("brokerctl");
        assert!(name.starts_with("brokerctl-stats-"), "{name}");
        assert!(name.contains(&std::process::id().to_string()), "{name}");
    }
}
