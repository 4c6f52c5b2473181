//! `brokerctl req` and `brokerctl reply`: request/reply from a terminal.
//!
//! `req` sends one request and prints the first reply's payload; `reply` answers requests on a
//! filter, either with a fixed payload or with the output of a shell command that reads the
//! request's payload on its standard input. A command that fails is answered with an error reply
//! (see [`ERROR_HEADER`]) and `reply` goes on serving: one bad request must not leave every later
//! requester waiting for a timeout.

use crate::{Global, connect, note};
use anyhow::{Context, Result, bail};
use brokerd_client::{Client, Error, Message};
use clap::Args;
use std::fmt;
use std::io::Write;
use std::process::{ExitStatus, Stdio};
use std::time::Duration;
use tokio::io::AsyncWriteExt;

/// The header an error reply carries; its value is the reason, e.g. `exit status 3`.
const ERROR_HEADER: &str = "error";

/// Arguments of `brokerctl req`.
#[derive(Debug, Args)]
pub(crate) struct ReqArgs {
    /// Topic to send the request to.
    topic: String,
    /// Request payload.
    #[arg(default_value = "")]
    payload: String,
    /// How long to wait for a reply, e.g. `500ms`, `5s`.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    timeout: Duration,
}

/// Arguments of `brokerctl reply`.
#[derive(Debug, Args)]
pub(crate) struct ReplyArgs {
    /// Filter whose requests to answer.
    filter: String,
    /// Fixed reply payload (unless `--command` is given).
    #[arg(required_unless_present = "command", conflicts_with = "command")]
    payload: Option<String>,
    /// Shell command run per request (`sh -c`): the request payload on its stdin, its stdout
    /// the reply, its stderr this tool's. When it fails (a non-zero exit, killed by a signal,
    /// cannot be started, or runs past --command-timeout) the requester gets an error reply
    /// instead, with the header `error=REASON` (e.g. `error=exit status 3`) and the payload
    /// `command failed: REASON`; the failure is logged on stderr and `reply` goes on answering.
    #[arg(long)]
    command: Option<String>,
    /// Kill a --command still running after this long and send an error reply (`error=timed
    /// out after 5s`), e.g. `500ms`, `5s` [default: no limit].
    #[arg(long, value_name = "DURATION", requires = "command", value_parser = humantime::parse_duration)]
    command_timeout: Option<Duration>,
    /// Join this queue group, so that several responders share the requests.
    #[arg(long, value_name = "GROUP")]
    queue: Option<String>,
    /// Exit after answering this many requests (error replies included).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    count: Option<u64>,
}

/// Sends one request and prints the reply's payload.
pub(crate) async fn cmd_req(global: &Global, args: ReqArgs) -> Result<()> {
    let client = connect(global).await?;
    let reply = match client
        .request(&args.topic, &args.payload, args.timeout)
        .await
    {
        Ok(r) => r,
        Err(Error::Timeout) => bail!(
            "no reply to {} within {}",
            args.topic,
            humantime::format_duration(args.timeout)
        ),
        Err(e) => {
            return Err(anyhow::Error::new(e).context(format!("request to {} failed", args.topic)));
        }
    };
    let mut out = std::io::stdout().lock();
    out.write_all(&reply.payload())
        .and_then(|()| out.write_all(b"\n"))
        .and_then(|()| out.flush())
        .context("cannot write to stdout")?;
    drop(out);
    client.close().await.ok();
    // An error reply (`brokerctl reply` marks one with an `error` header) is printed like any
    // other, and the exit code says it was one, so that a script can tell.
    if let Some(reason) = reply.headers().get(ERROR_HEADER) {
        bail!("the responder answered with an error: {reason}");
    }
    Ok(())
}

