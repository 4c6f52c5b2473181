//! Frames: the unit of the brokerd protocol, their byte layout, encoding and decoding.
//!
//! Every frame is `length:u32 type:u8 fields...`, big-endian, where `length` counts the type byte
//! and the fields (not itself). [`decode`] takes complete frames off the front of a buffer and
//! returns `Ok(None)` when it needs more bytes; it never panics on any input. Frame fields are
//! checked for structure here; their meaning (topic syntax, limits, handshake order) is the
//! server's to judge.

use crate::body::{Body, BodyBuilder, BodyRef, put_str16};
use crate::error::{DecodeError, ErrorCode};
use bytes::{Buf, BufMut, Bytes, BytesMut};

/// The protocol version this crate speaks.
pub const PROTOCOL_VERSION: u16 = 1;

/// Bytes before a `MSG` frame's body: length, type, subscription id, sequence.
pub const MSG_HEADER_LEN: usize = 4 + 1 + 4 + 8;

/// Bytes of the length prefix.
pub const LENGTH_PREFIX: usize = 4;
/// The largest `length` a valid `HELLO` can have: its fixed fields (11), then a name, a user and
/// a password of 65,535 bytes each with their kind byte and length fields. A server may refuse a
/// longer frame before the handshake as too large, whatever its maximum frame size after it.
pub const MAX_HELLO_LEN: usize = 11 + u16::MAX as usize + 1 + 2 * (2 + u16::MAX as usize);

/// The type byte of each frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum FrameType {
    /// Client: opens the session.
    Hello = 0x01,
    /// Client: publishes a message.
    Pub = 0x02,
    /// Client: subscribes to a filter.
    Sub = 0x03,
    /// Client: ends a subscription, now or after N more messages.
    Unsub = 0x04,
    /// Either side: asks for a `PONG`.
    Ping = 0x05,
    /// Either side: answers a `PING`.
    Pong = 0x06,
    /// Client: acknowledges a message of a durable consumer.
    Mack = 0x07,
    /// Server: accepts the handshake.
    Welcome = 0x81,
    /// Server: a request succeeded.
    Ok = 0x82,
    /// Server: a publish was routed, with its delivered count.
    Ack = 0x83,
    /// Server: a request failed, or the connection is closing.
    Err = 0x84,
    /// Server: a message for a subscription.
    Msg = 0x85,
    /// Server: messages were dropped for a subscription.
    Lost = 0x86,
    /// Server: a publish was stored by a stream, with its stream sequence.
    Stored = 0x87,
}

/// What the server does when a connection's outbound queue is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum OverflowPolicy {
    /// Keep what is queued, drop the new message.
    #[default]
    DropNew,
    /// Drop the oldest queued message to make room for the new one.
    DropOld,
    /// Close the connection with a slow-consumer error.
    Disconnect,
}

impl OverflowPolicy {
    /// Wire value: 1, 2, 3. Zero on the wire means "the server's default".
    pub fn to_u8(self) -> u8 {
        match self {
            OverflowPolicy::DropNew => 1,
            OverflowPolicy::DropOld => 2,
            OverflowPolicy::Disconnect => 3,
        }
    }

    /// From a wire value; `None` for values this version does not define (0 is handled by callers).
    pub fn from_u8(v: u8) -> Option<OverflowPolicy> {
        match v {
            1 => Some(OverflowPolicy::DropNew),
            2 => Some(OverflowPolicy::DropOld),
            3 => Some(OverflowPolicy::Disconnect),
            _ => None,
        }
    }

    /// The name used in configuration: `drop-new`, `drop-old`, `disconnect`.
    pub fn name(self) -> &'static str {
        match self {
            OverflowPolicy::DropNew => "drop-new",
            OverflowPolicy::DropOld => "drop-old",
            OverflowPolicy::Disconnect => "disconnect",
        }
    }

    /// Parses a configuration name.
    pub fn from_name(s: &str) -> Option<OverflowPolicy> {
        [
            OverflowPolicy::DropNew,
            OverflowPolicy::DropOld,
            OverflowPolicy::Disconnect,
        ]
        .into_iter()
        .find(|p| p.name() == s)
    }
}

/// `HELLO` flag: do not deliver this connection's own publications back to it.
pub const HELLO_NO_ECHO: u8 = 0x01;
/// `HELLO` flag: credentials follow the name.
pub const HELLO_AUTH: u8 = 0x02;
/// `HELLO` credentials kind: a shared token.
pub const AUTH_TOKEN: u8 = 1;
/// `HELLO` credentials kind: a user name and a password.
pub const AUTH_PASSWORD: u8 = 2;
/// `PUB` flag: answer with an `ACK` carrying the delivered count.
pub const PUB_ACK: u8 = 0x01;
/// `SUB` flag: a queue group name follows the filter.
pub const SUB_QUEUE: u8 = 0x01;
/// `SUB` flag: a stream and a start position follow (a replay subscription).
pub const SUB_STREAM: u8 = 0x02;
/// `SUB` flag, only with [`SUB_STREAM`]: a durable consumer follows the start position.
pub const SUB_CONSUMER: u8 = 0x04;
/// `STORED` flag: the publish repeated a message id already stored; nothing new was stored.
pub const STORED_DUPLICATE: u8 = 0x01;

