//! Black-box tests of the `brokerctl` binary against a real broker started in-process on
//! `127.0.0.1:0` and stopped through its shutdown handle, the path a signal takes.
//!
//! The binary runs as a child process (`std::process`; tokio's `process` feature is off), so the
//! tests use a multi-threaded runtime and never block a runtime thread on a child: they poll
//! `try_wait` between short sleeps while threads drain the child's pipes. Every wait is bounded
//! by [`DEADLINE`].

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{Broker, DEADLINE, POLL};
use std::io::{Read, Write};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread::JoinHandle;
use tokio::time::{Instant, sleep};

/// A started `brokerctl`; killed on drop if still running, so a failed test leaves no process.
struct Running {
    child: Child,
    stdin: Option<JoinHandle<()>>,
    stdout: Option<JoinHandle<Vec<u8>>>,
    stderr: Option<JoinHandle<Vec<u8>>>,
}

/// What a finished `brokerctl` left behind.
struct Finished {
    status: ExitStatus,
    stdout: String,
    stderr: String,
}

/// Starts `cmd` with piped stdout and stderr, and stdin fed from `input` (empty when `None`).
fn spawn(mut cmd: Command, input: Option<&[u8]>) -> Running {
    cmd.stdin(if input.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("start brokerctl");
    let stdin = input.map(|bytes| {
        let bytes = bytes.to_vec();
        let mut pipe = child.stdin.take().expect("piped stdin");
        // Dropping the pipe at the end of the thread is the end of input.
        std::thread::spawn(move || pipe.write_all(&bytes).expect("write stdin"))
    });
    let stdout = child.stdout.take().map(drain);
    let stderr = child.stderr.take().map(drain);
    Running {
        child,
        stdin,
        stdout,
        stderr,
    }
}

fn drain(mut pipe: impl Read + Send + 'static) -> JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let mut buf = Vec::new();
        pipe.read_to_end(&mut buf).expect("read pipe");
        buf
    })
}

