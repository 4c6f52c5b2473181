//! brokerd's binary protocol, written from `docs/protocol.md` (sections 1-4 and 8) and checked
//! against `docs/protocol-vectors.txt`: the handshake, acknowledged `PUB`s answered by `STORED`,
//! stream management requests on `$SYS.req.stream.*`, and replay subscriptions. No brokerd
//! crate is used, so the tool sees the protocol as any third-party client would.

use std::io::Write;
use std::time::{Duration, Instant};

use crate::load::{Conn, Publisher, Replayed};

const HELLO: u8 = 0x01;
const PUB: u8 = 0x02;
const SUB: u8 = 0x03;
const PING: u8 = 0x05;
const PONG: u8 = 0x06;
const WELCOME: u8 = 0x81;
const OK: u8 = 0x82;
const ACK: u8 = 0x83;
const ERR: u8 = 0x84;
const MSG: u8 = 0x85;
const LOST: u8 = 0x86;
const STORED: u8 = 0x87;

/// How long a management request or the handshake may take.
const ANSWER_WAIT: Duration = Duration::from_secs(30);

fn put_str16(out: &mut Vec<u8>, s: &[u8]) {
    out.extend_from_slice(&(s.len() as u16).to_be_bytes());
    out.extend_from_slice(s);
}

fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

fn be64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_be_bytes(a)
}

/// Appends a `HELLO`: version 1, echo on, the server's default overflow policy.
pub fn hello(out: &mut Vec<u8>, req_id: u32, name: &str) {
    out.extend_from_slice(&(11 + name.len() as u32).to_be_bytes());
    out.push(HELLO);
    out.extend_from_slice(&req_id.to_be_bytes());
    out.extend_from_slice(&1u16.to_be_bytes());
    out.push(0);
    out.push(0);
    put_str16(out, name.as_bytes());
}

/// Appends a `PUB` with the ack flag set when `ack`, an optional reply-to and no headers.
pub fn publish(
    out: &mut Vec<u8>,
    req_id: u32,
    ack: bool,
    topic: &str,
    reply: Option<&str>,
    payload: &[u8],
) {
    let body = 1 + 2 + topic.len() + reply.map_or(0, |r| 2 + r.len()) + payload.len();
    out.extend_from_slice(&(6 + body as u32).to_be_bytes());
    out.push(PUB);
    out.extend_from_slice(&req_id.to_be_bytes());
    out.push(ack as u8);
    out.push(if reply.is_some() { 0x01 } else { 0 });
    put_str16(out, topic.as_bytes());
    if let Some(r) = reply {
        put_str16(out, r.as_bytes());
    }
    out.extend_from_slice(payload);
}

/// Appends a `SUB`; with `stream`, a replay subscription from `start` (1 = all) and `arg`.
pub fn subscribe(
    out: &mut Vec<u8>,
    req_id: u32,
    sid: u32,
    filter: &str,
    stream: Option<(&str, u8, u64)>,
) {
    let extra = stream.map_or(0, |(s, _, _)| 11 + s.len());
    out.extend_from_slice(&((12 + filter.len() + extra) as u32).to_be_bytes());
    out.push(SUB);
    out.extend_from_slice(&req_id.to_be_bytes());
    out.extend_from_slice(&sid.to_be_bytes());
    out.push(if stream.is_some() { 0x02 } else { 0 });
    put_str16(out, filter.as_bytes());
    if let Some((name, start, arg)) = stream {
        put_str16(out, name.as_bytes());
        out.push(start);
        out.extend_from_slice(&arg.to_be_bytes());
    }
}

/// A frame's type byte, the fields after it, and its whole size on the wire.
type RawFrame<'a> = (u8, &'a [u8], usize);

/// One complete frame at the front of `buf`; `None` when more bytes are needed.
fn frame(buf: &[u8]) -> Result<Option<RawFrame<'_>>, String> {
    if buf.len() < 4 {
        return Ok(None);
    }
    let len = be32(buf) as usize;
    if len == 0 {
        return Err("a frame of length 0".into());
    }
    if buf.len() < 4 + len {
        return Ok(None);
    }
    Ok(Some((buf[4], &buf[5..4 + len], 4 + len)))
}