/// Answers requests until interrupted or `--count` is reached. A request without a reply-to is
/// skipped with a note; a failing command is answered with an error reply and logged.
pub(crate) async fn cmd_reply(global: &Global, args: ReplyArgs) -> Result<()> {
    let client = connect(global).await?;
    let mut requests = match &args.queue {
        Some(group) => client.subscribe_queue(&args.filter, group).await,
        None => client.subscribe(&args.filter).await,
    }
    .with_context(|| format!("cannot subscribe to {}", args.filter))?;
    note(format_args!("answering requests on {}", args.filter));
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    let (mut answered, mut failed) = (0u64, 0u64);
    while args.count.is_none_or(|n| answered < n) {
        let req = tokio::select! {
            biased;
            _ = &mut ctrl_c => break,
            m = requests.next() => match m {
                Some(m) => m,
                None => bail!("the connection to the broker closed"),
            },
        };
        let Some(reply_to) = req.reply() else {
            note(format_args!("{}: no reply-to, skipped", req.topic()));
            continue;
        };
        if !answer(&client, &args, &req, reply_to).await? {
            failed += 1;
        }
        answered += 1;
    }
    client.close().await.ok();
    if failed == 0 {
        note(format_args!("answered {answered} requests"));
    } else {
        note(format_args!(
            "answered {answered} requests ({failed} with an error reply)"
        ));
    }
    Ok(())
}

/// Answers one request on `reply_to`: the fixed payload or the command's output, or an error
/// reply when the command fails or its output is too large to send. Returns whether the answer
/// was a success.
///
/// # Errors
/// Only what ends `reply`: the reply cannot be sent at all (the connection is gone).
async fn answer(client: &Client, args: &ReplyArgs, req: &Message, reply_to: &str) -> Result<bool> {
    let output = match &args.command {
        Some(cmd) => run_command(cmd, &req.payload(), args.command_timeout)
            .await
            .map_err(|failure| ErrorReply::command(cmd, &failure)),
        None => Ok(args.payload.clone().unwrap_or_default().into_bytes()),
    };
    let error = match output {
        Ok(payload) => match client.publish(reply_to, payload).await {
            Ok(()) => return Ok(true),
            // Too large for the broker: the requester hears why instead of waiting.
            Err(e @ Error::PayloadTooLarge { .. }) => ErrorReply::unsent(&e),
            Err(e) => return Err(reply_failed(e, reply_to)),
        },
        Err(error) => error,
    };
    note(format_args!(
        "{}: {}; sent an error reply to {reply_to}",
        req.topic(),
        error.log
    ));
    client
        .publish(reply_to, error.payload())
        .header(ERROR_HEADER, error.reason.as_str())
        .await
        .map_err(|e| reply_failed(e, reply_to))?;
    Ok(false)
}

/// A reply saying that a request could not be answered, and the line logged for it.
#[derive(Debug)]
struct ErrorReply {
    /// What could not be done: the start of the payload.
    what: &'static str,
    /// Why, without the command line (the requester did not choose it): the `error` header's
    /// value and the rest of the payload.
    reason: String,
    /// The line for this tool's stderr.
    log: String,
}

impl ErrorReply {
    /// The command `cmd` failed.
    fn command(cmd: &str, failure: &Failure) -> ErrorReply {
        ErrorReply {
            what: "command failed",
            reason: failure.to_string(),
            log: format!("command {cmd:?} failed: {failure}"),
        }
    }

    /// The answer could not be sent.
    fn unsent(e: &Error) -> ErrorReply {
        ErrorReply {
            what: "reply not sent",
            reason: e.to_string(),
            log: format!("reply not sent: {e}"),
        }
    }

    /// The payload: `command failed: exit status 3`.
    fn payload(&self) -> String {
        format!("{}: {}", self.what, self.reason)
    }
}

/// The error that ends `reply` when a reply cannot be sent.
fn reply_failed(e: Error, reply_to: &str) -> anyhow::Error {
    anyhow::Error::new(e).context(format!("cannot send the reply to {reply_to}"))
}

