//! Security checks as tests (issue 7, section 4): what belongs to the node's AWS identity never
//! leaks, and a request can never choose where pullthrough connects.
//!
//! - no token, registry password, `AWS:<password>` or AWS secret in any log line, at trace level,
//!   through real pulls, a token refresh after a 401 and a token fetch;
//! - a client's `Authorization` never reaches the ECR endpoint, first try or retry;
//! - absolute-form URIs, `Host` tricks, odd `ns=` values, encoded paths and redirects never make
//!   pullthrough connect anywhere but the configured endpoint;
//! - the mirror listens on loopback unless told otherwise;
//! - `/metrics`, `/readyz` and `/healthz` show no secret, ready or not;
//! - the webhook refuses TLS 1.0 and 1.1 and speaks 1.2 and 1.3.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use crate::support::http::get;
use crate::support::image::{ACCEPT, Image};
use crate::support::moto::Moto;
use crate::support::pullthrough::{Options, Pullthrough};
use crate::support::registry::{Registry, USER};
use crate::support::{ChildGuard, base64, free_port, pullthrough_bin, short_tempdir};

/// AWS credentials no other string in a log could contain by accident, so finding one is a leak.
const ACCESS_KEY_ID: &str = "AKIAPULLTHROUGHSEC01";
const SECRET_ACCESS_KEY: &str = "pt-sec-SECRET-wJalrXUtnFEMI-K7MDENG-bPxRfiCY";
const SESSION_TOKEN: &str = "pt-sec-SESSION-IQoJb3JpZ2luX2VjEJr-never-log-me";

/// The account moto answers as after the token rotation.
const ROTATED_ACCOUNT: &str = "210987654321";

/// Options whose AWS credentials are [`SECRET_ACCESS_KEY`] and friends.
fn options(endpoint: &str, moto: &Moto) -> Options {
    let mut opts = Options::new(endpoint, &moto.endpoint());
    opts.env = vec![
        ("AWS_ACCESS_KEY_ID".into(), ACCESS_KEY_ID.into()),
        ("AWS_SECRET_ACCESS_KEY".into(), SECRET_ACCESS_KEY.into()),
        ("AWS_SESSION_TOKEN".into(), SESSION_TOKEN.into()),
    ];
    opts
}

/// Every form a secret of `accounts` (moto's) could take in a log line, named.
fn secrets(accounts: &[&str]) -> Vec<(String, String)> {
    let mut all = vec![
        (
            "the AWS secret access key".to_owned(),
            SECRET_ACCESS_KEY.to_owned(),
        ),
        ("the AWS session token".to_owned(), SESSION_TOKEN.to_owned()),
    ];
    for account in accounts {
        let password = format!("{account}-auth-token");
        let user_password = format!("{USER}:{password}");
        all.push((format!("the registry password of {account}"), password));
        all.push((
            format!("the ECR token of {account} (base64 of AWS:<password>)"),
            base64(user_password.as_bytes()),
        ));
        all.push((format!("AWS:<password> of {account}"), user_password));
    }
    all
}

/// Panics, naming the secret and the line, if any secret occurs in `text`.
fn assert_no_secret(what: &str, text: &str, secrets: &[(String, String)]) {
    for (name, secret) in secrets {
        if let Some((n, line)) = text
            .lines()
            .enumerate()
            .find(|(_, line)| line.contains(secret.as_str()))
        {
            panic!("{name} appears in {what}, line {}:\n{line}", n + 1);
        }
    }
}

/// `skopeo copy` of `image` (`<registry>/<repo>:<tag>`) through the mirror, path-prefix form.
fn skopeo_pull(pt: &Pullthrough, image: &str, dest: &std::path::Path) {
    let src = format!("docker://{}/{image}", pt.host());
    let out = Command::new("skopeo")
        .args([
            "copy",
            "--all",
            "--src-tls-verify=false",
            "--retry-times=0",
            &src,
        ])
        .arg(format!("dir:{}", dest.display()))
        .output()
        .expect("run skopeo");
    assert!(
        out.status.success(),
        "skopeo copy {src}: {}\npullthrough log:\n{}",
        String::from_utf8_lossy(&out.stderr),
        pt.log()
    );
}

