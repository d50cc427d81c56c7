//! The spool: the durable store of queued mail, and the only module that names `rocksdb`.
//!
//! It owns one RocksDB directory with five column families (keys built only in `keys.rs`,
//! numbers big-endian): `meta` (`format` → format version, checked at open), `messages`
//! (id → the raw message bytes, stored once however many domains it goes to; large values
//! go to blob files), `envelopes` (id → JSON [`StoredEnvelope`]: the [`Envelope`] and the
//! domains still queued), `queue` (domain 0x00 id → JSON [`QueueEntry`] for that domain's
//! recipients, so a domain is one contiguous key range) and `due` (next_attempt_ms BE,
//! domain 0x00 id → empty, scanned from the front for due work). Every change is one
//! [`Batch`] of plain puts and deletes, applied atomically. All writes go through a single
//! `spool-writer` thread (`writer.rs`) that group-commits the waiting batches into one
//! `WriteBatch` written with a synced WAL. Invariant: a caller of [`Spool::enqueue`] hears
//! `Ok` (and so the SMTP client hears `250`) only after the writer's synced commit that
//! contains its batch; on any failure every waiter of that commit gets the error. The
//! exceptions, the callout and MTA-STS caches in `meta` (`cache.rs`), are written in lazy
//! batches that the writer commits without a sync when nothing else is in the group.

mod batch;
mod cache;
mod keys;
mod mark;
mod parts;
mod recover;
mod slot;
#[cfg(test)]
mod tests;
mod usage;
mod writer;

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rocksdb::{
    ColumnFamily, ColumnFamilyDescriptor, DBCompressionType, Direction, IteratorMode, Options,
    ReadOptions, WriteOptions, DB,
};
use serde::{Deserialize, Serialize};

pub use batch::{Batch, Op, Parts};
pub use cache::{CalloutAnswer, CalloutRefusal, StsRecord};
pub use keys::Cf;
pub use parts::{Message, MessageReader};
pub use recover::{recover, Recovery};
pub use usage::{Usage, UsageTable};

use crate::envelope::{Envelope, RcptState, Recipient};
use writer::Writer;

/// Free space RocksDB needs beyond the mail it stores: a flush of every memory table (the
/// sum of the families' write buffers, 64 MiB; with less free, RocksDB stops all writes and
/// resumes only once that much is free again) and room for a compaction's output (64 MiB).
/// `[queue] min_free_space` may not be less.
pub const SPACE_FOR_ROCKSDB: u64 = 128 << 20;

/// The on-disk format this build writes (key `format` of the `meta` family). Version 2
/// stores large messages in parts ([`keys::part`]); version 3 keeps each domain's queue
/// counters (`usage.rs`) in the commits that change the queue. An older spool is read as
/// it is (its counters counted in memory) and, when opened for writing, gets its counters
/// from one scan and is marked version 3, so an older mxspool, which would see only the
/// first part of a message or let the counters drift, refuses it.
pub const FORMAT_VERSION: u32 = 3;

/// Format versions this build reads.
const FORMATS_READ: [u32; 3] = [1, 2, 3];

/// The first format with stored counters.
const FORMAT_WITH_USAGE: u32 = 3;

/// Size of the parts a large message is stored in, and read back in: what one session or
/// one delivery holds of a message at a time.
pub const PART_SIZE: usize = 256 << 10;

/// Why a spool operation failed. The SMTP layer maps [`SpoolError::is_no_space`] to
/// `452 4.3.1` and everything else to `451 4.3.0`.
#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    #[error("spool {} is in use by another process (is mxspool serve running?)", path.display())]
    Locked { path: PathBuf },
    #[error(
        "spool format version {found} is not supported (this mxspool reads version {expected})"
    )]
    Format { found: u32, expected: u32 },
    #[error("no space left on the spool's file system")]
    NoSpace,
    #[error("spool I/O error: {0}")]
    Io(#[from] std::io::Error),
    #[error("spool database error: {0}")]
    Db(String),
    #[error("spool data is corrupt: {0}")]
    Corrupt(String),
    #[error("spool writer has stopped")]
    Closed,
    #[error("spool {} does not exist", path.display())]
    Missing { path: PathBuf },
    #[error(
        "spool {} is damaged: {what}; `mxspool recover` keeps what can be read and makes it servable",
        path.display()
    )]
    Damaged { path: PathBuf, what: String },
    #[error("spool is open read-only")]
    ReadOnly,
    #[error("cannot spool: {0}")]
    Invalid(String),
}

/// Why [`Spool::import_blocking`] added nothing.
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    /// The message could not be read from where it came from.
    #[error("{0}")]
    Read(std::io::Error),
    #[error(transparent)]
    Spool(#[from] SpoolError),
}

impl SpoolError {
    /// Out of disk space or quota: a temporary, "come back later" condition.
    pub fn is_no_space(&self) -> bool {
        match self {
            SpoolError::NoSpace => true,
            SpoolError::Io(e) => matches!(e.raw_os_error(), Some(libc::ENOSPC | libc::EDQUOT)),
            _ => false,
        }
    }

    /// The same error again, for the many waiters of one failed commit.
    fn duplicate(&self) -> SpoolError {
        match self {
            SpoolError::Locked { path } => SpoolError::Locked { path: path.clone() },
            SpoolError::Format { found, expected } => SpoolError::Format {
                found: *found,
                expected: *expected,
            },
            SpoolError::NoSpace => SpoolError::NoSpace,
            SpoolError::Io(e) => SpoolError::Io(match e.raw_os_error() {
                Some(code) => std::io::Error::from_raw_os_error(code),
                None => std::io::Error::new(e.kind(), e.to_string()),
            }),
            SpoolError::Db(s) => SpoolError::Db(s.clone()),
            SpoolError::Corrupt(s) => SpoolError::Corrupt(s.clone()),
            SpoolError::Closed => SpoolError::Closed,
            SpoolError::Missing { path } => SpoolError::Missing { path: path.clone() },
            SpoolError::Damaged { path, what } => SpoolError::Damaged {
                path: path.clone(),
                what: what.clone(),
            },
            SpoolError::ReadOnly => SpoolError::ReadOnly,
            SpoolError::Invalid(s) => SpoolError::Invalid(s.clone()),
        }
    }
}

fn map_db_error(e: rocksdb::Error, path: &Path) -> SpoolError {
    map_db_message(e.into_string(), path)
}

/// RocksDB reports everything as a string; sort out the cases callers act on.
fn map_db_message(msg: String, path: &Path) -> SpoolError {
    let lock_file = msg.contains("/LOCK")
        && (msg.contains("Resource temporarily unavailable") || msg.contains("No locks available"));
    if msg.contains("No space left on device") || msg.contains("Disk quota exceeded") {
        SpoolError::NoSpace
    } else if msg.contains("lock hold by current process")
        || msg.contains("While lock file")
        || lock_file
    {
        SpoolError::Locked {
            path: path.to_path_buf(),
        }
    } else if msg.starts_with("Corruption") {
        SpoolError::Corrupt(msg)
    } else {
        SpoolError::Db(msg)
    }
}

/// A queue entry that cannot be read: skipped by listings and by delivery, removed by
/// `mxspool recover`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Unreadable {
    pub domain: String,
    pub id: String,
    pub what: String,
}

