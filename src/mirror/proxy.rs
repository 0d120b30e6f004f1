//! The mirror service: route → map → sign → forward → respond, for one request.
//!
//! [`Proxy::handle`] never fails: every error becomes a response in [`super::respond`], and every
//! response is wrapped in the access log. Manifests are read whole (they are small and bounded)
//! so that they can be verified, cached and answered to HEAD with their true size; blobs, tag
//! lists and referrers stream straight through. On Linux a blob GET to a plain-HTTP endpoint is
//! spliced ([`super::splice`]): its bytes go from socket to socket without entering user space.

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http::header::{CONTENT_LENGTH, CONTENT_TYPE, HeaderMap};
use http::{HeaderValue, Method, Request, Response, StatusCode, Uri};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use sha2::{Digest as _, Sha256};

use super::accesslog::{Entry, LoggedBody};
use super::breaker::Breaker;
use super::cache::{CachedManifest, ManifestCache};
use super::forward::{self, ForwardError, Forwarder, IdleTimeout};
use super::map::{self, Target};
use super::metrics::{Metrics, RegistryLabels, UpstreamLabels};
use super::respond::{Missing, ProxyError};
use super::route::{self, ApiRequest, Kind, ManifestRef, Route};
use super::token::{Token, TokenCache};
use crate::body::{ResponseBody, empty, full};
use crate::config::Config;
use crate::oci::{API_VERSION, API_VERSION_HEADER};

/// Largest manifest accepted from ECR; registries (ECR included) refuse larger ones on push.
pub const MAX_MANIFEST_BYTES: usize = 4 * 1024 * 1024;

/// The mirror. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Proxy {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    config: Arc<Config>,
    tokens: TokenCache,
    forwarder: Forwarder,
    /// The registry URL when config fixes it (endpoint, or account + region); otherwise the
    /// token's `proxyEndpoint` is used.
    base: Option<Uri>,
    manifests: ManifestCache,
    metrics: Metrics,
    /// Fails fast while the endpoint refuses or hangs.
    breaker: Breaker,
    /// Repositories whose digest miss was logged within the last [`DIGEST_MISS_LOG_EVERY`].
    digest_miss_logged: moka::future::Cache<String, ()>,
    /// Blob GETs to a plain-HTTP endpoint, spliced.
    #[cfg(target_os = "linux")]
    splicer: super::splice::Client,
}

/// A successful answer, before logging.
struct Served {
    response: Response<ResponseBody>,
    upstream_path: String,
    cache: &'static str,
    from_upstream: bool,
}

impl Proxy {
    /// Builds the mirror. `base` is the fixed ECR registry URL, if config determines one.
    pub fn new(
        config: Arc<Config>,
        tokens: TokenCache,
        forwarder: Forwarder,
        base: Option<Uri>,
        metrics: Metrics,
    ) -> Self {
        let manifests = ManifestCache::new(config.manifest_cache_bytes);
        let breaker = Breaker::new(config.breaker, forwarder.clone(), metrics.clone());
        #[cfg(target_os = "linux")]
        let splicer =
            super::splice::Client::new(config.timeouts.connect, config.timeouts.response_headers);
        Self {
            inner: Arc::new(Inner {
                config,
                tokens,
                forwarder,
                base,
                manifests,
                metrics,
                breaker,
                digest_miss_logged: moka::future::Cache::builder()
                    .max_capacity(DIGEST_MISS_LOG_REPOSITORIES)
                    .time_to_live(DIGEST_MISS_LOG_EVERY)
                    .build(),
                #[cfg(target_os = "linux")]
                splicer,
            }),
        }
    }

    /// Answers one request.
    pub async fn handle<B>(&self, req: Request<B>) -> Response<LoggedBody> {
        let start = Instant::now();
        let head = req.method() == Method::HEAD;
        let mut entry = Entry {
            method: req.method().to_string(),
            registry: "-".into(),
            kind: "other",
            upstream_path: "-".into(),
            status: 0,
            cache: "-",
            from_upstream: false,
            start,
        };
        let result = self.serve(&req, &mut entry).await;
        let response = match result {
            Ok(s) => {
                entry.upstream_path = s.upstream_path;
                entry.cache = s.cache;
                entry.from_upstream = s.from_upstream;
                s.response
            }
            Err(e) => e.into_response(head),
        };
        entry.status = response.status().as_u16();
        let metrics = self.inner.metrics.clone();
        response.map(|b| LoggedBody::new(b, entry, metrics))
    }

