//! Draining a backlog into real primaries with their own limits: Exim
//! (`smtp_accept_max_per_connection`, `recipients_max`), OpenSMTPD (`max-mails`,
//! `max-rcpt`), Postfix (`smtpd_recipient_limit`) and a scriptable aiosmtpd (421, 452 or a
//! plain close at its cap of messages per session, 421 after the dot, a greeting that never
//! comes). The backlog is queued while the primary is down; once it answers, every message
//! must arrive exactly once per recipient, byte for byte, within seconds, and the queue
//! must be empty with nothing deferred by an hour.

use std::collections::HashMap;
use std::fs;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use crate::harness::*;
use crate::peers::*;

const DOMAIN: &str = "partner.test";

/// One message of the backlog: its tag (in an `X-Backlog:` header), recipients and bytes.
struct Sent {
    tag: String,
    rcpts: Vec<String>,
    bytes: Vec<u8>,
}

/// A backup MX whose partner's primary is `primary` (down while the backlog is queued).
struct Backlog {
    env: MxEnv,
    server: Server,
    sent: Vec<Sent>,
    /// The server log's length when the primary came up.
    log_mark: usize,
}

/// `n` messages, every tenth with 150 recipients (the rest with one), queued and tried once
/// (connection refused) while nothing listens at `primary`.
fn queue_backlog(primary: &str, n: usize, extra: &str) -> Backlog {
    let mut env = MxEnv::custom(&format!(
        "[queue]\nretry_interval = \"1h\"\nmax_connections_per_domain = 4\n\n\
         [delivery]\nconnect_timeout = \"2s\"\n{extra}\n\
         [[partner]]\ndomain = \"{DOMAIN}\"\nroute = [\"{primary}\"]\n"
    ));
    let server = env.start();
    let mut sent = Vec::with_capacity(n);
    for i in 0..n {
        let count = if i % 10 == 0 { 150 } else { 1 };
        let rcpts: Vec<String> = (0..count).map(|r| format!("u{i}r{r}@{DOMAIN}")).collect();
        let tag = format!("b{i:04}");
        let bytes = format!(
            "From: <s@sender.test>\r\nTo: <u{i}@{DOMAIN}>\r\nSubject: backlog {i}\r\n\
             Date: Tue, 01 Dec 2026 20:00:00 +0000\r\n\
             Message-ID: <{tag}@sender.test>\r\nX-Backlog: {tag}\r\n\r\n\
             Message {i} of the backlog.\r\n..a line that starts with a dot\r\n{}\r\n",
            "x".repeat(200 + i % 500)
        )
        .into_bytes();
        sent.push(Sent { tag, rcpts, bytes });
    }
    // Four clients at once, as several senders would.
    std::thread::scope(|s| {
        for part in sent.chunks(n.div_ceil(4)) {
            let addr = env.addr();
            s.spawn(move || send_over_one_session(&addr, part));
        }
    });
    let tried = wait_for(Duration::from_secs(60), Duration::from_millis(200), || {
        let q = env.queue(Some(DOMAIN));
        q.len() == n && q.iter().all(|e| e.attempts >= 1)
    });
    assert!(
        tried,
        "the backlog was not queued and tried: {} entries\n{}",
        env.queue(Some(DOMAIN)).len(),
        tail(&server.log())
    );
    let log_mark = server.log().len();
    Backlog {
        env,
        server,
        sent,
        log_mark,
    }
}

fn send_over_one_session(addr: &str, msgs: &[Sent]) {
    let (mut c, banner) = Smtp::connect(addr).unwrap();
    assert_eq!(banner.code, 220);
    assert_eq!(c.cmd("EHLO client.sender.test").unwrap().code, 250);
    for m in msgs {
        assert_eq!(c.cmd("MAIL FROM:<s@sender.test>").unwrap().code, 250);
        for r in &m.rcpts {
            let reply = c.cmd(&format!("RCPT TO:<{r}>")).unwrap();
            assert_eq!(reply.code, 250, "{reply}");
        }
        let r = c.data(&m.bytes).unwrap().expect("DATA accepted");
        assert_eq!(r.code, 250, "{r}");
    }
    let _ = c.cmd("QUIT");
}

fn tail(log: &str) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

fn sha(b: &[u8]) -> String {
    format!("{:x}", Sha256::digest(b))
}

