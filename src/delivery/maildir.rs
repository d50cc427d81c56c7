//! Maildir delivery (<https://cr.yp.to/proto/maildir.html>) for local domains.
//!
//! Blocking std I/O only: the scheduler calls [`deliver`] in `spawn_blocking`.
//!
//! Invariants: a message is written to `tmp/`, fsynced, then renamed into `new/` (never over
//! an existing file) and `new/` is fsynced, so once [`deliver`] returns `Ok` the message
//! survives a crash; before that nothing is visible in `new/`, and a failed write leaves no
//! file in `tmp/`. Every directory this module creates is fsynced into its parent.
//! Every I/O failure is transient (Postfix's local(8) defers those too): a full disk or a
//! quota is an operator's problem, not a reason to bounce.

use std::fmt;
use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// Why a local delivery did not happen. `permanent` false = retry later.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalError {
    pub permanent: bool,
    /// The enhanced status code (RFC 3463), e.g. `4.3.0`, `5.1.3`, `4.2.2`.
    pub status: String,
    pub text: String,
}

impl LocalError {
    fn permanent(status: &str, text: String) -> LocalError {
        LocalError {
            permanent: true,
            status: status.to_string(),
            text,
        }
    }

    fn transient(status: &str, text: String) -> LocalError {
        LocalError {
            permanent: false,
            status: status.to_string(),
            text,
        }
    }
}

impl fmt::Display for LocalError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.status, self.text)
    }
}

impl std::error::Error for LocalError {}

/// The recipient delimiter: `user+detail` is delivered to `user`.
const RECIPIENT_DELIMITER: char = '+';
/// The longest file name most file systems take.
const MAX_COMPONENT: usize = 255;

/// The mailbox name of a local part: lower-cased, "+detail" removed (recipient_delimiter "+").
/// Err (permanent, 5.1.3) for a name that is unsafe as one path component: empty, "." or "..",
/// starts with '.', contains '/', '\0', control chars or '\\', longer than 255 bytes.
///
/// Like Postfix, a local part that starts with the delimiter is not split (`+x` stays `+x`).
pub fn mailbox_user(local_part: &str) -> Result<String, LocalError> {
    let base = match local_part.find(RECIPIENT_DELIMITER) {
        Some(i) if i > 0 => &local_part[..i],
        _ => local_part,
    };
    let user = base.to_lowercase();
    match unsafe_component(&user) {
        None => Ok(user),
        Some(why) => Err(LocalError::permanent(
            "5.1.3",
            format!("bad address syntax: mailbox name {local_part:?} {why}"),
        )),
    }
}

/// The Maildir directory for `user` (already from mailbox_user) in `domain` (lower case): the
/// template with `{domain}` and `{user}` replaced, e.g. "/var/mail/{domain}/{user}". Err if the
/// result is not an absolute path (transient 4.3.5: a configuration error), or if `domain` or
/// `user` is not safe as one path component (permanent 5.1.2 / 5.1.3).
pub fn mailbox_path(template: &str, domain: &str, user: &str) -> Result<PathBuf, LocalError> {
    if let Some(why) = unsafe_component(domain) {
        return Err(LocalError::permanent(
            "5.1.2",
            format!("bad destination domain {domain:?}: {why}"),
        ));
    }
    if let Some(why) = unsafe_component(user) {
        return Err(LocalError::permanent(
            "5.1.3",
            format!("bad address syntax: mailbox name {user:?} {why}"),
        ));
    }
    // One pass, so a replacement is never searched for placeholders again.
    let mut path = String::with_capacity(template.len() + domain.len() + user.len());
    let mut rest = template;
    while let Some(open) = rest.find('{') {
        path.push_str(&rest[..open]);
        let tail = &rest[open..];
        if let Some(after) = tail.strip_prefix("{domain}") {
            path.push_str(domain);
            rest = after;
        } else if let Some(after) = tail.strip_prefix("{user}") {
            path.push_str(user);
            rest = after;
        } else {
            path.push('{');
            rest = &tail[1..];
        }
    }
    path.push_str(rest);
    let path = PathBuf::from(path);
    if !path.is_absolute() {
        return Err(LocalError::transient(
            "4.3.5",
            format!(
                "mail system configuration error: the mailbox path {} (from {template:?}) is \
                 not absolute",
                path.display()
            ),
        ));
    }
    Ok(path)
}

