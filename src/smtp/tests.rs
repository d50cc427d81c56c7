//! SMTP transcripts through the sans-IO session. One helper, [`check`], runs a transcript:
//! `C:` lines are sent (CRLF added), `S:` lines are the expected replies, in order (a reply
//! matches when it starts with the expected text). Raw-byte cases use [`Client`] directly.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::SystemTime;

use super::session::*;
use crate::config::Config;
use crate::envelope::{Body, Ret};
use crate::policy::Policy;

const HOST: &str = "mx2.example.net";

/// A message the session had stored: its envelope and its bytes put back together.
struct Got {
    envelope: crate::envelope::Envelope,
    message: Vec<u8>,
    /// Parts the session stored ahead of the commit.
    written: u32,
}

struct Client {
    session: Session,
    /// Replies not yet matched, split into lines.
    pending: Vec<String>,
    stored: Vec<Got>,
    /// Parts written ahead (`Step::WritePart`) and not yet queued or discarded: (id, n, bytes).
    parts: Vec<(String, u32, Vec<u8>)>,
    /// What the next part write returns.
    part_result: Result<(), StoreFailure>,
    /// The largest part written.
    largest_part: usize,
    /// Messages whose parts the session asked to remove: (id, how many).
    discarded: Vec<(String, u32)>,
    /// What the next store returns.
    store_result: Result<(), StoreFailure>,
    closed: bool,
    gauge: Arc<SpoolGauge>,
    /// The session asked for the TLS handshake ([`Step::StartTls`]).
    starttls: bool,
}

fn config(max_size: usize) -> Arc<SessionConfig> {
    Arc::new(SessionConfig {
        hostname: HOST.into(),
        max_message_size: max_size,
        max_recipients: 100,
        max_errors: 20,
        recipient_overshoot: 1000,
        min_free_space: 1 << 20,
        starttls: false,
    })
}

fn policy() -> Arc<Policy> {
    let mut c = Config::parse(
        "hostname = \"mx2.example.net\"\nspool = \"/x\"\n\
         [[partner]]\ndomain = \"example.com\"\n[[partner]]\ndomain = \"example.org\"\n",
    )
    .unwrap();
    c.partner[1].users = Some(["alice".to_string()].into_iter().collect());
    Arc::new(Policy::new(&c))
}

/// Primary-server mode: a local domain, a virtual table, relay networks, masquerading.
fn primary_policy() -> Arc<Policy> {
    let mut c = Config::parse(
        "hostname = \"mx.inst.uc.pt\"\nspool = \"/x\"\n\
         [[local]]\ndomain = \"inst.uc.pt\"\nmaildir = \"/m/{user}\"\n\
         [relay]\nnetworks = [\"192.168.0.0/24\"]\n\
         [masquerade]\nas = \"inst.uc.pt\"\ndomains = [\"inst.uc.pt\"]\nenvelope = true\n",
    )
    .unwrap();
    c.virtual_table = Some(crate::config::VirtualConfig {
        file: "/x".into(),
        table: crate::virtual_table::VirtualTable::parse(
            "info@inst.uc.pt alice\nold@inst.uc.pt error:5.7.0:550 Gone fishing\n",
        )
        .unwrap()
        .into(),
    });
    Arc::new(Policy::new(&c))
}

impl Client {
    fn with(config: Arc<SessionConfig>) -> Client {
        Client::connected(config, policy(), "192.0.2.7")
    }

    fn connected(config: Arc<SessionConfig>, policy: Arc<Policy>, ip: &str) -> Client {
        let gauge = Arc::new(SpoolGauge::new(u64::MAX));
        let ip: IpAddr = ip.parse().unwrap();
        let mut c = Client {
            session: Session::new(config, policy, gauge.clone(), ip),
            pending: Vec::new(),
            stored: Vec::new(),
            parts: Vec::new(),
            part_result: Ok(()),
            largest_part: 0,
            discarded: Vec::new(),
            store_result: Ok(()),
            closed: false,
            gauge,
            starttls: false,
        };
        c.collect();
        c
    }

    fn new() -> Client {
        Client::with(config(1 << 20))
    }

    fn collect(&mut self) {
        let out = self.session.take_output();
        let text = String::from_utf8(out).expect("replies are UTF-8");
        assert!(
            text.is_empty() || text.ends_with("\r\n"),
            "reply not CRLF-terminated: {text:?}"
        );
        self.pending
            .extend(text.split_terminator("\r\n").map(str::to_string));
    }

    fn drive(&mut self, mut step: Step) {
        loop {
            self.collect();
            match step {
                Step::Read => return,
                Step::Close => {
                    self.closed = true;
                    return;
                }
                Step::StartTls => {
                    self.starttls = true;
                    return;
                }
                Step::Etrn { domain, .. } => {
                    step = self.session.etrn_done(&domain, 0, false, SystemTime::now());
                }
                Step::WritePart { id, n, bytes } => {
                    self.largest_part = self.largest_part.max(bytes.len());
                    if self.part_result.is_ok() {
                        let have = self.parts.iter().filter(|(i, ..)| *i == id).count() as u32;
                        assert_eq!(n, have + 1, "parts are written in order");
                        self.parts.push((id, n, bytes));
                    }
                    step = self
                        .session
                        .part_written(self.part_result.clone(), SystemTime::now());
                }
                Step::Discard { id, written } => {
                    let have = self.parts.iter().filter(|(i, ..)| *i == id).count() as u32;
                    assert_eq!(written, have, "discards what was written");
                    self.parts.retain(|(i, ..)| *i != id);
                    self.discarded.push((id, written));
                    step = self.session.resume(SystemTime::now());
                }
                Step::Verify(_) => {
                    step = self.session.verified(Ok(()), SystemTime::now());
                }
                Step::Store(inc) => {
                    let id = inc.envelope.id.clone();
                    if self.store_result.is_ok() {
                        let inc = *inc;
                        let m = inc.message;
                        let mut message = Vec::new();
                        let mut written = 0;
                        for (_, n, bytes) in self.parts.iter().filter(|(i, ..)| *i == id) {
                            written = *n;
                            message.extend_from_slice(bytes);
                        }
                        assert_eq!(written, m.written, "the parts written ahead");
                        let mut whole = m.first.clone();
                        whole.extend_from_slice(&message);
                        for r in &m.rest {
                            whole.extend_from_slice(r);
                        }
                        assert_eq!(whole.len() as u64, m.len());
                        self.parts.retain(|(i, ..)| *i != id);
                        self.stored.push(Got {
                            envelope: inc.envelope,
                            message: whole,
                            written,
                        });
                    }
                    step = self
                        .session
                        .stored(&id, self.store_result.clone(), SystemTime::now());
                }
            }
        }
    }