fn tag_of(data: &[u8]) -> Option<String> {
    let text = String::from_utf8_lossy(data);
    text.lines()
        .find_map(|l| l.strip_prefix("X-Backlog: "))
        .map(|t| t.trim_end().to_string())
}

/// Every recipient of every message exactly once, each copy ending in the original bytes
/// under mxspool's own `Received:` header; the queue empty; no deferral since `log_mark`.
fn check_drained(b: &Backlog, delivered: &[Delivered]) {
    assert!(
        !delivered.is_empty(),
        "nothing delivered\n{}",
        tail(&b.server.log())
    );
    let mut seen: HashMap<(String, String), usize> = HashMap::new();
    let by_tag: HashMap<&str, &Sent> = b.sent.iter().map(|s| (s.tag.as_str(), s)).collect();
    for d in delivered {
        let tag = tag_of(&d.data).unwrap_or_else(|| {
            panic!(
                "a delivered message without X-Backlog: {:?}",
                String::from_utf8_lossy(&d.data[..d.data.len().min(300)])
            )
        });
        let sent = by_tag[tag.as_str()];
        assert!(
            d.data.starts_with(b"Received: from client.sender.test"),
            "{tag}: mxspool's Received: is not on top"
        );
        assert_eq!(
            sha(&d.data[d.data.len() - sent.bytes.len()..]),
            sha(&sent.bytes),
            "{tag}: the delivered bytes differ from what was sent"
        );
        for r in &d.recipients {
            *seen.entry((tag.clone(), r.clone())).or_insert(0) += 1;
        }
    }
    let mut missing = Vec::new();
    for s in &b.sent {
        for r in &s.rcpts {
            match seen.get(&(s.tag.clone(), r.clone())) {
                Some(1) => {}
                Some(n) => panic!("{} to {r} delivered {n} times", s.tag),
                None => missing.push(format!("{}/{r}", s.tag)),
            }
        }
    }
    assert!(
        missing.is_empty(),
        "{} recipient(s) never delivered, e.g. {:?}\n{}",
        missing.len(),
        &missing[..missing.len().min(5)],
        tail(&b.server.log())
    );
    let left = b.env.queue(Some(DOMAIN));
    assert!(left.is_empty(), "still queued: {left:?}");
    let after = &b.server.log()[b.log_mark..];
    assert!(
        !after.contains("status=deferred"),
        "something was deferred while the primary answered:\n{}",
        after
            .lines()
            .filter(|l| l.contains("status=deferred"))
            .take(5)
            .collect::<Vec<_>>()
            .join("\n")
    );
}

/// `flush DOMAIN` drains the backlog: exit 0, nothing left, within `limit`.
fn flush_drains(b: &Backlog, primary: &dyn Primary, limit: Duration) {
    let started = Instant::now();
    let out = b.env.mxspool(&["flush", DOMAIN]);
    let took = started.elapsed();
    assert!(
        out.status.success(),
        "flush failed: {}{}\n{}",
        text(&out.stdout),
        text(&out.stderr),
        tail(&b.server.log())
    );
    assert!(
        text(&out.stdout).contains("none left"),
        "{}",
        text(&out.stdout)
    );
    assert!(took < limit, "the drain took {took:?}");
    // The primary may store what it accepted a little later (OpenSMTPD delivers each copy to
    // its Maildir after the 250; on a loaded machine that can take a minute or more).
    let total: usize = b.sent.iter().map(|s| s.rcpts.len()).sum();
    wait_for(Duration::from_secs(180), Duration::from_millis(100), || {
        primary
            .messages()
            .iter()
            .map(|d| d.recipients.len())
            .sum::<usize>()
            >= total
    });
    check_drained(b, &primary.messages());
    eprintln!(
        "drained {} messages in {took:?} over {} session(s)",
        b.sent.len(),
        primary.sessions()
    );
}

#[test]
fn aiosmtpd_421_after_20_messages_and_100_recipients() {
    let port = free_port_at("127.0.0.51");
    let b = queue_backlog(&format!("127.0.0.51:{port}"), 500, "");
    let p = AioSmtpd::start("127.0.0.51", port, AioOptions::limits(CAPS));
    flush_drains(&b, &p, Duration::from_secs(60));
    assert!(p.sessions() >= 500 / 20, "sessions: {}", p.sessions());
}

