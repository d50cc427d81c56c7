//! Caches kept in the spool so that they outlive a restart, with wall-clock times (ms since
//! the epoch):
//! - the recipient callout's answers ([`crate::policy::callout`]): `meta` keys
//!   `callout 0x00 address` (lower-cased, [`keys::callout`]) → JSON [`CalloutAnswer`];
//! - destination domains' MTA-STS policies ([`crate::tls::mta_sts`]): `meta` keys
//!   `sts 0x00 domain` (lower-cased, [`keys::sts`]) → JSON [`StsRecord`].
//!
//! Caches, not mail: nothing else refers to these keys, and an entry lost costs one
//! callout or one policy fetch. So its writes need no fsync of their own: they go through the writer thread as
//! lazy batches ([`super::Batch::lazy`]), which it commits without a sync and without moving
//! the commit mark; the next synced commit makes them durable with everything before it.
//! A write is not waited for (a failed commit is logged by the writer). Expired and
//! unreadable entries are removed by [`Spool::callout_sweep`] and [`Spool::sts_sweep`] (`serve`
//! runs both at start and hourly); at most [`MAX_STORED`] answers and [`MAX_STS_STORED`]
//! policies are kept, beyond which new ones are not stored until a sweep makes room (the
//! callout still keeps its answers in memory; a policy not stored is fetched again). A sweep
//! that meets an entry being rewritten may remove the new one: one more callout or fetch,
//! nothing worse.

use std::sync::atomic::Ordering;

use serde::{Deserialize, Serialize};

use super::keys::{self, Cf};
use super::{cf, Batch, Spool, SpoolError};

/// Answers kept in the spool, at most.
pub const MAX_STORED: usize = 1_000_000;

/// MTA-STS policies kept in the spool, at most.
pub const MAX_STS_STORED: usize = 100_000;

/// Longest address stored (RFC 5321 allows a path of 256 octets).
const MAX_ADDRESS: usize = 512;

/// Longest domain stored (RFC 1035: 253 octets in text).
const MAX_DOMAIN: usize = 255;

/// Longest policy text stored (the fetch's own limit, RFC 8461 3.3's 64 KiB).
const MAX_POLICY_TEXT: usize = 64 * 1024;

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

/// A destination domain's MTA-STS policy as fetched (RFC 8461 5.1).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StsRecord {
    /// The `id=` of the `_mta-sts` TXT record the policy was fetched for.
    pub id: String,
    /// The policy text as served (parsed again where it is used).
    pub policy: String,
    /// When it was fetched, ms since the epoch.
    pub fetched_ms: u64,
    /// `fetched_ms` plus the policy's `max_age`: until then it applies, whatever DNS says.
    pub expires_ms: u64,
}

/// Stored entries counted by the last sweep, plus those written since.
#[derive(Default)]
pub(super) struct Stored {
    count: std::sync::atomic::AtomicUsize,
    /// The cache is full and that was logged (until a sweep makes room).
    full: std::sync::atomic::AtomicBool,
}

impl Stored {
    /// Counts one more entry unless `max` are stored; the first refusal logs `full`.
    fn take_one(&self, max: usize, full: &str) -> bool {
        if self.count.load(Ordering::Relaxed) >= max {
            if !self.full.swap(true, Ordering::Relaxed) {
                tracing::warn!("{full} ({max} entries)");
            }
            return false;
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        true
    }

    /// After a sweep: `kept` entries are stored.
    fn recount(&self, kept: usize, max: usize) {
        self.count.store(kept, Ordering::Relaxed);
        if kept < max {
            self.full.store(false, Ordering::Relaxed);
        }
    }
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
        if !self.inner.callouts.take_one(
            MAX_STORED,
            "the spool's callout cache is full: new answers are kept in memory only until the hourly sweep makes room",
        ) {
            return false;
        }
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
        let (removed, kept) = self.sweep_prefix(keys::CALLOUT_PREFIX, |value| {
            serde_json::from_slice::<CalloutAnswer>(value).is_ok_and(|a| a.expires_ms > now_ms)
        })?;
        self.inner.callouts.recount(kept, MAX_STORED);
        Ok((removed, kept))
    }

    /// The stored MTA-STS policy of `domain` that has not expired at `now_ms`, if any (an
    /// entry that cannot be read is none). Blocking: a RocksDB read.
    pub fn sts_get(&self, domain: &str, now_ms: u64) -> Result<Option<StsRecord>, SpoolError> {
        let db = self.db()?;
        let db = &*db;
        let raw = db
            .get_pinned_cf(cf(db, Cf::Meta)?, keys::sts(domain))
            .map_err(|e| self.err(e))?;
        Ok(raw
            .and_then(|raw| serde_json::from_slice::<StsRecord>(&raw).ok())
            .filter(|r| r.expires_ms > now_ms))
    }

    /// Store `record` as `domain`'s policy (replacing any), without waiting for the write.
    /// Returns whether it was sent to the writer: not for a read-only spool, a domain longer
    /// than 255 bytes, a policy longer than 64 KiB or with the cache full
    /// ([`MAX_STS_STORED`]).
    pub fn sts_put(&self, domain: &str, record: &StsRecord) -> bool {
        let Ok(writer) = self.writer() else {
            return false;
        };
        if domain.len() > MAX_DOMAIN || record.policy.len() > MAX_POLICY_TEXT {
            return false;
        }
        if !self.inner.sts.take_one(
            MAX_STS_STORED,
            "the spool's MTA-STS cache is full: new policies are not stored (but still used) until the hourly sweep makes room",
        ) {
            return false;
        }
        let mut b = Batch::new();
        b.put(
            Cf::Meta,
            keys::sts(domain),
            serde_json::to_vec(record).expect("plain data serializes"),
        );
        drop(writer.submit(b.lazy()));
        true
    }

    /// Remove the stored MTA-STS policies expired at `now_ms` and those that cannot be
    /// read; count the others. Returns `(removed, kept)`. Blocking.
    pub fn sts_sweep(&self, now_ms: u64) -> Result<(usize, usize), SpoolError> {
        let (removed, kept) = self.sweep_prefix(keys::STS_PREFIX, |value| {
            serde_json::from_slice::<StsRecord>(value).is_ok_and(|r| r.expires_ms > now_ms)
        })?;
        self.inner.sts.recount(kept, MAX_STS_STORED);
        Ok((removed, kept))
    }

    /// Deletes the `meta` entries under `prefix` whose value is not `live`; `(removed,
    /// kept)`.
    fn sweep_prefix(
        &self,
        prefix: &[u8],
        live: impl Fn(&[u8]) -> bool,
    ) -> Result<(usize, usize), SpoolError> {
        self.writer()?;
        let (mut removed, mut kept) = (0, 0);
        let mut batches = vec![Batch::new()];
        {
            let db = self.db()?;
            let db = &*db;
            let iter = db.iterator_cf(
                cf(db, Cf::Meta)?,
                rocksdb::IteratorMode::From(prefix, rocksdb::Direction::Forward),
            );
            for item in iter {
                let (key, value) = item.map_err(|e| self.err(e))?;
                if !key.starts_with(prefix) {
                    break;
                }
                if live(&value) {
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
        Ok((removed, kept))
    }
}
