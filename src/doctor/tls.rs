//! `doctor`'s TLS check of the hosts delivery uses: whether each offers STARTTLS, the TLS
//! version, the names and expiry of its certificate and whether it verifies as `verify`
//! would (to the system's roots or `tls_ca_file`, for the host's name); the TLSA records at
//! `_PORT._tcp.HOST` with their DNSSEC status and, for DANE, whether the certificate matches
//! them; the domain's MTA-STS policy, fetched, and whether the hosts checked match it and
//! meet it. Warns when the
//! policy delivery applies (`[[partner]] tls`, else `[delivery] tls`) would defer: no
//! STARTTLS under `encrypt`/`verify`, a certificate that does not verify under `verify`;
//! and when a certificate has expired or expires within [`EXPIRY_WARNING_DAYS`].

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

use crate::config::Config;
use crate::delivery::mx::Resolver;
use crate::tls::client::{server_name, Connectors, TlsPolicy};
use crate::tls::mta_sts::{self, Mode};
use spool_tools::terminal::escape_line;

/// A certificate that expires sooner than this is a warning.
pub const EXPIRY_WARNING_DAYS: i64 = 14;

/// What the TLS check of one host found.
#[derive(Debug)]
enum Found {
    /// The EHLO reply lists no STARTTLS.
    NoStartTls,
    Tls {
        version: String,
        names: Vec<String>,
        /// The certificate's notAfter, Unix seconds.
        not_after: Option<i64>,
        verified: Result<(), String>,
        /// The presented chain, the server's certificate first.
        chain: Vec<rustls::pki_types::CertificateDer<'static>>,
    },
}

/// What [`check_host`] saw of a host's TLS, for the MTA-STS check.
#[derive(Debug, Clone)]
pub enum Seen {
    /// The check failed or got no answer: why.
    Unknown(String),
    NoStartTls,
    /// STARTTLS and a handshake; whether the certificate verifies as `verify` would, and
    /// the presented chain (the server's certificate first), for the DANE check.
    Tls(
        Result<(), String>,
        Vec<rustls::pki_types::CertificateDer<'static>>,
    ),
}

/// Checks the TLS of `host` at `addr`; one indented line per finding goes to `out`.
#[allow(clippy::too_many_arguments)]
pub async fn check_host(
    config: &Config,
    connectors: &Connectors,
    policy: TlsPolicy,
    host: &str,
    addr: SocketAddr,
    out: &mut String,
    warnings: &mut Vec<String>,
) -> Seen {
    let timeout = config.delivery.connect_timeout.0;
    let found = match tokio::time::timeout(
        timeout * 3,
        starttls(config, connectors, host, addr, timeout),
    )
    .await
    {
        Ok(Ok(f)) => f,
        Ok(Err(e)) => {
            let _ = writeln!(out, "      TLS: check failed: {e}");
            if !policy.allows_clear() {
                warnings.push(format!(
                    "{host} at {addr}: TLS failed ({e}) and tls = {policy} needs it: delivery defers"
                ));
            }
            return Seen::Unknown(e);
        }
        Err(_) => {
            let _ = writeln!(out, "      TLS: no answer in time");
            return Seen::Unknown("no answer in time".into());
        }
    };
    match found {
        Found::NoStartTls => {
            let _ = writeln!(out, "      TLS: STARTTLS not offered");
            if !policy.allows_clear() {
                warnings.push(format!(
                    "{host} at {addr} does not offer STARTTLS and tls = {policy} needs it: \
                     delivery to it defers"
                ));
            }
            Seen::NoStartTls
        }
        Found::Tls {
            version,
            names,
            not_after,
            verified,
            chain,
        } => {
            let names = if names.is_empty() {
                "no DNS name in subjectAltName".to_string()
            } else {
                names.join(", ")
            };
            let expiry = match not_after {
                Some(t) => {
                    let days = (t - chrono::Utc::now().timestamp()).div_euclid(86_400);
                    let date = chrono::DateTime::from_timestamp(t, 0)
                        .map(|d| d.format("%Y-%m-%d").to_string())
                        .unwrap_or_default();
                    if days < 0 {
                        warnings.push(format!(
                            "the certificate of {host} at {addr} expired on {date}"
                        ));
                    } else if days < EXPIRY_WARNING_DAYS {
                        warnings.push(format!(
                            "the certificate of {host} at {addr} expires on {date}, in {days} days"
                        ));
                    }
                    format!("expires {date} ({days} days)")
                }
                None => "expiry unreadable".to_string(),
            };
            let check = match &verified {
                Ok(()) => "verified (chain to a trust anchor, name matches)".to_string(),
                Err(e) => format!("NOT verified: {e}"),
            };
            let _ = writeln!(
                out,
                "      TLS: STARTTLS, {version}, certificate for {names}; {expiry}; {check}"
            );
            if let (Err(e), TlsPolicy::Verify) = (&verified, policy) {
                warnings.push(format!(
                    "the certificate of {host} at {addr} does not verify ({e}) and tls = verify: \
                     delivery to it defers"
                ));
            }
            Seen::Tls(verified, chain)
        }
    }
}

