//! The administrator's queue operations, each against a LIVE server (the command goes
//! through the control socket) and against a STOPPED spool (the command opens the spool
//! itself): `queue`, `shape`, `show`, `hold`/`release`, `flush -v`, `delete`, `bounce`,
//! `--spool`, bad input, and the seed's story (park a partner's mail, move it to another
//! queue directory, deliver it from there with a visible transcript).
//!
//! The partners' primaries are loopback ports where nothing listens (mail stays queued)
//! until a test starts a [`Receiver`] there. `sender.test` is a partner too, routed to a
//! Receiver that is always up, so DSNs to `alice@sender.test` are deliverable.

use std::collections::BTreeSet;
use std::time::Duration;

use chrono::{DateTime, Utc};

use crate::harness::*;
use crate::receiver::{Behaviour, Receiver};

const SENDER: &str = "alice@sender.test";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    /// `mxspool serve` runs; commands reach it through the control socket.
    Live,
    /// The server was stopped (SIGTERM); commands open the spool themselves.
    Stopped,
}

struct Setup {
    env: MxEnv,
    server: Option<Server>,
    /// example.com's primary: PRIMARY_IP:primary, closed until a test starts a Receiver.
    /// (An address no other test uses, so no parallel test can take the port meanwhile.)
    primary: u16,
    /// example.org's primary: never up.
    org: u16,
    /// Where DSNs to sender.test go.
    sender_rx: Receiver,
}

/// Loopback addresses only these tests use for the partners' primaries.
const PRIMARY_IP: &str = "127.0.0.61";
const ORG_IP: &str = "127.0.0.62";

impl Setup {
    fn new(retry: &str) -> Setup {
        let primary = closed_port_at(PRIMARY_IP);
        let org = closed_port_at(ORG_IP);
        let sender_rx = Receiver::start("127.0.0.1:0".parse().unwrap(), Behaviour::Accept);
        let mut env = MxEnv::custom(&format!(
            "[queue]\nretry_interval = \"{retry}\"\n\n\
             [delivery]\nconnect_timeout = \"2s\"\n\n\
             [[partner]]\ndomain = \"example.com\"\nroute = [\"{PRIMARY_IP}:{primary}\"]\n\n\
             [[partner]]\ndomain = \"example.org\"\nroute = [\"{ORG_IP}:{org}\"]\n\n\
             [[partner]]\ndomain = \"sender.test\"\nroute = [\"{}\"]\n",
            sender_rx.addr()
        ));
        let closed = |ip: &str, port: u16| {
            std::net::TcpStream::connect_timeout(
                &format!("{ip}:{port}").parse().unwrap(),
                Duration::from_millis(500),
            )
            .is_err()
        };
        assert!(closed(PRIMARY_IP, primary) && closed(ORG_IP, org));
        let server = env.start();
        Setup {
            env,
            server: Some(server),
            primary,
            org,
            sender_rx,
        }
    }

    fn addr(&self) -> String {
        self.env.addr()
    }

    fn log(&self) -> String {
        self.server.as_ref().map(|s| s.log()).unwrap_or_default()
    }

    /// Waits until `n` queue entries exist and each was tried at least once.
    fn wait_tried(&self, n: usize) {
        let mut q = Vec::new();
        let ok = wait_for(Duration::from_secs(15), Duration::from_millis(100), || {
            q = self.env.queue(None);
            q.len() == n && q.iter().all(|e| e.attempts >= 1)
        });
        assert!(
            ok,
            "expected {n} tried queue entries, have {q:#?}\n--- log\n{}",
            self.log()
        );
    }

    /// In Stopped mode: stop the server (SIGTERM) so the commands open the spool.
    fn enter(&mut self, mode: Mode) {
        if mode == Mode::Stopped {
            let mut s = self.server.take().expect("server running");
            assert!(stop_server(&mut s), "mxspool serve did not stop on SIGTERM");
            assert!(
                !spool_dir(&self.env).join("control.sock").exists(),
                "control.sock left behind by a stopped server"
            );
        }
    }

    fn ensure_running(&mut self) {
        if self.server.is_none() {
            self.server = Some(self.env.start());
        }
    }

    fn stop(&mut self) {
        if let Some(mut s) = self.server.take() {
            assert!(stop_server(&mut s), "mxspool serve did not stop on SIGTERM");
        }
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = self.env.mxspool(args);
        check_ok(&format!("mxspool {}", args.join(" ")), &out);
        text(&out.stdout)
    }

    fn entry(&self, id: &str, domain: &str) -> Option<QueueEntry> {
        self.env
            .queue(None)
            .into_iter()
            .find(|e| e.id == id && e.domain == domain)
    }
}

