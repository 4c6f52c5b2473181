//! Fuzz target: `brokerd_proto::decode` on arbitrary bytes.
//!
//! Feeds the input to the decoder in a loop, as a connection's read buffer would, until it asks
//! for more bytes or fails. Beyond "never panics" it checks the decoder's contract: `Ok(None)`
//! consumes nothing, a frame consumes exactly its length prefix plus length, and every accepted
//! frame re-encodes to the bytes it came from. `PUB` and `MSG` bodies go through every accessor,
//! and their topics through topic and filter validation, since the server calls those next.
//! It does not open sockets or drive the server.

#![no_main]

use brokerd_proto::{Body, Filter, Frame, Topic, decode};
use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;

/// The default maximum frame size, so length prefixes near it are reachable.
const MAX_FRAME: usize = 1_114_112;

fuzz_target!(|data: &[u8]| {
    let mut buf = BytesMut::from(data);
    loop {
        let before = buf.len();
        // Only the bytes the next frame can occupy are kept, to compare with its re-encoding.
        let announced = buf
            .get(..4)
            .map(|p| 4 + u32::from_be_bytes([p[0], p[1], p[2], p[3]]) as usize);
        let frame_bytes = buf[..announced.unwrap_or(0).min(before)].to_vec();
        match decode(&mut buf, MAX_FRAME) {
            Ok(Some(frame)) => {
                assert_eq!(
                    Some(before - buf.len()),
                    announced,
                    "consumed != prefix + length"
                );
                assert_eq!(&frame.to_bytes()[..], &frame_bytes[..], "not canonical");
                exercise_frame(&frame);
            }
            Ok(None) => {
                assert_eq!(buf.len(), before, "Ok(None) consumed bytes");
                assert_eq!(&buf[..frame_bytes.len()], &frame_bytes[..]);
                break;
            }
            Err(e) => {
                assert!(e.code().closes_connection());
                let _ = e.to_string();
                break;
            }
        }
    }
});

fn exercise_frame(frame: &Frame) {
    let _ = format!("{frame:?}");
    match frame {
        Frame::Pub(p) => exercise_body(&p.body),
        Frame::Msg(m) => exercise_body(&m.body),
        Frame::Err(e) => {
            let _ = e.error_code().map(|c| (c.name(), c.closes_connection()));
        }
        Frame::Sub(s) => {
            if let Ok(f) = Filter::new(&s.filter) {
                let _ = f.matches(&s.filter);
            }
        }
        _ => {}
    }
}

fn exercise_body(body: &Body) {
    let topic = body.topic();
    assert_eq!(topic.as_bytes(), body.topic_bytes());
    let _ = body.reply();
    let headers = body.headers_owned();
    assert_eq!(headers.len(), body.headers().count());
    assert!(body.has_headers() || headers.is_empty());
    assert_eq!(body.payload().len(), body.payload_len());
    assert!(body.payload_len() < body.len());
    assert!(!body.is_empty());
    assert_eq!(Body::parse(body.raw().clone()).as_ref(), Ok(body));
    let _ = format!("{body:?}");
    if let Ok(t) = Topic::new(topic) {
        let _ = t.tokens().count();
        let _ = Filter::new(">").map(|f| f.matches(t.as_str()));
    }
    if let Ok(f) = Filter::new(topic) {
        let _ = f.matches(topic);
    }
}
