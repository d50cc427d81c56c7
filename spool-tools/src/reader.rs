//! Reading an archive: [`ArchiveReader::open`] verifies the whole file in a first pass,
//! then [`ArchiveReader::for_each_entry`] and friends read the good messages one at a time
//! in a second pass (each re-hashed as it is read).

use std::cell::Cell;
use std::collections::{HashMap, HashSet};
use std::fmt;
use std::fs::File;
use std::io::{self, BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::rc::Rc;

use flate2::read::MultiGzDecoder;
use sha2::{Digest, Sha256};

use crate::envelope::{is_valid_id, ArchivedEnvelope};
use crate::error::{io_err, Error, Result};
use crate::manifest::{classify, ArchiveMeta, Half, Manifest, Member, FORMAT_MEMBER, FORMAT_NAME};
use crate::writer::hex;
use crate::FORMAT_VERSION;

/// The largest `FORMAT` member, envelope and manifest the reader takes in memory.
const MAX_FORMAT: u64 = 64;
const MAX_ENVELOPE: u64 = 16 << 20;
/// A manifest lists each message once, in a few hundred bytes: one bigger than this for the
/// messages the archive holds is not a manifest (and is never read into memory).
fn max_manifest(messages: usize) -> u64 {
    64 << 10 | (messages as u64).saturating_mul(1 << 10)
}

/// One good message: its envelope and its raw RFC 5322 bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub envelope: ArchivedEnvelope,
    pub message: Vec<u8>,
}

/// Damage confined to one message (or one stray member): that message is not given out.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    /// The message id, or the member name when the member names no message.
    pub subject: String,
    /// What is wrong, in a few words.
    pub what: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.subject, self.what)
    }
}

/// How [`ArchiveReader::open_with`] treats damage.
#[derive(Clone, Copy, Debug, Default)]
pub struct ReadOptions {
    /// Instead of failing with [`Error::Truncated`], give the messages that were read
    /// whole before the cut. They cannot be checked against the manifest:
    /// [`ArchiveReader::is_verified`] is then `false`, and a [`Problem`] on
    /// `manifest.json` says so. A damaged stream ([`Error::Damaged`]) is never salvaged:
    /// what it gave before the damage showed may already be wrong.
    pub salvage: bool,
    /// Messages bigger than this (bytes) are not given out: a [`Problem`] names each, and
    /// it is never read into memory (`mxspool import` passes its `max_message_size`).
    pub max_message: Option<u64>,
}

/// How the archive file is compressed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compression {
    None,
    Gzip,
}

/// A verified archive. See the module docs of the crate for the checks made by `open`.
#[derive(Debug)]
pub struct ArchiveReader {
    path: PathBuf,
    compression: Compression,
    meta: Option<ArchiveMeta>,
    verified: bool,
    good: Vec<Good>,
    problems: Vec<Problem>,
}

/// A message that passed every check, with the digests its members must still have.
#[derive(Debug)]
struct Good {
    id: String,
    json: Sum,
    eml: Sum,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Sum {
    sha: [u8; 32],
    size: u64,
}

/// What pass 1 saw of one message id.
#[derive(Default)]
struct Seen {
    json: Option<Sum>,
    eml: Option<Sum>,
    /// Why the envelope is unusable (unparsable, invalid, id mismatch).
    envelope_problem: Option<String>,
    duplicate: bool,
}

impl Seen {
    fn complete(&self) -> bool {
        self.json.is_some() && self.eml.is_some()
    }
}

/// Where a broken stream broke.
enum StreamFailure {
    Truncated,
    Damaged(String),
}

impl ArchiveReader {
    /// Opens and verifies the archive at `path` (plain or gzip-compressed tar).
    ///
    /// Fails as a whole when the file is not an archive of this format version (checked on
    /// the first member, before anything else is read), when it is truncated or damaged
    /// so that its manifest cannot be read, or when the manifest is unusable. Damage to
    /// single messages is no error: see [`problems`](Self::problems).
    pub fn open(path: impl AsRef<Path>) -> Result<ArchiveReader> {
        Self::open_with(path, ReadOptions::default())
    }

