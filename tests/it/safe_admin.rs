//! Day-to-day administration as a Postfix administrator meets it (issue 11): exports that
//! never overwrite, a private spool, the privilege drop, reload and signals, paths from the
//! configuration's directory, holds, bad tables, crafted archives, terminals and pipes, and
//! SIGTERM with open sessions. Every test runs the real binary.

use std::fs;
use std::io::{BufRead, BufReader, Read};
use std::net::TcpStream;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::harness::{
    assert_clean_failure, check_ok, mxspool_on, run, smtp_send, spool_dir, spool_tools_run, text,
    wait_for, MxEnv, Server, Smtp, BIN,
};

const SENDER: &str = "alice@sender.test";

fn message(subject: &str) -> Vec<u8> {
    format!(
        "From: <{SENDER}>\r\nTo: <bob@example.com>\r\nSubject: {subject}\r\n\r\nBody of {subject}.\r\n"
    )
    .into_bytes()
}

fn send(env: &MxEnv, subject: &str) -> String {
    smtp_send(&env.addr(), SENDER, &["bob@example.com"], &message(subject))
}

/// One line on stderr, starting `mxspool: `, no doubled OS error text.
fn one_error_line(what: &str, out: &std::process::Output) -> String {
    let err = assert_clean_failure(what, out);
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "{what}: want one line, got:\n{err}");
    assert!(err.starts_with("mxspool: "), "{what}: {err}");
    assert!(
        err.matches("os error").count() <= 1,
        "{what}: OS error said twice: {err}"
    );
    err
}

fn mode(p: &Path) -> u32 {
    fs::symlink_metadata(p).unwrap().permissions().mode() & 0o777
}

fn archive_ids(archive: &Path) -> Vec<String> {
    let out = spool_tools_run(archive, &["list"]);
    check_ok("spool-tools list", &out);
    text(&out.stdout)
        .lines()
        .skip(1)
        .filter(|l| !l.starts_with("--"))
        .filter_map(|l| l.split_whitespace().next().map(str::to_string))
        .collect()
}

fn pid_of(server: &Server) -> i32 {
    server.child.id() as i32
}

fn signal(server: &Server, sig: i32) {
    // SAFETY: a signal to the child we started and have not reaped.
    assert_eq!(unsafe { libc::kill(pid_of(server), sig) }, 0);
}

fn wait_log(server: &Server, needle: &str) -> bool {
    wait_for(Duration::from_secs(10), Duration::from_millis(50), || {
        server.log().contains(needle)
    })
}

// ---------------------------------------------------------------------------------------
// 1. export never overwrites

#[test]
fn export_twice_to_one_name_keeps_the_first_archive_and_its_mail() {
    let mut env = MxEnv::new();
    let _server = env.start();
    let first: Vec<String> = (0..3).map(|i| send(&env, &format!("first {i}"))).collect();
    let archive = env.dir.path().join("batch.tar.gz");
    let a = archive.to_str().unwrap();
    let out = env.mxspool(&["export", "example.com", "-o", a, "--remove"]);
    check_ok("first export", &out);
    assert_eq!(mode(&archive), 0o600, "archives are private");
    let second: Vec<String> = (0..2).map(|i| send(&env, &format!("second {i}"))).collect();

    // The same command again: refused, nothing removed, the first archive untouched.
    let before = fs::read(&archive).unwrap();
    let out = env.mxspool(&["export", "example.com", "-o", a, "--remove"]);
    let err = one_error_line("second export", &out);
    assert!(
        err.contains("already exists") && err.contains("--force"),
        "{err}"
    );
    assert_eq!(
        fs::read(&archive).unwrap(),
        before,
        "the first archive changed"
    );
    let mut ids = archive_ids(&archive);
    ids.sort();
    let mut want = first.clone();
    want.sort();
    assert_eq!(ids, want);
    let queued: Vec<String> = env.queue(None).into_iter().map(|e| e.id).collect();
    for id in &second {
        assert!(queued.contains(id), "{id} was removed by a refused export");
    }

    // --force replaces it, atomically, with the new archive.
    let out = env.mxspool(&["export", "example.com", "-o", a, "--remove", "--force"]);
    check_ok("export --force", &out);
    let mut ids = archive_ids(&archive);
    ids.sort();
    let mut want = second.clone();
    want.sort();
    assert_eq!(ids, want);
    assert_eq!(mode(&archive), 0o600);
    let names: Vec<String> = fs::read_dir(env.dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("partial"))
        .collect();
    assert!(names.is_empty(), "temporary files left: {names:?}");
}

