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

use super::EcrOpsError;
use super::setup::{Op, Plan, RuleSpec, Step, Target, TemplateSpec};
use crate::config::Config;
pub use crate::mirror::token::sdk_config;

/// Maps an SDK error to a clear one. `op` is the API operation, e.g. `PutRegistryPolicy`.
pub fn api_error<E>(
    op: &'static str,
    e: SdkError<E, aws_sdk_ecr::config::http::HttpResponse>,
) -> EcrOpsError
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
            "ThrottlingException"
            | "Throttling"
            | "TooManyRequestsException"
            | "RequestLimitExceeded",
        ) => EcrOpsError::Throttled { op, message },
        Some(
            code @ ("UnableToAccessSecretException"
            | "UnableToDecryptSecretValueException"
            | "SecretNotFoundException"),
        ) => EcrOpsError::Rejected {
            op,
            code: code.to_owned(),
            message: format!(
                "{message} (the secret must exist in the rule's account and region, be named \
                     ecr-pullthroughcache/..., and hold {{\"username\":...,\"accessToken\":...}})"
            ),
        },
        Some(code) => EcrOpsError::Rejected {
            op,
            code: code.to_owned(),
            message,
        },
        None => EcrOpsError::Api {
            op,
            message: match (&e, e.raw_response()) {
                (SdkError::DispatchFailure(_), _) => {
                    format!("cannot reach the ECR API: {}", DisplayErrorContext(&e))
                }
                (SdkError::TimeoutError(_), _) => "timed out waiting for the ECR API".to_owned(),
                // An answer that is not ECR's JSON (a proxy's error page, an API the endpoint
                // does not implement): the status says more than the parser's complaint.
                (_, Some(raw)) => format!(
                    "unexpected answer from the ECR API: HTTP {}",
                    raw.status().as_u16()
                ),
                (_, None) => message,
            },
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
                // A field cleared with "" (see `apply_op`) may come back as "".
                lifecycle_policy: t
                    .lifecycle_policy()
                    .filter(|p| !p.is_empty())
                    .map(str::to_owned),
                resource_tags: t
                    .resource_tags()
                    .iter()
                    .map(|tag| (tag.key().to_owned(), tag.value().to_owned()))
                    .collect(),
                custom_role_arn: t
                    .custom_role_arn()
                    .filter(|r| !r.is_empty())
                    .map(str::to_owned),
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
        Err(e)
            if e.as_service_error()
                .is_some_and(|s| s.is_registry_policy_not_found_exception()) =>
        {
            Ok(None)
        }
        Err(e) => Err(api_error("GetRegistryPolicy", e)),
    }
}

