//! The web console in a real browser: Debian's headless Chromium, driven through `chromedriver`
//! with the W3C WebDriver protocol spoken over plain HTTP by a small client below. The page
//! loads from a real broker, its rate chart receives samples from `/varz`, its tables show the
//! connections and closes the test made, and a message published during the test appears in
//! the tail box, payloads written as text (a `<script>` stays text) or as hex.
//!
//! Without `/usr/bin/chromedriver` the test says so and passes, unless
//! `BROKERD_REQUIRE_BROWSER=1` (set by `.ci/run`, which installs the browser). With
//! `BROKERD_CONSOLE_SCREENSHOT=PATH` it lets light traffic run a while longer and writes a
//! screenshot of the page there (`docs/console.png` is made this way).
//!
//! `chromedriver` runs in a process group of its own with a profile directory the test owns;
//! a guard kills the group (the browser included) and removes the directory on every exit.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use brokerd_client::Client;
use brokerd_tests::{DEADLINE, Rng, TestBroker};
use serde_json::{Value, json};
use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;
use tokio::time::Instant;

const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
const CHROMIUM: &str = "/usr/bin/chromium";

/// The key under which WebDriver returns an element reference.
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

/// Pause between polls of the page.
const PAGE_POLL: Duration = Duration::from_millis(100);