#[test]
fn export_never_writes_through_a_planted_symlink() {
    let mut env = MxEnv::new();
    let _server = env.start();
    send(&env, "planted");
    let victim = env.dir.path().join("victim");
    fs::write(&victim, b"root's file\n").unwrap();
    let out_dir = env.dir.path().join("out");
    fs::create_dir(&out_dir).unwrap();
    let target = out_dir.join("x.tar");
    std::os::unix::fs::symlink(&victim, &target).unwrap();
    // The old predictable temporary names, planted too.
    for pid in 1..4000u32 {
        let _ = std::os::unix::fs::symlink(&victim, out_dir.join(format!(".x.tar.partial-{pid}")));
    }

    let out = env.mxspool(&["export", "example.com", "-o", target.to_str().unwrap()]);
    one_error_line("export onto a symlink", &out);
    assert_eq!(fs::read(&victim).unwrap(), b"root's file\n");

    // --force replaces the link itself, never the file it points to.
    let out = env.mxspool(&[
        "export",
        "example.com",
        "-o",
        target.to_str().unwrap(),
        "--force",
    ]);
    check_ok("export --force over a symlink", &out);
    assert_eq!(fs::read(&victim).unwrap(), b"root's file\n");
    let meta = fs::symlink_metadata(&target).unwrap();
    assert!(meta.file_type().is_file(), "the archive is a plain file");
    assert_eq!(mode(&target), 0o600);
    assert_eq!(archive_ids(&target).len(), 1);
}

// ---------------------------------------------------------------------------------------
// 2. a private spool; the privilege drop

/// `mxspool serve` started under umask 022 (what a shell gives).
fn start_with_umask(env: &MxEnv, log: &Path) -> Server {
    let child = Command::new("sh")
        .arg("-c")
        .arg("umask 022 && exec \"$0\" \"$@\"")
        .arg(BIN)
        .arg("--config")
        .arg(&env.config)
        .arg("serve")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(fs::File::create(log).unwrap())
        .spawn()
        .expect("spawn sh");
    let server = Server {
        child,
        log: log.to_path_buf(),
        addr: env.addr(),
    };
    assert!(
        wait_for(Duration::from_secs(20), Duration::from_millis(50), || {
            TcpStream::connect(env.addr()).is_ok()
        }),
        "server did not start:\n{}",
        server.log()
    );
    server
}

fn assert_private(spool: &Path) {
    use std::os::unix::fs::FileTypeExt;
    assert_eq!(mode(spool), 0o700, "spool directory");
    let mut files = 0;
    for e in fs::read_dir(spool).unwrap() {
        let p = e.unwrap().path();
        let m = fs::symlink_metadata(&p).unwrap();
        if m.is_file() || m.file_type().is_socket() {
            files += 1;
            assert_eq!(mode(&p) & 0o077, 0, "{} is {:o}", p.display(), mode(&p));
        }
    }
    assert!(files > 3, "a spool has files");
}

#[test]
fn the_spool_and_archives_are_private_under_umask_022() {
    let env = MxEnv::new();
    let log = env.dir.path().join("umask.log");
    let mut server = start_with_umask(&env, &log);
    let id = send(&env, "private");
    let spool = spool_dir(&env);
    assert_private(&spool);
    let archive = env.dir.path().join("a.tar");
    check_ok(
        "export",
        &env.mxspool(&["export", "example.com", "-o", archive.to_str().unwrap()]),
    );
    assert_eq!(mode(&archive), 0o600);
    crate::harness::stop_server(&mut server);

    // A spool made public by hand (an old version, a restore) is fixed at start.
    fs::set_permissions(&spool, fs::Permissions::from_mode(0o755)).unwrap();
    for e in fs::read_dir(&spool).unwrap() {
        let p = e.unwrap().path();
        if fs::symlink_metadata(&p).unwrap().is_file() {
            fs::set_permissions(&p, fs::Permissions::from_mode(0o644)).unwrap();
        }
    }
    let _server = start_with_umask(&env, &env.dir.path().join("umask2.log"));
    assert_private(&spool);
    assert!(env.queue(None).iter().any(|e| e.id == id));
}

