//! `brokerctl stream add|ls|info|purge|rm`: stream management from a terminal, each one request
//! through [`brokerd_client::Streams`], printed for people or, with `--json`, as the broker's
//! [`StreamInfo`] objects.
//!
//! Also the arguments the other subcommands share with streams: `sub --from` ([`parse_start`])
//! and sizes such as `64MiB` ([`parse_size`]). Nothing here retries: a refused request exits 1
//! with the broker's reason.

use crate::human::group;
use crate::{Global, connect, note, plural};
use anyhow::{Context, Result, bail};
use brokerd_client::{Fsync, StartPosition, StreamConfig, StreamInfo};
use clap::{Args, Subcommand, ValueEnum};
use std::fmt::Write as _;
use std::io::Write;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Arguments of `brokerctl stream`.
#[derive(Debug, Args)]
pub(crate) struct StreamArgs {
    /// What to do.
    #[command(subcommand)]
    op: StreamOp,
    /// Print JSON on stdout instead of text: the stream's object (`add`, `info`), an array of
    /// them (`ls`), or `{"name","purged"}` / `{"name","deleted"}`.
    #[arg(long, global = true)]
    json: bool,
    /// How long to wait for the broker's answer, e.g. `500ms`, `5s`.
    #[arg(long, global = true, default_value = "10s", value_parser = humantime::parse_duration)]
    timeout: Duration,
}

/// The stream operations.
#[derive(Debug, Subcommand)]
enum StreamOp {
    /// Add a stream: every message published to a topic matching one of its filters is stored.
    Add(AddArgs),
    /// List the streams.
    Ls,
    /// Show a stream's definition and state.
    Info {
        /// The stream. (Not `name`: that is the global --name, the client's name.)
        #[arg(value_name = "NAME")]
        stream: String,
    },
    /// Remove every message from a stream, keeping its definition.
    Purge {
        /// The stream.
        #[arg(value_name = "NAME")]
        stream: String,
    },
    /// Delete a stream and everything it stores; replay subscriptions on it end.
    Rm {
        /// The stream.
        #[arg(value_name = "NAME")]
        stream: String,
    },
}

/// Arguments of `brokerctl stream add`.
#[derive(Debug, Args)]
struct AddArgs {
    /// The stream's name: 1 to 64 ASCII letters, digits, `-` and `_`. (Not `name`: that is the
    /// global --name, the client's name.)
    #[arg(value_name = "NAME")]
    stream: String,
    /// A filter whose messages the stream stores (`order.>`); repeatable.
    #[arg(long = "filter", value_name = "FILTER", required = true)]
    filters: Vec<String>,
    /// Keep at most this many messages, removing the oldest first [default: no limit].
    #[arg(long, value_name = "N")]
    max_msgs: Option<u64>,
    /// Keep at most this many bytes on disk, e.g. `10GiB`, `500MB` [default: no limit].
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    max_bytes: Option<u64>,
    /// Keep messages at most this long, whole seconds, e.g. `7d`, `12h` [default: no limit].
    #[arg(long, value_name = "DURATION", value_parser = parse_whole_seconds)]
    max_age: Option<u64>,
    /// Keep only the newest N messages of each topic: a "last value" stream, which
    /// `sub --from last-per-topic` reads [default: no limit].
    #[arg(long, value_name = "N")]
    max_msgs_per_topic: Option<u64>,
    /// When appends reach the disk: `always` (acknowledged only once on disk), `interval`
    /// (synced every --fsync-interval; a power failure may lose that window), `never` (the
    /// operating system decides) [default: interval].
    #[arg(long, value_enum)]
    fsync: Option<FsyncArg>,
    /// The sync interval under `--fsync interval`, whole milliseconds [default: 100ms].
    #[arg(long, value_name = "DURATION", value_parser = parse_whole_millis)]
    fsync_interval: Option<u64>,
    /// How long a message id (`pub --msg-id`) is remembered to suppress duplicates, whole
    /// seconds; `0s` turns it off [default: 2m].
    #[arg(long, value_name = "DURATION", value_parser = parse_whole_seconds)]
    dup_window: Option<u64>,
    /// Segment files roll at this size, e.g. `16MiB` [default: 64MiB].
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    segment_bytes: Option<u64>,
}

/// `--fsync` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum FsyncArg {
    /// Acknowledge only once the message is on disk.
    Always,
    /// Sync every interval.
    Interval,
    /// Leave it to the operating system.
    Never,
}

