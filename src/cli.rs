//! The command line: `serve`, `check-config`, the reports and the queue operations.
//!
//! Every command returns an error as one readable line (printed by `main`) and a non-zero
//! exit status; nothing here panics on bad input.

use std::io::Write;
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
    /// Park a domain: no retries, and held time does not count toward max_lifetime
    /// (`--list`: the held domains).
    Hold {
        #[arg(required_unless_present = "list")]
        domain: Option<String>,
        /// List the held domains: since when, how many messages.
        #[arg(long, conflicts_with_all = ["domain", "force"])]
        list: bool,
        /// Hold a domain that is not one of ours (not a partner, local, routed or virtual
        /// domain) all the same.
        #[arg(long)]
        force: bool,
    },
    /// Take a domain off hold; its mail is due at once.
    Release { domain: String },
    /// Remove messages without notice.
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
        /// Replace FILE if it exists (atomically, once the new archive is complete).
        #[arg(long)]
        force: bool,
    },
    /// Add an archive's messages to this spool (importing twice adds nothing).
    Import { file: PathBuf },
    /// Re-read the configuration and every table it names, in the running server
    /// (as SIGHUP does).
    Reload,
    /// Make a damaged spool servable again (the server must be stopped): keep every entry
    /// that can be read, remove the others, and say what was lost.
    Recover,
    /// Check a domain's MX set-up from DNS (is this server in it, at which preference,
    /// do the more preferred hosts answer).
    Doctor {
        /// The domain to check.
        domain: String,
    },
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let config = match crate::ops::live::load(&args.config, args.spool.as_deref()) {
        Ok(c) => c,
        // The server reads the same file: it would refuse it too and keep its settings.
        Err(e) if matches!(args.command, Command::Reload) => anyhow::bail!(
            "configuration not reloaded, the old one stays in force: {}",
            crate::ops::output::error_line(&e)
        ),
        Err(e) => return Err(e),
    };
    match args.command {
        Command::Serve => serve(config, &args.config, args.spool.as_deref()),
        Command::CheckConfig => {
            let mut out = std::io::stdout().lock();
            out.write_all(config.to_toml().as_bytes())?;
            out.flush()?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Queue { domain, json } => report(config, Request::Queue { domain, json }),
        Command::Doctor { domain } => crate::doctor::run(&config, &domain),
        Command::Recover => recover(&config),
        Command::Shape { json } => report(config, Request::Shape { json }),
        Command::Show { id, body } => report(config, Request::Show { id, body }),
        Command::Flush { domain, v } => admin(config, Request::Flush { domain, verbose: v }),
        Command::Hold { list: true, .. } => report(config, Request::HoldList),
        Command::Hold { domain, force, .. } => admin(
            config,
            Request::Hold {
                domain: domain.unwrap_or_default(),
                force,
            },
        ),
        Command::Release { domain } => admin(config, Request::Release { domain }),
        Command::Delete { ids, domain } => {
            if ids.is_empty() && domain.is_none() {
                anyhow::bail!(
                    "delete: no message given: name queue IDs (mxspool delete ID...) or a domain (mxspool delete --domain DOMAIN)"
                );
            }
            admin(config, Request::Delete { ids, domain })
        }
        Command::Bounce { ids } => admin(config, Request::Bounce { ids }),
        Command::Export {
            domain,
            output,
            remove,
            force,
        } => {
            let output = absolute(&output)?;
            admin(
                config,
                Request::Export {
                    domain,
                    output,
                    remove,
                    force,
                },
            )
        }
        Command::Import { file } => {
            let input = absolute(&file)?;
            admin(config, Request::Import { input })
        }
        Command::Reload => {
            crate::ops::privilege::check_access(&config.spool).map_err(anyhow::Error::msg)?;
            match crate::control::request(&config.spool, &Request::Reload)? {
                Some(code) => Ok(exit(code)),
                None => anyhow::bail!(
                    "no server is running on spool {} (nothing to reload; check-config validates the file)",
                    config.spool.display()
                ),
            }
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
    crate::ops::privilege::check_access(&config.spool).map_err(anyhow::Error::msg)?;
    if let Some(code) = crate::control::request(&config.spool, &req)? {
        return Ok(exit(code));
    }
    let spool = Spool::open_read_only(&config.spool)?;
    let mut out = crate::ops::output::stdout();
    let quotas = crate::policy::quota::of_config(&config);
    match req {
        Request::Queue { domain, json } => {
            crate::report::queue(&spool, domain.as_deref(), json, &quotas, &mut out)?
        }
        Request::Shape { json } => crate::report::shape(&spool, json, &quotas, &mut out)?,
        Request::Show { id, body } => crate::report::show(&spool, &id, body, &mut out)?,
        Request::HoldList => crate::report::holds(&spool, &mut out)?,
        _ => anyhow::bail!("not a report"),
    }
    std::io::Write::flush(&mut out)?;
    drop(spool);
    crate::ops::privilege::keep_owner(&config.spool).map_err(anyhow::Error::msg)?;
    Ok(ExitCode::SUCCESS)
}

/// `mxspool recover`: on a stopped server's spool only (RocksDB's lock refuses it otherwise).
fn recover(config: &Config) -> anyhow::Result<ExitCode> {
    crate::ops::privilege::check_access(&config.spool).map_err(anyhow::Error::msg)?;
    init_logging("warn");
    let dir = &config.spool;
    let r = crate::spool::recover(dir)?;
    let mut out = crate::ops::output::stdout();
    writeln!(out, "spool {}:", dir.display())?;
    if let Some(why) = &r.repaired {
        writeln!(
            out,
            "  rebuilt from its files by RocksDB's repairer (it would not open: {why}); damaged files are in {}",
            dir.join("lost").display()
        )?;
    }
    if let Some(kept) = &r.preserved {
        writeln!(
            out,
            "  every file as it was before the repair is kept (linked) in {}",
            kept.display()
        )?;
    }
    if let Some(what) = &r.bad_log_records {
        writeln!(
            out,
            "  LOST: the write-ahead log has damaged records ({what}); they were skipped, and the acknowledged mail they held is gone without a trace in the spool"
        )?;
    }
    if r.commits_lost > 0 {
        writeln!(
            out,
            "  LOST: {} acknowledged commit(s) are not in the spool (their mail got 250 and is gone; the senders' logs have it)",
            r.commits_lost
        )?;
    }
    for (domain, id, why) in &r.entries_lost {
        writeln!(out, "  LOST: {id} for {domain}: {why}")?;
    }
    if r.orphans_removed > 0 {
        writeln!(
            out,
            "  removed {} envelope/message record(s) no queue entry needed",
            r.orphans_removed
        )?;
    }
    writeln!(
        out,
        "  kept {} message(s), {} queue entr{} in {} domain(s); the spool can be served again",
        r.messages,
        r.entries,
        if r.entries == 1 { "y" } else { "ies" },
        r.domains
    )?;
    std::io::Write::flush(&mut out)?;
    crate::ops::privilege::keep_owner(dir).map_err(anyhow::Error::msg)?;
    Ok(ExitCode::SUCCESS)
}

/// A queue operation: through the running server's control socket, or here on the spool
/// when no server runs.
fn admin(config: Config, req: Request) -> anyhow::Result<ExitCode> {
    crate::ops::privilege::check_access(&config.spool).map_err(anyhow::Error::msg)?;
    if let Some(code) = crate::control::request(&config.spool, &req)? {
        return Ok(exit(code));
    }
    // Only an import may create a spool; the others would act on an empty new one.
    if !matches!(req, Request::Import { .. }) && !config.spool.join("CURRENT").is_file() {
        anyhow::bail!("spool {} does not exist", config.spool.display());
    }
    init_logging("warn");
    let spool = Spool::open(&config.spool)?;
    let spool_dir = config.spool.clone();
    let live = crate::ops::live::Live::fixed(config);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the runtime")?;
    let code = runtime.block_on(async move {
        // Outcomes counted here are not served: no metrics listener in a command.
        let metrics = std::sync::Arc::new(crate::ops::metrics::Metrics::new());
        let scheduler = crate::scheduler::Scheduler::new(live.clone(), spool.clone(), metrics)?;
        let ctx = crate::admin::Ctx {
            live,
            spool,
            scheduler,
        };
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let printer = tokio::spawn(async move {
            let mut printer = crate::ops::output::Printer::default();
            while let Some(line) = rx.recv().await {
                printer.print(line);
            }
        });
        let code = crate::admin::execute(&ctx, req, &tx).await;
        drop(tx);
        let _ = printer.await;
        anyhow::Ok(code)
    })?;
    // The spool is closed (the runtime's tasks are done): give back what root created.
    drop(runtime);
    crate::ops::privilege::keep_owner(&spool_dir).map_err(anyhow::Error::msg)?;
    Ok(exit(code))
}

fn exit(code: i32) -> ExitCode {
    ExitCode::from(u8::try_from(code).unwrap_or(1))
}

/// Logs to standard error; `RUST_LOG` overrides the `default` level.
fn init_logging(default: &str) {
    crate::ops::logging::init(default);
}

fn serve(
    config: Config,
    path: &std::path::Path,
    spool_arg: Option<&std::path::Path>,
) -> anyhow::Result<ExitCode> {
    use crate::ops::privilege;
    init_logging("info");
    // Before anything opens files (RocksDB sizes its share from the limit).
    let (before, after) = crate::ops::descriptors::raise();
    if after > before {
        tracing::info!("descriptor limit raised from {before} to {after} (the hard limit)");
    }
    // As root: the account to drop to, the spool made its own, the listeners (SMTP and
    // metrics) bound.
    let account = match &config.user {
        Some(name) => Some(privilege::lookup(name).map_err(anyhow::Error::msg)?),
        None => None,
    };
    if let Some(a) = &account {
        privilege::give_spool(&config.spool, a).map_err(anyhow::Error::msg)?;
    }
    let listeners = crate::smtp::server::bind(&config)?;
    let metrics_listener = match config.metrics_addr() {
        Some(addr) => Some(crate::ops::metrics_http::bind(addr)?),
        None => None,
    };
    if let Some(a) = &account {
        privilege::drop_to(a).map_err(anyhow::Error::msg)?;
        tracing::info!("running as user {} (uid {}, gid {})", a.name, a.uid, a.gid);
    }
    // Only now, as the final user: the spool, the threads, the control socket.
    let spool = Spool::open(&config.spool)?;
    // One set of metrics, counted by the SMTP driver, the scheduler and the spool writer.
    let metrics = std::sync::Arc::new(crate::ops::metrics::Metrics::new());
    spool.observe_commits(metrics.clone());
    // Held domains are named at start (counting their mail would read their whole queue
    // before serving: `hold --list` does that).
    for (domain, since) in spool.held_domains() {
        tracing::info!(
            "{domain}: on hold since {} (mxspool hold --list; mxspool release {domain} ends it)",
            crate::report::time(since)
        );
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("mxspool")
        .build()
        .context("cannot start the runtime")?;
    let live = crate::ops::live::Live::from_file(config, path, spool_arg);
    runtime.block_on(async move {
        let config = live.config();
        let scheduler =
            crate::scheduler::Scheduler::new(live.clone(), spool.clone(), metrics.clone())?;
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let ctx = std::sync::Arc::new(crate::admin::Ctx {
            live: live.clone(),
            spool: spool.clone(),
            scheduler: scheduler.clone(),
        });
        let control = crate::control::bind(&config.spool)?;
        let control = tokio::spawn(crate::control::serve(control, ctx, stop_rx.clone()));
        let signals = Signals::new()?;
        // Clients are taken in only now: spool, control socket and signals are ready.
        let listeners = crate::smtp::server::listen(listeners)?;
        if let Some(bound) = metrics_listener {
            let listener = crate::ops::metrics_http::listen(bound)?;
            tokio::spawn(crate::ops::metrics_http::serve(
                listener,
                metrics.clone(),
                spool.clone(),
                live.clone(),
                stop_rx.clone(),
            ));
        }
        let runner = tokio::spawn(scheduler.clone().run(stop_rx.clone()));
        let reload_live = live.clone();
        tokio::spawn(async move {
            signals.wait_for_stop(&reload_live).await;
            crate::ops::systemd::stopping();
            let _ = stop_tx.send(true);
        });
        tracing::info!(
            "mxspool {} started as {}, spool {}",
            env!("CARGO_PKG_VERSION"),
            config.hostname,
            config.spool.display()
        );
        // Listening, spool open, control socket bound: systemd may start what depends on us.
        crate::ops::systemd::ready();
        crate::smtp::server::run(live, spool, scheduler, listeners, metrics, stop_rx).await?;
        let _ = runner.await;
        if let Ok(Err(e)) = control.await {
            tracing::error!("{}", crate::ops::output::error_line(&e));
        }
        tracing::info!("stopped");
        anyhow::Ok(())
    })?;
    Ok(ExitCode::SUCCESS)
}

/// The signals `serve` acts on. SIGTERM, SIGINT and SIGQUIT stop it (SPEC: stop accepting,
/// `421` to idle sessions, DATA finishes); SIGHUP reloads; SIGUSR1, SIGUSR2 and SIGALRM,
/// whose default would kill the server silently, are logged and ignored.
struct Signals {
    stop: Vec<(&'static str, tokio::signal::unix::Signal)>,
    hup: tokio::signal::unix::Signal,
    ignored: Vec<(&'static str, tokio::signal::unix::Signal)>,
}

impl Signals {
    fn new() -> anyhow::Result<Signals> {
        use tokio::signal::unix::{signal, SignalKind};
        let on = |kind: SignalKind, name: &str| {
            signal(kind).with_context(|| format!("cannot handle {name}"))
        };
        Ok(Signals {
            stop: vec![
                ("SIGTERM", on(SignalKind::terminate(), "SIGTERM")?),
                ("SIGINT", on(SignalKind::interrupt(), "SIGINT")?),
                ("SIGQUIT", on(SignalKind::quit(), "SIGQUIT")?),
            ],
            hup: on(SignalKind::hangup(), "SIGHUP")?,
            ignored: vec![
                ("SIGUSR1", on(SignalKind::user_defined1(), "SIGUSR1")?),
                ("SIGUSR2", on(SignalKind::user_defined2(), "SIGUSR2")?),
                ("SIGALRM", on(SignalKind::alarm(), "SIGALRM")?),
            ],
        })
    }

    /// Handles SIGHUP and the ignored signals until a stop signal comes.
    async fn wait_for_stop(mut self, live: &crate::ops::live::Live) {
        use std::future::poll_fn;
        loop {
            let stop = poll_fn(|cx| {
                for (name, s) in &mut self.stop {
                    if s.poll_recv(cx).is_ready() {
                        return std::task::Poll::Ready(*name);
                    }
                }
                std::task::Poll::Pending
            });
            let ignored = poll_fn(|cx| {
                for (name, s) in &mut self.ignored {
                    if s.poll_recv(cx).is_ready() {
                        return std::task::Poll::Ready(*name);
                    }
                }
                std::task::Poll::Pending
            });
            tokio::select! {
                name = stop => {
                    tracing::info!("{name} received: stopping");
                    return;
                }
                _ = self.hup.recv() => {
                    let _ = crate::admin::reload(live, "SIGHUP");
                }
                name = ignored => {
                    tracing::warn!("{name} received and ignored (SIGHUP reloads, SIGTERM stops)");
                }
            }
        }
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