/// A throw-away system user for the privilege-drop test (created once, idempotently).
fn test_user() -> (String, u32, u32) {
    let name = "mxspool-it";
    let id = |flag: &str| -> Option<u32> {
        let out = run(Command::new("id").arg(flag).arg(name), 10);
        out.status
            .success()
            .then(|| text(&out.stdout).trim().parse().ok())
            .flatten()
    };
    if id("-u").is_none() {
        let out = run(
            Command::new("useradd")
                .args(["--system", "--user-group", "--no-create-home"])
                .args(["--shell", "/usr/sbin/nologin", name]),
            30,
        );
        // Another test may have created it meanwhile (exit 9: the user exists).
        assert!(
            out.status.success() || out.status.code() == Some(9),
            "useradd: {}",
            text(&out.stderr)
        );
    }
    (name.to_string(), id("-u").unwrap(), id("-g").unwrap())
}

/// The `Uid:`/`Gid:` (real, effective, saved, fs) and `CapEff:` of process `pid`.
fn proc_status(pid: i32) -> (Vec<u32>, Vec<u32>, String, String) {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |k: &str| -> String {
        status
            .lines()
            .find_map(|l| l.strip_prefix(k))
            .unwrap_or("")
            .trim()
            .to_string()
    };
    let nums = |s: String| {
        s.split_whitespace()
            .filter_map(|n| n.parse().ok())
            .collect()
    };
    (
        nums(field("Uid:")),
        nums(field("Gid:")),
        field("CapEff:"),
        field("Groups:"),
    )
}

#[test]
fn serve_drops_to_its_user_and_maildirs_belong_to_the_owner() {
    // SAFETY: plain getter.
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "this test needs root (CI runs as root)"
    );
    let (user, uid, gid) = test_user();
    let mut env = MxEnv::with_config(&format!(
        "[[local]]\ndomain = \"inst.test\"\nmaildir = \"{{dir}}/mail/{{domain}}/{{user}}\"\nowner = \"{user}\"\n"
    ));
    // `user` is a top-level key: the file's first line.
    let cfg = fs::read_to_string(&env.config).unwrap();
    fs::write(&env.config, format!("user = \"{user}\"\n{cfg}")).unwrap();
    let mail = env.dir.path().join("mail");
    fs::create_dir(&mail).unwrap();
    std::os::unix::fs::chown(&mail, Some(uid), Some(gid)).unwrap();

    let server = env.start();
    assert!(
        wait_log(&server, &format!("running as user {user}")),
        "{}",
        server.log()
    );
    let (uids, gids, cap, groups) = proc_status(pid_of(&server));
    assert_eq!(uids, vec![uid; 4], "uids of the server");
    assert_eq!(gids, vec![gid; 4], "gids of the server");
    assert_eq!(cap, "0000000000000000", "no capabilities left");
    assert!(
        groups.split_whitespace().all(|g| g != "0"),
        "root's group kept: {groups}"
    );

    // It still works: mail is queued, the control socket answers root.
    let id = send(&env, "as the user");
    assert!(env.queue(None).iter().any(|e| e.id == id));
    let spool = spool_dir(&env);
    for e in fs::read_dir(&spool).unwrap() {
        let p = e.unwrap().path();
        assert_eq!(
            fs::symlink_metadata(&p).unwrap().uid(),
            uid,
            "{}",
            p.display()
        );
    }

    // A local delivery: the Maildir and its files are the owner's.
    smtp_send(
        &env.addr(),
        SENDER,
        &["carol@inst.test"],
        b"Subject: local\r\n\r\nhi\r\n",
    );
    let maildir = mail.join("inst.test/carol");
    assert!(
        wait_for(Duration::from_secs(15), Duration::from_millis(100), || {
            fs::read_dir(maildir.join("new")).is_ok_and(|mut d| d.next().is_some())
        }),
        "no local delivery:\n{}",
        server.log()
    );
    for p in [maildir.clone(), maildir.join("new"), maildir.join("tmp")] {
        assert_eq!(fs::metadata(&p).unwrap().uid(), uid, "{}", p.display());
    }
    for e in fs::read_dir(maildir.join("new")).unwrap() {
        let m = fs::metadata(e.unwrap().path()).unwrap();
        assert_eq!((m.uid(), m.gid()), (uid, gid));
    }

    // Another user is told, in one line, that the spool is not theirs.
    let bin = env.dir.path().join("mxspool-bin");
    fs::copy(BIN, &bin).unwrap();
    fs::set_permissions(&bin, fs::Permissions::from_mode(0o755)).unwrap();
    let out = run(
        Command::new("setpriv")
            .args(["--reuid=nobody", "--regid=nogroup", "--clear-groups", "--"])
            .arg(&bin)
            .arg("--config")
            .arg(&env.config)
            .args(["queue"]),
        30,
    );
    let err = one_error_line("queue as nobody", &out);
    assert!(
        err.contains("private to mxspool-it") && err.contains("nobody"),
        "{err}"
    );

    // Root works on the stopped spool itself; what it wrote stays the user's, so the
    // server (as the user) starts on it again.
    let mut server = server;
    crate::harness::stop_server(&mut server);
    check_ok("hold as root", &env.mxspool(&["hold", "example.com"]));
    check_ok("queue as root", &env.mxspool(&["queue"]));
    for e in fs::read_dir(&spool).unwrap() {
        let p = e.unwrap().path();
        assert_eq!(
            fs::symlink_metadata(&p).unwrap().uid(),
            uid,
            "{} left to root",
            p.display()
        );
    }
    let server = env.start();
    assert!(
        wait_log(&server, "example.com: on hold since"),
        "{}",
        server.log()
    );
}

