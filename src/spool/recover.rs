//! `mxspool recover`: make a damaged spool servable again, keeping every entry that can be
//! read, and say what was lost.
//!
//! 1. Open the database skipping every bad log record (`SkipAnyCorruptedRecords`: the
//!    commits after a bad record are kept, not dropped with it, since losing acknowledged
//!    mail is worse than a message going twice). If it will not open even so (a damaged
//!    MANIFEST, a table file gone), rebuild it from its files with RocksDB's repairer
//!    (damaged files go to `lost/` inside the spool) and open that.
//! 2. Compare with the commit mark: commits acknowledged but not in the database are lost
//!    mail, and said so.
//! 3. Check every queue entry: its record, its envelope and its message must read back;
//!    entries that do not are removed and listed. Envelopes and messages no entry needs
//!    are removed, each envelope's list of domains is set to the entries kept, and the due
//!    index is rebuilt from the entries.
//! 4. Set the commit mark to what the database now holds, so `serve` starts.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use rocksdb::{IteratorMode, WriteBatch, WriteOptions, DB};

use super::{
    cf, cf_descriptors, check_format, db_options, keys, map_db_error, mark, Cf, QueueEntry,
    SpoolError, StoredEnvelope,
};

/// What [`recover`] did.
#[derive(Debug, Default)]
pub struct Recovery {
    /// The database would not open even skipping bad log records: it was rebuilt from its
    /// files by RocksDB's repairer; why it would not open.
    pub repaired: Option<String>,
    /// Before the repairer rewrote anything: where every file of the spool was linked, as
    /// it was (the repairer cannot put blob files back, so mail may still be in there).
    pub preserved: Option<std::path::PathBuf>,
    /// Acknowledged commits that are not in the database (from the commit mark).
    pub commits_lost: u64,
    /// The log had bad records in it (not only an incomplete last one): they were
    /// skipped, and whatever mail they held is gone without a trace in the spool. What.
    pub bad_log_records: Option<String>,
    /// Queue entries removed because they, their envelope or their message cannot be
    /// read: `(domain, id, why)`.
    pub entries_lost: Vec<(String, String, String)>,
    /// Envelopes and messages that no queue entry needed, removed.
    pub orphans_removed: usize,
    /// What is kept: messages, queue entries, domains.
    pub messages: usize,
    pub entries: usize,
    pub domains: usize,
}

/// Recovers the spool at `dir` (which no server may have open: RocksDB's lock says so).
pub fn recover(dir: &Path) -> Result<Recovery, SpoolError> {
    if !dir.join("CURRENT").is_file() {
        return Err(SpoolError::Missing {
            path: dir.to_path_buf(),
        });
    }
    let mut report = Recovery::default();
    let want = mark::read(dir)?;
    // Does it open as `serve` opens it? If not for a bad log record, recovery skips those.
    if let Err(e) =
        DB::open_cf_descriptors_read_only(&db_options(false), dir, cf_descriptors(), false)
    {
        let e = map_db_error(e, dir);
        if let SpoolError::Corrupt(what) = e {
            report.bad_log_records = Some(what);
        }
    }
    let mut opts = db_options(false);
    opts.set_wal_recovery_mode(rocksdb::DBRecoveryMode::SkipAnyCorruptedRecord);
    let db = match DB::open_cf_descriptors(&opts, dir, cf_descriptors()) {
        Ok(db) => db,
        Err(e) => {
            let e = map_db_error(e, dir);
            if matches!(e, SpoolError::Locked { .. }) {
                return Err(e);
            }
            report.repaired = Some(e.to_string());
            report.preserved = Some(preserve(dir)?);
            let mut repair = db_options(false);
            repair.set_wal_recovery_mode(rocksdb::DBRecoveryMode::SkipAnyCorruptedRecord);
            DB::repair(&repair, dir).map_err(|e| map_db_error(e, dir))?;
            let mut reopen = db_options(false);
            reopen.create_missing_column_families(true);
            reopen.set_wal_recovery_mode(rocksdb::DBRecoveryMode::SkipAnyCorruptedRecord);
            DB::open_cf_descriptors(&reopen, dir, cf_descriptors())
                .map_err(|e| map_db_error(e, dir))?
        }
    };
    if let Some(want) = want {
        report.commits_lost = want.saturating_sub(db.latest_sequence_number());
    }
    if let Err(e) = check_format(&db, dir, false) {
        // A repaired database may have lost the format key itself: give it back, since
        // everything else in it was written by this format.
        if !matches!(e, SpoolError::Corrupt(_)) {
            return Err(e);
        }
        check_format(&db, dir, true)?;
    }
    check_entries(&db, dir, &mut report)?;
    let mark = mark::Mark::open(dir, db.latest_sequence_number())?;
    drop(mark);
    super::make_private(dir)?;
    Ok(report)
}

/// Hard-links every file of the spool into `lost/damaged-SECONDS/` (no copy, no rewrite):
/// whatever the repairer does, the files as they were stay there for an expert.
fn preserve(dir: &Path) -> Result<std::path::PathBuf, SpoolError> {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let to = dir.join("lost").join(format!("damaged-{secs}"));
    super::create_private_dir(&to)?;
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        if !entry.file_type()?.is_file() || name == "LOCK" {
            continue;
        }
        std::fs::hard_link(entry.path(), to.join(&name))?;
    }
    Ok(to)
}

