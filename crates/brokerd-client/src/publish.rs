//! [`Publish`]: the one way to publish, with its options (reply-to, headers, acknowledgement).
//!
//! `client.publish(topic, payload)` returns a builder; awaiting it sends the message. A plain
//! publish into a write buffer with room completes without allocating a future; anything that
//! must wait (a full buffer, an acknowledgement) runs a boxed future.

use crate::error::Error;
use crate::state::Inner;
use brokerd_proto::Headers;
use std::borrow::Cow;
use std::future::{Future, IntoFuture};
use std::pin::Pin;
use std::task::{Context, Poll};

/// A message about to be published; made by [`crate::Client::publish`], sent when awaited.
///
/// ```no_run
/// # async fn demo(client: brokerd_client::Client) -> Result<(), brokerd_client::Error> {
/// // Fire and forget: returns once the message is buffered for the socket.
/// client.publish("user.created", r#"{"id":1}"#).await?;
/// // With a header and a reply-to topic.
/// client
///     .publish("order.created", r#"{"order":"ord-7"}"#)
///     .header("trace-id", "4bf92f35")
///     .reply_to("order.replies")
///     .await?;
/// // Acknowledged: the broker says how many subscriptions it reached.
/// let n = client.publish("payment.completed", "ord-7").acked().await?;
/// println!("reached {n} subscribers");
/// # Ok(()) }
/// ```
#[must_use = "a publish does nothing until it is awaited"]
#[derive(Debug)]
pub struct Publish<'a, P> {
    inner: &'a Inner,
    topic: &'a str,
    payload: P,
    reply: Option<&'a str>,
    headers: Option<Cow<'a, Headers>>,
}

/// A publish that waits for the broker's acknowledgement; see [`Publish::acked`].
#[must_use = "a publish does nothing until it is awaited"]
#[derive(Debug)]
pub struct AckedPublish<'a, P>(Publish<'a, P>);

impl<'a, P: AsRef<[u8]>> Publish<'a, P> {
    pub(crate) fn new(inner: &'a Inner, topic: &'a str, payload: P) -> Publish<'a, P> {
        Publish {
            inner,
            topic,
            payload,
            reply: None,
            headers: None,
        }
    }

    /// Asks whoever receives the message to answer on `topic` (see also
    /// [`crate::Client::request`], which makes the reply-to topic and waits for the answer).
    pub fn reply_to(mut self, topic: &'a str) -> Publish<'a, P> {
        self.reply = Some(topic);
        self
    }

    /// Adds a header; keys may repeat, and order is kept.
    pub fn header(mut self, key: impl Into<String>, value: impl Into<String>) -> Publish<'a, P> {
        self.headers
            .get_or_insert_with(|| Cow::Owned(Headers::new()))
            .to_mut()
            .insert(key, value);
        self
    }

    /// Sends these headers (replacing any added with [`Publish::header`]).
    pub fn headers(mut self, headers: &'a Headers) -> Publish<'a, P> {
        self.headers = Some(Cow::Borrowed(headers));
        self
    }

    /// Waits for the broker's acknowledgement: the awaited value is how many subscriptions
    /// the message was queued for (0: nobody is listening). A refusal (a permission, a
    /// reserved topic) is returned as [`Error::Server`] instead of being collected by
    /// [`crate::Client::take_refusals`].
    pub fn acked(self) -> AckedPublish<'a, P> {
        AckedPublish(self)
    }

    async fn send(self, ack: bool) -> Result<u32, Error> {
        self.inner
            .publish_with(
                self.topic,
                self.reply,
                self.headers.as_deref(),
                self.payload.as_ref(),
                ack,
            )
            .await
    }
}

/// The future of a [`Publish`]: done at once when the message fitted in the write buffer.
pub struct PublishFuture<'a, T> {
    state: State<'a, T>,
}

enum State<'a, T> {
    Ready(Option<Result<T, Error>>),
    Waiting(Pin<Box<dyn Future<Output = Result<T, Error>> + Send + 'a>>),
}

// Nothing in it is pinned in place: the waiting future is boxed, the ready value only moved out.
impl<T> Unpin for PublishFuture<'_, T> {}

impl<T> Future for PublishFuture<'_, T> {
    type Output = Result<T, Error>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<T, Error>> {
        match &mut self.get_mut().state {
            // Polling again after completion is a caller's bug; it gets a clear error.
            State::Ready(r) => Poll::Ready(
                r.take()
                    .unwrap_or(Err(Error::Unexpected("publish polled after completion"))),
            ),
            State::Waiting(f) => f.as_mut().poll(cx),
        }
    }
}

impl<T> std::fmt::Debug for PublishFuture<'_, T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = match self.state {
            State::Ready(_) => "ready",
            State::Waiting(_) => "waiting",
        };
        f.debug_struct("PublishFuture")
            .field("state", &state)
            .finish()
    }
}

impl<'a, P: AsRef<[u8]> + Send + 'a> IntoFuture for Publish<'a, P> {
    type Output = Result<(), Error>;
    type IntoFuture = PublishFuture<'a, ()>;

    fn into_future(self) -> PublishFuture<'a, ()> {
        if self.reply.is_none() && self.headers.is_none() {
            match self.inner.try_publish(self.topic, self.payload.as_ref()) {
                Ok(true) => return ready(Ok(())),
                Err(e) => return ready(Err(e)),
                // The buffer is full or the connection is down: wait, or buffer, below.
                Ok(false) => {}
            }
        }
        PublishFuture {
            state: State::Waiting(Box::pin(async move { self.send(false).await.map(|_| ()) })),
        }
    }
}

impl<'a, P: AsRef<[u8]> + Send + 'a> IntoFuture for AckedPublish<'a, P> {
    type Output = Result<u32, Error>;
    type IntoFuture = PublishFuture<'a, u32>;

    fn into_future(self) -> PublishFuture<'a, u32> {
        PublishFuture {
            state: State::Waiting(Box::pin(self.0.send(true))),
        }
    }
}

fn ready<'a, T>(r: Result<T, Error>) -> PublishFuture<'a, T> {
    PublishFuture {
        state: State::Ready(Some(r)),
    }
}
