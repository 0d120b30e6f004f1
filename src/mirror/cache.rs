//! The manifest cache (`[manifest_cache]`): verified manifests by ECR repository and digest,
//! bounded in bytes, and for a short while what a tag resolved to.
//!
//! A containerd pull resolves a tag with HEAD, then fetches the same manifest by digest, and every
//! platform of a node pool fetches the same index and manifests again. Serving those locally saves
//! a round trip to ECR each. Entries are content-addressed and stored only after their sha256
//! matched, so a bad upstream answer can never poison the cache.
//!
//! Tags ([`TagCache`]) are remembered for `tag_ttl` only (5 minutes by default). ECR itself
//! re-checks an upstream tag only once every 24 hours, so a tag moved upstream reaches a node
//! within 24 h plus `tag_ttl` anyway: the short cache costs users nothing they have today, and it
//! turns the repeated tag GETs of a rollout (and of `imagePullPolicy: Always` restarts) into local
//! answers instead of `BatchGetImage` calls against the account's shared quota.

use std::time::Duration;

use bytes::Bytes;
use http::HeaderMap;
use http::header::{ACCEPT, IF_NONE_MATCH};
use serde::Deserialize;
use toml::Spanned;

use crate::config::error::{ConfigError, Locator};

/// Default `manifest_cache.max_bytes`: 64 MiB of manifest bodies.
pub const DEFAULT_MAX_BYTES: u64 = 64 * 1024 * 1024;
/// Default `manifest_cache.tag_ttl`.
pub const DEFAULT_TAG_TTL: Duration = Duration::from_secs(5 * 60);
/// How many tags the tag cache holds at most: a node pulls a few hundred images at the most,
/// each under a few `Accept` lists.
const TAG_ENTRIES: u64 = 10_000;

/// `[manifest_cache]` as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawManifestCache {
    max_bytes: Option<Spanned<u64>>,
    tag_ttl: Option<Spanned<String>>,
}

/// `[manifest_cache]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheConfig {
    /// Upper bound, in bytes, of the manifest bodies held.
    pub max_bytes: u64,
    /// How long a tag's answer is reused; zero turns the tag cache off.
    pub tag_ttl: Duration,
}

impl Default for CacheConfig {
    fn default() -> Self {
        Self {
            max_bytes: DEFAULT_MAX_BYTES,
            tag_ttl: DEFAULT_TAG_TTL,
        }
    }
}

/// Validates `[manifest_cache]`.
pub(crate) fn validate(
    raw: &RawManifestCache,
    at: Locator<'_>,
) -> Result<CacheConfig, ConfigError> {
    Ok(CacheConfig {
        max_bytes: raw
            .max_bytes
            .as_ref()
            .map_or(DEFAULT_MAX_BYTES, |s| *s.get_ref()),
        tag_ttl: at.duration_or_off(&raw.tag_ttl, "manifest_cache.tag_ttl", DEFAULT_TAG_TTL)?,
    })
}

/// A verified manifest.
#[derive(Debug, Clone)]
pub struct CachedManifest {
    /// The exact bytes ECR sent.
    pub body: Bytes,
    /// ECR's `Content-Type`.
    pub media_type: String,
    /// `sha256:<hex>` of `body`.
    pub digest: String,
}

/// A moka cache weighed by body size.
#[derive(Clone, Debug)]
pub struct ManifestCache {
    inner: moka::future::Cache<(String, String), CachedManifest>,
}

impl ManifestCache {
    /// A cache holding at most `max_bytes` of manifest bodies.
    pub fn new(max_bytes: u64) -> Self {
        let inner = moka::future::Cache::builder()
            .max_capacity(max_bytes)
            .weigher(|_k: &(String, String), v: &CachedManifest| {
                u32::try_from(v.body.len() + v.media_type.len()).unwrap_or(u32::MAX)
            })
            .build();
        Self { inner }
    }

    /// The manifest `digest` of `repository`, if cached and acceptable to the client.
    pub async fn get(
        &self,
        repository: &str,
        digest: &str,
        client: &HeaderMap,
    ) -> Option<CachedManifest> {
        let m = self
            .inner
            .get(&(repository.to_owned(), digest.to_owned()))
            .await?;
        accepts(client, &m.media_type).then_some(m)
    }

