//! The recipient callout (`[[partner]] verify = "callout"`) against a real primary: a private
//! Postfix instance on a loopback address that relays `example.com` only to the users of its
//! `relay_recipient_maps` and refuses the others at RCPT. Its callouts are counted in its
//! own log (`connect from`, one line per SMTP connection). The answers are cached in the
//! spool: they hold with Postfix stopped, and after mxspool itself is killed and started
//! again. And a reload that shortens a TTL, against aiosmtpd.

use std::fs;
use std::time::{Duration, Instant};

use crate::harness::*;
use crate::peers::listening;

const PRIMARY: &str = "127.0.71.1";
const CLIENT: &str = "127.0.71.2";

pub fn rcpt(c: &mut Smtp, to: &str) -> Reply {
    c.cmd(&format!("RCPT TO:<{to}>")).unwrap()
}

/// With the primary gone, a new transaction on `c`: `known` gets `250` from the cache,
/// `new` (never asked) `250` within `limit`, and the message is queued; the session ends.
/// Returns the reply to `unknown`, which should be its cached refusal.
pub fn while_the_primary_is_down(
    c: &mut Smtp,
    known: &str,
    unknown: &str,
    new: &str,
    limit: Duration,
) -> Reply {
    assert_eq!(c.cmd("MAIL FROM:<sender@client.test>").unwrap().code, 250);
    assert_eq!(rcpt(c, known).code, 250);
    let refused = rcpt(c, unknown);
    let t = Instant::now();
    let r = rcpt(c, new);
    assert_eq!(r.code, 250, "{r}");
    assert!(t.elapsed() < limit, "{:?}", t.elapsed());
    let r = c
        .data(b"Subject: primary down\r\n\r\nhello\r\n")
        .unwrap()
        .unwrap();
    assert_eq!(r.code, 250, "{r}");
    assert_eq!(c.cmd("QUIT").unwrap().code, 221);
    refused
}

/// A session from `source` with EHLO and MAIL done.
pub fn transaction(addr: &str, source: &str) -> Smtp {
    let (mut c, banner) =
        Smtp::connect_from(addr, source).unwrap_or_else(|e| panic!("connect: {e}"));
    assert_eq!(banner.code, 220, "{banner}");
    assert_eq!(c.cmd("EHLO client.test").unwrap().code, 250);
    assert_eq!(c.cmd("MAIL FROM:<sender@client.test>").unwrap().code, 250);
    c
}

/// Kills `server` and starts it again, the primary still down. In one transaction from
/// `source`, `known` must get `250`, and neither it nor `unknown` may be asked of the
/// primary (no `callout ADDRESS:` line). Returns the new server and the reply to `unknown`.
pub fn after_a_crash(
    env: &mut MxEnv,
    server: &mut Server,
    source: &str,
    known: &str,
    unknown: &str,
) -> (Server, Reply) {
    server.kill9();
    let server = env.start();
    let mut c = transaction(&env.addr(), source);
    let refused = rcpt(&mut c, unknown);
    assert_eq!(rcpt(&mut c, known).code, 250);
    assert_eq!(c.cmd("QUIT").unwrap().code, 221);
    let log = server.log();
    for a in [known, unknown] {
        assert!(
            !log.contains(&format!("callout {a}:")),
            "a cached answer was asked again:\n{log}"
        );
    }
    (server, refused)
}

/// SMTP connections Postfix's smtpd has logged.
fn connections(postfix: &Postfix) -> usize {
    postfix.log().matches(": connect from ").count()
}

/// The recipients queued, lower-cased.
fn queued(env: &MxEnv) -> Vec<String> {
    env.queue(None)
        .iter()
        .flat_map(|e| e.recipients.iter().map(|r| r.address.to_ascii_lowercase()))
        .collect()
}

fn assert_unknown(r: &Reply, who: &str) {
    assert_eq!(r.code, 550, "{r}");
    assert!(
        r.lines[0].starts_with(&format!(
            "5.1.1 <{who}@example.com>: Recipient address rejected: undeliverable address: "
        )) && r.lines[0]
            .ends_with("Recipient address rejected: User unknown in relay recipient table"),
        "not Postfix's refusal: {r}"
    );
}

