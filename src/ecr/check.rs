//! `pullthrough ecr check`: a health report of the account's pull-through setup, one line per
//! check (pass / warn / fail). Any fail makes the command exit 1.
//!
//! The checks are pure functions of what was observed ([`rule_checks`], [`template_checks`],
//! [`policy_checks`]); [`run`] only gathers the observations.

use std::fmt::Write as _;

use aws_sdk_ecr::Client;

use super::aws;
use super::policy;
use super::setup::{Desired, RuleSpec, Target, TemplateSpec};
use super::warm::{Fetcher, target};
use crate::config::Config;
use crate::mirror::token::{EcrTokenSource, TokenSource};

/// A check's verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Status {
    /// As wanted.
    Pass,
    /// Works, but not as configured, or not checked.
    Warn,
    /// Broken.
    Fail,
}

impl Status {
    fn label(self) -> &'static str {
        match self {
            Status::Pass => "pass",
            Status::Warn => "warn",
            Status::Fail => "FAIL",
        }
    }
}

/// One line of the report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Check {
    /// The verdict.
    pub status: Status,
    /// What was checked, e.g. `rule docker-hub`.
    pub name: String,
    /// Details or the fix.
    pub detail: String,
}

fn check(status: Status, name: impl Into<String>, detail: impl Into<String>) -> Check {
    Check {
        status,
        name: name.into(),
        detail: detail.into(),
    }
}

/// Rules: each desired rule exists and matches the config; unsupported upstreams warn.
pub fn rule_checks(desired: &Desired, observed: &[RuleSpec]) -> Vec<Check> {
    let mut out = Vec::new();
    for want in &desired.rules {
        let name = format!("rule {}", want.prefix);
        let c = match observed.iter().find(|r| r.prefix == want.prefix) {
            None => check(
                Status::Fail,
                name,
                format!(
                    "missing: no rule caches {} under {}/ (run pullthrough ecr setup --apply)",
                    want.upstream_url, want.prefix
                ),
            ),
            Some(have) if !have.upstream_url.eq_ignore_ascii_case(&want.upstream_url) => check(
                Status::Fail,
                name,
                format!(
                    "caches {}, but the config maps {}/ to {}",
                    have.upstream_url, want.prefix, want.upstream_url
                ),
            ),
            Some(have) if have.credential_arn != want.credential_arn => check(
                Status::Fail,
                name,
                format!(
                    "credential is {}, the config says {}",
                    have.credential_arn.as_deref().unwrap_or("(none)"),
                    want.credential_arn.as_deref().unwrap_or("(none)")
                ),
            ),
            Some(_) => check(
                Status::Pass,
                name,
                format!("{} as configured", want.upstream_url),
            ),
        };
        out.push(c);
    }
    for (registry, prefix) in &desired.unsupported {
        out.push(check(
            Status::Warn,
            format!("rule {prefix}"),
            format!("ECR has no pull-through cache for {registry}: its pulls always go upstream"),
        ));
    }
    out
}

/// Templates: present and as configured, else a warning (repositories still get created, with
/// ECR's defaults).
pub fn template_checks(desired: &Desired, observed: &[TemplateSpec]) -> Vec<Check> {
    desired
        .templates
        .iter()
        .map(|want| {
            let name = format!("template {}", want.prefix);
            match observed.iter().find(|t| t.prefix == want.prefix) {
                None => check(
                    Status::Warn,
                    name,
                    "missing: new repositories get ECR's defaults (run pullthrough ecr setup --apply)",
                ),
                Some(have) if !have.applied_for.iter().any(|a| a == super::setup::APPLIED_FOR) => {
                    check(Status::Warn, name, "not applied for PULL_THROUGH_CACHE")
                }
                Some(have) => {
                    let plan = super::setup::plan(
                        &Desired {
                            rules: vec![],
                            templates: vec![want.clone()],
                            node_statement: None,
                            unsupported: vec![],
                        },
                        &super::setup::Observed {
                            rules: vec![],
                            templates: vec![have.clone()],
                            registry_policy: None,
                        },
                    );
                    let notes: Vec<String> = plan
                        .map(|p| p.steps.into_iter().flat_map(|s| if s.kind == "template" { s.notes } else { vec![] }).collect())
                        .unwrap_or_default();
                    if notes.is_empty() {
                        check(Status::Pass, name, "as configured")
                    } else {
                        check(Status::Warn, name, format!("differs: {}", notes.join("; ")))
                    }
                }
            }
        })
        .collect()
}

