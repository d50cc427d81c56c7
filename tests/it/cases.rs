//! The seed's cases (`seeds/000_9cfdd7c98fd32944.txt`) booted for real: every machine of a
//! picture is an `mxspool serve` on a loopback address of its own, all on one port, all
//! asking one test DNS server (hickory, loopback) that serves the case's zones with A
//! records on those addresses. Each server's outbound connections come from its own address
//! (`[delivery] bind_address`), so the next machine sees who connects, as on a real network.
//! Results are checked where they land: Maildirs on disk, an outside receiver, the queues.
//!
//! - Case 3 (127.0.40.0/24): two relays at equal MX 10 for depart1.uc.pt and depart2.uc.pt
//!   (virtusertable to the departmental servers), two departmental servers (Maildir, smart
//!   host smtp.inst.uc.pt, masquerading), an outside MTA (another mxspool) and an outside
//!   recipient (a scriptable receiver).
//! - Case 1 (127.0.41.0/24): the mail server (MX 10, Maildir) and the backup MX (MX 20).
//! - Case 2 (127.0.42.0/24): the mail server (MX 10, Maildir, smart host
//!   smtpout.inst.uc.pt, masquerading), two relays smtpout1/smtpout2 (one round-robin name,
//!   both MX 20 of inst.uc.pt, relaying and masquerading for the campus), an outside MTA
//!   and an outside recipient (an mxspool with a Maildir, whose `Received:` shows who
//!   connected).
//!
//! The configurations follow `contrib/caseN/*.toml`; the tables (`virtusertable`, users
//! files) are the contrib files themselves, and every contrib configuration and zone file is
//! checked here too.

use std::fs;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::dns::TestDns;
use crate::harness::*;
use crate::receiver::{Behaviour, Receiver};

/// The example configurations and zones.
fn contrib(rel: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("contrib")
        .join(rel)
        .display()
        .to_string()
}

/// A zone of the seed's style (SOA, NS) with `records` under `origin`.
fn zone(origin: &str, records: &str) -> String {
    format!(
        "$ORIGIN {origin}\n$TTL 60\n\
         @ IN SOA ns.uc.pt. postmaster.ns.uc.pt. ( 1 3600 600 86400 60 )\n\
         @ IN NS ns.uc.pt.\n\
         {records}\n"
    )
}

/// `[queue]` and `[delivery]` of a machine at `ip`: the test DNS, the shared port, and
/// outbound connections from its own address.
fn machine(dns: &TestDns, port: u16, ip: &str, retry: &str) -> String {
    format!(
        "[queue]\nretry_interval = \"{retry}\"\nmax_lifetime = \"1h\"\ndelay_warning = \"0s\"\n\n\
         [delivery]\nport = {port}\nconnect_timeout = \"3s\"\nnameservers = [\"{}\"]\n\
         bind_address = \"{ip}\"\n\n",
        dns.addr
    )
}

/// Every server's log, for failure messages.
fn logs(servers: &[(&str, &Server)]) -> String {
    servers
        .iter()
        .map(|(name, s)| format!("===== {name}\n{}", s.log()))
        .collect()
}

/// Waits (at most `secs`) until the Maildir holds `n` messages; returns them.
fn wait_maildir(dir: &Path, n: usize, secs: u64, servers: &[(&str, &Server)]) -> Vec<String> {
    let ok = wait_for(
        Duration::from_secs(secs),
        Duration::from_millis(100),
        || maildir_messages(dir).len() >= n,
    );
    let got = maildir_messages(dir);
    assert!(
        ok,
        "{} holds {} messages after {secs} s, expected {n}: {got:#?}\n{}",
        dir.display(),
        got.len(),
        logs(servers)
    );
    got
}

/// Waits (at most `secs`) until `env`'s queue is empty.
fn wait_queue_empty(env: &MxEnv, what: &str, secs: u64, servers: &[(&str, &Server)]) {
    let ok = wait_for(
        Duration::from_secs(secs),
        Duration::from_millis(200),
        || env.queue(None).is_empty(),
    );
    assert!(
        ok,
        "{what}: queue not empty after {secs} s: {:#?}\n{}",
        env.queue(None),
        logs(servers)
    );
}

/// The header section of a message (either line end), each field unfolded onto one line.
fn header_fields(msg: &str) -> Vec<String> {
    let mut fields: Vec<String> = Vec::new();
    for line in msg.lines() {
        let line = line.trim_end_matches('\r');
        if line.is_empty() {
            break;
        }
        if line.starts_with([' ', '\t']) {
            if let Some(last) = fields.last_mut() {
                last.push(' ');
                last.push_str(line.trim_start());
            }
        } else {
            fields.push(line.to_string());
        }
    }
    fields
}

/// The body: everything after the first empty line.
fn body(msg: &str) -> &str {
    msg.split_once("\n\n")
        .or_else(|| msg.split_once("\r\n\r\n"))
        .map(|(_, b)| b)
        .unwrap_or("")
}

/// The unfolded `Received:` field that `host` added (`by HOST (mxspool)`).
fn received_by(msg: &str, host: &str) -> String {
    let needle = format!("by {host} ");
    header_fields(msg)
        .into_iter()
        .find(|f| f.starts_with("Received:") && f.contains(&needle))
        .unwrap_or_else(|| panic!("no Received: field by {host} in:\n{msg}"))
}

fn header<'a>(fields: &'a [String], name: &str) -> Vec<&'a str> {
    let prefix = format!("{name}:");
    fields
        .iter()
        .filter(|f| f.len() > prefix.len() && f[..prefix.len()].eq_ignore_ascii_case(&prefix))
        .map(|f| f[prefix.len()..].trim())
        .collect()
}

/// Checks the form of a message delivered to a Maildir: LF line ends only,
/// `Return-Path:` then `Delivered-To:` on top, then the last hop's `Received:`.
fn assert_maildir_message(msg: &str, sender: &str, delivered_to: &str) {
    assert!(!msg.contains('\r'), "CR in a Maildir file:\n{msg:?}");
    let top = format!("Return-Path: <{sender}>\nDelivered-To: {delivered_to}\nReceived: ");
    assert!(msg.starts_with(&top), "expected {top:?} on top of:\n{msg}");
}

/// The subjects of `msgs`, sorted.
fn subjects(msgs: &[String]) -> Vec<String> {
    let mut v: Vec<String> = msgs
        .iter()
        .map(|m| {
            header(&header_fields(m), "Subject")
                .first()
                .map(|s| s.to_string())
                .unwrap_or_default()
        })
        .collect();
    v.sort();
    v
}

/// One transaction from the local address `source`; every reply must be positive.
/// `message` is given with LF line ends. Returns the queue id.
fn submit(addr: &str, source: &str, from: &str, rcpts: &[&str], message: &str) -> String {
    let (mut c, banner) =
        Smtp::connect_from(addr, source).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    assert_eq!(banner.code, 220, "{banner}");
    let r = c.cmd("EHLO client.test").unwrap();
    assert_eq!(r.code, 250, "EHLO: {r}");
    let r = c.cmd(&format!("MAIL FROM:<{from}>")).unwrap();
    assert_eq!(r.code, 250, "MAIL FROM:<{from}> at {addr}: {r}");
    for rcpt in rcpts {
        let r = c.cmd(&format!("RCPT TO:<{rcpt}>")).unwrap();
        assert_eq!(r.code, 250, "RCPT TO:<{rcpt}> at {addr} from {source}: {r}");
    }
    let r = c
        .data(message.replace('\n', "\r\n").as_bytes())
        .unwrap()
        .unwrap_or_else(|r| panic!("DATA refused: {r}"));
    assert_eq!(r.code, 250, "end of DATA at {addr}: {r}");
    let _ = c.cmd("QUIT");
    r.to_string().rsplit(' ').next().unwrap().to_string()
}

