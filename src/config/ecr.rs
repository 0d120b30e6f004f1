//! `[ecr]`: how to reach the account's ECR registry. Every field may be discovered at run time
//! instead (region from the SDK's chain, the registry URL from the token's `proxyEndpoint`).

use std::path::{Path, PathBuf};

use http::Uri;
use serde::Deserialize;
use toml::Spanned;

use super::error::{ConfigError, Locator};

/// `[ecr]` as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawEcr {
    region: Option<Spanned<String>>,
    account: Option<Spanned<String>>,
    endpoint: Option<Spanned<String>>,
    ca_file: Option<Spanned<String>>,
}

/// `[ecr]`: every field may be discovered at run time instead.
#[derive(Debug, Clone, Default)]
pub struct EcrConfig {
    /// AWS region; `None` means the SDK's default chain (`AWS_REGION`, profile, IMDS).
    pub region: Option<String>,
    /// 12-digit account id of the registry; `None` means the token's `proxyEndpoint`.
    pub account: Option<String>,
    /// Base URL for registry requests (`scheme://host[:port]`), overriding the ECR host name.
    pub endpoint: Option<Uri>,
    /// An extra PEM CA bundle to trust for the registry endpoint.
    pub ca_file: Option<PathBuf>,
}

impl EcrConfig {
    /// The ECR registry URL when config determines it: `ecr.endpoint`, or the account's host name
    /// in `region`. `None` means "use the token's `proxyEndpoint`".
    pub fn registry_base(&self, region: Option<&str>) -> Result<Option<Uri>, NoRegion> {
        if let Some(e) = &self.endpoint {
            return Ok(Some(e.clone()));
        }
        let Some(account) = &self.account else {
            return Ok(None);
        };
        let region = region.ok_or(NoRegion)?;
        let suffix = if region.starts_with("cn-") {
            "amazonaws.com.cn"
        } else {
            "amazonaws.com"
        };
        let url = format!("https://{account}.dkr.ecr.{region}.{suffix}");
        Ok(Some(parse_base_url(&url).ok_or(NoRegion)?))
    }
}

/// `ecr.account` is set but no region could be found to build the registry host name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error(
    "ecr.account is set but no AWS region was found (ecr.region, AWS_REGION, profile or IMDS): \
     set ecr.region or ecr.endpoint"
)]
pub struct NoRegion;

pub(crate) fn validate(raw: &RawEcr, at: Locator<'_>) -> Result<EcrConfig, ConfigError> {
    let region = match &raw.region {
        None => None,
        Some(s) => {
            let r = s.get_ref();
            let ok = !r.is_empty()
                && r.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && r.contains('-');
            if !ok {
                return Err(at.err(
                    &s.span(),
                    "ecr.region",
                    format!("{r:?} is not an AWS region name, e.g. \"eu-west-1\""),
                ));
            }
            Some(r.clone())
        }
    };
    let account = match &raw.account {
        None => None,
        Some(s) => {
            let a = s.get_ref();
            if a.len() != 12 || !a.bytes().all(|b| b.is_ascii_digit()) {
                return Err(at.err(
                    &s.span(),
                    "ecr.account",
                    format!("{a:?} is not a 12-digit AWS account id"),
                ));
            }
            Some(a.clone())
        }
    };
    let endpoint = match &raw.endpoint {
        None => None,
        Some(s) => Some(parse_base_url(s.get_ref()).ok_or_else(|| {
            at.err(
                &s.span(),
                "ecr.endpoint",
                format!(
                    "{:?} is not a base URL: use http:// or https:// with a host, and no path or query",
                    s.get_ref()
                ),
            )
        })?),
    };
    let ca_file = match &raw.ca_file {
        None => None,
        Some(s) => {
            let p = PathBuf::from(s.get_ref());
            if let Err(why) = check_pem_certificates(&p) {
                return Err(at.err(&s.span(), "ecr.ca_file", format!("{:?} {why}", s.get_ref())));
            }
            Some(p)
        }
    };
    Ok(EcrConfig {
        region,
        account,
        endpoint,
        ca_file,
    })
}

/// Checks that `path` is a readable PEM file with at least one certificate, all parseable.
fn check_pem_certificates(path: &Path) -> Result<(), String> {
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject;
    let pem = std::fs::read(path).map_err(|e| format!("is not a readable file: {e}"))?;
    let mut count = 0;
    for cert in CertificateDer::pem_slice_iter(&pem) {
        cert.map_err(|e| format!("holds a bad PEM certificate: {e}"))?;
        count += 1;
    }
    if count == 0 {
        return Err("holds no PEM certificate".into());
    }
    Ok(())
}

/// A scheme + authority URL with no path beyond `/`, no query and no user info.
pub(crate) fn parse_base_url(s: &str) -> Option<Uri> {
    let uri: Uri = s.parse().ok()?;
    let scheme_ok = matches!(uri.scheme_str(), Some("http" | "https"));
    let authority = uri.authority()?;
    let path_ok = matches!(uri.path(), "" | "/");
    let clean =
        uri.query().is_none() && !authority.as_str().contains('@') && !authority.host().is_empty();
    (scheme_ok && path_ok && clean).then(|| {
        Uri::builder()
            .scheme(uri.scheme_str().unwrap_or("https"))
            .authority(authority.as_str())
            .path_and_query("/")
            .build()
            .ok()
    })?
}
