//! `/tail?filter=F`: the messages matching a filter, as server-sent events, for the web
//! console's tail box.
//!
//! Each tail is a connection of the broker's own (named `web-console-tail`, its peer the
//! browser's address, visible in `/connz` like any other): a subscription on `F` whose queue
//! the event stream reads. At most [`RATE`] messages a second are sent, with a burst of as
//! many; the rest are counted and reported with the next event (`skipped`), so a busy topic
//! cannot flood the browser. The queue is read as fast as it arrives; when the browser stops
//! reading, the queue holds at most [`QUEUE`] and the connection is closed once its writes have
//! stalled for [`crate::http::STALL`]. Payloads are sent as text when UTF-8, else as hex, cut to
//! [`MAX_SHOWN`] bytes. At most [`MAX_TAILS`] tails run at once. Only an admin reaches this
//! endpoint when authentication is configured (`http.rs`).

use crate::server::Shared;
use axum::extract::{ConnectInfo, Query, State};
use axum::http::StatusCode;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use brokerd_core::{Client, CloseReason, Item, OutboxLimits, Take};
use brokerd_proto::{Body, OverflowPolicy};
use futures_core::Stream;
use serde::Serialize;
use std::collections::VecDeque;
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tracing::debug;

/// Messages sent per second at most (and the burst).
pub(crate) const RATE: u32 = 20;

/// Payload bytes shown per message; the event says how long the payload was.
pub(crate) const MAX_SHOWN: usize = 1024;

/// Tails running at once, broker-wide.
pub(crate) const MAX_TAILS: usize = 8;

/// A tail's queue: what arrives between two reads of a browser that keeps up is far less than
/// this, and a browser that stops reading holds at most this much (its messages are dropped
/// and counted as skipped) until the monitoring listener's write stall closes it
/// (`http.rs`, [`crate::http::STALL`]).
const QUEUE: OutboxLimits = OutboxLimits {
    max_msgs: 1024,
    max_bytes: 1 << 20,
    press: false,
};

/// The name a tail's connection shows.
pub(crate) const TAIL_NAME: &str = "web-console-tail";

/// `/tail` query parameters.
#[derive(Debug, Default, serde::Deserialize)]
pub(crate) struct TailQuery {
    filter: Option<String>,
}

/// One event's data.
#[derive(Serialize)]
struct Shown<'a> {
    topic: &'a str,
    seq: u64,
    /// The payload's length in bytes.
    size: usize,
    /// `utf-8` or `hex`.
    encoding: &'static str,
    /// At most [`MAX_SHOWN`] bytes of it.
    payload: String,
    truncated: bool,
    /// Messages not sent since the previous event (the rate limit, or drops).
    skipped: u64,
}

pub(crate) async fn tail(
    State(shared): State<Arc<Shared>>,
    ConnectInfo(crate::http::Peer(peer, _)): ConnectInfo<crate::http::Peer>,
    Query(q): Query<TailQuery>,
) -> Response {
    let Some(filter) = q.filter.filter(|f| !f.is_empty()) else {
        return (
            StatusCode::BAD_REQUEST,
            "give a filter: /tail?filter=orders.>\n",
        )
            .into_response();
    };
    let running = &shared.monitor.tails;
    if running.fetch_add(1, Ordering::AcqRel) >= MAX_TAILS {
        running.fetch_sub(1, Ordering::AcqRel);
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("{MAX_TAILS} tails are running already\n"),
        )
            .into_response();
    }
    let client = shared.broker.connect_with_queue(
        TAIL_NAME.into(),
        peer.to_string(),
        OverflowPolicy::DropNew,
        QUEUE,
    );
    let stream = TailStream {
        shared: shared.clone(),
        client,
        batch: VecDeque::new(),
        tokens: RATE as f64,
        refilled: Instant::now(),
        skipped: 0,
        done: false,
    };
    if let Err(e) = shared.broker.subscribe(&stream.client, 1, &filter) {
        // Dropping the stream disconnects its connection.
        return (StatusCode::BAD_REQUEST, format!("{e}\n")).into_response();
    }
    Sse::new(stream)
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
        .into_response()
}

