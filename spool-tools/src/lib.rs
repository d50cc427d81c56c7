//! The portable mxspool spool archive (format version 1, described in `FORMAT.md`) and
//! the library behind the `spool-tools` binary.
//!
//! An archive is a tar stream, plain or gzip-compressed, whose members all live under
//! `mxspool-archive/`: first `FORMAT` (`mxspool-archive 1`), then for each message
//! `messages/ID.json` (its [`ArchivedEnvelope`]) and `messages/ID.eml` (its raw bytes),
//! last `manifest.json` with the SHA-256 of every message member.
//!
//! Modules:
//! - `envelope`: [`ArchivedEnvelope`] and its parts, plain serde data, and the id rule.
//! - `manifest`: member names, [`ArchiveMeta`], the manifest.
//! - `writer`: [`ArchiveWriter`] over any `Write`; [`create_file`], whose
//!   [`FileArchiveWriter::finish`] returns only once the file is synced under its name.
//! - `reader`: [`ArchiveReader::open`] verifies the whole archive in a first pass (format
//!   version first, then every checksum, no member missing or extra); the good messages
//!   are then read one at a time in a second pass, each streamed from the archive as a
//!   [`MessageBytes`] ([`ArchiveReader::for_each_message`], [`ArchiveReader::with_message`];
//!   [`ArchiveReader::for_each_entry`] for whole ones in memory); damaged ones are listed
//!   as [`Problem`]s and never given out.
//!
//! - `terminal`: bytes from mail or archives made safe to show on a terminal.
//! - `cli`: the `spool-tools` command line (clap), shared with the packaging tool.
//!
//! The library does no network I/O and needs no async runtime.
//!
//! ```no_run
//! use spool_tools::{create_file, ArchiveMeta, ArchiveReader};
//! # fn envelopes() -> Vec<(spool_tools::ArchivedEnvelope, Vec<u8>)> { vec![] }
//! # fn main() -> Result<(), spool_tools::Error> {
//! let mut w = create_file("example.com.tar.gz", ArchiveMeta::new("backup.example.net", Some("example.com".into())))?;
//! for (env, bytes) in envelopes() {
//!     w.add(&env, &bytes)?;
//! }
//! w.finish()?; // synced and renamed into place: now the spool copies may go
//!
//! let r = ArchiveReader::open("example.com.tar.gz")?;
//! for p in r.problems() {
//!     eprintln!("skipped {p}");
//! }
//! r.for_each_entry(|e| {
//!     println!("{} {} bytes", e.envelope.id, e.message.len());
//!     Ok::<(), spool_tools::Error>(())
//! })?;
//! # Ok(()) }
//! ```

pub mod cli;
mod envelope;
mod error;
mod manifest;
mod reader;
pub mod terminal;
mod writer;

pub use envelope::{
    format_time, is_valid_id, ArchivedDsn, ArchivedEnvelope, ArchivedRecipient, BodyType, Notify,
    RecipientState, Ret, MAX_ID_LEN,
};
pub use error::{Error, Result};
pub use manifest::{ArchiveMeta, FORMAT_NAME};
pub use reader::{ArchiveReader, Compression, Entry, MessageBytes, Problem, ReadOptions, CHUNK};
pub use writer::{create_file, create_file_replacing, ArchiveWriter, FileArchiveWriter};

/// The archive format version this build writes and reads.
pub const FORMAT_VERSION: u32 = 1;
