//! The message body that `PUB` carries in and `MSG` carries out, byte for byte the same.
//!
//! Layout (all integers big-endian):
//!
//! ```text
//! flags:u8  topic:str16  [reply:str16 if flags&1]  [headers if flags&2]  payload:rest
//! headers = count:u16 then count x (key:str16 value:str16)
//! ```
//!
//! Because the body is identical in both frames, the broker forwards the `Bytes` it decoded from a
//! publisher to every subscriber without copying it. This module checks structure and UTF-8; it
//! does not judge topic syntax (see [`crate::topic`]) or payload limits (the server's job).

use bytes::{BufMut, Bytes, BytesMut};
use std::ops::Range;

/// Body flag: a reply-to string follows the topic.
pub const FLAG_REPLY: u8 = 0x01;
/// Body flag: a header list follows the topic (and reply-to).
pub const FLAG_HEADERS: u8 = 0x02;
const KNOWN_FLAGS: u8 = FLAG_REPLY | FLAG_HEADERS;

/// A decoded message body: topic, optional reply-to, headers and payload, sharing one buffer.
#[derive(Clone, PartialEq, Eq)]
pub struct Body {
    raw: Bytes,
    // Offsets into `raw` as `u32` (a frame's length is a `u32`), so that a body, moved once per
    // delivery from the reader into a subscription's queue, is seven words rather than twelve.
    /// The topic is `3..topic_end`.
    topic_end: u32,
    /// The reply-to is `reply_start..reply_end`; `reply_start == 0` for none (a reply-to never
    /// starts at offset 0).
    reply_start: u32,
    reply_end: u32,
    /// The header list is `headers_start..payload`.
    headers_start: u32,
    header_count: u16,
    payload: u32,
}

/// Key/value headers in the order they were added. Keys may repeat.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Headers(Vec<(String, String)>);

impl Headers {
    /// No headers.
    pub fn new() -> Headers {
        Headers(Vec::new())
    }

    /// Appends a header.
    pub fn insert(&mut self, key: impl Into<String>, value: impl Into<String>) -> &mut Headers {
        self.0.push((key.into(), value.into()));
        self
    }

    /// The first value for `key`.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// The headers in order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }

    /// Number of headers.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl<K: Into<String>, V: Into<String>> FromIterator<(K, V)> for Headers {
    fn from_iter<I: IntoIterator<Item = (K, V)>>(iter: I) -> Headers {
        Headers(
            iter.into_iter()
                .map(|(k, v)| (k.into(), v.into()))
                .collect(),
        )
    }
}

/// Reads a `str16` at `pos`, returning its range and the position after it.
fn str16(
    raw: &[u8],
    pos: usize,
    what: &'static str,
) -> Result<(Range<usize>, usize), &'static str> {
    let len_bytes = raw.get(pos..pos + 2).ok_or(what)?;
    let len = u16::from_be_bytes([len_bytes[0], len_bytes[1]]) as usize;
    let start = pos + 2;
    let s = raw.get(start..start + len).ok_or(what)?;
    // Topics are almost always ASCII, which is UTF-8; the inlined ASCII test is several times
    // cheaper than the general check on short strings.
    if !s.is_ascii() {
        std::str::from_utf8(s).map_err(|_| "string is not utf-8")?;
    }
    Ok((start..start + len, start + len))
}

fn as_str(raw: &[u8], r: Range<usize>) -> &str {
    // Every range handed out was checked to be UTF-8 by `Body::parse`.
    std::str::from_utf8(&raw[r]).unwrap_or_default()
}

/// Where a body's fields lie in its bytes, once its structure has been checked.
struct Layout {
    topic: Range<usize>,
    reply: Option<Range<usize>>,
    headers: Range<usize>,
    header_count: u16,
    payload: usize,
}