/// Where a replay subscription starts in its stream (`SUB` with [`SUB_STREAM`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StartPosition {
    /// Every message still stored (wire value 1).
    All,
    /// Only messages stored after the subscription is live (2).
    New,
    /// From this stream sequence on (3); an older one starts at the first still stored.
    FromSeq(u64),
    /// From the first message stored at or after this time, unix nanoseconds (4).
    FromTime(u64),
    /// The last N messages of the stream, then everything new (5).
    Last(u64),
    /// The newest message of each topic, in stream order, then everything new (6); only on a
    /// stream that keeps messages per topic (`max_msgs_per_topic`).
    LastPerTopic,
}

impl StartPosition {
    /// Wire value and argument.
    pub fn to_wire(self) -> (u8, u64) {
        match self {
            StartPosition::All => (1, 0),
            StartPosition::New => (2, 0),
            StartPosition::FromSeq(n) => (3, n),
            StartPosition::FromTime(t) => (4, t),
            StartPosition::Last(n) => (5, n),
            StartPosition::LastPerTopic => (6, 0),
        }
    }

    /// From the wire value and argument; `None` for an undefined value.
    pub fn from_wire(kind: u8, arg: u64) -> Option<StartPosition> {
        Some(match kind {
            1 => StartPosition::All,
            2 => StartPosition::New,
            3 => StartPosition::FromSeq(arg),
            4 => StartPosition::FromTime(arg),
            5 => StartPosition::Last(arg),
            6 => StartPosition::LastPerTopic,
            _ => return None,
        })
    }
}

/// The stream part of a replay subscription.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamStart {
    /// The stream's name.
    pub stream: String,
    /// Where to start (for a consumer: where it starts when it is created).
    pub start: StartPosition,
    /// Join this durable consumer instead of replaying on its own.
    pub consumer: Option<ConsumerSpec>,
}

/// A durable consumer named in a `SUB`: created with these settings by the first `SUB` that
/// names it; later ones join it and their settings are ignored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsumerSpec {
    /// The consumer's name, unique within its stream.
    pub name: String,
    /// Milliseconds a delivered message may stay unacknowledged before it is delivered again
    /// (0: the server's default).
    pub ack_wait_ms: u32,
    /// Deliveries of one message at most, the first included (0: the server's default).
    pub max_deliver: u16,
    /// Messages delivered and not yet acknowledged, across all members, at most (0: the
    /// server's default).
    pub max_in_flight: u32,
}

/// What a `MACK` says about a consumer's message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AckKind {
    /// Done with: never delivered again (1).
    Ack,
    /// Not done: deliver it again soon, to any member (2).
    Nak,
    /// Never deliver it again, although it was not processed (3).
    Term,
}

/// `MACK`: a client acknowledges one message it received on a consumer subscription.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mack {
    /// The consumer subscription it arrived on.
    pub sid: u32,
    /// The message's stream sequence.
    pub seq: u64,
    /// What to do with it.
    pub kind: AckKind,
}

/// `STORED`: a publish with the ack flag was stored by a stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stored {
    /// The `PUB`'s request id.
    pub req_id: u32,
    /// Subscriptions the message was queued for live, as in `ACK`.
    pub delivered: u32,
    /// The message's stream sequence (for a duplicate: the first copy's).
    pub seq: u64,
    /// The message id was already stored within the stream's window: nothing new was stored
    /// or routed.
    pub duplicate: bool,
    /// The stream that stored it.
    pub stream: String,
}

/// `HELLO`: the client opens the session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    /// Request id echoed by `WELCOME` or `ERR`.
    pub req_id: u32,
    /// Protocol version the client speaks.
    pub version: u16,
    /// Do not deliver this connection's own publications to its subscriptions.
    pub no_echo: bool,
    /// Requested overflow policy; `None` takes the server's default.
    pub overflow: Option<OverflowPolicy>,
    /// Free-form client name, used in logs.
    pub name: String,
    /// What the client proves its identity with, if anything.
    pub credentials: Option<Credentials>,
}

/// What a client proves its identity with in `HELLO`. `Debug` never shows a secret.
#[derive(Clone, PartialEq, Eq)]
pub enum Credentials {
    /// The server's shared token.
    Token(String),
    /// A configured user and its password.
    Password {
        /// The user name.
        user: String,
        /// The password, in clear: the connection's transport is what protects it.
        password: String,
    },
}

impl Credentials {
    /// The user name claimed, if any; a token names no user.
    pub fn user(&self) -> Option<&str> {
        match self {
            Credentials::Token(_) => None,
            Credentials::Password { user, .. } => Some(user),
        }
    }
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Credentials::Token(_) => f.write_str("Token(<redacted>)"),
            Credentials::Password { user, .. } => f
                .debug_struct("Password")
                .field("user", user)
                .field("password", &"<redacted>")
                .finish(),
        }
    }
}

/// `WELCOME`: the server accepts the handshake and states its limits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Welcome {
    /// The `HELLO`'s request id.
    pub req_id: u32,
    /// Protocol version the server speaks on this connection.
    pub version: u16,
    /// The overflow policy in force for this connection.
    pub overflow: OverflowPolicy,
    /// Largest accepted frame, length prefix excluded.
    pub max_frame: u32,
    /// Largest accepted payload.
    pub max_payload: u32,
    /// Longest accepted topic or filter, in bytes.
    pub max_topic_len: u16,
    /// Most tokens in a topic or filter.
    pub max_topic_tokens: u16,
    /// Most live subscriptions on one connection.
    pub max_subs: u32,
    /// Outbound queue limit in messages.
    pub max_pending_msgs: u32,
    /// Outbound queue limit in bytes.
    pub max_pending_bytes: u32,
    /// The server's id, unique per process start.
    pub server_id: String,
}