/// The reply to `RCPT TO:<rcpt>` from `source` (after EHLO and MAIL FROM).
fn rcpt_reply(addr: &str, source: &str, from: &str, rcpt: &str) -> Reply {
    let (mut c, banner) = Smtp::connect_from(addr, source).unwrap();
    assert_eq!(banner.code, 220, "{banner}");
    assert_eq!(c.cmd("EHLO client.test").unwrap().code, 250);
    let r = c.cmd(&format!("MAIL FROM:<{from}>")).unwrap();
    assert_eq!(r.code, 250, "MAIL: {r}");
    let r = c.cmd(&format!("RCPT TO:<{rcpt}>")).unwrap();
    let _ = c.cmd("QUIT");
    r
}

// ---------------------------------------------------------------------------------------
// The contrib files themselves.

#[test]
fn cases_contrib_configurations_pass_check_config() {
    let expected = [
        "case1/mail-server.toml",
        "case1/backup.toml",
        "case2/mail-server.toml",
        "case2/smtpout1.toml",
        "case2/smtpout2.toml",
        "case3/mrelay1.toml",
        "case3/mrelay2.toml",
        "case3/mail-server1.toml",
        "case3/mail-server2.toml",
    ];
    for rel in expected {
        let path = contrib(rel);
        // From another working directory: relative file names are relative to the config.
        let out = run(
            Command::new(BIN)
                .arg("--config")
                .arg(&path)
                .arg("check-config")
                .current_dir("/"),
            60,
        );
        check_ok(&format!("mxspool --config {path} check-config"), &out);
    }
    // And nothing in contrib/caseN that the list above forgets.
    for case in ["case1", "case2", "case3"] {
        for e in fs::read_dir(contrib(case)).unwrap() {
            let name = e.unwrap().file_name().to_string_lossy().into_owned();
            if name.ends_with(".toml") {
                assert!(
                    expected.contains(&format!("{case}/{name}").as_str()),
                    "{case}/{name} is not checked"
                );
            }
        }
    }
}

/// Runs `f` with a resolver that asks `dns` only.
fn with_resolver(
    dns: &TestDns,
    f: impl FnOnce(&mxspool::delivery::mx::Resolver, &tokio::runtime::Runtime),
) {
    let config = mxspool::config::Config::parse(&format!(
        "hostname = \"elsewhere.test\"\nspool = \"/nonexistent\"\n\
         [delivery]\nnameservers = [\"{}\"]\n",
        dns.addr
    ))
    .unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let resolver = rt
        .block_on(async { mxspool::delivery::mx::Resolver::new(&config) })
        .unwrap();
    f(&resolver, &rt);
}

fn sorted_ips(list: &[&str]) -> Vec<IpAddr> {
    let mut v: Vec<IpAddr> = list.iter().map(|a| a.parse().unwrap()).collect();
    v.sort();
    v
}

fn mx(list: &[(u16, &str)]) -> Vec<(u16, String)> {
    list.iter().map(|(p, n)| (*p, n.to_string())).collect()
}

/// The contrib zone files load into a real DNS server and say what the README says:
/// round-robin names have one A record per relay, MX sets as in the seed.
#[test]
fn cases_contrib_zone_files_load_and_resolve() {
    let read = |rel: &str| fs::read_to_string(contrib(rel)).unwrap();
    let addrs = |r: &mxspool::delivery::mx::Resolver, rt: &tokio::runtime::Runtime, name| {
        let mut v = rt
            .block_on(r.host_addrs(name))
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        v.sort();
        v
    };

    let z1 = read("case1/inst.uc.pt.zone");
    let dns = TestDns::start(&[("inst.uc.pt.", z1.as_str())]);
    with_resolver(&dns, |r, rt| {
        assert_eq!(
            rt.block_on(r.mx_records("inst.uc.pt")).unwrap(),
            mx(&[(10, "mail-server.inst.uc.pt"), (20, "backup.inst.uc.pt")])
        );
        assert_eq!(
            addrs(r, rt, "smtp.inst.uc.pt"),
            sorted_ips(&["192.168.0.1"])
        );
        assert_eq!(
            addrs(r, rt, "backup.inst.uc.pt"),
            sorted_ips(&["192.168.0.2"])
        );
    });

    let z2 = read("case2/inst.uc.pt.zone");
    let dns = TestDns::start(&[("inst.uc.pt.", z2.as_str())]);
    with_resolver(&dns, |r, rt| {
        assert_eq!(
            rt.block_on(r.mx_records("inst.uc.pt")).unwrap(),
            mx(&[
                (10, "mail-server.inst.uc.pt"),
                (20, "smtpout1.inst.uc.pt"),
                (20, "smtpout2.inst.uc.pt")
            ])
        );
        for name in ["smtpout.inst.uc.pt", "smtp.inst.uc.pt"] {
            assert_eq!(
                addrs(r, rt, name),
                sorted_ips(&["192.168.0.11", "192.168.0.12"]),
                "{name}"
            );
        }
    });

    let z3 = read("case3/inst.uc.pt.zone");
    let d1 = read("case3/depart1.uc.pt.zone");
    let d2 = read("case3/depart2.uc.pt.zone");
    let dns = TestDns::start(&[
        ("inst.uc.pt.", z3.as_str()),
        ("depart1.uc.pt.", d1.as_str()),
        ("depart2.uc.pt.", d2.as_str()),
    ]);
    with_resolver(&dns, |r, rt| {
        for d in ["depart1.uc.pt", "depart2.uc.pt"] {
            assert_eq!(
                rt.block_on(r.mx_records(d)).unwrap(),
                mx(&[(10, "mrelay1.inst.uc.pt"), (10, "mrelay2.inst.uc.pt")]),
                "{d}"
            );
        }
        assert_eq!(
            addrs(r, rt, "smtp.inst.uc.pt"),
            sorted_ips(&["192.168.0.21", "192.168.0.22"])
        );
        assert_eq!(
            addrs(r, rt, "mail-server1.inst.uc.pt"),
            sorted_ips(&["192.168.0.31"])
        );
        assert_eq!(
            addrs(r, rt, "pop.depart2.uc.pt"),
            sorted_ips(&["192.168.0.32"])
        );
        // No MX: the relays deliver to the host's own address.
        assert!(rt
            .block_on(r.mx_records("mail-server1.inst.uc.pt"))
            .unwrap()
            .is_empty());
    });
}

// ---------------------------------------------------------------------------------------
// Case 3: a relay cluster in front of departmental servers.

const C3_RELAY: [&str; 2] = ["127.0.40.1", "127.0.40.2"];
const C3_SERVER: [&str; 2] = ["127.0.40.11", "127.0.40.12"];
/// The campus network of the test (the contrib files' 192.168.0.0/16): servers, relays
/// and the departments' networks.
const C3_CAMPUS: &str = "127.0.40.0/25";
/// The departments' networks (192.168.1.0/24 and 192.168.2.0/24 in contrib) and a user's
/// machine in each.
const C3_DEPART_NET: [&str; 2] = ["127.0.40.64/28", "127.0.40.80/28"];
const C3_DEPART_USER: [&str; 2] = ["127.0.40.70", "127.0.40.90"];
/// The Internet: the outside MTA, the outside recipient's MX, the test's own client.
const C3_OUTSIDE_MTA: &str = "127.0.40.150";
const C3_OUTSIDE_MX: &str = "127.0.40.160";
const C3_CLIENT: &str = "127.0.40.200";

