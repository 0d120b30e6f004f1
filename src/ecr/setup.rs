//! `pullthrough ecr setup`: what the account should have (from config), what it has (observed by
//! [`super::aws::observe`]), and the [`Plan`] between them. Everything here is pure.
//!
//! Resources:
//! - one pull-through cache rule per configured upstream ECR supports;
//! - one repository creation template per rule prefix, applied for `PULL_THROUGH_CACHE`;
//! - one statement in the registry policy for the node roles (see [`super::policy`]).
//!
//! A rule's upstream cannot be changed in place, so a prefix that already caches another
//! registry is a conflict for a human to resolve, never something setup deletes.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde_json::Value;

use super::EcrOpsError;
use super::policy::{self, PolicyError};
use super::settings::{SECRET_NAME_PREFIX, upstream_for};
use crate::config::Config;

/// `appliedFor` value of templates setup manages.
pub const APPLIED_FOR: &str = "PULL_THROUGH_CACHE";
/// Description put on templates setup creates.
pub const TEMPLATE_DESCRIPTION: &str = "Managed by pullthrough (pullthrough ecr setup)";

/// A pull-through cache rule, as wanted or as found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleSpec {
    /// `ecrRepositoryPrefix`.
    pub prefix: String,
    /// `upstreamRegistryUrl`.
    pub upstream_url: String,
    /// `credentialArn`.
    pub credential_arn: Option<String>,
}

/// A repository creation template, as wanted or as found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TemplateSpec {
    /// `prefix`.
    pub prefix: String,
    /// `appliedFor`, sorted.
    pub applied_for: Vec<String>,
    /// `imageTagMutability`.
    pub tag_mutability: String,
    /// `encryptionConfiguration.encryptionType`.
    pub encryption_type: String,
    /// `encryptionConfiguration.kmsKey`.
    pub kms_key: Option<String>,
    /// `lifecyclePolicy` (JSON text).
    pub lifecycle_policy: Option<String>,
    /// `resourceTags`.
    pub resource_tags: BTreeMap<String, String>,
    /// `customRoleArn`.
    pub custom_role_arn: Option<String>,
}

/// What the account has now.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Observed {
    /// Every pull-through cache rule.
    pub rules: Vec<RuleSpec>,
    /// Every repository creation template.
    pub templates: Vec<TemplateSpec>,
    /// The registry policy text, if there is one.
    pub registry_policy: Option<String>,
}

/// What the config asks for.
#[derive(Debug, Clone, PartialEq)]
pub struct Desired {
    /// Rules, one per supported upstream, by prefix.
    pub rules: Vec<RuleSpec>,
    /// Templates, one per rule prefix.
    pub templates: Vec<TemplateSpec>,
    /// pullthrough's registry-policy statement; `None` without node roles.
    pub node_statement: Option<Value>,
    /// Configured upstreams ECR has no pull-through cache for: (registry, prefix).
    pub unsupported: Vec<(String, String)>,
}

/// The registry's region and account, needed for the policy's resource ARNs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// AWS region.
    pub region: String,
    /// 12-digit account id of the registry.
    pub account: String,
}

/// Computes the desired state. Fails (usage) when an upstream that needs a credential has none.
pub fn desired(config: &Config, target: &Target) -> Result<Desired, EcrOpsError> {
    let (desired, missing) = desired_parts(config, target);
    if missing.is_empty() {
        Ok(desired)
    } else {
        Err(EcrOpsError::Usage(
            missing
                .into_iter()
                .map(|(_, m)| m)
                .collect::<Vec<_>>()
                .join("\n"),
        ))
    }
}

