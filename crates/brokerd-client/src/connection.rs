//! One connection after another: dialing and the handshake, the reader and writer tasks, and
//! reconnection.

use crate::channel;
use crate::error::Error;
use crate::event::{CloseReason, Event};
use crate::options::ConnectOptions;
use crate::state::{HANDSHAKE_FRAME, Inner, MAX_REFUSALS, Reply};
use crate::subscription::Message;
use brokerd_proto::frame::take_msg;
use brokerd_proto::{ErrorCode, Frame, Hello, Msg, PROTOCOL_VERSION, Welcome, decode};
use bytes::BytesMut;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

/// The connection's read side, plain or TLS.
pub(crate) type ReadHalf = Box<dyn AsyncRead + Send + Unpin>;
/// The connection's write side, plain or TLS.
pub(crate) type WriteHalf = Box<dyn AsyncWrite + Send + Unpin>;

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
type Ended = CloseReason;

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
            // A TLS stream may keep the last records in its own buffer when the socket was full;
            // the flush sends them (a no-op on plain TCP), or the server waits for the rest of a
            // frame that never comes.
            let written = match wr.write_all(&out).await {
                Ok(()) => wr.flush().await,
                Err(e) => Err(e),
            };
            if let Err(e) = written {
                return CloseReason::io("write", &e);
            }
            out.clear();
            continue;
        }
        if closed {
            let _ = wr.shutdown().await;
            return CloseReason::ClientClosed;
        }
        inner.data.notified().await;
    }
}

