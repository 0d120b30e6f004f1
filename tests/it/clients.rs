//! Clients other than containerd pull through pullthrough: Docker Engine (`registry-mirrors`),
//! podman (the `pullthrough hosts --format registries-conf` drop-in) and the `oci-client` crate
//! (the path-prefix form, `127.0.0.1:<port>/docker.io/library/alpine:3.19`).
//!
//! ECR is the ECR-like stand-in ([`EcrFront`]), importing from one open registry that plays Docker
//! Hub, quay.io and registry.k8s.io; each test checks the ECR paths in the ECR registry's access
//! log. The real upstreams are unreachable: podman's `location`s are the dead loopback port of
//! `Options::with_dead_servers`, and Docker Engine, whose fallback to Docker Hub cannot be
//! configured, runs with `HTTPS_PROXY`/`HTTP_PROXY` at a dead loopback port, so a fallback is
//! refused on this machine and never leaves it (Go never proxies loopback addresses, so the
//! mirror and the S3 stand-in are reached directly).
//!
//! Each daemon runs with private paths (data root, exec root, socket, storage) in a tempdir and
//! is stopped when its guard drops.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use tempfile::TempDir;

use crate::support::ecr_front::EcrFront;
use crate::support::image::Image;
use crate::support::moto::Moto;
use crate::support::pullthrough::{Options, Pullthrough};
use crate::support::registry::Registry;
use crate::support::{
    ChildGuard, STARTUP_TIMEOUT, dead_port, eventually, pullthrough_ok, short_tempdir,
    try_eventually,
};

/// Debian's Docker CLI (20.10), not whatever `docker` comes first in `PATH` (a newer CLI may).
const DOCKER: &str = "/usr/bin/docker";
/// Debian's Docker Engine.
const DOCKERD: &str = "/usr/sbin/dockerd";
/// Debian's podman (4.3).
const PODMAN: &str = "/usr/bin/podman";

/// moto, the ECR registry, the registry playing the public upstreams, the ECR-like front importing
/// from it, and pullthrough with every `server` at a dead port.
struct Stack {
    _moto: Moto,
    ecr: Registry,
    _hub: Registry,
    front: EcrFront,
    pt: Pullthrough,
    /// A dead loopback URL (`http://127.0.0.1:<port>`): the upstream that is never there.
    dead: String,
}

/// An image on the upstream stand-in: (repository there, tag, image).
type Seed<'a> = (&'a str, &'a str, &'a Image);