impl Unreadable {
    fn new(domain: &str, id: &str, what: &str) -> Unreadable {
        Unreadable {
            domain: domain.to_string(),
            id: id.to_string(),
            what: what.to_string(),
        }
    }
}

impl std::fmt::Display for Unreadable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}: the {} queue entry cannot be read, skipped ({}; `mxspool recover` removes it)",
            self.id, self.domain, self.what
        )
    }
}

/// A place in the `due` index to continue a scan from ([`Spool::due_after`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DueCursor(Vec<u8>);

/// What [`Spool::due_after`] found: `(domain, id)` pairs and where to continue.
pub type DueScan = (Vec<(String, String)>, Option<DueCursor>);

/// What `envelopes` holds for a message: the envelope and the domains that still have a
/// queue entry for it (the message is deleted when the last one goes).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredEnvelope {
    pub envelope: Envelope,
    pub domains: Vec<String>,
    /// Parts of the message after the first (see [`keys::part`]); 0 for a message stored
    /// whole.
    #[serde(default, skip_serializing_if = "is_zero_u32")]
    pub parts: u32,
    /// Bytes of the whole message when it has parts.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub length: u64,
}

/// What `queue` holds for one message and one recipient domain.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueEntry {
    /// Only this domain's recipients.
    pub recipients: Vec<Recipient>,
    pub attempts: u32,
    pub next_attempt_ms: u64,
    pub last_error: Option<String>,
    pub held: bool,
    /// A delay warning DSN has been sent for this entry.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub warned: bool,
    /// When the entry's domain was put on hold (or the entry arrived held), ms.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub held_since_ms: u64,
    /// Time spent held so far, ms: it does not count toward `max_lifetime`.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub held_ms: u64,
    /// The last attempt's SMTP session: where, and its TLS state (`None` when the last
    /// attempt reached no SMTP server).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_tls: Option<LastTls>,
}

/// Where the last attempt went and how its session was protected (`queue --json`'s
/// `last_tls`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LastTls {
    /// `host[ip]:port`.
    pub relay: String,
    #[serde(flatten)]
    pub state: crate::tls::TlsState,
}

fn is_zero(v: &u64) -> bool {
    *v == 0
}

fn is_zero_u32(v: &u32) -> bool {
    *v == 0
}

impl QueueEntry {
    /// Whether any recipient still waits for delivery.
    pub fn has_pending(&self) -> bool {
        self.recipients
            .iter()
            .any(|r| r.state == RcptState::Pending)
    }
}

macro_rules! json_record {
    ($t:ty, $what:literal) => {
        impl $t {
            pub fn to_bytes(&self) -> Vec<u8> {
                serde_json::to_vec(self).expect("plain data serializes")
            }

            pub fn from_bytes(bytes: &[u8]) -> Result<Self, SpoolError> {
                serde_json::from_slice(bytes)
                    .map_err(|e| SpoolError::Corrupt(format!(concat!("bad ", $what, ": {}"), e)))
            }
        }
    };
}
json_record!(StoredEnvelope, "envelope record");
json_record!(QueueEntry, "queue entry");

/// One message's queue entry for one domain, as `mxspool queue` shows it.
#[derive(Clone, Debug, Serialize)]
pub struct QueuedMessage {
    pub id: String,
    pub domain: String,
    pub sender: String,
    /// Only this domain's recipients.
    pub recipients: Vec<Recipient>,
    pub arrival_ms: u64,
    pub size: u64,
    pub attempts: u32,
    pub next_attempt_ms: u64,
    pub last_error: Option<String>,
    pub last_tls: Option<LastTls>,
    pub held: bool,
}

impl QueuedMessage {
    /// The object of one line of `mxspool queue --json` (like `postqueue -j`).
    pub fn to_json(&self) -> serde_json::Value {
        let recipients: Vec<_> = self
            .recipients
            .iter()
            .map(|r| {
                let state = match r.state {
                    RcptState::Pending => "pending",
                    RcptState::Delivered => "delivered",
                    RcptState::Failed => "failed",
                };
                serde_json::json!({ "address": r.address, "state": state })
            })
            .collect();
        serde_json::json!({
            "id": self.id,
            "domain": self.domain,
            "sender": self.sender,
            "recipients": recipients,
            "arrival": rfc3339(self.arrival_ms),
            "size": self.size,
            "attempts": self.attempts,
            "next_attempt": rfc3339(self.next_attempt_ms),
            "last_error": self.last_error,
            "last_tls": self.last_tls,
            "held": self.held,
        })
    }
}

/// Milliseconds since the epoch as RFC 3339 UTC (`2024-05-01T12:00:00Z`).
fn rfc3339(ms: u64) -> String {
    let t = i64::try_from(ms)
        .ok()
        .and_then(chrono::DateTime::from_timestamp_millis)
        .unwrap_or(chrono::DateTime::<chrono::Utc>::MAX_UTC);
    t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

/// The mail spool. Cheap to clone; the last clone dropped stops the writer thread (after
/// it has answered every request already sent) and closes the database.
#[derive(Clone)]
pub struct Spool {
    inner: Arc<Inner>,
}

/// Read-modify-write operations on one message (its queue entries and envelope record) hold
/// the stripe of its id across the commit, so two of them never interleave.
const LOCK_STRIPES: usize = 256;

struct Inner {
    // Dropped first: joins the writer thread, which holds its own Arc of the database.
    writer: Option<Writer>,
    locks: Vec<tokio::sync::Mutex<()>>,
    /// Held domains → held since (ms); mirrors the `hold` keys of `meta`.
    holds: std::sync::RwLock<std::collections::HashMap<String, u64>>,
    /// Bytes of messages removed since the last [`Spool::reclaim`].
    removed: std::sync::atomic::AtomicU64,
    /// A background reclaim is started or running (at most one is queued).
    reclaiming: Arc<std::sync::atomic::AtomicBool>,
    /// Held by the [`Spool::reclaim`] running: reclaims run one after the other, so one
    /// that starts while another runs still sees (and compacts) what was removed since.
    reclaim_lock: std::sync::Mutex<()>,
    /// Unreadable entries already logged: `(domain, id)`.
    unreadable: std::sync::Mutex<std::collections::HashSet<(String, String)>>,
    /// Each domain's queue counters, as committed.
    usage: UsageTable,
    /// The callout answers stored (`cache.rs`).
    callouts: cache::Stored,
    /// The MTA-STS policies stored (`cache.rs`).
    sts: cache::Stored,
    db: Arc<slot::DbSlot>,
    path: PathBuf,
}

fn load_holds(db: &DB, path: &Path) -> Result<std::collections::HashMap<String, u64>, SpoolError> {
    let mut holds = std::collections::HashMap::new();
    let iter = db.iterator_cf(
        cf(db, Cf::Meta)?,
        IteratorMode::From(keys::HOLD_PREFIX, Direction::Forward),
    );
    for item in iter {
        let (k, v) = item.map_err(|e| map_db_error(e, path))?;
        let Some(domain) = keys::parse_hold(&k) else {
            break;
        };
        let since = v
            .as_ref()
            .try_into()
            .map(u64::from_be_bytes)
            .unwrap_or_default();
        holds.insert(domain.to_string(), since);
    }
    Ok(holds)
}

fn stripes() -> Vec<tokio::sync::Mutex<()>> {
    (0..LOCK_STRIPES)
        .map(|_| tokio::sync::Mutex::new(()))
        .collect()
}

fn stripe_of(id: &str) -> usize {
    // FNV-1a: ids are time-ordered, so use every byte.
    let h = id.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
    });
    (h % LOCK_STRIPES as u64) as usize
}

