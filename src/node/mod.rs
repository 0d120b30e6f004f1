//! The node agent (`pullthrough node`): the one step of the DaemonSet that writes into the host,
//! so the only one that runs as root. It runs beside the mirror in the same pod and:
//!
//! 1. waits until the mirror's `/readyz` answers 200, so containerd is never pointed at a mirror
//!    that cannot serve yet;
//! 2. checks that containerd reads `certs.d` at all ([`containerd_config`]), and reports
//!    not-ready, with a log line and a metric, when it does not (`not_used`) or when containerd
//!    2.1+ would skip every `hosts.toml` (`bypassed`);
//! 3. installs the `hosts.toml` files ([`install::install`]) and keeps them right, re-checking
//!    every `resync`;
//! 4. on SIGTERM exits and leaves the files in place. A restarting or updating pod must not flap
//!    them, and leaving them is safe: with the mirror gone, containerd's connect is refused at
//!    once and it goes to the next host.
//!
//! With `remove`, it instead takes pullthrough's files out (restoring merged ones) and then idles
//! as ready: that is the uninstall DaemonSet, whose readiness on every node means "removed".
//!
//! Its own `/healthz`, `/readyz` and `/metrics` are served on a separate listener.

pub mod containerd_config;
pub mod hosts;
pub mod install;

use std::future::Future;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::StatusCode;
use http_body_util::Empty;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use self::containerd_config::{ConfigPath, Source, Version};
use self::hosts::Change;
use crate::config::Config;
use crate::ops::{Ops, Readiness, Ready};
use crate::server;

/// How often to ask the mirror whether it is ready, before the first install.
const READY_POLL: Duration = Duration::from_secs(1);

/// Where EKS AL2023 keeps the output of `containerd --version` (a host path). nodeadm reads it to
/// pick the containerd config template; the agent reads it because a `version = 2` config cannot
/// tell containerd 1.x from 2.x, and the host's `containerd` binary cannot be run from the pod.
pub const EKS_CONTAINERD_VERSION_FILE: &str = "/etc/eks/containerd-version.txt";

/// How many config files (the main one and its imports, transitively) the agent reads at most:
/// containerd follows imports of imports, and a loop or a glob gone wild must not stall it.
const MAX_CONFIG_FILES: usize = 64;

/// What the agent works on. Paths are host paths; `host_root` is where the host's `/` is
/// mounted in the container (`/` when run on the host itself).
#[derive(Debug, Clone)]
pub struct NodeOptions {
    /// Where the host's filesystem is mounted.
    pub host_root: PathBuf,
    /// containerd's certs.d directory, as a host path.
    pub certs_dir: String,
    /// containerd's config file, as a host path.
    pub containerd_config: String,
    /// containerd's version, when the operator knows it. Otherwise the agent reads
    /// [`EKS_CONTAINERD_VERSION_FILE`] under the host root, or checks without one.
    pub containerd_version: Option<Version>,
    /// How often to re-check and re-install.
    pub resync: Duration,
    /// Uninstall instead of install.
    pub remove: bool,
}

impl NodeOptions {
    fn on_host(&self, host_path: &str) -> PathBuf {
        self.host_root.join(host_path.trim_start_matches('/'))
    }
}

/// Why the agent stopped.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// Removal failed; the uninstall cannot report done.
    #[error(transparent)]
    Hosts(#[from] install::HostsError),
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabel {
    state: String,
}

/// The agent's metrics.
#[derive(Clone, Debug, Default)]
struct NodeMetrics {
    config_path: Family<StateLabel, Gauge>,
    files: Family<StateLabel, Gauge>,
    installed: Gauge,
    errors: Counter,
}

impl NodeMetrics {
    fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        registry.register(
            "pullthrough_node_containerd_config_path",
            "1 for the verdict on whether containerd reads certs.d: used, not_used, bypassed \
             (containerd 2.1+ skips every hosts.toml) or unknown",
            m.config_path.clone(),
        );
        registry.register(
            "pullthrough_node_hosts_files",
            "hosts.toml files after the last reconcile, by state: managed or skipped",
            m.files.clone(),
        );
        registry.register(
            "pullthrough_node_installed",
            "1 once the hosts.toml files are installed (after the mirror was ready)",
            m.installed.clone(),
        );
        registry.register(
            "pullthrough_node_errors",
            "Reconciles that failed on a filesystem error",
            m.errors.clone(),
        );
        m
    }
}

#[derive(Debug, Default)]
struct Status {
    ready: AtomicBool,
    why: Mutex<String>,
}

