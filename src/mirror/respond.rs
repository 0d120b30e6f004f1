//! Responding: the one place where a [`ProxyError`] becomes an HTTP status and an OCI error body.
//!
//! Each error knows where it came from ([`Source`], after pingora's `ErrorSource`): the client
//! gets a 4xx, a failing upstream a 502/503/504, an internal fault a 500. The table in
//! [`ProxyError::classify`] is tuned for containerd, which tries its next host (finally the real
//! registry) on any error status, and retries 429 and 408 at once with no backoff, so those
//! become 503.

use http::{Response, StatusCode};

use super::breaker::BreakerError;
use super::map::MapError;
use super::route::RouteError;
use super::token::TokenError;
use crate::body::ResponseBody;
use crate::oci::{ErrorCode, error_response};

/// Where an error came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// The client asked for something this mirror refuses.
    Downstream,
    /// ECR (the token API or the registry endpoint) failed.
    Upstream,
    /// A fault of our own.
    Internal,
}

/// What ECR did not have, for the code of a 404.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Missing {
    /// A manifest.
    Manifest,
    /// A blob.
    Blob,
    /// A repository (tags, referrers).
    Repository,
}

/// Everything that can go wrong serving one request. `Clone`, so that requests that shared one
/// upstream exchange ([`super::coalesce`]) all answer with its error.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ProxyError {
    /// The request was refused by the router.
    #[error(transparent)]
    Route(#[from] RouteError),
    /// The request cannot be mapped to an ECR repository.
    #[error(transparent)]
    Map(#[from] MapError),
    /// No ECR token.
    #[error(transparent)]
    Token(#[from] TokenError),
    /// The ECR registry URL is not known yet (no endpoint or account configured, and the token
    /// API did not name one).
    #[error("the ECR registry endpoint is unknown: set ecr.endpoint or ecr.account")]
    NoEndpoint,
    /// Could not connect to the ECR endpoint.
    #[error("cannot reach the ECR endpoint: {0}")]
    Connect(String),
    /// The circuit breaker is open: answered at once, without trying the endpoint.
    #[error(transparent)]
    Breaker(#[from] BreakerError),
    /// The ECR endpoint did not answer in time.
    #[error("the ECR endpoint sent no response headers within {0:?}")]
    Timeout(std::time::Duration),
    /// The ECR endpoint failed mid-exchange.
    #[error("the ECR endpoint failed: {0}")]
    UpstreamIo(String),
    /// ECR answered with an error status.
    #[error("the ECR endpoint answered {status}")]
    Status {
        /// What ECR answered.
        status: StatusCode,
        /// What was asked for.
        missing: Missing,
    },
    /// ECR's content does not match the digest asked for (or the digest it stated); it is never
    /// served or cached.
    #[error("the ECR endpoint sent a manifest whose digest is {got}, not {want}")]
    DigestMismatch {
        /// Requested digest.
        want: String,
        /// sha256 of what came back.
        got: String,
    },
    /// A manifest larger than any registry accepts.
    #[error("the ECR endpoint sent a manifest over {0} bytes")]
    ManifestTooLarge(usize),
    /// A bug or resource failure of ours.
    #[error("internal error: {0}")]
    Internal(String),
}

impl ProxyError {
    /// The decision table: source, status and OCI code of each error.
    pub fn classify(&self) -> (Source, StatusCode, ErrorCode) {
        use ErrorCode as C;
        use Source::*;
        match self {
            ProxyError::Route(r) => match r {
                RouteError::MethodNotAllowed(_) => {
                    (Downstream, StatusCode::METHOD_NOT_ALLOWED, C::Unsupported)
                }
                RouteError::NotServed(_) => (Downstream, StatusCode::NOT_FOUND, C::Unsupported),
                RouteError::NameInvalid(_) => (Downstream, StatusCode::BAD_REQUEST, C::NameInvalid),
                RouteError::TagInvalid(_) => (Downstream, StatusCode::BAD_REQUEST, C::TagInvalid),
                RouteError::DigestInvalid(_) => {
                    (Downstream, StatusCode::BAD_REQUEST, C::DigestInvalid)
                }
                RouteError::UnknownRegistry(_) => {
                    (Downstream, StatusCode::NOT_FOUND, C::NameUnknown)
                }
            },
            // ECR would refuse the name; a 404 sends containerd to the real registry.
            ProxyError::Map(_) => (Downstream, StatusCode::NOT_FOUND, C::NameUnknown),
            ProxyError::Token(_) | ProxyError::NoEndpoint | ProxyError::Breaker(_) => {
                (Upstream, StatusCode::SERVICE_UNAVAILABLE, C::Unavailable)
            }
            ProxyError::Connect(_) | ProxyError::UpstreamIo(_) => {
                (Upstream, StatusCode::BAD_GATEWAY, C::Unknown)
            }
            ProxyError::Timeout(_) => (Upstream, StatusCode::GATEWAY_TIMEOUT, C::Unknown),
            ProxyError::Status { status, missing } => match status.as_u16() {
                401 | 403 | 404 => (
                    Upstream,
                    StatusCode::NOT_FOUND,
                    match missing {
                        Missing::Manifest => C::ManifestUnknown,
                        Missing::Blob => C::BlobUnknown,
                        Missing::Repository => C::NameUnknown,
                    },
                ),
                408 | 429 => (Upstream, StatusCode::SERVICE_UNAVAILABLE, C::Unavailable),
                _ => (Upstream, StatusCode::BAD_GATEWAY, C::Unknown),
            },
            ProxyError::DigestMismatch { .. } | ProxyError::ManifestTooLarge(_) => {
                (Upstream, StatusCode::BAD_GATEWAY, C::ManifestInvalid)
            }
            ProxyError::Internal(_) => (Internal, StatusCode::INTERNAL_SERVER_ERROR, C::Unknown),
        }
    }

    /// The response: status from [`classify`](Self::classify) and an OCI error body
    /// (headers only for HEAD).
    pub fn into_response(self, head: bool) -> Response<ResponseBody> {
        let (source, status, code) = self.classify();
        match source {
            Source::Internal => tracing::error!(error = %self, "internal error"),
            Source::Upstream => tracing::debug!(error = %self, "upstream error"),
            Source::Downstream => tracing::debug!(error = %self, "refused request"),
        }
        error_response(status, code, &self.to_string(), head)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::oci::{API_VERSION, API_VERSION_HEADER};
    use http_body_util::BodyExt;
    use rstest::rstest;
    use std::time::Duration;

    fn status(s: u16, missing: Missing) -> ProxyError {
        ProxyError::Status {
            status: StatusCode::from_u16(s).unwrap(),
            missing,
        }
    }

    #[rstest]
    #[case::method(ProxyError::Route(RouteError::MethodNotAllowed("PUT".into())), 405, "UNSUPPORTED", Source::Downstream)]
    #[case::catalog(ProxyError::Route(RouteError::NotServed("/v2/_catalog".into())), 404, "UNSUPPORTED", Source::Downstream)]
    #[case::name(ProxyError::Route(RouteError::NameInvalid("A".into())), 400, "NAME_INVALID", Source::Downstream)]
    #[case::tag(ProxyError::Route(RouteError::TagInvalid(".x".into())), 400, "TAG_INVALID", Source::Downstream)]
    #[case::digest(ProxyError::Route(RouteError::DigestInvalid("x".into())), 400, "DIGEST_INVALID", Source::Downstream)]
    #[case::unknown_ns(ProxyError::Route(RouteError::UnknownRegistry("ghcr.io".into())), 404, "NAME_UNKNOWN", Source::Downstream)]
    #[case::too_long(ProxyError::Map(MapError::TooLong("x".into())), 404, "NAME_UNKNOWN", Source::Downstream)]
    #[case::token(
        ProxyError::Token(TokenError::Empty),
        503,
        "UNAVAILABLE",
        Source::Upstream
    )]
    #[case::connect(ProxyError::Connect("refused".into()), 502, "UNKNOWN", Source::Upstream)]
    #[case::breaker_open(
        ProxyError::Breaker(BreakerError::Open { next_probe: Duration::from_secs(1) }),
        503,
        "UNAVAILABLE",
        Source::Upstream
    )]
    #[case::timeout(
        ProxyError::Timeout(Duration::from_secs(1)),
        504,
        "UNKNOWN",
        Source::Upstream
    )]
    #[case::not_found_manifest(
        status(404, Missing::Manifest),
        404,
        "MANIFEST_UNKNOWN",
        Source::Upstream
    )]
    #[case::not_found_blob(status(404, Missing::Blob), 404, "BLOB_UNKNOWN", Source::Upstream)]
    #[case::unauthorized_after_retry(
        status(401, Missing::Repository),
        404,
        "NAME_UNKNOWN",
        Source::Upstream
    )]
    #[case::forbidden(
        status(403, Missing::Manifest),
        404,
        "MANIFEST_UNKNOWN",
        Source::Upstream
    )]
    #[case::throttled(status(429, Missing::Blob), 503, "UNAVAILABLE", Source::Upstream)]
    #[case::request_timeout(status(408, Missing::Blob), 503, "UNAVAILABLE", Source::Upstream)]
    #[case::server_error(status(500, Missing::Blob), 502, "UNKNOWN", Source::Upstream)]
    #[case::unavailable(status(503, Missing::Blob), 502, "UNKNOWN", Source::Upstream)]
    #[case::mismatch(ProxyError::DigestMismatch { want: "a".into(), got: "b".into() }, 502, "MANIFEST_INVALID", Source::Upstream)]
    #[case::internal(ProxyError::Internal("x".into()), 500, "UNKNOWN", Source::Internal)]
    fn decision_table(
        #[case] e: ProxyError,
        #[case] code: u16,
        #[case] oci: &str,
        #[case] source: Source,
    ) {
        let (s, st, c) = e.classify();
        assert_eq!((s, st.as_u16(), c.as_str()), (source, code, oci));
    }

    #[tokio::test]
    async fn body_is_an_oci_error() {
        let resp = ProxyError::Route(RouteError::NameInvalid("A".into())).into_response(false);
        assert_eq!(resp.status(), 400);
        assert_eq!(resp.headers()[API_VERSION_HEADER], API_VERSION);
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["errors"][0]["code"], "NAME_INVALID");
        assert_eq!(v["errors"][0]["message"], "invalid repository name \"A\"");
    }
}
