//! The subscription trie and its match cache.
//!
//! Filters are stored token by token; each node has a slot for literal children (a B-tree by
//! token), one for `*`, and two subscription slots: filters ending exactly here, and filters
//! ending with `>` after here. Matching a topic is one walk that never scans filters linearly. A
//! position where one filter ends with nothing below it is held in its parent's table rather
//! than in a node of its own: with distinct filters, most are.
//!
//! Every subscribed position is a shared [`Slot`]: the subscriptions of one filter (plain and
//! queue-group members alike), behind a lock of its own, with an immutable [`View`] of them
//! built when a publish first needs it after a change. A match result is the list of slots a
//! topic reaches, which depends only on the trie's shape: results are cached per topic and
//! shared by every publisher, and a subscribe or unsubscribe to a filter that already has a slot
//! changes that slot alone. Whatever the cache holds and however many others share the filter,
//! such a change costs a walk down the filter's own path and a hash-table insert or remove. Only
//! creating a slot changes which slots a topic reaches: a literal filter's new slot removes its
//! one cached topic; a wildcard's marks every cached result stale at once (a generation stamp,
//! O(1)), and the cache refills as topics are published again. An emptied slot is pruned with
//! no cache work: a result still holding it finds it empty.
//!
//! Called by connection reader tasks (match on publish, insert on subscribe, remove on
//! unsubscribe and disconnect). Runtime-free. Locks, always taken in this order and never held
//! across another's work: the trie (`Sublist::trie`), then one slot's (`Slot::inner`), or the
//! trie then the cache (`Sublist::cache`); see `docs/architecture.md`.

use crate::memory::MemoryBudget;
use foldhash::fast::RandomState;
use parking_lot::{Mutex, RwLock};
use std::collections::HashMap;
use std::hash::Hash;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use brokerd_proto::Filter;

/// A shared, immutable match result.
pub type Matches<T> = Arc<MatchResult<T>>;

/// The slots one topic reaches: every subscription in them matches the topic.
pub struct MatchResult<T> {
    slots: Box<[Arc<Slot<T>>]>,
}

impl<T> MatchResult<T> {
    /// The slots reached, each with its current subscriptions.
    pub fn slots(&self) -> &[Arc<Slot<T>>] {
        &self.slots
    }
}

impl<T: Clone + Eq + Hash> MatchResult<T> {
    /// Whether no subscription matches now.
    pub fn is_empty(&self) -> bool {
        self.slots.iter().all(|s| s.with_view(|v| v.is_empty()))
    }

    /// How many subscriptions match now, plain and grouped.
    pub fn len(&self) -> usize {
        self.slots.iter().map(|s| s.with_view(View::len)).sum()
    }

    /// Every matching subscription, plain and grouped.
    pub fn all(&self) -> Vec<T> {
        let mut v = Vec::new();
        for s in self.slots.iter() {
            s.with_view(|view| {
                v.extend(view.plain.iter().cloned());
                for g in view.groups.iter() {
                    v.extend(g.members.iter().cloned());
                }
            });
        }
        v
    }
}

impl<T> std::fmt::Debug for MatchResult<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MatchResult")
            .field("slots", &self.slots.len())
            .finish()
    }
}

/// The subscriptions of one slot at one moment: each plain one receives a matching message; each
/// queue group receives it once, through one of its members.
#[derive(Debug)]
pub struct View<T> {
    /// Plain subscriptions.
    pub plain: Box<[T]>,
    /// Queue groups, each with its members in this slot.
    pub groups: Box<[Group<T>]>,
}

impl<T> View<T> {
    /// Whether the slot holds nothing.
    pub fn is_empty(&self) -> bool {
        self.plain.is_empty() && self.groups.is_empty()
    }

    /// Subscriptions in the view, plain and grouped.
    pub fn len(&self) -> usize {
        self.plain.len() + self.groups.iter().map(|g| g.members.len()).sum::<usize>()
    }
}

/// The members of one queue group within one slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Group<T> {
    /// The group's name.
    pub name: Arc<str>,
    /// Its members; never empty.
    pub members: Box<[T]>,
}

/// Sublist statistics, for monitoring and tests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SublistStats {
    /// Entries inserted and not yet removed.
    pub subscriptions: usize,
    /// Trie nodes, root excluded.
    pub nodes: usize,
    /// Topics currently cached.
    pub cache_entries: usize,
    /// Bytes the cached results are estimated to hold.
    pub cache_bytes: usize,
    /// Lookups answered from the cache.
    pub cache_hits: u64,
    /// Lookups that walked the trie.
    pub cache_misses: u64,
}

/// One stored subscription's queue group, behind a thin pointer: most have none.
type GroupName = Option<Arc<Arc<str>>>;

/// A slot holding this many entries or more keeps them in a hash table, so that removing one
/// of a crowd costs a lookup, not a scan.
const INDEX_AT: usize = 32;

