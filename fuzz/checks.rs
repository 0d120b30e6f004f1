//! What each fuzz target checks, shared by the libFuzzer targets (`fuzz/fuzz_targets/*.rs`) and
//! by the stable regression test that replays `fuzz/regressions/<target>/*` and the seed corpus
//! (`tests/it/fuzz_regressions.rs`), so a crash found once stays fixed in the normal test suite.
//!
//! Each check feeds raw bytes to one input boundary of pullthrough and panics when the code
//! under test panics or when an invariant breaks: a mapped path that leaves its prefix, an
//! upstream URI whose authority is not the configured one, an error that does not name file,
//! line and key, an admission answer that does not allow the request.

use std::sync::LazyLock;

use http::{Method, Uri};
use pullthrough::config::{Config, ConfigError};
use pullthrough::mirror::route::{self, Route};
use pullthrough::mirror::{forward, map};
use pullthrough::oci::reference::Reference;
use pullthrough::webhook::config::Mode;
use pullthrough::webhook::mutate::{self, Policy};
use pullthrough::webhook::rewrite::{Rewrite, Rules};

/// The config every check runs against: upstreams with a port, a nested prefix and Docker Hub.
const CONFIG: &str = r#"
[ecr]
account = "123456789012"
region = "eu-west-1"

[upstreams."docker.io"]
prefix = "docker-hub"

[upstreams."quay.io"]
prefix = "cache/quay"

[upstreams."registry.k8s.io"]
prefix = "kubernetes"

[upstreams."localhost:5000"]
prefix = "local"

[webhook]
exclude = ["docker.io/library/busybox*"]
"#;

static SETUP: LazyLock<(Config, Rules)> = LazyLock::new(|| {
    let config = Config::from_toml_str(CONFIG, "fuzz.toml").expect("the fuzz config is valid");
    let rules = pullthrough::webhook::rules(&config, None).expect("the fuzz config has rules");
    (config, rules)
});

/// The ECR endpoints a mapped request may go to: the account's host name, and a loopback
/// `ecr.endpoint` with a port (as the tests use).
static BASES: LazyLock<Vec<Uri>> = LazyLock::new(|| {
    [
        "https://123456789012.dkr.ecr.eu-west-1.amazonaws.com/",
        "http://127.0.0.1:5000/",
    ]
    .iter()
    .map(|b| b.parse().expect("base URL"))
    .collect()
});

/// The request router and mapper: the first byte picks the method, the rest is the request
/// target. It is tried twice: parsed as a URI, as hyper hands it to the proxy, and split at
/// the first `?` without any URI parsing, so that bytes hyper would refuse reach the router too.
pub fn route_map(data: &[u8]) {
    let Some((&m, target)) = data.split_first() else {
        return;
    };
    let method = match m % 4 {
        0 | 1 => Method::GET,
        2 => Method::HEAD,
        _ => Method::DELETE,
    };
    if let Ok(uri) = Uri::try_from(target) {
        route_one(&method, uri.path(), uri.query(), true);
    }
    if let Ok(s) = std::str::from_utf8(target) {
        let (path, query) = match s.split_once('?') {
            Some((p, q)) => (p, Some(q)),
            None => (s, None),
        };
        route_one(&method, path, query, false);
    }
}

fn route_one(method: &Method, path: &str, query: Option<&str>, from_uri: bool) {
    let (config, _) = &*SETUP;
    for default in [None, config.upstreams.keys().next()] {
        let routed = route::route(method, path, query, &config.upstreams, default);
        let api = match routed {
            Err(e) => {
                assert!(e.to_string().len() < 512, "unbounded route error: {e}");
                continue;
            }
            Ok(Route::Root) => {
                assert!(path == "/v2" || path == "/v2/", "root for {path:?}");
                continue;
            }
            Ok(Route::Api(api)) => api,
        };
        assert!(
            *method == Method::GET || *method == Method::HEAD,
            "{method} was routed"
        );
        let upstream = config
            .upstreams
            .get(&api.registry)
            .expect("routed only to configured registries");
        let Ok(target) = map::map(&api, upstream) else {
            continue;
        };
        check_mapped(&target.path_and_query, &upstream.prefix);
        for base in BASES.iter() {
            match forward::upstream_uri(base, &target.path_and_query) {
                Some(uri) => {
                    assert_eq!(uri.scheme(), base.scheme(), "scheme of {uri}");
                    assert_eq!(uri.authority(), base.authority(), "authority of {uri}");
                    assert_eq!(uri.path(), target.path_and_query.split('?').next().unwrap());
                }
                // A query hyper would never have delivered: the proxy answers 500, no request.
                None => assert!(!from_uri, "no upstream URI for {:?}", target.path_and_query),
            }
        }
    }
}