/// The desired state, with rules whose required credential is missing left without one (and
/// templates without a lifecycle policy when its file cannot be read), and those problems as
/// (check name, message). `check` reports them and carries on.
///
/// This reads `lifecycle_policy_file`, and only here: the mirror never needs it.
pub fn desired_parts(config: &Config, target: &Target) -> (Desired, Vec<(String, String)>) {
    let setup = &config.ecr_setup;
    let mut rules = Vec::new();
    let mut unsupported = Vec::new();
    let mut missing = Vec::new();
    for (registry, upstream) in &config.upstreams {
        let Some((url, kind)) = upstream_for(registry) else {
            unsupported.push((registry.to_string(), upstream.prefix.clone()));
            continue;
        };
        let credential_arn = setup.credentials.get(registry).cloned();
        // Config load checked this against `ecr.region`/`ecr.account` when set; the region
        // may also come from the environment, so check again against the real target.
        if let Some((region, account)) = credential_arn
            .as_deref()
            .and_then(|arn| super::settings::parse_secret_arn(arn).ok())
            && (region != target.region
                || (!target.account.is_empty() && account != target.account))
        {
            missing.push((
                format!("credential {}", upstream.prefix),
                format!(
                    "ecr_setup.credentials.\"{registry}\": the secret is in {region}/{account}, \
                     but the rule would be in {}/{}: ECR reads secrets only from the rule's \
                     account and region",
                    target.region, target.account
                ),
            ));
        }
        if kind.needs_credential && credential_arn.is_none() {
            missing.push((
                format!("credential {}", upstream.prefix),
                format!(
                    "ecr_setup.credentials.\"{registry}\": {} pull-through rules need a Secrets \
                     Manager secret whose name starts with \"{SECRET_NAME_PREFIX}\"; set its ARN",
                    kind.name
                ),
            ));
        }
        rules.push(RuleSpec {
            prefix: upstream.prefix.clone(),
            upstream_url: url,
            credential_arn,
        });
    }
    let t = &setup.template;
    let lifecycle_policy = t.lifecycle_policy.load().unwrap_or_else(|message| {
        missing.push(("template lifecycle policy".to_owned(), message));
        None
    });
    let templates = rules
        .iter()
        .map(|r| TemplateSpec {
            prefix: r.prefix.clone(),
            applied_for: vec![APPLIED_FOR.to_owned()],
            tag_mutability: t.tag_mutability.as_api().to_owned(),
            encryption_type: t.encryption.as_api().to_owned(),
            kms_key: t.encryption.kms_key().map(str::to_owned),
            lifecycle_policy: lifecycle_policy.clone(),
            resource_tags: t.resource_tags.clone(),
            custom_role_arn: t.custom_role_arn.clone(),
        })
        .collect();
    let node_statement = (!setup.node_role_arns.is_empty()).then(|| {
        let resources: Vec<String> = rules
            .iter()
            .map(|r| policy::prefix_resource(&target.region, &target.account, &r.prefix))
            .collect();
        policy::node_statement(&setup.node_role_arns, &resources)
    });
    (
        Desired {
            rules,
            templates,
            node_statement,
            unsupported,
        },
        missing,
    )
}

/// What a plan step does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Create what is missing.
    Create,
    /// Change what differs.
    Update,
    /// Already as wanted.
    Unchanged,
    /// Not managed (reason in the notes).
    Skip,
    /// Cannot be reconciled without a human (reason in the notes).
    Conflict,
}

impl Action {
    fn sign(self) -> char {
        match self {
            Action::Create => '+',
            Action::Update => '~',
            Action::Unchanged => '=',
            Action::Skip => '-',
            Action::Conflict => '!',
        }
    }
}

/// The API call a step makes when applied.
#[derive(Debug, Clone, PartialEq)]
pub enum Op {
    /// Nothing.
    None,
    /// `CreatePullThroughCacheRule`.
    CreateRule(RuleSpec),
    /// `UpdatePullThroughCacheRule` (credential only: the API changes nothing else).
    UpdateRule(RuleSpec),
    /// `CreateRepositoryCreationTemplate`.
    CreateTemplate(TemplateSpec),
    /// `UpdateRepositoryCreationTemplate`.
    UpdateTemplate(TemplateSpec),
    /// `PutRegistryPolicy` with the whole merged policy.
    PutPolicy(String),
}

/// One line of the plan.
#[derive(Debug, Clone, PartialEq)]
pub struct Step {
    /// `rule`, `template` or `registry-policy`.
    pub kind: &'static str,
    /// The prefix, or the policy statement's Sid.
    pub name: String,
    /// What happens.
    pub action: Action,
    /// One-line summary of the resource.
    pub summary: String,
    /// Field changes (`field: old -> new`) or reasons.
    pub notes: Vec<String>,
    /// The call to make.
    pub op: Op,
}