struct Case3 {
    /// Running: mrelay1, mrelay2, mail-server1, mail-server2, the outside MTA. First, so
    /// they are killed before their directories and the DNS go.
    running: Vec<(String, Option<Server>)>,
    port: u16,
    relays: Vec<MxEnv>,
    servers: Vec<MxEnv>,
    outside: MxEnv,
    /// The outside recipient: mx.outside.example.
    receiver: Receiver,
    _dns: TestDns,
}

impl Case3 {
    /// Boots the whole picture. The outside MTA and the departmental servers retry only
    /// after an hour: what they deliver, they deliver at the first attempt, so a relay
    /// that is down must be fallen over within that attempt.
    fn start() -> Case3 {
        let port = closed_port_at(C3_RELAY[0]);
        let inst = zone(
            "inst.uc.pt.",
            &format!(
                "mrelay1 IN A {r1}\nmrelay2 IN A {r2}\n\
                 mail-server1 IN A {s1}\nmail-server2 IN A {s2}\n\
                 ; the round-robin name: one A record per relay\n\
                 smtp IN A {r1}\nsmtp IN A {r2}\n",
                r1 = C3_RELAY[0],
                r2 = C3_RELAY[1],
                s1 = C3_SERVER[0],
                s2 = C3_SERVER[1]
            ),
        );
        let depart = |n: u8| {
            zone(
                &format!("depart{n}.uc.pt."),
                "@ IN MX 10 mrelay1.inst.uc.pt.\n@ IN MX 10 mrelay2.inst.uc.pt.\n",
            )
        };
        let (d1, d2) = (depart(1), depart(2));
        let outside_zone = zone(
            "outside.example.",
            &format!("@ IN MX 10 mx\nmx IN A {C3_OUTSIDE_MX}\nmta IN A {C3_OUTSIDE_MTA}\n"),
        );
        let dns = TestDns::start(&[
            ("inst.uc.pt.", inst.as_str()),
            ("depart1.uc.pt.", d1.as_str()),
            ("depart2.uc.pt.", d2.as_str()),
            ("outside.example.", outside_zone.as_str()),
        ]);

        let relays: Vec<MxEnv> = (0..2)
            .map(|i| {
                let ip = C3_RELAY[i];
                MxEnv::host(
                    &format!("mrelay{}.inst.uc.pt", i + 1),
                    ip,
                    port,
                    &format!(
                        "{}[virtual]\nfile = \"{}\"\n\n[relay]\nnetworks = [\"{C3_CAMPUS}\"]\n",
                        machine(&dns, port, ip, "2s"),
                        contrib("case3/virtusertable")
                    ),
                )
            })
            .collect();
        let servers: Vec<MxEnv> = (0..2)
            .map(|i| {
                let n = i + 1;
                let ip = C3_SERVER[i];
                let users = contrib(&format!("case3/depart{n}.uc.pt.users"));
                MxEnv::host(
                    &format!("mail-server{n}.inst.uc.pt"),
                    ip,
                    port,
                    &format!(
                        "{}[[local]]\ndomain = \"depart{n}.uc.pt\"\n\
                         maildir = \"{{dir}}/mail/depart{n}.uc.pt/{{user}}\"\nusers = \"{users}\"\n\n\
                         [[local]]\ndomain = \"mail-server{n}.inst.uc.pt\"\n\
                         maildir = \"{{dir}}/mail/depart{n}.uc.pt/{{user}}\"\nusers = \"{users}\"\n\n\
                         [relay]\nnetworks = [\"{net}\"]\nsmart_host = \"smtp.inst.uc.pt\"\n\n\
                         [masquerade]\nas = \"depart{n}.uc.pt\"\n\
                         domains = [\"mail-server{n}.inst.uc.pt\"]\nenvelope = true\n",
                        machine(&dns, port, ip, "1h"),
                        net = C3_DEPART_NET[i],
                    ),
                )
            })
            .collect();
        let outside = MxEnv::host(
            "mta.outside.example",
            C3_OUTSIDE_MTA,
            port,
            &format!(
                "{}[relay]\nnetworks = [\"{C3_CLIENT}/32\"]\n",
                machine(&dns, port, C3_OUTSIDE_MTA, "1h")
            ),
        );
        let receiver = Receiver::start(
            format!("{C3_OUTSIDE_MX}:{port}")
                .parse::<SocketAddr>()
                .unwrap(),
            Behaviour::Accept,
        );
        let mut c = Case3 {
            running: Vec::new(),
            port,
            relays,
            servers,
            outside,
            receiver,
            _dns: dns,
        };
        let mut running = Vec::new();
        for (i, env) in c.relays.iter_mut().enumerate() {
            running.push((format!("mrelay{}", i + 1), Some(env.start())));
        }
        for (i, env) in c.servers.iter_mut().enumerate() {
            running.push((format!("mail-server{}", i + 1), Some(env.start())));
        }
        running.push(("mta.outside.example".to_string(), Some(c.outside.start())));
        c.running = running;
        c
    }

    fn logs(&self) -> Vec<(&str, &Server)> {
        self.running
            .iter()
            .filter_map(|(n, s)| s.as_ref().map(|s| (n.as_str(), s)))
            .collect()
    }

    /// Kills (SIGKILL) mrelay1: the machine is gone.
    fn kill_relay1(&mut self) {
        let (_, s) = &mut self.running[0];
        let mut s = s.take().expect("mrelay1 runs");
        s.kill9();
        // Nothing answers there any more (connection refused at once).
        assert!(std::net::TcpStream::connect(format!("{}:{}", C3_RELAY[0], self.port)).is_err());
    }

    /// The Maildir of `user` on departmental server `n` (1 or 2).
    fn mailbox(&self, n: usize, user: &str) -> PathBuf {
        self.servers[n - 1]
            .dir
            .path()
            .join("mail")
            .join(format!("depart{n}.uc.pt"))
            .join(user)
    }

    /// Mail from the Internet: the test hands it to the outside MTA, which delivers it by
    /// the MX records of the recipients' domains.
    fn send_from_outside(&self, rcpts: &[&str], subject: &str) -> String {
        let msg = format!(
            "From: Carlos <carlos@outside.example>\nTo: {}\nSubject: {subject}\n\
             Message-ID: <{subject}@outside.example>\n\nHello from outside: {subject}.\n",
            rcpts.join(", ")
        );
        submit(
            &self.outside.addr(),
            C3_CLIENT,
            "carlos@outside.example",
            rcpts,
            &msg,
        )
    }

    fn wait_all_queues_empty(&self) {
        let logs = self.logs();
        wait_queue_empty(&self.outside, "mta.outside.example", 20, &logs);
        for (i, (name, s)) in self.running.iter().take(4).enumerate() {
            if s.is_some() {
                let env = if i < 2 {
                    &self.relays[i]
                } else {
                    &self.servers[i - 2]
                };
                wait_queue_empty(env, name, 20, &logs);
            }
        }
    }
}

