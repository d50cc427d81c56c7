//! `faultfs MOUNTPOINT`: mounts the in-memory power-cut filesystem on MOUNTPOINT (as root:
//! mount(2) on /dev/fuse, no fusermount) and stays in the foreground. Prints `ready` once
//! mounted. SIGUSR2: a failing disk on/off
//! (every change fails with EIO meanwhile; prints `failing on`/`failing off`). SIGUSR1: a power cut in place (everything not fsynced is gone, as after a
//! power loss and a remount), then prints `cut N`. SIGTERM or SIGINT: unmounts and exits.
//! Nothing persists after the unmount.

use std::io::Write;
use std::sync::{Arc, Mutex};

use faultfs::{FaultFs, Model};
use fuser::{Config, MountOption, SessionACL};

fn main() {
    let args: Vec<_> = std::env::args_os().skip(1).collect();
    if args.len() != 1 || args[0] == "--help" || args[0] == "-h" {
        eprintln!("usage: faultfs MOUNTPOINT  (SIGUSR1: power cut; SIGTERM: unmount and exit)");
        std::process::exit(2);
    }
    let mountpoint = std::path::PathBuf::from(&args[0]);

    // The signals are taken with sigwait in this thread: blocked here before any thread
    // starts, so every thread inherits the mask and none of them gets them.
    // SAFETY: plain libc calls on a local sigset_t.
    let set = unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for sig in [libc::SIGUSR1, libc::SIGUSR2, libc::SIGTERM, libc::SIGINT] {
            libc::sigaddset(&mut set, sig);
        }
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    };

    let model = Arc::new(Mutex::new(Model::new()));
    let failing = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut config = Config::default();
    config.mount_options = vec![
        MountOption::FSName("faultfs".into()),
        MountOption::Subtype("faultfs".into()),
    ];
    config.acl = SessionACL::All;
    let session = match fuser::spawn_mount(
        FaultFs::with_failing(model.clone(), failing.clone()),
        &mountpoint,
        &config,
    ) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("faultfs: cannot mount {}: {e}", mountpoint.display());
            std::process::exit(1);
        }
    };
    let mut out = std::io::stdout();
    let _ = writeln!(out, "ready");
    let _ = out.flush();

    loop {
        let mut sig = 0;
        // SAFETY: `set` is a valid, initialised signal set.
        if unsafe { libc::sigwait(&set, &mut sig) } != 0 {
            continue;
        }
        if sig == libc::SIGUSR1 {
            let (n, inodes) = {
                let mut m = model.lock().unwrap_or_else(|e| e.into_inner());
                let n = m.cut();
                (n, m.inodes())
            };
            let _ = writeln!(out, "cut {n} ({inodes} inodes left)");
            let _ = out.flush();
        } else if sig == libc::SIGUSR2 {
            let was = failing.fetch_xor(true, std::sync::atomic::Ordering::Relaxed);
            let _ = writeln!(out, "failing {}", if was { "off" } else { "on" });
            let _ = out.flush();
        } else {
            break;
        }
    }
    if let Err(e) = session.umount_and_join() {
        eprintln!("faultfs: unmount {}: {e}; detaching", mountpoint.display());
        if let Ok(c) = std::ffi::CString::new(mountpoint.as_os_str().as_encoded_bytes()) {
            // SAFETY: a valid NUL-terminated path.
            unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
        }
    }
}
