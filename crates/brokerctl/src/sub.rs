//! `brokerctl sub`: subscribe to a filter, or replay a stream (`--stream`), and print each
//! message as a line of text or JSON until `--count`, Ctrl-C, SIGTERM, a closed stdout or the end
//! of the connection. Progress and trouble (subscribed, drops the broker reported, a lost and
//! regained connection, why the broker ended the subscription) go to stderr, so stdout holds
//! messages only.
//!
//! It reconnects unless `--no-reconnect`; a replay resumes after the last stream sequence it
//! printed (the client library does that), so nothing is missed or printed twice.

use crate::{Global, note, plural, streams};
use anyhow::{Context, Result};
use brokerd_client::{Client, Headers, Message, Subscription};
use clap::Args;
use std::fmt::Write as _;
use std::io::{self, BufWriter, Write};

/// Arguments of `brokerctl sub`.
#[derive(Debug, Args)]
pub(crate) struct SubArgs {
    /// Filter to subscribe to (`*` matches one token, a trailing `>` one or more); with
    /// --stream, `>` (the whole stream) when absent.
    #[arg(required_unless_present = "stream")]
    filter: Option<String>,
    /// Replay this stream's stored messages matching the filter, then continue live; each line
    /// starts with the message's stream sequence (`#42 TOPIC ...`). After a lost connection it
    /// resumes right after the last sequence printed.
    #[arg(long, value_name = "NAME", conflicts_with = "queue")]
    stream: Option<String>,
    /// Where the replay starts: `all`, `new`, `seq:N`, `time:T` (RFC 3339 in UTC such as
    /// `2026-01-31T08:00:00Z`, or unix nanoseconds), `last:N`, or `last-per-topic` (the newest
    /// message of each topic, on a stream with --max-msgs-per-topic).
    #[arg(long, value_name = "POSITION", requires = "stream", default_value = "all", value_parser = streams::parse_start)]
    from: brokerd_client::StartPosition,
    /// Exit after this many messages.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    count: Option<u64>,
    /// Print one JSON object per line instead of `TOPIC [HEADERS] PAYLOAD` (with the reply-to
    /// and the time received always).
    #[arg(long)]
    json: bool,
    /// Show each message's reply-to topic (`TOPIC (reply-to R) ...`).
    #[arg(long)]
    show_reply: bool,
    /// Start each line with the time it was received (UTC, RFC 3339, milliseconds).
    #[arg(long)]
    timestamps: bool,
    /// Exit when the connection is lost instead of reconnecting.
    #[arg(long)]
    no_reconnect: bool,
    /// Join this queue group: each message goes to one member of the group.
    #[arg(long, value_name = "GROUP")]
    queue: Option<String>,
}

/// Why `brokerctl sub` (or `consume`) stopped reading.
pub(crate) enum SubEnd {
    /// `--count` messages were printed.
    Done,
    /// Ctrl-C or SIGTERM.
    Interrupted,
    /// The subscription stream ended: the connection closed or the broker ended it.
    StreamEnded,
    /// Stdout was closed by its reader (`| head`).
    BrokenPipe,
}

