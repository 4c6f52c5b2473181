//! A stand-in broker that stores nothing and answers at once, speaking just enough of either
//! protocol for this tool's own `pub` and `replay`: every acknowledged publish is answered
//! (`STORED`, or a JetStream PubAck), stream requests succeed, and a replay (a brokerd replay
//! `SUB`, a JetStream consumer) gets as many messages as were published since the last stream
//! was added, as fast as the socket takes them. Running the tool against it shows the tool's
//! own ceiling on this machine: if the tool reaches well above a broker's figure here, the tool
//! was not what limited that figure. It follows the tool's conventions (acks on sid 1,
//! deliveries on sid 2 for NATS), not the whole of either protocol.

use std::io::Write;
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::load::{RecvBuf, parse_u64, put_decimal};

/// Publishes taken since the last stream was added; what a replay sends.
static STORED: AtomicU64 = AtomicU64::new(0);
/// The payload size of the last publish; a replay sends payloads of this size.
static LAST_SIZE: AtomicU64 = AtomicU64::new(128);

/// Serves connections on `listen` until `max` has passed.
///
/// # Errors
/// The address could not be bound.
pub fn run(nats: bool, listen: &str, max: Duration) -> Result<String, String> {
    let l = TcpListener::bind(listen).map_err(|e| format!("bind {listen}: {e}"))?;
    l.set_nonblocking(true).map_err(|e| e.to_string())?;
    eprintln!(
        "stream-load sink: {} on {listen} for at most {max:?}",
        if nats { "nats" } else { "brokerd" }
    );
    let until = Instant::now() + max;
    let mut conns = 0u64;
    while Instant::now() < until {
        match l.accept() {
            Ok((s, _)) => {
                conns += 1;
                let _ = s.set_nonblocking(false);
                let _ = s.set_nodelay(true);
                let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
                std::thread::spawn(move || {
                    let r = if nats {
                        serve_nats(s, until)
                    } else {
                        serve_brokerd(s, until)
                    };
                    if let Err(e) = r {
                        eprintln!("stream-load sink: connection: {e}");
                    }
                });
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => return Err(format!("accept: {e}")),
        }
    }
    Ok(format!(
        "{{\"tool\":\"stream-load\",\"mode\":\"sink\",\"connections\":{conns}}}"
    ))
}

fn read_more(s: &mut TcpStream, rb: &mut RecvBuf, until: Instant) -> Result<bool, String> {
    loop {
        match rb.fill(s) {
            Ok(Some(0)) => return Ok(false),
            Ok(Some(_)) => return Ok(true),
            Ok(None) if Instant::now() < until => {}
            Ok(None) => return Ok(false),
            Err(e) => return Err(e.to_string()),
        }
    }
}

fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

fn frame_head(out: &mut Vec<u8>, len: usize, t: u8) {
    out.extend_from_slice(&(len as u32).to_be_bytes());
    out.push(t);
}

fn str16(out: &mut Vec<u8>, s: &[u8]) {
    out.extend_from_slice(&(s.len() as u16).to_be_bytes());
    out.extend_from_slice(s);
}

fn serve_brokerd(mut s: TcpStream, until: Instant) -> Result<(), String> {
    let mut rb = RecvBuf::new(4 << 20);
    let mut out = Vec::with_capacity(1 << 20);
    let mut inbox_sid = 0u32;
    while read_more(&mut s, &mut rb, until)? {
        let buf = rb.data();
        let mut used = 0;
        let mut replay = None;
        while buf.len() - used >= 4 {
            let len = be32(&buf[used..]) as usize;
            if len == 0 || buf.len() - used < 4 + len {
                break;
            }
            let f = &buf[used + 5..used + 4 + len];
            let t = buf[used + 4];
            used += 4 + len;
            match t {
                0x01 => {
                    frame_head(&mut out, 34 + 4, 0x81);
                    out.extend_from_slice(&f[..4]);
                    out.extend_from_slice(&1u16.to_be_bytes());
                    out.push(1);
                    for v in [1_114_112u32, 1 << 20] {
                        out.extend_from_slice(&v.to_be_bytes());
                    }
                    out.extend_from_slice(&256u16.to_be_bytes());
                    out.extend_from_slice(&16u16.to_be_bytes());
                    for v in [65536u32, 65536, 64 << 20] {
                        out.extend_from_slice(&v.to_be_bytes());
                    }
                    str16(&mut out, b"sink");
                }
                0x02 if f.len() >= 8 => {
                    let (req, ack, bflags) = (&f[..4], f[4] & 1 != 0, f[5]);
                    let tlen = u16::from_be_bytes([f[6], f[7]]) as usize;
                    let topic = &f[8..8 + tlen];
                    let mut at = 8 + tlen;
                    let mut reply: &[u8] = &[];
                    if bflags & 1 != 0 {
                        let rl = u16::from_be_bytes([f[at], f[at + 1]]) as usize;
                        reply = &f[at + 2..at + 2 + rl];
                        at += 2 + rl;
                    }
                    if topic.starts_with(b"$SYS.req.stream.") {
                        if topic.ends_with(b".add") {
                            STORED.store(0, Ordering::Relaxed);
                        }
                        let answer = br#"{"stream":{"config":{}},"deleted":true}"#;
                        frame_head(&mut out, 13 + 1 + 2 + reply.len() + answer.len(), 0x85);
                        out.extend_from_slice(&inbox_sid.to_be_bytes());
                        out.extend_from_slice(&1u64.to_be_bytes());
                        out.push(0);
                        str16(&mut out, reply);
                        out.extend_from_slice(answer);
                        if ack {
                            frame_head(&mut out, 9, 0x83);
                            out.extend_from_slice(req);
                            out.extend_from_slice(&1u32.to_be_bytes());
                        }
                    } else {
                        let seq = STORED.fetch_add(1, Ordering::Relaxed) + 1;
                        LAST_SIZE.store((f.len() - at) as u64, Ordering::Relaxed);
                        if ack {
                            frame_head(&mut out, 20 + 4, 0x87);
                            out.extend_from_slice(req);
                            out.extend_from_slice(&0u32.to_be_bytes());
                            out.extend_from_slice(&seq.to_be_bytes());
                            out.push(0);
                            str16(&mut out, b"SINK");
                        }
                    }
                }
                0x03 if f.len() >= 9 => {
                    let sid = be32(&f[4..]);
                    frame_head(&mut out, 5, 0x82);
                    out.extend_from_slice(&f[..4]);
                    if f[8] & 0x02 != 0 {
                        replay = Some(sid);
                    } else {
                        inbox_sid = sid;
                    }
                }
                0x05 if f.len() >= 4 => {
                    frame_head(&mut out, 5, 0x06);
                    out.extend_from_slice(&f[..4]);
                }
                _ => {}
            }
        }
        rb.consume(used);
        s.write_all(&out).map_err(|e| e.to_string())?;
        out.clear();
        if let Some(sid) = replay {
            let n = STORED.load(Ordering::Relaxed);
            let payload = vec![b'x'; LAST_SIZE.load(Ordering::Relaxed) as usize];
            for seq in 1..=n {
                frame_head(&mut out, 13 + 1 + 2 + 11 + payload.len(), 0x85);
                out.extend_from_slice(&sid.to_be_bytes());
                out.extend_from_slice(&seq.to_be_bytes());
                out.push(0);
                str16(&mut out, b"load.sink.x");
                out.extend_from_slice(&payload);
                if out.len() >= 256 * 1024 || seq == n {
                    s.write_all(&out).map_err(|e| e.to_string())?;
                    out.clear();
                }
            }
        }
    }
    Ok(())
}

fn nats_msg(out: &mut Vec<u8>, subject: &[u8], sid: &[u8], reply: Option<&[u8]>, payload: &[u8]) {
    out.extend_from_slice(b"MSG ");
    out.extend_from_slice(subject);
    out.push(b' ');
    out.extend_from_slice(sid);
    if let Some(r) = reply {
        out.push(b' ');
        out.extend_from_slice(r);
    }
    out.push(b' ');
    put_decimal(out, payload.len() as u64);
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(payload);
    out.extend_from_slice(b"\r\n");
}

fn serve_nats(mut s: TcpStream, until: Instant) -> Result<(), String> {
    s.write_all(b"INFO {\"server_id\":\"sink\",\"version\":\"2.9.10\",\"proto\":1,\"headers\":true,\"max_payload\":1048576,\"jetstream\":true}\r\n")
        .map_err(|e| e.to_string())?;
    let mut rb = RecvBuf::new(4 << 20);
    let mut out = Vec::with_capacity(1 << 20);
    while read_more(&mut s, &mut rb, until)? {
        let buf = rb.data();
        let mut used = 0;
        let mut replay: Option<Vec<u8>> = None;
        loop {
            let rest = &buf[used..];
            let Some(eol) = rest.windows(2).position(|w| w == b"\r\n") else {
                break;
            };
            let line = &rest[..eol];
            let toks: Vec<&[u8]> = line
                .split(|&b| b == b' ')
                .filter(|t| !t.is_empty())
                .collect();
            let op = toks.first().copied().unwrap_or(b"");
            if op.eq_ignore_ascii_case(b"PUB") {
                let size = toks.last().and_then(|t| parse_u64(t)).ok_or("bad PUB")? as usize;
                if rest.len() < eol + 2 + size + 2 {
                    break;
                }
                let payload = &rest[eol + 2..eol + 2 + size];
                let subject = toks.get(1).copied().unwrap_or(b"");
                let reply = (toks.len() == 4).then(|| toks[2]);
                used += eol + 2 + size + 2;
                if subject.starts_with(b"$JS.API.") {
                    if subject.starts_with(b"$JS.API.STREAM.CREATE.") {
                        STORED.store(0, Ordering::Relaxed);
                    }
                    if let Some(r) = reply {
                        nats_msg(&mut out, r, b"1", None, br#"{"type":"sink"}"#);
                    }
                    if subject.starts_with(b"$JS.API.CONSUMER.CREATE.") {
                        let text = String::from_utf8_lossy(payload);
                        let key = "\"deliver_subject\":\"";
                        if let Some(i) = text.find(key) {
                            let v = &text[i + key.len()..];
                            replay = Some(v.as_bytes()[..v.find('"').unwrap_or(v.len())].to_vec());
                        }
                    }
                } else if let Some(r) = reply {
                    let seq = STORED.fetch_add(1, Ordering::Relaxed) + 1;
                    LAST_SIZE.store(size as u64, Ordering::Relaxed);
                    let mut ack = b"{\"stream\":\"SINK\",\"seq\":".to_vec();
                    put_decimal(&mut ack, seq);
                    ack.push(b'}');
                    nats_msg(&mut out, r, b"1", None, &ack);
                }
                continue;
            }
            used += eol + 2;
            if op.eq_ignore_ascii_case(b"PING") {
                out.extend_from_slice(b"PONG\r\n");
            }
        }
        rb.consume(used);
        s.write_all(&out).map_err(|e| e.to_string())?;
        out.clear();
        if let Some(deliver) = replay {
            let n = STORED.load(Ordering::Relaxed);
            let payload = vec![b'x'; LAST_SIZE.load(Ordering::Relaxed) as usize];
            let mut reply = Vec::new();
            for seq in 1..=n {
                reply.clear();
                reply.extend_from_slice(b"$JS.ACK.SINK.c.1.");
                put_decimal(&mut reply, seq);
                reply.push(b'.');
                put_decimal(&mut reply, seq);
                reply.extend_from_slice(b".1700000000000000000.0");
                nats_msg(&mut out, &deliver, b"2", Some(&reply), &payload);
                if out.len() >= 256 * 1024 || seq == n {
                    s.write_all(&out).map_err(|e| e.to_string())?;
                    out.clear();
                }
            }
        }
    }
    Ok(())
}
