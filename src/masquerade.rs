//! Sender masquerading: sendmail's `MASQUERADE_AS`, `MASQUERADE_DOMAIN` with
//! `FEATURE(masquerade_entire_domain)`, and `FEATURE(masquerade_envelope)`.
//!
//! An address whose domain is one of `domains`, or a host under one, gets `as_domain` as its
//! domain: `joao@mail-server1.inst.uc.pt` becomes `joao@inst.uc.pt`. The header fields
//! `From:` and `Sender:` are rewritten always; the envelope sender only when `envelope` is
//! on. Header rewriting changes only the domain bytes of the addresses found and leaves every
//! other byte of the message as it was.

/// The masquerading settings.
#[derive(Debug, Clone)]
pub struct Masquerade {
    /// The domain addresses are rewritten to.
    as_domain: String,
    /// The domains (and hosts under them) that are rewritten.
    domains: Vec<String>,
    /// Whether the envelope sender is rewritten too.
    envelope: bool,
}

/// Lower case, without one trailing dot.
fn normalise(domain: &str) -> String {
    let domain = domain.strip_suffix('.').unwrap_or(domain);
    domain.to_ascii_lowercase()
}

/// A byte of the domain run that follows an `@` in a header field.
fn is_domain_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'.' || b == b'-'
}

impl Masquerade {
    /// `as_domain` and `domains` lower case, no trailing dot (normalised again here anyway;
    /// empty entries of `domains` are ignored).
    pub fn new(as_domain: &str, domains: &[String], envelope: bool) -> Masquerade {
        Masquerade {
            as_domain: normalise(as_domain),
            domains: domains
                .iter()
                .map(|d| normalise(d))
                .filter(|d| !d.is_empty())
                .collect(),
            envelope,
        }
    }

    /// Whether `domain` is one of `domains` or a host under one (x.inst.uc.pt under
    /// inst.uc.pt; not evilinst.uc.pt). Any case; one trailing dot allowed.
    pub fn covers(&self, domain: &str) -> bool {
        let domain = domain.strip_suffix('.').unwrap_or(domain).as_bytes();
        if domain.is_empty() {
            return false;
        }
        self.domains.iter().any(|m| {
            let m = m.as_bytes();
            if domain.len() == m.len() {
                domain.eq_ignore_ascii_case(m)
            } else if domain.len() > m.len() {
                let split = domain.len() - m.len();
                domain[split - 1] == b'.' && domain[split..].eq_ignore_ascii_case(m)
            } else {
                false
            }
        })
    }

    /// Whether `domain` is already `as_domain`.
    fn is_as_domain(&self, domain: &str) -> bool {
        let domain = domain.strip_suffix('.').unwrap_or(domain);
        domain.eq_ignore_ascii_case(&self.as_domain)
    }

    /// Whether an address at `domain` is rewritten.
    fn rewrites(&self, domain: &str) -> bool {
        self.covers(domain) && !self.is_as_domain(domain)
    }

    /// `addr` (local@domain) with its domain replaced by as_domain when covered; None
    /// otherwise (also None for "" the null sender, for an address without `@` or with an
    /// empty local part, and for an address already @as_domain).
    pub fn address(&self, addr: &str) -> Option<String> {
        let (local, domain) = addr.rsplit_once('@')?;
        if local.is_empty() || !self.rewrites(domain) {
            return None;
        }
        Some(format!("{local}@{}", self.as_domain))
    }

    /// The envelope sender after masquerading: Some(rewritten) only when `envelope` is on and
    /// the address is covered.
    pub fn envelope_sender(&self, sender: &str) -> Option<String> {
        if self.envelope {
            self.address(sender)
        } else {
            None
        }
    }

