//! sendmail's virtusertable: per-address and per-domain recipient rewriting.
//!
//! The text form of `/etc/mail/virtusertable`: one entry per line, `KEY TARGET`, separated
//! by whitespace; a line whose first non-blank character is `#` is a comment; blank lines
//! are ignored.
//!
//! Keys (case-insensitive; stored lower-cased, the domain without a trailing dot):
//!
//! - `user@domain`: one address;
//! - `user+*@domain`: `user` with any `+detail`;
//! - `@domain`: every other address of the domain.
//!
//! Targets:
//!
//! - `user@otherdomain`: rewrite to that address;
//! - `name` (no `@`): a local mailbox; the caller puts it in a local domain;
//! - `error:nouser [TEXT]`, `error:CODE [TEXT]`, `error:D.S.N:CODE [TEXT]`: refuse the
//!   recipient with that reply (CODE 4xx or 5xx; the status class agrees with it).
//!
//! In the local part of an address target and in a local name, `%1` is the user (the local
//! part before the first `+`), `%2` the detail (after the first `+`, without it) and `%3`
//! the detail with its `+` (empty when the address has none).
//!
//! The lookup order for `user+detail@domain` is `user+detail@domain`, `user+*@domain`,
//! `user@domain`, `@domain`; for `user@domain` it is `user@domain`, `@domain`. One call of
//! [`VirtualTable::lookup`] is one step; whoever wants sendmail's repeated rewriting calls it
//! again on the result (with a bound on the number of steps).

use std::collections::{BTreeSet, HashMap};
use std::path::Path;

/// What a virtusertable entry says about one address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// Rewrite to this address (placeholders already substituted).
    Address(String),
    /// A bare local mailbox name (placeholders substituted); the caller puts it in a local domain.
    Local(String),
    /// Refuse the recipient with this reply.
    Error {
        code: u16,
        status: String,
        text: String,
    },
}

/// A piece of a target template.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Piece {
    Text(String),
    /// `%1`: the user part.
    User,
    /// `%2`: the detail without its `+`.
    Detail,
    /// `%3`: `+detail`, or empty.
    PlusDetail,
}

/// A parsed target, before substitution.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Rule {
    Address {
        local: Vec<Piece>,
        domain: String,
    },
    Local(Vec<Piece>),
    Error {
        code: u16,
        status: String,
        text: String,
    },
}

#[derive(Debug, Clone)]
struct Entry {
    /// The line the entry came from (for duplicate-key errors).
    line: usize,
    rule: Rule,
}

/// A parsed virtusertable.
#[derive(Debug, Default, Clone)]
pub struct VirtualTable {
    /// Normalised key (`user@domain`, `user+*@domain`, `@domain`) to its entry.
    entries: HashMap<String, Entry>,
    /// Every domain that appears in a key.
    domains: BTreeSet<String>,
}

/// The reply of a substitution that leaves an empty mailbox name (`%2` for an address
/// without detail, say).
fn bad_result() -> Target {
    Target::Error {
        code: 550,
        status: "5.1.3".to_string(),
        text: "Bad destination mailbox address syntax".to_string(),
    }
}

impl VirtualTable {
    /// Parses the text form. Errors name the line: `line N: ...`.
    pub fn parse(text: &str) -> Result<VirtualTable, String> {
        let mut table = VirtualTable::default();
        for (index, line) in text.lines().enumerate() {
            let number = index + 1;
            let parsed = parse_line(line).map_err(|e| format!("line {number}: {e}"))?;
            let Some((key, domain, rule)) = parsed else {
                continue;
            };
            if let Some(first) = table.entries.get(&key) {
                return Err(format!(
                    "line {number}: duplicate key {key} (first on line {})",
                    first.line
                ));
            }
            table.domains.insert(domain);
            table.entries.insert(key, Entry { line: number, rule });
        }
        Ok(table)
    }

