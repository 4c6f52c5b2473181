//! Decode errors and the numeric error codes of `ERR` frames.
//!
//! A [`DecodeError`] always means the byte stream can no longer be trusted, so the server answers
//! with an `ERR` frame carrying [`DecodeError::code`] and closes the connection. [`ErrorCode`] is the
//! shared vocabulary of `ERR` frames; `docs/protocol.md` lists which codes close the connection.

use thiserror::Error;

/// Why a byte stream could not be decoded into a frame.
///
/// "Need more bytes" is not an error: [`crate::decode`] returns `Ok(None)` for it.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum DecodeError {
    /// The length prefix exceeds the negotiated maximum frame size.
    #[error("frame of {len} bytes exceeds the maximum of {max}")]
    FrameTooLarge {
        /// The length announced by the prefix.
        len: usize,
        /// The maximum accepted.
        max: usize,
    },
    /// The length prefix is zero, so there is not even a type byte.
    #[error("frame length is zero")]
    EmptyFrame,
    /// The type byte names no frame of this protocol version.
    #[error("unknown frame type 0x{0:02x}")]
    UnknownType(u8),
    /// A `HELLO` asked for an option value (a flag bit, an overflow policy) this version does not
    /// define.
    #[error("invalid option in HELLO: {what}")]
    InvalidOption {
        /// Which option.
        what: &'static str,
    },
    /// The frame's body is shorter or longer than its fields say.
    #[error("malformed {frame} frame: {what}")]
    Malformed {
        /// The frame type being decoded.
        frame: &'static str,
        /// What was wrong.
        what: &'static str,
    },
}

impl DecodeError {
    /// The `ERR` code that reports this error to the peer.
    pub fn code(&self) -> ErrorCode {
        match self {
            DecodeError::FrameTooLarge { .. } => ErrorCode::FrameTooLarge,
            DecodeError::EmptyFrame | DecodeError::Malformed { .. } => ErrorCode::MalformedFrame,
            DecodeError::UnknownType(_) => ErrorCode::UnknownFrameType,
            DecodeError::InvalidOption { .. } => ErrorCode::InvalidOption,
        }
    }
}

/// The numeric codes carried by `ERR` frames.
///
/// Codes are stable: a new version may add codes but never renumbers one. A client must treat an
/// unknown code as a generic error.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u16)]
pub enum ErrorCode {
    /// The `HELLO` asked for a protocol version the server does not speak. Closes.
    UnsupportedVersion = 1,
    /// A frame's fields do not add up to its length, or a flag is not defined. Closes.
    MalformedFrame = 2,
    /// The frame type is not defined by this protocol version. Closes.
    UnknownFrameType = 3,
    /// A length prefix exceeds the maximum frame size. Closes.
    FrameTooLarge = 4,
    /// A `PUB` payload exceeds the maximum payload size. The frame is rejected.
    PayloadTooLarge = 5,
    /// A `PUB` topic is not a valid topic. The frame is rejected.
    InvalidTopic = 6,
    /// A `SUB` filter is not a valid filter. The frame is rejected.
    InvalidFilter = 7,
    /// A frame other than `HELLO` arrived before the handshake. Closes.
    HandshakeRequired = 8,
    /// A second `HELLO` arrived on a connection. Closes.
    DuplicateHandshake = 9,
    /// A `SUB` reused a subscription id that is still live. The frame is rejected.
    DuplicateSubscription = 10,
    /// An `UNSUB` named a subscription id that is not live. The frame is rejected.
    UnknownSubscription = 11,
    /// The connection already holds the maximum number of subscriptions. The frame is rejected.
    TooManySubscriptions = 12,
    /// The connection's outbound queue overflowed under the `disconnect` policy, or its socket did
    /// not drain within the write deadline. Closes.
    SlowConsumer = 13,
    /// The server is at its connection limit. Closes.
    TooManyConnections = 14,
    /// No `HELLO` arrived within the handshake timeout. Closes.
    HandshakeTimeout = 15,
    /// The server is shutting down. Closes.
    ShuttingDown = 16,
    /// The client did not answer the server's `PING`s in time. Closes.
    KeepaliveTimeout = 17,
    /// A `PUB` named a reserved (`$`-prefixed) topic. The frame is rejected.
    ReservedTopic = 18,
    /// The `HELLO` carried an option value the server does not know. Closes.
    InvalidOption = 19,
    /// The server requires credentials and the `HELLO` carried none, or they were not accepted.
    /// Closes.
    AuthenticationFailed = 20,
    /// The connection's user may not publish to that topic, subscribe to that filter, join that
    /// queue group or use that reply-to. The frame is rejected.
    PermissionDenied = 21,
    /// A `SUB` named a stream that does not exist. The frame is rejected.
    NoSuchStream = 22,
    /// A stream could not store a `PUB` (disk full, an I/O error): the message may have been
    /// routed live but is not stored. The frame is rejected.
    StoreFailed = 23,
    /// A stream's write queue is full: the `PUB` was neither stored nor routed. The frame is
    /// rejected; the publisher may retry.
    StreamBusy = 24,
    /// A `SUB`'s start position cannot be used with that stream (the newest message of each
    /// topic, on a stream that does not keep messages per topic). The frame is rejected.
    InvalidStart = 25,
}

