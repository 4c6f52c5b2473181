//! Black-box tests of `Broker`: connect, subscribe, unsubscribe, publish and disconnect.
//!
//! Covers: the delivered count `publish` returns; routing in four scenarios (one topic fanned
//! out to three subscribers, an order flow across four services, `*`/`>` wildcards, and a topic
//! nobody subscribes to); every refusal of `subscribe`, `unsubscribe` and `publish`, with nothing
//! routed on refusal; `no_echo`; auto-unsubscribe; queue groups (full members, each member's
//! sequence numbers, no-echo); and disconnect clearing subscriptions and counting its close
//! reason. Each client's outbox is drained with `poll_take` on a noop waker, the way the writer
//! task would, so no runtime is involved.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use brokerd_core::{
    Broker, Client, CloseReason, Item, Limits, PublishError, SubscribeError, Take, UnsubscribeError,
};
use brokerd_proto::{Body, ErrorCode, Headers, TopicError};
use std::collections::VecDeque;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

fn broker() -> Broker {
    Broker::new(Limits::default())
}

fn connect(b: &Broker, name: &str) -> Arc<Client> {
    b.connect(name.into(), "127.0.0.1:1".into(), None, false)
}

fn body(topic: &str, payload: &[u8]) -> Body {
    Body::parse(Body::encode(topic, None, None, payload)).unwrap()
}

fn publish(b: &Broker, from: &Client, topic: &str) -> u32 {
    b.publish(from, &body(topic, topic.as_bytes())).unwrap()
}

/// A delivery as the subscriber sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Got {
    sid: u32,
    seq: u64,
    topic: String,
}

/// Takes everything the client's outbox holds and releases it, as the writer task does.
fn drain_items(c: &Client) -> Vec<Item> {
    let mut cx = Context::from_waker(Waker::noop());
    let mut out = Vec::new();
    loop {
        let mut batch = VecDeque::new();
        match c.outbox.poll_take(&mut cx, &mut batch) {
            Poll::Pending => return out,
            Poll::Ready(Take::Closed(reason)) => panic!("outbox closed: {reason}"),
            Poll::Ready(Take::Items) => {}
        }
        let (mut msgs, mut bytes, mut controls, mut control_bytes) = (0, 0, 0, 0);
        for it in &batch {
            match it {
                Item::Msg { .. } => {
                    msgs += 1;
                    bytes += it.wire_len();
                }
                Item::Frame(f) => {
                    controls += 1;
                    control_bytes += f.len();
                }
                Item::Lost { .. } => {}
            }
        }
        c.outbox.release(msgs, bytes, controls, control_bytes);
        out.extend(batch);
    }
}

/// The deliveries waiting for `c`, in queue order.
fn drain(c: &Client) -> Vec<Got> {
    drain_items(c)
        .into_iter()
        .map(|it| match it {
            Item::Msg { sid, seq, body } => Got {
                sid,
                seq,
                topic: Body::parse(body).unwrap().topic().to_owned(),
            },
            other => panic!("unexpected item {other:?}"),
        })
        .collect()
}

/// Just the topics delivered to `c`, in order.
fn topics(c: &Client) -> Vec<String> {
    drain(c).into_iter().map(|g| g.topic).collect()
}

fn closes(b: &Broker, name: &str) -> u64 {
    b.stats()
        .closes
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, count)| *count)
        .unwrap()
}

#[test]
fn one_topic_to_three_subscribers() {
    let b = broker();
    let subs: Vec<Arc<Client>> = (0..3).map(|i| connect(&b, &format!("s{i}"))).collect();
    for (i, c) in subs.iter().enumerate() {
        b.subscribe(c, 10 + i as u32, "user.created").unwrap();
    }
    let publisher = connect(&b, "pub");
    let sent = body("user.created", b"{\"id\":42}");
    assert_eq!(b.publish(&publisher, &sent).unwrap(), 3);
    let mut buffers = Vec::new();
    for (i, c) in subs.iter().enumerate() {
        let items = drain_items(c);
        assert_eq!(items.len(), 1);
        let Item::Msg { sid, seq, body } = &items[0] else {
            panic!("unexpected {:?}", items[0]);
        };
        assert_eq!((*sid, *seq), (10 + i as u32, 1));
        // Forwarded byte for byte.
        assert_eq!(body, sent.raw());
        buffers.push(body.as_ptr());
    }
    // Never copied per subscriber: every delivery shares one buffer.
    assert!(buffers.iter().all(|p| *p == buffers[0]));
    assert!(drain(&publisher).is_empty());
    let st = b.stats();
    assert_eq!((st.msgs_in, st.bytes_in, st.deliveries), (1, 9, 3));
    assert_eq!(st.unrouted, 0);
}

