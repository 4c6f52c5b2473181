//! The on-disk byte layouts: one record in a segment file, one entry in an index file, and
//! the file names. `docs/storage.md` is the normative description; this module is its
//! reference implementation. No I/O happens here: callers hand in byte slices.

use bytes::Bytes;

/// The first byte of every record: the format's magic number and version in one.
/// A different value at a record boundary means "not a record of this version".
pub const RECORD_MAGIC: u8 = 0xB1;

/// Bytes before the body: magic (1), length (4), CRC32C (4).
pub const RECORD_PREFIX: usize = 9;

/// Fixed body bytes before the topic: sequence (8), timestamp (8), topic length (2),
/// headers length (4).
pub const BODY_FIXED: usize = 22;

/// The smallest valid record on disk: empty topic, headers and payload.
pub const MIN_RECORD_BYTES: usize = RECORD_PREFIX + BODY_FIXED;

/// The largest record this version writes or accepts on disk (64 MiB). A length prefix above
/// it is treated as corruption, which bounds what a damaged length can make a reader allocate.
pub const MAX_RECORD_BYTES: usize = 64 << 20;

/// Bytes in one index entry.
pub const INDEX_ENTRY_BYTES: usize = 32;

/// Width of the zero-padded first sequence in a segment's file name.
const NAME_DIGITS: usize = 20;

/// One stored message, as a reader returns it.
///
/// The three byte fields share one allocation (the record's body, copied once from the read
/// buffer), so cloning a `Record` or handing its payload to many subscribers copies nothing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// The stream sequence number, assigned by [`crate::Stream::append`].
    pub seq: u64,
    /// Unix time in nanoseconds, never lower than the previous record's.
    pub timestamp: u64,
    /// The topic the message was published to, UTF-8 when written by [`crate::Stream`].
    pub topic: Bytes,
    /// The broker's encoded header block, opaque here; empty when the message had none.
    pub headers: Bytes,
    /// The message payload.
    pub payload: Bytes,
}

impl Record {
    /// The topic as text, or `None` if the stored bytes are not UTF-8 (only possible for a
    /// file not written by this crate, since the CRC guards what it wrote).
    pub fn topic_str(&self) -> Option<&str> {
        std::str::from_utf8(&self.topic).ok()
    }
}

/// The fields of a record before it is encoded, borrowed from the caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Append<'a> {
    /// The topic the message was published to.
    pub topic: &'a str,
    /// The encoded header block, or `&[]` for none.
    pub headers: &'a [u8],
    /// The message payload.
    pub payload: &'a [u8],
    /// Unix time in nanoseconds; see [`crate::Stream::append`] for how it is clamped.
    pub timestamp: u64,
}

impl Append<'_> {
    /// The record's size on disk, or `None` if it exceeds [`MAX_RECORD_BYTES`] or the topic
    /// exceeds 65535 bytes.
    pub fn encoded_len(&self) -> Option<usize> {
        if self.topic.len() > usize::from(u16::MAX) {
            return None;
        }
        let n = MIN_RECORD_BYTES
            .checked_add(self.topic.len())?
            .checked_add(self.headers.len())?
            .checked_add(self.payload.len())?;
        (n <= MAX_RECORD_BYTES).then_some(n)
    }
}

/// Appends the encoding of one record to `out`. The caller has checked
/// [`Append::encoded_len`]; the casts below rely on that bound.
pub(crate) fn encode_record(out: &mut Vec<u8>, seq: u64, rec: &Append<'_>) {
    let start = out.len();
    let body_len = BODY_FIXED + rec.topic.len() + rec.headers.len() + rec.payload.len();
    out.push(RECORD_MAGIC);
    // length counts the CRC and the body; bounded by MAX_RECORD_BYTES, so it fits in u32.
    out.extend_from_slice(&((4 + body_len) as u32).to_be_bytes());
    out.extend_from_slice(&[0; 4]);
    out.extend_from_slice(&seq.to_be_bytes());
    out.extend_from_slice(&rec.timestamp.to_be_bytes());
    out.extend_from_slice(&(rec.topic.len() as u16).to_be_bytes());
    out.extend_from_slice(&(rec.headers.len() as u32).to_be_bytes());
    out.extend_from_slice(rec.topic.as_bytes());
    out.extend_from_slice(rec.headers);
    out.extend_from_slice(rec.payload);
    let crc = crc32c::crc32c(&out[start + RECORD_PREFIX..]);
    out[start + 5..start + 9].copy_from_slice(&crc.to_be_bytes());
}