impl Status {
    fn set(&self, ready: bool, why: impl Into<String>) {
        self.ready.store(ready, Ordering::Relaxed);
        if let Ok(mut w) = self.why.lock() {
            *w = why.into();
        }
    }
    fn why(&self) -> String {
        self.why.lock().map(|w| w.clone()).unwrap_or_default()
    }
}

impl Readiness for Status {
    async fn ready(&self) -> Ready {
        if self.ready.load(Ordering::Relaxed) {
            Ready::yes(format!("ready: {}", self.why()))
        } else {
            Ready::no(format!("not ready: {}", self.why()))
        }
    }
}

/// Runs the agent until `shutdown` resolves. Its ops endpoints are served on `listener`.
pub async fn run(
    config: Config,
    opts: NodeOptions,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
) -> Result<(), NodeError> {
    let mut registry = Registry::default();
    let metrics = NodeMetrics::register(&mut registry);
    let status = Arc::new(Status::default());
    status.set(false, "starting");
    let handler = Arc::new(Ops::new(Arc::clone(&status), registry));
    let stop = CancellationToken::new();
    let ops_server = tokio::spawn(server::serve(
        listener,
        handler,
        stop.clone().cancelled_owned(),
        Duration::from_secs(1),
        config.server,
    ));
    let result = tokio::select! {
        r = work(&config, &opts, &status, &metrics) => r,
        () = shutdown => Ok(()),
    };
    stop.cancel();
    let _ = ops_server.await;
    if result.is_ok() {
        tracing::info!(
            "stopping; hosts.toml files stay in place (containerd falls back while the mirror is down)"
        );
    }
    result
}

async fn work(
    config: &Config,
    opts: &NodeOptions,
    status: &Status,
    metrics: &NodeMetrics,
) -> Result<(), NodeError> {
    let certs = opts.on_host(&opts.certs_dir);
    if opts.remove {
        for r in install::remove(&certs)? {
            tracing::info!(path = %r.path.display(), change = %r.change, "hosts.toml");
        }
        status.set(true, "pullthrough's hosts.toml files are removed");
        std::future::pending::<()>().await;
        return Ok(());
    }
    wait_for_mirror(config, status).await;
    let mut last_verdict: Option<String> = None;
    loop {
        let (version, version_from) = containerd_version(opts);
        let verdict = check_containerd(opts, version);
        for label in ConfigPath::LABELS {
            metrics
                .config_path
                .get_or_create(&StateLabel {
                    state: label.into(),
                })
                .set(i64::from(label == verdict.label()));
        }
        // Logged once per change: the agent re-checks every resync.
        let verdict_text = format!("{verdict:?} {version_from}");
        if last_verdict.as_deref() != Some(verdict_text.as_str()) {
            let reason = verdict.message();
            match &verdict {
                ConfigPath::NotUsed { .. } => tracing::error!(
                    %reason, containerd_version = %version_from,
                    "containerd does not read certs.d on this node: pulls will not go through pullthrough"
                ),
                ConfigPath::Bypassed { .. } => tracing::error!(
                    %reason, containerd_version = %version_from,
                    "containerd on this node skips every hosts.toml: pulls go to the registries themselves, not through pullthrough"
                ),
                ConfigPath::Unknown { .. } => tracing::warn!(
                    %reason, containerd_version = %version_from,
                    "cannot tell whether containerd reads certs.d"
                ),
                ConfigPath::Used { config_path, .. } => tracing::info!(
                    %config_path, detail = %reason, containerd_version = %version_from,
                    "containerd reads certs.d"
                ),
            }
        }
        last_verdict = Some(verdict_text);
        match install::install(config, &certs) {
            Ok(reports) => {
                let mut managed = 0;
                let mut skipped = 0;
                for r in &reports {
                    match &r.change {
                        Change::Unchanged => {}
                        Change::Skipped(_) => {
                            tracing::warn!(path = %r.path.display(), change = %r.change, "hosts.toml")
                        }
                        _ => {
                            tracing::info!(path = %r.path.display(), change = %r.change, "hosts.toml")
                        }
                    }
                    match &r.change {
                        Change::Skipped(_) => skipped += 1,
                        Change::Created | Change::Updated | Change::Merged | Change::Unchanged => {
                            managed += 1
                        }
                        _ => {}
                    }
                }
                metrics
                    .files
                    .get_or_create(&StateLabel {
                        state: "managed".into(),
                    })
                    .set(managed);
                metrics
                    .files
                    .get_or_create(&StateLabel {
                        state: "skipped".into(),
                    })
                    .set(skipped);
                metrics.installed.set(1);
                // Not ready while containerd ignores the files: the files stay installed
                // (harmless, and right as soon as containerd is configured), but the pod's
                // readiness is what an operator and the chart's alert see.
                match &verdict {
                    ConfigPath::NotUsed { reason } | ConfigPath::Bypassed { reason } => {
                        status.set(false, reason.clone())
                    }
                    ConfigPath::Used { .. } | ConfigPath::Unknown { .. } => status.set(
                        true,
                        format!("{managed} hosts.toml files installed, {skipped} skipped"),
                    ),
                }
            }
            Err(e) => {
                metrics.errors.inc();
                tracing::error!(error = %e, "installing hosts.toml files failed; retrying at the next resync");
                status.set(false, format!("installing hosts.toml files failed: {e}"));
            }
        }
        tokio::time::sleep(opts.resync).await;
    }
}

