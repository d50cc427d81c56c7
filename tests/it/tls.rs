//! STARTTLS, in and out, with a private CA made here (rcgen).
//!
//! Inbound: Python's `ssl`/`smtplib` and swaks `--tls` as the clients (TLS 1.3 and 1.2; 1.1
//! refused), the CVE-2011-0411 injection (a command pipelined behind STARTTLS in the same
//! write is never executed), `Received:` naming TLS, a reload with a new certificate and one
//! with a broken key. Outbound: mxspool delivering to a second mxspool with a certificate
//! (a primary with a local Maildir) under `may`, `verify` (right CA and name; wrong name;
//! untrusted CA), `encrypt` toward a peer without STARTTLS, and `may` toward a peer whose
//! handshake fails (tried again in clear). Postfix on the other side: as the primary with
//! `smtpd_tls_cert_file` (mxspool under `verify`), and as the sender with
//! `smtp_tls_security_level = verify` and the test CA.

use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};

use crate::dns::TestDns;
use crate::harness::*;

/// A private certificate authority.
pub(crate) struct TestCa {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

impl TestCa {
    pub(crate) fn new(name: &str) -> TestCa {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        let key = KeyPair::generate().unwrap();
        TestCa {
            issuer: CertifiedIssuer::self_signed(params, key).unwrap(),
        }
    }

    /// Writes `DIR/STEM.pem` (the leaf and this CA: a full chain) and `DIR/STEM.key` for
    /// a certificate valid for `names` (DNS names or IP addresses) with common name `cn`.
    pub(crate) fn issue(
        &self,
        dir: &Path,
        stem: &str,
        cn: &str,
        names: &[&str],
    ) -> (PathBuf, PathBuf) {
        let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
        let mut params = CertificateParams::new(names).unwrap();
        params.distinguished_name.push(DnType::CommonName, cn);
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        let (c, k) = (
            dir.join(format!("{stem}.pem")),
            dir.join(format!("{stem}.key")),
        );
        fs::write(&c, format!("{}{}", cert.pem(), self.issuer.pem())).unwrap();
        fs::write(&k, key.serialize_pem()).unwrap();
        (c, k)
    }