#[test]
fn order_flow() {
    let b = broker();
    let email = connect(&b, "email");
    let inventory = connect(&b, "inventory");
    let analytics = connect(&b, "analytics");
    let push = connect(&b, "push");
    b.subscribe(&email, 1, "order.created").unwrap();
    b.subscribe(&email, 2, "payment.completed").unwrap();
    b.subscribe(&email, 3, "order.shipped").unwrap();
    b.subscribe(&inventory, 1, "order.created").unwrap();
    b.subscribe(&analytics, 1, "order.created").unwrap();
    b.subscribe(&analytics, 2, "payment.completed").unwrap();
    b.subscribe(&push, 1, "order.shipped").unwrap();
    let shop = connect(&b, "shop");

    assert_eq!(publish(&b, &shop, "order.created"), 3);
    assert_eq!(publish(&b, &shop, "payment.completed"), 2);
    assert_eq!(publish(&b, &shop, "order.shipped"), 2);

    let got = |sid, topic: &str| Got {
        sid,
        seq: 1,
        topic: topic.into(),
    };
    assert_eq!(
        drain(&email),
        vec![
            got(1, "order.created"),
            got(2, "payment.completed"),
            got(3, "order.shipped"),
        ]
    );
    assert_eq!(drain(&inventory), vec![got(1, "order.created")]);
    assert_eq!(
        drain(&analytics),
        vec![got(1, "order.created"), got(2, "payment.completed")]
    );
    assert_eq!(drain(&push), vec![got(1, "order.shipped")]);
    assert_eq!(b.stats().deliveries, 7);
}

#[test]
fn wildcards() {
    let b = broker();
    let users = connect(&b, "users");
    let errors = connect(&b, "errors");
    let all = connect(&b, "all");
    b.subscribe(&users, 1, "user.*").unwrap();
    b.subscribe(&errors, 1, "*.error").unwrap();
    b.subscribe(&all, 1, ">").unwrap();
    let p = connect(&b, "pub");

    let published = [
        ("user.created", 2),
        ("user.updated", 2),
        ("api.error", 2),
        ("db.error", 2),
        ("system.startup", 1),
    ];
    for (topic, delivered) in published {
        assert_eq!(publish(&b, &p, topic), delivered, "{topic}");
    }
    // Neither `*` matches more than one token, nor does either match fewer.
    assert_eq!(publish(&b, &p, "user.created.eu"), 1);
    assert_eq!(publish(&b, &p, "user"), 1);

    assert_eq!(topics(&users), ["user.created", "user.updated"]);
    assert_eq!(topics(&errors), ["api.error", "db.error"]);
    let seen = drain(&all);
    assert_eq!(seen.len(), 7);
    let seqs: Vec<u64> = seen.iter().map(|g| g.seq).collect();
    assert_eq!(seqs, (1..=7).collect::<Vec<u64>>());
}

#[test]
fn a_topic_nobody_subscribes_to_is_unrouted() {
    let b = broker();
    let c = connect(&b, "c");
    b.subscribe(&c, 1, "a.b").unwrap();
    assert_eq!(publish(&b, &c, "a.c"), 0);
    assert_eq!(publish(&b, &c, "a.b.c"), 0);
    assert_eq!(publish(&b, &c, "a.b"), 1);
    let st = b.stats();
    assert_eq!((st.msgs_in, st.unrouted, st.deliveries), (3, 2, 1));
}

