//! The client side: the outbound TLS policy and the rustls configurations the delivery
//! client (`crate::delivery::client`) uses after its STARTTLS.
//!
//! Policies, as Postfix's `smtp_tls_security_level`:
//! - `none`: never STARTTLS.
//! - `may`: STARTTLS whenever the server offers it, any certificate; a failed handshake
//!   is retried in clear on a new connection.
//! - `encrypt`: STARTTLS is required (no clear text), any certificate.
//! - `verify`: STARTTLS is required and the certificate must chain to the system's roots
//!   or to `[delivery] tls_ca_file` and name the MX host (or the route's host).
//!
//! "Any certificate" still means a real handshake: rustls checks the server's signature
//! over the handshake with the certificate's key; only the chain and the name are not
//! checked.

use std::fmt;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};
use serde::{Deserialize, Serialize};
use tokio_rustls::TlsConnector;

/// `[delivery] tls`, `[[partner]] tls`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TlsPolicy {
    None,
    #[default]
    May,
    Encrypt,
    Verify,
}

impl TlsPolicy {
    /// Whether a delivery may go out in clear text under this policy.
    pub fn allows_clear(self) -> bool {
        matches!(self, TlsPolicy::None | TlsPolicy::May)
    }
}

impl fmt::Display for TlsPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TlsPolicy::None => "none",
            TlsPolicy::May => "may",
            TlsPolicy::Encrypt => "encrypt",
            TlsPolicy::Verify => "verify",
        })
    }
}

/// How the server's certificate was checked, for the logs (`verified=`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verified {
    /// Chain to a trust anchor and the host's name (`verify`).
    Pkix,
    /// Matched the host's DNSSEC-secure TLSA records ([`super::dane`]).
    Dane,
    /// Not checked (`may`, `encrypt`).
    None,
}

impl fmt::Display for Verified {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Verified::Pkix => "pkix",
            Verified::Dane => "dane",
            Verified::None => "none",
        })
    }
}

/// The two client configurations: one that checks nothing but the handshake, one that
/// verifies the chain and the name. Built once at start (`[delivery]` is start-only).
#[derive(Clone)]
pub struct Connectors {
    any: TlsConnector,
    verify: TlsConnector,
    /// The verifying configuration's check, for a chain already received (`doctor`).
    verifier: Option<Arc<rustls::client::WebPkiServerVerifier>>,
    /// Trust anchors in the verifying configuration.
    pub anchors: usize,
}

impl fmt::Debug for Connectors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Connectors")
            .field("anchors", &self.anchors)
            .finish()
    }
}

impl Connectors {
    /// Trust anchors: the system's roots (when `system_roots`) and `extra` (from
    /// `[delivery] tls_ca_file`).
    pub fn new(
        extra: &[CertificateDer<'static>],
        system_roots: bool,
    ) -> Result<Connectors, String> {
        let provider = super::provider();
        let mut roots = RootCertStore::empty();
        if system_roots {
            let native = rustls_native_certs::load_native_certs();
            for e in &native.errors {
                tracing::debug!("system trust anchors: {e}");
            }
            let (_, _) = roots.add_parsable_certificates(native.certs);
        }
        for cert in extra {
            roots
                .add(cert.clone())
                .map_err(|e| format!("tls_ca_file: unusable trust anchor: {e}"))?;
        }
        let anchors = roots.len();
        let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
            Arc::new(roots.clone()),
            provider.clone(),
        )
        .build()
        .ok();
        let verify = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(super::VERSIONS)
            .map_err(|e| e.to_string())?
            .with_root_certificates(roots)
            .with_no_client_auth();
        let any = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(super::VERSIONS)
            .map_err(|e| e.to_string())?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AnyCertificate(provider)))
            .with_no_client_auth();
        Ok(Connectors {
            any: TlsConnector::from(Arc::new(any)),
            verify: TlsConnector::from(Arc::new(verify)),
            verifier,
            anchors,
        })
    }

    /// Checks `chain` (the server's certificate first) as `verify` does: it must chain to
    /// a trust anchor and name `name`. `Err` says why not.
    pub fn check_chain(
        &self,
        chain: &[CertificateDer<'_>],
        name: &ServerName<'_>,
    ) -> Result<(), String> {
        let Some(verifier) = &self.verifier else {
            return Err("no trust anchors (no system roots and no tls_ca_file)".into());
        };
        let (leaf, rest) = chain.split_first().ok_or("no certificate")?;
        verifier
            .verify_server_cert(leaf, rest, name, &[], UnixTime::now())
            .map(|_| ())
            .map_err(|e| e.to_string())
    }

    /// The verifying connector (chain and name), for other protocols than SMTP (the
    /// MTA-STS policy fetch over HTTPS).
    pub fn verifying(&self) -> &TlsConnector {
        &self.verify
    }

    /// The connector for `policy` and how it checks the certificate.
    pub fn for_policy(&self, policy: TlsPolicy) -> (&TlsConnector, Verified) {
        match policy {
            TlsPolicy::Verify => (&self.verify, Verified::Pkix),
            _ => (&self.any, Verified::None),
        }
    }
}

/// The name to verify (and to send as SNI): the host's DNS name, or its address when the
/// host is an address literal or no valid DNS name.
pub fn server_name(host: &str, ip: std::net::IpAddr) -> ServerName<'static> {
    let host = host.trim_end_matches('.');
    match ServerName::try_from(host.to_string()) {
        Ok(name) => name,
        Err(_) => ServerName::IpAddress(ip.into()),
    }
}

/// Accepts any certificate, but checks the handshake signatures with it.
#[derive(Debug)]
struct AnyCertificate(Arc<CryptoProvider>);

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
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
            &self.0.signature_verification_algorithms,
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
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policies_parse_and_print() {
        #[derive(Deserialize)]
        struct T {
            tls: TlsPolicy,
        }
        for p in ["none", "may", "encrypt", "verify"] {
            let t: T = toml::from_str(&format!("tls = \"{p}\"")).unwrap();
            assert_eq!(t.tls.to_string(), p);
        }
        assert!(toml::from_str::<T>("tls = \"dane\"").is_err());
        assert!(TlsPolicy::May.allows_clear() && !TlsPolicy::Encrypt.allows_clear());
    }

    #[test]
    fn server_names_fall_back_to_the_address() {
        let ip: std::net::IpAddr = "192.0.2.1".parse().unwrap();
        assert!(matches!(
            server_name("mail.example.com.", ip),
            ServerName::DnsName(_)
        ));
        assert!(matches!(
            server_name("[192.0.2.1]", ip),
            ServerName::IpAddress(_)
        ));
    }
}
