//! The AWS boundary of `pullthrough ecr`: reading what the account has, applying a plan, and
//! turning SDK errors into messages a platform engineer can act on. Nothing here decides what
//! to do; that is [`super::setup`] and [`super::policy`].
//!
//! Tests drive this module with aws-smithy-mocks for the rule, template and registry-policy
//! APIs (moto has none of them) and with moto for repositories and tokens.

use aws_sdk_ecr::Client;
use aws_sdk_ecr::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_ecr::types::{
    EncryptionConfigurationForRepositoryCreationTemplate, EncryptionType, ImageTagMutability,
    RctAppliedFor, Tag,
};
use aws_config::{BehaviorVersion, SdkConfig};

use super::EcrOpsError;
use super::setup::{Op, Plan, RuleSpec, Step, TemplateSpec};
use crate::config::Config;

/// Loads the SDK config the way `serve` does: default credential chain, rustls with ring, and
/// `ecr.region` over the chain's region. `AWS_ENDPOINT_URL_ECR` points it elsewhere (tests).
pub async fn sdk_config(config: &Config) -> SdkConfig {
    let http_client = aws_smithy_http_client::Builder::new()
        .tls_provider(aws_smithy_http_client::tls::Provider::Rustls(
            aws_smithy_http_client::tls::rustls_provider::CryptoMode::Ring,
        ))
        .build_https();
    let mut loader = aws_config::defaults(BehaviorVersion::latest()).http_client(http_client);
    if let Some(r) = &config.ecr.region {
        loader = loader.region(aws_config::Region::new(r.clone()));
    }
    loader.load().await
}

/// Maps an SDK error to a clear one. `op` is the API operation, e.g. `PutRegistryPolicy`.
pub fn api_error<E>(op: &'static str, e: SdkError<E, aws_sdk_ecr::config::http::HttpResponse>) -> EcrOpsError
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
{
    let code = e.code().map(str::to_owned);
    let message = e
        .message()
        .map(str::to_owned)
        .unwrap_or_else(|| DisplayErrorContext(&e).to_string());
    match code.as_deref() {
        Some("AccessDeniedException" | "AccessDenied" | "UnauthorizedOperation") => {
            EcrOpsError::AccessDenied {
                op,
                permission: format!("ecr:{op}"),
                message,
            }
        }
        Some(
            "ThrottlingException" | "Throttling" | "TooManyRequestsException"
            | "RequestLimitExceeded",
        ) => EcrOpsError::Throttled { op, message },
        Some(code @ ("UnableToAccessSecretException" | "UnableToDecryptSecretValueException" | "SecretNotFoundException")) => {
            EcrOpsError::Rejected {
                op,
                code: code.to_owned(),
                message: format!(
                    "{message} (the secret must exist in the rule's account and region, be named \
                     ecr-pullthroughcache/..., and hold {{\"username\":...,\"accessToken\":...}})"
                ),
            }
        }
        Some(code) => EcrOpsError::Rejected {
            op,
            code: code.to_owned(),
            message,
        },
        None => EcrOpsError::Api {
            op,
            message: format!("cannot reach the ECR API: {message}"),
        },
    }
}

/// The registry's account id (`DescribeRegistry`), for when `ecr.account` is not set.
pub async fn registry_id(client: &Client) -> Result<String, EcrOpsError> {
    let out = client
        .describe_registry()
        .send()
        .await
        .map_err(|e| api_error("DescribeRegistry", e))?;
    out.registry_id()
        .map(str::to_owned)
        .ok_or_else(|| EcrOpsError::Api {
            op: "DescribeRegistry",
            message: "no registryId in the answer".into(),
        })
}

/// Every pull-through cache rule, all pages.
pub async fn rules(client: &Client) -> Result<Vec<RuleSpec>, EcrOpsError> {
    let mut out = Vec::new();
    let mut next: Option<String> = None;
    loop {
        let page = client
            .describe_pull_through_cache_rules()
            .set_next_token(next.take())
            .send()
            .await
            .map_err(|e| api_error("DescribePullThroughCacheRules", e))?;
        for r in page.pull_through_cache_rules() {
            out.push(RuleSpec {
                prefix: r.ecr_repository_prefix().unwrap_or_default().to_owned(),
                upstream_url: r.upstream_registry_url().unwrap_or_default().to_owned(),
                credential_arn: r.credential_arn().map(str::to_owned),
            });
        }
        match page.next_token() {
            Some(t) if !t.is_empty() => next = Some(t.to_owned()),
            _ => return Ok(out),
        }
    }
}

/// Every repository creation template, all pages.
pub async fn templates(client: &Client) -> Result<Vec<TemplateSpec>, EcrOpsError> {
    let mut out = Vec::new();
    let mut next: Option<String> = None;
    loop {
        let page = client
            .describe_repository_creation_templates()
            .set_next_token(next.take())
            .send()
            .await
            .map_err(|e| api_error("DescribeRepositoryCreationTemplates", e))?;
        for t in page.repository_creation_templates() {
            let mut applied_for: Vec<String> = t
                .applied_for()
                .iter()
                .map(|a| a.as_str().to_owned())
                .collect();
            applied_for.sort();
            let enc = t.encryption_configuration();
            out.push(TemplateSpec {
                prefix: t.prefix().unwrap_or_default().to_owned(),
                applied_for,
                tag_mutability: t
                    .image_tag_mutability()
                    .map_or("MUTABLE", ImageTagMutability::as_str)
                    .to_owned(),
                encryption_type: enc
                    .map_or("AES256", |e| e.encryption_type().as_str())
                    .to_owned(),
                kms_key: enc.and_then(|e| e.kms_key()).map(str::to_owned),
                lifecycle_policy: t.lifecycle_policy().map(str::to_owned),
                resource_tags: t
                    .resource_tags()
                    .iter()
                    .map(|tag| (tag.key().to_owned(), tag.value().to_owned()))
                    .collect(),
            });
        }
        match page.next_token() {
            Some(t) if !t.is_empty() => next = Some(t.to_owned()),
            _ => return Ok(out),
        }
    }
}

/// The registry policy text; `None` when the registry has none.
pub async fn registry_policy(client: &Client) -> Result<Option<String>, EcrOpsError> {
    match client.get_registry_policy().send().await {
        Ok(out) => Ok(out.policy_text().map(str::to_owned)),
        Err(e) if e.as_service_error().is_some_and(|s| s.is_registry_policy_not_found_exception()) => {
            Ok(None)
        }
        Err(e) => Err(api_error("GetRegistryPolicy", e)),
    }
}

/// Reads everything setup manages.
pub async fn observe(client: &Client) -> Result<super::setup::Observed, EcrOpsError> {
    Ok(super::setup::Observed {
        rules: rules(client).await?,
        templates: templates(client).await?,
        registry_policy: registry_policy(client).await?,
    })
}

/// What applying one step did.
#[derive(Debug)]
pub struct Applied<'a> {
    /// The step.
    pub step: &'a Step,
    /// Its outcome; `Ok` also for steps with nothing to do.
    pub result: Result<(), EcrOpsError>,
}

