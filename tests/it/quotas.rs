//! Per-partner quotas (`[[partner]] max_messages`, `max_bytes`; issue 13) through real SMTP
//! sessions: a partner past its quota gets `452 4.3.1` (at RCPT when already full or when
//! the declared SIZE would overflow it, after DATA otherwise, during a streamed DATA for a
//! large message), never `250` beyond it even with many sessions finishing DATA at once;
//! another partner keeps getting `250`; the counters survive `kill -9`; `delete --domain`
//! makes room; `queue --json`, `shape --json` and the metrics show use against quota.

use std::sync::{Arc, Barrier};
use std::time::Duration;

use crate::harness::*;

/// The MX set of `full.test`, for `doctor`: its primary, then this server.
const FULL_ZONE: &str = r#"
$ORIGIN full.test.
$TTL 300
@         IN SOA   ns1 hostmaster ( 1 3600 600 432000 60 )
          IN NS    ns1
ns1       IN A     127.0.0.53
@         IN MX    0 primary
          IN MX    10 mx2.test.
primary   IN A     127.0.0.1
"#;

fn config(tail: &str) -> String {
    format!(
        "[queue]\nretry_interval = \"1h\"\n\n\
         [[partner]]\ndomain = \"full.test\"\nroute = [\"127.0.0.1:1\"]\nmax_messages = 5\n\n\
         [[partner]]\ndomain = \"free.test\"\nroute = [\"127.0.0.1:1\"]\n\n\
         [[partner]]\ndomain = \"race.test\"\nroute = [\"127.0.0.1:1\"]\nmax_messages = 4\n\n\
         [[partner]]\ndomain = \"bytes.test\"\nroute = [\"127.0.0.1:1\"]\nmax_bytes = \"100KiB\"\n\n\
         {tail}"
    )
}

/// MAIL (with `mail_params`) and one RCPT: the RCPT reply.
fn start_to(c: &mut Smtp, rcpt: &str, mail_params: &str) -> Reply {
    let r = c
        .cmd(&format!("MAIL FROM:<s@client.test>{mail_params}"))
        .unwrap();
    assert_eq!(r.code, 250, "{r}");
    c.cmd(&format!("RCPT TO:<{rcpt}>")).unwrap()
}

/// A whole transaction to `rcpt`: the reply to RCPT if refused, else to the final dot.
fn send(addr: &str, rcpt: &str, body: &[u8]) -> Reply {
    let (mut c, banner) = Smtp::connect(addr).unwrap();
    assert_eq!(banner.code, 220);
    assert_eq!(c.cmd("EHLO client.test").unwrap().code, 250);
    let r = start_to(&mut c, rcpt, "");
    if r.code != 250 {
        return r;
    }
    let r = c.data(body).unwrap().expect("DATA accepted");
    let _ = c.cmd("QUIT");
    r
}

fn message(bytes: usize) -> Vec<u8> {
    let mut m = b"Subject: quota\r\n\r\n".to_vec();
    let line = b"0123456789abcdefghijklmnopqrstuvwxyz0123456789abcdefghijklmnopqrstuv\r\n";
    while m.len() < bytes {
        m.extend_from_slice(line);
    }
    m
}

/// One metric's value in an exposition text.
fn sample(text: &str, name: &str) -> Option<String> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ').map(str::to_string))
}

fn scrape(addr: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: t\r\n\r\n")
        .unwrap();
    let mut body = String::new();
    s.read_to_string(&mut body).unwrap();
    body
}

