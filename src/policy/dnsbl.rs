//! DNS blocklists (`[smtp] dnsbl`): at connect, each list is asked about the client's
//! address, all lists at once, within [`TIMEOUT`].
//!
//! The query name is the address reversed (IPv4: its octets, `192.0.2.1` → `1.2.0.192.LIST`;
//! IPv6: its 32 nibbles) under the list's domain; an `A` record in `127.0.0.0/8` means
//! listed ([`is_listing`]), except `127.255.255.0/24`, which lists such as Spamhaus answer
//! when they refuse to answer (over quota, public resolver): that list is skipped. A list
//! that fails (SERVFAIL, REFUSED, no answer within the timeout) is skipped and logged; it
//! never blocks mail. Answers (listed or not) are cached for their DNS TTL, bounded to
//! [`MAX_CACHED`] entries and [`MAX_TTL`]; failures are not cached.
//!
//! Lookups go through the caller's resolver, configured as delivery's (`[delivery]
//! nameservers`, see [`crate::delivery::mx::Resolver`]). Which clients are exempt (`[relay]
//! networks`) is the caller's decision.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use hickory_resolver::proto::op::ResponseCode;
use hickory_resolver::proto::rr::{RData, RecordType};
use hickory_resolver::proto::ProtoErrorKind;
use hickory_resolver::{Name, TokioResolver};
use tracing::{debug, warn};

use crate::config::Config;
use crate::delivery::mx::Resolver;

/// How long the connect-time check may take, every list together.
pub const TIMEOUT: Duration = Duration::from_secs(5);
/// Cached answers, at most.
pub const MAX_CACHED: usize = 10_000;
/// An answer is kept at most this long, whatever its TTL.
pub const MAX_TTL: Duration = Duration::from_secs(86_400);
/// A "not listed" answer without an SOA (so without a negative TTL) is kept this long.
const DEFAULT_NEGATIVE_TTL: Duration = Duration::from_secs(300);

/// The name to look up for `client` in `list` (`list` without a trailing dot).
pub fn query_name(client: IpAddr, list: &str) -> String {
    let mut name = String::with_capacity(80);
    match canonical(client) {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            let _ = write!(name, "{}.{}.{}.{}", o[3], o[2], o[1], o[0]);
        }
        IpAddr::V6(v6) => {
            for byte in v6.octets().iter().rev() {
                let _ = write!(name, "{:x}.{:x}.", byte & 0x0f, byte >> 4);
            }
            name.pop();
        }
    }
    name.push('.');
    name.push_str(list.trim_end_matches('.'));
    name
}

/// What an `A` record of a list means.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Meaning {
    /// `127.0.0.0/8` (but not `127.255.255.0/24`): the client is listed.
    Listed,
    /// `127.255.255.0/24`: the list refuses to answer us (not a listing).
    ListError,
    /// Anything else (a wildcard, a hijacking resolver): ignored.
    Other,
}

pub fn is_listing(a: Ipv4Addr) -> Meaning {
    let o = a.octets();
    if o[0] != 127 {
        Meaning::Other
    } else if o[1] == 255 && o[2] == 255 {
        Meaning::ListError
    } else {
        Meaning::Listed
    }
}

/// A list's answer about one client.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Answer {
    /// Listed, with the record's address (the list's return code).
    Listed(Ipv4Addr),
    NotListed,
}

/// A client found on a list.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Listing {
    pub list: String,
    pub code: Ipv4Addr,
}

#[derive(Clone, Copy, Debug)]
struct Cached {
    answer: Answer,
    until: Instant,
}

/// The blocklist checker and its cache, shared by every connection.
#[derive(Default)]
pub struct Dnsbl {
    cache: Mutex<HashMap<(String, IpAddr), Cached>>,
}

