//! What the broker tells about itself: the typed statistics ([`brokerd_proto::stats`]) behind
//! the answer to [`brokerd_proto::topic::STATS_REQUEST`] and the HTTP endpoints (`http.rs`),
//! the once-a-second sampler that turns counters into rates, the recently closed connections,
//! the busiest topics, and the broker's own events on `$SYS.event.` topics. Every figure is
//! documented in `docs/operations.md`, "Monitoring".
//!
//! Cost: a snapshot visits every connection once (a few atomic loads and its outbox lock each),
//! and is reused for [`REUSE_FOR`]; the sampler does the same once a second. The busiest-topic
//! sample takes one publish in [`TOPIC_SAMPLE_EVERY`] per connection into a map of at most
//! [`MAX_SAMPLED_TOPICS`] topics. Nothing here holds a lock while it visits other clients.

use crate::server::Shared;
use brokerd_core::{Client, ClientStats, CloseReason, OutboxStats};
use brokerd_proto::stats::{
    ClosedConn, ConnStats, Connz, LimitStats, MemoryStats, Rates, ServerStats, StatsAnswer,
    SubStats, SublistStats, Subz, TopicRate, UserStatsAnswer,
};
use parking_lot::Mutex;
use serde::Serialize;
use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

/// At most this many connections are listed in the statistics answer, the ones with the most
/// dropped deliveries first, then the most pending bytes, so that an operator looking for a
/// slow consumer sees it at the top. The list also stops before the answer would outgrow the
/// payload limit.
pub(crate) const MAX_LISTED: usize = 100;

/// Requests this close together share one snapshot: building one visits every connection, so a
/// client repeating the request cannot make the broker do that more than this often.
pub(crate) const REUSE_FOR: Duration = Duration::from_millis(100);

/// Closed connections remembered for `/connz?state=closed`.
pub(crate) const MAX_CLOSED: usize = 256;

/// One publish in this many (at random) is counted in the busiest-topic sample.
pub(crate) const TOPIC_SAMPLE_EVERY: u64 = 64;

/// Distinct topics the sample holds in one second; a topic first seen after that is not counted
/// that second.
pub(crate) const MAX_SAMPLED_TOPICS: usize = 512;

/// Topics in the busiest list.
const BUSIEST: usize = 10;

/// Most rows on one `/connz` or `/subz` page.
pub(crate) const MAX_PAGE: usize = 1000;

/// Room kept for the closing brackets and the list's counters when budgeting the list.
const SLACK: usize = 256;

/// The broker's events: who connected and left, slow consumers, and drops.
pub(crate) mod events {
    /// A client completed its handshake.
    pub(crate) const CONNECT: &str = "$SYS.event.client.connect";
    /// A client's connection ended (any reason).
    pub(crate) const DISCONNECT: &str = "$SYS.event.client.disconnect";
    /// A client was closed as a slow consumer (its queue overflowed under the `disconnect`
    /// policy, or its socket did not drain within the write deadline).
    pub(crate) const SLOW_CONSUMER: &str = "$SYS.event.client.slow_consumer";
    /// A client's overflow policy dropped deliveries in the last second (at most one event
    /// per client per second).
    pub(crate) const DROPPED: &str = "$SYS.event.client.dropped";
}

/// The monitoring state the server keeps beside the broker.
#[derive(Default)]
pub(crate) struct Monitor {
    /// The last statistics answer, and each non-admin user's own.
    cache: StatsCache,
    /// Rates from the sampler.
    rates: Mutex<Sampled>,
    /// The most recently closed connections, the latest last.
    closed: Mutex<VecDeque<ClosedConn>>,
    /// This second's topic sample.
    topics: Mutex<HashMap<Box<str>, u64>>,
    /// Deliveries abandoned when their connection closed (never written), and their bytes.
    pub(crate) abandoned_msgs: AtomicU64,
    pub(crate) abandoned_bytes: AtomicU64,
    /// The previous `/subz` listing's readings, for per-subscription rates.
    sub_readings: Mutex<HashMap<(u64, u32), (Instant, u64)>>,
    /// `/tail` streams running now (`tail.rs`).
    pub(crate) tails: std::sync::atomic::AtomicUsize,
}

