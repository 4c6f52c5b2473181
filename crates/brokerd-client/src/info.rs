//! [`ServerInfo`]: what a server announced when the client connected.

use brokerd_proto::{OverflowPolicy, Welcome};

/// What the server announced in its `WELCOME`: who it is and the limits in force for this
/// connection. After a reconnect, [`crate::Client::server_info`] returns the new server's.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ServerInfo {
    /// The server's id, unique per process start: a reconnect to a restarted broker shows a
    /// new one.
    pub server_id: String,
    /// The protocol version spoken on this connection.
    pub protocol_version: u16,
    /// The overflow policy in force for this connection's outbound queue.
    pub overflow: OverflowPolicy,
    /// The largest payload the server accepts; a larger publish fails with
    /// [`crate::Error::PayloadTooLarge`] before it is sent.
    pub max_payload: u32,
    /// The largest frame, length prefix excluded; the client reads none larger.
    pub max_frame: u32,
    /// The longest topic or filter, in bytes.
    pub max_topic_len: u16,
    /// The most tokens in a topic or filter.
    pub max_topic_tokens: u16,
    /// The most live subscriptions on this connection.
    pub max_subscriptions: u32,
    /// The server's outbound queue for this connection, in messages...
    pub max_pending_messages: u32,
    /// ... and in bytes.
    pub max_pending_bytes: u32,
}

impl From<Welcome> for ServerInfo {
    fn from(w: Welcome) -> ServerInfo {
        ServerInfo {
            server_id: w.server_id,
            protocol_version: w.version,
            overflow: w.overflow,
            max_payload: w.max_payload,
            max_frame: w.max_frame,
            max_topic_len: w.max_topic_len,
            max_topic_tokens: w.max_topic_tokens,
            max_subscriptions: w.max_subs,
            max_pending_messages: w.max_pending_msgs,
            max_pending_bytes: w.max_pending_bytes,
        }
    }
}
