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
use prometheus_client::metrics::gauge::Gauge;
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

/// Counters for reload outcomes, and the expiry of the certificate in use.
#[derive(Debug, Clone, Default)]
pub struct ReloadCounters {
    /// New pairs loaded after start-up.
    pub loaded: Counter,
    /// Changed pairs that failed to load (the previous one stayed in use).
    pub failed: Counter,
    /// `notAfter` of the leaf certificate in use, in Unix seconds (0 if unreadable): what an
    /// alert on a renewal that never happened watches.
    pub not_after: Gauge,
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
        counters.not_after.set(leaf_not_after(&current));
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
                    self.counters.not_after.set(leaf_not_after(&k));
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

fn leaf_not_after(key: &CertifiedKey) -> i64 {
    key.end_entity_cert()
        .ok()
        .and_then(|c| not_after(c.as_ref()))
        .unwrap_or(0)
}

/// The `notAfter` of a DER X.509 certificate, in Unix seconds: a walk to
/// `tbsCertificate.validity` (RFC 5280 §4.1), enough for a metric. `None` if it is not there.
pub fn not_after(der: &[u8]) -> Option<i64> {
    let (_, cert, _) = tlv(der)?;
    let (_, mut tbs, _) = tlv(cert)?;
    // [0] EXPLICIT version, when present.
    if tbs.first() == Some(&0xa0) {
        tbs = tlv(tbs)?.2;
    }
    // serialNumber, signature, issuer, then validity.
    for _ in 0..3 {
        tbs = tlv(tbs)?.2;
    }
    let (tag, validity, _) = tlv(tbs)?;
    if tag != 0x30 {
        return None;
    }
    let (_, _, rest) = tlv(validity)?;
    let (tag, time, _) = tlv(rest)?;
    let text = std::str::from_utf8(time).ok()?;
    let digits = text.strip_suffix('Z')?;
    // All ASCII digits first, so every slice below falls on a character boundary (a certificate
    // is input: multibyte text here must give `None`, not a panic).
    if !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let (year, rest) = match (tag, digits.len()) {
        // UTCTime: YY in 1950..=2049.
        (0x17, 12) => {
            let yy: i64 = digits.get(..2)?.parse().ok()?;
            (
                if yy >= 50 { 1900 + yy } else { 2000 + yy },
                digits.get(2..)?,
            )
        }
        // GeneralizedTime: YYYY.
        (0x18, 14) => (digits.get(..4)?.parse().ok()?, digits.get(4..)?),
        _ => return None,
    };
    let field = |i: usize| rest.get(i..i + 2)?.parse::<i64>().ok();
    let (month, day, h, m, sec) = (field(0)?, field(2)?, field(4)?, field(6)?, field(8)?);
    if !(1..=12).contains(&month) || !(1..=31).contains(&day) || h > 23 || m > 59 || sec > 60 {
        return None;
    }
    Some(days_from_civil(year, month, day) * 86_400 + h * 3600 + m * 60 + sec)
}

/// One DER element: its tag, its contents, and what follows it.
fn tlv(b: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let tag = *b.first()?;
    let first = *b.get(1)?;
    let (len, header) = if first < 0x80 {
        (usize::from(first), 2)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 {
            return None;
        }
        let mut len = 0usize;
        for &byte in b.get(2..2 + n)? {
            len = (len << 8) | usize::from(byte);
        }
        (len, 2 + n)
    };
    let end = header.checked_add(len)?;
    Some((tag, b.get(header..end)?, b.get(end..)?))
}

/// Days from 1970-01-01 to a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;
    use rstest::rstest;

    #[test]
    fn not_after_of_a_real_certificate() {
        let pem = include_bytes!("../../tests/fixtures/tls/ca.pem");
        let der = CertificateDer::from_pem_slice(pem).unwrap();
        // openssl x509 -enddate: Nov  3 22:32:33 2126 GMT (GeneralizedTime).
        assert_eq!(not_after(der.as_ref()), Some(4_949_418_753));
    }

    #[rstest]
    #[case::epoch(1970, 1, 1, 0)]
    #[case::leap_day(2024, 2, 29, 19_782)]
    #[case::y2k(2000, 1, 1, 10_957)]
    fn civil_days(#[case] y: i64, #[case] m: i64, #[case] d: i64, #[case] want: i64) {
        assert_eq!(days_from_civil(y, m, d), want);
    }

    #[rstest]
    #[case::empty(&[])]
    #[case::truncated(&[0x30, 0x82, 0x01])]
    #[case::length_past_end(&[0x30, 0x05, 0x02, 0x01])]
    #[case::not_a_certificate(&[0x30, 0x03, 0x02, 0x01, 0x01])]
    fn not_after_of_garbage(#[case] der: &[u8]) {
        assert_eq!(not_after(der), None);
    }

    /// One DER element with a short-form length.
    fn der(tag: u8, content: &[u8]) -> Vec<u8> {
        let mut out = vec![tag, u8::try_from(content.len()).unwrap()];
        out.extend_from_slice(content);
        out
    }

    /// A certificate skeleton whose validity ends at `time` (tag 0x17 or 0x18).
    fn cert_ending(tag: u8, time: &str) -> Vec<u8> {
        let not_before = der(0x17, b"240101000000Z");
        let validity = der(0x30, &[not_before, der(tag, time.as_bytes())].concat());
        let serial = der(0x02, &[1]);
        let (alg, issuer) = (der(0x30, &[]), der(0x30, &[]));
        let tbs = der(0x30, &[serial, alg, issuer, validity].concat());
        der(0x30, &tbs)
    }

    #[rstest]
    #[case::utc_time(0x17, "491231235959Z", Some(2_524_607_999))]
    #[case::generalized_time(0x18, "20491231235959Z", Some(2_524_607_999))]
    // 12 and 14 bytes before the Z, with a two-byte character across the year's end.
    #[case::utc_time_multibyte(0x17, "2é345678901Z", None)]
    #[case::generalized_time_multibyte(0x18, "202é345678901Z", None)]
    #[case::multibyte_later(0x18, "202401010000éZ", None)]
    #[case::no_z(0x17, "491231235959", None)]
    fn not_after_of_crafted_validity(
        #[case] tag: u8,
        #[case] time: &str,
        #[case] want: Option<i64>,
    ) {
        assert_eq!(not_after(&cert_ending(tag, time)), want);
    }
}
