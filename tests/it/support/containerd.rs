//! A private containerd daemon of a given version (1.6, 1.7 or 2.1), driven the way a kubelet
//! drives it (CRI `ImageService` over gRPC) and the way an operator does (`ctr`), so the tests see
//! what each containerd really sends to a mirror.
//!
//! # Versions
//! [`ContainerdVersion`] names the three containerd releases EKS nodes run and this machine has:
//! Debian 12's 1.6.20 (`/usr/bin/containerd`, from `scripts/deps`), and 1.7.24 and 2.1.9, which
//! `scripts/deps-containerd` unpacks from Debian trixie's and sid's packages into
//! `.cache/containerd/<version>/usr/bin/` without installing them. Each daemon runs with `ctr` of
//! the same version. A test that covers all of them takes the version as an rstest case named
//! after it (`#[case::containerd_2_1(ContainerdVersion::V2_1)]`), so a failure says which
//! containerd broke.
//!
//! # Running containerd in the sandbox
//! Everything lives in a tempdir under `/tmp` (socket paths must stay under 108 bytes): `root`,
//! `state`, the gRPC and ttrpc sockets and the log. The `config.toml` is rendered from the
//! version's minimal config, `tests/fixtures/containerd/min-<version>.toml` (`version = 2` for
//! 1.x, `version = 3` for 2.x; measured, with the reasons, in that directory's `NOTES.md`):
//! - the CRI registry's `config_path` is the caller's `certs.d` (or any string, e.g. a
//!   colon-separated list, or none: [`ContainerdOptions::config_path`]);
//! - CRI and `ctr` use the `native` snapshotter: it needs no mounts, so a killed daemon leaves
//!   nothing mounted behind. containerd 2.1's CRI pulls through its transfer service, whose
//!   unpacker only knows the transfer plugin's own `unpack_config` ("no unpack platforms
//!   defined" otherwise), so for 2.x the rendered file adds `native` there too;
//! - what a pull never needs and a sandbox may lack is off: the TCP CRI service, AppArmor, the
//!   oom-score adjustment, the `opt` plugin (it writes to `/opt/containerd`), NRI, unused
//!   snapshotters and the OTLP tracing processor; the CNI dirs point into the tempdir (no CNI
//!   config: containerd logs one error about it and carries on);
//! - debug logging, so a test can read which path CRI pulled with (2.1:
//!   `PullImage "…" … using transfer service` or `… using client.Pull()`);
//! - [`ContainerdOptions::extra`] adds settings to the CRI images table (1.x: the CRI
//!   `containerd` table), e.g. `discard_unpacked_layers = true`.
//!
//! # CRI client
//! [`CriClient`] is a hand-written gRPC client: an HTTP/2 connection over the
//! unix socket (hyper), length-prefixed protobuf frames (prost messages
//! written below with the field numbers of `k8s.io/cri-api`
//! `pkg/apis/runtime/v1/api.proto`), `grpc-status` read from the trailers.
//! CRI images live in containerd namespace `k8s.io`; [`Containerd::ctr_pull`]
//! uses [`CTR_NAMESPACE`] so the two pull paths never see each other's
//! images.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use http::{HeaderMap, Request};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use prost::Message;
use tempfile::TempDir;

use super::{ChildGuard, STARTUP_TIMEOUT, repo_root, short_tempdir};

/// A containerd release the tests run against.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ContainerdVersion {
    /// 1.6.20: Debian 12's, the system's `/usr/bin/containerd`.
    V1_6,
    /// 1.7.24 (Debian trixie's package): EKS AL2023 until 2025, Bottlerocket 1.x variants.
    V1_7,
    /// 2.1.9 (Debian sid's package): EKS AL2023 and Bottlerocket since 2025. CRI pulls through
    /// the transfer service unless a setting forces the older local pull.
    V2_1,
}

impl ContainerdVersion {
    /// Every version, oldest first.
    pub const fn all() -> [ContainerdVersion; 3] {
        [
            ContainerdVersion::V1_6,
            ContainerdVersion::V1_7,
            ContainerdVersion::V2_1,
        ]
    }

