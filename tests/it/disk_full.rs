//! A spool whose file system fills up with mail: clients get `452 4.3.1` (at MAIL, or after
//! DATA for a message without SIZE) while `min_free_space` is still free for RocksDB, so no
//! commit ever fails; `delete --domain` gives the space back at once, and mail is taken
//! again without a restart. A `min_free_space` below what RocksDB needs is refused. `import`
//! stops at the same floor, and a second run adds the rest, nothing twice.

use std::time::Duration;

use crate::harness::*;
use crate::receiver::{Behaviour, Receiver};

/// Bytes free on the file system of `dir` (`df`'s available).
fn free_mib(dir: &std::path::Path) -> u64 {
    let out = run(
        std::process::Command::new("df")
            .args(["--output=avail", "-B1M"])
            .arg(dir),
        10,
    );
    check_ok("df", &out);
    text(&out.stdout)
        .lines()
        .nth(1)
        .and_then(|l| l.trim().parse().ok())
        .expect("df's figure")
}

/// Sends one message of `body` to `rcpt`, declaring SIZE or not; the final reply code (the
/// MAIL reply's when MAIL is refused).
fn send(addr: &str, rcpt: &str, body: &[u8], declare: bool) -> u16 {
    let (mut c, _) = Smtp::connect(addr).expect("connect");
    c.cmd("EHLO client.test").unwrap();
    let mail = if declare {
        format!("MAIL FROM:<alice@sender.test> SIZE={}", body.len())
    } else {
        "MAIL FROM:<alice@sender.test>".to_string()
    };
    let r = c.cmd(&mail).unwrap();
    if r.code != 250 {
        return r.code;
    }
    assert_eq!(c.cmd(&format!("RCPT TO:<{rcpt}>")).unwrap().code, 250);
    let code = match c.data(body).unwrap() {
        Ok(r) | Err(r) => r.code,
    };
    let _ = c.cmd("QUIT");
    code
}

/// A message of 1 MiB that does not compress (the spool compresses with LZ4):
/// pseudo-random letters in lines of 998.
fn incompressible_mib(subject: &str) -> Vec<u8> {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut body = format!("Subject: {subject}\r\n\r\n").into_bytes();
    for _ in 0..(1 << 10) {
        for _ in 0..998 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            body.push(b'A' + (x % 58) as u8 % 26 + if x & 64 == 0 { 0 } else { 32 });
        }
        body.extend_from_slice(b"\r\n");
    }
    body
}

/// A backup MX keeping 128 MiB free (`min_free_space`, the least allowed); `extra` is
/// appended to its configuration.
fn floor_env(extra: &str) -> MxEnv {
    let env = MxEnv::with_config(extra);
    let config = std::fs::read_to_string(&env.config)
        .unwrap()
        .replace("[queue]\n", "[queue]\nmin_free_space = \"128MiB\"\n");
    std::fs::write(&env.config, config).unwrap();
    env
}

/// Sends 1 MiB messages (`SIZE=` declared) to `u{i}@` each of `domains` in turn until the
/// first `452`; how many each domain got accepted.
fn fill_until_refused(env: &MxEnv, server: &Server, domains: &[&str], body: &[u8]) -> Vec<usize> {
    let mut accepted = vec![0usize; domains.len()];
    for i in 0..400 {
        let d = i % domains.len();
        match send(&env.addr(), &format!("u{i}@{}", domains[d]), body, true) {
            250 => accepted[d] += 1,
            452 => break,
            other => panic!("message {i}: {other}\n{}", server.log()),
        }
    }
    accepted
}

/// `mxspool delete --domain DOMAIN`, which must succeed (else the server's log is shown).
fn delete_domain(env: &MxEnv, server: &Server, domain: &str) -> std::process::Output {
    let out = env.mxspool(&["delete", "--domain", domain]);
    assert!(
        out.status.success(),
        "delete --domain on a full disk: {}{}\n{}",
        text(&out.stdout),
        text(&out.stderr),
        server.log()
    );
    out
}

