//! `pullthrough ecr warm`: fetch images' manifests **by tag** through the ECR pull-through
//! path, and every platform manifest of an index, so that ECR imports them; for an image pinned
//! as `name:tag@digest`, then check that ECR now serves that digest.
//!
//! Why: ECR fills its cache only from a pull by tag. A workload pinned by digest misses the
//! cache until something has pulled its tag once; warm is that something. It uses the mirror's
//! own pieces: [`crate::oci::reference`] to normalize the image, [`crate::mirror::map`] for the ECR
//! repository, [`crate::mirror::token`] for the token and [`crate::mirror::forward`] for the HTTP
//! client. The webhook warms with the same [`warm_image`] at admission.
//!
//! What to do with each image is decided first, with no IO ([`classify`], [`plan`]); the
//! requests follow ([`warm_all`]), and the report is pure again ([`super::warm_report::render`]). Images named on the
//! command line are held to what they promise (one that cannot be warmed is a failure); images
//! found in pods ([`super::pods`]) are whatever the cluster runs, so one on no configured
//! upstream, or pinned by digest alone, is reported and skipped.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{ACCEPT, AUTHORIZATION, CONTENT_TYPE};
use http::{HeaderMap, HeaderValue, Method, StatusCode, Uri};
use http_body_util::{BodyExt, Limited};
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::config::upstreams::Upstream;
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
    /// The tag points at the pinned digest and was fetched, but ECR does not serve that digest.
    #[error("the tag was fetched, but ECR does not serve the pinned {digest}: {source}")]
    Pinned {
        /// The pinned digest.
        digest: String,
        /// The digest request's failure.
        source: Box<WarmError>,
    },
}

impl WarmError {
    /// Whether ECR answered that it does not have the manifest.
    fn is_not_found(&self) -> bool {
        matches!(self, WarmError::Status { status, .. } if *status == StatusCode::NOT_FOUND)
    }
}

/// An image, resolved to what warm fetches.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct WarmTarget {
    /// The normalized reference, e.g. `docker.io/library/alpine:3.19` (with `@digest` if pinned).
    pub image: String,
    /// The ECR repository, e.g. `docker-hub/library/alpine`.
    pub repository: String,
    /// The tag to fetch.
    pub tag: String,
    /// The digest of `image:tag@digest`, which should resolve in ECR once the tag is warmed.
    pub pinned: Option<String>,
}

/// What warm can do with an image, decided from the reference and the upstreams alone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Class {
    /// Fetch this tag through ECR (and check the pinned digest, if any).
    Warm(WarmTarget),
    /// `name@digest`: there is no tag, and ECR imports only by tag.
    NoTag,
    /// The registry (named here) is not a configured upstream, so it has no pull-through prefix.
    NotUpstream(String),
    /// Not an image reference, or one ECR could not hold (the reason).
    Invalid(String),
}

impl Class {
    /// Why an image that is not [`Class::Warm`] is not warmed; `None` for `Warm`.
    pub fn reason(&self) -> Option<String> {
        match self {
            Class::Warm(_) => None,
            Class::NoTag => {
                Some("no tag to import by: ECR fills its cache only from a pull by tag".into())
            }
            Class::NotUpstream(registry) => Some(format!(
                "{registry} is not a configured upstream, so it has no pull-through prefix"
            )),
            Class::Invalid(why) => Some(why.clone()),
        }
    }
}

