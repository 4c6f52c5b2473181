//! Certificates for TLS tests, made inside the tests with rcgen and written to a fresh temporary
//! directory: a CA, a server certificate for `localhost` and `127.0.0.1`, client certificates
//! with chosen DNS names, and a second CA nobody trusts. No key is ever committed.

use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
use std::path::{Path, PathBuf};

/// A certificate authority that signs test certificates.
pub struct TestCa {
    issuer: Issuer<'static, KeyPair>,
    /// The CA's certificate, PEM, written to a file.
    pub cert: PathBuf,
    dir: PathBuf,
}

/// A certificate and its key, as PEM files.
pub struct Pair {
    /// The certificate chain (here one certificate).
    pub cert: PathBuf,
    /// The private key.
    pub key: PathBuf,
}

/// A fresh directory under the system's temporary directory for one test's files.
pub fn temp_dir(test: &str) -> PathBuf {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    let dir = std::env::temp_dir().join(format!(
        "brokerd-pki-{test}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

impl TestCa {
    /// A new CA named `name`, its certificate written into `dir`.
    pub fn new(dir: &Path, name: &str) -> TestCa {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, format!("brokerd test CA {name}"));
        let key = KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        let path = dir.join(format!("{name}-ca.pem"));
        std::fs::write(&path, cert.pem()).unwrap();
        TestCa {
            issuer: Issuer::new(params, key),
            cert: path,
            dir: dir.to_path_buf(),
        }
    }

    /// A certificate for `names` (DNS names or IP addresses), signed by this CA, written as
    /// `file.pem` and `file.key`.
    pub fn issue(&self, file: &str, names: &[&str]) -> Pair {
        let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
        let params = CertificateParams::new(names).unwrap();
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        let pair = Pair {
            cert: self.dir.join(format!("{file}.pem")),
            key: self.dir.join(format!("{file}.key")),
        };
        // Written whole to a side file and renamed, so a reader never sees half a file.
        for (path, text) in [(&pair.cert, cert.pem()), (&pair.key, key.serialize_pem())] {
            let tmp = path.with_extension("tmp");
            std::fs::write(&tmp, text).unwrap();
            std::fs::rename(&tmp, path).unwrap();
        }
        pair
    }
}