/// Reads everything setup manages. The registry policy is read only when setup manages a
/// statement in it (`with_policy`), so an admin without `ecr:GetRegistryPolicy` can still set
/// up rules and templates.
pub async fn observe(
    client: &Client,
    with_policy: bool,
) -> Result<super::setup::Observed, EcrOpsError> {
    Ok(super::setup::Observed {
        rules: rules(client).await?,
        templates: templates(client).await?,
        registry_policy: if with_policy {
            registry_policy(client).await?
        } else {
            None
        },
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
            let (enc, tags, applied) = template_parts(t, "CreateRepositoryCreationTemplate")?;
            client
                .create_repository_creation_template()
                .prefix(&t.prefix)
                .description(super::setup::TEMPLATE_DESCRIPTION)
                .encryption_configuration(enc)
                .set_resource_tags(Some(tags))
                .image_tag_mutability(ImageTagMutability::from(t.tag_mutability.as_str()))
                .set_lifecycle_policy(t.lifecycle_policy.clone())
                .set_applied_for(Some(applied))
                .set_custom_role_arn(t.custom_role_arn.clone())
                .send()
                .await
                .map(drop)
                .map_err(|e| api_error("CreateRepositoryCreationTemplate", e))
        }
        Op::UpdateTemplate(t) => {
            let (enc, tags, applied) = template_parts(t, "UpdateRepositoryCreationTemplate")?;
            // ECR keeps every field an update leaves out, so "none" has to be sent as an empty
            // string to clear a lifecycle policy or custom role (both allow length 0).
            client
                .update_repository_creation_template()
                .prefix(&t.prefix)
                .encryption_configuration(enc)
                .set_resource_tags(Some(tags))
                .image_tag_mutability(ImageTagMutability::from(t.tag_mutability.as_str()))
                .lifecycle_policy(t.lifecycle_policy.clone().unwrap_or_default())
                .set_applied_for(Some(applied))
                .custom_role_arn(t.custom_role_arn.clone().unwrap_or_default())
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

/// The request parts both template calls share; `op` labels a build error.
fn template_parts(t: &TemplateSpec, op: &'static str) -> Result<TemplateParts, EcrOpsError> {
    let build = |e: aws_sdk_ecr::error::BuildError| EcrOpsError::Api {
        op,
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

/// The registry's region (config or SDK chain) and account (`ecr.account` or `DescribeRegistry`).
pub async fn resolve_target(
    config: &Config,
    client: &Client,
    region: Option<&str>,
) -> Result<Target, EcrOpsError> {
    let region = region.ok_or_else(|| {
        EcrOpsError::Usage(
            "no AWS region: set ecr.region in the config or AWS_REGION in the environment".into(),
        )
    })?;
    let account = match &config.ecr.account {
        Some(a) => a.clone(),
        None => registry_id(client).await?,
    };
    Ok(Target {
        region: region.to_owned(),
        account,
    })
}

#[cfg(test)]
mod tests {
    //! The rule, template and registry-policy APIs against aws-smithy-mocks (moto has none of
    //! them). [`FakeAccount`] keeps state across calls, so setup can be run twice.

    use std::sync::{Arc, Mutex};

    use crate::config::Config;

    use aws_sdk_ecr::error::ErrorMetadata;
    use aws_sdk_ecr::operation::create_pull_through_cache_rule::{
        CreatePullThroughCacheRuleError, CreatePullThroughCacheRuleOutput,
    };
    use aws_sdk_ecr::operation::create_repository_creation_template::CreateRepositoryCreationTemplateOutput;
    use aws_sdk_ecr::operation::describe_pull_through_cache_rules::{
        DescribePullThroughCacheRulesError, DescribePullThroughCacheRulesOutput,
    };
    use aws_sdk_ecr::operation::describe_repository_creation_templates::DescribeRepositoryCreationTemplatesOutput;
    use aws_sdk_ecr::operation::get_registry_policy::{
        GetRegistryPolicyError, GetRegistryPolicyOutput,
    };
    use aws_sdk_ecr::operation::put_registry_policy::PutRegistryPolicyOutput;
    use aws_sdk_ecr::operation::update_pull_through_cache_rule::UpdatePullThroughCacheRuleOutput;
    use aws_sdk_ecr::operation::update_repository_creation_template::UpdateRepositoryCreationTemplateOutput;
    use aws_sdk_ecr::types::error::RegistryPolicyNotFoundException;
    use aws_sdk_ecr::types::{PullThroughCacheRule, RepositoryCreationTemplate};
    use aws_smithy_mocks::{MockResponse, Rule, RuleMode, mock, mock_client};
    use rstest::rstest;
    use serde_json::Value;

    use super::*;
    use crate::ecr::cli::run_setup;
    use crate::ecr::setup::tests as st;

    /// An ECR registry's pull-through state, kept by the mocks.
    #[derive(Default)]
    struct FakeAccount {
        rules: Vec<PullThroughCacheRule>,
        templates: Vec<RepositoryCreationTemplate>,
        policy: Option<String>,
        /// Mutating calls, e.g. `CreatePullThroughCacheRule docker-hub`.
        writes: Vec<String>,
    }

    /// ECR hands policies back compact, with one-element lists as bare strings.
    fn as_ecr_returns_it(policy: &str) -> String {
        fn collapse(v: Value) -> Value {
            match v {
                Value::Array(mut a) if a.len() == 1 && a[0].is_string() => a.remove(0),
                Value::Array(a) => Value::Array(a.into_iter().map(collapse).collect()),
                Value::Object(m) => {
                    Value::Object(m.into_iter().map(|(k, v)| (k, collapse(v))).collect())
                }
                other => other,
            }
        }
        collapse(serde_json::from_str(policy).unwrap()).to_string()
    }

    fn fake_rules(state: &Arc<Mutex<FakeAccount>>) -> Vec<Rule> {
        let s = Arc::clone(state);
        let describe_rules =
            mock!(Client::describe_pull_through_cache_rules).then_compute_output(move |_| {
                DescribePullThroughCacheRulesOutput::builder()
                    .set_pull_through_cache_rules(Some(s.lock().unwrap().rules.clone()))
                    .build()
            });
        let s = Arc::clone(state);
        let create_rule =
            mock!(Client::create_pull_through_cache_rule).then_compute_output(move |req| {
                let mut a = s.lock().unwrap();
                a.writes.push(format!(
                    "CreatePullThroughCacheRule {}",
                    req.ecr_repository_prefix().unwrap()
                ));
                a.rules.push(
                    PullThroughCacheRule::builder()
                        .ecr_repository_prefix(req.ecr_repository_prefix().unwrap())
                        .upstream_registry_url(req.upstream_registry_url().unwrap())
                        .set_credential_arn(req.credential_arn().map(str::to_owned))
                        .build(),
                );
                CreatePullThroughCacheRuleOutput::builder().build()
            });
        let s = Arc::clone(state);
        let update_rule =
            mock!(Client::update_pull_through_cache_rule).then_compute_output(move |req| {
                let mut a = s.lock().unwrap();
                let prefix = req.ecr_repository_prefix().unwrap().to_owned();
                a.writes
                    .push(format!("UpdatePullThroughCacheRule {prefix}"));
                for r in &mut a.rules {
                    if r.ecr_repository_prefix() == Some(prefix.as_str()) {
                        *r = r.clone().to_builder_with_credential(req.credential_arn());
                    }
                }
                UpdatePullThroughCacheRuleOutput::builder().build()
            });
        let s = Arc::clone(state);
        let describe_templates = mock!(Client::describe_repository_creation_templates)
            .then_compute_output(move |_| {
                DescribeRepositoryCreationTemplatesOutput::builder()
                    .set_repository_creation_templates(Some(s.lock().unwrap().templates.clone()))
                    .build()
            });
        let s = Arc::clone(state);
        let create_template = mock!(Client::create_repository_creation_template)
            .then_compute_output(move |req| {
                let mut a = s.lock().unwrap();
                a.writes.push(format!(
                    "CreateRepositoryCreationTemplate {}",
                    req.prefix().unwrap()
                ));
                a.templates.push(
                    RepositoryCreationTemplate::builder()
                        .prefix(req.prefix().unwrap())
                        .set_description(req.description().map(str::to_owned))
                        .set_encryption_configuration(req.encryption_configuration().cloned())
                        .set_resource_tags(Some(req.resource_tags().to_vec()))
                        .set_image_tag_mutability(req.image_tag_mutability().cloned())
                        // ECR stores the lifecycle policy reformatted.
                        .set_lifecycle_policy(req.lifecycle_policy().map(|p| {
                            serde_json::to_string_pretty(&serde_json::from_str::<Value>(p).unwrap())
                                .unwrap()
                        }))
                        .set_applied_for(Some(req.applied_for().to_vec()))
                        .set_custom_role_arn(req.custom_role_arn().map(str::to_owned))
                        .build(),
                );
                CreateRepositoryCreationTemplateOutput::builder().build()
            });
        let s = Arc::clone(state);
        let update_template = mock!(Client::update_repository_creation_template)
            .then_compute_output(move |req| {
                let mut a = s.lock().unwrap();
                let prefix = req.prefix().unwrap().to_owned();
                a.writes
                    .push(format!("UpdateRepositoryCreationTemplate {prefix}"));
                // As ECR does: a field the request leaves out keeps its value.
                for t in &mut a.templates {
                    if t.prefix() == Some(prefix.as_str()) {
                        let keep = t.clone();
                        *t = RepositoryCreationTemplate::builder()
                            .prefix(&prefix)
                            .set_description(keep.description().map(str::to_owned))
                            .set_encryption_configuration(
                                req.encryption_configuration
                                    .clone()
                                    .or(keep.encryption_configuration().cloned()),
                            )
                            .set_resource_tags(
                                req.resource_tags.clone().or(keep.resource_tags.clone()),
                            )
                            .set_image_tag_mutability(
                                req.image_tag_mutability
                                    .clone()
                                    .or(keep.image_tag_mutability().cloned()),
                            )
                            .set_lifecycle_policy(
                                req.lifecycle_policy
                                    .clone()
                                    .or(keep.lifecycle_policy().map(str::to_owned)),
                            )
                            .set_applied_for(req.applied_for.clone().or(keep.applied_for.clone()))
                            .set_custom_role_arn(
                                req.custom_role_arn
                                    .clone()
                                    .or(keep.custom_role_arn().map(str::to_owned)),
                            )
                            .build();
                    }
                }
                UpdateRepositoryCreationTemplateOutput::builder().build()
            });
        let s = Arc::clone(state);
        let get_policy =
            mock!(Client::get_registry_policy).then_compute_response(move |_| {
                match &s.lock().unwrap().policy {
                    Some(p) => MockResponse::Output(
                        GetRegistryPolicyOutput::builder().policy_text(p).build(),
                    ),
                    None => MockResponse::Error(
                        GetRegistryPolicyError::RegistryPolicyNotFoundException(
                            RegistryPolicyNotFoundException::builder()
                                .message("no policy")
                                .build(),
                        ),
                    ),
                }
            });
        let s = Arc::clone(state);
        let put_policy = mock!(Client::put_registry_policy).then_compute_output(move |req| {
            let mut a = s.lock().unwrap();
            a.writes.push("PutRegistryPolicy".into());
            a.policy = Some(as_ecr_returns_it(req.policy_text().unwrap()));
            PutRegistryPolicyOutput::builder().build()
        });
        vec![
            describe_rules,
            create_rule,
            update_rule,
            describe_templates,
            create_template,
            update_template,
            get_policy,
            put_policy,
        ]
    }

    trait WithCredential {
        fn to_builder_with_credential(self, arn: Option<&str>) -> PullThroughCacheRule;
    }

    impl WithCredential for PullThroughCacheRule {
        fn to_builder_with_credential(self, arn: Option<&str>) -> PullThroughCacheRule {
            PullThroughCacheRule::builder()
                .set_ecr_repository_prefix(self.ecr_repository_prefix().map(str::to_owned))
                .set_upstream_registry_url(self.upstream_registry_url().map(str::to_owned))
                .set_credential_arn(arn.map(str::to_owned))
                .build()
        }
    }

    fn client(rules: &[Rule]) -> Client {
        let refs: Vec<&Rule> = rules.iter().collect();
        mock_client!(aws_sdk_ecr, RuleMode::MatchAny, refs, |c| c
            .retry_config(aws_sdk_ecr::config::retry::RetryConfig::disabled()))
    }

    const OTHER_POLICY: &str = r#"{"Version":"2012-10-17","Statement":[{"Sid":"CrossAccountReplication","Effect":"Allow","Principal":{"AWS":"arn:aws:iam::210987654321:root"},"Action":["ecr:CreateRepository","ecr:ReplicateImage"],"Resource":"arn:aws:ecr:eu-west-1:123456789012:repository/*"}]}"#;

    async fn setup(client: &Client, apply: bool) -> (bool, String) {
        let mut out = Vec::new();
        let ok = run_setup(&st::config(), client, &st::target(), apply, &mut out)
            .await
            .unwrap();
        (ok, String::from_utf8(out).unwrap())
    }

    #[tokio::test]
    async fn second_apply_reports_everything_unchanged_and_keeps_other_statements() {
        let state = Arc::new(Mutex::new(FakeAccount {
            policy: Some(OTHER_POLICY.into()),
            ..Default::default()
        }));
        let client = client(&fake_rules(&state));

        let (ok, out) = setup(&client, true).await;
        assert!(ok, "{out}");
        assert!(
            out.contains("Plan: 7 to create, 0 to update, 0 unchanged, 1 skipped"),
            "{out}"
        );
        assert!(out.contains("created rule docker-hub\n"), "{out}");
        assert!(
            out.contains("created registry-policy PullthroughNodesPullThroughCache\n"),
            "{out}"
        );
        assert!(out.contains("Applied 7 change(s)."), "{out}");
        {
            let a = state.lock().unwrap();
            assert_eq!(a.rules.len(), 3);
            assert_eq!(a.templates.len(), 3);
            let hub = a
                .rules
                .iter()
                .find(|r| r.ecr_repository_prefix() == Some("docker-hub"))
                .unwrap();
            assert_eq!(hub.upstream_registry_url(), Some("registry-1.docker.io"));
            assert_eq!(hub.credential_arn(), Some(st::HUB_SECRET));
            let t = &a.templates[0];
            assert_eq!(t.applied_for(), [RctAppliedFor::PullThroughCache]);
            assert_eq!(t.resource_tags()[0].key(), "team");
            let policy: Value = serde_json::from_str(a.policy.as_deref().unwrap()).unwrap();
            let other: Value = serde_json::from_str(OTHER_POLICY).unwrap();
            assert_eq!(
                policy["Statement"][0], other["Statement"][0],
                "the other statement changed"
            );
            assert_eq!(
                policy["Statement"][1]["Sid"],
                crate::ecr::policy::STATEMENT_SID
            );
        }
        // Templates and the nodes' permission first: a rule lets nodes create repositories at
        // once, and ECR never applies a template to a repository created before it.
        assert_eq!(
            state.lock().unwrap().writes,
            [
                "CreateRepositoryCreationTemplate docker-hub",
                "CreateRepositoryCreationTemplate github",
                "CreateRepositoryCreationTemplate quay",
                "PutRegistryPolicy",
                "CreatePullThroughCacheRule docker-hub",
                "CreatePullThroughCacheRule github",
                "CreatePullThroughCacheRule quay",
            ]
        );
        let writes = state.lock().unwrap().writes.len();

        let (ok, out) = setup(&client, true).await;
        assert!(ok, "{out}");
        assert!(
            out.contains("Plan: 0 to create, 0 to update, 7 unchanged, 1 skipped, 0 conflict(s)."),
            "{out}"
        );
        assert!(out.contains("Applied 0 change(s)."), "{out}");
        assert_eq!(
            state.lock().unwrap().writes.len(),
            writes,
            "the second apply wrote something"
        );
    }

    #[tokio::test]
    async fn without_apply_nothing_is_written() {
        let state = Arc::new(Mutex::new(FakeAccount::default()));
        let client = client(&fake_rules(&state));
        let (ok, out) = setup(&client, false).await;
        assert!(ok);
        assert!(
            out.contains("Dry run: nothing changed. Run again with --apply"),
            "{out}"
        );
        assert!(state.lock().unwrap().writes.is_empty());
    }

    #[tokio::test]
    async fn a_conflict_stops_setup_before_any_write() {
        let state = Arc::new(Mutex::new(FakeAccount::default()));
        state.lock().unwrap().rules.push(
            PullThroughCacheRule::builder()
                .ecr_repository_prefix("quay")
                .upstream_registry_url("public.ecr.aws")
                .build(),
        );
        let client = client(&fake_rules(&state));
        let (ok, out) = setup(&client, true).await;
        assert!(!ok);
        assert!(out.contains("! rule            quay"), "{out}");
        assert!(
            out.contains("Resolve the conflicts above first; nothing was changed."),
            "{out}"
        );
        assert!(state.lock().unwrap().writes.is_empty());
    }

    #[tokio::test]
    async fn a_rotated_credential_is_updated_in_place() {
        let state = Arc::new(Mutex::new(FakeAccount::default()));
        let client = client(&fake_rules(&state));
        setup(&client, true).await;
        {
            let mut a = state.lock().unwrap();
            a.rules[0] = a.rules[0].clone().to_builder_with_credential(Some(
                "arn:aws:secretsmanager:eu-west-1:123456789012:secret:ecr-pullthroughcache/old-1",
            ));
            a.writes.clear();
        }
        let (ok, out) = setup(&client, true).await;
        assert!(ok, "{out}");
        assert!(out.contains("updated rule docker-hub"), "{out}");
        assert_eq!(
            state.lock().unwrap().writes,
            ["UpdatePullThroughCacheRule docker-hub"]
        );
        assert_eq!(
            state.lock().unwrap().rules[0].credential_arn(),
            Some(st::HUB_SECRET)
        );
    }

    #[tokio::test]
    async fn a_drifted_template_is_updated_then_unchanged() {
        let state = Arc::new(Mutex::new(FakeAccount::default()));
        let client = client(&fake_rules(&state));
        setup(&client, true).await;
        {
            let mut a = state.lock().unwrap();
            a.templates[1] = RepositoryCreationTemplate::builder()
                .prefix("github")
                .applied_for(RctAppliedFor::PullThroughCache)
                .applied_for(RctAppliedFor::Replication)
                .image_tag_mutability(ImageTagMutability::Immutable)
                .build();
            a.writes.clear();
        }
        let (ok, out) = setup(&client, true).await;
        assert!(ok, "{out}");
        assert!(
            out.contains("      imageTagMutability: IMMUTABLE -> MUTABLE\n"),
            "{out}"
        );
        assert_eq!(
            state.lock().unwrap().writes,
            ["UpdateRepositoryCreationTemplate github"]
        );
        // Replication keeps using the template: appliedFor is merged, not replaced.
        let applied = state.lock().unwrap().templates[1].applied_for().to_vec();
        assert_eq!(
            applied,
            [RctAppliedFor::PullThroughCache, RctAppliedFor::Replication]
        );
        let (_, out) = setup(&client, false).await;
        assert!(out.contains("Everything is as configured."), "{out}");
    }

    #[tokio::test]
    async fn a_lifecycle_policy_and_custom_role_dropped_from_the_config_are_cleared() {
        let state = Arc::new(Mutex::new(FakeAccount::default()));
        let client = client(&fake_rules(&state));
        // st::config() sets a custom role and the default lifecycle policy.
        setup(&client, true).await;
        assert!(
            state.lock().unwrap().templates[0]
                .lifecycle_policy()
                .is_some()
        );
        state.lock().unwrap().writes.clear();
        let config = Config::from_toml_str(
            "[ecr]\nregion = \"eu-west-1\"\naccount = \"123456789012\"\n\
             [upstreams.\"quay.io\"]\nprefix = \"quay\"\n\
             [ecr_setup.template]\nuntagged_expire_days = 0\n",
            "t.toml",
        )
        .unwrap();
        let run = |apply| {
            let client = client.clone();
            let config = config.clone();
            async move {
                let mut out = Vec::new();
                let ok = run_setup(&config, &client, &st::target(), apply, &mut out)
                    .await
                    .unwrap();
                (ok, String::from_utf8(out).unwrap())
            }
        };
        let (ok, out) = run(true).await;
        assert!(ok, "{out}");
        assert!(out.contains("updated template quay"), "{out}");
        let quay = |a: &FakeAccount| {
            a.templates
                .iter()
                .find(|t| t.prefix() == Some("quay"))
                .cloned()
                .unwrap()
        };
        {
            let a = state.lock().unwrap();
            let t = quay(&a);
            assert_eq!(t.lifecycle_policy(), Some(""));
            assert_eq!(t.custom_role_arn(), Some(""));
        }
        let (ok, out) = run(true).await;
        assert!(ok, "{out}");
        assert!(out.contains("Applied 0 change(s)."), "{out}");
        assert!(!out.contains("~ template"), "{out}");
        assert_eq!(
            state.lock().unwrap().writes,
            ["UpdateRepositoryCreationTemplate quay"],
            "the second apply wrote again"
        );
    }

    fn failing_create(code: &'static str) -> Rule {
        mock!(Client::create_pull_through_cache_rule).then_error(move || {
            CreatePullThroughCacheRuleError::generic(
                ErrorMetadata::builder()
                    .code(code)
                    .message("ECR says no")
                    .build(),
            )
        })
    }

    #[rstest]
    #[case::access_denied(
        "AccessDeniedException",
        "FAILED rule docker-hub: CreatePullThroughCacheRule: access denied: the caller needs ecr:CreatePullThroughCacheRule (docs/iam/ecr-admin-policy.json lists all): ECR says no"
    )]
    #[case::throttled(
        "ThrottlingException",
        "FAILED rule docker-hub: CreatePullThroughCacheRule: throttled by ECR even after retrying; wait a minute and run it again: ECR says no"
    )]
    #[case::validation(
        "ValidationException",
        "FAILED rule docker-hub: CreatePullThroughCacheRule: ECR rejected the request (ValidationException): ECR says no"
    )]
    #[case::secret(
        "UnableToAccessSecretException",
        "ECR rejected the request (UnableToAccessSecretException): ECR says no (the secret must exist in the rule's account and region"
    )]
    #[tokio::test]
    async fn api_errors_are_reported_per_step_and_the_rest_still_applies(
        #[case] code: &'static str,
        #[case] want: &str,
    ) {
        let state = Arc::new(Mutex::new(FakeAccount::default()));
        // The failing rule comes first, so it wins over the fake's create.
        let mut rules = vec![failing_create(code)];
        rules.extend(fake_rules(&state));
        let client = client(&rules);
        let (ok, out) = setup(&client, true).await;
        assert!(!ok, "{out}");
        assert!(out.contains(want), "{out}");
        assert!(out.contains("created template docker-hub"), "{out}");
        assert!(out.contains("; some failed (above)."), "{out}");
    }

    #[tokio::test]
    async fn access_denied_while_reading_is_a_clear_error() {
        let denied = mock!(Client::describe_pull_through_cache_rules).then_error(|| {
            DescribePullThroughCacheRulesError::generic(
                ErrorMetadata::builder()
                    .code("AccessDeniedException")
                    .message("User: arn:aws:iam::123456789012:user/bob is not authorized")
                    .build(),
            )
        });
        let client = client(&[denied]);
        let mut out = Vec::new();
        let e = run_setup(&st::config(), &client, &st::target(), false, &mut out)
            .await
            .unwrap_err();
        assert!(!e.is_usage());
        assert_eq!(
            e.to_string(),
            "DescribePullThroughCacheRules: access denied: the caller needs \
             ecr:DescribePullThroughCacheRules (docs/iam/ecr-admin-policy.json lists all): \
             User: arn:aws:iam::123456789012:user/bob is not authorized"
        );
    }

    #[tokio::test]
    async fn without_node_roles_the_registry_policy_is_never_read() {
        let state = Arc::new(Mutex::new(FakeAccount::default()));
        // Only the rule and template fakes: a GetRegistryPolicy call would find no mock.
        let mocks: Vec<Rule> = fake_rules(&state).into_iter().take(6).collect();
        let client = client(&mocks);
        let config =
            Config::from_toml_str("[upstreams.\"quay.io\"]\nprefix = \"quay\"\n", "t.toml")
                .unwrap();
        let mut out = Vec::new();
        let ok = run_setup(&config, &client, &st::target(), true, &mut out)
            .await
            .unwrap();
        let out = String::from_utf8(out).unwrap();
        assert!(ok, "{out}");
        assert!(out.contains("- registry-policy"), "{out}");
        assert_eq!(
            state.lock().unwrap().writes,
            [
                "CreateRepositoryCreationTemplate quay",
                "CreatePullThroughCacheRule quay"
            ]
        );
    }

    #[tokio::test]
    async fn rules_are_read_across_pages() {
        let page = |prefix: &str, next: Option<&str>| {
            DescribePullThroughCacheRulesOutput::builder()
                .pull_through_cache_rules(
                    PullThroughCacheRule::builder()
                        .ecr_repository_prefix(prefix)
                        .upstream_registry_url("quay.io")
                        .build(),
                )
                .set_next_token(next.map(str::to_owned))
                .build()
        };
        let first = mock!(Client::describe_pull_through_cache_rules)
            .match_requests(|r| r.next_token().is_none())
            .then_output(move || page("a1", Some("t2")));
        let second = mock!(Client::describe_pull_through_cache_rules)
            .match_requests(|r| r.next_token() == Some("t2"))
            .then_output(move || page("b2", None));
        let client = client(&[first, second]);
        let got: Vec<String> = rules(&client)
            .await
            .unwrap()
            .into_iter()
            .map(|r| r.prefix)
            .collect();
        assert_eq!(got, ["a1", "b2"]);
    }
}