/// The TLSA records of `host` at `addr`'s port (`_PORT._tcp.HOST`), whether the resolver
/// vouches for them (AD), and what DANE makes of them: for usable DNSSEC-secure records,
/// whether the chain `seen` (the TLS check's) matches. Warns (under `[delivery] dane`) when
/// DANE would make delivery to the host defer: a failed lookup, no STARTTLS, no match.
#[allow(clippy::too_many_arguments)]
pub async fn tlsa(
    config: &Config,
    seen: &Seen,
    resolver: &Resolver,
    host: &str,
    addr: SocketAddr,
    out: &mut String,
    warnings: &mut Vec<String>,
) {
    use crate::tls::dane::{self, HostDane};
    let name = dane::tlsa_name(host, addr.port());
    let servers = resolver.dnssec_servers();
    let line = match dane::query(
        servers,
        &name,
        hickory_resolver::proto::rr::RecordType::TLSA,
    )
    .await
    {
        Ok(a) if a.records.is_empty() && a.secure => "none (DNSSEC-secure)".to_string(),
        Ok(a) if a.records.is_empty() => "none (not DNSSEC-secure)".to_string(),
        Ok(a) => {
            let records: Vec<String> = a.records.iter().map(ToString::to_string).collect();
            format!(
                "{}, {} record(s): {}",
                if a.secure {
                    "DNSSEC-secure"
                } else {
                    "not DNSSEC-secure (DANE does not apply)"
                },
                records.len(),
                records.join(", ")
            )
        }
        Err(e) => format!("lookup failed: {e}"),
    };
    let _ = writeln!(out, "      TLSA {name}: {line}");
    let enforced = config.delivery.dane;
    let note = if enforced {
        ""
    } else {
        "; dane = false: not enforced"
    };
    let defers = |why: String, warnings: &mut Vec<String>| {
        if enforced {
            warnings.push(format!(
                "{host} at {addr} {why}: delivery to it defers (DANE)"
            ));
        }
    };
    match dane::host_dane(servers, host, addr.port()).await {
        HostDane::NotApplicable(why) => {
            if line.contains("record(s)") {
                let _ = writeln!(out, "      DANE: not applied: {why}{note}");
            }
        }
        HostDane::Unknown(why) => {
            let _ = writeln!(out, "      DANE: status unknown: {why}{note}");
            defers(format!("has no DNSSEC answer for DANE ({why})"), warnings);
        }
        HostDane::Encrypt(_) => {
            let _ = writeln!(
                out,
                "      DANE: no usable record (only DANE-TA/DANE-EE count): TLS required, not authenticated{note}"
            );
        }
        HostDane::Records(records) => {
            // The chain the TLS check above was shown: no second connection.
            match seen {
                Seen::Tls(_, chain) => {
                    let sni = server_name(host, addr.ip());
                    match dane::check_chain(
                        &records,
                        chain,
                        &sni,
                        rustls::pki_types::UnixTime::now(),
                    ) {
                        Ok(how) => {
                            let _ =
                                writeln!(out, "      DANE: the certificate matches ({how}){note}");
                        }
                        Err(e) => {
                            let _ = writeln!(
                                out,
                                "      DANE: the certificate does NOT match: {e}{note}"
                            );
                            defers(
                                "presents a certificate that does not match its DNSSEC-secure TLSA records".into(),
                                warnings,
                            );
                        }
                    }
                }
                Seen::NoStartTls => {
                    let _ = writeln!(
                        out,
                        "      DANE: STARTTLS not offered, but required by the TLSA records{note}"
                    );
                    defers(
                        "does not offer STARTTLS despite DNSSEC-secure TLSA records".into(),
                        warnings,
                    );
                }
                Seen::Unknown(e) => {
                    let _ = writeln!(out, "      DANE: TLS check failed: {e}{note}");
                    defers(
                        format!("fails TLS ({e}) despite DNSSEC-secure TLSA records"),
                        warnings,
                    );
                }
            }
        }
    }
}

