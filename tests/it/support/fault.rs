//! Stand-ins for the faults of the fault matrix (`tests/it/fault.rs`) where no real part can
//! produce them on demand, plus readers of the registries' access logs that say where a pull's
//! bytes came from.
//!
//! - [`Relay`]: a TCP relay in front of the ECR stand-in that can forward, throttle (so a pull
//!   lasts long enough to kill pullthrough in the middle of a blob) or hang (accept and never
//!   answer), counting connections and bytes.
//! - [`StatusServer`]: a faulty ECR that answers every request with one status (500, 503, 429).
//! - [`Tmpfs`]: a tiny or read-only tmpfs for `hosts.toml` write errors (needs root, as
//!   containerd does).
//! - [`served_blobs`] / [`manifest_hits`]: what a registry's access log says it served.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::free_port;
use super::image::Image;
use super::registry::Registry;

/// What a [`Relay`] does with a new connection (and, for forwarding ones, with each chunk).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Relay bytes as fast as they come.
    Forward,
    /// Relay at most 64 KiB per 10 ms towards the client (about 6 MB/s).
    Throttle,
    /// Accept and never answer (a hung endpoint). Applies to new connections.
    Hang,
}

/// A loopback TCP relay to `127.0.0.1:<target>` whose behaviour can change at run time.
pub struct Relay {
    port: u16,
    mode: Arc<Mutex<Mode>>,
    connections: Arc<AtomicUsize>,
    bytes_down: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

const CHUNK: usize = 64 * 1024;
const TICK: Duration = Duration::from_millis(10);

impl Relay {
    /// Starts a relay to `target` in `mode`.
    pub async fn start(target: u16, mode: Mode) -> Relay {
        let listener = TcpListener::bind(("127.0.0.1", free_port()))
            .await
            .expect("bind relay");
        let port = listener.local_addr().expect("addr").port();
        let mode = Arc::new(Mutex::new(mode));
        let connections = Arc::new(AtomicUsize::new(0));
        let bytes_down = Arc::new(AtomicU64::new(0));
        let (m, c, b) = (
            Arc::clone(&mode),
            Arc::clone(&connections),
            Arc::clone(&bytes_down),
        );
        let task = tokio::spawn(async move {
            let mut tasks = Vec::new();
            while let Ok((client, _)) = listener.accept().await {
                c.fetch_add(1, Ordering::SeqCst);
                let (m, b) = (Arc::clone(&m), Arc::clone(&b));
                tasks.push(tokio::spawn(relay_one(client, target, m, b)));
                tasks.retain(|t: &tokio::task::JoinHandle<()>| !t.is_finished());
            }
        });
        Relay {
            port,
            mode,
            connections,
            bytes_down,
            task,
        }
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Changes the mode.
    pub fn set_mode(&self, mode: Mode) {
        *self.mode.lock().expect("mode lock") = mode;
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }

    /// Bytes relayed towards clients so far.
    pub fn bytes_down(&self) -> u64 {
        self.bytes_down.load(Ordering::SeqCst)
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn relay_one(
    mut client: TcpStream,
    target: u16,
    mode: Arc<Mutex<Mode>>,
    down: Arc<AtomicU64>,
) {
    let now = || *mode.lock().expect("mode lock");
    if now() == Mode::Hang {
        // Read (and drop) whatever comes until the client gives up; never write.
        let mut buf = [0u8; 4096];
        while matches!(client.read(&mut buf).await, Ok(n) if n > 0) {}
        return;
    }
    let Ok(server) = TcpStream::connect(("127.0.0.1", target)).await else {
        return;
    };
    let (mut cr, mut cw) = client.into_split();
    let (mut sr, mut sw) = server.into_split();
    let up = tokio::spawn(async move {
        let _ = tokio::io::copy(&mut cr, &mut sw).await;
        let _ = sw.shutdown().await;
    });
    let mut buf = vec![0u8; CHUNK];
    loop {
        let n = match sr.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if cw.write_all(&buf[..n]).await.is_err() {
            break;
        }
        down.fetch_add(n as u64, Ordering::SeqCst);
        if now() == Mode::Throttle {
            tokio::time::sleep(TICK).await;
        }
    }
    let _ = cw.shutdown().await;
    up.abort();
}

/// A faulty ECR endpoint: every request gets `status` with an empty JSON body.
pub struct StatusServer {
    port: u16,
    requests: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl StatusServer {
    /// Starts it on a free loopback port.
    pub async fn start(status: StatusCode) -> StatusServer {
        let listener = TcpListener::bind(("127.0.0.1", free_port()))
            .await
            .expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let requests = Arc::new(AtomicUsize::new(0));
        let count = Arc::clone(&requests);
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let count = Arc::clone(&count);
                let svc = service_fn(move |_req: Request<Incoming>| {
                    count.fetch_add(1, Ordering::SeqCst);
                    async move {
                        let mut resp = Response::new(Full::new(Bytes::from_static(b"{}")));
                        *resp.status_mut() = status;
                        resp.headers_mut()
                            .insert("content-type", "application/json".parse().expect("hv"));
                        Ok::<_, std::convert::Infallible>(resp)
                    }
                });
                tokio::spawn(
                    hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc),
                );
            }
        });
        StatusServer {
            port,
            requests,
            task,
        }
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Requests answered so far.
    pub fn requests(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }
}

impl Drop for StatusServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A tmpfs mounted on a fresh directory under `/tmp`; unmounted on drop.
pub struct Tmpfs {
    path: PathBuf,
    // Last: removed after the unmount.
    _dir: tempfile::TempDir,
}

impl Tmpfs {
    /// Mounts a tmpfs of `size` (mount's syntax, e.g. `"64k"`).
    pub fn mount(size: &str) -> Tmpfs {
        let dir = super::short_tempdir("tmpfs");
        let path = dir.path().to_owned();
        let out = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0755"),
                "tmpfs",
            ])
            .arg(&path)
            .output()
            .expect("run mount");
        assert!(
            out.status.success(),
            "mount tmpfs on {} (the fault matrix needs root, as containerd does): {}",
            path.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        Tmpfs { path, _dir: dir }
    }

