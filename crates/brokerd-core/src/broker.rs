//! The broker registry: connected clients, their subscriptions, and publishing through the sublist.
//!
//! Every operation here is synchronous and short. Connection reader tasks call
//! [`Broker::subscribe`], [`Broker::unsubscribe`] and [`Broker::publish`]; the task that ends a
//! connection calls [`Broker::disconnect`]. Nothing here awaits, and no lock here is held while
//! another is taken (see the lock order in `docs/architecture.md`).

use crate::close::CloseReason;
use crate::memory::MemoryBudget;
use crate::outbox::{Outbox, OutboxLimits, OutboxStats, Push};
use crate::permissions::{Denial, Identity, Permissions};
use crate::sublist::{Matches, Slot, Sublist, SublistStats, View};
use crate::subscription::{SubRef, Subscription};
use arc_swap::ArcSwap;
use brokerd_proto::topic::{is_reserved, validate_topic};
use brokerd_proto::{
    Body, BodyBuilder, BodyRef, ErrorCode, Filter, OverflowPolicy, TopicError, TopicLimits,
};
use bytes::{Bytes, BytesMut};
use parking_lot::Mutex;
use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use thiserror::Error;

/// At most `max` bytes of `s`, cut at a character boundary: what an `ERR` quotes of a
/// client's text.
fn prefix(s: &str, max: usize) -> &str {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// Lets the subscriber that was just queued a request answer it, if its user may answer
/// requests; a no-op for everyone else.
#[inline]
fn grant(sub: &SubRef, reply: &str) {
    if let Some(permits) = sub.outbox.responses() {
        permits.grant(reply, std::time::Instant::now());
    }
}

/// One connection's private memo of recent routes, so that publishing a topic again costs a hash
/// lookup in memory only its own task touches. A route is the list of subscription slots the
/// topic reaches, whose members change in place; the memo is dropped only when the trie's shape
/// changes (a filter gains its first subscription; the sublist's shared cache refills it).
pub struct RouteCache {
    generation: u64,
    map: HashMap<Box<str>, Matches<SubRef>, foldhash::fast::RandomState>,
    /// The topic routed last (its buffer reused) and its result.
    last_topic: String,
    last: Option<Matches<SubRef>>,
    /// Routing work done since [`RouteCache::take_work`] last reset it: one unit per trie position
    /// a match-cache miss visited. (Publishes answered from a cache are bounded by the read
    /// buffer: the reader yields after every long read anyway.)
    work: usize,
    /// Views of the slots this connection published to last.
    views: ViewCache,
    /// Whether this connection's publish rules allow the last topic, and its memo of other
    /// topics' answers; used only for an identity with publish rules. Rules do not change with
    /// the trie, so this memo outlives the routes.
    last_allowed: Result<(), Denial>,
    allowed: HashMap<Box<str>, Result<(), Denial>, foldhash::fast::RandomState>,
    /// The connection's permissions as of `permissions_version`: re-read when a reload changes
    /// them, never locked on a publish.
    permissions: Option<Arc<Permissions>>,
    permissions_version: u64,
    /// Outboxes this connection's publishes pressed ([`Push::Pressed`]) since the last
    /// [`RouteCache::clear_pressed`]: its reader waits for them before reading on.
    pressed: Vec<Arc<Outbox>>,
}

/// A connection's views of recently reached slots, each kept while its slot's version stays the
/// same: a repeated publish reads its subscribers with one atomic load, where asking the slot
/// would take its lock. Direct-mapped by the slot's address; an entry holds its slot, so the
/// address cannot be reused while it is cached.
#[derive(Default)]
struct ViewCache {
    ways: [Option<HeldView>; ViewCache::WAYS],
}

struct HeldView {
    slot: Arc<Slot<SubRef>>,
    version: u64,
    view: Arc<View<SubRef>>,
}

impl ViewCache {
    const WAYS: usize = 4;

    /// The current view of `slot`.
    fn get(&mut self, slot: &Arc<Slot<SubRef>>) -> &View<SubRef> {
        let way = (Arc::as_ptr(slot) as usize >> 6) % ViewCache::WAYS;
        let current = slot.version();
        let held = &mut self.ways[way];
        let fresh = held
            .as_ref()
            .is_some_and(|h| Arc::ptr_eq(&h.slot, slot) && h.version == current);
        if !fresh {
            *held = None;
        }
        let held = held.get_or_insert_with(|| {
            let (version, view) = slot.view();
            HeldView {
                slot: slot.clone(),
                version,
                view,
            }
        });
        &held.view
    }

    fn clear(&mut self) {
        self.ways = Default::default();
    }
}

impl Default for RouteCache {
    fn default() -> RouteCache {
        RouteCache::new()
    }
}

impl RouteCache {
    /// Topics remembered per connection before the memo stops adding.
    pub const CAPACITY: usize = 256;

    /// Routes reaching more slots than this are not memoised (the shared cache, bounded in
    /// bytes, still holds them): 256 such routes per connection would otherwise hold up to
    /// 256 times their size per connection.
    pub const MAX_SLOTS: usize = 64;

    /// An empty memo.
    pub fn new() -> RouteCache {
        RouteCache {
            generation: u64::MAX,
            map: HashMap::default(),
            last_topic: String::new(),
            last: None,
            work: 0,
            views: ViewCache::default(),
            last_allowed: Ok(()),
            allowed: HashMap::default(),
            permissions: None,
            permissions_version: u64::MAX,
            pressed: Vec::new(),
        }
    }

    /// The outboxes this connection's publishes queued over their limits since the last
    /// [`RouteCache::clear_pressed`], for its reader to wait on ([`Outbox::poll_drained`]).
    pub fn pressed(&self) -> &[Arc<Outbox>] {
        &self.pressed
    }

    /// Forgets the pressed outboxes, once waited for.
    pub fn clear_pressed(&mut self) {
        self.pressed.clear();
    }

    /// The routing work done since the last call, and resets it. A connection's reader gives up
    /// its worker when this passes its budget, so that one connection's expensive matches delay
    /// others by a bounded amount.
    pub fn take_work(&mut self) -> usize {
        std::mem::take(&mut self.work)
    }

    /// The routing work done since [`RouteCache::take_work`] last reset it.
    pub fn work(&self) -> usize {
        self.work
    }
}

/// A message to route: the fields routing needs, and the encoded body to queue.
#[derive(Debug, Clone, Copy)]
pub struct Publication<'a> {
    /// The topic's bytes: UTF-8 checked by the decoder; syntax is checked here, the first time
    /// this connection or the shared cache sees the topic. Routing recognises a repeated topic by
    /// its bytes alone.
    pub topic: &'a [u8],
    /// The reply-to, if any.
    pub reply: Option<&'a str>,
    /// Payload length, for the limit.
    pub payload_len: usize,
    /// The whole encoded body, forwarded unchanged.
    pub raw: RawBody<'a>,
}