fn message(subject: &str, to: &str) -> Vec<u8> {
    format!(
        "From: Alice <{SENDER}>\r\nTo: <{to}>\r\nSubject: {subject}\r\n\
         Message-ID: <{subject}@sender.test>\r\n\r\n\
         Body of {subject}.\r\n.leading dot\r\nLast line of {subject}.\r\n"
    )
    .into_bytes()
}

fn send(s: &Setup, subject: &str, rcpts: &[&str]) -> (String, Vec<u8>) {
    let m = message(subject, rcpts[0]);
    let id = smtp_send(&s.addr(), SENDER, rcpts, &m);
    (id, m)
}

fn rcpts(e: &QueueEntry) -> Vec<(String, String)> {
    e.recipients
        .iter()
        .map(|r| (r.address.clone(), r.state.clone()))
        .collect()
}

fn pending(addrs: &[&str]) -> Vec<(String, String)> {
    addrs
        .iter()
        .map(|a| (a.to_string(), "pending".to_string()))
        .collect()
}

fn time(field: &str, v: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(v)
        .unwrap_or_else(|e| panic!("{field} {v:?} is not RFC 3339: {e}"))
        .with_timezone(&Utc)
}

fn ids_of(q: &[QueueEntry]) -> BTreeSet<(String, String)> {
    q.iter().map(|e| (e.id.clone(), e.domain.clone())).collect()
}

fn single_line(what: &str, err: &str) {
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "{what}: want one error line, got:\n{err}");
}

/// The part of `mxspool show --body` between the contents marker and the end marker.
fn shown_message(show: &str, id: &str) -> String {
    let start = format!("*** MESSAGE CONTENTS {id} ***\n");
    let s = show
        .find(&start)
        .unwrap_or_else(|| panic!("no contents marker in:\n{show}"))
        + start.len();
    let end = show[s..]
        .find(&format!("*** END OF MESSAGE {id} ***"))
        .unwrap_or_else(|| panic!("no end marker in:\n{show}"));
    show[s..s + end].to_string()
}

// ---------------------------------------------------------------------------------------
// queue, shape, show

