//! The four origin scenarios, run as the examples run them, against a real broker: every
//! subscriber's received messages are asserted exactly.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use brokerd_tests::TestBroker;
use std::time::Duration;

#[allow(dead_code, missing_docs)]
#[path = "../../crates/brokerd-client/examples/user_registration.rs"]
mod user_registration;

#[allow(dead_code, missing_docs)]
#[path = "../../crates/brokerd-client/examples/order_flow.rs"]
mod order_flow;

#[allow(dead_code, missing_docs)]
#[path = "../../crates/brokerd-client/examples/dashboard.rs"]
mod dashboard;

#[allow(dead_code, missing_docs)]
#[path = "../../crates/brokerd-client/examples/wildcards.rs"]
mod wildcards;

#[tokio::test]
async fn user_registration_reaches_every_service() {
    let b = TestBroker::start().await;
    let report = user_registration::run(&b.addr()).await.unwrap();
    let users = vec!["alice".to_string(), "bob".into(), "carol".into()];
    assert_eq!(report.delivered, vec![3, 3, 3]);
    assert_eq!(
        report.received,
        vec![
            ("email".to_string(), users.clone()),
            ("analytics".to_string(), users.clone()),
            ("notification".to_string(), users),
        ]
    );
    b.stop().await;
}

#[tokio::test]
async fn order_flow_routes_by_topic_and_reports_counts() {
    let b = TestBroker::start().await;
    let report = order_flow::run(&b.addr()).await.unwrap();
    assert_eq!(
        report.delivered,
        vec![
            ("order.created".to_string(), 3),
            ("payment.completed".to_string(), 2),
            ("order.shipped".to_string(), 2),
        ]
    );
    let actions: Vec<(&str, Vec<&str>)> = report
        .actions
        .iter()
        .map(|(s, a)| (s.as_str(), a.iter().map(String::as_str).collect()))
        .collect();
    assert_eq!(
        actions,
        vec![
            (
                "email",
                vec![
                    "email: ord-1001 is on its way",
                    "email: order ord-1001 confirmed",
                    "email: receipt for ord-1001",
                ]
            ),
            (
                "inventory",
                vec![
                    "reserve 1 x tee for ord-1001",
                    "reserve 2 x mug for ord-1001"
                ]
            ),
            (
                "analytics",
                vec![
                    "record order ord-1001 total 59.97",
                    "record revenue 59.97 for ord-1001",
                ]
            ),
            ("push", vec!["push: ord-1001 shipped via parcelco"]),
        ]
    );
    b.stop().await;
}

#[tokio::test]
async fn dashboards_see_what_was_published_while_they_were_there() {
    let b = TestBroker::start().await;
    let report = dashboard::run(&b.addr(), Duration::from_millis(20))
        .await
        .unwrap();
    let metrics = dashboard::METRICS.len() as u64;

    let admin = &report["admin-dashboard"];
    assert_eq!(admin.rounds.len() as u64, dashboard::ROUNDS * metrics);
    assert!(admin.per_metric.values().all(|n| *n == dashboard::ROUNDS));

    let ops = &report["ops-dashboard"];
    let ops_rounds = dashboard::ROUNDS - dashboard::OPS_JOINS + 1;
    assert_eq!(ops.rounds.len() as u64, ops_rounds * metrics);
    assert!(ops.rounds.iter().all(|r| *r >= dashboard::OPS_JOINS));

    let cap = &report["capacity-dashboard"];
    let cap_rounds = dashboard::CAPACITY_LEAVES - 1;
    assert_eq!(
        cap.per_metric
            .keys()
            .map(String::as_str)
            .collect::<Vec<_>>(),
        vec!["cpu_usage", "memory_usage"]
    );
    assert!(cap.per_metric.values().all(|n| *n == cap_rounds));
    assert!(cap.rounds.iter().all(|r| *r < dashboard::CAPACITY_LEAVES));
    b.stop().await;
}

