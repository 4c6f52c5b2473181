//! The subscription trie and its match cache.
//!
//! Filters are stored token by token; each node has a slot for literal children (a B-tree by
//! token), one for `*` and a list for subscriptions ending in `>`, so matching a topic is one walk
//! that never scans filters linearly. A position where one filter ends with nothing below it is
//! held in its parent's slot rather than in a node of its own: with distinct filters, most are. Queue-group subscriptions live in the same nodes, tagged with their group, so plain
//! and grouped subscriptions are found by the same walk; the result keeps them apart
//! ([`MatchResult`]). Results are cached per topic in a bounded map. A subscribe or unsubscribe
//! updates only the cached results whose topic its filter matches, copying those results (readers
//! holding an older `Arc` keep a consistent snapshot); it never flushes the cache wholesale.
//!
//! Called by connection reader tasks (match on publish, insert on subscribe, remove on unsubscribe
//! and disconnect). Runtime-free; the one lock here is a leaf (see `docs/architecture.md`).

use foldhash::fast::RandomState;
use parking_lot::RwLock;
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use brokerd_proto::Filter;

/// A shared, immutable match result.
pub type Matches<T> = Arc<MatchResult<T>>;

/// The subscriptions matching one topic: each plain one receives the message; each queue group
/// receives it once, through one of its members.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MatchResult<T> {
    /// Plain subscriptions.
    pub plain: Vec<T>,
    /// Queue groups, each with the members whose filter matched.
    pub groups: Vec<Group<T>>,
}

/// The matching members of one queue group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Group<T> {
    /// The group's name.
    pub name: Arc<str>,
    /// Its members whose filter matched; never empty.
    pub members: Vec<T>,
}

impl<T> Default for MatchResult<T> {
    fn default() -> Self {
        MatchResult {
            plain: Vec::new(),
            groups: Vec::new(),
        }
    }
}

impl<T: Clone + PartialEq> MatchResult<T> {
    /// Whether nothing matched.
    pub fn is_empty(&self) -> bool {
        self.plain.is_empty() && self.groups.is_empty()
    }

    /// How many subscriptions matched, plain and grouped.
    pub fn len(&self) -> usize {
        self.plain.len() + self.groups.iter().map(|g| g.members.len()).sum::<usize>()
    }

    /// Every matching subscription, plain and grouped.
    pub fn all(&self) -> Vec<T> {
        let mut v = self.plain.clone();
        for g in &self.groups {
            v.extend(g.members.iter().cloned());
        }
        v
    }

    fn add(&mut self, group: Option<&Arc<str>>, item: T) {
        match group {
            None => self.plain.push(item),
            Some(name) => match self.groups.iter_mut().find(|g| &g.name == name) {
                Some(g) => g.members.push(item),
                None => self.groups.push(Group {
                    name: name.clone(),
                    members: vec![item],
                }),
            },
        }
    }

    fn remove(&mut self, item: &T) {
        if let Some(i) = self.plain.iter().position(|x| x == item) {
            self.plain.remove(i);
            return;
        }
        for g in &mut self.groups {
            if let Some(i) = g.members.iter().position(|x| x == item) {
                g.members.remove(i);
                break;
            }
        }
        self.groups.retain(|g| !g.members.is_empty());
    }
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
    /// Lookups answered from the cache.
    pub cache_hits: u64,
    /// Lookups that walked the trie.
    pub cache_misses: u64,
}

/// One stored subscription and its queue group, if any. The group's name sits behind a thin
/// pointer so that an entry is two words: most subscriptions have no group.
struct Entry<T> {
    item: T,
    group: Option<Arc<Arc<str>>>,
}

/// The entries of one slot of a node. Nearly every filter is held by one subscription, so one
/// entry is stored inline and a list is allocated only for a second: three words in all, where a
/// `Vec` would add a heap block of four entries to every subscribed node.
enum Entries<T> {
    Empty,
    One(Entry<T>),
    Many(Vec<Entry<T>>),
}

impl<T: PartialEq> Entries<T> {
    fn is_empty(&self) -> bool {
        match self {
            Entries::Empty => true,
            Entries::One(_) => false,
            Entries::Many(v) => v.is_empty(),
        }
    }

    fn push(&mut self, e: Entry<T>) {
        match std::mem::replace(self, Entries::Empty) {
            Entries::Empty => *self = Entries::One(e),
            Entries::One(first) => *self = Entries::Many(vec![first, e]),
            Entries::Many(mut v) => {
                v.push(e);
                *self = Entries::Many(v);
            }
        }
    }

