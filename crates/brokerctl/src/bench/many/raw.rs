//! `brokerctl bench many --rate R --raw brokerd|nats`: the paced many-connections scenario over
//! lean connections that speak a broker's protocol directly, brokerd's (per `docs/protocol.md`,
//! frames decoded with `brokerd-proto`) or NATS's text protocol (`CONNECT`, `SUB`, `PUB`, `MSG`,
//! `PING`/`PONG`), so that the broker's CPU per message can be compared with nats-server's in one
//! run, with the same tool on both sides.
//!
//! Each connection is a plain socket and one task: a subscriber's task reads, counts and records
//! latency (answering keep-alive pings); a publisher's task writes the frames the pacing thread
//! hands it through a bounded channel, then confirms them with a `PING` and waits for the
//! `PONG`. The pacing thread stamps each payload with its due time as `publish_paced` does.

use super::super::hold::{put_hello, put_sub};
use super::super::report::{self, CpuClock, Report};
use super::super::{Common, Counters, DRAIN_MAX, Schedule, drain, record_latency};
use super::{ManyArgs, SHARDS, SPARE_FDS, open_all, raise_fd_limit};
use anyhow::{Context, Result, bail};
use brokerd_proto::{BodyBuilder, Frame, decode, encode_pub};
use bytes::{Buf, BufMut, Bytes, BytesMut};
use hdrhistogram::Histogram;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, PoisonError};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::mpsc;
use tokio::time::{Instant, timeout_at};

/// Which protocol the connections speak.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Wire {
    /// brokerd's binary protocol.
    Brokerd,
    /// The NATS client protocol (for nats-server).
    Nats,
}

/// Frames the pacing thread may hand one publisher ahead of its socket.
const PUBLISHER_QUEUE: usize = 1024;

/// The largest frame a subscriber accepts.
const MAX_FRAME: usize = 1 << 20;

/// A connection after its handshake (and, for a subscriber, its subscription), with what was
/// read past the handshake.
struct Conn {
    rd: OwnedReadHalf,
    wr: OwnedWriteHalf,
    buf: BytesMut,
}

