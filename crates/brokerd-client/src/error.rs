//! The client's error type.

use crate::event::CloseReason;
use brokerd_proto::{DecodeError, ErrorCode, TopicError};
use thiserror::Error;

/// Everything a client call can fail with.
///
/// Three kinds: the caller's arguments ([`Error::InvalidTopic`], [`Error::PayloadTooLarge`],
/// ...: nothing was sent), the server's answer ([`Error::Server`], [`Error::NoResponders`],
/// [`Error::Timeout`]), and the connection ([`Error::Closed`], [`Error::Disconnected`],
/// [`Error::Io`], ...).
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum Error {
    /// The topic is not valid.
    #[error("invalid topic: {0}")]
    InvalidTopic(TopicError),
    /// The reply-to topic is not valid.
    #[error("invalid reply-to topic: {0}")]
    InvalidReplyTo(TopicError),
    /// The filter is not valid.
    #[error("invalid filter: {0}")]
    InvalidFilter(TopicError),
    /// The payload is over the server's limit.
    #[error("payload of {len} bytes exceeds the server's maximum of {max}")]
    PayloadTooLarge {
        /// Payload length.
        len: usize,
        /// The server's limit.
        max: usize,
    },
    /// A header key or value is longer than 65,535 bytes.
    #[error("a header key or value is longer than 65535 bytes")]
    HeaderTooLong,
    /// A [`crate::ConnectOptions`] value cannot work, and nothing was dialed; or a
    /// [`crate::ConsumerOptions`] value, and nothing was sent.
    #[error("invalid option {option}: {reason}")]
    InvalidOption {
        /// The option's builder method.
        option: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// The server refused the request with this code.
    #[error("server error {} ({code:?}): {message}", *code as u16)]
    Server {
        /// The code (see `docs/protocol.md`, section "Error codes").
        code: ErrorCode,
        /// The server's message.
        message: String,
    },
    /// The server refused the request with a code this client does not know (a newer
    /// server).
    #[error("server error {code}: {message}")]
    ServerUnknown {
        /// The code's number.
        code: u16,
        /// The server's message.
        message: String,
    },
    /// A request matched no subscription, so nobody can answer it.
    #[error("no responders for {0}")]
    NoResponders(String),
    /// The server, or a responder, did not answer in time.
    #[error("timed out")]
    Timeout,
    /// [`crate::Message::respond`] on a message that carries no reply-to topic.
    #[error("the message has no reply-to topic")]
    NoReplyTo,
    /// The connection is closed for good.
    #[error("connection closed: {0}")]
    Closed(CloseReason),
    /// The connection was lost and the client is reconnecting: a call that needs the server
    /// fails at once rather than wait.
    #[error("disconnected, reconnecting: {0}")]
    Disconnected(CloseReason),
    /// Reconnecting, and the publishes buffered meanwhile fill
    /// [`crate::Reconnect::buffer_bytes`]: this one was not buffered.
    #[error("disconnected, and the {limit} bytes of publishes buffered meanwhile are full")]
    ReconnectBufferFull {
        /// The bound in bytes.
        limit: usize,
    },
    /// The socket failed while connecting.
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
    /// The TLS handshake failed; the text says why, with a hint when the server spoke plain
    /// brokerd.
    #[error("tls: {0}")]
    Tls(String),
    /// The server sent bytes that are not a valid frame during the handshake.
    #[error("protocol error: {0}")]
    Protocol(#[from] DecodeError),
    /// The server sent a frame that makes no sense at this point.
    #[error("unexpected frame from server: {0}")]
    Unexpected(&'static str),
    /// [`crate::Publish::stored`]: the broker answered with a plain acknowledgement, so no
    /// stream captures the topic and nothing was stored. The message was still routed live.
    #[error("no stream stored the message to {topic} (it reached {delivered} subscriptions live)")]
    NotStored {
        /// The topic published to.
        topic: String,
        /// Subscriptions the message was queued for live, as [`crate::Publish::acked`] counts.
        delivered: u32,
    },
    /// The stream name is not 1 to 64 bytes of ASCII letters, digits, `-` and `_`; nothing was
    /// sent.
    #[error("invalid stream name {0:?}: 1 to 64 ASCII letters, digits, '-' or '_'")]
    InvalidStreamName(String),
    /// The broker refused a stream management request ([`crate::Streams`]): a stream that
    /// does not exist, an invalid definition, a name already taken, ...
    #[error("stream {op} failed: {message}")]
    Stream {
        /// The operation: `add`, `list`, `info`, `purge` or `delete`.
        op: &'static str,
        /// The broker's message, as it sent it.
        message: String,
    },
    /// The durable consumer's name is not 1 to 64 bytes of ASCII letters, digits, `-` and `_`;
    /// nothing was sent.
    #[error("invalid consumer name {0:?}: 1 to 64 ASCII letters, digits, '-' or '_'")]
    InvalidConsumerName(String),
    /// [`crate::Message::ack`] (or `nak`, `term`) on a message that did not come from a durable
    /// consumer: nothing is to be acknowledged.
    #[error("the message did not come from a durable consumer: there is nothing to acknowledge")]
    NotFromConsumer,
    /// [`crate::Message::ack`] (or `nak`, `term`) on a message its subscription no longer holds:
    /// the subscription was dropped, unsubscribed or ended by the broker, or the connection the
    /// message arrived on was lost (the client may have reconnected since). Nothing was sent:
    /// the broker delivers the message again by itself (once the member left, or after the ack
    /// wait), and that delivery is the one to acknowledge.
    #[error(
        "message #{seq} can no longer be acknowledged: its subscription or connection is gone, and the broker delivers it again"
    )]
    StaleDelivery {
        /// The message's stream sequence.
        seq: u64,
    },
    /// The broker's answer to a stream management request is not what the protocol describes
    /// (not JSON, or without the stream asked about).
    #[error("unreadable answer to stream {op}: {reason}")]
    InvalidAnswer {
        /// The operation asked for.
        op: &'static str,
        /// What is wrong with the answer.
        reason: String,
    },
}

impl Error {
    /// The error for a server's `ERR` frame.
    pub(crate) fn server(code: u16, message: String) -> Error {
        match ErrorCode::from_u16(code) {
            Some(code) => Error::Server { code, message },
            None => Error::ServerUnknown { code, message },
        }
    }

    /// The server's error code: for [`Error::Server`], and for a connection the server closed
    /// with one.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            Error::Server { code, .. } => Some(*code),
            Error::Closed(reason) | Error::Disconnected(reason) => reason.code(),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_codes_are_typed_and_unknown_ones_kept() {
        let e = Error::server(21, "no".into());
        assert_eq!(e.code(), Some(ErrorCode::PermissionDenied));
        assert_eq!(e.to_string(), "server error 21 (PermissionDenied): no");
        let e = Error::server(999, "new".into());
        assert!(matches!(e, Error::ServerUnknown { code: 999, .. }));
        assert_eq!(e.code(), None);
        let closed = Error::Closed(CloseReason::server_error(16, "bye".into()));
        assert_eq!(closed.code(), Some(ErrorCode::ShuttingDown));
    }
}
