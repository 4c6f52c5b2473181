//! The end-to-end test harness: a real brokerd on `127.0.0.1:0`, stopped through the same
//! shutdown path a signal takes, plus a raw protocol connection for tests that must send bytes
//! the client library never would.
//!
//! Layout:
//! - [`TestBroker`]: start, statistics, shutdown (timed or not).
//! - [`RawConn`]: a socket driven frame by frame, including abrupt resets.
//! - [`wire`]: client frames written byte by byte from `docs/protocol.md`, so that tests of the
//!   wire protocol do not depend on how `brokerd-proto` lays out its structs.
//! - [`Relay`]: a TCP relay whose connections a test cuts, for clients that lose their
//!   connection while the broker runs on.
//! - [`wait_until`], [`Rng`], [`raise_fd_limit`]: deadlines, deterministic randomness, file
//!   descriptors.
//! - [`pki`]: certificates made for TLS tests.

// A test harness: failing loudly at the failing step is its job.
#![allow(clippy::unwrap_used, clippy::expect_used)]

pub mod pki;

use brokerd_client::{Client, ConnectOptions};
use brokerd_proto::{ErrorFrame, Frame, Hello, PROTOCOL_VERSION, decode};
use brokerd_server::{Config, Server, ShutdownHandle};
use bytes::BytesMut;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;

/// How long any single wait in a test may take before the test fails.
pub const DEADLINE: Duration = Duration::from_secs(20);

/// A running broker.
pub struct TestBroker {
    /// Where it listens.
    pub addr: SocketAddr,
    /// Where its TLS listener listens, when `tls.listen` is set.
    pub tls_addr: Option<SocketAddr>,
    /// Where its monitoring endpoints listen, when `http` is set (the harness leaves it off
    /// unless a test asks, so that brokers of tests running at once do not compete for it).
    pub http_addr: Option<SocketAddr>,
    /// Its routing state, for statistics.
    pub broker: Arc<brokerd_core::Broker>,
    /// Puts a new configuration in force, as SIGHUP does in `brokerd`.
    pub reload: brokerd_server::reload::ReloadHandle,
    handle: ShutdownHandle,
    join: JoinHandle<std::io::Result<()>>,
}

impl TestBroker {
    /// Starts a broker with the default configuration on an ephemeral port.
    pub async fn start() -> TestBroker {
        TestBroker::with_config(|_| {}).await
    }

    /// Starts a broker with the defaults changed by `f`. The monitoring endpoints listen on an
    /// ephemeral port too, so that tests never contend for the default `127.0.0.1:7655`.
    pub async fn with_config(f: impl FnOnce(&mut Config)) -> TestBroker {
        let mut config = Config {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            http: None,
            ..Config::default()
        };
        f(&mut config);
        let server = Server::bind(config).await.expect("bind 127.0.0.1:0");
        let addr = server.local_addr().expect("local addr");
        let tls_addr = server.tls_addr().expect("TLS addr");
        let http_addr = server.http_addr().expect("HTTP addr");
        let broker = server.broker();
        let handle = server.shutdown_handle();
        let reload = server.reload_handle();
        let join = tokio::spawn(server.run());
        TestBroker {
            addr,
            tls_addr,
            http_addr,
            broker,
            reload,
            handle,
            join,
        }
    }

    /// The address as `host:port`.
    pub fn addr(&self) -> String {
        self.addr.to_string()
    }

    /// A connected client.
    pub async fn client(&self, name: &str) -> Client {
        Client::connect(self.addr, ConnectOptions::new(name))
            .await
            .expect("connect")
    }

    /// A raw connection that has completed its handshake.
    pub async fn raw(&self, name: &str) -> RawConn {
        let mut c = RawConn::connect(self.addr).await;
        c.send(&Frame::Hello(Hello {
            req_id: 1,
            version: PROTOCOL_VERSION,
            no_echo: false,
            overflow: None,
            name: name.into(),
            credentials: None,
        }))
        .await;
        match c.recv().await {
            Some(Frame::Welcome(_)) => c,
            other => panic!("expected WELCOME, got {other:?}"),
        }
    }

    /// How many connections have closed for the reason named `reason` (`write-timeout`, ...).
    pub fn closes(&self, reason: &str) -> u64 {
        let stats = self.broker.stats();
        let found = stats.closes.iter().find(|(name, _)| *name == reason);
        found.map(|(_, n)| *n).expect("a close reason name")
    }

    /// Waits until the broker counts exactly `n` connected clients.
    pub async fn wait_for_connections(&self, n: usize) {
        wait_until(&format!("{n} connections"), || {
            self.broker.stats().connections == n
        })
        .await;
    }