#[test]
fn aiosmtpd_that_just_closes_at_its_cap_drains_after_a_fresh_success() {
    let port = free_port_at("127.0.0.52");
    let b = queue_backlog(&format!("127.0.0.52:{port}"), 300, "");
    let p = AioSmtpd::start(
        "127.0.0.52",
        port,
        AioOptions {
            limits: CAPS,
            cap_action: CapAction::Close,
            ..AioOptions::default()
        },
    );
    // No flush: one new message goes out at once, and the backlog follows it.
    let fresh = b"From: <s@sender.test>\r\nSubject: fresh\r\nX-Backlog: fresh\r\n\r\nnew\r\n";
    smtp_send(
        &b.env.addr(),
        "s@sender.test",
        &[&format!("new@{DOMAIN}")],
        fresh,
    );
    let total = b.sent.len() + 1;
    assert!(
        p.wait_for_count(total + 30, Duration::from_secs(60))
            || wait_for(Duration::from_secs(5), Duration::from_millis(100), || b
                .env
                .queue(Some(DOMAIN))
                .is_empty()),
        "the backlog did not follow the fresh message: {} delivered\n{}",
        p.messages().len(),
        tail(&b.server.log())
    );
    assert!(wait_for(
        Duration::from_secs(10),
        Duration::from_millis(100),
        || b.env.queue(Some(DOMAIN)).is_empty()
    ));
    let delivered: Vec<Delivered> = p
        .messages()
        .into_iter()
        .filter(|d| tag_of(&d.data).as_deref() != Some("fresh"))
        .collect();
    check_drained(&b, &delivered);
}

#[test]
fn aiosmtpd_452_at_its_cap_and_421_after_the_dot() {
    for opts in [
        AioOptions {
            limits: Limits::messages(20),
            cap_action: CapAction::Reply452,
            ..AioOptions::default()
        },
        AioOptions {
            data_421_after: Some(15),
            ..AioOptions::default()
        },
    ] {
        let port = free_port_at("127.0.0.53");
        let b = queue_backlog(&format!("127.0.0.53:{port}"), 200, "");
        let p = AioSmtpd::start("127.0.0.53", port, opts.clone());
        flush_drains(&b, &p, Duration::from_secs(60));
    }
}

/// The session and recipient caps of the tests: 20 messages, 100 recipients (RFC 5321's
/// minimum).
const CAPS: Limits = Limits {
    messages_per_session: Some(20),
    rcpts_per_message: Some(100),
};

/// A 500-message backlog for a primary at `ip` that `start` brings up with [`CAPS`], drained
/// by a flush.
fn capped_primary_drains<P: Primary>(ip: &str, start: impl FnOnce(&str, u16, Limits) -> P) {
    let port = free_port_at(ip);
    let b = queue_backlog(&format!("{ip}:{port}"), 500, "");
    let p = start(ip, port, CAPS);
    flush_drains(&b, &p, Duration::from_secs(120));
}

#[test]
fn exim_caps_messages_per_connection_and_recipients() {
    capped_primary_drains("127.0.0.54", Exim::start);
}

#[test]
fn opensmtpd_caps_messages_per_session_and_recipients() {
    capped_primary_drains("127.0.0.55", OpenSmtpd::start);
}

