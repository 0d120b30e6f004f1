//! `[upstreams]`: the registries the mirror serves, each with its ECR pull-through rule prefix
//! and the real registry that `hosts.toml` names as `server`.

use std::collections::BTreeMap;

use serde::Deserialize;
use toml::Spanned;

use super::ecr::parse_base_url;
use super::error::{ConfigError, Locator};
use crate::oci::RegistryHost;

/// The AWS console's default pull-through rule prefixes, used when the config has no `[upstreams]`.
pub const DEFAULT_UPSTREAMS: &[(&str, &str)] = &[
    ("docker.io", "docker-hub"),
    ("ghcr.io", "github"),
    ("quay.io", "quay"),
    ("registry.k8s.io", "kubernetes"),
    ("public.ecr.aws", "ecr-public"),
    ("registry.gitlab.com", "gitlab"),
];

/// One `[upstreams."<registry>"]` table as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawUpstream {
    prefix: Spanned<String>,
    server: Option<Spanned<String>>,
}

/// A configured upstream registry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upstream {
    /// The ECR pull-through rule's repository prefix.
    pub prefix: String,
    /// The real registry, written into `hosts.toml` as `server`.
    pub server: String,
}

pub(crate) fn validate(
    raw: Option<&BTreeMap<Spanned<String>, Spanned<RawUpstream>>>,
    at: Locator<'_>,
) -> Result<BTreeMap<RegistryHost, Upstream>, ConfigError> {
    let Some(raw) = raw else {
        return Ok(DEFAULT_UPSTREAMS
            .iter()
            .filter_map(|(reg, prefix)| {
                let reg = RegistryHost::parse(reg)?;
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
    let mut out: BTreeMap<RegistryHost, Upstream> = BTreeMap::new();
    let mut prefixes: BTreeMap<String, RegistryHost> = BTreeMap::new();
    for (name, up) in raw {
        let key = format!("upstreams.{:?}", name.get_ref());
        let reg = RegistryHost::parse(name.get_ref()).ok_or_else(|| {
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
    (2..=30).contains(&p.len()) && crate::oci::valid_name(p)
}
