//! Durable consumers: a named position in a stream that the broker keeps, shared by the
//! subscriptions that join it, with explicit acknowledgements and redelivery.
//!
//! One task per consumer owns its state: the next sequence to hand out, the messages in flight
//! (delivered, not yet acknowledged: at most `max_in_flight`), and those due again. Members'
//! connection tasks only queue acknowledgements and joins in its inbox ([`Consumer::ack`],
//! [`Consumer::join`]); the task hands each message to one member with room, in turn, and
//! delivers it again when it is not acknowledged within `ack_wait`, when it is refused (`NAK`),
//! or when the member holding it leaves, up to `max_deliver` deliveries in all. When no member
//! has room, the task sleeps until one has (the same wake-up a replay waits on,
//! [`brokerd_core::Outbox::poll_replay_room`]), an acknowledgement or join arrives, or the next
//! deadline passes; deadlines are kept in delivery order, so finding the next one and the
//! expired ones costs no scan of what is in flight. Its floor (every
//! sequence at or below it is done) is written to `<stream>/consumers/<name>.json` at most every
//! [`SAVE_EVERY`]; after a restart everything above the floor is delivered again: at least
//! once, never lost.

use super::handle::{RecentMsg, StreamHandle};
use brokerd_core::{Broker, Client, Stored, Subscription};
use brokerd_proto::streams::MIN_ACK_WAIT_MS;
use brokerd_proto::{AckKind, ConsumerSpec, Filter};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, VecDeque};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::Poll;
use std::time::{Duration, Instant};
use tracing::{info, warn};

/// Defaults for what a `SUB` leaves at 0.
pub(crate) const DEFAULT_ACK_WAIT: Duration = Duration::from_secs(30);
/// Deliveries of one message at most, by default.
pub(crate) const DEFAULT_MAX_DELIVER: u16 = 5;
/// Messages in flight at most, by default.
pub(crate) const DEFAULT_MAX_IN_FLIGHT: u32 = 1_000;
/// The most a consumer may ask for.
pub(crate) const MAX_IN_FLIGHT: u32 = 100_000;
/// Durable consumers one stream holds at most (each is a task and a file).
pub(crate) const MAX_CONSUMERS: usize = 256;
/// Of those, at most this many owned by one user (an admin is not counted against it), so that
/// no user can take every place.
pub(crate) const MAX_CONSUMERS_PER_USER: usize = 64;
/// How often a consumer's floor is written at most.
pub(crate) const SAVE_EVERY: Duration = Duration::from_millis(100);
/// Messages read ahead from the stream at most.
const READ_AHEAD: usize = 512;
/// The longest the task sleeps with nothing to wake it: it then checks its members and the
/// stream again (a member whose queue the memory budget shed is not woken when it stops).
const IDLE: Duration = Duration::from_millis(250);

/// What a consumer keeps on disk.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Saved {
    name: String,
    filter: String,
    ack_wait_ms: u64,
    max_deliver: u16,
    max_in_flight: u32,
    /// Every sequence at or below it is done.
    floor: u64,
    /// The user who made it, when a configured user did: only that user (or an admin) may join
    /// it. Absent for a consumer made with the token or without authentication, and in states
    /// saved before owners existed: any client the stream's topics allow may join those.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    owner: Option<String>,
}

/// One member: a consumer subscription of one connection.
struct Member {
    client: Arc<Client>,
    sub: Arc<Subscription>,
}

#[derive(Default)]
struct Inbox {
    /// Sequence, what to do, and the member that sent it (by its subscription's address).
    acks: Vec<(u64, AckKind, usize)>,
    joined: Vec<Member>,
    /// Acknowledgements refused because the inbox was full (they come back by redelivery).
    overflow: u64,
}

/// A durable consumer.
pub(crate) struct Consumer {
    pub(crate) name: String,
    pub(crate) filter: Filter,
    /// See `Saved::owner`.
    owner: Option<String>,
    ack_wait: Duration,
    max_deliver: u16,
    max_in_flight: u32,
    inbox: Mutex<Inbox>,
    wake: tokio::sync::Notify,
    /// Deliveries made, redeliveries among them, and messages given up after `max_deliver`.
    pub(crate) delivered: AtomicU64,
    pub(crate) redelivered: AtomicU64,
    pub(crate) given_up: AtomicU64,
    pub(crate) floor: AtomicU64,
    pub(crate) in_flight: AtomicU64,
    pub(crate) members: AtomicU64,
    /// Times the task looked for work (see `ConsumerInfo::passes`).
    pub(crate) passes: AtomicU64,
}

