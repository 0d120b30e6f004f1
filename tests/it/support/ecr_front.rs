//! ECR's pull-through cache, stood in by `tests/it/support/ecr_front.py` in front of a
//! [`Registry`].
//!
//! A plain `docker-registry` serves whatever a test pushed, by tag or by digest, so it hides how
//! ECR's pull-through cache behaves. The front (Python, standard library only, run with the
//! system `/usr/bin/python3`; its module docstring is the reference) adds that behaviour:
//!
//! - a manifest GET **by tag** under a configured prefix (`docker-hub/library/alpine:3.19`) that
//!   the backend does not hold imports the image from that prefix's upstream registry first (the
//!   manifest, every child of an index, every config and layer blob);
//! - a manifest GET or HEAD **by digest** it does not hold answers `404 MANIFEST_UNKNOWN`,
//!   whatever the upstream has (ECR imports by tag only);
//! - a held tag is re-checked upstream at most once per `tag_recheck` (ECR: 24 h);
//! - a blob GET answers `307` to a presigned-style URL on a second loopback listener (the "S3"
//!   server), which streams the bytes and refuses any request that carries `Authorization`;
//! - every `/v2/` request needs the Basic credential, checked by the backend's htpasswd, so
//!   [`Registry::set_password`] rotates the front's password too.
//!
//! # What a test can see
//! The front writes one JSON line per request to its log, which [`EcrFront`] parses:
//! [`EcrFront::ecr_requests`] (the registry side, with the tag check and import of each
//! manifest GET), [`EcrFront::s3_requests`] (the blob downloads, with whether they carried
//! `Authorization` and a `Range`) and [`EcrFront::upstream_requests`] (what the front asked the
//! upstream registries while importing). The backend [`Registry`]'s own access log still shows
//! every request the front relayed or made there (HEAD checks, import pushes, S3 blob reads).
//!
//! Lines are written when a request is done, which can be just after the client has its answer:
//! assert with [`EcrFront::wait_for_ecr`] or [`super::eventually`] when the request just finished.
//!
//! # The S3 host name
//! The Location names `localhost` (still loopback), not `127.0.0.1`: Go's HTTP client keeps a
//! request's `Authorization` on a redirect to the same host name, and newer Go compares names
//! only, so with both listeners on `127.0.0.1` a client that sent a credential itself would carry
//! it to S3, which ECR's real S3 host (another name) never causes. A pull through pullthrough
//! carries no credential to the mirror, so nothing changes for it.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde::Deserialize;
use serde_json::Value;
use tempfile::TempDir;

use super::registry::Registry;
use super::{ChildGuard, STARTUP_TIMEOUT, repo_root, try_eventually};

/// The interpreter the front runs with: Debian's, so no venv is needed.
pub const PYTHON: &str = "/usr/bin/python3";

/// ECR's own re-check interval, the front's default.
pub const ECR_TAG_RECHECK: &str = "24h";

/// The path prefix of the S3 server's blob URLs (`/<bucket>/<repo>/<digest>`).
pub const S3_BUCKET_PATH: &str = "/prod-local-starport-layer-bucket/";

/// How the front is started. [`FrontOptions::new`] has ECR's defaults.
#[derive(Clone, Debug)]
pub struct FrontOptions {
    /// Pull-through rules: (ECR prefix, `http://host:port` of the upstream registry).
    pub upstreams: Vec<(String, String)>,
    /// Basic credentials for upstreams that need one: (prefix, user, password).
    pub upstream_auth: Vec<(String, String, String)>,
    /// How long a held tag is served before it is checked upstream again (`24h`, `1s`, `0`).
    pub tag_recheck: String,
    /// The host name in blob redirects (see the module doc).
    pub s3_host: String,
    /// Seconds per socket operation towards an upstream (so a dead one fails an import quickly).
    pub upstream_timeout: Duration,
}

impl Default for FrontOptions {
    fn default() -> Self {
        FrontOptions::new()
    }
}

