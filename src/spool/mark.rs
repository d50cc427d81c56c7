//! The commit mark: the RocksDB sequence number of the last commit whose callers were
//! answered (and so whose mail got `250`), kept in `SPOOL/COMMITTED`, outside the database.
//!
//! RocksDB cannot tell a log cut at a record boundary, or a log file gone, from a log that
//! simply ended there: it opens and the acknowledged mail is silently missing. The mark
//! can tell: a spool whose recovered sequence number is below the mark has lost commits
//! that were acknowledged, and [`super::Spool::open`] refuses it (`mxspool recover` then
//! keeps what can be read).
//!
//! The mark is written after each synced commit, with one `pwrite` and no fsync, and synced
//! when the writer stops. After a power cut it may therefore be older than the log, never
//! newer (the log was synced before the mark was written): it can miss a loss of the last
//! few commits, but never reports a loss that did not happen. A mark that is missing or
//! does not check out (torn, or not ours) is ignored.

use std::fs::File;
use std::io::ErrorKind;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;

/// The file's name inside the spool directory (RocksDB leaves names it does not know
/// alone).
pub const NAME: &str = "COMMITTED";

const MAGIC: &[u8; 4] = b"MXSQ";
const LEN: usize = 16;

pub struct Mark {
    file: File,
    failed: std::sync::atomic::AtomicBool,
}

/// `MAGIC`, the sequence number (u64 BE), a checksum of both (FNV-1a, u32 BE).
fn encode(seq: u64) -> [u8; LEN] {
    let mut b = [0u8; LEN];
    b[..4].copy_from_slice(MAGIC);
    b[4..12].copy_from_slice(&seq.to_be_bytes());
    let sum = checksum(&b[..12]);
    b[12..].copy_from_slice(&sum.to_be_bytes());
    b
}

fn decode(b: &[u8]) -> Option<u64> {
    if b.len() != LEN || &b[..4] != MAGIC {
        return None;
    }
    let sum = u32::from_be_bytes(b[12..16].try_into().ok()?);
    if sum != checksum(&b[..12]) {
        return None;
    }
    Some(u64::from_be_bytes(b[4..12].try_into().ok()?))
}

fn checksum(b: &[u8]) -> u32 {
    b.iter().fold(0x811c_9dc5u32, |h, &x| {
        (h ^ x as u32).wrapping_mul(0x0100_0193)
    })
}

/// The mark of the spool at `dir`: `None` when there is none, or it does not check out.
pub fn read(dir: &Path) -> std::io::Result<Option<u64>> {
    match std::fs::read(dir.join(NAME)) {
        Ok(b) => {
            let seq = decode(&b);
            if seq.is_none() {
                tracing::warn!(
                    "{}: not a commit mark (ignored; it is rewritten at the next commit)",
                    dir.join(NAME).display()
                );
            }
            Ok(seq)
        }
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

impl Mark {
    /// Opens (creating, mode 0600) the mark of the spool at `dir` and sets it to `seq`.
    pub fn open(dir: &Path, seq: u64) -> std::io::Result<Mark> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(dir.join(NAME))?;
        let mark = Mark {
            file,
            failed: std::sync::atomic::AtomicBool::new(false),
        };
        mark.file.write_all_at(&encode(seq), 0)?;
        mark.file.set_len(LEN as u64)?;
        mark.file.sync_all()?;
        Ok(mark)
    }

    /// Records that every commit up to `seq` was acknowledged. A failure is logged once
    /// (the mark only stays older, which is safe) and never fails the commit.
    pub fn record(&self, seq: u64) {
        use std::sync::atomic::Ordering;
        match self.file.write_all_at(&encode(seq), 0) {
            Ok(()) => {
                if self.failed.swap(false, Ordering::Relaxed) {
                    tracing::info!("the spool's commit mark is written again");
                }
            }
            Err(e) => {
                if !self.failed.swap(true, Ordering::Relaxed) {
                    tracing::warn!(
                        "cannot write the spool's commit mark ({}): lost commits may go unnoticed until it works again",
                        crate::config::os_error(&e)
                    );
                }
            }
        }
    }

    /// Makes the last recorded value durable (when the writer stops).
    pub fn sync(&self) {
        if let Err(e) = self.file.sync_data() {
            tracing::warn!(
                "cannot sync the spool's commit mark: {}",
                crate::config::os_error(&e)
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_mark_round_trips_and_a_torn_one_is_ignored() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(read(dir.path()).unwrap(), None);
        let m = Mark::open(dir.path(), 7).unwrap();
        assert_eq!(read(dir.path()).unwrap(), Some(7));
        m.record(1 << 40);
        m.sync();
        assert_eq!(read(dir.path()).unwrap(), Some(1 << 40));
        let mut b = std::fs::read(dir.path().join(NAME)).unwrap();
        b[6] ^= 1;
        std::fs::write(dir.path().join(NAME), &b).unwrap();
        assert_eq!(read(dir.path()).unwrap(), None);
        std::fs::write(dir.path().join(NAME), b"MXSQ").unwrap();
        assert_eq!(read(dir.path()).unwrap(), None);
    }
}
