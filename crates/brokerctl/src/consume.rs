//! `brokerctl consume STREAM CONSUMER`: join a stream's durable consumer, print each message as
//! `sub --stream` does (`#SEQ TOPIC ...`, or JSON), and acknowledge it once it is written out,
//! until `--count`, Ctrl-C, SIGTERM, a closed stdout or the end of the connection. Several
//! `consume` processes with the same consumer share its messages.
//!
//! A message is acknowledged only after the line holding it has been flushed to stdout, so a
//! message this process was killed before writing is delivered again (at least once). Lines are
//! flushed, and their messages acknowledged, whenever no message is waiting or every
//! [`ACK_BATCH`] messages. `--nak-every N` refuses every Nth message instead, to watch the
//! consumer deliver it again. Progress and trouble go to stderr, as for `sub`.
//!
//! It reconnects unless `--no-reconnect`, joining the same consumer again; what was not yet
//! acknowledged on the lost connection is delivered again by the broker, and said so on stderr.

use crate::sub::{Format, SubEnd, pipe_or, write_message};
use crate::{Global, note, plural, streams};
use anyhow::{Context, Result, bail};
use brokerd_client::{Client, ConsumerOptions, Message, StartPosition, Subscription};
use clap::Args;
use std::io::{self, BufWriter, Write};
use std::time::Duration;

/// Messages printed and not yet acknowledged at most: the lines are flushed and the messages
/// acknowledged at this many even while more are waiting.
const ACK_BATCH: usize = 256;

/// Arguments of `brokerctl consume`.
#[derive(Debug, Args)]
pub(crate) struct ConsumeArgs {
    /// The stream the consumer reads.
    #[arg(value_name = "STREAM")]
    stream: String,
    /// The durable consumer to join, created if it does not exist: 1 to 64 ASCII letters,
    /// digits, `-` and `_`. Every process consuming with this name shares its messages.
    #[arg(value_name = "CONSUMER")]
    consumer: String,
    /// The consumer's filter: it takes only the stream's messages whose topic matches. Every
    /// member must give the consumer's own filter.
    #[arg(long, value_name = "FILTER", default_value = ">")]
    filter: String,
    /// Where a new consumer starts: `all`, `new`, `seq:N`, `time:T` (RFC 3339 in UTC, or unix
    /// nanoseconds), `last:N`, or `last-per-topic`. Ignored when the consumer exists: it goes
    /// on from its own position.
    #[arg(long, value_name = "POSITION", default_value = "all", value_parser = streams::parse_start)]
    from: StartPosition,
    /// How long a delivered message may stay unacknowledged before it is delivered again, whole
    /// milliseconds, at least 100ms, e.g. `30s`, `500ms` [default: the broker's, 30s]. For a new
    /// consumer only.
    #[arg(long, value_name = "DURATION", value_parser = parse_ack_wait)]
    ack_wait: Option<Duration>,
    /// How many times one message is delivered at most [default: the broker's, 5]. For a new
    /// consumer only.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..))]
    max_deliver: Option<u16>,
    /// How many messages may be delivered and unacknowledged at once, across all members
    /// [default: the broker's, 1000]. For a new consumer only.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=100_000))]
    max_in_flight: Option<u32>,
    /// Exit after this many messages (acknowledged, or refused by --nak-every). Messages the
    /// broker had already sent beyond them go back to the consumer at once, each such delivery
    /// counting toward --max-deliver.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    count: Option<u64>,
    /// Refuse (NAK) every Nth message received instead of acknowledging it, so that the
    /// consumer delivers it again: to watch redelivery.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    nak_every: Option<u64>,
    /// Print one JSON object per line, as `sub --stream --json` does.
    #[arg(long)]
    json: bool,
    /// Start each line with the time it was received (UTC, RFC 3339, milliseconds).
    #[arg(long)]
    timestamps: bool,
    /// Exit when the connection is lost instead of reconnecting.
    #[arg(long)]
    no_reconnect: bool,
}

impl ConsumeArgs {
    /// The consumer's settings, as the flags give them.
    fn options(&self) -> ConsumerOptions {
        let mut options = ConsumerOptions::new()
            .filter(self.filter.clone())
            .start(self.from);
        if let Some(wait) = self.ack_wait {
            options = options.ack_wait(wait);
        }
        if let Some(n) = self.max_deliver {
            options = options.max_deliver(n);
        }
        if let Some(n) = self.max_in_flight {
            options = options.max_in_flight(n);
        }
        options
    }

