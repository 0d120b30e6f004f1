//! The node agent (`pullthrough node`), as the DaemonSet runs it beside the mirror: it installs
//! hosts.toml files only once the mirror is ready, reports containerd configs that ignore
//! certs.d, leaves the files in place on SIGTERM, and `--remove` puts the node back.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::support::moto::Moto;
use crate::support::pullthrough::{Options, Pullthrough};
use crate::support::registry::Registry;
use crate::support::{ChildGuard, EVENTUALLY_TIMEOUT, free_port, http, pullthrough_bin};

/// What nodeadm writes on an EKS AL2023 node with containerd 1.7 (the fixture's README cites it).
const AL2023_CONTAINERD: &str =
    include_str!("../fixtures/containerd/eks-al2023-containerd1.7.toml");
/// The same for containerd 2.x.
const AL2023_CONTAINERD2: &str = include_str!("../fixtures/containerd/eks-al2023-containerd2.toml");
/// What AL2023's nodeadm keeps in /etc/eks/containerd-version.txt: `containerd --version`.
const AL2023_VERSION_2_1: &str = "containerd github.com/containerd/containerd/v2 v2.1.4 75cb2b7193e4e490e9fbdc236c0e811ccaba3376\n";
/// An import that turns discard off, as peer-to-peer image distribution setups ask.
const DISCARD_OFF: &str =
    "version = 3\n[plugins.\"io.containerd.cri.v1.images\"]\ndiscard_unpacked_layers = false\n";
const NO_CONFIG_PATH: &str =
    "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\"]\nsandbox_image = \"pause\"\n";

/// A host filesystem in a temp dir: `/etc/containerd/config.toml` and an empty certs.d.
struct Host {
    root: tempfile::TempDir,
}

impl Host {
    fn new(containerd_config: &str) -> Host {
        let root = tempfile::tempdir().unwrap();
        let etc = root.path().join("etc/containerd");
        std::fs::create_dir_all(etc.join("certs.d")).unwrap();
        std::fs::write(etc.join("config.toml"), containerd_config).unwrap();
        Host { root }
    }
    /// Writes a file at a host path.
    fn write(&self, host_path: &str, text: &str) {
        let p = self.root.path().join(host_path.trim_start_matches('/'));
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, text).unwrap();
    }
    fn certs(&self) -> PathBuf {
        self.root.path().join("etc/containerd/certs.d")
    }
    fn hosts_files(&self) -> Vec<String> {
        let mut out: Vec<String> = std::fs::read_dir(self.certs())
            .unwrap()
            .filter_map(|e| {
                let p = e.unwrap().path().join("hosts.toml");
                p.exists().then(|| {
                    p.parent()
                        .unwrap()
                        .file_name()
                        .unwrap()
                        .to_string_lossy()
                        .into_owned()
                })
            })
            .collect();
        out.sort();
        out
    }
}

struct Agent {
    child: ChildGuard,
    port: u16,
    _logs: tempfile::TempDir,
}

impl Agent {
    async fn start(config: &Path, host: &Host, extra: &[&str]) -> Agent {
        let logs = tempfile::tempdir().unwrap();
        let port = free_port();
        let mut cmd = Command::new(pullthrough_bin());
        cmd.args(["--log-format", "json", "node", "--config"])
            .arg(config)
            .arg("--host-root")
            .arg(host.root.path())
            .args(["--listen", &format!("127.0.0.1:{port}"), "--resync", "1s"])
            .args(extra)
            .env_clear()
            .env("RUST_LOG", "info");
        let mut child = ChildGuard::spawn("node", &mut cmd, logs.path());
        child.wait_for_port(port).await;
        Agent {
            child,
            port,
            _logs: logs,
        }
    }

    async fn get(&self, path: &str) -> (u16, String) {
        let resp = http::get(&format!("http://127.0.0.1:{}{path}", self.port), &[])
            .await
            .unwrap();
        (
            resp.status().as_u16(),
            String::from_utf8_lossy(resp.body()).into_owned(),
        )
    }