/// Polls the mirror's `/readyz` (same pod, same network namespace) until it answers 200.
async fn wait_for_mirror(config: &Config, status: &Status) {
    let url = format!(
        "http://{}/readyz",
        hosts::mirror_authority(config.ops_listen)
    );
    let Ok(uri) = url.parse::<http::Uri>() else {
        return;
    };
    let client: Client<_, Empty<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let mut logged = false;
    loop {
        let probe = tokio::time::timeout(Duration::from_secs(2), client.get(uri.clone())).await;
        match probe {
            Ok(Ok(resp)) if resp.status() == StatusCode::OK => {
                tracing::info!(%url, "the mirror is ready");
                return;
            }
            other => {
                let why = match other {
                    Ok(Ok(resp)) => format!("answered {}", resp.status()),
                    Ok(Err(e)) => format!("{e}"),
                    Err(_) => "timed out".into(),
                };
                if !logged {
                    tracing::info!(%url, %why, "waiting for the mirror to be ready before installing hosts.toml files");
                    logged = true;
                }
                status.set(false, format!("waiting for the mirror at {url}: {why}"));
            }
        }
        tokio::time::sleep(READY_POLL).await;
    }
}

/// containerd's version and where it came from (for the log): the operator's
/// `--containerd-version`, else EKS AL2023's version file on the host, else unknown.
fn containerd_version(opts: &NodeOptions) -> (Option<Version>, String) {
    if let Some(v) = opts.containerd_version {
        return (Some(v), format!("{v} (--containerd-version)"));
    }
    let path = opts.on_host(EKS_CONTAINERD_VERSION_FILE);
    match std::fs::read_to_string(&path) {
        Ok(text) => match Version::parse(&text) {
            Some(v) => (Some(v), format!("{v} ({EKS_CONTAINERD_VERSION_FILE})")),
            None => (
                None,
                format!("unknown ({EKS_CONTAINERD_VERSION_FILE} names no version)"),
            ),
        },
        Err(_) => (None, "unknown".into()),
    }
}

fn check_containerd(opts: &NodeOptions, version: Option<Version>) -> ConfigPath {
    match read_containerd_config(opts) {
        Ok(files) => containerd_config::check(&files, &opts.certs_dir, version),
        Err(reason) => ConfigPath::Unknown { reason },
    }
}

/// containerd's config file and its imports, transitively, in the order containerd loads them:
/// breadth first, each file once, a relative import resolved against its file's directory.
/// An import that cannot be read is left out: containerd itself would not start with it.
fn read_containerd_config(opts: &NodeOptions) -> Result<Vec<Source>, String> {
    let main = opts.on_host(&opts.containerd_config);
    let text = std::fs::read_to_string(&main)
        .map_err(|e| format!("cannot read {}: {e}", main.display()))?;
    let mut files = vec![Source {
        path: opts.containerd_config.clone(),
        text,
    }];
    let mut seen =
        std::collections::HashSet::from([containerd_config::clean(&opts.containerd_config)]);
    let mut next = 0;
    while next < files.len() && files.len() < MAX_CONFIG_FILES {
        let parent = files[next].path.clone();
        let patterns = containerd_config::imports(&files[next].text);
        next += 1;
        for pattern in patterns {
            let pattern = if pattern.starts_with('/') {
                pattern
            } else {
                let dir = parent.rsplit_once('/').map_or("", |(d, _)| d);
                format!("{dir}/{pattern}")
            };
            // Go's filepath.Join cleans the path; so does this, for `..` and the loop check.
            let pattern = containerd_config::clean(&pattern);
            for host_path in expand(opts, &pattern) {
                if files.len() >= MAX_CONFIG_FILES || !seen.insert(host_path.clone()) {
                    continue;
                }
                if let Ok(text) = std::fs::read_to_string(opts.on_host(&host_path)) {
                    files.push(Source {
                        path: host_path,
                        text,
                    });
                }
            }
        }
    }
    Ok(files)
}

