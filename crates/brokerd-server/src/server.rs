//! The listener, the accept loop and graceful shutdown.
//!
//! [`Server::bind`] binds the listening socket (port 0 works, for tests); [`Server::run`] accepts
//! until [`ShutdownHandle::shutdown`] is called, which is what `main.rs` does on SIGINT/SIGTERM.
//! Shutdown is ordered so that nothing already accepted from a publisher is lost: stop accepting;
//! stop every reader (each finishes routing the frames it already read); close every outbox with
//! "drain", so writers write what is queued followed by `ERR shutting-down`; wait for the writers
//! up to the grace period; then abort what is left.
//!
//! The accept loop admits each connection through [`Gate`] (handshake and per-address limits)
//! before spawning its task; a refused connection gets its `ERR` from a short task of its own.
//! Refusals and evictions are logged at most once a second ([`RefusalLog`]) and each is
//! counted under its close reason.

use crate::admission::Gate;
use crate::config::Config;
use crate::connection;
use arc_swap::ArcSwap;
use brokerd_core::{Broker, CloseReason, Pressure};
use socket2::{Domain, Protocol, Socket, Type};
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

/// Backlog of the listening socket.
const BACKLOG: i32 = 1024;

/// State every connection task shares.
pub(crate) struct Shared {
    pub(crate) broker: Arc<Broker>,
    /// The configuration in force; a reload replaces it ([`ReloadHandle`]).
    pub(crate) config: ArcSwap<Config>,
    pub(crate) server_id: String,
    /// Cancelled when shutdown starts: stop accepting and reading.
    pub(crate) shutdown: CancellationToken,
    /// Cancelled when the grace period is over: abort writes.
    pub(crate) hard_stop: CancellationToken,
    /// The connection counts and limits every connection is admitted through.
    pub(crate) gate: Arc<Gate>,
    /// Throttles the log lines of refused connections.
    pub(crate) refusals: RefusalLog,
    /// Checks the credentials of each `HELLO`.
    pub(crate) auth: ArcSwap<crate::auth::Authenticator>,
    /// TLS, when configured.
    pub(crate) tls: Option<crate::tls::TlsState>,
    /// Throttles the log lines of failed logins.
    pub(crate) auth_failures: RefusalLog,
    /// When the server was bound, for the uptime in its statistics.
    pub(crate) started: std::time::Instant,
    /// Statistics, rates, closed connections and events (`monitor.rs`).
    pub(crate) monitor: crate::monitor::Monitor,
    /// Durable streams (`streams/`).
    pub(crate) streams: crate::streams::Streams,
    /// Ended connections' teardowns, off the runtime's workers (`reaper.rs`).
    pub(crate) reaper: crate::reaper::Reaper,
}

/// Triggers a graceful shutdown of a running [`Server`]. Cloning is cheap.
#[derive(Clone, Debug)]
pub struct ShutdownHandle(CancellationToken);

impl ShutdownHandle {
    /// Starts the graceful shutdown; [`Server::run`] returns once it is complete.
    pub fn shutdown(&self) {
        self.0.cancel();
    }
}

/// A bound, not yet running broker.
pub struct Server {
    listener: TcpListener,
    /// The TLS listener beside the plain one (`tls.listen`), if any.
    tls_listener: Option<TcpListener>,
    /// The monitoring endpoints' listener (`http`), if configured and bound.
    http_listener: Option<TcpListener>,
    shared: Arc<Shared>,
}

/// Binds a listening socket on `addr`.
fn listen(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(BACKLOG)?;
    TcpListener::from_std(socket.into())
}