#[test]
fn postfix_recipient_limit() {
    let port = free_port_at("127.0.0.56");
    let b = queue_backlog(&format!("127.0.0.56:{port}"), 500, "");
    let mailbase = public_tempdir("mxspool-drain-maildir.");
    check_ok(
        "chown nobody",
        &run(
            Command::new("chown")
                .arg("nobody:nogroup")
                .arg(mailbase.path()),
            10,
        ),
    );
    let _pf = Postfix::start(
        &format!(
            "mynetworks = 127.0.0.0/8\n\
             smtpd_recipient_restrictions = permit_mynetworks, reject\n\
             smtpd_recipient_limit = 100\n\
             virtual_mailbox_domains = {DOMAIN}\n\
             virtual_mailbox_base = {base}\n\
             virtual_mailbox_maps = static:mail/\n\
             virtual_uid_maps = static:65534\n\
             virtual_gid_maps = static:65534\n\
             virtual_transport = virtual\n\
             virtual_destination_recipient_limit = 1\n",
            base = mailbase.path().display()
        ),
        &format!(
            "127.0.0.56:{port} inet n - n - - smtpd\n\
             virtual   unix  -       n       n       -       -       virtual\n"
        ),
    );
    let started = Instant::now();
    let out = b.env.mxspool(&["flush", DOMAIN]);
    assert!(
        out.status.success(),
        "{}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    let total: usize = b.sent.iter().map(|s| s.rcpts.len()).sum();
    let maildir = mailbase.path().join("mail");
    let arrived = wait_for(Duration::from_secs(120), Duration::from_millis(200), || {
        count_files(&maildir.join("new")) >= total
    });
    assert!(
        arrived,
        "{} of {total} copies in the Maildir",
        count_files(&maildir.join("new"))
    );
    eprintln!("postfix: {total} copies in {:?}", started.elapsed());
    // One file per recipient (Delivered-To:), Postfix's headers on top, LF line ends.
    let mut delivered = Vec::new();
    for f in fs::read_dir(maildir.join("new")).unwrap() {
        let raw = fs::read(f.unwrap().path()).unwrap();
        let text = String::from_utf8(raw).unwrap();
        let rcpt = text
            .lines()
            .find_map(|l| l.strip_prefix("Delivered-To: "))
            .unwrap()
            .to_string();
        let at = text.find("Received: from client.sender.test").unwrap();
        let data = text[at..].replace('\n', "\r\n").into_bytes();
        delivered.push(Delivered {
            sender: String::new(),
            recipients: vec![rcpt],
            data,
        });
    }
    check_drained(&b, &delivered);
}

fn count_files(dir: &Path) -> usize {
    fs::read_dir(dir).map(|d| d.count()).unwrap_or(0)
}

#[test]
fn a_greeting_that_never_comes_is_a_timeout_and_the_next_host_takes_the_mail() {
    let (p1, p2) = (free_port_at("127.0.0.57"), free_port_at("127.0.0.58"));
    // Two next hops; the first greets never.
    let mut env = MxEnv::custom(&format!(
        "[queue]\nretry_interval = \"1h\"\n\n[delivery]\nconnect_timeout = \"2s\"\nhelo_timeout = \"2s\"\n\n\
         [[partner]]\ndomain = \"{DOMAIN}\"\nroute = [\"127.0.0.57:{p1}\", \"127.0.0.58:{p2}\"]\n"
    ));
    let _silent = AioSmtpd::start(
        "127.0.0.57",
        p1,
        AioOptions {
            no_greeting: true,
            ..AioOptions::default()
        },
    );
    let server = env.start();
    env.mxspool(&["hold", DOMAIN]);
    smtp_send(
        &env.addr(),
        "s@sender.test",
        &[&format!("a@{DOMAIN}")],
        b"Subject: x\r\nX-Backlog: g\r\n\r\nbody\r\n",
    );
    // flush -v tells each step: the connection, the wait, the timeout, the next host.
    let good = AioSmtpd::start("127.0.0.58", p2, AioOptions::default());
    let out = env.mxspool(&["flush", DOMAIN, "-v"]);
    let t = text(&out.stdout);
    assert!(out.status.success(), "{t}{}", text(&out.stderr));
    for want in [
        &format!("connecting to 127.0.0.57[127.0.0.57]:{p1}"),
        "waiting for the greeting",
        "timeout waiting for greeting",
        &format!("connecting to 127.0.0.58[127.0.0.58]:{p2}"),
        "<<< 220 ",
        ">>> MAIL FROM:<s@sender.test>",
        "<<< 250",
    ] {
        assert!(t.contains(want), "flush -v lacks {want:?}:\n{t}");
    }
    assert_eq!(good.messages().len(), 1);
    drop(server);
}

#[test]
fn a_primary_that_always_ends_the_session_is_a_deferral_not_a_loop() {
    // 421 at the end of every DATA, from the first message on: two new sessions carry
    // nothing, then the batch is deferred (one attempt each), not retried in a loop.
    let port = free_port_at("127.0.0.59");
    let b = queue_backlog(&format!("127.0.0.59:{port}"), 20, "");
    let p = AioSmtpd::start(
        "127.0.0.59",
        port,
        AioOptions {
            data_421_after: Some(0),
            ..AioOptions::default()
        },
    );
    let out = b.env.mxspool(&["flush", DOMAIN]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stdout));
    let t = text(&out.stdout);
    assert!(t.contains("20 still queued"), "{t}");
    assert!(t.contains("421"), "flush names the reason:\n{t}");
    // At most two sessions for each of the flush's connections.
    assert!(p.sessions() <= 8, "sessions: {}", p.sessions());
    let q = b.env.queue(Some(DOMAIN));
    assert_eq!(q.len(), 20);
    assert!(q.iter().all(|e| e.attempts == 2), "{q:?}");
}

