//! A private containerd 1.6 daemon, driven the way a kubelet drives it (CRI
//! `ImageService` over gRPC) and the way an operator does (`ctr`), so the
//! tests see what containerd really sends to a mirror.
//!
//! # Running containerd in the sandbox
//! Everything lives in a tempdir under `/tmp` (socket paths must stay under
//! 108 bytes): `root`, `state`, the gRPC and ttrpc sockets and the log. The
//! generated `config.toml` (version 2):
//! - points the CRI registry at the caller's `certs.d` (`config_path`);
//! - uses the `native` snapshotter for CRI and `ctr`: it needs no mounts,
//!   so a killed daemon leaves nothing mounted behind. (overlayfs works in
//!   this sandbox too: `ctr pull --snapshotter overlayfs` unpacks and runc
//!   mounts the rootfs; tests only pull, so they do not need it);
//! - turns off what a pull never needs and a sandbox may lack: the TCP
//!   CRI service, AppArmor, the oom-score adjustment, the `opt` plugin
//!   (it writes to `/opt/containerd`), aufs/btrfs/devmapper/zfs snapshotters
//!   and the OTLP tracing processor; the CNI dirs point into the tempdir
//!   (no CNI config: containerd logs one error about it and carries on).
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

use super::{ChildGuard, STARTUP_TIMEOUT, short_tempdir};

/// The containerd namespace `ctr` commands of this harness use.
pub const CTR_NAMESPACE: &str = "pullthrough-it";

/// Upper bound for one pull (CRI or ctr), so a hung pull fails the test
/// instead of hanging it.
pub const PULL_TIMEOUT: Duration = Duration::from_secs(120);

/// A running containerd; SIGTERMed (then killed) on drop.
pub struct Containerd {
    socket: PathBuf,
    certs_d: PathBuf,
    child: ChildGuard,
    // Last: the daemon must stop before its root is deleted.
    dir: TempDir,
}

impl Containerd {
    /// Starts containerd with the CRI registry reading `certs_d`
    /// (`<certs_d>/<host>/hosts.toml`), and waits until CRI answers.
    pub async fn start(certs_d: &Path) -> Containerd {
        let dir = short_tempdir("ctd");
        let socket = dir.path().join("c.sock");
        let config = dir.path().join("config.toml");
        std::fs::write(&config, config_toml(dir.path(), &socket, certs_d))
            .expect("write containerd config");
        let mut cmd = Command::new("containerd");
        cmd.arg("--config").arg(&config);
        let child = ChildGuard::spawn("containerd", &mut cmd, dir.path());
        let mut containerd = Containerd {
            socket,
            certs_d: certs_d.to_owned(),
            child,
            dir,
        };
        containerd.wait_ready().await;
        containerd
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

    /// The `certs.d` directory the CRI plugin reads.
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

    /// `ctr images pull --hosts-dir <hosts_dir> <image_ref>` in
    /// [`CTR_NAMESPACE`], unpacking with the native snapshotter.
    ///
    /// No `--plain-http`: hosts.toml entries carry their `http://` scheme,
    /// which ctr 1.6 honors as is.
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
        let mut cmd = Command::new("ctr");
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

fn config_toml(dir: &Path, socket: &Path, certs_d: &Path) -> String {
    let d = dir.display();
    format!(
        r#"version = 2
root = "{d}/root"
state = "{d}/state"
disabled_plugins = [
  "io.containerd.internal.v1.opt",
  "io.containerd.snapshotter.v1.aufs",
  "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.devmapper",
  "io.containerd.snapshotter.v1.zfs",
  "io.containerd.tracing.processor.v1.otlp",
]

[grpc]
  address = "{socket}"

[ttrpc]
  address = "{socket}.ttrpc"

[debug]
  level = "info"

[plugins]
  [plugins."io.containerd.grpc.v1.cri"]
    disable_tcp_service = true
    disable_apparmor = true
    restrict_oom_score_adj = true
    stream_server_address = "127.0.0.1"
    stream_server_port = "0"
    [plugins."io.containerd.grpc.v1.cri".cni]
      conf_dir = "{d}/cni/conf"
      bin_dir = "{d}/cni/bin"
    [plugins."io.containerd.grpc.v1.cri".containerd]
      snapshotter = "native"
    [plugins."io.containerd.grpc.v1.cri".registry]
      config_path = "{certs_d}"
"#,
        socket = socket.display(),
        certs_d = certs_d.display(),
    )
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