/// The domain's MTA-STS policy (RFC 8461): the `_mta-sts` TXT record, then the policy
/// fetched as delivery fetches it ([`mta_sts::fetch_policy`]; `doctor` neither reads nor
/// writes the spool's cache): its mode, max_age and mx patterns, and for each host in `seen`
/// (the MX hosts checked, with what [`check_host`] saw) whether it matches. `applies`: the
/// domain is delivered by MX with `[delivery] mta_sts = true`; then an `enforce` policy that
/// would defer (a host matching no pattern, no STARTTLS, a certificate that does not verify)
/// is a warning, and so is a policy that cannot be fetched.
pub async fn mta_sts(
    resolver: &Resolver,
    connectors: Option<&Connectors>,
    domain: &str,
    applies: Result<(), &str>,
    seen: &[(String, SocketAddr, Seen)],
    out: &mut String,
    warnings: &mut Vec<String>,
) {
    let name = format!("_mta-sts.{domain}.");
    let id = match mta_sts::lookup_txt(resolver, domain).await {
        mta_sts::Txt::Id(id) => id,
        mta_sts::Txt::Nothing => {
            let _ = writeln!(out, "  MTA-STS {name}: none");
            return;
        }
        mta_sts::Txt::Unusable(e) => {
            let e = escape_line(&e);
            let _ = writeln!(
                out,
                "  MTA-STS {name}: unusable ({e}): treated as no policy"
            );
            warnings.push(format!(
                "the MTA-STS TXT record {name} is unusable ({e}): senders treat it as none"
            ));
            return;
        }
        mta_sts::Txt::Failed(e) => {
            let _ = writeln!(out, "  MTA-STS {name}: lookup failed: {}", escape_line(&e));
            return;
        }
    };
    let _ = writeln!(out, "  MTA-STS {name}: v=STSv1; id={id}");
    if let Err(why) = applies {
        let _ = writeln!(out, "    ({why}: delivery does not apply it)");
    }
    let Some(connectors) = connectors else {
        let _ = writeln!(out, "    policy: not fetched (no TLS trust anchors)");
        return;
    };
    let url = format!("https://mta-sts.{domain}/.well-known/mta-sts.txt");
    let policy = match mta_sts::fetch_policy(resolver, connectors, domain).await {
        Ok((_, policy)) => policy,
        Err(e) => {
            let e = escape_line(&e);
            let _ = writeln!(out, "    policy {url}: could not be fetched: {e}");
            if applies.is_ok() {
                warnings.push(format!(
                    "the MTA-STS policy of {domain} (id={id}) could not be fetched ({e}): \
                     delivery uses a policy cached earlier, else goes on as without MTA-STS"
                ));
            }
            return;
        }
    };
    let _ = writeln!(
        out,
        "    policy {url}: mode {}, max_age {} s, mx {}",
        policy.mode,
        policy.max_age,
        if policy.mx.is_empty() {
            "(none)".to_string()
        } else {
            policy.mx.join(", ")
        }
    );
    if policy.mode == Mode::None {
        return;
    }
    let enforce = policy.mode == Mode::Enforce && applies.is_ok();
    let mut names: Vec<&str> = Vec::new();
    for (host, _, _) in seen {
        if !names.contains(&host.as_str()) {
            names.push(host);
        }
    }
    let mut matching = 0;
    for host in &names {
        if policy.allows(host) {
            matching += 1;
            let _ = writeln!(out, "    MX host {host}: matches");
        } else {
            let _ = writeln!(out, "    MX host {host}: matches no mx pattern");
            if enforce {
                warnings.push(format!(
                    "MX host {host} matches no mx pattern of the enforced MTA-STS policy of \
                     {domain} ({}): delivery skips it",
                    policy.mx.join(", ")
                ));
            }
        }
    }
    if enforce && matching == 0 && !names.is_empty() {
        warnings.push(format!(
            "no MX host of {domain} matches its enforced MTA-STS policy: delivery defers"
        ));
    }
    if !enforce {
        return;
    }
    for (host, addr, seen) in seen {
        if !policy.allows(host) {
            continue;
        }
        match seen {
            Seen::NoStartTls => warnings.push(format!(
                "{host} at {addr} does not offer STARTTLS and the MTA-STS policy of {domain} is \
                 enforce: delivery to it defers"
            )),
            Seen::Tls(Err(e), _) => warnings.push(format!(
                "the certificate of {host} at {addr} does not verify ({e}) and the MTA-STS \
                 policy of {domain} is enforce: delivery to it defers"
            )),
            Seen::Tls(Ok(()), _) | Seen::Unknown(_) => {}
        }
    }
}