/// The entries of one slot. Nearly every filter is held by one subscription, so one entry is
/// stored inline; a short list is scanned; a crowd (a fleet sharing one filter, a large queue
/// group) is a hash table by item, counting repeats of one item.
enum Entries<T> {
    Empty,
    One(T, GroupName),
    Few(Vec<(T, GroupName)>),
    Crowd(Box<Crowd<T>>),
}

/// A slot's entries once it holds a crowd: each item with its group and how many times it was
/// added, and the total.
struct Crowd<T> {
    map: HashMap<T, (GroupName, u32), RandomState>,
    len: usize,
}

impl<T: Clone + Eq + Hash> Entries<T> {
    fn len(&self) -> usize {
        match self {
            Entries::Empty => 0,
            Entries::One(..) => 1,
            Entries::Few(v) => v.len(),
            Entries::Crowd(c) => c.len,
        }
    }

    fn push(&mut self, item: T, group: GroupName) {
        match std::mem::replace(self, Entries::Empty) {
            Entries::Empty => *self = Entries::One(item, group),
            Entries::One(a, ag) => *self = Entries::Few(vec![(a, ag), (item, group)]),
            Entries::Few(mut v) if v.len() + 1 < INDEX_AT => {
                v.push((item, group));
                *self = Entries::Few(v);
            }
            Entries::Few(v) => {
                let mut map =
                    HashMap::with_capacity_and_hasher(v.len() * 2, RandomState::default());
                let n = v.len() + 1;
                for (i, g) in v.into_iter().chain(std::iter::once((item, group))) {
                    map.entry(i).or_insert((g, 0)).1 += 1;
                }
                *self = Entries::Crowd(Box::new(Crowd { map, len: n }));
            }
            Entries::Crowd(mut c) => {
                c.map.entry(item).or_insert((group, 0)).1 += 1;
                c.len += 1;
                *self = Entries::Crowd(c);
            }
        }
    }

    /// Removes one entry holding `item`; whether there was one.
    fn remove(&mut self, item: &T) -> bool {
        match self {
            Entries::Empty => false,
            Entries::One(a, _) if a == item => {
                *self = Entries::Empty;
                true
            }
            Entries::One(..) => false,
            Entries::Few(v) => match v.iter().position(|(x, _)| x == item) {
                Some(i) => {
                    v.swap_remove(i);
                    if v.is_empty() {
                        *self = Entries::Empty;
                    }
                    true
                }
                None => false,
            },
            Entries::Crowd(c) => {
                let Some(e) = c.map.get_mut(item) else {
                    return false;
                };
                e.1 -= 1;
                if e.1 == 0 {
                    c.map.remove(item);
                }
                c.len -= 1;
                if c.len == 0 {
                    *self = Entries::Empty;
                } else if c.map.capacity() > 64 && c.map.len() * 4 < c.map.capacity() {
                    // A crowd that left gives its table back.
                    c.map.shrink_to_fit();
                }
                true
            }
        }
    }

    fn view(&self) -> View<T> {
        let mut plain = Vec::new();
        let mut groups: Vec<(Arc<str>, Vec<T>)> = Vec::new();
        let mut add = |item: &T, group: &GroupName, times: u32| {
            let list = match group {
                None => &mut plain,
                Some(name) => {
                    let i = match groups.iter().position(|(n, _)| n == &**name) {
                        Some(i) => i,
                        None => {
                            groups.push((Arc::clone(name), Vec::new()));
                            groups.len() - 1
                        }
                    };
                    &mut groups[i].1
                }
            };
            for _ in 0..times {
                list.push(item.clone());
            }
        };
        match self {
            Entries::Empty => {}
            Entries::One(i, g) => add(i, g, 1),
            Entries::Few(v) => v.iter().for_each(|(i, g)| add(i, g, 1)),
            Entries::Crowd(c) => c.map.iter().for_each(|(i, (g, n))| add(i, g, *n)),
        }
        View {
            plain: plain.into_boxed_slice(),
            groups: groups
                .into_iter()
                .map(|(name, members)| Group {
                    name,
                    members: members.into_boxed_slice(),
                })
                .collect(),
        }
    }
}

/// The subscriptions of one filter, shared by the trie and by every match result that reaches
/// it. Changed under its own lock; publishers read its [`View`], rebuilt after a change by the
/// first publish that needs it, and may keep a view for as long as the slot's
/// [`version`](Slot::version) stays the same.
pub struct Slot<T> {
    inner: Mutex<SlotInner<T>>,
    /// Bumped by every change, under the lock.
    version: AtomicU64,
}

struct SlotInner<T> {
    entries: Entries<T>,
    /// The view of `entries`, until they change.
    view: Option<Arc<View<T>>>,
}