/// Resolves `image` against `upstreams`. Returns the name to report it by (the normalized
/// reference, or `image` as written when it does not parse) and what warm can do with it. Pure.
pub fn classify(upstreams: &BTreeMap<RegistryHost, Upstream>, image: &str) -> (String, Class) {
    let r = match Reference::parse(image) {
        Ok(r) => r,
        Err(e) => {
            return (
                image.to_owned(),
                Class::Invalid(format!("{image:?} is not an image reference: {e}")),
            );
        }
    };
    let name = r.to_string();
    let Some((registry, upstream)) =
        RegistryHost::parse(r.registry()).and_then(|reg| upstreams.get(&reg).map(|u| (reg, u)))
    else {
        return (name, Class::NotUpstream(r.registry().to_owned()));
    };
    let Some(tag) = r.tag() else {
        return (name, Class::NoTag);
    };
    match crate::mirror::map::ecr_repository(&registry, r.repository(), upstream) {
        Ok(repository) => (
            name.clone(),
            Class::Warm(WarmTarget {
                image: name,
                repository,
                tag: tag.to_owned(),
                pinned: r.digest().map(str::to_owned),
            }),
        ),
        Err(e) => (name, Class::Invalid(e.to_string())),
    }
}

/// Resolves `image` against the configured upstreams, or says why it cannot be warmed. Pure.
pub fn target(config: &Config, image: &str) -> Result<WarmTarget, WarmError> {
    match classify(&config.upstreams, image) {
        (_, Class::Warm(t)) => Ok(t),
        (_, Class::NoTag) => Err(WarmError::Image(format!(
            "{image:?} has a digest but no tag: ECR fills its cache only from a pull by tag"
        ))),
        (_, other) => Err(WarmError::Image(other.reason().unwrap_or_default())),
    }
}

/// One image to report on, and what to do with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Job {
    /// The normalized reference (as written when it does not parse).
    pub image: String,
    /// What to do.
    pub action: Action,
}

/// What [`warm_all`] does for a [`Job`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Warm the tag.
    Warm(WarmTarget),
    /// Report and move on (an image found in pods that cannot be warmed): the reason.
    Skip(String),
    /// Report as failed (an image named on the command line that cannot be warmed): the reason.
    Fail(String),
}

/// The jobs for images `named` on the command line (or in `--file`) and images `found` in pods:
/// each image once, by its normalized reference, in the order first seen, named ones first. A
/// named image that cannot be warmed fails; a found one is skipped. Pure.
pub fn plan(
    upstreams: &BTreeMap<RegistryHost, Upstream>,
    named: &[String],
    found: &[String],
) -> Vec<Job> {
    let mut seen = BTreeSet::new();
    let mut jobs = Vec::new();
    let sources = named
        .iter()
        .map(|i| (i, true))
        .chain(found.iter().map(|i| (i, false)));
    for (image, strict) in sources {
        let (name, class) = classify(upstreams, image.trim());
        if !seen.insert(name.clone()) {
            continue;
        }
        let action = match class {
            Class::Warm(t) => Action::Warm(t),
            Class::NoTag if strict => Action::Fail(format!(
                "{image:?} has a digest but no tag: ECR fills its cache only from a pull by tag"
            )),
            other => {
                let why = other.reason().unwrap_or_default();
                if strict {
                    Action::Fail(why)
                } else {
                    Action::Skip(why)
                }
            }
        };
        jobs.push(Job {
            image: name,
            action,
        });
    }
    jobs
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
        let digest = header_digest.unwrap_or_else(|| crate::oci::Digest::sha256_of(&body));
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

/// What became of a pinned digest once its tag was warmed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Pinned {
    /// The tag (or its index) points at it, and ECR serves it.
    Cached,
    /// The tag moved on to the digest named here, but ECR still holds the pinned one (cached
    /// before the tag moved).
    StillCached(String),
    /// The tag moved on to the digest named here, and ECR does not hold the pinned one: it cannot
    /// enter the cache by tag any more.
    Uncacheable(String),
}

/// The outcome for one image.
#[derive(Debug)]
pub enum Outcome {
    /// The tag and every platform manifest of its index were fetched.
    Warmed {
        /// Platform manifests of an index (0 for a single manifest).
        children: usize,
        /// For `name:tag@digest`: what became of the digest.
        pinned: Option<Pinned>,
    },
    /// Not warmed, and not a failure (found in pods, but not warmable): why.
    Skipped(String),
    /// The first failure.
    Failed(WarmError),
    /// Not warmed because of Ctrl-C (not started, or stopped by a second one).
    Interrupted,
}

