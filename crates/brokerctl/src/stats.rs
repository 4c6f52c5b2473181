//! `brokerctl stats`: asks a running broker for its statistics (a request on
//! `$SYS.req.stats`) and prints them as a summary and a table of the busiest connections, or as
//! the broker's JSON with `--json`. Also the asking and reading that `conns` and `top` share:
//! [`Asker`] and [`Answer`].
//!
//! The request goes out on a connection of its own with a name no other connection has
//! ([`own_name`]), so that the human output can leave that connection out of the table and the
//! totals: the answer identifies connections only by id (which the client is not told) and name.
//! The answer has no per-connection filters, only subscription counts, so those are what the
//! table shows. `--json` prints the answer untouched, this connection included.

use crate::human::{age, group, rate};
use crate::{Global, note};
use anyhow::{Context, Result};
use brokerd_client::Client;
use brokerd_proto::stats::{ConnStats, StatsAnswer, UserStatsAnswer};
use brokerd_proto::topic::STATS_REQUEST;
use bytes::Bytes;
use clap::Args;
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

/// Asks for the statistics and prints them.
pub(crate) async fn cmd_stats(global: &Global, args: StatsArgs) -> Result<()> {
    let asker = Asker::connect(global, "stats").await?;
    let reply = asker.ask(args.timeout).await;
    let own = asker.name.clone();
    asker.close().await;
    let reply = reply?;
    let text = if args.json {
        let mut line = String::from_utf8_lossy(&reply).into_owned();
        line.push('\n');
        line
    } else {
        let mut answer = Answer::parse(&reply)?;
        if !answer.leave_out(&own) {
            note(format_args!(
                "note: the answer was made before this tool connected (the broker shares one \
                 for 100 ms): its totals may count an earlier tool's connection"
            ));
        }
        render(&answer)
    };
    std::io::stdout()
        .lock()
        .write_all(text.as_bytes())
        .context("cannot write to stdout")
}

/// A connection that asks for the statistics, under a name of its own.
pub(crate) struct Asker {
    /// The connection; closed by [`Asker::close`], or dropped with the process.
    client: Client,
    /// Its name, to be left out of what the answer lists.
    pub(crate) name: String,
}

impl Asker {
    /// Connects as `NAME-PURPOSE-PID-NONCE` ([`own_name`]).
    ///
    /// # Errors
    /// When the broker cannot be reached or refuses the connection.
    pub(crate) async fn connect(global: &Global, purpose: &str) -> Result<Asker> {
        let name = own_name(&global.name, purpose);
        let client = Client::connect(global.server.as_str(), global.options(name.clone()))
            .await
            .with_context(|| format!("cannot connect to {}", global.server))?;
        Ok(Asker { client, name })
    }

    /// One answer, as the broker sent it. Dropping the future forgets the request.
    ///
    /// # Errors
    /// When no answer comes within `timeout` or the connection is lost.
    pub(crate) async fn ask(&self, timeout: Duration) -> Result<Bytes> {
        let reply = self
            .client
            .request(STATS_REQUEST, "", timeout)
            .await
            .context("the broker did not answer the statistics request")?;
        Ok(reply.payload())
    }

    /// Closes the connection; a failure is of no interest once the answers are in.
    pub(crate) async fn close(self) {
        let _ = self.client.close().await;
    }
}

/// The statistics answer, typed: the whole broker for an admin (or a broker without
/// authentication), or only the asker's own connections for another user.
#[derive(Debug, Clone)]
pub(crate) enum Answer {
    /// The broker and its connections with the most drops and lag (boxed: it is the larger).
    Admin(Box<StatsAnswer>),
    /// The asking user's connections.
    User(UserStatsAnswer),
}

impl Answer {
    /// Reads an answer: a user's when it has a `user` field, else an admin's.
    ///
    /// # Errors
    /// When it is not a JSON object of either shape.
    pub(crate) fn parse(json: &[u8]) -> Result<Answer> {
        let value: serde_json::Value =
            serde_json::from_slice(json).context("the answer is not JSON")?;
        let answer = if value.get("user").is_some() {
            Answer::User(serde_json::from_value(value).context("the answer is not a user's")?)
        } else {
            Answer::Admin(Box::new(
                serde_json::from_value(value).context("the answer is not statistics")?,
            ))
        };
        Ok(answer)
    }

    /// The connections listed.
    pub(crate) fn clients(&self) -> &[ConnStats] {
        match self {
            Answer::Admin(a) => &a.clients,
            Answer::User(u) => &u.clients,
        }
    }

