//! `brokerctl bench relay`: the ceiling `pubsub` is compared with, measured by the same tool on
//! the same machine in the same run, with no broker at all.
//!
//! A relay thread started here listens on `127.0.0.1:0`, accepts two connections, the
//! publisher's and then the subscriber's, and copies whatever the first sends to the second,
//! 64 KiB per read, without looking at it. The publisher writes `PUB` frames encoded as
//! `brokerd-client` encodes them (topic `bench.relay`, a `--size` payload), a 64 KiB block of
//! them per write, as fast as the socket takes them, for `--duration`, then closes its sending
//! side. The subscriber reads everything and walks the frames with `brokerd_proto::peek_pub`,
//! counting complete, well-formed `PUB`s; a torn or corrupt stream fails the run. Walking the
//! frames rather than dividing bytes by the frame size costs a few nanoseconds a frame and checks
//! that what arrived is what was sent.
//!
//! So the figure is what a process that only copies bytes moves through loopback TCP: two socket
//! hops and one copy in user space per byte, no routing, no per-message framing on the way out,
//! and at the receiving end a frame walk instead of `brokerd-client`'s decoding into messages.
//! The relay is one OS thread with blocking sockets; the publisher and subscriber run on the
//! tool's runtime (`--threads`) as in `pubsub`, and the tool's CPU figure includes the relay's.
//! To compare, run `bench relay --size 1024` and `bench pubsub --size 1024` in turn against the
//! same machine (`scripts/bench-many.sh` alternates them).

use super::report::{CpuClock, Report};
use super::{Common, Counters, DRAIN_MAX, start_progress, stop_progress};
use anyhow::{Context, Result, bail};
use brokerd_proto::{BodyBuilder, encode_pub, peek_pub};
use bytes::{Buf, BytesMut};
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio::time::{Instant, timeout};

/// The topic the relayed frames name; the relay never reads it.
const TOPIC: &str = "bench.relay";

/// Bytes per relay read, per subscriber read and (rounded up to whole frames) per publisher
/// write: the size of `brokerd-client`'s write buffer.
const CHUNK: usize = 64 * 1024;

/// How long the relay, or the subscriber, waits on a socket without a byte before giving up.
const IDLE: Duration = Duration::from_secs(10);

/// Runs the relay scenario and reports it as `pubsub` would be reported.
///
/// # Errors
/// The relay cannot be started or reached, or the subscriber's stream is torn or malformed.
pub(super) async fn run(common: &Common) -> Result<Report> {
    let listener = TcpListener::bind("127.0.0.1:0").context("cannot bind the relay")?;
    let addr = listener
        .local_addr()
        .context("cannot read the relay's address")?;
    let (accepted_tx, accepted_rx) = oneshot::channel();
    // Detached: it ends when the publisher closes, or after IDLE on either socket; on an error
    // below the process exits with it.
    let relay = std::thread::Builder::new()
        .name("bench-relay".into())
        .spawn(move || relay(listener, accepted_tx))
        .context("cannot start the relay thread")?;
    let publisher = TcpStream::connect(addr)
        .await
        .context("cannot connect to the relay")?;
    // The relay tells its peers apart by the order it accepts them in.
    timeout(IDLE, accepted_rx)
        .await
        .context("the relay did not accept the publisher in time")?
        .context("the relay thread ended before accepting")?;
    let subscriber = TcpStream::connect(addr)
        .await
        .context("cannot connect to the relay")?;
    for s in [&publisher, &subscriber] {
        s.set_nodelay(true).context("cannot set TCP_NODELAY")?;
    }

    let (block, frames_per_block, frame_len) = pub_block(common.size);
    let counters = Arc::new(Counters::default());
    let cpu = CpuClock::start(common.broker_pid);
    let start = Instant::now();
    let progress = start_progress(common, &counters, 1, start);
    let bound = common.duration + DRAIN_MAX;
    let deadline = start + common.duration;
    let pub_task = tokio::spawn(timeout(
        bound,
        publish(
            publisher,
            block,
            frames_per_block,
            deadline,
            counters.clone(),
        ),
    ));
    let sub_task = tokio::spawn(timeout(
        bound,
        count(subscriber, frame_len, counters.clone()),
    ));
    let (sent, published_at) = pub_task
        .await
        .context("the publisher task failed")?
        .context("the publisher did not finish in time")??;
    let (received, last) = sub_task
        .await
        .context("the subscriber task failed")?
        .context("the subscriber did not finish in time")??;
    let cpu = cpu.stop();
    stop_progress(progress).await;
    match relay.join() {
        Ok(r) => r.context("the relay failed")?,
        Err(_) => bail!("the relay thread panicked"),
    }
    Ok(Report {
        scenario: "relay",
        size: common.size,
        duration: common.duration,
        pubs: 1,
        subs: 1,
        topics: 1,
        rate: None,
        sent,
        expected: sent,
        received,
        missed: 0,
        elapsed: last.max(published_at).duration_since(start),
        publish_elapsed: published_at.duration_since(start),
        threads: common.threads,
        cpu,
        latency: None,
        send_lag: None,
        setup: None,
        broker_rss_kib: None,
        stream: None,
    })
}

