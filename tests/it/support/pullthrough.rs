//! The `pullthrough serve` process under test, plus two fake upstreams for what no real
//! component can show: a server that records the headers it receives, and one that accepts
//! connections and never answers.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ::http::{HeaderMap, Request, Response};
use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tempfile::TempDir;
use tokio::net::TcpListener;

use super::{ChildGuard, eventually, free_port, http, pullthrough_bin};

/// The upstreams every test config has, with the console's prefixes.
pub const TEST_UPSTREAMS: &[(&str, &str)] = &[
    ("docker.io", "docker-hub"),
    ("quay.io", "quay"),
    ("registry.k8s.io", "kubernetes"),
];

/// `[upstreams."…"]` tables for [`TEST_UPSTREAMS`], each with `server` if one is given.
pub fn upstreams_toml(server: Option<&str>) -> String {
    TEST_UPSTREAMS
        .iter()
        .map(|(registry, prefix)| {
            let server = server
                .map(|s| format!("server = \"{s}\"\n"))
                .unwrap_or_default();
            format!("\n[upstreams.\"{registry}\"]\nprefix = \"{prefix}\"\n{server}")
        })
        .collect()
}

/// The short timeouts every test config has.
pub const TEST_TIMEOUTS: &str =
    "[timeouts]\nconnect = \"1s\"\nresponse_headers = \"2s\"\nshutdown = \"20s\"\n";

/// A running `pullthrough serve`; killed on drop.
pub struct Pullthrough {
    child: ChildGuard,
    port: u16,
    ops_port: u16,
    config_path: PathBuf,
    dir: TempDir,
}

/// What to start pullthrough with.
pub struct Options {
    /// `ecr.endpoint`: the registry (or a fake) to forward to.
    pub endpoint: String,
    /// The ECR API (moto) URL, as `AWS_ENDPOINT_URL_ECR`.
    pub ecr_api: String,
    /// Extra TOML appended to the config (timeouts, upstreams, ...). Must include upstreams.
    pub extra: String,
    /// `default_upstream`, if any.
    pub default_upstream: Option<String>,
    /// `RUST_LOG` for the process.
    pub rust_log: String,
    /// Extra environment, set after (and so over) the defaults: e.g. other AWS credentials.
    pub env: Vec<(String, String)>,
}

impl Options {
    /// The usual config: the three test upstreams, short timeouts.
    pub fn new(endpoint: &str, ecr_api: &str) -> Options {
        Options {
            endpoint: endpoint.to_owned(),
            ecr_api: ecr_api.to_owned(),
            extra: format!("{TEST_TIMEOUTS}{}", upstreams_toml(None)),
            default_upstream: None,
            rust_log: "info,aws_config=warn,aws_smithy_runtime=warn".into(),
            env: Vec::new(),
        }
    }

    /// Like [`Options::new`], but every upstream's `server` (the fallback containerd uses when
    /// the mirror fails) is a dead loopback port, so a pull can only succeed through the mirror
    /// and never reaches the internet. Returns the options and that dead URL.
    pub fn with_dead_servers(endpoint: &str, ecr_api: &str) -> (Options, String) {
        let dead = format!("http://127.0.0.1:{}", super::dead_port());
        let mut opts = Options::new(endpoint, ecr_api);
        opts.extra = format!("{TEST_TIMEOUTS}{}", upstreams_toml(Some(&dead)));
        (opts, dead)
    }
}

