//! DANE for outbound SMTP (RFC 7672, RFC 6698, RFC 7671): `[delivery] dane`.
//!
//! For each next hop named by a DNS name (not an address), before connecting:
//! 1. The DNSSEC status of the host's address records: an `A` query with the DO bit to the
//!    validating resolver (`[delivery] nameservers`, else the first of `/etc/resolv.conf`).
//!    Without the AD bit in the answer, DANE does not apply to the host (RFC 7672 2.2.2).
//! 2. The TLSA RRset at `_PORT._tcp.HOST.` (PORT is the port delivery connects to, 25 for
//!    MX hosts by default), the same way. Trusted only with the AD bit set by the resolver
//!    (as Postfix with a validating resolver). The MX RRset's own status is not checked:
//!    the TLSA base domain is always the host name delivery connects to.
//!
//! What that comes to ([`HostDane`]):
//! - insecure answers, or a secure "no such name"/"no records": DANE does not apply, the
//!   `tls` policy does;
//! - a failed lookup (SERVFAIL, timeout): the host's DANE status is unknown and the host is
//!   skipped with `4.7.5` (RFC 7672 2.2), never tried in clear;
//! - a secure RRset with no usable record (only usages 0/1, unknown selectors or matching
//!   types): mandatory TLS without authentication, as `encrypt` (RFC 7672 2.2);
//! - usable records: mandatory STARTTLS, the certificate checked against them
//!   ([`DaneVerifier`]); no STARTTLS, a failed handshake or no match defers with `4.7.5`.
//!
//! Matching (RFC 7671 5, RFC 7672 3.1): DANE-EE(3) matches the leaf (selector 0: the whole
//! certificate, 1: its SubjectPublicKeyInfo; matching 0: exact, 1: SHA-256, 2: SHA-512)
//! with no name or expiry check. DANE-TA(2) finds a certificate of the presented chain that
//! matches and verifies the leaf up to it with webpki, that certificate the only trust
//! anchor, and the leaf's name against the host's name.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hickory_resolver::proto::op::{Edns, Message, MessageType, OpCode, Query, ResponseCode};
use hickory_resolver::proto::rr::{RData, RecordType};
use hickory_resolver::Name;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_rustls::TlsConnector;

/// How long one DNS query may take, and how often it is tried per server.
const QUERY_TIMEOUT: Duration = Duration::from_secs(2);
const QUERY_TRIES: usize = 2;
/// The EDNS UDP payload we advertise (the DNS flag day 2020 value).
const MAX_PAYLOAD: u16 = 1232;
/// At most this many resolvers are asked, in order.
const MAX_SERVERS: usize = 3;

/// One TLSA record (RFC 6698 2.1).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tlsa {
    pub usage: u8,
    pub selector: u8,
    pub matching: u8,
    pub data: Vec<u8>,
}

impl Tlsa {
    /// Usable for SMTP (RFC 7672 3.1): DANE-TA(2) or DANE-EE(3), selector 0 or 1, matching
    /// 0, 1 or 2 (with data of the digest's length).
    pub fn is_usable(&self) -> bool {
        matches!(self.usage, 2 | 3)
            && matches!(self.selector, 0 | 1)
            && match self.matching {
                0 => !self.data.is_empty(),
                1 => self.data.len() == 32,
                2 => self.data.len() == 64,
                _ => false,
            }
    }

    /// Whether `cert` (DER) matches this record's selector and matching type.
    fn matches(&self, cert: &[u8]) -> bool {
        let selected = match self.selector {
            0 => cert,
            1 => match spki(cert) {
                Some(s) => s,
                None => return false,
            },
            _ => return false,
        };
        match self.matching {
            0 => selected == self.data.as_slice(),
            1 => ring::digest::digest(&ring::digest::SHA256, selected).as_ref() == self.data,
            2 => ring::digest::digest(&ring::digest::SHA512, selected).as_ref() == self.data,
            _ => false,
        }
    }
}

