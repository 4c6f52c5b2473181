//! `brokerctl`, the command-line tool for brokerd: publish messages, watch subscriptions, and
//! measure a broker under load (`bench`, in [`bench`]).
//!
//! Each subcommand is one variant of [`Command`] and one `cmd_*` function; the larger ones live
//! in files of their own (`sub`, `consume`, `bench`, `rpc`, `streams`, and the monitoring views
//! `stats`, `conns`, `top`).
//! Everything here is a thin layer over `brokerd-client`: this file parses arguments, publishes
//! (`pub`, reading stdin) and maps failures to exit codes (0 success, 1 runtime error reported
//! as `brokerctl: <error>`, 2 usage error from clap). It does not retry, reconnect or buffer
//! beyond what the client already does.
//!
//! Output goes to stdout (messages only); progress, summaries and errors go to stderr, so
//! `brokerctl sub ... | tool` sees nothing but messages.

// The workspace warns on unwrap/expect; unit tests may use them.
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used))]

use anyhow::{Context, Result, bail};
use brokerd_client::{Client, ConnectOptions, Headers};
use clap::{Args, Parser, Subcommand};
use std::io::{self, IsTerminal, Write};
use std::process::ExitCode;
use tokio::io::AsyncBufReadExt;

#[cfg(feature = "mimalloc")]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

mod bench;
mod conns;
mod consume;
mod human;
mod rpc;
mod stats;
mod streams;
mod sub;
mod top;
mod tty;

/// Command-line arguments.
#[derive(Debug, Parser)]
#[command(name = "brokerctl", version, about = "Command-line tool for brokerd")]
struct Cli {
    /// Options every subcommand shares.
    #[command(flatten)]
    global: Global,
    /// What to do.
    #[command(subcommand)]
    command: Command,
}

/// Options every subcommand shares.
#[derive(Debug, Args)]
struct Global {
    /// Broker address, HOST:PORT.
    #[arg(
        long,
        global = true,
        env = "BROKERD_SERVER",
        default_value = "127.0.0.1:7654"
    )]
    server: String,
    /// Client name shown in the broker's logs.
    #[arg(long, global = true, default_value = "brokerctl")]
    name: String,
    /// The broker's shared token (prefer BROKERD_TOKEN: a flag shows in process listings).
    #[arg(long, global = true, env = "BROKERD_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Authenticate as this user; the password comes from --password, BROKERD_PASSWORD, or a
    /// prompt on the terminal.
    #[arg(long, global = true, env = "BROKERD_USER")]
    user: Option<String>,
    /// The user's password (prefer BROKERD_PASSWORD or the prompt: a flag shows in process
    /// listings).
    #[arg(long, global = true, env = "BROKERD_PASSWORD", hide_env_values = true)]
    password: Option<String>,
    /// Prefix of the inbox replies to `req` arrive on, for a user allowed only its own inbox.
    #[arg(
        long,
        global = true,
        env = "BROKERD_INBOX_PREFIX",
        default_value = "_INBOX"
    )]
    inbox_prefix: String,
    /// Connect over TLS, trusting the CA certificates in this PEM file.
    #[arg(long, global = true, env = "BROKERD_TLS_CA", value_name = "PEM")]
    tls_ca: Option<std::path::PathBuf>,
    /// The name the server's certificate must hold [default: the host of --server].
    #[arg(
        long,
        global = true,
        env = "BROKERD_TLS_SERVER_NAME",
        requires = "tls_ca"
    )]
    tls_server_name: Option<String>,
    /// A client certificate chain (PEM) for a server that asks for one (mutual TLS).
    #[arg(long, global = true, env = "BROKERD_TLS_CERT", value_name = "PEM")]
    tls_cert: Option<std::path::PathBuf>,
    /// The client certificate's private key (PEM).
    #[arg(long, global = true, env = "BROKERD_TLS_KEY", value_name = "PEM")]
    tls_key: Option<std::path::PathBuf>,
    /// The TLS options built from the flags above, once.
    #[arg(skip)]
    tls: Option<brokerd_client::TlsOptions>,
}

impl Global {
    /// Builds the TLS options once, so that every connection (a bench opens several) shares
    /// them.
    fn resolve_tls(&mut self) -> Result<()> {
        let Some(ca) = &self.tls_ca else {
            if self.tls_cert.is_some() || self.tls_key.is_some() || self.tls_server_name.is_some() {
                bail!("--tls-cert, --tls-key and --tls-server-name need --tls-ca");
            }
            return Ok(());
        };
        if self.tls_cert.is_some() != self.tls_key.is_some() {
            bail!("--tls-cert and --tls-key go together");
        }
        let name = match &self.tls_server_name {
            Some(n) => n.clone(),
            None => server_host(&self.server).to_string(),
        };
        let tls = match (&self.tls_cert, &self.tls_key) {
            (Some(cert), Some(key)) => {
                brokerd_client::TlsOptions::with_client_certificate(ca, &name, cert, key)
            }
            _ => brokerd_client::TlsOptions::new(ca, &name),
        };
        self.tls = Some(tls.context("cannot set up TLS")?);
        Ok(())
    }

