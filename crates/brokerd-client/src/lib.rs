//! A thin async client for the brokerd publish/subscribe broker, on tokio.
//!
//! Publishers and subscribers share only topic names: dot-separated tokens such as
//! `order.created`. A subscription names a filter, where `*` matches one token and `>` every
//! remaining token (`order.*`, `*.error`, `>`).
//!
//! # Connecting
//!
//! [`Client::connect`] dials a broker, completes the handshake and starts the connection's
//! tasks. [`ConnectOptions`] names the client and carries everything else: credentials, TLS,
//! the overflow policy, reconnection.
//!
//! ```no_run
//! use brokerd_client::{Client, ConnectOptions};
//! # async fn demo() -> Result<(), brokerd_client::Error> {
//! let client = Client::connect("127.0.0.1:7654", ConnectOptions::new("welcome-email")).await?;
//! println!("connected to broker {}", client.server_info().server_id);
//! # Ok(()) }
//! ```
//!
//! A broker that requires authentication takes a token ([`ConnectOptions::token`]) or a user
//! and password ([`ConnectOptions::user_password`]); over TLS, [`ConnectOptions::tls`] with
//! [`TlsOptions`].
//!
//! # Publishing
//!
//! [`Client::publish`] returns a [`Publish`] that sends when awaited. Plain publishes return
//! as soon as the message is buffered; [`Publish::acked`] waits for the broker and tells how many
//! subscriptions the message reached. The broker's refusals of publishes nobody waited on are
//! kept for [`Client::take_refusals`].
//!
//! ```no_run
//! # async fn demo(client: brokerd_client::Client) -> Result<(), brokerd_client::Error> {
//! client.publish("user.created", r#"{"id":1,"name":"alice"}"#).await?;
//! let reached = client
//!     .publish("order.created", r#"{"order_id":"ord-1"}"#)
//!     .header("content-type", "application/json")
//!     .acked()
//!     .await?;
//! println!("order.created reached {reached} subscribers");
//! # Ok(()) }
//! ```
//!
//! # Subscribing
//!
//! [`Client::subscribe`] returns a [`Subscription`], a stream of [`Message`]s. Each
//! subscription's queue is bounded ([`ConnectOptions::subscription_capacity`]); when it is full
//! the client stops reading, and the broker's overflow policy decides what is dropped. What the
//! broker dropped is counted in [`Subscription::missed`], and a gap in [`Message::seq`] shows
//! where.
//!
//! ```no_run
//! # async fn demo(client: brokerd_client::Client) -> Result<(), brokerd_client::Error> {
//! let mut errors = client.subscribe("*.error").await?;
//! while let Some(msg) = errors.next().await {
//!     println!("{} (seq {}): {:?}", msg.topic(), msg.seq(), msg.payload());
//! }
//! println!("the broker dropped {} for this subscription", errors.missed());
//! # Ok(()) }
//! ```
//!
//! # Queue groups
//!
//! Subscriptions that join the same queue group share its messages: each message goes to one
//! member, whichever connection it is on. A pool of workers is one group.
//!
//! ```no_run
//! # async fn demo(client: brokerd_client::Client) -> Result<(), brokerd_client::Error> {
//! let mut jobs = client.subscribe_queue("image.resize", "resizers").await?;
//! while let Some(job) = jobs.next().await {
//!     // No other member of "resizers" received this one.
//!     # let _ = job;
//! }
//! # Ok(()) }
//! ```
//!
//! # Requests and replies
//!
//! [`Client::request`] publishes with a reply-to topic of this connection's own and waits for
//! the first answer; a responder answers with [`Message::respond`]. A request that reaches no
//! subscription fails at once with [`Error::NoResponders`].
//!
//! ```no_run
//! use std::time::Duration;
//! # async fn demo(client: brokerd_client::Client) -> Result<(), brokerd_client::Error> {
//! // The responder.
//! let mut quotes = client.subscribe("price.quote").await?;
//! tokio::spawn(async move {
//!     while let Some(req) = quotes.next().await {
//!         let _ = req.respond(r#"{"price":12.5}"#).await;
//!     }
//! });
//! // The requester.
//! let answer = client.request("price.quote", r#"{"sku":"mug"}"#, Duration::from_secs(2)).await?;
//! println!("{:?}", answer.payload());
//! # Ok(()) }
//! ```
//!
//! # Streams: stored messages and replay
//!
//! A stream on the broker stores every published message whose topic matches its filters, in
//! order, each with a stream sequence. [`Client::streams`] adds, lists, inspects, purges and
//! deletes streams ([`Streams`]). A publish that waits with [`Publish::stored`] learns which
//! stream stored it and as which sequence ([`StoredAck`]); with [`Publish::msg_id`] it can be
//! sent again safely, since a stream stores an id once within its duplicate window.
//!
//! [`Client::subscribe_stream`] replays a stream from a [`StartPosition`] and then continues
//! live, without a gap or a duplicate at the seam. Each message carries its stream sequence
//! ([`Message::stream_seq`]): a service that records the last one it processed resumes from
//! the next with [`StartPosition::FromSeq`], even after a restart, and a reconnecting client
//! does so by itself.
//!
//! ```no_run
//! use brokerd_client::{StartPosition, StreamConfig};
//! # async fn demo(client: brokerd_client::Client) -> Result<(), brokerd_client::Error> {
//! client
//!     .streams()
//!     .add(&StreamConfig {
//!         name: "ORDERS".into(),
//!         filters: vec!["order.>".into(), "payment.>".into()],
//!         ..StreamConfig::default()
//!     })
//!     .await?;
//! let stored = client
//!     .publish("order.created", r#"{"order_id":"ord-1"}"#)
//!     .msg_id("ord-1-created")
//!     .stored()
//!     .await?;
//! println!("stored in {} as #{}", stored.stream, stored.seq);
//!
//! let last_processed = 0; // as recorded by the application
//! let mut orders = client
//!     .subscribe_stream("order.>", "ORDERS", StartPosition::FromSeq(last_processed + 1))
//!     .await?;
//! while let Some(msg) = orders.next().await {
//!     println!("#{} {}", msg.stream_seq().unwrap_or(0), msg.topic());
//! }
//! # Ok(()) }
//! ```
//!
//! # Durable consumers: work queues that survive restarts
//!
//! A durable consumer is a position in a stream that the broker keeps, on disk, for the
//! subscriptions that join it ([`Client::consume`], settings in [`ConsumerOptions`]). Each
//! message goes to one member at a time, whichever client it is on, and each member answers
//! every message it received: [`Message::ack`] (done), [`Message::nak`] (deliver it again) or
//! [`Message::term`] (never deliver it again). A message not acknowledged within the ack wait,
//! or held by a member that leaves (its client crashed, say), is delivered again, up to
//! `max_deliver` times: at least once, so processing must tolerate a repeat. After a restart of
//! the broker, the consumer goes on after what was acknowledged.
//!
//! ```no_run
//! use brokerd_client::ConsumerOptions;
//! use std::time::Duration;
//! # async fn resize(_: &[u8]) -> Result<(), std::io::Error> { Ok(()) }
//! # async fn demo(client: brokerd_client::Client) -> Result<(), brokerd_client::Error> {
//! // Every worker process runs this: they share the consumer's messages.
//! let options = ConsumerOptions::new()
//!     .filter("image.uploaded")
//!     .ack_wait(Duration::from_secs(120))
//!     .max_deliver(3);
//! let mut jobs = client.consume("IMAGES", "resizers", options).await?;
//! while let Some(job) = jobs.next().await {
//!     match resize(&job.payload()).await {
//!         Ok(()) => job.ack().await?,
//!         Err(_) => job.nak().await?,
//!     }
//! }
//! # Ok(()) }
//! ```
//!
//! # Reconnecting
//!
//! By default a lost connection closes the client. With [`ConnectOptions::reconnect`], the
//! client dials again with backoff and jitter (over [`ConnectOptions::servers`] in turn), makes
//! every subscription again (a replay subscription from right after the last message it
//! received; a durable consumer's joins the same consumer, which delivers again what was
//! unacknowledged on the lost connection, so a message received before the reconnect can no
//! longer be acknowledged: [`Error::StaleDelivery`]), and sends the publishes it buffered meanwhile, up to
//! [`Reconnect::buffer_bytes`]. Calls that need an answer fail at once while it is
//! disconnected ([`Error::Disconnected`]). [`Client::events`] reports what happens.
//!
//! ```no_run
//! use brokerd_client::{Client, ConnectOptions, Event, Reconnect};
//! use std::time::Duration;
//! # async fn demo() -> Result<(), brokerd_client::Error> {
//! let options = ConnectOptions::new("dashboard")
//!     .reconnect(Reconnect::default().delays(Duration::from_millis(100), Duration::from_secs(5)))
//!     .servers(["10.0.0.2:7654", "10.0.0.3:7654"]);
//! let client = Client::connect("10.0.0.1:7654", options).await?;
//! let mut events = client.events();
//! tokio::spawn(async move {
//!     while let Ok(event) = events.recv().await {
//!         if let Event::Disconnected { reason } = event {
//!             eprintln!("lost the broker ({reason}); reconnecting");
//!         }
//!     }
//! });
//! # Ok(()) }
//! ```
//!
//! # Errors
//!
//! Every call returns [`Error`]: the caller's arguments ([`Error::InvalidTopic`], ...), the
//! broker's refusal with its [`ErrorCode`] ([`Error::Server`]; a stream management request's
//! with the broker's message, [`Error::Stream`]), or the connection ([`Error::Closed`] and
//! [`Error::Disconnected`] with a [`CloseReason`]).

mod channel;
mod client;
mod connection;
mod consumer;
mod error;
mod event;
mod info;
mod options;
mod publish;
mod state;
mod stream;
mod subscription;
mod tls;

pub use brokerd_proto::streams::{Fsync, MSG_ID_HEADER, StreamConfig, StreamInfo};
pub use brokerd_proto::{
    Credentials, ErrorCode, Filter, Headers, OverflowPolicy, StartPosition, Topic,
};
pub use client::Client;
pub use consumer::ConsumerOptions;
pub use error::Error;
pub use event::{CloseReason, Event};
pub use info::ServerInfo;
pub use options::{ConnectOptions, Reconnect};
pub use publish::{AckedPublish, Publish, PublishFuture, StoredPublish};
pub use stream::{STREAM_REQUEST_TIMEOUT, StoredAck, Streams};
pub use subscription::{Message, Subscription};
pub use tls::{TlsOptions, TlsOptionsError};
