//! Property tests (proptest) of the trust boundary that [`crate::mirror::route`], [`crate::mirror::map`] and
//! [`crate::mirror::forward::upstream_uri`] form together: whatever path and query a client sends,
//!
//! - every mapped upstream path stays under `/v2/<prefix>/` of its upstream: no `..`, `.`,
//!   empty segment or percent-escape survives to move it up or sideways;
//! - the upstream request goes to the configured endpoint (scheme, host and port) and nowhere
//!   else, also when its URI is printed and read back (as a log line or a proxy would).
//!
//! The generators mix the shapes attackers use (dot segments, `%2e%2e`, `%2F`, `@host`,
//! `//host`, `\`, absolute URLs, `?ns=` tricks) with arbitrary Unicode.

use std::collections::BTreeMap;

use http::{Method, Uri};
use proptest::prelude::*;

use crate::config::upstreams::{Upstream, valid_prefix};
use crate::mirror::forward::upstream_uri;
use crate::mirror::map::map;
use crate::mirror::route::{Route, route};
use crate::oci::RegistryHost;

const SHA: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

/// The ECR endpoints a config may name.
const BASES: &[&str] = &[
    "https://123456789012.dkr.ecr.eu-west-1.amazonaws.com/",
    "https://123456789012.dkr.ecr.cn-north-1.amazonaws.com.cn/",
    "http://127.0.0.1:5000/",
    "http://[::1]:8443/",
    "https://ecr.internal.example:443/",
];

fn upstreams(prefix: &str) -> BTreeMap<RegistryHost, Upstream> {
    ["docker.io", "quay.io", "localhost:5000", "registry.k8s.io"]
        .iter()
        .filter_map(|r| RegistryHost::parse(r))
        .enumerate()
        .map(|(i, reg)| {
            // Distinct prefixes, as config validation demands; the first is the generated one.
            let prefix = if i == 0 {
                prefix.to_owned()
            } else {
                format!("{prefix}{i}")
            };
            let server = reg.default_server();
            (reg, Upstream { prefix, server })
        })
        .collect()
}

fn segment() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => prop::sample::select(vec![
            "..", ".", "", "%2e%2e", "%2E.", ".%2e", "%2F", "%2f..", "..%2f", "%00", "%", "\\",
            "..\\..", "manifests", "blobs", "tags", "list", "referrers", "uploads", "library",
            "docker.io", "quay.io", "localhost:5000", "evil.example", "@evil.example",
            "user@evil.example", "http:", "https:", "latest", SHA, "a", "nginx", "v2",
        ])
        .prop_map(str::to_owned),
        3 => "[a-z0-9._:@%/\\\\?#-]{1,10}",
        1 => any::<String>(),
    ]
}

/// A repository-name component: mostly valid, sometimes hostile.
fn component() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => "[a-z0-9]{1,6}([._-][a-z0-9]{1,4})?",
        1 => segment(),
    ]
}

/// A manifest or blob reference: a tag, a digest, or something hostile.
fn reference() -> impl Strategy<Value = String> {
    prop_oneof![
        2 => "[A-Za-z0-9_][A-Za-z0-9._-]{0,10}",
        2 => Just(SHA.to_owned()),
        1 => segment(),
    ]
}

fn path() -> impl Strategy<Value = String> {
    let endpoint = prop::sample::select(vec!["manifests", "blobs", "tags", "referrers"]);
    prop_oneof![
        // API-shaped: a name, an endpoint and a reference, any of them possibly hostile.
        6 => (prop::collection::vec(component(), 1..5), endpoint, reference())
            .prop_map(|(name, kind, r)| {
                let r = if kind == "tags" { "list".to_owned() } else { r };
                format!("/v2/{}/{kind}/{r}", name.join("/"))
            }),
        2 => prop::collection::vec(segment(), 0..8)
            .prop_map(|segs| format!("/v2/{}", segs.join("/"))),
        1 => segment().prop_map(|s| format!("//{s}/v2/a/manifests/1")),
        1 => segment().prop_map(|s| format!("http://{s}/v2/a/manifests/1")),
        1 => any::<String>(),
    ]
}