    /// The connections there are (the listed ones may be fewer).
    pub(crate) fn connections(&self) -> u64 {
        match self {
            Answer::Admin(a) => a.server.connections,
            Answer::User(u) => u.connections,
        }
    }

    /// The line under a table that lists fewer connections than there are, if it does.
    pub(crate) fn partial_note(&self) -> Option<String> {
        let (listed, now) = (self.clients().len() as u64, self.connections());
        (listed < now).then(|| {
            format!(
                "(the {} connections dropping the most of {} listed)",
                group(listed),
                group(now)
            )
        })
    }

    /// Removes the connection named `own` from the list and its figures from the totals.
    /// Returns false, changing nothing, when the answer does not list it (it was built for an
    /// earlier request, which the broker may share for 100 ms, or listed only the top 100
    /// connections).
    pub(crate) fn leave_out(&mut self, own: &str) -> bool {
        let clients = match self {
            Answer::Admin(a) => &mut a.clients,
            Answer::User(u) => &mut u.clients,
        };
        let Some(at) = clients.iter().position(|c| c.name == own) else {
            return false;
        };
        let me = clients.remove(at);
        match self {
            Answer::Admin(a) => {
                a.clients_listed = a.clients_listed.saturating_sub(1);
                let s = &mut a.server;
                s.connections = s.connections.saturating_sub(1);
                s.total_connections = s.total_connections.saturating_sub(1);
                s.subscriptions = s.subscriptions.saturating_sub(me.subscriptions);
                s.msgs_in = s.msgs_in.saturating_sub(me.msgs_in);
                s.bytes_in = s.bytes_in.saturating_sub(me.bytes_in);
                s.deliveries = s.deliveries.saturating_sub(me.deliveries);
                s.dropped = s.dropped.saturating_sub(me.dropped);
                s.bytes_out = s.bytes_out.saturating_sub(me.bytes_out);
                // The broker measures its rates and a connection's over different windows, so
                // the difference can come out below zero.
                s.rates.msgs_in = (s.rates.msgs_in - me.msgs_in_per_s).max(0.0);
                s.rates.deliveries = (s.rates.deliveries - me.deliveries_per_s).max(0.0);
                s.rates.dropped = (s.rates.dropped - me.dropped_per_s).max(0.0);
            }
            Answer::User(u) => {
                u.clients_listed = u.clients_listed.saturating_sub(1);
                u.connections = u.connections.saturating_sub(1);
            }
        }
        true
    }
}

/// The name of the connection that asks: `NAME-PURPOSE-PID-NONCE`, which no other connection
/// has (the process id tells apart tools on one host, the clock's nanoseconds tools on others).
pub(crate) fn own_name(base: &str, purpose: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    format!("{base}-{purpose}-{}-{nanos:x}", std::process::id())
}

/// The summary and the connection table, as text.
fn render(answer: &Answer) -> String {
    let mut out = match answer {
        Answer::Admin(a) => summary(a),
        Answer::User(u) => user_summary(u),
    };
    let clients = answer.clients();
    if !clients.is_empty() {
        out.push('\n');
        out.push_str(&table(clients));
        if let Some(line) = answer.partial_note() {
            out.push_str(&line);
            out.push('\n');
        }
    }
    out
}

/// The lines above the table: the broker, its totals and rates, the busiest topics, the match
/// cache, closes by reason.
fn summary(a: &StatsAnswer) -> String {
    let s = &a.server;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "brokerd {}  server {}  up {}",
        printable(&s.version),
        printable(&s.server_id),
        humantime::format_duration(Duration::from_secs(s.uptime_s as u64))
    );
    let _ = writeln!(
        out,
        "connections {} now, {} since start; subscriptions {} (this tool's connection left out)",
        group(s.connections),
        group(s.total_connections),
        group(s.subscriptions)
    );
    let _ = writeln!(
        out,
        "messages in {} ({} payload bytes); deliveries {}; dropped {}; matched nothing {}",
        group(s.msgs_in),
        group(s.bytes_in),
        group(s.deliveries),
        group(s.dropped),
        group(s.unrouted)
    );
    let _ = writeln!(
        out,
        "rates: in {}/s ({} payload bytes/s); deliveries {}/s; dropped {}/s",
        rate(s.rates.msgs_in),
        rate(s.rates.bytes_in),
        rate(s.rates.deliveries),
        rate(s.rates.dropped)
    );
    let _ = writeln!(out, "busiest topics: {}", busiest(a));
    let (hits, misses) = (s.sublist.cache_hits, s.sublist.cache_misses);
    let share = if hits + misses == 0 {
        0.0
    } else {
        100.0 * hits as f64 / (hits + misses) as f64
    };
    // A connection answers a topic it published recently from its own route memo first: only
    // the rest reach the shared cache, so a steady publisher shows few lookups here.
    let _ = writeln!(
        out,
        "match cache: {} topics; of {} lookups past the connections' own route memos, {share:.1}% answered from it",
        group(s.sublist.cache_entries),
        group(hits + misses)
    );
    let closes: Vec<String> = s
        .closes
        .iter()
        .filter(|&(_, &c)| c > 0)
        .map(|(k, &c)| format!("{} {}", printable(k), group(c)))
        .collect();
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

