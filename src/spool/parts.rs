//! Large messages in parts: written as they arrive, read back one part at a time.
//!
//! A message is stored at `messages/id` when it is small (the first part is the whole), and
//! as that first part plus parts `id 0x00 n` (`n` from 1, [`keys::part`]) when it is large;
//! [`StoredEnvelope::parts`] says how many follow. While DATA goes on, the SMTP driver
//! writes each full part at once with [`Spool::write_part`]: a lazy batch of the writer
//! thread (no fsync of its own), marked `partial` in `meta` with the first one. The commit that queues the
//! message is synced, and RocksDB's log is one sequence, so that fsync makes every earlier
//! part durable too: `250` still comes only after everything of the message is on disk.
//! A message refused or abandoned has its parts removed ([`Spool::discard_parts`]); what a
//! crash leaves (a `partial` mark without its envelope) is removed at the next start
//! ([`sweep_partial`]). Nobody holds more than one part of a message in memory: session,
//! delivery, `show`, export and DSNs all read through [`Message`]; `import` stores what
//! it reads from an archive the same way ([`Spool::read_parts`]).

use std::io::Read;

use rocksdb::{WriteBatch, WriteOptions, DB};

use super::keys::{self, Cf};
use super::{
    cf, map_db_error, Batch, ImportError, Parts, Spool, SpoolError, StoredEnvelope, PART_SIZE,
};

/// A stored message, ready to be read part by part: the first part in memory, the others
/// read when asked for.
#[derive(Clone)]
pub struct Message {
    first: Vec<u8>,
    parts: u32,
    len: u64,
    /// Where the other parts are (none for a message held whole in memory).
    source: Option<(Spool, String)>,
}

impl std::fmt::Debug for Message {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Message")
            .field("len", &self.len)
            .field("parts", &self.parts)
            .finish()
    }
}

impl From<Vec<u8>> for Message {
    /// A message held whole in memory (tests, DSNs before they are queued).
    fn from(bytes: Vec<u8>) -> Message {
        Message {
            len: bytes.len() as u64,
            first: bytes,
            parts: 0,
            source: None,
        }
    }
}

impl Message {
    /// Bytes of the whole message.
    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The first part: the whole message when it is small, and at least the `Received:`
    /// line and the header section as received when it came in parts.
    pub fn first(&self) -> &[u8] {
        &self.first
    }

    /// Parts after the first.
    pub fn parts(&self) -> u32 {
        self.parts
    }

    /// Part `n` (1 ..= [`Message::parts`]). Blocking: a RocksDB read.
    pub fn part(&self, n: u32) -> Result<Vec<u8>, SpoolError> {
        let Some((spool, id)) = &self.source else {
            return Err(SpoolError::Corrupt(format!(
                "part {n} of a message in memory"
            )));
        };
        let db = spool.db()?;
        let db = &*db;
        db.get_cf(cf(db, Cf::Messages)?, keys::part(id, n))
            .map_err(|e| spool.err(e))?
            .ok_or_else(|| SpoolError::Corrupt(format!("{id}: part {n} of the message is missing")))
    }

    /// [`Message::part`] on a blocking thread, for async callers.
    pub async fn part_async(&self, n: u32) -> Result<Vec<u8>, SpoolError> {
        let me = self.clone_source();
        match tokio::task::spawn_blocking(move || me.part(n)).await {
            Ok(r) => r,
            Err(e) => Err(SpoolError::Db(format!("spool read task failed: {e}"))),
        }
    }

    /// The same message without a copy of the first part (for reading the others).
    fn clone_source(&self) -> Message {
        Message {
            first: Vec::new(),
            parts: self.parts,
            len: self.len,
            source: self.source.clone(),
        }
    }

