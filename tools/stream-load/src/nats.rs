//! The NATS client protocol (text: `INFO`, `CONNECT`, `PUB`, `SUB`, `MSG`, `HMSG`, `PING`/`PONG`,
//! `+OK`/`-ERR`) and the parts of the JetStream API the tool needs: creating and deleting a
//! file-storage stream, publishing with a reply subject and reading the PubAcks
//! (`{"stream":..,"seq":..}`), and an ordered push consumer for replay (ephemeral, deliver all,
//! ack none, flow control answered, heartbeats ignored unless they report a stall), as the
//! official clients' "ordered consumer" does. Written from the protocol's documentation, with
//! no NATS library.

use std::io::Write;
use std::time::{Duration, Instant};

use crate::load::{Conn, Publisher, Replayed, parse_u64, put_decimal};

/// How long the handshake or an API request may take.
const ANSWER_WAIT: Duration = Duration::from_secs(30);

/// One protocol message from the server.
#[derive(Debug, PartialEq)]
pub enum Event<'a> {
    /// `MSG` or `HMSG`; `hdr` is empty for `MSG`.
    Msg {
        subject: &'a [u8],
        sid: &'a [u8],
        reply: Option<&'a [u8]>,
        hdr: &'a [u8],
        payload: &'a [u8],
    },
    Ping,
    Pong,
    Ok,
    Info,
    Err(&'a [u8]),
}

fn find_crlf(buf: &[u8]) -> Option<usize> {
    let mut from = 0;
    while let Some(i) = buf[from..].iter().position(|&b| b == b'\n') {
        let at = from + i;
        if at > 0 && buf[at - 1] == b'\r' {
            return Some(at - 1);
        }
        from = at + 1;
    }
    None
}

/// The next complete protocol message at the front of `buf` and its size; `None` when more
/// bytes are needed.
///
/// # Errors
/// A line the protocol does not define.
pub fn next_event(buf: &[u8]) -> Result<Option<(Event<'_>, usize)>, String> {
    let Some(eol) = find_crlf(buf) else {
        if buf.len() > 64 * 1024 {
            return Err("a protocol line longer than 64 KiB".into());
        }
        return Ok(None);
    };
    let line = &buf[..eol];
    let after = eol + 2;
    let op_end = line
        .iter()
        .position(|&b| b == b' ' || b == b'\t')
        .unwrap_or(line.len());
    let op = &line[..op_end];
    let ev = if op.eq_ignore_ascii_case(b"MSG") || op.eq_ignore_ascii_case(b"HMSG") {
        let headers = op.len() == 4;
        let mut t: [&[u8]; 5] = [&[]; 5];
        let mut n = 0;
        for tok in line[op_end..]
            .split(|&b| b == b' ' || b == b'\t')
            .filter(|t| !t.is_empty())
        {
            if n == 5 {
                return Err(format!(
                    "bad {}: too many fields",
                    String::from_utf8_lossy(op)
                ));
            }
            t[n] = tok;
            n += 1;
        }
        let sizes = if headers { 2 } else { 1 };
        if n != 2 + sizes && n != 3 + sizes {
            return Err(format!(
                "bad message line: {}",
                String::from_utf8_lossy(line)
            ));
        }
        let reply = (n == 3 + sizes).then_some(t[2]);
        let bad = || format!("bad size in: {}", String::from_utf8_lossy(line));
        let total = parse_u64(t[n - 1]).ok_or_else(bad)? as usize;
        let hlen = if headers {
            parse_u64(t[n - 2]).ok_or_else(bad)? as usize
        } else {
            0
        };
        if hlen > total {
            return Err(bad());
        }
        if buf.len() < after + total + 2 {
            return Ok(None);
        }
        let data = &buf[after..after + total];
        return Ok(Some((
            Event::Msg {
                subject: t[0],
                sid: t[1],
                reply,
                hdr: &data[..hlen],
                payload: &data[hlen..],
            },
            after + total + 2,
        )));
    } else if op.eq_ignore_ascii_case(b"PING") {
        Event::Ping
    } else if op.eq_ignore_ascii_case(b"PONG") {
        Event::Pong
    } else if op.eq_ignore_ascii_case(b"+OK") {
        Event::Ok
    } else if op.eq_ignore_ascii_case(b"INFO") {
        Event::Info
    } else if op.eq_ignore_ascii_case(b"-ERR") {
        Event::Err(&line[op_end..])
    } else {
        return Err(format!(
            "unknown protocol line: {}",
            String::from_utf8_lossy(line)
        ));
    };
    Ok(Some((ev, after)))
}

