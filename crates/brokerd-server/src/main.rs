//! The `brokerd` binary: flags, logging, the file descriptor limit, signals (SIGTERM and SIGINT
//! shut down, SIGHUP reloads), `--check-config`, `--health`, then [`brokerd_server::Server`].

use brokerd_server::config::FD_HEADROOM;
mod allocator;

use brokerd_server::config::LogFormat;
use brokerd_server::{Config, ConfigError, HEALTH_CHECK_NAME, ReloadHandle, Server};
use clap::Parser;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Registry};

#[cfg(feature = "mimalloc")]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// brokerd: a publish/subscribe message broker.
#[derive(Debug, Clone, Parser)]
#[command(name = "brokerd", version, about)]
struct Args {
    /// Address to listen on, IP or host name with a port [default: 127.0.0.1:7654, or the
    /// config file's `listen`].
    #[arg(long, env = "BROKERD_LISTEN", value_name = "HOST:PORT")]
    listen: Option<String>,
    /// Where the HTTP monitoring endpoints and web console listen, or "off" [default:
    /// 127.0.0.1:7655, or the config file's `http`].
    #[arg(long, env = "BROKERD_HTTP", value_name = "HOST:PORT|off")]
    http: Option<String>,
    /// Directory where streams keep their files [default: ./brokerd-data, or the config file's
    /// `data_dir`].
    #[arg(long, env = "BROKERD_DATA_DIR", value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// TOML configuration file (see config/brokerd.toml); without one, built-in defaults apply.
    #[arg(long, short = 'c', env = "BROKERD_CONFIG")]
    config: Option<PathBuf>,
    /// Log filter: off, error, warn, info, debug, trace, or directives such as
    /// "info,brokerd_server=debug" [default: info]. RUST_LOG, when set, wins.
    #[arg(long, env = "BROKERD_LOG_LEVEL")]
    log_level: Option<String>,
    /// Log lines as text (colour only on a terminal, none with NO_COLOR) or one JSON object
    /// per line [default: text].
    #[arg(long, env = "BROKERD_LOG_FORMAT", value_enum)]
    log_format: Option<LogFormat>,
    /// Print the configuration in force, as TOML, and exit.
    #[arg(long)]
    print_config: bool,
    /// Validate the configuration (file, environment and flags) and exit: 0 when it is valid,
    /// 2 naming the key and the values when it is not.
    #[arg(long)]
    check_config: bool,
    /// Ask the broker this configuration describes whether it is serving, and exit 0 if it
    /// answers the handshake within 3 s, 1 if not (for container health checks).
    #[arg(long)]
    health: bool,
    /// Require clients to present this token (prefer BROKERD_AUTH_TOKEN: a flag shows in
    /// process listings).
    #[arg(long, env = "BROKERD_AUTH_TOKEN", hide_env_values = true)]
    auth_token: Option<String>,
    /// Accept clients without credentials on an address other hosts can reach, when no
    /// authentication is configured.
    #[arg(long, env = "BROKERD_ALLOW_ANONYMOUS")]
    allow_anonymous: bool,
    /// Serve TLS with this certificate chain (PEM); with --tls-key.
    #[arg(
        long,
        env = "BROKERD_TLS_CERT",
        value_name = "PEM",
        requires = "tls_key"
    )]
    tls_cert: Option<PathBuf>,
    /// The TLS certificate's private key (PEM).
    #[arg(
        long,
        env = "BROKERD_TLS_KEY",
        value_name = "PEM",
        requires = "tls_cert"
    )]
    tls_key: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Clone, clap::Subcommand)]
enum Command {
    /// Read a password from the terminal (asked twice) or from standard input (one line), and
    /// print its argon2id hash for `password_hash` in [[auth.users]].
    HashPassword,
}

/// Writes a line to stderr, ignoring a failure: stderr may be a closed pipe, and nothing that
/// goes wrong with it may stop the broker or change its exit code.
macro_rules! report {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), $($arg)*);
    }};
}

