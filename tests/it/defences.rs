//! Backup-MX defences (issue 13) against real clients on loopback: client rate limits seen
//! from two source addresses (127.0.0.2 limited, 127.0.0.3 in `[relay] networks`), DNS
//! blocklists served by a real DNS server on loopback (hickory-server, [`TestDns`]), and
//! the recipient callout against a scripted aiosmtpd primary that refuses unknown users.

use std::net::{TcpListener, UdpSocket};
use std::time::{Duration, Instant};

use crate::callout::{after_a_crash, rcpt, while_the_primary_is_down};
use crate::dns::TestDns;
use crate::harness::*;
use crate::peers::{AioOptions, AioSmtpd, Primary};

const LIMITED: &str = "127.0.0.2";
const RELAY: &str = "127.0.0.3";
const OTHER: &str = "127.0.0.4";

/// The backup MX of `example.com` (mail stays queued), with `smtp` in `[smtp]` and
/// 127.0.0.3 in the relay networks; `tail` after the partner.
fn env(smtp: &str, tail: &str) -> MxEnv {
    MxEnv::custom(&format!(
        "{smtp}\n\n[relay]\nnetworks = [\"{RELAY}/32\"]\n\n[queue]\nretry_interval = \"1h\"\n\n\
         [[partner]]\ndomain = \"example.com\"\nroute = [\"127.0.0.1:1\"]\n\n{tail}"
    ))
}

fn connect(addr: &str, source: &str) -> (Smtp, Reply) {
    Smtp::connect_from(addr, source).unwrap_or_else(|e| panic!("connect from {source}: {e}"))
}

/// EHLO, then `MAIL FROM` `n` times (RSET after each accepted one): the replies' codes.
fn mails(c: &mut Smtp, n: usize) -> Vec<Reply> {
    let ehlo = c.cmd("EHLO client.test").unwrap();
    assert_eq!(ehlo.code, 250, "{ehlo}");
    (0..n)
        .map(|_| {
            let r = c.cmd("MAIL FROM:<sender@client.test>").unwrap();
            if r.code == 250 {
                assert_eq!(c.cmd("RSET").unwrap().code, 250);
            }
            r
        })
        .collect()
}

/// A message to u@example.com in a fresh transaction; the reply to the final dot.
fn send_one(c: &mut Smtp) -> Reply {
    let r = c.cmd("MAIL FROM:<sender@client.test>").unwrap();
    assert_eq!(r.code, 250, "{r}");
    let r = c.cmd("RCPT TO:<u@example.com>").unwrap();
    assert_eq!(r.code, 250, "{r}");
    c.data(b"Subject: defences\r\n\r\nhello\r\n")
        .unwrap()
        .expect("DATA accepted")
}

fn closed(c: &mut Smtp) -> bool {
    c.reply().is_err()
}

/// `GET /metrics` from `[metrics] listen = addr`: the exposition text.
fn metrics(addr: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: t\r\n\r\n")
        .unwrap();
    let mut body = String::new();
    s.read_to_string(&mut body).unwrap();
    body
}