impl fmt::Display for Tlsa {
    /// `3 1 1 0123abcd…` (the data in hex, at most 32 bytes of it).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {} {} ", self.usage, self.selector, self.matching)?;
        for b in self.data.iter().take(32) {
            write!(f, "{b:02x}")?;
        }
        if self.data.len() > 32 {
            f.write_str("…")?;
        }
        Ok(())
    }
}

/// One DER element at the start of `b`: its contents, the whole element (tag and length
/// included) and what follows it.
fn der_element(b: &[u8]) -> Option<(&[u8], &[u8], &[u8])> {
    let (_, rest) = b.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, header) = if first < 0x80 {
        (first as usize, 2)
    } else {
        let n = (first & 0x7f) as usize;
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let len = rest[..n].iter().fold(0usize, |l, &d| (l << 8) | d as usize);
        (len, 2 + n)
    };
    let end = header.checked_add(len)?;
    (b.len() >= end).then(|| (&b[header..end], &b[..end], &b[end..]))
}

/// The SubjectPublicKeyInfo of an X.509 certificate, DER, tag and length included
/// (RFC 5280 4.1: Certificate, TBSCertificate, [0] version, serialNumber, signature,
/// issuer, validity, subject, subjectPublicKeyInfo).
pub fn spki(cert: &[u8]) -> Option<&[u8]> {
    let (cert, _, _) = der_element(cert)?;
    let (mut tbs, _, _) = der_element(cert)?;
    if tbs.first() == Some(&0xa0) {
        tbs = der_element(tbs)?.2;
    }
    for _ in 0..5 {
        tbs = der_element(tbs)?.2; // serialNumber, signature, issuer, validity, subject
    }
    if tbs.first() != Some(&0x30) {
        return None;
    }
    Some(der_element(tbs)?.1)
}