#[tokio::test]
async fn no_secret_in_any_log_line_at_trace_level() {
    let mut moto = Moto::start().await;
    let registry = Registry::start(&moto.password()).await;
    let small = Image::small("alpine");
    let multi = Image::multi_arch("multi");
    registry
        .push("docker-hub/library/alpine", "3.19", &small)
        .await;
    registry.push("docker-hub/library/multi", "1", &multi).await;
    let mut opts = options(&registry.base_url(), &moto);
    // Everything, the AWS SDK included.
    opts.rust_log = "trace".into();
    let mut pt = Pullthrough::start(opts).await;
    let dir = tempfile::tempdir().unwrap();

    // Real pulls: a single-arch and a multi-arch image, every manifest and blob.
    skopeo_pull(&pt, "docker.io/library/alpine:3.19", &dir.path().join("a"));
    skopeo_pull(&pt, "docker.io/library/multi:1", &dir.path().join("m"));
    assert_eq!(moto.token_calls(), 1);

    // ECR rotates: the cached token gets a 401, pullthrough fetches a new one and retries.
    moto.restart_with_account(ROTATED_ACCOUNT).await;
    registry.set_password(&moto.password());
    registry.clear_requests();
    skopeo_pull(&pt, "docker.io/library/alpine:3.19", &dir.path().join("b"));
    assert_eq!(moto.token_calls(), 2, "the 401 made one token fetch");
    let statuses: Vec<u16> = registry.requests().iter().map(|r| r.2).collect();
    assert!(statuses.contains(&401), "a 401 was seen: {statuses:?}");
    // The ops listener asks for the token too.
    assert_eq!(pt.ready_status().await, 200);

    // Stop it so that everything it would write is written.
    pt.sigterm();
    assert!(pt.wait_exit(Duration::from_secs(30)).await.is_some());
    let log = format!("{}\n{}", pt.stdout(), pt.log());
    // The check means something only if trace and debug lines, the SDK's included, were written.
    for level in ["\"level\":\"TRACE\"", "\"level\":\"DEBUG\""] {
        assert!(log.contains(level), "no {level} line in the log");
    }
    assert!(log.contains("\"target\":\"aws_"), "the SDK logged nothing");
    assert!(log.contains("ECR refused the token"), "the 401 retry ran");
    assert_no_secret(
        "pullthrough's stdout or stderr",
        &log,
        &secrets(&[crate::support::moto::DEFAULT_ACCOUNT, ROTATED_ACCOUNT]),
    );
}

/// One request an [`Upstream`] received: `"METHOD /path?query"` and its headers.
type Seen = (String, HeaderMap);

