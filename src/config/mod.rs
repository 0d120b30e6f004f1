//! Configuration: a raw, serde-shaped [`RawConfig`] read from TOML, and the validated [`Config`]
//! the rest of the crate uses.
//!
//! Everything is checked here, once, before any socket is bound: a daemon on every node that starts
//! with a typo and then fails on the first pull is far worse than one that refuses to start. Each
//! error names the file, the line and the key, and `main` exits with 64 (`EX_USAGE`) on it.
//! The only `Option`s left in [`Config`] mean "discover it at run time" (region, account, endpoint),
//! never "not validated yet".

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use http::Uri;
use serde::Deserialize;
use toml::Spanned;

/// Default mirror address: loopback only, so nothing off the node can use the node's ECR identity.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:5050";
/// Default ops address: loopback too, like every listener of a hostNetwork process, so that
/// nothing is open on the node IP unless the config says so. The DaemonSet's config sets
/// `0.0.0.0:5051`, because kubelet probes and Prometheus reach the pod on the node IP.
pub const DEFAULT_OPS_LISTEN: &str = "127.0.0.1:5051";

/// The AWS console's default pull-through rule prefixes, used when the config has no `[upstreams]`.
pub const DEFAULT_UPSTREAMS: &[(&str, &str)] = &[
    ("docker.io", "docker-hub"),
    ("ghcr.io", "github"),
    ("quay.io", "quay"),
    ("registry.k8s.io", "kubernetes"),
    ("public.ecr.aws", "ecr-public"),
    ("registry.gitlab.com", "gitlab"),
];

/// A config error: where it is, and what is wrong.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read at all.
    #[error("{path}: cannot read config: {source}")]
    Read {
        /// The config file.
        path: String,
        /// The IO error.
        source: std::io::Error,
    },
    /// The file was read, but a value is wrong. `line` is 1-based.
    #[error("{path}:{line}: {key}: {message}")]
    Invalid {
        /// The config file.
        path: String,
        /// 1-based line of the offending key or value.
        line: usize,
        /// Dotted key path, e.g. `upstreams."docker.io".prefix`.
        key: String,
        /// What is wrong, and what would be right.
        message: String,
    },
}

/// The config as written, before validation. Unknown keys are errors.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    listen: Option<Spanned<String>>,
    ops_listen: Option<Spanned<String>>,
    default_upstream: Option<Spanned<String>>,
    #[serde(default)]
    ecr: RawEcr,
    upstreams: Option<BTreeMap<Spanned<String>, Spanned<RawUpstream>>>,
    #[serde(default)]
    timeouts: RawTimeouts,
    #[serde(default)]
    manifest_cache: RawManifestCache,
    #[serde(default)]
    webhook: crate::webhook::config::RawWebhook,
    #[serde(default)]
    ecr_setup: crate::ecr::settings::RawEcrSetup,
    #[serde(default)]
    breaker: crate::mirror::breaker::RawBreaker,
    #[serde(default)]
    server: crate::server::RawServer,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEcr {
    region: Option<Spanned<String>>,
    account: Option<Spanned<String>>,
    endpoint: Option<Spanned<String>>,
    ca_file: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawUpstream {
    prefix: Spanned<String>,
    server: Option<Spanned<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTimeouts {
    connect: Option<Spanned<String>>,
    response_headers: Option<Spanned<String>>,
    shutdown: Option<Spanned<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawManifestCache {
    max_bytes: Option<Spanned<u64>>,
}

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where the mirror listens.
    pub listen: SocketAddr,
    /// Where `/healthz`, `/readyz` and `/metrics` listen.
    pub ops_listen: SocketAddr,
    /// The registry for clients that send neither `?ns=` nor a path prefix.
    pub default_upstream: Option<Registry>,
    /// How to reach ECR.
    pub ecr: EcrConfig,
    /// Upstream registries, keyed by canonical registry host.
    pub upstreams: BTreeMap<Registry, Upstream>,
    /// Timeouts towards ECR, and the shutdown grace period.
    pub timeouts: Timeouts,
    /// Upper bound, in bytes, of the in-memory manifest cache.
    pub manifest_cache_bytes: u64,
    /// `[webhook]`: the admission webhook and `pullthrough rewrite`.
    pub webhook: crate::webhook::config::WebhookConfig,
    /// `[ecr_setup]`: what `pullthrough ecr setup` creates besides the rules.
    pub ecr_setup: crate::ecr::settings::EcrSetup,
    /// `[breaker]`: failing fast while the ECR endpoint refuses or hangs.
    pub breaker: crate::mirror::breaker::BreakerConfig,
    /// `[server]`: header read timeout and connection limit of each listener.
    pub server: crate::server::Limits,
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

/// A configured upstream registry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upstream {
    /// The ECR pull-through rule's repository prefix.
    pub prefix: String,
    /// The real registry, written into `hosts.toml` as `server`.
    pub server: String,
}

/// Timeouts. Defaults: connect 3 s, response headers 15 s, shutdown grace 20 s.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// TCP (and TLS) connect to the registry endpoint.
    pub connect: Duration,
    /// From request sent to response headers received.
    pub response_headers: Duration,
    /// How long in-flight requests may run after SIGTERM.
    pub shutdown: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            connect: Duration::from_secs(3),
            response_headers: Duration::from_secs(15),
            shutdown: Duration::from_secs(20),
        }
    }
}

