//! `Type=notify`: the server tells systemd, on the socket `$NOTIFY_SOCKET` names, when it is
//! ready (only once it accepts connections), when it reloads, and when it stops.

use std::fs::File;
use std::net::TcpStream;
use std::os::unix::net::UnixDatagram;
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::harness::*;

fn next(socket: &UnixDatagram) -> String {
    let mut buf = [0u8; 4096];
    let n = socket
        .recv(&mut buf)
        .expect("a notification within the timeout");
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

#[test]
fn serve_notifies_ready_reloading_and_stopping() {
    let env = MxEnv::new();
    let notify = env.dir.path().join("notify.sock");
    let socket = UnixDatagram::bind(&notify).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let log = env.dir.path().join("server.log");
    let child = Command::new(BIN)
        .arg("--config")
        .arg(&env.config)
        .arg("serve")
        .env("NOTIFY_SOCKET", &notify)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(File::create(&log).unwrap())
        .spawn()
        .expect("spawn mxspool serve");
    let mut server = Server {
        child,
        log,
        addr: env.addr(),
    };

    // READY=1 comes only once the port accepts and the spool is open.
    assert_eq!(next(&socket), "READY=1", "{}", server.log());
    assert!(TcpStream::connect(env.addr()).is_ok());
    assert!(env.dir.path().join("spool").join("CURRENT").is_file());

    let pid = server.child.id() as i32;
    // SAFETY: a signal to the child we started and have not reaped.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGHUP) }, 0);
    let reloading = next(&socket);
    let mut lines = reloading.lines();
    assert_eq!(lines.next(), Some("RELOADING=1"), "{reloading}");
    let usec = lines
        .next()
        .and_then(|l| l.strip_prefix("MONOTONIC_USEC="))
        .and_then(|v| v.parse::<u64>().ok());
    assert!(usec.is_some_and(|u| u > 0), "{reloading}");
    assert_eq!(next(&socket), "READY=1");

    // `mxspool reload` (through the control socket) does the same.
    check_ok("mxspool reload", &env.mxspool(&["reload"]));
    assert!(next(&socket).starts_with("RELOADING=1\nMONOTONIC_USEC="));
    assert_eq!(next(&socket), "READY=1");

    assert!(stop_server(&mut server), "{}", server.log());
    assert_eq!(next(&socket), "STOPPING=1");
}

#[test]
fn serve_notifies_an_abstract_socket() {
    use std::os::linux::net::SocketAddrExt;
    let env = MxEnv::new();
    let name = format!("mxspool-it-notify-{}-{}", std::process::id(), env.port);
    let addr = std::os::unix::net::SocketAddr::from_abstract_name(&name).unwrap();
    let socket = UnixDatagram::bind_addr(&addr).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let log = env.dir.path().join("server.log");
    let child = Command::new(BIN)
        .arg("--config")
        .arg(&env.config)
        .arg("serve")
        .env("NOTIFY_SOCKET", format!("@{name}"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(File::create(&log).unwrap())
        .spawn()
        .expect("spawn mxspool serve");
    let mut server = Server {
        child,
        log,
        addr: env.addr(),
    };
    assert_eq!(next(&socket), "READY=1", "{}", server.log());
    assert!(stop_server(&mut server));
    assert_eq!(next(&socket), "STOPPING=1");
}

/// `contrib/mxspool.service` says what the server does: `Type=notify`, the reload, the
/// user with its one capability, the descriptors, the hardening; and `systemd-analyze
/// verify` (the systemd package; CI installs it) finds nothing wrong with it.
#[test]
fn the_unit_is_verified() {
    let unit_path =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("contrib/mxspool.service");
    let unit = std::fs::read_to_string(&unit_path).unwrap();
    let settings: Vec<(&str, &str)> = unit
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#') && !l.starts_with('['))
        .map(|l| {
            l.split_once('=')
                .unwrap_or_else(|| panic!("not KEY=VALUE: {l:?}"))
        })
        .collect();
    let get = |k: &str| settings.iter().find(|(key, _)| *key == k).map(|(_, v)| *v);
    assert_eq!(get("Type"), Some("notify"));
    assert!(get("ExecStart").unwrap().ends_with(" serve"));
    assert!(get("ExecReload").unwrap().ends_with(" reload"));
    assert_eq!(get("User"), Some("mxspool"));
    assert_eq!(get("AmbientCapabilities"), Some("CAP_NET_BIND_SERVICE"));
    assert!(get("LimitNOFILE").unwrap().parse::<u32>().unwrap() >= 4096);
    assert_eq!(get("NoNewPrivileges"), Some("yes"));
    assert_eq!(get("ProtectSystem"), Some("strict"));
    assert_eq!(get("ReadWritePaths"), Some("/var/spool/mxspool"));
    assert_eq!(get("PrivateTmp"), Some("yes"));
    assert_eq!(get("ProtectHome"), Some("yes"));

    // The unit as installed, with ExecStart pointing at the binary under test (verify wants
    // it to exist); the man pages are the package's, not checked here.
    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join("mxspool.service");
    std::fs::write(&copy, unit.replace("/usr/bin/mxspool", BIN)).unwrap();
    let out = run(
        Command::new(tool("systemd-analyze"))
            .args(["verify", "--man=no"])
            .arg(&copy),
        60,
    );
    check_ok("systemd-analyze verify", &out);
    assert!(
        out.stderr.is_empty(),
        "systemd-analyze verify: {}",
        text(&out.stderr)
    );
}

/// Runs `serve` until it accepts, with `JOURNAL_STREAM` set to `journal` and standard error
/// written to `log`, stops it, and returns what it logged.
fn serve_logging_to(env: &MxEnv, journal: &str, log: &std::path::Path) -> String {
    let child = Command::new(BIN)
        .arg("--config")
        .arg(&env.config)
        .arg("serve")
        .env("JOURNAL_STREAM", journal)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(File::create(log).unwrap())
        .spawn()
        .expect("spawn mxspool serve");
    let mut server = Server {
        child,
        log: log.to_path_buf(),
        addr: env.addr(),
    };
    assert!(wait_for(
        Duration::from_secs(20),
        Duration::from_millis(50),
        || TcpStream::connect(env.addr()).is_ok()
    ));
    assert!(stop_server(&mut server));
    std::fs::read_to_string(log).unwrap()
}

/// Under systemd, standard error is the journal (`$JOURNAL_STREAM` names it): each line
/// carries its syslog priority (`<6>` info, `<4>` warning, `<3>` error), so `journalctl -p`
/// filters by level; anywhere else the lines are plain.
#[test]
fn log_lines_carry_syslog_priorities_for_the_journal() {
    use std::os::unix::fs::MetadataExt;
    let env = MxEnv::new();
    let log = env.dir.path().join("journal.log");
    // The file exists before the server starts, so its numbers can name it.
    File::create(&log).unwrap();
    let meta = std::fs::metadata(&log).unwrap();
    let journal = format!("{}:{}", meta.dev(), meta.ino());
    let text = serve_logging_to(&env, &journal, &log);
    let lines: Vec<&str> = text.lines().collect();
    assert!(!lines.is_empty());
    for l in &lines {
        assert!(
            l.starts_with("<6>") || l.starts_with("<4>") || l.starts_with("<3>"),
            "{l:?} has no priority:\n{text}"
        );
    }
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("<6>") && l.contains("started as")),
        "{text}"
    );

    // Not the journal (another file's numbers): plain lines, with their time stamps.
    let text = serve_logging_to(&env, &journal, &env.dir.path().join("plain.log"));
    assert!(text.lines().all(|l| !l.starts_with('<')), "{text}");
    assert!(text.contains("INFO"), "{text}");
}
