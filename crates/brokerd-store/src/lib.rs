//! brokerd's durable storage: an append-only segment log for one stream, synchronous and
//! runtime-free, driven by the broker from a dedicated storage thread.
//!
//! `docs/storage.md` specifies the on-disk format and the recovery and retention rules.
//!
//! Layout:
//! - [`format`]: the byte layouts of a record and an index entry, and the file names.
//! - `segment`: reading one segment file in bounded chunks, finding damage, scanning.
//! - [`stream`]: [`Stream`]: open and recover, append, sync, roll, retention, purge.
//! - [`reader`]: [`Reader`]: records in order from a sequence.
//! - [`error`]: the one error type, [`StoreError`].

pub mod error;
pub mod format;
pub mod reader;
mod segment;
pub mod stream;

pub use error::{Result, StoreError};
pub use format::{Append, Record};
pub use reader::Reader;
pub use stream::{Corruption, FsyncPolicy, Options, PendingSync, Recovery, Stream};