fn cf_options(cf: Cf) -> Options {
    let mut o = Options::default();
    o.set_compression_type(DBCompressionType::Lz4);
    o.set_write_buffer_size(8 << 20);
    if cf == Cf::Meta {
        o.set_merge_operator_associative(usage::MERGE_OPERATOR, usage::merge);
    }
    if cf == Cf::Messages {
        // Bodies are large, written once and deleted later: keep them out of compactions.
        o.set_write_buffer_size(32 << 20);
        o.set_enable_blob_files(true);
        o.set_min_blob_size(4096);
        o.set_blob_compression_type(DBCompressionType::Lz4);
        o.set_enable_blob_gc(true);
        o.set_blob_gc_age_cutoff(BLOB_GC_AGE_CUTOFF.parse().expect("a number"));
    }
    o
}

/// RocksDB's default: compactions relocate the blobs of the oldest quarter of blob files
/// (a [`Spool::reclaim`] opens all of them for its one compaction).
const BLOB_GC_AGE_CUTOFF: &str = "0.25";

/// How long a [`Spool::reclaim`] round waits for its compaction's background work to finish
/// (deleting the files it freed takes moments; under heavy writes flushes keep coming).
const RECLAIM_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// The largest share of the blob files the background reclaim (after deliveries) opens
/// to garbage collection: RocksDB's own default for its compactions.
const BACKGROUND_CUTOFF: f64 = 0.25;

/// The most compaction rounds of one [`Spool::reclaim`].
const RECLAIM_ROUNDS: u32 = 8;

fn cf_descriptors() -> Vec<ColumnFamilyDescriptor> {
    Cf::ALL
        .iter()
        .map(|&cf| ColumnFamilyDescriptor::new(cf.name(), cf_options(cf)))
        .collect()
}

/// Table and blob files RocksDB may keep open: an eighth of the descriptor limit (at
/// least 64, at most 4096). It reopens others as needed; what matters is that a flood of
/// SMTP sessions can never leave it without a descriptor for a flush.
fn max_open_files() -> u64 {
    (crate::ops::descriptors::limit() / 8).clamp(64, 4096)
}

fn db_options(create: bool) -> Options {
    let mut o = Options::default();
    o.set_max_open_files(max_open_files() as i32);
    o.create_if_missing(create);
    o.create_missing_column_families(create);
    // One batch spans several families: flush them together so none runs ahead.
    o.set_atomic_flush(true);
    o.set_compression_type(DBCompressionType::Lz4);
    o.set_db_write_buffer_size(128 << 20);
    o.set_max_total_wal_size(256 << 20);
    o.set_keep_log_file_num(4);
    // Every commit is synced before it is acknowledged, so the only damage a crash or a
    // power cut leaves in the write-ahead log is an incomplete last record, of a commit
    // nobody was told about: tolerated. A bad record anywhere else is real damage, and
    // RocksDB's default (point-in-time recovery) would silently drop it and everything
    // after it, acknowledged mail included: this mode refuses to open instead, and
    // `mxspool recover` decides what to keep. (The commit mark, `mark.rs`, catches what no
    // mode can see: a log cut at a record boundary, or gone.)
    o.set_wal_recovery_mode(rocksdb::DBRecoveryMode::TolerateCorruptedTailRecords);
    // The MANIFEST records every synced log file: one that is missing at open (removed, or
    // named again by a MANIFEST cut back to an older state, whose newer table files RocksDB
    // would otherwise delete as obsolete) refuses the open.
    o.set_track_and_verify_wals_in_manifest(true);
    o
}

/// Whether an error opening a spool means damage (a bad record or block, a file the
/// database needs that is gone), not a plain I/O or permission problem.
fn is_damage(e: &SpoolError) -> Option<String> {
    match e {
        SpoolError::Corrupt(what) => Some(what.clone()),
        SpoolError::Db(what) if what.contains("No such file or directory") => Some(what.clone()),
        _ => None,
    }
}

/// Open errors of a spool that exists, with damage named as such.
fn open_error(e: rocksdb::Error, dir: &Path) -> SpoolError {
    let e = map_db_error(e, dir);
    match is_damage(&e) {
        Some(what) => SpoolError::Damaged {
            path: dir.to_path_buf(),
            what,
        },
        None => e,
    }
}

/// Refuses a spool that has lost acknowledged commits: the sequence number the database
/// recovered (`have`) is below the commit mark (`want`, read before the database was
/// opened).
fn check_mark(dir: &Path, want: Option<u64>, have: u64) -> Result<(), SpoolError> {
    match want {
        Some(want) if have < want => Err(SpoolError::Damaged {
            path: dir.to_path_buf(),
            what: format!(
                "its database ends at commit {have} but commit {want} was acknowledged: \
                 {} commit(s) of its write-ahead log are gone (a log file cut or removed)",
                want - have
            ),
        }),
        _ => Ok(()),
    }
}

/// Before a spool that exists is opened for writing (which may delete files RocksDB
/// thinks obsolete): open it read-only, which changes nothing, and check that it opens and
/// holds every acknowledged commit.
fn check_damage(dir: &Path) -> Result<(), SpoolError> {
    let want = mark::read(dir)?;
    let db = DB::open_cf_descriptors_read_only(&db_options(false), dir, cf_descriptors(), false)
        .map_err(|e| open_error(e, dir))?;
    check_mark(dir, want, db.latest_sequence_number())
}

fn cf(db: &DB, cf: Cf) -> Result<&ColumnFamily, SpoolError> {
    db.cf_handle(cf.name())
        .ok_or_else(|| SpoolError::Corrupt(format!("column family {} is missing", cf.name())))
}

/// Stores our format version, synced: the only write outside the writer thread, made
/// before it starts (a new spool, or an older one opened for writing).
fn write_format(db: &DB, meta: &ColumnFamily, path: &Path) -> Result<(), SpoolError> {
    let mut o = WriteOptions::default();
    o.set_sync(true);
    db.put_cf_opt(
        meta,
        keys::META_FORMAT,
        keys::format_value(FORMAT_VERSION),
        &o,
    )
    .map_err(|e| map_db_error(e, path))
}

/// Check the stored format version; a new spool (`create`) gets ours, and an older one
/// opened for writing is upgraded to it. Returns the version the spool now has.
fn check_format(db: &DB, path: &Path, create: bool) -> Result<u32, SpoolError> {
    let meta = cf(db, Cf::Meta)?;
    let stored = db
        .get_cf(meta, keys::META_FORMAT)
        .map_err(|e| map_db_error(e, path))?;
    match stored {
        Some(v) => {
            let found = keys::parse_format(&v)
                .ok_or_else(|| SpoolError::Corrupt(format!("bad format version {v:?}")))?;
            if !FORMATS_READ.contains(&found) {
                return Err(SpoolError::Format {
                    found,
                    expected: FORMAT_VERSION,
                });
            }
            if found == FORMAT_VERSION || !create {
                return Ok(found);
            }
            // An older spool opened for writing: from now on it may hold parts, and it
            // keeps counters, counted once here.
            if found < FORMAT_WITH_USAGE {
                let counted = usage::count(db, path)?;
                writer::write_synced(db, path, &usage::store_batch(db, path, &counted)?)?;
            }
            write_format(db, meta, path)?;
            Ok(FORMAT_VERSION)
        }
        None if create => {
            write_format(db, meta, path)?;
            Ok(FORMAT_VERSION)
        }
        None => Err(SpoolError::Corrupt(format!(
            "{} has no spool format version",
            path.display()
        ))),
    }
}