/// The configuration: the file (or the defaults), then the environment and flags, validated.
/// The same function serves start-up and every reload, so a reload keeps what flags set.
fn load(args: &Args) -> Result<Config, ConfigError> {
    let mut config = match &args.config {
        Some(path) => Config::from_file(path)?,
        None => Config::default(),
    };
    if let Some(listen) = &args.listen {
        config.listen = brokerd_server::config::resolve_address(listen).map_err(|message| {
            ConfigError::Invalid {
                key: "listen",
                message: format!("--listen / BROKERD_LISTEN: {message}"),
            }
        })?;
    }
    if let Some(http) = &args.http {
        config.http =
            brokerd_server::config::parse_monitoring_address(http).map_err(|message| {
                ConfigError::Invalid {
                    key: "http",
                    message: format!("--http / BROKERD_HTTP: {message}"),
                }
            })?;
    }
    if let Some(dir) = &args.data_dir {
        config.data_dir = dir.clone();
    }
    if let Some(level) = &args.log_level {
        config.log_level = level.clone();
    }
    if let Some(format) = args.log_format {
        config.log_format = format;
    }
    if let Some(token) = &args.auth_token {
        config.auth.token = Some(token.clone());
    }
    if args.allow_anonymous {
        config.auth.allow_anonymous = true;
    }
    if let (Some(cert), Some(key)) = (&args.tls_cert, &args.tls_key) {
        config.tls.cert = Some(cert.clone());
        config.tls.key = Some(key.clone());
    }
    // Flags and environment may have changed what the file said.
    config.validate()?;
    Ok(config)
}

/// Replaces the log filter in force; `RUST_LOG`, when set, is never replaced.
type LogFilterHandle = tracing_subscriber::reload::Handle<EnvFilter, Registry>;

fn main() -> ExitCode {
    let args = Args::parse();
    if let Some(Command::HashPassword) = args.command {
        return hash_password();
    }
    let config = match load(&args) {
        Ok(c) => c,
        Err(e) => {
            report!("brokerd: {e}");
            return ExitCode::from(2);
        }
    };
    // The certificate files are part of the configuration: one that cannot be used is a
    // configuration error (exit 2, which the systemd unit does not restart), found by
    // `--check-config` too, not a failure to listen later.
    if let Err(e) = brokerd_server::tls::TlsState::load(&config.tls) {
        report!("brokerd: invalid config value for `tls.cert`/`tls.key`: {e}");
        return ExitCode::from(2);
    }
    if args.check_config {
        let source = args
            .config
            .as_ref()
            .map_or("no file: the built-in defaults".to_string(), |p| {
                p.display().to_string()
            });
        println!("brokerd: configuration OK ({source}, with flags and environment)");
        return ExitCode::SUCCESS;
    }
    if args.print_config {
        print!("{}", config.to_toml());
        return ExitCode::SUCCESS;
    }
    if args.health {
        return health(&config);
    }
    let from_env = std::env::var("RUST_LOG").ok().filter(|v| !v.is_empty());
    let filter = match EnvFilter::try_new(from_env.as_deref().unwrap_or(&config.log_level)) {
        Ok(f) => f,
        Err(e) => {
            report!("brokerd: invalid log filter: {e}");
            return ExitCode::from(2);
        }
    };
    let log_filter = init_logging(filter, config.log_format);
    let log_filter = from_env.is_none().then_some(log_filter);
    raise_fd_limit(&config);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .on_thread_park(allocator::on_park)
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            report!("brokerd: cannot start runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(serve(config, args, log_filter)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            report!("brokerd: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Logs go to stderr, so stdout carries only what was asked for (`--print-config`). Colour only
/// for a person at a terminal, and never with `NO_COLOR` set; journald, files and pipes get
/// plain text. A failed write is dropped, never reported (reporting it would write to stderr
/// again).
fn init_logging(filter: EnvFilter, format: LogFormat) -> LogFilterHandle {
    let (filter, handle) = tracing_subscriber::reload::Layer::new(filter);
    let no_color = std::env::var_os("NO_COLOR").is_some_and(|v| !v.is_empty());
    let ansi = std::io::stderr().is_terminal() && !no_color;
    let registry = tracing_subscriber::registry().with(filter);
    match format {
        LogFormat::Text => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .with_writer(QuietStderr)
                    .with_ansi(ansi)
                    .log_internal_errors(false),
            )
            .init(),
        LogFormat::Json => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .with_writer(QuietStderr)
                    .log_internal_errors(false),
            )
            .init(),
    }
    handle
}