/// What the bytes at a record boundary turned out to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Probe {
    /// A whole, valid record of `len` bytes with this sequence and timestamp.
    Valid {
        len: usize,
        seq: u64,
        timestamp: u64,
    },
    /// The prefix is plausible but more bytes than `available` are needed to judge it.
    NeedMore { len: usize },
    /// Not a valid record: wrong magic, impossible length, bad CRC or inconsistent fields.
    /// `claimed` is the record length the prefix announces when that is plausible, so the
    /// caller can try the next boundary after it.
    Invalid { claimed: Option<usize> },
}

/// Examines the bytes at a record boundary. `buf` starts at the boundary and may hold less
/// than a whole record; `remaining_in_file` bounds the plausible length.
pub(crate) fn probe(buf: &[u8], remaining_in_file: u64) -> Probe {
    if buf.len() < RECORD_PREFIX {
        return if (buf.len() as u64) < remaining_in_file && buf.first() == Some(&RECORD_MAGIC) {
            Probe::NeedMore { len: RECORD_PREFIX }
        } else {
            Probe::Invalid { claimed: None }
        };
    }
    if buf[0] != RECORD_MAGIC {
        return Probe::Invalid { claimed: None };
    }
    let length = be_u32(&buf[1..5]) as usize;
    let len = 5 + length;
    if !(MIN_RECORD_BYTES..=MAX_RECORD_BYTES).contains(&len) || len as u64 > remaining_in_file {
        return Probe::Invalid { claimed: None };
    }
    if buf.len() < len {
        return Probe::NeedMore { len };
    }
    let body = &buf[RECORD_PREFIX..len];
    if crc32c::crc32c(body) != be_u32(&buf[5..9]) {
        return Probe::Invalid { claimed: Some(len) };
    }
    let topic_len = usize::from(be_u16(&body[16..18]));
    let headers_len = be_u32(&body[18..22]) as usize;
    if BODY_FIXED + topic_len + headers_len > body.len() {
        return Probe::Invalid { claimed: Some(len) };
    }
    Probe::Valid {
        len,
        seq: be_u64(&body[0..8]),
        timestamp: be_u64(&body[8..16]),
    }
}

/// Decodes a record that [`probe`] reported `Valid` with length `len`.
pub(crate) fn decode_valid(buf: &[u8], len: usize) -> Record {
    let body = Bytes::copy_from_slice(&buf[RECORD_PREFIX..len]);
    let topic_len = usize::from(be_u16(&body[16..18]));
    let headers_len = be_u32(&body[18..22]) as usize;
    let topic_end = BODY_FIXED + topic_len;
    let headers_end = topic_end + headers_len;
    Record {
        seq: be_u64(&body[0..8]),
        timestamp: be_u64(&body[8..16]),
        topic: body.slice(BODY_FIXED..topic_end),
        headers: body.slice(topic_end..headers_end),
        payload: body.slice(headers_end..),
    }
}

/// One entry of a segment's sparse index: where one record starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct IndexEntry {
    /// The record's sequence.
    pub seq: u64,
    /// The record's timestamp.
    pub timestamp: u64,
    /// The record's byte offset in the segment file.
    pub offset: u64,
    /// How many valid records precede it in the segment.
    pub ordinal: u32,
}

impl IndexEntry {
    /// The 32-byte encoding: four big-endian fields and a CRC32C of the first 28 bytes.
    pub fn encode(&self) -> [u8; INDEX_ENTRY_BYTES] {
        let mut b = [0; INDEX_ENTRY_BYTES];
        b[0..8].copy_from_slice(&self.seq.to_be_bytes());
        b[8..16].copy_from_slice(&self.timestamp.to_be_bytes());
        b[16..24].copy_from_slice(&self.offset.to_be_bytes());
        b[24..28].copy_from_slice(&self.ordinal.to_be_bytes());
        let crc = crc32c::crc32c(&b[0..28]);
        b[28..32].copy_from_slice(&crc.to_be_bytes());
        b
    }

