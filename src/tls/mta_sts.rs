//! MTA-STS (RFC 8461): a destination domain's published wish that mail reach it only over
//! TLS with a verified certificate, and only at the MX hosts it names.
//!
//! For a domain delivered by MX lookup (never a `route` or the smart host: those are the
//! administrator's explicit choice) with `[delivery] mta_sts = true`, [`Sts::decide`]:
//! 1. looks up the TXT record `_mta-sts.DOMAIN` ([`parse_txt`]: one `v=STSv1; id=...;`
//!    record names the policy's version) through the delivery resolver;
//! 2. reads the domain's policy cached in the spool ([`crate::spool::StsRecord`]);
//! 3. uses the cached policy while it has not expired and the TXT id is the same, or the
//!    TXT lookup failed or found nothing (surviving a DNS attack is the point); otherwise,
//!    with a TXT id, fetches `https://mta-sts.DOMAIN/.well-known/mta-sts.txt`
//!    ([`super::https`], PKIX-verified against the system's roots and `tls_ca_file`, no
//!    redirects, `200` and `text/plain` only, at most [`MAX_POLICY`], within
//!    [`FETCH_TIMEOUT`]), parses it ([`parse_policy`]) and caches it for its `max_age`. A
//!    failed fetch keeps an unexpired cached policy; without one the domain has no policy
//!    (RFC 8461 5.1). A failed fetch of an id is not tried again for [`FETCH_RETRY`]. The
//!    delivery waits for a fetch at most [`FETCH_WAIT`] (a slower one goes on in the
//!    background and caches its policy for the next delivery; meanwhile: as failed), and
//!    there is one fetch per domain at a time.
//!
//! The [`Decision`] then says what delivery does: `enforce` tries only the MX hosts that
//! match the policy's `mx` patterns ([`mx_matches`]), with `tls = verify` toward them (no
//! clear text, no fallback); no matching host defers with 4.7.5. `testing` delivers as the
//! configured policy says and warns about what `enforce` would have refused. `none`: nothing.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tracing::{debug, info, warn};

use super::client::{server_name, Connectors, TlsPolicy, Verified};
use crate::delivery::client::Connection;
use crate::delivery::mx::{Hop, Resolver};
use crate::delivery::Transcript;
use crate::spool::{Spool, StsRecord};

/// The whole policy fetch (address lookup, connection, TLS, request, response) at most.
pub const FETCH_TIMEOUT: Duration = Duration::from_secs(60);

/// The policy body at most (RFC 8461 3.3: 64 KiB).
pub const MAX_POLICY: usize = 64 * 1024;

/// The longest `max_age` (RFC 8461 3.2: 31557600 s, about a year); longer is cut to it.
pub const MAX_MAX_AGE: u64 = 31_557_600;

/// How long a delivery waits for a policy fetch; a slower fetch goes on in the background
/// (up to [`FETCH_TIMEOUT`]) and the delivery goes on as the RFC says for a failed fetch.
pub const FETCH_WAIT: Duration = Duration::from_secs(10);

/// A fetch that failed for a domain's id is not tried again sooner than this (every
/// session to the domain would otherwise wait for it).
pub const FETCH_RETRY: Duration = Duration::from_secs(300);

/// The `_mta-sts` TXT lookup at most (on top of the resolver's own per-query limits): a
/// slow or failing lookup is treated as no record (a cached policy still applies), so
/// delivery never waits long for it.
pub const TXT_TIMEOUT: Duration = Duration::from_secs(5);

/// The well-known place of the policy on `mta-sts.DOMAIN` (RFC 8461 3.3).
const POLICY_PATH: &str = "/.well-known/mta-sts.txt";

/// Domains whose failed fetches are remembered, at most (then the memory starts again).
const MAX_FAILED: usize = 10_000;

/// `mode:` of a policy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Enforce,
    Testing,
    None,
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Mode::Enforce => "enforce",
            Mode::Testing => "testing",
            Mode::None => "none",
        })
    }
}