    /// The exact upstream version, as `containerd --version` prints it.
    pub const fn version(self) -> &'static str {
        match self {
            ContainerdVersion::V1_6 => "1.6.20",
            ContainerdVersion::V1_7 => "1.7.24",
            ContainerdVersion::V2_1 => "2.1.9",
        }
    }

    /// The directory with this version's `containerd` and `ctr`.
    pub fn bin_dir(self) -> PathBuf {
        match self {
            ContainerdVersion::V1_6 => PathBuf::from("/usr/bin"),
            v => repo_root()
                .join(".cache/containerd")
                .join(v.version())
                .join("usr/bin"),
        }
    }

    /// This version's `containerd`; panics, saying how to get it, if it is not there.
    pub fn containerd(self) -> PathBuf {
        self.binary("containerd")
    }

    /// This version's `ctr`.
    pub fn ctr(self) -> PathBuf {
        self.binary("ctr")
    }

    fn binary(self, name: &str) -> PathBuf {
        let path = self.bin_dir().join(name);
        assert!(
            path.exists(),
            "{} not found: containerd {} comes from {} (run scripts/deps)",
            path.display(),
            self.version(),
            match self {
                ContainerdVersion::V1_6 => "Debian 12's containerd package",
                _ => "scripts/deps-containerd",
            }
        );
        path
    }

    /// Whether the config file is `version = 3` (containerd 2.x) rather than `version = 2`.
    pub const fn is_2x(self) -> bool {
        matches!(self, ContainerdVersion::V2_1)
    }

    /// The minimal config template for this version.
    pub fn template_path(self) -> PathBuf {
        repo_root()
            .join("tests/fixtures/containerd")
            .join(format!("min-{}.toml", self.version()))
    }
}

impl std::fmt::Display for ContainerdVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "containerd {}", self.version())
    }
}

/// How to start a [`Containerd`]. [`ContainerdOptions::new`]: the given version reading one
/// `certs.d` directory, with the version's defaults otherwise.
#[derive(Clone, Debug)]
pub struct ContainerdOptions {
    /// Which containerd.
    pub version: ContainerdVersion,
    /// The CRI registry `config_path` exactly as written to the config (`None`: no such key,
    /// so containerd reads no hosts.toml at all).
    pub config_path: Option<String>,
    /// Lines added to the CRI images table (1.x: the CRI `containerd` table), such as
    /// `discard_unpacked_layers = true`.
    pub extra: String,
}

impl ContainerdOptions {
    /// `version` with `config_path` = `certs_d`.
    pub fn new(version: ContainerdVersion, certs_d: &Path) -> ContainerdOptions {
        ContainerdOptions {
            version,
            config_path: Some(certs_d.display().to_string()),
            extra: String::new(),
        }
    }

    /// Another `config_path` string (e.g. `"<certs.d>:/etc/docker/certs.d"`).
    pub fn config_path(mut self, value: &str) -> ContainerdOptions {
        self.config_path = Some(value.to_owned());
        self
    }

    /// Adds a line to the CRI images settings (see [`ContainerdOptions::extra`]).
    pub fn extra(mut self, line: &str) -> ContainerdOptions {
        self.extra.push_str(line);
        self.extra.push('\n');
        self
    }
}

/// The containerd namespace `ctr` commands of this harness use.
pub const CTR_NAMESPACE: &str = "pullthrough-it";

/// Upper bound for one pull (CRI or ctr), so a hung pull fails the test
/// instead of hanging it.
pub const PULL_TIMEOUT: Duration = Duration::from_secs(120);

/// A running containerd; SIGTERMed (then killed) on drop.
pub struct Containerd {
    version: ContainerdVersion,
    socket: PathBuf,
    certs_d: PathBuf,
    child: ChildGuard,
    // Last: the daemon must stop before its root is deleted.
    dir: TempDir,
}

