//! Criterion benchmarks of the codec's hot frames: `PUB` (what a publisher sends and the broker
//! decodes) and `MSG` (what the broker writes per delivery and a subscriber decodes), with 16 B
//! and 1 KiB payloads.
//!
//! Decoding is measured over a buffer of [`FRAMES`] back-to-back frames, as a reader finds them
//! after one large socket read; the buffer's setup is outside the measurement. Run with
//! `cargo bench -p brokerd-proto`; the measurement times are short so the suite stays quick.

#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

use brokerd_proto::{BodyBuilder, Frame, encode_msg_header, encode_pub};
use bytes::{BufMut, BytesMut};
use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use std::hint::black_box;
use std::time::Duration;

/// Frames per decode iteration.
const FRAMES: usize = 1000;

/// The payload sizes measured.
const SIZES: [usize; 2] = [16, 1024];

fn body(payload: &[u8]) -> BodyBuilder<'_> {
    BodyBuilder {
        topic: "bench.pubsub",
        reply: None,
        headers: None,
        payload,
    }
}

fn encode(c: &mut Criterion) {
    let mut g = c.benchmark_group("encode");
    g.throughput(Throughput::Elements(1));
    for size in SIZES {
        let payload = vec![0u8; size];
        let body = body(&payload);
        let mut buf = BytesMut::with_capacity(64 * 1024);
        g.bench_function(format!("pub/{size}"), |b| {
            b.iter(|| {
                if buf.len() > 60 * 1024 {
                    buf.clear();
                }
                encode_pub(&mut buf, black_box(7), false, black_box(&body));
            });
        });
        // What the broker's writer does per delivery of a small body: the 17-byte header, then
        // the body copied behind it into the scratch buffer.
        let encoded = {
            let mut b = BytesMut::new();
            body.put(&mut b);
            b.freeze()
        };
        let mut seq = 0u64;
        g.bench_function(format!("msg/{size}"), |b| {
            b.iter(|| {
                if buf.len() > 60 * 1024 {
                    buf.clear();
                }
                seq += 1;
                buf.put_slice(&encode_msg_header(black_box(3), seq, encoded.len()));
                buf.put_slice(black_box(&encoded));
            });
        });
    }
    g.finish();
}

fn decode(c: &mut Criterion) {
    let mut g = c.benchmark_group("decode");
    g.throughput(Throughput::Elements(FRAMES as u64));
    for size in SIZES {
        let payload = vec![0u8; size];
        let body = body(&payload);
        let mut pubs = BytesMut::new();
        let mut msgs = BytesMut::new();
        let encoded = {
            let mut b = BytesMut::new();
            body.put(&mut b);
            b.freeze()
        };
        for i in 0..FRAMES {
            encode_pub(&mut pubs, i as u32, false, &body);
            msgs.put_slice(&encode_msg_header(3, i as u64 + 1, encoded.len()));
            msgs.put_slice(&encoded);
        }
        for (name, frames) in [("pub", &pubs), ("msg", &msgs)] {
            g.bench_function(format!("{name}/{size}"), |b| {
                b.iter_batched_ref(
                    || frames.clone(),
                    |buf| {
                        let mut n = 0;
                        while let Some(frame) = brokerd_proto::decode(buf, usize::MAX).unwrap() {
                            debug_assert!(matches!(frame, Frame::Pub(_) | Frame::Msg(_)));
                            black_box(frame);
                            n += 1;
                        }
                        assert_eq!(n, FRAMES);
                    },
                    BatchSize::SmallInput,
                );
            });
        }
        // What the broker and the client actually run on their hot paths.
        g.bench_function(format!("peek_pub/{size}"), |b| {
            b.iter(|| {
                let buf: &[u8] = black_box(&pubs);
                let (mut at, mut n) = (0, 0);
                while let Some(Ok((p, len))) = brokerd_proto::peek_pub(&buf[at..], usize::MAX) {
                    black_box(p.body.topic_bytes());
                    at += len;
                    n += 1;
                }
                assert_eq!(n, FRAMES);
            });
        });
        g.bench_function(format!("take_msg/{size}"), |b| {
            b.iter_batched_ref(
                || msgs.clone(),
                |buf| {
                    let mut n = 0;
                    while let Some(m) = brokerd_proto::take_msg(buf, usize::MAX) {
                        black_box(m.unwrap());
                        n += 1;
                    }
                    assert_eq!(n, FRAMES);
                },
                BatchSize::SmallInput,
            );
        });
    }
    g.finish();
}

fn config() -> Criterion {
    Criterion::default()
        .sample_size(20)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(1))
}

criterion_group! {
    name = benches;
    config = config();
    targets = encode, decode
}
criterion_main!(benches);
