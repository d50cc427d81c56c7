//! The reverse and forward paths of MAIL and RCPT where smtp-proto's address parser stops
//! short: address literals (`user@[192.0.2.1]`, `user@[IPv6:2001:db8::1]`, RFC 5321 4.1.3)
//! and source routes (`<@a,@b:user@example.com>`, stripped as RFC 5321 Appendix C allows).
//! Pure: a command line in, the line smtp-proto should parse and the mailbox out.

use std::net::{Ipv4Addr, Ipv6Addr};

/// Why a path is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PathError {
    /// The path is malformed (`501 5.1.7` for MAIL, `501 5.1.3` for RCPT).
    Syntax,
}

/// A path that needs this module: the mailbox (source route stripped), and the command
/// line with the path replaced by a stand-in that smtp-proto parses, so its parameters
/// (SIZE, NOTIFY, ORCPT, ...) are still read by smtp-proto.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rewritten {
    pub mailbox: String,
    pub line: Vec<u8>,
}

/// The stand-in mailbox put in place of the path for smtp-proto.
const STAND_IN: &[u8] = b"<stand-in@path.invalid>";

/// `line` is a whole MAIL or RCPT command line. `Ok(None)`: nothing for this module (no
/// path, or one without an address literal or source route: smtp-proto decides).
pub fn rewrite(line: &[u8]) -> Result<Option<Rewritten>, PathError> {
    let Some(open) = line.iter().position(|&b| b == b'<') else {
        return Ok(None);
    };
    let Some(close) = closing(line, open) else {
        return Ok(None);
    };
    let inner = &line[open + 1..close];
    let routed = inner.first() == Some(&b'@');
    let literal = domain_part(inner).is_some_and(|d| d.first() == Some(&b'['));
    if !routed && !literal {
        return Ok(None);
    }
    let mailbox = strip_route(inner)?;
    check_mailbox(mailbox)?;
    let mailbox = std::str::from_utf8(mailbox).map_err(|_| PathError::Syntax)?;
    let mut rewritten = Vec::with_capacity(line.len() + STAND_IN.len());
    rewritten.extend_from_slice(&line[..open]);
    rewritten.extend_from_slice(STAND_IN);
    rewritten.extend_from_slice(&line[close + 1..]);
    Ok(Some(Rewritten {
        mailbox: mailbox.to_string(),
        line: rewritten,
    }))
}

/// The index of the `>` that closes the path opened at `open` (quoted strings skipped).
fn closing(line: &[u8], open: usize) -> Option<usize> {
    let mut quoted = false;
    let mut i = open + 1;
    while i < line.len() {
        match line[i] {
            b'\\' if quoted => i += 1,
            b'"' => quoted = !quoted,
            b'>' if !quoted => return Some(i),
            _ => {}
        }
        i += 1;
    }
    None
}

/// The domain part of a mailbox (after the last `@` outside quotes).
fn domain_part(mailbox: &[u8]) -> Option<&[u8]> {
    let mut quoted = false;
    let mut at = None;
    let mut i = 0;
    while i < mailbox.len() {
        match mailbox[i] {
            b'\\' if quoted => i += 1,
            b'"' => quoted = !quoted,
            b'@' if !quoted => at = Some(i),
            _ => {}
        }
        i += 1;
    }
    at.map(|a| &mailbox[a + 1..])
}

/// `@a,@b:mailbox` → `mailbox` (each `@domain` of the route checked); anything else as it is.
fn strip_route(inner: &[u8]) -> Result<&[u8], PathError> {
    if inner.first() != Some(&b'@') {
        return Ok(inner);
    }
    let colon = inner
        .iter()
        .position(|&b| b == b':')
        .ok_or(PathError::Syntax)?;
    for at_domain in inner[..colon].split(|&b| b == b',') {
        let domain = at_domain.strip_prefix(b"@").ok_or(PathError::Syntax)?;
        if !is_domain(domain) && !is_literal(domain) {
            return Err(PathError::Syntax);
        }
    }
    Ok(&inner[colon + 1..])
}

/// `Local-part "@" ( Domain / address-literal )`.
fn check_mailbox(mailbox: &[u8]) -> Result<(), PathError> {
    let domain = domain_part(mailbox).ok_or(PathError::Syntax)?;
    let local = &mailbox[..mailbox.len() - domain.len() - 1];
    if !is_local_part(local) || !(is_domain(domain) || is_literal(domain)) {
        return Err(PathError::Syntax);
    }
    Ok(())
}

/// Dot-string or Quoted-string (RFC 5321 4.1.2; UTF-8 allowed as in RFC 6531).
fn is_local_part(local: &[u8]) -> bool {
    if local.is_empty() || local.len() > 64 {
        return false;
    }
    if local[0] == b'"' {
        let Some(body) = local[1..].strip_suffix(b"\"") else {
            return false;
        };
        let mut i = 0;
        while i < body.len() {
            match body[i] {
                b'\\' => {
                    if !body.get(i + 1).is_some_and(|&c| (32..=126).contains(&c)) {
                        return false;
                    }
                    i += 1;
                }
                b'"' => return false,
                c if c < 32 || c == 127 => return false,
                _ => {}
            }
            i += 1;
        }
        return true;
    }
    local
        .split(|&b| b == b'.')
        .all(|atom| !atom.is_empty() && atom.iter().all(|&c| is_atext(c)))
}