    /// Stores a manifest whose digest has been verified. Every GET by tag brings its manifest
    /// again, and an entry is content-addressed, so one already cached is only marked as used:
    /// a read costs less than moka's write path and leaves nothing for its housekeeping.
    pub async fn insert(&self, repository: &str, m: CachedManifest) {
        let key = (repository.to_owned(), m.digest.clone());
        if self.inner.get(&key).await.is_none() {
            self.inner.insert(key, m).await;
        }
    }
}

/// What a tag resolved to, for [`CacheConfig::tag_ttl`]: `(repository, tag, Accept)` → digest.
/// The client's `Accept` is part of the key because a registry answers a tag with an index or a
/// single manifest depending on it.
#[derive(Clone, Debug)]
pub struct TagCache {
    inner: Option<moka::future::Cache<(String, String, String), String>>,
}

impl TagCache {
    /// A tag cache keeping answers for `ttl`; none at all for zero.
    pub fn new(ttl: Duration) -> Self {
        let inner = (!ttl.is_zero()).then(|| {
            moka::future::Cache::builder()
                .max_capacity(TAG_ENTRIES)
                .time_to_live(ttl)
                .build()
        });
        Self { inner }
    }

    /// The digest `tag` of `repository` resolved to for a client with these headers, if known.
    pub async fn get(&self, repository: &str, tag: &str, client: &HeaderMap) -> Option<String> {
        let inner = self.inner.as_ref()?;
        inner.get(&key(repository, tag, client)?).await
    }

    /// Remembers what `tag` resolved to.
    pub async fn insert(&self, repository: &str, tag: &str, client: &HeaderMap, digest: &str) {
        if let (Some(inner), Some(k)) = (&self.inner, key(repository, tag, client)) {
            inner.insert(k, digest.to_owned()).await;
        }
    }
}

/// The cache key, or `None` for a conditional request, whose answer depends on more than the tag.
fn key(repository: &str, tag: &str, client: &HeaderMap) -> Option<(String, String, String)> {
    if client.contains_key(IF_NONE_MATCH) {
        return None;
    }
    Some((repository.to_owned(), tag.to_owned(), accept_key(client)))
}

/// Every `Accept` value of a request, in order: part of the key of anything whose answer depends
/// on content negotiation.
pub fn accept_key(client: &HeaderMap) -> String {
    client
        .get_all(ACCEPT)
        .iter()
        .map(|v| String::from_utf8_lossy(v.as_bytes()))
        .collect::<Vec<_>>()
        .join(",")
}

/// Whether the client's `Accept` headers allow `media_type`. No `Accept` means anything.
pub fn accepts(headers: &HeaderMap, media_type: &str) -> bool {
    let mut any = false;
    for v in headers.get_all(ACCEPT) {
        let Ok(v) = v.to_str() else { continue };
        for item in v.split(',') {
            let t = item.split(';').next().unwrap_or("").trim();
            if t.is_empty() {
                continue;
            }
            any = true;
            if t == "*/*" || t.eq_ignore_ascii_case(media_type) {
                return true;
            }
        }
    }
    !any
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;
    use rstest::rstest;

    const INDEX: &str = "application/vnd.oci.image.index.v1+json";
    const MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";

    #[rstest]
    #[case::none(&[], true)]
    #[case::exact(&[INDEX], true)]
    #[case::list(&["application/vnd.docker.distribution.manifest.v2+json, application/vnd.oci.image.index.v1+json"], true)]
    #[case::wildcard(&[MANIFEST, "*/*"], true)]
    #[case::params(&["application/vnd.oci.image.index.v1+json; q=0.5"], true)]
    #[case::other_only(&[MANIFEST], false)]
    #[case::empty_value(&[""], true)]
    fn accept_negotiation(#[case] accept: &[&str], #[case] want: bool) {
        let mut h = HeaderMap::new();
        for a in accept {
            h.append(ACCEPT, HeaderValue::from_str(a).unwrap());
        }
        assert_eq!(accepts(&h, INDEX), want);
    }

    #[tokio::test]
    async fn serves_only_acceptable_types() {
        let c = ManifestCache::new(1 << 20);
        c.insert(
            "r",
            CachedManifest {
                body: Bytes::from_static(b"{}"),
                media_type: INDEX.into(),
                digest: "sha256:x".into(),
            },
        )
        .await;
        let mut h = HeaderMap::new();
        assert!(c.get("r", "sha256:x", &h).await.is_some());
        assert!(
            c.get("other", "sha256:x", &h).await.is_none(),
            "keyed by repository"
        );
        h.insert(ACCEPT, HeaderValue::from_static(MANIFEST));
        assert!(c.get("r", "sha256:x", &h).await.is_none());
    }
}
