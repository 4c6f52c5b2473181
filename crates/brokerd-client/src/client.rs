//! [`Client`]: the public calls. Each encodes its frame into the shared write buffer
//! ([`crate::state`]) and, when it needs an answer, waits for the reply the reader task
//! ([`crate::connection`]) hands it by request id.

use crate::channel;
use crate::connection::{dial, supervise};
use crate::consumer::ConsumerOptions;
use crate::error::Error;
use crate::event::{CloseReason, Event};
use crate::info::ServerInfo;
use crate::options::ConnectOptions;
use crate::publish::Publish;
use crate::state::{Forget, Inner, SubEntry};
use crate::stream::{StreamSub, Streams, check_name, resume_point};
use crate::subscription::{Message, SubShared, Subscription};
use brokerd_proto::{Filter, Frame, StartPosition, StreamStart, Subscribe};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::oneshot;

/// A connection to brokerd. Cloning shares the connection; when the last clone is dropped the
/// connection closes (without flushing: call [`Client::close`] to flush first), and subscription
/// streams end.
#[derive(Clone, Debug)]
pub struct Client {
    _closer: Arc<Handle>,
    inner: Arc<Inner>,
}

/// Closes the connection when the last [`Client`] clone goes away; the connection's tasks hold
/// only [`Inner`], so they do not keep it open.
#[derive(Debug)]
struct Handle(Arc<Inner>);

impl Drop for Handle {
    fn drop(&mut self) {
        self.0.shutdown(CloseReason::ClientClosed);
    }
}

impl Client {
    /// Connects, performs the handshake and starts the connection's tasks.
    ///
    /// # Errors
    /// The address cannot be reached, the server refuses the handshake (for example at its
    /// connection limit), or it does not answer within `options.connect_timeout`.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # async fn demo() -> Result<(), brokerd_client::Error> {
    /// use brokerd_client::{Client, ConnectOptions, OverflowPolicy};
    /// let opts = ConnectOptions::new("analytics").overflow(OverflowPolicy::DropOld);
    /// let client = Client::connect("127.0.0.1:7654", opts).await?;
    /// println!("connected to {}", client.server_info().server_id);
    /// # Ok(()) }
    /// ```
    pub async fn connect(
        addr: impl std::fmt::Display,
        options: ConnectOptions,
    ) -> Result<Client, Error> {
        // Kept as text, so that reconnecting resolves a host name again.
        let server = addr.to_string();
        options.check()?;
        let (rd, wr, buf, info) = dial(&server, &options).await?;
        let inner = Inner::new(info, options, server);
        tokio::spawn(supervise(inner.clone(), rd, wr, buf));
        Ok(Client {
            _closer: Arc::new(Handle(inner.clone())),
            inner,
        })
    }

    /// Connection events: lost, reconnected, the server shutting down, closed for good. The
    /// receiver holds the last 64; one that falls further behind skips the oldest.
    pub fn events(&self) -> tokio::sync::broadcast::Receiver<Event> {
        self.inner.events.subscribe()
    }

    /// The refusals the server sent for requests nobody waited on, oldest first, since the
    /// last call: a publish without acknowledgement that the server refused (a reserved topic,
    /// a permission, a limit lower than the client checked against) is reported here, as
    /// [`Error::Server`]. At most the last 256 are kept; the second value counts them all.
    /// Call [`Client::flush`] first to be sure every refusal for what was sent has arrived.
    pub fn take_refusals(&self) -> (Vec<Error>, u64) {
        let mut r = self.inner.refusals.lock();
        let total = std::mem::take(&mut r.total);
        (r.kept.drain(..).collect(), total)
    }

    /// Whether a connection is up now (false while reconnecting, and once closed).
    pub fn is_connected(&self) -> bool {
        self.inner.write.lock().connected
    }

    /// What the server announced: its id, version, limits and the overflow policy in force
    /// (after a reconnect, the new server's).
    pub fn server_info(&self) -> Arc<ServerInfo> {
        self.inner.info.lock().clone()
    }

    /// Publishes `payload` to `topic`: returns a [`Publish`] to add a reply-to topic, headers
    /// or an acknowledgement to, which sends the message when awaited.
    ///
    /// Without [`Publish::acked`], awaiting returns once the frame is buffered for the socket
    /// (waiting only while the write buffer is full; while reconnecting, the message is
    /// buffered up to [`crate::Reconnect::buffer_bytes`]). A refusal the server sends later is
    /// kept for [`Client::take_refusals`].
    ///
    /// # Errors
    /// An invalid topic or reply-to, a payload over the server's limit, a header over 65,535
    /// bytes, a closed connection; with an acknowledgement also the server's refusal, and
    /// [`Error::Disconnected`] while reconnecting.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # async fn demo(client: brokerd_client::Client) -> Result<(), brokerd_client::Error> {
    /// client.publish("user.created", r#"{"id":1}"#).await?;
    /// let n = client.publish("order.created", r#"{"order_id":"ord-1"}"#).acked().await?;
    /// println!("order.created reached {n} subscribers");
    /// # Ok(()) }
    /// ```
    pub fn publish<'a, P: AsRef<[u8]>>(&'a self, topic: &'a str, payload: P) -> Publish<'a, P> {
        Publish::new(&self.inner, topic, payload)
    }

