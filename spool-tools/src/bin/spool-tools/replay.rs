//! `replay`: re-inject every good message, pending recipients only, over SMTP or through a
//! sendmail-compatible command. One line per message; the caller turns failures into the
//! exit status.

use std::io::{self, BufWriter, Write};
use std::path::Path;
use std::process::{Command, Stdio};

use anyhow::Context;
use spool_tools::{ArchiveReader, ArchivedEnvelope, MessageBytes};

use crate::lines::{Lines, LF};
use crate::smtp::{Client, ConnError, Outcome};

/// Where messages go.
pub enum Target<'a> {
    Smtp { addr: &'a str, helo: &'a str },
    Sendmail { path: &'a Path },
}

/// Replays every good message of `reader`; returns how many failed.
pub fn replay(
    reader: &ArchiveReader,
    target: Target<'_>,
    out: &mut impl Write,
) -> anyhow::Result<usize> {
    let mut failed = 0;
    let mut session = Session::default();
    reader.for_each_message(|envelope, message| -> anyhow::Result<()> {
        let id = envelope.id.as_str();
        if envelope.pending().next().is_none() {
            writeln!(out, "{id}: skipped (no pending recipients)")?;
            return Ok(());
        }
        let ok = match &target {
            Target::Smtp { addr, helo } => {
                smtp_one(&mut session, addr, helo, &envelope, message, out)?
            }
            Target::Sendmail { path } => sendmail_one(path, &envelope, message, out)?,
        };
        if !ok {
            failed += 1;
        }
        out.flush()?;
        Ok(())
    })?;
    if let Some(c) = session.client {
        c.quit();
    }
    Ok(failed)
}

/// The SMTP connection shared by all messages: opened on demand, dropped when it breaks
/// (the next message reconnects). A failed connect is not tried again.
#[derive(Default)]
struct Session {
    client: Option<Client>,
    connect_error: Option<String>,
}

/// One message over the shared SMTP session.
fn smtp_one(
    session: &mut Session,
    addr: &str,
    helo: &str,
    env: &ArchivedEnvelope,
    message: &mut MessageBytes<'_>,
    out: &mut impl Write,
) -> io::Result<bool> {
    let id = &env.id;
    if let Some(e) = &session.connect_error {
        writeln!(out, "{id}: failed (not sent: {e})")?;
        return Ok(false);
    }
    if session.client.is_none() {
        match Client::connect(addr, helo) {
            Ok(c) => session.client = Some(c),
            Err(e) => {
                let e = format!("cannot talk to {addr}: {e}");
                writeln!(out, "{id}: failed ({e})")?;
                session.connect_error = Some(e);
                return Ok(false);
            }
        }
    }
    let client = session.client.as_mut().expect("connected above");
    match client.send(env, message) {
        Ok(Outcome::Sent { reply, refused }) => {
            if refused.is_empty() {
                writeln!(out, "{id}: sent ({reply})")?;
                return Ok(true);
            }
            let total = env.pending().count();
            let n = total - refused.len();
            writeln!(out, "{id}: sent to {n} of {total} recipients ({reply})")?;
            for (rcpt, r) in refused {
                writeln!(out, "{id}: <{rcpt}> refused ({r})")?;
            }
            Ok(false)
        }
        Ok(Outcome::Refused {
            stage,
            reply,
            refused,
        }) => {
            for (rcpt, r) in &refused {
                writeln!(out, "{id}: <{rcpt}> refused ({r})")?;
            }
            writeln!(out, "{id}: refused at {stage} ({reply})")?;
            Ok(false)
        }
        Err(e) => {
            session.client = None;
            let what = match e {
                ConnError::Io(e) => format!("connection to {addr}: {e}"),
                ConnError::Server(s) => s,
                // The archive changed under us: the connection goes without the final
                // dot, so the server drops what it had of the message; the replay ends.
                ConnError::Message(e) => return Err(e),
            };
            writeln!(out, "{id}: failed ({what})")?;
            Ok(false)
        }
    }
}

/// The sendmail argument vector after the program: `-i -f SENDER -- RCPT...`; the null
/// sender as `<>`, which Postfix, Sendmail and Exim all read as the null sender.
pub fn sendmail_args(env: &ArchivedEnvelope) -> Vec<String> {
    let sender = if env.sender.is_empty() {
        "<>"
    } else {
        env.sender.as_str()
    };
    let mut args = vec![
        "-i".to_string(),
        "-f".to_string(),
        sender.to_string(),
        "--".to_string(),
    ];
    args.extend(env.pending().map(|r| r.address.clone()));
    args
}

/// One message piped to the sendmail command, with LF line ends as a local command
/// expects, chunk by chunk as it is read. A command that cannot be started ends the whole
/// replay; so does a message that cannot be read (the command is killed before its input
/// ends, so it never takes a message cut short).
fn sendmail_one(
    path: &Path,
    env: &ArchivedEnvelope,
    message: &mut MessageBytes<'_>,
    out: &mut impl Write,
) -> anyhow::Result<bool> {
    let id = &env.id;
    let mut child = Command::new(path)
        .args(sendmail_args(env))
        .stdin(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot run {}", path.display()))?;
    let stdin = child.stdin.take().expect("stdin is piped");
    let mut lines = Lines::new(BufWriter::new(stdin), LF);
    let mut written = Ok(());
    loop {
        let chunk = match message.next_chunk() {
            Ok(Some(chunk)) => chunk,
            Ok(None) => break,
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(e.into());
            }
        };
        if let Err(e) = lines.write(chunk) {
            written = Err(e);
            break;
        }
    }
    // Ended (and standard input closed) before the wait.
    let written = written.and_then(|()| lines.finish()?.flush());
    let status = child
        .wait()
        .with_context(|| format!("waiting for {}", path.display()))?;
    if status.success() {
        if let Err(e) = written {
            // It exited 0 without reading everything: do not call that a success.
            writeln!(
                out,
                "{id}: failed ({} did not read the whole message: {e})",
                path.display()
            )?;
            return Ok(false);
        }
        writeln!(out, "{id}: sent ({} exited 0)", path.display())?;
        return Ok(true);
    }
    match status.code() {
        Some(code) => writeln!(
            out,
            "{id}: failed ({} exited with status {code})",
            path.display()
        )?,
        None => writeln!(
            out,
            "{id}: failed ({} was killed: {status})",
            path.display()
        )?,
    }
    Ok(false)
}