    /// Polls `/readyz` until its body contains `want`; returns the status.
    async fn readyz_until(&self, want: &str) -> u16 {
        let deadline = tokio::time::Instant::now() + EVENTUALLY_TIMEOUT;
        loop {
            let (status, body) = self.get("/readyz").await;
            if body.contains(want) {
                return status;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "readyz never said {want:?}; last: {status} {body}\n{}",
                self.child.stderr()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn metric(&self, series: &str) -> Option<f64> {
        let (_, text) = self.get("/metrics").await;
        text.lines()
            .find_map(|l| l.strip_prefix(series).and_then(|v| v.strip_prefix(' ')))
            .and_then(|v| v.trim().parse().ok())
    }
}

#[tokio::test]
async fn installs_only_once_the_mirror_is_ready_and_leaves_the_files_on_sigterm() {
    let mut moto = Moto::start().await;
    let registry = Registry::start(&moto.password()).await;
    // The token API is down: the mirror runs but is not ready.
    moto.stop();
    let pt = Pullthrough::start(Options::new(&registry.base_url(), &moto.endpoint())).await;
    let host = Host::new(AL2023_CONTAINERD);
    let mut agent = Agent::start(pt.config_path(), &host, &[]).await;

    assert_eq!(agent.readyz_until("waiting for the mirror").await, 503);
    assert!(host.hosts_files().is_empty(), "{:?}", host.hosts_files());
    assert_eq!(agent.metric("pullthrough_node_installed").await, Some(0.0));

    // The token API comes back; the mirror turns ready; the agent installs.
    let account = moto.account().to_owned();
    moto.restart_with_account(&account).await;
    assert_eq!(agent.readyz_until("hosts.toml files installed").await, 200);
    assert_eq!(
        host.hosts_files(),
        ["docker.io", "quay.io", "registry.k8s.io"]
    );
    let hub = std::fs::read_to_string(host.certs().join("docker.io/hosts.toml")).unwrap();
    assert!(hub.contains(&format!("[host.\"{}\"]", pt.url())), "{hub}");
    assert_eq!(
        agent
            .metric("pullthrough_node_containerd_config_path{state=\"used\"}")
            .await,
        Some(1.0)
    );
    assert_eq!(agent.metric("pullthrough_node_installed").await, Some(1.0));

    agent.child.sigterm();
    let status = agent
        .child
        .wait_exit(Duration::from_secs(10))
        .await
        .unwrap();
    assert!(status.success(), "{status:?}");
    assert_eq!(
        host.hosts_files(),
        ["docker.io", "quay.io", "registry.k8s.io"]
    );
}

#[tokio::test]
async fn reports_not_ready_when_containerd_ignores_certs_d_and_remove_puts_the_node_back() {
    let moto = Moto::start().await;
    let registry = Registry::start(&moto.password()).await;
    let pt = Pullthrough::start(Options::new(&registry.base_url(), &moto.endpoint())).await;
    let host = Host::new(NO_CONFIG_PATH);
    // A file the node already had.
    let hand = "server = \"https://quay.io\"\n[host.\"https://quay-mirror.corp.example\"]\n";
    std::fs::create_dir_all(host.certs().join("quay.io")).unwrap();
    std::fs::write(host.certs().join("quay.io/hosts.toml"), hand).unwrap();

    let mut agent = Agent::start(pt.config_path(), &host, &[]).await;
    assert_eq!(
        agent.readyz_until("sets no registry config_path").await,
        503
    );
    assert_eq!(
        agent
            .metric("pullthrough_node_containerd_config_path{state=\"not_used\"}")
            .await,
        Some(1.0)
    );
    assert!(
        agent
            .child
            .stderr()
            .contains("containerd does not read certs.d")
    );
    // The files go in anyway: harmless, and right as soon as containerd is configured.
    assert_eq!(
        host.hosts_files(),
        ["docker.io", "quay.io", "registry.k8s.io"]
    );
    agent.child.sigterm();
    agent
        .child
        .wait_exit(Duration::from_secs(10))
        .await
        .unwrap();

    // The uninstall DaemonSet's container.
    let remover = Agent::start(pt.config_path(), &host, &["--remove"]).await;
    assert_eq!(remover.readyz_until("removed").await, 200);
    assert_eq!(host.hosts_files(), ["quay.io"]);
    assert_eq!(
        std::fs::read_to_string(host.certs().join("quay.io/hosts.toml")).unwrap(),
        hand
    );
    let left: Vec<_> = std::fs::read_dir(host.certs())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(
        left,
        ["quay.io"],
        "directories pullthrough created are gone"
    );
}

/// containerd 2.1 with a colon-list `config_path` and nothing that forces the local pull skips
/// every hosts.toml (its transfer service reads the list as one directory). EKS AL2023 is saved
/// by `discard_unpacked_layers = true`; an import that turns it off breaks the node, silently
/// on containerd's side, so the agent must say so, and recover once the import is gone.
#[tokio::test]
async fn reports_bypassed_while_containerd_2_1_would_skip_hosts_toml_and_recovers() {
    let moto = Moto::start().await;
    let registry = Registry::start(&moto.password()).await;
    let pt = Pullthrough::start(Options::new(&registry.base_url(), &moto.endpoint())).await;
    let host = Host::new(&format!(
        "imports = [\"/etc/containerd/config.d/*.toml\"]\n{AL2023_CONTAINERD2}"
    ));
    host.write("/etc/containerd/config.d/50-p2p.toml", DISCARD_OFF);
    // The version comes from the node, as nodeadm leaves it.
    host.write("/etc/eks/containerd-version.txt", AL2023_VERSION_2_1);

    let mut agent = Agent::start(pt.config_path(), &host, &[]).await;
    assert_eq!(
        agent
            .readyz_until("containerd 2.1 pulls with its transfer service")
            .await,
        503
    );
    let (_, body) = agent.get("/readyz").await;
    assert!(
        body.contains("use_local_image_pull = true") && body.contains("#12415"),
        "{body}"
    );
    let gauge =
        |state: &str| format!("pullthrough_node_containerd_config_path{{state=\"{state}\"}}");
    assert_eq!(agent.metric(&gauge("bypassed")).await, Some(1.0));
    assert_eq!(agent.metric(&gauge("used")).await, Some(0.0));
    // The files go in anyway: right as soon as containerd reads them.
    assert_eq!(
        host.hosts_files(),
        ["docker.io", "quay.io", "registry.k8s.io"]
    );

    // The operator drops the import; the next resync sees AL2023's own config.
    std::fs::remove_file(host.root.path().join("etc/containerd/config.d/50-p2p.toml")).unwrap();
    assert_eq!(agent.readyz_until("hosts.toml files installed").await, 200);
    assert_eq!(agent.metric(&gauge("used")).await, Some(1.0));
    assert_eq!(agent.metric(&gauge("bypassed")).await, Some(0.0));

    agent.child.sigterm();
    agent
        .child
        .wait_exit(Duration::from_secs(10))
        .await
        .unwrap();
    let log = agent.child.stderr();
    // Said once, with what to change, and the version's source; not at every resync.
    assert_eq!(
        log.matches("containerd on this node skips every hosts.toml")
            .count(),
        1,
        "{log}"
    );
    assert!(
        log.contains("2.1 (/etc/eks/containerd-version.txt)"),
        "{log}"
    );
    assert!(log.contains("containerd reads certs.d"), "{log}");
}

/// A `version = 2` config with a colon list and discard off (AL2023 with containerd 1.7 and a
/// peer-to-peer setup) works on 1.7 and would be bypassed on 2.1+. Not knowing the version, the
/// agent assumes 2.1+ and says how to tell it; told 1.7, it is ready.
#[tokio::test]
async fn an_unknown_version_assumes_2_1_until_told() {
    let moto = Moto::start().await;
    let registry = Registry::start(&moto.password()).await;
    let pt = Pullthrough::start(Options::new(&registry.base_url(), &moto.endpoint())).await;
    let host = Host::new(&AL2023_CONTAINERD.replace(
        "discard_unpacked_layers = true",
        "discard_unpacked_layers = false",
    ));

    let mut agent = Agent::start(pt.config_path(), &host, &[]).await;
    assert_eq!(
        agent
            .readyz_until("containerd 2.1 or later pulls with its transfer service")
            .await,
        503
    );
    let (_, body) = agent.get("/readyz").await;
    assert!(body.contains("tell it with --containerd-version"), "{body}");
    agent.child.sigterm();
    agent
        .child
        .wait_exit(Duration::from_secs(10))
        .await
        .unwrap();

    let agent = Agent::start(pt.config_path(), &host, &["--containerd-version", "1.7"]).await;
    assert_eq!(agent.readyz_until("hosts.toml files installed").await, 200);
    assert_eq!(
        agent
            .metric("pullthrough_node_containerd_config_path{state=\"used\"}")
            .await,
        Some(1.0)
    );
    assert!(agent.child.stderr().contains("1.7 (--containerd-version)"));
}

/// The node lifecycle with a real containerd of each version: a certs.d that already has a
/// hand-written `hosts.toml` (pointing at a second local registry that plays the real upstream:
/// the one loopback `server` here that is not a dead port, since the test is about pulls going
/// back to it), then install, pull through the mirror, remove (the hand-written file comes back
/// byte for byte), pull straight from that upstream, reinstall, kill the mirror, and pull through
/// the merged file's own host.
///
/// The items the test uses are named in full, so this E2E stays apart from the agent tests above.
#[rstest::rstest]
#[case::containerd_1_6(crate::support::containerd::ContainerdVersion::V1_6)]
#[case::containerd_1_7(crate::support::containerd::ContainerdVersion::V1_7)]
#[case::containerd_2_1(crate::support::containerd::ContainerdVersion::V2_1)]
#[tokio::test]
async fn install_pull_remove_restores_the_node_and_pulls_go_upstream(
    #[case] version: crate::support::containerd::ContainerdVersion,
) {
    use crate::support::containerd::Containerd;
    use crate::support::image::Image;
    use crate::support::short_tempdir;

    let moto = Moto::start().await;
    let ecr = Registry::start(&moto.password()).await;
    let upstream = Registry::start_open().await;
    let image = Image::small("app");
    ecr.push("quay/org/app", "1", &image).await;
    upstream.push("org/app", "1", &image).await;
    ecr.clear_requests();
    upstream.clear_requests();

    let (opts, _dead) = Options::with_dead_servers(&ecr.base_url(), &moto.endpoint());
    let mut pt = Pullthrough::start(opts).await;
    let certs = short_tempdir("certs");
    let hand = format!(
        "# Written by hand, long before pullthrough.\nserver = \"{}\"\n\n[host.\"{}\"]\n  capabilities = [\"pull\", \"resolve\"]\n",
        upstream.base_url(),
        upstream.base_url()
    );
    std::fs::create_dir_all(certs.path().join("quay.io")).unwrap();
    std::fs::write(certs.path().join("quay.io/hosts.toml"), &hand).unwrap();
    let before = std::fs::read_dir(certs.path()).unwrap().count();

    let out = pt.write_hosts(certs.path()).unwrap();
    assert!(out.contains("quay.io/hosts.toml: merged"), "{out}");
    let containerd = Containerd::start_version(version, certs.path()).await;

    // Installed: the pull goes through the mirror to the ECR stand-in.
    let reference = "quay.io/org/app:1";
    containerd
        .pull_image(reference)
        .await
        .unwrap_or_else(|e| panic!("{version}: {e}"));
    assert_eq!(
        containerd.image_digest(reference).await.unwrap().as_deref(),
        Some(image.digest())
    );
    assert!(
        ecr.paths_seen()
            .contains(&"/v2/quay/org/app/manifests/1".to_string()),
        "{:?}",
        ecr.paths_seen()
    );
    assert!(
        upstream.paths_seen().is_empty(),
        "{:?}",
        upstream.paths_seen()
    );
    containerd.remove_image(reference).await.unwrap();

    // Removed: the hand-written file is back, byte for byte, and nothing else is left.
    let dir = certs.path().as_os_str();
    crate::support::pullthrough_ok(["hosts".as_ref(), "--remove".as_ref(), "--dir".as_ref(), dir]);
    assert_eq!(
        std::fs::read_to_string(certs.path().join("quay.io/hosts.toml")).unwrap(),
        hand
    );
    assert_eq!(std::fs::read_dir(certs.path()).unwrap().count(), before);
    assert_eq!(
        std::fs::read_dir(certs.path().join("quay.io"))
            .unwrap()
            .count(),
        1
    );

    // The next pull goes straight to the upstream; the mirror and ECR see nothing.
    ecr.clear_requests();
    let mirror_requests = pt.access_log().len();
    containerd
        .pull_image(reference)
        .await
        .unwrap_or_else(|e| panic!("{version}: {e}"));
    assert_eq!(
        containerd.image_digest(reference).await.unwrap().as_deref(),
        Some(image.digest())
    );
    assert_saw_tag(&upstream);
    assert!(ecr.paths_seen().is_empty(), "{:?}", ecr.paths_seen());
    assert_eq!(pt.access_log().len(), mirror_requests);

    containerd.remove_image(reference).await.unwrap();

    // Installed again, and the mirror dies: the merged file's own hosts still serve the pull.
    let out = pt.write_hosts(certs.path()).unwrap();
    assert!(out.contains("quay.io/hosts.toml: merged"), "{out}");
    pt.kill();
    upstream.clear_requests();
    containerd
        .pull_image(reference)
        .await
        .unwrap_or_else(|e| panic!("{version}: {e}"));
    assert_saw_tag(&upstream);
}

/// The upstream registry was asked for `org/app:1`. The hand-written hosts.toml lists it as a
/// mirror host too, so containerd may add `?ns=`.
fn assert_saw_tag(upstream: &Registry) {
    let seen = upstream.paths_seen();
    assert!(
        seen.iter()
            .any(|p| p.starts_with("/v2/org/app/manifests/1")),
        "{seen:?}"
    );
}
