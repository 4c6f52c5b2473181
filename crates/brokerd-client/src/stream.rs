//! Streams from the client's side: what a stream answers to a publish it stored
//! ([`StoredAck`]), where a replay subscription starts again after a reconnect and which
//! consumer a durable consumer's subscription joins again ([`StreamSub`]), and the typed management requests on `$SYS.req.stream.<op>` ([`Streams`]).
//!
//! Management is request/reply over the connection's inbox ([`crate::Client::request`]): this
//! file builds the JSON requests and reads the answers, and never touches the socket itself.
//! Replay subscriptions are made by [`crate::Client::subscribe_stream`]; the reader task
//! ([`crate::connection`]) records the last stream sequence each one received, and
//! [`crate::state::Inner::reconnected`] asks [`StreamSub::restart`] where to start again.

use crate::client::Client;
use crate::error::Error;
use brokerd_proto::streams::{
    STREAM_REQUEST_PREFIX, StreamAnswer, StreamConfig, StreamInfo, StreamName, valid_stream_name,
};
use brokerd_proto::{ConsumerSpec, StartPosition, Stored, StreamStart};
use std::time::Duration;

/// How long a stream management request waits for the broker's answer unless
/// [`Streams::timeout`] says otherwise.
pub const STREAM_REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// A stream's answer to a publish it captured ([`crate::Publish::stored`]): the broker sends it
/// instead of a plain acknowledgement, once the message is stored as durably as the stream's
/// `fsync` setting promises.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct StoredAck {
    /// The stream that stored it.
    pub stream: String,
    /// Its stream sequence; for a duplicate, the sequence of the copy stored first.
    pub seq: u64,
    /// The message id ([`crate::Publish::msg_id`]) was already stored within the stream's
    /// duplicate window: nothing new was stored or routed, and `delivered` is 0.
    pub duplicate: bool,
    /// Subscriptions the message was queued for live, as [`crate::Publish::acked`] counts.
    pub delivered: u32,
}

impl From<Stored> for StoredAck {
    fn from(s: Stored) -> StoredAck {
        StoredAck {
            stream: s.stream,
            seq: s.seq,
            duplicate: s.duplicate,
            delivered: s.delivered,
        }
    }
}

/// What a replay subscription, or a durable consumer's, needs to be made again on a new
/// connection.
#[derive(Debug, Clone)]
pub(crate) struct StreamSub {
    /// The stream's name.
    pub(crate) name: String,
    /// Where to start when nothing has been received yet: the start asked for, or, for `New`
    /// and `Last`, the same position pinned to a sequence ([`resume_point`]).
    pub(crate) resume: StartPosition,
    /// The durable consumer joined, with the settings it is created with.
    pub(crate) consumer: Option<ConsumerSpec>,
}

impl StreamSub {
    /// The stream part of the `SUB` that makes the subscription again, given the stream
    /// sequence of the last message it received (0: none).
    ///
    /// A replay starts right after that message, so that the application sees neither a gap
    /// nor a duplicate. A durable consumer's subscription joins the same consumer again,
    /// whatever it received: the broker keeps the consumer's position and delivers again what
    /// was in flight on the lost connection. Its start matters only if the consumer no longer
    /// exists, and is then the pinned start of the first `SUB`.
    pub(crate) fn restart(&self, last_seq: u64) -> StreamStart {
        let start = match (last_seq, &self.consumer) {
            (0, _) | (_, Some(_)) => self.resume,
            (n, None) => StartPosition::FromSeq(n.saturating_add(1)),
        };
        StreamStart {
            stream: self.name.clone(),
            start,
            consumer: self.consumer.clone(),
        }
    }
}

/// Where a subscription that received nothing starts again, given the stream's last sequence
/// read just before it was made (`None`: unknown).
///
/// `All`, `FromSeq` and `FromTime` name the same messages whenever they are sent again, and
/// `LastPerTopic` sent again still gives the newest message of each topic, those stored during
/// an outage included (the first snapshot was never received, so it cannot be skipped). `New`
/// and `Last(n)` do not: sent again after an outage, they would skip what was stored while the
/// client was away. Pinned to the sequence read before subscribing, they cover at least what the
/// first `SUB` would have delivered; at most they add the few messages stored between that
/// reading and the `SUB`, which the application never received either. Unknown, they stay as
/// they are, and an outage before the first message may then skip messages.
pub(crate) fn resume_point(start: StartPosition, last_stored: Option<u64>) -> StartPosition {
    match (start, last_stored) {
        (StartPosition::New, Some(last)) => StartPosition::FromSeq(last.saturating_add(1)),
        (StartPosition::Last(n), Some(last)) => {
            StartPosition::FromSeq(last.saturating_add(1).saturating_sub(n).max(1))
        }
        (start, _) => start,
    }
}

