//! The HTTP monitoring endpoints and the web console, on `http` (default `127.0.0.1:7655`):
//! `/healthz`, `/varz`, `/connz`, `/subz`, `/metrics` (Prometheus text), `/` (the console) and
//! `/tail` (matching messages as server-sent events, `tail.rs`). Documented in
//! `docs/operations.md`, "Monitoring".
//!
//! With authentication configured, every endpoint but `/healthz` needs an admin's credentials:
//! `Authorization: Bearer TOKEN` (the shared token) or HTTP Basic with a user's name and
//! password. A verified user and password are remembered for [`VERIFIED_FOR`] (a hash of them,
//! not the password), so a scrape every second does not hash a password every second; failures
//! are slowed down per address like failed logins on the broker's port.

use crate::monitor::{CONNZ_SORTS, ConnzQuery, SubzQuery};
use crate::server::Shared;
use axum::Router;
use axum::extract::{ConnectInfo, Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Json, Response};
use axum::routing::get;
use blake2::{Blake2b512, Digest};
use brokerd_proto::Credentials;
use parking_lot::Mutex;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use tokio::net::TcpListener;
use tracing::warn;

/// How long a verified user and password are taken without hashing them again.
pub(crate) const VERIFIED_FOR: Duration = Duration::from_secs(60);

/// Verified credentials remembered at most.
const MAX_VERIFIED: usize = 64;

/// The web console: one page, no build step, no external assets.
const CONSOLE: &str = include_str!("console.html");

/// Serves the endpoints on `listener` until the broker has shut down (the caller aborts the
/// task); `/healthz` answers 503 from the moment the shutdown starts.
pub(crate) async fn serve(listener: TcpListener, shared: Arc<Shared>) {
    let verified = Arc::new(Verified::default());
    let protected = Router::new()
        .route("/", get(console))
        .route("/varz", get(varz))
        .route("/connz", get(connz))
        .route("/subz", get(subz))
        .route("/metrics", get(metrics))
        .route("/streamz", get(streamz))
        .route("/tail", get(crate::tail::tail))
        .route_layer(middleware::from_fn_with_state(
            (shared.clone(), verified),
            require_admin,
        ));
    // Without authentication, a loopback listener's only protection is that other hosts cannot
    // reach it; a web page whose name an attacker points at 127.0.0.1 can, through the
    // visitor's browser, unless the Host it names is refused.
    let local_only = listener.local_addr().is_ok_and(|a| a.ip().is_loopback());
    let app = Router::new()
        .route("/healthz", get(healthz))
        .merge(protected)
        .layer(middleware::from_fn_with_state(
            (shared.clone(), local_only),
            guard,
        ))
        .with_state(shared);
    let service = app.into_make_service_with_connect_info::<Peer>();
    let listener = Limited {
        inner: listener,
        slots: Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS)),
        per_address: Arc::default(),
    };
    if let Err(e) = axum::serve(listener, service).await {
        warn!(error = %e, "monitoring endpoints stopped");
    }
}

/// HTTP connections open at once at most (tails included). Past that, new ones wait in the
/// listen backlog until one closes. A connection that sends nothing, sends its request slowly,
/// sits idle between requests, or stops reading what it is sent is closed after [`HEAD`],
/// [`IDLE`] or [`STALL`], and one address holds at most [`PER_ADDRESS`] of them, so a client
/// cannot keep the endpoints from others for longer than those times (nor take the broker's
/// file descriptors or tasks).
pub(crate) const MAX_CONNECTIONS: usize = 64;

/// HTTP connections one address may hold at once; more are closed as they are accepted.
pub(crate) const PER_ADDRESS: usize = 16;

/// How long a request may take to arrive whole, from its first byte (the first request: from
/// the connection).
pub(crate) const HEAD: Duration = Duration::from_secs(10);

/// How long a connection may go without a byte either way (an event stream's keep-alive
/// comments, every 15 s, count).
pub(crate) const IDLE: Duration = Duration::from_secs(30);

/// The send buffer asked of the kernel for each monitoring connection (Linux doubles it).
const SEND_BUFFER: usize = 64 * 1024;

