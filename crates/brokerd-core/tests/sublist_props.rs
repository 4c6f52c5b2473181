//! Property test: the `Sublist` trie and its match cache agree with a naive matcher.
//!
//! Covers random interleavings of insert, remove and match over filters and topics drawn from a
//! three-token alphabet (so `*`, `>` and literal matches are frequent), run side by side on a
//! sublist with no cache, a tiny cache (constant eviction) and a large one. After every operation
//! the node count must equal the number of distinct filter prefixes alive; after removing
//! everything, the stats show no subscriptions and no nodes and every cached topic matches nothing.
//! The reference is a recursive matcher written here, not `Filter::matches` (which the sublist
//! does not use).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use brokerd_core::Sublist;
use brokerd_proto::Filter;
use proptest::prelude::*;
use std::collections::BTreeSet;

/// Cache capacities every sequence runs against: off, tiny, and larger than the topic space.
const CAPACITIES: [usize; 3] = [0, 4, 1024];

/// Whether `filter` matches `topic`, token by token: `*` takes exactly one token, a final `>`
/// takes one or more.
fn naive(filter: &[&str], topic: &[&str]) -> bool {
    match (filter, topic) {
        ([], []) => true,
        ([">"], [_, ..]) => true,
        (["*", f @ ..], [_, t @ ..]) => naive(f, t),
        ([a, f @ ..], [b, t @ ..]) => a == b && naive(f, t),
        _ => false,
    }
}

fn tokens(s: &str) -> Vec<&str> {
    s.split('.').collect()
}

#[derive(Debug, Clone)]
enum Op {
    /// Insert this filter under a fresh id, or under the id of a live entry (a duplicate item).
    Insert {
        filter: String,
        reuse: Option<usize>,
    },
    /// Remove the live entry at this index (modulo the number alive).
    Remove(usize),
    /// Remove an entry that is not there: a live id under a filter it was not inserted with.
    RemoveAbsent { filter: String, pick: usize },
    /// Match a topic.
    Match(String),
}

fn token() -> impl Strategy<Value = &'static str> {
    prop::sample::select(vec!["a", "b", "c"])
}

fn topic() -> impl Strategy<Value = String> {
    prop::collection::vec(token(), 1..=4).prop_map(|t| t.join("."))
}

fn filter() -> impl Strategy<Value = String> {
    let tok = prop_oneof![3 => token(), 1 => Just("*")];
    (prop::collection::vec(tok, 0..=4), any::<bool>()).prop_filter_map(
        "a filter has at least one token",
        |(mut t, tail)| {
            if tail {
                t.push(">");
            }
            (!t.is_empty()).then(|| t.join("."))
        },
    )
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (filter(), prop::option::weighted(0.2, any::<usize>()))
            .prop_map(|(filter, reuse)| Op::Insert { filter, reuse }),
        2 => any::<usize>().prop_map(Op::Remove),
        1 => (filter(), any::<usize>()).prop_map(|(filter, pick)| Op::RemoveAbsent { filter, pick }),
        5 => topic().prop_map(Op::Match),
    ]
}

/// Distinct trie paths the live filters need: every non-empty prefix, not counting a final `>`.
fn expected_nodes(live: &[(String, u32)]) -> usize {
    let mut prefixes = BTreeSet::new();
    for (f, _) in live {
        let t = tokens(f);
        let path = match t.split_last() {
            Some((&">", head)) => head,
            _ => &t[..],
        };
        for n in 1..=path.len() {
            prefixes.insert(path[..n].join("."));
        }
    }
    prefixes.len()
}

fn expected_matches(live: &[(String, u32)], topic: &str) -> Vec<u32> {
    let t = tokens(topic);
    let mut v: Vec<u32> = live
        .iter()
        .filter(|(f, _)| naive(&tokens(f), &t))
        .map(|(_, id)| *id)
        .collect();
    v.sort_unstable();
    v
}

fn sorted(r: &[u32]) -> Vec<u32> {
    let mut v = r.to_vec();
    v.sort_unstable();
    v
}

fn check_stats(lists: &[Sublist<u32>], live: &[(String, u32)], lookups: u64) {
    let nodes = expected_nodes(live);
    for (list, cap) in lists.iter().zip(CAPACITIES) {
        let st = list.stats();
        assert_eq!(st.subscriptions, live.len(), "cache {cap}");
        assert_eq!(st.nodes, nodes, "cache {cap}");
        assert!(
            st.cache_entries <= cap,
            "cache {cap}: {} entries",
            st.cache_entries
        );
        assert_eq!(st.cache_hits + st.cache_misses, lookups, "cache {cap}");
        if cap == 0 {
            assert_eq!(st.cache_hits, 0);
        }
    }
}