    /// The mount point.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Remounts it read-only.
    pub fn remount_read_only(&self) {
        let out = Command::new("mount")
            .args(["-o", "remount,ro"])
            .arg(&self.path)
            .output()
            .expect("run mount");
        assert!(
            out.status.success(),
            "remount ro: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Fills it up: writes a file until the filesystem says ENOSPC.
    pub fn fill(&self) {
        use std::io::Write;
        let mut f = std::fs::File::create(self.path.join("filler")).expect("create filler");
        let block = vec![0u8; 4096];
        loop {
            match f.write_all(&block).and_then(|()| f.sync_all()) {
                Ok(()) => {}
                Err(e) if e.raw_os_error() == Some(28) => return,
                Err(e) => panic!("filling tmpfs: {e}"),
            }
        }
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        // Lazy, so a file someone still holds open cannot keep the mount behind.
        let _ = Command::new("umount").arg("-l").arg(&self.path).status();
    }
}

/// The digests of the blobs `registry` served (GET, 200, or 206 for a ranged resume) under
/// repository `repo`.
pub fn served_blobs(registry: &Registry, repo: &str) -> BTreeSet<String> {
    let prefix = format!("/v2/{repo}/blobs/");
    registry
        .requests()
        .into_iter()
        .filter(|(m, _, s)| m == "GET" && (*s == 200 || *s == 206))
        .filter_map(|(_, uri, _)| {
            let rest = uri.strip_prefix(&prefix)?;
            Some(rest.split('?').next().unwrap_or(rest).to_owned())
        })
        .collect()
}

/// How many manifest requests (GET or HEAD) `registry` answered with 200 under `repo`.
pub fn manifest_hits(registry: &Registry, repo: &str) -> usize {
    let prefix = format!("/v2/{repo}/manifests/");
    registry
        .requests()
        .into_iter()
        .filter(|(_, uri, s)| *s == 200 && uri.starts_with(&prefix))
        .count()
}

/// The digests of every config and layer blob of `image`.
pub fn image_blobs(image: &Image) -> BTreeSet<String> {
    image
        .blobs()
        .into_iter()
        .map(|b| b.digest.clone())
        .collect()
}
