//! The local demo (`./scripts/demo`): a whole node's pull path on 127.0.0.1.
//!
//! It starts the stand-ins the tests use (docker-registry as the ECR registry endpoint, moto as
//! the ECR API), fills the "ECR" with images at their pull-through paths, starts `pullthrough
//! serve`, writes containerd's `hosts.toml` with `pullthrough hosts` (every `server` a dead
//! loopback port, so nothing can go to the internet), starts a private containerd, pulls each
//! image through the kubelet's path (CRI `PullImage`), and prints where every pull went in ECR.
//! With `--keep` it leaves the stack running until Ctrl-C so you can poke at it.

// The demo reuses the integration tests' harness, whose helpers panic with a message on
// failure, as test code does; the demo's own code below returns errors.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../tests/it/support/mod.rs"]
mod support;

use std::time::Instant;

use anyhow::bail;
use support::containerd::Containerd;
use support::image::Image;
use support::moto::Moto;
use support::pullthrough::{Options, Pullthrough};
use support::registry::Registry;

struct Pull {
    reference: &'static str,
    repository: &'static str,
    tag: &'static str,
    image: Image,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let keep = std::env::args().any(|a| a == "--keep");
    let _ = rustls::crypto::ring::default_provider().install_default();

    step("starting the ECR API stand-in (moto) and the ECR registry stand-in (docker-registry)");
    let moto = Moto::start().await;
    let registry = Registry::start(&moto.password()).await;
    println!("    ECR API       {}", moto.endpoint());
    println!(
        "    ECR registry  {}  (htpasswd user AWS, password {}-auth-token)",
        registry.base_url(),
        moto.account()
    );

    let pulls = vec![
        pull(
            "docker.io/library/alpine:3.19",
            "docker-hub/library/alpine",
            "3.19",
            Image::small("alpine"),
        ),
        pull(
            "docker.io/bitnami/redis:7.2",
            "docker-hub/bitnami/redis",
            "7.2",
            Image::small("redis"),
        ),
        pull(
            "quay.io/prometheus/node-exporter:v1",
            "quay/prometheus/node-exporter",
            "v1",
            Image::small("node-exporter"),
        ),
        pull(
            "registry.k8s.io/pause:3.9",
            "kubernetes/pause",
            "3.9",
            Image::small("pause"),
        ),
        pull(
            "docker.io/library/multiarch:1",
            "docker-hub/library/multiarch",
            "1",
            Image::multi_arch("multiarch"),
        ),
    ];
    step("filling the ECR stand-in with images at their pull-through paths");
    for p in &pulls {
        registry.push(p.repository, p.tag, &p.image).await;
        println!("    {}:{}", p.repository, p.tag);
    }
    registry.clear_requests();

    step("starting pullthrough serve");
    let (opts, _dead) = Options::with_dead_servers(&registry.base_url(), &moto.endpoint());
    let pt = Pullthrough::start(opts).await;
    println!("    mirror {}   ops {}", pt.url(), pt.ops_url());
    println!("    config {}", pt.config_path().display());

    step("writing containerd hosts.toml files with `pullthrough hosts`");
    let certs = support::short_tempdir("demo-certs");
    let written = pt
        .write_hosts(certs.path())
        .map_err(|e| anyhow::anyhow!("pullthrough hosts failed: {e}"))?;
    print!("{}", indent(&written));
    let hub = std::fs::read_to_string(certs.path().join("docker.io/hosts.toml"))?;
    println!("    docker.io/hosts.toml:");
    print!("{}", indent(&indent(&hub)));

    step(
        "starting containerd 1.6 (private socket, root and state) and pulling through CRI PullImage",
    );
    let containerd = Containerd::start(certs.path()).await;
    for p in &pulls {
        let t0 = Instant::now();
        containerd.pull_image(p.reference).await.map_err(|e| {
            anyhow::anyhow!("pull {}: {e}\npullthrough log:\n{}", p.reference, pt.log())
        })?;
        let digest = containerd
            .image_digest(p.reference)
            .await
            .map_err(anyhow::Error::msg)?;
        let ok = digest.as_deref() == Some(p.image.digest());
        println!(
            "    {:<40} {}  {:>5} ms  {}",
            p.reference,
            short(digest.as_deref().unwrap_or("-")),
            t0.elapsed().as_millis(),
            if ok { "digest ok" } else { "DIGEST MISMATCH" }
        );
        if !ok {
            bail!(
                "{} was pulled as {digest:?}, expected {}",
                p.reference,
                p.image.digest()
            );
        }
    }

    step("what the ECR registry saw (its access log)");
    for (method, path, status) in registry.requests() {
        println!("    {status} {method:<4} {path}");
    }

    step("pullthrough's view");
    let log = pt.access_log();
    let hits = log.iter().filter(|l| l["cache"] == "hit").count();
    println!(
        "    {} requests from containerd, {} answered from the manifest cache",
        log.len(),
        hits
    );
    println!(
        "    GetAuthorizationToken calls: {} (moto's count)",
        moto.token_calls()
    );
    println!("    metrics: curl -s {}/metrics", pt.ops_url());

    if keep {
        step("the stack keeps running; Ctrl-C stops it");
        println!(
            "    try: skopeo inspect --tls-verify=false docker://{}/docker.io/library/alpine:3.19",
            pt.host()
        );
        tokio::signal::ctrl_c().await?;
    }
    println!("\ndemo: ok");
    Ok(())
}

fn pull(
    reference: &'static str,
    repository: &'static str,
    tag: &'static str,
    image: Image,
) -> Pull {
    Pull {
        reference,
        repository,
        tag,
        image,
    }
}

fn step(s: &str) {
    println!("\n==> {s}");
}

fn indent(s: &str) -> String {
    s.lines().map(|l| format!("    {l}\n")).collect()
}

fn short(digest: &str) -> &str {
    digest.get(..19).unwrap_or(digest)
}