    /// Decodes one entry, or `None` if its CRC does not match.
    pub fn decode(b: &[u8]) -> Option<IndexEntry> {
        if b.len() != INDEX_ENTRY_BYTES || crc32c::crc32c(&b[0..28]) != be_u32(&b[28..32]) {
            return None;
        }
        Some(IndexEntry {
            seq: be_u64(&b[0..8]),
            timestamp: be_u64(&b[8..16]),
            offset: be_u64(&b[16..24]),
            ordinal: be_u32(&b[24..28]),
        })
    }
}

/// The file name of the segment whose first sequence is `first_seq`, with `ext` "log" or "idx".
pub fn segment_file_name(first_seq: u64, ext: &str) -> String {
    format!("{first_seq:0NAME_DIGITS$}.{ext}")
}

/// The first sequence encoded in a segment log's file name, or `None` if the name is not one.
pub fn parse_segment_name(name: &str) -> Option<u64> {
    let digits = name.strip_suffix(".log")?;
    if digits.len() != NAME_DIGITS || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

fn be_u16(b: &[u8]) -> u16 {
    u16::from_be_bytes([b[0], b[1]])
}

fn be_u32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

fn be_u64(b: &[u8]) -> u64 {
    let mut a = [0; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_be_bytes(a)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<u8> {
        let mut out = Vec::new();
        let rec = Append {
            topic: "orders.eu",
            headers: b"",
            payload: b"hi",
            timestamp: 1_700_000_000_000_000_000,
        };
        encode_record(&mut out, 1, &rec);
        out
    }

    #[test]
    fn record_round_trip() {
        let buf = sample();
        assert_eq!(buf.len(), MIN_RECORD_BYTES + 9 + 2);
        let Probe::Valid {
            len,
            seq,
            timestamp,
        } = probe(&buf, buf.len() as u64)
        else {
            panic!("not valid");
        };
        assert_eq!(
            (len, seq, timestamp),
            (buf.len(), 1, 1_700_000_000_000_000_000)
        );
        let r = decode_valid(&buf, len);
        assert_eq!(r.topic_str(), Some("orders.eu"));
        assert_eq!(&r.payload[..], b"hi");
        assert!(r.headers.is_empty());
    }

    /// The worked example in docs/storage.md, byte for byte.
    #[test]
    fn documented_example() {
        let hex: String = sample().iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(
            hex,
            "b1000000252ef7d6b2000000000000000117979cfe362a00000009000000006f72646572732e65756869"
        );
    }

    #[test]
    fn every_flipped_byte_is_detected() {
        let buf = sample();
        for i in 0..buf.len() {
            let mut b = buf.clone();
            b[i] ^= 0x40;
            assert!(
                !matches!(probe(&b, b.len() as u64), Probe::Valid { .. }),
                "byte {i}"
            );
        }
    }

    #[test]
    fn short_buffers_ask_for_more() {
        let buf = sample();
        for cut in 1..buf.len() {
            assert!(
                matches!(probe(&buf[..cut], buf.len() as u64), Probe::NeedMore { .. }),
                "cut {cut}"
            );
            assert!(
                matches!(probe(&buf[..cut], cut as u64), Probe::Invalid { .. }),
                "cut {cut} at end of file"
            );
        }
    }

    /// The index entry example in docs/storage.md.
    #[test]
    fn documented_index_entry() {
        let e = IndexEntry {
            seq: 1,
            timestamp: 1_700_000_000_000_000_000,
            offset: 0,
            ordinal: 0,
        };
        let hex: String = e.encode().iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(
            hex,
            "000000000000000117979cfe362a0000000000000000000000000000e1606b7a"
        );
    }

    #[test]
    fn index_entry_round_trip() {
        let e = IndexEntry {
            seq: 7,
            timestamp: 9,
            offset: 1234,
            ordinal: 3,
        };
        assert_eq!(IndexEntry::decode(&e.encode()), Some(e));
        let mut b = e.encode();
        b[3] ^= 1;
        assert_eq!(IndexEntry::decode(&b), None);
    }

    #[test]
    fn names() {
        assert_eq!(segment_file_name(1, "log"), "00000000000000000001.log");
        assert_eq!(parse_segment_name("00000000000000000001.log"), Some(1));
        assert_eq!(parse_segment_name("00000000000000000001.idx"), None);
        assert_eq!(parse_segment_name("1.log"), None);
    }
}