/// An encoded body, still in the reader's buffer or already a shared `Bytes`.
#[derive(Debug, Clone, Copy)]
pub enum RawBody<'a> {
    /// Borrowed from the read buffer: copied once if anything matches.
    Borrowed(&'a [u8]),
    /// A shared slice: copied if small (see [`DETACH_BELOW`]), else shared as is.
    Shared(&'a Bytes),
}

impl<'a> From<&'a Body> for Publication<'a> {
    fn from(b: &'a Body) -> Publication<'a> {
        Publication {
            topic: b.topic_bytes(),
            reply: b.reply(),
            payload_len: b.payload_len(),
            raw: RawBody::Shared(b.raw()),
        }
    }
}

impl<'a> From<&BodyRef<'a>> for Publication<'a> {
    fn from(b: &BodyRef<'a>) -> Publication<'a> {
        Publication {
            topic: b.topic_bytes(),
            reply: b.reply(),
            payload_len: b.payload_len(),
            raw: RawBody::Borrowed(b.raw()),
        }
    }
}

/// Bodies shorter than this are copied once out of the reader's buffer before queueing.
pub const DETACH_BELOW: usize = 16 * 1024;

/// The limits the broker enforces, from configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest frame, length prefix excluded.
    pub max_frame: usize,
    /// Largest payload.
    pub max_payload: usize,
    /// Topic and filter limits.
    pub topic: TopicLimits,
    /// Most live subscriptions per connection.
    pub max_subs: usize,
    /// Outbound queue limits per connection.
    pub outbox: OutboxLimits,
    /// Overflow policy for connections that do not choose one.
    pub default_policy: OverflowPolicy,
    /// Topics kept in the match cache.
    pub match_cache: usize,
    /// Bytes the match cache's results may hold.
    pub match_cache_bytes: usize,
    /// The broker's memory budget: queued bytes, partly read frames and the match cache.
    pub max_memory: usize,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            max_frame: 1024 * 1024 + 64 * 1024,
            max_payload: 1024 * 1024,
            topic: TopicLimits {
                max_len: 256,
                max_tokens: 16,
            },
            max_subs: 65_536,
            // Backpressure needs a writer that reports a blocked socket and publishers that wait:
            // the server turns it on (`outbound.backpressure_wait`).
            outbox: OutboxLimits {
                max_msgs: 65_536,
                max_bytes: 64 * 1024 * 1024,
                press: false,
            },
            default_policy: OverflowPolicy::DropNew,
            match_cache: 16_384,
            match_cache_bytes: crate::sublist::DEFAULT_CACHE_BYTES,
            max_memory: 1024 * 1024 * 1024,
        }
    }
}

/// Why a `SUB` was refused.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum SubscribeError {
    /// The filter is not valid.
    #[error("invalid filter: {0}")]
    InvalidFilter(TopicError),
    /// The id names a live subscription.
    #[error("subscription id {0} is already in use")]
    Duplicate(u32),
    /// The connection holds the maximum number of subscriptions.
    #[error("connection already holds the maximum of {0} subscriptions")]
    TooMany(usize),
    /// The queue group name is empty, too long or contains whitespace.
    #[error("invalid queue group name {0:?}")]
    InvalidQueue(String),
    /// The connection's user may not subscribe to this filter or join this group.
    #[error("subscribe to '{filter}' not permitted: {denial}")]
    Denied {
        /// The filter asked for.
        filter: String,
        /// The rule that refused it.
        denial: Denial,
    },
    /// The connection's user holds its maximum number of subscriptions.
    #[error("user already holds its maximum of {0} subscriptions")]
    UserQuota(usize),
}

impl SubscribeError {
    /// The `ERR` code for this refusal.
    pub fn code(&self) -> ErrorCode {
        match self {
            SubscribeError::InvalidFilter(_) | SubscribeError::InvalidQueue(_) => {
                ErrorCode::InvalidFilter
            }
            SubscribeError::Duplicate(_) => ErrorCode::DuplicateSubscription,
            SubscribeError::TooMany(_) | SubscribeError::UserQuota(_) => {
                ErrorCode::TooManySubscriptions
            }
            SubscribeError::Denied { .. } => ErrorCode::PermissionDenied,
        }
    }
}

/// Why an `UNSUB` was refused.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum UnsubscribeError {
    /// No live subscription has this id.
    #[error("no subscription with id {0}")]
    Unknown(u32),
}

/// Why a `PUB` was refused.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum PublishError {
    /// The topic is not valid.
    #[error("invalid topic: {0}")]
    InvalidTopic(TopicError),
    /// The reply-to is not a valid topic.
    #[error("invalid reply-to: {0}")]
    InvalidReply(TopicError),
    /// The topic is in the broker's reserved `$` space.
    #[error("topics starting with '$' are reserved for the broker")]
    Reserved,
    /// The connection's user may not publish to this topic.
    #[error("publish to '{topic}' not permitted: {denial}")]
    Denied {
        /// The topic.
        topic: String,
        /// The rule that refused it.
        denial: Denial,
    },
    /// The connection's user may not name this reply-to.
    #[error("reply-to '{reply}' not permitted: {denial}")]
    DeniedReply {
        /// The reply-to.
        reply: String,
        /// The rule that refused it.
        denial: Denial,
    },
    /// The payload is over the limit.
    #[error("payload of {len} bytes exceeds the maximum of {max}")]
    PayloadTooLarge {
        /// Payload length.
        len: usize,
        /// The limit.
        max: usize,
    },
}