    /// Reads and parses a file. Errors: `cannot read PATH: ...` or `PATH: line N: ...`.
    pub fn load(path: &Path) -> Result<VirtualTable, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        VirtualTable::parse(&text).map_err(|e| format!("{}: {e}", path.display()))
    }

    /// Whether the table has no entries.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The number of entries.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// The domains that appear in keys (mail for them is accepted: sendmail VIRTUSER_DOMAIN,
    /// Postfix virtual_alias_domains), lower case, in sorted order.
    pub fn domains(&self) -> impl Iterator<Item = &str> {
        self.domains.iter().map(String::as_str)
    }

    /// Whether `domain` (any case, trailing dot allowed) appears in a key.
    pub fn has_domain(&self, domain: &str) -> bool {
        let domain = domain.to_lowercase();
        let domain = domain.strip_suffix('.').unwrap_or(&domain);
        self.domains.contains(domain)
    }

    /// One lookup step for `address` (local@domain as received, any case); None when no key
    /// matches.
    pub fn lookup(&self, address: &str) -> Option<Target> {
        let at = address.rfind('@')?;
        let (local, domain) = (&address[..at], &address[at + 1..]);
        if local.is_empty() {
            return None;
        }
        let domain = domain.to_lowercase();
        let domain = domain.strip_suffix('.').unwrap_or(&domain);
        if domain.is_empty() {
            return None;
        }
        let (user, detail) = match local.split_once('+') {
            Some((user, detail)) => (user, Some(detail)),
            None => (local, None),
        };
        let user_lower = user.to_lowercase();
        let found = if detail.is_some() {
            let full = format!("{}@{domain}", local.to_lowercase());
            self.entries
                .get(&full)
                .or_else(|| self.entries.get(&format!("{user_lower}+*@{domain}")))
                .or_else(|| {
                    if user.is_empty() {
                        None
                    } else {
                        self.entries.get(&format!("{user_lower}@{domain}"))
                    }
                })
        } else {
            self.entries.get(&format!("{user_lower}@{domain}"))
        };
        let entry = found.or_else(|| self.entries.get(&format!("@{domain}")))?;
        Some(match &entry.rule {
            Rule::Address { local, domain } => match substitute(local, user, detail) {
                Some(local) if !local.is_empty() => Target::Address(format!("{local}@{domain}")),
                _ => bad_result(),
            },
            Rule::Local(pieces) => match substitute(pieces, user, detail) {
                Some(name) if valid_local_name(&name) => Target::Local(name),
                _ => bad_result(),
            },
            Rule::Error { code, status, text } => Target::Error {
                code: *code,
                status: status.clone(),
                text: text.clone(),
            },
        })
    }
}

/// The template with `%1`, `%2`, `%3` replaced; None when an inserted value contains a
/// character that would change what the target is (an `@`, a quote, a `/`, white space...).
fn substitute(pieces: &[Piece], user: &str, detail: Option<&str>) -> Option<String> {
    let unsafe_value = |value: &str| value.chars().any(|c| bad_char(c) || c == '@' || c == '/');
    let uses_user = pieces.contains(&Piece::User);
    let uses_detail = pieces
        .iter()
        .any(|p| matches!(p, Piece::Detail | Piece::PlusDetail));
    if (uses_user && unsafe_value(user)) || (uses_detail && detail.is_some_and(unsafe_value)) {
        return None;
    }
    let mut out = String::new();
    for piece in pieces {
        match piece {
            Piece::Text(text) => out.push_str(text),
            Piece::User => out.push_str(user),
            Piece::Detail => out.push_str(detail.unwrap_or("")),
            Piece::PlusDetail => {
                if let Some(detail) = detail {
                    out.push('+');
                    out.push_str(detail);
                }
            }
        }
    }
    Some(out)
}

/// A local mailbox name the caller can safely use as a file name: not empty, no `/`, not
/// starting with `.` (so never `.` or `..`).
fn valid_local_name(name: &str) -> bool {
    !name.is_empty() && !name.starts_with('.') && !name.contains('/')
}

/// One line: None for a blank or comment line, else (key, key's domain, rule).
fn parse_line(line: &str) -> Result<Option<(String, String, Rule)>, String> {
    let line = line.trim();
    if line.is_empty() || line.starts_with('#') {
        return Ok(None);
    }
    let Some(split) = line.find(char::is_whitespace) else {
        return Err(format!("key {line} has no target"));
    };
    let (key, target) = (&line[..split], line[split..].trim_start());
    let (key, domain) = parse_key(key)?;
    let rule = parse_target(target)?;
    Ok(Some((key, domain, rule)))
}

/// Characters never valid in a key or target outside `error:` text.
fn bad_char(c: char) -> bool {
    c.is_control() || c.is_whitespace() || "<>()[],;:\\\"".contains(c)
}

