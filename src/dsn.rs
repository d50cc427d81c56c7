//! Delivery status notifications: the bounce, the delay warning and the success report
//! (RFC 3464 `message/delivery-status` inside an RFC 6522 `multipart/report`, with the
//! RFC 3461 `NOTIFY`, `RET`, `ENVID` and `ORCPT` parameters honoured).
//!
//! [`Dsn::build`] writes the complete message, CRLF line ends, every line we generate under
//! 998 octets. The DSN goes out from the null sender `<>` to the original sender; the caller
//! queues it like any mail, after checking [`is_dsn_allowed`] (no DSN about a DSN) and
//! [`wants`] for each recipient (their `NOTIFY=`).
//!
//! Choices:
//! - The original is returned whole (`message/rfc822`) only for `RET=FULL`; for `RET=HDRS` and
//!   when `RET` is absent only its header section is (`text/rfc822-headers`). RFC 3461 4.3
//!   leaves the absent case to the MTA; headers only keeps bounces small and avoids sending
//!   a whole message back to a possibly forged sender.
//! - The original is copied byte for byte: nothing folded, escaped or re-encoded. The spool
//!   holds it with CRLF line ends and lines of at most 1000 octets (`smtp::data` refuses
//!   anything else). When it holds 8-bit bytes its part says `Content-Transfer-Encoding:
//!   8bit` (and so does the report), and the DSN must be sent with `BODY=8BITMIME`
//!   ([`Dsn::is_8bit`]).
//! - `Diagnostic-Code` is `smtp; ...` when the diagnostic is an SMTP reply (starts with a
//!   reply code), else `X-mxspool; ...` (a local reason such as a DNS failure), as Postfix
//!   does with `X-Postfix`. Diagnostics are made printable ASCII (CR, LF and tabs become
//!   spaces, anything else outside ASCII `?`), cut to 900 characters, and folded.
//! - Internationalized addresses (RFC 6533, partly): a non-ASCII recipient address is written
//!   `utf-8; ` in the `utf-8-addr-xtext` form (`\x{HEX}` for non-ASCII, `+`, `=` and `\`), so
//!   the report stays ASCII, and the report part becomes `message/global-delivery-status`.
//!   An original whose header section is not ASCII is returned as `message/global-headers`
//!   (or `message/global` for `RET=FULL`). The `To:` header carries the sender as it is, so
//!   a non-ASCII sender needs `SMTPUTF8` for the DSN ([`Dsn::needs_smtputf8`]). The
//!   human-readable part is UTF-8 then. Not done: downgrading, `utf-8-addr-unitext`.
//! - Dates are RFC 5322 in local time, as in our `Received:` header.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::envelope::{Envelope, Recipient, Ret};

/// What a DSN reports, in `NOTIFY=` terms (RFC 3461 4.1).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Failure,
    Delay,
    Success,
}

/// The `Action:` of one recipient (RFC 3464 2.3.3).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// Given up: permanent failure or `max_lifetime` reached.
    Failed,
    /// Not yet delivered; retried until the given time.
    Delayed { will_retry_until: SystemTime },
    /// Delivered to a host that took responsibility and reports DSNs itself.
    Delivered,
    /// Handed to a host that does not support DSN: no further notification will come.
    Relayed,
}

impl Action {
    /// The `NOTIFY=` keyword that asks for this action to be reported.
    pub fn kind(&self) -> Kind {
        match self {
            Action::Failed => Kind::Failure,
            Action::Delayed { .. } => Kind::Delay,
            Action::Delivered | Action::Relayed => Kind::Success,
        }
    }

    fn keyword(&self) -> &'static str {
        match self {
            Action::Failed => "failed",
            Action::Delayed { .. } => "delayed",
            Action::Delivered => "delivered",
            Action::Relayed => "relayed",
        }
    }
}

/// One recipient's entry in a DSN.
#[derive(Clone, Debug)]
pub struct DsnRecipient<'a> {
    pub recipient: &'a Recipient,
    pub action: Action,
    /// RFC 3463 enhanced status code, e.g. `5.1.1`.
    pub status: String,
    /// What the remote server (or we) said, e.g. `550 5.1.1 <u@example.com>: User unknown`.
    pub diagnostic: Option<String>,
    /// Host name of the MTA that gave the diagnostic.
    pub remote_mta: Option<String>,
    pub last_attempt: Option<SystemTime>,
}

/// A delivery status notification about one queued message.
#[derive(Clone, Debug)]
pub struct Dsn<'a> {
    /// Our host name.
    pub reporting_mta: &'a str,
    pub envelope: &'a Envelope,
    /// The stored original message.
    pub message: &'a [u8],
    pub recipients: Vec<DsnRecipient<'a>>,
    pub now: SystemTime,
}

/// Whether `recipient` asked for a DSN of `kind`: absent `NOTIFY` means failure and delay,
/// `NOTIFY=NEVER` means none.
pub fn wants(recipient: &Recipient, kind: Kind) -> bool {
    match recipient.notify {
        None => matches!(kind, Kind::Failure | Kind::Delay),
        Some(n) if n.never => false,
        Some(n) => match kind {
            Kind::Failure => n.failure,
            Kind::Delay => n.delay,
            Kind::Success => n.success,
        },
    }
}

/// Whether a DSN may be sent about this message at all: never to the null sender `<>`
/// (RFC 5321 4.5.5, RFC 3464: no DSN about a DSN).
pub fn is_dsn_allowed(envelope: &Envelope) -> bool {
    !envelope.sender.trim().is_empty()
}

/// Longest diagnostic we copy (characters); keeps every folded line far below 998 octets.
const MAX_DIAGNOSTIC: usize = 900;
/// Longest single word of our own text before it is cut (octets).
const MAX_WORD: usize = 900;
/// Where generated header fields and text are folded, when a space allows.
const FOLD_AT: usize = 78;