/// Runs one connection after another: reader and writer until either ends, then, if the
/// client reconnects, new connections until one succeeds or the attempts run out.
pub(crate) async fn supervise(
    inner: Arc<Inner>,
    mut rd: ReadHalf,
    mut wr: WriteHalf,
    mut buf: BytesMut,
) {
    let mut server = inner.server.clone();
    loop {
        let mut reader = tokio::spawn(read_task(inner.clone(), rd, buf));
        let mut writer = tokio::spawn(write_task(inner.clone(), wr));
        // The other task is awaited once aborted: a reader still running could queue messages
        // after `reconnected` read where each replay subscription stands.
        let ended = tokio::select! {
            r = &mut reader => { writer.abort(); let _ = writer.await; r }
            w = &mut writer => { reader.abort(); let _ = reader.await; w }
        };
        let ended =
            ended.unwrap_or_else(|e| CloseReason::Protocol(format!("connection task failed: {e}")));
        let shutting_down = ended.code() == Some(ErrorCode::ShuttingDown);
        if shutting_down {
            inner.emit(Event::ServerShuttingDown);
        }
        let refused = ended.code() == Some(ErrorCode::AuthenticationFailed);
        let policy = match &inner.options.reconnect {
            Some(p) if !inner.shut.load(Ordering::Acquire) && !refused => p.clone(),
            _ => {
                inner.shutdown(ended.clone());
                inner.emit(Event::Closed { reason: ended });
                return;
            }
        };
        inner.disconnected(&ended);
        tracing::warn!(server = %server, reason = %ended, "connection lost; reconnecting");
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
                CloseReason::ClientClosed
            } else {
                CloseReason::ReconnectFailed {
                    attempts: attempt,
                    last: Box::new(ended),
                }
            };
            inner.shutdown(reason.clone());
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
pub(crate) async fn dial(
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
    wr.flush().await?;
    let mut buf = BytesMut::with_capacity(64 * 1024);
    let info = loop {
        match decode(&mut buf, HANDSHAKE_FRAME)? {
            Some(Frame::Welcome(w)) => break w,
            Some(Frame::Err(e)) => return Err(Error::server(e.code, e.message)),
            Some(_) => return Err(Error::Unexpected("expected WELCOME")),
            None => {}
        }
        if rd.read_buf(&mut buf).await? == 0 {
            return Err(Error::Closed(CloseReason::ServerClosed));
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
            Ok(0) => return CloseReason::ServerClosed,
            Ok(n) => {
                if n == free && chunk < READ_CHUNK_MAX {
                    chunk *= 2;
                }
            }
            Err(e) => return CloseReason::io("read", &e),
        }
    }
}

/// The subscription that received the previous message, and the messages for it not yet handed
/// over: a run of deliveries for one subscription takes the subscription map's lock once and the
/// subscription's queue lock once per [`DELIVERY_BATCH`] messages.
pub(crate) struct Delivery {
    sid: u32,
    /// Whether it is a replay or consumer subscription: its messages carry stream sequences.
    stream: bool,
    /// For a durable consumer's subscription: this connection's generation, which its messages
    /// carry so that they are acknowledged on this connection only.
    ack_epoch: Option<u64>,
    tx: channel::Sender,
    batch: Vec<Message>,
}

impl Delivery {
    /// Marks `msg` as one of this subscription's.
    fn stamp(&self, inner: &Arc<Inner>, msg: &mut Message) {
        msg.stream = self.stream;
        if self.ack_epoch.is_some() {
            msg.ack_epoch = self.ack_epoch;
            msg.client = Some(inner.clone());
        }
    }
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
        let mut msg = Message {
            sid,
            seq,
            body,
            client,
            stream: false,
            ack_epoch: None,
        };
        if sid == inner.inbox_sid.load(Ordering::Relaxed) {
            return Gathered::Inbox(msg);
        }
        match last.as_mut() {
            Some(d) if d.sid == sid => {
                d.stamp(inner, &mut msg);
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
pub(crate) async fn read_frames(
    inner: &Arc<Inner>,
    buf: &mut BytesMut,
    last: &mut Option<Delivery>,
) -> Result<(), Ended> {
    loop {
        let gathered = gather(inner, buf, last);
        deliver(inner, last).await;
        match gathered {
            Gathered::Full => {}
            Gathered::Other(mut msg) => {
                let batch = last.take().map(|d| d.batch);
                // This task's connection is the current one: the generation moves on only once
                // this task has ended.
                let epoch = inner.epoch.load(Ordering::Relaxed);
                // A message for a subscription already gone (one ended while it was in flight)
                // allocates nothing.
                *last = inner.subs.lock().get(&msg.sid).map(|s| Delivery {
                    sid: msg.sid,
                    stream: s.stream.is_some(),
                    ack_epoch: s
                        .stream
                        .as_ref()
                        .and_then(|s| s.consumer.as_ref())
                        .map(|_| epoch),
                    tx: s.tx.clone(),
                    batch: batch.unwrap_or_else(|| Vec::with_capacity(DELIVERY_BATCH)),
                });
                if let Some(d) = last.as_mut() {
                    d.stamp(inner, &mut msg);
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
            Gathered::Control(frame) => {
                let err = matches!(frame, Frame::Err(_));
                control(inner, frame)?;
                // An ERR may have ended a subscription; the sender kept for its messages would
                // keep its stream open. Its batch was handed over above, so nothing is lost.
                if err
                    && let Some(d) = last.as_ref()
                    && !inner.subs.lock().contains_key(&d.sid)
                {
                    *last = None;
                }
            }
            Gathered::Drained => return Ok(()),
            Gathered::Closed => {
                // What was read before the close was handed over above; nothing after it.
                *last = None;
                return Err(CloseReason::ClientClosed);
            }
            Gathered::Undecodable(e) => {
                return Err(CloseReason::Protocol(format!("undecodable frame: {e}")));
            }
        }
    }
}

/// The sid in the notice that ends a replay subscription, `replay subscription <sid> ended: ...`
/// (`docs/protocol.md` section 8.2: an `ERR 23` with `req_id = 0` naming its sid).
fn ended_replay(message: &str) -> Option<u32> {
    let rest = message.strip_prefix("replay subscription ")?;
    let digits = rest.split(|c: char| !c.is_ascii_digit()).next()?;
    digits.parse().ok()
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
        // Answered in its own time, possibly after later frames' answers: matched by req_id.
        Frame::Stored(s) => (s.req_id, Reply::Stored(s)),
        Frame::Err(e) => {
            if let Some(sid) = inner.resubs.lock().remove(&e.req_id) {
                // A subscription the new connection refused (its rules changed, its stream was
                // deleted meanwhile, say) ends.
                tracing::warn!(sid, code = e.code, message = %e.message, "subscription not made again after reconnecting");
                inner.end_subscription(sid, Error::server(e.code, e.message));
                return Ok(());
            }
            if e.req_id == 0
                && e.code == ErrorCode::StoreFailed as u16
                && let Some(sid) = ended_replay(&e.message)
                && inner
                    .subs
                    .lock()
                    .get(&sid)
                    .is_some_and(|s| s.stream.is_some())
            {
                // Its stream was deleted or could not be read: the subscription ends (and the
                // notice is kept as a refusal too, as before streams).
                tracing::warn!(sid, message = %e.message, "the broker ended a replay subscription");
                inner.end_subscription(sid, Error::server(e.code, e.message.clone()));
            }
            if e.req_id == 0 || !inner.pending.lock().contains_key(&e.req_id) {
                let fatal = ErrorCode::from_u16(e.code).is_none_or(|c| c.closes_connection());
                if fatal {
                    return Err(CloseReason::server_error(e.code, e.message));
                }
                tracing::debug!(code = e.code, message = %e.message, req_id = e.req_id, "server refused a request nobody waits on");
                let mut r = inner.refusals.lock();
                if r.kept.len() == MAX_REFUSALS {
                    r.kept.pop_front();
                }
                r.kept.push_back(Error::server(e.code, e.message));
                r.total += 1;
                return Ok(());
            }
            (e.req_id, Reply::Err(e.code, e.message))
        }
        Frame::Hello(_)
        | Frame::Pub(_)
        | Frame::Sub(_)
        | Frame::Unsub(_)
        | Frame::Mack(_)
        | Frame::Welcome(_) => {
            return Err(CloseReason::Protocol(
                "the server sent a client's frame".into(),
            ));
        }
    };
    if let Some(tx) = inner.pending.lock().remove(&reply.0) {
        let _ = tx.send(reply.1);
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use std::pin::Pin;
    use std::task::{Context, Poll};

    /// A writer that, like a TLS stream whose socket was full, keeps what it accepts until it is
    /// flushed.
    struct HoldsUntilFlushed {
        held: Vec<u8>,
        sent: Arc<parking_lot::Mutex<Vec<u8>>>,
    }

    impl AsyncWrite for HoldsUntilFlushed {
        fn poll_write(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<std::io::Result<usize>> {
            self.held.extend_from_slice(buf);
            Poll::Ready(Ok(buf.len()))
        }

        fn poll_flush(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            let held = std::mem::take(&mut self.held);
            self.sent.lock().extend_from_slice(&held);
            Poll::Ready(Ok(()))
        }

        fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            self.poll_flush(cx)
        }
    }

    /// Waits for the next publish to be waiting for its answer, then answers it with the frame
    /// `answer` makes from its request id, as the reader task would.
    async fn answer_next(inner: &Inner, answer: impl FnOnce(u32) -> Frame) {
        let id = loop {
            if let Some(id) = inner.pending.lock().keys().next().copied() {
                break id;
            }
            tokio::task::yield_now().await;
        };
        control(inner, answer(id)).unwrap();
    }

    fn stored(req_id: u32) -> Frame {
        Frame::Stored(brokerd_proto::Stored {
            req_id,
            delivered: 2,
            seq: 41,
            duplicate: true,
            stream: "ORDERS".into(),
        })
    }

    #[tokio::test]
    async fn stored_answers_a_publish_and_a_plain_ack_is_not_stored() {
        use crate::publish::Publish;
        use std::future::IntoFuture;
        let inner = Inner::for_test();
        let (got, ()) = tokio::join!(
            Publish::new(&inner, "order.created", b"x")
                .msg_id("m-1")
                .stored()
                .into_future(),
            answer_next(&inner, stored)
        );
        let got = got.unwrap();
        assert_eq!((got.stream.as_str(), got.seq), ("ORDERS", 41));
        assert!(got.duplicate);
        assert_eq!(got.delivered, 2);
        // The id went out as the header.
        let mut buf = inner.write.lock().buf.split();
        let Some(Frame::Pub(p)) = decode(&mut buf, 1 << 20).unwrap() else {
            panic!("expected a PUB");
        };
        assert_eq!(
            p.body
                .headers_owned()
                .get(brokerd_proto::streams::MSG_ID_HEADER),
            Some("m-1")
        );

        // `acked` takes either answer and counts deliveries.
        let (n, ()) = tokio::join!(
            Publish::new(&inner, "order.created", b"x")
                .acked()
                .into_future(),
            answer_next(&inner, stored)
        );
        assert_eq!(n.unwrap(), 2);

        // A plain ACK: no stream stored it.
        let (refused, ()) = tokio::join!(
            Publish::new(&inner, "chat.room", b"x")
                .stored()
                .into_future(),
            answer_next(&inner, |req_id| Frame::Ack {
                req_id,
                delivered: 3
            })
        );
        assert!(
            matches!(&refused, Err(Error::NotStored { topic, delivered: 3 }) if topic == "chat.room"),
            "{refused:?}"
        );
    }

    #[tokio::test]
    async fn messages_of_a_replay_subscription_carry_their_stream_sequence() {
        let inner = Inner::for_test();
        let mut receivers = Vec::new();
        for (sid, stream) in [(1, true), (2, false)] {
            let (tx, rx) = channel::channel(64, 1 << 20);
            inner.subs.lock().insert(
                sid,
                crate::state::SubEntry {
                    tx,
                    shared: Arc::default(),
                    filter: "order.>".into(),
                    queue: None,
                    stream: stream.then(|| crate::stream::StreamSub {
                        name: "ORDERS".into(),
                        resume: brokerd_proto::StartPosition::All,
                        consumer: None,
                    }),
                    leaving: false,
                },
            );
            receivers.push(rx);
        }
        let mut buf = BytesMut::new();
        for (sid, seq) in [(1, 5), (1, 9), (2, 1), (1, 12), (2, 2)] {
            let body = brokerd_proto::Body::parse(brokerd_proto::Body::encode(
                "order.created",
                None,
                None,
                b"{}",
            ))
            .unwrap();
            Frame::Msg(Msg { sid, seq, body }).encode(&mut buf);
        }
        let mut last = None;
        assert!(read_frames(&inner, &mut buf, &mut last).await.is_ok());
        let mut taken = |i: usize| {
            std::iter::from_fn(|| receivers[i].try_recv())
                .map(|m| (m.seq(), m.stream_seq()))
                .collect::<Vec<_>>()
        };
        assert_eq!(taken(0), [(5, Some(5)), (9, Some(9)), (12, Some(12))]);
        assert_eq!(taken(1), [(1, None), (2, None)]);
        assert_eq!(inner.subs.lock()[&1].tx.last_seq(), 12);
    }

    #[test]
    fn the_notice_ending_a_replay_names_its_sid() {
        assert_eq!(
            ended_replay("replay subscription 17 ended: stream ORDERS was deleted"),
            Some(17)
        );
        assert_eq!(ended_replay("replay subscription x ended"), None);
        assert_eq!(ended_replay("disk full"), None);
    }

    #[tokio::test]
    async fn a_replay_whose_stream_is_deleted_ends_and_says_why() {
        let inner = Inner::for_test();
        let (tx, mut rx) = channel::channel(64, 1 << 20);
        let shared = Arc::new(crate::subscription::SubShared::default());
        inner.subs.lock().insert(
            7,
            crate::state::SubEntry {
                tx,
                shared: shared.clone(),
                filter: ">".into(),
                queue: None,
                stream: Some(crate::stream::StreamSub {
                    name: "ORDERS".into(),
                    resume: brokerd_proto::StartPosition::All,
                    consumer: None,
                }),
                leaving: false,
            },
        );
        // A message, then the notice, in one read: the reader holds the subscription's sender
        // for the message, and must let go of it for the stream to end.
        let mut buf = BytesMut::new();
        let body = brokerd_proto::Body::parse(brokerd_proto::Body::encode("t.x", None, None, b""))
            .unwrap();
        Frame::Msg(Msg {
            sid: 7,
            seq: 3,
            body,
        })
        .encode(&mut buf);
        Frame::Err(brokerd_proto::ErrorFrame {
            req_id: 0,
            code: ErrorCode::StoreFailed as u16,
            message: "replay subscription 7 ended: stream ORDERS was deleted".into(),
        })
        .encode(&mut buf);
        let mut last = None;
        assert!(read_frames(&inner, &mut buf, &mut last).await.is_ok());
        assert_eq!(rx.recv().await.and_then(|m| m.stream_seq()), Some(3));
        assert!(rx.recv().await.is_none(), "the stream ended");
        let why = shared.ended.lock().as_ref().map(ToString::to_string);
        assert_eq!(
            why.as_deref(),
            Some(
                "server error 23 (StoreFailed): replay subscription 7 ended: stream ORDERS was deleted"
            )
        );
        assert_eq!(inner.refusals.lock().total, 1);
    }

    #[tokio::test]
    async fn the_writer_flushes_what_it_wrote() {
        let inner = Inner::for_test();
        let sent = Arc::new(parking_lot::Mutex::new(Vec::new()));
        let wr = HoldsUntilFlushed {
            held: Vec::new(),
            sent: sent.clone(),
        };
        let task = tokio::spawn(write_task(inner.clone(), Box::new(wr)));
        assert!(inner.append(|b| b.extend_from_slice(b"a whole frame")));
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
        while sent.lock().is_empty() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "written but never flushed"
            );
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        assert_eq!(&sent.lock()[..], b"a whole frame");
        inner.shutdown(CloseReason::ClientClosed);
        assert_eq!(task.await.unwrap(), CloseReason::ClientClosed);
    }
}
