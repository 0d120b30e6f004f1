//! The AWS side of the token: the SDK config every command loads (the default credential chain,
//! our own HTTP client), and `GetAuthorizationToken` as the cache's [`TokenSource`], with the
//! SDK's throttling codes told apart, since a fleet scaling out meets throttling and waits it
//! out ([`super::TokenCache::get_within`]) where any other failure answers at once.

use std::time::SystemTime;

use super::{BoxFuture, FetchedToken, Secret, TokenError, TokenSource};

/// Loads the AWS SDK config the way every command does: the default credential chain (IMDS on a
/// node, IRSA, Pod Identity), TLS by rustls with ring (the process's one crypto provider), and
/// `ecr.region` over the chain's region. `AWS_ENDPOINT_URL_ECR` points it elsewhere (tests).
pub async fn sdk_config(config: &crate::config::Config) -> aws_config::SdkConfig {
    let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest());
    match crate::mirror::forward::SdkHttpClient::new() {
        Ok(client) => loader = loader.http_client(client),
        // Only a broken TLS setup gets here; the SDK then fails each call with a clear error.
        Err(e) => tracing::error!(error = %e, "no HTTP client for the AWS SDK"),
    }
    if let Some(r) = &config.ecr.region {
        loader = loader.region(aws_config::Region::new(r.clone()));
    }
    loader.load().await
}

/// The real source: aws-sdk-ecr with the SDK's default credential chain and retry policy (which
/// already backs off with jitter on throttling).
#[derive(Debug, Clone)]
pub struct EcrTokenSource {
    client: aws_sdk_ecr::Client,
}

impl EcrTokenSource {
    /// Wraps an SDK client.
    pub fn new(client: aws_sdk_ecr::Client) -> Self {
        Self { client }
    }
}

impl TokenSource for EcrTokenSource {
    fn fetch(&self) -> BoxFuture<'_, Result<FetchedToken, TokenError>> {
        Box::pin(async move {
            let out = self
                .client
                .get_authorization_token()
                .send()
                .await
                .map_err(|e| {
                    use aws_sdk_ecr::error::ProvideErrorMetadata as _;
                    let why = aws_sdk_ecr::error::DisplayErrorContext(&e).to_string();
                    if e.code().is_some_and(is_throttling) {
                        TokenError::Throttled(why)
                    } else {
                        TokenError::Api(why)
                    }
                })?;
            let data = out.authorization_data().first().ok_or(TokenError::Empty)?;
            let token = data
                .authorization_token()
                .filter(|t| !t.is_empty())
                .ok_or(TokenError::Empty)?;
            Ok(FetchedToken {
                authorization_token: Secret::new(token.to_owned()),
                expires_at: data
                    .expires_at()
                    .and_then(|t| SystemTime::try_from(*t).ok()),
                proxy_endpoint: data.proxy_endpoint().map(str::to_owned),
            })
        })
    }
}

/// Whether an AWS error code means "slow down" (the codes the AWS SDKs' standard retry mode
/// treats as throttling).
pub fn is_throttling(code: &str) -> bool {
    matches!(
        code,
        "Throttling"
            | "ThrottlingException"
            | "ThrottledException"
            | "RequestThrottledException"
            | "TooManyRequestsException"
            | "ProvisionedThroughputExceededException"
            | "TransactionInProgressException"
            | "RequestLimitExceeded"
            | "BandwidthLimitExceeded"
            | "LimitExceededException"
            | "RequestThrottled"
            | "SlowDown"
            | "PriorRequestNotComplete"
            | "EC2ThrottledException"
    )
}

impl TokenError {
    /// A throttling error with this description.
    pub fn throttled(why: impl Into<String>) -> Self {
        TokenError::Throttled(why.into())
    }
}
