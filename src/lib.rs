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

pub mod config;
pub mod ecr;
pub mod mirror;
pub mod node;
pub mod ops;
pub mod server;
pub mod signal;
pub mod webhook;
