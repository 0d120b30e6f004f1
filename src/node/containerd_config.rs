//! Does this node's containerd read the `hosts.toml` files pullthrough writes? Pure: config
//! files and a containerd version in, a verdict out, so the node agent can say so loudly.
//!
//! containerd consults `hosts.toml` only when its CRI registry `config_path` names the directory,
//! and how it reads that setting depends on the version and on the pull path:
//!
//! - 1.6, 1.7 and 2.0 always pull "locally" and split `config_path` on `:`, trying each directory.
//! - 2.1 and later pull with the transfer service, which takes `config_path` as **one**
//!   directory: a colon list such as EKS AL2023's `/etc/containerd/certs.d:/etc/docker/certs.d`
//!   names a directory that never exists, so no `hosts.toml` is read and every pull goes to the
//!   registry itself, silently (containerd issues #12415, #12636; no fix merged). containerd falls
//!   back to the local pull when the config has a setting the transfer service does not support
//!   (`CheckLocalImagePullConfigs`); AL2023's `discard_unpacked_layers = true` is one, which is why
//!   AL2023 works.
//! - 2.2 uses that colon list as the default when `config_path` is unset.
//! - An unset `config_path` reads no `hosts.toml` at all on 1.6, 1.7 and 2.1: there is no fallback
//!   to `/etc/containerd/certs.d` (measured).
//!
//! The rule, with the measurements behind it, is in `tests/fixtures/containerd/NOTES.md`,
//! section 4. The steps here follow it: the effective config (imports replace whole plugin tables
//! on 1.x, merge key by key on 2.x), the CRI image settings (per config `version`, with 2.x's
//! migration of version 2 files), the pull path, the verdict.
//!
//! Reading the config files, mounted read-only, is the least-privileged way to know: the
//! alternative, CRI over containerd's socket, needs the socket, which is root on the node.

use std::fmt;

/// The CRI image plugin of containerd 2.x (config `version = 3`).
const IMAGES: &str = "io.containerd.cri.v1.images";
/// The CRI plugin's name in a `version = 2` config.
const CRI_V2: &str = "io.containerd.grpc.v1.cri";
/// The CRI plugin's name in a `version = 1` config (or one without `version`).
const CRI_V1: &str = "cri";
/// What containerd 2.2 uses when `config_path` is unset and no `registry.mirrors` are configured
/// (containerd #12636, #12617; from the issue and PR texts: no 2.2 could be run here).
const DEFAULT_CONFIG_PATH_2_2: &str = "/etc/containerd/certs.d:/etc/docker/certs.d";
/// The CRI default for `max_concurrent_downloads`; any other value forces the local pull on 2.1.
const DEFAULT_MAX_DOWNLOADS: i64 = 3;

/// A containerd release line (`major.minor`), as far as this check needs one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Version {
    /// `1` or `2`.
    pub major: u32,
    /// The minor release.
    pub minor: u32,
}

impl Version {
    /// `major.minor`.
    pub const fn new(major: u32, minor: u32) -> Version {
        Version { major, minor }
    }

    /// The version in `text`: a bare `2.1` or `2.1.9`, or what `containerd --version` prints
    /// (`containerd github.com/containerd/containerd/v2 v2.1.4 75cb…`, Debian's `… 1.7.24~ds1
    /// 1.7.24~ds1-6+deb13u1`), which is what EKS AL2023 keeps in
    /// `/etc/eks/containerd-version.txt`. As nodeadm reads that file: the first `N.N.N` anywhere
    /// in it; failing that, the first `N.N`.
    pub fn parse(text: &str) -> Option<Version> {
        let b = text.as_bytes();
        let number = |i: usize| -> Option<(u32, usize)> {
            let end = b[i..]
                .iter()
                .position(|c| !c.is_ascii_digit())
                .map_or(b.len(), |n| i + n);
            Some((text.get(i..end)?.parse().ok()?, end))
        };
        // Each run of digits that starts a number (not preceded by a digit or a `.`).
        let starts = (0..b.len()).filter(|&i| {
            b[i].is_ascii_digit() && (i == 0 || !(b[i - 1].is_ascii_digit() || b[i - 1] == b'.'))
        });
        let mut two_parts = None;
        for i in starts {
            let Some((major, end)) = number(i) else {
                continue;
            };
            if b.get(end) != Some(&b'.') || !b.get(end + 1).is_some_and(u8::is_ascii_digit) {
                continue;
            }
            let Some((minor, end)) = number(end + 1) else {
                continue;
            };
            if major == 0 {
                continue;
            }
            let v = Version { major, minor };
            if b.get(end) == Some(&b'.') && b.get(end + 1).is_some_and(u8::is_ascii_digit) {
                return Some(v);
            }
            two_parts.get_or_insert(v);
        }
        two_parts
    }

    /// 2.1 and later pull with the transfer service unless the config forces the local pull.
    fn has_transfer_pull(self) -> bool {
        self >= Version::new(2, 1)
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.major, self.minor)
    }
}