    /// `message` (RFC 5322 bytes, CRLF line ends; LF-only is handled too) with the
    /// addresses in its header fields `From:` and `Sender:` (name case-insensitive, folded
    /// continuation lines included) rewritten; None when nothing changed. Only the header
    /// section (up to the first empty line) is looked at; every other byte stays exactly as
    /// it was.
    pub fn headers(&self, message: &[u8]) -> Option<Vec<u8>> {
        let end = header_end(message);
        let mut out: Option<Vec<u8>> = None;
        // Bytes of `message` before this index are already in `out`.
        let mut copied = 0;
        let mut pos = 0;
        while pos < end {
            let field_end = field_end(message, pos, end);
            if let Some(value) = sender_field_value(&message[pos..field_end]) {
                let value_start = pos + value;
                for (start, stop) in self.domains_to_rewrite(&message[value_start..field_end]) {
                    let out = out.get_or_insert_with(|| Vec::with_capacity(message.len()));
                    out.extend_from_slice(&message[copied..value_start + start]);
                    out.extend_from_slice(self.as_domain.as_bytes());
                    copied = value_start + stop;
                }
            }
            pos = field_end;
        }
        out.map(|mut out| {
            out.extend_from_slice(&message[copied..]);
            out
        })
    }

    /// The byte ranges of `value` (a From:/Sender: field body) that are domains to replace:
    /// the run of `[A-Za-z0-9.-]` after each `@` outside quoted strings and comments, without
    /// trailing dots, when covered and not already as_domain. A run followed by a byte that
    /// could continue a domain name (non-ASCII, `_`) is left alone: the run is not the whole
    /// domain.
    fn domains_to_rewrite(&self, value: &[u8]) -> Vec<(usize, usize)> {
        let mut found = Vec::new();
        let mut quoted = false;
        let mut comment_depth = 0usize;
        let mut i = 0;
        while i < value.len() {
            let b = value[i];
            if quoted {
                match b {
                    b'\\' => i += 1,
                    b'"' => quoted = false,
                    _ => {}
                }
            } else if comment_depth > 0 {
                match b {
                    b'\\' => i += 1,
                    b'(' => comment_depth += 1,
                    b')' => comment_depth -= 1,
                    _ => {}
                }
            } else {
                match b {
                    b'"' => quoted = true,
                    b'(' => comment_depth = 1,
                    b'@' => {
                        let start = i + 1;
                        let mut stop = start;
                        while stop < value.len() && is_domain_byte(value[stop]) {
                            stop += 1;
                        }
                        let whole =
                            stop == value.len() || (value[stop] < 0x80 && value[stop] != b'_');
                        let mut domain_end = stop;
                        while domain_end > start && value[domain_end - 1] == b'.' {
                            domain_end -= 1;
                        }
                        if whole && domain_end > start {
                            // The run is ASCII, so this never fails.
                            if let Ok(domain) = std::str::from_utf8(&value[start..domain_end]) {
                                if self.rewrites(domain) {
                                    found.push((start, domain_end));
                                }
                            }
                        }
                        i = stop;
                        continue;
                    }
                    _ => {}
                }
            }
            i += 1;
        }
        found
    }
}

/// The index where the header section ends: the start of the first empty line, or the end
/// of the message when it has none.
fn header_end(message: &[u8]) -> usize {
    let mut pos = 0;
    while pos < message.len() {
        let rest = &message[pos..];
        if rest.starts_with(b"\r\n") || rest.starts_with(b"\n") {
            return pos;
        }
        match rest.iter().position(|&b| b == b'\n') {
            Some(i) => pos += i + 1,
            None => return message.len(),
        }
    }
    message.len()
}

/// The end of the header field that starts at `start`: the start of the next line that is
/// not a continuation (does not begin with a space or a tab), or `end`.
fn field_end(message: &[u8], start: usize, end: usize) -> usize {
    let mut pos = start;
    loop {
        match message[pos..end].iter().position(|&b| b == b'\n') {
            Some(i) => pos += i + 1,
            None => return end,
        }
        if pos >= end || !matches!(message[pos], b' ' | b'\t') {
            return pos;
        }
    }
}