/// `PUB`: publish a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Publish {
    /// Request id named by the `ACK` or `ERR` it causes.
    pub req_id: u32,
    /// Whether the client wants an `ACK`.
    pub ack: bool,
    /// Topic, reply-to, headers, payload.
    pub body: Body,
}

/// `SUB`: subscribe to a filter under a client-chosen id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subscribe {
    /// Request id named by the `OK` or `ERR` it causes.
    pub req_id: u32,
    /// Client-chosen subscription id, unique among the connection's live subscriptions.
    pub sid: u32,
    /// The filter text (syntax is checked by the server).
    pub filter: String,
    /// Queue group: among the group's subscriptions that match a message, exactly one receives it.
    pub queue: Option<String>,
    /// Replay from a stream instead of live routing.
    pub stream: Option<StreamStart>,
}

/// `UNSUB`: end a subscription now (`max == 0`) or after `max` more messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unsubscribe {
    /// Request id named by the `OK` or `ERR` it causes.
    pub req_id: u32,
    /// The subscription.
    pub sid: u32,
    /// Zero: now. Otherwise: after this many more deliveries.
    pub max: u32,
}

/// `ERR`: a request failed, or the connection is about to close.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErrorFrame {
    /// The request that caused it; 0 when no request did.
    pub req_id: u32,
    /// Numeric code; unknown codes must be treated as generic errors.
    pub code: u16,
    /// Human-readable detail.
    pub message: String,
}

impl ErrorFrame {
    /// The code, if this version defines it.
    pub fn error_code(&self) -> Option<ErrorCode> {
        ErrorCode::from_u16(self.code)
    }
}

/// `MSG`: one message for one subscription.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Msg {
    /// The subscription it was matched for.
    pub sid: u32,
    /// Per-subscription sequence number, from 1; dropped messages use up numbers too.
    pub seq: u64,
    /// Topic, reply-to, headers, payload, as published.
    pub body: Body,
}

/// `LOST`: messages matched for a subscription were dropped since the last `LOST` for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lost {
    /// The subscription.
    pub sid: u32,
    /// How many were dropped.
    pub missed: u64,
}

/// Any frame of the protocol.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// See [`Hello`].
    Hello(Hello),
    /// See [`Publish`].
    Pub(Publish),
    /// See [`Subscribe`].
    Sub(Subscribe),
    /// See [`Unsubscribe`].
    Unsub(Unsubscribe),
    /// See [`Mack`].
    Mack(Mack),
    /// A token to echo in the `PONG`.
    Ping(u32),
    /// The token of the `PING` answered.
    Pong(u32),
    /// See [`Welcome`].
    Welcome(Welcome),
    /// The request id that succeeded.
    Ok(u32),
    /// A routed publish: request id and how many subscriptions it was queued for.
    Ack {
        /// The `PUB`'s request id.
        req_id: u32,
        /// Subscriptions the message was queued for.
        delivered: u32,
    },
    /// See [`ErrorFrame`].
    Err(ErrorFrame),
    /// See [`Msg`].
    Msg(Msg),
    /// See [`Lost`].
    Lost(Lost),
    /// See [`Stored`].
    Stored(Stored),
}

impl Frame {
    /// The frame's type byte.
    pub fn frame_type(&self) -> FrameType {
        match self {
            Frame::Hello(_) => FrameType::Hello,
            Frame::Pub(_) => FrameType::Pub,
            Frame::Sub(_) => FrameType::Sub,
            Frame::Unsub(_) => FrameType::Unsub,
            Frame::Mack(_) => FrameType::Mack,
            Frame::Ping(_) => FrameType::Ping,
            Frame::Pong(_) => FrameType::Pong,
            Frame::Welcome(_) => FrameType::Welcome,
            Frame::Ok(_) => FrameType::Ok,
            Frame::Ack { .. } => FrameType::Ack,
            Frame::Err(_) => FrameType::Err,
            Frame::Msg(_) => FrameType::Msg,
            Frame::Lost(_) => FrameType::Lost,
            Frame::Stored(_) => FrameType::Stored,
        }
    }

