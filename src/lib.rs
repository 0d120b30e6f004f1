//! pullthrough: a node-local OCI registry mirror that sends every image pull through the AWS
//! account's ECR pull-through cache, and steps aside whenever that path fails.
//!
//! containerd finds the mirror through `/etc/containerd/certs.d/<registry>/hosts.toml`, tries it
//! first, and falls back to the real registry when the mirror refuses, errors or misses. So the
//! mirror's one job is to answer correctly or fail fast and clearly.
//!
//! # Layout
//!
//! Four programs share one binary; each is a folder, and `main.rs` only parses the command line.
//!
//! | folder | commands | what it is |
//! |---|---|---|
//! | [`mirror`] | `serve` | the pull proxy on every node, and its ops listener |
//! | [`node`] | `node`, `hosts` | the node agent: writes `hosts.toml`, checks containerd reads it |
//! | [`webhook`] | `webhook`, `rewrite` | the optional admission webhook that rewrites pod images |
//! | [`ecr`] | `ecr setup\|check\|warm\|cleanup` | the admin commands for the account's cache |
//!
//! The mirror's request path runs one way, each step a file of [`mirror`]:
//!
//! ```text
//! route (?ns=, pure) → map (ECR path, pure) → token (sign) → forward (HTTP) → respond (errors)
//! ```
//!
//! [`mirror::proxy`] strings the steps together for one request; beside the path sit
//! [`mirror::breaker`] (fail fast while ECR refuses or hangs), [`mirror::cache`] (verified
//! manifests), [`mirror::accesslog`] and [`mirror::metrics`]. [`mirror::respond`] is the one table
//! that turns every error into a status and an OCI body.
//!
//! Shared plumbing, which knows no program:
//! - [`config`]: the root `Config` that composes the sections, the shared sections (`[ecr]`,
//!   `[upstreams]`, `[timeouts]`), and [`config::error`], the leaf every section validates with;
//! - [`server`]: the accept loop with limits and a drain deadline, for every listener;
//! - [`ops`]: `/healthz`, `/readyz`, `/metrics` for every program, readiness through a hook;
//! - [`oci`]: registry host names, the name/tag/digest grammar, image references as pod specs
//!   write them ([`oci::reference`]) and the OCI error body;
//! - [`body`]: the response body type; [`signal`]: SIGTERM and SIGINT.
//!
//! Programs build on the ones below them and never the other way: [`webhook`] uses [`ecr`]'s
//! warming (the same code as `ecr warm`) and the mirror's map, so a rewritten image names
//! exactly what the node mirror would pull; [`ecr`] uses the mirror's map, token and HTTP
//! client; [`node`] uses only the shared plumbing. The only arrows from shared plumbing into a program
//! are the config root's: a section read by one program (`[breaker]`, `[webhook]`,
//! `[ecr_setup]`) and `[server]` live with their code, depend only on [`config::error`], and the
//! root composes them (the [`config`] module doc says why).
//!
//! Where a new line goes: a new step or rule of the mirror's request path goes into its
//! [`mirror`] file; a new config key into the section that reads it; a new metric into that
//! program's metrics; anything two programs need into the shared plumbing, which must not import
//! a program.

pub mod body;
pub mod config;
pub mod ecr;
pub mod mirror;
pub mod node;
pub mod oci;
pub mod ops;
pub mod server;
pub mod signal;
pub mod webhook;