#[test]
fn callout_to_a_postfix_primary_is_cached_in_the_spool() {
    let port = free_port_at(PRIMARY);
    let maps = public_tempdir("mxspool-callout-maps.");
    let users = maps.path().join("relay_recipients");
    fs::write(&users, "alice@example.com OK\ncarol@example.com OK\n").unwrap();
    let mut postfix = Postfix::start(
        &format!(
            "relay_domains = example.com\n\
             relay_recipient_maps = texthash:{}\n\
             smtpd_recipient_restrictions = reject_unauth_destination\n\
             defer_transports = smtp\n",
            users.display()
        ),
        &format!("{PRIMARY}:{port} inet n - n - - smtpd\n"),
    );
    assert!(
        wait_for(Duration::from_secs(20), Duration::from_millis(50), || {
            listening(PRIMARY, port)
        }),
        "postfix does not listen on {PRIMARY}:{port}:\n{}",
        postfix.log()
    );
    let mut env = MxEnv::custom(&format!(
        "\n[queue]\nretry_interval = \"1h\"\n\n[[partner]]\ndomain = \"example.com\"\n\
         route = [\"{PRIMARY}:{port}\"]\nverify = \"callout\"\nverify_negative_ttl = \"1h\"\n"
    ));
    let mut server = env.start();
    let addr = env.addr();
    // Queued mail stays queued: Postfix's connections are the callouts only.
    check_ok("mxspool hold", &env.mxspool(&["hold", "example.com"]));
    assert_eq!(connections(&postfix), 0, "{}", postfix.log());

    // Known: 250; unknown: 550 with Postfix's code, status and text.
    let mut c = transaction(&addr, CLIENT);
    let r = rcpt(&mut c, "alice@example.com");
    assert_eq!(r.code, 250, "{r}\n{}\n{}", server.log(), postfix.log());
    assert_unknown(&rcpt(&mut c, "bob@example.com"), "bob");
    assert!(
        wait_for(Duration::from_secs(10), Duration::from_millis(50), || {
            connections(&postfix) == 2
        }),
        "two callouts, two connections:\n{}",
        postfix.log()
    );

    // Within the TTLs, asked again (other case too): the cache answers, no connection.
    assert_eq!(rcpt(&mut c, "Alice@example.com").code, 250);
    assert_unknown(&rcpt(&mut c, "Bob@example.com"), "Bob");
    let r = c
        .data(b"Subject: callout\r\n\r\nhello\r\n")
        .unwrap()
        .unwrap();
    assert_eq!(r.code, 250, "{r}");
    assert_eq!(c.cmd("MAIL FROM:<sender@client.test>").unwrap().code, 250);
    assert_eq!(rcpt(&mut c, "alice@example.com").code, 250);
    assert_unknown(&rcpt(&mut c, "BOB@example.com"), "BOB");
    assert_eq!(c.cmd("RSET").unwrap().code, 250);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(connections(&postfix), 2, "{}", postfix.log());

    // Postfix stops: the cached answers hold, an address never asked is accepted (at
    // once: the connection is refused) and queued.
    postfix.stop();
    assert!(!listening(PRIMARY, port));
    let refused = while_the_primary_is_down(
        &mut c,
        "alice@example.com",
        "bob@example.com",
        "dave@example.com",
        Duration::from_secs(6),
    );
    assert_unknown(&refused, "bob");
    let before = queued(&env);
    let mut q = before.clone();
    q.sort();
    q.dedup();
    assert_eq!(q, ["alice@example.com", "dave@example.com"]);
    let log = server.log();
    assert!(
        log.contains("callout dave@example.com: primary unreachable"),
        "{log}"
    );

    // A crash and a new start, Postfix still down: the answers come from the spool
    // (no callout for them), the one uncached address is tried again and accepted.
    let (server, refused) = after_a_crash(
        &mut env,
        &mut server,
        CLIENT,
        "alice@example.com",
        "bob@example.com",
    );
    assert_unknown(&refused, "bob");
    let mut c = transaction(&addr, CLIENT);
    assert_eq!(rcpt(&mut c, "dave@example.com").code, 250);
    assert_eq!(c.cmd("QUIT").unwrap().code, 221);
    let log = server.log();
    assert!(
        log.contains("callout dave@example.com: primary unreachable"),
        "{log}"
    );
    assert!(
        log.contains("NOQUEUE: reject: RCPT from [127.0.71.2]: 550 5.1.1 <bob@example.com>"),
        "{log}"
    );
    assert_eq!(queued(&env), before);
}

/// A reload that shortens `verify_negative_ttl` applies to the refusals already cached; the
/// positive answers keep theirs. The primary: aiosmtpd knowing only alice.
#[test]
fn a_reload_that_shortens_a_ttl_shortens_the_cached_answers() {
    use crate::peers::{AioOptions, AioSmtpd, Primary};
    let ip = "127.0.71.3";
    let port = free_port_at(ip);
    let primary = AioSmtpd::start(
        ip,
        port,
        AioOptions {
            users: Some(vec!["alice".into()]),
            ..AioOptions::default()
        },
    );
    let mut env = MxEnv::custom(&format!(
        "\n[queue]\nretry_interval = \"1h\"\n\n[[partner]]\ndomain = \"example.com\"\n\
         route = [\"{ip}:{port}\"]\nverify = \"callout\"\nverify_negative_ttl = \"3h\"\n"
    ));
    let _server = env.start();
    check_ok("mxspool hold", &env.mxspool(&["hold", "example.com"]));
    let mut c = transaction(&env.addr(), CLIENT);
    assert_eq!(rcpt(&mut c, "mallory@example.com").code, 550);
    assert_eq!(rcpt(&mut c, "alice@example.com").code, 250);
    assert_eq!(rcpt(&mut c, "mallory@example.com").code, 550);
    assert_eq!(primary.sessions(), 2, "{}", primary.log());
    assert_eq!(c.cmd("QUIT").unwrap().code, 221);

    // Sessions started after the reload run under it.
    let config = fs::read_to_string(&env.config).unwrap();
    let shorter = config.replace(
        "verify_negative_ttl = \"3h\"",
        "verify_negative_ttl = \"2s\"",
    );
    assert_ne!(config, shorter);
    fs::write(&env.config, shorter).unwrap();
    check_ok("mxspool reload", &env.mxspool(&["reload"]));
    std::thread::sleep(Duration::from_millis(2100));
    let mut c = transaction(&env.addr(), CLIENT);
    assert_eq!(rcpt(&mut c, "alice@example.com").code, 250);
    assert_eq!(primary.sessions(), 2, "{}", primary.log());
    assert_eq!(rcpt(&mut c, "mallory@example.com").code, 550);
    assert_eq!(primary.sessions(), 3, "{}", primary.log());
    assert_eq!(c.cmd("QUIT").unwrap().code, 221);
}