    /// Appends the encoded frame, length prefix included, to `dst`.
    ///
    /// Strings longer than `u16::MAX` bytes cannot be encoded; callers validate them first
    /// (topics and filters through [`crate::TopicLimits`]).
    pub fn encode(&self, dst: &mut BytesMut) {
        let start = dst.len();
        dst.put_u32(0);
        dst.put_u8(self.frame_type() as u8);
        match self {
            Frame::Hello(h) => {
                dst.put_u32(h.req_id);
                dst.put_u16(h.version);
                let mut flags = if h.no_echo { HELLO_NO_ECHO } else { 0 };
                if h.credentials.is_some() {
                    flags |= HELLO_AUTH;
                }
                dst.put_u8(flags);
                dst.put_u8(h.overflow.map_or(0, OverflowPolicy::to_u8));
                put_str16(dst, &h.name);
                match &h.credentials {
                    None => {}
                    Some(Credentials::Token(token)) => {
                        dst.put_u8(AUTH_TOKEN);
                        put_str16(dst, token);
                    }
                    Some(Credentials::Password { user, password }) => {
                        dst.put_u8(AUTH_PASSWORD);
                        put_str16(dst, user);
                        put_str16(dst, password);
                    }
                }
            }
            Frame::Pub(p) => {
                dst.put_u32(p.req_id);
                dst.put_u8(if p.ack { PUB_ACK } else { 0 });
                dst.put_slice(p.body.raw());
            }
            Frame::Sub(s) => {
                dst.put_u32(s.req_id);
                dst.put_u32(s.sid);
                let mut flags = if s.queue.is_some() { SUB_QUEUE } else { 0 };
                if let Some(st) = &s.stream {
                    flags |= SUB_STREAM;
                    if st.consumer.is_some() {
                        flags |= SUB_CONSUMER;
                    }
                }
                dst.put_u8(flags);
                put_str16(dst, &s.filter);
                if let Some(q) = &s.queue {
                    put_str16(dst, q);
                }
                if let Some(st) = &s.stream {
                    put_str16(dst, &st.stream);
                    let (kind, arg) = st.start.to_wire();
                    dst.put_u8(kind);
                    dst.put_u64(arg);
                    if let Some(c) = &st.consumer {
                        put_str16(dst, &c.name);
                        dst.put_u32(c.ack_wait_ms);
                        dst.put_u16(c.max_deliver);
                        dst.put_u32(c.max_in_flight);
                    }
                }
            }
            Frame::Unsub(u) => {
                dst.put_u32(u.req_id);
                dst.put_u32(u.sid);
                dst.put_u32(u.max);
            }
            Frame::Mack(m) => {
                dst.put_u32(m.sid);
                dst.put_u64(m.seq);
                dst.put_u8(match m.kind {
                    AckKind::Ack => 1,
                    AckKind::Nak => 2,
                    AckKind::Term => 3,
                });
            }
            Frame::Ping(t) | Frame::Pong(t) | Frame::Ok(t) => dst.put_u32(*t),
            Frame::Welcome(w) => {
                dst.put_u32(w.req_id);
                dst.put_u16(w.version);
                dst.put_u8(w.overflow.to_u8());
                dst.put_u32(w.max_frame);
                dst.put_u32(w.max_payload);
                dst.put_u16(w.max_topic_len);
                dst.put_u16(w.max_topic_tokens);
                dst.put_u32(w.max_subs);
                dst.put_u32(w.max_pending_msgs);
                dst.put_u32(w.max_pending_bytes);
                put_str16(dst, &w.server_id);
            }
            Frame::Ack { req_id, delivered } => {
                dst.put_u32(*req_id);
                dst.put_u32(*delivered);
            }
            Frame::Err(e) => {
                dst.put_u32(e.req_id);
                dst.put_u16(e.code);
                put_str16(dst, truncate(&e.message, u16::MAX as usize));
            }
            Frame::Msg(m) => {
                dst.put_u32(m.sid);
                dst.put_u64(m.seq);
                dst.put_slice(m.body.raw());
            }
            Frame::Lost(l) => {
                dst.put_u32(l.sid);
                dst.put_u64(l.missed);
            }
            Frame::Stored(st) => {
                dst.put_u32(st.req_id);
                dst.put_u32(st.delivered);
                dst.put_u64(st.seq);
                dst.put_u8(if st.duplicate { STORED_DUPLICATE } else { 0 });
                put_str16(dst, &st.stream);
            }
        }
        let len = (dst.len() - start - LENGTH_PREFIX) as u32;
        dst[start..start + LENGTH_PREFIX].copy_from_slice(&len.to_be_bytes());
    }

    /// Encodes into a fresh buffer.
    pub fn to_bytes(&self) -> Bytes {
        let mut b = BytesMut::new();
        self.encode(&mut b);
        b.freeze()
    }
}

fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// Appends a `PUB` frame built from borrowed fields, without an intermediate [`Body`].
pub fn encode_pub(dst: &mut BytesMut, req_id: u32, ack: bool, body: &BodyBuilder<'_>) {
    let len = 1 + 4 + 1 + body.len();
    dst.reserve(LENGTH_PREFIX + len);
    let flags = if ack { PUB_ACK } else { 0 };
    if body.reply.is_none() && body.headers.is_none() {
        // The common frame: one fixed head, then the topic and payload, three copies in all.
        let mut head = [0u8; LENGTH_PREFIX + 1 + 4 + 1 + 1 + 2];
        head[..4].copy_from_slice(&(len as u32).to_be_bytes());
        head[4] = FrameType::Pub as u8;
        head[5..9].copy_from_slice(&req_id.to_be_bytes());
        head[9] = flags;
        head[10] = 0;
        head[11..13].copy_from_slice(&(body.topic.len() as u16).to_be_bytes());
        dst.extend_from_slice(&head);
        dst.extend_from_slice(body.topic.as_bytes());
        dst.extend_from_slice(body.payload);
        return;
    }
    dst.put_u32(len as u32);
    dst.put_u8(FrameType::Pub as u8);
    dst.put_u32(req_id);
    dst.put_u8(flags);
    body.put(dst);
}

/// The bytes that precede a `MSG` body: length, type, subscription id, sequence.
///
/// The broker writes this per subscriber and then the publisher's body bytes unchanged.
pub fn encode_msg_header(sid: u32, seq: u64, body_len: usize) -> [u8; MSG_HEADER_LEN] {
    let mut h = [0u8; MSG_HEADER_LEN];
    let len = (MSG_HEADER_LEN - LENGTH_PREFIX + body_len) as u32;
    h[0..4].copy_from_slice(&len.to_be_bytes());
    h[4] = FrameType::Msg as u8;
    h[5..9].copy_from_slice(&sid.to_be_bytes());
    h[9..17].copy_from_slice(&seq.to_be_bytes());
    h
}

