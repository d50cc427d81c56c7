//! The pure part of an attempt: per-recipient outcomes in, the entry's new state and the
//! DSNs it causes out. No I/O; unit-tested on its own.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::config::Config;
use crate::delivery::Reply;
use crate::dsn::{self, Action, Dsn, DsnRecipient};
use crate::envelope::{Body, Envelope, RcptState, Recipient};
use crate::spool::{LastTls, QueueEntry};
use crate::tls::TlsState;

/// What happened to one recipient in one attempt. `relay` (`host[ip]:port`) is set when
/// `reason` is the reply of that remote server; otherwise `reason` is our own words.
#[derive(Clone, Debug)]
pub enum Outcome {
    Sent {
        reply: Reply,
        relay: String,
        /// The session's TLS state (SMTP only): `tls=TLSv1.3 verified=pkix`, `tls=none`.
        /// Shared by every recipient of the session.
        tls: Option<Arc<TlsState>>,
    },
    Deferred {
        reason: String,
        status: String,
        relay: Option<String>,
        /// The TLS state of the SMTP session that gave this answer, if one did.
        tls: Option<Arc<TlsState>>,
    },
    Failed {
        reason: String,
        status: String,
        relay: Option<String>,
        tls: Option<Arc<TlsState>>,
    },
}

impl Outcome {
    /// The SMTP session this outcome came from, as the queue entry keeps it.
    fn session(&self) -> Option<LastTls> {
        let (relay, tls) = match self {
            Outcome::Sent { relay, tls, .. } => (Some(relay), tls),
            Outcome::Deferred { relay, tls, .. } | Outcome::Failed { relay, tls, .. } => {
                (relay.as_ref(), tls)
            }
        };
        Some(LastTls {
            relay: relay?.clone(),
            state: TlsState::clone(tls.as_ref()?),
        })
    }
}

/// How an outcome reads in the log and in `last_error`.
pub(super) fn describe(reason: &str, relay: &Option<String>) -> String {
    match relay {
        Some(r) => format!("host {r} said: {reason}"),
        None => reason.to_string(),
    }
}

/// The host name of a `host[ip]:port` relay, for a DSN's `Remote-MTA`.
pub(super) fn remote_host(relay: &Option<String>) -> Option<String> {
    relay
        .as_deref()
        .map(|r| r.split('[').next().unwrap_or(r).to_string())
}