    /// Starts the graceful shutdown, as SIGTERM does, without waiting for it.
    pub fn begin_shutdown(&self) {
        self.handle.shutdown();
    }

    /// Shuts down gracefully and waits for the server to finish.
    pub async fn stop(self) {
        self.handle.shutdown();
        tokio::time::timeout(DEADLINE, self.join)
            .await
            .expect("shutdown within the deadline")
            .expect("server task")
            .expect("server run");
    }
}

impl TestBroker {
    /// Waits for a shutdown already started by [`TestBroker::begin_shutdown`] to finish, failing
    /// the test unless `run` returns `Ok` within `limit`; returns how long it took from the call.
    pub async fn finish_shutdown(self, limit: Duration) -> Duration {
        let start = tokio::time::Instant::now();
        tokio::time::timeout(limit, self.join)
            .await
            .expect("server exits within the limit")
            .expect("server task did not panic")
            .expect("server run returned Ok");
        start.elapsed()
    }
}

/// Pause between polls of a condition in [`wait_until`].
pub const POLL: Duration = Duration::from_millis(5);

/// Polls `cond` every [`POLL`] until it holds, failing the test after [`DEADLINE`].
pub async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let end = tokio::time::Instant::now() + DEADLINE;
    while !cond() {
        assert!(
            tokio::time::Instant::now() < end,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(POLL).await;
    }
}

/// A directory of its own under the system's temporary directory, removed when dropped: where a
/// test's broker keeps its streams.
pub struct TempDir(pub std::path::PathBuf);

impl TempDir {
    /// A new empty directory whose name holds `tag`, the process id and a counter.
    pub fn new(tag: &str) -> TempDir {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!("brokerd-{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).expect("create a temporary directory");
        TempDir(path)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A TCP relay in front of a broker whose connections a test can cut, so that a client loses
/// its connection while the broker goes on running. While cut, it refuses new connections too
/// (it accepts and closes them at once), until restored.
pub struct Relay {
    /// Where clients connect.
    pub addr: SocketAddr,
    open: Arc<std::sync::atomic::AtomicBool>,
    generation: tokio::sync::watch::Sender<u64>,
}

impl Relay {
    /// A relay to `to` on an ephemeral port of `127.0.0.1`.
    pub async fn start(to: SocketAddr) -> Relay {
        use std::sync::atomic::Ordering;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let open = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let (generation, _) = tokio::sync::watch::channel(0u64);
        let relay = Relay {
            addr,
            open: open.clone(),
            generation: generation.clone(),
        };
        tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                if !open.load(Ordering::Acquire) {
                    continue;
                }
                let mut cut = generation.subscribe();
                tokio::spawn(async move {
                    let Ok(mut outbound) = TcpStream::connect(to).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        _ = cut.changed() => {}
                    }
                });
            }
        });
        relay
    }

    /// Closes every relayed connection and refuses new ones.
    pub fn cut(&self) {
        self.open.store(false, std::sync::atomic::Ordering::Release);
        self.generation.send_modify(|g| *g += 1);
    }

    /// Accepts connections again.
    pub fn restore(&self) {
        self.open.store(true, std::sync::atomic::Ordering::Release);
    }
}

/// A protocol connection driven byte by byte.
pub struct RawConn {
    /// The socket.
    pub stream: TcpStream,
    buf: BytesMut,
}

impl RawConn {
    /// Connects without a handshake.
    pub async fn connect(addr: SocketAddr) -> RawConn {
        let stream = TcpStream::connect(addr).await.expect("connect");
        stream.set_nodelay(true).expect("nodelay");
        RawConn {
            stream,
            buf: BytesMut::new(),
        }
    }

    /// Connects with a socket receive buffer of about `bytes`, so that a peer that never reads
    /// stops the broker's writes early instead of after megabytes of kernel buffering.
    pub async fn connect_with_receive_buffer(addr: SocketAddr, bytes: u32) -> RawConn {
        let socket = tokio::net::TcpSocket::new_v4().expect("socket");
        socket.set_recv_buffer_size(bytes).expect("SO_RCVBUF");
        let stream = socket.connect(addr).await.expect("connect");
        stream.set_nodelay(true).expect("nodelay");
        RawConn {
            stream,
            buf: BytesMut::new(),
        }
    }