    fn send(&mut self, bytes: &[u8]) {
        assert!(
            !self.closed,
            "session closed before {:?}",
            String::from_utf8_lossy(bytes)
        );
        let step = self.session.receive(bytes, SystemTime::now());
        self.drive(step);
    }

    /// Send in pieces of `n` bytes, as separate TCP reads would deliver them.
    fn send_split(&mut self, bytes: &[u8], n: usize) {
        for piece in bytes.chunks(n) {
            self.send(piece);
        }
    }

    fn expect(&mut self, prefixes: &[&str]) {
        for p in prefixes {
            assert!(
                !self.pending.is_empty(),
                "expected reply {p:?}, got nothing more"
            );
            let got = self.pending.remove(0);
            assert!(
                got.starts_with(p),
                "expected reply starting {p:?}, got {got:?}"
            );
        }
    }

    fn expect_nothing_more(&self) {
        assert!(
            self.pending.is_empty(),
            "unexpected replies: {:?}",
            self.pending
        );
    }
}

/// Run a transcript of `C:` and `S:` lines.
fn check(transcript: &str) -> Client {
    let mut c = Client::new();
    check_with(&mut c, transcript);
    c
}

fn check_with(c: &mut Client, transcript: &str) {
    for line in transcript.lines().map(str::trim).filter(|l| !l.is_empty()) {
        if let Some(cmd) = line.strip_prefix("C:") {
            c.send(format!("{}\r\n", cmd.trim_start()).as_bytes());
        } else if let Some(reply) = line.strip_prefix("S:") {
            c.expect(&[reply.trim_start()]);
        } else {
            panic!("transcript line is neither C: nor S: {line:?}");
        }
    }
    c.expect_nothing_more();
}

const EHLO: &str = "S: 220 mx2.example.net ESMTP mxspool
    C: EHLO client.example
    S: 250-mx2.example.net
    S: 250-PIPELINING
    S: 250-SIZE 1048576
    S: 250-ENHANCEDSTATUSCODES
    S: 250-8BITMIME
    S: 250-DSN
    S: 250-ETRN
    S: 250 SMTPUTF8";

#[test]
fn greeting_and_extensions() {
    check(&format!(
        "{EHLO}\nC: HELO again\nS: 250 mx2.example.net\nC: QUIT\nS: 221 2.0.0"
    ));
}

#[test]
fn a_message_is_stored_with_a_received_header_and_its_exact_bytes() {
    let c = check(&format!(
        "{EHLO}
        C: MAIL FROM:<sender@outside.test> BODY=8BITMIME
        S: 250 2.1.0
        C: RCPT TO:<User@Example.COM>
        S: 250 2.1.5
        C: DATA
        S: 354
        C: Subject: hello
        C:
        C: ..a line that started with a dot
        C: last line
        C: .
        S: 250 2.0.0 Ok: queued as
        C: QUIT
        S: 221"
    ));
    assert_eq!(c.stored.len(), 1);
    let m = &c.stored[0];
    let text = String::from_utf8(m.message.clone()).unwrap();
    let (received, rest) = text.split_once(";\r\n\t").unwrap();
    assert!(received.starts_with("Received: from client.example ([192.0.2.7])\r\n\tby mx2.example.net (mxspool) with ESMTP id "), "{received}");
    assert!(received.contains(&m.envelope.id));
    assert!(received.ends_with("for <User@Example.COM>"), "{received}");
    let (_date, body) = rest.split_once("\r\n").unwrap();
    assert_eq!(
        body,
        "Subject: hello\r\n\r\n.a line that started with a dot\r\nlast line\r\n"
    );
    assert_eq!(m.envelope.sender, "sender@outside.test");
    assert_eq!(m.envelope.recipients[0].address, "User@Example.COM");
    assert_eq!(m.envelope.body, Body::EightBitMime);
    assert_eq!(m.envelope.size, m.message.len() as u64);
    assert_eq!(m.envelope.client_ip, "192.0.2.7");
    assert_eq!(m.envelope.helo, "client.example");
}

#[test]
fn pipelined_commands_get_replies_in_order_and_one_message() {
    let mut c = Client::new();
    c.send(b"EHLO c\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<x@example.com>\r\nRCPT TO:<nobody@relay.test>\r\nRCPT TO:<y@example.com>\r\nDATA\r\n");
    c.expect(&[
        "220",
        "250-",
        "250-",
        "250-",
        "250-",
        "250-",
        "250-",
        "250-",
        "250 SMTPUTF8",
    ]);
    c.expect(&["250 2.1.0", "250 2.1.5", "550 5.7.1", "250 2.1.5", "354"]);
    c.send(b"Subject: x\r\n\r\nbody\r\n.\r\nMAIL FROM:<>\r\nRCPT TO:<z@example.org>\r\nRCPT TO:<alice@example.org>\r\nDATA\r\nhi\r\n.\r\nQUIT\r\n");
    c.expect(&[
        "250 2.0.0",
        "250 2.1.0",
        "550 5.1.1",
        "250 2.1.5",
        "354",
        "250 2.0.0",
        "221",
    ]);
    c.expect_nothing_more();
    assert_eq!(c.stored.len(), 2);
    let rcpts: Vec<_> = c.stored[0]
        .envelope
        .recipients
        .iter()
        .map(|r| r.address.as_str())
        .collect();
    assert_eq!(rcpts, ["x@example.com", "y@example.com"]);
    assert_eq!(c.stored[1].envelope.sender, "");
    assert!(
        !String::from_utf8_lossy(&c.stored[0].message).contains("\tfor <"),
        "no for-clause with two recipients"
    );
}

#[test]
fn only_partner_domains_are_accepted() {
    let mut c = check(&format!(
        "{EHLO}
        C: MAIL FROM:<a@b.test>
        S: 250
        C: RCPT TO:<u@evilexample.com>
        S: 550 5.7.1 <u@evilexample.com>: Relay access denied
        C: RCPT TO:<u@example.com.evil.net>
        S: 550 5.7.1
        C: RCPT TO:<u@sub.example.com>
        S: 550 5.7.1
        C: RCPT TO:<u@example.com.>
        S: 250 2.1.5
        C: RCPT TO:<postmaster>
        S: 550 5.7.1"
    ));
    check_with(&mut c, "C: RCPT TO:<> \nS: 501 5.1.3");
}

