//! A subscription's stream of messages, and the message type (with the acknowledgements of a
//! durable consumer's messages, sent by [`crate::consumer`]).

use crate::state::Inner;
use brokerd_proto::{AckKind, Body, Headers};
use bytes::Bytes;
use futures_core::Stream;
use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};

/// One delivered message.
#[derive(Clone)]
pub struct Message {
    pub(crate) sid: u32,
    pub(crate) seq: u64,
    pub(crate) body: Body,
    /// The connection it arrived on, for [`Message::respond`] and the acknowledgements; only
    /// kept when the message has a reply-to or came from a durable consumer, so a plain
    /// delivery costs no reference count.
    pub(crate) client: Option<Arc<Inner>>,
    /// It was delivered to a replay or consumer subscription: `seq` is its stream sequence.
    pub(crate) stream: bool,
    /// For a durable consumer's message: the generation of the connection it arrived on
    /// ([`Inner::epoch`]), the only one its acknowledgement may go to.
    pub(crate) ack_epoch: Option<u64>,
}

#[cfg(test)]
impl Message {
    /// A message on a client that is not connected anywhere, for unit tests.
    pub(crate) fn for_test(seq: u64) -> Message {
        Message {
            sid: 1,
            seq,
            body: Body::parse(Body::encode("t", None, None, b"")).expect("valid body"),
            client: Some(crate::state::Inner::for_test()),
            stream: false,
            ack_epoch: None,
        }
    }
}

impl PartialEq for Message {
    fn eq(&self, other: &Message) -> bool {
        self.sid == other.sid && self.seq == other.seq && self.body == other.body
    }
}

impl Eq for Message {}

impl Message {
    /// The topic it was published to.
    pub fn topic(&self) -> &str {
        self.body.topic()
    }

    /// The payload, sharing the buffer the connection read it into (no copy). A message or
    /// payload kept long keeps that buffer (up to 256 KiB) allocated; copy the bytes
    /// (`payload().to_vec()`) to keep only them.
    pub fn payload(&self) -> Bytes {
        self.body.payload()
    }

    /// The reply-to topic, if the publisher set one.
    pub fn reply(&self) -> Option<&str> {
        self.body.reply()
    }

    /// Whether the publisher sent a header list (possibly empty): tells "no headers" from
    /// "an empty list", which [`Message::headers`] cannot.
    pub fn has_headers(&self) -> bool {
        self.body.has_headers()
    }

    /// The headers, in the order published.
    pub fn headers(&self) -> Headers {
        self.body.headers_owned()
    }

    /// The subscription id it was delivered for.
    pub fn sid(&self) -> u32 {
        self.sid
    }

    /// Its sequence number. For a live subscription: within the subscription, from 1, where a
    /// gap means the broker dropped messages (each counted in
    /// [`crate::Subscription::missed`]); after a reconnect the subscription is new on the
    /// server and counts from 1 again ([`crate::Subscription::resubscribed`]).
    ///
    /// For a replay subscription ([`crate::Client::subscribe_stream`]) and a durable consumer's
    /// ([`crate::Client::consume`]): the message's stream sequence, the same for every subscriber
    /// and across reconnects ([`Message::stream_seq`]).
    /// Gaps there are normal (messages of the stream the filter does not match, or that
    /// retention removed) and are not losses: the broker never drops a stored message for a
    /// replay subscription.
    pub fn seq(&self) -> u64 {
        self.seq
    }

    /// The message's stream sequence, for a message delivered to a replay subscription
    /// ([`crate::Client::subscribe_stream`]) or by a durable consumer
    /// ([`crate::Client::consume`]); `None` for a live subscription's. An application that
    /// records the last one it processed can resume from the next one
    /// ([`crate::StartPosition::FromSeq`]), even in another process; a consumer's member can
    /// tell a message delivered again by it.
    pub fn stream_seq(&self) -> Option<u64> {
        self.stream.then_some(self.seq)
    }

    /// Whether the message came from a durable consumer ([`crate::Client::consume`]), and so
    /// is to be acknowledged ([`Message::ack`], [`Message::nak`], [`Message::term`]).
    pub fn is_from_consumer(&self) -> bool {
        self.ack_epoch.is_some()
    }

    /// Tells the durable consumer this message is done: it is not delivered again.
    ///
    /// The acknowledgement is queued for the socket on the connection the message arrived on,
    /// and this returns without waiting for the broker (which sends no answer); it waits only
    /// while the client's write buffer is full. Acknowledging a message twice is harmless.
    ///
    /// # Errors
    /// [`crate::Error::NotFromConsumer`] for a message of another kind of subscription;
    /// [`crate::Error::StaleDelivery`] when its subscription was dropped, unsubscribed or ended,
    /// or the connection it arrived on was lost (even if the client has reconnected since): the
    /// broker delivers it again then, and that delivery is the one to acknowledge;
    /// [`crate::Error::Closed`] once the client is closed.
    pub async fn ack(&self) -> Result<(), crate::Error> {
        self.acknowledge(AckKind::Ack).await
    }

