//! A damaged spool: its write-ahead log removed, cut short, or with a bad record in the
//! middle, after mail was acknowledged. `serve` (and the reports) refuse it with one line
//! naming the damage, never start as if nothing had happened; `mxspool recover` keeps what
//! can be read, says what was lost, and the server starts again on what it kept.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::harness::*;

const MESSAGES: usize = 60;

/// Queues `MESSAGES` messages (the partner's primary is down), then kills the server, so
/// everything is in the write-ahead log only (no flush to table files). The ids.
fn fill(env: &mut MxEnv) -> Vec<String> {
    let mut server = env.start();
    let mut ids = Vec::new();
    for i in 0..MESSAGES {
        let msg = format!("Subject: m{i}\r\nMessage-ID: <m{i}@it>\r\n\r\nbody {i}\r\n");
        ids.push(smtp_send(
            &env.addr(),
            "alice@sender.test",
            &[&format!("u{i}@example.com")],
            msg.as_bytes(),
        ));
    }
    server.kill9();
    ids
}

fn logs(spool: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = fs::read_dir(spool)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "log"))
        .collect();
    v.sort();
    assert!(!v.is_empty(), "no write-ahead log in {}", spool.display());
    v
}

/// `serve` on the damaged spool exits by itself, non-zero, with one line naming the damage.
fn assert_serve_refuses(env: &MxEnv) -> String {
    let out = run(
        Command::new(BIN)
            .arg("--config")
            .arg(&env.config)
            .arg("serve"),
        60,
    );
    assert!(!out.status.success(), "serve started on a damaged spool");
    let err = assert_clean_failure("serve on a damaged spool", &out);
    assert!(
        err.contains("is damaged") && err.contains("mxspool recover"),
        "{err}"
    );
    assert!(port_closed(env.port));
    err
}

#[derive(Clone, Copy, Debug)]
enum Damage {
    /// The log files are gone.
    Removed,
    /// The log is cut at half its length.
    Cut,
    /// One byte in the middle of the log is changed.
    Flipped,
}

fn damage(spool: &Path, how: Damage) {
    let log = logs(spool).pop().unwrap();
    match how {
        Damage::Removed => {
            for l in logs(spool) {
                fs::remove_file(l).unwrap();
            }
        }
        Damage::Cut => {
            let len = fs::metadata(&log).unwrap().len();
            let f = fs::OpenOptions::new().write(true).open(&log).unwrap();
            f.set_len(len / 2).unwrap();
        }
        Damage::Flipped => {
            let mut b = fs::read(&log).unwrap();
            let at = b.len() / 3;
            b[at] ^= 0x5a;
            fs::write(&log, b).unwrap();
        }
    }
}

fn recovered(how: Damage) {
    let mut env = MxEnv::new();
    let ids = fill(&mut env);
    let spool = spool_dir(&env);
    damage(&spool, how);

    let err = assert_serve_refuses(&env);
    eprintln!("{how:?}: serve says: {err}");
    // The reports refuse it the same way, rather than list a queue with holes.
    let q = env.mxspool(&["queue", "--json"]);
    assert!(!q.status.success(), "{how:?}: queue listed a damaged spool");
    assert!(
        text(&q.stderr).contains("is damaged"),
        "{}",
        text(&q.stderr)
    );

    let r = env.mxspool(&["recover"]);
    check_ok("mxspool recover", &r);
    let said = text(&r.stdout);
    eprintln!("{how:?}: recover says:\n{said}");
    assert!(said.contains("the spool can be served again"), "{said}");

    let mut server = env.start();
    let queued = env.queue(None);
    let kept: Vec<&str> = queued.iter().map(|e| e.id.as_str()).collect();
    // Nothing invented: every entry kept is one that was acknowledged, whole.
    for e in &queued {
        assert!(ids.contains(&e.id), "{how:?}: {} was never sent", e.id);
        let show = env.show(&e.id).expect("show a kept message");
        let i = ids.iter().position(|x| *x == e.id).unwrap();
        assert!(show.contains(&format!("Subject: m{i}")), "{show}");
    }
    assert!(
        said.contains(&format!("kept {} message(s)", kept.len())),
        "{said}"
    );
    let lost = MESSAGES - kept.len();
    match how {
        // The loss is said, in commits (the records that named the messages are gone).
        Damage::Removed | Damage::Cut => {
            assert!(lost > 0, "{how:?}: nothing lost?");
            assert!(
                said.contains("LOST:") && said.contains("acknowledged commit"),
                "{said}"
            );
        }
        // The bad stretch of the log is skipped (and said to be), the commits after it
        // are kept, not dropped with it.
        Damage::Flipped => {
            assert!(said.contains("damaged records"), "{said}");
            let last = ids.last().unwrap();
            assert!(
                kept.contains(&last.as_str()),
                "{how:?}: later commits dropped"
            );
            assert!(
                kept.len() >= MESSAGES / 2,
                "{how:?}: kept only {}",
                kept.len()
            );
        }
    }
    // New mail is taken again.
    let id = smtp_send(
        &env.addr(),
        "alice@sender.test",
        &["new@example.com"],
        b"Subject: new\r\n\r\nx\r\n",
    );
    assert!(env.queue(None).iter().any(|e| e.id == id));
    assert!(stop_server(&mut server));
}

