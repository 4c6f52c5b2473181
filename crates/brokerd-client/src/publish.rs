//! [`Publish`]: the one way to publish, with its options (reply-to, headers, a message id,
//! acknowledgement, storage by a stream).
//!
//! `client.publish(topic, payload)` returns a builder; awaiting it sends the message. A plain
//! publish into a write buffer with room completes without allocating a future; anything that
//! must wait (a full buffer, an acknowledgement) runs a boxed future.

use crate::error::Error;
use crate::state::{Answered, Inner};
use crate::stream::StoredAck;
use brokerd_proto::Headers;
use brokerd_proto::streams::MSG_ID_HEADER;
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
/// // Stored by a stream, safe to send again with the same id.
/// let stored = client
///     .publish("order.shipped", r#"{"order":"ord-7"}"#)
///     .msg_id("ord-7-shipped")
///     .stored()
///     .await?;
/// println!("{} holds it as seq {}", stored.stream, stored.seq);
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
    /// Sent as the [`MSG_ID_HEADER`] header, whatever the other headers say.
    msg_id: Option<String>,
}

/// A publish that waits for the broker's acknowledgement; see [`Publish::acked`].
#[must_use = "a publish does nothing until it is awaited"]
#[derive(Debug)]
pub struct AckedPublish<'a, P>(Publish<'a, P>);

/// A publish that waits for a stream to store it; see [`Publish::stored`].
#[must_use = "a publish does nothing until it is awaited"]
#[derive(Debug)]
pub struct StoredPublish<'a, P>(Publish<'a, P>);

impl<'a, P: AsRef<[u8]>> Publish<'a, P> {
    pub(crate) fn new(inner: &'a Inner, topic: &'a str, payload: P) -> Publish<'a, P> {
        Publish {
            inner,
            topic,
            payload,
            reply: None,
            headers: None,
            msg_id: None,
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

    /// Sends these headers (replacing any added with [`Publish::header`]; a
    /// [`Publish::msg_id`] is kept).
    pub fn headers(mut self, headers: &'a Headers) -> Publish<'a, P> {
        self.headers = Some(Cow::Borrowed(headers));
        self
    }

    /// Gives the message an id, sent as the `Brokerd-Msg-Id` header ([`MSG_ID_HEADER`],
    /// replacing any such header set otherwise). A stream stores a message id once within its
    /// duplicate window: publishing again with the same id after a timeout or a lost
    /// connection stores nothing new, and [`Publish::stored`] answers with the first copy's
    /// sequence and [`StoredAck::duplicate`] set. Topics no stream captures ignore it.
    pub fn msg_id(mut self, id: impl Into<String>) -> Publish<'a, P> {
        self.msg_id = Some(id.into());
        self
    }

    /// Waits for the broker's acknowledgement: the awaited value is how many subscriptions
    /// the message was queued for (0: nobody is listening), whether or not a stream also stored
    /// it ([`Publish::stored`] tells). A refusal (a permission, a reserved topic) is returned as
    /// [`Error::Server`] instead of being collected by [`crate::Client::take_refusals`].
    pub fn acked(self) -> AckedPublish<'a, P> {
        AckedPublish(self)
    }

    /// Waits for a stream to store the message: the awaited value names the stream and the
    /// message's stream sequence. The broker answers once the message is as durable as the
    /// stream's `fsync` setting promises, in its own time: [`crate::Client::flush`] does not
    /// wait for it, and answers to later requests may come first.
    ///
    /// # Errors
    /// As [`Publish::acked`], and:
    /// - [`Error::NotStored`] when no stream captures the topic (the broker answered with a
    ///   plain acknowledgement; the message was routed live all the same);
    /// - [`Error::Server`] with [`crate::ErrorCode::StoreFailed`] when the stream could not
    ///   store it (a full disk: it may have been routed live), or
    ///   [`crate::ErrorCode::StreamBusy`] when the stream's write queue was full (neither
    ///   stored nor routed: publish it again, best with a [`Publish::msg_id`]).
    pub fn stored(self) -> StoredPublish<'a, P> {
        StoredPublish(self)
    }

    async fn send(self, ack: bool) -> Result<Answered, Error> {
        let with_id;
        let headers = match &self.msg_id {
            None => self.headers.as_deref(),
            Some(id) => {
                with_id = headers_with_id(self.headers.as_deref(), id);
                Some(&with_id)
            }
        };
        self.inner
            .publish_with(self.topic, self.reply, headers, self.payload.as_ref(), ack)
            .await
    }
}

/// `headers` without any [`MSG_ID_HEADER`], then that header with `id`: the broker reads one.
fn headers_with_id(headers: Option<&Headers>, id: &str) -> Headers {
    headers
        .into_iter()
        .flat_map(Headers::iter)
        .filter(|(k, _)| *k != MSG_ID_HEADER)
        .chain(std::iter::once((MSG_ID_HEADER, id)))
        .collect()
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
        if self.reply.is_none() && self.headers.is_none() && self.msg_id.is_none() {
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
            state: State::Waiting(Box::pin(async move {
                self.0.send(true).await.map(|a| a.delivered())
            })),
        }
    }
}

impl<'a, P: AsRef<[u8]> + Send + 'a> IntoFuture for StoredPublish<'a, P> {
    type Output = Result<StoredAck, Error>;
    type IntoFuture = PublishFuture<'a, StoredAck>;

    fn into_future(self) -> PublishFuture<'a, StoredAck> {
        let topic = self.0.topic;
        PublishFuture {
            state: State::Waiting(Box::pin(async move {
                match self.0.send(true).await? {
                    Answered::Stored(s) => Ok(s),
                    other => Err(Error::NotStored {
                        topic: topic.to_string(),
                        delivered: other.delivered(),
                    }),
                }
            })),
        }
    }
}

fn ready<'a, T>(r: Result<T, Error>) -> PublishFuture<'a, T> {
    PublishFuture {
        state: State::Ready(Some(r)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_message_id_replaces_any_other_and_keeps_the_rest_in_order() {
        let none = headers_with_id(None, "m-1");
        assert_eq!(none.iter().collect::<Vec<_>>(), [(MSG_ID_HEADER, "m-1")]);
        let mut h = Headers::new();
        h.insert("trace", "t1")
            .insert(MSG_ID_HEADER, "old")
            .insert("k", "v");
        let merged = headers_with_id(Some(&h), "m-2");
        assert_eq!(
            merged.iter().collect::<Vec<_>>(),
            [("trace", "t1"), ("k", "v"), (MSG_ID_HEADER, "m-2")]
        );
    }
}
