//! The `brokerd` binary as an operator runs it: `--print-config`, a bad config file (exit code 2
//! naming the key), and SIGTERM ending a running broker gracefully with exit code 0.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use brokerd_proto::{Frame, Hello, PROTOCOL_VERSION, decode};
use bytes::BytesMut;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_brokerd");

/// How long any wait may take before the test fails.
const DEADLINE: Duration = Duration::from_secs(20);

/// Pause between polls.
const POLL: Duration = Duration::from_millis(20);

/// Polls `probe` until it yields a value; panics naming `what` after [`DEADLINE`].
fn poll_until<T>(what: &str, mut probe: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + DEADLINE;
    loop {
        if let Some(v) = probe() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(POLL);
    }
}

#[test]
fn print_config_shows_the_defaults() {
    let out = Command::new(BIN).arg("--print-config").output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    let printed = brokerd_server::Config::from_toml(&text, "stdout").unwrap();
    assert_eq!(printed, brokerd_server::Config::default());
}

#[test]
fn flags_override_the_file() {
    let out = Command::new(BIN)
        .args(["--print-config", "--listen", "127.0.0.2:9999"])
        .output()
        .unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("listen = \"127.0.0.2:9999\""), "{text}");
}

#[test]
fn an_open_broker_on_a_reachable_address_is_refused_unless_asked_for() {
    let out = Command::new(BIN)
        .args(["--print-config", "--listen", "0.0.0.0:9999"])
        .env_remove("BROKERD_AUTH_TOKEN")
        .env_remove("BROKERD_ALLOW_ANONYMOUS")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(
        err.contains("--allow-anonymous") && err.contains("BROKERD_AUTH_TOKEN"),
        "{err}"
    );
    for (flag, env) in [
        (
            Some("--allow-anonymous"),
            ("BROKERD_ALLOW_ANONYMOUS", "false"),
        ),
        (None, ("BROKERD_ALLOW_ANONYMOUS", "true")),
        (None, ("BROKERD_AUTH_TOKEN", "secret-token")),
    ] {
        let out = Command::new(BIN)
            .args(["--print-config", "--listen", "0.0.0.0:9999"])
            .args(flag)
            .env(env.0, env.1)
            .output()
            .unwrap();
        assert!(out.status.success(), "{flag:?} {env:?}");
        let text = String::from_utf8(out.stdout).unwrap();
        assert!(!text.contains("secret-token"), "the token is never printed");
    }
}

#[test]
fn hash_password_reads_stdin_and_prints_a_hash_the_server_accepts() {
    use std::io::Write;
    let mut child = Command::new(BIN)
        .arg("hash-password")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"correct horse\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    let hash = String::from_utf8(out.stdout).unwrap();
    let hash = hash.trim();
    assert!(hash.starts_with("$argon2id$"), "{hash}");
    assert!(!hash.contains("correct horse"));
    let text = format!("[[auth.users]]\nname = \"u\"\npassword_hash = \"{hash}\"\n");
    brokerd_server::Config::from_toml(&text, "t").unwrap();
    // An empty password is refused.
    let out = Command::new(BIN)
        .arg("hash-password")
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    // So is one longer than a login takes.
    let mut child = Command::new(BIN)
        .arg("hash-password")
        .stdin(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut long = vec![b'p'; brokerd_server::auth::MAX_SECRET + 1];
    long.push(b'\n');
    child.stdin.take().unwrap().write_all(&long).unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("4096"));
}

#[test]
fn bad_config_exits_2_naming_the_key() {
    let dir = std::env::temp_dir().join(format!("brokerd-bad-config-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("bad.toml");
    std::fs::write(&path, "[outbound]\nmax_pending_msgs = \"lots\"\n").unwrap();
    let out = Command::new(BIN)
        .arg("--config")
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(err.contains("max_pending_msgs"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn sigterm_shuts_down_gracefully_with_exit_0() {
    let mut child = Command::new(BIN)
        .args(["--listen", "127.0.0.1:0", "--log-level", common::LOG_FILTER])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let addr = common::listening_addr(child.stderr.take().unwrap(), DEADLINE);
    let mut stream = TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let hello = Frame::Hello(Hello {
        req_id: 1,
        version: PROTOCOL_VERSION,
        no_echo: false,
        overflow: None,
        name: "binary-test".into(),
        credentials: None,
    });
    stream.write_all(&hello.to_bytes()).unwrap();
    let mut buf = BytesMut::new();
    let mut chunk = [0u8; 4096];
    let welcome = loop {
        if let Some(f) = decode(&mut buf, usize::MAX).unwrap() {
            break f;
        }
        let n = stream.read(&mut chunk).unwrap();
        assert!(n > 0, "closed before WELCOME");
        buf.extend_from_slice(&chunk[..n]);
    };
    assert!(matches!(welcome, Frame::Welcome(_)));

    let kill = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    let status = poll_until("brokerd to exit after SIGTERM", || {
        child.try_wait().unwrap()
    });
    assert_eq!(status.code(), Some(0));
    // The connected client was told why before the connection closed.
    let mut rest = Vec::new();
    let _ = stream.read_to_end(&mut rest);
    buf.extend_from_slice(&rest);
    match decode(&mut buf, usize::MAX).unwrap() {
        Some(Frame::Err(e)) => assert_eq!(e.code, brokerd_proto::ErrorCode::ShuttingDown as u16),
        other => panic!("expected ERR shutting-down, got {other:?}"),
    }
}
