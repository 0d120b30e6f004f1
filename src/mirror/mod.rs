//! The mirror (`pullthrough serve`): the node-local pull proxy, and its ops listener.
//!
//! A request flows one way: [`route`] → [`map`] → [`token`] → [`forward`] → [`respond`], strung
//! together for one request by [`proxy`]. Beside that path: [`breaker`] fails fast while the ECR
//! endpoint refuses or hangs, [`cache`] keeps verified manifests, [`accesslog`] writes the
//! per-request log line and [`metrics`] counts. This module wires them to the listeners.

pub mod accesslog;
pub mod breaker;
pub mod cache;
pub mod coalesce;
pub mod forward;
pub mod map;
pub mod metrics;
pub mod proxy;
pub mod respond;
pub mod route;
pub mod token;

use std::future::Future;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::config::{Config, NoRegion};
use crate::ops::{Ops, Readiness, Ready};
use crate::server;

use self::forward::{ForwardError, Forwarder};
use self::metrics::Metrics;
use self::proxy::Proxy;
use self::token::{EcrTokenSource, TokenCache};

/// Why `serve` could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// `ecr.account` is set but no region could be found to build the registry host name.
    #[error(transparent)]
    NoRegion(#[from] NoRegion),
    /// The upstream client could not be built.
    #[error(transparent)]
    Forward(#[from] ForwardError),
}

/// Runs the mirror and the ops listener on the given listeners until `shutdown` resolves, then
/// drains both for at most `timeouts.shutdown`. Returns whether the drain finished in time.
pub async fn serve(
    config: Config,
    mirror: TcpListener,
    ops: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<bool, ServeError> {
    let config = Arc::new(config);
    let sdk = token::sdk_config(&config).await;
    let region = sdk.region().map(|r| r.to_string());
    let base = config.ecr.registry_base(region.as_deref())?;
    tracing::info!(
        region = region.as_deref().unwrap_or("-"),
        registry = base.as_ref().map(|b| b.to_string()).unwrap_or_else(|| "(from token)".into()),
        upstreams = ?config.upstreams.keys().map(|r| r.as_str()).collect::<Vec<_>>(),
        "starting"
    );

    let (metrics, registry) = Metrics::new();
    let source = Arc::new(EcrTokenSource::new(aws_sdk_ecr::Client::new(&sdk)));
    let tokens = TokenCache::new(source, metrics.clone());
    let forwarder = Forwarder::new(&config.timeouts, config.ecr.ca_file.as_deref())?;
    let proxy = Proxy::new(
        Arc::clone(&config),
        tokens.clone(),
        forwarder,
        base,
        metrics.clone(),
    );
    let ops_handler = Ops::new(
        Arc::new(TokenReadiness {
            tokens: tokens.clone(),
            metrics,
        }),
        registry,
    );

    // Fetch the token now so the first pull does not wait for it; failures only mean not ready.
    tokio::spawn(async move {
        if tokens.get().await.is_ok() {
            tracing::info!("ECR token ready");
        }
    });

    let stop = CancellationToken::new();
    let trigger = stop.clone();
    tokio::spawn(async move {
        shutdown.await;
        trigger.cancel();
    });
    let grace = config.timeouts.shutdown;
    let limits = config.server;
    let (mirror_done, ops_done) = tokio::join!(
        server::serve(
            mirror,
            Arc::new(proxy),
            stop.clone().cancelled_owned(),
            grace,
            limits,
        ),
        server::serve(
            ops,
            Arc::new(ops_handler),
            stop.cancelled_owned(),
            grace,
            limits,
        ),
    );
    Ok(mirror_done && ops_done)
}

/// How long `/readyz` waits for a token: below kubelet's default 1 s probe timeout, so a fetch
/// that takes longer (the SDK retrying) answers "not ready" now rather than a probe timeout later.
const READY_WAIT: std::time::Duration = std::time::Duration::from_millis(800);

/// The mirror is ready once it holds an ECR token. Only the token: not the circuit breaker
/// ([`breaker`] says why), so an ECR outage never makes `pullthrough node` or kubelet take the
/// mirror out.
struct TokenReadiness {
    tokens: TokenCache,
    metrics: Metrics,
}

impl Readiness for TokenReadiness {
    async fn ready(&self) -> Ready {
        match tokio::time::timeout(READY_WAIT, self.tokens.get()).await {
            Ok(Ok(_)) => Ready::yes("ready"),
            Ok(Err(e)) => Ready::no(format!("not ready: {e}")),
            Err(_) => Ready::no("not ready: ECR token fetch in progress"),
        }
    }

    async fn refresh_metrics(&self) {
        self.metrics
            .token_seconds_left
            .set(self.tokens.seconds_left().await);
    }
}