/// Runs the paced scenario over raw connections.
///
/// # Errors
/// No `--rate`, too few file descriptors, a connection that cannot be set up in time, or one
/// that fails while the run goes on.
pub(super) async fn run(
    server: &str,
    common: &Common,
    args: &ManyArgs,
    wire: Wire,
) -> Result<Report> {
    let Some(rate) = args.rate else {
        bail!("--raw needs --rate: it runs the paced scenario only");
    };
    if common.size < 8 {
        bail!("a paced run needs --size 8 or more (the due time is in the payload)");
    }
    let (pubs, subs) = (args.pubs, args.subs);
    let offered = rate
        .checked_mul(u64::from(pubs))
        .context("--rate times --pubs is too large")?;
    raise_fd_limit(u64::from(pubs) + u64::from(subs) + SPARE_FDS)?;
    let topic = |i: u32| args.topic(i);
    let setup_start = Instant::now();
    let deadline = setup_start + args.connect_timeout;
    let parallel = args.connect_parallel as usize;
    let subscribers = open_all("subscribers", subs, parallel, deadline, |j| {
        let (server, filter) = (server.to_string(), topic(j % pubs));
        async move { open(&server, wire, &format!("raw-sub-{j}"), Some(&filter)).await }
    })
    .await?;
    let publishers = open_all("publishers", pubs, parallel, deadline, |i| {
        let server = server.to_string();
        async move { open(&server, wire, &format!("raw-pub-{i}"), None).await }
    })
    .await?;
    let setup = setup_start.elapsed();

    let counters = Arc::new(Counters::default());
    let epoch = std::time::Instant::now();
    let empty = report::latency_histogram().context("cannot make a latency histogram")?;
    let shards: Vec<Arc<Mutex<Histogram<u64>>>> = (0..SHARDS)
        .map(|_| Arc::new(Mutex::new(empty.clone())))
        .collect();
    let mut sub_tasks = Vec::with_capacity(subscribers.len());
    for (j, conn) in subscribers.into_iter().enumerate() {
        let shard = shards[j % SHARDS].clone();
        sub_tasks.push(tokio::spawn(subscriber(
            conn,
            wire,
            counters.clone(),
            epoch,
            shard,
        )));
    }
    let mut senders = Vec::with_capacity(publishers.len());
    let mut pub_tasks = Vec::with_capacity(publishers.len());
    for conn in publishers {
        let (tx, rx) = mpsc::channel::<Bytes>(PUBLISHER_QUEUE);
        senders.push(tx);
        pub_tasks.push(tokio::spawn(publisher(conn, wire, rx)));
    }

    let cpu = CpuClock::start(common.broker_pid);
    let start = Instant::now();
    let schedule = Schedule {
        rate: offered,
        duration: common.duration,
    };
    let topics: Vec<String> = (0..pubs).map(topic).collect();
    let size = common.size;
    let lag = empty.clone();
    let sent_counter = counters.clone();
    let (sent, send_lag) = tokio::task::spawn_blocking(move || {
        pace(
            &senders,
            &topics,
            size,
            schedule,
            epoch,
            &sent_counter,
            lag,
            wire,
        )
    })
    .await
    .context("the pacing thread failed")??;
    // Every publisher confirms what it wrote (PING, then its PONG).
    let bound = Instant::now() + DRAIN_MAX;
    for task in pub_tasks {
        timeout_at(bound, task)
            .await
            .context("a publisher's confirmation did not come in time")?
            .context("a publisher task failed")??;
    }
    let published_at = Instant::now();
    let per_pub = |i: u64| sent / u64::from(pubs) + u64::from(i < sent % u64::from(pubs));
    let expected = if args.shared_topic {
        sent * u64::from(subs)
    } else {
        (0..subs).map(|j| per_pub(u64::from(j % pubs))).sum()
    };
    let end = if subs == 0 {
        published_at
    } else {
        drain(&counters, expected, published_at).await
    };
    let broker_rss_kib = common.broker_pid.and_then(report::rss_kib);
    let cpu = cpu.stop();
    let mut missed = 0;
    for task in sub_tasks {
        task.abort();
        if let Ok(Ok(m)) = task.await {
            missed += m;
        }
    }
    let latency = super::merge_shards(empty, &shards)?;
    Ok(Report {
        scenario: match wire {
            Wire::Brokerd => "many-raw-brokerd",
            Wire::Nats => "many-raw-nats",
        },
        size: common.size,
        duration: common.duration,
        pubs,
        subs,
        topics: if args.shared_topic { 1 } else { pubs },
        rate: Some(rate),
        sent,
        expected,
        received: counters.received.load(Ordering::Relaxed),
        missed,
        elapsed: end.duration_since(start),
        publish_elapsed: published_at.duration_since(start),
        threads: common.threads,
        cpu,
        latency: Some(report::Latency::from_histogram(&latency)),
        send_lag: Some(report::Latency::from_histogram(&send_lag)),
        setup: Some(setup),
        broker_rss_kib,
        stream: None,
    })
}

/// Hands message `k` of the schedule to publisher `k % pubs` when it is due (see
/// [`super::super::pace`]); returns how many were sent and how late each was handed over.
#[allow(clippy::too_many_arguments)]
fn pace(
    senders: &[mpsc::Sender<Bytes>],
    topics: &[String],
    size: usize,
    schedule: Schedule,
    epoch: std::time::Instant,
    counters: &Counters,
    lag: Histogram<u64>,
    wire: Wire,
) -> Result<(u64, Histogram<u64>)> {
    let mut out = BytesMut::with_capacity(64 * 1024);
    super::super::pace(
        schedule,
        epoch,
        vec![0u8; size],
        counters,
        lag,
        |k, payload| {
            let i = (k % senders.len() as u64) as usize;
            put_pub(&mut out, wire, &topics[i], payload);
            senders[i]
                .blocking_send(out.split().freeze())
                .context("a publisher's connection ended")?;
            if out.capacity() < 1024 {
                out.reserve(64 * 1024);
            }
            Ok(())
        },
    )
}