/// A payload that would run if the page parsed payloads as HTML.
const HOSTILE: &str = r#"{"note":"<script>window.brokerdInjected=1</script><img src=x onerror=window.brokerdInjected=2><b>bold</b>"}"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn console_shows_rates_connections_closes_and_a_live_tail() {
    if !Path::new(CHROMEDRIVER).exists() {
        assert!(
            std::env::var("BROKERD_REQUIRE_BROWSER").as_deref() != Ok("1"),
            "BROKERD_REQUIRE_BROWSER=1 but {CHROMEDRIVER} is missing: install chromium and \
             chromium-driver"
        );
        eprintln!(
            "skipped: {CHROMEDRIVER} is missing (apt-get install chromium chromium-driver); \
             set BROKERD_REQUIRE_BROWSER=1 to fail instead"
        );
        return;
    }
    let screenshot_to = std::env::var_os("BROKERD_CONSOLE_SCREENSHOT").map(PathBuf::from);
    let started = Instant::now();

    let b = TestBroker::with_config(|c| c.http = Some("127.0.0.1:0".parse().unwrap())).await;
    let http = b.http_addr.expect("the monitoring endpoints listen");

    // A connection that has come and gone, for the closes table.
    let leaver = b.client("console-test-leaver").await;
    leaver.close().await.unwrap();
    let traffic = Traffic::start(&b).await;

    let browser = Browser::launch().await;
    browser.navigate(&format!("http://{http}/")).await;
    let title = browser.script("return document.title", json!([])).await;
    assert_eq!(title, "brokerd console");

    // The chart: at least two samples from /varz, and one of them saw the traffic.
    browser
        .wait_for(
            "two chart samples",
            "return window.brokerdConsole.samples()",
            |v| v.as_u64().unwrap_or(0) >= 2,
        )
        .await;
    browser
        .wait_for(
            "a sample with messages published",
            "return window.brokerdConsole.latest().in",
            |v| v.as_f64().unwrap_or(0.0) > 0.0,
        )
        .await;

    let painted = browser
        .script(
            "const c = document.getElementById('rate-chart'); \
             const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data; \
             let n = 0; for (let i = 3; i < d.length; i += 4) if (d[i]) n++; return n",
            json!([]),
        )
        .await;
    assert!(
        painted.as_u64().unwrap() > 1000,
        "the chart is blank: {painted}"
    );

    // The tables: the subscriber the test connected, the client that closed and why.
    let text = |id: &str| format!("return document.getElementById('{id}').textContent");
    browser
        .wait_for(
            "the subscriber in #connections",
            &text("connections"),
            |v| v.as_str().unwrap_or("").contains("billing"),
        )
        .await;
    let closes = browser
        .wait_for("the leaver in #closes", &text("closes"), |v| {
            v.as_str().unwrap_or("").contains("console-test-leaver")
        })
        .await;
    assert!(
        closes.as_str().unwrap().contains("client-closed"),
        "{closes}"
    );
    browser
        .wait_for("a busiest topic", &text("topics"), |v| {
            v.as_str().unwrap_or("").contains("metrics.")
        })
        .await;

    // The tail: type a filter, start it, publish until a message shows.
    let filter = browser.find("#tail-filter").await;
    browser.type_into(&filter, "console.test.>").await;
    browser.click(&browser.find("#tail-start").await).await;
    browser
        .wait_for(
            "the tail to start",
            "return window.brokerdConsole.tailing()",
            |v| v == &json!(true),
        )
        .await;
    let publisher = b.client("console-test-publisher").await;
    let payloads = "return Array.from(document.querySelectorAll('#tail-log .payload'), \
                    e => [e.textContent, e.className])";
    let shown = |rows: &Value, payload: &str| {
        rows.as_array()
            .unwrap()
            .iter()
            .find(|r| r[0] == payload)
            .cloned()
    };
    let end = Instant::now() + DEADLINE;
    loop {
        publisher
            .publish("console.test.hostile", HOSTILE)
            .await
            .unwrap();
        publisher.flush().await.unwrap();
        let rows = browser.script(payloads, json!([])).await;
        if shown(&rows, HOSTILE).is_some() {
            break;
        }
        assert!(
            Instant::now() < end,
            "timed out waiting for a published message in #tail-log: {rows}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }

    // Shown as text: no element was made from it and nothing in it ran.
    let parsed = browser
        .script(
            "return [document.querySelectorAll('#tail-log script, #tail-log img, #tail-log b')\
             .length, window.brokerdInjected === undefined]",
            json!([]),
        )
        .await;
    assert_eq!(parsed, json!([0, true]), "the payload was parsed as HTML");
    let first = browser
        .script(
            "const li = document.querySelector('#tail-log li'); \
             return [li.querySelector('.topic').textContent, li.querySelector('.seq').textContent]",
            json!([]),
        )
        .await;
    assert_eq!(first[0], "console.test.hostile", "{first}");
    assert!(first[1].as_str().unwrap().starts_with('#'), "{first}");

    // A payload that is not UTF-8 is shown as hex.
    publisher
        .publish("console.test.binary", [0xffu8, 0x00, 0x41])
        .await
        .unwrap();
    publisher.flush().await.unwrap();
    let rows = browser
        .wait_for("the binary payload as hex", payloads, |rows| {
            shown(rows, "ff0041").is_some()
        })
        .await;
    assert_eq!(shown(&rows, "ff0041").unwrap()[1], "payload hex", "{rows}");

    if screenshot_to.is_some() {
        // A fuller chart and a tail that shows the traffic, for the documentation.
        browser.click(&browser.find("#tail-start").await).await;
        browser
            .script(
                "document.getElementById('tail-log').replaceChildren(); \
                 document.getElementById('tail-filter').value = ''",
                json!([]),
            )
            .await;
        browser.type_into(&filter, "*.created").await;
        browser.click(&browser.find("#tail-start").await).await;
        tokio::time::sleep(Duration::from_secs(25)).await;
        // The whole page in one picture.
        browser
            .session_command(
                "POST",
                "/window/rect",
                Some(&json!({ "width": 1280, "height": 1300 })),
            )
            .await;
        browser.script("window.scrollTo(0, 0)", json!([])).await;
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    let png = browser.screenshot().await;
    assert!(
        png.starts_with(b"\x89PNG\r\n\x1a\n"),
        "the screenshot is not a PNG"
    );
    if let Some(path) = &screenshot_to {
        std::fs::write(path, &png)
            .unwrap_or_else(|e| panic!("cannot write the screenshot to {}: {e}", path.display()));
        eprintln!("screenshot written to {}", path.display());
    }

    // Stopping the tail ends its connection on the broker.
    browser.click(&browser.find("#tail-start").await).await;
    brokerd_tests::wait_until("the tail's connection to close", || {
        b.broker
            .clients()
            .iter()
            .all(|c| c.name != "web-console-tail")
    })
    .await;

    browser.quit().await;
    traffic.stop().await;
    publisher.close().await.unwrap();
    b.stop().await;
    eprintln!("console test took {:?}", started.elapsed());
}

/// Light, steady traffic like a small deployment's: a service publishing a few JSON events a
/// second, an agent publishing metrics a hundred times a second, and subscribers that read
/// them.
struct Traffic {
    tasks: Vec<JoinHandle<()>>,
    clients: Vec<Client>,
}

impl Traffic {
    async fn start(b: &TestBroker) -> Traffic {
        let mut tasks = Vec::new();
        let mut clients = Vec::new();
        for (name, filter) in [
            ("billing", "orders.>"),
            ("audit-log", ">"),
            ("dashboard", "metrics.*"),
            ("welcome-mailer", "user.created"),
        ] {
            let c = b.client(name).await;
            let mut sub = c.subscribe(filter).await.unwrap();
            tasks.push(tokio::spawn(
                async move { while sub.next().await.is_some() {} },
            ));
            clients.push(c);
        }
        let checkout = b.client("checkout-service").await;
        tasks.push(tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(250));
            for n in 0u64.. {
                tick.tick().await;
                let (topic, payload) = if n % 3 == 2 {
                    (
                        "user.created",
                        format!(r#"{{"user_id":{},"plan":"trial"}}"#, 5_000 + n),
                    )
                } else {
                    (
                        "orders.created",
                        format!(
                            r#"{{"order_id":"ord-{}","customer":"cus-{}","total":{}.{:02},"currency":"EUR"}}"#,
                            10_000 + n,
                            100 + n % 37,
                            10 + n * 7 % 90,
                            n * 13 % 100
                        ),
                    )
                };
                if checkout.publish(topic, payload).await.is_err() {
                    return;
                }
            }
        }));
        // Busier, so that the busiest-topic sample (one publish in 64 per connection) sees
        // it; topics at random, since a fixed cycle would alias with the sampling.
        let agent = b.client("metrics-agent").await;
        tasks.push(tokio::spawn(async move {
            let mut rng = Rng::new(13);
            let mut tick = tokio::time::interval(Duration::from_millis(10));
            loop {
                tick.tick().await;
                let host = 1 + rng.below(3);
                let (topic, value) = match rng.below(3) {
                    0 => ("metrics.mem_usage", 40 + rng.below(30)),
                    _ => ("metrics.cpu_usage", 20 + rng.below(60)),
                };
                let payload = format!(r#"{{"host":"web-{host}","value":{value}}}"#);
                if agent.publish(topic, payload).await.is_err() {
                    return;
                }
            }
        }));
        Traffic { tasks, clients }
    }

    async fn stop(self) {
        for t in &self.tasks {
            t.abort();
        }
        for c in self.clients {
            c.close().await.unwrap();
        }
    }
}

/// A WebDriver session with `chromedriver` and the Chromium it started. Dropping it kills
/// both (their whole process group) and removes the browser profile.
struct Browser {
    driver: Child,
    port: u16,
    session: String,
    profile: PathBuf,
}

impl Browser {
    /// Starts `chromedriver` on a free loopback port and opens a headless session.
    async fn launch() -> Browser {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free loopback port")
            .port();
        let profile = std::env::temp_dir().join(format!(
            "brokerd-console-test-{}-{port}",
            std::process::id()
        ));
        let driver = Command::new(CHROMEDRIVER)
            .arg(format!("--port={port}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            // A group of its own, so that the guard can kill the browser it starts with it.
            .process_group(0)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {CHROMEDRIVER}: {e}"));
        let mut browser = Browser {
            driver,
            port,
            session: String::new(),
            profile,
        };
        let end = Instant::now() + DEADLINE;
        loop {
            if let Ok((200, v)) = browser.request("GET", "/status", None).await
                && v["value"]["ready"] == json!(true)
            {
                break;
            }
            assert!(Instant::now() < end, "chromedriver did not become ready");
            tokio::time::sleep(PAGE_POLL).await;
        }
        let capabilities = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": CHROMIUM,
                "args": [
                    "--headless=new", "--no-sandbox", "--disable-gpu",
                    "--disable-dev-shm-usage", "--window-size=1280,900",
                    format!("--user-data-dir={}", browser.profile.display()),
                ],
            },
        }}});
        let v = browser
            .command("POST", "/session", Some(&capabilities))
            .await;
        browser.session = v["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no session id in {v}"))
            .to_string();
        browser
    }

    async fn navigate(&self, url: &str) {
        self.session_command("POST", "/url", Some(&json!({ "url": url })))
            .await;
    }

    /// Runs `script` in the page and returns its value.
    async fn script(&self, script: &str, args: Value) -> Value {
        self.session_command(
            "POST",
            "/execute/sync",
            Some(&json!({ "script": script, "args": args })),
        )
        .await
    }

    /// Runs `script` until its value passes `ok`, failing the test after [`DEADLINE`]; returns
    /// the value that passed.
    async fn wait_for(&self, what: &str, script: &str, ok: impl Fn(&Value) -> bool) -> Value {
        let end = Instant::now() + DEADLINE;
        loop {
            let v = self.script(script, json!([])).await;
            if ok(&v) {
                return v;
            }
            assert!(
                Instant::now() < end,
                "timed out waiting for {what}; last value {v}"
            );
            tokio::time::sleep(PAGE_POLL).await;
        }
    }

    /// The element `css` selects, as a WebDriver element id.
    async fn find(&self, css: &str) -> String {
        let v = self
            .session_command(
                "POST",
                "/element",
                Some(&json!({ "using": "css selector", "value": css })),
            )
            .await;
        v[ELEMENT]
            .as_str()
            .unwrap_or_else(|| panic!("no element for {css}: {v}"))
            .to_string()
    }

    async fn type_into(&self, element: &str, text: &str) {
        self.session_command(
            "POST",
            &format!("/element/{element}/value"),
            Some(&json!({ "text": text })),
        )
        .await;
    }

    async fn click(&self, element: &str) {
        self.session_command(
            "POST",
            &format!("/element/{element}/click"),
            Some(&json!({})),
        )
        .await;
    }

    /// The page as PNG bytes.
    async fn screenshot(&self) -> Vec<u8> {
        let v = self.session_command("GET", "/screenshot", None).await;
        base64_decode(v.as_str().expect("a base64 string")).expect("valid base64")
    }

    /// Ends the session: the browser closes. The guard still kills what is left.
    async fn quit(&self) {
        self.command("DELETE", &format!("/session/{}", self.session), None)
            .await;
    }

    async fn session_command(&self, method: &str, path: &str, body: Option<&Value>) -> Value {
        let path = format!("/session/{}{path}", self.session);
        self.command(method, &path, body).await
    }

    /// A WebDriver command that must succeed; returns its `value`.
    async fn command(&self, method: &str, path: &str, body: Option<&Value>) -> Value {
        match self.request(method, path, body).await {
            Ok((200, mut v)) => v["value"].take(),
            Ok((status, v)) => panic!("WebDriver {method} {path}: HTTP {status}: {v}"),
            Err(e) => panic!("WebDriver {method} {path}: {e}"),
        }
    }

    /// One HTTP/1.1 exchange with `chromedriver` on a connection of its own.
    async fn request(
        &self,
        method: &str,
        path: &str,
        body: Option<&Value>,
    ) -> Result<(u16, Value), String> {
        let addr = SocketAddr::from(([127, 0, 0, 1], self.port));
        // Starting the browser takes the longest: a few seconds on a slow machine.
        tokio::time::timeout(
            Duration::from_secs(60),
            http_exchange(addr, method, path, body),
        )
        .await
        .map_err(|_| "no answer within 60 s".to_string())?
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // The negative pid names the process group: chromedriver and every browser process.
        let group = format!("-{}", self.driver.id());
        let signal = |args: &[&str]| {
            Command::new("kill")
                .args(args)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        };
        signal(&["-KILL", "--", &group]);
        let _ = self.driver.kill();
        let _ = self.driver.wait();
        // The browser's processes are not our children: give them a moment to be gone
        // before their profile directory is removed.
        let end = std::time::Instant::now() + Duration::from_secs(5);
        while signal(&["-0", "--", &group]) && std::time::Instant::now() < end {
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = std::fs::remove_dir_all(&self.profile);
    }
}

