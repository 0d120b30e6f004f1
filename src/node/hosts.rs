//! Node runtime configuration that points pulls at the mirror: containerd `hosts.toml` files (one
//! per upstream registry), and the same routing rendered for CRI-O/podman (`registries.conf`) and
//! Bottlerocket (its `settings.container-registry.mirrors`).
//!
//! Rendering and the decision of what to do with a file already on the node ([`plan`]) are pure
//! and table-tested here; [`super::install`] only carries those decisions out. Three rules keep a
//! node safe:
//! - pullthrough changes or removes only files that carry its [`MARKER`];
//! - a `hosts.toml` someone else wrote is kept: pullthrough hard-links it to [`BACKUP_NAME`] and
//!   writes a copy with the mirror inserted as the first host, so `--remove` can rename the
//!   original back, byte for byte (same inode, mode and mtime). A file it cannot merge safely is
//!   skipped with a reason;
//! - every write is atomic (temporary file, fsync, rename), because containerd re-reads the file
//!   on every pull and silently ignores one it cannot parse.

use std::net::SocketAddr;

use crate::config::Config;

/// The first line of every file pullthrough writes.
pub const MARKER: &str =
    "# Managed by pullthrough (`pullthrough hosts`): changes here are overwritten.";

/// Where a `hosts.toml` that pullthrough merged into is kept, beside it. containerd reads only
/// `hosts.toml` and `*.crt`/`*.cert`/`*.key` files, so the backup is inert.
pub const BACKUP_NAME: &str = "hosts.toml.pullthrough-orig";

/// In a file pullthrough wrote into a directory it created, so that `--remove` deletes the
/// directory too and leaves certs.d exactly as it was.
pub(crate) const CREATED_DIR: &str =
    "# pullthrough created this directory; `pullthrough hosts --remove` deletes it.";

/// In a merged file: where the original is.
const MERGED: &str = "# pullthrough put its mirror first. The file as it was is hosts.toml.pullthrough-orig;\n\
                      # `pullthrough hosts --remove` puts it back.";

/// How long containerd may take to connect to the mirror. The mirror is on loopback, so a
/// connect either succeeds at once or is refused at once; the bound only matters when the
/// listen backlog is full, and then falling back upstream quickly is right. containerd 2.1 reads
/// it; 1.6 and 1.7 (go-toml v1) and 2.0 (go-toml v2) ignore unknown keys, so it is safe on
/// every supported version.
pub const DIAL_TIMEOUT: &str = "1s";

/// Output formats of `pullthrough hosts`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// containerd `certs.d/<registry>/hosts.toml` files.
    Containerd,
    /// A containers-registries.conf(5) drop-in for CRI-O, podman, skopeo and buildah.
    RegistriesConf,
    /// Bottlerocket `settings.container-registry.mirrors`.
    Bottlerocket,
}

/// The mirror URL containerd should use: the listen address, with a wildcard bind replaced by
/// loopback (containerd runs on the same node).
pub fn mirror_url(listen: SocketAddr) -> String {
    format!("http://{}", mirror_authority(listen))
}

/// `host:port` of the mirror as seen from the node.
pub fn mirror_authority(listen: SocketAddr) -> String {
    match listen {
        SocketAddr::V4(a) if a.ip().is_unspecified() => format!("127.0.0.1:{}", a.port()),
        SocketAddr::V4(a) => a.to_string(),
        SocketAddr::V6(a) if a.ip().is_unspecified() => format!("[::1]:{}", a.port()),
        SocketAddr::V6(a) => format!("[{}]:{}", a.ip(), a.port()),
    }
}

fn quote(s: &str) -> String {
    toml::Value::String(s.to_owned()).to_string()
}

fn host_table(mirror: &str) -> String {
    format!(
        "[host.{}]\n  capabilities = [\"pull\", \"resolve\"]\n  dial_timeout = \"{DIAL_TIMEOUT}\"\n",
        quote(mirror)
    )
}

/// Renders one fresh `hosts.toml`.
pub fn render(server: &str, mirror: &str) -> String {
    format!(
        "{MARKER}\n\
         # containerd tries the mirror first and falls back to `server` when it refuses, errors or misses.\n\
         server = {}\n\
         \n\
         {}",
        quote(server),
        host_table(mirror),
    )
}

fn render_fresh(server: &str, mirror: &str, created_dir: bool) -> String {
    let text = render(server, mirror);
    if created_dir {
        // After the marker, so the marker stays the first line.
        text.replacen('\n', &format!("\n{CREATED_DIR}\n"), 1)
    } else {
        text
    }
}