#[test]
fn subscribe_refusals() {
    let b = broker();
    let c = connect(&b, "c");
    let bad = [
        ("", TopicError::Empty),
        ("a..b", TopicError::EmptyToken(1)),
        ("a.>.b", TopicError::TailNotLast),
        ("a.b*", TopicError::Wildcard(1)),
        ("a b", TopicError::Whitespace(0)),
    ];
    for (filter, err) in bad {
        let e = b.subscribe(&c, 1, filter).unwrap_err();
        assert_eq!(e, SubscribeError::InvalidFilter(err), "{filter:?}");
        assert_eq!(e.code(), ErrorCode::InvalidFilter);
    }
    // Over the configured topic limits (16 tokens, 256 bytes).
    let long = vec!["a"; 17].join(".");
    assert!(matches!(
        b.subscribe(&c, 1, &long),
        Err(SubscribeError::InvalidFilter(TopicError::TooManyTokens {
            max: 16
        }))
    ));
    assert_eq!(c.subscription_count(), 0);

    b.subscribe(&c, 1, "a.b").unwrap();
    let e = b.subscribe(&c, 1, "x.y").unwrap_err();
    assert_eq!(e, SubscribeError::Duplicate(1));
    assert_eq!(e.code(), ErrorCode::DuplicateSubscription);
    // The refused duplicate did not replace the live subscription.
    assert_eq!(publish(&b, &c, "x.y"), 0);
    assert_eq!(publish(&b, &c, "a.b"), 1);
    // The same sid on another connection is a different subscription.
    let other = connect(&b, "other");
    b.subscribe(&other, 1, "a.b").unwrap();
    assert_eq!(b.stats().subscriptions, 2);
}

#[test]
fn too_many_subscriptions() {
    let b = Broker::new(Limits {
        max_subs: 2,
        ..Limits::default()
    });
    let c = connect(&b, "c");
    b.subscribe(&c, 1, "a").unwrap();
    b.subscribe(&c, 2, "b").unwrap();
    let e = b.subscribe(&c, 3, "c").unwrap_err();
    assert_eq!(e, SubscribeError::TooMany(2));
    assert_eq!(e.code(), ErrorCode::TooManySubscriptions);
    assert_eq!(c.subscription_count(), 2);
    assert_eq!(publish(&b, &c, "c"), 0);
    // The limit is per connection, and unsubscribing makes room.
    let other = connect(&b, "other");
    b.subscribe(&other, 3, "c").unwrap();
    b.unsubscribe(&c, 1, 0).unwrap();
    b.subscribe(&c, 3, "c").unwrap();
    assert_eq!(publish(&b, &c, "c"), 2);
}

#[test]
fn unsubscribe_unknown_sid() {
    let b = broker();
    let c = connect(&b, "c");
    assert_eq!(b.unsubscribe(&c, 9, 0), Err(UnsubscribeError::Unknown(9)));
    b.subscribe(&c, 9, "a").unwrap();
    b.unsubscribe(&c, 9, 0).unwrap();
    assert_eq!(b.unsubscribe(&c, 9, 0), Err(UnsubscribeError::Unknown(9)));
    assert_eq!(c.subscription_count(), 0);
    assert_eq!(publish(&b, &c, "a"), 0);
    let st = b.stats();
    assert_eq!((st.subscriptions, st.sublist.nodes), (0, 0));
}