#[test]
fn sender_specified_routing_to_a_partner_is_refused() {
    for rcpt in [
        "<user%x@example.com>",
        "<x!user@example.com>",
        "<\"user@x\"@example.com>",
        "<\"user%x\"@example.com>",
        "<user@x@example.com>",
        "<@example.com:user@x.test>",
    ] {
        let mut c = Client::new();
        c.send(format!("EHLO c\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:{rcpt}\r\n").as_bytes());
        let last = c.pending.last().unwrap().clone();
        assert!(
            last.starts_with("550 5.7.1") || last.starts_with("501 5."),
            "{rcpt}: {last}"
        );
        c.send(b"DATA\r\n");
        c.expect(&["220", "250-"]);
        let last = c.pending.last().unwrap().clone();
        assert!(last.starts_with("554 5.5.1"), "{rcpt}: DATA got {last}");
    }
}

#[test]
fn commands_out_of_order() {
    check(
        "S: 220
        C: MAIL FROM:<a@b.test>
        S: 503 5.5.1 Error: send HELO/EHLO first
        C: HELO c
        S: 250 mx2.example.net
        C: RCPT TO:<u@example.com>
        S: 503 5.5.1 Error: need MAIL
        C: DATA
        S: 503 5.5.1 Error: need RCPT
        C: MAIL FROM:<a@b.test>
        S: 250
        C: MAIL FROM:<a@b.test>
        S: 503 5.5.1 Error: nested MAIL
        C: DATA
        S: 554 5.5.1 Error: no valid recipients
        C: RSET
        S: 250
        C: NOOP
        S: 250
        C: VRFY someone
        S: 252 2.5.2
        C: HELP
        S: 214
        C: EXPN list
        S: 502 5.5.1
        C: STARTTLS
        S: 502 5.5.1
        C: FROBNICATE
        S: 500 5.5.2
        C: LHLO x
        S: 500 5.5.1",
    );
}

#[test]
fn dsn_parameters_are_kept() {
    let c = check(&format!(
        "{EHLO}
        C: MAIL FROM:<a@b.test> RET=HDRS ENVID=QQ+2B314
        S: 250
        C: RCPT TO:<u@example.com> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;Orig+2Bx@example.com
        S: 250
        C: RCPT TO:<v@example.com> NOTIFY=NEVER
        S: 250
        C: DATA
        S: 354
        C: .
        S: 250"
    ));
    let e = &c.stored[0].envelope;
    assert_eq!(e.ret, Some(Ret::Hdrs));
    assert_eq!(e.envid.as_deref(), Some("QQ+314"));
    let n = e.recipients[0].notify.unwrap();
    assert!(n.success && n.failure && !n.delay && !n.never);
    assert_eq!(
        e.recipients[0].orcpt.as_deref(),
        Some("rfc822;Orig+x@example.com")
    );
    assert!(e.recipients[1].notify.unwrap().never);
    assert_eq!(e.recipients[1].orcpt, None);
}

#[test]
fn smtputf8_addresses_need_the_parameter() {
    let c = check(&format!(
        "{EHLO}
        C: MAIL FROM:<jürgen@b.test>
        S: 553 5.6.7
        C: MAIL FROM:<jürgen@b.test> SMTPUTF8
        S: 250
        C: RCPT TO:<søren@example.com>
        S: 250
        C: DATA
        S: 354
        C: .
        S: 250"
    ));
    let e = &c.stored[0].envelope;
    assert!(e.smtputf8);
    assert!(String::from_utf8_lossy(&c.stored[0].message).contains("with UTF8SMTP"));
}

#[test]
fn message_size_is_limited_at_mail_and_in_data() {
    let mut c = Client::with(config(2048));
    c.send(b"EHLO c\r\nMAIL FROM:<a@b.test> SIZE=4096\r\n");
    c.expect(&[
        "220",
        "250-",
        "250-",
        "250-SIZE 2048",
        "250-",
        "250-",
        "250-",
        "250-",
        "250 ",
    ]);
    c.expect(&["552 5.3.4"]);
    c.send(b"MAIL FROM:<a@b.test> SIZE=1000\r\nRCPT TO:<u@example.com>\r\nDATA\r\n");
    c.expect(&["250", "250", "354"]);
    for _ in 0..40 {
        c.send(&[b'z'; 98]);
        c.send(b"\r\n");
    }
    c.send(b".\r\nNOOP\r\n");
    c.expect(&["552 5.3.4", "250"]);
    assert!(c.stored.is_empty());
}

#[test]
fn too_many_recipients() {
    let mut c = Client::new();
    c.send(b"EHLO c\r\nMAIL FROM:<a@b.test>\r\n");
    for i in 0..101 {
        c.send(format!("RCPT TO:<u{i}@example.com>\r\n").as_bytes());
    }
    let last = c.pending.pop().unwrap();
    assert!(last.starts_with("452 4.5.3"), "{last}");
    assert!(c
        .pending
        .iter()
        .rev()
        .take(100)
        .all(|r| r.starts_with("250 2.1.5")));
}

#[test]
fn long_lines_and_long_paths() {
    let mut c = Client::new();
    c.send(b"EHLO c\r\n");
    c.pending.clear();
    // A command line of 600 octets: refused, and the session goes on.
    let mut long = b"NOOP ".to_vec();
    long.extend(std::iter::repeat_n(b'x', 600));
    long.extend_from_slice(b"\r\n");
    c.send_split(&long, 100);
    c.expect(&["500 5.5.2"]);
    // Many kilobytes without a line end are discarded, not buffered.
    c.send(&vec![b'y'; 100_000]);
    c.send(b"\r\nNOOP\r\n");
    c.expect(&["500 5.5.2", "250"]);
    // A path over 256 octets.
    let local = "l".repeat(300);
    c.send(format!("MAIL FROM:<a@b.test>\r\nRCPT TO:<{local}@example.com>\r\n").as_bytes());
    c.expect(&["250", "501 5.1.3"]);
    // A text line over 1000 octets.
    c.send(b"RCPT TO:<u@example.com>\r\nDATA\r\n");
    c.expect(&["250", "354"]);
    let mut data = vec![b'w'; 1200];
    data.extend_from_slice(b"\r\n.\r\n");
    c.send(&data);
    c.expect(&["500 5.5.2"]);
    c.expect_nothing_more();
    assert!(c.stored.is_empty());
}

