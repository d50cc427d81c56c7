//! The durability model: every inode has a current and a durable state, and a power cut
//! replaces every current state with the durable one.
//!
//! - A file's data (and so its size) and its attributes become durable on `fsync` of that
//!   file (`fdatasync` too); nothing else makes them durable (not `flush`, not `close`).
//! - A directory's entries (every name created, linked, renamed, removed in it, including
//!   subdirectories made by `mkdir`) become durable on `fsync` of that directory.
//! - A cut keeps only what a chain of durable names reaches from the root; open handles are
//!   forgotten (the processes that held them are gone, as after a reboot).
//!
//! Nothing here knows about FUSE: the errors are `libc` errno values.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::ffi::{OsStr, OsString};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

/// An errno value (`libc::ENOENT`, ...).
pub type Errno = i32;
pub type Result<T> = std::result::Result<T, Errno>;

/// The inode number of the root directory.
pub const ROOT: u64 = 1;

/// File data is kept in blocks of at most this size, shared (copy on write) between the
/// current and the durable state, so an fsync costs one pointer per block, not a copy.
const BLOCK: u64 = 64 * 1024;

/// The bytes of a file: blocks shared by reference count; a missing block (or the part of a
/// block past its length) reads as zeros (a sparse file).
#[derive(Clone, Debug, Default)]
pub struct Data {
    blocks: Vec<Option<Arc<Vec<u8>>>>,
    size: u64,
}

impl Data {
    pub fn len(&self) -> u64 {
        self.size
    }

    pub fn is_empty(&self) -> bool {
        self.size == 0
    }

    /// Up to `size` bytes from `offset` (fewer at the end of the file).
    pub fn read(&self, offset: u64, size: usize) -> Vec<u8> {
        if offset >= self.size {
            return Vec::new();
        }
        let end = self.size.min(offset.saturating_add(size as u64));
        let mut out = Vec::with_capacity((end - offset) as usize);
        let mut pos = offset;
        while pos < end {
            let within = (pos % BLOCK) as usize;
            let n = ((BLOCK - pos % BLOCK).min(end - pos)) as usize;
            let start = out.len();
            out.resize(start + n, 0);
            if let Some(Some(block)) = self.blocks.get((pos / BLOCK) as usize) {
                let have = block.len().saturating_sub(within).min(n);
                out[start..start + have].copy_from_slice(&block[within..within + have]);
            }
            pos += n as u64;
        }
        out
    }

    /// Writes `data` at `offset`, extending the file (a gap reads as zeros).
    pub fn write(&mut self, offset: u64, data: &[u8]) {
        let end = offset + data.len() as u64;
        let needed = end.div_ceil(BLOCK) as usize;
        if self.blocks.len() < needed {
            self.blocks.resize(needed, None);
        }
        let mut pos = offset;
        let mut src = data;
        while !src.is_empty() {
            let within = (pos % BLOCK) as usize;
            let n = ((BLOCK as usize) - within).min(src.len());
            let block = self.blocks[(pos / BLOCK) as usize].get_or_insert_with(Default::default);
            let block = Arc::make_mut(block);
            if block.len() < within + n {
                block.resize(within + n, 0);
            }
            block[within..within + n].copy_from_slice(&src[..n]);
            src = &src[n..];
            pos += n as u64;
        }
        self.size = self.size.max(end);
    }

    /// Truncates or extends (with zeros) to `size` bytes.
    pub fn set_len(&mut self, size: u64) {
        if size < self.size {
            self.blocks.truncate(size.div_ceil(BLOCK) as usize);
            let within = (size % BLOCK) as usize;
            if within != 0 {
                if let Some(Some(block)) = self.blocks.last_mut() {
                    if block.len() > within {
                        Arc::make_mut(block).truncate(within);
                    }
                }
            }
        }
        self.size = size;
    }
}

/// What kind of inode.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    File,
    Dir,
    Symlink,
    Fifo,
    Socket,
    CharDevice,
    BlockDevice,
}

impl Kind {
    /// The kind of a `st_mode` (`S_IFREG`, ...); `None` for an unknown type.
    pub fn from_mode(mode: u32) -> Option<Kind> {
        Some(match mode & libc::S_IFMT {
            libc::S_IFREG | 0 => Kind::File,
            libc::S_IFDIR => Kind::Dir,
            libc::S_IFLNK => Kind::Symlink,
            libc::S_IFIFO => Kind::Fifo,
            libc::S_IFSOCK => Kind::Socket,
            libc::S_IFCHR => Kind::CharDevice,
            libc::S_IFBLK => Kind::BlockDevice,
            _ => return None,
        })
    }
}