/// The event stream: the tail connection's queue, rate-limited.
struct TailStream {
    shared: Arc<Shared>,
    client: Arc<Client>,
    batch: VecDeque<Item>,
    /// Token bucket: messages that may be sent now, refilled at [`RATE`] a second.
    tokens: f64,
    refilled: Instant,
    skipped: u64,
    done: bool,
}

impl TailStream {
    /// Whether one more message may be sent now.
    fn allow(&mut self) -> bool {
        let now = Instant::now();
        let refill = now.duration_since(self.refilled).as_secs_f64() * f64::from(RATE);
        self.tokens = (self.tokens + refill).min(f64::from(RATE));
        self.refilled = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    fn event(&mut self, seq: u64, raw: bytes::Bytes) -> Option<Event> {
        let body = Body::parse(raw).ok()?;
        let payload = body.payload();
        let shown = &payload[..payload.len().min(MAX_SHOWN)];
        let (encoding, text) = match std::str::from_utf8(shown) {
            Ok(t) => ("utf-8", t.to_string()),
            Err(e) if e.error_len().is_none() && e.valid_up_to() > 0 => {
                // Cut in the middle of a character: show the whole characters.
                (
                    "utf-8",
                    String::from_utf8_lossy(&shown[..e.valid_up_to()]).into_owned(),
                )
            }
            Err(_) => ("hex", shown.iter().map(|b| format!("{b:02x}")).collect()),
        };
        let data = Shown {
            topic: body.topic(),
            seq,
            size: payload.len(),
            encoding,
            payload: text,
            truncated: payload.len() > MAX_SHOWN,
            skipped: std::mem::take(&mut self.skipped),
        };
        Event::default().event("message").json_data(&data).ok()
    }
}

impl Stream for TailStream {
    type Item = Result<Event, Infallible>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        loop {
            if this.done {
                return Poll::Ready(None);
            }
            if this.batch.is_empty() {
                match this.client.outbox.poll_take(cx, &mut this.batch) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(Take::Closed(_)) => {
                        this.done = true;
                        return Poll::Ready(None);
                    }
                    Poll::Ready(Take::Items) => {}
                }
                // Everything taken is released at once: its room goes back to the queue, and
                // what is held back by the rate limit is dropped, not queued.
                let (mut msgs, mut bytes, mut controls, mut control_bytes) = (0, 0, 0, 0);
                for item in &this.batch {
                    match item {
                        Item::Msg { body, .. } => {
                            msgs += 1;
                            bytes += brokerd_proto::MSG_HEADER_LEN + body.len();
                        }
                        Item::Frame(f) => {
                            controls += 1;
                            control_bytes += f.len();
                        }
                        Item::Lost { .. } => {}
                    }
                }
                this.client
                    .outbox
                    .release(msgs, bytes, controls, control_bytes);
            }
            while let Some(item) = this.batch.pop_front() {
                match item {
                    Item::Msg { seq, body, .. } => {
                        if !this.allow() {
                            this.skipped += 1;
                            continue;
                        }
                        if let Some(event) = this.event(seq, body) {
                            return Poll::Ready(Some(Ok(event)));
                        }
                    }
                    Item::Lost { missed, .. } => this.skipped += missed,
                    Item::Frame(_) => {}
                }
            }
        }
    }
}

impl Drop for TailStream {
    /// The browser went away (or the broker closed the tail): the tail's connection ends like
    /// any other, in the counters, the closed list and the `disconnect` event.
    fn drop(&mut self) {
        let shared = &self.shared;
        let reason = CloseReason::ClientClosed;
        let left = self.client.outbox.stats();
        shared.broker.disconnect(&self.client, &reason);
        debug!(client = TAIL_NAME, peer = %self.client.peer, id = self.client.id, "tail closed");
        shared.monitor.closed(shared, &self.client, &reason, &left);
        shared.monitor.tails.fetch_sub(1, Ordering::AcqRel);
    }
}
