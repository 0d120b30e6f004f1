//! Micro-benchmarks of image-reference normalization and the rewrite decision
//! ([`pullthrough::oci::reference`]), which the webhook runs for every image of every admitted pod
//! and `pullthrough rewrite` for every argument, in nanoseconds per call.
//! `cargo bench --bench reference`.

// A config that does not parse is a broken benchmark, not an input to handle.
#![allow(clippy::expect_used)]

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use pullthrough::config::Config;
use pullthrough::oci::reference::Reference;
use pullthrough::webhook::rewrite::rewrite;

const CONFIG: &str = r#"
[ecr]
region = "us-east-1"
account = "123456789012"
"#;

/// References as pod specs write them: short Docker Hub names, namespaced ones, other
/// registries, digests, ECR-rewritten ones and ones left alone.
const IMAGES: &[(&str, &str)] = &[
    ("short", "nginx"),
    ("hub_namespaced_tag", "bitnami/redis:7.2"),
    ("alias_with_port", "index.docker.io:443/library/nginx:1.27"),
    ("quay", "quay.io/prometheus/node-exporter:v1.8.2"),
    (
        "tag_and_digest",
        "registry.k8s.io/pause:3.9@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
    ),
    (
        "already_rewritten",
        "123456789012.dkr.ecr.us-east-1.amazonaws.com/docker-hub/library/nginx:latest",
    ),
    ("unconfigured", "registry.example.com:5000/team/app:1"),
    ("invalid", "Nginx:latest"),
];

fn bench(c: &mut Criterion) {
    let config = Config::from_toml_str(CONFIG, "bench.toml").expect("bench config");
    let rules = pullthrough::webhook::rules(&config, None).expect("rules");
    let mut parse = c.benchmark_group("parse");
    for (name, image) in IMAGES {
        parse.bench_function(*name, |b| b.iter(|| Reference::parse(black_box(image))));
    }
    parse.finish();
    let mut decide = c.benchmark_group("parse_and_rewrite");
    for (name, image) in IMAGES {
        decide.bench_function(*name, |b| {
            b.iter(|| Reference::parse(black_box(image)).map(|r| rewrite(&r, &rules)))
        });
    }
    decide.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