impl PublishError {
    /// The `ERR` code for this refusal.
    pub fn code(&self) -> ErrorCode {
        match self {
            PublishError::InvalidTopic(_) | PublishError::InvalidReply(_) => {
                ErrorCode::InvalidTopic
            }
            PublishError::Reserved => ErrorCode::ReservedTopic,
            PublishError::Denied { .. } | PublishError::DeniedReply { .. } => {
                ErrorCode::PermissionDenied
            }
            PublishError::PayloadTooLarge { .. } => ErrorCode::PayloadTooLarge,
        }
    }
}

/// Counters of one connection, written by its own tasks only.
#[derive(Debug, Default)]
pub struct ClientCounters {
    /// `PUB` frames accepted.
    pub msgs_in: AtomicU64,
    /// Payload bytes accepted.
    pub bytes_in: AtomicU64,
    /// Frames written to the socket.
    pub frames_out: AtomicU64,
    /// Bytes written to the socket.
    pub bytes_out: AtomicU64,
    /// `PUB` frames that matched no subscription.
    pub unrouted: AtomicU64,
}

/// One connected client, after its handshake.
#[derive(Debug)]
pub struct Client {
    /// Broker-assigned id, unique for the process's life.
    pub id: u64,
    /// The name the client gave in `HELLO`.
    pub name: String,
    /// The peer address, for logs.
    pub peer: String,
    /// When its handshake completed (wall-clock time, for monitoring).
    pub connected_at: std::time::SystemTime,
    /// Do not deliver this client's publications to its own subscriptions.
    pub no_echo: bool,
    /// The connection's outbound queue, shared with its subscriptions.
    pub outbox: Arc<Outbox>,
    /// Traffic counters.
    pub counters: ClientCounters,
    /// Who it authenticated as (its `permissions` are the ones it started with; see
    /// [`Client::permissions`] for the ones in force).
    pub identity: Identity,
    /// What it may do now: a reload may change it ([`Broker::set_permissions`]).
    permissions: parking_lot::RwLock<Option<Arc<Permissions>>>,
    /// Bumped with every change of `permissions`, so that its reader notices with one load.
    permissions_version: AtomicU64,
    subs: Mutex<BTreeSet<BySid>>,
}

/// A connection's subscription, found by its id: the set stores one pointer per subscription
/// where a map from id to subscription would store the id twice and pad it to a pointer's size.
/// A B-tree grows a node at a time, where a hash table doubles and sits up to half empty; it is
/// searched only on `SUB`, `UNSUB` and the end of an auto-unsubscribe.
#[derive(Debug)]
struct BySid(Arc<Subscription>);

impl PartialEq for BySid {
    fn eq(&self, other: &BySid) -> bool {
        self.0.sid == other.0.sid
    }
}

impl Eq for BySid {}

// Ordered exactly as the `u32` it borrows as.
impl Ord for BySid {
    fn cmp(&self, other: &BySid) -> std::cmp::Ordering {
        self.0.sid.cmp(&other.0.sid)
    }
}

impl PartialOrd for BySid {
    fn partial_cmp(&self, other: &BySid) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl std::borrow::Borrow<u32> for BySid {
    fn borrow(&self) -> &u32 {
        &self.0.sid
    }
}

impl std::fmt::Debug for Outbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Outbox")
            .field("policy", &self.policy())
            .finish()
    }
}

impl Client {
    /// Live subscriptions.
    pub fn subscription_count(&self) -> usize {
        self.subs.lock().len()
    }

    /// Up to `max` of its live subscriptions, in subscription-id order (for monitoring): the
    /// connection's subscription lock is held while they are copied, never longer.
    pub fn subscriptions(&self, max: usize) -> Vec<Arc<Subscription>> {
        self.subs
            .lock()
            .iter()
            .take(max)
            .map(|s| s.0.clone())
            .collect()
    }

    /// What it may do now; `None` for everything.
    pub fn permissions(&self) -> Option<Arc<Permissions>> {
        self.permissions.read().clone()
    }

    /// Whether it may read `$` topics and see every connection in the statistics.
    pub fn is_admin(&self) -> bool {
        self.permissions.read().as_ref().is_none_or(|p| p.admin)
    }
}

/// Totals across the broker's life, for monitoring.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BrokerStats {
    /// Clients connected now.
    pub connections: usize,
    /// Clients ever connected.
    pub total_connections: u64,
    /// Live subscriptions.
    pub subscriptions: usize,
    /// Messages published.
    pub msgs_in: u64,
    /// Payload bytes published.
    pub bytes_in: u64,
    /// Deliveries queued for subscribers.
    pub deliveries: u64,
    /// Deliveries dropped by overflow policies.
    pub dropped: u64,
    /// Publishes that matched no subscription.
    pub unrouted: u64,
    /// Bytes written to clients.
    pub bytes_out: u64,
    /// Disconnects by reason name.
    pub closes: Vec<(&'static str, u64)>,
    /// Sublist statistics.
    pub sublist: SublistStats,
}

#[derive(Default)]
struct Retired {
    unrouted: u64,
    bytes_out: u64,
    msgs_in: u64,
    bytes_in: u64,
    deliveries: u64,
    dropped: u64,
    closes: HashMap<&'static str, u64>,
}

/// The routing state of one broker.
pub struct Broker {
    /// Replaced whole by [`Broker::set_limits`]; every check loads the current one.
    limits: ArcSwap<Limits>,
    sublist: Sublist<SubRef>,
    clients: Mutex<HashMap<u64, Arc<Client>>>,
    next_id: AtomicU64,
    retired: Mutex<Retired>,
    budget: Arc<MemoryBudget>,
}

impl Broker {
    /// An empty broker enforcing `limits`.
    pub fn new(limits: Limits) -> Broker {
        let budget = Arc::new(MemoryBudget::new(limits.max_memory));
        Broker {
            sublist: Sublist::with_budget(
                limits.match_cache,
                limits.match_cache_bytes,
                budget.clone(),
            ),
            budget,
            limits: ArcSwap::from_pointee(limits),
            clients: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
            retired: Mutex::new(Retired::default()),
        }
    }