    /// Subscribes to `filter`. Once this returns, every message published afterwards that
    /// matches is delivered to the returned stream.
    ///
    /// # Errors
    /// An invalid filter, the server's subscription limit, or a closed connection.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # async fn demo(client: brokerd_client::Client) -> Result<(), brokerd_client::Error> {
    /// let mut errors = client.subscribe("*.error").await?;
    /// while let Some(msg) = errors.next().await {
    ///     println!("{}: {:?} (seq {})", msg.topic(), msg.payload(), msg.seq());
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn subscribe(&self, filter: &str) -> Result<Subscription, Error> {
        self.subscribe_inner(filter, None, None).await
    }

    /// Subscribes to `filter` as a member of queue group `group`: of all the group's
    /// subscriptions (on any connection) that match a message, exactly one receives it.
    ///
    /// # Errors
    /// As [`Client::subscribe`], and an invalid group name.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # async fn demo(client: brokerd_client::Client) -> Result<(), brokerd_client::Error> {
    /// let mut jobs = client.subscribe_queue("jobs.resize", "resizers").await?;
    /// while let Some(job) = jobs.next().await {
    ///     // Only this worker of the `resizers` group got this job.
    ///     # let _ = job;
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn subscribe_queue(&self, filter: &str, group: &str) -> Result<Subscription, Error> {
        self.subscribe_inner(filter, Some(group), None).await
    }

    /// Subscribes to the messages stored in `stream` whose topics match `filter`, from `start`
    /// on: the broker delivers what the stream holds, in order, then continues with what it
    /// stores from then on, with no gap and no duplicate at the seam. Each message carries its
    /// stream sequence ([`Message::stream_seq`]); sequences skip the stream's messages the
    /// filter does not match, and those retention removed, which are not losses. The broker
    /// reads the stream only as fast as the subscription takes messages and never drops one.
    /// Stored messages carry no reply-to.
    ///
    /// With [`ConnectOptions::reconnect`], the subscription is made again after a lost
    /// connection from the sequence after the last message it received, so the application
    /// resumes exactly where it stopped (messages already received and not yet read stay
    /// readable). When nothing was received yet, `All`, `FromSeq`, `FromTime` and
    /// `LastPerTopic` are sent again as they are. `New` and `Last(n)` would then skip what was stored during the
    /// outage, so on a reconnecting client this call first asks the broker for the stream's
    /// last sequence (one [`Streams::info`] request) and a subscription that received nothing
    /// is made again from that position: at worst it then also gets the few messages stored
    /// between that request and the subscription. If the request fails (a user not allowed
    /// `$SYS.req.stream.info`), `New` and `Last` are sent again as they are.
    ///
    /// # Errors
    /// An invalid filter, [`Error::InvalidStreamName`], [`Error::Server`] with
    /// [`crate::ErrorCode::NoSuchStream`], [`crate::ErrorCode::InvalidStart`] (`LastPerTopic`
    /// on a stream that does not keep messages per topic), the server's subscription limit, or a
    /// closed connection.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// use brokerd_client::StartPosition;
    /// # async fn demo(client: brokerd_client::Client) -> Result<(), brokerd_client::Error> {
    /// // Everything ORDERS holds about payments, then new payments as they are stored.
    /// let mut payments = client
    ///     .subscribe_stream("payment.>", "ORDERS", StartPosition::All)
    ///     .await?;
    /// while let Some(msg) = payments.next().await {
    ///     let seq = msg.stream_seq().unwrap_or(0);
    ///     println!("#{seq} {}: {:?}", msg.topic(), msg.payload());
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn subscribe_stream(
        &self,
        filter: &str,
        stream: &str,
        start: StartPosition,
    ) -> Result<Subscription, Error> {
        Filter::new(filter).map_err(Error::InvalidFilter)?;
        check_name(stream)?;
        let sub = StreamSub {
            name: stream.to_string(),
            resume: self.pin(stream, start).await,
            consumer: None,
        };
        self.subscribe_inner(filter, None, Some((sub, start))).await
    }

