//! Why a connection ended: one typed reason per disconnect, logged once and counted.

use brokerd_proto::ErrorCode;
use std::fmt;

/// The reason a connection closed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CloseReason {
    /// The client closed its side cleanly.
    ClientClosed,
    /// The socket failed (reset, broken pipe, ...).
    Io(String),
    /// The client broke the protocol; the code was sent in an `ERR` before closing.
    Protocol(ErrorCode),
    /// The outbound queue overflowed under the `disconnect` policy.
    SlowConsumer {
        /// Messages pending when it overflowed.
        pending_msgs: usize,
        /// Bytes pending when it overflowed.
        pending_bytes: usize,
    },
    /// The socket did not accept queued bytes within the write deadline.
    WriteTimeout,
    /// No `HELLO` arrived in time.
    HandshakeTimeout,
    /// The client stopped answering keep-alive pings.
    KeepaliveTimeout,
    /// The server was at its connection limit when the `HELLO` completed.
    TooManyConnections,
    /// The server had as many connections still in their handshake as it allows.
    TooManyHandshakes,
    /// The peer's address already had as many connections as one address may hold.
    TooManyFromAddress,
    /// A frame that had started to arrive was not completed within its deadline.
    FrameTimeout,
    /// The server is shutting down.
    ServerShutdown,
    /// The `HELLO` carried no credentials or rejected ones; the text is what the client is told.
    AuthenticationFailed(&'static str),
    /// The client's user already held as many connections as it may.
    TooManyForUser,
    /// The client spoke plain brokerd to the TLS port, or TLS to a plain port; the text says
    /// which, and is what the client is told.
    WrongTransport(&'static str),
    /// The TLS handshake failed (no or an untrusted client certificate, no common version...).
    TlsFailed(String),
}

impl CloseReason {
    /// A short stable name, used as a log field and a metric label.
    pub fn name(&self) -> &'static str {
        match self {
            CloseReason::ClientClosed => "client-closed",
            CloseReason::Io(_) => "io-error",
            CloseReason::Protocol(_) => "protocol-error",
            CloseReason::SlowConsumer { .. } => "slow-consumer",
            CloseReason::WriteTimeout => "write-timeout",
            CloseReason::HandshakeTimeout => "handshake-timeout",
            CloseReason::KeepaliveTimeout => "keepalive-timeout",
            CloseReason::TooManyConnections => "too-many-connections",
            CloseReason::TooManyHandshakes => "too-many-handshakes",
            CloseReason::TooManyFromAddress => "too-many-from-address",
            CloseReason::FrameTimeout => "frame-timeout",
            CloseReason::ServerShutdown => "server-shutdown",
            CloseReason::AuthenticationFailed(_) => "authentication-failed",
            CloseReason::TooManyForUser => "too-many-for-user",
            CloseReason::WrongTransport(_) => "wrong-transport",
            CloseReason::TlsFailed(_) => "tls-failed",
        }
    }

    /// Every name [`CloseReason::name`] can return, for metrics that list zeros too.
    pub const NAMES: [&'static str; 16] = [
        "client-closed",
        "io-error",
        "protocol-error",
        "slow-consumer",
        "write-timeout",
        "handshake-timeout",
        "keepalive-timeout",
        "too-many-connections",
        "too-many-handshakes",
        "too-many-from-address",
        "frame-timeout",
        "server-shutdown",
        "authentication-failed",
        "too-many-for-user",
        "wrong-transport",
        "tls-failed",
    ];

    /// The `ERR` the server sends before closing for this reason, if any.
    pub fn error(&self) -> Option<(ErrorCode, String)> {
        match self {
            CloseReason::ClientClosed | CloseReason::Io(_) | CloseReason::Protocol(_) => None,
            CloseReason::SlowConsumer {
                pending_msgs,
                pending_bytes,
            } => Some((
                ErrorCode::SlowConsumer,
                format!(
                    "slow consumer: outbound queue full with {pending_msgs} messages and {pending_bytes} bytes pending"
                ),
            )),
            CloseReason::WriteTimeout => Some((
                ErrorCode::SlowConsumer,
                "slow consumer: socket did not drain within the write deadline".into(),
            )),
            CloseReason::HandshakeTimeout => Some((
                ErrorCode::HandshakeTimeout,
                "no hello within the handshake timeout".into(),
            )),
            CloseReason::KeepaliveTimeout => Some((
                ErrorCode::KeepaliveTimeout,
                "no pong within the keep-alive timeout".into(),
            )),
            CloseReason::TooManyConnections => Some((
                ErrorCode::TooManyConnections,
                "server is at its connection limit".into(),
            )),
            CloseReason::TooManyHandshakes => Some((
                ErrorCode::TooManyConnections,
                "server has too many connections in their handshake; retry later".into(),
            )),
            CloseReason::TooManyFromAddress => Some((
                ErrorCode::TooManyConnections,
                "too many connections from this address".into(),
            )),
            // The protocol's read-side liveness code: the peer stopped making progress.
            CloseReason::FrameTimeout => Some((
                ErrorCode::KeepaliveTimeout,
                "frame timeout: a frame was not completed within its deadline".into(),
            )),
            CloseReason::ServerShutdown => {
                Some((ErrorCode::ShuttingDown, "server is shutting down".into()))
            }
            CloseReason::AuthenticationFailed(text) => {
                Some((ErrorCode::AuthenticationFailed, (*text).into()))
            }
            CloseReason::WrongTransport(text) => {
                Some((ErrorCode::HandshakeRequired, (*text).into()))
            }
            CloseReason::TlsFailed(_) => None,
            CloseReason::TooManyForUser => Some((
                ErrorCode::TooManyConnections,
                "the user already holds as many connections as it may".into(),
            )),
        }
    }
}

