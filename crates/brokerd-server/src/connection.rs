//! One client connection: handshake, the reader loop, keep-alive, and the end of the connection.
//!
//! The connection task reads and decodes frames and acts on each at once: a `PUB` is routed into
//! every matching subscriber's outbox before the next frame is looked at, without awaiting
//! anything but this connection's own socket. Replies go through the connection's own outbox, so
//! the writer task ([`crate::writer`]) is the only code that writes to the socket once the
//! handshake is done. When reading ends, the task closes the outbox with its reason, waits for the
//! writer, removes the client from the broker and logs the close reason once.
//!
//! The connection holds a [`Ticket`] from accept to its end: a handshake slot until its `HELLO`
//! is accepted, then a `max_connections` slot. Client-supplied text reaches a log line only
//! through [`Escaped`].

use crate::admission::Ticket;
use crate::auth::AuthError;
use crate::config::Config;
use crate::escape::Escaped;
use crate::server::Shared;
use crate::streams::{AckTo, Admit, Capture, StreamHandle};
use crate::writer;
use brokerd_core::{
    Client, CloseReason, DETACH_BELOW, Identity, OutboxStats, Publication, PublishError, Quota,
    RawBody, RouteCache,
};
use brokerd_proto::{
    DecodeError, ErrorCode, ErrorFrame, Frame, FrameType, Hello, MAX_HELLO_LEN, PROTOCOL_VERSION,
    Publish, Subscribe, Welcome, decode, peek_pub, streams::STREAM_REQUEST_PREFIX,
    topic::STATS_REQUEST,
};
use bytes::{Buf, BytesMut};
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::task_tracker::TaskTrackerToken;
use tracing::{debug, info, warn};

/// Free space below which the read buffer grows by its connection's chunk size.
const READ_MIN_FREE: usize = 4 * 1024;
/// Read buffer chunk size of a new connection.
const READ_CHUNK: usize = 64 * 1024;
/// The chunk size a connection whose reads keep filling its buffer grows to: a streaming
/// publisher then needs a quarter of the reads (and of the reader's wake-ups and yields), which
/// measured as a third more throughput for 1 KiB messages (docs/performance.md). Connections
/// with lighter traffic never touch more than the smaller chunk, nor do connections publishing
/// bodies of [`DETACH_BELOW`] or more, which are queued as slices of the read buffer and would
/// keep a larger buffer alive.
const READ_CHUNK_MAX: usize = 256 * 1024;
/// A read at least this long is followed by a yield (see the read loop).
const YIELD_AFTER: usize = 4 * 1024;
/// A frame at least this large gets a buffer of its own exact size, so that a shared body does
/// not pin a larger allocation.
const LARGE_FRAME: usize = 16 * 1024;
/// Routing work (one unit per trie position a match-cache miss visits) after which a reader gives
/// up its worker before acting on its next frame, so that one connection's expensive matches
/// delay the others by a bounded amount: about a millisecond of walking.
const WORK_BUDGET: usize = 16 * 1024;
/// How often a reader waiting for the memory budget looks again.
const MEMORY_POLL: std::time::Duration = std::time::Duration::from_millis(20);
/// Longest text of an `ERR` frame: what quotes a client's input quotes at most a prefix of it.
const MAX_ERR_TEXT: usize = 256;

/// How the reader loop ended.
enum ReadEnd {
    /// The connection should close for this reason, after writing what is queued.
    Close(CloseReason),
    /// The server is shutting down; it closes every outbox once all readers have stopped.
    Shutdown,
    /// The writer ended first (socket error, slow consumer, ...).
    WriterGone,
}

/// Serves one accepted connection to its end. `ticket` is the connection's admission, held (and
/// so counted) until this returns.
pub(crate) async fn serve(
    stream: TcpStream,
    peer: SocketAddr,
    shared: Arc<Shared>,
    ticket: Ticket,
    reading: TaskTrackerToken,
    teardown: TaskTrackerToken,
    secure: bool,
) {
    let _ = stream.set_nodelay(true);
    // The whole handshake, TLS and authentication included, has the handshake timeout.
    let deadline = Instant::now() + shared.config.load().timeouts.handshake;
    let tls = match (&shared.tls, secure) {
        (Some(tls), true) => tls,
        _ => {
            let halves = stream.into_split();
            return serve_halves(
                halves,
                peer,
                shared,
                ticket,
                reading,
                teardown,
                deadline,
                Vec::new(),
            )
            .await;
        }
    };
    let eviction = ticket.eviction();
    let accepted = tokio::select! {
        r = tokio::time::timeout_at(deadline, accept_tls(stream, tls)) => match r {
            Ok(r) => r,
            Err(_) => Err(CloseReason::HandshakeTimeout),
        },
        _ = eviction.cancelled() => Err(CloseReason::TooManyHandshakes),
        _ = shared.shutdown.cancelled() => Err(CloseReason::ServerShutdown),
    };
    match accepted {
        Ok(stream) => {
            let names = stream
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|c| c.first())
                .map(crate::tls::certificate_names)
                .unwrap_or_default();
            let halves = tokio::io::split(stream);
            serve_halves(
                halves, peer, shared, ticket, reading, teardown, deadline, names,
            )
            .await;
        }
        Err(reason) => {
            if matches!(
                reason,
                CloseReason::WrongTransport(_) | CloseReason::TlsFailed(_)
            ) && let Some(suppressed) = shared.refusals.should_log()
            {
                let text = reason.to_string();
                warn!(%peer, reason = %Escaped(&text), suppressed, "TLS connection refused");
            }
            shared.broker.record_close(&reason);
        }
    }
}

/// The TLS handshake on a connection to the TLS listener. A client that starts with anything
/// but a TLS ClientHello is told in plain brokerd frames that this port needs TLS.
async fn accept_tls(
    stream: TcpStream,
    tls: &crate::tls::TlsState,
) -> Result<tokio_rustls::server::TlsStream<tokio::io::BufReader<TcpStream>>, CloseReason> {
    let mut first = [0u8; 1];
    match stream.peek(&mut first).await {
        Ok(0) => return Err(CloseReason::ClientClosed),
        Ok(_) => {}
        Err(e) => return Err(CloseReason::Io(e.to_string())),
    }
    if first[0] != crate::tls::TLS_HANDSHAKE {
        let reason = CloseReason::WrongTransport(
            "this port requires TLS: connect with TLS, or to the server's plain port",
        );
        let (_rd, mut wr) = stream.into_split();
        write_refusal(&mut wr, &reason, CLOSE_WRITE_TIMEOUT).await;
        return Err(reason);
    }
    // rustls reads the socket 4 KiB at a time; a buffer below it makes that one system call
    // per 64 KiB instead, at the price of one copy of the ciphertext.
    tls.acceptor()
        .accept(tokio::io::BufReader::with_capacity(TLS_READ_BUFFER, stream))
        .await
        .map_err(|e| CloseReason::TlsFailed(e.to_string()))
}