/// Why `name` cannot be one path component, if it cannot.
fn unsafe_component(name: &str) -> Option<&'static str> {
    if name.is_empty() {
        Some("is empty")
    } else if name.starts_with('.') {
        Some("starts with a dot")
    } else if name.len() > MAX_COMPONENT {
        Some("is longer than 255 bytes")
    } else if name.contains('/') || name.contains('\\') {
        Some("contains a slash or a backslash")
    } else if name.chars().any(char::is_control) {
        Some("contains a control character")
    } else {
        None
    }
}

/// Deliver one message to the Maildir `dir`: create dir/{tmp,new,cur} (mode 0700, parents as
/// needed, fsync the parent of every directory created), prepend "Return-Path: <sender>\n" and
/// "Delivered-To: recipient\n", convert CRLF line ends to LF, write to tmp/NAME, fsync the file,
/// rename to new/NAME, fsync new/. NAME follows the Maildir convention
/// ("SECONDS.M<usec>P<pid>Q<counter>.HOSTNAME,S=<size>"). Never overwrites an existing file.
/// Returns the final path.
pub fn deliver(
    dir: &Path,
    hostname: &str,
    sender: &str,
    recipient: &str,
    message: impl Read,
) -> Result<PathBuf, LocalError> {
    // The name in tmp/ has no size yet: the message is read as it is written.
    let name = unique_name(hostname);
    let tmp = dir.join("tmp").join(&name);
    let new_dir = dir.join("new");

    // The Maildir is made only when a step finds it missing: no extra look-ups per
    // delivery into a Maildir that exists.
    let create = || {
        OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
    };
    let mut file = match create() {
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            ensure_maildir(dir)?;
            create()
        }
        other => other,
    }
    .map_err(|e| io_error("create", &tmp, e))?;
    let written = write_content(&mut file, sender, recipient, message)
        .and_then(|size| file.sync_all().map(|()| size));
    drop(file);
    let size = match written {
        Ok(size) => size,
        Err(e) => {
            let _ = fs::remove_file(&tmp);
            return Err(io_error("write", &tmp, e));
        }
    };
    let new = new_dir.join(format!("{name},S={size}"));
    let renamed = match rename_noreplace(&tmp, &new) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => ensure_maildir(dir).and_then(|()| {
            rename_noreplace(&tmp, &new).map_err(|e| io_error("rename into", &new, e))
        }),
        other => other.map_err(|e| io_error("rename into", &new, e)),
    };
    if let Err(e) = renamed {
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    // The file is in new/ now; if this sync fails the caller retries: a duplicate at worst.
    sync_dir(&new_dir).map_err(|e| io_error("sync", &new_dir, e))?;
    Ok(new)
}

/// dir/tmp, dir/new and dir/cur exist (any existing entry counts: a file where a directory
/// should be fails later, at the write or the rename).
fn ensure_maildir(dir: &Path) -> Result<(), LocalError> {
    for sub in ["tmp", "new", "cur"] {
        let path = dir.join(sub);
        match fs::symlink_metadata(&path) {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => create_dirs(&path)?,
            Err(e) => return Err(io_error("look up", &path, e)),
        }
    }
    Ok(())
}

