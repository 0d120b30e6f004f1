//! A small HTTP/1.1 load generator, and the redirecting registry the many-core benchmark needs,
//! in one self-contained binary that travels in the benchmark bundle (`bench/bundle`) to machines
//! with no package manager, where wrk is not to be had.
//!
//! - `loadgen get URL --conns N --secs S [--ca FILE] [--header 'K: V']…`: N keep-alive
//!   connections, each sending GETs back to back for S seconds (after a one-second warm-up);
//!   prints one JSON line: requests per second, p50 and p99 latency in ms, and the responses
//!   that were not 2xx or 3xx (or failed). `{conn}` in the URL becomes the connection's number,
//!   so that connections can ask for different things (no two in-flight requests alike).
//! - `loadgen redirect --listen ADDR --password PW [--cert FILE --key FILE]`: a registry endpoint
//!   that answers every blob GET with `307` to an S3-like URL, as ECR does, after checking the
//!   Basic credentials `AWS:PW`; `/v2/` answers `{}`. What the mirror relays for every layer of
//!   a real pull, so the benchmark can measure that path without S3.
//!
//! Loopback only: `get` refuses a URL whose host is not a loopback address, and `redirect`
//! refuses to listen elsewhere.

// A benchmark tool: a setup failure has nothing better to do than stop with its message.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use bytes::Bytes;
use http::{Request, Response, StatusCode, Uri};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::net::{TcpListener, TcpStream};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let _ = rustls::crypto::ring::default_provider().install_default();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    match args.first().map(String::as_str) {
        Some("get") => runtime.block_on(get(&args[1..])),
        Some("redirect") => runtime.block_on(redirect(&args[1..])),
        _ => {
            eprintln!(
                "usage: loadgen get URL --conns N --secs S [--ca FILE] [--header 'K: V']...\n       loadgen redirect --listen ADDR --password PW [--cert FILE --key FILE]"
            );
            std::process::exit(64);
        }
    }
}

fn flag<'a>(args: &'a [String], name: &str) -> Option<&'a str> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .map(String::as_str)
}

fn loopback(host: &str) -> bool {
    host == "localhost"
        || host
            .trim_matches(['[', ']'])
            .parse::<IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// A TLS client config trusting only `ca`.
fn client_tls(ca: &str) -> Arc<rustls::ClientConfig> {
    let pem = std::fs::read(ca).expect("read --ca");
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&pem) {
        roots.add(cert.expect("CA PEM")).expect("CA certificate");
    }
    Arc::new(
        rustls::ClientConfig::builder()
            .with_root_certificates(roots)
            .with_no_client_auth(),
    )
}

async fn get(args: &[String]) {
    // `{conn}` is not valid in a URI: parse the URL with a stand-in, substitute per connection.
    let raw = args.first().expect("URL").replace("{conn}", "%7Bconn%7D");
    let url: Uri = raw.parse().expect("URL");
    let conns: usize = flag(args, "--conns").map_or(1, |v| v.parse().expect("--conns"));
    let secs: u64 = flag(args, "--secs").map_or(5, |v| v.parse().expect("--secs"));
    let host = url.host().expect("URL host").to_owned();
    assert!(loopback(&host), "loopback only: {host}");
    let https = url.scheme_str() == Some("https");
    let port = url.port_u16().unwrap_or(if https { 443 } else { 80 });
    let tls = https.then(|| client_tls(flag(args, "--ca").expect("--ca for https")));
    let headers: Vec<(String, String)> = args
        .windows(2)
        .filter(|w| w[0] == "--header")
        .filter_map(|w| {
            w[1].split_once(':')
                .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        })
        .collect();
    let warmup = Duration::from_secs(1);
    let start = Instant::now() + warmup;
    let stop = start + Duration::from_secs(secs);
    let mut tasks = Vec::new();
    for n in 0..conns {
        let url: Uri = url
            .to_string()
            .replace("%7Bconn%7D", &n.to_string())
            .replace("{conn}", &n.to_string())
            .parse()
            .expect("URL with {conn}");
        let (host, headers, tls) = (host.clone(), headers.clone(), tls.clone());
        tasks.push(tokio::spawn(async move {
            one_connection(url, host, port, tls, headers, start, stop).await
        }));
    }
    let mut latencies: Vec<u32> = Vec::new();
    let mut bad = 0u64;
    for t in tasks {
        let (l, b) = t.await.expect("connection task");
        latencies.extend(l);
        bad += b;
    }
    latencies.sort_unstable();
    let pick = |q: f64| {
        latencies
            .get(((latencies.len().max(1) - 1) as f64 * q).round() as usize)
            .map_or(0.0, |us| f64::from(*us) / 1000.0)
    };
    println!(
        "{{\"requests\":{},\"rps\":{:.1},\"p50_ms\":{:.3},\"p99_ms\":{:.3},\"errors\":{bad}}}",
        latencies.len(),
        latencies.len() as f64 / secs as f64,
        pick(0.5),
        pick(0.99)
    );
}