    /// Whether the `n`-th message received (from 1) is refused rather than acknowledged.
    fn refuses(&self, n: u64) -> bool {
        self.nak_every.is_some_and(|every| n.is_multiple_of(every))
    }
}

/// `--ack-wait`: a duration of whole milliseconds, at least 100 ms (the broker's minimum).
fn parse_ack_wait(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s).map_err(|e| e.to_string())?;
    if d.subsec_nanos() % 1_000_000 != 0 {
        return Err(format!("{s:?} is not a whole number of milliseconds"));
    }
    if d < Duration::from_millis(u64::from(brokerd_proto::streams::MIN_ACK_WAIT_MS)) {
        return Err("the ack wait must be at least 100ms".into());
    }
    Ok(d)
}

/// `brokerctl consume`: joins the consumer, prints and acknowledges messages until `--count`,
/// Ctrl-C, SIGTERM, a closed stdout or the end of the connection.
pub(crate) async fn cmd_consume(global: &Global, args: ConsumeArgs) -> Result<()> {
    streams::check_stream_name(&args.stream)?;
    if !brokerd_proto::streams::valid_stream_name(&args.consumer) {
        bail!(
            "invalid consumer name {:?}: 1 to 64 ASCII letters, digits, '-' or '_'",
            args.consumer
        );
    }
    // Installed before connecting, as for `sub`: Ctrl-C at any point exits cleanly.
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
        r = join(global, &args) => r?,
    };
    let (client, mut sub) = opened;
    note(format_args!(
        "consuming {} from stream {} as consumer {}, on {}",
        args.filter, args.stream, args.consumer, global.server
    ));
    let mut events = client.events();
    let format = if args.json {
        Format::Json {
            stream: Some(&args.stream),
        }
    } else {
        Format::Text {
            reply: false,
            time: args.timestamps,
        }
    };
    let mut out = BufWriter::new(io::stdout());
    // Printed, not yet flushed and answered; with whether `--nak-every` refuses it.
    let mut written: Vec<(Message, bool)> = Vec::new();
    let mut received: u64 = 0;
    let end = loop {
        if args.count.is_some_and(|n| received >= n) {
            break SubEnd::Done;
        }
        let msg = match sub.try_next() {
            Some(m) if written.len() < ACK_BATCH => m,
            waiting => {
                if let Err(e) = answer(&mut out, &mut written).await? {
                    break pipe_or(e)?;
                }
                match waiting {
                    Some(m) => m,
                    None => tokio::select! {
                        biased;
                        r = &mut ctrl_c => {
                            r.context("cannot listen for ctrl-c")?;
                            break SubEnd::Interrupted;
                        }
                        _ = &mut term => break SubEnd::Interrupted,
                        Ok(event) = events.recv() => {
                            report_event(&event);
                            continue;
                        }
                        m = sub.next() => match m {
                            Some(m) => m,
                            None => break SubEnd::StreamEnded,
                        },
                    },
                }
            }
        };
        if let Err(e) = write_message(&mut out, &msg, format) {
            break pipe_or(e)?;
        }
        received += 1;
        written.push((msg, args.refuses(received)));
    };
    // What was printed is answered before leaving, unless stdout is gone: what it could not
    // take is not acknowledged, and comes back to the consumer.
    let end = match end {
        SubEnd::BrokenPipe => SubEnd::BrokenPipe,
        other => match answer(&mut out, &mut written).await? {
            Ok(()) => other,
            Err(e) => pipe_or(e)?,
        },
    };
    let ended = sub.ended_by_broker();
    drop(sub);
    // Closing flushes: the broker has every acknowledgement before the connection goes.
    let closed = client.close().await;
    match end {
        SubEnd::StreamEnded => {
            closed.with_context(|| format!("consumer {} ended", args.consumer))?;
            match ended {
                Some(why) => bail!(
                    "the broker ended the subscription to consumer {}: {why}",
                    args.consumer
                ),
                None => bail!(
                    "the broker ended the subscription to consumer {}",
                    args.consumer
                ),
            }
        }
        SubEnd::Done | SubEnd::Interrupted => closed.context("cannot close the connection"),
        SubEnd::BrokenPipe => Ok(()),
    }
}