/// (a) Mail from the Internet for both departments arrives in the right departmental
/// Maildirs, through a relay (virtusertable) and with every hop visible; the relays take
/// nothing that is not theirs.
#[test]
fn cases_case3_mail_from_outside_reaches_the_departmental_maildirs() {
    let c = Case3::start();
    c.send_from_outside(
        &["ana@depart1.uc.pt", "carla@depart2.uc.pt"],
        "both-departments",
    );
    c.send_from_outside(&["bruno+lists@depart1.uc.pt"], "detail");

    let logs = c.logs();
    let ana = wait_maildir(&c.mailbox(1, "ana"), 1, 30, &logs);
    let carla = wait_maildir(&c.mailbox(2, "carla"), 1, 30, &logs);
    let bruno = wait_maildir(&c.mailbox(1, "bruno"), 1, 30, &logs);
    c.wait_all_queues_empty();

    for (msg, n, user) in [(&ana[0], 1, "ana"), (&carla[0], 2, "carla")] {
        // The relays rewrote user@departN.uc.pt to user@mail-serverN.inst.uc.pt.
        assert_maildir_message(
            msg,
            "carlos@outside.example",
            &format!("{user}@mail-server{n}.inst.uc.pt"),
        );
        let fields = header_fields(msg);
        assert_eq!(header(&fields, "Subject"), ["both-departments"], "{msg}");
        assert_eq!(
            header(&fields, "To"),
            ["ana@depart1.uc.pt, carla@depart2.uc.pt"],
            "{msg}"
        );
        assert_eq!(body(msg), "Hello from outside: both-departments.\n");
        // Hop by hop: the test's client, the outside MTA, one of the relays.
        let at_server = received_by(msg, &format!("mail-server{n}.inst.uc.pt"));
        let relay = if at_server.contains(&format!("[{}]", C3_RELAY[0])) {
            "mrelay1.inst.uc.pt"
        } else {
            assert!(
                at_server.contains(&format!("[{}]", C3_RELAY[1])),
                "mail-server{n} got the mail from neither relay: {at_server}"
            );
            "mrelay2.inst.uc.pt"
        };
        let at_relay = received_by(msg, relay);
        assert!(
            at_relay.contains(&format!("[{C3_OUTSIDE_MTA}]")),
            "{at_relay}"
        );
        let at_mta = received_by(msg, "mta.outside.example");
        assert!(at_mta.contains(&format!("[{C3_CLIENT}]")), "{at_mta}");
        assert_eq!(
            fields.iter().filter(|f| f.starts_with("Received:")).count(),
            3,
            "{msg}"
        );
    }
    // user+detail@depart1.uc.pt: %1 is the user without the detail.
    assert_maildir_message(
        &bruno[0],
        "carlos@outside.example",
        "bruno@mail-server1.inst.uc.pt",
    );
    assert_eq!(body(&bruno[0]), "Hello from outside: detail.\n");
    // Each message once, in the right place only.
    assert_eq!(maildir_messages(&c.mailbox(1, "ana")).len(), 1);
    assert_eq!(maildir_messages(&c.mailbox(2, "carla")).len(), 1);
    assert!(!c.mailbox(2, "ana").exists());
    assert!(!c.mailbox(1, "carla").exists());
    for (n, user) in [(1, "ana"), (2, "carla"), (1, "bruno")] {
        let tmp: Vec<_> = fs::read_dir(c.mailbox(n, user).join("tmp"))
            .map(|rd| rd.collect())
            .unwrap_or_default();
        assert!(tmp.is_empty(), "{user}: files left in tmp/: {tmp:?}");
    }
    assert!(c.receiver.messages().is_empty());

    // The relays are no open relay, and the virtusertable's error: entries refuse at RCPT.
    let relay = format!("{}:{}", C3_RELAY[0], c.port);
    let r = rcpt_reply(
        &relay,
        C3_CLIENT,
        "spam@outside.example",
        "friend@elsewhere.example",
    );
    assert_eq!(r.code, 550, "{r}");
    assert!(r.to_string().contains("5.7.1"), "{r}");
    let r = rcpt_reply(
        &relay,
        C3_CLIENT,
        "carlos@outside.example",
        "antigo@depart1.uc.pt",
    );
    assert_eq!(r.code, 550, "{r}");
    assert!(r.to_string().contains("5.1.1"), "{r}");
    let r = rcpt_reply(
        &relay,
        C3_CLIENT,
        "carlos@outside.example",
        "lista@depart2.uc.pt",
    );
    assert_eq!(r.code, 550, "{r}");
    assert!(r.to_string().contains("5.7.0"), "{r}");
    assert!(r.to_string().contains("This list is closed"), "{r}");
}

/// (b) mrelay1 dies: the outside MTA falls over to mrelay2 within its first attempt (it
/// would not retry for an hour), and no message is lost or doubled.
#[test]
fn cases_case3_one_relay_down_mail_from_outside_still_arrives() {
    let mut c = Case3::start();
    let before = ["before-1", "before-2", "before-3"];
    for s in before {
        c.send_from_outside(&["ana@depart1.uc.pt", "carla@depart2.uc.pt"], s);
    }
    wait_maildir(&c.mailbox(1, "ana"), 3, 30, &c.logs());
    wait_maildir(&c.mailbox(2, "carla"), 3, 30, &c.logs());
    c.wait_all_queues_empty();

    c.kill_relay1();
    let after = [
        "after-1", "after-2", "after-3", "after-4", "after-5", "after-6",
    ];
    for s in after {
        c.send_from_outside(&["ana@depart1.uc.pt", "carla@depart2.uc.pt"], s);
    }
    let all: Vec<String> = {
        let mut v: Vec<String> = before
            .iter()
            .chain(after.iter())
            .map(|s| s.to_string())
            .collect();
        v.sort();
        v
    };
    for (n, user) in [(1, "ana"), (2, "carla")] {
        let msgs = wait_maildir(&c.mailbox(n, user), all.len(), 30, &c.logs());
        // Exactly once each.
        assert_eq!(subjects(&msgs), all, "{user}");
        for m in &msgs {
            let subject = header(&header_fields(m), "Subject")[0].to_string();
            assert_maildir_message(
                m,
                "carlos@outside.example",
                &format!("{user}@mail-server{n}.inst.uc.pt"),
            );
            if subject.starts_with("after-") {
                // Only mrelay2 is left.
                let at_server = received_by(m, &format!("mail-server{n}.inst.uc.pt"));
                assert!(
                    at_server.contains(&format!("[{}]", C3_RELAY[1])),
                    "{subject}: {at_server}"
                );
                received_by(m, "mrelay2.inst.uc.pt");
            }
        }
    }
    c.wait_all_queues_empty();
}