/// How long a write may wait for a client that does not read what it is sent.
pub(crate) const STALL: Duration = Duration::from_secs(10);

/// The listener, accepting only while fewer than [`MAX_CONNECTIONS`] are open.
struct Limited {
    inner: TcpListener,
    slots: Arc<tokio::sync::Semaphore>,
    per_address: Arc<Mutex<HashMap<std::net::IpAddr, usize>>>,
}

/// The client's address, for handlers (`ConnectInfo<Peer>`), and the connection's "a request
/// is being answered" flag, which [`guard`] sets once a request's head has arrived (so that
/// [`HEAD`] does not cut a request whose handler is still working) and the first byte of the
/// answer clears.
#[derive(Debug, Clone)]
pub(crate) struct Peer(pub(crate) SocketAddr, pub(crate) Arc<AtomicBool>);

impl axum::extract::connect_info::Connected<axum::serve::IncomingStream<'_, Limited>> for Peer {
    fn connect_info(stream: axum::serve::IncomingStream<'_, Limited>) -> Peer {
        stream.remote_addr().clone()
    }
}

impl axum::serve::Listener for Limited {
    type Io = Held;
    type Addr = Peer;

    async fn accept(&mut self) -> (Held, Peer) {
        // The semaphore is never closed, so acquiring only waits.
        let permit = loop {
            if let Ok(p) = self.slots.clone().acquire_owned().await {
                break p;
            }
        };
        loop {
            match self.inner.accept().await {
                Ok((stream, addr)) => {
                    {
                        let mut counts = self.per_address.lock();
                        let n = counts.entry(addr.ip()).or_insert(0);
                        if *n >= PER_ADDRESS {
                            // Closed at once; the slot waits for the next connection.
                            continue;
                        }
                        *n += 1;
                    }
                    let _ = stream.set_nodelay(true);
                    // The kernel's send buffer grows to megabytes for a peer that does not
                    // read; fixed here, a stalled client pins little and its writes stall
                    // (and `STALL` ends it) soon after. Answers larger than this are written in
                    // several steps.
                    let _ = socket2::SockRef::from(&stream).set_send_buffer_size(SEND_BUFFER);
                    let now = Instant::now();
                    let answering = Arc::new(AtomicBool::new(false));
                    return (
                        Held {
                            answering: answering.clone(),
                            stream,
                            _slot: permit,
                            _address: AddressCount {
                                counts: self.per_address.clone(),
                                ip: addr.ip(),
                            },
                            timer: Box::pin(tokio::time::sleep_until(now.into())),
                            progress: now,
                            // The first request is due within `HEAD` of the connection.
                            request_since: Some(now),
                            blocked_since: None,
                        },
                        Peer(addr, answering),
                    );
                }
                Err(e) => {
                    // Out of file descriptors and similar: back off rather than spin.
                    warn!(error = %e, "monitoring: accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Peer> {
        self.inner
            .local_addr()
            .map(|a| Peer(a, Arc::new(AtomicBool::new(false))))
    }
}

/// One connection counted against its address until it is dropped.
struct AddressCount {
    counts: Arc<Mutex<HashMap<std::net::IpAddr, usize>>>,
    ip: std::net::IpAddr,
}

impl Drop for AddressCount {
    fn drop(&mut self) {
        let mut counts = self.counts.lock();
        if let Some(n) = counts.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                counts.remove(&self.ip);
            }
        }
    }
}

/// An accepted connection holding its slot until it is dropped, and ending itself (an I/O
/// error, on which the HTTP server drops it) when it overstays [`HEAD`], [`IDLE`] or
/// [`STALL`]. The HTTP server polls reads and writes from one task, so one timer serves both.
struct Held {
    stream: tokio::net::TcpStream,
    _slot: tokio::sync::OwnedSemaphorePermit,
    _address: AddressCount,
    timer: std::pin::Pin<Box<tokio::time::Sleep>>,
    /// When a byte last moved either way.
    progress: Instant,
    /// When the first byte of a request not yet answered arrived.
    request_since: Option<Instant>,
    /// Since when a write has found the socket full.
    blocked_since: Option<Instant>,
    /// Shared with the connection's [`Peer`]: a request's head has arrived and its answer has
    /// not started.
    answering: Arc<AtomicBool>,
}

impl Held {
    /// Pending until `deadline`, registered with the timer; an error once it has passed.
    fn expire<T>(
        &mut self,
        cx: &mut std::task::Context<'_>,
        deadline: Instant,
        what: &str,
    ) -> std::task::Poll<std::io::Result<T>> {
        use std::future::Future;
        if Instant::now() < deadline {
            self.timer.as_mut().reset(deadline.into());
            if self.timer.as_mut().poll(cx).is_pending() {
                return std::task::Poll::Pending;
            }
        }
        std::task::Poll::Ready(Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("monitoring connection closed: {what}"),
        )))
    }