/// The read buffer under a TLS stream.
const TLS_READ_BUFFER: usize = 64 * 1024;

/// How long the `ERR` to a client on the wrong transport may take to write.
const CLOSE_WRITE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(1);

/// The connection after its transport is set up: the brokerd handshake, then reading until it
/// ends. `deadline` ends the handshake; `certificate_names` are the DNS names of a verified client
/// certificate, if any.
#[allow(clippy::too_many_arguments)]
async fn serve_halves<R, W>(
    (mut rd, mut wr): (R, W),
    peer: SocketAddr,
    shared: Arc<Shared>,
    mut ticket: Ticket,
    reading: TaskTrackerToken,
    teardown: TaskTrackerToken,
    deadline: Instant,
    certificate_names: Vec<String>,
) where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + WriteHalf + Unpin + Send + 'static,
{
    let mut buf = BytesMut::with_capacity(READ_CHUNK);
    let eviction = ticket.eviction();
    let handshake = async {
        let hello = read_hello(&mut rd, &mut buf, &shared).await?;
        let identity = authenticate(&hello, peer, &shared, &certificate_names).await?;
        Ok((hello, identity))
    };
    let hello = tokio::select! {
        r = tokio::time::timeout_at(deadline, handshake) => match r {
            Ok(r) => r,
            Err(_) => Err(CloseReason::HandshakeTimeout),
        },
        _ = eviction.cancelled() => Err(CloseReason::TooManyHandshakes),
        _ = shared.shutdown.cancelled() => Err(CloseReason::ServerShutdown),
    };
    let (hello, identity) = match hello {
        Ok(h) => h,
        Err(reason) => {
            reject(&mut wr, &reason, &shared).await;
            let text = reason.to_string();
            debug!(%peer, reason = %Escaped(&text), "connection closed before handshake");
            shared.broker.record_close(&reason);
            return;
        }
    };
    // Escaped once: the name is the client's to choose, and goes into every line about it.
    let log_name = Escaped(&hello.name).to_string();
    if let Err(reason) = ticket.establish() {
        reject(&mut wr, &reason, &shared).await;
        shared.broker.record_close(&reason);
        if reason == CloseReason::TooManyConnections
            && let Some(suppressed) = shared.refusals.should_log()
        {
            warn!(client = %log_name, %peer, reason = %reason, limit = shared.config.load().limits.max_connections, suppressed, "connection refused");
        }
        return;
    }
    // Counted against its user's quota until this task ends.
    let quota = identity.quota.clone();
    if let Some(q) = &quota
        && !q.try_connect()
    {
        let reason = CloseReason::TooManyForUser;
        reject(&mut wr, &reason, &shared).await;
        shared.broker.record_close(&reason);
        if let Some(suppressed) = shared.refusals.should_log() {
            warn!(client = %log_name, %peer, user = %Escaped(identity.user.as_deref().unwrap_or("")), reason = %reason, limit = q.max_connections(), suppressed, "connection refused");
        }
        return;
    }
    let quota = QuotaGuard(quota);
    let client = shared.broker.connect_as(
        hello.name.clone(),
        peer.to_string(),
        hello.overflow,
        hello.no_echo,
        identity,
    );
    let limits = shared.broker.limits();
    let welcome = Frame::Welcome(Welcome {
        req_id: hello.req_id,
        version: PROTOCOL_VERSION,
        overflow: client.outbox.policy(),
        max_frame: limits.max_frame as u32,
        max_payload: limits.max_payload as u32,
        max_topic_len: limits.topic.max_len as u16,
        max_topic_tokens: limits.topic.max_tokens as u16,
        max_subs: limits.max_subs as u32,
        max_pending_msgs: limits.outbox.max_msgs as u32,
        max_pending_bytes: limits.outbox.max_bytes as u32,
        server_id: shared.server_id.clone(),
    });
    client.outbox.push_frame(welcome.to_bytes());
    debug!(client = %log_name, %peer, id = client.id, "client connected");
    shared.monitor.connected(&shared, &client);

    // Cancelled by the writer when it ends, and with the server's shutdown: a child of the
    // shutdown token, so that the reader's waits on it touch this connection's lock only, not
    // one that every connection registers with on every read.
    let conn = shared.shutdown.child_token();
    // Boxed for the reason `server::accept` boxes this task's own future.
    let writer = tokio::spawn(Box::pin(writer::run(
        wr,
        client.clone(),
        shared.config.load().outbound.write_deadline,
        shared.hard_stop.child_token(),
        conn.clone(),
    )));
    let end = read_loop(&mut rd, &mut buf, &client, &shared, &conn).await;
    drop(reading);
    if let ReadEnd::Close(reason) = end {
        client.outbox.close(reason, true);
    }
    let wr = writer.await.ok();
    drop(buf);
    // The rest is the reaper's, off the runtime's workers: when thousands of connections end at
    // once, the clients still connected wait behind only the few steps above.
    let reaped = shared.clone();
    shared.reaper.reap(Box::new(move || {
        let shared = reaped;
        let reason = client
            .outbox
            .close_reason()
            .unwrap_or(CloseReason::ServerShutdown);
        // The writer is done: what is still pending was never written.
        let left = client.outbox.stats();
        shared.broker.disconnect(&client, &reason);
        log_close(&client, &log_name, &reason, &left);
        shared.monitor.closed(&shared, &client, &reason, &left);
        // The socket closes as its halves go. After the client's own end of stream there is no
        // one to send a separate shutdown to: the close alone ends it.
        if let Some(wr) = wr {
            wr.release(reason != CloseReason::ClientClosed);
        }
        drop(rd);
        drop(ticket);
        drop(quota);
        drop(teardown);
    }));
}

/// How a connection's write half goes at its teardown.
pub(crate) trait WriteHalf {
    /// Lets the write half go; with `shut_down`, the socket's sending side is shut down first
    /// (a FIN after what was written) rather than only when the read half closes the socket.
    fn release(self, shut_down: bool);
}

impl WriteHalf for tokio::net::tcp::OwnedWriteHalf {
    fn release(self, shut_down: bool) {
        // Dropping the half shuts the sending side down; `forget` leaves that to the close.
        if !shut_down {
            self.forget();
        }
    }
}