/// A parsed policy (RFC 8461 3.2).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Policy {
    pub mode: Mode,
    /// The `mx:` patterns, lower case, without a trailing dot; `*.` matches one label.
    pub mx: Vec<String>,
    /// Seconds, at most [`MAX_MAX_AGE`].
    pub max_age: u64,
}

impl Policy {
    /// Whether the MX host `host` matches one of the policy's patterns.
    pub fn allows(&self, host: &str) -> bool {
        self.mx.iter().any(|p| mx_matches(p, host))
    }
}

/// The `id=` of the domain's `v=STSv1` TXT record among `texts` (each record's strings
/// joined). `Ok(None)`: no such record. `Err`: several, or one that does not parse; RFC
/// 8461 3.1 treats both as no record.
pub fn parse_txt(texts: &[String]) -> Result<Option<String>, String> {
    let records: Vec<&str> = texts
        .iter()
        .map(String::as_str)
        .filter(|t| {
            t.strip_prefix("v=STSv1")
                .is_some_and(|rest| rest.trim_start_matches([' ', '\t']).starts_with(';'))
        })
        .collect();
    let record = match records[..] {
        [] => return Ok(None),
        [one] => one,
        _ => return Err(format!("{} v=STSv1 records (must be one)", records.len())),
    };
    let mut id = None;
    for field in record["v=STSv1".len()..].split(';') {
        let field = field.trim_matches([' ', '\t']);
        if field.is_empty() {
            continue;
        }
        let Some((key, value)) = field.split_once('=') else {
            return Err(format!("field {field:?} is not key=value"));
        };
        if key == "id" {
            if id.is_some() {
                return Err("more than one id=".into());
            }
            if value.is_empty()
                || value.len() > 32
                || !value.bytes().all(|b| b.is_ascii_alphanumeric())
            {
                return Err(format!("id={value:?} is not 1 to 32 letters and digits"));
            }
            id = Some(value.to_string());
        }
        // Other fields are extensions: ignored.
    }
    id.map(Some).ok_or_else(|| "no id= field".to_string())
}

/// Parses a policy body (RFC 8461 3.2): `key: value` lines ended by CRLF or LF. `version:
/// STSv1`, `mode` and `max_age` are required (the first of each counts), `mx` one or more
/// times unless the mode is `none`; unknown fields are ignored.
pub fn parse_policy(text: &str) -> Result<Policy, String> {
    let (mut version, mut mode, mut max_age) = (None, None, None);
    let mut mx = Vec::new();
    for line in text.split('\n') {
        let line = line.strip_suffix('\r').unwrap_or(line);
        if line.trim().is_empty() {
            continue;
        }
        let Some((key, value)) = line.split_once(':') else {
            return Err(format!("line {:?} is not key: value", short(line)));
        };
        let value = value.trim_matches([' ', '\t']);
        match key {
            "version" => {
                version.get_or_insert(value);
            }
            // The first of each counts; later ones fall to `_` and are ignored.
            "mode" if mode.is_none() => {
                mode = Some(match value {
                    "enforce" => Mode::Enforce,
                    "testing" => Mode::Testing,
                    "none" => Mode::None,
                    _ => {
                        return Err(format!(
                            "mode {:?} is none of enforce, testing, none",
                            short(value)
                        ))
                    }
                });
            }
            "max_age" if max_age.is_none() => {
                if value.is_empty()
                    || value.len() > 10
                    || !value.bytes().all(|b| b.is_ascii_digit())
                {
                    return Err(format!("max_age {:?} is not 1 to 10 digits", short(value)));
                }
                let secs: u64 = value.parse().map_err(|_| "max_age".to_string())?;
                max_age = Some(secs.min(MAX_MAX_AGE));
            }
            "mx" => mx.push(mx_pattern(value)?),
            _ => {}
        }
    }
    match version {
        Some("STSv1") => {}
        Some(v) => return Err(format!("version {:?}, not STSv1", short(v))),
        None => return Err("no version field".into()),
    }
    let mode = mode.ok_or("no mode field")?;
    let max_age = max_age.ok_or("no max_age field")?;
    if mx.is_empty() && mode != Mode::None {
        return Err(format!("mode {mode} without any mx field"));
    }
    Ok(Policy { mode, mx, max_age })
}

