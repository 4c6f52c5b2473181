//! The connection: handshake, the reader and writer tasks, and the public [`Client`] calls.
//!
//! Calls encode their frame into one shared write buffer; a writer task swaps the buffer out and
//! writes it, so many publishes share one syscall. A reader task decodes what the server sends:
//! replies go to the waiting call by request id, deliveries to their [`Subscription`] by
//! subscription id. When the connection ends, waiting calls fail with [`Error::Closed`] and every
//! subscription stream ends.

use crate::channel;
use crate::error::Error;
use crate::subscription::{Message, SubShared, Subscription};
use crate::tls::TlsOptions;
use brokerd_proto::body::BodyBuilder;
use brokerd_proto::frame::{encode_pub, take_msg};
use brokerd_proto::topic::validate_topic;
use brokerd_proto::{
    Credentials, ErrorCode, Filter, Frame, Headers, Hello, Msg, OverflowPolicy, PROTOCOL_VERSION,
    Subscribe, TopicLimits, Unsubscribe, Welcome, decode,
};
use bytes::BytesMut;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{Notify, oneshot};

/// Options for [`Client::connect`].
#[derive(Debug, Clone)]
pub struct ConnectOptions {
    /// Name shown in the server's logs.
    pub name: String,
    /// Overflow policy to ask for; `None` takes the server's default.
    pub overflow: Option<OverflowPolicy>,
    /// Do not receive this connection's own publications.
    pub no_echo: bool,
    /// Messages buffered per subscription before the client stops reading the socket.
    pub subscription_capacity: usize,
    /// Bytes buffered for writing before publishing waits for the socket.
    pub write_buffer: usize,
    /// How long connecting and the handshake may take.
    pub connect_timeout: Duration,
    /// What to prove the client's identity with, for a server that requires it.
    pub credentials: Option<Credentials>,
    /// Replies to this client's requests arrive on `PREFIX.<random>.<n>`; a user whose
    /// permissions allow only its own inbox (`_INBOX.orders.>`) sets its prefix here.
    pub inbox_prefix: String,
    /// Connect over TLS with these options; `None` for plain TCP.
    pub tls: Option<TlsOptions>,
    /// Reconnect when the connection is lost; `None` (the default): the client closes.
    pub reconnect: Option<Reconnect>,
    /// Further servers to try, in turn after the one given to [`Client::connect`], when
    /// reconnecting.
    pub servers: Vec<String>,
}

/// How a client reconnects (see [`ConnectOptions::reconnect`]).
///
/// After a connection is lost, the client dials its servers in turn: the first attempt at once,
/// then after `initial_delay`, doubling up to `max_delay`, each delay shortened by a random
/// fraction of up to a half so that a fleet does not come back in lockstep. On success it makes
/// every live subscription again (queue groups included, and the request inbox), then sends the
/// publishes buffered meanwhile.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Reconnect {
    /// Attempts before giving up and closing; `None` for no limit.
    pub max_attempts: Option<u32>,
    /// The delay after the first failed attempt.
    pub initial_delay: Duration,
    /// The longest delay between attempts.
    pub max_delay: Duration,
    /// Bytes of publishes (without acknowledgement) buffered while disconnected; a publish
    /// beyond this fails with [`Error::Disconnected`].
    pub buffer_bytes: usize,
}

impl Default for Reconnect {
    fn default() -> Reconnect {
        Reconnect {
            max_attempts: None,
            initial_delay: Duration::from_millis(50),
            max_delay: Duration::from_secs(2),
            buffer_bytes: 8 * 1024 * 1024,
        }
    }
}

impl Reconnect {
    /// Gives up after `n` attempts in a row.
    pub fn max_attempts(mut self, n: u32) -> Reconnect {
        self.max_attempts = Some(n);
        self
    }

    /// Sets the first and the longest delay between attempts.
    pub fn delays(mut self, initial: Duration, max: Duration) -> Reconnect {
        self.initial_delay = initial;
        self.max_delay = max.max(initial);
        self
    }

    /// Sets how many bytes of publishes are buffered while disconnected.
    pub fn buffer_bytes(mut self, n: usize) -> Reconnect {
        self.buffer_bytes = n;
        self
    }

    /// The delay before attempt `attempt` (0: the first, at once), with `jitter` in [0, 1).
    fn delay(&self, attempt: u32, jitter: f64) -> Duration {
        if attempt == 0 {
            return Duration::ZERO;
        }
        let base = self
            .initial_delay
            .saturating_mul(1u32 << (attempt - 1).min(20))
            .min(self.max_delay);
        base.mul_f64(1.0 - jitter / 2.0)
    }
}

/// What happened to a client's connection; see [`Client::events`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Event {
    /// The server said it is shutting down; with reconnection on, the client reconnects.
    ServerShuttingDown,
    /// The connection was lost, and the client is reconnecting. Calls waiting for the server
    /// failed with [`Error::Disconnected`].
    Disconnected {
        /// Why, as far as the client knows.
        reason: String,
    },
    /// Connected again, subscriptions made again.
    Reconnected {
        /// The server it reached.
        server: String,
        /// Attempts it took.
        attempts: u32,
    },
    /// The client closed for good.
    Closed {
        /// Why.
        reason: String,
    },
}

impl ConnectOptions {
    /// Defaults with this client name.
    pub fn new(name: impl Into<String>) -> ConnectOptions {
        ConnectOptions {
            name: name.into(),
            ..ConnectOptions::default()
        }
    }

    /// Sets the overflow policy to ask for.
    pub fn overflow(mut self, policy: OverflowPolicy) -> ConnectOptions {
        self.overflow = Some(policy);
        self
    }

    /// Authenticates with the server's shared token.
    pub fn token(mut self, token: impl Into<String>) -> ConnectOptions {
        self.credentials = Some(Credentials::Token(token.into()));
        self
    }

    /// Authenticates as a configured user.
    pub fn user_password(
        mut self,
        user: impl Into<String>,
        password: impl Into<String>,
    ) -> ConnectOptions {
        self.credentials = Some(Credentials::Password {
            user: user.into(),
            password: password.into(),
        });
        self
    }

    /// Connects over TLS.
    pub fn tls(mut self, tls: TlsOptions) -> ConnectOptions {
        self.tls = Some(tls);
        self
    }

    /// Sets the prefix of this client's reply inbox (default `_INBOX`).
    pub fn inbox_prefix(mut self, prefix: impl Into<String>) -> ConnectOptions {
        self.inbox_prefix = prefix.into();
        self
    }