/// Takes one complete frame off the front of `buf`.
///
/// Returns `Ok(None)` and leaves `buf` untouched when it does not yet hold a whole frame. The
/// frame's bytes are split off `buf` without copying, so a `PUB` body shares `buf`'s allocation.
///
/// # Errors
/// A [`DecodeError`] when the stream cannot be trusted any more: a length over `max_frame`, a zero
/// length, an unknown type, or fields that do not fit the frame. The caller should close.
pub fn decode(buf: &mut BytesMut, max_frame: usize) -> Result<Option<Frame>, DecodeError> {
    if buf.len() < LENGTH_PREFIX {
        return Ok(None);
    }
    let len = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
    if len == 0 {
        return Err(DecodeError::EmptyFrame);
    }
    if len > max_frame {
        return Err(DecodeError::FrameTooLarge {
            len,
            max: max_frame,
        });
    }
    if buf.len() < LENGTH_PREFIX + len {
        // No reservation here: a peer could announce a large frame and send nothing more; the
        // caller grows its buffer as bytes actually arrive.
        return Ok(None);
    }
    if let Some(m) = take_msg(buf, max_frame) {
        return m.map(|(sid, seq, body)| Some(Frame::Msg(Msg { sid, seq, body })));
    }
    buf.advance(LENGTH_PREFIX);
    let frame = buf.split_to(len).freeze();
    parse(frame).map(Some)
}

/// Takes a complete `MSG` frame off the front of `buf` as its subscription id, sequence number
/// and body, without building a [`Frame`]: the frame a subscriber mostly reads.
///
/// Returns `None`, leaving `buf` untouched, when the front of `buf` is anything else (another
/// frame type, an incomplete or too short frame, a length over `max_frame`); [`decode`] then
/// handles it, errors included. A complete `MSG` whose body is malformed gives the error
/// [`decode`] would.
#[inline]
pub fn take_msg(
    buf: &mut BytesMut,
    max_frame: usize,
) -> Option<Result<(u32, u64, Body), DecodeError>> {
    let h = buf.get(..MSG_HEADER_LEN)?;
    let len = u32::from_be_bytes([h[0], h[1], h[2], h[3]]) as usize;
    if h[4] != FrameType::Msg as u8
        || len < MSG_HEADER_LEN - LENGTH_PREFIX
        || len > max_frame
        || buf.len() < LENGTH_PREFIX + len
    {
        return None;
    }
    let sid = u32::from_be_bytes([h[5], h[6], h[7], h[8]]);
    let seq = u64::from_be_bytes([h[9], h[10], h[11], h[12], h[13], h[14], h[15], h[16]]);
    buf.advance(MSG_HEADER_LEN);
    // Only the body is split off: one reference-counted slice per message.
    let body = buf.split_to(LENGTH_PREFIX + len - MSG_HEADER_LEN).freeze();
    Some(
        Body::parse(body)
            .map(|body| (sid, seq, body))
            .map_err(|what| DecodeError::Malformed { frame: "MSG", what }),
    )
}

/// A `PUB` frame borrowed from the read buffer; see [`peek_pub`].
#[derive(Debug, Clone, Copy)]
pub struct PubRef<'a> {
    /// Request id named by the `ACK` or `ERR` it causes.
    pub req_id: u32,
    /// Whether the client wants an `ACK`.
    pub ack: bool,
    /// Topic, reply-to, headers, payload, borrowed.
    pub body: BodyRef<'a>,
}

/// Reads a complete `PUB` frame at the front of `buf` without taking it off: returns the frame
/// and its total length (prefix included), for the caller to advance past once done with it.
///
/// Returns `None` when the front of `buf` is anything else (another frame type, an incomplete
/// frame, a length over `max_frame`): [`decode`] then handles it as usual, errors included. A
/// complete `PUB` frame that is malformed gives the same error [`decode`] would.
#[inline]
pub fn peek_pub(buf: &[u8], max_frame: usize) -> Option<Result<(PubRef<'_>, usize), DecodeError>> {
    let prefix: [u8; 4] = buf.get(..LENGTH_PREFIX)?.try_into().ok()?;
    let len = u32::from_be_bytes(prefix) as usize;
    if len == 0 || len > max_frame || buf.len() < LENGTH_PREFIX + len {
        return None;
    }
    if buf[LENGTH_PREFIX] != FrameType::Pub as u8 {
        return None;
    }
    let frame = &buf[LENGTH_PREFIX + 1..LENGTH_PREFIX + len];
    let malformed = |what| Some(Err(DecodeError::Malformed { frame: "PUB", what }));
    let Some(head) = frame.get(..5) else {
        return malformed(if frame.len() < 4 {
            "truncated request id"
        } else {
            "truncated flags"
        });
    };
    let req_id = u32::from_be_bytes([head[0], head[1], head[2], head[3]]);
    let flags = head[4];
    if flags & !PUB_ACK != 0 {
        return malformed("undefined flag");
    }
    match BodyRef::parse(&frame[5..]) {
        Ok(body) => Some(Ok((
            PubRef {
                req_id,
                ack: flags & PUB_ACK != 0,
                body,
            },
            LENGTH_PREFIX + len,
        ))),
        Err(what) => malformed(what),
    }
}

/// A cursor over one frame's fields that reports truncation as [`DecodeError::Malformed`].
struct Fields {
    buf: Bytes,
    frame: &'static str,
}

impl Fields {
    fn short(&self, what: &'static str) -> DecodeError {
        DecodeError::Malformed {
            frame: self.frame,
            what,
        }
    }

    fn u8(&mut self, what: &'static str) -> Result<u8, DecodeError> {
        if self.buf.remaining() < 1 {
            return Err(self.short(what));
        }
        Ok(self.buf.get_u8())
    }

