//! The `brokerd` binary: flags, logging, signals, then [`brokerd_server::Server`].

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
}

fn main() -> ExitCode {
    let args = Args::parse();
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
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
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
