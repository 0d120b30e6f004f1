//! Routing: turns a mirror request's method, path and query into a validated [`Route`], with no IO.
//!
//! This is the first step of the data flow and the trust boundary: everything after it works on
//! names, tags and digests that match the OCI distribution grammar, and on a registry that is in
//! the config. Anything else is refused here with a client error and never reaches ECR.

use std::collections::BTreeMap;

use http::Method;

use crate::config::upstreams::Upstream;
use crate::oci::{Digest, MAX_NAME_LEN, RegistryHost, valid_name, valid_tag};

/// What a request asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// `GET /v2/` (or `/v2`): the API version check, answered locally.
    Root,
    /// A read of one repository.
    Api(ApiRequest),
}

/// A validated read of a repository on a configured upstream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiRequest {
    /// The upstream registry, from `?ns=`, the path prefix or `default_upstream`.
    pub registry: RegistryHost,
    /// The repository name as the client named it (no `library/` added yet).
    pub name: String,
    /// Which endpoint.
    pub kind: Kind,
    /// The query string without `ns`, as the client sent it (e.g. `n=10&last=x`).
    pub query: String,
}

/// The read-only endpoints a pull mirror serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    /// `/manifests/<tag or digest>`.
    Manifest(ManifestRef),
    /// `/blobs/<digest>`.
    Blob(Digest),
    /// `/tags/list`.
    Tags,
    /// `/referrers/<digest>`.
    Referrers(Digest),
}

impl Kind {
    /// A short label for logs and metrics.
    pub fn label(&self) -> &'static str {
        match self {
            Kind::Manifest(_) => "manifest",
            Kind::Blob(_) => "blob",
            Kind::Tags => "tags",
            Kind::Referrers(_) => "referrers",
        }
    }
}

/// A manifest reference.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ManifestRef {
    /// A tag, e.g. `3.19`.
    Tag(String),
    /// A content digest.
    Digest(Digest),
}

impl ManifestRef {
    /// The reference as it appears in the path.
    pub fn as_str(&self) -> &str {
        match self {
            ManifestRef::Tag(t) => t,
            ManifestRef::Digest(d) => d.as_str(),
        }
    }
}

/// Why a request was refused. Every variant is the client's doing (a 4xx).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    /// Not GET or HEAD: a pull-through mirror is read-only.
    #[error("method {0} is not supported: this is a read-only pull mirror")]
    MethodNotAllowed(String),
    /// Not an endpoint this mirror serves (catalog, uploads, anything outside `/v2`).
    #[error("{0} is not served by this pull mirror")]
    NotServed(String),
    /// The repository name breaks the distribution grammar.
    #[error("invalid repository name {0:?}")]
    NameInvalid(String),
    /// The manifest reference is neither a valid tag nor a valid digest.
    #[error("invalid tag {0:?}")]
    TagInvalid(String),
    /// A digest that breaks the digest grammar.
    #[error("invalid digest {0:?}")]
    DigestInvalid(String),
    /// The registry is not configured, or none could be chosen.
    #[error("registry {0:?} is not configured on this mirror")]
    UnknownRegistry(String),
}