impl<T: Clone + Eq + Hash> Slot<T> {
    fn new() -> Slot<T> {
        Slot {
            inner: Mutex::new(SlotInner {
                entries: Entries::Empty,
                view: None,
            }),
            version: AtomicU64::new(0),
        }
    }

    /// A number that changes whenever the slot's subscriptions do: a view obtained with some
    /// version is current while the slot keeps it.
    pub fn version(&self) -> u64 {
        self.version.load(Ordering::Acquire)
    }

    /// Calls `f` with the slot's current subscriptions.
    pub fn with_view<R>(&self, f: impl FnOnce(&View<T>) -> R) -> R {
        f(&self.view().1)
    }

    /// The slot's current subscriptions and the version they are current for.
    ///
    /// After a change, the first call rebuilds the view under the slot's lock: its cost is the
    /// slot's size, paid at most once per change and never more often than publishes reach the
    /// slot, which then deliver to that many subscriptions anyway.
    pub fn view(&self) -> (u64, Arc<View<T>>) {
        let mut inner = self.inner.lock();
        let version = self.version.load(Ordering::Relaxed);
        let view = match &inner.view {
            Some(v) => v.clone(),
            None => {
                let v = Arc::new(inner.entries.view());
                inner.view = Some(v.clone());
                v
            }
        };
        (version, view)
    }

    /// Marks a change made under the lock: the view goes (releasing the subscriptions it held)
    /// and the version moves.
    fn changed(&self, inner: &mut SlotInner<T>) {
        inner.view = None;
        self.version.fetch_add(1, Ordering::Release);
    }

    fn push(&self, item: T, group: GroupName) {
        let mut inner = self.inner.lock();
        inner.entries.push(item, group);
        self.changed(&mut inner);
    }

    /// Removes one entry holding `item`: whether there was one, and whether the slot is now empty.
    fn remove(&self, item: &T) -> (bool, bool) {
        let mut inner = self.inner.lock();
        let found = inner.entries.remove(item);
        if found {
            self.changed(&mut inner);
        }
        (found, inner.entries.len() == 0)
    }
}

/// Topic-keyed maps hash with foldhash: several times faster than SipHash on short keys, and
/// seeded per process, so a client cannot precompute colliding topics.
type Map<V> = HashMap<Box<str>, V, RandomState>;

/// A node's literal children, by token. A B-tree rather than a hash table: it grows a node at a
/// time, where a hash table doubles (and at a million children sits half empty, after freeing a
/// table half its size), so a wide node costs about 50 bytes per child instead of 70-100; a
/// lookup, made only on a match-cache miss or a subscription change, measured no slower
/// (`cargo bench -p brokerd-core --bench routing -- sublist_match`); and no hash function is
/// exposed to the tokens clients choose.
type Children<T> = std::collections::BTreeMap<Box<str>, Child<T>>;

/// A literal child of a node.
enum Child<T> {
    /// A position where only filters ending exactly here are, with nothing below it: the
    /// commonest position in a table of distinct filters, held in the parent's table (one
    /// pointer) instead of a node of its own. It becomes a `Node` when anything else arrives.
    Leaf(Arc<Slot<T>>),
    /// Anything else, boxed so a wide parent's table holds a pointer per child.
    Node(Box<Node<T>>),
}

impl<T> Child<T> {
    /// Turns a leaf into a node holding its slot, so that more can be added below.
    fn make_node(&mut self) {
        if matches!(self, Child::Leaf(_))
            && let Child::Leaf(s) = std::mem::replace(self, Child::Node(Box::default()))
            && let Child::Node(n) = self
        {
            n.here = Some(s);
        }
    }
}

struct Node<T> {
    /// Literal children, absent on nodes without any, which then cost no table at all.
    literal: Option<Box<Children<T>>>,
    star: Option<Box<Node<T>>>,
    /// Subscriptions whose filter ends here exactly.
    here: Option<Arc<Slot<T>>>,
    /// Subscriptions whose filter ends with `>` after this node.
    tail: Option<Arc<Slot<T>>>,
}

impl<T> Default for Node<T> {
    fn default() -> Self {
        Node {
            literal: None,
            star: None,
            here: None,
            tail: None,
        }
    }
}

impl<T> Node<T> {
    fn is_empty(&self) -> bool {
        self.literal.as_ref().is_none_or(|m| m.is_empty())
            && self.star.is_none()
            && self.here.is_none()
            && self.tail.is_none()
    }
}

struct Trie<T> {
    root: Node<T>,
    subscriptions: usize,
    nodes: usize,
}

/// One cached result: the slots its topic reaches, as of wildcard generation `wild`. Two words,
/// so that a large cache's table stays small; its cost is computed again from the topic and the
/// result when needed.
struct Cached<T> {
    result: Matches<T>,
    wild: u64,
}

/// What a cache entry for `topic` reaching `slots` slots is counted as.
fn entry_cost(topic: &str, slots: usize) -> usize {
    ENTRY_OVERHEAD + topic.len() + slots * size_of::<usize>()
}