#[test]
fn too_many_errors_end_the_session() {
    let mut c = Client::new();
    c.send(b"EHLO c\r\n");
    c.pending.clear();
    for _ in 0..19 {
        c.send(b"BOGUS\r\n");
    }
    assert_eq!(c.pending.len(), 19);
    assert!(!c.closed);
    c.send(b"BOGUS\r\n");
    assert!(c.closed);
    assert!(
        c.pending.last().unwrap().starts_with("421 4.7.0"),
        "{:?}",
        c.pending
    );
}

#[test]
fn idle_timeout() {
    let mut c = Client::new();
    let step = c.session.timeout();
    c.drive(step);
    c.expect(&["220", "421 4.4.2 mx2.example.net"]);
    assert!(c.closed);
}

#[test]
fn mail_loops_are_refused() {
    let mut c = Client::new();
    c.send(b"EHLO c\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<u@example.com>\r\nDATA\r\n");
    c.pending.clear();
    let mut data = Vec::new();
    for i in 0..51 {
        data.extend_from_slice(format!("Received: from hop{i} by hop{}\r\n", i + 1).as_bytes());
    }
    data.extend_from_slice(b"Subject: loop\r\n\r\nbody\r\n.\r\n");
    c.send(&data);
    c.expect(&["554 5.4.6"]);
    assert!(c.stored.is_empty());
    // Exactly 50 is still fine.
    c.send(b"MAIL FROM:<a@b.test>\r\nRCPT TO:<u@example.com>\r\nDATA\r\n");
    let fifty: Vec<u8> = data
        .split(|&b| b == b'\n')
        .skip(1)
        .flat_map(|l| [l, b"\n"].concat())
        .collect();
    c.send(&fifty[..fifty.len() - 1]);
    c.expect(&["250", "250", "354", "250 2.0.0"]);
}

#[test]
fn a_full_disk_refuses_at_mail_and_a_failed_store_is_never_250() {
    let mut c = Client::new();
    c.gauge.set(1000);
    c.send(b"EHLO c\r\nMAIL FROM:<a@b.test>\r\n");
    assert!(c.pending.last().unwrap().starts_with("452 4.3.1"));
    c.gauge.set(u64::MAX);
    c.pending.clear();
    for (result, reply) in [
        (Err(StoreFailure::Spool), "451 4.3.0"),
        (Err(StoreFailure::NoSpace), "452 4.3.1"),
        (Ok(()), "250 2.0.0"),
    ] {
        c.store_result = result;
        c.send(b"MAIL FROM:<a@b.test>\r\nRCPT TO:<u@example.com>\r\nDATA\r\n.\r\n");
        c.expect(&["250", "250", "354", reply]);
    }
    assert_eq!(c.stored.len(), 1);
}

#[test]
fn smuggling_never_starts_a_second_message_even_across_reads() {
    let smuggled = b"MAIL FROM:<evil@x.test>\r\nRCPT TO:<victim@example.com>\r\nDATA\r\nevil\r\n";
    for fake in [
        &b"\n.\n"[..],
        b"\r.\r",
        b"\n.\r\n",
        b"\r\n.\n",
        b"\r\n.\r",
        b"\r\n\0.\r\n",
        b"\r\n.\0\r\n",
    ] {
        for split in [1, 3, 4096] {
            let mut c = Client::new();
            c.send(b"EHLO c\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<u@example.com>\r\nDATA\r\n");
            c.pending.clear();
            let mut data = b"Subject: s\r\n\r\nbody".to_vec();
            data.extend_from_slice(fake);
            data.extend_from_slice(smuggled);
            data.extend_from_slice(b".\r\nNOOP\r\n");
            c.send_split(&data, split);
            assert_eq!(
                c.pending.len(),
                2,
                "fake {fake:?} split {split}: {:?}",
                c.pending
            );
            assert!(c.pending[0].starts_with("550 5."), "{:?}", c.pending);
            assert!(c.pending[1].starts_with("250 2.0.0 Ok"), "{:?}", c.pending);
            assert!(c.stored.is_empty(), "fake {fake:?}: a message was stored");
        }
    }
}

#[test]
fn bare_lf_ends_a_command_line_but_never_data() {
    let mut c = Client::new();
    c.send(b"EHLO c\nMAIL FROM:<a@b.test>\nRCPT TO:<u@example.com>\nDATA\n");
    c.expect(&[
        "220", "250-", "250-", "250-", "250-", "250-", "250-", "250-", "250 ", "250", "250", "354",
    ]);
    c.send(b"line\n.\n");
    c.expect_nothing_more();
    c.send(b"\r\n.\r\n");
    c.expect(&["550 5.5.2"]);
}

#[test]
fn helo_sessions_refuse_esmtp_parameters() {
    check(
        "S: 220
        C: HELO c
        S: 250
        C: MAIL FROM:<a@b.test> SIZE=10
        S: 555 5.5.4
        C: MAIL FROM:<a@b.test>
        S: 250
        C: RCPT TO:<u@example.com> NOTIFY=NEVER
        S: 555 5.5.4",
    );
}

#[test]
fn queue_ids_in_replies_match_the_stored_envelope() {
    let mut c = Client::new();
    c.send(b"EHLO c\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<u@example.com>\r\nDATA\r\n.\r\n");
    let last = c.pending.last().unwrap().clone();
    let id = last.rsplit(' ').next().unwrap();
    assert_eq!(id, c.stored[0].envelope.id);
    assert!(crate::queue_id::is_valid(id));
}