    pub(crate) fn write_ca(&self, path: &Path) {
        fs::write(path, self.issuer.pem()).unwrap();
    }
}

/// `[smtp]` lines for a certificate.
fn smtp_tls(cert: &Path, key: &Path) -> String {
    format!(
        "tls_certificate = \"{}\"\ntls_key = \"{}\"\n",
        cert.display(),
        key.display()
    )
}

/// A backup MX for example.com (mail stays queued) with a certificate for mx2.test and
/// 127.0.0.1; the CA's certificate is written to `DIR/ca.pem`.
fn inbound() -> (MxEnv, TestCa, PathBuf) {
    let ca = TestCa::new("mxspool test CA");
    let env = MxEnv::custom("");
    let dir = env.dir.path().to_path_buf();
    let (cert, key) = ca.issue(&dir, "mx", "mx2.test", &["mx2.test", "127.0.0.1"]);
    let ca_file = dir.join("ca.pem");
    ca.write_ca(&ca_file);
    fs::write(
        &env.config,
        format!(
            "{}{}\n[queue]\nretry_interval = \"1h\"\n\n[[partner]]\ndomain = \"example.com\"\nroute = [\"127.0.0.1:1\"]\n",
            fs::read_to_string(&env.config).unwrap(),
            smtp_tls(&cert, &key)
        ),
    )
    .unwrap();
    (env, ca, ca_file)
}

const SMTPLIB: &str = r#"
import smtplib, ssl, sys
host, port, ca, version = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
ctx = ssl.create_default_context(cafile=ca)
if version == "1.2":
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
if version == "1.1":
    ctx.set_ciphers("DEFAULT@SECLEVEL=0")
    ctx.minimum_version = ssl.TLSVersion.TLSv1_1
    ctx.maximum_version = ssl.TLSVersion.TLSv1_1
s = smtplib.SMTP(host, port, timeout=20)
s.ehlo("client.test")
print("OFFERED", s.has_extn("starttls"))
try:
    s.starttls(context=ctx)
except Exception as e:
    print("HANDSHAKE-FAILED", repr(e))
    sys.exit(3)
print("VERSION", s.sock.version(), s.sock.cipher()[0])
subject = dict(x[0] for x in s.sock.getpeercert()["subject"])
print("SUBJECT", subject["commonName"])
s.ehlo("client.test")
print("OFFERED-AGAIN", s.has_extn("starttls"))
s.sendmail("s@sender.test", ["u@example.com"], b"Subject: over tls\r\n\r\nhello\r\n")
s.quit()
print("SENT")
"#;

fn smtplib(env: &MxEnv, ca: &Path, version: &str) -> (Output, String) {
    let out = run(
        Command::new("python3")
            .arg("-c")
            .arg(SMTPLIB)
            .arg(&env.ip)
            .arg(env.port.to_string())
            .arg(ca)
            .arg(version),
        60,
    );
    let t = format!("{}{}", text(&out.stdout), text(&out.stderr));
    (out, t)
}

#[test]
fn tls_starttls_is_offered_only_with_a_certificate() {
    let mut plain = MxEnv::new();
    let _s = plain.start();
    let (mut c, _) = Smtp::connect(&plain.addr()).unwrap();
    let ehlo = c.cmd("EHLO client.test").unwrap();
    assert!(
        !ehlo.lines.iter().any(|l| l == "STARTTLS"),
        "STARTTLS offered without a certificate: {ehlo}"
    );
    assert_eq!(c.cmd("STARTTLS").unwrap().code, 502);

    let (mut env, _ca, _) = inbound();
    let _server = env.start();
    let (mut c, _) = Smtp::connect(&env.addr()).unwrap();
    assert_eq!(c.cmd("STARTTLS").unwrap().code, 503, "STARTTLS before EHLO");
    let ehlo = c.cmd("EHLO client.test").unwrap();
    assert!(ehlo.lines.iter().any(|l| l == "STARTTLS"), "{ehlo}");
    let r = c.cmd("STARTTLS please").unwrap();
    assert_eq!(
        (r.code, r.lines[0].as_str()),
        (501, "5.5.4 Syntax: STARTTLS")
    );
}

#[test]
fn tls_smtplib_over_tls_1_3_and_1_2_and_received_names_it() {
    let (mut env, _ca, ca_file) = inbound();
    let server = env.start();
    for (version, want) in [("1.3", "TLSv1.3"), ("1.2", "TLSv1.2")] {
        let (out, t) = smtplib(&env, &ca_file, version);
        assert!(
            out.status.success(),
            "TLS {version}:\n{t}\n{}",
            server.log()
        );
        assert!(t.contains("OFFERED True"), "{t}");
        assert!(t.contains(&format!("VERSION {want}")), "{t}");
        assert!(t.contains("SUBJECT mx2.test"), "{t}");
        assert!(
            t.contains("OFFERED-AGAIN False"),
            "STARTTLS offered over TLS:\n{t}"
        );
        assert!(t.contains("SENT"), "{t}");
    }
    let queue = env.queue(None);
    assert_eq!(queue.len(), 2, "{queue:#?}");
    let mut seen = Vec::new();
    for e in &queue {
        let show = env.show(&e.id).expect("show");
        let received = received_header(&show).expect("a Received: header");
        assert!(received.contains("with ESMTPS id"), "{received}");
        assert!(received.contains("(using TLSv1."), "{received}");
        assert!(received.contains("bits))"), "{received}");
        seen.push(received);
    }
    assert!(
        seen.iter()
            .any(|r| r.contains("(using TLSv1.3 with cipher TLS13_")),
        "{seen:?}"
    );
    assert!(
        seen.iter()
            .any(|r| r.contains("(using TLSv1.2 with cipher TLS_")),
        "{seen:?}"
    );
    assert!(
        server
            .log()
            .contains("TLS connection established from unknown[127.0.0.1]: TLSv1.3"),
        "{}",
        server.log()
    );
}

#[test]
fn tls_1_1_is_refused() {
    let (mut env, _ca, ca_file) = inbound();
    let server = env.start();
    let (out, t) = smtplib(&env, &ca_file, "1.1");
    assert_eq!(out.status.code(), Some(3), "TLS 1.1 was not refused:\n{t}");
    // The server's alert (rustls answers a TLS 1.1 hello with handshake_failure), not the
    // client giving up by itself.
    assert!(
        t.contains("ALERT_HANDSHAKE_FAILURE") || t.contains("ALERT_PROTOCOL_VERSION"),
        "{t}"
    );
    assert!(
        wait_for(Duration::from_secs(5), Duration::from_millis(50), || server
            .log()
            .contains("TLS handshake failed with unknown[127.0.0.1]")),
        "{}",
        server.log()
    );
    assert!(env.queue(None).is_empty());
}

/// `openssl s_client -starttls smtp` at one TLS version (`-tls1_3`, `-tls1_2`, `-tls1_1`):
/// EHLO and QUIT inside TLS; its exit status and everything it printed.
fn s_client(env: &MxEnv, ca: &Path, version: &str) -> (Output, String) {
    let mut cmd = Command::new("openssl");
    cmd.args([
        "s_client",
        "-starttls",
        "smtp",
        "-crlf",
        "-ign_eof",
        "-brief",
    ])
    .args(["-connect", &format!("{}:{}", env.ip, env.port)])
    .args(["-servername", "mx2.test", "-verify_return_error", "-CAfile"])
    .arg(ca)
    .arg(version);
    if version == "-tls1_1" {
        // Let the client offer TLS 1.1 at all: the refusal must be the server's.
        cmd.args(["-cipher", "DEFAULT@SECLEVEL=0"]);
    }
    let out = run_with_input(&mut cmd, 60, b"EHLO client.test\nQUIT\n");
    let t = format!("{}{}", text(&out.stdout), text(&out.stderr));
    (out, t)
}

#[test]
fn tls_openssl_s_client_starttls_at_1_3_and_1_2_resumes_and_1_1_refused() {
    let (mut env, _ca, ca_file) = inbound();
    let server = env.start();
    for (flag, name) in [("-tls1_3", "TLSv1.3"), ("-tls1_2", "TLSv1.2")] {
        let (out, t) = s_client(&env, &ca_file, flag);
        assert!(out.status.success(), "{flag}: {t}");
        assert!(t.contains(&format!("Protocol version: {name}")), "{t}");
        assert!(t.contains("Verification: OK"), "{t}");
        // Inside TLS the session started over: EHLO answers again, without STARTTLS.
        assert!(t.contains("250-") && t.contains("221 "), "{t}");
        assert!(
            !t.contains("250-STARTTLS") && !t.contains("250 STARTTLS"),
            "{t}"
        );
    }
    // A client that keeps its session ticket resumes (no certificate signature), also
    // after a reload: the ticket keys outlive the configuration.
    let sess = env.dir.path().join("session.pem");
    let resume = |arg: &str| {
        let mut cmd = Command::new("openssl");
        cmd.args([
            "s_client",
            "-starttls",
            "smtp",
            "-crlf",
            "-ign_eof",
            "-tls1_3",
        ])
        .args(["-connect", &format!("{}:{}", env.ip, env.port)])
        .args(["-servername", "mx2.test", "-CAfile"])
        .arg(&ca_file)
        .arg(arg)
        .arg(&sess);
        let out = run_with_input(&mut cmd, 60, b"EHLO client.test\nQUIT\n");
        format!("{}{}", text(&out.stdout), text(&out.stderr))
    };
    let first = resume("-sess_out");
    assert!(first.contains("New, TLSv1.3"), "{first}");
    let again = resume("-sess_in");
    assert!(
        again.contains("Reused, TLSv1.3"),
        "the ticket was not taken:\n{again}"
    );
    check_ok("reload", &env.mxspool(&["reload"]));
    let reloaded = resume("-sess_in");
    assert!(
        reloaded.contains("Reused, TLSv1.3"),
        "the ticket did not outlive a reload:\n{reloaded}"
    );
    let (out, t) = s_client(&env, &ca_file, "-tls1_1");
    assert!(!out.status.success(), "TLS 1.1 was not refused:\n{t}");
    assert!(
        t.contains("alert handshake failure") || t.contains("alert protocol version"),
        "{t}"
    );
    assert!(
        wait_for(Duration::from_secs(5), Duration::from_millis(50), || server
            .log()
            .contains("TLS handshake failed with unknown[127.0.0.1]")),
        "{}",
        server.log()
    );
}

const INJECTION: &str = r#"
import socket, ssl, sys
host, port, ca = sys.argv[1], int(sys.argv[2]), sys.argv[3]
def reply(f):
    lines = []
    while True:
        l = f.readline().decode()
        if not l:
            lines.append("EOF")
            return lines
        lines.append(l.strip())
        if l[3:4] != "-":
            return lines
s = socket.create_connection((host, port), timeout=20)
f = s.makefile("rb", buffering=0)
reply(f)
s.sendall(b"EHLO client.test\r\n")
reply(f)
# One write: the MAIL behind STARTTLS arrives in clear with it.
s.sendall(b"STARTTLS\r\nMAIL FROM:<evil@sender.test>\r\n")
print("STARTTLS", reply(f))
t = ssl.create_default_context(cafile=ca).wrap_socket(s, server_hostname="mx2.test")
g = t.makefile("rb", buffering=0)
t.sendall(b"RCPT TO:<u@example.com>\r\n")
print("RCPT", reply(g))
t.sendall(b"EHLO client.test\r\n")
print("EHLO", reply(g))
t.sendall(b"STARTTLS\r\n")
print("STARTTLS2", reply(g))
t.sendall(b"MAIL FROM:<good@sender.test>\r\n")
print("MAIL", reply(g))
t.sendall(b"QUIT\r\n")
print("QUIT", reply(g))
"#;

#[test]
fn tls_commands_pipelined_behind_starttls_are_not_executed() {
    let (mut env, _ca, ca_file) = inbound();
    let server = env.start();
    let out = run(
        Command::new("python3")
            .arg("-c")
            .arg(INJECTION)
            .arg(&env.ip)
            .arg(env.port.to_string())
            .arg(&ca_file),
        60,
    );
    let t = format!("{}{}", text(&out.stdout), text(&out.stderr));
    assert!(out.status.success(), "{t}\n{}", server.log());
    let line = |key: &str| {
        t.lines()
            .find(|l| l.starts_with(&format!("{key} ")))
            .unwrap_or_else(|| panic!("no {key} in:\n{t}"))
            .to_string()
    };
    assert!(
        line("STARTTLS").contains("220 2.0.0 Ready to start TLS"),
        "{t}"
    );
    // The injected MAIL was dropped: no transaction, and no HELO either.
    assert!(line("RCPT").contains("503 5.5.1"), "{t}");
    assert!(!line("EHLO").contains("STARTTLS"), "{t}");
    assert!(line("STARTTLS2").contains("503 5.5.1"), "{t}");
    assert!(line("MAIL").contains("250 2.1.0"), "{t}");
    assert!(line("QUIT").contains("221"), "{t}");
}

#[test]
fn tls_swaks_over_starttls() {
    let (mut env, _ca, _) = inbound();
    let server = env.start();
    let out = run(
        Command::new("swaks")
            .args(["--server", &env.addr()])
            .args(["--helo", "client.test", "--from", "s@sender.test"])
            .args(["--to", "u@example.com", "--timeout", "20", "--tls"]),
        60,
    );
    let t = format!("{}{}", text(&out.stdout), text(&out.stderr));
    assert!(
        out.status.success(),
        "swaks --tls failed:\n{t}\n{}",
        server.log()
    );
    assert!(t.contains("TLS started"), "{t}");
    assert!(t.contains("220 2.0.0 Ready to start TLS"), "{t}");
    let queue = env.queue(None);
    assert_eq!(queue.len(), 1, "{queue:#?}");
    let show = env.show(&queue[0].id).unwrap();
    assert!(
        received_header(&show).unwrap().contains("with ESMTPS"),
        "{show}"
    );
}

#[test]
fn tls_reload_reads_new_certificates_and_keeps_the_old_ones_when_they_are_broken() {
    let (mut env, ca, ca_file) = inbound();
    let _server = env.start();
    let dir = env.dir.path().to_path_buf();
    let (_, t) = smtplib(&env, &ca_file, "1.3");
    assert!(t.contains("SUBJECT mx2.test"), "{t}");

    // A renewed certificate in place of the old files: served after the reload.
    let (new_cert, new_key) = ca.issue(&dir, "new", "mx2.test renewed", &["mx2.test", "127.0.0.1"]);
    fs::copy(&new_cert, dir.join("mx.pem")).unwrap();
    fs::copy(&new_key, dir.join("mx.key")).unwrap();
    check_ok("reload", &env.mxspool(&["reload"]));
    let (out, t) = smtplib(&env, &ca_file, "1.3");
    assert!(
        out.status.success() && t.contains("SUBJECT mx2.test renewed"),
        "{t}"
    );

    // A key that is not one: the reload fails with one line naming it; the old stays.
    fs::write(dir.join("mx.key"), "not a key\n").unwrap();
    let out = env.mxspool(&["reload"]);
    let err = assert_clean_failure("reload with a broken key", &out);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains("mx.key") && err.contains("TLS key"), "{err}");
    let (out, t) = smtplib(&env, &ca_file, "1.3");
    assert!(
        out.status.success() && t.contains("SUBJECT mx2.test renewed"),
        "{t}"
    );

