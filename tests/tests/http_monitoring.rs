//! The HTTP monitoring endpoints and the broker's `$SYS` events, end to end: a real broker with
//! `http` on `127.0.0.1:0`, the real client, and plain HTTP/1.1 requests written here. Each
//! endpoint's shape and true figures after known traffic; the metrics parsed as Prometheus text;
//! the events of a connect, a disconnect, drops and a write-deadline close; admin-only access
//! with authentication on; `/healthz` while draining.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use brokerd_proto::stats::{Connz, ServerStats, Subz};
use brokerd_server::config::UserConfig;
use brokerd_tests::{DEADLINE, RawConn, TestBroker};
use serde_json::Value;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// One HTTP response.
struct Response {
    status: u16,
    headers: String,
    body: String,
}

/// `GET path` with an optional `Authorization` value, `Connection: close`, read to the end.
async fn get(addr: SocketAddr, path: &str, authorization: Option<&str>) -> Response {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let auth = authorization.map_or(String::new(), |a| format!("Authorization: {a}\r\n"));
    let request =
        format!("GET {path} HTTP/1.1\r\nHost: localhost\r\n{auth}Connection: close\r\n\r\n");
    s.write_all(request.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    tokio::time::timeout(DEADLINE, s.read_to_end(&mut raw))
        .await
        .expect("the response in time")
        .unwrap();
    let text = String::from_utf8(raw).expect("UTF-8 response");
    let (head, body) = text.split_once("\r\n\r\n").expect("a header block");
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        unchunk(body)
    } else {
        body.to_string()
    };
    Response {
        status,
        headers: head.to_string(),
        body,
    }
}

/// The body of a chunked response.
fn unchunk(mut rest: &str) -> String {
    let mut out = String::new();
    loop {
        let (size, after) = rest.split_once("\r\n").unwrap();
        let size = usize::from_str_radix(size.trim(), 16).unwrap();
        if size == 0 {
            return out;
        }
        out.push_str(&after[..size]);
        rest = &after[size + 2..];
    }
}

async fn json<T: serde::de::DeserializeOwned>(addr: SocketAddr, path: &str) -> T {
    let r = get(addr, path, None).await;
    assert_eq!(r.status, 200, "{path}: {}", r.body);
    serde_json::from_str(&r.body).unwrap_or_else(|e| panic!("{path}: {e}: {}", r.body))
}

async fn monitored(f: impl FnOnce(&mut brokerd_server::Config)) -> (TestBroker, SocketAddr) {
    let b = TestBroker::with_config(|c| {
        c.http = Some("127.0.0.1:0".parse().unwrap());
        f(c);
    })
    .await;
    let http = b.http_addr.expect("http listens");
    (b, http)
}