/// Greeting, EHLO, STARTTLS and the handshake (accepting any certificate, then checking the
/// chain as `verify` would), then QUIT inside TLS.
async fn starttls(
    config: &Config,
    connectors: &Connectors,
    host: &str,
    addr: SocketAddr,
    timeout: Duration,
) -> Result<Found, String> {
    let stream = tokio::time::timeout(timeout, TcpStream::connect(addr))
        .await
        .map_err(|_| "no connection in time".to_string())?
        .map_err(|e| format!("cannot connect: {e}"))?;
    let mut conn = BufReader::new(stream);
    let (code, _) = reply(&mut conn).await?;
    if code != 220 {
        return Err(format!("banner {code}"));
    }
    conn.get_mut()
        .write_all(format!("EHLO {}\r\n", config.hostname).as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    let (code, lines) = reply(&mut conn).await?;
    if code != 250 {
        return Err(format!("EHLO answered {code}"));
    }
    if !lines
        .iter()
        .any(|l| l.split_whitespace().next() == Some("STARTTLS"))
    {
        let _ = conn.get_mut().write_all(b"QUIT\r\n").await;
        return Ok(Found::NoStartTls);
    }
    conn.get_mut()
        .write_all(b"STARTTLS\r\n")
        .await
        .map_err(|e| e.to_string())?;
    let (code, _) = reply(&mut conn).await?;
    if code != 220 {
        return Err(format!("STARTTLS answered {code}"));
    }
    let name = server_name(host, addr.ip());
    let (any, _) = connectors.for_policy(TlsPolicy::Encrypt);
    let mut tls = any
        .connect(name.clone(), conn.into_inner())
        .await
        .map_err(|e| format!("handshake failed: {e}"))?;
    let (version, chain) = {
        let session = tls.get_ref().1;
        let version = crate::tls::TlsInfo::of(session).version;
        let chain: Vec<_> = session
            .peer_certificates()
            .unwrap_or_default()
            .iter()
            .map(|c| c.clone().into_owned())
            .collect();
        (version, chain)
    };
    let _ = tls.write_all(b"QUIT\r\n").await;
    let _ = tls.shutdown().await;
    let (names, not_after) = match chain.first() {
        Some(leaf) => describe(leaf.as_ref()),
        None => (Vec::new(), None),
    };
    let verified = connectors.check_chain(&chain, &name);
    Ok(Found::Tls {
        version,
        names,
        not_after,
        verified,
        chain,
    })
}

/// The DNS names (subjectAltName) and the notAfter of a certificate.
fn describe(der: &[u8]) -> (Vec<String>, Option<i64>) {
    let cert = rustls::pki_types::CertificateDer::from(der);
    let names = match webpki::EndEntityCert::try_from(&cert) {
        Ok(c) => c
            .valid_dns_names()
            .map(spool_tools::terminal::escape_line)
            .collect(),
        Err(_) => Vec::new(),
    };
    (names, not_after(der))
}

/// One DER element at the start of `b`: its tag, its contents and what follows it.
fn der_element(b: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = b.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (first as usize, rest)
    } else {
        let n = (first & 0x7f) as usize;
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let len = rest[..n].iter().fold(0usize, |l, &d| (l << 8) | d as usize);
        (len, &rest[n..])
    };
    (rest.len() >= len).then(|| (tag, &rest[..len], &rest[len..]))
}