impl FrontOptions {
    /// No rules yet, ECR's 24 h re-check, blobs redirected to `localhost`.
    pub fn new() -> FrontOptions {
        FrontOptions {
            upstreams: Vec::new(),
            upstream_auth: Vec::new(),
            tag_recheck: ECR_TAG_RECHECK.to_owned(),
            s3_host: "localhost".to_owned(),
            upstream_timeout: Duration::from_secs(10),
        }
    }

    /// Adds a pull-through rule: repositories under `prefix/` are imported from `url`.
    pub fn upstream(mut self, prefix: &str, url: &str) -> FrontOptions {
        self.upstreams.push((prefix.to_owned(), url.to_owned()));
        self
    }

    /// The upstream `registry` serves `prefix/`.
    pub fn upstream_registry(self, prefix: &str, registry: &Registry) -> FrontOptions {
        let options = self.upstream(prefix, &registry.base_url());
        match registry.password() {
            Some(password) => options.upstream_auth(prefix, super::registry::USER, &password),
            None => options,
        }
    }

    /// A Basic credential the front sends to the upstream of `prefix`.
    pub fn upstream_auth(mut self, prefix: &str, user: &str, password: &str) -> FrontOptions {
        self.upstream_auth
            .push((prefix.to_owned(), user.to_owned(), password.to_owned()));
        self
    }

    /// The re-check interval (`"24h"`, `"1s"`, `"0"`: every tag GET checks upstream).
    pub fn tag_recheck(mut self, interval: &str) -> FrontOptions {
        self.tag_recheck = interval.to_owned();
        self
    }
}

/// One request on the registry side (`"server": "ecr"` in the front's log).
#[derive(Clone, Debug, Deserialize)]
pub struct EcrRequest {
    /// HTTP method.
    pub method: String,
    /// Path and query as the client sent them.
    pub path: String,
    /// The status answered; `None` if the client went away first.
    pub status: Option<u16>,
    /// `"none"`, `"basic"` or `"other"`: what `Authorization` the request carried.
    pub auth: String,
    /// Requests the front sent upstream for this one (an import or a re-check).
    pub upstream_requests: u64,
    /// For a manifest GET by tag under a prefix: `fresh` (served as held), `imported`,
    /// `unchanged` (re-checked, same digest), `upstream_missing` or `upstream_error`.
    pub tag_check: Option<String>,
    /// `<prefix>/<repo>:<tag>` when the front went upstream for this request.
    pub import: Option<String>,
    /// The digest imported or confirmed upstream.
    pub digest: Option<String>,
    /// Why an import failed.
    pub import_error: Option<String>,
    /// For a blob redirect: the S3 URL, without its query.
    pub location: Option<String>,
    /// An internal error, if any.
    pub error: Option<String>,
}

/// One request to the S3 server (`"server": "s3"`).
#[derive(Clone, Debug, Deserialize)]
pub struct S3Request {
    /// HTTP method.
    pub method: String,
    /// The path (`/<bucket>/<repo>/<digest>`), no query.
    pub path: String,
    /// The status answered.
    pub status: Option<u16>,
    /// Whether the request carried an `Authorization` header (S3 refuses it with 400).
    pub authorization: bool,
    /// The `Range` header, if any.
    pub range: Option<String>,
    /// Body bytes sent.
    pub bytes: u64,
}

impl S3Request {
    /// `(repository, digest)` of the blob this URL names.
    pub fn blob(&self) -> Option<(String, String)> {
        let rest = self.path.strip_prefix(S3_BUCKET_PATH)?;
        let (repo, digest) = rest.rsplit_once('/')?;
        Some((repo.to_owned(), digest.to_owned()))
    }
}

/// One request the front sent to an upstream registry (`"server": "upstream"`).
#[derive(Clone, Debug, Deserialize)]
pub struct UpstreamRequest {
    /// The prefix of the rule it served (`docker-hub`).
    pub upstream: String,
    /// HTTP method.
    pub method: String,
    /// The path on the upstream (`/v2/library/alpine/manifests/3.19`).
    pub path: String,
    /// The status; `None` when the connection failed.
    pub status: Option<u16>,
}

/// A running `ecr_front.py`; stopped (SIGTERM, then SIGKILL) on drop.
pub struct EcrFront {
    port: u16,
    s3_port: u16,
    options: FrontOptions,
    backend_url: String,
    log_path: PathBuf,
    child: ChildGuard,
    // Last: the process must stop before its log is deleted.
    dir: TempDir,
}

