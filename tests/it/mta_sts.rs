//! MTA-STS (RFC 8461) on outbound delivery by MX, end to end: a real DNS server on loopback
//! ([`TestDns`]) publishes `_mta-sts.example.com` TXT, `mail.example.com` (the MX) and
//! `mta-sts.example.com`; the policy server is Python's `http.server` with `ssl` on port 443
//! of its own loopback address (127.0.82.N), with a certificate for `mta-sts.example.com`
//! from a private CA ([`TestCa`], trusted through `tls_ca_file`), and writes one line per
//! request to a log so the tests count fetches. The primary is Postfix (verified TLS) or a
//! second mxspool on 127.0.81.N (no STARTTLS). Each test has its own N, so they run in
//! parallel. Needs root (port 443), python3 with `ssl`, and Postfix.

use std::fs;
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::dns::TestDns;
use crate::harness::*;
use crate::tls::{doctor, send_and_flush, TestCa};

const POLICY_SERVER: &str = r#"
import http.server, ssl, sys
cert, key, addr, policy, log = sys.argv[1:6]
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        with open(log, "a") as f:
            f.write(self.path + "\n")
        if self.path != "/.well-known/mta-sts.txt":
            self.send_response(404)
            self.end_headers()
            return
        with open(policy, "rb") as f:
            body = f.read()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
srv = http.server.HTTPServer((addr, 443), H)
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain(cert, key)
srv.socket = ctx.wrap_socket(srv.socket, server_side=True)
srv.serve_forever()
"#;

/// The pieces of one test: its CA (written to `ca.pem`), its addresses and the policy.
struct Sts {
    dir: tempfile::TempDir,
    ca: TestCa,
    ca_file: PathBuf,
    /// `127.0.81.N`: the MX host `mail.example.com`.
    mx_ip: String,
    /// `127.0.82.N`: `mta-sts.example.com`, the policy server.
    policy_ip: String,
    policy_file: PathBuf,
    requests: PathBuf,
}

impl Sts {
    fn new(n: u8) -> Sts {
        let dir = public_tempdir("mxspool-sts.");
        let ca = TestCa::new("mxspool MTA-STS CA");
        let ca_file = dir.path().join("ca.pem");
        ca.write_ca(&ca_file);
        Sts {
            ca_file,
            ca,
            mx_ip: format!("127.0.81.{n}"),
            policy_ip: format!("127.0.82.{n}"),
            policy_file: dir.path().join("mta-sts.txt"),
            requests: dir.path().join("requests.log"),
            dir,
        }
    }

    /// DNS for example.com: MX 10 mail, `mail` and `mta-sts` on this test's addresses, and
    /// `_mta-sts` TXT `v=STSv1; id=ID;` with TTL 0 (so a resolver asks again each time).
    fn dns(&self, id: &str) -> TestDns {
        let zone = format!(
            "$ORIGIN example.com.\n$TTL 60\n\
             @ IN SOA ns.example.com. hostmaster.example.com. 1 3600 600 86400 60\n\
             @ IN NS ns.example.com.\n@ IN MX 10 mail\nns IN A 127.0.0.1\n\
             mail IN A {}\nmta-sts IN A {}\n_mta-sts 0 IN TXT \"v=STSv1; id={id};\"\n",
            self.mx_ip, self.policy_ip
        );
        TestDns::start(&[("example.com.", &zone)])
    }

    fn set_policy(&self, mode: &str, mx: &[&str]) {
        let mut p = format!("version: STSv1\r\nmode: {mode}\r\n");
        for m in mx {
            p.push_str(&format!("mx: {m}\r\n"));
        }
        p.push_str("max_age: 86400\r\n");
        fs::write(&self.policy_file, p).unwrap();
    }

    /// How many times the policy was fetched.
    fn fetches(&self) -> usize {
        fs::read_to_string(&self.requests)
            .unwrap_or_default()
            .lines()
            .filter(|l| *l == "/.well-known/mta-sts.txt")
            .count()
    }

