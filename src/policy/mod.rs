//! Who may send what to whom: the recipient decision of RCPT TO.
//!
//! mxspool is never an open relay. A recipient is accepted when its domain is ours: a
//! `[[partner]]` domain, a `[[local]]` or `[[route]]` domain, or a domain of the `[virtual]`
//! table (exact match, case-insensitive, trailing dot tolerated: `user@evilexample.com` and
//! `user@example.com.evil.net` are not `example.com`). Clients in `[relay] networks` may send
//! to any domain. Sender-specified routing (`user%x@P`, `x!user@P`, `"user@x"@P`,
//! `user@x@P`, source routes) is refused from every other client.
//!
//! Before the domain's own checks the address goes through the virtual table (sendmail's
//! virtusertable), step by step until no entry matches: an `error:` target refuses the
//! recipient here, at RCPT, and the address that is queued is the rewritten one (the
//! original travels as its ORCPT). A partner's or local domain's user list then refuses
//! unknown users with `550 5.1.1`, never with a later bounce. Pure code: the lists and the
//! table are loaded with the configuration.

pub mod callout;
pub mod dnsbl;
pub mod quota;
pub mod rates;

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;

use crate::config::Config;
use crate::delivery::maildir::mailbox_user;
use crate::envelope::domain_of;
use crate::masquerade::Masquerade;
use crate::virtual_table::{Target, VirtualTable};

/// How many virtual-table rewrites one address may go through (a loop guard).
const MAX_REWRITES: usize = 20;

/// Why a recipient was refused; the SMTP layer turns it into a reply.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// Not a domain of ours: `550 5.7.1` relaying denied.
    Relay,
    /// `%`, `!` or `@` in the local part of one of our addresses: `550 5.7.1`.
    Routing,
    /// Not in the domain's user list, or an unknown user of a virtual domain: `550 5.1.1`.
    UnknownUser,
    /// A local part that cannot name a mailbox: `553 5.1.3`.
    BadMailbox,
    /// The virtual table's `error:` target for this address.
    Virtual {
        code: u16,
        status: String,
        text: String,
    },
    /// The virtual table rewrites this address in a loop: `554 5.4.6`.
    Loop,
    /// The virtual table names a local mailbox but no `[[local]]` domain exists: `451 4.3.0`.
    NoLocalDomain,
}

/// An accepted recipient: the address to queue and, when the virtual table rewrote it,
/// the address the client gave.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Accepted {
    pub address: String,
    pub original: Option<String>,
}