/// The stream management requests: add, list, inspect, purge and delete streams. Made by
/// [`Client::streams`]; each call is one request on `$SYS.req.stream.<op>` and waits for the
/// broker's answer for at most [`Streams::timeout`] (default [`STREAM_REQUEST_TIMEOUT`]). On a
/// broker with users, only the admin role may send them: others get [`Error::Server`] with
/// [`crate::ErrorCode::PermissionDenied`].
///
/// ```no_run
/// use brokerd_client::StreamConfig;
/// # async fn demo(client: brokerd_client::Client) -> Result<(), brokerd_client::Error> {
/// let orders = StreamConfig {
///     name: "ORDERS".into(),
///     filters: vec!["order.>".into(), "payment.>".into()],
///     max_age_s: 7 * 24 * 3600,
///     ..StreamConfig::default()
/// };
/// let info = client.streams().add(&orders).await?;
/// println!("{} holds {} messages", info.config.name, info.msgs);
/// for s in client.streams().list().await? {
///     println!("{}: seq {}..={}", s.config.name, s.first_seq, s.last_seq);
/// }
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct Streams<'a> {
    client: &'a Client,
    timeout: Duration,
}

impl<'a> Streams<'a> {
    pub(crate) fn new(client: &'a Client) -> Streams<'a> {
        Streams {
            client,
            timeout: STREAM_REQUEST_TIMEOUT,
        }
    }

    /// Waits at most `timeout` for each answer.
    pub fn timeout(mut self, timeout: Duration) -> Streams<'a> {
        self.timeout = timeout;
        self
    }

    /// Adds a stream and returns it as the broker now holds it (with its defaults filled in).
    /// The broker stores the definition durably.
    ///
    /// # Errors
    /// [`Error::InvalidStreamName`] before sending; [`Error::Stream`] with the broker's reason
    /// (an invalid filter, a name already taken, ...);
    /// [`Error::Timeout`], or the connection's errors.
    pub async fn add(&self, config: &StreamConfig) -> Result<StreamInfo, Error> {
        check_name(&config.name)?;
        // Serializing strings, numbers and a unit enum into a vector cannot fail.
        let payload = serde_json::to_vec(config).unwrap_or_default();
        let answer = self.call("add", payload).await?;
        answer.stream.ok_or_else(|| no_stream("add"))
    }

    /// Every stream, with its state.
    ///
    /// # Errors
    /// [`Error::Stream`], [`Error::Timeout`], or the connection's errors.
    pub async fn list(&self) -> Result<Vec<StreamInfo>, Error> {
        Ok(self.call("list", b"{}".to_vec()).await?.streams)
    }

    /// One stream's definition and state: sequences, messages, bytes, segments, readers.
    ///
    /// # Errors
    /// [`Error::InvalidStreamName`]; [`Error::Stream`] when it does not exist;
    /// [`Error::Timeout`], or the connection's errors.
    pub async fn info(&self, name: &str) -> Result<StreamInfo, Error> {
        let answer = self.call("info", named(name)?).await?;
        answer.stream.ok_or_else(|| no_stream("info"))
    }

    /// Removes every message from a stream, keeping its definition; sequences go on from where
    /// they were. Returns how many messages were removed.
    ///
    /// # Errors
    /// As [`Streams::info`].
    pub async fn purge(&self, name: &str) -> Result<u64, Error> {
        Ok(self.call("purge", named(name)?).await?.purged)
    }

    /// Deletes a stream: its definition and every message it holds. Replay subscriptions on it
    /// end ([`crate::Subscription::ended_by_broker`] says so). A stream declared in the broker's
    /// configuration file cannot be deleted ([`Error::Stream`]).
    ///
    /// # Errors
    /// As [`Streams::info`], and [`Error::InvalidAnswer`] when the broker answers without an
    /// error but says it deleted nothing.
    pub async fn delete(&self, name: &str) -> Result<(), Error> {
        if self.call("delete", named(name)?).await?.deleted {
            Ok(())
        } else {
            Err(Error::InvalidAnswer {
                op: "delete",
                reason: "no error, yet the stream was not deleted".into(),
            })
        }
    }

    /// Sends one request and reads its answer; an answer with `error` set is
    /// [`Error::Stream`].
    async fn call(&self, op: &'static str, payload: Vec<u8>) -> Result<StreamAnswer, Error> {
        let topic = format!("{STREAM_REQUEST_PREFIX}{op}");
        let reply = self.client.request(&topic, payload, self.timeout).await?;
        read_answer(op, &reply.payload())
    }
}