/// `a.b 1.2k/s, c 30/s`, busiest first, or `none`.
pub(crate) fn busiest(a: &StatsAnswer) -> String {
    let topics: Vec<String> = a
        .server
        .busiest_topics
        .iter()
        .map(|t| format!("{} {}/s", printable(&t.topic), rate(t.msgs_per_s)))
        .collect();
    if topics.is_empty() {
        "none".to_string()
    } else {
        topics.join(", ")
    }
}

/// The lines above the table for a user without the admin role, who is told only of its own
/// connections.
fn user_summary(u: &UserStatsAnswer) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "brokerd {}  server {}",
        printable(&u.version),
        printable(&u.server_id)
    );
    let _ = writeln!(
        out,
        "user {}: connections {} (its own only, this tool's left out; the broker's totals are for admins)",
        printable(&u.user),
        group(u.connections)
    );
    out
}

/// One line per connection. The name comes last: a client chooses it, and a long one would
/// push every column after it out of line.
fn table(clients: &[ConnStats]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:>6}  {:<22} {:>5} {:>11} {:>11} {:>9} {:>9} {:>11} {:>7} {:>7} {:>7} {:>7}  NAME  FILTERS",
        "ID",
        "PEER",
        "SUBS",
        "IN",
        "DELIVERED",
        "DROPPED",
        "PENDING",
        "PENDING B",
        "AGE",
        "IN/S",
        "OUT/S",
        "DROP/S"
    );
    for c in clients {
        let _ = writeln!(
            out,
            "{:>6}  {:<22} {:>5} {:>11} {:>11} {:>9} {:>9} {:>11} {:>7} {:>7} {:>7} {:>7}  {}{}",
            c.id,
            printable(&c.peer),
            group(c.subscriptions),
            group(c.msgs_in),
            group(c.deliveries),
            group(c.dropped),
            group(c.pending_msgs),
            group(c.pending_bytes),
            age(c.pending_age_ms),
            rate(c.msgs_in_per_s),
            rate(c.deliveries_per_s),
            rate(c.dropped_per_s),
            printable(&c.name),
            filters(c)
        );
    }
    out
}

/// `  f1, f2 (+N more)`: the filters the answer names for a connection (its first few), and
/// how many more it has; empty when it has none.
fn filters(c: &ConnStats) -> String {
    if c.filters.is_empty() {
        return String::new();
    }
    let shown: Vec<String> = c.filters.iter().map(|f| printable(f)).collect();
    let more = c.subscriptions.saturating_sub(c.filters.len() as u64);
    let more = if more > 0 {
        format!(" (+{} more)", group(more))
    } else {
        String::new()
    };
    format!("  {}{more}", shown.join(", "))
}