/// Why a subscription could not join a consumer.
#[derive(Debug, thiserror::Error)]
pub(crate) enum JoinError {
    #[error("invalid consumer name '{0}': 1 to 64 ASCII letters, digits, '-' or '_'")]
    Name(String),
    #[error(
        "consumer {name} has the filter '{have}'; a member must subscribe with the same filter, not '{asked}'"
    )]
    Filter {
        name: String,
        have: String,
        asked: String,
    },
    #[error("consumer {0}: cannot read its saved state: {1}")]
    State(String, String),
    #[error("stream {0} already has {MAX_CONSUMERS} consumers")]
    TooMany(String),
    #[error("ack_wait_ms {0} is below the minimum of {MIN_ACK_WAIT_MS} ms")]
    AckWait(u32),
    #[error("consumer {name} belongs to another user: only its owner or an admin may join it")]
    NotOwner { name: String },
    #[error(
        "user {user} already owns {MAX_CONSUMERS_PER_USER} consumers of stream {stream}, the most one user may"
    )]
    TooManyForUser { user: String, stream: String },
}

impl JoinError {
    /// Whether the refusal is about who asked (`permission-denied`) rather than what was asked.
    pub(crate) fn is_permission(&self) -> bool {
        matches!(
            self,
            JoinError::NotOwner { .. } | JoinError::TooManyForUser { .. }
        )
    }
}

/// Who asks to join: the configured user it logged in as, if any, and whether it is an admin
/// now (after any reload, not as at its login).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Joiner<'a> {
    pub(crate) user: Option<&'a str>,
    pub(crate) admin: bool,
}

/// Who may join a consumer owned by `owner`: its owner, an admin, or anyone when it has none.
fn may_join(owner: Option<&str>, who: Joiner<'_>) -> bool {
    match owner {
        None => true,
        Some(owner) => who.admin || who.user == Some(owner),
    }
}

/// The owners of the consumers saved in `stream`'s directory (`None` for an unowned one), and
/// their names. Read when a consumer is created, so that the limits count consumers saved
/// before a restart and not yet opened; at most a few hundred small files, on a rare request.
fn saved_owners(stream: &StreamHandle) -> Vec<(String, Option<String>)> {
    let Ok(dir) = std::fs::read_dir(stream.dir.join("consumers")) else {
        return Vec::new();
    };
    dir.filter_map(Result::ok)
        .filter(|e| e.path().extension().is_some_and(|x| x == "json"))
        .filter_map(|e| std::fs::read(e.path()).ok())
        .filter_map(|bytes| serde_json::from_slice::<Saved>(&bytes).ok())
        .map(|s| (s.name, s.owner))
        .collect()
}

impl Consumer {
    /// Queues an acknowledgement from the member `sub`; never blocks. It counts only if that
    /// member holds the message now (a late acknowledgement of a message delivered again since
    /// is ignored). An inbox already holding four times `max_in_flight` refuses it (the message
    /// is then delivered again).
    pub(crate) fn ack(&self, sub: &Arc<Subscription>, seq: u64, kind: AckKind) {
        let mut inbox = self.inbox.lock();
        if inbox.acks.len() >= 4 * self.max_in_flight as usize {
            inbox.overflow += 1;
            return;
        }
        inbox.acks.push((seq, kind, Arc::as_ptr(sub) as usize));
        drop(inbox);
        self.wake.notify_one();
    }

    /// Its state now.
    pub(crate) fn info(&self) -> brokerd_proto::streams::ConsumerInfo {
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        brokerd_proto::streams::ConsumerInfo {
            name: self.name.clone(),
            filter: self.filter.to_string(),
            floor: load(&self.floor),
            in_flight: load(&self.in_flight),
            members: load(&self.members),
            delivered: load(&self.delivered),
            redelivered: load(&self.redelivered),
            given_up: load(&self.given_up),
            passes: load(&self.passes),
        }
    }

