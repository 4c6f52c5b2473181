//! The end-to-end test harness: a real brokerd on `127.0.0.1:0`, stopped through the same
//! shutdown path a signal takes, plus a raw protocol connection for tests that must send bytes
//! the client library never would.

// A test harness: failing loudly at the failing step is its job.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use brokerd_client::{Client, ConnectOptions};
use brokerd_proto::{Frame, Hello, PROTOCOL_VERSION, decode};
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
    /// Its routing state, for statistics.
    pub broker: Arc<brokerd_core::Broker>,
    handle: ShutdownHandle,
    join: JoinHandle<std::io::Result<()>>,
}

impl TestBroker {
    /// Starts a broker with the default configuration on an ephemeral port.
    pub async fn start() -> TestBroker {
        TestBroker::with_config(|_| {}).await
    }

    /// Starts a broker with the defaults changed by `f`.
    pub async fn with_config(f: impl FnOnce(&mut Config)) -> TestBroker {
        let mut config = Config {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            ..Config::default()
        };
        f(&mut config);
        let server = Server::bind(config).await.expect("bind 127.0.0.1:0");
        let addr = server.local_addr().expect("local addr");
        let broker = server.broker();
        let handle = server.shutdown_handle();
        let join = tokio::spawn(server.run());
        TestBroker {
            addr,
            broker,
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
        }))
        .await;
        match c.recv().await {
            Some(Frame::Welcome(_)) => c,
            other => panic!("expected WELCOME, got {other:?}"),
        }
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

/// Polls `cond` until it holds, failing the test after [`DEADLINE`].
pub async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let end = tokio::time::Instant::now() + DEADLINE;
    while !cond() {
        assert!(
            tokio::time::Instant::now() < end,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
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

    /// Sends one frame.
    pub async fn send(&mut self, frame: &Frame) {
        self.send_bytes(&frame.to_bytes()).await;
    }

    /// Sends arbitrary bytes.
    pub async fn send_bytes(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.expect("write");
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
                    Ok(0) | Err(_) => return None,
                    Ok(_) => {}
                }
            }
        })
        .await
        .expect("frame or close within the deadline")
    }
}