#[derive(Debug, Default)]
pub struct Policy {
    /// Partner domain → its valid local parts (lower case), if it has a list.
    partners: HashMap<String, Option<HashSet<String>>>,
    /// Local domain → its valid mailbox names, if it has a list.
    locals: HashMap<String, Option<HashSet<String>>>,
    /// The first `[[local]]` domain: where bare virtual targets and `<postmaster>` go.
    first_local: Option<String>,
    /// `[[route]]` domains.
    routed: HashSet<String>,
    virtual_table: std::sync::Arc<VirtualTable>,
    /// `[relay] networks`.
    relay_networks: Vec<ipnet::IpNet>,
    masquerade: Option<Masquerade>,
    /// Partners whose queue may be flushed with ETRN.
    etrn_domains: HashSet<String>,
    /// Clients allowed to send ETRN, besides loopback.
    etrn_clients: Vec<ipnet::IpNet>,
    /// Partners with `verify = "callout"`.
    callout_domains: HashSet<String>,
    /// Partners with `max_messages` or `max_bytes`.
    quotas: HashMap<String, quota::Quota>,
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
            locals: config
                .local
                .iter()
                .map(|l| (l.domain.clone(), l.user_set.clone()))
                .collect(),
            first_local: config.local.first().map(|l| l.domain.clone()),
            routed: config.route.iter().map(|r| r.domain.clone()).collect(),
            virtual_table: config
                .virtual_table
                .as_ref()
                .map(|v| v.table.clone())
                .unwrap_or_default(),
            relay_networks: config.relay.networks.clone(),
            masquerade: config
                .masquerade
                .as_ref()
                .map(|m| Masquerade::new(&m.as_domain, &m.domains, m.envelope)),
            etrn_domains: config
                .partner
                .iter()
                .filter(|p| p.etrn)
                .map(|p| p.domain.clone())
                .collect(),
            etrn_clients: config.smtp.etrn_clients.clone(),
            callout_domains: config
                .partner
                .iter()
                .filter(|p| p.verify == Some(crate::config::Verify::Callout))
                .map(|p| p.domain.clone())
                .collect(),
            quotas: quota::of_config(config).into_iter().collect(),
        }
    }

    /// Whether any partner has a quota.
    pub fn has_quotas(&self) -> bool {
        !self.quotas.is_empty()
    }

    /// The quota of partner `domain` (lower case), if it has one.
    pub fn quota(&self, domain: &str) -> Option<quota::Quota> {
        self.quotas.get(domain).copied()
    }

    /// Whether an accepted recipient of `domain` (lower case) is verified with a callout
    /// before RCPT is answered.
    pub fn verifies(&self, domain: &str) -> bool {
        self.callout_domains.contains(domain)
    }

    /// Whether `client` may flush the queue of `domain` (a partner with `etrn = true`)
    /// with ETRN. Loopback and `[smtp] etrn_clients` may.
    pub fn check_etrn(&self, client: IpAddr, domain: &str) -> Result<(), EtrnRefusal> {
        if !client.is_loopback() && !self.etrn_clients.iter().any(|n| n.contains(&client)) {
            return Err(EtrnRefusal::Client);
        }
        if !self.etrn_domains.contains(domain) {
            return Err(EtrnRefusal::Node);
        }
        Ok(())
    }

    /// Whether `client` is in `[relay] networks` (may relay anywhere; its mail is
    /// masqueraded).
    pub fn is_trusted(&self, client: IpAddr) -> bool {
        let client = canonical(client);
        self.relay_networks.iter().any(|n| n.contains(&client))
    }

    /// The one domain `client` can send to, when that is already known at MAIL: this
    /// server is the backup MX of a single partner and nothing else (no local, routed or
    /// virtual domain, and the client may not relay). The quota check can then answer MAIL.
    pub fn sole_domain(&self, client: IpAddr) -> Option<&str> {
        if self.partners.len() != 1
            || !self.locals.is_empty()
            || !self.routed.is_empty()
            || !self.virtual_table.is_empty()
            || self.is_trusted(client)
        {
            return None;
        }
        self.partners.keys().next().map(String::as_str)
    }

    /// The masquerading to apply to mail from `client`, if any.
    pub fn masquerade_for(&self, client: IpAddr) -> Option<&Masquerade> {
        self.masquerade.as_ref().filter(|_| self.is_trusted(client))
    }

    /// Where `RCPT TO:<postmaster>` (no domain) goes: postmaster of the first local domain.
    pub fn postmaster(&self) -> Option<String> {
        self.first_local.as_ref().map(|d| format!("postmaster@{d}"))
    }

    /// Whether mail from `client` to `address` (as parsed from RCPT TO, quotes removed) is
    /// accepted, and the address to queue.
    pub fn check_recipient(&self, client: IpAddr, address: &str) -> Result<Accepted, Refusal> {
        let Some((local, _)) = address.rsplit_once('@') else {
            return Err(Refusal::Relay);
        };
        let trusted = self.is_trusted(client);
        let domain = domain_of(address);
        if !self.is_ours(&domain) && !trusted {
            return Err(Refusal::Relay);
        }
        if local.is_empty() || (!trusted && local.contains(['@', '%', '!'])) {
            return Err(Refusal::Routing);
        }
        let rewritten = self.rewrite(address)?;
        let final_addr = rewritten.as_deref().unwrap_or(address);
        let final_domain = domain_of(final_addr);
        // (The lookup is repeated only here, for an address of a virtual-only domain that
        // was not rewritten: an identity entry, or no entry at all.)
        if rewritten.is_none()
            && self.virtual_table.has_domain(&final_domain)
            && !self.partners.contains_key(&final_domain)
            && !self.locals.contains_key(&final_domain)
            && self.virtual_table.lookup(final_addr).is_none()
        {
            // A virtual domain knows its users by its entries.
            return Err(Refusal::UnknownUser);
        }
        let final_local = final_addr.rsplit_once('@').map_or("", |(l, _)| l);
        if let Some(users) = self.locals.get(&final_domain) {
            let name = mailbox_user(final_local).map_err(|_| Refusal::BadMailbox)?;
            // RFC 5321 4.5.1: postmaster of a domain we deliver is always accepted.
            if let Some(users) = users.as_ref().filter(|_| name != "postmaster") {
                if !users.contains(&name) && !users.contains(&final_local.to_ascii_lowercase()) {
                    return Err(Refusal::UnknownUser);
                }
            }
        }
        if let Some(Some(users)) = self.partners.get(&final_domain) {
            if !users.contains(&final_local.to_ascii_lowercase()) {
                return Err(Refusal::UnknownUser);
            }
        }
        Ok(Accepted {
            address: final_addr.to_string(),
            original: rewritten.is_some().then(|| address.to_string()),
        })
    }

    /// The address after the virtual table, or `None` when no entry applies.
    fn rewrite(&self, address: &str) -> Result<Option<String>, Refusal> {
        if self.virtual_table.is_empty() {
            return Ok(None);
        }
        let mut current = address.to_string();
        let mut changed = false;
        for _ in 0..MAX_REWRITES {
            let next = match self.virtual_table.lookup(&current) {
                None => return Ok(changed.then_some(current)),
                Some(Target::Error { code, status, text }) => {
                    return Err(Refusal::Virtual { code, status, text })
                }
                Some(Target::Address(a)) => a,
                Some(Target::Local(name)) => {
                    let d = domain_of(&current);
                    let d = if self.locals.contains_key(&d) {
                        d
                    } else {
                        self.first_local.clone().ok_or(Refusal::NoLocalDomain)?
                    };
                    format!("{name}@{d}")
                }
            };
            if next.eq_ignore_ascii_case(&current) {
                // `@dom %1@dom`: an entry that maps an address to itself ends the walk.
                return Ok(changed.then_some(current));
            }
            current = next;
            changed = true;
        }
        Err(Refusal::Loop)
    }

    /// Whether mail for `domain` is accepted from any client.
    pub fn is_ours(&self, domain: &str) -> bool {
        self.partners.contains_key(domain)
            || self.locals.contains_key(domain)
            || self.routed.contains(domain)
            || self.virtual_table.has_domain(domain)
    }

    pub fn is_partner(&self, domain: &str) -> bool {
        self.partners.contains_key(domain)
    }
}