/// Every step, rules first, then templates, then the policy.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    /// The steps.
    pub steps: Vec<Step>,
}

impl Plan {
    /// How many steps have `action`.
    pub fn count(&self, action: Action) -> usize {
        self.steps.iter().filter(|s| s.action == action).count()
    }

    /// Whether applying would change anything.
    pub fn has_changes(&self) -> bool {
        self.count(Action::Create) + self.count(Action::Update) > 0
    }
}

fn opt(s: &Option<String>) -> &str {
    s.as_deref().unwrap_or("(none)")
}

/// Compares desired and observed state. Steps come in the order they are applied: templates,
/// then the registry policy, then the rules. A rule makes nodes create repositories at once, and
/// ECR applies a template only to repositories created after it, so templates and the nodes'
/// permission must be in place before the first rule.
pub fn plan(desired: &Desired, observed: &Observed) -> Result<Plan, PolicyError> {
    let mut rule_steps = Vec::new();
    for want in &desired.rules {
        let summary = match &want.credential_arn {
            Some(c) => format!("{} (credential {c})", want.upstream_url),
            None => want.upstream_url.clone(),
        };
        let found = observed.rules.iter().find(|r| r.prefix == want.prefix);
        let (action, notes, op) = match found {
            None => (Action::Create, vec![], Op::CreateRule(want.clone())),
            Some(have) if !have.upstream_url.eq_ignore_ascii_case(&want.upstream_url) => (
                Action::Conflict,
                vec![format!(
                    "prefix {:?} already caches {}; ECR cannot change a rule's upstream: delete \
                     that rule or choose another prefix",
                    want.prefix, have.upstream_url
                )],
                Op::None,
            ),
            Some(have)
                if want.credential_arn.is_some() && have.credential_arn != want.credential_arn =>
            {
                (
                    Action::Update,
                    vec![format!(
                        "credentialArn: {} -> {}",
                        opt(&have.credential_arn),
                        opt(&want.credential_arn)
                    )],
                    Op::UpdateRule(want.clone()),
                )
            }
            Some(_) => (Action::Unchanged, vec![], Op::None),
        };
        rule_steps.push(Step {
            kind: "rule",
            name: want.prefix.clone(),
            action,
            summary,
            notes,
            op,
        });
    }
    for (registry, prefix) in &desired.unsupported {
        rule_steps.push(Step {
            kind: "rule",
            name: prefix.clone(),
            action: Action::Skip,
            summary: registry.clone(),
            notes: vec![format!(
                "ECR has no pull-through cache for {registry}; pulls of it always go upstream"
            )],
            op: Op::None,
        });
    }
    let mut steps = Vec::new();
    for want in &desired.templates {
        let summary = template_summary(want);
        let found = observed.templates.iter().find(|t| t.prefix == want.prefix);
        let (action, notes, op) = match found {
            None => (Action::Create, vec![], Op::CreateTemplate(want.clone())),
            Some(have) => {
                // Keep what else the template is applied for (replication, say).
                let mut merged = want.clone();
                for a in &have.applied_for {
                    if !merged.applied_for.contains(a) {
                        merged.applied_for.push(a.clone());
                    }
                }
                merged.applied_for.sort();
                let notes = template_diff(have, &merged);
                if notes.is_empty() {
                    (Action::Unchanged, notes, Op::None)
                } else {
                    (Action::Update, notes, Op::UpdateTemplate(merged))
                }
            }
        };
        steps.push(Step {
            kind: "template",
            name: want.prefix.clone(),
            action,
            summary,
            notes,
            op,
        });
    }
    match &desired.node_statement {
        None => steps.push(Step {
            kind: "registry-policy",
            name: policy::STATEMENT_SID.to_owned(),
            action: Action::Skip,
            summary: "no ecr_setup.node_role_arns".into(),
            notes: vec!["the registry policy is left as it is".into()],
            op: Op::None,
        }),
        Some(stmt) => {
            let merged = policy::merge(observed.registry_policy.as_deref(), stmt)?;
            let roles = stmt["Principal"]["AWS"].as_array().map_or(0, Vec::len);
            let prefixes = stmt["Resource"].as_array().map_or(0, Vec::len);
            let others = others_count(observed.registry_policy.as_deref());
            let summary = format!(
                "allow {} for {roles} node role(s) on {prefixes} prefix(es)",
                policy::NODE_ACTIONS.join(", ")
            );
            let mut notes = Vec::new();
            if others > 0 {
                notes.push(format!("keeps the other {others} statement(s) as they are"));
            }
            let (action, op) = if !merged.changed {
                (Action::Unchanged, Op::None)
            } else if merged.replaced {
                (Action::Update, Op::PutPolicy(merged.policy))
            } else {
                (Action::Create, Op::PutPolicy(merged.policy))
            };
            steps.push(Step {
                kind: "registry-policy",
                name: policy::STATEMENT_SID.to_owned(),
                action,
                summary,
                notes,
                op,
            });
        }
    }
    steps.extend(rule_steps);
    Ok(Plan { steps })
}

