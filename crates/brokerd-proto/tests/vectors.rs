//! Checks `docs/protocol-vectors.txt` against the codec, in both directions.
//!
//! Each named vector in the file must decode to exactly the [`Frame`] this file expects under that
//! name, and encoding that frame must give exactly the vector's bytes. A vector with no expected
//! frame here, or an expected frame with no vector in the file, fails the test, so the file and the
//! code cannot drift apart. Every frame type and every [`ErrorCode`] must have a vector, and
//! `fuzz/corpus/decode/` must hold each vector's bytes under its name. It also checks that the
//! ERR code table and the filter table of `docs/protocol.md` agree with [`ErrorCode`] and
//! [`Filter::matches`]. Codec properties live in `properties.rs`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use brokerd_proto::body::BodyBuilder;
use brokerd_proto::{
    AckKind, Body, ConsumerSpec, Credentials, ErrorCode, ErrorFrame, Filter, Frame, FrameType,
    Headers, Hello, Lost, MSG_HEADER_LEN, Mack, Msg, OverflowPolicy, Publish, StartPosition,
    Stored, StreamStart, Subscribe, Unsubscribe, Welcome, decode, encode_msg_header, encode_pub,
};
use bytes::BytesMut;
use std::collections::BTreeMap;

const VECTORS_PATH: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../docs/protocol-vectors.txt"
);

const PROTOCOL_PATH: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/protocol.md");

/// The fuzz target's seed corpus, which holds each vector under its name.
const CORPUS_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../fuzz/corpus/decode");

/// The default maximum frame size announced in `WELCOME`.
const MAX_FRAME: usize = 1_114_112;

/// Bytes before a `PUB` frame's body: length, type, request id, flags.
const PUB_HEADER_LEN: usize = 4 + 1 + 4 + 1;

fn body(
    topic: &str,
    reply: Option<&str>,
    headers: Option<&[(&str, &str)]>,
    payload: &[u8],
) -> Body {
    let headers: Option<Headers> = headers.map(|h| h.iter().copied().collect());
    Body::parse(Body::encode(topic, reply, headers.as_ref(), payload)).unwrap()
}

fn plain_body() -> Body {
    body("user.created", None, None, b"hi")
}

fn full_body() -> Body {
    body(
        "api.error",
        Some("_INBOX.42"),
        Some(&[("content-type", "text/plain"), ("trace", "7")]),
        b"boom",
    )
}

/// The `ERR` vectors, one per code, each named `err_` and the code's name: code, request id and
/// message. Those whose code closes the connection carry request id 0, except the second
/// `HELLO`'s `ERR 9`, as the server sends them.
const ERR_VECTORS: [(ErrorCode, u32, &str); 25] = [
    (ErrorCode::UnsupportedVersion, 0, "version 2"),
    (ErrorCode::MalformedFrame, 0, "trailing bytes"),
    (ErrorCode::UnknownFrameType, 0, "type 0x7f"),
    (ErrorCode::FrameTooLarge, 0, "frame too large"),
    (ErrorCode::PayloadTooLarge, 11, "payload too large"),
    (ErrorCode::InvalidTopic, 12, "bad topic"),
    (ErrorCode::InvalidFilter, 7, "bad filter"),
    (ErrorCode::HandshakeRequired, 0, "hello first"),
    (ErrorCode::DuplicateHandshake, 5, "hello twice"),
    (ErrorCode::DuplicateSubscription, 14, "sid in use"),
    (ErrorCode::UnknownSubscription, 15, "no such sid"),
    (ErrorCode::TooManySubscriptions, 16, "too many subs"),
    (ErrorCode::SlowConsumer, 0, "slow consumer"),
    (ErrorCode::TooManyConnections, 0, "server full"),
    (ErrorCode::HandshakeTimeout, 0, "no hello"),
    (ErrorCode::ShuttingDown, 0, "shutting down"),
    (ErrorCode::KeepaliveTimeout, 0, "no pong"),
    (ErrorCode::ReservedTopic, 17, "reserved topic"),
    (ErrorCode::InvalidOption, 0, "bad option"),
    (ErrorCode::AuthenticationFailed, 0, ""),
    (ErrorCode::PermissionDenied, 18, "not permitted"),
    (ErrorCode::NoSuchStream, 19, "no stream"),
    (ErrorCode::StoreFailed, 20, "disk full"),
    (ErrorCode::StreamBusy, 21, "busy"),
    (ErrorCode::InvalidStart, 22, "no topic index"),
];

