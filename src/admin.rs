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

use spool_tools::ArchivedEnvelope;

use crate::config::Config;
use crate::envelope::{Body, Envelope, Notify, RcptState, Recipient, Ret};
use crate::ops::live::Live;
use crate::scheduler::{now_ms, Scheduler};
use crate::spool::{ImportError, QueueEntry, Spool};

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
        #[serde(default)]
        force: bool,
    },
    HoldList,
    Reload,
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
        #[serde(default)]
        force: bool,
    },
    Import {
        input: PathBuf,
    },
    Queue {
        domain: Option<String>,
        json: bool,
    },
    Shape {
        json: bool,
    },
    Show {
        id: String,
        body: bool,
    },
}

/// A `Write` that sends each line to an [`Out`] (for reports made inside the server).
pub struct OutWriter {
    out: Out,
    buf: Vec<u8>,
    /// Pass bytes through unchanged ([`Line::Raw`]) instead of as text lines.
    raw: bool,
}

impl OutWriter {
    pub fn new(out: Out) -> OutWriter {
        OutWriter {
            out,
            buf: Vec::new(),
            raw: false,
        }
    }

    /// An `OutWriter` that keeps every byte (for `show`, which prints a message).
    pub fn raw(out: Out) -> OutWriter {
        OutWriter {
            out,
            buf: Vec::new(),
            raw: true,
        }
    }
}

impl std::io::Write for OutWriter {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        if self.raw {
            return match self.out.send(Line::raw(data)) {
                Ok(()) => Ok(data.len()),
                Err(_) => Err(std::io::ErrorKind::BrokenPipe.into()),
            };
        }
        self.buf.extend_from_slice(data);
        while let Some(i) = self.buf.iter().position(|&b| b == b'\n') {
            let mut line: Vec<u8> = self.buf.drain(..=i).collect();
            line.pop();
            if line.last() == Some(&b'\r') {
                line.pop();
            }
            let text = String::from_utf8_lossy(&line).into_owned();
            if self.out.send(Line::Out(text)).is_err() {
                return Err(std::io::ErrorKind::BrokenPipe.into());
            }
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        if !self.buf.is_empty() {
            let text = String::from_utf8_lossy(&std::mem::take(&mut self.buf)).into_owned();
            let _ = self.out.send(Line::Out(text));
        }
        Ok(())
    }
}

/// Run a read-only report with `out` as its output, off the async threads.
async fn report<F>(ctx: &Ctx, out: &Out, raw: bool, f: F) -> Result<i32, String>
where
    F: FnOnce(&Spool, &mut dyn std::io::Write) -> anyhow::Result<()> + Send + 'static,
{
    let spool = ctx.spool.clone();
    let mut w = if raw {
        OutWriter::raw(out.clone())
    } else {
        OutWriter::new(out.clone())
    };
    tokio::task::spawn_blocking(move || {
        let r = f(&spool, &mut w);
        let _ = std::io::Write::flush(&mut w);
        r
    })
    .await
    .map_err(|e| e.to_string())?
    .map_err(|e| crate::ops::output::error_line(&e))?;
    Ok(0)
}

/// A line of output: for standard output or standard error.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Line {
    Out(String),
    Err(String),
    /// Bytes for standard output exactly as they are (a message's body): each char of the
    /// string is one byte (U+0000 to U+00FF), so the JSON of the control socket carries
    /// CR, 8-bit and invalid UTF-8 unchanged.
    Raw(String),
    /// How far a long piece of work is: `done` of `total` (`total` 0: not known).
    Progress {
        what: String,
        done: u64,
        total: u64,
    },
}

/// Shows [`Line::Progress`] as a bar on standard error when that is a terminal, and
/// nothing otherwise (scripts and logs get the result lines only).
pub struct ProgressView {
    bar: Option<indicatif::ProgressBar>,
    tty: bool,
}

impl Default for ProgressView {
    fn default() -> Self {
        ProgressView {
            bar: None,
            tty: std::io::IsTerminal::is_terminal(&std::io::stderr()),
        }
    }
}

impl ProgressView {
    pub fn update(&mut self, what: &str, done: u64, total: u64) {
        if !self.tty {
            return;
        }
        let bar = self.bar.get_or_insert_with(|| {
            let b = indicatif::ProgressBar::new(total);
            let style = if total > 0 {
                "{msg} [{bar:40}] {pos}/{len} (eta {eta})"
            } else {
                "{spinner} {msg}: {pos} messages"
            };
            if let Ok(s) = indicatif::ProgressStyle::with_template(style) {
                b.set_style(s.progress_chars("=> "));
            }
            b
        });
        if total > 0 {
            bar.set_length(total);
        }
        bar.set_message(what.to_string());
        bar.set_position(done);
    }