/// A loopback stand-in for the ECR endpoint that records each request's headers (which the real
/// registry does not log) and answers by a rule: the first request to a path that contains
/// `unauthorized_once` gets a 401 (to make pullthrough refresh and retry); blobs get a 307 to
/// `redirect_to` if set; anything else 200 with a small JSON body.
struct Upstream {
    port: u16,
    seen: Arc<Mutex<Vec<Seen>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Upstream {
    async fn start(unauthorized_once: &'static str, redirect_to: Option<String>) -> Upstream {
        let listener = TcpListener::bind(("127.0.0.1", free_port())).await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
        let log = Arc::clone(&seen);
        let refused = Arc::new(AtomicUsize::new(0));
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let log = Arc::clone(&log);
                let refused = Arc::clone(&refused);
                let redirect_to = redirect_to.clone();
                let svc = service_fn(move |req: Request<Incoming>| {
                    let path = req.uri().path().to_owned();
                    log.lock().unwrap().push((
                        format!("{} {}", req.method(), req.uri()),
                        req.headers().clone(),
                    ));
                    let mut resp = Response::new(Full::new(Bytes::from_static(b"{}")));
                    if !unauthorized_once.is_empty()
                        && path.contains(unauthorized_once)
                        && refused.fetch_add(1, Ordering::SeqCst) == 0
                    {
                        *resp.status_mut() = StatusCode::UNAUTHORIZED;
                    } else if let (Some(to), true) = (&redirect_to, path.contains("/blobs/")) {
                        *resp.status_mut() = StatusCode::TEMPORARY_REDIRECT;
                        resp.headers_mut().insert("location", to.parse().unwrap());
                    }
                    resp.headers_mut()
                        .insert("content-type", "application/json".parse().unwrap());
                    async move { Ok::<_, std::convert::Infallible>(resp) }
                });
                tokio::spawn(
                    hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc),
                );
            }
        });
        Upstream { port, seen, task }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn requests(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

const BLOB: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

#[tokio::test]
async fn a_client_authorization_never_reaches_the_endpoint() {
    let moto = Moto::start().await;
    // The first tags/list gets a 401, so the retry with a fresh token is checked too.
    let upstream = Upstream::start("/tags/list", None).await;
    let pt = Pullthrough::start(options(&upstream.url(), &moto)).await;
    let client_secrets = ["cG9kOnNlY3JldA", "pod-bearer-token", "pod-proxy-secret"];
    let header_sets: [&[(&str, &str)]; 4] = [
        &[("authorization", "Basic cG9kOnNlY3JldA==")],
        &[("Authorization", "Bearer pod-bearer-token")],
        // Two of them, and a proxy credential.
        &[
            ("authorization", "Bearer pod-bearer-token"),
            ("authorization", "Basic cG9kOnNlY3JldA=="),
            ("proxy-authorization", "Basic pod-proxy-secret"),
        ],
        &[("AUTHORIZATION", "Basic cG9kOnNlY3JldA==")],
    ];
    let paths = [
        "/v2/library/alpine/tags/list?ns=docker.io",
        "/v2/library/alpine/manifests/3.19?ns=docker.io",
        &format!("/v2/library/alpine/blobs/{BLOB}?ns=docker.io"),
        // Path-prefix form (CRI-O, skopeo).
        "/v2/quay.io/prometheus/node-exporter/manifests/v1",
    ];
    for headers in header_sets {
        for path in &paths {
            let mut h = headers.to_vec();
            h.push(("accept", ACCEPT));
            let resp = get(&format!("{}{path}", pt.url()), &h).await.unwrap();
            assert_eq!(resp.status(), StatusCode::OK, "{path}");
        }
    }
    let seen = upstream.requests();
    // 16 requests, one of them refused once and retried.
    assert_eq!(seen.len(), header_sets.len() * paths.len() + 1, "{seen:?}");
    let ecr = format!("Basic {}", moto.authorization_token());
    for (line, h) in &seen {
        let auth: Vec<_> = h.get_all("authorization").iter().collect();
        assert_eq!(auth, [ecr.as_str()], "{line}: exactly the ECR token");
        assert!(!h.contains_key("proxy-authorization"), "{line}");
        for (name, value) in h {
            let value = String::from_utf8_lossy(value.as_bytes());
            for s in client_secrets {
                assert!(!value.contains(s), "{line}: {name}: {value}");
            }
        }
    }
    assert!(
        seen.iter()
            .filter(|(l, _)| l.contains("/tags/list"))
            .count()
            >= 2,
        "the 401 was retried"
    );
}

/// A listener that only counts the connections it is offered: where a request must never go.
struct Evil {
    port: u16,
    connections: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Evil {
    async fn start() -> Evil {
        let listener = TcpListener::bind(("127.0.0.1", free_port())).await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let connections = Arc::new(AtomicUsize::new(0));
        let count = Arc::clone(&connections);
        let task = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((stream, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                held.push(stream);
            }
        });
        Evil {
            port,
            connections,
            task,
        }
    }
}

impl Drop for Evil {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Writes `raw` to the mirror and returns the status line of its answer ("" if none).
async fn raw_request(pt: &Pullthrough, raw: &str) -> String {
    let mut conn = tokio::net::TcpStream::connect(pt.host()).await.unwrap();
    conn.write_all(raw.as_bytes()).await.unwrap();
    // The response head is enough (a CONNECT answer leaves the connection open).
    let mut answer = Vec::new();
    let read_head = async {
        let mut buf = [0u8; 4096];
        while !answer.windows(4).any(|w| w == b"\r\n\r\n") {
            match conn.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => answer.extend_from_slice(&buf[..n]),
            }
        }
    };
    // Bounds a hang; every request here is answered at once or refused.
    let _ = tokio::time::timeout(Duration::from_secs(20), read_head).await;
    let text = String::from_utf8_lossy(&answer);
    text.lines().next().unwrap_or_default().to_owned()
}

#[tokio::test]
async fn requests_only_ever_reach_the_configured_endpoint() {
    let moto = Moto::start().await;
    let evil = Evil::start().await;
    let e = format!("127.0.0.1:{}", evil.port);
    // Blobs answer with a redirect to the evil host: it is the client's to follow, not ours.
    let upstream = Upstream::start("", Some(format!("http://{e}/stolen"))).await;
    let mut opts = options(&upstream.url(), &moto);
    // The path-prefix and no-registry forms too: the widest routing there is.
    opts.default_upstream = Some("docker.io".into());
    let pt = Pullthrough::start(opts).await;

    let m = "manifests/1";
    let targets = [
        // Absolute-form request lines, as sent to a forward proxy.
        format!("http://{e}/v2/library/alpine/{m}?ns=docker.io"),
        format!("http://{e}/v2/library/alpine/{m}"),
        format!("http://user:pw@{e}/v2/library/alpine/{m}?ns=docker.io"),
        format!("https://{e}/v2/library/alpine/{m}?ns=docker.io"),
        // The registry chosen by the request: only configured ones exist.
        format!("/v2/library/alpine/{m}?ns={e}"),
        format!("/v2/library/alpine/{m}?ns=http://{e}"),
        format!("/v2/library/alpine/{m}?ns=docker.io@{e}"),
        format!("/v2/library/alpine/{m}?ns=docker.io%40{e}"),
        format!("/v2/library/alpine/{m}?ns=docker.io/../{e}"),
        format!("/v2/library/alpine/{m}?ns=docker.io%2F..%2F{e}"),
        format!("/v2/library/alpine/{m}?ns=docker.io&ns={e}"),
        format!("/v2/library/alpine/{m}?ns={e}&ns=docker.io"),
        format!("/v2/library/alpine/{m}?ns=docker.io%00{e}"),
        format!("/v2/library/alpine/{m}?ns=docker.io:{}", evil.port),
        format!("/v2/{e}/library/alpine/{m}"),
        format!("/v2/http:%2F%2F{e}/library/alpine/{m}"),
        // Encoded paths, traversal, doubled slashes.
        format!("//{e}/v2/library/alpine/{m}?ns=docker.io"),
        format!("/v2/..%2F..%2F{e}/library/alpine/{m}?ns=docker.io"),
        format!("/v2/library/alpine/../../{e}/{m}?ns=docker.io"),
        format!("/v2/library%2F..%2F..%2F{e}/{m}?ns=docker.io"),
        format!("/v2/library/alpine/blobs/http:%2F%2F{e}?ns=docker.io"),
        format!("/v2/%68ttp://{e}/{m}"),
        // A redirect from the endpoint is passed back, never followed.
        format!("/v2/library/alpine/blobs/{BLOB}?ns=docker.io"),
    ];
    let mut answers = Vec::new();
    for target in &targets {
        for host_headers in [
            format!("Host: {e}\r\n"),
            format!(
                "Host: {e}\r\nX-Forwarded-Host: {e}\r\nForwarded: host={e}\r\nX-Forwarded-Proto: http\r\n"
            ),
        ] {
            let raw = format!(
                "GET {target} HTTP/1.1\r\n{host_headers}Accept: {ACCEPT}\r\nConnection: close\r\n\r\n"
            );
            answers.push((target.clone(), raw_request(&pt, &raw).await));
        }
    }
    // CONNECT (a tunnel) and a Host header that differs from an absolute URI.
    for raw in [
        format!("CONNECT {e} HTTP/1.1\r\nHost: {e}\r\n\r\n"),
        format!(
            "GET http://{}/v2/library/alpine/{m}?ns=docker.io HTTP/1.1\r\nHost: {e}\r\nConnection: close\r\n\r\n",
            pt.host()
        ),
    ] {
        answers.push((raw.clone(), raw_request(&pt, &raw).await));
    }
    // Every request was answered (by pullthrough, since nothing else is listening there)...
    for (target, status) in &answers {
        assert!(status.starts_with("HTTP/1.1 "), "{target}: {status:?}");
    }
    // ...and nothing reached the other listener, directly or by a followed redirect.
    assert_eq!(
        evil.connections.load(Ordering::SeqCst),
        0,
        "a request reached 127.0.0.1:{}",
        evil.port
    );
    let redirect = answers
        .iter()
        .find(|(t, _)| t.ends_with(&format!("blobs/{BLOB}?ns=docker.io")))
        .unwrap();
    assert!(redirect.1.contains("307"), "{redirect:?}");
    // What did reach the endpoint is a mapped pull-through path with the endpoint as Host.
    let seen = upstream.requests();
    assert!(!seen.is_empty(), "the legitimate requests were forwarded");
    let host = upstream.url().trim_start_matches("http://").to_owned();
    for (line, h) in &seen {
        assert_eq!(h["host"], host.as_str(), "{line}");
        assert!(
            [
                "GET /v2/docker-hub/",
                "GET /v2/quay/",
                "GET /v2/kubernetes/"
            ]
            .iter()
            .any(|p| line.starts_with(p)),
            "{line}"
        );
        assert!(!line.contains(&e), "{line}");
        for name in ["x-forwarded-host", "forwarded"] {
            assert!(!h.contains_key(name), "{line}: {name} forwarded");
        }
    }
}

/// The first IPv4 address of this machine that is not loopback, if it has one.
fn non_loopback_ipv4() -> Option<Ipv4Addr> {
    let out = Command::new("hostname").arg("-I").output().ok()?;
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .filter_map(|a| a.parse::<Ipv4Addr>().ok())
        .find(|a| !a.is_loopback())
}

/// The local addresses of the sockets listening on `port`, from /proc/net/tcp and tcp6.
fn listening_addresses(port: u16) -> Vec<String> {
    let mut found = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let text = std::fs::read_to_string(table).unwrap_or_default();
        for line in text.lines().skip(1) {
            let fields: Vec<&str> = line.split_whitespace().collect();
            // sl local_address rem_address st ...; 0A is LISTEN.
            let (Some(local), Some(state)) = (fields.get(1), fields.get(3)) else {
                continue;
            };
            let Some((addr, p)) = local.split_once(':') else {
                continue;
            };
            if *state == "0A" && u16::from_str_radix(p, 16) == Ok(port) {
                found.push(format!("{table}:{addr}"));
            }
        }
    }
    found
}