/// Applies every step with a change, in plan order, and carries on past failures so that one
/// missing permission shows every other problem too. Refuses a plan with conflicts.
pub async fn apply<'a>(client: &Client, plan: &'a Plan) -> Result<Vec<Applied<'a>>, EcrOpsError> {
    let conflicts = plan.count(super::setup::Action::Conflict);
    if conflicts > 0 {
        return Err(EcrOpsError::Conflicts(conflicts));
    }
    let mut out = Vec::new();
    for step in &plan.steps {
        let result = apply_op(client, &step.op).await;
        out.push(Applied { step, result });
    }
    Ok(out)
}

async fn apply_op(client: &Client, op: &Op) -> Result<(), EcrOpsError> {
    match op {
        Op::None => Ok(()),
        Op::CreateRule(r) => client
            .create_pull_through_cache_rule()
            .ecr_repository_prefix(&r.prefix)
            .upstream_registry_url(&r.upstream_url)
            .set_credential_arn(r.credential_arn.clone())
            .send()
            .await
            .map(drop)
            .map_err(|e| api_error("CreatePullThroughCacheRule", e)),
        Op::UpdateRule(r) => client
            .update_pull_through_cache_rule()
            .ecr_repository_prefix(&r.prefix)
            .set_credential_arn(r.credential_arn.clone())
            .send()
            .await
            .map(drop)
            .map_err(|e| api_error("UpdatePullThroughCacheRule", e)),
        Op::CreateTemplate(t) => {
            let (enc, tags, applied) = template_parts(t)?;
            client
                .create_repository_creation_template()
                .prefix(&t.prefix)
                .description(super::setup::TEMPLATE_DESCRIPTION)
                .encryption_configuration(enc)
                .set_resource_tags(Some(tags))
                .image_tag_mutability(ImageTagMutability::from(t.tag_mutability.as_str()))
                .set_lifecycle_policy(t.lifecycle_policy.clone())
                .set_applied_for(Some(applied))
                .send()
                .await
                .map(drop)
                .map_err(|e| api_error("CreateRepositoryCreationTemplate", e))
        }
        Op::UpdateTemplate(t) => {
            let (enc, tags, applied) = template_parts(t)?;
            client
                .update_repository_creation_template()
                .prefix(&t.prefix)
                .encryption_configuration(enc)
                .set_resource_tags(Some(tags))
                .image_tag_mutability(ImageTagMutability::from(t.tag_mutability.as_str()))
                .set_lifecycle_policy(t.lifecycle_policy.clone())
                .set_applied_for(Some(applied))
                .send()
                .await
                .map(drop)
                .map_err(|e| api_error("UpdateRepositoryCreationTemplate", e))
        }
        Op::PutPolicy(text) => client
            .put_registry_policy()
            .policy_text(text)
            .send()
            .await
            .map(drop)
            .map_err(|e| api_error("PutRegistryPolicy", e)),
    }
}

type TemplateParts = (
    EncryptionConfigurationForRepositoryCreationTemplate,
    Vec<Tag>,
    Vec<RctAppliedFor>,
);

fn template_parts(t: &TemplateSpec) -> Result<TemplateParts, EcrOpsError> {
    let build = |e: aws_sdk_ecr::error::BuildError| EcrOpsError::Api {
        op: "CreateRepositoryCreationTemplate",
        message: e.to_string(),
    };
    let enc = EncryptionConfigurationForRepositoryCreationTemplate::builder()
        .encryption_type(EncryptionType::from(t.encryption_type.as_str()))
        .set_kms_key(t.kms_key.clone())
        .build()
        .map_err(build)?;
    let tags = t
        .resource_tags
        .iter()
        .map(|(k, v)| Tag::builder().key(k).value(v).build())
        .collect::<Result<Vec<_>, _>>()
        .map_err(build)?;
    let applied = t
        .applied_for
        .iter()
        .map(|a| RctAppliedFor::from(a.as_str()))
        .collect();
    Ok((enc, tags, applied))
}