impl From<FsyncArg> for Fsync {
    fn from(f: FsyncArg) -> Fsync {
        match f {
            FsyncArg::Always => Fsync::Always,
            FsyncArg::Interval => Fsync::Interval,
            FsyncArg::Never => Fsync::Never,
        }
    }
}

impl AddArgs {
    /// The definition asked for: the library's defaults where a flag is absent.
    fn config(&self) -> StreamConfig {
        let d = StreamConfig::default();
        StreamConfig {
            name: self.stream.clone(),
            filters: self.filters.clone(),
            max_msgs: self.max_msgs.unwrap_or(d.max_msgs),
            max_bytes: self.max_bytes.unwrap_or(d.max_bytes),
            max_age_s: self.max_age.unwrap_or(d.max_age_s),
            max_msgs_per_topic: self.max_msgs_per_topic.unwrap_or(d.max_msgs_per_topic),
            fsync: self.fsync.map_or(d.fsync, Fsync::from),
            fsync_interval_ms: self.fsync_interval.unwrap_or(d.fsync_interval_ms),
            duplicate_window_s: self.dup_window.unwrap_or(d.duplicate_window_s),
            segment_bytes: self.segment_bytes.unwrap_or(d.segment_bytes),
        }
    }
}

/// Runs `brokerctl stream ...`.
pub(crate) async fn cmd_stream(global: &Global, args: StreamArgs) -> Result<()> {
    let client = connect(global).await?;
    let streams = client.streams().timeout(args.timeout);
    let text = match &args.op {
        StreamOp::Add(add) => {
            let info = streams
                .add(&add.config())
                .await
                .with_context(|| format!("cannot add stream {}", add.stream))?;
            if args.json {
                json_line(serde_json::to_value(&info))?
            } else {
                note(format_args!("added stream {}", info.config.name));
                render_info(&info)
            }
        }
        StreamOp::Ls => {
            let list = streams.list().await.context("cannot list the streams")?;
            if args.json {
                json_line(serde_json::to_value(&list))?
            } else {
                render_list(&list)
            }
        }
        StreamOp::Info { stream: name } => {
            let info = streams
                .info(name)
                .await
                .with_context(|| format!("cannot show stream {name}"))?;
            if args.json {
                json_line(serde_json::to_value(&info))?
            } else {
                render_info(&info)
            }
        }
        StreamOp::Purge { stream: name } => {
            let purged = streams
                .purge(name)
                .await
                .with_context(|| format!("cannot purge stream {name}"))?;
            if args.json {
                json_line(Ok(serde_json::json!({ "name": name, "purged": purged })))?
            } else {
                format!(
                    "purged {} {} from {name}\n",
                    group(purged),
                    plural(purged, "message", "messages")
                )
            }
        }
        StreamOp::Rm { stream: name } => {
            streams
                .delete(name)
                .await
                .with_context(|| format!("cannot delete stream {name}"))?;
            if args.json {
                json_line(Ok(serde_json::json!({ "name": name, "deleted": true })))?
            } else {
                format!("deleted stream {name}\n")
            }
        }
    };
    client.close().await.ok();
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes())
        .and_then(|()| out.flush())
        .context("cannot write to stdout")
}

/// One JSON value and a newline.
fn json_line(value: serde_json::Result<serde_json::Value>) -> Result<String> {
    let mut line = value
        .context("cannot format the answer as JSON")?
        .to_string();
    line.push('\n');
    Ok(line)
}