/// The frame each vector must decode to, keyed by the vector's name.
fn expected() -> Vec<(String, Frame)> {
    let errs = ERR_VECTORS.iter().map(|&(code, req_id, message)| {
        let frame = Frame::Err(ErrorFrame {
            req_id,
            code: code as u16,
            message: message.into(),
        });
        (format!("err_{}", code.name().replace('-', "_")), frame)
    });
    let mut all: Vec<(String, Frame)> = [
        (
            "hello_default_policy",
            Frame::Hello(Hello {
                req_id: 1,
                version: 1,
                no_echo: false,
                overflow: None,
                name: "demo".into(),
                credentials: None,
            }),
        ),
        (
            "hello_no_echo_drop_old",
            Frame::Hello(Hello {
                req_id: 1,
                version: 1,
                no_echo: true,
                overflow: Some(OverflowPolicy::DropOld),
                name: "sensor-7".into(),
                credentials: None,
            }),
        ),
        (
            "hello_disconnect_empty_name",
            Frame::Hello(Hello {
                req_id: 1,
                version: 1,
                no_echo: false,
                overflow: Some(OverflowPolicy::Disconnect),
                name: String::new(),
                credentials: None,
            }),
        ),
        (
            "hello_token",
            Frame::Hello(Hello {
                req_id: 1,
                version: 1,
                no_echo: false,
                overflow: None,
                name: "svc".into(),
                credentials: Some(Credentials::Token("s3cret".into())),
            }),
        ),
        (
            "hello_password",
            Frame::Hello(Hello {
                req_id: 1,
                version: 1,
                no_echo: true,
                overflow: Some(OverflowPolicy::DropNew),
                name: String::new(),
                credentials: Some(Credentials::Password {
                    user: "orders".into(),
                    password: "pw".into(),
                }),
            }),
        ),
        (
            "welcome_defaults",
            Frame::Welcome(Welcome {
                req_id: 1,
                version: 1,
                overflow: OverflowPolicy::DropNew,
                max_frame: 1_114_112,
                max_payload: 1_048_576,
                max_topic_len: 256,
                max_topic_tokens: 16,
                max_subs: 65_536,
                max_pending_msgs: 65_536,
                max_pending_bytes: 67_108_864,
                server_id: "brokerd-1".into(),
            }),
        ),
        (
            "pub_plain",
            Frame::Pub(Publish {
                req_id: 2,
                ack: false,
                body: plain_body(),
            }),
        ),
        (
            "pub_ack_reply_headers",
            Frame::Pub(Publish {
                req_id: 3,
                ack: true,
                body: full_body(),
            }),
        ),
        (
            "pub_empty_headers_empty_payload",
            Frame::Pub(Publish {
                req_id: 4,
                ack: true,
                body: body("a", None, Some(&[]), b""),
            }),
        ),
        (
            "pub_unicode_topic_binary_payload",
            Frame::Pub(Publish {
                req_id: 5,
                ack: false,
                body: body("ünï.cødé", None, None, &[0x00, 0xff, 0x0a]),
            }),
        ),
        (
            "sub_tail_wildcard",
            Frame::Sub(Subscribe {
                req_id: 6,
                sid: 1,
                filter: "user.>".into(),
                queue: None,
                stream: None,
            }),
        ),
        (
            "sub_token_wildcard",
            Frame::Sub(Subscribe {
                req_id: 7,
                sid: 2,
                filter: "*.error".into(),
                queue: None,
                stream: None,
            }),
        ),
        (
            "sub_queue_group",
            Frame::Sub(Subscribe {
                req_id: 10,
                sid: 3,
                filter: "jobs.resize".into(),
                queue: Some("workers".into()),
                stream: None,
            }),
        ),
        (
            "sub_stream_all",
            Frame::Sub(Subscribe {
                req_id: 11,
                sid: 4,
                filter: "order.>".into(),
                queue: None,
                stream: Some(StreamStart {
                    stream: "ORDERS".into(),
                    start: StartPosition::All,
                    consumer: None,
                }),
            }),
        ),
        (
            "sub_stream_from_seq",
            Frame::Sub(Subscribe {
                req_id: 12,
                sid: 5,
                filter: ">".into(),
                queue: None,
                stream: Some(StreamStart {
                    stream: "ORDERS".into(),
                    start: StartPosition::FromSeq(1000),
                    consumer: None,
                }),
            }),
        ),
        (
            "sub_consumer",
            Frame::Sub(Subscribe {
                req_id: 13,
                sid: 6,
                filter: "order.>".into(),
                queue: None,
                stream: Some(StreamStart {
                    stream: "ORDERS".into(),
                    start: StartPosition::All,
                    consumer: Some(ConsumerSpec {
                        name: "billing".into(),
                        ack_wait_ms: 30_000,
                        max_deliver: 5,
                        max_in_flight: 1000,
                    }),
                }),
            }),
        ),
        (
            "mack_ack",
            Frame::Mack(Mack {
                sid: 6,
                seq: 42,
                kind: AckKind::Ack,
            }),
        ),
        (
            "mack_nak",
            Frame::Mack(Mack {
                sid: 6,
                seq: 43,
                kind: AckKind::Nak,
            }),
        ),
        (
            "mack_term",
            Frame::Mack(Mack {
                sid: 6,
                seq: 44,
                kind: AckKind::Term,
            }),
        ),
        (
            "unsub_now",
            Frame::Unsub(Unsubscribe {
                req_id: 8,
                sid: 1,
                max: 0,
            }),
        ),
        (
            "unsub_after_10",
            Frame::Unsub(Unsubscribe {
                req_id: 9,
                sid: 2,
                max: 10,
            }),
        ),
        ("ping", Frame::Ping(0x0a0b_0c0d)),
        ("pong", Frame::Pong(0x0a0b_0c0d)),
        ("ok", Frame::Ok(6)),
        (
            "ack",
            Frame::Ack {
                req_id: 3,
                delivered: 2,
            },
        ),
        (
            "msg_plain",
            Frame::Msg(Msg {
                sid: 1,
                seq: 1,
                body: plain_body(),
            }),
        ),
        (
            "msg_reply_headers",
            Frame::Msg(Msg {
                sid: 2,
                seq: 7,
                body: full_body(),
            }),
        ),
        ("lost", Frame::Lost(Lost { sid: 2, missed: 3 })),
        (
            "stored",
            Frame::Stored(Stored {
                req_id: 3,
                delivered: 2,
                seq: 42,
                duplicate: false,
                stream: "ORDERS".into(),
            }),
        ),
        (
            "stored_duplicate",
            Frame::Stored(Stored {
                req_id: 4,
                delivered: 0,
                seq: 42,
                duplicate: true,
                stream: "ORDERS".into(),
            }),
        ),
        (
            "lost_over_u32",
            Frame::Lost(Lost {
                sid: 1,
                missed: 4_294_967_296,
            }),
        ),
    ]
    .into_iter()
    .map(|(name, frame)| (name.to_string(), frame))
    .collect();
    all.extend(errs);
    all
}