impl ErrorCode {
    /// Every code, in numeric order.
    pub const ALL: [ErrorCode; 25] = [
        ErrorCode::UnsupportedVersion,
        ErrorCode::MalformedFrame,
        ErrorCode::UnknownFrameType,
        ErrorCode::FrameTooLarge,
        ErrorCode::PayloadTooLarge,
        ErrorCode::InvalidTopic,
        ErrorCode::InvalidFilter,
        ErrorCode::HandshakeRequired,
        ErrorCode::DuplicateHandshake,
        ErrorCode::DuplicateSubscription,
        ErrorCode::UnknownSubscription,
        ErrorCode::TooManySubscriptions,
        ErrorCode::SlowConsumer,
        ErrorCode::TooManyConnections,
        ErrorCode::HandshakeTimeout,
        ErrorCode::ShuttingDown,
        ErrorCode::KeepaliveTimeout,
        ErrorCode::ReservedTopic,
        ErrorCode::InvalidOption,
        ErrorCode::AuthenticationFailed,
        ErrorCode::PermissionDenied,
        ErrorCode::NoSuchStream,
        ErrorCode::StoreFailed,
        ErrorCode::StreamBusy,
        ErrorCode::InvalidStart,
    ];

    /// The code for a number, if this version defines it.
    pub fn from_u16(n: u16) -> Option<ErrorCode> {
        ErrorCode::ALL.iter().copied().find(|c| *c as u16 == n)
    }

    /// Whether the server closes the connection after sending this code.
    pub fn closes_connection(self) -> bool {
        !matches!(
            self,
            ErrorCode::PayloadTooLarge
                | ErrorCode::InvalidTopic
                | ErrorCode::InvalidFilter
                | ErrorCode::DuplicateSubscription
                | ErrorCode::UnknownSubscription
                | ErrorCode::TooManySubscriptions
                | ErrorCode::ReservedTopic
                | ErrorCode::PermissionDenied
                | ErrorCode::NoSuchStream
                | ErrorCode::StoreFailed
                | ErrorCode::StreamBusy
                | ErrorCode::InvalidStart
        )
    }

    /// A short lower-case name, as used in logs and in `docs/protocol.md`.
    pub fn name(self) -> &'static str {
        match self {
            ErrorCode::UnsupportedVersion => "unsupported-version",
            ErrorCode::MalformedFrame => "malformed-frame",
            ErrorCode::UnknownFrameType => "unknown-frame-type",
            ErrorCode::FrameTooLarge => "frame-too-large",
            ErrorCode::PayloadTooLarge => "payload-too-large",
            ErrorCode::InvalidTopic => "invalid-topic",
            ErrorCode::InvalidFilter => "invalid-filter",
            ErrorCode::HandshakeRequired => "handshake-required",
            ErrorCode::DuplicateHandshake => "duplicate-handshake",
            ErrorCode::DuplicateSubscription => "duplicate-subscription",
            ErrorCode::UnknownSubscription => "unknown-subscription",
            ErrorCode::TooManySubscriptions => "too-many-subscriptions",
            ErrorCode::SlowConsumer => "slow-consumer",
            ErrorCode::TooManyConnections => "too-many-connections",
            ErrorCode::HandshakeTimeout => "handshake-timeout",
            ErrorCode::ShuttingDown => "shutting-down",
            ErrorCode::KeepaliveTimeout => "keepalive-timeout",
            ErrorCode::ReservedTopic => "reserved-topic",
            ErrorCode::InvalidOption => "invalid-option",
            ErrorCode::AuthenticationFailed => "authentication-failed",
            ErrorCode::PermissionDenied => "permission-denied",
            ErrorCode::NoSuchStream => "no-such-stream",
            ErrorCode::StoreFailed => "store-failed",
            ErrorCode::StreamBusy => "stream-busy",
            ErrorCode::InvalidStart => "invalid-start",
        }
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.name(), *self as u16)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_round_trip_and_are_dense() {
        for (i, c) in ErrorCode::ALL.iter().enumerate() {
            assert_eq!(*c as u16, i as u16 + 1);
            assert_eq!(ErrorCode::from_u16(*c as u16), Some(*c));
        }
        assert_eq!(ErrorCode::from_u16(0), None);
        assert_eq!(ErrorCode::from_u16(26), None);
    }
}