    /// Remove the bar before result lines are printed.
    pub fn clear(&mut self) {
        if let Some(b) = self.bar.take() {
            b.finish_and_clear();
        }
    }
}

fn progress_line(out: &Out, what: &str, done: usize, total: usize) {
    let _ = out.send(Line::Progress {
        what: what.to_string(),
        done: done as u64,
        total: total as u64,
    });
}

impl Line {
    /// A [`Line::Raw`] of `bytes`.
    pub fn raw(bytes: &[u8]) -> Line {
        Line::Raw(bytes.iter().map(|&b| char::from(b)).collect())
    }
}

/// The bytes of a [`Line::Raw`].
pub fn raw_bytes(s: &str) -> Vec<u8> {
    s.chars()
        .map(|c| u8::try_from(u32::from(c)).unwrap_or(b'?'))
        .collect()
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
    pub live: Arc<Live>,
    pub spool: Spool,
    pub scheduler: Arc<Scheduler>,
}

impl Ctx {
    /// The configuration in force now.
    pub fn config(&self) -> Arc<Config> {
        self.live.config()
    }
}

/// Reload the configuration of the running server (`mxspool reload`, SIGHUP), logging the
/// outcome; the reply line for the administrator, or the error (the old settings stay).
pub fn reload(live: &Live, by: &str) -> Result<String, String> {
    crate::ops::systemd::reloading();
    let result = live.reload();
    // Serving again, with the new settings or the old ones.
    crate::ops::systemd::ready();
    match result {
        Ok(r) => {
            let mut line = "configuration reloaded".to_string();
            if !r.need_restart.is_empty() {
                line.push_str(&format!(
                    "; changed but in force only after a restart: {}",
                    r.need_restart.join(", ")
                ));
            }
            tracing::info!("{by}: {line}");
            Ok(line)
        }
        Err(e) => {
            let line = format!("configuration not reloaded, the old one stays in force: {e}");
            tracing::error!("{by}: {line}");
            Err(line)
        }
    }
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
        Request::Hold { domain, force } => {
            let d = domain_arg(&domain)?;
            let policy = ctx.live.snapshot().policy.clone();
            if !force && !policy.is_ours(&d) {
                return Err(format!(
                    "{d} is not one of our domains (partner, local, routed or virtual): not held (--force holds it all the same)"
                ));
            }
            let already = ctx.spool.held_since(&d).is_some();
            ctx.spool
                .hold(&d, now_ms())
                .await
                .map_err(|e| e.to_string())?;
            let spool = ctx.spool.clone();
            let dd = d.clone();
            let n = tokio::task::spawn_blocking(move || spool.held_count(&dd))
                .await
                .map_err(|e| e.to_string())?
                .map_err(|e| e.to_string())?;
            if already {
                say(out, format!("{d}: already on hold ({n} message(s) held)"));
            } else {
                tracing::info!("{d}: put on hold by the administrator ({n} message(s) held)");
                say(out, format!("{d}: on hold ({n} message(s) held)"));
            }
            Ok(0)
        }
        Request::HoldList => report(ctx, out, false, move |s, w| crate::report::holds(s, w)).await,
        Request::Reload => {
            let line = reload(&ctx.live, "mxspool reload")?;
            say(out, line);
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
        Request::Export {
            domain,
            output,
            remove,
            force,
        } => export(ctx, &domain, output, remove, force, out).await,
        Request::Import { input } => import(ctx, input, out).await,
        Request::Queue { domain, json } => {
            let quotas = crate::policy::quota::of_config(&ctx.config());
            report(ctx, out, false, move |s, w| {
                crate::report::queue(s, domain.as_deref(), json, &quotas, w)
            })
            .await
        }
        Request::Shape { json } => {
            let quotas = crate::policy::quota::of_config(&ctx.config());
            report(ctx, out, false, move |s, w| {
                crate::report::shape(s, json, &quotas, w)
            })
            .await
        }
        Request::Show { id, body } => {
            report(ctx, out, true, move |s, w| {
                crate::report::show(s, &id, body, w)
            })
            .await
        }
    }
}

