//! `mxspool doctor DOMAIN`: checks a domain's MX set-up from DNS, the way the seed advises.
//!
//! It lists the MX set with every host's addresses, says whether this server is in it and at
//! which preference, probes the SMTP banner of every host more preferred than us (the hosts
//! this server delivers to), and warns about what breaks a backup MX: this server being the
//! most preferred host, an MX target that is an alias (CNAME, RFC 2181 10.3) or an address
//! literal, all MX hosts in one /24 (one network failure takes them all down), no MX or a
//! null MX, a host without addresses, a host that does not answer SMTP. For a partner it
//! first shows its defences: the recipients list, the callout (tried now with
//! `postmaster@DOMAIN`), the quota and what its queue uses of it, the rate limits and
//! blocklists; a quota reached or a callout without answer is a warning. Exit status 0 when
//! there is no warning, 1 otherwise.

use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

use crate::config::Config;
use crate::delivery::mx::{is_null_mx, ResolveError, Resolver};

mod defences;
mod tls;

/// Runs the check and prints the report; blocking (it builds its own runtime).
pub fn run(config: &Config, domain: &str) -> anyhow::Result<ExitCode> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the runtime")?;
    let report = runtime.block_on(check(config, domain))?;
    // What DNS and the probed servers said is shown, never obeyed.
    let mut stdout = crate::ops::output::stdout();
    std::io::Write::write_all(&mut stdout, report.text.as_bytes())?;
    std::io::Write::flush(&mut stdout)?;
    Ok(if report.warnings.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

/// What `doctor` found: the printable report (ending with the warnings and the exit status)
/// and the warnings alone.
#[derive(Clone, Debug)]
pub struct Report {
    pub text: String,
    pub warnings: Vec<String>,
}

/// One MX host as found in DNS.
struct Host {
    preference: u16,
    name: String,
    addrs: Result<Vec<IpAddr>, String>,
    /// Why this host is us: "hostname" or "local address 192.0.2.25".
    is_self: Option<String>,
}

impl Host {
    fn addrs(&self) -> &[IpAddr] {
        self.addrs.as_deref().unwrap_or(&[])
    }
}

/// Checks `domain`'s MX set-up. An error only when DNS gives no answer at all.
pub async fn check(config: &Config, domain: &str) -> anyhow::Result<Report> {
    let domain = domain.trim_end_matches('.').to_ascii_lowercase();
    if !crate::config::is_domain(&domain) {
        anyhow::bail!(
            "{} is not a domain name",
            spool_tools::terminal::escape_line(&format!("{domain:?}"))
        );
    }
    let resolver = Resolver::new(config)?;
    let mut out = String::new();
    let mut warnings = Vec::new();
    let port = config.delivery.port;
    if config.partner(&domain).is_some() {
        defences::report(config, &resolver, &domain, &mut out, &mut warnings).await;
    }

    let records = match resolver.mx_records(&domain).await {
        Ok(r) => r,
        Err(ResolveError::NoSuchDomain(m)) => {
            let _ = writeln!(
                out,
                "{domain} does not exist (asked {}).",
                resolver.servers()
            );
            warnings.push(format!("{m}: mail to it bounces"));
            return Ok(finish(out, warnings));
        }
        Err(ResolveError::Temporary(m)) => anyhow::bail!("cannot check {domain}: {m}"),
    };
    let _ = writeln!(out, "MX hosts of {domain} (asked {}):", resolver.servers());
    if is_null_mx(&records) {
        let _ = writeln!(out, "  null MX (RFC 7505): the domain accepts no mail");
        warnings.push(format!(
            "{domain} has a null MX (RFC 7505): it accepts no mail, and mail to it bounces"
        ));
        return Ok(finish(out, warnings));
    }

    let mut hosts = Vec::new();
    if records.is_empty() {
        warnings.push(format!(
            "{domain} has no MX records: senders use its own A/AAAA address (implicit MX), so \
             there is no backup MX"
        ));
        hosts.push((0, domain.clone()));
    } else {
        hosts.extend(records.iter().cloned());
    }

    let local = resolver.local_addrs();
    let mut found = Vec::with_capacity(hosts.len());
    for (preference, name) in hosts {
        if name == "." {
            warnings.push(
                "a null MX record (\".\") among other MX records: RFC 7505 says it must be the \
                 only one"
                    .to_string(),
            );
            continue;
        }
        if !records.is_empty() {
            if name.parse::<IpAddr>().is_ok() {
                warnings.push(format!(
                    "MX target {name} is an address literal: an MX record must name a host \
                     (RFC 5321 5.1); many senders ignore it"
                ));
            } else {
                match resolver.cname(&name).await {
                    Ok(Some(target)) => warnings.push(format!(
                        "MX target {name} is an alias (CNAME to {target}): an MX record must \
                         name the host itself (RFC 2181 10.3)"
                    )),
                    Ok(None) => {}
                    Err(e) => warnings.push(e.to_string()),
                }
            }
        }
        let addrs = match resolver.host_addrs(&name).await {
            Ok(a) if a.is_empty() => {
                warnings.push(format!("MX host {name} has no A/AAAA records"));
                Ok(a)
            }
            Ok(a) => Ok(a),
            Err(e) => {
                warnings.push(e.to_string());
                Err(e.to_string())
            }
        };
        let is_self = if name == config.hostname {
            Some("hostname".to_string())
        } else {
            addrs
                .as_deref()
                .unwrap_or(&[])
                .iter()
                .find(|a| local.contains(a))
                .map(|a| format!("local address {a}"))
        };
        found.push(Host {
            preference,
            name,
            addrs,
            is_self,
        });
    }
    print_table(&mut out, &found);
    if records.is_empty() {
        let _ = writeln!(
            out,
            "  (no MX records: the domain's own address is its implicit MX)"
        );
    }

    let best = found.iter().map(|h| h.preference).min();
    let ours = found
        .iter()
        .filter(|h| h.is_self.is_some())
        .map(|h| h.preference)
        .min();
    let _ = writeln!(out);
    match ours {
        Some(p) => {
            let _ = writeln!(
                out,
                "This server ({}) is in the MX set at preference {p}.",
                config.hostname
            );
            // A primary (local, routed or virtual domain) is rightly the best MX; a
            // backup MX is not.
            let policy = crate::policy::Policy::new(config);
            let primary_here = policy.is_ours(&domain) && !policy.is_partner(&domain);
            if Some(p) == best && !primary_here {
                warnings.push(format!(
                    "this server is the most preferred MX host of {domain} (preference {p}): a \
                     backup MX needs a higher preference number than the primary, or mail stays \
                     queued here"
                ));
            }
        }
        None => {
            let _ = writeln!(
                out,
                "This server ({}) is not in the MX set.",
                config.hostname
            );
            if config.partner(&domain).is_some() {
                warnings.push(format!(
                    "{domain} is a partner domain but this server is not among its MX hosts: \
                     senders will not fall back to it"
                ));
            }
        }
    }
    match config.transport(&domain) {
        crate::config::Transport::Local(l) => {
            let how = match (&l.maildir, &l.lmtp) {
                (Some(m), _) => format!("to Maildirs {m}"),
                (None, Some(t)) => format!("over LMTP to {t}"),
                (None, None) => "nowhere".to_string(),
            };
            let _ = writeln!(out, "Mail for {domain} is delivered here, {how}.");
        }
        crate::config::Transport::Hops(hops) => {
            let _ = writeln!(
                out,
                "Delivery to {domain} uses the configured route: {}.",
                hops.join(", ")
            );
        }
        crate::config::Transport::Mx => {}
    }
    if let Some(net) = shared_slash24(&found) {
        warnings.push(format!(
            "all MX hosts' IPv4 addresses are in {net}: put the MX hosts on different networks, \
             so that one failure cannot take them all down"
        ));
    }

    // The hosts this server hands mail to: the configured route when there is one (with its
    // ports), else the MX hosts more preferred than us (all if we are not in the set).
    let timeout = config.delivery.connect_timeout.0;
    let probes: Vec<(String, String, SocketAddr)> = match config.transport(&domain) {
        crate::config::Transport::Hops(hops) => {
            let _ = writeln!(out, "\nSMTP check of the route (what delivery uses):");
            let mut probes = Vec::new();
            for hop in hops {
                let Ok((host, hop_port)) = crate::config::parse_hop(hop) else {
                    continue;
                };
                let p = hop_port.unwrap_or(port);
                let addrs = match host.parse::<IpAddr>() {
                    Ok(ip) => vec![ip],
                    Err(_) => match resolver.host_addrs(&host).await {
                        Ok(a) if !a.is_empty() => a,
                        Ok(_) => {
                            let _ = writeln!(out, "  {hop}  FAIL  no A/AAAA records");
                            warnings.push(format!("route host {host} has no A/AAAA records"));
                            continue;
                        }
                        Err(e) => {
                            let _ = writeln!(out, "  {hop}  FAIL  {e}");
                            warnings.push(format!("route host {host}: {e}"));
                            continue;
                        }
                    },
                };
                probes.extend(
                    addrs
                        .into_iter()
                        .map(|a| (format!("route {host}"), host.clone(), SocketAddr::new(a, p))),
                );
            }
            probes
        }
        crate::config::Transport::Local(_) => Vec::new(),
        crate::config::Transport::Mx => {
            let targets: Vec<(String, String, SocketAddr)> = found
                .iter()
                .filter(|h| ours.is_none_or(|p| h.preference < p))
                .flat_map(|h| {
                    h.addrs().iter().map(move |a| {
                        let what = format!("MX host {}", h.name);
                        (what, h.name.clone(), SocketAddr::new(*a, port))
                    })
                })
                .collect();
            if !targets.is_empty() {
                let _ = writeln!(
                    out,
                    "\nSMTP check of the {} (port {port}):",
                    if ours.is_some() {
                        "more preferred hosts"
                    } else {
                        "MX hosts"
                    }
                );
            }
            targets
        }
    };
    let labels: Vec<String> = probes
        .iter()
        .map(|(what, _, addr)| format!("{what} {addr}"))
        .collect();
    let width = labels.iter().map(String::len).max().unwrap_or(0);
    // The TLS policy delivery applies to this domain, and its trust anchors.
    let policy = config
        .partner(&domain)
        .and_then(|p| p.tls)
        .unwrap_or(config.delivery.tls);
    let connectors = crate::tls::client::Connectors::new(&config.delivery.tls_ca, true);
    if !probes.is_empty() {
        let _ = writeln!(out, "  (TLS policy toward them: tls = {policy})");
    }
    let mut tlsa_done = std::collections::HashSet::new();
    let mut seen = Vec::new();
    for ((what, host, addr), label) in probes.iter().zip(&labels) {
        match smtp_probe(*addr, timeout).await {
            Ok(banner) => {
                let _ = writeln!(out, "  {label:<width$}  OK    {banner}");
                match &connectors {
                    Ok(c) => {
                        let s = tls::check_host(
                            config,
                            c,
                            policy,
                            host,
                            *addr,
                            &mut out,
                            &mut warnings,
                        )
                        .await;
                        if host.parse::<IpAddr>().is_err() && tlsa_done.insert(host.clone()) {
                            tls::tlsa(config, &s, &resolver, host, *addr, &mut out, &mut warnings)
                                .await;
                        }
                        seen.push((host.clone(), *addr, s));
                    }
                    Err(e) => {
                        let _ = writeln!(out, "      TLS: not checked: {e}");
                    }
                }
            }
            Err(reason) => {
                seen.push((host.clone(), *addr, tls::Seen::Unknown(reason.clone())));
                let _ = writeln!(out, "  {label:<width$}  FAIL  {reason}");
                warnings.push(format!("{what} at {addr} does not answer SMTP: {reason}"));
            }
        }
    }
    if !probes.is_empty() {
        // MTA-STS applies to delivery by MX only, and only with [delivery] mta_sts.
        let applies = match config.transport(&domain) {
            crate::config::Transport::Mx if config.delivery.mta_sts => Ok(()),
            crate::config::Transport::Mx => Err("[delivery] mta_sts = false"),
            _ => Err("delivery uses the configured route"),
        };
        if !matches!(config.transport(&domain), crate::config::Transport::Mx) {
            seen.clear(); // route hosts, not MX hosts
        }
        tls::mta_sts(
            &resolver,
            connectors.as_ref().ok(),
            &domain,
            applies,
            &seen,
            &mut out,
            &mut warnings,
        )
        .await;
    }
    Ok(finish(out, warnings))
}

fn print_table(out: &mut String, hosts: &[Host]) {
    let width = hosts
        .iter()
        .map(|h| h.name.len())
        .chain([4])
        .max()
        .unwrap_or(4);
    let _ = writeln!(out, "  {:>5}  {:<width$}  ADDRESSES", "PREF", "HOST");
    for h in hosts {
        let addrs = match &h.addrs {
            Ok(a) if a.is_empty() => "(none)".to_string(),
            Ok(a) => a
                .iter()
                .map(IpAddr::to_string)
                .collect::<Vec<_>>()
                .join(", "),
            Err(_) => "(lookup failed)".to_string(),
        };
        let mark = match &h.is_self {
            Some(why) => format!("  <- this server ({why})"),
            None => String::new(),
        };
        let _ = writeln!(
            out,
            "  {:>5}  {:<width$}  {addrs}{mark}",
            h.preference, h.name
        );
    }
}

/// The warnings and the exit status close the report.
fn finish(mut out: String, warnings: Vec<String>) -> Report {
    if warnings.is_empty() {
        let _ = writeln!(out, "\nNo warnings (exit status 0).");
    } else {
        let _ = writeln!(out, "\nWarnings:");
        for w in &warnings {
            let _ = writeln!(out, "  - {w}");
        }
        let _ = writeln!(
            out,
            "{} warning{} (exit status 1).",
            warnings.len(),
            if warnings.len() == 1 { "" } else { "s" }
        );
    }
    Report {
        text: out,
        warnings,
    }
}

/// The /24 that holds every IPv4 address of every MX host, when there are two hosts or more
/// with IPv4 addresses.
fn shared_slash24(hosts: &[Host]) -> Option<ipnet::Ipv4Net> {
    let v4: Vec<Vec<Ipv4Addr>> = hosts
        .iter()
        .map(|h| {
            h.addrs()
                .iter()
                .filter_map(|a| match a {
                    IpAddr::V4(a) => Some(*a),
                    IpAddr::V6(_) => None,
                })
                .collect::<Vec<_>>()
        })
        .filter(|a| !a.is_empty())
        .collect();
    if v4.len() < 2 {
        return None;
    }
    let net = ipnet::Ipv4Net::new(v4[0][0], 24).ok()?.trunc();
    v4.iter().flatten().all(|a| net.contains(a)).then_some(net)
}

/// Connects, reads the banner, says QUIT. The banner's first line, or why not.
async fn smtp_probe(addr: SocketAddr, timeout: Duration) -> Result<String, String> {
    let limit = humantime::format_duration(timeout);
    let stream = tokio::time::timeout(timeout, TcpStream::connect(addr))
        .await
        .map_err(|_| format!("no connection within {limit}"))?
        .map_err(|e| format!("cannot connect: {e}"))?;
    let mut conn = BufReader::new(stream);
    let banner = tokio::time::timeout(timeout, read_reply(&mut conn))
        .await
        .map_err(|_| format!("no banner within {limit}"))??;
    if !banner.starts_with("220") {
        return Err(format!("banner is not 220: {banner}"));
    }
    let _ = tokio::time::timeout(timeout, async {
        conn.get_mut().write_all(b"QUIT\r\n").await.ok()?;
        read_reply(&mut conn).await.ok()
    })
    .await;
    Ok(banner)
}

/// Reads one (possibly multi-line) SMTP reply; returns its first line.
async fn read_reply(conn: &mut BufReader<TcpStream>) -> Result<String, String> {
    let mut first = None;
    for _ in 0..100 {
        let mut line = String::new();
        let n = (&mut *conn)
            .take(1024)
            .read_line(&mut line)
            .await
            .map_err(|e| format!("read error: {e}"))?;
        if n == 0 {
            return Err("connection closed without a reply".into());
        }
        let line = line.trim_end().to_string();
        let last = line.as_bytes().get(3) != Some(&b'-');
        let first = first.get_or_insert_with(|| line.chars().take(100).collect::<String>());
        if last {
            return Ok(first.clone());
        }
    }
    Err("reply of more than 100 lines".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(name: &str, addrs: &[&str]) -> Host {
        Host {
            preference: 10,
            name: name.into(),
            addrs: Ok(addrs.iter().map(|a| a.parse().unwrap()).collect()),
            is_self: None,
        }
    }

    #[test]
    fn mx_hosts_in_one_slash_24_are_found() {
        let same = [
            host("a", &["192.0.2.1"]),
            host("b", &["192.0.2.200", "::1"]),
        ];
        assert_eq!(
            shared_slash24(&same).map(|n| n.to_string()).as_deref(),
            Some("192.0.2.0/24")
        );
        let apart = [host("a", &["192.0.2.1"]), host("b", &["198.51.100.7"])];
        assert_eq!(shared_slash24(&apart), None);
        let one_apart = [
            host("a", &["192.0.2.1"]),
            host("b", &["192.0.2.2", "198.51.100.7"]),
        ];
        assert_eq!(shared_slash24(&one_apart), None);
        // One host alone, or the others without IPv4: nothing to compare.
        assert_eq!(shared_slash24(&[host("a", &["192.0.2.1"])]), None);
        assert_eq!(
            shared_slash24(&[host("a", &["192.0.2.1"]), host("b", &["2001:db8::1"])]),
            None
        );
    }

    #[test]
    fn the_report_ends_with_the_warnings_and_the_exit_status() {
        let r = finish(String::new(), vec![]);
        assert!(r.text.contains("No warnings (exit status 0)"), "{}", r.text);
        let r = finish(String::new(), vec!["x".into(), "y".into()]);
        assert!(r.text.contains("  - x\n  - y\n2 warnings (exit status 1)"));
    }
}