/// Creates the spool directory `dir` (and missing parents) if it is not there; the spool
/// directory itself gets mode 0700 whatever the umask.
///
/// Durably: each missing component is created (mode 0700) and fsynced into its parent
/// before the next, and a new spool directory is fsynced itself, so a power cut after the
/// first commit cannot take the directory, and every message acknowledged in it, away.
pub fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    let created = !dir.is_dir();
    if created {
        // The missing components, innermost first.
        let mut missing = Vec::new();
        let mut at = dir;
        loop {
            match std::fs::symlink_metadata(at) {
                Ok(_) => break,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => missing.push(at),
                Err(e) => return Err(e),
            }
            match at.parent() {
                Some(p) if !p.as_os_str().is_empty() => at = p,
                _ => break,
            }
        }
        for d in missing.into_iter().rev() {
            match std::fs::DirBuilder::new().mode(0o700).create(d) {
                Ok(()) => {}
                // Made by someone else meanwhile.
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && d.is_dir() => {}
                Err(e) => return Err(e),
            }
            let parent = d
                .parent()
                .filter(|p| !p.as_os_str().is_empty())
                .unwrap_or(Path::new("."));
            fsync_dir(parent)?;
        }
    }
    set_mode(dir, 0o700)?;
    if created {
        fsync_dir(dir)?;
    }
    Ok(())
}

/// fsync(2) of a directory: the names created in it (and its own attributes) are durable.
fn fsync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

/// The spool is private, whatever the umask it was made under: the directory 0700, every
/// file in it 0600 (RocksDB creates its files with the process's umask; `serve` also sets
/// a umask of 077). Symbolic links are left alone.
pub fn make_private(dir: &Path) -> std::io::Result<()> {
    set_mode(dir, 0o700)?;
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        let Ok(meta) = std::fs::symlink_metadata(&path) else {
            continue;
        };
        if meta.is_file() {
            set_mode(&path, 0o600)?;
        } else if meta.is_dir() {
            set_mode(&path, 0o700)?;
        }
    }
    Ok(())
}

fn set_mode(path: &Path, mode: u32) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::symlink_metadata(path)?;
    if meta.permissions().mode() & 0o7777 != mode {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
    }
    Ok(())
}

impl Spool {
    /// Open the spool at `dir` for reading and writing, creating it if missing. Holds
    /// RocksDB's `LOCK` while open: a second opener gets [`SpoolError::Locked`].
    ///
    /// A spool that exists is first checked ([`check_damage`]): one that is damaged, or has
    /// lost acknowledged commits, gives [`SpoolError::Damaged`] and is left as it is.
    pub fn open(dir: &Path) -> Result<Spool, SpoolError> {
        create_private_dir(dir)?;
        make_private(dir)?;
        if dir.join("CURRENT").is_file() {
            check_damage(dir)?;
        }
        let db = DB::open_cf_descriptors(&db_options(true), dir, cf_descriptors())
            .map_err(|e| open_error(e, dir))?;
        check_format(&db, dir, true)?;
        let usage = usage::load(&db, dir)?;
        let swept = parts::sweep_partial(&db, dir)?;
        if swept > 0 {
            tracing::info!(
                "spool: removed the parts of {swept} message(s) whose DATA never ended (never acknowledged)"
            );
        }
        let mark = mark::Mark::open(dir, db.latest_sequence_number())?;
        let holds = load_holds(&db, dir)?;
        let db = slot::DbSlot::new(db, dir);
        let writer = Writer::start(db.clone(), dir.to_path_buf(), mark)?;
        Ok(Spool {
            inner: Arc::new(Inner {
                writer: Some(writer),
                locks: stripes(),
                holds: std::sync::RwLock::new(holds),
                unreadable: Default::default(),
                callouts: Default::default(),
                sts: Default::default(),
                removed: Default::default(),
                reclaiming: Default::default(),
                reclaim_lock: Default::default(),
                usage,
                db,
                path: dir.to_path_buf(),
            }),
        })
    }

    /// Open an existing spool read-only, even while a server holds it: a view of what was
    /// committed up to this moment (later writes are not seen). Writes give
    /// [`SpoolError::ReadOnly`].
    pub fn open_read_only(dir: &Path) -> Result<Spool, SpoolError> {
        if !dir.join("CURRENT").is_file() {
            return Err(SpoolError::Missing {
                path: dir.to_path_buf(),
            });
        }
        // The mark first: a server may commit meanwhile, and the view opened after it
        // holds at least every commit the mark names.
        let want = mark::read(dir)?;
        let db =
            DB::open_cf_descriptors_read_only(&db_options(false), dir, cf_descriptors(), false)
                .map_err(|e| open_error(e, dir))?;
        check_mark(dir, want, db.latest_sequence_number())?;
        let usage = if check_format(&db, dir, false)? >= FORMAT_WITH_USAGE {
            usage::load(&db, dir)?
        } else {
            usage::count(&db, dir)?
        };
        Ok(Spool {
            inner: Arc::new(Inner {
                usage,
                holds: std::sync::RwLock::new(load_holds(&db, dir)?),
                unreadable: Default::default(),
                callouts: Default::default(),
                sts: Default::default(),
                removed: Default::default(),
                reclaiming: Default::default(),
                reclaim_lock: Default::default(),
                writer: None,
                locks: stripes(),
                db: slot::DbSlot::new(db, dir),
                path: dir.to_path_buf(),
            }),
        })
    }

    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// Descriptors the spool may need at once: its table and blob files, the logs, the
    /// MANIFEST, a flush's and a compaction's new files, the commit mark.
    pub fn descriptor_reserve() -> u64 {
        max_open_files() + 64
    }

    /// The database, for one operation (see [`slot::DbSlot`]): hold it no longer.
    fn db(&self) -> Result<Arc<DB>, SpoolError> {
        self.inner.db.get()
    }

    fn err(&self, e: rocksdb::Error) -> SpoolError {
        map_db_error(e, &self.inner.path)
    }

    /// Logs `u` the first time it is seen by this process (delivery meets it every pass).
    fn report_unreadable(&self, u: Unreadable) {
        let mut seen = self
            .inner
            .unreadable
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if seen.len() < 10_000 && seen.insert((u.domain.clone(), u.id.clone())) {
            tracing::error!("{u}");
        }
    }

    fn writer(&self) -> Result<&Writer, SpoolError> {
        self.inner.writer.as_ref().ok_or(SpoolError::ReadOnly)
    }

    /// Store a new message: its bytes, its envelope, and one queue entry (due now) per
    /// recipient domain. Returns once the write is in the WAL and the WAL is fsynced.
    pub async fn enqueue(&self, env: Envelope, message: Vec<u8>) -> Result<(), SpoolError> {
        self.commit(self.enqueue_batch(env, message)?).await
    }