/// An `ERR`'s request id, code and message.
fn err_fields(f: &[u8]) -> (u32, u16, String) {
    if f.len() < 8 {
        return (0, 0, "short ERR".into());
    }
    let code = u16::from_be_bytes([f[4], f[5]]);
    let n = u16::from_be_bytes([f[6], f[7]]) as usize;
    let msg = String::from_utf8_lossy(&f[8..(8 + n).min(f.len())]).into_owned();
    (be32(f), code, msg)
}

/// The payload of a message body (section 2), skipping topic, reply-to and headers.
fn body_payload(body: &[u8]) -> Option<&[u8]> {
    let flags = *body.first()?;
    let mut at = 1;
    let skip_str = |at: &mut usize| -> Option<()> {
        let n = u16::from_be_bytes([*body.get(*at)?, *body.get(*at + 1)?]) as usize;
        *at += 2 + n;
        (*at <= body.len()).then_some(())
    };
    skip_str(&mut at)?;
    if flags & 0x01 != 0 {
        skip_str(&mut at)?;
    }
    if flags & 0x02 != 0 {
        let count = u16::from_be_bytes([*body.get(at)?, *body.get(at + 1)?]);
        at += 2;
        for _ in 0..2 * count {
            skip_str(&mut at)?;
        }
    }
    body.get(at..)
}

/// Opens a session: `HELLO`, then waits for `WELCOME`.
///
/// # Errors
/// The connection failed or the server refused the handshake.
pub fn connect(addr: &str, name: &str) -> Result<Conn, String> {
    let mut conn = Conn::connect(addr).map_err(|e| format!("connect {addr}: {e}"))?;
    let mut out = Vec::new();
    hello(&mut out, 1, name);
    conn.sock
        .write_all(&out)
        .map_err(|e| format!("HELLO: {e}"))?;
    conn.read_until(ANSWER_WAIT, "HELLO", |buf, _| match frame(buf)? {
        None => Ok((0, None)),
        Some((WELCOME, _, n)) => Ok((n, Some(()))),
        Some((ERR, f, _)) => {
            let (_, code, msg) = err_fields(f);
            Err(format!("HELLO refused: ERR {code} {msg}"))
        }
        Some((t, _, _)) => Err(format!("HELLO: unexpected frame type {t:#04x}")),
    })?;
    Ok(conn)
}

/// Sends one stream management request (`op` on `$SYS.req.stream.<op>`) and returns the answer's
/// JSON payload.
///
/// # Errors
/// The connection failed, or the request was refused with an `ERR`.
pub fn request(addr: &str, op: &str, json: &str) -> Result<String, String> {
    let mut conn = connect(addr, "stream-load-admin")?;
    let inbox = format!("_INBOX.sl{}", std::process::id());
    let mut out = Vec::new();
    subscribe(&mut out, 1, 1, &format!("{inbox}.*"), None);
    let topic = format!("$SYS.req.stream.{op}");
    publish(
        &mut out,
        2,
        true,
        &topic,
        Some(&format!("{inbox}.1")),
        json.as_bytes(),
    );
    conn.sock
        .write_all(&out)
        .map_err(|e| format!("{op}: {e}"))?;
    conn.read_until(ANSWER_WAIT, op, |buf, ctl| {
        let mut used = 0;
        while let Some((t, f, n)) = frame(&buf[used..])? {
            used += n;
            match t {
                MSG if f.len() >= 12 && be32(f) == 1 => {
                    let payload = body_payload(&f[12..]).ok_or("a malformed MSG body")?;
                    return Ok((used, Some(String::from_utf8_lossy(payload).into_owned())));
                }
                ERR => {
                    let (_, code, msg) = err_fields(f);
                    return Err(format!("{op}: ERR {code} {msg}"));
                }
                PING if f.len() >= 4 => {
                    ctl.extend_from_slice(&[0, 0, 0, 5, PONG]);
                    ctl.extend_from_slice(&f[..4]);
                }
                _ => {}
            }
        }
        Ok((used, None))
    })
}

