//! Does this node's containerd read `certs.d` at all? containerd's CRI plugin consults
//! `hosts.toml` files only when its registry `config_path` names the directory; without it, the
//! files pullthrough writes do nothing, silently. This module reads containerd's own config file
//! (pure: text in, verdict out) so the node agent can say so loudly.
//!
//! Reading the config file, mounted read-only, is the least-privileged way to know: the
//! alternative, CRI `Status` over containerd's socket, needs the socket, which is root on the
//! node.

/// Where the CRI plugin's registry settings live, by config `version`.
fn registry_path(version: i64) -> [&'static str; 2] {
    match version {
        // containerd 2.x.
        v if v >= 3 => ["plugins", "io.containerd.cri.v1.images"],
        // containerd 1.x with the long plugin names (AL2023's nodeadm writes this).
        2 => ["plugins", "io.containerd.grpc.v1.cri"],
        // Version 1 (or none): short plugin names.
        _ => ["plugins", "cri"],
    }
}

/// The verdict.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConfigPath {
    /// `config_path` names the certs.d directory: hosts.toml files take effect.
    Used {
        /// The `config_path` value.
        config_path: String,
    },
    /// containerd will not read the files pullthrough writes.
    NotUsed {
        /// Why, in words an operator can act on.
        reason: String,
    },
    /// The config does not say (a default applies, or an import may set it).
    Unknown {
        /// Why.
        reason: String,
    },
}

impl ConfigPath {
    /// The metric label for this verdict.
    pub fn label(&self) -> &'static str {
        match self {
            ConfigPath::Used { .. } => "used",
            ConfigPath::NotUsed { .. } => "not_used",
            ConfigPath::Unknown { .. } => "unknown",
        }
    }
}

/// The `imports` of a containerd config (paths or globs, as written), in order.
pub fn imports(text: &str) -> Vec<String> {
    toml::from_str::<toml::Table>(text)
        .ok()
        .and_then(|t| t.get("imports").and_then(|i| i.as_array()).cloned())
        .unwrap_or_default()
        .iter()
        .filter_map(|v| v.as_str().map(str::to_owned))
        .collect()
}