/// A checked `mx:` value: host name labels, optionally `*.` before the first.
fn mx_pattern(value: &str) -> Result<String, String> {
    let p = value.trim_end_matches('.').to_ascii_lowercase();
    let name = p.strip_prefix("*.").unwrap_or(&p);
    let ok = !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        });
    if ok {
        Ok(p)
    } else {
        Err(format!("mx {:?} is not a host name pattern", short(value)))
    }
}

/// Whether `host` matches `pattern` (RFC 8461 4.1): equal, or for `*.example.com` one
/// label in place of the `*` (not `example.com`, not `a.b.example.com`). Case and a
/// trailing dot are ignored.
pub fn mx_matches(pattern: &str, host: &str) -> bool {
    let pattern = pattern.trim_end_matches('.').to_ascii_lowercase();
    let host = host.trim_end_matches('.').to_ascii_lowercase();
    match pattern.strip_prefix('*') {
        Some(suffix) if suffix.starts_with('.') => host
            .strip_suffix(suffix)
            .is_some_and(|label| !label.is_empty() && !label.contains('.')),
        _ => pattern == host,
    }
}

fn short(s: &str) -> String {
    s.chars().take(80).collect()
}

/// Where the policy in force came from, for the log line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    Cached,
    Fetched,
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Source::Cached => "cached",
            Source::Fetched => "fetched",
        })
    }
}

/// The policy in force for one delivery to a domain.
#[derive(Clone, Debug)]
pub struct Decision {
    pub domain: String,
    pub id: String,
    pub policy: Policy,
    pub source: Source,
}

impl Decision {
    /// `MTA-STS policy for DOMAIN: mode=enforce id=ID (cached)`.
    pub fn line(&self) -> String {
        format!(
            "MTA-STS policy for {}: mode={} id={} ({})",
            self.domain, self.policy.mode, self.id, self.source
        )
    }

    /// Whether the policy is `enforce`.
    pub fn enforces(&self) -> bool {
        self.policy.mode == Mode::Enforce
    }

    /// The hops to try: under `enforce` only those matching the policy (the others are
    /// logged as skipped); `Err` (the reason to defer with) when none does. Under `testing`
    /// all, with a warning for each that `enforce` would skip.
    pub fn hops(
        &self,
        hops: Vec<Hop>,
        transcript: &Option<Transcript>,
    ) -> Result<Vec<Hop>, String> {
        if self.policy.mode == Mode::None {
            return Ok(hops);
        }
        let patterns = self.policy.mx.join(", ");
        let mut kept = Vec::with_capacity(hops.len());
        let mut skipped = Vec::new();
        for hop in hops {
            if self.policy.allows(&hop.name) {
                kept.push(hop);
                continue;
            }
            let line = if self.enforces() {
                format!(
                    "MTA-STS policy for {}: skipping MX host {}: it matches no mx pattern ({patterns})",
                    self.domain, hop.name
                )
            } else {
                format!(
                    "MTA-STS policy for {} is testing: enforce would skip MX host {}: it matches no mx pattern ({patterns})",
                    self.domain, hop.name
                )
            };
            warn!("{line}");
            note(transcript, &line);
            if self.enforces() {
                skipped.push(hop.name);
            } else {
                kept.push(hop);
            }
        }
        if kept.is_empty() {
            return Err(format!(
                "MTA-STS policy for {} (mode=enforce id={}): no MX host matches its mx patterns ({patterns}); MX hosts: {}",
                self.domain,
                self.id,
                skipped.join(", ")
            ));
        }
        Ok(kept)
    }