    /// Joins the durable consumer `consumer` of `stream`, creating it if it does not exist:
    /// returns a [`Subscription`] whose messages must each be acknowledged, with
    /// [`Message::ack`] (done), [`Message::nak`] (deliver it again) or [`Message::term`] (never
    /// deliver it again).
    ///
    /// The broker keeps the consumer's position, on disk, across restarts of the broker and of
    /// its members. Each message matching the consumer's filter goes to one member at a time,
    /// whichever client it is on, so clients that join the same consumer share its work. A
    /// message not acknowledged within the ack wait, or held by a member that leaves (its
    /// subscription dropped or unsubscribed, its connection lost), is delivered again, up to
    /// `max_deliver` times in all: at least once, so a member must tolerate a repeat (each
    /// message's [`Message::stream_seq`] tells it). Settings: [`ConsumerOptions`]; the first
    /// subscription that names the consumer creates it with its own, later ones join it.
    ///
    /// With [`ConnectOptions::reconnect`], the subscription joins the same consumer again after a
    /// lost connection, and the consumer goes on from its position. What this member held
    /// unacknowledged on the lost connection is delivered again by the broker (to it or another
    /// member), so a message received before the reconnect can no longer be acknowledged: its
    /// acknowledgement fails with [`Error::StaleDelivery`] and its new delivery is the one to
    /// acknowledge. As for [`Client::subscribe_stream`], a start of `New` or `Last(n)` is first
    /// pinned to the stream's sequence on a reconnecting client (one [`Streams::info`] request),
    /// so that a consumer the broker lost meanwhile is made again from the same place.
    ///
    /// Messages arrive as the broker hands them out: at most `max_in_flight` unacknowledged
    /// across the consumer, and for this member as many as its queue
    /// ([`ConnectOptions::subscription_capacity`]) and the broker's queue for the connection
    /// take. What it holds when it leaves goes to the other members at once.
    ///
    /// # Errors
    /// [`Error::InvalidStreamName`], [`Error::InvalidConsumerName`], an invalid filter or
    /// [`Error::InvalidOption`] (a setting out of range), before anything is sent;
    /// [`Error::Server`] with [`crate::ErrorCode::NoSuchStream`], with
    /// [`crate::ErrorCode::InvalidFilter`] (the consumer exists with another filter, or the stream
    /// has its maximum of 256 consumers), with [`crate::ErrorCode::InvalidStart`]; the server's
    /// subscription limit, or a closed connection.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// use brokerd_client::ConsumerOptions;
    /// use std::time::Duration;
    /// # async fn demo(client: brokerd_client::Client) -> Result<(), brokerd_client::Error> {
    /// let options = ConsumerOptions::new()
    ///     .filter("order.created")
    ///     .ack_wait(Duration::from_secs(60));
    /// let mut orders = client.consume("ORDERS", "invoicing", options).await?;
    /// while let Some(msg) = orders.next().await {
    ///     println!("invoicing #{}: {:?}", msg.stream_seq().unwrap_or(0), msg.payload());
    ///     msg.ack().await?;
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn consume(
        &self,
        stream: &str,
        consumer: &str,
        options: ConsumerOptions,
    ) -> Result<Subscription, Error> {
        check_name(stream)?;
        let spec = options.spec(consumer)?;
        let sub = StreamSub {
            name: stream.to_string(),
            resume: self.pin(stream, options.start).await,
            consumer: Some(spec),
        };
        self.subscribe_inner(&options.filter, None, Some((sub, options.start)))
            .await
    }

    /// Where a stream subscription starting at `start` starts again when it received nothing:
    /// `New` and `Last` pinned to the stream's last sequence, asked for now, on a reconnecting
    /// client ([`resume_point`]); `start` otherwise.
    async fn pin(&self, stream: &str, start: StartPosition) -> StartPosition {
        let pinned = matches!(start, StartPosition::New | StartPosition::Last(_));
        if !pinned || self.inner.options.reconnect.is_none() {
            return start;
        }
        let info = self
            .streams()
            .timeout(self.inner.options.connect_timeout)
            .info(stream)
            .await;
        if let Err(e) = &info {
            tracing::debug!(stream, error = %e, "cannot read the stream's position; a reconnect before the first message may skip messages");
        }
        resume_point(start, info.ok().map(|i| i.last_seq))
    }

