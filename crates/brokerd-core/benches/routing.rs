//! Criterion benchmarks of the routing state on the publish path: sublist matching (exact and
//! wildcard topics; 1, 1,000 and 100,000 subscriptions; cache hit and miss), subscribe and
//! unsubscribe churn (with the match cache empty and full), and an outbox's push, take and
//! release cycle.
//!
//! Sublist entries are `Arc`s, as the broker's `SubRef`s are, so a match pays the same reference
//! counting. Run with `cargo bench -p brokerd-core`; measurement times are short so the suite
//! stays quick.

#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

use brokerd_core::{Item, Outbox, OutboxLimits, Sublist, Subscription};
use brokerd_proto::{Body, Filter, OverflowPolicy};
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use std::collections::VecDeque;
use std::hint::black_box;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

/// Subscription counts the match benchmarks run with.
const SUB_COUNTS: [usize; 3] = [1, 1_000, 100_000];

/// The broker's default match cache size.
const DEFAULT_CACHE: usize = 16_384;

/// How a benchmark's sublist is populated and which topic it looks up.
#[derive(Clone, Copy)]
enum Shape {
    /// `n` literal filters `bench.s<i>.x`; the topic matches exactly one of them.
    Exact,
    /// `n` filters `bench.*.s<i>` plus one `bench.>`; the topic matches one through `*` and the
    /// `>` one.
    Wildcard,
}

impl Shape {
    fn name(self) -> &'static str {
        match self {
            Shape::Exact => "exact",
            Shape::Wildcard => "wildcard",
        }
    }

    fn filter(self, i: usize) -> String {
        match self {
            Shape::Exact => format!("bench.s{i}.x"),
            Shape::Wildcard => format!("bench.*.s{i}"),
        }
    }

    fn topic(self) -> &'static str {
        match self {
            Shape::Exact => "bench.s0.x",
            Shape::Wildcard => "bench.x.s0",
        }
    }

    fn expected(self) -> usize {
        match self {
            Shape::Exact => 1,
            Shape::Wildcard => 2,
        }
    }
}

fn sublist(shape: Shape, n: usize, cache: usize) -> Sublist<Arc<u64>> {
    let s = Sublist::new(cache);
    for i in 0..n {
        s.insert(&Filter::new(&shape.filter(i)).unwrap(), Arc::new(i as u64));
    }
    if let Shape::Wildcard = shape {
        s.insert(&Filter::new("bench.>").unwrap(), Arc::new(u64::MAX));
    }
    s
}

fn matching(c: &mut Criterion) {
    let mut g = c.benchmark_group("sublist_match");
    g.throughput(Throughput::Elements(1));
    for shape in [Shape::Exact, Shape::Wildcard] {
        for n in SUB_COUNTS {
            // Hit: the default cache, warmed by one lookup. Miss: no cache, so every lookup walks
            // the trie (the cost a publish to a new topic pays, plus the cache fill below).
            for (cache, label) in [(DEFAULT_CACHE, "hit"), (0, "miss")] {
                let s = sublist(shape, n, cache);
                let topic = shape.topic();
                assert_eq!(s.matches(topic).len(), shape.expected());
                g.bench_with_input(
                    BenchmarkId::new(format!("{}/{label}", shape.name()), n),
                    &topic,
                    |b, topic| b.iter(|| s.matches(black_box(topic))),
                );
            }
        }
    }
    // A miss with the cache on: walk, then take the write lock and insert. Round-robin over
    // more topics than the cache holds, so (after the first pass) every lookup misses and
    // evicts.
    let s = sublist(Shape::Exact, 1_000, 1_024);
    let topics: Vec<String> = (0..4_096).map(|i| format!("bench.s{i}.x")).collect();
    let mut i = 0;
    g.bench_function("exact/miss_and_fill/1000", |b| {
        b.iter(|| {
            i = (i + 1) % topics.len();
            s.matches(black_box(&topics[i]))
        });
    });
    g.finish();
}

fn churn(c: &mut Criterion) {
    let mut g = c.benchmark_group("sublist_churn");
    g.throughput(Throughput::Elements(1));
    // Subscribe then unsubscribe one filter in a sublist of 1,000. With a full cache, each
    // change also patches every cached result its filter matches, after checking them all.
    for (cache, label) in [(0, "no_cache"), (DEFAULT_CACHE, "full_cache")] {
        let s = sublist(Shape::Exact, 1_000, cache);
        for i in 0..cache {
            s.matches(&format!("cached.t{i}"));
        }
        let filter = Filter::new("bench.churn.*").unwrap();
        let item = Arc::new(0u64);
        g.bench_function(format!("sub_unsub/{label}"), |b| {
            b.iter(|| {
                s.insert(black_box(&filter), item.clone());
                assert!(s.remove(black_box(&filter), &item));
            });
        });
    }
    g.finish();
}

fn outbox(c: &mut Criterion) {
    let mut g = c.benchmark_group("outbox");
    let limits = OutboxLimits {
        max_msgs: 65_536,
        max_bytes: 64 * 1024 * 1024,
        press: false,
    };
    let body = Body::encode("bench.pubsub", None, None, &[0u8; 16]);
    let mut cx = Context::from_waker(Waker::noop());
    // Pushes `per_take` deliveries, then takes and releases them as the writer would.
    for per_take in [1usize, 64, 1024] {
        let outbox = Arc::new(Outbox::new(1, OverflowPolicy::DropNew, limits));
        let sub = Subscription::new(
            1,
            Filter::new("bench.pubsub").unwrap(),
            None,
            outbox.clone(),
        );
        let mut batch = VecDeque::new();
        g.throughput(Throughput::Elements(per_take as u64));
        g.bench_with_input(
            BenchmarkId::new("push_take_release", per_take),
            &per_take,
            |b, &n| {
                b.iter(|| {
                    for _ in 0..n {
                        outbox.push_msg(&sub, black_box(&body));
                    }
                    assert!(matches!(
                        outbox.poll_take(&mut cx, &mut batch),
                        Poll::Ready(_)
                    ));
                    let mut bytes = 0;
                    let mut msgs = 0;
                    for item in batch.drain(..) {
                        if let Item::Msg { .. } = item {
                            msgs += 1;
                            bytes += item.wire_len();
                        }
                    }
                    outbox.release(msgs, bytes, 0, 0);
                });
            },
        );
    }
    g.finish();
}

fn config() -> Criterion {
    Criterion::default()
        .sample_size(20)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(1))
}

criterion_group! {
    name = benches;
    config = config();
    targets = matching, churn, outbox
}
criterion_main!(benches);
