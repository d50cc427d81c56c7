//! What each domain's queue holds, as counters kept in the spool itself: messages (queue
//! entries) and their bytes, per recipient domain. The per-partner quotas
//! (`[[partner]] max_messages`, `max_bytes`) are checked against them.
//!
//! Invariant: the counters change in the same atomic commit as the queue entries they
//! count, so they are exact across crashes and restarts without a scan. Every batch that
//! adds a queue entry adds `(+1, +size)` to `usage 0x00 domain` in `meta`, every batch that
//! removes one adds `(-1, -size)` ([`Batch::usage`]), as a RocksDB merge (the
//! [`MERGE_OPERATOR`] sums them), so concurrent commits never read-modify-write. `size` is
//! always the envelope's `size`, on the way in and out. A spool of an older format gets its
//! counters from one scan when it is first opened for writing; `mxspool recover` recounts.
//!
//! The process keeps a copy in memory ([`UsageTable`]), updated after each commit that
//! worked: the quota checks at RCPT and before a commit read it, never the database.

use std::collections::HashMap;
use std::sync::Mutex;

use rocksdb::{Direction, IteratorMode, MergeOperands, DB};

use super::batch::{Batch, Op};
use super::keys::{self, Cf};
use super::{cf, map_db_error, QueueEntry, SpoolError, StoredEnvelope};

/// Name of the merge operator of the `meta` family (only `usage` keys are ever merged).
pub const MERGE_OPERATOR: &str = "mxspool.usage.v1";

/// One domain's queue: entries and the bytes of their messages.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    pub messages: u64,
    pub bytes: u64,
}

/// A change of [`Usage`], or a stored counter: two `i64` big-endian.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Delta {
    messages: i64,
    bytes: i64,
}

impl Delta {
    fn to_bytes(self) -> Vec<u8> {
        let mut v = Vec::with_capacity(16);
        v.extend_from_slice(&self.messages.to_be_bytes());
        v.extend_from_slice(&self.bytes.to_be_bytes());
        v
    }

    /// A value that is not 16 bytes counts as zero (it cannot be written by this code).
    fn from_bytes(b: &[u8]) -> Delta {
        match (b.get(..8), b.get(8..16), b.len()) {
            (Some(m), Some(n), 16) => Delta {
                messages: i64::from_be_bytes(m.try_into().expect("8 bytes")),
                bytes: i64::from_be_bytes(n.try_into().expect("8 bytes")),
            },
            _ => Delta::default(),
        }
    }

    fn add(self, o: Delta) -> Delta {
        Delta {
            messages: self.messages.saturating_add(o.messages),
            bytes: self.bytes.saturating_add(o.bytes),
        }
    }

    fn usage(self) -> Usage {
        Usage {
            messages: self.messages.max(0) as u64,
            bytes: self.bytes.max(0) as u64,
        }
    }
}

/// The `meta` family's merge operator: a `usage` value is the sum of its operands.
pub fn merge(_key: &[u8], existing: Option<&[u8]>, operands: &MergeOperands) -> Option<Vec<u8>> {
    let start = existing.map(Delta::from_bytes).unwrap_or_default();
    Some(
        operands
            .iter()
            .fold(start, |acc, op| acc.add(Delta::from_bytes(op)))
            .to_bytes(),
    )
}

impl Batch {
    /// Count `messages` entries of `bytes` more (or fewer, negative) for `domain`.
    pub fn usage(&mut self, domain: &str, messages: i64, bytes: i64) {
        self.merge(
            Cf::Meta,
            keys::usage(domain),
            Delta { messages, bytes }.to_bytes(),
        );
    }

    /// The changes of the counters this batch makes, per domain.
    fn usage_changes(&self) -> Vec<(String, Delta)> {
        let mut out: Vec<(String, Delta)> = Vec::new();
        for op in self.ops() {
            let Op::Merge {
                cf: Cf::Meta,
                key,
                value,
            } = op
            else {
                continue;
            };
            let Some(domain) = keys::parse_usage(key) else {
                continue;
            };
            let d = Delta::from_bytes(value);
            match out.iter_mut().find(|(x, _)| x == domain) {
                Some((_, acc)) => *acc = acc.add(d),
                None => out.push((domain.to_string(), d)),
            }
        }
        out
    }
}

/// The counters in memory, the same as the spool's once each commit is applied.
#[derive(Debug, Default)]
pub struct UsageTable {
    map: Mutex<HashMap<String, Delta>>,
}

impl UsageTable {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Delta>> {
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// `domain`'s queue as counted.
    pub fn get(&self, domain: &str) -> Usage {
        self.lock().get(domain).copied().unwrap_or_default().usage()
    }