    fn as_slice(&self) -> &[Entry<T>] {
        match self {
            Entries::Empty => &[],
            Entries::One(e) => std::slice::from_ref(e),
            Entries::Many(v) => v,
        }
    }

    /// Removes the entry holding `item`; whether there was one.
    fn remove(&mut self, item: &T) -> bool {
        match self {
            Entries::Empty => false,
            Entries::One(e) if &e.item == item => {
                *self = Entries::Empty;
                true
            }
            Entries::One(_) => false,
            Entries::Many(v) => match v.iter().position(|x| &x.item == item) {
                Some(i) => {
                    v.swap_remove(i);
                    if v.is_empty() {
                        *self = Entries::Empty;
                    }
                    true
                }
                None => false,
            },
        }
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
    /// A position where exactly one subscription's filter ends, with nothing below it: the
    /// commonest position in a table of distinct filters, held in the parent's slot (two words)
    /// instead of a node of its own. It becomes a `Node` when anything else arrives there.
    Leaf(Entry<T>),
    /// Anything else, boxed so a wide parent's table holds a pointer per child.
    Node(Box<Node<T>>),
}

impl<T: PartialEq> Child<T> {
    /// Turns a leaf into a node holding its entry, so that more can be added.
    fn make_node(&mut self) {
        if matches!(self, Child::Leaf(_))
            && let Child::Leaf(e) = std::mem::replace(self, Child::Node(Box::default()))
            && let Child::Node(n) = self
        {
            n.here = Entries::One(e);
        }
    }
}

struct Node<T> {
    /// Literal children, absent on nodes without any, which then cost no table at all.
    literal: Option<Box<Children<T>>>,
    star: Option<Box<Node<T>>>,
    /// Subscriptions whose filter ends here exactly.
    here: Entries<T>,
    /// Subscriptions whose filter ends with `>` after this node.
    tail: Entries<T>,
}

impl<T> Default for Node<T> {
    fn default() -> Self {
        Node {
            literal: None,
            star: None,
            here: Entries::Empty,
            tail: Entries::Empty,
        }
    }
}

impl<T: PartialEq> Node<T> {
    fn is_empty(&self) -> bool {
        self.literal.as_ref().is_none_or(|m| m.is_empty())
            && self.star.is_none()
            && self.here.is_empty()
            && self.tail.is_empty()
    }
}

struct Inner<T> {
    root: Node<T>,
    subscriptions: usize,
    nodes: usize,
    /// Bumped by every insert and remove, so a result computed under an older trie is not cached.
    generation: u64,
    cache: Map<Matches<T>>,
}

/// A subscription trie with a bounded match cache.
///
/// `T` is the subscription handle; two handles are the same subscription when they compare equal.
pub struct Sublist<T> {
    inner: RwLock<Inner<T>>,
    /// `Inner::generation`, readable without the lock: stored after every change, under it.
    generation: AtomicU64,
    cache_capacity: usize,
    hits: AtomicU64,
    misses: AtomicU64,
}

impl<T: Clone + PartialEq> Sublist<T> {
    /// An empty sublist caching up to `cache_capacity` topics (0 disables the cache).
    pub fn new(cache_capacity: usize) -> Sublist<T> {
        Sublist {
            inner: RwLock::new(Inner {
                root: Node::default(),
                subscriptions: 0,
                nodes: 0,
                generation: 0,
                cache: Map::default(),
            }),
            generation: AtomicU64::new(0),
            cache_capacity,
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
        }
    }

    /// Adds a plain subscription `item` under `filter`.
    pub fn insert(&self, filter: &Filter, item: T) {
        self.insert_grouped(filter, None, item);
    }

    /// Adds `item` under `filter`, as a member of queue group `group` when given.
    pub fn insert_grouped(&self, filter: &Filter, group: Option<Arc<str>>, item: T) {
        let mut g = self.inner.write();
        let inner = &mut *g;
        let mut tokens: Vec<&str> = filter.tokens().collect();
        let tail = tokens.last() == Some(&">");
        if tail {
            tokens.pop();
        }
        let entry = Entry {
            item: item.clone(),
            group: group.clone().map(Arc::new),
        };
        insert_at(&mut inner.root, &tokens, tail, entry, &mut inner.nodes);
        inner.subscriptions += 1;
        inner.generation += 1;
        self.generation.store(inner.generation, Ordering::Release);
        patch_cache(&mut inner.cache, filter, |r| {
            r.add(group.as_ref(), item.clone())
        });
    }