// ---------------------------------------------------------------------------------------
// 3. reload and signals

#[test]
fn sighup_reloads_the_recipients_and_a_broken_config_is_refused() {
    let mut env = MxEnv::with_config("recipients = \"example.com.users\"\n");
    let users = env.dir.path().join("example.com.users");
    fs::write(&users, "alice\n").unwrap();
    let server = env.start();
    let rcpt =
        |c: &mut Smtp, who: &str| c.cmd(&format!("RCPT TO:<{who}@example.com>")).unwrap().code;
    let open = |env: &MxEnv| {
        let (mut c, _) = Smtp::connect(&env.addr()).unwrap();
        c.cmd("EHLO client.test").unwrap();
        c.cmd(&format!("MAIL FROM:<{SENDER}>")).unwrap();
        c
    };
    let mut old = open(&env);
    assert_eq!(rcpt(&mut old, "bob"), 550);

    fs::write(&users, "alice\nbob\n").unwrap();
    signal(&server, libc::SIGHUP);
    assert!(
        wait_log(&server, "SIGHUP: configuration reloaded"),
        "{}",
        server.log()
    );
    let mut new = open(&env);
    assert_eq!(rcpt(&mut new, "bob"), 250, "the new list is in force");
    assert_eq!(
        rcpt(&mut old, "bob"),
        550,
        "a session in progress keeps its settings"
    );

    // A broken configuration: refused, the old one stays, the server lives.
    let good = fs::read_to_string(&env.config).unwrap();
    fs::write(&env.config, format!("{good}\ncolour = \"blue\"\n")).unwrap();
    signal(&server, libc::SIGHUP);
    assert!(wait_log(&server, "not reloaded"), "{}", server.log());
    let out = env.mxspool(&["reload"]);
    let err = one_error_line("reload of a broken config", &out);
    assert!(
        err.contains("colour") && err.contains("old one stays"),
        "{err}"
    );
    let mut c = open(&env);
    assert_eq!(rcpt(&mut c, "bob"), 250);

    // An empty recipients file is a broken configuration too.
    fs::write(&env.config, &good).unwrap();
    fs::write(&users, "").unwrap();
    let err = one_error_line("reload with an empty list", &env.mxspool(&["reload"]));
    assert!(
        err.contains("example.com.users") && err.contains("no user"),
        "{err}"
    );
    let mut c = open(&env);
    assert_eq!(rcpt(&mut c, "bob"), 250);

    // A setting that needs a restart is named.
    fs::write(&users, "alice\n").unwrap();
    let moved = good.replace(
        &env.addr(),
        &format!("127.0.0.1:{}", crate::harness::free_port()),
    );
    fs::write(&env.config, moved).unwrap();
    let out = env.mxspool(&["reload"]);
    check_ok("reload", &out);
    assert!(
        text(&out.stdout).contains("after a restart: [smtp] listen"),
        "{}",
        text(&out.stdout)
    );
    let mut c = open(&env);
    assert_eq!(rcpt(&mut c, "bob"), 550, "the reloaded list is in force");

    // Signals whose default is to kill: logged, ignored.
    for sig in [libc::SIGUSR1, libc::SIGUSR2] {
        signal(&server, sig);
    }
    assert!(wait_log(&server, "SIGUSR2 received and ignored"));
    assert!(TcpStream::connect(env.addr()).is_ok(), "the server died");
}

// ---------------------------------------------------------------------------------------
// 4. relative paths

