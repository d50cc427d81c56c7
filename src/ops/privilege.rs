//! Running as an unprivileged user, and a spool no one else can read.
//!
//! `serve` with `user` set: as root it makes the spool private and the user's (directory
//! 0700, files 0600, every entry chowned), binds its listeners, then drops to the user and
//! its groups for good ([`drop_to`]: supplementary groups, then real, effective and saved
//! gid and uid; checked, and checked that root cannot be regained) before it opens the spool
//! or starts a thread. Every other command first asks [`check_access`] and refuses, in one
//! line, to run as a user that cannot read the spool.

use std::ffi::{CStr, CString};
use std::os::unix::fs::MetadataExt;
use std::path::Path;

/// A user from the password database.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Account {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
}

/// The account called `name`, or why there is none.
pub fn lookup(name: &str) -> Result<Account, String> {
    let cname = CString::new(name).map_err(|_| format!("user {name:?}: not a user name"))?;
    let mut buf = vec![0u8; 16 * 1024];
    // SAFETY: getpwnam_r writes only into `pwd` and `buf` (whose length it is given), and
    // sets `result` to null or to `&pwd`.
    let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
    let mut result: *mut libc::passwd = std::ptr::null_mut();
    let rc = unsafe {
        libc::getpwnam_r(
            cname.as_ptr(),
            &mut pwd,
            buf.as_mut_ptr().cast(),
            buf.len(),
            &mut result,
        )
    };
    if rc != 0 {
        let e = std::io::Error::from_raw_os_error(rc);
        return Err(format!(
            "user {name}: cannot look it up: {}",
            crate::config::os_error(&e)
        ));
    }
    if result.is_null() {
        return Err(format!("user {name}: no such user"));
    }
    Ok(Account {
        name: name.to_string(),
        uid: pwd.pw_uid,
        gid: pwd.pw_gid,
    })
}

/// The name of user `uid`, or the number.
pub fn user_name(uid: u32) -> String {
    let mut buf = vec![0u8; 16 * 1024];
    // SAFETY: as in `lookup`.
    let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
    let mut result: *mut libc::passwd = std::ptr::null_mut();
    let rc = unsafe {
        libc::getpwuid_r(
            uid,
            &mut pwd,
            buf.as_mut_ptr().cast(),
            buf.len(),
            &mut result,
        )
    };
    if rc != 0 || result.is_null() {
        return format!("uid {uid}");
    }
    // SAFETY: pw_name points into `buf`, NUL-terminated, while `buf` lives.
    unsafe { CStr::from_ptr(pwd.pw_name) }
        .to_string_lossy()
        .into_owned()
}

fn last_os_error(what: &str) -> String {
    format!(
        "{what}: {}",
        crate::config::os_error(&std::io::Error::last_os_error())
    )
}

/// Creates the spool directory if missing and gives it and everything in it to `account`
/// (run as root before the drop, so the dropped server can use it). No symbolic link is
/// followed.
pub fn give_spool(dir: &Path, account: &Account) -> Result<(), String> {
    crate::spool::create_private_dir(dir)
        .map_err(|e| format!("spool {}: {}", dir.display(), crate::config::os_error(&e)))?;
    let mut paths = vec![dir.to_path_buf()];
    let entries = std::fs::read_dir(dir)
        .map_err(|e| format!("spool {}: {}", dir.display(), crate::config::os_error(&e)))?;
    paths.extend(entries.filter_map(|e| e.ok()).map(|e| e.path()));
    for p in paths {
        let Ok(meta) = std::fs::symlink_metadata(&p) else {
            continue;
        };
        if meta.uid() == account.uid && meta.gid() == account.gid {
            continue;
        }
        std::os::unix::fs::lchown(&p, Some(account.uid), Some(account.gid)).map_err(|e| {
            format!(
                "cannot give {} to user {}: {}",
                p.display(),
                account.name,
                crate::config::os_error(&e)
            )
        })?;
    }
    Ok(())
}

/// Becomes `account` for good: its groups, then its gid and uid (real, effective and
/// saved). Refuses unless running as root or as the account already; fails if root could
/// be regained afterwards.
pub fn drop_to(account: &Account) -> Result<(), String> {
    // SAFETY: plain system calls without pointers, except initgroups (a valid C string).
    unsafe {
        let (uid, euid) = (libc::getuid(), libc::geteuid());
        if uid == account.uid && euid == account.uid {
            return Ok(());
        }
        if euid != 0 {
            return Err(format!(
                "user = {}: cannot switch to that user: running as {}, not root",
                account.name,
                user_name(euid)
            ));
        }
        let name = CString::new(account.name.as_str()).map_err(|_| "bad user name".to_string())?;
        if libc::initgroups(name.as_ptr(), account.gid as libc::gid_t) != 0 {
            return Err(last_os_error(&format!(
                "cannot set the groups of user {}",
                account.name
            )));
        }
        if libc::setresgid(account.gid, account.gid, account.gid) != 0 {
            return Err(last_os_error(&format!("cannot set gid {}", account.gid)));
        }
        if libc::setresuid(account.uid, account.uid, account.uid) != 0 {
            return Err(last_os_error(&format!(
                "cannot become user {}",
                account.name
            )));
        }
        if account.uid != 0 && (libc::setuid(0) == 0 || libc::seteuid(0) == 0) {
            return Err(format!(
                "dropped to user {} but could become root again: refusing to run",
                account.name
            ));
        }
        let (mut r, mut e, mut s) = (0, 0, 0);
        let (mut rg, mut eg, mut sg) = (0, 0, 0);
        if libc::getresuid(&mut r, &mut e, &mut s) != 0
            || libc::getresgid(&mut rg, &mut eg, &mut sg) != 0
            || [r, e, s] != [account.uid; 3]
            || [rg, eg, sg] != [account.gid; 3]
        {
            return Err(format!(
                "could not drop to user {} completely: refusing to run",
                account.name
            ));
        }
    }
    Ok(())
}

/// For a command other than `serve`: one line when the spool at `dir` exists but this user
/// cannot read it (it is private to its owner). A missing spool is left to the command.
pub fn check_access(dir: &Path) -> Result<(), String> {
    let Ok(meta) = std::fs::metadata(dir) else {
        return Ok(());
    };
    let Ok(c) = CString::new(dir.as_os_str().as_encoded_bytes()) else {
        return Ok(());
    };
    // SAFETY: access(2) with a valid C string.
    if unsafe { libc::access(c.as_ptr(), libc::R_OK | libc::X_OK) } == 0 {
        return Ok(());
    }
    // SAFETY: plain system call.
    let me = user_name(unsafe { libc::geteuid() });
    let owner = user_name(meta.uid());
    Err(format!(
        "spool {} is private to {owner} (mode {:04o}) and {me} cannot read it: run this command as {owner} or root",
        dir.display(),
        meta.mode() & 0o7777
    ))
}

/// After a command run by root worked on the spool itself (no server running): whatever it
/// created there goes back to the spool's owner, so a server that runs as that user can
/// still read it. Nothing to do for a root-owned spool or when not root.
pub fn keep_owner(dir: &Path) -> Result<(), String> {
    // SAFETY: plain getter.
    if unsafe { libc::geteuid() } != 0 {
        return Ok(());
    }
    let Ok(meta) = std::fs::symlink_metadata(dir) else {
        return Ok(());
    };
    if meta.uid() == 0 {
        return Ok(());
    }
    give_spool(
        dir,
        &Account {
            name: user_name(meta.uid()),
            uid: meta.uid(),
            gid: meta.gid(),
        },
    )
}
