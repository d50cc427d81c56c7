//! `mxspool doctor DOMAIN` against a real DNS server and real listeners on loopback: each
//! warning appears when its cause is there, and no other does.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use crate::dns::TestDns;
use crate::harness::{self, BIN};

/// This server is `smtp.example.net` (127.0.2.3); the primary `terra` is on another /24.
const ZONE: &str = r#"
$ORIGIN example.com.br.
$TTL 300
@         IN SOA   ns1 hostmaster ( 2007080601 3600 600 432000 60 )
          IN NS    ns1
ns1       IN A     127.0.0.53
terra     IN A     127.0.1.2

good      IN MX    0 terra
          IN MX    5 smtp.example.net.

inverted  IN MX    0 smtp.example.net.
          IN MX    10 terra

aliased   IN MX    0 www
          IN MX    5 smtp.example.net.
          IN MX    10 127.0.5.5.
www       IN CNAME terra

samenet   IN MX    0 near
          IN MX    5 smtp.example.net.
near      IN A     127.0.2.9

down      IN MX    0 gone
          IN MX    1 grumpy
          IN MX    5 smtp.example.net.
gone      IN A     127.0.1.7
grumpy    IN A     127.0.1.8

plain     IN A     127.0.4.1
nullmx    IN MX    0 .
foreign   IN MX    0 terra
"#;

const EXAMPLE_NET: &str = r#"
$ORIGIN example.net.
$TTL 300
@         IN SOA   ns1.example.com.br. hostmaster.example.com.br. ( 1 3600 600 432000 60 )
          IN NS    ns1.example.com.br.
smtp      IN A     127.0.2.3
"#;

/// A fake SMTP server on `ip:port` that greets with `banner`, then (after a `220`) answers
/// EHLO, MAIL and RCPT with `250` and QUIT with `221` (enough for a callout); stops on drop.
struct Peer {
    stop: Arc<AtomicBool>,
    thread: Option<thread::JoinHandle<()>>,
}