#[test]
fn a_full_disk_refuses_mail_before_any_commit_fails_and_delete_gives_the_space_back() {
    let mut env = floor_env("");
    let spool = spool_dir(&env);
    let _fs = Tmpfs::mount(&spool, "320m");
    let mut server = env.start();

    let body = incompressible_mib("fill");
    let (mut accepted, mut refused_mail, mut refused_data) = (0, 0, 0);
    // Half the messages declare their size, half do not: both are stopped in time.
    for i in 0..400 {
        match send(&env.addr(), &format!("u{i}@example.com"), &body, i % 2 == 0) {
            250 => accepted += 1,
            452 if i % 2 == 0 => refused_mail += 1,
            452 => refused_data += 1,
            other => panic!("message {i}: {other}\n{}", server.log()),
        }
        if refused_mail >= 3 && refused_data >= 3 {
            break;
        }
    }
    eprintln!(
        "accepted {accepted}, refused at MAIL {refused_mail}, after DATA {refused_data}, {} MiB free",
        free_mib(&spool)
    );
    assert!(accepted > 50, "accepted only {accepted}");
    assert!(refused_mail >= 3 && refused_data >= 3);
    let log = server.log();
    assert!(
        !log.contains("spool commit of"),
        "a commit failed before mail was refused:\n{log}"
    );
    // A memtable flush under way uses the headroom the floor keeps (its table files are
    // written before the log they replace is removed); once it is over, the floor is there.
    let mut settled = 0;
    assert!(
        wait_for(Duration::from_secs(20), Duration::from_millis(200), || {
            settled = free_mib(&spool);
            settled >= 120
        }),
        "the floor was not kept: {settled} MiB free once the spool settled"
    );
    assert_eq!(env.queue(None).len(), accepted);

    // The administrator deletes the domain's mail: the space comes back now, not after a
    // restart or some compaction later.
    let before = free_mib(&spool);
    let out = delete_domain(&env, &server, "example.com");
    assert!(
        text(&out.stdout).contains("space given back"),
        "{}",
        text(&out.stdout)
    );
    let after = free_mib(&spool);
    eprintln!("delete --domain: {before} MiB free before, {after} MiB after");
    assert!(
        after >= before + accepted as u64 / 2,
        "{accepted} MiB deleted, free went from {before} to {after} MiB\n{}",
        server.log()
    );
    // And mail is taken again, without a restart.
    assert!(wait_for(
        Duration::from_secs(5),
        Duration::from_millis(200),
        || { send(&env.addr(), "again@example.com", &body, true) == 250 }
    ));
    assert!(stop_server(&mut server));
}