fn others_count(policy: Option<&str>) -> usize {
    let Some(doc) = policy.and_then(|p| serde_json::from_str::<Value>(p).ok()) else {
        return 0;
    };
    let is_ours = |s: &Value| s["Sid"] == policy::STATEMENT_SID;
    match &doc["Statement"] {
        Value::Array(a) => a.iter().filter(|s| !is_ours(s)).count(),
        Value::Object(_) => usize::from(!is_ours(&doc["Statement"])),
        _ => 0,
    }
}

fn template_summary(t: &TemplateSpec) -> String {
    let lifecycle = match &t.lifecycle_policy {
        None => "no lifecycle policy".to_owned(),
        Some(p) => lifecycle_summary(p),
    };
    let mut s = format!(
        "{}, {}, {}{}, {lifecycle}",
        t.applied_for.join("+"),
        t.tag_mutability,
        t.encryption_type,
        t.kms_key
            .as_ref()
            .map(|k| format!(" ({k})"))
            .unwrap_or_default(),
    );
    if !t.resource_tags.is_empty() {
        let tags: Vec<String> = t
            .resource_tags
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        let _ = write!(s, ", tags {}", tags.join(","));
    }
    if let Some(role) = &t.custom_role_arn {
        let _ = write!(s, ", role {}", role.rsplit('/').next().unwrap_or(role));
    }
    s
}

/// "expire untagged after N days" for the default policy, else the rule count.
fn lifecycle_summary(policy: &str) -> String {
    let Ok(v) = serde_json::from_str::<Value>(policy) else {
        return "lifecycle policy".into();
    };
    let rules = v["rules"].as_array().map_or(0, Vec::len);
    let sel = &v["rules"][0]["selection"];
    if rules == 1 && sel["tagStatus"] == "untagged" && sel["countType"] == "sinceImagePushed" {
        format!("expire untagged after {} days", sel["countNumber"])
    } else {
        format!("lifecycle policy with {rules} rule(s)")
    }
}

fn json_eq(a: &Option<String>, b: &Option<String>) -> bool {
    let parse = |s: &Option<String>| {
        s.as_deref()
            .map(|t| serde_json::from_str::<Value>(t).unwrap_or(Value::String(t.to_owned())))
    };
    parse(a) == parse(b)
}

fn template_diff(have: &TemplateSpec, want: &TemplateSpec) -> Vec<String> {
    let mut notes = Vec::new();
    if have.applied_for != want.applied_for {
        notes.push(format!(
            "appliedFor: {} -> {}",
            have.applied_for.join(","),
            want.applied_for.join(",")
        ));
    }
    if have.tag_mutability != want.tag_mutability {
        notes.push(format!(
            "imageTagMutability: {} -> {}",
            have.tag_mutability, want.tag_mutability
        ));
    }
    // No `kms_key` means ECR's AWS-managed key, which ECR reports resolved to its ARN: any key
    // matches then, or the plan would show a change on every run.
    let kms_differs = want.kms_key.is_some() && have.kms_key != want.kms_key;
    if have.encryption_type != want.encryption_type || kms_differs {
        notes.push(format!(
            "encryption: {} {} -> {} {}",
            have.encryption_type,
            opt(&have.kms_key),
            want.encryption_type,
            opt(&want.kms_key)
        ));
    }
    if !json_eq(&have.lifecycle_policy, &want.lifecycle_policy) {
        let show = |p: &Option<String>| p.as_deref().map_or("(none)".to_owned(), lifecycle_summary);
        notes.push(format!(
            "lifecyclePolicy: {} -> {}",
            show(&have.lifecycle_policy),
            show(&want.lifecycle_policy)
        ));
    }
    if have.resource_tags != want.resource_tags {
        let show = |m: &BTreeMap<String, String>| {
            if m.is_empty() {
                "(none)".to_owned()
            } else {
                m.iter()
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect::<Vec<_>>()
                    .join(",")
            }
        };
        notes.push(format!(
            "resourceTags: {} -> {}",
            show(&have.resource_tags),
            show(&want.resource_tags)
        ));
    }
    if have.custom_role_arn != want.custom_role_arn {
        notes.push(format!(
            "customRoleArn: {} -> {}",
            opt(&have.custom_role_arn),
            opt(&want.custom_role_arn)
        ));
    }
    notes
}