#[test]
fn rate_limits_per_client_address_spare_the_relay_networks() {
    let metrics_addr = format!("127.0.0.1:{}", free_port());
    let mut env = env(
        "max_connection_rate = \"3/1h\"\nmax_message_rate = \"2/1h\"",
        &format!("[metrics]\nlisten = \"{metrics_addr}\"\n"),
    );
    let server = env.start();
    let addr = env.addr();

    // The limited client: two messages, then 450 at MAIL, in this session and the next.
    let (mut c, banner) = connect(&addr, LIMITED);
    assert_eq!(banner.code, 220, "{banner}");
    let ehlo = c.cmd("EHLO client.test").unwrap();
    assert_eq!(ehlo.code, 250);
    let r = send_one(&mut c);
    assert_eq!(r.code, 250, "{r}");
    let r = send_one(&mut c);
    assert_eq!(r.code, 250, "{r}");
    let r = c.cmd("MAIL FROM:<sender@client.test>").unwrap();
    assert_eq!(r.code, 450, "{r}");
    assert_eq!(
        r.lines[0],
        format!("4.7.1 Error: too much mail from {LIMITED}"),
        "{r}"
    );
    assert_eq!(c.cmd("QUIT").unwrap().code, 221);

    let (mut c, banner) = connect(&addr, LIMITED);
    assert_eq!(banner.code, 220, "{banner}");
    let r = mails(&mut c, 1);
    assert_eq!(r[0].code, 450, "{}", r[0]);
    assert_eq!(c.cmd("QUIT").unwrap().code, 221);

    // Third connection in the window: still greeted; the fourth gets 421 and is closed.
    let (mut c, banner) = connect(&addr, LIMITED);
    assert_eq!(banner.code, 220, "{banner}");
    assert_eq!(c.cmd("QUIT").unwrap().code, 221);
    let (mut c, banner) = connect(&addr, LIMITED);
    assert_eq!(banner.code, 421, "{banner}");
    assert_eq!(
        banner.lines[0],
        format!("4.7.0 {HOSTNAME} Error: too many connections from {LIMITED}"),
        "{banner}"
    );
    assert!(closed(&mut c), "the connection stays open after 421");

    // Another address has its own count; the relay network has none.
    let (mut c, banner) = connect(&addr, OTHER);
    assert_eq!(banner.code, 220, "{banner}");
    assert!(mails(&mut c, 2).iter().all(|r| r.code == 250));
    for _ in 0..6 {
        let (mut c, banner) = connect(&addr, RELAY);
        assert_eq!(banner.code, 220, "{banner}");
        let r = mails(&mut c, 4);
        assert!(r.iter().all(|r| r.code == 250), "{r:?}");
        let r = send_one(&mut c);
        assert_eq!(r.code, 250, "{r}");
        assert_eq!(c.cmd("QUIT").unwrap().code, 221);
    }

    // Two messages from the limited client and six from the relay network are queued.
    assert_eq!(env.queue(None).len(), 8);
    let m = metrics(&metrics_addr);
    assert!(
        m.contains("mxspool_smtp_refused_connections_total{reason=\"rate\"} 1\n"),
        "{m}"
    );
    assert!(
        m.contains("mxspool_smtp_refused_messages_total{reason=\"rate\"} 2\n"),
        "{m}"
    );
    let log = server.log();
    assert!(
        log.contains(&format!(
            "NOQUEUE: reject: CONNECT from [{LIMITED}]: 421 4.7.0"
        )),
        "{log}"
    );
    assert!(
        log.contains(&format!(
            "NOQUEUE: reject: MAIL from [{LIMITED}]: 450 4.7.1"
        )),
        "{log}"
    );
}

#[test]
fn bad_rates_are_refused_in_one_line() {
    let env = env("max_connection_rate = \"lots\"", "");
    let out = env.mxspool(&["check-config"]);
    let err = assert_clean_failure("check-config with a bad rate", &out);
    assert!(
        err.contains("invalid rate") && err.contains("lots"),
        "{err}"
    );
}

/// The blocklist `bl.test`: 127.0.0.2 and 127.0.0.3 listed (with the usual TXT), and a
/// record outside 127/8 for 127.0.0.5, which is no listing.
const BL_TEST: &str = r#"
$ORIGIN bl.test.
$TTL 300
@           IN SOA   ns hostmaster ( 1 3600 600 432000 60 )
            IN NS    ns
ns          IN A     127.0.0.53
2.0.0.127   IN A     127.0.0.2
            IN TXT   "listed for the test"
3.0.0.127   IN A     127.0.0.2
5.0.0.127   IN A     192.0.2.1
"#;

fn assert_served(addr: &str, source: &str) {
    let (mut c, banner) = connect(addr, source);
    assert_eq!(banner.code, 220, "{source}: {banner}");
    assert_eq!(c.cmd("EHLO client.test").unwrap().code, 250);
    let r = send_one(&mut c);
    assert_eq!(r.code, 250, "{source}: {r}");
    assert_eq!(c.cmd("QUIT").unwrap().code, 221);
}