    async fn serve<B>(&self, req: &Request<B>, entry: &mut Entry) -> Result<Served, ProxyError> {
        let cfg = &self.inner.config;
        let route = route::route(
            req.method(),
            req.uri().path(),
            req.uri().query(),
            &cfg.upstreams,
            cfg.default_upstream.as_ref(),
        )?;
        let api = match route {
            Route::Root => {
                entry.kind = "root";
                return Ok(Served {
                    response: root_response(),
                    upstream_path: "-".into(),
                    cache: "-",
                    from_upstream: false,
                });
            }
            Route::Api(api) => api,
        };
        entry.registry = api.registry.to_string();
        entry.kind = api.kind.label();
        let upstream = cfg
            .upstreams
            .get(&api.registry)
            .ok_or_else(|| ProxyError::Internal("routed to an unconfigured registry".into()))?;
        let target = map::map(&api, upstream)?;
        entry.upstream_path = target.path_and_query.clone();
        let head = req.method() == Method::HEAD;
        match &api.kind {
            Kind::Manifest(reference) => {
                self.manifest(&api, &target, reference, head, req.headers())
                    .await
            }
            Kind::Blob(_) if !head => {
                #[cfg(target_os = "linux")]
                if let Some(slot) = req.extensions().get::<super::splice::Slot>()
                    && let Some(served) = self.splice(&api, &target, req.headers(), slot).await?
                {
                    return Ok(served);
                }
                self.stream(&api, &target, head, req.headers()).await
            }
            _ => self.stream(&api, &target, head, req.headers()).await,
        }
    }

    /// Sends a signed request through hyper's client.
    async fn send_signed(
        &self,
        api: &ApiRequest,
        method: Method,
        target: &Target,
        client_headers: &HeaderMap,
    ) -> Result<Response<IdleTimeout<Incoming>>, ProxyError> {
        self.exchange_signed(
            api,
            target,
            client_headers,
            Response::status,
            |uri, headers| self.inner.forwarder.send(method.clone(), uri, headers),
        )
        .await
    }

