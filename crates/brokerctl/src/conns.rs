//! `brokerctl conns`: the connection table from the statistics answer (see [`crate::stats`]),
//! sorted as asked, as text or as a JSON array of rows. Also the table and the ordering that
//! `top` draws with ([`table`], [`sort_rows`]).
//!
//! The broker lists at most 100 connections, the most drops first, then the most pending bytes;
//! this tool re-sorts what it is given and cannot see past it, so a partial list says so. The
//! connection it asks on is left out, as `stats` leaves out its own.

use crate::human::{age, group, rate};
use crate::stats::{Answer, Asker, printable};
use crate::{Global, note};
use anyhow::{Context, Result};
use brokerd_proto::stats::ConnStats;
use clap::{Args, ValueEnum};
use std::fmt::Write as _;
use std::io::Write;
use std::time::Duration;

/// Arguments of `brokerctl conns`.
#[derive(Debug, Args)]
pub(crate) struct ConnsArgs {
    /// The order of the rows; all but `id` put the largest first.
    #[arg(long, value_enum, default_value_t = SortKey::Pending)]
    sort: SortKey,
    /// Print the rows as one JSON array on one line (this tool's own connection left out).
    #[arg(long)]
    json: bool,
    /// How long to wait for the answer, e.g. `500ms`, `5s`.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    timeout: Duration,
}

/// What `conns --sort` orders by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum SortKey {
    /// The broker's id, smallest first (the order of connecting).
    Id,
    /// Messages published per second.
    RateIn,
    /// Deliveries queued per second.
    RateOut,
    /// Pending bytes, then pending messages.
    Pending,
    /// Deliveries dropped, then drops per second.
    Dropped,
    /// Age of the oldest pending delivery.
    Age,
    /// Subscriptions.
    Subs,
}

impl SortKey {
    /// The figures rows are ordered by, largest first.
    fn figures(self, c: &ConnStats) -> [f64; 2] {
        match self {
            // Negated so that the smallest id comes first.
            SortKey::Id => [-(c.id as f64), 0.0],
            SortKey::RateIn => [c.msgs_in_per_s, 0.0],
            SortKey::RateOut => [c.deliveries_per_s, 0.0],
            SortKey::Pending => [c.pending_bytes as f64, c.pending_msgs as f64],
            SortKey::Dropped => [c.dropped as f64, c.dropped_per_s],
            SortKey::Age => [c.pending_age_ms as f64, 0.0],
            SortKey::Subs => [c.subscriptions as f64, 0.0],
        }
    }
}

/// Asks for the statistics and prints the connections.
pub(crate) async fn cmd_conns(global: &Global, args: ConnsArgs) -> Result<()> {
    let asker = Asker::connect(global, "conns").await?;
    let reply = asker.ask(args.timeout).await;
    let own = asker.name.clone();
    asker.close().await;
    let mut answer = Answer::parse(&reply?)?;
    if !answer.leave_out(&own) {
        note(format_args!(
            "note: the answer was made before this tool connected (the broker shares one for \
             100 ms): the table may show an earlier tool's connection"
        ));
    }
    let mut rows = answer.clients().to_vec();
    sort_rows(&mut rows, |c| args.sort.figures(c));
    let mut text = if args.json {
        let mut line = serde_json::to_string(&rows).context("cannot write the rows as JSON")?;
        line.push('\n');
        line
    } else {
        table(&rows)
    };
    if let Some(line) = answer.partial_note() {
        if args.json {
            // Stdout holds nothing but the array.
            note(format_args!("{line}"));
        } else {
            text.push_str(&line);
            text.push('\n');
        }
    }
    std::io::stdout()
        .lock()
        .write_all(text.as_bytes())
        .context("cannot write to stdout")
}

/// Sorts `rows` by `figures`, compared in order, the largest first; ties by id, smallest first.
pub(crate) fn sort_rows(rows: &mut [ConnStats], figures: impl Fn(&ConnStats) -> [f64; 2]) {
    rows.sort_by(|a, b| {
        let (fa, fb) = (figures(a), figures(b));
        fb[0]
            .total_cmp(&fa[0])
            .then(fb[1].total_cmp(&fa[1]))
            .then(a.id.cmp(&b.id))
    });
}

/// The column headings of [`table`].
pub(crate) fn heading() -> String {
    format!(
        "{:>6}  {:<22} {:<12} {:>5} {:>7} {:>7} {:>7} {:>9} {:>11} {:>7} {:>9}  NAME",
        "ID",
        "PEER",
        "USER",
        "SUBS",
        "IN/S",
        "OUT/S",
        "DROP/S",
        "PENDING",
        "PENDING B",
        "AGE",
        "DROPPED"
    )
}