    // A key of another certificate.
    let (_, other_key) = ca.issue(&dir, "other", "other", &["other.test"]);
    fs::copy(&other_key, dir.join("mx.key")).unwrap();
    let err = assert_clean_failure("reload with a foreign key", &env.mxspool(&["reload"]));
    assert!(err.contains("does not belong to the certificate"), "{err}");
}

#[test]
fn tls_bad_certificate_settings_are_one_line_naming_the_file() {
    let env = MxEnv::custom("tls_certificate = \"cert.pem\"\n");
    let err = assert_clean_failure("certificate without key", &env.mxspool(&["queue"]));
    assert!(
        err.contains("tls_certificate") && err.contains("without tls_key"),
        "{err}"
    );

    let env = MxEnv::custom("tls_certificate = \"missing.pem\"\ntls_key = \"missing.key\"\n");
    let err = assert_clean_failure("missing certificate", &env.mxspool(&["queue"]));
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    // Relative to the configuration file's directory.
    let want = env.dir.path().join("missing.pem");
    assert!(err.contains(&want.display().to_string()), "{err}");
}

// ---- outbound ----

/// DNS for example.com (`mail` is 127.0.0.2), a CA, and the primary: a second mxspool
/// named mail.example.com on 127.0.0.2 with example.com as a local Maildir domain and,
/// when `cert_names` is given, a certificate for them signed by `ca`.
struct Outbound {
    _dns: TestDns,
    dns_addr: String,
    primary: MxEnv,
    port: u16,
    dir: tempfile::TempDir,
}