    /// Adds a member.
    pub(crate) fn join(&self, client: Arc<Client>, sub: Arc<Subscription>) {
        self.inbox.lock().joined.push(Member { client, sub });
        self.wake.notify_one();
    }
}

/// The consumer `spec` of `stream`: the running one, or one loaded from its saved state, or a
/// new one starting at `start` (worked out by its task, on the blocking pool, since a start by
/// time reads the store). Starts its task when it is new to this process.
///
/// # Errors
/// An invalid name, a filter other than the consumer's, or saved state that cannot be read.
pub(crate) fn open(
    broker: &Arc<Broker>,
    stream: &Arc<StreamHandle>,
    spec: &ConsumerSpec,
    filter: &Filter,
    start: brokerd_proto::StartPosition,
    who: Joiner<'_>,
) -> Result<Arc<Consumer>, JoinError> {
    if !brokerd_proto::streams::valid_stream_name(&spec.name) {
        return Err(JoinError::Name(spec.name.escape_debug().to_string()));
    }
    let mut consumers = stream.consumers.lock();
    if let Some(c) = consumers.get(&spec.name) {
        if !may_join(c.owner.as_deref(), who) {
            return Err(JoinError::NotOwner {
                name: spec.name.clone(),
            });
        }
        if c.filter != *filter {
            return Err(JoinError::Filter {
                name: spec.name.clone(),
                have: c.filter.to_string(),
                asked: filter.to_string(),
            });
        }
        return Ok(c.clone());
    }
    let path = state_path(stream, &spec.name);
    // A consumer with no saved state starts at `start`.
    let mut fresh = Some(start);
    let saved = match std::fs::read(&path) {
        // Only a missing file makes a new consumer: any other failure to read it must not
        // replace the owner's state (and owner) with a fresh one.
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(JoinError::State(spec.name.clone(), e.to_string()));
        }
        Ok(bytes) => {
            fresh = None;
            let s: Saved = serde_json::from_slice(&bytes)
                .map_err(|e| JoinError::State(spec.name.clone(), e.to_string()))?;
            if !may_join(s.owner.as_deref(), who) {
                return Err(JoinError::NotOwner {
                    name: spec.name.clone(),
                });
            }
            if s.filter != filter.as_str() {
                return Err(JoinError::Filter {
                    name: spec.name.clone(),
                    have: s.filter,
                    asked: filter.to_string(),
                });
            }
            s
        }
        Err(_) => Saved {
            owner: {
                // Every consumer counts, those open and those saved before a restart.
                let mut all: std::collections::HashMap<String, Option<String>> =
                    saved_owners(stream).into_iter().collect();
                for c in consumers.values() {
                    all.insert(c.name.clone(), c.owner.clone());
                }
                if all.len() >= MAX_CONSUMERS {
                    return Err(JoinError::TooMany(stream.config.name.clone()));
                }
                match who.user {
                    Some(user) if !who.admin => {
                        let owned = all.values().filter(|o| o.as_deref() == Some(user)).count();
                        if owned >= MAX_CONSUMERS_PER_USER {
                            return Err(JoinError::TooManyForUser {
                                user: user.to_string(),
                                stream: stream.config.name.clone(),
                            });
                        }
                        Some(user.to_string())
                    }
                    // An admin's consumer is owned too, so that other users cannot join it.
                    Some(user) => Some(user.to_string()),
                    None => None,
                }
            },
            name: spec.name.clone(),
            filter: filter.to_string(),
            ack_wait_ms: match spec.ack_wait_ms {
                0 => DEFAULT_ACK_WAIT.as_millis() as u64,
                ms if ms < MIN_ACK_WAIT_MS => return Err(JoinError::AckWait(ms)),
                ms => u64::from(ms),
            },
            max_deliver: if spec.max_deliver == 0 {
                DEFAULT_MAX_DELIVER
            } else {
                spec.max_deliver
            },
            max_in_flight: match spec.max_in_flight {
                0 => DEFAULT_MAX_IN_FLIGHT,
                n => n.min(MAX_IN_FLIGHT),
            },
            // Set by its task before it delivers anything.
            floor: 0,
        },
    };
    let consumer = Arc::new(Consumer {
        name: saved.name.clone(),
        filter: filter.clone(),
        owner: saved.owner.clone(),
        // A state saved before the minimum existed gets the minimum.
        ack_wait: Duration::from_millis(saved.ack_wait_ms.max(u64::from(MIN_ACK_WAIT_MS))),
        max_deliver: saved.max_deliver.max(1),
        max_in_flight: saved.max_in_flight.max(1),
        inbox: Mutex::new(Inbox::default()),
        wake: tokio::sync::Notify::new(),
        delivered: AtomicU64::new(0),
        redelivered: AtomicU64::new(0),
        given_up: AtomicU64::new(0),
        floor: AtomicU64::new(saved.floor),
        in_flight: AtomicU64::new(0),
        members: AtomicU64::new(0),
        passes: AtomicU64::new(0),
    });
    consumers.insert(spec.name.clone(), consumer.clone());
    drop(consumers);
    info!(stream = %stream.config.name, consumer = %saved.name, floor = saved.floor, "consumer open");
    tokio::spawn(run(
        broker.clone(),
        stream.clone(),
        consumer.clone(),
        saved,
        path,
        fresh,
    ));
    Ok(consumer)
}