/// The last statistics answers, serialized, and when they were taken. Leaf locks: held only to
/// read or replace an entry, never while a snapshot is built.
#[derive(Default)]
struct StatsCache {
    all: Mutex<Option<Cached>>,
    /// Each user's own answer, for users without the admin role: one entry per configured user
    /// at most.
    users: Mutex<HashMap<Arc<str>, Cached>>,
}

/// A serialized answer and when it was built.
type Cached = (Instant, Arc<[u8]>);

/// What the sampler measured in its last second.
#[derive(Default)]
struct Sampled {
    /// When, and the broker's totals then.
    at: Option<Instant>,
    totals: [u64; 4],
    server: Rates,
    busiest: Vec<TopicRate>,
    /// Each connection's counters at the last sample, and its rates since the one before.
    conns: HashMap<u64, ConnSample>,
}

#[derive(Default, Clone, Copy)]
struct ConnSample {
    msgs_in: u64,
    deliveries: u64,
    dropped: u64,
    msgs_in_per_s: f64,
    deliveries_per_s: f64,
    dropped_per_s: f64,
}

/// RFC 3339 in UTC, to the millisecond.
fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}

/// One connection's figures, read now.
fn client_stats(c: &Arc<Client>) -> ClientStats {
    ClientStats {
        client: c.clone(),
        subscriptions: c.subscription_count(),
        msgs_in: c.counters.msgs_in.load(Ordering::Relaxed),
        bytes_in: c.counters.bytes_in.load(Ordering::Relaxed),
        outbox: c.outbox.stats(),
    }
}

impl Monitor {
    /// One connection as the endpoints show it, with the sampler's rates.
    fn conn(&self, c: &ClientStats, rates: &HashMap<u64, ConnSample>) -> ConnStats {
        let r = rates.get(&c.client.id).copied().unwrap_or_default();
        row(c, &r)
    }

    /// The broker as a whole, and every connection's figures, from one snapshot.
    fn snapshot(&self, shared: &Shared, rows: bool) -> (ServerStats, Vec<ClientStats>) {
        let (s, clients) = shared.broker.stats_and_clients(rows);
        let limits = shared.broker.limits();
        let sampled = self.rates.lock();
        let server = ServerStats {
            server_id: shared.server_id.clone(),
            version: env!("CARGO_PKG_VERSION").into(),
            uptime_s: shared.started.elapsed().as_secs_f64(),
            connections: s.connections as u64,
            total_connections: s.total_connections,
            handshakes: shared.gate.handshakes() as u64,
            subscriptions: s.subscriptions as u64,
            msgs_in: s.msgs_in,
            bytes_in: s.bytes_in,
            deliveries: s.deliveries,
            dropped: s.dropped,
            unrouted: s.unrouted,
            bytes_out: s.bytes_out,
            abandoned_msgs: self.abandoned_msgs.load(Ordering::Relaxed),
            abandoned_bytes: self.abandoned_bytes.load(Ordering::Relaxed),
            rates: sampled.server.clone(),
            closes: s
                .closes
                .iter()
                .map(|(name, n)| ((*name).to_string(), *n))
                .collect(),
            memory: MemoryStats {
                used: shared.broker.memory().used() as u64,
                limit: shared.broker.memory().limit() as u64,
                shedding: shared.broker.memory().shed_above() != usize::MAX,
            },
            sublist: SublistStats {
                subscriptions: s.sublist.subscriptions as u64,
                nodes: s.sublist.nodes as u64,
                cache_entries: s.sublist.cache_entries as u64,
                cache_bytes: s.sublist.cache_bytes as u64,
                cache_hits: s.sublist.cache_hits,
                cache_misses: s.sublist.cache_misses,
            },
            limits: LimitStats {
                max_connections: shared.gate.max_connections() as u64,
                max_subscriptions: limits.max_subs as u64,
                max_payload: limits.max_payload as u64,
                max_pending_msgs: limits.outbox.max_msgs as u64,
                max_pending_bytes: limits.outbox.max_bytes as u64,
            },
            busiest_topics: sampled.busiest.clone(),
        };
        (server, clients)
    }