    /// Starts the policy server (a certificate for mta-sts.example.com) and waits until it
    /// accepts on 443.
    fn serve(&self) -> PolicyServer {
        let (cert, key) = self.ca.issue(
            self.dir.path(),
            "mta-sts",
            "mta-sts.example.com",
            &["mta-sts.example.com"],
        );
        let script = self.dir.path().join("policy_server.py");
        fs::write(&script, POLICY_SERVER).unwrap();
        let child = Command::new("python3")
            .arg(&script)
            .arg(&cert)
            .arg(&key)
            .arg(&self.policy_ip)
            .arg(&self.policy_file)
            .arg(&self.requests)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(fs::File::create(self.dir.path().join("policy_server.err")).unwrap())
            .spawn()
            .expect("python3 (needed for the MTA-STS policy server) must be installed");
        let mut server = PolicyServer { child };
        let addr = format!("{}:443", self.policy_ip);
        let up = wait_for(Duration::from_secs(10), Duration::from_millis(50), || {
            TcpStream::connect(&addr).is_ok()
        });
        if !up {
            let _ = server.child.kill();
            panic!(
                "the policy server does not listen on {addr} (root is needed for port 443):\n{}",
                fs::read_to_string(self.dir.path().join("policy_server.err")).unwrap_or_default()
            );
        }
        server
    }

    /// A primary mxspool named mail.example.com on 127.0.81.N without a certificate (no
    /// STARTTLS), delivering example.com to Maildirs.
    fn clear_primary(&self) -> MxEnv {
        MxEnv::host(
            "mail.example.com",
            &self.mx_ip,
            free_port_at(&self.mx_ip),
            "[[local]]\ndomain = \"example.com\"\nmaildir = \"{dir}/mail/{user}\"\n",
        )
    }

    /// The backup: example.com is its partner, delivered by MX (no route) on `port`, with
    /// the test CA trusted and `delivery` lines in `[delivery]`.
    fn backup(&self, dns: &TestDns, port: u16, delivery: &str) -> MxEnv {
        MxEnv::custom(&format!(
            "[queue]\nretry_interval = \"1h\"\n\n[delivery]\nconnect_timeout = \"2s\"\nport = {port}\nnameservers = [\"{}\"]\ntls_ca_file = \"{}\"\n{delivery}\n\n[[partner]]\ndomain = \"example.com\"\n",
            dns.addr,
            self.ca_file.display()
        ))
    }
}

/// The policy server process; killed on drop.
struct PolicyServer {
    child: Child,
}

