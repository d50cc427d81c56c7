//! DANE for outbound SMTP (RFC 7672) against a real DNSSEC chain on loopback.
//!
//! Each test signs its zones here (`ldns-keygen -a ECDSAP256SHA256`, `ldns-signzone`),
//! serves them with a private `nsd` and puts a private validating `unbound` in front of
//! it (the zone's DS as its trust anchor; an unsigned zone as `domain-insecure`), every
//! daemon on its own 127.0.77.x address and port, in the foreground, with its files in a
//! temporary directory. mxspool's `[delivery] nameservers` is that unbound, and the MX of
//! the partner domain is a private Postfix with `smtpd_tls_cert_file` (a certificate from
//! a CA made here with rcgen). The TLSA records are computed from that certificate:
//! `3 1 1` (SHA-256 of the server's SubjectPublicKeyInfo) and `2 0 1` (SHA-256 of the CA's
//! certificate). Needs nsd, unbound, ldnsutils (ldns-keygen, ldns-signzone, drill) and
//! Postfix; a missing tool fails the test.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};

use crate::harness::*;

const NSD_IP: &str = "127.0.77.1";
const UNBOUND_IP: &str = "127.0.77.2";
const PRIMARY_IP: &str = "127.0.77.3";

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn sha256(b: &[u8]) -> String {
    hex(ring::digest::digest(&ring::digest::SHA256, b).as_ref())
}

/// The primary's certificate (for `names`, from a CA made here) and what TLSA records
/// are computed from.
struct Certs {
    dir: tempfile::TempDir,
    cert: PathBuf,
    key: PathBuf,
    /// SHA-256 of the server's SubjectPublicKeyInfo (`3 1 1`).
    spki_sha256: String,
    /// SHA-256 of the CA's certificate (`2 0 1`).
    ca_sha256: String,
}

fn certs(names: &[&str]) -> Certs {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params
        .distinguished_name
        .push(DnType::CommonName, "mxspool DANE test CA");
    let issuer = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
    let mut params =
        CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap();
    params.distinguished_name.push(DnType::CommonName, names[0]);
    let key = KeyPair::generate().unwrap();
    let cert = params.signed_by(&key, &issuer).unwrap();
    let dir = public_tempdir("mxspool-dane-certs.");
    let (c, k) = (dir.path().join("mx.pem"), dir.path().join("mx.key"));
    fs::write(&c, format!("{}{}", cert.pem(), issuer.pem())).unwrap();
    fs::write(&k, key.serialize_pem()).unwrap();
    Certs {
        cert: c,
        key: k,
        spki_sha256: sha256(&rcgen::PublicKeyData::subject_public_key_info(&key)),
        ca_sha256: sha256(issuer.der()),
        dir,
    }
}

/// A zone for `origin` whose MX is `mx.ORIGIN` at [`PRIMARY_IP`], with `tlsa` records
/// (`"3 1 1 HEX"`) at `_PORT._tcp.mx.ORIGIN`.
fn zone(origin: &str, port: u16, tlsa: &[String]) -> String {
    let mut z = format!(
        "$ORIGIN {origin}.\n$TTL 60\n\
         @ IN SOA ns.{origin}. hostmaster.{origin}. 1 3600 600 86400 60\n\
         @ IN NS ns.{origin}.\nns IN A {NSD_IP}\n\
         @ IN MX 10 mx.{origin}.\nmx IN A {PRIMARY_IP}\n"
    );
    for t in tlsa {
        z.push_str(&format!("_{port}._tcp.mx IN TLSA {t}\n"));
    }
    z
}

/// One zone to serve: signed (its DS becomes unbound's trust anchor) or not (insecure).
struct Zone {
    origin: &'static str,
    text: String,
    signed: bool,
    /// After signing, replace this text in the signed zone (a record whose signature then
    /// no longer verifies: bogus).
    tamper: Option<(String, String)>,
}