    /// [`open`](Self::open) with options.
    pub fn open_with(path: impl AsRef<Path>, options: ReadOptions) -> Result<ArchiveReader> {
        let path = path.as_ref().to_path_buf();
        let Stream {
            reader: stream,
            compression,
            eof,
        } = open_stream(&path)?;
        let mut archive = tar::Archive::new(stream);
        let mut entries = archive.entries().map_err(io_err(path.display()))?;

        let mut seen: HashMap<String, Seen> = HashMap::new();
        let mut order: Vec<String> = Vec::new();
        let mut strays: Vec<Problem> = Vec::new();
        let mut manifest: Option<Manifest> = None;
        let mut format_checked = false;
        let mut failure: Option<StreamFailure> = None;

        loop {
            let mut entry = match entries.next() {
                None => break,
                Some(Ok(e)) => e,
                Some(Err(e)) => {
                    if !format_checked {
                        return Err(not_an_archive(&e, eof.get()));
                    }
                    failure = Some(classify_failure(e, eof.get()));
                    break;
                }
            };
            let raw_name = entry.path_bytes().into_owned();
            let name = String::from_utf8_lossy(&raw_name).into_owned();
            let kind = entry.header().entry_type();
            if kind.is_dir() {
                continue;
            }
            let size = entry.size();
            if !format_checked {
                // The version check comes first, before anything else is read.
                if classify(&name) != Member::Format {
                    return Err(Error::Format(format!(
                        "the first member is {name:?}, not {FORMAT_MEMBER}"
                    )));
                }
                let read = read_member(&mut entry, size, MAX_FORMAT);
                let (_, data) = read.map_err(|e| not_an_archive(&e, eof.get()))?;
                check_format_member(data.as_deref())?;
                format_checked = true;
                continue;
            }
            if !(kind.is_file() || kind.is_contiguous()) {
                strays.push(problem(
                    &name,
                    "unexpected member type (not a regular file)",
                ));
                continue;
            }
            let member = classify(&name);
            if member == Member::Manifest && size > max_manifest(seen.len()) {
                return Err(Error::Format(format!(
                    "the manifest is {size} bytes, more than a manifest of {} message(s) can need",
                    seen.len()
                )));
            }
            let keep = match member {
                Member::Manifest => max_manifest(seen.len()),
                Member::Message(_, Half::Json) => MAX_ENVELOPE,
                _ => 0,
            };
            let (sum, data) = match read_member(&mut entry, size, keep) {
                Ok(r) => r,
                Err(e) => {
                    failure = Some(classify_failure(e, eof.get()));
                    break;
                }
            };
            match member {
                Member::Format => strays.push(problem(&name, "a second FORMAT member")),
                Member::Directory => {}
                Member::Unknown => strays.push(problem(&name, "unexpected member")),
                Member::Manifest => {
                    if manifest.is_some() {
                        return Err(Error::Format("two manifests".to_string()));
                    }
                    manifest = Some(parse_manifest(data.as_deref())?);
                }
                Member::Message(id, half) => {
                    if !is_valid_id(id) {
                        strays.push(problem(&name, "invalid message id in the member name"));
                        continue;
                    }
                    let s = seen.entry(id.to_string()).or_insert_with(|| {
                        order.push(id.to_string());
                        Seen::default()
                    });
                    let slot = match half {
                        Half::Json => &mut s.json,
                        Half::Eml => &mut s.eml,
                    };
                    if slot.is_some() {
                        s.duplicate = true;
                    }
                    *slot = Some(sum);
                    if half == Half::Json {
                        s.envelope_problem = envelope_problem(id, data.as_deref()).err();
                    }
                }
            }
        }
        if failure.is_none() && manifest.is_some() {
            // Read to the end of the stream: a gzip stream is checked (CRC, length) only
            // there. The messages are verified already, so this is a problem, not an error.
            let mut rest = archive.into_inner();
            if let Err(e) = io::copy(&mut rest, &mut io::sink()) {
                let what = match classify_failure(e, false) {
                    StreamFailure::Truncated => "the file is cut short after the manifest",
                    StreamFailure::Damaged(_) => {
                        "the compressed stream is damaged after the manifest"
                    }
                };
                strays.push(problem(
                    "archive",
                    &format!("{what} (every message was verified all the same)"),
                ));
            }
        }

        if !format_checked {
            return Err(Error::Format(
                "the file is empty or holds no tar member".to_string(),
            ));
        }
        let mut reader = ArchiveReader {
            path,
            compression,
            meta: None,
            verified: false,
            good: Vec::new(),
            problems: Vec::new(),
        };
        match (failure, manifest) {
            (None, Some(manifest)) => reader.check_against(manifest, seen, &order),
            (failure, _) => {
                let complete = order
                    .iter()
                    .filter(|id| seen[*id].complete() && seen[*id].envelope_problem.is_none())
                    .count();
                match failure {
                    // What a damaged stream gave before the damage showed may already be
                    // garbage (a gzip stream decodes wrong bytes for a while): never salvaged.
                    Some(StreamFailure::Damaged(detail)) => {
                        return Err(Error::Damaged { complete, detail })
                    }
                    _ if !options.salvage => return Err(Error::Truncated { complete }),
                    _ => reader.salvage(seen, &order),
                }
            }
        }
        if let Some(max) = options.max_message {
            let (fit, big): (Vec<Good>, Vec<Good>) =
                reader.good.drain(..).partition(|g| g.eml.size <= max);
            reader.good = fit;
            for g in big {
                reader.problems.push(problem(
                    &g.id,
                    &format!(
                        "the message is {} bytes, more than the {max} allowed",
                        g.eml.size
                    ),
                ));
            }
        }
        reader.problems.extend(strays);
        Ok(reader)
    }