/// The archive's form of one queue entry.
fn to_archived(env: &Envelope, domain: &str, entry: &QueueEntry) -> ArchivedEnvelope {
    use spool_tools::{ArchivedDsn, ArchivedRecipient, BodyType, RecipientState};
    let time = |ms: u64| chrono::DateTime::from_timestamp_millis(ms as i64).unwrap_or_default();
    ArchivedEnvelope {
        id: env.id.clone(),
        domain: domain.to_string(),
        sender: env.sender.clone(),
        recipients: entry
            .recipients
            .iter()
            .map(|r| ArchivedRecipient {
                address: r.address.clone(),
                state: match r.state {
                    RcptState::Pending => RecipientState::Pending,
                    RcptState::Delivered => RecipientState::Delivered,
                    RcptState::Failed => RecipientState::Failed,
                },
                orcpt: r.orcpt.clone(),
                notify: r.notify.map(|n| spool_tools::Notify {
                    never: n.never,
                    success: n.success,
                    failure: n.failure,
                    delay: n.delay,
                }),
            })
            .collect(),
        arrival: time(env.arrival_ms),
        attempts: entry.attempts,
        last_error: entry.last_error.clone(),
        next_attempt: (!entry.held).then(|| time(entry.next_attempt_ms)),
        held: entry.held,
        dsn: ArchivedDsn {
            ret: env.ret.map(|r| match r {
                Ret::Full => spool_tools::Ret::Full,
                Ret::Hdrs => spool_tools::Ret::Hdrs,
            }),
            envid: env.envid.clone(),
        },
        body: match env.body {
            Body::SevenBit => BodyType::SevenBit,
            Body::EightBitMime => BodyType::EightBitMime,
        },
        smtputf8: env.smtputf8,
        client_ip: env.client_ip.clone(),
        helo: env.helo.clone(),
    }
}

/// The spool's form of an archived entry: the envelope and the domain's queue entry.
fn from_archived(a: &ArchivedEnvelope, size: u64) -> (Envelope, QueueEntry) {
    use spool_tools::RecipientState;
    let recipients: Vec<Recipient> = a
        .recipients
        .iter()
        .map(|r| Recipient {
            address: r.address.clone(),
            orcpt: r.orcpt.clone(),
            notify: r.notify.map(|n| Notify {
                never: n.never,
                success: n.success,
                failure: n.failure,
                delay: n.delay,
            }),
            state: match r.state {
                RecipientState::Pending => RcptState::Pending,
                RecipientState::Delivered => RcptState::Delivered,
                RecipientState::Failed => RcptState::Failed,
            },
        })
        .collect();
    let env = Envelope {
        id: a.id.clone(),
        sender: a.sender.clone(),
        recipients: recipients.clone(),
        arrival_ms: a.arrival.timestamp_millis().max(0) as u64,
        size,
        body: match a.body {
            spool_tools::BodyType::SevenBit => Body::SevenBit,
            spool_tools::BodyType::EightBitMime => Body::EightBitMime,
        },
        smtputf8: a.smtputf8,
        ret: a.dsn.ret.map(|r| match r {
            spool_tools::Ret::Full => Ret::Full,
            spool_tools::Ret::Hdrs => Ret::Hdrs,
        }),
        envid: a.dsn.envid.clone(),
        client_ip: a.client_ip.clone(),
        helo: a.helo.clone(),
    };
    let entry = QueueEntry {
        recipients,
        attempts: a.attempts,
        next_attempt_ms: 0,
        last_error: a.last_error.clone(),
        held: false,
        warned: false,
        held_since_ms: 0,
        held_ms: 0,
        last_tls: None,
    };
    (env, entry)
}

