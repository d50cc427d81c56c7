//! The next hops of a domain (RFC 5321 5.1, RFC 7505).
//!
//! A partner's configured `route` wins; otherwise the domain's MX records, sorted by
//! preference with equal preferences in random order, each host with all its addresses. When
//! this server is in the list (by `hostname` or by an address of this machine) it drops that
//! entry and every entry of equal or higher preference number, so a backup MX only ever
//! delivers to hosts more preferred than itself and never to itself or a peer.
//!
//! The decisions are plain functions ([`is_null_mx`], [`order_by_preference`], [`is_self`],
//! [`drop_self`]) tested without DNS; [`Resolver`] feeds them from hickory-resolver.

use std::collections::HashSet;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use hickory_resolver::config::{
    LookupIpStrategy, NameServerConfig, ResolveHosts, ResolverConfig, ResolverOpts,
};
use hickory_resolver::name_server::TokioConnectionProvider;
use hickory_resolver::proto::op::ResponseCode;
use hickory_resolver::proto::rr::{RData, RecordType};
use hickory_resolver::proto::xfer::Protocol;
use hickory_resolver::proto::ProtoErrorKind;
use hickory_resolver::{Name, TokioResolver};
use rand::seq::SliceRandom;

use crate::config::{parse_hop, parse_listen, Config};

/// How long one DNS query may take, and how often it is tried. Kept short: a slow answer
/// defers the delivery, and the queue retries later anyway.
const QUERY_TIMEOUT: Duration = Duration::from_secs(2);
const QUERY_ATTEMPTS: usize = 2;

/// One host to try, with every address to try it at.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hop {
    /// The MX target or route host, lower case, without the trailing dot.
    pub name: String,
    /// The MX preference; for a configured route the entry's position.
    pub preference: u16,
    /// IPv4 addresses first; empty only before [`Resolver::next_hops`] filters.
    pub addrs: Vec<IpAddr>,
    pub port: u16,
}

/// Where mail for a domain goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Route {
    /// The hosts in the order to try them; never empty, every hop has an address.
    Hops(Vec<Hop>),
    /// The domain accepts no mail (RFC 7505): fail permanently with 5.1.10.
    NullMx,
    /// This server is the best MX left: keep the mail queued and log a loud configuration
    /// error instead of looping the mail back to ourselves.
    SelfOnly { preference: u16 },
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ResolveError {
    /// SERVFAIL, timeout, no nameserver answering, no host with an address: defer.
    #[error("{0}")]
    Temporary(String),
    /// NXDOMAIN, or no MX and no A/AAAA: fail permanently with 5.1.2.
    #[error("{0}")]
    NoSuchDomain(String),
}

/// The resolver could not be set up (unreadable `/etc/resolv.conf`, bad nameserver).
#[derive(Debug, thiserror::Error)]
#[error("cannot set up the DNS resolver: {0}")]
pub struct SetupError(String);

/// RFC 7505: a single MX record of preference 0 whose target is the root (`"."`).
pub fn is_null_mx(records: &[(u16, String)]) -> bool {
    matches!(records, [(0, target)] if target == ".")
}

/// Sorts by preference (lowest number first); items of equal preference end up in random
/// order, so equal-preference MX hosts share the load (RFC 5321 5.1).
pub fn order_by_preference<T, R: rand::Rng + ?Sized>(
    items: &mut [T],
    preference: impl Fn(&T) -> u16,
    rng: &mut R,
) {
    items.shuffle(rng);
    items.sort_by_key(|i| preference(i)); // stable: the shuffle survives within a preference
}

/// Whether an MX host is this server: its name is our `hostname` (case and a trailing dot
/// ignored), or one of its addresses is one of ours.
pub fn is_self(name: &str, addrs: &[IpAddr], hostname: &str, local: &HashSet<IpAddr>) -> bool {
    let norm = |s: &str| s.trim_end_matches('.').to_ascii_lowercase();
    norm(name) == norm(hostname) || addrs.iter().any(|a| local.contains(a))
}

/// Removes this server and every host of equal or higher preference number from `hops`
/// (already ordered). [`Route::SelfOnly`] when nothing is left.
pub fn drop_self(hops: Vec<Hop>, is_self: impl Fn(&Hop) -> bool) -> Route {
    let Some(ours) = hops
        .iter()
        .filter(|h| is_self(h))
        .map(|h| h.preference)
        .min()
    else {
        return Route::Hops(hops);
    };
    let better: Vec<Hop> = hops.into_iter().filter(|h| h.preference < ours).collect();
    if better.is_empty() {
        Route::SelfOnly { preference: ours }
    } else {
        Route::Hops(better)
    }
}

