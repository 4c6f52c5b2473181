//! brokerd, the publish/subscribe broker daemon, as a library (the `brokerd` binary and the
//! end-to-end tests both start it through [`Server`]).
//!
//! Layout:
//! - [`config`]: defaults, TOML file, validation.
//! - [`auth`]: credentials checked at the handshake, and the identity they give.
//! - [`server`]: listener, accept loop, graceful shutdown.
//! - [`reload`]: a new configuration applied to a running server (SIGHUP).
//! - `admission`: the handshake, connection and per-address limits a connection is admitted by.
//! - `connection`: one connection's handshake, reader loop, keep-alive and frame deadline.
//! - `escape`: client-supplied text made safe for a log line.
//! - [`tls`]: TLS on the client listener, certificate reloads, mutual TLS.
//! - `writer`: one connection's socket writer task.
//! - `monitor`: the statistics a client asks for on `$SYS.req.stats`.
//! - `streams`: durable streams: capture, storage threads, replay, management requests.

mod admission;
pub mod auth;
pub mod config;
mod connection;
mod escape;
mod http;
mod monitor;
mod reaper;
pub mod reload;
pub mod server;
mod streams;
mod tail;
pub mod tls;
mod writer;

pub use config::{Config, ConfigError};

/// The client name `brokerd --health` connects with; the broker logs the clean close of a
/// connection by this name at debug level rather than info, so that a health check every few
/// seconds does not fill the log. Any other close by this name is logged as usual.
pub const HEALTH_CHECK_NAME: &str = "brokerd-health";
pub use reload::{ReloadHandle, Reloaded};
pub use server::{Server, ShutdownHandle};

/// HTTP connections the monitoring endpoints serve at once; more wait in the listen backlog.
pub const MONITORING_CONNECTIONS: usize = http::MAX_CONNECTIONS;
/// Monitoring connections one address may hold at once.
pub const MONITORING_PER_ADDRESS: usize = http::PER_ADDRESS;
