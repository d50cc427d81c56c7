//! Writing an archive: [`ArchiveWriter`] over any `Write`, [`create_file`] for a file that
//! appears under its name only once it is complete and synced.

use std::collections::HashSet;
use std::fmt::Write as _;
use std::fs::{self, File};
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};

use chrono::{DateTime, Utc};
use flate2::write::GzEncoder;
use sha2::{Digest, Sha256};

use crate::envelope::{format_time, ArchivedEnvelope};
use crate::error::{io_err, Error, Result};
use crate::manifest::{
    member_name, ArchiveMeta, Half, ManifestEntry, FORMAT_MEMBER, FORMAT_NAME, MANIFEST_MEMBER,
};
use crate::FORMAT_VERSION;

/// Writes an archive to `W` as a plain tar stream (wrap `W` in a gzip encoder for a
/// compressed one, or use [`create_file`]).
///
/// [`new`](Self::new) writes the `FORMAT` member, [`add`](Self::add) one message's two
/// members, [`finish`](Self::finish) the manifest and the end of the tar stream. An archive
/// that was never finished has no manifest and reads as truncated.
pub struct ArchiveWriter<W: Write> {
    tar: tar::Builder<W>,
    meta: ArchiveMeta,
    entries: Vec<ManifestEntry>,
    ids: HashSet<String>,
}

impl<W: Write> ArchiveWriter<W> {
    /// Starts an archive on `w`; writes the `FORMAT` member at once.
    pub fn new(w: W, meta: ArchiveMeta) -> Result<Self> {
        let mut tar = tar::Builder::new(w);
        let format = format!("{FORMAT_NAME} {FORMAT_VERSION}\n");
        append(&mut tar, FORMAT_MEMBER, format.as_bytes(), meta.created)?;
        Ok(ArchiveWriter {
            tar,
            meta,
            entries: Vec::new(),
            ids: HashSet::new(),
        })
    }

    /// Adds one message: its envelope and its raw RFC 5322 bytes, stored unchanged.
    ///
    /// Refuses an envelope that fails [`ArchivedEnvelope::validate`] and an id that is
    /// already in the archive; nothing is written then, and the writer stays usable.
    pub fn add(&mut self, env: &ArchivedEnvelope, message: &[u8]) -> Result<()> {
        self.add_reader(env, message.len() as u64, message)
    }

    /// [`ArchiveWriter::add`] of a message read from `message`, which must give exactly
    /// `size` bytes: it is copied into the archive (and hashed) as it is read, never held
    /// whole in memory. A reader that fails or gives another size fails the archive.
    pub fn add_reader(
        &mut self,
        env: &ArchivedEnvelope,
        size: u64,
        message: impl std::io::Read,
    ) -> Result<()> {
        env.validate().map_err(|what| {
            if crate::is_valid_id(&env.id) {
                Error::Envelope {
                    id: env.id.clone(),
                    what,
                }
            } else {
                Error::InvalidId(env.id.clone())
            }
        })?;
        if self.ids.contains(&env.id) {
            return Err(Error::DuplicateId(env.id.clone()));
        }
        let mut json = serde_json::to_vec_pretty(env).map_err(|e| Error::Envelope {
            id: env.id.clone(),
            what: e.to_string(),
        })?;
        json.push(b'\n');
        append(
            &mut self.tar,
            &member_name(&env.id, Half::Json),
            &json,
            env.arrival,
        )?;
        let name = member_name(&env.id, Half::Eml);
        let mut hashed = Hashed {
            inner: message.take(size),
            hash: Sha256::new(),
            count: 0,
        };
        append_reader(&mut self.tar, &name, size, &mut hashed, env.arrival)?;
        if hashed.count != size {
            return Err(Error::Format(format!(
                "{name}: the message gave {} bytes, not the {size} announced",
                hashed.count
            )));
        }
        self.ids.insert(env.id.clone());
        self.entries.push(ManifestEntry {
            id: env.id.clone(),
            eml_sha256: hex(&hashed.hash.finalize()),
            json_sha256: sha256_hex(&json),
            eml_size: size,
        });
        Ok(())
    }

    /// How many messages were added.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether no message was added yet.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Writes the manifest and the end of the tar stream; gives back `W` (not flushed
    /// beyond what the tar builder wrote, nor synced).
    pub fn finish(mut self) -> Result<W> {
        let manifest = self.manifest_json();
        append(
            &mut self.tar,
            MANIFEST_MEMBER,
            manifest.as_bytes(),
            self.meta.created,
        )?;
        self.tar.into_inner().map_err(io_err("writing the archive"))
    }