struct Cache<T> {
    map: Map<Cached<T>>,
    bytes: usize,
}

/// Bytes a cache entry costs beyond its topic and slot pointers: the table's key and value, the
/// result's allocation and the reference counts, rounded up.
const ENTRY_OVERHEAD: usize = 96;

/// Default byte budget of the match cache.
pub const DEFAULT_CACHE_BYTES: usize = 32 * 1024 * 1024;

/// A subscription trie with a bounded match cache.
///
/// `T` is the subscription handle; two handles are the same subscription when they compare equal.
pub struct Sublist<T> {
    trie: RwLock<Trie<T>>,
    cache: RwLock<Cache<T>>,
    /// Bumped (under the trie's write lock) whenever a slot is created: a result computed before
    /// is not cached, and per-connection route memos start over.
    structure: AtomicU64,
    /// Bumped (likewise) whenever a wildcard filter's slot is created: cached results stamped
    /// with an older value are stale.
    wild: AtomicU64,
    max_entries: usize,
    max_bytes: usize,
    /// Charged with the cache's bytes.
    budget: Arc<MemoryBudget>,
    hits: AtomicU64,
    misses: AtomicU64,
}

impl<T: Clone + Eq + Hash> Sublist<T> {
    /// An empty sublist caching up to `cache_capacity` topics (0 disables the cache) within
    /// [`DEFAULT_CACHE_BYTES`].
    pub fn new(cache_capacity: usize) -> Sublist<T> {
        Sublist::with_cache_limits(cache_capacity, DEFAULT_CACHE_BYTES)
    }

    /// An empty sublist caching up to `max_entries` topics whose results hold at most
    /// `max_bytes` in all (either 0 disables the cache).
    pub fn with_cache_limits(max_entries: usize, max_bytes: usize) -> Sublist<T> {
        Sublist::with_budget(max_entries, max_bytes, Arc::new(MemoryBudget::unlimited()))
    }

    /// As [`Sublist::with_cache_limits`], charging the cache's bytes to `budget`.
    pub fn with_budget(
        max_entries: usize,
        max_bytes: usize,
        budget: Arc<MemoryBudget>,
    ) -> Sublist<T> {
        Sublist {
            budget,
            trie: RwLock::new(Trie {
                root: Node::default(),
                subscriptions: 0,
                nodes: 0,
            }),
            cache: RwLock::new(Cache {
                map: Map::default(),
                bytes: 0,
            }),
            structure: AtomicU64::new(0),
            wild: AtomicU64::new(0),
            max_entries: if max_bytes == 0 { 0 } else { max_entries },
            max_bytes,
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
        }
    }

    /// Adds a plain subscription `item` under `filter`.
    pub fn insert(&self, filter: &Filter, item: T) {
        self.insert_grouped(filter, None, item);
    }

    /// Adds `item` under `filter`, as a member of queue group `group` when given. An item added
    /// twice under one filter counts twice and must carry the same group both times.
    ///
    /// Cost: a walk down the filter's tokens and an insert into its slot, under the trie's write
    /// lock; when the filter is new, also the removal of one cached topic (a literal filter) or
    /// one atomic increment (a wildcard). Nothing here depends on the cache's size or on how many
    /// others share the filter.
    pub fn insert_grouped(&self, filter: &Filter, group: Option<Arc<str>>, item: T) {
        let mut trie = self.trie.write();
        let trie = &mut *trie;
        let mut tokens: Vec<&str> = filter.tokens().collect();
        let tail = tokens.last() == Some(&">");
        if tail {
            tokens.pop();
        }
        let (slot, created) = slot_for(&mut trie.root, &tokens, tail, &mut trie.nodes);
        trie.subscriptions += 1;
        if created {
            self.structure.fetch_add(1, Ordering::SeqCst);
            if filter.is_literal() {
                self.uncache(filter.as_str());
            } else {
                self.wild.fetch_add(1, Ordering::SeqCst);
            }
        }
        slot.push(item, group.map(Arc::new));
    }

    /// Removes one entry equal to `item` under `filter`, pruning the slot and nodes left empty.
    ///
    /// Returns whether an entry was found. Cost: a walk down the filter's tokens and a removal
    /// from its slot (a hash lookup in a crowded one), under the trie's write lock.
    pub fn remove(&self, filter: &Filter, item: &T) -> bool {
        let mut trie = self.trie.write();
        let trie = &mut *trie;
        let tokens: Vec<&str> = filter.tokens().collect();
        let mut pruned = 0;
        let mut emptied = false;
        let found = remove_at(&mut trie.root, &tokens, item, &mut pruned, &mut emptied);
        trie.nodes -= pruned;
        if found {
            trie.subscriptions -= 1;
        }
        if emptied && filter.is_literal() {
            // Not needed for correctness (a result holding the emptied slot delivers nothing,
            // and a new slot for this filter would remove the entry), but it frees the memory.
            self.uncache(filter.as_str());
        }
        found
    }

