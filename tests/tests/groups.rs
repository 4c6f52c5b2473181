//! Work distribution and request/reply end to end: queue groups (exactly once, fairness, the
//! delivered count), requests with replies, no responders, timeouts, auto-unsubscribe under
//! concurrent publishers, echo off, and headers.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use brokerd_client::{Client, ConnectOptions, Error, Headers, Subscription};
use brokerd_tests::{TestBroker, wait_until};
use std::collections::HashMap;
use std::time::Duration;
use tokio::sync::oneshot;

#[allow(dead_code, missing_docs)]
#[path = "../../crates/brokerd-client/examples/work_queue.rs"]
mod work_queue;

#[allow(dead_code, missing_docs)]
#[path = "../../crates/brokerd-client/examples/rpc.rs"]
mod rpc;

#[tokio::test]
async fn work_queue_example_handles_each_job_once() {
    let b = TestBroker::start().await;
    let report = work_queue::run(&b.addr()).await.unwrap();
    let mut all: Vec<u32> = report
        .workers
        .iter()
        .flat_map(|(_, ids)| ids.clone())
        .collect();
    all.sort_unstable();
    assert_eq!(all, (0..work_queue::JOBS).collect::<Vec<_>>());
    for (name, ids) in &report.workers {
        assert!(!ids.is_empty(), "{name} was idle");
    }
    let mut audited = report.audited.clone();
    audited.sort_unstable();
    assert_eq!(audited, (0..work_queue::JOBS).collect::<Vec<_>>());
    b.stop().await;
}

#[tokio::test]
async fn rpc_example_gets_quotes_and_no_responders() {
    let b = TestBroker::start().await;
    let report = rpc::run(&b.addr()).await.unwrap();
    assert_eq!(
        report,
        vec![
            ("mug".to_string(), Ok(1299)),
            ("cap".to_string(), Ok(1799)),
            ("umbrella".to_string(), Err("unknown sku".to_string())),
            (
                "refund".to_string(),
                Err("no responders for price.refund".to_string())
            ),
        ]
    );
    b.stop().await;
}

/// A worker that records every message until told to leave (or the sender is dropped), then
/// unsubscribes and records everything that was already on its way.
fn worker(mut sub: Subscription) -> (oneshot::Sender<()>, tokio::task::JoinHandle<Vec<u64>>) {
    let (leave_tx, mut leave) = oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        let mut ids = Vec::new();
        let record = |m: brokerd_client::Message, ids: &mut Vec<u64>| {
            ids.push(std::str::from_utf8(&m.payload()).unwrap().parse().unwrap());
        };
        loop {
            tokio::select! {
                m = sub.next() => match m {
                    Some(m) => record(m, &mut ids),
                    None => return ids,
                },
                _ = &mut leave => {
                    sub.unsubscribe().await.unwrap();
                    while let Some(m) = sub.next().await {
                        record(m, &mut ids);
                    }
                    return ids;
                }
            }
        }
    });
    (leave_tx, task)
}

#[tokio::test]
async fn queue_group_delivers_each_message_exactly_once_while_workers_come_and_go() {
    let b = TestBroker::with_config(|c| c.outbound.max_pending_msgs = 1_000_000).await;
    let producer = b.client("producer").await;
    let mut clients = Vec::new();
    let mut leavers = Vec::new();
    let mut tasks = Vec::new();
    let join = |name: String| {
        let addr = b.addr;
        async move {
            let c = Client::connect(addr, ConnectOptions::new(name))
                .await
                .unwrap();
            let sub = c.subscribe_queue("work.items", "workers").await.unwrap();
            (c, worker(sub))
        }
    };
    const N: u64 = 100_000;
    const STEP: u64 = N / 4;
    for w in 0..2 {
        let (c, (leave, task)) = join(format!("worker-{w}")).await;
        clients.push(c);
        leavers.push(Some(leave));
        tasks.push(task);
    }
    for id in 0..N {
        producer
            .publish("work.items", id.to_string())
            .await
            .unwrap();
        if id % STEP == STEP - 1 {
            producer.flush().await.unwrap();
            match id / STEP {
                0 => {
                    let (c, (leave, task)) = join("worker-2".into()).await;
                    clients.push(c);
                    leavers.push(Some(leave));
                    tasks.push(task);
                }
                1 => {
                    let _ = leavers[0].take().unwrap().send(());
                }
                2 => {
                    let (c, (leave, task)) = join("worker-3".into()).await;
                    clients.push(c);
                    leavers.push(Some(leave));
                    tasks.push(task);
                    let _ = leavers[1].take().unwrap().send(());
                }
                _ => {}
            }
        }
    }
    producer.flush().await.unwrap();
    for c in clients {
        c.close().await.unwrap();
    }
    let mut all = Vec::new();
    let mut per_worker = Vec::new();
    for t in tasks {
        let ids = t.await.unwrap();
        per_worker.push(ids.len());
        all.extend(ids);
    }
    all.sort_unstable();
    assert_eq!(all.len() as u64, N, "per worker: {per_worker:?}");
    assert!(all.iter().copied().eq(0..N), "every id exactly once");
    assert!(per_worker.iter().all(|n| *n > 0), "{per_worker:?}");
    assert_eq!(b.broker.stats().dropped, 0);
    b.stop().await;
}