impl Layout {
    #[inline]
    fn of(raw: &[u8]) -> Result<Layout, &'static str> {
        // The common body, flags 0: topic, then payload.
        if let [0, hi, lo, rest @ ..] = raw {
            let len = u16::from_be_bytes([*hi, *lo]) as usize;
            if let Some(topic) = rest.get(..len)
                && (topic.is_ascii() || std::str::from_utf8(topic).is_ok())
            {
                return Ok(Layout {
                    topic: 3..3 + len,
                    reply: None,
                    headers: 3 + len..3 + len,
                    header_count: 0,
                    payload: 3 + len,
                });
            }
        }
        let flags = *raw.first().ok_or("missing body flags")?;
        if flags & !KNOWN_FLAGS != 0 {
            return Err("undefined body flag");
        }
        let (topic, mut pos) = str16(raw, 1, "truncated topic")?;
        let reply = if flags & FLAG_REPLY != 0 {
            let (r, next) = str16(raw, pos, "truncated reply-to")?;
            pos = next;
            Some(r)
        } else {
            None
        };
        let mut header_count = 0u16;
        let headers_start;
        if flags & FLAG_HEADERS != 0 {
            let n = raw.get(pos..pos + 2).ok_or("truncated header count")?;
            header_count = u16::from_be_bytes([n[0], n[1]]);
            pos += 2;
            headers_start = pos;
            for _ in 0..header_count {
                let (_, next) = str16(raw, pos, "truncated header key")?;
                let (_, next) = str16(raw, next, "truncated header value")?;
                pos = next;
            }
        } else {
            headers_start = pos;
        }
        Ok(Layout {
            topic,
            reply,
            headers: headers_start..pos,
            header_count,
            payload: pos,
        })
    }
}

/// A message body borrowed from the buffer it was read into: the same checks as [`Body::parse`],
/// without taking a reference-counted slice. Topic and reply-to are kept as checked bytes, so a
/// caller that recognises a topic by its bytes never builds a `&str` for it.
#[derive(Debug, Clone, Copy)]
pub struct BodyRef<'a> {
    raw: &'a [u8],
    topic: &'a [u8],
    reply: Option<&'a [u8]>,
    payload: usize,
}

impl<'a> BodyRef<'a> {
    /// Checks the structure of `raw` and indexes its fields.
    ///
    /// # Errors
    /// As [`Body::parse`].
    #[inline]
    pub fn parse(raw: &'a [u8]) -> Result<BodyRef<'a>, &'static str> {
        let l = Layout::of(raw)?;
        Ok(BodyRef {
            raw,
            topic: &raw[l.topic],
            reply: l.reply.map(|r| &raw[r]),
            payload: l.payload,
        })
    }

    /// The whole encoded body.
    pub fn raw(&self) -> &'a [u8] {
        self.raw
    }

    /// The topic (UTF-8 checked; syntax not).
    pub fn topic(&self) -> &'a str {
        std::str::from_utf8(self.topic).unwrap_or_default()
    }

    /// The topic's bytes, UTF-8 checked by [`BodyRef::parse`].
    pub fn topic_bytes(&self) -> &'a [u8] {
        self.topic
    }

    /// The reply-to topic, if any.
    pub fn reply(&self) -> Option<&'a str> {
        self.reply
            .map(|r| std::str::from_utf8(r).unwrap_or_default())
    }

    /// Payload length in bytes.
    pub fn payload_len(&self) -> usize {
        self.raw.len() - self.payload
    }
}

