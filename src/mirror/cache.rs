//! The manifest cache: verified manifests by ECR repository and digest, bounded in bytes.
//!
//! A containerd pull resolves a tag with HEAD, then fetches the same manifest by digest, and every
//! platform of a node pool fetches the same index and manifests again. Serving those locally saves
//! a round trip to ECR each. Entries are content-addressed and stored only after their sha256
//! matched, so a bad upstream answer can never poison the cache; tags are never cached.

use bytes::Bytes;
use http::HeaderMap;
use http::header::ACCEPT;

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