    /// Connects from the loopback address `local` (any of 127.0.0.0/8), so that tests making
    /// many short connections spread their `TIME_WAIT` sockets over several port spaces instead
    /// of exhausting the one of 127.0.0.1.
    pub async fn connect_from(addr: SocketAddr, local: std::net::IpAddr) -> RawConn {
        let socket = tokio::net::TcpSocket::new_v4().expect("socket");
        socket.set_reuseaddr(true).expect("SO_REUSEADDR");
        socket
            .bind(SocketAddr::new(local, 0))
            .expect("bind a loopback source address");
        let stream = socket.connect(addr).await.expect("connect");
        stream.set_nodelay(true).expect("nodelay");
        RawConn {
            stream,
            buf: BytesMut::new(),
        }
    }

    /// Connects and completes a handshake asking for the overflow policy with wire value
    /// `overflow` (0 = the server's default).
    pub async fn handshake(addr: SocketAddr, name: &str, overflow: u8) -> RawConn {
        RawConn::connect(addr).await.hello(name, overflow).await
    }

    /// A connection named `name` with one subscription to `filter` (sid 1), that the test then
    /// never reads from: a subscriber whose socket stops draining.
    pub async fn stalled_subscriber(addr: SocketAddr, name: &str, filter: &str) -> RawConn {
        let mut c = RawConn::handshake(addr, name, 0).await;
        c.send_bytes(&wire::sub(2, 1, filter)).await;
        assert_eq!(
            c.recv().await,
            Some(Frame::Ok(2)),
            "{name} subscribes to {filter}"
        );
        c
    }

    /// Completes the handshake on a connection made without one.
    pub async fn hello(mut self, name: &str, overflow: u8) -> RawConn {
        self.send_bytes(&wire::hello(1, name, overflow)).await;
        match self.recv().await {
            Some(Frame::Welcome(_)) => self,
            other => panic!("expected WELCOME, got {other:?}"),
        }
    }

    /// Sends one frame.
    pub async fn send(&mut self, frame: &Frame) {
        self.send_bytes(&frame.to_bytes()).await;
    }

    /// Sends arbitrary bytes.
    pub async fn send_bytes(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.expect("write");
    }

    /// Sends arbitrary bytes, reporting a failure instead of failing the test: for peers that
    /// expect the server may already have closed the connection.
    pub async fn try_send_bytes(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.stream.write_all(bytes).await
    }

    /// The next frame, which must be an `ERR`; returns it.
    pub async fn expect_err(&mut self) -> ErrorFrame {
        match self.recv().await {
            Some(Frame::Err(e)) => e,
            other => panic!("expected ERR, got {other:?}"),
        }
    }

    /// Expects the server to close the connection next (end of stream or reset), with nothing
    /// more sent.
    pub async fn expect_closed(&mut self) {
        let next = self.recv().await;
        assert_eq!(next, None, "expected the connection to close");
    }

    /// Ends the connection with a TCP reset instead of a clean close: `SO_LINGER` 0, then drop.
    pub fn reset(self) {
        // Setting SO_LINGER to zero cannot block: the close discards instead of lingering.
        let _ = self.stream.set_zero_linger();
        drop(self.stream);
    }

    /// The next frame, or `None` at end of stream; fails the test after [`DEADLINE`].
    pub async fn recv(&mut self) -> Option<Frame> {
        tokio::time::timeout(DEADLINE, async {
            loop {
                if let Some(f) = decode(&mut self.buf, usize::MAX).expect("server sent a bad frame")
                {
                    return Some(f);
                }
                match self.stream.read_buf(&mut self.buf).await {
                    // A reset after the server's last frame is a close too.
                    Ok(0) | Err(_) => return None,
                    Ok(_) => {}
                }
            }
        })
        .await
        .expect("frame or close within the deadline")
    }
}

/// Client frames encoded byte for byte as `docs/protocol.md` lays them out.
pub mod wire {
    fn frame(kind: u8, fields: &[u8]) -> Vec<u8> {
        let len = u32::try_from(fields.len() + 1).expect("frame fits a u32 length");
        let mut f = Vec::with_capacity(5 + fields.len());
        f.extend_from_slice(&len.to_be_bytes());
        f.push(kind);
        f.extend_from_slice(fields);
        f
    }

    fn str16(out: &mut Vec<u8>, s: &[u8]) {
        let n = u16::try_from(s.len()).expect("str16 holds at most 65535 bytes");
        out.extend_from_slice(&n.to_be_bytes());
        out.extend_from_slice(s);
    }

    /// `HELLO` version 1 with overflow policy `overflow` (0 = the server's default).
    pub fn hello(req_id: u32, name: &str, overflow: u8) -> Vec<u8> {
        hello_version(req_id, 1, name, overflow)
    }

    /// `HELLO` with any version.
    pub fn hello_version(req_id: u32, version: u16, name: &str, overflow: u8) -> Vec<u8> {
        let mut f = Vec::new();
        f.extend_from_slice(&req_id.to_be_bytes());
        f.extend_from_slice(&version.to_be_bytes());
        f.push(0);
        f.push(overflow);
        str16(&mut f, name.as_bytes());
        frame(0x01, &f)
    }