#[tokio::test]
async fn the_mirror_listens_on_loopback_by_default() {
    // The validated defaults: the mirror and the ops pages.
    let config = pullthrough::config::Config::from_toml_str("", "empty.toml").unwrap();
    assert!(config.listen.ip().is_loopback(), "{}", config.listen);
    assert!(
        config.ops_listen.ip().is_loopback(),
        "{}",
        config.ops_listen
    );
    let default: SocketAddr = pullthrough::config::DEFAULT_LISTEN.parse().unwrap();
    assert_eq!(config.listen, default);
    let ops_default: SocketAddr = pullthrough::config::DEFAULT_OPS_LISTEN.parse().unwrap();
    assert_eq!(config.ops_listen, ops_default);

    // And a running `serve` whose config does not say `listen` at all.
    let moto = Moto::start().await;
    let dir = short_tempdir("pt-sec");
    let ops_port = ops_default.port();
    let path = dir.path().join("pullthrough.toml");
    std::fs::write(
        &path,
        format!(
            "[ecr]\nregion = \"us-east-1\"\nendpoint = \"http://127.0.0.1:{}\"\n",
            crate::support::dead_port()
        ),
    )
    .unwrap();
    for port in [default.port(), ops_port] {
        let busy = listening_addresses(port);
        assert!(
            busy.is_empty(),
            "port {port} is already in use ({busy:?}): stop whatever listens there"
        );
    }
    let mut child = ChildGuard::spawn(
        "pullthrough",
        Command::new(pullthrough_bin())
            .args(["serve", "--config"])
            .arg(&path)
            .env("AWS_ENDPOINT_URL_ECR", moto.endpoint())
            .env("AWS_ACCESS_KEY_ID", ACCESS_KEY_ID)
            .env("AWS_SECRET_ACCESS_KEY", SECRET_ACCESS_KEY)
            .env("AWS_EC2_METADATA_DISABLED", "true")
            .env("AWS_CONFIG_FILE", "/dev/null")
            .env("AWS_SHARED_CREDENTIALS_FILE", "/dev/null"),
        dir.path(),
    );
    child.wait_for_port(ops_port).await;
    child.wait_for_port(default.port()).await;
    // The kernel's view: one listening socket on each port, bound to 127.0.0.1 (0100007F).
    for port in [default.port(), ops_port] {
        assert_eq!(
            listening_addresses(port),
            ["/proc/net/tcp:0100007F"],
            "port {port}: pullthrough {}",
            child.stderr()
        );
    }
    // And the machine's own non-loopback address does not reach it.
    if let Some(ip) = non_loopback_ipv4() {
        let r = tokio::time::timeout(
            Duration::from_secs(5),
            tokio::net::TcpStream::connect((IpAddr::V4(ip), default.port())),
        )
        .await;
        assert!(
            !matches!(r, Ok(Ok(_))),
            "the mirror answered on {ip}:{}",
            default.port()
        );
        // The same address reaches a socket bound to all interfaces: the check above can fail.
        let any = std::net::TcpListener::bind((Ipv4Addr::UNSPECIFIED, 0)).unwrap();
        let port = any.local_addr().unwrap().port();
        assert!(
            tokio::net::TcpStream::connect((IpAddr::V4(ip), port))
                .await
                .is_ok()
        );
    } else {
        eprintln!("no non-loopback IPv4 address on this machine: checked /proc/net/tcp only");
    }
    child.terminate(Duration::from_secs(10));
}

