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

mod pause;
mod record;
mod send;
mod settle;

pub use settle::{settle, Outcome};

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::{watch, Notify, Semaphore};
use tracing::{error, info};

use crate::config::Config;
use crate::delivery::client::{ClientConfig, Timeouts};
use crate::delivery::mx::Resolver;
use crate::delivery::Transcript;
use crate::ops::live::Live;
use crate::spool::{DueCursor, Spool};
use pause::Pause;
use settle::failed;

/// Entries handed to one delivery task at most (one connection, RSET between messages).
const MAX_PER_CONNECTION: usize = 200;
/// How often the due index is looked at when nothing wakes the runner earlier.
const TICK: Duration = Duration::from_secs(1);
/// The shortest time between two looks at the due index when woken.
const MIN_GAP: Duration = Duration::from_millis(20);
/// Domains remembered as having no mail waiting, at most (then forgotten: a success there
/// costs one look at the domain's queue).
const MAX_CLEAN: usize = 100_000;
/// How often a flush looks whether entries another delivery had claimed are done.
const FLUSH_POLL: Duration = Duration::from_millis(50);

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// What a flush of one domain came to.
#[derive(Debug, Default)]
pub struct FlushReport {
    /// Entries tried: sent by the flush, or by another delivery the flush waited for.
    pub tried: usize,
    /// Of those, what stays queued: id, and why (the last error).
    pub left: Vec<(String, String)>,
}

