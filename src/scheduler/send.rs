//! Sending a domain's entries: one delivery task keeps a session to the next hop and sends
//! the entries it was given, one after the other. When the next hop ends the session early
//! (a `421`, its cap of messages per session, a lost connection, a timeout between
//! messages) the batch goes on over a new session at once (the same host first); what was
//! never sent is neither an attempt nor an error. Recipients refused as too many for one
//! transaction (`452 4.5.3`) go in further transactions at once.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::Arc;

use tracing::{error, info, warn};

use super::settle::{deferred, failed, Outcome};
use super::Scheduler;
use crate::config::Transport;
use crate::delivery::client::{ClientConfig, Connection, LmtpTarget, Outgoing, RcptResult};
use crate::delivery::link::{Link, MaildirTarget};
use crate::delivery::mx::{ResolveError, Route};
use crate::delivery::{Reply, Transcript};
use crate::envelope::{RcptState, Recipient};
use crate::spool::{Message, QueueEntry, StoredEnvelope};

/// New sessions in a row that carried nothing before the rest of a batch is deferred: a
/// next hop that greets and then ends every session at once is not retried in a loop.
const MAX_FRUITLESS_SESSIONS: u32 = 2;

/// What sending one entry came to.
enum Sent {
    /// Sent (or refused): the per-recipient outcomes, to be recorded.
    Done {
        entry: Box<QueueEntry>,
        message: Message,
        outcomes: Vec<Outcome>,
        /// At least one recipient was delivered.
        delivered: bool,
    },
    /// Not sent and still queued as it was (held, unreadable, or delivery is paused).
    Kept,
    /// No longer in the queue.
    Gone,
}

/// The session of one delivery task, and how the sessions of the task have gone.
struct Session {
    link: Option<Link>,
    /// Whether the current session has settled any recipient.
    carried: bool,
    /// Sessions in a row that ended without settling anything.
    fruitless: u32,
    /// The peer of the last session, tried first when a new session is needed.
    last_peer: Option<SocketAddr>,
    transcript: Option<Transcript>,
}

fn trace(t: &Option<Transcript>, line: &str) {
    if let Some(t) = t {
        t(line);
    }
}