/// The attributes of an inode other than its size and link count.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Meta {
    pub perm: u16,
    pub uid: u32,
    pub gid: u32,
    pub rdev: u32,
    pub atime: SystemTime,
    pub mtime: SystemTime,
    pub ctime: SystemTime,
    pub crtime: SystemTime,
}

impl Meta {
    pub fn new(perm: u32, uid: u32, gid: u32) -> Meta {
        let now = SystemTime::now();
        Meta {
            perm: (perm & 0o7777) as u16,
            uid,
            gid,
            rdev: 0,
            atime: now,
            mtime: now,
            ctime: now,
            crtime: now,
        }
    }
}

/// What `stat` shows of an inode (its current state).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Attr {
    pub ino: u64,
    pub kind: Kind,
    pub size: u64,
    pub nlink: u32,
    pub meta: Meta,
}

#[derive(Clone, Debug)]
struct Node {
    kind: Kind,
    meta: Meta,
    durable_meta: Meta,
    /// Names in current directories (files; for directories it is computed).
    nlink: u32,
    data: Data,
    durable_data: Data,
    entries: BTreeMap<OsString, u64>,
    durable_entries: BTreeMap<OsString, u64>,
    /// A directory's current parent (for `..`).
    parent: u64,
    target: PathBuf,
}

impl Node {
    fn new(kind: Kind, meta: Meta, parent: u64) -> Node {
        Node {
            kind,
            meta,
            durable_meta: meta,
            nlink: 1,
            data: Data::default(),
            durable_data: Data::default(),
            entries: BTreeMap::new(),
            durable_entries: BTreeMap::new(),
            parent,
            target: PathBuf::new(),
        }
    }
}

/// The whole filesystem, in memory.
#[derive(Debug)]
pub struct Model {
    nodes: HashMap<u64, Node>,
    next_ino: u64,
    /// Open file handles: handle -> inode.
    handles: HashMap<u64, u64>,
    next_fh: u64,
    /// Something may have become unreachable: sweep before the next allocation.
    dirty: bool,
    cuts: u64,
}

impl Default for Model {
    fn default() -> Self {
        Model::new()
    }
}

impl Model {
    /// An empty filesystem: the root directory (0755, root's), durable.
    pub fn new() -> Model {
        let mut nodes = HashMap::new();
        let mut root = Node::new(Kind::Dir, Meta::new(0o755, 0, 0), ROOT);
        root.nlink = 1;
        nodes.insert(ROOT, root);
        Model {
            nodes,
            next_ino: ROOT + 1,
            handles: HashMap::new(),
            next_fh: 1,
            dirty: false,
            cuts: 0,
        }
    }

    fn node(&self, ino: u64) -> Result<&Node> {
        self.nodes.get(&ino).ok_or(libc::ENOENT)
    }

    fn node_mut(&mut self, ino: u64) -> Result<&mut Node> {
        self.nodes.get_mut(&ino).ok_or(libc::ENOENT)
    }

    fn dir(&self, ino: u64) -> Result<&Node> {
        let n = self.node(ino)?;
        if n.kind != Kind::Dir {
            return Err(libc::ENOTDIR);
        }
        Ok(n)
    }

    fn touch_dir(&mut self, ino: u64) {
        if let Some(n) = self.nodes.get_mut(&ino) {
            let now = SystemTime::now();
            n.meta.mtime = now;
            n.meta.ctime = now;
        }
    }

    /// The number of power cuts so far.
    pub fn cuts(&self) -> u64 {
        self.cuts
    }

    /// The number of inodes held (current or durable).
    pub fn inodes(&self) -> usize {
        self.nodes.len()
    }

    pub fn attr(&self, ino: u64) -> Result<Attr> {
        let n = self.node(ino)?;
        let nlink = if n.kind == Kind::Dir {
            2 + n
                .entries
                .values()
                .filter(|c| self.nodes.get(c).is_some_and(|c| c.kind == Kind::Dir))
                .count() as u32
        } else {
            n.nlink
        };
        let size = match n.kind {
            Kind::File => n.data.len(),
            Kind::Symlink => n.target.as_os_str().len() as u64,
            Kind::Dir => 4096,
            _ => 0,
        };
        Ok(Attr {
            ino,
            kind: n.kind,
            size,
            nlink,
            meta: n.meta,
        })
    }