#[tokio::test]
async fn queue_group_shares_work_evenly() {
    let b = TestBroker::with_config(|c| c.outbound.max_pending_msgs = 1_000_000).await;
    let mut clients = Vec::new();
    let mut tasks = Vec::new();
    let mut stay = Vec::new();
    for w in 0..3 {
        let c = b.client(&format!("fair-{w}")).await;
        let (leave, task) = worker(c.subscribe_queue("fair.>", "pool").await.unwrap());
        stay.push(leave);
        tasks.push(task);
        clients.push(c);
    }
    let p = b.client("producer").await;
    const N: u64 = 30_000;
    for id in 0..N {
        p.publish("fair.job", id.to_string()).await.unwrap();
    }
    p.flush().await.unwrap();
    for c in clients {
        c.close().await.unwrap();
    }
    let mut counts = Vec::new();
    for t in tasks {
        counts.push(t.await.unwrap().len() as u64);
    }
    assert_eq!(counts.iter().sum::<u64>(), N);
    // Random choice among three: the standard deviation is about 82 messages, so +/-10% of the
    // mean (1,000 messages) is more than twelve of them.
    for c in &counts {
        assert!(c.abs_diff(N / 3) <= N / 30, "uneven shares: {counts:?}");
    }
    b.stop().await;
}

#[tokio::test]
async fn delivered_count_counts_a_group_once() {
    let b = TestBroker::start().await;
    let plain = b.client("plain").await;
    let _p = plain.subscribe("orders.*").await.unwrap();
    let mut members = Vec::new();
    for i in 0..3 {
        let c = b.client(&format!("member-{i}")).await;
        let s = c.subscribe_queue("orders.>", "billing").await.unwrap();
        members.push((c, s));
    }
    let other = b.client("other-group").await;
    let _o = other
        .subscribe_queue("orders.new", "shipping")
        .await
        .unwrap();
    let p = b.client("pub").await;
    assert_eq!(p.publish("orders.new", "x").acked().await.unwrap(), 3);
    assert_eq!(p.publish("orders.old", "x").acked().await.unwrap(), 2);
    b.stop().await;
}

#[tokio::test]
async fn requests_get_replies_from_a_responder_group() {
    let b = TestBroker::start().await;
    let mut responders = Vec::new();
    for i in 0..2 {
        let c = b.client(&format!("echo-{i}")).await;
        let mut s = c.subscribe_queue("svc.echo", "echo").await.unwrap();
        responders.push(c);
        tokio::spawn(async move {
            while let Some(m) = s.next().await {
                let mut body = format!("echo-{i}:").into_bytes();
                body.extend_from_slice(&m.payload());
                m.respond(body).await.unwrap();
            }
        });
    }
    let client = b.client("requester").await;
    for n in 0..50 {
        let reply = client
            .request("svc.echo", format!("{n}"), Duration::from_secs(10))
            .await
            .unwrap();
        let text = String::from_utf8(reply.payload().to_vec()).unwrap();
        assert!(text.ends_with(&format!(":{n}")), "{text}");
    }
    // One inbox subscription serves every request.
    let requester = b
        .broker
        .clients()
        .into_iter()
        .find(|c| c.name == "requester")
        .unwrap();
    assert_eq!(requester.subscription_count(), 1);
    b.stop().await;
}