    /// `/varz`.
    pub(crate) fn varz(&self, shared: &Shared) -> ServerStats {
        self.snapshot(shared, false).0
    }

    /// `/varz`, and the deliveries pending on every connection (messages, bytes).
    pub(crate) fn varz_and_pending(&self, shared: &Shared) -> (ServerStats, (u64, u64)) {
        let (s, clients) = self.snapshot(shared, true);
        let pending = clients.iter().fold((0, 0), |(m, b), c| {
            (
                m + c.outbox.pending_msgs as u64,
                b + c.outbox.pending_bytes as u64,
            )
        });
        (s, pending)
    }

    /// The statistics answer, serialized: a snapshot at most [`REUSE_FOR`] old.
    pub(crate) fn stats_json(&self, shared: &Shared) -> Arc<[u8]> {
        if let Some((at, json)) = &*self.cache.all.lock()
            && at.elapsed() < REUSE_FOR
        {
            return json.clone();
        }
        let json: Arc<[u8]> = self.build_answer(shared).into();
        *self.cache.all.lock() = Some((Instant::now(), json.clone()));
        json
    }

    fn build_answer(&self, shared: &Shared) -> Vec<u8> {
        let (server, mut clients) = self.snapshot(shared, true);
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
        let mut answer = StatsAnswer {
            server,
            clients_listed: 0,
            clients: Vec::new(),
        };
        let base = json_len(&answer);
        let budget = shared
            .broker
            .limits()
            .max_payload
            .saturating_sub(base + SLACK);
        let rates = self.rates.lock().conns.clone();
        answer.clients = fit(
            clients.iter().map(|c| self.conn(c, &rates)),
            budget,
            MAX_LISTED,
        );
        answer.clients_listed = answer.clients.len() as u64;
        serde_json::to_vec(&answer).unwrap_or_default()
    }

    /// What a user without the admin role may see: its own connections, and nothing about
    /// anyone else's. A snapshot at most [`REUSE_FOR`] old, so that a user repeating the request
    /// cannot make the broker visit every connection more than that often.
    pub(crate) fn user_stats_json(&self, shared: &Shared, user: &Arc<str>) -> Arc<[u8]> {
        if let Some((at, json)) = self.cache.users.lock().get(user)
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
        let rates = self.rates.lock().conns.clone();
        let budget = shared.broker.limits().max_payload.saturating_sub(SLACK * 2);
        let clients = fit(
            own.iter().map(|c| self.conn(&client_stats(c), &rates)),
            budget,
            MAX_LISTED,
        );
        let answer = UserStatsAnswer {
            server_id: shared.server_id.clone(),
            version: env!("CARGO_PKG_VERSION").into(),
            user: user.to_string(),
            connections: own.len() as u64,
            clients_listed: clients.len() as u64,
            clients,
        };
        let json: Arc<[u8]> = serde_json::to_vec(&answer).unwrap_or_default().into();
        self.cache
            .users
            .lock()
            .insert(user.clone(), (Instant::now(), json.clone()));
        json
    }