    /// `SUB`; the filter is raw bytes so that tests can send invalid UTF-8.
    pub fn sub(req_id: u32, sid: u32, filter: impl AsRef<[u8]>) -> Vec<u8> {
        let mut f = Vec::new();
        f.extend_from_slice(&req_id.to_be_bytes());
        f.extend_from_slice(&sid.to_be_bytes());
        f.push(0);
        str16(&mut f, filter.as_ref());
        frame(0x03, &f)
    }

    /// `UNSUB`.
    pub fn unsub(req_id: u32, sid: u32, max: u32) -> Vec<u8> {
        let mut f = Vec::new();
        f.extend_from_slice(&req_id.to_be_bytes());
        f.extend_from_slice(&sid.to_be_bytes());
        f.extend_from_slice(&max.to_be_bytes());
        frame(0x04, &f)
    }

    /// `PUB` without reply-to or headers; the topic is raw bytes so that tests can send invalid
    /// UTF-8.
    pub fn publish(req_id: u32, ack: bool, topic: impl AsRef<[u8]>, payload: &[u8]) -> Vec<u8> {
        let mut f = Vec::with_capacity(16 + payload.len());
        f.extend_from_slice(&req_id.to_be_bytes());
        f.push(u8::from(ack));
        f.push(0);
        str16(&mut f, topic.as_ref());
        f.extend_from_slice(payload);
        frame(0x02, &f)
    }

    /// `PUB` with a reply-to, no headers.
    pub fn publish_with_reply(
        req_id: u32,
        ack: bool,
        topic: &str,
        reply: &str,
        payload: &[u8],
    ) -> Vec<u8> {
        let mut f = Vec::with_capacity(20 + payload.len());
        f.extend_from_slice(&req_id.to_be_bytes());
        f.push(u8::from(ack));
        f.push(0x01);
        str16(&mut f, topic.as_bytes());
        str16(&mut f, reply.as_bytes());
        f.extend_from_slice(payload);
        frame(0x02, &f)
    }

    /// `PING`.
    pub fn ping(token: u32) -> Vec<u8> {
        frame(0x05, &token.to_be_bytes())
    }

    /// `PONG`.
    pub fn pong(token: u32) -> Vec<u8> {
        frame(0x06, &token.to_be_bytes())
    }
}

/// A small deterministic generator (xorshift64*), so that a failing random input can be replayed
/// from its seed.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator for `seed` (any value; 0 is remapped).
    pub fn new(seed: u64) -> Rng {
        Rng(seed.max(1))
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// A number in `0..n` (`n > 0`).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }

    /// `n` random bytes.
    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next_u64() as u8).collect()
    }
}

/// Makes sure this process may open `want` file descriptors, raising its soft (and, when
/// allowed, hard) `RLIMIT_NOFILE` with `prlimit(1)` on its own pid. Returns the soft limit in
/// force, or why it could not be raised.
pub fn raise_fd_limit(want: u64) -> Result<u64, String> {
    let soft = nofile_soft_limit()?;
    if soft >= want {
        return Ok(soft);
    }
    let pid = std::process::id().to_string();
    let out = std::process::Command::new("prlimit")
        .args(["--pid", &pid, &format!("--nofile={want}:{want}")])
        .output()
        .map_err(|e| format!("cannot run prlimit: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "prlimit --nofile={want}:{want} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    let soft = nofile_soft_limit()?;
    if soft >= want {
        Ok(soft)
    } else {
        Err(format!("soft RLIMIT_NOFILE is {soft} after prlimit"))
    }
}

fn nofile_soft_limit() -> Result<u64, String> {
    let limits = std::fs::read_to_string("/proc/self/limits")
        .map_err(|e| format!("cannot read /proc/self/limits: {e}"))?;
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .ok_or("no 'Max open files' line in /proc/self/limits")?;
    let soft = line
        .split_whitespace()
        .nth(3)
        .ok_or("short 'Max open files' line")?;
    if soft == "unlimited" {
        return Ok(u64::MAX);
    }
    soft.parse()
        .map_err(|e| format!("bad soft limit {soft:?}: {e}"))
}

/// A size from the environment variable `name`, for tests whose scale a script raises; `default`
/// when unset.
pub fn scale(name: &str, default: usize) -> usize {
    match std::env::var(name) {
        Ok(v) => v
            .parse()
            .unwrap_or_else(|e| panic!("{name}={v:?} is not a count: {e}")),
        Err(_) => default,
    }
}