fn query() -> impl Strategy<Value = Option<String>> {
    let ns = prop_oneof![
        3 => prop::sample::select(vec!["docker.io", "quay.io", "localhost%3A5000", "DOCKER.IO"])
            .prop_map(str::to_owned),
        2 => prop::sample::select(vec![
            "docker.io%2F..", "docker.io@evil.example", "evil.example", "127.0.0.1",
            "docker.io%23", "quay.io:443", "", "docker.io/../x", "%2e%2e",
        ])
        .prop_map(str::to_owned),
        1 => "[a-z0-9.%:@/-]{0,16}",
    ];
    let extra = prop::collection::vec("[a-z=&%/.#?@-]{0,8}", 0..3);
    prop_oneof![
        1 => Just(None),
        6 => (ns, extra).prop_map(|(ns, extra)| {
            let mut parts = vec![format!("ns={ns}")];
            parts.extend(extra);
            Some(parts.join("&"))
        }),
        1 => any::<String>().prop_map(Some),
    ]
}

fn prefix() -> impl Strategy<Value = String> {
    "[a-z0-9]{1,8}([._/-][a-z0-9]{1,6}){0,2}".prop_filter("a valid prefix", |p| valid_prefix(p))
}

fn method() -> impl Strategy<Value = Method> {
    prop::sample::select(vec![Method::GET, Method::HEAD])
}

/// A mapped path is under `/v2/<prefix>/`, with no segment that could move it.
fn assert_under_prefix(path_and_query: &str, prefix: &str) -> Result<(), TestCaseError> {
    let path = path_and_query.split('?').next().unwrap_or("");
    prop_assert!(
        path.starts_with(&format!("/v2/{prefix}/")),
        "{path:?} is not under /v2/{prefix}/"
    );
    for seg in path[1..].split('/') {
        prop_assert!(
            !seg.is_empty() && seg != "." && seg != "..",
            "segment {seg:?} in {path:?}"
        );
    }
    prop_assert!(
        path.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"/._-:=+".contains(&b)),
        "unexpected byte in {path:?}"
    );
    Ok(())
}

/// `uri` goes to `base`, both as a value (what hyper connects to) and once printed and parsed
/// again (what a log reader or an intermediary would see).
fn assert_goes_to(uri: &Uri, base: &Uri) -> Result<(), TestCaseError> {
    prop_assert_eq!(uri.scheme(), base.scheme());
    prop_assert_eq!(uri.authority(), base.authority());
    prop_assert!(uri.path().starts_with('/'), "path {:?}", uri.path());
    let reread: Uri = uri
        .to_string()
        .parse()
        .map_err(|e| TestCaseError::fail(format!("{uri} does not parse back: {e}")))?;
    prop_assert_eq!(reread.authority(), base.authority(), "{} read back", uri);
    Ok(())
}

proptest! {
    // Pure and fast (about 1 ms per case); more cases reach more hostile combinations.
    #![proptest_config(ProptestConfig::with_cases(1024))]

    #[test]
    fn mapped_paths_stay_under_their_prefix(
        method in method(),
        path in path(),
        query in query(),
        prefix in prefix(),
        use_default in any::<bool>(),
    ) {
        let ups = upstreams(&prefix);
        let default = use_default.then(|| ups.keys().next()).flatten();
        if let Ok(Route::Api(api)) = route(&method, &path, query.as_deref(), &ups, default) {
            let upstream = &ups[&api.registry];
            if let Ok(target) = map(&api, upstream) {
                assert_under_prefix(&target.path_and_query, &upstream.prefix)?;
                let under = format!("{}/", upstream.prefix);
                prop_assert!(target.repository.starts_with(&under), "{}", target.repository);
            }
        }
    }

    #[test]
    fn requests_only_go_to_the_configured_endpoint(
        method in method(),
        path in path(),
        query in query(),
        prefix in prefix(),
        base in prop::sample::select(BASES),
    ) {
        let base: Uri = base.parse().map_err(|e| TestCaseError::fail(format!("{e}")))?;
        let ups = upstreams(&prefix);
        if let Ok(Route::Api(api)) = route(&method, &path, query.as_deref(), &ups, None)
            && let Ok(target) = map(&api, &ups[&api.registry])
            && let Some(uri) = upstream_uri(&base, &target.path_and_query)
        {
            assert_goes_to(&uri, &base)?;
        }
    }

    #[test]
    fn upstream_uri_never_takes_the_host_from_the_path(
        path_and_query in prop_oneof![
            path(),
            segment().prop_map(|s| format!("@{s}")),
            segment().prop_map(|s| format!("{s}@evil.example/v2/")),
        ],
        base in prop::sample::select(BASES),
    ) {
        let base: Uri = base.parse().map_err(|e| TestCaseError::fail(format!("{e}")))?;
        if let Some(uri) = upstream_uri(&base, &path_and_query) {
            assert_goes_to(&uri, &base)?;
        }
    }
}