    fn read_deadline(&self) -> (Instant, &'static str) {
        let idle = (self.progress + IDLE, "idle");
        if self.answering.load(Ordering::Relaxed) {
            return idle;
        }
        match self.request_since {
            Some(since) if since + HEAD < idle.0 => (since + HEAD, "request not complete in time"),
            _ => idle,
        }
    }

    /// After a write: what it moved, and the write deadline when it found the socket full.
    fn wrote(
        &mut self,
        cx: &mut std::task::Context<'_>,
        result: std::task::Poll<std::io::Result<usize>>,
    ) -> std::task::Poll<std::io::Result<usize>> {
        match result {
            std::task::Poll::Pending => {
                let since = *self.blocked_since.get_or_insert_with(Instant::now);
                self.expire(cx, since + STALL, "the client does not read")
            }
            std::task::Poll::Ready(Ok(n)) => {
                self.blocked_since = None;
                if n > 0 {
                    self.progress = Instant::now();
                    self.request_since = None;
                    self.answering.store(false, Ordering::Relaxed);
                }
                std::task::Poll::Ready(Ok(n))
            }
            other => other,
        }
    }
}

impl tokio::io::AsyncRead for Held {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        match std::pin::Pin::new(&mut self.stream).poll_read(cx, buf) {
            std::task::Poll::Pending => {
                let (deadline, what) = self.read_deadline();
                self.expire(cx, deadline, what)
            }
            std::task::Poll::Ready(Ok(())) => {
                if buf.filled().len() > before {
                    let now = Instant::now();
                    self.progress = now;
                    self.request_since.get_or_insert(now);
                }
                std::task::Poll::Ready(Ok(()))
            }
            other => other,
        }
    }
}

impl tokio::io::AsyncWrite for Held {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let result = std::pin::Pin::new(&mut self.stream).poll_write(cx, buf);
        self.wrote(cx, result)
    }

    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let result = std::pin::Pin::new(&mut self.stream).poll_write_vectored(cx, bufs);
        self.wrote(cx, result)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

/// Credentials verified recently: a hash of user and password, to when and whether admin.
#[derive(Default)]
struct Verified(Mutex<VerifiedUnder>);

/// What was verified, and under which users: a reload that changes a password or takes the
/// admin role away must not leave the old answer standing for [`VERIFIED_FOR`].
#[derive(Default)]
struct VerifiedUnder {
    /// The authenticator the entries were verified by; held, so its address is not reused.
    by: Option<Arc<crate::auth::Authenticator>>,
    entries: HashMap<[u8; 64], (Instant, bool)>,
}

impl Verified {
    /// The entries verified under `auth`, emptied first if the users have been reloaded since.
    fn under(
        &self,
        auth: &Arc<crate::auth::Authenticator>,
    ) -> parking_lot::MappedMutexGuard<'_, HashMap<[u8; 64], (Instant, bool)>> {
        let mut v = self.0.lock();
        if !v.by.as_ref().is_some_and(|by| Arc::ptr_eq(by, auth)) {
            v.entries.clear();
            v.by = Some(auth.clone());
        }
        parking_lot::MutexGuard::map(v, |v| &mut v.entries)
    }
}