/// A domain name: labels of letters, digits and `-`, one trailing dot allowed; lower-cased.
fn parse_domain(domain: &str) -> Option<String> {
    let domain = domain.to_lowercase();
    let domain = domain.strip_suffix('.').unwrap_or(&domain);
    let valid = !domain.is_empty()
        && domain.split('.').all(|label| {
            !label.is_empty() && label.chars().all(|c| c.is_alphanumeric() || c == '-')
        });
    valid.then(|| domain.to_string())
}

/// A key: (normalised key, its domain).
fn parse_key(key: &str) -> Result<(String, String), String> {
    let lower = key.to_lowercase();
    let Some((local, domain)) = lower.rsplit_once('@') else {
        return Err(format!(
            "key {key} has no '@' (expected user@domain, user+*@domain or @domain)"
        ));
    };
    if local.contains('@') {
        return Err(format!("key {key} has more than one '@'"));
    }
    let Some(domain) = parse_domain(domain) else {
        return Err(format!("key {key} has no valid domain"));
    };
    if let Some(c) = local.chars().find(|&c| bad_char(c)) {
        return Err(format!("key {key} contains {c:?}"));
    }
    if let Some(user) = local.strip_suffix("+*") {
        if user.is_empty() {
            return Err(format!("key {key} has no user before '+*'"));
        }
        if user.contains('+') {
            return Err(format!(
                "key {key} can never match (the detail starts at the first '+')"
            ));
        }
        if user.contains('*') {
            return Err(format!("key {key}: '*' is only allowed as user+*@domain"));
        }
    } else if local.contains('*') {
        return Err(format!("key {key}: '*' is only allowed as user+*@domain"));
    }
    Ok((format!("{local}@{domain}"), domain))
}

fn parse_target(target: &str) -> Result<Rule, String> {
    // `get`: byte 6 may fall inside a multi-byte character of a target that is no error.
    if let Some(rest) = target
        .get(..6)
        .filter(|p| p.eq_ignore_ascii_case("error:"))
        .and_then(|_| target.get(6..))
    {
        return parse_error(target, rest);
    }
    if target.contains(',') || target.contains(char::is_whitespace) {
        return Err(format!(
            "target {target} is not one address or local name (lists are not supported)"
        ));
    }
    match target.rsplit_once('@') {
        Some((local, domain)) => {
            if local.contains('@') {
                return Err(format!("target {target} has more than one '@'"));
            }
            if local.is_empty() {
                return Err(format!("target {target} has no local part"));
            }
            if domain.contains('%') {
                return Err(format!(
                    "target {target}: placeholders are allowed only in the local part"
                ));
            }
            let local = parse_pieces(target, local)?;
            let Some(domain) = parse_domain(domain) else {
                return Err(format!("target {target} has no valid domain"));
            };
            Ok(Rule::Address { local, domain })
        }
        None => {
            if target.starts_with('.') || target.contains('/') {
                return Err(format!(
                    "target {target} is not a valid local mailbox name (no '/', no leading '.')"
                ));
            }
            Ok(Rule::Local(parse_pieces(target, target)?))
        }
    }
}

/// The local part of a target with its placeholders.
fn parse_pieces(target: &str, local: &str) -> Result<Vec<Piece>, String> {
    let mut pieces = Vec::new();
    let mut text = String::new();
    let mut chars = local.chars();
    while let Some(c) = chars.next() {
        if c == '%' {
            let piece = match chars.next() {
                Some('1') => Piece::User,
                Some('2') => Piece::Detail,
                Some('3') => Piece::PlusDetail,
                Some(other) => {
                    return Err(format!(
                        "target {target} has unknown placeholder %{other} (only %1, %2, %3)"
                    ))
                }
                None => return Err(format!("target {target} ends with a lone '%'")),
            };
            if !text.is_empty() {
                pieces.push(Piece::Text(std::mem::take(&mut text)));
            }
            pieces.push(piece);
        } else if bad_char(c) {
            return Err(format!("target {target} contains {c:?}"));
        } else {
            text.push(c);
        }
    }
    if !text.is_empty() {
        pieces.push(Piece::Text(text));
    }
    Ok(pieces)
}