#[test]
fn publish_refusals_route_nothing() {
    let b = Broker::new(Limits {
        max_payload: 8,
        ..Limits::default()
    });
    let watcher = connect(&b, "watcher");
    b.subscribe(&watcher, 1, ">").unwrap();
    let p = connect(&b, "p");

    let invalid_topics = [
        ("user.*", TopicError::Wildcard(1)),
        ("user.>", TopicError::Wildcard(1)),
        ("a..b", TopicError::EmptyToken(1)),
        (".a", TopicError::EmptyToken(0)),
        ("a.", TopicError::EmptyToken(1)),
        ("", TopicError::Empty),
        ("a b", TopicError::Whitespace(0)),
        ("a.\tb", TopicError::Whitespace(1)),
    ];
    for (topic, err) in invalid_topics {
        let e = b.publish(&p, &body(topic, b"x")).unwrap_err();
        assert_eq!(e, PublishError::InvalidTopic(err), "{topic:?}");
        assert_eq!(e.code(), ErrorCode::InvalidTopic);
    }

    let e = b.publish(&p, &body("$SYS.x", b"x")).unwrap_err();
    assert_eq!(e, PublishError::Reserved);
    assert_eq!(e.code(), ErrorCode::ReservedTopic);

    let e = b.publish(&p, &body("a", b"123456789")).unwrap_err();
    assert_eq!(e, PublishError::PayloadTooLarge { len: 9, max: 8 });
    assert_eq!(e.code(), ErrorCode::PayloadTooLarge);

    for (reply, err) in [
        ("inbox.*", TopicError::Wildcard(1)),
        ("inbox..x", TopicError::EmptyToken(1)),
        ("", TopicError::Empty),
    ] {
        let with_reply = Body::parse(Body::encode("a", Some(reply), None, b"x")).unwrap();
        let e = b.publish(&p, &with_reply).unwrap_err();
        assert_eq!(e, PublishError::InvalidReply(err), "{reply:?}");
        assert_eq!(e.code(), ErrorCode::InvalidTopic);
    }

    assert!(drain(&watcher).is_empty());
    let st = b.stats();
    assert_eq!(
        (st.msgs_in, st.bytes_in, st.deliveries, st.unrouted),
        (0, 0, 0, 0)
    );

    // At the limit, with a valid reply-to and headers, it goes through.
    let mut h = Headers::new();
    h.insert("k", "v");
    let ok = Body::parse(Body::encode("a", Some("inbox.1"), Some(&h), b"12345678")).unwrap();
    assert_eq!(b.publish(&p, &ok).unwrap(), 1);
    assert_eq!(topics(&watcher), ["a"]);
    assert_eq!(b.stats().bytes_in, 8);
}

#[test]
fn no_echo_skips_own_subscriptions_only() {
    let b = broker();
    let quiet = b.connect("quiet".into(), "p".into(), None, true);
    let loud = connect(&b, "loud");
    b.subscribe(&quiet, 1, "chat").unwrap();
    b.subscribe(&loud, 1, "chat").unwrap();

    assert_eq!(publish(&b, &quiet, "chat"), 1);
    assert!(drain(&quiet).is_empty());
    assert_eq!(topics(&loud), ["chat"]);

    // The no-echo client still receives everyone else's messages; an echoing one gets its own.
    assert_eq!(publish(&b, &loud, "chat"), 2);
    assert_eq!(topics(&quiet), ["chat"]);
    assert_eq!(topics(&loud), ["chat"]);
}

#[test]
fn auto_unsubscribe_delivers_exactly_n() {
    let b = broker();
    let c = connect(&b, "c");
    let p = connect(&b, "p");
    b.subscribe(&c, 5, "ticks").unwrap();
    b.subscribe(&c, 6, "other").unwrap();
    b.unsubscribe(&c, 5, 3).unwrap();
    assert_eq!(b.stats().subscriptions, 2);

    let delivered: Vec<u32> = (0..5).map(|_| publish(&b, &p, "ticks")).collect();
    assert_eq!(delivered, [1, 1, 1, 0, 0]);
    let seqs: Vec<(u32, u64)> = drain(&c).iter().map(|g| (g.sid, g.seq)).collect();
    assert_eq!(seqs, [(5, 1), (5, 2), (5, 3)]);

    // Gone from the connection and the trie; the sid is free again.
    assert_eq!(c.subscription_count(), 1);
    assert_eq!(b.stats().subscriptions, 1);
    assert_eq!(b.unsubscribe(&c, 5, 0), Err(UnsubscribeError::Unknown(5)));
    b.subscribe(&c, 5, "ticks").unwrap();
    assert_eq!(publish(&b, &p, "ticks"), 1);
    let again = drain(&c);
    assert_eq!(
        again,
        [Got {
            sid: 5,
            seq: 1,
            topic: "ticks".into()
        }]
    );
}

