//! The defences the driver applies around a session, before its greeting and at MAIL:
//! client rate limits ([`crate::policy::rates`]) and DNS blocklists
//! ([`crate::policy::dnsbl`]: `554 5.7.1` instead of the greeting, then only QUIT is
//! accepted). Clients in `[relay] networks` are exempt from both. At RCPT, the session's
//! [`super::session::Step::Verify`] comes here for the recipient callout
//! ([`crate::policy::callout`]).
//!
//! [`Screen`] lives in the server's shared state, so the counts and the cache outlive a
//! reload; each check takes its limits and lists from the session's configuration snapshot.
//! The session itself stays sans-IO: a refused connection never gets one (the driver writes
//! the refusal), and the message rate reaches it as a [`MessageGate`].

use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tracing::warn;

use super::session::MessageGate;
use crate::config::Config;
use crate::delivery::mx::Resolver;
use crate::ops::live::Snapshot;
use crate::policy::callout::{Callout, Verdict};
use crate::policy::dnsbl::{self, Dnsbl};
use crate::policy::rates::{Rate, Rates};
use crate::spool::Spool;

/// A connection refused before the session: the reply to send instead of the greeting.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refused {
    /// The metrics label: `rate` or `dnsbl`.
    pub reason: &'static str,
    pub reply: String,
    /// After a `554` greeting the server waits for QUIT (RFC 5321 3.1); after a `421` it
    /// closes at once.
    pub wait_for_quit: bool,
}

/// The server's defence state.
#[derive(Default)]
pub struct Screen {
    rates: Rates,
    dnsbl: Dnsbl,
    callout: Callout,
    /// The resolver, built as delivery's, and the `[delivery] nameservers` it was built for
    /// (rebuilt when a reload changes them).
    resolver: Mutex<Option<(Vec<String>, Resolver)>>,
}

impl Screen {
    /// The refusal for a new connection from `client`, if any (counting the connection).
    pub async fn at_connect(&self, snapshot: &Snapshot, client: IpAddr) -> Option<Refused> {
        if snapshot.policy.is_trusted(client) {
            return None;
        }
        let smtp = &snapshot.config.smtp;
        if let Some(rate) = smtp.max_connection_rate {
            if !self.rates.connections.admit(client, rate, Instant::now()) {
                let reply = format!(
                    "421 4.7.0 {} Error: too many connections from {client}",
                    snapshot.session.hostname
                );
                warn!("NOQUEUE: reject: CONNECT from [{client}]: {reply} (max_connection_rate {rate})");
                return Some(Refused {
                    reason: "rate",
                    reply,
                    wait_for_quit: false,
                });
            }
        }
        if !smtp.dnsbl.is_empty() {
            let resolver = self.resolver(&snapshot.config)?;
            if let Some(listing) = self.dnsbl.check(&snapshot.config, &resolver, client).await {
                let reply = dnsbl::reply(client, &listing);
                warn!(
                    "NOQUEUE: reject: CONNECT from [{client}]: {reply} (answer {})",
                    listing.code
                );
                return Some(Refused {
                    reason: "dnsbl",
                    reply,
                    wait_for_quit: true,
                });
            }
        }
        None
    }

    /// The callout's verdict on a recipient (`[[partner]] verify = "callout"`), its
    /// answers cached in `spool` too: `Err` is the refusal to give at RCPT.
    pub async fn verify(
        &self,
        snapshot: &Snapshot,
        spool: &Spool,
        address: &str,
    ) -> Result<(), String> {
        let Some(resolver) = self.resolver(&snapshot.config) else {
            return Ok(());
        };
        match self
            .callout
            .verify(&snapshot.config, &resolver, Some(spool), address)
            .await
        {
            Verdict::Accept => Ok(()),
            Verdict::Refuse(reply) => Err(reply),
        }
    }

    /// The resolver for `config`'s nameservers; `None` (and logged) when it cannot be set up.
    fn resolver(&self, config: &Config) -> Option<Resolver> {
        let mut slot = self.resolver.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((servers, r)) = slot.as_ref() {
            if *servers == config.delivery.nameservers {
                return Some(r.clone());
            }
        }
        match Resolver::new(config) {
            Ok(r) => {
                *slot = Some((config.delivery.nameservers.clone(), r.clone()));
                Some(r)
            }
            Err(e) => {
                warn!("{e}: DNS blocklists and callouts skipped");
                None
            }
        }
    }