impl Running {
    /// Waits for the process to exit, then collects its output.
    async fn finish(mut self) -> Finished {
        let deadline = Instant::now() + DEADLINE;
        let status = loop {
            if let Some(status) = self.child.try_wait().expect("poll brokerctl") {
                break status;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for brokerctl to exit"
            );
            sleep(POLL).await;
        };
        // The process is gone, so its pipes are closed and these threads end promptly.
        if let Some(t) = self.stdin.take() {
            t.join().expect("stdin writer");
        }
        let out = |t: Option<JoinHandle<Vec<u8>>>| {
            String::from_utf8(
                t.map(|t| t.join().expect("pipe reader"))
                    .unwrap_or_default(),
            )
            .unwrap()
        };
        Finished {
            status,
            stdout: out(self.stdout.take()),
            stderr: out(self.stderr.take()),
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Runs `brokerctl` to completion.
async fn run(cmd: Command, input: Option<&[u8]>) -> Finished {
    spawn(cmd, input).finish().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sub_prints_what_pub_publishes() {
    let broker = Broker::start().await;
    let sub = spawn(broker.ctl(&["sub", "user.created", "--count", "2"]), None);
    broker.wait_for_subscriptions(1).await;

    let publ = run(
        broker.ctl(&["pub", "user.created", "hello", "--count", "2"]),
        None,
    )
    .await;
    assert!(publ.status.success(), "pub failed: {}", publ.stderr);
    assert!(
        publ.stderr.contains("published 2 messages to user.created"),
        "pub stderr: {}",
        publ.stderr
    );

    let sub = sub.finish().await;
    assert!(sub.status.success(), "sub failed: {}", sub.stderr);
    assert_eq!(sub.stdout, "user.created hello\nuser.created hello\n");
    assert_eq!(
        sub.stderr,
        format!("subscribed to user.created on {}\n", broker.addr)
    );
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pub_reads_one_message_per_stdin_line() {
    let broker = Broker::start().await;
    let sub = spawn(broker.ctl(&["sub", "user.*", "--count", "4"]), None);
    broker.wait_for_subscriptions(1).await;

    // The last line has no newline and still counts; CRLF endings are stripped whole.
    let input = b"alice\r\nbob\n\ncarol";
    let publ = run(broker.ctl(&["pub", "user.created"]), Some(input)).await;
    assert!(publ.status.success(), "pub failed: {}", publ.stderr);
    assert!(
        publ.stderr.contains("published 4 messages to user.created"),
        "pub stderr: {}",
        publ.stderr
    );

    let sub = sub.finish().await;
    assert!(sub.status.success(), "sub failed: {}", sub.stderr);
    assert_eq!(
        sub.stdout,
        "user.created alice\nuser.created bob\nuser.created \nuser.created carol\n"
    );
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stdin_lines_repeat_with_count() {
    let broker = Broker::start().await;
    let sub = spawn(broker.ctl(&["sub", "t", "--count", "4"]), None);
    broker.wait_for_subscriptions(1).await;

    let publ = run(broker.ctl(&["pub", "t", "--count", "2"]), Some(b"a\nb\n")).await;
    assert!(publ.status.success(), "pub failed: {}", publ.stderr);

    let sub = sub.finish().await;
    assert_eq!(sub.stdout, "t a\nt a\nt b\nt b\n");
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headers_reply_and_json() {
    let broker = Broker::start().await;
    let text = spawn(broker.ctl(&["sub", "order.>", "--count", "1"]), None);
    let json = spawn(
        broker.ctl(&["sub", "order.*", "--count", "1", "--json"]),
        None,
    );
    broker.wait_for_subscriptions(2).await;

    let publ = run(
        broker.ctl(&[
            "pub",
            "order.placed",
            "{\"id\":1}",
            "--header",
            "trace=abc",
            "--header",
            "kind=new",
            "--reply",
            "order.replies",
        ]),
        None,
    )
    .await;
    assert!(publ.status.success(), "pub failed: {}", publ.stderr);

    let text = text.finish().await;
    assert_eq!(
        text.stdout,
        "order.placed [trace=abc, kind=new] {\"id\":1}\n"
    );

    let json = json.finish().await;
    assert!(json.status.success(), "sub --json failed: {}", json.stderr);
    assert_eq!(json.stdout.lines().count(), 1);
    let v: serde_json::Value = serde_json::from_str(&json.stdout).expect("valid json");
    assert_eq!(v["topic"], "order.placed");
    assert_eq!(v["payload"], "{\"id\":1}");
    assert_eq!(v["payload_encoding"], "utf-8");
    assert_eq!(v["seq"], 1);
    assert_eq!(
        v["headers"],
        serde_json::json!([["trace", "abc"], ["kind", "new"]])
    );
    assert_eq!(v["reply"], "order.replies");
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ack_reports_deliveries() {
    let broker = Broker::start().await;
    let sub = spawn(broker.ctl(&["sub", "t", "--count", "2"]), None);
    broker.wait_for_subscriptions(1).await;

    let publ = run(
        broker.ctl(&["pub", "t", "x", "--count", "2", "--ack"]),
        None,
    )
    .await;
    assert!(publ.status.success(), "pub failed: {}", publ.stderr);
    assert_eq!(
        publ.stderr,
        "delivered to 1 subscriber\ndelivered to 1 subscriber\npublished 2 messages to t\n"
    );
    sub.finish().await;

    let nobody = run(broker.ctl(&["pub", "t", "x", "--ack"]), None).await;
    assert_eq!(
        nobody.stderr,
        "delivered to 0 subscribers\npublished 1 message to t\n"
    );
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sub_exits_quietly_when_stdout_closes() {
    let broker = Broker::start().await;
    let mut cmd = broker.ctl(&["sub", "t"]);
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("start brokerctl");
    // Closing the read end is what `| head` does once it has its lines.
    drop(child.stdout.take());
    let running = Running {
        stderr: child.stderr.take().map(drain),
        child,
        stdin: None,
        stdout: None,
    };
    broker.wait_for_subscriptions(1).await;

    let publ = run(broker.ctl(&["pub", "t", "x"]), None).await;
    assert!(publ.status.success(), "pub failed: {}", publ.stderr);

    let sub = running.finish().await;
    assert!(
        sub.status.success(),
        "sub exit: {:?}, stderr: {}",
        sub.status,
        sub.stderr
    );
    assert_eq!(sub.stderr, format!("subscribed to t on {}\n", broker.addr));
    broker.stop().await;
}

#[cfg(unix)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sub_exits_cleanly_on_ctrl_c() {
    let broker = Broker::start().await;
    let sub = spawn(broker.ctl(&["sub", "t"]), None);
    broker.wait_for_subscriptions(1).await;

    let kill = Command::new("kill")
        .args(["-INT", &sub.child.id().to_string()])
        .status()
        .expect("run kill");
    assert!(kill.success());

    let sub = sub.finish().await;
    assert!(
        sub.status.success(),
        "sub exit: {:?}, stderr: {}",
        sub.status,
        sub.stderr
    );
    assert_eq!(sub.stdout, "");
    broker.wait_for_subscriptions(0).await;
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sub_without_reconnect_fails_when_the_broker_shuts_down() {
    let broker = Broker::start().await;
    let sub = spawn(broker.ctl(&["sub", "t", "--no-reconnect"]), None);
    broker.wait_for_subscriptions(1).await;
    broker.stop().await;

    let sub = sub.finish().await;
    assert_eq!(sub.status.code(), Some(1), "stderr: {}", sub.stderr);
    assert!(
        sub.stderr
            .lines()
            .last()
            .is_some_and(|l| l.starts_with("brokerctl: ")),
        "stderr: {}",
        sub.stderr
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sub_carries_on_across_a_broker_restart() {
    let broker = Broker::start().await;
    let addr = broker.addr;
    let sub = spawn(broker.ctl(&["sub", "t", "--count", "2"]), None);
    broker.wait_for_subscriptions(1).await;
    let first = run(broker.ctl(&["pub", "t", "before", "--ack"]), None).await;
    assert!(
        first.stderr.contains("delivered to 1 subscriber"),
        "{}",
        first.stderr
    );
    broker.stop().await;

    // The same port again: what a restarted service looks like to its clients.
    let broker = Broker::start_with(|c| c.listen = addr).await;
    broker.wait_for_subscriptions(1).await;
    let second = run(broker.ctl(&["pub", "t", "after", "--ack"]), None).await;
    assert!(
        second.stderr.contains("delivered to 1 subscriber"),
        "{}",
        second.stderr
    );

    let sub = sub.finish().await;
    assert!(sub.status.success(), "sub failed: {}", sub.stderr);
    assert_eq!(sub.stdout, "t before\nt after\n");
    assert!(
        sub.stderr.contains("connection lost"),
        "stderr: {}",
        sub.stderr
    );
    assert!(
        sub.stderr.contains("reconnected to"),
        "stderr: {}",
        sub.stderr
    );
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pub_reports_what_the_broker_refused_without_ack() {
    let broker = Broker::start().await;
    // A reserved topic and one with more tokens than the broker allows: the client sends both
    // (neither breaks the wire format), the broker refuses both.
    let long = vec!["a"; 21].join(".");
    for topic in ["$SYS.x", long.as_str()] {
        let out = run(broker.ctl(&["pub", topic, "x"]), None).await;
        assert_eq!(out.status.code(), Some(1), "{topic}: {}", out.stderr);
        assert!(
            out.stderr.contains("the broker refused 1 of 1 message"),
            "{topic}: {}",
            out.stderr
        );
        assert!(!out.stderr.contains("published"), "{topic}: {}", out.stderr);
    }
    // Some refused among many: the count says how many.
    let out = run(broker.ctl(&["pub", "$SYS.y", "x", "--count", "3"]), None).await;
    assert_eq!(out.status.code(), Some(1));
    assert!(
        out.stderr.contains("refused 3 of 3 messages"),
        "{}",
        out.stderr
    );
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pub_blames_a_bad_reply_on_the_reply() {
    let broker = Broker::start().await;
    let out = run(broker.ctl(&["pub", "t", "x", "--reply", "a..b"]), None).await;
    assert_eq!(out.status.code(), Some(1), "{}", out.stderr);
    assert!(out.stderr.contains("--reply a..b"), "{}", out.stderr);
    assert!(
        !out.stderr.contains("cannot publish to t"),
        "{}",
        out.stderr
    );
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pub_file_and_stdin_whole_are_one_message() {
    let broker = Broker::start().await;
    let sub = spawn(broker.ctl(&["sub", "doc", "--count", "2", "--json"]), None);
    broker.wait_for_subscriptions(1).await;

    let dir = std::env::temp_dir().join(format!("brokerctl-file-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("body.bin");
    let body: Vec<u8> = (0..=255u8).cycle().take(3000).collect();
    std::fs::write(&path, &body).unwrap();
    let from_file = run(
        broker.ctl(&["pub", "doc", "--file", path.to_str().unwrap()]),
        None,
    )
    .await;
    assert!(from_file.status.success(), "{}", from_file.stderr);
    let from_stdin = run(
        broker.ctl(&["pub", "doc", "--file", "-"]),
        Some(b"line one\nline two\n"),
    )
    .await;
    assert!(from_stdin.status.success(), "{}", from_stdin.stderr);
    assert!(
        from_stdin.stderr.contains("published 1 message"),
        "{}",
        from_stdin.stderr
    );
    std::fs::remove_dir_all(&dir).unwrap();

    let sub = sub.finish().await;
    let lines: Vec<serde_json::Value> = sub
        .stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2, "{}", sub.stdout);
    let hex: String = body.iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(lines[0]["payload_encoding"], "hex");
    assert_eq!(lines[0]["payload"], hex.as_str());
    assert_eq!(lines[1]["payload"], "line one\nline two\n");
    assert!(lines[1]["headers"].is_null());
    assert!(
        lines[1]["received"]
            .as_str()
            .is_some_and(|t| t.ends_with('Z'))
    );
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sub_shows_reply_to_and_time_when_asked() {
    let broker = Broker::start().await;
    let sub = spawn(
        broker.ctl(&["sub", "q", "--count", "1", "--show-reply", "--timestamps"]),
        None,
    );
    broker.wait_for_subscriptions(1).await;
    let out = run(
        broker.ctl(&["pub", "q", "ask", "--reply", "answers.1"]),
        None,
    )
    .await;
    assert!(out.status.success(), "{}", out.stderr);
    let sub = sub.finish().await;
    let (time, rest) = sub.stdout.split_once(' ').unwrap();
    assert!(humantime::parse_rfc3339(time).is_ok(), "{}", sub.stdout);
    assert_eq!(rest, "q (reply-to answers.1) ask\n");
    broker.stop().await;
}

#[cfg(unix)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sub_exits_cleanly_on_sigterm() {
    let broker = Broker::start().await;
    let sub = spawn(broker.ctl(&["sub", "t"]), None);
    broker.wait_for_subscriptions(1).await;
    let kill = Command::new("kill")
        .args(["-TERM", &sub.child.id().to_string()])
        .status()
        .expect("run kill");
    assert!(kill.success());
    let sub = sub.finish().await;
    assert!(sub.status.success(), "{:?} {}", sub.status, sub.stderr);
    broker.wait_for_subscriptions(0).await;
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closed_port_exits_1() {
    // A port bound but not listening: connecting to it is refused, and while the socket is held
    // no listener can appear on it (a port merely released could be taken, or still be open in
    // a child process forked meanwhile).
    let held = tokio::net::TcpSocket::new_v4().unwrap();
    held.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let server = held.local_addr().unwrap().to_string();
    for args in [&["pub", "t", "x"][..], &["sub", "t"][..]] {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_brokerctl"));
        cmd.arg("--server").arg(&server).args(args);
        let out = run(cmd, None).await;
        assert_eq!(
            out.status.code(),
            Some(1),
            "{args:?} stderr: {}",
            out.stderr
        );
        assert!(
            out.stderr
                .starts_with(&format!("brokerctl: cannot connect to {server}")),
            "{args:?} stderr: {}",
            out.stderr
        );
        assert_eq!(out.stdout, "");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_comes_from_the_environment() {
    let broker = Broker::start().await;
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_brokerctl"));
    cmd.env("BROKERD_SERVER", broker.addr.to_string())
        .args(["pub", "t", "x"]);
    let out = run(cmd, None).await;
    assert!(out.status.success(), "stderr: {}", out.stderr);
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_errors_exit_2() {
    let cases: [&[&str]; 3] = [
        &["pub"],
        &["pub", "t", "x", "--count", "0"],
        &["pub", "t", "x", "--header", "novalue"],
    ];
    for args in cases {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_brokerctl"));
        cmd.args(args);
        let out = run(cmd, None).await;
        assert_eq!(
            out.status.code(),
            Some(2),
            "{args:?} stderr: {}",
            out.stderr
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn req_gets_a_fixed_reply_and_a_command_reply() {
    let broker = Broker::start().await;
    let fixed = spawn(
        broker.ctl(&["reply", "svc.ping", "pong", "--count", "1"]),
        None,
    );
    let upper = spawn(
        broker.ctl(&[
            "reply",
            "svc.upper",
            "--command",
            "tr a-z A-Z",
            "--count",
            "1",
        ]),
        None,
    );
    broker.wait_for_subscriptions(2).await;

    let r = run(broker.ctl(&["req", "svc.ping", "anything"]), None).await;
    assert!(r.status.success(), "req failed: {}", r.stderr);
    assert_eq!(r.stdout, "pong\n");
    let r = run(broker.ctl(&["req", "svc.upper", "shout"]), None).await;
    assert!(r.status.success(), "req failed: {}", r.stderr);
    assert_eq!(r.stdout, "SHOUT\n");

    for responder in [fixed.finish().await, upper.finish().await] {
        assert!(responder.status.success(), "{}", responder.stderr);
        assert!(
            responder.stderr.contains("answered 1 requests"),
            "{}",
            responder.stderr
        );
    }
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_command_gets_an_error_reply_and_reply_goes_on() {
    let broker = Broker::start().await;
    let responder = spawn(
        broker.ctl(&["reply", "svc.fail", "--command", "exit 3", "--count", "2"]),
        None,
    );
    let answers = spawn(
        broker.ctl(&["sub", "answers.1", "--json", "--count", "1"]),
        None,
    );
    broker.wait_for_subscriptions(2).await;

    let p = run(
        broker.ctl(&["pub", "svc.fail", "x", "--reply", "answers.1"]),
        None,
    )
    .await;
    assert!(p.status.success(), "pub failed: {}", p.stderr);
    let answers = answers.finish().await;
    assert!(answers.status.success(), "sub failed: {}", answers.stderr);
    let v: serde_json::Value = serde_json::from_str(&answers.stdout).expect("one JSON line");
    assert_eq!(v["payload"], "command failed: exit status 3", "{v}");
    assert_eq!(
        v["headers"],
        serde_json::json!([["error", "exit status 3"]]),
        "{v}"
    );

    // The responder is still there for the next request.
    // `req` prints the error reply and exits 1, naming it.
    let r = run(broker.ctl(&["req", "svc.fail", "again"]), None).await;
    assert_eq!(r.status.code(), Some(1), "{}", r.stderr);
    assert_eq!(r.stdout, "command failed: exit status 3\n");
    assert!(
        r.stderr
            .contains("the responder answered with an error: exit status 3"),
        "{}",
        r.stderr
    );

    let responder = responder.finish().await;
    assert!(responder.status.success(), "{}", responder.stderr);
    assert!(
        responder.stderr.contains(
            "svc.fail: command \"exit 3\" failed: exit status 3; sent an error reply to answers.1\n"
        ),
        "{}",
        responder.stderr
    );
    assert!(
        responder
            .stderr
            .contains("answered 2 requests (2 with an error reply)"),
        "{}",
        responder.stderr
    );
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn req_to_nobody_says_no_responders() {
    let broker = Broker::start().await;
    let r = run(
        broker.ctl(&["req", "nobody.home", "x", "--timeout", "1h"]),
        None,
    )
    .await;
    assert_eq!(r.status.code(), Some(1));
    assert!(
        r.stderr.contains("no responders for nobody.home"),
        "{}",
        r.stderr
    );
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sub_queue_members_share_messages() {
    let broker = Broker::start().await;
    let a = spawn(
        broker.ctl(&["sub", "jobs", "--queue", "w", "--count", "1"]),
        None,
    );
    let b = spawn(
        broker.ctl(&["sub", "jobs", "--queue", "w", "--count", "1"]),
        None,
    );
    broker.wait_for_subscriptions(2).await;
    // A group counts once: two members, one delivery.
    let p = run(broker.ctl(&["pub", "jobs", "first", "--ack"]), None).await;
    assert!(
        p.stderr.contains("delivered to 1 subscriber\n"),
        "{}",
        p.stderr
    );
    // The member that took it exits; the next job can only go to the other one.
    broker.wait_for_subscriptions(1).await;
    let p = run(broker.ctl(&["pub", "jobs", "second", "--ack"]), None).await;
    assert!(
        p.stderr.contains("delivered to 1 subscriber\n"),
        "{}",
        p.stderr
    );
    let (a, b) = (a.finish().await, b.finish().await);
    let mut lines = vec![a.stdout, b.stdout];
    lines.sort();
    assert_eq!(lines, vec!["jobs first\n", "jobs second\n"]);
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stats_shows_the_traffic_and_the_connections() {
    let broker = Broker::start().await;
    let sub = spawn(
        broker.ctl(&["sub", "user.created", "--name", "welcome-email"]),
        None,
    );
    broker.wait_for_subscriptions(1).await;
    let p = run(
        broker.ctl(&["pub", "user.created", "hello", "--count", "3"]),
        None,
    )
    .await;
    assert!(p.status.success(), "pub failed: {}", p.stderr);

    // The table first: the broker's first answer is built for this request, so it lists the
    // asking connection, which the table leaves out.
    let table = run(broker.ctl(&["stats"]), None).await;
    assert!(table.status.success(), "stats failed: {}", table.stderr);
    assert!(
        table.stdout.contains("messages in 3 (15 payload bytes);"),
        "{}",
        table.stdout
    );
    // Only the subscriber's subscription: the asker's inbox is not counted.
    assert!(
        table
            .stdout
            .contains("; subscriptions 1 (this tool's connection left out)\n"),
        "{}",
        table.stdout
    );
    assert!(
        !table.stdout.contains("brokerctl-stats-"),
        "{}",
        table.stdout
    );
    assert!(table.stderr.is_empty(), "{}", table.stderr);
    let row: Vec<&str> = table
        .stdout
        .lines()
        .find(|l| l.ends_with(" welcome-email  user.created"))
        .unwrap_or_else(|| panic!("no row for the subscriber in {}", table.stdout))
        .split_whitespace()
        .collect();
    // ID PEER SUBS IN DELIVERED ...: one subscription, three messages delivered.
    assert_eq!((row[2], row[4]), ("1", "3"), "{}", table.stdout);

    let json = run(broker.ctl(&["stats", "--json"]), None).await;
    assert!(
        json.status.success(),
        "stats --json failed: {}",
        json.stderr
    );
    let s: serde_json::Value = serde_json::from_str(&json.stdout).expect("one JSON object");
    assert_eq!(s["msgs_in"], 3, "{s}");
    // The deliveries may include the first call's answer, or not: two requests close together
    // share one snapshot.
    assert!(s["deliveries"] == 3 || s["deliveries"] == 4, "{s}");
    let names: Vec<&str> = s["clients"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|c| c["name"].as_str())
        .collect();
    assert!(names.contains(&"welcome-email"), "{s}");
    drop(sub);
    broker.stop().await;
}

/// A client of the library connected under `name` and subscribed to each of `filters`.
async fn connected(
    broker: &Broker,
    name: &str,
    filters: &[&str],
) -> (brokerd_client::Client, Vec<brokerd_client::Subscription>) {
    let client =
        brokerd_client::Client::connect(broker.addr, brokerd_client::ConnectOptions::new(name))
            .await
            .unwrap();
    let mut subs = Vec::new();
    for f in filters {
        subs.push(client.subscribe(f).await.unwrap());
    }
    (client, subs)
}

/// The last word of each line under the table's headings (the names), in order.
fn names_in_table(stdout: &str) -> Vec<&str> {
    stdout
        .lines()
        .skip_while(|l| !l.ends_with("NAME"))
        .skip(1)
        .filter(|l| !l.starts_with('('))
        .filter_map(|l| l.split_whitespace().last())
        .collect()
}

/// Runs `brokerctl args` once the connections of the runs before have gone (the broker is back
/// to `subs` subscriptions: each run subscribes its inbox), and again until the answer it is
/// given was built after it connected: requests within 100 ms of each other share one answer,
/// which may list the connection of the run before and not this one's (the tool says so on
/// stderr).
async fn fresh(broker: &Broker, subs: usize, args: &[&str]) -> Finished {
    let deadline = Instant::now() + DEADLINE;
    loop {
        broker.wait_for_subscriptions(subs).await;
        let out = run(broker.ctl(args), None).await;
        assert!(out.status.success(), "{args:?} failed: {}", out.stderr);
        if out.stderr.is_empty() {
            return out;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for a fresh answer: {}",
            out.stderr
        );
        sleep(POLL).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conns_lists_the_connections_sorted_but_not_its_own() {
    let broker = Broker::start().await;
    // Connected first, so it has the smaller id, and fewer subscriptions.
    let few = connected(&broker, "few-subs", &["orders.>"]).await;
    let many = connected(&broker, "many-subs", &["a", "b", "c"]).await;
    broker.wait_for_subscriptions(4).await;

    let out = run(broker.ctl(&["conns"]), None).await;
    assert!(out.status.success(), "conns failed: {}", out.stderr);
    assert!(out.stderr.is_empty(), "{}", out.stderr);
    assert!(!out.stdout.contains("brokerctl-conns-"), "{}", out.stdout);
    let row: Vec<&str> = out
        .stdout
        .lines()
        .find(|l| l.ends_with(" few-subs"))
        .unwrap_or_else(|| panic!("no row for the subscriber in {}", out.stdout))
        .split_whitespace()
        .collect();
    // ID PEER USER SUBS ...: no user on a broker without authentication, one subscription.
    assert_eq!((row[2], row[3]), ("-", "1"), "{}", out.stdout);

    let id = fresh(&broker, 4, &["conns", "--sort", "id"]).await;
    assert_eq!(
        names_in_table(&id.stdout),
        ["few-subs", "many-subs"],
        "{}",
        id.stdout
    );
    let subs = fresh(&broker, 4, &["conns", "--sort", "subs"]).await;
    assert_eq!(
        names_in_table(&subs.stdout),
        ["many-subs", "few-subs"],
        "{}",
        subs.stdout
    );

    let json = fresh(&broker, 4, &["conns", "--json", "--sort", "subs"]).await;
    let rows: Vec<serde_json::Value> = serde_json::from_str(&json.stdout).expect("one JSON array");
    let names: Vec<&str> = rows.iter().filter_map(|r| r["name"].as_str()).collect();
    assert_eq!(names, ["many-subs", "few-subs"], "{}", json.stdout);
    assert_eq!(rows[0]["subscriptions"], 3, "{}", json.stdout);

    let bad = run(broker.ctl(&["conns", "--sort", "nope"]), None).await;
    assert_eq!(bad.status.code(), Some(2), "{}", bad.stderr);
    drop((few, many));
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn top_prints_snapshots_when_stdout_is_not_a_terminal() {
    let broker = Broker::start().await;
    let watched = connected(&broker, "watched", &["jobs.>"]).await;
    broker.wait_for_subscriptions(1).await;

    // Stdout is a pipe here: one snapshot, then exit.
    let once = run(broker.ctl(&["top"]), None).await;
    assert!(once.status.success(), "top failed: {}", once.stderr);
    assert!(once.stdout.starts_with("brokerd "), "{}", once.stdout);
    assert!(once.stdout.contains("sorted by rate\n"), "{}", once.stdout);
    assert_eq!(names_in_table(&once.stdout), ["watched"], "{}", once.stdout);
    assert!(!once.stdout.contains('\u{1b}'), "{}", once.stdout);

    let twice = run(
        broker.ctl(&[
            "top",
            "--iterations",
            "2",
            "--interval",
            "10ms",
            "--sort",
            "drops",
        ]),
        None,
    )
    .await;
    assert!(twice.status.success(), "top failed: {}", twice.stderr);
    let headings = twice.stdout.lines().filter(|l| l.ends_with("NAME")).count();
    assert_eq!(headings, 2, "{}", twice.stdout);
    assert!(
        twice.stdout.contains("sorted by drops\n"),
        "{}",
        twice.stdout
    );
    drop(watched);
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stats_shows_rates_and_the_busiest_topics() {
    let broker = Broker::start().await;
    let sub = connected(&broker, "rates-sub", &["load.>"]).await;
    broker.wait_for_subscriptions(1).await;
    let publisher = connected(&broker, "rates-pub", &[]).await.0;
    // A steady flow, so that every one-second window the broker measures has some.
    let flow = tokio::spawn(async move {
        loop {
            publisher.publish("load.x", "m").await.unwrap();
            sleep(std::time::Duration::from_millis(2)).await;
        }
    });

    let deadline = Instant::now() + DEADLINE;
    let out = loop {
        let out = run(broker.ctl(&["stats"]), None).await;
        assert!(out.status.success(), "stats failed: {}", out.stderr);
        let flowing = out
            .stdout
            .lines()
            .any(|l| l.starts_with("rates: in ") && !l.starts_with("rates: in 0/s"))
            && out.stdout.contains("busiest topics: load.x ");
        if flowing {
            break out;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for rates in {}",
            out.stdout
        );
        sleep(POLL).await;
    };
    let row: Vec<&str> = out
        .stdout
        .lines()
        .find(|l| l.ends_with(" rates-sub  load.>"))
        .unwrap_or_else(|| panic!("no row for the subscriber in {}", out.stdout))
        .split_whitespace()
        .collect();
    // ID PEER SUBS IN DELIVERED DROPPED PENDING PENDING-B AGE IN/S OUT/S DROP/S NAME FILTERS:
    // the subscriber's deliveries flow at some rate, and it publishes nothing.
    assert_eq!(row.len(), 14, "{}", out.stdout);
    assert_eq!(row[9], "0", "{}", out.stdout);
    flow.abort();
    drop(sub);
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_and_a_user_through_brokerctl() {
    use brokerd_server::config::{RulesConfig, UserConfig};
    use brokerd_tests::pki::{TestCa, temp_dir};
    let dir = temp_dir("brokerctl-tls");
    let ca = TestCa::new(&dir, "main");
    let server = ca.issue("server", &["localhost", "127.0.0.1"]);
    let broker = Broker::start_with(|c| {
        c.tls.cert = Some(server.cert.clone());
        c.tls.key = Some(server.key.clone());
        c.auth.users = vec![UserConfig {
            name: "orders".into(),
            password_hash: brokerd_server::auth::hash_password("pw").unwrap(),
            publish: RulesConfig {
                allow: Some(vec!["orders.>".into()]),
                deny: vec![],
            },
            ..UserConfig::default()
        }];
    })
    .await;
    let ca_path = ca.cert.to_str().unwrap();
    let ctl = |args: &[&str], password: &str| {
        let mut cmd = broker.ctl(&[&["--tls-ca", ca_path, "--user", "orders"], args].concat());
        cmd.env("BROKERD_PASSWORD", password);
        cmd
    };
    // The server name defaults to the host of --server (127.0.0.1, in the certificate).
    let ok = run(ctl(&["pub", "orders.created", "x", "--ack"], "pw"), None).await;
    assert!(ok.status.success(), "{}", ok.stderr);
    let denied = run(ctl(&["pub", "payments.x", "x", "--ack"], "pw"), None).await;
    assert!(!denied.status.success());
    assert!(denied.stderr.contains("not permitted"), "{}", denied.stderr);
    let wrong = run(ctl(&["pub", "orders.created", "x", "--ack"], "nope"), None).await;
    assert!(!wrong.status.success());
    assert!(
        wrong.stderr.contains("authentication failed"),
        "{}",
        wrong.stderr
    );
    // Without --tls-ca, the TLS port says what it needs.
    let mut plain = broker.ctl(&["--user", "orders", "pub", "orders.created", "x", "--ack"]);
    plain.env("BROKERD_PASSWORD", "pw");
    let plain = run(plain, None).await;
    assert!(!plain.status.success());
    assert!(plain.stderr.contains("requires TLS"), "{}", plain.stderr);
    broker.stop().await;
}

/// A broker keeping its streams in `dir`, with ORDERS (`order.>`, `payment.>`) declared in its
/// configuration.
async fn stream_broker(dir: &std::path::Path) -> Broker {
    let dir = dir.to_path_buf();
    Broker::start_with(move |c| {
        c.data_dir = dir;
        c.streams = vec![brokerd_proto::streams::StreamConfig {
            name: "ORDERS".into(),
            filters: vec!["order.>".into(), "payment.>".into()],
            ..Default::default()
        }];
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_commands_add_list_show_purge_and_remove() {
    let dir = brokerd_tests::TempDir::new("cli-streams");
    let broker = stream_broker(&dir.0).await;
    let add = run(
        broker.ctl(&[
            "stream",
            "add",
            "EVENTS",
            "--filter",
            "user.>",
            "--fsync",
            "always",
            "--max-age",
            "1h",
        ]),
        None,
    )
    .await;
    assert!(add.status.success(), "add failed: {}", add.stderr);
    assert_eq!(add.stderr, "added stream EVENTS\n");
    assert!(
        add.stdout
            .starts_with("stream         EVENTS (defined in api)\nfilters        user.>\n"),
        "{}",
        add.stdout
    );
    assert!(add.stdout.contains("age 1h"), "{}", add.stdout);

    let ls = run(broker.ctl(&["stream", "ls"]), None).await;
    let rows: Vec<&str> = ls.stdout.lines().collect();
    assert_eq!(rows.len(), 3, "{}", ls.stdout);
    assert!(rows[0].starts_with("NAME"));
    assert!(rows[1].starts_with("EVENTS") && rows[1].ends_with("always    user.>"));
    assert!(rows[2].starts_with("ORDERS") && rows[2].ends_with("order.>, payment.>"));

    for _ in 0..2 {
        let p = run(broker.ctl(&["pub", "user.created", "u", "--stored"]), None).await;
        assert!(p.status.success(), "pub failed: {}", p.stderr);
    }
    let info = run(broker.ctl(&["stream", "info", "EVENTS", "--json"]), None).await;
    let v: serde_json::Value = serde_json::from_str(&info.stdout).unwrap();
    assert_eq!(
        (v["msgs"].as_u64(), v["last_seq"].as_u64()),
        (Some(2), Some(2))
    );
    assert_eq!(v["config"]["fsync"], "always");

    let purge = run(broker.ctl(&["stream", "purge", "EVENTS"]), None).await;
    assert_eq!(purge.stdout, "purged 2 messages from EVENTS\n");
    let rm = run(broker.ctl(&["stream", "rm", "EVENTS"]), None).await;
    assert_eq!(rm.stdout, "deleted stream EVENTS\n");
    // The broker's refusals exit 1 with its reason.
    let declared = run(broker.ctl(&["stream", "rm", "ORDERS"]), None).await;
    assert_eq!(declared.status.code(), Some(1));
    assert!(
        declared.stderr.contains("configuration"),
        "{}",
        declared.stderr
    );
    let gone = run(broker.ctl(&["stream", "info", "EVENTS"]), None).await;
    assert_eq!(gone.status.code(), Some(1));
    assert!(gone.stderr.contains("no stream"), "{}", gone.stderr);
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sub_replays_a_stream_with_its_sequences_and_pub_reports_what_was_stored() {
    let dir = brokerd_tests::TempDir::new("cli-replay");
    let broker = stream_broker(&dir.0).await;
    let first = run(
        broker.ctl(&["pub", "order.created", "o1", "--ack", "--msg-id", "o1"]),
        None,
    )
    .await;
    assert_eq!(
        first.stderr,
        "stored in ORDERS as seq 1; delivered to 0 subscribers\npublished 1 message to order.created\n"
    );
    let retry = run(
        broker.ctl(&["pub", "order.created", "o1", "--ack", "--msg-id", "o1"]),
        None,
    )
    .await;
    assert!(
        retry.stderr.starts_with(
            "duplicate: ORDERS already stored this message id as seq 1; nothing stored or delivered\n"
        ),
        "{}",
        retry.stderr
    );
    let paid = run(
        broker.ctl(&["pub", "payment.completed", "p2", "--stored"]),
        None,
    )
    .await;
    assert!(
        paid.stderr.starts_with("stored in ORDERS as seq 2;"),
        "{}",
        paid.stderr
    );
    // --stored fails when no stream captures the topic; --ack does not.
    let uncaptured = run(broker.ctl(&["pub", "user.created", "u", "--stored"]), None).await;
    assert_eq!(uncaptured.status.code(), Some(1));
    assert!(
        uncaptured
            .stderr
            .contains("no stream stored the message to user.created"),
        "{}",
        uncaptured.stderr
    );

    let all = run(
        broker.ctl(&["sub", "--stream", "ORDERS", "--count", "2"]),
        None,
    )
    .await;
    assert!(all.status.success(), "sub failed: {}", all.stderr);
    assert_eq!(
        all.stdout,
        "#1 order.created [Brokerd-Msg-Id=o1] o1\n#2 payment.completed p2\n"
    );
    assert_eq!(
        all.stderr,
        format!(
            "replaying > from stream ORDERS, from the start, on {}\n",
            broker.addr
        )
    );
    let json = run(
        broker.ctl(&[
            "sub",
            "payment.*",
            "--stream",
            "ORDERS",
            "--from",
            "seq:2",
            "--count",
            "1",
            "--json",
        ]),
        None,
    )
    .await;
    let v: serde_json::Value = serde_json::from_str(&json.stdout).unwrap();
    assert_eq!(
        (v["seq"].as_u64(), v["stream"].as_str()),
        (Some(2), Some("ORDERS"))
    );
    let missing = run(
        broker.ctl(&["sub", "--stream", "NOPE", "--count", "1"]),
        None,
    )
    .await;
    assert_eq!(missing.status.code(), Some(1));
    assert!(
        missing.stderr.contains("NoSuchStream"),
        "{}",
        missing.stderr
    );
    broker.stop().await;
}

/// The state of consumer `name` of ORDERS, as `stream info --json` shows it.
async fn consumer_json(broker: &Broker, name: &str) -> serde_json::Value {
    let info = run(broker.ctl(&["stream", "info", "ORDERS", "--json"]), None).await;
    assert!(info.status.success(), "info failed: {}", info.stderr);
    let v: serde_json::Value = serde_json::from_str(&info.stdout).unwrap();
    v["consumers"]
        .as_array()
        .and_then(|all| all.iter().find(|k| k["name"] == name))
        .cloned()
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consume_prints_acknowledges_and_the_next_run_goes_on_after() {
    let dir = brokerd_tests::TempDir::new("cli-consume");
    let broker = stream_broker(&dir.0).await;
    let stored = run(
        broker.ctl(&["pub", "order.created", "--stored"]),
        Some(b"o1\no2\no3\no4\no5\n"),
    )
    .await;
    assert!(stored.status.success(), "pub failed: {}", stored.stderr);

    let first = run(
        broker.ctl(&["consume", "ORDERS", "billing", "--count", "3"]),
        None,
    )
    .await;
    assert!(first.status.success(), "consume failed: {}", first.stderr);
    assert_eq!(
        first.stdout,
        "#1 order.created o1\n#2 order.created o2\n#3 order.created o3\n"
    );
    assert_eq!(
        first.stderr,
        format!(
            "consuming > from stream ORDERS as consumer billing, on {}\n",
            broker.addr
        )
    );
    // The next member takes over after what was acknowledged: what the first had received
    // beyond its count went back to the consumer when it left.
    let second = run(
        broker.ctl(&["consume", "ORDERS", "billing", "--count", "2", "--json"]),
        None,
    )
    .await;
    assert!(second.status.success(), "consume failed: {}", second.stderr);
    let lines: Vec<serde_json::Value> = second
        .stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let seqs: Vec<(Option<u64>, Option<&str>)> = lines
        .iter()
        .map(|v| (v["seq"].as_u64(), v["payload"].as_str()))
        .collect();
    assert_eq!(seqs, [(Some(4), Some("o4")), (Some(5), Some("o5"))]);
    assert_eq!(lines[0]["stream"], "ORDERS");

    // Refused, it comes back; acknowledged, it does not.
    let p = run(broker.ctl(&["pub", "order.paid", "o6", "--stored"]), None).await;
    assert!(p.status.success(), "pub failed: {}", p.stderr);
    let refusing = run(
        broker.ctl(&[
            "consume",
            "ORDERS",
            "billing",
            "--count",
            "2",
            "--nak-every",
            "1",
        ]),
        None,
    )
    .await;
    assert!(
        refusing.status.success(),
        "consume failed: {}",
        refusing.stderr
    );
    assert_eq!(refusing.stdout, "#6 order.paid o6\n#6 order.paid o6\n");
    assert_eq!(
        refusing
            .stderr
            .matches("brokerctl: refused #6 (--nak-every); the consumer delivers it again\n")
            .count(),
        2,
        "{}",
        refusing.stderr
    );
    let last = run(
        broker.ctl(&["consume", "ORDERS", "billing", "--count", "1"]),
        None,
    )
    .await;
    assert_eq!(last.stdout, "#6 order.paid o6\n");

    // `stream info` shows the consumer done to the last one, with nothing in flight.
    common::wait_until_async("the consumer done to #6", || async {
        let k = consumer_json(&broker, "billing").await;
        k["floor"] == 6 && k["in_flight"] == 0
    })
    .await;
    let k = consumer_json(&broker, "billing").await;
    // Each message delivered once, and again as often as the runs made it come back (how many
    // the first one had received beyond its count depends on timing).
    let first_deliveries = k["delivered"].as_u64().unwrap() - k["redelivered"].as_u64().unwrap();
    assert_eq!(first_deliveries, 6, "{k}");
    let info = run(broker.ctl(&["stream", "info", "ORDERS"]), None).await;
    assert!(
        info.stdout
            .contains("consumers      billing (>): done to seq 6, 0 in flight, 0 members, "),
        "{}",
        info.stdout
    );

    let missing = run(
        broker.ctl(&["consume", "NOPE", "billing", "--count", "1"]),
        None,
    )
    .await;
    assert_eq!(missing.status.code(), Some(1));
    assert!(
        missing
            .stderr
            .contains("cannot join consumer billing of stream NOPE")
            && missing.stderr.contains("NoSuchStream"),
        "{}",
        missing.stderr
    );
    broker.stop().await;
}
