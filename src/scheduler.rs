//! The queue runner: takes due work from the spool's due index, delivers it per destination
//! domain over as few connections as possible, and records every outcome in the spool.
//!
//! Nothing is kept only in memory: what is due is read from the spool's `due` index, so a
//! restart resumes the schedule. In memory there is only the set of entries in flight (so
//! an entry is never picked twice) and the count of connections per domain.
//!
//! Per message and domain an attempt ends in [`settle`]: delivered and permanently failed
//! recipients leave the queue, the rest wait `retry_interval` (with jitter), a message older
//! than `max_lifetime` bounces, and one older than `delay_warning` gets a delay warning once.
//! DSNs are enqueued in the same atomic commit that records the attempt.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rand::Rng;
use tokio::sync::{watch, Notify, Semaphore};
use tracing::{error, info, warn};

use crate::config::{Config, Transport};
use crate::delivery::client::{ClientConfig, Connection, LmtpTarget, Outgoing, RcptResult};
use crate::delivery::link::{Link, MaildirTarget};
use crate::delivery::mx::{ResolveError, Resolver, Route};
use crate::delivery::{Reply, Transcript};
use crate::dsn::{self, Action, Dsn, DsnRecipient};
use crate::envelope::{Body, Envelope, RcptState, Recipient};
use crate::ops::live::Live;
use crate::spool::{Batch, DueCursor, QueueEntry, Spool, StoredEnvelope};

/// Entries handed to one delivery task at most (one connection, RSET between messages).
const MAX_PER_CONNECTION: usize = 200;
/// How often the due index is looked at when nothing wakes the runner earlier.
const TICK: Duration = Duration::from_secs(1);
/// The shortest time between two looks at the due index when woken.
const MIN_GAP: Duration = Duration::from_millis(20);

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// What happened to one recipient in one attempt. `relay` (`host[ip]:port`) is set when
/// `reason` is the reply of that remote server; otherwise `reason` is our own words.
#[derive(Clone, Debug)]
pub enum Outcome {
    Sent {
        reply: Reply,
        relay: String,
    },
    Deferred {
        reason: String,
        status: String,
        relay: Option<String>,
    },
    Failed {
        reason: String,
        status: String,
        relay: Option<String>,
    },
}

/// How an outcome reads in the log and in `last_error`.
fn describe(reason: &str, relay: &Option<String>) -> String {
    match relay {
        Some(r) => format!("host {r} said: {reason}"),
        None => reason.to_string(),
    }
}

/// The host name of a `host[ip]:port` relay, for a DSN's `Remote-MTA`.
fn remote_host(relay: &Option<String>) -> Option<String> {
    relay
        .as_deref()
        .map(|r| r.split('[').next().unwrap_or(r).to_string())
}

/// What sending one entry over a connection came to.
enum Sent {
    /// Sent (or refused): the per-recipient outcomes, to be recorded.
    Done {
        entry: QueueEntry,
        message: Vec<u8>,
        outcomes: Vec<Outcome>,
        /// A success after earlier failures: the primary is back.
        recovered: bool,
    },
    /// Not sent and still queued (held, or unreadable).
    Kept,
    /// No longer in the queue.
    Gone,
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

fn to_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The queue runner.
pub struct Scheduler {
    /// The configuration in force: see [`Scheduler::config`].
    live: Arc<Live>,
    spool: Spool,
    resolver: Resolver,
    client: ClientConfig,
    in_flight: Mutex<HashSet<(String, String)>>,
    per_domain: Mutex<HashMap<String, usize>>,
    /// Domains whose primary answered again: their whole queue is due now.
    recovered: Mutex<HashSet<String>>,
    /// Where the last look at the due index stopped, and when it last started from the
    /// front: between full scans (one a `TICK`) a wake-up reads only what came after, so a
    /// busy server does not re-read the entries it is already delivering.
    cursor: Mutex<(Option<DueCursor>, std::time::Instant)>,
    deliveries: Arc<Semaphore>,
    wake: Notify,
}

/// Releases a domain's connection slot when a delivery task ends.
struct DomainSlot<'a> {
    scheduler: &'a Scheduler,
    domain: String,
}