/// Connects and completes the handshake; with `filter`, subscribes to it (sid 1) and waits for
/// the broker's confirmation.
async fn open(server: &str, wire: Wire, name: &str, filter: Option<&str>) -> Result<Conn> {
    let stream = TcpStream::connect(server)
        .await
        .with_context(|| format!("cannot connect to {server}"))?;
    let _ = stream.set_nodelay(true);
    let (mut rd, mut wr) = stream.into_split();
    let mut out = BytesMut::new();
    let mut buf = BytesMut::with_capacity(4096);
    match wire {
        Wire::Brokerd => {
            put_hello(&mut out, name);
            if let Some(f) = filter {
                put_sub(&mut out, 1, 1, f);
            }
            wr.write_all(&out).await?;
            let mut welcomed = false;
            let mut confirmed = filter.is_none();
            while !(welcomed && confirmed) {
                while let Some(frame) = decode(&mut buf, MAX_FRAME)? {
                    match frame {
                        Frame::Welcome(_) => welcomed = true,
                        Frame::Ok(1) => confirmed = true,
                        Frame::Err(e) => bail!("broker refused: {} ({})", e.message, e.code),
                        _ => {}
                    }
                }
                if welcomed && confirmed {
                    break;
                }
                if rd.read_buf(&mut buf).await? == 0 {
                    bail!("the broker closed the connection during the handshake");
                }
            }
        }
        Wire::Nats => {
            out.put_slice(
                br#"CONNECT {"verbose":false,"pedantic":false,"echo":false,"protocol":1,"name":""#,
            );
            out.put_slice(name.as_bytes());
            out.put_slice(b"\"}\r\n");
            if let Some(f) = filter {
                out.put_slice(format!("SUB {f} 1\r\n").as_bytes());
            }
            out.put_slice(b"PING\r\n");
            wr.write_all(&out).await?;
            // INFO first, then the PONG that answers the PING after the SUB.
            loop {
                match nats_line(&mut buf)? {
                    Some(line) if line.starts_with(b"PONG") => break,
                    Some(line) if line.starts_with(b"-ERR") => {
                        bail!("broker refused: {}", String::from_utf8_lossy(&line))
                    }
                    Some(_) => {}
                    None => {
                        if rd.read_buf(&mut buf).await? == 0 {
                            bail!("the broker closed the connection during the handshake");
                        }
                    }
                }
            }
        }
    }
    Ok(Conn { rd, wr, buf })
}

/// Reads deliveries until the connection ends or the task is aborted, counting them and
/// recording each one's latency into `shard`; returns the deliveries the broker reported lost.
async fn subscriber(
    mut c: Conn,
    wire: Wire,
    counters: Arc<Counters>,
    epoch: std::time::Instant,
    shard: Arc<Mutex<Histogram<u64>>>,
) -> Result<u64> {
    let mut missed = 0u64;
    let mut reply = BytesMut::new();
    loop {
        let mut n = 0u64;
        {
            let mut h = shard.lock().unwrap_or_else(PoisonError::into_inner);
            match wire {
                Wire::Brokerd => {
                    while let Some(frame) = decode(&mut c.buf, MAX_FRAME)? {
                        match frame {
                            Frame::Msg(m) => {
                                n += 1;
                                record_latency(&mut h, epoch, &m.body.payload());
                            }
                            Frame::Lost(l) => missed += l.missed,
                            Frame::Ping(t) => Frame::Pong(t).encode(&mut reply),
                            _ => {}
                        }
                    }
                }
                Wire::Nats => {
                    while let Some(payload) = nats_msg(&mut c.buf, &mut reply)? {
                        n += 1;
                        record_latency(&mut h, epoch, &payload);
                    }
                }
            }
        }
        if n > 0 {
            counters.received.fetch_add(n, Ordering::Relaxed);
        }
        if !reply.is_empty() {
            c.wr.write_all(&reply).await?;
            reply.clear();
        }
        c.buf.reserve(16 * 1024);
        if c.rd.read_buf(&mut c.buf).await? == 0 {
            return Ok(missed);
        }
    }
}

/// Writes what the pacing thread hands over until it is done, then confirms it: a `PING`, and
/// its `PONG` read back (anything else the broker sends is skipped).
async fn publisher(mut c: Conn, wire: Wire, mut rx: mpsc::Receiver<Bytes>) -> Result<()> {
    while let Some(frame) = rx.recv().await {
        c.wr.write_all(&frame).await?;
    }
    let mut out = BytesMut::new();
    match wire {
        Wire::Brokerd => Frame::Ping(7).encode(&mut out),
        Wire::Nats => out.put_slice(b"PING\r\n"),
    }
    c.wr.write_all(&out).await?;
    loop {
        match wire {
            Wire::Brokerd => {
                while let Some(frame) = decode(&mut c.buf, MAX_FRAME)? {
                    if frame == Frame::Pong(7) {
                        return Ok(());
                    }
                }
            }
            Wire::Nats => {
                while let Some(line) = nats_line(&mut c.buf)? {
                    if line.starts_with(b"PONG") {
                        return Ok(());
                    }
                }
            }
        }
        if c.rd.read_buf(&mut c.buf).await? == 0 {
            bail!("the broker closed a publisher's connection before confirming");
        }
    }
}

