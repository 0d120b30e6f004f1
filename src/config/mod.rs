//! Configuration: the root of the config file. A raw, serde-shaped [`RawConfig`] is read from
//! TOML and turned into the validated [`Config`] the four programs use.
//!
//! The root owns the top-level keys (`listen`, `ops_listen`, `default_upstream`) and composes
//! the sections. The sections every program shares live beside
//! it ([`ecr`], [`upstreams`], [`timeouts`]); a section only one program or the shared server
//! reads lives with that code (`[breaker]` in [`crate::mirror::breaker`], `[manifest_cache]` in
//! [`crate::mirror::cache`], `[server]` in
//! [`crate::server`], `[webhook]` in [`crate::webhook::config`], `[ecr_setup]` in
//! [`crate::ecr::settings`]). Every section depends on [`error`] alone, never on this root, so the
//! arrows from here into program folders are the only ones between config and a program that
//! point this way, and no import circle runs through the config.
//!
//! Everything is checked here, once, before any socket is bound: a daemon on every node that starts
//! with a typo and then fails on the first pull is far worse than one that refuses to start. Each
//! error names the file, the line and the key, and `main` exits with 64 (`EX_USAGE`) on it.
//! The only `Option`s left in [`Config`] mean "discover it at run time" (region, account, endpoint),
//! never "not validated yet".

pub mod ecr;
pub mod error;
pub mod timeouts;
pub mod upstreams;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;

use serde::Deserialize;
use toml::Spanned;

pub use self::ecr::{EcrConfig, NoRegion};
pub use self::error::ConfigError;
use self::error::Locator;
pub use self::timeouts::Timeouts;
pub use self::upstreams::{DEFAULT_UPSTREAMS, Upstream};
use crate::oci::RegistryHost;

/// Default mirror address: loopback only, so nothing off the node can use the node's ECR identity.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:5050";
/// Default ops address: loopback too, like every listener of a hostNetwork process, so that
/// nothing is open on the node IP unless the config says so. The DaemonSet's config sets
/// `0.0.0.0:5051`, because kubelet probes and Prometheus reach the pod on the node IP.
pub const DEFAULT_OPS_LISTEN: &str = "127.0.0.1:5051";

/// The config as written, before validation. Unknown keys are errors.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    listen: Option<Spanned<String>>,
    ops_listen: Option<Spanned<String>>,
    default_upstream: Option<Spanned<String>>,
    #[serde(default)]
    ecr: ecr::RawEcr,
    upstreams: Option<BTreeMap<Spanned<String>, Spanned<upstreams::RawUpstream>>>,
    #[serde(default)]
    timeouts: timeouts::RawTimeouts,
    #[serde(default)]
    manifest_cache: crate::mirror::cache::RawManifestCache,
    #[serde(default)]
    webhook: crate::webhook::config::RawWebhook,
    #[serde(default)]
    ecr_setup: crate::ecr::settings::RawEcrSetup,
    #[serde(default)]
    breaker: crate::mirror::breaker::RawBreaker,
    #[serde(default)]
    server: crate::server::RawServer,
}

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where the mirror listens.
    pub listen: SocketAddr,
    /// Where `/healthz`, `/readyz` and `/metrics` listen.
    pub ops_listen: SocketAddr,
    /// The registry for clients that send neither `?ns=` nor a path prefix.
    pub default_upstream: Option<RegistryHost>,
    /// How to reach ECR.
    pub ecr: EcrConfig,
    /// Upstream registries, keyed by canonical registry host.
    pub upstreams: BTreeMap<RegistryHost, Upstream>,
    /// Timeouts towards ECR, and the shutdown grace period.
    pub timeouts: Timeouts,
    /// `[manifest_cache]`: verified manifests, and for a short while what tags resolved to.
    pub manifest_cache: crate::mirror::cache::CacheConfig,
    /// `[webhook]`: the admission webhook and `pullthrough rewrite`.
    pub webhook: crate::webhook::config::WebhookConfig,
    /// `[ecr_setup]`: what `pullthrough ecr setup` creates besides the rules.
    pub ecr_setup: crate::ecr::settings::EcrSetup,
    /// `[breaker]`: failing fast while the ECR endpoint refuses or hangs.
    pub breaker: crate::mirror::breaker::BreakerConfig,
    /// `[server]`: header read timeout and connection limit of each listener.
    pub server: crate::server::Limits,
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

        let ecr = ecr::validate(&raw.ecr, at)?;
        let upstreams = upstreams::validate(raw.upstreams.as_ref(), at)?;

        let default_upstream = match &raw.default_upstream {
            None => None,
            Some(s) => {
                let reg = RegistryHost::parse(s.get_ref()).filter(|r| upstreams.contains_key(r));
                Some(reg.ok_or_else(|| {
                    at.err(
                        &s.span(),
                        "default_upstream",
                        format!(
                            "{:?} is not a configured upstream (configured: {})",
                            s.get_ref(),
                            upstreams
                                .keys()
                                .map(RegistryHost::as_str)
                                .collect::<Vec<_>>()
                                .join(", ")
                        ),
                    )
                })?)
            }
        };

        let timeouts = timeouts::validate(&raw.timeouts, at)?;

        let manifest_cache = crate::mirror::cache::validate(&raw.manifest_cache, at)?;

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
            manifest_cache,
            webhook,
            ecr_setup,
            breaker,
            server,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rstest::rstest;
    use std::time::Duration;

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
        let hub = RegistryHost::parse("docker.io").unwrap();
        assert_eq!(c.upstreams[&hub].server, "https://registry-1.docker.io");
        assert_eq!(c.timeouts, Timeouts::default());
        assert!(c.default_upstream.is_none());
        assert_eq!(
            c.manifest_cache,
            crate::mirror::cache::CacheConfig {
                max_bytes: 64 * 1024 * 1024,
                tag_ttl: Duration::from_secs(300),
            }
        );
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
tag_ttl = "0s"
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
        let quay = RegistryHost::parse("quay.io").unwrap();
        assert_eq!(c.upstreams[&quay].server, "https://quay.example.com");
        assert_eq!(c.timeouts.connect, Duration::from_millis(500));
        assert_eq!(c.manifest_cache.max_bytes, 1024);
        assert_eq!(c.manifest_cache.tag_ttl, Duration::ZERO);
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
    #[case::bad_tag_ttl(
        "[manifest_cache]\ntag_ttl = \"soon\"\n",
        "pullthrough.toml:2: manifest_cache.tag_ttl: \"soon\" is not a duration, e.g. \"5m\", or \"0s\" for off"
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
}