impl EcrFront {
    /// Starts the front before `backend` (the registry that holds the cache, with htpasswd user
    /// `AWS`) with `options`' rules, and waits for its `ready` line.
    pub async fn start(backend: &Registry, options: FrontOptions) -> EcrFront {
        let dir = tempfile::Builder::new()
            .prefix("ecr-front")
            .tempdir()
            .expect("ecr-front tempdir");
        let log_path = dir.path().join("front.jsonl");
        let backend_url = backend.base_url();
        let (child, port, s3_port) =
            spawn(dir.path(), &backend_url, &options, &log_path, 0, 0).await;
        EcrFront {
            port,
            s3_port,
            options,
            backend_url,
            log_path,
            child,
            dir,
        }
    }

    /// Starts the front with one rule per `(prefix, upstream registry)`, re-checking tags every
    /// 24 h as ECR does.
    pub async fn with_upstreams(backend: &Registry, upstreams: &[(&str, &Registry)]) -> EcrFront {
        let options = upstreams
            .iter()
            .fold(FrontOptions::new(), |o, (prefix, registry)| {
                o.upstream_registry(prefix, registry)
            });
        EcrFront::start(backend, options).await
    }

    /// The registry port (127.0.0.1).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The S3 server's port.
    pub fn s3_port(&self) -> u16 {
        self.s3_port
    }

    /// `127.0.0.1:PORT`.
    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// `http://127.0.0.1:PORT`: what pullthrough's `ecr.endpoint` points at.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.host())
    }

    /// The options it runs with.
    pub fn options(&self) -> &FrontOptions {
        &self.options
    }

    /// The front's stderr (Python tracebacks of internal errors, if any).
    pub fn stderr(&self) -> String {
        self.child.stderr()
    }

    /// Every log line so far, as JSON, oldest first.
    pub fn log(&self) -> Vec<Value> {
        std::fs::read_to_string(&self.log_path)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// The log as text, for panic messages.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    fn lines<T: for<'de> Deserialize<'de>>(&self, server: &str) -> Vec<T> {
        self.log()
            .into_iter()
            .filter(|v| v["server"] == server)
            .map(|v| {
                serde_json::from_value(v.clone())
                    .unwrap_or_else(|e| panic!("ecr-front log line {v}: {e}"))
            })
            .collect()
    }

    /// The registry-side requests so far.
    pub fn ecr_requests(&self) -> Vec<EcrRequest> {
        self.lines("ecr")
    }

    /// The S3 requests so far.
    pub fn s3_requests(&self) -> Vec<S3Request> {
        self.lines("s3")
    }

    /// The requests the front sent upstream so far.
    pub fn upstream_requests(&self) -> Vec<UpstreamRequest> {
        self.lines("upstream")
    }

    /// The imports that completed (`<prefix>/<repo>:<tag>`), oldest first.
    pub fn imports(&self) -> Vec<String> {
        self.ecr_requests()
            .into_iter()
            .filter(|r| r.tag_check.as_deref() == Some("imported"))
            .filter_map(|r| r.import)
            .collect()
    }

    /// The digests of the blobs S3 served in full or in part (200 or 206) for `repo`.
    pub fn s3_blobs(&self, repo: &str) -> BTreeSet<String> {
        self.s3_requests()
            .into_iter()
            .filter(|r| r.method == "GET" && matches!(r.status, Some(200 | 206)))
            .filter_map(|r| r.blob())
            .filter(|(r, _)| r == repo)
            .map(|(_, digest)| digest)
            .collect()
    }

    /// How many manifest requests under `repo` the registry side answered 200.
    pub fn manifest_hits(&self, repo: &str) -> usize {
        let prefix = format!("/v2/{repo}/manifests/");
        self.ecr_requests()
            .into_iter()
            .filter(|r| r.status == Some(200) && r.path.starts_with(&prefix))
            .count()
    }

    /// Forgets the log so far (e.g. what seeding did).
    pub fn clear_log(&self) {
        // The front appends (O_APPEND), so after the truncation its next line lands at offset 0.
        std::fs::File::options()
            .write(true)
            .open(&self.log_path)
            .and_then(|f| f.set_len(0))
            .expect("truncate ecr-front log");
    }

    /// Waits until the registry side logged a `method` request whose path (query included) is
    /// `path`, and returns it. Panics with the log if it never shows up.
    pub async fn wait_for_ecr(&self, method: &str, path: &str) -> EcrRequest {
        let found = try_eventually(|| {
            self.ecr_requests()
                .into_iter()
                .find(|r| r.method == method && r.path == path)
        })
        .await;
        found.unwrap_or_else(|| {
            panic!(
                "{method} {path} never showed up in the ecr-front log:\n{}",
                self.log_text()
            )
        })
    }

    /// Stops the front: requests fail with "connection refused" until [`EcrFront::restart`].
    pub fn stop(&mut self) {
        self.child.terminate(Duration::from_secs(5));
    }

    /// Starts it again on the same ports, with the same options and log. The tags it had
    /// checked count as checked again when first seen (the front's documented choice).
    pub async fn restart(&mut self) {
        self.child.terminate(Duration::from_secs(5));
        let (child, _, _) = spawn(
            self.dir.path(),
            &self.backend_url,
            &self.options,
            &self.log_path,
            self.port,
            self.s3_port,
        )
        .await;
        self.child = child;
    }
}