    /// Sets whether to skip this connection's own publications.
    pub fn no_echo(mut self, no_echo: bool) -> ConnectOptions {
        self.no_echo = no_echo;
        self
    }

    /// Reconnects, as `policy` says, when the connection is lost.
    pub fn reconnect(mut self, policy: Reconnect) -> ConnectOptions {
        self.reconnect = Some(policy);
        self
    }

    /// Adds servers to try in turn when reconnecting.
    pub fn servers<S: Into<String>>(
        mut self,
        servers: impl IntoIterator<Item = S>,
    ) -> ConnectOptions {
        self.servers.extend(servers.into_iter().map(Into::into));
        self
    }

    /// Sets the per-subscription buffer.
    pub fn subscription_capacity(mut self, n: usize) -> ConnectOptions {
        self.subscription_capacity = n.max(1);
        self
    }
}

impl Default for ConnectOptions {
    fn default() -> ConnectOptions {
        ConnectOptions {
            name: "brokerd-client".into(),
            overflow: None,
            no_echo: false,
            subscription_capacity: 8192,
            write_buffer: 4 * 1024 * 1024,
            connect_timeout: Duration::from_secs(10),
            credentials: None,
            inbox_prefix: "_INBOX".into(),
            tls: None,
            reconnect: None,
            servers: Vec::new(),
        }
    }
}

/// What the server announced in its `WELCOME`.
pub type ServerInfo = Welcome;

/// A reply to one request.
enum Reply {
    Ok,
    Ack(u32),
    Pong,
    Err(u16, String),
}

struct WriteState {
    buf: BytesMut,
    /// Set once the client has closed for good.
    closed: Option<String>,
    /// Whether a connection is up; while it is not (reconnecting), only publishes without an
    /// acknowledgement are buffered, up to [`Reconnect::buffer_bytes`].
    connected: bool,
    /// The topic published last, known to be valid (empty before the first): publishing it
    /// again skips the check.
    valid_topic: String,
}

impl WriteState {
    fn check_topic(&mut self, topic: &str) -> Result<(), Error> {
        // A valid topic is never empty, so an empty one is always checked (and refused).
        if topic.is_empty() || self.valid_topic != topic {
            validate_topic(topic, &TopicLimits::WIRE).map_err(Error::InvalidTopic)?;
            self.valid_topic.clear();
            self.valid_topic.push_str(topic);
        }
        Ok(())
    }
}

struct SubEntry {
    tx: channel::Sender,
    shared: Arc<SubShared>,
    /// What it was made with, to make it again after a reconnect.
    filter: String,
    queue: Option<String>,
}

/// State shared by the [`Client`] handles, its subscriptions and its two tasks.
pub(crate) struct Inner {
    write: Mutex<WriteState>,
    /// Wakes the writer task when the buffer goes from empty to not empty, or on close.
    data: Notify,
    /// Wakes callers waiting for buffer space.
    space: Notify,
    next_id: AtomicU32,
    pending: Mutex<HashMap<u32, oneshot::Sender<Reply>>>,
    subs: Mutex<HashMap<u32, SubEntry>>,
    /// This connection's reply inbox prefix, subscribed on first use.
    inbox: tokio::sync::OnceCell<String>,
    /// The inbox subscription's id (0 until made).
    inbox_sid: AtomicU32,
    /// Requests waiting for their first reply, by the token ending their reply-to topic.
    replies: Mutex<HashMap<u32, oneshot::Sender<Message>>>,
    /// Set by `shutdown`: the reader stops delivering, even through its cached sender.
    shut: std::sync::atomic::AtomicBool,
    /// The current connection's `WELCOME`.
    info: Mutex<Arc<Welcome>>,
    /// Its `max_payload`, read by every publish.
    max_payload: AtomicU32,
    /// The largest frame read from the server: its `max_frame`, plus the few bytes by which a
    /// `MSG` header is longer than the `PUB` it came from.
    max_frame_in: std::sync::atomic::AtomicUsize,
    /// Why the last connection was lost, for calls that waited on it.
    lost: Mutex<String>,
    /// Subscriptions being made again after a reconnect: request id to subscription id, so
    /// that a refusal ends the subscription.
    resubs: Mutex<HashMap<u32, u32>>,
    /// Refusals the server sent for frames nobody waits on (publishes without
    /// acknowledgement), for [`Client::take_refusals`].
    refusals: Mutex<Refusals>,
    /// Connection events, for [`Client::events`].
    events: tokio::sync::broadcast::Sender<Event>,
    /// The address given to [`Client::connect`].
    server: String,
    options: ConnectOptions,
}

/// Refusals kept for [`Client::take_refusals`]; older ones are counted, not kept.
const MAX_REFUSALS: usize = 256;

#[derive(Default)]
struct Refusals {
    kept: std::collections::VecDeque<Error>,
    total: u64,
}

/// Extra bytes allowed in a frame from the server over its `max_frame` (a `MSG` carries a
/// subscription id and sequence where the `PUB` had a request id and flags).
const MSG_SLACK: usize = 64;

/// The largest frame accepted before a `WELCOME` says how large frames may be.
const HANDSHAKE_FRAME: usize = 64 * 1024;

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("name", &self.options.name)
            .field("server_id", &self.info.lock().server_id)
            .finish()
    }
}

/// A connection to brokerd. Cloning shares the connection; when the last clone is dropped the
/// connection closes (without flushing: call [`Client::close`] to flush first), and subscription
/// streams end.
#[derive(Clone, Debug)]
pub struct Client {
    _closer: Arc<Handle>,
    inner: Arc<Inner>,
}

/// Closes the connection when the last [`Client`] clone goes away; the connection's tasks hold
/// only [`Inner`], so they do not keep it open.
#[derive(Debug)]
struct Handle(Arc<Inner>);

impl Drop for Handle {
    fn drop(&mut self) {
        self.0.shutdown("client dropped");
    }
}