impl PolicyServer {
    fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for PolicyServer {
    fn drop(&mut self) {
        self.stop();
    }
}

fn delivered(primary: &MxEnv) -> Vec<String> {
    maildir_messages(&primary.dir.path().join("mail/u"))
}

/// The `status=deferred` log line, which must exist.
fn deferred_line(log: &str) -> String {
    log.lines()
        .find(|l| l.contains("status=deferred"))
        .unwrap_or_else(|| panic!("no status=deferred line:\n{log}"))
        .to_string()
}

/// The one message was deferred (4.7.5) under the enforce policy id=1 and stays queued
/// (no bounce); the queue.
fn deferred_by_enforce(b: &Server, backup: &MxEnv) -> Vec<QueueEntry> {
    let line = deferred_line(&b.log());
    assert!(line.contains("dsn=4.7.5"), "{line}");
    assert!(
        line.contains("MTA-STS policy for example.com: mode=enforce id=1"),
        "{line}"
    );
    let queue = backup.queue(None);
    assert_eq!(
        queue.len(),
        1,
        "a bounce was queued, or the mail left: {queue:?}"
    );
    queue
}

/// Postfix as the primary on 127.0.81.N with a certificate for mail.example.com from the
/// test CA; its Maildir base.
fn tls_postfix(s: &Sts, port: u16) -> (Postfix, tempfile::TempDir) {
    tls_postfix_for(s, port, "mail.example.com")
}

/// The same with a certificate (from the test CA) for `name` only.
fn tls_postfix_for(s: &Sts, port: u16, name: &str) -> (Postfix, tempfile::TempDir) {
    let (cert, key) = s.ca.issue(s.dir.path(), "mail", name, &[name]);
    let mailbase = public_tempdir("mxspool-sts-maildir.");
    let postfix = postfix_primary(
        &s.mx_ip,
        port,
        "example.com",
        Some((&cert, &key)),
        mailbase.path(),
    );
    (postfix, mailbase)
}

/// enforce, the MX host listed, Postfix with a certificate for it: delivered over verified
/// TLS, the policy fetched once and then used from the cache.
#[test]
fn mta_sts_enforce_delivers_over_verified_tls_to_a_listed_mx() {
    let s = Sts::new(1);
    s.set_policy("enforce", &["mail.example.com"]);
    let dns = s.dns("1");
    let _policy = s.serve();
    let port = free_port_at(&s.mx_ip);
    let (postfix, mailbase) = tls_postfix(&s, port);
    let mut backup = s.backup(&dns, port, "");
    let b = backup.start();
    let t = send_and_flush(&backup);
    let maildir = mailbase.path().join("mail");
    let mut got = Vec::new();
    let arrived = wait_for(Duration::from_secs(15), Duration::from_millis(100), || {
        got = maildir_messages(&maildir);
        !got.is_empty()
    });
    assert!(
        arrived,
        "nothing in Postfix's Maildir:\n{t}\n--- mxspool\n{}\n--- postfix\n{}",
        b.log(),
        postfix.log()
    );
    assert!(got[0].contains("(using TLSv1."), "{}", got[0]);
    assert!(
        t.contains("MTA-STS policy for example.com: mode=enforce id=1 (fetched)"),
        "{t}"
    );
    assert!(t.contains("tls = verify"), "{t}");
    let log = b.log();
    let sent = log
        .lines()
        .find(|l| l.contains("status=sent"))
        .unwrap_or_else(|| panic!("no status=sent line:\n{log}"));
    assert!(sent.contains("verified=pkix"), "{sent}");
    assert!(
        sent.contains(&format!("relay=mail.example.com[{}]:{port}", s.mx_ip)),
        "{sent}"
    );
    assert_eq!(s.fetches(), 1);
    assert!(backup.queue(None).is_empty());

    // A second message: the cached policy, no new fetch.
    let t = send_and_flush(&backup);
    assert!(
        t.contains("MTA-STS policy for example.com: mode=enforce id=1 (cached)"),
        "{t}"
    );
    assert!(
        wait_for(Duration::from_secs(15), Duration::from_millis(100), || {
            maildir_messages(&maildir).len() >= 2
        }),
        "{t}"
    );
    assert_eq!(s.fetches(), 1);
}

/// enforce toward a primary whose certificate chains to a trusted CA but names another
/// host: the policy's `verify` refuses it (4.7.5), nothing is sent, nothing bounces.
#[test]
fn mta_sts_enforce_defers_toward_a_certificate_for_another_name() {
    let s = Sts::new(9);
    s.set_policy("enforce", &["mail.example.com"]);
    let dns = s.dns("1");
    let _policy = s.serve();
    let port = free_port_at(&s.mx_ip);
    let (postfix, mailbase) = tls_postfix_for(&s, port, "other.example.net");
    let mut backup = s.backup(&dns, port, "");
    let b = backup.start();
    let t = send_and_flush(&backup);
    assert!(t.contains("tls = verify"), "{t}");
    deferred_by_enforce(&b, &backup);
    let maildir = mailbase.path().join("mail");
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        maildir_messages(&maildir).is_empty(),
        "delivered to a certificate for another name under enforce:\n{}",
        postfix.log()
    );
}

/// enforce toward a primary without STARTTLS: deferred with 4.7.5 naming the policy;
/// nothing reaches the primary, nothing bounces.
#[test]
fn mta_sts_enforce_defers_toward_a_primary_without_starttls() {
    let s = Sts::new(2);
    s.set_policy("enforce", &["mail.example.com"]);
    let dns = s.dns("1");
    let _policy = s.serve();
    let mut primary = s.clear_primary();
    let _p = primary.start();
    let mut backup = s.backup(&dns, primary.port, "");
    let b = backup.start();
    let t = send_and_flush(&backup);
    assert!(t.contains("TLS is required"), "{t}");
    let queue = deferred_by_enforce(&b, &backup);
    assert_eq!(queue[0].domain, "example.com");
    assert!(
        queue[0]
            .last_error
            .as_deref()
            .unwrap_or("")
            .contains("MTA-STS"),
        "{queue:?}"
    );
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        delivered(&primary).is_empty(),
        "sent in clear under enforce"
    );
}