fn check_entries(db: &DB, dir: &Path, report: &mut Recovery) -> Result<(), SpoolError> {
    let err = |e: rocksdb::Error| map_db_error(e, dir);
    let (queue, envelopes, messages, due) = (
        cf(db, Cf::Queue)?,
        cf(db, Cf::Envelopes)?,
        cf(db, Cf::Messages)?,
        cf(db, Cf::Due)?,
    );
    let mut wb = WriteBatch::default();
    // id → the domains whose entries are kept.
    let mut kept: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    // Entries kept and not held: (domain, id, next attempt), for the due index.
    let mut due_keys = Vec::new();
    let mut iter = db.iterator_cf(queue, IteratorMode::Start);
    loop {
        let (key, value) = match iter.next() {
            None => break,
            Some(Ok(kv)) => kv,
            Some(Err(e)) => {
                // A damaged block of the index: what follows in it cannot be reached.
                report.entries_lost.push((
                    "?".into(),
                    "?".into(),
                    format!("the queue index cannot be read past this point: {e}"),
                ));
                break;
            }
        };
        let Some((domain, id)) = keys::parse_queue(&key) else {
            wb.delete_cf(queue, &key);
            report
                .entries_lost
                .push(("?".into(), format!("{key:?}"), "not a queue key".into()));
            continue;
        };
        let why = match entry_problem(db, &value, id, envelopes, messages) {
            None => {
                kept.entry(id.to_string())
                    .or_default()
                    .insert(domain.to_string());
                if let Ok(entry) = QueueEntry::from_bytes(&value) {
                    if !entry.held {
                        due_keys.push((domain.to_string(), id.to_string(), entry.next_attempt_ms));
                    }
                }
                continue;
            }
            Some(why) => why,
        };
        wb.delete_cf(queue, &key);
        report
            .entries_lost
            .push((domain.to_string(), id.to_string(), why));
    }
    drop(iter);

    // The due index, rebuilt: every old key goes, one per kept entry comes.
    for item in db.iterator_cf(due, IteratorMode::Start) {
        let (key, _) = item.map_err(err)?;
        wb.delete_cf(due, &key);
    }
    for (domain, id, at) in &due_keys {
        wb.put_cf(due, keys::due(*at, domain, id), []);
    }

    // Envelopes: the kept ones name exactly the kept domains; the others go, with their
    // message.
    for item in db.iterator_cf(envelopes, IteratorMode::Start) {
        let (key, value) = item.map_err(err)?;
        let id = String::from_utf8_lossy(&key).into_owned();
        match kept.get(&id) {
            Some(domains) => {
                if let Ok(mut stored) = StoredEnvelope::from_bytes(&value) {
                    let want: Vec<String> = domains.iter().cloned().collect();
                    if stored.domains != want {
                        stored.domains = want;
                        wb.put_cf(envelopes, &key, stored.to_bytes());
                    }
                }
            }
            None => {
                wb.delete_cf(envelopes, &key);
                report.orphans_removed += 1;
            }
        }
    }
    let mut ro = rocksdb::ReadOptions::default();
    ro.fill_cache(false);
    for item in db.iterator_cf_opt(messages, ro, IteratorMode::Start) {
        let (key, _) = match item {
            Ok(kv) => kv,
            Err(_) => break,
        };
        if !kept.contains_key(String::from_utf8_lossy(keys::message_of(&key)).as_ref()) {
            wb.delete_cf(messages, &key);
            report.orphans_removed += 1;
        }
    }
    let mut o = WriteOptions::default();
    o.set_sync(true);
    db.write_opt(wb, &o).map_err(err)?;
    // Each domain's counters, counted again from what was kept.
    let counted = super::usage::count(db, dir)?;
    super::writer::write_synced(db, dir, &super::usage::store_batch(db, dir, &counted)?)?;

    report.messages = kept.len();
    report.entries = kept.values().map(BTreeSet::len).sum();
    report.domains = kept.values().flatten().collect::<BTreeSet<&String>>().len();
    Ok(())
}

/// Why the queue entry `value` of message `id` cannot be delivered, if it cannot.
fn entry_problem(
    db: &DB,
    value: &[u8],
    id: &str,
    envelopes: &rocksdb::ColumnFamily,
    messages: &rocksdb::ColumnFamily,
) -> Option<String> {
    if let Err(e) = QueueEntry::from_bytes(value) {
        return Some(format!("its queue entry cannot be read ({e})"));
    }
    let parts = match db.get_cf(envelopes, keys::message(id)) {
        Ok(Some(raw)) => match StoredEnvelope::from_bytes(&raw) {
            Ok(stored) => stored.parts,
            Err(e) => return Some(format!("its envelope cannot be read ({e})")),
        },
        Ok(None) => return Some("its envelope is gone".into()),
        Err(e) => return Some(format!("its envelope cannot be read ({e})")),
    };
    let keys = std::iter::once(keys::message(id)).chain((1..=parts).map(|n| keys::part(id, n)));
    for (n, key) in keys.enumerate() {
        let what = if n == 0 {
            "its message".to_string()
        } else {
            format!("part {n} of its message")
        };
        match db.get_pinned_cf(messages, key) {
            Ok(Some(_)) => {}
            Ok(None) => return Some(format!("{what} is gone")),
            Err(e) => return Some(format!("{what} cannot be read ({e})")),
        }
    }
    None
}
