//! Streams against `kill -9`: the `brokerd` binary is killed while publishers publish with
//! acknowledgements, then started again on the same data directory.
//!
//! Under `fsync = always`, every acknowledged message must be there after the restart, in order,
//! with contiguous sequences; publishers then send again, with the same message ids, everything
//! they sent and never saw acknowledged, and nothing may end up stored twice. Under
//! `fsync = interval` a killed process loses nothing either (the page cache survives it; only a
//! power failure loses the last interval, which a test cannot cause), so the same checks apply.
//! The sizes scale with `BROKERD_CRASH_PUBLISHERS` and `BROKERD_CRASH_MS`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use brokerd_proto::{Body, Frame, Headers, Publish, StartPosition, StreamStart, Subscribe};
use common::harness::{Brokerd, Conn, scale};
use std::collections::{BTreeMap, HashSet};
use std::net::{Ipv4Addr, SocketAddr};
use std::thread::JoinHandle;
use std::time::Duration;

fn config(data_dir: &std::path::Path, fsync: &str) -> String {
    format!(
        "http = \"off\"\ndata_dir = \"{}\"\n\n[[streams]]\nname = \"ORDERS\"\nfilters = [\"order.>\"]\nfsync = \"{fsync}\"\nsegment_bytes = 65536\n",
        data_dir.display()
    )
}

fn publish(req_id: u32, id: &str) -> Vec<u8> {
    let mut h = Headers::new();
    h.insert("Brokerd-Msg-Id", id);
    let body = Body::encode("order.created", None, Some(&h), id.as_bytes());
    Frame::Pub(Publish {
        req_id,
        ack: true,
        body: Body::parse(body).unwrap(),
    })
    .to_bytes()
    .to_vec()
}

/// What one publisher saw: every id it sent, and the sequence of each one acknowledged.
struct Outcome {
    sent: Vec<String>,
    acked: BTreeMap<String, u64>,
}

/// Publishes in windows of 32 until the broker goes away.
fn publisher(addr: SocketAddr, n: usize) -> JoinHandle<Outcome> {
    std::thread::spawn(move || {
        let mut c = Conn::handshake(addr, Ipv4Addr::LOCALHOST, &format!("p{n}"));
        let mut out = Outcome {
            sent: Vec::new(),
            acked: BTreeMap::new(),
        };
        let mut req = 0u32;
        'run: loop {
            let mut window = Vec::new();
            for _ in 0..32 {
                req += 1;
                let id = format!("p{n}-{req}");
                window.push((req, id.clone()));
                out.sent.push(id);
            }
            let frames: Vec<u8> = window.iter().flat_map(|(r, id)| publish(*r, id)).collect();
            if std::io::Write::write_all(&mut c.s, &frames).is_err() {
                break;
            }
            for _ in 0..window.len() {
                match c.recv() {
                    Some(Frame::Stored(s)) => {
                        let id = &window[(s.req_id - window[0].0) as usize].1;
                        out.acked.insert(id.clone(), s.seq);
                    }
                    _ => break 'run,
                }
            }
        }
        out
    })
}

/// The stream's newest sequence, asked with `$SYS.req.stream.info`.
fn last_seq(addr: SocketAddr) -> u64 {
    let mut c = Conn::handshake(addr, Ipv4Addr::LOCALHOST, "info");
    c.send(&common::harness::wire::sub(1, 1, "_INBOX.crash"));
    assert_eq!(c.recv(), Some(Frame::Ok(1)));
    c.send(&common::harness::wire::request(
        2,
        "$SYS.req.stream.info",
        "_INBOX.crash",
        br#"{"name":"ORDERS"}"#,
    ));
    match c.recv() {
        Some(Frame::Msg(m)) => {
            let a: brokerd_proto::streams::StreamAnswer =
                serde_json::from_slice(&m.body.payload()).unwrap();
            a.stream.expect("the stream's info").last_seq
        }
        other => panic!("expected the answer, got {other:?}"),
    }
}