#[tokio::test]
async fn ops_endpoints_expose_no_secret() {
    let mut moto = Moto::start().await;
    let registry = Registry::start(&moto.password()).await;
    registry
        .push("docker-hub/library/alpine", "3.19", &Image::small("alpine"))
        .await;
    let pt = Pullthrough::start(options(&registry.base_url(), &moto)).await;
    let resp = get(
        &format!("{}/v2/library/alpine/manifests/3.19?ns=docker.io", pt.url()),
        &[
            ("accept", ACCEPT),
            ("authorization", "Basic cG9kOnNlY3JldA=="),
        ],
    )
    .await
    .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let mut secrets = secrets(&[crate::support::moto::DEFAULT_ACCOUNT]);
    secrets.push(("the client's credential".into(), "cG9kOnNlY3JldA".into()));

    let page = |path: &'static str| {
        let url = format!("{}{path}", pt.ops_url());
        async move {
            let r = get(&url, &[]).await.unwrap();
            (r.status(), String::from_utf8_lossy(r.body()).into_owned())
        }
    };
    let (status, metrics) = page("/metrics").await;
    assert_eq!(status, StatusCode::OK);
    // The metrics saw the request and the token: there was something to leak.
    assert!(metrics.contains("pullthrough_"), "{metrics}");
    assert!(metrics.contains("token"), "{metrics}");
    assert_no_secret("/metrics", &metrics, &secrets);
    for path in ["/readyz", "/healthz"] {
        let (status, body) = page(path).await;
        assert_eq!(status, StatusCode::OK, "{path}");
        assert_no_secret(path, &body, &secrets);
    }

    // Not ready: the error /readyz shows names the failure, not the credentials.
    moto.stop();
    let cold = Pullthrough::start(options(&registry.base_url(), &moto)).await;
    let url = format!("{}/readyz", cold.ops_url());
    let (mut status, mut body) = (StatusCode::OK, String::new());
    for _ in 0..100 {
        let r = get(&url, &[]).await.unwrap();
        status = r.status();
        body = String::from_utf8_lossy(r.body()).into_owned();
        if status == StatusCode::SERVICE_UNAVAILABLE && body.contains("not ready: ") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_no_secret("/readyz when not ready", &body, &secrets);
    assert!(!body.contains(ACCESS_KEY_ID), "{body}");
    let metrics = get(&format!("{}/metrics", cold.ops_url()), &[])
        .await
        .unwrap();
    assert_no_secret(
        "/metrics when not ready",
        &String::from_utf8_lossy(metrics.body()),
        &secrets,
    );
}