#[test]
fn relative_paths_are_taken_from_the_config_file_directory() {
    let env = MxEnv::with_config("recipients = \"lists/users\"\n");
    let cfg = fs::read_to_string(&env.config).unwrap();
    let abs = spool_dir(&env);
    fs::write(
        &env.config,
        cfg.replace(&format!("\"{}\"", abs.display()), "\"queue/spool\""),
    )
    .unwrap();
    fs::create_dir(env.dir.path().join("lists")).unwrap();
    fs::write(env.dir.path().join("lists/users"), "bob\n").unwrap();

    // The server starts from `/`, the commands from elsewhere: both find the same spool.
    let log = env.dir.path().join("cwd.log");
    let child = Command::new(BIN)
        .arg("--config")
        .arg(&env.config)
        .arg("serve")
        .current_dir("/")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let _server = Server {
        child,
        log: log.clone(),
        addr: env.addr(),
    };
    assert!(wait_for(
        Duration::from_secs(20),
        Duration::from_millis(50),
        || { TcpStream::connect(env.addr()).is_ok() }
    ));
    let id = send(&env, "relative");
    let spool = env.dir.path().join("queue/spool");
    assert!(
        spool.join("control.sock").exists(),
        "spool not beside the config"
    );
    assert!(
        !Path::new("/queue").exists(),
        "spool made in the working directory"
    );
    let other = tempfile::tempdir().unwrap();
    let out = run(
        Command::new(BIN)
            .arg("--config")
            .arg(&env.config)
            .args(["queue", "--json"])
            .current_dir(other.path()),
        30,
    );
    check_ok("queue from elsewhere", &out);
    assert!(text(&out.stdout).contains(&id), "{}", text(&out.stdout));
    let out = run(
        Command::new(BIN)
            .arg("--config")
            .arg(&env.config)
            .arg("check-config")
            .current_dir(other.path()),
        30,
    );
    assert!(
        text(&out.stdout).contains(&format!("spool = \"{}\"", spool.display())),
        "{}",
        text(&out.stdout)
    );
}

// ---------------------------------------------------------------------------------------
// 5. holds

#[test]
fn holds_are_listed_counted_refused_for_strangers_and_marked() {
    let mut env = MxEnv::new();
    let mut server = env.start();
    for i in 0..3 {
        send(&env, &format!("held {i}"));
    }
    let out = env.mxspool(&["hold", "example.com"]);
    check_ok("hold", &out);
    assert!(
        text(&out.stdout).contains("3 message(s) held"),
        "{}",
        text(&out.stdout)
    );
    let out = env.mxspool(&["hold", "example.com"]);
    check_ok("hold again", &out);
    assert!(
        text(&out.stdout).contains("already on hold (3 message(s) held)"),
        "{}",
        text(&out.stdout)
    );
    let err = one_error_line("hold of a stranger", &env.mxspool(&["hold", "nosuch.test"]));
    assert!(
        err.contains("not one of our domains") && err.contains("--force"),
        "{err}"
    );
    check_ok(
        "hold --force",
        &env.mxspool(&["hold", "--force", "nosuch.test"]),
    );

    let list = |env: &MxEnv| {
        let out = env.mxspool(&["hold", "--list"]);
        check_ok("hold --list", &out);
        text(&out.stdout)
    };
    let l = list(&env);
    let row = |d: &str| {
        l.lines()
            .find(|r| r.starts_with(d))
            .unwrap_or("")
            .to_string()
    };
    assert!(row("example.com").trim_end().ends_with(" 3"), "{l}");
    assert!(row("nosuch.test").trim_end().ends_with(" 0"), "{l}");
    assert!(row("example.com").contains(&chrono::Utc::now().format("%Y-%m-%d").to_string()));

    let shape = text(&env.mxspool(&["shape"]).stdout);
    assert!(
        shape
            .lines()
            .any(|r| r.contains("example.com") && r.contains("(on hold)")),
        "{shape}"
    );
    let queue = text(&env.mxspool(&["queue"]).stdout);
    assert!(queue.contains("-- example.com is on hold since"), "{queue}");

    // Held domains are logged at start; a flush delivers what it can and the hold stays.
    crate::harness::stop_server(&mut server);
    let l = list(&env);
    assert!(
        l.contains("example.com") && l.contains("nosuch.test"),
        "stopped: {l}"
    );
    let server = env.start();
    assert!(
        wait_log(&server, "example.com: on hold since"),
        "{}",
        server.log()
    );
    env.mxspool(&["flush", "example.com"]);
    assert!(list(&env).contains("example.com"));
    check_ok("release", &env.mxspool(&["release", "nosuch.test"]));
    assert!(!list(&env).contains("nosuch.test"));
}

// ---------------------------------------------------------------------------------------
// 6. bad users files