impl Body {
    /// Checks the structure of `raw` and indexes its fields.
    ///
    /// # Errors
    /// A short description of the first structural fault: truncated strings, undefined flags,
    /// strings that are not UTF-8.
    pub fn parse(raw: Bytes) -> Result<Body, &'static str> {
        let l = Layout::of(&raw)?;
        let reply = l.reply.unwrap_or(0..0);
        // Offsets fit: `Layout::of` indexed within `raw`, whose length came from a `u32`.
        let at = |n: usize| u32::try_from(n).map_err(|_| "body longer than 4 GiB");
        Ok(Body {
            topic_end: at(l.topic.end)?,
            reply_start: at(reply.start)?,
            reply_end: at(reply.end)?,
            headers_start: at(l.headers.start)?,
            header_count: l.header_count,
            payload: at(l.payload)?,
            raw,
        })
    }

    /// Encodes a body into a fresh buffer.
    pub fn encode(
        topic: &str,
        reply: Option<&str>,
        headers: Option<&Headers>,
        payload: &[u8],
    ) -> Bytes {
        let b = BodyBuilder {
            topic,
            reply,
            headers,
            payload,
        };
        let mut out = BytesMut::with_capacity(b.len());
        b.put(&mut out);
        out.freeze()
    }

    /// The whole encoded body, as carried on the wire.
    pub fn raw(&self) -> &Bytes {
        &self.raw
    }

    /// The topic's bytes, for lookups that need no string.
    pub fn topic_bytes(&self) -> &[u8] {
        &self.raw[3..self.topic_end as usize]
    }

    /// The topic as text (UTF-8 was checked by [`Body::parse`]; syntax was not).
    pub fn topic(&self) -> &str {
        as_str(&self.raw, 3..self.topic_end as usize)
    }

    /// The reply-to topic, if any.
    pub fn reply(&self) -> Option<&str> {
        (self.reply_start != 0).then(|| {
            as_str(
                &self.raw,
                self.reply_start as usize..self.reply_end as usize,
            )
        })
    }

    /// Whether the body carries a header list (possibly empty).
    pub fn has_headers(&self) -> bool {
        self.raw[0] & FLAG_HEADERS != 0
    }

    /// The headers, in order, read from the buffer.
    pub fn headers(&self) -> impl Iterator<Item = (&str, &str)> {
        let raw: &[u8] = &self.raw;
        let mut pos = self.headers_start as usize;
        (0..self.header_count).map(move |_| {
            let k = read_str16(raw, &mut pos);
            let v = read_str16(raw, &mut pos);
            (k, v)
        })
    }

    /// The headers, copied into an owned list.
    pub fn headers_owned(&self) -> Headers {
        self.headers().collect()
    }

    /// The payload, sharing the body's buffer.
    pub fn payload(&self) -> Bytes {
        self.raw.slice(self.payload as usize..)
    }

    /// Payload length in bytes.
    pub fn payload_len(&self) -> usize {
        self.raw.len() - self.payload as usize
    }

    /// Encoded length of the whole body.
    pub fn len(&self) -> usize {
        self.raw.len()
    }

    /// Never true: a body holds at least its flags and topic length.
    pub fn is_empty(&self) -> bool {
        self.raw.is_empty()
    }
}

fn read_str16<'a>(raw: &'a [u8], pos: &mut usize) -> &'a str {
    // Only called on ranges `Body::parse` walked already.
    let len = u16::from_be_bytes([raw[*pos], raw[*pos + 1]]) as usize;
    let s = as_str(raw, *pos + 2..*pos + 2 + len);
    *pos += 2 + len;
    s
}

impl std::fmt::Debug for Body {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Body")
            .field("topic", &self.topic())
            .field("reply", &self.reply())
            .field("headers", &self.headers().collect::<Vec<_>>())
            .field("payload", &self.payload())
            .finish()
    }
}

/// A body taken apart the way a stream stores it (`docs/storage.md`): the topic, the header
/// block (the header count and pairs exactly as encoded, or empty when the body has no headers
/// flag) and the payload. The reply-to is not stored.
#[derive(Debug, Clone, Copy)]
pub struct StoredParts<'a> {
    /// The topic (UTF-8 checked; syntax not).
    pub topic: &'a str,
    /// The reply-to, if any (not stored).
    pub reply: Option<&'a str>,
    /// The encoded header block: `count` then the pairs; empty without the headers flag.
    pub header_block: &'a [u8],
    /// The payload.
    pub payload: &'a [u8],
}