/// `Name` -> the form used everywhere here: lower-case ASCII without the trailing dot, the
/// root as `"."`.
fn host_name(n: &Name) -> String {
    if n.is_root() {
        ".".into()
    } else {
        n.to_ascii().trim_end_matches('.').to_ascii_lowercase()
    }
}

/// A fully qualified name for a query, so no search domain is ever appended.
fn fqdn(domain: &str) -> Result<Name, ResolveError> {
    let d = domain.trim_end_matches('.');
    let mut name = Name::from_utf8(d)
        .map_err(|e| ResolveError::NoSuchDomain(format!("{d:?} is not a domain name: {e}")))?;
    name.set_fqdn(true);
    Ok(name)
}

/// What a failed hickory lookup means for us.
enum Failure {
    NxDomain,
    NoData,
    Other(String),
}

fn classify(e: &hickory_resolver::ResolveError) -> Failure {
    if let Some(ProtoErrorKind::NoRecordsFound { response_code, .. }) = e.proto().map(|p| p.kind())
    {
        return match *response_code {
            ResponseCode::NXDomain => Failure::NxDomain,
            ResponseCode::NoError => Failure::NoData,
            code => Failure::Other(format!("the nameserver answered {code}")),
        };
    }
    Failure::Other(e.to_string())
}

/// The next-hop resolver: hickory's caching resolver plus what self-detection needs.
#[derive(Clone)]
pub struct Resolver {
    dns: TokioResolver,
    /// Our `hostname`, lower case, no trailing dot.
    hostname: String,
    /// The specific (not unspecified) `[smtp] listen` addresses.
    listen: Vec<IpAddr>,
    /// `[delivery] port`.
    port: u16,
    /// For messages: "127.0.0.1:5353" or "the system resolver".
    servers: String,
    /// The validating resolvers DANE's DNSSEC queries go to (see [`crate::tls::dane`]).
    dnssec: Vec<SocketAddr>,
}

impl fmt::Debug for Resolver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Resolver")
            .field("hostname", &self.hostname)
            .field("servers", &self.servers)
            .finish_non_exhaustive()
    }
}

impl Resolver {
    /// `[delivery] nameservers` empty: the system resolver (`/etc/resolv.conf`, hosts file);
    /// else those `ip:port` servers over UDP and TCP, and DNS only.
    pub fn new(config: &Config) -> Result<Resolver, SetupError> {
        let (dns_config, mut opts, servers) = if config.delivery.nameservers.is_empty() {
            let (c, o) = hickory_resolver::system_conf::read_system_conf()
                .map_err(|e| SetupError(format!("/etc/resolv.conf: {e}")))?;
            (c, o, "the system resolver".to_string())
        } else {
            let mut group = Vec::new();
            for ns in &config.delivery.nameservers {
                let addr: SocketAddr = parse_listen(ns).map_err(SetupError)?;
                for protocol in [Protocol::Udp, Protocol::Tcp] {
                    group.push(NameServerConfig::new(addr, protocol));
                }
            }
            let mut opts = ResolverOpts::default();
            opts.use_hosts_file = ResolveHosts::Never;
            let c = ResolverConfig::from_parts(None, Vec::new(), group);
            (c, opts, config.delivery.nameservers.join(", "))
        };
        opts.timeout = opts.timeout.min(QUERY_TIMEOUT);
        opts.attempts = opts.attempts.clamp(1, QUERY_ATTEMPTS);
        opts.ip_strategy = LookupIpStrategy::Ipv4AndIpv6;
        opts.cache_size = opts.cache_size.max(1024);
        opts.ndots = 0;
        let dns =
            TokioResolver::builder_with_config(dns_config, TokioConnectionProvider::default())
                .with_options(opts)
                .build();
        Ok(Resolver {
            dns,
            hostname: config.hostname.trim_end_matches('.').to_ascii_lowercase(),
            listen: config
                .listen_addrs()
                .iter()
                .map(SocketAddr::ip)
                .filter(|ip| !ip.is_unspecified())
                .collect(),
            port: config.delivery.port,
            servers,
            dnssec: crate::tls::dane::servers(&config.delivery.nameservers),
        })
    }

    /// The nameservers asked, for messages.
    pub fn servers(&self) -> &str {
        &self.servers
    }

    /// The resolvers asked for DNSSEC-validated answers (DANE): `[delivery] nameservers`,
    /// else the system's.
    pub fn dnssec_servers(&self) -> &[SocketAddr] {
        &self.dnssec
    }