/// Checks the presented `chain` (leaf first) against usable `records`: `Ok` names the
/// record that matched, `Err` says why none did.
pub fn check_chain(
    records: &[Tlsa],
    chain: &[CertificateDer<'_>],
    name: &ServerName<'_>,
    now: UnixTime,
) -> Result<String, String> {
    let Some((leaf, rest)) = chain.split_first() else {
        return Err("no certificate presented".into());
    };
    let algorithms = super::provider().signature_verification_algorithms.all;
    let mut ta_failure = None;
    for r in records.iter().filter(|r| r.is_usable()) {
        match r.usage {
            3 if r.matches(leaf.as_ref()) => return Ok(format!("DANE-EE {r}")),
            2 => {
                let Some(at) = chain.iter().position(|c| r.matches(c.as_ref())) else {
                    continue;
                };
                if at == 0 {
                    // The leaf itself as the trust anchor: nothing to chain to.
                    ta_failure = Some(format!(
                        "DANE-TA {r} matches the server's own certificate, not an issuer"
                    ));
                    continue;
                }
                let anchor = match webpki::anchor_from_trusted_cert(&chain[at]) {
                    Ok(a) => a,
                    Err(e) => {
                        ta_failure = Some(format!("DANE-TA {r}: unusable trust anchor: {e}"));
                        continue;
                    }
                };
                let checked = webpki::EndEntityCert::try_from(leaf)
                    .map_err(|e| format!("unreadable certificate: {e}"))
                    .and_then(|ee| {
                        ee.verify_for_usage(
                            algorithms,
                            &[anchor],
                            &rest[..at - 1],
                            now,
                            webpki::KeyUsage::server_auth(),
                            None,
                            None,
                        )
                        .map_err(|e| format!("chain to the DANE-TA certificate: {e}"))?;
                        ee.verify_is_valid_for_subject_name(name)
                            .map_err(|e| format!("name check for {}: {e}", name.to_str()))
                    });
                match checked {
                    Ok(()) => return Ok(format!("DANE-TA {r}")),
                    Err(e) => ta_failure = Some(format!("DANE-TA {r}: {e}")),
                }
            }
            _ => {}
        }
    }
    Err(match ta_failure {
        Some(e) => format!("TLSA records did not match the certificate chain ({e})"),
        None => "TLSA records did not match the certificate chain".to_string(),
    })
}

/// A rustls verifier that checks the server's chain against TLSA records (and the
/// handshake signatures with the leaf's key, as any verifier must). Why the last chain did
/// not match is kept for the error message ([`DaneVerifier::failure`]).
#[derive(Debug)]
pub struct DaneVerifier {
    records: Arc<Vec<Tlsa>>,
    provider: Arc<CryptoProvider>,
    failure: Mutex<Option<String>>,
    matched: Mutex<Option<String>>,
}

impl DaneVerifier {
    pub fn new(records: Arc<Vec<Tlsa>>) -> DaneVerifier {
        DaneVerifier {
            records,
            provider: super::provider(),
            failure: Mutex::new(None),
            matched: Mutex::new(None),
        }
    }

    /// Why the presented chain did not match, after a failed handshake.
    pub fn failure(&self) -> Option<String> {
        self.failure
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The record that matched, after a successful handshake.
    pub fn matched(&self) -> Option<String> {
        self.matched
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

impl ServerCertVerifier for DaneVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let mut chain = Vec::with_capacity(1 + intermediates.len());
        chain.push(end_entity.clone());
        chain.extend(intermediates.iter().cloned());
        match check_chain(&self.records, &chain, server_name, now) {
            Ok(how) => {
                *self.matched.lock().unwrap_or_else(|p| p.into_inner()) = Some(how);
                Ok(ServerCertVerified::assertion())
            }
            Err(why) => {
                *self.failure.lock().unwrap_or_else(|p| p.into_inner()) = Some(why);
                Err(rustls::Error::InvalidCertificate(
                    rustls::CertificateError::ApplicationVerificationFailure,
                ))
            }
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// A connector for one connection that checks the server against `records`, and its
/// verifier (to read why a handshake failed).
pub fn connector(records: Arc<Vec<Tlsa>>) -> Result<(TlsConnector, Arc<DaneVerifier>), String> {
    let verifier = Arc::new(DaneVerifier::new(records));
    let config = rustls::ClientConfig::builder_with_provider(super::provider())
        .with_protocol_versions(super::VERSIONS)
        .map_err(|e| e.to_string())?
        .dangerous()
        .with_custom_certificate_verifier(verifier.clone())
        .with_no_client_auth();
    Ok((TlsConnector::from(Arc::new(config)), verifier))
}

/// What DANE says about one next hop.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HostDane {
    /// DANE does not apply (why, for the transcript): the `tls` policy does.
    NotApplicable(String),
    /// A secure TLSA RRset without a usable record: TLS is mandatory, not authenticated.
    Encrypt(Vec<Tlsa>),
    /// Usable records (only those): STARTTLS is mandatory and must match one of them.
    Records(Arc<Vec<Tlsa>>),
    /// The lookup failed: the host's DANE status is unknown, skip it with `4.7.5`.
    Unknown(String),
}

/// The resolvers DANE asks: `[delivery] nameservers`, else the system's.
pub fn servers(nameservers: &[String]) -> Vec<SocketAddr> {
    if nameservers.is_empty() {
        return match hickory_resolver::system_conf::read_system_conf() {
            Ok((c, _)) => {
                let mut out: Vec<SocketAddr> = Vec::new();
                for ns in c.name_servers() {
                    if !out.contains(&ns.socket_addr) {
                        out.push(ns.socket_addr);
                    }
                }
                out
            }
            Err(_) => Vec::new(),
        };
    }
    nameservers
        .iter()
        .filter_map(|ns| crate::config::parse_listen(ns).ok())
        .collect()
}

/// Whether `host` is an address (an address literal or a bare IP): DANE never applies.
pub fn is_address(host: &str) -> bool {
    let h = host.trim_start_matches('[').trim_end_matches(']');
    let h = h.strip_prefix("IPv6:").unwrap_or(h);
    h.parse::<IpAddr>().is_ok()
}

/// The TLSA base name for `host` at `port`: `_PORT._tcp.HOST.`.
pub fn tlsa_name(host: &str, port: u16) -> String {
    format!("_{port}._tcp.{}.", host.trim_end_matches('.'))
}

/// A DNS answer and whether the resolver vouched for it (AD).
#[derive(Debug)]
pub struct Answer {
    pub code: ResponseCode,
    pub secure: bool,
    pub records: Vec<Tlsa>,
    /// How many answer records of the asked type there were (any type).
    pub count: usize,
}

/// Asks the resolvers for `name`/`rtype` with DO and AD set (RFC 6840 5.7): the first
/// answer with NOERROR or NXDOMAIN, else the last failure.
pub async fn query(
    servers: &[SocketAddr],
    name: &str,
    rtype: RecordType,
) -> Result<Answer, String> {
    let mut qname = Name::from_utf8(name.trim_end_matches('.'))
        .map_err(|e| format!("{name:?} is not a domain name: {e}"))?;
    qname.set_fqdn(true);
    if servers.is_empty() {
        return Err("no nameserver to ask".into());
    }
    let mut last = String::new();
    for server in servers.iter().take(MAX_SERVERS) {
        for _ in 0..QUERY_TRIES {
            match ask(*server, &qname, rtype).await {
                Ok(m) => match m.response_code() {
                    ResponseCode::NoError | ResponseCode::NXDomain => {
                        let records: Vec<Tlsa> = m
                            .answers()
                            .iter()
                            .filter_map(|r| match r.data() {
                                RData::TLSA(t) => Some(Tlsa {
                                    usage: t.cert_usage().into(),
                                    selector: t.selector().into(),
                                    matching: t.matching().into(),
                                    data: t.cert_data().to_vec(),
                                }),
                                _ => None,
                            })
                            .collect();
                        let count = m
                            .answers()
                            .iter()
                            .filter(|r| r.record_type() == rtype)
                            .count();
                        return Ok(Answer {
                            code: m.response_code(),
                            secure: m.authentic_data(),
                            records,
                            count,
                        });
                    }
                    code => {
                        // The resolver's considered answer (SERVFAIL for bogus data):
                        // asking it again is no use.
                        last = format!("{server} answered {}", rcode_name(code));
                        break;
                    }
                },
                Err(e) => last = format!("{server}: {e}"),
            }
        }
    }
    Err(last)
}

/// A response code as DNS tools print it (`SERVFAIL`, `REFUSED`).
fn rcode_name(code: ResponseCode) -> String {
    match code {
        ResponseCode::ServFail => "SERVFAIL".into(),
        ResponseCode::Refused => "REFUSED".into(),
        ResponseCode::NotImp => "NOTIMP".into(),
        ResponseCode::FormErr => "FORMERR".into(),
        other => format!("{other} (rcode {})", u16::from(other)),
    }
}

/// One query to one server: UDP, then TCP when the answer is truncated.
async fn ask(server: SocketAddr, name: &Name, rtype: RecordType) -> Result<Message, String> {
    let id: u16 = rand::random();
    let mut msg = Message::new();
    msg.set_id(id)
        .set_message_type(MessageType::Query)
        .set_op_code(OpCode::Query)
        .set_recursion_desired(true)
        .set_authentic_data(true);
    msg.add_query(Query::query(name.clone(), rtype));
    let mut edns = Edns::new();
    edns.set_dnssec_ok(true).set_max_payload(MAX_PAYLOAD);
    msg.set_edns(edns);
    let wire = msg.to_vec().map_err(|e| e.to_string())?;
    let udp = tokio::time::timeout(QUERY_TIMEOUT, async {
        let bind: SocketAddr = if server.is_ipv4() {
            "0.0.0.0:0".parse().expect("an address")
        } else {
            "[::]:0".parse().expect("an address")
        };
        let sock = tokio::net::UdpSocket::bind(bind).await?;
        sock.connect(server).await?;
        sock.send(&wire).await?;
        let mut buf = vec![0u8; 65535];
        // Bounded: a stray datagram with another id is skipped, a few times at most.
        for _ in 0..8 {
            let n = sock.recv(&mut buf).await?;
            if let Ok(m) = Message::from_vec(&buf[..n]) {
                if m.id() == id && m.message_type() == MessageType::Response {
                    return Ok(m);
                }
            }
        }
        Err(std::io::Error::other("no matching answer"))
    })
    .await
    .map_err(|_| "timed out".to_string())?
    .map_err(|e| e.to_string())?;
    if !udp.truncated() {
        return Ok(udp);
    }
    tokio::time::timeout(QUERY_TIMEOUT, async {
        let mut tcp = tokio::net::TcpStream::connect(server).await?;
        let mut framed = Vec::with_capacity(wire.len() + 2);
        framed.extend_from_slice(&u16::try_from(wire.len()).unwrap_or(0).to_be_bytes());
        framed.extend_from_slice(&wire);
        tcp.write_all(&framed).await?;
        let len = tcp.read_u16().await? as usize;
        let mut buf = vec![0u8; len];
        tcp.read_exact(&mut buf).await?;
        let m = Message::from_vec(&buf).map_err(std::io::Error::other)?;
        if m.id() != id {
            return Err(std::io::Error::other("answer with another id"));
        }
        Ok(m)
    })
    .await
    .map_err(|_| "timed out over TCP".to_string())?
    .map_err(|e: std::io::Error| format!("over TCP: {e}"))
}

/// What DANE says about `host` at `port` (see the module docs).
pub async fn host_dane(servers: &[SocketAddr], host: &str, port: u16) -> HostDane {
    if is_address(host) {
        return HostDane::NotApplicable(format!("{host} is an address"));
    }
    let host = host.trim_end_matches('.');
    match query(servers, host, RecordType::A).await {
        Ok(a) if a.code == ResponseCode::NoError && a.secure => {}
        Ok(a) if a.code == ResponseCode::NoError => {
            return HostDane::NotApplicable(format!(
                "the address records of {host} are not DNSSEC-secure"
            ))
        }
        Ok(_) => return HostDane::NotApplicable(format!("{host} has no address records in DNS")),
        Err(e) => {
            return HostDane::Unknown(format!(
                "DNSSEC status of the address records of {host} unknown: {e}"
            ))
        }
    }
    let name = tlsa_name(host, port);
    match query(servers, &name, RecordType::TLSA).await {
        Err(e) => HostDane::Unknown(format!("TLSA lookup for {name} failed: {e}")),
        Ok(a) if !a.secure => {
            HostDane::NotApplicable(format!("the TLSA answer for {name} is not DNSSEC-secure"))
        }
        Ok(a) if a.records.is_empty() => {
            HostDane::NotApplicable(format!("no TLSA records at {name} (DNSSEC-secure)"))
        }
        Ok(a) => {
            let usable: Vec<Tlsa> = a
                .records
                .iter()
                .filter(|r| r.is_usable())
                .cloned()
                .collect();
            if usable.is_empty() {
                HostDane::Encrypt(a.records)
            } else {
                HostDane::Records(Arc::new(usable))
            }
        }
    }
}

/// The DANE decisions of one delivery attempt, one lookup per host and port.
#[derive(Default)]
pub struct Cache(Vec<(String, u16, HostDane)>);

/// The client settings for a connection to `host` at `port` under DANE (`base` is the
/// policy's): `Ok` with a line for the transcript, `Err` to skip the host with `4.7.5`.
pub async fn apply(
    base: &crate::delivery::client::ClientConfig,
    servers: &[SocketAddr],
    host: &str,
    port: u16,
    cache: &mut Cache,
) -> Result<(crate::delivery::client::ClientConfig, String), String> {
    let found = match cache.0.iter().find(|(h, p, _)| h == host && *p == port) {
        Some((_, _, d)) => d.clone(),
        None => {
            let d = host_dane(servers, host, port).await;
            cache.0.push((host.to_string(), port, d.clone()));
            d
        }
    };
    let name = tlsa_name(host, port);
    match found {
        HostDane::NotApplicable(why) => Ok((base.clone(), format!("DANE not applied: {why}"))),
        HostDane::Unknown(why) => Err(format!("DANE: {why}; not trying {host} (RFC 7672 2.2)")),
        HostDane::Encrypt(records) => {
            let mut cfg = base.clone();
            if cfg.tls.allows_clear() {
                cfg.tls = super::client::TlsPolicy::Encrypt;
            }
            Ok((
                cfg,
                format!(
                    "DANE: {} DNSSEC-secure TLSA record(s) at {name}, none usable: TLS required, not authenticated",
                    records.len()
                ),
            ))
        }
        HostDane::Records(records) => {
            let line = format!(
                "DANE: {} usable DNSSEC-secure TLSA record(s) at {name}: STARTTLS required, certificate checked against them",
                records.len()
            );
            Ok((
                crate::delivery::client::ClientConfig {
                    dane: Some(records),
                    ..base.clone()
                },
                line,
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};

    struct Chain {
        ca: Vec<u8>,
        leaf: Vec<u8>,
        leaf_spki: Vec<u8>,
    }

    fn chain(names: &[&str]) -> Chain {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, "dane test CA");
        let issuer = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
        let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
        let mut params = CertificateParams::new(names).unwrap();
        params.distinguished_name.push(DnType::CommonName, "leaf");
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &issuer).unwrap();
        Chain {
            ca: issuer.der().to_vec(),
            leaf: cert.der().to_vec(),
            leaf_spki: rcgen::PublicKeyData::subject_public_key_info(&key),
        }
    }

    fn rec(usage: u8, selector: u8, matching: u8, data: &[u8]) -> Tlsa {
        Tlsa {
            usage,
            selector,
            matching,
            data: data.to_vec(),
        }
    }

    fn sha256(b: &[u8]) -> Vec<u8> {
        ring::digest::digest(&ring::digest::SHA256, b)
            .as_ref()
            .to_vec()
    }

    fn sha512(b: &[u8]) -> Vec<u8> {
        ring::digest::digest(&ring::digest::SHA512, b)
            .as_ref()
            .to_vec()
    }

    fn check(records: &[Tlsa], c: &Chain, name: &str) -> Result<String, String> {
        let chain = vec![
            CertificateDer::from(c.leaf.clone()),
            CertificateDer::from(c.ca.clone()),
        ];
        let name = ServerName::try_from(name.to_string()).unwrap();
        check_chain(records, &chain, &name, UnixTime::now())
    }

    #[test]
    fn dane_spki_is_the_public_key_info_of_the_certificate() {
        let c = chain(&["mx.example.test"]);
        assert_eq!(spki(&c.leaf), Some(c.leaf_spki.as_slice()));
        assert_eq!(spki(b"\x30\x03\x02\x01"), None);
        assert_eq!(spki(b""), None);
        assert_eq!(spki(&c.leaf[..c.leaf.len() / 2]), None);
    }

    #[test]
    fn dane_ee_matches_every_selector_and_matching_type_and_ignores_the_name() {
        let c = chain(&["mx.example.test"]);
        for r in [
            rec(3, 0, 0, &c.leaf),
            rec(3, 0, 1, &sha256(&c.leaf)),
            rec(3, 0, 2, &sha512(&c.leaf)),
            rec(3, 1, 0, &c.leaf_spki),
            rec(3, 1, 1, &sha256(&c.leaf_spki)),
            rec(3, 1, 2, &sha512(&c.leaf_spki)),
        ] {
            assert!(r.is_usable(), "{r}");
            // DANE-EE: no name check (RFC 7672 3.1.1).
            let ok = check(std::slice::from_ref(&r), &c, "other.example.net");
            assert!(
                ok.as_ref().is_ok_and(|m| m.starts_with("DANE-EE")),
                "{r}: {ok:?}"
            );
        }
        let mut wrong = sha256(&c.leaf_spki);
        wrong[0] ^= 1;
        let err = check(&[rec(3, 1, 1, &wrong)], &c, "mx.example.test").unwrap_err();
        assert!(err.contains("TLSA records did not match"), "{err}");
        // The CA's key in a DANE-EE record does not match the leaf.
        let ca_spki = spki(&c.ca).unwrap().to_vec();
        assert!(check(&[rec(3, 1, 1, &sha256(&ca_spki))], &c, "mx.example.test").is_err());
        // One matching record among others is enough.
        let ok = check(
            &[rec(3, 1, 1, &wrong), rec(3, 0, 1, &sha256(&c.leaf))],
            &c,
            "mx.example.test",
        );
        assert!(ok.is_ok(), "{ok:?}");
    }

    #[test]
    fn dane_ta_chains_the_leaf_to_the_matching_issuer_and_checks_the_name() {
        let c = chain(&["mx.example.test"]);
        let ca_spki = spki(&c.ca).unwrap().to_vec();
        for r in [
            rec(2, 0, 1, &sha256(&c.ca)),
            rec(2, 1, 1, &sha256(&ca_spki)),
            rec(2, 0, 0, &c.ca),
        ] {
            let ok = check(std::slice::from_ref(&r), &c, "mx.example.test");
            assert!(
                ok.as_ref().is_ok_and(|m| m.starts_with("DANE-TA")),
                "{r}: {ok:?}"
            );
        }
        // The name is checked for DANE-TA.
        let err = check(&[rec(2, 0, 1, &sha256(&c.ca))], &c, "other.example.net").unwrap_err();
        assert!(err.contains("name check"), "{err}");
        // A DANE-TA record naming the leaf is no trust anchor.
        let err = check(&[rec(2, 0, 1, &sha256(&c.leaf))], &c, "mx.example.test").unwrap_err();
        assert!(err.contains("not an issuer"), "{err}");
        // Another CA's certificate in the chain position: the signature does not verify.
        let other = chain(&["mx.example.test"]);
        let mixed = vec![
            CertificateDer::from(c.leaf.clone()),
            CertificateDer::from(other.ca.clone()),
        ];
        let name = ServerName::try_from("mx.example.test").unwrap();
        let err = check_chain(
            &[rec(2, 0, 1, &sha256(&other.ca))],
            &mixed,
            &name,
            UnixTime::now(),
        )
        .unwrap_err();
        assert!(err.contains("chain to the DANE-TA certificate"), "{err}");
        // Only the leaf presented: the TA record finds nothing to match.
        let err = check_chain(
            &[rec(2, 0, 1, &sha256(&c.ca))],
            &[CertificateDer::from(c.leaf.clone())],
            &name,
            UnixTime::now(),
        )
        .unwrap_err();
        assert!(err.contains("did not match"), "{err}");
        assert!(check_chain(&[rec(3, 0, 0, &c.leaf)], &[], &name, UnixTime::now()).is_err());
    }

    #[test]
    fn dane_unusable_records_are_recognised_and_never_match() {
        let c = chain(&["mx.example.test"]);
        let h = sha256(&c.leaf);
        for r in [
            rec(0, 0, 1, &h),       // PKIX-TA: not for SMTP
            rec(1, 0, 1, &h),       // PKIX-EE: not for SMTP
            rec(4, 0, 1, &h),       // unknown usage
            rec(3, 2, 1, &h),       // unknown selector
            rec(3, 0, 3, &h),       // unknown matching type
            rec(3, 0, 1, &h[..31]), // a SHA-256 of the wrong length
            rec(3, 0, 2, &h),       // a SHA-512 of the wrong length
            rec(3, 0, 0, &[]),      // nothing to compare
        ] {
            assert!(!r.is_usable(), "{r}");
            assert!(
                check(std::slice::from_ref(&r), &c, "mx.example.test").is_err(),
                "{r}"
            );
        }
    }

    #[test]
    fn dane_names_addresses_and_display() {
        assert!(is_address("127.0.0.1") && is_address("[192.0.2.1]") && is_address("[IPv6:::1]"));
        assert!(!is_address("mx.example.test"));
        assert_eq!(
            tlsa_name("mx.example.test.", 25),
            "_25._tcp.mx.example.test."
        );
        assert_eq!(rec(3, 1, 1, &[0xab, 0x01]).to_string(), "3 1 1 ab01");
        assert!(rec(3, 0, 0, &[0; 40]).to_string().ends_with('…'));
        assert_eq!(
            servers(&["127.0.0.1:5353".into(), "bogus".into()]),
            vec!["127.0.0.1:5353".parse::<SocketAddr>().unwrap()]
        );
    }

    /// A resolver on 127.0.0.1: over UDP a truncated answer, over TCP (same port) one TLSA
    /// record, with AD as `ad` says. Returns its address.
    async fn truncating_resolver(ad: bool) -> SocketAddr {
        use hickory_resolver::proto::rr::rdata::tlsa::{CertUsage, Matching, Selector, TLSA};
        use hickory_resolver::proto::rr::Record;
        let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = tcp.local_addr().unwrap();
        let udp = tokio::net::UdpSocket::bind(addr).await.unwrap();
        let answer = move |q: &Message, truncated: bool| {
            let mut m = Message::new();
            m.set_id(q.id())
                .set_message_type(MessageType::Response)
                .set_op_code(OpCode::Query)
                .set_recursion_available(true)
                .set_authentic_data(ad)
                .set_truncated(truncated);
            m.add_queries(q.queries().iter().cloned());
            if !truncated {
                let name = q.queries()[0].name().clone();
                m.add_answer(Record::from_rdata(
                    name,
                    60,
                    RData::TLSA(TLSA::new(
                        CertUsage::DaneEe,
                        Selector::Spki,
                        Matching::Sha256,
                        vec![7; 32],
                    )),
                ));
            }
            m.to_vec().unwrap()
        };
        tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            for _ in 0..4 {
                let Ok((n, from)) = udp.recv_from(&mut buf).await else {
                    return;
                };
                let q = Message::from_vec(&buf[..n]).unwrap();
                // What the query asked for: DO, AD and RD set, EDNS payload 1232.
                assert!(q.authentic_data() && q.recursion_desired());
                let edns = q.extensions().as_ref().expect("EDNS");
                assert!(edns.flags().dnssec_ok && edns.max_payload() == MAX_PAYLOAD);
                let _ = udp.send_to(&answer(&q, true), from).await;
            }
        });
        tokio::spawn(async move {
            for _ in 0..4 {
                let Ok((mut s, _)) = tcp.accept().await else {
                    return;
                };
                let len = s.read_u16().await.unwrap() as usize;
                let mut buf = vec![0u8; len];
                s.read_exact(&mut buf).await.unwrap();
                let a = answer(&Message::from_vec(&buf).unwrap(), false);
                let mut framed = (a.len() as u16).to_be_bytes().to_vec();
                framed.extend_from_slice(&a);
                s.write_all(&framed).await.unwrap();
            }
        });
        addr
    }

    #[tokio::test]
    async fn dane_truncated_answers_are_asked_again_over_tcp_and_ad_is_the_status() {
        let addr = truncating_resolver(true).await;
        let a = query(&[addr], "_25._tcp.mx.example.test", RecordType::TLSA)
            .await
            .unwrap();
        assert!(a.secure);
        assert_eq!(a.records, vec![rec(3, 1, 1, &[7; 32])]);
        let addr = truncating_resolver(false).await;
        let a = query(&[addr], "_25._tcp.mx.example.test", RecordType::TLSA)
            .await
            .unwrap();
        assert!(!a.secure && a.records.len() == 1);
    }

    #[tokio::test]
    async fn dane_lookup_without_an_answer_is_unknown_not_insecure() {
        // A UDP socket that never answers: the host's DANE status is unknown.
        let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let addr = silent.local_addr().unwrap();
        let started = std::time::Instant::now();
        let got = host_dane(&[addr], "mx.example.test", 25).await;
        assert!(
            matches!(&got, HostDane::Unknown(e) if e.contains("timed out")),
            "{got:?}"
        );
        assert!(started.elapsed() < Duration::from_secs(10));
        assert!(matches!(
            host_dane(&[addr], "192.0.2.1", 25).await,
            HostDane::NotApplicable(_)
        ));
    }
}