fn listing(mode: Mode) {
    let mut s = Setup::new("1h");
    let before = Utc::now() - chrono::Duration::seconds(2);
    let (a, ma) = send(&s, "alpha", &["bob@example.com", "carol@example.com"]);
    let (b, mb) = send(&s, "beta", &["dave@example.com", "erin@example.org"]);
    // b is queued once per domain: three entries.
    s.wait_tried(3);
    s.enter(mode);
    let after = Utc::now() + chrono::Duration::seconds(2);

    let q = s.env.queue(None);
    assert_eq!(q.len(), 3, "{q:#?}");
    assert_eq!(
        ids_of(&q),
        BTreeSet::from([
            (a.clone(), "example.com".to_string()),
            (b.clone(), "example.com".to_string()),
            (b.clone(), "example.org".to_string()),
        ])
    );
    for e in &q {
        assert_eq!(e.sender, SENDER, "{e:?}");
        let arrival = time("arrival", &e.arrival);
        assert!(arrival >= before && arrival <= after, "arrival {e:?}");
        assert_eq!(e.attempts, 1, "one attempt so far: {e:?}");
        let next = time(
            "next_attempt",
            e.next_attempt.as_deref().expect("next_attempt is set"),
        );
        // retry_interval 1h, with at most 10% jitter.
        let wait = next - arrival;
        assert!(
            wait >= chrono::Duration::minutes(50) && wait <= chrono::Duration::minutes(70),
            "next_attempt {next} is not about an hour after arrival {arrival}: {e:?}"
        );
        let port = if e.domain == "example.com" {
            s.primary
        } else {
            s.org
        };
        let err = e.last_error.as_deref().unwrap_or_default();
        assert!(
            err.contains(PRIMARY_IP) || err.contains(ORG_IP),
            "last_error does not name the primary: {e:?}"
        );
        assert!(
            err.contains(&port.to_string()),
            "last_error does not name the primary's port {port}: {e:?}"
        );
        assert!(!e.held, "{e:?}");
    }
    let ea = q.iter().find(|e| e.id == a).unwrap();
    assert_eq!(
        rcpts(ea),
        pending(&["bob@example.com", "carol@example.com"])
    );
    assert_stored(&s.env, ea, &ma);
    let eb_com = q
        .iter()
        .find(|e| e.id == b && e.domain == "example.com")
        .unwrap();
    assert_eq!(rcpts(eb_com), pending(&["dave@example.com"]));
    assert_stored(&s.env, eb_com, &mb);
    let eb_org = q
        .iter()
        .find(|e| e.id == b && e.domain == "example.org")
        .unwrap();
    assert_eq!(rcpts(eb_org), pending(&["erin@example.org"]));
    assert_eq!(eb_com.size, eb_org.size);
    assert_eq!(eb_com.arrival, eb_org.arrival);

    // --domain: that domain's entries only, with only that domain's recipients.
    let org = s.env.queue(Some("example.org"));
    assert_eq!(org.len(), 1, "{org:#?}");
    assert_eq!(org[0].id, b);
    assert_eq!(rcpts(&org[0]), pending(&["erin@example.org"]));
    let com = s.env.queue(Some("example.com"));
    assert_eq!(
        ids_of(&com),
        BTreeSet::from([
            (a.clone(), "example.com".to_string()),
            (b.clone(), "example.com".to_string()),
        ])
    );
    let b_in_com = com.iter().find(|e| e.id == b).unwrap();
    assert_eq!(rcpts(b_in_com), pending(&["dave@example.com"]));
    // The domain as an administrator may type it.
    assert_eq!(ids_of(&s.env.queue(Some("Example.COM."))), ids_of(&com));
    assert!(s.env.queue(Some("nothing-here.test")).is_empty());

    // The mailq-style table.
    let table = s.ok(&["queue"]);
    for needle in [
        a.as_str(),
        b.as_str(),
        SENDER,
        "bob@example.com",
        "carol@example.com",
        "erin@example.org",
    ] {
        assert!(table.contains(needle), "{needle} missing from:\n{table}");
    }
    let table_org = s.ok(&["queue", "--domain", "example.org"]);
    assert!(
        table_org.contains(&b) && !table_org.contains(&a),
        "{table_org}"
    );
    assert!(!table_org.contains("bob@example.com"), "{table_org}");

    // shape: TOTAL 3, example.com 2, example.org 1, all younger than 5 minutes.
    let shape = s.ok(&["shape"]);
    let row = |name: &str| -> Vec<String> {
        shape
            .lines()
            .map(|l| l.split_whitespace().map(str::to_string).collect::<Vec<_>>())
            .find(|w| w.first().map(String::as_str) == Some(name))
            .unwrap_or_else(|| panic!("no {name} row in shape:\n{shape}"))
    };
    assert_eq!(row("TOTAL")[1..3], ["3", "3"], "{shape}");
    assert_eq!(row("example.com")[1..3], ["2", "2"], "{shape}");
    assert_eq!(row("example.org")[1..3], ["1", "1"], "{shape}");
    let shape_json = s.ok(&["shape", "--json"]);
    let rows: Vec<serde_json::Value> = shape_json
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad shape line {l:?}: {e}")))
        .collect();
    let get = |d: &str| {
        rows.iter()
            .find(|r| r["domain"] == d)
            .unwrap_or_else(|| panic!("no {d} in shape --json:\n{shape_json}"))
    };
    for (d, n) in [("TOTAL", 3), ("example.com", 2), ("example.org", 1)] {
        assert_eq!(get(d)["total"], n, "{shape_json}");
        assert_eq!(get(d)["buckets"]["5"], n, "{shape_json}");
        let sum: u64 = get(d)["buckets"]
            .as_object()
            .expect("buckets is an object")
            .values()
            .map(|v| v.as_u64().unwrap())
            .sum();
        assert_eq!(sum, n, "{shape_json}");
    }
    assert_eq!(rows.len(), 3, "{shape_json}");

    // show: envelope and headers, not the body; --body: the whole message.
    let show = s.env.show(&a).expect("mxspool show succeeds");
    for needle in [
        format!("<{SENDER}>"),
        "bob@example.com".to_string(),
        "carol@example.com".to_string(),
        "Subject: alpha".to_string(),
        "Message-ID: <alpha@sender.test>".to_string(),
        "Received:".to_string(),
    ] {
        assert!(
            show.contains(&needle),
            "{needle} missing from show:\n{show}"
        );
    }
    assert!(
        !show.contains("Body of alpha"),
        "show without --body printed the body:\n{show}"
    );
    let body = s.ok(&["show", &a, "--body"]);
    let whole = shown_message(&body, &a);
    // (Line ends are compared loosely here; see show_body_is_the_same_live_and_stopped.)
    assert!(
        whole
            .replace("\r\n", "\n")
            .ends_with(&text(&ma).replace("\r\n", "\n")),
        "show --body does not end with the message as sent:\n{whole}"
    );
    assert!(whole.starts_with("Received:"), "{whole}");
    let show_b = s.env.show(&b).unwrap();
    assert!(
        show_b.contains("dave@example.com") && show_b.contains("erin@example.org"),
        "show of a two-domain message lists both: {show_b}"
    );

    // An unknown id: one line, non-zero, no panic.
    for bad in ["0000000000000", "no-such-id"] {
        let out = s.env.mxspool(&["show", bad]);
        let err = assert_clean_failure(&format!("show {bad}"), &out);
        single_line("show unknown id", &err);
        assert!(err.contains(bad), "the error does not name {bad}: {err}");
    }
}

