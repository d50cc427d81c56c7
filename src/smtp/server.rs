//! The tokio driver of the inbound SMTP [`Session`]: accepts connections, enforces the
//! connection limits, moves bytes between the socket and the session, and stores finished
//! messages in the spool before the session may acknowledge them.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use anyhow::Context;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};
use tracing::{debug, error, info, warn};

use super::session::{Session, SessionConfig, SpoolGauge, Step, StoreFailure};
use crate::config::Config;
use crate::policy::Policy;
use crate::scheduler::Scheduler;
use crate::spool::Spool;

/// Shared by every connection.
struct Shared {
    config: Arc<SessionConfig>,
    policy: Arc<Policy>,
    gauge: Arc<SpoolGauge>,
    spool: Spool,
    scheduler: Arc<Scheduler>,
    idle_timeout: Duration,
    connections: Arc<Semaphore>,
    max_connections: usize,
    per_ip: Mutex<HashMap<IpAddr, usize>>,
    max_per_ip: usize,
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

/// Bind every `[smtp] listen` address; fails with the address that could not be bound.
pub async fn bind(config: &Config) -> anyhow::Result<Vec<TcpListener>> {
    let mut listeners = Vec::new();
    for addr in config.listen_addrs() {
        let l = TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot listen on {addr}"))?;
        listeners.push(l);
    }
    Ok(listeners)
}

/// Serve SMTP on `listeners` until `shutdown` turns true, then wait (a bounded time) for the
/// open sessions to end.
pub async fn run(
    config: &Config,
    spool: Spool,
    scheduler: Arc<Scheduler>,
    listeners: Vec<TcpListener>,
    mut shutdown: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let gauge = Arc::new(SpoolGauge::new(spool.free_bytes().unwrap_or(u64::MAX)));
    let shared = Arc::new(Shared {
        config: Arc::new(SessionConfig {
            hostname: config.hostname.clone(),
            max_message_size: config.smtp.max_message_size.0 as usize,
            max_recipients: config.smtp.max_recipients,
            max_errors: config.smtp.max_errors,
            recipient_overshoot: config.smtp.recipient_overshoot,
            min_free_space: config.queue.min_free_space.0,
        }),
        policy: Arc::new(Policy::new(config)),
        gauge: gauge.clone(),
        spool: spool.clone(),
        scheduler,
        idle_timeout: config.smtp.command_timeout.0,
        connections: Arc::new(Semaphore::new(config.smtp.max_connections)),
        max_connections: config.smtp.max_connections,
        per_ip: Mutex::new(HashMap::new()),
        max_per_ip: config.smtp.max_connections_per_ip,
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

    let mut accept_tasks = Vec::new();
    for listener in listeners {
        let addr = listener.local_addr()?;
        info!("listening on {addr}");
        let shared = shared.clone();
        let mut stop = shutdown.clone();
        accept_tasks.push(tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = stop.changed() => break,
                    accepted = listener.accept() => match accepted {
                        Ok((stream, peer)) => admit(shared.clone(), stream, peer),
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
    // Give open sessions a moment to finish their transaction.
    let deadline = Instant::now() + Duration::from_secs(10);
    while shared.connections.available_permits() < shared.max_connections
        && Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (commits, batches) = shared.spool.stats();
    info!("spool: {batches} writes in {commits} synced commits");
    Ok(())
}

/// Apply the connection limits, then run the session in its own task.
fn admit(shared: Arc<Shared>, stream: TcpStream, peer: SocketAddr) {
    let _ = stream.set_nodelay(true);
    let permit = shared.connections.clone().try_acquire_owned().ok();
    let ip = peer.ip();
    let slot = {
        let mut map = shared.per_ip.lock().unwrap_or_else(|p| p.into_inner());
        let n = map.entry(ip).or_insert(0);
        if *n < shared.max_per_ip {
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
        match (permit, slot) {
            (Some(permit), Some(slot)) => {
                if let Err(e) = session(shared, stream, peer, permit, slot).await {
                    debug!("connection from {peer}: {e}");
                }
            }
            (permit, _) => {
                let why = if permit.is_none() {
                    "too many connections"
                } else {
                    "too many connections from your address"
                };
                warn!("refused connection from {peer}: {why}");
                let msg = format!("421 4.7.0 {} Error: {why}\r\n", shared.config.hostname);
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

async fn session(
    shared: Arc<Shared>,
    mut stream: TcpStream,
    peer: SocketAddr,
    _permit: OwnedSemaphorePermit,
    _slot: IpSlot,
) -> std::io::Result<()> {
    debug!("connect from [{}]:{}", peer.ip(), peer.port());
    let mut s = Session::new(
        shared.config.clone(),
        shared.policy.clone(),
        shared.gauge.clone(),
        peer.ip(),
    );
    let mut buf = vec![0u8; 16 * 1024];
    let mut step = Step::Read;
    loop {
        step = match step {
            Step::Read => {
                let out = s.take_output();
                if !out.is_empty() {
                    stream.write_all(&out).await?;
                }
                match tokio::time::timeout(shared.idle_timeout, stream.read(&mut buf)).await {
                    Err(_) => s.timeout(),
                    Ok(Ok(0)) => s.eof(),
                    Ok(Ok(n)) => s.receive(&buf[..n], SystemTime::now()),
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
                let result = shared
                    .spool
                    .enqueue(incoming.envelope, incoming.message)
                    .await;
                let result = match result {
                    Ok(()) => {
                        info!("{id}: from=<{from}>, size={size}, nrcpt={nrcpt} (queued)");
                        // New mail is due now: try it at once, not at the next tick.
                        shared.scheduler.wake();
                        Ok(())
                    }
                    Err(e) if e.is_no_space() => {
                        error!("{id}: spool full, message refused: {e}");
                        Err(StoreFailure::NoSpace)
                    }
                    Err(e) => {
                        error!("{id}: spool write failed, message refused: {e}");
                        Err(StoreFailure::Spool)
                    }
                };
                s.stored(&id, result, SystemTime::now())
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
            Step::Close => {
                let out = s.take_output();
                if !out.is_empty() {
                    stream.write_all(&out).await?;
                }
                let _ = stream.shutdown().await;
                debug!("disconnect from [{}]:{}", peer.ip(), peer.port());
                return Ok(());
            }
        };
    }
}