#[test]
fn dnsbl_listed_clients_get_554_naming_the_list() {
    let dns = TestDns::start(&[("bl.test.", BL_TEST)]);
    // `down.test` is not served there: the server refuses the query, the list is skipped.
    let mut env = env(
        "dnsbl = [\"down.test\", \"bl.test\"]",
        &format!("[delivery]\nnameservers = [\"{}\"]\n", dns.addr),
    );
    let server = env.start();
    let addr = env.addr();

    let (mut c, banner) = connect(&addr, LIMITED);
    assert_eq!(banner.code, 554, "{banner}");
    assert_eq!(
        banner.lines[0],
        format!("5.7.1 Service unavailable; Client host [{LIMITED}] blocked using bl.test"),
        "{banner}"
    );
    // RFC 5321 3.1: after a 554 greeting, only QUIT.
    let r = c.cmd("EHLO client.test").unwrap();
    assert_eq!(r.code, 503, "{r}");
    let r = c.cmd("MAIL FROM:<sender@client.test>").unwrap();
    assert_eq!(r.code, 503, "{r}");
    assert_eq!(c.cmd("QUIT").unwrap().code, 221);
    assert!(closed(&mut c));

    // Not listed (NXDOMAIN), listed but a relay network, an answer outside 127/8: served.
    assert_served(&addr, OTHER);
    assert_served(&addr, RELAY);
    assert_served(&addr, "127.0.0.5");

    // The answer is cached for its TTL: with the DNS server gone the client is still
    // refused, and at once.
    drop(dns);
    let t = Instant::now();
    let (mut c, banner) = connect(&addr, LIMITED);
    assert_eq!(banner.code, 554, "{banner}");
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    assert_eq!(c.cmd("QUIT").unwrap().code, 221);

    let log = server.log();
    assert!(
        log.contains(&format!(
            "NOQUEUE: reject: CONNECT from [{LIMITED}]: 554 5.7.1"
        )),
        "{log}"
    );
    assert!(
        log.contains("dnsbl down.test"),
        "the failing list is not logged:\n{log}"
    );
    assert_eq!(env.queue(None).len(), 3);
}

#[test]
fn dnsbl_that_does_not_answer_is_skipped() {
    // A nameserver that never answers: a UDP socket nobody reads and a TCP listener that
    // never accepts, on the same port.
    let (udp, _tcp) = loop {
        let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
        if let Ok(tcp) = TcpListener::bind(udp.local_addr().unwrap()) {
            break (udp, tcp);
        }
    };
    let mut env = env(
        "dnsbl = [\"bl.test\"]",
        &format!(
            "[delivery]\nnameservers = [\"{}\"]\n",
            udp.local_addr().unwrap()
        ),
    );
    let server = env.start();
    let t = Instant::now();
    assert_served(&env.addr(), LIMITED);
    let waited = t.elapsed();
    // Skipped after the resolver's own timeout or the 5 s bound, whichever is first.
    assert!(
        waited >= Duration::from_secs(1) && waited < Duration::from_secs(12),
        "the greeting came after {waited:?}"
    );
    let skipped = |log: &str| {
        log.contains("dnsbl") && (log.contains("did not answer") || log.contains("list skipped"))
    };
    assert!(
        wait_for(Duration::from_secs(5), Duration::from_millis(100), || {
            skipped(&server.log())
        }),
        "{}",
        server.log()
    );
    assert_eq!(env.queue(None).len(), 1);
}

/// The primary of `example.com` for the callout tests: aiosmtpd knowing alice and carol.
fn callout_primary(ip: &str, port: u16) -> AioSmtpd {
    AioSmtpd::start(
        ip,
        port,
        AioOptions {
            users: Some(vec!["alice".into(), "carol".into()]),
            ..AioOptions::default()
        },
    )
}