/// A registry host name with an optional port, lower-case, aliases folded
/// (`index.docker.io` and `registry-1.docker.io` are `docker.io`).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Registry(String);

impl Registry {
    /// Parses and canonicalizes a registry host. Returns `None` for anything that is not a host
    /// name with an optional port.
    pub fn parse(s: &str) -> Option<Registry> {
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
        Some(Registry(canonical))
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

impl fmt::Display for Registry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl Config {
    /// Reads and validates a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        let mut config = Config::from_toml_str(&text, &path.display().to_string())?;
        // Paths in the file are relative to the file, not to the working directory.
        if let Some(dir) = path.parent() {
            config.ecr_setup.template.anchor_paths(dir);
        }
        Ok(config)
    }

    /// Parses and validates TOML text; `path` only labels errors. Tests use this directly.
    pub fn from_toml_str(text: &str, path: &str) -> Result<Config, ConfigError> {
        let at = Locator { text, path };
        let raw: RawConfig = toml::from_str(text).map_err(|e| {
            let line = e.span().map(|s| at.line(&s)).unwrap_or(1);
            ConfigError::Invalid {
                path: path.to_owned(),
                line,
                key: key_of_parse_error(e.message(), text, line),
                message: e.message().trim().to_owned(),
            }
        })?;
        Config::try_from((raw, at))
    }
}

/// Turns byte spans into line numbers and builds errors.
#[derive(Clone, Copy)]
pub(crate) struct Locator<'a> {
    text: &'a str,
    path: &'a str,
}

impl Locator<'_> {
    /// The config file's name, as errors show it.
    pub(crate) fn path(&self) -> &str {
        self.path
    }

    pub(crate) fn line(&self, span: &Range<usize>) -> usize {
        let end = span.start.min(self.text.len());
        self.text.as_bytes()[..end]
            .iter()
            .filter(|&&b| b == b'\n')
            .count()
            + 1
    }

    pub(crate) fn err(
        &self,
        span: &Range<usize>,
        key: &str,
        message: impl Into<String>,
    ) -> ConfigError {
        ConfigError::Invalid {
            path: self.path.to_owned(),
            line: self.line(span),
            key: key.to_owned(),
            message: message.into(),
        }
    }

    /// A positive duration such as `"5s"` or `"500ms"`, or `default` when the key is absent. The
    /// error's example is the default, so it reads as a value to copy.
    pub(crate) fn positive_duration(
        &self,
        value: &Option<Spanned<String>>,
        key: &str,
        default: Duration,
    ) -> Result<Duration, ConfigError> {
        let Some(s) = value else {
            return Ok(default);
        };
        match humantime::parse_duration(s.get_ref()) {
            Ok(d) if !d.is_zero() => Ok(d),
            _ => Err(self.err(
                &s.span(),
                key,
                format!(
                    "{:?} is not a positive duration, e.g. \"{}\" or \"500ms\"",
                    s.get_ref(),
                    humantime::format_duration(default)
                ),
            )),
        }
    }

    /// An `IP:port` value, or `default` when the key is absent. `example` goes into the error.
    pub(crate) fn socket_addr(
        &self,
        value: &Option<Spanned<String>>,
        key: &str,
        default: &str,
        example: &str,
    ) -> Result<SocketAddr, ConfigError> {
        match value {
            None => default
                .parse::<SocketAddr>()
                .map_err(|e| self.err(&(0..0), key, e.to_string())),
            Some(s) => s.get_ref().parse::<SocketAddr>().map_err(|_| {
                self.err(
                    &s.span(),
                    key,
                    format!(
                        "{:?} is not an IP:port address, e.g. \"{example}\"",
                        s.get_ref()
                    ),
                )
            }),
        }
    }
}