#[test]
fn auto_unsubscribe_of_one_with_wildcards_and_zero_ends_now() {
    let b = broker();
    let c = connect(&b, "c");
    b.subscribe(&c, 1, "a.*").unwrap();
    b.subscribe(&c, 2, "a.>").unwrap();
    b.unsubscribe(&c, 1, 1).unwrap();
    // One publish matches both; sid 1 takes its single message and ends.
    assert_eq!(publish(&b, &c, "a.x"), 2);
    assert_eq!(publish(&b, &c, "a.y"), 1);
    // Matches come in no particular order, so compare per subscription.
    let mut got: Vec<(u32, u64)> = drain(&c).iter().map(|g| (g.sid, g.seq)).collect();
    got.sort_unstable();
    assert_eq!(got, [(1, 1), (2, 1), (2, 2)]);
    b.unsubscribe(&c, 2, 0).unwrap();
    assert_eq!(publish(&b, &c, "a.z"), 0);
    let st = b.stats();
    assert_eq!((st.subscriptions, st.sublist.nodes), (0, 0));
}

#[test]
fn disconnect_removes_everything_and_counts_the_reason() {
    let b = broker();
    let a = connect(&b, "a");
    let c = connect(&b, "c");
    b.subscribe(&a, 1, "x.y").unwrap();
    b.subscribe(&a, 2, "x.*").unwrap();
    b.subscribe(&a, 3, ">").unwrap();
    b.subscribe(&c, 1, "x.y").unwrap();
    assert_eq!(publish(&b, &c, "x.y"), 4);
    let st = b.stats();
    assert_eq!((st.connections, st.subscriptions), (2, 4));

    b.disconnect(&a, &CloseReason::ClientClosed);
    assert!(b.client(a.id).is_none());
    assert_eq!(a.subscription_count(), 0);
    assert_eq!(publish(&b, &c, "x.y"), 1);
    // The writer is told to stop, without draining.
    let mut cx = Context::from_waker(Waker::noop());
    let mut batch = VecDeque::new();
    assert_eq!(
        a.outbox.poll_take(&mut cx, &mut batch),
        Poll::Ready(Take::Closed(CloseReason::ClientClosed))
    );

    b.disconnect(&c, &CloseReason::KeepaliveTimeout);
    // A second disconnect of the same client is not counted twice.
    b.disconnect(&c, &CloseReason::ServerShutdown);

    let st = b.stats();
    assert_eq!((st.connections, st.total_connections), (0, 2));
    assert_eq!((st.subscriptions, st.sublist.nodes), (0, 0));
    assert_eq!(closes(&b, "client-closed"), 1);
    assert_eq!(closes(&b, "keepalive-timeout"), 1);
    assert_eq!(closes(&b, "server-shutdown"), 0);
    // Traffic of departed clients stays in the totals.
    assert_eq!((st.msgs_in, st.deliveries), (2, 5));
    assert_eq!(st.closes.len(), CloseReason::NAMES.len());
}

#[test]
fn queue_group_skips_full_members_and_counts_a_drop_only_when_all_are_full() {
    let mut limits = Limits::default();
    limits.outbox.max_msgs = 1;
    let b = Broker::new(limits);
    let w1 = connect(&b, "w1");
    let w2 = connect(&b, "w2");
    b.subscribe_queue(&w1, 1, "jobs", Some("workers")).unwrap();
    b.subscribe_queue(&w2, 1, "jobs", Some("workers")).unwrap();
    let p = connect(&b, "p");
    // Each outbox holds one delivery: the second job must go to whichever member is not full.
    assert_eq!(publish(&b, &p, "jobs"), 1);
    assert_eq!(publish(&b, &p, "jobs"), 1);
    assert_eq!(w1.outbox.stats().pending_msgs, 1);
    assert_eq!(w2.outbox.stats().pending_msgs, 1);
    // Both full: the message is dropped once, counted, and reported to one member.
    assert_eq!(publish(&b, &p, "jobs"), 0);
    assert_eq!(b.stats().dropped, 1);
    let lost: u64 = [&w1, &w2]
        .iter()
        .flat_map(|c| drain_items(c))
        .filter_map(|it| match it {
            Item::Lost { missed, .. } => Some(missed),
            _ => None,
        })
        .sum();
    assert_eq!(lost, 1);
}