    fn uncache(&self, topic: &str) {
        let mut cache = self.cache.write();
        if let Some(old) = cache.map.remove(topic) {
            let cost = entry_cost(topic, old.result.slots.len());
            cache.bytes -= cost;
            self.budget.credit(cost);
        }
    }

    /// A number that changes whenever the trie's shape changes (a filter gains its first
    /// subscription). A result obtained while it had some value stays current for as long as it
    /// keeps that value: subscriptions joining or leaving existing filters change the slots the
    /// result already holds.
    pub fn generation(&self) -> u64 {
        self.structure.load(Ordering::Acquire)
    }

    /// The cached result for `topic`, if it is cached and current. Only topics once passed to
    /// [`Sublist::matches`] are ever cached, so a caller that validates topics before matching
    /// may skip validating a topic found here.
    pub fn cached(&self, topic: &str) -> Option<Matches<T>> {
        let wild = self.wild.load(Ordering::Acquire);
        let r = self
            .cache
            .read()
            .map
            .get(topic)
            .filter(|c| c.wild == wild)
            .map(|c| c.result.clone());
        if r.is_some() {
            self.hits.fetch_add(1, Ordering::Relaxed);
        }
        r
    }

    /// The slots whose filters match `topic`, walked without the cache and left out of it:
    /// for the broker's own rare publications (events on reserved topics), which must neither
    /// evict what clients publish nor sit in a cache that only holds checked client topics.
    pub fn matches_uncached(&self, topic: &str) -> Matches<T> {
        let mut slots = Vec::new();
        let tokens: Vec<&str> = topic.split('.').collect();
        collect(&self.trie.read().root, &tokens, &mut slots, &mut 0);
        Arc::new(MatchResult {
            slots: slots.into_boxed_slice(),
        })
    }

    /// The slots whose filters match `topic` (a valid topic).
    pub fn matches(&self, topic: &str) -> Matches<T> {
        self.lookup(topic, &mut 0)
    }

    /// [`Sublist::matches`], adding to `work` the trie positions a miss visited (a hit adds
    /// nothing), so that a caller can account for expensive lookups.
    ///
    /// A miss visits at most one position per distinct filter prefix that the topic's tokens
    /// can reach: with `k` wildcard positions on its way that is up to `2^k` paths, bounded by
    /// the trie's size. It holds the trie's read lock for that walk, then the cache's write lock
    /// for one insert (and, when the cache is full, one eviction pass over it).
    pub fn lookup(&self, topic: &str, work: &mut usize) -> Matches<T> {
        if let Some(r) = self.cached(topic) {
            return r;
        }
        let mut slots = Vec::new();
        let trie = self.trie.read();
        let structure = self.structure.load(Ordering::Acquire);
        let wild = self.wild.load(Ordering::Acquire);
        let tokens: Vec<&str> = topic.split('.').collect();
        collect(&trie.root, &tokens, &mut slots, work);
        drop(trie);
        self.misses.fetch_add(1, Ordering::Relaxed);
        let cost = entry_cost(topic, slots.len());
        let result = Arc::new(MatchResult {
            slots: slots.into_boxed_slice(),
        });
        // A result larger than an eighth of the budget would evict most of the cache for one
        // topic: it is used for this publish only.
        if self.max_entries > 0 && cost <= self.max_bytes / 8 {
            let mut cache = self.cache.write();
            // A slot created in between would be missing from this result.
            if self.structure.load(Ordering::Acquire) == structure {
                let before = cache.bytes;
                if let Some(old) = cache.map.remove(topic) {
                    cache.bytes -= entry_cost(topic, old.result.slots.len());
                }
                if cache.map.len() >= self.max_entries || cache.bytes + cost > self.max_bytes {
                    evict(&mut cache, self.max_entries, self.max_bytes - cost, wild);
                }
                cache.bytes += cost;
                self.budget.adjust(before, cache.bytes);
                cache.map.insert(
                    topic.into(),
                    Cached {
                        result: result.clone(),
                        wild,
                    },
                );
            }
        }
        result
    }

    /// Bytes the match cache holds now, by the estimate it is bounded by.
    pub fn cache_bytes(&self) -> usize {
        self.cache.read().bytes
    }

    /// Current statistics.
    pub fn stats(&self) -> SublistStats {
        let (subscriptions, nodes) = {
            let t = self.trie.read();
            (t.subscriptions, t.nodes)
        };
        let (cache_entries, cache_bytes) = {
            let c = self.cache.read();
            (c.map.len(), c.bytes)
        };
        SublistStats {
            subscriptions,
            nodes,
            cache_entries,
            cache_bytes,
            cache_hits: self.hits.load(Ordering::Relaxed),
            cache_misses: self.misses.load(Ordering::Relaxed),
        }
    }
}