/// Lets an admin through; answers 401 (with a Basic challenge) without valid credentials and
/// 403 for a user who is not an admin. Without authentication configured, everyone passes.
async fn require_admin(
    State((shared, verified)): State<(Arc<Shared>, Arc<Verified>)>,
    ConnectInfo(Peer(peer, _)): ConnectInfo<Peer>,
    request: Request,
    next: Next,
) -> Response {
    let auth = shared.auth.load_full();
    if !auth.required() {
        return next.run(request).await;
    }
    let Some(credentials) = credentials(request.headers()) else {
        return challenge("credentials required: a bearer token or an admin's user and password");
    };
    let key: [u8; 64] = match &credentials {
        Credentials::Password { user, password } => {
            Blake2b512::digest(format!("{user}\0{password}").as_bytes()).into()
        }
        _ => [0; 64],
    };
    let remembered = matches!(credentials, Credentials::Password { .. })
        .then(|| verified.under(&auth).get(&key).copied())
        .flatten()
        .filter(|(at, _)| at.elapsed() < VERIFIED_FOR);
    let admin = match remembered {
        Some((_, admin)) => admin,
        None => {
            let wait = auth.penalty(peer.ip(), Instant::now());
            if !wait.is_zero() {
                tokio::time::sleep(wait).await;
            }
            match auth.authenticate(Some(&credentials), &[]).await {
                Ok(identity) => {
                    auth.succeeded(peer.ip());
                    let admin = identity.permissions.as_ref().is_none_or(|p| p.admin);
                    if matches!(credentials, Credentials::Password { .. }) {
                        let mut v = verified.under(&auth);
                        if v.len() >= MAX_VERIFIED {
                            v.retain(|_, (at, _)| at.elapsed() < VERIFIED_FOR);
                        }
                        if v.len() < MAX_VERIFIED {
                            v.insert(key, (Instant::now(), admin));
                        }
                    }
                    admin
                }
                Err(_) => {
                    auth.failed(peer.ip(), Instant::now());
                    return challenge("authentication failed");
                }
            }
        }
    };
    if !admin {
        return (
            StatusCode::FORBIDDEN,
            "the monitoring endpoints are for users with the admin role\n",
        )
            .into_response();
    }
    next.run(request).await
}

/// Refuses a request that names a host other than this machine's loopback when the listener
/// is on loopback with no authentication, and marks every response as not to be framed or
/// sniffed by a browser.
async fn guard(
    State((shared, local_only)): State<(Arc<Shared>, bool)>,
    request: Request,
    next: Next,
) -> Response {
    // The head has arrived whole: the request deadline no longer applies while it is answered.
    if let Some(ConnectInfo(Peer(_, answering))) = request.extensions().get::<ConnectInfo<Peer>>() {
        answering.store(true, Ordering::Relaxed);
    }
    let foreign = local_only
        && !shared.auth.load().required()
        && request
            .headers()
            .get(header::HOST)
            .is_some_and(|host| !host.to_str().is_ok_and(is_loopback_host));
    let mut response = if foreign {
        (
            StatusCode::FORBIDDEN,
            "this broker's monitoring answers only requests for localhost or a loopback address\n",
        )
            .into_response()
    } else {
        next.run(request).await
    };
    let headers = response.headers_mut();
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static("frame-ancestors 'none'"),
    );
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    response
}

/// Whether a `Host` value (a name or address, with an optional port) is `localhost` or a
/// loopback address.
fn is_loopback_host(host: &str) -> bool {
    let name = if let Some(rest) = host.strip_prefix('[') {
        // `[::1]` or `[::1]:7655`.
        match rest.split_once(']') {
            Some((inside, after)) if after.is_empty() || after.starts_with(':') => inside,
            _ => return false,
        }
    } else {
        match host.rsplit_once(':') {
            Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => name,
            _ => host,
        }
    };
    name.eq_ignore_ascii_case("localhost")
        || name
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

fn challenge(message: &str) -> Response {
    let mut r = (StatusCode::UNAUTHORIZED, format!("{message}\n")).into_response();
    r.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_static("Basic realm=\"brokerd\", charset=\"UTF-8\""),
    );
    r
}