/// Parses Prometheus text exposition: every family has `# HELP` and `# TYPE` before its
/// samples, every sample is `name{labels} value` with a number, names are valid, and the text
/// ends with `# EOF`. Returns each sample's value by its name and labels.
fn parse_metrics(text: &str) -> BTreeMap<String, f64> {
    let valid_name = |n: &str| {
        !n.is_empty()
            && n.chars().enumerate().all(|(i, c)| {
                c == '_' || c == ':' || c.is_ascii_alphabetic() || (i > 0 && c.is_ascii_digit())
            })
    };
    let mut typed = std::collections::HashSet::new();
    let mut helped = std::collections::HashSet::new();
    let mut samples = BTreeMap::new();
    let mut lines = text.lines().peekable();
    while let Some(line) = lines.next() {
        if line == "# EOF" {
            assert!(lines.peek().is_none(), "text after # EOF");
            return samples;
        }
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let name = rest.split(' ').next().unwrap();
            assert!(valid_name(name), "{line}");
            assert!(helped.insert(name.to_string()), "a second HELP for {name}");
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut parts = rest.split(' ');
            let name = parts.next().unwrap();
            let kind = parts.next().unwrap();
            assert!(["counter", "gauge"].contains(&kind), "{line}");
            assert!(typed.insert(name.to_string()), "a second TYPE for {name}");
            continue;
        }
        let (series, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("{line}"));
        let value: f64 = value
            .parse()
            .unwrap_or_else(|_| panic!("not a number: {line}"));
        let name = series.split('{').next().unwrap();
        assert!(valid_name(name), "{line}");
        let family = name.strip_suffix("_total").unwrap_or(name);
        assert!(typed.contains(family), "no TYPE before {line}");
        if let Some(labels) = series.strip_prefix(name)
            && !labels.is_empty()
        {
            assert!(labels.starts_with('{') && labels.ends_with('}'), "{line}");
        }
        samples.insert(series.to_string(), value);
    }
    panic!("no # EOF at the end of:\n{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_endpoint_shows_the_traffic_it_saw() {
    let (b, http) = monitored(|_| {}).await;
    let subscriber = b.client("orders-subscriber").await;
    let mut sub = subscriber.subscribe("orders.>").await.unwrap();
    let publisher = b.client("orders-publisher").await;
    // Enough for the busiest-topic sample (one publish in 64) to see the topic.
    for _ in 0..640 {
        publisher.publish("orders.created", "{}").await.unwrap();
    }
    assert_eq!(
        publisher
            .publish("orders.created", "{}")
            .acked()
            .await
            .unwrap(),
        1
    );
    for _ in 0..641 {
        tokio::time::timeout(DEADLINE, sub.next())
            .await
            .unwrap()
            .unwrap();
    }
    // The sampler runs once a second: wait for one that saw the traffic.
    let mut varz: ServerStats = json(http, "/varz").await;
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while varz.busiest_topics.is_empty() && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
        varz = json(http, "/varz").await;
    }
    assert_eq!(varz.msgs_in, 641);
    assert_eq!(varz.deliveries, 641);
    assert_eq!(varz.connections, 2);
    assert_eq!(varz.subscriptions, 1);
    assert_eq!(varz.dropped, 0);
    assert_eq!(varz.busiest_topics[0].topic, "orders.created");
    assert!(varz.busiest_topics[0].msgs_per_s > 0.0);
    assert_eq!(varz.limits.max_payload, 1024 * 1024);
    assert!(varz.uptime_s > 0.0 && !varz.server_id.is_empty());

    // /connz: both connections, their figures, sorting, paging, and a refusal of a bad sort.
    let connz: Connz = json(http, "/connz").await;
    assert_eq!((connz.state.as_str(), connz.total), ("open", 2));
    let by_name = |c: &Connz, name: &str| c.connections.iter().find(|r| r.name == name).cloned();
    let s = by_name(&connz, "orders-subscriber").unwrap();
    assert_eq!((s.subscriptions, s.deliveries, s.pending_msgs), (1, 641, 0));
    assert_eq!(s.filters, ["orders.>"]);
    assert!(s.bytes_out > 641 * 16, "{s:?}");
    let p = by_name(&connz, "orders-publisher").unwrap();
    assert_eq!((p.msgs_in, p.bytes_in), (641, 641 * 2));
    assert!(p.connected_at.ends_with('Z'), "{}", p.connected_at);
    let sorted: Connz = json(http, "/connz?sort=msgs_in").await;
    assert_eq!(sorted.connections[0].name, "orders-publisher");
    let page: Connz = json(http, "/connz?sort=msgs_in&limit=1&offset=1").await;
    assert_eq!(page.connections.len(), 1);
    assert_eq!(page.connections[0].name, "orders-subscriber");
    assert_eq!(get(http, "/connz?sort=nonsense", None).await.status, 400);

    // /subz: the count, and the subscription itself on request.
    let subz: Subz = json(http, "/subz").await;
    assert_eq!((subz.sublist.subscriptions, subz.subs.len()), (1, 0));
    let subz: Subz = json(http, "/subz?subs=1&filter=orders").await;
    assert_eq!(subz.listed, 1);
    assert_eq!(subz.subs[0].filter, "orders.>");
    assert_eq!(subz.subs[0].conn_name, "orders-subscriber");
    assert_eq!(subz.subs[0].matched, 641);
    let none: Subz = json(http, "/subz?subs=1&filter=payments").await;
    assert_eq!(none.listed, 0);

    // /metrics: valid text, and the same figures.
    let r = get(http, "/metrics", None).await;
    assert_eq!(r.status, 200);
    assert!(r.headers.contains("openmetrics-text"), "{}", r.headers);
    let m = parse_metrics(&r.body);
    assert_eq!(m["brokerd_messages_in_total"], 641.0);
    assert_eq!(m["brokerd_deliveries_total"], 641.0);
    assert_eq!(m["brokerd_connections"], 2.0);
    assert_eq!(m["brokerd_subscriptions"], 1.0);
    assert_eq!(m["brokerd_closes_total{reason=\"client-closed\"}"], 0.0);
    assert!(
        m.keys().all(|k| !k.contains("orders")),
        "a label per topic or client"
    );

    // A closed connection: in /connz?state=closed with its reason, and in the counters.
    publisher.close().await.unwrap();
    b.wait_for_connections(1).await;
    let closed: Connz = json(http, "/connz?state=closed").await;
    assert_eq!(closed.total, 1);
    let c = &closed.closed[0];
    assert_eq!(
        (c.conn.name.as_str(), c.reason.as_str()),
        ("orders-publisher", "client-closed")
    );
    assert_eq!((c.conn.msgs_in, c.abandoned_msgs), (641, 0));
    let m = parse_metrics(&get(http, "/metrics", None).await.body);
    assert_eq!(m["brokerd_closes_total{reason=\"client-closed\"}"], 1.0);
    assert_eq!(get(http, "/healthz", None).await.status, 200);
    let console = get(http, "/", None).await;
    assert_eq!(console.status, 200);
    assert!(console.headers.contains("text/html"));
    b.stop().await;
}