/// Why pullthrough will not merge itself into a `hosts.toml` it did not write.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MergeRefusal {
    /// containerd cannot parse it either; leave it to its owner.
    #[error("it is not valid TOML ({0})")]
    NotToml(String),
    /// The file already sends pulls to the mirror.
    #[error("it already names the mirror {0}")]
    AlreadyNamesMirror(String),
    /// Hosts given as dotted keys before any table: the mirror could not be put first.
    #[error("it defines hosts with dotted keys, so the mirror cannot be put first")]
    DottedHosts,
    /// The merged text did not come out as the original plus one host (a safety net).
    #[error("merging would change more than the mirror host")]
    Unsafe,
}

/// Inserts the mirror as the first host of `original`, keeping every other byte of it.
///
/// containerd tries hosts in the order their tables appear in the file (1.6 sorts by position,
/// 2.x reads tables in order), so the mirror's table goes right before the first table. The
/// first table is the first line starting with `[` whose preceding text parses as TOML on its
/// own, which skips `[` lines inside multi-line arrays and strings. The result is checked: it
/// must parse, and minus the mirror host it must equal the original.
pub fn merge(original: &str, mirror: &str) -> Result<String, MergeRefusal> {
    let parsed: toml::Table =
        toml::from_str(original).map_err(|e| MergeRefusal::NotToml(first_line(&e.to_string())))?;
    if let Some(hosts) = parsed.get("host").and_then(|h| h.as_table())
        && hosts.contains_key(mirror)
    {
        return Err(MergeRefusal::AlreadyNamesMirror(mirror.to_owned()));
    }
    let mut split = original.len();
    let mut offset = 0;
    for line in original.split_inclusive('\n') {
        if line.trim_start().starts_with('[')
            && toml::from_str::<toml::Table>(&original[..offset]).is_ok()
        {
            split = offset;
            break;
        }
        offset += line.len();
    }
    let (head, tail) = original.split_at(split);
    let head_table: toml::Table = toml::from_str(head).map_err(|_| MergeRefusal::Unsafe)?;
    if head_table.contains_key("host") {
        return Err(MergeRefusal::DottedHosts);
    }
    let sep = if head.is_empty() || head.ends_with('\n') {
        ""
    } else {
        "\n"
    };
    let merged = format!(
        "{MARKER}\n{MERGED}\n{head}{sep}{}\n{tail}",
        host_table(mirror)
    );
    let mut check: toml::Table = toml::from_str(&merged).map_err(|_| MergeRefusal::Unsafe)?;
    let ours_removed = check
        .get_mut("host")
        .and_then(|h| h.as_table_mut())
        .and_then(|h| h.remove(mirror))
        .is_some();
    if check
        .get("host")
        .and_then(|h| h.as_table())
        .is_some_and(|h| h.is_empty())
        && !parsed.contains_key("host")
    {
        check.remove("host");
    }
    if !ours_removed || check != parsed {
        return Err(MergeRefusal::Unsafe);
    }
    Ok(merged)
}

fn first_line(s: &str) -> String {
    s.lines().next().unwrap_or_default().trim().to_owned()
}

/// What is on the node for one registry directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Found<'a> {
    /// `hosts.toml`, if present.
    pub hosts: Option<&'a str>,
    /// [`BACKUP_NAME`], if present.
    pub backup: Option<&'a str>,
    /// Whether the directory exists.
    pub dir_exists: bool,
    /// Whether the directory holds Docker-style certificate files (`*.crt`, `*.cert`, `*.key`).
    /// containerd reads them only when there is no `hosts.toml`, so writing one would hide them.
    pub has_cert_files: bool,
}

/// What to do with one registry directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// The file is already right.
    Unchanged,
    /// Write `hosts.toml`.
    Write {
        /// The new contents.
        text: String,
        /// First keep the current (foreign) `hosts.toml` as the backup.
        backup_current: bool,
        /// What this write amounts to, for the report.
        change: Change,
    },
    /// Leave the directory alone.
    Skip(String),
}

/// What happened to one registry directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// A new file.
    Created,
    /// pullthrough's own file, rewritten.
    Updated,
    /// A foreign file, kept as the backup, with the mirror merged in first.
    Merged,
    /// Already right.
    Unchanged,
    /// Left alone, with the reason.
    Skipped(String),
    /// pullthrough's file deleted.
    Removed,
    /// The original put back from the backup.
    Restored,
    /// A backup whose `hosts.toml` was since replaced by someone else: deleted, their file kept.
    DroppedStaleBackup,
}