    /// Tells the durable consumer this message was not processed and should be delivered again
    /// at once, to any member (counted against its `max_deliver`). As [`Message::ack`]
    /// otherwise.
    ///
    /// # Errors
    /// As [`Message::ack`].
    pub async fn nak(&self) -> Result<(), crate::Error> {
        self.acknowledge(AckKind::Nak).await
    }

    /// Tells the durable consumer never to deliver this message again, although it was not
    /// processed (a message no member can handle). As [`Message::ack`] otherwise.
    ///
    /// # Errors
    /// As [`Message::ack`].
    pub async fn term(&self) -> Result<(), crate::Error> {
        self.acknowledge(AckKind::Term).await
    }

    async fn acknowledge(&self, kind: AckKind) -> Result<(), crate::Error> {
        match (&self.client, self.ack_epoch) {
            (Some(client), Some(epoch)) => {
                client.acknowledge(self.sid, self.seq, epoch, kind).await
            }
            _ => Err(crate::Error::NotFromConsumer),
        }
    }

    /// Publishes `payload` to this message's reply-to topic, on the connection it arrived on.
    ///
    /// # Errors
    /// [`crate::Error::NoReplyTo`] when the publisher set none, or a closed connection.
    pub async fn respond(&self, payload: impl AsRef<[u8]>) -> Result<(), crate::Error> {
        let reply = self.reply().ok_or(crate::Error::NoReplyTo)?;
        let client = self.client.as_ref().ok_or(crate::Error::NoReplyTo)?;
        client
            .publish_with(reply, None, None, payload.as_ref(), false)
            .await
            .map(|_| ())
    }
}

impl std::fmt::Debug for Message {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Message")
            .field("sid", &self.sid)
            .field("seq", &self.seq)
            .field("body", &self.body)
            .finish()
    }
}

/// Per-subscription state shared with the client's reader task.
#[derive(Debug, Default)]
pub(crate) struct SubShared {
    /// Messages the server reported dropped (sum of `LOST` notices).
    pub(crate) missed: AtomicU64,
    /// Times it was made again on a new connection after a reconnect.
    pub(crate) resubscribed: AtomicU64,
    /// Why the broker ended it, when it did.
    pub(crate) ended: parking_lot::Mutex<Option<crate::Error>>,
}

/// A live subscription: a [`Stream`] of the messages matching its filter.
///
/// The stream ends when the connection closes or after [`Subscription::unsubscribe`] (messages
/// already buffered are still yielded). Dropping it unsubscribes without waiting for the server.
///
/// Messages wait in a bounded buffer until read; when it is full the client stops reading the
/// socket, and the server's overflow policy applies (drops counted in [`Subscription::missed`]).
/// A replay subscription ([`crate::Client::subscribe_stream`]) is never dropped from: the
/// broker reads its stream only as fast as the subscription takes messages. Neither is a
/// durable consumer's ([`crate::Client::consume`]), whose messages are each to be acknowledged
/// ([`Message::ack`]); dropping it or unsubscribing makes the consumer deliver what it held
/// unacknowledged to the other members at once.
#[derive(Debug)]
pub struct Subscription {
    pub(crate) sid: u32,
    pub(crate) filter: String,
    pub(crate) rx: crate::channel::Receiver,
    /// Messages taken off `rx` while an unsubscribe waited for its `OK`, yielded first.
    pub(crate) buffered: VecDeque<Message>,
    pub(crate) shared: Arc<SubShared>,
    pub(crate) client: Arc<Inner>,
    pub(crate) active: bool,
    /// The stream of a replay or consumer subscription.
    pub(crate) stream: Option<String>,
    /// The durable consumer it is a member of.
    pub(crate) consumer: Option<String>,
}

impl Subscription {
    /// The next message, or `None` once the subscription or connection has ended.
    pub async fn next(&mut self) -> Option<Message> {
        if let Some(m) = self.buffered.pop_front() {
            return Some(m);
        }
        self.rx.recv().await
    }

    /// A message already buffered, without waiting.
    pub fn try_next(&mut self) -> Option<Message> {
        self.buffered.pop_front().or_else(|| self.rx.try_recv())
    }

    /// The subscription id.
    pub fn sid(&self) -> u32 {
        self.sid
    }

    /// The filter it was made with.
    pub fn filter(&self) -> &str {
        &self.filter
    }