/// Routes a request. `query` is the raw query string, if any.
pub fn route(
    method: &Method,
    path: &str,
    query: Option<&str>,
    upstreams: &BTreeMap<RegistryHost, Upstream>,
    default_upstream: Option<&RegistryHost>,
) -> Result<Route, RouteError> {
    if method != Method::GET && method != Method::HEAD {
        return Err(RouteError::MethodNotAllowed(method.to_string()));
    }
    if path == "/v2" || path == "/v2/" {
        return Ok(Route::Root);
    }
    let Some(rest) = path.strip_prefix("/v2/") else {
        return Err(RouteError::NotServed(truncate(path)));
    };
    let segments: Vec<&str> = rest.split('/').collect();
    let n = segments.len();
    // The shortest API path is `<name>/tags/list`: three segments.
    if n < 3 {
        return Err(RouteError::NotServed(truncate(path)));
    }
    let (kind_seg, last) = (segments[n - 2], segments[n - 1]);
    let name_segments = &segments[..n - 2];

    let (ns, kept_query) = split_ns(query.unwrap_or(""));
    let (registry, name_segments) = match ns {
        Some(ns) => {
            let reg = RegistryHost::parse(&ns)
                .filter(|r| upstreams.contains_key(r))
                .ok_or(RouteError::UnknownRegistry(truncate(&ns)))?;
            (reg, name_segments)
        }
        None => match path_prefix_registry(name_segments, upstreams) {
            Some(reg) => (reg, &name_segments[1..]),
            // `/v2/gcr.io/distroless/static/...` names a registry, just not a configured one.
            // Every client splits a reference the same way (distribution's
            // `splitDockerDomain`): a first component with a `.` or a `:`, or `localhost`, is a
            // registry host, never a repository's namespace. So it is refused here, naming that
            // registry, rather than sent to `default_upstream` as
            // `docker-hub/gcr.io/distroless/static`, a repository that cannot exist. (Docker's
            // rule also counts upper case; such a name stays NAME_INVALID, as it always was.)
            None if name_segments.len() >= 2 && names_a_registry(name_segments[0]) => {
                return Err(RouteError::UnknownRegistry(truncate(name_segments[0])));
            }
            None => match default_upstream {
                Some(reg) => (reg.clone(), name_segments),
                None => {
                    return Err(RouteError::UnknownRegistry(String::from(
                        "(none: no ?ns=, no registry path prefix, no default_upstream)",
                    )));
                }
            },
        },
    };
    let name = name_segments.join("/");
    if name.len() > MAX_NAME_LEN || !valid_name(&name) {
        return Err(RouteError::NameInvalid(truncate(&name)));
    }

    let kind = match (kind_seg, last) {
        ("manifests", r) => {
            Kind::Manifest(parse_reference(r).ok_or_else(|| RouteError::TagInvalid(truncate(r)))?)
        }
        ("blobs", d) if d != "uploads" => {
            Kind::Blob(Digest::parse(d).ok_or_else(|| RouteError::DigestInvalid(truncate(d)))?)
        }
        ("referrers", d) => {
            Kind::Referrers(Digest::parse(d).ok_or_else(|| RouteError::DigestInvalid(truncate(d)))?)
        }
        ("tags", "list") => Kind::Tags,
        _ => return Err(RouteError::NotServed(truncate(path))),
    };
    Ok(Route::Api(ApiRequest {
        registry,
        name,
        kind,
        query: kept_query,
    }))
}

/// The CRI-O / podman form `/v2/<registry>/<name>/...`: only when the first segment is a
/// configured registry and a name follows it.
fn path_prefix_registry(
    segments: &[&str],
    upstreams: &BTreeMap<RegistryHost, Upstream>,
) -> Option<RegistryHost> {
    if segments.len() < 2 {
        return None;
    }
    RegistryHost::parse(segments[0]).filter(|r| upstreams.contains_key(r))
}

/// Docker's rule for the domain part of a reference, less its upper-case clause.
fn names_a_registry(first: &str) -> bool {
    first.contains(['.', ':']) || first == "localhost"
}

/// A manifest reference is a digest if it has a `:`, else a tag.
fn parse_reference(r: &str) -> Option<ManifestRef> {
    if r.contains(':') {
        return Digest::parse(r).map(ManifestRef::Digest);
    }
    valid_tag(r).then(|| ManifestRef::Tag(r.to_owned()))
}

/// Splits `ns` (percent-decoded) out of a raw query and keeps the rest byte for byte.
fn split_ns(query: &str) -> (Option<String>, String) {
    let mut ns = None;
    let mut kept: Vec<&str> = Vec::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        match pair.strip_prefix("ns=") {
            Some(v) if ns.is_none() => ns = Some(percent_decode(v)),
            Some(_) => {}
            None => kept.push(pair),
        }
    }
    (ns, kept.join("&"))
}