/// `openssl s_client` with one protocol version forced: its exit status and output.
///
/// OpenSSL 3 refuses TLS 1.0 and 1.1 on the client side at its default security level, so the
/// cipher string lowers it to 0: the handshake must fail because of the server.
fn s_client(port: u16, version_flag: &str, ca: &std::path::Path) -> (bool, String) {
    let out = Command::new("openssl")
        .args(["s_client", "-connect", &format!("127.0.0.1:{port}")])
        .args([version_flag, "-cipher", "DEFAULT@SECLEVEL=0"])
        .args(["-servername", "pullthrough-webhook.pullthrough.svc"])
        .arg("-CAfile")
        .arg(ca)
        .stdin(std::process::Stdio::null())
        .output()
        .expect("run openssl s_client (scripts/deps installs openssl)");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// Whether s_client's summary shows a completed handshake at `version` (e.g. `TLSv1.2`): its
/// session's `Protocol` line, or for TLS 1.3 (whose session arrives later) the `New,` line.
fn negotiated(text: &str, version: &str) -> bool {
    !text.contains("Cipher is (NONE)")
        && text.lines().any(|l| {
            l.trim() == format!("Protocol  : {version}")
                || l.starts_with(&format!("New, {version}, Cipher is "))
        })
}

#[tokio::test]
async fn the_webhook_refuses_tls_below_1_2() {
    let dir = short_tempdir("pt-tls");
    crate::webhook::make_certs(dir.path(), &[]);
    let (cert, key, ca) = (
        dir.path().join("tls.crt"),
        dir.path().join("tls.key"),
        dir.path().join("ca.crt"),
    );
    let (port, ops_port) = (free_port(), free_port());
    let config = dir.path().join("pullthrough.toml");
    std::fs::write(
        &config,
        format!(
            "[ecr]\naccount = \"123456789012\"\nregion = \"eu-west-1\"\n\n[webhook]\n\
             listen = \"127.0.0.1:{port}\"\nops_listen = \"127.0.0.1:{ops_port}\"\n\
             cert_file = \"{}\"\nkey_file = \"{}\"\n",
            cert.display(),
            key.display()
        ),
    )
    .unwrap();
    let mut webhook = ChildGuard::spawn(
        "pullthrough-webhook",
        Command::new(pullthrough_bin()).args(["webhook", "--config", config.to_str().unwrap()]),
        dir.path(),
    );
    webhook.wait_for_port(port).await;

    for (flag, version) in [("-tls1_2", "TLSv1.2"), ("-tls1_3", "TLSv1.3")] {
        let (ok, text) = s_client(port, flag, &ca);
        assert!(ok, "{flag} must succeed:\n{text}");
        assert!(negotiated(&text, version), "{flag}:\n{text}");
        assert!(
            text.contains("Verify return code: 0 (ok)"),
            "{flag}:\n{text}"
        );
    }
    for flag in ["-tls1_1", "-tls1"] {
        let (ok, text) = s_client(port, flag, &ca);
        assert!(!ok, "{flag} must fail the handshake:\n{text}");
        // s_client's summary of a handshake that never completed.
        assert!(
            text.contains("no peer certificate available") && text.contains("Cipher is (NONE)"),
            "{flag} negotiated a session:\n{text}"
        );
    }
    webhook.terminate(Duration::from_secs(10));

    // The same client commands do complete a TLS 1.0/1.1 handshake with a server that allows
    // them, so the refusals above are the webhook's, not the client's.
    let control_port = free_port();
    let mut control = ChildGuard::spawn(
        "openssl-s_server",
        Command::new("openssl")
            .args(["s_server", "-accept", &format!("127.0.0.1:{control_port}")])
            .args(["-www", "-cipher", "DEFAULT@SECLEVEL=0"])
            .arg("-cert")
            .arg(&cert)
            .arg("-key")
            .arg(&key),
        dir.path(),
    );
    control.wait_for_port(control_port).await;
    for flag in ["-tls1_1", "-tls1"] {
        let (ok, text) = s_client(control_port, flag, &ca);
        let version = if flag == "-tls1" { "TLSv1" } else { "TLSv1.1" };
        assert!(ok, "control server, {flag}:\n{text}");
        assert!(
            negotiated(&text, version),
            "control server, {flag}:\n{text}"
        );
    }
    control.kill();
}