/// The request's credentials: `Bearer TOKEN`, or `Basic` user and password.
fn credentials(headers: &HeaderMap) -> Option<Credentials> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, rest) = value.split_once(' ')?;
    match scheme.to_ascii_lowercase().as_str() {
        "bearer" => Some(Credentials::Token(rest.trim().to_string())),
        "basic" => {
            let decoded = String::from_utf8(base64_decode(rest.trim())?).ok()?;
            let (user, password) = decoded.split_once(':')?;
            Some(Credentials::Password {
                user: user.to_string(),
                password: password.to_string(),
            })
        }
        _ => None,
    }
}

/// Standard base64 (padding optional); `None` for anything else.
fn base64_decode(text: &str) -> Option<Vec<u8>> {
    let value = |c: u8| -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        } as u32)
    };
    let bytes = text.trim_end_matches('=').as_bytes();
    if bytes.len() % 4 == 1 {
        return None;
    }
    let mut out = Vec::with_capacity(bytes.len() * 3 / 4);
    for chunk in bytes.chunks(4) {
        let mut n = 0u32;
        for (i, &c) in chunk.iter().enumerate() {
            n |= value(c)? << (18 - 6 * i);
        }
        let produced = chunk.len() - 1;
        out.extend_from_slice(&n.to_be_bytes()[1..1 + produced]);
    }
    Some(out)
}

/// `/healthz`: 200 while serving, 503 once the shutdown has started.
async fn healthz(State(shared): State<Arc<Shared>>) -> Response {
    if shared.shutdown.is_cancelled() {
        (StatusCode::SERVICE_UNAVAILABLE, "draining\n").into_response()
    } else {
        (StatusCode::OK, "ok\n").into_response()
    }
}

async fn console() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        CONSOLE,
    )
        .into_response()
}

async fn varz(State(shared): State<Arc<Shared>>) -> Response {
    Json(shared.monitor.varz(&shared)).into_response()
}

/// `/streamz`: every stream's definition and state, as `$SYS.req.stream.list` answers it. Each
/// stream's figures are read under its store's lock (a few loads), on the blocking pool.
async fn streamz(State(shared): State<Arc<Shared>>) -> Response {
    match tokio::task::spawn_blocking(move || shared.streams.infos()).await {
        Ok(streams) => Json(brokerd_proto::streams::StreamAnswer {
            streams,
            ..Default::default()
        })
        .into_response(),
        Err(_) => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    }
}

async fn connz(State(shared): State<Arc<Shared>>, Query(q): Query<ConnzQuery>) -> Response {
    if let Some(sort) = &q.sort
        && !CONNZ_SORTS.contains(&sort.as_str())
    {
        return (
            StatusCode::BAD_REQUEST,
            format!("unknown sort; one of: {}\n", CONNZ_SORTS.join(", ")),
        )
            .into_response();
    }
    if let Some(state) = &q.state
        && state != "open"
        && state != "closed"
    {
        return (StatusCode::BAD_REQUEST, "state is open or closed\n").into_response();
    }
    listing(shared, move |shared| shared.monitor.connz(shared, &q)).await
}

async fn subz(State(shared): State<Arc<Shared>>, Query(q): Query<SubzQuery>) -> Response {
    listing(shared, move |shared| shared.monitor.subz(shared, &q)).await
}

/// Listings run one at a time, in this process.
static LISTING: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(1);

/// Runs a listing whose cost grows with the connections and subscriptions (`/connz` sorts every
/// connection; `/subz?subs=1` reads every subscription: about 80 ms for 900,000) on the
/// blocking pool, one at a time: the runtime's workers keep routing while it runs, and requests
/// sent at once wait their turn instead of taking every core.
async fn listing<T: serde::Serialize + Send + 'static>(
    shared: Arc<Shared>,
    build: impl FnOnce(&Shared) -> T + Send + 'static,
) -> Response {
    let Ok(turn) = LISTING.acquire().await else {
        return StatusCode::SERVICE_UNAVAILABLE.into_response();
    };
    // Held by the listing itself: a client that goes away drops this future, not the work.
    match tokio::task::spawn_blocking(move || {
        let _turn = turn;
        build(&shared)
    })
    .await
    {
        Ok(answer) => Json(answer).into_response(),
        Err(_) => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    }
}