    /// The stream a replay subscription reads ([`crate::Client::subscribe_stream`]), or a
    /// durable consumer's subscription takes from ([`crate::Client::consume`]); `None` for a
    /// live subscription.
    pub fn stream(&self) -> Option<&str> {
        self.stream.as_deref()
    }

    /// The durable consumer this subscription is a member of ([`crate::Client::consume`]);
    /// `None` for other subscriptions.
    pub fn consumer(&self) -> Option<&str> {
        self.consumer.as_deref()
    }

    /// How many times the subscription was made again on a new connection. For a live
    /// subscription, each time the server starts its sequence numbers at 1 again: what was
    /// published while the client was disconnected is not delivered, so a message with
    /// `seq() == 1` after the first tells a subscriber that it may have missed some. A replay
    /// subscription is made again from the stream sequence after the last message it received,
    /// so it misses nothing and repeats nothing. A durable consumer's joins the same consumer
    /// again, which delivers again what was unacknowledged on the lost connection.
    pub fn resubscribed(&self) -> u64 {
        self.shared.resubscribed.load(Ordering::Relaxed)
    }

    /// Why the broker ended the subscription, once it has: a replay subscription whose stream
    /// was deleted or could not be read ([`crate::ErrorCode::StoreFailed`]), or a subscription
    /// the broker refused to make again after a reconnect (its stream deleted meanwhile, the
    /// user's permissions changed). The stream of messages ends after what was already
    /// received; `None` while it runs, and when it ended otherwise.
    pub fn ended_by_broker(&self) -> Option<String> {
        self.shared.ended.lock().as_ref().map(ToString::to_string)
    }

    /// How many messages the server reported it dropped for this subscription so far (always 0
    /// for a replay subscription: gaps in its stream sequences are not drops).
    pub fn missed(&self) -> u64 {
        self.shared.missed.load(Ordering::Relaxed)
    }

    /// Ends the subscription and waits for the server to confirm. Every message the server
    /// queued for it before the confirmation stays readable through [`Subscription::next`], and
    /// then the stream ends; none is lost, so a queue-group worker can leave without dropping work.
    ///
    /// A durable consumer's subscription leaves the consumer instead: from this call on, its
    /// messages can no longer be acknowledged ([`crate::Error::StaleDelivery`]), the consumer
    /// delivers every message this member held unacknowledged to the other members at once, and
    /// the messages received and not yet read are discarded rather than yielded (they are
    /// those). Acknowledge what was processed before calling it.
    ///
    /// # Errors
    /// The connection closed, or the server did not know the subscription.
    pub async fn unsubscribe(&mut self) -> Result<(), crate::Error> {
        // Marked first, under the lock an acknowledgement holds until its frame is appended:
        // none follows the `UNSUB` on the wire.
        if let Some(entry) = self.client.subs.lock().get_mut(&self.sid) {
            entry.leaving = true;
        }
        // `active` stays set until the server has answered: if this future is dropped half-way,
        // `Drop` still sends an UNSUB.
        let confirmed = self.client.unsubscribe(self.sid, 0);
        tokio::pin!(confirmed);
        // Keep taking deliveries while waiting: the connection's reader must never be stuck on
        // this stream's full buffer, or the confirmation behind it could not arrive.
        let result = loop {
            tokio::select! {
                r = &mut confirmed => break r,
                Some(m) = self.rx.recv() => self.buffered.push_back(m),
            }
        };
        self.active = false;
        self.client.forget(self.sid);
        self.rx.close();
        while let Some(m) = self.rx.try_recv() {
            self.buffered.push_back(m);
        }
        if self.consumer.is_some() {
            // The consumer delivers them again, to the members that stay.
            self.buffered.clear();
        }
        result
    }

    /// Asks the server to end the subscription after `n` more matched messages (counting any it
    /// drops). The stream itself ends only with [`Subscription::unsubscribe`], a drop, or the
    /// connection's end: this protocol version does not tell the client when the server finished it.
    ///
    /// On a durable consumer's subscription, the member leaves the consumer as soon as the
    /// broker has handed it the `n`-th message, and the consumer then delivers what it holds
    /// unacknowledged (those `n` among them) to the other members at once, while this client
    /// cannot tell: prefer [`Subscription::unsubscribe`] once the messages it wants are
    /// acknowledged.
    ///
    /// # Errors
    /// The connection closed, or the server did not know the subscription.
    pub async fn unsubscribe_after(&mut self, n: u32) -> Result<(), crate::Error> {
        self.client.unsubscribe(self.sid, n.max(1)).await
    }
}

impl Stream for Subscription {
    type Item = Message;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Message>> {
        if let Some(m) = self.buffered.pop_front() {
            return Poll::Ready(Some(m));
        }
        self.rx.poll_recv(cx)
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        if self.active {
            self.client.forget(self.sid);
            self.client.send_unsub_nowait(self.sid);
        }
    }
}