/// `stream info`: one line per figure.
fn render_info(s: &StreamInfo) -> String {
    let c = &s.config;
    let mut t = String::new();
    let mut row = |k: &str, v: String| {
        let _ = writeln!(t, "{k:<14} {v}");
    };
    row(
        "stream",
        format!("{} (defined in {})", c.name, or_dash(&s.source)),
    );
    row("filters", c.filters.join(", "));
    let seqs = if s.msgs == 0 {
        format!(
            "empty; the next is {}",
            group(s.first_seq.max(s.last_seq + 1))
        )
    } else {
        format!("{}..={}", group(s.first_seq), group(s.last_seq))
    };
    row(
        "messages",
        format!(
            "{} {} (sequences {seqs})",
            group(s.msgs),
            plural(s.msgs, "message", "messages")
        ),
    );
    row(
        "bytes",
        format!(
            "{} on disk in {} {}",
            bytes(s.bytes),
            group(s.segments),
            plural(s.segments, "segment", "segments")
        ),
    );
    if s.msgs > 0 {
        row("first", time(s.first_ts));
        row("last", time(s.last_ts));
    }
    let per_topic = if c.max_msgs_per_topic == 0 {
        String::new()
    } else {
        format!(", {} per topic", group(c.max_msgs_per_topic))
    };
    row(
        "limits",
        format!(
            "messages {}, bytes {}, age {}{per_topic}",
            limit(c.max_msgs, group),
            limit(c.max_bytes, bytes),
            limit(c.max_age_s, seconds),
        ),
    );
    if c.max_msgs_per_topic > 0 {
        row(
            "per topic",
            format!(
                "{} {} kept of {} {}",
                group(s.kept),
                plural(s.kept, "message", "messages"),
                group(s.topics),
                plural(s.topics, "topic", "topics")
            ),
        );
    }
    let fsync = match c.fsync {
        Fsync::Always => "always (acknowledged once on disk)".to_string(),
        Fsync::Interval => format!(
            "interval, every {}",
            humantime::format_duration(Duration::from_millis(c.fsync_interval_ms))
        ),
        Fsync::Never => "never (the operating system decides)".to_string(),
    };
    row("fsync", fsync);
    row(
        "dup window",
        if c.duplicate_window_s == 0 {
            "off".to_string()
        } else {
            seconds(c.duplicate_window_s)
        },
    );
    row("segment size", bytes(c.segment_bytes));
    row("readers", group(s.readers));
    for (i, k) in s.consumers.iter().enumerate() {
        row(
            if i == 0 { "consumers" } else { "" },
            format!(
                "{} ({}): done to seq {}, {} in flight, {} {}, {} delivered, {} redelivered, {} given up",
                k.name,
                k.filter,
                group(k.floor),
                group(k.in_flight),
                group(k.members),
                plural(k.members, "member", "members"),
                group(k.delivered),
                group(k.redelivered),
                group(k.given_up)
            ),
        );
    }
    row(
        "since start",
        format!(
            "{} store {}, {} {} suppressed",
            group(s.store_errors),
            plural(s.store_errors, "error", "errors"),
            group(s.duplicates),
            plural(s.duplicates, "duplicate", "duplicates")
        ),
    );
    if s.recovered_truncated_bytes > 0 || s.recovered_corrupt_records > 0 {
        row(
            "recovery",
            format!(
                "{} cut from a torn tail, {} corrupt {} skipped",
                bytes(s.recovered_truncated_bytes),
                group(s.recovered_corrupt_records),
                plural(s.recovered_corrupt_records, "record", "records")
            ),
        );
    }
    t
}

/// `stream ls`: a table, one stream a row, by name.
fn render_list(list: &[StreamInfo]) -> String {
    if list.is_empty() {
        return "no streams\n".to_string();
    }
    let mut rows: Vec<&StreamInfo> = list.iter().collect();
    rows.sort_by(|a, b| a.config.name.cmp(&b.config.name));
    let name_w = rows
        .iter()
        .map(|s| s.config.name.len())
        .max()
        .unwrap_or(0)
        .max(4);
    let mut t = String::new();
    let _ = writeln!(
        t,
        "{:<name_w$}  {:>12}  {:>10}  {:>12}  {:>7}  {:<8}  FILTERS",
        "NAME", "MSGS", "BYTES", "LAST SEQ", "READERS", "FSYNC"
    );
    for s in rows {
        let fsync = match s.config.fsync {
            Fsync::Always => "always",
            Fsync::Interval => "interval",
            Fsync::Never => "never",
        };
        let _ = writeln!(
            t,
            "{:<name_w$}  {:>12}  {:>10}  {:>12}  {:>7}  {:<8}  {}",
            s.config.name,
            group(s.msgs),
            bytes(s.bytes),
            group(s.last_seq),
            group(s.readers),
            fsync,
            s.config.filters.join(", ")
        );
    }
    t
}

/// `none` for a limit of 0, else the value formatted.
fn limit(n: u64, show: impl Fn(u64) -> String) -> String {
    if n == 0 { "none".to_string() } else { show(n) }
}

/// `-` for an empty string.
fn or_dash(s: &str) -> &str {
    if s.is_empty() { "-" } else { s }
}

