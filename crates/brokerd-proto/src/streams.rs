//! Stream management as typed values: the requests on `$SYS.req.stream.<op>` and their
//! answers (`docs/protocol.md` section 8.4), shared by the broker, the client library and
//! `brokerctl`. Serialized as JSON. Every struct reads a missing field as its default, so a
//! client can talk to an older or newer broker.

use serde::{Deserialize, Serialize};

/// The topic prefix of stream management requests: `$SYS.req.stream.add`, `.list`, `.info`,
/// `.purge`, `.delete`.
pub const STREAM_REQUEST_PREFIX: &str = "$SYS.req.stream.";

/// The header a publisher sets to make a publish safe to retry: a second publish with the same
/// value within the stream's duplicate window is not stored again.
pub const MSG_ID_HEADER: &str = "Brokerd-Msg-Id";

/// When a stream's appends reach the disk (`docs/operations.md`, "Streams").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Fsync {
    /// An acknowledgement is sent only once the batch holding the message is on disk.
    Always,
    /// Appends are synced every `fsync_interval_ms`; what a power failure may lose is at most
    /// that window.
    #[default]
    Interval,
    /// The operating system decides when to write.
    Never,
}

/// A stream's definition: what it captures and how long it keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StreamConfig {
    /// The stream's name: 1 to 64 bytes of ASCII letters, digits, `-` and `_`.
    pub name: String,
    /// Every published message whose topic matches one of these is stored.
    pub filters: Vec<String>,
    /// Keep at most this many messages (0: no limit); the oldest segments go first.
    pub max_msgs: u64,
    /// Keep at most this many bytes on disk (0: no limit).
    pub max_bytes: u64,
    /// Keep messages at most this many seconds (0: no limit).
    pub max_age_s: u64,
    /// Keep only the newest this many messages of each topic (0: no limit): a "last value"
    /// stream. Older ones are no longer delivered at once, and their disk space is reclaimed
    /// when a whole segment holds only such messages.
    pub max_msgs_per_topic: u64,
    /// When appends reach the disk.
    pub fsync: Fsync,
    /// The sync interval under [`Fsync::Interval`], in milliseconds.
    pub fsync_interval_ms: u64,
    /// How long a message id is remembered for duplicate suppression, in seconds (0: off).
    pub duplicate_window_s: u64,
    /// Segment files roll at this size, in bytes.
    pub segment_bytes: u64,
}

impl Default for StreamConfig {
    fn default() -> StreamConfig {
        StreamConfig {
            name: String::new(),
            filters: Vec::new(),
            max_msgs: 0,
            max_bytes: 0,
            max_age_s: 0,
            max_msgs_per_topic: 0,
            fsync: Fsync::Interval,
            fsync_interval_ms: 100,
            duplicate_window_s: 120,
            segment_bytes: 64 * 1024 * 1024,
        }
    }
}

/// A stream's definition and state: the answer to `info`, one row of `list`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct StreamInfo {
    /// Its definition.
    pub config: StreamConfig,
    /// Where the definition came from: `config` (the configuration file) or `api`.
    pub source: String,
    /// The oldest stored sequence (the next one to be stored when empty).
    pub first_seq: u64,
    /// The newest sequence ever stored (0 before the first).
    pub last_seq: u64,
    /// Messages stored now.
    pub msgs: u64,
    /// Bytes stored now, on disk.
    pub bytes: u64,
    /// Segment files.
    pub segments: u64,
    /// Unix nanoseconds of the oldest stored message (0 when empty).
    pub first_ts: u64,
    /// Unix nanoseconds of the newest stored message (0 before the first).
    pub last_ts: u64,
    /// Publishes it could not store since the broker started.
    pub store_errors: u64,
    /// Duplicates it suppressed since the broker started.
    pub duplicates: u64,
    /// Messages stored since the broker started, and the writes (batches) that stored them:
    /// under `fsync = always` each batch is one fdatasync, so their ratio is the group commit.
    pub stored: u64,
    /// See `stored`.
    pub batches: u64,
    /// Replay subscriptions reading it now.
    pub readers: u64,
    /// With `max_msgs_per_topic`: the topics it holds messages of, and those messages.
    pub topics: u64,
    /// With `max_msgs_per_topic`: the messages still delivered (the newest of each topic).
    pub kept: u64,
    /// What recovery found at start-up: bytes cut from a torn tail, corrupt records skipped.
    pub recovered_truncated_bytes: u64,
    /// Corrupt records recovery stepped over at start-up.
    pub recovered_corrupt_records: u64,
    /// Its durable consumers opened since the broker started.
    pub consumers: Vec<ConsumerInfo>,
}

/// A durable consumer's state.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct ConsumerInfo {
    /// Its name.
    pub name: String,
    /// Its filter.
    pub filter: String,
    /// Every sequence at or below it is done.
    pub floor: u64,
    /// Messages delivered and not yet acknowledged.
    pub in_flight: u64,
    /// Subscriptions sharing it now.
    pub members: u64,
    /// Deliveries since the broker started, redeliveries included.
    pub delivered: u64,
    /// Redeliveries since the broker started.
    pub redelivered: u64,
    /// Messages given up after their last delivery, since the broker started.
    pub given_up: u64,
    /// Times its task looked for work since the broker started: once per batch of
    /// acknowledgements, deliveries, deadline or room in a member's queue, not per message.
    pub passes: u64,
}

/// A request naming one stream (`info`, `purge`, `delete`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct StreamName {
    /// The stream.
    pub name: String,
}

/// The answer to every stream request: `error` set on failure, else the fields the operation
/// fills in.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct StreamAnswer {
    /// Why the request failed; absent on success.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The stream (`add`, `info`, `purge`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stream: Option<StreamInfo>,
    /// Every stream (`list`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub streams: Vec<StreamInfo>,
    /// Messages removed (`purge`).
    pub purged: u64,
    /// Whether the stream was deleted (`delete`).
    pub deleted: bool,
}

/// The shortest `ack_wait_ms` a durable consumer may be created with: below it, one member that
/// never acknowledges would have the broker redeliver its whole window many times a second.
pub const MIN_ACK_WAIT_MS: u32 = 100;

/// Whether `name` is a valid stream name: 1 to 64 bytes of ASCII letters, digits, `-`, `_`.
pub fn valid_stream_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_minimal_add_request_takes_the_defaults() {
        let c: StreamConfig =
            serde_json::from_str(r#"{"name":"ORDERS","filters":["order.>"]}"#).unwrap();
        assert_eq!(c.fsync, Fsync::Interval);
        assert_eq!(c.fsync_interval_ms, 100);
        assert_eq!(c.filters, vec!["order.>".to_string()]);
        let back: StreamConfig = serde_json::from_str(&serde_json::to_string(&c).unwrap()).unwrap();
        assert_eq!(back, c);
    }

    #[test]
    fn stream_names_are_plain() {
        assert!(valid_stream_name("ORDERS_v2-eu"));
        for bad in ["", "a.b", "a b", "../x", "é", &"x".repeat(65)] {
            assert!(!valid_stream_name(bad), "{bad}");
        }
    }
}
