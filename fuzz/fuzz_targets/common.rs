//! Shared by the SMTP targets: the session's configuration and policies (as in
//! src/smtp/tests.rs), a small deterministic generator driven by the input, and the reply
//! format check.

#![allow(dead_code)]

use std::net::IpAddr;
use std::sync::Arc;

use mxspool::config::Config;
use mxspool::policy::Policy;
use mxspool::smtp::session::{Session, SessionConfig, SpoolGauge};

pub const HOST: &str = "mx2.example.net";

/// Split points and choices come from this, seeded by the input's first bytes.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: &[u8]) -> Rng {
        let mut s = 0x9e37_79b9_7f4a_7c15u64;
        for &b in seed {
            s = (s ^ u64::from(b)).wrapping_mul(0x100_0000_01b3);
        }
        Rng(s | 1)
    }

    pub fn next(&mut self) -> u64 {
        // xorshift64*
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

fn partner_policy() -> Arc<Policy> {
    let mut c = Config::parse(
        "hostname = \"mx2.example.net\"\nspool = \"/x\"\n\
         [[partner]]\ndomain = \"example.com\"\netrn = true\n\
         [[partner]]\ndomain = \"example.org\"\n",
    )
    .expect("fuzz policy config");
    c.partner[1].users = Some(["alice".to_string()].into_iter().collect());
    Arc::new(Policy::new(&c))
}

/// Primary-server mode: a local domain, a virtual table, relay networks, masquerading.
fn primary_policy() -> Arc<Policy> {
    let mut c = Config::parse(
        "hostname = \"mx2.example.net\"\nspool = \"/x\"\n\
         [[local]]\ndomain = \"inst.uc.pt\"\nmaildir = \"/m/{user}\"\n\
         [[partner]]\ndomain = \"example.com\"\netrn = true\n\
         [relay]\nnetworks = [\"192.168.0.0/24\"]\n\
         [masquerade]\nas = \"inst.uc.pt\"\ndomains = [\"inst.uc.pt\"]\nenvelope = true\n",
    )
    .expect("fuzz policy config");
    c.virtual_table = Some(mxspool::config::VirtualConfig {
        file: "/x".into(),
        table: mxspool::virtual_table::VirtualTable::parse(
            "info@inst.uc.pt alice\nold@inst.uc.pt error:5.7.0:550 Gone fishing\n\
             @example.com catchall@inst.uc.pt\n",
        )
        .expect("fuzz virtual table")
        .into(),
    });
    Arc::new(Policy::new(&c))
}

/// What the driver tells the session after a STARTTLS handshake.
pub fn tls13() -> mxspool::tls::TlsInfo {
    mxspool::tls::TlsInfo {
        version: "TLSv1.3".into(),
        cipher: "TLS13_AES_256_GCM_SHA384".into(),
        bits: 256,
    }
}

/// A session chosen by `choice` (bit 0x80: a certificate, so STARTTLS is offered; bit 0x40:
/// partner quotas): partner or primary policy, client inside or outside the
/// relay networks (or loopback, allowed ETRN), a small or a normal size limit.
pub fn session(choice: u8) -> Session {
    let config = Arc::new(SessionConfig {
        hostname: HOST.into(),
        max_message_size: if choice & 4 != 0 { 200 } else { 1 << 20 },
        max_recipients: if choice & 8 != 0 { 3 } else { 100 },
        max_errors: 20,
        recipient_overshoot: if choice & 8 != 0 { 2 } else { 1000 },
        min_free_space: 1 << 20,
        starttls: choice & 0x80 != 0,
    });
    let policy = if choice & 1 != 0 {
        primary_policy()
    } else {
        partner_policy()
    };
    let ip: IpAddr = match (choice >> 4) % 3 {
        0 => "192.0.2.7",
        1 => "192.168.0.7",
        _ => "127.0.0.1",
    }
    .parse()
    .unwrap();
    // A nearly full disk now and then, so MAIL and the final dot meet 452.
    let free = if choice & 2 != 0 {
        (1 << 20) + 300
    } else {
        u64::MAX
    };
    let mut s = Session::new(config, policy, Arc::new(SpoolGauge::new(free)), ip);
    if choice & 0x40 != 0 {
        s.set_quota_gate(Arc::new(Quotas));
    }
    s
}

/// Partner quotas that some domains are always over, and every domain past 400 kB (so RCPT,
/// the parts of DATA and the final dot meet `452 4.3.1` for a quota).
struct Quotas;

impl mxspool::smtp::session::QuotaGate for Quotas {
    fn room(&self, domain: &str, bytes: u64) -> Result<(), String> {
        if domain.len() % 3 == 0 || bytes > 400_000 {
            Err(format!("the queue of {domain} is full"))
        } else {
            Ok(())
        }
    }
}

/// Checks one batch of output and returns its reply lines (without CRLF). Every line is
/// CRLF-terminated UTF-8 and starts with a 3-digit code followed by ` `, `-` or nothing.
pub fn reply_lines(out: &[u8]) -> Vec<String> {
    let text = std::str::from_utf8(out).expect("replies are UTF-8");
    assert!(
        text.is_empty() || text.ends_with("\r\n"),
        "reply not CRLF-terminated: {text:?}"
    );
    text.split_terminator("\r\n")
        .map(|line| {
            let b = line.as_bytes();
            assert!(
                b.len() >= 3 && b[..3].iter().all(u8::is_ascii_digit),
                "reply line without a 3-digit code: {line:?}"
            );
            assert!(
                b.len() == 3 || b[3] == b' ' || b[3] == b'-',
                "reply code not followed by space or dash: {line:?}"
            );
            assert!(
                !line.contains('\r') && !line.contains('\n'),
                "bare CR or LF in a reply line: {line:?}"
            );
            assert!(
                b[0] != b'0' && b[0] <= b'5',
                "reply code out of range: {line:?}"
            );
            line.to_string()
        })
        .collect()
}