/// An IPv4-mapped IPv6 client (`::ffff:192.0.2.1`, from a dual-stack listener) as IPv4.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::VirtualConfig;

    /// A client outside every relay network.
    const OUT: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(198, 51, 100, 7));
    /// A client inside `192.168.0.0/24`.
    const IN: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(192, 168, 0, 20));

    /// Accepted as given.
    fn same(a: &str) -> Result<Accepted, Refusal> {
        Ok(Accepted {
            address: a.to_string(),
            original: None,
        })
    }

    /// Accepted as `to`, rewritten from `from`.
    fn rewritten(from: &str, to: &str) -> Result<Accepted, Refusal> {
        Ok(Accepted {
            address: to.to_string(),
            original: Some(from.to_string()),
        })
    }

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
        assert_eq!(
            p.check_recipient(OUT, "u@example.com"),
            same("u@example.com")
        );
        assert_eq!(
            p.check_recipient(OUT, "u@EXAMPLE.Com."),
            same("u@EXAMPLE.Com.")
        );
        for a in [
            "u@evilexample.com",
            "u@example.com.evil.net",
            "u@sub.example.com",
            "u@example.net",
            "postmaster",
            "u@",
        ] {
            assert_eq!(p.check_recipient(OUT, a), Err(Refusal::Relay), "{a}");
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
            assert_eq!(p.check_recipient(OUT, a), Err(Refusal::Routing), "{a}");
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
        assert_eq!(
            p.check_recipient(OUT, "Alice@example.org"),
            same("Alice@example.org")
        );
        assert_eq!(
            p.check_recipient(OUT, "mallory@example.org"),
            Err(Refusal::UnknownUser)
        );
    }

    /// The seed's case 3 relay plus a local domain: virtual, local users, relay networks.
    fn primary() -> Policy {
        let mut c = Config::parse(
            "hostname = \"mrelay1.inst.uc.pt\"\nspool = \"/x\"\n\
             [[local]]\ndomain = \"inst.uc.pt\"\nmaildir = \"/var/mail/{domain}/{user}\"\n\
             [[route]]\ndomain = \"routed.uc.pt\"\nto = [\"mail.routed.uc.pt\"]\n\
             [[partner]]\ndomain = \"partner.org\"\n\
             [relay]\nnetworks = [\"192.168.0.0/24\", \"2001:db8::/32\"]\n",
        )
        .unwrap();
        c.local[0].user_set = Some(["alice", "bob"].map(String::from).into_iter().collect());
        c.virtual_table = Some(VirtualConfig {
            file: "/x".into(),
            table: VirtualTable::parse(
                "@depart.uc.pt %1@mail-server1.inst.uc.pt\n\
                 info@inst.uc.pt alice\n\
                 sales@inst.uc.pt bob@inst.uc.pt\n\
                 gone@inst.uc.pt error:nouser\n\
                 spam@inst.uc.pt error:5.7.0:550 Address invalid\n\
                 a@loop.uc.pt b@loop.uc.pt\n\
                 b@loop.uc.pt a@loop.uc.pt\n\
                 same@self.uc.pt same@self.uc.pt\n",
            )
            .unwrap()
            .into(),
        });
        Policy::new(&c)
    }

    #[test]
    fn local_routed_and_virtual_domains_are_ours() {
        let p = primary();
        assert_eq!(
            p.check_recipient(OUT, "alice@inst.uc.pt"),
            same("alice@inst.uc.pt")
        );
        assert_eq!(
            p.check_recipient(OUT, "Bob+lists@Inst.UC.pt"),
            same("Bob+lists@Inst.UC.pt")
        );
        assert_eq!(
            p.check_recipient(OUT, "x@routed.uc.pt"),
            same("x@routed.uc.pt")
        );
        assert_eq!(
            p.check_recipient(OUT, "x@partner.org"),
            same("x@partner.org")
        );
        assert_eq!(
            p.check_recipient(OUT, "exemplo@depart.uc.pt"),
            rewritten("exemplo@depart.uc.pt", "exemplo@mail-server1.inst.uc.pt")
        );
        assert_eq!(
            p.check_recipient(OUT, "carol@inst.uc.pt"),
            Err(Refusal::UnknownUser)
        );
        // Not in the users list, but RFC 5321 4.5.1 requires it.
        assert_eq!(
            p.check_recipient(OUT, "PostMaster@inst.uc.pt"),
            same("PostMaster@inst.uc.pt")
        );
        assert_eq!(
            p.check_recipient(OUT, "../etc@inst.uc.pt"),
            Err(Refusal::BadMailbox)
        );
        for a in [
            "x@sub.inst.uc.pt",
            "x@uc.pt",
            "x@example.net",
            "x@depart.uc.pt.evil",
        ] {
            assert_eq!(p.check_recipient(OUT, a), Err(Refusal::Relay), "{a}");
        }
    }

    #[test]
    fn the_virtual_table_rewrites_and_refuses_at_rcpt() {
        let p = primary();
        assert_eq!(
            p.check_recipient(OUT, "Info@inst.uc.pt"),
            rewritten("Info@inst.uc.pt", "alice@inst.uc.pt")
        );
        assert_eq!(
            p.check_recipient(OUT, "sales@inst.uc.pt"),
            rewritten("sales@inst.uc.pt", "bob@inst.uc.pt")
        );
        assert_eq!(
            p.check_recipient(OUT, "gone@inst.uc.pt"),
            Err(Refusal::Virtual {
                code: 550,
                status: "5.1.1".into(),
                text: "User unknown".into()
            })
        );
        assert_eq!(
            p.check_recipient(OUT, "spam@inst.uc.pt"),
            Err(Refusal::Virtual {
                code: 550,
                status: "5.7.0".into(),
                text: "Address invalid".into()
            })
        );
        assert_eq!(p.check_recipient(OUT, "a@loop.uc.pt"), Err(Refusal::Loop));
        assert_eq!(
            p.check_recipient(OUT, "same@self.uc.pt"),
            same("same@self.uc.pt")
        );
        // A virtual-only domain knows only its entries.
        assert_eq!(
            p.check_recipient(OUT, "other@self.uc.pt"),
            Err(Refusal::UnknownUser)
        );
    }

    #[test]
    fn relay_networks_may_send_anywhere_and_others_may_not() {
        let p = primary();
        assert!(p.is_trusted(IN));
        assert!(p.is_trusted("2001:db8::5".parse().unwrap()));
        assert!(p.is_trusted("::ffff:192.168.0.9".parse().unwrap()));
        assert!(!p.is_trusted(OUT));
        assert_eq!(
            p.check_recipient(IN, "friend@example.net"),
            same("friend@example.net")
        );
        assert_eq!(
            p.check_recipient(OUT, "friend@example.net"),
            Err(Refusal::Relay)
        );
        // Routing forms: refused from outside, a trusted client's business.
        assert_eq!(
            p.check_recipient(OUT, "u%x@inst.uc.pt"),
            Err(Refusal::Routing)
        );
        assert_eq!(
            p.check_recipient(IN, "u%x@example.net"),
            same("u%x@example.net")
        );
        // Local user lists apply to trusted clients too.
        assert_eq!(
            p.check_recipient(IN, "carol@inst.uc.pt"),
            Err(Refusal::UnknownUser)
        );
        assert_eq!(p.postmaster().as_deref(), Some("postmaster@inst.uc.pt"));
    }
}