impl Scheduler {
    /// Deliver `ids` (already marked in flight) for `domain`, over one session at a time.
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
        let mut queue: VecDeque<String> = ids.into();
        let mut left = 0;
        // Outcomes are recorded while the next message goes out, so one connection's
        // records share synced commits instead of waiting for one sync each.
        let mut records: tokio::task::JoinSet<bool> = tokio::task::JoinSet::new();
        let mut session = Session {
            link: None,
            carried: false,
            fruitless: 0,
            last_peer: None,
            transcript,
        };
        if let Err(outcome) = self.open(domain, &mut session).await {
            for id in queue {
                self.record_later(&mut records, &mut left, domain, id, outcome.clone())
                    .await;
            }
            return left + self.settled(records).await;
        }
        let mut drained = false;
        while let Some(id) = queue.pop_front() {
            if self.pause.is_paused() {
                // The spool cannot record outcomes: nothing more goes out. What was not
                // sent stays as it was (no attempt, no new due time).
                left += 1 + queue.len();
                self.release(domain, &id);
                for id in queue.drain(..) {
                    self.release(domain, &id);
                }
                break;
            }
            let (sent, stop) = self.send_entry(&mut session, domain, &id, force).await;
            match sent {
                Sent::Done {
                    entry,
                    message,
                    outcomes,
                    delivered,
                } => {
                    if delivered && !drained {
                        drained = true;
                        self.delivered_to(domain);
                    }
                    while records.len() >= 64 {
                        if let Some(r) = records.join_next().await {
                            left += usize::from(r.unwrap_or(true));
                        }
                    }
                    let (me, d) = (self.clone(), domain.to_string());
                    records.spawn(
                        async move { me.record(&d, &id, &entry, &message, &outcomes).await },
                    );
                }
                Sent::Kept => {
                    left += 1;
                    self.release(domain, &id);
                }
                Sent::Gone => self.release(domain, &id),
            }
            if let Some(outcome) = stop {
                // The next hop cannot be reached again, or ends every new session at
                // once: the rest of the batch waits for the next try.
                for id in queue.drain(..) {
                    self.record_later(&mut records, &mut left, domain, id, outcome.clone())
                        .await;
                }
            }
        }
        if let Some(link) = session.link.take() {
            link.quit().await;
        }
        left + self.settled(records).await
    }

    /// A new session for `domain` (the last peer first).
    async fn open(&self, domain: &str, session: &mut Session) -> Result<(), Outcome> {
        let link = self
            .open_link(domain, session.transcript.clone(), session.last_peer)
            .await?;
        if let Link::Remote(c) = &link {
            session.last_peer = Some(c.peer());
        }
        session.link = Some(link);
        session.carried = false;
        Ok(())
    }

    /// Send one entry, over as many transactions and sessions as it takes. Returns what it
    /// came to and, when the destination is unusable now, the outcome for the rest of the
    /// batch.
    async fn send_entry(
        &self,
        session: &mut Session,
        domain: &str,
        id: &str,
        force: bool,
    ) -> (Sent, Option<Outcome>) {
        let (entry, stored, message) = match self.load_entry(domain, id).await {
            Ok(Some(loaded)) => loaded,
            Ok(None) => return (Sent::Gone, None),
            Err(()) => return (Sent::Kept, None),
        };
        if entry.held && !force {
            return (Sent::Kept, None);
        }
        let pending: Vec<Recipient> = entry
            .recipients
            .iter()
            .filter(|r| r.state == RcptState::Pending)
            .cloned()
            .collect();
        let mut outcomes: Vec<Option<Outcome>> = vec![None; pending.len()];
        let mut stop = None;
        loop {
            let todo: Vec<usize> = (0..pending.len())
                .filter(|&i| outcomes[i].is_none())
                .collect();
            if todo.is_empty() {
                break;
            }
            if !session.link.as_ref().is_some_and(Link::is_usable) {
                if let Some(old) = session.link.take() {
                    old.quit().await;
                }
                if let Err(outcome) = self.open(domain, session).await {
                    for i in todo {
                        outcomes[i] = Some(outcome.clone());
                    }
                    stop = Some(outcome);
                    break;
                }
            }
            let link = session.link.as_mut().expect("a usable session");
            let relay = link.relay();
            // One TLS state per transaction, shared by its recipients' outcomes.
            let tls = link.tls_state().map(std::sync::Arc::new);
            let rcpts: Vec<Recipient> = todo.iter().map(|&i| pending[i].clone()).collect();
            let results = link
                .send(&Outgoing {
                    envelope: &stored.envelope,
                    recipients: &rcpts,
                    message: &message,
                })
                .await;
            // A remote server's words are quoted as its own; a local failure is ours.
            let said_by = link.is_remote().then(|| relay.clone());
            let mut unsent: Option<Reply> = None;
            for (&i, result) in todo.iter().zip(results) {
                outcomes[i] = match result {
                    RcptResult::Unsent(reply) => {
                        unsent = Some(reply);
                        None
                    }
                    RcptResult::Sent(reply) => Some(Outcome::Sent {
                        reply,
                        relay: relay.clone(),
                        tls: tls.clone(),
                    }),
                    RcptResult::Deferred(reply) => Some(Outcome::Deferred {
                        status: reply.dsn_status(),
                        reason: reply.to_string(),
                        relay: said_by.clone(),
                        tls: tls.clone(),
                    }),
                    RcptResult::Failed(reply) => Some(Outcome::Failed {
                        status: reply.dsn_status(),
                        reason: reply.to_string(),
                        relay: said_by.clone(),
                        tls: tls.clone(),
                    }),
                };
            }
            let Some(why) = unsent else {
                session.carried = true;
                session.fruitless = 0;
                break;
            };
            let progress = todo.iter().any(|&i| outcomes[i].is_some());
            let usable = link.is_usable();
            if progress {
                // Some went; the rest go in a further transaction (on this session while
                // it lasts, else on a new one).
                session.carried = true;
                session.fruitless = 0;
                continue;
            }
            if usable {
                // A session that takes none of them (too many recipients for the first):
                // that is the server's answer for now.
                let o = Outcome::Deferred {
                    status: why.dsn_status(),
                    reason: why.to_string(),
                    relay: said_by.clone(),
                    tls: tls.clone(),
                };
                for i in todo {
                    outcomes[i] = Some(o.clone());
                }
                break;
            }
            // The session ended before this message went out.
            if !session.carried {
                session.fruitless += 1;
            }
            info!("{domain}: {relay} ended the session ({why}); continuing on a new session");
            if session.fruitless >= MAX_FRUITLESS_SESSIONS {
                let o = Outcome::Deferred {
                    status: why.dsn_status(),
                    reason: format!("{why} (on {} new session(s) in a row)", session.fruitless),
                    relay: said_by.clone(),
                    tls: tls.clone(),
                };
                for i in todo {
                    outcomes[i] = Some(o.clone());
                }
                stop = Some(o);
                break;
            }
        }
        let outcomes: Vec<Outcome> = outcomes.into_iter().flatten().collect();
        let delivered = outcomes.iter().any(|o| matches!(o, Outcome::Sent { .. }));
        (
            Sent::Done {
                entry: Box::new(entry),
                message,
                outcomes,
                delivered,
            },
            stop,
        )
    }

    /// An entry, its envelope and its message; `Ok(None)` when it is no longer queued,
    /// `Err` when the spool cannot be read (logged).
    async fn load_entry(
        &self,
        domain: &str,
        id: &str,
    ) -> Result<Option<(QueueEntry, StoredEnvelope, Message)>, ()> {
        let spool = self.spool.clone();
        let (d, i) = (domain.to_string(), id.to_string());
        let loaded = tokio::task::spawn_blocking(move || -> Result<_, crate::spool::SpoolError> {
            let entry = spool.queue_entry(&d, &i)?;
            let stored = spool.stored_envelope(&i)?;
            let message = match &stored {
                Some(s) => spool.message_of(&i, s)?,
                None => None,
            };
            Ok((entry, stored, message))
        })
        .await;
        match loaded {
            Ok(Ok((Some(e), Some(s), Some(m)))) => Ok(Some((e, s, m))),
            Ok(Ok(_)) => Ok(None),
            Ok(Err(e)) => {
                error!("{id}: cannot read from the spool: {e}");
                Err(())
            }
            Err(e) => {
                error!("{id}: cannot read from the spool: the read task failed: {e}");
                Err(())
            }
        }
    }

    /// The way out for `domain`'s queue (see [`Config::transport`]).
    async fn open_link(
        &self,
        domain: &str,
        transcript: Option<Transcript>,
        prefer: Option<SocketAddr>,
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
                    trace(&transcript, &format!("connecting to LMTP server {lmtp}"));
                    match Connection::connect_lmtp(&target, &self.client, transcript.clone()).await
                    {
                        Ok(c) => Ok(Link::Remote(Box::new(c))),
                        Err(e) => {
                            let why = format!("connect to LMTP server {lmtp}: {e}");
                            warn!("{domain}: {why}");
                            trace(&transcript, &why);
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
            Transport::Hops(hops) => self.connect(domain, hops, transcript, prefer).await,
            Transport::Mx => self.connect(domain, &[], transcript, prefer).await,
        }
    }

    /// A session with the first next hop that answers, in preference order (`prefer`, the
    /// host of the session just ended, first).
    async fn connect(
        &self,
        domain: &str,
        route: &[String],
        transcript: Option<Transcript>,
        prefer: Option<SocketAddr>,
    ) -> Result<Link, Outcome> {
        // MTA-STS (RFC 8461) for MX delivery only: a route is the administrator's choice.
        // Its TXT lookup (and a fetch, if any) runs beside the next-hop lookup.
        let decide = async {
            match (&self.sts, route.is_empty()) {
                (Some(sts), true) => sts.decide(domain, &transcript).await,
                _ => None,
            }
        };
        let (sts, next_hops) = tokio::join!(decide, self.resolver.next_hops(domain, route));
        let hops = match next_hops {
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
        let hops = match &sts {
            Some(d) => d
                .hops(hops, &transcript)
                .map_err(|why| deferred(why, "4.7.5", None))?,
            None => hops,
        };
        let mut last = format!("no reachable next hop for {domain}");
        let mut last_status = "4.4.1";
        let mut permanent = None;
        let mut addrs: Vec<(&str, SocketAddr)> = hops
            .iter()
            .flat_map(|h| {
                h.addrs
                    .iter()
                    .map(|ip| (h.name.as_str(), SocketAddr::new(*ip, h.port)))
            })
            .collect();
        if let Some(at) = prefer.and_then(|p| addrs.iter().position(|(_, a)| *a == p)) {
            let first = addrs.remove(at);
            addrs.insert(0, first);
        }
        // The partner's TLS policy, else [delivery] tls.
        let tls = self
            .config()
            .partner(domain)
            .and_then(|p| p.tls)
            .unwrap_or(self.client.tls);
        let tls = sts.as_ref().map_or(tls, |d| d.tls(tls));
        let client = ClientConfig {
            tls,
            ..self.client.clone()
        };
        let dane = self.config().delivery.dane;
        let mut dane_cache = crate::tls::dane::Cache::default();
        for (name, addr) in addrs {
            // DANE (RFC 7672) per host: may raise the policy, or rule the host out.
            let client = if dane {
                let servers = self.resolver.dnssec_servers();
                match crate::tls::dane::apply(&client, servers, name, addr.port(), &mut dane_cache)
                    .await
                {
                    Ok((c, note)) => {
                        trace(&transcript, &note);
                        c
                    }
                    Err(why) => {
                        warn!("{domain}: {why}");
                        trace(&transcript, &why);
                        last = why;
                        last_status = "4.7.5";
                        continue;
                    }
                }
            } else {
                client.clone()
            };
            trace(
                &transcript,
                &format!(
                    "connecting to {name}[{}]:{} (tls = {})",
                    addr.ip(),
                    addr.port(),
                    if client.dane.is_some() {
                        "dane".to_string()
                    } else {
                        client.tls.to_string()
                    }
                ),
            );
            match Connection::connect(addr, name, &client, transcript.clone()).await {
                Ok(c) => {
                    if let (Some(d), Some(sts)) = (&sts, &self.sts) {
                        d.check(&c, sts.connectors(), &transcript);
                    }
                    return Ok(Link::Remote(Box::new(c)));
                }
                Err(e) => {
                    let mut why = format!("connect to {name}[{}]:{}: {e}", addr.ip(), addr.port());
                    if let Some(d) = sts.as_ref().filter(|d| d.enforces()) {
                        why.push_str(&format!(
                            " (MTA-STS policy for {domain}: mode=enforce id={})",
                            d.id
                        ));
                    }
                    warn!("{domain}: {why}");
                    trace(&transcript, &why);
                    if e.is_permanent() && permanent.is_none() {
                        permanent = Some(why.clone());
                    }
                    last = why;
                    last_status = e.dsn_status();
                }
            }
        }
        // Like Postfix: a 5xx greeting from every hop is still only a reason to retry,
        // unless the domain has a single hop that refuses us for good.
        match permanent {
            Some(why) if hops.len() == 1 && hops[0].addrs.len() == 1 => Err(failed(why, "5.4.0")),
            _ => Err(deferred(last, last_status, None)),
        }
    }
}