    /// The hickory resolver itself, for other lookups made as delivery's are (the DNS
    /// blocklists of [`crate::policy::dnsbl`]).
    pub fn dns(&self) -> &TokioResolver {
        &self.dns
    }

    /// The addresses of this machine: every interface address (read now, so a changed
    /// address is seen) and the specific `[smtp] listen` addresses.
    pub fn local_addrs(&self) -> HashSet<IpAddr> {
        let mut set: HashSet<IpAddr> = if_addrs::get_if_addrs()
            .map(|ifs| ifs.iter().map(|i| i.ip()).collect())
            .unwrap_or_default();
        set.extend(self.listen.iter().copied());
        set
    }

    /// Whether the host `name` with `addrs` is this server (see [`is_self`]).
    pub fn is_self(&self, name: &str, addrs: &[IpAddr]) -> bool {
        is_self(name, addrs, &self.hostname, &self.local_addrs())
    }

    /// Where to send mail for `domain`: the `route` hops if given (a partner's `route`,
    /// `host:port` entries), else the MX walk described in the module docs.
    pub async fn next_hops(&self, domain: &str, route: &[String]) -> Result<Route, ResolveError> {
        if !route.is_empty() {
            return self.route_hops(route).await;
        }
        if let Some(ip) = crate::smtp::path::literal_ip(domain.as_bytes()) {
            // An address literal (`user@[192.0.2.1]`): that host, no DNS.
            if self.local_addrs().contains(&ip) {
                return Ok(Route::SelfOnly { preference: 0 });
            }
            return Ok(Route::Hops(vec![Hop {
                name: domain.to_string(),
                preference: 0,
                addrs: vec![ip],
                port: self.port,
            }]));
        }
        let domain = domain.trim_end_matches('.').to_ascii_lowercase();
        let mut records = match self.mx_lookup(&domain).await? {
            Some(records) => records,
            None => return self.implicit_mx(&domain).await,
        };
        if is_null_mx(&records) {
            return Ok(Route::NullMx);
        }
        order_by_preference(&mut records, |r| r.0, &mut rand::rng());
        let names: Vec<String> = records.iter().map(|r| r.1.clone()).collect();
        let mut failures = Vec::new();
        let mut hops = Vec::with_capacity(records.len());
        for ((preference, name), addrs) in records.into_iter().zip(self.resolve_all(names).await) {
            let addrs = match addrs {
                Ok(a) if a.is_empty() => {
                    failures.push(format!("{name} has no address"));
                    a
                }
                Ok(a) => a,
                Err(e) => {
                    failures.push(format!("{name}: {e}"));
                    Vec::new()
                }
            };
            hops.push(Hop {
                name,
                preference,
                addrs,
                port: self.port,
            });
        }
        let local = self.local_addrs();
        match drop_self(hops, |h| is_self(&h.name, &h.addrs, &self.hostname, &local)) {
            Route::Hops(hops) => {
                let hops: Vec<Hop> = hops.into_iter().filter(|h| !h.addrs.is_empty()).collect();
                if hops.is_empty() {
                    Err(ResolveError::Temporary(format!(
                        "no usable MX host for {domain}: {}",
                        failures.join("; ")
                    )))
                } else {
                    Ok(Route::Hops(hops))
                }
            }
            other => Ok(other),
        }
    }

    /// The MX records of `domain`, sorted by preference then name (no shuffling); empty when
    /// the domain exists but has none. Targets as in [`Hop::name`]; a null MX target is `"."`.
    pub async fn mx_records(&self, domain: &str) -> Result<Vec<(u16, String)>, ResolveError> {
        let domain = domain.trim_end_matches('.').to_ascii_lowercase();
        let mut records = self.mx_lookup(&domain).await?.unwrap_or_default();
        records.sort();
        Ok(records)
    }

    /// The addresses of `host` (IPv4 first); an address literal is its own address. Empty when
    /// the name does not exist or has no A/AAAA records.
    pub async fn host_addrs(&self, host: &str) -> Result<Vec<IpAddr>, ResolveError> {
        lookup_addrs(self.dns.clone(), host.to_string()).await
    }

    /// The target if `host` is an alias (a CNAME record), which an MX target must not be
    /// (RFC 2181 10.3).
    pub async fn cname(&self, host: &str) -> Result<Option<String>, ResolveError> {
        let name = fqdn(host)?;
        match self.dns.lookup(name, RecordType::CNAME).await {
            Ok(lookup) => Ok(lookup.iter().find_map(|r| match r {
                RData::CNAME(c) => Some(host_name(&c.0)),
                _ => None,
            })),
            Err(e) => match classify(&e) {
                Failure::NxDomain | Failure::NoData => Ok(None),
                Failure::Other(m) => Err(ResolveError::Temporary(format!(
                    "CNAME lookup for {host} failed: {m}"
                ))),
            },
        }
    }

