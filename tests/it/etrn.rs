//! ETRN (RFC 1985) over SMTP from loopback: a partner with `etrn = true` gets its queue
//! started (`253`, then the mail arrives at its primary), `@domain` covers subdomains, a
//! partner without `etrn` or a stranger gets `459`, bad syntax `501`, and a held domain
//! `458` and stays held.
//!
//! Not tested here: `554 5.7.1` for a client outside loopback and `[smtp] etrn_clients`.
//! Every address a test can connect from on this machine is loopback (always allowed), so
//! that refusal is covered by the unit tests of `Policy::check_etrn`.

use std::time::Duration;

use crate::harness::*;
use crate::receiver::{Behaviour, Receiver};

const SENDER: &str = "alice@sender.test";

struct Etrn {
    env: MxEnv,
    server: Server,
    /// Routes: example.com, sub.example.com, example.net (no etrn), example.org.
    com: u16,
    sub: u16,
    net: u16,
    org: u16,
}

impl Etrn {
    fn new() -> Etrn {
        let (com, sub, net, org) = (free_port(), free_port(), free_port(), free_port());
        let mut env = MxEnv::custom(&format!(
            "[queue]\nretry_interval = \"1h\"\n\n[delivery]\nconnect_timeout = \"2s\"\n\n\
             [[partner]]\ndomain = \"example.com\"\nroute = [\"127.0.0.1:{com}\"]\netrn = true\n\n\
             [[partner]]\ndomain = \"sub.example.com\"\nroute = [\"127.0.0.1:{sub}\"]\netrn = true\n\n\
             [[partner]]\ndomain = \"example.net\"\nroute = [\"127.0.0.1:{net}\"]\n\n\
             [[partner]]\ndomain = \"example.org\"\nroute = [\"127.0.0.1:{org}\"]\netrn = true\n"
        ));
        let server = env.start();
        Etrn {
            env,
            server,
            com,
            sub,
            net,
            org,
        }
    }

    fn send(&self, subject: &str, rcpt: &str) -> String {
        let m = format!(
            "From: <{SENDER}>\r\nTo: <{rcpt}>\r\nSubject: {subject}\r\n\r\nbody of {subject}\r\n"
        );
        smtp_send(&self.env.addr(), SENDER, &[rcpt], m.as_bytes())
    }

    /// Waits until `n` entries are queued and each was tried (and deferred) once.
    fn wait_tried(&self, n: usize) {
        let mut q = Vec::new();
        let ok = wait_for(Duration::from_secs(15), Duration::from_millis(100), || {
            q = self.env.queue(None);
            q.len() == n && q.iter().all(|e| e.attempts >= 1)
        });
        assert!(ok, "want {n} tried entries: {q:#?}\n{}", self.server.log());
    }

    fn session(&self) -> Smtp {
        let (mut c, banner) = Smtp::connect(&self.env.addr()).unwrap();
        assert_eq!(banner.code, 220);
        let ehlo = c.cmd("EHLO partner.test").unwrap();
        assert_eq!(ehlo.code, 250);
        assert!(
            ehlo.lines.iter().any(|l| l == "ETRN"),
            "ETRN not advertised: {ehlo}"
        );
        c
    }
}

fn receiver(port: u16) -> Receiver {
    Receiver::start(
        format!("127.0.0.1:{port}").parse().unwrap(),
        Behaviour::Accept,
    )
}

#[test]
fn etrn_starts_the_partners_queue_and_at_domain_covers_subdomains() {
    let e = Etrn::new();
    let ids = [
        e.send("com-1", "bob@example.com"),
        e.send("com-2", "carol@example.com"),
    ];
    let sub_id = e.send("sub-1", "dave@sub.example.com");
    e.wait_tried(3);
    // The primaries are back; with retry_interval 1h nothing would move for an hour.
    let com = receiver(e.com);
    let sub = receiver(e.sub);
    std::thread::sleep(Duration::from_secs(1));
    assert!(com.messages().is_empty() && sub.messages().is_empty());

    let mut c = e.session();
    let r = c.cmd("ETRN example.com").unwrap();
    assert_eq!(r.code, 253, "{r}");
    assert!(
        r.lines[0].starts_with("2.0.0 ")
            && r.lines[0].contains("2 pending messages")
            && r.lines[0].contains("example.com"),
        "{r}"
    );
    assert!(
        com.wait_for(2, Duration::from_secs(10)),
        "ETRN example.com delivered {} of 2:\n{}",
        com.messages().len(),
        e.server.log()
    );
    let mut got: Vec<String> = com
        .messages()
        .iter()
        .map(|m| m.recipients[0].clone())
        .collect();
    got.sort();
    assert_eq!(got, ["bob@example.com", "carol@example.com"]);
    // Plain `example.com` does not cover the subdomain.
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        sub.messages().is_empty(),
        "ETRN example.com flushed sub.example.com"
    );
    let q = e.env.queue(None);
    assert_eq!(q.len(), 1, "{q:?}");
    assert_eq!(
        (q[0].id.as_str(), q[0].domain.as_str()),
        (sub_id.as_str(), "sub.example.com")
    );
    for id in &ids {
        assert!(q.iter().all(|x| &x.id != id));
    }

    // Nothing left for example.com itself.
    let r = c.cmd("ETRN example.com").unwrap();
    assert_eq!(r.code, 251, "{r}");
    // `@example.com`: the domain and its subdomains.
    let r = c.cmd("ETRN @example.com").unwrap();
    assert_eq!(r.code, 253, "{r}");
    assert!(r.lines[0].contains("1 pending message"), "{r}");
    assert!(
        sub.wait_for(1, Duration::from_secs(10)),
        "ETRN @example.com did not flush sub.example.com\n{}",
        e.server.log()
    );
    assert_eq!(sub.messages()[0].recipients, ["dave@sub.example.com"]);
    let ok = wait_for(Duration::from_secs(5), Duration::from_millis(100), || {
        e.env.queue(None).is_empty()
    });
    assert!(ok, "{:?}", e.env.queue(None));
    let r = c.cmd("ETRN sub.example.com").unwrap();
    assert_eq!(r.code, 251, "{r}");
    assert_eq!(c.cmd("QUIT").unwrap().code, 221);
    assert_eq!(com.messages().len(), 2, "duplicates");
}