/// Whole seconds as `7days`, `2m`, `1h 30m`.
fn seconds(s: u64) -> String {
    humantime::format_duration(Duration::from_secs(s)).to_string()
}

/// Unix nanoseconds as RFC 3339, UTC, milliseconds.
fn time(ns: u64) -> String {
    let t = UNIX_EPOCH + Duration::from_nanos(ns);
    humantime::format_rfc3339_millis(t).to_string()
}

/// Bytes in binary units: `512 B`, `1.5 KiB`, `64.0 MiB`.
pub(crate) fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut x = n as f64 / 1024.0;
    let mut unit = 0;
    while x >= 1024.0 && unit + 1 < UNITS.len() {
        x /= 1024.0;
        unit += 1;
    }
    format!("{x:.1} {}", UNITS[unit])
}

/// A size in bytes: a number with an optional unit, `k`/`KiB` = 1024, `kB` = 1000, and so on
/// for M, G and T (`64MiB`, `500MB`, `2G`, `1048576`).
pub(crate) fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (digits, unit) = t.split_at(split);
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("expected a size such as 64MiB or 500MB, got {s:?}"))?;
    let unit = unit.trim();
    let scale: u64 = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kib" => 1 << 10,
        "kb" => 1_000,
        "m" | "mib" => 1 << 20,
        "mb" => 1_000_000,
        "g" | "gib" => 1 << 30,
        "gb" => 1_000_000_000,
        "t" | "tib" => 1 << 40,
        "tb" => 1_000_000_000_000,
        _ => {
            return Err(format!(
                "unknown size unit {unit:?} in {s:?} (use KiB, MB, GiB, ...)"
            ));
        }
    };
    n.checked_mul(scale)
        .ok_or_else(|| format!("{s:?} is too large"))
}

/// A duration of whole seconds (`7d`, `90s`, `0s`), as seconds.
fn parse_whole_seconds(s: &str) -> Result<u64, String> {
    let d = humantime::parse_duration(s).map_err(|e| format!("{e}"))?;
    if d.subsec_nanos() != 0 {
        return Err(format!("{s:?} is not a whole number of seconds"));
    }
    Ok(d.as_secs())
}

/// A duration of whole milliseconds (`100ms`, `1s`), as milliseconds.
fn parse_whole_millis(s: &str) -> Result<u64, String> {
    let d = humantime::parse_duration(s).map_err(|e| format!("{e}"))?;
    if d.subsec_nanos() % 1_000_000 != 0 {
        return Err(format!("{s:?} is not a whole number of milliseconds"));
    }
    u64::try_from(d.as_millis()).map_err(|_| format!("{s:?} is too long"))
}

/// `sub --from`: `all`, `new`, `seq:N`, `time:T` (RFC 3339 in UTC, such as
/// `2026-01-31T08:00:00Z`, or unix nanoseconds), `last:N` or `last-per-topic`.
pub(crate) fn parse_start(s: &str) -> Result<StartPosition, String> {
    let usage = || {
        format!(
            "expected all, new, seq:N, time:RFC3339|UNIX_NS, last:N or last-per-topic, got {s:?}"
        )
    };
    let number = |v: &str| v.trim().parse::<u64>().map_err(|_| usage());
    match s.split_once(':') {
        None if s == "all" => Ok(StartPosition::All),
        None if s == "new" => Ok(StartPosition::New),
        None if s == "last-per-topic" => Ok(StartPosition::LastPerTopic),
        Some(("seq", n)) => Ok(StartPosition::FromSeq(number(n)?)),
        Some(("last", n)) => Ok(StartPosition::Last(number(n)?)),
        Some(("time", t)) => {
            if let Ok(ns) = t.parse::<u64>() {
                return Ok(StartPosition::FromTime(ns));
            }
            let at = humantime::parse_rfc3339_weak(t)
                .map_err(|e| format!("time:{t}: {e} (RFC 3339 in UTC, or unix nanoseconds)"))?;
            Ok(StartPosition::FromTime(unix_ns(at)))
        }
        _ => Err(usage()),
    }
}

