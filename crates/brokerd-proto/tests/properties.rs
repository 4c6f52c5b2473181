//! Property tests for the codec and for topic and filter rules.
//!
//! Covers: (a) every frame type survives encode then decode unchanged, alone, concatenated and
//! split at arbitrary points; (b) the decoder never panics on arbitrary bytes or on mutated valid
//! frames, never consumes bytes when it asks for more, and re-encodes every frame it accepts to the
//! bytes it came from; (c) topic and filter validation agree with an independent rewrite of the
//! rules, and `Filter::matches` agrees with a naive recursive matcher. Fixed examples live in
//! `vectors.rs`; this file does not test the broker's trie (brokerd-core does).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use brokerd_proto::topic::{validate_filter, validate_topic};
use brokerd_proto::{
    Body, BodyBuilder, Credentials, DecodeError, ErrorFrame, Filter, Frame, Headers, Hello, Lost,
    Msg, OverflowPolicy, Publish, Subscribe, Topic, TopicLimits, Unsubscribe, Welcome, decode,
    encode_msg_header, encode_pub,
};
use bytes::BytesMut;
use proptest::prelude::*;

/// Larger than any frame generated here, small enough that a hostile length prefix cannot make
/// the decoder reserve much memory.
const MAX_FRAME: usize = 1 << 16;

// ---------------------------------------------------------------------------------------------
// Strategies
// ---------------------------------------------------------------------------------------------

/// Any Unicode text, kept far below the `str16` limit of 65535 bytes.
fn text() -> impl Strategy<Value = String> {
    prop::collection::vec(any::<char>(), 0..24).prop_map(|cs| cs.into_iter().collect())
}

fn headers() -> impl Strategy<Value = Option<Vec<(String, String)>>> {
    prop::option::of(prop::collection::vec((text(), text()), 0..5))
}

fn payload() -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(any::<u8>(), 0..96)
}

/// The fields of a body, kept so tests can compare them with what the accessors return.
#[derive(Debug, Clone)]
struct BodyFields {
    topic: String,
    reply: Option<String>,
    headers: Option<Vec<(String, String)>>,
    payload: Vec<u8>,
}

impl BodyFields {
    fn headers(&self) -> Option<Headers> {
        self.headers
            .as_ref()
            .map(|h| h.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect())
    }

    fn body(&self) -> Body {
        let raw = Body::encode(
            &self.topic,
            self.reply.as_deref(),
            self.headers().as_ref(),
            &self.payload,
        );
        Body::parse(raw).unwrap()
    }
}

fn body_fields() -> impl Strategy<Value = BodyFields> {
    (text(), prop::option::of(text()), headers(), payload()).prop_map(
        |(topic, reply, headers, payload)| BodyFields {
            topic,
            reply,
            headers,
            payload,
        },
    )
}

fn policy() -> impl Strategy<Value = OverflowPolicy> {
    prop_oneof![
        Just(OverflowPolicy::DropNew),
        Just(OverflowPolicy::DropOld),
        Just(OverflowPolicy::Disconnect),
    ]
}

/// No credentials, a token, or a user and password.
fn credentials() -> impl Strategy<Value = Option<Credentials>> {
    prop_oneof![
        Just(None),
        text().prop_map(|t| Some(Credentials::Token(t))),
        (text(), text())
            .prop_map(|(user, password)| Some(Credentials::Password { user, password })),
    ]
}