impl Outbound {
    fn new(ca: &TestCa, cert_names: Option<&[&str]>) -> Outbound {
        let zone = "$ORIGIN example.com.\n$TTL 60\n\
             @ IN SOA ns.example.com. hostmaster.example.com. 1 3600 600 86400 60\n\
             @ IN NS ns.example.com.\nns IN A 127.0.0.1\nmail IN A 127.0.0.2\n";
        let dns = TestDns::start(&[("example.com.", zone)]);
        let dir = public_tempdir("mxspool-tls.");
        let port = free_port_at("127.0.0.2");
        let smtp = match cert_names {
            Some(names) => {
                let (c, k) = ca.issue(dir.path(), "primary", names[0], names);
                smtp_tls(&c, &k)
            }
            None => String::new(),
        };
        let primary = MxEnv::host(
            "mail.example.com",
            "127.0.0.2",
            port,
            &format!("{smtp}\n[[local]]\ndomain = \"example.com\"\nmaildir = \"{{dir}}/mail/{{user}}\"\n"),
        );
        Outbound {
            dns_addr: dns.addr.to_string(),
            _dns: dns,
            primary,
            port,
            dir,
        }
    }

    /// The backup: example.com is its partner, routed to mail.example.com (through DNS),
    /// with `delivery` lines in `[delivery]` and `partner` lines in the partner.
    fn backup(&self, delivery: &str, partner: &str) -> MxEnv {
        MxEnv::custom(&format!(
            "[queue]\nretry_interval = \"1h\"\n\n[delivery]\nconnect_timeout = \"2s\"\nnameservers = [\"{}\"]\n{delivery}\n\n[[partner]]\ndomain = \"example.com\"\nroute = [\"mail.example.com:{}\"]\n{partner}\n",
            self.dns_addr, self.port
        ))
    }