    /// [`Spool::enqueue`] of a message some of whose parts were stored ahead
    /// ([`Spool::write_part`]): the synced commit makes them durable with the rest.
    pub async fn enqueue_parts(&self, env: Envelope, message: Parts) -> Result<(), SpoolError> {
        let batch = {
            let holds = self.inner.holds.read().unwrap_or_else(|p| p.into_inner());
            Batch::enqueue_with(env, message, |d| holds.contains_key(d))?
        };
        self.commit(batch).await
    }

    /// The batch that enqueues a new message; entries for held domains arrive held.
    pub fn enqueue_batch(&self, env: Envelope, message: Vec<u8>) -> Result<Batch, SpoolError> {
        let holds = self.inner.holds.read().unwrap_or_else(|p| p.into_inner());
        Batch::enqueue_with(env, Parts::whole(message), |d| holds.contains_key(d))
    }

    /// Whether `domain` is on hold, and since when (ms).
    pub fn held_since(&self, domain: &str) -> Option<u64> {
        let holds = self.inner.holds.read().unwrap_or_else(|p| p.into_inner());
        holds.get(domain).copied()
    }

    /// The held domains with their held-since times (ms), sorted.
    pub fn held_domains(&self) -> Vec<(String, u64)> {
        let holds = self.inner.holds.read().unwrap_or_else(|p| p.into_inner());
        let mut v: Vec<_> = holds.iter().map(|(d, t)| (d.clone(), *t)).collect();
        v.sort();
        v
    }

    /// How many of `domain`'s queue entries are held and still have recipients to deliver
    /// (in proportion to the domain's queue, not the whole spool).
    pub fn held_count(&self, domain: &str) -> Result<usize, SpoolError> {
        let mut n = 0;
        let mut after: Option<String> = None;
        loop {
            let chunk = self.domain_entries(domain, after.as_deref(), 1000)?;
            let Some((last, _)) = chunk.last() else {
                break;
            };
            after = Some(last.clone());
            n += chunk
                .iter()
                .filter(|(_, e)| e.held && e.has_pending())
                .count();
        }
        Ok(n)
    }

    /// Put `domain` on hold: no retries until [`Spool::release`]; mail that arrives for it
    /// meanwhile is held too. Returns the number of entries newly held. Idempotent.
    pub async fn hold(&self, domain: &str, now_ms: u64) -> Result<usize, SpoolError> {
        let since = {
            let mut holds = self.inner.holds.write().unwrap_or_else(|p| p.into_inner());
            *holds.entry(domain.to_string()).or_insert(now_ms)
        };
        let mut b = Batch::new();
        b.put(Cf::Meta, keys::hold(domain), since.to_be_bytes().to_vec());
        self.commit(b).await?;
        self.update_domain(domain, move |e| {
            if e.held {
                return None;
            }
            let mut n = e.clone();
            n.held = true;
            n.held_since_ms = now_ms;
            Some(n)
        })
        .await
    }

    /// Take `domain` off hold: its entries are due now, and the time they spent held is
    /// not counted toward their lifetime. Returns the number of entries released.
    pub async fn release(&self, domain: &str, now_ms: u64) -> Result<usize, SpoolError> {
        let mut b = Batch::new();
        b.delete(Cf::Meta, keys::hold(domain));
        self.commit(b).await?;
        {
            let mut holds = self.inner.holds.write().unwrap_or_else(|p| p.into_inner());
            holds.remove(domain);
        }
        self.update_domain(domain, move |e| {
            if !e.held {
                return None;
            }
            let mut n = e.clone();
            n.held = false;
            n.held_ms += now_ms.saturating_sub(e.held_since_ms);
            n.held_since_ms = 0;
            n.next_attempt_ms = now_ms;
            Some(n)
        })
        .await
    }

    /// Apply `f` to every entry of `domain` (each under its message's lock, many commits
    /// in flight at once so they share syncs). Returns how many entries `f` changed.
    async fn update_domain<F>(&self, domain: &str, f: F) -> Result<usize, SpoolError>
    where
        F: Fn(&QueueEntry) -> Option<QueueEntry> + Clone + Send + Sync + 'static,
    {
        let mut changed = 0;
        let mut after: Option<String> = None;
        loop {
            let chunk = self.domain_entries(domain, after.as_deref(), 512)?;
            let Some((last, _)) = chunk.last() else {
                break;
            };
            after = Some(last.clone());
            let mut set = tokio::task::JoinSet::new();
            for (id, _) in chunk {
                let (spool, domain, f) = (self.clone(), domain.to_string(), f.clone());
                set.spawn(async move {
                    spool
                        .settle(&domain, &id, |e, _| f(e).map(|n| (n, None)))
                        .await
                });
            }
            while let Some(r) = set.join_next().await {
                if r.map_err(|e| SpoolError::Db(e.to_string()))?? {
                    changed += 1;
                }
            }
        }
        Ok(changed)
    }

    /// Remove message `id` from `domain`'s queue without notice (and the message itself
    /// when no other domain still has it). Returns whether there was such an entry.
    pub async fn remove(&self, domain: &str, id: &str) -> Result<bool, SpoolError> {
        self.settle(domain, id, |e, _| {
            let mut n = e.clone();
            for r in &mut n.recipients {
                if r.state == RcptState::Pending {
                    r.state = RcptState::Failed;
                }
            }
            Some((n, None))
        })
        .await
    }

    /// Add one entry from an archive: message `env.id` queued for `domain` as `entry`
    /// (made held if the domain is held here, due now otherwise). The message and envelope
    /// are stored once; an id already queued for `domain` is left alone (importing twice
    /// adds nothing), and then `message` is not read at all. A new message is read from
    /// `message` part by part as it is stored ([`Spool::write_part`] ahead of the commit,
    /// like a message in DATA): at most two parts of it are in memory. If reading fails
    /// (the archive's digest does not match at the end, say), or the commit does, what was
    /// written of it is removed again ([`Spool::discard_parts`]; a crash in between leaves
    /// it to the sweep at the next open): nothing is half imported. Blocking; returns
    /// whether anything was added.
    pub fn import_blocking(
        &self,
        domain: &str,
        env: Envelope,
        mut entry: QueueEntry,
        message: &mut dyn std::io::Read,
        now_ms: u64,
    ) -> Result<bool, ImportError> {
        let id = env.id.clone();
        if id.is_empty() || !keys::valid_part(&id) || !keys::valid_part(domain) {
            return Err(SpoolError::Invalid(format!("bad id or domain {id:?} {domain:?}")).into());
        }
        // Held from the first look to the commit: two imports of one id never mix parts.
        let _guard = self.inner.locks[stripe_of(&id)].blocking_lock();
        if self.queue_entry(domain, &id)?.is_some() {
            return Ok(false);
        }
        let mut b = Batch::new();
        let mut written = 0;
        match self.stored_envelope(&id)? {
            Some(mut stored) => {
                b.usage(domain, 1, batch::signed(stored.envelope.size));
                if !stored.domains.iter().any(|d| d == domain) {
                    stored.domains.push(domain.to_string());
                }
                b.put(Cf::Envelopes, keys::message(&id), stored.to_bytes());
            }
            None => {
                b.usage(domain, 1, batch::signed(env.size));
                let parts = self.read_parts(&id, message)?;
                written = parts.written;
                let stored = StoredEnvelope {
                    envelope: env,
                    domains: vec![domain.to_string()],
                    parts: parts.count(),
                    length: if parts.count() > 0 { parts.len() } else { 0 },
                };
                b.put(Cf::Envelopes, keys::message(&id), stored.to_bytes());
                b.append(parts.into_batch(&id));
            }
        }
        match self.held_since(domain) {
            Some(_) => {
                entry.held = true;
                entry.held_since_ms = now_ms;
            }
            None => {
                entry.held = false;
                entry.next_attempt_ms = now_ms;
                b.put(Cf::Due, keys::due(now_ms, domain, &id), Vec::new());
            }
        }
        b.put(Cf::Queue, keys::queue(domain, &id), entry.to_bytes());
        if let Err(e) = self.commit_blocking(b) {
            self.discard_written(&id, written);
            return Err(e.into());
        }
        Ok(true)
    }

