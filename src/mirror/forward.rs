//! Forwarding: the HTTP client towards the ECR endpoint, and the header rules at both edges.
//!
//! The upstream URL is built from configuration (or the token API's `proxyEndpoint`) plus the
//! mapped path; nothing in the request can choose the host. Only an allow-list of request headers
//! goes up, so the client's `Authorization`, `Cookie` and `Proxy-Authorization` never reach ECR,
//! and only an allow-list of response headers comes back. Bodies are never buffered here.

use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use aws_smithy_runtime_api::client::http::{
    HttpClient, HttpConnector as SdkConnectorTrait, HttpConnectorFuture, HttpConnectorSettings,
    SharedHttpConnector,
};
use aws_smithy_runtime_api::client::orchestrator::{HttpRequest, HttpResponse};
use aws_smithy_runtime_api::client::result::ConnectorError;
use aws_smithy_runtime_api::client::runtime_components::RuntimeComponents;
use aws_smithy_types::body::SdkBody;
use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName};
use http::{Method, Request, Response, Uri};
use http_body_util::Empty;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;

use crate::body::BodyError;
use crate::config::timeouts::Timeouts;

/// Request headers forwarded to ECR.
pub const FORWARD_REQUEST_HEADERS: &[HeaderName] = &[
    header::ACCEPT,
    header::RANGE,
    header::IF_NONE_MATCH,
    header::USER_AGENT,
];

/// Response headers returned to the client. `Link` is left out on purpose: it would point at
/// the ECR repository path, which the mirror does not serve.
pub const RETURN_RESPONSE_HEADERS: &[&str] = &[
    "content-type",
    "content-length",
    "docker-content-digest",
    "etag",
    "content-range",
    "accept-ranges",
    "location",
    "oci-filters-applied",
];

/// How much the client reads from an upstream connection at a time, and so the most it holds
/// per connection. Loopback and LAN segments are at most 64 KiB, so larger reads rarely fill;
/// hyper's adaptive default grows to 400 KiB per connection, which made 64 concurrent blob
/// streams hold over 50 MiB (bench/run, fan-out). Streaming costs are in the kernel's copies,
/// not in the number of reads (perf: over 90% of the CPU time of a blob stream is kernel).
pub const UPSTREAM_READ_BUF: usize = 64 * 1024;

/// Failures of the HTTP exchange itself (statuses are not errors here).
#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    /// TLS setup failed at start-up.
    #[error("TLS setup: {0}")]
    Tls(String),
    /// The CA file could not be read or holds no certificate.
    #[error("ecr.ca_file {path}: {message}")]
    CaFile {
        /// The file.
        path: String,
        /// What is wrong.
        message: String,
    },
    /// No connection could be made.
    #[error("connect: {0}")]
    Connect(String),
    /// No response headers within the timeout.
    #[error("no response headers within {0:?}")]
    Timeout(Duration),
    /// Anything else on the wire.
    #[error("{0}")]
    Io(String),
}

/// The client for the ECR endpoint: pooled keep-alive connections, rustls with the ring
/// provider, the system roots plus an optional extra CA.
#[derive(Clone, Debug)]
pub struct Forwarder {
    client: Client<HttpsConnector<HttpConnector>, Empty<Bytes>>,
    response_headers: Duration,
}

impl Forwarder {
    /// Builds the client. Fails on an unreadable CA file.
    pub fn new(timeouts: &Timeouts, ca_file: Option<&Path>) -> Result<Self, ForwardError> {
        let https = https_connector(Arc::new(tls_config(ca_file)?), Some(timeouts.connect));
        let client = Client::builder(TokioExecutor::new())
            .http1_read_buf_exact_size(UPSTREAM_READ_BUF)
            // Below the ~60 s idle timeout of load balancers and NAT gateways on the way, so a
            // pooled connection is never reused just as the path drops it.
            .pool_idle_timeout(Duration::from_secs(50))
            // Without a timer the pool only drops an expired connection when it is next checked
            // out, so after a burst every idle connection stays open for good (bench/soak: 143
            // file descriptors held after 256 concurrent clients left). The timer closes them.
            .pool_timer(hyper_util::rt::TokioTimer::new())
            .build(https);
        Ok(Self {
            client,
            response_headers: timeouts.response_headers,
        })
    }