    fn u16(&mut self, what: &'static str) -> Result<u16, DecodeError> {
        if self.buf.remaining() < 2 {
            return Err(self.short(what));
        }
        Ok(self.buf.get_u16())
    }

    fn u32(&mut self, what: &'static str) -> Result<u32, DecodeError> {
        if self.buf.remaining() < 4 {
            return Err(self.short(what));
        }
        Ok(self.buf.get_u32())
    }

    fn u64(&mut self, what: &'static str) -> Result<u64, DecodeError> {
        if self.buf.remaining() < 8 {
            return Err(self.short(what));
        }
        Ok(self.buf.get_u64())
    }

    fn string(&mut self, what: &'static str) -> Result<String, DecodeError> {
        let len = self.u16(what)? as usize;
        if self.buf.remaining() < len {
            return Err(self.short(what));
        }
        let s = self.buf.split_to(len);
        String::from_utf8(s.to_vec()).map_err(|_| self.short("string is not utf-8"))
    }

    fn body(self) -> Result<Body, DecodeError> {
        let frame = self.frame;
        Body::parse(self.buf).map_err(|what| DecodeError::Malformed { frame, what })
    }

    fn end(self) -> Result<(), DecodeError> {
        if self.buf.has_remaining() {
            return Err(self.short("trailing bytes"));
        }
        Ok(())
    }
}

