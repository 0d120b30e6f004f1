//! containerd `hosts.toml` files: one per upstream registry, naming pullthrough as the mirror
//! host and the real registry as `server`.
//!
//! Rendering is pure and golden-tested. Writing is atomic (a temporary file in the same
//! directory, fsync, rename), because containerd re-reads the file on every pull and silently
//! ignores one it cannot parse: a half-written file would quietly turn the mirror off.

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use crate::config::{Config, Registry};

/// The first line of every file pullthrough writes.
pub const MARKER: &str =
    "# Managed by pullthrough (`pullthrough hosts`): changes here are overwritten.";

/// Why a file could not be written.
#[derive(Debug, thiserror::Error)]
pub enum HostsError {
    /// Creating, writing or renaming failed.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory.
        path: String,
        /// The IO error.
        source: std::io::Error,
    },
}

/// The mirror URL containerd should use: the listen address, with a wildcard bind replaced by
/// loopback (containerd runs on the same node).
pub fn mirror_url(listen: SocketAddr) -> String {
    match listen {
        SocketAddr::V4(a) if a.ip().is_unspecified() => format!("http://127.0.0.1:{}", a.port()),
        SocketAddr::V4(a) => format!("http://{a}"),
        SocketAddr::V6(a) if a.ip().is_unspecified() => format!("http://[::1]:{}", a.port()),
        SocketAddr::V6(a) => format!("http://[{}]:{}", a.ip(), a.port()),
    }
}

/// Renders one `hosts.toml`.
pub fn render(server: &str, mirror: &str) -> String {
    let q = |s: &str| toml::Value::String(s.to_owned()).to_string();
    format!(
        "{MARKER}\n\
         # containerd tries the mirror first and falls back to `server` when it refuses, errors or misses.\n\
         server = {}\n\
         \n\
         [host.{}]\n  capabilities = [\"pull\", \"resolve\"]\n",
        q(server),
        q(mirror),
    )
}

/// Every file for a config: `(registry directory name, contents)`.
pub fn render_all(config: &Config) -> Vec<(Registry, String)> {
    let mirror = mirror_url(config.listen);
    config
        .upstreams
        .iter()
        .map(|(reg, up)| (reg.clone(), render(&up.server, &mirror)))
        .collect()
}

/// Writes `dir/<registry>/hosts.toml` for every upstream; returns the paths written.
pub fn write_all(config: &Config, dir: &Path) -> Result<Vec<PathBuf>, HostsError> {
    render_all(config)
        .into_iter()
        .map(|(reg, text)| {
            let path = dir.join(reg.as_str()).join("hosts.toml");
            write_atomic(&path, text.as_bytes())?;
            Ok(path)
        })
        .collect()
}

/// Replaces `path` atomically: readers see the old file or the new one, never a part.
pub fn write_atomic(path: &Path, contents: &[u8]) -> Result<(), HostsError> {
    let io = |p: &Path| {
        let p = p.display().to_string();
        move |source| HostsError::Io { path: p, source }
    };
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("hosts.toml");
    let tmp = dir.join(format!(".{name}.tmp.{}", std::process::id()));
    let result = (|| {
        let mut f = std::fs::File::create(&tmp).map_err(io(&tmp))?;
        f.write_all(contents).map_err(io(&tmp))?;
        f.sync_all().map_err(io(&tmp))?;
        std::fs::rename(&tmp, path).map_err(io(path))?;
        // Persist the rename itself.
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io(dir))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use rstest::rstest;

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
        let got = render("https://registry-1.docker.io", "http://127.0.0.1:5050");
        let want = "\
# Managed by pullthrough (`pullthrough hosts`): changes here are overwritten.
# containerd tries the mirror first and falls back to `server` when it refuses, errors or misses.
server = \"https://registry-1.docker.io\"

[host.\"http://127.0.0.1:5050\"]
  capabilities = [\"pull\", \"resolve\"]
";
        assert_eq!(got, want);
    }

    #[test]
    fn rendered_files_parse_as_containerd_expects() {
        let cfg = Config::from_toml_str(
            "listen = \"0.0.0.0:5999\"\nops_listen = \"127.0.0.1:6000\"",
            "t",
        )
        .unwrap();
        let files = render_all(&cfg);
        assert_eq!(files.len(), 6);
        for (reg, text) in files {
            let v: toml::Table = toml::from_str(&text).unwrap();
            assert_eq!(v["server"].as_str().unwrap(), cfg.upstreams[&reg].server);
            let caps = &v["host"]["http://127.0.0.1:5999"]["capabilities"];
            assert_eq!(caps.as_array().unwrap().len(), 2);
        }
    }

    #[test]
    fn write_all_is_atomic_and_leaves_no_temp_files() {
        let dir = tempfile::tempdir().unwrap();
        let cfg =
            Config::from_toml_str("[upstreams.\"quay.io\"]\nprefix = \"quay\"\n", "t").unwrap();
        let written = write_all(&cfg, dir.path()).unwrap();
        assert_eq!(written, vec![dir.path().join("quay.io/hosts.toml")]);
        // Rewriting replaces the file in place.
        write_all(&cfg, dir.path()).unwrap();
        let names: Vec<_> = std::fs::read_dir(dir.path().join("quay.io"))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names, vec!["hosts.toml".to_string()]);
        let text = std::fs::read_to_string(&written[0]).unwrap();
        assert!(text.starts_with(MARKER));
        assert!(text.contains("server = \"https://quay.io\""));
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
