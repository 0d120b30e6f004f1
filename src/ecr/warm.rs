//! `pullthrough ecr warm`: fetch images' manifests **by tag** through the ECR pull-through
//! path, and every platform manifest of an index, so that ECR imports them.
//!
//! Why: ECR fills its cache only from a pull by tag. A workload pinned by digest misses the
//! cache until something has pulled its tag once; warm is that something. It uses the mirror's
//! own pieces: [`crate::oci::reference`] to normalize the image, [`crate::mirror::map`] for the ECR
//! repository, [`crate::mirror::token`] for the token and [`crate::mirror::forward`] for the HTTP client.

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{ACCEPT, AUTHORIZATION, CONTENT_TYPE};
use http::{HeaderMap, HeaderValue, Method, StatusCode, Uri};
use http_body_util::{BodyExt, Limited};

use crate::config::Config;
use crate::mirror::forward::{ForwardError, Forwarder};
use crate::mirror::token::{TokenCache, TokenError};
use crate::oci::RegistryHost;
use crate::oci::reference::Reference;

/// Manifest media types warm asks for: OCI and Docker, single and multi-platform.
pub const MANIFEST_ACCEPT: &str = "application/vnd.oci.image.index.v1+json, \
    application/vnd.oci.image.manifest.v1+json, \
    application/vnd.docker.distribution.manifest.list.v2+json, \
    application/vnd.docker.distribution.manifest.v2+json";
/// Largest manifest read, as in the mirror.
const MAX_MANIFEST_BYTES: usize = 4 * 1024 * 1024;

/// Why an image could not be warmed.
#[derive(Debug, thiserror::Error)]
pub enum WarmError {
    /// The image is not something warm can fetch by tag through a configured upstream.
    #[error("{0}")]
    Image(String),
    /// No token.
    #[error(transparent)]
    Token(#[from] TokenError),
    /// The HTTP exchange failed.
    #[error(transparent)]
    Forward(#[from] ForwardError),
    /// ECR answered with an error status.
    #[error("ECR answered {status} for {path}: {body}")]
    Status {
        /// The status.
        status: StatusCode,
        /// The request path.
        path: String,
        /// The start of the error body.
        body: String,
    },
    /// Reading the manifest failed or it was too large.
    #[error("reading the manifest of {path}: {message}")]
    Body {
        /// The request path.
        path: String,
        /// What happened.
        message: String,
    },
    /// Neither config nor the token names the registry endpoint.
    #[error("no ECR registry endpoint: set ecr.account (and a region) or ecr.endpoint")]
    NoEndpoint,
}

/// An image, resolved to what warm fetches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WarmTarget {
    /// The normalized reference, e.g. `docker.io/library/alpine:3.19`.
    pub image: String,
    /// The ECR repository, e.g. `docker-hub/library/alpine`.
    pub repository: String,
    /// The tag to fetch.
    pub tag: String,
    /// The digest of `image:tag@digest`, which the tag should still point at.
    pub pinned: Option<String>,
}

/// Resolves `image` against the configured upstreams. Pure.
pub fn target(config: &Config, image: &str) -> Result<WarmTarget, WarmError> {
    let r = Reference::parse(image)
        .map_err(|e| WarmError::Image(format!("{image:?} is not an image reference: {e}")))?;
    let registry = RegistryHost::parse(r.registry())
        .filter(|reg| config.upstreams.contains_key(reg))
        .ok_or_else(|| {
            WarmError::Image(format!(
                "{} is not a configured upstream, so it has no pull-through prefix",
                r.registry()
            ))
        })?;
    let Some(tag) = r.tag() else {
        return Err(WarmError::Image(format!(
            "{image:?} has a digest but no tag: ECR fills its cache only from a pull by tag"
        )));
    };
    let upstream = &config.upstreams[&registry];
    let repository = crate::mirror::map::ecr_repository(&registry, r.repository(), upstream)
        .map_err(|e| WarmError::Image(e.to_string()))?;
    Ok(WarmTarget {
        image: format!("{}/{}:{tag}", r.registry(), r.repository()),
        repository,
        tag: tag.to_owned(),
        pinned: r.digest().map(str::to_owned),
    })
}

/// One manifest fetched.
#[derive(Debug, Clone)]
pub struct Fetched {
    /// `Content-Type`.
    pub media_type: String,
    /// The child manifest digests, for an index or manifest list.
    pub children: Vec<String>,
    /// From request sent to response headers.
    pub ttfb: Duration,
    /// Body size.
    pub size: usize,
    /// ECR's `Docker-Content-Digest`, else the body's sha256.
    pub digest: String,
}

/// Fetches manifests from the ECR registry endpoint with the caller's token.
#[derive(Clone, Debug)]
pub struct Fetcher {
    forwarder: Forwarder,
    tokens: TokenCache,
    base: Option<Uri>,
}

impl Fetcher {
    /// `base` is the registry URL from config; `None` uses the token's `proxyEndpoint`.
    pub fn new(forwarder: Forwarder, tokens: TokenCache, base: Option<Uri>) -> Self {
        Self {
            forwarder,
            tokens,
            base,
        }
    }