/// Flushes the lines written, then acknowledges their messages (or refuses those marked, which
/// `--nak-every` picked). The inner `Err` is stdout's: nothing was acknowledged then.
///
/// # Errors
/// An acknowledgement the client could not queue for a reason other than a lost connection
/// (the client closed).
async fn answer(
    out: &mut impl Write,
    written: &mut Vec<(Message, bool)>,
) -> Result<io::Result<()>> {
    if let Err(e) = out.flush() {
        return Ok(Err(e));
    }
    for (msg, refuse) in written.drain(..) {
        let seq = msg.stream_seq().unwrap_or(0);
        let answered = if refuse {
            msg.nak().await
        } else {
            msg.ack().await
        };
        match answered {
            Ok(()) if refuse => note(format_args!(
                "brokerctl: refused #{seq} (--nak-every); the consumer delivers it again"
            )),
            Ok(()) => {}
            Err(brokerd_client::Error::StaleDelivery { .. }) => note(format_args!(
                "brokerctl: #{seq} arrived before the connection was lost; not acknowledged, the consumer delivers it again"
            )),
            Err(e) => {
                return Err(anyhow::Error::new(e).context(format!("cannot acknowledge #{seq}")));
            }
        }
    }
    Ok(Ok(()))
}

/// Says on stderr what happened to the connection.
fn report_event(event: &brokerd_client::Event) {
    use brokerd_client::Event;
    match event {
        Event::ServerShuttingDown => note(format_args!("brokerctl: the broker is shutting down")),
        Event::Disconnected { reason } => note(format_args!(
            "brokerctl: connection lost ({reason}); reconnecting; what was not acknowledged is delivered again"
        )),
        Event::Reconnected { server, attempts } => note(format_args!(
            "brokerctl: reconnected to {server} after {attempts} {}; consuming again",
            plural((*attempts).into(), "attempt", "attempts")
        )),
        Event::Closed { reason } => note(format_args!("brokerctl: connection closed: {reason}")),
        _ => {}
    }
}

/// Connects (reconnecting when asked) and joins the consumer.
async fn join(global: &Global, args: &ConsumeArgs) -> Result<(Client, Subscription)> {
    let mut options = global.options(global.name.clone());
    if !args.no_reconnect {
        options = options.reconnect(brokerd_client::Reconnect::default());
    }
    let client = Client::connect(global.server.as_str(), options)
        .await
        .with_context(|| format!("cannot connect to {}", global.server))?;
    let sub = client
        .consume(&args.stream, &args.consumer, args.options())
        .await
        .with_context(|| {
            format!(
                "cannot join consumer {} of stream {}",
                args.consumer, args.stream
            )
        })?;
    Ok((client, sub))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    fn parse(args: &[&str]) -> Result<ConsumeArgs, clap::Error> {
        let cli = crate::Cli::try_parse_from(["brokerctl", "consume"].iter().chain(args).copied())?;
        match cli.command {
            crate::Command::Consume(c) => Ok(c),
            other => panic!("parsed as {other:?}"),
        }
    }

    #[test]
    fn flags_become_the_consumers_settings() {
        let args = parse(&[
            "ORDERS",
            "billing",
            "--filter",
            "order.*",
            "--from",
            "seq:42",
            "--ack-wait",
            "1m 500ms",
            "--max-deliver",
            "3",
            "--max-in-flight",
            "100",
        ])
        .unwrap();
        assert_eq!(
            (args.stream.as_str(), args.consumer.as_str()),
            ("ORDERS", "billing")
        );
        assert_eq!(
            args.options(),
            ConsumerOptions::new()
                .filter("order.*")
                .start(StartPosition::FromSeq(42))
                .ack_wait(Duration::from_millis(60_500))
                .max_deliver(3)
                .max_in_flight(100)
        );
        // Without flags: the whole stream from its start, the broker's settings.
        let args = parse(&["ORDERS", "billing"]).unwrap();
        assert_eq!(args.options(), ConsumerOptions::new());
        assert!(!args.refuses(1));
        assert!(parse(&["ORDERS"]).is_err(), "a consumer is needed");
        for bad in [
            &["S", "c", "--ack-wait", "0s"][..],
            &["S", "c", "--ack-wait", "10us"],
            &["S", "c", "--ack-wait", "99ms"],
            &["S", "c", "--max-deliver", "0"],
            &["S", "c", "--max-in-flight", "100001"],
            &["S", "c", "--count", "0"],
            &["S", "c", "--nak-every", "0"],
            &["S", "c", "--from", "yesterday"],
        ] {
            assert!(parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn nak_every_picks_every_nth_message_received() {
        let args = parse(&["S", "c", "--nak-every", "3"]).unwrap();
        let picked: Vec<u64> = (1..=10).filter(|&n| args.refuses(n)).collect();
        assert_eq!(picked, [3, 6, 9]);
    }
}
