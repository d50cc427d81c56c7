//! A real Postfix as the partner's primary mail server: a private instance whose smtpd
//! listens on 127.0.0.2 and delivers `example.com` into a Maildir (the `virtual` delivery
//! agent). mxspool is the backup MX with `route` pointing at it. While Postfix is down the
//! mail waits in mxspool's queue; when Postfix comes up, it lands in the Maildir.

use std::fs;
use std::path::Path;
use std::time::{Duration, Instant};

use crate::harness::*;

/// uid and gid of a system user (the owner of the Maildir).
fn user_ids(name: &str) -> (u32, u32) {
    let c = std::ffi::CString::new(name).unwrap();
    // SAFETY: getpwnam returns a pointer to static storage or null; read at once.
    let pw = unsafe { libc::getpwnam(c.as_ptr()) };
    assert!(!pw.is_null(), "no user {name}");
    unsafe { ((*pw).pw_uid, (*pw).pw_gid) }
}

/// The files in `dir/new`, each read whole, sorted by name.
fn maildir_new(dir: &Path) -> Vec<String> {
    let mut files: Vec<_> = match fs::read_dir(dir.join("new")) {
        Ok(rd) => rd.filter_map(|e| e.ok()).map(|e| e.path()).collect(),
        Err(_) => return Vec::new(),
    };
    files.sort();
    files
        .iter()
        .filter_map(|p| fs::read(p).ok())
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .collect()
}

fn subject(msg: &str) -> String {
    msg.lines()
        .find_map(|l| l.strip_prefix("Subject: "))
        .unwrap_or("")
        .trim_end()
        .to_string()
}

#[test]
fn postfix_primary_comes_back_and_gets_the_queued_mail() {
    let pf_port = free_port_at("127.0.0.2");
    let mut env = MxEnv::custom(&format!(
        "[queue]\nretry_interval = \"2s\"\n\n[delivery]\nconnect_timeout = \"2s\"\n\n\
         [[partner]]\ndomain = \"example.com\"\nroute = [\"127.0.0.2:{pf_port}\"]\n"
    ));
    let server = env.start();

    // Postfix is down: three messages are queued and tried (connection refused).
    let mut sent = Vec::new();
    for i in 1..=3 {
        let subject = format!("for the primary {i}");
        let msg = format!(
            "From: <alice@sender.test>\r\nTo: <bob{i}@example.com>\r\nSubject: {subject}\r\n\
             Message-ID: <pf{i}@sender.test>\r\n\r\nKept by the backup MX, body {i}.\r\n"
        );
        sent.push((
            "alice@sender.test".to_string(),
            format!("bob{i}@example.com"),
            msg.into_bytes(),
        ));
    }
    let ids = smtp_send_all(&env.addr(), &sent);
    assert_eq!(ids.len(), 3);
    let deferred = wait_for(Duration::from_secs(15), Duration::from_millis(100), || {
        let q = env.queue(None);
        q.len() == 3 && q.iter().all(|e| e.attempts >= 1)
    });
    assert!(
        deferred,
        "the 3 messages were not all queued and tried: {:?}\n--- mxspool log\n{}",
        env.queue(None),
        server.log()
    );
    let q = env.queue(None);
    for e in &q {
        assert!(ids.contains(&e.id), "unknown id {} in {q:?}", e.id);
        assert_eq!(e.domain, "example.com");
        let err = e.last_error.as_deref().unwrap_or("");
        assert!(
            err.contains("127.0.0.2"),
            "last_error does not name the primary: {e:?}"
        );
    }
    assert!(server.log().contains("status=deferred"), "{}", server.log());

    // The primary: Postfix with smtpd on 127.0.0.2:PORT, example.com delivered by `virtual`
    // into MAILBASE/mail/ (a Maildir) as `nobody`.
    let mailbase = public_tempdir("mxspool-maildir.");
    let (uid, gid) = user_ids("nobody");
    check_ok(
        "chown nobody maildir base",
        &run(
            std::process::Command::new("chown")
                .arg(format!("{uid}:{gid}"))
                .arg(mailbase.path()),
            10,
        ),
    );
    let maildir = mailbase.path().join("mail");
    let started = Instant::now();
    let postfix = Postfix::start(
        &format!(
            "mynetworks = 127.0.0.0/8\n\
             smtpd_recipient_restrictions = permit_mynetworks, reject\n\
             virtual_mailbox_domains = example.com\n\
             virtual_mailbox_base = {base}\n\
             virtual_mailbox_maps = static:mail/\n\
             virtual_uid_maps = static:{uid}\n\
             virtual_gid_maps = static:{gid}\n\
             virtual_transport = virtual\n",
            base = mailbase.path().display()
        ),
        &format!(
            "127.0.0.2:{pf_port} inet n - n - - smtpd\n\
             virtual   unix  -       n       n       -       -       virtual\n"
        ),
    );

    let mut got = Vec::new();
    let arrived = wait_for(Duration::from_secs(12), Duration::from_millis(100), || {
        got = maildir_new(&maildir);
        got.len() >= 3
    });
    let took = started.elapsed();
    assert!(
        arrived,
        "after {took:?} the Maildir holds {} of 3 messages\n--- mxspool queue\n{:?}\n\
         --- mxspool log\n{}\n--- postfix log\n{}",
        got.len(),
        env.queue(None),
        server.log(),
        postfix.log()
    );
    eprintln!("3 messages in the Maildir {took:?} after Postfix started");
    assert_eq!(got.len(), 3, "duplicates in the Maildir: {got:#?}");

    let mut subjects: Vec<String> = got.iter().map(|m| subject(m)).collect();
    subjects.sort();
    assert_eq!(
        subjects,
        [
            "for the primary 1",
            "for the primary 2",
            "for the primary 3"
        ]
    );
    for m in &got {
        assert!(
            m.contains("by mx2.test (mxspool)"),
            "no Received: line of mxspool in the delivered message:\n{m}"
        );
        let ours = m
            .lines()
            .position(|l| l.starts_with("Received: from client.test"))
            .unwrap_or_else(|| panic!("no Received: from client.test header:\n{m}"));
        assert!(
            m.lines()
                .nth(ours + 1)
                .unwrap_or("")
                .contains("by mx2.test (mxspool)"),
            "mxspool's Received: header is not ours:\n{m}"
        );
        // Postfix's own Received: header is on top of mxspool's; the body is intact.
        assert!(m.starts_with("Return-Path: <alice@sender.test>"), "{m}");
        assert!(m.contains("\nReceived: from mx2.test"), "{m}");
        assert!(m.contains("Kept by the backup MX, body "), "{m}");
    }

    let emptied = wait_for(Duration::from_secs(5), Duration::from_millis(100), || {
        env.queue(None).is_empty()
    });
    assert!(
        emptied,
        "mxspool's queue is not empty: {:?}",
        env.queue(None)
    );

    let log = server.log();
    for id in &ids {
        let line = log
            .lines()
            .find(|l| l.contains(&format!("{id}: to=<")) && l.contains("status=sent (250"))
            .unwrap_or_else(|| panic!("no status=sent line for {id}:\n{log}"));
        assert!(
            line.contains("relay=") && line.contains(&format!("[127.0.0.2]:{pf_port}")),
            "the sent line does not name the relay 127.0.0.2:{pf_port}: {line}"
        );
    }
    let pflog = postfix.log();
    assert_eq!(
        pflog.matches("status=sent (delivered to maildir)").count(),
        3,
        "postfix log:\n{pflog}"
    );
}