/// A frame of any of the twelve types, with arbitrary field values.
fn frame() -> impl Strategy<Value = Frame> {
    prop_oneof![
        (
            any::<u32>(),
            any::<u16>(),
            any::<bool>(),
            prop::option::of(policy()),
            text(),
            credentials()
        )
            .prop_map(|(req_id, version, no_echo, overflow, name, credentials)| {
                Frame::Hello(Hello {
                    req_id,
                    version,
                    no_echo,
                    overflow,
                    name,
                    credentials,
                })
            }),
        (any::<u32>(), any::<bool>(), body_fields()).prop_map(|(req_id, ack, b)| {
            Frame::Pub(Publish {
                req_id,
                ack,
                body: b.body(),
            })
        }),
        (
            any::<u32>(),
            any::<u32>(),
            text(),
            proptest::option::of(text())
        )
            .prop_map(|(req_id, sid, filter, queue)| {
                Frame::Sub(Subscribe {
                    req_id,
                    sid,
                    filter,
                    queue,
                    stream: None,
                })
            }),
        (any::<u32>(), any::<u32>(), any::<u32>())
            .prop_map(|(req_id, sid, max)| Frame::Unsub(Unsubscribe { req_id, sid, max })),
        any::<u32>().prop_map(Frame::Ping),
        any::<u32>().prop_map(Frame::Pong),
        (
            (
                any::<u32>(),
                any::<u16>(),
                policy(),
                any::<u32>(),
                any::<u32>()
            ),
            (
                any::<u16>(),
                any::<u16>(),
                any::<u32>(),
                any::<u32>(),
                any::<u32>(),
                text()
            ),
        )
            .prop_map(|(a, b)| {
                Frame::Welcome(Welcome {
                    req_id: a.0,
                    version: a.1,
                    overflow: a.2,
                    max_frame: a.3,
                    max_payload: a.4,
                    max_topic_len: b.0,
                    max_topic_tokens: b.1,
                    max_subs: b.2,
                    max_pending_msgs: b.3,
                    max_pending_bytes: b.4,
                    server_id: b.5,
                })
            }),
        any::<u32>().prop_map(Frame::Ok),
        (any::<u32>(), any::<u32>())
            .prop_map(|(req_id, delivered)| Frame::Ack { req_id, delivered }),
        (any::<u32>(), any::<u16>(), text()).prop_map(|(req_id, code, message)| {
            Frame::Err(ErrorFrame {
                req_id,
                code,
                message,
            })
        }),
        (any::<u32>(), any::<u64>(), body_fields()).prop_map(|(sid, seq, b)| {
            Frame::Msg(Msg {
                sid,
                seq,
                body: b.body(),
            })
        }),
        (any::<u32>(), any::<u64>()).prop_map(|(sid, missed)| Frame::Lost(Lost { sid, missed })),
    ]
}

/// A change to a valid frame's bytes.
#[derive(Debug, Clone)]
enum Mutation {
    /// Flip one bit; the index is reduced modulo the length.
    FlipBit(usize, u8),
    /// Keep only the first `n` bytes (modulo length + 1).
    Truncate(usize),
    /// Overwrite the length prefix.
    SetLength(u32),
    /// Add a small signed delta to the length prefix.
    NudgeLength(i8),
    /// Overwrite one byte.
    SetByte(usize, u8),
    /// Insert one byte.
    Insert(usize, u8),
    /// Remove one byte.
    Remove(usize),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<usize>(), 0u8..8).prop_map(|(i, b)| Mutation::FlipBit(i, b)),
        any::<usize>().prop_map(Mutation::Truncate),
        any::<u32>().prop_map(Mutation::SetLength),
        any::<i8>().prop_map(Mutation::NudgeLength),
        (any::<usize>(), any::<u8>()).prop_map(|(i, b)| Mutation::SetByte(i, b)),
        (any::<usize>(), any::<u8>()).prop_map(|(i, b)| Mutation::Insert(i, b)),
        any::<usize>().prop_map(Mutation::Remove),
    ]
}

fn apply(bytes: &mut Vec<u8>, m: &Mutation) {
    let len = bytes.len();
    match *m {
        Mutation::FlipBit(i, b) if len > 0 => bytes[i % len] ^= 1 << b,
        Mutation::Truncate(n) => bytes.truncate(n % (len + 1)),
        Mutation::SetLength(v) if len >= 4 => bytes[..4].copy_from_slice(&v.to_be_bytes()),
        Mutation::NudgeLength(d) if len >= 4 => {
            let v = u32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
            bytes[..4].copy_from_slice(&v.wrapping_add_signed(i32::from(d)).to_be_bytes());
        }
        Mutation::SetByte(i, b) if len > 0 => bytes[i % len] = b,
        Mutation::Insert(i, b) => bytes.insert(i % (len + 1), b),
        Mutation::Remove(i) if len > 0 => {
            bytes.remove(i % len);
        }
        _ => {}
    }
}