#[test]
fn queue_shape_show_live() {
    listing(Mode::Live);
}

#[test]
fn queue_shape_show_stopped() {
    listing(Mode::Stopped);
}

// ---------------------------------------------------------------------------------------
// hold and release

fn hold_release(mode: Mode) {
    let mut s = Setup::new("1s");
    let (m1, _) = send(&s, "held-one", &["bob@example.com"]);
    // Retries every second while not held.
    let retried = wait_for(Duration::from_secs(15), Duration::from_millis(100), || {
        s.entry(&m1, "example.com").is_some_and(|e| e.attempts >= 2)
    });
    assert!(
        retried,
        "no retries with retry_interval 1s: {:?}\n{}",
        s.env.queue(None),
        s.log()
    );
    s.enter(mode);

    let out = s.ok(&["hold", "example.com"]);
    assert!(out.contains("example.com"), "{out}");
    // Holding twice is harmless.
    s.ok(&["hold", "example.com"]);
    let q = s.env.queue(Some("example.com"));
    assert_eq!(q.len(), 1);
    assert!(q[0].held, "held: false after hold: {q:?}");

    // With a server running (again, in Stopped mode: the hold survives a restart), a held
    // domain is not retried.
    s.ensure_running();
    std::thread::sleep(Duration::from_millis(1500)); // an attempt in flight may finish
    let a0 = s.entry(&m1, "example.com").unwrap();
    assert!(a0.held, "{a0:?}");
    std::thread::sleep(Duration::from_secs(4));
    let a1 = s.entry(&m1, "example.com").unwrap();
    assert_eq!(
        a1.attempts,
        a0.attempts,
        "attempts went on while held: {a0:?} -> {a1:?}\n{}",
        s.log()
    );
    assert!(a1.held);
    // Mail arriving for a held domain is held at once and not tried.
    let (m2, _) = send(&s, "held-two", &["carol@example.com"]);
    std::thread::sleep(Duration::from_secs(2));
    let e2 = s.entry(&m2, "example.com").expect("m2 queued");
    assert!(e2.held, "new mail for a held domain is not held: {e2:?}");
    assert_eq!(
        e2.attempts, 0,
        "new mail for a held domain was tried: {e2:?}"
    );

    // The primary is back, but the domain is held: nothing moves.
    let primary = Receiver::start(
        format!("{PRIMARY_IP}:{}", s.primary).parse().unwrap(),
        Behaviour::Accept,
    );
    std::thread::sleep(Duration::from_millis(2500));
    assert!(primary.messages().is_empty(), "delivered while held");
    if mode == Mode::Stopped {
        s.stop();
    }

    let out = s.ok(&["release", "example.com"]);
    assert!(out.contains("example.com"), "{out}");
    if mode == Mode::Stopped {
        // Released: not held, due now; the next server start delivers.
        let q = s.env.queue(Some("example.com"));
        assert_eq!(q.len(), 2, "{q:?}");
        for e in &q {
            assert!(!e.held, "{e:?}");
            let next = time("next_attempt", e.next_attempt.as_deref().unwrap());
            assert!(
                next <= Utc::now() + chrono::Duration::seconds(1),
                "not due now: {e:?}"
            );
        }
        s.ensure_running();
    }
    assert!(
        primary.wait_for(2, Duration::from_secs(10)),
        "released mail not delivered ({} of 2): {:?}\n{}",
        primary.messages().len(),
        s.env.queue(None),
        s.log()
    );
    let ok = wait_for(Duration::from_secs(5), Duration::from_millis(100), || {
        s.env.queue(None).is_empty()
    });
    assert!(ok, "{:?}", s.env.queue(None));
    // Releasing a domain that is not held is no error.
    s.ok(&["release", "example.com"]);
}

#[test]
fn hold_and_release_live() {
    hold_release(Mode::Live);
}

#[test]
fn hold_and_release_stopped() {
    hold_release(Mode::Stopped);
}

// ---------------------------------------------------------------------------------------
// flush

