//! Mapping: where a routed request lives in ECR's pull-through namespace. Pure, no IO.
//!
//! A pull-through rule with prefix `docker-hub` serves Docker Hub's `library/nginx` as the ECR
//! repository `docker-hub/library/nginx`. Docker Hub is the one registry whose single-segment
//! names are shorthand for `library/<name>`; no other registry, and no multi-segment name, ever
//! gets `library/`.

use super::route::{ApiRequest, Kind};
use crate::config::upstreams::Upstream;
use crate::oci::RegistryHost;

/// ECR's limit on a repository name, prefix included.
pub const ECR_MAX_REPOSITORY_LEN: usize = 256;

/// Why a request cannot be mapped. ECR would refuse it, so the client should go upstream.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MapError {
    /// The prefixed name is longer than ECR allows.
    #[error(
        "ECR repository name {0:?} would exceed ECR's {ECR_MAX_REPOSITORY_LEN}-character limit"
    )]
    TooLong(String),
}

/// A request mapped onto the ECR registry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// The ECR repository, e.g. `docker-hub/library/alpine`.
    pub repository: String,
    /// Path and query to request from the ECR endpoint.
    pub path_and_query: String,
}

/// The ECR repository for `name` on an upstream.
pub fn repository(req: &ApiRequest, upstream: &Upstream) -> Result<String, MapError> {
    ecr_repository(&req.registry, &req.name, upstream)
}

/// The ECR repository for repository `name` of `registry` on its upstream: the one mapping the
/// mirror, the webhook and `pullthrough rewrite` share.
pub fn ecr_repository(
    registry: &RegistryHost,
    name: &str,
    upstream: &Upstream,
) -> Result<String, MapError> {
    let library = if registry.is_docker_hub() && !name.contains('/') {
        "library/"
    } else {
        ""
    };
    let repo = format!("{}/{library}{name}", upstream.prefix);
    if repo.len() > ECR_MAX_REPOSITORY_LEN {
        return Err(MapError::TooLong(repo));
    }
    Ok(repo)
}

/// Maps a routed request to its ECR path. `ns` is already gone from `req.query`; the rest of the
/// query (tag-list paging, referrers filters) is kept.
pub fn map(req: &ApiRequest, upstream: &Upstream) -> Result<Target, MapError> {
    let repository = repository(req, upstream)?;
    let endpoint = match &req.kind {
        Kind::Manifest(r) => format!("manifests/{}", r.as_str()),
        Kind::Blob(d) => format!("blobs/{}", d.as_str()),
        Kind::Tags => "tags/list".to_owned(),
        Kind::Referrers(d) => format!("referrers/{}", d.as_str()),
    };
    let query = if req.query.is_empty() {
        String::new()
    } else {
        format!("?{}", req.query)
    };
    Ok(Target {
        path_and_query: format!("/v2/{repository}/{endpoint}{query}"),
        repository,
    })
}

#[cfg(test)]
mod properties;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mirror::route::ManifestRef;
    use crate::oci::Digest;
    use rstest::rstest;

    const SHA: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    fn req(registry: &str, name: &str, kind: Kind, query: &str) -> ApiRequest {
        ApiRequest {
            registry: RegistryHost::parse(registry).unwrap(),
            name: name.into(),
            kind,
            query: query.into(),
        }
    }

    fn tag(t: &str) -> Kind {
        Kind::Manifest(ManifestRef::Tag(t.into()))
    }

    fn up(prefix: &str) -> Upstream {
        Upstream {
            prefix: prefix.into(),
            server: String::new(),
        }
    }

    #[rstest]
    #[case::hub_official(
        req("docker.io", "library/alpine", tag("3.19"), ""),
        "docker-hub",
        "/v2/docker-hub/library/alpine/manifests/3.19"
    )]
    #[case::hub_single_segment_gets_library(
        req("docker.io", "alpine", tag("3.19"), ""),
        "docker-hub",
        "/v2/docker-hub/library/alpine/manifests/3.19"
    )]
    #[case::hub_user_image_no_library(
        req("docker.io", "bitnami/redis", tag("7.2"), ""),
        "docker-hub",
        "/v2/docker-hub/bitnami/redis/manifests/7.2"
    )]
    #[case::hub_nested(
        req("docker.io", "a/b/c", tag("1"), ""),
        "docker-hub",
        "/v2/docker-hub/a/b/c/manifests/1"
    )]
    #[case::quay_single_segment_no_library(
        req("quay.io", "coreos", tag("1"), ""),
        "quay",
        "/v2/quay/coreos/manifests/1"
    )]
    #[case::k8s(
        req("registry.k8s.io", "pause", tag("3.9"), ""),
        "kubernetes",
        "/v2/kubernetes/pause/manifests/3.9"
    )]
    #[case::blob(req("quay.io", "prometheus/node-exporter", Kind::Blob(Digest::parse(SHA).unwrap()), ""),
        "quay", &format!("/v2/quay/prometheus/node-exporter/blobs/{SHA}"))]
    #[case::digest(req("docker.io", "alpine", Kind::Manifest(ManifestRef::Digest(Digest::parse(SHA).unwrap())), ""),
        "docker-hub", &format!("/v2/docker-hub/library/alpine/manifests/{SHA}"))]
    #[case::tags_paging(
        req("docker.io", "alpine", Kind::Tags, "n=10&last=3.18"),
        "docker-hub",
        "/v2/docker-hub/library/alpine/tags/list?n=10&last=3.18"
    )]
    #[case::referrers(req("quay.io", "a/b", Kind::Referrers(Digest::parse(SHA).unwrap()), "artifactType=x"),
        "quay", &format!("/v2/quay/a/b/referrers/{SHA}?artifactType=x"))]
    #[case::nested_prefix(
        req("ghcr.io", "org/app", tag("1"), ""),
        "cache/github",
        "/v2/cache/github/org/app/manifests/1"
    )]
    fn maps(#[case] r: ApiRequest, #[case] prefix: &str, #[case] want: &str) {
        assert_eq!(map(&r, &up(prefix)).unwrap().path_and_query, want);
    }

    #[test]
    fn repository_length_limit() {
        let prefix = "docker-hub";
        // 10 + 1 + 8 ("library/") + 237 = 256 exactly: allowed.
        let ok = "a".repeat(237);
        assert_eq!(
            repository(&req("docker.io", &ok, tag("1"), ""), &up(prefix))
                .unwrap()
                .len(),
            256
        );
        let long = "a".repeat(238);
        assert!(matches!(
            map(&req("docker.io", &long, tag("1"), ""), &up(prefix)),
            Err(MapError::TooLong(_))
        ));
    }
}