    /// Sends one request and waits for the response headers, at most the configured timeout.
    /// The body then fails if it stalls for as long.
    pub async fn send(
        &self,
        method: Method,
        uri: Uri,
        headers: HeaderMap,
    ) -> Result<Response<IdleTimeout<Incoming>>, ForwardError> {
        let mut req = Request::new(Empty::new());
        *req.method_mut() = method;
        *req.uri_mut() = uri;
        *req.headers_mut() = headers;
        match tokio::time::timeout(self.response_headers, self.client.request(req)).await {
            Err(_) => Err(ForwardError::Timeout(self.response_headers)),
            Ok(Ok(resp)) => Ok(resp.map(|b| IdleTimeout::new(b, self.response_headers))),
            Ok(Err(e)) if e.is_connect() => Err(ForwardError::Connect(error_chain(&e))),
            Ok(Err(e)) => Err(ForwardError::Io(error_chain(&e))),
        }
    }
}

/// TLS for every client in the process: the system roots plus an optional extra CA, rustls
/// with the ring provider.
fn tls_config(ca_file: Option<&Path>) -> Result<rustls::ClientConfig, ForwardError> {
    let roots = match ca_file {
        // Shared by every client without an extra CA: a parsed system store is ~150 KiB.
        None => system_roots(),
        Some(path) => {
            let mut roots = rustls::RootCertStore::clone(&system_roots());
            let err = |message: String| ForwardError::CaFile {
                path: path.display().to_string(),
                message,
            };
            let pem = std::fs::read(path).map_err(|e| err(e.to_string()))?;
            let mut added = 0;
            for cert in CertificateDer::pem_slice_iter(&pem) {
                let cert = cert.map_err(|e| err(e.to_string()))?;
                roots.add(cert).map_err(|e| err(e.to_string()))?;
                added += 1;
            }
            if added == 0 {
                return Err(err("no PEM certificate in file".into()));
            }
            Arc::new(roots)
        }
    };
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| ForwardError::Tls(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

/// The system's trusted roots, read once per process.
fn system_roots() -> Arc<rustls::RootCertStore> {
    static ROOTS: std::sync::OnceLock<Arc<rustls::RootCertStore>> = std::sync::OnceLock::new();
    ROOTS
        .get_or_init(|| {
            let mut roots = rustls::RootCertStore::empty();
            for cert in rustls_native_certs::load_native_certs().certs {
                // A bad system certificate should not stop the proxy; the others still work.
                let _ = roots.add(cert);
            }
            Arc::new(roots)
        })
        .clone()
}

/// HTTP/1.1 over TCP, or over TLS for `https` URIs.
fn https_connector(
    tls: Arc<rustls::ClientConfig>,
    connect_timeout: Option<Duration>,
) -> HttpsConnector<HttpConnector> {
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_connect_timeout(connect_timeout);
    http.set_nodelay(true);
    hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(Arc::unwrap_or_clone(tls))
        .https_or_http()
        .enable_http1()
        .wrap_connector(http)
}

/// The HTTP client of the AWS SDK (the ECR API, and STS or IMDS for credentials): the same
/// hyper and rustls stack as [`Forwarder`]. The SDK's own client would bring a second hyper
/// stack with HTTP/2, about a megabyte of code mapped on every node for a few calls a day.
#[derive(Clone, Debug)]
pub struct SdkHttpClient {
    tls: Arc<rustls::ClientConfig>,
    /// One pooled client per distinct timeout setting the SDK asks for (IMDS asks for shorter
    /// ones than the ECR API), so connections are reused across calls.
    connectors: Arc<std::sync::Mutex<Vec<(SdkTimeouts, SharedHttpConnector)>>>,
}

type SdkTimeouts = (Option<Duration>, Option<Duration>);

impl SdkHttpClient {
    /// Builds the client with the system roots.
    pub fn new() -> Result<Self, ForwardError> {
        Ok(Self {
            tls: Arc::new(tls_config(None)?),
            connectors: Arc::default(),
        })
    }
}

impl HttpClient for SdkHttpClient {
    fn http_connector(
        &self,
        settings: &HttpConnectorSettings,
        _components: &RuntimeComponents,
    ) -> SharedHttpConnector {
        let key = (settings.connect_timeout(), settings.read_timeout());
        let mut connectors = self
            .connectors
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some((_, c)) = connectors.iter().find(|(k, _)| *k == key) {
            return c.clone();
        }
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(50))
            .pool_timer(hyper_util::rt::TokioTimer::new())
            .build(https_connector(self.tls.clone(), key.0));
        let connector = SharedHttpConnector::new(SdkConnector {
            client,
            read_timeout: key.1,
        });
        connectors.push((key, connector.clone()));
        connector
    }
}

#[derive(Clone, Debug)]
struct SdkConnector {
    client: Client<HttpsConnector<HttpConnector>, SdkBody>,
    read_timeout: Option<Duration>,
}

impl SdkConnectorTrait for SdkConnector {
    fn call(&self, request: HttpRequest) -> HttpConnectorFuture {
        let client = self.client.clone();
        let read_timeout = self.read_timeout;
        HttpConnectorFuture::new(async move {
            let request = request
                .try_into_http1x()
                .map_err(|e| ConnectorError::user(e.into()))?;
            let sent = client.request(request);
            let response = match read_timeout {
                Some(t) => tokio::time::timeout(t, sent)
                    .await
                    .map_err(|e| ConnectorError::timeout(e.into()))?,
                None => sent.await,
            }
            .map_err(|e| {
                if e.is_connect() {
                    ConnectorError::io(e.into())
                } else {
                    ConnectorError::other(e.into(), None)
                }
            })?;
            HttpResponse::try_from(response.map(SdkBody::from_body_1_x))
                .map_err(|e| ConnectorError::other(e.into(), None))
        })
    }
}

/// An upstream body that fails when no frame arrives for `idle`: a registry that stalls
/// mid-blob must not hang the pull, since containerd puts no deadline on a body read. The
/// error aborts the client connection, so containerd retries or falls back.
pub struct IdleTimeout<B> {
    inner: B,
    idle: Duration,
    timer: Pin<Box<tokio::time::Sleep>>,
}

impl<B> IdleTimeout<B> {
    /// Wraps `inner`.
    pub fn new(inner: B, idle: Duration) -> Self {
        Self {
            inner,
            idle,
            timer: Box::pin(tokio::time::sleep(idle)),
        }
    }
}

/// The error an [`IdleTimeout`] body ends with.
#[derive(Debug, thiserror::Error)]
#[error("the ECR endpoint sent nothing for {0:?} in the middle of a body")]
pub struct BodyStalled(pub Duration);

impl<B> Body for IdleTimeout<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BodyError>,
{
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(frame) => {
                let deadline = tokio::time::Instant::now() + this.idle;
                this.timer.as_mut().reset(deadline);
                Poll::Ready(frame.map(|f| f.map_err(Into::into)))
            }
            Poll::Pending => match this.timer.as_mut().poll(cx) {
                Poll::Ready(()) => Poll::Ready(Some(Err(Box::new(BodyStalled(this.idle))))),
                Poll::Pending => Poll::Pending,
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// `base` (scheme + authority from config) joined with a mapped path. `None` unless the path is
/// absolute: `*` (the asterisk form) or an empty path would make a request that is not for a
/// registry path on `base` (found by the property tests).
pub fn upstream_uri(base: &Uri, path_and_query: &str) -> Option<Uri> {
    if !path_and_query.starts_with('/') {
        return None;
    }
    Uri::builder()
        .scheme(base.scheme_str()?)
        .authority(base.authority()?.as_str())
        .path_and_query(path_and_query)
        .build()
        .ok()
}

/// The headers to send up: the allow-list only.
pub fn request_headers(client: &HeaderMap) -> HeaderMap {
    let mut out = HeaderMap::new();
    for name in FORWARD_REQUEST_HEADERS {
        for v in client.get_all(name) {
            out.append(name.clone(), v.clone());
        }
    }
    out
}

/// The headers to send back: the allow-list only.
pub fn response_headers(upstream: &HeaderMap) -> HeaderMap {
    let mut out = HeaderMap::new();
    for name in RETURN_RESPONSE_HEADERS {
        for v in upstream.get_all(*name) {
            out.append(HeaderName::from_static(name), v.clone());
        }
    }
    out
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;
    use rstest::rstest;

    #[rstest]
    #[case::accept("accept", true)]
    #[case::range("range", true)]
    #[case::if_none_match("if-none-match", true)]
    #[case::user_agent("user-agent", true)]
    #[case::authorization("authorization", false)]
    #[case::cookie("cookie", false)]
    #[case::proxy_authorization("proxy-authorization", false)]
    #[case::host("host", false)]
    #[case::forwarded("x-forwarded-for", false)]
    fn request_header_allow_list(#[case] name: &str, #[case] forwarded: bool) {
        let mut h = HeaderMap::new();
        h.insert(
            HeaderName::from_bytes(name.as_bytes()).unwrap(),
            HeaderValue::from_static("v"),
        );
        assert_eq!(request_headers(&h).contains_key(name), forwarded);
    }

    #[test]
    fn repeated_accept_headers_all_go_up() {
        let mut h = HeaderMap::new();
        h.append(
            header::ACCEPT,
            HeaderValue::from_static("application/vnd.oci.image.index.v1+json"),
        );
        h.append(header::ACCEPT, HeaderValue::from_static("*/*"));
        assert_eq!(
            request_headers(&h).get_all(header::ACCEPT).iter().count(),
            2
        );
    }

    #[rstest]
    #[case::digest("docker-content-digest", true)]
    #[case::location("location", true)]
    #[case::content_range("content-range", true)]
    #[case::set_cookie("set-cookie", false)]
    #[case::www_authenticate("www-authenticate", false)]
    #[case::link("link", false)]
    #[case::server("server", false)]
    fn response_header_allow_list(#[case] name: &str, #[case] returned: bool) {
        let mut h = HeaderMap::new();
        h.insert(
            HeaderName::from_bytes(name.as_bytes()).unwrap(),
            HeaderValue::from_static("v"),
        );
        assert_eq!(response_headers(&h).contains_key(name), returned);
    }

    #[rstest]
    #[case::http(
        "http://127.0.0.1:5000/",
        "/v2/a/manifests/1",
        "http://127.0.0.1:5000/v2/a/manifests/1"
    )]
    #[case::https(
        "https://1.dkr.ecr.eu-west-1.amazonaws.com/",
        "/v2/a/tags/list?n=1",
        "https://1.dkr.ecr.eu-west-1.amazonaws.com/v2/a/tags/list?n=1"
    )]
    fn joins_base_and_path(#[case] base: &str, #[case] path: &str, #[case] want: &str) {
        let base: Uri = base.parse().unwrap();
        assert_eq!(upstream_uri(&base, path).unwrap().to_string(), want);
    }

    #[rstest]
    #[case::asterisk_form("*")]
    #[case::empty("")]
    #[case::relative("v2/a/manifests/1")]
    #[case::authority_like("@evil.example/v2/")]
    fn refuses_a_path_that_is_not_absolute(#[case] path: &str) {
        let base: Uri = "https://1.dkr.ecr.eu-west-1.amazonaws.com/"
            .parse()
            .unwrap();
        assert_eq!(upstream_uri(&base, path), None);
    }
}