fn is_atext(c: u8) -> bool {
    c.is_ascii_alphanumeric() || b"!#$%&'*+-/=?^_`{|}~".contains(&c) || c >= 0x80
}

/// `sub-domain *("." sub-domain)`: letters, digits and hyphens (UTF-8 labels allowed).
fn is_domain(d: &[u8]) -> bool {
    !d.is_empty()
        && d.len() <= 255
        && d.split(|&b| b == b'.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label.first() != Some(&b'-')
                && label.last() != Some(&b'-')
                && label
                    .iter()
                    .all(|&c| c.is_ascii_alphanumeric() || c == b'-' || c >= 0x80)
        })
}

/// `[IPv4]` or `[IPv6:...]`. General address literals (`[tag:...]`) have no standardised
/// tag besides IPv6, so they are refused.
fn is_literal(d: &[u8]) -> bool {
    literal_ip(d).is_some()
}

/// The address of an address literal (`[192.0.2.1]`, `[IPv6:2001:db8::1]`).
pub fn literal_ip(d: &[u8]) -> Option<std::net::IpAddr> {
    let inner = d.strip_prefix(b"[")?.strip_suffix(b"]")?;
    let text = std::str::from_utf8(inner).ok()?;
    if let Some(v6) = text
        .strip_prefix("IPv6:")
        .or_else(|| text.strip_prefix("ipv6:"))
    {
        return v6.parse::<Ipv6Addr>().ok().map(Into::into);
    }
    text.parse::<Ipv4Addr>().ok().map(Into::into)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mailbox(line: &str) -> Result<Option<String>, PathError> {
        rewrite(line.as_bytes()).map(|r| r.map(|r| r.mailbox))
    }

    #[test]
    fn ordinary_paths_are_left_to_smtp_proto() {
        assert_eq!(mailbox("MAIL FROM:<a@b.example>\r\n"), Ok(None));
        assert_eq!(mailbox("MAIL FROM:<>\r\n"), Ok(None));
        assert_eq!(mailbox("RCPT TO:<postmaster>\r\n"), Ok(None));
        assert_eq!(mailbox("RCPT TO:<\"a b\"@x.example>\r\n"), Ok(None));
    }

    #[test]
    fn address_literals() {
        assert_eq!(
            mailbox("MAIL FROM:<antispam@[127.0.0.1]>\r\n"),
            Ok(Some("antispam@[127.0.0.1]".into()))
        );
        assert_eq!(
            mailbox("MAIL FROM:<u@[IPv6:2001:db8::1]> SIZE=10\r\n"),
            Ok(Some("u@[IPv6:2001:db8::1]".into()))
        );
        assert_eq!(
            mailbox("RCPT TO:<\"odd user\"@[192.0.2.7]>\r\n"),
            Ok(Some("\"odd user\"@[192.0.2.7]".into()))
        );
        for bad in [
            "MAIL FROM:<u@[300.1.1.1]>\r\n",
            "MAIL FROM:<u@[IPv6:zz::1]>\r\n",
            "MAIL FROM:<u@[192.0.2.1>\r\n",
            "MAIL FROM:<u@[tag:content]>\r\n",
            "MAIL FROM:<@[192.0.2.1]>\r\n",
            "MAIL FROM:<a..b@[192.0.2.1]>\r\n",
        ] {
            assert_eq!(mailbox(bad), Err(PathError::Syntax), "{bad}");
        }
    }

    #[test]
    fn source_routes_are_stripped() {
        assert_eq!(
            mailbox("RCPT TO:<@[127.0.0.1]:alice@partner.example>\r\n"),
            Ok(Some("alice@partner.example".into()))
        );
        assert_eq!(
            mailbox("RCPT TO:<@a.example,@b.example:bob@partner.example> NOTIFY=NEVER\r\n"),
            Ok(Some("bob@partner.example".into()))
        );
        for bad in [
            "RCPT TO:<@a.example alice@p.example>\r\n",
            "RCPT TO:<@:alice@p.example>\r\n",
            "RCPT TO:<@a.example,b.example:alice@p.example>\r\n",
            "RCPT TO:<@a.example:>\r\n",
            "RCPT TO:<@a.example:alice>\r\n",
            "RCPT TO:<@-a.example:alice@p.example>\r\n",
        ] {
            assert_eq!(mailbox(bad), Err(PathError::Syntax), "{bad}");
        }
    }

    #[test]
    fn parameters_stay_for_smtp_proto() {
        let r = rewrite(
            b"RCPT TO:<@relay.example:a@p.example> NOTIFY=SUCCESS ORCPT=rfc822;a@p.example\r\n",
        )
        .unwrap()
        .unwrap();
        assert_eq!(
            r.line,
            b"RCPT TO:<stand-in@path.invalid> NOTIFY=SUCCESS ORCPT=rfc822;a@p.example\r\n"
        );
    }

    #[test]
    fn literal_addresses() {
        assert_eq!(
            literal_ip(b"[192.0.2.1]"),
            Some("192.0.2.1".parse().unwrap())
        );
        assert_eq!(literal_ip(b"[IPv6:::1]"), Some("::1".parse().unwrap()));
        assert_eq!(literal_ip(b"192.0.2.1"), None);
        assert_eq!(literal_ip(b"[example.com]"), None);
    }
}
