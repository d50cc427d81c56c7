//! Delivery, end to end: mxspool as the backup MX of `example.com`, a real DNS server on
//! loopback serving zones modelled on the seed, and receiving SMTP servers on 127.0.0.2,
//! 127.0.0.3, ... that can be down, answer 4xx, or refuse some recipients.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::dns::TestDns;
use crate::harness::*;
use crate::receiver::{Behaviour, Receiver};

/// The zone of the partner `example.com`: primary `mail` (127.0.0.2) at preference 0,
/// `backup` at 5 (127.0.0.3), and this server (`mx2.test`) at `self_pref`.
fn example_zone(records: &str) -> String {
    format!(
        "$ORIGIN example.com.\n$TTL 60\n\
         @ IN SOA ns.example.com. hostmaster.example.com. 1 3600 600 86400 60\n\
         @ IN NS ns.example.com.\n\
         ns IN A 127.0.0.1\n\
         mail IN A 127.0.0.2\n\
         backup IN A 127.0.0.3\n\
         {records}\n"
    )
}

/// The sender's domain: its MX is 127.0.0.4, where DSNs arrive.
const SENDER_ZONE: &str = "$ORIGIN sender.test.\n$TTL 60\n\
    @ IN SOA ns.sender.test. hostmaster.sender.test. 1 3600 600 86400 60\n\
    @ IN NS ns.sender.test.\n\
    ns IN A 127.0.0.1\n\
    @ IN MX 10 mx.sender.test.\n\
    mx IN A 127.0.0.4\n";

/// `mx2.test` is this server's `hostname`.
const TEST_ZONE: &str = "$ORIGIN test.\n$TTL 60\n\
    @ IN SOA ns.test. hostmaster.test. 1 3600 600 86400 60\n\
    @ IN NS ns.test.\n\
    ns IN A 127.0.0.1\n\
    mx2 IN A 127.0.0.9\n";

struct World {
    dns: TestDns,
    port: u16,
    env: MxEnv,
}

impl World {
    /// DNS with `example_records` in example.com, and mxspool configured with `queue`
    /// settings (TOML lines of `[queue]`).
    fn new(example_records: &str, queue: &str) -> World {
        let zone = example_zone(example_records);
        let dns = TestDns::start(&[
            ("example.com.", zone.as_str()),
            ("sender.test.", SENDER_ZONE),
            ("test.", TEST_ZONE),
        ]);
        let port = closed_port_at("127.0.0.2");
        let env = MxEnv::custom(&format!(
            "[queue]\n{queue}\n\n[delivery]\nport = {port}\nconnect_timeout = \"2s\"\nnameservers = [\"{}\"]\n\n[[partner]]\ndomain = \"example.com\"\n",
            dns.addr
        ));
        World { dns, port, env }
    }

    fn at(&self, host: u8) -> SocketAddr {
        format!("127.0.0.{host}:{}", self.port).parse().unwrap()
    }
}

/// Hand one message to mxspool; returns its queue id.
fn send(addr: &str, from: &str, rcpts: &[&str], subject: &str) -> String {
    let (mut c, banner) = Smtp::connect(addr).unwrap();
    assert_eq!(banner.code, 220);
    assert_eq!(c.cmd("EHLO sender.test").unwrap().code, 250);
    assert_eq!(c.cmd(&format!("MAIL FROM:<{from}>")).unwrap().code, 250);
    for r in rcpts {
        let reply = c.cmd(&format!("RCPT TO:<{r}>")).unwrap();
        assert_eq!(reply.code, 250, "RCPT {r}: {reply}");
    }
    let msg = format!(
        "From: <{from}>\r\nTo: <{}>\r\nSubject: {subject}\r\nMessage-ID: <{subject}@sender.test>\r\n\r\nHello from the seed's story.\r\n",
        rcpts[0]
    );
    let reply = c.data(msg.as_bytes()).unwrap().expect("DATA accepted");
    assert_eq!(reply.code, 250, "{reply}");
    let _ = c.cmd("QUIT");
    reply.to_string().rsplit(' ').next().unwrap().to_string()
}

fn subjects(r: &Receiver) -> Vec<String> {
    let mut v: Vec<String> = r
        .messages()
        .iter()
        .map(|m| {
            let t = String::from_utf8_lossy(&m.data).into_owned();
            t.lines()
                .find_map(|l| l.strip_prefix("Subject: ").map(str::to_string))
                .unwrap_or_default()
        })
        .collect();
    v.sort();
    v
}

