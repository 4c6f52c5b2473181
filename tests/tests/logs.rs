//! Client-supplied text in the broker's logs: a client name holding a line break, a forged
//! timestamp and terminal escapes must come out escaped, on the line it belongs to, never as a
//! line of its own (`docs/operations.md`, "Logs").
//!
//! The broker runs in this test's current-thread runtime, so a subscriber set as this thread's
//! default sees every event of the server's tasks; it formats them as `brokerd` does (plain
//! text, no colour) into a buffer the test then reads.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use brokerd_tests::{RawConn, TestBroker, wait_until, wire};
use std::io::Write;
use std::sync::{Arc, Mutex};

/// Log output collected in memory.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Captured {
    fn text(&self) -> String {
        String::from_utf8(self.0.lock().unwrap().clone()).unwrap()
    }
}

const FORGED: &str = "2026-01-01T00:00:00Z INFO brokerd listening FORGED";

#[tokio::test]
async fn a_client_name_cannot_forge_log_lines_or_send_escapes() {
    let captured = Captured::default();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::DEBUG)
        .with_ansi(false)
        .with_writer({
            let captured = captured.clone();
            move || captured.clone()
        })
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);

    let b = TestBroker::start().await;
    let name = format!("x\n{FORGED}\x1b[31m\u{202e}");
    // One connection closes cleanly (an `info` line), one breaks the protocol (`warn`).
    let clean = RawConn::handshake(b.addr, &name, 0).await;
    let mut broken = RawConn::handshake(b.addr, &name, 0).await;
    // The statistics keep the name as given; only logs escape it.
    assert!(b.broker.clients().iter().all(|c| c.name == name));
    drop(clean);
    broken.send_bytes(&wire::hello(2, &name, 0)).await;
    broken.expect_err().await;
    broken.expect_closed().await;
    wait_until("both closes counted", || {
        b.closes("client-closed") == 1 && b.closes("protocol-error") == 1
    })
    .await;
    b.stop().await;

    let text = captured.text();
    assert!(!text.contains('\x1b'), "a raw ESC reached the log:\n{text}");
    assert!(
        !text.contains('\u{202e}'),
        "a raw bidi override reached the log:\n{text}"
    );
    for line in text.lines() {
        assert!(
            !line.starts_with("2026-01-01") && !line.starts_with("FORGED"),
            "forged line: {line:?}"
        );
    }
    let escaped = format!("x\\n{FORGED}\\u{{1b}}[31m\\u{{202e}}");
    let named: Vec<&str> = text.lines().filter(|l| l.contains("FORGED")).collect();
    // Each connection logs its opening (debug) and its close: four lines, all whole.
    assert_eq!(named.len(), 4, "{text}");
    for line in named {
        assert!(line.contains(&escaped), "{line:?}");
        assert!(
            line.contains("client connected") || line.contains("connection closed"),
            "{line:?}"
        );
    }
}
