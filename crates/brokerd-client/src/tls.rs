//! TLS for the client: which CA to trust, the server's name, and an optional client
//! certificate for mutual TLS. Built once ([`TlsOptions`]) and shared by every connection made
//! with the same [`crate::ConnectOptions`]. Uses rustls with the `ring` provider.

use rustls::ClientConfig;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use std::path::Path;
use std::sync::Arc;

/// How to connect over TLS.
#[derive(Clone)]
pub struct TlsOptions {
    pub(crate) config: Arc<ClientConfig>,
    pub(crate) server_name: ServerName<'static>,
}

impl std::fmt::Debug for TlsOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsOptions")
            .field("server_name", &self.server_name)
            .finish_non_exhaustive()
    }
}

/// Why TLS options could not be built.
#[derive(Debug, thiserror::Error)]
pub enum TlsOptionsError {
    /// A PEM file could not be read, or holds nothing usable.
    #[error("{path}: {message}")]
    File {
        /// The file.
        path: String,
        /// What is wrong.
        message: String,
    },
    /// The server name is not a valid DNS name or IP address.
    #[error("invalid TLS server name {0:?}")]
    ServerName(String),
    /// rustls refused the certificates or key.
    #[error("{0}")]
    Rustls(#[from] rustls::Error),
}

fn file_error(path: &Path, message: impl ToString) -> TlsOptionsError {
    TlsOptionsError::File {
        path: path.display().to_string(),
        message: message.to_string(),
    }
}

fn certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsOptionsError> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
        .map_err(|e| file_error(path, e))?
        .collect::<Result<_, _>>()
        .map_err(|e| file_error(path, e))?;
    if certs.is_empty() {
        return Err(file_error(path, "no certificate in the file"));
    }
    Ok(certs)
}

impl TlsOptions {
    /// Trusts the CA certificates in the PEM file `ca` and expects the server to present a
    /// certificate for `server_name` (a DNS name or an IP address).
    ///
    /// # Errors
    /// The file cannot be read or holds no certificate, or the name is not valid.
    pub fn new(ca: impl AsRef<Path>, server_name: &str) -> Result<TlsOptions, TlsOptionsError> {
        TlsOptions::build(ca.as_ref(), server_name, None)
    }

    /// As [`TlsOptions::new`], presenting the certificate chain `cert` and its key `key` (PEM)
    /// to a server that asks for one (mutual TLS).
    ///
    /// # Errors
    /// As [`TlsOptions::new`], and an unreadable or unusable certificate or key.
    pub fn with_client_certificate(
        ca: impl AsRef<Path>,
        server_name: &str,
        cert: impl AsRef<Path>,
        key: impl AsRef<Path>,
    ) -> Result<TlsOptions, TlsOptionsError> {
        let chain = certificates(cert.as_ref())?;
        let key_path = key.as_ref();
        let key = PrivateKeyDer::from_pem_file(key_path).map_err(|e| file_error(key_path, e))?;
        TlsOptions::build(ca.as_ref(), server_name, Some((chain, key)))
    }

    fn build(
        ca: &Path,
        server_name: &str,
        client: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
    ) -> Result<TlsOptions, TlsOptionsError> {
        let mut roots = rustls::RootCertStore::empty();
        for cert in certificates(ca)? {
            roots.add(cert).map_err(|e| file_error(ca, e))?;
        }
        let builder = ClientConfig::builder_with_provider(Arc::new(provider()))
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots);
        let config = match client {
            Some((chain, key)) => builder.with_client_auth_cert(chain, key)?,
            None => builder.with_no_client_auth(),
        };
        let server_name = ServerName::try_from(server_name.to_string())
            .map_err(|_| TlsOptionsError::ServerName(server_name.to_string()))?;
        Ok(TlsOptions {
            config: Arc::new(config),
            server_name,
        })
    }
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