/// Nanoseconds since the Unix epoch (0 before it), saturating.
fn unix_ns(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

/// How `sub` names a start position: `all`, `seq:42`, ...
pub(crate) fn describe_start(start: StartPosition) -> String {
    match start {
        StartPosition::All => "the start".to_string(),
        StartPosition::New => "new messages only".to_string(),
        StartPosition::FromSeq(n) => format!("seq {}", group(n)),
        StartPosition::FromTime(ns) => time(ns),
        StartPosition::Last(n) => format!("the last {}", group(n)),
        StartPosition::LastPerTopic => "the newest message of each topic".to_string(),
    }
}

/// Bails when `--stream` names an invalid stream, before connecting.
pub(crate) fn check_stream_name(name: &str) -> Result<()> {
    if !brokerd_proto::streams::valid_stream_name(name) {
        bail!("invalid stream name {name:?}: 1 to 64 ASCII letters, digits, '-' or '_'");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[test]
    fn sizes_in_decimal_and_binary_units() {
        assert_eq!(parse_size("1048576"), Ok(1 << 20));
        assert_eq!(parse_size("64MiB"), Ok(64 << 20));
        assert_eq!(parse_size("64m"), Ok(64 << 20));
        assert_eq!(parse_size("500MB"), Ok(500_000_000));
        assert_eq!(parse_size("2 GiB"), Ok(2 << 30));
        assert_eq!(parse_size("10kb"), Ok(10_000));
        assert!(parse_size("MiB").is_err());
        assert!(parse_size("5 parsecs").is_err());
        assert!(parse_size("99999999999TB").is_err());
    }

    #[test]
    fn durations_must_be_whole_units() {
        assert_eq!(parse_whole_seconds("7d"), Ok(7 * 86_400));
        assert_eq!(parse_whole_seconds("0s"), Ok(0));
        assert!(parse_whole_seconds("1500ms").is_err());
        assert_eq!(parse_whole_millis("100ms"), Ok(100));
        assert_eq!(parse_whole_millis("2s"), Ok(2000));
        assert!(parse_whole_millis("10us").is_err());
    }

    #[test]
    fn start_positions() {
        assert_eq!(parse_start("all"), Ok(StartPosition::All));
        assert_eq!(parse_start("new"), Ok(StartPosition::New));
        assert_eq!(parse_start("seq:42"), Ok(StartPosition::FromSeq(42)));
        assert_eq!(parse_start("last:10"), Ok(StartPosition::Last(10)));
        assert_eq!(
            parse_start("last-per-topic"),
            Ok(StartPosition::LastPerTopic)
        );
        assert_eq!(
            parse_start("time:1700000000000000000"),
            Ok(StartPosition::FromTime(1_700_000_000_000_000_000))
        );
        assert_eq!(
            parse_start("time:2023-11-14T22:13:20Z"),
            Ok(StartPosition::FromTime(1_700_000_000_000_000_000))
        );
        assert_eq!(
            parse_start("time:2023-11-14T22:13:20.5Z"),
            Ok(StartPosition::FromTime(1_700_000_000_500_000_000))
        );
        for bad in [
            "",
            "everything",
            "seq:",
            "seq:x",
            "last:-1",
            "time:yesterday",
            "seq",
        ] {
            assert!(parse_start(bad).is_err(), "{bad}");
        }
    }

    /// `brokerctl stream ARGS...` parsed.
    fn parse(args: &[&str]) -> Result<StreamArgs, clap::Error> {
        #[derive(Debug, Parser)]
        struct Cli {
            #[command(flatten)]
            stream: StreamArgs,
        }
        Cli::try_parse_from(std::iter::once("stream").chain(args.iter().copied())).map(|c| c.stream)
    }

    #[test]
    fn the_stream_name_is_not_the_client_name() {
        #[derive(Debug, Parser)]
        struct Cli {
            #[command(flatten)]
            global: crate::Global,
            #[command(subcommand)]
            command: crate::Command,
        }
        for args in [
            &["brokerctl", "stream", "rm", "R"][..],
            &["brokerctl", "stream", "info", "R"],
            &["brokerctl", "stream", "purge", "R"],
            &["brokerctl", "stream", "add", "R", "--filter", "r.>"],
        ] {
            let cli = Cli::try_parse_from(args).unwrap();
            assert_eq!(cli.global.name, "brokerctl", "{args:?}");
        }
    }

    #[test]
    fn add_flags_become_the_definition() {
        let args = parse(&[
            "add",
            "ORDERS",
            "--filter",
            "order.>",
            "--filter",
            "payment.>",
            "--max-msgs",
            "1000000",
            "--max-bytes",
            "10GiB",
            "--max-age",
            "7d",
            "--fsync",
            "always",
            "--fsync-interval",
            "50ms",
            "--dup-window",
            "5m",
            "--segment-bytes",
            "16MiB",
            "--max-msgs-per-topic",
            "1",
        ])
        .unwrap();
        let StreamOp::Add(add) = args.op else {
            panic!("not add");
        };
        let c = add.config();
        assert_eq!(c.name, "ORDERS");
        assert_eq!(c.filters, ["order.>", "payment.>"]);
        assert_eq!(c.max_msgs, 1_000_000);
        assert_eq!(c.max_bytes, 10 << 30);
        assert_eq!(c.max_age_s, 7 * 86_400);
        assert_eq!(c.fsync, Fsync::Always);
        assert_eq!(c.fsync_interval_ms, 50);
        assert_eq!(c.duplicate_window_s, 300);
        assert_eq!(c.segment_bytes, 16 << 20);
        assert_eq!(c.max_msgs_per_topic, 1);
        // Without flags: the defaults.
        let StreamOp::Add(add) = parse(&["add", "S", "--filter", ">"]).unwrap().op else {
            panic!("not add");
        };
        assert_eq!(
            add.config(),
            StreamConfig {
                name: "S".into(),
                filters: vec![">".into()],
                ..StreamConfig::default()
            }
        );
        assert!(parse(&["add", "S"]).is_err(), "a filter is required");
    }

    #[test]
    fn info_and_list_render() {
        let info = StreamInfo {
            config: StreamConfig {
                name: "ORDERS".into(),
                filters: vec!["order.>".into(), "payment.>".into()],
                max_age_s: 86_400,
                ..StreamConfig::default()
            },
            source: "api".into(),
            first_seq: 3,
            last_seq: 1_204,
            msgs: 1_202,
            bytes: 3 << 20,
            segments: 1,
            first_ts: 1_700_000_000_000_000_000,
            last_ts: 1_700_000_060_000_000_000,
            readers: 2,
            ..StreamInfo::default()
        };
        let text = render_info(&info);
        assert!(
            text.contains("stream         ORDERS (defined in api)"),
            "{text}"
        );
        assert!(
            text.contains("1,202 messages (sequences 3..=1,204)"),
            "{text}"
        );
        assert!(text.contains("3.0 MiB on disk in 1 segment"), "{text}");
        assert!(
            text.contains("first          2023-11-14T22:13:20.000Z"),
            "{text}"
        );
        assert!(
            text.contains("messages none, bytes none, age 1day"),
            "{text}"
        );
        assert!(text.contains("interval, every 100ms"), "{text}");
        assert!(!text.contains("recovery"), "{text}");
        assert!(!text.contains("per topic"), "{text}");
        let last_value = StreamInfo {
            config: StreamConfig {
                max_msgs_per_topic: 1,
                ..info.config.clone()
            },
            topics: 3,
            kept: 3,
            consumers: vec![brokerd_proto::streams::ConsumerInfo {
                name: "billing".into(),
                filter: "order.>".into(),
                floor: 40,
                in_flight: 2,
                members: 1,
                delivered: 45,
                redelivered: 3,
                given_up: 0,
                passes: 50,
            }],
            ..info.clone()
        };
        let text = render_info(&last_value);
        assert!(text.contains("age 1day, 1 per topic"), "{text}");
        assert!(
            text.contains("per topic      3 messages kept of 3 topics"),
            "{text}"
        );
        assert!(
            text.contains(
                "consumers      billing (order.>): done to seq 40, 2 in flight, 1 member"
            ),
            "{text}"
        );
        let empty = StreamInfo {
            first_seq: 5,
            last_seq: 4,
            ..StreamInfo::default()
        };
        assert!(render_info(&empty).contains("empty; the next is 5"));
        let table = render_list(std::slice::from_ref(&info));
        let lines: Vec<&str> = table.lines().collect();
        assert!(lines[0].starts_with("NAME  "), "{table}");
        assert!(lines[1].starts_with("ORDERS"), "{table}");
        assert!(
            lines[1].ends_with("interval  order.>, payment.>"),
            "{table}"
        );
        assert_eq!(render_list(&[]), "no streams\n");
    }

    #[test]
    fn byte_figures() {
        assert_eq!(bytes(512), "512 B");
        assert_eq!(bytes(1536), "1.5 KiB");
        assert_eq!(bytes(64 << 20), "64.0 MiB");
    }
}