/// (c) A departmental user sends to the Internet through the departmental server: it
/// leaves through the relays (smart host smtp.inst.uc.pt) with the envelope sender and
/// From: masqueraded as the department; every other header, and the body, untouched. Then
/// the same with mrelay1 down: the departmental servers fall over to mrelay2.
#[test]
fn cases_case3_departmental_mail_leaves_through_the_relays_masqueraded() {
    let mut c = Case3::start();
    let port = c.port;
    let server = |n: usize| format!("{}:{}", C3_SERVER[n - 1], port);
    let message = |n: usize, user: &str, name: &str, subject: &str| {
        format!(
            "From: {name} <{user}@mail-server{n}.inst.uc.pt>\n\
             To: Friend <friend@outside.example>\n\
             Subject: {subject}\n\
             Date: Mon, 13 Jul 1998 10:00:00 +0100\n\
             Message-ID: <{subject}.{user}@mail-server{n}.inst.uc.pt>\n\
             X-Mailer: test client\n\
             \n\
             Sent by {user}@mail-server{n}.inst.uc.pt, who stays that in the body.\n"
        )
    };
    // Checks what the outside recipient got against what was sent.
    let check = |got: &crate::receiver::ReceivedMessage, sent: &str, n: usize, user: &str| {
        let data = String::from_utf8_lossy(&got.data).into_owned();
        assert_eq!(got.sender, format!("{user}@depart{n}.uc.pt"), "{data}");
        assert_eq!(got.recipients, ["friend@outside.example"], "{data}");
        let fields = header_fields(&data);
        for line in sent.lines().take_while(|l| !l.is_empty()) {
            if line.starts_with("From:") {
                let want = line.replace(
                    &format!("@mail-server{n}.inst.uc.pt>"),
                    &format!("@depart{n}.uc.pt>"),
                );
                assert_eq!(
                    header(&fields, "From"),
                    [want["From:".len()..].trim()],
                    "{data}"
                );
            } else {
                assert!(
                    fields.iter().any(|f| f == line),
                    "header {line:?} changed or lost:\n{data}"
                );
            }
        }
        assert_eq!(
            body(&data),
            body(&sent.replace('\n', "\r\n")),
            "the body changed:\n{data}"
        );
        // The path: the user's machine, the departmental server, a relay.
        let at_server = received_by(&data, &format!("mail-server{n}.inst.uc.pt"));
        assert!(
            at_server.contains(&format!("[{}]", C3_DEPART_USER[n - 1])),
            "{at_server}"
        );
        let relayed = ["mrelay1.inst.uc.pt", "mrelay2.inst.uc.pt"]
            .iter()
            .filter(|r| {
                header_fields(&data)
                    .iter()
                    .any(|f| f.starts_with("Received:") && f.contains(&format!("by {r} ")))
            })
            .count();
        assert_eq!(relayed, 1, "not through exactly one relay:\n{data}");
        let at_relay = header_fields(&data)
            .into_iter()
            .find(|f| f.starts_with("Received:") && f.contains(" by mrelay"))
            .unwrap();
        assert!(
            at_relay.contains(&format!("[{}]", C3_SERVER[n - 1])),
            "the relay did not see mail-server{n} connect: {at_relay}"
        );
        data
    };

    let sent1 = message(1, "ana", "Ana Silva", "to-the-internet");
    submit(
        &server(1),
        C3_DEPART_USER[0],
        "ana@mail-server1.inst.uc.pt",
        &["friend@outside.example"],
        &sent1,
    );
    let ok = c.receiver.wait_for(1, Duration::from_secs(30));
    assert!(ok, "nothing arrived outside:\n{}", logs(&c.logs()));
    check(&c.receiver.messages()[0], &sent1, 1, "ana");

    // One relay down: the smart host's other address takes it, at the first attempt.
    c.kill_relay1();
    let sent2 = message(2, "carla", "Carla Sousa", "relay1-down-2");
    submit(
        &server(2),
        C3_DEPART_USER[1],
        "carla@mail-server2.inst.uc.pt",
        &["friend@outside.example"],
        &sent2,
    );
    let sent3 = message(1, "ana", "Ana Silva", "relay1-down-1");
    submit(
        &server(1),
        C3_DEPART_USER[0],
        "ana@mail-server1.inst.uc.pt",
        &["friend@outside.example"],
        &sent3,
    );
    let ok = c.receiver.wait_for(3, Duration::from_secs(30));
    assert!(
        ok,
        "{} of 3 arrived outside:\n{}",
        c.receiver.messages().len(),
        logs(&c.logs())
    );
    let msgs = c.receiver.messages();
    assert_eq!(msgs.len(), 3);
    for (sent, n, user) in [(&sent2, 2, "carla"), (&sent3, 1, "ana")] {
        let subject = header(&header_fields(sent), "Subject")[0].to_string();
        let got = msgs
            .iter()
            .find(|m| String::from_utf8_lossy(&m.data).contains(&format!("Subject: {subject}\r\n")))
            .unwrap_or_else(|| panic!("{subject} did not arrive"));
        let data = check(got, sent, n, user);
        received_by(&data, "mrelay2.inst.uc.pt");
    }
    c.wait_all_queues_empty();
}

// ---------------------------------------------------------------------------------------
// Case 1: one mail server and a backup MX.

const C1_PRIMARY: &str = "127.0.41.1";
const C1_BACKUP: &str = "127.0.41.2";
const C1_OUTSIDE_MTA: &str = "127.0.41.150";
const C1_CLIENT: &str = "127.0.41.200";

struct Case1 {
    port: u16,
    primary: MxEnv,
    backup: MxEnv,
    dns: TestDns,
}

impl Case1 {
    /// The picture, nothing started; the backup retries every `backup_retry`.
    fn new(backup_retry: &str) -> Case1 {
        let port = closed_port_at(C1_PRIMARY);
        let inst = zone(
            "inst.uc.pt.",
            &format!(
                "@ IN MX 10 mail-server.inst.uc.pt.\n@ IN MX 20 backup.inst.uc.pt.\n\
                 mail-server IN A {C1_PRIMARY}\nbackup IN A {C1_BACKUP}\n\
                 pop IN CNAME mail-server\nsmtp IN CNAME mail-server\n"
            ),
        );
        let outside_zone = zone("outside.example.", &format!("mta IN A {C1_OUTSIDE_MTA}\n"));
        let dns = TestDns::start(&[
            ("inst.uc.pt.", inst.as_str()),
            ("outside.example.", outside_zone.as_str()),
        ]);
        let users = contrib("case1/inst.uc.pt.users");
        let primary = MxEnv::host(
            "mail-server.inst.uc.pt",
            C1_PRIMARY,
            port,
            &format!(
                "{}[[local]]\ndomain = \"inst.uc.pt\"\n\
                 maildir = \"{{dir}}/mail/{{domain}}/{{user}}\"\nusers = \"{users}\"\n\n\
                 [relay]\nnetworks = [\"127.0.41.0/25\"]\n\n\
                 [masquerade]\nas = \"inst.uc.pt\"\ndomains = [\"inst.uc.pt\"]\nenvelope = true\n",
                machine(&dns, port, C1_PRIMARY, "1h")
            ),
        );
        let backup = MxEnv::host(
            "backup.inst.uc.pt",
            C1_BACKUP,
            port,
            &format!(
                "{}[[partner]]\ndomain = \"inst.uc.pt\"\nrecipients = \"{users}\"\netrn = true\n",
                machine(&dns, port, C1_BACKUP, backup_retry)
            ),
        );
        Case1 {
            port,
            primary,
            backup,
            dns,
        }
    }

    fn mailbox(&self, user: &str) -> PathBuf {
        self.primary
            .dir
            .path()
            .join("mail")
            .join("inst.uc.pt")
            .join(user)
    }

    fn message(subject: &str, to: &str) -> String {
        format!(
            "From: Carlos <carlos@outside.example>\nTo: {to}\nSubject: {subject}\n\
             Message-ID: <{subject}@outside.example>\n\nBody of {subject}.\n"
        )
    }

    /// Mail handed straight to the backup, as an outside MTA does when the mail server
    /// does not answer.
    fn to_backup(&self, to: &str, subject: &str) -> String {
        submit(
            &self.backup.addr(),
            C1_CLIENT,
            "carlos@outside.example",
            &[to],
            &Case1::message(subject, to),
        )
    }

    /// Waits until the backup has tried (and failed) every message at least once.
    fn wait_attempted(&self, n: usize, servers: &[(&str, &Server)]) -> Vec<QueueEntry> {
        let ok = wait_for(Duration::from_secs(20), Duration::from_millis(100), || {
            let q = self.backup.queue(None);
            q.len() == n && q.iter().all(|e| e.attempts >= 1)
        });
        let q = self.backup.queue(None);
        assert!(ok, "backup queue: {q:#?}\n{}", logs(servers));
        q
    }
}

/// Checks a message the primary stored: Return-Path, Delivered-To, the backup as the hop
/// before (seen from its own address), the body.
fn assert_via_backup(msg: &str, user: &str, subject: &str) {
    assert_maildir_message(msg, "carlos@outside.example", &format!("{user}@inst.uc.pt"));
    let at_primary = received_by(msg, "mail-server.inst.uc.pt");
    assert!(
        at_primary.contains(&format!("[{C1_BACKUP}]")),
        "the primary did not get it from the backup: {at_primary}"
    );
    received_by(msg, "backup.inst.uc.pt");
    assert_eq!(header(&header_fields(msg), "Subject"), [subject], "{msg}");
    assert_eq!(body(msg), format!("Body of {subject}.\n"));
}