/// Expands an import path (a host path), with at most one `*` in its file name (containerd uses
/// Go's glob; this covers the `config.d/*.toml` form every distribution writes), to host paths.
/// Sorted, as Go's glob is.
fn expand(opts: &NodeOptions, pattern: &str) -> Vec<String> {
    let Some((dir, name)) = pattern.rsplit_once('/') else {
        return Vec::new();
    };
    let Some((prefix, suffix)) = name.split_once('*') else {
        return vec![pattern.to_owned()];
    };
    let mut out: Vec<String> = std::fs::read_dir(opts.on_host(dir))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| {
            n.len() >= prefix.len() + suffix.len() && n.starts_with(prefix) && n.ends_with(suffix)
        })
        .map(|n| format!("{dir}/{n}"))
        .collect();
    out.sort();
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn opts(root: &Path) -> NodeOptions {
        NodeOptions {
            host_root: root.to_owned(),
            certs_dir: "/etc/containerd/certs.d".into(),
            containerd_config: "/etc/containerd/config.toml".into(),
            containerd_version: None,
            resync: Duration::from_secs(60),
            remove: false,
        }
    }

    fn write(root: &Path, host_path: &str, text: &str) {
        let p = root.join(host_path.trim_start_matches('/'));
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, text).unwrap();
    }

    #[test]
    fn reads_the_config_and_its_imports_under_the_host_root() {
        let root = tempfile::tempdir().unwrap();
        write(
            root.path(),
            "/etc/containerd/config.toml",
            "version = 2\nimports = [\"/etc/containerd/config.d/*.toml\"]\n",
        );
        std::fs::create_dir_all(root.path().join("etc/containerd/config.d")).unwrap();
        let o = opts(root.path());
        assert_eq!(check_containerd(&o, None).label(), "not_used");
        write(
            root.path(),
            "/etc/containerd/config.d/10-registry.toml",
            "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\".registry]\nconfig_path = \"/etc/containerd/certs.d\"\n",
        );
        write(
            root.path(),
            "/etc/containerd/config.d/ignored.txt",
            "config_path = 1",
        );
        assert_eq!(
            check_containerd(&o, Some(Version::new(1, 7))).label(),
            "used"
        );
    }

    #[test]
    fn follows_relative_and_nested_imports_once_each_in_containerds_order() {
        let root = tempfile::tempdir().unwrap();
        write(
            root.path(),
            "/etc/containerd/config.toml",
            "version = 3\nimports = [\"conf.d/*.toml\", \"/etc/containerd/missing.toml\"]\n",
        );
        // a.toml imports b.toml and, in a loop, the main file.
        write(
            root.path(),
            "/etc/containerd/conf.d/a.toml",
            "version = 3\nimports = [\"../b.toml\", \"/etc/containerd/config.toml\"]\n",
        );
        write(
            root.path(),
            "/etc/containerd/b.toml",
            "version = 3\n[plugins.\"io.containerd.cri.v1.images\".registry]\nconfig_path = \"/etc/containerd/certs.d\"\n",
        );
        let files = read_containerd_config(&opts(root.path())).unwrap();
        let paths: Vec<&str> = files.iter().map(|f| f.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "/etc/containerd/config.toml",
                "/etc/containerd/conf.d/a.toml",
                "/etc/containerd/b.toml"
            ]
        );
        assert_eq!(
            check_containerd(&opts(root.path()), Some(Version::new(2, 1))).label(),
            "used"
        );
    }

    #[test]
    fn a_missing_config_is_unknown_not_an_error() {
        let root = tempfile::tempdir().unwrap();
        let v = check_containerd(&opts(root.path()), None);
        assert_eq!(v.label(), "unknown");
    }

    #[test]
    fn the_version_comes_from_the_flag_then_the_eks_file() {
        let root = tempfile::tempdir().unwrap();
        let mut o = opts(root.path());
        assert_eq!(containerd_version(&o), (None, "unknown".into()));
        write(
            root.path(),
            EKS_CONTAINERD_VERSION_FILE,
            "containerd github.com/containerd/containerd/v2 v2.1.4 75cb2b7193e4e490e9fbdc236c0e811ccaba3376\n",
        );
        assert_eq!(
            containerd_version(&o),
            (
                Some(Version::new(2, 1)),
                "2.1 (/etc/eks/containerd-version.txt)".into()
            )
        );
        o.containerd_version = Some(Version::new(1, 7));
        assert_eq!(
            containerd_version(&o),
            (
                Some(Version::new(1, 7)),
                "1.7 (--containerd-version)".into()
            )
        );
        o.containerd_version = None;
        write(root.path(), EKS_CONTAINERD_VERSION_FILE, "garbage\n");
        assert_eq!(containerd_version(&o).0, None);
    }
}