/// Reads `$SYS.event` messages until one on `topic` for the client named `name`.
async fn event(sub: &mut brokerd_client::Subscription, topic: &str, name: &str) -> Value {
    loop {
        let msg = tokio::time::timeout(DEADLINE, sub.next())
            .await
            .unwrap_or_else(|_| panic!("no {topic} event for {name}"))
            .expect("the event subscription is open");
        let v: Value = serde_json::from_slice(&msg.payload()).expect("events are JSON");
        if msg.topic() == topic && v["name"] == name {
            return v;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_tell_of_connects_disconnects_drops_and_write_deadline_closes() {
    let (b, http) = monitored(|c| {
        c.outbound.write_deadline = Duration::from_millis(200);
    })
    .await;
    let ops = b.client("ops").await;
    let mut events = ops.subscribe("$SYS.event.>").await.unwrap();
    // A catch-all subscriber never sees the broker's events; it reads everything it gets, so
    // that it is not a slow consumer itself.
    let catch_all = b.client("catch-all").await;
    let mut everything = catch_all.subscribe(">").await.unwrap();
    let reader = tokio::spawn(async move {
        let mut reserved = Vec::new();
        while let Some(m) = everything.next().await {
            if m.topic().starts_with('$') {
                reserved.push(m.topic().to_string());
            }
        }
        reserved
    });

    let visitor = b.client("visitor").await;
    let connect = event(&mut events, "$SYS.event.client.connect", "visitor").await;
    assert!(connect["id"].as_u64().is_some() && connect["peer"].as_str().is_some());
    visitor.close().await.unwrap();
    let gone = event(&mut events, "$SYS.event.client.disconnect", "visitor").await;
    assert_eq!(gone["reason"], "client-closed");
    assert_eq!(gone["abandoned_msgs"], 0);

    // A subscriber whose socket is never read: the write deadline closes it, and what was
    // queued for it is counted as abandoned.
    let stalled = RawConn::stalled_subscriber(b.addr, "never-reads", "big").await;
    let publisher = b.client("publisher").await;
    let body = vec![0u8; 64 * 1024];
    for _ in 0..512 {
        publisher.publish("big", &body).await.unwrap();
    }
    publisher.flush().await.unwrap();
    let slow = event(
        &mut events,
        "$SYS.event.client.slow_consumer",
        "never-reads",
    )
    .await;
    assert_eq!(slow["reason"], "write-timeout");
    let abandoned = slow["abandoned_msgs"].as_u64().unwrap();
    assert!(abandoned > 0, "{slow}");
    let gone = event(&mut events, "$SYS.event.client.disconnect", "never-reads").await;
    assert_eq!(gone["abandoned_msgs"], abandoned);
    let varz: ServerStats = json(http, "/varz").await;
    assert_eq!(varz.closes["write-timeout"], 1);
    assert_eq!(varz.abandoned_msgs, abandoned);
    assert!(varz.abandoned_bytes >= abandoned * 64 * 1024, "{varz:?}");
    let m = parse_metrics(&get(http, "/metrics", None).await.body);
    assert_eq!(m["brokerd_abandoned_total"], abandoned as f64);
    drop(stalled);

    // The catch-all subscription received the publishes, never an event.
    drop(catch_all);
    let reserved = tokio::time::timeout(DEADLINE, reader)
        .await
        .unwrap()
        .unwrap();
    assert!(
        reserved.is_empty(),
        "reached a > subscription: {reserved:?}"
    );
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drops_are_reported_once_a_second_per_connection() {
    let (b, _http) = monitored(|c| {
        c.outbound.max_pending_msgs = 4;
        c.outbound.write_deadline = Duration::from_secs(3600);
    })
    .await;
    let ops = b.client("ops").await;
    let mut events = ops.subscribe("$SYS.event.client.dropped").await.unwrap();
    let stalled = RawConn::stalled_subscriber(b.addr, "drops", "small").await;
    let publisher = b.client("publisher").await;
    // Far more than the socket's buffers and a queue of 4 hold.
    let body = vec![0u8; 64 * 1024];
    for _ in 0..400 {
        publisher.publish("small", &body).await.unwrap();
    }
    publisher.flush().await.unwrap();
    // Every event counts what was dropped since the one before, at most one a second.
    let first = event(&mut events, "$SYS.event.client.dropped", "drops").await;
    assert_eq!(first["overflow"], "drop-new");
    assert_eq!(first["filters"], serde_json::json!(["small"]));
    let mut all = vec![first];
    while let Ok(Some(m)) = tokio::time::timeout(Duration::from_millis(2500), events.next()).await {
        all.push(serde_json::from_slice(&m.payload()).unwrap());
    }
    let sum: u64 = all.iter().map(|e| e["dropped"].as_u64().unwrap()).sum();
    assert!(sum > 0);
    assert_eq!(all.last().unwrap()["dropped_total"], sum, "{all:?}");
    assert!(all.len() <= 3, "more than one event a second: {all:?}");
    drop(stalled);
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_authentication_only_an_admin_reads_the_endpoints() {
    let hash = brokerd_server::auth::hash_password("pw").unwrap();
    let (b, http) = monitored(|c| {
        c.auth.token = Some("monitoring-token-0123456789".into());
        c.auth.users = vec![
            UserConfig {
                name: "root".into(),
                password_hash: hash.clone(),
                admin: true,
                ..UserConfig::default()
            },
            UserConfig {
                name: "app".into(),
                password_hash: hash.clone(),
                ..UserConfig::default()
            },
        ];
    })
    .await;
    let basic = |user: &str, pw: &str| format!("Basic {}", base64(&format!("{user}:{pw}")));
    let anonymous = get(http, "/varz", None).await;
    assert_eq!(anonymous.status, 401);
    assert!(
        anonymous.headers.contains("WWW-Authenticate: Basic")
            || anonymous.headers.contains("www-authenticate: Basic"),
        "{}",
        anonymous.headers
    );
    assert_eq!(
        get(http, "/varz", Some(&basic("root", "wrong")))
            .await
            .status,
        401
    );
    assert_eq!(
        get(http, "/varz", Some(&basic("app", "pw"))).await.status,
        403
    );
    assert_eq!(
        get(http, "/metrics", Some(&basic("app", "pw")))
            .await
            .status,
        403
    );
    assert_eq!(
        get(http, "/varz", Some(&basic("root", "pw"))).await.status,
        200
    );
    // Remembered: the second request does not hash again, and still answers.
    assert_eq!(
        get(http, "/connz", Some(&basic("root", "pw"))).await.status,
        200
    );
    assert_eq!(
        get(http, "/metrics", Some("Bearer monitoring-token-0123456789"))
            .await
            .status,
        200
    );
    assert_eq!(get(http, "/tail?filter=x", None).await.status, 401);
    // The health check needs nothing.
    assert_eq!(get(http, "/healthz", None).await.status, 200);
    b.stop().await;
}

#[tokio::test]
async fn a_reload_ends_remembered_monitoring_logins() {
    let hash = |pw: &str| brokerd_server::auth::hash_password(pw).unwrap();
    let (b, http) = monitored(|c| {
        c.auth.users = vec![UserConfig {
            name: "root".into(),
            password_hash: hash("old"),
            admin: true,
            ..UserConfig::default()
        }];
    })
    .await;
    let basic = |pw: &str| format!("Basic {}", base64(&format!("root:{pw}")));
    // Verified once, then remembered.
    assert_eq!(get(http, "/varz", Some(&basic("old"))).await.status, 200);
    assert_eq!(get(http, "/varz", Some(&basic("old"))).await.status, 200);
    // The password rotated: the old one stops working at once, not when the memory expires.
    let mut rotated = (*b.reload.config()).clone();
    rotated.auth.users[0].password_hash = hash("new");
    b.reload.reload(rotated.clone()).await;
    assert_eq!(get(http, "/varz", Some(&basic("old"))).await.status, 401);
    assert_eq!(get(http, "/varz", Some(&basic("new"))).await.status, 200);
    // The admin role taken away: refused at once too.
    let mut demoted = rotated;
    demoted.auth.users[0].admin = false;
    b.reload.reload(demoted).await;
    assert_eq!(get(http, "/varz", Some(&basic("new"))).await.status, 403);
    b.stop().await;
}

fn base64(text: &str) -> String {
    const A: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in text.as_bytes().chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(A[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthz_says_draining_while_the_broker_shuts_down() {
    let (b, http) = monitored(|c| {
        c.timeouts.shutdown_grace = Duration::from_secs(3);
        c.outbound.write_deadline = Duration::from_secs(3600);
    })
    .await;
    // A subscriber that never reads keeps the drain going for the whole grace period.
    let stalled = RawConn::stalled_subscriber(b.addr, "never-reads", "big").await;
    let publisher = b.client("publisher").await;
    let body = vec![0u8; 64 * 1024];
    for _ in 0..256 {
        publisher.publish("big", &body).await.unwrap();
    }
    publisher.flush().await.unwrap();
    assert_eq!(get(http, "/healthz", None).await.status, 200);
    b.begin_shutdown();
    let mut status = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    while tokio::time::Instant::now() < deadline {
        status = get(http, "/healthz", None).await.status;
        if status == 503 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(status, 503);
    drop(stalled);
    b.finish_shutdown(DEADLINE).await;
}

#[tokio::test]
async fn a_second_broker_on_the_same_monitoring_port_runs_without_it() {
    let first = TestBroker::with_config(|c| c.http = Some("127.0.0.1:0".parse().unwrap())).await;
    let taken = first.http_addr.unwrap();
    let second = TestBroker::with_config(|c| c.http = Some(taken)).await;
    assert_eq!(second.http_addr, None);
    // It serves its clients all the same.
    let c = second.client("c").await;
    assert_eq!(c.publish("t", "x").acked().await.unwrap(), 0);
    second.stop().await;
    first.stop().await;
}

/// A connection to `to` from `from` (any 127/8 address).
async fn connect_from(to: SocketAddr, from: [u8; 4]) -> TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::from((from, 0))).unwrap();
    socket.connect(to).await.unwrap()
}

/// Reads until the peer closes, failing the test if it does not within `DEADLINE`.
async fn closed_by_peer(s: &mut TcpStream, what: &str) {
    let mut rest = Vec::new();
    let read = tokio::time::timeout(DEADLINE, s.read_to_end(&mut rest)).await;
    assert!(read.is_ok(), "{what}: never closed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_http_connections_take_a_bounded_number_of_slots_and_nothing_from_the_broker() {
    let (b, http) = monitored(|_| {}).await;
    let per = brokerd_server::MONITORING_PER_ADDRESS;
    // As many connections as the endpoints serve at once, each sending nothing, from as few
    // addresses as the limit per address allows.
    let mut idle = Vec::new();
    for i in 0..brokerd_server::MONITORING_CONNECTIONS {
        idle.push(connect_from(http, [127, 0, 1, (i / per) as u8 + 1]).await);
    }
    // One more: accepted by the kernel, but not served while every slot is held.
    let mut waiting = connect_from(http, [127, 0, 2, 1]).await;
    waiting
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut first = [0u8; 1];
    let early = tokio::time::timeout(Duration::from_millis(300), waiting.read(&mut first)).await;
    assert!(early.is_err(), "answered while every slot was held");
    // The broker serves its clients all the same.
    let c = b.client("c").await;
    assert_eq!(c.publish("t", "x").acked().await.unwrap(), 0);
    // A slot freed: the waiting request is served.
    drop(idle.pop());
    let mut answer = Vec::new();
    tokio::time::timeout(DEADLINE, waiting.read_to_end(&mut answer))
        .await
        .expect("served once a slot is free")
        .unwrap();
    assert!(
        answer.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&answer)
    );
    // The silent connections do not keep their slots: each is closed after the request
    // deadline or the idle time (`HEAD`, `IDLE`), and the endpoints answer again.
    for (i, s) in idle.iter_mut().enumerate().take(4) {
        closed_by_peer(s, &format!("idle connection {i}")).await;
    }
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_address_holds_a_bounded_number_of_connections_and_slow_requests_are_cut() {
    let (b, http) = monitored(|_| {}).await;
    let per = brokerd_server::MONITORING_PER_ADDRESS;
    // Each holds the start of a request and never finishes it.
    let mut slow = Vec::new();
    for _ in 0..per {
        let mut s = connect_from(http, [127, 0, 3, 1]).await;
        s.write_all(b"GET /varz HTTP/1.1\r\nHost: local")
            .await
            .unwrap();
        slow.push(s);
    }
    // One more from the same address is closed at once, unanswered.
    let mut over = connect_from(http, [127, 0, 3, 1]).await;
    let _ = over
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await;
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(DEADLINE, over.read_to_end(&mut answer))
        .await
        .expect("closed at once");
    assert!(answer.is_empty(), "{}", String::from_utf8_lossy(&answer));
    // Another address is served meanwhile.
    let r = get(http, "/healthz", None).await;
    assert_eq!(r.status, 200);
    // The unfinished requests are cut when their deadline passes, unanswered.
    for (i, s) in slow.iter_mut().enumerate() {
        closed_by_peer(s, &format!("slow request {i}")).await;
    }
    b.stop().await;
}

#[tokio::test]
async fn without_authentication_only_requests_for_a_loopback_host_are_answered() {
    let (b, http) = monitored(|_| {}).await;
    let request =
        |host: &str| format!("GET /varz HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
    for (host, status) in [
        ("attacker.example", "403"),
        ("attacker.example:7655", "403"),
        ("localhost", "200"),
        (&http.to_string(), "200"),
    ] {
        let mut s = TcpStream::connect(http).await.unwrap();
        s.write_all(request(host).as_bytes()).await.unwrap();
        let mut raw = Vec::new();
        tokio::time::timeout(DEADLINE, s.read_to_end(&mut raw))
            .await
            .expect("an answer")
            .unwrap();
        let text = String::from_utf8_lossy(&raw);
        assert!(
            text.starts_with(&format!("HTTP/1.1 {status}")),
            "{host}: {text}"
        );
        let head = text.to_ascii_lowercase();
        assert!(
            head.contains("x-content-type-options: nosniff")
                && head.contains("x-frame-options: deny"),
            "{head}"
        );
    }
    b.stop().await;
}

#[tokio::test]
async fn streams_show_in_streamz_and_in_the_metrics() {
    let data = brokerd_tests::TempDir::new("http-streams");
    let dir = data.0.clone();
    let (b, http) = monitored(move |c| {
        c.data_dir = dir;
        c.streams = vec![brokerd_proto::streams::StreamConfig {
            name: "ORDERS".into(),
            filters: vec!["order.>".into()],
            ..Default::default()
        }];
    })
    .await;
    let client = b.client("p").await;
    for i in 0..5 {
        client
            .publish("order.created", format!("{i}"))
            .acked()
            .await
            .unwrap();
    }
    let answer: brokerd_proto::streams::StreamAnswer = json(http, "/streamz").await;
    let s = &answer.streams[0];
    assert_eq!(
        (s.config.name.as_str(), s.msgs, s.last_seq),
        ("ORDERS", 5, 5)
    );
    let m = parse_metrics(&get(http, "/metrics", None).await.body);
    assert_eq!(
        m.get(r#"brokerd_stream_messages{stream="ORDERS"}"#),
        Some(&5.0)
    );
    assert_eq!(
        m.get(r#"brokerd_stream_last_sequence{stream="ORDERS"}"#),
        Some(&5.0)
    );
    assert_eq!(
        m.get(r#"brokerd_stream_store_errors_total{stream="ORDERS"}"#),
        Some(&0.0)
    );
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tail_whose_reader_stops_holds_a_bounded_queue_and_is_closed() {
    let (b, http) = monitored(|_| {}).await;
    // A browser that asks for a tail, reads the start of the answer, and then reads nothing: a
    // small receive buffer so that the broker's writes stall soon.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut tail = socket.connect(http).await.unwrap();
    tail.write_all(b"GET /tail?filter=t.%3E HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await
        .unwrap();
    let mut head = [0u8; 12];
    tokio::time::timeout(DEADLINE, tail.read_exact(&mut head))
        .await
        .expect("the tail's answer")
        .unwrap();
    assert_eq!(&head, b"HTTP/1.1 200");
    let tail_row = || async {
        let page: Connz = json(http, "/connz?limit=1000").await;
        page.connections
            .into_iter()
            .find(|c| c.name == "web-console-tail")
    };
    assert!(tail_row().await.is_some(), "the tail's connection shows");
    // A steady 2,000 messages a second, far more than the tail shows (20) and, once its
    // writes stall, more than its queue holds. The broker's send buffer fills at the tail's
    // pace in a few seconds, then its writes stall for `STALL` (10 s) and the tail is closed.
    let publisher = b.client("p").await;
    let body = vec![b'x'; 1000];
    let mut largest = 0;
    let deadline = tokio::time::Instant::now() + 2 * DEADLINE;
    let mut i = 0u32;
    loop {
        for _ in 0..100 {
            let topic = format!("t.{}", i % 10);
            publisher.publish(&topic, &body).await.unwrap();
            i += 1;
        }
        publisher.flush().await.unwrap();
        match tail_row().await {
            None => break,
            Some(row) => largest = largest.max(row.pending_bytes),
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the stalled tail was never closed (largest queue {largest} bytes)"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // At most the tail's queue (1 MiB) and the one message over it.
    assert!(largest <= (1 << 20) + 1100, "the tail held {largest} bytes");
    closed_by_peer(&mut tail, "the stalled tail").await;
    b.stop().await;
}
