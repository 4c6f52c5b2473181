//! The broker's statistics as one JSON object: the answer to a request on
//! [`brokerd_proto::topic::STATS_REQUEST`] (`brokerctl stats`). Its fields are documented in
//! `docs/operations.md`, "Monitoring".

use crate::server::Shared;
use brokerd_core::Client;
use serde_json::{Map, Value, json};
use std::sync::Arc;
use std::sync::atomic::Ordering;

/// At most this many connections are listed, the ones with the most dropped deliveries first,
/// then the most pending bytes: an operator looking for a slow consumer sees it at the top, and
/// the answer stays far below the payload limit with any number of connections.
pub(crate) const MAX_LISTED: usize = 100;

/// The statistics of `shared`'s broker now, serialized.
pub(crate) fn stats_json(shared: &Shared) -> Vec<u8> {
    let s = shared.broker.stats();
    let closes: Map<String, Value> = s
        .closes
        .iter()
        .map(|(name, n)| ((*name).to_string(), Value::from(*n)))
        .collect();
    let mut clients: Vec<(Arc<Client>, brokerd_core::OutboxStats)> = shared
        .broker
        .clients()
        .into_iter()
        .map(|c| {
            let out = c.outbox.stats();
            (c, out)
        })
        .collect();
    clients.sort_by(|(a, x), (b, y)| {
        (y.dropped, y.pending_bytes, a.id).cmp(&(x.dropped, x.pending_bytes, b.id))
    });
    let listed: Vec<Value> = clients
        .iter()
        .take(MAX_LISTED)
        .map(|(c, out)| {
            json!({
                "id": c.id,
                "name": c.name,
                "peer": c.peer,
                "subscriptions": c.subscription_count(),
                "msgs_in": c.counters.msgs_in.load(Ordering::Relaxed),
                "bytes_in": c.counters.bytes_in.load(Ordering::Relaxed),
                "deliveries": out.queued,
                "dropped": out.dropped,
                "pending_msgs": out.pending_msgs,
                "pending_bytes": out.pending_bytes,
                "overflow": c.outbox.policy().name(),
            })
        })
        .collect();
    let value = json!({
        "server_id": shared.server_id,
        "version": env!("CARGO_PKG_VERSION"),
        "uptime_s": shared.started.elapsed().as_secs_f64(),
        "connections": s.connections,
        "total_connections": s.total_connections,
        "subscriptions": s.subscriptions,
        "msgs_in": s.msgs_in,
        "bytes_in": s.bytes_in,
        "deliveries": s.deliveries,
        "dropped": s.dropped,
        "unrouted": s.unrouted,
        "closes": closes,
        "sublist": {
            "subscriptions": s.sublist.subscriptions,
            "nodes": s.sublist.nodes,
            "cache_entries": s.sublist.cache_entries,
            "cache_hits": s.sublist.cache_hits,
            "cache_misses": s.sublist.cache_misses,
        },
        "clients": listed,
    });
    serde_json::to_vec(&value).unwrap_or_default()
}