/// Frees room for one more entry: every stale entry, then an eighth of the capacity (at least
/// one entry) in the table's own order, and more until the bytes fit `max_bytes`. One pass.
fn evict<T>(cache: &mut Cache<T>, max_entries: usize, max_bytes: usize, wild: u64) {
    let mut n = (max_entries / 8).max(1);
    let mut bytes = cache.bytes;
    cache.map.retain(|topic, c| {
        if c.wild != wild || n > 0 || bytes > max_bytes {
            n = n.saturating_sub(1);
            bytes -= entry_cost(topic, c.result.slots.len());
            false
        } else {
            true
        }
    });
    cache.bytes = bytes;
}

fn collect<T>(node: &Node<T>, tokens: &[&str], out: &mut Vec<Arc<Slot<T>>>, work: &mut usize) {
    *work += 1;
    let Some((first, rest)) = tokens.split_first() else {
        out.extend(node.here.iter().cloned());
        return;
    };
    out.extend(node.tail.iter().cloned());
    match node.literal.as_ref().and_then(|m| m.get(*first)) {
        Some(Child::Node(child)) => collect(child, rest, out, work),
        Some(Child::Leaf(s)) if rest.is_empty() => out.push(s.clone()),
        Some(Child::Leaf(_)) | None => {}
    }
    if let Some(star) = &node.star {
        collect(star, rest, out, work);
    }
}

/// The slot for the filter `tokens` (its final `>` removed, `tail` telling whether it had one)
/// below `node`, created if needed (then `true`), counting the positions it creates in `nodes`.
fn slot_for<T: Clone + Eq + Hash>(
    node: &mut Node<T>,
    tokens: &[&str],
    tail: bool,
    nodes: &mut usize,
) -> (Arc<Slot<T>>, bool) {
    let Some((token, rest)) = tokens.split_first() else {
        let place = if tail { &mut node.tail } else { &mut node.here };
        if let Some(s) = place {
            return (s.clone(), false);
        }
        let s = Arc::new(Slot::new());
        *place = Some(s.clone());
        return (s, true);
    };
    if *token == "*" {
        if node.star.is_none() {
            *nodes += 1;
        }
        let star = node.star.get_or_insert_with(Box::default);
        return slot_for(star, rest, tail, nodes);
    }
    let children = node.literal.get_or_insert_with(Box::default);
    let ends_here = rest.is_empty() && !tail;
    if !children.contains_key(*token) {
        *nodes += 1;
        if ends_here {
            let s = Arc::new(Slot::new());
            children.insert((*token).into(), Child::Leaf(s.clone()));
            return (s, true);
        }
        children.insert((*token).into(), Child::Node(Box::default()));
    }
    let Some(child) = children.get_mut(*token) else {
        unreachable!("inserted above")
    };
    if let (Child::Leaf(s), true) = (&*child, ends_here) {
        return (s.clone(), false);
    }
    child.make_node();
    match child {
        Child::Node(n) => slot_for(n, rest, tail, nodes),
        Child::Leaf(_) => unreachable!("made a node above"),
    }
}

