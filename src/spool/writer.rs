//! The group-commit writer: the one thread that writes to the spool.
//!
//! Callers send `(Batch, reply)` over a channel and wait on the reply. The thread blocks for
//! the first request, then takes every request already waiting (up to [`MAX_GROUP_BYTES`]),
//! puts all their operations into one `rocksdb::WriteBatch`, writes it with `sync = true`
//! (WAL written and fsynced) and only then answers every waiter with the same result. Many
//! SMTP sessions finishing DATA at once therefore share one fsync, and nobody hears "done"
//! before their bytes are on disk. A group of nothing but lazy batches ([`Batch::lazy`],
//! the callout cache) is written without the sync and leaves the commit mark alone; the
//! statistics and `spool_commit_seconds` count synced commits only.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, OnceLock};
use std::thread::JoinHandle;
use std::time::Instant;

use rocksdb::{WriteBatch, WriteOptions, DB};
use tokio::sync::oneshot;

use super::batch::{Batch, Op};
use super::mark::Mark;
use super::slot::DbSlot;
use super::{map_db_error, SpoolError};
use crate::ops::metrics::Metrics;

/// Stop adding requests to one commit once it holds this many bytes of keys and values.
pub const MAX_GROUP_BYTES: usize = 64 << 20;

pub type Reply = oneshot::Sender<Result<(), SpoolError>>;

struct Request {
    batch: Batch,
    reply: Reply,
}

#[derive(Default)]
struct Stats {
    commits: AtomicU64,
    batches: AtomicU64,
    /// Set by `serve`: each commit's duration goes into its histogram.
    metrics: OnceLock<Arc<Metrics>>,
}

pub struct Writer {
    tx: Option<mpsc::Sender<Request>>,
    thread: Option<JoinHandle<()>>,
    stats: Arc<Stats>,
}

impl Writer {
    /// Starts the writer thread; after each commit that works it records the database's
    /// sequence number in `mark` (before anyone is answered), and syncs it when it stops.
    pub fn start(db: Arc<DbSlot>, path: PathBuf, mark: Mark) -> std::io::Result<Writer> {
        let (tx, rx) = mpsc::channel();
        let stats = Arc::new(Stats::default());
        let thread_stats = stats.clone();
        let thread = std::thread::Builder::new()
            .name("spool-writer".into())
            .spawn(move || run(&db, &path, rx, &thread_stats, &mark))?;
        Ok(Writer {
            tx: Some(tx),
            thread: Some(thread),
            stats,
        })
    }

    /// Queue `batch` for the next commit; the receiver gets the commit's result.
    pub fn submit(&self, batch: Batch) -> oneshot::Receiver<Result<(), SpoolError>> {
        let (reply, rx) = oneshot::channel();
        if let Some(tx) = &self.tx {
            // If the thread is gone the request (and its reply sender) is dropped, and the
            // receiver reports that as `Closed`.
            let _ = tx.send(Request { batch, reply });
        }
        rx
    }

    /// Observe each commit's duration (write and fsync) in `metrics` from now on.
    pub fn observe(&self, metrics: Arc<Metrics>) {
        let _ = self.stats.metrics.set(metrics);
    }

    /// `(commits, batches)` written since start.
    pub fn stats(&self) -> (u64, u64) {
        (
            self.stats.commits.load(Ordering::Relaxed),
            self.stats.batches.load(Ordering::Relaxed),
        )
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        // Closing the channel ends the thread's loop once the requests already sent are
        // written and answered.
        self.tx.take();
        if let Some(t) = self.thread.take() {
            if t.join().is_err() {
                tracing::error!("spool writer thread panicked");
            }
        }
    }
}

fn run(
    slot: &DbSlot,
    path: &std::path::Path,
    rx: mpsc::Receiver<Request>,
    stats: &Stats,
    mark: &Mark,
) {
    let mut opts = WriteOptions::default();
    opts.set_sync(true);
    let mut lazy = WriteOptions::default();
    lazy.set_sync(false);
    let mut failing = Failing::default();
    let mut reopen = Reopen::default();
    while let Ok(first) = rx.recv() {
        let mut bytes = first.batch.bytes();
        let mut group = vec![first];
        while bytes < MAX_GROUP_BYTES {
            match rx.try_recv() {
                Ok(req) => {
                    bytes += req.batch.bytes();
                    group.push(req);
                }
                Err(_) => break,
            }
        }

        // Only lazy batches (cache entries): no fsync, and the mark stays where it is, since
        // it may only name commits whose log is synced. The next synced commit syncs the
        // log with these records in it.
        let sync = group.iter().any(|r| !r.batch.is_lazy());
        let started = Instant::now();
        let result = slot.get().and_then(|db| {
            let r = commit(&db, path, &group, if sync { &opts } else { &lazy });
            if r.is_ok() && sync {
                mark.record(db.latest_sequence_number());
            }
            r
        });
        if sync {
            if let Some(m) = stats.metrics.get() {
                m.commit_seconds.observe(started.elapsed().as_secs_f64());
            }
            stats.commits.fetch_add(1, Ordering::Relaxed);
            stats
                .batches
                .fetch_add(group.len() as u64, Ordering::Relaxed);
        }
        tracing::trace!(
            batches = group.len(),
            bytes,
            ok = result.is_ok(),
            "spool commit"
        );
        failing.saw(&result, group.len());
        for req in group {
            let _ = req
                .reply
                .send(result.as_ref().map(|_| ()).map_err(|e| e.duplicate()));
        }
        reopen.after(&result, slot);
    }
    mark.sync();
}

