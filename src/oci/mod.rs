//! The OCI distribution grammar and wire forms every program shares: registry host names,
//! repository names, tags and digests, the error body a registry answers with, and
//! [`reference`](mod@reference), image references as pod specs write them.
//!
//! Pure and a leaf: the mirror's router, the webhook, the config's upstream table and the `ecr`
//! commands all check names against the same rules here.

pub mod reference;

use std::fmt;

use http::header::{CONTENT_LENGTH, CONTENT_TYPE};
use http::{HeaderValue, Response, StatusCode};

use crate::body::{ResponseBody, empty, full};

/// Longest repository name the distribution spec and registries accept.
pub const MAX_NAME_LEN: usize = 255;

/// A registry host name with an optional port, lower-case, aliases folded
/// (`index.docker.io` and `registry-1.docker.io` are `docker.io`).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RegistryHost(String);

impl RegistryHost {
    /// Parses and canonicalizes a registry host. Returns `None` for anything that is not a host
    /// name with an optional port.
    pub fn parse(s: &str) -> Option<RegistryHost> {
        let (host, port) = match s.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (s, None),
        };
        if let Some(p) = port
            && (!p.bytes().all(|b| b.is_ascii_digit()) || !p.parse::<u16>().is_ok_and(|p| p > 0))
        {
            return None;
        }
        if host.is_empty() || host.len() > 253 {
            return None;
        }
        let label_ok = |l: &str| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        };
        if !host.split('.').all(label_ok) {
            return None;
        }
        let lower = s.to_ascii_lowercase();
        let canonical = match lower.as_str() {
            "index.docker.io" | "registry-1.docker.io" => "docker.io".to_owned(),
            _ => lower,
        };
        Some(RegistryHost(canonical))
    }

    /// The canonical host (and port) as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether this is Docker Hub, whose single-segment names live under `library/`.
    pub fn is_docker_hub(&self) -> bool {
        self.0 == "docker.io"
    }

    /// The real registry's URL, for `hosts.toml`'s `server`.
    pub fn default_server(&self) -> String {
        match self.0.as_str() {
            "docker.io" => "https://registry-1.docker.io".to_owned(),
            other => format!("https://{other}"),
        }
    }
}

impl fmt::Display for RegistryHost {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// `[A-Za-z0-9_][A-Za-z0-9._-]{0,127}`.
pub fn valid_tag(t: &str) -> bool {
    let b = t.as_bytes();
    !b.is_empty()
        && b.len() <= 128
        && (b[0].is_ascii_alphanumeric() || b[0] == b'_')
        && b.iter()
            .all(|&c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b'-'))
}

/// The distribution name grammar: `/`-separated components of `[a-z0-9]+` joined by `.`, `_`,
/// `__` or any run of `-`.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty() && name.split('/').all(valid_component)
}

fn valid_component(c: &str) -> bool {
    let b = c.as_bytes();
    if b.is_empty() || !is_alnum(b[0]) || !is_alnum(b[b.len() - 1]) {
        return false;
    }
    let mut i = 0;
    while i < b.len() {
        if is_alnum(b[i]) {
            i += 1;
            continue;
        }
        // A separator run: ".", "_", "__" or "-"+, always followed by an alphanumeric.
        let start = i;
        match b[i] {
            b'.' => i += 1,
            b'_' => {
                i += 1;
                if b.get(i) == Some(&b'_') {
                    i += 1;
                }
            }
            b'-' => {
                while b.get(i) == Some(&b'-') {
                    i += 1;
                }
            }
            _ => return false,
        }
        if i == start || !b.get(i).is_some_and(|&c| is_alnum(c)) {
            return false;
        }
    }
    true
}

fn is_alnum(b: u8) -> bool {
    b.is_ascii_lowercase() || b.is_ascii_digit()
}

/// A validated `algorithm:encoded` digest.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Digest(String);

impl Digest {
    /// Parses a digest: the OCI grammar, with exact lengths for sha256 and sha512.
    pub fn parse(s: &str) -> Option<Digest> {
        let (alg, enc) = s.split_once(':')?;
        let alg_ok = !alg.is_empty()
            && alg.split(['+', '.', '_', '-']).all(|c| {
                !c.is_empty()
                    && c.bytes()
                        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
            });
        let enc_ok = !enc.is_empty()
            && enc
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'=' | b'_' | b'-'));
        let lower_hex = |n: usize| {
            enc.len() == n
                && enc
                    .bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        };
        let len_ok = match alg {
            "sha256" => lower_hex(64),
            "sha512" => lower_hex(128),
            _ => true,
        };
        (alg_ok && enc_ok && len_ok).then(|| Digest(s.to_owned()))
    }

    /// The digest as written, e.g. `sha256:abc…`.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The `sha256:<hex>` digest of `content`: what a registry names it by.
    pub fn sha256_of(content: &[u8]) -> String {
        use sha2::{Digest as _, Sha256};
        use std::fmt::Write as _;
        let mut digest = String::with_capacity("sha256:".len() + 64);
        digest.push_str("sha256:");
        for b in Sha256::digest(content) {
            let _ = write!(digest, "{b:02x}");
        }
        digest
    }

    /// The hex part of a sha256 digest, the only algorithm this proxy verifies.
    pub fn sha256_hex(&self) -> Option<&str> {
        self.0.strip_prefix("sha256:")
    }
}

