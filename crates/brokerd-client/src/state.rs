//! The state a client's handles, subscriptions and connection tasks share: the write buffer,
//! the calls waiting for replies, the subscriptions, and what happens when a connection is lost,
//! comes back, or closes.

use crate::channel;
use crate::error::Error;
use crate::event::{CloseReason, Event};
use crate::info::ServerInfo;
use crate::options::ConnectOptions;
use crate::stream::{StoredAck, StreamSub};
use crate::subscription::{Message, SubShared};
use brokerd_proto::body::BodyBuilder;
use brokerd_proto::frame::encode_pub;
use brokerd_proto::topic::validate_topic;
use brokerd_proto::{Frame, Headers, Stored, Subscribe, TopicLimits, Unsubscribe, Welcome};
use bytes::BytesMut;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use tokio::sync::{Notify, oneshot};

/// A reply to one request.
pub(crate) enum Reply {
    Ok,
    Ack(u32),
    /// The answer to a publish with the ack flag that a stream stored, instead of `Ack`.
    Stored(Stored),
    Pong,
    Err(u16, String),
}

/// What the broker answered to a publish.
#[derive(Debug)]
pub(crate) enum Answered {
    /// Nothing: the publish did not ask for an acknowledgement.
    Sent,
    /// `ACK`: queued live for this many subscriptions; no stream captured it.
    Routed(u32),
    /// `STORED`: a stream stored it (or already had it, for a duplicate).
    Stored(StoredAck),
}

impl Answered {
    /// Subscriptions the message was queued for live (0 when not asked).
    pub(crate) fn delivered(&self) -> u32 {
        match self {
            Answered::Sent => 0,
            Answered::Routed(n) => *n,
            Answered::Stored(s) => s.delivered,
        }
    }
}

pub(crate) struct WriteState {
    pub(crate) buf: BytesMut,
    /// Set once the client has closed for good.
    pub(crate) closed: Option<CloseReason>,
    /// Whether a connection is up; while it is not (reconnecting), only publishes without an
    /// acknowledgement are buffered, up to [`crate::Reconnect::buffer_bytes`].
    pub(crate) connected: bool,
    /// The topic published last, known to be valid (empty before the first): publishing it
    /// again skips the check.
    pub(crate) valid_topic: String,
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

pub(crate) struct SubEntry {
    pub(crate) tx: channel::Sender,
    pub(crate) shared: Arc<SubShared>,
    /// What it was made with, to make it again after a reconnect.
    pub(crate) filter: String,
    pub(crate) queue: Option<String>,
    /// For a replay subscription or a durable consumer's: its stream and where to start again
    /// (see [`StreamSub::restart`]).
    pub(crate) stream: Option<StreamSub>,
    /// Set (under [`Inner::subs`]) once [`crate::Subscription::unsubscribe`] has begun: it is not
    /// made again after a reconnect, and a consumer's messages are no longer acknowledged.
    pub(crate) leaving: bool,
}

/// State shared by the [`crate::Client`] handles, its subscriptions and its two tasks.
pub(crate) struct Inner {
    pub(crate) write: Mutex<WriteState>,
    /// Wakes the writer task when the buffer goes from empty to not empty, or on close.
    pub(crate) data: Notify,
    /// Wakes callers waiting for buffer space.
    pub(crate) space: Notify,
    pub(crate) next_id: AtomicU32,
    pub(crate) pending: Mutex<HashMap<u32, oneshot::Sender<Reply>>>,
    pub(crate) subs: Mutex<HashMap<u32, SubEntry>>,
    /// This connection's reply inbox prefix, subscribed on first use.
    pub(crate) inbox: tokio::sync::OnceCell<String>,
    /// The inbox subscription's id (0 until made).
    pub(crate) inbox_sid: AtomicU32,
    /// Requests waiting for their first reply, by the token ending their reply-to topic.
    pub(crate) replies: Mutex<HashMap<u32, oneshot::Sender<Message>>>,
    /// The connection's generation: 0 for the first, one more at each reconnect. Changed only
    /// under `write` (in [`Inner::reconnected`]), so that whoever holds `write` reads the
    /// generation of the connection its frames go to. A durable consumer's message carries the
    /// generation it arrived on ([`crate::consumer`]).
    pub(crate) epoch: std::sync::atomic::AtomicU64,
    /// Set by `shutdown`: the reader stops delivering, even through its cached sender.
    pub(crate) shut: std::sync::atomic::AtomicBool,
    /// The current connection's `WELCOME`.
    pub(crate) info: Mutex<Arc<ServerInfo>>,
    /// Its `max_payload`, read by every publish.
    pub(crate) max_payload: AtomicU32,
    /// The largest frame read from the server: its `max_frame`, plus the few bytes by which a
    /// `MSG` header is longer than the `PUB` it came from.
    pub(crate) max_frame_in: std::sync::atomic::AtomicUsize,
    /// Why the last connection was lost, for calls that waited on it.
    pub(crate) lost: Mutex<CloseReason>,
    /// Subscriptions being made again after a reconnect: request id to subscription id, so
    /// that a refusal ends the subscription.
    pub(crate) resubs: Mutex<HashMap<u32, u32>>,
    /// Refusals the server sent for frames nobody waits on (publishes without
    /// acknowledgement), for [`crate::Client::take_refusals`].
    pub(crate) refusals: Mutex<Refusals>,
    /// Connection events, for [`crate::Client::events`].
    pub(crate) events: tokio::sync::broadcast::Sender<Event>,
    /// The address given to [`crate::Client::connect`].
    pub(crate) server: String,
    pub(crate) options: ConnectOptions,
}

/// Refusals kept for [`crate::Client::take_refusals`]; older ones are counted, not kept.
pub(crate) const MAX_REFUSALS: usize = 256;

#[derive(Default)]
pub(crate) struct Refusals {
    pub(crate) kept: std::collections::VecDeque<Error>,
    pub(crate) total: u64,
}

/// Extra bytes allowed in a frame from the server over its `max_frame` (a `MSG` carries a
/// subscription id and sequence where the `PUB` had a request id and flags).
pub(crate) const MSG_SLACK: usize = 64;

/// The largest frame accepted before a `WELCOME` says how large frames may be.
pub(crate) const HANDSHAKE_FRAME: usize = 64 * 1024;

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("name", &self.options.name)
            .field("server_id", &self.info.lock().server_id)
            .finish()
    }
}