/// A group member's sequence numbers count the messages the group gave it (queued, or dropped
/// when every member was full), not every message its filter matched.
#[test]
fn a_group_members_sequence_counts_only_what_the_group_gave_it() {
    let mut limits = Limits::default();
    limits.outbox.max_msgs = 2;
    let b = Broker::new(limits);
    let w1 = connect(&b, "w1");
    let w2 = connect(&b, "w2");
    b.subscribe_queue(&w1, 1, "jobs", Some("workers")).unwrap();
    b.subscribe_queue(&w2, 1, "jobs", Some("workers")).unwrap();
    let p = connect(&b, "p");
    let mut given = [Vec::new(), Vec::new()];
    for _ in 0..10 {
        assert_eq!(publish(&b, &p, "jobs"), 1);
        for (w, seqs) in [&w1, &w2].iter().zip(&mut given) {
            seqs.extend(drain(w).iter().map(|g| g.seq));
        }
    }
    // Between them they took all ten, each numbering its own share from 1 without gaps.
    assert_eq!(given[0].len() + given[1].len(), 10);
    for seqs in &given {
        assert_eq!(*seqs, (1..=seqs.len() as u64).collect::<Vec<_>>());
    }

    // Fill both (two each), then one more: dropped by one member, which numbered it.
    let before = [given[0].len() as u64, given[1].len() as u64];
    for _ in 0..4 {
        assert_eq!(publish(&b, &p, "jobs"), 1);
    }
    assert_eq!(publish(&b, &p, "jobs"), 0);
    let items = [drain_items(&w1), drain_items(&w2)];
    let lost: Vec<u64> = items
        .iter()
        .map(|it| {
            it.iter()
                .map(|i| match i {
                    Item::Lost { missed, .. } => *missed,
                    _ => 0,
                })
                .sum()
        })
        .collect();
    assert_eq!(lost.iter().sum::<u64>(), 1);
    for _ in 0..2 {
        assert_eq!(publish(&b, &p, "jobs"), 1);
    }
    let next: Vec<Vec<u64>> = [&w1, &w2]
        .iter()
        .map(|w| drain(w).iter().map(|g| g.seq).collect())
        .collect();
    assert_eq!(next[0].len() + next[1].len(), 2);
    for i in 0..2 {
        // Two queued each, the drop if it was this member's, then whatever came next.
        let numbered = before[i] + 2 + lost[i];
        let expect: Vec<u64> = (numbered + 1..=numbered + next[i].len() as u64).collect();
        assert_eq!(next[i], expect, "member {}", i + 1);
    }
}

/// Under no-echo, the publisher's own member of a queue group is passed over and another member
/// takes the message; with no other member, the group takes nothing and nothing is dropped.
#[test]
fn no_echo_passes_over_the_publishers_own_group_member() {
    let b = broker();
    let quiet = b.connect("quiet".into(), "p".into(), None, true);
    let other = connect(&b, "other");
    b.subscribe_queue(&quiet, 1, "jobs", Some("workers"))
        .unwrap();
    b.subscribe_queue(&other, 1, "jobs", Some("workers"))
        .unwrap();
    for _ in 0..20 {
        assert_eq!(publish(&b, &quiet, "jobs"), 1);
    }
    assert!(drain(&quiet).is_empty());
    let seqs: Vec<u64> = drain(&other).iter().map(|g| g.seq).collect();
    assert_eq!(seqs, (1..=20).collect::<Vec<_>>());

    b.unsubscribe(&other, 1, 0).unwrap();
    assert_eq!(publish(&b, &quiet, "jobs"), 0);
    assert!(drain_items(&quiet).is_empty());
    let st = b.stats();
    assert_eq!((st.dropped, st.unrouted), (0, 0));
    // Its own member was not numbered for the message it was not given.
    assert_eq!(publish(&b, &other, "jobs"), 1);
    assert_eq!(
        drain(&quiet),
        [Got {
            sid: 1,
            seq: 1,
            topic: "jobs".into()
        }]
    );
}

