//! The broker's statistics as typed values, in one place: the answer to a request on
//! [`crate::topic::STATS_REQUEST`], the HTTP monitoring endpoints (`/varz`, `/connz`, `/subz`)
//! and `brokerctl` all use these types, so that no field is spelled twice. Serialized as JSON
//! (`docs/protocol.md` section 6.1, `docs/operations.md` "Monitoring"). Every struct reads a
//! missing field as its default, so a client can read the answer of an older or newer broker.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// The broker as a whole: `/varz`, and the head of the statistics answer.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ServerStats {
    /// Unique per process start.
    pub server_id: String,
    /// The broker's version.
    pub version: String,
    /// Seconds since it started.
    pub uptime_s: f64,
    /// Connections now (handshake completed).
    pub connections: u64,
    /// Connections ever accepted past the handshake.
    pub total_connections: u64,
    /// Connections in their handshake now.
    pub handshakes: u64,
    /// Live subscriptions.
    pub subscriptions: u64,
    /// Messages published (`PUB` frames accepted), by every connection ever.
    pub msgs_in: u64,
    /// Their payload bytes.
    pub bytes_in: u64,
    /// Deliveries queued for subscribers.
    pub deliveries: u64,
    /// Deliveries the overflow policies dropped.
    pub dropped: u64,
    /// Messages that matched no subscription.
    pub unrouted: u64,
    /// Bytes written to clients (frames of every kind).
    pub bytes_out: u64,
    /// Deliveries still queued when their connection closed, never written (a write-deadline
    /// close, a reset, a shutdown's grace running out), and their bytes.
    pub abandoned_msgs: u64,
    /// Their bytes.
    pub abandoned_bytes: u64,
    /// Rates over the last second.
    pub rates: Rates,
    /// Connections closed, by reason (`docs/operations.md`, "Close reasons").
    pub closes: BTreeMap<String, u64>,
    /// The memory budget.
    pub memory: MemoryStats,
    /// The subscription trie and its match cache.
    pub sublist: SublistStats,
    /// The limits in force.
    pub limits: LimitStats,
    /// The busiest topics over the last second, from a sample of publishes, busiest first
    /// (at most 10).
    pub busiest_topics: Vec<TopicRate>,
}

/// Per-second rates, measured over the last second.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Rates {
    /// Messages published per second.
    pub msgs_in: f64,
    /// Payload bytes published per second.
    pub bytes_in: f64,
    /// Deliveries queued per second.
    pub deliveries: f64,
    /// Deliveries dropped per second.
    pub dropped: f64,
}

/// The broker's memory budget.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct MemoryStats {
    /// Bytes charged to the budget now.
    pub used: u64,
    /// The budget (`limits.max_memory`).
    pub limit: u64,
    /// Whether queues are shedding deliveries because the budget is exceeded.
    pub shedding: bool,
}

/// The subscription trie and its match cache.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct SublistStats {
    /// Subscriptions in the trie.
    pub subscriptions: u64,
    /// Trie nodes.
    pub nodes: u64,
    /// Topics cached.
    pub cache_entries: u64,
    /// Bytes the cache is estimated to hold.
    pub cache_bytes: u64,
    /// Lookups the cache answered.
    pub cache_hits: u64,
    /// Lookups that walked the trie.
    pub cache_misses: u64,
}

/// The limits in force (after any reload).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct LimitStats {
    /// Most connections.
    pub max_connections: u64,
    /// Most subscriptions in all.
    pub max_subscriptions: u64,
    /// Largest payload.
    pub max_payload: u64,
    /// A connection's outbound queue, in messages.
    pub max_pending_msgs: u64,
    /// ... and in bytes.
    pub max_pending_bytes: u64,
}

/// One topic's sampled publish rate.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct TopicRate {
    /// The topic.
    pub topic: String,
    /// Messages per second, estimated from the sample.
    pub msgs_per_s: f64,
}

/// Filters shown per connection in [`ConnStats::filters`].
pub const MAX_FILTERS_SHOWN: usize = 8;

