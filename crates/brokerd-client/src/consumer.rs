//! Durable consumers from the client's side: the settings a consumer is created with
//! ([`ConsumerOptions`]) and the acknowledgement of one message (`MACK`,
//! [`Inner::acknowledge`]).
//!
//! The broker keeps a consumer's position and decides which member gets which message; the
//! client only joins it (a `SUB` made by [`crate::Client::consume`], made again as the same
//! consumer `SUB` after a reconnect, see [`crate::stream::StreamSub::restart`]) and answers each
//! message it received with one `MACK`. A `MACK` has no answer, so it goes through the write
//! buffer like a publish and nothing waits for the broker. It is sent only on the connection the
//! message arrived on, while the subscription is still a member: once that connection is lost or
//! the subscription is ended, the broker delivers the message again by itself, and an
//! acknowledgement sent then could only land on another delivery of it.

use crate::error::Error;
use crate::state::Inner;
use brokerd_proto::streams::valid_stream_name;
use brokerd_proto::{AckKind, ConsumerSpec, Filter, Frame, Mack, StartPosition};
use std::sync::atomic::Ordering;
use std::time::Duration;

/// How a durable consumer is joined, and the settings it is created with ([`crate::Client::consume`]).
///
/// The first subscription that names a consumer creates it with these settings; later ones, from
/// this client or any other, join it and the broker ignores their `start`, `ack_wait`,
/// `max_deliver` and `max_in_flight`. Every member must give the same filter (the broker refuses
/// another one). Left unset, a setting takes the broker's default.
///
/// ```
/// use brokerd_client::{ConsumerOptions, StartPosition};
/// use std::time::Duration;
/// let options = ConsumerOptions::new()
///     .filter("order.created")
///     .start(StartPosition::New)
///     .ack_wait(Duration::from_secs(60))
///     .max_deliver(3)
///     .max_in_flight(100);
/// # let _ = options;
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsumerOptions {
    pub(crate) filter: String,
    pub(crate) start: StartPosition,
    pub(crate) ack_wait: Option<Duration>,
    pub(crate) max_deliver: Option<u16>,
    pub(crate) max_in_flight: Option<u32>,
}

impl Default for ConsumerOptions {
    fn default() -> ConsumerOptions {
        ConsumerOptions {
            filter: ">".into(),
            start: StartPosition::All,
            ack_wait: None,
            max_deliver: None,
            max_in_flight: None,
        }
    }
}

impl ConsumerOptions {
    /// The defaults: the whole stream (`>`), from its oldest message, with the broker's default
    /// settings (30 s ack wait, 5 deliveries, 1,000 messages in flight).
    pub fn new() -> ConsumerOptions {
        ConsumerOptions::default()
    }

    /// Takes only the stream's messages whose topic matches `filter` (default `>`, every
    /// message). It is the consumer's filter: every member must subscribe with the same one.
    pub fn filter(mut self, filter: impl Into<String>) -> ConsumerOptions {
        self.filter = filter.into();
        self
    }

    /// Where a new consumer starts (default [`StartPosition::All`]); ignored when the consumer
    /// exists, which goes on from its own position.
    pub fn start(mut self, start: StartPosition) -> ConsumerOptions {
        self.start = start;
        self
    }

    /// How long a delivered message may stay unacknowledged before the broker delivers it again
    /// (whole milliseconds, 100 ms to about 49 days; the broker's default is 30 s).
    pub fn ack_wait(mut self, wait: Duration) -> ConsumerOptions {
        self.ack_wait = Some(wait);
        self
    }

    /// How many times one message is delivered at most, the first included (at least 1; the
    /// broker's default is 5). After the last one the broker gives the message up.
    pub fn max_deliver(mut self, n: u16) -> ConsumerOptions {
        self.max_deliver = Some(n);
        self
    }

    /// How many messages may be delivered and unacknowledged at once, across all members (at
    /// least 1; the broker's default is 1,000, and it caps it at 100,000).
    pub fn max_in_flight(mut self, n: u32) -> ConsumerOptions {
        self.max_in_flight = Some(n);
        self
    }

    /// Checks every setting and the consumer's `name`, and builds the consumer part of the `SUB`
    /// (0 for a setting left to the broker, as the wire has it).
    pub(crate) fn spec(&self, name: &str) -> Result<ConsumerSpec, Error> {
        if !valid_stream_name(name) {
            return Err(Error::InvalidConsumerName(name.to_string()));
        }
        Filter::new(&self.filter).map_err(Error::InvalidFilter)?;
        let invalid = |option, reason: &str| Error::InvalidOption {
            option,
            reason: reason.to_string(),
        };
        let ack_wait_ms = match self.ack_wait {
            None => 0,
            Some(d) if d.subsec_nanos() % 1_000_000 != 0 => {
                return Err(invalid("ack_wait", "not a whole number of milliseconds"));
            }
            Some(d) => match u32::try_from(d.as_millis()) {
                Ok(ms) if ms < brokerd_proto::streams::MIN_ACK_WAIT_MS => {
                    return Err(invalid("ack_wait", "must be at least 100 ms"));
                }
                Ok(ms) => ms,
                Err(_) => return Err(invalid("ack_wait", "longer than 4294967295 ms")),
            },
        };
        let max_deliver = match self.max_deliver {
            None => 0,
            Some(0) => return Err(invalid("max_deliver", "must be at least 1")),
            Some(n) => n,
        };
        let max_in_flight = match self.max_in_flight {
            None => 0,
            Some(0) => return Err(invalid("max_in_flight", "must be at least 1")),
            Some(n) => n,
        };
        Ok(ConsumerSpec {
            name: name.to_string(),
            ack_wait_ms,
            max_deliver,
            max_in_flight,
        })
    }
}

