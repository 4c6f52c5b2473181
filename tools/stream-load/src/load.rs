//! The parts of a load run that do not depend on the protocol: a receive buffer over a blocking
//! socket, and the windowed publish loop that both protocols drive through [`Publisher`].
//!
//! One thread per connection does everything in turn: it tops the window up with as many
//! publishes as have room, writes them with one `write_all` (many publishes per syscall), then
//! blocks in `read` until acknowledgements arrive, and goes round again. With a window of 1 this
//! is exactly "publish, wait for the ack". No second thread, so no wake-up between threads sits on
//! the measured path.

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use crate::measure::Histogram;

/// Bytes read from a socket and not yet parsed. Grows only when one frame does not fit.
pub struct RecvBuf {
    buf: Vec<u8>,
    start: usize,
    end: usize,
}

impl RecvBuf {
    /// A buffer of `cap` bytes.
    pub fn new(cap: usize) -> RecvBuf {
        RecvBuf {
            buf: vec![0; cap],
            start: 0,
            end: 0,
        }
    }

    /// The unparsed bytes.
    pub fn data(&self) -> &[u8] {
        &self.buf[self.start..self.end]
    }

    /// Marks `n` bytes at the front as parsed.
    pub fn consume(&mut self, n: usize) {
        self.start += n;
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
    }