    /// Asks for the password on the terminal if a user was named without one.
    fn resolve_password(&mut self) -> Result<()> {
        if self.token.is_some() && self.user.is_some() {
            bail!("--token and --user are two ways to authenticate: give one");
        }
        if self.user.is_some() && self.password.is_none() {
            if !std::io::stdin().is_terminal() {
                bail!(
                    "--user needs a password: set BROKERD_PASSWORD, or run on a terminal to be asked"
                );
            }
            let prompt = format!("password for {}: ", self.user.as_deref().unwrap_or(""));
            self.password =
                Some(rpassword::prompt_password(prompt).context("cannot read the password")?);
        }
        Ok(())
    }

    /// Connection options with this client `name` and the credentials given.
    fn options(&self, name: impl Into<String>) -> ConnectOptions {
        let mut options = ConnectOptions::new(name).inbox_prefix(self.inbox_prefix.clone());
        if let Some(tls) = &self.tls {
            options = options.tls(tls.clone());
        }
        match (&self.token, &self.user) {
            (Some(token), _) => options.token(token.clone()),
            (None, Some(user)) => {
                options.user_password(user.clone(), self.password.clone().unwrap_or_default())
            }
            (None, None) => options,
        }
    }
}

/// The subcommands, one function each.
#[derive(Debug, Subcommand)]
enum Command {
    /// Publish a message, or one message per line of stdin.
    Pub(PubArgs),
    /// Subscribe to a filter and print matching messages.
    Sub(sub::SubArgs),
    /// Measure a running broker: throughput, fan-out, many topics, latency.
    Bench(bench::BenchArgs),
    /// Send a request and print the first reply (exit 1 if it is an error reply: one with an
    /// `error` header, as `reply --command` sends when its command fails).
    Req(rpc::ReqArgs),
    /// Answer requests with a fixed payload or a command's output.
    Reply(rpc::ReplyArgs),
    /// Show the broker's statistics: traffic, drops, and the connections dropping the most.
    Stats(stats::StatsArgs),
    /// List the connections: lag, rates and drops, sorted as asked.
    Conns(conns::ConnsArgs),
    /// Watch the connections live, sorted by rate, pending bytes or drops (q quits).
    Top(top::TopArgs),
    /// Manage streams, which store the messages published to their filters: add, ls, info,
    /// purge, rm.
    Stream(streams::StreamArgs),
    /// Join a stream's durable consumer: print each message it hands out and acknowledge it;
    /// processes joining the same consumer share its messages.
    Consume(consume::ConsumeArgs),
}

/// Arguments of `brokerctl pub`.
#[derive(Debug, Args)]
struct PubArgs {
    /// Topic to publish to.
    topic: String,
    /// Payload; when absent (and without --file), each line of stdin (without its newline) is
    /// one message.
    #[arg(conflicts_with = "file")]
    payload: Option<String>,
    /// Publish the whole contents of this file as one message (`-` for all of stdin).
    #[arg(long, value_name = "PATH")]
    file: Option<std::path::PathBuf>,
    /// Publish each payload this many times.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..))]
    count: u64,
    /// Wait for the broker's acknowledgement of each message and report its delivery count, and
    /// the stream and sequence when a stream stored it.
    #[arg(long)]
    ack: bool,
    /// Like --ack, and fail (exit 1) when no stream stored the message.
    #[arg(long)]
    stored: bool,
    /// Give each message this id (the `Brokerd-Msg-Id` header): a stream stores an id once
    /// within its duplicate window, so a publish sent again is reported as a duplicate.
    #[arg(long, value_name = "ID")]
    msg_id: Option<String>,
    /// Add a header; repeatable. Keys may repeat.
    #[arg(long = "header", value_name = "KEY=VALUE", value_parser = parse_header)]
    header: Vec<(String, String)>,
    /// Reply-to topic carried with each message.
    #[arg(long, value_name = "TOPIC")]
    reply: Option<String>,
}

fn main() -> ExitCode {
    // Parsing comes before the runtime so usage errors exit 2 (clap's code) without starting one.
    let mut cli = Cli::parse();
    if let Err(e) = cli
        .global
        .resolve_password()
        .and_then(|()| cli.global.resolve_tls())
    {
        return fail(&e);
    }
    let threads = match &cli.command {
        Command::Bench(b) => b.threads(),
        _ => 1,
    };
    let mut builder = if threads > 1 {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.worker_threads(threads);
        b
    } else {
        tokio::runtime::Builder::new_current_thread()
    };
    let runtime = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => return fail(&anyhow::Error::new(e).context("cannot start the runtime")),
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(&e),
    }
}

