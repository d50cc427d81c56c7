//! The tokio driver of the inbound SMTP [`Session`]: accepts connections, enforces the
//! connection limits, moves bytes between the socket and the session, and stores finished
//! messages in the spool before the session may acknowledge them.
//!
//! Each session takes the configuration snapshot in force when it connects and keeps it to
//! its end (a reload affects the sessions that start after it). On shutdown, sessions
//! waiting for a command get `421 4.3.2` at once; a message in DATA may finish, within
//! `command_timeout`.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};
use tracing::{debug, error, info, warn};

use super::counts::CommandCounts;
use super::screen::{self, Screen};
use super::session::{Event, Session, SpoolGauge, Step, StoreFailure};
use crate::config::Config;
use crate::ops::live::Live;
use crate::ops::metrics::{label, Metrics};
use crate::policy::quota::Quotas;
use crate::scheduler::Scheduler;
use crate::spool::Spool;
use crate::tls::server::Conn;
use crate::tls::TlsInfo;

/// Shared by every connection.
struct Shared {
    live: Arc<Live>,
    gauge: Arc<SpoolGauge>,
    spool: Spool,
    scheduler: Arc<Scheduler>,
    connections: Arc<Semaphore>,
    max_connections: usize,
    per_ip: Mutex<HashMap<IpAddr, usize>>,
    shutdown: watch::Receiver<bool>,
    metrics: Arc<Metrics>,
    /// Rate limits and blocklists: their state outlives reloads.
    screen: Arc<Screen>,
    /// Per-partner quotas: the places taken by messages being stored.
    quotas: Arc<Quotas>,
}

/// Counts a connection in the `smtp_connections` gauge while it is open (whichever way it
/// ends: closed, refused, an I/O error).
struct Open(Arc<Metrics>);

impl Open {
    fn new(metrics: &Arc<Metrics>) -> Open {
        metrics.connections.inc();
        Open(metrics.clone())
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        self.0.connections.dec();
    }
}

/// The parts a session stored of a message not yet queued (`Step::WritePart`): removed
/// when the message is refused or its commit fails, and when the session ends in its DATA
/// however it ends (dropped with the session's task).
struct StoredParts {
    spool: Spool,
    gauge: Arc<SpoolGauge>,
    id: String,
    written: u32,
    bytes: u64,
}

impl StoredParts {
    fn new(spool: Spool, gauge: Arc<SpoolGauge>) -> StoredParts {
        StoredParts {
            spool,
            gauge,
            id: String::new(),
            written: 0,
            bytes: 0,
        }
    }

    fn add(&mut self, id: &str, bytes: u64) {
        if self.id != id {
            self.id = id.to_string();
            self.written = 0;
            self.bytes = 0;
        }
        self.written += 1;
        self.bytes += bytes;
    }

    /// The message was queued: its parts are its own now.
    fn keep(&mut self) {
        self.written = 0;
        self.bytes = 0;
    }

    /// Remove them (in the background; a crash meanwhile leaves them to the sweep at start).
    fn discard(&mut self) {
        if self.written == 0 {
            return;
        }
        let (spool, id, written) = (self.spool.clone(), self.id.clone(), self.written);
        self.gauge.refund(self.bytes);
        self.keep();
        tokio::task::spawn_blocking(move || {
            if let Err(e) = spool.discard_parts(&id, written) {
                warn!("{id}: cannot remove the parts of a message not queued: {e}");
            }
        });
    }
}

impl Drop for StoredParts {
    fn drop(&mut self) {
        self.discard();
    }
}

/// Adds what a session counted to the metrics.
fn count(metrics: &Metrics, events: Vec<Event>) {
    for e in events {
        match e {
            Event::Accepted => {
                metrics.accepted_messages.inc();
            }
            Event::RefusedRecipient(reason) => {
                metrics
                    .refused_recipients
                    .get_or_create(&label("reason", reason))
                    .inc();
            }
            Event::RefusedMessage(reason) => {
                metrics
                    .refused_messages
                    .get_or_create(&label("reason", reason))
                    .inc();
            }
        }
    }
}

