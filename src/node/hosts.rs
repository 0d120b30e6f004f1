//! Node runtime configuration that points pulls at the mirror: containerd `hosts.toml` files (one
//! per upstream registry), and the same routing rendered for CRI-O/podman (`registries.conf`) and
//! Bottlerocket (its `settings.container-registry.mirrors`).
//!
//! Rendering and the decision of what to do with a file already on the node ([`plan`]) are pure
//! and table-tested; [`install`] and [`remove`] only carry those decisions out. Three rules keep a
//! node safe:
//! - pullthrough changes or removes only files that carry its [`MARKER`];
//! - a `hosts.toml` someone else wrote is kept: pullthrough hard-links it to [`BACKUP_NAME`] and
//!   writes a copy with the mirror inserted as the first host, so `--remove` can rename the
//!   original back, byte for byte (same inode, mode and mtime). A file it cannot merge safely is
//!   skipped with a reason;
//! - every write is atomic (temporary file, fsync, rename), because containerd re-reads the file
//!   on every pull and silently ignores one it cannot parse.

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use crate::config::Config;

/// The first line of every file pullthrough writes.
pub const MARKER: &str =
    "# Managed by pullthrough (`pullthrough hosts`): changes here are overwritten.";

/// Where a `hosts.toml` that pullthrough merged into is kept, beside it. containerd reads only
/// `hosts.toml` and `*.crt`/`*.cert`/`*.key` files, so the backup is inert.
pub const BACKUP_NAME: &str = "hosts.toml.pullthrough-orig";

/// In a file pullthrough wrote into a directory it created, so that `--remove` deletes the
/// directory too and leaves certs.d exactly as it was.
const CREATED_DIR: &str =
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

/// Why a file could not be written or removed.
#[derive(Debug, thiserror::Error)]
pub enum HostsError {
    /// Creating, writing, linking or renaming failed.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory.
        path: String,
        /// The IO error.
        source: std::io::Error,
    },
}

fn io_err(p: &Path) -> impl FnOnce(std::io::Error) -> HostsError + use<> {
    let path = p.display().to_string();
    move |source| HostsError::Io { path, source }
}

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

fn is_ours(text: &str) -> bool {
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

/// One line of an install or removal report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    /// The `hosts.toml` path.
    pub path: PathBuf,
    /// What happened to it.
    pub change: Change,
}

fn read_optional(path: &Path) -> Result<Option<String>, HostsError> {
    match std::fs::read_to_string(path) {
        Ok(t) => Ok(Some(t)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_err(path)(e)),
    }
}

fn has_cert_files(dir: &Path) -> Result<bool, HostsError> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(io_err(dir)(e)),
    };
    for entry in entries {
        let name = entry.map_err(io_err(dir))?.file_name();
        let name = name.to_string_lossy();
        if [".crt", ".cert", ".key"].iter().any(|s| name.ends_with(s)) {
            return Ok(true);
        }
    }
    Ok(false)
}

/// Makes `dir` match the config: a file for every upstream (created, merged or updated), and
/// pullthrough's files for registries no longer configured removed or restored. Files
/// pullthrough did not write are never deleted.
pub fn install(config: &Config, dir: &Path) -> Result<Vec<Report>, HostsError> {
    let mirror = mirror_url(config.listen);
    let mut reports = Vec::new();
    for (reg, up) in &config.upstreams {
        let sub = dir.join(reg.as_str());
        let path = sub.join("hosts.toml");
        let backup_path = sub.join(BACKUP_NAME);
        let hosts = read_optional(&path)?;
        let backup = read_optional(&backup_path)?;
        let found = Found {
            hosts: hosts.as_deref(),
            backup: backup.as_deref(),
            dir_exists: sub.is_dir(),
            has_cert_files: has_cert_files(&sub)?,
        };
        let change = match plan(found, &up.server, &mirror) {
            Action::Unchanged => Change::Unchanged,
            Action::Skip(why) => Change::Skipped(why),
            Action::Write {
                text,
                backup_current,
                change,
            } => {
                if backup_current {
                    keep_as_backup(&path, &backup_path)?;
                }
                write_atomic(&path, text.as_bytes())?;
                change
            }
        };
        reports.push(Report { path, change });
    }
    for sub in registry_dirs(dir)? {
        let name = sub.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        let configured = config.upstreams.keys().any(|r| r.as_str() == name);
        if !configured && let Some(r) = remove_one(&sub)? {
            reports.push(r);
        }
    }
    Ok(reports)
}

/// Removes every file pullthrough wrote under `dir` and puts back every file it merged into,
/// byte for byte. Touches nothing else.
pub fn remove(dir: &Path) -> Result<Vec<Report>, HostsError> {
    let mut reports = Vec::new();
    for sub in registry_dirs(dir)? {
        if let Some(r) = remove_one(&sub)? {
            reports.push(r);
        }
    }
    Ok(reports)
}