/// One connection as a line of [`table`], without the newline. Peer, user and name are shown
/// with control characters replaced; the name comes last, since a long one would push every
/// column after it out of line.
pub(crate) fn row(c: &ConnStats) -> String {
    format!(
        "{:>6}  {:<22} {:<12} {:>5} {:>7} {:>7} {:>7} {:>9} {:>11} {:>7} {:>9}  {}",
        c.id,
        printable(&c.peer),
        c.user.as_deref().map_or_else(|| "-".to_string(), printable),
        group(c.subscriptions),
        rate(c.msgs_in_per_s),
        rate(c.deliveries_per_s),
        rate(c.dropped_per_s),
        group(c.pending_msgs),
        group(c.pending_bytes),
        age(c.pending_age_ms),
        group(c.dropped),
        printable(&c.name)
    )
}

/// The headings and one line per connection.
pub(crate) fn table(rows: &[ConnStats]) -> String {
    let mut out = heading();
    out.push('\n');
    for c in rows {
        let _ = writeln!(out, "{}", row(c));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conn(id: u64, name: &str) -> ConnStats {
        ConnStats {
            id,
            name: name.into(),
            peer: format!("10.0.0.{id}:5000"),
            ..ConnStats::default()
        }
    }

    /// The names in order.
    fn order(rows: &[ConnStats]) -> Vec<&str> {
        rows.iter().map(|c| c.name.as_str()).collect()
    }

    #[test]
    fn the_table_lines_up_and_escapes_what_clients_chose() {
        let mut c = conn(12, "mailer\u{1b}[31m");
        c.user = Some("ops\n".into());
        c.subscriptions = 3;
        c.msgs_in_per_s = 0.5;
        c.deliveries_per_s = 12_500.0;
        c.dropped_per_s = 0.0;
        c.pending_msgs = 1_200;
        c.pending_bytes = 1_234_567;
        c.pending_age_ms = 2_500;
        c.dropped = 98_765;
        let out = table(&[c, conn(3, "")]);
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), 3, "{out}");
        let cols: Vec<&str> = lines[1].split_whitespace().collect();
        assert_eq!(
            cols,
            [
                "12",
                "10.0.0.12:5000",
                "ops?",
                "3",
                "0.5",
                "12.5k",
                "0",
                "1,200",
                "1,234,567",
                "2.5s",
                "98,765",
                "mailer?[31m"
            ],
            "{out}"
        );
        assert!(!out.contains('\u{1b}'), "{out}");
        // Every column ends where its heading does, whatever the figures.
        let end = |line: &str, col: &str| line.find(col).map(|i| i + col.len());
        assert_eq!(
            end(lines[0], "PENDING B"),
            end(lines[1], "1,234,567"),
            "{out}"
        );
        assert_eq!(end(lines[0], "DROPPED"), end(lines[1], "98,765"), "{out}");
        // No user reads as `-`, so the columns stay countable.
        assert_eq!(lines[2].split_whitespace().nth(2), Some("-"), "{out}");
    }

    #[test]
    fn each_key_sorts_its_own_way() {
        let mut a = conn(1, "a");
        a.subscriptions = 1;
        a.msgs_in_per_s = 50.0;
        a.pending_bytes = 10;
        let mut b = conn(2, "b");
        b.subscriptions = 5;
        b.deliveries_per_s = 70.0;
        b.dropped = 3;
        b.pending_age_ms = 900;
        let mut c = conn(3, "c");
        c.pending_bytes = 10;
        c.pending_msgs = 2;
        let mut rows = vec![b, c, a];
        let sorted = |rows: &mut Vec<ConnStats>, key: SortKey| {
            sort_rows(rows, |c| key.figures(c));
            order(rows).join("")
        };
        assert_eq!(sorted(&mut rows, SortKey::Id), "abc");
        assert_eq!(sorted(&mut rows, SortKey::Pending), "cab");
        assert_eq!(sorted(&mut rows, SortKey::RateIn), "abc");
        assert_eq!(sorted(&mut rows, SortKey::RateOut), "bac");
        assert_eq!(sorted(&mut rows, SortKey::Dropped), "bac");
        assert_eq!(sorted(&mut rows, SortKey::Age), "bac");
        assert_eq!(sorted(&mut rows, SortKey::Subs), "bac");
    }

    #[test]
    fn sort_keys_are_spelled_as_documented() {
        let names: Vec<String> = SortKey::value_variants()
            .iter()
            .filter_map(|k| k.to_possible_value().map(|v| v.get_name().to_string()))
            .collect();
        assert_eq!(
            names,
            [
                "id", "rate-in", "rate-out", "pending", "dropped", "age", "subs"
            ]
        );
    }
}