    /// `/connz`: one page of the open connections sorted by `sort`, or of the recently closed
    /// ones (latest first).
    pub(crate) fn connz(&self, shared: &Shared, q: &ConnzQuery) -> Connz {
        let limit = page_limit(q.limit);
        let offset = q.offset.unwrap_or(0);
        let sort = q.sort.clone().unwrap_or_else(|| "id".into());
        if q.state.as_deref() == Some("closed") {
            let closed = self.closed.lock();
            let page: Vec<ClosedConn> = closed
                .iter()
                .rev()
                .skip(offset)
                .take(limit)
                .cloned()
                .collect();
            return Connz {
                state: "closed".into(),
                total: closed.len() as u64,
                offset: offset as u64,
                limit: limit as u64,
                sort: "closed_at".into(),
                connections: Vec::new(),
                closed: page,
            };
        }
        let (_, clients) = self.snapshot(shared, true);
        let rates = self.rates.lock().conns.clone();
        let mut rows: Vec<ConnStats> = clients.iter().map(|c| self.conn(c, &rates)).collect();
        sort_conns(&mut rows, &sort);
        let total = rows.len() as u64;
        let connections = rows.into_iter().skip(offset).take(limit).collect();
        Connz {
            state: "open".into(),
            total,
            offset: offset as u64,
            limit: limit as u64,
            sort,
            connections,
            closed: Vec::new(),
        }
    }

    /// `/subz`: the trie and cache figures, and with `subs` the subscriptions (those whose
    /// filter contains `filter`, when given), up to `limit`, with their rates since the
    /// previous listing.
    pub(crate) fn subz(&self, shared: &Shared, q: &SubzQuery) -> Subz {
        let s = shared.broker.stats().sublist;
        let mut out = Subz {
            sublist: SublistStats {
                subscriptions: s.subscriptions as u64,
                nodes: s.nodes as u64,
                cache_entries: s.cache_entries as u64,
                cache_bytes: s.cache_bytes as u64,
                cache_hits: s.cache_hits,
                cache_misses: s.cache_misses,
            },
            total: s.subscriptions as u64,
            ..Subz::default()
        };
        if !matches!(q.subs.as_deref(), Some("1" | "true")) {
            return out;
        }
        let limit = page_limit(q.limit);
        let needle = q.filter.as_deref().unwrap_or("");
        let now = Instant::now();
        let mut previous = std::mem::take(&mut *self.sub_readings.lock());
        let mut readings = HashMap::with_capacity(limit);
        let mut total = 0u64;
        for c in shared.broker.clients() {
            // Each connection's lock is taken for one copy of at most a page of subscriptions.
            for sub in c.subscriptions(MAX_PAGE) {
                if !sub.filter.as_str().contains(needle) {
                    continue;
                }
                total += 1;
                if out.subs.len() >= limit {
                    continue;
                }
                let matched = sub.matched();
                let key = (c.id, sub.sid);
                let rate = previous.remove(&key).map_or(0.0, |(at, before)| {
                    per_second(matched.saturating_sub(before), now.duration_since(at))
                });
                readings.insert(key, (now, matched));
                out.subs.push(SubStats {
                    conn_id: c.id,
                    conn_name: c.name.clone(),
                    sid: sub.sid,
                    filter: sub.filter.as_str().to_string(),
                    queue: sub.queue().map(|q| q.to_string()),
                    matched,
                    matched_per_s: rate,
                });
            }
        }
        *self.sub_readings.lock() = readings;
        if needle.is_empty() {
            total = total.max(out.total);
        }
        out.total = total;
        out.listed = out.subs.len() as u64;
        out
    }

    /// Counts one sampled publish to `topic` (see [`TOPIC_SAMPLE_EVERY`]).
    pub(crate) fn sample_topic(&self, topic: &[u8]) {
        let Ok(topic) = std::str::from_utf8(topic) else {
            return;
        };
        let mut t = self.topics.lock();
        if let Some(n) = t.get_mut(topic) {
            *n += 1;
        } else if t.len() < MAX_SAMPLED_TOPICS {
            t.insert(topic.into(), 1);
        }
    }

