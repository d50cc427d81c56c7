//! The inbound SMTP protocol as a sans-IO state machine.
//!
//! A [`Session`] takes the client's bytes and the time, and answers with bytes to send and
//! [`Step`]s for its driver: wait for more input, store a message, or close. It never touches
//! a socket, a clock or the spool, so every behaviour is tested with byte transcripts (see the
//! tests below). Commands are parsed by `smtp-proto`; line framing, DATA and every policy and
//! limit are ours.

use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::SystemTime;

use smtp_proto::{Error as ParseError, Request};

use super::path;

use super::data::{DataReader, Verdict};
use crate::envelope::{Body, Envelope, Notify, Recipient, Ret};
use crate::policy::{EtrnRefusal, Policy, Refusal};
use crate::tls::TlsInfo;

/// RFC 5321 4.5.3.1.4: a command line is at most 512 octets including CRLF.
pub const MAX_COMMAND_LINE: usize = 512;
/// MAIL and RCPT may be longer: RFC 1870, 3461 (ENVID +100, ORCPT/NOTIFY +500) and 6531 each
/// add parameters to those lines.
pub const MAX_MAIL_RCPT_LINE: usize = 512 + 600;
/// More `Received:` headers than this is a mail loop (RFC 5321 6.3): `554 5.4.6`.
pub const MAX_RECEIVED: usize = 50;
/// The header section is kept in memory up to this size (for the `Received:` count and
/// masquerading), like Postfix's `header_size_limit`; beyond it the rest is body.
pub const HEADER_LIMIT: usize = 128 << 10;
/// A message's body goes to the spool in parts of about this size as DATA arrives: what a
/// session holds of a message is bounded by it, whatever `max_message_size` is.
pub const PART_SIZE: usize = crate::spool::PART_SIZE;

/// What the session needs from the server's configuration.
#[derive(Clone, Debug)]
pub struct SessionConfig {
    pub hostname: String,
    pub max_message_size: usize,
    pub max_recipients: usize,
    pub max_errors: usize,
    /// RCPTs past `max_recipients` answered `452 4.5.3` before they count as errors.
    pub recipient_overshoot: usize,
    /// Free bytes that must stay on the spool's file system.
    pub min_free_space: u64,
    /// A certificate is configured: STARTTLS is offered (until TLS is up).
    pub starttls: bool,
}

/// Free bytes on the spool's file system, refreshed by the server in the background so the
/// session can refuse mail on a full disk without a system call of its own.
#[derive(Debug)]
pub struct SpoolGauge {
    /// Free bytes at the last reading (once a second).
    free: AtomicU64,
    /// Bytes committed since that reading (they are not in it yet).
    spent: AtomicU64,
}

impl SpoolGauge {
    pub fn new(free: u64) -> SpoolGauge {
        SpoolGauge {
            free: AtomicU64::new(free),
            spent: AtomicU64::new(0),
        }
    }

    /// A new reading of the file system, which includes everything committed before it.
    pub fn set(&self, free: u64) {
        self.free.store(free, Ordering::Relaxed);
        self.spent.store(0, Ordering::Relaxed);
    }

    /// Free bytes now, as far as is known: the last reading less what was taken since.
    pub fn get(&self) -> u64 {
        self.free
            .load(Ordering::Relaxed)
            .saturating_sub(self.spent.load(Ordering::Relaxed))
    }

    /// Takes `bytes` for a commit if at least `floor` stays free after it; the many
    /// sessions finishing DATA at once cannot all take the same last bytes.
    pub fn take(&self, bytes: u64, floor: u64) -> bool {
        let free = self.free.load(Ordering::Relaxed);
        self.spent
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |spent| {
                let left = free.saturating_sub(spent).saturating_sub(bytes);
                (left >= floor).then_some(spent.saturating_add(bytes))
            })
            .is_ok()
    }

    /// Gives back what [`SpoolGauge::take`] took for a commit that did not happen.
    pub fn refund(&self, bytes: u64) {
        let _ = self
            .spent
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |s| {
                Some(s.saturating_sub(bytes))
            });
    }
}

/// Asked at each MAIL whether the client may start one more message (the server's
/// `max_message_rate`); `false` refuses it with `450 4.7.1`. Shared state, no I/O.
pub trait MessageGate: Send + Sync {
    fn allow_message(&self, client: IpAddr) -> bool;
}

/// Asked whether a partner's queue has room for one more message of `bytes` (the server's
/// per-partner quotas, `[[partner]] max_messages` / `max_bytes`): at RCPT with the declared
/// `SIZE`, and during DATA with the bytes received so far. `Err` says why (`the queue of
/// example.com is full`), for a `452 4.3.1`. `domain` is lower case. Shared state, no I/O.
pub trait QuotaGate: Send + Sync {
    fn room(&self, domain: &str, bytes: u64) -> Result<(), String>;
}

/// A message the client finished, to be stored before it is acknowledged.
#[derive(Debug)]
pub struct Incoming {
    pub envelope: Envelope,
    /// `Received:` header followed by the bytes the client sent, dot-unstuffed: the first
    /// part, the parts already stored ([`Step::WritePart`]) and the rest.
    pub message: crate::spool::Parts,
}

/// Why storing failed, as far as the client's reply is concerned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StoreFailure {
    /// `452 4.3.1`: out of space.
    NoSpace,
    /// `451 4.3.0`: any other spool failure.
    Spool,
    /// `452 4.3.1`: a partner's queue is at its quota (why, e.g. `the queue of a.example
    /// is full`).
    Quota(String),
}

