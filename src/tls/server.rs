//! The server side of STARTTLS: the certificates of `[smtp] tls_certificate`/`tls_key`,
//! and the rustls configuration the SMTP driver's acceptor uses.
//!
//! The files are read and checked when the configuration is loaded (at start, before the
//! privilege drop, and again by every reload): PEM certificate chains, a private key each
//! (PKCS#8, PKCS#1 or SEC1) that must belong to the first certificate of its chain. A bad
//! file is one line that names it, and a reload that meets one keeps the old snapshot.
//! With several pairs, the client's SNI name picks the certificate valid for it; without a
//! name, or with a name none of them covers, the first pair is used.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

use crate::config::os_error;

/// The loaded certificates, in configuration order.
#[derive(Clone)]
pub struct Certificates {
    keys: Vec<Arc<CertifiedKey>>,
    /// The certificate files, for messages.
    files: Vec<PathBuf>,
}

impl fmt::Debug for Certificates {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Certificates")
            .field("files", &self.files)
            .finish()
    }
}

/// A PEM file's bytes, or one line naming it.
fn read(what: &str, path: &Path) -> Result<Vec<u8>, String> {
    std::fs::read(path)
        .map_err(|e| format!("cannot read {what} {}: {}", path.display(), os_error(&e)))
}

/// The certificate chain in a PEM file (leaf first).
pub fn load_chain(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let pem = read("TLS certificate", path)?;
    let mut chain = Vec::new();
    for cert in CertificateDer::pem_slice_iter(&pem) {
        chain.push(cert.map_err(|e| format!("TLS certificate {}: bad PEM: {e}", path.display()))?);
    }
    if chain.is_empty() {
        return Err(format!(
            "TLS certificate {}: no CERTIFICATE in the file",
            path.display()
        ));
    }
    Ok(chain)
}

/// One certificate chain and its key, checked to belong together.
pub fn load_pair(cert: &Path, key: &Path) -> Result<CertifiedKey, String> {
    let chain = load_chain(cert)?;
    let pem = read("TLS key", key)?;
    let der = PrivateKeyDer::from_pem_slice(&pem).map_err(|e| {
        format!(
            "TLS key {}: no private key in the file ({e})",
            key.display()
        )
    })?;
    let provider = super::provider();
    let signing = provider
        .key_provider
        .load_private_key(der)
        .map_err(|e| format!("TLS key {}: unusable key: {e}", key.display()))?;
    let certified = CertifiedKey::new(chain, signing);
    certified.keys_match().map_err(|e| {
        format!(
            "TLS key {} does not belong to the certificate {} ({e})",
            key.display(),
            cert.display()
        )
    })?;
    webpki::EndEntityCert::try_from(certified.end_entity_cert().map_err(|e| e.to_string())?)
        .map_err(|e| format!("TLS certificate {}: unusable: {e}", cert.display()))?;
    Ok(certified)
}

impl Certificates {
    /// Each `(certificate, key)` pair of files, loaded and checked.
    pub fn load(pairs: &[(PathBuf, PathBuf)]) -> Result<Certificates, String> {
        let mut keys = Vec::new();
        for (cert, key) in pairs {
            keys.push(Arc::new(load_pair(cert, key)?));
        }
        Ok(Certificates {
            keys,
            files: pairs.iter().map(|(c, _)| c.clone()).collect(),
        })
    }

    /// The rustls server configuration: TLS 1.3 and 1.2, no client certificates, the
    /// certificate chosen by SNI, and session tickets (see [`ticketer`]).
    pub fn server_config(&self) -> Arc<rustls::ServerConfig> {
        let mut config = rustls::ServerConfig::builder_with_provider(super::provider())
            .with_protocol_versions(super::VERSIONS)
            .expect("ring supports TLS 1.2 and 1.3")
            .with_no_client_auth()
            .with_cert_resolver(Arc::new(BySni {
                keys: self.keys.clone(),
            }));
        if let Some(t) = ticketer() {
            config.ticketer = t;
        }
        Arc::new(config)
    }
}

/// The process's session-ticket keys (rustls' ring `Ticketer`: ChaCha20-Poly1305, random
/// keys made at start and rotated every 6 hours, never written anywhere), shared by every
/// configuration a reload builds so a client's ticket outlives a reload. A client that
/// comes back with a ticket resumes without the certificate's signature: a sending MTA
/// that opens many sessions pays the full handshake once. `None` (no tickets, the
/// per-configuration session cache only) if the keys cannot be made.
fn ticketer() -> Option<Arc<dyn rustls::server::ProducesTickets>> {
    static TICKETER: std::sync::OnceLock<Option<Arc<dyn rustls::server::ProducesTickets>>> =
        std::sync::OnceLock::new();
    TICKETER
        .get_or_init(|| rustls::crypto::ring::Ticketer::new().ok())
        .clone()
}

