//! The broker's statistics as one JSON object: the answer to a request on
//! [`brokerd_proto::topic::STATS_REQUEST`] (`brokerctl stats`). Its fields are documented in
//! `docs/operations.md`, "Monitoring".

use crate::server::Shared;
use brokerd_core::{Client, ClientStats};
use parking_lot::Mutex;
use serde_json::{Map, Value, json};
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

/// At most this many connections are listed, the ones with the most dropped deliveries first,
/// then the most pending bytes, so that an operator looking for a slow consumer sees it at the
/// top. The list also stops before the answer would outgrow the payload limit.
pub(crate) const MAX_LISTED: usize = 100;

/// Requests this close together share one snapshot: building one visits every connection, so a
/// client repeating the request cannot make the broker do that more than this often.
pub(crate) const REUSE_FOR: Duration = Duration::from_millis(100);

/// Room kept for the closing brackets and the list's counters when budgeting the list.
const SLACK: usize = 256;

/// The last snapshot, serialized, and when it was taken. A leaf lock: held only to read or
/// replace the pair, never while a snapshot is built.
#[derive(Default)]
pub(crate) struct StatsCache(
    Mutex<Option<Snapshot>>,
    /// Each user's own answer, for users without the admin role: one entry per configured user
    /// at most.
    Mutex<HashMap<Arc<str>, Snapshot>>,
);

/// A serialized answer and when it was built.
type Snapshot = (Instant, Arc<[u8]>);

/// The statistics of `shared`'s broker, serialized: a snapshot at most [`REUSE_FOR`] old.
pub(crate) fn stats_json(shared: &Shared) -> Arc<[u8]> {
    if let Some((at, json)) = &*shared.stats_cache.0.lock()
        && at.elapsed() < REUSE_FOR
    {
        return json.clone();
    }
    let json: Arc<[u8]> = build(shared).into();
    *shared.stats_cache.0.lock() = Some((Instant::now(), json.clone()));
    json
}

/// What a user without the admin role may see: its own connections, and nothing about anyone
/// else's. A snapshot at most [`REUSE_FOR`] old, so that a user repeating the request cannot make
/// the broker visit every connection more than that often.
pub(crate) fn user_stats_json(shared: &Shared, user: &Arc<str>) -> Arc<[u8]> {
    if let Some((at, json)) = shared.stats_cache.1.lock().get(user)
        && at.elapsed() < REUSE_FOR
    {
        return json.clone();
    }
    let own: Vec<Arc<Client>> = shared
        .broker
        .clients()
        .into_iter()
        .filter(|c| c.identity.user.as_ref() == Some(user))
        .collect();
    let mut budget = shared.broker.limits().max_payload.saturating_sub(SLACK * 2);
    let mut listed = Vec::new();
    for c in own.iter().take(MAX_LISTED) {
        let row = row(&client_stats(c));
        let len = serde_json::to_vec(&row).map_or(usize::MAX, |v| v.len() + 1);
        if len > budget {
            break;
        }
        budget -= len;
        listed.push(row);
    }
    let value = json!({
        "server_id": shared.server_id,
        "version": env!("CARGO_PKG_VERSION"),
        "user": &**user,
        "connections": own.len(),
        "clients_listed": listed.len(),
        "clients": listed,
    });
    let json: Arc<[u8]> = serde_json::to_vec(&value).unwrap_or_default().into();
    shared
        .stats_cache
        .1
        .lock()
        .insert(user.clone(), (Instant::now(), json.clone()));
    json
}

/// One connection's figures, as [`brokerd_core::Broker::stats_and_clients`] gives them.
fn client_stats(c: &Arc<Client>) -> ClientStats {
    ClientStats {
        client: c.clone(),
        subscriptions: c.subscription_count(),
        msgs_in: c.counters.msgs_in.load(Ordering::Relaxed),
        bytes_in: c.counters.bytes_in.load(Ordering::Relaxed),
        outbox: c.outbox.stats(),
    }
}

fn build(shared: &Shared) -> Vec<u8> {
    let (s, mut clients) = shared.broker.stats_and_clients(true);
    let closes: Map<String, Value> = s
        .closes
        .iter()
        .map(|(name, n)| ((*name).to_string(), Value::from(*n)))
        .collect();
    let mut value = json!({
        "server_id": shared.server_id,
        "version": env!("CARGO_PKG_VERSION"),
        "uptime_s": shared.started.elapsed().as_secs_f64(),
        "connections": s.connections,
        "total_connections": s.total_connections,
        "handshakes": shared.gate.handshakes(),
        "subscriptions": s.subscriptions,
        "msgs_in": s.msgs_in,
        "bytes_in": s.bytes_in,
        "deliveries": s.deliveries,
        "dropped": s.dropped,
        "unrouted": s.unrouted,
        "closes": closes,
        "memory": {
            "used": shared.broker.memory().used(),
            "limit": shared.broker.memory().limit(),
            "shedding": shared.broker.memory().shed_above() != usize::MAX,
        },
        "sublist": {
            "subscriptions": s.sublist.subscriptions,
            "nodes": s.sublist.nodes,
            "cache_entries": s.sublist.cache_entries,
            "cache_bytes": s.sublist.cache_bytes,
            "cache_hits": s.sublist.cache_hits,
            "cache_misses": s.sublist.cache_misses,
        },
        "clients_listed": 0,
        "clients": [],
    });
    let key = |c: &ClientStats| {
        (
            std::cmp::Reverse(c.outbox.dropped),
            std::cmp::Reverse(c.outbox.pending_bytes),
            c.client.id,
        )
    };
    if clients.len() > MAX_LISTED {
        clients.select_nth_unstable_by_key(MAX_LISTED, key);
        clients.truncate(MAX_LISTED);
    }
    clients.sort_unstable_by_key(key);
    let base = serde_json::to_vec(&value).map_or(0, |v| v.len());
    let mut budget = shared
        .broker
        .limits()
        .max_payload
        .saturating_sub(base + SLACK);
    let mut listed = Vec::with_capacity(clients.len());
    for c in &clients {
        let row = row(c);
        let len = serde_json::to_vec(&row).map_or(usize::MAX, |v| v.len() + 1);
        if len > budget {
            break;
        }
        budget -= len;
        listed.push(row);
    }
    value["clients_listed"] = listed.len().into();
    value["clients"] = listed.into();
    serde_json::to_vec(&value).unwrap_or_default()
}

fn row(c: &ClientStats) -> Value {
    json!({
        "id": c.client.id,
        "name": c.client.name,
        "peer": c.client.peer,
        "user": c.client.identity.user.as_deref(),
        "subscriptions": c.subscriptions,
        "msgs_in": c.msgs_in,
        "bytes_in": c.bytes_in,
        "deliveries": c.outbox.queued,
        "dropped": c.outbox.dropped,
        "pending_msgs": c.outbox.pending_msgs,
        "pending_bytes": c.outbox.pending_bytes,
        "overflow": c.client.outbox.policy().name(),
    })
}