/// Fills the file system of `dir` with `dir/filler` until a write fails (ENOSPC).
fn fill(dir: &Path) -> std::path::PathBuf {
    use std::io::Write;
    let path = dir.join("filler");
    let mut f = fs::File::create(&path).unwrap();
    let block = vec![0u8; 1 << 16];
    while f.write_all(&block).is_ok() {}
    let _ = f.sync_all();
    path
}

#[test]
fn a_spool_that_cannot_record_stops_delivery_instead_of_repeating_it() {
    let port = free_port_at("127.0.0.60");
    let mut env = MxEnv::custom(&format!(
        "[queue]\nretry_interval = \"1h\"\nmin_free_space = \"128MiB\"\n\n\
         [delivery]\nconnect_timeout = \"2s\"\n\n\
         [[partner]]\ndomain = \"{DOMAIN}\"\nroute = [\"127.0.0.60:{port}\"]\n"
    ));
    let spool = spool_dir(&env);
    let _fs = Tmpfs::mount(&spool, "160m");
    let server = env.start();
    let n = 100;
    let mut sent = Vec::new();
    for i in 0..n {
        let tag = format!("f{i:03}");
        let bytes = format!(
            "From: <s@sender.test>\r\nSubject: full {i}\r\nX-Backlog: {tag}\r\n\r\n{}\r\n",
            format!("{}\r\n", "y".repeat(98)).repeat(20)
        )
        .into_bytes();
        sent.push(Sent {
            tag,
            rcpts: vec![format!("u{i}@{DOMAIN}")],
            bytes,
        });
    }
    send_over_one_session(&env.addr(), &sent);
    assert!(wait_for(
        Duration::from_secs(30),
        Duration::from_millis(200),
        || env.queue(Some(DOMAIN)).iter().all(|e| e.attempts >= 1)
    ));

    // The disk fills up; then the primary answers and the queue is flushed.
    let filler = fill(&spool);
    let p = AioSmtpd::start("127.0.0.60", port, AioOptions::default());
    let out = env.mxspool(&["flush", DOMAIN]);
    let t = text(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{t}{}", text(&out.stderr));
    assert!(t.contains("still queued"), "{t}");
    assert!(
        t.contains("delivery is paused: the spool cannot record outcomes"),
        "{t}"
    );
    // Nothing goes out twice, however long the spool stays full: no repeat storm.
    std::thread::sleep(Duration::from_secs(4));
    let count = |p: &AioSmtpd| {
        let mut per: HashMap<String, usize> = HashMap::new();
        for d in p.messages() {
            *per.entry(tag_of(&d.data).unwrap()).or_insert(0) += 1;
        }
        per
    };
    let during = count(&p);
    assert!(
        during.values().all(|&c| c == 1),
        "a message went out twice while the spool was full: {during:?}"
    );
    let log = server.log();
    assert_eq!(
        log.matches("the spool cannot record delivery outcomes")
            .count(),
        1,
        "one log line for the condition, not one per message:\n{}",
        tail(&log)
    );
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        count(&p).len(),
        during.len(),
        "deliveries went on while paused"
    );

    // Space comes back (RocksDB takes writes again once 64 MiB are free): what was
    // delivered is recorded, the rest goes out, without a restart; each message once.
    fs::remove_file(&filler).unwrap();
    let resumed = wait_for(Duration::from_secs(30), Duration::from_millis(200), || {
        env.queue(Some(DOMAIN)).is_empty()
    });
    assert!(
        resumed,
        "delivery did not resume once space came back:\n{}",
        tail(&server.log())
    );
    assert!(
        server.log().contains("the spool records again"),
        "{}",
        tail(&server.log())
    );
    let after = count(&p);
    assert_eq!(after.len(), n, "every message delivered");
    for (tag, c) in &after {
        assert_eq!(*c, 1, "{tag} delivered {c} times");
    }
    // And new mail is taken (and delivered) again.
    smtp_send(
        &env.addr(),
        "s@sender.test",
        &[&format!("late@{DOMAIN}")],
        b"Subject: after\r\nX-Backlog: after\r\n\r\nafter the fault\r\n",
    );
    assert!(p.wait_for_count(n + 1, Duration::from_secs(20)));
    drop(server);
}