impl Client {
    /// Connects, performs the handshake and starts the connection's tasks.
    ///
    /// # Errors
    /// The address cannot be reached, the server refuses the handshake (for example at its
    /// connection limit), or it does not answer within `options.connect_timeout`.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # async fn demo() -> Result<(), brokerd_client::Error> {
    /// use brokerd_client::{Client, ConnectOptions, OverflowPolicy};
    /// let opts = ConnectOptions::new("analytics").overflow(OverflowPolicy::DropOld);
    /// let client = Client::connect("127.0.0.1:7654", opts).await?;
    /// println!("connected to {}", client.server_info().server_id);
    /// # Ok(()) }
    /// ```
    pub async fn connect(
        addr: impl std::fmt::Display,
        options: ConnectOptions,
    ) -> Result<Client, Error> {
        // Kept as text, so that reconnecting resolves a host name again.
        let server = addr.to_string();
        let (rd, wr, buf, info) = dial(&server, &options).await?;
        let inner = Inner::new(info, options, server);
        tokio::spawn(supervise(inner.clone(), rd, wr, buf));
        Ok(Client {
            _closer: Arc::new(Handle(inner.clone())),
            inner,
        })
    }

    /// Connection events: lost, reconnected, the server shutting down, closed for good. The
    /// receiver holds the last 64; one that falls further behind skips the oldest.
    pub fn events(&self) -> tokio::sync::broadcast::Receiver<Event> {
        self.inner.events.subscribe()
    }

    /// The refusals the server sent for requests nobody waited on, oldest first, since the
    /// last call: a publish without acknowledgement that the server refused (a reserved topic,
    /// a permission, a limit lower than the client checked against) is reported here, as
    /// [`Error::Server`]. At most the last 256 are kept; the second value counts them all.
    /// Call [`Client::flush`] first to be sure every refusal for what was sent has arrived.
    pub fn take_refusals(&self) -> (Vec<Error>, u64) {
        let mut r = self.inner.refusals.lock();
        let total = std::mem::take(&mut r.total);
        (r.kept.drain(..).collect(), total)
    }

    /// Whether a connection is up now (false while reconnecting, and once closed).
    pub fn is_connected(&self) -> bool {
        self.inner.write.lock().connected
    }

    /// What the server announced: its id, version, limits and the overflow policy in force
    /// (after a reconnect, the new server's).
    pub fn server_info(&self) -> Arc<ServerInfo> {
        self.inner.info.lock().clone()
    }

    /// Publishes `payload` to `topic`, without waiting for the server.
    ///
    /// Returns once the frame is buffered; it waits only when the write buffer is full.
    ///
    /// # Errors
    /// An invalid topic, a payload over the server's limit, or a closed connection. A refusal
    /// the server sends later (none is expected after these checks) is logged, not returned.
    pub async fn publish(&self, topic: &str, payload: impl AsRef<[u8]>) -> Result<(), Error> {
        let payload = payload.as_ref();
        // Appending to a buffer with room needs no future of its own; only a full buffer waits.
        if self.inner.try_publish(topic, payload)? {
            return Ok(());
        }
        self.inner
            .publish_with(topic, None, None, payload, false)
            .await
            .map(|_| ())
    }

    /// Publishes with a reply-to topic and/or headers, without waiting for the server.
    ///
    /// # Errors
    /// As [`Client::publish`], and an invalid reply-to.
    pub async fn publish_full(
        &self,
        topic: &str,
        reply: Option<&str>,
        headers: Option<&Headers>,
        payload: impl AsRef<[u8]>,
    ) -> Result<(), Error> {
        self.inner
            .publish_with(topic, reply, headers, payload.as_ref(), false)
            .await
            .map(|_| ())
    }

    /// Publishes with a reply-to topic and/or headers and waits for the acknowledgement,
    /// returning how many subscriptions the message was queued for.
    ///
    /// # Errors
    /// As [`Client::publish_full`], and any refusal from the server.
    pub async fn publish_full_acked(
        &self,
        topic: &str,
        reply: Option<&str>,
        headers: Option<&Headers>,
        payload: impl AsRef<[u8]>,
    ) -> Result<u32, Error> {
        self.inner
            .publish_with(topic, reply, headers, payload.as_ref(), true)
            .await
    }

    /// Publishes and waits for the server's acknowledgement, returning how many subscriptions the
    /// message was queued for.
    ///
    /// # Errors
    /// As [`Client::publish`], and any refusal from the server.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # async fn demo(client: brokerd_client::Client) -> Result<(), brokerd_client::Error> {
    /// let n = client.publish_acked("order.created", r#"{"order_id":"ord-1"}"#).await?;
    /// println!("order.created reached {n} subscribers");
    /// # Ok(()) }
    /// ```
    pub async fn publish_acked(
        &self,
        topic: &str,
        payload: impl AsRef<[u8]>,
    ) -> Result<u32, Error> {
        self.inner
            .publish_with(topic, None, None, payload.as_ref(), true)
            .await
    }

    /// Subscribes to `filter`. Once this returns, every message published afterwards that
    /// matches is delivered to the returned stream.
    ///
    /// # Errors
    /// An invalid filter, the server's subscription limit, or a closed connection.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # async fn demo(client: brokerd_client::Client) -> Result<(), brokerd_client::Error> {
    /// let mut errors = client.subscribe("*.error").await?;
    /// while let Some(msg) = errors.next().await {
    ///     println!("{}: {:?} (seq {})", msg.topic(), msg.payload(), msg.seq());
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn subscribe(&self, filter: &str) -> Result<Subscription, Error> {
        self.subscribe_inner(filter, None).await
    }

    /// Subscribes to `filter` as a member of queue group `group`: of all the group's
    /// subscriptions (on any connection) that match a message, exactly one receives it.
    ///
    /// # Errors
    /// As [`Client::subscribe`], and an invalid group name.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # async fn demo(client: brokerd_client::Client) -> Result<(), brokerd_client::Error> {
    /// let mut jobs = client.subscribe_queue("jobs.resize", "resizers").await?;
    /// while let Some(job) = jobs.next().await {
    ///     // Only this worker of the `resizers` group got this job.
    ///     # let _ = job;
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn subscribe_queue(&self, filter: &str, group: &str) -> Result<Subscription, Error> {
        self.subscribe_inner(filter, Some(group)).await
    }

    async fn subscribe_inner(
        &self,
        filter: &str,
        queue: Option<&str>,
    ) -> Result<Subscription, Error> {
        Filter::new(filter).map_err(Error::InvalidFilter)?;
        let sid = self.inner.next_id();
        let (tx, rx) = channel::channel(self.inner.options.subscription_capacity);
        let shared = Arc::new(SubShared::default());
        self.inner.subs.lock().insert(
            sid,
            SubEntry {
                tx,
                shared: shared.clone(),
                filter: filter.to_string(),
                queue: queue.map(str::to_string),
            },
        );
        let req_id = self.inner.next_id();
        let frame = Frame::Sub(Subscribe {
            req_id,
            sid,
            filter: filter.to_string(),
            queue: queue.map(str::to_string),
        });
        let result = self.inner.request(req_id, frame).await;
        if let Err(e) = result {
            self.inner.forget(sid);
            return Err(e);
        }
        Ok(Subscription {
            sid,
            filter: filter.to_string(),
            rx,
            buffered: std::collections::VecDeque::new(),
            shared,
            client: self.inner.clone(),
            active: true,
        })
    }