fn wait_queue_empty(env: &MxEnv, limit: Duration) -> bool {
    wait_for(limit, Duration::from_millis(200), || {
        env.queue(None).is_empty()
    })
}

#[test]
fn the_primary_comes_back_and_its_queue_drains_at_once() {
    let mut w = World::new(
        "@ IN MX 0 mail.example.com.\n@ IN MX 10 mx2.test.\n",
        "retry_interval = \"6s\"",
    );
    let server = w.env.start();
    // The primary is down: the first message is tried and deferred.
    let first = send(
        &w.env.addr(),
        "alice@sender.test",
        &["bob@example.com"],
        "one",
    );
    assert!(
        wait_for(Duration::from_secs(10), Duration::from_millis(100), || {
            w.env.queue(None).iter().any(|e| e.attempts >= 1)
        }),
        "no delivery attempt:\n{}",
        server.log()
    );
    let q = w.env.queue(None);
    assert_eq!(q.len(), 1);
    assert_eq!(q[0].id, first);
    assert!(
        q[0].last_error
            .as_deref()
            .unwrap_or("")
            .contains("127.0.0.2"),
        "{q:?}"
    );
    // Two more arrive 3 s later: each is tried at once and gets its own, later, retry time.
    std::thread::sleep(Duration::from_secs(3));
    send(
        &w.env.addr(),
        "alice@sender.test",
        &["carol@example.com"],
        "two",
    );
    send(
        &w.env.addr(),
        "alice@sender.test",
        &["dave@example.com"],
        "three",
    );
    assert!(wait_for(
        Duration::from_secs(10),
        Duration::from_millis(100),
        || { w.env.queue(None).iter().all(|e| e.attempts >= 1) }
    ));
    let started = Instant::now();
    // The primary comes back.
    let primary = Receiver::start(w.at(2), Behaviour::Accept);
    // Within one retry interval the first is delivered, and the others follow at once
    // rather than at their own retry time (about 3 s later).
    assert!(
        primary.wait_for(3, Duration::from_secs(9)),
        "only {} messages arrived:\n{}",
        primary.messages().len(),
        server.log()
    );
    let took = started.elapsed();
    assert!(took < Duration::from_secs(8), "took {took:?}");
    assert_eq!(subjects(&primary), ["one", "three", "two"]);
    // The first goes on its own retry; the other two follow at once over the domain's
    // connections (at most max_connections_per_domain of them), not at their retry time.
    let conns: std::collections::HashSet<u64> =
        primary.messages().iter().map(|m| m.connection).collect();
    assert!(conns.len() <= 4, "{conns:?}");
    assert!(
        server
            .log()
            .contains("example.com: delivery works, sending the mail that waits"),
        "{}",
        server.log()
    );
    assert!(wait_queue_empty(&w.env, Duration::from_secs(5)));
    let log = server.log();
    assert!(
        log.contains(&format!(
            "{first}: to=<bob@example.com>, relay=mail.example.com[127.0.0.2]:{}",
            w.port
        )),
        "{log}"
    );
    assert!(log.contains("status=sent (250"), "{log}");
    assert!(log.contains("status=deferred"), "{log}");
    let _ = &w.dns;
}

#[test]
fn self_in_the_middle_drops_every_less_preferred_host() {
    // Preferences: primary 0, us 10, "backup" 20. Primary down: never hand mail to a host
    // less preferred than ourselves.
    let mut w = World::new(
        "@ IN MX 0 mail.example.com.\n@ IN MX 10 mx2.test.\n@ IN MX 20 backup.example.com.\n",
        "retry_interval = \"2s\"",
    );
    let backup = Receiver::start(w.at(3), Behaviour::Accept);
    let server = w.env.start();
    send(
        &w.env.addr(),
        "alice@sender.test",
        &["bob@example.com"],
        "mid",
    );
    assert!(wait_for(
        Duration::from_secs(10),
        Duration::from_millis(100),
        || { w.env.queue(None).iter().any(|e| e.attempts >= 2) }
    ));
    assert_eq!(
        backup.messages().len(),
        0,
        "mail went to a less preferred MX"
    );
    let primary = Receiver::start(w.at(2), Behaviour::Accept);
    assert!(
        primary.wait_for(1, Duration::from_secs(8)),
        "{}",
        server.log()
    );
}