    pub fn lookup(&self, parent: u64, name: &OsStr) -> Result<u64> {
        self.dir(parent)?
            .entries
            .get(name)
            .copied()
            .ok_or(libc::ENOENT)
    }

    fn check_name(name: &OsStr) -> Result<()> {
        if name.is_empty() || name == "." || name == ".." || name.len() > 255 {
            return Err(libc::EINVAL);
        }
        Ok(())
    }

    fn add(&mut self, parent: u64, name: &OsStr, node: Node) -> Result<u64> {
        Self::check_name(name)?;
        if self.dir(parent)?.entries.contains_key(name) {
            return Err(libc::EEXIST);
        }
        if self.dirty {
            self.sweep();
        }
        let ino = self.next_ino;
        self.next_ino += 1;
        self.nodes.insert(ino, node);
        let p = self.node_mut(parent)?;
        p.entries.insert(name.to_owned(), ino);
        self.touch_dir(parent);
        Ok(ino)
    }

    /// A new inode of `kind` (not a directory or symlink) named `name` in `parent`.
    pub fn mknod(&mut self, parent: u64, name: &OsStr, kind: Kind, meta: Meta) -> Result<u64> {
        if matches!(kind, Kind::Dir | Kind::Symlink) {
            return Err(libc::EINVAL);
        }
        self.add(parent, name, Node::new(kind, meta, parent))
    }

    pub fn mkdir(&mut self, parent: u64, name: &OsStr, meta: Meta) -> Result<u64> {
        self.add(parent, name, Node::new(Kind::Dir, meta, parent))
    }

    pub fn symlink(&mut self, parent: u64, name: &OsStr, target: &Path, meta: Meta) -> Result<u64> {
        let mut n = Node::new(Kind::Symlink, meta, parent);
        n.meta.perm = 0o777;
        n.durable_meta = n.meta;
        n.target = target.to_owned();
        self.add(parent, name, n)
    }

    pub fn readlink(&self, ino: u64) -> Result<PathBuf> {
        let n = self.node(ino)?;
        if n.kind != Kind::Symlink {
            return Err(libc::EINVAL);
        }
        Ok(n.target.clone())
    }

    /// A second name for `ino` (not a directory).
    pub fn link(&mut self, ino: u64, parent: u64, name: &OsStr) -> Result<()> {
        Self::check_name(name)?;
        if self.node(ino)?.kind == Kind::Dir {
            return Err(libc::EPERM);
        }
        if self.dir(parent)?.entries.contains_key(name) {
            return Err(libc::EEXIST);
        }
        self.node_mut(parent)?.entries.insert(name.to_owned(), ino);
        self.touch_dir(parent);
        let n = self.node_mut(ino)?;
        n.nlink += 1;
        n.meta.ctime = SystemTime::now();
        Ok(())
    }

    /// Removes a name that is not a directory.
    pub fn unlink(&mut self, parent: u64, name: &OsStr) -> Result<()> {
        let ino = self.lookup(parent, name)?;
        if self.node(ino)?.kind == Kind::Dir {
            return Err(libc::EISDIR);
        }
        self.node_mut(parent)?.entries.remove(name);
        self.touch_dir(parent);
        let n = self.node_mut(ino)?;
        n.nlink = n.nlink.saturating_sub(1);
        n.meta.ctime = SystemTime::now();
        self.dirty = true;
        Ok(())
    }

    /// Removes an empty directory.
    pub fn rmdir(&mut self, parent: u64, name: &OsStr) -> Result<()> {
        if name == "." {
            return Err(libc::EINVAL);
        }
        let ino = self.lookup(parent, name)?;
        if !self.dir(ino)?.entries.is_empty() {
            return Err(libc::ENOTEMPTY);
        }
        self.node_mut(parent)?.entries.remove(name);
        self.touch_dir(parent);
        self.dirty = true;
        Ok(())
    }