impl Pullthrough {
    /// Starts pullthrough and waits until both listeners accept connections.
    pub async fn start(opts: Options) -> Pullthrough {
        let dir = tempfile::Builder::new()
            .prefix("pullthrough")
            .tempdir()
            .expect("tempdir");
        let port = free_port();
        let ops_port = free_port();
        let config_path = dir.path().join("pullthrough.toml");
        let default_upstream = opts
            .default_upstream
            .map(|d| format!("default_upstream = \"{d}\"\n"))
            .unwrap_or_default();
        let config = format!(
            "listen = \"127.0.0.1:{port}\"\nops_listen = \"127.0.0.1:{ops_port}\"\n{default_upstream}\n[ecr]\nregion = \"us-east-1\"\nendpoint = \"{}\"\n\n{}",
            opts.endpoint, opts.extra
        );
        std::fs::write(&config_path, config).expect("write config");
        let mut child = spawn(
            dir.path(),
            &config_path,
            &opts.ecr_api,
            &opts.rust_log,
            &opts.env,
        );
        child.wait_for_port(port).await;
        child.wait_for_port(ops_port).await;
        Pullthrough {
            child,
            port,
            ops_port,
            config_path,
            dir,
        }
    }

    /// `http://127.0.0.1:PORT`, the mirror.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The mirror's `host:port`.
    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// `http://127.0.0.1:OPS_PORT`.
    pub fn ops_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.ops_port)
    }

    /// The config file it runs with.
    pub fn config_path(&self) -> &Path {
        &self.config_path
    }

    /// Runs `pullthrough hosts` with this instance's config, writing into `dir`; its stdout (the
    /// paths written), or its stderr on failure.
    pub fn write_hosts(&self, dir: &Path) -> Result<String, String> {
        let out = Command::new(pullthrough_bin())
            .args(["hosts", "--config"])
            .arg(&self.config_path)
            .arg("--dir")
            .arg(dir)
            .output()
            .map_err(|e| format!("running pullthrough hosts: {e}"))?;
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).into_owned());
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Its working directory (for hosts.toml and the like).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The process id, to look at its resources (`/proc/<pid>/fd`).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Everything it logged so far.
    pub fn log(&self) -> String {
        self.child.stderr()
    }

    /// Everything it wrote to stdout so far (nothing, normally: logs go to stderr).
    pub fn stdout(&self) -> String {
        self.child.stdout()
    }

    /// The JSON access-log lines (one per request) written so far.
    pub fn access_log(&self) -> Vec<serde_json::Value> {
        self.log()
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|v| v["target"] == "pullthrough::access")
            .collect()
    }

    /// Waits for the access-log line of a request to `upstream_path`.
    pub async fn wait_for_access(&self, upstream_path: &str) -> serde_json::Value {
        eventually(&format!("access log line for {upstream_path}"), || {
            self.access_log()
                .into_iter()
                .find(|v| v["upstream_path"] == upstream_path)
        })
        .await
    }

    /// The value of a metric line (exact name with labels), if present.
    pub async fn metric(&self, series: &str) -> Option<f64> {
        let resp = http::get(&format!("{}/metrics", self.ops_url()), &[])
            .await
            .ok()?;
        let text = String::from_utf8_lossy(resp.body()).into_owned();
        text.lines()
            .find_map(|l| l.strip_prefix(series).and_then(|v| v.strip_prefix(' ')))
            .and_then(|v| v.trim().parse().ok())
    }

    /// `GET /readyz` status.
    pub async fn ready_status(&self) -> u16 {
        http::get(&format!("{}/readyz", self.ops_url()), &[])
            .await
            .map(|r| r.status().as_u16())
            .unwrap_or(0)
    }

    /// Sends SIGTERM.
    pub fn sigterm(&self) {
        self.child.sigterm();
    }

    /// Waits for the process to exit.
    pub async fn wait_exit(&mut self, within: Duration) -> Option<ExitStatus> {
        self.child.wait_exit(within).await
    }

    /// SIGKILL.
    pub fn kill(&mut self) {
        self.child.kill();
    }
}

fn spawn(
    dir: &Path,
    config: &Path,
    ecr_api: &str,
    rust_log: &str,
    env: &[(String, String)],
) -> ChildGuard {
    let mut cmd = Command::new(pullthrough_bin());
    cmd.args(["--log-format", "json", "serve", "--config"])
        .arg(config);
    test_aws_env(&mut cmd, ecr_api, rust_log);
    cmd.envs(env.iter().map(|(k, v)| (k, v)));
    ChildGuard::spawn("pullthrough", &mut cmd, dir)
}