/// The dotted key a parse error is about: serde names unknown and missing fields in backticks,
/// otherwise it is the key on the offending line; either is prefixed with the table it sits in
/// (the nearest `[table]` header above), so `prefix` reads `upstreams."docker.io".prefix`.
fn key_of_parse_error(message: &str, text: &str, line: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    let idx = line.saturating_sub(1).min(lines.len());
    let this = lines.get(idx).copied().unwrap_or("").trim();
    // An empty quoted key (`'' = 1`) is named as ``: then the key as written on the line is
    // clearer (fuzz target `config` found an error with an empty key).
    let named = message
        .split('`')
        .nth(1)
        .filter(|k| !k.is_empty())
        .filter(|_| message.contains("unknown field") || message.contains("missing field"));
    let on_line = this
        .split_once('=')
        .map(|(k, _)| k.trim())
        .filter(|k| !k.is_empty());
    // An empty `[]` names no table (fuzz target `config` found an error with an empty key).
    let header = |l: &str| {
        let l = l.trim();
        (l.starts_with('[') && l.ends_with(']'))
            .then(|| l.trim_matches(['[', ']']).trim().to_owned())
            .filter(|t| !t.is_empty())
    };
    // A missing field is reported at its table's header line: that header is the table.
    let table = header(this).or_else(|| lines[..idx].iter().rev().find_map(|l| header(l)));
    match (named.or(on_line), table) {
        (Some(k), Some(t)) => format!("{t}.{k}"),
        (Some(k), None) => k.to_owned(),
        (None, Some(t)) => t,
        (None, None) => "(syntax)".to_owned(),
    }
}

impl<'a> TryFrom<(RawConfig, Locator<'a>)> for Config {
    type Error = ConfigError;