    /// rename(2) with renameat2's `RENAME_NOREPLACE` in `flags` (`RENAME_EXCHANGE` is not
    /// supported: EINVAL).
    pub fn rename(
        &mut self,
        parent: u64,
        name: &OsStr,
        newparent: u64,
        newname: &OsStr,
        flags: u32,
    ) -> Result<()> {
        if flags & !libc::RENAME_NOREPLACE != 0 {
            return Err(libc::EINVAL);
        }
        Self::check_name(newname)?;
        let ino = self.lookup(parent, name)?;
        self.dir(newparent)?;
        let is_dir = self.node(ino)?.kind == Kind::Dir;
        if is_dir {
            // Not into itself or a descendant.
            let mut at = newparent;
            loop {
                if at == ino {
                    return Err(libc::EINVAL);
                }
                if at == ROOT {
                    break;
                }
                at = self.node(at)?.parent;
            }
        }
        if let Ok(old) = self.lookup(newparent, newname) {
            if flags & libc::RENAME_NOREPLACE != 0 {
                return Err(libc::EEXIST);
            }
            if old == ino {
                return Ok(());
            }
            let old_node = self.node(old)?;
            match (is_dir, old_node.kind == Kind::Dir) {
                (true, false) => return Err(libc::ENOTDIR),
                (false, true) => return Err(libc::EISDIR),
                (true, true) if !old_node.entries.is_empty() => return Err(libc::ENOTEMPTY),
                _ => {}
            }
            self.node_mut(newparent)?.entries.remove(newname);
            let o = self.node_mut(old)?;
            o.nlink = o.nlink.saturating_sub(1);
            o.meta.ctime = SystemTime::now();
        }
        self.node_mut(parent)?.entries.remove(name);
        self.node_mut(newparent)?
            .entries
            .insert(newname.to_owned(), ino);
        let n = self.node_mut(ino)?;
        n.meta.ctime = SystemTime::now();
        if is_dir {
            n.parent = newparent;
        }
        self.touch_dir(parent);
        self.touch_dir(newparent);
        self.dirty = true;
        Ok(())
    }

    /// Opens `ino`: a handle until [`Model::release`]. `O_TRUNC` truncates a file.
    pub fn open(&mut self, ino: u64, flags: i32) -> Result<u64> {
        let n = self.node_mut(ino)?;
        if flags & libc::O_TRUNC != 0 && n.kind == Kind::File && flags & libc::O_ACCMODE != 0 {
            n.data.set_len(0);
            let now = SystemTime::now();
            n.meta.mtime = now;
            n.meta.ctime = now;
        }
        let fh = self.next_fh;
        self.next_fh += 1;
        self.handles.insert(fh, ino);
        Ok(fh)
    }

    /// Closes handle `fh` (unknown handles, such as those of before a cut, are ignored).
    pub fn release(&mut self, fh: u64) {
        if self.handles.remove(&fh).is_some() {
            self.dirty = true;
        }
    }

    fn file(&self, ino: u64) -> Result<&Node> {
        let n = self.node(ino)?;
        match n.kind {
            Kind::File => Ok(n),
            Kind::Dir => Err(libc::EISDIR),
            _ => Err(libc::EINVAL),
        }
    }

    fn file_mut(&mut self, ino: u64) -> Result<&mut Node> {
        self.file(ino)?;
        self.node_mut(ino)
    }

    pub fn read(&self, ino: u64, offset: u64, size: usize) -> Result<Vec<u8>> {
        Ok(self.file(ino)?.data.read(offset, size))
    }

    /// Writes at `offset` (at the end with `append`); returns the bytes written.
    pub fn write(&mut self, ino: u64, offset: u64, data: &[u8], append: bool) -> Result<u32> {
        let n = self.file_mut(ino)?;
        let offset = if append { n.data.len() } else { offset };
        n.data.write(offset, data);
        let now = SystemTime::now();
        n.meta.mtime = now;
        n.meta.ctime = now;
        Ok(data.len() as u32)
    }

    /// chmod, chown, truncate and utimes, each where given.
    #[allow(clippy::too_many_arguments)]
    pub fn setattr(
        &mut self,
        ino: u64,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<SystemTime>,
        mtime: Option<SystemTime>,
    ) -> Result<Attr> {
        if size.is_some() {
            self.file(ino)?;
        }
        let n = self.node_mut(ino)?;
        let now = SystemTime::now();
        if let Some(mode) = mode {
            n.meta.perm = (mode & 0o7777) as u16;
        }
        if let Some(uid) = uid {
            n.meta.uid = uid;
        }
        if let Some(gid) = gid {
            n.meta.gid = gid;
        }
        if let Some(size) = size {
            n.data.set_len(size);
            n.meta.mtime = now;
        }
        if let Some(t) = atime {
            n.meta.atime = t;
        }
        if let Some(t) = mtime {
            n.meta.mtime = t;
        }
        n.meta.ctime = now;
        self.attr(ino)
    }