/// One image's row of the report.
#[derive(Debug)]
pub struct Warmed {
    /// The normalized reference (as written when it does not parse).
    pub image: String,
    /// The ECR repository, when the image resolved.
    pub repository: Option<String>,
    /// Manifests fetched (the tag's, one per child, and the pinned digest's).
    pub manifests: usize,
    /// Time to first byte of the tag's manifest.
    pub ttfb: Option<Duration>,
    /// What happened.
    pub outcome: Outcome,
}

impl Warmed {
    fn not_warmed(image: String, repository: Option<String>, outcome: Outcome) -> Warmed {
        Warmed {
            image,
            repository,
            manifests: 0,
            ttfb: None,
            outcome,
        }
    }

    /// Whether this row makes the command exit 1: a failure, or not done because of Ctrl-C.
    pub fn is_failure(&self) -> bool {
        matches!(self.outcome, Outcome::Failed(_) | Outcome::Interrupted)
    }
}

/// Warms one image: its tag, then every child manifest by digest (ECR serves them from the
/// index it has just imported), then, for `name:tag@digest`, the pinned digest (unless it was
/// one of the children, already fetched).
pub async fn warm_image(fetcher: &Fetcher, t: &WarmTarget) -> Warmed {
    let mut w = Warmed::not_warmed(
        t.image.clone(),
        Some(t.repository.clone()),
        Outcome::Interrupted,
    );
    let root = match fetcher.manifest(&t.repository, &t.tag).await {
        Ok(f) => f,
        Err(e) => {
            w.outcome = Outcome::Failed(e);
            return w;
        }
    };
    w.manifests = 1;
    w.ttfb = Some(root.ttfb);
    for digest in &root.children {
        if let Err(e) = fetcher.manifest(&t.repository, digest).await {
            w.outcome = Outcome::Failed(e);
            return w;
        }
        w.manifests += 1;
    }
    let pinned = match t.pinned.as_deref() {
        None => None,
        Some(d) if root.children.iter().any(|c| c == d) => Some(Pinned::Cached),
        Some(d) => {
            let on_tag = root.digest == d;
            let by_digest = fetcher.manifest(&t.repository, d).await;
            if by_digest.is_ok() {
                w.manifests += 1;
            }
            match (on_tag, by_digest) {
                (true, Ok(_)) => Some(Pinned::Cached),
                (false, Ok(_)) => Some(Pinned::StillCached(root.digest.clone())),
                (false, Err(e)) if e.is_not_found() => {
                    Some(Pinned::Uncacheable(root.digest.clone()))
                }
                (true, Err(e)) => {
                    w.outcome = Outcome::Failed(WarmError::Pinned {
                        digest: d.to_owned(),
                        source: Box::new(e),
                    });
                    return w;
                }
                (false, Err(e)) => {
                    w.outcome = Outcome::Failed(e);
                    return w;
                }
            }
        }
    };
    w.outcome = Outcome::Warmed {
        children: root.children.len(),
        pinned,
    };
    w
}