impl Dsn<'_> {
    /// The complete RFC 5322 message, CRLF line ends.
    pub fn build(&self) -> Vec<u8> {
        let host = clean_host(self.reporting_mta);
        let kind = self.overall_kind();
        let headers_end = header_section_len(self.message);
        let full = self.envelope.ret == Some(Ret::Full);

        let text = self.text_part(&host, kind);
        let status = self.status_part(&host);
        let original = if full {
            self.message
        } else {
            &self.message[..headers_end]
        };

        let id = boundary_safe(&self.envelope.id);
        let parts: [&[u8]; 3] = [text.as_bytes(), status.as_bytes(), original];
        let boundary = pick_boundary(
            || format!("=_mxspool_{id}_{:016X}{:08X}", random(), random() as u32),
            &parts,
        );

        let text_8bit = !text.is_ascii();
        let original_8bit = !original.is_ascii();
        let global_status = self.has_intl_address();
        let global_original = !self.message[..headers_end].is_ascii();

        let mut out = Vec::with_capacity(text.len() + status.len() + original.len() + 2048);
        field(
            &mut out,
            "From",
            &format!("Mail Delivery System <MAILER-DAEMON@{host}>"),
        );
        field(
            &mut out,
            "To",
            &format!("<{}>", no_controls(self.envelope.sender.trim())),
        );
        field(
            &mut out,
            "Subject",
            match kind {
                Kind::Failure => "Undelivered Mail Returned to Sender",
                Kind::Delay => "Delayed Mail (still being retried)",
                Kind::Success => "Successful Mail Delivery Report",
            },
        );
        field(&mut out, "Date", &rfc5322(self.now));
        field(
            &mut out,
            "Message-ID",
            &format!(
                "<{}.{}.{:016X}@{host}>",
                unix_secs(self.now),
                if id.is_empty() { "dsn" } else { id.as_str() },
                random()
            ),
        );
        field(&mut out, "Auto-Submitted", "auto-replied");
        field(&mut out, "MIME-Version", "1.0");
        field(
            &mut out,
            "Content-Type",
            &format!("multipart/report; report-type=delivery-status; boundary=\"{boundary}\""),
        );
        if text_8bit || original_8bit {
            field(&mut out, "Content-Transfer-Encoding", "8bit");
        }
        out.extend_from_slice(b"\r\nThis is a MIME-encapsulated message.\r\n");

        // (1) The explanation for people.
        open_part(&mut out, &boundary);
        field(&mut out, "Content-Description", "Notification");
        if text_8bit {
            field(&mut out, "Content-Type", "text/plain; charset=utf-8");
            field(&mut out, "Content-Transfer-Encoding", "8bit");
        } else {
            field(&mut out, "Content-Type", "text/plain; charset=us-ascii");
        }
        out.extend_from_slice(b"\r\n");
        out.extend_from_slice(text.as_bytes());

        // (2) The report for programs.
        open_part(&mut out, &boundary);
        field(&mut out, "Content-Description", "Delivery report");
        field(
            &mut out,
            "Content-Type",
            if global_status {
                "message/global-delivery-status"
            } else {
                "message/delivery-status"
            },
        );
        out.extend_from_slice(b"\r\n");
        out.extend_from_slice(status.as_bytes());

        // (3) The original, untouched.
        open_part(&mut out, &boundary);
        let what = match kind {
            Kind::Failure => "Undelivered",
            Kind::Delay => "Delayed",
            Kind::Success => "Delivered",
        };
        let (description, content_type) = match (full, global_original) {
            (true, false) => ("Message", "message/rfc822"),
            (true, true) => ("Message", "message/global"),
            (false, false) => ("Message Headers", "text/rfc822-headers"),
            (false, true) => ("Message Headers", "message/global-headers"),
        };
        field(
            &mut out,
            "Content-Description",
            &format!("{what} {description}"),
        );
        field(&mut out, "Content-Type", content_type);
        if original_8bit {
            field(&mut out, "Content-Transfer-Encoding", "8bit");
        }
        out.extend_from_slice(b"\r\n");
        out.extend_from_slice(original);

        // The CRLF before a delimiter belongs to the delimiter (RFC 2046 5.1.1).
        out.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
        out
    }

    /// Whether the built DSN holds 8-bit octets, and so must be sent with `BODY=8BITMIME`.
    pub fn is_8bit(&self) -> bool {
        let returned = if self.envelope.ret == Some(Ret::Full) {
            self.message
        } else {
            &self.message[..header_section_len(self.message)]
        };
        !returned.is_ascii() || self.needs_smtputf8() || self.has_intl_address()
    }

    /// Whether the DSN must be sent with `SMTPUTF8`: its recipient (our `To:`) is not ASCII,
    /// or the returned header section is not.
    pub fn needs_smtputf8(&self) -> bool {
        !self.envelope.sender.is_ascii()
            || !self.message[..header_section_len(self.message)].is_ascii()
    }

    /// Failure if anything failed, else delay if anything is delayed, else success.
    fn overall_kind(&self) -> Kind {
        let has = |k: Kind| self.recipients.iter().any(|r| r.action.kind() == k);
        if has(Kind::Failure) || self.recipients.is_empty() {
            Kind::Failure
        } else if has(Kind::Delay) {
            Kind::Delay
        } else {
            Kind::Success
        }
    }

    fn has_intl_address(&self) -> bool {
        self.recipients.iter().any(|r| {
            !r.recipient.address.is_ascii()
                || r.recipient.orcpt.as_deref().is_some_and(|o| !o.is_ascii())
        })
    }

    /// Part 1: in the style of Postfix's bounce.
    fn text_part(&self, host: &str, kind: Kind) -> String {
        let mut t = String::new();
        para(&mut t, &format!("This is the mail system at host {host}."));
        if kind == Kind::Delay {
            t.push_str(
                "####################################################################\r\n\
                 # THIS IS A WARNING ONLY.  YOU DO NOT NEED TO RESEND YOUR MESSAGE. #\r\n\
                 ####################################################################\r\n\r\n",
            );
        }
        let returned = if self.envelope.ret == Some(Ret::Full) {
            "It is attached below."
        } else {
            "Its header section is attached below."
        };
        let mut signed = false;
        for section in [Kind::Failure, Kind::Delay, Kind::Success] {
            let rcpts: Vec<&DsnRecipient> = self
                .recipients
                .iter()
                .filter(|r| r.action.kind() == section)
                .collect();
            if rcpts.is_empty() {
                continue;
            }
            match section {
                Kind::Failure => {
                    para(
                        &mut t,
                        &format!(
                            "I'm sorry to have to inform you that your message could not be \
                             delivered to one or more recipients. {returned}"
                        ),
                    );
                    para(
                        &mut t,
                        "For further assistance, please send mail to postmaster. If you do so, \
                         please include this problem report. You can delete your own text \
                         from the attached returned message.",
                    );
                }
                Kind::Delay => {
                    let age = self
                        .now
                        .duration_since(arrival(self.envelope))
                        .unwrap_or_default();
                    let until = rcpts
                        .iter()
                        .filter_map(|r| match r.action {
                            Action::Delayed { will_retry_until } => Some(will_retry_until),
                            _ => None,
                        })
                        .max()
                        .unwrap_or(self.now);
                    para(
                        &mut t,
                        &format!(
                            "Your message could not be delivered for {} to the recipients \
                             listed below. Delivery will be retried until {}. You will be \
                             told if it still fails then.",
                            human_duration(age),
                            rfc5322(until)
                        ),
                    );
                }
                Kind::Success => {
                    para(
                        &mut t,
                        "Your message was successfully delivered to the destination(s) listed \
                         below. If it was delivered to a mailbox you will receive no further \
                         notifications. Otherwise you may still receive notifications of mail \
                         delivery errors from other systems.",
                    );
                }
            }
            if !signed {
                para(&mut t, "                   The mail system");
                signed = true;
            }
            for r in rcpts {
                para(&mut t, &recipient_line(r));
            }
        }
        if let Some(envid) = &self.envelope.envid {
            para(
                &mut t,
                &format!("Your envelope id: {}", ascii_text(envid, MAX_DIAGNOSTIC)),
            );
        }
        t
    }

    /// Part 2: the RFC 3464 fields.
    fn status_part(&self, host: &str) -> String {
        let mut s = Vec::new();
        field(&mut s, "Reporting-MTA", &format!("dns; {host}"));
        let id = boundary_safe(&self.envelope.id);
        if !id.is_empty() {
            field(&mut s, "X-mxspool-Queue-ID", &id);
        }
        let (ty, addr) = address_field(&self.envelope.sender);
        field(&mut s, "X-mxspool-Sender", &format!("{ty}; {addr}"));
        if let Some(envid) = &self.envelope.envid {
            field(
                &mut s,
                "Original-Envelope-Id",
                &ascii_text(envid, MAX_DIAGNOSTIC),
            );
        }
        field(&mut s, "Arrival-Date", &rfc5322(arrival(self.envelope)));
        for r in &self.recipients {
            s.extend_from_slice(b"\r\n");
            if let Some(orcpt) = &r.recipient.orcpt {
                field(&mut s, "Original-Recipient", &original_recipient(orcpt));
            }
            let (ty, addr) = address_field(&r.recipient.address);
            field(&mut s, "Final-Recipient", &format!("{ty}; {addr}"));
            field(&mut s, "Action", r.action.keyword());
            field(&mut s, "Status", &clean_status(&r.status, r.action));
            if let Some(remote) = &r.remote_mta {
                field(
                    &mut s,
                    "Remote-MTA",
                    &format!("dns; {}", clean_host(remote)),
                );
            }
            if let Some(diag) = &r.diagnostic {
                let diag = ascii_text(diag, MAX_DIAGNOSTIC);
                let ty = if is_smtp_reply(&diag) {
                    "smtp"
                } else {
                    "X-mxspool"
                };
                field(&mut s, "Diagnostic-Code", &format!("{ty}; {diag}"));
            }
            if let Some(t) = r.last_attempt {
                field(&mut s, "Last-Attempt-Date", &rfc5322(t));
            }
            if let Action::Delayed { will_retry_until } = r.action {
                field(&mut s, "Will-Retry-Until", &rfc5322(will_retry_until));
            }
        }
        // Everything above is ASCII by construction.
        String::from_utf8(s).unwrap_or_default()
    }
}