fn flush(mode: Mode) {
    let mut s = Setup::new("1h");
    let (m1, b1) = send(&s, "flush-one", &["bob@example.com"]);
    let (m2, b2) = send(&s, "flush-two", &["carol@example.com", "dave@example.com"]);
    let (m3, _) = send(&s, "flush-org", &["erin@example.org"]);
    s.wait_tried(3);
    s.enter(mode);

    // The primary is down: flush tries, exits 1, the mail stays.
    let out = s.env.mxspool(&["flush", "example.com", "-v"]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "flush with the primary down:\n{}\n{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    let q = s.env.queue(Some("example.com"));
    assert_eq!(q.len(), 2, "{q:?}");
    assert!(
        q.iter().all(|e| e.attempts == 2),
        "flush did not try: {q:?}"
    );

    // A held domain: the administrator's flush still delivers it, and what stays queued
    // stays held.
    s.ok(&["hold", "example.com"]);
    let out = s.env.mxspool(&["flush", "example.com"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    let q = s.env.queue(Some("example.com"));
    assert_eq!(q.len(), 2, "{q:?}");
    assert!(
        q.iter().all(|e| e.held),
        "failed flush un-held the domain: {q:?}"
    );

    let primary = Receiver::start(
        format!("{PRIMARY_IP}:{}", s.primary).parse().unwrap(),
        Behaviour::Accept,
    );
    let out = s.env.mxspool(&["flush", "example.com", "-v"]);
    let stdout = text(&out.stdout);
    check_ok("flush example.com -v", &out);
    let lines: Vec<&str> = stdout.lines().collect();
    for want in [
        "<<< 220 ",
        ">>> EHLO ",
        &format!(">>> MAIL FROM:<{SENDER}>"),
        ">>> RCPT TO:<bob@example.com>",
        ">>> RCPT TO:<carol@example.com>",
        ">>> RCPT TO:<dave@example.com>",
        ">>> DATA",
        "<<< 354 ",
        "<<< 250 ",
    ] {
        assert!(
            lines.iter().any(|l| l.starts_with(want)),
            "no line starting {want:?} in the transcript:\n{stdout}"
        );
    }
    // The body is not part of the transcript.
    assert!(!stdout.contains("Body of flush-one"), "{stdout}");
    assert_eq!(primary.messages().len(), 2, "{stdout}");
    for (sent, rc) in [
        (&b1, vec!["bob@example.com"]),
        (&b2, vec!["carol@example.com", "dave@example.com"]),
    ] {
        let got = primary
            .messages()
            .into_iter()
            .find(|m| m.data.ends_with(sent))
            .unwrap_or_else(|| panic!("message not delivered byte for byte:\n{}", text(sent)));
        assert_eq!(got.sender, SENDER);
        assert_eq!(got.recipients, rc);
        assert!(got.data.starts_with(b"Received:"));
    }
    assert!(s.env.queue(Some("example.com")).is_empty());
    assert!(s.entry(&m1, "example.com").is_none() && s.entry(&m2, "example.com").is_none());
    // The other domain was not touched.
    let org = s.entry(&m3, "example.org").expect("example.org mail stays");
    assert_eq!(org.attempts, 1, "{org:?}");

    // Flushing an empty domain is no failure; the whole queue with example.org down is.
    s.ok(&["flush", "example.com"]);
    let out = s.env.mxspool(&["flush"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stdout));
    assert_eq!(s.entry(&m3, "example.org").unwrap().attempts, 2);
    assert_eq!(primary.messages().len(), 2, "duplicates");
}

#[test]
fn flush_verbose_live() {
    flush(Mode::Live);
}

#[test]
fn flush_verbose_stopped() {
    flush(Mode::Stopped);
}

// ---------------------------------------------------------------------------------------
// delete and bounce

fn delete_bounce(mode: Mode) {
    let mut s = Setup::new("1h");
    let (m1, _) = send(&s, "del-one", &["bob@example.com"]);
    let (m2, _) = send(&s, "bounce-me", &["carol@example.com"]);
    let (m3, _) = send(&s, "del-org", &["erin@example.org"]);
    let (m4, _) = send(
        &s,
        "two-domains",
        &["frank@example.com", "gina@example.org"],
    );
    s.wait_tried(5);
    s.enter(mode);

    let out = s.ok(&["delete", &m1]);
    assert!(out.contains('1'), "{out}");
    assert!(s.env.queue(None).iter().all(|e| e.id != m1));
    assert!(
        s.env.show(&m1).is_none(),
        "show still finds a deleted message"
    );
    // Deleting it again: one line, non-zero.
    let out = s.env.mxspool(&["delete", &m1]);
    let err = assert_clean_failure("delete a deleted id", &out);
    single_line("delete a deleted id", &err);
    assert!(err.contains(&m1), "{err}");

    s.ok(&["delete", "--domain", "example.org"]);
    let q = s.env.queue(None);
    assert_eq!(
        ids_of(&q),
        BTreeSet::from([
            (m2.clone(), "example.com".to_string()),
            (m4.clone(), "example.com".to_string()),
        ]),
        "after delete --domain example.org: {q:?}"
    );
    assert!(s.env.show(&m4).is_some(), "m4 still queued for example.com");
    assert!(s.env.show(&m3).is_none());

    let out = s.ok(&["bounce", &m2]);
    assert!(out.contains(&m2), "{out}");
    assert!(
        s.entry(&m2, "example.com").is_none(),
        "bounced mail stays queued"
    );
    // Bounce of unknown and deleted ids: one line each, non-zero.
    let out = s.env.mxspool(&["bounce", &m1]);
    let err = assert_clean_failure("bounce a deleted id", &out);
    single_line("bounce a deleted id", &err);

    if mode == Mode::Stopped {
        // The DSN is queued for the sender's domain; the next server start sends it.
        let q = s.env.queue(Some("sender.test"));
        assert_eq!(q.len(), 1, "{q:?}");
        assert_eq!(q[0].sender, "", "a DSN has the null sender: {q:?}");
        assert_eq!(rcpts(&q[0]), pending(&[SENDER]));
        s.ensure_running();
    }
    assert!(
        s.sender_rx.wait_for(1, Duration::from_secs(15)),
        "no DSN reached the sender: {:?}\n{}",
        s.env.queue(None),
        s.log()
    );
    std::thread::sleep(Duration::from_secs(1));
    let dsns = s.sender_rx.messages();
    assert_eq!(dsns.len(), 1, "one DSN (none for deleted mail): {dsns:#?}");
    let dsn = &dsns[0];
    assert_eq!(dsn.sender, "");
    assert_eq!(dsn.recipients, [SENDER]);
    let body = text(&dsn.data);
    for needle in [
        "multipart/report",
        "report-type=delivery-status",
        "carol@example.com",
        "Action: failed",
        "Subject: bounce-me",
    ] {
        assert!(
            body.contains(needle),
            "{needle} missing from the DSN:\n{body}"
        );
    }
    let q = s.env.queue(None);
    assert_eq!(
        ids_of(&q),
        BTreeSet::from([(m4.clone(), "example.com".to_string())]),
        "{q:?}"
    );
}

#[test]
fn delete_and_bounce_live() {
    delete_bounce(Mode::Live);
}

#[test]
fn delete_and_bounce_stopped() {
    delete_bounce(Mode::Stopped);
}

// ---------------------------------------------------------------------------------------
// bad input

fn bad_input(mode: Mode) {
    let mut s = Setup::new("1h");
    let (m1, _) = send(&s, "keep-me", &["bob@example.com"]);
    s.wait_tried(1);
    s.enter(mode);
    let before = ids_of(&s.env.queue(None));
    let archive = s.env.dir.path().join("bad.tar");
    let archive = archive.to_str().unwrap();

    // The program's own errors: exactly one line.
    let cases: &[&[&str]] = &[
        &["hold", "not a domain"],
        &["hold", "bad..example.com"],
        &["release", "x-.example.com!"],
        &["flush", "no_such host"],
        &["delete", "--domain", "a b"],
        &["delete", "0000000000000"],
        &["bounce", "ZZZZZZZZZZZZZ"],
        &["show", "../../etc/passwd"],
        &["export", "bad domain", "-o", archive],
        &["import", "/nonexistent/archive.tar"],
    ];
    for args in cases {
        let out = s.env.mxspool(args);
        let what = format!("mxspool {}", args.join(" "));
        let err = assert_clean_failure(&what, &out);
        single_line(&what, &err);
        assert!(err.starts_with("mxspool: "), "{what}: {err}");
    }
    // Usage errors: non-zero (2), one line naming what is wrong and the usage, no panic.
    let usage: &[&[&str]] = &[
        &["hold"],
        &["release"],
        &["bounce"],
        &["show"],
        &["export", "example.com"],
        &["import"],
        &["delete", &m1, "--domain", "example.com"],
        &["frobnicate"],
        &["flush", "--bogus"],
    ];
    for args in usage {
        let out = s.env.mxspool(args);
        let what = format!("mxspool {}", args.join(" "));
        let err = assert_clean_failure(&what, &out);
        assert_eq!(out.status.code(), Some(2), "{what}: {err}");
        single_line(&what, &err);
        assert!(
            err.starts_with("mxspool: ") && err.contains("usage: mxspool"),
            "{what}: {err}"
        );
    }
    // Missing arguments are named.
    let out = s.env.mxspool(&["hold"]);
    assert!(
        text(&out.stderr).contains("<DOMAIN>"),
        "{}",
        text(&out.stderr)
    );
    // `delete` alone says what it needs.
    let out = s.env.mxspool(&["delete"]);
    let err = assert_clean_failure("mxspool delete", &out);
    single_line("mxspool delete", &err);
    assert!(
        err.contains("queue IDs") && err.contains("--domain"),
        "{err}"
    );
    assert!(!std::path::Path::new(archive).exists());
    assert_eq!(
        ids_of(&s.env.queue(None)),
        before,
        "bad input changed the queue"
    );
}

#[test]
fn bad_input_live() {
    bad_input(Mode::Live);
}

#[test]
fn bad_input_stopped() {
    bad_input(Mode::Stopped);
}

// ---------------------------------------------------------------------------------------
// --spool

#[test]
fn spool_option_works_on_another_spool() {
    // Spool A: a live server with one message. Spool B: another installation's spool,
    // filled and then stopped.
    let a = Setup::new("1h");
    let (ma, _) = send(&a, "in-a", &["bob@example.com"]);
    a.wait_tried(1);
    let mut b = Setup::new("1h");
    let (mb, _) = send(&b, "in-b", &["carol@example.com"]);
    let (mb2, _) = send(&b, "in-b-org", &["erin@example.org"]);
    b.wait_tried(2);
    b.enter(Mode::Stopped);
    let b_spool = spool_dir(&b.env);

    // A's configuration, B's spool.
    let q = queue_on(&a.env, &b_spool);
    assert_eq!(
        ids_of(&q),
        BTreeSet::from([
            (mb.clone(), "example.com".to_string()),
            (mb2.clone(), "example.org".to_string()),
        ])
    );
    let out = mxspool_on(
        &a.env,
        &b_spool,
        &["queue", "--domain", "example.org", "--json"],
    );
    check_ok("queue --domain on --spool", &out);
    assert_eq!(parse_queue(&text(&out.stdout)).len(), 1);
    let out = mxspool_on(&a.env, &b_spool, &["show", &mb]);
    check_ok("show on --spool", &out);
    assert!(text(&out.stdout).contains("Subject: in-b"));
    // A's message is not in B.
    assert_clean_failure(
        "show A's id on B",
        &mxspool_on(&a.env, &b_spool, &["show", &ma]),
    );

    // Changes go to B, not to A (whose server is running).
    check_ok(
        "hold on --spool",
        &mxspool_on(&a.env, &b_spool, &["hold", "example.com"]),
    );
    assert!(queue_on(&a.env, &b_spool)
        .iter()
        .any(|e| e.id == mb && e.held));
    assert!(
        a.env.queue(None).iter().all(|e| !e.held),
        "hold reached spool A"
    );
    check_ok(
        "delete on --spool",
        &mxspool_on(&a.env, &b_spool, &["delete", &mb2]),
    );
    assert_eq!(queue_on(&a.env, &b_spool).len(), 1);
    assert_eq!(a.env.queue(None).len(), 1);
    let out = mxspool_on(&a.env, &b_spool, &["flush", "example.org"]);
    check_ok("flush of an emptied domain on --spool", &out);

    // A spool that does not exist: one line.
    let missing = a.env.dir.path().join("no-such-spool");
    for args in [&["queue"][..], &["hold", "example.com"], &["flush", "-v"]] {
        let out = mxspool_on(&a.env, &missing, args);
        let err = assert_clean_failure(&format!("{args:?} on a missing spool"), &out);
        single_line("missing spool", &err);
    }
}

// ---------------------------------------------------------------------------------------
// The seed's story

/// The partner's primary is down for long. Its administrator asks us to park its mail in
/// an alternate queue area; when the primary is back we run that queue by hand with a
/// transcript, like `sendmail -OQueueDirectory=/var/spool/example.back -q -v`.
#[test]
fn seed_story_park_a_partners_mail_elsewhere_then_deliver_it_from_there() {
    let s = Setup::new("1h");
    let mut sent = Vec::new();
    for (i, who) in ["pedro", "ana", "joao"].iter().enumerate() {
        let subject = format!("para-{who}-{i}");
        let (id, m) = send(&s, &subject, &[&format!("{who}@example.com")]);
        sent.push((id, who.to_string(), m));
    }
    let (other, _) = send(&s, "not-parked", &["erin@example.org"]);
    s.wait_tried(4);

    // 1. Stop the retries for the partner.
    s.ok(&["hold", "example.com"]);
    // 2. Move its mail out of the live spool into an archive.
    let archive = s.env.dir.path().join("example.com.tar");
    let out = s.env.mxspool(&[
        "export",
        "example.com",
        "-o",
        archive.to_str().unwrap(),
        "--remove",
    ]);
    check_ok("export example.com --remove", &out);
    assert!(archive.is_file());
    assert!(
        s.env.queue(Some("example.com")).is_empty(),
        "export --remove left mail in the spool: {:?}",
        s.env.queue(None)
    );
    assert!(
        s.entry(&other, "example.org").is_some(),
        "export removed another domain's mail"
    );

    // 3. The alternate queue area: a second spool, no server running on it.
    let mut second = Setup::new("1h");
    second.stop();
    let second_spool = spool_dir(&second.env);
    let out = mxspool_on(
        &s.env,
        &second_spool,
        &["import", archive.to_str().unwrap()],
    );
    check_ok("import into the second spool", &out);
    let q = queue_on(&s.env, &second_spool);
    let want: BTreeSet<(String, String)> = sent
        .iter()
        .map(|(id, _, _)| (id.clone(), "example.com".to_string()))
        .collect();
    assert_eq!(ids_of(&q), want, "{q:#?}");

    // 4. The primary is back: run the parked queue by hand, with a transcript.
    let primary = Receiver::start(
        format!("{PRIMARY_IP}:{}", s.primary).parse().unwrap(),
        Behaviour::Accept,
    );
    let out = mxspool_on(&s.env, &second_spool, &["flush", "example.com", "-v"]);
    let stdout = text(&out.stdout);
    check_ok("flush example.com -v on the second spool", &out);
    for (_, who, _) in &sent {
        let want = format!(">>> RCPT TO:<{who}@example.com>");
        assert!(
            stdout.lines().any(|l| l.starts_with(&want)),
            "{want} missing:\n{stdout}"
        );
    }
    assert!(
        stdout
            .lines()
            .any(|l| l.starts_with(&format!(">>> MAIL FROM:<{SENDER}>"))),
        "{stdout}"
    );
    assert!(stdout.lines().any(|l| l.starts_with("<<< 250")), "{stdout}");
    assert_eq!(primary.messages().len(), 3, "{stdout}");
    for (_, who, m) in &sent {
        let got = primary
            .messages()
            .into_iter()
            .find(|r| r.recipients == [format!("{who}@example.com")])
            .unwrap_or_else(|| panic!("nothing for {who}"));
        assert_eq!(got.sender, SENDER);
        assert!(got.data.ends_with(m), "{who}'s message changed on the way");
    }
    assert!(queue_on(&s.env, &second_spool).is_empty());
    // The live server still holds example.com and has nothing of it; example.org waits.
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(primary.messages().len(), 3, "delivered twice");
    assert_eq!(
        ids_of(&s.env.queue(None)),
        BTreeSet::from([(other, "example.org".to_string())])
    );
}

/// `show` prints the same bytes whether the server answers (control socket) or the spool
/// is read directly: the message as spooled, 8-bit bytes and line ends included.
#[test]
fn show_body_is_the_same_live_and_stopped() {
    let mut s = Setup::new("1h");
    // Latin-1, not UTF-8: 0xE9 is "é".
    let mut m = b"From: <alice@sender.test>\r\nTo: <bob@example.com>\r\nSubject: latin1\r\n\
MIME-Version: 1.0\r\nContent-Type: text/plain; charset=iso-8859-1\r\n\
Content-Transfer-Encoding: 8bit\r\n\r\nCaf"
        .to_vec();
    m.extend_from_slice(b"\xe9 com leite.\r\nSecond line.\r\n");
    let id = smtp_send_with(
        &s.addr(),
        &format!("MAIL FROM:<{SENDER}> BODY=8BITMIME"),
        &["bob@example.com"],
        &[],
        &m,
    );
    s.wait_tried(1);
    let live_body = s.env.mxspool(&["show", &id, "--body"]);
    check_ok("show --body (live)", &live_body);
    let live_head = s.env.mxspool(&["show", &id]);
    check_ok("show (live)", &live_head);
    s.enter(Mode::Stopped);
    let stopped_body = s.env.mxspool(&["show", &id, "--body"]);
    check_ok("show --body (stopped)", &stopped_body);
    let stopped_head = s.env.mxspool(&["show", &id]);
    check_ok("show (stopped)", &stopped_head);

    let has = |hay: &[u8], needle: &[u8]| hay.windows(needle.len()).any(|w| w == needle);
    assert!(
        has(&stopped_body.stdout, &m),
        "show --body on the stopped spool does not print the message byte for byte:\n{}",
        text(&stopped_body.stdout)
    );
    assert!(
        live_body.stdout == stopped_body.stdout,
        "show --body differs between a live server and a stopped spool\n--- live\n{:?}\n--- stopped\n{:?}",
        text(&live_body.stdout),
        text(&stopped_body.stdout)
    );
    assert!(
        live_head.stdout == stopped_head.stdout,
        "show differs between a live server and a stopped spool\n--- live\n{:?}\n--- stopped\n{:?}",
        text(&live_head.stdout),
        text(&stopped_head.stdout)
    );
}