    /// The sampler's second: rates for the broker and each connection, the busiest topics,
    /// and a `dropped` event for each connection that dropped deliveries since the last one.
    pub(crate) fn sample(&self, shared: &Shared) {
        let (s, clients) = shared.broker.stats_and_clients(true);
        let now = Instant::now();
        let totals = [s.msgs_in, s.bytes_in, s.deliveries, s.dropped];
        let sampled_topics = std::mem::take(&mut *self.topics.lock());
        let mut dropped_events = Vec::new();
        {
            let mut r = self.rates.lock();
            let elapsed = r.at.map(|at| now.duration_since(at));
            let rate = |new: u64, old: u64| {
                elapsed.map_or(0.0, |e| per_second(new.saturating_sub(old), e))
            };
            r.server = Rates {
                msgs_in: rate(totals[0], r.totals[0]),
                bytes_in: rate(totals[1], r.totals[1]),
                deliveries: rate(totals[2], r.totals[2]),
                dropped: rate(totals[3], r.totals[3]),
            };
            let mut conns = HashMap::with_capacity(clients.len());
            for c in &clients {
                let before = r.conns.get(&c.client.id).copied();
                let mut now_sample = ConnSample {
                    msgs_in: c.msgs_in,
                    deliveries: c.outbox.queued,
                    dropped: c.outbox.dropped,
                    ..ConnSample::default()
                };
                if let (Some(b), Some(e)) = (before, elapsed) {
                    now_sample.msgs_in_per_s = per_second(c.msgs_in.saturating_sub(b.msgs_in), e);
                    now_sample.deliveries_per_s =
                        per_second(c.outbox.queued.saturating_sub(b.deliveries), e);
                    now_sample.dropped_per_s =
                        per_second(c.outbox.dropped.saturating_sub(b.dropped), e);
                }
                let newly_dropped =
                    c.outbox.dropped - before.map_or(0, |b| b.dropped.min(c.outbox.dropped));
                if newly_dropped > 0 {
                    dropped_events.push((c.client.clone(), newly_dropped, c.outbox.dropped));
                }
                conns.insert(c.client.id, now_sample);
            }
            r.conns = conns;
            let mut busiest: Vec<TopicRate> = sampled_topics
                .into_iter()
                .map(|(topic, n)| TopicRate {
                    topic: topic.into(),
                    msgs_per_s: elapsed.map_or(0.0, |e| per_second(n * TOPIC_SAMPLE_EVERY, e)),
                })
                .collect();
            busiest.sort_by(|a, b| {
                b.msgs_per_s
                    .total_cmp(&a.msgs_per_s)
                    .then(a.topic.cmp(&b.topic))
            });
            busiest.truncate(BUSIEST);
            r.busiest = busiest;
            r.totals = totals;
            r.at = Some(now);
        }
        for (client, dropped, total) in dropped_events {
            publish_event(shared, events::DROPPED, || DroppedEvent {
                id: client.id,
                name: &client.name,
                user: client.identity.user.as_deref(),
                dropped,
                dropped_total: total,
                overflow: client.outbox.policy().name(),
                filters: filters(&client),
            });
        }
    }

    /// Records a connection's end: the closed list, the abandoned counters, and the
    /// `disconnect` (and `slow_consumer`) events. `left` is its outbox as the writer left it:
    /// what is still pending was never written.
    pub(crate) fn closed(
        &self,
        shared: &Shared,
        client: &Arc<Client>,
        reason: &CloseReason,
        left: &OutboxStats,
    ) {
        let stats = ClientStats {
            client: client.clone(),
            subscriptions: 0,
            msgs_in: client.counters.msgs_in.load(Ordering::Relaxed),
            bytes_in: client.counters.bytes_in.load(Ordering::Relaxed),
            outbox: *left,
        };
        let rates = self
            .rates
            .lock()
            .conns
            .get(&client.id)
            .copied()
            .unwrap_or_default();
        let mut conn = row(&stats, &rates);
        conn.pending_msgs = 0;
        conn.pending_bytes = 0;
        conn.pending_age_ms = 0;
        let abandoned_msgs = left.pending_msgs as u64;
        let abandoned_bytes = left.pending_bytes as u64;
        self.abandoned_msgs
            .fetch_add(abandoned_msgs, Ordering::Relaxed);
        self.abandoned_bytes
            .fetch_add(abandoned_bytes, Ordering::Relaxed);
        let closed = ClosedConn {
            conn,
            closed_at: rfc3339(SystemTime::now()),
            reason: reason.name().to_string(),
            abandoned_msgs,
            abandoned_bytes,
        };
        let text = reason.to_string();
        if matches!(
            reason,
            CloseReason::SlowConsumer { .. } | CloseReason::WriteTimeout
        ) {
            publish_event(shared, events::SLOW_CONSUMER, || ClosedEvent {
                closed: &closed,
                message: &text,
            });
        }
        publish_event(shared, events::DISCONNECT, || ClosedEvent {
            closed: &closed,
            message: &text,
        });
        let mut list = self.closed.lock();
        if list.len() == MAX_CLOSED {
            list.pop_front();
        }
        list.push_back(closed);
    }