impl std::fmt::Display for Change {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Change::Created => f.write_str("created"),
            Change::Updated => f.write_str("updated"),
            Change::Merged => f.write_str("merged (original kept in hosts.toml.pullthrough-orig)"),
            Change::Unchanged => f.write_str("unchanged"),
            Change::Skipped(why) => write!(f, "skipped: {why}"),
            Change::Removed => f.write_str("removed"),
            Change::Restored => f.write_str("restored"),
            Change::DroppedStaleBackup => f.write_str("dropped a stale backup"),
        }
    }
}

pub(crate) fn is_ours(text: &str) -> bool {
    text.starts_with(MARKER)
}

/// Decides what `install` does with one registry directory. Pure.
pub fn plan(found: Found<'_>, server: &str, mirror: &str) -> Action {
    let desired_merge =
        |original: &str, backup_current: bool, change: Change| match merge(original, mirror) {
            Ok(text) => Action::Write {
                text,
                backup_current,
                change,
            },
            Err(why) => Action::Skip(format!(
                "an existing hosts.toml was not written by pullthrough and {why}"
            )),
        };
    let converge = |current: &str, desired: Action| match desired {
        Action::Write { text, .. } if text == current => Action::Unchanged,
        other => other,
    };
    match (found.hosts, found.backup) {
        (Some(current), _) if !is_ours(current) => desired_merge(current, true, Change::Merged),
        (Some(current), Some(original)) => converge(current, desired_merge(original, false, Change::Updated)),
        (Some(current), None) => {
            let text = render_fresh(server, mirror, current.contains(CREATED_DIR));
            converge(current, Action::Write { text, backup_current: false, change: Change::Updated })
        }
        // Someone deleted the merged file; the backup still says what the owner wants.
        (None, Some(original)) => desired_merge(original, false, Change::Merged),
        (None, None) if found.has_cert_files => Action::Skip(
            "the directory holds certificate files, which containerd stops reading once a hosts.toml exists".into(),
        ),
        (None, None) => Action::Write {
            text: render_fresh(server, mirror, !found.dir_exists),
            backup_current: false,
            change: Change::Created,
        },
    }
}

/// Renders a containers-registries.conf(5) drop-in (`/etc/containers/registries.conf.d/`) for
/// CRI-O, podman, skopeo and buildah. They do not send containerd's `?ns=`, so each mirror
/// location carries the registry as a path prefix (`127.0.0.1:5050/docker.io`), which the mirror
/// routes the same way.
pub fn render_registries_conf(config: &Config) -> String {
    let mirror = mirror_authority(config.listen);
    // Not the hosts.toml MARKER: nothing installs, updates or removes this file, so it must not
    // promise that changes are overwritten. It says where it goes and how to make it again.
    let mut out = String::from(
        "# pullthrough's routing for CRI-O, podman, skopeo and buildah: a\n\
         # containers-registries.conf(5) drop-in. Nothing installs or updates it: put it in place\n\
         # by hand, e.g. as /etc/containers/registries.conf.d/50-pullthrough.conf, and regenerate\n\
         # it with `pullthrough hosts --config <config> --format registries-conf` when the\n\
         # upstreams change.\n\
         # Each registry is tried through the mirror first, then at `location`.\n",
    );
    for (reg, up) in &config.upstreams {
        let (location, insecure) = match up.server.split_once("://") {
            Some(("http", rest)) => (rest, true),
            Some((_, rest)) => (rest, false),
            None => (up.server.as_str(), false),
        };
        let location = location.trim_end_matches('/');
        out.push_str(&format!(
            "\n[[registry]]\nprefix = {}\nlocation = {}\n",
            quote(reg.as_str()),
            quote(location)
        ));
        if insecure {
            out.push_str("insecure = true\n");
        }
        out.push_str(&format!(
            "\n[[registry.mirror]]\nlocation = {}\ninsecure = true\n",
            quote(&format!("{mirror}/{}", reg.as_str()))
        ));
    }
    out
}

