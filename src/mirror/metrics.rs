//! Prometheus metrics. One [`Metrics`] value is built at start-up, registered in a
//! [`Registry`] that the ops listener encodes, and cloned into the parts that count things;
//! there are no global statics, so tests get a fresh set each.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;

/// Labels of a served request.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// Canonical upstream registry, or `-` when none was chosen.
    pub registry: String,
    /// `manifest`, `blob`, `tags`, `referrers`, `root` or `other`.
    pub kind: String,
    /// HTTP status sent to the client.
    pub code: u16,
}

/// Labels of an upstream (ECR) exchange.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct UpstreamLabels {
    /// Canonical upstream registry.
    pub registry: String,
    /// Request kind, as in [`RequestLabels`].
    pub kind: String,
}

/// Labels of a count kept per upstream registry.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RegistryLabels {
    /// Canonical upstream registry.
    pub registry: String,
}

/// Every metric pullthrough exports. Clones share the same counters.
#[derive(Clone, Debug)]
pub struct Metrics {
    /// Requests answered, by registry, kind and status.
    pub requests: Family<RequestLabels, Counter>,
    /// Time from sending a request to ECR to its response headers.
    pub upstream_latency: Family<UpstreamLabels, Histogram>,
    /// Body bytes streamed from ECR to clients.
    pub upstream_bytes: Family<UpstreamLabels, Counter>,
    /// `GetAuthorizationToken` calls.
    pub token_fetches: Counter,
    /// Failed `GetAuthorizationToken` calls.
    pub token_errors: Counter,
    /// Seconds the cached token may still be used (set at scrape time).
    pub token_seconds_left: Gauge<f64, AtomicU64>,
    /// Manifests served from the local cache.
    pub manifest_cache_hits: Counter,
    /// Manifest requests that had to go to ECR.
    pub manifest_cache_misses: Counter,
    /// Of the cache hits, requests by tag answered from what the tag resolved to lately.
    pub manifest_tag_hits: Counter,
    /// Of the misses, requests that shared another request's GET from ECR.
    pub manifest_coalesced: Counter,
    /// Manifest requests by digest that ECR did not have: ECR's pull-through cache imports by
    /// tag only, so these are pulled from the upstream registry instead.
    pub digest_misses: Family<RegistryLabels, Counter>,
    /// 1 while the circuit breaker towards the ECR endpoint is open ([`super::breaker`]).
    pub breaker_open: Gauge,
    /// Requests answered 503 at once because the breaker was open.
    pub breaker_fast_failures: Counter,
    /// Probes the open breaker sent to the ECR endpoint.
    pub breaker_probes: Counter,
}

impl Metrics {
    /// Builds the metrics and a registry that exports them.
    pub fn new() -> (Metrics, Registry) {
        let m = Metrics {
            requests: Family::default(),
            upstream_latency: Family::new_with_constructor(|| {
                Histogram::new(exponential_buckets(0.005, 2.0, 14))
            }),
            upstream_bytes: Family::default(),
            token_fetches: Counter::default(),
            token_errors: Counter::default(),
            token_seconds_left: Gauge::default(),
            manifest_cache_hits: Counter::default(),
            manifest_cache_misses: Counter::default(),
            manifest_tag_hits: Counter::default(),
            manifest_coalesced: Counter::default(),
            digest_misses: Family::default(),
            breaker_open: Gauge::default(),
            breaker_fast_failures: Counter::default(),
            breaker_probes: Counter::default(),
        };
        let mut r = Registry::with_prefix("pullthrough");
        r.register(
            "requests",
            "Requests answered by the mirror",
            m.requests.clone(),
        );
        r.register(
            "upstream_response_seconds",
            "Time from request to response headers from the ECR endpoint",
            m.upstream_latency.clone(),
        );
        r.register(
            "upstream_body_bytes",
            "Body bytes streamed from the ECR endpoint to clients",
            m.upstream_bytes.clone(),
        );
        r.register(
            "token_fetches",
            "GetAuthorizationToken calls",
            m.token_fetches.clone(),
        );
        r.register(
            "token_fetch_errors",
            "Failed GetAuthorizationToken calls",
            m.token_errors.clone(),
        );
        r.register(
            "token_seconds_left",
            "Seconds the cached ECR token may still be used",
            m.token_seconds_left.clone(),
        );
        r.register(
            "manifest_cache_hits",
            "Manifest requests served from the local cache",
            m.manifest_cache_hits.clone(),
        );
        r.register(
            "manifest_cache_misses",
            "Manifest requests sent to the ECR endpoint",
            m.manifest_cache_misses.clone(),
        );
        r.register(
            "manifest_tag_cache_hits",
            "Manifest requests by tag answered from what the tag resolved to within manifest_cache.tag_ttl (part of the cache hits)",
            m.manifest_tag_hits.clone(),
        );
        r.register(
            "manifest_coalesced",
            "Manifest requests that shared another identical request's GET from the ECR endpoint (part of the cache misses)",
            m.manifest_coalesced.clone(),
        );
        r.register(
            "digest_misses",
            "Manifest requests by digest that ECR did not have (its pull-through cache imports by tag only); containerd pulled them from the upstream registry",
            m.digest_misses.clone(),
        );
        r.register(
            "upstream_breaker_open",
            "1 while the circuit breaker towards the ECR endpoint is open",
            m.breaker_open.clone(),
        );
        r.register(
            "upstream_breaker_fast_failures",
            "Requests answered 503 at once because the circuit breaker was open",
            m.breaker_fast_failures.clone(),
        );
        r.register(
            "upstream_breaker_probes",
            "Probes of the ECR endpoint while the circuit breaker was open",
            m.breaker_probes.clone(),
        );
        (m, r)
    }
}