    /// `None` when the domain exists without MX records.
    async fn mx_lookup(&self, domain: &str) -> Result<Option<Vec<(u16, String)>>, ResolveError> {
        match self.dns.mx_lookup(fqdn(domain)?).await {
            Ok(lookup) => Ok(Some(
                lookup
                    .iter()
                    .map(|mx| (mx.preference(), host_name(mx.exchange())))
                    .collect(),
            )),
            Err(e) => match classify(&e) {
                Failure::NxDomain => Err(ResolveError::NoSuchDomain(format!(
                    "{domain}: no such domain (NXDOMAIN)"
                ))),
                Failure::NoData => Ok(None),
                Failure::Other(m) => Err(ResolveError::Temporary(format!(
                    "MX lookup for {domain} failed: {m}"
                ))),
            },
        }
    }

    /// No MX records: the domain itself is the only MX, at preference 0 (RFC 5321 5.1).
    async fn implicit_mx(&self, domain: &str) -> Result<Route, ResolveError> {
        let addrs = self.host_addrs(domain).await?;
        if addrs.is_empty() {
            return Err(ResolveError::NoSuchDomain(format!(
                "{domain} has no MX and no A/AAAA records"
            )));
        }
        let hop = Hop {
            name: domain.to_string(),
            preference: 0,
            addrs,
            port: self.port,
        };
        let local = self.local_addrs();
        Ok(drop_self(vec![hop], |h| {
            is_self(&h.name, &h.addrs, &self.hostname, &local)
        }))
    }

    /// A configured route: its hops in order, no MX lookup and no self-detection.
    async fn route_hops(&self, route: &[String]) -> Result<Route, ResolveError> {
        let mut parsed = Vec::with_capacity(route.len());
        for entry in route {
            parsed.push(parse_hop(entry).map_err(ResolveError::Temporary)?);
        }
        let names = parsed.iter().map(|(h, _)| h.clone()).collect();
        let mut failures = Vec::new();
        let mut hops = Vec::new();
        for (i, ((host, port), addrs)) in parsed
            .into_iter()
            .zip(self.resolve_all(names).await)
            .enumerate()
        {
            match addrs {
                Ok(mut addrs) if !addrs.is_empty() => hops.push(Hop {
                    name: host.to_ascii_lowercase(),
                    preference: u16::try_from(i).unwrap_or(u16::MAX),
                    addrs: {
                        // A name with several addresses is a round-robin group (the
                        // seed's smtpout1..n): spread the load, try every one.
                        addrs.shuffle(&mut rand::rng());
                        addrs
                    },
                    port: port.unwrap_or(self.port),
                }),
                Ok(_) => failures.push(format!("{host} has no address")),
                Err(e) => failures.push(format!("{host}: {e}")),
            }
        }
        if hops.is_empty() {
            return Err(ResolveError::Temporary(format!(
                "no usable route host: {}",
                failures.join("; ")
            )));
        }
        Ok(Route::Hops(hops))
    }

    /// The addresses of every name, looked up concurrently, in the order given.
    async fn resolve_all(&self, names: Vec<String>) -> Vec<Result<Vec<IpAddr>, ResolveError>> {
        let mut set = tokio::task::JoinSet::new();
        for (i, name) in names.iter().enumerate() {
            let dns = self.dns.clone();
            let name = name.clone();
            set.spawn(async move { (i, lookup_addrs(dns, name).await) });
        }
        let mut out: Vec<Result<Vec<IpAddr>, ResolveError>> = names
            .iter()
            .map(|n| {
                Err(ResolveError::Temporary(format!(
                    "lookup of {n} did not finish"
                )))
            })
            .collect();
        while let Some(joined) = set.join_next().await {
            if let Ok((i, result)) = joined {
                out[i] = result;
            }
        }
        out
    }
}