#[tokio::test]
async fn request_to_nobody_fails_at_once_with_no_responders() {
    let b = TestBroker::start().await;
    let c = b.client("asker").await;
    let r = tokio::time::timeout(
        Duration::from_secs(10),
        c.request("nobody.home", "?", Duration::from_secs(3600)),
    )
    .await
    .expect("answered long before the request's own timeout");
    assert!(
        matches!(r, Err(Error::NoResponders(ref t)) if t == "nobody.home"),
        "{r:?}"
    );
    b.stop().await;
}

#[tokio::test]
async fn request_times_out_when_the_responder_stays_silent() {
    let b = TestBroker::start().await;
    let silent = b.client("silent").await;
    let _s = silent.subscribe("slow.svc").await.unwrap();
    let c = b.client("asker").await;
    let r = c.request("slow.svc", "?", Duration::from_millis(200)).await;
    assert!(matches!(r, Err(Error::Timeout)), "{r:?}");
    b.stop().await;
}

#[tokio::test]
async fn auto_unsubscribe_is_exact_under_concurrent_publishers() {
    let b = TestBroker::with_config(|c| c.outbound.max_pending_msgs = 1_000_000).await;
    let sub_client = b.client("limited").await;
    let mut sub = sub_client.subscribe("count.>").await.unwrap();
    const LIMIT: u32 = 500;
    sub.unsubscribe_after(LIMIT).await.unwrap();
    let mut publishers = Vec::new();
    for p in 0..4 {
        let c = b.client(&format!("pub-{p}")).await;
        publishers.push(tokio::spawn(async move {
            for i in 0..1_000 {
                c.publish(&format!("count.p{p}"), format!("{i}"))
                    .await
                    .unwrap();
            }
            c.flush().await.unwrap();
        }));
    }
    for p in publishers {
        p.await.unwrap();
    }
    // Everything the broker queued for the subscription is now in the client.
    sub_client.flush().await.unwrap();
    let mut got = 0;
    while sub.try_next().is_some() {
        got += 1;
    }
    assert_eq!(got, LIMIT);
    wait_until("the finished subscription to be removed", || {
        b.broker.stats().subscriptions == 0
    })
    .await;
    b.stop().await;
}

#[tokio::test]
async fn echo_off_skips_only_the_connections_own_publications() {
    let b = TestBroker::start().await;
    let quiet = Client::connect(b.addr, ConnectOptions::new("quiet").no_echo(true))
        .await
        .unwrap();
    let mut own = quiet.subscribe("chat.>").await.unwrap();
    let other = b.client("other").await;
    let mut theirs = other.subscribe("chat.>").await.unwrap();
    assert_eq!(
        quiet
            .publish("chat.room", "from quiet")
            .acked()
            .await
            .unwrap(),
        1
    );
    assert_eq!(
        other
            .publish("chat.room", "from other")
            .acked()
            .await
            .unwrap(),
        2
    );
    assert_eq!(&own.next().await.unwrap().payload()[..], b"from other");
    assert_eq!(&theirs.next().await.unwrap().payload()[..], b"from quiet");
    assert_eq!(&theirs.next().await.unwrap().payload()[..], b"from other");
    quiet.flush().await.unwrap();
    assert!(own.try_next().is_none());
    b.stop().await;
}

#[tokio::test]
async fn headers_and_reply_to_round_trip() {
    let b = TestBroker::start().await;
    let s = b.client("s").await;
    let mut sub = s.subscribe("h.>").await.unwrap();
    let p = b.client("p").await;
    let mut h = Headers::new();
    h.insert("content-type", "application/json")
        .insert("trace-id", "abc123")
        .insert("trace-id", "dup");
    let n = p
        .publish("h.x", "{}")
        .reply_to("reply.here")
        .headers(&h)
        .acked()
        .await
        .unwrap();
    assert_eq!(n, 1);
    let m = sub.next().await.unwrap();
    assert_eq!(m.headers(), h);
    assert_eq!(m.reply(), Some("reply.here"));
    let pairs: HashMap<_, _> = m
        .headers()
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    assert_eq!(pairs["content-type"], "application/json");
    b.stop().await;
}