    /// Sends a request and waits for the first reply, up to `timeout`.
    ///
    /// The request carries a reply-to topic under this connection's inbox (one wildcard
    /// subscription per connection, made on the first request). When the broker queued the
    /// request for no subscription at all (nothing matched, or every match dropped it under its
    /// overflow policy), this fails at once with [`Error::NoResponders`] instead of waiting.
    ///
    /// # Errors
    /// [`Error::NoResponders`], [`Error::Timeout`], an invalid topic, or a closed connection.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # async fn demo(client: brokerd_client::Client) -> Result<(), brokerd_client::Error> {
    /// use std::time::Duration;
    /// match client.request("price.quote", r#"{"sku":"mug"}"#, Duration::from_secs(2)).await {
    ///     Ok(reply) => println!("quote: {:?}", reply.payload()),
    ///     Err(brokerd_client::Error::NoResponders(_)) => println!("no pricing service is running"),
    ///     Err(e) => return Err(e),
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn request(
        &self,
        topic: &str,
        payload: impl AsRef<[u8]>,
        timeout: Duration,
    ) -> Result<Message, Error> {
        let deadline = tokio::time::Instant::now() + timeout;
        let prefix = tokio::time::timeout_at(deadline, self.inner.inbox())
            .await
            .map_err(|_| Error::Timeout)??;
        let token = self.inner.next_id();
        let reply_to = format!("{prefix}.{token}");
        let (tx, rx) = oneshot::channel();
        self.inner.replies.lock().insert(token, tx);
        // However this call ends (reply, error, timeout, or the caller dropping it), its waiter
        // goes; removing one the reader already took is harmless.
        let _waiter = Forget(&self.inner.replies, token);
        let sent = tokio::time::timeout_at(
            deadline,
            self.inner
                .publish_with(topic, Some(&reply_to), None, payload.as_ref(), true),
        )
        .await;
        match sent {
            Err(_) => return Err(Error::Timeout),
            Ok(Err(e)) => return Err(e),
            Ok(Ok(0)) => return Err(Error::NoResponders(topic.to_string())),
            Ok(Ok(_)) => {}
        }
        match tokio::time::timeout_at(deadline, rx).await {
            Ok(Ok(msg)) => Ok(msg),
            Ok(Err(_)) => Err(self.inner.lost_error()),
            Err(_) => Err(Error::Timeout),
        }
    }

    /// Waits until the server has processed everything this client sent before the call.
    ///
    /// # Errors
    /// The connection closed.
    pub async fn flush(&self) -> Result<(), Error> {
        let id = self.inner.next_id();
        self.inner.request(id, Frame::Ping(id)).await
    }

    /// Flushes, then closes the connection. Subscription streams end.
    ///
    /// # Errors
    /// The connection was already closed.
    pub async fn close(self) -> Result<(), Error> {
        let r = self.flush().await;
        self.inner.shutdown("closed by the client");
        r
    }
}

impl Inner {
    fn new(info: Welcome, options: ConnectOptions, server: String) -> Arc<Inner> {
        Arc::new(Inner {
            write: Mutex::new(WriteState {
                buf: BytesMut::with_capacity(64 * 1024),
                closed: None,
                connected: true,
                valid_topic: String::new(),
            }),
            data: Notify::new(),
            space: Notify::new(),
            next_id: AtomicU32::new(1),
            pending: Mutex::new(HashMap::new()),
            subs: Mutex::new(HashMap::new()),
            inbox: tokio::sync::OnceCell::new(),
            inbox_sid: AtomicU32::new(0),
            replies: Mutex::new(HashMap::new()),
            shut: std::sync::atomic::AtomicBool::new(false),
            max_payload: AtomicU32::new(info.max_payload),
            max_frame_in: std::sync::atomic::AtomicUsize::new(
                (info.max_frame as usize).saturating_add(MSG_SLACK),
            ),
            info: Mutex::new(Arc::new(info)),
            lost: Mutex::new(String::new()),
            resubs: Mutex::new(HashMap::new()),
            refusals: Mutex::new(Refusals::default()),
            events: tokio::sync::broadcast::channel(64).0,
            server,
            options,
        })
    }

    /// Puts a new connection's `WELCOME` in force.
    fn set_info(&self, info: Welcome) {
        self.max_payload.store(info.max_payload, Ordering::Relaxed);
        self.max_frame_in.store(
            (info.max_frame as usize).saturating_add(MSG_SLACK),
            Ordering::Relaxed,
        );
        *self.info.lock() = Arc::new(info);
    }

    /// The error for a call whose connection went away while it waited.
    fn lost_error(&self) -> Error {
        let w = self.write.lock();
        match &w.closed {
            Some(reason) => Error::Closed(reason.clone()),
            None => Error::Disconnected(self.lost.lock().clone()),
        }
    }

    fn emit(&self, event: Event) {
        // Nobody listening is fine.
        let _ = self.events.send(event);
    }

    /// State for a connection that does not exist, for unit tests of the parts around it.
    #[cfg(test)]
    pub(crate) fn for_test() -> Arc<Inner> {
        Inner::new(
            Welcome {
                req_id: 0,
                version: PROTOCOL_VERSION,
                overflow: OverflowPolicy::DropNew,
                max_frame: 1 << 20,
                max_payload: 1 << 20,
                max_topic_len: 256,
                max_topic_tokens: 16,
                max_subs: 16,
                max_pending_msgs: 16,
                max_pending_bytes: 1 << 20,
                server_id: "test".into(),
            },
            ConnectOptions::default(),
            "test".into(),
        )
    }

    /// Refuses a payload over the limit the server announced.
    fn check_payload(&self, payload: &[u8]) -> Result<(), Error> {
        let max = self.max_payload.load(Ordering::Relaxed) as usize;
        if payload.len() > max {
            return Err(Error::PayloadTooLarge {
                len: payload.len(),
                max,
            });
        }
        Ok(())
    }