#[test]
fn invalid_queue_group_names_are_refused() {
    let b = broker();
    let c = connect(&b, "c");
    for bad in ["", "has space", &"q".repeat(300)] {
        let e = b.subscribe_queue(&c, 1, "a", Some(bad)).unwrap_err();
        assert_eq!(e.code(), ErrorCode::InvalidFilter, "{bad:?}");
    }
}

#[test]
fn queue_group_never_falls_back_to_a_member_that_is_closing() {
    let mut limits = Limits::default();
    limits.outbox.max_msgs = 1;
    let b = Broker::new(limits);
    let closing = connect(&b, "closing");
    let full = connect(&b, "full");
    b.subscribe_queue(&closing, 1, "jobs", Some("workers"))
        .unwrap();
    b.subscribe_queue(&full, 1, "jobs", Some("workers"))
        .unwrap();
    // Still in the sublist, but its connection is going away: pushes to it are skipped.
    closing.outbox.close(CloseReason::ClientClosed, false);
    let p = connect(&b, "p");
    assert_eq!(publish(&b, &p, "jobs"), 1);
    assert_eq!(full.outbox.stats().pending_msgs, 1);
    // The only live member is full: its policy drops the message, and the drop is counted,
    // whichever member the random start picked.
    for n in 1..=20 {
        assert_eq!(publish(&b, &p, "jobs"), 0);
        assert_eq!(b.stats().dropped, n);
    }
}

/// A user connected with rules; a reload narrows them: its publishes follow the new rules at
/// once (the connection's memo notices the change), and a subscription they no longer allow ends
/// with a notice to its owner, while the others keep receiving.
#[test]
fn changed_permissions_apply_to_a_live_connection() {
    use brokerd_core::{Identity, Permissions, Rules};
    use brokerd_proto::{Filter, Frame, decode};
    let rules = |allow: &[&str]| Rules {
        allow: Some(allow.iter().map(|f| Filter::new(f).unwrap()).collect()),
        deny: Vec::new(),
    };
    let perms = |allow: &[&str]| {
        Arc::new(Permissions {
            publish: rules(allow),
            subscribe: rules(allow),
            ..Permissions::default()
        })
    };
    let b = broker();
    let identity = Identity {
        user: Some("svc".into()),
        permissions: Some(perms(&["a.>", "b.>"])),
        quota: None,
    };
    let svc = b.connect_as("svc".into(), "127.0.0.1:1".into(), None, false, identity);
    let other = connect(&b, "other");
    b.subscribe(&svc, 1, "a.*").unwrap();
    b.subscribe(&svc, 2, "b.*").unwrap();
    let mut routes = brokerd_core::RouteCache::new();
    let publish_b = |routes: &mut brokerd_core::RouteCache| {
        let body = body("b.x", b"x");
        b.publish_cached(&svc, &brokerd_core::Publication::from(&body), routes)
    };
    assert_eq!(publish_b(&mut routes), Ok(1));
    drain(&svc);

    assert_eq!(b.set_permissions(&svc, Some(perms(&["a.>"]))), 1);
    // The same topic, from the same memo, is now refused.
    assert!(matches!(
        publish_b(&mut routes),
        Err(PublishError::Denied { .. })
    ));
    // The notice names the subscription; `b.*` no longer matches, `a.*` still does.
    let notices: Vec<String> = drain_items(&svc)
        .into_iter()
        .filter_map(|item| match item {
            Item::Frame(bytes) => match decode(&mut bytes.as_ref().into(), usize::MAX) {
                Ok(Some(Frame::Err(e))) => {
                    assert_eq!(e.code, ErrorCode::PermissionDenied as u16);
                    Some(e.message)
                }
                other => panic!("expected ERR, got {other:?}"),
            },
            _ => None,
        })
        .collect();
    assert_eq!(notices.len(), 1, "{notices:?}");
    assert!(
        notices[0].contains("subscription 2 to 'b.*'"),
        "{notices:?}"
    );
    assert_eq!(publish(&b, &other, "b.y"), 0);
    assert_eq!(publish(&b, &other, "a.y"), 1);
    assert_eq!(svc.subscription_count(), 1);
}
