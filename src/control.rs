//! The control socket: how the queue commands reach a running `mxspool serve`.
//!
//! A Unix socket `control.sock` in the spool directory, mode 0600 (only the spool's owner
//! may use it). A client sends one [`Request`] as a JSON line; the server answers with JSON
//! lines `{"out": ...}` / `{"err": ...}` as the work proceeds, and a last `{"exit": N}`.
//! When nothing listens on the socket, the command opens the spool itself.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
use tokio::net::UnixListener;
use tokio::sync::{mpsc, watch};

use crate::admin::{execute, Ctx, Line, Request};

/// The socket of the spool at `spool`.
pub fn socket_path(spool: &Path) -> PathBuf {
    spool.join("control.sock")
}

/// One line of the server's answer.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
enum Answer {
    Out(String),
    Err(String),
    Raw(String),
    Progress { what: String, done: u64, total: u64 },
    Exit(i32),
}

/// Create the control socket of `spool` (the caller holds the spool's lock, so a socket
/// file already there is a dead server's).
pub fn bind(spool: &Path) -> anyhow::Result<UnixListener> {
    let path = socket_path(spool);
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path).map_err(|e| {
        anyhow::anyhow!(
            "cannot create the control socket {}: {}",
            path.display(),
            crate::config::os_error(&e)
        )
    })?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

/// Serve the control socket until `shutdown`.
pub async fn serve(
    listener: UnixListener,
    ctx: Arc<Ctx>,
    mut shutdown: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let path = socket_path(&ctx.config().spool);
    loop {
        tokio::select! {
            _ = shutdown.wait_for(|s| *s) => break,
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else { continue };
                let ctx = ctx.clone();
                tokio::spawn(async move {
                    if let Err(e) = session(ctx, stream).await {
                        tracing::debug!("control socket: {e}");
                    }
                });
            }
        }
    }
    let _ = std::fs::remove_file(&path);
    Ok(())
}

async fn session(ctx: Arc<Ctx>, stream: tokio::net::UnixStream) -> std::io::Result<()> {
    let (r, mut w) = stream.into_split();
    let mut line = String::new();
    tokio::io::BufReader::new(r).read_line(&mut line).await?;
    let req: Request = match serde_json::from_str(&line) {
        Ok(r) => r,
        Err(e) => {
            let a = Answer::Err(format!("bad control request: {e}"));
            w.write_all(format!("{}\n", json(&a)).as_bytes()).await?;
            w.write_all(format!("{}\n", json(&Answer::Exit(2))).as_bytes())
                .await?;
            return Ok(());
        }
    };
    let (tx, mut rx) = mpsc::unbounded_channel();
    let work = tokio::spawn(async move { execute(&ctx, req, &tx).await });
    while let Some(l) = rx.recv().await {
        let a = match l {
            Line::Out(s) => Answer::Out(s),
            Line::Err(s) => Answer::Err(s),
            Line::Raw(s) => Answer::Raw(s),
            Line::Progress { what, done, total } => Answer::Progress { what, done, total },
        };
        // A client that went away does not stop the work (a flush goes on).
        if w.write_all(format!("{}\n", json(&a)).as_bytes())
            .await
            .is_err()
        {
            break;
        }
    }
    let code = work.await.unwrap_or(1);
    w.write_all(format!("{}\n", json(&Answer::Exit(code))).as_bytes())
        .await?;
    Ok(())
}

fn json(a: &Answer) -> String {
    serde_json::to_string(a).unwrap_or_else(|_| "{\"exit\":1}".into())
}

/// Send `req` to the server of `spool`, printing its output as it comes. `Ok(None)` when no
/// server listens (the caller then opens the spool itself).
pub fn request(spool: &Path, req: &Request) -> anyhow::Result<Option<i32>> {
    let path = socket_path(spool);
    let stream = match std::os::unix::net::UnixStream::connect(&path) {
        Ok(s) => s,
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
            ) =>
        {
            return Ok(None)
        }
        Err(e) => anyhow::bail!(
            "cannot reach the server at {}: {}",
            path.display(),
            crate::config::os_error(&e)
        ),
    };
    let mut w = stream.try_clone()?;
    w.write_all(format!("{}\n", serde_json::to_string(req)?).as_bytes())?;
    let mut printer = crate::ops::output::Printer::default();
    for line in BufReader::new(stream).lines() {
        let line = line?;
        let answer = serde_json::from_str::<Answer>(&line);
        match answer {
            Ok(Answer::Progress { what, done, total }) => {
                printer.print(Line::Progress { what, done, total })
            }
            Ok(Answer::Out(s)) => printer.print(Line::Out(s)),
            Ok(Answer::Err(s)) => printer.print(Line::Err(s)),
            Ok(Answer::Raw(s)) => printer.print(Line::Raw(s)),
            Ok(Answer::Exit(code)) => return Ok(Some(code)),
            Err(_) => anyhow::bail!("garbled answer from the server: {line:?}"),
        }
        if printer.closed() {
            // Standard output was closed (`mxspool queue | head`): end quietly. The
            // server finishes what it started (a flush goes on).
            return Ok(Some(0));
        }
    }
    anyhow::bail!("the server closed the control socket before finishing")
}