    /// Appends a plain `PUB` (no reply-to, headers or ack) if the write buffer has room.
    /// `Ok(false)`: the buffer is full (or the connection closed); nothing was appended, and
    /// [`Inner::publish_with`] waits for room or reports the close.
    fn try_publish(&self, topic: &str, payload: &[u8]) -> Result<bool, Error> {
        let mut w = self.write.lock();
        // The same order of checks as `publish_with`: topic, then payload size.
        w.check_topic(topic)?;
        self.check_payload(payload)?;
        let body = BodyBuilder {
            topic,
            reply: None,
            headers: None,
            payload,
        };
        if w.closed.is_some() || !w.connected || w.buf.len() >= self.options.write_buffer {
            return Ok(false);
        }
        let was_empty = w.buf.is_empty();
        encode_pub(&mut w.buf, self.next_id(), false, &body);
        drop(w);
        if was_empty {
            self.data.notify_one();
        }
        Ok(true)
    }

    pub(crate) async fn publish_with(
        &self,
        topic: &str,
        reply: Option<&str>,
        headers: Option<&Headers>,
        payload: &[u8],
        ack: bool,
    ) -> Result<u32, Error> {
        validate_topic(topic, &TopicLimits::WIRE).map_err(Error::InvalidTopic)?;
        if let Some(r) = reply {
            validate_topic(r, &TopicLimits::WIRE).map_err(Error::InvalidReplyTo)?;
        }
        self.check_payload(payload)?;
        let body = BodyBuilder {
            topic,
            reply,
            headers,
            payload,
        };
        if !body.fits() {
            return Err(Error::Unexpected("a header is longer than 65535 bytes"));
        }
        let id = self.next_id();
        let rx = ack.then(|| self.expect(id));
        let _pending = ack.then(|| Forget(&self.pending, id));
        if let Err(e) = self.send(!ack, |buf| encode_pub(buf, id, ack, &body)).await {
            self.pending.lock().remove(&id);
            return Err(e);
        }
        match rx {
            None => Ok(0),
            Some(rx) => match self.wait(rx).await? {
                Reply::Ack(n) => Ok(n),
                _ => Err(Error::Unexpected("expected ACK")),
            },
        }
    }

    /// The inbox prefix, subscribing `PREFIX.*` on first use.
    async fn inbox(&self) -> Result<&str, Error> {
        let prefix = self
            .inbox
            .get_or_try_init(|| async {
                let prefix = format!("{}.{}", self.options.inbox_prefix, unique_token());
                let sid = self.next_id();
                let req_id = self.next_id();
                self.inbox_sid.store(sid, Ordering::Relaxed);
                let frame = Frame::Sub(Subscribe {
                    req_id,
                    sid,
                    filter: format!("{prefix}.*"),
                    queue: None,
                });
                if let Err(e) = self.request(req_id, frame).await {
                    self.inbox_sid.store(0, Ordering::Relaxed);
                    return Err(e);
                }
                Ok(prefix)
            })
            .await?;
        Ok(prefix)
    }

    fn next_id(&self) -> u32 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    fn expect(&self, id: u32) -> oneshot::Receiver<Reply> {
        let (tx, rx) = oneshot::channel();
        self.pending.lock().insert(id, tx);
        rx
    }

    async fn wait(&self, rx: oneshot::Receiver<Reply>) -> Result<Reply, Error> {
        match rx.await {
            Ok(Reply::Err(code, message)) => Err(Error::Server { code, message }),
            Ok(r) => Ok(r),
            Err(_) => Err(self.lost_error()),
        }
    }

    /// Sends a frame that expects `OK` (or `PONG`) under `id`, and waits for it.
    async fn request(&self, id: u32, frame: Frame) -> Result<(), Error> {
        let rx = self.expect(id);
        let _pending = Forget(&self.pending, id);
        if let Err(e) = self.send(false, |buf| frame.encode(buf)).await {
            self.pending.lock().remove(&id);
            return Err(e);
        }
        self.wait(rx).await.map(|_| ())
    }

    pub(crate) async fn unsubscribe(&self, sid: u32, max: u32) -> Result<(), Error> {
        let id = self.next_id();
        self.request(
            id,
            Frame::Unsub(Unsubscribe {
                req_id: id,
                sid,
                max,
            }),
        )
        .await
    }

    /// Stops routing deliveries for `sid`; its stream ends once drained.
    pub(crate) fn forget(&self, sid: u32) {
        self.subs.lock().remove(&sid);
    }

    /// Queues an `UNSUB` without waiting (used from `Drop`). While disconnected there is
    /// nothing to end: the subscription is not made again.
    pub(crate) fn send_unsub_nowait(&self, sid: u32) {
        if !self.write.lock().connected {
            return;
        }
        let id = self.next_id();
        let frame = Frame::Unsub(Unsubscribe {
            req_id: id,
            sid,
            max: 0,
        });
        self.append(|buf| frame.encode(buf));
    }

    /// Appends to the write buffer without waiting for space; returns false once closed.
    fn append(&self, encode: impl FnOnce(&mut BytesMut)) -> bool {
        let mut w = self.write.lock();
        if w.closed.is_some() {
            return false;
        }
        let was_empty = w.buf.is_empty();
        encode(&mut w.buf);
        drop(w);
        if was_empty {
            self.data.notify_one();
        }
        true
    }

    /// Appends to the write buffer, first waiting while it is over its limit. While
    /// disconnected, a frame that may wait for the next connection (`bufferable`: a publish
    /// without acknowledgement) is buffered up to [`Reconnect::buffer_bytes`]; anything else
    /// fails at once with [`Error::Disconnected`].
    async fn send(
        &self,
        bufferable: bool,
        encode: impl FnOnce(&mut BytesMut),
    ) -> Result<(), Error> {
        // The common case, room in the buffer, appends without preparing to wait.
        {
            let mut w = self.write.lock();
            if let Some(reason) = &w.closed {
                return Err(Error::Closed(reason.clone()));
            }
            if !w.connected {
                let limit = self
                    .options
                    .reconnect
                    .as_ref()
                    .map_or(0, |r| r.buffer_bytes);
                if !bufferable {
                    return Err(Error::Disconnected(self.lost.lock().clone()));
                }
                let before = w.buf.len();
                encode(&mut w.buf);
                if w.buf.len() > limit {
                    w.buf.truncate(before);
                    return Err(Error::Disconnected(format!(
                        "reconnecting, and the {limit} bytes buffered meanwhile are full"
                    )));
                }
                return Ok(());
            }
            if w.buf.len() < self.options.write_buffer {
                let was_empty = w.buf.is_empty();
                encode(&mut w.buf);
                drop(w);
                if was_empty {
                    self.data.notify_one();
                }
                return Ok(());
            }
        }
        loop {
            let space = self.space.notified();
            tokio::pin!(space);
            space.as_mut().enable();
            {
                let w = self.write.lock();
                if let Some(reason) = &w.closed {
                    return Err(Error::Closed(reason.clone()));
                }
                if w.buf.len() < self.options.write_buffer || !w.connected {
                    break;
                }
            }
            space.await;
        }
        Box::pin(self.send(bufferable, encode)).await
    }