    /// A blocking reader of the whole message, one part in memory at a time.
    pub fn reader(&self) -> MessageReader<'_> {
        MessageReader {
            message: self,
            current: None,
            next: 1,
            pos: 0,
        }
    }

    /// At most `limit` bytes from the start of the message (blocking).
    pub fn prefix(&self, limit: usize) -> Result<Vec<u8>, SpoolError> {
        let mut out = Vec::with_capacity(limit.min(self.len as usize));
        out.extend_from_slice(&self.first[..self.first.len().min(limit)]);
        let mut n = 1;
        while out.len() < limit && n <= self.parts {
            let p = self.part(n)?;
            let room = limit - out.len();
            out.extend_from_slice(&p[..p.len().min(room)]);
            n += 1;
        }
        Ok(out)
    }

    /// The whole message in memory (blocking); for the small ones and for tests.
    pub fn to_vec(&self) -> Result<Vec<u8>, SpoolError> {
        self.prefix(usize::MAX)
    }
}

/// [`Message::reader`]: `std::io::Read` over the parts.
pub struct MessageReader<'a> {
    message: &'a Message,
    /// The part being read (after the first), when there is one.
    current: Option<Vec<u8>>,
    next: u32,
    pos: usize,
}

impl Read for MessageReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        loop {
            let part: &[u8] = match &self.current {
                Some(p) => p,
                None => &self.message.first,
            };
            if self.pos < part.len() {
                let n = buf.len().min(part.len() - self.pos);
                buf[..n].copy_from_slice(&part[self.pos..self.pos + n]);
                self.pos += n;
                return Ok(n);
            }
            if self.next > self.message.parts || buf.is_empty() {
                return Ok(0);
            }
            let p = self
                .message
                .part(self.next)
                .map_err(std::io::Error::other)?;
            self.current = Some(p);
            self.next += 1;
            self.pos = 0;
        }
    }
}

impl Spool {
    /// Store part `n` (from 1) of message `id` ahead of its commit, without an fsync of its
    /// own (see the module doc); the first one marks the message `partial`. Blocking.
    ///
    /// Through the writer thread as a lazy batch, like every write after open: were it
    /// written beside the writer, it could land between a synced commit and the writer's
    /// reading of the sequence number for the commit mark, and the mark would then name a
    /// record that a power cut may take (a spool refused as damaged with nothing lost).
    pub fn write_part(&self, id: &str, n: u32, bytes: &[u8]) -> Result<(), SpoolError> {
        self.writer()?;
        if id.is_empty() || !keys::valid_part(id) || n == 0 {
            return Err(SpoolError::Invalid(format!("bad part {n} of {id:?}")));
        }
        let mut b = Batch::new();
        if n == 1 {
            b.put(Cf::Meta, keys::partial(id), Vec::new());
        }
        b.put(Cf::Messages, keys::part(id, n), bytes.to_vec());
        self.commit_blocking(b.lazy())
    }

    /// Remove the parts `1..=written` of a message that will not be queued, and its mark.
    /// Blocking; unsynced, through the writer (a crash before the next commit leaves them
    /// to [`sweep_partial`]).
    pub fn discard_parts(&self, id: &str, written: u32) -> Result<(), SpoolError> {
        self.writer()?;
        let mut b = Batch::new();
        for n in 1..=written {
            b.delete(Cf::Messages, keys::part(id, n));
        }
        b.delete(Cf::Meta, keys::partial(id));
        self.commit_blocking(b.lazy())?;
        self.removed(written as u64 * super::PART_SIZE as u64);
        Ok(())
    }

