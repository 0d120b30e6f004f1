//! Micro-benchmarks of the pure functions every mirror request runs before anything touches the
//! network: routing ([`pullthrough::mirror::route::route`]) and mapping ([`pullthrough::mirror::map::map`]), in
//! nanoseconds per call. `cargo bench --bench route_map`.
//!
//! The requests are the ones containerd sends on a pull: a manifest by tag, a manifest and a
//! blob by digest (all with `?ns=`), plus the CRI-O path-prefix form, a tag list with paging, and
//! a request refused for a bad name (the error path must stay cheap too).

// A config that does not parse is a broken benchmark, not an input to handle.
#![allow(clippy::expect_used)]

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use http::Method;
use pullthrough::config::Config;
use pullthrough::mirror::route::{self, Route};

const CONFIG: &str = r#"
listen = "127.0.0.1:5000"

[ecr]
region = "us-east-1"
endpoint = "http://127.0.0.1:5001"

[upstreams."docker.io"]
prefix = "docker-hub"

[upstreams."quay.io"]
prefix = "quay"

[upstreams."registry.k8s.io"]
prefix = "kubernetes"

[upstreams."ghcr.io"]
prefix = "github"
"#;

const SHA: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

/// (name, path, query) as containerd and CRI-O send them.
fn requests() -> Vec<(&'static str, String, Option<&'static str>)> {
    vec![
        (
            "manifest_tag",
            "/v2/library/nginx/manifests/1.27".into(),
            Some("ns=docker.io"),
        ),
        (
            "manifest_digest",
            format!("/v2/library/nginx/manifests/{SHA}"),
            Some("ns=docker.io"),
        ),
        (
            "blob",
            format!("/v2/prometheus/node-exporter/blobs/{SHA}"),
            Some("ns=quay.io"),
        ),
        (
            "path_prefix",
            format!("/v2/registry.k8s.io/pause/blobs/{SHA}"),
            None,
        ),
        (
            "tags_paged",
            "/v2/bitnami/redis/tags/list".into(),
            Some("n=100&last=7.2&ns=docker.io"),
        ),
        (
            "refused_name",
            "/v2/Library/NGINX/manifests/latest".into(),
            Some("ns=docker.io"),
        ),
    ]
}

fn bench(c: &mut Criterion) {
    let config = Config::from_toml_str(CONFIG, "bench.toml").expect("bench config");
    let upstreams = &config.upstreams;
    let get = Method::GET;

    let mut group = c.benchmark_group("route");
    for (name, path, query) in requests() {
        group.bench_function(name, |b| {
            b.iter(|| {
                route::route(
                    black_box(&get),
                    black_box(&path),
                    black_box(query),
                    upstreams,
                    None,
                )
            })
        });
    }
    group.finish();

    let mut group = c.benchmark_group("map");
    for (name, path, query) in requests() {
        let Ok(Route::Api(api)) = route::route(&get, &path, query, upstreams, None) else {
            continue;
        };
        let upstream = &upstreams[&api.registry];
        group.bench_function(name, |b| {
            b.iter(|| pullthrough::mirror::map::map(black_box(&api), upstream))
        });
    }
    group.finish();

    let mut group = c.benchmark_group("route_and_map");
    for (name, path, query) in requests() {
        group.bench_function(name, |b| {
            b.iter(|| {
                match route::route(
                    black_box(&get),
                    black_box(&path),
                    black_box(query),
                    upstreams,
                    None,
                ) {
                    Ok(Route::Api(api)) => {
                        pullthrough::mirror::map::map(&api, &upstreams[&api.registry]).ok()
                    }
                    _ => None,
                }
            })
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