/// The registry policy grants every node role both actions on every rule prefix.
pub fn policy_checks(
    roles: &[String],
    policy_text: Option<&str>,
    target: &Target,
    prefixes: &[String],
) -> Vec<Check> {
    if roles.is_empty() {
        return vec![check(
            Status::Warn,
            "registry policy",
            "no ecr_setup.node_role_arns: not checked (the nodes' IAM policy may grant it instead)",
        )];
    }
    let resources: Vec<String> = prefixes
        .iter()
        .map(|p| policy::prefix_resource(&target.region, &target.account, p))
        .collect();
    roles
        .iter()
        .map(|role| {
            let missing = policy::missing_grants(policy_text, role, &resources);
            if missing.is_empty() {
                check(
                    Status::Pass,
                    format!("registry policy {role}"),
                    "may create repositories and import images under every prefix",
                )
            } else {
                check(
                    Status::Fail,
                    format!("registry policy {role}"),
                    format!("not granted: {}", missing.join("; ")),
                )
            }
        })
        .collect()
}

/// The report, one line per check, and a count line.
pub fn render(checks: &[Check]) -> String {
    let w = checks.iter().map(|c| c.name.len()).max().unwrap_or(0);
    let mut out = String::new();
    for c in checks {
        let _ = writeln!(out, "{:<4}  {:<w$}  {}", c.status.label(), c.name, c.detail);
    }
    let count = |s| checks.iter().filter(|c| c.status == s).count();
    let _ = writeln!(
        out,
        "\n{} passed, {} warnings, {} failed.",
        count(Status::Pass),
        count(Status::Warn),
        count(Status::Fail)
    );
    out
}

/// Gathers every check. `pulls` are images whose manifest is fetched by tag through ECR with
/// `fetcher` (or the reason there is none).
pub async fn run(
    config: &Config,
    client: &Client,
    region: Option<&str>,
    fetcher: Result<&Fetcher, &String>,
    pulls: &[String],
) -> Vec<Check> {
    let mut out = Vec::new();
    let token = EcrTokenSource::new(client.clone()).fetch().await;
    out.push(match token {
        Ok(t) => check(
            Status::Pass,
            "token",
            format!(
                "GetAuthorizationToken answered (registry {})",
                t.proxy_endpoint.as_deref().unwrap_or("?")
            ),
        ),
        Err(e) => check(Status::Fail, "token", e.to_string()),
    });

    let target = aws::resolve_target(config, client, region).await;
    if let Err(e) = &target {
        out.push(check(Status::Fail, "registry", e.to_string()));
    }
    // Without a target only the policy resources are unknown; the rest is still checked.
    let fallback = Target {
        region: region.unwrap_or_default().to_owned(),
        account: String::new(),
    };
    let (desired, missing) =
        super::setup::desired_parts(config, target.as_ref().unwrap_or(&fallback));
    for (name, message) in missing {
        out.push(check(Status::Fail, name, message));
    }
    match aws::rules(client).await {
        Ok(observed) => {
            out.extend(rule_checks(&desired, &observed));
            for r in desired.rules.iter().filter(|r| r.credential_arn.is_some()) {
                if !observed.iter().any(|o| o.prefix == r.prefix) {
                    continue;
                }
                let name = format!("credential {}", r.prefix);
                let res = client
                    .validate_pull_through_cache_rule()
                    .ecr_repository_prefix(&r.prefix)
                    .send()
                    .await;
                out.push(match res {
                    Ok(v) if v.is_valid() => {
                        check(Status::Pass, name, "ValidatePullThroughCacheRule: valid")
                    }
                    Ok(v) => check(
                        Status::Fail,
                        name,
                        format!(
                            "ValidatePullThroughCacheRule: {}",
                            v.failure().unwrap_or("not valid")
                        ),
                    ),
                    Err(e) => check(
                        Status::Fail,
                        name,
                        aws::api_error("ValidatePullThroughCacheRule", e).to_string(),
                    ),
                });
            }
        }
        Err(e) => out.push(check(Status::Fail, "rules", e.to_string())),
    }
    match aws::templates(client).await {
        Ok(observed) => out.extend(template_checks(&desired, &observed)),
        Err(e) => out.push(check(Status::Warn, "templates", e.to_string())),
    }
    let prefixes: Vec<String> = desired.rules.iter().map(|r| r.prefix.clone()).collect();
    if config.ecr_setup.node_role_arns.is_empty() {
        out.extend(policy_checks(
            &[],
            None,
            &Target {
                region: String::new(),
                account: String::new(),
            },
            &prefixes,
        ));
    } else {
        match (aws::registry_policy(client).await, &target) {
            (Ok(p), Ok(t)) => out.extend(policy_checks(
                &config.ecr_setup.node_role_arns,
                p.as_deref(),
                t,
                &prefixes,
            )),
            (Err(e), _) => out.push(check(Status::Fail, "registry policy", e.to_string())),
            // Already reported as the `registry` line.
            (_, Err(_)) => {}
        }
    }
    for image in pulls {
        let name = format!("pull {image}");
        let res = match (fetcher, target_or(config, image)) {
            (_, Err(e)) => Err(e),
            (Err(e), _) => Err(e.clone()),
            (Ok(f), Ok(t)) => f
                .manifest(&t.repository, &t.tag)
                .await
                .map(|m| (t, m))
                .map_err(|e| e.to_string()),
        };
        out.push(match res {
            Ok((t, m)) => check(
                Status::Pass,
                name,
                format!(
                    "{}:{} answered {} ({} bytes), time to first byte {} ms",
                    t.repository,
                    t.tag,
                    if m.media_type.is_empty() {
                        "a manifest"
                    } else {
                        &m.media_type
                    },
                    m.size,
                    m.ttfb.as_millis()
                ),
            ),
            Err(e) => check(Status::Fail, name, e),
        });
    }
    out
}

