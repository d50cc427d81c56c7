//! Recipient callout (`[[partner]] verify = "callout"`, Postfix's
//! `reject_unverified_recipient`, Exim's callouts with `defer_ok`): at RCPT, the partner's
//! primary is asked whether it would take the address, so a backup MX never accepts mail
//! for unknown users that it would later have to bounce to forged senders.
//!
//! The primary is the partner's next hops, as delivery finds them (`route`, or MX via
//! [`Resolver::next_hops`]), tried in order within [`TOTAL_TIMEOUT`]: greeting, `EHLO`,
//! `MAIL FROM:<>`, `RCPT TO:<address>`, `QUIT`. A `2xx` to RCPT accepts, a `5xx` refuses
//! with the primary's code, status and text ([`Verdict::Refuse`]); everything else (a `4xx`,
//! no hop reachable, a timeout, a refused null sender) accepts, as a backup MX must while
//! the primary is down, and is logged. Definite answers are cached for the partner's
//! `verify_positive_ttl` / `verify_negative_ttl` (7 days / 3 hours by default): in memory
//! (at most [`MAX_CACHED`] addresses) and in the spool ([`Spool::callout_put`], wall-clock
//! expiry), so they outlive a restart and a cached refusal still refuses while the primary
//! is down; the spool is asked on a miss in memory, before anything else. An answer holds
//! until the TTL in force when it came, and no longer than the TTL in force now (a reload
//! that shortens a TTL shortens the answers already cached). Concurrent lookups of one
//! address share one lookup (spool and callout); at most [`PER_PRIMARY`] callouts to one
//! partner run at once (a RCPT that cannot start its callout within the timeout is
//! accepted); a domain none of whose hops answered is not called again for [`DOWN_TTL`].

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::{OnceCell, Semaphore};
use tracing::{info, warn};

use crate::config::{Config, Partner};
use crate::delivery::mx::{Resolver, Route};
use crate::envelope::domain_of;
use crate::scheduler::now_ms;
use crate::spool::{CalloutAnswer, CalloutRefusal, Spool};

/// The whole callout, every hop included: the client's RCPT waits this long at most.
pub const TOTAL_TIMEOUT: Duration = Duration::from_secs(10);
/// One TCP connect.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// After no hop of a domain answered, its callouts are skipped (accepted) this long.
pub const DOWN_TTL: Duration = Duration::from_secs(60);
/// Cached addresses, at most.
pub const MAX_CACHED: usize = 100_000;
/// Callouts to one partner's primary at once, at most.
pub const PER_PRIMARY: usize = 8;

/// What RCPT does with an address after the callout.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Accept: the primary took it, or could not say.
    Accept,
    /// Refuse with this reply (`5xx`, the primary's code and status).
    Refuse(String),
}

/// Longest refusal text kept from the primary (it goes into our reply and the cache).
const MAX_TEXT: usize = 256;

/// What the primary said about one address.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Outcome {
    /// `2xx` to RCPT.
    Known,
    /// `5xx` to RCPT: code, enhanced status (if given), text.
    Unknown(CalloutRefusal),
    /// No definite answer (why, for the log).
    Undecided(String),
    /// No hop could be reached.
    Unreachable(String),
}

impl Outcome {
    fn of(answer: &CalloutAnswer) -> Outcome {
        match &answer.refused {
            None => Outcome::Known,
            Some(r) => Outcome::Unknown(r.clone()),
        }
    }
}

/// How long the answers about one partner's addresses hold (from its configuration).
#[derive(Clone, Copy, Debug)]
struct Ttls {
    positive: Duration,
    negative: Duration,
}

impl Ttls {
    fn of(config: &Config, domain: &str) -> Ttls {
        let (positive, negative) = config.partner(domain).map_or(
            (Partner::DEFAULT_POSITIVE_TTL, Partner::DEFAULT_NEGATIVE_TTL),
            |p| (p.positive_ttl(), p.negative_ttl()),
        );
        Ttls { positive, negative }
    }