/// `brokerctl sub`: prints matching messages until `--count`, Ctrl-C, SIGTERM, a closed stdout
/// or the end of the connection. It says on stderr when it has subscribed, when the broker
/// reports dropped messages (as it happens), when the connection is lost and comes back (it
/// reconnects unless `--no-reconnect`), and what was missed in all when it exits.
pub(crate) async fn cmd_sub(global: &Global, args: SubArgs) -> Result<()> {
    // Installed before connecting, so Ctrl-C at any point after start-up exits cleanly instead of
    // killing the process: the listener is registered on its first poll, which `biased` makes
    // happen before the connection attempt.
    if let Some(stream) = &args.stream {
        streams::check_stream_name(stream)?;
    }
    let filter = args.filter.clone().unwrap_or_else(|| ">".to_string());
    let target = match &args.stream {
        Some(stream) => Target::Stream(stream, args.from),
        None => match &args.queue {
            Some(group) => Target::Queue(group),
            None => Target::Live,
        },
    };
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    let term = crate::terminated();
    tokio::pin!(term);
    let opened = tokio::select! {
        biased;
        r = &mut ctrl_c => {
            r.context("cannot listen for ctrl-c")?;
            return Ok(());
        }
        _ = &mut term => return Ok(()),
        r = open_subscription(global, &filter, target, !args.no_reconnect) => r?,
    };
    let (client, mut sub) = opened;
    match target {
        Target::Stream(stream, start) => note(format_args!(
            "replaying {filter} from stream {stream}, from {}, on {}",
            streams::describe_start(start),
            global.server
        )),
        Target::Queue(group) => note(format_args!(
            "subscribed to {filter} in queue group {group} on {}",
            global.server
        )),
        Target::Live => note(format_args!("subscribed to {filter} on {}", global.server)),
    }
    let mut events = client.events();
    let style = if args.json {
        Format::Json {
            stream: args.stream.as_deref(),
        }
    } else {
        Format::Text {
            reply: args.show_reply,
            time: args.timestamps,
        }
    };
    // The stream sequence of the last message printed, for the notes on reconnecting.
    let mut last_seq: Option<u64> = None;
    let mut out = BufWriter::new(io::stdout());
    let mut printed: u64 = 0;
    let mut reported_missed = 0u64;
    let end = loop {
        if args.count.is_some_and(|n| printed >= n) {
            break SubEnd::Done;
        }
        report_missed(&sub, &filter, &mut reported_missed);
        // Stdout is flushed only when no message is waiting, so a burst costs one write, yet
        // every message is visible as soon as the burst is over.
        let msg = match sub.try_next() {
            Some(m) => m,
            None => {
                if let Err(e) = out.flush() {
                    break pipe_or(e)?;
                }
                tokio::select! {
                    biased;
                    r = &mut ctrl_c => {
                        r.context("cannot listen for ctrl-c")?;
                        break SubEnd::Interrupted;
                    }
                    _ = &mut term => break SubEnd::Interrupted,
                    Ok(event) = events.recv() => {
                        report_event(&event, target, last_seq);
                        continue;
                    }
                    m = sub.next() => match m {
                        Some(m) => m,
                        None => break SubEnd::StreamEnded,
                    },
                }
            }
        };
        if let Err(e) = write_message(&mut out, &msg, style) {
            break pipe_or(e)?;
        }
        last_seq = msg.stream_seq().or(last_seq);
        printed += 1;
    };
    let end = match end {
        SubEnd::BrokenPipe => SubEnd::BrokenPipe,
        other => match out.flush() {
            Ok(()) => other,
            Err(e) => pipe_or(e)?,
        },
    };
    report_missed(&sub, &filter, &mut reported_missed);
    let missed = sub.missed();
    if missed > 0 {
        note(format_args!(
            "missed {missed} {} in all",
            plural(missed, "message", "messages")
        ));
    }
    let ended = sub.ended_by_broker();
    drop(sub);
    let closed = client.close().await;
    match end {
        SubEnd::StreamEnded => {
            closed.with_context(|| format!("subscription to {filter} ended"))?;
            // The connection is still up, so the broker itself ended the subscription.
            match ended {
                Some(why) => anyhow::bail!("the broker ended the subscription to {filter}: {why}"),
                None => anyhow::bail!("the broker ended the subscription to {filter}"),
            }
        }
        SubEnd::Done | SubEnd::Interrupted => closed.context("cannot close the connection"),
        // Whoever closed the pipe has what they wanted; the connection state no longer matters.
        SubEnd::BrokenPipe => Ok(()),
    }
}

/// Says on stderr how many more messages the broker reported dropped since the last report.
fn report_missed(sub: &Subscription, filter: &str, reported: &mut u64) {
    let missed = sub.missed();
    if missed > *reported {
        let new = missed - *reported;
        note(format_args!(
            "brokerctl: the broker dropped {new} {} for {filter} (slow subscriber; {missed} in all)",
            plural(new, "message", "messages")
        ));
        *reported = missed;
    }
}

/// Says on stderr what happened to the connection. A replay subscription misses nothing while
/// disconnected: it resumes after `last_seq`, the last stream sequence printed.
fn report_event(event: &brokerd_client::Event, target: Target<'_>, last_seq: Option<u64>) {
    use brokerd_client::Event;
    let replay = matches!(target, Target::Stream(..));
    match event {
        Event::ServerShuttingDown => note(format_args!("brokerctl: the broker is shutting down")),
        Event::Disconnected { reason } if replay => note(format_args!(
            "brokerctl: connection lost ({reason}); reconnecting; the replay resumes where it stopped"
        )),
        Event::Disconnected { reason } => note(format_args!(
            "brokerctl: connection lost ({reason}); reconnecting; messages published meanwhile are missed"
        )),
        Event::Reconnected { server, attempts } => {
            let again = match (replay, last_seq) {
                (true, Some(seq)) => format!("replaying again from seq {}", seq + 1),
                (true, None) => "replaying again from the start asked for".to_string(),
                (false, _) => "subscribed again".to_string(),
            };
            note(format_args!(
                "brokerctl: reconnected to {server} after {attempts} {}; {again}",
                plural((*attempts).into(), "attempt", "attempts")
            ));
        }
        Event::Closed { reason } => note(format_args!("brokerctl: connection closed: {reason}")),
        _ => {}
    }
}