/// Runs `jobs`, at most `concurrency` warms at a time, started in order, and returns one row per
/// job in order. `tick` is called as each job finishes (the progress bar). Once `stop` is
/// cancelled no warm starts, and those in flight finish; once `abort` is, those in flight are
/// dropped too. Either way the rows of what did not run say [`Outcome::Interrupted`].
pub async fn warm_all(
    fetcher: &Fetcher,
    jobs: Vec<Job>,
    concurrency: usize,
    stop: &CancellationToken,
    abort: &CancellationToken,
    tick: impl Fn() + Send + Sync + 'static,
) -> Vec<Warmed> {
    let sem = Arc::new(tokio::sync::Semaphore::new(concurrency.max(1)));
    let tick = Arc::new(tick);
    let mut set = tokio::task::JoinSet::new();
    let mut out: Vec<Option<Warmed>> = (0..jobs.len()).map(|_| None).collect();
    let mut images = Vec::with_capacity(jobs.len());
    for (i, job) in jobs.into_iter().enumerate() {
        images.push((job.image.clone(), repository_of(&job)));
        let t = match job.action {
            Action::Skip(why) => {
                out[i] = Some(Warmed::not_warmed(job.image, None, Outcome::Skipped(why)));
                tick();
                continue;
            }
            Action::Fail(why) => {
                out[i] = Some(Warmed::not_warmed(
                    job.image,
                    None,
                    Outcome::Failed(WarmError::Image(why)),
                ));
                tick();
                continue;
            }
            Action::Warm(t) => t,
        };
        // `biased`: once Ctrl-C has been pressed, a permit freed by a finished warm must not
        // start another.
        let permit = tokio::select! {
            biased;
            () = stop.cancelled() => None,
            p = Arc::clone(&sem).acquire_owned() => p.ok(),
        };
        let Some(permit) = permit else {
            out[i] = Some(Warmed::not_warmed(
                t.image.clone(),
                Some(t.repository.clone()),
                Outcome::Interrupted,
            ));
            tick();
            continue;
        };
        let fetcher = fetcher.clone();
        let tick = Arc::clone(&tick);
        let abort = abort.clone();
        set.spawn(async move {
            let _permit = permit;
            let w = tokio::select! {
                biased;
                () = abort.cancelled() => Warmed::not_warmed(
                    t.image.clone(),
                    Some(t.repository.clone()),
                    Outcome::Interrupted,
                ),
                w = warm_image(&fetcher, &t) => w,
            };
            tick();
            (i, w)
        });
    }
    while let Some(joined) = set.join_next().await {
        if let Ok((i, w)) = joined {
            out[i] = Some(w);
        }
    }
    out.into_iter()
        .zip(images)
        .map(|(w, (image, repository))| {
            w.unwrap_or_else(|| {
                Warmed::not_warmed(
                    image,
                    repository,
                    Outcome::Failed(WarmError::Image("the warm task failed".into())),
                )
            })
        })
        .collect()
}

