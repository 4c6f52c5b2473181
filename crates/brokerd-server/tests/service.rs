//! `brokerd` run as a service: SIGHUP reloads (a limit changes on a live connection, a bad file
//! keeps the configuration in force), JSON logs, `--health`, `--check-config`, and shutdown that
//! works with stderr closed and ends at once on a second signal.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use brokerd_proto::{ErrorCode, Frame, Hello, PROTOCOL_VERSION, decode};
use bytes::BytesMut;
use common::harness::wire;
use std::io::{BufRead, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{Receiver, channel};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_brokerd");

/// How long any wait may take before the test fails.
const DEADLINE: Duration = Duration::from_secs(20);

/// A scratch directory for one test's files, removed at the end.
struct Scratch(PathBuf);

impl Scratch {
    fn new(test: &str) -> Scratch {
        let dir =
            std::env::temp_dir().join(format!("brokerd-service-{test}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }

    fn write(&self, name: &str, text: &str) -> PathBuf {
        let path = self.0.join(name);
        std::fs::write(&path, text).unwrap();
        path
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A running `brokerd` whose log lines arrive on a channel.
struct Daemon {
    child: Child,
    lines: Receiver<String>,
    addr: SocketAddr,
}

impl Daemon {
    /// Starts `brokerd --config path` with JSON logs and waits for its listening line.
    fn start(config: &Path) -> Daemon {
        let mut child = Command::new(BIN)
            .arg("--config")
            .arg(config)
            .args(["--log-format", "json"])
            .env_remove("RUST_LOG")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let (tx, lines) = channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stderr)
                .lines()
                .map_while(Result::ok)
            {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut d = Daemon {
            child,
            lines,
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
        };
        let line = d.wait_for_line("brokerd listening");
        let addr = line["fields"]["addr"].as_str().unwrap().parse().unwrap();
        d.addr = addr;
        d
    }

    /// Waits for a log line whose message contains `what`; every line must be one JSON object.
    fn wait_for_line(&mut self, what: &str) -> serde_json::Value {
        let deadline = Instant::now() + DEADLINE;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = self
                .lines
                .recv_timeout(left)
                .unwrap_or_else(|e| panic!("no log line saying {what:?}: {e}"));
            let v: serde_json::Value = serde_json::from_str(&line)
                .unwrap_or_else(|e| panic!("log line is not JSON ({e}): {line}"));
            assert!(
                v["timestamp"].is_string() && v["level"].is_string(),
                "{line}"
            );
            if v["fields"]["message"]
                .as_str()
                .is_some_and(|m| m.contains(what))
            {
                return v;
            }
        }
    }

    fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .args([&format!("-{name}"), &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    fn wait_exit(&mut self) -> std::process::ExitStatus {
        let deadline = Instant::now() + DEADLINE;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "brokerd did not exit");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A blocking protocol connection that has completed its handshake.
struct Conn {
    stream: TcpStream,
    buf: BytesMut,
    next_req: u32,
}

impl Conn {
    fn open(addr: SocketAddr, name: &str, token: Option<&str>) -> Conn {
        let stream = TcpStream::connect(addr).unwrap();
        stream.set_read_timeout(Some(DEADLINE)).unwrap();
        let mut c = Conn {
            stream,
            buf: BytesMut::new(),
            next_req: 2,
        };
        c.send(&Frame::Hello(Hello {
            req_id: 1,
            version: PROTOCOL_VERSION,
            no_echo: false,
            overflow: None,
            name: name.into(),
            credentials: token.map(|t| brokerd_proto::Credentials::Token(t.into())),
        }));
        match c.recv() {
            Some(Frame::Welcome(_)) => c,
            other => panic!("expected WELCOME, got {other:?}"),
        }
    }

    fn send(&mut self, frame: &Frame) {
        self.stream.write_all(&frame.to_bytes()).unwrap();
    }

    fn recv(&mut self) -> Option<Frame> {
        let mut chunk = [0u8; 16 * 1024];
        loop {
            if let Some(f) = decode(&mut self.buf, usize::MAX).unwrap() {
                return Some(f);
            }
            match self.stream.read(&mut chunk) {
                Ok(0) | Err(_) => return None,
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
            }
        }
    }

    /// Publishes `len` bytes with an acknowledgement: `Ok(delivered)` or `Err(code)`.
    fn publish(&mut self, topic: &str, len: usize) -> Result<u32, u16> {
        let req_id = self.next_req;
        self.next_req += 1;
        self.stream
            .write_all(&wire::publish(req_id, true, topic, &vec![b'x'; len]))
            .unwrap();
        match self.recv() {
            Some(Frame::Ack {
                req_id: r,
                delivered,
            }) if r == req_id => Ok(delivered),
            Some(Frame::Err(e)) if e.req_id == req_id => Err(e.code),
            other => panic!("expected ACK or ERR for {req_id}, got {other:?}"),
        }
    }
}

#[test]
fn sighup_changes_a_limit_on_a_live_connection_and_a_bad_file_keeps_the_old_one() {
    let dir = Scratch::new("reload");
    let base = "listen = \"127.0.0.1:0\"\nlog_level = \"info\"\n";
    let path = dir.write(
        "brokerd.toml",
        &format!("{base}[limits]\nmax_payload = 1000\n"),
    );
    let mut d = Daemon::start(&path);
    let mut c = Conn::open(d.addr, "reload-test", None);
    let too_large = ErrorCode::PayloadTooLarge as u16;
    assert_eq!(c.publish("reload.x", 2000), Err(too_large));

    // A larger limit, on the same connection, with no reconnect.
    std::fs::write(&path, format!("{base}[limits]\nmax_payload = 5000\n")).unwrap();
    d.signal("HUP");
    let line = d.wait_for_line("configuration reloaded");
    assert!(
        line["fields"]["changed"]
            .as_str()
            .unwrap()
            .contains("limits.max_payload"),
        "{line}"
    );
    assert_eq!(c.publish("reload.x", 2000), Ok(0));

    // A file that does not load is refused, and 5000 stays in force.
    std::fs::write(&path, format!("{base}log_level = \"verbose\"\n")).unwrap();
    d.signal("HUP");
    let line = d.wait_for_line("configuration reload refused");
    assert!(
        line["fields"]["error"]
            .as_str()
            .unwrap()
            .contains("log_level"),
        "{line}"
    );
    assert_eq!(c.publish("reload.x", 2000), Ok(0));
    assert_eq!(c.publish("reload.x", 6000), Err(too_large));

    // What only a restart can change is named, and the old value stays.
    std::fs::write(
        &path,
        format!("{base}[limits]\nmax_payload = 5000\n[routing]\nmatch_cache = 10\n"),
    )
    .unwrap();
    d.signal("HUP");
    let line = d.wait_for_line("only after a restart");
    assert!(
        line["fields"]["keys"]
            .as_str()
            .unwrap()
            .contains("routing.match_cache"),
        "{line}"
    );
    d.wait_for_line("configuration reloaded");
    assert_eq!(c.publish("reload.x", 2000), Ok(0));

    // The health check answers without a close line at info level, and shutdown says what
    // it wrote.
    let health = Command::new(BIN)
        .arg("--config")
        .arg(&path)
        .arg("--health")
        .env("BROKERD_LISTEN", d.addr.to_string())
        .output()
        .unwrap();
    assert!(health.status.success(), "{health:?}");
    d.signal("TERM");
    let done = d.wait_for_line("shutdown complete");
    assert!(done["fields"]["abandoned"].is_u64(), "{done}");
    assert_eq!(d.wait_exit().code(), Some(0));
    while let Ok(line) = d.lines.try_recv() {
        assert!(!line.contains("brokerd-health"), "{line}");
    }
}

#[test]
fn users_and_their_rules_change_on_reload() {
    let dir = Scratch::new("reload-auth");
    let hash = brokerd_server::auth::hash_password("pw").unwrap();
    let user = |publish: &str| {
        format!(
            "[[auth.users]]\nname = \"app\"\npassword_hash = \"{hash}\"\npublish = {{ allow = [\"{publish}\"] }}\n"
        )
    };
    let base = "listen = \"127.0.0.1:0\"\nlog_level = \"info\"\n[auth]\ntoken = \"tok-1\"\n";
    let path = dir.write("brokerd.toml", &format!("{base}{}", user("orders.>")));
    let mut d = Daemon::start(&path);
    let mut app = {
        let stream = TcpStream::connect(d.addr).unwrap();
        stream.set_read_timeout(Some(DEADLINE)).unwrap();
        let mut c = Conn {
            stream,
            buf: BytesMut::new(),
            next_req: 2,
        };
        c.send(&Frame::Hello(Hello {
            req_id: 1,
            version: PROTOCOL_VERSION,
            no_echo: false,
            overflow: None,
            name: "app".into(),
            credentials: Some(brokerd_proto::Credentials::Password {
                user: "app".into(),
                password: "pw".into(),
            }),
        }));
        assert!(matches!(c.recv(), Some(Frame::Welcome(_))));
        c
    };
    let mut tokened = Conn::open(d.addr, "token-holder", Some("tok-1"));
    let denied = ErrorCode::PermissionDenied as u16;
    assert_eq!(app.publish("orders.new", 10), Ok(0));
    assert_eq!(app.publish("billing.new", 10), Err(denied));

    // New rules for the user and a new token: the user keeps its connection under the new
    // rules; the connection that logged in with the old token is closed.
    std::fs::write(
        &path,
        format!("{}{}", base.replace("tok-1", "tok-2"), user("billing.>")),
    )
    .unwrap();
    d.signal("HUP");
    let line = d.wait_for_line("configuration reloaded");
    assert_eq!(line["fields"]["permissions_changed"], 1, "{line}");
    assert_eq!(line["fields"]["connections_closed"], 1, "{line}");
    assert_eq!(app.publish("billing.new", 10), Ok(0));
    assert_eq!(app.publish("orders.new", 10), Err(denied));
    match tokened.recv() {
        Some(Frame::Err(e)) => {
            assert_eq!(e.code, ErrorCode::AuthenticationFailed as u16, "{e:?}")
        }
        other => panic!("expected ERR authentication-failed, got {other:?}"),
    }
    assert!(tokened.recv().is_none());
    let _ = Conn::open(d.addr, "new-token", Some("tok-2"));
    d.signal("TERM");
    assert_eq!(d.wait_exit().code(), Some(0));
}

#[test]
fn shutdown_works_with_stderr_closed_and_a_second_signal_exits_at_once() {
    let dir = Scratch::new("closed-stderr");
    // Long grace and write deadline: a subscriber that never reads keeps the drain waiting.
    let path = dir.write(
        "brokerd.toml",
        "listen = \"127.0.0.1:0\"\nlog_level = \"info\"\n[timeouts]\nshutdown_grace = \"60s\"\n\
         [outbound]\nwrite_deadline = \"60s\"\n",
    );
    let mut child = Command::new(BIN)
        .arg("--config")
        .arg(&path)
        .env_remove("RUST_LOG")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut err = std::io::BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    while !line.contains("brokerd listening") {
        line.clear();
        assert!(err.read_line(&mut line).unwrap() > 0, "brokerd ended");
    }
    let addr: SocketAddr = line
        .split_whitespace()
        .find_map(|w| w.strip_prefix("addr="))
        .unwrap()
        .parse()
        .unwrap();
    // Close the read end of the log pipe, as a `| tee` that was interrupted does: every later
    // log line fails to write.
    drop(err);
    let mut d = Daemon {
        child,
        lines: channel().1,
        addr,
    };
    let mut c = Conn::open(addr, "log-writer", None);
    for _ in 0..20 {
        // Each connection that closes writes a log line.
        drop(Conn::open(addr, "churn", None));
    }

    // A subscriber that never reads, and enough for it that its socket fills.
    let stalled = TcpStream::connect(addr).unwrap();
    let mut s = Conn {
        stream: stalled,
        buf: BytesMut::new(),
        next_req: 2,
    };
    s.send(&Frame::Hello(Hello {
        req_id: 1,
        version: PROTOCOL_VERSION,
        no_echo: false,
        overflow: None,
        name: "stalled".into(),
        credentials: None,
    }));
    s.stream.write_all(&wire::sub(2, 1, "fill.>")).unwrap();
    let _ = c.publish("fill.warmup", 10);
    for _ in 0..200 {
        let _ = c.publish("fill.x", 64 * 1024);
    }

    d.signal("TERM");
    // The shutdown has started once the listener is gone: new connections are refused.
    let deadline = Instant::now() + DEADLINE;
    while TcpStream::connect(addr).is_ok() {
        assert!(
            Instant::now() < deadline,
            "brokerd kept accepting after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        d.child.try_wait().unwrap().is_none(),
        "brokerd should still be draining to the stalled subscriber"
    );
    let started = Instant::now();
    d.signal("TERM");
    let status = d.wait_exit();
    assert_eq!(status.code(), Some(143), "{status:?}");
    assert!(started.elapsed() < Duration::from_secs(10));
    drop(s);
}

#[test]
fn check_config_validates_and_names_the_key_and_values() {
    let dir = Scratch::new("check-config");
    let good = dir.write(
        "good.toml",
        "listen = \"localhost:7700\"\n[limits]\nmax_payload = 1000\n",
    );
    let out = Command::new(BIN)
        .args(["--check-config", "--config"])
        .arg(&good)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("configuration OK"));

    let bad = dir.write("bad.toml", "[limits]\nmax_payload = 2000000\n");
    let out = Command::new(BIN)
        .args(["--check-config", "--config"])
        .arg(&bad)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("limits.max_payload") && err.contains("2000000") && err.contains("2001024"),
        "{err}"
    );

    let out = Command::new(BIN)
        .args(["--check-config", "--log-level", "verbose"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("log_level"));

    let out = Command::new(BIN)
        .args(["--check-config", "--listen", "no-such-host.invalid:7654"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("listen"));
}

#[test]
fn health_fails_where_nothing_listens_and_text_logs_have_no_colour_in_a_pipe() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let free = listener.local_addr().unwrap();
    drop(listener);
    let out = Command::new(BIN)
        .args(["--health", "--listen", &free.to_string()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("unhealthy"));

    // Text logs written to a pipe carry no escape codes.
    let mut child = Command::new(BIN)
        .args(["--listen", "127.0.0.1:0", "--log-level", "info"])
        .env_remove("RUST_LOG")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut err = std::io::BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    err.read_line(&mut line).unwrap();
    let _ = child.kill();
    let _ = child.wait();
    assert!(line.contains("brokerd listening"), "{line}");
    assert!(!line.contains('\u{1b}'), "{line:?}");
}