/// Removes one `item` from the slot of the filter `tokens` below `node`, pruning the slot if it
/// is left empty (then `emptied`) and every node left empty (counted in `pruned`).
fn remove_at<T: Clone + Eq + Hash>(
    node: &mut Node<T>,
    tokens: &[&str],
    item: &T,
    pruned: &mut usize,
    emptied: &mut bool,
) -> bool {
    let take = |place: &mut Option<Arc<Slot<T>>>, emptied: &mut bool| {
        let Some(s) = place else {
            return false;
        };
        let (found, empty) = s.remove(item);
        if empty {
            *place = None;
            *emptied = true;
        }
        found
    };
    match tokens.split_first() {
        None => take(&mut node.here, emptied),
        Some((&">", _)) => take(&mut node.tail, emptied),
        Some((&"*", rest)) => {
            let Some(star) = node.star.as_mut() else {
                return false;
            };
            let found = remove_at(star, rest, item, pruned, emptied);
            if star.is_empty() {
                node.star = None;
                *pruned += 1;
            }
            found
        }
        Some((token, rest)) => {
            let Some(children) = node.literal.as_mut() else {
                return false;
            };
            let (found, empty) = match children.get_mut(*token) {
                None => return false,
                Some(Child::Leaf(_)) if !rest.is_empty() => return false,
                Some(Child::Leaf(s)) => {
                    let (found, empty) = s.remove(item);
                    *emptied |= empty;
                    (found, empty)
                }
                Some(Child::Node(child)) => {
                    let found = remove_at(child, rest, item, pruned, emptied);
                    (found, child.is_empty())
                }
            };
            if empty {
                children.remove(*token);
                *pruned += 1;
                if children.is_empty() {
                    node.literal = None;
                }
            }
            found
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn f(s: &str) -> Filter {
        Filter::new(s).unwrap()
    }

    fn sorted(r: Matches<u32>) -> Vec<u32> {
        let mut v = r.all();
        v.sort();
        v
    }

    fn both(test: impl Fn(Sublist<u32>)) {
        test(Sublist::new(0));
        test(Sublist::new(1024));
    }

    /// Plain members, and each group's members, merged across the result's slots and sorted.
    fn split(r: &MatchResult<u32>) -> (Vec<u32>, Vec<(String, Vec<u32>)>) {
        let mut plain = Vec::new();
        let mut groups: std::collections::BTreeMap<String, Vec<u32>> = Default::default();
        for s in r.slots() {
            s.with_view(|v| {
                plain.extend(v.plain.iter().copied());
                for g in v.groups.iter() {
                    groups
                        .entry(g.name.to_string())
                        .or_default()
                        .extend(g.members.iter().copied());
                }
            });
        }
        plain.sort();
        let groups = groups
            .into_iter()
            .map(|(n, mut m)| {
                m.sort();
                (n, m)
            })
            .collect();
        (plain, groups)
    }

    #[test]
    fn a_node_is_eight_words_and_a_slot_fits_a_cache_line() {
        // Per-subscription memory depends on it (docs/performance.md).
        assert!(std::mem::size_of::<Node<Arc<u8>>>() <= 64);
        assert!(std::mem::size_of::<Slot<Arc<u8>>>() + 16 <= 64);
    }

    #[test]
    fn a_slot_version_moves_with_every_change() {
        let s = Sublist::new(16);
        s.insert(&f("a.*"), 1);
        let r = s.matches("a.b");
        let slot = &r.slots()[0];
        let (v1, view1) = slot.view();
        assert_eq!(slot.version(), v1);
        assert_eq!(&*view1.plain, &[1]);
        s.insert(&f("a.*"), 2);
        assert_ne!(slot.version(), v1);
        let (v2, view2) = slot.view();
        assert_eq!(view2.len(), 2);
        assert!(s.remove(&f("a.*"), &1));
        assert_ne!(slot.version(), v2);
    }

    #[test]
    fn literal_star_and_tail() {
        both(|s| {
            s.insert(&f("user.created"), 1);
            s.insert(&f("user.*"), 2);
            s.insert(&f("user.>"), 3);
            s.insert(&f("*.error"), 4);
            s.insert(&f(">"), 5);
            assert_eq!(sorted(s.matches("user.created")), vec![1, 2, 3, 5]);
            assert_eq!(sorted(s.matches("user.created.eu")), vec![3, 5]);
            assert_eq!(sorted(s.matches("api.error")), vec![4, 5]);
            assert_eq!(sorted(s.matches("user")), vec![5]);
            assert_eq!(sorted(s.matches("system.startup")), vec![5]);
        });
    }

    #[test]
    fn remove_prunes_and_cached_results_follow() {
        both(|s| {
            s.insert(&f("a.b.c"), 1);
            s.insert(&f("a.*.c"), 2);
            assert_eq!(sorted(s.matches("a.b.c")), vec![1, 2]);
            assert!(s.remove(&f("a.b.c"), &1));
            assert!(!s.remove(&f("a.b.c"), &1));
            assert_eq!(sorted(s.matches("a.b.c")), vec![2]);
            assert!(s.remove(&f("a.*.c"), &2));
            assert!(s.matches("a.b.c").is_empty());
            assert_eq!(s.stats().nodes, 0);
            assert_eq!(s.stats().subscriptions, 0);
        });
    }

    #[test]
    fn joining_an_existing_filter_keeps_every_cached_result() {
        let s = Sublist::new(16);
        s.insert(&f("x.*"), 1);
        let before = s.matches("x.y");
        assert_eq!(sorted(s.matches("q.r")), Vec::<u32>::new());
        let generation = s.generation();
        s.insert(&f("x.*"), 2);
        assert_eq!(s.generation(), generation, "no slot was created");
        // The result handed out before the change sees it: it holds the slot, not a copy.
        assert_eq!(sorted(before.clone()), vec![1, 2]);
        assert_eq!(sorted(s.matches("x.y")), vec![1, 2]);
        assert_eq!(s.stats().cache_entries, 2);
        assert_eq!(s.stats().cache_misses, 2);
        assert!(s.remove(&f("x.*"), &1));
        assert_eq!(sorted(before), vec![2]);
        assert_eq!(s.stats().cache_misses, 2);
    }

    #[test]
    fn a_new_wildcard_filter_makes_cached_results_stale_at_once() {
        let s = Sublist::new(16);
        s.insert(&f("x.y"), 1);
        assert_eq!(sorted(s.matches("x.y")), vec![1]);
        assert_eq!(sorted(s.matches("q.r")), Vec::<u32>::new());
        s.insert(&f("*.*"), 2);
        assert_eq!(sorted(s.matches("x.y")), vec![1, 2]);
        assert_eq!(sorted(s.matches("q.r")), vec![2]);
        // A new literal filter removes only its own topic.
        s.insert(&f("q.r"), 3);
        let hits = s.stats().cache_hits;
        assert_eq!(sorted(s.matches("x.y")), vec![1, 2]);
        assert_eq!(s.stats().cache_hits, hits + 1);
        assert_eq!(sorted(s.matches("q.r")), vec![2, 3]);
    }

    #[test]
    fn duplicate_items_are_counted_separately() {
        both(|s| {
            s.insert(&f("a"), 7);
            s.insert(&f("a"), 7);
            assert_eq!(sorted(s.matches("a")), vec![7, 7]);
            s.remove(&f("a"), &7);
            assert_eq!(sorted(s.matches("a")), vec![7]);
        });
    }

    #[test]
    fn a_crowd_in_one_slot_is_indexed_and_leaves_cleanly() {
        both(|s| {
            let n = 10 * INDEX_AT as u32;
            for i in 0..n {
                s.insert(&f("alerts.>"), i);
            }
            s.insert(&f("alerts.>"), 0);
            let r = s.matches("alerts.disk");
            assert_eq!(r.len(), n as usize + 1);
            for i in (0..n).rev() {
                assert!(s.remove(&f("alerts.>"), &i));
            }
            assert_eq!(sorted(r), vec![0]);
            assert!(s.remove(&f("alerts.>"), &0));
            assert!(!s.remove(&f("alerts.>"), &0));
            assert!(s.matches("alerts.disk").is_empty());
            assert_eq!((s.stats().subscriptions, s.stats().nodes), (0, 0));
        });
    }

    #[test]
    fn cache_is_bounded_in_entries() {
        let s = Sublist::new(8);
        s.insert(&f(">"), 1);
        for i in 0..100 {
            assert_eq!(s.matches(&format!("t.{i}")).all().len(), 1);
        }
        assert!(s.stats().cache_entries <= 8);
    }

    #[test]
    fn cache_is_bounded_in_bytes() {
        // Results reaching 100 slots each: about 900 bytes per cached topic.
        let s = Sublist::with_cache_limits(1_000_000, 64 * 1024);
        for i in 0..100 {
            s.insert(&f(&format!("*.*.{i}.>")), i);
            s.insert(&f(&format!("t.*.*.{i}")), i);
        }
        let mut work = 0;
        for i in 0..1_000 {
            let r = s.lookup(&format!("t.{i}.{}.{}", i % 100, i % 100), &mut work);
            assert_eq!(r.slots().len(), 2);
        }
        let st = s.stats();
        assert!(st.cache_bytes <= 64 * 1024, "{st:?}");
        assert!(st.cache_entries > 10, "{st:?}");
        assert!(work > 1_000);
    }

    #[test]
    fn a_result_too_large_for_the_cache_is_not_cached() {
        let s = Sublist::with_cache_limits(1024, 8 * 1024);
        // 256 distinct filters, each token `t` or `*`, all matching one topic.
        for i in 0..256u32 {
            let t: Vec<&str> = (0..8)
                .map(|k| if (i >> k) & 1 == 1 { "*" } else { "t" })
                .collect();
            s.insert(&f(&t.join(".")), i);
        }
        assert_eq!(s.matches("t.t.t.t.t.t.t.t").len(), 256);
        assert_eq!(s.stats().cache_entries, 0);
    }

    #[test]
    fn groups_are_kept_apart_and_merged_across_filters() {
        for cap in [0, 16] {
            let s = Sublist::new(cap);
            let w: Arc<str> = "workers".into();
            s.insert(&f("jobs.resize"), 1);
            s.insert_grouped(&f("jobs.resize"), Some(w.clone()), 2);
            s.insert_grouped(&f("jobs.*"), Some(w.clone()), 3);
            s.insert_grouped(&f("jobs.>"), Some("auditors".into()), 4);
            let (plain, groups) = split(&s.matches("jobs.resize"));
            assert_eq!(plain, vec![1]);
            assert_eq!(
                groups,
                vec![("auditors".into(), vec![4]), ("workers".into(), vec![2, 3])]
            );
            // Removing a member changes the cached result; the emptied group disappears.
            assert!(s.remove(&f("jobs.>"), &4));
            assert_eq!(split(&s.matches("jobs.resize")).1.len(), 1);
            assert!(s.remove(&f("jobs.resize"), &2));
            assert!(s.remove(&f("jobs.*"), &3));
            let (plain, groups) = split(&s.matches("jobs.resize"));
            assert!(groups.is_empty());
            assert_eq!(plain, vec![1]);
        }
    }
}