impl Inner {
    pub(crate) fn new(info: Welcome, options: ConnectOptions, server: String) -> Arc<Inner> {
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
            epoch: std::sync::atomic::AtomicU64::new(0),
            shut: std::sync::atomic::AtomicBool::new(false),
            max_payload: AtomicU32::new(info.max_payload),
            max_frame_in: std::sync::atomic::AtomicUsize::new(
                (info.max_frame as usize).saturating_add(MSG_SLACK),
            ),
            info: Mutex::new(Arc::new(info.into())),
            lost: Mutex::new(CloseReason::ServerClosed),
            resubs: Mutex::new(HashMap::new()),
            refusals: Mutex::new(Refusals::default()),
            events: tokio::sync::broadcast::channel(64).0,
            server,
            options,
        })
    }

    /// Puts a new connection's `WELCOME` in force.
    pub(crate) fn set_info(&self, info: Welcome) {
        self.max_payload.store(info.max_payload, Ordering::Relaxed);
        self.max_frame_in.store(
            (info.max_frame as usize).saturating_add(MSG_SLACK),
            Ordering::Relaxed,
        );
        *self.info.lock() = Arc::new(info.into());
    }

    /// The error for a call whose connection went away while it waited.
    pub(crate) fn lost_error(&self) -> Error {
        let w = self.write.lock();
        match &w.closed {
            Some(reason) => Error::Closed(reason.clone()),
            None => Error::Disconnected(self.lost.lock().clone()),
        }
    }

    pub(crate) fn emit(&self, event: Event) {
        // Nobody listening is fine.
        let _ = self.events.send(event);
    }

    /// State for a connection that does not exist, for unit tests of the parts around it.
    #[cfg(test)]
    pub(crate) fn for_test() -> Arc<Inner> {
        Inner::new(test_welcome(), ConnectOptions::default(), "test".into())
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
    pub(crate) fn try_publish(&self, topic: &str, payload: &[u8]) -> Result<bool, Error> {
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
    ) -> Result<Answered, Error> {
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
            return Err(Error::HeaderTooLong);
        }
        let id = self.next_id();
        let rx = ack.then(|| self.expect(id));
        let _pending = ack.then(|| Forget(&self.pending, id));
        if let Err(e) = self.send(!ack, |buf| encode_pub(buf, id, ack, &body)).await {
            self.pending.lock().remove(&id);
            return Err(e);
        }
        match rx {
            None => Ok(Answered::Sent),
            Some(rx) => match self.wait(rx).await? {
                Reply::Ack(n) => Ok(Answered::Routed(n)),
                Reply::Stored(s) => Ok(Answered::Stored(s.into())),
                _ => Err(Error::Unexpected("expected ACK or STORED")),
            },
        }
    }

    /// The inbox prefix, subscribing `PREFIX.*` on first use.
    pub(crate) async fn inbox(&self) -> Result<&str, Error> {
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
                    stream: None,
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

    pub(crate) fn next_id(&self) -> u32 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    fn expect(&self, id: u32) -> oneshot::Receiver<Reply> {
        let (tx, rx) = oneshot::channel();
        self.pending.lock().insert(id, tx);
        rx
    }

    async fn wait(&self, rx: oneshot::Receiver<Reply>) -> Result<Reply, Error> {
        match rx.await {
            Ok(Reply::Err(code, message)) => Err(Error::server(code, message)),
            Ok(r) => Ok(r),
            Err(_) => Err(self.lost_error()),
        }
    }

    /// Sends a frame that expects `OK` (or `PONG`) under `id`, and waits for it.
    pub(crate) async fn request(&self, id: u32, frame: Frame) -> Result<(), Error> {
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

    /// The broker ended subscription `sid`: its stream ends once drained, and
    /// [`crate::Subscription::ended_by_broker`] says why.
    pub(crate) fn end_subscription(&self, sid: u32, why: Error) {
        if let Some(entry) = self.subs.lock().remove(&sid) {
            *entry.shared.ended.lock() = Some(why);
        }
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
    pub(crate) fn append(&self, encode: impl FnOnce(&mut BytesMut)) -> bool {
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
    /// without acknowledgement) is buffered up to [`crate::Reconnect::buffer_bytes`]; anything else
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
                    return Err(Error::ReconnectBufferFull { limit });
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
    pub(crate) fn disconnected(&self, reason: &CloseReason) {
        *self.lost.lock() = reason.clone();
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
            reason: reason.clone(),
        });
    }

    /// A new connection is up: its `WELCOME` is in force, every live subscription (and the
    /// request inbox) is made again first, then the publishes buffered meanwhile follow. A
    /// replay subscription starts again right after the last stream sequence it received; a
    /// durable consumer's joins the same consumer again, which goes on from the position the
    /// broker kept. A subscription being unsubscribed is not made again.
    pub(crate) fn reconnected(&self, info: Welcome) {
        self.set_info(info);
        let mut first = BytesMut::new();
        {
            let subs = self.subs.lock();
            let mut resubs = self.resubs.lock();
            for (sid, entry) in subs.iter().filter(|(_, e)| !e.leaving) {
                let req_id = self.next_id();
                resubs.insert(req_id, *sid);
                entry.shared.resubscribed.fetch_add(1, Ordering::Relaxed);
                // The old connection's reader has ended, so what its queue holds is final.
                let stream = entry
                    .stream
                    .as_ref()
                    .map(|s| s.restart(entry.tx.last_seq()));
                Frame::Sub(Subscribe {
                    req_id,
                    sid: *sid,
                    filter: entry.filter.clone(),
                    queue: entry.queue.clone(),
                    stream,
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
                stream: None,
            })
            .encode(&mut first);
        }
        {
            let mut w = self.write.lock();
            first.extend_from_slice(&w.buf);
            w.buf = first;
            w.connected = true;
            self.epoch.fetch_add(1, Ordering::Relaxed);
        }
        self.data.notify_one();
    }

    /// Marks the connection closed, fails waiting calls and ends every subscription stream.
    pub(crate) fn shutdown(&self, reason: CloseReason) {
        self.shut.store(true, Ordering::Release);
        {
            let mut w = self.write.lock();
            w.connected = false;
            if w.closed.is_none() {
                w.closed = Some(reason);
            }
        }
        self.pending.lock().clear();
        self.replies.lock().clear();
        self.subs.lock().clear();
        self.data.notify_one();
        self.space.notify_waiters();
    }
}

/// A token unlikely to repeat across connections: the standard library's random hasher keys
/// mixed with the time, in hex.
pub(crate) fn unique_token() -> String {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    h.write_u128(nanos);
    format!("{:016x}", h.finish())
}

/// A `WELCOME` for unit tests.
#[cfg(test)]
pub(crate) fn test_welcome() -> Welcome {
    Welcome {
        req_id: 0,
        version: brokerd_proto::PROTOCOL_VERSION,
        overflow: brokerd_proto::OverflowPolicy::DropNew,
        max_frame: 1 << 20,
        max_payload: 1 << 20,
        max_topic_len: 256,
        max_topic_tokens: 16,
        max_subs: 16,
        max_pending_msgs: 16,
        max_pending_bytes: 1 << 20,
        server_id: "test".into(),
    }
}

/// Removes `key` from a map of waiters when dropped.
pub(crate) struct Forget<'a, V>(pub(crate) &'a Mutex<HashMap<u32, V>>, pub(crate) u32);

impl<V> Drop for Forget<'_, V> {
    fn drop(&mut self) {
        self.0.lock().remove(&self.1);
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use brokerd_proto::{StartPosition, StreamStart, decode};

    /// Registers a subscription as `Client::subscribe_stream` would (or a live one without
    /// `stream`) and queues messages with these sequences for it, as the reader would.
    async fn sub_with(
        inner: &Inner,
        sid: u32,
        stream: Option<StreamSub>,
        seqs: &[u64],
    ) -> channel::Receiver {
        let (tx, rx) = channel::channel(64, 1 << 20);
        let mut batch: Vec<Message> = seqs
            .iter()
            .map(|&seq| {
                let mut m = Message::for_test(seq);
                m.sid = sid;
                m
            })
            .collect();
        tx.send_all(&mut batch).await.unwrap();
        inner.subs.lock().insert(
            sid,
            SubEntry {
                tx,
                shared: Arc::default(),
                filter: "order.>".into(),
                queue: None,
                stream,
                leaving: false,
            },
        );
        rx
    }

    /// The `SUB` frames at the front of the write buffer, by sid.
    fn subs_sent(inner: &Inner) -> HashMap<u32, Subscribe> {
        let mut buf = inner.write.lock().buf.clone();
        let mut found = HashMap::new();
        while let Some(frame) = decode(&mut buf, 1 << 20).unwrap() {
            if let Frame::Sub(s) = frame {
                found.insert(s.sid, s);
            }
        }
        found
    }

    #[tokio::test]
    async fn a_replay_subscription_is_made_again_right_after_what_it_received() {
        let inner = Inner::for_test();
        let stream = |resume| StreamSub {
            name: "ORDERS".into(),
            resume,
            consumer: None,
        };
        // Sequences with gaps, as a filtered replay delivers them.
        let _a = sub_with(&inner, 1, Some(stream(StartPosition::All)), &[3, 7, 40]).await;
        // Nothing received yet: the start recorded for it.
        let _b = sub_with(&inner, 2, Some(stream(StartPosition::FromSeq(11))), &[]).await;
        let _c = sub_with(&inner, 3, None, &[1, 2]).await;
        inner.disconnected(&CloseReason::ServerClosed);
        inner.reconnected(test_welcome());
        let sent = subs_sent(&inner);
        let start = |sid: u32| sent[&sid].stream.clone();
        assert_eq!(
            start(1),
            Some(StreamStart {
                stream: "ORDERS".into(),
                start: StartPosition::FromSeq(41),
                consumer: None,
            })
        );
        assert_eq!(start(2).unwrap().start, StartPosition::FromSeq(11));
        assert_eq!(start(3), None);
        assert!(sent.values().all(|s| s.filter == "order.>"));
    }
}