impl Drop for DomainSlot<'_> {
    fn drop(&mut self) {
        {
            let mut map = lock(&self.scheduler.per_domain);
            if let Some(n) = map.get_mut(&self.domain) {
                *n -= 1;
                if *n == 0 {
                    map.remove(&self.domain);
                }
            }
        }
        // A connection slot is free: look for work now, not at the next tick.
        self.scheduler.wake();
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Scheduler {
    pub fn new(live: Arc<Live>, spool: Spool) -> anyhow::Result<Arc<Scheduler>> {
        let config = live.config();
        let resolver = Resolver::new(&config)?;
        let client = ClientConfig {
            helo_name: config.hostname.clone(),
            connect_timeout: config.delivery.connect_timeout.0,
            timeouts: Default::default(),
            bind: config.delivery.bind_address,
        };
        Ok(Arc::new(Scheduler {
            deliveries: Arc::new(Semaphore::new(config.queue.max_deliveries)),
            live,
            spool,
            resolver,
            client,
            in_flight: Mutex::new(HashSet::new()),
            per_domain: Mutex::new(HashMap::new()),
            recovered: Mutex::new(HashSet::new()),
            cursor: Mutex::new((None, std::time::Instant::now())),
            wake: Notify::new(),
        }))
    }

    /// The configuration in force now (a reload swaps it; the resolver, the client settings
    /// and the delivery limit are the start's).
    fn config(&self) -> Arc<Config> {
        self.live.config()
    }

    /// Look at the due index now rather than at the next tick.
    pub fn wake(&self) {
        self.wake.notify_one();
    }

    /// Run until `shutdown` turns true.
    pub async fn run(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        loop {
            let started = tokio::time::Instant::now();
            if let Err(e) = self.clone().dispatch().await {
                error!("queue runner: {e}");
            }
            let woken = tokio::select! {
                _ = shutdown.wait_for(|s| *s) => return,
                _ = self.wake.notified() => true,
                _ = tokio::time::sleep(TICK) => false,
            };
            if woken {
                // Under a stream of new mail every message wakes the runner: look at the
                // due index at most every MIN_GAP, taking what came meanwhile at once.
                tokio::time::sleep_until(started + MIN_GAP).await;
            }
        }
    }

    /// Start delivery tasks for what is due, within the concurrency limits.
    async fn dispatch(self: Arc<Self>) -> anyhow::Result<()> {
        let in_flight = lock(&self.in_flight).len();
        let spool = self.spool.clone();
        let now = now_ms();
        let after = {
            let mut c = lock(&self.cursor);
            if c.1.elapsed() >= TICK {
                // A full scan now and then: entries committed out of time order, or made due
                // again behind the cursor, are not missed for long.
                *c = (None, std::time::Instant::now());
            }
            c.0.clone()
        };
        let limit = if after.is_some() {
            2000
        } else {
            in_flight + 2000
        };
        let (due, cursor) =
            tokio::task::spawn_blocking(move || spool.due_after(now, after.as_ref(), limit))
                .await??;
        if cursor.is_some() {
            lock(&self.cursor).0 = cursor;
        }
        // Group by domain, in due order, leaving out what is already being delivered.
        let mut by_domain: Vec<(String, Vec<String>)> = Vec::new();
        {
            let flying = lock(&self.in_flight);
            for (domain, id) in due {
                if flying.contains(&(domain.clone(), id.clone())) {
                    continue;
                }
                match by_domain.iter_mut().find(|(d, _)| *d == domain) {
                    Some((_, ids)) => ids.push(id),
                    None => by_domain.push((domain, vec![id])),
                }
            }
        }
        // A domain whose primary is back: everything of it is due, whatever its schedule.
        let recovered: Vec<String> = lock(&self.recovered).iter().cloned().collect();
        for domain in recovered {
            let free = self.free_connections(&domain);
            if free == 0 {
                continue;
            }
            let ids = self
                .claim_some(&domain, false, free * MAX_PER_CONNECTION)
                .await;
            if ids.is_empty() {
                lock(&self.recovered).remove(&domain);
                continue;
            }
            let per_task = ids.len().div_ceil(free).clamp(1, MAX_PER_CONNECTION);
            for chunk in ids.chunks(per_task) {
                if !self.spawn_delivery(&domain, chunk.to_vec()) {
                    for id in chunk {
                        self.release(&domain, id);
                    }
                }
            }
        }
        for (domain, ids) in by_domain {
            let free = self.free_connections(&domain);
            if free == 0 {
                continue;
            }
            let per_task = ids.len().div_ceil(free).clamp(1, MAX_PER_CONNECTION);
            for chunk in ids.chunks(per_task).take(free) {
                // Claimed only if nobody claimed it since the scan (a recovered domain's
                // sweep above, an ETRN, a flush): never two deliveries of one entry.
                let chunk: Vec<String> = {
                    let mut flying = lock(&self.in_flight);
                    chunk
                        .iter()
                        .filter(|id| flying.insert((domain.clone(), (*id).clone())))
                        .cloned()
                        .collect()
                };
                if chunk.is_empty() {
                    continue;
                }
                if !self.spawn_delivery(&domain, chunk.clone()) {
                    for id in &chunk {
                        self.release(&domain, id);
                    }
                    return Ok(());
                }
            }
        }
        Ok(())
    }

    /// Deliveries `domain` may still start under its concurrency limit
    /// ([`Config::domain_concurrency`]).
    fn free_connections(&self, domain: &str) -> usize {
        let active = lock(&self.per_domain).get(domain).copied().unwrap_or(0);
        self.config()
            .domain_concurrency(domain)
            .saturating_sub(active)
    }

    /// Start a delivery task for `ids` (already in flight) within `max_deliveries`;
    /// false when no delivery slot is free.
    fn spawn_delivery(self: &Arc<Self>, domain: &str, ids: Vec<String>) -> bool {
        let Ok(permit) = self.deliveries.clone().try_acquire_owned() else {
            return false;
        };
        *lock(&self.per_domain)
            .entry(domain.to_string())
            .or_insert(0) += 1;
        let me = self.clone();
        let domain = domain.to_string();
        tokio::spawn(async move {
            let _permit = permit;
            let _slot = DomainSlot {
                scheduler: &me,
                domain: domain.clone(),
            };
            me.deliver_domain(&domain, ids, None, false).await;
        });
        true
    }

    /// Deliver `domain`'s queue now, whatever its schedule: an administrator's `flush`
    /// (`force`: held entries too) or a remote ETRN (held entries stay). Waits for the
    /// delivery; returns `(entries tried, entries still queued)`.
    pub async fn flush_domain(
        self: &Arc<Self>,
        domain: &str,
        transcript: Option<Transcript>,
        force: bool,
    ) -> (usize, usize) {
        let ids = self.claim_domain(domain, force).await;
        if ids.is_empty() {
            return (0, 0);
        }
        let n = ids.len();
        // One connection when someone reads the transcript; else the domain's share.
        let conns = if transcript.is_some() {
            1
        } else {
            self.config().domain_concurrency(domain)
        };
        let per = n.div_ceil(conns).max(1);
        let mut tasks = tokio::task::JoinSet::new();
        for chunk in ids.chunks(per) {
            let (me, d, t, chunk) = (
                self.clone(),
                domain.to_string(),
                transcript.clone(),
                chunk.to_vec(),
            );
            *lock(&self.per_domain).entry(d.clone()).or_insert(0) += 1;
            tasks.spawn(async move {
                let _slot = DomainSlot {
                    scheduler: &me,
                    domain: d.clone(),
                };
                me.deliver_domain(&d, chunk, t, force).await
            });
        }
        let mut left = 0;
        while let Some(r) = tasks.join_next().await {
            left += r.unwrap_or(0);
        }
        (n, left)
    }

    /// A remote ETRN for `node` (and its subdomains with `subdomains`): start delivering
    /// those queues in the background. Held domains stay held. Returns the number of
    /// messages started and whether a queue was left alone because it is on hold.
    pub async fn etrn(self: &Arc<Self>, node: &str, subdomains: bool) -> (usize, bool) {
        let spool = self.spool.clone();
        let domains = match tokio::task::spawn_blocking(move || spool.domains()).await {
            Ok(Ok(d)) => d,
            _ => return (0, false),
        };
        let suffix = format!(".{node}");
        let (mut started, mut held) = (0, false);
        for d in domains {
            if d != node && !(subdomains && d.ends_with(&suffix)) {
                continue;
            }
            if self.spool.held_since(&d).is_some() {
                held = true;
                continue;
            }
            let ids = self.claim_domain(&d, false).await;
            if ids.is_empty() {
                continue;
            }
            started += ids.len();
            info!("{d}: ETRN: delivering {} message(s) now", ids.len());
            *lock(&self.per_domain).entry(d.clone()).or_insert(0) += 1;
            let me = self.clone();
            tokio::spawn(async move {
                let _slot = DomainSlot {
                    scheduler: &me,
                    domain: d.clone(),
                };
                me.deliver_domain(&d, ids, None, false).await;
            });
        }
        (started, held && started == 0)
    }

    /// Return message `id`'s pending recipients of `domain` to the sender now, with a DSN
    /// (an administrator's `bounce`).
    pub async fn bounce(&self, domain: &str, id: &str) {
        let o = failed(
            "message returned to sender by the administrator".into(),
            "5.0.0",
        );
        self.record_all(domain, id, &o).await;
    }

    fn release(&self, domain: &str, id: &str) {
        lock(&self.in_flight).remove(&(domain.to_string(), id.to_string()));
    }

    /// Deliver `ids` (already marked in flight) for `domain` over one connection; after a
    /// first success following failures, the rest of the domain's queue follows at once.
    /// Returns how many entries stay queued.
    ///
    /// `force` (an administrator's flush) also sends entries of a held domain; what stays
    /// queued stays held.
    pub async fn deliver_domain(
        self: &Arc<Self>,
        domain: &str,
        ids: Vec<String>,
        transcript: Option<Transcript>,
        force: bool,
    ) -> usize {
        let mut queue: std::collections::VecDeque<String> = ids.into();
        let mut left = 0;
        // Outcomes are recorded while the next message goes out, so one connection's
        // records share synced commits instead of waiting for one sync each.
        let mut records: tokio::task::JoinSet<bool> = tokio::task::JoinSet::new();
        let mut conn = match self.open_link(domain, transcript.clone()).await {
            Ok(c) => c,
            Err(outcome) => {
                for id in queue {
                    self.record_later(&mut records, &mut left, domain, id, outcome.clone())
                        .await;
                }
                return left + self.settled(records).await;
            }
        };
        let relay = conn.relay();
        let mut drained = false;
        while let Some(id) = queue.pop_front() {
            // After a finished transaction the next MAIL needs no RSET (RFC 5321 4.1.1.5);
            // the client sends one itself when a transaction was left open.
            let broken = (!conn.is_usable()).then(|| format!("lost connection with {relay}"));
            let sent = match broken {
                Some(reason) => Err(reason),
                None => self.send_one(&mut conn, &relay, domain, &id, force).await,
            };
            match sent {
                Ok(Sent::Done {
                    entry,
                    message,
                    outcomes,
                    recovered,
                }) => {
                    if recovered && !drained {
                        // The primary is back: the rest of its queue is due now, spread
                        // over the domain's connections by the dispatcher.
                        drained = true;
                        info!("{domain}: delivery works again, sending its queue now");
                        lock(&self.recovered).insert(domain.to_string());
                        self.wake();
                    }
                    while records.len() >= 64 {
                        if let Some(r) = records.join_next().await {
                            left += usize::from(r.unwrap_or(true));
                        }
                    }
                    let (me, d) = (self.clone(), domain.to_string());
                    records.spawn(async move {
                        let stays = me.record(&d, &id, &entry, &message, &outcomes).await;
                        me.release(&d, &id);
                        stays
                    });
                }
                Ok(Sent::Kept) => {
                    left += 1;
                    self.release(domain, &id);
                }
                Ok(Sent::Gone) => self.release(domain, &id),
                Err(reason) => {
                    // The connection is unusable: this and the rest wait for the next try.
                    let o = deferred(reason, "4.4.2", None);
                    queue.push_front(id);
                    for id in queue.drain(..) {
                        self.record_later(&mut records, &mut left, domain, id, o.clone())
                            .await;
                    }
                    return left + self.settled(records).await;
                }
            }
        }
        conn.quit().await;
        left + self.settled(records).await
    }

    /// Record `outcome` for every pending recipient of `id` in the background.
    async fn record_later(
        self: &Arc<Self>,
        records: &mut tokio::task::JoinSet<bool>,
        left: &mut usize,
        domain: &str,
        id: String,
        outcome: Outcome,
    ) {
        while records.len() >= 64 {
            if let Some(r) = records.join_next().await {
                *left += usize::from(r.unwrap_or(true));
            }
        }
        let (me, d) = (self.clone(), domain.to_string());
        records.spawn(async move {
            let stays = me.record_all(&d, &id, &outcome).await;
            me.release(&d, &id);
            stays
        });
    }

    /// Wait for the background records; how many entries stay queued.
    async fn settled(&self, mut records: tokio::task::JoinSet<bool>) -> usize {
        let mut left = 0;
        while let Some(r) = records.join_next().await {
            left += usize::from(r.unwrap_or(true));
        }
        left
    }

    /// Mark every not-yet-flying entry of `domain` in flight and return their ids (held
    /// ones only with `include_held`).
    async fn claim_domain(&self, domain: &str, include_held: bool) -> Vec<String> {
        self.claim_some(domain, include_held, usize::MAX).await
    }

    /// [`Scheduler::claim_domain`], at most `limit` entries.
    async fn claim_some(&self, domain: &str, include_held: bool, limit: usize) -> Vec<String> {
        let mut out = Vec::new();
        let mut after: Option<String> = None;
        while out.len() < limit {
            let spool = self.spool.clone();
            let (d, a) = (domain.to_string(), after.clone());
            let chunk = match tokio::task::spawn_blocking(move || {
                spool.domain_entries(&d, a.as_deref(), 1000)
            })
            .await
            {
                Ok(Ok(c)) => c,
                _ => break,
            };
            if chunk.is_empty() {
                break;
            }
            after = chunk.last().map(|(id, _)| id.clone());
            let mut flying = lock(&self.in_flight);
            for (id, entry) in chunk {
                if (entry.held && !include_held) || !entry.has_pending() {
                    continue;
                }
                if out.len() < limit && flying.insert((domain.to_string(), id.clone())) {
                    out.push(id);
                }
            }
        }
        out
    }

    /// The way out for `domain`'s queue (see [`Config::transport`]).
    async fn open_link(
        &self,
        domain: &str,
        transcript: Option<Transcript>,
    ) -> Result<Link, Outcome> {
        match self.config().transport(domain) {
            Transport::Local(local) => match (&local.maildir, &local.lmtp) {
                (Some(template), _) => Ok(Link::Maildir(MaildirTarget {
                    template: template.clone(),
                    hostname: self.config().hostname.clone(),
                })),
                (None, Some(lmtp)) => {
                    let target = LmtpTarget::parse(lmtp)
                        .map_err(|e| deferred(format!("lmtp {lmtp}: {e}"), "4.3.5", None))?;
                    match Connection::connect_lmtp(&target, &self.client, transcript).await {
                        Ok(c) => Ok(Link::Remote(Box::new(c))),
                        Err(e) => {
                            let why = format!("connect to LMTP server {lmtp}: {e}");
                            warn!("{domain}: {why}");
                            Err(deferred(why, "4.4.1", None))
                        }
                    }
                }
                (None, None) => Err(deferred(
                    format!("local domain {domain} has neither maildir nor lmtp"),
                    "4.3.5",
                    None,
                )),
            },
            Transport::Hops(hops) => self.connect(domain, hops, transcript).await,
            Transport::Mx => self.connect(domain, &[], transcript).await,
        }
    }

    async fn connect(
        &self,
        domain: &str,
        route: &[String],
        transcript: Option<Transcript>,
    ) -> Result<Link, Outcome> {
        let hops = match self.resolver.next_hops(domain, route).await {
            Ok(Route::Hops(h)) => h,
            Ok(Route::NullMx) => {
                return Err(failed(
                    format!("{domain} does not accept mail (null MX)"),
                    "5.1.10",
                ))
            }
            Ok(Route::SelfOnly { preference }) => {
                error!(
                    "CONFIGURATION ERROR: mail for {domain} loops back to myself: {} is the best MX left (preference {preference}); mail stays queued",
                    self.config().hostname
                );
                return Err(deferred(
                    format!("mail for {domain} loops back to myself"),
                    "4.4.6",
                    None,
                ));
            }
            Err(ResolveError::NoSuchDomain(e)) => {
                return Err(failed(
                    format!("Host or domain name not found: {e}"),
                    "5.1.2",
                ))
            }
            Err(ResolveError::Temporary(e)) => return Err(deferred(e, "4.4.3", None)),
        };
        let mut last = format!("no reachable next hop for {domain}");
        let mut permanent = None;
        for hop in &hops {
            for ip in &hop.addrs {
                let addr = std::net::SocketAddr::new(*ip, hop.port);
                match Connection::connect(addr, &hop.name, &self.client, transcript.clone()).await {
                    Ok(c) => return Ok(Link::Remote(Box::new(c))),
                    Err(e) => {
                        let why = format!("connect to {}[{}]:{}: {e}", hop.name, ip, hop.port);
                        warn!("{domain}: {why}");
                        if e.is_permanent() && permanent.is_none() {
                            permanent = Some(why.clone());
                        }
                        last = why;
                    }
                }
            }
        }
        // Like Postfix: a 5xx greeting from every hop is still only a reason to retry,
        // unless the domain has a single hop that refuses us for good.
        match permanent {
            Some(why) if hops.len() == 1 && hops[0].addrs.len() == 1 => Err(failed(why, "5.4.0")),
            _ => Err(deferred(last, "4.4.1", None)),
        }
    }

    /// Record the same outcome for every pending recipient of one entry. Returns whether
    /// the entry stays queued.
    async fn record_all(&self, domain: &str, id: &str, outcome: &Outcome) -> bool {
        let Some(message) = self.load_message(id).await else {
            return false;
        };
        self.record_with(domain, id, &message, None, |entry| {
            let n = entry
                .recipients
                .iter()
                .filter(|r| r.state == RcptState::Pending)
                .count();
            vec![outcome.clone(); n]
        })
        .await
    }

    /// Settle one entry with the outcomes `outcomes_for` gives for its pending recipients.
    /// With `expect`, nothing is recorded if the entry's recipients changed meanwhile (an
    /// administrator's action). Returns whether the entry stays queued.
    async fn record_with(
        &self,
        domain: &str,
        id: &str,
        message: &[u8],
        expect: Option<&[Recipient]>,
        outcomes_for: impl FnOnce(&QueueEntry) -> Vec<Outcome>,
    ) -> bool {
        let mut stays = false;
        let res = self
            .spool
            .settle(domain, id, |current, stored| {
                if expect.is_some_and(|r| r != current.recipients.as_slice()) {
                    stays = current.has_pending();
                    return None;
                }
                let outcomes = outcomes_for(current);
                let (next, batch) = self.outcome_batch(current, stored, message, &outcomes);
                self.log_outcomes(id, current, &stored.envelope, &outcomes, &next);
                stays = next.has_pending();
                Some((next, batch))
            })
            .await;
        if let Err(e) = res {
            // If the mail went out, it will go again: a duplicate, never a loss.
            error!("{id}: cannot record the delivery attempt: {e}");
            return true;
        }
        stays
    }

    fn outcome_batch(
        &self,
        entry: &QueueEntry,
        stored: &StoredEnvelope,
        message: &[u8],
        outcomes: &[Outcome],
    ) -> (QueueEntry, Option<Batch>) {
        let (next, dsns) = settle(
            &self.config(),
            entry,
            &stored.envelope,
            message,
            outcomes,
            SystemTime::now(),
            self.retry_delay(),
        );
        let mut batch: Option<Batch> = None;
        for (env, bytes) in dsns {
            let id = env.id.clone();
            match self.spool.enqueue_batch(env, bytes) {
                Ok(b) => {
                    info!(
                        "{}: sender delivery status notification: {id}",
                        stored.envelope.id
                    );
                    batch.get_or_insert_with(Batch::new).append(b)
                }
                Err(e) => error!("{}: cannot queue a DSN: {e}", stored.envelope.id),
            }
        }
        (next, batch)
    }

    fn retry_delay(&self) -> Duration {
        let base = self.config().queue.retry_interval.0.as_secs_f64();
        let jitter = rand::rng().random_range(0.9..1.1);
        Duration::from_secs_f64(base * jitter)
    }

    async fn load_message(&self, id: &str) -> Option<Vec<u8>> {
        let spool = self.spool.clone();
        let id2 = id.to_string();
        match tokio::task::spawn_blocking(move || spool.message(&id2)).await {
            Ok(Ok(Some(m))) => Some(m),
            Ok(Ok(None)) => None,
            Ok(Err(e)) => {
                error!("{id}: cannot read the message: {e}");
                None
            }
            Err(_) => None,
        }
    }

    /// Send one entry over `conn`; `Err` when the connection broke (nothing recorded).
    async fn send_one(
        &self,
        conn: &mut Link,
        relay: &str,
        domain: &str,
        id: &str,
        force: bool,
    ) -> Result<Sent, String> {
        let spool = self.spool.clone();
        let (d, i) = (domain.to_string(), id.to_string());
        let loaded = tokio::task::spawn_blocking(move || -> Result<_, crate::spool::SpoolError> {
            let entry = spool.queue_entry(&d, &i)?;
            let stored = spool.stored_envelope(&i)?;
            let message = spool.message(&i)?;
            Ok((entry, stored, message))
        })
        .await
        .map_err(|e| e.to_string())?;
        let (entry, stored, message) = match loaded {
            Ok((Some(e), Some(s), Some(m))) => (e, s, m),
            Ok(_) => return Ok(Sent::Gone),
            Err(e) => {
                error!("{id}: cannot read from the spool: {e}");
                return Ok(Sent::Kept);
            }
        };
        if entry.held && !force {
            return Ok(Sent::Kept);
        }
        let pending: Vec<Recipient> = entry
            .recipients
            .iter()
            .filter(|r| r.state == RcptState::Pending)
            .cloned()
            .collect();
        let results = if pending.is_empty() {
            Vec::new()
        } else {
            conn.send(&Outgoing {
                envelope: &stored.envelope,
                recipients: &pending,
                message: &message,
            })
            .await
            .map_err(|e| format!("lost connection with {relay}: {e}"))?
        };
        // A remote server's words are quoted as its own; a local failure is ours.
        let said_by = conn.is_remote().then(|| relay.to_string());
        let outcomes: Vec<Outcome> = results
            .into_iter()
            .map(|r| match r {
                RcptResult::Sent(reply) => Outcome::Sent {
                    reply,
                    relay: relay.to_string(),
                },
                RcptResult::Deferred(reply) => Outcome::Deferred {
                    status: reply.dsn_status(),
                    reason: reply.to_string(),
                    relay: said_by.clone(),
                },
                RcptResult::Failed(reply) => Outcome::Failed {
                    status: reply.dsn_status(),
                    reason: reply.to_string(),
                    relay: said_by.clone(),
                },
            })
            .collect();
        let recovered =
            entry.attempts > 0 && outcomes.iter().any(|o| matches!(o, Outcome::Sent { .. }));
        Ok(Sent::Done {
            entry,
            message,
            outcomes,
            recovered,
        })
    }

    /// Record what [`Scheduler::send_one`] got; returns whether the entry stays queued.
    async fn record(
        &self,
        domain: &str,
        id: &str,
        entry: &QueueEntry,
        message: &[u8],
        outcomes: &[Outcome],
    ) -> bool {
        self.record_with(domain, id, message, Some(&entry.recipients), |_| {
            outcomes.to_vec()
        })
        .await
    }

    fn log_outcomes(
        &self,
        id: &str,
        entry: &QueueEntry,
        envelope: &Envelope,
        outcomes: &[Outcome],
        next: &QueueEntry,
    ) {
        let delay = Duration::from_millis(now_ms().saturating_sub(envelope.arrival_ms));
        let delay = format!("{:.1}", delay.as_secs_f64());
        let pending = entry
            .recipients
            .iter()
            .enumerate()
            .filter(|(_, r)| r.state == RcptState::Pending);
        for ((i, r), o) in pending.zip(outcomes) {
            let became = next.recipients[i].state;
            match o {
                Outcome::Sent { reply, relay } => info!(
                    "{id}: to=<{}>, relay={relay}, delay={delay}, dsn={}, status=sent ({reply})",
                    r.address,
                    reply.dsn_status()
                ),
                Outcome::Deferred {
                    reason,
                    status,
                    relay,
                }
                | Outcome::Failed {
                    reason,
                    status,
                    relay,
                } => {
                    let word = if became == RcptState::Failed {
                        "bounced"
                    } else {
                        "deferred"
                    };
                    info!(
                        "{id}: to=<{}>, relay={}, delay={delay}, dsn={status}, status={word} ({})",
                        r.address,
                        relay.as_deref().unwrap_or("none"),
                        describe(reason, relay)
                    );
                }
            }
        }
    }
}

fn deferred(reason: String, status: &str, relay: Option<String>) -> Outcome {
    Outcome::Deferred {
        reason,
        status: status.to_string(),
        relay,
    }
}

fn failed(reason: String, status: &str) -> Outcome {
    Outcome::Failed {
        reason,
        status: status.to_string(),
        relay: None,
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
        }
    }

    const MSG: &[u8] = b"Subject: x\r\n\r\nbody\r\n";

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