async fn http_exchange(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<&Value>,
) -> Result<(u16, Value), String> {
    let mut stream = TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect {addr}: {e}"))?;
    let body = body.map(Value::to_string).unwrap_or_default();
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\
         Content-Type: application/json; charset=utf-8\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    stream
        .write_all(request.as_bytes())
        .await
        .map_err(|e| format!("write: {e}"))?;
    // chromedriver announces `Connection: close` but leaves the connection open, so the body
    // ends where its length says, not at end of stream.
    let mut response = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    let (split, head, length, chunked) = loop {
        if let Some(split) = response.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&response[..split]).to_ascii_lowercase();
            let header = |name: &str| {
                head.lines()
                    .filter_map(|l| l.split_once(':'))
                    .find(|(k, _)| k.trim() == name)
                    .map(|(_, v)| v.trim().to_string())
            };
            let length = header("content-length").and_then(|v| v.parse::<usize>().ok());
            let chunked = header("transfer-encoding").is_some_and(|v| v.contains("chunked"));
            break (split, head, length, chunked);
        }
        if read_more(&mut stream, &mut buf, &mut response).await? == 0 {
            return Err("connection closed before the end of the headers".into());
        }
    };
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("bad status line in {head:?}"))?;
    let body_start = split + 4;
    let payload = loop {
        let body = &response[body_start..];
        match (length, chunked) {
            (Some(n), _) if body.len() >= n => break body[..n].to_vec(),
            (None, true) if body.ends_with(b"0\r\n\r\n") => {
                if let Some(data) = dechunk(body) {
                    break data;
                }
            }
            _ => {}
        }
        if read_more(&mut stream, &mut buf, &mut response).await? == 0 {
            if length.is_none() && !chunked {
                break response[body_start..].to_vec();
            }
            return Err("connection closed before the end of the body".into());
        }
    };
    let value = if payload.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&payload).map_err(|e| format!("body is not JSON: {e}"))?
    };
    Ok((status, value))
}

