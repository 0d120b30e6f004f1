//! The optional mutating admission webhook (`pullthrough webhook`): it rewrites pod images to
//! the same ECR pull-through paths the node mirror uses, so the rewrite is visible in pod specs,
//! and, when asked to, warms ECR's cache for the digest-pinned images of admitted pods.
//!
//! - [`config`]: the `[webhook]` section;
//! - [`mutate`]: the pure decision, `AdmissionReview` in, `AdmissionReview` out;
//! - [`warm`]: the admitted `name:tag@digest` images warmed by tag in the background;
//! - [`tls`]: the server certificate, reloaded when cert-manager renews it;
//! - [`explain`]: `pullthrough rewrite`, the same decision for images named on the command line.
//!
//! This module wires them: HTTPS (rustls, TLS 1.2+) on `webhook.listen` serving `POST /mutate`,
//! and plain HTTP on `webhook.ops_listen` for `/healthz`, `/readyz` and `/metrics`, both through
//! [`crate::server`]'s drain-on-shutdown loop. Without warming the webhook needs no AWS
//! credentials; with it, it needs an identity for the token and the pulls. It never needs
//! Kubernetes API access: the ECR host comes from config, namespace labels are matched by the
//! API server through the `MutatingWebhookConfiguration`'s selectors.

pub mod config;
pub mod explain;
pub mod mutate;
pub mod rewrite;
pub mod tls;
pub mod warm;

use std::collections::BTreeSet;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::CONTENT_TYPE;
use http::{HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry as MetricsRegistry;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::body::{ResponseBody, full, text};
use crate::config::{Config, ConfigError};
use crate::oci::RegistryHost;
use crate::ops::{Ops, Readiness, Ready};
use crate::server::{self, BoxFuture, Handler};
use crate::webhook::mutate::{Decision, Mutation, Policy};
use crate::webhook::rewrite::Rules;
use crate::webhook::tls::{ReloadCounters, ReloadingCert, TlsError};
use crate::webhook::warm::{WarmCounters, WarmQueue, WarmWorkers};

/// Largest request body read. An `AdmissionReview` holds the pod twice (object and oldObject),
/// and etcd stores objects up to 1.5 MiB.
const MAX_BODY: usize = 8 * 1024 * 1024;

/// After the shutdown signal, how long the webhook keeps answering on both listeners while
/// `/readyz` says 503, before it stops accepting and drains. The API server keeps dialing a
/// terminating pod until the endpoints controller and kube-proxy have caught up; closing at once
/// would admit those pods unrewritten (`failurePolicy: Ignore`). The Deployment's
/// `terminationGracePeriodSeconds` covers this plus `timeouts.shutdown`.
pub const DRAIN_DELAY: Duration = Duration::from_secs(5);

/// Why the webhook (or `pullthrough rewrite`) cannot start.
#[derive(Debug, thiserror::Error)]
pub enum WebhookError {
    /// A config value is wrong, including a certificate file that does not load.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The rewritten images must name the ECR registry, and config does not say which.
    #[error(
        "the ECR registry is not known: set ecr.account and a region (ecr.region or AWS_REGION), \
         or ecr.endpoint"
    )]
    NoRegistry,
    /// The TLS configuration was refused.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// Cache warming cannot be set up (the HTTP client for ECR, e.g. `ecr.ca_file`).
    #[error("cache warming: {0}")]
    Warm(String),
}

impl WebhookError {
    /// Whether this is a config problem (exit 64) rather than a run-time failure.
    pub fn is_usage(&self) -> bool {
        matches!(
            self,
            WebhookError::Config(_) | WebhookError::NoRegistry | WebhookError::Warm(_)
        )
    }
}

/// This account's ECR registry host, which rewritten images name: `ecr.endpoint`'s host, else
/// `<ecr.account>.dkr.ecr.<region>.amazonaws.com`. `region` is `ecr.region` or, failing that,
/// the caller's (the environment's). No AWS call: the webhook needs no AWS identity.
pub fn ecr_registry(config: &Config, region: Option<&str>) -> Result<RegistryHost, WebhookError> {
    let region = config.ecr.region.as_deref().or(region);
    let base = config
        .ecr
        .registry_base(region)
        .map_err(|_| WebhookError::NoRegistry)?
        .ok_or(WebhookError::NoRegistry)?;
    // `:443` is dropped as the reference parser drops it, or images already on this registry
    // would not be recognized as such.
    base.authority()
        .and_then(|a| {
            let a = a.as_str();
            RegistryHost::parse(a.strip_suffix(":443").unwrap_or(a))
        })
        .ok_or(WebhookError::NoRegistry)
}