/// A mapped path stays under `/v2/<prefix>/`, and no segment of it can move up or sideways:
/// no empty, `.` or `..` segment, no percent-escape, only the distribution grammar's bytes.
pub fn check_mapped(path_and_query: &str, prefix: &str) {
    let path = path_and_query.split('?').next().unwrap_or("");
    assert!(
        path.starts_with(&format!("/v2/{prefix}/")),
        "{path:?} is not under /v2/{prefix}/"
    );
    for seg in path[1..].split('/') {
        assert!(
            !seg.is_empty() && seg != "." && seg != "..",
            "segment {seg:?} in {path:?}"
        );
    }
    assert!(
        path.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"/._-:=+".contains(&b)),
        "unexpected byte in {path:?}"
    );
}

/// Image-reference normalization: a parsed reference prints in a form that parses back to
/// itself, and a rewrite lands on the configured ECR registry with tag and digest kept.
pub fn reference(data: &[u8]) {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    let (_, rules) = &*SETUP;
    let r = match Reference::parse(s) {
        Ok(r) => r,
        Err(e) => {
            assert!(e.to_string().len() < 1024, "unbounded reference error: {e}");
            return;
        }
    };
    let normal = r.to_string();
    let again = Reference::parse(&normal)
        .unwrap_or_else(|e| panic!("{s:?} normalizes to {normal:?}, which does not parse: {e}"));
    assert_eq!(again, r, "{s:?} → {normal:?} is not a fixed point");
    match pullthrough::webhook::rewrite::rewrite(&r, rules) {
        Rewrite::Rewritten(to) => {
            let t = Reference::parse(&to)
                .unwrap_or_else(|e| panic!("{s:?} is rewritten to {to:?}, invalid: {e}"));
            assert_eq!(t.registry(), rules.ecr.as_str(), "{s:?} → {to:?}");
            assert_eq!(t.tag(), r.tag(), "{s:?} → {to:?}");
            assert_eq!(t.digest(), r.digest(), "{s:?} → {to:?}");
            let pullthrough::oci::reference::Domain::Name(registry) = r.domain() else {
                panic!("{s:?}: an IP registry was rewritten to {to:?}");
            };
            let upstream = rules
                .upstreams
                .get(registry)
                .expect("rewritten only from a configured upstream");
            assert!(
                t.repository().starts_with(&format!("{}/", upstream.prefix)),
                "{to:?} is not under {}",
                upstream.prefix
            );
            assert!(
                matches!(
                    pullthrough::webhook::rewrite::rewrite(&t, rules),
                    Rewrite::Unchanged(_)
                ),
                "{to:?} would be rewritten again"
            );
        }
        Rewrite::Unchanged(reason) => {
            assert!(
                reason.to_string().len() < 1024,
                "unbounded reason: {reason}"
            );
        }
    }
}

/// Config parsing from TOML text: either a config, or an error naming this file, a line that
/// exists and a key. Inputs that could name a file to read (`*_file` keys, or a key spelled
/// with escapes) are skipped, so the fuzzer never reads `/dev/stdin` or the like.
pub fn config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if text.contains("_file") || text.contains("\\u") || text.contains("\\U") {
        return;
    }
    match Config::from_toml_str(text, "fuzz.toml") {
        Ok(c) => assert!(!c.upstreams.is_empty(), "a config with no upstreams"),
        Err(ConfigError::Invalid {
            path,
            line,
            key,
            message,
        }) => {
            let lines = text.split('\n').count();
            assert_eq!(path, "fuzz.toml");
            assert!(
                (1..=lines).contains(&line),
                "line {line} of {lines}: {key}: {message}"
            );
            assert!(!key.is_empty(), "no key for: {message}");
            assert!(!message.is_empty(), "no message for {key}");
        }
        Err(e @ ConfigError::Read { .. }) => panic!("read error from text: {e}"),
    }
}

/// AdmissionReview handling: any body is either refused as not a review, or answered with a
/// review that allows the request, echoes its uid and carries a decodable JSON Patch.
pub fn admission(data: &[u8]) {
    use base64::Engine;
    let (config, rules) = &*SETUP;
    let policy = Policy {
        rules: rules.clone(),
        mode: if data.len().is_multiple_of(2) {
            Mode::Enforce
        } else {
            Mode::DryRun
        },
        skip_namespaces: config.webhook.skip_namespaces.clone(),
        annotation: config.webhook.annotation.clone(),
    };
    let (answer, _) = match mutate::admit(data, &policy) {
        Ok(a) => a,
        Err(e) => {
            assert!(e.to_string().len() < 4096, "unbounded refusal: {e}");
            return;
        }
    };
    let request: serde_json::Value = serde_json::from_slice(data).expect("admitted JSON");
    assert_eq!(answer["kind"], "AdmissionReview");
    assert_eq!(answer["response"]["allowed"], true, "{answer}");
    assert_eq!(answer["response"]["uid"], request["request"]["uid"]);
    if let Some(p) = answer["response"].get("patch") {
        assert_eq!(answer["response"]["patchType"], "JSONPatch");
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(p.as_str().expect("patch is a string"))
            .expect("patch is base64");
        let ops: serde_json::Value = serde_json::from_slice(&bytes).expect("patch is JSON");
        assert!(ops.as_array().is_some_and(|a| !a.is_empty()), "empty patch");
    }
}