    /// One exchange with the endpoint through `send`: the current token's `Authorization` on the
    /// allowed client headers, the breaker, the latency metric. On a 401 the token is dropped and
    /// the exchange made once more with a fresh one.
    async fn exchange_signed<T, Fut>(
        &self,
        api: &ApiRequest,
        target: &Target,
        client_headers: &HeaderMap,
        status: impl Fn(&T) -> StatusCode,
        send: impl Fn(Uri, HeaderMap) -> Fut,
    ) -> Result<T, ProxyError>
    where
        Fut: Future<Output = Result<T, ForwardError>>,
    {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let token = self.inner.tokens.get().await?;
            let base = self.base(&token)?;
            let uri = forward::upstream_uri(&base, &target.path_and_query)
                .ok_or_else(|| ProxyError::Internal("cannot build upstream URI".into()))?;
            let mut headers = forward::request_headers(client_headers);
            headers.insert(http::header::AUTHORIZATION, token.authorization());
            self.inner.breaker.admit()?;
            let t0 = Instant::now();
            let answer = self.exchanged(api, &base, t0, send(uri, headers).await)?;
            if status(&answer) == StatusCode::UNAUTHORIZED
                && attempt == 1
                && self.inner.tokens.refused(&token).await
            {
                tracing::info!("ECR refused the token; retrying once with a new one");
                continue;
            }
            return Ok(answer);
        }
    }

    /// Records the outcome of one exchange with the endpoint: the breaker and the latency
    /// metric, and the error to answer with.
    fn exchanged<T>(
        &self,
        api: &ApiRequest,
        base: &Uri,
        t0: Instant,
        result: Result<T, ForwardError>,
    ) -> Result<T, ProxyError> {
        match result {
            Ok(resp) => {
                self.inner.breaker.success();
                self.inner
                    .metrics
                    .upstream_latency
                    .get_or_create(&UpstreamLabels {
                        registry: api.registry.to_string(),
                        kind: api.kind.label().to_owned(),
                    })
                    .observe(t0.elapsed().as_secs_f64());
                Ok(resp)
            }
            Err(e) => {
                // Only a refused or hung endpoint opens the breaker: both would cost every
                // following request of the pull the same wait. Other failures are per request.
                if matches!(e, ForwardError::Timeout(_) | ForwardError::Connect(_)) {
                    self.inner.breaker.failure(base, &e.to_string());
                }
                Err(match e {
                    ForwardError::Timeout(d) => ProxyError::Timeout(d),
                    ForwardError::Connect(m) => ProxyError::Connect(m),
                    other => ProxyError::UpstreamIo(other.to_string()),
                })
            }
        }
    }

    /// A blob GET to a plain-HTTP endpoint, with the body spliced ([`super::splice`]), and the
    /// same one retry with a fresh token after a 401 as [`Proxy::send_signed`]. `None` when this
    /// one cannot be: a TLS endpoint, or an answer that only hyper's path relays (a redirect, a
    /// body without a length), which then goes through [`Proxy::stream`] as a new request.
    #[cfg(target_os = "linux")]
    async fn splice(
        &self,
        api: &ApiRequest,
        target: &Target,
        client_headers: &HeaderMap,
        slot: &super::splice::Slot,
    ) -> Result<Option<Served>, ProxyError> {
        // A TLS endpoint cannot be spliced: TLS must see every byte.
        let token = self.inner.tokens.get().await?;
        if self.base(&token)?.scheme() != Some(&http::uri::Scheme::HTTP) {
            return Ok(None);
        }
        let splicer = &self.inner.splicer;
        let answer = self
            .exchange_signed(
                api,
                target,
                client_headers,
                |a: &super::splice::Answer| a.status,
                |uri, headers| async move { splicer.get(&uri, &headers).await },
            )
            .await?;
        let status = answer.status;
        if !answer.spliceable() {
            // An error ends here as it would on hyper's path.
            if !status.is_redirection() {
                check_status(status, Missing::Blob)?;
            }
            return Ok(None);
        }
        let mut headers = forward::response_headers(&answer.headers);
        add_api_version(&mut headers);
        let Some(body) = answer.into_body(
            &self.inner.splicer,
            slot.clone(),
            self.inner.config.timeouts.response_headers,
            self.inner.metrics.spliced_bytes.clone(),
        ) else {
            return Ok(None);
        };
        let mut response = Response::new(body.boxed());
        *response.status_mut() = status;
        *response.headers_mut() = headers;
        Ok(Some(Served {
            response,
            upstream_path: target.path_and_query.clone(),
            cache: "-",
            from_upstream: true,
        }))
    }

    fn base(&self, token: &Token) -> Result<Uri, ProxyError> {
        self.inner
            .base
            .clone()
            .or_else(|| token.proxy_endpoint.clone())
            .ok_or(ProxyError::NoEndpoint)
    }

    /// Blobs, tag lists and referrers: stream the body through untouched.
    async fn stream(
        &self,
        api: &ApiRequest,
        target: &Target,
        head: bool,
        client_headers: &HeaderMap,
    ) -> Result<Served, ProxyError> {
        let method = if head { Method::HEAD } else { Method::GET };
        let resp = self
            .send_signed(api, method, target, client_headers)
            .await?;
        let missing = match api.kind {
            Kind::Blob(_) => Missing::Blob,
            _ => Missing::Repository,
        };
        check_status(resp.status(), missing)?;
        let (parts, body) = resp.into_parts();
        let body = if head { empty() } else { body.boxed() };
        let mut response = Response::new(body);
        *response.status_mut() = parts.status;
        *response.headers_mut() = forward::response_headers(&parts.headers);
        add_api_version(response.headers_mut());
        Ok(Served {
            response,
            upstream_path: target.path_and_query.clone(),
            cache: "-",
            from_upstream: true,
        })
    }

    /// Manifests: from the cache by digest, else a GET from ECR (also for HEAD: it is not certain
    /// that a HEAD makes ECR import an uncached image, and a GET gives the true size and digest).
    async fn manifest(
        &self,
        api: &ApiRequest,
        target: &Target,
        reference: &ManifestRef,
        head: bool,
        client_headers: &HeaderMap,
    ) -> Result<Served, ProxyError> {
        let wanted = match reference {
            ManifestRef::Digest(d) => Some(d),
            ManifestRef::Tag(_) => None,
        };
        if let Some(d) = wanted
            && let Some(m) = self
                .inner
                .manifests
                .get(&target.repository, d.as_str(), client_headers)
                .await
        {
            self.inner.metrics.manifest_cache_hits.inc();
            return Ok(Served {
                response: manifest_response(StatusCode::OK, &m, None, head),
                upstream_path: target.path_and_query.clone(),
                cache: "hit",
                from_upstream: false,
            });
        }
        self.inner.metrics.manifest_cache_misses.inc();
        let resp = self
            .send_signed(api, Method::GET, target, client_headers)
            .await?;
        if let Some(d) = wanted
            && resp.status() == StatusCode::NOT_FOUND
        {
            self.digest_miss(api, d.as_str()).await;
        }
        check_status(resp.status(), Missing::Manifest)?;
        let (parts, body) = resp.into_parts();
        if parts.status != StatusCode::OK {
            // 304 and redirects: headers only, as ECR sent them.
            let mut response = Response::new(empty());
            *response.status_mut() = parts.status;
            *response.headers_mut() = forward::response_headers(&parts.headers);
            // The body is not relayed, so its length must not be announced.
            response.headers_mut().remove(CONTENT_LENGTH);
            add_api_version(response.headers_mut());
            return Ok(Served {
                response,
                upstream_path: target.path_and_query.clone(),
                cache: "miss",
                from_upstream: true,
            });
        }
        let body = Limited::new(body, MAX_MANIFEST_BYTES)
            .collect()
            .await
            .map_err(|e| {
                if e.is::<http_body_util::LengthLimitError>() {
                    ProxyError::ManifestTooLarge(MAX_MANIFEST_BYTES)
                } else {
                    ProxyError::UpstreamIo(e.to_string())
                }
            })?
            .to_bytes();
        let computed = format!("sha256:{}", hex(&Sha256::digest(&body)));
        if let Some(d) = wanted
            && d.sha256_hex().is_some()
            && d.as_str() != computed
        {
            return Err(ProxyError::DigestMismatch {
                want: d.as_str().to_owned(),
                got: computed,
            });
        }
        let header_digest = parts
            .headers
            .get("docker-content-digest")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let media_type = parts
            .headers
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("application/vnd.oci.image.manifest.v1+json")
            .to_owned();
        // A sha256 digest header that is not the body's sha256 would make containerd fail the
        // pull instead of falling back: refuse it. Other algorithms pass, uncached.
        if let Some(h) = header_digest.as_deref()
            && h.starts_with("sha256:")
            && h != computed
        {
            return Err(ProxyError::DigestMismatch {
                want: h.to_owned(),
                got: computed,
            });
        }
        let verified = header_digest.as_deref().is_none_or(|h| h == computed);
        let m = CachedManifest {
            body,
            media_type,
            digest: header_digest.unwrap_or_else(|| computed.clone()),
        };
        if verified {
            self.inner
                .manifests
                .insert(&target.repository, m.clone())
                .await;
        }
        Ok(Served {
            response: manifest_response(
                StatusCode::OK,
                &m,
                parts.headers.get(http::header::ETAG),
                head,
            ),
            upstream_path: target.path_and_query.clone(),
            cache: "miss",
            from_upstream: true,
        })
    }
}