/// `<address> (originally <orcpt>): host X said: ...`, Postfix style.
fn recipient_line(r: &DsnRecipient) -> String {
    let mut line = format!("<{}>", no_controls(&r.recipient.address));
    if let Some(orcpt) = &r.recipient.orcpt {
        let original = orcpt
            .split_once(';')
            .map_or(orcpt.as_str(), |(_, a)| a)
            .trim();
        if !original.eq_ignore_ascii_case(&r.recipient.address) {
            line.push_str(&format!(" (originally <{}>)", no_controls(original)));
        }
    }
    let diag = r
        .diagnostic
        .as_deref()
        .map(|d| ascii_text(d, MAX_DIAGNOSTIC));
    let remote = r.remote_mta.as_deref().map(clean_host);
    let status = clean_status(&r.status, r.action);
    let detail = match (r.action, remote, diag) {
        (Action::Delivered, Some(h), Some(d)) => format!("delivered to host {h}: {d}"),
        (Action::Delivered, Some(h), None) => format!("delivered to host {h}"),
        (Action::Delivered, None, Some(d)) => format!("delivered: {d}"),
        (Action::Delivered, None, None) => format!("delivered ({status})"),
        (Action::Relayed, Some(h), _) => {
            format!("relayed to host {h}, which does not report delivery status")
        }
        (Action::Relayed, None, _) => {
            "relayed to a host that does not report delivery status".to_string()
        }
        (_, Some(h), Some(d)) => format!("host {h} said: {d}"),
        (_, None, Some(d)) => d,
        (_, Some(h), None) => format!("delivery to host {h} failed ({status})"),
        (Action::Failed, None, None) => format!("delivery failed ({status})"),
        (_, None, None) => format!("delivery temporarily failed ({status})"),
    };
    format!("{line}: {detail}")
}

/// The length of the header section of `message`, its last line end included, the empty
/// line that ends it not. The whole message if it has no body.
pub(crate) fn header_section_len(message: &[u8]) -> usize {
    let mut start = 0;
    while start < message.len() {
        let end = message[start..]
            .iter()
            .position(|&b| b == b'\n')
            .map_or(message.len(), |p| start + p + 1);
        let line = &message[start..end];
        if line == b"\r\n" || line == b"\n" {
            return start;
        }
        start = end;
    }
    message.len()
}