/// The publishing side of brokerd: acknowledged `PUB`s of one topic, answered by `STORED`.
pub struct BrokerdPublisher {
    template: Vec<u8>,
    refusal: Option<String>,
}

impl BrokerdPublisher {
    /// Publishes of `payload` to `topic`.
    pub fn new(topic: &str, payload: &[u8]) -> BrokerdPublisher {
        let mut template = Vec::new();
        publish(&mut template, 0, true, topic, None, payload);
        BrokerdPublisher {
            template,
            refusal: None,
        }
    }
}

impl Publisher for BrokerdPublisher {
    fn encode(&mut self, out: &mut Vec<u8>, id: u32) {
        let at = out.len();
        out.extend_from_slice(&self.template);
        out[at + 5..at + 9].copy_from_slice(&id.to_be_bytes());
    }

    fn parse(
        &mut self,
        buf: &[u8],
        ctl: &mut Vec<u8>,
        acks: &mut Vec<(u32, bool)>,
    ) -> Result<usize, String> {
        let mut used = 0;
        while let Some((t, f, n)) = frame(&buf[used..])? {
            used += n;
            match t {
                STORED if f.len() >= 4 => acks.push((be32(f), true)),
                // An ACK instead of STORED: routed but captured by no stream, so not stored.
                ACK if f.len() >= 4 => {
                    acks.push((be32(f), false));
                    self.refusal.get_or_insert_with(|| {
                        "ACK instead of STORED: no stream captured the topic".into()
                    });
                }
                ERR => {
                    let (req_id, code, msg) = err_fields(f);
                    if req_id == 0 {
                        return Err(format!("ERR {code} {msg}"));
                    }
                    acks.push((req_id, false));
                    self.refusal
                        .get_or_insert_with(|| format!("ERR {code} {msg}"));
                }
                PING if f.len() >= 4 => {
                    ctl.extend_from_slice(&[0, 0, 0, 5, PONG]);
                    ctl.extend_from_slice(&f[..4]);
                }
                OK | PONG | MSG | LOST => {}
                t => return Err(format!("unexpected frame type {t:#04x}")),
            }
        }
        Ok(used)
    }

    fn first_refusal(&self) -> Option<String> {
        self.refusal.clone()
    }
}