/// The host part of `HOST:PORT` (brackets removed from an IPv6 address).
fn server_host(server: &str) -> &str {
    let host = server.rsplit_once(':').map_or(server, |(h, _)| h);
    host.trim_start_matches('[').trim_end_matches(']')
}

/// Reports `e` on stderr and returns exit code 1.
fn fail(e: &anyhow::Error) -> ExitCode {
    note(format_args!("brokerctl: {}", error_chain(e)));
    ExitCode::FAILURE
}

/// `e` and its causes joined by `: `, skipping a cause whose text its parent already ends with
/// (some error types print their source in their own message and also return it as `source()`).
fn error_chain(e: &anyhow::Error) -> String {
    let mut text = String::new();
    let mut last = String::new();
    for cause in e.chain() {
        let msg = cause.to_string();
        if !last.is_empty() && last.ends_with(&msg) {
            continue;
        }
        if !text.is_empty() {
            text.push_str(": ");
        }
        text.push_str(&msg);
        last = msg;
    }
    text
}

/// Writes one line to stderr. A closed stderr is ignored: there is nowhere left to report it.
fn note(line: std::fmt::Arguments<'_>) {
    let _ = writeln!(io::stderr().lock(), "{line}");
}

/// Runs the chosen subcommand.
async fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Pub(args) => cmd_pub(&cli.global, args).await,
        Command::Sub(args) => sub::cmd_sub(&cli.global, args).await,
        Command::Bench(args) => bench::cmd_bench(&cli.global, args).await,
        Command::Req(args) => rpc::cmd_req(&cli.global, args).await,
        Command::Reply(args) => rpc::cmd_reply(&cli.global, args).await,
        Command::Stats(args) => stats::cmd_stats(&cli.global, args).await,
        Command::Conns(args) => conns::cmd_conns(&cli.global, args).await,
        Command::Top(args) => top::cmd_top(&cli.global, args).await,
        Command::Stream(args) => streams::cmd_stream(&cli.global, args).await,
        Command::Consume(args) => consume::cmd_consume(&cli.global, args).await,
    }
}

/// Connects to the broker named by the global options.
async fn connect(global: &Global) -> Result<Client> {
    Client::connect(global.server.as_str(), global.options(global.name.clone()))
        .await
        .with_context(|| format!("cannot connect to {}", global.server))
}

/// `brokerctl pub`: publishes, then closes the connection, which returns only once the broker has
/// processed every message, so the process never exits with messages still in flight.
async fn cmd_pub(global: &Global, args: PubArgs) -> Result<()> {
    let client = connect(global).await?;
    let headers: Option<Headers> =
        (!args.header.is_empty()).then(|| args.header.iter().cloned().collect());
    let publisher = Publisher {
        client: &client,
        args: &args,
        headers: headers.as_ref(),
    };
    let mut published: u64 = 0;
    match (&args.payload, &args.file) {
        (Some(payload), _) => {
            for _ in 0..args.count {
                publisher.publish(payload.as_bytes()).await?;
                published += 1;
            }
        }
        (None, Some(path)) => {
            let body = if path.as_os_str() == "-" {
                let mut all = Vec::new();
                tokio::io::AsyncReadExt::read_to_end(&mut tokio::io::stdin(), &mut all)
                    .await
                    .context("cannot read stdin")?;
                all
            } else {
                // A file given on the command line, read once before connecting's work starts.
                std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?
            };
            for _ in 0..args.count {
                publisher.publish(&body).await?;
                published += 1;
            }
        }
        (None, None) => {
            let mut stdin = tokio::io::BufReader::new(tokio::io::stdin());
            let mut line = Vec::new();
            loop {
                line.clear();
                let n = stdin
                    .read_until(b'\n', &mut line)
                    .await
                    .context("cannot read stdin")?;
                if n == 0 {
                    break;
                }
                for _ in 0..args.count {
                    publisher.publish(strip_newline(&line)).await?;
                    published += 1;
                }
            }
        }
    }
    // The flush returns once the broker has processed every message, so every refusal of a
    // publish sent without acknowledgement has arrived by then.
    client
        .flush()
        .await
        .context("connection closed before the broker confirmed the messages")?;
    let (refusals, refused) = client.take_refusals();
    client.close().await.ok();
    if refused > 0 {
        for e in refusals.iter().take(5) {
            note(format_args!("brokerctl: refused: {e}"));
        }
        if refused > 5 {
            note(format_args!(
                "brokerctl: ... and {} more refusals",
                refused - 5
            ));
        }
        bail!(
            "the broker refused {refused} of {published} {} to {}",
            plural(published, "message", "messages"),
            args.topic
        );
    }
    note(format_args!(
        "published {published} {} to {}",
        plural(published, "message", "messages"),
        args.topic
    ));
    Ok(())
}

