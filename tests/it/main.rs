//! pullthrough's integration tests: one test binary (`cargo test --test it`)
//! whose modules share the stand-ins in [`support`].
//!
//! Each test starts the real processes it needs (docker-registry, moto,
//! containerd, pullthrough) on free ports on 127.0.0.1 and kills them when
//! their guards drop. Nothing leaves the machine.

// Everything in this binary is test code, where a panic is how a check
// fails. clippy.toml's allow-*-in-tests only covers `#[test]` functions and
// `#[cfg(test)]` modules, not the helpers in `support`, hence the allow.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod abuse;
mod chart;
mod cli;
mod clients;
mod digest_pinned;
mod e2e;
mod ecr;
mod fault;
mod fuzz_regressions;
mod harness;
mod manifests;
mod node;
mod proxy;
mod security;
mod support;
mod webhook;