/// Creates `path` and its missing parents (mode 0700), each fsynced into its parent.
fn create_dirs(path: &Path) -> Result<(), LocalError> {
    let mut missing = Vec::new();
    let mut at = path;
    loop {
        match fs::symlink_metadata(at) {
            Ok(_) => break,
            Err(e) if e.kind() == io::ErrorKind::NotFound => missing.push(at),
            Err(e) => return Err(io_error("look up", at, e)),
        }
        match at.parent() {
            Some(p) if !p.as_os_str().is_empty() => at = p,
            _ => break,
        }
    }
    for d in missing.into_iter().rev() {
        match DirBuilder::new().mode(0o700).create(d) {
            Ok(()) => {}
            // Another delivery to the same mailbox created it first.
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(io_error("create directory", d, e)),
        }
        if let Some(parent) = d.parent().filter(|p| !p.as_os_str().is_empty()) {
            sync_dir(parent).map_err(|e| io_error("sync", parent, e))?;
        }
    }
    Ok(())
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// `from` to `to`, failing with `AlreadyExists` rather than replacing `to`.
fn rename_noreplace(from: &Path, to: &Path) -> io::Result<()> {
    #[cfg(any(target_os = "linux", target_os = "android"))]
    {
        use std::ffi::CString;
        use std::os::unix::ffi::OsStrExt;
        let cstr = |p: &Path| {
            CString::new(p.as_os_str().as_bytes())
                .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in a path"))
        };
        let (f, t) = (cstr(from)?, cstr(to)?);
        // SAFETY: both are valid NUL-terminated strings that outlive the call.
        let rc = unsafe {
            libc::renameat2(
                libc::AT_FDCWD,
                f.as_ptr(),
                libc::AT_FDCWD,
                t.as_ptr(),
                libc::RENAME_NOREPLACE as _,
            )
        };
        if rc == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        // Only a file system (or kernel) without RENAME_NOREPLACE falls through.
        if !matches!(e.raw_os_error(), Some(libc::EINVAL | libc::ENOSYS)) {
            return Err(e);
        }
    }
    match fs::symlink_metadata(to) {
        Ok(_) => Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            "the destination exists",
        )),
        Err(e) if e.kind() == io::ErrorKind::NotFound => fs::rename(from, to),
        Err(e) => Err(e),
    }
}

/// A failed file operation as a (transient) delivery error.
fn io_error(what: &str, path: &Path, e: io::Error) -> LocalError {
    let detail = format!("cannot {what} {}: {e}", path.display());
    match e.raw_os_error() {
        Some(libc::ENOSPC) => {
            LocalError::transient("4.3.1", format!("insufficient system storage: {detail}"))
        }
        Some(libc::EDQUOT) => LocalError::transient("4.2.2", format!("mailbox full: {detail}")),
        _ => LocalError::transient("4.3.0", format!("mail system error: {detail}")),
    }
}

/// Writes the file: the two trace headers, then the message with CRLF made LF (a lone CR
/// stays), read and written a buffer at a time. Returns the bytes written.
fn write_content(
    file: &mut File,
    sender: &str,
    recipient: &str,
    mut message: impl Read,
) -> io::Result<u64> {
    let mut out = io::BufWriter::with_capacity(64 * 1024, file);
    let mut size = 0u64;
    let mut put = |out: &mut io::BufWriter<&mut File>, b: &[u8]| {
        size += b.len() as u64;
        out.write_all(b)
    };
    put(&mut out, b"Return-Path: <")?;
    put(&mut out, header_value(sender).as_bytes())?;
    put(&mut out, b">\nDelivered-To: ")?;
    put(&mut out, header_value(recipient).as_bytes())?;
    put(&mut out, b"\n")?;
    let mut buf = vec![0u8; 64 * 1024];
    // A CR at the end of one read whose LF may start the next.
    let mut cr = false;
    loop {
        let n = match message.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        let mut rest = &buf[..n];
        if cr {
            cr = false;
            if rest[0] == b'\n' {
                put(&mut out, b"\n")?;
                rest = &rest[1..];
            } else {
                put(&mut out, b"\r")?;
            }
        }
        while let Some(i) = rest.windows(2).position(|w| w == b"\r\n") {
            put(&mut out, &rest[..i])?;
            put(&mut out, b"\n")?;
            rest = &rest[i + 2..];
        }
        if let Some(stripped) = rest.strip_suffix(b"\r") {
            cr = true;
            rest = stripped;
        }
        put(&mut out, rest)?;
    }
    if cr {
        put(&mut out, b"\r")?;
    }
    out.flush()?;
    Ok(size)
}

/// An address as a header value: control characters (a CR or LF would end the header)
/// become '?'.
fn header_value(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_control() { '?' } else { c })
        .collect()
}

/// Unique within this process for every call.
static COUNTER: AtomicU64 = AtomicU64::new(0);

/// `SECONDS.M<usec>P<pid>Q<counter>.HOSTNAME,S=<size>`.
fn unique_name(hostname: &str) -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let q = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!(
        "{}.M{}P{}Q{}.{}",
        now.as_secs(),
        now.subsec_micros(),
        std::process::id(),
        q,
        escape_host(hostname),
    )
}