    /// The limits in force.
    pub fn limits(&self) -> Arc<Limits> {
        self.limits.load_full()
    }

    /// Replaces the limits a configuration reload changed. Payload, topic and subscription
    /// limits apply at once to every connection; outbound queue limits and the default overflow
    /// policy to connections made from now on. The match cache and the memory budget keep the
    /// sizes they were built with.
    pub fn set_limits(&self, limits: Limits) {
        self.limits.store(Arc::new(limits));
    }

    /// The broker's memory budget, shared by every outbox, reader and the match cache.
    pub fn memory(&self) -> &Arc<MemoryBudget> {
        &self.budget
    }

    /// Registers a client that completed its handshake, with no restrictions.
    pub fn connect(
        &self,
        name: String,
        peer: String,
        policy: Option<OverflowPolicy>,
        no_echo: bool,
    ) -> Arc<Client> {
        self.connect_as(name, peer, policy, no_echo, Identity::default())
    }

    /// Registers a client that completed its handshake as `identity`. The caller has counted
    /// the connection against the identity's quota, if any; [`Broker::disconnect`] does not
    /// give it back (the connection's task does, when it ends).
    pub fn connect_as(
        &self,
        name: String,
        peer: String,
        policy: Option<OverflowPolicy>,
        no_echo: bool,
        identity: Identity,
    ) -> Arc<Client> {
        self.add_client(name, peer, policy, no_echo, identity, None)
    }

    /// Registers a connection of the broker's own (the web console's tail) whose queue has
    /// `queue` as its limits instead of the configured ones: a reader that shows a few messages
    /// a second needs far less than a client's queue, and must not hold as much when it stalls.
    pub fn connect_with_queue(
        &self,
        name: String,
        peer: String,
        policy: OverflowPolicy,
        queue: OutboxLimits,
    ) -> Arc<Client> {
        self.add_client(
            name,
            peer,
            Some(policy),
            false,
            Identity::default(),
            Some(queue),
        )
    }

