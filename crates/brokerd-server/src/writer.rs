//! The per-connection writer task: the only code that writes to a client's socket.
//!
//! It takes everything pending in the connection's [`Outbox`](brokerd_core::Outbox) in one swap,
//! encodes it into a chain of buffers (`MSG` headers and small bodies coalesced into one scratch
//! buffer, larger bodies referenced as the publisher's own `Bytes`) and writes the chain with
//! vectored writes, so a busy connection costs one syscall per batch, not per message. Acks,
//! errors, pongs and deliveries all come through here, so their order is the outbox's order.
//!
//! The task ends when the outbox reports it is closed, when a write fails, or when a write
//! exceeds the write deadline; it then makes sure the outbox is closed (publishers skip it) and
//! cancels the connection token so the reader stops too.

use brokerd_core::{Client, CloseReason, Item, Take};
use brokerd_proto::{ErrorFrame, Frame, Lost, encode_msg_header};
use bytes::{Buf, Bytes, BytesMut};
use std::collections::VecDeque;
use std::io::IoSlice;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

/// Bodies up to this size are copied next to their header instead of taking their own iovec.
const COALESCE_MAX: usize = 256;

/// How long the final `ERR` and shutdown of a closing socket may take.
const CLOSE_WRITE_TIMEOUT: Duration = Duration::from_secs(1);

/// A chain of buffers written with vectored writes.
#[derive(Default)]
struct Chain {
    parts: VecDeque<Bytes>,
    remaining: usize,
}

impl Chain {
    fn push(&mut self, b: Bytes) {
        if !b.is_empty() {
            self.remaining += b.len();
            self.parts.push_back(b);
        }
    }
}

impl Buf for Chain {
    fn remaining(&self) -> usize {
        self.remaining
    }

    fn chunk(&self) -> &[u8] {
        self.parts.front().map_or(&[], |b| &b[..])
    }

    fn advance(&mut self, mut cnt: usize) {
        self.remaining -= cnt;
        while cnt > 0 {
            let Some(front) = self.parts.front_mut() else {
                return;
            };
            if cnt < front.len() {
                front.advance(cnt);
                return;
            }
            cnt -= front.len();
            self.parts.pop_front();
        }
    }

    fn chunks_vectored<'a>(&'a self, dst: &mut [IoSlice<'a>]) -> usize {
        let mut n = 0;
        for (slot, part) in dst.iter_mut().zip(self.parts.iter()) {
            *slot = IoSlice::new(part);
            n += 1;
        }
        n
    }
}

/// What one encoded batch holds, for releasing its room in the outbox.
struct Encoded {
    msgs: usize,
    bytes: usize,
    controls: usize,
    control_bytes: usize,
    frames: u64,
}

fn encode(batch: &mut VecDeque<Item>, scratch: &mut BytesMut, out: &mut Chain) -> Encoded {
    let mut e = Encoded {
        msgs: 0,
        bytes: 0,
        controls: 0,
        control_bytes: 0,
        frames: 0,
    };
    for item in batch.drain(..) {
        e.frames += 1;
        match item {
            Item::Msg { sid, seq, body } => {
                e.msgs += 1;
                e.bytes += brokerd_proto::MSG_HEADER_LEN + body.len();
                scratch.extend_from_slice(&encode_msg_header(sid, seq, body.len()));
                if body.len() <= COALESCE_MAX {
                    scratch.extend_from_slice(&body);
                } else {
                    out.push(scratch.split().freeze());
                    out.push(body);
                }
            }
            Item::Lost { sid, missed } => Frame::Lost(Lost { sid, missed }).encode(scratch),
            Item::Frame(f) => {
                e.controls += 1;
                e.control_bytes += f.len();
                if f.len() <= COALESCE_MAX {
                    scratch.extend_from_slice(&f);
                } else {
                    out.push(scratch.split().freeze());
                    out.push(f);
                }
            }
        }
    }
    out.push(scratch.split().freeze());
    e
}