fn run(ops: Vec<Op>) {
    let lists: Vec<Sublist<u32>> = CAPACITIES.iter().map(|&c| Sublist::new(c)).collect();
    let mut live: Vec<(String, u32)> = Vec::new();
    let mut topics_seen: BTreeSet<String> = BTreeSet::new();
    let mut next_id = 0u32;
    let mut lookups = 0u64;

    for op in ops {
        match op {
            Op::Insert { filter, reuse } => {
                let id = match reuse {
                    Some(i) if !live.is_empty() => live[i % live.len()].1,
                    _ => {
                        next_id += 1;
                        next_id
                    }
                };
                let f = Filter::new(&filter).unwrap();
                for list in &lists {
                    list.insert(&f, id);
                }
                live.push((filter, id));
            }
            Op::Remove(i) => {
                if live.is_empty() {
                    continue;
                }
                let (filter, id) = live.remove(i % live.len());
                let f = Filter::new(&filter).unwrap();
                for (list, cap) in lists.iter().zip(CAPACITIES) {
                    assert!(list.remove(&f, &id), "cache {cap}: remove {filter} {id}");
                }
            }
            Op::RemoveAbsent { filter, pick } => {
                let id = if live.is_empty() {
                    u32::MAX
                } else {
                    live[pick % live.len()].1
                };
                if live.iter().any(|(f, i)| *f == filter && *i == id) {
                    continue;
                }
                let f = Filter::new(&filter).unwrap();
                for (list, cap) in lists.iter().zip(CAPACITIES) {
                    assert!(
                        !list.remove(&f, &id),
                        "cache {cap}: remove absent {filter} {id}"
                    );
                }
            }
            Op::Match(topic) => {
                let want = expected_matches(&live, &topic);
                for (list, cap) in lists.iter().zip(CAPACITIES) {
                    assert_eq!(
                        sorted(&list.matches(&topic).all()),
                        want,
                        "cache {cap}: topic {topic}, live {live:?}"
                    );
                }
                lookups += 1;
                topics_seen.insert(topic);
            }
        }
        check_stats(&lists, &live, lookups);
    }

    // Every cached result holds slots the removals emptied: it must match nothing any more.
    while let Some((filter, id)) = live.pop() {
        let f = Filter::new(&filter).unwrap();
        for list in &lists {
            assert!(list.remove(&f, &id));
        }
    }
    check_stats(&lists, &live, lookups);
    for topic in &topics_seen {
        for (list, cap) in lists.iter().zip(CAPACITIES) {
            assert!(list.matches(topic).is_empty(), "cache {cap}: topic {topic}");
        }
    }
    for (list, cap) in lists.iter().zip(CAPACITIES) {
        let st = list.stats();
        assert_eq!((st.subscriptions, st.nodes), (0, 0), "cache {cap}");
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn sublist_agrees_with_naive_matcher(ops in prop::collection::vec(op(), 1..200)) {
        run(ops);
    }
}

#[test]
fn naive_matcher_sanity() {
    let m = |f: &str, t: &str| naive(&tokens(f), &tokens(t));
    assert!(m("a.*", "a.b"));
    assert!(!m("a.*", "a"));
    assert!(!m("a.*", "a.b.c"));
    assert!(m("a.>", "a.b.c"));
    assert!(!m("a.>", "a"));
    assert!(m(">", "a"));
    assert!(m("*.>", "a.b"));
    assert!(!m("*.>", "a"));
    assert!(m("a.b", "a.b"));
    assert!(!m("a.b", "a.c"));
}

#[test]
fn a_fixed_interleaving() {
    run(vec![
        Op::Insert {
            filter: "a.*".into(),
            reuse: None,
        },
        Op::Match("a.b".into()),
        Op::Insert {
            filter: ">".into(),
            reuse: None,
        },
        Op::Match("a.b".into()),
        Op::Insert {
            filter: "a.b".into(),
            reuse: Some(0),
        },
        Op::Match("a.b".into()),
        Op::Remove(0),
        Op::Match("a.b".into()),
        Op::Match("c".into()),
        Op::RemoveAbsent {
            filter: "*.*".into(),
            pick: 0,
        },
    ]);
}