/// Parses the vector file into name -> bytes, failing on any malformed or duplicate line.
fn load() -> BTreeMap<String, Vec<u8>> {
    let text = std::fs::read_to_string(VECTORS_PATH)
        .unwrap_or_else(|e| panic!("cannot read {VECTORS_PATH}: {e}"));
    let mut out = BTreeMap::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (name, hex) = line
            .split_once(':')
            .unwrap_or_else(|| panic!("line {}: expected `name: hex`", n + 1));
        let digits: Vec<u8> = hex.bytes().filter(|b| !b.is_ascii_whitespace()).collect();
        assert!(
            digits.len().is_multiple_of(2),
            "line {}: odd number of hex digits",
            n + 1
        );
        let bytes = digits
            .chunks(2)
            .map(|pair| {
                let s = std::str::from_utf8(pair).unwrap();
                assert!(
                    s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')),
                    "line {}: {s:?} is not lowercase hex",
                    n + 1
                );
                u8::from_str_radix(s, 16).unwrap()
            })
            .collect();
        let name = name.trim().to_string();
        assert!(
            out.insert(name.clone(), bytes).is_none(),
            "line {}: duplicate vector {name}",
            n + 1
        );
    }
    out
}

#[test]
fn file_and_code_name_the_same_vectors() {
    let file = load();
    let code: BTreeMap<_, _> = expected().into_iter().collect();
    assert_eq!(code.len(), expected().len(), "duplicate name in expected()");
    let only_file: Vec<_> = file
        .keys()
        .filter(|k| !code.contains_key(k.as_str()))
        .collect();
    let only_code: Vec<_> = code
        .keys()
        .filter(|k| !file.contains_key(k.as_str()))
        .collect();
    assert!(
        only_file.is_empty() && only_code.is_empty(),
        "vectors with no expected frame: {only_file:?}; expected frames with no vector: {only_code:?}"
    );
}

