//! `brokerctl top`: the connections, live. Asks for the statistics every `--interval` on one
//! connection (left out of the view, as `stats` leaves out its own) and redraws the screen: a
//! line of the broker's totals and rates, the busiest topics, then the connection table of
//! [`crate::conns`] sorted by rate, pending bytes or drops, cut to the terminal's height and
//! width.
//!
//! On a terminal it reads keys (`r`, `p`, `d` sort, `q` quits) through [`crate::tty`] and
//! redraws in place with ANSI escapes: cursor home, each line followed by clear-to-end-of-line,
//! then clear-to-end-of-screen, so nothing flickers and the last view stays on the screen after
//! quitting. When stdout is not a terminal it prints plain snapshots, one unless `--iterations`
//! asks for more, so that scripts and tests can read it.

use crate::conns::{heading, row, sort_rows};
use crate::human::{group, rate};
use crate::stats::{Answer, Asker, busiest, printable};
use crate::{Global, tty};
use anyhow::{Context, Result};
use brokerd_proto::stats::ConnStats;
use bytes::Bytes;
use clap::{Args, ValueEnum};
use std::future::Future;
use std::io::{IsTerminal, Write};
use std::pin::Pin;
use std::time::Duration;
use tokio::time::{Instant, sleep, sleep_until};

/// Arguments of `brokerctl top`.
#[derive(Debug, Args)]
pub(crate) struct TopArgs {
    /// The first order of the rows; keys change it while running.
    #[arg(long, value_enum, default_value_t = TopSort::Rate)]
    sort: TopSort,
    /// Time between refreshes, e.g. `500ms`, `2s`.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    interval: Duration,
    /// Exit after this many refreshes [default: never on a terminal, 1 when stdout is not one].
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    iterations: Option<u64>,
    /// How long to wait for each answer, e.g. `500ms`, `5s`.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    timeout: Duration,
}

/// What `top` orders the connections by, the largest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum TopSort {
    /// Messages published and delivered per second, together (key `r`).
    Rate,
    /// Pending bytes, then pending messages (key `p`).
    Pending,
    /// Drops per second, then drops in all (key `d`).
    Drops,
}

impl TopSort {
    /// The figures rows are ordered by, largest first.
    fn figures(self, c: &ConnStats) -> [f64; 2] {
        match self {
            TopSort::Rate => [c.msgs_in_per_s + c.deliveries_per_s, 0.0],
            TopSort::Pending => [c.pending_bytes as f64, c.pending_msgs as f64],
            TopSort::Drops => [c.dropped_per_s, c.dropped as f64],
        }
    }

    /// Its name in the view.
    fn name(self) -> &'static str {
        match self {
            TopSort::Rate => "rate",
            TopSort::Pending => "pending bytes",
            TopSort::Drops => "drops",
        }
    }

    /// The order a key asks for.
    fn from_key(key: u8) -> Option<TopSort> {
        match key {
            b'r' | b'R' => Some(TopSort::Rate),
            b'p' | b'P' => Some(TopSort::Pending),
            b'd' | b'D' => Some(TopSort::Drops),
            _ => None,
        }
    }
}

/// A request for the statistics under way.
type Asking<'a> = Pin<Box<dyn Future<Output = Result<Bytes>> + 'a>>;

/// Shows the connections until `q`, Ctrl-C, SIGTERM or `--iterations`.
pub(crate) async fn cmd_top(global: &Global, args: TopArgs) -> Result<()> {
    // The signal listeners are registered on their first poll, which the `biased` select below
    // makes happen before anything else, so that Ctrl-C never kills the process with the
    // terminal still in key mode.
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    let term = crate::terminated();
    tokio::pin!(term);
    let asker = tokio::select! {
        biased;
        r = &mut ctrl_c => {
            r.context("cannot listen for ctrl-c")?;
            return Ok(());
        }
        _ = &mut term => return Ok(()),
        r = Asker::connect(global, "top") => r?,
    };
    let stop = async {
        tokio::select! {
            biased;
            r = &mut ctrl_c => r.context("cannot listen for ctrl-c"),
            _ = &mut term => Ok(()),
        }
    };
    let shown = if std::io::stdout().is_terminal() {
        live(&asker, &args, stop).await
    } else {
        snapshots(&asker, &args, stop).await
    };
    asker.close().await;
    shown
}

/// Prints `--iterations` plain snapshots (one by default), a blank line between them.
async fn snapshots(
    asker: &Asker,
    args: &TopArgs,
    stop: impl Future<Output = Result<()>>,
) -> Result<()> {
    tokio::pin!(stop);
    let iterations = args.iterations.unwrap_or(1);
    for i in 0..iterations {
        if i > 0 {
            tokio::select! {
                biased;
                r = &mut stop => return r,
                () = sleep(args.interval) => {}
            }
        }
        let reply = tokio::select! {
            biased;
            r = &mut stop => return r,
            r = asker.ask(args.timeout) => r?,
        };
        let mut answer = Answer::parse(&reply)?;
        answer.leave_out(&asker.name);
        let mut text = String::new();
        if i > 0 {
            text.push('\n');
        }
        for line in frame(&answer, args.sort, None) {
            text.push_str(&line);
            text.push('\n');
        }
        std::io::stdout()
            .lock()
            .write_all(text.as_bytes())
            .context("cannot write to stdout")?;
    }
    Ok(())
}