impl Drop for EcrFront {
    fn drop(&mut self) {
        self.child.terminate(Duration::from_secs(2));
    }
}

/// The front's script in the repository.
pub fn script_path() -> PathBuf {
    repo_root().join("tests/it/support/ecr_front.py")
}

/// Spawns the front and waits for its `ready <port> <s3-port>` line.
async fn spawn(
    dir: &Path,
    backend_url: &str,
    options: &FrontOptions,
    log_path: &Path,
    port: u16,
    s3_port: u16,
) -> (ChildGuard, u16, u16) {
    let mut cmd = Command::new(PYTHON);
    cmd.arg(script_path())
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .args(["--s3-listen", &format!("127.0.0.1:{s3_port}")])
        .args(["--s3-host", &options.s3_host])
        .args(["--backend", backend_url])
        .args(["--tag-recheck", &options.tag_recheck])
        .args([
            "--upstream-timeout",
            &options.upstream_timeout.as_secs_f64().to_string(),
        ])
        .arg("--log")
        .arg(log_path)
        // No bytecode files next to the script in the repository.
        .env("PYTHONDONTWRITEBYTECODE", "1");
    for (prefix, url) in &options.upstreams {
        cmd.args(["--upstream", &format!("{prefix}={url}")]);
    }
    for (prefix, user, password) in &options.upstream_auth {
        cmd.args(["--upstream-auth", &format!("{prefix}={user}:{password}")]);
    }
    // The guard appends to its stdout file across restarts: wait for one `ready` line more than
    // the file had before this process started.
    let ready_lines = |text: &str| text.lines().filter(|l| l.starts_with("ready ")).count();
    let before =
        ready_lines(&std::fs::read_to_string(dir.join("ecr-front.stdout")).unwrap_or_default());
    let mut child = ChildGuard::spawn("ecr-front", &mut cmd, dir);
    let deadline = tokio::time::Instant::now() + STARTUP_TIMEOUT;
    loop {
        let out = child.stdout();
        if ready_lines(&out) > before {
            let ports = out
                .lines()
                .rev()
                .find_map(|l| l.strip_prefix("ready "))
                .unwrap_or_default();
            let mut it = ports.split_whitespace().map(str::parse::<u16>);
            match (it.next(), it.next()) {
                (Some(Ok(p)), Some(Ok(s3))) => return (child, p, s3),
                _ => panic!("ecr-front printed a bad ready line: {ports:?}"),
            }
        }
        if let Some(status) = child.try_exited() {
            panic!(
                "ecr-front exited ({status}) before it was ready; stderr:\n{}",
                child.stderr()
            );
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "ecr-front not ready within {STARTUP_TIMEOUT:?}; stderr:\n{}",
            child.stderr()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