/// Takes one `\r\n`-terminated line off `buf`, without its terminator, if a whole one is there.
fn nats_line(buf: &mut BytesMut) -> Result<Option<Bytes>> {
    let Some(end) = buf.windows(2).position(|w| w == b"\r\n") else {
        if buf.len() > 4096 {
            bail!("a protocol line longer than 4 KiB");
        }
        return Ok(None);
    };
    let line = buf.split_to(end).freeze();
    buf.advance(2);
    Ok(Some(line))
}

/// Takes the next `MSG` off `buf` and returns its payload, answering a `PING` into `reply` and
/// skipping other lines; `None` until a whole message is buffered.
fn nats_msg(buf: &mut BytesMut, reply: &mut BytesMut) -> Result<Option<Bytes>> {
    loop {
        let Some(end) = buf.windows(2).position(|w| w == b"\r\n") else {
            return Ok(None);
        };
        let line = &buf[..end];
        if line.starts_with(b"MSG ") {
            // MSG <subject> <sid> [reply-to] <#bytes>
            let size: usize = std::str::from_utf8(line)
                .ok()
                .and_then(|l| l.rsplit(' ').next())
                .and_then(|n| n.parse().ok())
                .context("a MSG line without a size")?;
            if buf.len() < end + 2 + size + 2 {
                return Ok(None);
            }
            buf.advance(end + 2);
            let payload = buf.split_to(size).freeze();
            buf.advance(2);
            return Ok(Some(payload));
        }
        if line.starts_with(b"PING") {
            reply.put_slice(b"PONG\r\n");
        } else if line.starts_with(b"-ERR") {
            bail!("broker error: {}", String::from_utf8_lossy(line));
        }
        buf.advance(end + 2);
    }
}

/// Appends one publish of `payload` to `topic`.
fn put_pub(out: &mut BytesMut, wire: Wire, topic: &str, payload: &[u8]) {
    match wire {
        Wire::Brokerd => encode_pub(
            out,
            0,
            false,
            &BodyBuilder {
                topic,
                reply: None,
                headers: None,
                payload,
            },
        ),
        Wire::Nats => {
            out.put_slice(format!("PUB {topic} {}\r\n", payload.len()).as_bytes());
            out.put_slice(payload);
            out.put_slice(b"\r\n");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[allow(clippy::unwrap_used)]
    fn nats_messages_are_cut_from_the_stream_and_pings_answered() {
        let mut buf = BytesMut::from(
            &b"INFO {}\r\nPING\r\nMSG a.b 1 5\r\nhello\r\nMSG a.b 1 r.x 3\r\nab"[..],
        );
        let mut reply = BytesMut::new();
        assert_eq!(nats_msg(&mut buf, &mut reply).unwrap().unwrap(), "hello");
        assert_eq!(&reply[..], b"PONG\r\n");
        // The second message is not whole yet.
        assert!(nats_msg(&mut buf, &mut reply).unwrap().is_none());
        buf.put_slice(b"c\r\n");
        assert_eq!(nats_msg(&mut buf, &mut reply).unwrap().unwrap(), "abc");
        assert!(buf.is_empty());
    }

    #[test]
    #[allow(clippy::unwrap_used)]
    fn brokerd_frames_written_here_decode() {
        let mut out = BytesMut::new();
        put_hello(&mut out, "raw-1");
        put_sub(&mut out, 1, 1, "bench.many.3");
        put_pub(&mut out, Wire::Brokerd, "bench.many.3", b"12345678");
        assert!(
            matches!(decode(&mut out, MAX_FRAME).unwrap(), Some(Frame::Hello(h)) if h.name == "raw-1")
        );
        assert!(
            matches!(decode(&mut out, MAX_FRAME).unwrap(), Some(Frame::Sub(s)) if s.filter == "bench.many.3")
        );
        match decode(&mut out, MAX_FRAME).unwrap() {
            Some(Frame::Pub(p)) => assert_eq!(&p.body.payload()[..], b"12345678"),
            other => panic!("expected PUB, got {other:?}"),
        }
    }
}