/// The relay: accepts the publisher, says so on `accepted`, accepts the subscriber, then copies
/// until the publisher closes, and closes the subscriber's receiving side after the last byte.
fn relay(listener: TcpListener, accepted: oneshot::Sender<()>) -> std::io::Result<()> {
    let (mut from, _) = listener.accept()?;
    let _ = accepted.send(());
    let (mut to, _) = listener.accept()?;
    for s in [&from, &to] {
        s.set_nodelay(true)?;
        s.set_read_timeout(Some(IDLE))?;
        s.set_write_timeout(Some(IDLE))?;
    }
    let mut buf = vec![0u8; CHUNK];
    loop {
        let n = from.read(&mut buf)?;
        if n == 0 {
            break;
        }
        to.write_all(&buf[..n])?;
    }
    to.shutdown(Shutdown::Write)
}

/// Whole `PUB` frames of a `size`-byte payload filling at least [`CHUNK`] bytes, with how many
/// frames that is and the length of each.
fn pub_block(size: usize) -> (Vec<u8>, u64, usize) {
    let payload = vec![0u8; size];
    let body = BodyBuilder {
        topic: TOPIC,
        reply: None,
        headers: None,
        payload: &payload,
    };
    let mut one = BytesMut::new();
    encode_pub(&mut one, 0, false, &body);
    let frames = CHUNK.div_ceil(one.len());
    (one.repeat(frames), frames as u64, one.len())
}

/// Writes `block` until `deadline`, then closes the sending side. Returns the frames written
/// and when the last write returned.
async fn publish(
    mut socket: TcpStream,
    block: Vec<u8>,
    frames_per_block: u64,
    deadline: Instant,
    counters: Arc<Counters>,
) -> Result<(u64, Instant)> {
    let mut sent = 0u64;
    loop {
        socket
            .write_all(&block)
            .await
            .context("cannot write to the relay")?;
        sent += frames_per_block;
        counters.sent.store(sent, Ordering::Relaxed);
        if Instant::now() >= deadline {
            break;
        }
        // As in `publish_flat_out`: on one runtime thread the subscriber runs only when the
        // publisher yields, and a write yields only when the socket is full.
        tokio::task::yield_now().await;
    }
    let done = Instant::now();
    socket
        .shutdown()
        .await
        .context("cannot close the publisher's side")?;
    Ok((sent, done))
}

/// Reads until the relay closes, counting whole `PUB` frames of `frame_len` bytes. Returns the
/// count and when the last bytes arrived.
///
/// # Errors
/// Something other than such frames arrived, the stream ended inside a frame, or nothing came
/// for [`IDLE`].
async fn count(
    mut socket: TcpStream,
    frame_len: usize,
    counters: Arc<Counters>,
) -> Result<(u64, Instant)> {
    let mut buf = BytesMut::with_capacity(2 * CHUNK);
    let mut frames = 0u64;
    let mut last = Instant::now();
    loop {
        if buf.capacity() - buf.len() < CHUNK {
            buf.reserve(CHUNK);
        }
        let n = timeout(IDLE, socket.read_buf(&mut buf))
            .await
            .context("no bytes from the relay in time")?
            .context("cannot read from the relay")?;
        if n == 0 {
            break;
        }
        last = Instant::now();
        let mut at = 0;
        while let Some(frame) = peek_pub(&buf[at..], frame_len) {
            let (_, len) = frame.context("the relay delivered a malformed PUB frame")?;
            at += len;
            frames += 1;
        }
        buf.advance(at);
        if buf.len() >= frame_len {
            bail!("the relay delivered something other than the PUB frames sent");
        }
        counters.received.store(frames, Ordering::Relaxed);
    }
    if !buf.is_empty() {
        bail!("the relay's stream ended inside a frame");
    }
    Ok((frames, last))
}

#[cfg(test)]
mod tests {
    use super::*;
    use brokerd_proto::{Frame, decode};

    #[test]
    fn a_block_is_whole_frames_the_broker_would_accept() {
        let (block, frames, frame_len) = pub_block(1024);
        assert_eq!(block.len() as u64, frames * frame_len as u64);
        assert!(block.len() >= CHUNK && block.len() < CHUNK + frame_len);
        let mut buf = BytesMut::from(&block[..]);
        for _ in 0..frames {
            match decode(&mut buf, usize::MAX).unwrap() {
                Some(Frame::Pub(p)) => assert_eq!(p.body.payload().len(), 1024),
                other => panic!("expected a PUB, got {other:?}"),
            }
        }
        assert!(buf.is_empty());
    }
}