fn registry_dirs(dir: &Path) -> Result<Vec<PathBuf>, HostsError> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io_err(dir)(e)),
    };
    let mut dirs = Vec::new();
    for entry in entries {
        let entry = entry.map_err(io_err(dir))?;
        if entry.file_type().map_err(io_err(&entry.path()))?.is_dir() {
            dirs.push(entry.path());
        }
    }
    dirs.sort();
    Ok(dirs)
}

fn remove_one(sub: &Path) -> Result<Option<Report>, HostsError> {
    let path = sub.join("hosts.toml");
    let backup_path = sub.join(BACKUP_NAME);
    let hosts = read_optional(&path)?;
    let has_backup = backup_path.exists();
    let change = match (hosts.as_deref(), has_backup) {
        (Some(text), true) if is_ours(text) => restore(&backup_path, &path)?,
        (None, true) => restore(&backup_path, &path)?,
        (Some(_), true) => {
            std::fs::remove_file(&backup_path).map_err(io_err(&backup_path))?;
            Change::DroppedStaleBackup
        }
        (Some(text), false) if is_ours(text) => {
            std::fs::remove_file(&path).map_err(io_err(&path))?;
            sync_dir(sub)?;
            if text.contains(CREATED_DIR) {
                // Only if empty: whatever someone else put there since stays.
                let _ = std::fs::remove_dir(sub);
            }
            Change::Removed
        }
        _ => return Ok(None),
    };
    Ok(Some(Report { path, change }))
}

fn restore(backup: &Path, path: &Path) -> Result<Change, HostsError> {
    std::fs::rename(backup, path).map_err(io_err(path))?;
    sync_dir(path.parent().unwrap_or(Path::new(".")))?;
    Ok(Change::Restored)
}

/// Keeps the current `hosts.toml` as the backup: a hard link, so the original inode (bytes,
/// mode, owner, mtime) survives the atomic replace and comes back on `--remove`. A copy where
/// the filesystem cannot link.
fn keep_as_backup(path: &Path, backup: &Path) -> Result<(), HostsError> {
    match std::fs::remove_file(backup) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err(backup)(e)),
    }
    if std::fs::hard_link(path, backup).is_err() {
        std::fs::copy(path, backup).map_err(io_err(backup))?;
        std::fs::File::open(backup)
            .and_then(|f| f.sync_all())
            .map_err(io_err(backup))?;
    }
    sync_dir(backup.parent().unwrap_or(Path::new(".")))
}

fn sync_dir(dir: &Path) -> Result<(), HostsError> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err(dir))
}