    /// fallocate(2): mode 0 extends the file to `offset + length` if shorter;
    /// `FALLOC_FL_KEEP_SIZE` alone (preallocation) changes nothing visible. Other modes:
    /// EOPNOTSUPP.
    pub fn fallocate(&mut self, ino: u64, offset: u64, length: u64, mode: i32) -> Result<()> {
        let n = self.file_mut(ino)?;
        match mode {
            0 => {
                let end = offset.checked_add(length).ok_or(libc::EFBIG)?;
                if end > n.data.len() {
                    n.data.set_len(end);
                    n.meta.ctime = SystemTime::now();
                }
                Ok(())
            }
            libc::FALLOC_FL_KEEP_SIZE => Ok(()),
            _ => Err(libc::EOPNOTSUPP),
        }
    }

    /// fsync/fdatasync of a file: its data, size and attributes become durable. (On a
    /// directory it is [`Model::fsyncdir`].)
    pub fn fsync(&mut self, ino: u64) -> Result<()> {
        let n = self.node_mut(ino)?;
        if n.kind == Kind::Dir {
            return self.fsyncdir(ino);
        }
        n.durable_data = n.data.clone();
        n.durable_meta = n.meta;
        Ok(())
    }

    /// fsync of a directory: its entries (and attributes) become durable.
    pub fn fsyncdir(&mut self, ino: u64) -> Result<()> {
        self.dir(ino)?;
        let n = self.node_mut(ino)?;
        n.durable_entries = n.entries.clone();
        n.durable_meta = n.meta;
        self.dirty = true;
        Ok(())
    }

    /// The entries of a directory, `.` and `..` first: (inode, kind, name).
    pub fn readdir(&self, ino: u64) -> Result<Vec<(u64, Kind, OsString)>> {
        let d = self.dir(ino)?;
        let mut out = vec![
            (ino, Kind::Dir, OsString::from(".")),
            (d.parent, Kind::Dir, OsString::from("..")),
        ];
        for (name, child) in &d.entries {
            if let Some(c) = self.nodes.get(child) {
                out.push((*child, c.kind, name.clone()));
            }
        }
        Ok(out)
    }

    /// Forgets every inode that no name (current or durable) reaches and no handle holds.
    fn sweep(&mut self) {
        let mut keep: HashSet<u64> = self.handles.values().copied().collect();
        keep.insert(ROOT);
        let mut queue: VecDeque<u64> = keep.iter().copied().collect();
        while let Some(ino) = queue.pop_front() {
            let Some(n) = self.nodes.get(&ino) else {
                continue;
            };
            for child in n.entries.values().chain(n.durable_entries.values()) {
                if keep.insert(*child) {
                    queue.push_back(*child);
                }
            }
        }
        self.nodes.retain(|ino, _| keep.contains(ino));
        self.dirty = false;
    }