impl StoreFailure {
    /// The reply to the final dot, and the metrics' reason.
    fn reply(&self) -> (&'static str, String) {
        match self {
            StoreFailure::NoSpace => (
                "no_space",
                "452 4.3.1 Insufficient system storage, try again later".into(),
            ),
            StoreFailure::Spool => (
                "spool_error",
                "451 4.3.0 Error: queue file write error, try again later".into(),
            ),
            StoreFailure::Quota(why) => (
                "quota",
                format!("452 4.3.1 Insufficient system storage: {why}, try again later"),
            ),
        }
    }
}

/// What a session counts for the metrics; the driver takes them ([`Session::take_events`]).
/// Reasons are a small fixed set of labels, named where the refusal is made.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Event {
    /// A message stored and acknowledged `250`.
    Accepted,
    /// A RCPT refused: `relay`, `routing`, `unknown_user`, `bad_mailbox`, `virtual`, `loop`,
    /// `config`, `too_many_recipients`, `syntax`, `callout`, `quota`.
    RefusedRecipient(&'static str),
    /// A message refused at MAIL, at DATA or after the final dot: `size`, `no_space`,
    /// `syntax`, `no_recipients`, `bare_line_ending`, `nul`, `line_too_long`, `loop`,
    /// `spool_error`, `rate`, `quota`.
    RefusedMessage(&'static str),
}

/// What the driver does next.
#[derive(Debug)]
pub enum Step {
    /// Send the pending output, then read more input (or wait for the idle timeout).
    Read,
    /// Store this message; then call [`Session::stored`]. Input is not processed meanwhile.
    Store(Box<Incoming>),
    /// Store part `n` of message `id` now, while DATA goes on (unsynced; the commit of
    /// [`Step::Store`] makes it durable); then call [`Session::part_written`].
    WritePart { id: String, n: u32, bytes: Vec<u8> },
    /// Remove the parts `1..=written` of message `id`, refused or failed (the reply is
    /// in the output); then call [`Session::resume`].
    Discard { id: String, written: u32 },
    /// Start delivery of `domain`'s queue (and its subdomains' with `subdomains`) for an
    /// authorised ETRN; then call [`Session::etrn_done`].
    Etrn { domain: String, subdomains: bool },
    /// Send the pending output (ending with `220 2.0.0 Ready to start TLS`), then do the
    /// TLS handshake and call [`Session::tls_started`] (or close if it fails). Whatever the
    /// client sent after the STARTTLS line has been dropped (CVE-2011-0411); the driver
    /// must not hand the session anything read before the handshake.
    StartTls,
    /// Ask the primary whether it takes this recipient (`[[partner]] verify = "callout"`);
    /// then call [`Session::verified`]. Input is not processed meanwhile.
    Verify(String),
    /// Send the pending output and close the connection.
    Close,
}

/// Whether a message of `bytes` still fits the quotas of every partner `tx` goes to.
fn room_for(gate: Option<&dyn QuotaGate>, tx: &Transaction, bytes: u64) -> Result<(), String> {
    let Some(gate) = gate else {
        return Ok(());
    };
    let mut asked: Vec<String> = Vec::new();
    for r in &tx.recipients {
        let d = crate::envelope::domain_of(&r.address);
        if !asked.contains(&d) {
            gate.room(&d, bytes)?;
            asked.push(d);
        }
    }
    Ok(())
}

#[derive(Debug)]
struct Transaction {
    sender: String,
    body: Body,
    smtputf8: bool,
    ret: Option<Ret>,
    envid: Option<String>,
    recipients: Vec<Recipient>,
    /// Each recipient as the client gave it (before the virtual table), for `Received:`.
    given: Vec<String>,
    /// RCPTs refused so far because `max_recipients` was reached.
    overshoot: usize,
    /// The size the client declared at MAIL (`SIZE=`), 0 if none.
    size: u64,
}

/// What is stored so far of a message being received in parts.
#[derive(Debug)]
struct Receiving {
    id: String,
    /// The header section (up to [`HEADER_LIMIT`]), once its end was seen.
    head: Option<Vec<u8>>,
    /// How far the search for the end of the header section got.
    scanned: usize,
    /// Parts stored, and their bytes.
    written: u32,
    written_len: u64,
    /// Bytes of the part being written.
    pending: usize,
    /// A part could not be stored: the rest is read and dropped, the message refused.
    failed: Option<StoreFailure>,
}

impl Receiving {
    fn new() -> Receiving {
        Receiving {
            id: crate::queue_id::next(),
            head: None,
            scanned: 0,
            written: 0,
            written_len: 0,
            pending: 0,
            failed: None,
        }
    }

    /// The next part to store, if the reader holds a full one: first the header section is
    /// set apart (it stays in memory), then the body goes out in parts, each only if
    /// `room` says the message, that big, still fits its partners' quotas.
    fn next_part(
        &mut self,
        reader: &mut DataReader,
        room: impl Fn(u64) -> Result<(), String>,
    ) -> Option<Step> {
        if self.failed.is_some() {
            // Refused already: what comes is read and dropped, never kept.
            if reader.kept().len() >= PART_SIZE {
                drop(reader.take_kept());
            }
            return None;
        }
        if reader.seen() > reader.max_size() {
            return None;
        }
        if self.head.is_none() {
            let kept = reader.kept();
            let from = self.scanned.saturating_sub(3);
            let end = match kept[from..].windows(4).position(|w| w == b"\r\n\r\n") {
                Some(i) => from + i + 4,
                None if kept.len() >= HEADER_LIMIT => {
                    // No end in sight: cut after the last whole line within the limit.
                    let within = &kept[..HEADER_LIMIT];
                    within
                        .iter()
                        .rposition(|&b| b == b'\n')
                        .map_or(HEADER_LIMIT, |i| i + 1)
                }
                None => {
                    self.scanned = kept.len();
                    return None;
                }
            };
            self.head = Some(reader.split_kept(end));
        }
        if reader.kept().len() < PART_SIZE {
            return None;
        }
        let so_far = self.written_len + reader.kept().len() as u64;
        if let Err(why) = room(so_far) {
            self.failed = Some(StoreFailure::Quota(why));
            drop(reader.take_kept());
            return None;
        }
        let bytes = reader.take_kept();
        self.pending = bytes.len();
        Some(Step::WritePart {
            id: self.id.clone(),
            n: self.written + 1,
            bytes,
        })
    }
}

#[derive(Debug)]
enum State {
    /// Connected; HELO/EHLO not yet given.
    Fresh,
    /// After HELO/EHLO, no transaction.
    Ready,
    /// After MAIL (and maybe RCPTs).
    Mail(Transaction),
    /// Reading the message.
    Data(Transaction, DataReader, Receiving),
    /// A message is being stored.
    Storing,
    /// The session is over.
    Closed,
}

pub struct Session {
    config: Arc<SessionConfig>,
    policy: Arc<Policy>,
    gauge: Arc<SpoolGauge>,
    client: IpAddr,
    helo: Option<String>,
    esmtp: bool,
    state: State,
    input: Vec<u8>,
    /// Skip input up to the next LF (the tail of an over-long command line).
    discarding: bool,
    output: Vec<u8>,
    errors: usize,
    events: Vec<Event>,
    /// The TLS session, once the handshake after STARTTLS is done.
    tls: Option<TlsInfo>,
    message_gate: Option<Arc<dyn MessageGate>>,
    quota_gate: Option<Arc<dyn QuotaGate>>,
    /// The recipient a [`Step::Verify`] is out for, and the address the client gave.
    verifying: Option<(Recipient, String)>,
}

impl Session {
    /// A new session; the greeting is already in the output.
    pub fn new(
        config: Arc<SessionConfig>,
        policy: Arc<Policy>,
        gauge: Arc<SpoolGauge>,
        client: IpAddr,
    ) -> Session {
        let mut s = Session {
            config,
            policy,
            gauge,
            client,
            helo: None,
            esmtp: false,
            state: State::Fresh,
            input: Vec::new(),
            discarding: false,
            output: Vec::new(),
            errors: 0,
            events: Vec::new(),
            tls: None,
            message_gate: None,
            quota_gate: None,
            verifying: None,
        };
        let banner = format!("220 {} ESMTP mxspool", s.config.hostname);
        s.reply(&banner);
        s
    }

    /// Every MAIL asks `gate` first (see [`MessageGate`]).
    pub fn set_message_gate(&mut self, gate: Arc<dyn MessageGate>) {
        self.message_gate = Some(gate);
    }

    /// Every accepted RCPT, and every part of a message, asks `gate` (see [`QuotaGate`]).
    pub fn set_quota_gate(&mut self, gate: Arc<dyn QuotaGate>) {
        self.quota_gate = Some(gate);
    }

    /// Bytes to send to the client, taken out of the session.
    pub fn take_output(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.output)
    }

    /// What happened since the last call, for the metrics.
    pub fn take_events(&mut self) -> Vec<Event> {
        std::mem::take(&mut self.events)
    }

    fn refused_rcpt(&mut self, reason: &'static str, line: &str) -> Option<Step> {
        self.events.push(Event::RefusedRecipient(reason));
        self.error(line)
    }

    fn refused_message(&mut self, reason: &'static str, line: &str) -> Option<Step> {
        self.events.push(Event::RefusedMessage(reason));
        self.error(line)
    }

    /// Whether the session is reading a message (the driver may use a longer timeout).
    pub fn in_data(&self) -> bool {
        matches!(self.state, State::Data(..))
    }

    /// The TLS handshake after [`Step::StartTls`] is done: the session starts over (RFC 3207
    /// 4.2), as if just greeted but without a new greeting: the client must EHLO again,
    /// and nothing it sent before the handshake counts.
    pub fn tls_started(&mut self, info: TlsInfo) -> Step {
        self.input.clear();
        self.discarding = false;
        self.helo = None;
        self.esmtp = false;
        self.state = State::Fresh;
        self.tls = Some(info);
        Step::Read
    }

    /// The TLS session, if the handshake after STARTTLS is done.
    pub fn tls(&self) -> Option<&TlsInfo> {
        self.tls.as_ref()
    }

    /// Client bytes arrived.
    pub fn receive(&mut self, bytes: &[u8], now: SystemTime) -> Step {
        self.input.extend_from_slice(bytes);
        self.process(now)
    }

    /// The client closed its side; nothing more will come.
    pub fn eof(&mut self) -> Step {
        self.close();
        Step::Close
    }

    /// The client was idle too long.
    pub fn timeout(&mut self) -> Step {
        let r = format!("421 4.4.2 {} Error: timeout exceeded", self.config.hostname);
        self.reply(&r);
        self.close();
        Step::Close
    }

    /// The session ends. Parts of a message in DATA are the driver's to remove: it
    /// knows what it stored ([`Step::WritePart`]).
    fn close(&mut self) {
        self.state = State::Closed;
    }

    /// The outcome of a [`Step::WritePart`]; reading resumes. A part that could not be
    /// stored makes the message fail at its end (`452`/`451`), once the client has sent it.
    pub fn part_written(&mut self, result: Result<(), StoreFailure>, now: SystemTime) -> Step {
        if let State::Data(_, _, rx) = &mut self.state {
            match result {
                Ok(()) => {
                    rx.written += 1;
                    rx.written_len += rx.pending as u64;
                }
                Err(f) => rx.failed = Some(f),
            }
            rx.pending = 0;
        }
        self.process(now)
    }

    /// After a [`Step::Discard`]: go on with the input.
    pub fn resume(&mut self, now: SystemTime) -> Step {
        self.process(now)
    }

    /// The outcome of a [`Step::Store`]; processing of buffered input resumes.
    pub fn stored(&mut self, id: &str, result: Result<(), StoreFailure>, now: SystemTime) -> Step {
        match result {
            Ok(()) => {
                self.events.push(Event::Accepted);
                self.reply(&format!("250 2.0.0 Ok: queued as {id}"));
            }
            Err(f) => {
                let (reason, reply) = f.reply();
                self.events.push(Event::RefusedMessage(reason));
                self.reply(&reply);
            }
        }
        self.state = State::Ready;
        self.process(now)
    }

    fn reply(&mut self, line: &str) {
        self.output.extend_from_slice(line.as_bytes());
        self.output.extend_from_slice(b"\r\n");
    }

    /// An error reply; too many of them end the session.
    fn error(&mut self, line: &str) -> Option<Step> {
        self.reply(line);
        self.errors += 1;
        if self.errors >= self.config.max_errors {
            let r = format!("421 4.7.0 {} Error: too many errors", self.config.hostname);
            self.reply(&r);
            self.state = State::Closed;
            return Some(Step::Close);
        }
        None
    }

    fn process(&mut self, now: SystemTime) -> Step {
        loop {
            match &mut self.state {
                State::Closed => return Step::Close,
                State::Storing => return Step::Read,
                State::Data(tx, reader, rx) => {
                    let room = |bytes| room_for(self.quota_gate.as_deref(), tx, bytes);
                    // A full part waiting is stored before more input is taken.
                    if let Some(step) = rx.next_part(reader, room) {
                        return step;
                    }
                    let (used, done) = reader.feed(&self.input);
                    self.input.drain(..used);
                    if !done {
                        if let Some(step) = rx.next_part(reader, room) {
                            return step;
                        }
                        return Step::Read;
                    }
                    let State::Data(tx, reader, rx) =
                        std::mem::replace(&mut self.state, State::Ready)
                    else {
                        unreachable!()
                    };
                    if let Some(step) = self.end_of_data(tx, reader, rx, now) {
                        return step;
                    }
                }
                _ => {
                    if self.discarding {
                        match self.input.iter().position(|&b| b == b'\n') {
                            Some(i) => {
                                self.input.drain(..=i);
                                self.discarding = false;
                                if let Some(step) = self.error("500 5.5.2 Error: line too long") {
                                    return step;
                                }
                                continue;
                            }
                            None => {
                                self.input.clear();
                                return Step::Read;
                            }
                        }
                    }
                    let Some(lf) = self.input.iter().position(|&b| b == b'\n') else {
                        if self.input.len() > MAX_MAIL_RCPT_LINE {
                            self.input.clear();
                            self.discarding = true;
                        }
                        return Step::Read;
                    };
                    let line: Vec<u8> = self.input.drain(..=lf).collect();
                    if let Some(step) = self.command(&line) {
                        return step;
                    }
                }
            }
        }
    }

    fn command(&mut self, line: &[u8]) -> Option<Step> {
        let limit = if line.len() >= 4
            && (line[..4].eq_ignore_ascii_case(b"MAIL") || line[..4].eq_ignore_ascii_case(b"RCPT"))
        {
            MAX_MAIL_RCPT_LINE
        } else {
            MAX_COMMAND_LINE
        };
        if line.len() > limit {
            return self.error("500 5.5.2 Error: line too long");
        }
        // smtp-proto wants CRLF; a bare LF ending a command line is tolerated.
        let mut owned;
        let line = if line.ends_with(b"\r\n") {
            line
        } else {
            owned = line[..line.len() - 1].to_vec();
            owned.extend_from_slice(b"\r\n");
            &owned
        };
        // Address literals and source routes: our parser; the rest is smtp-proto's.
        let is_mail = line.len() >= 4 && line[..4].eq_ignore_ascii_case(b"MAIL");
        let is_rcpt = line.len() >= 4 && line[..4].eq_ignore_ascii_case(b"RCPT");
        let rewritten = if is_mail || is_rcpt {
            match path::rewrite(line) {
                Ok(r) => r,
                Err(path::PathError::Syntax) if is_mail => {
                    return self.error("501 5.1.7 Bad sender address syntax")
                }
                Err(path::PathError::Syntax) => {
                    return self.error("501 5.1.3 Bad recipient address syntax")
                }
            }
        } else {
            None
        };
        let parsed = match &rewritten {
            Some(r) => Request::parse(&mut r.line.iter()),
            None => Request::parse(&mut line.iter()),
        };
        let mut request = match parsed {
            Ok(r) => r,
            Err(e) => return self.parse_error(e),
        };
        if let Some(r) = &rewritten {
            match &mut request {
                Request::Mail { from } => from.address = r.mailbox.clone().into(),
                Request::Rcpt { to } => to.address = r.mailbox.clone().into(),
                _ => {}
            }
        }
        match request {
            Request::Ehlo { host } => self.hello(host.into_owned(), true),
            Request::Helo { host } => self.hello(host.into_owned(), false),
            Request::Mail { from } => self.mail(from),
            Request::Rcpt { to } => self.rcpt(to, line),
            Request::Data => self.data(),
            Request::Rset => {
                if !matches!(self.state, State::Fresh) {
                    self.state = State::Ready;
                }
                self.reply("250 2.0.0 Ok");
                None
            }
            Request::Noop { .. } => {
                self.reply("250 2.0.0 Ok");
                None
            }
            Request::Quit => {
                self.reply("221 2.0.0 Bye");
                self.state = State::Closed;
                Some(Step::Close)
            }
            Request::Vrfy { .. } => {
                self.reply(
                    "252 2.5.2 Cannot VRFY user, but will accept message and attempt delivery",
                );
                None
            }
            Request::Help { .. } => {
                self.reply(
                    "214 2.0.0 See RFC 5321 and https://datatracker.ietf.org/doc/html/rfc5321",
                );
                None
            }
            Request::Lhlo { .. } => self.error("500 5.5.1 Error: this is SMTP, not LMTP"),
            // RFC 1985 takes exactly one argument (smtp-proto ignores the rest).
            Request::Etrn { .. }
                if line
                    .split(|b| b.is_ascii_whitespace())
                    .filter(|w| !w.is_empty())
                    .count()
                    != 2 =>
            {
                self.error("501 5.5.4 Syntax: ETRN domain")
            }
            Request::Etrn { name } => self.etrn(&name),
            Request::StartTls => self.starttls(line),
            _ => self.error("502 5.5.1 Error: command not implemented"),
        }
    }

    fn parse_error(&mut self, e: ParseError) -> Option<Step> {
        let r = match e {
            ParseError::UnknownCommand | ParseError::NeedsMoreData { .. } => {
                "500 5.5.2 Error: command not recognized".to_string()
            }
            ParseError::InvalidSenderAddress => "501 5.1.7 Bad sender address syntax".to_string(),
            ParseError::InvalidRecipientAddress => {
                "501 5.1.3 Bad recipient address syntax".to_string()
            }
            ParseError::SyntaxError { syntax } => format!("501 5.5.4 Syntax: {syntax}"),
            ParseError::InvalidParameter { param } => {
                format!("501 5.5.4 Invalid value for parameter {param}")
            }
            ParseError::UnsupportedParameter { param } => {
                format!("555 5.5.4 Unsupported parameter {}", printable(&param))
            }
            ParseError::ResponseTooLong | ParseError::InvalidResponse { .. } => {
                "500 5.5.2 Error: command not recognized".to_string()
            }
        };
        self.error(&r)
    }

    /// STARTTLS (RFC 3207): `220`, then everything the client pipelined behind it is
    /// dropped (CVE-2011-0411: it was sent in clear and must not be executed as if it had
    /// come over TLS).
    fn starttls(&mut self, line: &[u8]) -> Option<Step> {
        if !self.config.starttls {
            return self.error("502 5.5.1 Error: command not implemented");
        }
        if self.tls.is_some() {
            return self.error("503 5.5.1 Error: TLS already active");
        }
        let args = line
            .get(8..)
            .unwrap_or_default()
            .iter()
            .any(|b| !b.is_ascii_whitespace());
        if args {
            return self.error("501 5.5.4 Syntax: STARTTLS");
        }
        match self.state {
            State::Fresh => return self.error("503 5.5.1 Error: send HELO/EHLO first"),
            State::Mail(_) => return self.error("503 5.5.1 Error: MAIL transaction in progress"),
            _ => {}
        }
        self.reply("220 2.0.0 Ready to start TLS");
        self.input.clear();
        self.discarding = false;
        Some(Step::StartTls)
    }

    /// ETRN (RFC 1985): `domain` or `@domain` (the domain and its subdomains).
    fn etrn(&mut self, node: &str) -> Option<Step> {
        match self.state {
            State::Fresh => return self.error("503 5.5.1 Error: send HELO/EHLO first"),
            State::Mail(_) => return self.error("503 5.5.1 Error: MAIL transaction in progress"),
            _ => {}
        }
        if node.starts_with('#') {
            let r = format!(
                "458 4.5.0 Unable to queue messages for node {}: named queues are not supported",
                printable(node)
            );
            return self.error(&r);
        }
        let (name, subdomains) = match node.strip_prefix('@') {
            Some(d) => (d, true),
            None => (node, false),
        };
        let domain = name.trim_end_matches('.').to_ascii_lowercase();
        if !crate::config::is_domain(&domain) {
            return self.error("501 5.5.4 Syntax: ETRN domain");
        }
        match self.policy.check_etrn(self.client, &domain) {
            Ok(()) => {}
            Err(EtrnRefusal::Client) => {
                let r = format!("554 5.7.1 <{domain}>: ETRN is not allowed from your address");
                return self.error(&r);
            }
            Err(EtrnRefusal::Node) => {
                let r =
                    format!("459 4.7.1 Node {domain} not allowed: not a partner domain with ETRN");
                return self.error(&r);
            }
        }
        Some(Step::Etrn { domain, subdomains })
    }

    /// The outcome of a [`Step::Etrn`]: how many messages were found for delivery, and
    /// whether the domain is on hold (then nothing is started).
    pub fn etrn_done(&mut self, domain: &str, queued: usize, held: bool, now: SystemTime) -> Step {
        if held {
            self.reply(&format!(
                "458 4.7.0 Unable to queue messages for node {domain}: the domain is on hold"
            ));
        } else if queued == 0 {
            self.reply(&format!("251 2.0.0 No messages waiting for node {domain}"));
        } else {
            self.reply(&format!(
                "253 2.0.0 OK, {queued} pending messages for node {domain} started"
            ));
        }
        self.process(now)
    }

    fn hello(&mut self, host: String, esmtp: bool) -> Option<Step> {
        self.helo = Some(host);
        self.esmtp = esmtp;
        self.state = State::Ready;
        let name = &self.config.hostname;
        if !esmtp {
            let r = format!("250 {name}");
            self.reply(&r);
            return None;
        }
        let starttls = if self.config.starttls && self.tls.is_none() {
            "250-STARTTLS\r\n"
        } else {
            ""
        };
        let r = format!(
            "250-{name}\r\n250-PIPELINING\r\n250-SIZE {}\r\n{starttls}250-ENHANCEDSTATUSCODES\r\n250-8BITMIME\r\n250-DSN\r\n250-ETRN\r\n250 SMTPUTF8",
            self.config.max_message_size
        );
        self.reply(&r);
        None
    }

    fn mail(&mut self, from: smtp_proto::MailFrom<std::borrow::Cow<'_, str>>) -> Option<Step> {
        match self.state {
            State::Fresh => return self.error("503 5.5.1 Error: send HELO/EHLO first"),
            State::Mail(_) => return self.error("503 5.5.1 Error: nested MAIL command"),
            _ => {}
        }
        use smtp_proto::*;
        let unsupported = MAIL_BODY_BINARYMIME
            | MAIL_REQUIRETLS
            | MAIL_CONPERM
            | MAIL_BY_NOTIFY
            | MAIL_BY_RETURN
            | MAIL_BY_TRACE;
        if from.flags & unsupported != 0
            || from.trans_id.is_some()
            || from.by != 0
            || from.solicit.is_some()
            || from.mtrk.is_some()
            || from.hold_for != 0
            || from.hold_until != 0
            || from.mt_priority != 0
        {
            return self.refused_message("syntax", "555 5.5.4 Unsupported MAIL parameter");
        }
        if !self.esmtp && (from.flags != 0 || from.size != 0 || from.env_id.is_some()) {
            return self.refused_message("syntax", "555 5.5.4 MAIL parameters need EHLO");
        }
        let smtputf8 = from.flags & MAIL_SMTPUTF8 != 0;
        if !smtputf8 && !from.address.is_ascii() {
            return self.refused_message(
                "syntax",
                "553 5.6.7 Non-ASCII sender address needs SMTPUTF8",
            );
        }
        if from.size > self.config.max_message_size {
            return self.refused_message("size", "552 5.3.4 Message size exceeds fixed limit");
        }
        let needed = self.config.min_free_space.saturating_add(from.size as u64);
        if self.gauge.get() < needed {
            return self.refused_message("no_space", "452 4.3.1 Insufficient system storage");
        }
        // A server that is the backup of one partner only knows at MAIL where the mail goes.
        if let (Some(gate), Some(domain)) = (&self.quota_gate, self.policy.sole_domain(self.client))
        {
            if let Err(why) = gate.room(domain, (from.size as u64).max(1)) {
                let r = format!("452 4.3.1 Insufficient system storage: {why}");
                tracing::info!("NOQUEUE: reject: MAIL from [{}]: {r}", self.client);
                self.events.push(Event::RefusedMessage("quota"));
                self.reply(&r);
                return None;
            }
        }
        if let Some(gate) = &self.message_gate {
            if !gate.allow_message(self.client) {
                let r = format!("450 4.7.1 Error: too much mail from {}", self.client);
                tracing::info!("NOQUEUE: reject: MAIL from [{}]: {r}", self.client);
                return self.refused_message("rate", &r);
            }
        }
        let ret = if from.flags & MAIL_RET_FULL != 0 {
            Some(Ret::Full)
        } else if from.flags & MAIL_RET_HDRS != 0 {
            Some(Ret::Hdrs)
        } else {
            None
        };
        self.state = State::Mail(Transaction {
            sender: from.address.into_owned(),
            body: if from.flags & MAIL_BODY_8BITMIME != 0 {
                Body::EightBitMime
            } else {
                Body::SevenBit
            },
            smtputf8,
            ret,
            envid: from.env_id.map(|e| e.into_owned()),
            recipients: Vec::new(),
            given: Vec::new(),
            overshoot: 0,
            size: from.size as u64,
        });
        self.reply("250 2.1.0 Ok");
        None
    }

    fn rcpt(
        &mut self,
        to: smtp_proto::RcptTo<std::borrow::Cow<'_, str>>,
        raw: &[u8],
    ) -> Option<Step> {
        let State::Mail(tx) = &self.state else {
            return self.error("503 5.5.1 Error: need MAIL command");
        };
        let given = to.address.as_ref();
        let postmaster;
        let addr = if given.is_empty() {
            // smtp-proto gives "" for both <> and <postmaster>.
            if !raw
                .to_ascii_lowercase()
                .windows(12)
                .any(|w| w == b"<postmaster>")
            {
                return self.refused_rcpt("syntax", "501 5.1.3 Bad recipient address syntax");
            }
            match self.policy.postmaster() {
                Some(p) => {
                    postmaster = p;
                    postmaster.as_str()
                }
                None => {
                    return self.refused_rcpt(
                        "relay",
                        "550 5.7.1 <postmaster>: no local mailboxes on this host",
                    )
                }
            }
        } else {
            given
        };
        if !tx.smtputf8 && !addr.is_ascii() {
            return self.refused_rcpt(
                "syntax",
                "553 5.6.7 Non-ASCII recipient address needs SMTPUTF8",
            );
        }
        if tx.recipients.len() >= self.config.max_recipients {
            // The client sends the rest in another transaction (RFC 5321 4.5.3.1.10): only
            // past `recipient_overshoot` of them is it an error.
            let State::Mail(tx) = &mut self.state else {
                unreachable!()
            };
            tx.overshoot += 1;
            if tx.overshoot > self.config.recipient_overshoot {
                return self.refused_rcpt(
                    "too_many_recipients",
                    "452 4.5.3 Error: too many recipients",
                );
            }
            self.events
                .push(Event::RefusedRecipient("too_many_recipients"));
            self.reply("452 4.5.3 Error: too many recipients");
            return None;
        }
        use smtp_proto::*;
        if !self.esmtp && (to.flags != 0 || to.orcpt.is_some()) {
            return self.refused_rcpt("syntax", "555 5.5.4 RCPT parameters need EHLO");
        }
        if to.flags & (RCPT_CONNEG | RCPT_RRVS_REJECT | RCPT_RRVS_CONTINUE) != 0 || to.rrvs != 0 {
            return self.refused_rcpt("syntax", "555 5.5.4 Unsupported RCPT parameter");
        }
        let accepted = match self.policy.check_recipient(self.client, addr) {
            Ok(a) => a,
            Err(refusal) => {
                let r = refusal_reply(&refusal, addr);
                // Postfix's NOQUEUE line: what was refused, for whom, from where.
                tracing::info!(
                    "NOQUEUE: reject: RCPT from [{}]: {r}; from=<{}> to=<{}> helo=<{}>",
                    self.client,
                    printable(&tx.sender),
                    printable(addr),
                    printable(self.helo.as_deref().unwrap_or(""))
                );
                return self.refused_rcpt(refusal_reason(&refusal), &r);
            }
        };
        let notify = (to.flags
            & (RCPT_NOTIFY_NEVER | RCPT_NOTIFY_SUCCESS | RCPT_NOTIFY_FAILURE | RCPT_NOTIFY_DELAY)
            != 0)
            .then_some(Notify {
                never: to.flags & RCPT_NOTIFY_NEVER != 0,
                success: to.flags & RCPT_NOTIFY_SUCCESS != 0,
                failure: to.flags & RCPT_NOTIFY_FAILURE != 0,
                delay: to.flags & RCPT_NOTIFY_DELAY != 0,
            });
        // A rewritten recipient keeps the address the client gave as its ORCPT (RFC 3461
        // 4.2), so DSNs and the next hop name it.
        let orcpt = match (to.orcpt, &accepted.original) {
            (Some(o), _) => Some(format!("rfc822;{o}")),
            (None, Some(original)) => Some(format!("rfc822;{original}")),
            (None, None) => None,
        };
        let recipient = Recipient {
            address: accepted.address,
            orcpt,
            notify,
            state: Default::default(),
        };
        if let Some(gate) = &self.quota_gate {
            let domain = crate::envelope::domain_of(&recipient.address);
            if let Err(why) = gate.room(&domain, tx.size.max(1)) {
                // Not an error of the client's: it tries this recipient again later.
                let r = format!(
                    "452 4.3.1 <{}>: Insufficient system storage: {why}",
                    printable(addr)
                );
                tracing::info!(
                    "NOQUEUE: reject: RCPT from [{}]: {r}; from=<{}> to=<{}> helo=<{}>",
                    self.client,
                    printable(&tx.sender),
                    printable(addr),
                    printable(self.helo.as_deref().unwrap_or(""))
                );
                self.events.push(Event::RefusedRecipient("quota"));
                self.reply(&r);
                return None;
            }
        }
        if self
            .policy
            .verifies(&crate::envelope::domain_of(&recipient.address))
        {
            let address = recipient.address.clone();
            self.verifying = Some((recipient, addr.to_string()));
            return Some(Step::Verify(address));
        }
        self.add_recipient(recipient, addr.to_string());
        None
    }

    /// Takes an accepted recipient into the transaction and says `250`.
    fn add_recipient(&mut self, recipient: Recipient, given: String) {
        let State::Mail(tx) = &mut self.state else {
            return;
        };
        // A repeated recipient is acknowledged but kept once.
        if !tx
            .recipients
            .iter()
            .any(|r| r.address.eq_ignore_ascii_case(&recipient.address))
        {
            tx.recipients.push(recipient);
            tx.given.push(given);
        }
        self.reply("250 2.1.5 Ok");
    }

    /// The outcome of a [`Step::Verify`]: `Err(reply)` refuses the recipient with the
    /// primary's answer; processing of buffered input resumes.
    pub fn verified(&mut self, result: Result<(), String>, now: SystemTime) -> Step {
        if let Some((recipient, given)) = self.verifying.take() {
            match result {
                Ok(()) => self.add_recipient(recipient, given),
                Err(r) => {
                    let sender = match &self.state {
                        State::Mail(tx) => printable(&tx.sender),
                        _ => String::new(),
                    };
                    tracing::info!(
                        "NOQUEUE: reject: RCPT from [{}]: {r}; from=<{sender}> to=<{}> helo=<{}>",
                        self.client,
                        printable(&given),
                        printable(self.helo.as_deref().unwrap_or(""))
                    );
                    if let Some(step) = self.refused_rcpt("callout", &r) {
                        return step;
                    }
                }
            }
        }
        self.process(now)
    }

    fn data(&mut self) -> Option<Step> {
        match &self.state {
            State::Mail(tx) if !tx.recipients.is_empty() => {}
            State::Mail(_) => {
                return self
                    .refused_message("no_recipients", "554 5.5.1 Error: no valid recipients")
            }
            _ => return self.error("503 5.5.1 Error: need RCPT command"),
        }
        let State::Mail(tx) = std::mem::replace(&mut self.state, State::Ready) else {
            unreachable!()
        };
        self.state = State::Data(
            tx,
            DataReader::new(self.config.max_message_size),
            Receiving::new(),
        );
        self.reply("354 End data with <CR><LF>.<CR><LF>");
        None
    }

    fn end_of_data(
        &mut self,
        tx: Transaction,
        reader: DataReader,
        rx: Receiving,
        now: SystemTime,
    ) -> Option<Step> {
        let (id, written) = (rx.id.clone(), rx.written);
        let step = self.finish_message(tx, reader, rx, now);
        if written > 0 && !matches!(step, Some(Step::Store(_))) {
            // Refused: its parts go before anything else happens.
            return Some(Step::Discard { id, written });
        }
        step
    }

    fn finish_message(
        &mut self,
        mut tx: Transaction,
        reader: DataReader,
        rx: Receiving,
        now: SystemTime,
    ) -> Option<Step> {
        let (rest, verdict) = reader.finish();
        let refusal = match verdict {
            Verdict::Ok => None,
            Verdict::TooBig => Some(("size", "552 5.3.4 Error: message file too big")),
            Verdict::BareLineEnding => Some((
                "bare_line_ending",
                "550 5.5.2 Error: bare <CR> or <LF> in message; lines must end with <CR><LF>",
            )),
            Verdict::Nul => Some(("nul", "550 5.6.0 Error: message contains NUL characters")),
            Verdict::LineTooLong => Some((
                "line_too_long",
                "500 5.5.2 Error: message line longer than 1000 octets",
            )),
        };
        if let Some((reason, r)) = refusal {
            return self.refused_message(reason, r);
        }
        if let Some(f) = &rx.failed {
            let (reason, reply) = f.reply();
            return self.refused_message(reason, &reply);
        }
        // Small: all in `rest`. Large: the header section was set apart, parts are stored,
        // and `rest` is the end of the body.
        let (mut body, rest) = match rx.head {
            None => (rest, Vec::new()),
            Some(head) => (head, rest),
        };
        if count_received(&body) > MAX_RECEIVED {
            return self.refused_message("loop", "554 5.4.6 Error: too many hops (mail loop?)");
        }
        // Masquerading (mail from the relay networks) changes what is stored, before our
        // own Received: goes on top.
        if let Some(m) = self.policy.masquerade_for(self.client) {
            if let Some(sender) = m.envelope_sender(&tx.sender) {
                tx.sender = sender;
            }
            if let Some(rewritten) = m.headers(&body) {
                body = rewritten;
            }
        }
        let id = rx.id;
        let received = self.received_header(&tx, &id, now);
        let mut first = Vec::with_capacity(received.len() + body.len());
        first.extend_from_slice(received.as_bytes());
        first.extend_from_slice(&body);
        let message = crate::spool::Parts {
            first,
            written: rx.written,
            written_len: rx.written_len,
            rest: if rest.is_empty() {
                Vec::new()
            } else {
                vec![rest]
            },
        };
        let arrival_ms = now
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        let envelope = Envelope {
            id,
            sender: tx.sender,
            recipients: tx.recipients,
            arrival_ms,
            size: message.len(),
            body: tx.body,
            smtputf8: tx.smtputf8,
            ret: tx.ret,
            envid: tx.envid,
            client_ip: self.client.to_string(),
            helo: self.helo.clone().unwrap_or_default(),
        };
        self.state = State::Storing;
        Some(Step::Store(Box::new(Incoming { envelope, message })))
    }

    fn received_header(&self, tx: &Transaction, id: &str, now: SystemTime) -> String {
        // RFC 3848 and RFC 6531: an S for TLS.
        let with = match (self.esmtp, tx.smtputf8, self.tls.is_some()) {
            (true, true, false) => "UTF8SMTP",
            (true, true, true) => "UTF8SMTPS",
            (true, false, false) => "ESMTP",
            (true, false, true) => "ESMTPS",
            (false, _, false) => "SMTP",
            (false, _, true) => "SMTPS",
        };
        // Like Postfix: `(using TLSv1.3 with cipher ... (256/256 bits))` after `from`.
        let using = match &self.tls {
            Some(t) => format!("\r\n\t(using {})", t.summary()),
            None => String::new(),
        };
        let date = chrono::DateTime::<chrono::Local>::from(now).to_rfc2822();
        let helo = printable(self.helo.as_deref().unwrap_or("unknown"));
        // Like Postfix: the address the client asked for, not what the virtual table made of it.
        let for_clause = match tx.given.as_slice() {
            [one] => format!("\r\n\tfor <{}>", printable(one)),
            _ => String::new(),
        };
        format!(
            "Received: from {helo} ([{}]){using}\r\n\tby {} (mxspool) with {with} id {id}{for_clause};\r\n\t{date}\r\n",
            self.client, self.config.hostname
        )
    }
}