#[test]
fn self_at_the_lowest_preference_uses_the_more_preferred_backup() {
    let mut w = World::new(
        "@ IN MX 0 mail.example.com.\n@ IN MX 5 backup.example.com.\n@ IN MX 10 mx2.test.\n",
        "retry_interval = \"1h\"",
    );
    let backup = Receiver::start(w.at(3), Behaviour::Accept);
    let server = w.env.start();
    send(
        &w.env.addr(),
        "alice@sender.test",
        &["bob@example.com"],
        "low",
    );
    assert!(
        backup.wait_for(1, Duration::from_secs(10)),
        "{}",
        server.log()
    );
    assert!(wait_queue_empty(&w.env, Duration::from_secs(5)));
}

#[test]
fn being_the_best_mx_keeps_mail_queued_with_a_loud_error() {
    let mut w = World::new(
        "@ IN MX 10 mx2.test.\n@ IN MX 20 backup.example.com.\n",
        "retry_interval = \"1h\"",
    );
    let backup = Receiver::start(w.at(3), Behaviour::Accept);
    let server = w.env.start();
    let id = send(
        &w.env.addr(),
        "alice@sender.test",
        &["bob@example.com"],
        "loop",
    );
    assert!(
        wait_for(Duration::from_secs(10), Duration::from_millis(100), || {
            server.log().contains("loops back to myself")
        }),
        "{}",
        server.log()
    );
    let q = w.env.queue(None);
    assert_eq!(q.len(), 1);
    assert_eq!(q[0].id, id);
    assert_eq!(backup.messages().len(), 0);
    assert!(server.log().contains("CONFIGURATION ERROR"));
}

#[test]
fn equal_preferences_fall_over_to_the_one_that_answers() {
    let mut w = World::new(
        "@ IN MX 10 mail.example.com.\n@ IN MX 10 backup.example.com.\n@ IN MX 20 mx2.test.\n",
        "retry_interval = \"1h\"",
    );
    let up = Receiver::start(w.at(3), Behaviour::Accept);
    let server = w.env.start();
    for i in 0..4 {
        send(
            &w.env.addr(),
            "alice@sender.test",
            &["bob@example.com"],
            &format!("eq{i}"),
        );
    }
    assert!(up.wait_for(4, Duration::from_secs(15)), "{}", server.log());
    assert!(wait_queue_empty(&w.env, Duration::from_secs(5)));
}

#[test]
fn no_mx_means_the_domains_own_address() {
    let mut w = World::new("@ IN A 127.0.0.2\n", "retry_interval = \"1h\"");
    let primary = Receiver::start(w.at(2), Behaviour::Accept);
    let server = w.env.start();
    send(
        &w.env.addr(),
        "alice@sender.test",
        &["bob@example.com"],
        "implicit",
    );
    assert!(
        primary.wait_for(1, Duration::from_secs(10)),
        "{}",
        server.log()
    );
    let m = &primary.messages()[0];
    assert_eq!(m.sender, "alice@sender.test");
    assert_eq!(m.recipients, ["bob@example.com"]);
    let data = String::from_utf8_lossy(&m.data).into_owned();
    assert!(
        data.starts_with("Received: from sender.test ([127.0.0.1])\r\n\tby mx2.test (mxspool)"),
        "{data}"
    );
    assert!(data.contains("\r\nSubject: implicit\r\n"));
}

/// The DSN that reached the sender's MX, parsed by Python's `email` package into
/// `name: value` lines (top headers, then each part's content type, then the report fields).
fn python_dsn_fields(dsn: &[u8]) -> String {
    let script = r#"
import sys, email
from email import policy
msg = email.message_from_bytes(sys.stdin.buffer.read(), policy=policy.compat32)
assert not msg.defects, msg.defects
for h in ("From", "To", "Subject", "Auto-Submitted"):
    print(f"{h}: {msg[h]}")
print("top:", msg.get_content_type(), msg.get_param("report-type"))
parts = msg.get_payload()
for p in parts:
    assert not p.defects, p.defects
    print("part:", p.get_content_type())
status = parts[1]
blocks = status.get_payload()
for b in blocks:
    for k, v in b.items():
        print(f"{k}: {v}")
    print("--")
"#;
    let out = run_with_input(
        std::process::Command::new("python3").arg("-c").arg(script),
        30,
        dsn,
    );
    check_ok("python3 parsing the DSN", &out);
    text(&out.stdout)
}