/// The rewrite rules from config (shared by the webhook and `pullthrough rewrite`).
pub fn rules(config: &Config, region: Option<&str>) -> Result<Rules, WebhookError> {
    Ok(Rules {
        ecr: ecr_registry(config, region)?,
        upstreams: config.upstreams.clone(),
        digest_refs: config.webhook.digest_refs,
        exclude: config.webhook.exclude.clone(),
    })
}

/// Labels of an answered admission request.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// `patched`, `unchanged`, `skipped` or `bad-request`.
    pub outcome: String,
    /// Why a request was skipped (`namespace`, `label`, `mirror-pod`, ...), else `-`.
    pub skip: String,
}

/// Labels of one image decision.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ImageLabels {
    /// `rewritten`, or why not (`not-configured`, `digest`, `already-rewritten`, ...).
    pub result: String,
}

/// Labels of a patch.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PatchLabels {
    /// `enforce` or `dry-run`.
    pub mode: String,
}

/// The webhook's metrics, exported under `pullthrough_webhook_*`.
#[derive(Clone, Debug)]
pub struct WebhookMetrics {
    /// Admission requests answered, by outcome.
    pub requests: Family<RequestLabels, Counter>,
    /// Non-empty patches returned, by mode.
    pub patches: Family<PatchLabels, Counter>,
    /// Images looked at, by result.
    pub images: Family<ImageLabels, Counter>,
    /// Time to answer `/mutate`, body read included.
    pub latency: Histogram,
    /// Certificate reloads.
    pub cert: ReloadCounters,
    /// Cache warms offered at admission, by result.
    pub warms: WarmCounters,
}

impl WebhookMetrics {
    /// Builds the metrics and a registry that exports them.
    pub fn new() -> (WebhookMetrics, MetricsRegistry) {
        let m = WebhookMetrics {
            requests: Family::default(),
            patches: Family::default(),
            images: Family::default(),
            latency: Histogram::new(exponential_buckets(0.0001, 2.0, 16)),
            cert: ReloadCounters::default(),
            warms: WarmCounters::default(),
        };
        m.warms.init();
        let mut r = MetricsRegistry::with_prefix("pullthrough_webhook");
        r.register(
            "requests",
            "Admission requests answered",
            m.requests.clone(),
        );
        r.register(
            "patches",
            "Admission responses carrying a patch",
            m.patches.clone(),
        );
        r.register(
            "images",
            "Images looked at, by rewrite result or reason left unchanged",
            m.images.clone(),
        );
        r.register(
            "request_duration_seconds",
            "Time to answer an admission request",
            m.latency.clone(),
        );
        r.register(
            "cert_reloads",
            "Certificate reloads after a file change",
            m.cert.loaded.clone(),
        );
        r.register(
            "cert_not_after_timestamp_seconds",
            "When the certificate in use expires (Unix seconds)",
            m.cert.not_after.clone(),
        );
        r.register(
            "warms",
            "Cache warms of admitted name:tag@digest images: queued, then warmed or failed; \
             dropped when the queue was full",
            m.warms.0.clone(),
        );
        r.register(
            "cert_reload_errors",
            "Changed certificate files that did not load (the previous certificate stayed)",
            m.cert.failed.clone(),
        );
        (m, r)
    }

    fn record(&self, mutation: &Mutation, mode: config::Mode) {
        for img in &mutation.images {
            self.images
                .get_or_create(&ImageLabels {
                    result: img.decision.label().to_owned(),
                })
                .inc();
        }
        let (outcome, skip) = match &mutation.skipped {
            Some(s) => ("skipped", s.label()),
            None if mutation.patch.is_empty() => ("unchanged", "-"),
            None => ("patched", "-"),
        };
        if outcome == "patched" {
            self.patches
                .get_or_create(&PatchLabels {
                    mode: mode.as_str().to_owned(),
                })
                .inc();
        }
        self.requests
            .get_or_create(&RequestLabels {
                outcome: outcome.to_owned(),
                skip: skip.to_owned(),
            })
            .inc();
    }
}