/// Checks whether containerd, configured by `main` and the already-read `imports` (later ones
/// override earlier ones, as containerd merges them), reads `hosts.toml` files from `certs_dir`
/// (the host path, e.g. `/etc/containerd/certs.d`).
pub fn check(main: &str, imports: &[String], certs_dir: &str) -> ConfigPath {
    let table: toml::Table = match toml::from_str(main) {
        Ok(t) => t,
        Err(e) => {
            return ConfigPath::Unknown {
                reason: format!("cannot parse containerd's config: {}", e.message().trim()),
            };
        }
    };
    let version = table
        .get("version")
        .and_then(|v| v.as_integer())
        .unwrap_or(1);
    let [plugins, plugin] = registry_path(version);
    let find = |t: &toml::Table| -> Option<(Option<String>, bool)> {
        let registry = t.get(plugins)?.get(plugin)?.get("registry")?;
        let config_path = registry
            .get("config_path")
            .and_then(|c| c.as_str())
            .map(str::to_owned);
        let mirrors = registry
            .get("mirrors")
            .and_then(|m| m.as_table())
            .is_some_and(|m| !m.is_empty());
        Some((config_path, mirrors))
    };
    let mut found = find(&table);
    for text in imports {
        if let Ok(t) = toml::from_str::<toml::Table>(text)
            && let Some(f) = find(&t)
        {
            found = Some(f);
        }
    }
    let want = certs_dir.trim_end_matches('/');
    match found {
        Some((Some(cp), _)) if !cp.is_empty() => {
            if cp.split(':').any(|p| p.trim_end_matches('/') == want) {
                ConfigPath::Used { config_path: cp }
            } else {
                ConfigPath::NotUsed {
                    reason: format!(
                        "containerd's registry config_path is \"{cp}\", which does not include {want}"
                    ),
                }
            }
        }
        Some((_, true)) => ConfigPath::NotUsed {
            reason: "containerd uses the deprecated registry.mirrors settings and no config_path, \
                     so it never reads certs.d: set config_path = \"/etc/containerd/certs.d\" \
                     (and move the mirrors into hosts.toml files)"
                .into(),
        },
        _ if version >= 3 => ConfigPath::Unknown {
            reason: "containerd's config sets no registry config_path; containerd 2.x then uses \
                     its built-in default (check with `containerd config dump`)"
                .into(),
        },
        _ => ConfigPath::NotUsed {
            reason: format!(
                "containerd's config (version {version}) sets no registry config_path, so \
                 containerd 1.x never reads certs.d: set \
                 [{plugins}.\"{plugin}\".registry] config_path = \"{want}\""
            ),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rstest::rstest;

    /// What AL2023's nodeadm writes (abridged).
    const AL2023: &str = r#"
version = 2
root = "/var/lib/containerd"
state = "/run/containerd"
imports = ["/etc/containerd/config.d/*.toml"]

[grpc]
address = "/run/containerd/containerd.sock"

[plugins."io.containerd.grpc.v1.cri".containerd]
default_runtime_name = "runc"
discard_unpacked_layers = true

[plugins."io.containerd.grpc.v1.cri"]
sandbox_image = "602401143452.dkr.ecr.us-west-2.amazonaws.com/eks/pause:3.5"

[plugins."io.containerd.grpc.v1.cri".registry]
config_path = "/etc/containerd/certs.d:/etc/docker/certs.d"
"#;

    const V3: &str = "version = 3\n[plugins.\"io.containerd.cri.v1.images\".registry]\nconfig_path = \"/etc/containerd/certs.d\"\n";
    const V2_NONE: &str =
        "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\"]\nsandbox_image = \"x\"\n";
    const V2_OTHER: &str = "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\".registry]\nconfig_path = \"/etc/docker/certs.d\"\n";
    const V2_MIRRORS: &str = "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\".registry.mirrors.\"docker.io\"]\nendpoint = [\"https://m\"]\n";
    const V1: &str = "[plugins.cri.registry]\nconfig_path = \"/etc/containerd/certs.d/\"\n";
    const IMPORT_SETS: &str = "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\".registry]\nconfig_path = \"/etc/containerd/certs.d\"\n";

    #[rstest]
    #[case::al2023(AL2023, &[], "used")]
    #[case::containerd2(V3, &[], "used")]
    #[case::containerd2_default("version = 3\n", &[], "unknown")]
    #[case::v1_short_names_trailing_slash(V1, &[], "used")]
    #[case::no_config_path(V2_NONE, &[], "not_used")]
    #[case::empty_file("", &[], "not_used")]
    #[case::other_dir(V2_OTHER, &[], "not_used")]
    #[case::deprecated_mirrors(V2_MIRRORS, &[], "not_used")]
    #[case::set_by_an_import(V2_NONE, &[IMPORT_SETS], "used")]
    #[case::overridden_by_an_import(AL2023, &[V2_OTHER], "not_used")]
    #[case::unparseable("version = = 2", &[], "unknown")]
    fn verdicts(#[case] main: &str, #[case] imports: &[&str], #[case] want: &str) {
        let imports: Vec<String> = imports.iter().map(|s| s.to_string()).collect();
        let got = check(main, &imports, "/etc/containerd/certs.d");
        assert_eq!(got.label(), want, "{got:?}");
    }

    #[test]
    fn not_used_says_what_to_set() {
        let ConfigPath::NotUsed { reason } = check(V2_NONE, &[], "/etc/containerd/certs.d") else {
            panic!()
        };
        assert!(
            reason.contains(
                "[plugins.\"io.containerd.grpc.v1.cri\".registry] config_path = \"/etc/containerd/certs.d\""
            ),
            "{reason}"
        );
    }

    #[test]
    fn imports_are_listed_in_order() {
        assert_eq!(imports(AL2023), vec!["/etc/containerd/config.d/*.toml"]);
        assert!(imports("x = 1").is_empty());
    }
}