impl<T> WriteHalf for tokio::io::WriteHalf<T> {
    fn release(self, _shut_down: bool) {
        // A TLS stream's halves close the socket when both are gone; no separate shutdown.
    }
}

/// Gives a connection's place in its user's quota back when the connection task ends.
struct QuotaGuard(Option<Arc<Quota>>);

impl Drop for QuotaGuard {
    fn drop(&mut self) {
        if let Some(q) = &self.0 {
            q.disconnected();
        }
    }
}

/// Checks the `HELLO`'s credentials, after the wait its address's recent failures impose. A
/// failure ends the handshake with one generic `ERR`.
async fn authenticate(
    hello: &Hello,
    peer: SocketAddr,
    shared: &Shared,
    certificate_names: &[String],
) -> Result<Identity, CloseReason> {
    let auth = shared.auth.load_full();
    if auth.required() {
        let wait = auth.penalty(peer.ip(), std::time::Instant::now());
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
    }
    match auth
        .authenticate(hello.credentials.as_ref(), certificate_names)
        .await
    {
        Ok(identity) => {
            auth.succeeded(peer.ip());
            Ok(identity)
        }
        Err(e) => {
            let failures = auth.failed(peer.ip(), std::time::Instant::now());
            if let Some(suppressed) = shared.auth_failures.should_log() {
                let user = hello
                    .credentials
                    .as_ref()
                    .and_then(|c| c.user())
                    .unwrap_or("");
                warn!(%peer, user = %Escaped(user), client = %Escaped(&hello.name), missing = (e == AuthError::Missing), failures, suppressed, "authentication failed");
            }
            Err(CloseReason::AuthenticationFailed(e.client_message()))
        }
    }
}

/// Logs a connection's end once; `log_name` is its name already escaped.
fn log_close(client: &Client, log_name: &str, reason: &CloseReason, left: &OutboxStats) {
    let abandoned = left.pending_msgs;
    // An I/O error's text comes from the OS, but escaping it costs nothing and keeps the rule
    // simple: no text reaches a log line raw unless this server wrote it.
    let text = reason.to_string();
    let shown = Escaped(&text);
    match reason {
        CloseReason::ClientClosed if client.name == crate::HEALTH_CHECK_NAME => {
            debug!(client = %log_name, peer = %client.peer, id = client.id, reason = %shown, abandoned, "connection closed")
        }
        CloseReason::ClientClosed | CloseReason::ServerShutdown => {
            info!(client = %log_name, peer = %client.peer, id = client.id, reason = %shown, abandoned, "connection closed")
        }
        _ => {
            warn!(client = %log_name, peer = %client.peer, id = client.id, reason = %shown, abandoned, "connection closed")
        }
    }
}

/// Sends the `ERR` for a connection refused before its handshake completed, then closes.
pub(crate) async fn reject<W: AsyncWrite + Unpin>(
    wr: &mut W,
    reason: &CloseReason,
    shared: &Shared,
) {
    write_refusal(wr, reason, shared.config.load().outbound.write_deadline).await;
}

/// Writes the `ERR` for `reason`, if it has one, within `limit`, then shuts the socket down.
async fn write_refusal<W: AsyncWrite + Unpin>(
    wr: &mut W,
    reason: &CloseReason,
    limit: std::time::Duration,
) {
    let err = match reason {
        CloseReason::Protocol(code) => Some((*code, protocol_message(*code))),
        other => other.error(),
    };
    if let Some((code, message)) = err {
        let frame = Frame::Err(ErrorFrame {
            req_id: 0,
            code: code as u16,
            message,
        })
        .to_bytes();
        let _ = tokio::time::timeout(limit, wr.write_all(&frame)).await;
    }
    let _ = tokio::time::timeout(limit, wr.shutdown()).await;
}

fn protocol_message(code: ErrorCode) -> String {
    match code {
        ErrorCode::HandshakeRequired => "the first frame must be HELLO".into(),
        ErrorCode::UnsupportedVersion => {
            format!("unsupported protocol version; this server speaks version {PROTOCOL_VERSION}")
        }
        ErrorCode::InvalidOption => {
            "the HELLO asked for an option this server does not define (a flag bit, or an overflow policy above 3)".into()
        }
        other => other.name().to_string(),
    }
}

/// Reads the connection's first frame, which must be a `HELLO`. No longer frame than the longest
/// `HELLO` is accepted ([`MAX_HELLO_LEN`]), and what the buffer holds is charged to the memory
/// budget: over the budget, a `HELLO` that needs more than the first read chunk waits for room,
/// within the handshake's timeout (the caller's).
async fn read_hello<R: AsyncRead + Unpin>(
    rd: &mut R,
    buf: &mut BytesMut,
    shared: &Shared,
) -> Result<Hello, CloseReason> {
    let max_frame = shared.config.load().limits.max_frame.min(MAX_HELLO_LEN);
    let budget = shared.broker.memory().clone();
    let mut charged = brokerd_core::Charge::new(&budget);
    loop {
        // A TLS ClientHello (a handshake record, version 3.x) on a plain port.
        if buf.len() >= 2 && buf[0] == crate::tls::TLS_HANDSHAKE && buf[1] == 3 {
            return Err(CloseReason::WrongTransport(
                "this port speaks plain brokerd, not TLS: connect without TLS, or to the server's TLS port",
            ));
        }
        // A later version may lay HELLO out differently: once its version field has arrived, a
        // version this server does not speak is refused as such, however the rest would parse.
        if other_version(buf) {
            return Err(CloseReason::Protocol(ErrorCode::UnsupportedVersion));
        }
        match decode(buf, max_frame) {
            Ok(Some(Frame::Hello(h))) => {
                if h.version != PROTOCOL_VERSION {
                    return Err(CloseReason::Protocol(ErrorCode::UnsupportedVersion));
                }
                return Ok(h);
            }
            Ok(Some(_)) => return Err(CloseReason::Protocol(ErrorCode::HandshakeRequired)),
            Ok(None) => {}
            Err(e) => return Err(CloseReason::Protocol(e.code())),
        }
        charged.set(buf.len());
        if buf.capacity() - buf.len() < READ_MIN_FREE {
            while budget.over() {
                tokio::time::sleep(MEMORY_POLL).await;
            }
            buf.reserve(READ_CHUNK);
        }
        match rd.read_buf(buf).await {
            Ok(0) => return Err(CloseReason::ClientClosed),
            Ok(_) => {}
            Err(e) => return Err(CloseReason::Io(e.to_string())),
        }
    }
}