/// Why a command produced no reply.
#[derive(Debug)]
enum Failure {
    /// `sh` could not be started.
    Spawn(std::io::Error),
    /// Waiting for it or reading its output failed.
    Wait(std::io::Error),
    /// It ran past `--command-timeout` and was killed.
    TimedOut(Duration),
    /// It ended unsuccessfully: a non-zero exit or a signal.
    Status(ExitStatus),
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Failure::Spawn(e) => write!(f, "cannot start it: {e}"),
            Failure::Wait(e) => write!(f, "cannot read its output: {e}"),
            Failure::TimedOut(d) => write!(f, "timed out after {}", humantime::format_duration(*d)),
            Failure::Status(status) => write_status(f, *status),
        }
    }
}

/// `exit status 3`, `killed by signal 9`, or the platform's own words.
fn write_status(f: &mut fmt::Formatter<'_>, status: ExitStatus) -> fmt::Result {
    if let Some(code) = status.code() {
        return write!(f, "exit status {code}");
    }
    #[cfg(unix)]
    {
        use std::os::unix::process::ExitStatusExt;
        if let Some(signal) = status.signal() {
            return write!(f, "killed by signal {signal}");
        }
    }
    write!(f, "{status}")
}

/// Runs `cmd` through `sh -c` with `input` on stdin; returns its stdout if it succeeds within
/// `limit`. Input is written while the output is read, so neither pipe can fill and stall the
/// other. A command past its limit is killed (its future is dropped, with `kill_on_drop`).
async fn run_command(cmd: &str, input: &[u8], limit: Option<Duration>) -> Result<Vec<u8>, Failure> {
    let mut child = tokio::process::Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(Failure::Spawn)?;
    let stdin = child.stdin.take();
    let feed = async move {
        if let Some(mut stdin) = stdin {
            // A command that does not read its input is fine: ignore a closed pipe. Dropping
            // `stdin` at the end of this block is the end of its input.
            let _ = stdin.write_all(input).await;
        }
    };
    let run = async move { tokio::join!(feed, child.wait_with_output()).1 };
    let out = match limit {
        Some(limit) => tokio::time::timeout(limit, run)
            .await
            .map_err(|_| Failure::TimedOut(limit))?,
        None => run.await,
    }
    .map_err(Failure::Wait)?;
    if out.status.success() {
        Ok(out.stdout)
    } else {
        Err(Failure::Status(out.status))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `cmd` on a current-thread runtime, as `brokerctl` does.
    fn run(cmd: &str, input: &[u8], limit: Option<Duration>) -> Result<Vec<u8>, Failure> {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(run_command(cmd, input, limit))
    }

    #[test]
    fn a_successful_command_answers_with_its_stdout() {
        assert_eq!(run("tr a-z A-Z", b"shout", None).unwrap(), b"SHOUT");
    }

    #[test]
    fn failures_name_the_exit_status_or_the_signal() {
        let exit = run("exit 3", b"", None).unwrap_err();
        assert_eq!(exit.to_string(), "exit status 3");
        let killed = run("kill -9 $$", b"", None).unwrap_err();
        assert_eq!(killed.to_string(), "killed by signal 9");
    }

    #[test]
    fn a_command_past_its_limit_times_out() {
        let slow = run("sleep 10", b"", Some(Duration::from_millis(50))).unwrap_err();
        assert_eq!(slow.to_string(), "timed out after 50ms");
    }

    #[test]
    fn a_large_input_does_not_stall_a_command_that_writes_as_it_reads() {
        let input = vec![b'x'; 1 << 20];
        assert_eq!(run("cat", &input, None).unwrap().len(), input.len());
    }

    #[test]
    fn error_replies_leave_out_the_command_line() {
        let failure = run("exit 3", b"", None).unwrap_err();
        let reply = ErrorReply::command("exit 3", &failure);
        assert_eq!(reply.reason, "exit status 3");
        assert_eq!(reply.payload(), "command failed: exit status 3");
        assert_eq!(reply.log, "command \"exit 3\" failed: exit status 3");
    }
}