    /// The domains that have queue entries, sorted; one seek per domain, not a scan.
    pub fn domains(&self) -> Result<Vec<String>, SpoolError> {
        let db = self.db()?;
        let db = &*db;
        let queue = cf(db, Cf::Queue)?;
        let mut out = Vec::new();
        let mut from: Vec<u8> = Vec::new();
        loop {
            let mut iter = db.iterator_cf(queue, IteratorMode::From(&from, Direction::Forward));
            let Some(item) = iter.next() else { break };
            let (key, _) = item.map_err(|e| self.err(e))?;
            let (d, _) = keys::parse_queue(&key)
                .ok_or_else(|| SpoolError::Corrupt(format!("bad queue key {key:?}")))?;
            out.push(d.to_string());
            from = keys::queue_end(d);
        }
        Ok(out)
    }

    /// [`Spool::enqueue`] for threads outside the async runtime (it blocks; calling it on
    /// a runtime thread panics).
    pub fn enqueue_blocking(&self, env: Envelope, message: Vec<u8>) -> Result<(), SpoolError> {
        self.commit_blocking(self.enqueue_batch(env, message)?)
    }

    /// Apply `batch` atomically through the group-commit writer; returns after the sync.
    pub(crate) async fn commit(&self, batch: Batch) -> Result<(), SpoolError> {
        let changes = usage::Pending::of(&batch);
        let rx = self.writer()?.submit(batch);
        rx.await.map_err(|_| SpoolError::Closed)??;
        changes.applied(&self.inner.usage);
        Ok(())
    }

    /// Whether commits work: one small synced write (the `probe` key of `meta`). The
    /// scheduler asks this while delivery is paused because outcomes could not be recorded.
    pub async fn probe(&self, now_ms: u64) -> Result<(), SpoolError> {
        let mut b = Batch::new();
        b.put(
            Cf::Meta,
            keys::META_PROBE.to_vec(),
            now_ms.to_be_bytes().to_vec(),
        );
        self.commit(b).await
    }

    /// [`Spool::commit`] for threads outside the async runtime.
    pub(crate) fn commit_blocking(&self, batch: Batch) -> Result<(), SpoolError> {
        let changes = usage::Pending::of(&batch);
        let rx = self.writer()?.submit(batch);
        rx.blocking_recv().map_err(|_| SpoolError::Closed)??;
        changes.applied(&self.inner.usage);
        Ok(())
    }

    /// `domain`'s queue (entries and their bytes) as committed, from memory.
    pub fn usage(&self, domain: &str) -> Usage {
        self.inner.usage.get(domain)
    }

    /// Every domain's queue as committed, sorted by domain; empty ones left out.
    pub fn usages(&self) -> Vec<(String, Usage)> {
        self.inner.usage.all()
    }

    /// Time each group commit into `metrics` (`serve` does; the other commands do not).
    pub fn observe_commits(&self, metrics: std::sync::Arc<crate::ops::metrics::Metrics>) {
        if let Some(w) = &self.inner.writer {
            w.observe(metrics);
        }
    }

    /// `(commits, batches)` the writer has made since open: `batches / commits` is the
    /// number of callers that shared each fsync. `(0, 0)` when read-only.
    pub fn stats(&self) -> (u64, u64) {
        self.inner.writer.as_ref().map_or((0, 0), Writer::stats)
    }

    /// Queue entries of `domain` (reading only its key range), or of all domains; sorted by
    /// domain, then id (which is arrival order).
    pub fn list(&self, domain: Option<&str>) -> Result<Vec<QueuedMessage>, SpoolError> {
        let mut out = Vec::new();
        self.for_each(domain, |m| {
            out.push(m);
            true
        })?;
        Ok(out)
    }

    /// [`Spool::list`] without collecting: `f` sees each entry in order and returns `false`
    /// to stop. Reads one consistent snapshot; memory stays flat however long the queue.
    /// An entry that cannot be read is logged and skipped ([`Spool::for_each_readable`]).
    pub fn for_each(
        &self,
        domain: Option<&str>,
        f: impl FnMut(QueuedMessage) -> bool,
    ) -> Result<(), SpoolError> {
        self.for_each_readable(domain, f, |u| tracing::warn!("{u}"))
    }

    /// [`Spool::for_each`], with each entry that cannot be read (its record, or its
    /// envelope: damage) given to `damaged` instead of failing the whole listing. An
    /// unreadable stretch of the index itself ends the listing with the error.
    pub fn for_each_readable(
        &self,
        domain: Option<&str>,
        mut f: impl FnMut(QueuedMessage) -> bool,
        mut damaged: impl FnMut(Unreadable),
    ) -> Result<(), SpoolError> {
        let db = self.db()?;
        let db = &*db;
        let (queue, envelopes) = (cf(db, Cf::Queue)?, cf(db, Cf::Envelopes)?);
        let snap = db.snapshot();
        let mut ro = ReadOptions::default();
        let start = match domain {
            Some(d) => {
                ro.set_iterate_upper_bound(keys::queue_end(d));
                keys::queue_start(d)
            }
            None => Vec::new(),
        };
        let iter = snap.iterator_cf_opt(queue, ro, IteratorMode::From(&start, Direction::Forward));
        for item in iter {
            let (key, value) = item.map_err(|e| self.err(e))?;
            let Some((d, id)) = keys::parse_queue(&key) else {
                damaged(Unreadable::new("?", &format!("{key:?}"), "not a queue key"));
                continue;
            };
            let entry = match QueueEntry::from_bytes(&value) {
                Ok(e) => e,
                Err(e) => {
                    damaged(Unreadable::new(d, id, &e.to_string()));
                    continue;
                }
            };
            let env = match snap.get_cf(envelopes, keys::message(id)) {
                Ok(Some(raw)) => match StoredEnvelope::from_bytes(&raw) {
                    Ok(s) => s.envelope,
                    Err(e) => {
                        damaged(Unreadable::new(d, id, &e.to_string()));
                        continue;
                    }
                },
                Ok(None) => {
                    damaged(Unreadable::new(d, id, "its envelope is missing"));
                    continue;
                }
                Err(e) => {
                    damaged(Unreadable::new(d, id, &self.err(e).to_string()));
                    continue;
                }
            };
            let m = QueuedMessage {
                id: id.to_string(),
                domain: d.to_string(),
                sender: env.sender,
                recipients: entry.recipients,
                arrival_ms: env.arrival_ms,
                size: env.size,
                attempts: entry.attempts,
                next_attempt_ms: entry.next_attempt_ms,
                last_error: entry.last_error,
                last_tls: entry.last_tls,
                held: entry.held,
            };
            if !f(m) {
                break;
            }
        }
        Ok(())
    }