/// Appends `PUB subject [reply] len\r\npayload\r\n`.
pub fn publish(out: &mut Vec<u8>, subject: &str, reply: Option<&str>, payload: &[u8]) {
    out.extend_from_slice(b"PUB ");
    out.extend_from_slice(subject.as_bytes());
    if let Some(r) = reply {
        out.push(b' ');
        out.extend_from_slice(r.as_bytes());
    }
    out.push(b' ');
    put_decimal(out, payload.len() as u64);
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(payload);
    out.extend_from_slice(b"\r\n");
}

/// Connects: reads `INFO`, sends `CONNECT` (headers on, verbose off) and a `PING`, waits for the
/// `PONG`.
///
/// # Errors
/// The connection failed or the server refused it.
pub fn connect(addr: &str, name: &str) -> Result<Conn, String> {
    let mut conn = Conn::connect(addr).map_err(|e| format!("connect {addr}: {e}"))?;
    let connect = format!(
        "CONNECT {{\"verbose\":false,\"pedantic\":false,\"headers\":true,\"no_responders\":true,\
         \"protocol\":1,\"name\":\"{name}\",\"lang\":\"rust\",\"version\":\"0.1.0\"}}\r\nPING\r\n"
    );
    conn.sock
        .write_all(connect.as_bytes())
        .map_err(|e| format!("CONNECT: {e}"))?;
    conn.read_until(ANSWER_WAIT, "CONNECT", |buf, ctl| {
        let mut used = 0;
        while let Some((ev, n)) = next_event(&buf[used..])? {
            used += n;
            match ev {
                Event::Pong => return Ok((used, Some(()))),
                Event::Ping => ctl.extend_from_slice(b"PONG\r\n"),
                Event::Err(e) => {
                    return Err(format!("CONNECT: -ERR{}", String::from_utf8_lossy(e)));
                }
                _ => {}
            }
        }
        Ok((used, None))
    })?;
    Ok(conn)
}

/// Sends one JetStream API request (`$JS.API.<api>`) on a new connection and returns the
/// answer's JSON.
///
/// # Errors
/// The connection failed, nothing answered, or the answer holds an `error`.
pub fn request(addr: &str, api: &str, json: &str) -> Result<String, String> {
    let mut conn = connect(addr, "stream-load-admin")?;
    let inbox = format!("_INBOX.sl{}.api", std::process::id());
    let mut out = format!("SUB {inbox} 1\r\n").into_bytes();
    publish(
        &mut out,
        &format!("$JS.API.{api}"),
        Some(&inbox),
        json.as_bytes(),
    );
    conn.sock
        .write_all(&out)
        .map_err(|e| format!("{api}: {e}"))?;
    let answer = conn.read_until(ANSWER_WAIT, api, |buf, ctl| {
        let mut used = 0;
        while let Some((ev, n)) = next_event(&buf[used..])? {
            used += n;
            match ev {
                Event::Msg { hdr, payload, .. } => {
                    if hdr.starts_with(b"NATS/1.0 503") {
                        return Err(format!("{api}: no responders (is JetStream enabled?)"));
                    }
                    return Ok((used, Some(String::from_utf8_lossy(payload).into_owned())));
                }
                Event::Ping => ctl.extend_from_slice(b"PONG\r\n"),
                Event::Err(e) => return Err(format!("{api}: -ERR{}", String::from_utf8_lossy(e))),
                _ => {}
            }
        }
        Ok((used, None))
    })?;
    if answer.contains("\"error\"") {
        return Err(format!("{api}: {answer}"));
    }
    Ok(answer)
}

/// The publishing side of JetStream: `PUB`s of one subject, each with its own reply subject under
/// the connection's inbox, answered by a PubAck on that subject.
pub struct NatsPublisher {
    head: Vec<u8>,
    tail: Vec<u8>,
    inbox_prefix: Vec<u8>,
    refusal: Option<String>,
}

impl NatsPublisher {
    /// Publishes of `payload` to `subject`, acknowledged on `<inbox>.<id>`; the connection must
    /// be subscribed to `<inbox>.*` (see [`NatsPublisher::subscribe_line`]).
    pub fn new(subject: &str, inbox: &str, payload: &[u8]) -> NatsPublisher {
        let head = format!("PUB {subject} {inbox}.").into_bytes();
        let mut tail = format!(" {}\r\n", payload.len()).into_bytes();
        tail.extend_from_slice(payload);
        tail.extend_from_slice(b"\r\n");
        NatsPublisher {
            head,
            tail,
            inbox_prefix: format!("{inbox}.").into_bytes(),
            refusal: None,
        }
    }