    /// The manifest, one message per line so that it reads well and greps.
    fn manifest_json(&self) -> String {
        let mut s = String::with_capacity(200 + self.entries.len() * 180);
        s.push_str("{\n");
        let _ = writeln!(s, "  \"format\": {},", js(FORMAT_NAME));
        let _ = writeln!(s, "  \"version\": {FORMAT_VERSION},");
        let _ = writeln!(
            s,
            "  \"created\": {},",
            js(&format_time(&self.meta.created))
        );
        let _ = writeln!(s, "  \"source_host\": {},", js(&self.meta.source_host));
        let _ = writeln!(s, "  \"domain\": {},", js(&self.meta.domain));
        let generator = concat!("spool-tools ", env!("CARGO_PKG_VERSION"));
        let _ = writeln!(s, "  \"generator\": {},", js(generator));
        s.push_str("  \"messages\": [");
        for (i, e) in self.entries.iter().enumerate() {
            s.push_str(if i == 0 { "\n    " } else { ",\n    " });
            s.push_str(&serde_json::to_string(e).expect("manifest entries serialize"));
        }
        s.push_str(if self.entries.is_empty() {
            "]\n}\n"
        } else {
            "\n  ]\n}\n"
        });
        s
    }
}

/// A plain value as JSON text, for the manifest's header fields.
fn js<T: serde::Serialize + ?Sized>(v: &T) -> String {
    serde_json::to_string(v).expect("plain values serialize")
}

/// A reader that hashes and counts what goes through it.
struct Hashed<R> {
    inner: R,
    hash: Sha256,
    count: u64,
}

impl<R: std::io::Read> std::io::Read for Hashed<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hash.update(&buf[..n]);
        self.count += n as u64;
        Ok(n)
    }
}

fn append<W: Write>(
    tar: &mut tar::Builder<W>,
    name: &str,
    data: &[u8],
    mtime: DateTime<Utc>,
) -> Result<()> {
    append_reader(tar, name, data.len() as u64, data, mtime)
}

fn append_reader<W: Write>(
    tar: &mut tar::Builder<W>,
    name: &str,
    size: u64,
    data: impl std::io::Read,
    mtime: DateTime<Utc>,
) -> Result<()> {
    let mut h = tar::Header::new_ustar();
    h.set_path(name)
        .map_err(|e| Error::Format(format!("member name {name:?}: {e}")))?;
    h.set_size(size);
    h.set_mode(0o644);
    h.set_mtime(mtime.timestamp().max(0) as u64);
    h.set_uid(0);
    h.set_gid(0);
    h.set_entry_type(tar::EntryType::Regular);
    h.set_cksum();
    tar.append(&h, data)
        .map_err(io_err(format!("writing {name} to the archive")))
}

pub(crate) fn sha256_hex(data: &[u8]) -> String {
    hex(&Sha256::digest(data))
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

/// An archive being written to a file by [`create_file`].
///
/// The data goes to a fresh hidden temporary file beside the target (created exclusively,
/// never through an existing name or a symbolic link, with an unpredictable name and mode
/// 0600); [`finish`](Self::finish) completes it, syncs it, moves it to the target name and
/// syncs the directory. Dropped unfinished, it removes the temporary file: the target name
/// never shows a partial archive.
pub struct FileArchiveWriter {
    writer: Option<ArchiveWriter<Sink>>,
    path: PathBuf,
    tmp: PathBuf,
    replace: bool,
}

/// Creates an archive file at `path`, gzip-compressed when the name ends in `.gz` or
/// `.tgz`. An existing `path` is never replaced: that is an error now, and again at
/// [`FileArchiveWriter::finish`] if the name appeared meanwhile.
pub fn create_file(path: impl AsRef<Path>, meta: ArchiveMeta) -> Result<FileArchiveWriter> {
    create(path.as_ref(), meta, false)
}

/// Like [`create_file`], but an existing `path` is replaced, atomically, when the archive
/// is finished (`mxspool export --force`).
pub fn create_file_replacing(
    path: impl AsRef<Path>,
    meta: ArchiveMeta,
) -> Result<FileArchiveWriter> {
    create(path.as_ref(), meta, true)
}

fn create(path: &Path, meta: ArchiveMeta, replace: bool) -> Result<FileArchiveWriter> {
    let path = path.to_path_buf();
    let name = path
        .file_name()
        .ok_or_else(|| Error::Io {
            context: path.display().to_string(),
            source: io::Error::new(io::ErrorKind::InvalidInput, "not a file name"),
        })?
        .to_string_lossy()
        .into_owned();
    if !replace && fs::symlink_metadata(&path).is_ok() {
        return Err(exists(&path));
    }
    let (tmp, file) = create_temporary(&path, &name)?;
    let buffered = BufWriter::with_capacity(256 * 1024, file);
    let sink = if name.ends_with(".gz") || name.ends_with(".tgz") {
        Sink::Gzip(GzEncoder::new(buffered, flate2::Compression::default()))
    } else {
        Sink::Plain(buffered)
    };
    let mut w = FileArchiveWriter {
        writer: None,
        path,
        tmp,
        replace,
    };
    w.writer = Some(ArchiveWriter::new(sink, meta).map_err(|e| w.with_path(e))?);
    Ok(w)
}

fn exists(path: &Path) -> Error {
    Error::Io {
        context: path.display().to_string(),
        source: io::Error::new(
            io::ErrorKind::AlreadyExists,
            "already exists (it is never overwritten; --force replaces it)",
        ),
    }
}

/// A new file `.NAME.RANDOM.partial` beside `path`: `O_CREAT|O_EXCL` (so an existing name or
/// a planted symbolic link is never opened), mode 0600 whatever the umask.
fn create_temporary(path: &Path, name: &str) -> Result<(PathBuf, File)> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let mut last = None;
    for _ in 0..16 {
        let tmp = path.with_file_name(format!(".{name}.{:016x}.partial", random_u64()));
        match fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
        {
            Ok(file) => {
                // The umask can only take bits away; make sure of 0600 all the same.
                file.set_permissions(fs::Permissions::from_mode(0o600))
                    .map_err(io_err(tmp.display()))?;
                return Ok((tmp, file));
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => last = Some((tmp, e)),
            Err(e) => return Err(io_err(tmp.display())(e)),
        }
    }
    let (tmp, e) = last.expect("tried at least once");
    Err(io_err(tmp.display())(e))
}

/// 64 unpredictable bits: the standard library's hasher keys come from the OS's random
/// source.
fn random_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    h.write_u32(std::process::id());
    h.finish()
}