#[tokio::test]
async fn wildcard_subscribers_receive_2_2_and_5() {
    let b = TestBroker::start().await;
    let report = wildcards::run(&b.addr()).await.unwrap();
    let got: Vec<(&str, Vec<&str>)> = report
        .received
        .iter()
        .map(|(s, t)| (s.as_str(), t.iter().map(String::as_str).collect()))
        .collect();
    assert_eq!(
        got,
        vec![
            ("user-events", vec!["user.created", "user.updated"]),
            ("error-monitor", vec!["api.error", "db.error"]),
            (
                "audit-log",
                vec![
                    "user.created",
                    "user.updated",
                    "api.error",
                    "db.error",
                    "system.startup"
                ]
            ),
        ]
    );
    let counts: Vec<u32> = report.delivered.iter().map(|(_, n)| *n).collect();
    assert_eq!(counts, vec![2, 2, 2, 2, 1]);
    b.stop().await;
}

#[allow(dead_code, missing_docs)]
#[path = "../../crates/brokerd-client/examples/work_queue.rs"]
mod work_queue;

#[allow(dead_code, missing_docs)]
#[path = "../../crates/brokerd-client/examples/rpc.rs"]
mod rpc;

/// Every example, run one after the other while a `brokerctl sub '>'`-style subscriber shares
/// the broker (as the README's own walk-through leaves one running): each still sees exactly what
/// it saw alone, and each delivered count is one more, the catch-all's.
#[tokio::test]
async fn examples_work_while_a_catch_all_subscriber_shares_the_broker() {
    let b = TestBroker::start().await;
    let watcher = b.client("catch-all").await;
    let mut everything = watcher.subscribe(">").await.unwrap();
    let seen = tokio::spawn(async move {
        let mut n = 0u64;
        while everything.next().await.is_some() {
            n += 1;
        }
        n
    });

    let report = user_registration::run(&b.addr()).await.unwrap();
    assert_eq!(report.delivered, vec![4, 4, 4]);
    assert!(report.received.iter().all(|(_, users)| users.len() == 3));

    let report = order_flow::run(&b.addr()).await.unwrap();
    let counts: Vec<u32> = report.delivered.iter().map(|(_, n)| *n).collect();
    assert_eq!(counts, vec![4, 3, 3]);

    let report = wildcards::run(&b.addr()).await.unwrap();
    let counts: Vec<u32> = report.delivered.iter().map(|(_, n)| *n).collect();
    assert_eq!(counts, vec![3, 3, 3, 3, 2]);
    let audit = &report.received[2].1;
    assert_eq!(audit.len(), wildcards::TOPICS.len());

    let report = dashboard::run(&b.addr(), Duration::from_millis(20))
        .await
        .unwrap();
    let admin = &report["admin-dashboard"];
    assert_eq!(
        admin.rounds.len() as u64,
        dashboard::ROUNDS * dashboard::METRICS.len() as u64
    );

    let report = work_queue::run(&b.addr()).await.unwrap();
    let mut all: Vec<u32> = report
        .workers
        .iter()
        .flat_map(|(_, ids)| ids.clone())
        .collect();
    all.sort_unstable();
    assert_eq!(all, (0..work_queue::JOBS).collect::<Vec<_>>());
    assert_eq!(report.audited.len(), work_queue::JOBS as usize);

    let report = rpc::run(&b.addr()).await.unwrap();
    assert_eq!(report[0], ("mug".to_string(), Ok(1299)));
    assert_eq!(report[1], ("cap".to_string(), Ok(1799)));
    assert_eq!(
        report[2],
        ("umbrella".to_string(), Err("unknown sku".to_string()))
    );
    // The catch-all received the refund request, so no one was "no responders" for it.
    match &report[3] {
        (what, Err(e)) if what == "refund" => assert!(e.contains("no answer"), "{e}"),
        other => panic!("unexpected refund outcome {other:?}"),
    }

    watcher.close().await.unwrap();
    assert!(seen.await.unwrap() > u64::from(work_queue::JOBS));
    b.stop().await;
}