/// Every stored message, replayed: (sequence, payload).
fn replay_all(addr: SocketAddr) -> Vec<(u64, String)> {
    let last = last_seq(addr);
    let mut c = Conn::handshake(addr, Ipv4Addr::LOCALHOST, "reader");
    let sub = Frame::Sub(Subscribe {
        req_id: 1,
        sid: 1,
        filter: ">".into(),
        queue: None,
        stream: Some(StreamStart {
            stream: "ORDERS".into(),
            start: StartPosition::All,
            consumer: None,
        }),
    });
    c.send(&sub.to_bytes());
    assert_eq!(c.recv(), Some(Frame::Ok(1)));
    let mut out: Vec<(u64, String)> = Vec::new();
    while out.last().is_none_or(|m| m.0 < last) && last > 0 {
        match c.recv() {
            Some(Frame::Msg(m)) => {
                out.push((m.seq, String::from_utf8(m.body.payload().to_vec()).unwrap()))
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    out
}

fn crash_and_recover(fsync: &str) {
    let data =
        std::env::temp_dir().join(format!("brokerd-crash-data-{fsync}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&data);
    let publishers = scale("BROKERD_CRASH_PUBLISHERS", 4);
    let run_ms = scale("BROKERD_CRASH_MS", 400) as u64;
    let b = Brokerd::start(&format!("crash-{fsync}"), &config(&data, fsync));
    let threads: Vec<_> = (0..publishers).map(|n| publisher(b.addr, n)).collect();
    std::thread::sleep(Duration::from_millis(run_ms));
    // SIGKILL: no shutdown, no final sync.
    drop(b);
    let outcomes: Vec<Outcome> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    let acked: usize = outcomes.iter().map(|o| o.acked.len()).sum();
    assert!(
        acked > 0,
        "the publishers got acknowledgements before the kill"
    );

    let b = Brokerd::start(&format!("crash-{fsync}"), &config(&data, fsync));
    let stored = replay_all(b.addr);
    let seqs: Vec<u64> = stored.iter().map(|s| s.0).collect();
    let first = seqs.first().copied().unwrap_or(1);
    assert_eq!(first, 1);
    assert_eq!(
        seqs,
        (1..=seqs.len() as u64).collect::<Vec<_>>(),
        "contiguous, in order"
    );
    let by_payload: BTreeMap<&str, u64> = stored.iter().map(|(s, p)| (p.as_str(), *s)).collect();
    assert_eq!(by_payload.len(), stored.len(), "no message stored twice");
    for o in &outcomes {
        for (id, seq) in &o.acked {
            assert_eq!(
                by_payload.get(id.as_str()),
                Some(seq),
                "acknowledged {id} kept its sequence"
            );
        }
    }
    // Retries of everything not acknowledged, with the same ids.
    let mut c = Conn::handshake(b.addr, Ipv4Addr::LOCALHOST, "retry");
    let mut retried = 0;
    let mut duplicates = 0;
    let mut req = 0u32;
    for o in &outcomes {
        for id in o.sent.iter().filter(|id| !o.acked.contains_key(*id)) {
            req += 1;
            c.send(&publish(req, id));
            match c.recv() {
                Some(Frame::Stored(s)) => {
                    retried += 1;
                    if s.duplicate {
                        duplicates += 1;
                        assert_eq!(by_payload.get(id.as_str()), Some(&s.seq));
                    }
                }
                other => panic!("retry of {id}: {other:?}"),
            }
        }
    }
    let after = replay_all(b.addr);
    let unique: HashSet<&str> = after.iter().map(|(_, p)| p.as_str()).collect();
    assert_eq!(unique.len(), after.len(), "a retried message stored twice");
    let sent: usize = outcomes.iter().map(|o| o.sent.len()).sum();
    assert_eq!(
        after.len(),
        sent,
        "every message sent is stored exactly once"
    );
    println!(
        "streams-crash fsync={fsync}: {acked} acknowledged before kill -9, {} stored, {retried} retried ({duplicates} already stored)",
        stored.len()
    );
    drop(b);
    let _ = std::fs::remove_dir_all(&data);
}

#[test]
fn kill_9_under_fsync_always_loses_no_acknowledged_message_and_stores_no_retry_twice() {
    crash_and_recover("always");
}

#[test]
fn kill_9_under_fsync_interval_loses_nothing_a_process_crash_can_take() {
    crash_and_recover("interval");
}

/// Whether this process runs as root (mounting a small filesystem needs it).
fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .map(|l| l.split_whitespace().nth(1) == Some("0"))
        })
        .unwrap_or(false)
}

/// Unmounts the small filesystem however the test ends.
struct Mount(std::path::PathBuf);

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).status();
        let _ = std::fs::remove_dir(&self.0);
    }
}