    fn add_client(
        &self,
        name: String,
        peer: String,
        policy: Option<OverflowPolicy>,
        no_echo: bool,
        identity: Identity,
        queue: Option<OutboxLimits>,
    ) -> Arc<Client> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let limits = self.limits.load();
        let mut outbox = Outbox::with_budget(
            id,
            policy.unwrap_or(limits.default_policy),
            queue.unwrap_or(limits.outbox),
            self.budget.clone(),
        );
        if let Some(policy) = identity.permissions.as_ref().and_then(|p| p.responses) {
            outbox = outbox.with_responses(policy);
        }
        let client = Arc::new(Client {
            id,
            name,
            peer,
            connected_at: std::time::SystemTime::now(),
            no_echo,
            outbox: Arc::new(outbox),
            counters: ClientCounters::default(),
            permissions: parking_lot::RwLock::new(identity.permissions.clone()),
            permissions_version: AtomicU64::new(0),
            identity,
            subs: Mutex::new(BTreeSet::new()),
        });
        self.clients.lock().insert(id, client.clone());
        client
    }

    /// Adds a subscription; once this returns `Ok`, publishes that follow it are matched against it.
    ///
    /// # Errors
    /// An invalid filter, a live duplicate id, or the per-connection limit.
    pub fn subscribe(&self, client: &Client, sid: u32, filter: &str) -> Result<(), SubscribeError> {
        self.subscribe_queue(client, sid, filter, None)
    }

    /// Adds a subscription, as a member of queue group `queue` when given: among a group's
    /// subscriptions matching a message, exactly one receives it.
    ///
    /// # Errors
    /// As [`Broker::subscribe`], and an invalid queue group name.
    pub fn subscribe_queue(
        &self,
        client: &Client,
        sid: u32,
        filter: &str,
        queue: Option<&str>,
    ) -> Result<(), SubscribeError> {
        let filter = Filter::with_limits(filter, &self.limits.load().topic)
            .map_err(SubscribeError::InvalidFilter)?;
        let queue: Option<Arc<str>> = match queue {
            None => None,
            Some(q) => {
                if q.is_empty()
                    || q.len() > self.limits.load().topic.max_len
                    || q.chars().any(char::is_whitespace)
                {
                    return Err(SubscribeError::InvalidQueue(q.to_string()));
                }
                Some(q.into())
            }
        };
        if let Some(p) = client.permissions() {
            p.may_subscribe(filter.as_str(), queue.as_deref())
                .map_err(|denial| SubscribeError::Denied {
                    filter: filter.to_string(),
                    denial,
                })?;
        }
        let sub = Arc::new(Subscription::new(sid, filter, queue, client.outbox.clone()));
        if let Some(old) = self.register(client, &sub)? {
            self.sublist.remove(&old.filter, &SubRef(old.clone()));
        }
        self.sublist
            .insert_grouped(&sub.filter.clone(), sub.queue().cloned(), SubRef(sub));
        Ok(())
    }

    /// Adds a replay subscription: checked and counted like any other (filter, permissions,
    /// the connection's and the user's limits, a unique sid), but not put in the sublist, since
    /// a task of the caller's feeds it from a stream ([`Outbox::push_stored`]). `UNSUB` and the
    /// connection's end work on it as on any subscription; the feeding task stops when
    /// [`Subscription::is_dead`] or the outbox closes.
    ///
    /// # Errors
    /// As [`Broker::subscribe`].
    pub fn subscribe_replay(
        &self,
        client: &Client,
        sid: u32,
        filter: &str,
    ) -> Result<Arc<Subscription>, SubscribeError> {
        let filter = Filter::with_limits(filter, &self.limits.load().topic)
            .map_err(SubscribeError::InvalidFilter)?;
        if let Some(p) = client.permissions() {
            p.may_subscribe(filter.as_str(), None)
                .map_err(|denial| SubscribeError::Denied {
                    filter: filter.to_string(),
                    denial,
                })?;
        }
        let sub = Arc::new(Subscription::replay(sid, filter, client.outbox.clone()));
        if let Some(old) = self.register(client, &sub)? {
            self.sublist.remove(&old.filter, &SubRef(old.clone()));
        }
        Ok(sub)
    }

    /// Puts `sub` in its connection's map, returning the finished subscription it replaces.
    fn register(
        &self,
        client: &Client,
        sub: &Arc<Subscription>,
    ) -> Result<Option<Arc<Subscription>>, SubscribeError> {
        let sid = sub.sid;
        let replaced = {
            let mut subs = client.subs.lock();
            let replaced = match subs.get(&sid) {
                // A subscription whose allowance just ran out may still await its cleanup.
                Some(old) if old.0.is_dead() => subs.take(&sid),
                Some(_) => return Err(SubscribeError::Duplicate(sid)),
                None => None,
            };
            if subs.len() >= self.limits.load().max_subs {
                if let Some(old) = replaced {
                    subs.insert(old);
                }
                return Err(SubscribeError::TooMany(self.limits.load().max_subs));
            }
            // A replaced subscription's count passes to its successor.
            if replaced.is_none()
                && let Some(q) = &client.identity.quota
                && !q.try_subscribe()
            {
                return Err(SubscribeError::UserQuota(q.max_subscriptions()));
            }
            subs.insert(BySid(sub.clone()));
            replaced.map(|old| old.0)
        };
        // A replay subscription was never in the sublist.
        Ok(replaced.filter(|old| !old.is_replay()))
    }

    /// Ends a subscription now (`max == 0`) or after `max` more matched messages.
    ///
    /// # Errors
    /// No live subscription has this id.
    pub fn unsubscribe(&self, client: &Client, sid: u32, max: u32) -> Result<(), UnsubscribeError> {
        let sub = client
            .subs
            .lock()
            .get(&sid)
            .filter(|s| !s.0.is_dead())
            .map(|s| s.0.clone())
            .ok_or(UnsubscribeError::Unknown(sid))?;
        if client.outbox.set_allowance(&sub, u64::from(max)) {
            self.finish(client, &sub);
        }
        Ok(())
    }

    /// Removes a finished subscription from the connection and the sublist.
    fn finish(&self, client: &Client, sub: &Arc<Subscription>) {
        {
            let mut subs = client.subs.lock();
            if subs.get(&sub.sid).is_some_and(|s| Arc::ptr_eq(&s.0, sub)) {
                subs.remove(&sub.sid);
                if let Some(q) = &client.identity.quota {
                    q.unsubscribed(1);
                }
            }
        }
        if !sub.is_replay() {
            self.sublist.remove(&sub.filter, &SubRef(sub.clone()));
        }
    }

    /// Ends `sub` (a replay subscription whose stream went away): removes it from its
    /// connection, whose writer still writes what is queued for it.
    pub fn end_subscription(&self, client: &Client, sub: &Arc<Subscription>) {
        client.outbox.set_allowance(sub, 0);
        self.finish(client, sub);
    }

    /// Gives `client` new permissions (a configuration reload). Its next publish uses them; each
    /// of its subscriptions they no longer allow ends at once, and the client is told with an
    /// `ERR permission-denied` (`req_id` 0) naming the subscription. Returns how many ended.
    pub fn set_permissions(&self, client: &Client, permissions: Option<Arc<Permissions>>) -> usize {
        *client.permissions.write() = permissions.clone();
        client.permissions_version.fetch_add(1, Ordering::AcqRel);
        let Some(p) = permissions else {
            return 0;
        };
        let subs: Vec<Arc<Subscription>> = client.subs.lock().iter().map(|s| s.0.clone()).collect();
        let mut ended = 0;
        for sub in subs {
            let Err(denial) = p.may_subscribe(sub.filter.as_str(), sub.queue().map(|q| &**q))
            else {
                continue;
            };
            if sub.is_dead() {
                continue;
            }
            client.outbox.set_allowance(&sub, 0);
            self.finish(client, &sub);
            ended += 1;
            let notice = brokerd_proto::Frame::Err(brokerd_proto::ErrorFrame {
                req_id: 0,
                code: ErrorCode::PermissionDenied as u16,
                message: format!(
                    "subscription {} to '{}' ended: the configuration no longer permits it ({denial})",
                    sub.sid,
                    prefix(sub.filter.as_str(), 128)
                ),
            });
            client.outbox.push_frame(notice.to_bytes());
        }
        ended
    }

    /// Drops `routes` if the trie's shape changed since it was filled.
    pub fn refresh_routes(&self, routes: &mut RouteCache) {
        let generation = self.sublist.generation();
        if routes.generation != generation {
            routes.map.clear();
            routes.last = None;
            routes.generation = generation;
        }
    }

    /// Drops the views `routes` holds, so that a quiet connection does not keep departed
    /// subscribers (and their queues) alive in a view it will not use again; called by the
    /// connection task when it has been quiet for a keep-alive interval.
    pub fn forget_views(&self, routes: &mut RouteCache) {
        routes.views.clear();
    }

    /// Routes one published body to every matching subscription and returns how many queued it.
    ///
    /// Never waits on a subscriber: a full outbox applies its own overflow policy.
    ///
    /// # Errors
    /// An invalid or reserved topic, an invalid reply-to, or a payload over the limit; nothing was
    /// routed.
    pub fn publish(&self, from: &Client, body: &Body) -> Result<u32, PublishError> {
        self.publish_cached(from, &Publication::from(body), &mut RouteCache::new())
    }

    /// [`Broker::publish`] with the publishing connection's own [`RouteCache`], which answers a
    /// repeated topic without taking any shared lock.
    ///
    /// # Errors
    /// As [`Broker::publish`].
    pub fn publish_cached(
        &self,
        from: &Client,
        body: &Publication<'_>,
        routes: &mut RouteCache,
    ) -> Result<u32, PublishError> {
        let payload = body.payload_len;
        let max_payload = self.limits.load().max_payload;
        if payload > max_payload {
            return Err(PublishError::PayloadTooLarge {
                len: payload,
                max: max_payload,
            });
        }
        self.refresh_routes(routes);
        let version = from.permissions_version.load(Ordering::Acquire);
        if version != routes.permissions_version {
            routes.permissions = from.permissions();
            routes.permissions_version = version;
            routes.allowed.clear();
            // The last topic's answer is recomputed below.
            routes.last = None;
        }
        // The last topic costs one comparison of bytes; any other recent one a hash lookup.
        let is_last = routes.last.is_some() && routes.last_topic.as_bytes() == body.topic;
        if !is_last {
            let topic = std::str::from_utf8(body.topic)
                .map_err(|_| PublishError::InvalidTopic(TopicError::InvalidUtf8))?;
            let matches = match routes.map.get(topic) {
                Some(m) => m.clone(),
                None => {
                    // Only topics that passed the checks below are ever matched, hence ever
                    // cached: a cached topic, here or in the sublist, needs no second check.
                    let m = match self.sublist.cached(topic) {
                        Some(m) => m,
                        None => {
                            validate_topic(topic, &self.limits.load().topic)
                                .map_err(PublishError::InvalidTopic)?;
                            if is_reserved(topic) {
                                return Err(PublishError::Reserved);
                            }
                            self.sublist.lookup(topic, &mut routes.work)
                        }
                    };
                    // A full memo keeps what it has: a connection cycling through more topics
                    // than it holds is served by the shared cache without churning this one.
                    if routes.map.len() < RouteCache::CAPACITY
                        && m.slots().len() <= RouteCache::MAX_SLOTS
                    {
                        routes.map.insert(topic.into(), m.clone());
                    }
                    m
                }
            };
            if let Some(p) = routes.permissions.as_deref()
                && !p.publish_is_open()
            {
                routes.last_allowed = match routes.allowed.get(topic) {
                    Some(a) => a.clone(),
                    None => {
                        let a = p.may_publish(topic);
                        if routes.allowed.len() < RouteCache::CAPACITY {
                            routes.allowed.insert(topic.into(), a.clone());
                        }
                        a
                    }
                };
            }
            routes.last_topic.clear();
            routes.last_topic.push_str(topic);
            routes.last = Some(matches);
        }
        if let Some(p) = routes.permissions.as_deref() {
            self.check_publish(from, p, body, routes)?;
        }
        if let Some(reply) = body.reply {
            validate_topic(reply, &self.limits.load().topic).map_err(PublishError::InvalidReply)?;
            if let Some(p) = routes.permissions.as_deref() {
                p.may_reply_to(reply)
                    .map_err(|denial| PublishError::DeniedReply {
                        reply: reply.to_string(),
                        denial,
                    })?;
            }
        }
        // Only this connection's task writes its counters: a load and a store, no locked add.
        let c = &from.counters;
        c.msgs_in
            .store(c.msgs_in.load(Ordering::Relaxed) + 1, Ordering::Relaxed);
        c.bytes_in.store(
            c.bytes_in.load(Ordering::Relaxed) + payload as u64,
            Ordering::Relaxed,
        );
        let Some(matches) = routes.last.as_ref() else {
            return Ok(0);
        };
        match matches.slots() {
            [] => Ok(self.deliver(from, body, &[], &mut routes.pressed)),
            // The common case: the view this connection holds, if its slot has not changed.
            [one] => {
                let view = routes.views.get(one);
                Ok(self.deliver(from, body, &[view], &mut routes.pressed))
            }
            many => {
                let held: Vec<Arc<View<SubRef>>> = many.iter().map(|s| s.view().1).collect();
                let views: Vec<&View<SubRef>> = held.iter().map(|v| &**v).collect();
                Ok(self.deliver(from, body, &views, &mut routes.pressed))
            }
        }
    }

    /// Refuses a publish its sender's rules deny, unless the sender holds a permit to answer a
    /// request on that topic (which it then uses).
    fn check_publish(
        &self,
        from: &Client,
        p: &Permissions,
        body: &Publication<'_>,
        routes: &RouteCache,
    ) -> Result<(), PublishError> {
        if p.publish_is_open() {
            return Ok(());
        }
        let Err(denial) = &routes.last_allowed else {
            return Ok(());
        };
        if let Some(permits) = from.outbox.responses()
            && permits.take(&routes.last_topic, std::time::Instant::now())
        {
            return Ok(());
        }
        Err(PublishError::Denied {
            topic: String::from_utf8_lossy(body.topic).into_owned(),
            denial: denial.clone(),
        })
    }

    /// Queues `body` for every subscription in `views`, and one member of each queue group;
    /// returns how many queued it.
    fn deliver(
        &self,
        from: &Client,
        body: &Publication<'_>,
        views: &[&View<SubRef>],
        pressed: &mut Vec<Arc<Outbox>>,
    ) -> u32 {
        if views.iter().all(|v| v.is_empty()) {
            let c = &from.counters;
            c.unrouted
                .store(c.unrouted.load(Ordering::Relaxed) + 1, Ordering::Relaxed);
            return 0;
        }
        // A small body would otherwise pin the whole read buffer it was decoded from for as long
        // as any subscriber holds it; one copy per publish (never per subscriber) bounds memory by
        // what the outboxes count. Large bodies are shared as decoded.
        let raw = match body.raw {
            RawBody::Borrowed(b) => Bytes::copy_from_slice(b),
            RawBody::Shared(b) if b.len() < DETACH_BELOW => Bytes::copy_from_slice(b),
            RawBody::Shared(b) => b.clone(),
        };
        let raw = &raw;
        let eligible = |s: &SubRef| !(from.no_echo && s.client_id() == from.id);
        let mut delivered = 0u32;
        let mut grouped_slots = 0;
        for view in views.iter() {
            for sub in view.plain.iter() {
                if from.no_echo && sub.client_id() == from.id {
                    continue;
                }
                let push = sub.outbox.push_msg(sub, raw);
                if push.delivered()
                    && let Some(reply) = body.reply
                {
                    grant(sub, reply);
                }
                note_pressed(pressed, sub, push);
                self.settle(sub, push, &mut delivered);
            }
            grouped_slots += usize::from(!view.groups.is_empty());
        }
        if grouped_slots == 1 {
            for view in views.iter() {
                for group in view.groups.iter() {
                    self.deliver_to_group(
                        &group.members,
                        eligible,
                        raw,
                        body.reply,
                        &mut delivered,
                        pressed,
                    );
                }
            }
        } else if grouped_slots > 1 {
            // One group's members may sit in several slots (several of its filters match):
            // merged by name, so that the group still receives the message once.
            let mut groups: Vec<(&Arc<str>, Vec<SubRef>)> = Vec::new();
            for view in views.iter() {
                for group in view.groups.iter() {
                    match groups.iter_mut().find(|(n, _)| *n == &group.name) {
                        Some((_, members)) => members.extend(group.members.iter().cloned()),
                        None => groups.push((&group.name, group.members.to_vec())),
                    }
                }
            }
            for (_, members) in &groups {
                self.deliver_to_group(members, eligible, raw, body.reply, &mut delivered, pressed);
            }
        }
        delivered
    }

    /// Publishes an event of the broker's own on a reserved topic (`$SYS.event...`) to the
    /// subscriptions whose filters name the reserved space themselves (begin with `$`): a `>`
    /// or `*.>` subscription never receives the broker's events, and only a client allowed to
    /// subscribe to `$` filters (an admin, or anyone without authentication) can make such a
    /// subscription. One member of each queue group takes it. The walk skips the match cache
    /// (see [`Sublist::matches_uncached`]); its cost is bounded by the filters that can match a
    /// `$SYS` topic. `payload` is called only if a subscription matches. Returns how many
    /// subscriptions took the event.
    pub fn publish_event<P: AsRef<[u8]>>(&self, topic: &str, payload: impl FnOnce() -> P) -> u32 {
        let matches = self.sublist.matches_uncached(topic);
        if matches.is_empty() {
            return 0;
        }
        let raw = own_body(topic, payload().as_ref());
        let reserved = |s: &SubRef| is_reserved(s.filter.as_str());
        let mut delivered = 0u32;
        for slot in matches.slots() {
            let (_, view) = slot.view();
            for sub in view.plain.iter().filter(|s| reserved(s)) {
                let push = sub.outbox.push_msg(sub, &raw);
                self.settle(sub, push, &mut delivered);
            }
            for group in view.groups.iter() {
                // Nobody waits on the broker's own events: what it presses is not remembered.
                self.deliver_to_group(
                    &group.members,
                    reserved,
                    &raw,
                    None,
                    &mut delivered,
                    &mut Vec::new(),
                );
            }
        }
        delivered
    }

    /// Delivers a message of the broker's own, such as the answer to a `$SYS` request, to those
    /// of `to`'s subscriptions whose filters match `topic`, and to no other client's: a request
    /// makes the broker answer the client that asked, never a crowd. Nothing is routed through
    /// the sublist, so nothing is cached (the reserved-topic check relies on only checked topics
    /// being cached). No client sent the message, so no-echo does not hold it back and no
    /// client's publish counters include it; its deliveries count like any other. `payload` is
    /// called only if a subscription matches. Returns how many subscriptions took it.
    ///
    /// # Errors
    /// An invalid `topic` ([`PublishError::InvalidReply`]: it is where an answer goes), or a
    /// payload over the limit.
    pub fn answer<P: AsRef<[u8]>>(
        &self,
        to: &Client,
        topic: &str,
        payload: impl FnOnce() -> P,
    ) -> Result<u32, PublishError> {
        validate_topic(topic, &self.limits.load().topic).map_err(PublishError::InvalidReply)?;
        let targets: Vec<SubRef> = to
            .subs
            .lock()
            .iter()
            // A replay or consumer subscription takes only its stream's messages.
            .filter(|s| !s.0.is_replay() && s.0.filter.matches(topic))
            .map(|s| SubRef(s.0.clone()))
            .collect();
        if targets.is_empty() {
            return Ok(0);
        }
        let payload = payload();
        let payload = payload.as_ref();
        if payload.len() > self.limits.load().max_payload {
            return Err(PublishError::PayloadTooLarge {
                len: payload.len(),
                max: self.limits.load().max_payload,
            });
        }
        let raw = own_body(topic, payload);
        let mut delivered = 0u32;
        for sub in &targets {
            let push = sub.outbox.push_msg(sub, &raw);
            self.settle(sub, push, &mut delivered);
        }
        Ok(delivered)
    }

    /// Gives a message to one member of a queue group: starting from a random member, the first
    /// one whose outbox has room takes it. When every member is full, the starting member's
    /// overflow policy decides, so the drop is counted and reported like any other.
    fn deliver_to_group(
        &self,
        members: &[SubRef],
        eligible: impl Fn(&SubRef) -> bool,
        raw: &Bytes,
        reply: Option<&str>,
        delivered: &mut u32,
        pressed: &mut Vec<Arc<Outbox>>,
    ) {
        let n = members.len();
        let start = random_below(n);
        // The first member found full: the one whose policy decides if every member is full.
        // A member that is finished or closing is passed over, never chosen.
        let mut first_full = None;
        for i in 0..n {
            let sub = &members[(start + i) % n];
            if !eligible(sub) {
                continue;
            }
            match sub.outbox.try_push_msg(sub, raw) {
                None => {
                    first_full.get_or_insert(sub);
                }
                Some(Push::Skipped) => {}
                Some(push) => {
                    if push.delivered()
                        && let Some(reply) = reply
                    {
                        grant(sub, reply);
                    }
                    self.settle(sub, push, delivered);
                    return;
                }
            }
        }
        if let Some(sub) = first_full {
            let push = sub.outbox.push_msg(sub, raw);
            if push.delivered()
                && let Some(reply) = reply
            {
                grant(sub, reply);
            }
            note_pressed(pressed, sub, push);
            self.settle(sub, push, delivered);
        }
    }

    /// Counts a push and removes a subscription whose auto-unsubscribe allowance it used up.
    fn settle(&self, sub: &SubRef, push: Push, delivered: &mut u32) {
        if push.delivered() {
            *delivered += 1;
        }
        if push.finished() {
            if let Some(owner) = self.client(sub.client_id()) {
                self.finish(&owner, &sub.0);
            } else {
                self.sublist.remove(&sub.filter, sub);
            }
        }
    }

    /// The client with this id, if connected.
    pub fn client(&self, id: u64) -> Option<Arc<Client>> {
        self.clients.lock().get(&id).cloned()
    }

    /// Every connected client.
    pub fn clients(&self) -> Vec<Arc<Client>> {
        self.clients.lock().values().cloned().collect()
    }

    /// Removes a client and all its subscriptions, recording why it left.
    pub fn disconnect(&self, client: &Client, reason: &CloseReason) {
        client.outbox.close(reason.clone(), false);
        let subs: Vec<Arc<Subscription>> = std::mem::take(&mut *client.subs.lock())
            .into_iter()
            .map(|s| s.0)
            .collect();
        if let Some(q) = &client.identity.quota {
            q.unsubscribed(subs.len());
        }
        for sub in subs {
            client.outbox.set_allowance(&sub, 0);
            if !sub.is_replay() {
                self.sublist.remove(&sub.filter.clone(), &SubRef(sub));
            }
        }
        // The outbox is closed and this connection's task has stopped publishing: its figures
        // are final. They move to the retired totals in the same step that removes the client,
        // under the client map's lock, so that `stats` sees each connection exactly once.
        let out = client.outbox.stats();
        let mut clients = self.clients.lock();
        if clients.remove(&client.id).is_some() {
            let mut r = self.retired.lock();
            r.msgs_in += client.counters.msgs_in.load(Ordering::Relaxed);
            r.unrouted += client.counters.unrouted.load(Ordering::Relaxed);
            r.bytes_out += client.counters.bytes_out.load(Ordering::Relaxed);
            r.bytes_in += client.counters.bytes_in.load(Ordering::Relaxed);
            r.deliveries += out.queued;
            r.dropped += out.dropped;
            *r.closes.entry(reason.name()).or_insert(0) += 1;
        }
    }

    /// Records a connection that closed before it completed its handshake.
    pub fn record_close(&self, reason: &CloseReason) {
        *self.retired.lock().closes.entry(reason.name()).or_insert(0) += 1;
    }

    /// Current totals.
    pub fn stats(&self) -> BrokerStats {
        self.stats_and_clients(false).0
    }

    /// Current totals and, with `rows`, each connected client's own figures, from one snapshot:
    /// a connection closing meanwhile is counted once, either live or retired.
    pub fn stats_and_clients(&self, rows: bool) -> (BrokerStats, Vec<ClientStats>) {
        let sublist = self.sublist.stats();
        // The client map, then the retired totals: the order `disconnect` takes them in.
        let (clients, mut s) = {
            let clients = self.clients.lock();
            let r = self.retired.lock();
            let s = BrokerStats {
                connections: clients.len(),
                total_connections: self.next_id.load(Ordering::Relaxed) - 1,
                subscriptions: sublist.subscriptions,
                msgs_in: r.msgs_in,
                bytes_in: r.bytes_in,
                deliveries: r.deliveries,
                dropped: r.dropped,
                unrouted: r.unrouted,
                bytes_out: r.bytes_out,
                closes: CloseReason::NAMES
                    .iter()
                    .map(|n| (*n, r.closes.get(n).copied().unwrap_or(0)))
                    .collect(),
                sublist,
            };
            let list: Vec<Arc<Client>> = clients.values().cloned().collect();
            (list, s)
        };
        let mut out = Vec::with_capacity(if rows { clients.len() } else { 0 });
        for c in clients {
            let outbox = c.outbox.stats();
            let msgs_in = c.counters.msgs_in.load(Ordering::Relaxed);
            let bytes_in = c.counters.bytes_in.load(Ordering::Relaxed);
            s.msgs_in += msgs_in;
            s.unrouted += c.counters.unrouted.load(Ordering::Relaxed);
            s.bytes_out += c.counters.bytes_out.load(Ordering::Relaxed);
            s.bytes_in += bytes_in;
            s.deliveries += outbox.queued;
            s.dropped += outbox.dropped;
            if rows {
                out.push(ClientStats {
                    subscriptions: c.subscription_count(),
                    msgs_in,
                    bytes_in,
                    outbox,
                    client: c,
                });
            }
        }
        (s, out)
    }
}