#[test]
fn one_refused_recipient_of_two_bounces_alone() {
    let mut w = World::new(
        "@ IN MX 0 mail.example.com.\n@ IN MX 10 mx2.test.\n",
        "retry_interval = \"1h\"",
    );
    let primary = Receiver::start(
        w.at(2),
        Behaviour::RefuseRcpt(vec!["nobody@example.com".into()]),
    );
    let sender_mx = Receiver::start(w.at(4), Behaviour::Accept);
    let server = w.env.start();
    let id = send(
        &w.env.addr(),
        "alice@sender.test",
        &["bob@example.com", "nobody@example.com"],
        "half",
    );
    assert!(
        primary.wait_for(1, Duration::from_secs(10)),
        "{}",
        server.log()
    );
    assert_eq!(primary.messages()[0].recipients, ["bob@example.com"]);
    assert!(
        sender_mx.wait_for(1, Duration::from_secs(10)),
        "no DSN:\n{}",
        server.log()
    );
    let dsn = &sender_mx.messages()[0];
    assert_eq!(dsn.sender, "", "DSNs come from the null sender");
    assert_eq!(dsn.recipients, ["alice@sender.test"]);
    let fields = python_dsn_fields(&dsn.data);
    for want in [
        "From: Mail Delivery System <MAILER-DAEMON@mx2.test>",
        "To: <alice@sender.test>",
        "Auto-Submitted: auto-replied",
        "top: multipart/report delivery-status",
        "part: message/delivery-status",
        "Reporting-MTA: dns; mx2.test",
        "Final-Recipient: rfc822; nobody@example.com",
        "Action: failed",
        "Status: 5.1.1",
        "Remote-MTA: dns; mail.example.com",
    ] {
        assert!(fields.contains(want), "DSN lacks {want:?}:\n{fields}");
    }
    assert!(
        !fields.contains("bob@example.com"),
        "only the refused recipient is reported"
    );
    assert!(fields.contains("Diagnostic-Code: smtp; "), "{fields}");
    assert!(wait_queue_empty(&w.env, Duration::from_secs(5)));
    assert!(server
        .log()
        .contains(&format!("{id}: to=<nobody@example.com>")));
    assert!(server.log().contains("status=bounced"));
}

#[test]
fn null_mx_bounces_at_once() {
    let mut w = World::new("@ IN MX 0 .\n", "retry_interval = \"1h\"");
    let sender_mx = Receiver::start(w.at(4), Behaviour::Accept);
    let server = w.env.start();
    send(
        &w.env.addr(),
        "alice@sender.test",
        &["bob@example.com"],
        "nullmx",
    );
    assert!(
        sender_mx.wait_for(1, Duration::from_secs(10)),
        "{}",
        server.log()
    );
    let fields = python_dsn_fields(&sender_mx.messages()[0].data);
    assert!(fields.contains("Status: 5.1.10"), "{fields}");
    assert!(wait_queue_empty(&w.env, Duration::from_secs(5)));
}

#[test]
fn a_delay_warning_then_the_bounce_after_max_lifetime() {
    let mut w = World::new(
        "@ IN MX 0 mail.example.com.\n@ IN MX 10 mx2.test.\n",
        "retry_interval = \"1s\"\nmax_lifetime = \"6s\"\ndelay_warning = \"2s\"",
    );
    let sender_mx = Receiver::start(w.at(4), Behaviour::Accept);
    let server = w.env.start();
    send(
        &w.env.addr(),
        "alice@sender.test",
        &["bob@example.com"],
        "expire",
    );
    // A DSN to the null sender is never sent: this one is only retried, then dropped.
    send(&w.env.addr(), "", &["carol@example.com"], "nobody-to-tell");
    assert!(
        sender_mx.wait_for(2, Duration::from_secs(20)),
        "{}",
        server.log()
    );
    let msgs = sender_mx.messages();
    let warning = python_dsn_fields(&msgs[0].data);
    assert!(warning.contains("Action: delayed"), "{warning}");
    assert!(warning.contains("Will-Retry-Until: "), "{warning}");
    assert!(warning.contains("Subject: Delayed Mail"), "{warning}");
    let bounce = python_dsn_fields(&msgs[1].data);
    assert!(bounce.contains("Action: failed"), "{bounce}");
    assert!(
        bounce.contains("Final-Recipient: rfc822; bob@example.com"),
        "{bounce}"
    );
    assert!(
        bounce.contains("Status: 4.4.7") || bounce.contains("Status: 5."),
        "{bounce}"
    );
    assert!(bounce.contains("Arrival-Date: "), "{bounce}");
    assert!(
        wait_queue_empty(&w.env, Duration::from_secs(10)),
        "{}",
        server.log()
    );
    // Nothing more arrives: no DSN about the null sender's message, and just one warning.
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(sender_mx.messages().len(), 2);
}
