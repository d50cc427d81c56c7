//! The recipient callout's answers ([`crate::policy::callout`]), kept in the spool so that
//! they outlive a restart: `meta` keys `callout 0x00 address` (lower-cased,
//! [`keys::callout`]) → JSON [`CalloutAnswer`], with wall-clock times (ms since the epoch).
//!
//! A cache, not mail: nothing else refers to these keys, and an entry lost costs one
//! callout. So its writes need no fsync of their own: they go through the writer thread as
//! lazy batches ([`super::Batch::lazy`]), which it commits without a sync and without moving
//! the commit mark; the next synced commit makes them durable with everything before it.
//! A write is not waited for (a failed commit is logged by the writer). Expired and
//! unreadable entries are removed by [`Spool::callout_sweep`] (`serve` runs it at start and
//! hourly); at most [`MAX_STORED`] are kept, beyond which new answers are not stored until a
//! sweep makes room (the callout still keeps them in memory). A sweep that meets an entry
//! being rewritten may remove the new one: one more callout, nothing worse.

use std::sync::atomic::Ordering;

use serde::{Deserialize, Serialize};

use super::keys::{self, Cf};
use super::{cf, Batch, Spool, SpoolError};

/// Answers kept in the spool, at most.
pub const MAX_STORED: usize = 1_000_000;

/// Longest address stored (RFC 5321 allows a path of 256 octets).
const MAX_ADDRESS: usize = 512;

/// Deletes per batch of a sweep.
const SWEEP_BATCH: usize = 10_000;

/// What a partner's primary said about one address.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CalloutAnswer {
    /// When it said so, ms since the epoch.
    pub answered_ms: u64,
    /// Until when the answer holds, ms since the epoch (the TTL in force when it came; a
    /// shorter TTL configured since applies as well, see the callout).
    pub expires_ms: u64,
    /// `None`: the primary takes the address. `Some`: it refused it so.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refused: Option<CalloutRefusal>,
}

/// A primary's `5xx` to `RCPT TO`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CalloutRefusal {
    pub code: u16,
    /// The enhanced status code, when it gave one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<String>,
    pub text: String,
}

/// Stored answers counted by the last sweep, plus those written since.
#[derive(Default)]
pub(super) struct Stored {
    count: std::sync::atomic::AtomicUsize,
    /// The cache is full and that was logged (until a sweep makes room).
    full: std::sync::atomic::AtomicBool,
}

impl Spool {
    /// The stored answer about `address` that still holds at `now_ms`, if any (an entry
    /// that cannot be read is none). Blocking: a RocksDB read.
    pub fn callout_get(
        &self,
        address: &str,
        now_ms: u64,
    ) -> Result<Option<CalloutAnswer>, SpoolError> {
        let db = self.db()?;
        let db = &*db;
        let raw = db
            .get_pinned_cf(cf(db, Cf::Meta)?, keys::callout(address))
            .map_err(|e| self.err(e))?;
        Ok(raw
            .and_then(|raw| serde_json::from_slice::<CalloutAnswer>(&raw).ok())
            .filter(|a| a.expires_ms > now_ms))
    }

    /// Store `answer` about `address` (replacing any), without waiting for the write.
    /// Returns whether it was sent to the writer: not for a read-only spool, an address
    /// longer than 512 bytes or with the cache full ([`MAX_STORED`]).
    pub fn callout_put(&self, address: &str, answer: &CalloutAnswer) -> bool {
        let Ok(writer) = self.writer() else {
            return false;
        };
        if address.len() > MAX_ADDRESS {
            return false;
        }
        let stored = &self.inner.callouts;
        if stored.count.load(Ordering::Relaxed) >= MAX_STORED {
            if !stored.full.swap(true, Ordering::Relaxed) {
                tracing::warn!(
                    "the spool's callout cache holds {MAX_STORED} answers: new ones are kept in memory only until the hourly sweep makes room"
                );
            }
            return false;
        }
        stored.count.fetch_add(1, Ordering::Relaxed);
        let mut b = Batch::new();
        b.put(
            Cf::Meta,
            keys::callout(address),
            serde_json::to_vec(answer).expect("plain data serializes"),
        );
        // Not waited for: the writer logs a commit that fails.
        drop(writer.submit(b.lazy()));
        true
    }

    /// Remove the stored answers expired at `now_ms` and those that cannot be read; count
    /// the others (for [`MAX_STORED`]). Returns `(removed, kept)`. Blocking.
    pub fn callout_sweep(&self, now_ms: u64) -> Result<(usize, usize), SpoolError> {
        self.writer()?;
        let (mut removed, mut kept) = (0, 0);
        let mut batches = vec![Batch::new()];
        {
            let db = self.db()?;
            let db = &*db;
            let iter = db.iterator_cf(
                cf(db, Cf::Meta)?,
                rocksdb::IteratorMode::From(keys::CALLOUT_PREFIX, rocksdb::Direction::Forward),
            );
            for item in iter {
                let (key, value) = item.map_err(|e| self.err(e))?;
                if keys::parse_callout(&key).is_none() {
                    break;
                }
                let live = serde_json::from_slice::<CalloutAnswer>(&value)
                    .is_ok_and(|a| a.expires_ms > now_ms);
                if live {
                    kept += 1;
                    continue;
                }
                if batches.last().is_some_and(|b| b.len() >= SWEEP_BATCH) {
                    batches.push(Batch::new());
                }
                if let Some(b) = batches.last_mut() {
                    b.delete(Cf::Meta, key.to_vec());
                }
                removed += 1;
            }
        }
        // Written once the database is given back (a reopen waits for its readers).
        for b in batches.into_iter().filter(|b| !b.is_empty()) {
            self.commit_blocking(b.lazy())?;
        }
        let stored = &self.inner.callouts;
        stored.count.store(kept, Ordering::Relaxed);
        if kept < MAX_STORED {
            stored.full.store(false, Ordering::Relaxed);
        }
        Ok((removed, kept))
    }
}