/// The plan as a diff: one line per step (`+` create, `~` update, `=` unchanged, `-` skip,
/// `!` conflict), indented notes, and a count line.
pub fn render(plan: &Plan) -> String {
    let mut out = String::new();
    let width = plan.steps.iter().map(|s| s.name.len()).max().unwrap_or(0);
    for s in &plan.steps {
        let _ = writeln!(
            out,
            "{} {:<15} {:<width$}  {}",
            s.action.sign(),
            s.kind,
            s.name,
            s.summary
        );
        for n in &s.notes {
            let _ = writeln!(out, "      {n}");
        }
    }
    let _ = writeln!(
        out,
        "\nPlan: {} to create, {} to update, {} unchanged, {} skipped, {} conflict(s).",
        plan.count(Action::Create),
        plan.count(Action::Update),
        plan.count(Action::Unchanged),
        plan.count(Action::Skip),
        plan.count(Action::Conflict),
    );
    out
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use rstest::rstest;

    pub(crate) const HUB_SECRET: &str = "arn:aws:secretsmanager:eu-west-1:123456789012:secret:ecr-pullthroughcache/docker-hub-AbCdEf";
    pub(crate) const GH_SECRET: &str =
        "arn:aws:secretsmanager:eu-west-1:123456789012:secret:ecr-pullthroughcache/github-XyZ123";

    pub(crate) fn config() -> Config {
        let text = format!(
            r#"
[ecr]
region = "eu-west-1"
account = "123456789012"

[upstreams."docker.io"]
prefix = "docker-hub"
[upstreams."ghcr.io"]
prefix = "github"
[upstreams."quay.io"]
prefix = "quay"
[upstreams."gcr.io"]
prefix = "gcr"

[ecr_setup]
node_role_arns = ["arn:aws:iam::123456789012:role/eks-nodes"]
[ecr_setup.credentials]
"docker.io" = "{HUB_SECRET}"
"ghcr.io" = "{GH_SECRET}"
[ecr_setup.template]
resource_tags = {{ team = "platform" }}
custom_role_arn = "arn:aws:iam::123456789012:role/ecr-templates"
"#
        );
        Config::from_toml_str(&text, "t.toml").unwrap()
    }

    pub(crate) fn target() -> Target {
        Target {
            region: "eu-west-1".into(),
            account: "123456789012".into(),
        }
    }

    fn want() -> Desired {
        desired(&config(), &target()).unwrap()
    }

    /// The observed state that exactly matches `want()`.
    fn in_sync() -> Observed {
        let d = want();
        let policy = policy::merge(None, d.node_statement.as_ref().unwrap())
            .unwrap()
            .policy;
        Observed {
            rules: d.rules.clone(),
            templates: d.templates.clone(),
            registry_policy: Some(policy),
        }
    }

    fn actions(p: &Plan) -> Vec<(String, Action)> {
        p.steps
            .iter()
            .map(|s| (format!("{} {}", s.kind, s.name), s.action))
            .collect()
    }

    #[test]
    fn desired_state_follows_config() {
        let d = want();
        let urls: Vec<(&str, &str, bool)> = d
            .rules
            .iter()
            .map(|r| {
                (
                    r.prefix.as_str(),
                    r.upstream_url.as_str(),
                    r.credential_arn.is_some(),
                )
            })
            .collect();
        assert_eq!(
            urls,
            [
                ("docker-hub", "registry-1.docker.io", true),
                ("github", "ghcr.io", true),
                ("quay", "quay.io", false),
            ]
        );
        assert_eq!(d.unsupported, [("gcr.io".to_owned(), "gcr".to_owned())]);
        assert_eq!(d.templates.len(), 3);
        assert!(d.templates.iter().all(|t| t.applied_for == [APPLIED_FOR]));
        let stmt = d.node_statement.unwrap();
        assert_eq!(
            stmt["Resource"][0],
            "arn:aws:ecr:eu-west-1:123456789012:repository/docker-hub/*"
        );
    }

    #[test]
    fn a_missing_credential_is_a_usage_error_naming_the_key() {
        let text = "[upstreams.\"docker.io\"]\nprefix = \"docker-hub\"\n";
        let c = Config::from_toml_str(text, "t.toml").unwrap();
        let e = desired(&c, &target()).unwrap_err();
        assert!(e.is_usage());
        assert!(
            e.to_string().starts_with("ecr_setup.credentials.\"docker.io\": Docker Hub pull-through rules need a Secrets Manager secret whose name starts with \"ecr-pullthroughcache/\""),
            "{e}"
        );
    }

    fn with(f: impl FnOnce(&mut Observed)) -> Observed {
        let mut o = in_sync();
        f(&mut o);
        o
    }

    #[rstest]
    #[case::empty_account(Observed::default(), &[Action::Create, Action::Create, Action::Create, Action::Create, Action::Create, Action::Create, Action::Create, Action::Skip])]
    #[case::in_sync(in_sync(), &[Action::Unchanged, Action::Unchanged, Action::Unchanged, Action::Unchanged, Action::Unchanged, Action::Unchanged, Action::Unchanged, Action::Skip])]
    #[case::credential_rotated(with(|o| o.rules[0].credential_arn = Some("arn:aws:secretsmanager:eu-west-1:123456789012:secret:ecr-pullthroughcache/old".into())),
        &[Action::Unchanged, Action::Unchanged, Action::Unchanged, Action::Unchanged, Action::Update, Action::Unchanged, Action::Unchanged, Action::Skip])]
    #[case::prefix_taken_by_other_upstream(with(|o| o.rules[2].upstream_url = "public.ecr.aws".into()),
        &[Action::Unchanged, Action::Unchanged, Action::Unchanged, Action::Unchanged, Action::Unchanged, Action::Unchanged, Action::Conflict, Action::Skip])]
    #[case::upstream_url_case_differs(with(|o| o.rules[2].upstream_url = "Quay.io".into()),
        &[Action::Unchanged, Action::Unchanged, Action::Unchanged, Action::Unchanged, Action::Unchanged, Action::Unchanged, Action::Unchanged, Action::Skip])]
    #[case::template_mutability(with(|o| o.templates[1].tag_mutability = "IMMUTABLE".into()),
        &[Action::Unchanged, Action::Update, Action::Unchanged, Action::Unchanged, Action::Unchanged, Action::Unchanged, Action::Unchanged, Action::Skip])]
    #[case::template_lifecycle_reformatted(with(|o| {
            let p: Value = serde_json::from_str(o.templates[0].lifecycle_policy.as_deref().unwrap()).unwrap();
            o.templates[0].lifecycle_policy = Some(serde_json::to_string_pretty(&p).unwrap());
        }),
        &[Action::Unchanged, Action::Unchanged, Action::Unchanged, Action::Unchanged, Action::Unchanged, Action::Unchanged, Action::Unchanged, Action::Skip])]
    #[case::template_tags_missing(with(|o| o.templates[2].resource_tags.clear()),
        &[Action::Unchanged, Action::Unchanged, Action::Update, Action::Unchanged, Action::Unchanged, Action::Unchanged, Action::Unchanged, Action::Skip])]
    #[case::policy_without_our_statement(with(|o| o.registry_policy = Some(r#"{"Version":"2012-10-17","Statement":[{"Sid":"Other","Effect":"Allow","Principal":{"AWS":"arn:aws:iam::210987654321:root"},"Action":"ecr:ReplicateImage","Resource":"*"}]}"#.into())),
        &[Action::Unchanged, Action::Unchanged, Action::Unchanged, Action::Create, Action::Unchanged, Action::Unchanged, Action::Unchanged, Action::Skip])]
    #[case::policy_with_stale_statement(with(|o| o.registry_policy = Some(format!(r#"{{"Statement":[{{"Sid":"{}","Effect":"Allow","Principal":{{"AWS":"arn:aws:iam::123456789012:role/old"}},"Action":"ecr:CreateRepository","Resource":"*"}}]}}"#, policy::STATEMENT_SID))),
        &[Action::Unchanged, Action::Unchanged, Action::Unchanged, Action::Update, Action::Unchanged, Action::Unchanged, Action::Unchanged, Action::Skip])]
    fn plans(#[case] observed: Observed, #[case] want_actions: &[Action]) {
        let p = plan(&want(), &observed).unwrap();
        let got: Vec<Action> = p.steps.iter().map(|s| s.action).collect();
        assert_eq!(got, want_actions, "{:?}", actions(&p));
    }

    #[test]
    fn template_update_keeps_other_applied_for() {
        let o = with(|o| o.templates[0].applied_for = vec!["REPLICATION".into()]);
        let p = plan(&want(), &o).unwrap();
        let step = p.steps.iter().find(|s| s.kind == "template").unwrap();
        assert_eq!(step.action, Action::Update);
        let Op::UpdateTemplate(t) = &step.op else {
            panic!("{:?}", step.op)
        };
        assert_eq!(t.applied_for, ["PULL_THROUGH_CACHE", "REPLICATION"]);
        // Once both are there, nothing changes.
        let o =
            with(|o| o.templates[0].applied_for = vec![APPLIED_FOR.into(), "REPLICATION".into()]);
        let p = plan(&want(), &o).unwrap();
        assert!(!p.has_changes());
    }

    #[rstest]
    #[case::unset_key_matches_the_resolved_aws_key(
        "KMS",
        Some("arn:aws:kms:eu-west-1:123456789012:key/aws-ecr"),
        None,
        false
    )]
    #[case::unset_key_still_needs_kms("AES256", None, None, true)]
    #[case::set_key_must_match(
        "KMS",
        Some("arn:aws:kms:eu-west-1:123456789012:key/old"),
        Some("arn:aws:kms:eu-west-1:123456789012:key/new"),
        true
    )]
    #[case::set_key_matches(
        "KMS",
        Some("arn:aws:kms:eu-west-1:123456789012:key/new"),
        Some("arn:aws:kms:eu-west-1:123456789012:key/new"),
        false
    )]
    fn kms_keys(
        #[case] have_type: &str,
        #[case] have_key: Option<&str>,
        #[case] want_key: Option<&str>,
        #[case] changes: bool,
    ) {
        let mut d = want();
        for t in &mut d.templates {
            t.encryption_type = "KMS".into();
            t.kms_key = want_key.map(str::to_owned);
        }
        let o = with(|o| {
            for t in &mut o.templates {
                t.encryption_type = have_type.into();
                t.kms_key = have_key.map(str::to_owned);
            }
        });
        let p = plan(&d, &o).unwrap();
        assert_eq!(p.has_changes(), changes, "{:?}", actions(&p));
    }

    #[test]
    fn a_secret_in_another_region_than_the_target_is_a_usage_error() {
        let other = Target {
            region: "us-east-1".into(),
            account: "123456789012".into(),
        };
        let e = desired(&config(), &other).unwrap_err();
        assert!(e.is_usage());
        assert!(
            e.to_string().contains("ecr_setup.credentials.\"docker.io\": the secret is in eu-west-1/123456789012, but the rule would be in us-east-1/123456789012"),
            "{e}"
        );
    }

    #[test]
    fn no_node_roles_leaves_the_policy_alone() {
        let text = "[upstreams.\"quay.io\"]\nprefix = \"quay\"\n";
        let c = Config::from_toml_str(text, "t.toml").unwrap();
        let d = desired(&c, &target()).unwrap();
        let p = plan(&d, &Observed::default()).unwrap();
        let policy = p
            .steps
            .iter()
            .find(|s| s.kind == "registry-policy")
            .unwrap();
        assert_eq!(policy.action, Action::Skip);
    }

    #[test]
    fn golden_plan_for_an_empty_account() {
        let got = render(&plan(&want(), &Observed::default()).unwrap());
        let want = "\
+ template        docker-hub                        PULL_THROUGH_CACHE, MUTABLE, AES256, expire untagged after 7 days, tags team=platform, role ecr-templates
+ template        github                            PULL_THROUGH_CACHE, MUTABLE, AES256, expire untagged after 7 days, tags team=platform, role ecr-templates
+ template        quay                              PULL_THROUGH_CACHE, MUTABLE, AES256, expire untagged after 7 days, tags team=platform, role ecr-templates
+ registry-policy PullthroughNodesPullThroughCache  allow ecr:BatchImportUpstreamImage, ecr:CreateRepository for 1 node role(s) on 3 prefix(es)
+ rule            docker-hub                        registry-1.docker.io (credential arn:aws:secretsmanager:eu-west-1:123456789012:secret:ecr-pullthroughcache/docker-hub-AbCdEf)
+ rule            github                            ghcr.io (credential arn:aws:secretsmanager:eu-west-1:123456789012:secret:ecr-pullthroughcache/github-XyZ123)
+ rule            quay                              quay.io
- rule            gcr                               gcr.io
      ECR has no pull-through cache for gcr.io; pulls of it always go upstream

Plan: 7 to create, 0 to update, 0 unchanged, 1 skipped, 0 conflict(s).
";
        assert_eq!(got, want, "got:\n{got}");
    }

    #[test]
    fn golden_plan_with_updates_and_a_conflict() {
        let o = with(|o| {
            o.rules[0].credential_arn = Some(
                "arn:aws:secretsmanager:eu-west-1:123456789012:secret:ecr-pullthroughcache/old"
                    .into(),
            );
            o.rules[2].upstream_url = "public.ecr.aws".into();
            o.templates[1].tag_mutability = "IMMUTABLE".into();
            o.templates[1].lifecycle_policy = None;
            o.registry_policy = Some(format!(
                r#"{{"Statement":[{{"Sid":"Keep","Effect":"Allow","Principal":"*","Action":"ecr:BatchGetImage","Resource":"*"}},{{"Sid":"{}","Effect":"Allow","Principal":{{"AWS":"arn:aws:iam::123456789012:role/old"}},"Action":"ecr:CreateRepository","Resource":"*"}}]}}"#,
                policy::STATEMENT_SID
            ));
        });
        let got = render(&plan(&want(), &o).unwrap());
        let want = "\
= template        docker-hub                        PULL_THROUGH_CACHE, MUTABLE, AES256, expire untagged after 7 days, tags team=platform, role ecr-templates
~ template        github                            PULL_THROUGH_CACHE, MUTABLE, AES256, expire untagged after 7 days, tags team=platform, role ecr-templates
      imageTagMutability: IMMUTABLE -> MUTABLE
      lifecyclePolicy: (none) -> expire untagged after 7 days
= template        quay                              PULL_THROUGH_CACHE, MUTABLE, AES256, expire untagged after 7 days, tags team=platform, role ecr-templates
~ registry-policy PullthroughNodesPullThroughCache  allow ecr:BatchImportUpstreamImage, ecr:CreateRepository for 1 node role(s) on 3 prefix(es)
      keeps the other 1 statement(s) as they are
~ rule            docker-hub                        registry-1.docker.io (credential arn:aws:secretsmanager:eu-west-1:123456789012:secret:ecr-pullthroughcache/docker-hub-AbCdEf)
      credentialArn: arn:aws:secretsmanager:eu-west-1:123456789012:secret:ecr-pullthroughcache/old -> arn:aws:secretsmanager:eu-west-1:123456789012:secret:ecr-pullthroughcache/docker-hub-AbCdEf
= rule            github                            ghcr.io (credential arn:aws:secretsmanager:eu-west-1:123456789012:secret:ecr-pullthroughcache/github-XyZ123)
! rule            quay                              quay.io
      prefix \"quay\" already caches public.ecr.aws; ECR cannot change a rule's upstream: delete that rule or choose another prefix
- rule            gcr                               gcr.io
      ECR has no pull-through cache for gcr.io; pulls of it always go upstream

Plan: 0 to create, 3 to update, 3 unchanged, 1 skipped, 1 conflict(s).
";
        assert_eq!(got, want, "got:\n{got}");
    }
}