/// The environment every pullthrough process of the tests runs with: nothing inherited but
/// `PATH`, the ECR API at `ecr_api` (moto) with test credentials, and never a real identity (no
/// IMDS, no profile files).
pub fn test_aws_env<'a>(cmd: &'a mut Command, ecr_api: &str, rust_log: &str) -> &'a mut Command {
    cmd.env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("RUST_LOG", rust_log)
        .env("AWS_ENDPOINT_URL_ECR", ecr_api)
        .env("AWS_ACCESS_KEY_ID", "testing")
        .env("AWS_SECRET_ACCESS_KEY", "testing")
        .env("AWS_REGION", "us-east-1")
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .env("AWS_CONFIG_FILE", "/dev/null")
        .env("AWS_SHARED_CREDENTIALS_FILE", "/dev/null")
}

/// A fake upstream that answers every request `200 {}` and records the request line and headers.
pub struct Recorder {
    port: u16,
    seen: Arc<Mutex<Vec<(String, HeaderMap)>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Recorder {
    /// Starts it on a free loopback port.
    pub async fn start() -> Recorder {
        let listener = TcpListener::bind(("127.0.0.1", free_port()))
            .await
            .expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let seen: Arc<Mutex<Vec<(String, HeaderMap)>>> = Arc::default();
        let log = Arc::clone(&seen);
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let log = Arc::clone(&log);
                let svc = service_fn(move |req: Request<Incoming>| {
                    let log = Arc::clone(&log);
                    async move {
                        let line = format!("{} {}", req.method(), req.uri());
                        log.lock()
                            .expect("lock")
                            .push((line, req.headers().clone()));
                        let mut resp = Response::new(Full::new(Bytes::from_static(b"{}")));
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
        Recorder { port, seen, task }
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Every request so far: `"METHOD /path?query"` and its headers.
    pub fn requests(&self) -> Vec<(String, HeaderMap)> {
        self.seen.lock().expect("lock").clone()
    }
}

impl Drop for Recorder {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A fake upstream that accepts TCP connections and never answers (a hung ECR endpoint).
pub struct BlackHole {
    port: u16,
    task: tokio::task::JoinHandle<()>,
}

impl BlackHole {
    /// Starts it on a free loopback port.
    pub async fn start() -> BlackHole {
        let listener = TcpListener::bind(("127.0.0.1", free_port()))
            .await
            .expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let task = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((stream, _)) = listener.accept().await {
                held.push(stream);
            }
        });
        BlackHole { port, task }
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

impl Drop for BlackHole {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// What a [`RawUpstream`] does after writing its canned response.
#[derive(Clone, Copy, Debug)]
pub enum Then {
    /// Close the connection (a registry that dies mid-body).
    Close,
    /// Keep it open and silent (a registry that stalls mid-body).
    Hold,
}

/// A fake upstream that answers every request with the same raw bytes, for broken responses no
/// real registry sends on purpose.
pub struct RawUpstream {
    port: u16,
    task: tokio::task::JoinHandle<()>,
}

impl RawUpstream {
    /// Starts it on a free loopback port.
    pub async fn start(response: Vec<u8>, then: Then) -> RawUpstream {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = TcpListener::bind(("127.0.0.1", free_port()))
            .await
            .expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let response = Arc::new(response);
        let task = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((mut stream, _)) = listener.accept().await {
                // Read the request head; one read is enough for the small GETs the proxy sends.
                let mut buf = vec![0u8; 16 * 1024];
                let _ = stream.read(&mut buf).await;
                let _ = stream.write_all(&response).await;
                let _ = stream.flush().await;
                match then {
                    Then::Close => drop(stream),
                    Then::Hold => held.push(stream),
                }
            }
        });
        RawUpstream { port, task }
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

impl Drop for RawUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}