/// enforce with an MX host that matches no `mx:` pattern: the host is not tried at all.
#[test]
fn mta_sts_enforce_skips_an_mx_host_outside_the_policy() {
    let s = Sts::new(3);
    s.set_policy("enforce", &["*.other.example.net"]);
    let dns = s.dns("1");
    let _policy = s.serve();
    let mut primary = s.clear_primary();
    let p = primary.start();
    let mut backup = s.backup(&dns, primary.port, "");
    let b = backup.start();
    let connects = || p.log().matches("connect from").count();
    let before = connects();
    let t = send_and_flush(&backup);
    assert!(
        t.contains(
            "skipping MX host mail.example.com: it matches no mx pattern (*.other.example.net)"
        ),
        "{t}"
    );
    assert!(!t.contains("connecting to mail.example.com"), "{t}");
    let line = deferred_line(&b.log());
    assert!(line.contains("dsn=4.7.5"), "{line}");
    assert!(
        line.contains("no MX host matches its mx patterns"),
        "{line}"
    );
    assert_eq!(backup.queue(None).len(), 1);
    // The primary saw no connection from the backup.
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(connects(), before, "{}", p.log());
    assert!(delivered(&primary).is_empty());
}

/// testing toward a primary without STARTTLS: delivered in clear, with a warning that
/// enforce would have refused it.
#[test]
fn mta_sts_testing_delivers_in_clear_and_says_enforce_would_refuse() {
    let s = Sts::new(4);
    s.set_policy("testing", &["mail.example.com"]);
    let dns = s.dns("1");
    let _policy = s.serve();
    let mut primary = s.clear_primary();
    let _p = primary.start();
    let mut backup = s.backup(&dns, primary.port, "");
    let b = backup.start();
    let t = send_and_flush(&backup);
    assert!(
        wait_for(Duration::from_secs(15), Duration::from_millis(100), || {
            !delivered(&primary).is_empty()
        }),
        "{t}\n{}",
        b.log()
    );
    assert!(
        t.contains("MTA-STS policy for example.com: mode=testing id=1 (fetched)"),
        "{t}"
    );
    let warn = format!(
        "MTA-STS policy for example.com is testing: enforce would refuse mail.example.com[{}]:{}: no TLS",
        s.mx_ip, primary.port
    );
    assert!(b.log().contains(&warn), "{}", b.log());
    let log = b.log();
    let sent = log.lines().find(|l| l.contains("status=sent")).unwrap();
    assert!(sent.contains("tls=none"), "{sent}");
    assert_eq!(s.fetches(), 1);
}

/// The cache: one fetch; with the policy server gone and mxspool restarted, the cached
/// enforce policy still defers toward a primary without STARTTLS; a new `id=` in TXT is
/// fetched again (here a testing policy, so the mail then goes in clear).
#[test]
fn mta_sts_policy_is_cached_in_the_spool_and_refetched_for_a_new_id() {
    let s = Sts::new(5);
    s.set_policy("enforce", &["mail.example.com"]);
    let dns = s.dns("1");
    let mut policy = s.serve();
    let mut primary = s.clear_primary();
    let _p = primary.start();
    let mut backup = s.backup(&dns, primary.port, "");
    let mut b = backup.start();
    let t = send_and_flush(&backup);
    assert!(t.contains("mode=enforce id=1 (fetched)"), "{t}");
    let t = backup.mxspool(&["flush", "example.com", "-v"]);
    let t = format!("{}{}", text(&t.stdout), text(&t.stderr));
    assert!(t.contains("mode=enforce id=1 (cached)"), "{t}");
    assert_eq!(s.fetches(), 1);

    policy.stop();
    assert!(stop_server(&mut b));
    let b = backup.start();
    let t = backup.mxspool(&["flush", "example.com", "-v"]);
    let t = format!("{}{}", text(&t.stdout), text(&t.stderr));
    assert!(t.contains("mode=enforce id=1 (cached)"), "{t}\n{}", b.log());
    assert!(t.contains("TLS is required"), "{t}");
    assert_eq!(backup.queue(None).len(), 1);
    assert!(
        delivered(&primary).is_empty(),
        "sent in clear under the cached enforce"
    );
    drop(b);

    // id=2 with a testing policy behind it: fetched again, and applied.
    s.set_policy("testing", &["mail.example.com"]);
    let _policy = s.serve();
    let dns2 = s.dns("2");
    let config = fs::read_to_string(&backup.config).unwrap();
    let old = format!("nameservers = [\"{}\"]", dns.addr);
    assert!(config.contains(&old));
    fs::write(
        &backup.config,
        config.replace(&old, &format!("nameservers = [\"{}\"]", dns2.addr)),
    )
    .unwrap();
    let b = backup.start();
    let t = backup.mxspool(&["flush", "example.com", "-v"]);
    let t = format!("{}{}", text(&t.stdout), text(&t.stderr));
    assert!(
        t.contains("mode=testing id=2 (fetched)"),
        "{t}\n{}",
        b.log()
    );
    assert_eq!(s.fetches(), 2);
    assert!(
        wait_for(Duration::from_secs(15), Duration::from_millis(100), || {
            !delivered(&primary).is_empty()
        }),
        "{t}\n{}",
        b.log()
    );
}

