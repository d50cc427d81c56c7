//! Per-partner quotas (`[[partner]] max_messages`, `max_bytes`): a partner whose queue is
//! full gets `452 4.3.1`, at RCPT when its queue is already full (or the declared `SIZE`
//! would overflow it), during DATA once the bytes received would, and at the final dot
//! when the commit would; never `250` beyond the quota, never `5xx`. Other partners are
//! not affected, and the global `min_free_space` floor stays.
//!
//! What is queued comes from the spool's counters ([`Spool::usage`], exact across
//! restarts). Sessions that finish DATA at the same moment must not all take the last
//! place: each store first [`Quotas::reserve`]s its message for every partner it goes to,
//! under one lock, against what is committed plus what others reserved; the reservation
//! is dropped after the commit, by which time the counters include it.
//!
//! A log line says when a partner's queue passes 80% of a quota, when it is full, and when
//! it is back under 80%.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use tracing::{info, warn};

use super::Policy;
use crate::smtp::session::QuotaGate;
use crate::spool::{Spool, Usage};

/// One partner's limits.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Quota {
    pub max_messages: Option<u64>,
    pub max_bytes: Option<u64>,
}

impl Quota {
    /// Whether `used` plus one message of `bytes` fits.
    fn fits(&self, used: Usage, bytes: u64) -> bool {
        self.max_messages
            .is_none_or(|m| used.messages.saturating_add(1) <= m)
            && self
                .max_bytes
                .is_none_or(|m| used.bytes.saturating_add(bytes) <= m)
    }

    /// How full `used` is, in percent of the fuller of the two limits.
    pub fn percent(&self, used: Usage) -> u64 {
        let of = |n: u64, max: Option<u64>| max.map_or(0, |m| n.saturating_mul(100) / m.max(1));
        of(used.messages, self.max_messages).max(of(used.bytes, self.max_bytes))
    }

    /// `12 of 200000 messages, 3 MiB of 20 GiB`, for logs and reports.
    pub fn describe(&self, used: Usage) -> String {
        let mut parts = Vec::new();
        if let Some(m) = self.max_messages {
            parts.push(format!("{} of {m} messages", used.messages));
        }
        if let Some(m) = self.max_bytes {
            parts.push(format!("{} of {m} bytes", used.bytes));
        }
        parts.join(", ")
    }
}

/// Every partner's quota in `config`, by domain (for the reports).
pub fn of_config(config: &crate::config::Config) -> BTreeMap<String, Quota> {
    config
        .partner
        .iter()
        .filter(|p| p.max_messages.is_some() || p.max_bytes.is_some())
        .map(|p| {
            let q = Quota {
                max_messages: p.max_messages,
                max_bytes: p.max_bytes.map(|b| b.0),
            };
            (p.domain.clone(), q)
        })
        .collect()
}

impl Quota {
    /// `{"messages":12,"max_messages":200000,"bytes":3,"max_bytes":null,"percent":0}`,
    /// for `queue --json` and `shape --json`.
    pub fn to_json(&self, used: Usage) -> serde_json::Value {
        serde_json::json!({
            "messages": used.messages,
            "max_messages": self.max_messages,
            "bytes": used.bytes,
            "max_bytes": self.max_bytes,
            "percent": self.percent(used),
        })
    }
}

/// The reservations of messages being stored, and what was last said of each partner.
pub struct Quotas {
    spool: Spool,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// Messages between their quota check and the end of their commit, per domain.
    reserved: HashMap<String, Usage>,
    /// The fill level last logged per domain: 0 (under 80%), 1 (80% or more), 2 (full).
    said: HashMap<String, u8>,
}

/// A message's place in its partners' queues, held until its commit is over.
pub struct Reservation {
    quotas: Arc<Quotas>,
    domains: Vec<String>,
    bytes: u64,
}

impl Drop for Reservation {
    fn drop(&mut self) {
        let mut st = self.quotas.lock();
        for d in &self.domains {
            if let Some(r) = st.reserved.get_mut(d) {
                r.messages = r.messages.saturating_sub(1);
                r.bytes = r.bytes.saturating_sub(self.bytes);
                if *r == Usage::default() {
                    st.reserved.remove(d);
                }
            }
        }
    }
}