/// Releases a client's per-IP slot when its connection ends.
struct IpSlot {
    shared: Arc<Shared>,
    ip: IpAddr,
}

impl Drop for IpSlot {
    fn drop(&mut self) {
        let mut map = self.shared.per_ip.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = map.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.ip);
            }
        }
    }
}

/// The `[smtp] listen` sockets, bound (before the privilege drop: port 25 needs root) but not
/// yet listening, so no client is taken in before the server is ready ([`listen`]).
pub struct Bound(Vec<(SocketAddr, socket2::Socket)>);

/// Bind every `[smtp] listen` address; fails with the address that could not be bound.
pub fn bind(config: &Config) -> anyhow::Result<Bound> {
    let mut sockets = Vec::new();
    for addr in config.listen_addrs() {
        sockets.push((addr, bind_socket(addr)?));
    }
    Ok(Bound(sockets))
}

/// A TCP socket bound to `addr` (address reuse on), not yet listening.
pub fn bind_socket(addr: SocketAddr) -> anyhow::Result<socket2::Socket> {
    use socket2::{Domain, Socket, Type};
    let fail = |e: std::io::Error| {
        anyhow::anyhow!("cannot listen on {addr}: {}", crate::config::os_error(&e))
    };
    let s = Socket::new(Domain::for_address(addr), Type::STREAM, None).map_err(fail)?;
    s.set_reuse_address(true).map_err(fail)?;
    // `[::]:25` is IPv6 only, so it can be listed beside `0.0.0.0:25` (as Postfix binds
    // each protocol on its own socket) instead of failing with "address in use".
    if addr.is_ipv6() {
        s.set_only_v6(true).map_err(fail)?;
    }
    s.bind(&addr.into()).map_err(fail)?;
    Ok(s)
}

/// Start listening on the bound sockets (inside the runtime, once the spool and the control
/// socket are there: a client that connects is served).
pub fn listen(bound: Bound) -> anyhow::Result<Vec<TcpListener>> {
    bound
        .0
        .into_iter()
        .map(|(addr, s)| listen_socket(addr, s))
        .collect()
}

/// Start listening on one socket from [`bind_socket`] (inside the runtime).
pub fn listen_socket(addr: SocketAddr, s: socket2::Socket) -> anyhow::Result<TcpListener> {
    let fail = |e: std::io::Error| {
        anyhow::anyhow!("cannot listen on {addr}: {}", crate::config::os_error(&e))
    };
    s.listen(1024).map_err(fail)?;
    s.set_nonblocking(true).map_err(fail)?;
    TcpListener::from_std(s.into()).map_err(fail)
}