    /// The raw bytes of message `id`, exactly as enqueued, whole in memory (see
    /// [`Spool::load_message`] to read a large one part by part).
    pub fn message(&self, id: &str) -> Result<Option<Vec<u8>>, SpoolError> {
        self.load_message(id)?.map(|m| m.to_vec()).transpose()
    }

    pub fn envelope(&self, id: &str) -> Result<Option<Envelope>, SpoolError> {
        Ok(self.stored_envelope(id)?.map(|s| s.envelope))
    }

    /// The envelope with the list of domains still queued.
    pub fn stored_envelope(&self, id: &str) -> Result<Option<StoredEnvelope>, SpoolError> {
        let db = self.db()?;
        let db = &*db;
        db.get_cf(cf(db, Cf::Envelopes)?, keys::message(id))
            .map_err(|e| self.err(e))?
            .map(|v| StoredEnvelope::from_bytes(&v))
            .transpose()
    }

    /// The queue entry of message `id` for `domain`.
    pub fn queue_entry(&self, domain: &str, id: &str) -> Result<Option<QueueEntry>, SpoolError> {
        let db = self.db()?;
        let db = &*db;
        db.get_cf(cf(db, Cf::Queue)?, keys::queue(domain, id))
            .map_err(|e| self.err(e))?
            .map(|v| QueueEntry::from_bytes(&v))
            .transpose()
    }

    /// [`Spool::due`] continued after `after` (the cursor a previous call returned), so a
    /// caller that already has the earlier entries in hand does not read them again. Returns
    /// the pairs and the cursor to continue from.
    pub fn due_after(
        &self,
        now_ms: u64,
        after: Option<&DueCursor>,
        limit: usize,
    ) -> Result<DueScan, SpoolError> {
        let db = self.db()?;
        let db = &*db;
        let mut ro = ReadOptions::default();
        if let Some(end) = keys::due_end(now_ms) {
            ro.set_iterate_upper_bound(end);
        }
        let start = match after {
            Some(DueCursor(k)) => {
                let mut k = k.clone();
                k.push(0);
                k
            }
            None => Vec::new(),
        };
        let mut out = Vec::new();
        let mut last = None;
        let iter = db.iterator_cf_opt(
            cf(db, Cf::Due)?,
            ro,
            IteratorMode::From(&start, Direction::Forward),
        );
        for item in iter {
            if out.len() >= limit {
                break;
            }
            let (key, _) = item.map_err(|e| self.err(e))?;
            let (_, d, id) = keys::parse_due(&key)
                .ok_or_else(|| SpoolError::Corrupt(format!("bad due key {key:?}")))?;
            out.push((d.to_string(), id.to_string()));
            last = Some(DueCursor(key.to_vec()));
        }
        Ok((out, last))
    }

    /// Up to `limit` `(domain, id)` pairs due at `now_ms` (next attempt at or before it),
    /// earliest first. Reads only the front of the `due` index.
    pub fn due(&self, now_ms: u64, limit: usize) -> Result<Vec<(String, String)>, SpoolError> {
        Ok(self.due_after(now_ms, None, limit)?.0)
    }

