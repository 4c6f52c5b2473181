//! The terminal, for `brokerctl top`: keys without Enter and without echo, the screen's size,
//! and the keys themselves, read off the runtime.
//!
//! The mode is set with the `stty` command on `/dev/tty` rather than with a terminal crate:
//! `stty -g` saves it and [`KeyMode`]'s drop puts it back, so every way out of `top` (`q`, an
//! error, Ctrl-C, SIGTERM, a panic unwinding) restores the terminal. Nothing here draws; `top`
//! writes its own ANSI escapes.

use anyhow::{Context, Result, bail};
use std::fs::File;
use std::io::{self, IsTerminal, Read};
use std::process::{Command, Stdio};
use tokio::sync::mpsc;

/// The terminal in non-canonical, no-echo mode while this lives; the saved mode comes back on
/// drop.
pub(crate) struct KeyMode {
    /// `stty -g`'s output: the mode before.
    saved: String,
}

impl KeyMode {
    /// Saves the terminal's mode and turns off line editing and echo. A read returns after at
    /// most a tenth of a second with what was typed, possibly nothing (`min 0 time 1`), so the
    /// key reader can notice that it is no longer wanted.
    ///
    /// # Errors
    /// When there is no `/dev/tty` or `stty` fails.
    pub(crate) fn enter() -> Result<KeyMode> {
        let saved = stty(&["-g"]).context("cannot read the terminal's mode")?;
        let mode = KeyMode { saved };
        stty(&["-icanon", "-echo", "min", "0", "time", "1"])
            .context("cannot set the terminal's mode")?;
        Ok(mode)
    }
}

impl Drop for KeyMode {
    fn drop(&mut self) {
        // Nowhere to report a failure: the process is on its way out.
        let _ = stty(&[&self.saved]);
    }
}

/// Runs `stty ARGS` on `/dev/tty` (stty acts on its stdin) and returns what it printed. It
/// blocks for the few milliseconds the command takes, which a drop has to anyway.
fn stty(args: &[&str]) -> Result<String> {
    let tty = File::open("/dev/tty").context("cannot open /dev/tty")?;
    let out = Command::new("stty")
        .args(args)
        .stdin(tty)
        .stderr(Stdio::null())
        .output()
        .context("cannot run stty")?;
    if !out.status.success() {
        bail!("stty {} failed: {}", args.join(" "), out.status);
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// The terminal's size as (rows, columns): `stty size`, else `LINES` and `COLUMNS`, else 24 by
/// 80.
pub(crate) fn size() -> (usize, usize) {
    if let Some(size) = stty(&["size"]).ok().and_then(|s| parse_size(&s)) {
        return size;
    }
    let env = |name: &str, default: usize| {
        std::env::var(name)
            .ok()
            .and_then(|v| v.trim().parse().ok())
            .filter(|&n| n > 0)
            .unwrap_or(default)
    };
    (env("LINES", 24), env("COLUMNS", 80))
}

/// `ROWS COLUMNS` as `stty size` prints it; `None` for a zero (no size known, as on a serial
/// line).
fn parse_size(s: &str) -> Option<(usize, usize)> {
    let (rows, cols) = s.split_once(' ')?;
    let (rows, cols) = (rows.trim().parse().ok()?, cols.trim().parse().ok()?);
    (rows > 0 && cols > 0).then_some((rows, cols))
}

/// The bytes typed on stdin, from a thread of their own, since a read blocks. The channel is
/// bounded: a reader that falls behind holds the thread back, and the terminal keeps the rest.
/// Closing or dropping the receiver ends the thread within a tenth of a second on a terminal in
/// [`KeyMode`]; elsewhere the thread ends at the end of input, or with the process. The
/// receiver yields `None` once the thread has ended.
pub(crate) fn keys() -> mpsc::Receiver<u8> {
    let (tx, rx) = mpsc::channel(16);
    let terminal = io::stdin().is_terminal();
    // A plain thread, not `spawn_blocking`: the runtime waits for its blocking tasks when it
    // shuts down, and this one may be blocked in a read.
    let spawned = std::thread::Builder::new()
        .name("keys".into())
        .spawn(move || {
            let mut stdin = io::stdin().lock();
            let mut buf = [0u8; 16];
            loop {
                match stdin.read(&mut buf) {
                    // On the terminal, nothing typed in the last tenth of a second.
                    Ok(0) if terminal => {
                        if tx.is_closed() {
                            return;
                        }
                    }
                    Ok(0) => return,
                    Ok(n) => {
                        for &b in &buf[..n] {
                            if tx.blocking_send(b).is_err() {
                                return;
                            }
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(_) => return,
                }
            }
        });
    // Without the thread there are no keys; `q` is lost but Ctrl-C still quits. The sender
    // went down with the closure, so the receiver says so at once.
    drop(spawned);
    rx
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_as_stty_prints_them() {
        assert_eq!(parse_size("50 132\n"), Some((50, 132)));
        assert_eq!(parse_size("0 0"), None);
        assert_eq!(parse_size("garbage"), None);
    }
}
