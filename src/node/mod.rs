//! The node agent (`pullthrough node`): the one step of the DaemonSet that writes into the host,
//! so the only one that runs as root. It runs beside the mirror in the same pod and:
//!
//! 1. waits until the mirror's `/readyz` answers 200, so containerd is never pointed at a mirror
//!    that cannot serve yet;
//! 2. checks that containerd reads `certs.d` at all ([`containerd_config`]), and reports
//!    not-ready, with a log line and a metric, when it does not;
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

use self::containerd_config::ConfigPath;
use self::hosts::Change;
use crate::config::Config;
use crate::ops::{Ops, Readiness, Ready};
use crate::server;

/// How often to ask the mirror whether it is ready, before the first install.
const READY_POLL: Duration = Duration::from_secs(1);

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
            "1 for the verdict on whether containerd reads certs.d: used, not_used or unknown",
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
        let verdict = check_containerd(opts);
        for label in ["used", "not_used", "unknown"] {
            metrics
                .config_path
                .get_or_create(&StateLabel {
                    state: label.into(),
                })
                .set(i64::from(label == verdict.label()));
        }
        let verdict_text = format!("{verdict:?}");
        let changed = last_verdict.as_deref() != Some(verdict_text.as_str());
        match &verdict {
            ConfigPath::NotUsed { reason } if changed => {
                tracing::error!(%reason, "containerd does not read certs.d on this node: pulls will not go through pullthrough");
            }
            ConfigPath::Unknown { reason } if changed => {
                tracing::warn!(%reason, "cannot tell whether containerd reads certs.d");
            }
            ConfigPath::Used { config_path } if changed => {
                tracing::info!(%config_path, "containerd reads certs.d");
            }
            _ => {}
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
                match &verdict {
                    ConfigPath::NotUsed { reason } => status.set(false, reason.clone()),
                    _ => status.set(
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

fn check_containerd(opts: &NodeOptions) -> ConfigPath {
    let path = opts.on_host(&opts.containerd_config);
    let main = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) => {
            return ConfigPath::Unknown {
                reason: format!("cannot read {}: {e}", path.display()),
            };
        }
    };
    let imports: Vec<String> = containerd_config::imports(&main)
        .iter()
        .flat_map(|pattern| expand(opts, pattern))
        .filter_map(|p| std::fs::read_to_string(p).ok())
        .collect();
    containerd_config::check(&main, &imports, &opts.certs_dir)
}

/// Expands an import path, with at most one `*` in its file name (containerd uses Go's glob;
/// this covers the `config.d/*.toml` form every distribution writes). Sorted, as Go's is.
fn expand(opts: &NodeOptions, pattern: &str) -> Vec<PathBuf> {
    let path = opts.on_host(pattern);
    let (Some(dir), Some(name)) = (path.parent(), path.file_name().and_then(|n| n.to_str())) else {
        return Vec::new();
    };
    let Some((prefix, suffix)) = name.split_once('*') else {
        return vec![path.clone()];
    };
    let mut out: Vec<PathBuf> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name().and_then(|n| n.to_str()).is_some_and(|n| {
                n.len() >= prefix.len() + suffix.len()
                    && n.starts_with(prefix)
                    && n.ends_with(suffix)
            })
        })
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
            resync: Duration::from_secs(60),
            remove: false,
        }
    }

    #[test]
    fn reads_the_config_and_its_imports_under_the_host_root() {
        let root = tempfile::tempdir().unwrap();
        let etc = root.path().join("etc/containerd");
        std::fs::create_dir_all(etc.join("config.d")).unwrap();
        std::fs::write(
            etc.join("config.toml"),
            "version = 2\nimports = [\"/etc/containerd/config.d/*.toml\"]\n",
        )
        .unwrap();
        let o = opts(root.path());
        assert_eq!(check_containerd(&o).label(), "not_used");
        std::fs::write(
            etc.join("config.d/10-registry.toml"),
            "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\".registry]\nconfig_path = \"/etc/containerd/certs.d\"\n",
        )
        .unwrap();
        std::fs::write(etc.join("config.d/ignored.txt"), "config_path = 1").unwrap();
        assert_eq!(check_containerd(&o).label(), "used");
    }

    #[test]
    fn a_missing_config_is_unknown_not_an_error() {
        let root = tempfile::tempdir().unwrap();
        let v = check_containerd(&opts(root.path()));
        assert_eq!(v.label(), "unknown");
    }
}