/// When `field` is a `From:` or `Sender:` field, the offset of its body (after the colon).
fn sender_field_value(field: &[u8]) -> Option<usize> {
    let colon = field.iter().position(|&b| b == b':' || b == b'\n')?;
    if field[colon] != b':' {
        return None;
    }
    let mut name = &field[..colon];
    // obs-optional: white space between the name and the colon.
    while let [rest @ .., b' ' | b'\t'] = name {
        name = rest;
    }
    let is_sender = name.eq_ignore_ascii_case(b"from") || name.eq_ignore_ascii_case(b"sender");
    is_sender.then_some(colon + 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inst() -> Masquerade {
        Masquerade::new("inst.uc.pt", &["inst.uc.pt".to_string()], true)
    }

    fn rewrite(m: &Masquerade, message: &str) -> Option<String> {
        m.headers(message.as_bytes())
            .map(|out| String::from_utf8(out).expect("utf-8"))
    }

    #[test]
    fn covers_domain_and_hosts_under_it() {
        let m = inst();
        assert!(m.covers("inst.uc.pt"));
        assert!(m.covers("x.inst.uc.pt"));
        assert!(m.covers("a.b.INST.uc.pt."));
        assert!(!m.covers("evilinst.uc.pt"));
        assert!(!m.covers("uc.pt"));
        assert!(!m.covers("inst.uc.pt.evil.com"));
        assert!(!m.covers(""));
        assert!(!m.covers("."));
        let several = Masquerade::new(
            "inst.uc.pt",
            &[
                "dei.uc.pt".to_string(),
                "Fis.UC.pt.".to_string(),
                String::new(),
            ],
            false,
        );
        assert!(several.covers("mail.dei.uc.pt"));
        assert!(several.covers("fis.uc.pt"));
        assert!(!several.covers("inst.uc.pt"));
        assert!(!several.covers("x.inst.uc.pt"));
        let nothing = Masquerade::new("inst.uc.pt", &[], true);
        assert!(!nothing.covers("inst.uc.pt"));
    }

    #[test]
    fn address_rules() {
        let m = inst();
        assert_eq!(
            m.address("joao@mail-server1.inst.uc.pt"),
            Some("joao@inst.uc.pt".to_string())
        );
        assert_eq!(
            m.address("Joao@HOST.Inst.UC.PT."),
            Some("Joao@inst.uc.pt".to_string())
        );
        assert_eq!(m.address("joao@inst.uc.pt"), None);
        assert_eq!(m.address("joao@INST.UC.PT"), None);
        assert_eq!(m.address("joao@evilinst.uc.pt"), None);
        assert_eq!(m.address("joao@gmail.com"), None);
        assert_eq!(m.address(""), None);
        assert_eq!(m.address("joao"), None);
        assert_eq!(m.address("@x.inst.uc.pt"), None);
        assert_eq!(
            m.address("\"a@b\"@x.inst.uc.pt"),
            Some("\"a@b\"@inst.uc.pt".to_string())
        );
    }

    #[test]
    fn envelope_sender_rules() {
        let on = inst();
        assert_eq!(
            on.envelope_sender("u@h.inst.uc.pt"),
            Some("u@inst.uc.pt".to_string())
        );
        assert_eq!(on.envelope_sender(""), None);
        assert_eq!(on.envelope_sender("u@inst.uc.pt"), None);
        assert_eq!(on.envelope_sender("u@other.pt"), None);
        let off = Masquerade::new("inst.uc.pt", &["inst.uc.pt".to_string()], false);
        assert_eq!(off.envelope_sender("u@h.inst.uc.pt"), None);
        // Headers are masqueraded even when the envelope is not.
        assert_eq!(
            rewrite(&off, "From: u@h.inst.uc.pt\r\n\r\nbody\r\n"),
            Some("From: u@inst.uc.pt\r\n\r\nbody\r\n".to_string())
        );
    }

    #[test]
    fn angle_addresses_and_comments() {
        let m = inst();
        let msg = "Received: from x by y\r\nFrom: Joao Silva <joao@h.inst.uc.pt>\r\nSubject: hi\r\n\r\nbody\r\n";
        assert_eq!(
            rewrite(&m, msg).unwrap(),
            "Received: from x by y\r\nFrom: Joao Silva <joao@inst.uc.pt>\r\nSubject: hi\r\n\r\nbody\r\n"
        );
        let msg = "From: joao@h.inst.uc.pt (Joao @ h.inst.uc.pt (home))\r\n\r\n";
        assert_eq!(
            rewrite(&m, msg).unwrap(),
            "From: joao@inst.uc.pt (Joao @ h.inst.uc.pt (home))\r\n\r\n"
        );
        let msg = "From: \"a@b.inst.uc.pt\" <u@x.inst.uc.pt>\r\n\r\n";
        assert_eq!(
            rewrite(&m, msg).unwrap(),
            "From: \"a@b.inst.uc.pt\" <u@inst.uc.pt>\r\n\r\n"
        );
        let msg = "From: \"quote \\\" @y.inst.uc.pt\" <u@x.inst.uc.pt>\r\n\r\n";
        assert_eq!(
            rewrite(&m, msg).unwrap(),
            "From: \"quote \\\" @y.inst.uc.pt\" <u@inst.uc.pt>\r\n\r\n"
        );
        let msg = "From: (c \\) @y.inst.uc.pt) u@x.inst.uc.pt\r\n\r\n";
        assert_eq!(
            rewrite(&m, msg).unwrap(),
            "From: (c \\) @y.inst.uc.pt) u@inst.uc.pt\r\n\r\n"
        );
    }

    #[test]
    fn groups_several_addresses_and_sender() {
        let m = inst();
        let msg = "from: Staff: a@x.inst.uc.pt, b@gmail.com, <c@y.inst.uc.pt>;\r\n\
                   SENDER:d@z.inst.uc.pt\r\n\r\n";
        assert_eq!(
            rewrite(&m, msg).unwrap(),
            "from: Staff: a@inst.uc.pt, b@gmail.com, <c@inst.uc.pt>;\r\n\
             SENDER:d@inst.uc.pt\r\n\r\n"
        );
        let msg = "From : u@x.inst.uc.pt\r\n\r\n";
        assert_eq!(rewrite(&m, msg).unwrap(), "From : u@inst.uc.pt\r\n\r\n");
    }

    #[test]
    fn folded_lines() {
        let m = inst();
        let msg = "From: \"Long\r\n name\" <a@x.inst.uc.pt>,\r\n\tb@y.inst.uc.pt (x\r\n @z.inst.uc.pt)\r\nTo: a@x.inst.uc.pt\r\n\r\n";
        assert_eq!(
            rewrite(&m, msg).unwrap(),
            "From: \"Long\r\n name\" <a@inst.uc.pt>,\r\n\tb@inst.uc.pt (x\r\n @z.inst.uc.pt)\r\nTo: a@x.inst.uc.pt\r\n\r\n"
        );
    }

    #[test]
    fn non_ascii_display_names_and_bytes() {
        let m = inst();
        let msg = "From: João Ção <joao@h.inst.uc.pt>\r\n\r\n";
        assert_eq!(
            rewrite(&m, msg).unwrap(),
            "From: João Ção <joao@inst.uc.pt>\r\n\r\n"
        );
        let raw = b"Subject: \xff\xfe bad\r\nFrom: \xe9t\xe9 <u@h.inst.uc.pt>\r\n\r\n\xff body";
        let expected = b"Subject: \xff\xfe bad\r\nFrom: \xe9t\xe9 <u@inst.uc.pt>\r\n\r\n\xff body";
        assert_eq!(m.headers(raw).unwrap(), expected.to_vec());
        // A domain that continues with non-ASCII bytes is a different domain.
        let msg = "From: u@x.inst.uc.ptça\r\n\r\n";
        assert_eq!(rewrite(&m, msg), None);
        let msg = "From: u@ção.inst.uc.pt\r\n\r\n";
        assert_eq!(rewrite(&m, msg), None);
    }

    #[test]
    fn nothing_changed_is_none() {
        let m = inst();
        assert_eq!(rewrite(&m, "From: u@inst.uc.pt\r\n\r\nbody\r\n"), None);
        assert_eq!(rewrite(&m, "From: u@INST.UC.PT.\r\n\r\n"), None);
        assert_eq!(rewrite(&m, "From: u@evilinst.uc.pt\r\n\r\n"), None);
        assert_eq!(rewrite(&m, "From: u@[192.0.2.1]\r\n\r\n"), None);
        assert_eq!(rewrite(&m, "From: <>\r\n\r\n"), None);
        assert_eq!(rewrite(&m, "From: undisclosed\r\n\r\n"), None);
        assert_eq!(rewrite(&m, ""), None);
        assert_eq!(rewrite(&m, "\r\nFrom: u@x.inst.uc.pt\r\n"), None);
    }

    #[test]
    fn other_fields_untouched() {
        let m = inst();
        let msg = "To: a@x.inst.uc.pt\r\nCc: b@x.inst.uc.pt\r\nReply-To: c@x.inst.uc.pt\r\n\
                   Received: from h.inst.uc.pt by m@h.inst.uc.pt\r\n\
                   Resent-From: d@x.inst.uc.pt\r\nX-From: e@x.inst.uc.pt\r\n\
                   From-Addr: f@x.inst.uc.pt\r\nX-Sender: g@x.inst.uc.pt\r\n\r\n";
        assert_eq!(rewrite(&m, msg), None);
        // mbox "From " line: not a header field.
        let msg = "From u@x.inst.uc.pt Mon Jan  1 10:00:00 2024\r\nTo: x@y\r\n\r\n";
        assert_eq!(rewrite(&m, msg), None);
    }

    #[test]
    fn body_untouched() {
        let m = inst();
        let msg = "Subject: fwd\r\nFrom: a@x.inst.uc.pt\r\n\r\nFrom: x@h.inst.uc.pt\r\nSender: y@h.inst.uc.pt\r\n";
        assert_eq!(
            rewrite(&m, msg).unwrap(),
            "Subject: fwd\r\nFrom: a@inst.uc.pt\r\n\r\nFrom: x@h.inst.uc.pt\r\nSender: y@h.inst.uc.pt\r\n"
        );
        let msg = "Subject: fwd\r\n\r\nFrom: x@h.inst.uc.pt\r\n";
        assert_eq!(rewrite(&m, msg), None);
    }

    #[test]
    fn headers_only_and_lf_only() {
        let m = inst();
        assert_eq!(
            rewrite(&m, "Subject: s\r\nFrom: a@x.inst.uc.pt\r\n").unwrap(),
            "Subject: s\r\nFrom: a@inst.uc.pt\r\n"
        );
        assert_eq!(
            rewrite(&m, "From: a@x.inst.uc.pt").unwrap(),
            "From: a@inst.uc.pt"
        );
        let msg = "From: A <a@x.inst.uc.pt>,\n b@y.inst.uc.pt\nTo: c@x.inst.uc.pt\n\nFrom: d@x.inst.uc.pt\n";
        assert_eq!(
            rewrite(&m, msg).unwrap(),
            "From: A <a@inst.uc.pt>,\n b@inst.uc.pt\nTo: c@x.inst.uc.pt\n\nFrom: d@x.inst.uc.pt\n"
        );
    }

    #[test]
    fn trailing_dot_and_case_of_domain() {
        let m = inst();
        assert_eq!(
            rewrite(&m, "From: a@X.Inst.UC.pt.\r\n\r\n").unwrap(),
            "From: a@inst.uc.pt.\r\n\r\n"
        );
        assert_eq!(
            rewrite(&m, "From: <a@x.inst.uc.pt>.\r\n\r\n").unwrap(),
            "From: <a@inst.uc.pt>.\r\n\r\n"
        );
    }

    #[test]
    fn masquerade_as_another_domain() {
        let m = Masquerade::new(
            "uc.pt",
            &["inst.uc.pt".to_string(), "dei.uc.pt".to_string()],
            true,
        );
        assert_eq!(
            rewrite(&m, "From: a@inst.uc.pt, b@h.dei.uc.pt, c@uc.pt\r\n\r\n").unwrap(),
            "From: a@uc.pt, b@uc.pt, c@uc.pt\r\n\r\n"
        );
        assert_eq!(m.address("a@inst.uc.pt"), Some("a@uc.pt".to_string()));
    }
}