    /// The connection is lost and the client is reconnecting: calls waiting for the server fail
    /// with [`Error::Disconnected`]; what was buffered for the lost connection goes with it;
    /// subscriptions stay, to be made again.
    fn disconnected(&self, reason: &str) {
        *self.lost.lock() = reason.to_string();
        {
            let mut w = self.write.lock();
            w.connected = false;
            w.buf.clear();
        }
        self.pending.lock().clear();
        self.replies.lock().clear();
        self.resubs.lock().clear();
        self.space.notify_waiters();
        self.emit(Event::Disconnected {
            reason: reason.to_string(),
        });
    }

    /// A new connection is up: its `WELCOME` is in force, every live subscription (and the
    /// request inbox) is made again first, then the publishes buffered meanwhile follow.
    fn reconnected(&self, info: Welcome) {
        self.set_info(info);
        let mut first = BytesMut::new();
        {
            let subs = self.subs.lock();
            let mut resubs = self.resubs.lock();
            for (sid, entry) in subs.iter() {
                let req_id = self.next_id();
                resubs.insert(req_id, *sid);
                entry.shared.resubscribed.fetch_add(1, Ordering::Relaxed);
                Frame::Sub(Subscribe {
                    req_id,
                    sid: *sid,
                    filter: entry.filter.clone(),
                    queue: entry.queue.clone(),
                })
                .encode(&mut first);
            }
        }
        let inbox_sid = self.inbox_sid.load(Ordering::Relaxed);
        if let (Some(prefix), true) = (self.inbox.get(), inbox_sid != 0) {
            Frame::Sub(Subscribe {
                req_id: self.next_id(),
                sid: inbox_sid,
                filter: format!("{prefix}.*"),
                queue: None,
            })
            .encode(&mut first);
        }
        {
            let mut w = self.write.lock();
            first.extend_from_slice(&w.buf);
            w.buf = first;
            w.connected = true;
        }
        self.data.notify_one();
    }

    /// Marks the connection closed, fails waiting calls and ends every subscription stream.
    fn shutdown(&self, reason: &str) {
        self.shut.store(true, Ordering::Release);
        {
            let mut w = self.write.lock();
            w.connected = false;
            if w.closed.is_none() {
                w.closed = Some(reason.to_string());
            }
        }
        self.pending.lock().clear();
        self.replies.lock().clear();
        self.subs.lock().clear();
        self.data.notify_one();
        self.space.notify_waiters();
    }
}

/// The connection's read side, plain or TLS.
type ReadHalf = Box<dyn AsyncRead + Send + Unpin>;
/// The connection's write side, plain or TLS.
type WriteHalf = Box<dyn AsyncWrite + Send + Unpin>;

/// A failed TLS handshake, with a hint when the server answered in plain brokerd frames.
fn tls_error(e: std::io::Error) -> Error {
    let text = e.to_string();
    if text.contains("InvalidContentType") || text.contains("corrupt message") {
        return Error::Tls(format!(
            "{text}: the server did not answer with TLS; is this its plain port?"
        ));
    }
    Error::Tls(text)
}

/// How one connection ended.
struct Ended {
    reason: String,
    /// The code of the closing `ERR` the server sent, if it sent one.
    code: Option<u16>,
}

impl Ended {
    fn io(reason: String) -> Ended {
        Ended { reason, code: None }
    }
}

async fn write_task(inner: Arc<Inner>, mut wr: WriteHalf) -> Ended {
    let mut out = BytesMut::with_capacity(64 * 1024);
    loop {
        let closed = {
            let mut w = inner.write.lock();
            std::mem::swap(&mut w.buf, &mut out);
            w.closed.is_some()
        };
        inner.space.notify_waiters();
        if !out.is_empty() {
            if let Err(e) = wr.write_all(&out).await {
                return Ended::io(format!("write failed: {e}"));
            }
            out.clear();
            continue;
        }
        if closed {
            let _ = wr.shutdown().await;
            return Ended::io("closed by the client".into());
        }
        inner.data.notified().await;
    }
}

/// Runs one connection after another: reader and writer until either ends, then, if the
/// client reconnects, new connections until one succeeds or the attempts run out.
async fn supervise(inner: Arc<Inner>, mut rd: ReadHalf, mut wr: WriteHalf, mut buf: BytesMut) {
    let mut server = inner.server.clone();
    loop {
        let mut reader = tokio::spawn(read_task(inner.clone(), rd, buf));
        let mut writer = tokio::spawn(write_task(inner.clone(), wr));
        let ended = tokio::select! {
            r = &mut reader => { writer.abort(); r }
            w = &mut writer => { reader.abort(); w }
        };
        let ended = ended.unwrap_or_else(|e| Ended::io(format!("connection task failed: {e}")));
        let shutting_down = ended.code == Some(ErrorCode::ShuttingDown as u16);
        if shutting_down {
            inner.emit(Event::ServerShuttingDown);
        }
        let refused = ended.code == Some(ErrorCode::AuthenticationFailed as u16);
        let policy = match &inner.options.reconnect {
            Some(p) if !inner.shut.load(Ordering::Acquire) && !refused => p.clone(),
            _ => {
                inner.shutdown(&ended.reason);
                inner.emit(Event::Closed {
                    reason: ended.reason,
                });
                return;
            }
        };
        inner.disconnected(&ended.reason);
        tracing::warn!(server = %server, reason = %ended.reason, "connection lost; reconnecting");
        let servers: Vec<String> = std::iter::once(inner.server.clone())
            .chain(inner.options.servers.iter().cloned())
            .collect();
        // Start with the server after the one just lost (the same one when there is one).
        let start = servers
            .iter()
            .position(|s| *s == server)
            .map_or(0, |i| i + 1);
        let mut attempt = 0u32;
        let next = loop {
            if policy.max_attempts.is_some_and(|max| attempt >= max) {
                break None;
            }
            tokio::time::sleep(policy.delay(attempt, jitter())).await;
            if inner.shut.load(Ordering::Acquire) {
                break None;
            }
            let candidate = &servers[(start + attempt as usize) % servers.len()];
            attempt += 1;
            match dial(candidate, &inner.options).await {
                Ok(conn) => break Some((candidate.clone(), conn)),
                Err(e) => {
                    tracing::debug!(server = %candidate, attempt, error = %e, "reconnect attempt failed")
                }
            }
        };
        let Some((reached, (r, w, b, info))) = next else {
            let reason = if inner.shut.load(Ordering::Acquire) {
                "closed by the client".to_string()
            } else {
                format!(
                    "could not reconnect in {attempt} attempts; last lost: {}",
                    ended.reason
                )
            };
            inner.shutdown(&reason);
            inner.emit(Event::Closed { reason });
            return;
        };
        inner.reconnected(info);
        tracing::info!(server = %reached, attempts = attempt, "reconnected");
        inner.emit(Event::Reconnected {
            server: reached.clone(),
            attempts: attempt,
        });
        server = reached;
        (rd, wr, buf) = (r, w, b);
    }
}