    /// The stream management requests: add, list, inspect, purge and delete streams.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # async fn demo(client: brokerd_client::Client) -> Result<(), brokerd_client::Error> {
    /// let info = client.streams().info("ORDERS").await?;
    /// println!("ORDERS: {} messages, sequences {}..={}", info.msgs, info.first_seq, info.last_seq);
    /// # Ok(()) }
    /// ```
    pub fn streams(&self) -> Streams<'_> {
        Streams::new(self)
    }

    async fn subscribe_inner(
        &self,
        filter: &str,
        queue: Option<&str>,
        stream: Option<(StreamSub, StartPosition)>,
    ) -> Result<Subscription, Error> {
        Filter::new(filter).map_err(Error::InvalidFilter)?;
        let sid = self.inner.next_id();
        let (tx, rx) = channel::channel(
            self.inner.options.subscription_capacity,
            self.inner.options.subscription_bytes,
        );
        let shared = Arc::new(SubShared::default());
        let name = stream.as_ref().map(|(s, _)| s.name.clone());
        let consumer = stream
            .as_ref()
            .and_then(|(s, _)| s.consumer.as_ref())
            .map(|c| c.name.clone());
        let start = stream.as_ref().map(|(s, start)| StreamStart {
            stream: s.name.clone(),
            start: *start,
            consumer: s.consumer.clone(),
        });
        self.inner.subs.lock().insert(
            sid,
            SubEntry {
                tx,
                shared: shared.clone(),
                filter: filter.to_string(),
                queue: queue.map(str::to_string),
                stream: stream.map(|(s, _)| s),
                leaving: false,
            },
        );
        let req_id = self.inner.next_id();
        let frame = Frame::Sub(Subscribe {
            req_id,
            sid,
            filter: filter.to_string(),
            queue: queue.map(str::to_string),
            stream: start,
        });
        let result = self.inner.request(req_id, frame).await;
        if let Err(e) = result {
            self.inner.forget(sid);
            return Err(e);
        }
        Ok(Subscription {
            sid,
            filter: filter.to_string(),
            rx,
            buffered: std::collections::VecDeque::new(),
            shared,
            client: self.inner.clone(),
            active: true,
            stream: name,
            consumer,
        })
    }

    /// Sends a request and waits for the first reply, up to `timeout`.
    ///
    /// The request carries a reply-to topic under this connection's inbox (one wildcard
    /// subscription per connection, made on the first request). When the broker queued the
    /// request for no subscription at all (nothing matched, or every match dropped it under its
    /// overflow policy), this fails at once with [`Error::NoResponders`] instead of waiting.
    ///
    /// # Errors
    /// [`Error::NoResponders`], [`Error::Timeout`], an invalid topic, or a closed connection.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # async fn demo(client: brokerd_client::Client) -> Result<(), brokerd_client::Error> {
    /// use std::time::Duration;
    /// match client.request("price.quote", r#"{"sku":"mug"}"#, Duration::from_secs(2)).await {
    ///     Ok(reply) => println!("quote: {:?}", reply.payload()),
    ///     Err(brokerd_client::Error::NoResponders(_)) => println!("no pricing service is running"),
    ///     Err(e) => return Err(e),
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn request(
        &self,
        topic: &str,
        payload: impl AsRef<[u8]>,
        timeout: Duration,
    ) -> Result<Message, Error> {
        let deadline = tokio::time::Instant::now() + timeout;
        let prefix = tokio::time::timeout_at(deadline, self.inner.inbox())
            .await
            .map_err(|_| Error::Timeout)??;
        let token = self.inner.next_id();
        let reply_to = format!("{prefix}.{token}");
        let (tx, rx) = oneshot::channel();
        self.inner.replies.lock().insert(token, tx);
        // However this call ends (reply, error, timeout, or the caller dropping it), its waiter
        // goes; removing one the reader already took is harmless.
        let _waiter = Forget(&self.inner.replies, token);
        let sent = tokio::time::timeout_at(
            deadline,
            self.inner
                .publish_with(topic, Some(&reply_to), None, payload.as_ref(), true),
        )
        .await;
        match sent {
            Err(_) => return Err(Error::Timeout),
            Ok(Err(e)) => return Err(e),
            Ok(Ok(answer)) if answer.delivered() == 0 => {
                return Err(Error::NoResponders(topic.to_string()));
            }
            Ok(Ok(_)) => {}
        }
        match tokio::time::timeout_at(deadline, rx).await {
            Ok(Ok(msg)) => Ok(msg),
            Ok(Err(_)) => Err(self.inner.lost_error()),
            Err(_) => Err(Error::Timeout),
        }
    }

    /// Waits until the server has processed everything this client sent before the call.
    ///
    /// # Errors
    /// The connection closed.
    pub async fn flush(&self) -> Result<(), Error> {
        let id = self.inner.next_id();
        self.inner.request(id, Frame::Ping(id)).await
    }

    /// Flushes, then closes the connection. Subscription streams end.
    ///
    /// # Errors
    /// The connection was already closed.
    pub async fn close(self) -> Result<(), Error> {
        let r = self.flush().await;
        self.inner.shutdown(CloseReason::ClientClosed);
        r
    }
}