/// What `brokerctl sub` subscribes as.
#[derive(Debug, Clone, Copy)]
enum Target<'a> {
    /// A plain subscription.
    Live,
    /// A member of this queue group.
    Queue(&'a str),
    /// A replay of this stream from this position.
    Stream(&'a str, brokerd_client::StartPosition),
}

/// Connects (reconnecting when asked) and subscribes.
async fn open_subscription(
    global: &Global,
    filter: &str,
    target: Target<'_>,
    reconnect: bool,
) -> Result<(Client, Subscription)> {
    let mut options = global.options(global.name.clone());
    if reconnect {
        options = options.reconnect(brokerd_client::Reconnect::default());
    }
    let client = Client::connect(global.server.as_str(), options)
        .await
        .with_context(|| format!("cannot connect to {}", global.server))?;
    let sub = match target {
        Target::Live => client.subscribe(filter).await,
        Target::Queue(group) => client.subscribe_queue(filter, group).await,
        Target::Stream(stream, start) => client.subscribe_stream(filter, stream, start).await,
    }
    .with_context(|| match target {
        Target::Stream(stream, _) => format!("cannot replay {filter} from stream {stream}"),
        _ => format!("cannot subscribe to {filter}"),
    })?;
    Ok((client, sub))
}

/// Maps a stdout error to [`SubEnd::BrokenPipe`] when the reader went away, else to an error.
pub(crate) fn pipe_or(e: io::Error) -> Result<SubEnd> {
    if e.kind() == io::ErrorKind::BrokenPipe {
        Ok(SubEnd::BrokenPipe)
    } else {
        Err(anyhow::Error::new(e).context("cannot write to stdout"))
    }
}

/// How `brokerctl sub` (and `consume`) prints a message.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Format<'a> {
    /// `[TIME ][#SEQ ]TOPIC [(reply-to R) ][[k=v, ...] ]PAYLOAD`, with the stream sequence for
    /// a replay subscription's message.
    Text {
        /// Show the reply-to.
        reply: bool,
        /// Start with the time received.
        time: bool,
    },
    /// One JSON object per line.
    Json {
        /// The stream replayed, if any.
        stream: Option<&'a str>,
    },
}

/// The time now, as RFC 3339 with milliseconds, UTC.
fn now_rfc3339() -> String {
    humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string()
}

/// Writes `msg` as one line.
pub(crate) fn write_message(
    out: &mut impl Write,
    msg: &Message,
    format: Format<'_>,
) -> io::Result<()> {
    let line = match format {
        Format::Text { reply, time } => {
            let mut line = String::new();
            if time {
                line.push_str(&now_rfc3339());
                line.push(' ');
            }
            if let Some(seq) = msg.stream_seq() {
                let _ = write!(line, "#{seq} ");
            }
            line.push_str(&text_line(
                msg.topic(),
                reply.then(|| msg.reply()).flatten(),
                &msg.headers(),
                &msg.payload(),
            ));
            line
        }
        Format::Json { stream } => json_line(
            msg.topic(),
            &msg.payload(),
            msg.seq(),
            stream,
            msg.has_headers().then(|| msg.headers()).as_ref(),
            msg.reply(),
            &now_rfc3339(),
        ),
    };
    out.write_all(line.as_bytes())
}

/// `TOPIC [(reply-to R) ][[k=v, ...] ]PAYLOAD\n`, the payload decoded as UTF-8 with invalid
/// bytes replaced.
fn text_line(topic: &str, reply: Option<&str>, headers: &Headers, payload: &[u8]) -> String {
    let mut line = String::with_capacity(topic.len() + payload.len() + 2);
    line.push_str(topic);
    line.push(' ');
    if let Some(r) = reply {
        let _ = write!(line, "(reply-to {r}) ");
    }
    if !headers.is_empty() {
        line.push('[');
        for (i, (k, v)) in headers.iter().enumerate() {
            if i > 0 {
                line.push_str(", ");
            }
            let _ = write!(line, "{k}={v}");
        }
        line.push_str("] ");
    }
    line.push_str(&String::from_utf8_lossy(payload));
    line.push('\n');
    line
}