    /// Up to `limit` queue entries of `domain` with ids after `after` (all when `None`), in
    /// id order: a domain's queue read in chunks, touching only its key range.
    pub fn domain_entries(
        &self,
        domain: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<(String, QueueEntry)>, SpoolError> {
        let db = self.db()?;
        let db = &*db;
        let mut ro = ReadOptions::default();
        ro.set_iterate_upper_bound(keys::queue_end(domain));
        let start = match after {
            Some(id) => {
                let mut k = keys::queue(domain, id);
                k.push(0);
                k
            }
            None => keys::queue_start(domain),
        };
        let mut out = Vec::new();
        let iter = db.iterator_cf_opt(
            cf(db, Cf::Queue)?,
            ro,
            IteratorMode::From(&start, Direction::Forward),
        );
        for item in iter {
            if out.len() >= limit {
                break;
            }
            let (key, value) = item.map_err(|e| self.err(e))?;
            let (_, id) = keys::parse_queue(&key)
                .ok_or_else(|| SpoolError::Corrupt(format!("bad queue key {key:?}")))?;
            match QueueEntry::from_bytes(&value) {
                Ok(entry) => out.push((id.to_string(), entry)),
                // One damaged entry must not stop the domain's queue: it is skipped, and
                // said once (`mxspool recover` removes it).
                Err(e) => self.report_unreadable(Unreadable::new(domain, id, &e.to_string())),
            }
        }
        Ok(out)
    }

    /// Record the outcome of a delivery attempt of message `id` to `domain`: `update` gets
    /// the entry as stored and the envelope record, and returns the entry's new state plus
    /// any batch to commit with it (a DSN to enqueue), or `None` to leave everything as is
    /// (the entry may have gone meanwhile: `update` is not called then). An entry with no
    /// pending recipient is removed, and with the last one the message. Holds the
    /// message's lock from the read to the synced commit.
    pub async fn settle<F>(&self, domain: &str, id: &str, update: F) -> Result<bool, SpoolError>
    where
        F: FnOnce(&QueueEntry, &StoredEnvelope) -> Option<(QueueEntry, Option<Batch>)>,
    {
        let _guard = self.inner.locks[stripe_of(id)].lock().await;
        let Some(current) = self.queue_entry(domain, id)? else {
            return Ok(false);
        };
        let stored = self.stored_envelope(id)?.ok_or_else(|| {
            SpoolError::Corrupt(format!("queue entry {domain}/{id} has no envelope"))
        })?;
        let Some((new, extra)) = update(&current, &stored) else {
            return Ok(false);
        };
        let mut batch = Batch::settle(domain, id, &current, &new, &stored);
        if let Some(extra) = extra {
            batch.append(extra);
        }
        self.commit(batch).await?;
        let gone = !new.has_pending() && stored.domains.iter().all(|d| d == domain);
        if gone {
            self.removed(stored.envelope.size);
        }
        Ok(true)
    }

    /// The first due time in the `due` index, if any (the scheduler sleeps until then).
    pub fn next_due(&self) -> Result<Option<u64>, SpoolError> {
        let db = self.db()?;
        let db = &*db;
        let first = db
            .iterator_cf(cf(db, Cf::Due)?, IteratorMode::Start)
            .next()
            .transpose()
            .map_err(|e| self.err(e))?;
        Ok(first.and_then(|(k, _)| keys::parse_due(&k).map(|(t, _, _)| t)))
    }

    /// Number of queue entries (message × domain): RocksDB's estimate
    /// (`rocksdb.estimate-num-keys` of `queue`), which costs nothing but may be off after
    /// many deletes. [`Spool::count_exact`] scans instead.
    pub fn count(&self) -> Result<u64, SpoolError> {
        let db = self.db()?;
        let db = &*db;
        Ok(db
            .property_int_value_cf(cf(db, Cf::Queue)?, "rocksdb.estimate-num-keys")
            .map_err(|e| self.err(e))?
            .unwrap_or(0))
    }

    /// Exact number of queue entries, by a scan of the keys (cost grows with the queue).
    pub fn count_exact(&self) -> Result<u64, SpoolError> {
        let db = self.db()?;
        let db = &*db;
        let mut n = 0;
        for item in db.iterator_cf(cf(db, Cf::Queue)?, IteratorMode::Start) {
            item.map_err(|e| self.err(e))?;
            n += 1;
        }
        Ok(n)
    }

    /// Counts a message that left the spool; once enough has gone (64 MiB, or anything
    /// while the disk is short of space), starts a [`Spool::reclaim`] in the background.
    fn removed(&self, bytes: u64) {
        self.inner
            .removed
            .fetch_add(bytes, std::sync::atomic::Ordering::Relaxed);
        if self.wants_reclaim() {
            self.reclaim_soon();
        }
    }

    /// Enough has been removed since the last reclaim to run one: 64 MiB, or anything
    /// while the disk is short of space.
    fn wants_reclaim(&self) -> bool {
        let total = self
            .inner
            .removed
            .load(std::sync::atomic::Ordering::Relaxed);
        total > 0
            && (total >= 64 << 20
                || self
                    .free_bytes()
                    .is_ok_and(|f| f < 2 * SPACE_FOR_ROCKSDB + total))
    }

    /// [`Spool::reclaim`] in a thread of its own, unless one is running.
    pub fn reclaim_soon(&self) {
        use std::sync::atomic::Ordering;
        if self.inner.writer.is_none() || self.inner.reclaiming.swap(true, Ordering::AcqRel) {
            return;
        }
        let spool = self.clone();
        let flag = self.inner.reclaiming.clone();
        let started = std::thread::Builder::new()
            .name("spool-reclaim".into())
            .spawn(move || loop {
                let done = spool.reclaim_up_to(BACKGROUND_CUTOFF);
                flag.store(false, Ordering::Release);
                if let Err(e) = done {
                    tracing::warn!("cannot give the removed mail's space back: {e}");
                    break;
                }
                // Mail removed while this one ran found it running and did not start one:
                // go on for it, unless another has started since.
                if !spool.wants_reclaim() || flag.swap(true, Ordering::AcqRel) {
                    break;
                }
            });
        if started.is_err() {
            self.inner.reclaiming.store(false, Ordering::Release);
        }
    }

    /// Gives the space of removed mail back to the file system: RocksDB keeps deleted
    /// records (and their log, and their blob files) until memory tables are flushed and
    /// the files holding them compacted. Flushes every family, then compacts each whole in
    /// rounds, each waiting until the files it freed are deleted. Blob files whose messages
    /// are all gone are dropped by any compaction; the live messages of files that also
    /// held removed ones are moved out by garbage collection, as much per round as the
    /// free space can take a copy of. Blocking, one at a time; the spool takes writes
    /// meanwhile.
    pub fn reclaim(&self) -> Result<(), SpoolError> {
        self.reclaim_up_to(1.0)
    }

    /// [`Spool::reclaim`] with garbage collection opening at most `most` of the blob files
    /// (oldest first). The background reclaim after deliveries stays at
    /// [`BACKGROUND_CUTOFF`]: the oldest files are the ones delivery has emptied, and the
    /// younger ones' messages are still to be delivered (copying them on every 64 MiB
    /// delivered would rewrite a large backlog again and again while it drains).
    fn reclaim_up_to(&self, most: f64) -> Result<(), SpoolError> {
        use std::sync::atomic::Ordering;
        let _one = self
            .inner
            .reclaim_lock
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let db = self.db()?;
        let db = &*db;
        let before = self.free_bytes().unwrap_or(0);
        let removed = self.inner.removed.swap(0, Ordering::Relaxed);
        let families: Vec<&ColumnFamily> = Cf::ALL
            .iter()
            .map(|&f| cf(db, f))
            .collect::<Result<_, _>>()?;
        db.flush_cfs_opt(&families, &rocksdb::FlushOptions::default())
            .map_err(|e| self.err(e))?;
        let messages = cf(db, Cf::Messages)?;
        let set = |cutoff: &str| {
            db.set_options_cf(messages, &[("blob_garbage_collection_age_cutoff", cutoff)])
                .map_err(|e| self.err(e))
        };
        // Garbage collection copies the live messages out of the oldest blob files (the
        // cutoff is a fraction of the files, oldest first), so that the messages removed
        // from those files give their space back. Each round opens as many files as the
        // free space can take a copy of (half of it, for messages spread unevenly; less
        // half the flush headroom), compacts, and waits until the freed files are deleted;
        // rounds go on while they give space back. A nearly full disk gets small rounds,
        // never the copy of everything that would take its last byte.
        let blob = |name: &str| db.property_int_value_cf(messages, name).ok().flatten();
        let mut o = rocksdb::CompactOptions::default();
        o.set_bottommost_level_compaction(rocksdb::BottommostLevelCompaction::Force);
        let mut wait = rocksdb::WaitForCompactOptions::default();
        wait.set_timeout(RECLAIM_WAIT.as_micros() as u64);
        let mut rounds = 0;
        let mut cutoff: f64;
        loop {
            rounds += 1;
            let start = self.free_bytes().unwrap_or(0);
            // Live bytes: what the files hold less the garbage compactions have found.
            let live = match (
                blob("rocksdb.live-blob-file-size"),
                blob("rocksdb.live-blob-file-garbage-size"),
            ) {
                (Some(size), Some(garbage)) => size.saturating_sub(garbage),
                _ => u64::MAX,
            };
            let room = start.saturating_sub(SPACE_FOR_ROCKSDB / 2) / 2;
            cutoff = if live == 0 {
                most
            } else {
                (room as f64 / live as f64).min(most)
            };
            if let Err(e) = set(&format!("{cutoff:.4}")) {
                let _ = set(BLOB_GC_AGE_CUTOFF); // an earlier round's cutoff does not stay
                return Err(e);
            }
            for f in &families {
                db.compact_range_cf_opt(*f, None::<&[u8]>, None::<&[u8]>, &o);
            }
            // A manual compaction returns before its background job has deleted the files
            // it made obsolete: wait for that (bounded), so the space is back on return.
            if let Err(e) = db.wait_for_compact(&wait) {
                tracing::debug!("spool reclaim: waiting for the compaction: {e}");
            }
            let end = self.free_bytes().unwrap_or(0);
            let garbage = blob("rocksdb.live-blob-file-garbage-size").unwrap_or(0);
            if cutoff >= most || garbage == 0 || end <= start || rounds >= RECLAIM_ROUNDS {
                break;
            }
        }
        set(BLOB_GC_AGE_CUTOFF)?;
        let after = self.free_bytes().unwrap_or(0);
        tracing::info!(
            "spool space given back: {} MiB of removed mail, {} MiB free before, {} MiB after \
             ({rounds} round(s), last garbage collection cutoff {cutoff:.2})",
            removed >> 20,
            before >> 20,
            after >> 20,
        );
        Ok(())
    }

    /// Bytes available to us on the spool's file system (`f_bavail * f_frsize`).
    pub fn free_bytes(&self) -> std::io::Result<u64> {
        let c = CString::new(self.inner.path.as_os_str().as_bytes())
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
        // SAFETY: `c` is a valid NUL-terminated path and `st` a writable statvfs struct.
        let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
        if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        #[allow(clippy::unnecessary_cast)] // the field types differ between platforms
        Ok(st.f_bavail as u64 * st.f_frsize as u64)
    }
}