#[test]
fn etrn_from_an_allowed_client_for_an_etrn_partner() {
    let mut c = Client::new();
    c.send(b"ETRN example.com\r\n");
    c.expect(&["220", "503 5.5.1"]);
    c.send(b"EHLO c\r\n");
    c.pending.clear();
    // 192.0.2.7 is neither loopback nor an etrn client.
    c.send(b"ETRN example.com\r\n");
    c.expect(&["554 5.7.1"]);
    c.send(b"ETRN #queue\r\nETRN bad..name\r\nETRN example.com garbage\r\n");
    c.expect(&["458 4.5.0", "501 5.5.4", "501 5.5.4"]);
    c.expect_nothing_more();

    let mut cfg = Config::parse(
        "hostname = \"mx2.example.net\"\nspool = \"/x\"\n[[partner]]\ndomain = \"example.com\"\netrn = true\n[[partner]]\ndomain = \"example.org\"\n",
    )
    .unwrap();
    cfg.partner[1].users = None;
    let gauge = Arc::new(SpoolGauge::new(u64::MAX));
    let mut s = Session::new(
        config(1 << 20),
        Arc::new(Policy::new(&cfg)),
        gauge,
        "127.0.0.1".parse().unwrap(),
    );
    let _ = s.take_output();
    let step = s.receive(
        b"EHLO c\r\nETRN @Example.COM\r\nNOOP\r\n",
        SystemTime::now(),
    );
    let Step::Etrn { domain, subdomains } = step else {
        panic!("expected an ETRN step, got {step:?}");
    };
    assert_eq!((domain.as_str(), subdomains), ("example.com", true));
    let out = String::from_utf8(s.take_output()).unwrap();
    assert!(out.contains("250-ETRN"), "{out}");
    let step = s.etrn_done("example.com", 3, false, SystemTime::now());
    assert!(matches!(step, Step::Read));
    let out = String::from_utf8(s.take_output()).unwrap();
    assert_eq!(
        out,
        "253 2.0.0 OK, 3 pending messages for node example.com started\r\n250 2.0.0 Ok\r\n"
    );
    let step = s.receive(
        b"ETRN example.org\r\nETRN example.com\r\n",
        SystemTime::now(),
    );
    assert!(matches!(step, Step::Etrn { .. }));
    let out = String::from_utf8(s.take_output()).unwrap();
    assert!(out.starts_with("459 4.7.1"), "{out}");
    s.etrn_done("example.com", 0, true, SystemTime::now());
    let out = String::from_utf8(s.take_output()).unwrap();
    assert!(out.starts_with("458 4.7.0"), "{out}");
}

const PRIMARY_EHLO: &str = "S: 220 mx.inst.uc.pt ESMTP mxspool
    C: EHLO client.example
    S: 250-mx.inst.uc.pt
    S: 250-PIPELINING
    S: 250-SIZE 1048576
    S: 250-ENHANCEDSTATUSCODES
    S: 250-8BITMIME
    S: 250-DSN
    S: 250-ETRN
    S: 250 SMTPUTF8";

fn primary_config() -> Arc<SessionConfig> {
    Arc::new(SessionConfig {
        hostname: "mx.inst.uc.pt".into(),
        ..(*config(1 << 20)).clone()
    })
}

#[test]
fn the_virtual_table_answers_at_rcpt_and_the_rewritten_address_is_stored() {
    let mut c = Client::connected(primary_config(), primary_policy(), "198.51.100.1");
    check_with(
        &mut c,
        &format!(
            "{PRIMARY_EHLO}
            C: MAIL FROM:<s@outside.test>
            S: 250 2.1.0
            C: RCPT TO:<Info@inst.uc.pt>
            S: 250 2.1.5
            C: RCPT TO:<old@inst.uc.pt>
            S: 550 5.7.0 <old@inst.uc.pt>: Gone fishing
            C: RCPT TO:<x@far.example>
            S: 550 5.7.1 <x@far.example>: Relay access denied
            C: RCPT TO:<postmaster>
            S: 250 2.1.5
            C: DATA
            S: 354
            C: From: joe@ws.inst.uc.pt
            C:
            C: body
            C: .
            S: 250 2.0.0 Ok: queued as"
        ),
    );
    let env = &c.stored[0].envelope;
    assert_eq!(env.recipients[0].address, "alice@inst.uc.pt");
    assert_eq!(
        env.recipients[0].orcpt.as_deref(),
        Some("rfc822;Info@inst.uc.pt")
    );
    assert_eq!(env.recipients[1].address, "postmaster@inst.uc.pt");
    assert_eq!(env.recipients[1].orcpt, None);
    // Not from a relay network: nothing is masqueraded.
    assert_eq!(env.sender, "s@outside.test");
    let text = String::from_utf8_lossy(&c.stored[0].message).into_owned();
    assert!(
        text.ends_with("\r\nFrom: joe@ws.inst.uc.pt\r\n\r\nbody\r\n"),
        "{text}"
    );
}

#[test]
fn relay_networks_relay_anywhere_and_their_mail_is_masqueraded_under_our_received() {
    let mut c = Client::connected(primary_config(), primary_policy(), "192.168.0.20");
    check_with(
        &mut c,
        &format!(
            "{PRIMARY_EHLO}
            C: MAIL FROM:<joe@ws.inst.uc.pt>
            S: 250 2.1.0
            C: RCPT TO:<x@far.example>
            S: 250 2.1.5
            C: DATA
            S: 354
            C: From: Joe <joe@ws.inst.uc.pt>
            C: To: x@far.example
            C: Message-ID: <1@ws.inst.uc.pt>
            C:
            C: body from joe@ws.inst.uc.pt
            C: .
            S: 250 2.0.0 Ok: queued as"
        ),
    );
    let stored = &c.stored[0];
    assert_eq!(stored.envelope.sender, "joe@inst.uc.pt");
    let text = String::from_utf8_lossy(&stored.message).into_owned();
    assert!(
        text.starts_with("Received: from client.example ([192.168.0.20])"),
        "{text}"
    );
    assert!(
        text.ends_with(
            "\r\nFrom: Joe <joe@inst.uc.pt>\r\nTo: x@far.example\r\nMessage-ID: <1@ws.inst.uc.pt>\r\n\r\nbody from joe@ws.inst.uc.pt\r\n"
        ),
        "{text}"
    );
}

#[test]
fn received_names_the_recipient_the_client_gave() {
    let mut c = Client::connected(primary_config(), primary_policy(), "198.51.100.1");
    check_with(
        &mut c,
        &format!(
            "{PRIMARY_EHLO}
            C: MAIL FROM:<s@outside.test>
            S: 250 2.1.0
            C: RCPT TO:<info@inst.uc.pt>
            S: 250 2.1.5
            C: DATA
            S: 354
            C: Subject: x
            C:
            C: body
            C: .
            S: 250 2.0.0 Ok: queued as"
        ),
    );
    let stored = &c.stored[0];
    assert_eq!(stored.envelope.recipients[0].address, "alice@inst.uc.pt");
    let text = String::from_utf8_lossy(&stored.message).into_owned();
    assert!(text.contains("\r\n\tfor <info@inst.uc.pt>;\r\n"), "{text}");
}