/// Reopening the database after failed commits: RocksDB keeps refusing every write after a
/// hard background error, even once its cause (no descriptor left, an I/O error) is gone,
/// and only a reopen clears that. Tried once commits have failed for a second, then with
/// back-off (1 s doubling to a minute) while they keep failing. Not for a full disk:
/// RocksDB recovers from that by itself once space is back, and opening needs room.
#[derive(Default)]
struct Reopen {
    next: Option<Instant>,
    wait: std::time::Duration,
}

impl Reopen {
    fn after(&mut self, result: &Result<(), SpoolError>, slot: &DbSlot) {
        use std::time::Duration;
        let e = match result {
            Ok(()) => {
                self.next = None;
                return;
            }
            Err(e) if e.is_no_space() => return,
            Err(e) => e,
        };
        let now = Instant::now();
        let Some(at) = self.next else {
            self.wait = Duration::from_secs(1);
            self.next = Some(now + self.wait);
            return;
        };
        if now < at {
            return;
        }
        tracing::warn!("spool: commits keep failing ({e}); closing and reopening the database");
        match slot.reopen() {
            Ok(()) => {
                tracing::warn!("spool: database reopened (a RocksDB background error is cleared)");
                self.wait = Duration::from_secs(1);
            }
            Err(e) => {
                self.wait = (self.wait * 2).min(Duration::from_secs(60));
                tracing::error!(
                    "spool: reopen failed: {e}; next try in {}s",
                    self.wait.as_secs()
                );
            }
        }
        self.next = Some(Instant::now() + self.wait);
    }
}

/// Failed commits, logged when they start, once a minute while they last, and when they
/// end (a full disk fails every commit: one line each would drown the log).
#[derive(Default)]
struct Failing {
    since: Option<Instant>,
    last_said: Option<Instant>,
    failed: u64,
}

impl Failing {
    fn saw(&mut self, result: &Result<(), SpoolError>, batches: usize) {
        let now = Instant::now();
        match result {
            Ok(()) => {
                if let Some(since) = self.since.take() {
                    tracing::info!(
                        "spool commits work again, after {} failed commit(s) in {}s",
                        self.failed,
                        since.elapsed().as_secs()
                    );
                    self.failed = 0;
                    self.last_said = None;
                }
            }
            Err(e) => {
                self.failed += 1;
                let since = *self.since.get_or_insert(now);
                let due = self
                    .last_said
                    .is_none_or(|t| now.duration_since(t) >= std::time::Duration::from_secs(60));
                if due {
                    self.last_said = Some(now);
                    tracing::error!(
                        "spool commit of {batches} batch(es) failed: {e} ({} failed in {}s; mail is refused with 451/452 until commits work)",
                        self.failed,
                        since.elapsed().as_secs()
                    );
                }
            }
        }
    }
}

fn commit(
    db: &DB,
    path: &std::path::Path,
    group: &[Request],
    opts: &WriteOptions,
) -> Result<(), SpoolError> {
    let wb = write_batch(db, group.iter().map(|r| &r.batch))?;
    db.write_opt(wb, opts).map_err(|e| map_db_error(e, path))
}

/// The operations of `batches` as one RocksDB write.
fn write_batch<'a>(
    db: &DB,
    batches: impl Iterator<Item = &'a Batch>,
) -> Result<WriteBatch, SpoolError> {
    let mut wb = WriteBatch::default();
    for batch in batches {
        for op in batch.ops() {
            match op {
                Op::Put { cf, key, value } => wb.put_cf(super::cf(db, *cf)?, key, value),
                Op::Delete { cf, key } => wb.delete_cf(super::cf(db, *cf)?, key),
                Op::Merge { cf, key, value } => wb.merge_cf(super::cf(db, *cf)?, key, value),
            }
        }
    }
    Ok(wb)
}

/// Applies `batch` at once, synced, outside the writer thread: only while the spool is
/// being opened (format upgrade) or recovered, when no writer runs.
pub(super) fn write_synced(
    db: &DB,
    path: &std::path::Path,
    batch: &Batch,
) -> Result<(), SpoolError> {
    let mut o = WriteOptions::default();
    o.set_sync(true);
    let wb = write_batch(db, std::iter::once(batch))?;
    db.write_opt(wb, &o).map_err(|e| map_db_error(e, path))
}