/// The primary is stopped; the backup keeps the mail (and says so in `mxspool queue` and
/// `doctor`); the primary is started again on the same spool and configuration; an
/// explicit `mxspool flush -v` on the backup delivers everything into the Maildirs and
/// empties the backup's queue. The backup retries only hourly here, so the flush is what
/// delivers.
#[test]
fn cases_case1_backup_keeps_the_mail_until_the_primary_is_back_and_flushed() {
    let mut c = Case1::new("1h");
    let mut primary = c.primary.start();
    let backup = c.backup.start();

    // Normal service first: straight to the mail server.
    submit(
        &c.primary.addr(),
        C1_CLIENT,
        "carlos@outside.example",
        &["ana@inst.uc.pt"],
        &Case1::message("direct", "ana@inst.uc.pt"),
    );
    let ana = wait_maildir(
        &c.mailbox("ana"),
        1,
        20,
        &[("mail-server", &primary), ("backup", &backup)],
    );
    assert_maildir_message(&ana[0], "carlos@outside.example", "ana@inst.uc.pt");

    // The mail server goes down.
    assert!(
        stop_server(&mut primary),
        "mail-server did not stop on SIGTERM"
    );
    drop(primary);

    let id1 = c.to_backup("ana@inst.uc.pt", "while-down-1");
    let id2 = c.to_backup("bruno@inst.uc.pt", "while-down-2");
    // The backup knows the users: no later bounce for an unknown one.
    let r = rcpt_reply(
        &c.backup.addr(),
        C1_CLIENT,
        "carlos@outside.example",
        "nobody@inst.uc.pt",
    );
    assert_eq!(r.code, 550, "{r}");
    assert!(r.to_string().contains("5.1.1"), "{r}");

    let q = c.wait_attempted(2, &[("backup", &backup)]);
    let mut ids: Vec<&str> = q.iter().map(|e| e.id.as_str()).collect();
    ids.sort();
    let mut want = vec![id1.as_str(), id2.as_str()];
    want.sort();
    assert_eq!(ids, want);
    for e in &q {
        assert_eq!(e.domain, "inst.uc.pt");
        assert_eq!(e.sender, "carlos@outside.example");
        assert!(!e.held);
        assert!(e.recipients.iter().all(|r| r.state == "pending"), "{e:?}");
        // Tried at the mail server (MX 10), never at itself (MX 20).
        let err = e.last_error.as_deref().unwrap_or("");
        assert!(err.contains(C1_PRIMARY), "{e:?}");
        assert!(!err.contains(C1_BACKUP), "{e:?}");
    }
    // What the administrator sees: mailq ...
    let out = c.backup.mxspool(&["queue"]);
    check_ok("mxspool queue", &out);
    let listing = text(&out.stdout);
    for id in [&id1, &id2] {
        assert!(listing.contains(id.as_str()), "{id} not listed:\n{listing}");
    }
    assert!(listing.contains("carlos@outside.example"), "{listing}");
    // ... and doctor: this server at 20, the mail server not answering.
    let out = c.backup.mxspool(&["doctor", "inst.uc.pt"]);
    let report = text(&out.stdout);
    assert!(
        report
            .lines()
            .any(|l| l.contains("backup.inst.uc.pt") && l.contains("this server")),
        "{report}\n{}",
        text(&out.stderr)
    );
    assert!(
        report
            .lines()
            .any(|l| l.contains("mail-server.inst.uc.pt") && l.contains("FAIL")),
        "{report}\n{}",
        text(&out.stderr)
    );
    assert_eq!(maildir_messages(&c.mailbox("ana")).len(), 1);
    assert!(maildir_messages(&c.mailbox("bruno")).is_empty());

    // The mail server is back, on the same spool and configuration. The backup would wait
    // an hour; the administrator flushes.
    let primary = c.primary.start();
    let servers = [("mail-server", &primary), ("backup", &backup)];
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(c.backup.queue(None).len(), 2, "delivered before the flush?");
    let out = c.backup.mxspool(&["flush", "inst.uc.pt", "-v"]);
    check_ok("mxspool flush inst.uc.pt -v", &out);
    let transcript = format!("{}{}", text(&out.stdout), text(&out.stderr));
    assert!(
        transcript.contains("MAIL FROM:<carlos@outside.example>"),
        "no transcript:\n{transcript}"
    );
    let ana = wait_maildir(&c.mailbox("ana"), 2, 20, &servers);
    let bruno = wait_maildir(&c.mailbox("bruno"), 1, 20, &servers);
    wait_queue_empty(&c.backup, "backup", 20, &servers);
    let later = ana
        .iter()
        .find(|m| m.contains("Subject: while-down-1\n"))
        .expect("while-down-1 in ana's Maildir");
    assert_via_backup(later, "ana", "while-down-1");
    assert_via_backup(&bruno[0], "bruno", "while-down-2");
}

/// The whole story without the administrator: an outside MTA finds the mail server down
/// and falls over to the backup MX (MX 20) at once; the backup keeps retrying; when the
/// mail server is started again, the next retry delivers and the backup's queue empties.
#[test]
fn cases_case1_backup_delivers_by_retry_when_the_primary_returns() {
    let mut c = Case1::new("2s");
    let mut outside_env = MxEnv::host(
        "mta.outside.example",
        C1_OUTSIDE_MTA,
        c.port,
        &format!(
            "{}[relay]\nnetworks = [\"{C1_CLIENT}/32\"]\n",
            machine(&c.dns, c.port, C1_OUTSIDE_MTA, "1h")
        ),
    );
    let outside = outside_env.start();
    let backup = c.backup.start();
    // The mail server is down from the start (never started yet: nothing listens).

    for (to, subject) in [
        ("ana@inst.uc.pt", "retry-1"),
        ("carla@inst.uc.pt", "retry-2"),
    ] {
        submit(
            &outside_env.addr(),
            C1_CLIENT,
            "carlos@outside.example",
            &[to],
            &Case1::message(subject, to),
        );
    }
    // The outside MTA tried MX 10, then MX 20 in the same attempt: its queue empties (it
    // would not retry for an hour), and the backup has both.
    wait_queue_empty(
        &outside_env,
        "mta.outside.example",
        20,
        &[("outside", &outside), ("backup", &backup)],
    );
    let q = c.wait_attempted(2, &[("outside", &outside), ("backup", &backup)]);
    assert!(q.iter().all(|e| e.domain == "inst.uc.pt"), "{q:#?}");

    // Let the backup fail a retry or two, then bring the mail server up.
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(c.backup.queue(None).len(), 2);
    let primary = c.primary.start();
    let servers = [
        ("outside", &outside),
        ("backup", &backup),
        ("mail-server", &primary),
    ];
    let ana = wait_maildir(&c.mailbox("ana"), 1, 20, &servers);
    let carla = wait_maildir(&c.mailbox("carla"), 1, 20, &servers);
    wait_queue_empty(&c.backup, "backup", 20, &servers);
    for (msg, user, subject) in [(&ana[0], "ana", "retry-1"), (&carla[0], "carla", "retry-2")] {
        assert_via_backup(msg, user, subject);
        let at_backup = received_by(msg, "backup.inst.uc.pt");
        assert!(
            at_backup.contains(&format!("[{C1_OUTSIDE_MTA}]")),
            "{at_backup}"
        );
    }
    // Nothing doubled.
    assert_eq!(maildir_messages(&c.mailbox("ana")).len(), 1);
    assert_eq!(maildir_messages(&c.mailbox("carla")).len(), 1);
}