    /// A new message `id` read from `bytes` into parts of [`PART_SIZE`], as
    /// [`Parts::whole`] would cut it: the first kept, every further full part stored ahead
    /// ([`Spool::write_part`]), the last (short) one kept for the commit. So at most two
    /// parts are in memory. What was stored ahead is removed again when reading or storing
    /// fails. Blocking.
    pub(super) fn read_parts(&self, id: &str, bytes: &mut dyn Read) -> Result<Parts, ImportError> {
        let first = read_part(bytes).map_err(ImportError::Read)?;
        let mut parts = Parts {
            first,
            ..Parts::default()
        };
        if parts.first.len() < PART_SIZE {
            return Ok(parts);
        }
        loop {
            let part = match read_part(bytes) {
                Ok(p) => p,
                Err(e) => {
                    self.discard_written(id, parts.written);
                    return Err(ImportError::Read(e));
                }
            };
            if part.len() < PART_SIZE {
                if !part.is_empty() {
                    parts.rest.push(part);
                }
                return Ok(parts);
            }
            if let Err(e) = self.write_part(id, parts.written + 1, &part) {
                self.discard_written(id, parts.written);
                return Err(e.into());
            }
            parts.written += 1;
            parts.written_len += part.len() as u64;
        }
    }

    /// [`Spool::discard_parts`] for a message whose import failed; a failure to remove
    /// is only logged (the sweep at the next open removes them then).
    pub(super) fn discard_written(&self, id: &str, written: u32) {
        if written == 0 {
            return;
        }
        if let Err(e) = self.discard_parts(id, written) {
            tracing::warn!("{id}: cannot remove the parts of a message not imported: {e}");
        }
    }

    /// Message `id`, its first part read (the rest is read when asked for); `None` when it
    /// is not in the spool.
    pub fn load_message(&self, id: &str) -> Result<Option<Message>, SpoolError> {
        match self.stored_envelope(id)? {
            Some(stored) => self.message_of(id, &stored),
            None => Ok(None),
        }
    }

    /// [`Spool::load_message`] for a caller that has just read the envelope record.
    pub fn message_of(
        &self,
        id: &str,
        stored: &StoredEnvelope,
    ) -> Result<Option<Message>, SpoolError> {
        let db = self.db()?;
        let db = &*db;
        let Some(first) = db
            .get_cf(cf(db, Cf::Messages)?, keys::message(id))
            .map_err(|e| self.err(e))?
        else {
            return Ok(None);
        };
        let len = if stored.parts > 0 {
            stored.length
        } else {
            first.len() as u64
        };
        Ok(Some(Message {
            first,
            parts: stored.parts,
            len,
            source: Some((self.clone(), id.to_string())),
        }))
    }
}

/// Up to [`PART_SIZE`] bytes of `r`: fewer only at its end.
fn read_part(r: &mut dyn Read) -> std::io::Result<Vec<u8>> {
    let mut part = Vec::with_capacity(PART_SIZE);
    r.take(PART_SIZE as u64).read_to_end(&mut part)?;
    Ok(part)
}

/// At start: remove what messages that were never queued left behind (a `partial` mark
/// with no envelope: the server stopped during their DATA). Returns how many.
pub(super) fn sweep_partial(db: &DB, path: &std::path::Path) -> Result<usize, SpoolError> {
    let err = |e| map_db_error(e, path);
    let (meta, messages, envelopes) = (
        cf(db, Cf::Meta)?,
        cf(db, Cf::Messages)?,
        cf(db, Cf::Envelopes)?,
    );
    let mut ids = Vec::new();
    let iter = db.iterator_cf(
        meta,
        rocksdb::IteratorMode::From(keys::PARTIAL_PREFIX, rocksdb::Direction::Forward),
    );
    for item in iter {
        let (key, _) = item.map_err(err)?;
        let Some(id) = keys::parse_partial(&key) else {
            break;
        };
        ids.push(id.to_string());
    }
    let mut wb = WriteBatch::default();
    let mut removed = 0;
    for id in &ids {
        wb.delete_cf(meta, keys::partial(id));
        if db
            .get_pinned_cf(envelopes, keys::message(id))
            .map_err(err)?
            .is_none()
        {
            wb.delete_range_cf(messages, keys::part(id, 1), keys::parts_end(id));
            removed += 1;
        }
    }
    if !ids.is_empty() {
        let mut o = WriteOptions::default();
        o.set_sync(true);
        db.write_opt(wb, &o).map_err(err)?;
    }
    Ok(removed)
}