/// Decodes `%XX` escapes; an invalid escape is kept literally (it then fails validation).
fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| (c as char).to_digit(16);
        if b[i] == b'%'
            && let (Some(h), Some(l)) = (
                b.get(i + 1).copied().and_then(hex),
                b.get(i + 2).copied().and_then(hex),
            )
        {
            out.push((h * 16 + l) as u8);
            i += 3;
            continue;
        }
        out.push(if b[i] == b'+' { b' ' } else { b[i] });
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Keeps error messages (and log lines) bounded whatever the client sent. The errors print their
/// value with `{:?}`, which writes a control character as up to 10 (`\u{10ffff}`), so the cut is
/// made on that escaped width, not on bytes (fuzz target `route_map` found a 1.8 KB message made
/// of 300 bytes of `%16` in `?ns=`).
fn truncate(s: &str) -> String {
    const MAX: usize = 300;
    let mut width = 0;
    for (i, c) in s.char_indices() {
        width += c.escape_debug().count();
        if width > MAX {
            return format!("{}…", &s[..i]);
        }
    }
    s.to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rstest::rstest;

    const SHA: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    fn upstreams() -> BTreeMap<RegistryHost, Upstream> {
        ["docker.io", "quay.io", "registry.k8s.io", "localhost:5000"]
            .iter()
            .map(|r| {
                let reg = RegistryHost::parse(r).unwrap();
                let up = Upstream {
                    prefix: "p1".into(),
                    server: reg.default_server(),
                };
                (reg, up)
            })
            .collect()
    }

    fn api(registry: &str, name: &str, kind: Kind, query: &str) -> Result<Route, RouteError> {
        Ok(Route::Api(ApiRequest {
            registry: RegistryHost::parse(registry).unwrap(),
            name: name.into(),
            kind,
            query: query.into(),
        }))
    }

    fn tag(t: &str) -> Kind {
        Kind::Manifest(ManifestRef::Tag(t.into()))
    }

    fn digest() -> Digest {
        Digest::parse(SHA).unwrap()
    }

    #[rstest]
    #[case::root("GET", "/v2/", None, Ok(Route::Root))]
    #[case::root_no_slash("GET", "/v2", None, Ok(Route::Root))]
    #[case::root_head("HEAD", "/v2/", None, Ok(Route::Root))]
    #[case::manifest_tag(
        "GET",
        "/v2/library/alpine/manifests/3.19",
        Some("ns=docker.io"),
        api("docker.io", "library/alpine", tag("3.19"), "")
    )]
    #[case::single_segment(
        "GET",
        "/v2/alpine/manifests/latest",
        Some("ns=docker.io"),
        api("docker.io", "alpine", tag("latest"), "")
    )]
    #[case::manifest_digest("HEAD", &format!("/v2/library/alpine/manifests/{SHA}"), Some("ns=docker.io"),
        api("docker.io", "library/alpine", Kind::Manifest(ManifestRef::Digest(digest())), ""))]
    #[case::blob("GET", &format!("/v2/prometheus/node-exporter/blobs/{SHA}"), Some("ns=quay.io"),
        api("quay.io", "prometheus/node-exporter", Kind::Blob(digest()), ""))]
    #[case::tags_keep_query(
        "GET",
        "/v2/pause/tags/list",
        Some("n=10&ns=registry.k8s.io&last=3.8"),
        api("registry.k8s.io", "pause", Kind::Tags, "n=10&last=3.8")
    )]
    #[case::referrers("GET", &format!("/v2/a/b/referrers/{SHA}"), Some("ns=quay.io&artifactType=x%2Fy"),
        api("quay.io", "a/b", Kind::Referrers(digest()), "artifactType=x%2Fy"))]
    #[case::nested_name(
        "GET",
        "/v2/a/b/c/d/manifests/v1",
        Some("ns=quay.io"),
        api("quay.io", "a/b/c/d", tag("v1"), "")
    )]
    #[case::name_with_keyword(
        "GET",
        "/v2/org/manifests/manifests/v1",
        Some("ns=quay.io"),
        api("quay.io", "org/manifests", tag("v1"), "")
    )]
    #[case::alias_index(
        "GET",
        "/v2/library/alpine/manifests/3",
        Some("ns=index.docker.io"),
        api("docker.io", "library/alpine", tag("3"), "")
    )]
    #[case::alias_registry1(
        "GET",
        "/v2/library/alpine/manifests/3",
        Some("ns=registry-1.docker.io"),
        api("docker.io", "library/alpine", tag("3"), "")
    )]
    #[case::ns_with_port_encoded(
        "GET",
        "/v2/app/manifests/1",
        Some("ns=localhost%3A5000"),
        api("localhost:5000", "app", tag("1"), "")
    )]
    #[case::path_prefix(
        "GET",
        "/v2/docker.io/library/alpine/manifests/3.19",
        None,
        api("docker.io", "library/alpine", tag("3.19"), "")
    )]
    #[case::path_prefix_alias(
        "GET",
        "/v2/index.docker.io/alpine/manifests/3.19",
        None,
        api("docker.io", "alpine", tag("3.19"), "")
    )]
    #[case::path_prefix_quay(
        "GET",
        "/v2/quay.io/prometheus/node-exporter/tags/list",
        None,
        api("quay.io", "prometheus/node-exporter", Kind::Tags, "")
    )]
    #[case::ns_wins_over_prefix(
        "GET",
        "/v2/quay.io/x/manifests/1",
        Some("ns=docker.io"),
        api("docker.io", "quay.io/x", tag("1"), "")
    )]
    #[case::separators(
        "GET",
        "/v2/a.b_c__d--e/manifests/_T.a-g",
        Some("ns=quay.io"),
        api("quay.io", "a.b_c__d--e", tag("_T.a-g"), "")
    )]
    #[case::put("PUT", "/v2/library/alpine/manifests/3", Some("ns=docker.io"),
        Err(RouteError::MethodNotAllowed("PUT".into())))]
    #[case::post_upload("POST", "/v2/library/alpine/blobs/uploads/", Some("ns=docker.io"),
        Err(RouteError::MethodNotAllowed("POST".into())))]
    #[case::delete("DELETE", "/v2/", None, Err(RouteError::MethodNotAllowed("DELETE".into())))]
    #[case::catalog("GET", "/v2/_catalog", None, Err(RouteError::NotServed("/v2/_catalog".into())))]
    #[case::outside_v2("GET", "/metrics", None, Err(RouteError::NotServed("/metrics".into())))]
    #[case::unknown_endpoint("GET", "/v2/a/things/x", Some("ns=docker.io"),
        Err(RouteError::NotServed("/v2/a/things/x".into())))]
    #[case::upload_get("GET", "/v2/a/blobs/uploads", Some("ns=docker.io"),
        Err(RouteError::NotServed("/v2/a/blobs/uploads".into())))]
    #[case::unknown_ns("GET", "/v2/a/manifests/1", Some("ns=ghcr.io"),
        Err(RouteError::UnknownRegistry("ghcr.io".into())))]
    #[case::evil_ns("GET", "/v2/a/manifests/1", Some("ns=docker.io.evil.example"),
        Err(RouteError::UnknownRegistry("docker.io.evil.example".into())))]
    #[case::ns_with_path("GET", "/v2/a/manifests/1", Some("ns=docker.io%2Fx"),
        Err(RouteError::UnknownRegistry("docker.io/x".into())))]
    #[case::no_registry("GET", "/v2/a/manifests/1", None, Err(RouteError::UnknownRegistry(
        "(none: no ?ns=, no registry path prefix, no default_upstream)".into())))]
    #[case::unconfigured_path_prefix("GET", "/v2/gcr.io/distroless/static/manifests/latest", None,
        Err(RouteError::UnknownRegistry("gcr.io".into())))]
    #[case::unconfigured_path_prefix_with_port("GET", "/v2/localhost:5001/app/manifests/1", None,
        Err(RouteError::UnknownRegistry("localhost:5001".into())))]
    #[case::unconfigured_path_prefix_localhost("GET", "/v2/localhost/app/manifests/1", None,
        Err(RouteError::UnknownRegistry("localhost".into())))]
    #[case::dotdot("GET", "/v2/library/../secret/manifests/1", Some("ns=docker.io"),
        Err(RouteError::NameInvalid("library/../secret".into())))]
    #[case::encoded_slash("GET", "/v2/library%2Falpine/manifests/1", Some("ns=docker.io"),
        Err(RouteError::NameInvalid("library%2Falpine".into())))]
    #[case::empty_segment("GET", "/v2/library//alpine/manifests/1", Some("ns=docker.io"),
        Err(RouteError::NameInvalid("library//alpine".into())))]
    #[case::trailing_slash_name("GET", "/v2/alpine//manifests/1", Some("ns=docker.io"),
        Err(RouteError::NameInvalid("alpine/".into())))]
    #[case::uppercase_name("GET", "/v2/Library/alpine/manifests/1", Some("ns=docker.io"),
        Err(RouteError::NameInvalid("Library/alpine".into())))]
    #[case::leading_separator("GET", "/v2/-a/manifests/1", Some("ns=docker.io"),
        Err(RouteError::NameInvalid("-a".into())))]
    #[case::triple_underscore("GET", "/v2/a___b/manifests/1", Some("ns=docker.io"),
        Err(RouteError::NameInvalid("a___b".into())))]
    #[case::bad_tag("GET", "/v2/a/manifests/.hidden", Some("ns=docker.io"),
        Err(RouteError::TagInvalid(".hidden".into())))]
    #[case::encoded_tag("GET", "/v2/a/manifests/v%2F1", Some("ns=docker.io"),
        Err(RouteError::TagInvalid("v%2F1".into())))]
    #[case::long_tag("GET", &format!("/v2/a/manifests/{}", "t".repeat(129)), Some("ns=docker.io"),
        Err(RouteError::TagInvalid("t".repeat(129))))]
    #[case::short_sha("GET", "/v2/a/manifests/sha256:abc", Some("ns=docker.io"),
        Err(RouteError::TagInvalid("sha256:abc".into())))]
    #[case::bad_blob_digest("GET", "/v2/a/blobs/latest", Some("ns=docker.io"),
        Err(RouteError::DigestInvalid("latest".into())))]
    #[case::upper_hex("GET", &format!("/v2/a/blobs/{}", SHA.to_uppercase().replace("SHA256", "sha256")),
        Some("ns=docker.io"),
        Err(RouteError::DigestInvalid(SHA.to_uppercase().replace("SHA256", "sha256"))))]
    #[case::bad_referrers("GET", "/v2/a/referrers/v1", Some("ns=docker.io"),
        Err(RouteError::DigestInvalid("v1".into())))]
    fn routes(
        #[case] method: &str,
        #[case] path: &str,
        #[case] query: Option<&str>,
        #[case] want: Result<Route, RouteError>,
    ) {
        let method = Method::from_bytes(method.as_bytes()).unwrap();
        assert_eq!(route(&method, path, query, &upstreams(), None), want);
    }

    /// With `default_upstream = "docker.io"`: what a client that sends no registry gets.
    #[rstest]
    #[case::official_image(
        "/v2/alpine/manifests/1",
        None,
        api("docker.io", "alpine", tag("1"), "")
    )]
    #[case::user_image(
        "/v2/someorg/app/manifests/1",
        None,
        api("docker.io", "someorg/app", tag("1"), "")
    )]
    #[case::configured_path_prefix(
        "/v2/quay.io/a/b/manifests/1",
        None,
        api("quay.io", "a/b", tag("1"), "")
    )]
    #[case::ns_still_wins(
        "/v2/gcr.io/x/manifests/1",
        Some("ns=quay.io"),
        api("quay.io", "gcr.io/x", tag("1"), "")
    )]
    // A repository named like a registry is a single component: Docker's rule needs a `/` after it.
    #[case::registry_like_single_name(
        "/v2/gcr.io/manifests/1",
        None,
        api("docker.io", "gcr.io", tag("1"), "")
    )]
    // Never `docker-hub/gcr.io/distroless/static`: a 404 naming the registry.
    #[case::unconfigured_registry("/v2/gcr.io/distroless/static/manifests/latest", None,
        Err(RouteError::UnknownRegistry("gcr.io".into())))]
    #[case::unconfigured_registry_with_port("/v2/registry.example:5000/app/blobs/sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef", None,
        Err(RouteError::UnknownRegistry("registry.example:5000".into())))]
    #[case::unconfigured_localhost("/v2/localhost/app/manifests/1", None,
        Err(RouteError::UnknownRegistry("localhost".into())))]
    #[case::upper_case_stays_invalid("/v2/Library/alpine/manifests/1", None,
        Err(RouteError::NameInvalid("Library/alpine".into())))]
    fn default_upstream_is_used_without_ns(
        #[case] path: &str,
        #[case] query: Option<&str>,
        #[case] want: Result<Route, RouteError>,
    ) {
        let hub = RegistryHost::parse("docker.io").unwrap();
        assert_eq!(
            route(&Method::GET, path, query, &upstreams(), Some(&hub)),
            want
        );
    }

    #[test]
    fn the_unconfigured_registry_is_named_in_the_message() {
        let err = route(
            &Method::GET,
            "/v2/gcr.io/distroless/static/manifests/latest",
            None,
            &upstreams(),
            None,
        )
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "registry \"gcr.io\" is not configured on this mirror"
        );
    }

    #[test]
    fn over_long_name_is_invalid() {
        let name = vec!["abcdefghij"; 24].join("/");
        assert!(name.len() > MAX_NAME_LEN);
        let path = format!("/v2/{name}/manifests/1");
        let got = route(
            &Method::GET,
            &path,
            Some("ns=docker.io"),
            &upstreams(),
            None,
        );
        assert!(matches!(got, Err(RouteError::NameInvalid(_))), "{got:?}");
    }

    #[rstest]
    #[case::long_name(&format!("/v2/{}/manifests/1", "A".repeat(10_000)), "ns=docker.io")]
    #[case::control_chars_in_ns("/v2/a/manifests/1", &format!("ns={}", "%16".repeat(300)))]
    #[case::control_chars_in_name(&format!("/v2/{}/manifests/1", "\u{16}".repeat(300)), "ns=docker.io")]
    #[case::wide_chars_in_name(&format!("/v2/{}/manifests/1", "\u{10ffff}".repeat(300)), "ns=docker.io")]
    fn error_text_is_bounded(#[case] path: &str, #[case] query: &str) {
        let err = route(&Method::GET, path, Some(query), &upstreams(), None).unwrap_err();
        assert!(
            err.to_string().len() < 400,
            "{} bytes",
            err.to_string().len()
        );
    }
}