impl Quotas {
    pub fn new(spool: Spool) -> Arc<Quotas> {
        Arc::new(Quotas {
            spool,
            state: Mutex::new(State::default()),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// `domain`'s queue as committed, plus the messages being stored for it.
    fn used(&self, st: &State, domain: &str) -> Usage {
        let mut u = self.spool.usage(domain);
        if let Some(r) = st.reserved.get(domain) {
            u.messages = u.messages.saturating_add(r.messages);
            u.bytes = u.bytes.saturating_add(r.bytes);
        }
        u
    }

    /// Whether one more message of `bytes` fits in `domain`'s queue under `quota` (no
    /// place is taken: for RCPT and DATA, where the message may still not come).
    pub fn room(&self, domain: &str, quota: &Quota, bytes: u64) -> Result<(), String> {
        let mut st = self.lock();
        let used = self.used(&st, domain);
        if quota.fits(used, bytes) {
            return Ok(());
        }
        self.say(&mut st, domain, quota, used, 2);
        Err(full(domain))
    }

    /// Takes a place for a message of `bytes` in the queue of each of `domains` that has
    /// a quota in `policy`, all or none; `Err` names a partner that is full.
    pub fn reserve(
        self: &Arc<Self>,
        policy: &Policy,
        domains: &[String],
        bytes: u64,
    ) -> Result<Reservation, String> {
        let limited: Vec<(&String, Quota)> = domains
            .iter()
            .filter_map(|d| policy.quota(d).map(|q| (d, q)))
            .collect();
        let mut st = self.lock();
        for (d, q) in &limited {
            let used = self.used(&st, d);
            if !q.fits(used, bytes) {
                self.say(&mut st, d, q, used, 2);
                return Err(full(d));
            }
        }
        for (d, q) in &limited {
            let r = st.reserved.entry(d.to_string()).or_default();
            r.messages += 1;
            r.bytes = r.bytes.saturating_add(bytes);
            let used = self.used(&st, d);
            let level = match q.percent(used) {
                p if p >= 100 => 2,
                p if p >= 80 => 1,
                _ => 0,
            };
            self.say(&mut st, d, q, used, level);
        }
        Ok(Reservation {
            quotas: self.clone(),
            domains: limited.into_iter().map(|(d, _)| d.clone()).collect(),
            bytes,
        })
    }

    /// Logs a change of `domain`'s fill level.
    fn say(&self, st: &mut State, domain: &str, quota: &Quota, used: Usage, level: u8) {
        let before = st.said.get(domain).copied().unwrap_or(0);
        if level == before {
            return;
        }
        st.said.insert(domain.to_string(), level);
        let what = quota.describe(used);
        match level {
            2 => warn!("partner {domain}: queue quota reached ({what}): new mail gets 452 4.3.1"),
            1 if before < 1 => {
                warn!("partner {domain}: queue at 80% of its quota or more ({what})")
            }
            1 => {}
            _ => info!("partner {domain}: queue back under 80% of its quota ({what})"),
        }
    }

    /// The check a session makes at RCPT and during DATA, with the limits of `policy`.
    pub fn gate(self: &Arc<Self>, policy: Arc<Policy>) -> Arc<dyn QuotaGate> {
        Arc::new(Gate {
            quotas: self.clone(),
            policy,
        })
    }
}

fn full(domain: &str) -> String {
    format!("the queue of {domain} is full")
}

struct Gate {
    quotas: Arc<Quotas>,
    policy: Arc<Policy>,
}

impl QuotaGate for Gate {
    fn room(&self, domain: &str, bytes: u64) -> Result<(), String> {
        match self.policy.quota(domain) {
            Some(q) => self.quotas.room(domain, &q, bytes),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_message_fits_up_to_the_limit_and_not_beyond() {
        let q = Quota {
            max_messages: Some(2),
            max_bytes: Some(1000),
        };
        let used = |messages, bytes| Usage { messages, bytes };
        assert!(q.fits(used(1, 0), 1000));
        assert!(!q.fits(used(1, 1), 1000));
        assert!(!q.fits(used(2, 0), 0));
        assert_eq!(q.percent(used(1, 900)), 90);
        assert_eq!(q.percent(used(2, 0)), 100);
        let none = Quota::default();
        assert!(none.fits(used(u64::MAX, u64::MAX), u64::MAX));
        assert_eq!(none.percent(used(5, 5)), 0);
        assert_eq!(q.describe(used(1, 2)), "1 of 2 messages, 2 of 1000 bytes");
    }
}