/// Renders Bottlerocket settings. Bottlerocket writes containerd's registry config itself (and
/// overwrites a DaemonSet's certs.d files), so the mirror goes into its API settings instead:
/// user data, or `apiclient apply` from the admin container. containerd still adds `?ns=` and
/// still falls back to the registry itself.
pub fn render_bottlerocket(config: &Config) -> String {
    let mirror = mirror_url(config.listen);
    let mut out = String::from(
        "# Bottlerocket settings for pullthrough. Put them in the node's user data, or apply them\n\
         # on a running node: pullthrough hosts --format bottlerocket | apiclient apply\n\
         # Then run the DaemonSet with the `bottlerocket` component (no hosts.toml installer).\n",
    );
    for reg in config.upstreams.keys() {
        out.push_str(&format!(
            "\n[[settings.container-registry.mirrors]]\nregistry = {}\nendpoint = [{}]\n",
            quote(reg.as_str()),
            quote(&mirror)
        ));
    }
    out
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use rstest::rstest;

    const MIRROR: &str = "http://127.0.0.1:5050";
    const SERVER: &str = "https://registry-1.docker.io";

    #[rstest]
    #[case::loopback("127.0.0.1:5050", "http://127.0.0.1:5050")]
    #[case::wildcard("0.0.0.0:5050", "http://127.0.0.1:5050")]
    #[case::v6_wildcard("[::]:5050", "http://[::1]:5050")]
    #[case::v6("[::1]:6000", "http://[::1]:6000")]
    fn mirror_urls(#[case] listen: &str, #[case] want: &str) {
        assert_eq!(mirror_url(listen.parse().unwrap()), want);
    }

    #[test]
    fn golden_docker_hub() {
        let got = render(SERVER, MIRROR);
        let want = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/hosts/docker.io.toml"
        ))
        .unwrap();
        assert_eq!(got, want);
    }

    #[test]
    fn rendered_files_parse_as_containerd_expects() {
        let cfg = Config::from_toml_str(
            "listen = \"0.0.0.0:5999\"\nops_listen = \"127.0.0.1:6000\"",
            "t",
        )
        .unwrap();
        assert_eq!(cfg.upstreams.len(), 6);
        let mirror = mirror_url(cfg.listen);
        for (reg, up) in &cfg.upstreams {
            let text = render(&up.server, &mirror);
            let v: toml::Table = toml::from_str(&text).unwrap();
            assert_eq!(v["server"].as_str().unwrap(), cfg.upstreams[reg].server);
            let host = &v["host"]["http://127.0.0.1:5999"];
            assert_eq!(host["capabilities"].as_array().unwrap().len(), 2);
            assert_eq!(host["dial_timeout"].as_str(), Some(DIAL_TIMEOUT));
        }
    }

    pub(crate) const CORP: &str = "server = \"https://registry-1.docker.io\"\n\n[host.\"https://mirror.corp.example\"]\n  capabilities = [\"pull\", \"resolve\"]\n  ca = \"/etc/certs/corp.pem\"\n";

    /// `head` is where the mirror's table must go: the original's text before its first table.
    #[rstest]
    #[case::server_and_host(CORP, "server = \"https://registry-1.docker.io\"\n\n")]
    #[case::server_only("server = \"https://r.example\"\n", "server = \"https://r.example\"\n")]
    #[case::no_trailing_newline("server = \"https://r.example\"", "server = \"https://r.example\"")]
    #[case::empty_file("", "")]
    #[case::comments_kept(
        "# ours\nserver = \"https://r.example\" # trailing\n[host.\"https://a\"]\n",
        "# ours\nserver = \"https://r.example\" # trailing\n"
    )]
    #[case::bracket_line_inside_array(
        "client = [\n[\"/c.pem\", \"/k.pem\"],\n]\n[host.\"https://a\"]\n",
        "client = [\n[\"/c.pem\", \"/k.pem\"],\n]\n"
    )]
    #[case::bracket_line_inside_string(
        "server = \"https://r.example\"\nnote = \"\"\"\n[not a table]\n\"\"\"\n[host.\"https://a\"]\n",
        "server = \"https://r.example\"\nnote = \"\"\"\n[not a table]\n\"\"\"\n"
    )]
    #[case::table_first("[host.\"https://a\"]\ncapabilities = [\"pull\"]\n", "")]
    fn merge_puts_the_mirror_first_and_keeps_every_byte(
        #[case] original: &str,
        #[case] head: &str,
    ) {
        let merged = merge(original, MIRROR).unwrap();
        let tail = original.strip_prefix(head).unwrap();
        let sep = if head.is_empty() || head.ends_with('\n') {
            ""
        } else {
            "\n"
        };
        let want = format!(
            "{MARKER}\n{MERGED}\n{head}{sep}{}\n{tail}",
            host_table(MIRROR)
        );
        assert_eq!(merged, want);
        // The mirror's table is the first host table containerd sees.
        assert_eq!(
            merged.find("[host."),
            merged.find(&format!("[host.\"{MIRROR}\"]"))
        );
    }

    #[rstest]
    #[case::not_toml("server = \n", "is not valid TOML")]
    #[case::already_has_mirror("[host.\"http://127.0.0.1:5050\"]\n", "already names the mirror")]
    #[case::dotted_hosts("host.\"https://a\".capabilities = [\"pull\"]\n", "dotted keys")]
    fn merge_refuses(#[case] original: &str, #[case] want: &str) {
        let err = merge(original, MIRROR).unwrap_err();
        assert!(err.to_string().contains(want), "{err}");
    }

    fn found<'a>(hosts: Option<&'a str>, backup: Option<&'a str>) -> Found<'a> {
        Found {
            hosts,
            backup,
            dir_exists: true,
            has_cert_files: false,
        }
    }

    fn kind(a: &Action) -> String {
        match a {
            Action::Unchanged => "unchanged".into(),
            Action::Skip(_) => "skip".into(),
            Action::Write {
                backup_current,
                change,
                ..
            } => format!("{change:?}{}", if *backup_current { "+backup" } else { "" }),
        }
    }

    #[rstest]
    #[case::new_dir(Found { hosts: None, backup: None, dir_exists: false, has_cert_files: false }, "Created")]
    #[case::existing_empty_dir(found(None, None), "Created")]
    #[case::cert_files_only(Found { hosts: None, backup: None, dir_exists: true, has_cert_files: true }, "skip")]
    #[case::foreign_file(found(Some(CORP), None), "Merged+backup")]
    #[case::foreign_file_over_stale_backup(
        found(Some(CORP), Some("server = \"https://old\"\n")),
        "Merged+backup"
    )]
    #[case::foreign_unparseable(found(Some("server = = 1"), None), "skip")]
    #[case::merged_deleted_by_someone(found(None, Some(CORP)), "Merged")]
    fn plan_decides(#[case] f: Found<'_>, #[case] want: &str) {
        assert_eq!(kind(&plan(f, SERVER, MIRROR)), want);
    }

    #[test]
    fn plan_converges_on_its_own_output() {
        let fresh = render_fresh(SERVER, MIRROR, true);
        assert_eq!(
            plan(found(Some(&fresh), None), SERVER, MIRROR),
            Action::Unchanged
        );
        let merged = merge(CORP, MIRROR).unwrap();
        assert_eq!(
            plan(found(Some(&merged), Some(CORP)), SERVER, MIRROR),
            Action::Unchanged
        );
        // A changed server or mirror rewrites pullthrough's own file, keeping the created-dir note.
        let a = plan(found(Some(&fresh), None), "https://other", MIRROR);
        let Action::Write {
            text,
            backup_current: false,
            change: Change::Updated,
        } = a
        else {
            panic!("{a:?}")
        };
        assert!(text.contains(CREATED_DIR) && text.contains("https://other"));
        let a = plan(
            found(Some(&merged), Some(CORP)),
            SERVER,
            "http://127.0.0.1:6000",
        );
        assert_eq!(kind(&a), "Updated");
    }

    fn cfg(upstreams: &str) -> Config {
        Config::from_toml_str(upstreams, "t").unwrap()
    }

    #[rstest]
    #[case::containers(
        "listen = \"127.0.0.1:5050\"\n[upstreams.\"docker.io\"]\nprefix = \"docker-hub\"\n[upstreams.\"quay.io\"]\nprefix = \"quay\"\nserver = \"http://127.0.0.1:1\"\n",
        Format::RegistriesConf,
        "registries.conf"
    )]
    #[case::bottlerocket(
        "listen = \"127.0.0.1:5050\"\n[upstreams.\"docker.io\"]\nprefix = \"docker-hub\"\n[upstreams.\"quay.io\"]\nprefix = \"quay\"\n",
        Format::Bottlerocket,
        "bottlerocket.toml"
    )]
    fn golden_other_runtimes(#[case] config: &str, #[case] format: Format, #[case] fixture: &str) {
        let c = cfg(config);
        let got = match format {
            Format::RegistriesConf => render_registries_conf(&c),
            Format::Bottlerocket => render_bottlerocket(&c),
            Format::Containerd => unreachable!(),
        };
        let path = format!(
            "{}/tests/fixtures/hosts/{fixture}",
            env!("CARGO_MANIFEST_DIR")
        );
        let want = std::fs::read_to_string(&path).unwrap();
        assert_eq!(got, want, "{path}");
        // Neither is a file pullthrough manages, so neither says it overwrites changes.
        assert!(
            !got.contains(MARKER) && !got.contains("overwritten"),
            "{got}"
        );
        // Both are TOML.
        let _: toml::Table = toml::from_str(&got).unwrap();
    }
}