    /// Removes one entry equal to `item` under `filter`, pruning nodes left empty.
    ///
    /// Returns whether an entry was found.
    pub fn remove(&self, filter: &Filter, item: &T) -> bool {
        let mut g = self.inner.write();
        let inner = &mut *g;
        let tokens: Vec<&str> = filter.tokens().collect();
        let mut pruned = 0;
        let found = remove_at(&mut inner.root, &tokens, item, &mut pruned);
        inner.nodes -= pruned;
        if !found {
            return false;
        }
        inner.subscriptions -= 1;
        inner.generation += 1;
        self.generation.store(inner.generation, Ordering::Release);
        patch_cache(&mut inner.cache, filter, |r| r.remove(item));
        true
    }

    /// A number that changes whenever a subscription is added or removed. A result obtained while
    /// it had some value is current for as long as it keeps that value.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// The cached result for `topic`, if it is cached. Only topics once passed to
    /// [`Sublist::matches`] are ever cached, so a caller that validates topics before matching may
    /// skip validating a topic found here.
    pub fn cached(&self, topic: &str) -> Option<Matches<T>> {
        let r = self.inner.read().cache.get(topic).cloned();
        if r.is_some() {
            self.hits.fetch_add(1, Ordering::Relaxed);
        }
        r
    }

    /// Every entry whose filter matches `topic` (a valid topic), in no particular order.
    pub fn matches(&self, topic: &str) -> Matches<T> {
        let g = self.inner.read();
        if let Some(r) = g.cache.get(topic) {
            self.hits.fetch_add(1, Ordering::Relaxed);
            return r.clone();
        }
        let mut out = MatchResult::default();
        let tokens: Vec<&str> = topic.split('.').collect();
        collect(&g.root, &tokens, &mut out);
        let generation = g.generation;
        drop(g);
        self.misses.fetch_add(1, Ordering::Relaxed);
        let result = Arc::new(out);
        if self.cache_capacity > 0 {
            let mut w = self.inner.write();
            // A subscribe or unsubscribe in between would not have patched this result.
            if w.generation == generation {
                if w.cache.len() >= self.cache_capacity {
                    evict(&mut w.cache, self.cache_capacity);
                }
                w.cache.insert(topic.into(), result.clone());
            }
        }
        result
    }