// ---------------------------------------------------------------------------------------------
// Decoder harness
// ---------------------------------------------------------------------------------------------

/// Decodes `bytes` until the decoder asks for more or fails, checking at every step the
/// contract any input must respect. Returns the frames decoded and the final error, if any.
fn decode_all(bytes: &[u8], max_frame: usize) -> (Vec<Frame>, Option<DecodeError>) {
    let mut buf = BytesMut::from(bytes);
    let mut frames = Vec::new();
    loop {
        let before = buf.clone();
        match decode(&mut buf, max_frame) {
            Ok(None) => {
                assert_eq!(buf, before, "Ok(None) must leave the buffer untouched");
                return (frames, None);
            }
            Ok(Some(f)) => {
                let consumed = before.len() - buf.len();
                assert!(consumed > 4, "a frame is at least a prefix and a type byte");
                let announced = u32::from_be_bytes([before[0], before[1], before[2], before[3]]);
                assert_eq!(consumed, 4 + announced as usize);
                assert!(announced as usize <= max_frame);
                assert_eq!(&buf[..], &before[consumed..], "only the frame is taken");
                // The codec is canonical: whatever it accepts, it writes back the same way.
                assert_eq!(&f.to_bytes()[..], &before[..consumed], "re-encoding {f:?}");
                frames.push(f);
            }
            Err(e) => {
                assert!(
                    e.code().closes_connection(),
                    "a decode error must close: {e}"
                );
                return (frames, Some(e));
            }
        }
    }
}

/// Input for the shortcut readers: with `shaped`, one frame of that type whose fields are `noise`
/// (mostly malformed); otherwise `prefix`, valid frames, then `noise`. Never empty.
fn candidate(shaped: Option<u8>, prefix: &[u8], frames: &[Frame], noise: &[u8]) -> Vec<u8> {
    let mut b = match shaped {
        Some(ty) => {
            let mut b = ((noise.len() + 1) as u32).to_be_bytes().to_vec();
            b.push(ty);
            b
        }
        None => {
            let mut b = prefix.to_vec();
            b.extend_from_slice(&encode_all(frames));
            b
        }
    };
    b.extend_from_slice(noise);
    if b.is_empty() {
        b.push(0);
    }
    b
}

fn encode_all(frames: &[Frame]) -> BytesMut {
    let mut buf = BytesMut::new();
    for f in frames {
        f.encode(&mut buf);
    }
    buf
}

// ---------------------------------------------------------------------------------------------
// Independent rewrite of the topic rules
// ---------------------------------------------------------------------------------------------

/// The characters with the Unicode `White_Space` property, which no token may contain.
const WHITE_SPACE: &[char] = &[
    '\u{0009}', '\u{000A}', '\u{000B}', '\u{000C}', '\u{000D}', '\u{0020}', '\u{0085}', '\u{00A0}',
    '\u{1680}', '\u{2000}', '\u{2001}', '\u{2002}', '\u{2003}', '\u{2004}', '\u{2005}', '\u{2006}',
    '\u{2007}', '\u{2008}', '\u{2009}', '\u{200A}', '\u{2028}', '\u{2029}', '\u{202F}', '\u{205F}',
    '\u{3000}',
];

fn naive_valid(s: &str, limits: &TopicLimits, filter: bool) -> bool {
    if s.is_empty() || s.len() > limits.max_len {
        return false;
    }
    let tokens: Vec<&str> = s.split('.').collect();
    if tokens.len() > limits.max_tokens {
        return false;
    }
    let last = tokens.len() - 1;
    tokens.iter().enumerate().all(|(i, t)| match *t {
        "" => false,
        "*" if filter => true,
        ">" if filter => i == last,
        t => !t
            .chars()
            .any(|c| c == '*' || c == '>' || WHITE_SPACE.contains(&c)),
    })
}