/// One connected client's figures, as [`Broker::stats_and_clients`] saw them.
#[derive(Debug)]
pub struct ClientStats {
    /// The client (name, peer, id, overflow policy).
    pub client: Arc<Client>,
    /// Its live subscriptions.
    pub subscriptions: usize,
    /// Messages it published.
    pub msgs_in: u64,
    /// Payload bytes it published.
    pub bytes_in: u64,
    /// Its outbound queue's figures: deliveries queued, dropped and pending.
    pub outbox: OutboxStats,
}

/// A message of the broker's own (an answer, an event): a body with no reply-to and no headers.
fn own_body(topic: &str, payload: &[u8]) -> Bytes {
    let body = BodyBuilder {
        topic,
        reply: None,
        headers: None,
        payload,
    };
    let mut raw = BytesMut::with_capacity(body.len());
    body.put(&mut raw);
    raw.freeze()
}

/// Outboxes one publisher remembers as pressed at most; one more past that is not waited for
/// (it stays within twice its limits all the same).
const MAX_PRESSED: usize = 1024;

/// Remembers `sub`'s outbox when `push` pressed it, once per run of deliveries to it.
fn note_pressed(pressed: &mut Vec<Arc<Outbox>>, sub: &SubRef, push: Push) {
    if push.pressed()
        && pressed.len() < MAX_PRESSED
        && !pressed.last().is_some_and(|o| Arc::ptr_eq(o, &sub.outbox))
    {
        pressed.push(sub.outbox.clone());
    }
}

/// A uniformly distributed index below `n` (which must be positive), from a per-thread
/// xorshift generator seeded by the standard library's random hasher keys.
fn random_below(n: usize) -> usize {
    use std::cell::Cell;
    use std::hash::{BuildHasher, Hasher};
    thread_local! {
        static STATE: Cell<u64> = Cell::new(
            std::collections::hash_map::RandomState::new().build_hasher().finish() | 1,
        );
    }
    if n <= 1 {
        return 0;
    }
    let x = STATE.with(|s| {
        let mut x = s.get();
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        s.set(x);
        x
    });
    // Multiply-shift maps the 64-bit value onto 0..n without the bias of a modulo.
    ((u128::from(x) * n as u128) >> 64) as usize
}