/// Replays stream `stream` from its first message through filter `filter` on a new connection
/// until `expected` messages arrived, for at most `timeout`.
///
/// # Errors
/// The connection failed, the subscription was refused, or the messages stopped coming.
pub fn replay(
    addr: &str,
    stream: &str,
    filter: &str,
    expected: u64,
    timeout: Duration,
) -> Result<Replayed, String> {
    let mut conn = connect(addr, "stream-load-replay")?;
    let mut out = Vec::new();
    subscribe(&mut out, 1, 1, filter, Some((stream, 1, 0)));
    let start = Instant::now();
    conn.sock.write_all(&out).map_err(|e| format!("SUB: {e}"))?;
    let mut r = Replayed::default();
    let mut ctl = Vec::new();
    let mut last_data = Instant::now();
    while r.msgs < expected {
        match conn.rbuf.fill(&mut conn.sock) {
            Ok(Some(0)) => return Err(format!("connection closed after {} messages", r.msgs)),
            Ok(Some(_)) => {
                r.reads += 1;
                last_data = Instant::now();
            }
            Ok(None) => {}
            Err(e) => return Err(format!("read: {e}")),
        }
        let buf = conn.rbuf.data();
        let mut used = 0;
        while let Some((t, f, n)) = frame(&buf[used..])? {
            used += n;
            match t {
                MSG if f.len() >= 12 => {
                    let seq = be64(&f[4..]);
                    let body = &f[12..];
                    // The tool publishes without reply-to or headers: the payload follows the
                    // topic. Anything else goes through the general parser.
                    let payload = if body[0] == 0 && body.len() >= 3 {
                        (body.len() - 3)
                            .saturating_sub(u16::from_be_bytes([body[1], body[2]]) as usize)
                    } else {
                        body_payload(body).map_or(0, <[u8]>::len)
                    };
                    if r.msgs == 0 {
                        r.first = Some(start.elapsed());
                    } else if seq != r.last_seq + 1 {
                        r.gaps += 1;
                    }
                    r.last_seq = seq;
                    r.msgs += 1;
                    r.bytes += payload as u64;
                }
                ERR => {
                    let (_, code, msg) = err_fields(f);
                    return Err(format!("replay: ERR {code} {msg}"));
                }
                PING if f.len() >= 4 => {
                    ctl.extend_from_slice(&[0, 0, 0, 5, PONG]);
                    ctl.extend_from_slice(&f[..4]);
                }
                LOST => return Err("replay: LOST on a replay subscription".into()),
                _ => {}
            }
        }
        conn.rbuf.consume(used);
        if !ctl.is_empty() {
            conn.sock
                .write_all(&ctl)
                .map_err(|e| format!("PONG: {e}"))?;
            ctl.clear();
        }
        if start.elapsed() > timeout || last_data.elapsed() > Duration::from_secs(10) {
            return Err(format!(
                "replay stalled or timed out after {} of {expected} messages",
                r.msgs
            ));
        }
    }
    r.elapsed = start.elapsed();
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vector(name: &str) -> Vec<u8> {
        let text = include_str!("../../../docs/protocol-vectors.txt");
        let line = text
            .lines()
            .find(|l| l.starts_with(&format!("{name}:")))
            .unwrap_or_else(|| panic!("no vector {name}"));
        let hex: String = line[name.len() + 1..].split_whitespace().collect();
        (0..hex.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
            .collect()
    }

    #[test]
    fn encoders_match_the_protocol_vectors() {
        let mut out = Vec::new();
        hello(&mut out, 1, "demo");
        assert_eq!(out, vector("hello_default_policy"));

        out.clear();
        publish(&mut out, 2, false, "user.created", None, b"hi");
        assert_eq!(out, vector("pub_plain"));

        out.clear();
        subscribe(&mut out, 11, 4, "order.>", Some(("ORDERS", 1, 0)));
        assert_eq!(out, vector("sub_stream_all"));

        out.clear();
        subscribe(&mut out, 6, 1, "user.>", None);
        assert_eq!(out, vector("sub_tail_wildcard"));

        let mut p = BrokerdPublisher::new("user.created", b"hi");
        out.clear();
        p.encode(&mut out, 2);
        let mut want = vector("pub_plain");
        want[9] = 1; // the ack flag
        assert_eq!(out, want);
    }

    #[test]
    fn answers_are_recognised_from_the_protocol_vectors() {
        let mut p = BrokerdPublisher::new("a", b"");
        let mut buf = vector("stored");
        buf.extend(vector("ping"));
        buf.extend(vector("err_stream_busy"));
        buf.extend(vector("ok"));
        let whole = buf.len();
        buf.extend(&vector("ack")[..5]); // a frame cut short stays for the next read
        let (mut ctl, mut acks) = (Vec::new(), Vec::new());
        assert_eq!(p.parse(&buf, &mut ctl, &mut acks).unwrap(), whole);
        assert_eq!(acks, vec![(3, true), (21, false)]);
        assert_eq!(ctl, vector("pong"));
        assert_eq!(p.first_refusal().unwrap(), "ERR 24 busy");
        assert!(
            p.parse(&vector("err_slow_consumer"), &mut ctl, &mut acks)
                .is_err()
        );

        let msg = vector("msg_reply_headers");
        assert_eq!(body_payload(&msg[17..]).unwrap(), b"boom");
        let msg = vector("msg_plain");
        assert_eq!(body_payload(&msg[17..]).unwrap(), b"hi");
    }
}