/// A random fraction in [0, 1), for reconnect jitter.
fn jitter() -> f64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(u64::from(std::process::id()));
    (h.finish() >> 11) as f64 / (1u64 << 53) as f64
}

/// Connects to `server` and completes the handshake, within `options.connect_timeout`.
async fn dial(
    server: &str,
    options: &ConnectOptions,
) -> Result<(ReadHalf, WriteHalf, BytesMut, Welcome), Error> {
    tokio::time::timeout(options.connect_timeout, dial_inner(server, options))
        .await
        .map_err(|_| Error::Timeout)?
}

async fn dial_inner(
    server: &str,
    options: &ConnectOptions,
) -> Result<(ReadHalf, WriteHalf, BytesMut, Welcome), Error> {
    let stream = TcpStream::connect(server).await?;
    stream.set_nodelay(true)?;
    let (mut rd, mut wr): (ReadHalf, WriteHalf) = match &options.tls {
        None => {
            let (rd, wr) = stream.into_split();
            (Box::new(rd), Box::new(wr))
        }
        Some(tls) => {
            let connector = tokio_rustls::TlsConnector::from(tls.config.clone());
            // rustls reads 4 KiB per call: the buffer makes that one system call per 64 KiB,
            // for one copy of the ciphertext.
            let stream = connector
                .connect(
                    tls.server_name.clone(),
                    tokio::io::BufReader::with_capacity(64 * 1024, stream),
                )
                .await
                .map_err(tls_error)?;
            let (rd, wr) = tokio::io::split(stream);
            (Box::new(rd), Box::new(wr))
        }
    };
    let hello = Frame::Hello(Hello {
        req_id: 0,
        version: PROTOCOL_VERSION,
        no_echo: options.no_echo,
        overflow: options.overflow,
        name: options.name.clone(),
        credentials: options.credentials.clone(),
    });
    wr.write_all(&hello.to_bytes()).await?;
    let mut buf = BytesMut::with_capacity(64 * 1024);
    let info = loop {
        match decode(&mut buf, HANDSHAKE_FRAME)? {
            Some(Frame::Welcome(w)) => break w,
            Some(Frame::Err(e)) => {
                return Err(Error::Server {
                    code: e.code,
                    message: e.message,
                });
            }
            Some(_) => return Err(Error::Unexpected("expected WELCOME")),
            None => {}
        }
        if rd.read_buf(&mut buf).await? == 0 {
            return Err(Error::Closed(
                "server closed the connection during the handshake".into(),
            ));
        }
    };
    Ok((rd, wr, buf, info))
}

/// Read buffer growth of a new connection, and what it grows to for a connection whose reads
/// keep filling the buffer (a busy subscriber then reads, and wakes, a quarter as often).
const READ_CHUNK: usize = 64 * 1024;
const READ_CHUNK_MAX: usize = 256 * 1024;

async fn read_task(inner: Arc<Inner>, mut rd: ReadHalf, mut buf: BytesMut) -> Ended {
    let mut last = None;
    let mut chunk = READ_CHUNK;
    loop {
        match read_frames(&inner, &mut buf, &mut last).await {
            Ok(()) => {}
            Err(ended) => return ended,
        }
        if buf.capacity() - buf.len() < 4096 {
            buf.reserve(chunk);
        }
        let free = buf.capacity() - buf.len();
        match rd.read_buf(&mut buf).await {
            Ok(0) => return Ended::io("server closed the connection".into()),
            Ok(n) => {
                if n == free && chunk < READ_CHUNK_MAX {
                    chunk *= 2;
                }
            }
            Err(e) => return Ended::io(format!("read failed: {e}")),
        }
    }
}

/// The subscription that received the previous message, and the messages for it not yet handed
/// over: a run of deliveries for one subscription takes the subscription map's lock once and the
/// subscription's queue lock once per [`DELIVERY_BATCH`] messages.
struct Delivery {
    sid: u32,
    tx: channel::Sender,
    batch: Vec<Message>,
}

/// At most this many messages are held back before being handed to their subscription.
const DELIVERY_BATCH: usize = 256;

/// Hands the held-back messages to their subscription, waiting for room in its queue. A
/// subscription that is gone is forgotten.
async fn deliver(inner: &Inner, last: &mut Option<Delivery>) {
    let Some(d) = last.as_mut() else {
        return;
    };
    if d.batch.is_empty() {
        return;
    }
    // Waiting here is deliberate: a reader that cannot keep up pushes back on the socket, and
    // the server's overflow policy decides what is dropped.
    if d.tx.send_all(&mut d.batch).await.is_err() {
        inner.forget(d.sid);
        *last = None;
    }
}

/// Why [`gather`] stopped.
enum Gathered {
    /// The batch is full.
    Full,
    /// A message for another subscription than the batch's (or the first one).
    Other(Message),
    /// A reply to a request.
    Inbox(Message),
    /// A frame other than `MSG`.
    Control(Frame),
    /// Nothing complete is left in the buffer.
    Drained,
    /// The connection was closed by this side.
    Closed,
    /// The server sent something undecodable.
    Undecodable(String),
}