/// The `quota` object of `mxspool shape --json`'s line for `domain`.
fn shape_quota(env: &MxEnv, domain: &str) -> serde_json::Value {
    let out = env.mxspool(&["shape", "--json"]);
    check_ok("shape --json", &out);
    text(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .find(|v| v["domain"] == domain)
        .unwrap_or_else(|| panic!("no shape line for {domain}: {}", text(&out.stdout)))["quota"]
        .clone()
}

#[test]
fn a_partner_at_max_messages_gets_452_and_the_others_250() {
    let metrics = format!("127.0.0.1:{}", free_port());
    let dns = crate::dns::TestDns::start(&[("full.test.", FULL_ZONE)]);
    let mut env = MxEnv::custom(&config(&format!(
        "[metrics]\nlisten = \"{metrics}\"\n\n[delivery]\nnameservers = [\"{}\"]\n",
        dns.addr
    )));
    let mut server = env.start();
    let addr = env.addr();
    let body = message(200);

    for i in 0..5 {
        let r = send(&addr, &format!("u{i}@full.test"), &body);
        assert_eq!(r.code, 250, "message {i}: {r}");
    }
    // Full: the next RCPT for it gets 452 4.3.1, the client's transaction goes on.
    let (mut c, _) = Smtp::connect(&addr).unwrap();
    assert_eq!(c.cmd("EHLO client.test").unwrap().code, 250);
    let r = start_to(&mut c, "u9@full.test", "");
    assert_eq!(r.code, 452, "{r}");
    assert!(
        r.lines[0].starts_with("4.3.1 <u9@full.test>: Insufficient system storage"),
        "{r}"
    );
    assert!(r.lines[0].contains("full.test"), "{r}");
    // ... and another partner in the same transaction is taken.
    let r = c.cmd("RCPT TO:<v@free.test>").unwrap();
    assert_eq!(r.code, 250, "{r}");
    let r = c.data(&body).unwrap().unwrap();
    assert_eq!(r.code, 250, "{r}");
    let _ = c.cmd("QUIT");
    for i in 0..3 {
        let r = send(&addr, &format!("w{i}@free.test"), &body);
        assert_eq!(r.code, 250, "free.test is not limited: {r}");
    }
    assert_eq!(env.queue(Some("full.test")).len(), 5);

    // The reports show it: queue --json, shape --json, the metrics.
    let out = env.mxspool(&["queue", "--json", "--domain", "full.test"]);
    check_ok("queue --json", &out);
    for line in text(&out.stdout).lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        assert_eq!(v["quota"]["messages"], 5, "{line}");
        assert_eq!(v["quota"]["max_messages"], 5, "{line}");
        assert_eq!(v["quota"]["percent"], 100, "{line}");
    }
    let q = shape_quota(&env, "full.test");
    assert_eq!(
        (q["messages"].clone(), q["max_messages"].clone()),
        (5.into(), 5.into())
    );
    assert_eq!(shape_quota(&env, "free.test"), serde_json::Value::Null);
    let m = scrape(&metrics);
    assert_eq!(
        sample(&m, "mxspool_quota_used_messages{domain=\"full.test\"}").as_deref(),
        Some("5"),
        "{m}"
    );
    assert_eq!(
        sample(&m, "mxspool_quota_max_messages{domain=\"full.test\"}").as_deref(),
        Some("5")
    );
    // doctor shows it, and warns.
    let out = env.mxspool(&["doctor", "full.test"]);
    let report = text(&out.stdout);
    assert!(
        report.contains("  quota: 5 of 5 messages (100%)"),
        "{report}\n{}",
        text(&out.stderr)
    );
    assert!(
        report.contains("the queue of full.test is at its quota (5 of 5 messages)"),
        "{report}"
    );
    assert_eq!(out.status.code(), Some(1), "{report}");
    let log = server.log();
    assert!(
        log.contains("partner full.test: queue at 80% of its quota"),
        "{log}"
    );
    assert!(
        log.contains("partner full.test: queue quota reached (5 of 5 messages)"),
        "{log}"
    );

    // The counters are exact after kill -9: still full.
    server.kill9();
    let server = env.start();
    let r = send(&addr, "again@full.test", &body);
    assert_eq!(r.code, 452, "after a restart: {r}");

    // delete --domain makes room again.
    let out = env.mxspool(&["delete", "--domain", "full.test"]);
    check_ok("delete --domain", &out);
    let r = send(&addr, "again@full.test", &body);
    assert_eq!(r.code, 250, "after delete: {r}");
    assert_eq!(shape_quota(&env, "full.test")["messages"], 1);
    assert!(server
        .log()
        .contains("partner full.test: queue back under 80%"));
}

