//! The `brokerd` binary as a child process, and blocking clients speaking the wire format byte by
//! byte from `docs/protocol.md`: what `resources.rs` and `crowds.rs` both drive.
//!
//! The child's memory (`VmRSS`, and the peak `VmHWM`, in `/proc/PID/status`) and its connections
//! (`/proc/PID/fd`, `/proc/PID/net/tcp`) are its own, and N connections need N descriptors in
//! each process rather than 2N in one. Nothing here sleeps to wait for a condition: waits poll
//! with a deadline ([`wait_until`]).

use brokerd_proto::{Frame, decode};
use bytes::BytesMut;
use socket2::{Domain, SockRef, Socket, Type};
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// The broker binary these tests start: the one Cargo built with them, or `BROKERD_BIN` (for
/// comparing two builds with the same test, `scripts/fleet-ab.sh`).
fn bin() -> PathBuf {
    std::env::var_os("BROKERD_BIN").map_or_else(
        || PathBuf::from(env!("CARGO_BIN_EXE_brokerd")),
        PathBuf::from,
    )
}

/// How long any wait may take before the test fails.
pub const DEADLINE: Duration = Duration::from_secs(60);

/// A mebibyte.
pub const MIB: u64 = 1024 * 1024;

/// A size from the environment, for runs that a script scales up.
pub fn scale(name: &str, default: usize) -> usize {
    std::env::var(name).map_or(default, |v| v.parse().expect("a count"))
}

/// Pause between polls of a condition.
pub const POLL: Duration = Duration::from_millis(10);

/// Polls `cond` every [`POLL`] until it holds; fails after [`DEADLINE`].
pub fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let end = Instant::now() + DEADLINE;
    while !cond() {
        assert!(Instant::now() < end, "timed out waiting for {what}");
        std::thread::sleep(POLL);
    }
}

/// Bytes as mebibytes, for printing.
pub fn mib(bytes: u64) -> f64 {
    bytes as f64 / MIB as f64
}

/// A `brokerd` child process with its own config file; killed if the test fails.
pub struct Brokerd {
    child: Child,
    /// Where it listens.
    pub addr: SocketAddr,
    dir: PathBuf,
}