#[test]
fn address_literals_in_mail_and_rcpt() {
    let c = check(&format!(
        "{EHLO}
        C: MAIL FROM:<antispam@[127.0.0.1]>
        S: 250 2.1.0
        C: RCPT TO:<bob@example.com>
        S: 250 2.1.5
        C: DATA
        S: 354
        C: hi
        C: .
        S: 250 2.0.0
        C: MAIL FROM:<v6@[IPv6:2001:db8::1]> SIZE=10
        S: 250 2.1.0
        C: RSET
        S: 250
        C: MAIL FROM:<u@[300.0.0.1]>
        S: 501 5.1.7
        C: MAIL FROM:<u@[tag:x]>
        S: 501 5.1.7
        C: MAIL FROM:<x@example.net>
        S: 250 2.1.0
        C: RCPT TO:<u@[192.0.2.1]>
        S: 550 5.7.1
        C: RCPT TO:<u@[999.0.2.1]>
        S: 501 5.1.3"
    ));
    assert_eq!(c.stored.len(), 1);
    assert_eq!(c.stored[0].envelope.sender, "antispam@[127.0.0.1]");
}

#[test]
fn source_routes_are_stripped_and_the_mailbox_judged() {
    let mut c = check(&format!(
        "{EHLO}
        C: MAIL FROM:<@relay.example:a@b.test>
        S: 250 2.1.0
        C: RCPT TO:<@[127.0.0.1]:bob@example.com> NOTIFY=FAILURE
        S: 250 2.1.5
        C: RCPT TO:<@a.example,@b.example:carol@example.com>
        S: 250 2.1.5
        C: RCPT TO:<@example.com:victim@elsewhere.test>
        S: 550 5.7.1
        C: RCPT TO:<@example.com,:x@example.com>
        S: 501 5.1.3
        C: DATA
        S: 354
        C: hi
        C: .
        S: 250 2.0.0"
    ));
    let env = &c.stored[0].envelope;
    assert_eq!(env.sender, "a@b.test");
    let rcpts: Vec<&str> = env.recipients.iter().map(|r| r.address.as_str()).collect();
    assert_eq!(rcpts, ["bob@example.com", "carol@example.com"]);
    assert!(env.recipients[0].notify.as_ref().is_some_and(|n| n.failure));
    c.pending.clear();
}

#[test]
fn recipient_overshoot_is_not_an_error_until_its_limit() {
    // 100 recipients allowed, 1,000 more answered 452 without counting as errors: a client
    // that pipelines 1,025 RCPTs keeps its session and sends the first 100.
    let mut c = Client::new();
    c.send(b"EHLO c\r\nMAIL FROM:<a@b.test>\r\n");
    c.pending.clear();
    let mut burst = Vec::new();
    for i in 0..1025 {
        burst.extend_from_slice(format!("RCPT TO:<u{i}@example.com>\r\n").as_bytes());
    }
    burst.extend_from_slice(b"DATA\r\nhi\r\n.\r\n");
    c.send(&burst);
    assert_eq!(
        c.pending
            .iter()
            .filter(|r| r.starts_with("250 2.1.5"))
            .count(),
        100
    );
    assert_eq!(
        c.pending
            .iter()
            .filter(|r| r.starts_with("452 4.5.3"))
            .count(),
        925
    );
    assert!(
        !c.pending.iter().any(|r| r.starts_with("421")),
        "{:?}",
        c.pending.last()
    );
    assert!(c.pending.iter().any(|r| r.starts_with("354")));
    assert!(c.pending.last().unwrap().starts_with("250 2.0.0"));
    assert_eq!(c.stored[0].envelope.recipients.len(), 100);

    // Past the overshoot limit every extra RCPT is an error: the session ends.
    let config = Arc::new(SessionConfig {
        recipient_overshoot: 5,
        ..(*config(1 << 20)).clone()
    });
    let mut c = Client::with(config);
    c.send(b"EHLO c\r\nMAIL FROM:<a@b.test>\r\n");
    let mut burst = Vec::new();
    for i in 0..130 {
        burst.extend_from_slice(format!("RCPT TO:<u{i}@example.com>\r\n").as_bytes());
    }
    c.send(&burst);
    assert!(c.closed, "{:?}", c.pending.last());
    assert!(c.pending.last().unwrap().starts_with("421 4.7.0"));
}

#[test]
fn refusals_and_acceptances_are_counted_with_their_reason() {
    let mut c = check(&format!(
        "{EHLO}
        C: MAIL FROM:<a@b.test> SIZE=99999999
        S: 552 5.3.4
        C: MAIL FROM:<a@b.test>
        S: 250
        C: RCPT TO:<u@evilexample.com>
        S: 550 5.7.1
        C: RCPT TO:<user%x@example.com>
        S: 550 5.7.1
        C: RCPT TO:<u@example.com>
        S: 250
        C: DATA
        S: 354
        C: Subject: x
        C:
        C: hi
        C: .
        S: 250 2.0.0 Ok: queued as"
    ));
    assert_eq!(
        c.session.take_events(),
        vec![
            Event::RefusedMessage("size"),
            Event::RefusedRecipient("relay"),
            Event::RefusedRecipient("routing"),
            Event::Accepted,
        ]
    );
    c.store_result = Err(StoreFailure::NoSpace);
    check_with(
        &mut c,
        "C: MAIL FROM:<a@b.test>
        C: DATA
        S: 250
        S: 554 5.5.1
        C: RCPT TO:<u@example.com>
        S: 250
        C: DATA
        S: 354
        C: .
        S: 452 4.3.1",
    );
    assert_eq!(
        c.session.take_events(),
        vec![
            Event::RefusedMessage("no_recipients"),
            Event::RefusedMessage("no_space"),
        ]
    );
    assert!(c.session.take_events().is_empty());
}

/// A message of about `mib` MiB: a small header section, then 78-octet lines, some with a
/// leading dot (stuffed on the wire).
fn big_message(mib: usize) -> (Vec<u8>, Vec<u8>) {
    let mut plain = b"Subject: big\r\nFrom: a@outside.test\r\n\r\n".to_vec();
    let mut n = 0u64;
    while plain.len() < mib << 20 {
        n += 1;
        if n.is_multiple_of(7) {
            plain.extend_from_slice(format!(".dot line {n:070}\r\n").as_bytes());
        } else {
            plain.extend_from_slice(format!("line {n:072}\r\n").as_bytes());
        }
    }
    let mut wire = Vec::with_capacity(plain.len() + plain.len() / 50);
    for line in plain.split_inclusive(|&b| b == b'\n') {
        if line.starts_with(b".") {
            wire.push(b'.');
        }
        wire.extend_from_slice(line);
    }
    wire.extend_from_slice(b".\r\n");
    (plain, wire)
}