/// The live view on a terminal. The key mode is restored when this returns, whichever way.
async fn live(asker: &Asker, args: &TopArgs, stop: impl Future<Output = Result<()>>) -> Result<()> {
    tokio::pin!(stop);
    let _mode = tty::KeyMode::enter()?;
    let mut keys = tty::keys();
    let mut keys_open = true;
    let mut screen = Screen::start()?;
    let mut sort = args.sort;
    let mut last: Option<Answer> = None;
    let mut refreshes = 0u64;
    let mut asking: Option<Asking<'_>> = Some(Box::pin(asker.ask(args.timeout)));
    let mut next = Instant::now() + args.interval;
    loop {
        tokio::select! {
            biased;
            r = &mut stop => return r,
            key = keys.recv(), if keys_open => match key {
                Some(b'q' | b'Q') => return Ok(()),
                Some(key) => {
                    if let Some(s) = TopSort::from_key(key) {
                        sort = s;
                        if let Some(answer) = &last {
                            screen.draw(&frame(answer, sort, Some(tty::size())))?;
                        }
                    }
                }
                // No more keys (stdin ended): Ctrl-C still quits.
                None => keys_open = false,
            },
            reply = answered(&mut asking) => {
                asking = None;
                let mut answer = Answer::parse(&reply?)?;
                answer.leave_out(&asker.name);
                screen.draw(&frame(&answer, sort, Some(tty::size())))?;
                last = Some(answer);
                refreshes += 1;
                if args.iterations.is_some_and(|n| refreshes >= n) {
                    return Ok(());
                }
            },
            () = sleep_until(next), if asking.is_none() => {
                next = Instant::now() + args.interval;
                asking = Some(Box::pin(asker.ask(args.timeout)));
            },
        }
    }
}

/// The answer to the request under way, or never when none is.
async fn answered(asking: &mut Option<Asking<'_>>) -> Result<Bytes> {
    match asking {
        Some(a) => a.await,
        None => std::future::pending().await,
    }
}

/// The terminal's screen while `top` draws on it: cleared at the start, the cursor hidden, and
/// shown again below the last view on drop.
struct Screen {
    /// Lines of the last view, for putting the cursor under it at the end.
    drawn: usize,
}

impl Screen {
    /// Clears the screen and hides the cursor.
    fn start() -> Result<Screen> {
        write_out(b"\x1b[2J\x1b[H\x1b[?25l")?;
        Ok(Screen { drawn: 0 })
    }

    /// Draws `lines` from the top left, each over the one before, and clears what is left.
    fn draw(&mut self, lines: &[String]) -> Result<()> {
        let mut out = String::from("\x1b[H");
        for line in lines {
            out.push_str(line);
            out.push_str("\x1b[K\r\n");
        }
        out.push_str("\x1b[J");
        self.drawn = lines.len();
        write_out(out.as_bytes())
    }
}

impl Drop for Screen {
    fn drop(&mut self) {
        // The cursor goes to the line under the view, where the shell's prompt belongs.
        let _ = write_out(format!("\x1b[{};1H\x1b[?25h", self.drawn + 1).as_bytes());
    }
}

/// Writes `bytes` to stdout at once.
fn write_out(bytes: &[u8]) -> Result<()> {
    let mut out = std::io::stdout().lock();
    out.write_all(bytes)
        .and_then(|()| out.flush())
        .context("cannot write to stdout")
}

