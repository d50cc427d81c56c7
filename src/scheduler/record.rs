//! Recording what an attempt came to: one atomic commit per entry (its new state and the
//! DSNs it causes), made in background tasks while the next message goes out. A record that
//! fails pauses delivery (see [`super::pause`]).

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rand::Rng;
use tracing::{error, info};

use super::now_ms;
use super::pause::Unrecorded;
use super::settle::{describe, settle, Outcome};
use super::Scheduler;
use crate::envelope::{Envelope, RcptState, Recipient};
use crate::spool::{Batch, Message, QueueEntry, SpoolError, StoredEnvelope};

impl Scheduler {
    /// Record `outcome` for every pending recipient of `id` in the background.
    pub(super) async fn record_later(
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
    pub(super) async fn settled(&self, mut records: tokio::task::JoinSet<bool>) -> usize {
        let mut left = 0;
        while let Some(r) = records.join_next().await {
            left += usize::from(r.unwrap_or(true));
        }
        left
    }

    /// Record the same outcome for every pending recipient of one entry (a deferral for
    /// what was not tried, an administrator's bounce). Returns whether the entry stays
    /// queued. If it cannot be recorded, delivery pauses and the entry stays as it was:
    /// nothing was sent, so nothing is lost or repeated.
    pub(super) async fn record_all(&self, domain: &str, id: &str, outcome: &Outcome) -> bool {
        let Some(message) = self.load_message(id).await else {
            return false;
        };
        let res = self
            .record_with(domain, id, &message, None, |entry| {
                let n = entry
                    .recipients
                    .iter()
                    .filter(|r| r.state == RcptState::Pending)
                    .count();
                vec![outcome.clone(); n]
            })
            .await;
        match res {
            Ok(stays) => stays,
            Err(e) => {
                self.pause.enter(&e.to_string(), None);
                true
            }
        }
    }

    /// Record what a delivery got and release the entry. If it cannot be recorded, the
    /// outcome is kept for later and the entry stays claimed (never sent twice), and
    /// delivery pauses. Returns whether the entry stays queued.
    pub(super) async fn record(
        &self,
        domain: &str,
        id: &str,
        entry: &QueueEntry,
        message: &Message,
        outcomes: &[Outcome],
    ) -> bool {
        let res = self
            .record_with(domain, id, message, Some(&entry.recipients), |_| {
                outcomes.to_vec()
            })
            .await;
        match res {
            Ok(stays) => {
                self.release(domain, id);
                stays
            }
            Err(e) => {
                self.pause.enter(
                    &e.to_string(),
                    Some(Unrecorded {
                        domain: domain.to_string(),
                        id: id.to_string(),
                        entry: entry.clone(),
                        message: message.clone(),
                        outcomes: outcomes.to_vec(),
                    }),
                );
                true
            }
        }
    }

    /// While paused: record what waits (or probe), and lift the pause when that works.
    pub(super) async fn try_resume(&self) {
        let waiting = self.pause.take();
        if waiting.is_empty() {
            if let Err(e) = self.spool.probe(now_ms()).await {
                self.pause.enter(&e.to_string(), None);
                return;
            }
            self.pause.leave(0);
            return;
        }
        let mut recorded = 0;
        let mut waiting = waiting.into_iter();
        while let Some(u) = waiting.next() {
            let res = self
                .record_with(
                    &u.domain,
                    &u.id,
                    &u.message,
                    Some(&u.entry.recipients),
                    |_| u.outcomes.clone(),
                )
                .await;
            match res {
                Ok(_) => {
                    recorded += 1;
                    self.release(&u.domain, &u.id);
                }
                Err(e) => {
                    let e = e.to_string();
                    self.pause.enter(&e, Some(u));
                    for rest in waiting {
                        self.pause.enter(&e, Some(rest));
                    }
                    return;
                }
            }
        }
        self.pause.leave(recorded);
    }

    /// Settle one entry with the outcomes `outcomes_for` gives for its pending recipients,
    /// and log them once they are in the spool. With `expect`, nothing is recorded if the entry's recipients
    /// changed meanwhile (an administrator's action). Returns whether the entry stays
    /// queued.
    async fn record_with(
        &self,
        domain: &str,
        id: &str,
        message: &Message,
        expect: Option<&[Recipient]>,
        outcomes_for: impl FnOnce(&QueueEntry) -> Vec<Outcome>,
    ) -> Result<bool, SpoolError> {
        let returned = self.returned(message).await;
        let message = returned.as_slice();
        let mut stays = false;
        let mut outcome_log: Option<(QueueEntry, Envelope, Vec<Outcome>, QueueEntry)> = None;
        self.spool
            .settle(domain, id, |current, stored| {
                if expect.is_some_and(|r| r != current.recipients.as_slice()) {
                    stays = current.has_pending();
                    return None;
                }
                let outcomes = outcomes_for(current);
                let (next, batch) = self.outcome_batch(current, stored, message, &outcomes);
                stays = next.has_pending();
                outcome_log = Some((
                    current.clone(),
                    stored.envelope.clone(),
                    outcomes,
                    next.clone(),
                ));
                Some((next, batch))
            })
            .await?;
        // Logged once the outcome is in the spool.
        if let Some((current, envelope, outcomes, next)) = outcome_log {
            self.log_outcomes(domain, id, &current, &envelope, &outcomes, &next);
        }
        if stays {
            self.waiting_in(domain);
        }
        Ok(stays)
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

    /// What a DSN about `message` may return of it: at most `bounce_size_limit` (but always
    /// the whole header section), cut after a line end when cut.
    async fn returned(&self, message: &Message) -> Vec<u8> {
        let first = message.first();
        let limit = (self.config().queue.bounce_size_limit.0 as usize)
            .max(crate::dsn::header_section_len(first));
        let mut bytes = if limit <= first.len() || message.parts() == 0 {
            first[..limit.min(first.len())].to_vec()
        } else {
            let m = message.clone();
            match tokio::task::spawn_blocking(move || m.prefix(limit)).await {
                Ok(Ok(b)) => b,
                _ => first.to_vec(),
            }
        };
        if (bytes.len() as u64) < message.len() {
            if let Some(i) = bytes.iter().rposition(|&b| b == b'\n') {
                bytes.truncate(i + 1);
            }
        }
        bytes
    }

    async fn load_message(&self, id: &str) -> Option<Message> {
        let spool = self.spool.clone();
        let id2 = id.to_string();
        match tokio::task::spawn_blocking(move || spool.load_message(&id2)).await {
            Ok(Ok(Some(m))) => Some(m),
            Ok(Ok(None)) => None,
            Ok(Err(e)) => {
                error!("{id}: cannot read the message: {e}");
                None
            }
            Err(_) => None,
        }
    }

    /// One log line per recipient's outcome, and its count in `deliveries_total` (by domain
    /// and the status word of the line: sent, deferred, bounced).
    fn log_outcomes(
        &self,
        domain: &str,
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
        let counted = |status: &str| {
            self.metrics
                .deliveries
                .get_or_create(&vec![
                    ("domain", domain.to_string()),
                    ("status", status.to_string()),
                ])
                .inc();
        };
        for ((i, r), o) in pending.zip(outcomes) {
            let became = next.recipients[i].state;
            match o {
                Outcome::Sent { reply, relay, tls } => {
                    counted("sent");
                    let tls = tls.as_ref().map(|t| format!("{t}, ")).unwrap_or_default();
                    info!(
                    "{id}: to=<{}>, relay={relay}, delay={delay}, {tls}dsn={}, status=sent ({reply})",
                    r.address,
                    reply.dsn_status()
                    )
                }
                Outcome::Deferred {
                    reason,
                    status,
                    relay,
                    tls,
                }
                | Outcome::Failed {
                    reason,
                    status,
                    relay,
                    tls,
                } => {
                    let word = if became == RcptState::Failed {
                        "bounced"
                    } else {
                        "deferred"
                    };
                    counted(word);
                    let tls = tls.as_ref().map(|t| format!("{t}, ")).unwrap_or_default();
                    info!(
                        "{id}: to=<{}>, relay={}, delay={delay}, {tls}dsn={status}, status={word} ({})",
                        r.address,
                        relay.as_deref().unwrap_or("none"),
                        describe(reason, relay)
                    );
                }
            }
        }
    }
}