#[test]
fn every_frame_type_and_every_error_code_has_a_vector() {
    let frames: Vec<Frame> = expected().into_iter().map(|(_, f)| f).collect();
    for ty in [
        FrameType::Hello,
        FrameType::Pub,
        FrameType::Sub,
        FrameType::Unsub,
        FrameType::Ping,
        FrameType::Pong,
        FrameType::Welcome,
        FrameType::Ok,
        FrameType::Ack,
        FrameType::Err,
        FrameType::Msg,
        FrameType::Lost,
    ] {
        assert!(
            frames.iter().any(|f| f.frame_type() == ty),
            "no vector for {ty:?}"
        );
    }
    for code in ErrorCode::ALL {
        let errs: Vec<&ErrorFrame> = frames
            .iter()
            .filter_map(|f| match f {
                Frame::Err(e) if e.code == code as u16 => Some(e),
                _ => None,
            })
            .collect();
        assert!(!errs.is_empty(), "no ERR vector for {code}");
        // As the server sends them: a closing ERR names no request, except a second HELLO's.
        for e in errs {
            let names_request = e.req_id != 0;
            let expected = !code.closes_connection() || code == ErrorCode::DuplicateHandshake;
            assert_eq!(names_request, expected, "{code}: req_id {}", e.req_id);
        }
    }
}

#[test]
fn the_fuzz_corpus_holds_every_vector() {
    for (name, bytes) in load() {
        let path = format!("{CORPUS_DIR}/{name}");
        let seed = std::fs::read(&path).unwrap_or_else(|e| panic!("cannot read {path}: {e}"));
        assert_eq!(seed, bytes, "{path} differs from the vector {name}");
    }
}

#[test]
fn every_vector_decodes_and_encodes_exactly() {
    let file = load();
    for (name, frame) in expected() {
        let Some(bytes) = file.get(&name) else {
            continue;
        };
        let mut buf = BytesMut::from(&bytes[..]);
        assert_eq!(
            decode(&mut buf, MAX_FRAME),
            Ok(Some(frame.clone())),
            "decoding {name}"
        );
        assert!(buf.is_empty(), "{name}: bytes left after the frame");
        assert_eq!(&frame.to_bytes()[..], &bytes[..], "encoding {name}");
        for cut in 0..bytes.len() {
            let mut partial = BytesMut::from(&bytes[..cut]);
            assert_eq!(
                decode(&mut partial, MAX_FRAME),
                Ok(None),
                "{name} cut at {cut}"
            );
            assert_eq!(partial.len(), cut, "{name} cut at {cut}: bytes consumed");
        }
    }
}

