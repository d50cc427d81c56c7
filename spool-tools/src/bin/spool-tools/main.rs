//! `spool-tools ARCHIVE <command>`: look into, check, and replay an mxspool archive.

mod lines;
mod mbox;
mod replay;
mod smtp;

use std::io::{self, BufWriter, Write};
use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use spool_tools::cli::{Cli, Cmd};
use spool_tools::terminal::Safe;
use spool_tools::{format_time, ArchiveReader, ArchivedEnvelope, Compression, ReadOptions};

use crate::replay::Target;

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(e) if is_broken_pipe(&e) => ExitCode::SUCCESS,
        Err(e) => {
            let line = spool_tools::terminal::error_line(e.chain().map(|c| c.to_string()));
            eprintln!("spool-tools: {line}");
            ExitCode::FAILURE
        }
    }
}

fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<io::Error>()
            .is_some_and(|e| e.kind() == io::ErrorKind::BrokenPipe)
    })
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let options = ReadOptions {
        salvage: cli.salvage,
        ..Default::default()
    };
    let reader = ArchiveReader::open_with(&cli.archive, options)?;
    let stdout = io::stdout();
    // Message bytes and envelope fields come from whoever sent the mail: shown on a
    // terminal, their control characters are escaped, never obeyed.
    let tty = io::IsTerminal::is_terminal(&stdout);
    let mut out = Safe::new(BufWriter::new(stdout.lock()), tty);
    let ok = match cli.command {
        Cmd::List => list(&reader, &mut out)?,
        Cmd::Verify => verify(&reader, &mut out)?,
        Cmd::Cat { id } => {
            // Chunk by chunk: a large message is never whole in memory. Should the file
            // change under us, what was written is followed by the error and exit 1.
            reader.with_message(&id, |_, bytes| -> anyhow::Result<()> {
                while let Some(chunk) = bytes.next_chunk()? {
                    out.write_all(chunk)?;
                }
                Ok(())
            })?;
            true
        }
        Cmd::Mbox => {
            reader.for_each_message(|env, bytes| -> anyhow::Result<()> {
                Ok(mbox::write_message(&mut out, &env, bytes)?)
            })?;
            warn_problems(&reader)
        }
        Cmd::Replay {
            smtp,
            helo,
            sendmail,
        } => {
            let helo = helo.unwrap_or_else(host_name);
            let target = match (&smtp, &sendmail) {
                (Some(addr), _) => Target::Smtp { addr, helo: &helo },
                (None, Some(path)) => Target::Sendmail { path },
                (None, None) => unreachable!("clap requires one target"),
            };
            let failed = replay::replay(&reader, target, &mut out)?;
            for p in reader.problems() {
                writeln!(out, "{}: not replayed (damaged: {})", p.subject, p.what)?;
            }
            failed == 0 && reader.problems().is_empty()
        }
    };
    out.flush().context("writing to standard output")?;
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// `list`: a table of the good messages, then a count line; damage on stderr.
fn list(reader: &ArchiveReader, out: &mut impl Write) -> anyhow::Result<bool> {
    let mut rows: Vec<[String; 5]> = Vec::new();
    let (mut bytes, mut pending) = (0u64, 0usize);
    reader.for_each_envelope(|env, size| -> anyhow::Result<()> {
        bytes += size;
        pending += env.pending().count();
        rows.push(row(&env, size));
        Ok(())
    })?;
    let header = [
        "ID",
        "ARRIVAL (UTC)",
        "SIZE",
        "SENDER",
        "PENDING RECIPIENTS",
    ]
    .map(String::from);
    let mut widths = [0usize; 4];
    for r in std::iter::once(&header).chain(&rows) {
        for (w, cell) in widths.iter_mut().zip(r.iter()) {
            *w = (*w).max(cell.chars().count());
        }
    }
    for r in std::iter::once(&header).chain(&rows) {
        let line = format!(
            "{:<w0$}  {:<w1$}  {:>w2$}  {:<w3$}  {}",
            r[0],
            r[1],
            r[2],
            r[3],
            r[4],
            w0 = widths[0],
            w1 = widths[1],
            w2 = widths[2],
            w3 = widths[3],
        );
        writeln!(out, "{}", line.trim_end())?;
    }
    let n = rows.len();
    writeln!(
        out,
        "-- {n} message{}, {pending} pending recipient{}, {bytes} bytes",
        plural(n),
        plural(pending)
    )?;
    Ok(warn_problems(reader))
}

fn row(env: &ArchivedEnvelope, size: u64) -> [String; 5] {
    let sender = if env.sender.is_empty() {
        "<>".to_string()
    } else {
        env.sender.clone()
    };
    let pending: Vec<&str> = env.pending().map(|r| r.address.as_str()).collect();
    let pending = if pending.is_empty() {
        "(none pending)".to_string()
    } else {
        pending.join(", ")
    };
    let arrival = env.arrival.format("%Y-%m-%d %H:%M:%S").to_string();
    [env.id.clone(), arrival, size.to_string(), sender, pending]
}

/// `verify`: `OK: N messages` or each problem; false when there is any.
fn verify(reader: &ArchiveReader, out: &mut impl Write) -> anyhow::Result<bool> {
    let n = reader.len();
    if reader.problems().is_empty() {
        let mut about = Vec::new();
        if let Some(meta) = reader.meta() {
            if let Some(d) = &meta.domain {
                about.push(format!("domain {d}"));
            }
            about.push(format!("from {}", meta.source_host));
            about.push(format!("created {}", format_time(&meta.created)));
        }
        if reader.compression() == Compression::Gzip {
            about.push("gzip".to_string());
        }
        writeln!(out, "OK: {n} message{} ({})", plural(n), about.join(", "))?;
        return Ok(true);
    }
    for p in reader.problems() {
        writeln!(out, "{p}")?;
    }
    let bad = reader.problems().len();
    writeln!(
        out,
        "FAILED: {bad} problem{}, {n} good message{}",
        plural(bad),
        plural(n)
    )?;
    Ok(false)
}

/// Damaged messages go to stderr; true when there are none.
fn warn_problems(reader: &ArchiveReader) -> bool {
    for p in reader.problems() {
        eprintln!(
            "spool-tools: skipped {}",
            spool_tools::terminal::escape_line(&p.to_string())
        );
    }
    reader.problems().is_empty()
}

fn plural(n: usize) -> &'static str {
    if n == 1 {
        ""
    } else {
        "s"
    }
}

/// This host's name for EHLO.
fn host_name() -> String {
    ["/proc/sys/kernel/hostname", "/etc/hostname"]
        .iter()
        .filter_map(|p| std::fs::read_to_string(p).ok())
        .map(|s| s.trim().to_string())
        .find(|s| !s.is_empty())
        .unwrap_or_else(|| "localhost".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn verify_cli() {
        Cli::command().debug_assert();
    }
}