/// Standard error that never fails: what cannot be written is dropped.
struct QuietStderr;

impl std::io::Write for QuietStderr {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let _ = std::io::stderr().write_all(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for QuietStderr {
    type Writer = QuietStderr;

    fn make_writer(&'a self) -> QuietStderr {
        QuietStderr
    }
}

/// `brokerd --health`: a handshake with the broker `config` describes, as the client named
/// [`HEALTH_CHECK_NAME`] (whose clean closes the broker logs at debug level, so a health check
/// every few seconds does not fill the log). With a token configured it authenticates; with
/// only users it checks that the port accepts connections. A TLS listener answers the plain
/// `HELLO` with `ERR 8` (it requires TLS), which also proves it is serving.
fn health(config: &Config) -> ExitCode {
    use brokerd_proto::{ErrorCode, Frame, Hello, PROTOCOL_VERSION, decode};
    use std::io::{Read, Write};
    let mut addr = config.listen;
    if addr.ip().is_unspecified() {
        addr.set_ip(match addr {
            std::net::SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
            std::net::SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
        });
    }
    let limit = std::time::Duration::from_secs(3);
    let fail = |why: String| {
        report!("brokerd: unhealthy: {addr}: {why}");
        ExitCode::FAILURE
    };
    let mut stream = match std::net::TcpStream::connect_timeout(&addr, limit) {
        Ok(s) => s,
        Err(e) => return fail(format!("cannot connect: {e}")),
    };
    if config.auth.token.is_none() && !config.auth.users.is_empty() {
        // Users only: a HELLO without credentials would count as a failed login from this
        // address, so an accepted connection is all this checks.
        println!("brokerd: healthy ({addr} accepts connections)");
        return ExitCode::SUCCESS;
    }
    let _ = stream.set_read_timeout(Some(limit));
    let _ = stream.set_write_timeout(Some(limit));
    let hello = Frame::Hello(Hello {
        req_id: 1,
        version: PROTOCOL_VERSION,
        no_echo: false,
        overflow: None,
        name: HEALTH_CHECK_NAME.into(),
        credentials: config
            .auth
            .token
            .clone()
            .map(brokerd_proto::Credentials::Token),
    });
    if let Err(e) = stream.write_all(&hello.to_bytes()) {
        return fail(format!("cannot send HELLO: {e}"));
    }
    let started = std::time::Instant::now();
    let mut buf = bytes::BytesMut::new();
    let mut chunk = [0u8; 4096];
    loop {
        match decode(&mut buf, 64 * 1024) {
            Ok(Some(Frame::Welcome(_))) => {
                println!("brokerd: healthy ({addr})");
                return ExitCode::SUCCESS;
            }
            Ok(Some(Frame::Err(e))) if e.code == ErrorCode::HandshakeRequired as u16 => {
                println!("brokerd: healthy ({addr} serves TLS)");
                return ExitCode::SUCCESS;
            }
            Ok(Some(other)) => return fail(format!("answered {other:?} instead of WELCOME")),
            Ok(None) => {}
            Err(e) => {
                return fail(format!(
                    "answered something that is not brokerd's protocol: {e}"
                ));
            }
        }
        if started.elapsed() > limit {
            return fail("no answer within 3 s".into());
        }
        match stream.read(&mut chunk) {
            Ok(0) => return fail("closed the connection without answering".into()),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) => return fail(format!("no answer: {e}")),
        }
    }
}

/// `brokerd hash-password`: the hash goes to stdout, prompts and errors to stderr.
fn hash_password() -> ExitCode {
    let password = if std::io::stdin().is_terminal() {
        let first = rpassword::prompt_password("password: ");
        let second = rpassword::prompt_password("again: ");
        match (first, second) {
            (Ok(a), Ok(b)) if a == b => a,
            (Ok(_), Ok(_)) => {
                report!("brokerd: the passwords differ");
                return ExitCode::from(2);
            }
            (Err(e), _) | (_, Err(e)) => {
                report!("brokerd: cannot read the password: {e}");
                return ExitCode::FAILURE;
            }
        }
    } else {
        let mut line = String::new();
        if let Err(e) = std::io::stdin().read_line(&mut line) {
            report!("brokerd: cannot read the password: {e}");
            return ExitCode::FAILURE;
        }
        line.trim_end_matches(['\n', '\r']).to_string()
    };
    if password.is_empty() {
        report!("brokerd: the password is empty");
        return ExitCode::from(2);
    }
    // A login with a longer password is refused before it is hashed: such a hash could never
    // be matched.
    if password.len() > brokerd_server::auth::MAX_SECRET {
        report!(
            "brokerd: the password is {} bytes; a login takes at most {}",
            password.len(),
            brokerd_server::auth::MAX_SECRET
        );
        return ExitCode::from(2);
    }
    match brokerd_server::auth::hash_password(&password) {
        Ok(hash) => {
            println!("{hash}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            report!("brokerd: cannot hash the password: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Raises the soft `RLIMIT_NOFILE` as far as the hard limit allows (a default soft limit of
/// 1,024 would stop accepts far below `limits.max_connections`), and warns when even that cannot
/// hold what the configured limits may open at once.
fn raise_fd_limit(config: &Config) {
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(soft) => match fd_limit_warning(config, soft) {
            Some(warning) => {
                tracing::warn!(limit = soft, needed = config.fds_needed(), "{warning}")
            }
            None => tracing::debug!(limit = soft, "file descriptor limit"),
        },
        Err(e) => {
            tracing::warn!(error = %e, "cannot raise the file descriptor limit (RLIMIT_NOFILE)")
        }
    }
}

/// The warning to log when a soft file descriptor limit of `soft` cannot hold every connection
/// and handshake the configuration allows, plus [`FD_HEADROOM`]; `None` when it can.
fn fd_limit_warning(config: &Config, soft: u64) -> Option<String> {
    let needed = config.fds_needed();
    (soft < needed).then(|| {
        format!(
            "file descriptor limit {soft} is below the {needed} that limits.max_connections ({}) \
             plus limits.max_handshakes ({}) plus {FD_HEADROOM} need: once it is reached, accepts \
             fail (\"accept failed\" in this log); raise the hard limit (LimitNOFILE=, ulimit -Hn) or \
             lower the limits",
            config.limits.max_connections, config.limits.max_handshakes
        )
    })
}

async fn serve(
    config: Config,
    args: Args,
    log_filter: Option<LogFilterHandle>,
) -> anyhow::Result<()> {
    let listen = config.listen;
    let server = Server::bind(config)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {listen}: {e}"))?;
    tokio::spawn(handle_signals(
        server.shutdown_handle(),
        server.reload_handle(),
        args,
        log_filter,
    ));
    server.run().await?;
    Ok(())
}

/// SIGTERM or SIGINT starts the graceful shutdown, before anything is logged, so that nothing
/// that happens to the log output can stand in its way; a second one exits at once. SIGHUP
/// reloads the configuration.
#[cfg(unix)]
async fn handle_signals(
    shutdown: brokerd_server::ShutdownHandle,
    reload: ReloadHandle,
    args: Args,
    log_filter: Option<LogFilterHandle>,
) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int), Ok(mut hup)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
        signal(SignalKind::hangup()),
    ) else {
        tracing::error!("cannot install signal handlers; stop brokerd with SIGKILL");
        return;
    };
    let first = loop {
        tokio::select! {
            _ = term.recv() => break "SIGTERM",
            _ = int.recv() => break "SIGINT",
            _ = hup.recv() => reload_config(&reload, &args, log_filter.as_ref()).await,
        }
    };
    shutdown.shutdown();
    tracing::info!(
        signal = first,
        "shutting down gracefully; a second SIGTERM or SIGINT exits at once"
    );
    let code = loop {
        tokio::select! {
            _ = term.recv() => break 143,
            _ = int.recv() => break 130,
            _ = hup.recv() => tracing::warn!("SIGHUP ignored: shutting down"),
        }
    };
    report!("brokerd: second signal: exiting at once, abandoning what is still queued");
    std::process::exit(code);
}

#[cfg(not(unix))]
async fn handle_signals(
    shutdown: brokerd_server::ShutdownHandle,
    _reload: ReloadHandle,
    _args: Args,
    _log_filter: Option<LogFilterHandle>,
) {
    let _ = tokio::signal::ctrl_c().await;
    shutdown.shutdown();
    let _ = tokio::signal::ctrl_c().await;
    std::process::exit(130);
}

/// Reads the configuration again and puts it in force; a file that does not load is logged and
/// the configuration in force stays.
async fn reload_config(reload: &ReloadHandle, args: &Args, log_filter: Option<&LogFilterHandle>) {
    let loaded = {
        let args = args.clone();
        tokio::task::spawn_blocking(move || load(&args)).await
    };
    let config = match loaded {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => {
            tracing::error!(error = %e, "configuration reload refused; the configuration in force stays");
            return;
        }
        Err(e) => {
            tracing::error!(error = %e, "configuration reload failed; the configuration in force stays");
            return;
        }
    };
    let level = config.log_level.clone();
    let done = reload.reload(config).await;
    if let Some(handle) = log_filter
        && done.applied.iter().any(|k| k == "log_level")
        && let Ok(filter) = EnvFilter::try_new(&level)
    {
        let _ = handle.reload(filter);
    }
    if !done.need_restart.is_empty() {
        tracing::warn!(
            keys = %done.need_restart.join(", "),
            "these changed keys take effect only after a restart; their old values stay in force"
        );
    }
    tracing::info!(
        changed = %if done.applied.is_empty() { "nothing".to_string() } else { done.applied.join(", ") },
        permissions_changed = done.permissions_changed,
        subscriptions_ended = done.subscriptions_ended,
        connections_closed = done.closed,
        "configuration reloaded"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warns_only_when_the_limits_do_not_fit() {
        let mut c = Config::default();
        c.limits.max_connections = 10_000;
        c.limits.max_handshakes = 1_000;
        let needed = 11_000 + FD_HEADROOM;
        assert_eq!(c.fds_needed(), needed);
        assert_eq!(fd_limit_warning(&c, needed), None);
        assert_eq!(fd_limit_warning(&c, u64::MAX), None);
        let warning = fd_limit_warning(&c, 1024);
        let warning = warning.as_deref().unwrap_or_default();
        assert!(
            warning.contains("1024") && warning.contains(&needed.to_string()),
            "{warning}"
        );
        assert!(
            warning.contains("limits.max_connections (10000)"),
            "{warning}"
        );
    }

    #[test]
    fn the_soft_limit_is_raised_to_the_hard_limit() {
        let Ok(soft) = rlimit::increase_nofile_limit(u64::MAX) else {
            return;
        };
        // Elsewhere (macOS) the kernel may cap the soft limit below the hard one.
        #[cfg(target_os = "linux")]
        {
            let Ok((now, hard)) = rlimit::getrlimit(rlimit::Resource::NOFILE) else {
                return;
            };
            assert_eq!(now, soft);
            assert_eq!(soft, hard);
        }
    }
}