    /// Pass 1 found the manifest: every message must match it, and only its messages may
    /// be in the archive.
    fn check_against(
        &mut self,
        manifest: Manifest,
        mut seen: HashMap<String, Seen>,
        order: &[String],
    ) {
        self.meta = Some(ArchiveMeta {
            created: manifest.created,
            source_host: manifest.source_host,
            domain: manifest.domain,
        });
        self.verified = true;
        let mut listed = HashSet::new();
        for m in manifest.messages {
            if !listed.insert(m.id.clone()) {
                self.good.retain(|g| g.id != m.id);
                self.problems
                    .push(problem(&m.id, "listed twice in the manifest"));
                continue;
            }
            let Some(s) = seen.remove(&m.id) else {
                self.problems.push(problem(
                    &m.id,
                    "listed in the manifest but not in the archive",
                ));
                continue;
            };
            let what = if !is_valid_id(&m.id) {
                Some("invalid message id in the manifest".to_string())
            } else if s.duplicate {
                Some("a member appears twice in the archive".to_string())
            } else if s.json.is_none() {
                Some(format!("{}.json is missing", m.id))
            } else if s.eml.is_none() {
                Some(format!("{}.eml is missing", m.id))
            } else if !sum_matches(s.eml, &m.eml_sha256, Some(m.eml_size)) {
                Some(format!("{}.eml does not match its checksum", m.id))
            } else if !sum_matches(s.json, &m.json_sha256, None) {
                Some(format!("{}.json does not match its checksum", m.id))
            } else {
                s.envelope_problem.clone()
            };
            match what {
                Some(what) => self.problems.push(problem(&m.id, &what)),
                None => self.good.push(Good {
                    id: m.id,
                    json: s.json.expect("checked"),
                    eml: s.eml.expect("checked"),
                }),
            }
        }
        for id in order {
            if seen.contains_key(id) {
                self.problems
                    .push(problem(id, "in the archive but not listed in the manifest"));
            }
        }
    }

    /// No manifest (the archive ends too early): take the messages read whole, unverified.
    /// A cut keeps what precedes it byte for byte, in a plain or a gzip stream alike.
    fn salvage(&mut self, seen: HashMap<String, Seen>, order: &[String]) {
        self.problems.push(problem(
            "manifest.json",
            "missing: the archive is truncated; the messages before the cut are unverified",
        ));
        for id in order {
            let s = &seen[id];
            let what = if s.duplicate {
                Some("a member appears twice in the archive".to_string())
            } else if !s.complete() {
                Some("cut off: only one of its two members is in the archive".to_string())
            } else {
                s.envelope_problem.clone()
            };
            match what {
                Some(what) => self.problems.push(problem(id, &what)),
                None => self.good.push(Good {
                    id: id.clone(),
                    json: s.json.expect("complete"),
                    eml: s.eml.expect("complete"),
                }),
            }
        }
    }