#[test]
fn bad_users_and_recipients_files_are_errors_naming_file_and_line() {
    for (content, expect) in [
        ("", "no user listed"),
        ("# nobody yet\n\n", "no user listed"),
        ("alice\nfoo bar\n", "line 2"),
        ("alice\n\n@@@\n", "line 3"),
    ] {
        let env = MxEnv::with_config("recipients = \"example.com.users\"\n");
        let users = env.dir.path().join("example.com.users");
        fs::write(&users, content).unwrap();
        let out = env.mxspool(&["check-config"]);
        let err = one_error_line(&format!("check-config with {content:?}"), &out);
        assert!(
            err.contains(&users.display().to_string()) && err.contains(expect),
            "{content:?}: {err}"
        );
        let out = run(
            Command::new(BIN)
                .arg("--config")
                .arg(&env.config)
                .arg("serve"),
            20,
        );
        one_error_line("serve with a bad list", &out);
        assert!(crate::harness::port_closed(env.port));
    }
    // A users file of a local domain too.
    let env = MxEnv::custom(
        "[[local]]\ndomain = \"inst.test\"\nmaildir = \"/tmp/m/{user}\"\nusers = \"inst.users\"\n",
    );
    fs::write(env.dir.path().join("inst.users"), "ok\nnot ok\n").unwrap();
    let err = one_error_line("local users", &env.mxspool(&["check-config"]));
    assert!(err.contains("inst.users line 2"), "{err}");
    // A missing file: the path once, the OS error once.
    let env = MxEnv::with_config("recipients = \"missing.users\"\n");
    let err = one_error_line("missing users file", &env.mxspool(&["check-config"]));
    assert!(
        err.contains("missing.users") && err.contains("No such file"),
        "{err}"
    );
}

// ---------------------------------------------------------------------------------------
// 7. crafted archives, bytes on a terminal

fn archived(id: &str, domain: &str, rcpt: &str) -> spool_tools::ArchivedEnvelope {
    use spool_tools::{ArchivedDsn, ArchivedEnvelope, ArchivedRecipient, BodyType, RecipientState};
    ArchivedEnvelope {
        id: id.to_string(),
        domain: domain.to_string(),
        sender: SENDER.to_string(),
        recipients: vec![ArchivedRecipient {
            address: rcpt.to_string(),
            state: RecipientState::Pending,
            orcpt: None,
            notify: None,
        }],
        arrival: chrono::Utc::now(),
        attempts: 0,
        last_error: None,
        next_attempt: None,
        held: false,
        dsn: ArchivedDsn {
            ret: None,
            envid: None,
        },
        body: BodyType::SevenBit,
        smtputf8: false,
        client_ip: "192.0.2.1".into(),
        helo: "crafted.test".into(),
    }
}

#[test]
fn import_takes_only_our_mail_and_terminals_see_no_raw_bytes() {
    let mut env = MxEnv::new();
    let path = env.dir.path().join("crafted.tar");
    let evil_body = b"Subject: \x1b]0;owned\x07title\r\n\r\n\x1b[2Jcleared\r\n".to_vec();
    {
        let mut w =
            spool_tools::create_file(&path, spool_tools::ArchiveMeta::new("elsewhere.test", None))
                .unwrap();
        let cases = [
            ("AAAAgood0001", "example.com", "bob@example.com"),
            ("AAAAdots0002", "../../etc", "root@../../etc"),
            ("AAAAfore0003", "not-ours.test", "x@not-ours.test"),
            ("AAAAmism0004", "example.com", "victim@elsewhere.test"),
            ("AAAAbadr0005", "example.com", "a b@example.com"),
        ];
        for (id, domain, rcpt) in cases {
            w.add(&archived(id, domain, rcpt), &evil_body).unwrap();
        }
        w.finish().unwrap();
    }
    let out = env.mxspool(&["import", path.to_str().unwrap()]);
    let err = text(&out.stderr);
    for id in [
        "AAAAdots0002",
        "AAAAfore0003",
        "AAAAmism0004",
        "AAAAbadr0005",
    ] {
        assert!(
            err.contains(&format!("{id}: ")) && err.contains("skipped"),
            "{id}:\n{err}"
        );
    }
    assert!(
        text(&out.stdout).contains("1 message(s) imported"),
        "{}",
        text(&out.stdout)
    );
    let q = env.queue(None);
    assert_eq!(
        q.iter().map(|e| e.id.as_str()).collect::<Vec<_>>(),
        vec!["AAAAgood0001"],
        "only our mail is queued"
    );
    assert!(!env.dir.path().join("etc").exists());

    // On a terminal (script(1) gives it one) the escape sequences are shown, not sent;
    // through a pipe the bytes stay as they are. With the server running and without.
    let mut server = env.start();
    let show = format!(
        "{BIN} --config {} show AAAAgood0001 --body",
        env.config.display()
    );
    for stopped in [false, true] {
        if stopped {
            crate::harness::stop_server(&mut server);
        }
        let tty = run(
            Command::new("script").args(["-qec", &show, "/dev/null"]),
            30,
        );
        check_ok("show on a terminal", &tty);
        assert!(
            !tty.stdout.contains(&0x1b),
            "stopped {stopped}: raw ESC reached the terminal"
        );
        assert!(
            text(&tty.stdout).contains("\\x1b]0;owned\\x07title"),
            "stopped {stopped}: {}",
            text(&tty.stdout)
        );
        let piped = env.mxspool(&["show", "AAAAgood0001", "--body"]);
        assert!(
            piped
                .stdout
                .windows(evil_body.len())
                .any(|w| w == evil_body.as_slice()),
            "stopped {stopped}: a pipe gets the bytes unchanged"
        );
    }
    let cat = format!(
        "{} {} cat AAAAgood0001",
        crate::harness::spool_tools().display(),
        path.display()
    );
    let tty = run(Command::new("script").args(["-qec", &cat, "/dev/null"]), 30);
    check_ok("spool-tools cat on a terminal", &tty);
    assert!(!tty.stdout.contains(&0x1b), "spool-tools cat on a terminal");
    assert!(
        text(&tty.stdout).contains("\\x1b[2Jcleared"),
        "{}",
        text(&tty.stdout)
    );
}

