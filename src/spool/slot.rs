//! The open database, in a slot the writer can refill: RocksDB stops every write after a
//! "hard" background error (a flush or a log write that failed: no descriptor left, an I/O
//! error) and its C API has no `Resume`; closing and opening the database again clears the
//! error once its cause is gone. Readers take the database out of the slot for one
//! operation ([`DbSlot::get`]); [`DbSlot::reopen`] waits until they have given it back.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use rocksdb::DB;

use super::{cf_descriptors, check_format, db_options, open_error, SpoolError};

/// How long a reopen waits for the readers of the old database to finish.
const DRAIN: Duration = Duration::from_secs(10);

pub(super) struct DbSlot {
    db: RwLock<Option<Arc<DB>>>,
    path: PathBuf,
}

impl DbSlot {
    pub fn new(db: DB, path: &Path) -> Arc<DbSlot> {
        Arc::new(DbSlot {
            db: RwLock::new(Some(Arc::new(db))),
            path: path.to_path_buf(),
        })
    }

    /// The database, for one operation; an error while it is closed (a reopen failed).
    pub fn get(&self) -> Result<Arc<DB>, SpoolError> {
        let db = self.db.read().unwrap_or_else(|p| p.into_inner());
        db.clone().ok_or_else(|| {
            SpoolError::Db(format!(
                "spool {} is closed after a failed reopen; the next try reopens it",
                self.path.display()
            ))
        })
    }

    /// Close the database and open it again (blocking): what clears a RocksDB background
    /// error. Readers holding the old one are waited for (at most 10 s, then the old one is
    /// kept and this fails). If the open fails the slot stays empty until the next reopen.
    pub fn reopen(&self) -> Result<(), SpoolError> {
        let mut slot = self.db.write().unwrap_or_else(|p| p.into_inner());
        if let Some(old) = slot.take() {
            let deadline = Instant::now() + DRAIN;
            while Arc::strong_count(&old) > 1 {
                if Instant::now() >= deadline {
                    *slot = Some(old);
                    return Err(SpoolError::Db(
                        "cannot reopen the spool: it is still being read".into(),
                    ));
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            drop(old);
        }
        let db = DB::open_cf_descriptors(&db_options(true), &self.path, cf_descriptors())
            .map_err(|e| open_error(e, &self.path))?;
        check_format(&db, &self.path, true)?;
        *slot = Some(Arc::new(db));
        Ok(())
    }
}