/// What every publish of one `brokerctl pub` run shares.
struct Publisher<'a> {
    client: &'a Client,
    args: &'a PubArgs,
    headers: Option<&'a Headers>,
}

impl Publisher<'_> {
    /// Publishes one message as the arguments ask: acknowledged or not, with headers and reply-to.
    async fn publish(&self, payload: &[u8]) -> Result<()> {
        let mut publish = self.client.publish(self.args.topic.as_str(), payload);
        if let Some(reply) = self.args.reply.as_deref() {
            publish = publish.reply_to(reply);
        }
        if let Some(headers) = self.headers {
            publish = publish.headers(headers);
        }
        if let Some(id) = &self.args.msg_id {
            publish = publish.msg_id(id.as_str());
        }
        if !self.args.ack && !self.args.stored {
            return publish.await.map_err(|e| self.blame(e));
        }
        match publish.stored().await {
            Ok(s) => note(format_args!(
                "{}",
                stored_line(&s.stream, s.seq, s.duplicate, s.delivered)
            )),
            Err(brokerd_client::Error::NotStored { delivered, .. }) if !self.args.stored => {
                note(format_args!(
                    "delivered to {delivered} {}",
                    plural(delivered.into(), "subscriber", "subscribers")
                ));
            }
            Err(e) => return Err(self.blame(e)),
        }
        Ok(())
    }

    /// Names the argument an error is about: the reply-to, or the topic.
    fn blame(&self, e: brokerd_client::Error) -> anyhow::Error {
        let context = match (&e, &self.args.reply) {
            (brokerd_client::Error::InvalidReplyTo(_), Some(reply)) => {
                format!("cannot publish with --reply {reply}")
            }
            _ => format!("cannot publish to {}", self.args.topic),
        };
        anyhow::Error::new(e).context(context)
    }
}

/// What `pub --ack` says about a message a stream stored.
fn stored_line(stream: &str, seq: u64, duplicate: bool, delivered: u32) -> String {
    if duplicate {
        format!(
            "duplicate: {stream} already stored this message id as seq {seq}; nothing stored or delivered"
        )
    } else {
        format!(
            "stored in {stream} as seq {seq}; delivered to {delivered} {}",
            plural(delivered.into(), "subscriber", "subscribers")
        )
    }
}

/// Resolves on SIGTERM (Unix) or never.
async fn terminated() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        if let Ok(mut term) = signal(SignalKind::terminate()) {
            term.recv().await;
            return;
        }
    }
    std::future::pending::<()>().await;
}

/// `line` without its trailing `\n` or `\r\n`.
fn strip_newline(line: &[u8]) -> &[u8] {
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    line.strip_suffix(b"\r").unwrap_or(line)
}

/// Parses `KEY=VALUE`, splitting at the first `=`.
fn parse_header(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("expected KEY=VALUE, got {s:?}")),
    }
}

/// `one` when `n` is 1, else `many`.
fn plural(n: u64, one: &'static str, many: &'static str) -> &'static str {
    if n == 1 { one } else { many }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn newline_stripping() {
        assert_eq!(strip_newline(b"a\n"), b"a");
        assert_eq!(strip_newline(b"a\r\n"), b"a");
        assert_eq!(strip_newline(b"a"), b"a");
        assert_eq!(strip_newline(b"\n"), b"");
    }

    #[test]
    fn header_parsing() {
        assert_eq!(parse_header("k=v=w"), Ok(("k".into(), "v=w".into())));
        assert_eq!(parse_header("k="), Ok(("k".into(), String::new())));
        assert!(parse_header("=v").is_err());
        assert!(parse_header("kv").is_err());
    }

    #[test]
    fn error_chain_skips_repeated_sources() {
        let io = io::Error::new(io::ErrorKind::ConnectionRefused, "refused");
        let e = anyhow::Error::new(brokerd_client::Error::Io(io)).context("cannot connect to x");
        assert_eq!(error_chain(&e), "cannot connect to x: i/o error: refused");
    }

    #[test]
    fn pub_takes_a_message_id_and_stored() {
        let r = Cli::try_parse_from(["brokerctl", "pub", "t", "p", "--msg-id", "m1", "--stored"]);
        assert!(r.is_ok());
    }

    #[test]
    fn stored_lines() {
        assert_eq!(
            stored_line("ORDERS", 42, false, 1),
            "stored in ORDERS as seq 42; delivered to 1 subscriber"
        );
        assert!(stored_line("ORDERS", 42, true, 0).starts_with("duplicate: ORDERS already stored"));
    }

    #[test]
    fn ack_combines_with_headers() {
        let r = Cli::try_parse_from(["brokerctl", "pub", "t", "p", "--ack", "--header", "k=v"]);
        assert!(r.is_ok());
    }
}
