//! Black-box tests of `brokerctl bench`: every scenario runs briefly against a real broker
//! started in-process on `127.0.0.1:0`, and its `--json` output is checked for the documented
//! fields and consistent counts. No figure is compared with a time or a rate: these are debug
//! builds on a shared machine, and performance is measured by running the tool, not by tests.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{Broker, DEADLINE, wait_until};
use serde_json::Value;
use std::process::{Command, Output, Stdio};

/// Runs of `brokerctl bench` against the harness's broker.
trait Bench {
    async fn bench(&self, args: &[&str]) -> Value;
    async fn bench_output(&self, args: &[&str]) -> Output;
}

impl Bench for Broker {
    /// Runs `brokerctl --server ADDR bench ARGS... --duration 300ms --json` to completion and
    /// parses its stdout.
    async fn bench(&self, args: &[&str]) -> Value {
        let mut all = args.to_vec();
        all.extend(["--duration", "300ms", "--json"]);
        let out = self.bench_output(&all).await;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "bench {args:?} failed: {stderr}");
        serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("bench {args:?} printed no JSON ({e}); stderr: {stderr}"))
    }

    /// Runs `brokerctl --server ADDR bench ARGS...` to completion, stdout and stderr piped.
    async fn bench_output(&self, args: &[&str]) -> Output {
        let mut cmd = self.ctl(&["bench"]);
        cmd.args(args).stdin(Stdio::null());
        // The child runs on a blocking thread so the broker's runtime keeps serving it.
        tokio::time::timeout(
            DEADLINE,
            tokio::task::spawn_blocking(move || cmd.output().unwrap()),
        )
        .await
        .expect("bench finished in time")
        .unwrap()
    }
}

fn u(v: &Value, key: &str) -> u64 {
    v[key]
        .as_u64()
        .unwrap_or_else(|| panic!("{key} is not an unsigned integer in {v}"))
}

fn f(v: &Value, key: &str) -> f64 {
    v[key]
        .as_f64()
        .unwrap_or_else(|| panic!("{key} is not a number in {v}"))
}