/// `filter` matches `topic`, token lists both non-empty and valid.
fn naive_match(filter: &[&str], topic: &[&str]) -> bool {
    match (filter.split_first(), topic.split_first()) {
        (None, None) => true,
        (Some((&">", _)), Some(_)) => true,
        (Some((&"*", f)), Some((_, t))) => naive_match(f, t),
        (Some((a, f)), Some((b, t))) => a == b && naive_match(f, t),
        _ => false,
    }
}

/// Short strings over an alphabet that hits every rule: separators, wildcards, whitespace,
/// the reserved prefix and multi-byte characters.
fn topicish() -> impl Strategy<Value = String> {
    let alphabet = prop_oneof![
        4 => Just('a'),
        2 => Just('b'),
        4 => Just('.'),
        2 => Just('*'),
        2 => Just('>'),
        1 => Just('$'),
        1 => Just(' '),
        1 => Just('\t'),
        1 => Just('\u{a0}'),
        1 => Just('\u{2028}'),
        1 => Just('ü'),
        1 => Just('\u{1F600}'),
        1 => any::<char>(),
    ];
    prop::collection::vec(alphabet, 0..16).prop_map(|cs| cs.into_iter().collect())
}

fn limits() -> impl Strategy<Value = TopicLimits> {
    prop_oneof![
        Just(TopicLimits::WIRE),
        (0usize..24, 0usize..8).prop_map(|(max_len, max_tokens)| TopicLimits {
            max_len,
            max_tokens
        }),
    ]
}

fn tokens(
    alphabet: &'static [&'static str],
    n: std::ops::Range<usize>,
) -> impl Strategy<Value = Vec<&'static str>> {
    prop::collection::vec(prop::sample::select(alphabet), n)
}

// ---------------------------------------------------------------------------------------------
// Properties
// ---------------------------------------------------------------------------------------------