async fn stack(default_upstream: Option<&str>, images: &[Seed<'_>]) -> Stack {
    let moto = Moto::start().await;
    let ecr = Registry::start(&moto.password()).await;
    let hub = Registry::start_open().await;
    for (repo, tag, image) in images {
        hub.push(repo, tag, image).await;
    }
    let front = EcrFront::with_upstreams(
        &ecr,
        &[("docker-hub", &hub), ("quay", &hub), ("kubernetes", &hub)],
    )
    .await;
    let (mut opts, dead) = Options::with_dead_servers(&front.base_url(), &moto.endpoint());
    opts.default_upstream = default_upstream.map(str::to_owned);
    let pt = Pullthrough::start(opts).await;
    ecr.clear_requests();
    Stack {
        _moto: moto,
        ecr,
        _hub: hub,
        front,
        pt,
        dead,
    }
}

impl Stack {
    /// The ECR registry's access log has a manifest GET for `repo:tag` that succeeded.
    async fn assert_ecr_served(&self, repo: &str, tag: &str) {
        let status = self
            .ecr
            .wait_for_request("GET", &format!("/v2/{repo}/manifests/{tag}"))
            .await;
        assert_eq!(status, 200, "{repo}:{tag}");
    }

    /// Every S3 blob download went without a credential, and at least one happened for `repo`.
    async fn assert_blobs_from_s3(&self, repo: &str) {
        // The front logs a request once it has answered it: wait for the line.
        let found = try_eventually(|| (!self.front.s3_blobs(repo).is_empty()).then_some(())).await;
        assert!(
            found.is_some(),
            "no blob of {repo} from S3:\n{}",
            self.front.log_text()
        );
        let s3 = self.front.s3_requests();
        assert!(s3.iter().all(|r| !r.authorization), "{s3:?}");
    }
}

fn output_text(out: &Output) -> String {
    format!(
        "{}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Runs a command off the runtime's threads (tokio's `process` feature is off for this crate).
async fn run(mut cmd: Command) -> Output {
    let what = format!("{cmd:?}");
    tokio::task::spawn_blocking(move || cmd.output())
        .await
        .expect("join")
        .unwrap_or_else(|e| panic!("{what}: {e}"))
}

// ---------------------------------------------------------------------------------------------
// Docker Engine

/// A private `dockerd`: its own data root, exec root, socket, pidfile and daemon.json, no
/// iptables, no bridge, `vfs` storage (no mounts a killed daemon could leave behind). dockerd
/// starts its own containerd (the system's 1.6) under the exec root and stops it with itself.
struct Dockerd {
    child: ChildGuard,
    socket: PathBuf,
    exec_root: PathBuf,
    cli_config: PathBuf,
    proxy: String,
    // Last: removed after the daemon stopped.
    _dir: TempDir,
}

impl Dockerd {
    /// Starts dockerd with `registry-mirrors = [mirror]` and waits until the API answers.
    async fn start(mirror: &str) -> Dockerd {
        let dir = short_tempdir("dockerd");
        let d = dir.path();
        let socket = d.join("docker.sock");
        let exec_root = d.join("exec");
        let cli_config = d.join("cli");
        std::fs::create_dir_all(&cli_config).unwrap();
        std::fs::write(
            d.join("daemon.json"),
            serde_json::json!({ "registry-mirrors": [mirror] }).to_string(),
        )
        .unwrap();
        // Where a fallback to Docker Hub would go: a loopback port nobody listens on.
        let proxy = format!("http://127.0.0.1:{}", dead_port());
        let mut cmd = Command::new(DOCKERD);
        cmd.arg("--config-file")
            .arg(d.join("daemon.json"))
            .arg("--data-root")
            .arg(d.join("data"))
            .arg("--exec-root")
            .arg(&exec_root)
            .arg("--pidfile")
            .arg(d.join("docker.pid"))
            .arg("--host")
            .arg(format!("unix://{}", socket.display()))
            .args([
                "--iptables=false",
                "--ip6tables=false",
                "--ip-forward=false",
                "--ip-masq=false",
                "--bridge=none",
                "--userland-proxy=false",
                "--storage-driver",
                "vfs",
            ])
            .env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .env("HTTPS_PROXY", &proxy)
            .env("HTTP_PROXY", &proxy)
            .env("NO_PROXY", "127.0.0.1,localhost");
        let child = ChildGuard::spawn("dockerd", &mut cmd, d);
        let mut dockerd = Dockerd {
            child,
            socket,
            exec_root,
            cli_config,
            proxy,
            _dir: dir,
        };
        dockerd.wait_ready().await;
        dockerd
    }

    async fn wait_ready(&mut self) {
        let deadline = tokio::time::Instant::now() + STARTUP_TIMEOUT;
        loop {
            if self.socket.exists() {
                let out = self
                    .docker(&["version", "--format", "{{.Server.Version}}"])
                    .await;
                if out.status.success() {
                    return;
                }
            }
            if let Some(status) = self.child.try_exited() {
                panic!(
                    "dockerd exited ({status}) during start-up; stderr:\n{}",
                    self.child.stderr()
                );
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "dockerd not ready within {STARTUP_TIMEOUT:?}; stderr:\n{}",
                self.child.stderr()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// `/usr/bin/docker -H unix://<socket> ARGS` with a private CLI config.
    async fn docker(&self, args: &[&str]) -> Output {
        let mut cmd = Command::new(DOCKER);
        cmd.arg("--host")
            .arg(format!("unix://{}", self.socket.display()))
            .args(args)
            .env("DOCKER_CONFIG", &self.cli_config);
        run(cmd).await
    }

    /// `docker pull REF`, panicking with the output and dockerd's log if it fails.
    async fn pull(&self, reference: &str, pt: &Pullthrough) {
        let out = self.docker(&["pull", reference]).await;
        assert!(
            out.status.success(),
            "docker pull {reference}: {}\ndockerd log:\n{}\npullthrough log:\n{}",
            output_text(&out),
            self.child.stderr(),
            pt.log()
        );
    }

    /// The manifest digest `docker image inspect` records for `reference` (its RepoDigests).
    async fn repo_digest(&self, reference: &str) -> String {
        let out = self
            .docker(&[
                "image",
                "inspect",
                "--format",
                "{{range .RepoDigests}}{{println .}}{{end}}",
                reference,
            ])
            .await;
        assert!(out.status.success(), "{}", output_text(&out));
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        text.lines()
            .find_map(|l| l.split_once('@').map(|(_, d)| d.to_owned()))
            .unwrap_or_else(|| panic!("no RepoDigests for {reference}: {text:?}"))
    }

    /// The pid of the containerd dockerd started, from its pidfile under the exec root.
    fn managed_containerd_pid(&self) -> Option<u32> {
        std::fs::read_to_string(self.exec_root.join("containerd/containerd.pid"))
            .ok()
            .and_then(|p| p.trim().parse().ok())
    }
}

impl Drop for Dockerd {
    fn drop(&mut self) {
        let containerd = self.managed_containerd_pid();
        // dockerd stops the containerd it started on a graceful stop.
        self.child.terminate(Duration::from_secs(15));
        // Should it not have, stop that containerd too, by its pid, so nothing outlives the test.
        if let Some(pid) = containerd
            && Path::new(&format!("/proc/{pid}")).exists()
            && std::fs::read_to_string(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| c.contains(&self.exec_root.display().to_string()))
        {
            let _ = Command::new("kill")
                .arg("-KILL")
                .arg(pid.to_string())
                .status();
        }
    }
}

/// Docker Engine 20.10 with `registry-mirrors` = pullthrough (and `default_upstream =
/// "docker.io"`, since dockerd sends `/v2/library/alpine/...` with no registry name): an official
/// and a non-official Docker Hub image come through ECR. A missing image shows what Docker
/// reports: only its fallback's error, while the mirror's 404 is in pullthrough's access log.
#[tokio::test]
async fn docker_engine_pulls_through_registry_mirrors() {
    let alpine = Image::small("docker-alpine");
    let app = Image::small("docker-someorg-app");
    let s = stack(
        Some("docker.io"),
        &[
            ("library/alpine", "3.19", &alpine),
            ("someorg/app", "1", &app),
        ],
    )
    .await;
    let dockerd = Dockerd::start(&s.pt.url()).await;

    for (reference, image, repo, tag) in [
        ("alpine:3.19", &alpine, "docker-hub/library/alpine", "3.19"),
        ("someorg/app:1", &app, "docker-hub/someorg/app", "1"),
    ] {
        dockerd.pull(reference, &s.pt).await;
        assert_eq!(
            dockerd.repo_digest(reference).await,
            image.digest(),
            "{reference}"
        );
        s.assert_ecr_served(repo, tag).await;
        s.assert_blobs_from_s3(repo).await;
    }
    // dockerd names no registry (`/v2/library/alpine/...`): pullthrough's default_upstream did.
    let log = s.pt.access_log();
    let pulls: Vec<_> = log
        .iter()
        .filter(|l| l["kind"] == "manifest" || l["kind"] == "blob")
        .collect();
    assert!(!pulls.is_empty());
    assert!(
        pulls.iter().all(|l| l["registry"] == "docker.io"),
        "{pulls:?}"
    );

    // The mirror misses: dockerd falls back to Docker Hub (here the dead proxy) and reports only
    // that error; the mirror's 404 is in pullthrough's access log.
    let out = dockerd.docker(&["pull", "nosuch/image:1"]).await;
    assert!(!out.status.success(), "{}", output_text(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("registry-1.docker.io"), "{stderr}");
    assert!(!stderr.contains(&s.pt.host()), "{stderr}");
    let miss =
        s.pt.wait_for_access("/v2/docker-hub/nosuch/image/manifests/1")
            .await;
    assert_eq!(miss["status"], 404, "{miss}");
    // ...and the fallback went to the dead proxy, not out of the machine.
    assert!(
        stderr.contains(dockerd.proxy.trim_start_matches("http://"))
            || stderr.contains("proxyconnect"),
        "{stderr}"
    );
}

// ---------------------------------------------------------------------------------------------
// podman

/// podman 4.3 with `CONTAINERS_REGISTRIES_CONF` = what `pullthrough hosts --format
/// registries-conf` prints: docker.io, quay.io and registry.k8s.io names come through the mirror
/// as `/v2/<registry>/<repository>/...`, and on to ECR.
#[tokio::test]
async fn podman_pulls_through_the_registries_conf_drop_in() {
    let alpine = Image::small("podman-alpine");
    let busybox = Image::small("podman-busybox");
    let pause = Image::multi_arch("podman-pause");
    let s = stack(
        None,
        &[
            ("library/alpine", "3.19", &alpine),
            ("prometheus/busybox", "latest", &busybox),
            ("pause", "3.10", &pause),
        ],
    )
    .await;
    let dir = short_tempdir("podman");
    let conf = pullthrough_ok([
        "hosts".as_ref(),
        "--format".as_ref(),
        "registries-conf".as_ref(),
        "--config".as_ref(),
        s.pt.config_path().as_os_str(),
    ]);
    // If the mirror failed, podman would go to `location`: the dead loopback port.
    let dead = s.dead.trim_start_matches("http://");
    assert!(conf.contains(&format!("location = \"{dead}\"")), "{conf}");
    let conf_path = dir.path().join("registries.conf");
    std::fs::write(&conf_path, &conf).unwrap();

    for (reference, image, repo, tag) in [
        (
            "docker.io/library/alpine:3.19",
            &alpine,
            "docker-hub/library/alpine",
            "3.19",
        ),
        (
            "quay.io/prometheus/busybox:latest",
            &busybox,
            "quay/prometheus/busybox",
            "latest",
        ),
        (
            "registry.k8s.io/pause:3.10",
            &pause,
            "kubernetes/pause",
            "3.10",
        ),
    ] {
        let out = podman(dir.path(), &conf_path, &["pull", "--quiet", reference]).await;
        assert!(
            out.status.success(),
            "podman pull {reference}: {}\npullthrough log:\n{}\necr-front log:\n{}",
            output_text(&out),
            s.pt.log(),
            s.front.log_text()
        );
        let out = podman(
            dir.path(),
            &conf_path,
            &["image", "inspect", "--format", "{{.Digest}}", reference],
        )
        .await;
        assert!(out.status.success(), "{}", output_text(&out));
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            image.digest(),
            "{reference}"
        );
        s.assert_ecr_served(repo, tag).await;
        s.assert_blobs_from_s3(repo).await;
        // The path-prefix form: the registry's name is the first path component.
        let registry = reference.split('/').next().unwrap();
        assert!(
            s.pt.access_log()
                .iter()
                .any(|l| l["registry"] == registry && l["status"] == 200),
            "{registry}: {}",
            s.pt.log()
        );
    }
}

/// `podman --root … --runroot … --storage-driver vfs ARGS` with `registries.conf`; no systemd or
/// journald here, hence cgroupfs and file events.
async fn podman(dir: &Path, registries_conf: &Path, args: &[&str]) -> Output {
    let proxy = format!("http://127.0.0.1:{}", dead_port());
    let mut cmd = Command::new(PODMAN);
    cmd.arg("--root")
        .arg(dir.join("root"))
        .arg("--runroot")
        .arg(dir.join("runroot"))
        .arg("--tmpdir")
        .arg(dir.join("tmp"))
        .args([
            "--storage-driver",
            "vfs",
            "--cgroup-manager",
            "cgroupfs",
            "--events-backend",
            "file",
        ])
        .args(args)
        .env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .env("HOME", dir)
        .env("CONTAINERS_REGISTRIES_CONF", registries_conf)
        // Belt and braces: anything not loopback would go to a dead loopback proxy.
        .env("HTTPS_PROXY", &proxy)
        .env("HTTP_PROXY", &proxy)
        .env("NO_PROXY", "127.0.0.1,localhost");
    run(cmd).await
}

// ---------------------------------------------------------------------------------------------
// oci-client

/// The `oci-client` crate through the path-prefix form (`127.0.0.1:<port>/docker.io/...`, no
/// `?ns=`): a manifest, an index (and the platform manifest it resolves to) and a layer, each
/// checked against its digest by oci-client itself (the manifest against `Docker-Content-Digest`,
/// the layer against its descriptor, streamed through the 307 to S3).
#[tokio::test]
async fn oci_client_pulls_a_manifest_an_index_and_a_layer_by_path_prefix() {
    use oci_client::client::{ClientConfig, ClientProtocol};
    use oci_client::manifest::OciManifest;
    use oci_client::secrets::RegistryAuth;
    use oci_client::{Client, Reference};

    let alpine = Image::small("oci-client-alpine");
    let multi = Image::multi_arch("oci-client-multi");
    let s = stack(
        None,
        &[
            ("library/alpine", "3.19", &alpine),
            ("library/multi", "1", &multi),
        ],
    )
    .await;
    // reqwest (under oci-client) is built with rustls and no bundled crypto provider.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let client = Client::new(ClientConfig {
        protocol: ClientProtocol::Http,
        ..ClientConfig::default()
    });
    let auth = RegistryAuth::Anonymous;

    // A single-platform manifest.
    let reference: Reference = format!("{}/docker.io/library/alpine:3.19", s.pt.host())
        .parse()
        .unwrap();
    let (manifest, digest) = client
        .pull_manifest(&reference, &auth)
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", s.pt.log()));
    assert_eq!(digest, alpine.digest());
    let OciManifest::Image(manifest) = manifest else {
        panic!("not an image manifest: {manifest:?}")
    };
    s.assert_ecr_served("docker-hub/library/alpine", "3.19")
        .await;

    // One of its layers, through the redirect to S3, checked against the descriptor's digest.
    let layer = &manifest.layers[0];
    assert_eq!(layer.digest, alpine.manifests[0].layers[0].digest);
    let mut bytes = Vec::new();
    client
        .pull_blob(&reference, layer, &mut bytes)
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", s.front.log_text()));
    assert!(
        bytes == alpine.manifests[0].layers[0].bytes,
        "layer bytes differ"
    );
    s.assert_blobs_from_s3("docker-hub/library/alpine").await;

    // An index, and the platform manifest it resolves to for this machine (linux/amd64).
    let reference: Reference = format!("{}/docker.io/library/multi:1", s.pt.host())
        .parse()
        .unwrap();
    let (index, digest) = client.pull_manifest(&reference, &auth).await.unwrap();
    assert_eq!(digest, multi.digest());
    let OciManifest::ImageIndex(index) = index else {
        panic!("not an index: {index:?}")
    };
    assert_eq!(index.manifests.len(), 2);
    let (_, platform_digest, list_digest) = client
        .pull_image_manifest_and_list_digest(&reference, &auth)
        .await
        .unwrap();
    assert_eq!(
        platform_digest,
        multi.manifest_for("amd64").unwrap().digest()
    );
    assert_eq!(list_digest.as_deref(), Some(multi.digest()));
    s.assert_ecr_served("docker-hub/library/multi", "1").await;
    eventually("both imports in the front's log", || {
        (s.front.imports()
            == [
                "docker-hub/library/alpine:3.19",
                "docker-hub/library/multi:1",
            ])
        .then_some(())
    })
    .await;
}