    /// Publishes the `connect` event for a client that completed its handshake.
    pub(crate) fn connected(&self, shared: &Shared, client: &Client) {
        publish_event(shared, events::CONNECT, || ConnectEvent {
            id: client.id,
            name: &client.name,
            peer: &client.peer,
            user: client.identity.user.as_deref(),
            connected_at: rfc3339(client.connected_at),
            overflow: client.outbox.policy().name(),
        });
    }
}

/// One connection's row.
fn row(c: &ClientStats, r: &ConnSample) -> ConnStats {
    ConnStats {
        id: c.client.id,
        name: c.client.name.clone(),
        peer: c.client.peer.clone(),
        user: c.client.identity.user.as_deref().map(str::to_string),
        connected_at: rfc3339(c.client.connected_at),
        subscriptions: c.subscriptions as u64,
        filters: filters(&c.client),
        msgs_in: c.msgs_in,
        bytes_in: c.bytes_in,
        deliveries: c.outbox.queued,
        bytes_out: c.client.counters.bytes_out.load(Ordering::Relaxed),
        dropped: c.outbox.dropped,
        pending_msgs: c.outbox.pending_msgs as u64,
        pending_bytes: c.outbox.pending_bytes as u64,
        pending_age_ms: c.outbox.pending_age_ms,
        msgs_in_per_s: r.msgs_in_per_s,
        deliveries_per_s: r.deliveries_per_s,
        dropped_per_s: r.dropped_per_s,
        overflow: c.client.outbox.policy().name().to_string(),
    }
}

/// The filters of a connection's first [`brokerd_proto::stats::MAX_FILTERS_SHOWN`]
/// subscriptions, a queue group's name in brackets after its filter.
fn filters(client: &Client) -> Vec<String> {
    client
        .subscriptions(brokerd_proto::stats::MAX_FILTERS_SHOWN)
        .iter()
        .map(|s| match s.queue() {
            Some(q) => format!("{} [{q}]", s.filter.as_str()),
            None => s.filter.as_str().to_string(),
        })
        .collect()
}

/// Sorts `/connz` rows: `id` (default, ascending), or descending by `msgs_in`, `deliveries`,
/// `dropped`, `pending_bytes`, `pending_msgs`, `pending_age`, `subscriptions`, `rate_in`,
/// `rate_out`, `bytes_out`.
fn sort_conns(rows: &mut [ConnStats], sort: &str) {
    let key = |c: &ConnStats| -> f64 {
        match sort {
            "msgs_in" => c.msgs_in as f64,
            "deliveries" => c.deliveries as f64,
            "dropped" => c.dropped as f64,
            "pending_bytes" => c.pending_bytes as f64,
            "pending_msgs" => c.pending_msgs as f64,
            "pending_age" => c.pending_age_ms as f64,
            "subscriptions" => c.subscriptions as f64,
            "rate_in" => c.msgs_in_per_s,
            "rate_out" => c.deliveries_per_s,
            "bytes_out" => c.bytes_out as f64,
            _ => -(c.id as f64),
        }
    };
    rows.sort_by(|a, b| key(b).total_cmp(&key(a)).then(a.id.cmp(&b.id)));
}