/// One file of containerd's config: the main file or an import, with its host path for messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Source {
    /// The file's path on the host.
    pub path: String,
    /// Its text.
    pub text: String,
}

/// The verdict for one certs.d directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConfigPath {
    /// containerd reads `hosts.toml` files from the directory.
    Used {
        /// The `config_path` value containerd uses.
        config_path: String,
        /// What was found, with anything that keeps it working.
        detail: String,
    },
    /// containerd will not read the files pullthrough writes: `config_path` is unset or names
    /// other directories.
    NotUsed {
        /// Why, and what to change.
        reason: String,
    },
    /// containerd would read them, but its transfer service skips every `hosts.toml` (a colon
    /// list on 2.1+), silently.
    Bypassed {
        /// Why, and what to change.
        reason: String,
    },
    /// The config could not be read or parsed.
    Unknown {
        /// Why.
        reason: String,
    },
}

impl ConfigPath {
    /// Every label, for a gauge that sets each one.
    pub const LABELS: [&'static str; 4] = ["used", "not_used", "bypassed", "unknown"];

    /// The metric label for this verdict.
    pub fn label(&self) -> &'static str {
        match self {
            ConfigPath::Used { .. } => "used",
            ConfigPath::NotUsed { .. } => "not_used",
            ConfigPath::Bypassed { .. } => "bypassed",
            ConfigPath::Unknown { .. } => "unknown",
        }
    }

    /// The text for the log and `/readyz`.
    pub fn message(&self) -> &str {
        match self {
            ConfigPath::Used { detail, .. } => detail,
            ConfigPath::NotUsed { reason }
            | ConfigPath::Bypassed { reason }
            | ConfigPath::Unknown { reason } => reason,
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

/// Checks whether containerd, configured by `files` (the main file first, then its imports in the
/// order containerd loads them), reads `hosts.toml` files from `certs_dir` (a host path, e.g.
/// `/etc/containerd/certs.d`). With no `version`, it assumes containerd 2.1 or later wherever the
/// version changes the verdict, and says so.
pub fn check(files: &[Source], certs_dir: &str, version: Option<Version>) -> ConfigPath {
    let mut parsed = Vec::with_capacity(files.len());
    for (i, f) in files.iter().enumerate() {
        match toml::from_str::<toml::Table>(&f.text) {
            Ok(table) => parsed.push(Parsed {
                version: table
                    .get("version")
                    .and_then(|v| v.as_integer())
                    .unwrap_or(1),
                table,
            }),
            Err(e) => {
                let what = if i == 0 { "config" } else { "imported config" };
                return ConfigPath::Unknown {
                    reason: format!(
                        "cannot parse containerd's {what} {}: {}",
                        f.path,
                        e.message().trim()
                    ),
                };
            }
        }
    }
    let Some(main) = parsed.first() else {
        return ConfigPath::Unknown {
            reason: "no containerd config to check".into(),
        };
    };
    let main_version = main.version;
    let dir = clean(certs_dir);
    if let Some(v) = version {
        return verdict(&parsed, &dir, Target::Known(v));
    }
    // A `version = 3` file is for 2.x; an older one can be read by 1.x or 2.x.
    let candidates: &[Version] = if main_version >= 3 {
        &[Version::new(2, 0), Version::new(2, 1)]
    } else {
        &[Version::new(1, 7), Version::new(2, 0), Version::new(2, 1)]
    };
    let assumed = verdict(&parsed, &dir, Target::Assumed);
    let differs = candidates
        .iter()
        .any(|v| verdict(&parsed, &dir, Target::Known(*v)).label() != assumed.label());
    if !differs {
        return assumed;
    }
    let note = "; this assumes containerd 2.1 or later, as the agent does not know this node's \
                containerd version (tell it with --containerd-version; on EKS AL2023 it reads \
                /etc/eks/containerd-version.txt)";
    match assumed {
        ConfigPath::Used {
            config_path,
            detail,
        } => ConfigPath::Used {
            config_path,
            detail: detail + note,
        },
        ConfigPath::NotUsed { reason } => ConfigPath::NotUsed {
            reason: reason + note,
        },
        ConfigPath::Bypassed { reason } => ConfigPath::Bypassed {
            reason: reason + note,
        },
        ConfigPath::Unknown { reason } => ConfigPath::Unknown { reason },
    }
}

/// A parsed config file.
struct Parsed {
    /// Its `version` (1 when absent, as containerd reads it).
    version: i64,
    table: toml::Table,
}

/// The containerd the verdict is for.
#[derive(Debug, Clone, Copy)]
enum Target {
    /// The agent knows the version.
    Known(Version),
    /// It does not: 2.1's rules, worded "2.1 or later".
    Assumed,
}

impl Target {
    fn version(self) -> Version {
        match self {
            Target::Known(v) => v,
            Target::Assumed => Version::new(2, 1),
        }
    }
    /// Names the containerd in messages.
    fn name(self) -> String {
        match self {
            Target::Known(v) => format!("containerd {v}"),
            Target::Assumed => "containerd 2.1 or later".into(),
        }
    }
}

/// The CRI image settings that decide whether `hosts.toml` is read (step 2 of the rule), with
/// containerd's defaults for what is absent.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Settings {
    config_path: String,
    use_local_image_pull: bool,
    disable_snapshot_annotations: bool,
    discard_unpacked_layers: bool,
    max_concurrent_downloads: i64,
    image_pull_with_sync_fs: bool,
    /// Registries with an entry in `registry.mirrors` (an empty table does not count).
    mirrors: Vec<String>,
    /// Whether `registry.configs` has an entry.
    configs: bool,
    /// Whether `registry.auths` has an entry.
    auths: bool,
}

impl Settings {
    /// Reads the settings from an images table laid out as 2.x's `io.containerd.cri.v1.images`.
    fn from_images(t: &toml::Table) -> Settings {
        let flag = |k: &str, default: bool| t.get(k).and_then(|v| v.as_bool()).unwrap_or(default);
        let registry = t.get("registry").and_then(|r| r.as_table());
        let keys = |k: &str| -> Vec<String> {
            registry
                .and_then(|r| r.get(k))
                .and_then(|m| m.as_table())
                .map(|m| m.keys().cloned().collect())
                .unwrap_or_default()
        };
        Settings {
            config_path: registry
                .and_then(|r| r.get("config_path"))
                .and_then(|c| c.as_str())
                .unwrap_or_default()
                .to_owned(),
            use_local_image_pull: flag("use_local_image_pull", false),
            disable_snapshot_annotations: flag("disable_snapshot_annotations", true),
            discard_unpacked_layers: flag("discard_unpacked_layers", false),
            max_concurrent_downloads: t
                .get("max_concurrent_downloads")
                .and_then(|v| v.as_integer())
                .unwrap_or(DEFAULT_MAX_DOWNLOADS),
            image_pull_with_sync_fs: flag("image_pull_with_sync_fs", false),
            mirrors: keys("mirrors"),
            configs: !keys("configs").is_empty(),
            auths: !keys("auths").is_empty(),
        }
    }

    /// The first setting that makes containerd 2.1's CRI fall back to the local pull, in the
    /// order of its `CheckLocalImagePullConfigs` (Linux), with `use_local_image_pull` first.
    fn local_pull_trigger(&self) -> Option<String> {
        if self.use_local_image_pull {
            Some("use_local_image_pull = true".into())
        } else if !self.disable_snapshot_annotations {
            Some("disable_snapshot_annotations = false".into())
        } else if self.discard_unpacked_layers {
            Some("discard_unpacked_layers = true".into())
        } else if !self.mirrors.is_empty() {
            Some("registry.mirrors".into())
        } else if self.configs {
            Some("registry.configs".into())
        } else if self.auths {
            Some("registry.auths".into())
        } else if self.max_concurrent_downloads != DEFAULT_MAX_DOWNLOADS {
            Some(format!(
                "max_concurrent_downloads = {}",
                self.max_concurrent_downloads
            ))
        } else if self.image_pull_with_sync_fs {
            Some("image_pull_with_sync_fs = true".into())
        } else {
            None
        }
    }
}

fn table_at<'t>(t: &'t toml::Table, keys: &[&str]) -> Option<&'t toml::Table> {
    keys.iter().try_fold(t, |t, k| t.get(*k)?.as_table())
}