    /// The TLS policy toward the domain's hosts: `verify` under `enforce`, else `tls`.
    pub fn tls(&self, tls: TlsPolicy) -> TlsPolicy {
        if self.enforces() {
            TlsPolicy::Verify
        } else {
            tls
        }
    }

    /// Under `testing`, after a connection was made: warns when `enforce` would have
    /// refused it (no TLS, or a certificate that does not verify for the host's name).
    pub fn check(
        &self,
        conn: &Connection,
        connectors: &Connectors,
        transcript: &Option<Transcript>,
    ) {
        if self.policy.mode != Mode::Testing {
            return;
        }
        let why = match conn.tls_peer() {
            None => Some("no TLS".to_string()),
            Some((Verified::Pkix, _)) => None,
            Some((_, chain)) => connectors
                .check_chain(&chain, &server_name(conn.host_name(), conn.peer().ip()))
                .err()
                .map(|e| format!("certificate not verified: {e}")),
        };
        if let Some(why) = why {
            let line = format!(
                "MTA-STS policy for {} is testing: enforce would refuse {}: {why}",
                self.domain,
                conn.relay()
            );
            warn!("{line}");
            note(transcript, &line);
        }
    }
}

fn note(transcript: &Option<Transcript>, line: &str) {
    if let Some(t) = transcript {
        t(line);
    }
}

/// What the `_mta-sts` TXT lookup came to.
#[derive(Debug)]
pub enum Txt {
    Id(String),
    /// No `v=STSv1` record.
    Nothing,
    /// Records that do not parse, or several (RFC 8461 3.1: as none).
    Unusable(String),
    /// The lookup failed (SERVFAIL, timeout).
    Failed(String),
}

/// The MTA-STS machinery of the scheduler: lookups, fetches, the spool's cache.
pub struct Sts {
    shared: Arc<Shared>,
}

/// What [`Sts`] and its background fetches share.
struct Shared {
    resolver: Resolver,
    connectors: Arc<Connectors>,
    spool: Spool,
    /// Domain → the id whose fetch failed, and when.
    failed: Mutex<HashMap<String, (String, Instant)>>,
    /// Domains whose policy is being fetched now (one fetch per domain at a time).
    fetching: Mutex<HashSet<String>>,
}

impl fmt::Debug for Sts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Sts").finish_non_exhaustive()
    }
}

impl Sts {
    pub fn new(resolver: Resolver, connectors: Arc<Connectors>, spool: Spool) -> Sts {
        Sts {
            shared: Arc::new(Shared {
                resolver,
                connectors,
                spool,
                failed: Mutex::new(HashMap::new()),
                fetching: Mutex::new(HashSet::new()),
            }),
        }
    }

    /// The connectors the fetch verifies with (and `testing` checks connections with).
    pub fn connectors(&self) -> &Connectors {
        &self.shared.connectors
    }