fn parse(mut raw: Bytes) -> Result<Frame, DecodeError> {
    let ty = raw.get_u8();
    let name = match ty {
        0x01 => "HELLO",
        0x02 => "PUB",
        0x03 => "SUB",
        0x04 => "UNSUB",
        0x05 => "PING",
        0x06 => "PONG",
        0x07 => "MACK",
        0x81 => "WELCOME",
        0x82 => "OK",
        0x83 => "ACK",
        0x84 => "ERR",
        0x85 => "MSG",
        0x86 => "LOST",
        0x87 => "STORED",
        other => return Err(DecodeError::UnknownType(other)),
    };
    let mut f = Fields {
        buf: raw,
        frame: name,
    };
    let frame = match ty {
        0x01 => {
            let req_id = f.u32("truncated request id")?;
            let version = f.u16("truncated version")?;
            let flags = f.u8("truncated flags")?;
            let overflow = f.u8("truncated overflow policy")?;
            let name = f.string("truncated name")?;
            let credentials = if flags & HELLO_AUTH != 0 {
                match f.u8("truncated credentials kind")? {
                    AUTH_TOKEN => Some(Credentials::Token(f.string("truncated token")?)),
                    AUTH_PASSWORD => Some(Credentials::Password {
                        user: f.string("truncated user")?,
                        password: f.string("truncated password")?,
                    }),
                    _ => {
                        return Err(DecodeError::InvalidOption {
                            what: "undefined credentials kind",
                        });
                    }
                }
            } else {
                None
            };
            f.end()?;
            // Structure first, then meaning: a well-formed HELLO asking for something this
            // version does not define is an option error, not a malformed frame.
            if flags & !(HELLO_NO_ECHO | HELLO_AUTH) != 0 {
                return Err(DecodeError::InvalidOption {
                    what: "undefined flag",
                });
            }
            let overflow = match overflow {
                0 => None,
                v => Some(
                    OverflowPolicy::from_u8(v).ok_or(DecodeError::InvalidOption {
                        what: "undefined overflow policy",
                    })?,
                ),
            };
            Frame::Hello(Hello {
                req_id,
                version,
                no_echo: flags & HELLO_NO_ECHO != 0,
                overflow,
                name,
                credentials,
            })
        }
        0x02 => {
            let req_id = f.u32("truncated request id")?;
            let flags = f.u8("truncated flags")?;
            if flags & !PUB_ACK != 0 {
                return Err(f.short("undefined flag"));
            }
            Frame::Pub(Publish {
                req_id,
                ack: flags & PUB_ACK != 0,
                body: f.body()?,
            })
        }
        0x03 => {
            let req_id = f.u32("truncated request id")?;
            let sid = f.u32("truncated subscription id")?;
            let flags = f.u8("truncated flags")?;
            if flags & !(SUB_QUEUE | SUB_STREAM | SUB_CONSUMER) != 0
                || (flags & SUB_CONSUMER != 0 && flags & SUB_STREAM == 0)
            {
                return Err(f.short("undefined flag"));
            }
            let filter = f.string("truncated filter")?;
            let queue = if flags & SUB_QUEUE != 0 {
                Some(f.string("truncated queue group")?)
            } else {
                None
            };
            let stream = if flags & SUB_STREAM != 0 {
                let stream = f.string("truncated stream")?;
                let kind = f.u8("truncated start position")?;
                let arg = f.u64("truncated start argument")?;
                let start = StartPosition::from_wire(kind, arg)
                    .ok_or(f.short("undefined start position"))?;
                // One encoding per frame: a start that takes no argument carries 0.
                if start.to_wire() != (kind, arg) {
                    return Err(f.short("start argument not 0 for a start that takes none"));
                }
                let consumer = if flags & SUB_CONSUMER != 0 {
                    Some(ConsumerSpec {
                        name: f.string("truncated consumer")?,
                        ack_wait_ms: f.u32("truncated ack wait")?,
                        max_deliver: f.u16("truncated max deliver")?,
                        max_in_flight: f.u32("truncated max in flight")?,
                    })
                } else {
                    None
                };
                Some(StreamStart {
                    stream,
                    start,
                    consumer,
                })
            } else {
                None
            };
            f.end()?;
            Frame::Sub(Subscribe {
                req_id,
                sid,
                filter,
                queue,
                stream,
            })
        }
        0x04 => {
            let req_id = f.u32("truncated request id")?;
            let sid = f.u32("truncated subscription id")?;
            let max = f.u32("truncated max")?;
            f.end()?;
            Frame::Unsub(Unsubscribe { req_id, sid, max })
        }
        0x07 => {
            let sid = f.u32("truncated subscription id")?;
            let seq = f.u64("truncated sequence")?;
            let kind = match f.u8("truncated kind")? {
                1 => AckKind::Ack,
                2 => AckKind::Nak,
                3 => AckKind::Term,
                _ => return Err(f.short("undefined acknowledgement kind")),
            };
            f.end()?;
            Frame::Mack(Mack { sid, seq, kind })
        }
        0x05 | 0x06 | 0x82 => {
            let t = f.u32("truncated token")?;
            f.end()?;
            match ty {
                0x05 => Frame::Ping(t),
                0x06 => Frame::Pong(t),
                _ => Frame::Ok(t),
            }
        }
        0x81 => {
            let req_id = f.u32("truncated request id")?;
            let version = f.u16("truncated version")?;
            let overflow = OverflowPolicy::from_u8(f.u8("truncated overflow policy")?)
                .ok_or(f.short("undefined overflow policy"))?;
            let w = Welcome {
                req_id,
                version,
                overflow,
                max_frame: f.u32("truncated limits")?,
                max_payload: f.u32("truncated limits")?,
                max_topic_len: f.u16("truncated limits")?,
                max_topic_tokens: f.u16("truncated limits")?,
                max_subs: f.u32("truncated limits")?,
                max_pending_msgs: f.u32("truncated limits")?,
                max_pending_bytes: f.u32("truncated limits")?,
                server_id: f.string("truncated server id")?,
            };
            f.end()?;
            Frame::Welcome(w)
        }
        0x83 => {
            let req_id = f.u32("truncated request id")?;
            let delivered = f.u32("truncated delivered count")?;
            f.end()?;
            Frame::Ack { req_id, delivered }
        }
        0x84 => {
            let req_id = f.u32("truncated request id")?;
            let code = f.u16("truncated code")?;
            let message = f.string("truncated message")?;
            f.end()?;
            Frame::Err(ErrorFrame {
                req_id,
                code,
                message,
            })
        }
        0x85 => {
            let sid = f.u32("truncated subscription id")?;
            let seq = f.u64("truncated sequence")?;
            Frame::Msg(Msg {
                sid,
                seq,
                body: f.body()?,
            })
        }
        0x86 => {
            let sid = f.u32("truncated subscription id")?;
            let missed = f.u64("truncated missed count")?;
            f.end()?;
            Frame::Lost(Lost { sid, missed })
        }
        _ => {
            let req_id = f.u32("truncated request id")?;
            let delivered = f.u32("truncated delivered count")?;
            let seq = f.u64("truncated sequence")?;
            let flags = f.u8("truncated flags")?;
            if flags & !STORED_DUPLICATE != 0 {
                return Err(f.short("undefined flag"));
            }
            let stream = f.string("truncated stream")?;
            f.end()?;
            Frame::Stored(Stored {
                req_id,
                delivered,
                seq,
                duplicate: flags & STORED_DUPLICATE != 0,
                stream,
            })
        }
    };
    Ok(frame)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip(f: Frame) {
        let mut buf = BytesMut::new();
        f.encode(&mut buf);
        let total = buf.len();
        for cut in 0..total {
            let mut partial = BytesMut::from(&buf[..cut]);
            assert_eq!(decode(&mut partial, 1 << 20), Ok(None), "cut at {cut}");
        }
        assert_eq!(decode(&mut buf, 1 << 20), Ok(Some(f)));
        assert!(buf.is_empty());
    }

    #[test]
    fn every_frame_round_trips_and_waits_for_all_bytes() {
        let body = Body::encode("a.b", Some("r"), None, b"xyz");
        round_trip(Frame::Hello(Hello {
            req_id: 1,
            version: 1,
            no_echo: true,
            overflow: Some(OverflowPolicy::DropOld),
            name: "n".into(),
            credentials: None,
        }));
        round_trip(Frame::Hello(Hello {
            req_id: 1,
            version: 1,
            no_echo: false,
            overflow: None,
            name: "n".into(),
            credentials: Some(Credentials::Token("t".into())),
        }));
        round_trip(Frame::Hello(Hello {
            req_id: 1,
            version: 1,
            no_echo: true,
            overflow: None,
            name: String::new(),
            credentials: Some(Credentials::Password {
                user: "u".into(),
                password: "p".into(),
            }),
        }));
        round_trip(Frame::Pub(Publish {
            req_id: 2,
            ack: true,
            body: Body::parse(body.clone()).unwrap(),
        }));
        round_trip(Frame::Sub(Subscribe {
            req_id: 3,
            sid: 9,
            filter: "a.*".into(),
            queue: None,
            stream: None,
        }));
        round_trip(Frame::Sub(Subscribe {
            req_id: 3,
            sid: 9,
            filter: "jobs.>".into(),
            queue: Some("workers".into()),
            stream: None,
        }));
        for start in [
            StartPosition::All,
            StartPosition::New,
            StartPosition::FromSeq(7),
            StartPosition::FromTime(1_700_000_000_000_000_000),
            StartPosition::Last(10),
            StartPosition::LastPerTopic,
        ] {
            round_trip(Frame::Sub(Subscribe {
                req_id: 5,
                sid: 10,
                filter: "order.>".into(),
                queue: None,
                stream: Some(StreamStart {
                    stream: "ORDERS".into(),
                    start,
                    consumer: None,
                }),
            }));
        }
        round_trip(Frame::Sub(Subscribe {
            req_id: 5,
            sid: 11,
            filter: "order.>".into(),
            queue: None,
            stream: Some(StreamStart {
                stream: "ORDERS".into(),
                start: StartPosition::All,
                consumer: Some(ConsumerSpec {
                    name: "billing".into(),
                    ack_wait_ms: 30_000,
                    max_deliver: 5,
                    max_in_flight: 1000,
                }),
            }),
        }));
        for kind in [AckKind::Ack, AckKind::Nak, AckKind::Term] {
            round_trip(Frame::Mack(Mack {
                sid: 11,
                seq: 99,
                kind,
            }));
        }
        round_trip(Frame::Stored(Stored {
            req_id: 6,
            delivered: 1,
            seq: u64::MAX,
            duplicate: true,
            stream: "S".into(),
        }));
        round_trip(Frame::Unsub(Unsubscribe {
            req_id: 4,
            sid: 9,
            max: 2,
        }));
        round_trip(Frame::Ping(5));
        round_trip(Frame::Pong(5));
        round_trip(Frame::Ok(6));
        round_trip(Frame::Ack {
            req_id: 7,
            delivered: 3,
        });
        round_trip(Frame::Err(ErrorFrame {
            req_id: 8,
            code: 6,
            message: "bad".into(),
        }));
        round_trip(Frame::Msg(Msg {
            sid: 9,
            seq: 10,
            body: Body::parse(body).unwrap(),
        }));
        round_trip(Frame::Lost(Lost { sid: 9, missed: 11 }));
    }

    #[test]
    fn msg_header_matches_full_encoding() {
        let raw = Body::encode("t", None, None, b"p");
        let f = Frame::Msg(Msg {
            sid: 7,
            seq: 42,
            body: Body::parse(raw.clone()).unwrap(),
        });
        let full = f.to_bytes();
        let h = encode_msg_header(7, 42, raw.len());
        assert_eq!(&full[..MSG_HEADER_LEN], &h[..]);
        assert_eq!(&full[MSG_HEADER_LEN..], &raw[..]);
    }

    #[test]
    fn the_longest_hello_is_max_hello_len_long() {
        let longest = "x".repeat(u16::MAX as usize);
        let mut buf = BytesMut::new();
        Frame::Hello(Hello {
            req_id: 1,
            version: 1,
            no_echo: false,
            overflow: None,
            name: longest.clone(),
            credentials: Some(Credentials::Password {
                user: longest.clone(),
                password: longest,
            }),
        })
        .encode(&mut buf);
        assert_eq!(buf.len(), LENGTH_PREFIX + MAX_HELLO_LEN);
        assert!(matches!(
            decode(&mut buf, MAX_HELLO_LEN),
            Ok(Some(Frame::Hello(_)))
        ));
    }

    #[test]
    fn framing_errors() {
        let mut b = BytesMut::from(&[0u8, 0, 0, 0][..]);
        assert_eq!(decode(&mut b, 100), Err(DecodeError::EmptyFrame));
        let mut b = BytesMut::from(&[0u8, 0, 1, 0][..]);
        assert_eq!(
            decode(&mut b, 100),
            Err(DecodeError::FrameTooLarge { len: 256, max: 100 })
        );
        let mut b = BytesMut::from(&[0u8, 0, 0, 1, 0x7f][..]);
        assert_eq!(decode(&mut b, 100), Err(DecodeError::UnknownType(0x7f)));
        let mut b = BytesMut::from(&[0u8, 0, 0, 2, 0x05, 0][..]);
        assert!(matches!(
            decode(&mut b, 100),
            Err(DecodeError::Malformed { .. })
        ));
    }

    /// Found by the fuzzer: a start that takes no argument (1, 2, 6) with a non-zero one was
    /// accepted and re-encoded with 0, so one frame had two encodings. It is malformed now,
    /// and the same start with 0 still decodes.
    #[test]
    fn a_start_that_takes_no_argument_carries_zero() {
        for kind in [1u8, 2, 6] {
            for (arg, ok) in [(0u64, true), (1, false), (u64::MAX, false)] {
                let mut frame = BytesMut::new();
                Frame::Sub(Subscribe {
                    req_id: 1,
                    sid: 4,
                    filter: "order.>".into(),
                    queue: None,
                    stream: Some(StreamStart {
                        stream: "ORDERS".into(),
                        start: StartPosition::FromSeq(0),
                        consumer: None,
                    }),
                })
                .encode(&mut frame);
                // The start's kind and argument are the frame's last nine bytes.
                let at = frame.len() - 9;
                frame[at] = kind;
                frame[at + 1..].copy_from_slice(&arg.to_be_bytes());
                let decoded = decode(&mut frame, 1 << 20);
                if ok {
                    assert!(matches!(decoded, Ok(Some(Frame::Sub(_)))), "{kind} {arg}");
                } else {
                    assert!(
                        matches!(
                            decoded,
                            Err(DecodeError::Malformed {
                                frame: "SUB",
                                what: "start argument not 0 for a start that takes none"
                            })
                        ),
                        "{kind} {arg}: {decoded:?}"
                    );
                }
            }
        }
    }
}
