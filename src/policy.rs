//! Who may send what to whom: the recipient decision of RCPT TO.
//!
//! mxspool is never an open relay. A recipient is accepted only for a `[[partner]]` domain
//! (exact match, case-insensitive, trailing dot tolerated: `user@evilexample.com` and
//! `user@example.com.evil.net` are not `example.com`). Sender-specified routing through a
//! partner (`user%x@P`, `x!user@P`, `"user@x"@P`, `user@x@P`, source routes) is refused, and
//! a partner with a recipients list refuses unknown users at RCPT time, never with a later
//! bounce. Pure code: the lists are loaded with the configuration.

use std::collections::{HashMap, HashSet};

use crate::config::Config;
use crate::envelope::domain_of;

/// Why a recipient was refused; the SMTP layer turns it into a reply.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// Not a domain of ours: `550 5.7.1` relaying denied.
    Relay,
    /// `%`, `!` or `@` in the local part of a partner address: `550 5.7.1`.
    Routing,
    /// Not in the partner's recipients list: `550 5.1.1`.
    UnknownUser,
}

#[derive(Debug, Default)]
pub struct Policy {
    /// Partner domain → its valid local parts (lower case), if it has a list.
    partners: HashMap<String, Option<HashSet<String>>>,
    /// Partners whose queue may be flushed with ETRN.
    etrn_domains: HashSet<String>,
    /// Clients allowed to send ETRN, besides loopback.
    etrn_clients: Vec<ipnet::IpNet>,
}

/// Why an ETRN is refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EtrnRefusal {
    /// The client may not use ETRN at all: `554 5.7.1`.
    Client,
    /// The node is not a partner with `etrn = true`: `459 4.7.1`.
    Node,
}

impl Policy {
    pub fn new(config: &Config) -> Policy {
        Policy {
            partners: config
                .partner
                .iter()
                .map(|p| (p.domain.clone(), p.users.clone()))
                .collect(),
            etrn_domains: config
                .partner
                .iter()
                .filter(|p| p.etrn)
                .map(|p| p.domain.clone())
                .collect(),
            etrn_clients: config.smtp.etrn_clients.clone(),
        }
    }

    /// Whether `client` may flush the queue of `domain` (a partner with `etrn = true`)
    /// with ETRN. Loopback and `[smtp] etrn_clients` may.
    pub fn check_etrn(&self, client: std::net::IpAddr, domain: &str) -> Result<(), EtrnRefusal> {
        if !client.is_loopback() && !self.etrn_clients.iter().any(|n| n.contains(&client)) {
            return Err(EtrnRefusal::Client);
        }
        if !self.etrn_domains.contains(domain) {
            return Err(EtrnRefusal::Node);
        }
        Ok(())
    }

    /// Whether mail to `address` (as parsed from RCPT TO, quotes removed) is accepted.
    pub fn check_recipient(&self, address: &str) -> Result<(), Refusal> {
        let Some((local, _)) = address.rsplit_once('@') else {
            return Err(Refusal::Relay);
        };
        let domain = domain_of(address);
        let Some(users) = self.partners.get(&domain) else {
            return Err(Refusal::Relay);
        };
        if local.is_empty() || local.contains(['@', '%', '!']) {
            return Err(Refusal::Routing);
        }
        match users {
            Some(users) if !users.contains(&local.to_ascii_lowercase()) => {
                Err(Refusal::UnknownUser)
            }
            _ => Ok(()),
        }
    }

    pub fn is_partner(&self, domain: &str) -> bool {
        self.partners.contains_key(domain)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> Policy {
        let mut c = Config::parse(
            "hostname = \"mx2.test\"\nspool = \"/x\"\n[[partner]]\ndomain = \"example.com\"\n[[partner]]\ndomain = \"example.org\"\n",
        )
        .unwrap();
        c.partner[1].users = Some(["alice".to_string()].into_iter().collect());
        Policy::new(&c)
    }

    #[test]
    fn partners_only_and_no_suffix_tricks() {
        let p = policy();
        assert_eq!(p.check_recipient("u@example.com"), Ok(()));
        assert_eq!(p.check_recipient("u@EXAMPLE.Com."), Ok(()));
        for a in [
            "u@evilexample.com",
            "u@example.com.evil.net",
            "u@sub.example.com",
            "u@example.net",
            "postmaster",
            "u@",
        ] {
            assert_eq!(p.check_recipient(a), Err(Refusal::Relay), "{a}");
        }
    }

    #[test]
    fn sender_specified_routing_is_refused() {
        let p = policy();
        // Quoted forms reach the policy unquoted (smtp-proto removes the quotes).
        for a in [
            "user%x@example.com",
            "x!user@example.com",
            "user@x@example.com",
        ] {
            assert_eq!(p.check_recipient(a), Err(Refusal::Routing), "{a}");
        }
    }

    #[test]
    fn etrn_needs_an_allowed_client_and_an_etrn_partner() {
        let c = Config::parse(
            "hostname = \"mx2.test\"\nspool = \"/x\"\n[smtp]\netrn_clients = [\"192.0.2.0/24\"]\n\
             [[partner]]\ndomain = \"example.com\"\netrn = true\n[[partner]]\ndomain = \"example.org\"\n",
        )
        .unwrap();
        let p = Policy::new(&c);
        let lo = "127.0.0.1".parse().unwrap();
        let listed = "192.0.2.9".parse().unwrap();
        let other = "198.51.100.1".parse().unwrap();
        assert_eq!(p.check_etrn(lo, "example.com"), Ok(()));
        assert_eq!(p.check_etrn(listed, "example.com"), Ok(()));
        assert_eq!(p.check_etrn(other, "example.com"), Err(EtrnRefusal::Client));
        assert_eq!(p.check_etrn(lo, "example.org"), Err(EtrnRefusal::Node));
        assert_eq!(p.check_etrn(lo, "example.net"), Err(EtrnRefusal::Node));
    }

    #[test]
    fn recipient_lists() {
        let p = policy();
        assert_eq!(p.check_recipient("Alice@example.org"), Ok(()));
        assert_eq!(
            p.check_recipient("mallory@example.org"),
            Err(Refusal::UnknownUser)
        );
    }
}