impl<'a> StoredParts<'a> {
    /// Takes an encoded body apart.
    ///
    /// # Errors
    /// As [`Body::parse`].
    pub fn of(raw: &'a [u8]) -> Result<StoredParts<'a>, &'static str> {
        let l = Layout::of(raw)?;
        let has_headers = raw.first().is_some_and(|f| f & FLAG_HEADERS != 0);
        let header_block = if has_headers {
            &raw[l.headers.start - 2..l.payload]
        } else {
            &[]
        };
        Ok(StoredParts {
            topic: as_str(raw, l.topic),
            reply: l.reply.map(|r| as_str(raw, r)),
            header_block,
            payload: &raw[l.payload..],
        })
    }

    /// The value of the first header named `key`, if any.
    pub fn header(&self, key: &str) -> Option<&'a str> {
        header_in_block(self.header_block, key)
    }

    /// The body a stream delivers for these parts: no reply-to, the header block as stored.
    pub fn encode_stored(&self) -> Bytes {
        encode_stored(self.topic.as_bytes(), self.header_block, self.payload)
    }
}

/// Encodes the body of a stored message: flags (headers when `header_block` is not empty), the
/// topic, the header block as stored, the payload.
pub fn encode_stored(topic: &[u8], header_block: &[u8], payload: &[u8]) -> Bytes {
    let mut b = BytesMut::with_capacity(3 + topic.len() + header_block.len() + payload.len());
    b.put_u8(if header_block.is_empty() {
        0
    } else {
        FLAG_HEADERS
    });
    b.put_u16(topic.len().min(u16::MAX as usize) as u16);
    b.put_slice(&topic[..topic.len().min(u16::MAX as usize)]);
    b.put_slice(header_block);
    b.put_slice(payload);
    b.freeze()
}

/// The value of the first header named `key` in an encoded header block (`count`, then the
/// pairs), if the block holds one; a malformed block holds none.
pub fn header_in_block<'a>(block: &'a [u8], key: &str) -> Option<&'a str> {
    let n = block.get(..2)?;
    let count = u16::from_be_bytes([n[0], n[1]]);
    let mut pos = 2;
    for _ in 0..count {
        let (k, next) = str16(block, pos, "").ok()?;
        let (v, next) = str16(block, next, "").ok()?;
        if &block[k] == key.as_bytes() {
            return Some(as_str(block, v));
        }
        pos = next;
    }
    None
}

/// The fields of a body to be written, borrowed from the caller.
#[derive(Debug, Clone, Copy)]
pub struct BodyBuilder<'a> {
    /// Topic (the caller has validated it).
    pub topic: &'a str,
    /// Optional reply-to.
    pub reply: Option<&'a str>,
    /// Optional headers; `Some` of an empty list still sets the headers flag.
    pub headers: Option<&'a Headers>,
    /// Payload bytes.
    pub payload: &'a [u8],
}

impl BodyBuilder<'_> {
    /// Encoded length in bytes.
    pub fn len(&self) -> usize {
        let mut n = 1 + 2 + self.topic.len();
        if let Some(r) = self.reply {
            n += 2 + r.len();
        }
        if let Some(h) = self.headers {
            n += 2 + h.iter().map(|(k, v)| 4 + k.len() + v.len()).sum::<usize>();
        }
        n + self.payload.len()
    }

    /// Never true.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// Whether every string fits a `str16` and the header count fits a `u16`.
    pub fn fits(&self) -> bool {
        let ok = |s: &str| s.len() <= u16::MAX as usize;
        ok(self.topic)
            && self.reply.is_none_or(ok)
            && self.headers.is_none_or(|h| {
                h.len() <= u16::MAX as usize && h.iter().all(|(k, v)| ok(k) && ok(v))
            })
    }

    /// Appends the encoded body to `dst`. Check [`BodyBuilder::fits`] first: a string longer than
    /// `u16::MAX` bytes would corrupt the frame.
    pub fn put(&self, dst: &mut BytesMut) {
        let mut flags = 0;
        if self.reply.is_some() {
            flags |= FLAG_REPLY;
        }
        if self.headers.is_some() {
            flags |= FLAG_HEADERS;
        }
        dst.put_u8(flags);
        put_str16(dst, self.topic);
        if let Some(r) = self.reply {
            put_str16(dst, r);
        }
        if let Some(h) = self.headers {
            dst.put_u16(h.len() as u16);
            for (k, v) in h.iter() {
                put_str16(dst, k);
                put_str16(dst, v);
            }
        }
        dst.put_slice(self.payload);
    }
}