    /// The archive file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// How the file is compressed.
    pub fn compression(&self) -> Compression {
        self.compression
    }

    /// Who made the archive, when, and of which domain; `None` for a salvaged archive
    /// without manifest.
    pub fn meta(&self) -> Option<&ArchiveMeta> {
        self.meta.as_ref()
    }

    /// Whether every good message was checked against the manifest (always, unless
    /// salvaged).
    pub fn is_verified(&self) -> bool {
        self.verified
    }

    /// The ids of the good messages, in archive order.
    pub fn ids(&self) -> impl Iterator<Item = &str> {
        self.good.iter().map(|g| g.id.as_str())
    }

    /// How many good messages there are.
    pub fn len(&self) -> usize {
        self.good.len()
    }

    /// Whether there is no good message.
    pub fn is_empty(&self) -> bool {
        self.good.is_empty()
    }

    /// The damaged messages and stray members: none of them is given out.
    pub fn problems(&self) -> &[Problem] {
        &self.problems
    }

    /// Reads the good messages one at a time, in archive order, and hands each to `f`
    /// whole (which may stop the walk by returning an error). Each message is hashed again
    /// as it is read; a file that changed since [`open`](Self::open) gives
    /// [`Error::Changed`]. A message is held whole in memory here: to stream large ones,
    /// use [`for_each_message`](Self::for_each_message).
    pub fn for_each_entry<E: From<Error>>(
        &self,
        mut f: impl FnMut(Entry) -> Result<(), E>,
    ) -> Result<(), E> {
        self.for_each_message(|envelope, bytes| {
            let message = bytes.to_vec().map_err(|_| self.changed())?;
            f(Entry { envelope, message })
        })
    }