    /// Every domain with something counted, sorted.
    pub fn all(&self) -> Vec<(String, Usage)> {
        let mut v: Vec<(String, Usage)> = self
            .lock()
            .iter()
            .map(|(d, u)| (d.clone(), u.usage()))
            .filter(|(_, u)| *u != Usage::default())
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    /// What a committed batch changed (`changes` taken before it was sent).
    fn apply(&self, changes: &[(String, Delta)]) {
        if changes.is_empty() {
            return;
        }
        let mut map = self.lock();
        for (domain, d) in changes {
            let e = map.entry(domain.clone()).or_default();
            *e = e.add(*d);
            if *e == Delta::default() {
                map.remove(domain);
            }
        }
    }

    fn replace(&self, counts: HashMap<String, Delta>) {
        *self.lock() = counts;
    }
}

/// What a commit will change in the table, taken from its batch before it is sent.
pub struct Pending(Vec<(String, Delta)>);

impl Pending {
    pub fn of(batch: &Batch) -> Pending {
        Pending(batch.usage_changes())
    }

    /// The commit worked: the table follows.
    pub fn applied(self, table: &UsageTable) {
        table.apply(&self.0);
    }
}

/// The stored counters of `db` (format 3 and later).
pub fn load(db: &DB, path: &std::path::Path) -> Result<UsageTable, SpoolError> {
    let mut counts = HashMap::new();
    let iter = db.iterator_cf(
        cf(db, Cf::Meta)?,
        IteratorMode::From(keys::USAGE_PREFIX, Direction::Forward),
    );
    for item in iter {
        let (k, v) = item.map_err(|e| map_db_error(e, path))?;
        let Some(domain) = keys::parse_usage(&k) else {
            break;
        };
        let d = Delta::from_bytes(&v);
        if d != Delta::default() {
            counts.insert(domain.to_string(), d);
        }
    }
    let table = UsageTable::default();
    table.replace(counts);
    Ok(table)
}

/// Counts every queue entry of `db` (with its envelope's size): for a spool of an older
/// format, and for `mxspool recover`. Entries that cannot be read are not counted.
pub fn count(db: &DB, path: &std::path::Path) -> Result<UsageTable, SpoolError> {
    let (queue, envelopes) = (cf(db, Cf::Queue)?, cf(db, Cf::Envelopes)?);
    let mut counts: HashMap<String, Delta> = HashMap::new();
    for item in db.iterator_cf(queue, IteratorMode::Start) {
        let (k, v) = item.map_err(|e| map_db_error(e, path))?;
        let Some((domain, id)) = keys::parse_queue(&k) else {
            continue;
        };
        if QueueEntry::from_bytes(&v).is_err() {
            continue;
        }
        let size = match db.get_cf(envelopes, keys::message(id)) {
            Ok(Some(raw)) => match StoredEnvelope::from_bytes(&raw) {
                Ok(s) => s.envelope.size,
                Err(_) => continue,
            },
            _ => continue,
        };
        let e = counts.entry(domain.to_string()).or_default();
        *e = e.add(Delta {
            messages: 1,
            bytes: size.min(i64::MAX as u64) as i64,
        });
    }
    let table = UsageTable::default();
    table.replace(counts);
    Ok(table)
}

/// A batch that sets the stored counters to `table` exactly: every `usage` key of `db` not
/// in it is deleted.
pub fn store_batch(
    db: &DB,
    path: &std::path::Path,
    table: &UsageTable,
) -> Result<Batch, SpoolError> {
    let mut b = Batch::new();
    let iter = db.iterator_cf(
        cf(db, Cf::Meta)?,
        IteratorMode::From(keys::USAGE_PREFIX, Direction::Forward),
    );
    for item in iter {
        let (k, _) = item.map_err(|e| map_db_error(e, path))?;
        if keys::parse_usage(&k).is_none() {
            break;
        }
        b.delete(Cf::Meta, k.to_vec());
    }
    for (domain, d) in table.lock().iter() {
        b.put(Cf::Meta, keys::usage(domain), d.to_bytes());
    }
    Ok(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn changes_of_a_batch_are_summed_per_domain() {
        let mut b = Batch::new();
        b.usage("a.test", 1, 100);
        b.usage("b.test", 1, 7);
        b.usage("a.test", -1, -40);
        b.put(Cf::Meta, keys::usage("c.test"), Delta::default().to_bytes());
        let table = UsageTable::default();
        Pending::of(&b).applied(&table);
        assert_eq!(
            table.get("a.test"),
            Usage {
                messages: 0,
                bytes: 60
            }
        );
        assert_eq!(
            table.get("b.test"),
            Usage {
                messages: 1,
                bytes: 7
            }
        );
        assert_eq!(table.get("c.test"), Usage::default());
        let mut back = Batch::new();
        back.usage("b.test", -1, -7);
        back.usage("a.test", 0, -60);
        Pending::of(&back).applied(&table);
        assert!(table.all().is_empty(), "{:?}", table.all());
    }

    #[test]
    fn a_bad_value_counts_as_zero_and_never_goes_negative() {
        assert_eq!(Delta::from_bytes(b"short"), Delta::default());
        let d = Delta {
            messages: -3,
            bytes: -10,
        };
        assert_eq!(d.usage(), Usage::default());
        assert_eq!(Delta::from_bytes(&d.to_bytes()), d);
    }
}
