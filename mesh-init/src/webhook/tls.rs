//! The webhook's certificate: read from PEM files, and read again when they change.
//!
//! The API server only calls webhooks over TLS, and the certificate is usually issued by
//! cert-manager or a Job into a Secret, mounted as files that are replaced before they expire.
//! Each handshake checks the files' modification times (a `stat` each, cheap next to the
//! handshake) and loads them when they changed; a pair that does not load (half written, key
//! not matching) leaves the previous certificate in use, with a warning, rather than breaking
//! every admission. TLS is rustls with the ring provider: pure Rust but for ring's own C and
//! assembly, so the image needs no OpenSSL, and TLS 1.2 and 1.3 as the API server speaks them.

use std::{
    fmt,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::SystemTime,
};

use rustls::{
    crypto::CryptoProvider,
    server::{ClientHello, ResolvesServerCert},
    sign::CertifiedKey,
    ServerConfig,
};
use rustls_pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer};

/// A certificate or key that cannot be used, naming the file.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("--tls-cert {path}: {reason}")]
    Cert { path: String, reason: String },
    #[error("--tls-key {path}: {reason}")]
    Key { path: String, reason: String },
    #[error("TLS settings: {0}")]
    Config(rustls::Error),
}

/// The certificate and key files, and what was last loaded from them.
pub struct Reloading {
    cert: PathBuf,
    key: PathBuf,
    provider: Arc<CryptoProvider>,
    current: Mutex<Loaded>,
}

struct Loaded {
    stamp: (Option<SystemTime>, Option<SystemTime>),
    key: Arc<CertifiedKey>,
}

impl fmt::Debug for Reloading {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Reloading").field("cert", &self.cert).field("key", &self.key).finish()
    }
}

impl Reloading {
    /// Loads the pair once; an error here names the file and stops the webhook from starting.
    pub fn new(cert: &Path, key: &Path) -> Result<Arc<Self>, TlsError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let stamp = stamps(cert, key);
        let loaded = load(cert, key, &provider)?;
        Ok(Arc::new(Self {
            cert: cert.to_path_buf(),
            key: key.to_path_buf(),
            provider,
            current: Mutex::new(Loaded { stamp, key: loaded }),
        }))
    }

    /// A server configuration that asks this for the certificate at every handshake.
    pub fn server_config(self: &Arc<Self>) -> Result<ServerConfig, TlsError> {
        let mut config = ServerConfig::builder_with_provider(self.provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(TlsError::Config)?
            .with_no_client_auth()
            .with_cert_resolver(self.clone());
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(config)
    }

    /// The certificate to present now, reloaded first if the files changed.
    fn current(&self) -> Arc<CertifiedKey> {
        let mut current = self.current.lock().unwrap_or_else(|e| e.into_inner());
        let stamp = stamps(&self.cert, &self.key);
        if stamp != current.stamp {
            match load(&self.cert, &self.key, &self.provider) {
                Ok(key) => {
                    tracing::info!(cert = %self.cert.display(), "webhook certificate reloaded");
                    *current = Loaded { stamp, key };
                }
                Err(e) => tracing::warn!("{e}; the previous certificate stays in use"),
            }
        }
        current.key.clone()
    }
}

impl ResolvesServerCert for Reloading {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }
}

fn stamps(cert: &Path, key: &Path) -> (Option<SystemTime>, Option<SystemTime>) {
    let m = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    (m(cert), m(key))
}

fn load(cert: &Path, key: &Path, provider: &CryptoProvider) -> Result<Arc<CertifiedKey>, TlsError> {
    let cert_err = |reason: String| TlsError::Cert { path: cert.display().to_string(), reason };
    let key_err = |reason: String| TlsError::Key { path: key.display().to_string(), reason };
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .map_err(|e| cert_err(e.to_string()))?
        .collect::<Result<_, _>>()
        .map_err(|e| cert_err(e.to_string()))?;
    if chain.is_empty() {
        return Err(cert_err("no CERTIFICATE block".into()));
    }
    let der = PrivateKeyDer::from_pem_file(key).map_err(|e| key_err(e.to_string()))?;
    let signing = provider.key_provider.load_private_key(der).map_err(|e| key_err(e.to_string()))?;
    let certified = CertifiedKey::new(chain, signing);
    certified.keys_match().map_err(|e| key_err(format!("does not match the certificate ({e})")))?;
    Ok(Arc::new(certified))
}