/// The fields every scenario reports, and the relations between them.
fn check_common(v: &Value, scenario: &str, size: u64, subs: u64) {
    assert_eq!(v["scenario"], scenario, "{v}");
    assert_eq!(u(v, "size"), size, "{v}");
    let (sent, received, lost) = (u(v, "sent"), u(v, "received"), u(v, "lost"));
    assert!(sent > 0, "{v}");
    assert_eq!(received + lost, sent * subs, "{v}");
    assert!(f(v, "msgs_per_sec") > 0.0, "{v}");
    assert!(f(v, "mb_per_sec") >= 0.0, "{v}");
    assert!(f(v, "tool_cpu_pct") >= 0.0, "{v}");
    if subs > 0 {
        assert!(received > 0, "{v}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pub_counts_confirmed_messages() {
    let broker = Broker::start().await;
    let v = broker.bench(&["pub"]).await;
    check_common(&v, "pub", 16, 0);
    assert_eq!(u(&v, "received"), 0);
    assert!(v["p99_us"].is_null());
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pubsub_delivers_with_a_1k_payload() {
    let broker = Broker::start().await;
    let v = broker.bench(&["pubsub", "--size", "1024"]).await;
    check_common(&v, "pubsub", 1024, 1);
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fanout_counts_every_delivery() {
    let broker = Broker::start().await;
    let v = broker.bench(&["fanout", "--subs", "3"]).await;
    check_common(&v, "fanout", 16, 3);
    assert_eq!(u(&v, "subs"), 3);
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topics_round_robin_reaches_the_wildcard_subscriber() {
    let broker = Broker::start().await;
    let v = broker.bench(&["topics", "--topics", "100"]).await;
    check_common(&v, "topics", 16, 1);
    assert_eq!(u(&v, "topics"), 100);
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn latency_at_a_low_rate_loses_nothing() {
    let broker = Broker::start().await;
    let v = broker.bench(&["latency", "--rate", "200"]).await;
    check_common(&v, "latency", 16, 1);
    assert_eq!(u(&v, "lost"), 0, "{v}");
    assert_eq!(u(&v, "missed"), 0, "{v}");
    let (p50, p99, p999, max) = (
        f(&v, "p50_us"),
        f(&v, "p99_us"),
        f(&v, "p999_us"),
        f(&v, "max_us"),
    );
    assert!(p50 > 0.0 && p50 <= p99 && p99 <= p999 && p999 <= max, "{v}");
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_relay_carries_every_frame_without_a_broker() {
    let broker = Broker::start().await;
    let v = broker.bench(&["relay", "--size", "1024"]).await;
    check_common(&v, "relay", 1024, 1);
    assert_eq!(u(&v, "lost"), 0, "{v}");
    assert_eq!(u(&v, "received"), u(&v, "sent"), "{v}");
    assert_eq!((u(&v, "pubs"), u(&v, "subs")), (1, 1), "{v}");
    broker.stop().await;
}

/// The fields of a `many` run, and latency percentiles in order when it was paced.
fn check_many(v: &Value, pubs: u64, subs: u64, topics: u64, paced: bool) {
    assert_eq!(v["scenario"], "many", "{v}");
    assert_eq!(
        (u(v, "pubs"), u(v, "subs"), u(v, "topics")),
        (pubs, subs, topics)
    );
    let (expected, received, lost) = (u(v, "expected"), u(v, "received"), u(v, "lost"));
    assert!(u(v, "sent") > 0, "{v}");
    assert!(received > 0, "{v}");
    assert_eq!(received + lost, expected, "{v}");
    assert!(f(v, "setup_s") >= 0.0, "{v}");
    if paced {
        let (p50, p99, p999, max) = (
            f(v, "p50_us"),
            f(v, "p99_us"),
            f(v, "p999_us"),
            f(v, "max_us"),
        );
        assert!(p50 > 0.0 && p50 <= p99 && p99 <= p999 && p999 <= max, "{v}");
    } else {
        assert!(v["p99_us"].is_null(), "{v}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_on_distinct_topics_delivers_each_publisher_to_its_subscriber() {
    let broker = Broker::start().await;
    let pid = std::process::id().to_string();
    let v = broker
        .bench(&[
            "many",
            "--pubs",
            "4",
            "--subs",
            "4",
            "--rate",
            "100",
            "--threads",
            "2",
            "--broker-pid",
            &pid,
        ])
        .await;
    check_many(&v, 4, 4, 4, true);
    // One subscriber per publisher: every message once, at a pace nothing drops.
    assert_eq!(u(&v, "expected"), u(&v, "sent"), "{v}");
    assert_eq!(u(&v, "lost"), 0, "{v}");
    // The broker runs in this process, so its memory and CPU are this process's.
    assert!(f(&v, "broker_rss_mib") > 0.0, "{v}");
    assert!(f(&v, "broker_cpu_s_per_million") >= 0.0, "{v}");
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_on_a_shared_topic_delivers_every_message_to_every_subscriber() {
    let broker = Broker::start().await;
    let v = broker
        .bench(&[
            "many",
            "--pubs",
            "4",
            "--subs",
            "4",
            "--shared-topic",
            "--rate",
            "100",
        ])
        .await;
    check_many(&v, 4, 4, 1, true);
    assert_eq!(u(&v, "expected"), 4 * u(&v, "sent"), "{v}");
    assert_eq!(u(&v, "lost"), 0, "{v}");
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_with_more_subscribers_than_publishers_wraps_around() {
    let broker = Broker::start().await;
    let v = broker
        .bench(&["many", "--pubs", "3", "--subs", "5", "--rate", "50"])
        .await;
    check_many(&v, 3, 5, 3, true);
    // Subscribers 0 and 3 hear publisher 0, 1 and 4 publisher 1, 2 publisher 2, and the
    // schedule hands out messages round-robin: the first publishers have at most one more.
    let (sent, expected) = (u(&v, "sent"), u(&v, "expected"));
    let each = sent / 3;
    assert!(expected >= 5 * each && expected <= 5 * each + 4, "{v}");
    assert_eq!(u(&v, "lost"), 0, "{v}");
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_unpaced_accounts_for_every_message() {
    let broker = Broker::start().await;
    for shared in [false, true] {
        let mut args = vec!["many", "--pubs", "4", "--subs", "4", "--threads", "2"];
        if shared {
            args.push("--shared-topic");
        }
        let v = broker.bench(&args).await;
        let (topics, fanout) = if shared { (1, 4) } else { (4, 1) };
        check_many(&v, 4, 4, topics, false);
        assert_eq!(u(&v, "expected"), fanout * u(&v, "sent"), "{v}");
    }
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_progress_line_on_a_stderr_that_is_not_a_terminal() {
    let broker = Broker::start().await;
    // Longer than a second, so that a progress line would have been written.
    let (json, table) = tokio::join!(
        broker.bench_output(&["pubsub", "--duration", "1200ms", "--json"]),
        broker.bench_output(&["pub", "--duration", "1200ms"]),
    );
    for out in [&json, &table] {
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "bench failed: {stderr}");
        assert!(stderr.is_empty(), "stderr: {stderr:?}");
    }
    let v: Value = serde_json::from_slice(&json.stdout).expect("one JSON object");
    check_common(&v, "pubsub", 16, 1);
    assert!(
        String::from_utf8_lossy(&table.stdout).starts_with("scenario "),
        "{}",
        String::from_utf8_lossy(&table.stdout)
    );
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn latency_needs_room_for_the_timestamp() {
    let broker = Broker::start().await;
    let out = Command::new(env!("CARGO_BIN_EXE_brokerctl"))
        .args(["--server", &broker.addr.to_string()])
        .args(["bench", "latency", "--size", "4", "--duration", "10ms"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--size 8"));
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hold_keeps_connections_and_subscriptions_until_it_ends() {
    let broker = Broker::start().await;
    let ready = std::env::temp_dir().join(format!("brokerctl-hold-{}", std::process::id()));
    let _ = std::fs::remove_file(&ready);
    let mut child = Command::new(env!("CARGO_BIN_EXE_brokerctl"))
        .args(["--server", &broker.addr.to_string()])
        .args(["bench", "hold", "--conns", "5", "--subs-per-conn", "20"])
        .args(["--hold", "2s", "--ready-file"])
        .arg(&ready)
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_until("hold to become ready", || {
        assert!(child.try_wait().unwrap().is_none(), "hold exited early");
        ready.exists()
    })
    .await;
    // Every SUB was confirmed before the ready file was written.
    assert_eq!((broker.subscriptions)(), 100);
    let status = tokio::time::timeout(
        DEADLINE,
        tokio::task::spawn_blocking(move || child.wait().unwrap()),
    )
    .await
    .expect("hold finished in time")
    .unwrap();
    assert!(status.success());
    let _ = std::fs::remove_file(&ready);
    broker.stop().await;
}

/// A broker keeping its streams in `dir`, none declared: the stream scenarios add their own.
async fn stream_broker(dir: &std::path::Path) -> Broker {
    let dir = dir.to_path_buf();
    Broker::start_with(move |c| c.data_dir = dir).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_pub_stores_with_a_window_and_removes_the_stream_it_added() {
    let dir = brokerd_tests::TempDir::new("bench-stream-pub");
    let broker = stream_broker(&dir.0).await;
    let v = broker
        .bench(&["stream-pub", "--pubs", "2", "--window", "50"])
        .await;
    check_common(&v, "stream-pub", 16, 0);
    assert_eq!((u(&v, "pubs"), u(&v, "window")), (2, 50), "{v}");
    assert_eq!(v["stream"], "BENCH", "{v}");
    let (p50, p99) = (f(&v, "p50_us"), f(&v, "p99_us"));
    assert!(p50 > 0.0 && p50 <= p99, "{v}");
    let out = tokio::task::spawn_blocking({
        let mut cmd = broker.ctl(&["stream", "ls", "--json"]);
        move || cmd.output().unwrap()
    })
    .await
    .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "[]\n");
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_replay_receives_every_message_it_stored() {
    let dir = brokerd_tests::TempDir::new("bench-stream-replay");
    let broker = stream_broker(&dir.0).await;
    let v = broker
        .bench(&[
            "stream-replay",
            "--count",
            "3000",
            "--size",
            "100",
            "--keep",
        ])
        .await;
    check_common(&v, "stream-replay", 100, 1);
    assert_eq!((u(&v, "sent"), u(&v, "received")), (3000, 3000), "{v}");
    assert_eq!((u(&v, "lost"), u(&v, "missed")), (0, 0), "{v}");
    // Kept: a second run replays it without publishing, its payload size measured.
    let again = broker
        .bench(&["stream-replay", "--no-publish", "--stream", "BENCH"])
        .await;
    assert_eq!(
        (u(&again, "sent"), u(&again, "received")),
        (0, 3000),
        "{again}"
    );
    assert_eq!(u(&again, "size"), 100, "{again}");
    broker.stop().await;
}