/// The metrics label of a refused RCPT.
fn refusal_reason(refusal: &Refusal) -> &'static str {
    match refusal {
        Refusal::Relay => "relay",
        Refusal::Routing => "routing",
        Refusal::UnknownUser => "unknown_user",
        Refusal::BadMailbox => "bad_mailbox",
        Refusal::Virtual { .. } => "virtual",
        Refusal::Loop => "loop",
        Refusal::NoLocalDomain => "config",
    }
}

/// The reply to a refused RCPT.
fn refusal_reply(refusal: &Refusal, addr: &str) -> String {
    let addr = printable(addr);
    match refusal {
        Refusal::Relay => format!("550 5.7.1 <{addr}>: Relay access denied"),
        Refusal::Routing => {
            format!("550 5.7.1 <{addr}>: Sender-specified routing is not allowed")
        }
        Refusal::UnknownUser => {
            format!("550 5.1.1 <{addr}>: Recipient address rejected: User unknown")
        }
        Refusal::BadMailbox => format!("553 5.1.3 <{addr}>: Bad mailbox name"),
        Refusal::Virtual { code, status, text } => {
            format!("{code} {status} <{addr}>: {}", printable(text))
        }
        Refusal::Loop => format!("554 5.4.6 <{addr}>: Virtual alias loop"),
        Refusal::NoLocalDomain => {
            format!("451 4.3.0 <{addr}>: Virtual table names a local mailbox but no local domain is configured")
        }
    }
}

/// Client text echoed in replies and headers: no control characters.
fn printable(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_control() { '?' } else { c })
        .take(256)
        .collect()
}

/// `Received:` header fields in the header section of `message`.
fn count_received(message: &[u8]) -> usize {
    let mut n = 0;
    for line in message.split(|&b| b == b'\n') {
        if line == b"\r" || line.is_empty() {
            break;
        }
        if line.len() >= 9 && line[..9].eq_ignore_ascii_case(b"received:") {
            n += 1;
        }
    }
    n
}