/// A boundary from `candidate` that occurs in none of `parts`.
fn pick_boundary(mut candidate: impl FnMut() -> String, parts: &[&[u8]]) -> String {
    loop {
        let b = candidate();
        if !parts.iter().any(|p| contains(p, b.as_bytes())) {
            return b;
        }
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    needle.is_empty() || haystack.windows(needle.len()).any(|w| w == needle)
}

/// Random-ish: a randomly keyed SipHash of the time and a counter.
fn random() -> u64 {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut h = RandomState::new().build_hasher();
    h.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    h.write_u128(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    h.write_u32(std::process::id());
    h.finish()
}

/// Appends `Name: value` CRLF, folded before a space where a line would pass 78 octets.
/// `value` must hold no CR or LF.
fn field(out: &mut Vec<u8>, name: &str, value: &str) {
    let mut line_len = name.len() + 1;
    out.extend_from_slice(name.as_bytes());
    out.push(b':');
    for word in value.split(' ').filter(|w| !w.is_empty()) {
        if line_len + 1 + word.len() > FOLD_AT && line_len > name.len() + 1 {
            out.extend_from_slice(b"\r\n");
            line_len = 0;
        }
        out.push(b' ');
        out.extend_from_slice(word.as_bytes());
        line_len += 1 + word.len();
    }
    out.extend_from_slice(b"\r\n");
}

fn open_part(out: &mut Vec<u8>, boundary: &str) {
    out.extend_from_slice(format!("\r\n--{boundary}\r\n").as_bytes());
}

/// Appends `text` wrapped at 78 octets, then an empty line. Leading spaces are kept.
fn para(out: &mut String, text: &str) {
    let indent = text.len() - text.trim_start_matches(' ').len();
    let mut line = " ".repeat(indent);
    let mut has_word = false;
    for word in text.split(' ').filter(|w| !w.is_empty()) {
        let word = cut(word, MAX_WORD);
        if has_word && line.len() + 1 + word.len() > FOLD_AT {
            out.push_str(&line);
            out.push_str("\r\n");
            line.clear();
            has_word = false;
        }
        if has_word {
            line.push(' ');
        }
        line.push_str(word);
        has_word = true;
    }
    out.push_str(&line);
    out.push_str("\r\n\r\n");
}

/// The longest prefix of `s` of at most `max` octets that ends on a character boundary.
fn cut(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// Printable ASCII on one line: CR, LF and tabs become spaces, runs of spaces one space, any
/// other control or non-ASCII character `?`; at most `max` characters.
fn ascii_text(s: &str, max: usize) -> String {
    let mut out = String::new();
    for c in s.chars() {
        let c = match c {
            '\r' | '\n' | '\t' | ' ' => ' ',
            c if c.is_ascii_graphic() => c,
            _ => '?',
        };
        if c == ' ' && (out.is_empty() || out.ends_with(' ')) {
            continue;
        }
        if out.len() >= max {
            break;
        }
        out.push(c);
    }
    out.trim_end().to_string()
}

/// `s` with control characters (CR and LF among them) and spaces replaced by `?`, at most
/// 900 octets: for addresses, which are one word.
fn no_controls(s: &str) -> String {
    let s: String = s
        .chars()
        .map(|c| if c.is_control() || c == ' ' { '?' } else { c })
        .collect();
    cut(&s, MAX_WORD).to_string()
}

/// A host name as we write it: ASCII letters, digits and `.-_:[]` only.
fn clean_host(s: &str) -> String {
    let s: String = s
        .trim()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || ".-_:[]".contains(c) {
                c
            } else {
                '?'
            }
        })
        .collect();
    cut(&s, 255).to_string()
}

/// Characters of a queue id that are safe in a boundary and a Message-ID.
fn boundary_safe(s: &str) -> String {
    s.chars()
        .filter(|c| c.is_ascii_alphanumeric())
        .take(30)
        .collect()
}

/// The status if it is `class.subject.detail` digits of a class that fits the action (2 for
/// delivered and relayed, 4 for delayed, 4 or 5 for failed); else one derived from the action.
fn clean_status(status: &str, action: Action) -> String {
    let s = status.trim();
    let parts: Vec<&str> = s.split('.').collect();
    let ok = parts.len() == 3
        && parts
            .iter()
            .all(|p| !p.is_empty() && p.len() <= 3 && p.bytes().all(|b| b.is_ascii_digit()))
        && match action {
            // A transient condition that lasted too long ends in failure too (RFC 3463 4.x.x).
            Action::Failed => matches!(parts[0], "4" | "5"),
            Action::Delayed { .. } => parts[0] == "4",
            Action::Delivered | Action::Relayed => parts[0] == "2",
        };
    if ok {
        return s.to_string();
    }
    match action {
        Action::Failed => "5.0.0",
        Action::Delayed { .. } => "4.0.0",
        Action::Delivered | Action::Relayed => "2.0.0",
    }
    .to_string()
}

/// Whether `diag` starts like an SMTP reply: `[2-5]xx` then a space, a hyphen or the end.
fn is_smtp_reply(diag: &str) -> bool {
    let b = diag.as_bytes();
    b.len() >= 3
        && (b'2'..=b'5').contains(&b[0])
        && b[1].is_ascii_digit()
        && b[2].is_ascii_digit()
        && (b.len() == 3 || b[3] == b' ' || b[3] == b'-')
}

/// `(address type, address)` for Final-Recipient: `rfc822` for ASCII, else RFC 6533 `utf-8`
/// in its `utf-8-addr-xtext` form.
fn address_field(address: &str) -> (&'static str, String) {
    let address = address.trim();
    if address.is_ascii() {
        ("rfc822", no_controls(address))
    } else {
        ("utf-8", utf8_addr_xtext(address))
    }
}

/// `Original-Recipient` from the stored `type;address`: `rfc822;address` (the type kept as
/// given), or `utf-8;` xtext when the address is not ASCII.
fn original_recipient(orcpt: &str) -> String {
    let (ty, addr) = orcpt
        .split_once(';')
        .map_or(("rfc822", orcpt), |(t, a)| (t.trim(), a.trim()));
    if !addr.is_ascii() {
        return format!("utf-8;{}", utf8_addr_xtext(addr));
    }
    let ty: String = ty
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '-')
        .collect();
    let ty = if ty.is_empty() {
        "rfc822".to_string()
    } else {
        ty
    };
    format!("{ty};{}", no_controls(addr))
}

/// RFC 6533 `utf-8-addr-xtext`: printable ASCII but `+`, `=` and `\` as is, everything else
/// `\x{HEX}`.
fn utf8_addr_xtext(address: &str) -> String {
    let mut out = String::new();
    for c in address.chars() {
        if c.is_ascii_graphic() && !matches!(c, '+' | '=' | '\\') {
            out.push(c);
        } else {
            out.push_str(&format!("\\x{{{:02X}}}", c as u32));
        }
    }
    cut(&out, MAX_WORD).to_string()
}

fn arrival(envelope: &Envelope) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(envelope.arrival_ms)
}