#[test]
fn a_min_free_space_below_what_rocksdb_needs_is_refused() {
    let env = MxEnv::with_config("");
    let config = std::fs::read_to_string(&env.config)
        .unwrap()
        .replace("[queue]\n", "[queue]\nmin_free_space = \"10MiB\"\n");
    std::fs::write(&env.config, config).unwrap();
    let out = env.mxspool(&["check-config"]);
    let err = assert_clean_failure("check-config", &out);
    assert!(
        err.contains("min_free_space") && err.contains("128 MiB"),
        "{err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "{err}");
}

/// Resizes the tmpfs mounted at `dir`.
fn resize(dir: &std::path::Path, size: &str) {
    check_ok(
        "remount tmpfs",
        &run(
            std::process::Command::new("mount")
                .args(["-o", &format!("remount,size={size}")])
                .arg(dir),
            30,
        ),
    );
}

/// Two partners' mail side by side fills the disk, so every file of the spool holds some
/// of each. Deleting one partner's mail gives its space back all the same (garbage
/// collection in rounds that fit the free space, never a copy of everything at once),
/// without a failed write, and mail is taken again.
#[test]
fn deleting_one_of_two_domains_on_a_full_disk_gives_its_space_back() {
    let mut env = floor_env("[[partner]]\ndomain = \"example.org\"\nroute = [\"127.0.0.1:1\"]\n");
    let spool = spool_dir(&env);
    let _fs = Tmpfs::mount(&spool, "320m");
    let server = env.start();
    let body = incompressible_mib("two domains");
    let accepted = fill_until_refused(&env, &server, &["example.com", "example.org"], &body);
    assert!(
        accepted[0] > 40 && accepted[1] > 40,
        "accepted {accepted:?}"
    );

    let before = free_mib(&spool);
    delete_domain(&env, &server, "example.com");
    let after = free_mib(&spool);
    eprintln!(
        "accepted {accepted:?}; delete --domain example.com: {before} MiB free before, {after} MiB after"
    );
    let log = server.log();
    for line in log.lines().filter(|l| l.contains("space given back")) {
        eprintln!("{line}");
    }
    assert!(
        after >= before + accepted[0] as u64 * 3 / 4,
        "{} MiB deleted, free went from {before} to {after} MiB\n{log}",
        accepted[0]
    );
    assert!(!log.contains("spool commit of"), "a write failed:\n{log}");
    assert!(env.queue(Some("example.com")).is_empty());
    assert_eq!(env.queue(Some("example.org")).len(), accepted[1]);
    assert!(
        wait_for(Duration::from_secs(5), Duration::from_millis(200), || {
            send(&env.addr(), "again@example.org", &body, true) == 250
        }),
        "{}",
        server.log()
    );
}

/// The primary comes back after the disk filled: delivered mail gives its space back by
/// itself (the background reclaim, which also goes on for mail delivered while it ran),
/// and mail is taken again.
#[test]
fn delivered_mail_gives_its_space_back_by_itself() {
    let primary = Receiver::start("127.0.0.1:0".parse().unwrap(), Behaviour::TempFailAll);
    let mut env = floor_env("");
    let config = std::fs::read_to_string(&env.config)
        .unwrap()
        .replace("127.0.0.1:1", &primary.addr().to_string());
    std::fs::write(&env.config, config).unwrap();
    let spool = spool_dir(&env);
    let _fs = Tmpfs::mount(&spool, "320m");
    let server = env.start();
    let body = incompressible_mib("delivered");
    let accepted = fill_until_refused(&env, &server, &["example.com"], &body)[0];
    assert!(accepted > 50, "accepted only {accepted}");
    let before = free_mib(&spool);

    primary.set_behaviour(Behaviour::Accept);
    check_ok("flush", &env.mxspool(&["flush", "example.com"]));
    let mut free = before;
    let back = wait_for(Duration::from_secs(60), Duration::from_millis(250), || {
        free = free_mib(&spool);
        env.queue(None).is_empty() && free >= before + accepted as u64 * 3 / 4
    });
    eprintln!("{accepted} MiB delivered: {before} MiB free before, {free} MiB after");
    let log = server.log();
    assert!(
        back,
        "{} of {accepted} delivered, free went from {before} to {free} MiB\n{log}",
        primary.messages().len()
    );
    assert_eq!(primary.messages().len(), accepted);
    assert!(log.contains("spool space given back"), "{log}");
    assert!(!log.contains("spool commit of"), "a write failed:\n{log}");
    // Taken again once the server's free-space reading (once a second) sees the room.
    assert!(
        wait_for(Duration::from_secs(5), Duration::from_millis(200), || {
            send(&env.addr(), "again@example.com", &body, true) == 250
        }),
        "{}",
        server.log()
    );
}

#[test]
fn import_stops_at_min_free_space_and_a_second_run_adds_the_rest_once() {
    let mut env = floor_env("");
    let spool = spool_dir(&env);
    let _fs = Tmpfs::mount(&spool, "400m");
    let mut server = env.start();

    // 60 messages of 1 MiB that does not compress, exported, then deleted.
    let body = incompressible_mib("import");
    for i in 0..60 {
        assert_eq!(
            send(&env.addr(), &format!("u{i}@example.com"), &body, true),
            250
        );
    }
    let work = tempfile::tempdir().unwrap();
    let archive = work.path().join("example.com.tar");
    check_ok(
        "export",
        &env.mxspool(&["export", "example.com", "-o", archive.to_str().unwrap()]),
    );
    check_ok(
        "delete --domain",
        &env.mxspool(&["delete", "--domain", "example.com"]),
    );
    assert_eq!(env.queue(None).len(), 0);

    // The spool's file system shrinks to ~30 MiB above the floor: the import stops there,
    // with one line and a non-zero status, and what it imported stays queued.
    let used = 400 - free_mib(&spool);
    resize(&spool, &format!("{}m", used + 128 + 30));
    let out = env.mxspool(&["import", archive.to_str().unwrap()]);
    let err = assert_clean_failure("import onto a nearly full spool", &out);
    assert!(
        err.contains("min_free_space") && err.contains("import again"),
        "{err}"
    );
    let first = env.queue(None).len();
    eprintln!("first import: {first} of 60 before the floor; {err}");
    assert!((5..60).contains(&first), "{first} imported\n{err}");
    assert!(free_mib(&spool) >= 120, "the floor was not kept");
    assert!(
        !server.log().contains("spool commit of"),
        "a commit failed:\n{}",
        server.log()
    );

    // Room again: the same archive adds the rest, and nothing twice.
    resize(&spool, "400m");
    let out = env.mxspool(&["import", archive.to_str().unwrap()]);
    check_ok("second import", &out);
    let said = text(&out.stdout);
    assert!(
        said.contains(&format!("{} message(s) imported", 60 - first))
            && said.contains(&format!("{first} already in the queue")),
        "{said}"
    );
    let queue = env.queue(None);
    assert_eq!(queue.len(), 60);
    let mut ids: Vec<&str> = queue.iter().map(|e| e.id.as_str()).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 60, "a message was imported twice");
    assert!(stop_server(&mut server));
}