/// The host name part of a Maildir name: '/' and ':' as `\057` and `\072` (the Maildir
/// convention), other characters that do not belong in a name as '_'.
fn escape_host(hostname: &str) -> String {
    if hostname.is_empty() {
        return "localhost".to_string();
    }
    let mut out = String::with_capacity(hostname.len());
    for c in hostname.chars() {
        match c {
            '/' => out.push_str("\\057"),
            ':' => out.push_str("\\072"),
            ',' => out.push_str("\\054"),
            c if c.is_control() => out.push('_'),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;
    use std::os::unix::fs::PermissionsExt;

    fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn a_message_lands_in_new_with_trace_headers_and_lf() {
        let t = tempfile::tempdir().unwrap();
        let dir = t.path().join("mail/example.org/alice");
        let msg = b"Subject: hi\r\nX: a\rb\r\n\r\nline 1\r\n.dot\r\nlast";
        let path = deliver(&dir, "mx.test", "bob@x.org", "alice@example.org", &msg[..]).unwrap();
        assert_eq!(path.parent().unwrap(), dir.join("new"));
        let got = fs::read(&path).unwrap();
        assert_eq!(
            got,
            b"Return-Path: <bob@x.org>\nDelivered-To: alice@example.org\n\
              Subject: hi\nX: a\rb\n\nline 1\n.dot\nlast"
        );
        let name = path.file_name().unwrap().to_str().unwrap();
        assert!(
            name.ends_with(&format!(".mx.test,S={}", got.len())),
            "{name}"
        );
        let pid = format!("P{}Q", std::process::id());
        assert!(name.contains(&pid), "{name}");
        assert!(names(&dir.join("tmp")).is_empty());
        assert!(names(&dir.join("cur")).is_empty());
        // The file and the directories are private.
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&path), 0o600);
        for d in ["", "tmp", "new", "cur"] {
            assert_eq!(mode(&dir.join(d)), 0o700, "{d}");
        }
        assert_eq!(mode(&t.path().join("mail/example.org")), 0o700);

        // The null sender, a second message into the existing Maildir.
        let p2 = deliver(&dir, "mx.test", "", "alice@example.org", &b"x\r\n"[..]).unwrap();
        assert_eq!(
            fs::read(&p2).unwrap(),
            b"Return-Path: <>\nDelivered-To: alice@example.org\nx\n"
        );
        assert_eq!(names(&dir.join("new")).len(), 2);
    }

    #[test]
    fn names_are_unique_for_many_quick_deliveries() {
        let t = tempfile::tempdir().unwrap();
        let dir = t.path().join("Maildir");
        let mut seen = HashSet::new();
        for i in 0..1000 {
            let body = format!("message {i}\r\n");
            let p = deliver(&dir, "host", "a@b", "c@d", body.as_bytes()).unwrap();
            assert!(seen.insert(p.file_name().unwrap().to_owned()), "{p:?}");
        }
        assert_eq!(names(&dir.join("new")).len(), 1000);
        assert!(names(&dir.join("tmp")).is_empty());
    }

    #[test]
    fn host_names_are_escaped() {
        assert_eq!(escape_host("a/b:c,d"), "a\\057b\\072c\\054d");
        assert_eq!(escape_host(""), "localhost");
        assert_eq!(escape_host("mx\n1"), "mx_1");
        let t = tempfile::tempdir().unwrap();
        let p = deliver(t.path(), "we/ird:host", "a@b", "c@d", &b"x"[..]).unwrap();
        let name = p.file_name().unwrap().to_str().unwrap().to_string();
        assert!(name.contains(".we\\057ird\\072host,S="), "{name}");
        // A CR or LF in an address cannot add a header.
        let p = deliver(t.path(), "h", "a\r\nX: y@b", "c\n@d", &b"x"[..]).unwrap();
        assert_eq!(
            fs::read(p).unwrap(),
            b"Return-Path: <a??X: y@b>\nDelivered-To: c?@d\nx"
        );
    }

    #[test]
    fn mailbox_names() {
        assert_eq!(mailbox_user("Alice").unwrap(), "alice");
        assert_eq!(mailbox_user("Alice+Lists").unwrap(), "alice");
        assert_eq!(mailbox_user("a+b+c").unwrap(), "a");
        assert_eq!(mailbox_user("bob+").unwrap(), "bob");
        assert_eq!(mailbox_user("+x").unwrap(), "+x");
        assert_eq!(mailbox_user("first.last").unwrap(), "first.last");
        assert_eq!(mailbox_user("JÖRAN").unwrap(), "jöran");
        assert_eq!(mailbox_user(&"a".repeat(255)).unwrap().len(), 255);
        for bad in [
            "",
            ".",
            "..",
            ".hidden",
            "..+x",
            "a/b",
            "../etc",
            "a\\b",
            "a\0b",
            "a\nb",
            "a\tb",
            "a\u{7f}",
            &"a".repeat(256),
        ] {
            let e = mailbox_user(bad).unwrap_err();
            assert!(e.permanent, "{bad:?}");
            assert_eq!(e.status, "5.1.3", "{bad:?}");
        }
    }

    #[test]
    fn mailbox_paths() {
        let p = mailbox_path("/var/mail/{domain}/{user}", "example.org", "alice").unwrap();
        assert_eq!(p, PathBuf::from("/var/mail/example.org/alice"));
        let p = mailbox_path("/home/{user}/Maildir/", "x.org", "bob").unwrap();
        assert_eq!(p, PathBuf::from("/home/bob/Maildir/"));
        // A replacement is not searched again; unknown braces stay.
        let p = mailbox_path("/m/{x}/{domain}{user}", "{user}", "u");
        assert!(p.is_ok(), "braces are allowed in a domain here: {p:?}");
        assert_eq!(p.unwrap(), PathBuf::from("/m/{x}/{user}u"));
        let e = mailbox_path("mail/{domain}/{user}", "x.org", "bob").unwrap_err();
        assert!(!e.permanent);
        assert_eq!(e.status, "4.3.5");
        let e = mailbox_path("{user}", "x.org", "bob").unwrap_err();
        assert!(!e.permanent);
        let e = mailbox_path("/m/{domain}/{user}", "../x", "bob").unwrap_err();
        assert_eq!((e.permanent, e.status.as_str()), (true, "5.1.2"));
        let e = mailbox_path("/m/{domain}/{user}", "x.org", "..").unwrap_err();
        assert_eq!((e.permanent, e.status.as_str()), (true, "5.1.3"));
    }

    #[test]
    fn error_classes() {
        let p = Path::new("/m/x");
        let e = io_error("write", p, io::Error::from_raw_os_error(libc::ENOSPC));
        assert_eq!((e.permanent, e.status.as_str()), (false, "4.3.1"));
        assert!(e.text.starts_with("insufficient system storage"), "{e}");
        let e = io_error("write", p, io::Error::from_raw_os_error(libc::EDQUOT));
        assert_eq!((e.permanent, e.status.as_str()), (false, "4.2.2"));
        assert!(e.text.starts_with("mailbox full"), "{e}");
        for errno in [libc::EACCES, libc::EIO, libc::EROFS, libc::ENOTDIR] {
            let e = io_error("write", p, io::Error::from_raw_os_error(errno));
            assert_eq!((e.permanent, e.status.as_str()), (false, "4.3.0"));
            assert!(e.text.contains("/m/x"), "{e}");
        }
    }

    #[test]
    fn an_existing_file_is_never_replaced() {
        let t = tempfile::tempdir().unwrap();
        let (a, b) = (t.path().join("a"), t.path().join("b"));
        fs::write(&a, "new").unwrap();
        fs::write(&b, "old").unwrap();
        let e = rename_noreplace(&a, &b).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::AlreadyExists);
        assert_eq!(fs::read(&b).unwrap(), b"old");
        rename_noreplace(&a, &t.path().join("c")).unwrap();
        assert!(!a.exists());
    }

    /// The rename into new/ fails after the tmp file was written: the error is transient
    /// and tmp/ is left empty. `new` is a file here.
    #[test]
    fn a_failed_rename_leaves_nothing_in_tmp() {
        let t = tempfile::tempdir().unwrap();
        let dir = t.path();
        fs::create_dir(dir.join("tmp")).unwrap();
        fs::create_dir(dir.join("cur")).unwrap();
        fs::write(dir.join("new"), "not a directory").unwrap();
        let e = deliver(dir, "h", "a@b", "c@d", &b"x\r\n"[..]).unwrap_err();
        assert!(!e.permanent);
        assert_eq!(e.status, "4.3.0");
        assert!(
            e.text.contains(&dir.join("new").display().to_string()),
            "{e}"
        );
        assert!(names(&dir.join("tmp")).is_empty());

        // tmp is a file: nothing can be written at all.
        let t = tempfile::tempdir().unwrap();
        fs::write(t.path().join("tmp"), "").unwrap();
        let e = deliver(t.path(), "h", "a@b", "c@d", &b"x"[..]).unwrap_err();
        assert_eq!((e.permanent, e.status.as_str()), (false, "4.3.0"));
    }

    /// Runs `f` on a thread of its own that has dropped CAP_DAC_OVERRIDE and
    /// CAP_DAC_READ_SEARCH from its effective capabilities (capabilities are per thread on
    /// Linux), so permission bits apply even when the tests run as root.
    fn with_permission_checks<T: Send>(f: impl FnOnce() -> T + Send) -> T {
        #[repr(C)]
        struct Header {
            version: u32,
            pid: i32,
        }
        #[repr(C)]
        #[derive(Clone, Copy, Default)]
        struct Data {
            effective: u32,
            permitted: u32,
            inheritable: u32,
        }
        const VERSION_3: u32 = 0x2008_0522;
        const DAC: u32 = (1 << 1) | (1 << 2); // CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH
        std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    let mut h = Header {
                        version: VERSION_3,
                        pid: 0,
                    };
                    let mut d = [Data::default(); 2];
                    // SAFETY: capget/capset with a v3 header and two data structs, for the
                    // calling thread only (pid 0).
                    unsafe {
                        let rc = libc::syscall(libc::SYS_capget, &mut h, d.as_mut_ptr());
                        assert_eq!(rc, 0, "capget: {}", io::Error::last_os_error());
                        d[0].effective &= !DAC;
                        let rc = libc::syscall(libc::SYS_capset, &mut h, d.as_ptr());
                        assert_eq!(rc, 0, "capset: {}", io::Error::last_os_error());
                    }
                    f()
                })
                .join()
                .unwrap()
        })
    }

    /// A read-only new/, tmp/ or parent directory: a transient error, nothing left in tmp/.
    #[test]
    fn a_read_only_directory_is_a_transient_error() {
        with_permission_checks(read_only_directories);
    }

    fn read_only_directories() {
        let ro = |p: &Path| fs::set_permissions(p, fs::Permissions::from_mode(0o500)).unwrap();
        let rw = |p: &Path| fs::set_permissions(p, fs::Permissions::from_mode(0o700)).unwrap();

        let t = tempfile::tempdir().unwrap();
        let dir = t.path().join("Maildir");
        deliver(&dir, "h", "a@b", "c@d", &b"first"[..]).unwrap();
        ro(&dir.join("new"));
        let e = deliver(&dir, "h", "a@b", "c@d", &b"second"[..]).unwrap_err();
        rw(&dir.join("new"));
        assert_eq!((e.permanent, e.status.as_str()), (false, "4.3.0"));
        assert!(e.text.contains("Permission denied"), "{e}");
        assert!(names(&dir.join("tmp")).is_empty());
        assert_eq!(names(&dir.join("new")).len(), 1);

        ro(&dir.join("tmp"));
        let e = deliver(&dir, "h", "a@b", "c@d", &b"third"[..]).unwrap_err();
        rw(&dir.join("tmp"));
        assert_eq!((e.permanent, e.status.as_str()), (false, "4.3.0"));
        assert!(names(&dir.join("tmp")).is_empty());

        ro(t.path());
        let e = deliver(&t.path().join("other"), "h", "a@b", "c@d", &b"x"[..]).unwrap_err();
        rw(t.path());
        assert_eq!((e.permanent, e.status.as_str()), (false, "4.3.0"));
        assert!(!t.path().join("other").exists());
    }
}