fn begin_data(c: &mut Client) {
    c.send(
        b"EHLO client.example\r\nMAIL FROM:<s@outside.test>\r\nRCPT TO:<u@example.com>\r\nDATA\r\n",
    );
    c.pending.clear();
}

#[test]
fn a_large_message_goes_to_the_spool_in_parts_as_it_arrives() {
    let (plain, wire) = big_message(3);
    let mut c = Client::with(config(8 << 20));
    begin_data(&mut c);
    c.send_split(&wire, 16 * 1024);
    c.expect(&["250 2.0.0 Ok: queued as"]);
    assert_eq!(c.stored.len(), 1);
    let m = &c.stored[0];
    // Parts of bounded size went out while DATA went on; the bytes are exact.
    assert!(m.written >= 10, "{} parts written ahead", m.written);
    assert!(
        c.largest_part <= PART_SIZE + 16 * 1024,
        "largest part {}",
        c.largest_part
    );
    let body_at = m.message.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
    let received_end = m
        .message
        .windows(9)
        .position(|w| w == b"Subject: ")
        .unwrap();
    assert_eq!(&m.message[received_end..], &plain[..]);
    assert!(body_at > received_end);
    assert_eq!(m.envelope.size, m.message.len() as u64);
}

#[test]
fn a_small_message_is_stored_whole_in_one_commit() {
    let mut c = Client::new();
    begin_data(&mut c);
    c.send(b"Subject: s\r\n\r\nhello\r\n.\r\n");
    c.expect(&["250 2.0.0"]);
    assert_eq!(c.stored[0].written, 0);
    assert_eq!(c.largest_part, 0);
}

#[test]
fn a_large_message_refused_at_its_end_has_its_parts_removed() {
    let (_, mut wire) = big_message(2);
    // A bare LF near the end: the message is refused once it has all arrived.
    let at = wire.len() - 100;
    wire.insert(at, b'\n');
    let mut c = Client::with(config(8 << 20));
    begin_data(&mut c);
    c.send_split(&wire, 16 * 1024);
    c.expect(&["550 5.5.2"]);
    assert!(c.stored.is_empty());
    assert_eq!(c.discarded.len(), 1);
    assert!(c.discarded[0].1 >= 5);
    assert!(c.parts.is_empty());
    // The session goes on.
    c.send(b"RSET\r\n");
    c.expect(&["250"]);
}

#[test]
fn a_message_over_the_size_limit_stops_being_written() {
    let (_, wire) = big_message(3);
    let mut c = Client::with(config(1 << 20));
    begin_data(&mut c);
    c.send_split(&wire, 16 * 1024);
    c.expect(&["552 5.3.4"]);
    assert!(c.stored.is_empty());
    let (_, written) = c.discarded[0];
    assert!(
        (written as usize) * PART_SIZE <= (1 << 20) + PART_SIZE,
        "{written} parts for a 1 MiB limit"
    );
}

#[test]
fn a_part_that_cannot_be_stored_fails_the_message_with_452_at_its_end() {
    let (_, wire) = big_message(2);
    let mut c = Client::with(config(8 << 20));
    begin_data(&mut c);
    let (one, two) = wire.split_at(600 * 1024);
    c.send_split(one, 16 * 1024);
    c.part_result = Err(StoreFailure::NoSpace);
    c.send_split(two, 16 * 1024);
    c.expect(&["452 4.3.1"]);
    assert!(c.stored.is_empty());
    assert_eq!(c.discarded.len(), 1, "the parts that were stored go");
}

/// A quota gate that says `full.test` is full, and `big.test` has room for 300 KiB.
struct TestQuotas;

impl crate::smtp::session::QuotaGate for TestQuotas {
    fn room(&self, domain: &str, bytes: u64) -> Result<(), String> {
        match domain {
            "full.test" => Err("the queue of full.test is full".into()),
            "big.test" if bytes > 300 << 10 => Err("the queue of big.test is full".into()),
            _ => Ok(()),
        }
    }
}

fn quota_policy() -> Arc<Policy> {
    let c = Config::parse(
        "hostname = \"mx2.example.net\"\nspool = \"/x\"\n\
         [[partner]]\ndomain = \"example.com\"\n[[partner]]\ndomain = \"full.test\"\n\
         [[partner]]\ndomain = \"big.test\"\n",
    )
    .unwrap();
    Arc::new(Policy::new(&c))
}

#[test]
fn a_full_partner_gets_452_at_rcpt_and_the_others_go_on() {
    let mut c = Client::connected(config(8 << 20), quota_policy(), "192.0.2.7");
    c.session.set_quota_gate(Arc::new(TestQuotas));
    c.send(b"EHLO c\r\n");
    c.pending.clear();
    c.send(b"MAIL FROM:<a@b.test>\r\n");
    c.expect(&["250 2.1.0"]);
    // Many of them: a 452 for a quota is not the client's error (max_errors is 20).
    for i in 0..30 {
        c.send(format!("RCPT TO:<u{i}@full.test>\r\n").as_bytes());
        c.expect(&[&format!(
            "452 4.3.1 <u{i}@full.test>: Insufficient system storage: the queue of full.test is full"
        )]);
    }
    assert!(!c.closed);
    c.send(b"RCPT TO:<v@example.com>\r\nDATA\r\nSubject: x\r\n\r\nhi\r\n.\r\n");
    c.expect(&["250 2.1.5", "354", "250 2.0.0"]);
    assert_eq!(c.stored.len(), 1);
    assert_eq!(c.stored[0].envelope.recipients.len(), 1);
    assert!(c
        .session
        .take_events()
        .contains(&crate::smtp::session::Event::RefusedRecipient("quota")));
}