    /// Reads the good messages one at a time, in archive order, and hands `f` each
    /// envelope with its bytes as a [`MessageBytes`]: a reader of the `.eml` member straight
    /// from the archive, never held whole in memory, hashed as it goes. The read that
    /// reaches its end fails if the bytes are not those `open` verified; the walk then
    /// ends with [`Error::Changed`], whatever `f` made of it. `f` need not read the bytes.
    pub fn for_each_message<E: From<Error>>(
        &self,
        mut f: impl FnMut(ArchivedEnvelope, &mut MessageBytes<'_>) -> Result<(), E>,
    ) -> Result<(), E> {
        self.walk(None, true, &mut |envelope, bytes| f(envelope, bytes))
    }

    /// Like [`for_each_entry`](Self::for_each_entry), without reading the messages'
    /// bytes: hands `f` each good envelope and its message size.
    pub fn for_each_envelope<E: From<Error>>(
        &self,
        mut f: impl FnMut(ArchivedEnvelope, u64) -> Result<(), E>,
    ) -> Result<(), E> {
        self.walk(None, false, &mut |envelope, bytes| {
            f(envelope, bytes.size())
        })
    }

    /// The raw bytes of message `id`, whole in memory.
    pub fn message(&self, id: &str) -> Result<Vec<u8>> {
        self.entry(id).map(|e| e.message)
    }

    /// Envelope and bytes of message `id`, whole in memory.
    pub fn entry(&self, id: &str) -> Result<Entry> {
        self.with_message(id, |envelope, bytes| {
            let message = bytes.to_vec().map_err(|_| self.changed())?;
            Ok(Entry { envelope, message })
        })
    }

    /// Hands `f` the envelope and the bytes ([`MessageBytes`], streamed as in
    /// [`for_each_message`](Self::for_each_message)) of message `id`, and returns what
    /// `f` returns. A damaged message gives [`Error::BadMessage`], an unknown id
    /// [`Error::NotFound`].
    pub fn with_message<T, E: From<Error>>(
        &self,
        id: &str,
        f: impl FnOnce(ArchivedEnvelope, &mut MessageBytes<'_>) -> Result<T, E>,
    ) -> Result<T, E> {
        if !self.good.iter().any(|g| g.id == id) {
            return Err(match self.problems.iter().find(|p| p.subject == id) {
                Some(p) => Error::BadMessage {
                    id: id.to_string(),
                    what: p.what.clone(),
                },
                None => Error::NotFound(id.to_string()),
            }
            .into());
        }
        let mut f = Some(f);
        let mut found = None;
        self.walk(Some(id), true, &mut |envelope, bytes| {
            let f = f.take().ok_or_else(|| self.changed())?;
            found = Some(f(envelope, bytes)?);
            Ok::<(), E>(())
        })?;
        found.ok_or_else(|| self.changed().into())
    }

    fn changed(&self) -> Error {
        Error::Changed(self.path.display().to_string())
    }

    /// Pass 2: streams the archive and calls `f` for each good message (or only `only`)
    /// when its `.eml` member comes, its envelope read before, with the member's bytes
    /// (when `want_message`; else empty, the member skipped unread). A message whose
    /// `.eml` comes before its `.json` (an archive packed again by hand) is given in a
    /// further pass, its envelope kept; the walk stops once every message was given.
    fn walk<E: From<Error>>(
        &self,
        only: Option<&str>,
        want_message: bool,
        f: &mut dyn FnMut(ArchivedEnvelope, &mut MessageBytes<'_>) -> Result<(), E>,
    ) -> Result<(), E> {
        let mut todo: HashMap<&str, &Good> = self
            .good
            .iter()
            .filter(|g| only.is_none_or(|o| o == g.id))
            .map(|g| (g.id.as_str(), g))
            .collect();
        let mut envelopes: HashMap<&str, ArchivedEnvelope> = HashMap::new();
        while !todo.is_empty() {
            // A pass that gives no message and reads no new envelope would be the last.
            let mut progress = false;
            let mut archive = tar::Archive::new(open_stream(&self.path)?.reader);
            let entries = archive.entries().map_err(io_err(self.path.display()))?;
            for entry in entries {
                let mut entry = entry.map_err(|_| self.changed())?;
                let name = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
                let Member::Message(id, half) = classify(&name) else {
                    continue;
                };
                let Some(&good) = todo.get(id) else {
                    continue;
                };
                let id = good.id.as_str();
                let size = entry.size();
                match half {
                    Half::Json if envelopes.contains_key(id) => {}
                    Half::Json => {
                        let read = read_member(&mut entry, size, MAX_ENVELOPE);
                        let (sum, data) = read.map_err(|_| self.changed())?;
                        if sum != good.json {
                            return Err(self.changed().into());
                        }
                        let data = data.ok_or_else(|| self.changed())?;
                        let env = serde_json::from_slice(&data).map_err(|_| self.changed())?;
                        envelopes.insert(id, env);
                        progress = true;
                    }
                    Half::Eml => {
                        let Some(envelope) = envelopes.remove(id) else {
                            continue;
                        };
                        let mut empty = io::empty();
                        let source: &mut dyn Read =
                            if want_message { &mut entry } else { &mut empty };
                        let mut bytes = MessageBytes::new(source, good.eml);
                        let r = f(envelope, &mut bytes);
                        if bytes.failed {
                            return Err(self.changed().into());
                        }
                        r?;
                        progress = true;
                        todo.remove(id);
                        if todo.is_empty() {
                            return Ok(());
                        }
                    }
                }
            }
            if !progress {
                return Err(self.changed().into());
            }
        }
        Ok(())
    }
}

/// The bytes of one good message ([`ArchiveReader::for_each_message`]), read from the
/// archive as they are asked for and hashed on the way. It gives exactly the bytes the
/// archive was verified with, or fails: a read past the verified size, or the read that
/// reaches the end with another digest, is an error (and makes the walk end with
/// [`Error::Changed`]), so a consumer that reads to the end (`Ok(0)`, or
/// [`next_chunk`](Self::next_chunk) giving `None`) before it commits to anything never
/// acts on changed bytes.
pub struct MessageBytes<'a> {
    inner: &'a mut dyn Read,
    want: Sum,
    hasher: Sha256,
    read: u64,
    /// The end was reached and checked.
    done: bool,
    /// A read failed, or the bytes were not the verified ones.
    failed: bool,
    buf: Vec<u8>,
}

/// The most [`MessageBytes::next_chunk`] gives at once.
pub const CHUNK: usize = 64 << 10;

impl<'a> MessageBytes<'a> {
    fn new(inner: &'a mut dyn Read, want: Sum) -> MessageBytes<'a> {
        MessageBytes {
            inner,
            want,
            hasher: Sha256::new(),
            read: 0,
            done: false,
            failed: false,
            buf: Vec::new(),
        }
    }

    /// The message's size in bytes (as verified by `open`).
    pub fn size(&self) -> u64 {
        self.want.size
    }

    /// The next bytes (at most [`CHUNK`]), `None` at the end, once it was checked.
    pub fn next_chunk(&mut self) -> io::Result<Option<&[u8]>> {
        // No bigger than what is left (and one byte to find the end): a small message
        // does not cost a whole chunk.
        let want = (self.want.size.saturating_sub(self.read)).clamp(1, CHUNK as u64) as usize;
        let mut buf = std::mem::take(&mut self.buf);
        if buf.len() < want {
            buf.resize(want, 0);
        }
        let r = self.read(&mut buf[..want]);
        self.buf = buf;
        match r? {
            0 => Ok(None),
            n => Ok(Some(&self.buf[..n])),
        }
    }

    /// The rest of the bytes in memory (small messages, tests).
    pub fn to_vec(&mut self) -> io::Result<Vec<u8>> {
        let mut v = Vec::with_capacity(self.want.size.min(64 << 20) as usize);
        self.read_to_end(&mut v)?;
        Ok(v)
    }

    fn fail(&mut self) -> io::Error {
        self.failed = true;
        io::Error::new(
            io::ErrorKind::InvalidData,
            "the message is not the one the archive was verified with",
        )
    }
}

impl Read for MessageBytes<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.failed {
            return Err(self.fail());
        }
        if self.done || buf.is_empty() {
            return Ok(0);
        }
        let n = match self.inner.read(buf) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => return Err(e),
            Err(_) => return Err(self.fail()),
        };
        if n == 0 {
            let sha: [u8; 32] = std::mem::take(&mut self.hasher).finalize().into();
            if self.read != self.want.size || sha != self.want.sha {
                return Err(self.fail());
            }
            self.done = true;
            return Ok(0);
        }
        self.read += n as u64;
        if self.read > self.want.size {
            return Err(self.fail());
        }
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
}

/// The (decompressed) tar stream of an archive file.
struct Stream {
    reader: Box<dyn Read>,
    compression: Compression,
    /// Turns true when `reader` has ended.
    eof: Rc<Cell<bool>>,
}

/// Opens the file and detects its compression by magic bytes.
fn open_stream(path: &Path) -> Result<Stream> {
    let file = File::open(path).map_err(io_err(path.display()))?;
    let mut file = BufReader::with_capacity(256 * 1024, file);
    let head = file.fill_buf().map_err(io_err(path.display()))?;
    let magic = |m: &[u8]| head.starts_with(m);
    let (inner, compression): (Box<dyn Read>, _) = if magic(&[0x1f, 0x8b]) {
        (Box::new(MultiGzDecoder::new(file)), Compression::Gzip)
    } else if magic(&[0x28, 0xb5, 0x2f, 0xfd]) {
        return Err(compressed_with("zstd", "zstd -d"));
    } else if magic(&[0xfd, b'7', b'z', b'X', b'Z', 0]) {
        return Err(compressed_with("xz", "xz -d"));
    } else if magic(b"BZh") {
        return Err(compressed_with("bzip2", "bzip2 -d"));
    } else {
        (Box::new(file), Compression::None)
    };
    let eof = Rc::new(Cell::new(false));
    let stream = EofFlag {
        inner,
        eof: eof.clone(),
    };
    Ok(Stream {
        reader: Box::new(stream),
        compression,
        eof,
    })
}

fn compressed_with(what: &str, how: &str) -> Error {
    Error::Format(format!(
        "the file is {what}-compressed; only plain and gzip-compressed archives are read \
         (decompress it first: {how})"
    ))
}

/// A reader that notes when its inner stream has ended.
struct EofFlag {
    inner: Box<dyn Read>,
    eof: Rc<Cell<bool>>,
}

impl Read for EofFlag {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        if n == 0 && !buf.is_empty() {
            self.eof.set(true);
        }
        Ok(n)
    }
}

/// Reads one member's data whole, hashing it; keeps it when it is at most `keep` bytes.
/// A member shorter than its header says is an `UnexpectedEof` error.
fn read_member(r: &mut impl Read, size: u64, keep: u64) -> io::Result<(Sum, Option<Vec<u8>>)> {
    let mut hasher = Sha256::new();
    let mut kept = (size <= keep).then(|| Vec::with_capacity(size.min(64 << 20) as usize));
    let mut buf = vec![0u8; 64 * 1024];
    let mut total = 0u64;
    loop {
        let n = match r.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        hasher.update(&buf[..n]);
        if let Some(k) = kept.as_mut() {
            k.extend_from_slice(&buf[..n]);
        }
        total += n as u64;
    }
    if total < size {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "a member is cut short",
        ));
    }
    let sum = Sum {
        sha: hasher.finalize().into(),
        size: total,
    };
    Ok((sum, kept))
}