/// The new state of an entry after an attempt, and the DSNs it causes. Pure.
///
/// `outcomes` has one element per pending recipient of `entry`, in order.
pub fn settle(
    config: &Config,
    entry: &QueueEntry,
    envelope: &Envelope,
    message: &[u8],
    outcomes: &[Outcome],
    now: SystemTime,
    retry_after: Duration,
) -> (QueueEntry, Vec<(Envelope, Vec<u8>)>) {
    let now_ms = to_ms(now);
    let mut next = entry.clone();
    next.attempts += 1;
    next.next_attempt_ms = now_ms + retry_after.as_millis() as u64;
    let mut failed: Vec<(usize, String, String, Option<String>)> = Vec::new();
    let mut last_error = None;
    let pending: Vec<usize> = (0..entry.recipients.len())
        .filter(|&i| entry.recipients[i].state == RcptState::Pending)
        .collect();
    for (&i, outcome) in pending.iter().zip(outcomes) {
        match outcome {
            Outcome::Sent { .. } => next.recipients[i].state = RcptState::Delivered,
            Outcome::Failed {
                reason,
                status,
                relay,
                ..
            } => {
                next.recipients[i].state = RcptState::Failed;
                failed.push((i, reason.clone(), status.clone(), relay.clone()));
            }
            Outcome::Deferred { reason, relay, .. } => last_error = Some(describe(reason, relay)),
        }
    }
    if last_error.is_some() {
        next.last_error = last_error;
    }
    // Each attempt says anew where it went and how (nothing when it reached no SMTP server).
    next.last_tls = outcomes.iter().rev().find_map(Outcome::session);

    // Too old: every recipient still pending fails now.
    // Time spent on hold does not count.
    let age = Duration::from_millis(
        now_ms
            .saturating_sub(envelope.arrival_ms)
            .saturating_sub(entry.held_ms),
    );
    let expired = age >= config.queue.max_lifetime.0;
    let mut delayed: Vec<(usize, String, String, Option<String>)> = Vec::new();
    for (&i, outcome) in pending.iter().zip(outcomes) {
        if let Outcome::Deferred {
            reason,
            status,
            relay,
            ..
        } = outcome
        {
            if expired {
                next.recipients[i].state = RcptState::Failed;
                let status = match status.strip_prefix('4') {
                    Some(rest) => format!("5{rest}"),
                    None => "5.4.7".to_string(),
                };
                failed.push((
                    i,
                    format!(
                        "delivery time expired; last error: {}",
                        describe(reason, relay)
                    ),
                    status,
                    relay.clone(),
                ));
            } else {
                delayed.push((i, reason.clone(), status.clone(), relay.clone()));
            }
        }
    }

    let mut dsns = Vec::new();
    let hostname = &config.hostname;
    if dsn::is_dsn_allowed(envelope) {
        let rcpts: Vec<DsnRecipient> = failed
            .iter()
            .filter(|(i, ..)| dsn::wants(&entry.recipients[*i], dsn::Kind::Failure))
            .map(|(i, reason, status, relay)| DsnRecipient {
                recipient: &entry.recipients[*i],
                action: Action::Failed,
                status: status.clone(),
                diagnostic: Some(reason.clone()),
                remote_mta: remote_host(relay),
                last_attempt: Some(now),
            })
            .collect();
        if !rcpts.is_empty() {
            dsns.push(dsn_message(hostname, envelope, message, rcpts, now));
        }
        let warn_at = config.queue.delay_warning.0;
        if !warn_at.is_zero() && !next.warned && age >= warn_at && !delayed.is_empty() {
            let until = UNIX_EPOCH
                + Duration::from_millis(envelope.arrival_ms)
                + config.queue.max_lifetime.0;
            let rcpts: Vec<DsnRecipient> = delayed
                .iter()
                .filter(|(i, ..)| dsn::wants(&entry.recipients[*i], dsn::Kind::Delay))
                .map(|(i, reason, status, relay)| DsnRecipient {
                    recipient: &entry.recipients[*i],
                    action: Action::Delayed {
                        will_retry_until: until,
                    },
                    status: status.clone(),
                    diagnostic: Some(reason.clone()),
                    remote_mta: remote_host(relay),
                    last_attempt: Some(now),
                })
                .collect();
            next.warned = true;
            if !rcpts.is_empty() {
                dsns.push(dsn_message(hostname, envelope, message, rcpts, now));
            }
        }
    }
    (next, dsns)
}

fn dsn_message(
    hostname: &str,
    envelope: &Envelope,
    message: &[u8],
    recipients: Vec<DsnRecipient>,
    now: SystemTime,
) -> (Envelope, Vec<u8>) {
    let dsn = Dsn {
        reporting_mta: hostname,
        envelope,
        message,
        recipients,
        now,
    };
    let bytes = dsn.build();
    let env = Envelope {
        id: crate::queue_id::next(),
        sender: String::new(),
        recipients: vec![Recipient::new(envelope.sender.clone())],
        arrival_ms: to_ms(now),
        size: bytes.len() as u64,
        body: if dsn.is_8bit() {
            Body::EightBitMime
        } else {
            Body::SevenBit
        },
        smtputf8: dsn.needs_smtputf8(),
        ret: None,
        envid: None,
        client_ip: String::new(),
        helo: String::new(),
    };
    (env, bytes)
}

pub(super) fn to_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

pub(super) fn deferred(reason: String, status: &str, relay: Option<String>) -> Outcome {
    Outcome::Deferred {
        reason,
        status: status.to_string(),
        relay,
        tls: None,
    }
}

