//! The ops listener: `/healthz` (the process answers), `/readyz` (an ECR token can be had) and
//! `/metrics` (Prometheus text). It binds apart from the mirror, on the node IP by default, so
//! kubelet probes and Prometheus reach it while the mirror stays on loopback.

use std::sync::Arc;

use http::header::CONTENT_TYPE;
use http::{HeaderValue, Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use prometheus_client::registry::Registry;

use crate::mirror::metrics::Metrics;
use crate::mirror::respond::{self, ProxyBody};
use crate::mirror::token::TokenCache;
use crate::server::{BoxFuture, Handler};

/// How long `/readyz` waits for a token.
const READY_WAIT: std::time::Duration = std::time::Duration::from_millis(800);

/// The ops endpoints.
#[derive(Clone, Debug)]
pub struct Ops {
    tokens: TokenCache,
    metrics: Metrics,
    registry: Arc<Registry>,
}

impl Ops {
    /// Builds the ops handler over the proxy's token cache and metrics.
    pub fn new(tokens: TokenCache, metrics: Metrics, registry: Registry) -> Self {
        Self {
            tokens,
            metrics,
            registry: Arc::new(registry),
        }
    }

    /// Answers one ops request.
    pub async fn handle<B>(&self, req: Request<B>) -> Response<ProxyBody> {
        if req.method() != Method::GET && req.method() != Method::HEAD {
            return text(StatusCode::METHOD_NOT_ALLOWED, "GET only\n".into());
        }
        match req.uri().path() {
            "/healthz" => text(StatusCode::OK, "ok\n".into()),
            // Only the token: not the circuit breaker ([`crate::mirror::breaker`] says why), so an ECR
            // outage never makes `pullthrough node` or kubelet take the mirror out.
            // Bounded below kubelet's default 1 s probe timeout: a fetch that takes longer (the
            // SDK retrying) answers "not ready" now rather than a probe timeout later.
            "/readyz" => match tokio::time::timeout(READY_WAIT, self.tokens.get()).await {
                Ok(Ok(_)) => text(StatusCode::OK, "ready\n".into()),
                Ok(Err(e)) => text(StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {e}\n")),
                Err(_) => text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "not ready: ECR token fetch in progress\n".into(),
                ),
            },
            "/metrics" => {
                self.metrics
                    .token_seconds_left
                    .set(self.tokens.seconds_left().await);
                encode_metrics(&self.registry)
            }
            _ => text(
                StatusCode::NOT_FOUND,
                "not found: try /healthz, /readyz or /metrics\n".into(),
            ),
        }
    }
}

/// `/metrics`: the registry in OpenMetrics text.
pub(crate) fn encode_metrics(registry: &Registry) -> Response<ProxyBody> {
    let mut out = String::new();
    if let Err(e) = prometheus_client::encoding::text::encode(&mut out, registry) {
        return text(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("encoding metrics: {e}\n"),
        );
    }
    let mut resp = Response::new(respond::full(out));
    resp.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("application/openmetrics-text; version=1.0.0; charset=utf-8"),
    );
    resp
}

/// A plain-text answer.
pub(crate) fn text(status: StatusCode, body: String) -> Response<ProxyBody> {
    let mut resp = Response::new(respond::full(body));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

impl Handler for Ops {
    type Body = ProxyBody;
    fn call(&self, req: Request<Incoming>) -> BoxFuture<Response<ProxyBody>> {
        let ops = self.clone();
        Box::pin(async move { ops.handle(req).await })
    }
}
