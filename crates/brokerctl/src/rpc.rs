//! `brokerctl req` and `brokerctl reply`: request/reply from a terminal.
//!
//! `req` sends one request and prints the first reply's payload; `reply` answers requests on a
//! filter, either with a fixed payload or with the output of a shell command that reads the
//! request's payload on its standard input.

use crate::{Global, connect, note};
use anyhow::{Context, Result, bail};
use brokerd_client::Error;
use clap::Args;
use std::io::Write;
use std::time::Duration;

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
    /// Shell command run per request: the request payload on its stdin, its stdout the reply.
    #[arg(long)]
    command: Option<String>,
    /// Join this queue group, so that several responders share the requests.
    #[arg(long, value_name = "GROUP")]
    queue: Option<String>,
    /// Exit after answering this many requests.
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
    client.close().await.ok();
    Ok(())
}

/// Answers requests until interrupted or `--count` is reached.
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
    let mut answered = 0u64;
    while args.count.is_none_or(|n| answered < n) {
        let req = tokio::select! {
            biased;
            _ = &mut ctrl_c => break,
            m = requests.next() => match m {
                Some(m) => m,
                None => bail!("the connection to the broker closed"),
            },
        };
        if req.reply().is_none() {
            note(format_args!("{}: no reply-to, ignored", req.topic()));
            continue;
        }
        let answer = match &args.command {
            Some(cmd) => run_command(cmd, &req.payload()).await?,
            None => args.payload.clone().unwrap_or_default().into_bytes(),
        };
        req.respond(answer).await.context("cannot send the reply")?;
        answered += 1;
    }
    client.close().await.ok();
    note(format_args!("answered {answered} requests"));
    Ok(())
}

/// Runs `cmd` through `sh -c` with `input` on stdin; returns its stdout.
async fn run_command(cmd: &str, input: &[u8]) -> Result<Vec<u8>> {
    let cmd = cmd.to_string();
    let input = input.to_vec();
    tokio::task::spawn_blocking(move || -> Result<Vec<u8>> {
        use std::process::{Command, Stdio};
        let mut child = Command::new("sh")
            .arg("-c")
            .arg(&cmd)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .with_context(|| format!("cannot run {cmd:?}"))?;
        if let Some(mut stdin) = child.stdin.take() {
            // A command that does not read its input is fine: ignore a closed pipe.
            let _ = stdin.write_all(&input);
        }
        let out = child.wait_with_output().context("command failed")?;
        if !out.status.success() {
            bail!("{cmd:?} exited with {}", out.status);
        }
        Ok(out.stdout)
    })
    .await
    .context("command task failed")?
}