impl Dnsbl {
    /// The first of `config`'s lists found to list `client` within [`TIMEOUT`]; `None`
    /// when none does (or none answered).
    pub async fn check(
        &self,
        config: &Config,
        resolver: &Resolver,
        client: IpAddr,
    ) -> Option<Listing> {
        let lists = &config.smtp.dnsbl;
        if lists.is_empty() {
            return None;
        }
        let client = canonical(client);
        let now = Instant::now();
        let mut ask = Vec::new();
        for list in lists {
            match self.cached(list, client, now) {
                Some(Answer::Listed(code)) => {
                    return Some(Listing {
                        list: list.clone(),
                        code,
                    })
                }
                Some(Answer::NotListed) => {}
                None => ask.push(list.clone()),
            }
        }
        if ask.is_empty() {
            return None;
        }
        let dns = resolver.dns();
        let mut set = tokio::task::JoinSet::new();
        for list in ask {
            let dns = dns.clone();
            set.spawn(async move {
                let r = lookup(&dns, client, &list).await;
                (list, r)
            });
        }
        let deadline = tokio::time::Instant::now() + TIMEOUT;
        let mut found = None;
        loop {
            let next = tokio::time::timeout_at(deadline, set.join_next()).await;
            let (list, result) = match next {
                Err(_) => {
                    // Dropping the set cancels the lookups still running.
                    warn!(
                        "dnsbl: {} list(s) did not answer about [{client}] within {TIMEOUT:?}: skipped",
                        set.len()
                    );
                    break;
                }
                Ok(None) => break,
                Ok(Some(Err(_))) => continue,
                Ok(Some(Ok(r))) => r,
            };
            match result {
                Ok((answer, ttl)) => {
                    self.remember(&list, client, answer, ttl);
                    if let Answer::Listed(code) = answer {
                        found = Some(Listing { list, code });
                        break;
                    }
                }
                Err(e) => warn!("dnsbl {list}: lookup for [{client}] failed, list skipped: {e}"),
            }
        }
        found
    }

    fn cached(&self, list: &str, client: IpAddr, now: Instant) -> Option<Answer> {
        let cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        cache
            .get(&(list.to_string(), client))
            .filter(|c| c.until > now)
            .map(|c| c.answer)
    }

    fn remember(&self, list: &str, client: IpAddr, answer: Answer, ttl: Duration) {
        let now = Instant::now();
        let ttl = ttl.min(MAX_TTL);
        if ttl.is_zero() {
            return;
        }
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        if cache.len() >= MAX_CACHED {
            cache.retain(|_, c| c.until > now);
            if cache.len() >= MAX_CACHED {
                // Still full of live answers: make room by dropping any one.
                if let Some(k) = cache.keys().next().cloned() {
                    cache.remove(&k);
                }
            }
        }
        cache.insert(
            (list.to_string(), client),
            Cached {
                answer,
                until: now + ttl,
            },
        );
    }