    /// The policy in force for `domain` now, if any (see the module docs); logs and
    /// transcribes `MTA-STS policy for DOMAIN: mode=... id=... (cached|fetched)`.
    pub async fn decide(&self, domain: &str, transcript: &Option<Transcript>) -> Option<Decision> {
        let domain = domain.trim_end_matches('.').to_ascii_lowercase();
        if domain.starts_with('[')
            || domain.parse::<std::net::IpAddr>().is_ok()
            || !domain.contains('.')
        {
            return None; // an address literal or a bare name: no DNS, no policy
        }
        let txt = self.txt(&domain).await;
        let cached = self.cached(&domain).await;
        let (id, policy, source) = match (txt, cached) {
            (Txt::Id(id), Some((record, policy))) if id == record.id => {
                (id, policy, Source::Cached)
            }
            (Txt::Failed(e), Some((record, policy))) => {
                // RFC 8461 3.3: the TXT record is only a hint to refetch; without an answer
                // the cached policy holds.
                let line = format!(
                    "MTA-STS: TXT lookup for _mta-sts.{domain} failed: {e}; using the cached policy"
                );
                debug!("{line}");
                note(transcript, &line);
                (record.id, policy, Source::Cached)
            }
            (Txt::Nothing | Txt::Unusable(_), Some((record, policy))) => {
                (record.id, policy, Source::Cached)
            }
            (Txt::Id(id), cached) => match self.fetch(&domain, &id).await {
                Ok(policy) => (id, policy, Source::Fetched),
                Err(e) => {
                    let then = if cached.is_some() {
                        "using the cached policy"
                    } else {
                        "delivering as without MTA-STS"
                    };
                    let line = format!(
                        "MTA-STS policy for {domain} (id={id}) could not be fetched: {e}; {then}"
                    );
                    warn!("{line}");
                    note(transcript, &line);
                    let (record, policy) = cached?;
                    (record.id, policy, Source::Cached)
                }
            },
            (Txt::Failed(e), None) => {
                let line = format!(
                    "MTA-STS: TXT lookup for _mta-sts.{domain} failed: {e}; no cached policy, \
                     delivering as without MTA-STS"
                );
                debug!("{line}");
                note(transcript, &line);
                return None;
            }
            (Txt::Nothing | Txt::Unusable(_), None) => return None,
        };
        let decision = Decision {
            domain,
            id,
            policy,
            source,
        };
        let line = decision.line();
        info!("{line}");
        note(transcript, &line);
        Some(decision)
    }

    async fn txt(&self, domain: &str) -> Txt {
        lookup_txt(&self.shared.resolver, domain).await
    }

    /// The spool's unexpired policy for `domain`, parsed.
    async fn cached(&self, domain: &str) -> Option<(StsRecord, Policy)> {
        let spool = self.shared.spool.clone();
        let key = domain.to_string();
        let now = crate::scheduler::now_ms();
        let record = match tokio::task::spawn_blocking(move || spool.sts_get(&key, now)).await {
            Ok(Ok(r)) => r?,
            Ok(Err(e)) => {
                warn!("MTA-STS: cannot read the cached policy of {domain}: {e}");
                return None;
            }
            Err(_) => return None,
        };
        match parse_policy(&record.policy) {
            Ok(policy) => Some((record, policy)),
            Err(e) => {
                warn!("MTA-STS: the cached policy of {domain} does not parse: {e}");
                None
            }
        }
    }

    /// Fetches, parses and caches `domain`'s policy for `id`, waiting at most
    /// [`FETCH_WAIT`]: a fetch still going on then goes on in the background (up to
    /// [`FETCH_TIMEOUT`]) and caches the policy for later deliveries. One fetch per domain at
    /// a time: a delivery that finds one under way does not wait for it.
    async fn fetch(&self, domain: &str, id: &str) -> Result<Policy, String> {
        {
            let failed = self.shared.failed.lock().unwrap_or_else(|p| p.into_inner());
            if let Some((failed_id, at)) = failed.get(domain) {
                if failed_id == id && at.elapsed() < FETCH_RETRY {
                    return Err(format!(
                        "the last fetch failed less than {} s ago",
                        FETCH_RETRY.as_secs()
                    ));
                }
            }
        }
        {
            let mut fetching = self
                .shared
                .fetching
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            if !fetching.insert(domain.to_string()) {
                return Err("a fetch is under way".into());
            }
        }
        let shared = self.shared.clone();
        let (d, i) = (domain.to_string(), id.to_string());
        let task = tokio::spawn(async move {
            let _fetching = Fetching(&shared, &d);
            let result = fetch_policy(&shared.resolver, &shared.connectors, &d).await;
            shared.settle(&d, &i, result)
        });
        match tokio::time::timeout(FETCH_WAIT, task).await {
            Ok(Ok(result)) => result,
            Ok(Err(e)) => Err(format!("the fetch task failed: {e}")),
            Err(_) => Err(format!(
                "no policy within {} s (the fetch goes on in the background, at most {} s)",
                FETCH_WAIT.as_secs(),
                FETCH_TIMEOUT.as_secs()
            )),
        }
    }
}