/// Moves the `MSG` frames at the front of `buf` into the batch of `last` for as long as they are
/// for its subscription. Synchronous, so that the run of messages a subscriber mostly reads stays
/// out of the reader task's future: only the frame that ends the run crosses an `.await`.
fn gather(inner: &Arc<Inner>, buf: &mut BytesMut, last: &mut Option<Delivery>) -> Gathered {
    let limit = inner.max_frame_in.load(Ordering::Relaxed);
    loop {
        // The frame a subscriber mostly reads is taken without building a `Frame`.
        let (sid, seq, body) = match take_msg(buf, limit) {
            Some(Ok(m)) => m,
            Some(Err(e)) => return Gathered::Undecodable(e.to_string()),
            None => match decode(buf, limit) {
                Ok(Some(Frame::Msg(Msg { sid, seq, body }))) => (sid, seq, body),
                Ok(Some(frame)) => return Gathered::Control(frame),
                Ok(None) => return Gathered::Drained,
                Err(e) => return Gathered::Undecodable(e.to_string()),
            },
        };
        if inner.shut.load(Ordering::Acquire) {
            return Gathered::Closed;
        }
        let client = body.reply().is_some().then(|| inner.clone());
        let msg = Message {
            sid,
            seq,
            body,
            client,
        };
        if sid == inner.inbox_sid.load(Ordering::Relaxed) {
            return Gathered::Inbox(msg);
        }
        match last.as_mut() {
            Some(d) if d.sid == sid => {
                d.batch.push(msg);
                if d.batch.len() >= DELIVERY_BATCH {
                    return Gathered::Full;
                }
            }
            _ => return Gathered::Other(msg),
        }
    }
}

/// Dispatches every complete frame in `buf`; `Err` carries why the connection must end.
/// Messages are handed to subscriptions in batches (see [`Delivery`]); every other frame, an
/// inbox reply, and the end of what was read first hand over what is held, so a reply (such as
/// the `OK` that ends an unsubscribe) is never seen before the messages that preceded it.
async fn read_frames(
    inner: &Arc<Inner>,
    buf: &mut BytesMut,
    last: &mut Option<Delivery>,
) -> Result<(), Ended> {
    loop {
        let gathered = gather(inner, buf, last);
        deliver(inner, last).await;
        match gathered {
            Gathered::Full => {}
            Gathered::Other(msg) => {
                let batch = last.take().map(|d| d.batch);
                // A message for a subscription already gone (one ended while it was in flight)
                // allocates nothing.
                *last = inner.subs.lock().get(&msg.sid).map(|s| Delivery {
                    sid: msg.sid,
                    tx: s.tx.clone(),
                    batch: batch.unwrap_or_else(|| Vec::with_capacity(DELIVERY_BATCH)),
                });
                if let Some(d) = last.as_mut() {
                    d.batch.push(msg);
                }
            }
            Gathered::Inbox(msg) => {
                let token = msg.topic().rsplit('.').next().and_then(|t| t.parse().ok());
                let waiter = token.and_then(|t: u32| inner.replies.lock().remove(&t));
                // Later replies to the same request, and replies after a timeout, are dropped.
                if let Some(w) = waiter {
                    let _ = w.send(msg);
                }
            }
            Gathered::Control(frame) => control(inner, frame)?,
            Gathered::Drained => return Ok(()),
            Gathered::Closed => {
                // What was read before the close was handed over above; nothing after it.
                *last = None;
                return Err(Ended::io("connection closed".into()));
            }
            Gathered::Undecodable(e) => {
                return Err(Ended::io(format!("undecodable frame from server: {e}")));
            }
        }
    }
}

/// Acts on a frame other than `MSG`; `Err` carries why the connection must end.
fn control(inner: &Inner, frame: Frame) -> Result<(), Ended> {
    let reply = match frame {
        Frame::Msg(_) => return Ok(()),
        Frame::Lost(l) => {
            if let Some(s) = inner.subs.lock().get(&l.sid) {
                s.shared.missed.fetch_add(l.missed, Ordering::Relaxed);
            }
            tracing::warn!(
                sid = l.sid,
                missed = l.missed,
                "server dropped messages for a slow subscription"
            );
            return Ok(());
        }
        Frame::Ping(t) => {
            inner.append(|b| Frame::Pong(t).encode(b));
            return Ok(());
        }
        Frame::Ok(id) => {
            inner.resubs.lock().remove(&id);
            (id, Reply::Ok)
        }
        Frame::Pong(id) => (id, Reply::Pong),
        Frame::Ack { req_id, delivered } => (req_id, Reply::Ack(delivered)),
        Frame::Err(e) => {
            if let Some(sid) = inner.resubs.lock().remove(&e.req_id) {
                // A subscription the new connection refused (its rules changed, say) ends.
                tracing::warn!(sid, code = e.code, message = %e.message, "subscription not made again after reconnecting");
                inner.forget(sid);
                return Ok(());
            }
            if e.req_id == 0 || !inner.pending.lock().contains_key(&e.req_id) {
                let fatal = ErrorCode::from_u16(e.code).is_none_or(|c| c.closes_connection());
                if fatal {
                    return Err(Ended {
                        reason: format!("server error {}: {}", e.code, e.message),
                        code: Some(e.code),
                    });
                }
                tracing::debug!(code = e.code, message = %e.message, req_id = e.req_id, "server refused a request nobody waits on");
                let mut r = inner.refusals.lock();
                if r.kept.len() == MAX_REFUSALS {
                    r.kept.pop_front();
                }
                r.kept.push_back(Error::Server {
                    code: e.code,
                    message: e.message,
                });
                r.total += 1;
                return Ok(());
            }
            (e.req_id, Reply::Err(e.code, e.message))
        }
        Frame::Hello(_) | Frame::Pub(_) | Frame::Sub(_) | Frame::Unsub(_) | Frame::Welcome(_) => {
            return Err(Ended::io("server sent a client frame".into()));
        }
    };
    if let Some(tx) = inner.pending.lock().remove(&reply.0) {
        let _ = tx.send(reply.1);
    }
    Ok(())
}

/// A token unlikely to repeat across connections: the standard library's random hasher keys
/// mixed with the time, in hex.
fn unique_token() -> String {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    h.write_u128(nanos);
    format!("{:016x}", h.finish())
}

/// Removes `key` from a map of waiters when dropped.
struct Forget<'a, V>(&'a Mutex<HashMap<u32, V>>, u32);

impl<V> Drop for Forget<'_, V> {
    fn drop(&mut self) {
        self.0.lock().remove(&self.1);
    }
}