/// `error:nouser [TEXT]`, `error:CODE [TEXT]`, `error:D.S.N:CODE [TEXT]`; `rest` is what
/// follows `error:`.
fn parse_error(target: &str, rest: &str) -> Result<Rule, String> {
    let (spec, text) = match rest.find(char::is_whitespace) {
        Some(i) => (&rest[..i], rest[i..].trim()),
        None => (rest, ""),
    };
    if let Some(c) = text.chars().find(|&c| c.is_control() || !c.is_ascii()) {
        return Err(format!(
            "target {target}: the error text must be printable ASCII (found {c:?})"
        ));
    }
    let bad_form = || {
        format!("bad error target {target} (expected error:nouser, error:CODE TEXT or error:D.S.N:CODE TEXT)")
    };
    let (code, status, default_text) = if spec.eq_ignore_ascii_case("nouser") {
        (550, "5.1.1".to_string(), "User unknown")
    } else if let Some((status, code)) = spec.split_once(':') {
        let code = parse_code(code).ok_or_else(bad_form)?;
        if !valid_status(status, code) {
            return Err(format!(
                "target {target}: status {status} is not a valid {}.X.X enhanced status code for {code}",
                code / 100
            ));
        }
        (code, status.to_string(), "Recipient address rejected")
    } else {
        let code = parse_code(spec).ok_or_else(bad_form)?;
        (
            code,
            format!("{}.0.0", code / 100),
            "Recipient address rejected",
        )
    };
    let text = if text.is_empty() { default_text } else { text };
    Ok(Rule::Error {
        code,
        status,
        text: text.to_string(),
    })
}

/// A reply code: three digits, 4xx or 5xx.
fn parse_code(code: &str) -> Option<u16> {
    let valid = code.len() == 3
        && code.bytes().all(|b| b.is_ascii_digit())
        && matches!(code.as_bytes()[0], b'4' | b'5');
    if valid {
        code.parse().ok()
    } else {
        None
    }
}

