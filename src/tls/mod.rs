//! TLS for SMTP (RFC 3207), with rustls and its `ring` provider, TLS 1.2 and 1.3 only.
//!
//! - [`server`]: the certificates of `[smtp] tls_certificate`/`tls_key` (PEM, read and checked
//!   when the configuration is loaded, again on every reload), chosen by SNI, and the
//!   acceptor the SMTP driver hands a connection to after `220 2.0.0 Ready to start TLS`.
//! - [`client`]: the outbound policy (`[delivery] tls`, `[[partner]] tls`: none, may,
//!   encrypt, verify) and the connectors the delivery client uses after its STARTTLS.
//! - [`dane`]: DANE (RFC 7672, `[delivery] dane`): the DNSSEC-secure TLSA records of a next
//!   hop, looked up through the validating resolver, and the verifier that checks the
//!   server's certificate against them.
//! - [`mta_sts`]: destination domains' MTA-STS policies (RFC 8461): the `_mta-sts` TXT
//!   record, the policy fetched over HTTPS ([`https`], a small bounded GET client) and cached
//!   in the spool, and what it means for a delivery (which MX hosts, `verify`).
//!
//! The sans-IO SMTP session never sees TLS: it asks for it ([`crate::smtp::session::Step`]
//! `StartTls`) and is told the outcome as a [`TlsInfo`].

pub mod client;
pub mod dane;
pub mod https;
pub mod mta_sts;
pub mod server;

use std::fmt;
use std::sync::Arc;

use rustls::crypto::CryptoProvider;

/// The protocol versions we speak: TLS 1.3 and 1.2 (never 1.1 or older).
pub static VERSIONS: &[&rustls::SupportedProtocolVersion] =
    &[&rustls::version::TLS13, &rustls::version::TLS12];

/// The crypto provider every TLS configuration here is built with (ring).
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// What a finished handshake negotiated, for `Received:` and the logs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsInfo {
    /// `TLSv1.3`, `TLSv1.2`.
    pub version: String,
    /// The IANA name of the cipher suite, e.g. `TLS13_AES_256_GCM_SHA384`.
    pub cipher: String,
    /// The strength of the symmetric cipher in bits (256 for AES-256 and ChaCha20).
    pub bits: u16,
}

impl TlsInfo {
    /// From a connection whose handshake is complete (either side).
    pub fn of(state: &rustls::CommonState) -> TlsInfo {
        let version = match state.protocol_version() {
            Some(rustls::ProtocolVersion::TLSv1_3) => "TLSv1.3".to_string(),
            Some(rustls::ProtocolVersion::TLSv1_2) => "TLSv1.2".to_string(),
            Some(v) => format!("{v:?}"),
            None => "unknown".to_string(),
        };
        let cipher = state
            .negotiated_cipher_suite()
            .map(|s| {
                let suite = s.suite();
                suite
                    .as_str()
                    .map(str::to_string)
                    .unwrap_or_else(|| format!("{suite:?}"))
            })
            .unwrap_or_else(|| "unknown".to_string());
        let bits = cipher_bits(&cipher);
        TlsInfo {
            version,
            cipher,
            bits,
        }
    }

    /// As Postfix writes it: `TLSv1.3 with cipher TLS13_AES_256_GCM_SHA384 (256/256 bits)`.
    pub fn summary(&self) -> String {
        format!(
            "{} with cipher {} ({}/{} bits)",
            self.version, self.cipher, self.bits, self.bits
        )
    }
}

/// The TLS state of one SMTP session, as the logs (`tls=TLSv1.3 verified=pkix`, `tls=none`)
/// and `queue --json` (`last_tls`) show it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TlsState {
    /// `TLSv1.3`, `TLSv1.2`; `None` for a session in clear text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// The cipher suite's IANA name; `None` in clear text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cipher: Option<String>,
    /// How the server's certificate was checked: `pkix`, `dane`, or `none` (also in clear
    /// text).
    pub verified: String,
}

impl TlsState {
    /// A session without TLS.
    pub fn clear() -> TlsState {
        TlsState {
            version: None,
            cipher: None,
            verified: "none".to_string(),
        }
    }

    /// A session after a handshake, its certificate checked as `verified` says.
    pub fn of(info: &TlsInfo, verified: impl fmt::Display) -> TlsState {
        TlsState {
            version: Some(info.version.clone()),
            cipher: Some(info.cipher.clone()),
            verified: verified.to_string(),
        }
    }
}

impl fmt::Display for TlsState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.version {
            Some(v) => write!(f, "tls={v} verified={}", self.verified),
            None => f.write_str("tls=none"),
        }
    }
}

/// The key length of the symmetric cipher a suite name names.
fn cipher_bits(name: &str) -> u16 {
    if name.contains("AES_256") || name.contains("CHACHA20") {
        256
    } else if name.contains("AES_128") {
        128
    } else {
        0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cipher_strength_from_the_suite_name() {
        assert_eq!(cipher_bits("TLS13_AES_256_GCM_SHA384"), 256);
        assert_eq!(cipher_bits("TLS13_CHACHA20_POLY1305_SHA256"), 256);
        assert_eq!(cipher_bits("TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256"), 128);
        let info = TlsInfo {
            version: "TLSv1.3".into(),
            cipher: "TLS13_AES_256_GCM_SHA384".into(),
            bits: 256,
        };
        assert_eq!(
            info.summary(),
            "TLSv1.3 with cipher TLS13_AES_256_GCM_SHA384 (256/256 bits)"
        );
        let state = TlsState::of(&info, "pkix");
        assert_eq!(state.to_string(), "tls=TLSv1.3 verified=pkix");
        assert_eq!(TlsState::clear().to_string(), "tls=none");
        let json = serde_json::to_value(&state).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"version": "TLSv1.3", "cipher": "TLS13_AES_256_GCM_SHA384", "verified": "pkix"})
        );
        let back: TlsState = serde_json::from_value(json).unwrap();
        assert_eq!(back, state);
    }
}