/// Whether `buf` starts with a `HELLO` whose version field (bytes 9-10, the same in every
/// version) names a version other than this server's.
fn other_version(buf: &[u8]) -> bool {
    buf.len() >= 11
        && buf[4] == FrameType::Hello as u8
        && u16::from_be_bytes([buf[9], buf[10]]) != PROTOCOL_VERSION
}

/// State the reader loop keeps between frames.
/// A consumer subscription of this connection: the consumer and the member subscription.
type ConsumerSub = (
    Arc<crate::streams::Consumer>,
    Arc<brokerd_core::Subscription>,
);

struct Reader<'a> {
    client: &'a Client,
    shared: &'a Arc<Shared>,
    /// This connection's memo of recent routes.
    routes: RouteCache,
    /// Set when a reply left the outbox without room for more: act on no more frames until the
    /// writer has made room.
    paused: bool,
    /// A stream whose write queue this connection's publish took over its soft limits: act on
    /// no more frames until its writer has caught up (at most the backpressure wait).
    stream_wait: Option<Arc<StreamHandle>>,
    /// This connection's consumer subscriptions, by sid: where its `MACK`s go. At most one
    /// entry per subscription it made (`max_subs`); an entry outlives its subscription until
    /// the sid is used again, harmlessly: a consumer ignores acknowledgements of sequences it
    /// does not have in flight.
    consumers: std::collections::HashMap<u32, ConsumerSub>,
}