// ---------------------------------------------------------------------------------------
// 8. clear messages, closed pipes, postcat's words

#[test]
fn errors_are_one_line_and_show_speaks_plainly() {
    let env = MxEnv::new();
    let missing = env.dir.path().join("nope.toml");
    let out = run(
        Command::new(BIN)
            .arg("--config")
            .arg(&missing)
            .arg("check-config"),
        20,
    );
    let err = one_error_line("missing config", &out);
    assert!(err.contains(&missing.display().to_string()), "{err}");
    assert_eq!(err.matches("No such file or directory").count(), 1, "{err}");
    let out = env.mxspool(&["import", "/nonexistent/archive.tar"]);
    let err = one_error_line("import of a missing file", &out);
    assert_eq!(err.matches("No such file or directory").count(), 1, "{err}");
    let out = env.mxspool(&["export", "example.com", "-o", "/nonexistent/dir/a.tar"]);
    one_error_line("export into a missing directory", &out);

    let mut env = MxEnv::new();
    let _server = env.start();
    let id = crate::harness::smtp_send_with(
        &env.addr(),
        &format!("MAIL FROM:<{SENDER}> RET=HDRS ENVID=env42"),
        &["bob@example.com"],
        &["NOTIFY=SUCCESS,FAILURE"],
        &message("plain words"),
    );
    let show = env.show(&id).unwrap();
    for want in [
        "body_type: 7BIT",
        "dsn_ret: HDRS",
        "dsn_envid: env42",
        "notify SUCCESS,FAILURE",
        "message_size: ",
    ] {
        assert!(show.contains(want), "{want}:\n{show}");
    }
    for debug in ["SevenBit", "Notify {", "Some(", "Hdrs"] {
        assert!(!show.contains(debug), "Rust debug text {debug:?}:\n{show}");
    }
}

/// Runs `args`, reads one line of its standard output and closes the pipe.
fn read_one_line_and_close(env: &MxEnv, spool: Option<&Path>, args: &[&str]) -> (bool, String) {
    let mut cmd = Command::new(BIN);
    cmd.arg("--config").arg(&env.config);
    if let Some(s) = spool {
        cmd.arg("--spool").arg(s);
    }
    let mut child = cmd
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut first)
        .unwrap();
    // The pipe's read end is closed here.
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "{args:?} hangs on a closed pipe");
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    (status.success(), err)
}