fn classify_failure(e: io::Error, eof: bool) -> StreamFailure {
    if eof || e.kind() == io::ErrorKind::UnexpectedEof {
        StreamFailure::Truncated
    } else {
        StreamFailure::Damaged(e.to_string())
    }
}

fn not_an_archive(e: &io::Error, eof: bool) -> Error {
    if eof || e.kind() == io::ErrorKind::UnexpectedEof {
        Error::Format("not a tar archive, or cut short before its first member".to_string())
    } else {
        Error::Format(format!("not a tar archive ({e})"))
    }
}

fn check_format_member(data: Option<&[u8]>) -> Result<()> {
    let bad = || Error::Format(format!("{FORMAT_MEMBER} does not name an mxspool archive"));
    let text = data
        .and_then(|d| std::str::from_utf8(d).ok())
        .ok_or_else(bad)?;
    let mut words = text.split_whitespace();
    if words.next() != Some(FORMAT_NAME) {
        return Err(bad());
    }
    let found: u32 = words.next().and_then(|v| v.parse().ok()).ok_or_else(bad)?;
    if found != FORMAT_VERSION {
        return Err(Error::Version { found });
    }
    Ok(())
}

fn parse_manifest(data: Option<&[u8]>) -> Result<Manifest> {
    let data = data.ok_or_else(|| Error::Format("the manifest is too large".to_string()))?;
    let m: Manifest = serde_json::from_slice(data)
        .map_err(|e| Error::Format(format!("the manifest is unreadable: {e}")))?;
    if m.format != FORMAT_NAME {
        return Err(Error::Format(format!(
            "the manifest names format {:?}",
            m.format
        )));
    }
    if m.version != FORMAT_VERSION {
        return Err(Error::Version { found: m.version });
    }
    Ok(m)
}

/// Why the envelope of message `id` is unusable, if it is.
fn envelope_problem(id: &str, data: Option<&[u8]>) -> Result<(), String> {
    let data = data.ok_or_else(|| "the envelope is too large".to_string())?;
    let env: ArchivedEnvelope =
        serde_json::from_slice(data).map_err(|e| format!("unreadable envelope: {e}"))?;
    if env.id != id {
        return Err(format!("the envelope names another id ({:?})", env.id));
    }
    env.validate().map_err(|e| format!("invalid envelope: {e}"))
}

fn sum_matches(sum: Option<Sum>, sha_hex: &str, size: Option<u64>) -> bool {
    sum.is_some_and(|s| {
        hex(&s.sha).eq_ignore_ascii_case(sha_hex) && size.is_none_or(|z| z == s.size)
    })
}

fn problem(subject: &str, what: &str) -> Problem {
    Problem {
        subject: subject.to_string(),
        what: what.to_string(),
    }
}
