//! What happens to a connection: [`Event`] and [`CloseReason`].

use brokerd_proto::ErrorCode;
use std::fmt;

/// What happened to a client's connection; see [`crate::Client::events`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Event {
    /// The server said it is shutting down; with reconnection on, the client reconnects.
    ServerShuttingDown,
    /// The connection was lost, and the client is reconnecting. Calls waiting for the server
    /// failed with [`crate::Error::Disconnected`].
    Disconnected {
        /// Why.
        reason: CloseReason,
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
        reason: CloseReason,
    },
}

/// Why a connection ended, as far as the client knows.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum CloseReason {
    /// [`crate::Client::close`] was called, or the last handle was dropped.
    ClientClosed,
    /// The server closed the connection without saying why.
    ServerClosed,
    /// The server closed the connection with an error frame.
    ServerError {
        /// The code; `None` for a code this client does not know (its number is in `raw`).
        code: Option<ErrorCode>,
        /// The code's number.
        raw: u16,
        /// The server's message.
        message: String,
    },
    /// Reading or writing the socket failed.
    Io {
        /// What kind of failure.
        kind: std::io::ErrorKind,
        /// The operating system's description.
        message: String,
    },
    /// The server sent something that is not valid brokerd, or a frame a server never sends.
    Protocol(String),
    /// Reconnecting gave up after the attempts [`crate::Reconnect::max_attempts`] allows.
    ReconnectFailed {
        /// Attempts made.
        attempts: u32,
        /// Why the last connection was lost.
        last: Box<CloseReason>,
    },
}

impl CloseReason {
    /// A reason from a closing error frame.
    pub(crate) fn server_error(raw: u16, message: String) -> CloseReason {
        CloseReason::ServerError {
            code: ErrorCode::from_u16(raw),
            raw,
            message,
        }
    }

    /// A reason from a failed socket operation; `what` is "read" or "write".
    pub(crate) fn io(what: &str, e: &std::io::Error) -> CloseReason {
        CloseReason::Io {
            kind: e.kind(),
            message: format!("{what} failed: {e}"),
        }
    }

    /// The server's error code, when it closed the connection with one.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            CloseReason::ServerError { code, .. } => *code,
            _ => None,
        }
    }
}

impl fmt::Display for CloseReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CloseReason::ClientClosed => f.write_str("closed by the client"),
            CloseReason::ServerClosed => f.write_str("the server closed the connection"),
            CloseReason::ServerError { raw, message, .. } => {
                write!(f, "server error {raw}: {message}")
            }
            CloseReason::Io { message, .. } => f.write_str(message),
            CloseReason::Protocol(what) => write!(f, "protocol error: {what}"),
            CloseReason::ReconnectFailed { attempts, last } => {
                write!(
                    f,
                    "could not reconnect in {attempts} attempts; last lost: {last}"
                )
            }
        }
    }
}