/// OCI distribution error codes (plus `TAG_INVALID`, `UNAVAILABLE` and `UNKNOWN` from the
/// CNCF distribution registry, which clients also understand).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    /// `BLOB_UNKNOWN`.
    BlobUnknown,
    /// `DIGEST_INVALID`.
    DigestInvalid,
    /// `MANIFEST_UNKNOWN`.
    ManifestUnknown,
    /// `MANIFEST_INVALID`.
    ManifestInvalid,
    /// `NAME_INVALID`.
    NameInvalid,
    /// `NAME_UNKNOWN`.
    NameUnknown,
    /// `TAG_INVALID`.
    TagInvalid,
    /// `UNSUPPORTED`.
    Unsupported,
    /// `UNAVAILABLE`.
    Unavailable,
    /// `UNKNOWN`.
    Unknown,
}

impl ErrorCode {
    /// The wire form.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BlobUnknown => "BLOB_UNKNOWN",
            ErrorCode::DigestInvalid => "DIGEST_INVALID",
            ErrorCode::ManifestUnknown => "MANIFEST_UNKNOWN",
            ErrorCode::ManifestInvalid => "MANIFEST_INVALID",
            ErrorCode::NameInvalid => "NAME_INVALID",
            ErrorCode::NameUnknown => "NAME_UNKNOWN",
            ErrorCode::TagInvalid => "TAG_INVALID",
            ErrorCode::Unsupported => "UNSUPPORTED",
            ErrorCode::Unavailable => "UNAVAILABLE",
            ErrorCode::Unknown => "UNKNOWN",
        }
    }
}

/// `Docker-Distribution-API-Version`, which clients expect on every registry response.
pub const API_VERSION_HEADER: &str = "docker-distribution-api-version";
/// Its only value.
pub const API_VERSION: &str = "registry/2.0";

/// An OCI error response: `status`, and `{"errors":[{code,message,detail}]}` (headers only for
/// HEAD). `mirror::respond::ProxyError::into_response` and the server's own refusals
/// ([`crate::server::Refused`]) both answer through it.
pub fn error_response(
    status: StatusCode,
    code: ErrorCode,
    message: &str,
    head: bool,
) -> Response<ResponseBody> {
    let body = serde_json::json!({
        "errors": [{ "code": code.as_str(), "message": message, "detail": null }]
    })
    .to_string();
    let mut resp = Response::new(if head { empty() } else { full(body.clone()) });
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    h.insert(CONTENT_LENGTH, HeaderValue::from(body.len()));
    h.insert(API_VERSION_HEADER, HeaderValue::from_static(API_VERSION));
    resp
}

#[cfg(test)]
mod tests {
    use super::*;
    use rstest::rstest;

    #[test]
    fn sha256_of_names_content_as_a_registry_does() {
        let d = Digest::sha256_of(b"");
        assert_eq!(
            d,
            "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        assert!(Digest::parse(&d).is_some());
    }

    #[rstest]
    #[case::hub("docker.io", Some("docker.io"))]
    #[case::index_alias("index.docker.io", Some("docker.io"))]
    #[case::registry1_alias("registry-1.docker.io", Some("docker.io"))]
    #[case::upper("Quay.IO", Some("quay.io"))]
    #[case::port("localhost:5000", Some("localhost:5000"))]
    #[case::empty("", None)]
    #[case::space("a b", None)]
    #[case::scheme("https://quay.io", None)]
    #[case::path("quay.io/x", None)]
    #[case::empty_label("quay..io", None)]
    #[case::dash_label("-quay.io", None)]
    #[case::long_port("quay.io:123456", None)]
    #[case::port_too_big("quay.io:99999", None)]
    #[case::port_zero("quay.io:0", None)]
    #[case::port_sign("quay.io:+80", None)]
    fn registry_names(#[case] input: &str, #[case] want: Option<&str>) {
        assert_eq!(
            RegistryHost::parse(input)
                .as_ref()
                .map(RegistryHost::as_str),
            want
        );
    }
}