fn unix_secs(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// RFC 5322 date-time, local time zone.
fn rfc5322(t: SystemTime) -> String {
    chrono::DateTime::<chrono::Local>::from(t).to_rfc2822()
}

fn human_duration(d: Duration) -> String {
    let s = d.as_secs();
    if s < 2 * 3600 {
        format!("{} minutes", s / 60)
    } else if s < 2 * 86400 {
        format!("{:.1} hours", s as f64 / 3600.0)
    } else {
        format!("{:.1} days", s as f64 / 86400.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::envelope::{Body, Notify, RcptState};
    use serde_json::Value;
    use std::io::Write;
    use std::process::{Command, Stdio};

    const HOST: &str = "mx2.example.net";
    const HEADERS: &str = "Received: from client.example ([192.0.2.7])\r\n\
        \tby mx2.example.net (mxspool) with ESMTP id 0ABCDEFGHJKMN;\r\n\
        \tMon, 3 Mar 2025 10:00:00 +0000\r\n\
        From: Alice <alice@sender.example>\r\n\
        To: bob@example.com, carol@example.org\r\n\
        Subject: quarterly report\r\n\
        Message-ID: <orig-1@sender.example>\r\n\
        Date: Mon, 3 Mar 2025 09:59:58 +0000\r\n";
    const BODY: &str = "Hello Bob,\r\n\r\nthe numbers are attached.\r\n-- \r\nAlice\r\n";

    fn original() -> Vec<u8> {
        format!("{HEADERS}\r\n{BODY}").into_bytes()
    }

    fn envelope(ret: Option<Ret>, envid: Option<&str>) -> Envelope {
        let mut bob = Recipient::new("bob@example.com");
        bob.orcpt = Some("rfc822;Robert@Example.COM".to_string());
        Envelope {
            id: "0ABCDEFGHJKMN".to_string(),
            sender: "alice@sender.example".to_string(),
            recipients: vec![bob, Recipient::new("carol@example.org")],
            arrival_ms: 1_741_000_000_123,
            size: original().len() as u64,
            body: Body::SevenBit,
            smtputf8: false,
            ret,
            envid: envid.map(str::to_string),
            client_ip: "192.0.2.7".to_string(),
            helo: "client.example".to_string(),
        }
    }

    fn at(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(secs)
    }

    const NOW: u64 = 1_741_432_000;

    /// Bob failed at a remote server; Carol failed with nothing known about why.
    fn failure<'a>(env: &'a Envelope, message: &'a [u8]) -> Dsn<'a> {
        Dsn {
            reporting_mta: HOST,
            envelope: env,
            message,
            recipients: vec![
                DsnRecipient {
                    recipient: &env.recipients[0],
                    action: Action::Failed,
                    status: "5.1.1".to_string(),
                    diagnostic: Some("550 5.1.1 <bob@example.com>: User unknown".to_string()),
                    remote_mta: Some("mx1.example.com".to_string()),
                    last_attempt: Some(at(NOW - 60)),
                },
                DsnRecipient {
                    recipient: &env.recipients[1],
                    action: Action::Failed,
                    status: "5.4.7".to_string(),
                    diagnostic: None,
                    remote_mta: None,
                    last_attempt: None,
                },
            ],
            now: at(NOW),
        }
    }

    const PARSE: &str = r#"
import sys, json, email, email.policy, email.utils
raw = sys.stdin.buffer.read()

def ts(name, value):
    if name.lower() in ('date', 'arrival-date', 'last-attempt-date', 'will-retry-until'):
        return email.utils.parsedate_to_datetime(value).timestamp()
    return None

def hdrs(m):
    return [[k, str(v), ts(k, str(v))] for k, v in m.items()]

def lat(b):
    return None if b is None else b.decode('latin-1')

def part(p):
    d = {'type': p.get_content_type(), 'params': p.get_params() or [], 'headers': hdrs(p)}
    pl = p.get_payload()
    if isinstance(pl, list):
        d['blocks'] = [hdrs(b) for b in pl]
        if p.get_content_type() in ('message/rfc822', 'message/global'):
            d['sub_body'] = lat(pl[0].get_payload(decode=True))
    else:
        d['body'] = lat(p.get_payload(decode=True))
    return d

msg = email.message_from_bytes(raw)
defects = []
for p in msg.walk():
    defects += ['%s: %s' % (p.get_content_type(), type(x).__name__) for x in p.defects]
strict = email.message_from_bytes(raw, policy=email.policy.default)
for p in strict.walk():
    defects += ['%s: %s' % (p.get_content_type(), type(x).__name__) for x in p.defects]
    for k, v in p.items():
        defects += ['%s %s: %s' % (p.get_content_type(), k, type(x).__name__)
                    for x in getattr(v, 'defects', ())]
out = part(msg)
out['parts'] = [part(p) for p in msg.get_payload()] if msg.is_multipart() else []
out['defects'] = defects
print(json.dumps(out))
"#;

    /// The DSN as Python's `email` package sees it, which must find no defect; panics if
    /// python3 is missing.
    fn python_parse(dsn: &[u8]) -> Value {
        let v = python_parse_with_defects(dsn);
        assert_eq!(v["defects"], serde_json::json!([]), "defects in the DSN");
        v
    }

    fn python_parse_with_defects(dsn: &[u8]) -> Value {
        let mut child = Command::new("python3")
            .arg("-c")
            .arg(PARSE)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("python3 is required by the DSN tests");
        child.stdin.take().unwrap().write_all(dsn).unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "python failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    }

    /// The value of header `name` in a `[name, value, ts]` list, unfolded.
    fn get(headers: &Value, name: &str) -> Option<String> {
        let all = all(headers, name);
        assert!(all.len() <= 1, "{name} appears {} times", all.len());
        all.into_iter().next()
    }

    fn all(headers: &Value, name: &str) -> Vec<String> {
        headers
            .as_array()
            .unwrap()
            .iter()
            .filter(|h| h[0].as_str().unwrap().eq_ignore_ascii_case(name))
            .map(|h| h[1].as_str().unwrap().replace("\r\n", "").replace('\n', ""))
            .collect()
    }

    fn timestamp(headers: &Value, name: &str) -> f64 {
        headers
            .as_array()
            .unwrap()
            .iter()
            .find(|h| h[0].as_str().unwrap().eq_ignore_ascii_case(name))
            .unwrap_or_else(|| panic!("no {name}"))[2]
            .as_f64()
            .unwrap()
    }

    fn latin1(v: &Value) -> Vec<u8> {
        v.as_str().unwrap().chars().map(|c| c as u8).collect()
    }

    /// CRLF only, and no line of 998 octets or more.
    fn assert_wire_format(dsn: &[u8]) {
        assert!(dsn.ends_with(b"\r\n"));
        let text = dsn.strip_suffix(b"\r\n").unwrap();
        let mut rest = text;
        let mut i = 0;
        loop {
            let (line, next) = match rest.windows(2).position(|w| w == b"\r\n") {
                Some(p) => (&rest[..p], Some(&rest[p + 2..])),
                None => (rest, None),
            };
            assert!(
                !line.contains(&b'\r') && !line.contains(&b'\n'),
                "bare CR or LF in line {i}"
            );
            assert!(line.len() < 998, "line {i} is {} octets", line.len());
            i += 1;
            match next {
                Some(n) => rest = n,
                None => break,
            }
        }
    }

    fn part(v: &Value, i: usize) -> &Value {
        &v["parts"][i]
    }

    fn param(p: &Value, name: &str) -> Option<String> {
        p["params"]
            .as_array()
            .unwrap()
            .iter()
            .find(|kv| kv[0].as_str().unwrap() == name)
            .map(|kv| kv[1].as_str().unwrap().to_string())
    }

    #[test]
    fn failure_dsn_for_two_recipients_with_orcpt_envid_and_ret_hdrs() {
        let message = original();
        let env = envelope(Some(Ret::Hdrs), Some("QQ314159"));
        let dsn = failure(&env, &message).build();
        assert_wire_format(&dsn);
        let v = python_parse(&dsn);

        // The message header.
        let h = &v["headers"];
        assert_eq!(
            get(h, "From").unwrap(),
            format!("Mail Delivery System <MAILER-DAEMON@{HOST}>")
        );
        assert_eq!(get(h, "To").unwrap(), "<alice@sender.example>");
        assert_eq!(
            get(h, "Subject").unwrap(),
            "Undelivered Mail Returned to Sender"
        );
        assert_eq!(get(h, "Auto-Submitted").unwrap(), "auto-replied");
        assert_eq!(get(h, "MIME-Version").unwrap(), "1.0");
        assert_eq!(timestamp(h, "Date"), NOW as f64);
        let mid = get(h, "Message-ID").unwrap();
        assert!(
            mid.starts_with('<') && mid.ends_with(&format!("@{HOST}>")),
            "{mid}"
        );
        assert_eq!(v["type"], "multipart/report");
        assert_eq!(param(&v, "report-type").unwrap(), "delivery-status");
        let boundary = param(&v, "boundary").unwrap();
        assert!(boundary.contains(&env.id), "{boundary}");
        assert!(!contains(&message, boundary.as_bytes()));
        assert_eq!(v["parts"].as_array().unwrap().len(), 3);

        // (1) The human part.
        let text = part(&v, 0);
        assert_eq!(text["type"], "text/plain");
        assert_eq!(param(text, "charset").unwrap(), "us-ascii");
        let body = text["body"].as_str().unwrap().replace("\r\n", " ");
        assert!(body.contains(&format!("This is the mail system at host {HOST}.")));
        assert!(body.contains("could not be"), "{body}");
        assert!(body.contains("<bob@example.com> (originally <Robert@Example.COM>): host mx1.example.com said: 550 5.1.1 <bob@example.com>: User unknown"), "{body}");
        assert!(
            body.contains("<carol@example.org>: delivery failed (5.4.7)"),
            "{body}"
        );

        // (2) The report.
        let report = part(&v, 1);
        assert_eq!(report["type"], "message/delivery-status");
        let blocks = report["blocks"].as_array().unwrap();
        assert_eq!(blocks.len(), 3, "{blocks:?}");
        let m = &blocks[0];
        assert_eq!(get(m, "Reporting-MTA").unwrap(), format!("dns; {HOST}"));
        assert_eq!(get(m, "Original-Envelope-Id").unwrap(), "QQ314159");
        assert_eq!(timestamp(m, "Arrival-Date"), 1_741_000_000.0);

        let bob = &blocks[1];
        assert_eq!(
            get(bob, "Original-Recipient").unwrap(),
            "rfc822;Robert@Example.COM"
        );
        assert_eq!(
            get(bob, "Final-Recipient").unwrap(),
            "rfc822; bob@example.com"
        );
        assert_eq!(get(bob, "Action").unwrap(), "failed");
        assert_eq!(get(bob, "Status").unwrap(), "5.1.1");
        assert_eq!(get(bob, "Remote-MTA").unwrap(), "dns; mx1.example.com");
        assert_eq!(
            get(bob, "Diagnostic-Code").unwrap(),
            "smtp; 550 5.1.1 <bob@example.com>: User unknown"
        );
        assert_eq!(timestamp(bob, "Last-Attempt-Date"), (NOW - 60) as f64);
        assert_eq!(get(bob, "Will-Retry-Until"), None);

        let carol = &blocks[2];
        assert_eq!(get(carol, "Original-Recipient"), None);
        assert_eq!(
            get(carol, "Final-Recipient").unwrap(),
            "rfc822; carol@example.org"
        );
        assert_eq!(get(carol, "Action").unwrap(), "failed");
        assert_eq!(get(carol, "Status").unwrap(), "5.4.7");
        assert_eq!(get(carol, "Remote-MTA"), None);
        assert_eq!(get(carol, "Diagnostic-Code"), None);
        assert_eq!(get(carol, "Last-Attempt-Date"), None);
        assert_eq!(get(carol, "Will-Retry-Until"), None);

        // (3) Exactly the header section of the original.
        let orig = part(&v, 2);
        assert_eq!(orig["type"], "text/rfc822-headers");
        assert_eq!(latin1(&orig["body"]), HEADERS.as_bytes());
    }

    #[test]
    fn ret_full_returns_the_whole_message_as_message_rfc822() {
        let message = original();
        let env = envelope(Some(Ret::Full), None);
        let dsn = failure(&env, &message).build();
        assert_wire_format(&dsn);
        let v = python_parse(&dsn);
        let orig = part(&v, 2);
        assert_eq!(orig["type"], "message/rfc822");
        let sub = &orig["blocks"][0];
        assert_eq!(get(sub, "Subject").unwrap(), "quarterly report");
        assert_eq!(get(sub, "Message-ID").unwrap(), "<orig-1@sender.example>");
        assert_eq!(all(sub, "Received").len(), 1);
        assert_eq!(latin1(&orig["sub_body"]), BODY.as_bytes());
        // Byte for byte: the part holds the original and nothing else.
        let boundary = param(&v, "boundary").unwrap();
        let mut expected = b"Content-Type: message/rfc822\r\n\r\n".to_vec();
        expected.extend_from_slice(&message);
        expected.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
        assert!(dsn.ends_with(&expected));
        // No ENVID, no Original-Envelope-Id.
        assert_eq!(get(&part(&v, 1)["blocks"][0], "Original-Envelope-Id"), None);
        let text = part(&v, 0)["body"].as_str().unwrap().replace("\r\n", " ");
        assert!(text.contains("It is attached below."), "{text}");
    }

    #[test]
    fn ret_absent_returns_the_header_section_only() {
        let message = original();
        let env = envelope(None, None);
        let v = python_parse(&failure(&env, &message).build());
        let orig = part(&v, 2);
        assert_eq!(orig["type"], "text/rfc822-headers");
        assert_eq!(latin1(&orig["body"]), HEADERS.as_bytes());
    }

    #[test]
    fn delay_dsn_says_delayed_and_until_when() {
        let message = original();
        let env = envelope(None, None);
        let until = at(NOW + 4 * 86400);
        let dsn = Dsn {
            reporting_mta: HOST,
            envelope: &env,
            message: &message,
            recipients: vec![DsnRecipient {
                recipient: &env.recipients[1],
                action: Action::Delayed {
                    will_retry_until: until,
                },
                status: "4.4.1".to_string(),
                diagnostic: Some(
                    "connect to mx.example.org[192.0.2.9]:25: Connection refused".to_string(),
                ),
                remote_mta: None,
                last_attempt: Some(at(NOW - 300)),
            }],
            now: at(NOW),
        }
        .build();
        assert_wire_format(&dsn);
        let v = python_parse(&dsn);
        assert_eq!(
            get(&v["headers"], "Subject").unwrap(),
            "Delayed Mail (still being retried)"
        );
        let blocks = part(&v, 1)["blocks"].as_array().unwrap().clone();
        assert_eq!(blocks.len(), 2);
        let carol = &blocks[1];
        assert_eq!(get(carol, "Action").unwrap(), "delayed");
        assert_eq!(get(carol, "Status").unwrap(), "4.4.1");
        assert_eq!(
            timestamp(carol, "Will-Retry-Until"),
            (NOW + 4 * 86400) as f64
        );
        assert_eq!(timestamp(carol, "Last-Attempt-Date"), (NOW - 300) as f64);
        // Not an SMTP reply: our own diagnostic type.
        assert_eq!(
            get(carol, "Diagnostic-Code").unwrap(),
            "X-mxspool; connect to mx.example.org[192.0.2.9]:25: Connection refused"
        );
        assert_eq!(get(carol, "Remote-MTA"), None);
        let text = part(&v, 0)["body"].as_str().unwrap().replace("\r\n", " ");
        assert!(text.contains("THIS IS A WARNING ONLY"), "{text}");
        assert!(
            text.contains(&format!("retried until {}", rfc5322(until))),
            "{text}"
        );
        assert!(!text.contains("could not be delivered to one"), "{text}");
    }

    #[test]
    fn success_dsn_reports_delivered_and_relayed() {
        let message = original();
        let env = envelope(None, None);
        let dsn = Dsn {
            reporting_mta: HOST,
            envelope: &env,
            message: &message,
            recipients: vec![
                DsnRecipient {
                    recipient: &env.recipients[0],
                    action: Action::Delivered,
                    status: "2.0.0".to_string(),
                    diagnostic: Some("250 2.0.0 Ok: queued as 4XyZ".to_string()),
                    remote_mta: Some("mx1.example.com".to_string()),
                    last_attempt: None,
                },
                DsnRecipient {
                    recipient: &env.recipients[1],
                    action: Action::Relayed,
                    status: "2.0.0".to_string(),
                    diagnostic: None,
                    remote_mta: Some("old.example.org".to_string()),
                    last_attempt: None,
                },
            ],
            now: at(NOW),
        }
        .build();
        let v = python_parse(&dsn);
        assert_eq!(
            get(&v["headers"], "Subject").unwrap(),
            "Successful Mail Delivery Report"
        );
        let blocks = part(&v, 1)["blocks"].as_array().unwrap().clone();
        assert_eq!(get(&blocks[1], "Action").unwrap(), "delivered");
        assert_eq!(get(&blocks[2], "Action").unwrap(), "relayed");
        assert_eq!(
            get(&blocks[2], "Remote-MTA").unwrap(),
            "dns; old.example.org"
        );
        assert_eq!(get(&blocks[2], "Diagnostic-Code"), None);
        assert_eq!(part(&v, 2)["type"], "text/rfc822-headers");
    }

    #[test]
    fn long_and_hostile_diagnostics_are_folded_and_made_ascii() {
        let message = original();
        let env = envelope(None, None);
        let mut d = failure(&env, &message);
        let long = format!(
            "550-5.7.1 first line\r\n550 5.7.1 caf\u{e9} \x07{}{}",
            "blocked ".repeat(300),
            "x".repeat(2000)
        );
        d.recipients[0].diagnostic = Some(long);
        d.recipients[0].remote_mta = Some("evil\r\nX-Injected: yes".to_string());
        let dsn = d.build();
        assert_wire_format(&dsn);
        assert!(!contains(&dsn, b"\r\nX-Injected"));
        let v = python_parse(&dsn);
        let bob = &part(&v, 1)["blocks"][1];
        let diag = get(bob, "Diagnostic-Code").unwrap();
        assert!(
            diag.starts_with("smtp; 550-5.7.1 first line 550 5.7.1 caf? ?blocked blocked"),
            "{diag}"
        );
        assert!(diag.is_ascii() && diag.len() < 1000);
        assert_eq!(
            get(bob, "Remote-MTA").unwrap(),
            "dns; evil??X-Injected:?yes"
        );
    }

    #[test]
    fn eight_bit_original_is_marked_and_kept() {
        let mut message = original();
        message.extend_from_slice("Gr\u{fc}\u{df}e\r\n".as_bytes());
        let env = envelope(Some(Ret::Full), None);
        let d = failure(&env, &message);
        let dsn = d.build();
        assert!(d.is_8bit() && !d.needs_smtputf8());
        assert_wire_format(&dsn);
        let v = python_parse(&dsn);
        assert_eq!(
            get(&v["headers"], "Content-Transfer-Encoding").unwrap(),
            "8bit"
        );
        let orig = part(&v, 2);
        assert_eq!(orig["type"], "message/rfc822");
        assert_eq!(
            get(&orig["headers"], "Content-Transfer-Encoding").unwrap(),
            "8bit"
        );
        assert!(contains(&dsn, &message));
    }

    #[test]
    fn utf8_recipient_gets_the_utf8_address_type() {
        let message = "From: =?utf-8?q?J=C3=B6rg?= <j@sender.example>\r\nTo: d\u{f6}rte@b\u{fc}ro.example\r\nSubject: hi\r\n\r\nhi\r\n"
            .as_bytes()
            .to_vec();
        let mut env = envelope(None, None);
        env.smtputf8 = true;
        let mut rcpt = Recipient::new("d\u{f6}rte+x@b\u{fc}ro.example");
        rcpt.orcpt = Some("utf-8;d\u{f6}rte+x@b\u{fc}ro.example".to_string());
        env.recipients = vec![rcpt];
        let d = Dsn {
            reporting_mta: HOST,
            envelope: &env,
            message: &message,
            recipients: vec![DsnRecipient {
                recipient: &env.recipients[0],
                action: Action::Failed,
                status: "5.1.1".to_string(),
                diagnostic: Some("550 5.1.1 no such user".to_string()),
                remote_mta: None,
                last_attempt: None,
            }],
            now: at(NOW),
        };
        let dsn = d.build();
        assert!(d.needs_smtputf8() && d.is_8bit());
        assert_wire_format(&dsn);
        let text = String::from_utf8(dsn.clone()).unwrap();
        assert!(text.contains("Content-Type: message/global-delivery-status\r\n"));
        assert!(
            text.contains("\r\nFinal-Recipient: utf-8; d\\x{F6}rte\\x{2B}x@b\\x{FC}ro.example\r\n")
        );
        assert!(text
            .contains("\r\nOriginal-Recipient: utf-8;d\\x{F6}rte\\x{2B}x@b\\x{FC}ro.example\r\n"));
        assert!(text.contains("Content-Type: message/global-headers\r\n"));
        // Python's parser reads header bytes as ASCII, so it finds defects in the raw UTF-8
        // `To:` of the returned header section (valid by RFC 6532); only there.
        let v = python_parse_with_defects(&dsn);
        for d in v["defects"].as_array().unwrap() {
            assert!(d.as_str().unwrap().starts_with("text/plain To: "), "{d}");
        }
        assert_eq!(part(&v, 1)["type"], "message/global-delivery-status");
        assert_eq!(part(&v, 2)["type"], "message/global-headers");
        assert_eq!(param(part(&v, 0), "charset").unwrap(), "utf-8");
    }

    #[test]
    fn boundary_avoids_what_is_in_the_parts() {
        let mut candidates = ["taken", "also-taken", "free"].into_iter();
        let b = pick_boundary(
            || candidates.next().unwrap().to_string(),
            &[b"xx --taken yy", b"also-taken"],
        );
        assert_eq!(b, "free");
    }

    #[test]
    fn message_ids_and_boundaries_differ_between_builds() {
        let message = original();
        let env = envelope(None, None);
        assert_ne!(
            failure(&env, &message).build(),
            failure(&env, &message).build()
        );
    }

    #[test]
    fn status_must_fit_the_action() {
        let delayed = Action::Delayed {
            will_retry_until: at(NOW),
        };
        assert_eq!(clean_status("5.1.1", Action::Failed), "5.1.1");
        assert_eq!(clean_status("4.4.1", Action::Failed), "4.4.1");
        assert_eq!(clean_status("2.0.0", Action::Failed), "5.0.0");
        assert_eq!(clean_status("4.4.7", delayed), "4.4.7");
        assert_eq!(clean_status("5.4.7", delayed), "4.0.0");
        assert_eq!(clean_status("2.1.5", Action::Delivered), "2.1.5");
        assert_eq!(clean_status("5.1.1\r\nX: y", Action::Failed), "5.0.0");
        assert_eq!(clean_status("", Action::Relayed), "2.0.0");
    }

    #[test]
    fn header_section_ends_at_the_first_empty_line() {
        assert_eq!(header_section_len(b"A: b\r\n\r\nbody\r\n\r\n"), 6);
        assert_eq!(header_section_len(b"A: b\r\nC: d\r\n"), 12);
        assert_eq!(header_section_len(b"\r\nbody"), 0);
        assert_eq!(header_section_len(b""), 0);
    }

    fn with_notify(notify: Option<Notify>) -> Recipient {
        Recipient {
            address: "u@example.com".to_string(),
            orcpt: None,
            notify,
            state: RcptState::Pending,
        }
    }

    #[test]
    fn wants_defaults_to_failure_and_delay() {
        let r = with_notify(None);
        assert!(wants(&r, Kind::Failure));
        assert!(wants(&r, Kind::Delay));
        assert!(!wants(&r, Kind::Success));
    }

    #[test]
    fn wants_nothing_for_never() {
        let r = with_notify(Some(Notify {
            never: true,
            ..Notify::default()
        }));
        for k in [Kind::Failure, Kind::Delay, Kind::Success] {
            assert!(!wants(&r, k));
        }
    }

    #[test]
    fn wants_only_success() {
        let r = with_notify(Some(Notify {
            success: true,
            ..Notify::default()
        }));
        assert!(wants(&r, Kind::Success));
        assert!(!wants(&r, Kind::Failure));
        assert!(!wants(&r, Kind::Delay));
    }

    #[test]
    fn wants_failure_and_delay_when_asked() {
        let r = with_notify(Some(Notify {
            failure: true,
            delay: true,
            ..Notify::default()
        }));
        assert!(wants(&r, Kind::Failure));
        assert!(wants(&r, Kind::Delay));
        assert!(!wants(&r, Kind::Success));
        assert_eq!(Action::Relayed.kind(), Kind::Success);
    }

    #[test]
    fn no_dsn_to_the_null_sender() {
        let mut env = envelope(None, None);
        assert!(is_dsn_allowed(&env));
        env.sender = String::new();
        assert!(!is_dsn_allowed(&env));
    }
}