/// Reads a stream request's answer.
fn read_answer(op: &'static str, payload: &[u8]) -> Result<StreamAnswer, Error> {
    let answer: StreamAnswer =
        serde_json::from_slice(payload).map_err(|e| Error::InvalidAnswer {
            op,
            reason: format!("not a stream answer: {e}"),
        })?;
    match answer.error {
        Some(message) => Err(Error::Stream { op, message }),
        None => Ok(answer),
    }
}

/// The error for an answer that lacks the stream it is about.
fn no_stream(op: &'static str) -> Error {
    Error::InvalidAnswer {
        op,
        reason: "no stream in the answer".into(),
    }
}

/// Refuses a name the broker would refuse, before anything is sent.
pub(crate) fn check_name(name: &str) -> Result<(), Error> {
    if valid_stream_name(name) {
        Ok(())
    } else {
        Err(Error::InvalidStreamName(name.to_string()))
    }
}

/// The payload naming one stream.
fn named(name: &str) -> Result<Vec<u8>, Error> {
    check_name(name)?;
    let request = StreamName {
        name: name.to_string(),
    };
    // As in `add`: a struct of one string always serializes.
    Ok(serde_json::to_vec(&request).unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_subscription_starts_again_right_after_what_it_received() {
        let sub = StreamSub {
            name: "ORDERS".into(),
            resume: StartPosition::All,
            consumer: None,
        };
        assert_eq!(sub.restart(0).start, StartPosition::All);
        assert_eq!(sub.restart(41).start, StartPosition::FromSeq(42));
        assert_eq!(sub.restart(41).stream, "ORDERS");
        // Gaps before 41 (other topics, retention) do not matter: only the last one counts.
        assert_eq!(
            sub.restart(u64::MAX).start,
            StartPosition::FromSeq(u64::MAX)
        );
        assert_eq!(sub.restart(41).consumer, None);
    }

    #[test]
    fn a_consumer_joins_the_same_consumer_again_whatever_it_received() {
        let spec = ConsumerSpec {
            name: "billing".into(),
            ack_wait_ms: 5_000,
            max_deliver: 3,
            max_in_flight: 10,
        };
        let sub = StreamSub {
            name: "ORDERS".into(),
            resume: StartPosition::FromSeq(101),
            consumer: Some(spec.clone()),
        };
        for last in [0, 41, u64::MAX] {
            assert_eq!(
                sub.restart(last),
                StreamStart {
                    stream: "ORDERS".into(),
                    start: StartPosition::FromSeq(101),
                    consumer: Some(spec.clone()),
                },
                "after {last}"
            );
        }
    }

    #[test]
    fn new_and_last_are_pinned_to_the_stream_position_read_before_subscribing() {
        use StartPosition::*;
        assert_eq!(resume_point(New, Some(100)), FromSeq(101));
        assert_eq!(resume_point(New, Some(0)), FromSeq(1));
        assert_eq!(resume_point(Last(10), Some(100)), FromSeq(91));
        assert_eq!(resume_point(Last(500), Some(100)), FromSeq(1));
        assert_eq!(resume_point(Last(0), Some(100)), FromSeq(101));
        // Unknown: left as asked.
        assert_eq!(resume_point(New, None), New);
        assert_eq!(resume_point(Last(3), None), Last(3));
        // The others mean the same messages whenever they are sent.
        assert_eq!(resume_point(All, Some(7)), All);
        assert_eq!(resume_point(FromSeq(3), Some(7)), FromSeq(3));
        assert_eq!(resume_point(FromTime(9), Some(7)), FromTime(9));
        assert_eq!(resume_point(LastPerTopic, Some(7)), LastPerTopic);
    }

    #[test]
    fn answers_are_read_and_errors_carry_the_brokers_message() {
        let ok = read_answer(
            "purge",
            br#"{"purged":12,"stream":{"config":{"name":"S"}}}"#,
        );
        let ok = ok.unwrap();
        assert_eq!(ok.purged, 12);
        assert_eq!(ok.stream.unwrap().config.name, "S");
        let refused = read_answer("info", br#"{"error":"no stream named X"}"#).unwrap_err();
        assert!(
            matches!(&refused, Error::Stream { op: "info", message } if message == "no stream named X"),
            "{refused:?}"
        );
        assert_eq!(refused.to_string(), "stream info failed: no stream named X");
        let garbled = read_answer("list", b"<html>").unwrap_err();
        assert!(matches!(garbled, Error::InvalidAnswer { op: "list", .. }));
        // Fields this client does not know are ignored.
        assert!(read_answer("list", br#"{"streams":[],"future":true}"#).is_ok());
    }

    #[test]
    fn names_are_checked_before_sending() {
        assert!(named("ORDERS").is_ok());
        assert_eq!(named("ORDERS").unwrap(), br#"{"name":"ORDERS"}"#);
        assert!(matches!(named("a.b"), Err(Error::InvalidStreamName(n)) if n == "a.b"));
    }
}
