//! Installing and removing the `hosts.toml` files on the node: the IO half of [`super::hosts`].
//! Every decision is [`plan`]'s (pure); this file reads what is there, carries the decision out,
//! and writes atomically (temporary file, fsync, rename), because containerd re-reads the file on
//! every pull and silently ignores one it cannot parse.

use std::io::Write;
use std::path::{Path, PathBuf};

use super::hosts::{Action, BACKUP_NAME, CREATED_DIR, Change, Found, is_ours, mirror_url, plan};
use crate::config::Config;

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::node::hosts::MARKER;
    use crate::node::hosts::tests::CORP;

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
}