/// One connection: a row of `/connz` and of the statistics answer.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ConnStats {
    /// The broker's id for it, unique for the process's life.
    pub id: u64,
    /// The name it gave in `HELLO`.
    pub name: String,
    /// Its address.
    pub peer: String,
    /// The user it authenticated as.
    pub user: Option<String>,
    /// When its handshake completed, RFC 3339 (UTC).
    pub connected_at: String,
    /// Its live subscriptions.
    pub subscriptions: u64,
    /// The filters of its first [`MAX_FILTERS_SHOWN`] subscriptions (by subscription id), a
    /// queue group's name after the filter (`orders.> [workers]`); `/subz` lists them all.
    pub filters: Vec<String>,
    /// Messages it published.
    pub msgs_in: u64,
    /// Their payload bytes.
    pub bytes_in: u64,
    /// Deliveries queued for it.
    pub deliveries: u64,
    /// Bytes written to it.
    pub bytes_out: u64,
    /// Deliveries its overflow policy dropped.
    pub dropped: u64,
    /// Deliveries waiting to be written (its lag, in messages).
    pub pending_msgs: u64,
    /// Their bytes.
    pub pending_bytes: u64,
    /// How long the oldest pending delivery has waited at most, in milliseconds.
    pub pending_age_ms: u64,
    /// Messages it published per second, over the last second.
    pub msgs_in_per_s: f64,
    /// Deliveries queued for it per second, over the last second.
    pub deliveries_per_s: f64,
    /// Deliveries dropped per second, over the last second.
    pub dropped_per_s: f64,
    /// Its overflow policy.
    pub overflow: String,
}

/// A connection that has closed: a row of `/connz?state=closed`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ClosedConn {
    /// Its figures when it closed.
    #[serde(flatten)]
    pub conn: ConnStats,
    /// When it closed, RFC 3339 (UTC).
    pub closed_at: String,
    /// Why (a close-reason name: `client-closed`, `slow-consumer`, ...).
    pub reason: String,
    /// Deliveries still queued for it that were never written.
    pub abandoned_msgs: u64,
    /// Their bytes.
    pub abandoned_bytes: u64,
}

/// The answer to a request on [`crate::topic::STATS_REQUEST`] from an admin (or on a broker
/// without authentication): the broker, and the connections with the most drops and lag.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct StatsAnswer {
    /// The broker as a whole.
    #[serde(flatten)]
    pub server: ServerStats,
    /// How many connections are listed.
    pub clients_listed: u64,
    /// Up to 100 connections, the most drops first, then the most pending bytes.
    pub clients: Vec<ConnStats>,
}

/// The answer to a statistics request from a user without the admin role: its own
/// connections only.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct UserStatsAnswer {
    /// The broker's id.
    pub server_id: String,
    /// The broker's version.
    pub version: String,
    /// The user asking.
    pub user: String,
    /// Its connections now.
    pub connections: u64,
    /// How many are listed.
    pub clients_listed: u64,
    /// Its connections.
    pub clients: Vec<ConnStats>,
}

/// `/connz`: one page of connections.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Connz {
    /// `open` or `closed`.
    pub state: String,
    /// Connections in that state (for `closed`, those still remembered).
    pub total: u64,
    /// Rows skipped before this page.
    pub offset: u64,
    /// Most rows on a page.
    pub limit: u64,
    /// The sort key.
    pub sort: String,
    /// The page (state `open`).
    pub connections: Vec<ConnStats>,
    /// The page (state `closed`), the latest first.
    pub closed: Vec<ClosedConn>,
}

/// `/subz`: subscription and cache figures, and on request the subscriptions themselves.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Subz {
    /// The trie and its cache.
    #[serde(flatten)]
    pub sublist: SublistStats,
    /// Subscriptions matching the request's filter (all when it gave none).
    pub total: u64,
    /// How many are listed.
    pub listed: u64,
    /// The subscriptions, when asked for (`subs=1`), up to the request's limit.
    pub subs: Vec<SubStats>,
}

/// One subscription, in `/subz`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct SubStats {
    /// Its connection's id.
    pub conn_id: u64,
    /// Its connection's name.
    pub conn_name: String,
    /// The connection's id for it.
    pub sid: u32,
    /// Its filter.
    pub filter: String,
    /// Its queue group.
    pub queue: Option<String>,
    /// Messages it matched (its last sequence number: queued or dropped).
    pub matched: u64,
    /// Messages it matched per second, over the last second.
    pub matched_per_s: f64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_answer_reads_back_and_missing_fields_take_defaults() {
        let answer = StatsAnswer {
            server: ServerStats {
                server_id: "s".into(),
                msgs_in: 10,
                ..ServerStats::default()
            },
            clients_listed: 1,
            clients: vec![ConnStats {
                id: 3,
                name: "n".into(),
                ..ConnStats::default()
            }],
        };
        let json = serde_json::to_string(&answer).expect("serializes");
        assert!(json.contains("\"msgs_in\":10"), "{json}");
        let back: StatsAnswer = serde_json::from_str(&json).expect("parses");
        assert_eq!(back, answer);
        let old: StatsAnswer =
            serde_json::from_str(r#"{"server_id":"x","clients":[{"id":1}]}"#).expect("parses");
        assert_eq!(old.clients[0].id, 1);
        assert_eq!(old.server.msgs_in, 0);
    }
}