// 256 cases each by default; set PROPTEST_CASES for a longer run.
proptest! {
    #[test]
    fn frame_round_trips(f in frame()) {
        let mut buf = BytesMut::new();
        f.encode(&mut buf);
        prop_assert_eq!(decode(&mut buf, MAX_FRAME), Ok(Some(f)));
        prop_assert!(buf.is_empty());
    }

    #[test]
    fn body_accessors_return_what_was_encoded(b in body_fields()) {
        let body = b.body();
        prop_assert_eq!(body.topic(), b.topic.as_str());
        prop_assert_eq!(body.topic_bytes(), b.topic.as_bytes());
        prop_assert_eq!(body.reply(), b.reply.as_deref());
        prop_assert_eq!(body.has_headers(), b.headers.is_some());
        prop_assert_eq!(body.headers_owned(), b.headers().unwrap_or_default());
        prop_assert_eq!(&body.payload()[..], &b.payload[..]);
        prop_assert_eq!(body.payload_len(), b.payload.len());
        let headers = b.headers();
        let builder = BodyBuilder {
            topic: &b.topic,
            reply: b.reply.as_deref(),
            headers: headers.as_ref(),
            payload: &b.payload,
        };
        prop_assert!(builder.fits());
        prop_assert_eq!(builder.len(), body.len());
    }

    #[test]
    fn borrowed_encoders_agree_with_frame_encode(
        req_id in any::<u32>(),
        ack in any::<bool>(),
        sid in any::<u32>(),
        seq in any::<u64>(),
        b in body_fields(),
    ) {
        let headers = b.headers();
        let builder = BodyBuilder {
            topic: &b.topic,
            reply: b.reply.as_deref(),
            headers: headers.as_ref(),
            payload: &b.payload,
        };
        let mut out = BytesMut::new();
        encode_pub(&mut out, req_id, ack, &builder);
        let full = Frame::Pub(Publish { req_id, ack, body: b.body() }).to_bytes();
        prop_assert_eq!(&out[..], &full[..]);

        let body = b.body();
        let mut msg = encode_msg_header(sid, seq, body.len()).to_vec();
        msg.extend_from_slice(body.raw());
        let full = Frame::Msg(Msg { sid, seq, body }).to_bytes();
        prop_assert_eq!(&msg[..], &full[..]);
    }

    #[test]
    fn concatenated_frames_decode_in_order(frames in prop::collection::vec(frame(), 1..8)) {
        let buf = encode_all(&frames);
        let (decoded, err) = decode_all(&buf, MAX_FRAME);
        prop_assert_eq!(err, None);
        prop_assert_eq!(decoded, frames);
    }

    #[test]
    fn frames_split_at_any_points_decode_the_same(
        frames in prop::collection::vec(frame(), 1..6),
        cuts in prop::collection::vec(any::<usize>(), 0..8),
    ) {
        let bytes = encode_all(&frames);
        let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c % (bytes.len() + 1)).collect();
        cuts.push(bytes.len());
        cuts.sort_unstable();
        let mut buf = BytesMut::new();
        let mut decoded = Vec::new();
        let mut fed = 0;
        for cut in cuts {
            buf.extend_from_slice(&bytes[fed..cut]);
            fed = cut;
            while let Some(f) = decode(&mut buf, MAX_FRAME).unwrap() {
                decoded.push(f);
            }
        }
        prop_assert!(buf.is_empty());
        prop_assert_eq!(decoded, frames);
    }

    /// The borrowed `PUB` reader agrees with `decode` on every input: same fields, same length,
    /// same error; and it declines (None) exactly when `decode` would not produce a `PUB`.
    #[test]
    fn peek_pub_agrees_with_decode(
        prefix in prop::collection::vec(any::<u8>(), 0..4),
        frames in prop::collection::vec(frame(), 0..2),
        noise in prop::collection::vec(any::<u8>(), 0..48),
        pub_shaped in any::<bool>(),
        max_frame in 0usize..4096,
    ) {
        let bytes = candidate(pub_shaped.then_some(0x02), &prefix, &frames, &noise);
        let peeked = brokerd_proto::peek_pub(&bytes, max_frame)
            .map(|r| r.map(|(p, n)| (p.req_id, p.ack, p.body.raw().to_vec(), p.body.topic().to_string(), p.body.reply().map(str::to_string), p.body.payload_len(), n)));
        let mut buf = BytesMut::from(&bytes[..]);
        let before = buf.len();
        let decoded = decode(&mut buf, max_frame);
        match (peeked, decoded) {
            (Some(Ok((req_id, ack, raw, topic, reply, payload_len, n))), Ok(Some(Frame::Pub(p)))) => {
                prop_assert_eq!((req_id, ack), (p.req_id, p.ack));
                prop_assert_eq!(&raw[..], &p.body.raw()[..]);
                prop_assert_eq!(topic.as_str(), p.body.topic());
                prop_assert_eq!(reply.as_deref(), p.body.reply());
                prop_assert_eq!(payload_len, p.body.payload_len());
                prop_assert_eq!(n, before - buf.len());
            }
            (Some(Err(e)), Err(d)) => prop_assert_eq!(e, d),
            (None, Ok(Some(Frame::Pub(_)))) => prop_assert!(false, "peek_pub declined a PUB decode accepted"),
            (None, _) => {}
            (p, d) => prop_assert!(false, "peek_pub {:?} but decode {:?}", p, d),
        }
    }

    /// The `MSG` reader agrees with `decode` on every input: same fields and bytes consumed when
    /// it takes a frame, same error, and it declines (leaving the buffer as it was) exactly when
    /// `decode` would not produce a `MSG`.
    #[test]
    fn take_msg_agrees_with_decode(
        frames in prop::collection::vec(frame(), 0..2),
        noise in prop::collection::vec(any::<u8>(), 0..48),
        msg_shaped in any::<bool>(),
        max_frame in 0usize..4096,
    ) {
        let bytes = candidate(msg_shaped.then_some(0x85), &[], &frames, &noise);
        let mut taken = BytesMut::from(&bytes[..]);
        let took = brokerd_proto::take_msg(&mut taken, max_frame);
        let mut buf = BytesMut::from(&bytes[..]);
        let decoded = decode(&mut buf, max_frame);
        match (took, decoded) {
            (Some(Ok((sid, seq, body))), Ok(Some(Frame::Msg(m)))) => {
                prop_assert_eq!((sid, seq), (m.sid, m.seq));
                prop_assert_eq!(body, m.body);
                prop_assert_eq!(taken.len(), buf.len());
            }
            (Some(Err(e)), Err(d)) => prop_assert_eq!(e, d),
            (None, Ok(Some(Frame::Msg(_)))) => prop_assert!(false, "take_msg declined a MSG decode accepted"),
            (None, _) => prop_assert_eq!(&taken[..], &bytes[..]),
            (t, d) => prop_assert!(false, "take_msg {:?} but decode {:?}", t.map(|r| r.map(|(s, q, _)| (s, q))), d),
        }
    }

    /// The plain-body shortcut (body flags 0) agrees with `decode` for any topic bytes, valid
    /// UTF-8 or not, and any declared topic length, fitting the frame or not.
    #[test]
    fn peek_pub_plain_body_agrees_with_decode(
        topic in prop::collection::vec(any::<u8>(), 0..12),
        declared_extra in -3i32..4,
        payload in prop::collection::vec(any::<u8>(), 0..8),
    ) {
        let declared = (topic.len() as i32 + declared_extra).max(0) as u16;
        let mut body = vec![0u8];
        body.extend_from_slice(&declared.to_be_bytes());
        body.extend_from_slice(&topic);
        body.extend_from_slice(&payload);
        let mut bytes = ((body.len() + 6) as u32).to_be_bytes().to_vec();
        bytes.extend_from_slice(&[0x02, 0, 0, 0, 9, 0]);
        bytes.extend_from_slice(&body);
        let peeked = brokerd_proto::peek_pub(&bytes, 4096)
            .map(|r| r.map(|(p, n)| (p.body.topic_bytes().to_vec(), p.body.payload_len(), n)));
        let mut buf = BytesMut::from(&bytes[..]);
        match (peeked, decode(&mut buf, 4096)) {
            (Some(Ok((t, payload_len, n))), Ok(Some(Frame::Pub(p)))) => {
                prop_assert_eq!(&t[..], p.body.topic().as_bytes());
                prop_assert_eq!(payload_len, p.body.payload_len());
                prop_assert_eq!(n, bytes.len());
            }
            (Some(Err(e)), Err(d)) => prop_assert_eq!(e, d),
            (p, d) => prop_assert!(false, "peek_pub {:?} but decode {:?}", p, d),
        }
    }

    #[test]
    fn decoder_survives_arbitrary_bytes(
        bytes in prop::collection::vec(any::<u8>(), 0..256),
        max_frame in 0usize..512,
    ) {
        decode_all(&bytes, max_frame);
    }

    #[test]
    fn decoder_survives_arbitrary_frame_shaped_bytes(
        ty in prop_oneof![
            prop::sample::select(&[0x01u8, 0x02, 0x03, 0x04, 0x05, 0x06,
                                   0x81, 0x82, 0x83, 0x84, 0x85, 0x86][..]),
            any::<u8>(),
        ],
        fields in prop::collection::vec(any::<u8>(), 0..64),
    ) {
        // A correct length prefix and type byte, so the field parsers see the random bytes.
        let mut bytes = ((fields.len() + 1) as u32).to_be_bytes().to_vec();
        bytes.push(ty);
        bytes.extend_from_slice(&fields);
        decode_all(&bytes, MAX_FRAME);
    }

    #[test]
    fn decoder_survives_mutated_frames(
        frames in prop::collection::vec(frame(), 1..4),
        mutations in prop::collection::vec(mutation(), 1..4),
    ) {
        let mut bytes = encode_all(&frames).to_vec();
        for m in &mutations {
            apply(&mut bytes, m);
        }
        decode_all(&bytes, MAX_FRAME);
    }

    #[test]
    fn topic_rules_agree_with_naive_rules(s in topicish(), limits in limits()) {
        let topic = naive_valid(&s, &limits, false);
        let filter = naive_valid(&s, &limits, true);
        prop_assert_eq!(validate_topic(&s, &limits).is_ok(), topic);
        prop_assert_eq!(Topic::with_limits(&s, &limits).is_ok(), topic);
        prop_assert_eq!(validate_filter(&s, &limits).is_ok(), filter);
        prop_assert_eq!(Filter::with_limits(&s, &limits).is_ok(), filter);
        if let Ok(t) = Topic::with_limits(&s, &limits) {
            prop_assert_eq!(t.as_str(), s.as_str());
            prop_assert!(t.tokens().eq(s.split('.')));
            // Every topic is also a filter, and matches itself.
            let f = Filter::with_limits(&s, &limits).unwrap();
            prop_assert!(f.matches(t.as_str()));
        }
    }

    #[test]
    fn matcher_agrees_with_naive_matcher(
        f in tokens(&["a", "b", "c", "$s", "*"], 1..6),
        tail in any::<bool>(),
        t in tokens(&["a", "b", "c", "$s"], 1..7),
    ) {
        let mut f = f;
        if tail {
            f.push(">");
        }
        let filter = Filter::new(&f.join(".")).unwrap();
        let topic = Topic::new(&t.join(".")).unwrap();
        prop_assert_eq!(filter.matches(topic.as_str()), naive_match(&f, &t));
        // `>` alone matches every topic, and `*` repeated to the topic's length does too.
        prop_assert!(Filter::new(">").unwrap().matches(topic.as_str()));
        let stars = vec!["*"; t.len()].join(".");
        prop_assert!(Filter::new(&stars).unwrap().matches(topic.as_str()));
    }
}