#[test]
fn a_removed_log_is_refused_then_recovered() {
    recovered(Damage::Removed);
}

#[test]
fn a_cut_log_is_refused_then_recovered() {
    recovered(Damage::Cut);
}

#[test]
fn a_bad_record_in_the_log_is_refused_then_recovered() {
    recovered(Damage::Flipped);
}

/// A crash leaves an incomplete last record; that is normal and the server starts.
#[test]
fn a_crash_is_not_damage() {
    let mut env = MxEnv::new();
    let ids = fill(&mut env);
    let mut server = env.start();
    let queued: Vec<String> = env.queue(None).into_iter().map(|e| e.id).collect();
    assert_eq!(queued.len(), ids.len());
    assert!(stop_server(&mut server));
}

/// Messages big enough that RocksDB flushes them to table and blob files; then the MANIFEST
/// (the list of those files) is cut. RocksDB alone would open the older state it still
/// describes and delete the newer files as obsolete.
#[test]
fn a_cut_manifest_is_refused_and_recovered_naming_every_loss() {
    let mut env = MxEnv::new();
    let mut server = env.start();
    // 1 MiB in lines of 1,000 characters.
    let big = format!("{}\r\n", "x".repeat(998)).repeat(1 << 10);
    let mut ids = Vec::new();
    for i in 0..48 {
        let msg = format!("Subject: big{i}\r\n\r\n{big}\r\n");
        ids.push(smtp_send(
            &env.addr(),
            "alice@sender.test",
            &[&format!("u{i}@example.com")],
            msg.as_bytes(),
        ));
    }
    server.kill9();
    let spool = spool_dir(&env);
    let names: Vec<String> = fs::read_dir(&spool)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        names
            .iter()
            .any(|n| n.ends_with(".sst") || n.ends_with(".blob")),
        "nothing was flushed: {names:?}"
    );
    let manifest = names
        .iter()
        .find(|n| n.starts_with("MANIFEST-"))
        .expect("a MANIFEST");
    let path = spool.join(manifest);
    let len = fs::metadata(&path).unwrap().len();
    fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(len / 2)
        .unwrap();

    // Refused: RocksDB alone would open the older state the cut MANIFEST describes and
    // delete the newer files as obsolete.
    let err = assert_serve_refuses(&env);
    eprintln!("serve says: {err}");
    let r = env.mxspool(&["recover"]);
    let said = text(&r.stdout);
    eprintln!("recover says:\n{said}\n{}", text(&r.stderr));
    check_ok("mxspool recover", &r);
    assert!(
        said.contains("every file as it was before the repair is kept"),
        "{said}"
    );
    let kept_dir = fs::read_dir(spool.join("lost"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("damaged-")
        })
        .expect("the files as they were");
    assert!(kept_dir.join(manifest).is_file());
    let mut server = env.start();
    // Every acknowledged message is either kept whole or named as lost: none goes silently.
    let queued = env.queue(None);
    for e in &queued {
        let show = env.mxspool(&["show", "--body", &e.id]);
        check_ok("show --body", &show);
        assert!(text(&show.stdout).contains(&big[..2000]));
    }
    for id in &ids {
        assert!(
            queued.iter().any(|e| e.id == *id) || said.contains(&format!("LOST: {id} ")),
            "{id} is neither kept nor said to be lost:\n{said}"
        );
    }
    assert!(stop_server(&mut server));
}