/// Serve SMTP on `listeners` until `shutdown` turns true, then wait (a bounded time) for the
/// open sessions to end.
pub async fn run(
    live: Arc<Live>,
    spool: Spool,
    scheduler: Arc<Scheduler>,
    listeners: Vec<TcpListener>,
    metrics: Arc<Metrics>,
    mut shutdown: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let gauge = Arc::new(SpoolGauge::new(spool.free_bytes().unwrap_or(u64::MAX)));
    // max_connections sizes the semaphore: it takes effect at start only, and never beyond
    // what the descriptors allow once the spool and the deliveries have their share.
    let max_connections = {
        use crate::ops::descriptors;
        let config = live.config();
        let limit = descriptors::limit();
        let budget = descriptors::session_budget(
            limit,
            Spool::descriptor_reserve(),
            config.queue.max_deliveries,
        );
        if config.smtp.max_connections > budget {
            warn!(
                "max_connections {} is more than the descriptor limit allows ({limit}, of which the spool keeps {} and {} deliveries {}): at most {budget} sessions, the others get 421 4.7.0 (raise LimitNOFILE)",
                config.smtp.max_connections,
                Spool::descriptor_reserve(),
                config.queue.max_deliveries,
                descriptors::PER_DELIVERY * config.queue.max_deliveries as u64,
            );
        }
        config.smtp.max_connections.min(budget)
    };
    let shared = Arc::new(Shared {
        live,
        gauge: gauge.clone(),
        spool: spool.clone(),
        scheduler,
        connections: Arc::new(Semaphore::new(max_connections)),
        max_connections,
        per_ip: Mutex::new(HashMap::new()),
        shutdown: shutdown.clone(),
        metrics,
        screen: Arc::new(Screen::default()),
        quotas: Quotas::new(spool.clone()),
    });

    // Free space is read once a second, off the sessions' path.
    let gauge_spool = spool.clone();
    let gauge_task = tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tick.tick().await;
            let s = gauge_spool.clone();
            if let Ok(Ok(free)) = tokio::task::spawn_blocking(move || s.free_bytes()).await {
                gauge.set(free);
            }
        }
    });

    // The callout answers and MTA-STS policies cached in the spool: the expired ones go at
    // start and hourly.
    let sweep_spool = spool.clone();
    let sweep_task = tokio::spawn(async move {
        let mut tick = tokio::time::interval(CALLOUT_SWEEP);
        loop {
            tick.tick().await;
            let s = sweep_spool.clone();
            let now = crate::scheduler::now_ms();
            match tokio::task::spawn_blocking(move || s.callout_sweep(now)).await {
                Ok(Ok((0, _))) => {}
                Ok(Ok((removed, kept))) => {
                    info!("callout cache: {removed} expired answer(s) removed, {kept} kept")
                }
                Ok(Err(e)) => warn!("callout cache sweep failed: {e}"),
                Err(e) => warn!("callout cache sweep failed: {e}"),
            }
            let s = sweep_spool.clone();
            match tokio::task::spawn_blocking(move || s.sts_sweep(now)).await {
                Ok(Ok((0, _))) => {}
                Ok(Ok((removed, kept))) => {
                    info!("MTA-STS cache: {removed} expired policies removed, {kept} kept")
                }
                Ok(Err(e)) => warn!("MTA-STS cache sweep failed: {e}"),
                Err(e) => warn!("MTA-STS cache sweep failed: {e}"),
            }
        }
    });

    // Every accepted socket holds one of these until it is closed: the sessions, and a few
    // connections being told 421.
    let sockets = Arc::new(Semaphore::new(max_connections + REFUSING));
    let mut accept_tasks = Vec::new();
    for listener in listeners {
        let addr = listener.local_addr()?;
        info!("listening on {addr}");
        let shared = shared.clone();
        let mut stop = shutdown.clone();
        let sockets = sockets.clone();
        accept_tasks.push(tokio::spawn(async move {
            loop {
                // A descriptor for the next socket first: beyond the sessions and the
                // refusals being written, connections wait in the listen queue, and the
                // spool's and the deliveries' descriptors are never touched.
                let Ok(socket) = sockets.clone().acquire_owned().await else {
                    break;
                };
                tokio::select! {
                    _ = stop.changed() => break,
                    accepted = listener.accept() => match accepted {
                        Ok((stream, peer)) => admit(shared.clone(), stream, peer, socket),
                        Err(e) => {
                            // Out of file descriptors and the like: back off, do not spin.
                            warn!("accept on {addr}: {e}");
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                    },
                }
            }
        }));
    }

    let _ = shutdown.wait_for(|stop| *stop).await;
    info!("shutting down: no new connections");
    for t in &accept_tasks {
        t.abort();
    }
    gauge_task.abort();
    sweep_task.abort();
    // Idle sessions got 421 at once; a message in DATA may finish within command_timeout.
    let grace = shared.live.config().smtp.command_timeout.0;
    let deadline = Instant::now() + grace + Duration::from_secs(1);
    while shared.connections.available_permits() < shared.max_connections
        && Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let open = shared.max_connections - shared.connections.available_permits();
    if open > 0 {
        warn!("{open} session(s) still open after {grace:?}: closed");
    }
    let (commits, batches) = shared.spool.stats();
    info!("spool: {batches} writes in {commits} synced commits");
    Ok(())
}