/// A private nsd and a validating unbound in front of it.
struct Dnssec {
    _dir: tempfile::TempDir,
    nsd: Child,
    unbound: Child,
    unbound_log: PathBuf,
    /// `ip:port` of unbound, for `[delivery] nameservers`.
    addr: String,
}

impl Drop for Dnssec {
    fn drop(&mut self) {
        for c in [&mut self.unbound, &mut self.nsd] {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn spawn_logged(cmd: &mut Command, log: &Path) -> Child {
    let out = fs::File::create(log).unwrap();
    let err = out.try_clone().unwrap();
    let program = cmd.get_program().to_string_lossy().into_owned();
    cmd.stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {program} (not installed?): {e}"))
}

/// `drill` for `name`/`rtype` at `ip:port` (with DO when `dnssec`): its output.
fn drill(ip: &str, port: u16, name: &str, rtype: &str, dnssec: bool) -> String {
    let mut cmd = Command::new(tool("drill"));
    if dnssec {
        cmd.arg("-D");
    }
    cmd.args(["-p", &port.to_string(), &format!("@{ip}"), name, rtype]);
    let out = run(&mut cmd, 10);
    format!("{}{}", text(&out.stdout), text(&out.stderr))
}

/// The header flags `drill` printed (`qr rd ra ad`).
fn flags(drill_out: &str) -> Vec<String> {
    drill_out
        .lines()
        .find_map(|l| l.strip_prefix(";; flags: "))
        .map(|f| {
            f.split(';')
                .next()
                .unwrap_or("")
                .split_whitespace()
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default()
}

impl Dnssec {
    fn start(zones: &[Zone]) -> Dnssec {
        let dir = public_tempdir("mxspool-dane-dns.");
        let d_buf = dir.path().to_path_buf();
        let d = d_buf.as_path();
        let mut anchors = String::new();
        let mut nsd_zones = String::new();
        let mut insecure = String::new();
        for z in zones {
            let file = format!("{}.zone", z.origin);
            fs::write(d.join(&file), &z.text).unwrap();
            let served = if z.signed {
                let keygen = |ksk: bool| {
                    let mut cmd = Command::new(tool("ldns-keygen"));
                    cmd.current_dir(d).args(["-a", "ECDSAP256SHA256"]);
                    if ksk {
                        cmd.arg("-k");
                    }
                    let out = run(cmd.arg(format!("{}.", z.origin)), 30);
                    check_ok("ldns-keygen", &out);
                    text(&out.stdout).trim().to_string()
                };
                let (ksk, zsk) = (keygen(true), keygen(false));
                check_ok(
                    "ldns-signzone",
                    &run(
                        Command::new(tool("ldns-signzone")).current_dir(d).args([
                            "-f",
                            &format!("{file}.signed"),
                            &file,
                            &ksk,
                            &zsk,
                        ]),
                        30,
                    ),
                );
                if let Some((from, to)) = &z.tamper {
                    let path = d.join(format!("{file}.signed"));
                    let signed = fs::read_to_string(&path).unwrap();
                    assert!(signed.contains(from.as_str()), "{from} not in\n{signed}");
                    fs::write(&path, signed.replace(from.as_str(), to)).unwrap();
                }
                anchors.push_str(&fs::read_to_string(d.join(format!("{ksk}.ds"))).unwrap());
                format!("{file}.signed")
            } else {
                insecure.push_str(&format!("  domain-insecure: \"{}.\"\n", z.origin));
                file
            };
            nsd_zones.push_str(&format!(
                "zone:\n  name: \"{}.\"\n  zonefile: \"{served}\"\n",
                z.origin
            ));
        }
        fs::write(d.join("anchors.ds"), &anchors).unwrap();

        let nsd_port = closed_port_at(NSD_IP);
        let dd = d.display();
        fs::write(
            d.join("nsd.conf"),
            format!(
                "server:\n  ip-address: {NSD_IP}@{nsd_port}\n  port: {nsd_port}\n  zonesdir: \"{dd}\"\n\
                 \x20 database: \"\"\n  pidfile: \"{dd}/nsd.pid\"\n  xfrdfile: \"{dd}/xfrd.state\"\n\
                 \x20 zonelistfile: \"{dd}/zone.list\"\n  username: \"\"\n  chroot: \"\"\n\
                 \x20 logfile: \"{dd}/nsd.log\"\n  server-count: 1\n  verbosity: 1\n\
                 remote-control:\n  control-enable: no\n{nsd_zones}"
            ),
        )
        .unwrap();
        let nsd = spawn_logged(
            Command::new(tool("nsd"))
                .arg("-d")
                .arg("-c")
                .arg(d.join("nsd.conf")),
            &d.join("nsd.out"),
        );
        let nsd_log = || {
            format!(
                "{}{}",
                fs::read_to_string(d.join("nsd.out")).unwrap_or_default(),
                fs::read_to_string(d.join("nsd.log")).unwrap_or_default()
            )
        };
        let first = zones[0].origin;
        let up = wait_for(Duration::from_secs(15), Duration::from_millis(100), || {
            drill(NSD_IP, nsd_port, first, "SOA", false).contains("rcode: NOERROR")
        });
        assert!(up, "nsd does not answer for {first}:\n{}", nsd_log());

        let unbound_port = closed_port_at(UNBOUND_IP);
        let stubs: String = zones
            .iter()
            .map(|z| {
                format!(
                    "stub-zone:\n  name: \"{}.\"\n  stub-addr: {NSD_IP}@{nsd_port}\n",
                    z.origin
                )
            })
            .collect();
        fs::write(
            d.join("unbound.conf"),
            format!(
                "server:\n  interface: {UNBOUND_IP}@{unbound_port}\n  port: {unbound_port}\n\
                 \x20 do-ip6: no\n  access-control: 127.0.0.0/8 allow\n  chroot: \"\"\n  username: \"\"\n\
                 \x20 directory: \"{dd}\"\n  pidfile: \"{dd}/unbound.pid\"\n  use-syslog: no\n  logfile: \"\"\n\
                 \x20 verbosity: 1\n  val-log-level: 2\n  do-not-query-localhost: no\n\
                 \x20 module-config: \"validator iterator\"\n  trust-anchor-file: \"{dd}/anchors.ds\"\n\
                 \x20 auto-trust-anchor-file: \"\"\n  local-zone: \"test.\" nodefault\n\
                 \x20 qname-minimisation: no\n  num-threads: 1\n  so-reuseport: no\n\
                 \x20 cache-max-ttl: 0\n  cache-max-negative-ttl: 0\n{insecure}\
                 remote-control:\n  control-enable: no\n{stubs}"
            ),
        )
        .unwrap();
        let unbound_log = d.join("unbound.out");
        let unbound = spawn_logged(
            Command::new(tool("unbound"))
                .arg("-d")
                .arg("-c")
                .arg(d.join("unbound.conf")),
            &unbound_log,
        );
        let dns = Dnssec {
            nsd,
            unbound,
            unbound_log,
            addr: format!("{UNBOUND_IP}:{unbound_port}"),
            _dir: dir,
        };
        // Every zone answers through unbound; the signed ones validate (AD), the unsigned
        // ones do not. Anything else: the chain is broken, and the test says so.
        for z in zones {
            let mut last = String::new();
            let ok = wait_for(Duration::from_secs(15), Duration::from_millis(200), || {
                last = drill(UNBOUND_IP, unbound_port, z.origin, "SOA", true);
                last.contains("rcode: NOERROR")
                    && flags(&last).contains(&"ad".to_string()) == z.signed
            });
            assert!(
                ok,
                "unbound does not answer {} as {} (validation broken?):\n{last}\n--- unbound\n{}\n--- nsd\n{}",
                z.origin,
                if z.signed { "secure (AD)" } else { "insecure" },
                dns.log(),
                nsd_log()
            );
        }
        dns
    }

    fn log(&self) -> String {
        fs::read_to_string(&self.unbound_log).unwrap_or_default()
    }
}

/// Postfix on [`PRIMARY_IP`]`:port` taking mail for example.test and insecure.test into
/// `mailbase/mail/`, with STARTTLS when `certs` is given.
fn primary(port: u16, certs: Option<&Certs>, mailbase: &Path) -> Postfix {
    postfix_primary(
        PRIMARY_IP,
        port,
        "example.test, insecure.test",
        certs.map(|c| (c.cert.as_path(), c.key.as_path())),
        mailbase,
    )
}

/// A backup MX for `domain` delivering by MX lookup through `dns`, to port `port`.
fn backup(dns: &Dnssec, domain: &str, port: u16, delivery: &str) -> MxEnv {
    MxEnv::custom(&format!(
        "[queue]\nretry_interval = \"1h\"\n\n[delivery]\nport = {port}\nconnect_timeout = \"2s\"\n\
         nameservers = [\"{}\"]\n{delivery}\n\n[[partner]]\ndomain = \"{domain}\"\n",
        dns.addr
    ))
}

/// Queues one message for u@DOMAIN at the held backup, then `flush -v`: the transcript.
fn send_and_flush(backup: &MxEnv, domain: &str) -> String {
    check_ok("hold", &backup.mxspool(&["hold", domain]));
    smtp_send(
        &backup.addr(),
        "s@sender.test",
        &[&format!("u@{domain}")],
        b"Subject: dane\r\n\r\nhello over DANE\r\n",
    );
    let out = backup.mxspool(&["flush", domain, "-v"]);
    format!("{}{}", text(&out.stdout), text(&out.stderr))
}

fn arrived(mailbase: &Path) -> Vec<String> {
    let mut got = Vec::new();
    wait_for(Duration::from_secs(15), Duration::from_millis(100), || {
        got = maildir_messages(&mailbase.join("mail"));
        !got.is_empty()
    });
    got
}

/// Everything one case needs: the DNS, the primary, its maildir base.
struct Case {
    certs: Certs,
    port: u16,
    mailbase: tempfile::TempDir,
}

fn case() -> Case {
    Case {
        certs: certs(&["mx.example.test"]),
        port: closed_port_at(PRIMARY_IP),
        mailbase: public_tempdir("mxspool-dane-maildir."),
    }
}

fn signed(text: String) -> Zone {
    Zone {
        origin: "example.test",
        text,
        signed: true,
        tamper: None,
    }
}

/// The deferral line of the backup's log.
fn deferral(log: &str) -> String {
    log.lines()
        .find(|l| l.contains("status=deferred"))
        .unwrap_or_else(|| panic!("no deferral logged:\n{log}"))
        .to_string()
}

#[test]
fn dane_ee_spki_sha256_match_delivers_verified_dane() {
    let c = case();
    let dns = Dnssec::start(&[signed(zone(
        "example.test",
        c.port,
        &[format!("3 1 1 {}", c.certs.spki_sha256)],
    ))]);
    let pf = primary(c.port, Some(&c.certs), c.mailbase.path());
    // Under tls = "may" DANE raises the policy for this host.
    let mut backup = backup(&dns, "example.test", c.port, "");
    let b = backup.start();
    let t = send_and_flush(&backup, "example.test");
    let got = arrived(c.mailbase.path());
    assert!(
        !got.is_empty(),
        "nothing delivered:\n{t}\n--- mxspool\n{}\n--- postfix\n{}\n--- unbound\n{}",
        b.log(),
        pf.log(),
        dns.log()
    );
    assert!(got[0].contains("with ESMTPS"), "{}", got[0]);
    assert!(
        t.contains("DANE: 1 usable DNSSEC-secure TLSA record(s) at _")
            && t.contains("._tcp.mx.example.test.: STARTTLS required"),
        "{t}"
    );
    assert!(t.contains("(tls = dane)"), "{t}");
    let log = b.log();
    assert!(
        log.contains(&format!(
            "Verified TLS connection established to mx.example.test[{PRIMARY_IP}]:{}",
            c.port
        )) && log.contains("(DANE: DANE-EE 3 1 1 "),
        "{log}"
    );
    assert!(log.contains("tls=TLSv1.3 verified=dane"), "{log}");
    assert!(log.contains("status=sent"), "{log}");
    assert!(backup.queue(None).is_empty());
}

#[test]
fn dane_ee_wrong_hash_defers_with_4_7_5_and_sends_nothing() {
    let c = case();
    let wrong = sha256(b"not the server's key");
    let dns = Dnssec::start(&[signed(zone(
        "example.test",
        c.port,
        &[format!("3 1 1 {wrong}")],
    ))]);
    let pf = primary(c.port, Some(&c.certs), c.mailbase.path());
    let mut backup = backup(&dns, "example.test", c.port, "");
    let b = backup.start();
    let t = send_and_flush(&backup, "example.test");
    assert!(t.contains("TLSA records did not match"), "{t}");
    let queue = backup.queue(None);
    assert_eq!(queue.len(), 1, "{queue:#?}\n{t}");
    let log = b.log();
    let line = deferral(&log);
    assert!(line.contains("dsn=4.7.5"), "{line}");
    assert!(line.contains("TLSA"), "{line}");
    assert!(!log.contains("status=bounced"), "{log}");
    assert!(
        !t.contains(">>> MAIL FROM"),
        "a transaction despite the mismatch:\n{t}"
    );
    // Not retried in clear either: Postfix saw no mail.
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        maildir_messages(&c.mailbase.path().join("mail")).is_empty(),
        "delivered despite a TLSA mismatch\n{}",
        pf.log()
    );
}

#[test]
fn dane_insecure_zone_is_not_enforced_and_tls_policy_applies() {
    let c = case();
    // TLSA records that would not match, in a zone that is not signed: ignored.
    let wrong = sha256(b"not the server's key");
    let dns = Dnssec::start(&[
        Zone {
            origin: "insecure.test",
            text: zone("insecure.test", c.port, &[format!("3 1 1 {wrong}")]),
            signed: false,
            tamper: None,
        },
        signed(zone("example.test", c.port, &[])),
    ]);
    let _pf = primary(c.port, Some(&c.certs), c.mailbase.path());
    let mut backup = backup(&dns, "insecure.test", c.port, "tls = \"may\"");
    let b = backup.start();
    let t = send_and_flush(&backup, "insecure.test");
    let got = arrived(c.mailbase.path());
    assert!(!got.is_empty(), "nothing delivered:\n{t}\n{}", b.log());
    assert!(
        t.contains(
            "DANE not applied: the address records of mx.insecure.test are not DNSSEC-secure"
        ),
        "{t}"
    );
    assert!(t.contains("(tls = may)"), "{t}");
    let log = b.log();
    assert!(log.contains("tls=TLSv1.3 verified=none"), "{log}");
    assert!(
        log.contains("Untrusted TLS connection established to mx.insecure.test"),
        "{log}"
    );
}

#[test]
fn dane_ta_on_the_ca_certificate_delivers_verified_dane() {
    let c = case();
    let dns = Dnssec::start(&[signed(zone(
        "example.test",
        c.port,
        &[format!("2 0 1 {}", c.certs.ca_sha256)],
    ))]);
    let pf = primary(c.port, Some(&c.certs), c.mailbase.path());
    let mut backup = backup(&dns, "example.test", c.port, "");
    let b = backup.start();
    let t = send_and_flush(&backup, "example.test");
    let got = arrived(c.mailbase.path());
    assert!(
        !got.is_empty(),
        "nothing delivered:\n{t}\n--- mxspool\n{}\n--- postfix\n{}",
        b.log(),
        pf.log()
    );
    let log = b.log();
    assert!(log.contains("(DANE: DANE-TA 2 0 1 "), "{log}");
    assert!(log.contains("tls=TLSv1.3 verified=dane"), "{log}");
}

#[test]
fn dane_ta_with_a_certificate_for_another_name_defers() {
    let mut c = case();
    c.certs = certs(&["other.example.net"]);
    let dns = Dnssec::start(&[signed(zone(
        "example.test",
        c.port,
        &[format!("2 0 1 {}", c.certs.ca_sha256)],
    ))]);
    let _pf = primary(c.port, Some(&c.certs), c.mailbase.path());
    let mut backup = backup(&dns, "example.test", c.port, "");
    let b = backup.start();
    let t = send_and_flush(&backup, "example.test");
    assert!(t.contains("name check for mx.example.test"), "{t}");
    assert_eq!(backup.queue(None).len(), 1, "{t}");
    let line = deferral(&b.log());
    assert!(
        line.contains("dsn=4.7.5") && line.contains("TLSA"),
        "{line}"
    );
    assert!(maildir_messages(&c.mailbase.path().join("mail")).is_empty());
}

#[test]
fn dane_secure_tlsa_without_starttls_defers_and_sends_nothing_in_clear() {
    let c = case();
    let dns = Dnssec::start(&[signed(zone(
        "example.test",
        c.port,
        &[format!("3 1 1 {}", c.certs.spki_sha256)],
    ))]);
    let pf = primary(c.port, None, c.mailbase.path());
    let mut backup = backup(&dns, "example.test", c.port, "tls = \"may\"");
    let b = backup.start();
    let t = send_and_flush(&backup, "example.test");
    assert!(
        t.contains("TLS is required (DANE: the host has DNSSEC-secure TLSA records at _")
            && t.contains("but was not offered by host mx.example.test"),
        "{t}"
    );
    assert!(!t.contains(">>> MAIL FROM"), "mail sent in clear:\n{t}");
    assert_eq!(backup.queue(None).len(), 1, "{t}");
    let log = b.log();
    assert!(deferral(&log).contains("dsn=4.7.5"), "{log}");
    assert!(!log.contains("status=bounced"), "{log}");
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        maildir_messages(&c.mailbase.path().join("mail")).is_empty(),
        "{}",
        pf.log()
    );
}

#[test]
fn dane_bogus_tlsa_defers_as_a_failed_lookup() {
    let c = case();
    let right = c.certs.spki_sha256.clone();
    let other = sha256(b"tampered after signing");
    let dns = Dnssec::start(&[Zone {
        tamper: Some((right.clone(), other)),
        ..signed(zone("example.test", c.port, &[format!("3 1 1 {right}")]))
    }]);
    let _pf = primary(c.port, Some(&c.certs), c.mailbase.path());
    let mut backup = backup(&dns, "example.test", c.port, "");
    let b = backup.start();
    let t = send_and_flush(&backup, "example.test");
    assert!(
        t.contains("TLSA lookup for _") && t.contains("SERVFAIL"),
        "{t}\n--- unbound\n{}",
        dns.log()
    );
    assert!(!t.contains("connecting to mx.example.test"), "{t}");
    let line = deferral(&b.log());
    assert!(
        line.contains("dsn=4.7.5") && line.contains("TLSA lookup"),
        "{line}"
    );
    assert!(maildir_messages(&c.mailbase.path().join("mail")).is_empty());
}

#[test]
fn dane_off_ignores_secure_tlsa() {
    let c = case();
    let wrong = sha256(b"not the server's key");
    let dns = Dnssec::start(&[signed(zone(
        "example.test",
        c.port,
        &[format!("3 1 1 {wrong}")],
    ))]);
    let _pf = primary(c.port, Some(&c.certs), c.mailbase.path());
    let mut backup = backup(&dns, "example.test", c.port, "dane = false");
    let b = backup.start();
    let t = send_and_flush(&backup, "example.test");
    assert!(!arrived(c.mailbase.path()).is_empty(), "{t}\n{}", b.log());
    assert!(!t.contains("DANE"), "{t}");
    assert!(b.log().contains("verified=none"), "{}", b.log());
}

#[test]
fn dane_doctor_reports_secure_tlsa_and_whether_the_certificate_matches() {
    let c = case();
    let dns = Dnssec::start(&[signed(zone(
        "example.test",
        c.port,
        &[format!("3 1 1 {}", c.certs.spki_sha256)],
    ))]);
    let _pf = primary(c.port, Some(&c.certs), c.mailbase.path());
    let report = |delivery: &str| {
        let env = backup(&dns, "example.test", c.port, delivery);
        let out = env.mxspool(&["doctor", "example.test"]);
        let report = text(&out.stdout);
        assert!(
            matches!(out.status.code(), Some(0 | 1)),
            "{report}\n{}",
            text(&out.stderr)
        );
        report
    };
    let r = report("");
    let name = format!("_{}._tcp.mx.example.test.", c.port);
    assert!(
        r.contains(&format!(
            "      TLSA {name}: DNSSEC-secure, 1 record(s): 3 1 1 "
        )),
        "{r}"
    );
    assert!(
        r.contains("      DANE: the certificate matches (DANE-EE 3 1 1 "),
        "{r}"
    );
    assert!(!r.contains("delivery to it defers"), "{r}");

    // The same TLSA toward a primary that no longer has that key: a warning.
    drop(_pf);
    let other = certs(&["mx.example.test"]);
    let _pf2 = primary(c.port, Some(&other), c.mailbase.path());
    let r = report("");
    assert!(
        r.contains("      DANE: the certificate does NOT match: TLSA records did not match"),
        "{r}"
    );
    assert!(
        r.contains("does not match its DNSSEC-secure TLSA records: delivery to it defers"),
        "{r}"
    );
    // With dane = false, a note only.
    let r = report("dane = false");
    assert!(r.contains("dane = false: not enforced"), "{r}");
    assert!(!r.contains("delivery to it defers"), "{r}");
    let _ = &c.certs.dir;
}

#[test]
fn dane_secure_tlsa_without_usable_records_requires_tls_without_authentication() {
    let c = case();
    // PKIX-EE (usage 1) is not for SMTP (RFC 7672 3.1.3): no usable record, TLS still
    // required (RFC 7672 2.2), the certificate not checked.
    let dns = Dnssec::start(&[signed(zone(
        "example.test",
        c.port,
        &[format!("1 1 1 {}", sha256(b"whatever"))],
    ))]);
    {
        let _pf = primary(c.port, Some(&c.certs), c.mailbase.path());
        let mut backup = backup(&dns, "example.test", c.port, "tls = \"none\"");
        let b = backup.start();
        let t = send_and_flush(&backup, "example.test");
        assert!(!arrived(c.mailbase.path()).is_empty(), "{t}\n{}", b.log());
        assert!(
            t.contains("none usable: TLS required, not authenticated")
                && t.contains("(tls = encrypt)"),
            "{t}"
        );
        assert!(b.log().contains("tls=TLSv1.3 verified=none"), "{}", b.log());
    }
    // The same toward a primary without STARTTLS: deferred, nothing in clear.
    let mailbase = public_tempdir("mxspool-dane-maildir.");
    let _pf = primary(c.port, None, mailbase.path());
    let mut backup = backup(&dns, "example.test", c.port, "");
    let b = backup.start();
    let t = send_and_flush(&backup, "example.test");
    assert!(t.contains("TLS is required (tls = \"encrypt\")"), "{t}");
    assert!(deferral(&b.log()).contains("dsn=4.7.5"), "{}", b.log());
    assert!(!t.contains(">>> MAIL FROM"), "{t}");
}
