//! The command line: `serve`, `check-config` and `queue`.
//!
//! Every command returns an error as one readable line (printed by `main`) and a non-zero
//! exit status; nothing here panics on bad input.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};

use crate::admin::Request;
use crate::config::{Config, DEFAULT_PATH};
use crate::spool::Spool;

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
    /// Queued messages per domain by age (qshape).
    Shape {
        /// One JSON object per domain (and a TOTAL line).
        #[arg(long)]
        json: bool,
    },
    /// A message's envelope and headers (postcat).
    Show {
        id: String,
        /// The whole message, not only its headers.
        #[arg(long)]
        body: bool,
    },
    /// Deliver now, the whole queue or one domain (held mail too).
    Flush {
        domain: Option<String>,
        /// Print the SMTP conversation (like sendmail -q -v).
        #[arg(short)]
        v: bool,
    },
    /// Park a domain: no retries, and held time does not count toward max_lifetime.
    Hold { domain: String },
    /// Take a domain off hold; its mail is due at once.
    Release { domain: String },
    /// Remove messages without notice.
    #[command(arg_required_else_help = true)]
    Delete {
        ids: Vec<String>,
        /// Every message queued for this domain.
        #[arg(long, conflicts_with = "ids")]
        domain: Option<String>,
    },
    /// Return messages to their senders now, with a DSN.
    Bounce {
        #[arg(required = true)]
        ids: Vec<String>,
    },
    /// Write a domain's queue to a portable archive.
    Export {
        domain: String,
        /// The archive to write (gzip-compressed when it ends in .gz).
        #[arg(short, long, value_name = "FILE")]
        output: PathBuf,
        /// Remove the exported messages from the spool once the archive is written and synced.
        #[arg(long)]
        remove: bool,
    },
    /// Add an archive's messages to this spool (importing twice adds nothing).
    Import { file: PathBuf },
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
        Command::Queue { domain, json } => report(config, Request::Queue { domain, json }),
        Command::Doctor { domain } => crate::doctor::run(&config, &domain),
        Command::Shape { json } => report(config, Request::Shape { json }),
        Command::Show { id, body } => report(config, Request::Show { id, body }),
        Command::Flush { domain, v } => admin(config, Request::Flush { domain, verbose: v }),
        Command::Hold { domain } => admin(config, Request::Hold { domain }),
        Command::Release { domain } => admin(config, Request::Release { domain }),
        Command::Delete { ids, domain } => admin(config, Request::Delete { ids, domain }),
        Command::Bounce { ids } => admin(config, Request::Bounce { ids }),
        Command::Export {
            domain,
            output,
            remove,
        } => {
            let output = absolute(&output)?;
            admin(
                config,
                Request::Export {
                    domain,
                    output,
                    remove,
                },
            )
        }
        Command::Import { file } => {
            let input = absolute(&file)?;
            admin(config, Request::Import { input })
        }
    }
}

/// A path the server (whose working directory is not ours) can use.
fn absolute(p: &std::path::Path) -> anyhow::Result<PathBuf> {
    std::path::absolute(p).with_context(|| format!("bad path {}", p.display()))
}

/// A read-only report: from the running server through its control socket (it has the
/// spool open), or from a read-only view of the spool when no server runs.
fn report(config: Config, req: Request) -> anyhow::Result<ExitCode> {
    if let Some(code) = crate::control::request(&config.spool, &req)? {
        return Ok(exit(code));
    }
    let spool = Spool::open_read_only(&config.spool)?;
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    match req {
        Request::Queue { domain, json } => {
            crate::report::queue(&spool, domain.as_deref(), json, &mut out)?
        }
        Request::Shape { json } => crate::report::shape(&spool, json, &mut out)?,
        Request::Show { id, body } => crate::report::show(&spool, &id, body, &mut out)?,
        _ => anyhow::bail!("not a report"),
    }
    Ok(ExitCode::SUCCESS)
}

/// A queue operation: through the running server's control socket, or here on the spool
/// when no server runs.
fn admin(config: Config, req: Request) -> anyhow::Result<ExitCode> {
    if let Some(code) = crate::control::request(&config.spool, &req)? {
        return Ok(exit(code));
    }
    // Only an import may create a spool; the others would act on an empty new one.
    if !matches!(req, Request::Import { .. }) && !config.spool.join("CURRENT").is_file() {
        anyhow::bail!("spool {} does not exist", config.spool.display());
    }
    init_logging("warn");
    let spool = Spool::open(&config.spool)?;
    let config = std::sync::Arc::new(config);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the runtime")?;
    let code = runtime.block_on(async move {
        let scheduler = crate::scheduler::Scheduler::new(config.clone(), spool.clone())?;
        let ctx = crate::admin::Ctx {
            config,
            spool,
            scheduler,
        };
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let printer = tokio::spawn(async move {
            let mut view = crate::admin::ProgressView::default();
            while let Some(line) = rx.recv().await {
                if let crate::admin::Line::Progress { what, done, total } = &line {
                    view.update(what, *done, *total);
                    continue;
                }
                view.clear();
                match line {
                    crate::admin::Line::Progress { .. } => {}
                    crate::admin::Line::Out(s) => println!("{s}"),
                    crate::admin::Line::Err(s) => eprintln!("mxspool: {s}"),
                    crate::admin::Line::Raw(s) => {
                        use std::io::Write;
                        let _ = std::io::stdout().write_all(&crate::admin::raw_bytes(&s));
                    }
                }
            }
        });
        let code = crate::admin::execute(&ctx, req, &tx).await;
        drop(tx);
        let _ = printer.await;
        anyhow::Ok(code)
    })?;
    Ok(exit(code))
}

fn exit(code: i32) -> ExitCode {
    ExitCode::from(u8::try_from(code).unwrap_or(1))
}

/// Logs to standard error; `RUST_LOG` overrides the `default` level.
fn init_logging(default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .init();
}

fn serve(config: Config) -> anyhow::Result<ExitCode> {
    init_logging("info");
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
        let ctx = std::sync::Arc::new(crate::admin::Ctx {
            config: config.clone(),
            spool: spool.clone(),
            scheduler: scheduler.clone(),
        });
        let control = crate::control::bind(&config.spool)?;
        let control = tokio::spawn(crate::control::serve(control, ctx, stop_rx.clone()));
        let runner = tokio::spawn(scheduler.clone().run(stop_rx.clone()));
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
        crate::smtp::server::run(&config, spool, scheduler, listeners, stop_rx).await?;
        let _ = runner.await;
        if let Ok(Err(e)) = control.await {
            tracing::error!("{e}");
        }
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