    /// What the session of `client` asks at each MAIL, if its messages are limited.
    pub fn message_gate(
        self: &Arc<Self>,
        snapshot: &Snapshot,
        client: IpAddr,
    ) -> Option<Arc<dyn MessageGate>> {
        let rate = snapshot.config.smtp.max_message_rate?;
        if snapshot.policy.is_trusted(client) {
            return None;
        }
        Some(Arc::new(MessageRate {
            screen: self.clone(),
            rate,
        }))
    }
}

/// `max_message_rate` for one session.
struct MessageRate {
    screen: Arc<Screen>,
    rate: Rate,
}

impl MessageGate for MessageRate {
    fn allow_message(&self, client: IpAddr) -> bool {
        let ok = self
            .screen
            .rates
            .messages
            .admit(client, self.rate, Instant::now());
        if !ok {
            warn!(
                "client [{client}] over max_message_rate {}: MAIL refused",
                self.rate
            );
        }
        ok
    }
}

/// How long a refused client may take to say QUIT, and how many commands it may send.
const QUIT_WAIT: Duration = Duration::from_secs(10);
const QUIT_COMMANDS: usize = 10;

/// Sends the refusal and closes the connection; after a `554` greeting, answers
/// `503 5.5.1` to every command until QUIT (`221`), within bounds.
pub async fn refuse(mut stream: TcpStream, refused: &Refused) {
    let mut line = refused.reply.clone();
    line.push_str("\r\n");
    let sent =
        tokio::time::timeout(Duration::from_secs(5), stream.write_all(line.as_bytes())).await;
    if !matches!(sent, Ok(Ok(()))) {
        return;
    }
    if refused.wait_for_quit {
        let _ = tokio::time::timeout(QUIT_WAIT, async {
            let (r, mut w) = stream.split();
            let mut lines = BufReader::new(r.take(QUIT_COMMANDS as u64 * 512)).lines();
            for _ in 0..QUIT_COMMANDS {
                let Ok(Some(cmd)) = lines.next_line().await else {
                    break;
                };
                let quit = cmd.trim().eq_ignore_ascii_case("quit");
                let answer: &[u8] = if quit {
                    b"221 2.0.0 Bye\r\n"
                } else {
                    b"503 5.5.1 Error: command not accepted, send QUIT\r\n"
                };
                if w.write_all(answer).await.is_err() || quit {
                    break;
                }
            }
        })
        .await;
    }
    let _ = tokio::time::timeout(Duration::from_secs(5), stream.shutdown()).await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::smtp::session::{Session, SpoolGauge, Step};
    use std::time::SystemTime;

    fn snapshot(extra: &str) -> Snapshot {
        Snapshot::new(
            Config::parse(&format!(
                "hostname = \"mx2.test\"\nspool = \"/x\"\n[smtp]\n{extra}\n[relay]\nnetworks = [\"192.0.2.0/24\"]\n[[partner]]\ndomain = \"example.com\"\n"
            ))
            .unwrap(),
        )
    }

    fn output(s: &mut Session) -> String {
        String::from_utf8(s.take_output()).unwrap()
    }

    #[tokio::test]
    async fn connection_rate_spares_the_relay_networks() {
        let snap = snapshot("max_connection_rate = \"2/1h\"");
        let screen = Screen::default();
        let out: IpAddr = "198.51.100.7".parse().unwrap();
        let relay: IpAddr = "192.0.2.9".parse().unwrap();
        assert_eq!(screen.at_connect(&snap, out).await, None);
        assert_eq!(screen.at_connect(&snap, out).await, None);
        let r = screen.at_connect(&snap, out).await.unwrap();
        assert_eq!(
            r.reply,
            "421 4.7.0 mx2.test Error: too many connections from 198.51.100.7"
        );
        assert_eq!(r.reason, "rate");
        for _ in 0..10 {
            assert_eq!(screen.at_connect(&snap, relay).await, None);
        }
        // No limit configured: nothing counted.
        let open = snapshot("");
        assert_eq!(screen.at_connect(&open, out).await, None);
    }

    #[test]
    fn message_rate_at_mail() {
        let snap = snapshot("max_message_rate = \"2/1h\"");
        let screen = Arc::new(Screen::default());
        let client: IpAddr = "198.51.100.7".parse().unwrap();
        assert!(screen
            .message_gate(&snap, "192.0.2.9".parse().unwrap())
            .is_none());
        assert!(screen.message_gate(&snapshot(""), client).is_none());
        let mut s = Session::new(
            snap.session.clone(),
            snap.policy.clone(),
            Arc::new(SpoolGauge::new(u64::MAX)),
            client,
        );
        s.set_message_gate(screen.message_gate(&snap, client).unwrap());
        let now = SystemTime::now();
        assert!(output(&mut s).starts_with("220 "));
        let say = |s: &mut Session, line: &str| {
            let step = s.receive(format!("{line}\r\n").as_bytes(), now);
            assert!(matches!(step, Step::Read));
            output(s)
        };
        say(&mut s, "EHLO c.test");
        assert_eq!(say(&mut s, "MAIL FROM:<a@b.test>"), "250 2.1.0 Ok\r\n");
        say(&mut s, "RSET");
        assert_eq!(say(&mut s, "MAIL FROM:<a@b.test>"), "250 2.1.0 Ok\r\n");
        say(&mut s, "RSET");
        assert_eq!(
            say(&mut s, "MAIL FROM:<a@b.test>"),
            "450 4.7.1 Error: too much mail from 198.51.100.7\r\n"
        );
        assert!(s
            .take_events()
            .contains(&crate::smtp::session::Event::RefusedMessage("rate")));
        // The count is per client, not per session.
        let mut s2 = Session::new(
            snap.session.clone(),
            snap.policy.clone(),
            Arc::new(SpoolGauge::new(u64::MAX)),
            client,
        );
        s2.set_message_gate(screen.message_gate(&snap, client).unwrap());
        output(&mut s2);
        say(&mut s2, "EHLO c.test");
        assert!(say(&mut s2, "MAIL FROM:<>").starts_with("450 4.7.1"));
    }

    #[test]
    fn rcpt_of_a_callout_partner_waits_for_the_verdict() {
        let snap = Snapshot::new(
            Config::parse(
                "hostname = \"mx2.test\"\nspool = \"/x\"\n\
                 [[partner]]\ndomain = \"example.com\"\nverify = \"callout\"\n\
                 [[partner]]\ndomain = \"example.org\"\n",
            )
            .unwrap(),
        );
        assert!(snap.config.to_toml().contains("verify = \"callout\""));
        let mut s = Session::new(
            snap.session.clone(),
            snap.policy.clone(),
            Arc::new(SpoolGauge::new(u64::MAX)),
            "198.51.100.7".parse().unwrap(),
        );
        let now = SystemTime::now();
        output(&mut s);
        s.receive(b"EHLO c.test\r\nMAIL FROM:<a@b.test>\r\n", now);
        output(&mut s);
        // Pipelined: the first RCPT is verified before the others are read.
        let step = s.receive(
            b"RCPT TO:<Bob@Example.com>\r\nRCPT TO:<x@example.org>\r\nRCPT TO:<eve@example.com>\r\nDATA\r\n",
            now,
        );
        assert!(
            matches!(&step, Step::Verify(a) if a == "Bob@Example.com"),
            "{step:?}"
        );
        assert_eq!(output(&mut s), "");
        let step = s.verified(Ok(()), now);
        // example.org does not verify; eve is asked next.
        assert!(
            matches!(&step, Step::Verify(a) if a == "eve@example.com"),
            "{step:?}"
        );
        assert_eq!(output(&mut s), "250 2.1.5 Ok\r\n250 2.1.5 Ok\r\n");
        let step = s.verified(
            Err("550 5.1.1 <eve@example.com>: Recipient address rejected: undeliverable address: no".into()),
            now,
        );
        assert!(matches!(step, Step::Read), "{step:?}");
        assert_eq!(
            output(&mut s),
            "550 5.1.1 <eve@example.com>: Recipient address rejected: undeliverable address: no\r\n354 End data with <CR><LF>.<CR><LF>\r\n"
        );
        assert!(s
            .take_events()
            .contains(&crate::smtp::session::Event::RefusedRecipient("callout")));
        let step = s.receive(b"hi\r\n.\r\n", now);
        let Step::Store(incoming) = step else {
            panic!("{step:?}")
        };
        let rcpts: Vec<&str> = incoming
            .envelope
            .recipients
            .iter()
            .map(|r| r.address.as_str())
            .collect();
        assert_eq!(rcpts, ["Bob@Example.com", "x@example.org"]);
    }

    #[test]
    fn a_bad_verify_value_is_one_line() {
        let e = Config::parse(
            "hostname = \"mx2.test\"\nspool = \"/x\"\n[[partner]]\ndomain = \"example.com\"\nverify = \"ask\"\n",
        )
        .unwrap_err();
        assert!(
            !e.contains('\n') && e.contains("line 5") && e.contains("callout"),
            "{e}"
        );
    }
}
