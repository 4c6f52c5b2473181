//! TLS for the client listener: the server's certificate (reloaded when its files change),
//! optional client certificates (mutual TLS), and what a client that speaks the wrong transport
//! is told.
//!
//! Owns the rustls `ServerConfig`; the connection task calls [`TlsState::accept`] before the
//! brokerd handshake. Uses the `ring` provider. Does not decide who a certificate's holder is
//! allowed to be: `auth.rs` maps a certificate's DNS names to users.

use crate::config::TlsConfig;
use rustls::ServerConfig;
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

/// How often the certificate and key files are looked at for a change.
pub const RELOAD_CHECK: Duration = Duration::from_secs(2);

/// The first byte of a TLS record carrying a handshake (a ClientHello).
pub const TLS_HANDSHAKE: u8 = 0x16;

/// Why TLS could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read or holds no usable PEM item.
    #[error("{path}: {message}")]
    File {
        /// The file.
        path: String,
        /// What is wrong.
        message: String,
    },
    /// rustls refused the certificate, key or CA.
    #[error("{0}")]
    Rustls(#[from] rustls::Error),
    /// The client CA could not be used.
    #[error("tls.client_ca: {0}")]
    ClientCa(String),
}

fn file_error(path: &Path, message: impl ToString) -> TlsError {
    TlsError::File {
        path: path.display().to_string(),
        message: message.to_string(),
    }
}

/// Reads a certificate chain and its key into a signing `CertifiedKey`.
fn load_key(cert: &Path, key: &Path) -> Result<Arc<CertifiedKey>, TlsError> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .map_err(|e| file_error(cert, e))?
        .collect::<Result<_, _>>()
        .map_err(|e| file_error(cert, e))?;
    if chain.is_empty() {
        return Err(file_error(cert, "no certificate in the file"));
    }
    let der = PrivateKeyDer::from_pem_file(key).map_err(|e| file_error(key, e))?;
    let signing =
        rustls::crypto::ring::sign::any_supported_type(&der).map_err(|e| file_error(key, e))?;
    let certified = CertifiedKey::new(chain, signing);
    // A key from another certificate would load, and then fail every handshake: refused here,
    // so that start-up stops and a reload keeps the certificate in force (a rotation that
    // renames the two files in place can be seen between the renames; the next look, 2 s
    // later, picks up the matching pair).
    match certified.keys_match() {
        Ok(()) | Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => {}
        Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch)) => {
            return Err(file_error(
                key,
                format!(
                    "this key does not belong to the certificate in {}",
                    cert.display()
                ),
            ));
        }
        Err(e) => return Err(file_error(cert, e)),
    }
    Ok(Arc::new(certified))
}

/// When `path` last changed, if it can be read.
fn modified(path: &Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

/// The server's certificate, swapped whole when its files change. A leaf lock, held for the swap
/// or for cloning the `Arc` during a handshake.
#[derive(Debug)]
struct Reloading {
    current: parking_lot::RwLock<Arc<CertifiedKey>>,
}

impl ResolvesServerCert for Reloading {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.read().clone())
    }
}

/// TLS as configured: the acceptor, and what reloading needs.
pub struct TlsState {
    acceptor: tokio_rustls::TlsAcceptor,
    certs: Arc<Reloading>,
    cert: PathBuf,
    key: PathBuf,
    stamps: parking_lot::Mutex<(Option<SystemTime>, Option<SystemTime>)>,
    /// Whether clients must present a certificate signed by the client CA.
    pub mutual: bool,
}

impl TlsState {
    /// Loads the certificate, key and client CA that `config` names.
    ///
    /// # Errors
    /// A file cannot be read, holds nothing usable, or rustls refuses it.
    pub fn load(config: &TlsConfig) -> Result<Option<TlsState>, TlsError> {
        let (Some(cert), Some(key)) = (&config.cert, &config.key) else {
            return Ok(None);
        };
        let provider = Arc::new(provider());
        let certs = Arc::new(Reloading {
            current: parking_lot::RwLock::new(load_key(cert, key)?),
        });
        let builder = ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()?;
        let server = match &config.client_ca {
            Some(ca) => {
                let mut roots = rustls::RootCertStore::empty();
                for c in CertificateDer::pem_file_iter(ca).map_err(|e| file_error(ca, e))? {
                    roots
                        .add(c.map_err(|e| file_error(ca, e))?)
                        .map_err(|e| TlsError::ClientCa(e.to_string()))?;
                }
                if roots.is_empty() {
                    return Err(file_error(ca, "no certificate in the file"));
                }
                let verifier =
                    WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                        .build()
                        .map_err(|e| TlsError::ClientCa(e.to_string()))?;
                builder
                    .with_client_cert_verifier(verifier)
                    .with_cert_resolver(certs.clone())
            }
            None => builder
                .with_no_client_auth()
                .with_cert_resolver(certs.clone()),
        };
        Ok(Some(TlsState {
            acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(server)),
            certs,
            stamps: parking_lot::Mutex::new((modified(cert), modified(key))),
            cert: cert.clone(),
            key: key.clone(),
            mutual: config.client_ca.is_some(),
        }))
    }

    /// The acceptor for new connections.
    pub fn acceptor(&self) -> &tokio_rustls::TlsAcceptor {
        &self.acceptor
    }

    /// Reloads the certificate and key if either file changed since the last look. Returns
    /// `Ok(true)` when new ones are in force; on an error the old ones stay.
    ///
    /// # Errors
    /// The changed files could not be loaded.
    pub fn reload_if_changed(&self) -> Result<bool, TlsError> {
        let now = (modified(&self.cert), modified(&self.key));
        {
            let mut stamps = self.stamps.lock();
            if *stamps == now {
                return Ok(false);
            }
            // Looked at once per change, even if it fails: the next edit tries again.
            *stamps = now;
        }
        let fresh = load_key(&self.cert, &self.key)?;
        *self.certs.current.write() = fresh;
        Ok(true)
    }
}

/// The DNS names a verified client certificate holds, for mapping it to a user.
pub fn certificate_names(cert: &CertificateDer<'_>) -> Vec<String> {
    let Ok(ee) = webpki::EndEntityCert::try_from(cert) else {
        return Vec::new();
    };
    ee.valid_dns_names().map(str::to_string).collect()
}

/// rustls's `ring` provider with AES-128-GCM preferred over AES-256-GCM: both are safe, and the
/// shorter key schedule is about a third cheaper per byte, which a broker that encrypts every
/// delivery feels. Honoured when the peer leaves the choice open (the server follows the
/// client's order; brokerd's client sends this one).
pub fn provider() -> rustls::crypto::CryptoProvider {
    let mut p = rustls::crypto::ring::default_provider();
    if let Some(i) = p
        .cipher_suites
        .iter()
        .position(|s| *s == rustls::crypto::ring::cipher_suite::TLS13_AES_128_GCM_SHA256)
    {
        let suite = p.cipher_suites.remove(i);
        p.cipher_suites.insert(0, suite);
    }
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_files_name_the_path() {
        let c = TlsConfig {
            cert: Some("/nonexistent/cert.pem".into()),
            key: Some("/nonexistent/key.pem".into()),
            ..TlsConfig::default()
        };
        let e = TlsState::load(&c).err().map(|e| e.to_string());
        assert!(
            e.as_deref()
                .is_some_and(|e| e.contains("/nonexistent/cert.pem")),
            "{e:?}"
        );
        assert!(TlsState::load(&TlsConfig::default()).unwrap().is_none());
    }
}