#[test]
fn a_full_filesystem_refuses_publishes_clearly_and_keeps_what_is_stored() {
    if !is_root() {
        eprintln!("skipped: mounting a 1 MiB tmpfs needs root (CI runs as root)");
        return;
    }
    let dir = std::env::temp_dir().join(format!("brokerd-tmpfs-mount-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let status = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=1m", "tmpfs"])
        .arg(&dir)
        .status()
        .unwrap();
    assert!(status.success(), "mount a 1 MiB tmpfs at {}", dir.display());
    let mount = Mount(dir.clone());
    let config = format!(
        "http = \"off\"\ndata_dir = \"{}\"\n\n[[streams]]\nname = \"ORDERS\"\nfilters = [\"order.>\"]\nfsync = \"always\"\nsegment_bytes = 65536\n",
        dir.join("data").display()
    );
    let b = Brokerd::start("fullfs", &config);
    let mut c = Conn::handshake(b.addr, Ipv4Addr::LOCALHOST, "filler");
    let payload = vec![b'x'; 1000];
    let mut acked = Vec::new();
    let mut refusal = None;
    for req in 1..=5_000u32 {
        let body = Body::encode("order.created", None, None, &payload);
        c.send(
            &Frame::Pub(Publish {
                req_id: req,
                ack: true,
                body: Body::parse(body).unwrap(),
            })
            .to_bytes(),
        );
        match c.recv() {
            Some(Frame::Stored(s)) => acked.push(s.seq),
            Some(Frame::Err(e)) => {
                refusal = Some(e);
                break;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    let e = refusal.expect("a 1 MiB filesystem fills up within 5 MB of publishes");
    assert_eq!(e.code, brokerd_proto::ErrorCode::StoreFailed as u16);
    assert!(
        e.message.contains("no space"),
        "a clear message: {}",
        e.message
    );
    assert!(!acked.is_empty());
    // The connection and the broker go on; a second try is refused the same way.
    let body = Body::encode("order.created", None, None, &payload);
    c.send(
        &Frame::Pub(Publish {
            req_id: 9_999,
            ack: true,
            body: Body::parse(body).unwrap(),
        })
        .to_bytes(),
    );
    assert!(
        matches!(c.recv(), Some(Frame::Err(e)) if e.code == brokerd_proto::ErrorCode::StoreFailed as u16)
    );
    let stored: Vec<u64> = replay_all(b.addr).iter().map(|m| m.0).collect();
    assert_eq!(stored, acked, "everything acknowledged, nothing else");
    drop(c);
    drop(b);
    // And after a restart on the still-full filesystem.
    let b = Brokerd::start("fullfs", &config);
    let stored: Vec<u64> = replay_all(b.addr).iter().map(|m| m.0).collect();
    assert_eq!(stored, acked);
    println!(
        "streams-fullfs: {} messages of 1000 B stored on a 1 MiB tmpfs, then: {}",
        acked.len(),
        e.message
    );
    drop(b);
    drop(mount);
}