/// Reads what has arrived onto `response`; 0 at end of stream.
async fn read_more(
    stream: &mut TcpStream,
    buf: &mut [u8],
    response: &mut Vec<u8>,
) -> Result<usize, String> {
    let n = stream.read(buf).await.map_err(|e| format!("read: {e}"))?;
    response.extend_from_slice(&buf[..n]);
    Ok(n)
}

/// A chunked body's data.
fn dechunk(mut body: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let line_end = body.windows(2).position(|w| w == b"\r\n")?;
        let size = std::str::from_utf8(&body[..line_end]).ok()?;
        let size = usize::from_str_radix(size.split(';').next()?.trim(), 16).ok()?;
        body = &body[line_end + 2..];
        if size == 0 {
            return Some(out);
        }
        out.extend_from_slice(body.get(..size)?);
        body = body.get(size + 2..)?;
    }
}

/// Standard base64 with padding, as WebDriver sends screenshots; `None` for anything else.
fn base64_decode(text: &str) -> Option<Vec<u8>> {
    let value = |c: u8| -> Option<u32> {
        Some(u32::from(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        }))
    };
    let bytes: Vec<u8> = text.bytes().filter(|c| !c.is_ascii_whitespace()).collect();
    if !bytes.len().is_multiple_of(4) {
        return None;
    }
    let mut out = Vec::with_capacity(bytes.len() / 4 * 3);
    for (i, chunk) in bytes.chunks(4).enumerate() {
        let last = i == bytes.len() / 4 - 1;
        let pad = chunk.iter().rev().take_while(|&&c| c == b'=').count();
        if pad > 2 || (pad > 0 && !last) {
            return None;
        }
        let mut n = 0u32;
        for (j, &c) in chunk[..4 - pad].iter().enumerate() {
            n |= value(c)? << (18 - 6 * j);
        }
        out.extend_from_slice(&n.to_be_bytes()[1..4 - pad]);
    }
    Some(out)
}

#[test]
fn base64_decodes_padded_text() {
    assert_eq!(base64_decode("").as_deref(), Some(&b""[..]));
    assert_eq!(base64_decode("TWFu").as_deref(), Some(&b"Man"[..]));
    assert_eq!(base64_decode("TWE=").as_deref(), Some(&b"Ma"[..]));
    assert_eq!(base64_decode("TQ==").as_deref(), Some(&b"M"[..]));
    assert_eq!(
        base64_decode("iVBORw0KGgo=").as_deref(),
        Some(&b"\x89PNG\r\n\x1a\n"[..])
    );
    assert_eq!(base64_decode("TQ="), None);
    assert_eq!(base64_decode("T=Q="), None);
    assert_eq!(base64_decode("TQ==TWFu"), None);
}

#[test]
fn chunked_bodies_are_joined() {
    assert_eq!(
        dechunk(b"4\r\nWiki\r\n5;x=y\r\npedia\r\n0\r\n\r\n").as_deref(),
        Some(&b"Wikipedia"[..])
    );
    assert_eq!(dechunk(b"4\r\nWi"), None);
}