async fn lookup_addrs(dns: TokioResolver, host: String) -> Result<Vec<IpAddr>, ResolveError> {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if let Ok(ip) = host.parse::<IpAddr>() {
        return Ok(vec![ip]);
    }
    if host == "." || host.is_empty() {
        return Ok(Vec::new());
    }
    match dns.lookup_ip(fqdn(host)?).await {
        Ok(lookup) => {
            let mut addrs: Vec<IpAddr> = Vec::new();
            for ip in lookup.iter() {
                if !addrs.contains(&ip) {
                    addrs.push(ip);
                }
            }
            addrs.sort_by_key(|ip| ip.is_ipv6()); // stable: IPv4 first, DNS order within
            Ok(addrs)
        }
        Err(e) => match classify(&e) {
            Failure::NxDomain | Failure::NoData => Ok(Vec::new()),
            Failure::Other(m) => Err(ResolveError::Temporary(format!(
                "address lookup for {host} failed: {m}"
            ))),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hop(name: &str, preference: u16) -> Hop {
        Hop {
            name: name.into(),
            preference,
            addrs: vec![],
            port: 25,
        }
    }

    fn names(route: &Route) -> Vec<&str> {
        match route {
            Route::Hops(h) => h.iter().map(|h| h.name.as_str()).collect(),
            _ => vec![],
        }
    }

    #[test]
    fn null_mx_is_one_record_of_preference_zero_to_the_root() {
        assert!(is_null_mx(&[(0, ".".into())]));
        assert!(!is_null_mx(&[(10, ".".into())]));
        assert!(!is_null_mx(&[
            (0, ".".into()),
            (10, "mx.example.com".into())
        ]));
        assert!(!is_null_mx(&[(0, "mx.example.com".into())]));
        assert!(!is_null_mx(&[]));
    }

    #[test]
    fn preference_order_shuffles_only_equal_preferences() {
        let mut seen = HashSet::new();
        for _ in 0..200 {
            let mut r = vec![
                (20, "c"),
                (10, "a"),
                (10, "b"),
                (0, "p"),
                (10, "d"),
                (30, "z"),
            ];
            order_by_preference(&mut r, |r| r.0, &mut rand::rng());
            let prefs: Vec<u16> = r.iter().map(|r| r.0).collect();
            assert_eq!(prefs, [0, 10, 10, 10, 20, 30]);
            assert_eq!((r[0].1, r[4].1, r[5].1), ("p", "c", "z"));
            seen.insert(format!("{}{}{}", r[1].1, r[2].1, r[3].1));
        }
        // Three hosts at 10 have six orders; 200 shuffles miss one with odds of ~1e-15.
        assert_eq!(seen.len(), 6, "{seen:?}");
    }

    #[test]
    fn self_is_known_by_name_or_local_address() {
        let local: HashSet<IpAddr> = ["192.0.2.25".parse().unwrap()].into_iter().collect();
        let other: IpAddr = "198.51.100.1".parse().unwrap();
        assert!(is_self(
            "MX2.Example.NET.",
            &[other],
            "mx2.example.net",
            &local
        ));
        assert!(is_self(
            "alias.example.org",
            &[other, "192.0.2.25".parse().unwrap()],
            "mx2.example.net",
            &local
        ));
        assert!(!is_self(
            "mx1.example.net",
            &[other],
            "mx2.example.net",
            &local
        ));
    }

    #[test]
    fn self_drops_itself_and_every_less_preferred_host() {
        let is_us = |h: &Hop| h.name == "us";
        // Lowest preference (highest number): the others remain.
        let r = drop_self(vec![hop("a", 0), hop("b", 5), hop("us", 10)], is_us);
        assert_eq!(names(&r), ["a", "b"]);
        // In the middle: only the more preferred remain.
        let r = drop_self(
            vec![hop("a", 0), hop("us", 5), hop("c", 10), hop("d", 20)],
            is_us,
        );
        assert_eq!(names(&r), ["a"]);
        // A peer of equal preference goes too (it would send the mail back to us).
        let r = drop_self(vec![hop("a", 0), hop("peer", 5), hop("us", 5)], is_us);
        assert_eq!(names(&r), ["a"]);
        // Best or only MX: nothing left.
        let r = drop_self(vec![hop("us", 0), hop("b", 10)], is_us);
        assert_eq!(r, Route::SelfOnly { preference: 0 });
        let r = drop_self(vec![hop("peer", 5), hop("us", 5)], is_us);
        assert_eq!(r, Route::SelfOnly { preference: 5 });
        // Not in the list: everything, in order.
        let r = drop_self(vec![hop("a", 0), hop("b", 5)], is_us);
        assert_eq!(names(&r), ["a", "b"]);
    }

    #[test]
    fn names_are_lower_case_without_the_trailing_dot() {
        assert_eq!(
            host_name(&Name::from_ascii("Mail.Example.COM.").unwrap()),
            "mail.example.com"
        );
        assert_eq!(host_name(&Name::root()), ".");
        assert!(fqdn("example.com").unwrap().is_fqdn());
        assert!(matches!(
            fqdn("exa mple..com"),
            Err(ResolveError::NoSuchDomain(_))
        ));
    }
}