impl Server {
    /// Binds `config.listen` (and `tls.listen`) and prepares the broker.
    ///
    /// # Errors
    /// An address cannot be bound, or the TLS files cannot be loaded.
    pub async fn bind(config: Config) -> io::Result<Server> {
        let tls = crate::tls::TlsState::load(&config.tls)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e.to_string()))?;
        let listener = listen(config.listen)?;
        let tls_listener = match config.tls.listen {
            Some(addr) if tls.is_some() => Some(listen(addr)?),
            _ => None,
        };
        let http_listener = config.http.and_then(|addr| match listen(addr) {
            Ok(l) => Some(l),
            Err(e) => {
                // The broker is still useful without its monitoring endpoints; a second broker on
                // one host with the default configuration gets here.
                warn!(%addr, error = %e, "cannot listen for monitoring (http); running without it");
                None
            }
        });
        let streams = crate::streams::Streams::open(&config.data_dir, &config.streams)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e.to_string()))?;
        let broker = Arc::new(Broker::new(config.broker_limits()));
        let auth = crate::auth::Authenticator::new(&config.auth);
        let server_id = server_id();
        // One queued teardown per connection at most (each still holds its admission ticket).
        let reaper = crate::reaper::Reaper::start(
            config
                .limits
                .max_connections
                .saturating_add(config.limits.max_handshakes),
        )?;
        let gate = Arc::new(Gate::new(
            config.limits.max_handshakes,
            config.limits.max_connections,
            config.limits.max_connections_per_address,
        ));
        Ok(Server {
            listener,
            tls_listener,
            http_listener,
            shared: Arc::new(Shared {
                broker,
                config: ArcSwap::from_pointee(config),
                server_id,
                shutdown: CancellationToken::new(),
                hard_stop: CancellationToken::new(),
                gate,
                refusals: RefusalLog::default(),
                auth: ArcSwap::from_pointee(auth),
                tls,
                auth_failures: RefusalLog::default(),
                started: std::time::Instant::now(),
                monitor: crate::monitor::Monitor::default(),
                streams,
                reaper,
            }),
        })
    }

    /// The address actually bound (useful after binding port 0).
    ///
    /// # Errors
    /// The socket cannot report its address.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// The TLS listener's address, when TLS listens beside the plain listener.
    ///
    /// # Errors
    /// The socket cannot report its address.
    pub fn tls_addr(&self) -> io::Result<Option<SocketAddr>> {
        self.tls_listener
            .as_ref()
            .map(TcpListener::local_addr)
            .transpose()
    }

    /// The monitoring endpoints' address, when they listen.
    ///
    /// # Errors
    /// The socket cannot report its address.
    pub fn http_addr(&self) -> io::Result<Option<SocketAddr>> {
        self.http_listener
            .as_ref()
            .map(TcpListener::local_addr)
            .transpose()
    }

    /// The broker's routing state, for statistics.
    pub fn broker(&self) -> Arc<Broker> {
        self.shared.broker.clone()
    }

    /// The id this server announces in `WELCOME`.
    pub fn server_id(&self) -> &str {
        &self.shared.server_id
    }

    /// A handle that applies a new configuration while the server runs.
    pub fn reload_handle(&self) -> crate::reload::ReloadHandle {
        crate::reload::ReloadHandle(self.shared.clone())
    }

    /// A handle that starts the graceful shutdown.
    pub fn shutdown_handle(&self) -> ShutdownHandle {
        ShutdownHandle(self.shared.shutdown.clone())
    }

    /// Accepts and serves connections until shut down, then shuts down gracefully.
    ///
    /// # Errors
    /// None today; the signature leaves room for fatal listener errors.
    pub async fn run(self) -> io::Result<()> {
        let Server {
            listener,
            tls_listener,
            http_listener,
            shared,
        } = self;
        let tasks = TaskTracker::new();
        let readers = TaskTracker::new();
        // The plain listener speaks TLS when TLS is on and has no listener of its own.
        let main_secure = shared.tls.is_some() && tls_listener.is_none();
        info!(addr = %listener.local_addr()?, tls = main_secure, server_id = %shared.server_id, "brokerd listening");
        if let Some(l) = &tls_listener {
            info!(addr = %l.local_addr()?, tls = true, "brokerd listening");
        }
        tasks.spawn(watch_memory(shared.clone()));
        tasks.spawn(sample(shared.clone()));
        // Outside `tasks`: it answers (`/healthz` with 503) until the drain is over.
        let http = match http_listener {
            Some(l) => {
                info!(addr = %l.local_addr()?, "monitoring listening (HTTP)");
                Some(tokio::spawn(crate::http::serve(l, shared.clone())))
            }
            None => None,
        };
        if shared.tls.is_some() {
            tasks.spawn(watch_certificates(shared.clone()));
        }
        loop {
            let accepted = tokio::select! {
                _ = shared.shutdown.cancelled() => break,
                r = listener.accept() => r.map(|(s, p)| (s, p, main_secure)),
                Some(r) = async {
                    match &tls_listener {
                        Some(l) => Some(l.accept().await),
                        None => None,
                    }
                } => r.map(|(s, p)| (s, p, true)),
            };
            match accepted {
                Ok((stream, peer, secure)) => {
                    accept(stream, peer, secure, &shared, &tasks, &readers)
                }
                Err(e) => {
                    // Out of file descriptors and similar: back off rather than spin.
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
        drop(listener);
        drop(tls_listener);
        let grace = shared.config.load().timeouts.shutdown_grace;
        let deadline = tokio::time::Instant::now() + grace;
        info!(grace = ?grace, "shutting down: no longer accepting");
        readers.close();
        let _ = tokio::time::timeout_at(deadline, readers.wait()).await;
        // No reader captures any more: the streams store what they hold and answer its
        // publishers before the outboxes close.
        let for_streams = shared.clone();
        let _ = tokio::task::spawn_blocking(move || for_streams.streams.close()).await;
        // Every reader has stopped, so nothing is queued from here on: what is pending now is
        // what the drain has to write.
        let clients = shared.broker.clients();
        let pending = |clients: &[Arc<brokerd_core::Client>]| -> u64 {
            clients
                .iter()
                .map(|c| c.outbox.stats().pending_msgs as u64)
                .sum()
        };
        let queued = pending(&clients);
        for client in &clients {
            client.outbox.close(CloseReason::ServerShutdown, true);
        }
        tasks.close();
        let mut abandoned = 0;
        if tokio::time::timeout_at(deadline, tasks.wait())
            .await
            .is_err()
        {
            abandoned = pending(&clients);
            warn!(
                abandoned,
                "grace period over: closing connections with messages still queued"
            );
            shared.hard_stop.cancel();
            for client in shared.broker.clients() {
                client.outbox.close(CloseReason::ServerShutdown, false);
            }
            let _ = tokio::time::timeout(Duration::from_secs(2), tasks.wait()).await;
        }
        if let Some(http) = http {
            http.abort();
        }
        info!(
            written = queued.saturating_sub(abandoned),
            abandoned,
            connections = clients.len(),
            "shutdown complete: {} queued messages written, {abandoned} abandoned",
            queued.saturating_sub(abandoned)
        );
        Ok(())
    }
}

/// Reloads the TLS certificate and key when their files change, until shutdown; a file that
/// fails to load is logged and the certificate in force stays.
async fn watch_certificates(shared: Arc<Shared>) {
    let Some(tls) = &shared.tls else { return };
    let mut tick = tokio::time::interval(crate::tls::RELOAD_CHECK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shared.shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        match tls.reload_if_changed() {
            Ok(true) => info!("TLS certificate reloaded"),
            Ok(false) => {}
            Err(e) => {
                warn!(error = %e, "TLS certificate changed but cannot be loaded; keeping the one in force")
            }
        }
    }
}

/// How often the coarse clock advances.
const CLOCK_TICK: Duration = Duration::from_millis(10);

/// Advances the coarse clock every [`CLOCK_TICK`], and once a second turns the counters into
/// rates and publishes the drop events (`monitor.rs`), until shutdown.
async fn sample(shared: Arc<Shared>) {
    let mut tick = tokio::time::interval(CLOCK_TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut next_sample = tokio::time::Instant::now();
    loop {
        tokio::select! {
            _ = shared.shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        brokerd_core::clock::tick();
        let now = tokio::time::Instant::now();
        if now >= next_sample {
            next_sample = now + Duration::from_secs(1);
            shared.monitor.sample(&shared);
        }
    }
}

/// How often the memory budget is looked at.
const MEMORY_TICK: Duration = Duration::from_millis(100);

/// Adjusts the memory budget's shedding every [`MEMORY_TICK`] until shutdown, logging each
/// episode over the budget once as it starts and once as it ends.
async fn watch_memory(shared: Arc<Shared>) {
    let budget = shared.broker.memory().clone();
    let mut tick = tokio::time::interval(MEMORY_TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shared.shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        match budget.tick() {
            Pressure::Started { used, shed_above } => warn!(
                used,
                limit = budget.limit(),
                shed_above,
                "memory budget reached: shedding the largest queues and pausing readers holding large frames"
            ),
            Pressure::Ended { used } => {
                info!(used, limit = budget.limit(), "memory back under budget")
            }
            Pressure::Calm | Pressure::Continues => {}
        }
    }
}

fn accept(
    stream: TcpStream,
    peer: SocketAddr,
    secure: bool,
    shared: &Arc<Shared>,
    tasks: &TaskTracker,
    readers: &TaskTracker,
) {
    let shared = shared.clone();
    match shared.gate.admit(peer.ip()) {
        Ok(admitted) => {
            if admitted.evicted_one
                && let Some(suppressed) = shared.refusals.should_log()
            {
                warn!(%peer, reason = %CloseReason::TooManyHandshakes, limit = shared.config.load().limits.max_handshakes, connections = shared.gate.established(), suppressed, "oldest handshake evicted to admit a new connection");
            }
            let reading = readers.token();
            // Held by the connection's teardown on the reaper, so the drain waits for it too.
            let teardown = tasks.token();
            // Boxed: a task stores its future inline, and tokio's change of a task's stage
            // (running, finished, consumed) writes the whole stage, so an inline future of
            // nearly 5 KB cost two copies of that size as each connection ended (12% of the
            // workers' time while 10,000 closed at once, in `perf`); boxed, it is a pointer.
            tasks.spawn(Box::pin(connection::serve(
                stream,
                peer,
                shared,
                admitted.ticket,
                reading,
                teardown,
                secure,
            )));
        }
        Err(reason) => {
            if let Some(suppressed) = shared.refusals.should_log() {
                warn!(%peer, reason = %reason, limit = shared.config.load().limits.max_connections_per_address, suppressed, "connection refused");
            }
            // Refused before reading anything: the ERR goes into an empty socket buffer, so
            // this task ends at once unless the peer has vanished.
            tasks.spawn(async move {
                let (_rd, mut wr) = stream.into_split();
                connection::reject(&mut wr, &reason, &shared).await;
                shared.broker.record_close(&reason);
            });
        }
    }
}

/// Throttles the lines logged for refused and evicted connections to one a second, so that a
/// flood of refusals does not become a flood of log lines; each line says how many it left out.
#[derive(Debug, Default)]
pub(crate) struct RefusalLog {
    /// Milliseconds since [`RefusalLog::epoch`] at the last line logged, plus one (0: never).
    last: AtomicU64,
    /// Refusals not logged since the last line.
    suppressed: AtomicU64,
    epoch: std::sync::OnceLock<std::time::Instant>,
}

impl RefusalLog {
    /// Whether to log this refusal; if so, how many were left unlogged since the last line.
    pub(crate) fn should_log(&self) -> Option<u64> {
        let epoch = *self.epoch.get_or_init(std::time::Instant::now);
        self.should_log_at(u64::try_from(epoch.elapsed().as_millis()).unwrap_or(u64::MAX - 1) + 1)
    }

    /// [`RefusalLog::should_log`] at `now`, in milliseconds since the epoch plus one.
    fn should_log_at(&self, now: u64) -> Option<u64> {
        let last = self.last.load(Ordering::Relaxed);
        if (last == 0 || now.saturating_sub(last) >= 1000)
            && self
                .last
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            return Some(self.suppressed.swap(0, Ordering::Relaxed));
        }
        self.suppressed.fetch_add(1, Ordering::Relaxed);
        None
    }
}

/// A process-unique id: start time and pid, in hex.
fn server_id() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    format!("{:x}-{:x}", nanos, std::process::id())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusal_lines_are_throttled_and_count_what_they_leave_out() {
        let log = RefusalLog::default();
        assert_eq!(log.should_log_at(1), Some(0));
        assert_eq!(log.should_log_at(2), None);
        assert_eq!(log.should_log_at(1000), None);
        assert_eq!(log.should_log_at(1001), Some(2));
        assert_eq!(log.should_log_at(1500), None);
        assert_eq!(log.should_log_at(5000), Some(1));
    }
}