#[test]
fn the_backup_of_one_partner_refuses_at_mail_when_its_queue_is_full() {
    let c = Config::parse(
        "hostname = \"mx2.example.net\"\nspool = \"/x\"\n[[partner]]\ndomain = \"full.test\"\n",
    )
    .unwrap();
    let mut c = Client::connected(config(8 << 20), Arc::new(Policy::new(&c)), "192.0.2.7");
    c.session.set_quota_gate(Arc::new(TestQuotas));
    c.send(b"EHLO c\r\n");
    c.pending.clear();
    c.send(b"MAIL FROM:<a@b.test>\r\nMAIL FROM:<a@b.test>\r\n");
    c.expect(&[
        "452 4.3.1 Insufficient system storage: the queue of full.test is full",
        "452 4.3.1",
    ]);
    // With more than one domain, MAIL cannot know: the quota answers RCPT.
    let mut c = Client::connected(config(8 << 20), quota_policy(), "192.0.2.7");
    c.session.set_quota_gate(Arc::new(TestQuotas));
    c.send(b"EHLO c\r\n");
    c.pending.clear();
    c.send(b"MAIL FROM:<a@b.test>\r\nRCPT TO:<u@full.test>\r\n");
    c.expect(&["250 2.1.0", "452 4.3.1 <u@full.test>"]);
}

#[test]
fn a_message_that_outgrows_a_quota_during_data_is_dropped_and_gets_452() {
    let (_, wire) = big_message(2);
    let mut c = Client::connected(config(8 << 20), quota_policy(), "192.0.2.7");
    c.session.set_quota_gate(Arc::new(TestQuotas));
    c.send(b"EHLO c\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<u@big.test>\r\nDATA\r\n");
    c.pending.clear();
    c.send_split(&wire, 16 * 1024);
    c.expect(&["452 4.3.1 Insufficient system storage: the queue of big.test is full"]);
    assert!(c.stored.is_empty());
    // One part fitted (256 KiB), the second would not: nothing more was written, and what
    // was is removed.
    assert_eq!(c.discarded, vec![(c.discarded[0].0.clone(), 1)]);
    assert!(c.parts.is_empty());
    // The session goes on: the same message to a partner with room is taken.
    c.send(b"MAIL FROM:<a@b.test>\r\nRCPT TO:<u@example.com>\r\nDATA\r\n");
    c.send_split(&wire, 16 * 1024);
    c.expect(&["250 2.1.0", "250 2.1.5", "354", "250 2.0.0"]);
    assert_eq!(c.stored.len(), 1);
}

fn tls_config() -> Arc<SessionConfig> {
    Arc::new(SessionConfig {
        starttls: true,
        ..(*config(1 << 20)).clone()
    })
}

fn tls13() -> crate::tls::TlsInfo {
    crate::tls::TlsInfo {
        version: "TLSv1.3".into(),
        cipher: "TLS13_AES_256_GCM_SHA384".into(),
        bits: 256,
    }
}

#[test]
fn starttls_is_offered_only_with_a_certificate() {
    let mut c = check(&format!("{EHLO}\nC: STARTTLS\nS: 502 5.5.1"));
    assert!(!c.starttls);
    c = Client::with(tls_config());
    check_with(
        &mut c,
        "S: 220 mx2.example.net ESMTP mxspool
         C: STARTTLS
         S: 503 5.5.1 Error: send HELO/EHLO first
         C: EHLO client.example
         S: 250-mx2.example.net
         S: 250-PIPELINING
         S: 250-SIZE 1048576
         S: 250-STARTTLS
         S: 250-ENHANCEDSTATUSCODES
         S: 250-8BITMIME
         S: 250-DSN
         S: 250-ETRN
         S: 250 SMTPUTF8
         C: STARTTLS now
         S: 501 5.5.4 Syntax: STARTTLS
         C: MAIL FROM:<a@b.test>
         S: 250
         C: STARTTLS
         S: 503 5.5.1 Error: MAIL transaction in progress
         C: RSET
         S: 250
         C: STARTTLS
         S: 220 2.0.0 Ready to start TLS",
    );
    assert!(c.starttls);
}

#[test]
fn commands_pipelined_behind_starttls_are_dropped_and_the_session_starts_over() {
    let mut c = Client::with(tls_config());
    // CVE-2011-0411: MAIL and RCPT came in clear in the same packet; never executed.
    c.send(b"EHLO client.example\r\nSTARTTLS\r\nMAIL FROM:<evil@b.test>\r\nRCPT TO:<u@example.com>\r\n");
    assert!(c.starttls);
    c.pending.retain(|l| !l.starts_with("250"));
    c.expect(&["220 mx2.example.net ESMTP", "220 2.0.0 Ready to start TLS"]);
    c.expect_nothing_more();
    let step = c.session.tls_started(tls13());
    assert!(matches!(step, Step::Read));
    assert_eq!(c.session.tls(), Some(&tls13()));
    check_with(
        &mut c,
        "C: RCPT TO:<u@example.com>
         S: 503 5.5.1 Error: need MAIL command
         C: MAIL FROM:<a@b.test>
         S: 503 5.5.1 Error: send HELO/EHLO first
         C: EHLO client.example
         S: 250-mx2.example.net
         S: 250-PIPELINING
         S: 250-SIZE 1048576
         S: 250-ENHANCEDSTATUSCODES
         S: 250-8BITMIME
         S: 250-DSN
         S: 250-ETRN
         S: 250 SMTPUTF8
         C: STARTTLS
         S: 503 5.5.1 Error: TLS already active
         C: MAIL FROM:<a@b.test>
         S: 250
         C: RCPT TO:<u@example.com>
         S: 250
         C: DATA
         S: 354
         C: Subject: x
         C:
         C: hi
         C: .
         S: 250 2.0.0 Ok: queued as",
    );
    let stored = &c.stored[0];
    assert_eq!(stored.envelope.sender, "a@b.test");
    let text = String::from_utf8_lossy(&stored.message);
    assert!(
        text.starts_with("Received: from client.example ([192.0.2.7])\r\n\t(using TLSv1.3 with cipher TLS13_AES_256_GCM_SHA384 (256/256 bits))\r\n\tby mx2.example.net (mxspool) with ESMTPS id "),
        "{text}"
    );
}

#[test]
fn a_partial_line_behind_starttls_is_dropped_too() {
    let mut c = Client::with(tls_config());
    c.send(b"EHLO client.example\r\nSTARTTLS\r\nMAIL FR");
    assert!(c.starttls);
    c.session.tls_started(tls13());
    c.pending.clear();
    // "OM:<a@b.test>" must not complete the line sent in clear.
    c.send(b"OM:<a@b.test>\r\n");
    c.expect(&["500 5.5.2"]);
}