impl Brokerd {
    /// Starts the binary with `config` (TOML, without `listen`) on a port of the kernel's choosing
    /// and waits until it says it is listening. The child inherits this process's environment
    /// (so `MIMALLOC_*` variables set for the test reach it) and descriptor limit.
    pub fn start(test: &str, config: &str) -> Brokerd {
        let dir = std::env::temp_dir().join(format!("brokerd-{test}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("brokerd.toml");
        std::fs::write(
            &path,
            format!(
                "listen = \"127.0.0.1:0\"\nlog_level = \"{}\"\n{config}",
                super::LOG_FILTER
            ),
        )
        .unwrap();
        let child = Command::new(bin())
            .arg("--config")
            .arg(&path)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // Built first so that the child is killed if the wait below fails.
        let mut b = Brokerd {
            child,
            addr: SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
            dir,
        };
        let log = b.child.stderr.take().unwrap();
        b.addr = super::listening_addr(log, DEADLINE);
        b
    }

    fn status(&self, field: &str) -> u64 {
        let s = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        let line = s.lines().find(|l| l.starts_with(field)).unwrap();
        line.split_whitespace().nth(1).unwrap().parse().unwrap()
    }

    /// CPU time the broker has used so far, user and system, from `/proc/PID/stat` (in clock
    /// ticks of 10 ms: `CLK_TCK` is 100 on Linux).
    pub fn cpu_time(&self) -> Duration {
        let s = std::fs::read_to_string(format!("/proc/{}/stat", self.child.id())).unwrap();
        // Fields after the command name, which is in parentheses and may hold spaces.
        let f: Vec<&str> = s.rsplit(')').next().unwrap().split_whitespace().collect();
        let ticks: u64 = f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap();
        Duration::from_millis(ticks * 10)
    }

    /// Resident memory now, in bytes.
    pub fn rss(&self) -> u64 {
        self.status("VmRSS:") * 1024
    }

    /// Peak resident memory so far, in bytes.
    pub fn peak_rss(&self) -> u64 {
        self.status("VmHWM:") * 1024
    }

    /// Open TCP connections: the process's socket descriptors that `/proc/PID/net/tcp` lists
    /// in a state other than listening (the runtime's own Unix sockets are not TCP).
    pub fn connections(&self) -> usize {
        let pid = self.child.id();
        let inodes: std::collections::HashSet<String> =
            std::fs::read_dir(format!("/proc/{pid}/fd"))
                .unwrap()
                .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
                .filter_map(|t| {
                    let t = t.to_string_lossy().into_owned();
                    Some(t.strip_prefix("socket:[")?.strip_suffix(']')?.to_string())
                })
                .collect();
        let table = std::fs::read_to_string(format!("/proc/{pid}/net/tcp")).unwrap();
        table
            .lines()
            .skip(1)
            .map(|l| l.split_whitespace().collect::<Vec<_>>())
            .filter(|f| f.len() > 9 && f[3] != "0A" && inodes.contains(f[9]))
            .count()
    }

    /// Waits until no client connection is open.
    pub fn wait_idle(&self) {
        wait_until("connections to close", || self.connections() == 0);
    }

    /// Sends SIGTERM and waits for the exit; returns the status and how long it took.
    pub fn terminate(mut self) -> (ExitStatus, Duration) {
        let start = Instant::now();
        let kill = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(kill.success());
        let mut status = None;
        wait_until("brokerd to exit", || {
            status = self.child.try_wait().unwrap();
            status.is_some()
        });
        (status.expect("exited"), start.elapsed())
    }
}

impl Drop for Brokerd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Client frames, byte by byte.
pub mod wire {
    fn frame(kind: u8, fields: &[u8]) -> Vec<u8> {
        let mut f = ((fields.len() + 1) as u32).to_be_bytes().to_vec();
        f.push(kind);
        f.extend_from_slice(fields);
        f
    }

    fn str16(out: &mut Vec<u8>, s: &str) {
        out.extend_from_slice(&(s.len() as u16).to_be_bytes());
        out.extend_from_slice(s.as_bytes());
    }

    /// `HELLO` with protocol version 1 and the server's overflow policy.
    pub fn hello(name: &str) -> Vec<u8> {
        let mut f = vec![0, 0, 0, 1, 0, 1, 0, 0];
        str16(&mut f, name);
        frame(0x01, &f)
    }

    /// `SUB` without a queue group.
    pub fn sub(req_id: u32, sid: u32, filter: &str) -> Vec<u8> {
        let mut f = req_id.to_be_bytes().to_vec();
        f.extend_from_slice(&sid.to_be_bytes());
        f.push(0);
        str16(&mut f, filter);
        frame(0x03, &f)
    }

    /// `SUB` as a member of queue group `queue`.
    pub fn sub_queue(req_id: u32, sid: u32, filter: &str, queue: &str) -> Vec<u8> {
        let mut f = req_id.to_be_bytes().to_vec();
        f.extend_from_slice(&sid.to_be_bytes());
        f.push(1);
        str16(&mut f, filter);
        str16(&mut f, queue);
        frame(0x03, &f)
    }

    /// `PUB` without a reply-to or headers.
    pub fn publish(req_id: u32, ack: bool, topic: &str, payload: &[u8]) -> Vec<u8> {
        let mut f = req_id.to_be_bytes().to_vec();
        f.push(u8::from(ack));
        f.push(0);
        str16(&mut f, topic);
        f.extend_from_slice(payload);
        frame(0x02, &f)
    }

    /// `PUB` with a reply-to: a request.
    pub fn request(req_id: u32, topic: &str, reply: &str, payload: &[u8]) -> Vec<u8> {
        let mut f = req_id.to_be_bytes().to_vec();
        f.push(0);
        f.push(1);
        str16(&mut f, topic);
        str16(&mut f, reply);
        f.extend_from_slice(payload);
        frame(0x02, &f)
    }

    /// `PING` with `token`.
    pub fn ping(token: u32) -> Vec<u8> {
        frame(0x05, &token.to_be_bytes())
    }

    /// `PONG` answering the server's `PING` `token`.
    pub fn pong(token: u32) -> Vec<u8> {
        frame(0x06, &token.to_be_bytes())
    }
}

/// A blocking protocol connection.
pub struct Conn {
    /// The socket, for writes that may fail.
    pub s: TcpStream,
    buf: BytesMut,
}

impl Conn {
    /// Connects from loopback address `from`, with a receive buffer of `rcvbuf` bytes if given.
    pub fn connect(to: SocketAddr, from: Ipv4Addr, rcvbuf: Option<usize>) -> Conn {
        let socket = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
        socket.set_reuse_address(true).unwrap();
        if let Some(n) = rcvbuf {
            socket.set_recv_buffer_size(n).unwrap();
        }
        socket.bind(&SocketAddr::from((from, 0)).into()).unwrap();
        socket.connect(&to.into()).unwrap();
        let s: TcpStream = socket.into();
        s.set_nodelay(true).unwrap();
        s.set_read_timeout(Some(DEADLINE)).unwrap();
        Conn {
            s,
            buf: BytesMut::new(),
        }
    }

    /// Connects and completes the handshake.
    pub fn handshake(to: SocketAddr, from: Ipv4Addr, name: &str) -> Conn {
        let mut c = Conn::connect(to, from, None);
        c.send(&wire::hello(name));
        assert!(matches!(c.recv(), Some(Frame::Welcome(_))));
        c
    }

    /// Writes `bytes`; fails the test if the socket does.
    pub fn send(&mut self, bytes: &[u8]) {
        self.s.write_all(bytes).unwrap();
    }

    /// The next frame, or `None` once the server has closed. The server's `PING`s are answered
    /// here, as any client's would be, so a connection that only reads is not closed as idle.
    pub fn recv(&mut self) -> Option<Frame> {
        let mut chunk = [0u8; 64 * 1024];
        loop {
            match decode(&mut self.buf, usize::MAX).unwrap() {
                Some(Frame::Ping(token)) => {
                    self.send(&wire::pong(token));
                    continue;
                }
                Some(f) => return Some(f),
                None => {}
            }
            match self.s.read(&mut chunk) {
                Ok(0) => return None,
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return None,
                Err(e) => panic!("read: {e}"),
            }
        }
    }

    /// Ends the connection with a TCP reset.
    pub fn reset(self) {
        SockRef::from(&self.s)
            .set_linger(Some(Duration::ZERO))
            .unwrap();
    }
}

/// A connection that asks the broker for its statistics: a request on `$SYS.req.stats`, answered
/// on this connection's inbox (`docs/operations.md`, "Monitoring").
pub struct Stats {
    conn: Conn,
    asked: u32,
}

impl Stats {
    /// Connects from `from` and subscribes to its inbox.
    pub fn connect(to: SocketAddr, from: Ipv4Addr) -> Stats {
        let mut conn = Conn::handshake(to, from, "stats");
        conn.send(&wire::sub(1, 1, "_INBOX.stats.*"));
        assert_eq!(conn.recv(), Some(Frame::Ok(1)));
        Stats { conn, asked: 0 }
    }

    /// The broker's statistics: a snapshot at most 100 ms old (the broker shares one between
    /// requests that close together).
    pub fn get(&mut self) -> serde_json::Value {
        self.asked += 1;
        let reply = format!("_INBOX.stats.{}", self.asked);
        self.conn.send(&wire::request(
            0,
            brokerd_proto::topic::STATS_REQUEST,
            &reply,
            b"",
        ));
        loop {
            match self.conn.recv() {
                // An earlier request's answer, if one was abandoned, is passed over.
                Some(Frame::Msg(m)) if m.body.topic() == reply => {
                    return serde_json::from_slice(&m.body.payload()).unwrap();
                }
                Some(Frame::Msg(_)) => {}
                other => panic!("expected the statistics, got {other:?}"),
            }
        }
    }

    /// The live subscriptions the broker counts, this connection's inbox included.
    pub fn subscriptions(&mut self) -> u64 {
        self.get()["subscriptions"].as_u64().expect("a count")
    }

    /// Waits until the broker reports `n` live subscriptions; a snapshot may be up to 100 ms
    /// behind.
    pub fn wait_subscriptions(&mut self, n: u64) {
        wait_until(&format!("the broker to report {n} subscriptions"), || {
            self.subscriptions() == n
        });
    }
}

/// Raises this process's soft descriptor limit to `want` with `prlimit`, if needed.
pub fn fd_limit_at_least(want: u64) -> Result<(), String> {
    let soft = || -> u64 {
        let limits = std::fs::read_to_string("/proc/self/limits").unwrap();
        let line = limits
            .lines()
            .find(|l| l.starts_with("Max open files"))
            .unwrap();
        line.split_whitespace()
            .nth(3)
            .unwrap()
            .parse()
            .unwrap_or(u64::MAX)
    };
    if soft() >= want {
        return Ok(());
    }
    let out = Command::new("prlimit")
        .args([
            "--pid",
            &std::process::id().to_string(),
            &format!("--nofile={want}:{want}"),
        ])
        .output()
        .map_err(|e| format!("cannot run prlimit: {e}"))?;
    if out.status.success() && soft() >= want {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).trim().to_string())
    }
}