    fn of_answer(&self, answer: &CalloutAnswer) -> Duration {
        if answer.refused.is_some() {
            self.negative
        } else {
            self.positive
        }
    }

    /// Whether `answer` still holds at `now_ms`: before its expiry, and within the TTL in
    /// force now.
    fn hold(&self, answer: &CalloutAnswer, now_ms: u64) -> bool {
        now_ms < answer.expires_ms
            && now_ms
                < answer
                    .answered_ms
                    .saturating_add(millis(self.of_answer(answer)))
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// The callout cache and the callouts in flight, shared by every session.
#[derive(Default)]
pub struct Callout {
    /// The first level of the cache (the spool's is the second): lower-cased address →
    /// answer.
    cache: Mutex<HashMap<String, CalloutAnswer>>,
    in_flight: Mutex<HashMap<String, Arc<OnceCell<Outcome>>>>,
    down: Mutex<HashMap<String, Instant>>,
    /// Per partner domain (only those with `verify`, so bounded by the configuration).
    per_primary: Mutex<HashMap<String, Arc<Semaphore>>>,
}

impl Callout {
    /// The verdict on `address` (its domain a partner with `verify = "callout"`); `spool`
    /// keeps the answers across restarts (`None`: in memory only).
    pub async fn verify(
        &self,
        config: &Config,
        resolver: &Resolver,
        spool: Option<&Spool>,
        address: &str,
    ) -> Verdict {
        let key = address.to_ascii_lowercase();
        let domain = domain_of(address);
        let ttls = Ttls::of(config, &domain);
        if let Some(hit) = self.cached(&key, ttls, now_ms()) {
            return verdict(address, &hit);
        }
        let cell = {
            let mut flights = self.in_flight.lock().unwrap_or_else(|p| p.into_inner());
            flights.entry(key.clone()).or_default().clone()
        };
        let outcome = cell
            .get_or_init(|| self.lookup(config, resolver, spool, ttls, &key, address))
            .await
            .clone();
        {
            let mut flights = self.in_flight.lock().unwrap_or_else(|p| p.into_inner());
            if flights.get(&key).is_some_and(|c| Arc::ptr_eq(c, &cell)) {
                flights.remove(&key);
            }
        }
        verdict(address, &outcome)
    }

    /// A miss in memory: the spool's answer, else a callout (unless the primary was just
    /// found unreachable), whose definite answer is kept in both.
    async fn lookup(
        &self,
        config: &Config,
        resolver: &Resolver,
        spool: Option<&Spool>,
        ttls: Ttls,
        key: &str,
        address: &str,
    ) -> Outcome {
        let domain = domain_of(address);
        if let Some(spool) = spool {
            if let Some(answer) = stored(spool, key).await {
                if ttls.hold(&answer, now_ms()) {
                    let outcome = Outcome::of(&answer);
                    self.keep(key, answer);
                    return outcome;
                }
            }
        }
        if self.is_down(&domain, Instant::now()) {
            info!("callout {address}: primary of {domain} recently unreachable, accepted");
            return Outcome::Undecided("primary recently unreachable".into());
        }
        let outcome = self.limited(config, resolver, &domain, address).await;
        match &outcome {
            Outcome::Known => info!("callout {address}: accepted by the primary"),
            Outcome::Unknown(r) => {
                info!(
                    "callout {address}: refused by the primary: {} {}",
                    r.code, r.text
                )
            }
            Outcome::Undecided(why) => {
                warn!("callout {address}: no answer from the primary ({why}): accepted")
            }
            Outcome::Unreachable(why) => {
                warn!("callout {address}: primary unreachable ({why}): accepted");
                self.mark_down(&domain);
            }
        }
        self.remember(spool, key, &outcome, ttls);
        outcome
    }

    /// [`ask`] within [`PER_PRIMARY`] and [`TOTAL_TIMEOUT`].
    async fn limited(
        &self,
        config: &Config,
        resolver: &Resolver,
        domain: &str,
        address: &str,
    ) -> Outcome {
        let deadline = tokio::time::Instant::now() + TOTAL_TIMEOUT;
        let limit = {
            let mut map = self.per_primary.lock().unwrap_or_else(|p| p.into_inner());
            map.entry(domain.to_string())
                .or_insert_with(|| Arc::new(Semaphore::new(PER_PRIMARY)))
                .clone()
        };
        let Ok(Ok(permit)) = tokio::time::timeout_at(deadline, limit.acquire_owned()).await else {
            return Outcome::Undecided(format!(
                "{PER_PRIMARY} callouts to the primary already running"
            ));
        };
        let outcome = tokio::time::timeout_at(deadline, ask(config, resolver, domain, address))
            .await
            .unwrap_or_else(|_| {
                Outcome::Unreachable(format!("no answer within {TOTAL_TIMEOUT:?}"))
            });
        drop(permit);
        outcome
    }

    /// The answer in memory about `key`, if it holds at `now_ms`.
    fn cached(&self, key: &str, ttls: Ttls, now_ms: u64) -> Option<Outcome> {
        let cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        cache
            .get(key)
            .filter(|a| ttls.hold(a, now_ms))
            .map(Outcome::of)
    }

    /// Keeps a definite outcome, answered now, in memory and in `spool`.
    fn remember(&self, spool: Option<&Spool>, key: &str, outcome: &Outcome, ttls: Ttls) {
        let (ttl, refused) = match outcome {
            Outcome::Known => (ttls.positive, None),
            Outcome::Unknown(r) => (ttls.negative, Some(r.clone())),
            _ => return,
        };
        let now = now_ms();
        let answer = CalloutAnswer {
            answered_ms: now,
            expires_ms: now.saturating_add(millis(ttl)),
            refused,
        };
        if let Some(spool) = spool {
            spool.callout_put(key, &answer);
        }
        self.keep(key, answer);
    }

    /// Puts `answer` in memory (at most [`MAX_CACHED`]: the expired go first, then any).
    fn keep(&self, key: &str, answer: CalloutAnswer) {
        let now = now_ms();
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        if cache.len() >= MAX_CACHED {
            cache.retain(|_, a| a.expires_ms > now);
            if cache.len() >= MAX_CACHED {
                if let Some(k) = cache.keys().next().cloned() {
                    cache.remove(&k);
                }
            }
        }
        cache.insert(key.to_string(), answer);
    }

    fn is_down(&self, domain: &str, now: Instant) -> bool {
        let down = self.down.lock().unwrap_or_else(|p| p.into_inner());
        down.get(domain).is_some_and(|until| *until > now)
    }

    fn mark_down(&self, domain: &str) {
        let now = Instant::now();
        let mut down = self.down.lock().unwrap_or_else(|p| p.into_inner());
        down.retain(|_, until| *until > now);
        if down.len() < MAX_CACHED {
            down.insert(domain.to_string(), now + DOWN_TTL);
        }
    }
}

/// The spool's answer about `key` that has not expired (read on a blocking thread; a
/// failure is logged and is no answer).
async fn stored(spool: &Spool, key: &str) -> Option<CalloutAnswer> {
    let (spool, key2) = (spool.clone(), key.to_string());
    match tokio::task::spawn_blocking(move || spool.callout_get(&key2, now_ms())).await {
        Ok(Ok(answer)) => answer,
        Ok(Err(e)) => {
            warn!("callout {key}: cannot read the cached answer in the spool: {e}");
            None
        }
        Err(e) => {
            warn!("callout {key}: spool read task failed: {e}");
            None
        }
    }
}

/// The RCPT verdict for an outcome.
fn verdict(address: &str, outcome: &Outcome) -> Verdict {
    match outcome {
        Outcome::Unknown(r) => {
            Verdict::Refuse(refusal(address, r.code, r.status.as_deref(), &r.text))
        }
        _ => Verdict::Accept,
    }
}

/// The reply to a RCPT the primary refused: its code and status (`5.1.1` when it gave none),
/// and what it said.
pub fn refusal(address: &str, code: u16, status: Option<&str>, text: &str) -> String {
    let status = status.unwrap_or("5.1.1");
    let clean = |s: &str| -> String {
        s.chars()
            .map(|c| if c.is_control() { '?' } else { c })
            .take(MAX_TEXT)
            .collect()
    };
    format!(
        "{code} {status} <{}>: Recipient address rejected: undeliverable address: {}",
        clean(address),
        clean(text)
    )
}

/// What the primary of `address`'s domain says of it, asked now (no cache, within
/// [`TOTAL_TIMEOUT`]), for `mxspool doctor`: `Ok(Accept)` or `Ok(Refuse(reply))` for a
/// definite answer, `Err(why)` for none (the callout would accept then).
pub async fn probe(config: &Config, resolver: &Resolver, address: &str) -> Result<Verdict, String> {
    let domain = domain_of(address);
    let outcome = tokio::time::timeout(TOTAL_TIMEOUT, ask(config, resolver, &domain, address))
        .await
        .unwrap_or_else(|_| Outcome::Unreachable(format!("no answer within {TOTAL_TIMEOUT:?}")));
    match outcome {
        Outcome::Undecided(why) | Outcome::Unreachable(why) => Err(why),
        definite => Ok(verdict(address, &definite)),
    }
}

/// Asks the primary of `domain` about `address` (no time limit of its own: see
/// [`Callout::limited`]).
async fn ask(config: &Config, resolver: &Resolver, domain: &str, address: &str) -> Outcome {
    let route = config
        .partner(domain)
        .map(|p| p.route.clone())
        .unwrap_or_default();
    let hops = match resolver.next_hops(domain, &route).await {
        Ok(Route::Hops(hops)) => hops,
        Ok(Route::NullMx) => return Outcome::Undecided(format!("{domain} has a null MX")),
        Ok(Route::SelfOnly { .. }) => {
            return Outcome::Undecided(format!("this server is the best MX of {domain}"))
        }
        Err(e) => return Outcome::Unreachable(e.to_string()),
    };
    let mut failures = Vec::new();
    for hop in &hops {
        for ip in &hop.addrs {
            let target = std::net::SocketAddr::new(*ip, hop.port);
            match dialog(config, target, address).await {
                Ok(outcome) => return outcome,
                Err(e) => failures.push(format!("{}[{ip}]:{}: {e}", hop.name, hop.port)),
            }
        }
    }
    Outcome::Unreachable(failures.join("; "))
}

/// One reply: its code, and its lines' text (after the code).
struct Reply {
    code: u16,
    text: String,
}

/// The SMTP dialog with one primary. `Err`: this hop gave nothing usable, try the next.
async fn dialog(
    config: &Config,
    target: std::net::SocketAddr,
    address: &str,
) -> Result<Outcome, String> {
    let stream = connect(config, target).await?;
    let (r, mut w) = stream.into_split();
    let mut r = BufReader::new(r);
    let greeting = read_reply(&mut r).await?;
    if greeting.code != 220 {
        return Err(format!("greeting {} {}", greeting.code, greeting.text));
    }
    let mut say = async |line: String, r: &mut BufReader<_>| -> Result<Reply, String> {
        w.write_all(line.as_bytes())
            .await
            .map_err(|e| format!("write: {e}"))?;
        read_reply(r).await
    };
    let ehlo = say(format!("EHLO {}\r\n", config.hostname), &mut r).await?;
    let smtputf8 = ehlo.code == 250
        && ehlo
            .text
            .split_ascii_whitespace()
            .any(|w| w.eq_ignore_ascii_case("SMTPUTF8"));
    if ehlo.code != 250 {
        let helo = say(format!("HELO {}\r\n", config.hostname), &mut r).await?;
        if helo.code != 250 {
            return Err(format!("HELO: {} {}", helo.code, helo.text));
        }
    }
    // A non-ASCII address needs SMTPUTF8 (RFC 6531): without it the primary's refusal
    // would say nothing about the user.
    let mail = if address.is_ascii() {
        "MAIL FROM:<>\r\n"
    } else if smtputf8 {
        "MAIL FROM:<> SMTPUTF8\r\n"
    } else {
        let _ = say("QUIT\r\n".into(), &mut r).await;
        return Ok(Outcome::Undecided(
            "the primary does not offer SMTPUTF8 for a non-ASCII address".into(),
        ));
    };
    let mail = say(mail.into(), &mut r).await?;
    if mail.code != 250 {
        let _ = say("QUIT\r\n".into(), &mut r).await;
        return Ok(Outcome::Undecided(format!(
            "MAIL FROM:<> got {} {}",
            mail.code, mail.text
        )));
    }
    let rcpt = say(format!("RCPT TO:<{address}>\r\n"), &mut r).await?;
    let _ = say("QUIT\r\n".into(), &mut r).await;
    Ok(match rcpt.code {
        200..=299 => Outcome::Known,
        500..=599 => {
            let (status, text) = split_status(&rcpt.text);
            Outcome::Unknown(CalloutRefusal {
                code: rcpt.code,
                status,
                text: text.chars().take(MAX_TEXT).collect(),
            })
        }
        code => Outcome::Undecided(format!("RCPT TO got {code} {}", rcpt.text)),
    })
}

async fn connect(config: &Config, target: std::net::SocketAddr) -> Result<TcpStream, String> {
    let socket = if target.is_ipv4() {
        TcpSocket::new_v4()
    } else {
        TcpSocket::new_v6()
    }
    .map_err(|e| format!("socket: {e}"))?;
    if let Some(bind) = config.delivery.bind_address {
        if bind.is_ipv4() == target.is_ipv4() {
            socket
                .bind(std::net::SocketAddr::new(bind, 0))
                .map_err(|e| format!("bind {bind}: {e}"))?;
        }
    }
    match tokio::time::timeout(CONNECT_TIMEOUT, socket.connect(target)).await {
        Ok(Ok(s)) => Ok(s),
        Ok(Err(e)) => Err(format!("connect: {e}")),
        Err(_) => Err(format!("connect: no answer within {CONNECT_TIMEOUT:?}")),
    }
}

/// Reads one (possibly multi-line) reply; at most 100 lines of 1000 bytes.
async fn read_reply<R: tokio::io::AsyncBufRead + Unpin>(r: &mut R) -> Result<Reply, String> {
    let mut text = Vec::new();
    for _ in 0..100 {
        let mut line = Vec::new();
        let n = (&mut *r)
            .take(1000)
            .read_until(b'\n', &mut line)
            .await
            .map_err(|e| format!("read: {e}"))?;
        if n == 0 {
            return Err("connection closed".into());
        }
        let line = String::from_utf8_lossy(&line);
        let line = line.trim_end_matches(['\r', '\n']);
        let (code, sep, rest) =
            parse_reply_line(line).ok_or_else(|| format!("bad reply {line:?}"))?;
        text.push(rest.to_string());
        if sep != '-' {
            return Ok(Reply {
                code,
                text: text.join(" "),
            });
        }
    }
    Err("reply too long".into())
}

/// `"250-PIPELINING"` → (250, '-', "PIPELINING").
fn parse_reply_line(line: &str) -> Option<(u16, char, &str)> {
    let code = line
        .get(..3)?
        .parse::<u16>()
        .ok()
        .filter(|c| (200..600).contains(c))?;
    let sep = line[3..].chars().next().unwrap_or(' ');
    let rest = line.get(4..).unwrap_or("");
    Some((code, sep, rest))
}

/// `"5.1.1 <u@x>: User unknown"` → (Some("5.1.1"), "<u@x>: User unknown").
fn split_status(text: &str) -> (Option<String>, String) {
    if let Some((first, rest)) = text.split_once(' ') {
        let parts: Vec<&str> = first.split('.').collect();
        if parts.len() == 3
            && parts[0] == "5"
            && parts
                .iter()
                .all(|p| !p.is_empty() && p.len() <= 3 && p.bytes().all(|b| b.is_ascii_digit()))
        {
            return (Some(first.to_string()), rest.to_string());
        }
    }
    (None, text.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_and_statuses() {
        assert_eq!(
            parse_reply_line("250-PIPELINING"),
            Some((250, '-', "PIPELINING"))
        );
        assert_eq!(
            parse_reply_line("550 5.1.1 no"),
            Some((550, ' ', "5.1.1 no"))
        );
        assert_eq!(parse_reply_line("250"), Some((250, ' ', "")));
        assert_eq!(parse_reply_line("hello"), None);
        assert_eq!(parse_reply_line("999 x"), None);
        assert_eq!(
            split_status("5.1.1 <u@x>: User unknown"),
            (Some("5.1.1".into()), "<u@x>: User unknown".into())
        );
        assert_eq!(split_status("User unknown"), (None, "User unknown".into()));
        assert_eq!(split_status("4.1.1 later"), (None, "4.1.1 later".into()));
        assert_eq!(
            refusal("u@example.com", 550, Some("5.1.1"), "<u@example.com>: User unknown\r"),
            "550 5.1.1 <u@example.com>: Recipient address rejected: undeliverable address: <u@example.com>: User unknown?"
        );
        assert!(refusal("u@x", 553, None, "no").starts_with("553 5.1.1 <u@x>:"));
    }

    fn no() -> Outcome {
        Outcome::Unknown(CalloutRefusal {
            code: 550,
            status: None,
            text: "no".into(),
        })
    }

    #[test]
    fn answers_are_cached_by_kind_for_the_ttls_in_force() {
        let c = Callout::default();
        let ttls = Ttls {
            positive: Duration::from_secs(7 * 86_400),
            negative: Duration::from_secs(3 * 3600),
        };
        let now = now_ms();
        let secs = |n: u64| now + n * 1000;
        c.remember(None, "a@x", &Outcome::Known, ttls);
        c.remember(None, "b@x", &no(), ttls);
        c.remember(None, "c@x", &Outcome::Undecided("451".into()), ttls);
        c.remember(None, "d@x", &Outcome::Unreachable("down".into()), ttls);
        assert_eq!(c.cached("a@x", ttls, now), Some(Outcome::Known));
        assert_eq!(c.cached("b@x", ttls, now), Some(no()));
        assert_eq!(c.cached("c@x", ttls, now), None);
        assert_eq!(c.cached("d@x", ttls, now), None);
        assert_eq!(c.cached("b@x", ttls, secs(3 * 3600 + 1)), None);
        assert_eq!(
            c.cached("a@x", ttls, secs(3 * 3600 + 1)),
            Some(Outcome::Known)
        );
        assert_eq!(c.cached("a@x", ttls, secs(7 * 86_400 + 1)), None);
        // A reload that shortens a TTL shortens what is cached; one that lengthens it
        // does not lengthen it.
        let short = Ttls {
            positive: Duration::from_secs(60),
            negative: Duration::from_secs(60),
        };
        assert_eq!(c.cached("b@x", short, secs(61)), None);
        assert_eq!(c.cached("a@x", short, secs(61)), None);
        let long = Ttls {
            positive: Duration::from_secs(30 * 86_400),
            negative: Duration::from_secs(86_400),
        };
        assert_eq!(c.cached("b@x", long, secs(3 * 3600 + 1)), None);
        let at = Instant::now();
        c.mark_down("x");
        assert!(c.is_down("x", at));
        assert!(!c.is_down("x", at + DOWN_TTL + Duration::from_secs(1)));
    }

    /// A primary on 127.0.0.1 that greets after a delay and knows only `alice`; counts its
    /// connections.
    async fn fake_primary() -> (
        u16,
        Arc<std::sync::atomic::AtomicUsize>,
        Arc<std::sync::atomic::AtomicUsize>,
    ) {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let active = Arc::new(AtomicUsize::new(0));
        let most = Arc::new(AtomicUsize::new(0));
        let (active2, most2) = (active.clone(), most.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let count = Arc::new(AtomicUsize::new(0));
        let seen = count.clone();
        tokio::spawn(async move {
            while let Ok((s, _)) = listener.accept().await {
                seen.fetch_add(1, Ordering::SeqCst);
                let now = active2.fetch_add(1, Ordering::SeqCst) + 1;
                most2.fetch_max(now, Ordering::SeqCst);
                let active3 = active2.clone();
                tokio::spawn(async move {
                    let _done = Done(active3);
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    let (r, mut w) = s.into_split();
                    let mut lines = BufReader::new(r).lines();
                    let _ = w.write_all(b"220 primary ESMTP\r\n").await;
                    while let Ok(Some(l)) = lines.next_line().await {
                        let l = l.to_ascii_lowercase();
                        let reply: &[u8] = if l.starts_with("ehlo") {
                            b"250-primary\r\n250 PIPELINING\r\n"
                        } else if l.starts_with("rcpt") && !l.contains("<alice@") {
                            b"550 5.1.1 User unknown\r\n"
                        } else if l.starts_with("quit") {
                            let _ = w.write_all(b"221 bye\r\n").await;
                            break;
                        } else {
                            b"250 ok\r\n"
                        };
                        let _ = w.write_all(reply).await;
                    }
                });
            }
        });
        (port, count, most)
    }

    /// Lowers the fake primary's count of open sessions when one ends.
    struct Done(Arc<std::sync::atomic::AtomicUsize>);

    impl Drop for Done {
        fn drop(&mut self) {
            self.0.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
        }
    }

    /// The backup MX of `example.com`, verified with the fake primary on `port`.
    fn config_for(port: u16) -> Config {
        Config::parse(&format!(
            "hostname = \"mx2.test\"\nspool = \"/x\"\n[delivery]\nnameservers = [\"127.0.0.1:9\"]\n\
             [[partner]]\ndomain = \"example.com\"\nroute = [\"127.0.0.1:{port}\"]\nverify = \"callout\"\n"
        ))
        .unwrap()
    }

    #[tokio::test]
    async fn concurrent_lookups_of_one_address_share_one_callout() {
        use std::sync::atomic::Ordering;
        let (port, count, most) = fake_primary().await;
        let config = config_for(port);
        let resolver = Resolver::new(&config).unwrap();
        let callout = Arc::new(Callout::default());
        let mut tasks = Vec::new();
        for _ in 0..5 {
            let (callout, config, resolver) = (callout.clone(), config.clone(), resolver.clone());
            tasks.push(tokio::spawn(async move {
                callout
                    .verify(&config, &resolver, None, "alice@example.com")
                    .await
            }));
        }
        for t in tasks {
            assert_eq!(t.await.unwrap(), Verdict::Accept);
        }
        assert_eq!(count.load(Ordering::SeqCst), 1);
        let v = callout
            .verify(&config, &resolver, None, "bob@example.com")
            .await;
        assert_eq!(
            v,
            Verdict::Refuse(
                "550 5.1.1 <bob@example.com>: Recipient address rejected: undeliverable address: User unknown".into()
            )
        );
        assert_eq!(count.load(Ordering::SeqCst), 2);
        // Cached both ways.
        assert_eq!(
            callout
                .verify(&config, &resolver, None, "ALICE@example.com")
                .await,
            Verdict::Accept
        );
        assert!(matches!(
            callout
                .verify(&config, &resolver, None, "bob@example.com")
                .await,
            Verdict::Refuse(_)
        ));
        assert_eq!(count.load(Ordering::SeqCst), 2);

        // A non-ASCII address to a primary without SMTPUTF8: no refusal from it.
        assert_eq!(
            callout
                .verify(&config, &resolver, None, "jörg@example.com")
                .await,
            Verdict::Accept
        );
        assert_eq!(count.load(Ordering::SeqCst), 3);

        // Many addresses at once: at most PER_PRIMARY sessions to the primary together.
        let mut tasks = Vec::new();
        for i in 0..(3 * PER_PRIMARY) {
            let (callout, config, resolver) = (callout.clone(), config.clone(), resolver.clone());
            tasks.push(tokio::spawn(async move {
                callout
                    .verify(&config, &resolver, None, &format!("user{i}@example.com"))
                    .await
            }));
        }
        for t in tasks {
            assert!(matches!(t.await.unwrap(), Verdict::Refuse(_)));
        }
        assert_eq!(count.load(Ordering::SeqCst), 3 + 3 * PER_PRIMARY);
        assert!(most.load(Ordering::SeqCst) <= PER_PRIMARY, "{most:?}");
    }

    #[tokio::test]
    async fn answers_in_the_spool_outlive_the_memory_and_a_primary_down() {
        use std::sync::atomic::Ordering;
        let (port, count, _) = fake_primary().await;
        let config = config_for(port);
        let dir = tempfile::tempdir().unwrap();
        let env = (
            Resolver::new(&config).unwrap(),
            Spool::open(dir.path()).unwrap(),
            config,
        );
        async fn ask(c: &Callout, env: &(Resolver, Spool, Config), a: &str) -> Verdict {
            c.verify(&env.2, &env.0, Some(&env.1), a).await
        }
        let first = Callout::default();
        assert_eq!(
            ask(&first, &env, "alice@example.com").await,
            Verdict::Accept
        );
        assert!(matches!(
            ask(&first, &env, "bob@example.com").await,
            Verdict::Refuse(_)
        ));
        assert_eq!(count.load(Ordering::SeqCst), 2);
        // The cache writes are not waited for; this commit comes after them.
        env.1
            .commit(crate::spool::Batch::new().lazy())
            .await
            .unwrap();
        // As after a restart: nothing in memory, the primary marked down.
        let second = Callout::default();
        second.mark_down("example.com");
        let refused = ask(&second, &env, "BOB@example.com").await;
        assert_eq!(
            refused,
            Verdict::Refuse(
                "550 5.1.1 <BOB@example.com>: Recipient address rejected: undeliverable address: User unknown".into()
            )
        );
        assert_eq!(
            ask(&second, &env, "alice@example.com").await,
            Verdict::Accept
        );
        assert_eq!(count.load(Ordering::SeqCst), 2);
        // Now in memory too.
        assert_eq!(
            second.cached("bob@example.com", Ttls::of(&env.2, "example.com"), now_ms()),
            Some(Outcome::Unknown(CalloutRefusal {
                code: 550,
                status: Some("5.1.1".into()),
                text: "User unknown".into()
            }))
        );
        // Uncached, primary marked down: accepted without a callout.
        assert_eq!(
            ask(&second, &env, "carol@example.com").await,
            Verdict::Accept
        );
        assert_eq!(count.load(Ordering::SeqCst), 2);
        // A reopened spool still has them.
        drop(env);
        let spool = Spool::open(dir.path()).unwrap();
        assert!(spool
            .callout_get("bob@example.com", now_ms())
            .unwrap()
            .is_some_and(|a| a.refused.is_some()));
    }
}