    fn delivered(&self) -> Vec<String> {
        maildir_messages(&self.primary.dir.path().join("mail/u"))
    }
}

/// Queues one message at the backup and flushes it with `flush -v`; returns the transcript.
/// The domain is held while the message comes in, so the flush is the delivery.
pub(crate) fn send_and_flush(backup: &MxEnv) -> String {
    check_ok("hold", &backup.mxspool(&["hold", "example.com"]));
    smtp_send(
        &backup.addr(),
        "s@sender.test",
        &["u@example.com"],
        b"Subject: out\r\n\r\nhello primary\r\n",
    );
    let out = backup.mxspool(&["flush", "example.com", "-v"]);
    format!("{}{}", text(&out.stdout), text(&out.stderr))
}

fn wait_delivered(o: &Outbound, n: usize) -> bool {
    wait_for(Duration::from_secs(15), Duration::from_millis(100), || {
        o.delivered().len() >= n
    })
}

#[test]
fn tls_outbound_may_uses_tls_and_verify_checks_chain_and_name() {
    let ca = TestCa::new("mxspool primary CA");
    let mut o = Outbound::new(&ca, Some(&["mail.example.com"]));
    let _p = o.primary.start();
    let ca_file = o.dir.path().join("ca.pem");
    ca.write_ca(&ca_file);

    // may (the default): TLS, certificate not checked.
    let mut backup = o.backup("", "");
    let b = backup.start();
    let t = send_and_flush(&backup);
    assert!(
        wait_delivered(&o, 1),
        "not delivered under may:\n{t}\n{}",
        b.log()
    );
    let got = o.delivered();
    assert!(got[0].contains("with ESMTPS"), "{}", got[0]);
    assert!(t.contains(">>> STARTTLS"), "{t}");
    assert!(
        b.log()
            .contains("Untrusted TLS connection established to mail.example.com[127.0.0.2]"),
        "{}",
        b.log()
    );
    assert!(b.log().contains("tls=TLSv1.3 verified=none"), "{}", b.log());
    drop(b);

    // verify with the CA: verified, delivered.
    let mut backup = o.backup(
        &format!("tls = \"verify\"\ntls_ca_file = \"{}\"", ca_file.display()),
        "",
    );
    let b = backup.start();
    let t = send_and_flush(&backup);
    assert!(
        wait_delivered(&o, 2),
        "not delivered under verify:\n{t}\n{}",
        b.log()
    );
    assert!(
        b.log()
            .contains("Verified TLS connection established to mail.example.com[127.0.0.2]"),
        "{}",
        b.log()
    );
    assert!(b.log().contains("tls=TLSv1.3 verified=pkix"), "{}", b.log());
    assert!(backup.queue(None).is_empty());
    drop(b);

    // verify without the CA (the partner's policy, the system roots only): deferred.
    let mut backup = o.backup("", "tls = \"verify\"");
    let b = backup.start();
    let t = send_and_flush(&backup);
    assert!(t.contains("invalid peer certificate"), "{t}");
    let queue = backup.queue(None);
    assert_eq!(queue.len(), 1, "{queue:#?}\n{t}");
    assert!(b.log().contains("status=deferred"), "{}", b.log());
    assert!(!b.log().contains("status=bounced"), "{}", b.log());
    assert_eq!(
        o.delivered().len(),
        2,
        "sent despite an untrusted certificate"
    );
}