    /// Current statistics.
    pub fn stats(&self) -> SublistStats {
        let g = self.inner.read();
        SublistStats {
            subscriptions: g.subscriptions,
            nodes: g.nodes,
            cache_entries: g.cache.len(),
            cache_hits: self.hits.load(Ordering::Relaxed),
            cache_misses: self.misses.load(Ordering::Relaxed),
        }
    }
}

/// Applies `change` to a copy of every cached result whose topic `filter` matches. A filter
/// without wildcards matches exactly one topic, its own text, so it costs one lookup; a wildcard
/// filter is tested against every cached topic.
fn patch_cache<T: Clone + PartialEq>(
    cache: &mut Map<Matches<T>>,
    filter: &Filter,
    mut change: impl FnMut(&mut MatchResult<T>),
) {
    let mut patch = |result: &mut Matches<T>| {
        let mut r = MatchResult::clone(result);
        change(&mut r);
        *result = Arc::new(r);
    };
    if filter.is_literal() {
        if let Some(result) = cache.get_mut(filter.as_str()) {
            patch(result);
        }
        return;
    }
    for (topic, result) in cache.iter_mut() {
        if filter.matches(topic) {
            patch(result);
        }
    }
}

/// Frees an eighth of the cache (at least one entry), in the map's own order.
fn evict<T>(cache: &mut Map<Matches<T>>, capacity: usize) {
    let n = (capacity / 8).max(1);
    let victims: Vec<Box<str>> = cache.keys().take(n).cloned().collect();
    for k in victims {
        cache.remove(&k);
    }
}

fn collect<T: Clone + PartialEq>(node: &Node<T>, tokens: &[&str], out: &mut MatchResult<T>) {
    let add = |entries: &[Entry<T>], out: &mut MatchResult<T>| {
        for e in entries {
            out.add(e.group.as_deref(), e.item.clone());
        }
    };
    let Some((first, rest)) = tokens.split_first() else {
        add(node.here.as_slice(), out);
        return;
    };
    add(node.tail.as_slice(), out);
    match node.literal.as_ref().and_then(|m| m.get(*first)) {
        Some(Child::Node(child)) => collect(child, rest, out),
        Some(Child::Leaf(e)) if rest.is_empty() => add(std::slice::from_ref(e), out),
        Some(Child::Leaf(_)) | None => {}
    }
    if let Some(star) = &node.star {
        collect(star, rest, out);
    }
}

/// Adds `entry` for the filter `tokens` (its final `>` removed, `tail` telling whether it had one)
/// below `node`, counting the positions it creates in `nodes`.
fn insert_at<T: PartialEq>(
    node: &mut Node<T>,
    tokens: &[&str],
    tail: bool,
    entry: Entry<T>,
    nodes: &mut usize,
) {
    let Some((token, rest)) = tokens.split_first() else {
        if tail {
            node.tail.push(entry);
        } else {
            node.here.push(entry);
        }
        return;
    };
    if *token == "*" {
        if node.star.is_none() {
            *nodes += 1;
        }
        let star = node.star.get_or_insert_with(Box::default);
        insert_at(star, rest, tail, entry, nodes);
        return;
    }
    let children = node.literal.get_or_insert_with(Box::default);
    let ends_here = rest.is_empty() && !tail;
    let child = match children.get_mut(*token) {
        Some(child) => child,
        None if ends_here => {
            *nodes += 1;
            children.insert((*token).into(), Child::Leaf(entry));
            return;
        }
        None => {
            *nodes += 1;
            children
                .entry((*token).into())
                .or_insert_with(|| Child::Node(Box::default()))
        }
    };
    child.make_node();
    if let Child::Node(n) = child {
        insert_at(n, rest, tail, entry, nodes);
    }
}

fn remove_at<T: PartialEq>(
    node: &mut Node<T>,
    tokens: &[&str],
    item: &T,
    pruned: &mut usize,
) -> bool {
    match tokens.split_first() {
        None => node.here.remove(item),
        Some((&">", _)) => node.tail.remove(item),
        Some((&"*", rest)) => {
            let Some(star) = node.star.as_mut() else {
                return false;
            };
            let found = remove_at(star, rest, item, pruned);
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
                Some(Child::Leaf(e)) => {
                    let found = rest.is_empty() && &e.item == item;
                    (found, found)
                }
                Some(Child::Node(child)) => {
                    let found = remove_at(child, rest, item, pruned);
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

    #[test]
    fn a_node_is_eight_words_with_its_entries_inline() {
        // Per-subscription memory depends on it (docs/performance.md): a node with one entry in
        // each slot allocates nothing besides itself.
        assert!(std::mem::size_of::<Node<Arc<u8>>>() <= 64);
        assert!(std::mem::size_of::<Entries<Arc<u8>>>() <= 24);
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
    fn remove_prunes_and_updates_cached_results() {
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
    fn insert_updates_cached_results_without_flushing_others() {
        let s = Sublist::new(16);
        s.insert(&f("x.y"), 1);
        assert_eq!(sorted(s.matches("x.y")), vec![1]);
        assert_eq!(sorted(s.matches("q.r")), Vec::<u32>::new());
        s.insert(&f("x.*"), 2);
        let st = s.stats();
        assert_eq!(st.cache_entries, 2);
        assert_eq!(sorted(s.matches("x.y")), vec![1, 2]);
        assert_eq!(sorted(s.matches("q.r")), Vec::<u32>::new());
        assert_eq!(s.stats().cache_hits, 2);
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
    fn cache_is_bounded() {
        let s = Sublist::new(8);
        s.insert(&f(">"), 1);
        for i in 0..100 {
            assert_eq!(s.matches(&format!("t.{i}")).all().len(), 1);
        }
        assert!(s.stats().cache_entries <= 8);
    }
}

#[cfg(test)]
mod group_tests {
    use super::*;

    fn f(s: &str) -> Filter {
        Filter::new(s).unwrap()
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
            let r = s.matches("jobs.resize");
            assert_eq!(r.plain, vec![1]);
            let mut groups: Vec<(String, Vec<u32>)> = r
                .groups
                .iter()
                .map(|g| {
                    let mut m = g.members.clone();
                    m.sort();
                    (g.name.to_string(), m)
                })
                .collect();
            groups.sort();
            assert_eq!(
                groups,
                vec![("auditors".into(), vec![4]), ("workers".into(), vec![2, 3])]
            );
            // Removing a member patches the cached result; the emptied group disappears.
            assert!(s.remove(&f("jobs.>"), &4));
            assert_eq!(s.matches("jobs.resize").groups.len(), 1);
            assert!(s.remove(&f("jobs.resize"), &2));
            assert!(s.remove(&f("jobs.*"), &3));
            let r = s.matches("jobs.resize");
            assert!(r.groups.is_empty());
            assert_eq!(r.plain, vec![1]);
        }
    }
}
