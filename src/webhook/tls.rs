//! The webhook's server certificate, reloaded when its files change.
//!
//! cert-manager (or `scripts/webhook-certs`) renews the Secret; the kubelet swaps the mounted
//! files atomically. [`ReloadingCert`] is rustls's certificate resolver: on each new handshake it
//! compares the files' metadata (inode, size, mtime) with the last seen and reloads when they
//! differ, so the next handshake has the new certificate with no restart, and connections already
//! open keep theirs. A pair that does not load (half-written, mismatched key) is logged and
//! counted, and the last good certificate stays in use; it is retried when the files change
//! again. A stat of two files per handshake is cheap next to the handshake itself, and the API
//! server keeps its connections open.

use std::fs::Metadata;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use prometheus_client::metrics::counter::Counter;
use rustls::ServerConfig;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// Why a certificate/key pair cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read.
    #[error("{path}: cannot read: {source}")]
    Read {
        /// The file.
        path: String,
        /// The IO error.
        source: std::io::Error,
    },
    /// The certificate file holds no usable PEM certificate.
    #[error("{path}: {message}")]
    Certificate {
        /// The file.
        path: String,
        /// What is wrong.
        message: String,
    },
    /// The key file holds no usable PEM private key.
    #[error("{path}: {message}")]
    Key {
        /// The file.
        path: String,
        /// What is wrong.
        message: String,
    },
    /// The key does not belong to the certificate.
    #[error("{key} does not match the certificate in {cert}")]
    Mismatch {
        /// The certificate file.
        cert: String,
        /// The key file.
        key: String,
    },
    /// rustls refused the configuration.
    #[error("TLS configuration: {0}")]
    Config(#[from] rustls::Error),
}

/// Loads a PEM certificate chain (leaf first) and its private key, checking that they match.
pub fn load_certified_key(cert: &Path, key: &Path) -> Result<CertifiedKey, TlsError> {
    let read = |p: &Path| {
        std::fs::read(p).map_err(|source| TlsError::Read {
            path: p.display().to_string(),
            source,
        })
    };
    let cert_pem = read(cert)?;
    let key_pem = read(key)?;
    let cert_err = |message: String| TlsError::Certificate {
        path: cert.display().to_string(),
        message,
    };
    let chain = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| cert_err(format!("bad PEM certificate: {e}")))?;
    if chain.is_empty() {
        return Err(cert_err("holds no PEM certificate".into()));
    }
    let key_err = |message: String| TlsError::Key {
        path: key.display().to_string(),
        message,
    };
    let private = PrivateKeyDer::from_pem_slice(&key_pem)
        .map_err(|e| key_err(format!("holds no usable PEM private key: {e}")))?;
    let signer = rustls::crypto::ring::default_provider()
        .key_provider
        .load_private_key(private)
        .map_err(|e| key_err(format!("unsupported private key: {e}")))?;
    let certified = CertifiedKey::new(chain, signer);
    match certified.keys_match() {
        Ok(()) | Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => {
            Ok(certified)
        }
        Err(_) => Err(TlsError::Mismatch {
            cert: cert.display().to_string(),
            key: key.display().to_string(),
        }),
    }
}

/// What identifies one version of a file without reading it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Stamp {
    dev: u64,
    ino: u64,
    len: u64,
    modified: Option<SystemTime>,
}

impl Stamp {
    fn of(m: &Metadata) -> Stamp {
        Stamp {
            dev: m.dev(),
            ino: m.ino(),
            len: m.len(),
            modified: m.modified().ok(),
        }
    }
}

fn stamps(cert: &Path, key: &Path) -> Option<(Stamp, Stamp)> {
    // `metadata` follows symlinks: the kubelet's atomic `..data` swap shows as a new inode.
    let c = std::fs::metadata(cert).ok()?;
    let k = std::fs::metadata(key).ok()?;
    Some((Stamp::of(&c), Stamp::of(&k)))
}

#[derive(Debug)]
struct State {
    seen: Option<(Stamp, Stamp)>,
    current: Arc<CertifiedKey>,
}

/// Counters for reload outcomes.
#[derive(Debug, Clone, Default)]
pub struct ReloadCounters {
    /// New pairs loaded after start-up.
    pub loaded: Counter,
    /// Changed pairs that failed to load (the previous one stayed in use).
    pub failed: Counter,
}

/// A certificate resolver that reloads its files when they change. See the module docs.
#[derive(Debug)]
pub struct ReloadingCert {
    cert: PathBuf,
    key: PathBuf,
    state: Mutex<State>,
    counters: ReloadCounters,
}

impl ReloadingCert {
    /// Loads the pair once; failing here is a start-up error.
    pub fn new(cert: PathBuf, key: PathBuf, counters: ReloadCounters) -> Result<Self, TlsError> {
        let seen = stamps(&cert, &key);
        let current = Arc::new(load_certified_key(&cert, &key)?);
        Ok(Self {
            cert,
            key,
            state: Mutex::new(State { seen, current }),
            counters,
        })
    }

    /// The certificate to present now, reloading first if the files changed.
    pub fn current(&self) -> Arc<CertifiedKey> {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let now = stamps(&self.cert, &self.key);
        if now.is_some() && now != state.seen {
            match load_certified_key(&self.cert, &self.key) {
                Ok(k) => {
                    tracing::info!(cert = %self.cert.display(), "reloaded the webhook certificate");
                    self.counters.loaded.inc();
                    state.current = Arc::new(k);
                }
                Err(e) => {
                    tracing::warn!(error = %e, "new webhook certificate does not load; keeping the previous one");
                    self.counters.failed.inc();
                }
            }
            // Retry only when the files change again, not on every handshake.
            state.seen = now;
        }
        Arc::clone(&state.current)
    }
}

impl ResolvesServerCert for ReloadingCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }
}

/// A TLS 1.2+ server config (ring, HTTP/1.1) presenting `resolver`'s certificate.
pub fn server_config(resolver: Arc<ReloadingCert>) -> Result<ServerConfig, TlsError> {
    let mut config =
        ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
            .with_no_client_auth()
            .with_cert_resolver(resolver);
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}