// ---------------------------------------------------------------------------------------
// Case 2: the mail server plus outgoing relays that are also the backup MX.

const C2_SERVER: &str = "127.0.42.1";
const C2_SMTPOUT: [&str; 2] = ["127.0.42.11", "127.0.42.12"];
/// The campus network of the test (the contrib files' 192.168.0.0/24) and a workstation
/// in it.
const C2_CAMPUS: &str = "127.0.42.0/25";
const C2_WORKSTATION: &str = "127.0.42.70";
/// The Internet: the outside MTA, the outside recipient's MX, the test's own client.
const C2_OUTSIDE_MTA: &str = "127.0.42.150";
const C2_OUTSIDE_MX: &str = "127.0.42.160";
const C2_CLIENT: &str = "127.0.42.200";

struct Case2 {
    port: u16,
    server: MxEnv,
    smtpout: Vec<MxEnv>,
    outside: MxEnv,
    /// The outside recipient: mx.outside.example, an mxspool with a Maildir for
    /// outside.example, so its `Received:` field shows the address that connected.
    outside_mx: MxEnv,
    _dns: TestDns,
}

impl Case2 {
    /// The picture as in `contrib/case2`, nothing started. The mail server and the outside
    /// MTA retry only after an hour (what they deliver, they deliver at the first attempt);
    /// so do the relays (`contrib/case2/smtpout1.toml`): mail waiting there for the mail
    /// server goes only when flushed.
    fn new() -> Case2 {
        let port = closed_port_at(C2_SERVER);
        let inst = zone(
            "inst.uc.pt.",
            &format!(
                "@ IN MX 10 mail-server.inst.uc.pt.\n\
                 @ IN MX 20 smtpout1.inst.uc.pt.\n@ IN MX 20 smtpout2.inst.uc.pt.\n\
                 mail-server IN A {C2_SERVER}\npop IN CNAME mail-server\n\
                 smtpout1 IN A {o1}\nsmtpout2 IN A {o2}\n\
                 ; the round-robin name: one A record per relay\n\
                 smtpout IN A {o1}\nsmtpout IN A {o2}\nsmtp IN CNAME smtpout\n",
                o1 = C2_SMTPOUT[0],
                o2 = C2_SMTPOUT[1]
            ),
        );
        let outside_zone = zone(
            "outside.example.",
            &format!("@ IN MX 10 mx\nmx IN A {C2_OUTSIDE_MX}\nmta IN A {C2_OUTSIDE_MTA}\n"),
        );
        let dns = TestDns::start(&[
            ("inst.uc.pt.", inst.as_str()),
            ("outside.example.", outside_zone.as_str()),
        ]);
        let users = contrib("case2/inst.uc.pt.users");
        let masquerade = "[masquerade]\nas = \"inst.uc.pt\"\ndomains = [\"inst.uc.pt\"]\n\
                          envelope = true\n";
        let server = MxEnv::host(
            "mail-server.inst.uc.pt",
            C2_SERVER,
            port,
            &format!(
                "{}[[local]]\ndomain = \"inst.uc.pt\"\n\
                 maildir = \"{{dir}}/mail/{{domain}}/{{user}}\"\nusers = \"{users}\"\n\n\
                 [[local]]\ndomain = \"mail-server.inst.uc.pt\"\n\
                 maildir = \"{{dir}}/mail/inst.uc.pt/{{user}}\"\nusers = \"{users}\"\n\n\
                 [relay]\nnetworks = [\"{C2_CAMPUS}\"]\nsmart_host = \"smtpout.inst.uc.pt\"\n\n\
                 {masquerade}",
                machine(&dns, port, C2_SERVER, "1h")
            ),
        );
        let smtpout: Vec<MxEnv> = (0..2)
            .map(|i| {
                let ip = C2_SMTPOUT[i];
                MxEnv::host(
                    &format!("smtpout{}.inst.uc.pt", i + 1),
                    ip,
                    port,
                    // The tail starts inside [smtp].
                    &format!(
                        "etrn_clients = [\"{C2_SERVER}/32\"]\n\n{}\
                         [[partner]]\ndomain = \"inst.uc.pt\"\nrecipients = \"{users}\"\n\
                         etrn = true\n\n[relay]\nnetworks = [\"{C2_CAMPUS}\"]\n\n{masquerade}",
                        machine(&dns, port, ip, "1h")
                    ),
                )
            })
            .collect();
        let outside = MxEnv::host(
            "mta.outside.example",
            C2_OUTSIDE_MTA,
            port,
            &format!(
                "{}[relay]\nnetworks = [\"{C2_CLIENT}/32\"]\n",
                machine(&dns, port, C2_OUTSIDE_MTA, "1h")
            ),
        );
        let outside_mx = MxEnv::host(
            "mx.outside.example",
            C2_OUTSIDE_MX,
            port,
            &format!(
                "{}[[local]]\ndomain = \"outside.example\"\n\
                 maildir = \"{{dir}}/mail/{{domain}}/{{user}}\"\n",
                machine(&dns, port, C2_OUTSIDE_MX, "1h")
            ),
        );
        Case2 {
            port,
            server,
            smtpout,
            outside,
            outside_mx,
            _dns: dns,
        }
    }

    fn mailbox(&self, user: &str) -> PathBuf {
        self.server
            .dir
            .path()
            .join("mail")
            .join("inst.uc.pt")
            .join(user)
    }

    fn outside_mailbox(&self, user: &str) -> PathBuf {
        self.outside_mx
            .dir
            .path()
            .join("mail")
            .join("outside.example")
            .join(user)
    }
}

/// Every running server of `list` with its name, for failure messages.
fn running<'a>(list: &'a [(&'a str, &'a Option<Server>)]) -> Vec<(&'a str, &'a Server)> {
    list.iter()
        .filter_map(|(n, s)| s.as_ref().map(|s| (*n, s)))
        .collect()
}