impl Reader<'_> {
    fn reply(&mut self, frame: Frame) {
        self.client.outbox.push_frame(frame.to_bytes());
        // Replies the client does not take off its socket stop the reading of more requests.
        if !self.client.outbox.has_room_now() {
            self.paused = true;
        }
    }

    /// Whether the reader should stop acting on buffered frames now: its replies wait to be
    /// written, or it has done its share of routing work (see [`WORK_BUDGET`]).
    fn should_break(&self) -> bool {
        self.paused
            || self.routes.work() >= WORK_BUDGET
            || !self.routes.pressed().is_empty()
            || self.stream_wait.is_some()
    }

    fn error(&mut self, req_id: u32, code: ErrorCode, mut message: String) {
        if message.len() > MAX_ERR_TEXT {
            let mut end = MAX_ERR_TEXT - 3;
            while !message.is_char_boundary(end) {
                end -= 1;
            }
            message.truncate(end);
            message.push_str("...");
        }
        self.reply(Frame::Err(ErrorFrame {
            req_id,
            code: code as u16,
            message,
        }));
    }

    /// Routes one publish and answers it as asked.
    fn publish(&mut self, req_id: u32, ack: bool, p: &Publication<'_>) {
        if let Some(stream) = self.shared.streams.capturing(p.topic) {
            return self.publish_stored(&stream, req_id, ack, p);
        }
        let routed = self
            .shared
            .broker
            .publish_cached(self.client, p, &mut self.routes);
        if routed.is_ok() && crate::monitor::sampled() {
            self.shared.monitor.sample_topic(p.topic);
        }
        match routed {
            Ok(delivered) if ack => self.reply(Frame::Ack { req_id, delivered }),
            Ok(_) => {}
            // Reserved topics are refused before anything is cached (and the answer is not
            // routed through the sublist), so a request to the broker costs other publishes
            // nothing.
            Err(PublishError::Reserved) if p.topic == STATS_REQUEST.as_bytes() => {
                self.answer_stats(req_id, ack, p.reply);
            }
            Err(PublishError::Reserved)
                if p.topic.starts_with(STREAM_REQUEST_PREFIX.as_bytes()) =>
            {
                self.answer_stream_request(req_id, ack, p);
            }
            Err(e) => self.error(req_id, e.code(), e.to_string()),
        }
    }

    /// A publish to a topic a stream captures: routed live as usual, then queued for the
    /// stream's writer, which answers `STORED` (or `ERR store-failed`) once it is stored. A
    /// repeated message id within the stream's window is answered at once, routed nowhere.
    fn publish_stored(
        &mut self,
        stream: &Arc<StreamHandle>,
        req_id: u32,
        ack: bool,
        p: &Publication<'_>,
    ) {
        let raw: &[u8] = match p.raw {
            RawBody::Borrowed(b) => b,
            RawBody::Shared(b) => b,
        };
        let Some((parts, msg_id)) = crate::streams::parts(raw) else {
            // The decoder checked the body's structure: not reached.
            return self.error(req_id, ErrorCode::MalformedFrame, "malformed body".into());
        };
        if let Admit::Busy = stream.admit() {
            return self.error(
                req_id,
                ErrorCode::StreamBusy,
                format!(
                    "stream {} is busy: its write queue is full; nothing was stored or routed",
                    stream.config.name
                ),
            );
        }
        if let Some(id) = msg_id
            && !stream.claim_id(id)
        {
            stream
                .duplicates
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            if ack {
                let dup = Capture::duplicate(
                    id,
                    AckTo {
                        outbox: self.client.outbox.clone(),
                        req_id,
                        delivered: 0,
                    },
                );
                if stream.capture(dup).is_err() {
                    self.closed_stream(stream, req_id);
                }
            }
            return;
        }
        let routed = self
            .shared
            .broker
            .publish_cached(self.client, p, &mut self.routes);
        let delivered = match routed {
            Ok(d) => d,
            Err(e) => {
                if let Some(id) = msg_id {
                    stream.release_id(id);
                }
                return self.error(req_id, e.code(), e.to_string());
            }
        };
        let capture = Capture::new(
            &parts,
            msg_id,
            ack.then(|| AckTo {
                outbox: self.client.outbox.clone(),
                req_id,
                delivered,
            }),
        );
        match stream.capture(capture) {
            Ok(true) => self.stream_wait = Some(stream.clone()),
            Ok(false) => {}
            Err(_) => {
                if let Some(id) = msg_id {
                    stream.release_id(id);
                }
                self.closed_stream(stream, req_id);
            }
        }
    }

    fn closed_stream(&mut self, stream: &StreamHandle, req_id: u32) {
        self.error(
            req_id,
            ErrorCode::StoreFailed,
            format!(
                "stream {} is closed (deleted, or the broker is stopping); the message was not stored",
                stream.config.name
            ),
        );
    }

    /// A `SUB` naming a stream: a replay subscription, fed by a task of its own.
    fn subscribe_stream(&mut self, s: Subscribe) {
        let Some(start) = s.stream else { return };
        if s.queue.is_some() {
            return self.error(
                s.req_id,
                ErrorCode::InvalidFilter,
                "a replay subscription cannot join a queue group".into(),
            );
        }
        let Some(client) = self.shared.broker.client(self.client.id) else {
            return;
        };
        // Checked like any SUB first (the filter, permissions, the sid, `max_subs`), so that
        // which streams exist is told only to a client that may subscribe to the filter.
        let sub = match self
            .shared
            .broker
            .subscribe_replay(self.client, s.sid, &s.filter)
        {
            Ok(sub) => sub,
            Err(e) => return self.error(s.req_id, e.code(), e.to_string()),
        };
        let Some(stream) = self.shared.streams.get(&start.stream) else {
            self.shared.broker.end_subscription(self.client, &sub);
            return self.error(
                s.req_id,
                ErrorCode::NoSuchStream,
                format!("no stream named '{}'", Escaped(&start.stream)),
            );
        };
        if start.start == brokerd_proto::StartPosition::LastPerTopic && stream.per_topic.is_none() {
            self.shared.broker.end_subscription(self.client, &sub);
            return self.error(
                s.req_id,
                ErrorCode::InvalidStart,
                format!(
                    "stream {} does not keep messages per topic (max_msgs_per_topic): it cannot start at the newest of each topic",
                    stream.config.name
                ),
            );
        }
        self.consumers.remove(&s.sid);
        if let Some(spec) = &start.consumer {
            // `New` is fixed now, before the OK; the positions that read the store are worked
            // out by the consumer's task.
            let from = match crate::streams::start_now(&stream, start.start) {
                Some(seq) => brokerd_proto::StartPosition::FromSeq(seq),
                None => start.start,
            };
            match crate::streams::open_consumer(
                &self.shared.broker,
                &stream,
                spec,
                &sub.filter,
                from,
                crate::streams::Joiner {
                    user: self.client.identity.user.as_deref(),
                    // As now: a reload may have taken the role away since the login.
                    admin: self.client.is_admin(),
                },
            ) {
                Ok(consumer) => {
                    self.reply(Frame::Ok(s.req_id));
                    consumer.join(client, sub.clone());
                    self.consumers.insert(s.sid, (consumer, sub));
                }
                Err(e) => {
                    self.shared.broker.end_subscription(self.client, &sub);
                    let code = if e.is_permission() {
                        ErrorCode::PermissionDenied
                    } else {
                        ErrorCode::InvalidFilter
                    };
                    self.error(s.req_id, code, e.to_string());
                }
            }
            return;
        }
        // Worked out before the OK: a message stored after it is delivered.
        let fixed = crate::streams::start_now(&stream, start.start);
        self.reply(Frame::Ok(s.req_id));
        tokio::spawn(crate::streams::run_replay(
            stream,
            self.shared.broker.clone(),
            client,
            sub,
            start.start,
            fixed,
        ));
    }

    /// A stream management request (`$SYS.req.stream.<op>`): done on the blocking pool, since
    /// it may create or delete files; the answer goes to the asker's own subscriptions
    /// matching the reply-to, then the `ACK` if asked (both after whatever this connection
    /// sends meanwhile).
    #[cold]
    fn answer_stream_request(&mut self, req_id: u32, ack: bool, p: &Publication<'_>) {
        let Some(reply) = p.reply else {
            return self.error(
                req_id,
                ErrorCode::ReservedTopic,
                "stream requests answer on the request's reply-to, and this one has none".into(),
            );
        };
        if !self.client.is_admin() {
            return self.error(
                req_id,
                ErrorCode::PermissionDenied,
                "stream requests need the admin role".into(),
            );
        }
        let raw: &[u8] = match p.raw {
            RawBody::Borrowed(b) => b,
            RawBody::Shared(b) => b,
        };
        let Some((parts, _)) = crate::streams::parts(raw) else {
            return;
        };
        let op = String::from_utf8_lossy(&p.topic[STREAM_REQUEST_PREFIX.len()..]).into_owned();
        let payload = parts.payload.to_vec();
        let reply = reply.to_string();
        let shared = self.shared.clone();
        let Some(client) = self.shared.broker.client(self.client.id) else {
            return;
        };
        tokio::spawn(async move {
            let for_op = shared.clone();
            let answer = tokio::task::spawn_blocking(move || {
                crate::streams::request(&for_op.streams, &op, &payload)
            })
            .await
            .unwrap_or_default();
            let answered = shared.broker.answer(&client, &reply, || answer);
            let frame = match answered {
                Ok(delivered) if ack => Frame::Ack { req_id, delivered },
                Ok(_) => return,
                Err(e) => Frame::Err(ErrorFrame {
                    req_id,
                    code: e.code() as u16,
                    message: e.to_string(),
                }),
            };
            client.outbox.push_frame(frame.to_bytes());
        });
    }

    /// Answers a request for the broker's statistics: the JSON goes to the asker's own
    /// subscriptions matching the reply-to (its inbox), before the `ACK`, whose count is the
    /// subscriptions that took the answer.
    #[cold]
    fn answer_stats(&mut self, req_id: u32, ack: bool, reply: Option<&str>) {
        let Some(reply) = reply else {
            return self.error(
                req_id,
                ErrorCode::ReservedTopic,
                format!("{STATS_REQUEST} answers on the request's reply-to, and this one has none"),
            );
        };
        let shared = self.shared;
        let answered = match (&self.client.identity.user, self.client.is_admin()) {
            (Some(user), false) => shared.broker.answer(self.client, reply, || {
                shared.monitor.user_stats_json(shared, user)
            }),
            _ => shared
                .broker
                .answer(self.client, reply, || shared.monitor.stats_json(shared)),
        };
        match answered {
            Ok(delivered) if ack => self.reply(Frame::Ack { req_id, delivered }),
            Ok(_) => {}
            Err(e) => self.error(req_id, e.code(), e.to_string()),
        }
    }

    /// Acts on one frame; `Err` ends the connection after the `ERR` already queued.
    fn handle(&mut self, frame: Frame, pings_outstanding: &mut u32) -> Result<(), CloseReason> {
        let broker = &self.shared.broker;
        match frame {
            Frame::Pub(Publish { req_id, ack, body }) => {
                self.publish(req_id, ack, &Publication::from(&body));
            }
            Frame::Sub(s) if s.stream.is_some() => self.subscribe_stream(s),
            Frame::Sub(s) => {
                match broker.subscribe_queue(self.client, s.sid, &s.filter, s.queue.as_deref()) {
                    Ok(()) => self.reply(Frame::Ok(s.req_id)),
                    Err(e) => self.error(s.req_id, e.code(), e.to_string()),
                }
            }
            Frame::Unsub(u) => match broker.unsubscribe(self.client, u.sid, u.max) {
                Ok(()) => self.reply(Frame::Ok(u.req_id)),
                Err(e) => self.error(u.req_id, ErrorCode::UnknownSubscription, e.to_string()),
            },
            Frame::Mack(m) => {
                if let Some((c, sub)) = self.consumers.get(&m.sid) {
                    c.ack(sub, m.seq, m.kind);
                }
            }
            Frame::Ping(token) => self.reply(Frame::Pong(token)),
            Frame::Pong(_) => *pings_outstanding = 0,
            Frame::Hello(h) => {
                self.error(
                    h.req_id,
                    ErrorCode::DuplicateHandshake,
                    "HELLO may only be sent once".into(),
                );
                return Err(CloseReason::Protocol(ErrorCode::DuplicateHandshake));
            }
            other => {
                self.error(
                    0,
                    ErrorCode::UnknownFrameType,
                    format!(
                        "frame type 0x{:02x} is sent by servers, not clients",
                        other.frame_type() as u8
                    ),
                );
                return Err(CloseReason::Protocol(ErrorCode::UnknownFrameType));
            }
        }
        Ok(())
    }

    fn decode_error(&mut self, e: &DecodeError) -> CloseReason {
        self.error(0, e.code(), e.to_string());
        CloseReason::Protocol(e.code())
    }
}