/// How often the expired callout answers are removed from the spool.
const CALLOUT_SWEEP: Duration = Duration::from_secs(3600);

/// Connections being refused (`421 4.7.0`) at once, beyond the sessions: their descriptors
/// come out of [`crate::ops::descriptors::MARGIN`].
const REFUSING: usize = 32;

/// Apply the connection limits, then run the session in its own task (which holds
/// `socket`, the socket's share of the descriptors, until it ends).
fn admit(shared: Arc<Shared>, stream: TcpStream, peer: SocketAddr, socket: OwnedSemaphorePermit) {
    let open = Open::new(&shared.metrics);
    let _ = stream.set_nodelay(true);
    let permit = shared.connections.clone().try_acquire_owned().ok();
    let ip = peer.ip();
    let snapshot = shared.live.snapshot();
    let slot = {
        let mut map = shared.per_ip.lock().unwrap_or_else(|p| p.into_inner());
        let n = map.entry(ip).or_insert(0);
        if *n < snapshot.config.smtp.max_connections_per_ip {
            *n += 1;
            Some(IpSlot {
                shared: shared.clone(),
                ip,
            })
        } else {
            None
        }
    };
    tokio::spawn(async move {
        let _socket = socket;
        let _open = open;
        match (permit, slot) {
            (Some(permit), Some(slot)) => {
                info!("connect from unknown[{}]", peer.ip());
                let mut counts = CommandCounts::default();
                if let Some(refused) = shared.screen.at_connect(&snapshot, peer.ip()).await {
                    shared
                        .metrics
                        .refused_connections
                        .get_or_create(&label("reason", refused.reason))
                        .inc();
                    screen::refuse(stream, &refused).await;
                } else if let Err(e) =
                    session(shared, snapshot, stream, peer, permit, slot, &mut counts).await
                {
                    debug!("connection from {peer}: {e}");
                }
                info!(
                    "disconnect from unknown[{}] {}",
                    peer.ip(),
                    counts.summary()
                );
            }
            (permit, _) => {
                let (why, reason) = if permit.is_none() {
                    ("too many connections", "max_connections")
                } else {
                    (
                        "too many connections from your address",
                        "max_connections_per_ip",
                    )
                };
                shared
                    .metrics
                    .refused_connections
                    .get_or_create(&label("reason", reason))
                    .inc();
                warn!("refused connection from {peer}: {why}");
                let msg = format!("421 4.7.0 {} Error: {why}\r\n", snapshot.session.hostname);
                let mut stream = stream;
                let _ = tokio::time::timeout(Duration::from_secs(5), async {
                    stream.write_all(msg.as_bytes()).await?;
                    stream.shutdown().await
                })
                .await;
            }
        }
    });
}

/// How a failed store answers the client, and what to log.
fn store_failure(e: crate::spool::SpoolError) -> (StoreFailure, String) {
    let f = if e.is_no_space() {
        StoreFailure::NoSpace
    } else {
        StoreFailure::Spool
    };
    (f, e.to_string())
}