/// Takes a domain off [`Shared::fetching`] when its fetch ends, however it ends.
struct Fetching<'a>(&'a Shared, &'a str);

impl Drop for Fetching<'_> {
    fn drop(&mut self) {
        let mut fetching = self.0.fetching.lock().unwrap_or_else(|p| p.into_inner());
        fetching.remove(self.1);
    }
}

impl Shared {
    /// A fetch's end: the policy cached in the spool, or the failure remembered.
    fn settle(
        &self,
        domain: &str,
        id: &str,
        result: Result<(String, Policy), String>,
    ) -> Result<Policy, String> {
        let mut failed = self.failed.lock().unwrap_or_else(|p| p.into_inner());
        match result {
            Ok((text, policy)) => {
                failed.remove(domain);
                drop(failed);
                let fetched_ms = crate::scheduler::now_ms();
                let record = StsRecord {
                    id: id.to_string(),
                    policy: text,
                    fetched_ms,
                    expires_ms: fetched_ms.saturating_add(policy.max_age.saturating_mul(1000)),
                };
                if !self.spool.sts_put(domain, &record) {
                    debug!("MTA-STS: the policy of {domain} is not stored in the spool");
                }
                Ok(policy)
            }
            Err(e) => {
                if failed.len() >= MAX_FAILED {
                    failed.clear();
                }
                failed.insert(domain.to_string(), (id.to_string(), Instant::now()));
                Err(e)
            }
        }
    }
}

/// The `_mta-sts.DOMAIN` TXT lookup through `resolver`, within [`TXT_TIMEOUT`] (also for
/// `doctor`).
pub async fn lookup_txt(resolver: &Resolver, domain: &str) -> Txt {
    let name = format!("_mta-sts.{domain}.");
    let lookup = resolver.dns().txt_lookup(name.as_str());
    let Ok(answer) = tokio::time::timeout(TXT_TIMEOUT, lookup).await else {
        return Txt::Failed(format!("no answer within {} s", TXT_TIMEOUT.as_secs()));
    };
    match answer {
        Ok(found) => {
            let texts: Vec<String> = found
                .iter()
                .map(|t| {
                    let bytes: Vec<u8> = t
                        .txt_data()
                        .iter()
                        .flat_map(|d| d.iter().copied())
                        .collect();
                    String::from_utf8_lossy(&bytes).into_owned()
                })
                .collect();
            match parse_txt(&texts) {
                Ok(Some(id)) => Txt::Id(id),
                Ok(None) => Txt::Nothing,
                Err(e) => {
                    warn!("MTA-STS: unusable TXT record {name}: {e}; treated as none");
                    Txt::Unusable(e)
                }
            }
        }
        Err(e) if e.is_no_records_found() => Txt::Nothing,
        Err(e) => Txt::Failed(e.to_string()),
    }
}