impl FileArchiveWriter {
    /// See [`ArchiveWriter::add`].
    pub fn add(&mut self, env: &ArchivedEnvelope, message: &[u8]) -> Result<()> {
        let r = self.inner().add(env, message);
        r.map_err(|e| self.with_path(e))
    }

    /// See [`ArchiveWriter::add_reader`].
    pub fn add_reader(
        &mut self,
        env: &ArchivedEnvelope,
        size: u64,
        message: impl std::io::Read,
    ) -> Result<()> {
        let r = self.inner().add_reader(env, size, message);
        r.map_err(|e| self.with_path(e))
    }

    /// How many messages were added.
    pub fn len(&self) -> usize {
        self.writer.as_ref().map_or(0, ArchiveWriter::len)
    }

    /// Whether no message was added yet.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The name the archive gets when finished.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes the manifest, syncs the file, and renames it into place (then syncs the
    /// directory). When this returns `Ok`, the archive is durably on disk under its name:
    /// only then may the messages be removed from the spool.
    pub fn finish(mut self) -> Result<()> {
        let writer = self.writer.take().expect("writer present until finish");
        let sink = writer.finish().map_err(|e| self.with_path(e))?;
        let tmp = self.tmp.clone();
        let file = sink.into_file().map_err(io_err(tmp.display()))?;
        file.sync_all().map_err(io_err(tmp.display()))?;
        drop(file);
        if self.replace {
            fs::rename(&self.tmp, &self.path).map_err(io_err(self.path.display()))?;
        } else {
            // A hard link fails if the name exists (even as a dangling symbolic link), so a
            // file that appeared meanwhile is never replaced.
            fs::hard_link(&self.tmp, &self.path).map_err(|e| {
                if e.kind() == io::ErrorKind::AlreadyExists {
                    exists(&self.path)
                } else {
                    io_err(self.path.display())(e)
                }
            })?;
            fs::remove_file(&self.tmp).map_err(io_err(self.tmp.display()))?;
        }
        let dir = match self.path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => PathBuf::from("."),
        };
        // A directory fsync: needed for the rename to survive a crash.
        File::open(&dir)
            .and_then(|d| d.sync_all())
            .map_err(io_err(dir.display()))?;
        self.tmp = PathBuf::new(); // nothing to clean up any more
        Ok(())
    }

    fn inner(&mut self) -> &mut ArchiveWriter<Sink> {
        self.writer.as_mut().expect("writer present until finish")
    }

    /// I/O errors of the generic writer name the step; name the file too.
    fn with_path(&self, e: Error) -> Error {
        match e {
            Error::Io { context, source } => Error::Io {
                context: format!("{}: {context}", self.path.display()),
                source,
            },
            other => other,
        }
    }
}

impl Drop for FileArchiveWriter {
    fn drop(&mut self) {
        if !self.tmp.as_os_str().is_empty() {
            let _ = fs::remove_file(&self.tmp);
        }
    }
}

/// The byte sink under the tar builder of a [`FileArchiveWriter`].
enum Sink {
    Plain(BufWriter<File>),
    Gzip(GzEncoder<BufWriter<File>>),
}

impl Sink {
    /// Ends the gzip stream if any, flushes, and gives back the file.
    fn into_file(self) -> io::Result<File> {
        let buffered = match self {
            Sink::Plain(b) => b,
            Sink::Gzip(gz) => gz.finish()?,
        };
        buffered.into_inner().map_err(|e| e.into_error())
    }
}

impl Write for Sink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Sink::Plain(w) => w.write(buf),
            Sink::Gzip(w) => w.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Sink::Plain(w) => w.flush(),
            Sink::Gzip(w) => w.flush(),
        }
    }
}