impl Containerd {
    /// Starts the system's containerd (1.6) with the CRI registry reading `certs_d`
    /// (`<certs_d>/<host>/hosts.toml`), and waits until CRI answers.
    pub async fn start(certs_d: &Path) -> Containerd {
        Containerd::start_version(ContainerdVersion::V1_6, certs_d).await
    }

    /// Starts containerd `version` with the CRI registry reading `certs_d`.
    pub async fn start_version(version: ContainerdVersion, certs_d: &Path) -> Containerd {
        Containerd::start_with(ContainerdOptions::new(version, certs_d)).await
    }

    /// Starts containerd as `options` say, and waits until CRI answers.
    pub async fn start_with(options: ContainerdOptions) -> Containerd {
        let dir = short_tempdir("ctd");
        let socket = dir.path().join("c.sock");
        let config = dir.path().join("config.toml");
        std::fs::write(&config, render_config(dir.path(), &socket, &options))
            .expect("write containerd config");
        let mut cmd = Command::new(options.version.containerd());
        cmd.arg("--config").arg(&config);
        let child = ChildGuard::spawn("containerd", &mut cmd, dir.path());
        let certs_d = options
            .config_path
            .as_deref()
            .map(PathBuf::from)
            .unwrap_or_default();
        let mut containerd = Containerd {
            version: options.version,
            socket,
            certs_d,
            child,
            dir,
        };
        containerd.wait_ready().await;
        containerd
    }

    /// Which containerd this is.
    pub fn version(&self) -> ContainerdVersion {
        self.version
    }