impl Peer {
    fn start(ip: &str, port: u16, banner: &'static str) -> (Peer, u16) {
        let listener = TcpListener::bind((ip, port)).unwrap_or_else(|e| panic!("bind {ip}: {e}"));
        let port = listener.local_addr().unwrap().port();
        listener.set_nonblocking(true).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = stop.clone();
        let thread = thread::spawn(move || {
            while !stopping.load(Ordering::Relaxed) {
                let Ok((conn, _)) = listener.accept() else {
                    thread::sleep(Duration::from_millis(10));
                    continue;
                };
                let _ = conn.set_nonblocking(false);
                let _ = conn.set_read_timeout(Some(Duration::from_secs(5)));
                let mut conn = BufReader::new(conn);
                let _ = write!(conn.get_mut(), "{banner}\r\n");
                let mut line = String::new();
                while matches!(conn.read_line(&mut line), Ok(n) if n > 0) {
                    let verb = line.get(..4).unwrap_or("").to_ascii_uppercase();
                    let reply: &[u8] = match verb.as_str() {
                        "QUIT" => b"221 2.0.0 bye\r\n",
                        _ if !banner.starts_with("220") => break,
                        "EHLO" | "HELO" | "MAIL" | "RCPT" | "RSET" => b"250 2.0.0 ok\r\n",
                        _ => b"502 5.5.1 no\r\n",
                    };
                    let _ = conn.get_mut().write_all(reply);
                    if verb == "QUIT" {
                        break;
                    }
                    line.clear();
                }
            }
        });
        (
            Peer {
                stop,
                thread: Some(thread),
            },
            port,
        )
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The primary `terra` answering SMTP; its port is the `[delivery] port` of the test.
struct Setup {
    dns: TestDns,
    port: u16,
    peers: Vec<Peer>,
    dir: tempfile::TempDir,
}

impl Setup {
    fn new() -> Setup {
        let dns = TestDns::start(&[("example.com.br.", ZONE), ("example.net.", EXAMPLE_NET)]);
        let (terra, port) = Peer::start("127.0.1.2", 0, "220 terra.example.com.br ESMTP ready");
        Setup {
            dns,
            port,
            peers: vec![terra],
            dir: tempfile::tempdir().unwrap(),
        }
    }

    fn peer(&mut self, ip: &str, banner: &'static str) {
        self.peers.push(Peer::start(ip, self.port, banner).0);
    }

    /// Runs `mxspool doctor DOMAIN` as `smtp.example.net` with `extra` configuration; the
    /// exit status, stdout, and the warnings listed at its end.
    fn doctor(&self, extra: &str, domain: &str) -> (i32, String, Vec<String>) {
        self.doctor_as("smtp.example.net", extra, domain)
    }

    fn doctor_as(&self, hostname: &str, extra: &str, domain: &str) -> (i32, String, Vec<String>) {
        let config = self.dir.path().join("mxspool.toml");
        std::fs::write(
            &config,
            format!(
                "hostname = \"{hostname}\"\nspool = \"{}\"\n{extra}\n\
                 [delivery]\nport = {}\nconnect_timeout = \"2s\"\nnameservers = [\"{}\"]\n",
                self.dir.path().join("spool").display(),
                self.port,
                self.dns.addr
            ),
        )
        .unwrap();
        let out = harness::run(
            Command::new(BIN)
                .arg("--config")
                .arg(&config)
                .arg("doctor")
                .arg(domain),
            60,
        );
        let stdout = harness::text(&out.stdout);
        let code = out.status.code().unwrap_or(-1);
        assert!(
            code == 0 || code == 1,
            "doctor {domain} exited {code}:\n{stdout}\n--- stderr\n{}",
            harness::text(&out.stderr)
        );
        let warnings: Vec<String> = stdout
            .lines()
            .skip_while(|l| *l != "Warnings:")
            .filter_map(|l| l.strip_prefix("  - "))
            .map(str::to_string)
            .collect();
        let expect = if warnings.is_empty() {
            "No warnings (exit status 0)."
        } else {
            "(exit status 1)."
        };
        assert!(stdout.trim_end().ends_with(expect), "{stdout}");
        assert_eq!(code, i32::from(!warnings.is_empty()), "{stdout}");
        (code, stdout, warnings)
    }
}

/// Exactly the expected warnings: one per entry, each containing its text.
fn check_warnings(stdout: &str, warnings: &[String], expected: &[&str]) {
    assert_eq!(
        warnings.len(),
        expected.len(),
        "expected warnings {expected:?}:\n{stdout}"
    );
    for e in expected {
        assert!(
            warnings.iter().any(|w| w.contains(e)),
            "no warning contains {e:?}:\n{stdout}"
        );
    }
}

#[test]
fn doctor_a_sound_backup_mx_has_no_warnings() {
    let s = Setup::new();
    let (code, out, warnings) = s.doctor("", "good.example.com.br");
    check_warnings(&out, &warnings, &[]);
    assert_eq!(code, 0);
    assert!(out.contains("MX hosts of good.example.com.br"), "{out}");
    assert!(out.contains("terra.example.com.br  127.0.1.2"), "{out}");
    assert!(out.contains("<- this server (hostname)"), "{out}");
    assert!(
        out.contains("This server (smtp.example.net) is in the MX set at preference 5."),
        "{out}"
    );
    let probe = format!("terra.example.com.br 127.0.1.2:{}  OK    220 terra", s.port);
    assert!(out.contains(&probe), "{out}");

    // Known by a listen address instead of the hostname.
    let (code, out, warnings) = s.doctor_as(
        "mx2.elsewhere.test",
        "[smtp]\nlisten = [\"127.0.2.3:2525\"]",
        "good.example.com.br",
    );
    check_warnings(&out, &warnings, &[]);
    assert_eq!(code, 0);
    assert!(out.contains("(local address 127.0.2.3)"), "{out}");
    assert!(out.contains("at preference 5"), "{out}");
}

#[test]
fn doctor_warns_when_this_server_is_the_most_preferred() {
    let s = Setup::new();
    let (_, out, warnings) = s.doctor("", "inverted.example.com.br");
    check_warnings(
        &out,
        &warnings,
        &["this server is the most preferred MX host"],
    );
    assert!(out.contains("at preference 0"), "{out}");
    assert!(
        !out.contains("SMTP check"),
        "nothing is more preferred:\n{out}"
    );
}

#[test]
fn doctor_a_primary_is_rightly_the_most_preferred() {
    // The same MX set as above, for a domain this server delivers itself (primary-server
    // mode): being the best MX is the point, not a mistake.
    let s = Setup::new();
    let (code, out, warnings) = s.doctor(
        "[[local]]\ndomain = \"inverted.example.com.br\"\nmaildir = \"/var/mail/{domain}/{user}\"\n",
        "inverted.example.com.br",
    );
    check_warnings(&out, &warnings, &[]);
    assert_eq!(code, 0);
    assert!(out.contains("at preference 0"), "{out}");
    assert!(
        out.contains("Mail for inverted.example.com.br is delivered here, to Maildirs /var/mail/{domain}/{user}."),
        "{out}"
    );
}

#[test]
fn doctor_warns_about_alias_and_address_literal_targets() {
    let s = Setup::new();
    let (_, out, warnings) = s.doctor("", "aliased.example.com.br");
    check_warnings(
        &out,
        &warnings,
        &[
            "www.example.com.br is an alias (CNAME to terra.example.com.br)",
            "MX target 127.0.5.5 is an address literal",
        ],
    );
    // The alias still leads to the primary, which answers.
    assert!(out.contains("OK    220 terra"), "{out}");
}

#[test]
fn doctor_warns_when_all_mx_hosts_share_one_network() {
    let mut s = Setup::new();
    s.peer("127.0.2.9", "220 near.example.com.br ESMTP");
    let (_, out, warnings) = s.doctor("", "samenet.example.com.br");
    check_warnings(
        &out,
        &warnings,
        &["all MX hosts' IPv4 addresses are in 127.0.2.0/24"],
    );
}

#[test]
fn doctor_reports_more_preferred_hosts_that_do_not_answer_smtp() {
    let mut s = Setup::new();
    s.peer(
        "127.0.1.8",
        "554 5.3.2 grumpy.example.com.br not accepting mail",
    );
    let (_, out, warnings) = s.doctor("", "down.example.com.br");
    check_warnings(
        &out,
        &warnings,
        &[
            "MX host gone.example.com.br at 127.0.1.7",
            "MX host grumpy.example.com.br at 127.0.1.8",
        ],
    );
    assert!(out.contains("FAIL  cannot connect"), "{out}");
    assert!(out.contains("FAIL  banner is not 220: 554 5.3.2"), "{out}");
}

#[test]
fn doctor_warns_about_no_mx_null_mx_and_unknown_domains() {
    let mut s = Setup::new();
    s.peer("127.0.4.1", "220 plain.example.com.br ESMTP");
    let (_, out, warnings) = s.doctor("", "plain.example.com.br");
    check_warnings(&out, &warnings, &["has no MX records"]);
    assert!(out.contains("implicit MX"), "{out}");
    assert!(out.contains("is not in the MX set"), "{out}");

    let (_, out, warnings) = s.doctor("", "nullmx.example.com.br");
    check_warnings(&out, &warnings, &["null MX (RFC 7505)"]);

    let (_, out, warnings) = s.doctor("", "no-such-name.example.com.br");
    check_warnings(&out, &warnings, &["no such domain"]);
}

#[test]
fn doctor_warns_when_a_partner_does_not_list_this_server() {
    let s = Setup::new();
    let partner = "[[partner]]\ndomain = \"foreign.example.com.br\"";
    let (_, out, warnings) = s.doctor(partner, "foreign.example.com.br");
    check_warnings(
        &out,
        &warnings,
        &["is a partner domain but this server is not"],
    );
    // Not a partner: being absent is no fault.
    let (code, out, warnings) = s.doctor("", "foreign.example.com.br");
    check_warnings(&out, &warnings, &[]);
    assert_eq!(code, 0);
    assert!(out.contains("SMTP check of the MX hosts"), "{out}");
}

#[test]
fn doctor_probes_the_route_that_delivery_uses() {
    // The partner's MX hosts do not answer on [delivery] port, but its route (another
    // address and port) does: that is where the mail goes, so that is what is checked.
    let s = Setup::new();
    let (_route, route_port) = Peer::start("127.0.1.9", 0, "220 route.example.com.br ESMTP");
    let partner = format!(
        "[[partner]]\ndomain = \"down.example.com.br\"\nroute = [\"127.0.1.9:{route_port}\"]"
    );
    let (code, out, warnings) = s.doctor(&partner, "down.example.com.br");
    check_warnings(&out, &warnings, &[]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("SMTP check of the route"), "{out}");
    assert!(
        out.contains(&format!("route 127.0.1.9 127.0.1.9:{route_port}"))
            && out.contains("OK    220 route.example.com.br"),
        "{out}"
    );
    assert!(!out.contains("gone.example.com.br 127.0.1.7:"), "{out}");

    // A route that does not answer is the warning, with its own port.
    let closed = harness::closed_port_at("127.0.1.9");
    let partner =
        format!("[[partner]]\ndomain = \"down.example.com.br\"\nroute = [\"127.0.1.9:{closed}\"]");
    let (_, out, warnings) = s.doctor(&partner, "down.example.com.br");
    check_warnings(
        &out,
        &warnings,
        &[&format!(
            "route 127.0.1.9 at 127.0.1.9:{closed} does not answer SMTP"
        )],
    );
}

#[test]
fn doctor_refuses_a_malformed_domain() {
    let s = Setup::new();
    let config = s.dir.path().join("mxspool.toml");
    std::fs::write(
        &config,
        format!(
            "hostname = \"smtp.example.net\"\nspool = \"spool\"\n[delivery]\nnameservers = [\"{}\"]\n",
            s.dns.addr
        ),
    )
    .unwrap();
    for bad in ["bad..domain", "x-.example", "a b", "\u{1b}[31mred"] {
        let out = harness::run(
            Command::new(BIN)
                .arg("--config")
                .arg(&config)
                .args(["doctor", bad]),
            30,
        );
        let err = harness::assert_clean_failure(&format!("doctor {bad:?}"), &out);
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(err.contains("is not a domain name"), "{err}");
        assert!(!err.contains('\u{1b}'), "raw escape on stderr: {err:?}");
        assert!(!harness::text(&out.stdout).contains("bounces"));
    }
}

#[test]
fn doctor_shows_a_partners_defences_and_tries_its_callout() {
    let mut s = Setup::new();
    let users = s.dir.path().join("good.users");
    std::fs::write(&users, "alice\nbob\n").unwrap();
    let partner = format!(
        "[smtp]\nmax_message_rate = \"100/1h\"\n\n[[partner]]\ndomain = \"good.example.com.br\"\n\
         recipients = \"{}\"\nverify = \"callout\"\nmax_messages = 100\nmax_bytes = \"1MiB\"\n",
        users.display()
    );
    let (_, out, warnings) = s.doctor(&partner, "good.example.com.br");
    check_warnings(&out, &warnings, &[]);
    for line in [
        "Defences of partner good.example.com.br:",
        "  recipients: 2 entries from",
        "  callout: postmaster@good.example.com.br accepted by the primary",
        "  quota: 0 of 100 messages, 0 of 1048576 bytes (0%) (nothing queued yet)",
        "  rate limits per client: connections off, messages 100/1h",
        "  DNS blocklists: none",
    ] {
        assert!(out.contains(line), "no {line:?} in:\n{out}");
    }

    // A primary that does not answer: the callout is a warning too.
    s.peer(
        "127.0.1.8",
        "554 5.3.2 grumpy.example.com.br not accepting mail",
    );
    let partner = "[[partner]]\ndomain = \"down.example.com.br\"\nverify = \"callout\"\n";
    let (_, out, warnings) = s.doctor(partner, "down.example.com.br");
    check_warnings(
        &out,
        &warnings,
        &[
            "MX host gone.example.com.br at 127.0.1.7",
            "MX host grumpy.example.com.br at 127.0.1.8",
            "the callout to the primary of down.example.com.br gets no answer",
        ],
    );
    assert!(
        out.contains("  callout: no answer from the primary: "),
        "{out}"
    );
    assert!(out.contains("  quota: none"), "{out}");
}
