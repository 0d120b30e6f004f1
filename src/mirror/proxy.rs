//! The mirror service: route → map → sign → forward → respond, for one request.
//!
//! [`Proxy::handle`] never fails: every error becomes a response in [`super::respond`], and every
//! response is wrapped in the access log. Manifests are read whole (they are small and bounded)
//! so that they can be verified, cached and answered to HEAD with their true size; blobs, tag
//! lists and referrers stream straight through.

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http::header::{CONTENT_LENGTH, CONTENT_TYPE, HeaderMap};
use http::{HeaderValue, Method, Request, Response, StatusCode, Uri};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;

use super::accesslog::{Entry, LoggedBody};
use super::breaker::Breaker;
use super::cache::{CachedManifest, ManifestCache, TagCache, accept_key};
use super::coalesce::{Flight, SingleFlight};
use super::forward::{self, ForwardError, Forwarder, IdleTimeout};
use super::map::{self, Target};
use super::metrics::{Metrics, RegistryLabels, UpstreamLabels};
use super::respond::{Missing, ProxyError};
use super::route::{self, ApiRequest, Kind, ManifestRef, Route};
use super::token::{TOKEN_WAIT, Token, TokenCache};
use crate::body::{ResponseBody, empty, full};
use crate::config::Config;
use crate::oci::{API_VERSION, API_VERSION_HEADER, Digest};

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
    /// What tags resolved to, for `manifest_cache.tag_ttl`.
    tags: TagCache,
    /// Manifest GETs to ECR in flight, shared by identical concurrent requests.
    flights: SingleFlight<FlightKey, Result<Fetched, ProxyError>>,
    /// Repositories whose digest miss was logged within the last [`DIGEST_MISS_LOG_EVERY`].
    digest_miss_logged: moka::future::Cache<String, ()>,
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
        let manifests = ManifestCache::new(config.manifest_cache.max_bytes);
        let tags = TagCache::new(config.manifest_cache.tag_ttl);
        let breaker = Breaker::new(config.breaker, forwarder.clone(), metrics.clone());
        Self {
            inner: Arc::new(Inner {
                config,
                tokens,
                forwarder,
                base,
                manifests,
                metrics,
                breaker,
                tags,
                flights: SingleFlight::default(),
                digest_miss_logged: moka::future::Cache::builder()
                    .max_capacity(DIGEST_MISS_LOG_REPOSITORIES)
                    .time_to_live(DIGEST_MISS_LOG_EVERY)
                    .build(),
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
            let token = self.inner.tokens.get_within(TOKEN_WAIT).await?;
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

    /// Manifests: from the cache by digest (or by a tag resolved within `tag_ttl`), else a GET
    /// from ECR, one for all concurrent identical requests. A GET also for HEAD: it is not certain
    /// that a HEAD makes ECR import an uncached image, and a GET gives the true size and digest.
    async fn manifest(
        &self,
        api: &ApiRequest,
        target: &Target,
        reference: &ManifestRef,
        head: bool,
        client_headers: &HeaderMap,
    ) -> Result<Served, ProxyError> {
        let inner = &self.inner;
        let known = match reference {
            ManifestRef::Digest(d) => Some(d.as_str().to_owned()),
            ManifestRef::Tag(t) => inner.tags.get(&target.repository, t, client_headers).await,
        };
        if let Some(d) = known
            && let Some(m) = inner
                .manifests
                .get(&target.repository, &d, client_headers)
                .await
        {
            inner.metrics.manifest_cache_hits.inc();
            if matches!(reference, ManifestRef::Tag(_)) {
                inner.metrics.manifest_tag_hits.inc();
            }
            return Ok(Served {
                response: manifest_response(StatusCode::OK, &m, None, head),
                upstream_path: target.path_and_query.clone(),
                cache: "hit",
                from_upstream: false,
            });
        }
        inner.metrics.manifest_cache_misses.inc();
        let key = FlightKey {
            path_and_query: target.path_and_query.clone(),
            accept: accept_key(client_headers),
            if_none_match: client_headers
                .get(http::header::IF_NONE_MATCH)
                .map(|v| v.as_bytes().to_vec()),
        };
        let (fetched, flight) = inner
            .flights
            .run(key, || {
                self.fetch_manifest(api, target, reference, client_headers)
            })
            .await;
        let cache = match flight {
            Flight::Led => "miss",
            Flight::Joined => {
                inner.metrics.manifest_coalesced.inc();
                "shared"
            }
        };
        let response = match fetched {
            Ok(Fetched::Manifest { manifest, etag }) => {
                manifest_response(StatusCode::OK, &manifest, etag.as_ref(), head)
            }
            Ok(Fetched::HeadersOnly { status, headers }) => {
                let mut response = Response::new(empty());
                *response.status_mut() = status;
                *response.headers_mut() = headers;
                response
            }
            Err(e) => {
                if let ManifestRef::Digest(d) = reference
                    && matches!(e, ProxyError::Status { status, .. } if status == StatusCode::NOT_FOUND)
                {
                    self.digest_miss(api, d.as_str()).await;
                }
                return Err(e);
            }
        };
        Ok(Served {
            response,
            upstream_path: target.path_and_query.clone(),
            cache,
            from_upstream: true,
        })
    }

    /// One manifest GET from ECR: read whole, verified against the digest asked for and the one
    /// ECR states, and cached when it matched (by digest, and what its tag resolved to).
    async fn fetch_manifest(
        &self,
        api: &ApiRequest,
        target: &Target,
        reference: &ManifestRef,
        client_headers: &HeaderMap,
    ) -> Result<Fetched, ProxyError> {
        let wanted = match reference {
            ManifestRef::Digest(d) => Some(d),
            ManifestRef::Tag(_) => None,
        };
        let resp = self
            .send_signed(api, Method::GET, target, client_headers)
            .await?;
        check_status(resp.status(), Missing::Manifest)?;
        let (parts, body) = resp.into_parts();
        if parts.status != StatusCode::OK {
            // 304 and redirects: headers only, as ECR sent them.
            let mut headers = forward::response_headers(&parts.headers);
            // The body is not relayed, so its length must not be announced.
            headers.remove(CONTENT_LENGTH);
            add_api_version(&mut headers);
            return Ok(Fetched::HeadersOnly {
                status: parts.status,
                headers,
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
        let computed = Digest::sha256_of(&body);
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
        let manifest = CachedManifest {
            body,
            media_type,
            digest: header_digest.unwrap_or_else(|| computed.clone()),
        };
        if verified {
            self.inner
                .manifests
                .insert(&target.repository, manifest.clone())
                .await;
            if let ManifestRef::Tag(t) = reference {
                self.inner
                    .tags
                    .insert(&target.repository, t, client_headers, &manifest.digest)
                    .await;
            }
        }
        Ok(Fetched::Manifest {
            manifest,
            etag: parts.headers.get(http::header::ETAG).cloned(),
        })
    }
}

/// What identifies one manifest GET to ECR: the same path, asked for with the same `Accept`
/// (and the same condition), gets the same answer.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct FlightKey {
    path_and_query: String,
    accept: String,
    if_none_match: Option<Vec<u8>>,
}

/// A manifest GET's answer, shared by every request that waited for it.
#[derive(Debug, Clone)]
enum Fetched {
    /// A whole manifest.
    Manifest {
        manifest: CachedManifest,
        etag: Option<HeaderValue>,
    },
    /// A 304 or a redirect: headers only, as ECR sent them.
    HeadersOnly {
        status: StatusCode,
        headers: HeaderMap,
    },
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

impl crate::server::Handler for Proxy {
    type Body = LoggedBody;
    fn call(&self, req: Request<Incoming>) -> crate::server::BoxFuture<Response<LoggedBody>> {
        let proxy = self.clone();
        Box::pin(async move { proxy.handle(req).await })
    }
}