fn state_path(stream: &StreamHandle, name: &str) -> PathBuf {
    stream.dir.join("consumers").join(format!("{name}.json"))
}

/// A message delivered and not yet acknowledged.
struct Flight {
    attempts: u16,
    /// The member holding it (by its subscription's address).
    holder: usize,
}

/// The deadlines of the deliveries in flight, in delivery order. Every deadline is the
/// delivery's time plus the consumer's one `ack_wait`, so this order is also deadline order: the
/// next deadline is the first entry still in flight. An entry whose delivery was acknowledged or
/// made again since is stale and removed lazily, when it reaches the front or when stale entries
/// outnumber live ones; so each delivery costs O(1) here, amortised, and the queue holds at most
/// about twice what is in flight.
#[derive(Default)]
struct Deadlines(VecDeque<(Instant, u64, u16)>);

impl Deadlines {
    /// Records the delivery of `seq` as its `attempts`-th delivery, due again at `deadline`
    /// (no earlier than any recorded before).
    fn push(&mut self, deadline: Instant, seq: u64, attempts: u16) {
        self.0.push_back((deadline, seq, attempts));
    }

    /// Drops stale entries from the front and returns the next deadline still in flight.
    fn next(&mut self, flights: &BTreeMap<u64, Flight>) -> Option<Instant> {
        while let Some(&(deadline, seq, attempts)) = self.0.front() {
            if is_live(flights, seq, attempts) {
                return Some(deadline);
            }
            self.0.pop_front();
        }
        None
    }

    /// Removes from `flights` the deliveries due by `now`, oldest first, and returns them with
    /// their deliveries so far.
    fn expired(&mut self, now: Instant, flights: &mut BTreeMap<u64, Flight>) -> Vec<(u64, u16)> {
        let mut out = Vec::new();
        while self.next(flights).is_some_and(|d| d <= now) {
            if let Some((_, seq, _)) = self.0.pop_front()
                && let Some(f) = flights.remove(&seq)
            {
                out.push((seq, f.attempts));
            }
        }
        out
    }

    /// Drops every stale entry once they outnumber the live ones (and a floor), so that a
    /// consumer whose acknowledgements come quickly does not keep one entry per delivery for a
    /// whole `ack_wait`.
    fn compact(&mut self, flights: &BTreeMap<u64, Flight>) {
        if self.0.len() > 2 * flights.len() + 1024 {
            self.0
                .retain(|&(_, seq, attempts)| is_live(flights, seq, attempts));
        }
    }
}

/// Whether the `attempts`-th delivery of `seq` is the one in flight now.
fn is_live(flights: &BTreeMap<u64, Flight>, seq: u64, attempts: u16) -> bool {
    flights.get(&seq).is_some_and(|f| f.attempts == attempts)
}