/// One JSON object and a newline:
/// `{"topic","payload","payload_encoding","seq","stream","headers","reply","received"}`.
///
/// `seq` is the subscription's sequence, or for a replay (`stream` names the stream, else
/// `null`) the message's stream sequence.
///
/// The payload is a string when it is UTF-8 (`payload_encoding` `"utf-8"`), else lower-case hex
/// (`"hex"`); the encoding field is what tells a payload `"cafe"` from the bytes `CA FE`.
/// Headers are a list of `[key, value]` pairs in published order, so a repeated key keeps every
/// value; `null` when the message has no header list, `[]` when it has an empty one. `reply` is
/// `null` when absent; `received` is when this process read it.
fn json_line(
    topic: &str,
    payload: &[u8],
    seq: u64,
    stream: Option<&str>,
    headers: Option<&Headers>,
    reply: Option<&str>,
    received: &str,
) -> String {
    let (payload, encoding) = match std::str::from_utf8(payload) {
        Ok(text) => (serde_json::Value::from(text), "utf-8"),
        Err(_) => {
            let mut hex = String::with_capacity(payload.len() * 2);
            for b in payload {
                let _ = write!(hex, "{b:02x}");
            }
            (serde_json::Value::from(hex), "hex")
        }
    };
    let headers = headers.map(|h| {
        h.iter()
            .map(|(k, v)| serde_json::json!([k, v]))
            .collect::<Vec<_>>()
    });
    let value = serde_json::json!({
        "topic": topic,
        "payload": payload,
        "payload_encoding": encoding,
        "seq": seq,
        "stream": stream,
        "headers": headers,
        "reply": reply,
        "received": received,
    });
    let mut line = value.to_string();
    line.push('\n');
    line
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[test]
    fn text_line_without_headers() {
        assert_eq!(
            text_line("a.b", None, &Headers::new(), b"hello"),
            "a.b hello\n"
        );
        assert_eq!(
            text_line("a.b", Some("_INBOX.x.1"), &Headers::new(), b"hi"),
            "a.b (reply-to _INBOX.x.1) hi\n"
        );
    }

    #[test]
    fn text_line_with_headers_and_invalid_utf8() {
        let h: Headers = [("k", "v"), ("trace", "1")].into_iter().collect();
        assert_eq!(
            text_line("a", None, &h, b"x\xffy"),
            "a [k=v, trace=1] x\u{fffd}y\n"
        );
    }

    fn parse(line: &str) -> serde_json::Value {
        assert!(line.ends_with('\n'));
        serde_json::from_str(line).unwrap()
    }

    #[test]
    fn json_line_keeps_repeated_headers_and_tells_absent_from_empty() {
        let h: Headers = [("k", "v\"q"), ("k", "second")].into_iter().collect();
        let v = parse(&json_line(
            "a.b",
            b"hi\n",
            7,
            Some("ORDERS"),
            Some(&h),
            Some("r.1"),
            "t",
        ));
        assert_eq!(v["payload"], "hi\n");
        assert_eq!(v["payload_encoding"], "utf-8");
        assert_eq!(v["seq"], 7);
        assert_eq!(v["stream"], "ORDERS");
        assert_eq!(v["reply"], "r.1");
        assert_eq!(v["received"], "t");
        assert_eq!(
            v["headers"],
            serde_json::json!([["k", "v\"q"], ["k", "second"]])
        );
        let none = parse(&json_line("a", b"", 1, None, None, None, "t"));
        assert!(none["headers"].is_null() && none["reply"].is_null() && none["stream"].is_null());
        let empty = parse(&json_line(
            "a",
            b"",
            1,
            None,
            Some(&Headers::new()),
            None,
            "t",
        ));
        assert_eq!(empty["headers"], serde_json::json!([]));
    }

    #[test]
    fn json_line_binary_payload_is_hex() {
        let v = parse(&json_line(
            "a",
            &[0xca, 0xfe, 0x00],
            1,
            None,
            None,
            None,
            "t",
        ));
        assert_eq!(v["payload"], "cafe00");
        assert_eq!(v["payload_encoding"], "hex");
    }

    #[test]
    fn json_escapes_control_characters() {
        let line = json_line("a", "\u{1}\\\t".as_bytes(), 1, None, None, None, "t");
        assert!(!line[..line.len() - 1].contains('\n') && !line.contains('\u{1}'));
        assert_eq!(parse(&line)["payload"], "\u{1}\\\t");
    }

    #[test]
    fn stream_flags() {
        let sub = |args: &[&str]| {
            crate::Cli::try_parse_from(["brokerctl", "sub"].iter().chain(args).copied())
                .map(|c| c.command)
        };
        let Ok(crate::Command::Sub(s)) = sub(&["--stream", "ORDERS"]) else {
            panic!("sub --stream without a filter");
        };
        assert_eq!(s.filter, None);
        assert_eq!(s.from, brokerd_client::StartPosition::All);
        let Ok(crate::Command::Sub(s)) =
            sub(&["order.*", "--stream", "ORDERS", "--from", "seq:42"])
        else {
            panic!("sub --stream --from");
        };
        assert_eq!(s.from, brokerd_client::StartPosition::FromSeq(42));
        assert!(sub(&[]).is_err(), "a filter or a stream is needed");
        assert!(
            sub(&["a", "--from", "new"]).is_err(),
            "--from needs --stream"
        );
        assert!(sub(&["a", "--stream", "S", "--queue", "q"]).is_err());
        assert!(sub(&["a", "--stream", "S", "--from", "yesterday"]).is_err());
    }
}