/// The view as lines: the totals and rates, the busiest topics, the order, then the table.
/// With `fit` (rows, columns) the lines are cut to the width and the table to the height, one
/// row short so that the last newline does not scroll the screen; `fit` also adds the keys.
fn frame(answer: &Answer, sort: TopSort, fit: Option<(usize, usize)>) -> Vec<String> {
    let mut lines = Vec::new();
    match answer {
        Answer::Admin(a) => {
            let s = &a.server;
            lines.push(format!(
                "brokerd {}  up {}  connections {}  subscriptions {}  in {} ({}/s)  \
                 deliveries {} ({}/s)  dropped {} ({}/s)",
                printable(&s.version),
                humantime::format_duration(Duration::from_secs(s.uptime_s as u64)),
                group(s.connections),
                group(s.subscriptions),
                group(s.msgs_in),
                rate(s.rates.msgs_in),
                group(s.deliveries),
                rate(s.rates.deliveries),
                group(s.dropped),
                rate(s.rates.dropped)
            ));
            lines.push(format!("busiest topics: {}", busiest(a)));
        }
        Answer::User(u) => lines.push(format!(
            "brokerd {}  user {}: connections {} (its own only, this tool's left out; the broker's totals are for admins)",
            printable(&u.version),
            printable(&u.user),
            group(u.connections)
        )),
    }
    let mut rows = answer.clients().to_vec();
    sort_rows(&mut rows, |c| sort.figures(c));
    let order = format!("sorted by {}", sort.name());
    lines.push(match fit {
        Some(_) => format!("{order}   keys: q quit, r rate, p pending, d drops"),
        None => order,
    });
    lines.push(String::new());
    lines.push(heading());
    // Lines left for rows, keeping the screen's last line free.
    let room = fit.map_or(usize::MAX, |(height, _)| {
        height.saturating_sub(lines.len() + 1)
    });
    let (shown, note) = if rows.len() <= room {
        (rows.len(), answer.partial_note())
    } else {
        let shown = room.saturating_sub(1);
        (shown, Some(format!("(and {} more)", rows.len() - shown)))
    };
    lines.extend(rows[..shown].iter().map(row));
    if let Some(note) = note
        && fit.is_none_or(|(height, _)| lines.len() + 1 < height)
    {
        lines.push(note);
    }
    if let Some((_, width)) = fit {
        for line in &mut lines {
            if let Some((at, _)) = line.char_indices().nth(width) {
                line.truncate(at);
            }
        }
    }
    lines
}

#[cfg(test)]
mod tests {
    use super::*;
    use brokerd_proto::stats::{Rates, ServerStats, StatsAnswer};

    fn conn(id: u64, name: &str, rate_out: f64, pending: u64, dropped_per_s: f64) -> ConnStats {
        ConnStats {
            id,
            name: name.into(),
            peer: format!("10.0.0.{id}:5000"),
            deliveries_per_s: rate_out,
            pending_bytes: pending,
            dropped_per_s,
            ..ConnStats::default()
        }
    }

    fn answer(n: u64) -> Answer {
        Answer::Admin(Box::new(StatsAnswer {
            server: ServerStats {
                version: "0.1.0".into(),
                uptime_s: 3_725.0,
                connections: n,
                msgs_in: 12_345,
                rates: Rates {
                    msgs_in: 250.0,
                    ..Rates::default()
                },
                ..ServerStats::default()
            },
            clients_listed: n,
            clients: (1..=n)
                .map(|i| conn(i, &format!("c{i}"), i as f64, 100 - i, (i % 3) as f64))
                .collect(),
        }))
    }

    /// The names in the table's rows, in order.
    fn names(lines: &[String]) -> Vec<String> {
        let at = lines.iter().position(|l| l.ends_with("NAME")).unwrap();
        lines[at + 1..]
            .iter()
            .filter(|l| !l.starts_with('('))
            .map(|l| l.split_whitespace().last().unwrap().to_string())
            .collect()
    }

    #[test]
    fn the_header_has_the_totals_and_rates() {
        let lines = frame(&answer(2), TopSort::Rate, None);
        assert!(
            lines[0].starts_with("brokerd 0.1.0  up 1h 2m 5s  connections 2"),
            "{lines:?}"
        );
        assert!(lines[0].contains("in 12,345 (250/s)"), "{lines:?}");
        assert_eq!(lines[2], "sorted by rate");
    }

    #[test]
    fn each_order_puts_its_largest_first() {
        let a = answer(4);
        assert_eq!(
            names(&frame(&a, TopSort::Rate, None)),
            ["c4", "c3", "c2", "c1"]
        );
        assert_eq!(
            names(&frame(&a, TopSort::Pending, None)),
            ["c1", "c2", "c3", "c4"]
        );
        assert_eq!(
            names(&frame(&a, TopSort::Drops, None)),
            ["c2", "c1", "c4", "c3"]
        );
    }

    #[test]
    fn the_view_fits_the_terminal() {
        let lines = frame(&answer(50), TopSort::Rate, Some((12, 40)));
        assert!(lines.len() < 12, "{lines:?}");
        assert!(lines.iter().all(|l| l.chars().count() <= 40), "{lines:?}");
        assert!(lines[2].contains("q quit"), "{lines:?}");
        assert_eq!(lines.last().map(String::as_str), Some("(and 45 more)"));
        // A tall terminal shows every row and no note.
        let lines = frame(&answer(3), TopSort::Rate, Some((40, 200)));
        assert_eq!(names(&lines).len(), 3, "{lines:?}");
        assert!(!lines.iter().any(|l| l.starts_with("(and")), "{lines:?}");
    }

    #[test]
    fn keys_choose_the_order() {
        assert_eq!(TopSort::from_key(b'p'), Some(TopSort::Pending));
        assert_eq!(TopSort::from_key(b'D'), Some(TopSort::Drops));
        assert_eq!(TopSort::from_key(b'r'), Some(TopSort::Rate));
        assert_eq!(TopSort::from_key(b'x'), None);
    }
}