/// Picks the first certificate valid for the SNI name, else the first one.
#[derive(Debug)]
struct BySni {
    keys: Vec<Arc<CertifiedKey>>,
}

impl BySni {
    fn pick(&self, name: Option<&str>) -> Option<Arc<CertifiedKey>> {
        if let (Some(name), true) = (name, self.keys.len() > 1) {
            if let Ok(name) = ServerName::try_from(name) {
                for k in &self.keys {
                    let fits = k
                        .end_entity_cert()
                        .ok()
                        .and_then(|c| webpki::EndEntityCert::try_from(c).ok())
                        .is_some_and(|c| c.verify_is_valid_for_subject_name(&name).is_ok());
                    if fits {
                        return Some(k.clone());
                    }
                }
            }
        }
        self.keys.first().cloned()
    }
}

impl ResolvesServerCert for BySni {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.pick(hello.server_name())
    }
}

/// The SMTP driver's connection: clear TCP until STARTTLS, then TLS over it.
pub enum Conn {
    Plain(tokio::net::TcpStream),
    Tls(Box<tokio_rustls::server::TlsStream<tokio::net::TcpStream>>),
}

impl tokio::io::AsyncRead for Conn {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => std::pin::Pin::new(s).poll_read(cx, buf),
            Conn::Tls(s) => std::pin::Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl tokio::io::AsyncWrite for Conn {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Conn::Plain(s) => std::pin::Pin::new(s).poll_write(cx, buf),
            Conn::Tls(s) => std::pin::Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => std::pin::Pin::new(s).poll_flush(cx),
            Conn::Tls(s) => std::pin::Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => std::pin::Pin::new(s).poll_shutdown(cx),
            Conn::Tls(s) => std::pin::Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A self-signed certificate for `names`, written as `DIR/STEM.pem` and `DIR/STEM.key`.
    fn pair(dir: &Path, stem: &str, names: &[&str]) -> (PathBuf, PathBuf) {
        let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(names)
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let (c, k) = (
            dir.join(format!("{stem}.pem")),
            dir.join(format!("{stem}.key")),
        );
        std::fs::write(&c, cert.pem()).unwrap();
        std::fs::write(&k, key.serialize_pem()).unwrap();
        (c, k)
    }

    fn names_of(k: &CertifiedKey) -> bool {
        let c = webpki::EndEntityCert::try_from(k.end_entity_cert().unwrap()).unwrap();
        c.verify_is_valid_for_subject_name(&ServerName::try_from("b.test").unwrap())
            .is_ok()
    }

    #[test]
    fn sni_picks_the_certificate_valid_for_the_name_else_the_first() {
        let dir = tempfile::tempdir().unwrap();
        let a = pair(dir.path(), "a", &["a.test"]);
        let b = pair(dir.path(), "b", &["b.test", "*.b.test"]);
        let certs = Certificates::load(&[a, b]).unwrap();
        let sni = BySni {
            keys: certs.keys.clone(),
        };
        assert!(names_of(&sni.pick(Some("b.test")).unwrap()));
        assert!(names_of(&sni.pick(Some("mx.b.test")).unwrap()));
        assert!(!names_of(&sni.pick(Some("a.test")).unwrap()));
        assert!(!names_of(&sni.pick(Some("c.test")).unwrap()));
        assert!(!names_of(&sni.pick(None).unwrap()));
        let _ = certs.server_config();
    }

    #[test]
    fn bad_files_are_one_line_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let (a_cert, a_key) = pair(dir.path(), "a", &["a.test"]);
        let (_, b_key) = pair(dir.path(), "b", &["b.test"]);
        let err = load_pair(&a_cert, &b_key).unwrap_err();
        assert!(
            err.contains("b.key does not belong to the certificate"),
            "{err}"
        );
        let err = load_pair(&a_key, &a_key).unwrap_err();
        assert!(err.contains("a.key: no CERTIFICATE"), "{err}");
        let err = load_pair(&a_cert, &a_cert).unwrap_err();
        assert!(err.contains("TLS key") && err.contains("a.pem"), "{err}");
        let err = load_pair(&dir.path().join("none.pem"), &a_key).unwrap_err();
        assert!(err.starts_with("cannot read TLS certificate"), "{err}");
        assert!(!err.contains('\n'), "{err}");
        assert!(load_pair(&a_cert, &a_key).is_ok());
    }
}
