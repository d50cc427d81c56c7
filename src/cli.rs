//! The command line: `serve`, `check-config` and `queue`.
//!
//! Every command returns an error as one readable line (printed by `main`) and a non-zero
//! exit status; nothing here panics on bad input.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};

use crate::config::{Config, DEFAULT_PATH};
use crate::spool::{QueuedMessage, Spool};

#[derive(Debug, Parser)]
#[command(
    name = "mxspool",
    version,
    about = "Secondary-MX store-and-forward mail server"
)]
pub struct Args {
    /// Configuration file.
    #[arg(long, global = true, value_name = "PATH", default_value = DEFAULT_PATH)]
    pub config: PathBuf,
    /// Work on this spool directory instead of the configured one
    /// (like sendmail's -OQueueDirectory=DIR).
    #[arg(long, global = true, value_name = "DIR")]
    pub spool: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the SMTP server.
    Serve,
    /// Validate the configuration and print the effective settings.
    CheckConfig,
    /// List queued mail (mailq).
    Queue {
        /// Only this domain's mail.
        #[arg(long, value_name = "DOMAIN")]
        domain: Option<String>,
        /// JSON Lines, one object per message and domain (like postqueue -j).
        #[arg(long)]
        json: bool,
    },
    /// Check a domain's MX set-up from DNS (is this server in it, at which preference,
    /// do the more preferred hosts answer).
    Doctor {
        /// The domain to check.
        domain: String,
    },
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let mut config = Config::load(&args.config)?;
    if let Some(spool) = &args.spool {
        config.spool = spool.clone();
    }
    match args.command {
        Command::Serve => serve(config),
        Command::CheckConfig => {
            print!("{}", config.to_toml());
            Ok(ExitCode::SUCCESS)
        }
        Command::Queue { domain, json } => queue(&config, domain.as_deref(), json),
        Command::Doctor { domain } => crate::doctor::run(&config, &domain),
    }
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .init();
}

fn serve(config: Config) -> anyhow::Result<ExitCode> {
    init_logging();
    let spool = Spool::open(&config.spool)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("mxspool")
        .build()
        .context("cannot start the runtime")?;
    let config = std::sync::Arc::new(config);
    runtime.block_on(async move {
        let listeners = crate::smtp::server::bind(&config).await?;
        let scheduler = crate::scheduler::Scheduler::new(config.clone(), spool.clone())?;
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let runner = tokio::spawn(scheduler.run(stop_rx.clone()));
        tokio::spawn(async move {
            wait_for_signal().await;
            let _ = stop_tx.send(true);
        });
        tracing::info!(
            "mxspool {} started as {}, spool {}",
            env!("CARGO_PKG_VERSION"),
            config.hostname,
            config.spool.display()
        );
        crate::smtp::server::run(&config, spool, listeners, stop_rx).await?;
        let _ = runner.await;
        anyhow::Ok(())
    })?;
    Ok(ExitCode::SUCCESS)
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).ok();
    let term = async {
        match term.as_mut() {
            Some(t) => {
                t.recv().await;
            }
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term => {}
    }
}

fn queue(config: &Config, domain: Option<&str>, json: bool) -> anyhow::Result<ExitCode> {
    let spool = Spool::open_read_only(&config.spool)?;
    let domain = domain.map(|d| d.trim_end_matches('.').to_ascii_lowercase());
    let list = spool.list(domain.as_deref())?;
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    if json {
        for m in &list {
            writeln!(out, "{}", m.to_json())?;
        }
    } else {
        print_table(&mut out, &list)?;
    }
    out.flush()?;
    Ok(ExitCode::SUCCESS)
}

/// mailq's layout: a line per message, its recipients indented below.
fn print_table(out: &mut impl Write, list: &[QueuedMessage]) -> std::io::Result<()> {
    if list.is_empty() {
        return writeln!(out, "Mail queue is empty");
    }
    writeln!(
        out,
        "{:<13} {:>9} {:<20} {:<7} {:>3} Sender/Recipient",
        "Queue ID", "Size", "Arrival", "State", "Att"
    )?;
    for m in list {
        let arrival = chrono::DateTime::from_timestamp_millis(m.arrival_ms as i64)
            .map(|t| t.format("%Y-%m-%d %H:%M:%S").to_string())
            .unwrap_or_default();
        let state = if m.held { "held" } else { "queued" };
        let sender = if m.sender.is_empty() { "<>" } else { &m.sender };
        writeln!(
            out,
            "{:<13} {:>9} {:<20} {:<7} {:>3} {}",
            m.id, m.size, arrival, state, m.attempts, sender
        )?;
        if let Some(err) = &m.last_error {
            writeln!(out, "{:>56}({err})", "")?;
        }
        for r in &m.recipients {
            writeln!(out, "{:>56}{}", "", r.address)?;
        }
    }
    writeln!(out, "-- {} message(s)", list.len())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn verify_cli() {
        Args::command().debug_assert();
    }

    #[test]
    fn global_flags_go_anywhere() {
        let a = Args::try_parse_from([
            "mxspool", "queue", "--json", "--spool", "/x", "--domain", "a.com",
        ])
        .unwrap();
        assert_eq!(a.spool.as_deref(), Some(std::path::Path::new("/x")));
        assert!(matches!(a.command, Command::Queue { json: true, .. }));
        assert!(Args::try_parse_from(["mxspool", "frobnicate"]).is_err());
    }
}