#[test]
fn sessions_finishing_data_at_once_never_pass_the_quota() {
    let mut env = MxEnv::custom(&config(""));
    let _server = env.start();
    let addr = env.addr();
    // Ten sessions pass RCPT while race.test is empty, then all send the final dot at once:
    // exactly its 4 places are taken, the rest get 452 after DATA.
    const N: usize = 10;
    let barrier = Arc::new(Barrier::new(N));
    let threads: Vec<_> = (0..N)
        .map(|i| {
            let (addr, barrier) = (addr.clone(), barrier.clone());
            std::thread::spawn(move || {
                let (mut c, _) = Smtp::connect(&addr).unwrap();
                assert_eq!(c.cmd("EHLO client.test").unwrap().code, 250);
                let r = start_to(&mut c, &format!("r{i}@race.test"), "");
                assert_eq!(r.code, 250, "RCPT {i}: {r}");
                assert_eq!(c.cmd("DATA").unwrap().code, 354);
                c.send_raw(&dot_stuff(&message(300))).unwrap();
                barrier.wait();
                c.send_raw(b".\r\n").unwrap();
                c.reply().unwrap()
            })
        })
        .collect();
    let replies: Vec<Reply> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    let ok = replies.iter().filter(|r| r.code == 250).count();
    let full = replies.iter().filter(|r| r.code == 452).count();
    assert_eq!((ok, full), (4, N - 4), "{replies:?}");
    for r in replies.iter().filter(|r| r.code == 452) {
        assert!(r.lines[0].starts_with("4.3.1 "), "{r}");
        assert!(r.lines[0].contains("race.test is full"), "{r}");
    }
    assert_eq!(env.queue(Some("race.test")).len(), 4);
}

#[test]
fn max_bytes_refuses_at_rcpt_with_size_after_data_without_and_during_a_large_data() {
    let mut env = MxEnv::custom(&config(""));
    let server = env.start();
    let addr = env.addr();
    let forty = message(40 * 1024);
    for i in 0..2 {
        let r = send(&addr, &format!("b{i}@bytes.test"), &forty);
        assert_eq!(r.code, 250, "{r}");
    }
    let used = shape_quota(&env, "bytes.test")["bytes"].as_u64().unwrap();
    assert!(used > 80 * 1024 && used < 90 * 1024, "{used}");

    // A declared SIZE that would not fit: 452 at RCPT.
    let (mut c, _) = Smtp::connect(&addr).unwrap();
    assert_eq!(c.cmd("EHLO client.test").unwrap().code, 250);
    let r = start_to(&mut c, "b2@bytes.test", " SIZE=40000");
    assert_eq!(r.code, 452, "{r}");
    assert!(r.lines[0].starts_with("4.3.1 "), "{r}");
    assert_eq!(c.cmd("RSET").unwrap().code, 250);
    // Without SIZE: accepted at RCPT, refused after DATA; a small one still fits.
    let r = start_to(&mut c, "b2@bytes.test", "");
    assert_eq!(r.code, 250, "{r}");
    let r = c.data(&forty).unwrap().unwrap();
    assert_eq!(r.code, 452, "{r}");
    assert!(r.lines[0].starts_with("4.3.1 "), "{r}");
    assert!(r.lines[0].contains("bytes.test is full"), "{r}");
    let r = start_to(&mut c, "b3@bytes.test", "");
    assert_eq!(r.code, 250, "{r}");
    let r = c.data(&message(1000)).unwrap().unwrap();
    assert_eq!(r.code, 250, "{r}");

    // A large message (streamed to the spool in parts) is stopped during DATA: the client
    // is still read to the end and gets 452; nothing of it stays queued.
    let big = message(3 << 20);
    let r = start_to(&mut c, "b4@bytes.test", "");
    assert_eq!(r.code, 250, "{r}");
    let r = c.data(&big).unwrap().unwrap();
    assert_eq!(r.code, 452, "{r}");
    // The session goes on, and another partner takes the same large message.
    let r = start_to(&mut c, "big@free.test", "");
    assert_eq!(r.code, 250, "{r}");
    let r = c.data(&big).unwrap().unwrap();
    assert_eq!(r.code, 250, "{r}");
    let _ = c.cmd("QUIT");
    assert_eq!(env.queue(Some("bytes.test")).len(), 3);
    let log = server.log();
    assert!(
        log.contains("partner bytes.test: queue quota reached"),
        "{log}"
    );
}