/// Writes the connection's outbox to `wr` until the connection closes, and returns `wr` (the
/// close reason is the outbox's). `hard_stop` is this connection's own child of the server's
/// token, so that each write's wait on it touches no lock other connections share.
pub(crate) async fn run<W: AsyncWrite + Unpin>(
    mut wr: W,
    client: Arc<Client>,
    write_deadline: Duration,
    hard_stop: CancellationToken,
    conn: CancellationToken,
) -> W {
    let outbox = &client.outbox;
    let mut batch = VecDeque::new();
    let mut scratch = BytesMut::with_capacity(64 * 1024);
    let mut out = Chain::default();
    let mut interrupted = false;
    let reason = loop {
        let take = std::future::poll_fn(|cx| outbox.poll_take(cx, &mut batch)).await;
        if let Take::Closed(reason) = take {
            break reason;
        }
        let e = encode(&mut batch, &mut scratch, &mut out);
        if scratch.capacity() < 4096 {
            scratch.reserve(64 * 1024);
        }
        let bytes = out.remaining() as u64;
        // A TLS stream may keep its last records in its own buffer when the socket was full: the
        // flush sends them (a no-op on plain TCP), within the same deadline.
        let write = tokio::time::timeout(write_deadline, async {
            wr.write_all_buf(&mut out).await?;
            wr.flush().await
        });
        let result = tokio::select! {
            r = write => r,
            _ = hard_stop.cancelled() => {
                // A frame may be half written: nothing more can be framed on this socket.
                interrupted = true;
                break CloseReason::ServerShutdown;
            }
        };
        match result {
            Ok(Ok(())) => {}
            Ok(Err(err)) => {
                interrupted = true;
                break CloseReason::Io(err.to_string());
            }
            Err(_) => {
                interrupted = true;
                break CloseReason::WriteTimeout;
            }
        }
        outbox.release(e.msgs, e.bytes, e.controls, e.control_bytes);
        client
            .counters
            .frames_out
            .fetch_add(e.frames, Ordering::Relaxed);
        client
            .counters
            .bytes_out
            .fetch_add(bytes, Ordering::Relaxed);
    };
    // Publishers must stop queueing here; the first reason recorded is the one reported.
    outbox.close(reason, false);
    let reason = outbox.close_reason().unwrap_or(CloseReason::ServerShutdown);
    if let Some((code, message)) = reason.error()
        && !interrupted
    {
        let frame = Frame::Err(ErrorFrame {
            req_id: 0,
            code: code as u16,
            message,
        })
        .to_bytes();
        let _ = tokio::time::timeout(CLOSE_WRITE_TIMEOUT, async {
            wr.write_all(&frame).await?;
            wr.flush().await
        })
        .await;
    }
    // The write half goes back to the connection task, which hands it to the reaper with the
    // read half: the socket closes there, off the runtime's workers (`reaper.rs`).
    conn.cancel();
    wr
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::pin::Pin;
    use std::task::{Context, Poll};

    /// A writer that, like a TLS stream whose socket was full, keeps what it accepts until it is
    /// flushed.
    struct HoldsUntilFlushed {
        held: Vec<u8>,
        sent: Arc<parking_lot::Mutex<Vec<u8>>>,
    }

    impl AsyncWrite for HoldsUntilFlushed {
        fn poll_write(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<std::io::Result<usize>> {
            self.held.extend_from_slice(buf);
            Poll::Ready(Ok(buf.len()))
        }

        fn poll_flush(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            let held = std::mem::take(&mut self.held);
            self.sent.lock().extend_from_slice(&held);
            Poll::Ready(Ok(()))
        }

        fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            self.poll_flush(cx)
        }
    }

    #[tokio::test]
    #[allow(clippy::unwrap_used)]
    async fn what_is_written_is_flushed_before_the_writer_waits_again() {
        let broker = brokerd_core::Broker::new(brokerd_core::Limits::default());
        let client = broker.connect("t".into(), "peer".into(), None, false);
        let sent = Arc::new(parking_lot::Mutex::new(Vec::new()));
        let wr = HoldsUntilFlushed {
            held: Vec::new(),
            sent: sent.clone(),
        };
        let task = tokio::spawn(run(
            wr,
            client.clone(),
            Duration::from_secs(10),
            CancellationToken::new(),
            CancellationToken::new(),
        ));
        assert!(client.outbox.push_frame(Frame::Ok(7).to_bytes()));
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while sent.lock().is_empty() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "written but never flushed"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(&sent.lock()[..], &Frame::Ok(7).to_bytes()[..]);
        client.outbox.close(CloseReason::ClientClosed, false);
        task.await.unwrap();
    }

    #[test]
    fn chain_advances_across_parts() {
        let mut c = Chain::default();
        c.push(Bytes::from_static(b"abc"));
        c.push(Bytes::new());
        c.push(Bytes::from_static(b"defg"));
        assert_eq!(c.remaining(), 7);
        let mut v = [IoSlice::new(&[]); 4];
        assert_eq!(c.chunks_vectored(&mut v), 2);
        c.advance(4);
        assert_eq!(c.chunk(), b"efg");
        c.advance(3);
        assert_eq!(c.remaining(), 0);
        assert!(c.parts.is_empty());
    }

    #[test]
    fn encode_coalesces_small_and_references_large() {
        let mut batch = VecDeque::new();
        let big = Bytes::from(vec![7u8; 1000]);
        let small = brokerd_proto::Body::encode("a", None, None, b"x");
        batch.push_back(Item::Msg {
            sid: 1,
            seq: 1,
            body: small.clone(),
        });
        batch.push_back(Item::Msg {
            sid: 1,
            seq: 2,
            body: big.clone(),
        });
        batch.push_back(Item::Frame(Frame::Ok(5).to_bytes()));
        let mut scratch = BytesMut::new();
        let mut out = Chain::default();
        let e = encode(&mut batch, &mut scratch, &mut out);
        assert_eq!((e.msgs, e.controls, e.frames), (2, 1, 3));
        assert_eq!(out.parts.len(), 3);
        assert_eq!(out.parts[1], big);
        let mut all = Vec::new();
        while out.has_remaining() {
            let c = out.chunk().to_vec();
            out.advance(c.len());
            all.extend(c);
        }
        let mut expect = Vec::new();
        expect.extend(encode_msg_header(1, 1, small.len()));
        expect.extend(&small[..]);
        expect.extend(encode_msg_header(1, 2, big.len()));
        expect.extend(&big[..]);
        expect.extend(&Frame::Ok(5).to_bytes()[..]);
        assert_eq!(all, expect);
    }
}