#[test]
fn callout_asks_the_primary_and_caches_its_answer() {
    let ip = "127.0.70.1";
    let port = free_port_at(ip);
    let primary = callout_primary(ip, port);
    let mut env = MxEnv::custom(&format!(
        "\n[queue]\nretry_interval = \"1h\"\n\n[[partner]]\ndomain = \"example.com\"\n\
         route = [\"{ip}:{port}\"]\nverify = \"callout\"\nrecipients = \"{{dir}}/users\"\n\n\
         [[partner]]\ndomain = \"example.org\"\nroute = [\"{ip}:{port}\"]\n"
    ));
    // The recipients list comes first: zed is refused without asking the primary.
    std::fs::write(env.dir.path().join("users"), "alice\nmallory\ncarol\n").unwrap();
    let mut server = env.start();
    let addr = env.addr();
    // Queued mail stays queued: the primary's sessions are the callouts only.
    for d in ["example.com", "example.org"] {
        check_ok("mxspool hold", &env.mxspool(&["hold", d]));
    }

    let (mut c, banner) = connect(&addr, OTHER);
    assert_eq!(banner.code, 220, "{banner}");
    assert_eq!(c.cmd("EHLO client.test").unwrap().code, 250);
    assert_eq!(c.cmd("MAIL FROM:<sender@client.test>").unwrap().code, 250);
    let r = rcpt(&mut c, "alice@example.com");
    assert_eq!(r.code, 250, "{r}");
    let r = rcpt(&mut c, "mallory@example.com");
    assert_eq!(r.code, 550, "{r}");
    assert!(
        r.lines[0].starts_with("5.1.1 <mallory@example.com>: Recipient address rejected")
            && r.lines[0].contains("User unknown in local recipient table"),
        "{r}"
    );
    let r = rcpt(&mut c, "zed@example.com");
    assert_eq!(r.code, 550, "{r}");
    // A partner without verify is not asked.
    let r = rcpt(&mut c, "anyone@example.org");
    assert_eq!(r.code, 250, "{r}");
    assert_eq!(primary.sessions(), 2, "{}", primary.log());

    // Asked again (other case, next transaction): the cache answers, no new callout.
    let r = rcpt(&mut c, "Alice@example.com");
    assert_eq!(r.code, 250, "{r}");
    let r = c
        .data(b"Subject: callout\r\n\r\nhello\r\n")
        .unwrap()
        .unwrap();
    assert_eq!(r.code, 250, "{r}");
    assert_eq!(c.cmd("MAIL FROM:<sender@client.test>").unwrap().code, 250);
    assert_eq!(rcpt(&mut c, "alice@example.com").code, 250);
    assert_eq!(rcpt(&mut c, "MALLORY@example.com").code, 550);
    assert_eq!(primary.sessions(), 2, "{}", primary.log());
    assert_eq!(c.cmd("RSET").unwrap().code, 250);

    // The primary goes away: cached answers hold (the negative one still refuses), an
    // address never asked is accepted and queued.
    drop(primary);
    assert!(port_closed_at(ip, port));
    let r = while_the_primary_is_down(
        &mut c,
        "alice@example.com",
        "mallory@example.com",
        "carol@example.com",
        Duration::from_secs(11),
    );
    assert_eq!(r.code, 550, "{r}");

    let queued: Vec<String> = env
        .queue(None)
        .iter()
        .flat_map(|e| e.recipients.iter().map(|r| r.address.to_ascii_lowercase()))
        .collect();
    assert!(
        queued.contains(&"carol@example.com".to_string()),
        "{queued:?}"
    );
    assert!(
        !queued.iter().any(|a| a.starts_with("mallory")),
        "{queued:?}"
    );
    let log = server.log();
    assert!(
        log.contains("callout carol@example.com: primary unreachable"),
        "{log}"
    );
    assert!(
        log.contains("NOQUEUE: reject: RCPT from [127.0.0.4]: 550 5.1.1 <mallory@example.com>"),
        "{log}"
    );

    // Killed and started again, the primary still gone: the answers come from the spool.
    let (_server, r) = after_a_crash(
        &mut env,
        &mut server,
        OTHER,
        "alice@example.com",
        "mallory@example.com",
    );
    assert_eq!(r.code, 550, "{r}");
    assert!(
        r.lines[0].contains("User unknown in local recipient table"),
        "{r}"
    );
}

fn port_closed_at(ip: &str, port: u16) -> bool {
    wait_for(Duration::from_secs(10), Duration::from_millis(50), || {
        std::net::TcpStream::connect((ip, port)).is_err()
    })
}
