//! Shared plumbing for the integration tests: free loopback ports, spawned
//! processes that die with their guard, and paths into the repository.
//!
//! Every stand-in (docker-registry, moto, containerd) is a real process bound
//! to `127.0.0.1` on a port picked here; nothing in this harness reaches past
//! the loopback interface.
//!
//! # Layout
//! - [`registry`]: the CNCF distribution registry with htpasswd auth and an
//!   access log the tests can read.
//! - [`ecr_front`]: ECR's pull-through cache (import on a tag pull, 404 for an unknown digest,
//!   blobs as 307 to an S3-like server) in front of a [`registry`].
//! - [`moto`]: moto's server standing in for ECR's `GetAuthorizationToken`.
//! - [`image`]: OCI images built in memory (single-arch and multi-arch).
//! - [`containerd`]: a private containerd daemon of a given version (1.6, 1.7, 2.1) plus a
//!   hand-written CRI `ImageService` client and a `ctr` wrapper of the same version.
//! - [`http`]: a one-shot HTTP/1 client for talking to any of the above.
//! - [`k8s`]: the pinned `kubectl` and `helm`, cached renders, and the checks every rendered
//!   Kubernetes object gets (typed round-trips, custom resources' fields).
//! - [`fault`]: a relay that hangs or throttles, a server answering 5xx/429, a tmpfs, and
//!   readers of where a pull's blobs came from (the fault matrix).

// The harness is shared by every test module; a helper one module needs may
// be unused by the others, so unused items are expected here.
#![allow(dead_code)]

pub mod containerd;
pub mod ecr_front;
pub mod fault;
pub mod http;
pub mod image;
pub mod k8s;
pub mod moto;
pub mod pullthrough;
pub mod registry;