impl fmt::Display for CloseReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CloseReason::Io(e) => write!(f, "io-error: {e}"),
            CloseReason::Protocol(code) => write!(f, "protocol-error: {code}"),
            CloseReason::WrongTransport(text) => write!(f, "wrong-transport: {text}"),
            CloseReason::TlsFailed(e) => write!(f, "tls-failed: {e}"),
            CloseReason::SlowConsumer {
                pending_msgs,
                pending_bytes,
            } => write!(
                f,
                "slow-consumer: {pending_msgs} messages, {pending_bytes} bytes pending"
            ),
            other => f.write_str(other.name()),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn every() -> Vec<CloseReason> {
        vec![
            CloseReason::ClientClosed,
            CloseReason::Io("reset".into()),
            CloseReason::Protocol(ErrorCode::MalformedFrame),
            CloseReason::SlowConsumer {
                pending_msgs: 1,
                pending_bytes: 2,
            },
            CloseReason::WriteTimeout,
            CloseReason::HandshakeTimeout,
            CloseReason::KeepaliveTimeout,
            CloseReason::TooManyConnections,
            CloseReason::TooManyHandshakes,
            CloseReason::TooManyFromAddress,
            CloseReason::FrameTimeout,
            CloseReason::ServerShutdown,
            CloseReason::AuthenticationFailed("authentication failed"),
            CloseReason::TooManyForUser,
            CloseReason::WrongTransport("wrong"),
            CloseReason::TlsFailed("bad certificate".into()),
        ]
    }

    #[test]
    fn names_lists_every_name_once_in_order() {
        let names: Vec<&str> = every().iter().map(CloseReason::name).collect();
        assert_eq!(names, CloseReason::NAMES);
    }

    #[test]
    fn refusals_and_timeouts_send_a_closing_error() {
        for r in [
            CloseReason::TooManyHandshakes,
            CloseReason::TooManyFromAddress,
            CloseReason::FrameTimeout,
            CloseReason::AuthenticationFailed("authentication failed"),
            CloseReason::TooManyForUser,
        ] {
            let (code, message) = r.error().unwrap();
            assert!(code.closes_connection(), "{r}");
            assert!(!message.is_empty(), "{r}");
        }
    }
}
