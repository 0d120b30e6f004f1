//! The ops listener of every long-running program: `/healthz` (the process answers), `/readyz`
//! (what "ready" means is each program's own, through [`Readiness`]) and `/metrics` (Prometheus
//! text). It binds apart from the program's main listener, on the node IP when the config says
//! so, so that kubelet probes and Prometheus reach it while the mirror stays on loopback.
//!
//! The mirror is ready once it holds an ECR token, the node agent once its `hosts.toml` files are
//! installed, the webhook until it starts shutting down: one handler, three hooks.

use std::future::Future;
use std::sync::Arc;

use http::header::CONTENT_TYPE;
use http::{HeaderValue, Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use prometheus_client::registry::Registry as MetricsRegistry;

use crate::body::{ResponseBody, full, text};
use crate::server::{BoxFuture, Handler};

/// What `/readyz` answers: 200 or 503, and why, as the probe's body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ready {
    /// Whether the program can do its job now.
    pub ready: bool,
    /// One line for the probe's body (and so for `kubectl describe pod`).
    pub message: String,
}

impl Ready {
    /// Ready, saying `message`.
    pub fn yes(message: impl Into<String>) -> Self {
        Self {
            ready: true,
            message: message.into(),
        }
    }

    /// Not ready, saying why.
    pub fn no(message: impl Into<String>) -> Self {
        Self {
            ready: false,
            message: message.into(),
        }
    }
}

/// A program's readiness, and its last word before `/metrics` is encoded.
pub trait Readiness: Send + Sync + 'static {
    /// Whether the program is ready now. Answer within kubelet's probe timeout (1 s by default).
    fn ready(&self) -> impl Future<Output = Ready> + Send;

    /// Brings gauges that are read rather than counted up to date, before `/metrics` answers.
    fn refresh_metrics(&self) -> impl Future<Output = ()> + Send {
        async {}
    }
}

/// The ops handler over one program's readiness and metrics. Cheap to clone.
#[derive(Debug)]
pub struct Ops<R> {
    readiness: Arc<R>,
    registry: Arc<MetricsRegistry>,
}

impl<R> Clone for Ops<R> {
    fn clone(&self) -> Self {
        Self {
            readiness: Arc::clone(&self.readiness),
            registry: Arc::clone(&self.registry),
        }
    }
}

impl<R: Readiness> Ops<R> {
    /// An ops handler asking `readiness` and exporting `registry`.
    pub fn new(readiness: Arc<R>, registry: MetricsRegistry) -> Self {
        Self {
            readiness,
            registry: Arc::new(registry),
        }
    }

    /// Answers one ops request.
    pub async fn handle<B>(&self, req: &Request<B>) -> Response<ResponseBody> {
        if req.method() != Method::GET && req.method() != Method::HEAD {
            return text(StatusCode::METHOD_NOT_ALLOWED, "GET only\n");
        }
        match req.uri().path() {
            "/healthz" => text(StatusCode::OK, "ok\n"),
            "/readyz" => {
                let Ready { ready, message } = self.readiness.ready().await;
                let status = if ready {
                    StatusCode::OK
                } else {
                    StatusCode::SERVICE_UNAVAILABLE
                };
                text(status, format!("{message}\n"))
            }
            "/metrics" => {
                self.readiness.refresh_metrics().await;
                encode_metrics(&self.registry)
            }
            _ => text(
                StatusCode::NOT_FOUND,
                "not found: try /healthz, /readyz or /metrics\n",
            ),
        }
    }
}

/// `/metrics`: the registry in OpenMetrics text.
fn encode_metrics(registry: &MetricsRegistry) -> Response<ResponseBody> {
    let mut out = String::new();
    if let Err(e) = prometheus_client::encoding::text::encode(&mut out, registry) {
        return text(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("encoding metrics: {e}\n"),
        );
    }
    let mut resp = Response::new(full(out));
    resp.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("application/openmetrics-text; version=1.0.0; charset=utf-8"),
    );
    resp
}

impl<R: Readiness> Handler for Ops<R> {
    type Body = ResponseBody;
    fn call(&self, req: Request<Incoming>) -> BoxFuture<Response<ResponseBody>> {
        let ops = self.clone();
        Box::pin(async move { ops.handle(&req).await })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;
    use prometheus_client::metrics::counter::Counter;
    use rstest::rstest;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

    /// A readiness that says what it is told and counts the metric refreshes.
    #[derive(Default)]
    struct Told {
        ready: AtomicBool,
        refreshes: AtomicU64,
    }

    impl Readiness for Told {
        async fn ready(&self) -> Ready {
            if self.ready.load(Ordering::Relaxed) {
                Ready::yes("ready: told so")
            } else {
                Ready::no("not ready: told so")
            }
        }
        async fn refresh_metrics(&self) {
            self.refreshes.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn ops() -> (Ops<Told>, Arc<Told>) {
        let told = Arc::new(Told::default());
        let mut registry = MetricsRegistry::default();
        let c: Counter = Counter::default();
        c.inc();
        registry.register("probe_things", "Things", c);
        (Ops::new(Arc::clone(&told), registry), told)
    }

    async fn ask(ops: &Ops<Told>, method: &str, path: &str) -> (StatusCode, String) {
        let req = Request::builder()
            .method(method)
            .uri(path)
            .body(())
            .unwrap();
        let resp = ops.handle(&req).await;
        let status = resp.status();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        (status, String::from_utf8(body.to_vec()).unwrap())
    }

    #[rstest]
    #[case::healthz("GET", "/healthz", 200, "ok\n")]
    #[case::head_healthz("HEAD", "/healthz", 200, "ok\n")]
    #[case::post("POST", "/healthz", 405, "GET only\n")]
    #[case::unknown("GET", "/nope", 404, "not found: try /healthz, /readyz or /metrics\n")]
    #[tokio::test]
    async fn fixed_answers(
        #[case] method: &str,
        #[case] path: &str,
        #[case] status: u16,
        #[case] body: &str,
    ) {
        let (ops, _) = ops();
        assert_eq!(
            ask(&ops, method, path).await,
            (StatusCode::from_u16(status).unwrap(), body.to_owned())
        );
    }

    #[tokio::test]
    async fn readyz_follows_the_hook_and_metrics_refresh_first() {
        let (ops, told) = ops();
        assert_eq!(
            ask(&ops, "GET", "/readyz").await,
            (
                StatusCode::SERVICE_UNAVAILABLE,
                "not ready: told so\n".into()
            )
        );
        told.ready.store(true, Ordering::Relaxed);
        assert_eq!(
            ask(&ops, "GET", "/readyz").await,
            (StatusCode::OK, "ready: told so\n".into())
        );
        let (status, body) = ask(&ops, "GET", "/metrics").await;
        assert_eq!(status, StatusCode::OK);
        assert!(body.contains("probe_things_total 1"), "{body}");
        assert_eq!(told.refreshes.load(Ordering::Relaxed), 1);
    }
}