/// One keep-alive connection sending GETs back to back; reconnects after a failure. Returns the
/// latencies (µs) of the requests finished between `start` and `stop`, and how many of those
/// failed or were not 2xx/3xx.
async fn one_connection(
    url: Uri,
    host: String,
    port: u16,
    tls: Option<Arc<rustls::ClientConfig>>,
    headers: Vec<(String, String)>,
    start: Instant,
    stop: Instant,
) -> (Vec<u32>, u64) {
    let mut latencies = Vec::new();
    let mut bad = 0;
    let path = url.path_and_query().map_or("/", |p| p.as_str()).to_owned();
    let authority = url.authority().map_or(host.clone(), |a| a.to_string());
    'connect: while Instant::now() < stop {
        let Ok(tcp) = TcpStream::connect((host.as_str(), port)).await else {
            bad += 1;
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let mut sender = match &tls {
            None => {
                let (s, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
                    .await
                    .expect("handshake");
                tokio::spawn(conn);
                s
            }
            Some(cfg) => {
                let name = ServerName::try_from(host.clone()).expect("server name");
                let stream = tokio_rustls::TlsConnector::from(Arc::clone(cfg))
                    .connect(name, tcp)
                    .await
                    .expect("TLS handshake");
                let (s, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
                    .await
                    .expect("handshake");
                tokio::spawn(conn);
                s
            }
        };
        while Instant::now() < stop {
            let mut req = Request::builder().uri(&path).header("host", &authority);
            for (k, v) in &headers {
                req = req.header(k, v);
            }
            let req = req.body(Empty::<Bytes>::new()).expect("request");
            let t0 = Instant::now();
            let ok = match sender.send_request(req).await {
                Ok(resp) => {
                    let status = resp.status();
                    let body = resp.into_body().collect().await;
                    body.is_ok() && (status.is_success() || status.is_redirection())
                }
                Err(_) => false,
            };
            let t1 = Instant::now();
            if t0 >= start && t1 <= stop {
                latencies
                    .push(u32::try_from(t1.duration_since(t0).as_micros()).unwrap_or(u32::MAX));
                bad += u64::from(!ok);
            }
            if !ok {
                continue 'connect;
            }
        }
    }
    (latencies, bad)
}

async fn redirect(args: &[String]) {
    let listen: SocketAddr = flag(args, "--listen")
        .expect("--listen")
        .parse()
        .expect("--listen");
    assert!(listen.ip().is_loopback(), "loopback only: {listen}");
    let password = flag(args, "--password").expect("--password");
    let want = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("AWS:{password}"))
    );
    let tls = flag(args, "--cert").map(|cert| {
        let key = flag(args, "--key").expect("--key with --cert");
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
            .expect("cert")
            .map(|c| c.expect("cert"))
            .collect();
        let key = PrivateKeyDer::from_pem_file(key).expect("key");
        tokio_rustls::TlsAcceptor::from(Arc::new(
            rustls::ServerConfig::builder()
                .with_no_client_auth()
                .with_single_cert(certs, key)
                .expect("TLS config"),
        ))
    });
    let listener = TcpListener::bind(listen).await.expect("bind");
    println!("ready {}", listener.local_addr().expect("addr"));
    let want: Arc<str> = want.into();
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let (want, tls) = (Arc::clone(&want), tls.clone());
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                let resp = answer(&req, &want);
                async move { Ok::<_, Infallible>(resp) }
            });
            let builder = hyper::server::conn::http1::Builder::new();
            match tls {
                None => {
                    let _ = builder.serve_connection(TokioIo::new(tcp), svc).await;
                }
                Some(acceptor) => {
                    if let Ok(stream) = acceptor.accept(tcp).await {
                        let _ = builder.serve_connection(TokioIo::new(stream), svc).await;
                    }
                }
            }
        });
    }
}

/// ECR's answer to a blob GET: a redirect to S3, with no body.
fn answer(req: &Request<Incoming>, want: &str) -> Response<Full<Bytes>> {
    let authorized = req
        .headers()
        .get(http::header::AUTHORIZATION)
        .is_some_and(|v| v.as_bytes() == want.as_bytes());
    let path = req.uri().path();
    let mut resp = Response::new(Full::new(Bytes::new()));
    resp.headers_mut().insert(
        "docker-distribution-api-version",
        http::HeaderValue::from_static("registry/2.0"),
    );
    if !authorized {
        *resp.status_mut() = StatusCode::UNAUTHORIZED;
        resp.headers_mut().insert(
            http::header::WWW_AUTHENTICATE,
            http::HeaderValue::from_static("Basic realm=\"bench\""),
        );
        return resp;
    }
    if path == "/v2/" {
        *resp.body_mut() = Full::new(Bytes::from_static(b"{}"));
        return resp;
    }
    match path.rsplit_once("/blobs/") {
        Some((_, digest)) if req.method() == http::Method::GET => {
            *resp.status_mut() = StatusCode::TEMPORARY_REDIRECT;
            let location = format!(
                "https://prod-us-east-1-starport-layer-bucket.s3.us-east-1.amazonaws.com/bench/{digest}?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Expires=3600&X-Amz-Signature=0"
            );
            if let Ok(v) = http::HeaderValue::from_str(&location) {
                resp.headers_mut().insert(http::header::LOCATION, v);
            }
        }
        _ => *resp.status_mut() = StatusCode::NOT_FOUND,
    }
    resp
}