    /// Cached answers now (for tests).
    pub fn cached_len(&self) -> usize {
        self.cache.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
}

/// One list's answer about `client`, with how long it may be kept.
async fn lookup(
    dns: &TokioResolver,
    client: IpAddr,
    list: &str,
) -> Result<(Answer, Duration), String> {
    let q = query_name(client, list);
    let mut name = Name::from_ascii(&q).map_err(|e| format!("{q}: {e}"))?;
    name.set_fqdn(true);
    match dns.lookup(name, RecordType::A).await {
        Ok(lookup) => {
            let ttl = lookup
                .valid_until()
                .saturating_duration_since(Instant::now());
            let mut answer = Answer::NotListed;
            for r in lookup.iter() {
                if let RData::A(a) = r {
                    match is_listing(a.0) {
                        Meaning::Listed => {
                            answer = Answer::Listed(a.0);
                            break;
                        }
                        Meaning::ListError => {
                            return Err(format!("the list refused the query (answered {})", a.0))
                        }
                        Meaning::Other => {
                            debug!("dnsbl {list}: {q} has A {}: not a listing", a.0)
                        }
                    }
                }
            }
            Ok((answer, ttl))
        }
        Err(e) => match e.proto().map(|p| p.kind()) {
            Some(ProtoErrorKind::NoRecordsFound {
                response_code: ResponseCode::NXDomain | ResponseCode::NoError,
                negative_ttl,
                ..
            }) => {
                let ttl = negative_ttl
                    .map(|s| Duration::from_secs(u64::from(s)))
                    .unwrap_or(DEFAULT_NEGATIVE_TTL);
                Ok((Answer::NotListed, ttl))
            }
            Some(ProtoErrorKind::NoRecordsFound { response_code, .. }) => {
                Err(format!("the nameserver answered {response_code}"))
            }
            _ => Err(e.to_string()),
        },
    }
}

/// An IPv4-mapped IPv6 client as IPv4.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// The blocklist answer the client gets: `554 5.7.1`, naming the list (Postfix's shape).
pub fn reply(client: IpAddr, listing: &Listing) -> String {
    format!(
        "554 5.7.1 Service unavailable; Client host [{}] blocked using {}",
        canonical(client),
        listing.list
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reversed_names() {
        assert_eq!(
            query_name("192.0.2.1".parse().unwrap(), "zen.example.org"),
            "1.2.0.192.zen.example.org"
        );
        assert_eq!(
            query_name("127.0.0.2".parse().unwrap(), "bl.test."),
            "2.0.0.127.bl.test"
        );
        assert_eq!(
            query_name("::ffff:198.51.100.7".parse().unwrap(), "bl.test"),
            "7.100.51.198.bl.test"
        );
        assert_eq!(
            query_name("2001:db8::567:89ab".parse().unwrap(), "bl.test"),
            "b.a.9.8.7.6.5.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2.bl.test"
        );
    }

    #[test]
    fn what_an_answer_means() {
        assert_eq!(is_listing(Ipv4Addr::new(127, 0, 0, 2)), Meaning::Listed);
        assert_eq!(is_listing(Ipv4Addr::new(127, 0, 0, 10)), Meaning::Listed);
        assert_eq!(
            is_listing(Ipv4Addr::new(127, 255, 255, 254)),
            Meaning::ListError
        );
        assert_eq!(is_listing(Ipv4Addr::new(192, 0, 2, 1)), Meaning::Other);
    }

    #[test]
    fn the_cache_keeps_answers_for_their_ttl_and_is_bounded() {
        let d = Dnsbl::default();
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let now = Instant::now();
        d.remember(
            "bl.test",
            a,
            Answer::Listed(Ipv4Addr::new(127, 0, 0, 2)),
            Duration::from_secs(60),
        );
        d.remember("other.test", a, Answer::NotListed, Duration::ZERO);
        assert_eq!(
            d.cached("bl.test", a, now),
            Some(Answer::Listed(Ipv4Addr::new(127, 0, 0, 2)))
        );
        assert_eq!(d.cached("other.test", a, now), None);
        assert_eq!(d.cached("bl.test", a, now + Duration::from_secs(61)), None);
        for i in 0..(MAX_CACHED as u32 + 10) {
            d.remember(
                "bl.test",
                IpAddr::from(i.to_be_bytes()),
                Answer::NotListed,
                Duration::from_secs(60),
            );
        }
        assert!(d.cached_len() <= MAX_CACHED);
    }

    #[test]
    fn configured_lists_are_normalised_and_checked() {
        let base = "hostname = \"mx2.test\"\nspool = \"/x\"\n[smtp]\n";
        let c = Config::parse(&format!("{base}dnsbl = [\"ZEN.Example.org.\"]\n")).unwrap();
        assert_eq!(c.smtp.dnsbl, vec!["zen.example.org".to_string()]);
        let e = Config::parse(&format!("{base}dnsbl = [\"not a list\"]\n")).unwrap_err();
        assert!(e.contains("line 4") && e.contains("dnsbl"), "{e}");
    }
}