/// The CRI image keys of a version 1 or 2 CRI plugin table, laid out as 2.x's images table.
/// `snapshotter`, `disable_snapshot_annotations` and `discard_unpacked_layers` live in its
/// `containerd` sub-table; 2.x's migration copies them only when that table also has `runtimes`
/// (it returns early before them otherwise: measured with 2.1.9), 1.x reads them always.
fn images_from_cri(cri: &toml::Table, migrating: bool) -> toml::Table {
    let mut out = toml::Table::new();
    for k in [
        "registry",
        "max_concurrent_downloads",
        "image_pull_with_sync_fs",
        "image_decryption",
        "image_pull_progress_timeout",
        "stats_collect_period",
    ] {
        if let Some(v) = cri.get(k) {
            out.insert(k.into(), v.clone());
        }
    }
    if let Some(c) = cri.get("containerd").and_then(|c| c.as_table())
        && (!migrating || c.contains_key("runtimes"))
    {
        for k in [
            "snapshotter",
            "disable_snapshot_annotations",
            "discard_unpacked_layers",
        ] {
            if let Some(v) = c.get(k) {
                out.insert(k.into(), v.clone());
            }
        }
    }
    out
}

/// containerd 1.x: an import replaces a whole plugin table, so the last file with a CRI plugin
/// table decides alone (measured with 1.6.20 and 1.7.24). 1.x knows no `version = 3` tables.
fn images_1x(files: &[Parsed]) -> toml::Table {
    files
        .iter()
        .filter_map(|f| match f.version {
            2 => table_at(&f.table, &["plugins", CRI_V2]),
            v if v < 2 => table_at(&f.table, &["plugins", CRI_V1]),
            _ => None,
        })
        .next_back()
        .map(|cri| images_from_cri(cri, false))
        .unwrap_or_default()
}