    /// The `SUB` that receives this publisher's acknowledgements.
    pub fn subscribe_line(inbox: &str) -> String {
        format!("SUB {inbox}.* 1\r\nPING\r\n")
    }
}

impl Publisher for NatsPublisher {
    fn encode(&mut self, out: &mut Vec<u8>, id: u32) {
        out.extend_from_slice(&self.head);
        put_decimal(out, id as u64);
        out.extend_from_slice(&self.tail);
    }

    fn parse(
        &mut self,
        buf: &[u8],
        ctl: &mut Vec<u8>,
        acks: &mut Vec<(u32, bool)>,
    ) -> Result<usize, String> {
        let mut used = 0;
        while let Some((ev, n)) = next_event(&buf[used..])? {
            used += n;
            match ev {
                Event::Msg {
                    subject,
                    hdr,
                    payload,
                    ..
                } => {
                    let Some(id) = subject
                        .strip_prefix(&self.inbox_prefix[..])
                        .and_then(parse_u64)
                    else {
                        continue;
                    };
                    // A PubAck is {"stream":..,"seq":..}; a refusal {"error":{..}}, or a 503
                    // status with no payload when no stream listens on the subject.
                    let ok = hdr.is_empty() && !payload.windows(7).any(|w| w == b"\"error\"");
                    if !ok {
                        self.refusal.get_or_insert_with(|| {
                            format!(
                                "{}{}",
                                String::from_utf8_lossy(hdr).trim(),
                                String::from_utf8_lossy(payload)
                            )
                        });
                    }
                    acks.push((id as u32, ok));
                }
                Event::Ping => ctl.extend_from_slice(b"PONG\r\n"),
                Event::Err(e) => return Err(format!("-ERR{}", String::from_utf8_lossy(e))),
                Event::Pong | Event::Ok | Event::Info => {}
            }
        }
        Ok(used)
    }

    fn first_refusal(&self) -> Option<String> {
        self.refusal.clone()
    }
}

/// The stream sequence in a JetStream delivery's reply subject,
/// `$JS.ACK.<stream>.<consumer>.<delivered>.<stream seq>.<consumer seq>.<ts>.<pending>`.
fn stream_seq(reply: &[u8]) -> Option<u64> {
    let mut toks = reply.split(|&b| b == b'.');
    if toks.next()? != b"$JS" || toks.next()? != b"ACK" {
        return None;
    }
    let rest: Vec<&[u8]> = toks.collect();
    // 9 tokens in all before 2.10; 2.10 adds domain and account hash (and a random token).
    let at = if rest.len() >= 10 { 4 + 2 } else { 3 };
    parse_u64(rest.get(at)?)
}