/// `/metrics`: the Prometheus text format. Every label's values are bounded (close reasons);
/// nothing is labelled by client or topic.
async fn metrics(State(shared): State<Arc<Shared>>) -> Response {
    // Each stream's figures are read under its store's lock, which its writer holds while it
    // appends: off the runtime's threads.
    let Ok(text) = tokio::task::spawn_blocking(move || metrics_text(&shared)).await else {
        return StatusCode::INTERNAL_SERVER_ERROR.into_response();
    };
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        text,
    )
        .into_response()
}

/// The metrics, encoded.
pub(crate) fn metrics_text(shared: &Shared) -> String {
    let (s, pending) = shared.monitor.varz_and_pending(shared);
    let mut r = Registry::with_prefix("brokerd");
    let counter = |r: &mut Registry, name: &str, help: &str, v: u64| {
        r.register(name, help, ConstCounter::new(v));
    };
    let gauge = |r: &mut Registry, name: &str, help: &str, v: i64| {
        r.register(name, help, ConstGauge::new(v));
    };
    let clamp = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
    r.register(
        "uptime_seconds",
        "Seconds since the broker started",
        ConstGauge::new(s.uptime_s),
    );
    gauge(
        &mut r,
        "connections",
        "Client connections now (handshake completed)",
        clamp(s.connections),
    );
    counter(
        &mut r,
        "connections_accepted",
        "Client connections accepted past the handshake",
        s.total_connections,
    );
    gauge(
        &mut r,
        "handshakes",
        "Connections in their handshake now",
        clamp(s.handshakes),
    );
    gauge(
        &mut r,
        "subscriptions",
        "Live subscriptions",
        clamp(s.subscriptions),
    );
    counter(
        &mut r,
        "messages_in",
        "Messages published (PUB frames accepted)",
        s.msgs_in,
    );
    counter(&mut r, "bytes_in", "Payload bytes published", s.bytes_in);
    counter(
        &mut r,
        "deliveries",
        "Deliveries queued for subscribers",
        s.deliveries,
    );
    counter(
        &mut r,
        "dropped",
        "Deliveries dropped by overflow policies",
        s.dropped,
    );
    counter(
        &mut r,
        "unrouted",
        "Messages that matched no subscription",
        s.unrouted,
    );
    counter(&mut r, "bytes_out", "Bytes written to clients", s.bytes_out);
    counter(
        &mut r,
        "abandoned",
        "Deliveries never written because their connection closed",
        shared
            .monitor
            .abandoned_msgs
            .load(std::sync::atomic::Ordering::Relaxed),
    );
    gauge(
        &mut r,
        "pending_messages",
        "Deliveries waiting to be written, all connections",
        clamp(pending.0),
    );
    gauge(
        &mut r,
        "pending_bytes",
        "Bytes of deliveries waiting to be written, all connections",
        clamp(pending.1),
    );
    gauge(
        &mut r,
        "memory_used_bytes",
        "Bytes charged to the memory budget",
        clamp(s.memory.used),
    );
    gauge(
        &mut r,
        "memory_limit_bytes",
        "The memory budget",
        clamp(s.memory.limit),
    );
    gauge(
        &mut r,
        "memory_shedding",
        "1 while queues shed deliveries over the memory budget",
        i64::from(s.memory.shedding),
    );
    gauge(
        &mut r,
        "sublist_nodes",
        "Nodes of the subscription trie",
        clamp(s.sublist.nodes),
    );
    gauge(
        &mut r,
        "match_cache_entries",
        "Topics in the match cache",
        clamp(s.sublist.cache_entries),
    );
    gauge(
        &mut r,
        "match_cache_bytes",
        "Bytes the match cache holds (estimate)",
        clamp(s.sublist.cache_bytes),
    );
    counter(
        &mut r,
        "match_cache_hits",
        "Lookups the match cache answered",
        s.sublist.cache_hits,
    );
    counter(
        &mut r,
        "match_cache_misses",
        "Lookups that walked the trie",
        s.sublist.cache_misses,
    );
    let closes = Family::<Vec<(String, String)>, Counter>::default();
    for (reason, n) in &s.closes {
        closes
            .get_or_create(&vec![("reason".to_string(), reason.clone())])
            .inc_by(*n);
    }
    r.register("closes", "Connections closed, by reason", closes);
    // One series per stream (at most 64), labelled by its name.
    let streams = shared.streams.infos();
    if !streams.is_empty() {
        type Labels = Vec<(String, String)>;
        let gauges = |name: &str,
                      help: &str,
                      r: &mut Registry,
                      f: &dyn Fn(&brokerd_proto::streams::StreamInfo) -> u64| {
            let fam = Family::<Labels, prometheus_client::metrics::gauge::Gauge>::default();
            for st in &streams {
                fam.get_or_create(&vec![("stream".to_string(), st.config.name.clone())])
                    .set(clamp(f(st)));
            }
            r.register(name, help, fam);
        };
        gauges(
            "stream_messages",
            "Messages a stream stores",
            &mut r,
            &|s| s.msgs,
        );
        gauges(
            "stream_bytes",
            "Bytes of a stream's segment files",
            &mut r,
            &|s| s.bytes,
        );
        gauges(
            "stream_last_sequence",
            "A stream's newest sequence",
            &mut r,
            &|s| s.last_seq,
        );
        gauges(
            "stream_readers",
            "Replay subscriptions reading a stream",
            &mut r,
            &|s| s.readers,
        );
        let counters =
            |name: &str,
             help: &str,
             r: &mut Registry,
             f: &dyn Fn(&brokerd_proto::streams::StreamInfo) -> u64| {
                let fam = Family::<Labels, Counter>::default();
                for st in &streams {
                    fam.get_or_create(&vec![("stream".to_string(), st.config.name.clone())])
                        .inc_by(f(st));
                }
                r.register(name, help, fam);
            };
        counters(
            "stream_store_errors",
            "Publishes a stream could not store",
            &mut r,
            &|s| s.store_errors,
        );
        counters(
            "stream_duplicates",
            "Repeated message ids a stream suppressed",
            &mut r,
            &|s| s.duplicates,
        );
    }
    let mut out = String::new();
    if encode(&mut out, &r).is_err() {
        out.clear();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_loopback_hosts_are_local() {
        for host in [
            "localhost",
            "LOCALHOST:7655",
            "127.0.0.1",
            "127.0.0.1:7655",
            "127.3.4.5:80",
            "[::1]",
            "[::1]:7655",
        ] {
            assert!(is_loopback_host(host), "{host}");
        }
        for host in [
            "attacker.example",
            "attacker.example:7655",
            "localhost.attacker.example",
            "10.0.0.1:7655",
            "[::1].example",
            "[2001:db8::1]:7655",
            "",
        ] {
            assert!(!is_loopback_host(host), "{host}");
        }
    }

    #[test]
    fn base64_round_trips_what_browsers_send() {
        assert_eq!(
            base64_decode("YWRtaW46cHc=").as_deref(),
            Some(&b"admin:pw"[..])
        );
        assert_eq!(
            base64_decode("YWRtaW46cHc").as_deref(),
            Some(&b"admin:pw"[..])
        );
        assert_eq!(base64_decode("").as_deref(), Some(&b""[..]));
        assert_eq!(base64_decode("a"), None);
        assert_eq!(base64_decode("a*bc"), None);
    }

    #[test]
    fn credentials_from_either_scheme() {
        let mut h = HeaderMap::new();
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer s3cret"),
        );
        assert_eq!(credentials(&h), Some(Credentials::Token("s3cret".into())));
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Basic YWRtaW46cDpx"),
        );
        assert_eq!(
            credentials(&h),
            Some(Credentials::Password {
                user: "admin".into(),
                password: "p:q".into()
            })
        );
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("Digest x"));
        assert_eq!(credentials(&h), None);
    }
}