    /// The power cut (and the remount after it): every inode goes back to its durable state,
    /// only what durable names reach from the root stays, every handle is forgotten.
    /// Returns the number of cuts so far.
    pub fn cut(&mut self) -> u64 {
        self.handles.clear();
        let mut reached = HashSet::from([ROOT]);
        let mut parents = HashMap::from([(ROOT, ROOT)]);
        let mut nlinks: HashMap<u64, u32> = HashMap::new();
        let mut queue = VecDeque::from([ROOT]);
        while let Some(dir) = queue.pop_front() {
            let Some(d) = self.nodes.get(&dir) else {
                continue;
            };
            for child in d.durable_entries.values() {
                let Some(c) = self.nodes.get(child) else {
                    continue;
                };
                *nlinks.entry(*child).or_default() += 1;
                if reached.insert(*child) && c.kind == Kind::Dir {
                    parents.insert(*child, dir);
                    queue.push_back(*child);
                }
            }
        }
        self.nodes.retain(|ino, _| reached.contains(ino));
        let live: HashSet<u64> = self.nodes.keys().copied().collect();
        for (ino, n) in self.nodes.iter_mut() {
            n.meta = n.durable_meta;
            n.data = n.durable_data.clone();
            n.durable_entries.retain(|_, c| live.contains(c));
            n.entries = n.durable_entries.clone();
            n.nlink = nlinks.get(ino).copied().unwrap_or(1);
            if n.kind == Kind::Dir {
                n.parent = parents.get(ino).copied().unwrap_or(ROOT);
            }
        }
        self.dirty = false;
        self.cuts += 1;
        self.cuts
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta() -> Meta {
        Meta::new(0o644, 0, 0)
    }

    fn name(s: &str) -> &OsStr {
        OsStr::new(s)
    }

    fn file(m: &mut Model, parent: u64, n: &str) -> u64 {
        m.mknod(parent, name(n), Kind::File, meta()).unwrap()
    }

    fn contents(m: &Model, parent: u64, n: &str) -> Option<Vec<u8>> {
        let ino = m.lookup(parent, name(n)).ok()?;
        Some(m.read(ino, 0, 1 << 30).unwrap())
    }

    #[test]
    fn data_blocks_sparse_and_truncate() {
        let mut d = Data::default();
        d.write(3, b"abc");
        assert_eq!(d.read(0, 100), b"\0\0\0abc");
        d.write(BLOCK * 2 + 5, b"xy");
        assert_eq!(d.len(), BLOCK * 2 + 7);
        let all = d.read(0, usize::MAX >> 1);
        assert_eq!(all.len() as u64, BLOCK * 2 + 7);
        assert!(all[6..(BLOCK * 2 + 5) as usize].iter().all(|&b| b == 0));
        assert_eq!(&all[(BLOCK * 2 + 5) as usize..], b"xy");
        // Across a block boundary.
        let big: Vec<u8> = (0..BLOCK as usize + 100).map(|i| i as u8).collect();
        d.write(BLOCK - 50, &big);
        assert_eq!(d.read(BLOCK - 50, big.len()), big);
        let snapshot = d.clone();
        d.set_len(4);
        assert_eq!(d.read(0, 100), b"\0\0\0a");
        d.set_len(10);
        assert_eq!(d.read(0, 100), b"\0\0\0a\0\0\0\0\0\0");
        // The clone shares blocks but sees none of the later changes.
        assert_eq!(snapshot.read(BLOCK - 50, big.len()), big);
        assert_eq!(snapshot.read(3, 3), b"abc");
    }

    #[test]
    fn unsynced_file_and_name_are_lost() {
        let mut m = Model::new();
        let f = file(&mut m, ROOT, "a");
        m.write(f, 0, b"hello", false).unwrap();
        m.cut();
        assert!(m.lookup(ROOT, name("a")).is_err());
        assert_eq!(m.inodes(), 1);
    }

    #[test]
    fn fsync_file_without_dir_loses_the_name() {
        let mut m = Model::new();
        let f = file(&mut m, ROOT, "a");
        m.write(f, 0, b"hello", false).unwrap();
        m.fsync(f).unwrap();
        m.cut();
        assert!(m.lookup(ROOT, name("a")).is_err());
    }

    #[test]
    fn fsyncdir_without_file_fsync_keeps_an_empty_file() {
        let mut m = Model::new();
        let f = file(&mut m, ROOT, "a");
        m.write(f, 0, b"hello", false).unwrap();
        m.fsyncdir(ROOT).unwrap();
        m.cut();
        assert_eq!(contents(&m, ROOT, "a").unwrap(), b"");
    }

    #[test]
    fn synced_data_survives_later_writes_do_not() {
        let mut m = Model::new();
        let f = file(&mut m, ROOT, "a");
        m.write(f, 0, b"hello", false).unwrap();
        m.fsync(f).unwrap();
        m.fsyncdir(ROOT).unwrap();
        m.write(f, 5, b" world", false).unwrap();
        m.write(f, 0, b"J", false).unwrap();
        assert_eq!(contents(&m, ROOT, "a").unwrap(), b"Jello world");
        m.cut();
        assert_eq!(contents(&m, ROOT, "a").unwrap(), b"hello");
        assert_eq!(m.attr(f).unwrap().size, 5);
        // Truncation follows the data: lost without fsync, kept with it.
        m.setattr(f, None, None, None, Some(2), None, None).unwrap();
        m.cut();
        assert_eq!(contents(&m, ROOT, "a").unwrap(), b"hello");
        m.setattr(f, Some(0o600), None, None, Some(2), None, None)
            .unwrap();
        m.fsync(f).unwrap();
        m.cut();
        assert_eq!(contents(&m, ROOT, "a").unwrap(), b"he");
        assert_eq!(m.attr(f).unwrap().meta.perm, 0o600);
    }

    #[test]
    fn fallocate_extends_with_the_data() {
        let mut m = Model::new();
        let f = file(&mut m, ROOT, "a");
        m.fsyncdir(ROOT).unwrap();
        m.fallocate(f, 0, 100, libc::FALLOC_FL_KEEP_SIZE).unwrap();
        assert_eq!(m.attr(f).unwrap().size, 0);
        m.fallocate(f, 10, 90, 0).unwrap();
        assert_eq!(m.attr(f).unwrap().size, 100);
        assert_eq!(
            m.fallocate(
                f,
                0,
                1,
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE
            ),
            Err(libc::EOPNOTSUPP)
        );
        m.cut();
        assert_eq!(m.attr(f).unwrap().size, 0);
        m.fallocate(f, 0, 100, 0).unwrap();
        m.fsync(f).unwrap();
        m.cut();
        assert_eq!(m.attr(f).unwrap().size, 100);
    }

    #[test]
    fn rename_is_durable_only_with_both_directories() {
        let mut m = Model::new();
        let d = m.mkdir(ROOT, name("d"), meta()).unwrap();
        let f = file(&mut m, ROOT, "tmp");
        m.write(f, 0, b"x", false).unwrap();
        m.fsync(f).unwrap();
        m.fsyncdir(ROOT).unwrap();
        // mkdir and tmp are durable; rename into d, sync d only.
        m.rename(ROOT, name("tmp"), d, name("new"), 0).unwrap();
        m.fsyncdir(d).unwrap();
        m.cut();
        // Both names now (root was not synced after the rename): a hard-link-like state.
        assert_eq!(contents(&m, ROOT, "tmp").unwrap(), b"x");
        assert_eq!(contents(&m, d, "new").unwrap(), b"x");
        assert_eq!(m.attr(f).unwrap().nlink, 2);
        // Rename without any sync: undone.
        m.rename(d, name("new"), ROOT, name("other"), 0).unwrap();
        m.cut();
        assert!(m.lookup(ROOT, name("other")).is_err());
        assert!(m.lookup(d, name("new")).is_ok());
    }

    #[test]
    fn rename_noreplace_and_replace() {
        let mut m = Model::new();
        let a = file(&mut m, ROOT, "a");
        let b = file(&mut m, ROOT, "b");
        m.write(a, 0, b"A", false).unwrap();
        m.write(b, 0, b"B", false).unwrap();
        m.fsync(a).unwrap();
        m.fsync(b).unwrap();
        m.fsyncdir(ROOT).unwrap();
        assert_eq!(
            m.rename(ROOT, name("a"), ROOT, name("b"), libc::RENAME_NOREPLACE),
            Err(libc::EEXIST)
        );
        assert_eq!(
            m.rename(ROOT, name("a"), ROOT, name("b"), libc::RENAME_EXCHANGE),
            Err(libc::EINVAL)
        );
        m.rename(ROOT, name("a"), ROOT, name("b"), 0).unwrap();
        assert_eq!(contents(&m, ROOT, "b").unwrap(), b"A");
        assert!(m.lookup(ROOT, name("a")).is_err());
        m.cut();
        assert_eq!(contents(&m, ROOT, "a").unwrap(), b"A");
        assert_eq!(contents(&m, ROOT, "b").unwrap(), b"B");
        m.rename(ROOT, name("a"), ROOT, name("b"), 0).unwrap();
        m.fsyncdir(ROOT).unwrap();
        m.cut();
        assert_eq!(contents(&m, ROOT, "b").unwrap(), b"A");
        assert!(m.lookup(ROOT, name("a")).is_err());
        assert_eq!(m.inodes(), 2);
    }

    #[test]
    fn unlink_is_undone_without_fsyncdir() {
        let mut m = Model::new();
        let a = file(&mut m, ROOT, "a");
        m.write(a, 0, b"A", false).unwrap();
        m.fsync(a).unwrap();
        m.fsyncdir(ROOT).unwrap();
        m.unlink(ROOT, name("a")).unwrap();
        // A sweep before the cut must not forget it: a durable name still reaches it.
        file(&mut m, ROOT, "other");
        m.cut();
        assert_eq!(contents(&m, ROOT, "a").unwrap(), b"A");
        m.unlink(ROOT, name("a")).unwrap();
        m.fsyncdir(ROOT).unwrap();
        m.cut();
        assert!(m.lookup(ROOT, name("a")).is_err());
    }

    #[test]
    fn mkdir_needs_the_parent_synced() {
        let mut m = Model::new();
        let a = m.mkdir(ROOT, name("a"), meta()).unwrap();
        let b = m.mkdir(a, name("b"), meta()).unwrap();
        let f = file(&mut m, b, "f");
        m.write(f, 0, b"data", false).unwrap();
        m.fsync(f).unwrap();
        m.fsyncdir(b).unwrap();
        m.fsyncdir(a).unwrap();
        // Root never synced: all of it is gone.
        m.cut();
        assert!(m.lookup(ROOT, name("a")).is_err());
        assert_eq!(m.inodes(), 1);

        let a = m.mkdir(ROOT, name("a"), meta()).unwrap();
        let b = m.mkdir(a, name("b"), meta()).unwrap();
        let f = file(&mut m, b, "f");
        m.write(f, 0, b"data", false).unwrap();
        m.fsync(f).unwrap();
        m.fsyncdir(b).unwrap();
        m.fsyncdir(a).unwrap();
        m.fsyncdir(ROOT).unwrap();
        m.cut();
        let a = m.lookup(ROOT, name("a")).unwrap();
        let b = m.lookup(a, name("b")).unwrap();
        assert_eq!(contents(&m, b, "f").unwrap(), b"data");
        assert_eq!(m.attr(a).unwrap().nlink, 3);
        let dots = m.readdir(b).unwrap();
        assert_eq!(dots[1].0, a, "`..` of b is a");
    }

    #[test]
    fn rmdir_and_errors() {
        let mut m = Model::new();
        let d = m.mkdir(ROOT, name("d"), meta()).unwrap();
        file(&mut m, d, "f");
        assert_eq!(m.rmdir(ROOT, name("d")), Err(libc::ENOTEMPTY));
        assert_eq!(m.unlink(ROOT, name("d")), Err(libc::EISDIR));
        assert_eq!(m.mkdir(ROOT, name("d"), meta()), Err(libc::EEXIST));
        assert_eq!(
            m.rename(ROOT, name("d"), d, name("x"), 0),
            Err(libc::EINVAL)
        );
        m.unlink(d, name("f")).unwrap();
        m.fsyncdir(ROOT).unwrap();
        m.rmdir(ROOT, name("d")).unwrap();
        m.cut();
        assert!(m.lookup(ROOT, name("d")).is_ok());
    }

    #[test]
    fn links_and_symlinks_follow_their_directory() {
        let mut m = Model::new();
        let a = file(&mut m, ROOT, "a");
        m.write(a, 0, b"A", false).unwrap();
        m.fsync(a).unwrap();
        m.fsyncdir(ROOT).unwrap();
        m.link(a, ROOT, name("b")).unwrap();
        m.symlink(ROOT, name("s"), Path::new("a"), meta()).unwrap();
        assert_eq!(m.attr(a).unwrap().nlink, 2);
        m.cut();
        assert!(m.lookup(ROOT, name("b")).is_err());
        assert!(m.lookup(ROOT, name("s")).is_err());
        assert_eq!(m.attr(a).unwrap().nlink, 1);
        m.link(a, ROOT, name("b")).unwrap();
        let s = m.symlink(ROOT, name("s"), Path::new("a"), meta()).unwrap();
        m.fsyncdir(ROOT).unwrap();
        m.cut();
        assert_eq!(contents(&m, ROOT, "b").unwrap(), b"A");
        assert_eq!(m.readlink(s).unwrap(), Path::new("a"));
        assert_eq!(m.attr(a).unwrap().nlink, 2);
    }

    #[test]
    fn open_unlinked_file_stays_until_release() {
        let mut m = Model::new();
        let a = file(&mut m, ROOT, "a");
        let fh = m.open(a, libc::O_RDWR).unwrap();
        m.unlink(ROOT, name("a")).unwrap();
        file(&mut m, ROOT, "b"); // a sweep
        m.write(a, 0, b"still", false).unwrap();
        assert_eq!(m.read(a, 0, 10).unwrap(), b"still");
        m.release(fh);
        file(&mut m, ROOT, "c"); // a sweep
        assert!(m.attr(a).is_err());
    }

    #[test]
    fn append_and_o_trunc() {
        let mut m = Model::new();
        let a = file(&mut m, ROOT, "a");
        m.write(a, 0, b"abc", false).unwrap();
        m.write(a, 0, b"def", true).unwrap();
        assert_eq!(m.read(a, 0, 10).unwrap(), b"abcdef");
        m.open(a, libc::O_WRONLY | libc::O_TRUNC).unwrap();
        assert_eq!(m.attr(a).unwrap().size, 0);
    }
}