async fn read_loop<R: AsyncRead + Unpin>(
    rd: &mut R,
    buf: &mut BytesMut,
    client: &Client,
    shared: &Arc<Shared>,
    conn: &CancellationToken,
) -> ReadEnd {
    let mut reader = Reader {
        client,
        shared,
        routes: RouteCache::new(),
        paused: false,
        stream_wait: None,
        consumers: std::collections::HashMap::new(),
    };
    let budget = shared.broker.memory().clone();
    // What this connection's read buffer is charged to the memory budget, given back when the
    // loop ends.
    let mut charged = brokerd_core::Charge::new(&budget);
    let max_frame = shared.config.load().limits.max_frame;
    let interval = shared.config.load().timeouts.ping_interval;
    let max_pings = shared.config.load().timeouts.max_pings_outstanding;
    let mut pings_outstanding = 0u32;
    let mut chunk = READ_CHUNK;
    let mut last_read_len = 0;
    let mut last_read = Instant::now();
    // When the latest read completed: the arrival of a frame begun in it.
    let mut read_at = last_read;
    let keepalive = tokio::time::sleep_until(last_read + interval);
    tokio::pin!(keepalive);
    let mut frame_deadline = FrameDeadline::default();
    let frame_timer = tokio::time::sleep_until(last_read);
    tokio::pin!(frame_timer);
    // Set for good once the connection publishes a body that is queued as a slice of the read
    // buffer: its chunk then stays small (see `READ_CHUNK_MAX`).
    let mut shares_buffer = false;
    loop {
        // Frames already buffered (the handshake's read may have carried more than HELLO).
        loop {
            // Small PUBs are routed straight from the read buffer: a body is copied once if
            // anything matches, so taking a shared slice of the buffer would be wasted work. A
            // run of them moves the buffer's start once.
            let mut routed = 0;
            while !reader.should_break()
                && let Some(peeked) = peek_pub(&buf[routed..], max_frame)
            {
                match peeked {
                    Ok((p, len)) if p.body.raw().len() < DETACH_BELOW => {
                        reader.publish(p.req_id, p.ack, &Publication::from(&p.body));
                        routed += len;
                    }
                    Ok(_) => break,
                    Err(e) => return ReadEnd::Close(reader.decode_error(&e)),
                }
            }
            if routed > 0 {
                buf.advance(routed);
                frame_deadline.started = None;
            }
            if reader.paused || !reader.routes.pressed().is_empty() || reader.stream_wait.is_some()
            {
                break;
            }
            if reader.routes.work() >= WORK_BUDGET {
                reader.routes.take_work();
                tokio::task::yield_now().await;
            }
            match decode(buf, max_frame) {
                Ok(Some(frame)) => {
                    frame_deadline.started = None;
                    if let Frame::Pub(p) = &frame
                        && p.body.len() >= DETACH_BELOW
                    {
                        // Its body is shared with the read buffer, pinning it while queued: a
                        // connection sending such bodies keeps the small chunk.
                        chunk = READ_CHUNK;
                        shares_buffer = true;
                    }
                    if let Err(reason) = reader.handle(frame, &mut pings_outstanding) {
                        return ReadEnd::Close(reason);
                    }
                }
                Ok(None) => break,
                Err(e) => return ReadEnd::Close(reader.decode_error(&e)),
            }
        }
        reader.routes.take_work();
        // Only a read that leaves part of a frame behind pays for the frame deadline.
        if buf.is_empty() {
            frame_deadline.started = None;
        } else if let Some(at) = frame_deadline.partial(buf, read_at, &shared.config.load()) {
            frame_timer.as_mut().reset(at);
        }
        // Waking a subscriber's writer from here puts it in this worker's LIFO slot, which no
        // other worker may steal: without a yield the writers would only ever run on this core,
        // between this reader's reads. Yielding lets another worker take this reader instead.
        // After a short read there is little to share, and the yield would cost the writers
        // just woken a wake-up of the other worker before they run: latency, not throughput.
        if last_read_len >= YIELD_AFTER {
            tokio::task::yield_now().await;
        }
        if client.outbox.is_closing() {
            return ReadEnd::WriterGone;
        }
        if reader.paused {
            // Stop reading while this connection's own replies are not being taken off its
            // socket; a client that leaves them there for a whole write deadline is a slow
            // consumer.
            let room = std::future::poll_fn(|cx| client.outbox.poll_room(cx));
            tokio::select! {
                biased;
                _ = conn.cancelled() => return ended(shared),
                r = tokio::time::timeout(shared.config.load().outbound.write_deadline, room) => {
                    if r.is_err() {
                        let st = client.outbox.stats();
                        return ReadEnd::Close(CloseReason::SlowConsumer {
                            pending_msgs: st.pending_msgs + st.pending_controls,
                            pending_bytes: st.pending_bytes + st.pending_control_bytes,
                        });
                    }
                }
            }
            reader.paused = false;
            // Act on the frames already buffered before reading more.
            continue;
        }
        if !reader.routes.pressed().is_empty() {
            // A publish queued over a subscriber's limits while its socket still takes bytes:
            // wait for those queues to drain, all of them within one bounded wait, before acting
            // on more frames. A queue that does not drain in time is marked stalled, and its
            // overflow policy decides from then on.
            let wait = shared.config.load().outbound.backpressure_wait;
            let deadline = tokio::time::Instant::now() + wait;
            for outbox in reader.routes.pressed() {
                let drained = std::future::poll_fn(|cx| outbox.poll_drained(cx));
                tokio::select! {
                    biased;
                    _ = conn.cancelled() => return ended(shared),
                    r = tokio::time::timeout_at(deadline, drained) => {
                        if r.is_err() {
                            outbox.mark_stalled();
                        }
                    }
                }
            }
            reader.routes.clear_pressed();
            continue;
        }
        if let Some(stream) = reader.stream_wait.take() {
            // A stream's write queue is over its soft limits: wait for its writer, as for a
            // subscriber's queue. Past the bound the reader goes on; the queue's hard limit
            // then refuses publishes with `ERR stream-busy`.
            let wait = shared.config.load().outbound.write_deadline;
            tokio::select! {
                biased;
                _ = conn.cancelled() => return ended(shared),
                _ = stream.wait_room(wait) => {}
            }
            continue;
        }
        // Over the memory budget, a reader whose frame is longer than a read chunk and who has
        // no room for it yet (it needs a larger buffer, or one of its own) waits until the
        // budget has room again; its frame deadline still runs. Every other reader goes on
        // within the buffer it has: frames that fit complete as soon as they are read, and a
        // reader filling a buffer already made for its frame allocates nothing more.
        charged.set(read_held(buf));
        while budget.over() && needs_larger_buffer(buf, chunk) {
            tokio::select! {
                biased;
                _ = conn.cancelled() => return ended(shared),
                _ = &mut frame_timer, if frame_deadline.armed.is_some() => {
                    match frame_deadline.fired(buf, Instant::now(), &shared.config.load()) {
                        Fired::Expired => return ReadEnd::Close(CloseReason::FrameTimeout),
                        Fired::Rearm(at) => frame_timer.as_mut().reset(at),
                        Fired::Idle => {}
                    }
                }
                _ = tokio::time::sleep(MEMORY_POLL) => {}
            }
        }
        make_room(buf, chunk);
        // A large frame's own buffer is charged before it is filled.
        charged.set(read_held(buf));
        let free = buf.capacity() - buf.len();
        tokio::select! {
            biased;
            _ = conn.cancelled() => return ended(shared),
            r = rd.read_buf(buf) => match r {
                Ok(0) => return ReadEnd::Close(CloseReason::ClientClosed),
                Ok(n) => {
                    last_read_len = n;
                    if n == free && chunk < READ_CHUNK_MAX && !shares_buffer {
                        chunk *= 2;
                    }
                    last_read = Instant::now();
                    read_at = last_read;
                    pings_outstanding = 0;
                }
                // A TLS client that closes its socket without a close_notify alert: what most
                // clients do when they are done, not a failure.
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                    return ReadEnd::Close(CloseReason::ClientClosed);
                }
                Err(e) => return ReadEnd::Close(CloseReason::Io(e.to_string())),
            },
            _ = &mut keepalive => {
                shared.broker.refresh_routes(&mut reader.routes);
                shared.broker.forget_views(&mut reader.routes);
                let due = last_read + interval;
                if Instant::now() >= due {
                    if pings_outstanding >= max_pings {
                        return ReadEnd::Close(CloseReason::KeepaliveTimeout);
                    }
                    pings_outstanding += 1;
                    reader.reply(Frame::Ping(pings_outstanding));
                    last_read = Instant::now();
                }
                keepalive.as_mut().reset(last_read + interval);
            }
            _ = &mut frame_timer, if frame_deadline.armed.is_some() => {
                match frame_deadline.fired(buf, Instant::now(), &shared.config.load()) {
                    Fired::Expired => return ReadEnd::Close(CloseReason::FrameTimeout),
                    Fired::Rearm(at) => frame_timer.as_mut().reset(at),
                    Fired::Idle => {}
                }
            }
        }
    }
}