/// The HTTPS handler: `POST /mutate`.
#[derive(Debug, Clone)]
pub struct Webhook {
    policy: Arc<Policy>,
    mode: config::Mode,
    metrics: WebhookMetrics,
    warm: Option<WarmQueue>,
}

impl Webhook {
    /// A handler deciding with `policy`.
    pub fn new(policy: Policy, metrics: WebhookMetrics) -> Self {
        Self {
            mode: policy.mode,
            policy: Arc::new(policy),
            metrics,
            warm: None,
        }
    }

    /// Also offers the admitted pods' `name:tag@digest` images to `queue`.
    pub fn with_warming(mut self, queue: WarmQueue) -> Self {
        self.warm = Some(queue);
        self
    }

    /// Answers one request. Never a 5xx: 200 with a review, or 4xx for what is not one.
    pub async fn handle<B>(&self, req: Request<B>) -> Response<ResponseBody>
    where
        B: hyper::body::Body<Data = Bytes> + Send,
        B::Error: std::error::Error + Send + Sync + 'static,
    {
        let started = Instant::now();
        if req.uri().path() != "/mutate" {
            return text(StatusCode::NOT_FOUND, "not found: POST /mutate\n");
        }
        if req.method() != Method::POST {
            return text(StatusCode::METHOD_NOT_ALLOWED, "POST only\n");
        }
        let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
            Ok(b) => b.to_bytes(),
            Err(e) => {
                let too_big = e
                    .downcast_ref::<http_body_util::LengthLimitError>()
                    .is_some();
                self.bad_request();
                return if too_big {
                    text(StatusCode::PAYLOAD_TOO_LARGE, "body too large\n")
                } else {
                    text(StatusCode::BAD_REQUEST, "could not read the body\n")
                };
            }
        };
        let resp = match mutate::admit(&body, &self.policy) {
            Ok((review, mutation)) => {
                self.metrics.record(&mutation, self.mode);
                log(&review, &mutation);
                // Offered, never awaited: the queue takes it or drops it at once.
                if let Some(queue) = &self.warm
                    && mutation.skipped.is_none()
                    && !mutation.dry_run
                {
                    queue.offer(warm::candidates(
                        &mutation.images,
                        &self.policy.rules.upstreams,
                    ));
                }
                let mut resp = Response::new(full(review.to_string()));
                resp.headers_mut()
                    .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
                resp
            }
            Err(e) => {
                tracing::warn!(error = %e, "refused a request that is not an AdmissionReview");
                self.bad_request();
                text(StatusCode::BAD_REQUEST, format!("{e}\n"))
            }
        };
        self.metrics
            .latency
            .observe(started.elapsed().as_secs_f64());
        resp
    }

    fn bad_request(&self) {
        self.metrics
            .requests
            .get_or_create(&RequestLabels {
                outcome: "bad-request".into(),
                skip: "-".into(),
            })
            .inc();
    }
}

fn log(review: &serde_json::Value, m: &Mutation) {
    let uid = review
        .pointer("/response/uid")
        .and_then(serde_json::Value::as_str)
        .unwrap_or("");
    let rewritten: Vec<String> = m
        .images
        .iter()
        .filter_map(|i| match &i.decision {
            Decision::Rewrite(to) => Some(format!("{} -> {to}", i.image)),
            _ => None,
        })
        .collect();
    match &m.skipped {
        Some(s) => tracing::debug!(uid, skip = s.label(), "admission: skipped"),
        None if rewritten.is_empty() => {
            tracing::debug!(
                uid,
                images = m.images.len(),
                "admission: nothing to rewrite"
            )
        }
        None => tracing::info!(uid, ?rewritten, "admission: patched"),
    }
}

impl Handler for Webhook {
    type Body = ResponseBody;
    fn call(&self, req: Request<Incoming>) -> BoxFuture<Response<ResponseBody>> {
        let w = self.clone();
        Box::pin(async move { w.handle(req).await })
    }
}