    /// The config file it runs with.
    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("config.toml")
    }

    /// Polls a harmless CRI call until it succeeds: the socket appears
    /// before every plugin's service is registered.
    async fn wait_ready(&mut self) {
        let deadline = tokio::time::Instant::now() + STARTUP_TIMEOUT;
        let mut last_error = String::new();
        loop {
            if self.socket.exists() {
                match self
                    .cri()
                    .image_status("pullthrough.invalid/ready:probe")
                    .await
                {
                    Ok(_) => return,
                    Err(e) => last_error = e,
                }
            }
            if let Some(status) = self.child.try_exited() {
                panic!(
                    "containerd exited ({status}) during startup; stderr:\n{}",
                    self.log()
                );
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "containerd CRI not ready within {STARTUP_TIMEOUT:?} (last error: {last_error}); \
                 stderr:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The gRPC socket.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The `config_path` the CRI plugin was given (empty if none).
    pub fn certs_d(&self) -> &Path {
        &self.certs_d
    }

    /// containerd's own log (stderr) so far.
    pub fn log(&self) -> String {
        self.child.stderr()
    }

    /// A CRI `ImageService` client on this daemon's socket.
    pub fn cri(&self) -> CriClient {
        CriClient::new(&self.socket)
    }

    /// CRI `PullImage`; returns the image ref (an image id, `sha256:…`).
    pub async fn pull_image(&self, image: &str) -> Result<String, String> {
        self.cri().pull_image(image).await
    }

    /// CRI `RemoveImage`. containerd deletes the last reference
    /// synchronously, so a later pull fetches the content again.
    pub async fn remove_image(&self, image: &str) -> Result<(), String> {
        self.cri().remove_image(image).await
    }

    /// The digest (`sha256:…`) of what `image` was pulled as: the manifest
    /// or index digest from CRI `ImageStatus`'s `repo_digests`. `None` if
    /// the image is not present.
    pub async fn image_digest(&self, image: &str) -> Result<Option<String>, String> {
        let Some(status) = self.cri().image_status(image).await? else {
            return Ok(None);
        };
        let repo = repository_of(image);
        let digest = status
            .repo_digests
            .iter()
            .filter_map(|d| d.split_once('@'))
            .find(|(name, _)| *name == repo)
            .or_else(|| status.repo_digests.first().and_then(|d| d.split_once('@')))
            .map(|(_, digest)| digest.to_owned());
        Ok(digest)
    }

    /// Whether containerd logged that CRI pulled `image` through the transfer service (2.1's
    /// default) rather than the older local pull (`client.Pull()`, always on 1.x). `None` if the
    /// log has neither line for it.
    pub fn cri_pulled_with_transfer_service(&self, image: &str) -> Option<bool> {
        // logrus's text format quotes the message and escapes its quotes:
        // msg="PullImage \"<image>\" with snapshotter native using transfer service"
        let needle = format!("PullImage \\\"{image}\\\"");
        self.log()
            .lines()
            .filter(|l| l.contains(&needle))
            .find_map(|l| {
                if l.contains("using transfer service") {
                    Some(true)
                } else if l.contains("using client.Pull()") {
                    Some(false)
                } else {
                    None
                }
            })
    }

    /// `ctr images pull --hosts-dir <hosts_dir> <image_ref>` in
    /// [`CTR_NAMESPACE`], unpacking with the native snapshotter, with the `ctr` of this
    /// daemon's version (2.1's pulls through the transfer service, as its CRI does).
    ///
    /// No `--plain-http`: hosts.toml entries carry their `http://` scheme,
    /// which ctr honors as is.
    pub async fn ctr_pull(&self, image_ref: &str, hosts_dir: &Path) -> Result<(), String> {
        let mut args = vec![
            "images".to_owned(),
            "pull".to_owned(),
            "--snapshotter".to_owned(),
            "native".to_owned(),
            "--hosts-dir".to_owned(),
        ];
        args.push(hosts_dir.display().to_string());
        args.push(image_ref.to_owned());
        self.ctr(args).await.map(drop)
    }

    /// The target digest `ctr images ls` shows for `image_ref` in
    /// [`CTR_NAMESPACE`]; `None` if absent.
    pub async fn ctr_image_digest(&self, image_ref: &str) -> Result<Option<String>, String> {
        let out = self
            .ctr(vec![
                "images".into(),
                "ls".into(),
                format!("name=={image_ref}"),
            ])
            .await?;
        // REF TYPE DIGEST SIZE PLATFORMS LABELS, one header line.
        Ok(out.lines().skip(1).find_map(|line| {
            let cols: Vec<&str> = line.split_whitespace().collect();
            (cols.first() == Some(&image_ref))
                .then(|| cols.get(2).map(|d| (*d).to_owned()))
                .flatten()
        }))
    }

    /// `ctr images rm --sync <image_ref>` in [`CTR_NAMESPACE`].
    pub async fn ctr_remove(&self, image_ref: &str) -> Result<(), String> {
        self.ctr(vec![
            "images".into(),
            "rm".into(),
            "--sync".into(),
            image_ref.into(),
        ])
        .await
        .map(drop)
    }

    /// Runs `ctr --address <sock> -n <CTR_NAMESPACE> <args>`; stdout on
    /// success, stdout+stderr as the error otherwise.
    pub async fn ctr(&self, args: Vec<String>) -> Result<String, String> {
        let mut cmd = Command::new(self.version.ctr());
        cmd.arg("--address")
            .arg(&self.socket)
            .args(["-n", CTR_NAMESPACE])
            .args(&args);
        let what = format!("ctr {}", args.join(" "));
        // std's Command, off the runtime's threads: tokio's "process"
        // feature is not enabled for this crate.
        let run = tokio::task::spawn_blocking(move || cmd.output());
        let out = tokio::time::timeout(PULL_TIMEOUT, run)
            .await
            .map_err(|_| format!("{what}: timed out after {PULL_TIMEOUT:?}"))?
            .map_err(|e| format!("{what}: {e}"))?
            .map_err(|e| format!("{what}: {e}"))?;
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        if out.status.success() {
            Ok(stdout)
        } else {
            Err(format!(
                "{what}: {}\nstdout:\n{stdout}\nstderr:\n{}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            ))
        }
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        // A graceful stop lets containerd close its bolt database cleanly.
        self.child.terminate(Duration::from_secs(5));
    }
}

/// Writes `<certs_d>/<namespace>/hosts.toml` atomically (write + rename),
/// as containerd may read it at any moment.
pub fn write_hosts_toml(certs_d: &Path, namespace: &str, contents: &str) {
    let dir = certs_d.join(namespace);
    std::fs::create_dir_all(&dir).expect("create certs.d/<namespace>");
    let tmp = dir.join("hosts.toml.tmp");
    std::fs::write(&tmp, contents).expect("write hosts.toml.tmp");
    std::fs::rename(&tmp, dir.join("hosts.toml")).expect("rename hosts.toml");
}

/// A `hosts.toml` that sends pulls and resolves to `mirror` (an
/// `http://host:port` URL) first and falls back to `server`.
pub fn mirror_hosts_toml(server: &str, mirror: &str) -> String {
    format!(
        "server = \"{server}\"\n\n[host.\"{mirror}\"]\n  capabilities = [\"pull\", \"resolve\"]\n"
    )
}

/// `docker.io/library/alpine:3.19` → `docker.io/library/alpine`.
fn repository_of(image: &str) -> &str {
    let image = image.split_once('@').map_or(image, |(name, _)| name);
    match image.rfind(':') {
        // A colon after the last slash is a tag, not a registry port.
        Some(i) if !image[i..].contains('/') => &image[..i],
        _ => image,
    }
}

/// The version's `min-<version>.toml` with its placeholders filled in, the snapshotter switched
/// to `native` (see the module doc) and, for 2.x, `native` in the transfer service's
/// `unpack_config`.
fn render_config(dir: &Path, socket: &Path, options: &ContainerdOptions) -> String {
    let template_path = options.version.template_path();
    let template = std::fs::read_to_string(&template_path)
        .unwrap_or_else(|e| panic!("read {}: {e}", template_path.display()));
    let overlayfs = "snapshotter = \"overlayfs\"";
    assert_eq!(
        template.matches(overlayfs).count(),
        1,
        "{} should set the CRI snapshotter once",
        template_path.display()
    );
    let mut config = template
        .replace(overlayfs, "snapshotter = \"native\"")
        .replace("{root}", &format!("{}/root", dir.display()))
        .replace("{state}", &format!("{}/state", dir.display()))
        .replace("{socket}", &socket.display().to_string())
        .replace("{extra}", options.extra.trim_end());
    config = match &options.config_path {
        Some(path) => config.replace("{certs_d}", path),
        None => config
            .lines()
            .filter(|l| !l.contains("{certs_d}"))
            .map(|l| format!("{l}\n"))
            .collect(),
    };
    if options.version.is_2x() {
        // The transfer service unpacks only for the platforms and snapshotters listed here.
        config.push_str(
            "\n[[plugins.\"io.containerd.transfer.v1.local\".unpack_config]]\n  platform = \"linux/amd64\"\n  snapshotter = \"native\"\n",
        );
    }
    config
}

// ---------------------------------------------------------------------------
// CRI messages (runtime.v1), only the fields the tests use. Field numbers
// from k8s.io/cri-api pkg/apis/runtime/v1/api.proto; unknown fields in
// responses are skipped by prost.

/// `runtime.v1.ImageSpec`.
#[derive(Clone, PartialEq, Message)]
pub struct ImageSpec {
    /// Image reference (`docker.io/library/alpine:3.19`) or id.
    #[prost(string, tag = "1")]
    pub image: String,
    /// Unstructured annotations.
    #[prost(map = "string, string", tag = "2")]
    pub annotations: HashMap<String, String>,
}

/// `runtime.v1.AuthConfig`.
#[derive(Clone, PartialEq, Message)]
pub struct AuthConfig {
    /// Registry user name.
    #[prost(string, tag = "1")]
    pub username: String,
    /// Registry password.
    #[prost(string, tag = "2")]
    pub password: String,
}

/// `runtime.v1.PullImageRequest`.
#[derive(Clone, PartialEq, Message)]
pub struct PullImageRequest {
    /// What to pull.
    #[prost(message, optional, tag = "1")]
    pub image: Option<ImageSpec>,
    /// Credentials for the image's registry (not the mirror's).
    #[prost(message, optional, tag = "2")]
    pub auth: Option<AuthConfig>,
}

/// `runtime.v1.PullImageResponse`.
#[derive(Clone, PartialEq, Message)]
pub struct PullImageResponse {
    /// The pulled image's id.
    #[prost(string, tag = "1")]
    pub image_ref: String,
}

/// `runtime.v1.ImageStatusRequest`.
#[derive(Clone, PartialEq, Message)]
pub struct ImageStatusRequest {
    /// Which image.
    #[prost(message, optional, tag = "1")]
    pub image: Option<ImageSpec>,
    /// Ask for the verbose `info` map.
    #[prost(bool, tag = "2")]
    pub verbose: bool,
}

/// `runtime.v1.Image`.
#[derive(Clone, PartialEq, Message)]
pub struct Image {
    /// Image id (the config digest).
    #[prost(string, tag = "1")]
    pub id: String,
    /// `name:tag` references.
    #[prost(string, repeated, tag = "2")]
    pub repo_tags: Vec<String>,
    /// `name@sha256:…` references (manifest or index digest).
    #[prost(string, repeated, tag = "3")]
    pub repo_digests: Vec<String>,
    /// Size of the image in bytes.
    #[prost(uint64, tag = "4")]
    pub size: u64,
}

/// `runtime.v1.ImageStatusResponse`.
#[derive(Clone, PartialEq, Message)]
pub struct ImageStatusResponse {
    /// Absent if the image is not present.
    #[prost(message, optional, tag = "1")]
    pub image: Option<Image>,
    /// Verbose info.
    #[prost(map = "string, string", tag = "2")]
    pub info: HashMap<String, String>,
}

/// `runtime.v1.RemoveImageRequest`.
#[derive(Clone, PartialEq, Message)]
pub struct RemoveImageRequest {
    /// Which image.
    #[prost(message, optional, tag = "1")]
    pub image: Option<ImageSpec>,
}

/// `runtime.v1.RemoveImageResponse`.
#[derive(Clone, PartialEq, Message)]
pub struct RemoveImageResponse {}

fn spec(image: &str) -> Option<ImageSpec> {
    Some(ImageSpec {
        image: image.to_owned(),
        annotations: HashMap::new(),
    })
}

/// A CRI `runtime.v1.ImageService` client over containerd's unix socket.
/// Each call opens its own HTTP/2 connection, so a client survives a daemon
/// restart.
#[derive(Clone, Debug)]
pub struct CriClient {
    socket: PathBuf,
}

impl CriClient {
    /// A client for the gRPC socket at `socket`.
    pub fn new(socket: &Path) -> CriClient {
        CriClient {
            socket: socket.to_owned(),
        }
    }

    /// `PullImage`; returns `image_ref`. Bounded by [`PULL_TIMEOUT`].
    pub async fn pull_image(&self, image: &str) -> Result<String, String> {
        self.pull_image_with_auth(image, None).await
    }

    /// `PullImage` with explicit registry credentials.
    pub async fn pull_image_with_auth(
        &self,
        image: &str,
        auth: Option<AuthConfig>,
    ) -> Result<String, String> {
        let req = PullImageRequest {
            image: spec(image),
            auth,
        };
        let call = self.unary::<_, PullImageResponse>("PullImage", &req);
        let resp = tokio::time::timeout(PULL_TIMEOUT, call)
            .await
            .map_err(|_| format!("PullImage {image}: timed out after {PULL_TIMEOUT:?}"))??;
        Ok(resp.image_ref)
    }

    /// `ImageStatus`; `None` if containerd does not have the image.
    pub async fn image_status(&self, image: &str) -> Result<Option<Image>, String> {
        let req = ImageStatusRequest {
            image: spec(image),
            verbose: false,
        };
        let resp: ImageStatusResponse = self.unary("ImageStatus", &req).await?;
        Ok(resp.image)
    }

    /// `RemoveImage` (a no-op for an absent image).
    pub async fn remove_image(&self, image: &str) -> Result<(), String> {
        let req = RemoveImageRequest { image: spec(image) };
        let _: RemoveImageResponse = self.unary("RemoveImage", &req).await?;
        Ok(())
    }

    /// One unary call to `/runtime.v1.ImageService/<method>`.
    async fn unary<Req: Message, Resp: Message + Default>(
        &self,
        method: &str,
        req: &Req,
    ) -> Result<Resp, String> {
        let what = format!("CRI {method}");
        let stream = tokio::net::UnixStream::connect(&self.socket)
            .await
            .map_err(|e| format!("{what}: connect {}: {e}", self.socket.display()))?;
        let (mut sender, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
                .await
                .map_err(|e| format!("{what}: h2 handshake: {e}"))?;
        tokio::spawn(conn);

        let request = Request::post(format!("http://localhost/runtime.v1.ImageService/{method}"))
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(Full::new(grpc_frame(req)))
            .map_err(|e| format!("{what}: {e}"))?;
        let resp = sender
            .send_request(request)
            .await
            .map_err(|e| format!("{what}: {e}"))?;
        let (parts, body) = resp.into_parts();
        if !parts.status.is_success() {
            return Err(format!("{what}: HTTP {}", parts.status));
        }
        // A trailers-only response (the usual shape of an error) carries
        // grpc-status in the headers.
        check_grpc_status(&what, &parts.headers)?;
        let collected = body
            .collect()
            .await
            .map_err(|e| format!("{what}: reading response: {e}"))?;
        if let Some(trailers) = collected.trailers() {
            check_grpc_status(&what, trailers)?;
        }
        let mut body = collected.to_bytes();
        if body.len() < 5 {
            return Err(format!("{what}: no response message"));
        }
        let compressed = body.get_u8();
        let len = body.get_u32() as usize;
        if compressed != 0 || body.len() != len {
            return Err(format!(
                "{what}: unexpected frame (compressed={compressed}, len={len}, have {})",
                body.len()
            ));
        }
        Resp::decode(body).map_err(|e| format!("{what}: decoding response: {e}"))
    }
}

/// The gRPC length-prefixed message: 0 (uncompressed), u32 BE length, bytes.
fn grpc_frame(msg: &impl Message) -> Bytes {
    let len = msg.encoded_len();
    let mut buf = BytesMut::with_capacity(5 + len);
    buf.put_u8(0);
    buf.put_u32(u32::try_from(len).expect("message fits in u32"));
    msg.encode(&mut buf).expect("encode into a sized buffer");
    buf.freeze()
}

/// `Err` with the (percent-decoded) `grpc-message` if `grpc-status` is
/// present and not 0.
fn check_grpc_status(what: &str, headers: &HeaderMap) -> Result<(), String> {
    let Some(status) = headers.get("grpc-status") else {
        return Ok(());
    };
    let status = status.to_str().unwrap_or("?");
    if status == "0" {
        return Ok(());
    }
    let message = headers
        .get("grpc-message")
        .map(|m| percent_decode(m.as_bytes()))
        .unwrap_or_default();
    Err(format!("{what}: grpc-status {status}: {message}"))
}

/// Decodes `%XX` escapes (gRPC percent-encodes `grpc-message`).
fn percent_decode(bytes: &[u8]) -> String {
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (bytes[i], hex) {
            (b'%', Some(b)) => {
                out.push(b);
                i += 3;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[test]
fn repository_of_strips_tag_and_digest() {
    assert_eq!(
        repository_of("docker.io/library/alpine:3.19"),
        "docker.io/library/alpine"
    );
    assert_eq!(repository_of("localhost:5000/x"), "localhost:5000/x");
    assert_eq!(
        repository_of("localhost:5000/x:1@sha256:ab"),
        "localhost:5000/x"
    );
    assert_eq!(percent_decode(b"a%20b%zz"), "a b%zz");
}
