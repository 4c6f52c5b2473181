//! `brokerctl bench hold` (hidden): opens idle connections that each hold subscriptions, so the
//! broker's resident memory can be read while they exist (`scripts/memory.sh` drives it).
//!
//! It speaks the protocol directly (HELLO and SUB frames written per `docs/protocol.md`, replies
//! decoded with `brokerd-proto`) instead of using `brokerd-client`: a client-library connection
//! allocates two 64 KiB buffers and a channel per subscription, which for 10,000 connections or a
//! million subscriptions would measure the tool, not the broker. Each connection answers the
//! broker's keep-alive `PING`s while it is held.

use crate::Global;
use anyhow::{Context, Result, bail};
use brokerd_proto::{Frame, decode};
use bytes::{BufMut, BytesMut};
use clap::Args;
use std::path::PathBuf;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::net::tcp::OwnedReadHalf;
use tokio::task::JoinSet;
use tokio::time::{Instant, timeout};

/// Arguments of `brokerctl bench hold`.
#[derive(Debug, Clone, Args)]
pub(crate) struct HoldArgs {
    /// Connections to open.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    conns: u32,
    /// Subscriptions per connection, each with its own filter `mem.c<conn>.s<i>`.
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u32).range(0..=10_000_000))]
    subs_per_conn: u32,
    /// How long to hold everything open once set up.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    hold: Duration,
    /// File to create once every subscription is confirmed (a script waits for it).
    #[arg(long)]
    ready_file: Option<PathBuf>,
    /// Connections set up at the same time.
    #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    parallel: u32,
}

/// How long setting up one connection and its subscriptions may take.
const SETUP_TIMEOUT: Duration = Duration::from_secs(120);

/// Runs the hold scenario.
pub(crate) async fn run(global: &Global, args: &HoldArgs) -> Result<()> {
    let started = Instant::now();
    let mut setup = JoinSet::new();
    let mut held = Vec::with_capacity(args.conns as usize);
    let mut next = 0u32;
    while next < args.conns || !setup.is_empty() {
        while next < args.conns && setup.len() < args.parallel as usize {
            let server = global.server.clone();
            let (conn, subs) = (next, args.subs_per_conn);
            setup.spawn(async move {
                timeout(SETUP_TIMEOUT, open(&server, conn, subs))
                    .await
                    .with_context(|| format!("connection {conn} not set up in time"))?
            });
            next += 1;
        }
        if let Some(r) = setup.join_next().await {
            held.push(r.context("a setup task failed")??);
        }
    }
    eprintln!(
        "holding {} connections with {} subscriptions each (set up in {:.1} s) for {:?}",
        args.conns,
        args.subs_per_conn,
        started.elapsed().as_secs_f64(),
        args.hold
    );
    if let Some(path) = &args.ready_file {
        std::fs::write(path, b"ready\n")
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    let mut keepalive = JoinSet::new();
    for (rd, wr) in held {
        keepalive.spawn(answer_pings(rd, wr));
    }
    tokio::time::sleep(args.hold).await;
    keepalive.abort_all();
    Ok(())
}

/// Connects, says HELLO, subscribes `subs` filters and waits for every `OK`.
async fn open(
    server: &str,
    conn: u32,
    subs: u32,
) -> Result<(OwnedReadHalf, tokio::net::tcp::OwnedWriteHalf)> {
    let stream = TcpStream::connect(server)
        .await
        .with_context(|| format!("cannot connect to {server}"))?;
    let (mut rd, mut wr) = stream.into_split();
    let writer = async {
        let mut out = BytesMut::with_capacity(64 * 1024);
        put_hello(&mut out, &format!("hold-{conn}"));
        for sid in 1..=subs {
            put_sub(&mut out, sid, sid, &format!("mem.c{conn}.s{sid}"));
            if out.len() >= 60 * 1024 {
                wr.write_all(&out).await?;
                out.clear();
            }
        }
        wr.write_all(&out).await?;
        anyhow::Ok(())
    };
    // Replies are read while SUBs are still being written: the broker stops reading a
    // connection whose replies pile up unread.
    let reader = async {
        let mut buf = BytesMut::with_capacity(16 * 1024);
        let (mut welcomed, mut oks) = (false, 0u32);
        while !welcomed || oks < subs {
            while let Some(frame) = decode(&mut buf, usize::MAX)? {
                match frame {
                    Frame::Welcome(_) => welcomed = true,
                    Frame::Ok(_) => oks += 1,
                    Frame::Err(e) => bail!("broker refused: {} ({})", e.message, e.code),
                    _ => {}
                }
            }
            if !welcomed || oks < subs {
                if buf.capacity() - buf.len() < 1024 {
                    buf.reserve(16 * 1024);
                }
                if rd.read_buf(&mut buf).await? == 0 {
                    bail!("broker closed the connection during setup");
                }
            }
        }
        anyhow::Ok(())
    };
    tokio::try_join!(writer, reader)?;
    Ok((rd, wr))
}

/// Answers `PING`s until the connection closes or the task is aborted.
async fn answer_pings(mut rd: OwnedReadHalf, mut wr: tokio::net::tcp::OwnedWriteHalf) {
    let mut buf = BytesMut::with_capacity(256);
    loop {
        match rd.read_buf(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        while let Ok(Some(frame)) = decode(&mut buf, usize::MAX) {
            if let Frame::Ping(token) = frame {
                let mut out = BytesMut::new();
                Frame::Pong(token).encode(&mut out);
                if wr.write_all(&out).await.is_err() {
                    return;
                }
            }
        }
        buf.reserve(256);
    }
}

/// Appends a `HELLO` (protocol version 1, no flags, server-default overflow policy).
pub(super) fn put_hello(out: &mut BytesMut, name: &str) {
    out.put_u32((11 + name.len()) as u32);
    out.put_u8(0x01);
    out.put_u32(0);
    out.put_u16(1);
    out.put_u8(0);
    out.put_u8(0);
    put_str16(out, name);
}

/// Appends a `SUB` with no flags.
pub(super) fn put_sub(out: &mut BytesMut, req_id: u32, sid: u32, filter: &str) {
    out.put_u32((12 + filter.len()) as u32);
    out.put_u8(0x03);
    out.put_u32(req_id);
    out.put_u32(sid);
    out.put_u8(0);
    put_str16(out, filter);
}

/// Appends a `str16`; the callers' strings are short, well under 65535 bytes.
fn put_str16(out: &mut BytesMut, s: &str) {
    out.put_u16(s.len() as u16);
    out.put_slice(s.as_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hand_encoded_frames_decode() {
        let mut b = BytesMut::new();
        put_hello(&mut b, "hold-1");
        put_sub(&mut b, 7, 9, "mem.c1.s9");
        match decode(&mut b, usize::MAX).unwrap() {
            Some(Frame::Hello(h)) => assert_eq!(h.name, "hold-1"),
            other => panic!("expected HELLO, got {other:?}"),
        }
        match decode(&mut b, usize::MAX).unwrap() {
            Some(Frame::Sub(s)) => {
                assert_eq!((s.req_id, s.sid, s.filter.as_str()), (7, 9, "mem.c1.s9"));
            }
            other => panic!("expected SUB, got {other:?}"),
        }
        assert!(b.is_empty());
    }
}