/// The sort keys `/connz` accepts.
pub(crate) const CONNZ_SORTS: &[&str] = &[
    "id",
    "msgs_in",
    "deliveries",
    "dropped",
    "pending_bytes",
    "pending_msgs",
    "pending_age",
    "subscriptions",
    "rate_in",
    "rate_out",
    "bytes_out",
];

/// `/connz` query parameters.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(default)]
pub(crate) struct ConnzQuery {
    pub(crate) sort: Option<String>,
    pub(crate) offset: Option<usize>,
    pub(crate) limit: Option<usize>,
    pub(crate) state: Option<String>,
}

/// `/subz` query parameters.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(default)]
pub(crate) struct SubzQuery {
    /// `1` or `true` lists the subscriptions.
    pub(crate) subs: Option<String>,
    pub(crate) filter: Option<String>,
    pub(crate) limit: Option<usize>,
}

/// A page's size: `limit` up to [`MAX_PAGE`]; absent or 0, 100.
fn page_limit(limit: Option<usize>) -> usize {
    match limit {
        None | Some(0) => 100,
        Some(n) => n.min(MAX_PAGE),
    }
}

/// Whether this publish goes into the busiest-topic sample: one in [`TOPIC_SAMPLE_EVERY`] at
/// random (a per-thread xorshift), so that a publisher cycling through topics in step with a
/// fixed stride cannot hide all but one of them.
pub(crate) fn sampled() -> bool {
    use std::cell::Cell;
    use std::hash::{BuildHasher, Hasher};
    thread_local! {
        static STATE: Cell<u64> = Cell::new(
            std::collections::hash_map::RandomState::new().build_hasher().finish() | 1,
        );
    }
    STATE.with(|s| {
        let mut x = s.get();
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        s.set(x);
        x % TOPIC_SAMPLE_EVERY == 0
    })
}

/// Rows in order until `max` or until their JSON would pass `budget` bytes.
fn fit(rows: impl Iterator<Item = ConnStats>, mut budget: usize, max: usize) -> Vec<ConnStats> {
    let mut out = Vec::new();
    for row in rows.take(max) {
        let len = json_len(&row) + 1;
        if len > budget {
            break;
        }
        budget -= len;
        out.push(row);
    }
    out
}

fn json_len(v: &impl Serialize) -> usize {
    serde_json::to_vec(v).map_or(usize::MAX / 2, |v| v.len())
}

fn per_second(n: u64, over: Duration) -> f64 {
    let s = over.as_secs_f64();
    if s <= 0.0 {
        0.0
    } else {
        (n as f64 / s * 10.0).round() / 10.0
    }
}

/// Publishes an event if anyone subscribed to it; `payload` is serialized only then.
fn publish_event<T: Serialize>(shared: &Shared, topic: &str, payload: impl FnOnce() -> T) {
    shared
        .broker
        .publish_event(topic, || serde_json::to_vec(&payload()).unwrap_or_default());
}

/// `$SYS.event.client.connect`.
#[derive(Serialize)]
struct ConnectEvent<'a> {
    id: u64,
    name: &'a str,
    peer: &'a str,
    user: Option<&'a str>,
    connected_at: String,
    overflow: &'a str,
}

/// `$SYS.event.client.disconnect` and `slow_consumer`: the closed connection's row, and the
/// reason in words.
#[derive(Serialize)]
struct ClosedEvent<'a> {
    #[serde(flatten)]
    closed: &'a ClosedConn,
    message: &'a str,
}

/// `$SYS.event.client.dropped`.
#[derive(Serialize)]
struct DroppedEvent<'a> {
    id: u64,
    name: &'a str,
    user: Option<&'a str>,
    /// Dropped since the previous event (or the connection's start).
    dropped: u64,
    dropped_total: u64,
    overflow: &'a str,
    /// The filters of its first subscriptions, to tell which one drops (each subscriber learns
    /// its own subscriptions' counts from `LOST` frames).
    filters: Vec<String>,
}