/// Why the reader's connection token was cancelled: the server's shutdown (its parent), or the
/// writer's end.
fn ended(shared: &Shared) -> ReadEnd {
    if shared.shutdown.is_cancelled() {
        ReadEnd::Shutdown
    } else {
        ReadEnd::WriterGone
    }
}

/// The length of the large frame (prefix included) whose first half or more `buf` holds, if any.
fn large_frame(buf: &BytesMut) -> Option<usize> {
    if buf.len() < 4 {
        return None;
    }
    let need = 4 + u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
    (need >= LARGE_FRAME && buf.len() * 2 >= need && buf.len() < need).then_some(need)
}

/// Whether the next read may need a buffer larger than the read chunk: a frame longer than the
/// chunk, unless it is a large frame that already has its own buffer, which needs nothing more.
fn needs_larger_buffer(buf: &BytesMut, chunk: usize) -> bool {
    if large_frame(buf).is_some() {
        return large_frame_allocation(buf, chunk).is_some_and(|need| need > READ_CHUNK);
    }
    buf.len() + READ_MIN_FREE > chunk
}

/// The size of the buffer of its own that [`make_room`] is about to give a large frame, if any:
/// one with too little room or far too much.
fn large_frame_allocation(buf: &BytesMut, chunk: usize) -> Option<usize> {
    let need = large_frame(buf)?;
    (buf.capacity() < need || buf.capacity() > need + chunk).then_some(need)
}

/// What a read buffer holds, for the memory budget: the bytes not yet acted on, or, for a buffer
/// grown past the read chunk (a large frame's), all it allocated.
fn read_held(buf: &BytesMut) -> usize {
    if buf.capacity() > READ_CHUNK_MAX {
        buf.capacity()
    } else {
        buf.len()
    }
}

/// The deadline of the frame whose start the read buffer holds: `timeouts.frame` plus its
/// announced length at `limits.min_frame_rate`, from the read that brought its first byte. Bytes
/// arriving later do not move it, so a peer trickling a frame cannot hold its connection open.
#[derive(Debug, Default)]
struct FrameDeadline {
    /// When the first byte of the incomplete frame arrived; `None` when the buffer holds no
    /// incomplete frame.
    started: Option<Instant>,
    /// What the timer is set to, `None` when it is off. It may be later than the current
    /// frame's deadline: the timer is only moved earlier between firings, so that a publisher
    /// whose reads often end mid-frame does not reset a timer on every read; when it fires, the
    /// current frame's deadline is checked and the timer set to it.
    armed: Option<Instant>,
}