/// `[delivery] mta_sts = false`: no policy is fetched or applied; an enforce policy does not
/// keep the mail from a primary without STARTTLS.
#[test]
fn mta_sts_off_fetches_nothing_and_applies_nothing() {
    let s = Sts::new(6);
    s.set_policy("enforce", &["mail.example.com"]);
    let dns = s.dns("1");
    let _policy = s.serve();
    let mut primary = s.clear_primary();
    let _p = primary.start();
    let mut backup = s.backup(&dns, primary.port, "mta_sts = false");
    let b = backup.start();
    let t = send_and_flush(&backup);
    assert!(
        wait_for(Duration::from_secs(15), Duration::from_millis(100), || {
            !delivered(&primary).is_empty()
        }),
        "{t}\n{}",
        b.log()
    );
    assert!(!t.contains("MTA-STS"), "{t}");
    assert!(!b.log().contains("MTA-STS"), "{}", b.log());
    assert_eq!(s.fetches(), 0);
}

/// `doctor` fetches the policy and reports its mode, max_age and mx patterns, whether each
/// MX host matches, and warns when enforce would defer.
#[test]
fn mta_sts_doctor_reports_the_policy_and_what_enforce_would_do() {
    let s = Sts::new(7);
    s.set_policy("enforce", &["mail.example.com", "*.mx.example.com"]);
    let dns = s.dns("7");
    let _policy = s.serve();
    let mut primary = s.clear_primary();
    let _p = primary.start();
    let backup = s.backup(&dns, primary.port, "");
    let report = doctor(&backup);
    assert!(
        report.contains("  MTA-STS _mta-sts.example.com.: v=STSv1; id=7"),
        "{report}"
    );
    assert!(
        report.contains(
            "    policy https://mta-sts.example.com/.well-known/mta-sts.txt: mode enforce, max_age 86400 s, mx mail.example.com, *.mx.example.com"
        ),
        "{report}"
    );
    assert!(
        report.contains("    MX host mail.example.com: matches"),
        "{report}"
    );
    assert!(
        report.contains(&format!(
            "mail.example.com at {}:{} does not offer STARTTLS and the MTA-STS policy of example.com is enforce: delivery to it defers",
            s.mx_ip, primary.port
        )),
        "{report}"
    );
    assert_eq!(s.fetches(), 1);

    // A policy whose patterns leave the MX host out.
    s.set_policy("enforce", &["*.other.example.net"]);
    let report = doctor(&backup);
    assert!(
        report.contains("    MX host mail.example.com: matches no mx pattern"),
        "{report}"
    );
    assert!(
        report.contains(
            "no MX host of example.com matches its enforced MTA-STS policy: delivery defers"
        ),
        "{report}"
    );

    // testing: reported, no warning about it.
    s.set_policy("testing", &["*.other.example.net"]);
    let report = doctor(&backup);
    assert!(
        report.contains(": mode testing, max_age 86400 s"),
        "{report}"
    );
    assert!(
        !report.contains("MTA-STS policy of example.com is enforce"),
        "{report}"
    );
    assert!(!report.contains("enforced MTA-STS"), "{report}");

    // mta_sts = false: reported as not applied.
    s.set_policy("enforce", &["*.other.example.net"]);
    let off = s.backup(&dns, primary.port, "mta_sts = false");
    let report = doctor(&off);
    assert!(
        report.contains("    ([delivery] mta_sts = false: delivery does not apply it)"),
        "{report}"
    );
    assert!(!report.contains("enforced MTA-STS"), "{report}");

    // The policy server gone: a warning that the policy cannot be fetched.
    drop(_policy);
    let report = doctor(&backup);
    assert!(report.contains("could not be fetched"), "{report}");
    assert!(
        report.contains("the MTA-STS policy of example.com (id=7) could not be fetched"),
        "{report}"
    );
}