/// Which characters may appear inside a topic token: all but `*`, `>` and Unicode `White_Space`
/// (`.` separates tokens), checked over every `char` so `docs/protocol.md` can name the exact set.
#[test]
fn token_characters_are_exactly_the_documented_set() {
    for c in (0..=u32::from(char::MAX)).filter_map(char::from_u32) {
        if c == '.' {
            continue;
        }
        let s = format!("a{c}b");
        let expected = !(c == '*' || c == '>' || WHITE_SPACE.contains(&c));
        assert_eq!(Topic::new(&s).is_ok(), expected, "U+{:04X}", u32::from(c));
    }
}

/// The worked examples of `docs/protocol.md`'s filter table.
#[test]
fn documented_filter_examples() {
    let topics = [
        "user.created",
        "user.updated",
        "api.error",
        "db.error",
        "system.startup",
    ];
    let table: [(&str, [bool; 5]); 5] = [
        ("user.>", [true, true, false, false, false]),
        ("user.*", [true, true, false, false, false]),
        ("*.error", [false, false, true, true, false]),
        (">", [true, true, true, true, true]),
        ("user.created", [true, false, false, false, false]),
    ];
    for (filter, expect) in table {
        let f = Filter::new(filter).unwrap();
        for (topic, want) in topics.iter().zip(expect) {
            assert_eq!(f.matches(topic), want, "{filter} vs {topic}");
        }
    }
    for (filter, topic, want) in [
        ("user.>", "user", false),
        ("user.>", "user.created.eu", true),
        ("user.*", "user.created.eu", false),
        ("*.error", "api.db.error", false),
        ("*.*.error", "api.db.error", true),
    ] {
        assert_eq!(
            Filter::new(filter).unwrap().matches(topic),
            want,
            "{filter} vs {topic}"
        );
    }
}
