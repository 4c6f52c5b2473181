//! The brokerd wire format, with no I/O and no runtime.
//!
//! Layout:
//! - [`frame`]: the frames, their byte layout, encode and decode.
//! - [`body`]: the message body shared by `PUB` and `MSG` (topic, reply-to, headers, payload).
//! - [`topic`]: validated [`Topic`] and [`Filter`] newtypes and their limits.
//! - [`error`]: decode errors and the numeric error codes carried by `ERR` frames.
//! - [`stats`]: the broker's statistics as typed values (the `$SYS.req.stats` answer, and the
//!   monitoring endpoints).
//! - [`streams`]: stream management requests and answers (`$SYS.req.stream.<op>`).
//!
//! `docs/protocol.md` is the normative description; `docs/protocol-vectors.txt` holds hex test
//! vectors that this crate's tests read.

// The workspace warns on unwrap/expect; unit tests may use them.
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used))]

pub mod body;
pub mod error;
pub mod frame;
pub mod stats;
pub mod streams;
pub mod topic;

pub use body::{Body, BodyBuilder, BodyRef, Headers, StoredParts, encode_stored, header_in_block};
pub use error::{DecodeError, ErrorCode};
pub use frame::{
    AckKind, ConsumerSpec, Credentials, ErrorFrame, Frame, FrameType, Hello, Lost, MAX_HELLO_LEN,
    MSG_HEADER_LEN, Mack, Msg, OverflowPolicy, PROTOCOL_VERSION, PubRef, Publish, StartPosition,
    Stored, StreamStart, Subscribe, Unsubscribe, Welcome, decode, encode_msg_header, encode_pub,
    peek_pub, take_msg,
};
pub use topic::{Filter, Topic, TopicError, TopicLimits};