/// Replaces `path` atomically: readers see the old file or the new one, never a part.
pub fn write_atomic(path: &Path, contents: &[u8]) -> Result<(), HostsError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(io_err(dir))?;
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("hosts.toml");
    let tmp = dir.join(format!(".{name}.tmp.{}", std::process::id()));
    let result = (|| {
        let mut f = std::fs::File::create(&tmp).map_err(io_err(&tmp))?;
        f.write_all(contents).map_err(io_err(&tmp))?;
        f.sync_all().map_err(io_err(&tmp))?;
        std::fs::rename(&tmp, path).map_err(io_err(path))?;
        // Persist the rename itself.
        sync_dir(dir)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Renders a containers-registries.conf(5) drop-in (`/etc/containers/registries.conf.d/`) for
/// CRI-O, podman, skopeo and buildah. They do not send containerd's `?ns=`, so each mirror
/// location carries the registry as a path prefix (`127.0.0.1:5050/docker.io`), which the mirror
/// routes the same way.
pub fn render_registries_conf(config: &Config) -> String {
    let mirror = mirror_authority(config.listen);
    let mut out = format!(
        "{MARKER}\n\
         # containers-registries.conf(5) drop-in for CRI-O, podman, skopeo and buildah:\n\
         # /etc/containers/registries.conf.d/50-pullthrough.conf\n\
         # Each registry is tried through the mirror first, then at `location`.\n"
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
mod tests {
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

    const CORP: &str = "server = \"https://registry-1.docker.io\"\n\n[host.\"https://mirror.corp.example\"]\n  capabilities = [\"pull\", \"resolve\"]\n  ca = \"/etc/certs/corp.pem\"\n";

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

    fn snapshot(dir: &Path) -> Vec<(String, Vec<u8>)> {
        let mut out = Vec::new();
        for e in walk(dir) {
            let rel = e.strip_prefix(dir).unwrap().display().to_string();
            let bytes = if e.is_file() {
                std::fs::read(&e).unwrap()
            } else {
                b"<dir>".to_vec()
            };
            out.push((rel, bytes));
        }
        out.sort();
        out
    }

    fn walk(dir: &Path) -> Vec<PathBuf> {
        let mut out = Vec::new();
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                out.extend(walk(&p));
            }
            out.push(p);
        }
        out
    }

    #[test]
    fn install_then_remove_restores_certs_d_exactly() {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        // A hand-written file, one with cert files only, an empty dir, and an unrelated registry.
        std::fs::create_dir_all(d.join("docker.io")).unwrap();
        std::fs::write(d.join("docker.io/hosts.toml"), CORP).unwrap();
        std::fs::set_permissions(
            d.join("docker.io/hosts.toml"),
            std::fs::Permissions::from_mode(0o600),
        )
        .unwrap();
        std::fs::create_dir_all(d.join("quay.io")).unwrap();
        std::fs::write(d.join("quay.io/ca.crt"), "pem").unwrap();
        std::fs::create_dir_all(d.join("ghcr.io")).unwrap();
        std::fs::create_dir_all(d.join("corp.example")).unwrap();
        std::fs::write(
            d.join("corp.example/hosts.toml"),
            "server = \"https://corp.example\"\n",
        )
        .unwrap();
        let before = snapshot(d);
        let ino = std::fs::metadata(d.join("docker.io/hosts.toml"))
            .unwrap()
            .ino();

        let config = cfg("");
        let reports = install(&config, d).unwrap();
        let by = |reg: &str| {
            reports
                .iter()
                .find(|r| r.path == d.join(reg).join("hosts.toml"))
                .unwrap()
                .change
                .clone()
        };
        assert_eq!(by("docker.io"), Change::Merged);
        assert!(matches!(by("quay.io"), Change::Skipped(_)));
        assert_eq!(by("ghcr.io"), Change::Created);
        assert_eq!(by("registry.k8s.io"), Change::Created);
        assert!(
            !reports
                .iter()
                .any(|r| r.path.starts_with(d.join("corp.example")))
        );
        assert!(!d.join("quay.io/hosts.toml").exists());
        let merged = std::fs::read_to_string(d.join("docker.io/hosts.toml")).unwrap();
        assert!(merged.starts_with(MARKER) && merged.contains("mirror.corp.example"));

        // A second install changes nothing.
        let again = install(&config, d).unwrap();
        assert!(
            again
                .iter()
                .all(|r| matches!(r.change, Change::Unchanged | Change::Skipped(_))),
            "{again:?}"
        );

        let removed = remove(d).unwrap();
        assert_eq!(
            removed
                .iter()
                .filter(|r| r.change == Change::Restored)
                .count(),
            1
        );
        assert_eq!(snapshot(d), before);
        let meta = std::fs::metadata(d.join("docker.io/hosts.toml")).unwrap();
        assert_eq!(meta.ino(), ino, "the original inode is back");
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        // Nothing left to remove.
        assert!(remove(d).unwrap().is_empty());
    }

    #[test]
    fn install_removes_its_files_for_registries_no_longer_configured() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        install(&cfg(""), d).unwrap();
        let reports = install(&cfg("[upstreams.\"quay.io\"]\nprefix = \"quay\"\n"), d).unwrap();
        assert!(
            reports
                .iter()
                .any(|r| r.path == d.join("docker.io/hosts.toml") && r.change == Change::Removed)
        );
        let names: Vec<_> = std::fs::read_dir(d)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names, vec!["quay.io".to_string()]);
    }

    #[test]
    fn a_replaced_merged_file_is_left_to_its_new_owner() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::create_dir_all(d.join("docker.io")).unwrap();
        std::fs::write(d.join("docker.io/hosts.toml"), CORP).unwrap();
        install(&cfg(""), d).unwrap();
        // nodeadm (say) rewrites the file after the install.
        std::fs::write(d.join("docker.io/hosts.toml"), "server = \"https://new\"\n").unwrap();
        let reports = remove(d).unwrap();
        assert!(
            reports
                .iter()
                .any(|r| r.change == Change::DroppedStaleBackup)
        );
        assert_eq!(
            std::fs::read_to_string(d.join("docker.io/hosts.toml")).unwrap(),
            "server = \"https://new\"\n"
        );
        assert!(!d.join("docker.io").join(BACKUP_NAME).exists());
    }

    #[test]
    fn write_atomic_leaves_no_temp_files() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("quay.io/hosts.toml");
        write_atomic(&p, b"a").unwrap();
        write_atomic(&p, b"b").unwrap();
        let names: Vec<_> = std::fs::read_dir(dir.path().join("quay.io"))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names, vec!["hosts.toml".to_string()]);
        assert_eq!(std::fs::read(&p).unwrap(), b"b");
    }

    #[test]
    fn write_error_names_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let blocker = dir.path().join("file");
        std::fs::write(&blocker, "x").unwrap();
        let err = write_atomic(&blocker.join("sub/hosts.toml"), b"x").unwrap_err();
        assert!(err.to_string().contains("file/sub"), "{err}");
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
        // Both are TOML.
        let _: toml::Table = toml::from_str(&got).unwrap();
    }
}