    /// Reads once. `Ok(Some(0))`: the peer closed; `Ok(None)`: the socket's read timeout passed
    /// with nothing to read.
    pub fn fill(&mut self, r: &mut impl Read) -> io::Result<Option<usize>> {
        if self.buf.len() - self.end < 64 * 1024 {
            if self.start > 0 {
                self.buf.copy_within(self.start..self.end, 0);
                self.end -= self.start;
                self.start = 0;
            }
            if self.buf.len() - self.end < 64 * 1024 {
                let len = self.buf.len() * 2;
                self.buf.resize(len, 0);
            }
        }
        match r.read(&mut self.buf[self.end..]) {
            Ok(n) => {
                self.end += n;
                Ok(Some(n))
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock
                        | io::ErrorKind::TimedOut
                        | io::ErrorKind::Interrupted
                ) =>
            {
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }
}

/// A connection set up and ready to publish: the socket and what was read past the handshake.
pub struct Conn {
    /// The socket, blocking, with a read timeout so loops can check their deadlines.
    pub sock: TcpStream,
    /// Bytes received and not parsed yet.
    pub rbuf: RecvBuf,
}

impl Conn {
    /// Connects to `addr` with Nagle off and a short read timeout.
    pub fn connect(addr: &str) -> io::Result<Conn> {
        let sock = TcpStream::connect(addr)?;
        sock.set_nodelay(true)?;
        sock.set_read_timeout(Some(Duration::from_millis(200)))?;
        Ok(Conn {
            sock,
            rbuf: RecvBuf::new(4 << 20),
        })
    }

    /// Reads until `parse` returns a value or `timeout` passes. `parse` sees the unparsed bytes
    /// and returns how many it consumed and, when done, the result.
    pub fn read_until<T>(
        &mut self,
        timeout: Duration,
        what: &str,
        mut parse: impl FnMut(&[u8], &mut Vec<u8>) -> Result<(usize, Option<T>), String>,
    ) -> Result<T, String> {
        let deadline = Instant::now() + timeout;
        let mut ctl = Vec::new();
        loop {
            let (used, done) = parse(self.rbuf.data(), &mut ctl)?;
            self.rbuf.consume(used);
            if !ctl.is_empty() {
                self.sock
                    .write_all(&ctl)
                    .map_err(|e| format!("{what}: write: {e}"))?;
                ctl.clear();
            }
            if let Some(v) = done {
                return Ok(v);
            }
            if Instant::now() >= deadline {
                return Err(format!("{what}: no answer within {timeout:?}"));
            }
            match self.rbuf.fill(&mut self.sock) {
                Ok(Some(0)) => return Err(format!("{what}: connection closed")),
                Ok(_) => {}
                Err(e) => return Err(format!("{what}: read: {e}")),
            }
        }
    }
}

/// One protocol's publishing side: how to encode a publish and how to recognise its answer.
pub trait Publisher {
    /// Appends one publish whose acknowledgement will name `id`.
    fn encode(&mut self, out: &mut Vec<u8>, id: u32);

    /// Parses the complete frames at the front of `buf`: pushes `(id, stored)` for each answer to
    /// a publish, appends anything that must be sent back (a PONG) to `ctl`, and returns the bytes
    /// consumed. A fatal event (the connection is being closed, a protocol error) is an `Err`.
    fn parse(
        &mut self,
        buf: &[u8],
        ctl: &mut Vec<u8>,
        acks: &mut Vec<(u32, bool)>,
    ) -> Result<usize, String>;

    /// The first refusal seen, if any (an `ERR`, a JetStream error answer), for the report.
    fn first_refusal(&self) -> Option<String>;
}

/// When a publish loop stops.
#[derive(Clone, Copy)]
pub struct Plan {
    /// Unacknowledged publishes at most.
    pub window: u32,
    /// Stop after this many publishes.
    pub count: Option<u64>,
    /// Stop publishing after this long.
    pub duration: Option<Duration>,
    /// How long to wait for the last acknowledgements once publishing stopped.
    pub drain: Duration,
}

/// What one publishing connection did.
pub struct Outcome {
    /// Publishes written.
    pub sent: u64,
    /// Publishes acknowledged as stored.
    pub stored: u64,
    /// Publishes refused (answered with an error).
    pub refused: u64,
    /// Time from writing a publish to reading its acknowledgement, in ns.
    pub latency: Histogram,
    /// When the last answer was read.
    pub end: Instant,
    /// Writes (syscalls) that carried publishes.
    pub writes: u64,
    /// Publishes still unanswered when the drain time ran out.
    pub unanswered: u64,
    /// The first refusal, if any.
    pub refusal: Option<String>,
}

/// Publishes through `p` on `conn` until `plan` says stop, keeping at most `plan.window`
/// publishes unacknowledged, and waits for the answers still due.
///
/// # Errors
/// The connection failed or the broker sent something fatal.
pub fn publish_loop<P: Publisher>(
    conn: &mut Conn,
    p: &mut P,
    plan: &Plan,
    start: Instant,
) -> Result<Outcome, String> {
    let window = plan.window.max(1);
    let cap = (window as usize).next_power_of_two();
    let mask = cap as u32 - 1;
    let mut sent_at = vec![0u64; cap];
    let mut wbuf: Vec<u8> = Vec::with_capacity(1 << 20);
    let mut acks: Vec<(u32, bool)> = Vec::with_capacity(cap);
    let mut latency = Histogram::new();
    let deadline = plan.duration.map(|d| start + d);
    let (mut sent, mut stored, mut refused, mut writes) = (0u64, 0u64, 0u64, 0u64);
    let mut inflight = 0u32;
    let mut next_id = 1u32;
    let mut sending = true;
    let mut last_answer = Instant::now();
    let mut end = last_answer;
    loop {
        if sending {
            let now = Instant::now();
            if deadline.is_some_and(|d| now >= d) || plan.count.is_some_and(|c| sent >= c) {
                sending = false;
            }
        }
        let first = next_id;
        let mut batch = 0u32;
        if sending {
            while inflight < window && plan.count.is_none_or(|c| sent < c) {
                p.encode(&mut wbuf, next_id);
                next_id = next_id.wrapping_add(1).max(1);
                inflight += 1;
                sent += 1;
                batch += 1;
            }
        }
        if !wbuf.is_empty() {
            let t = start.elapsed().as_nanos() as u64;
            let mut id = first;
            for _ in 0..batch {
                sent_at[(id & mask) as usize] = t;
                id = id.wrapping_add(1).max(1);
            }
            conn.sock
                .write_all(&wbuf)
                .map_err(|e| format!("write: {e}"))?;
            wbuf.clear();
            if batch > 0 {
                writes += 1;
            }
        }
        if !sending && inflight == 0 {
            break;
        }
        match conn.rbuf.fill(&mut conn.sock) {
            Ok(Some(0)) => return Err("the broker closed the connection".into()),
            Ok(Some(_)) => {}
            Ok(None) => {
                if !sending && last_answer.elapsed() >= plan.drain {
                    break;
                }
                continue;
            }
            Err(e) => return Err(format!("read: {e}")),
        }
        let now = Instant::now();
        let t = now.duration_since(start).as_nanos() as u64;
        let used = p.parse(conn.rbuf.data(), &mut wbuf, &mut acks)?;
        conn.rbuf.consume(used);
        if !acks.is_empty() {
            last_answer = now;
            end = now;
        }
        for (id, ok) in acks.drain(..) {
            inflight = inflight.saturating_sub(1);
            if ok {
                stored += 1;
                latency.record(t.saturating_sub(sent_at[(id & mask) as usize]));
            } else {
                refused += 1;
            }
        }
        if !sending && last_answer.elapsed() >= plan.drain {
            break;
        }
    }
    Ok(Outcome {
        sent,
        stored,
        refused,
        latency,
        end,
        writes,
        unanswered: inflight as u64,
        refusal: p.first_refusal(),
    })
}

/// What a replay read, from either protocol.
#[derive(Default)]
pub struct Replayed {
    /// Messages received (JetStream's flow control and heartbeats not counted).
    pub msgs: u64,
    /// Payload bytes received.
    pub bytes: u64,
    /// From sending the subscription (brokerd) or the consumer's creation (JetStream) to the
    /// first message.
    pub first: Option<Duration>,
    /// From the same moment to the last message expected.
    pub elapsed: Duration,
    /// The last stream sequence seen.
    pub last_seq: u64,
    /// Messages whose stream sequence did not follow the previous one's by exactly 1.
    pub gaps: u64,
    /// Reads (syscalls) that returned data.
    pub reads: u64,
    /// JetStream flow control requests answered.
    pub flow_controls: u64,
    /// JetStream idle heartbeats seen.
    pub heartbeats: u64,
}

/// Parses an unsigned decimal number.
pub fn parse_u64(s: &[u8]) -> Option<u64> {
    if s.is_empty() || s.len() > 19 {
        return None;
    }
    let mut v = 0u64;
    for &b in s {
        if !b.is_ascii_digit() {
            return None;
        }
        v = v * 10 + (b - b'0') as u64;
    }
    Some(v)
}

/// Appends `v` in decimal.
pub fn put_decimal(out: &mut Vec<u8>, mut v: u64) {
    let mut tmp = [0u8; 20];
    let mut i = tmp.len();
    loop {
        i -= 1;
        tmp[i] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    out.extend_from_slice(&tmp[i..]);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decimals_round_trip() {
        for v in [0u64, 7, 10, 999, 1_000_000, u32::MAX as u64] {
            let mut out = Vec::new();
            put_decimal(&mut out, v);
            assert_eq!(out, v.to_string().as_bytes());
            assert_eq!(parse_u64(&out), Some(v));
        }
        assert_eq!(parse_u64(b""), None);
        assert_eq!(parse_u64(b"1x"), None);
    }

    #[test]
    fn the_receive_buffer_compacts_and_grows() {
        let mut b = RecvBuf::new(70 * 1024);
        let data = vec![7u8; 100 * 1024];
        let mut r = &data[..];
        assert_eq!(b.fill(&mut r).unwrap(), Some(70 * 1024));
        b.consume(10);
        // Less than 64 KiB free and bytes consumed: compacts, then grows to fit more.
        let got = b.fill(&mut r).unwrap().unwrap();
        assert!(got > 0);
        assert_eq!(b.data().len(), 70 * 1024 - 10 + got);
        b.consume(b.data().len());
        assert!(b.data().is_empty());
    }
}