/// containerd 2.x: each file is migrated to the version 3 layout, then merged key by key, later
/// files winning (measured with 2.1.9). A version 1 file's CRI settings are dropped ("Ignoring
/// unknown key"), so it contributes none.
fn images_2x(files: &[Parsed]) -> toml::Table {
    let mut merged = toml::Table::new();
    for f in files {
        let mut t = table_at(&f.table, &["plugins", IMAGES])
            .cloned()
            .unwrap_or_default();
        match f.version {
            v if v >= 3 => {}
            2 => {
                if let Some(cri) = table_at(&f.table, &["plugins", CRI_V2]) {
                    t.extend(images_from_cri(cri, true));
                }
            }
            _ => t = toml::Table::new(),
        }
        deep_merge(&mut merged, t);
    }
    merged
}

fn deep_merge(into: &mut toml::Table, from: toml::Table) {
    for (k, v) in from {
        match (into.get_mut(&k), v) {
            (Some(toml::Value::Table(a)), toml::Value::Table(b)) => deep_merge(a, b),
            (_, v) => {
                into.insert(k, v);
            }
        }
    }
}

/// A path with `.`, repeated and trailing slashes, and `..` resolved, as Go's `filepath.Clean`.
pub(crate) fn clean(p: &str) -> String {
    let mut parts: Vec<&str> = Vec::new();
    for part in p.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            other => parts.push(other),
        }
    }
    let joined = parts.join("/");
    if p.starts_with('/') {
        format!("/{joined}")
    } else {
        joined
    }
}

/// Where to set `config_path`, in the layout of the node's main config file.
fn registry_table(main_version: i64, target: Target) -> &'static str {
    match main_version {
        v if v >= 3 => "[plugins.\"io.containerd.cri.v1.images\".registry]",
        2 => "[plugins.\"io.containerd.grpc.v1.cri\".registry]",
        _ if target.version().major >= 2 => "[plugins.\"io.containerd.cri.v1.images\".registry]",
        _ => "[plugins.cri.registry]",
    }
}