#[test]
fn borrowed_encoders_match_the_vectors() {
    let file = load();
    for (name, frame) in expected() {
        let Some(bytes) = file.get(&name) else {
            continue;
        };
        match frame {
            Frame::Pub(p) => {
                let headers = p.body.has_headers().then(|| p.body.headers_owned());
                let b = BodyBuilder {
                    topic: p.body.topic(),
                    reply: p.body.reply(),
                    headers: headers.as_ref(),
                    payload: &p.body.payload(),
                };
                let mut out = BytesMut::new();
                encode_pub(&mut out, p.req_id, p.ack, &b);
                assert_eq!(&out[..], &bytes[..], "encode_pub for {name}");
            }
            Frame::Msg(m) => {
                let h = encode_msg_header(m.sid, m.seq, m.body.len());
                assert_eq!(&h[..], &bytes[..MSG_HEADER_LEN], "msg header for {name}");
            }
            _ => {}
        }
    }
}

#[test]
fn msg_carries_the_publishers_body_bytes_unchanged() {
    let file = load();
    for (publ, msg) in [
        ("pub_plain", "msg_plain"),
        ("pub_ack_reply_headers", "msg_reply_headers"),
    ] {
        let (p, m) = (&file[publ], &file[msg]);
        assert_eq!(
            &p[PUB_HEADER_LEN..],
            &m[MSG_HEADER_LEN..],
            "{publ} vs {msg}"
        );
    }
}

/// The cells of the markdown table rows in `docs/protocol.md` whose header row starts with
/// `header`, trimmed and with backticks removed; the header row comes first.
fn doc_table(header: &str) -> Vec<Vec<String>> {
    let text = std::fs::read_to_string(PROTOCOL_PATH)
        .unwrap_or_else(|e| panic!("cannot read {PROTOCOL_PATH}: {e}"));
    let cells = |line: &str| -> Vec<String> {
        line.trim()
            .trim_matches('|')
            .split('|')
            .map(|c| c.trim().replace('`', ""))
            .collect()
    };
    let mut lines = text.lines().skip_while(|l| !l.starts_with(header));
    let head = lines
        .next()
        .unwrap_or_else(|| panic!("no table starting {header:?}"));
    let mut rows = vec![cells(head)];
    rows.extend(lines.skip(1).take_while(|l| l.starts_with('|')).map(cells));
    rows
}

#[test]
fn protocol_md_error_table_matches_error_codes() {
    let rows = doc_table("| Code | Name");
    let rows = &rows[1..];
    assert_eq!(rows.len(), ErrorCode::ALL.len(), "one row per code");
    for (row, code) in rows.iter().zip(ErrorCode::ALL) {
        assert_eq!(row[0], (code as u16).to_string(), "{row:?}");
        assert_eq!(row[1], code.name(), "{row:?}");
        let closes = if code.closes_connection() {
            "yes"
        } else {
            "no"
        };
        assert_eq!(row[2], closes, "{row:?}");
    }
}

#[test]
fn protocol_md_filter_table_matches_the_matcher() {
    let rows = doc_table("| Want");
    let topics = &rows[0][2..];
    assert!(!topics.is_empty());
    for row in &rows[1..] {
        let filter = Filter::new(&row[1]).unwrap();
        for (topic, cell) in topics.iter().zip(&row[2..]) {
            let documented = match cell.as_str() {
                "✓" => true,
                "" => false,
                other => panic!("unexpected cell {other:?}"),
            };
            assert_eq!(filter.matches(topic), documented, "{filter} vs {topic}");
        }
    }
}