#[allow(clippy::too_many_arguments)]
async fn session(
    shared: Arc<Shared>,
    snapshot: Arc<crate::ops::live::Snapshot>,
    stream: TcpStream,
    peer: SocketAddr,
    _permit: OwnedSemaphorePermit,
    _slot: IpSlot,
    counts: &mut CommandCounts,
) -> std::io::Result<()> {
    let mut s = Session::new(
        snapshot.session.clone(),
        snapshot.policy.clone(),
        shared.gauge.clone(),
        peer.ip(),
    );
    if let Some(gate) = shared.screen.message_gate(&snapshot, peer.ip()) {
        s.set_message_gate(gate);
    }
    if snapshot.policy.has_quotas() {
        s.set_quota_gate(shared.quotas.gate(snapshot.policy.clone()));
    }
    let idle_timeout = snapshot.config.smtp.command_timeout.0;
    let mut stop = shared.shutdown.clone();
    let shutting_down = format!(
        "421 4.3.2 {} Service shutting down, closing transmission channel\r\n",
        snapshot.session.hostname
    );
    // Clear until STARTTLS; the rest of the loop does not care which.
    let mut stream = Conn::Plain(stream);
    let mut buf = vec![0u8; 16 * 1024];
    let mut parts = StoredParts::new(shared.spool.clone(), shared.gauge.clone());
    let mut step = Step::Read;
    loop {
        count(&shared.metrics, s.take_events());
        step = match step {
            Step::Read => {
                let out = s.take_output();
                if !out.is_empty() {
                    stream.write_all(&out).await?;
                }
                let in_data = s.in_data();
                let stopping = *stop.borrow();
                if in_data {
                    counts.reset_line();
                }
                let read = tokio::time::timeout(idle_timeout, stream.read(&mut buf));
                let got = if in_data {
                    Some(read.await)
                } else if stopping {
                    None
                } else {
                    let stopped = async {
                        let _ = stop.wait_for(|s| *s).await;
                    };
                    tokio::select! {
                        r = read => Some(r),
                        () = stopped => None,
                    }
                };
                let Some(got) = got else {
                    // Waiting for a command while the server stops: say so now.
                    stream.write_all(shutting_down.as_bytes()).await?;
                    let _ = stream.shutdown().await;
                    return Ok(());
                };
                match got {
                    Err(_) => s.timeout(),
                    Ok(Ok(0)) => s.eof(),
                    Ok(Ok(n)) => {
                        if !in_data {
                            counts.commands(&buf[..n]);
                        }
                        s.receive(&buf[..n], SystemTime::now())
                    }
                    Ok(Err(e)) => return Err(e),
                }
            }
            Step::Store(incoming) => {
                let env = &incoming.envelope;
                let (id, from, size, nrcpt) = (
                    env.id.clone(),
                    env.sender.clone(),
                    env.size,
                    env.recipients.len(),
                );
                // Room for it, with min_free_space left for RocksDB, before any commit: a
                // full disk gives 452 here, never a failed commit.
                // (Parts stored ahead took their room when they were written.)
                let m = &incoming.message;
                let cost = m.len() - m.written_len + 4096;
                let floor = snapshot.config.queue.min_free_space.0;
                // Its place in each partner's quota, held until the commit is over.
                let mut domains: Vec<String> = Vec::new();
                for r in &env.recipients {
                    let d = crate::envelope::domain_of(&r.address);
                    if !domains.contains(&d) {
                        domains.push(d);
                    }
                }
                let place = shared.quotas.reserve(&snapshot.policy, &domains, size);
                let result = match &place {
                    Err(why) => Err((StoreFailure::Quota(why.clone()), why.clone())),
                    Ok(_) if shared.gauge.take(cost, floor) => {
                        let r = shared
                            .spool
                            .enqueue_parts(incoming.envelope, incoming.message)
                            .await;
                        if r.is_err() {
                            shared.gauge.refund(cost);
                        }
                        r.map_err(store_failure)
                    }
                    Ok(_) => Err(store_failure(crate::spool::SpoolError::NoSpace)),
                };
                drop(place);
                match result {
                    Ok(()) => parts.keep(),
                    Err(_) => parts.discard(),
                }
                let result = match result {
                    Ok(()) => {
                        info!("{id}: from=<{from}>, size={size}, nrcpt={nrcpt} (queued)");
                        // New mail is due now: try it at once, not at the next tick.
                        shared.scheduler.wake();
                        Ok(())
                    }
                    Err((f, e)) => {
                        match &f {
                            StoreFailure::NoSpace => {
                                error!("{id}: spool full, message refused: {e}")
                            }
                            StoreFailure::Quota(_) => {
                                info!("{id}: from=<{from}>, size={size}: refused: {e}")
                            }
                            StoreFailure::Spool => {
                                error!("{id}: spool write failed, message refused: {e}")
                            }
                        }
                        Err(f)
                    }
                };
                s.stored(&id, result, SystemTime::now())
            }
            Step::WritePart { id, n, bytes } => {
                let len = bytes.len() as u64;
                let floor = snapshot.config.queue.min_free_space.0;
                let result = if shared.gauge.take(len, floor) {
                    let spool = shared.spool.clone();
                    let id2 = id.clone();
                    let r = tokio::task::spawn_blocking(move || spool.write_part(&id2, n, &bytes))
                        .await
                        .unwrap_or_else(|e| {
                            Err(crate::spool::SpoolError::Db(format!(
                                "write task failed: {e}"
                            )))
                        });
                    if r.is_err() {
                        shared.gauge.refund(len);
                    }
                    r
                } else {
                    Err(crate::spool::SpoolError::NoSpace)
                };
                let result = match result {
                    Ok(()) => {
                        parts.add(&id, len);
                        Ok(())
                    }
                    Err(e) if e.is_no_space() => {
                        error!("{id}: spool full, message will be refused: {e}");
                        Err(StoreFailure::NoSpace)
                    }
                    Err(e) => {
                        error!("{id}: spool write failed, message will be refused: {e}");
                        Err(StoreFailure::Spool)
                    }
                };
                s.part_written(result, SystemTime::now())
            }
            Step::Discard { id, written } => {
                debug!("{id}: removing the {written} part(s) of a refused message");
                parts.discard();
                s.resume(SystemTime::now())
            }
            Step::Etrn { domain, subdomains } => {
                let (started, held) = shared.scheduler.etrn(&domain, subdomains).await;
                info!(
                    "ETRN {domain} from [{}]: {started} message(s) started{}",
                    peer.ip(),
                    if held { ", domain on hold" } else { "" }
                );
                s.etrn_done(&domain, started, held, SystemTime::now())
            }
            Step::StartTls => {
                // The 220 (and the replies before it) go out in clear; what the client sent
                // behind STARTTLS was dropped by the session, and nothing is read from the
                // socket but the handshake.
                let out = s.take_output();
                stream.write_all(&out).await?;
                let (Conn::Plain(tcp), Some(acceptor)) = (stream, snapshot.tls.clone()) else {
                    return Ok(());
                };
                match tokio::time::timeout(idle_timeout, acceptor.accept(tcp)).await {
                    Ok(Ok(tls)) => {
                        let info = TlsInfo::of(tls.get_ref().1);
                        info!(
                            "Anonymous TLS connection established from unknown[{}]: {}",
                            peer.ip(),
                            info.summary()
                        );
                        stream = Conn::Tls(Box::new(tls));
                        s.tls_started(info)
                    }
                    Ok(Err(e)) => {
                        warn!("TLS handshake failed with unknown[{}]: {e}", peer.ip());
                        return Ok(());
                    }
                    Err(_) => {
                        warn!("TLS handshake with unknown[{}] timed out", peer.ip());
                        return Ok(());
                    }
                }
            }
            Step::Verify(address) => {
                let verdict = shared
                    .screen
                    .verify(&snapshot, &shared.spool, &address)
                    .await;
                s.verified(verdict, SystemTime::now())
            }
            Step::Close => {
                let out = s.take_output();
                if !out.is_empty() {
                    stream.write_all(&out).await?;
                }
                let _ = stream.shutdown().await;
                return Ok(());
            }
        };
    }
}