/// Fetches `https://mta-sts.DOMAIN/.well-known/mta-sts.txt` (see the module docs) within
/// [`FETCH_TIMEOUT`]: the policy text and its parse (also for `doctor`).
pub async fn fetch_policy(
    resolver: &Resolver,
    connectors: &Connectors,
    domain: &str,
) -> Result<(String, Policy), String> {
    let get = async {
        let host = format!("mta-sts.{domain}");
        let addrs = resolver
            .host_addrs(&host)
            .await
            .map_err(|e| e.to_string())?;
        let body = super::https::get(
            connectors.verifying(),
            &host,
            &addrs,
            443,
            POLICY_PATH,
            "text/plain",
            MAX_POLICY,
        )
        .await?;
        let text = String::from_utf8(body).map_err(|_| "the policy is not UTF-8".to_string())?;
        let policy = parse_policy(&text).map_err(|e| format!("bad policy: {e}"))?;
        Ok((text, policy))
    };
    match tokio::time::timeout(FETCH_TIMEOUT, get).await {
        Ok(r) => r,
        Err(_) => Err(format!("no policy within {} s", FETCH_TIMEOUT.as_secs())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn texts(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn txt_records_name_the_policy_id() {
        assert_eq!(
            parse_txt(&texts(&["v=STSv1; id=20160831085700Z;"])),
            Ok(Some("20160831085700Z".into()))
        );
        assert_eq!(
            parse_txt(&texts(&["v=spf1 -all", "v=STSv1;id=abc", "hello"])),
            Ok(Some("abc".into()))
        );
        // Extensions are ignored; spaces around the separators are allowed.
        assert_eq!(
            parse_txt(&texts(&["v=STSv1 ; ext=1 ;\tid=X1 ;"])),
            Ok(Some("X1".into()))
        );
        assert_eq!(parse_txt(&texts(&["v=spf1 -all"])), Ok(None));
        assert_eq!(parse_txt(&[]), Ok(None));
        assert!(parse_txt(&texts(&["v=STSv1; id=a;", "v=STSv1; id=b;"]))
            .unwrap_err()
            .contains("2 v=STSv1 records"));
        assert!(parse_txt(&texts(&["v=STSv1;"]))
            .unwrap_err()
            .contains("no id"));
        assert!(parse_txt(&texts(&["v=STSv1; id=not-alnum;"])).is_err());
        assert!(parse_txt(&texts(&[&format!("v=STSv1; id={};", "a".repeat(33))])).is_err());
        assert!(parse_txt(&texts(&["v=STSv1; id=a; id=b"])).is_err());
        assert!(parse_txt(&texts(&["v=STSv1; junk"])).is_err());
        // Not "v=STSv1;": not an STS record at all.
        assert_eq!(parse_txt(&texts(&["v=STSv10; id=a"])), Ok(None));
    }

    #[test]
    fn policies_parse() {
        let p = parse_policy(
            "version: STSv1\r\nmode: enforce\r\nmx: mail.example.com\r\nmx: *.Example.NET.\r\nmax_age: 86400\r\n",
        )
        .unwrap();
        assert_eq!(
            p,
            Policy {
                mode: Mode::Enforce,
                mx: vec!["mail.example.com".into(), "*.example.net".into()],
                max_age: 86400
            }
        );
        // LF line ends, any order, unknown fields, no final line end, the first of a field.
        let p = parse_policy(
            "mode: testing\nmax_age:604800\nfuture: thing\nversion: STSv1\nmx: a.test\nmode: enforce",
        )
        .unwrap();
        assert_eq!((p.mode, p.max_age, p.mx.len()), (Mode::Testing, 604800, 1));
        // none needs no mx; a max_age past the RFC's limit is cut to it.
        let p = parse_policy("version: STSv1\nmode: none\nmax_age: 9999999999\n").unwrap();
        assert_eq!((p.mode, p.max_age), (Mode::None, MAX_MAX_AGE));
    }

    #[test]
    fn bad_policies_are_refused_with_a_reason() {
        let bad = |text: &str, why: &str| {
            let e = parse_policy(text).unwrap_err();
            assert!(e.contains(why), "{text:?}: {e}");
        };
        bad("mode: enforce\nmx: a.test\nmax_age: 1\n", "no version");
        bad(
            "version: STSv2\nmode: enforce\nmx: a.test\nmax_age: 1\n",
            "not STSv1",
        );
        bad("version: STSv1\nmx: a.test\nmax_age: 1\n", "no mode");
        bad(
            "version: STSv1\nmode: strict\nmx: a.test\nmax_age: 1\n",
            "none of enforce",
        );
        bad("version: STSv1\nmode: enforce\nmx: a.test\n", "no max_age");
        bad(
            "version: STSv1\nmode: enforce\nmx: a.test\nmax_age: -1\n",
            "not 1 to 10 digits",
        );
        bad(
            "version: STSv1\nmode: enforce\nmx: a.test\nmax_age: 12345678901\n",
            "not 1 to 10 digits",
        );
        bad(
            "version: STSv1\nmode: enforce\nmax_age: 1\n",
            "without any mx",
        );
        bad(
            "version: STSv1\nmode: testing\nmx: a..test\nmax_age: 1\n",
            "not a host name pattern",
        );
        bad(
            "version: STSv1\nmode: testing\nmx: a.*.test\nmax_age: 1\n",
            "not a host name pattern",
        );
        bad(
            "version: STSv1\nmode: testing\nmx: *\nmax_age: 1\n",
            "not a host name pattern",
        );
        bad("<html>version: STSv1</html>\n", "no version");
        bad("version STSv1\n", "not key: value");
    }

    #[test]
    fn mx_patterns_match_exactly_or_one_leftmost_label() {
        assert!(mx_matches("mail.example.com", "mail.example.com"));
        assert!(mx_matches("mail.example.com", "MAIL.Example.com."));
        assert!(!mx_matches("mail.example.com", "mail2.example.com"));
        assert!(!mx_matches("mail.example.com", "x.mail.example.com"));
        assert!(mx_matches("*.example.com", "mx1.example.com"));
        assert!(mx_matches("*.example.com", "MX1.example.com."));
        assert!(!mx_matches("*.example.com", "example.com"));
        assert!(!mx_matches("*.example.com", "a.b.example.com"));
        assert!(!mx_matches("*.example.com", ".example.com"));
        assert!(!mx_matches("*.example.com", "mx1.example.com.evil"));
        assert!(!mx_matches("*.example.com", "mx1example.com"));
        let p = Policy {
            mode: Mode::Enforce,
            mx: vec!["mail.example.com".into(), "*.backup.example.net".into()],
            max_age: 1,
        };
        assert!(p.allows("mail.example.com") && p.allows("b1.backup.example.net"));
        assert!(!p.allows("evil.example.com"));
    }

    fn hop(name: &str) -> Hop {
        Hop {
            name: name.into(),
            preference: 10,
            addrs: vec!["127.0.0.1".parse().unwrap()],
            port: 25,
        }
    }

    fn decision(mode: Mode) -> Decision {
        Decision {
            domain: "example.com".into(),
            id: "1".into(),
            policy: Policy {
                mode,
                mx: vec!["*.example.com".into()],
                max_age: 60,
            },
            source: Source::Fetched,
        }
    }

    #[test]
    fn enforce_filters_hops_and_raises_tls_testing_and_none_do_not() {
        let hops = || vec![hop("mx1.example.com"), hop("mx.elsewhere.test")];
        let names = |h: Vec<Hop>| h.into_iter().map(|h| h.name).collect::<Vec<_>>();
        let enforce = decision(Mode::Enforce);
        assert_eq!(
            names(enforce.hops(hops(), &None).unwrap()),
            ["mx1.example.com"]
        );
        let e = enforce
            .hops(vec![hop("mx.elsewhere.test")], &None)
            .unwrap_err();
        assert!(
            e.contains("MTA-STS policy for example.com (mode=enforce id=1)"),
            "{e}"
        );
        assert!(e.contains("mx.elsewhere.test"), "{e}");
        assert_eq!(enforce.tls(TlsPolicy::May), TlsPolicy::Verify);
        assert_eq!(enforce.tls(TlsPolicy::None), TlsPolicy::Verify);
        for mode in [Mode::Testing, Mode::None] {
            let d = decision(mode);
            assert_eq!(d.hops(hops(), &None).unwrap().len(), 2);
            assert_eq!(d.tls(TlsPolicy::May), TlsPolicy::May);
        }
        assert_eq!(
            enforce.line(),
            "MTA-STS policy for example.com: mode=enforce id=1 (fetched)"
        );
    }
}
