//! The client's error type.

use brokerd_proto::{DecodeError, ErrorCode, TopicError};
use thiserror::Error;

/// Everything a client call can fail with.
#[derive(Debug, Error)]
pub enum Error {
    /// The socket failed.
    #[error("i/o error")]
    Io(#[from] std::io::Error),
    /// The server sent bytes that are not a valid frame.
    #[error("protocol error")]
    Protocol(#[from] DecodeError),
    /// The server sent a frame that makes no sense at this point.
    #[error("unexpected frame from server: {0}")]
    Unexpected(&'static str),
    /// The server refused the request.
    #[error("server error {code}: {message}")]
    Server {
        /// Numeric error code (see `docs/protocol.md`).
        code: u16,
        /// The server's message.
        message: String,
    },
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
    /// The connection is closed; the text says why, as far as the client knows.
    #[error("connection closed: {0}")]
    Closed(String),
    /// The connection was lost and the client is reconnecting: a call that needed the server
    /// failed at once rather than wait, or a publish found the reconnect buffer full. The text
    /// says why the connection was lost.
    #[error("disconnected: {0}")]
    Disconnected(String),
    /// The TLS handshake failed; the text says why, with a hint when the server spoke plain
    /// brokerd.
    #[error("tls: {0}")]
    Tls(String),
    /// The server, or a responder, did not answer in time.
    #[error("timed out")]
    Timeout,
    /// A request matched no subscription, so nobody can answer it.
    #[error("no responders for {0}")]
    NoResponders(String),
    /// [`crate::Message::respond`] on a message that carries no reply-to topic.
    #[error("the message has no reply-to topic")]
    NoReplyTo,
}

impl Error {
    /// The server's error code, for [`Error::Server`].
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            Error::Server { code, .. } => ErrorCode::from_u16(*code),
            _ => None,
        }
    }
}