/// The sweep of a domain's queue after a successful delivery there.
#[derive(Default)]
struct Sweep {
    /// The last id claimed (or passed over); the sweep goes on after it.
    cursor: Option<String>,
    /// A deferral was recorded for the domain during the sweep: mail still waits there.
    dirty: bool,
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
    /// Domains with a fresh successful delivery while mail waited: their whole queue is
    /// due now (the primary is back: drain it).
    /// Each is swept once (every entry claimed once), so what the primary still defers is
    /// not sent again and again.
    recovered: Mutex<HashMap<String, Sweep>>,
    /// Domains known to have no mail waiting for a later retry (a drain found nothing), so
    /// a success there starts no drain. A deferral recorded for a domain takes it out.
    clean: Mutex<HashSet<String>>,
    /// Set while the spool cannot record outcomes: nothing goes out.
    pause: Pause,
    /// Where the last look at the due index stopped, and when it last started from the
    /// front: between full scans (one a `TICK`) a wake-up reads only what came after, so a
    /// busy server does not re-read the entries it is already delivering.
    cursor: Mutex<(Option<DueCursor>, std::time::Instant)>,
    deliveries: Arc<Semaphore>,
    wake: Notify,
    /// Delivery outcomes are counted where they are logged (`record.rs`).
    metrics: Arc<crate::ops::metrics::Metrics>,
    /// Destination domains' MTA-STS policies (`[delivery] mta_sts`; start-only).
    sts: Option<crate::tls::mta_sts::Sts>,
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
    pub fn new(
        live: Arc<Live>,
        spool: Spool,
        metrics: Arc<crate::ops::metrics::Metrics>,
    ) -> anyhow::Result<Arc<Scheduler>> {
        let config = live.config();
        let resolver = Resolver::new(&config)?;
        let client = ClientConfig {
            helo_name: config.hostname.clone(),
            connect_timeout: config.delivery.connect_timeout.0,
            timeouts: Timeouts {
                greeting: config.delivery.helo_timeout.0,
                ..Timeouts::default()
            },
            bind: config.delivery.bind_address,
            tls: config.delivery.tls,
            // The system's roots and tls_ca_file, read once: [delivery] is start-only.
            tls_connectors: Some(Arc::new(
                crate::tls::client::Connectors::new(&config.delivery.tls_ca, true)
                    .map_err(|e| anyhow::anyhow!("[delivery] {e}"))?,
            )),
            // Set per next hop by DANE (src/tls/dane.rs, scheduler::send).
            dane: None,
        };
        let sts = match (&client.tls_connectors, config.delivery.mta_sts) {
            (Some(connectors), true) => Some(crate::tls::mta_sts::Sts::new(
                resolver.clone(),
                connectors.clone(),
                spool.clone(),
            )),
            _ => None,
        };
        Ok(Arc::new(Scheduler {
            sts,
            deliveries: Arc::new(Semaphore::new(config.queue.max_deliveries)),
            live,
            spool,
            resolver,
            client,
            in_flight: Mutex::new(HashSet::new()),
            per_domain: Mutex::new(HashMap::new()),
            recovered: Mutex::new(HashMap::new()),
            clean: Mutex::new(HashSet::new()),
            pause: Pause::default(),
            cursor: Mutex::new((None, std::time::Instant::now())),
            wake: Notify::new(),
            metrics,
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

    /// A delivery to `domain` worked: if mail may be waiting there, drain it now.
    fn delivered_to(&self, domain: &str) {
        if lock(&self.clean).contains(domain) {
            return;
        }
        let mut recovered = lock(&self.recovered);
        if !recovered.contains_key(domain) {
            recovered.insert(domain.to_string(), Sweep::default());
            drop(recovered);
            info!("{domain}: delivery works, sending the mail that waits for it now");
            self.wake();
        }
    }

    /// Mail of `domain` waits for a later retry.
    fn waiting_in(&self, domain: &str) {
        lock(&self.clean).remove(domain);
        if let Some(s) = lock(&self.recovered).get_mut(domain) {
            s.dirty = true;
        }
    }

    /// Whether delivery is paused because the spool cannot record outcomes.
    pub fn is_paused(&self) -> bool {
        self.pause.is_paused()
    }

    /// Start delivery tasks for what is due, within the concurrency limits.
    async fn dispatch(self: Arc<Self>) -> anyhow::Result<()> {
        if self.pause.is_paused() {
            self.try_resume().await;
            if self.pause.is_paused() {
                return Ok(());
            }
        }
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
        // A domain whose primary is back: everything of it is due, whatever its schedule,
        // in one sweep of its queue (each entry claimed once).
        let sweeps: Vec<(String, Option<String>)> = lock(&self.recovered)
            .iter()
            .map(|(d, s)| (d.clone(), s.cursor.clone()))
            .collect();
        for (domain, start) in sweeps {
            let free = self.free_connections(&domain);
            if free == 0 {
                continue;
            }
            let (ids, next) = self
                .claim_from(&domain, false, free * MAX_PER_CONNECTION, None, start)
                .await;
            {
                let mut recovered = lock(&self.recovered);
                match next {
                    Some(cursor) => {
                        if let Some(s) = recovered.get_mut(&domain) {
                            s.cursor = Some(cursor);
                        }
                    }
                    None => {
                        // Swept to the end: nothing waits there unless a deferral was
                        // recorded meanwhile (or is, later: `waiting_in`).
                        let dirty = recovered.remove(&domain).is_some_and(|s| s.dirty);
                        if !dirty {
                            let mut clean = lock(&self.clean);
                            if clean.len() >= MAX_CLEAN {
                                clean.clear();
                            }
                            clean.insert(domain.clone());
                        }
                    }
                }
            }
            if ids.is_empty() {
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

    /// Deliver `domain`'s queue now, whatever its schedule (an administrator's `flush`;
    /// `force`: held entries too, and what stays queued stays held). Returns when every
    /// entry of the domain was tried, including those another delivery (the due scan, a
    /// drain, an ETRN) had claimed: the report says what stays queued and why.
    pub async fn flush_domain(
        self: &Arc<Self>,
        domain: &str,
        transcript: Option<Transcript>,
        force: bool,
    ) -> FlushReport {
        let mut others = Vec::new();
        let ids = self
            .claim_some(domain, force, usize::MAX, Some(&mut others))
            .await;
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
        while tasks.join_next().await.is_some() {}
        // What another delivery had claimed is that delivery's to finish: wait for it.
        loop {
            let busy = {
                let flying = lock(&self.in_flight);
                others
                    .iter()
                    .any(|id| flying.contains(&(domain.to_string(), id.clone())))
            };
            if !busy || self.pause.is_paused() {
                break;
            }
            tokio::time::sleep(FLUSH_POLL).await;
        }
        let mut tried = ids;
        tried.append(&mut others);
        let n = tried.len();
        let paused = self.pause.is_paused();
        let spool = self.spool.clone();
        let d = domain.to_string();
        let left = tokio::task::spawn_blocking(move || {
            tried
                .into_iter()
                .filter_map(|id| match spool.queue_entry(&d, &id) {
                    Ok(Some(e)) if e.has_pending() => {
                        let why = if paused {
                            "delivery is paused: the spool cannot record outcomes".to_string()
                        } else {
                            e.last_error
                                .clone()
                                .unwrap_or_else(|| "not tried".to_string())
                        };
                        Some((id, why))
                    }
                    Ok(_) => None,
                    Err(e) => Some((id, format!("cannot read the queue entry: {e}"))),
                })
                .collect::<Vec<_>>()
        })
        .await
        .unwrap_or_default();
        FlushReport { tried: n, left }
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

    /// Mark every not-yet-flying entry of `domain` in flight and return their ids (held
    /// ones only with `include_held`).
    async fn claim_domain(&self, domain: &str, include_held: bool) -> Vec<String> {
        self.claim_some(domain, include_held, usize::MAX, None)
            .await
    }

    /// [`Scheduler::claim_domain`], at most `limit` entries; with `others`, the ids of the
    /// entries another delivery has claimed are put there.
    async fn claim_some(
        &self,
        domain: &str,
        include_held: bool,
        limit: usize,
        others: Option<&mut Vec<String>>,
    ) -> Vec<String> {
        self.claim_from(domain, include_held, limit, others, None)
            .await
            .0
    }

    /// [`Scheduler::claim_some`] from after the id `start` in the domain's key order.
    /// Returns the ids claimed and where to go on (`None`: the domain's range was read to
    /// its end).
    async fn claim_from(
        &self,
        domain: &str,
        include_held: bool,
        limit: usize,
        mut others: Option<&mut Vec<String>>,
        start: Option<String>,
    ) -> (Vec<String>, Option<String>) {
        let mut out = Vec::new();
        let mut after: Option<String> = start;
        loop {
            let spool = self.spool.clone();
            let (d, a) = (domain.to_string(), after.clone());
            let chunk = match tokio::task::spawn_blocking(move || {
                spool.domain_entries(&d, a.as_deref(), 1000)
            })
            .await
            {
                Ok(Ok(c)) => c,
                _ => return (out, None),
            };
            if chunk.is_empty() {
                return (out, None);
            }
            let mut flying = lock(&self.in_flight);
            for (id, entry) in chunk {
                if out.len() >= limit {
                    return (out, after);
                }
                after = Some(id.clone());
                if (entry.held && !include_held) || !entry.has_pending() {
                    continue;
                }
                if flying.insert((domain.to_string(), id.clone())) {
                    out.push(id);
                } else if let Some(o) = others.as_deref_mut() {
                    o.push(id);
                }
            }
        }
    }
}
