//! The administrator's queue operations that change the queue: flush, hold, release,
//! delete, bounce, export and import.
//!
//! Each is a [`Request`] run by [`execute`] against a spool and a scheduler. The same code
//! serves both paths: inside `mxspool serve`, reached through the control socket
//! (`crate::control`), and in the command's own process when no server runs. Output goes to
//! an [`Out`] channel line by line, so a long flush streams its transcript as it happens.

use std::path::PathBuf;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use crate::config::Config;
use crate::scheduler::{now_ms, Scheduler};
use crate::spool::Spool;

/// One operation, as sent over the control socket (JSON).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "kebab-case")]
pub enum Request {
    Flush {
        domain: Option<String>,
        verbose: bool,
    },
    Hold {
        domain: String,
    },
    Release {
        domain: String,
    },
    Delete {
        ids: Vec<String>,
        domain: Option<String>,
    },
    Bounce {
        ids: Vec<String>,
    },
    Export {
        domain: String,
        output: PathBuf,
        remove: bool,
    },
    Import {
        input: PathBuf,
    },
}

/// A line of output: for standard output or standard error.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Line {
    Out(String),
    Err(String),
}

pub type Out = mpsc::UnboundedSender<Line>;

fn say(out: &Out, s: impl Into<String>) {
    let _ = out.send(Line::Out(s.into()));
}

fn complain(out: &Out, s: impl Into<String>) {
    let _ = out.send(Line::Err(s.into()));
}

/// What an operation works with.
pub struct Ctx {
    pub config: Arc<Config>,
    pub spool: Spool,
    pub scheduler: Arc<Scheduler>,
}

/// A domain as the administrator typed it, or why it is not one.
fn domain_arg(d: &str) -> Result<String, String> {
    let d = d.trim_end_matches('.').to_ascii_lowercase();
    if crate::config::is_domain(&d) {
        Ok(d)
    } else {
        Err(format!("{d:?} is not a domain name"))
    }
}

/// Run `req`; returns the exit status (0 success, 1 something failed or stays queued).
pub async fn execute(ctx: &Ctx, req: Request, out: &Out) -> i32 {
    match run(ctx, req, out).await {
        Ok(code) => code,
        Err(e) => {
            complain(out, e);
            1
        }
    }
}

async fn run(ctx: &Ctx, req: Request, out: &Out) -> Result<i32, String> {
    match req {
        Request::Flush { domain, verbose } => flush(ctx, domain, verbose, out).await,
        Request::Hold { domain } => {
            let d = domain_arg(&domain)?;
            let n = ctx
                .spool
                .hold(&d, now_ms())
                .await
                .map_err(|e| e.to_string())?;
            tracing::info!("{d}: put on hold by the administrator ({n} entries)");
            say(out, format!("{d}: on hold ({n} message(s) held now)"));
            Ok(0)
        }
        Request::Release { domain } => {
            let d = domain_arg(&domain)?;
            let was_held = ctx.spool.held_since(&d).is_some();
            let n = ctx
                .spool
                .release(&d, now_ms())
                .await
                .map_err(|e| e.to_string())?;
            ctx.scheduler.wake();
            tracing::info!("{d}: released by the administrator ({n} entries due now)");
            if was_held {
                say(out, format!("{d}: released, {n} message(s) due now"));
            } else {
                say(out, format!("{d}: was not on hold"));
            }
            Ok(0)
        }
        Request::Delete { ids, domain } => delete(ctx, ids, domain, out).await,
        Request::Bounce { ids } => bounce(ctx, ids, out).await,
        Request::Export { .. } | Request::Import { .. } => {
            Err("export and import are not available in this build".into())
        }
    }
}

async fn flush(ctx: &Ctx, domain: Option<String>, verbose: bool, out: &Out) -> Result<i32, String> {
    let domains = match domain {
        Some(d) => vec![domain_arg(&d)?],
        None => {
            let spool = ctx.spool.clone();
            tokio::task::spawn_blocking(move || spool.domains())
                .await
                .map_err(|e| e.to_string())?
                .map_err(|e| e.to_string())?
        }
    };
    let mut left_total = 0;
    for d in domains {
        let transcript: Option<crate::delivery::Transcript> = verbose.then(|| {
            let out = out.clone();
            Arc::new(move |line: &str| {
                let _ = out.send(Line::Out(line.to_string()));
            }) as crate::delivery::Transcript
        });
        if verbose {
            say(out, format!("Running queue for {d}"));
        }
        let (tried, left) = ctx.scheduler.flush_domain(&d, transcript, true).await;
        left_total += left;
        match (tried, left) {
            (0, _) => say(out, format!("{d}: nothing queued")),
            (n, 0) => say(
                out,
                format!("{d}: {n} message(s) delivered or returned, none left"),
            ),
            (n, l) => say(out, format!("{d}: {n} message(s) tried, {l} still queued")),
        }
    }
    Ok(i32::from(left_total > 0))
}

/// The domains that have message `id` queued, or an error line for an unknown id.
async fn domains_of(ctx: &Ctx, id: &str) -> Result<Vec<String>, String> {
    if id.is_empty() || id.contains('\0') {
        return Err(format!("{id:?} is not a queue id"));
    }
    let spool = ctx.spool.clone();
    let key = id.to_string();
    let stored = tokio::task::spawn_blocking(move || spool.stored_envelope(&key))
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
    match stored {
        Some(s) => Ok(s.domains),
        None => Err(format!("{id}: no such message in the queue")),
    }
}

async fn delete(
    ctx: &Ctx,
    ids: Vec<String>,
    domain: Option<String>,
    out: &Out,
) -> Result<i32, String> {
    let mut targets: Vec<(String, String)> = Vec::new();
    let mut bad = 0;
    for id in &ids {
        match domains_of(ctx, id).await {
            Ok(ds) => targets.extend(ds.into_iter().map(|d| (d, id.clone()))),
            Err(e) => {
                complain(out, e);
                bad += 1;
            }
        }
    }
    if let Some(d) = domain {
        let d = domain_arg(&d)?;
        let mut after: Option<String> = None;
        loop {
            let chunk = ctx
                .spool
                .domain_entries(&d, after.as_deref(), 1000)
                .map_err(|e| e.to_string())?;
            let Some((last, _)) = chunk.last() else { break };
            after = Some(last.clone());
            targets.extend(chunk.into_iter().map(|(id, _)| (d.clone(), id)));
        }
    }
    let mut removed = 0;
    for (d, id) in &targets {
        if ctx.spool.remove(d, id).await.map_err(|e| e.to_string())? {
            tracing::info!("{id}: removed from the {d} queue by the administrator");
            removed += 1;
        }
    }
    say(
        out,
        format!(
            "{removed} queue entr{} deleted",
            if removed == 1 { "y" } else { "ies" }
        ),
    );
    Ok(i32::from(bad > 0))
}

async fn bounce(ctx: &Ctx, ids: Vec<String>, out: &Out) -> Result<i32, String> {
    let mut bad = 0;
    for id in &ids {
        match domains_of(ctx, id).await {
            Ok(ds) => {
                for d in ds {
                    ctx.scheduler.bounce(&d, id).await;
                }
                say(out, format!("{id}: returned to sender"));
            }
            Err(e) => {
                complain(out, e);
                bad += 1;
            }
        }
    }
    ctx.scheduler.wake();
    Ok(i32::from(bad > 0))
}