async fn export(
    ctx: &Ctx,
    domain: &str,
    output: PathBuf,
    remove: bool,
    force: bool,
    out: &Out,
) -> Result<i32, String> {
    let d = domain_arg(domain)?;
    let spool = ctx.spool.clone();
    let host = ctx.config().hostname.clone();
    let (dd, path) = (d.clone(), output.clone());
    let progress = out.clone();
    let ids = tokio::task::spawn_blocking(move || -> Result<Vec<String>, String> {
        let e = |e: &dyn std::fmt::Display| {
            let e = e.to_string();
            // The archive's errors name the file already.
            match e.strip_prefix(&format!("{}: ", path.display())) {
                Some(rest) => format!("export of {dd} to {}: {rest}", path.display()),
                None => format!("export of {dd} to {}: {e}", path.display()),
            }
        };
        let meta = spool_tools::ArchiveMeta::new(host, Some(dd.clone()));
        let mut w = if force {
            spool_tools::create_file_replacing(&path, meta)
        } else {
            spool_tools::create_file(&path, meta)
        }
        .map_err(|x| e(&x))?;
        let mut ids = Vec::new();
        let mut after: Option<String> = None;
        loop {
            let chunk = spool
                .domain_entries(&dd, after.as_deref(), 500)
                .map_err(|x| e(&x))?;
            let Some((last, _)) = chunk.last() else { break };
            after = Some(last.clone());
            for (id, entry) in chunk {
                let (Some(stored), Some(message)) = (
                    spool.stored_envelope(&id).map_err(|x| e(&x))?,
                    spool.load_message(&id).map_err(|x| e(&x))?,
                ) else {
                    continue;
                };
                // Part by part: a large message is never whole in memory.
                w.add_reader(
                    &to_archived(&stored.envelope, &dd, &entry),
                    message.len(),
                    message.reader(),
                )
                .map_err(|x| e(&x))?;
                ids.push(id);
                if ids.len() % 100 == 0 {
                    progress_line(&progress, &format!("exporting {dd}"), ids.len(), 0);
                }
            }
        }
        // Written, fsynced and renamed into place before anything is removed.
        w.finish().map_err(|x| e(&x))?;
        Ok(ids)
    })
    .await
    .map_err(|e| e.to_string())??;
    tracing::info!(
        "{d}: {} message(s) exported to {}",
        ids.len(),
        output.display()
    );
    say(
        out,
        format!(
            "{d}: {} message(s) written to {}",
            ids.len(),
            output.display()
        ),
    );
    if remove {
        let mut removed = 0;
        for (n, id) in ids.iter().enumerate() {
            if ctx.spool.remove(&d, id).await.map_err(|e| e.to_string())? {
                removed += 1;
            }
            if n % 100 == 99 {
                progress_line(out, &format!("removing {d}"), n + 1, ids.len());
            }
        }
        tracing::info!("{d}: {removed} exported message(s) removed from the spool");
        say(
            out,
            format!("{d}: {removed} message(s) removed from the spool"),
        );
        if removed > 0 {
            give_space_back(ctx, out).await;
        }
    }
    Ok(0)
}

/// Why an archived entry may not enter this spool, if it may not: only mail for one of our
/// domains, to addresses of that domain, from a plausible sender, within
/// `max_message_size`. An archive is data from elsewhere: a crafted one must not make the
/// queue deliver anywhere else.
fn refuse_import(
    a: &ArchivedEnvelope,
    domain: &str,
    size: u64,
    policy: &crate::policy::Policy,
    max_size: u64,
) -> Option<String> {
    if !crate::config::is_domain(domain) {
        return Some(format!("domain {:?} is not a domain name", a.domain));
    }
    if !policy.is_ours(domain) {
        return Some(format!(
            "domain {domain} is not one of ours (partner, local, routed or virtual)"
        ));
    }
    if !a.sender.is_empty() && !safe_address(&a.sender) {
        return Some(format!("sender {:?} is not a valid address", a.sender));
    }
    for r in &a.recipients {
        let ok = safe_address(&r.address)
            && r.address
                .rsplit_once('@')
                .is_some_and(|(_, d)| d.trim_end_matches('.').eq_ignore_ascii_case(domain));
        if !ok {
            return Some(format!(
                "recipient {:?} is not a valid address of {domain}",
                r.address
            ));
        }
    }
    if size > max_size {
        return Some(format!(
            "{size} bytes, more than max_message_size ({max_size})"
        ));
    }
    None
}

/// `local@domain` as it may appear in an SMTP command: no spaces, controls or angle
/// brackets; a domain name or an address literal after the last `@`.
fn safe_address(a: &str) -> bool {
    let Some((local, domain)) = a.rsplit_once('@') else {
        return false;
    };
    a.len() <= 320
        && !local.is_empty()
        && !a
            .chars()
            .any(|c| c.is_control() || c.is_whitespace() || matches!(c, '<' | '>'))
        && (crate::config::is_domain(&domain.trim_end_matches('.').to_ascii_lowercase())
            || (domain.starts_with('[') && domain.ends_with(']') && domain.len() > 2))
}