/// What a firing of the frame timer means.
#[derive(Debug, PartialEq, Eq)]
enum Fired {
    /// The incomplete frame is past its deadline.
    Expired,
    /// The incomplete frame has until then.
    Rearm(Instant),
    /// No frame is incomplete; the timer is off.
    Idle,
}

impl FrameDeadline {
    /// Notes that `buf` (not empty) holds an incomplete frame after a read completed at
    /// `read_at`; returns the instant to set the timer to, if it must move.
    fn partial(&mut self, buf: &[u8], read_at: Instant, config: &Config) -> Option<Instant> {
        let started = *self.started.get_or_insert(read_at);
        let due = started + config.frame_allowance(announced(buf));
        match self.armed {
            Some(armed) if armed <= due => None,
            _ => {
                self.armed = Some(due);
                Some(due)
            }
        }
    }

    /// The timer fired at `now`.
    fn fired(&mut self, buf: &[u8], now: Instant, config: &Config) -> Fired {
        self.armed = None;
        let Some(started) = self.started.filter(|_| !buf.is_empty()) else {
            return Fired::Idle;
        };
        let due = started + config.frame_allowance(announced(buf));
        if now >= due {
            return Fired::Expired;
        }
        self.armed = Some(due);
        Fired::Rearm(due)
    }
}

/// The length an incomplete frame announces (0 until its length prefix has arrived).
fn announced(buf: &[u8]) -> usize {
    match buf {
        [a, b, c, d, ..] => u32::from_be_bytes([*a, *b, *c, *d]) as usize,
        _ => 0,
    }
}

/// Makes sure the read buffer has room for the next read. A large frame that has half arrived
/// gets a buffer of exactly its own size, so that its shared body pins no larger allocation; the
/// half rule keeps a peer that only announces a large frame from making the server allocate it.
fn make_room(buf: &mut BytesMut, chunk: usize) {
    if let Some(need) = large_frame(buf) {
        if large_frame_allocation(buf, chunk).is_some() {
            // `buf` holds only this frame's first bytes: every earlier frame was split off.
            let mut own = BytesMut::with_capacity(need);
            own.extend_from_slice(buf);
            *buf = own;
        }
        return;
    }
    if buf.capacity() - buf.len() < READ_MIN_FREE {
        buf.reserve(chunk);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn config() -> Config {
        let mut c = Config::default();
        c.timeouts.frame = Duration::from_secs(10);
        c.limits.min_frame_rate = 1000;
        c
    }

    #[test]
    fn the_deadline_counts_from_the_first_byte_and_scales_with_the_length() {
        let c = config();
        let t0 = Instant::now();
        let mut d = FrameDeadline::default();
        // 2,000 bytes announced: 10 s plus 2 s.
        let frame = [0, 0, 7, 208, 2, 0];
        assert_eq!(
            d.partial(&frame, t0, &c),
            Some(t0 + Duration::from_secs(12))
        );
        // More bytes of the same frame later: the deadline stays where it was.
        let later = t0 + Duration::from_secs(5);
        assert_eq!(d.partial(&frame, later, &c), None);
        assert_eq!(
            d.fired(&frame, t0 + Duration::from_secs(11), &c),
            Fired::Rearm(t0 + Duration::from_secs(12))
        );
        assert_eq!(
            d.fired(&frame, t0 + Duration::from_secs(12), &c),
            Fired::Expired
        );
    }

    /// A read buffer holding the first `have` bytes of a frame announcing `len`, in an
    /// allocation of `capacity`.
    fn partial_frame(len: usize, have: usize, capacity: usize) -> BytesMut {
        let mut buf = BytesMut::with_capacity(capacity);
        buf.extend_from_slice(&(len as u32).to_be_bytes());
        buf.resize(have, 0);
        buf
    }

    #[test]
    fn over_the_budget_a_large_frame_with_its_own_buffer_reads_on() {
        let len = 1 << 20;
        // Nothing buffered, or a small frame: the chunk has room.
        assert!(!needs_larger_buffer(
            &BytesMut::with_capacity(READ_CHUNK),
            READ_CHUNK
        ));
        assert!(!needs_larger_buffer(
            &partial_frame(100, 50, READ_CHUNK),
            READ_CHUNK
        ));
        // The first part of a large frame has filled the chunk: the next read needs more.
        let full = partial_frame(len, READ_CHUNK - 100, READ_CHUNK);
        assert!(needs_larger_buffer(&full, READ_CHUNK));
        // Half of it is in, in a buffer smaller than the frame: its own buffer is still to come.
        let half = partial_frame(len, len / 2 + 8, len / 2 + 8);
        assert!(needs_larger_buffer(&half, READ_CHUNK));
        // Its own buffer is made: filling it allocates nothing, so the reader reads on (and
        // sees its peer's end of stream).
        let own = partial_frame(len, len / 2 + 8, len + 4);
        assert!(!needs_larger_buffer(&own, READ_CHUNK));
    }

    #[test]
    fn a_length_prefix_still_arriving_gets_the_base_time() {
        let c = config();
        let t0 = Instant::now();
        let mut d = FrameDeadline::default();
        assert_eq!(
            d.partial(&[0, 0], t0, &c),
            Some(t0 + Duration::from_secs(10))
        );
        // The prefix completes: the longer deadline is picked up when the timer fires.
        let frame = [0, 0, 3, 232, 2];
        assert_eq!(d.partial(&frame, t0, &c), None);
        assert_eq!(
            d.fired(&frame, t0 + Duration::from_secs(10), &c),
            Fired::Rearm(t0 + Duration::from_secs(11))
        );
    }

    #[test]
    fn a_new_frame_gets_a_new_deadline_and_an_earlier_one_moves_the_timer() {
        let c = config();
        let t0 = Instant::now();
        let mut d = FrameDeadline::default();
        let big = [0, 0, 0x27, 0x10, 2]; // 10,000 bytes: 20 s
        assert_eq!(d.partial(&big, t0, &c), Some(t0 + Duration::from_secs(20)));
        // The big frame completes; a small one starts a second later and is due earlier.
        d.started = None;
        let t1 = t0 + Duration::from_secs(1);
        assert_eq!(
            d.partial(&[0, 0, 0, 10, 2], t1, &c),
            Some(t1 + Duration::from_millis(10_010))
        );
        // Nothing incomplete when the timer fires: it goes off.
        d.started = None;
        assert_eq!(d.fired(&[], t1 + Duration::from_secs(10), &c), Fired::Idle);
        assert_eq!(d.armed, None);
    }
}