impl Inner {
    /// Sends `MACK(sid, seq, kind)` for a message that arrived on the connection of generation
    /// `epoch`, waiting only while the write buffer is over its limit (never for the broker:
    /// `MACK` has no answer).
    ///
    /// Refused with [`Error::StaleDelivery`] when the subscription is no longer a member (dropped,
    /// being unsubscribed, ended by the broker) or the connection the message arrived on is
    /// gone (lost, or replaced by a reconnect): the broker delivers the message again by
    /// itself then, and a `MACK` sent now, under the same sid on another connection or after
    /// the member left, could only land on that other delivery.
    pub(crate) async fn acknowledge(
        &self,
        sid: u32,
        seq: u64,
        epoch: u64,
        kind: AckKind,
    ) -> Result<(), Error> {
        let frame = Frame::Mack(Mack { sid, seq, kind });
        loop {
            let space = self.space.notified();
            tokio::pin!(space);
            space.as_mut().enable();
            {
                // `subs` is held until the frame is appended: a drop or an unsubscribe marks the
                // subscription under it before appending its `UNSUB`, so a `MACK` is either
                // ahead of the `UNSUB` on the wire or not sent at all.
                let subs = self.subs.lock();
                let mut w = self.write.lock();
                if let Some(reason) = &w.closed {
                    return Err(Error::Closed(reason.clone()));
                }
                // The generation changes only under `write`, which is held.
                let member = subs.get(&sid).is_some_and(|e| !e.leaving);
                if !member || !w.connected || self.epoch.load(Ordering::Relaxed) != epoch {
                    return Err(Error::StaleDelivery { seq });
                }
                if w.buf.len() < self.options.write_buffer {
                    let was_empty = w.buf.is_empty();
                    frame.encode(&mut w.buf);
                    drop(w);
                    drop(subs);
                    if was_empty {
                        self.data.notify_one();
                    }
                    return Ok(());
                }
            }
            space.await;
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::channel;
    use crate::event::CloseReason;
    use crate::state::{SubEntry, test_welcome};
    use crate::stream::StreamSub;
    use crate::subscription::Message;
    use brokerd_proto::{Body, Msg, decode};
    use bytes::BytesMut;
    use std::sync::Arc;

    fn spec() -> ConsumerSpec {
        ConsumerSpec {
            name: "resizers".into(),
            ack_wait_ms: 1_000,
            max_deliver: 3,
            max_in_flight: 10,
        }
    }

    /// Registers subscription `sid` as `Client::consume` would (or a live one).
    fn subscribe(inner: &Inner, sid: u32, consumer: bool) -> channel::Receiver {
        let (tx, rx) = channel::channel(64, 1 << 20);
        inner.subs.lock().insert(
            sid,
            SubEntry {
                tx,
                shared: Arc::default(),
                filter: "job.>".into(),
                queue: None,
                stream: consumer.then(|| StreamSub {
                    name: "JOBS".into(),
                    resume: StartPosition::All,
                    consumer: Some(spec()),
                }),
                leaving: false,
            },
        );
        rx
    }

    /// Reads `MSG` frames for these (sid, seq) as the connection's reader task does.
    async fn receive(inner: &Arc<Inner>, msgs: &[(u32, u64)]) {
        let mut buf = BytesMut::new();
        for &(sid, seq) in msgs {
            let body = Body::parse(Body::encode("job.resize", None, None, b"{}")).unwrap();
            Frame::Msg(Msg { sid, seq, body }).encode(&mut buf);
        }
        let mut last = None;
        assert!(
            crate::connection::read_frames(inner, &mut buf, &mut last)
                .await
                .is_ok()
        );
    }

    /// The frames queued for the socket, taken out of the write buffer.
    fn sent(inner: &Inner) -> Vec<Frame> {
        let mut buf = inner.write.lock().buf.split();
        std::iter::from_fn(|| decode(&mut buf, 1 << 20).unwrap()).collect()
    }

    fn mack(seq: u64, kind: AckKind) -> Frame {
        Frame::Mack(Mack { sid: 1, seq, kind })
    }

    fn stale(r: Result<(), Error>, seq: u64) {
        assert!(
            matches!(r, Err(Error::StaleDelivery { seq: s }) if s == seq),
            "{r:?}"
        );
    }

    #[tokio::test]
    async fn a_message_is_acknowledged_only_on_the_connection_it_arrived_on() {
        let inner = Inner::for_test();
        let mut jobs = subscribe(&inner, 1, true);
        let mut live = subscribe(&inner, 2, false);
        receive(&inner, &[(1, 5), (1, 6), (2, 1), (1, 9)]).await;
        let take = |rx: &mut channel::Receiver| rx.try_recv().unwrap();
        let (m5, m6, m9) = (take(&mut jobs), take(&mut jobs), take(&mut jobs));
        assert!(m5.is_from_consumer());
        assert_eq!((m5.stream_seq(), m9.stream_seq()), (Some(5), Some(9)));
        m5.ack().await.unwrap();
        m6.nak().await.unwrap();
        m9.term().await.unwrap();
        assert_eq!(
            sent(&inner),
            [
                mack(5, AckKind::Ack),
                mack(6, AckKind::Nak),
                mack(9, AckKind::Term)
            ]
        );
        let plain: Message = take(&mut live);
        assert!(!plain.is_from_consumer());
        assert!(matches!(plain.ack().await, Err(Error::NotFromConsumer)));

        // Lost: nothing can be acknowledged until the next connection, and what arrived on this
        // one never again; the broker delivers it again.
        inner.disconnected(&CloseReason::ServerClosed);
        stale(m6.ack().await, 6);
        inner.reconnected(test_welcome());
        let again = sent(&inner);
        let Some(sub) = again.iter().find_map(|f| match f {
            Frame::Sub(s) if s.sid == 1 => Some(s),
            _ => None,
        }) else {
            panic!("expected the consumer's SUB, got {again:?}");
        };
        assert_eq!(sub.filter, "job.>");
        let start = sub.stream.clone().unwrap();
        assert_eq!(
            (start.stream.as_str(), start.start, start.consumer),
            ("JOBS", StartPosition::All, Some(spec()))
        );
        stale(m6.ack().await, 6);
        assert!(sent(&inner).is_empty(), "no MACK under the same sid");
        // Its delivery on the new connection is the one acknowledged.
        receive(&inner, &[(1, 6)]).await;
        let m6 = take(&mut jobs);
        m6.ack().await.unwrap();
        assert_eq!(sent(&inner), [mack(6, AckKind::Ack)]);

        // Leaving: from the moment `unsubscribe` marks it, and after a drop forgets it.
        inner.subs.lock().get_mut(&1).unwrap().leaving = true;
        stale(m6.ack().await, 6);
        inner.disconnected(&CloseReason::ServerClosed);
        inner.reconnected(test_welcome());
        let subs: Vec<u32> = sent(&inner)
            .into_iter()
            .filter_map(|f| match f {
                Frame::Sub(s) => Some(s.sid),
                _ => None,
            })
            .collect();
        assert_eq!(subs, [2], "a subscription being ended is not made again");
        inner.forget(1);
        stale(m6.ack().await, 6);
        inner.shutdown(CloseReason::ClientClosed);
        assert!(matches!(m6.ack().await, Err(Error::Closed(_))));
    }

    fn refused(options: ConsumerOptions) -> &'static str {
        match options.spec("billing") {
            Err(Error::InvalidOption { option, .. }) => option,
            other => panic!("expected an invalid option, got {other:?}"),
        }
    }

    #[test]
    fn settings_left_unset_are_zero_on_the_wire() {
        let spec = ConsumerOptions::new().spec("billing").unwrap();
        assert_eq!(
            spec,
            ConsumerSpec {
                name: "billing".into(),
                ack_wait_ms: 0,
                max_deliver: 0,
                max_in_flight: 0,
            }
        );
        let spec = ConsumerOptions::new()
            .ack_wait(Duration::from_secs(90))
            .max_deliver(3)
            .max_in_flight(250)
            .spec("billing")
            .unwrap();
        assert_eq!(
            (spec.ack_wait_ms, spec.max_deliver, spec.max_in_flight),
            (90_000, 3, 250)
        );
    }

    #[test]
    fn names_filters_and_settings_are_checked_before_sending() {
        assert!(matches!(
            ConsumerOptions::new().spec("not.a.name"),
            Err(Error::InvalidConsumerName(n)) if n == "not.a.name"
        ));
        assert!(matches!(
            ConsumerOptions::new().spec(""),
            Err(Error::InvalidConsumerName(_))
        ));
        assert!(matches!(
            ConsumerOptions::new().filter("a..b").spec("c"),
            Err(Error::InvalidFilter(_))
        ));
        assert_eq!(
            refused(ConsumerOptions::new().ack_wait(Duration::ZERO)),
            "ack_wait"
        );
        assert_eq!(
            refused(ConsumerOptions::new().ack_wait(Duration::from_millis(99))),
            "ack_wait"
        );
        assert_eq!(
            refused(ConsumerOptions::new().ack_wait(Duration::from_micros(1500))),
            "ack_wait"
        );
        assert_eq!(
            refused(ConsumerOptions::new().ack_wait(Duration::from_secs(50 * 86_400))),
            "ack_wait"
        );
        assert_eq!(
            refused(ConsumerOptions::new().max_deliver(0)),
            "max_deliver"
        );
        assert_eq!(
            refused(ConsumerOptions::new().max_in_flight(0)),
            "max_in_flight"
        );
    }
}