#[test]
fn etrn_refusals_and_syntax() {
    let e = Etrn::new();
    let net_id = e.send("net-1", "erin@example.net");
    e.wait_tried(1);
    let net = receiver(e.net);

    // Before EHLO.
    let (mut c, _) = Smtp::connect(&e.env.addr()).unwrap();
    let r = c.cmd("ETRN example.com").unwrap();
    assert_eq!(r.code, 503, "{r}");

    let mut c = e.session();
    // A partner without `etrn = true`, and a domain that is no partner at all.
    for node in [
        "example.net",
        "@example.net",
        "stranger.test",
        "EXAMPLE.NET.",
    ] {
        let r = c.cmd(&format!("ETRN {node}")).unwrap();
        assert_eq!(r.code, 459, "ETRN {node}: {r}");
        assert!(r.lines[0].starts_with("4.7.1 "), "{r}");
    }
    // Bad syntax.
    for line in [
        "ETRN",
        "ETRN bad..example.com",
        "ETRN @",
        "ETRN exa!mple.com",
    ] {
        let r = c.cmd(line).unwrap();
        assert_eq!(r.code, 501, "{line}: {r}");
    }
    // Named queues are not supported.
    let r = c.cmd("ETRN #queue1").unwrap();
    assert_eq!(r.code, 458, "{r}");
    // Not inside a mail transaction.
    assert_eq!(c.cmd(&format!("MAIL FROM:<{SENDER}>")).unwrap().code, 250);
    let r = c.cmd("ETRN example.com").unwrap();
    assert_eq!(r.code, 503, "{r}");
    assert_eq!(c.cmd("RSET").unwrap().code, 250);
    // The session goes on after the refusals.
    assert_eq!(c.cmd("NOOP").unwrap().code, 250);
    let r = c.cmd("ETRN example.com").unwrap();
    assert_eq!(r.code, 251, "{r}");
    let _ = c.cmd("QUIT");

    // The refused ETRN started nothing.
    std::thread::sleep(Duration::from_secs(2));
    assert!(net.messages().is_empty(), "a refused ETRN delivered mail");
    let q = e.env.queue(None);
    assert_eq!(q.len(), 1);
    assert_eq!(q[0].id, net_id);
    assert_eq!(q[0].attempts, 1, "{q:?}");

    // RFC 1985: `ETRN SP node-name CRLF`, one argument. Trailing words are a syntax error
    // (Postfix: `501 5.5.4 Syntax: ETRN domain`), not ignored.
    let mut c = e.session();
    let r = c.cmd("ETRN exa mple.com").unwrap();
    assert_eq!(r.code, 501, "ETRN with two arguments: {r}");
}

#[test]
fn etrn_for_a_held_domain_is_refused_and_it_stays_held() {
    let e = Etrn::new();
    let id = e.send("org-1", "frank@example.org");
    e.wait_tried(1);
    let out = e.env.mxspool(&["hold", "example.org"]);
    check_ok("hold example.org", &out);
    let org = receiver(e.org);

    let mut c = e.session();
    for node in ["example.org", "@example.org"] {
        let r = c.cmd(&format!("ETRN {node}")).unwrap();
        assert_eq!(r.code, 458, "ETRN {node}: {r}");
        assert!(r.lines[0].starts_with("4.7.0 "), "{r}");
        assert!(r.lines[0].contains("hold"), "{r}");
    }
    let _ = c.cmd("QUIT");
    std::thread::sleep(Duration::from_secs(3));
    assert!(org.messages().is_empty(), "ETRN delivered a held domain");
    let q = e.env.queue(None);
    assert_eq!(q.len(), 1, "{q:?}");
    assert_eq!(q[0].id, id);
    assert!(q[0].held, "ETRN took the domain off hold: {q:?}");
    assert_eq!(q[0].attempts, 1, "{q:?}");

    // Released by the administrator, it goes at once.
    check_ok("release", &e.env.mxspool(&["release", "example.org"]));
    assert!(
        org.wait_for(1, Duration::from_secs(10)),
        "{}",
        e.server.log()
    );
}
