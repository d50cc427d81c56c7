//! The real mount: `faultfs` on a temp dir (needs root and /dev/fuse), files written through
//! the kernel with std::fs, a power cut by SIGUSR1, and what is left afterwards.

use std::fs::{self, File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

struct Mount {
    child: Child,
    out: BufReader<ChildStdout>,
    dir: PathBuf,
    _tmp: tempfile_dir::Dir,
}

/// A tiny temp dir (no extra dev-dependency): removed on drop.
mod tempfile_dir {
    use std::path::PathBuf;
    pub struct Dir(pub PathBuf);
    impl Dir {
        pub fn new() -> Dir {
            let p = std::env::temp_dir().join(format!(
                "faultfs-test.{}.{:?}",
                std::process::id(),
                std::thread::current().id()
            ));
            let _ = std::fs::remove_dir_all(&p);
            std::fs::create_dir_all(&p).unwrap();
            Dir(p)
        }
    }
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

impl Mount {
    fn new() -> Mount {
        let tmp = tempfile_dir::Dir::new();
        let dir = tmp.0.join("mnt");
        fs::create_dir(&dir).unwrap();
        let mut child = Command::new(env!("CARGO_BIN_EXE_faultfs"))
            .arg(&dir)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .expect("start faultfs");
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        out.read_line(&mut line).unwrap();
        assert_eq!(
            line.trim(),
            "ready",
            "faultfs did not mount (root and /dev/fuse needed)"
        );
        Mount {
            child,
            out,
            dir,
            _tmp: tmp,
        }
    }

    fn cut(&mut self) {
        // SAFETY: a signal to our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGUSR1) };
        let mut line = String::new();
        self.out.read_line(&mut line).unwrap();
        assert!(line.starts_with("cut "), "after SIGUSR1: {line:?}");
    }

    fn p(&self, rel: &str) -> PathBuf {
        self.dir.join(rel)
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        // SAFETY: a signal to our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        let c = std::ffi::CString::new(self.dir.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: a valid path.
        unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
    }
}

fn sync_dir(p: &Path) {
    File::open(p).unwrap().sync_all().unwrap();
}

#[test]
fn power_cut_through_the_kernel() {
    let mut m = Mount::new();
    let root = m.dir.clone();

    // Durable: written, fsynced, its directory fsynced.
    fs::create_dir(m.p("d")).unwrap();
    sync_dir(&root);
    let mut f = File::create(m.p("d/kept")).unwrap();
    f.write_all(b"durable").unwrap();
    f.sync_all().unwrap();
    sync_dir(&m.p("d"));
    // More data after the fsync, and a close (flush): lost.
    f.write_all(b" and more").unwrap();
    drop(f);
    // Only the data synced, not the name: lost.
    let mut g = File::create(m.p("d/noname")).unwrap();
    g.write_all(b"x").unwrap();
    g.sync_data().unwrap();
    drop(g);
    // A sparse write, fsynced, then truncated without fsync.
    let s = OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .read(true)
        .mode(0o600)
        .open(m.p("sparse"))
        .unwrap();
    s.write_all_at(b"end", 200_000).unwrap();
    s.sync_all().unwrap();
    sync_dir(&root);
    s.set_len(10).unwrap();
    assert_eq!(fs::metadata(m.p("sparse")).unwrap().len(), 10);
    drop(s);
    // A rename over a durable name, not synced: undone.
    fs::write(m.p("d/tmp"), b"new").unwrap();
    fs::rename(m.p("d/tmp"), m.p("d/kept")).unwrap();
    assert_eq!(fs::read(m.p("d/kept")).unwrap(), b"new");
    // A symlink and a hard link in a synced directory.
    std::os::unix::fs::symlink("d/kept", m.p("link")).unwrap();
    fs::hard_link(m.p("sparse"), m.p("hard")).unwrap();
    sync_dir(&root);
    // A directory whose parent was never synced: gone with all it holds.
    fs::create_dir_all(m.p("a/b")).unwrap();
    fs::write(m.p("a/b/f"), b"f").unwrap();
    File::open(m.p("a/b/f")).unwrap().sync_all().unwrap();
    sync_dir(&m.p("a/b"));
    sync_dir(&m.p("a"));
    // A POSIX lock (RocksDB's LOCK file) is the kernel's business.
    let lock = File::create(m.p("LOCK")).unwrap();
    let fl = libc::flock {
        l_type: libc::F_WRLCK as i16,
        l_whence: libc::SEEK_SET as i16,
        l_start: 0,
        l_len: 0,
        l_pid: 0,
    };
    // SAFETY: fcntl on an open descriptor with a valid struct.
    assert_eq!(
        unsafe { libc::fcntl(std::os::fd::AsRawFd::as_raw_fd(&lock), libc::F_SETLK, &fl) },
        0
    );
    // Another process cannot take it meanwhile (lockf is fcntl F_SETLK).
    let other = Command::new("python3")
        .arg("-c")
        .arg(
            "import errno, fcntl, sys\n\
             f = open(sys.argv[1], 'r+')\n\
             try:\n    fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB)\n\
             except OSError as e:\n    sys.exit(3 if e.errno in (errno.EAGAIN, errno.EACCES) else 4)\n",
        )
        .arg(m.p("LOCK"))
        .status()
        .expect("python3");
    assert_eq!(other.code(), Some(3), "a second process got the POSIX lock");
    drop(lock);
    // statfs reports plenty of room.
    let st = {
        let c = std::ffi::CString::new(root.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: valid path and out-pointer.
        unsafe {
            let mut st: libc::statvfs = std::mem::zeroed();
            assert_eq!(libc::statvfs(c.as_ptr(), &mut st), 0);
            st
        }
    };
    assert!(st.f_bavail as u128 * st.f_frsize as u128 > 1 << 40);

    m.cut();

    assert_eq!(fs::read(m.p("d/kept")).unwrap(), b"durable");
    assert!(!m.p("d/noname").exists());
    assert!(!m.p("d/tmp").exists());
    assert!(
        !m.p("a").exists(),
        "mkdir without fsync of the parent survived"
    );
    let mut sparse = Vec::new();
    File::open(m.p("sparse"))
        .unwrap()
        .read_to_end(&mut sparse)
        .unwrap();
    assert_eq!(sparse.len(), 200_003);
    assert!(sparse[..200_000].iter().all(|&b| b == 0));
    assert_eq!(&sparse[200_000..], b"end");
    assert_eq!(
        fs::metadata(m.p("sparse")).unwrap().permissions().mode() & 0o777,
        0o600
    );
    assert_eq!(fs::read_link(m.p("link")).unwrap(), Path::new("d/kept"));
    assert_eq!(fs::read(m.p("link")).unwrap(), b"durable");
    assert_eq!(fs::read(m.p("hard")).unwrap().len(), 200_003);
    let mut names: Vec<_> = fs::read_dir(&root)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(
        names,
        ["d", "hard", "link", "sparse"],
        "LOCK was never synced into /"
    );

    // The filesystem goes on working after a cut; renameat2 NOREPLACE fails with EEXIST.
    fs::write(m.p("d/again"), b"again").unwrap();
    let from = std::ffi::CString::new(m.p("d/again").as_os_str().as_encoded_bytes()).unwrap();
    let to = std::ffi::CString::new(m.p("d/kept").as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: valid paths.
    let r = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            from.as_ptr(),
            libc::AT_FDCWD,
            to.as_ptr(),
            libc::RENAME_NOREPLACE,
        )
    };
    assert_eq!(r, -1);
    assert_eq!(
        std::io::Error::last_os_error().raw_os_error(),
        Some(libc::EEXIST)
    );
    fs::remove_file(m.p("d/again")).unwrap();
    fs::remove_dir(m.p("d")).unwrap_err(); // not empty
    fs::remove_file(m.p("d/kept")).unwrap();
    fs::remove_dir(m.p("d")).unwrap();
    m.cut();
    // Neither removal was synced.
    assert_eq!(fs::read(m.p("d/kept")).unwrap(), b"durable");
}