/// The webhook's readiness: ready from the start (the certificate was loaded before the
/// listeners were bound, and a failed reload keeps the previous one, so once serving the webhook
/// can always answer), until shutdown begins: then `/readyz` says 503 so the pod leaves the
/// Service's endpoints, while both listeners keep answering for [`DRAIN_DELAY`].
#[derive(Debug, Default)]
pub struct Draining(AtomicBool);

impl Draining {
    /// From now on `/readyz` answers 503.
    pub fn start(&self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

impl Readiness for Draining {
    async fn ready(&self) -> Ready {
        if self.0.load(Ordering::Relaxed) {
            Ready::no("shutting down")
        } else {
            Ready::yes("ready")
        }
    }
}

/// Everything `pullthrough webhook` needs before it binds: validated rules, the loaded
/// certificate and the metrics. Building it is where bad config and bad certificate files fail.
#[derive(Debug)]
pub struct WebhookServer {
    webhook: Webhook,
    warming: Option<Warming>,
    draining: Arc<Draining>,
    metrics_registry: MetricsRegistry,
    cert: Arc<ReloadingCert>,
    grace: Duration,
    limits: crate::server::Limits,
}

impl WebhookServer {
    /// Builds the server from config. `region` stands in for `ecr.region` when that is unset;
    /// `own_namespace` (the pod's, from the downward API) is always skipped, so the webhook
    /// never stands in the way of its own recovery.
    pub fn new(
        config: &Config,
        region: Option<&str>,
        own_namespace: Option<&str>,
    ) -> Result<WebhookServer, WebhookError> {
        let rules = rules(config, region)?;
        let w = &config.webhook;
        let mut skip_namespaces: BTreeSet<String> = w.skip_namespaces.clone();
        skip_namespaces.extend(own_namespace.map(str::to_owned));
        let (metrics, registry) = WebhookMetrics::new();
        let cert = ReloadingCert::new(
            w.cert_file.clone(),
            w.key_file.clone(),
            metrics.cert.clone(),
        )
        .map_err(|e| {
            let (cert_at, key_at) = &w.cert_origin;
            match e {
                TlsError::Key { .. } | TlsError::Mismatch { .. } => key_at.error(e.to_string()),
                TlsError::Read { ref path, .. } if *path == w.key_file.display().to_string() => {
                    key_at.error(e.to_string())
                }
                _ => cert_at.error(e.to_string()),
            }
        })?;
        let policy = Policy {
            rules,
            mode: w.mode,
            skip_namespaces,
            annotation: w.annotation.clone(),
        };
        let mut webhook = Webhook::new(policy, metrics.clone());
        let warming = if w.warm {
            let (queue, workers) = warm::queue(
                w.warm_queue,
                w.warm_workers,
                w.warm_dedupe,
                metrics.warms.clone(),
            );
            webhook = webhook.with_warming(queue);
            Some(Warming::new(config, region, workers)?)
        } else {
            None
        };
        Ok(WebhookServer {
            webhook,
            warming,
            draining: Arc::default(),
            metrics_registry: registry,
            cert: Arc::new(cert),
            grace: config.timeouts.shutdown,
            limits: config.server,
        })
    }

    /// Serves HTTPS on `listener` and ops on `ops` until `shutdown` resolves; then `/readyz`
    /// turns 503 while both keep serving for [`DRAIN_DELAY`], and then both drain for at most
    /// `timeouts.shutdown`. Returns whether the drain finished in time. With warming on, the
    /// warm workers run until then too.
    pub async fn run(
        mut self,
        listener: TcpListener,
        ops: TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<bool, WebhookError> {
        let acceptor =
            tokio_rustls::TlsAcceptor::from(Arc::new(tls::server_config(Arc::clone(&self.cert))?));
        let stop = CancellationToken::new();
        let warm_workers = self.warming.take().map(|w| w.start(stop.clone()));
        let trigger = stop.clone();
        let draining = Arc::clone(&self.draining);
        tokio::spawn(async move {
            shutdown.await;
            draining.start();
            tracing::info!(
                delay = ?DRAIN_DELAY,
                "shutting down: /readyz now 503, still answering until endpoints catch up"
            );
            tokio::time::sleep(DRAIN_DELAY).await;
            trigger.cancel();
        });
        let (https_done, ops_done) = tokio::join!(
            server::serve_tls(
                listener,
                acceptor,
                Arc::new(self.webhook),
                stop.clone().cancelled_owned(),
                self.grace,
                self.limits,
            ),
            server::serve(
                ops,
                Arc::new(Ops::new(self.draining, self.metrics_registry)),
                stop.cancelled_owned(),
                self.grace,
                self.limits,
            ),
        );
        if let Some(workers) = warm_workers {
            let _ = workers.await;
        }
        Ok(https_done && ops_done)
    }
}

/// What warming needs besides the queue: the workers, and what their fetcher is built from.
#[derive(Debug)]
struct Warming {
    workers: WarmWorkers,
    forwarder: crate::mirror::forward::Forwarder,
    base: Option<http::Uri>,
    config: Config,
}

impl Warming {
    /// Checks what can be checked before serving: the HTTP client (`ecr.ca_file`) and the
    /// registry URL.
    fn new(
        config: &Config,
        region: Option<&str>,
        workers: WarmWorkers,
    ) -> Result<Warming, WebhookError> {
        let forwarder =
            crate::mirror::forward::Forwarder::new(&config.timeouts, config.ecr.ca_file.as_deref())
                .map_err(|e| WebhookError::Warm(e.to_string()))?;
        let region = config.ecr.region.as_deref().or(region);
        let base = config
            .ecr
            .registry_base(region)
            .map_err(|_| WebhookError::NoRegistry)?;
        Ok(Warming {
            workers,
            forwarder,
            base,
            config: config.clone(),
        })
    }

    /// Starts the workers in the background: loading the AWS SDK's config may look for a
    /// region or credentials, which must not delay serving. The token comes from
    /// `GetAuthorizationToken` with the webhook's own identity (IRSA or EKS Pod Identity),
    /// fetched on the first warm, so a missing identity fails warms (counted and logged), never
    /// admission.
    fn start(self, stop: CancellationToken) -> tokio::task::JoinHandle<()> {
        use crate::mirror::token::{EcrTokenSource, TokenCache, sdk_config};
        tokio::spawn(async move {
            let sdk = tokio::select! {
                () = stop.cancelled() => return,
                sdk = sdk_config(&self.config) => sdk,
            };
            let tokens = TokenCache::new(
                Arc::new(EcrTokenSource::new(aws_sdk_ecr::Client::new(&sdk))),
                crate::mirror::metrics::Metrics::new().0,
            );
            let fetcher = crate::ecr::warm::Fetcher::new(self.forwarder, tokens, self.base);
            self.workers.run(fetcher, stop).await;
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::webhook::rewrite::{Reason, Rewrite, rewrite_str};
    use rstest::rstest;

    const ECR: &str = "123456789012.dkr.ecr.eu-west-1.amazonaws.com";

    fn config(ecr: &str) -> Config {
        Config::from_toml_str(&format!("[ecr]\n{ecr}\n"), "test.toml").unwrap()
    }

    #[rstest]
    #[case::account_and_region("account = \"123456789012\"\nregion = \"eu-west-1\"", ECR)]
    #[case::endpoint(&format!("endpoint = \"https://{ECR}\""), ECR)]
    #[case::endpoint_default_port(&format!("endpoint = \"https://{ECR}:443\""), ECR)]
    #[case::endpoint_upper_default_port("endpoint = \"https://Reg.Example:443/\"", "reg.example")]
    #[case::endpoint_other_port("endpoint = \"http://127.0.0.1:5000\"", "127.0.0.1:5000")]
    fn the_own_registry(#[case] ecr: &str, #[case] want: &str) {
        let config = config(ecr);
        assert_eq!(ecr_registry(&config, None).unwrap().as_str(), want);
        // An image on it, written with or without :443, is already rewritten.
        let rules = rules(&config, None).unwrap();
        if !want.contains(':') {
            for image in [
                format!("{want}/docker-hub/library/nginx:1"),
                format!("{want}:443/docker-hub/library/nginx:1"),
            ] {
                assert_eq!(
                    rewrite_str(&image, &rules),
                    Rewrite::Unchanged(Reason::AlreadyRewritten),
                    "{image}"
                );
            }
        }
    }
}
