//! brokerd, the publish/subscribe broker daemon, as a library (the `brokerd` binary and the
//! end-to-end tests both start it through [`Server`]).
//!
//! Layout:
//! - [`config`]: defaults, TOML file, validation.
//! - [`auth`]: credentials checked at the handshake, and the identity they give.
//! - [`server`]: listener, accept loop, graceful shutdown.
//! - `admission`: the handshake, connection and per-address limits a connection is admitted by.
//! - `connection`: one connection's handshake, reader loop, keep-alive and frame deadline.
//! - `escape`: client-supplied text made safe for a log line.
//! - [`tls`]: TLS on the client listener, certificate reloads, mutual TLS.
//! - `writer`: one connection's socket writer task.
//! - `monitor`: the statistics a client asks for on `$SYS.req.stats`.

mod admission;
pub mod auth;
pub mod config;
mod connection;
mod escape;
mod monitor;
pub mod server;
pub mod tls;
mod writer;

pub use config::{Config, ConfigError};
pub use server::{Server, ShutdownHandle};