#[test]
fn tls_outbound_verify_defers_on_a_wrong_name_and_encrypt_without_starttls() {
    let ca = TestCa::new("mxspool primary CA");
    let ca_file;
    {
        // A certificate for another name, from the trusted CA.
        let mut o = Outbound::new(&ca, Some(&["other.example.net"]));
        ca_file = o.dir.path().join("ca.pem");
        ca.write_ca(&ca_file);
        let _p = o.primary.start();
        let mut backup = o.backup(
            &format!("tls_ca_file = \"{}\"", ca_file.display()),
            "tls = \"verify\"",
        );
        let b = backup.start();
        let t = send_and_flush(&backup);
        assert!(
            t.contains("NotValidForName") || t.contains("not valid for"),
            "{t}"
        );
        assert_eq!(backup.queue(None).len(), 1, "{t}");
        assert!(
            o.delivered().is_empty(),
            "sent to a host with the wrong name"
        );
        assert!(b.log().contains("status=deferred"), "{}", b.log());
        let line = b
            .log()
            .lines()
            .find(|l| l.contains("status=deferred"))
            .unwrap()
            .to_string();
        assert!(line.contains("TLS handshake"), "{line}");
        assert!(line.contains("dsn=4.7.5"), "{line}");
    }
    {
        // encrypt toward a primary without a certificate: no STARTTLS, deferred.
        let mut o = Outbound::new(&ca, None);
        let _p = o.primary.start();
        let mut backup = o.backup("tls = \"encrypt\"", "");
        let b = backup.start();
        let t = send_and_flush(&backup);
        assert!(t.contains("TLS is required"), "{t}");
        assert_eq!(backup.queue(None).len(), 1, "{t}");
        assert!(o.delivered().is_empty(), "sent in clear under encrypt");
        assert!(
            b.log()
                .contains("but was not offered by host mail.example.com"),
            "{}",
            b.log()
        );
    }
}

/// A next hop that offers STARTTLS, says 220 to it and then sends no TLS at all; on the
/// following connections it takes mail in clear (without offering STARTTLS) and records
/// each message.
struct BrokenTls {
    port: u16,
    messages: Arc<Mutex<Vec<String>>>,
}

impl BrokenTls {
    fn start() -> BrokenTls {
        let port = free_port_at("127.0.0.2");
        let listener = TcpListener::bind(("127.0.0.2", port)).unwrap();
        let messages = Arc::new(Mutex::new(Vec::new()));
        let m = messages.clone();
        std::thread::spawn(move || {
            for (n, conn) in listener.incoming().enumerate() {
                let Ok(conn) = conn else { return };
                let m = m.clone();
                std::thread::spawn(move || {
                    let _ = broken_session(conn, n == 0, &m);
                });
            }
        });
        BrokenTls { port, messages }
    }
}

