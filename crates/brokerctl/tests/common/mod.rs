//! The harness both `brokerctl` test files share: a real broker started in-process on
//! `127.0.0.1:0` and stopped through its shutdown handle (the path a signal takes), a
//! `brokerctl` command aimed at it, and a deadline-bounded wait for a condition.

use brokerd_server::{Config, Server, ShutdownHandle};
use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;
use tokio::time::Instant;

/// How long any single wait may take before the test fails.
pub const DEADLINE: Duration = Duration::from_secs(30);

/// Pause between polls of a condition.
pub const POLL: Duration = Duration::from_millis(10);

/// A running broker.
pub struct Broker {
    /// Where it listens.
    pub addr: SocketAddr,
    /// Live subscriptions, read from the broker's statistics. A closure because the broker's
    /// type lives in `brokerd-core`, which this crate does not depend on.
    pub subscriptions: Box<dyn Fn() -> usize + Send + Sync>,
    handle: ShutdownHandle,
    join: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl Broker {
    /// Starts a broker with the default configuration on an ephemeral port.
    pub async fn start() -> Broker {
        Broker::start_with(|_| {}).await
    }

    /// Starts a broker with the defaults changed by `f`, on an ephemeral port.
    pub async fn start_with(f: impl FnOnce(&mut Config)) -> Broker {
        let mut cfg = Config {
            listen: "127.0.0.1:0".parse().unwrap(),
            http: None,
            ..Config::default()
        };
        f(&mut cfg);
        let server = Server::bind(cfg).await.unwrap();
        let addr = server.local_addr().unwrap();
        let broker = server.broker();
        let handle = server.shutdown_handle();
        let join = tokio::spawn(server.run());
        Broker {
            addr,
            subscriptions: Box::new(move || broker.stats().subscriptions),
            handle,
            join,
        }
    }

    /// Waits until the broker holds `n` subscriptions.
    #[allow(dead_code)]
    pub async fn wait_for_subscriptions(&self, n: usize) {
        wait_until("the broker to show the subscription", || {
            (self.subscriptions)() == n
        })
        .await;
    }

    /// `brokerctl --server ADDR args...`, not yet started.
    pub fn ctl(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_brokerctl"));
        cmd.arg("--server").arg(self.addr.to_string()).args(args);
        cmd
    }

    /// Shuts the broker down gracefully and waits for it.
    pub async fn stop(self) {
        self.handle.shutdown();
        tokio::time::timeout(DEADLINE, self.join)
            .await
            .expect("broker shut down in time")
            .expect("broker task did not panic")
            .expect("broker run returned ok");
    }
}

/// Polls `cond` every [`POLL`] until it holds; panics naming `what` after [`DEADLINE`].
pub async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + DEADLINE;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(POLL).await;
    }
}

/// Polls the future `cond` makes every [`POLL`] until it holds; panics naming `what` after
/// [`DEADLINE`].
#[allow(dead_code)]
pub async fn wait_until_async<F: std::future::Future<Output = bool>>(
    what: &str,
    mut cond: impl FnMut() -> F,
) {
    let deadline = Instant::now() + DEADLINE;
    while !cond().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(POLL).await;
    }
}