impl Proxy {
    /// ECR did not have a manifest asked for by digest. Its pull-through cache imports an image
    /// only when it is pulled by tag, so containerd now pulls this one from the upstream registry,
    /// and will every time until something pulls it by tag. Counted, and logged once per
    /// repository per [`DIGEST_MISS_LOG_EVERY`], so an operator can list what to warm.
    async fn digest_miss(&self, api: &ApiRequest, digest: &str) {
        let registry = api.registry.to_string();
        self.inner
            .metrics
            .digest_misses
            .get_or_create(&RegistryLabels {
                registry: registry.clone(),
            })
            .inc();
        let key = format!("{registry}/{}", api.name);
        let first = self
            .inner
            .digest_miss_logged
            .entry(key)
            .or_insert(())
            .await
            .is_fresh();
        if first {
            tracing::info!(
                registry,
                repository = %api.name,
                digest,
                "pinned by digest and not in ECR's pull-through cache (it imports by tag only): \
                 pulled from the upstream registry; warm it by tag (`pullthrough ecr warm --from-pods`)"
            );
        }
    }
}

/// How often a repository's digest misses are logged (each is counted).
pub const DIGEST_MISS_LOG_EVERY: std::time::Duration = std::time::Duration::from_secs(3600);
/// How many repositories the digest-miss log remembers; beyond that, the oldest may log again
/// within the hour, which only costs a log line.
const DIGEST_MISS_LOG_REPOSITORIES: u64 = 10_000;

/// Maps an error status from ECR; success and redirect statuses pass.
fn check_status(status: StatusCode, missing: Missing) -> Result<(), ProxyError> {
    if status.is_success() || status.is_redirection() {
        return Ok(());
    }
    Err(ProxyError::Status { status, missing })
}

fn manifest_response(
    status: StatusCode,
    m: &CachedManifest,
    etag: Option<&HeaderValue>,
    head: bool,
) -> Response<ResponseBody> {
    let mut resp = Response::new(if head { empty() } else { full(m.body.clone()) });
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    if let Ok(v) = HeaderValue::from_str(&m.media_type) {
        h.insert(CONTENT_TYPE, v);
    }
    // The true length even for HEAD: containerd rejects a manifest of size 0.
    h.insert(CONTENT_LENGTH, HeaderValue::from(m.body.len()));
    if let Ok(v) = HeaderValue::from_str(&m.digest) {
        h.insert("docker-content-digest", v);
    }
    if let Some(e) = etag {
        h.insert(http::header::ETAG, e.clone());
    }
    add_api_version(h);
    resp
}

fn root_response() -> Response<ResponseBody> {
    let mut resp = Response::new(full(Bytes::from_static(b"{}")));
    let h = resp.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    add_api_version(h);
    resp
}

fn add_api_version(h: &mut HeaderMap) {
    h.insert(API_VERSION_HEADER, HeaderValue::from_static(API_VERSION));
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

impl crate::server::Handler for Proxy {
    type Body = LoggedBody;
    fn call(&self, req: Request<Incoming>) -> crate::server::BoxFuture<Response<LoggedBody>> {
        let proxy = self.clone();
        Box::pin(async move { proxy.handle(req).await })
    }
}