fn broken_session(
    conn: TcpStream,
    break_tls: bool,
    messages: &Mutex<Vec<String>>,
) -> std::io::Result<()> {
    conn.set_read_timeout(Some(Duration::from_secs(20)))?;
    let mut w = conn.try_clone()?;
    let mut r = BufReader::new(conn);
    w.write_all(b"220 broken.test ESMTP\r\n")?;
    let mut line = String::new();
    loop {
        line.clear();
        if r.read_line(&mut line)? == 0 {
            return Ok(());
        }
        let verb = line.trim_end().to_ascii_uppercase();
        if verb.starts_with("EHLO") {
            if break_tls {
                w.write_all(b"250-broken.test\r\n250 STARTTLS\r\n")?;
            } else {
                w.write_all(b"250 broken.test\r\n")?;
            }
        } else if verb == "STARTTLS" {
            w.write_all(b"220 2.0.0 go ahead\r\nthis is not TLS at all\r\n")?;
            let mut junk = [0u8; 512];
            let _ = r.read(&mut junk);
            return Ok(());
        } else if verb == "DATA" {
            w.write_all(b"354 go\r\n")?;
            let mut data = String::new();
            loop {
                line.clear();
                if r.read_line(&mut line)? == 0 || line == ".\r\n" {
                    break;
                }
                data.push_str(&line);
            }
            messages.lock().unwrap().push(data);
            w.write_all(b"250 2.0.0 ok\r\n")?;
        } else if verb == "QUIT" {
            w.write_all(b"221 bye\r\n")?;
            return Ok(());
        } else {
            w.write_all(b"250 ok\r\n")?;
        }
    }
}

#[test]
fn tls_outbound_may_falls_back_to_clear_when_the_handshake_fails() {
    let peer = BrokenTls::start();
    let mut backup = MxEnv::custom(&format!(
        "[queue]\nretry_interval = \"1h\"\n\n[delivery]\nconnect_timeout = \"2s\"\n\n[[partner]]\ndomain = \"example.com\"\nroute = [\"127.0.0.2:{}\"]\n",
        peer.port
    ));
    let b = backup.start();
    let t = send_and_flush(&backup);
    assert!(
        wait_for(Duration::from_secs(15), Duration::from_millis(100), || {
            !peer.messages.lock().unwrap().is_empty()
        }),
        "not delivered in clear after the failed handshake:\n{t}\n{}",
        b.log()
    );
    assert!(t.contains("TLS handshake with"), "{t}");
    assert!(t.contains("again without TLS"), "{t}");
    assert!(b.log().contains("again without TLS"), "{}", b.log());
    assert!(b.log().contains("tls=none"), "{}", b.log());
    assert!(backup.queue(None).is_empty());
}

// ---- Postfix on the other side ----

/// Postfix as the primary with `smtpd_tls_cert_file`: mxspool under `verify` (the test CA,
/// the route's host name through DNS) delivers over TLS, and Postfix's `Received:` says so.
#[test]
fn tls_postfix_primary_gets_mail_over_verified_tls() {
    let ca = TestCa::new("mxspool primary CA");
    let certs = public_tempdir("mxspool-tls-pf.");
    let (cert, key) = ca.issue(
        certs.path(),
        "mail",
        "mail.example.com",
        &["mail.example.com"],
    );
    let ca_file = certs.path().join("ca.pem");
    ca.write_ca(&ca_file);
    let zone = "$ORIGIN example.com.\n$TTL 60\n\
         @ IN SOA ns.example.com. hostmaster.example.com. 1 3600 600 86400 60\n\
         @ IN NS ns.example.com.\nns IN A 127.0.0.1\nmail IN A 127.0.0.2\n";
    let dns = TestDns::start(&[("example.com.", zone)]);
    let pf_port = free_port_at("127.0.0.2");
    let mailbase = public_tempdir("mxspool-maildir.");
    let postfix = postfix_primary(
        "127.0.0.2",
        pf_port,
        "example.com",
        Some((&cert, &key)),
        mailbase.path(),
    );
    let mut backup = MxEnv::custom(&format!(
        "[queue]\nretry_interval = \"1h\"\n\n[delivery]\nconnect_timeout = \"2s\"\nnameservers = [\"{}\"]\ntls = \"verify\"\ntls_ca_file = \"{}\"\n\n[[partner]]\ndomain = \"example.com\"\nroute = [\"mail.example.com:{pf_port}\"]\n",
        dns.addr,
        ca_file.display()
    ));
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
    assert!(got[0].contains("with ESMTPS"), "{}", got[0]);
    assert!(
        b.log().contains(&format!(
            "Verified TLS connection established to mail.example.com[127.0.0.2]:{pf_port}"
        )),
        "{}",
        b.log()
    );
    assert!(
        postfix.log().contains("TLS connection established from"),
        "{}",
        postfix.log()
    );
}