/// Replays stream `stream` from its first message with an ephemeral ordered push consumer on a
/// new connection until `expected` messages arrived, for at most `timeout`.
///
/// # Errors
/// The connection failed, the consumer was refused, or the messages stopped coming.
pub fn replay(
    addr: &str,
    stream: &str,
    expected: u64,
    timeout: Duration,
) -> Result<Replayed, String> {
    let mut conn = connect(addr, "stream-load-replay")?;
    let inbox = format!("_INBOX.sl{}r{}", std::process::id(), crate::unique_suffix());
    let deliver = format!("{inbox}.deliver");
    let api = format!("{inbox}.api");
    let mut out = format!("SUB {api} 1\r\nSUB {deliver} 2\r\n").into_bytes();
    let config = format!(
        "{{\"stream_name\":\"{stream}\",\"config\":{{\"deliver_subject\":\"{deliver}\",\
         \"deliver_policy\":\"all\",\"ack_policy\":\"none\",\"replay_policy\":\"instant\",\
         \"max_deliver\":1,\"flow_control\":true,\"idle_heartbeat\":1000000000,\
         \"mem_storage\":true,\"num_replicas\":1}}}}"
    );
    publish(
        &mut out,
        &format!("$JS.API.CONSUMER.CREATE.{stream}"),
        Some(&api),
        config.as_bytes(),
    );
    let start = Instant::now();
    conn.sock
        .write_all(&out)
        .map_err(|e| format!("consumer create: {e}"))?;
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
        while let Some((ev, n)) = next_event(&buf[used..])? {
            used += n;
            match ev {
                Event::Msg {
                    sid,
                    reply,
                    hdr,
                    payload,
                    ..
                } if sid == b"2" => {
                    if hdr.starts_with(b"NATS/1.0 100") {
                        if let Some(reply) = reply {
                            // Flow control: an empty message to its reply subject lets the
                            // server send more.
                            r.flow_controls += 1;
                            publish(&mut ctl, &String::from_utf8_lossy(reply), None, b"");
                        } else {
                            r.heartbeats += 1;
                            // A heartbeat naming a stalled flow control: answer that one.
                            let text = String::from_utf8_lossy(hdr);
                            if let Some(l) = text
                                .lines()
                                .find(|l| l.starts_with("Nats-Consumer-Stalled:"))
                            {
                                let subj = l["Nats-Consumer-Stalled:".len()..].trim();
                                publish(&mut ctl, subj, None, b"");
                            }
                        }
                        continue;
                    }
                    let seq = reply.and_then(stream_seq).unwrap_or(0);
                    if r.msgs == 0 {
                        r.first = Some(start.elapsed());
                    } else if seq != r.last_seq + 1 {
                        r.gaps += 1;
                    }
                    r.last_seq = seq;
                    r.msgs += 1;
                    r.bytes += payload.len() as u64;
                }
                Event::Msg { payload, .. } => {
                    if payload.windows(7).any(|w| w == b"\"error\"") {
                        return Err(format!(
                            "consumer create: {}",
                            String::from_utf8_lossy(payload)
                        ));
                    }
                }
                Event::Ping => ctl.extend_from_slice(b"PONG\r\n"),
                Event::Err(e) => return Err(format!("replay: -ERR{}", String::from_utf8_lossy(e))),
                Event::Pong | Event::Ok | Event::Info => {}
            }
        }
        conn.rbuf.consume(used);
        if !ctl.is_empty() {
            conn.sock
                .write_all(&ctl)
                .map_err(|e| format!("flow control: {e}"))?;
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

    #[test]
    fn messages_and_control_lines_parse() {
        let buf = b"MSG _INBOX.x.17 1 22\r\n{\"stream\":\"S\",\"seq\":3}\r\nPING\r\n\
                    HMSG d 2 $JS.FC.S.c.1 36 36\r\nNATS/1.0 100 FlowControl Request\r\n\r\n\r\n\
                    MSG a 1 5\r\nhel";
        let (ev, n) = next_event(buf).unwrap().unwrap();
        assert_eq!(
            ev,
            Event::Msg {
                subject: b"_INBOX.x.17",
                sid: b"1",
                reply: None,
                hdr: b"",
                payload: br#"{"stream":"S","seq":3}"#,
            }
        );
        let (ev, m) = next_event(&buf[n..]).unwrap().unwrap();
        assert_eq!(ev, Event::Ping);
        let (ev, k) = next_event(&buf[n + m..]).unwrap().unwrap();
        match ev {
            Event::Msg {
                reply,
                hdr,
                payload,
                ..
            } => {
                assert_eq!(reply, Some(&b"$JS.FC.S.c.1"[..]));
                assert!(hdr.starts_with(b"NATS/1.0 100 FlowControl"));
                assert!(payload.is_empty());
            }
            e => panic!("{e:?}"),
        }
        assert_eq!(next_event(&buf[n + m + k..]).unwrap(), None);
        assert!(next_event(b"BOGUS\r\n").is_err());
    }

    #[test]
    fn pub_acks_are_matched_by_their_reply_subject() {
        let mut p = NatsPublisher::new("load.t.x", "_INBOX.t.p0", b"ab");
        let mut out = Vec::new();
        p.encode(&mut out, 42);
        assert_eq!(out, b"PUB load.t.x _INBOX.t.p0.42 2\r\nab\r\n");
        let buf = b"MSG _INBOX.t.p0.42 1 22\r\n{\"stream\":\"S\",\"seq\":1}\r\n\
                    MSG _INBOX.t.p0.43 1 31\r\n{\"error\":{\"code\":503,\"x\":1234}}\r\n";
        let (mut ctl, mut acks) = (Vec::new(), Vec::new());
        assert_eq!(p.parse(buf, &mut ctl, &mut acks).unwrap(), buf.len());
        assert_eq!(acks, vec![(42, true), (43, false)]);
        assert!(p.first_refusal().unwrap().contains("503"));
    }

    #[test]
    fn the_stream_sequence_comes_from_the_ack_subject() {
        assert_eq!(
            stream_seq(b"$JS.ACK.S.c.1.1234.1234.1700000000.5"),
            Some(1234)
        );
        assert_eq!(
            stream_seq(b"$JS.ACK.dom.hash.S.c.1.77.77.1700000000.5.rnd"),
            Some(77)
        );
        assert_eq!(stream_seq(b"other"), None);
    }
}