pub(super) fn failed(reason: String, status: &str) -> Outcome {
    Outcome::Failed {
        reason,
        status: status.to_string(),
        relay: None,
        tls: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::envelope::Notify;

    const HOUR: Duration = Duration::from_secs(3600);

    fn config() -> Config {
        Config::parse(
            "hostname = \"mx2.test\"\nspool = \"/x\"\n[queue]\nmax_lifetime = \"5d\"\ndelay_warning = \"4h\"\n",
        )
        .unwrap()
    }

    fn envelope(sender: &str, rcpts: &[&str]) -> Envelope {
        Envelope {
            id: "0000000000001".into(),
            sender: sender.into(),
            recipients: rcpts.iter().map(|r| Recipient::new(*r)).collect(),
            arrival_ms: 1_000_000,
            size: 10,
            body: Body::SevenBit,
            smtputf8: false,
            ret: None,
            envid: None,
            client_ip: String::new(),
            helo: String::new(),
        }
    }

    fn entry(env: &Envelope) -> QueueEntry {
        QueueEntry {
            recipients: env.recipients.clone(),
            attempts: 0,
            next_attempt_ms: env.arrival_ms,
            last_error: None,
            held: false,
            warned: false,
            held_since_ms: 0,
            held_ms: 0,
            last_tls: None,
        }
    }

    fn at(env: &Envelope, after: Duration) -> SystemTime {
        UNIX_EPOCH + Duration::from_millis(env.arrival_ms) + after
    }

    fn sent() -> Outcome {
        Outcome::Sent {
            reply: Reply {
                code: 250,
                status: Some("2.0.0".into()),
                text: "ok".into(),
            },
            relay: "mail[127.0.0.2]:25".into(),
            tls: None,
        }
    }

    fn later() -> Outcome {
        deferred("connect refused".into(), "4.4.1", None)
    }

    fn refused() -> Outcome {
        Outcome::Failed {
            reason: "550 5.1.1 unknown".into(),
            status: "5.1.1".into(),
            relay: Some("mail".into()),
            tls: None,
        }
    }

    const MSG: &[u8] = b"Subject: x\r\n\r\nbody\r\n";

    #[test]
    fn each_attempt_records_its_last_session_and_its_tls() {
        let env = envelope("s@x.org", &["a@d.org"]);
        let now = at(&env, Duration::from_secs(60));
        let busy = Outcome::Deferred {
            reason: "450 4.2.1 busy".into(),
            status: "4.2.1".into(),
            relay: Some("mail[127.0.0.2]:25".into()),
            tls: Some(Arc::new(TlsState {
                version: Some("TLSv1.3".into()),
                cipher: Some("TLS13_AES_128_GCM_SHA256".into()),
                verified: "pkix".into(),
            })),
        };
        let (next, _) = settle(&config(), &entry(&env), &env, MSG, &[busy], now, HOUR);
        let last = next.last_tls.clone().expect("the session is recorded");
        assert_eq!(last.relay, "mail[127.0.0.2]:25");
        assert_eq!(last.state.to_string(), "tls=TLSv1.3 verified=pkix");
        // Kept through the spool's encoding.
        let back = QueueEntry::from_bytes(&next.to_bytes()).unwrap();
        assert_eq!(back.last_tls, Some(last));
        // The next attempt reaches no server: it says so, the old session is not kept.
        let (next, _) = settle(&config(), &next, &env, MSG, &[later()], now, HOUR);
        assert_eq!(next.last_tls, None);
    }

    #[test]
    fn a_deferral_counts_the_attempt_and_waits_the_retry_interval() {
        let env = envelope("a@sender.test", &["b@example.com"]);
        let now = at(&env, Duration::from_secs(60));
        let (next, dsns) = settle(&config(), &entry(&env), &env, MSG, &[later()], now, HOUR);
        assert_eq!(next.attempts, 1);
        assert_eq!(next.next_attempt_ms, to_ms(now) + 3_600_000);
        assert_eq!(next.last_error.as_deref(), Some("connect refused"));
        assert!(next.has_pending());
        assert!(dsns.is_empty());
    }

    #[test]
    fn mixed_outcomes_settle_each_recipient() {
        let env = envelope(
            "a@sender.test",
            &["b@example.com", "c@example.com", "d@example.com"],
        );
        let now = at(&env, Duration::from_secs(1));
        let (next, dsns) = settle(
            &config(),
            &entry(&env),
            &env,
            MSG,
            &[sent(), refused(), later()],
            now,
            HOUR,
        );
        let states: Vec<_> = next.recipients.iter().map(|r| r.state).collect();
        assert_eq!(
            states,
            [RcptState::Delivered, RcptState::Failed, RcptState::Pending]
        );
        assert_eq!(dsns.len(), 1, "one failure DSN");
        let (dsn_env, bytes) = &dsns[0];
        assert_eq!(dsn_env.sender, "");
        assert_eq!(dsn_env.recipients[0].address, "a@sender.test");
        let text = String::from_utf8_lossy(bytes);
        assert!(
            text.contains("Final-Recipient: rfc822; c@example.com"),
            "{text}"
        );
        assert!(!text.contains("Final-Recipient: rfc822; d@example.com"));
        // The next attempt sends only what is still pending.
        let (next2, _) = settle(&config(), &next, &env, MSG, &[sent()], now, HOUR);
        assert!(!next2.has_pending());
        assert_eq!(next2.recipients[0].state, RcptState::Delivered);
    }

    #[test]
    fn expiry_bounces_what_is_pending() {
        let env = envelope("a@sender.test", &["b@example.com"]);
        let mut e = entry(&env);
        e.warned = true;
        let now = at(&env, Duration::from_secs(5 * 86400));
        let (next, dsns) = settle(&config(), &e, &env, MSG, &[later()], now, HOUR);
        assert!(!next.has_pending());
        assert_eq!(next.recipients[0].state, RcptState::Failed);
        assert_eq!(dsns.len(), 1);
        let text = String::from_utf8_lossy(&dsns[0].1);
        assert!(text.contains("Action: failed"), "{text}");
        assert!(text.contains("delivery time expired"), "{text}");
        assert!(text.contains("Status: 5.4.1"), "{text}");
    }

    #[test]
    fn one_delay_warning_after_delay_warning() {
        let env = envelope("a@sender.test", &["b@example.com"]);
        let early = at(&env, Duration::from_secs(3600));
        let (next, dsns) = settle(&config(), &entry(&env), &env, MSG, &[later()], early, HOUR);
        assert!(dsns.is_empty() && !next.warned);
        let late = at(&env, Duration::from_secs(5 * 3600));
        let (next, dsns) = settle(&config(), &next, &env, MSG, &[later()], late, HOUR);
        assert!(next.warned);
        assert_eq!(dsns.len(), 1);
        let text = String::from_utf8_lossy(&dsns[0].1);
        assert!(text.contains("Action: delayed"), "{text}");
        let (_, dsns) = settle(&config(), &next, &env, MSG, &[later()], late + HOUR, HOUR);
        assert!(dsns.is_empty(), "only one warning");
        // "0s" turns warnings off.
        let mut c = config();
        c.queue.delay_warning.0 = Duration::ZERO;
        let (_, dsns) = settle(&c, &entry(&env), &env, MSG, &[later()], late, HOUR);
        assert!(dsns.is_empty());
    }

    #[test]
    fn no_dsn_to_the_null_sender_nor_against_notify() {
        let env = envelope("", &["b@example.com"]);
        let now = at(&env, Duration::from_secs(5 * 86400));
        let (next, dsns) = settle(&config(), &entry(&env), &env, MSG, &[refused()], now, HOUR);
        assert!(!next.has_pending());
        assert!(dsns.is_empty());

        let mut env = envelope("a@sender.test", &["b@example.com", "c@example.com"]);
        env.recipients[0].notify = Some(Notify {
            never: true,
            ..Default::default()
        });
        env.recipients[1].notify = Some(Notify {
            success: true,
            ..Default::default()
        });
        let (_, dsns) = settle(
            &config(),
            &entry(&env),
            &env,
            MSG,
            &[refused(), refused()],
            now,
            HOUR,
        );
        assert!(
            dsns.is_empty(),
            "NOTIFY=NEVER and NOTIFY=SUCCESS want no failure DSN"
        );
    }
}