fn target_or(config: &Config, image: &str) -> Result<super::warm::WarmTarget, String> {
    target(config, image).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ecr::setup::{self, tests as st};
    use rstest::rstest;

    fn desired() -> Desired {
        setup::desired(&st::config(), &st::target()).unwrap()
    }

    fn statuses(checks: &[Check]) -> Vec<(String, Status)> {
        checks.iter().map(|c| (c.name.clone(), c.status)).collect()
    }

    #[test]
    fn rules_in_sync_pass_and_unsupported_warn() {
        let d = desired();
        let got = rule_checks(&d, &d.rules);
        assert_eq!(
            statuses(&got),
            [
                ("rule docker-hub".to_owned(), Status::Pass),
                ("rule github".to_owned(), Status::Pass),
                ("rule quay".to_owned(), Status::Pass),
                ("rule gcr".to_owned(), Status::Warn),
            ]
        );
    }

    #[rstest]
    #[case::missing(|r: &mut Vec<RuleSpec>| { r.remove(0); }, "missing: no rule caches registry-1.docker.io under docker-hub/")]
    #[case::other_upstream(|r: &mut Vec<RuleSpec>| r[0].upstream_url = "quay.io".into(), "caches quay.io, but the config maps docker-hub/ to registry-1.docker.io")]
    #[case::no_credential(|r: &mut Vec<RuleSpec>| r[0].credential_arn = None, "credential is (none), the config says arn:aws:secretsmanager")]
    fn broken_rules_fail(#[case] break_it: fn(&mut Vec<RuleSpec>), #[case] detail: &str) {
        let d = desired();
        let mut observed = d.rules.clone();
        break_it(&mut observed);
        let got = rule_checks(&d, &observed);
        assert_eq!(got[0].status, Status::Fail);
        assert!(got[0].detail.starts_with(detail), "{}", got[0].detail);
    }

    #[test]
    fn templates_missing_or_different_warn() {
        let d = desired();
        let mut observed = d.templates.clone();
        observed.remove(0);
        observed[0].tag_mutability = "IMMUTABLE".into();
        let got = template_checks(&d, &observed);
        assert_eq!(
            got.iter().map(|c| c.status).collect::<Vec<_>>(),
            [Status::Warn, Status::Warn, Status::Pass]
        );
        assert_eq!(
            got[1].detail,
            "differs: imageTagMutability: IMMUTABLE -> MUTABLE"
        );
    }

    #[test]
    fn policy_coverage_per_role() {
        let roles = vec![
            "arn:aws:iam::123456789012:role/eks-nodes".to_owned(),
            "arn:aws:iam::123456789012:role/other".to_owned(),
        ];
        let d = desired();
        let text = policy::merge(None, d.node_statement.as_ref().unwrap())
            .unwrap()
            .policy;
        let prefixes = vec!["docker-hub".to_owned(), "quay".to_owned()];
        let got = policy_checks(&roles, Some(&text), &st::target(), &prefixes);
        assert_eq!(got[0].status, Status::Pass);
        assert_eq!(got[1].status, Status::Fail);
        assert!(got[1].detail.starts_with("not granted: ecr:BatchImportUpstreamImage on arn:aws:ecr:eu-west-1:123456789012:repository/docker-hub/*"));
        assert_eq!(
            policy_checks(&[], None, &st::target(), &prefixes)[0].status,
            Status::Warn
        );
    }

    #[test]
    fn golden_report() {
        let checks = vec![
            check(Status::Pass, "token", "GetAuthorizationToken answered"),
            check(
                Status::Warn,
                "rule gcr",
                "ECR has no pull-through cache for gcr.io",
            ),
            check(
                Status::Fail,
                "registry policy arn:x",
                "not granted: ecr:CreateRepository on y",
            ),
        ];
        let want = "\
pass  token                  GetAuthorizationToken answered
warn  rule gcr               ECR has no pull-through cache for gcr.io
FAIL  registry policy arn:x  not granted: ecr:CreateRepository on y

1 passed, 1 warnings, 1 failed.
";
        assert_eq!(render(&checks), want);
    }

    mod mocked {
        //! `run` against aws-smithy-mocks: the credential validation and policy calls moto lacks.
        use super::*;
        use aws_sdk_ecr::operation::describe_pull_through_cache_rules::DescribePullThroughCacheRulesOutput;
        use aws_sdk_ecr::operation::describe_repository_creation_templates::DescribeRepositoryCreationTemplatesOutput;
        use aws_sdk_ecr::operation::get_authorization_token::GetAuthorizationTokenOutput;
        use aws_sdk_ecr::operation::get_registry_policy::GetRegistryPolicyOutput;
        use aws_sdk_ecr::operation::validate_pull_through_cache_rule::ValidatePullThroughCacheRuleOutput;
        use aws_sdk_ecr::types::{AuthorizationData, PullThroughCacheRule};
        use aws_smithy_mocks::{Rule, RuleMode, mock, mock_client};

        #[tokio::test]
        async fn validates_credentials_and_checks_the_policy() {
            let d = desired();
            let rules: Vec<PullThroughCacheRule> = d
                .rules
                .iter()
                .map(|r| {
                    PullThroughCacheRule::builder()
                        .ecr_repository_prefix(&r.prefix)
                        .upstream_registry_url(&r.upstream_url)
                        .set_credential_arn(r.credential_arn.clone())
                        .build()
                })
                .collect();
            let policy = policy::merge(None, d.node_statement.as_ref().unwrap())
                .unwrap()
                .policy;
            let mocks: Vec<Rule> = vec![
                mock!(Client::get_authorization_token).then_output(|| {
                    GetAuthorizationTokenOutput::builder()
                        .authorization_data(
                            AuthorizationData::builder()
                                .authorization_token("QVdTOnNlY3JldA==")
                                .proxy_endpoint(
                                    "https://123456789012.dkr.ecr.eu-west-1.amazonaws.com",
                                )
                                .build(),
                        )
                        .build()
                }),
                mock!(Client::describe_pull_through_cache_rules).then_output(move || {
                    DescribePullThroughCacheRulesOutput::builder()
                        .set_pull_through_cache_rules(Some(rules.clone()))
                        .build()
                }),
                mock!(Client::validate_pull_through_cache_rule)
                    .match_requests(|r| r.ecr_repository_prefix() == Some("docker-hub"))
                    .then_output(|| {
                        ValidatePullThroughCacheRuleOutput::builder()
                            .is_valid(true)
                            .build()
                    }),
                mock!(Client::validate_pull_through_cache_rule)
                    .match_requests(|r| r.ecr_repository_prefix() == Some("github"))
                    .then_output(|| {
                        ValidatePullThroughCacheRuleOutput::builder()
                            .is_valid(false)
                            .failure("401 Unauthorized from ghcr.io")
                            .build()
                    }),
                mock!(Client::describe_repository_creation_templates)
                    .then_output(|| DescribeRepositoryCreationTemplatesOutput::builder().build()),
                mock!(Client::get_registry_policy).then_output(move || {
                    GetRegistryPolicyOutput::builder()
                        .policy_text(&policy)
                        .build()
                }),
            ];
            let refs: Vec<&Rule> = mocks.iter().collect();
            let client = mock_client!(aws_sdk_ecr, RuleMode::MatchAny, refs);
            let checks = run(
                &st::config(),
                &client,
                Some("eu-west-1"),
                Err(&"unused".to_owned()),
                &[],
            )
            .await;
            let got: Vec<(&str, Status)> =
                checks.iter().map(|c| (c.name.as_str(), c.status)).collect();
            assert_eq!(
                got,
                [
                    ("token", Status::Pass),
                    ("rule docker-hub", Status::Pass),
                    ("rule github", Status::Pass),
                    ("rule quay", Status::Pass),
                    ("rule gcr", Status::Warn),
                    ("credential docker-hub", Status::Pass),
                    ("credential github", Status::Fail),
                    ("template docker-hub", Status::Warn),
                    ("template github", Status::Warn),
                    ("template quay", Status::Warn),
                    (
                        "registry policy arn:aws:iam::123456789012:role/eks-nodes",
                        Status::Pass
                    ),
                ]
            );
            assert_eq!(
                checks[6].detail,
                "ValidatePullThroughCacheRule: 401 Unauthorized from ghcr.io"
            );
        }
    }
}