/// A TXT record whose policy cannot be fetched (nothing listens on mta-sts.example.com:443)
/// and nothing cached: delivered as without MTA-STS, with a warning; the next delivery within
/// FETCH_RETRY does not try the fetch again (no wait).
#[test]
fn mta_sts_unfetchable_policy_delivers_as_without_it_and_is_not_retried_at_once() {
    let s = Sts::new(8);
    s.set_policy("enforce", &["mail.example.com"]);
    let dns = s.dns("1");
    let mut primary = s.clear_primary();
    let _p = primary.start();
    let mut backup = s.backup(&dns, primary.port, "");
    let b = backup.start();
    let t = send_and_flush(&backup);
    assert!(
        wait_for(Duration::from_secs(15), Duration::from_millis(100), || {
            !delivered(&primary).is_empty()
        }),
        "{t}\n{}",
        b.log()
    );
    assert!(
        t.contains("MTA-STS policy for example.com (id=1) could not be fetched: ")
            && t.contains("; delivering as without MTA-STS"),
        "{t}"
    );
    let t = send_and_flush(&backup);
    assert!(
        t.contains("could not be fetched: the last fetch failed less than 300 s ago"),
        "{t}"
    );
    assert!(
        wait_for(Duration::from_secs(15), Duration::from_millis(100), || {
            delivered(&primary).len() >= 2
        }),
        "{t}\n{}",
        b.log()
    );
    assert_eq!(s.fetches(), 0);
}

/// A `_mta-sts` TXT question that gets no answer holds a delivery no longer than the TXT
/// bound (5 s), not the minute the DNS server keeps it: with a policy cached, that policy
/// holds (enforce toward a primary without STARTTLS: deferred, nothing in clear, nothing
/// fetched); with none cached (a second backup, its own spool), the mail goes as without
/// MTA-STS.
#[test]
fn mta_sts_txt_lookup_without_answer_keeps_the_cached_policy_or_delivers_as_without() {
    let s = Sts::new(10);
    s.set_policy("enforce", &["mail.example.com"]);
    let dns = s.dns("1");
    let mut policy = s.serve();
    let mut primary = s.clear_primary();
    let _p = primary.start();
    let mut backup = s.backup(&dns, primary.port, "");
    let b = backup.start();
    let t = send_and_flush(&backup);
    assert!(t.contains("mode=enforce id=1 (fetched)"), "{t}");
    assert_eq!(backup.queue(None).len(), 1);

    // From here TXT questions get no answer, and the policy server is gone.
    dns.hold_txt
        .store(true, std::sync::atomic::Ordering::SeqCst);
    policy.stop();
    let flush = |env: &MxEnv| {
        let started = std::time::Instant::now();
        let out = env.mxspool(&["flush", "example.com", "-v"]);
        let t = format!("{}{}", text(&out.stdout), text(&out.stderr));
        (t, started.elapsed())
    };
    let (t, took) = flush(&backup);
    assert!(
        t.contains("TXT lookup for _mta-sts.example.com failed"),
        "{t}\n{}",
        b.log()
    );
    assert!(t.contains("using the cached policy"), "{t}");
    assert!(t.contains("mode=enforce id=1 (cached)"), "{t}");
    assert!(t.contains("TLS is required"), "{t}");
    assert!(
        took < crate::dns::HOLD / 2,
        "the flush waited {took:?} for a TXT answer"
    );
    assert_eq!(backup.queue(None).len(), 1, "{}", b.log());
    assert!(
        delivered(&primary).is_empty(),
        "sent in clear under the cached enforce"
    );
    assert_eq!(s.fetches(), 1);
    drop(b);

    // A backup with no policy cached: delivered in clear, as without MTA-STS.
    let mut fresh = s.backup(&dns, primary.port, "");
    let f = fresh.start();
    let t = send_and_flush(&fresh);
    assert!(
        t.contains("no cached policy, delivering as without MTA-STS"),
        "{t}\n{}",
        f.log()
    );
    assert!(
        wait_for(Duration::from_secs(15), Duration::from_millis(100), || {
            !delivered(&primary).is_empty()
        }),
        "{t}\n{}",
        f.log()
    );
    assert_eq!(s.fetches(), 1, "a policy was fetched without a TXT answer");
}