fn repository_of(job: &Job) -> Option<String> {
    match &job.action {
        Action::Warm(t) => Some(t.repository.clone()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rstest::rstest;

    const SHA_A: &str = "sha256:aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
    const SHA_B: &str = "sha256:bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb";

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
    #[case::tag_and_digest(&format!("alpine:3@{SHA_A}"), Ok((&*format!("docker.io/library/alpine:3@{SHA_A}"), "docker-hub/library/alpine", "3")))]
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

    /// What [`classify`] decides, as a short string: `warm repo:tag[@digest]`, `no-tag`,
    /// `not-upstream REGISTRY` or `invalid`.
    fn class_label(c: &Class) -> String {
        match c {
            Class::Warm(t) => match &t.pinned {
                Some(d) => format!("warm {}:{}@{}", t.repository, t.tag, &d[7..11]),
                None => format!("warm {}:{}", t.repository, t.tag),
            },
            Class::NoTag => "no-tag".into(),
            Class::NotUpstream(r) => format!("not-upstream {r}"),
            Class::Invalid(_) => "invalid".into(),
        }
    }

    #[rstest]
    #[case::tag(
        "nginx:1.27",
        "docker.io/library/nginx:1.27",
        "warm docker-hub/library/nginx:1.27"
    )]
    #[case::tag_and_digest(&format!("nginx:1.27@{SHA_A}"), &format!("docker.io/library/nginx:1.27@{SHA_A}"), "warm docker-hub/library/nginx:1.27@aaaa")]
    #[case::digest_only(&format!("nginx@{SHA_A}"), &format!("docker.io/library/nginx@{SHA_A}"), "no-tag")]
    #[case::digest_only_on_no_upstream(&format!("ghcr.io/a/b@{SHA_A}"), &format!("ghcr.io/a/b@{SHA_A}"), "not-upstream ghcr.io")]
    #[case::other_registry("ghcr.io/org/app:1", "ghcr.io/org/app:1", "not-upstream ghcr.io")]
    #[case::registry_with_port(
        "quay.io:5000/org/app:1",
        "quay.io:5000/org/app:1",
        "not-upstream quay.io:5000"
    )]
    #[case::quay_default_port("quay.io:443/org/app:1", "quay.io/org/app:1", "warm quay/org/app:1")]
    #[case::not_a_reference("Nginx:1", "Nginx:1", "invalid")]
    fn classified(#[case] image: &str, #[case] name: &str, #[case] want: &str) {
        let (got_name, class) = classify(&config().upstreams, image);
        assert_eq!(got_name, name);
        assert_eq!(class_label(&class), want);
    }

    fn strings(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| (*s).to_owned()).collect()
    }

    /// `(image, action)` with the action as `warm`, `skip: …` or `fail: …` (start of the reason).
    fn plan_labels(named: &[&str], found: &[&str]) -> Vec<(String, String)> {
        plan(&config().upstreams, &strings(named), &strings(found))
            .into_iter()
            .map(|j| {
                let a = match j.action {
                    Action::Warm(_) => "warm".to_owned(),
                    Action::Skip(w) => format!("skip: {}", &w[..w.len().min(20)]),
                    Action::Fail(w) => format!("fail: {}", &w[..w.len().min(20)]),
                };
                (j.image, a)
            })
            .collect()
    }

    #[rstest]
    #[case::spellings_of_one_image_dedupe(
        &[],
        &["nginx:1.27", "docker.io/library/nginx:1.27", "index.docker.io/nginx:1.27"],
        &[("docker.io/library/nginx:1.27", "warm")]
    )]
    #[case::tag_and_tag_at_digest_are_two_images(
        &[],
        &["nginx:1", &*format!("nginx:1@{SHA_A}"), &*format!("nginx:1@{SHA_B}")],
        &[("docker.io/library/nginx:1", "warm"), (&*format!("docker.io/library/nginx:1@{SHA_A}"), "warm"), (&*format!("docker.io/library/nginx:1@{SHA_B}"), "warm")]
    )]
    #[case::found_in_pods_is_skipped_not_failed(
        &[],
        &[&*format!("nginx@{SHA_A}"), "ghcr.io/org/app:1", "Bad:1"],
        &[(&*format!("docker.io/library/nginx@{SHA_A}"), "skip: no tag to import by:"), ("ghcr.io/org/app:1", "skip: ghcr.io is not a con"), ("Bad:1", "skip: \"Bad:1\" is not an im")]
    )]
    #[case::named_is_failed(
        &[&*format!("nginx@{SHA_A}"), "ghcr.io/org/app:1"],
        &[],
        &[(&*format!("docker.io/library/nginx@{SHA_A}"), "fail: \"nginx@sha256:aaaaaa"), ("ghcr.io/org/app:1", "fail: ghcr.io is not a con")]
    )]
    #[case::named_wins_over_found(
        &["ghcr.io/org/app:1"],
        &["ghcr.io/org/app:1", "alpine:3"],
        &[("ghcr.io/org/app:1", "fail: ghcr.io is not a con"), ("docker.io/library/alpine:3", "warm")]
    )]
    #[case::whitespace_trimmed(&[], &[" alpine:3 "], &[("docker.io/library/alpine:3", "warm")])]
    #[case::nothing(&[], &[], &[])]
    fn plans(#[case] named: &[&str], #[case] found: &[&str], #[case] want: &[(&str, &str)]) {
        let want: Vec<(String, String)> = want
            .iter()
            .map(|(i, a)| ((*i).to_owned(), (*a).to_owned()))
            .collect();
        assert_eq!(plan_labels(named, found), want);
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
}