/// The notAfter of an X.509 certificate (RFC 5280 4.1: Certificate, TBSCertificate,
/// [0] version, serialNumber, signature, issuer, validity), Unix seconds.
fn not_after(der: &[u8]) -> Option<i64> {
    let (_, cert, _) = der_element(der)?;
    let (_, mut tbs, _) = der_element(cert)?;
    let (tag, _, rest) = der_element(tbs)?;
    if tag == 0xa0 {
        tbs = rest;
    }
    for _ in 0..3 {
        tbs = der_element(tbs)?.2; // serialNumber, signature, issuer
    }
    let (_, validity, _) = der_element(tbs)?;
    let (_, _, rest) = der_element(validity)?; // notBefore
    let (tag, time, _) = der_element(rest)?;
    let time = std::str::from_utf8(time).ok()?;
    let time = match tag {
        // UTCTime: YYMMDDHHMMSSZ, years 1950-2049 (RFC 5280 4.1.2.5.1).
        0x17 => {
            let yy: u32 = time.get(..2)?.parse().ok()?;
            format!("{}{time}", if yy < 50 { "20" } else { "19" })
        }
        0x18 => time.to_string(), // GeneralizedTime: YYYYMMDDHHMMSSZ
        _ => return None,
    };
    chrono::NaiveDateTime::parse_from_str(time.trim_end_matches('Z'), "%Y%m%d%H%M%S")
        .ok()
        .map(|t| t.and_utc().timestamp())
}

/// One SMTP reply: its code and its lines' text after the code.
async fn reply<R: AsyncBufRead + Unpin>(r: &mut R) -> Result<(u16, Vec<String>), String> {
    let mut lines = Vec::new();
    for _ in 0..100 {
        let mut line = String::new();
        let n = (&mut *r)
            .take(1024)
            .read_line(&mut line)
            .await
            .map_err(|e| format!("read error: {e}"))?;
        if n == 0 {
            return Err("connection closed".into());
        }
        let line = line.trim_end();
        let code: u16 = line
            .get(..3)
            .and_then(|c| c.parse().ok())
            .ok_or_else(|| "not an SMTP reply".to_string())?;
        lines.push(line.get(4..).unwrap_or("").to_string());
        if line.as_bytes().get(3) != Some(&b'-') {
            return Ok((code, lines));
        }
    }
    Err("reply too long".into())
}