    fn try_from((raw, at): (RawConfig, Locator<'a>)) -> Result<Config, ConfigError> {
        let addr = |v: &Option<Spanned<String>>, key: &str, default: &str| {
            at.socket_addr(v, key, default, "127.0.0.1:5050")
        };
        let listen = addr(&raw.listen, "listen", DEFAULT_LISTEN)?;
        let ops_listen = addr(&raw.ops_listen, "ops_listen", DEFAULT_OPS_LISTEN)?;
        if listen == ops_listen {
            let span = raw.ops_listen.as_ref().map(|s| s.span()).unwrap_or(0..0);
            return Err(at.err(&span, "ops_listen", "must differ from `listen`"));
        }

        let ecr = validate_ecr(&raw.ecr, at)?;
        let upstreams = validate_upstreams(raw.upstreams.as_ref(), at)?;

        let default_upstream = match &raw.default_upstream {
            None => None,
            Some(s) => {
                let reg = Registry::parse(s.get_ref()).filter(|r| upstreams.contains_key(r));
                Some(reg.ok_or_else(|| {
                    at.err(
                        &s.span(),
                        "default_upstream",
                        format!(
                            "{:?} is not a configured upstream (configured: {})",
                            s.get_ref(),
                            upstreams
                                .keys()
                                .map(Registry::as_str)
                                .collect::<Vec<_>>()
                                .join(", ")
                        ),
                    )
                })?)
            }
        };

        let defaults = Timeouts::default();
        let dur = |v: &Option<Spanned<String>>, key: &str, default: Duration| {
            at.positive_duration(v, key, default)
        };
        let timeouts = Timeouts {
            connect: dur(&raw.timeouts.connect, "timeouts.connect", defaults.connect)?,
            response_headers: dur(
                &raw.timeouts.response_headers,
                "timeouts.response_headers",
                defaults.response_headers,
            )?,
            shutdown: dur(
                &raw.timeouts.shutdown,
                "timeouts.shutdown",
                defaults.shutdown,
            )?,
        };

        let manifest_cache_bytes = raw
            .manifest_cache
            .max_bytes
            .as_ref()
            .map(|s| *s.get_ref())
            .unwrap_or(64 * 1024 * 1024);

        let webhook = crate::webhook::config::validate(&raw.webhook, at)?;
        let ecr_setup = crate::ecr::settings::EcrSetup::validate(
            &raw.ecr_setup,
            &upstreams,
            ecr.region.as_deref(),
            ecr.account.as_deref(),
        )
        .map_err(|e| at.err(&e.span, &e.key, e.message))?;
        let breaker = crate::mirror::breaker::validate(&raw.breaker, at)?;
        let server = crate::server::validate(&raw.server, at)?;

        Ok(Config {
            listen,
            ops_listen,
            default_upstream,
            ecr,
            upstreams,
            timeouts,
            manifest_cache_bytes,
            webhook,
            ecr_setup,
            breaker,
            server,
        })
    }
}

fn validate_ecr(raw: &RawEcr, at: Locator<'_>) -> Result<EcrConfig, ConfigError> {
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

fn validate_upstreams(
    raw: Option<&BTreeMap<Spanned<String>, Spanned<RawUpstream>>>,
    at: Locator<'_>,
) -> Result<BTreeMap<Registry, Upstream>, ConfigError> {
    let Some(raw) = raw else {
        return Ok(DEFAULT_UPSTREAMS
            .iter()
            .filter_map(|(reg, prefix)| {
                let reg = Registry::parse(reg)?;
                let server = reg.default_server();
                Some((
                    reg,
                    Upstream {
                        prefix: (*prefix).to_owned(),
                        server,
                    },
                ))
            })
            .collect());
    };
    if raw.is_empty() {
        return Err(at.err(
            &(0..0),
            "upstreams",
            "is empty: configure at least one registry",
        ));
    }
    let mut out: BTreeMap<Registry, Upstream> = BTreeMap::new();
    let mut prefixes: BTreeMap<String, Registry> = BTreeMap::new();
    for (name, up) in raw {
        let key = format!("upstreams.{:?}", name.get_ref());
        let reg = Registry::parse(name.get_ref()).ok_or_else(|| {
            at.err(
                &name.span(),
                &key,
                format!(
                    "{:?} is not a registry host name (with an optional :port)",
                    name.get_ref()
                ),
            )
        })?;
        let prefix = &up.get_ref().prefix;
        if !valid_prefix(prefix.get_ref()) {
            return Err(at.err(
                &prefix.span(),
                &format!("{key}.prefix"),
                format!(
                    "{:?} is not an ECR pull-through prefix: 2-30 characters, lowercase letters, \
                     digits and . _ - / (separators only between letters or digits)",
                    prefix.get_ref()
                ),
            ));
        }
        if let Some(other) = prefixes.insert(prefix.get_ref().clone(), reg.clone()) {
            return Err(at.err(
                &prefix.span(),
                &format!("{key}.prefix"),
                format!("{:?} is already the prefix of {other}", prefix.get_ref()),
            ));
        }
        let server = match &up.get_ref().server {
            None => reg.default_server(),
            Some(s) => {
                parse_base_url(s.get_ref()).ok_or_else(|| {
                    at.err(
                        &s.span(),
                        &format!("{key}.server"),
                        format!(
                            "{:?} is not a URL like \"https://registry.example.com\"",
                            s.get_ref()
                        ),
                    )
                })?;
                s.get_ref().trim_end_matches('/').to_owned()
            }
        };
        if out.contains_key(&reg) {
            return Err(at.err(
                &name.span(),
                &key,
                format!("{reg} is configured twice (an alias of it is configured too)"),
            ));
        }
        out.insert(
            reg,
            Upstream {
                prefix: prefix.get_ref().clone(),
                server,
            },
        );
    }
    Ok(out)
}

/// ECR's `ecrRepositoryPrefix`: 2-30 characters of `[a-z0-9._/-]`, where separators sit only
/// between alphanumerics, as in a repository name.
pub(crate) fn valid_prefix(p: &str) -> bool {
    (2..=30).contains(&p.len()) && crate::mirror::route::valid_name(p)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rstest::rstest;

    fn load(text: &str) -> Result<Config, ConfigError> {
        Config::from_toml_str(text, "pullthrough.toml")
    }

    #[test]
    fn empty_config_uses_console_defaults() {
        let c = load("").unwrap();
        assert_eq!(c.listen.to_string(), "127.0.0.1:5050");
        assert_eq!(c.ops_listen.to_string(), "127.0.0.1:5051");
        let got: Vec<(String, String)> = c
            .upstreams
            .iter()
            .map(|(r, u)| (r.to_string(), u.prefix.clone()))
            .collect();
        let mut want: Vec<(String, String)> = DEFAULT_UPSTREAMS
            .iter()
            .map(|(r, p)| (r.to_string(), p.to_string()))
            .collect();
        want.sort();
        assert_eq!(got, want);
        let hub = Registry::parse("docker.io").unwrap();
        assert_eq!(c.upstreams[&hub].server, "https://registry-1.docker.io");
        assert_eq!(c.timeouts, Timeouts::default());
        assert!(c.default_upstream.is_none());
    }

    #[test]
    fn full_example_parses() {
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca.pem");
        std::fs::copy(
            concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/tls/ca.pem"),
            &ca,
        )
        .unwrap();
        let text = format!(
            r#"
listen = "127.0.0.1:6000"
ops_listen = "127.0.0.1:6001"
default_upstream = "index.docker.io"

[ecr]
region = "eu-west-1"
account = "123456789012"
endpoint = "http://127.0.0.1:46100"
ca_file = "{}"

[upstreams."docker.io"]
prefix = "docker-hub"

[upstreams."quay.io"]
prefix = "quay"
server = "https://quay.example.com/"

[timeouts]
connect = "500ms"
response_headers = "2s"
shutdown = "1s"

[manifest_cache]
max_bytes = 1024
"#,
            ca.display()
        );
        let c = load(&text).unwrap();
        assert_eq!(c.default_upstream.unwrap().as_str(), "docker.io");
        assert_eq!(
            c.ecr.endpoint.unwrap().to_string(),
            "http://127.0.0.1:46100/"
        );
        assert_eq!(c.ecr.account.as_deref(), Some("123456789012"));
        assert_eq!(c.upstreams.len(), 2);
        let quay = Registry::parse("quay.io").unwrap();
        assert_eq!(c.upstreams[&quay].server, "https://quay.example.com");
        assert_eq!(c.timeouts.connect, Duration::from_millis(500));
        assert_eq!(c.manifest_cache_bytes, 1024);
    }

    #[rstest]
    #[case::unknown_top_key(
        "lisen = \"127.0.0.1:1\"\n",
        "pullthrough.toml:1: lisen: unknown field `lisen`"
    )]
    #[case::unknown_nested_key(
        "[ecr]\nregion = \"eu-west-1\"\nregoin = \"x\"\n",
        "pullthrough.toml:3: ecr.regoin: unknown field `regoin`"
    )]
    #[case::unknown_upstream_key(
        "[upstreams.\"docker.io\"]\nprefix = \"hub\"\nprfix = \"x\"\n",
        "pullthrough.toml:3: upstreams.\"docker.io\".prfix: unknown field `prfix`"
    )]
    #[case::bad_listen(
        "\n\nlisten = \"localhost\"\n",
        "pullthrough.toml:3: listen: \"localhost\" is not an IP:port address, e.g. \"127.0.0.1:5050\""
    )]
    #[case::same_ports(
        "listen = \"127.0.0.1:1\"\nops_listen = \"127.0.0.1:1\"\n",
        "pullthrough.toml:2: ops_listen: must differ from `listen`"
    )]
    #[case::uppercase_prefix(
        "[upstreams.\"docker.io\"]\nprefix = \"Docker\"\n",
        "pullthrough.toml:2: upstreams.\"docker.io\".prefix: \"Docker\" is not an ECR pull-through prefix"
    )]
    #[case::short_prefix(
        "[upstreams.\"docker.io\"]\nprefix = \"d\"\n",
        "pullthrough.toml:2: upstreams.\"docker.io\".prefix: \"d\" is not an ECR"
    )]
    #[case::long_prefix(
        "[upstreams.\"docker.io\"]\nprefix = \"abcdefghijklmnopqrstuvwxyz01234\"\n",
        "pullthrough.toml:2: upstreams.\"docker.io\".prefix: \"abcdefghijklmnopqrstuvwxyz01234\" is not"
    )]
    #[case::slash_edge_prefix(
        "[upstreams.\"docker.io\"]\nprefix = \"/hub\"\n",
        "pullthrough.toml:2: upstreams.\"docker.io\".prefix: \"/hub\" is not"
    )]
    #[case::bad_registry(
        "[upstreams.\"not a host\"]\nprefix = \"x1\"\n",
        "pullthrough.toml:1: upstreams.\"not a host\": \"not a host\" is not a registry host name"
    )]
    #[case::bad_port(
        "[upstreams.\"quay.io:http\"]\nprefix = \"x1\"\n",
        "pullthrough.toml:1: upstreams.\"quay.io:http\": \"quay.io:http\" is not a registry host name"
    )]
    #[case::alias_twice(
        "[upstreams.\"docker.io\"]\nprefix = \"a1\"\n[upstreams.\"index.docker.io\"]\nprefix = \"b1\"\n",
        "is configured twice"
    )]
    #[case::prefix_twice(
        "[upstreams.\"docker.io\"]\nprefix = \"a1\"\n[upstreams.\"quay.io\"]\nprefix = \"a1\"\n",
        "pullthrough.toml:4: upstreams.\"quay.io\".prefix: \"a1\" is already the prefix of docker.io"
    )]
    #[case::missing_prefix(
        "[upstreams.\"docker.io\"]\nserver = \"https://x.io\"\n",
        "pullthrough.toml:1: upstreams.\"docker.io\".prefix: missing field `prefix`"
    )]
    #[case::bad_server(
        "[upstreams.\"docker.io\"]\nprefix = \"hub\"\nserver = \"ftp://x\"\n",
        "pullthrough.toml:3: upstreams.\"docker.io\".server: \"ftp://x\" is not a URL"
    )]
    #[case::bad_endpoint(
        "[ecr]\nendpoint = \"http://127.0.0.1:1/v2\"\n",
        "pullthrough.toml:2: ecr.endpoint: \"http://127.0.0.1:1/v2\" is not a base URL"
    )]
    #[case::bad_account(
        "[ecr]\naccount = \"1234\"\n",
        "pullthrough.toml:2: ecr.account: \"1234\" is not a 12-digit AWS account id"
    )]
    #[case::bad_region(
        "[ecr]\nregion = \"Europe\"\n",
        "pullthrough.toml:2: ecr.region: \"Europe\" is not an AWS region name"
    )]
    #[case::missing_ca(
        "[ecr]\nca_file = \"/nonexistent/ca.pem\"\n",
        "pullthrough.toml:2: ecr.ca_file: \"/nonexistent/ca.pem\" is not a readable file"
    )]
    #[case::ca_not_pem(
        "[ecr]\nca_file = \"Cargo.toml\"\n",
        "pullthrough.toml:2: ecr.ca_file: \"Cargo.toml\" holds no PEM certificate"
    )]
    #[case::bad_duration(
        "[timeouts]\nconnect = \"soon\"\n",
        "pullthrough.toml:2: timeouts.connect: \"soon\" is not a positive duration"
    )]
    #[case::zero_duration(
        "[timeouts]\nresponse_headers = \"0s\"\n",
        "pullthrough.toml:2: timeouts.response_headers: \"0s\" is not a positive duration"
    )]
    #[case::default_not_configured(
        "default_upstream = \"ghcr.io\"\n[upstreams.\"docker.io\"]\nprefix = \"hub\"\n",
        "pullthrough.toml:1: default_upstream: \"ghcr.io\" is not a configured upstream (configured: docker.io)"
    )]
    #[case::syntax("listen = \n", "pullthrough.toml:1: listen:")]
    #[case::unclosed_table("[ecr\n", "pullthrough.toml:1: (syntax):")]
    #[case::empty_quoted_key("'' ='3'\n", "pullthrough.toml:1: '': unknown field ``")]
    #[case::empty_table_then_bare_key(
        "[]\nexc2\n",
        "pullthrough.toml:2: (syntax): key with no value"
    )]
    #[case::wrong_type_in_table(
        "[timeouts]\nconnect = 3\n",
        "pullthrough.toml:2: timeouts.connect: invalid type"
    )]
    #[case::wrong_type("listen = 5050\n", "pullthrough.toml:1: listen: invalid type")]
    fn invalid_configs_name_file_line_and_key(#[case] text: &str, #[case] want: &str) {
        let err = load(text).unwrap_err().to_string();
        assert!(
            err.contains(want),
            "error {err:?} does not contain {want:?}"
        );
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
        assert_eq!(Registry::parse(input).as_ref().map(Registry::as_str), want);
    }
}