async fn import(ctx: &Ctx, input: PathBuf, out: &Out) -> Result<i32, String> {
    let spool = ctx.spool.clone();
    let snapshot = ctx.live.snapshot();
    let (policy, max_size) = (
        snapshot.policy.clone(),
        snapshot.config.smtp.max_message_size.0,
    );
    let o = out.clone();
    let (added, present, skipped, problems) =
        tokio::task::spawn_blocking(move || -> Result<(usize, usize, usize, usize), String> {
            // Messages over max_message_size are refused by the reader: never read into
            // memory, named as problems (not imported).
            let options = spool_tools::ReadOptions {
                max_message: Some(max_size),
                ..Default::default()
            };
            let reader = spool_tools::ArchiveReader::open_with(&input, options)
                .map_err(|e| format!("{}: {e}; nothing imported", input.display()))?;
            for p in reader.problems() {
                let _ = o.send(Line::Err(format!(
                    "{}: {}: {} (not imported)",
                    input.display(),
                    p.subject,
                    p.what
                )));
            }
            let problems = reader.problems().len();
            let total = reader.len();
            let (mut added, mut present, mut skipped) = (0, 0, 0);
            let now = now_ms();
            // Each message is read from the archive part by part as it is stored: memory
            // stays flat however large it is.
            reader
                .for_each_message(
                    |a: spool_tools::ArchivedEnvelope,
                     bytes: &mut spool_tools::MessageBytes<'_>|
                     -> Result<(), spool_tools::Error> {
                        let domain = a.domain.trim_end_matches('.').to_ascii_lowercase();
                        if a.pending().next().is_none() {
                            skipped += 1;
                            return Ok(());
                        }
                        let size = bytes.size();
                        if let Some(why) = refuse_import(&a, &domain, size, &policy, max_size) {
                            let _ = o.send(Line::Err(format!("{}: {why}: skipped", a.id)));
                            skipped += 1;
                            return Ok(());
                        }
                        let (env, qe) = from_archived(&a, size);
                        match spool.import_blocking(&domain, env, qe, bytes, now) {
                            Ok(true) => added += 1,
                            Ok(false) => present += 1,
                            // The archive changed under us: the walk ends with that error.
                            Err(ImportError::Read(_)) => {
                                return Err(spool_tools::Error::Changed(
                                    input.display().to_string(),
                                ))
                            }
                            Err(ImportError::Spool(e)) => {
                                let _ = o.send(Line::Err(format!("{}: {e} (not imported)", a.id)));
                                skipped += 1;
                            }
                        }
                        let done = added + present + skipped;
                        if done % 100 == 0 {
                            progress_line(&o, "importing", done, total);
                        }
                        Ok(())
                    },
                )
                .map_err(|e| format!("{}: {e}", input.display()))?;
            Ok((added, present, skipped, problems))
        })
        .await
        .map_err(|e| e.to_string())??;
    ctx.scheduler.wake();
    tracing::info!(
        "import: {added} added, {present} already queued, {skipped} skipped, {problems} damaged"
    );
    say(
        out,
        format!(
            "{added} message(s) imported, {present} already in the queue, {skipped} with nothing pending or refused, {problems} damaged"
        ),
    );
    Ok(i32::from(problems > 0))
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
        let report = ctx.scheduler.flush_domain(&d, transcript, true).await;
        left_total += report.left.len();
        match (report.tried, report.left.len()) {
            (0, _) => say(out, format!("{d}: nothing queued")),
            (n, 0) => say(
                out,
                format!("{d}: {n} message(s) delivered or returned, none left"),
            ),
            (n, l) => {
                say(out, format!("{d}: {n} message(s) tried, {l} still queued"));
                for (id, why) in &report.left {
                    say(out, format!("  {id}: {why}"));
                }
            }
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
    for (n, (d, id)) in targets.iter().enumerate() {
        if ctx.spool.remove(d, id).await.map_err(|e| e.to_string())? {
            tracing::info!("{id}: removed from the {d} queue by the administrator");
            removed += 1;
        }
        if n % 100 == 99 {
            progress_line(out, "deleting", n + 1, targets.len());
        }
    }
    say(
        out,
        format!(
            "{removed} queue entr{} deleted",
            if removed == 1 { "y" } else { "ies" }
        ),
    );
    if removed > 0 {
        give_space_back(ctx, out).await;
    }
    Ok(i32::from(bad > 0))
}

/// After removing mail: its space back to the file system now (flush and compaction), so
/// that `delete` gets an administrator out of a full disk.
async fn give_space_back(ctx: &Ctx, out: &Out) {
    let spool = ctx.spool.clone();
    let before = spool.free_bytes().unwrap_or(0);
    let done = tokio::task::spawn_blocking(move || spool.reclaim()).await;
    match done {
        Ok(Ok(())) => {
            let after = ctx.spool.free_bytes().unwrap_or(0);
            say(
                out,
                format!(
                    "space given back: {} MiB free now ({} MiB before)",
                    after >> 20,
                    before >> 20
                ),
            );
        }
        Ok(Err(e)) => say(out, format!("the space is not given back yet: {e}")),
        Err(e) => say(out, format!("the space is not given back yet: {e}")),
    }
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