/// (1) A campus workstation sends through the mail server: the mail leaves through one of
/// the relays (smart host smtpout.inst.uc.pt, round robin), the outside recipient sees the
/// relay's address connect, and the envelope sender and From: are masqueraded from the
/// workstation's name to inst.uc.pt; with smtpout1 killed it leaves through smtpout2, at
/// the mail server's first attempt. (2) Mail from outside reaches the mail server's
/// Maildir; with the mail server stopped, the outside MTA falls over to the relays (MX 20),
/// the mail waits on one of them (`mxspool queue`), and once the mail server is back,
/// `mxspool flush inst.uc.pt` on that relay delivers it into the Maildir, exactly once.
#[test]
fn cases_case2_mail_leaves_through_the_relays_and_waits_there_while_the_server_is_down() {
    let mut c = Case2::new();
    let mut server = Some(c.server.start());
    let mut smtpout1 = Some(c.smtpout[0].start());
    let smtpout2 = Some(c.smtpout[1].start());
    let outside = Some(c.outside.start());
    let outside_mx = Some(c.outside_mx.start());
    macro_rules! servers {
        () => {
            running(&[
                ("mail-server", &server),
                ("smtpout1", &smtpout1),
                ("smtpout2", &smtpout2),
                ("mta.outside.example", &outside),
                ("mx.outside.example", &outside_mx),
            ])
        };
    }

    // (1) From a workstation to the Internet, through the mail server and a relay.
    let send_out = |subject: &str| {
        let sent = format!(
            "From: Bruno <bruno@ws.inst.uc.pt>\nTo: Someone <someone@outside.example>\n\
             Subject: {subject}\nMessage-ID: <{subject}@ws.inst.uc.pt>\n\n\
             Written on ws.inst.uc.pt.\n"
        );
        submit(
            &c.server.addr(),
            C2_WORKSTATION,
            "bruno@ws.inst.uc.pt",
            &["someone@outside.example"],
            &sent,
        );
    };
    // Checks a message the outside recipient got; returns the relay it came through.
    let check_out = |msg: &str, subject: &str| -> usize {
        assert_maildir_message(msg, "bruno@inst.uc.pt", "someone@outside.example");
        let fields = header_fields(msg);
        assert_eq!(header(&fields, "Subject"), [subject], "{msg}");
        assert_eq!(
            header(&fields, "From"),
            ["Bruno <bruno@inst.uc.pt>"],
            "{msg}"
        );
        assert_eq!(
            header(&fields, "To"),
            ["Someone <someone@outside.example>"],
            "{msg}"
        );
        assert_eq!(body(msg), "Written on ws.inst.uc.pt.\n");
        let at_mx = received_by(msg, "mx.outside.example");
        let relay = (0..2)
            .find(|&i| at_mx.contains(&format!("[{}]", C2_SMTPOUT[i])))
            .unwrap_or_else(|| panic!("not from a relay's address: {at_mx}"));
        let at_relay = received_by(msg, &format!("smtpout{}.inst.uc.pt", relay + 1));
        assert!(at_relay.contains(&format!("[{C2_SERVER}]")), "{at_relay}");
        let at_server = received_by(msg, "mail-server.inst.uc.pt");
        assert!(
            at_server.contains(&format!("[{C2_WORKSTATION}]")),
            "{at_server}"
        );
        assert_eq!(
            fields.iter().filter(|f| f.starts_with("Received:")).count(),
            3,
            "{msg}"
        );
        relay
    };

    send_out("campus-out-1");
    let got = wait_maildir(&c.outside_mailbox("someone"), 1, 30, &servers!());
    check_out(&got[0], "campus-out-1");
    wait_queue_empty(&c.server, "mail-server", 20, &servers!());

    // smtpout1 dies: the smart host's other address takes the mail at once.
    smtpout1.take().unwrap().kill9();
    assert!(std::net::TcpStream::connect(format!("{}:{}", C2_SMTPOUT[0], c.port)).is_err());
    send_out("campus-out-2");
    let got = wait_maildir(&c.outside_mailbox("someone"), 2, 30, &servers!());
    let second = got
        .iter()
        .find(|m| m.contains("Subject: campus-out-2\n"))
        .expect("campus-out-2 outside");
    assert_eq!(check_out(second, "campus-out-2"), 1, "{second}");
    wait_queue_empty(&c.server, "mail-server", 20, &servers!());
    wait_queue_empty(&c.smtpout[1], "smtpout2", 20, &servers!());
    assert_eq!(
        subjects(&maildir_messages(&c.outside_mailbox("someone"))),
        ["campus-out-1", "campus-out-2"]
    );
    // smtpout1 comes back on its spool.
    smtpout1 = Some(c.smtpout[0].start());

    // (2) From the Internet to ana@inst.uc.pt: the outside MTA delivers by MX.
    let from_outside = |subject: &str| {
        submit(
            &c.outside.addr(),
            C2_CLIENT,
            "carlos@outside.example",
            &["ana@inst.uc.pt"],
            &Case1::message(subject, "ana@inst.uc.pt"),
        );
    };
    from_outside("direct");
    let ana = wait_maildir(&c.mailbox("ana"), 1, 30, &servers!());
    assert_maildir_message(&ana[0], "carlos@outside.example", "ana@inst.uc.pt");
    let at_server = received_by(&ana[0], "mail-server.inst.uc.pt");
    assert!(
        at_server.contains(&format!("[{C2_OUTSIDE_MTA}]")),
        "{at_server}"
    );
    wait_queue_empty(&c.outside, "mta.outside.example", 20, &servers!());

    // The mail server goes down: MX 10 refuses, the outside MTA takes an MX 20.
    let mut s = server.take().unwrap();
    assert!(stop_server(&mut s), "mail-server did not stop on SIGTERM");
    drop(s);
    from_outside("while-down");
    wait_queue_empty(&c.outside, "mta.outside.example", 20, &servers!());
    // One relay holds it and has tried the mail server (only it: no ping-pong to the
    // sibling relay at the same preference).
    let mut holder = None;
    let ok = wait_for(Duration::from_secs(20), Duration::from_millis(100), || {
        let q: Vec<Vec<QueueEntry>> = c.smtpout.iter().map(|e| e.queue(None)).collect();
        let n: Vec<usize> = q.iter().map(|q| q.len()).collect();
        match n.as_slice() {
            [1, 0] | [0, 1] => {
                let i = if n[0] == 1 { 0 } else { 1 };
                if q[i][0].attempts >= 1 {
                    holder = Some((i, q[i][0].clone()));
                    return true;
                }
                false
            }
            _ => false,
        }
    });
    assert!(
        ok,
        "no relay holds exactly the one message: {:#?} {:#?}\n{}",
        c.smtpout[0].queue(None),
        c.smtpout[1].queue(None),
        logs(&servers!())
    );
    let (h, entry) = holder.unwrap();
    let relay = &c.smtpout[h];
    assert_eq!(entry.domain, "inst.uc.pt", "{entry:?}");
    assert_eq!(entry.sender, "carlos@outside.example", "{entry:?}");
    assert!(
        entry.recipients.iter().all(|r| r.state == "pending"),
        "{entry:?}"
    );
    let err = entry.last_error.as_deref().unwrap_or("");
    assert!(err.contains(C2_SERVER), "{entry:?}");
    assert!(!C2_SMTPOUT.iter().any(|ip| err.contains(ip)), "{entry:?}");
    // What the administrator of that relay sees.
    let out = relay.mxspool(&["queue"]);
    check_ok("mxspool queue", &out);
    let listing = text(&out.stdout);
    assert!(listing.contains(&entry.id), "{listing}");
    assert!(listing.contains("carlos@outside.example"), "{listing}");
    assert!(listing.contains("ana@inst.uc.pt"), "{listing}");

    // The mail server is back (same spool and configuration); the relay would wait an
    // hour, the administrator flushes it.
    server = Some(c.server.start());
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(relay.queue(None).len(), 1, "delivered before the flush?");
    assert_eq!(maildir_messages(&c.mailbox("ana")).len(), 1);
    let out = relay.mxspool(&["flush", "inst.uc.pt"]);
    check_ok("mxspool flush inst.uc.pt", &out);
    let ana = wait_maildir(&c.mailbox("ana"), 2, 20, &servers!());
    wait_queue_empty(relay, &format!("smtpout{}", h + 1), 20, &servers!());
    let later = ana
        .iter()
        .find(|m| m.contains("Subject: while-down\n"))
        .expect("while-down in ana's Maildir");
    assert_maildir_message(later, "carlos@outside.example", "ana@inst.uc.pt");
    let at_server = received_by(later, "mail-server.inst.uc.pt");
    assert!(
        at_server.contains(&format!("[{}]", C2_SMTPOUT[h])),
        "{at_server}"
    );
    let at_relay = received_by(later, &format!("smtpout{}.inst.uc.pt", h + 1));
    assert!(
        at_relay.contains(&format!("[{C2_OUTSIDE_MTA}]")),
        "{at_relay}"
    );
    assert_eq!(body(later), "Body of while-down.\n");
    // Exactly once: nothing more arrives, nothing is left anywhere.
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        subjects(&maildir_messages(&c.mailbox("ana"))),
        ["direct", "while-down"]
    );
    for (i, env) in c.smtpout.iter().enumerate() {
        wait_queue_empty(env, &format!("smtpout{}", i + 1), 5, &servers!());
    }
    wait_queue_empty(&c.server, "mail-server", 5, &servers!());
}