#[test]
fn output_through_a_closed_pipe_ends_quietly() {
    let mut env = MxEnv::new();
    let mut server = env.start();
    // A message far larger than a pipe's buffer, and many queue lines.
    let mut big = message("big");
    big.extend(
        std::iter::repeat_n(b"0123456789abcdef0123456789abcdef\r\n".as_slice(), 20_000).flatten(),
    );
    let id = smtp_send(&env.addr(), SENDER, &["bob@example.com"], &big);
    for i in 0..30 {
        send(&env, &format!("line {i}"));
    }
    for stopped in [false, true] {
        if stopped {
            crate::harness::stop_server(&mut server);
        }
        for args in [
            vec!["show", id.as_str(), "--body"],
            vec!["queue"],
            vec!["queue", "--json"],
        ] {
            let (ok, err) = read_one_line_and_close(&env, None, &args);
            assert!(
                err.is_empty(),
                "{args:?} (stopped {stopped}) printed: {err}"
            );
            assert!(ok, "{args:?} (stopped {stopped}) failed");
        }
    }
    let archive = env.dir.path().join("big.tar");
    check_ok(
        "export",
        &mxspool_on(
            &env,
            &spool_dir(&env),
            &["export", "example.com", "-o", archive.to_str().unwrap()],
        ),
    );
    let mut child = Command::new(crate::harness::spool_tools())
        .arg(&archive)
        .args(["cat", &id])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.stderr.is_empty(), "spool-tools: {}", text(&out.stderr));
}

// ---------------------------------------------------------------------------------------
// 9. SIGTERM with open sessions; connect/disconnect lines

#[test]
fn sigterm_answers_idle_sessions_and_lets_data_finish() {
    let env = MxEnv::new();
    let cfg = fs::read_to_string(&env.config).unwrap();
    let cfg = cfg.replacen("[smtp]\n", "[smtp]\ncommand_timeout = \"20s\"\n", 1);
    fs::write(&env.config, cfg).unwrap();
    // The default log level: no RUST_LOG.
    let log = env.dir.path().join("term.log");
    let child = Command::new(BIN)
        .arg("--config")
        .arg(&env.config)
        .arg("serve")
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let mut server = Server {
        child,
        log,
        addr: env.addr(),
    };
    assert!(wait_for(
        Duration::from_secs(20),
        Duration::from_millis(50),
        || { TcpStream::connect(env.addr()).is_ok() }
    ));

    let (mut idle, _) = Smtp::connect(&env.addr()).unwrap();
    idle.cmd("EHLO idle.test").unwrap();
    let (mut busy, _) = Smtp::connect(&env.addr()).unwrap();
    busy.cmd("EHLO busy.test").unwrap();
    busy.cmd(&format!("MAIL FROM:<{SENDER}>")).unwrap();
    busy.cmd("RCPT TO:<bob@example.com>").unwrap();
    assert_eq!(busy.cmd("DATA").unwrap().code, 354);
    let mut raw = TcpStream::connect(env.addr()).unwrap();
    raw.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let _ = raw.read(&mut [0u8; 512]);
    busy_write(&mut busy, b"Subject: in flight\r\n\r\nfirst half\r\n");

    let started = Instant::now();
    signal(&server, libc::SIGTERM);
    let r = idle.reply().unwrap();
    assert_eq!(r.code, 421, "idle session: {r}");
    assert!(r.to_string().contains("4.3.2"), "{r}");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "421 took {:?}",
        started.elapsed()
    );
    let mut buf = [0u8; 512];
    let n = raw.read(&mut buf).unwrap_or(0);
    assert!(
        text(&buf[..n]).starts_with("421 4.3.2"),
        "{}",
        text(&buf[..n])
    );

    // The message in DATA finishes and is acknowledged; then the session is closed.
    std::thread::sleep(Duration::from_millis(500));
    busy_write(&mut busy, b"second half\r\n.\r\n");
    let r = busy.reply().unwrap();
    assert_eq!(r.code, 250, "the message in DATA: {r}");
    let id = r.to_string().rsplit(' ').next().unwrap().to_string();
    let bye = busy.cmd("NOOP");
    assert!(
        bye.map(|r| r.code == 421).unwrap_or(true),
        "after DATA, shutting down"
    );
    let deadline = Instant::now() + Duration::from_secs(15);
    while server.child.try_wait().unwrap().is_none() {
        assert!(
            Instant::now() < deadline,
            "server did not exit:\n{}",
            server.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let log = server.log();
    assert!(log.contains("connect from unknown[127.0.0.1]"), "{log}");
    assert!(
        log.contains("disconnect from unknown[127.0.0.1] ehlo=1 mail=1 rcpt=1 data=1"),
        "{log}"
    );
    assert!(
        log.contains("disconnect from unknown[127.0.0.1] ehlo=1 commands=1"),
        "{log}"
    );
    assert!(
        env.queue(None).iter().any(|e| e.id == id),
        "the message is queued"
    );
}

fn busy_write(c: &mut Smtp, bytes: &[u8]) {
    c.send_raw(bytes).expect("write to the session in DATA");
}