use std::fs::File;
use std::net::{Ipv4Addr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

/// How long a freshly spawned stand-in gets to open its port. Generous, since
/// two cores are shared with a compiler; it only bounds a failure.
pub const STARTUP_TIMEOUT: Duration = Duration::from_secs(30);

/// How long [`eventually`] keeps polling before it gives up.
pub const EVENTUALLY_TIMEOUT: Duration = Duration::from_secs(10);

/// The repository root (where `Cargo.toml` is).
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The `pullthrough` binary cargo built for this test run. Cargo names it for integration
/// tests; the demo example (which shares this harness) finds it beside its own directory,
/// `target/<profile>/examples/..`.
pub fn pullthrough_bin() -> PathBuf {
    if let Some(p) = option_env!("CARGO_BIN_EXE_pullthrough") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("current_exe");
    let profile_dir = exe
        .parent()
        .and_then(|examples| examples.parent())
        .expect("target/<profile>/examples/<exe>");
    profile_dir.join("pullthrough")
}

/// Runs `pullthrough ARGS…` to completion and returns its stdout; panics with its stderr if it
/// fails.
pub fn pullthrough_ok<I, S>(args: I) -> String
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    let out = Command::new(pullthrough_bin())
        .args(args)
        .output()
        .expect("run pullthrough");
    assert!(
        out.status.success(),
        "pullthrough failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A loopback port that was free a moment ago, and never handed out before in this process.
///
/// The listener is dropped before returning, so another process could take the port in
/// between; that race is rare. Tests run in parallel threads, though, and two of them must
/// never be given the same port, or one would talk to the other's stand-in.
pub fn free_port() -> u16 {
    static HANDED_OUT: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    loop {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind 127.0.0.1:0");
        let port = listener.local_addr().expect("local_addr").port();
        let mut seen = HANDED_OUT.lock().unwrap_or_else(|e| e.into_inner());
        if !seen.contains(&port) {
            seen.push(port);
            return port;
        }
    }
}

/// A port on which nothing listens, for "upstream is down" cases.
pub fn dead_port() -> u16 {
    free_port()
}

/// A fresh temporary directory under `/tmp`.
///
/// Short on purpose: unix socket paths must stay under 108 bytes, and
/// `$TMPDIR` may point somewhere deep.
pub fn short_tempdir(prefix: &str) -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix(prefix)
        .tempdir_in("/tmp")
        .expect("create tempdir in /tmp")
}

/// A child process that is killed and reaped when the guard drops, with its
/// stdout and stderr captured to files so a failing test can show them.
pub struct ChildGuard {
    name: String,
    child: Child,
    stdout_path: PathBuf,
    stderr_path: PathBuf,
}

impl ChildGuard {
    /// Spawns `cmd` with stdin closed and stdout/stderr appended to
    /// `<log_dir>/<name>.stdout` and `<log_dir>/<name>.stderr`.
    ///
    /// Appending (not truncating) keeps the log of an earlier run of the
    /// same stand-in, so a restart does not lose what a test asserts on.
    pub fn spawn(name: &str, cmd: &mut Command, log_dir: &Path) -> ChildGuard {
        let stdout_path = log_dir.join(format!("{name}.stdout"));
        let stderr_path = log_dir.join(format!("{name}.stderr"));
        let open = |p: &Path| {
            File::options()
                .create(true)
                .append(true)
                .open(p)
                .unwrap_or_else(|e| panic!("open {}: {e}", p.display()))
        };
        let child = cmd
            .stdin(Stdio::null())
            .stdout(open(&stdout_path))
            .stderr(open(&stderr_path))
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {name} ({cmd:?}): {e}"));
        ChildGuard {
            name: name.to_owned(),
            child,
            stdout_path,
            stderr_path,
        }
    }

    /// The process id.
    pub fn id(&self) -> u32 {
        self.child.id()
    }

    /// The name given at spawn, used in panic messages.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The file the process's stdout goes to.
    pub fn stdout_path(&self) -> &Path {
        &self.stdout_path
    }

    /// The file the process's stderr goes to.
    pub fn stderr_path(&self) -> &Path {
        &self.stderr_path
    }

    /// Everything the process wrote to stdout so far.
    pub fn stdout(&self) -> String {
        std::fs::read_to_string(&self.stdout_path).unwrap_or_default()
    }

    /// Everything the process wrote to stderr so far.
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    /// `Some(status)` once the process has exited.
    pub fn try_exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().expect("try_wait")
    }

    /// Sends SIGTERM (a graceful stop), without waiting.
    pub fn sigterm(&self) {
        // `kill(1)` instead of libc: the crate forbids `unsafe`.
        let status = Command::new("kill")
            .arg("-TERM")
            .arg(self.id().to_string())
            .status()
            .expect("run kill -TERM");
        assert!(status.success(), "kill -TERM {} failed", self.id());
    }

    /// Polls until the process exits, up to `within`; `None` if it is still
    /// running then.
    pub async fn wait_exit(&mut self, within: Duration) -> Option<ExitStatus> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            if let Some(status) = self.try_exited() {
                return Some(status);
            }
            if tokio::time::Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// SIGTERM, up to `grace` for the process to exit, then SIGKILL.
    /// Blocking, so it can run from `Drop`.
    pub fn terminate(&mut self, grace: Duration) {
        if self.try_exited().is_some() {
            return;
        }
        self.sigterm();
        let deadline = std::time::Instant::now() + grace;
        while std::time::Instant::now() < deadline {
            if self.try_exited().is_some() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.kill();
    }

    /// SIGKILL and reap. Idempotent.
    pub fn kill(&mut self) {
        // Errors mean the process is already gone; reaping still matters.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Waits until `127.0.0.1:port` accepts connections, up to
    /// [`STARTUP_TIMEOUT`]. Panics with the process's stderr if the process
    /// exits first or the port never opens.
    pub async fn wait_for_port(&mut self, port: u16) {
        let deadline = tokio::time::Instant::now() + STARTUP_TIMEOUT;
        loop {
            if tokio::net::TcpStream::connect((Ipv4Addr::LOCALHOST, port))
                .await
                .is_ok()
            {
                return;
            }
            if let Some(status) = self.try_exited() {
                panic!(
                    "{} exited ({status}) before opening 127.0.0.1:{port}; stderr:\n{}",
                    self.name,
                    self.stderr()
                );
            }
            if tokio::time::Instant::now() >= deadline {
                panic!(
                    "{} did not open 127.0.0.1:{port} within {STARTUP_TIMEOUT:?}; stderr:\n{}",
                    self.name,
                    self.stderr()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Waits until `127.0.0.1:port` accepts connections, panicking with
/// `child`'s stderr if it never does. See [`ChildGuard::wait_for_port`].
pub async fn wait_for_port(port: u16, child: &mut ChildGuard) {
    child.wait_for_port(port).await;
}

/// Polls `check` until it returns `Some`, up to [`EVENTUALLY_TIMEOUT`];
/// panics with `what` otherwise.
///
/// For facts that become true shortly after the event a test waits on, such
/// as a log line a server writes after it has sent the response. It bounds a
/// failure and asserts nothing about time.
pub async fn eventually<T>(what: &str, check: impl FnMut() -> Option<T>) -> T {
    match try_eventually(check).await {
        Some(v) => v,
        None => panic!("timed out waiting for {what}"),
    }
}

/// Like [`eventually`], but `None` on timeout so the caller can panic with
/// more context.
pub async fn try_eventually<T>(mut check: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = tokio::time::Instant::now() + EVENTUALLY_TIMEOUT;
    loop {
        if let Some(v) = check() {
            return Some(v);
        }
        if tokio::time::Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Lowercase hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// `sha256:<hex>` of `bytes`, the OCI digest form.
pub fn sha256_digest(bytes: &[u8]) -> String {
    use sha2::Digest as _;
    format!("sha256:{}", hex(&sha2::Sha256::digest(bytes)))
}

/// Standard base64 (with padding) of `bytes`: enough to build or check a
/// Basic credential without another dependency.
pub fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[(n >> (18 - 6 * i)) as usize & 63]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// The value of an `Authorization: Basic …` header for `user:password`.
pub fn basic_auth(user: &str, password: &str) -> String {
    format!("Basic {}", base64(format!("{user}:{password}").as_bytes()))
}

#[test]
fn base64_matches_known_vectors() {
    assert_eq!(base64(b""), "");
    assert_eq!(base64(b"f"), "Zg==");
    assert_eq!(base64(b"fo"), "Zm8=");
    assert_eq!(base64(b"foo"), "Zm9v");
    assert_eq!(base64(b"foob"), "Zm9vYg==");
    // The token moto hands out for its default account.
    assert_eq!(
        base64(b"AWS:123456789012-auth-token"),
        "QVdTOjEyMzQ1Njc4OTAxMi1hdXRoLXRva2Vu"
    );
}