/// Appends a `str16`: a big-endian `u16` length, then the bytes.
pub(crate) fn put_str16(dst: &mut BytesMut, s: &str) {
    dst.put_u16(s.len() as u16);
    dst.put_slice(s.as_bytes());
}

#[cfg(test)]
mod tests {

    #[test]
    fn stored_parts_drop_the_reply_and_keep_the_header_block() {
        let mut h = Headers::new();
        h.insert("Brokerd-Msg-Id", "o-1").insert("k", "v");
        let raw = Body::encode("order.created", Some("_INBOX.x"), Some(&h), b"{}");
        let parts = StoredParts::of(&raw).unwrap();
        assert_eq!(parts.topic, "order.created");
        assert_eq!(parts.reply, Some("_INBOX.x"));
        assert_eq!(parts.header("Brokerd-Msg-Id"), Some("o-1"));
        assert_eq!(parts.header("k"), Some("v"));
        assert_eq!(parts.header("missing"), None);
        let stored = Body::parse(parts.encode_stored()).unwrap();
        assert_eq!(stored.topic(), "order.created");
        assert_eq!(stored.reply(), None);
        assert_eq!(stored.headers_owned(), h);
        assert_eq!(&stored.payload()[..], b"{}");
        let plain = Body::encode("a", None, None, b"x");
        let parts = StoredParts::of(&plain).unwrap();
        assert!(parts.header_block.is_empty());
        assert_eq!(parts.encode_stored(), plain);
        let empty = Body::encode("a", None, Some(&Headers::new()), b"");
        assert_eq!(StoredParts::of(&empty).unwrap().encode_stored(), empty);
    }
    use super::*;

    #[test]
    fn round_trip_all_fields() {
        let mut h = Headers::new();
        h.insert("content-type", "application/json").insert("k", "");
        let raw = Body::encode("order.created", Some("_INBOX.1"), Some(&h), b"{\"id\":1}");
        let b = Body::parse(raw.clone()).unwrap();
        assert_eq!(b.topic(), "order.created");
        assert_eq!(b.reply(), Some("_INBOX.1"));
        assert_eq!(b.headers_owned(), h);
        assert_eq!(&b.payload()[..], b"{\"id\":1}");
        assert_eq!(b.raw(), &raw);
    }

    #[test]
    fn minimal() {
        let raw = Body::encode("a", None, None, b"");
        assert_eq!(&raw[..], &[0, 0, 1, b'a']);
        let b = Body::parse(raw).unwrap();
        assert_eq!(b.reply(), None);
        assert!(!b.has_headers());
        assert_eq!(b.payload_len(), 0);
    }

    #[test]
    fn rejects_structure_faults() {
        assert!(Body::parse(Bytes::from_static(&[])).is_err());
        assert!(Body::parse(Bytes::from_static(&[0x04, 0, 1, b'a'])).is_err());
        assert!(Body::parse(Bytes::from_static(&[0, 0, 5, b'a'])).is_err());
        assert!(Body::parse(Bytes::from_static(&[0, 0, 1, 0xff])).is_err());
        assert!(Body::parse(Bytes::from_static(&[1, 0, 1, b'a', 0])).is_err());
        assert!(Body::parse(Bytes::from_static(&[2, 0, 1, b'a', 0, 1, 0, 0])).is_err());
    }
}