/// An RFC 3463 status `class.subject.detail` whose class agrees with `code`.
fn valid_status(status: &str, code: u16) -> bool {
    let parts: Vec<&str> = status.split('.').collect();
    let number = |s: &str, max: usize| {
        !s.is_empty() && s.len() <= max && s.bytes().all(|b| b.is_ascii_digit())
    };
    parts.len() == 3
        && parts[0] == (code / 100).to_string()
        && number(parts[1], 3)
        && number(parts[2], 3)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(text: &str) -> VirtualTable {
        VirtualTable::parse(text).expect("table parses")
    }

    fn address(s: &str) -> Option<Target> {
        Some(Target::Address(s.to_string()))
    }

    fn local(s: &str) -> Option<Target> {
        Some(Target::Local(s.to_string()))
    }

    fn error(code: u16, status: &str, text: &str) -> Option<Target> {
        Some(Target::Error {
            code,
            status: status.to_string(),
            text: text.to_string(),
        })
    }

    fn parse_error_of(text: &str) -> String {
        VirtualTable::parse(text).expect_err("table is refused")
    }

    #[test]
    fn seed_catch_all_line() {
        let t = table("@depart.uc.pt %1@mail-server1.inst.uc.pt\n");
        assert_eq!(t.len(), 1);
        assert_eq!(
            t.lookup("joao@depart.uc.pt"),
            address("joao@mail-server1.inst.uc.pt")
        );
        assert_eq!(
            t.lookup("Joao@DEPART.UC.PT."),
            address("Joao@mail-server1.inst.uc.pt")
        );
        // %1 is the user without its detail.
        assert_eq!(
            t.lookup("joao+lists@depart.uc.pt"),
            address("joao@mail-server1.inst.uc.pt")
        );
        assert_eq!(t.lookup("joao@other.uc.pt"), None);
        assert_eq!(t.lookup("joao@sub.depart.uc.pt"), None);
        assert!(t.has_domain("depart.uc.pt"));
        assert!(t.has_domain("Depart.UC.pt."));
        assert!(!t.has_domain("uc.pt"));
    }

    #[test]
    fn each_key_form() {
        let t = table(
            "info@example.com  bob\n\
             sales+*@example.com  sales-team@example.net\n\
             @example.com  catchall\n",
        );
        assert_eq!(t.lookup("info@example.com"), local("bob"));
        assert_eq!(
            t.lookup("sales+q3@example.com"),
            address("sales-team@example.net")
        );
        assert_eq!(t.lookup("nobody@example.com"), local("catchall"));
        // `user+*` matches only addresses with a detail.
        assert_eq!(t.lookup("sales@example.com"), local("catchall"));
    }

    #[test]
    fn lookup_order_with_detail() {
        let all = "a+x@d.pt exact\na+*@d.pt star\na@d.pt plain\n@d.pt domain\n";
        let t = table(all);
        assert_eq!(t.lookup("a+x@d.pt"), local("exact"));
        assert_eq!(t.lookup("a+y@d.pt"), local("star"));
        assert_eq!(t.lookup("a@d.pt"), local("plain"));
        assert_eq!(t.lookup("b+x@d.pt"), local("domain"));

        let t = table("a+*@d.pt star\na@d.pt plain\n@d.pt domain\n");
        assert_eq!(t.lookup("a+x@d.pt"), local("star"));
        let t = table("a@d.pt plain\n@d.pt domain\n");
        assert_eq!(t.lookup("a+x@d.pt"), local("plain"));
        let t = table("@d.pt domain\n");
        assert_eq!(t.lookup("a+x@d.pt"), local("domain"));
        let t = table("b@d.pt other\n");
        assert_eq!(t.lookup("a+x@d.pt"), None);
        assert_eq!(t.lookup("a@d.pt"), None);
    }

    #[test]
    fn detail_splits_at_first_plus() {
        let t = table("a+*@d.pt %1-%2@x.pt\n");
        assert_eq!(t.lookup("a+b+c@d.pt"), address("a-b+c@x.pt"));
        // An empty detail is still a detail.
        assert_eq!(t.lookup("a+@d.pt"), address("a-@x.pt"));
        let t = table("a+b+c@d.pt exact\n");
        assert_eq!(t.lookup("a+b+c@d.pt"), local("exact"));
        assert_eq!(t.lookup("a+b@d.pt"), None);
    }

    #[test]
    fn placeholders() {
        let t = table("@d.pt %1.%2.%3x@x.pt\n");
        assert_eq!(t.lookup("u+det@d.pt"), address("u.det.+detx@x.pt"));
        assert_eq!(t.lookup("u@d.pt"), address("u..x@x.pt"));

        let t = table("@d.pt %1%3@x.pt\n");
        assert_eq!(t.lookup("u+det@d.pt"), address("u+det@x.pt"));
        assert_eq!(t.lookup("u@d.pt"), address("u@x.pt"));

        let t = table("@d.pt box-%1\n");
        assert_eq!(t.lookup("Ana@d.pt"), local("box-Ana"));

        let t = table("u+*@d.pt %2\n");
        assert_eq!(t.lookup("u+folder@d.pt"), local("folder"));
        // A substitution that leaves an empty name is refused, not delivered.
        assert_eq!(
            t.lookup("u+@d.pt"),
            error(550, "5.1.3", "Bad destination mailbox address syntax")
        );
        let t = table("@d.pt %2@x.pt\n");
        assert_eq!(
            t.lookup("u@d.pt"),
            error(550, "5.1.3", "Bad destination mailbox address syntax")
        );
    }

    #[test]
    fn unsafe_substitutions_are_refused() {
        let bad = error(550, "5.1.3", "Bad destination mailbox address syntax");
        let t = table("@d.pt %1\n");
        assert_eq!(t.lookup("ana@d.pt"), local("ana"));
        assert_eq!(t.lookup("..@d.pt"), bad);
        assert_eq!(t.lookup(".profile@d.pt"), bad);
        assert_eq!(t.lookup("\"a/b\"@d.pt"), bad);
        assert_eq!(t.lookup("\"a@evil.com\"@d.pt"), bad);
        let t = table("@d.pt %1%3@x.pt\n");
        assert_eq!(t.lookup("\"a+b@evil.com\"@d.pt"), bad);
        assert_eq!(t.lookup("a+b/c@d.pt"), bad);
        // A value not used by the target does not matter.
        let t = table("@d.pt %1@x.pt\n");
        assert_eq!(t.lookup("a+b/c@d.pt"), address("a@x.pt"));
        let t = table("@d.pt fixed\n");
        assert_eq!(t.lookup("\"a@b\"@d.pt"), local("fixed"));
    }

    #[test]
    fn case_insensitive_keys() {
        let t = table("John.Smith@Example.COM.  js@Mail.Example.NET.\nUser+*@EXAMPLE.com x\n");
        assert_eq!(
            t.lookup("john.smith@example.com"),
            address("js@mail.example.net")
        );
        assert_eq!(
            t.lookup("JOHN.SMITH@EXAMPLE.COM"),
            address("js@mail.example.net")
        );
        assert_eq!(t.lookup("user+Z@example.com"), local("x"));
        assert_eq!(t.lookup("USER+Z@example.com."), local("x"));
        assert_eq!(t.domains().collect::<Vec<_>>(), vec!["example.com"]);
    }

    #[test]
    fn domains_listed_once_sorted() {
        let t = table("a@b.pt x\n@a.pt y\nc+*@b.pt z\n");
        assert_eq!(t.domains().collect::<Vec<_>>(), vec!["a.pt", "b.pt"]);
        assert_eq!(t.len(), 3);
        assert!(!t.is_empty());
        let empty = table("# nothing\n\n   \n");
        assert!(empty.is_empty());
        assert_eq!(empty.len(), 0);
        assert_eq!(empty.domains().count(), 0);
        assert_eq!(empty.lookup("a@b.pt"), None);
    }

    #[test]
    fn comments_blank_lines_crlf_tabs() {
        let t = table("# header\r\n\r\n  # indented comment\r\n\ta@b.pt\t\tc@d.pt  \r\n");
        assert_eq!(t.len(), 1);
        assert_eq!(t.lookup("a@b.pt"), address("c@d.pt"));
    }

    #[test]
    fn lookup_of_odd_addresses() {
        let t = table("@b.pt x\n");
        assert_eq!(t.lookup("postmaster"), None);
        assert_eq!(t.lookup(""), None);
        assert_eq!(t.lookup("@b.pt"), None);
        assert_eq!(t.lookup("a@"), None);
        assert_eq!(t.lookup("\"a@c\"@b.pt"), local("x"));
    }

    #[test]
    fn error_targets() {
        let t = table(
            "a@d.pt error:nouser\n\
             b@d.pt error:nouser No such person at this address\n\
             c@d.pt error:550 No such user here\n\
             e@d.pt error:5.7.0:550 Address invalid\n\
             f@d.pt error:4.2.1:450 Mailbox disabled for now\n\
             g@d.pt ERROR:451\n\
             h@d.pt error:553   spaced   text  \n",
        );
        assert_eq!(t.lookup("a@d.pt"), error(550, "5.1.1", "User unknown"));
        assert_eq!(
            t.lookup("b@d.pt"),
            error(550, "5.1.1", "No such person at this address")
        );
        assert_eq!(t.lookup("c@d.pt"), error(550, "5.0.0", "No such user here"));
        assert_eq!(t.lookup("e@d.pt"), error(550, "5.7.0", "Address invalid"));
        assert_eq!(
            t.lookup("f@d.pt"),
            error(450, "4.2.1", "Mailbox disabled for now")
        );
        assert_eq!(
            t.lookup("g@d.pt"),
            error(451, "4.0.0", "Recipient address rejected")
        );
        assert_eq!(t.lookup("h@d.pt"), error(553, "5.0.0", "spaced   text"));
        // Error entries win over the catch-all, and work as catch-all too.
        let t = table("@d.pt error:nouser\nok@d.pt ok\n");
        assert_eq!(t.lookup("ok@d.pt"), local("ok"));
        assert_eq!(t.lookup("x+y@d.pt"), error(550, "5.1.1", "User unknown"));
    }

    #[test]
    fn malformed_lines_name_their_line() {
        let cases: &[(&str, usize, &str)] = &[
            ("a@b.pt\n", 1, "no target"),
            ("# c\n\nab.pt x\n", 3, "no '@'"),
            ("a@b.pt x\nb@c.pt x, y\n", 2, "lists"),
            ("a@b.pt x y\n", 1, "lists"),
            ("a@b.pt x,y\n", 1, "lists"),
            ("\n\n\n\na@b.pt %9@c.pt\n", 5, "%9"),
            ("a@b.pt %1%\n", 1, "lone '%'"),
            ("a@b.pt u%h@c.pt\n", 1, "%h"),
            ("a@b.pt x@%1.pt\n", 1, "only in the local part"),
            ("a@b.pt x@@c.pt\n", 1, "more than one '@'"),
            ("a@b.pt @c.pt\n", 1, "no local part"),
            ("a@b.pt x@\n", 1, "no valid domain"),
            ("a@b.pt x@c..pt\n", 1, "no valid domain"),
            ("a@b.pt <x@c.pt>\n", 1, "contains"),
            ("a@b.pt smtp:x\n", 1, "contains"),
            ("a@b.pt ../x\n", 1, "not a valid local mailbox name"),
            ("a@b.pt .x\n", 1, "not a valid local mailbox name"),
            ("a@ x\n", 1, "no valid domain"),
            ("a@[192.0.2.1] x\n", 1, "no valid domain"),
            ("a@b@c.pt x\n", 1, "more than one '@'"),
            ("*@b.pt x\n", 1, "'*'"),
            ("+*@b.pt x\n", 1, "no user"),
            ("a+b+*@b.pt x\n", 1, "never match"),
            ("a@b.pt error:\n", 1, "bad error target"),
            ("a@b.pt error: 550 text\n", 1, "bad error target"),
            ("a@b.pt error:nobody\n", 1, "bad error target"),
            ("a@b.pt error:250 ok\n", 1, "bad error target"),
            ("a@b.pt error:600 x\n", 1, "bad error target"),
            ("a@b.pt error:55 x\n", 1, "bad error target"),
            ("a@b.pt error:5.1.1\n", 1, "bad error target"),
            ("a@b.pt error:4.1.1:550 x\n", 1, "not a valid 5.X.X"),
            ("a@b.pt error:5.1.1:450 x\n", 1, "not a valid 4.X.X"),
            ("a@b.pt error:5.1:550 x\n", 1, "status 5.1"),
            ("a@b.pt error:5.1.1234:550 x\n", 1, "status"),
            ("a@b.pt error:5.x.1:550 x\n", 1, "status"),
            ("a@b.pt error:550 Endereço inválido\n", 1, "printable ASCII"),
            (
                "a@b.pt x\nA@B.PT. y\n",
                2,
                "duplicate key a@b.pt (first on line 1)",
            ),
        ];
        for (text, line, needle) in cases {
            let err = parse_error_of(text);
            assert!(
                err.starts_with(&format!("line {line}: ")),
                "{text:?}: {err}"
            );
            assert!(err.contains(needle), "{text:?}: {err} lacks {needle:?}");
        }
    }

    #[test]
    fn load_reports_path() {
        let dir = std::env::temp_dir().join(format!("mxspool-vt-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let good = dir.join("good");
        std::fs::write(&good, "@d.pt %1@x.pt\n").unwrap();
        let t = VirtualTable::load(&good).unwrap();
        assert_eq!(t.lookup("u@d.pt"), address("u@x.pt"));

        let bad = dir.join("bad");
        std::fs::write(&bad, "# ok\nbroken\n").unwrap();
        let err = VirtualTable::load(&bad).unwrap_err();
        assert!(
            err.starts_with(&format!("{}: line 2: ", bad.display())),
            "{err}"
        );

        let missing = dir.join("missing");
        let err = VirtualTable::load(&missing).unwrap_err();
        assert!(
            err.starts_with(&format!("cannot read {}: ", missing.display())),
            "{err}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn large_table() {
        let mut text = String::new();
        for i in 0..100_000 {
            text.push_str(&format!("user{i}@dom{}.pt box{i}\n", i % 50));
        }
        let t = table(&text);
        assert_eq!(t.len(), 100_000);
        assert_eq!(t.domains().count(), 50);
        assert_eq!(t.lookup("USER99999@dom49.pt"), local("box99999"));
        assert_eq!(t.lookup("user99999@dom48.pt"), None);
    }

    /// Found by the `virtual_table` fuzz target: a target whose 6th byte is inside a
    /// multi-byte character panicked (`target[..6]`) instead of being parsed.
    #[test]
    fn multibyte_character_at_the_error_prefix_boundary() {
        // The fuzzer's input, and targets with a 2- and a 3-byte character across byte 6.
        for text in [
            "era@b.example err\u{7f}r\u{91}ouser nouser rror:4tl1 aer\n",
            "a@b.example error\u{fc}x\n",
            "a@b.example erro\u{20ac}:nouser\n",
        ] {
            let _ = VirtualTable::parse(text);
        }
        let t = table("a@b.example ERROR:nouser no such user\n");
        assert!(t.lookup("a@b.example").is_some());
    }
}
