//! pullthrough: a node-local OCI registry mirror that sends every image pull through the AWS
//! account's ECR pull-through cache, and steps aside whenever that path fails.
//!
//! containerd finds the mirror through `/etc/containerd/certs.d/<registry>/hosts.toml` (written
//! by [`hosts`]), tries it first, and falls back to the real registry when the mirror refuses,
//! errors or misses. So the mirror's one job is to answer correctly or fail fast and clearly.
//!
//! # Layout
//!
//! A request flows one way through these modules:
//!
//! - [`route`]: method, path and `?ns=` → a validated [`route::Route`] (pure);
//! - [`map`]: registry + repository → the ECR pull-through path (pure);
//! - [`sign`]: the node's ECR token, cached and refreshed ([`sign::TokenCache`]);
//! - [`forward`]: the HTTP client to the ECR endpoint and the header allow-lists; on Linux,
//!   `splice` moves blob bodies from a plain-HTTP endpoint without copying them;
//! - [`respond`]: the one table that turns errors into statuses and OCI error bodies.
//!
//! [`proxy`] strings them together for one request, with [`breaker`] failing fast while the ECR
//! endpoint refuses or hangs, [`cache`] for verified manifests and
//! [`accesslog`] for the per-request log line. Around it: [`config`] (raw TOML → validated
//! [`config::Config`]), [`server`] (accept loop with graceful drain), [`ops`] (`/healthz`,
//! `/readyz`, `/metrics`), [`metrics`], [`signal`] and [`hosts`] (containerd `hosts.toml`, and
//! the same routing for CRI-O and Bottlerocket). On the node, [`node`] installs the `hosts.toml`
//! files once the mirror is ready, after [`containerd_config`] has checked containerd reads them.
//! [`reference`](mod@reference) parses and normalizes pod image references and decides their ECR
//! rewrite (pure, on top of [`map`]); [`webhook`] is the optional admission webhook and
//! `pullthrough rewrite` built on it.
//! [`ecr_ops`] is `pullthrough ecr`: set up, check, warm and clean up the account's pull-through
//! cache (plans computed by pure functions, AWS calls behind a thin boundary).
//! `main.rs` is only the command line.

pub mod accesslog;
pub mod breaker;
pub mod cache;
pub mod config;
pub mod containerd_config;
pub mod ecr_ops;
pub mod forward;
pub mod hosts;
pub mod map;
pub mod metrics;
pub mod node;
pub mod ops;
pub mod proxy;
pub mod reference;
pub mod respond;
pub mod route;
pub mod server;
pub mod sign;
pub mod signal;
#[cfg(target_os = "linux")]
pub mod splice;
pub mod webhook;

use std::future::Future;
use std::sync::Arc;

use http::Uri;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::config::{Config, EcrConfig};
use crate::forward::{ForwardError, Forwarder};
use crate::metrics::Metrics;
use crate::ops::Ops;
use crate::proxy::Proxy;
use crate::sign::{EcrTokenSource, TokenCache};

/// Why `serve` could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// `ecr.account` is set but no region could be found to build the registry host name.
    #[error(
        "ecr.account is set but no AWS region was found (ecr.region, AWS_REGION, profile or IMDS): \
         set ecr.region or ecr.endpoint"
    )]
    NoRegion,
    /// The upstream client could not be built.
    #[error(transparent)]
    Forward(#[from] ForwardError),
}

/// The ECR registry URL when config determines it: `ecr.endpoint`, or the account's host name
/// in `region`. `None` means "use the token's `proxyEndpoint`".
pub fn registry_base(ecr: &EcrConfig, region: Option<&str>) -> Result<Option<Uri>, ServeError> {
    if let Some(e) = &ecr.endpoint {
        return Ok(Some(e.clone()));
    }
    let Some(account) = &ecr.account else {
        return Ok(None);
    };
    let region = region.ok_or(ServeError::NoRegion)?;
    let suffix = if region.starts_with("cn-") {
        "amazonaws.com.cn"
    } else {
        "amazonaws.com"
    };
    let url = format!("https://{account}.dkr.ecr.{region}.{suffix}");
    Ok(Some(
        config::parse_base_url(&url).ok_or(ServeError::NoRegion)?,
    ))
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
    let sdk = sign::sdk_config(&config).await;
    let region = sdk.region().map(|r| r.to_string());
    let base = registry_base(&config.ecr, region.as_deref())?;
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
    let ops_handler = Ops::new(tokens.clone(), metrics, registry);

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