async fn run(
    broker: Arc<Broker>,
    stream: Arc<StreamHandle>,
    consumer: Arc<Consumer>,
    mut saved: Saved,
    path: PathBuf,
    fresh: Option<brokerd_proto::StartPosition>,
) {
    if let Some(start) = fresh {
        let h = stream.clone();
        let first = tokio::task::spawn_blocking(move || first_sequence(&h, start))
            .await
            .unwrap_or(1);
        saved.floor = first.saturating_sub(1);
        consumer.floor.store(saved.floor, Ordering::Relaxed);
        // Saved at once, so that its start holds even if the broker stops before anything is
        // acknowledged.
        let (s, p) = (saved.clone(), path.clone());
        if let Ok(Err(e)) = tokio::task::spawn_blocking(move || save(&p, &s)).await {
            warn!(stream = %stream.config.name, consumer = %consumer.name, error = %e, "cannot save the consumer's position");
        }
    }
    let mut members: Vec<Member> = Vec::new();
    let mut turn = 0usize;
    let mut next = saved.floor + 1;
    let mut flights: BTreeMap<u64, Flight> = BTreeMap::new();
    let mut deadlines = Deadlines::default();
    // Due again, with the deliveries they had.
    let mut again: VecDeque<(u64, u16)> = VecDeque::new();
    let mut ahead: VecDeque<RecentMsg> = VecDeque::new();
    let mut reader: Option<brokerd_store::Reader> = None;
    let mut visible = stream.visible.subscribe();
    let mut saved_at = Instant::now();
    let mut dirty = false;
    loop {
        consumer.passes.fetch_add(1, Ordering::Relaxed);
        if stream.deleted.load(Ordering::Acquire) {
            let joined = std::mem::take(&mut consumer.inbox.lock().joined);
            for m in members.iter().chain(&joined) {
                super::replay::end(&broker, &m.client, &m.sub, &stream, "was deleted");
            }
            return;
        }
        // Joins and acknowledgements.
        let (acks, joined) = {
            let mut inbox = consumer.inbox.lock();
            (
                std::mem::take(&mut inbox.acks),
                std::mem::take(&mut inbox.joined),
            )
        };
        members.extend(joined);
        for (seq, kind, from) in acks {
            if flights.get(&seq).is_none_or(|f| f.holder != from) {
                continue;
            }
            let Some(f) = flights.remove(&seq) else {
                continue;
            };
            match kind {
                AckKind::Ack | AckKind::Term => dirty = true,
                AckKind::Nak => again.push_back((seq, f.attempts)),
            }
        }
        // Members that left: what they held is due again at once.
        let gone: Vec<usize> = members
            .iter()
            .filter(|m| m.sub.is_dead() || m.sub.outbox.is_closing())
            .map(|m| Arc::as_ptr(&m.sub) as usize)
            .collect();
        if !gone.is_empty() {
            members.retain(|m| !gone.contains(&(Arc::as_ptr(&m.sub) as usize)));
            let lost: Vec<u64> = flights
                .iter()
                .filter(|(_, f)| gone.contains(&f.holder))
                .map(|(s, _)| *s)
                .collect();
            for seq in lost {
                if let Some(f) = flights.remove(&seq) {
                    again.push_back((seq, f.attempts));
                }
            }
        }
        consumer
            .members
            .store(members.len() as u64, Ordering::Relaxed);
        // Deadlines.
        again.extend(deadlines.expired(Instant::now(), &mut flights));
        // Deliver, as long as something is due, a member has room and the window allows. When
        // no member has room: the body size of the message waiting.
        let mut blocked: Option<usize> = None;
        while !members.is_empty() && (flights.len() as u32) < consumer.max_in_flight {
            let (seq, attempts, body) = if let Some(&(seq, attempts)) = again.front() {
                if attempts >= consumer.max_deliver {
                    again.pop_front();
                    consumer.given_up.fetch_add(1, Ordering::Relaxed);
                    warn!(stream = %stream.config.name, consumer = %consumer.name, seq, attempts, "message given up after its last delivery");
                    dirty = true;
                    continue;
                }
                match read_one(&stream, seq).await {
                    Some(m) => (seq, attempts, m.body),
                    None => {
                        // Removed by retention or a purge meanwhile: nothing to deliver.
                        again.pop_front();
                        dirty = true;
                        continue;
                    }
                }
            } else {
                if ahead.is_empty() {
                    fill(&stream, &mut reader, &mut next, &mut ahead).await;
                }
                let Some(m) = ahead.front() else { break };
                if !consumer.filter.matches(m.topic()) {
                    ahead.pop_front();
                    dirty = true;
                    continue;
                }
                (m.seq, 0, m.body.clone())
            };
            let mut placed = None;
            for i in 0..members.len() {
                let m = &members[(turn + i) % members.len()];
                match m.sub.outbox.push_stored(&m.sub, seq, &body) {
                    Stored::Queued => {
                        placed = Some((turn + i) % members.len());
                        break;
                    }
                    Stored::QueuedLast => {
                        // An `UNSUB` with a count: this was its last message.
                        broker.end_subscription(&m.client, &m.sub);
                        placed = Some((turn + i) % members.len());
                        break;
                    }
                    Stored::Full | Stored::Ended => {}
                }
            }
            let Some(i) = placed else {
                blocked = Some(body.len());
                break;
            };
            turn = i + 1;
            if attempts == 0 {
                ahead.pop_front();
            } else {
                again.pop_front();
                consumer.redelivered.fetch_add(1, Ordering::Relaxed);
            }
            consumer.delivered.fetch_add(1, Ordering::Relaxed);
            flights.insert(
                seq,
                Flight {
                    attempts: attempts + 1,
                    holder: Arc::as_ptr(&members[i].sub) as usize,
                },
            );
            deadlines.push(Instant::now() + consumer.ack_wait, seq, attempts + 1);
        }
        deadlines.compact(&flights);
        consumer
            .in_flight
            .store(flights.len() as u64, Ordering::Relaxed);
        // The floor: everything below the oldest outstanding sequence is done.
        let oldest = flights
            .keys()
            .next()
            .copied()
            .into_iter()
            .chain(again.iter().map(|(s, _)| *s))
            .chain(ahead.front().map(|m| m.seq))
            .min()
            .unwrap_or(next);
        let floor = oldest.saturating_sub(1).max(saved.floor);
        if floor != saved.floor {
            saved.floor = floor;
            consumer.floor.store(floor, Ordering::Relaxed);
            dirty = true;
        }
        if dirty && saved_at.elapsed() >= SAVE_EVERY {
            dirty = false;
            saved_at = Instant::now();
            let (s, p) = (saved.clone(), path.clone());
            let written = tokio::task::spawn_blocking(move || save(&p, &s)).await;
            if let Ok(Err(e)) = written {
                warn!(stream = %stream.config.name, consumer = %consumer.name, error = %e, "cannot save the consumer's position");
            }
        }
        // Wait for something to do.
        let deadline = deadlines
            .next(&flights)
            .map_or(IDLE, |d| d.saturating_duration_since(Instant::now()));
        let wait = deadline.min(if dirty { SAVE_EVERY } else { IDLE });
        let caught_up = again.is_empty() && ahead.is_empty();
        // Blocked: room for the waiting message in any member's queue. A member's outbox wakes
        // this task when a write brings its queue down to half the bounds of stored deliveries.
        let room = std::future::poll_fn(|cx| match blocked {
            Some(len)
                if members
                    .iter()
                    .any(|m| m.sub.outbox.poll_replay_room(cx, len).is_ready()) =>
            {
                Poll::Ready(())
            }
            _ => Poll::Pending,
        });
        tokio::select! {
            _ = consumer.wake.notified() => {}
            _ = visible.changed(), if caught_up && blocked.is_none() => {}
            _ = room, if blocked.is_some() => {}
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

/// Reads ahead from the stream at `next`.
async fn fill(
    stream: &Arc<StreamHandle>,
    reader: &mut Option<brokerd_store::Reader>,
    next: &mut u64,
    ahead: &mut VecDeque<RecentMsg>,
) {
    let last = stream.last_seq.load(Ordering::Acquire);
    if *next > last {
        *reader = None;
        return;
    }
    let from_memory = stream.recent.lock().from(*next, READ_AHEAD, 1 << 20);
    let batch = match from_memory {
        Some(b) => {
            *reader = None;
            b
        }
        None => {
            let (h, r, n) = (stream.clone(), reader.take(), *next);
            match tokio::task::spawn_blocking(move || {
                super::replay::read_disk(&h, r, n, READ_AHEAD)
            })
            .await
            {
                Ok((r, b)) => {
                    *reader = r;
                    b
                }
                Err(_) => Vec::new(),
            }
        }
    };
    let mut batch = batch;
    match batch.last() {
        Some(m) => *next = m.seq + 1,
        None => {
            *next = (*next).max(stream.first_seq.load(Ordering::Acquire));
        }
    }
    super::replay::keep_current(stream, &mut batch);
    ahead.extend(batch);
}

/// One stored message, for a redelivery.
async fn read_one(stream: &Arc<StreamHandle>, seq: u64) -> Option<RecentMsg> {
    if let Some(m) = stream
        .recent
        .lock()
        .from(seq, 1, usize::MAX)
        .and_then(|v| v.into_iter().next())
    {
        return (m.seq == seq).then_some(m);
    }
    let h = stream.clone();
    let (_, batch) =
        tokio::task::spawn_blocking(move || super::replay::read_disk(&h, None, seq, 1))
            .await
            .ok()?;
    batch.into_iter().next().filter(|m| m.seq == seq)
}

fn save(path: &std::path::Path, saved: &Saved) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension("json.tmp");
    std::fs::write(
        &tmp,
        serde_json::to_vec(saved).map_err(std::io::Error::other)?,
    )?;
    std::fs::rename(&tmp, path)
}

/// Where a new consumer starts: a sequence, worked out now (it may read the index of one
/// segment, for a start by time).
pub(crate) fn first_sequence(stream: &StreamHandle, start: brokerd_proto::StartPosition) -> u64 {
    use brokerd_proto::StartPosition;
    let store = stream.store.lock();
    let Some(s) = store.as_ref() else { return 1 };
    match start {
        StartPosition::All => s.first_seq(),
        StartPosition::New => s.last_seq() + 1,
        StartPosition::FromSeq(n) => n.max(1),
        StartPosition::Last(n) => s.first_seq().max((s.last_seq() + 1).saturating_sub(n)),
        StartPosition::FromTime(t) => s.seek_time(t).unwrap_or_else(|_| s.first_seq()),
        // A consumer starts at the oldest message still delivered.
        StartPosition::LastPerTopic => stream
            .per_topic
            .as_ref()
            .and_then(|p| p.lock().kept.first().copied())
            .unwrap_or_else(|| s.first_seq()),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn flight(attempts: u16) -> Flight {
        Flight {
            attempts,
            holder: 0,
        }
    }

    #[test]
    fn deadlines_skip_what_was_acknowledged_or_delivered_again() {
        let t0 = Instant::now();
        let at = |ms| t0 + Duration::from_millis(ms);
        let mut flights = BTreeMap::new();
        let mut d = Deadlines::default();
        for seq in 1..=4u64 {
            flights.insert(seq, flight(1));
            d.push(at(seq * 10), seq, 1);
        }
        // 1 acknowledged; 2 refused and delivered again later.
        flights.remove(&1);
        flights.insert(2, flight(2));
        d.push(at(50), 2, 2);
        assert_eq!(d.next(&flights), Some(at(30)));
        assert_eq!(d.expired(at(45), &mut flights), vec![(3, 1), (4, 1)]);
        assert_eq!(d.next(&flights), Some(at(50)));
        assert_eq!(d.expired(at(50), &mut flights), vec![(2, 2)]);
        assert!(flights.is_empty());
        assert_eq!(d.next(&flights), None);
    }

    #[test]
    fn deadlines_of_acknowledged_deliveries_do_not_pile_up() {
        let t0 = Instant::now();
        let mut flights = BTreeMap::new();
        let mut d = Deadlines::default();
        // One delivery stays in flight at the front; 100,000 more are acknowledged at once.
        flights.insert(0, flight(1));
        d.push(t0, 0, 1);
        for seq in 1..=100_000u64 {
            flights.insert(seq, flight(1));
            d.push(t0, seq, 1);
            flights.remove(&seq);
            d.compact(&flights);
        }
        assert!(d.0.len() <= 2 * flights.len() + 1025, "{}", d.0.len());
        assert_eq!(d.next(&flights), Some(t0));
    }
}