/// `s` with control characters (a client names itself) shown as `?`, so that nothing in the
/// answer can move the terminal's cursor or change its colours.
pub(crate) fn printable(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_control() { '?' } else { c })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use brokerd_proto::stats::{Rates, ServerStats, TopicRate};

    /// A connection row with these figures.
    fn conn(id: u64, name: &str, subscriptions: u64, msgs_in: u64) -> ConnStats {
        ConnStats {
            id,
            name: name.into(),
            peer: format!("10.0.0.{id}:5000"),
            subscriptions,
            msgs_in,
            ..ConnStats::default()
        }
    }

    #[test]
    fn control_characters_in_names_do_not_reach_the_terminal() {
        let mut evil = conn(1, "evil\u{1b}[2Jname\n", 0, 0);
        evil.peer = "127.0.0.1:1\u{7}".into();
        let answer = Answer::Admin(Box::new(StatsAnswer {
            clients: vec![evil],
            ..StatsAnswer::default()
        }));
        let out = render(&answer);
        assert!(out.contains("evil?[2Jname?"), "{out}");
        assert!(out.contains("127.0.0.1:1?"), "{out}");
        assert!(!out.contains('\u{1b}') && !out.contains('\u{7}'));
    }

    /// An answer as the broker gives it: the asker (`me`) listed among the others.
    fn answer() -> Answer {
        let mut me = conn(8, "me", 1, 0);
        me.deliveries = 1;
        me.deliveries_per_s = 1.0;
        let mut mailer = conn(9, "mailer", 11, 0);
        mailer.deliveries = 1_500_000;
        mailer.deliveries_per_s = 2_500.0;
        mailer.pending_msgs = 40;
        mailer.pending_bytes = 12_345;
        mailer.pending_age_ms = 1_500;
        let mut ingest = conn(7, "ingest", 0, 2_000_000);
        ingest.msgs_in_per_s = 2_500.0;
        Answer::Admin(Box::new(StatsAnswer {
            server: ServerStats {
                version: "0.1.0".into(),
                connections: 3,
                total_connections: 1_234_567,
                subscriptions: 12,
                msgs_in: 2_000_000,
                bytes_in: 32_000_000,
                deliveries: 1_500_001,
                closes: [
                    ("client-closed".into(), 1_234_560),
                    ("slow-consumer".into(), 0),
                ]
                .into_iter()
                .collect(),
                rates: Rates {
                    msgs_in: 2_500.0,
                    bytes_in: 40_000.0,
                    deliveries: 2_501.0,
                    dropped: 0.0,
                },
                busiest_topics: vec![TopicRate {
                    topic: "user.created".into(),
                    msgs_per_s: 2_500.0,
                }],
                ..ServerStats::default()
            },
            clients_listed: 3,
            clients: vec![ingest, me, mailer],
        }))
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
            cols[..12],
            [
                "9",
                "10.0.0.9:5000",
                "11",
                "0",
                "1,500,000",
                "0",
                "40",
                "12,345",
                "1.5s",
                "0",
                "2.5k",
                "0"
            ],
            "{out}"
        );
    }

    #[test]
    fn rates_and_busiest_topics_are_shown() {
        let out = render(&answer());
        assert!(
            out.contains(
                "rates: in 2.5k/s (40.0k payload bytes/s); deliveries 2.5k/s; dropped 0/s\n"
            ),
            "{out}"
        );
        assert!(
            out.contains("busiest topics: user.created 2.5k/s\n"),
            "{out}"
        );
        let header = out.lines().find(|l| l.ends_with("NAME  FILTERS")).unwrap();
        assert!(header.contains("AGE") && header.contains("IN/S"), "{out}");
    }

    #[test]
    fn its_own_connection_is_left_out_of_the_table_and_the_totals() {
        let mut answer = answer();
        assert!(answer.leave_out("me"));
        let out = render(&answer);
        assert!(!out.lines().any(|l| l.ends_with(" me")), "{out}");
        assert!(
            out.contains("connections 2 now, 1,234,566 since start; subscriptions 11"),
            "{out}"
        );
        assert!(out.contains("deliveries 1,500,000;"), "{out}");
        assert!(out.contains("deliveries 2.5k/s;"), "{out}");
        let Answer::Admin(a) = &answer else {
            unreachable!()
        };
        assert_eq!(a.clients_listed, 2);
        // An answer built before this connection existed is left as it is.
        assert!(!answer.leave_out("someone else"));
        assert_eq!(answer.connections(), 2);
    }

    #[test]
    fn a_partial_list_says_so() {
        let mut answer = answer();
        if let Answer::Admin(a) = &mut answer {
            a.server.connections = 250;
        }
        let out = render(&answer);
        assert!(
            out.contains("(the 3 connections dropping the most of 250 listed)"),
            "{out}"
        );
    }

    #[test]
    fn a_user_answer_is_read_as_one() {
        let json = br#"{"server_id":"s","version":"0.1.0","user":"orders","connections":2,
            "clients_listed":2,"clients":[{"id":4,"name":"me"},{"id":5,"name":"worker"}]}"#;
        let mut answer = Answer::parse(json).unwrap();
        assert!(matches!(answer, Answer::User(_)));
        assert!(answer.leave_out("me"));
        let out = render(&answer);
        assert!(
            out.contains("user orders: connections 1 (its own only,"),
            "{out}"
        );
        assert!(out.lines().any(|l| l.ends_with(" worker")), "{out}");
        let admin = Answer::parse(br#"{"msgs_in":10,"clients":[{"id":1}]}"#).unwrap();
        let Answer::Admin(a) = admin else {
            panic!("an admin's answer read as a user's")
        };
        assert_eq!((a.server.msgs_in, a.clients[0].id), (10, 1));
        assert!(Answer::parse(b"not json").is_err());
    }

    #[test]
    fn own_names_differ_from_the_base() {
        let name = own_name("brokerctl", "stats");
        assert!(name.starts_with("brokerctl-stats-"), "{name}");
        assert!(name.contains(&std::process::id().to_string()), "{name}");
    }
}
