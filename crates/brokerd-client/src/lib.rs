//! A thin async client for brokerd.
//!
//! Layout:
//! - [`client`]: [`Client`]: connect, publish, subscribe, flush, close.
//! - [`subscription`]: [`Subscription`], a `Stream` of [`Message`]s for one filter.
//! - [`error`]: the [`Error`] type.
//! - [`tls`]: [`TlsOptions`]: the CA, server name and client certificate for TLS.
//! - `channel`: the bounded queue between the connection's reader and each subscription.
//!
//! ```no_run
//! # async fn demo() -> Result<(), brokerd_client::Error> {
//! use brokerd_client::{Client, ConnectOptions};
//! let client = Client::connect("127.0.0.1:7654", ConnectOptions::new("welcome-email")).await?;
//! let mut sub = client.subscribe("user.created").await?;
//! let n = client.publish_acked("user.created", r#"{"id":1}"#).await?;
//! assert_eq!(n, 1);
//! let msg = sub.next().await.expect("connection open");
//! println!("{} {:?}", msg.topic(), msg.payload());
//! # Ok(()) }
//! ```

mod channel;
pub mod client;
pub mod error;
pub mod subscription;
pub mod tls;

pub use brokerd_proto::{Credentials, Filter, Headers, OverflowPolicy, Topic};
pub use client::{Client, ConnectOptions, Event, Reconnect, ServerInfo};
pub use error::Error;
pub use subscription::{Message, Subscription};
pub use tls::{TlsOptions, TlsOptionsError};