/// Steps 2 to 4 of the rule for one containerd.
fn verdict(files: &[Parsed], dir: &str, target: Target) -> ConfigPath {
    let v = target.version();
    let main_version = files.first().map_or(1, |f| f.version);
    let table = registry_table(main_version, target);
    let set_it = format!("set {table} config_path = \"{dir}\"");
    if v.major < 2 && main_version >= 3 {
        // Measured: 1.6.20 starts and ignores the 2.x tables; 1.7.24 refuses the file.
        let what = if v < Version::new(1, 7) {
            "starts but ignores its CRI settings"
        } else {
            "refuses to start with it"
        };
        return ConfigPath::NotUsed {
            reason: format!(
                "containerd's config is `version = 3`, which is for containerd 2.x: containerd \
                 {v} {what}, so it reads no hosts.toml. Write a `version = 2` config and set \
                 [plugins.\"io.containerd.grpc.v1.cri\".registry] config_path = \"{dir}\""
            ),
        };
    }
    let s = if v.major >= 2 {
        Settings::from_images(&images_2x(files))
    } else {
        Settings::from_images(&images_1x(files))
    };

    let mut config_path = s.config_path.clone();
    let mut defaulted = false;
    if config_path.is_empty() && v >= Version::new(2, 2) && s.mirrors.is_empty() {
        config_path = DEFAULT_CONFIG_PATH_2_2.into();
        defaulted = true;
    }
    if config_path.is_empty() {
        if !s.mirrors.is_empty() {
            return ConfigPath::NotUsed {
                reason: format!(
                    "containerd's config sets the deprecated registry.mirrors ({}) and no \
                     config_path, so containerd reads no hosts.toml. On Bottlerocket (which \
                     writes these from its settings) name the mirror in its settings instead: \
                     `pullthrough hosts --format bottlerocket`, and run the DaemonSet with the \
                     bottlerocket component. Elsewhere {set_it} and move the mirrors into \
                     hosts.toml files",
                    s.mirrors.join(", ")
                ),
            };
        }
        if v.major >= 2 && main_version < 2 {
            return ConfigPath::NotUsed {
                reason: format!(
                    "containerd's config has no `version` (or `version = 1`): {} ignores all its \
                     CRI settings, so it reads no hosts.toml. Migrate it (`containerd config \
                     migrate`) and {set_it}",
                    target.name()
                ),
            };
        }
        return ConfigPath::NotUsed {
            reason: format!(
                "containerd's config sets no registry config_path, so containerd reads no \
                 hosts.toml (it does not fall back to /etc/containerd/certs.d): {set_it}"
            ),
        };
    }

    let shown = if defaulted {
        format!(
            "config_path is unset, so {} uses \"{config_path}\"",
            target.name()
        )
    } else {
        format!("config_path = \"{config_path}\"")
    };
    let entries: Vec<String> = config_path
        .split(':')
        .filter(|e| !e.is_empty())
        .map(clean)
        .collect();
    let trigger = s.local_pull_trigger();
    let transfer = v.has_transfer_pull() && trigger.is_none();
    if transfer {
        if config_path.contains(':') {
            return ConfigPath::Bypassed {
                reason: format!(
                    "{} pulls with its transfer service, which reads config_path as one \
                     directory ({shown}); a list names a directory that does not exist, so \
                     containerd reads no hosts.toml and every pull goes to the registry itself \
                     (containerd issues #12415, #12636). Set {table} config_path = \"{dir}\", or \
                     set use_local_image_pull = true in [plugins.\"io.containerd.cri.v1.images\"] \
                     (discard_unpacked_layers = true, as EKS AL2023 ships it, has the same effect)",
                    target.name(),
                ),
            };
        }
        if clean(&config_path) == dir {
            return ConfigPath::Used {
                config_path,
                detail: format!("containerd reads hosts.toml from {dir} ({shown})"),
            };
        }
        return ConfigPath::NotUsed {
            reason: format!(
                "containerd's registry config_path is \"{config_path}\", which is not {dir}: \
                 {set_it}"
            ),
        };
    }

    // The local pull: each directory is tried in order.
    let Some(pos) = entries.iter().position(|e| *e == dir) else {
        return ConfigPath::NotUsed {
            reason: format!(
                "containerd's registry config_path is \"{config_path}\", which does not include \
                 {dir}: {set_it}"
            ),
        };
    };
    let mut detail = format!("containerd reads hosts.toml from {dir} ({shown})");
    if pos > 0 {
        detail.push_str(&format!(
            ". {} comes first: a <registry>/ or _default/ directory there hides pullthrough's \
             files",
            entries[..pos].join(", ")
        ));
    }
    if let Some(trigger) = trigger
        && v.has_transfer_pull()
        && config_path.contains(':')
    {
        detail.push_str(&format!(
            ". On {} this works only because {trigger} makes it pull locally: keep it, or set \
             config_path = \"{dir}\" (without it the transfer service reads no hosts.toml from a \
             list)",
            target.name()
        ));
    }
    ConfigPath::Used {
        config_path,
        detail,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rstest::rstest;

    const D: &str = "/etc/containerd/certs.d";

    macro_rules! fixture {
        ($name:literal) => {
            include_str!(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/tests/fixtures/containerd/",
                $name
            ))
        };
    }

    const DEFAULT_1_6: &str = fixture!("default-1.6.20.toml");
    const DEFAULT_1_7: &str = fixture!("default-1.7.24.toml");
    const DEFAULT_2_1: &str = fixture!("default-2.1.9.toml");
    const AL2023_1_7: &str = fixture!("eks-al2023-containerd1.7.toml");
    const AL2023_2: &str = fixture!("eks-al2023-containerd2.toml");
    const AL2023_2_SOCI: &str = fixture!("eks-al2023-containerd2-soci.toml");
    const BR_1_7: &str = fixture!("bottlerocket-containerd1.7.toml");
    const BR_2_1: &str = fixture!("bottlerocket-containerd2.1.toml");

    const V1_6: Option<Version> = Some(Version::new(1, 6));
    const V1_7: Option<Version> = Some(Version::new(1, 7));
    const V2_0: Option<Version> = Some(Version::new(2, 0));
    const V2_1: Option<Version> = Some(Version::new(2, 1));
    const V2_2: Option<Version> = Some(Version::new(2, 2));
    const UNKNOWN: Option<Version> = None;

    /// What nodeadm writes when a NodeConfig turns discard off (it merges the user's
    /// containerd.config into the rendered file itself), as #12415's reporter did.
    fn al2023_2_discard_off() -> String {
        AL2023_2.replace(
            "discard_unpacked_layers = true",
            "discard_unpacked_layers = false",
        )
    }
    /// AL2023 2.x with an `imports` line, and an import that turns discard off.
    fn al2023_2_importing() -> String {
        format!("imports = [\"/etc/containerd/config.d/*.toml\"]\n{AL2023_2}")
    }
    const IMPORT_DISCARD_OFF: &str =
        "version = 3\n[plugins.\"io.containerd.cri.v1.images\"]\ndiscard_unpacked_layers = false\n";

    const V3_COLON: &str = "version = 3\n[plugins.\"io.containerd.cri.v1.images\".registry]\nconfig_path = \"/etc/containerd/certs.d:/etc/docker/certs.d\"\n";
    const V3_SINGLE: &str = "version = 3\n[plugins.\"io.containerd.cri.v1.images\".registry]\nconfig_path = \"/etc/containerd/certs.d/\"\n";
    const V3_OTHER: &str = "version = 3\n[plugins.\"io.containerd.cri.v1.images\".registry]\nconfig_path = \"/etc/docker/certs.d\"\n";
    const V3_SECOND: &str = "version = 3\n[plugins.\"io.containerd.cri.v1.images\"]\ndiscard_unpacked_layers = true\n[plugins.\"io.containerd.cri.v1.images\".registry]\nconfig_path = \"/etc/docker/certs.d:/etc/containerd/certs.d\"\n";
    const V2_SINGLE: &str = "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\".registry]\nconfig_path = \"/etc/containerd/certs.d\"\n";
    const V2_COLON: &str = "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\".registry]\nconfig_path = \"/etc/containerd/certs.d:/etc/docker/certs.d\"\n";
    const V2_COLON_DISCARD_NO_RUNTIMES: &str = "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\".containerd]\ndiscard_unpacked_layers = true\n[plugins.\"io.containerd.grpc.v1.cri\".registry]\nconfig_path = \"/etc/containerd/certs.d:/etc/docker/certs.d\"\n";
    const V2_IMPORT_DISCARD_ONLY: &str = "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\".containerd]\ndiscard_unpacked_layers = true\n";
    const V1_SINGLE: &str = "[plugins.cri.registry]\nconfig_path = \"/etc/containerd/certs.d\"\n";

    fn with(setting: &str) -> String {
        format!("{V3_COLON}[plugins.\"io.containerd.cri.v1.images\"]\n{setting}\n")
    }

    fn sources(main: &str, imports: &[&str]) -> Vec<Source> {
        std::iter::once(main)
            .chain(imports.iter().copied())
            .enumerate()
            .map(|(i, text)| Source {
                path: format!("/etc/containerd/{i}.toml"),
                text: text.to_owned(),
            })
            .collect()
    }

    #[rstest]
    // Each version's `containerd config default`: no config_path, no hosts.toml.
    #[case::default_1_6(DEFAULT_1_6, &[], V1_6, "not_used")]
    #[case::default_1_6_unknown_version(DEFAULT_1_6, &[], UNKNOWN, "not_used")]
    #[case::default_1_7(DEFAULT_1_7, &[], V1_7, "not_used")]
    #[case::default_1_7_unknown_version(DEFAULT_1_7, &[], UNKNOWN, "not_used")]
    #[case::default_2_1(DEFAULT_2_1, &[], V2_1, "not_used")]
    #[case::default_2_1_unknown_version(DEFAULT_2_1, &[], UNKNOWN, "not_used")]
    // What EKS AL2023 ships: a colon list that works by the local pull.
    #[case::al2023_1_7(AL2023_1_7, &[], V1_7, "used")]
    #[case::al2023_1_7_unknown_version(AL2023_1_7, &[], UNKNOWN, "used")]
    #[case::al2023_1_7_config_on_2_1(AL2023_1_7, &[], V2_1, "used")]
    #[case::al2023_2(AL2023_2, &[], V2_1, "used")]
    #[case::al2023_2_unknown_version(AL2023_2, &[], UNKNOWN, "used")]
    #[case::al2023_2_soci(AL2023_2_SOCI, &[], V2_1, "used")]
    // ... until discard is turned off.
    #[case::al2023_2_discard_off(&al2023_2_discard_off(), &[], V2_1, "bypassed")]
    #[case::al2023_2_discard_off_unknown_version(&al2023_2_discard_off(), &[], UNKNOWN, "bypassed")]
    #[case::al2023_2_discard_off_on_2_0(&al2023_2_discard_off(), &[], V2_0, "used")]
    #[case::al2023_2_discard_off_by_an_import(&al2023_2_importing(), &[IMPORT_DISCARD_OFF], V2_1, "bypassed")]
    #[case::al2023_2_discard_off_by_an_import_unknown_version(&al2023_2_importing(), &[IMPORT_DISCARD_OFF], UNKNOWN, "bypassed")]
    // Bottlerocket: one directory on 2.1 (the transfer service reads it); inline mirrors on 1.7.
    #[case::bottlerocket_2_1(BR_2_1, &[], V2_1, "used")]
    #[case::bottlerocket_2_1_unknown_version(BR_2_1, &[], UNKNOWN, "used")]
    #[case::bottlerocket_1_7(BR_1_7, &[], V1_7, "not_used")]
    #[case::bottlerocket_1_7_unknown_version(BR_1_7, &[], UNKNOWN, "not_used")]
    // The local-pull triggers of CheckLocalImagePullConfigs, each alone with a colon list.
    #[case::colon_transfer(V3_COLON, &[], V2_1, "bypassed")]
    #[case::colon_on_2_0(V3_COLON, &[], V2_0, "used")]
    #[case::colon_use_local_image_pull(&with("use_local_image_pull = true"), &[], V2_1, "used")]
    #[case::colon_snapshot_annotations(&with("disable_snapshot_annotations = false"), &[], V2_1, "used")]
    #[case::colon_max_downloads(&with("max_concurrent_downloads = 10"), &[], V2_1, "used")]
    #[case::colon_max_downloads_default(&with("max_concurrent_downloads = 3"), &[], V2_1, "bypassed")]
    #[case::colon_sync_fs(&with("image_pull_with_sync_fs = true"), &[], V2_1, "used")]
    #[case::colon_registry_configs(&format!("{V3_COLON}[plugins.\"io.containerd.cri.v1.images\".registry.configs.\"quay.io\".tls]\ninsecure_skip_verify = true\n"), &[], V2_1, "used")]
    #[case::colon_empty_mirrors_table(&format!("{V3_COLON}[plugins.\"io.containerd.cri.v1.images\".registry.mirrors]\n"), &[], V2_1, "bypassed")]
    #[case::single_dir_transfer(V3_SINGLE, &[], V2_1, "used")]
    #[case::other_dir_transfer(V3_OTHER, &[], V2_1, "not_used")]
    #[case::second_in_list_local(V3_SECOND, &[], V2_1, "used")]
    // 2.2's default for an unset config_path is the colon list (from the PR text).
    #[case::unset_on_2_2("version = 3\n", &[], V2_2, "bypassed")]
    #[case::unset_on_2_2_local("version = 3\n[plugins.\"io.containerd.cri.v1.images\"]\ndiscard_unpacked_layers = true\n", &[], V2_2, "used")]
    #[case::unset_on_2_1("version = 3\n", &[], V2_1, "not_used")]
    // Config versions across containerd versions.
    #[case::v2_colon_on_1_7(V2_COLON, &[], V1_7, "used")]
    #[case::v2_colon_on_2_1(V2_COLON, &[], V2_1, "bypassed")]
    #[case::v2_colon_unknown_version(V2_COLON, &[], UNKNOWN, "bypassed")]
    #[case::v2_discard_without_runtimes_is_not_migrated(V2_COLON_DISCARD_NO_RUNTIMES, &[], V2_1, "bypassed")]
    #[case::v2_discard_without_runtimes_on_1_7(V2_COLON_DISCARD_NO_RUNTIMES, &[], V1_7, "used")]
    #[case::v3_on_1_7(V3_SINGLE, &[], V1_7, "not_used")]
    #[case::v3_on_1_6(V3_SINGLE, &[], V1_6, "not_used")]
    #[case::v1_on_1_7(V1_SINGLE, &[], V1_7, "used")]
    #[case::v1_on_2_1(V1_SINGLE, &[], V2_1, "not_used")]
    #[case::empty_file("", &[], V1_7, "not_used")]
    // Imports: 1.x replaces the whole CRI table, 2.x merges key by key.
    #[case::import_replaces_cri_table_on_1_7(V2_SINGLE, &[V2_IMPORT_DISCARD_ONLY], V1_7, "not_used")]
    #[case::import_merges_on_2_1(V2_SINGLE, &[V2_IMPORT_DISCARD_ONLY], V2_1, "used")]
    #[case::import_sets_config_path("version = 2\n", &[V2_SINGLE], V1_7, "used")]
    #[case::import_overrides_config_path(AL2023_2, &["version = 3\n[plugins.\"io.containerd.cri.v1.images\".registry]\nconfig_path = \"/etc/docker/certs.d\"\n"], V2_1, "not_used")]
    #[case::import_keeps_main_discard_on_2_1(AL2023_2, &[V3_COLON], V2_1, "used")]
    #[case::unparseable("version = = 2", &[], V2_1, "unknown")]
    #[case::unparseable_import(V3_SINGLE, &["[plugins"], V2_1, "unknown")]
    fn verdicts(
        #[case] main: &str,
        #[case] imports: &[&str],
        #[case] version: Option<Version>,
        #[case] want: &str,
    ) {
        let got = check(&sources(main, imports), D, version);
        assert_eq!(got.label(), want, "{got:?}");
    }

    /// The message says what to change (or what to keep).
    #[rstest]
    #[case::default_1_7(
        DEFAULT_1_7,
        V1_7,
        "set [plugins.\"io.containerd.grpc.v1.cri\".registry] config_path = \"/etc/containerd/certs.d\""
    )]
    #[case::default_1_6(DEFAULT_1_6, V1_6, "it does not fall back to /etc/containerd/certs.d")]
    #[case::default_2_1(
        DEFAULT_2_1,
        V2_1,
        "set [plugins.\"io.containerd.cri.v1.images\".registry] config_path = \"/etc/containerd/certs.d\""
    )]
    #[case::bottlerocket_1_7(BR_1_7, V1_7, "`pullthrough hosts --format bottlerocket`")]
    #[case::bottlerocket_1_7_mirrors(BR_1_7, V1_7, "registry.mirrors (docker.io, quay.io)")]
    #[case::bypassed(&al2023_2_discard_off(), V2_1, "containerd 2.1 pulls with its transfer service")]
    #[case::bypassed_fix(&al2023_2_discard_off(), V2_1, "Set [plugins.\"io.containerd.cri.v1.images\".registry] config_path = \"/etc/containerd/certs.d\", or set use_local_image_pull = true")]
    #[case::bypassed_issues(&al2023_2_discard_off(), V2_1, "#12415, #12636")]
    #[case::bypassed_unknown(&al2023_2_discard_off(), UNKNOWN, "containerd 2.1 or later pulls with its transfer service")]
    #[case::bypassed_unknown_says_how_to_tell(
        V2_COLON,
        UNKNOWN,
        "tell it with --containerd-version"
    )]
    #[case::al2023_keep_discard(
        AL2023_2,
        V2_1,
        "works only because discard_unpacked_layers = true makes it pull locally: keep it"
    )]
    #[case::al2023_soci_keep(
        AL2023_2_SOCI,
        V2_1,
        "disable_snapshot_annotations = false makes it pull locally"
    )]
    #[case::al2023_1_7_on_1_7(
        AL2023_1_7,
        V1_7,
        "containerd reads hosts.toml from /etc/containerd/certs.d (config_path = \"/etc/containerd/certs.d:/etc/docker/certs.d\")"
    )]
    #[case::hidden_by_an_earlier_dir(V3_SECOND, V2_1, "/etc/docker/certs.d comes first")]
    #[case::defaulted_on_2_2(
        "version = 3\n",
        V2_2,
        "config_path is unset, so containerd 2.2 uses \"/etc/containerd/certs.d:/etc/docker/certs.d\""
    )]
    #[case::v3_on_1_7(
        V3_SINGLE,
        V1_7,
        "`version = 3`, which is for containerd 2.x: containerd 1.7 refuses to start with it"
    )]
    #[case::v3_on_1_6(V3_SINGLE, V1_6, "containerd 1.6 starts but ignores its CRI settings")]
    #[case::v1_on_2_1(V1_SINGLE, V2_1, "containerd config migrate")]
    fn messages(#[case] main: &str, #[case] version: Option<Version>, #[case] want: &str) {
        let got = check(&sources(main, &[]), D, version);
        assert!(got.message().contains(want), "{got:?}");
    }

    #[test]
    fn the_unknown_version_note_appears_only_when_the_version_matters() {
        let used = check(&sources(AL2023_2, &[]), D, None);
        assert!(!used.message().contains("--containerd-version"), "{used:?}");
        let not_used = check(&sources(DEFAULT_1_7, &[]), D, None);
        assert!(
            !not_used.message().contains("--containerd-version"),
            "{not_used:?}"
        );
        let bypassed = check(&sources(&al2023_2_discard_off(), &[]), D, None);
        assert!(
            bypassed.message().contains("--containerd-version"),
            "{bypassed:?}"
        );
    }

    #[test]
    fn unparseable_names_the_file() {
        let got = check(&sources(V3_SINGLE, &["[plugins"]), D, V2_1);
        assert!(got.message().contains("/etc/containerd/1.toml"), "{got:?}");
    }

    #[rstest]
    #[case::debian_1_7(
        "containerd github.com/containerd/containerd 1.7.24~ds1 1.7.24~ds1-6+deb13u1",
        Some(Version::new(1, 7))
    )]
    #[case::debian_1_6(
        "containerd github.com/containerd/containerd 1.6.20~ds1 1.6.20~ds1-1+deb12u3\n",
        Some(Version::new(1, 6))
    )]
    #[case::debian_2_1(
        "containerd github.com/containerd/containerd/v2 2.1.9+unknown",
        Some(Version::new(2, 1))
    )]
    #[case::upstream_2_1(
        "containerd github.com/containerd/containerd/v2 v2.1.4 75cb2b7193e4e490e9fbdc236c0e811ccaba3376",
        Some(Version::new(2, 1))
    )]
    #[case::docker_package(
        "containerd containerd.io 1.7.27 05044ec0a9a75232cad458027ca83437aae3f4da",
        Some(Version::new(1, 7))
    )]
    #[case::bare("2.2", Some(Version::new(2, 2)))]
    #[case::package_name("containerd-2.1.4-1.amzn2023.0.1.x86_64", Some(Version::new(2, 1)))]
    #[case::patch_wins_over_a_short_one("go1.23 containerd 1.7.27", Some(Version::new(1, 7)))]
    #[case::bare_patch("v1.7.24", Some(Version::new(1, 7)))]
    #[case::major_only("2", None)]
    #[case::zero("0.9", None)]
    #[case::words("banana", None)]
    #[case::empty("", None)]
    fn versions(#[case] text: &str, #[case] want: Option<Version>) {
        assert_eq!(Version::parse(text), want);
    }

    #[rstest]
    #[case("/etc/containerd/certs.d/", "/etc/containerd/certs.d")]
    #[case("/etc//containerd/./certs.d", "/etc/containerd/certs.d")]
    #[case("/etc/docker/../containerd/certs.d", "/etc/containerd/certs.d")]
    #[case("certs.d/", "certs.d")]
    fn cleans_paths(#[case] p: &str, #[case] want: &str) {
        assert_eq!(clean(p), want);
    }

    #[test]
    fn imports_are_listed_in_order() {
        assert_eq!(imports(BR_2_1), vec!["/etc/containerd/config.d/*.toml"]);
        assert!(imports("x = 1").is_empty());
    }
}