/// Postfix as the sender with `smtp_tls_security_level = verify` and the test CA: it
/// verifies mxspool's certificate and the mail is queued intact.
#[test]
fn tls_postfix_sender_verifies_mxspool() {
    let (mut env, _ca, ca_file) = inbound();
    let server = env.start();
    let postfix = Postfix::start(
        &format!(
            "relayhost = [127.0.0.1]:{port}\n\
             smtp_tls_security_level = verify\n\
             smtp_tls_CAfile = {ca}\n\
             smtp_tls_policy_maps = inline:{{ {{[127.0.0.1]:{port} = verify match=mx2.test}} }}\n\
             smtp_tls_loglevel = 1\n",
            port = env.port,
            ca = ca_file.display()
        ),
        TLSMGR,
    );
    let message = b"From: <alice@mta1.test>\r\nTo: <u@example.com>\r\nSubject: from postfix\r\n\r\nVerified all the way.\r\n";
    postfix.sendmail("alice@mta1.test", &["u@example.com"], message);
    let mut queue = Vec::new();
    let queued = wait_for(Duration::from_secs(20), Duration::from_millis(200), || {
        queue = env.queue(None);
        !queue.is_empty()
    });
    assert!(
        queued,
        "nothing queued\n--- mxspool\n{}\n--- postfix\n{}",
        server.log(),
        postfix.log()
    );
    assert!(
        postfix
            .log()
            .contains("Verified TLS connection established to 127.0.0.1[127.0.0.1]"),
        "{}",
        postfix.log()
    );
    let show = env.show(&queue[0].id).unwrap();
    assert!(
        received_header(&show).unwrap().contains("with ESMTPS"),
        "{show}"
    );
    assert!(show.contains("Subject: from postfix"), "{show}");
}

/// `mxspool doctor DOMAIN` as the backup, toward the primary of [`Outbound`]: stdout.
pub(crate) fn doctor(backup: &MxEnv) -> String {
    let out = backup.mxspool(&["doctor", "example.com"]);
    let report = text(&out.stdout);
    assert!(
        matches!(out.status.code(), Some(0 | 1)),
        "{report}\n{}",
        text(&out.stderr)
    );
    report
}

#[test]
fn tls_doctor_reports_starttls_the_certificate_and_whether_it_verifies() {
    let ca = TestCa::new("mxspool primary CA");
    let mut o = Outbound::new(&ca, Some(&["mail.example.com"]));
    let _p = o.primary.start();
    let ca_file = o.dir.path().join("ca.pem");
    ca.write_ca(&ca_file);

    // With the CA: STARTTLS, TLS 1.3, the certificate's name and expiry, verified.
    let backup = o.backup(
        &format!("tls_ca_file = \"{}\"", ca_file.display()),
        "tls = \"verify\"",
    );
    let report = doctor(&backup);
    assert!(
        report.contains("(TLS policy toward them: tls = verify)"),
        "{report}"
    );
    assert!(
        report.contains("      TLS: STARTTLS, TLSv1.3, certificate for mail.example.com; expires "),
        "{report}"
    );
    assert!(
        report.contains("; verified (chain to a trust anchor, name matches)"),
        "{report}"
    );
    assert!(
        report.contains(&format!(
            "      TLSA _{}._tcp.mail.example.com.: none",
            o.port
        )),
        "{report}"
    );
    assert!(
        report.contains("  MTA-STS _mta-sts.example.com.: none"),
        "{report}"
    );
    assert!(!report.contains("does not verify"), "{report}");

    // Without it: not verified, and under verify that is a warning (delivery defers).
    let backup = o.backup("", "tls = \"verify\"");
    let report = doctor(&backup);
    assert!(report.contains("; NOT verified: "), "{report}");
    assert!(
        report.contains("does not verify (")
            && report.contains("and tls = verify: delivery to it defers"),
        "{report}"
    );
    // Under may the same certificate is no warning.
    let report = doctor(&o.backup("", ""));
    assert!(report.contains("; NOT verified: "), "{report}");
    assert!(!report.contains("does not verify"), "{report}");

    // A primary without a certificate offers no STARTTLS: a warning under encrypt only.
    let mut clear = Outbound::new(&ca, None);
    let _c = clear.primary.start();
    let report = doctor(&clear.backup("", "tls = \"encrypt\""));
    assert!(
        report.contains("      TLS: STARTTLS not offered"),
        "{report}"
    );
    assert!(
        report.contains("does not offer STARTTLS and tls = encrypt needs it"),
        "{report}"
    );
    let report = doctor(&clear.backup("", ""));
    assert!(
        report.contains("      TLS: STARTTLS not offered"),
        "{report}"
    );
    assert!(!report.contains("does not offer STARTTLS and"), "{report}");
}
