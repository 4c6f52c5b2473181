//! The `brokerd` binary: flags, logging, the file descriptor limit, signals, then
//! [`brokerd_server::Server`].

use brokerd_server::config::FD_HEADROOM;
mod allocator;

use brokerd_server::{Config, Server};
use clap::Parser;
use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use tracing_subscriber::EnvFilter;

#[cfg(feature = "mimalloc")]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// brokerd: a publish/subscribe message broker.
#[derive(Debug, Parser)]
#[command(name = "brokerd", version, about)]
struct Args {
    /// Address to listen on [default: 127.0.0.1:7654, or the config file's `listen`].
    #[arg(long, env = "BROKERD_LISTEN")]
    listen: Option<SocketAddr>,
    /// TOML configuration file (see config/brokerd.toml); without one, built-in defaults apply.
    #[arg(long, short = 'c', env = "BROKERD_CONFIG")]
    config: Option<PathBuf>,
    /// Log filter: error, warn, info, debug, trace [default: info]. RUST_LOG, when set, wins.
    #[arg(long, env = "BROKERD_LOG_LEVEL")]
    log_level: Option<String>,
    /// Print the configuration in force, as TOML, and exit.
    #[arg(long)]
    print_config: bool,
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

#[derive(Debug, clap::Subcommand)]
enum Command {
    /// Read a password from the terminal (asked twice) or from standard input (one line), and
    /// print its argon2id hash for `password_hash` in [[auth.users]].
    HashPassword,
}

fn main() -> ExitCode {
    let args = Args::parse();
    if let Some(Command::HashPassword) = args.command {
        return hash_password();
    }
    let mut config = match &args.config {
        Some(path) => match Config::from_file(path) {
            Ok(c) => c,
            Err(e) => {
                eprintln!("brokerd: {e}");
                return ExitCode::from(2);
            }
        },
        None => Config::default(),
    };
    if let Some(listen) = args.listen {
        config.listen = listen;
    }
    if let Some(level) = args.log_level {
        config.log_level = level;
    }
    if let Some(token) = args.auth_token {
        config.auth.token = Some(token);
    }
    if args.allow_anonymous {
        config.auth.allow_anonymous = true;
    }
    if let (Some(cert), Some(key)) = (args.tls_cert, args.tls_key) {
        config.tls.cert = Some(cert);
        config.tls.key = Some(key);
    }
    // Flags and environment may have changed what the file said.
    if let Err(e) = config.validate() {
        eprintln!("brokerd: {e}");
        return ExitCode::from(2);
    }
    if args.print_config {
        print!("{}", config.to_toml());
        return ExitCode::SUCCESS;
    }
    let filter = match std::env::var("RUST_LOG") {
        Ok(v) if !v.is_empty() => EnvFilter::try_new(v),
        _ => EnvFilter::try_new(&config.log_level),
    };
    let filter = match filter {
        Ok(f) => f,
        Err(e) => {
            eprintln!("brokerd: invalid log filter: {e}");
            return ExitCode::from(2);
        }
    };
    // Logs go to stderr, so stdout carries only what was asked for (`--print-config`). Colour
    // only for a person at a terminal; journald, files and pipes get plain text.
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    raise_fd_limit(&config);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .on_thread_park(allocator::on_park)
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("brokerd: cannot start runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(serve(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("brokerd: {e:#}");
            ExitCode::FAILURE
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
                eprintln!("brokerd: the passwords differ");
                return ExitCode::from(2);
            }
            (Err(e), _) | (_, Err(e)) => {
                eprintln!("brokerd: cannot read the password: {e}");
                return ExitCode::FAILURE;
            }
        }
    } else {
        let mut line = String::new();
        if let Err(e) = std::io::stdin().read_line(&mut line) {
            eprintln!("brokerd: cannot read the password: {e}");
            return ExitCode::FAILURE;
        }
        line.trim_end_matches(['\n', '\r']).to_string()
    };
    if password.is_empty() {
        eprintln!("brokerd: the password is empty");
        return ExitCode::from(2);
    }
    match brokerd_server::auth::hash_password(&password) {
        Ok(hash) => {
            println!("{hash}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("brokerd: cannot hash the password: {e}");
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

async fn serve(config: Config) -> anyhow::Result<()> {
    let listen = config.listen;
    let server = Server::bind(config)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {listen}: {e}"))?;
    let handle = server.shutdown_handle();
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("signal received: shutting down gracefully");
        handle.shutdown();
    });
    server.run().await?;
    Ok(())
}

#[cfg(unix)]
async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot install signal handlers; stop brokerd with SIGKILL");
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}

#[cfg(not(unix))]
async fn wait_for_signal() {
    let _ = tokio::signal::ctrl_c().await;
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