    /// GETs `repository`'s manifest `reference` (a tag or a digest).
    pub async fn manifest(&self, repository: &str, reference: &str) -> Result<Fetched, WarmError> {
        let token = self.tokens.get().await?;
        let base = self
            .base
            .clone()
            .or_else(|| token.proxy_endpoint.clone())
            .ok_or(WarmError::NoEndpoint)?;
        let path = format!("/v2/{repository}/manifests/{reference}");
        let uri =
            crate::mirror::forward::upstream_uri(&base, &path).ok_or_else(|| WarmError::Body {
                path: path.clone(),
                message: "not a valid URL".into(),
            })?;
        let mut headers = HeaderMap::new();
        headers.insert(ACCEPT, HeaderValue::from_static(MANIFEST_ACCEPT));
        headers.insert(AUTHORIZATION, token.authorization());
        let started = Instant::now();
        let resp = self.forwarder.send(Method::GET, uri, headers).await?;
        let ttfb = started.elapsed();
        let status = resp.status();
        let header_digest = resp
            .headers()
            .get("docker-content-digest")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let media_type = resp
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        let body = Limited::new(resp.into_body(), MAX_MANIFEST_BYTES)
            .collect()
            .await
            .map(|c| c.to_bytes())
            .map_err(|e| WarmError::Body {
                path: path.clone(),
                message: e.to_string(),
            })?;
        if !status.is_success() {
            let text = String::from_utf8_lossy(&body[..body.len().min(300)]).into_owned();
            return Err(WarmError::Status {
                status,
                path,
                body: text.trim().to_owned(),
            });
        }
        let digest = header_digest.unwrap_or_else(|| {
            use sha2::{Digest as _, Sha256};
            let hex: String = Sha256::digest(&body)
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect();
            format!("sha256:{hex}")
        });
        Ok(Fetched {
            children: children(&media_type, &body),
            media_type,
            ttfb,
            size: body.len(),
            digest,
        })
    }
}

/// The manifest digests an index or manifest list points at; empty for anything else.
pub fn children(media_type: &str, body: &Bytes) -> Vec<String> {
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(body) else {
        return Vec::new();
    };
    let declared = v["mediaType"].as_str().unwrap_or(media_type);
    let is_index = declared.contains("image.index") || declared.contains("manifest.list");
    if !is_index {
        return Vec::new();
    }
    v["manifests"]
        .as_array()
        .map(|m| {
            m.iter()
                .filter_map(|d| d["digest"].as_str())
                .filter(|d| crate::oci::Digest::parse(d).is_some())
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default()
}

/// The outcome for one image.
#[derive(Debug)]
pub struct Warmed {
    /// What was asked for (normalized when it parsed).
    pub image: String,
    /// The ECR repository, when the image resolved.
    pub repository: Option<String>,
    /// Manifests fetched (the tag's, plus one per child).
    pub manifests: usize,
    /// Time to first byte of the tag's manifest.
    pub ttfb: Option<Duration>,
    /// `Ok(children)` or the first failure.
    pub result: Result<usize, WarmError>,
    /// Something to know although it worked (a pinned digest the tag no longer points at).
    pub warning: Option<String>,
}

/// Warms one image: its tag, then every child manifest by digest (ECR serves them from the
/// index it has just imported).
pub async fn warm_one(fetcher: &Fetcher, t: &WarmTarget) -> Warmed {
    let mut w = Warmed {
        image: t.image.clone(),
        repository: Some(t.repository.clone()),
        manifests: 0,
        ttfb: None,
        result: Ok(0),
        warning: None,
    };
    let root = match fetcher.manifest(&t.repository, &t.tag).await {
        Ok(f) => f,
        Err(e) => {
            w.result = Err(e);
            return w;
        }
    };
    w.manifests = 1;
    w.ttfb = Some(root.ttfb);
    w.warning = pinned_mismatch(t, &root.digest);
    for digest in &root.children {
        if let Err(e) = fetcher.manifest(&t.repository, digest).await {
            w.result = Err(e);
            return w;
        }
        w.manifests += 1;
    }
    w.result = Ok(root.children.len());
    w
}

/// Warm fills the cache by tag; a pod pinned to `tag@digest` pulls the digest. When the tag has
/// moved on, warming it does not cache what the pod will pull. Pure.
pub fn pinned_mismatch(t: &WarmTarget, tag_digest: &str) -> Option<String> {
    let pinned = t.pinned.as_deref()?;
    (pinned != tag_digest).then(|| {
        format!(
            "{}:{} now points at {tag_digest}, not the pinned {pinned}: the pinned image was not \
             warmed (ECR caches only what a tag points at)",
            t.repository, t.tag
        )
    })
}

/// Warms every image, at most `concurrency` at a time, in input order in the result.
/// `tick` is called as each image finishes (the progress bar).
pub async fn warm_all(
    fetcher: &Fetcher,
    config: &Config,
    images: &[String],
    concurrency: usize,
    tick: impl Fn() + Send + Sync + 'static,
) -> Vec<Warmed> {
    let sem = Arc::new(tokio::sync::Semaphore::new(concurrency.max(1)));
    let tick = Arc::new(tick);
    let mut set = tokio::task::JoinSet::new();
    for (i, image) in images.iter().enumerate() {
        let resolved = target(config, image);
        let fetcher = fetcher.clone();
        let sem = Arc::clone(&sem);
        let tick = Arc::clone(&tick);
        let image = image.clone();
        set.spawn(async move {
            let w = match resolved {
                Err(e) => Warmed {
                    image,
                    repository: None,
                    manifests: 0,
                    ttfb: None,
                    result: Err(e),
                    warning: None,
                },
                Ok(t) => {
                    let _permit = sem.acquire_owned().await;
                    warm_one(&fetcher, &t).await
                }
            };
            tick();
            (i, w)
        });
    }
    let mut out: Vec<Option<Warmed>> = (0..images.len()).map(|_| None).collect();
    while let Some(joined) = set.join_next().await {
        if let Ok((i, w)) = joined {
            out[i] = Some(w);
        }
    }
    out.into_iter()
        .zip(images)
        .map(|(w, image)| {
            w.unwrap_or_else(|| Warmed {
                image: image.clone(),
                repository: None,
                manifests: 0,
                ttfb: None,
                result: Err(WarmError::Image("the warm task failed".into())),
                warning: None,
            })
        })
        .collect()
}

/// Parses an images file: one reference a line; blank lines and `#` comments are skipped.
pub fn parse_images_file(text: &str) -> Vec<String> {
    text.lines()
        .map(|l| l.split('#').next().unwrap_or("").trim())
        .filter(|l| !l.is_empty())
        .map(str::to_owned)
        .collect()
}

/// The summary table.
pub fn render(results: &[Warmed]) -> String {
    let iw = results
        .iter()
        .map(|w| w.image.len())
        .max()
        .unwrap_or(0)
        .max("IMAGE".len());
    let rw = results
        .iter()
        .map(|w| w.repository.as_deref().map_or(1, str::len))
        .max()
        .unwrap_or(0)
        .max("ECR REPOSITORY".len());
    let mut out = format!(
        "{:<iw$}  {:<rw$}  {:>9}  {:>7}  RESULT\n",
        "IMAGE", "ECR REPOSITORY", "MANIFESTS", "TTFB"
    );
    for w in results {
        let ttfb = w
            .ttfb
            .map_or("-".to_owned(), |d| format!("{}ms", d.as_millis()));
        let result = match &w.result {
            Ok(0) => "ok".to_owned(),
            Ok(n) => format!("ok (index, {n} platform manifests)"),
            Err(e) => format!("FAILED: {e}"),
        };
        let _ = writeln!(
            out,
            "{:<iw$}  {:<rw$}  {:>9}  {:>7}  {result}",
            w.image,
            w.repository.as_deref().unwrap_or("-"),
            w.manifests,
            ttfb
        );
        if let Some(warning) = &w.warning {
            let _ = writeln!(out, "  warning: {warning}");
        }
    }
    let ok = results.iter().filter(|w| w.result.is_ok()).count();
    let _ = writeln!(
        out,
        "{ok} of {} images warmed, {} manifests fetched.",
        results.len(),
        results.iter().map(|w| w.manifests).sum::<usize>()
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use rstest::rstest;

    const SHA_A: &str = "sha256:aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";

    fn config() -> Config {
        Config::from_toml_str(
            "[upstreams.\"docker.io\"]\nprefix = \"docker-hub\"\n[upstreams.\"quay.io\"]\nprefix = \"quay\"\n",
            "t.toml",
        )
        .unwrap()
    }

    #[rstest]
    #[case::official_short("alpine:3.19", Ok(("docker.io/library/alpine:3.19", "docker-hub/library/alpine", "3.19")))]
    #[case::implicit_latest("nginx", Ok(("docker.io/library/nginx:latest", "docker-hub/library/nginx", "latest")))]
    #[case::hub_alias("index.docker.io/bitnami/redis:7", Ok(("docker.io/bitnami/redis:7", "docker-hub/bitnami/redis", "7")))]
    #[case::quay_single("quay.io/coreos:1", Ok(("quay.io/coreos:1", "quay/coreos", "1")))]
    #[case::tag_and_digest(&format!("alpine:3@{SHA_A}"), Ok(("docker.io/library/alpine:3", "docker-hub/library/alpine", "3")))]
    #[case::digest_only(&format!("alpine@{SHA_A}"), Err("has a digest but no tag"))]
    #[case::unconfigured("ghcr.io/org/app:1", Err("ghcr.io is not a configured upstream"))]
    #[case::invalid("Alpine:3", Err("is not an image reference"))]
    fn targets(#[case] image: &str, #[case] want: Result<(&str, &str, &str), &str>) {
        match (target(&config(), image), want) {
            (Ok(t), Ok((i, r, tag))) => {
                assert_eq!(
                    (t.image.as_str(), t.repository.as_str(), t.tag.as_str()),
                    (i, r, tag)
                );
            }
            (Err(e), Err(w)) => assert!(e.to_string().contains(w), "{e}"),
            (got, want) => panic!("got {got:?}, want {want:?}"),
        }
    }

    const SHA_B: &str = "sha256:bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb";

    #[rstest]
    #[case::not_pinned("alpine:3", SHA_A, None)]
    #[case::pinned_and_current(&format!("alpine:3@{SHA_A}"), SHA_A, None)]
    #[case::tag_moved(&format!("alpine:3@{SHA_A}"), SHA_B, Some(format!("docker-hub/library/alpine:3 now points at {SHA_B}, not the pinned {SHA_A}: the pinned image was not warmed")))]
    fn pinned_digests(#[case] image: &str, #[case] tag_digest: &str, #[case] want: Option<String>) {
        let t = target(&config(), image).unwrap();
        let got = pinned_mismatch(&t, tag_digest);
        match (got, want) {
            (None, None) => {}
            (Some(g), Some(w)) => assert!(g.starts_with(&w), "{g}"),
            (g, w) => panic!("got {g:?}, want {w:?}"),
        }
    }

    #[rstest]
    #[case::oci_index("application/vnd.oci.image.index.v1+json", r#"{"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[{"digest":"SHA"},{"digest":"SHA"}]}"#, 2)]
    #[case::docker_list(
        "application/vnd.docker.distribution.manifest.list.v2+json",
        r#"{"manifests":[{"digest":"SHA"}]}"#,
        1
    )]
    #[case::index_by_body_only(
        "application/octet-stream",
        r#"{"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[{"digest":"SHA"}]}"#,
        1
    )]
    #[case::image_manifest(
        "application/vnd.oci.image.manifest.v1+json",
        r#"{"layers":[],"manifests":[{"digest":"SHA"}]}"#,
        0
    )]
    #[case::bad_digest(
        "application/vnd.oci.image.index.v1+json",
        r#"{"manifests":[{"digest":"sha256:nope"}]}"#,
        0
    )]
    #[case::not_json("application/vnd.oci.image.index.v1+json", "{", 0)]
    fn index_children(#[case] media_type: &str, #[case] body: &str, #[case] n: usize) {
        let body = Bytes::from(body.replace("SHA", SHA_A));
        assert_eq!(children(media_type, &body).len(), n);
    }

    #[test]
    fn images_file_skips_blanks_and_comments() {
        let got =
            parse_images_file("# base images\nalpine:3.19\n\n  nginx:1.27  # web\n#quay.io/x:1\n");
        assert_eq!(got, ["alpine:3.19", "nginx:1.27"]);
    }

    #[test]
    fn golden_summary() {
        let rows = vec![
            Warmed {
                image: "docker.io/library/alpine:3.19".into(),
                repository: Some("docker-hub/library/alpine".into()),
                manifests: 3,
                ttfb: Some(Duration::from_millis(42)),
                result: Ok(2),
                warning: Some("a warning".into()),
            },
            Warmed {
                image: "ghcr.io/org/app:1".into(),
                repository: None,
                manifests: 0,
                ttfb: None,
                result: Err(WarmError::Image(
                    "ghcr.io is not a configured upstream, so it has no pull-through prefix".into(),
                )),
                warning: None,
            },
        ];
        let want = "\
IMAGE                          ECR REPOSITORY             MANIFESTS     TTFB  RESULT
docker.io/library/alpine:3.19  docker-hub/library/alpine          3     42ms  ok (index, 2 platform manifests)
  warning: a warning
ghcr.io/org/app:1              -                                  0        -  FAILED: ghcr.io is not a configured upstream, so it has no pull-through prefix
1 of 2 images warmed, 3 manifests fetched.
";
        assert_eq!(render(&rows), want, "got:\n{}", render(&rows));
    }
}
