//! `[ecr_setup]`: what `pullthrough ecr setup` creates besides the rules themselves. The raw
//! serde shape ([`RawEcrSetup`]) and the validated one ([`EcrSetup`]), checked at config load like
//! every other section, so a bad secret ARN fails with `file:line: key` before any AWS call.
//!
//! Which upstreams take a credential, and the `upstreamRegistryUrl` of each, follow the ECR
//! `CreatePullThroughCacheRule` reference: Docker Hub, GitHub, GitLab, Azure and Chainguard
//! need a Secrets Manager secret whose name starts with `ecr-pullthroughcache/`; ECR Public,
//! Kubernetes and Quay take none.

use std::collections::BTreeMap;
use std::ops::Range;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use toml::Spanned;

use crate::config::upstreams::Upstream;
use crate::oci::RegistryHost;

/// The secret-name prefix ECR requires for pull-through credentials.
pub const SECRET_NAME_PREFIX: &str = "ecr-pullthroughcache/";
/// Days after which the default lifecycle policy expires untagged images.
pub const DEFAULT_UNTAGGED_EXPIRE_DAYS: u64 = 7;

/// `[ecr_setup]` as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawEcrSetup {
    node_role_arns: Option<Spanned<Vec<Spanned<String>>>>,
    credentials: Option<BTreeMap<Spanned<String>, Spanned<String>>>,
    #[serde(default)]
    template: RawTemplate,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTemplate {
    image_tag_mutability: Option<Spanned<String>>,
    encryption: Option<Spanned<String>>,
    kms_key: Option<Spanned<String>>,
    untagged_expire_days: Option<Spanned<u64>>,
    lifecycle_policy_file: Option<Spanned<String>>,
    resource_tags: Option<BTreeMap<Spanned<String>, Spanned<String>>>,
    custom_role_arn: Option<Spanned<String>>,
}

/// A validation failure; `config.rs` turns it into `file:line: key: message`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SettingsError {
    /// Byte span of the offending value.
    pub span: Range<usize>,
    /// Dotted key.
    pub key: String,
    /// What is wrong.
    pub message: String,
}

/// The validated `[ecr_setup]` section. Empty when the section is absent.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EcrSetup {
    /// IAM roles of the nodes, allowed to create repositories and import images by the registry
    /// policy. Empty: setup leaves the registry policy alone.
    pub node_role_arns: Vec<String>,
    /// Secrets Manager secret ARN per upstream that takes a credential.
    pub credentials: BTreeMap<RegistryHost, String>,
    /// The repository creation template applied for every pull-through prefix.
    pub template: TemplateSettings,
}

/// `image_tag_mutability`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum TagMutability {
    /// Tags may move (ECR re-imports a tag that moved upstream).
    #[default]
    Mutable,
    /// Tags never move.
    Immutable,
}

impl TagMutability {
    /// The API's value.
    pub fn as_api(self) -> &'static str {
        match self {
            TagMutability::Mutable => "MUTABLE",
            TagMutability::Immutable => "IMMUTABLE",
        }
    }
}

/// `encryption` (+ `kms_key`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Encryption {
    /// S3-managed keys.
    #[default]
    Aes256,
    /// KMS, with a key ARN or ECR's AWS-managed key when `None`.
    Kms(Option<String>),
}

impl Encryption {
    /// The API's `encryptionType`.
    pub fn as_api(&self) -> &'static str {
        match self {
            Encryption::Aes256 => "AES256",
            Encryption::Kms(_) => "KMS",
        }
    }

    /// The KMS key, if any.
    pub fn kms_key(&self) -> Option<&str> {
        match self {
            Encryption::Aes256 => None,
            Encryption::Kms(k) => k.as_deref(),
        }
    }
}

/// `[ecr_setup.template]`, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TemplateSettings {
    /// Tag mutability of created repositories.
    pub tag_mutability: TagMutability,
    /// Encryption of created repositories.
    pub encryption: Encryption,
    /// Lifecycle policy of created repositories.
    pub lifecycle_policy: LifecyclePolicy,
    /// Tags put on every created repository.
    pub resource_tags: BTreeMap<String, String>,
    /// The role ECR assumes to create repositories; needed for resource tags and KMS.
    pub custom_role_arn: Option<String>,
}

impl Default for TemplateSettings {
    fn default() -> Self {
        Self {
            tag_mutability: TagMutability::Mutable,
            encryption: Encryption::Aes256,
            lifecycle_policy: LifecyclePolicy::Json(default_lifecycle_policy(
                DEFAULT_UNTAGGED_EXPIRE_DAYS,
            )),
            resource_tags: BTreeMap::new(),
            custom_role_arn: None,
        }
    }
}

/// `lifecycle_policy_file` / `untagged_expire_days`, as the template will get it.
///
/// A file is only named at config load, never read: the config is shared with the DaemonSet,
/// whose nodes do not have the admin's policy file. `ecr setup` and `ecr check` read it
/// ([`LifecyclePolicy::load`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LifecyclePolicy {
    /// No lifecycle policy (`untagged_expire_days = 0`).
    Off,
    /// A policy pullthrough wrote (compact JSON).
    Json(String),
    /// `lifecycle_policy_file`: relative paths are relative to the config file's directory once
    /// [`TemplateSettings::anchor_paths`] ran (`Config::load` does).
    File(PathBuf),
}

impl LifecyclePolicy {
    /// The policy text (compact JSON), reading the file if there is one; `None` means no policy.
    /// The error names the key and the file.
    pub fn load(&self) -> Result<Option<String>, String> {
        match self {
            LifecyclePolicy::Off => Ok(None),
            LifecyclePolicy::Json(j) => Ok(Some(j.clone())),
            LifecyclePolicy::File(path) => read_lifecycle_policy(path).map(Some).map_err(|why| {
                format!(
                    "ecr_setup.template.lifecycle_policy_file: {} {why}",
                    path.display()
                )
            }),
        }
    }
}

impl TemplateSettings {
    /// Makes a relative `lifecycle_policy_file` relative to `base` (the config file's directory),
    /// not to the working directory of whoever runs the command.
    pub fn anchor_paths(&mut self, base: &Path) {
        if let LifecyclePolicy::File(p) = &mut self.lifecycle_policy
            && p.is_relative()
        {
            *p = base.join(&*p);
        }
    }
}

/// The default lifecycle policy: expire untagged images `days` after they were pushed. In a
/// pull-through repository an image becomes untagged when its tag moves upstream and ECR
/// imports the new one; nothing but a digest-pinned pod still wants it.
pub fn default_lifecycle_policy(days: u64) -> String {
    serde_json::json!({
        "rules": [{
            "rulePriority": 1,
            "description": format!("pullthrough: expire untagged images after {days} days"),
            "selection": {
                "tagStatus": "untagged",
                "countType": "sinceImagePushed",
                "countUnit": "days",
                "countNumber": days,
            },
            "action": { "type": "expire" },
        }]
    })
    .to_string()
}

/// What ECR knows about an upstream registry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UpstreamKind {
    /// Human name, for messages.
    pub name: &'static str,
    /// Whether a pull-through rule for it needs a Secrets Manager credential.
    pub needs_credential: bool,
}

/// The rule's `upstreamRegistryUrl` for a configured registry, and what kind of upstream it is;
/// `None` for registries ECR pull-through does not support.
pub fn upstream_for(registry: &RegistryHost) -> Option<(String, UpstreamKind)> {
    let host = registry.as_str();
    let kind = |name, needs_credential| UpstreamKind {
        name,
        needs_credential,
    };
    let (url, k) = match host {
        "docker.io" => ("registry-1.docker.io".to_owned(), kind("Docker Hub", true)),
        "ghcr.io" => (host.to_owned(), kind("GitHub Container RegistryHost", true)),
        "registry.gitlab.com" => (host.to_owned(), kind("GitLab Container RegistryHost", true)),
        "cgr.dev" => (host.to_owned(), kind("Chainguard", true)),
        "public.ecr.aws" => (host.to_owned(), kind("Amazon ECR Public", false)),
        "registry.k8s.io" => (host.to_owned(), kind("Kubernetes", false)),
        "quay.io" => (host.to_owned(), kind("Quay", false)),
        h if h.ends_with(".azurecr.io") && !h.contains(':') => {
            (h.to_owned(), kind("Azure Container RegistryHost", true))
        }
        _ => return None,
    };
    Some((url, k))
}

/// Whether `arn` names a Secrets Manager secret ECR accepts as a pull-through credential:
/// `arn:<partition>:secretsmanager:<region>:<account>:secret:ecr-pullthroughcache/<name>`.
/// Returns the region and account on success.
pub fn parse_secret_arn(arn: &str) -> Result<(&str, &str), String> {
    let parts: Vec<&str> = arn.splitn(7, ':').collect();
    let [scheme, partition, service, region, account, kind, name] = parts[..] else {
        return Err("is not a Secrets Manager secret ARN (arn:aws:secretsmanager:REGION:ACCOUNT:secret:ecr-pullthroughcache/NAME)".into());
    };
    if scheme != "arn"
        || !partition.starts_with("aws")
        || service != "secretsmanager"
        || kind != "secret"
        || region.is_empty()
    {
        return Err("is not a Secrets Manager secret ARN (arn:aws:secretsmanager:REGION:ACCOUNT:secret:ecr-pullthroughcache/NAME)".into());
    }
    if account.len() != 12 || !account.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!(
            "has {account:?} where a 12-digit account id belongs"
        ));
    }
    let Some(rest) = name.strip_prefix(SECRET_NAME_PREFIX) else {
        return Err(format!(
            "names the secret {name:?}: ECR only uses secrets whose name starts with \
             \"{SECRET_NAME_PREFIX}\" (rename it in Secrets Manager)"
        ));
    };
    let ok_char = |b: u8| b.is_ascii_alphanumeric() || b"/_+=.@-".contains(&b);
    if rest.is_empty() || !rest.bytes().all(ok_char) || !(50..=612).contains(&arn.len()) {
        return Err(format!(
            "names the secret {name:?}, which is not a valid secret name after \"{SECRET_NAME_PREFIX}\""
        ));
    }
    Ok((region, account))
}

fn valid_role_arn(arn: &str) -> bool {
    let parts: Vec<&str> = arn.splitn(6, ':').collect();
    matches!(parts[..], ["arn", p, "iam", "", account, res]
        if p.starts_with("aws")
            && account.len() == 12
            && account.bytes().all(|b| b.is_ascii_digit())
            && res.strip_prefix("role/").is_some_and(|r| !r.is_empty()))
}

impl EcrSetup {
    /// Validates `raw` against the configured upstreams and `[ecr]` region and account.
    pub fn validate(
        raw: &RawEcrSetup,
        upstreams: &BTreeMap<RegistryHost, Upstream>,
        region: Option<&str>,
        account: Option<&str>,
    ) -> Result<EcrSetup, SettingsError> {
        let err = |span: Range<usize>, key: &str, message: String| SettingsError {
            span,
            key: key.to_owned(),
            message,
        };
        let mut node_role_arns = Vec::new();
        if let Some(list) = &raw.node_role_arns {
            for arn in list.get_ref() {
                if !valid_role_arn(arn.get_ref()) {
                    return Err(err(
                        arn.span(),
                        "ecr_setup.node_role_arns",
                        format!(
                            "{:?} is not an IAM role ARN (arn:aws:iam::ACCOUNT:role/NAME)",
                            arn.get_ref()
                        ),
                    ));
                }
                if !node_role_arns.contains(arn.get_ref()) {
                    node_role_arns.push(arn.get_ref().clone());
                }
            }
        }
        node_role_arns.sort();

        let mut credentials = BTreeMap::new();
        for (name, arn) in raw.credentials.iter().flatten() {
            let key = format!("ecr_setup.credentials.{:?}", name.get_ref());
            let registry = RegistryHost::parse(name.get_ref())
                .filter(|r| upstreams.contains_key(r))
                .ok_or_else(|| {
                    err(
                        name.span(),
                        &key,
                        format!("{:?} is not a configured upstream", name.get_ref()),
                    )
                })?;
            match upstream_for(&registry) {
                Some((_, k)) if k.needs_credential => {}
                Some((_, k)) => {
                    return Err(err(
                        name.span(),
                        &key,
                        format!("{} pull-through rules take no credential", k.name),
                    ));
                }
                None => {
                    return Err(err(
                        name.span(),
                        &key,
                        format!("ECR has no pull-through cache for {registry}"),
                    ));
                }
            }
            let (secret_region, secret_account) = parse_secret_arn(arn.get_ref())
                .map_err(|why| err(arn.span(), &key, format!("{:?} {why}", arn.get_ref())))?;
            if let Some(r) = region
                && r != secret_region
            {
                return Err(err(
                    arn.span(),
                    &key,
                    format!(
                        "the secret is in {secret_region}, but ecr.region is {r}: ECR needs it in the rule's region"
                    ),
                ));
            }
            if let Some(a) = account
                && a != secret_account
            {
                return Err(err(
                    arn.span(),
                    &key,
                    format!(
                        "the secret is in account {secret_account}, but ecr.account is {a}: ECR needs it in the rule's account"
                    ),
                ));
            }
            credentials.insert(registry, arn.get_ref().clone());
        }

        let template = validate_template(&raw.template).map_err(|(span, k, m)| err(span, &k, m))?;
        Ok(EcrSetup {
            node_role_arns,
            credentials,
            template,
        })
    }
}

type FieldError = (Range<usize>, String, String);

fn validate_template(raw: &RawTemplate) -> Result<TemplateSettings, FieldError> {
    let key = |k: &str| format!("ecr_setup.template.{k}");
    let tag_mutability = match raw.image_tag_mutability.as_ref() {
        None => TagMutability::Mutable,
        Some(s) => match s.get_ref().as_str() {
            "MUTABLE" => TagMutability::Mutable,
            "IMMUTABLE" => TagMutability::Immutable,
            other => {
                return Err((
                    s.span(),
                    key("image_tag_mutability"),
                    format!("{other:?} is not \"MUTABLE\" or \"IMMUTABLE\""),
                ));
            }
        },
    };
    let kms_key = raw.kms_key.as_ref();
    let encryption = match raw.encryption.as_ref() {
        None => Encryption::Aes256,
        Some(s) => match s.get_ref().as_str() {
            "AES256" => Encryption::Aes256,
            "KMS" => Encryption::Kms(kms_key.map(|k| k.get_ref().clone())),
            other => {
                return Err((
                    s.span(),
                    key("encryption"),
                    format!("{other:?} is not \"AES256\" or \"KMS\""),
                ));
            }
        },
    };
    if let (Some(k), Encryption::Aes256) = (kms_key, &encryption) {
        return Err((
            k.span(),
            key("kms_key"),
            "needs encryption = \"KMS\"".into(),
        ));
    }
    if let Some(k) = kms_key
        && !k.get_ref().starts_with("arn:aws")
    {
        return Err((
            k.span(),
            key("kms_key"),
            format!("{:?} is not a KMS key ARN", k.get_ref()),
        ));
    }
    let lifecycle_policy = match (&raw.lifecycle_policy_file, &raw.untagged_expire_days) {
        (Some(f), Some(_)) => {
            return Err((
                f.span(),
                key("lifecycle_policy_file"),
                "set either lifecycle_policy_file or untagged_expire_days, not both".into(),
            ));
        }
        (Some(f), None) if f.get_ref().is_empty() => {
            return Err((
                f.span(),
                key("lifecycle_policy_file"),
                "must name a file".into(),
            ));
        }
        (Some(f), None) => LifecyclePolicy::File(PathBuf::from(f.get_ref())),
        (None, Some(d)) if *d.get_ref() == 0 => LifecyclePolicy::Off,
        (None, Some(d)) if *d.get_ref() > 36_500 => {
            return Err((
                d.span(),
                key("untagged_expire_days"),
                "must be at most 36500 (0 turns the lifecycle policy off)".into(),
            ));
        }
        (None, Some(d)) => LifecyclePolicy::Json(default_lifecycle_policy(*d.get_ref())),
        (None, None) => {
            LifecyclePolicy::Json(default_lifecycle_policy(DEFAULT_UNTAGGED_EXPIRE_DAYS))
        }
    };
    let mut resource_tags = BTreeMap::new();
    for (k, v) in raw.resource_tags.iter().flatten() {
        let name = k.get_ref();
        if name.is_empty() || name.len() > 128 || name.starts_with("aws:") {
            return Err((
                k.span(),
                key(&format!("resource_tags.{name:?}")),
                "tag keys are 1-128 characters and must not start with \"aws:\"".into(),
            ));
        }
        if v.get_ref().len() > 256 {
            return Err((
                v.span(),
                key(&format!("resource_tags.{name:?}")),
                "tag values are at most 256 characters".into(),
            ));
        }
        resource_tags.insert(name.clone(), v.get_ref().clone());
    }
    let custom_role_arn = match &raw.custom_role_arn {
        None => None,
        Some(r) if valid_role_arn(r.get_ref()) => Some(r.get_ref().clone()),
        Some(r) => {
            return Err((
                r.span(),
                key("custom_role_arn"),
                format!(
                    "{:?} is not an IAM role ARN (arn:aws:iam::ACCOUNT:role/NAME)",
                    r.get_ref()
                ),
            ));
        }
    };
    // ECR tags and KMS-encrypts new repositories only as a role of the account's own.
    if custom_role_arn.is_none() {
        let needs = match (&raw.resource_tags, &raw.encryption) {
            (Some(t), _) if !t.is_empty() => {
                Some(("resource_tags", t.keys().next().map(Spanned::span)))
            }
            (_, Some(e)) if matches!(encryption, Encryption::Kms(_)) => {
                Some(("encryption", Some(e.span())))
            }
            _ => None,
        };
        if let Some((k, span)) = needs {
            return Err((
                span.unwrap_or(0..0),
                key(k),
                "needs ecr_setup.template.custom_role_arn: ECR creates tagged or KMS-encrypted \
                 repositories only through a role you give it"
                    .into(),
            ));
        }
    }
    Ok(TemplateSettings {
        tag_mutability,
        encryption,
        lifecycle_policy,
        resource_tags,
        custom_role_arn,
    })
}

/// Reads a lifecycle policy file: JSON with a non-empty `rules` array, returned compact.
fn read_lifecycle_policy(path: &Path) -> Result<String, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("is not a readable file: {e}"))?;
    let v: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| format!("is not JSON: {e}"))?;
    if v["rules"].as_array().is_none_or(|r| r.is_empty()) {
        return Err("has no \"rules\" array: see ECR lifecycle policy syntax".into());
    }
    Ok(v.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use rstest::rstest;

    const HUB_SECRET: &str = "arn:aws:secretsmanager:eu-west-1:123456789012:secret:ecr-pullthroughcache/docker-hub-AbCdEf";

    fn load(extra: &str) -> Result<Config, String> {
        let text = format!(
            "[ecr]\nregion = \"eu-west-1\"\naccount = \"123456789012\"\n\
             [upstreams.\"docker.io\"]\nprefix = \"docker-hub\"\n\
             [upstreams.\"quay.io\"]\nprefix = \"quay\"\n{extra}"
        );
        Config::from_toml_str(&text, "p.toml").map_err(|e| e.to_string())
    }

    #[test]
    fn absent_section_is_empty_with_the_default_lifecycle_policy() {
        let c = load("").unwrap();
        assert!(c.ecr_setup.node_role_arns.is_empty());
        assert!(c.ecr_setup.credentials.is_empty());
        let policy: serde_json::Value = serde_json::from_str(
            &c.ecr_setup
                .template
                .lifecycle_policy
                .load()
                .unwrap()
                .unwrap(),
        )
        .unwrap();
        assert_eq!(policy["rules"][0]["selection"]["tagStatus"], "untagged");
        assert_eq!(policy["rules"][0]["selection"]["countNumber"], 7);
    }

    #[test]
    fn full_section_parses() {
        let c = load(&format!(
            "[ecr_setup]\nnode_role_arns = [\"arn:aws:iam::123456789012:role/nodes\"]\n\
             [ecr_setup.credentials]\n\"index.docker.io\" = \"{HUB_SECRET}\"\n\
             [ecr_setup.template]\nimage_tag_mutability = \"IMMUTABLE\"\nencryption = \"KMS\"\n\
             kms_key = \"arn:aws:kms:eu-west-1:123456789012:key/1\"\nuntagged_expire_days = 0\n\
             resource_tags = {{ team = \"platform\" }}\n\
             custom_role_arn = \"arn:aws:iam::123456789012:role/ecr-templates\"\n"
        ))
        .unwrap();
        let s = &c.ecr_setup;
        assert_eq!(s.node_role_arns, ["arn:aws:iam::123456789012:role/nodes"]);
        assert_eq!(
            s.credentials[&RegistryHost::parse("docker.io").unwrap()],
            HUB_SECRET
        );
        assert_eq!(s.template.tag_mutability, TagMutability::Immutable);
        assert_eq!(
            s.template.encryption.kms_key(),
            Some("arn:aws:kms:eu-west-1:123456789012:key/1")
        );
        assert_eq!(s.template.lifecycle_policy, LifecyclePolicy::Off);
        assert_eq!(s.template.resource_tags["team"], "platform");
        assert_eq!(
            s.template.custom_role_arn.as_deref(),
            Some("arn:aws:iam::123456789012:role/ecr-templates")
        );
    }

    #[rstest]
    #[case::secret_name_without_prefix(
        "[ecr_setup.credentials]\n\"docker.io\" = \"arn:aws:secretsmanager:eu-west-1:123456789012:secret:dockerhub-creds-AbCdEf\"\n",
        "p.toml:9: ecr_setup.credentials.\"docker.io\": \"arn:aws:secretsmanager:eu-west-1:123456789012:secret:dockerhub-creds-AbCdEf\" names the secret \"dockerhub-creds-AbCdEf\": ECR only uses secrets whose name starts with \"ecr-pullthroughcache/\""
    )]
    #[case::not_an_arn(
        "[ecr_setup.credentials]\n\"docker.io\" = \"ecr-pullthroughcache/docker-hub\"\n",
        "p.toml:9: ecr_setup.credentials.\"docker.io\": \"ecr-pullthroughcache/docker-hub\" is not a Secrets Manager secret ARN"
    )]
    #[case::wrong_service(
        "[ecr_setup.credentials]\n\"docker.io\" = \"arn:aws:ssm:eu-west-1:123456789012:secret:ecr-pullthroughcache/docker-hub\"\n",
        "is not a Secrets Manager secret ARN"
    )]
    #[case::secret_in_other_region(
        "[ecr_setup.credentials]\n\"docker.io\" = \"arn:aws:secretsmanager:us-east-1:123456789012:secret:ecr-pullthroughcache/docker-hub-AbCdEf\"\n",
        "the secret is in us-east-1, but ecr.region is eu-west-1"
    )]
    #[case::secret_in_other_account(
        "[ecr_setup.credentials]\n\"docker.io\" = \"arn:aws:secretsmanager:eu-west-1:210987654321:secret:ecr-pullthroughcache/docker-hub-AbCdEf\"\n",
        "the secret is in account 210987654321, but ecr.account is 123456789012"
    )]
    #[case::credential_for_unconfigured_upstream(
        "[ecr_setup.credentials]\n\"ghcr.io\" = \"x\"\n",
        "p.toml:9: ecr_setup.credentials.\"ghcr.io\": \"ghcr.io\" is not a configured upstream"
    )]
    #[case::credential_for_quay(
        "[ecr_setup.credentials]\n\"quay.io\" = \"x\"\n",
        "ecr_setup.credentials.\"quay.io\": Quay pull-through rules take no credential"
    )]
    #[case::bad_role(
        "[ecr_setup]\nnode_role_arns = [\"arn:aws:iam::123456789012:user/bob\"]\n",
        "p.toml:9: ecr_setup.node_role_arns: \"arn:aws:iam::123456789012:user/bob\" is not an IAM role ARN"
    )]
    #[case::unknown_key(
        "[ecr_setup]\nnode_roles = []\n",
        "p.toml:9: ecr_setup.node_roles: unknown field `node_roles`"
    )]
    #[case::bad_mutability(
        "[ecr_setup.template]\nimage_tag_mutability = \"mutable\"\n",
        "p.toml:9: ecr_setup.template.image_tag_mutability: \"mutable\" is not \"MUTABLE\" or \"IMMUTABLE\""
    )]
    #[case::bad_encryption(
        "[ecr_setup.template]\nencryption = \"SSE\"\n",
        "ecr_setup.template.encryption: \"SSE\" is not \"AES256\" or \"KMS\""
    )]
    #[case::kms_key_without_kms(
        "[ecr_setup.template]\nkms_key = \"arn:aws:kms:eu-west-1:123456789012:key/1\"\n",
        "ecr_setup.template.kms_key: needs encryption = \"KMS\""
    )]
    #[case::both_lifecycle_settings(
        "[ecr_setup.template]\nuntagged_expire_days = 3\nlifecycle_policy_file = \"x.json\"\n",
        "ecr_setup.template.lifecycle_policy_file: set either"
    )]
    #[case::empty_lifecycle_file(
        "[ecr_setup.template]\nlifecycle_policy_file = \"\"\n",
        "p.toml:9: ecr_setup.template.lifecycle_policy_file: must name a file"
    )]
    #[case::tags_without_role(
        "[ecr_setup.template]\nresource_tags = { team = \"a\" }\n",
        "p.toml:9: ecr_setup.template.resource_tags: needs ecr_setup.template.custom_role_arn"
    )]
    #[case::kms_without_role(
        "[ecr_setup.template]\nencryption = \"KMS\"\n",
        "p.toml:9: ecr_setup.template.encryption: needs ecr_setup.template.custom_role_arn"
    )]
    #[case::bad_custom_role(
        "[ecr_setup.template]\ncustom_role_arn = \"ecr-role\"\n",
        "p.toml:9: ecr_setup.template.custom_role_arn: \"ecr-role\" is not an IAM role ARN"
    )]
    #[case::aws_tag(
        "[ecr_setup.template]\nresource_tags = { \"aws:x\" = \"1\" }\n",
        "must not start with \"aws:\""
    )]
    fn invalid_settings_name_file_line_and_key(#[case] extra: &str, #[case] want: &str) {
        let err = load(extra).unwrap_err();
        assert!(
            err.contains(want),
            "error {err:?} does not contain {want:?}"
        );
    }

    #[rstest]
    #[case::docker_hub("docker.io", Some(("registry-1.docker.io", true)))]
    #[case::ghcr("ghcr.io", Some(("ghcr.io", true)))]
    #[case::gitlab("registry.gitlab.com", Some(("registry.gitlab.com", true)))]
    #[case::chainguard("cgr.dev", Some(("cgr.dev", true)))]
    #[case::azure("myreg.azurecr.io", Some(("myreg.azurecr.io", true)))]
    #[case::ecr_public("public.ecr.aws", Some(("public.ecr.aws", false)))]
    #[case::k8s("registry.k8s.io", Some(("registry.k8s.io", false)))]
    #[case::quay("quay.io", Some(("quay.io", false)))]
    #[case::gcr("gcr.io", None)]
    #[case::local("localhost:5000", None)]
    fn upstream_urls_and_credentials(#[case] registry: &str, #[case] want: Option<(&str, bool)>) {
        let got = upstream_for(&RegistryHost::parse(registry).unwrap());
        assert_eq!(
            got.as_ref().map(|(u, k)| (u.as_str(), k.needs_credential)),
            want
        );
    }

    #[test]
    fn lifecycle_policy_file_is_read_only_when_asked_and_compacted() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("lc.json");
        let extra = format!(
            "[ecr_setup.template]\nlifecycle_policy_file = \"{}\"\n",
            f.display()
        );
        // The file does not exist yet: loading the config (as `serve` does) still works.
        let c = load(&extra).unwrap();
        let e = c.ecr_setup.template.lifecycle_policy.load().unwrap_err();
        assert!(
            e.starts_with(&format!(
                "ecr_setup.template.lifecycle_policy_file: {} is not a readable file",
                f.display()
            )),
            "{e}"
        );
        std::fs::write(
            &f,
            "{\n  \"rules\": [ {\"rulePriority\": 1, \"selection\": {\"tagStatus\": \"any\", \"countType\": \"imageCountMoreThan\", \"countNumber\": 5}, \"action\": {\"type\": \"expire\"}} ]\n}\n",
        )
        .unwrap();
        let p = c
            .ecr_setup
            .template
            .lifecycle_policy
            .load()
            .unwrap()
            .unwrap();
        assert!(!p.contains('\n'));
        assert!(p.contains("imageCountMoreThan"));
        std::fs::write(&f, "{\"rules\": []}").unwrap();
        let e = c.ecr_setup.template.lifecycle_policy.load().unwrap_err();
        assert!(e.contains("has no \"rules\" array"), "{e}");
    }

    #[test]
    fn a_relative_lifecycle_policy_file_is_relative_to_the_config_file() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("lc.json"),
            "{\"rules\": [{\"rulePriority\": 1}]}",
        )
        .unwrap();
        let config = dir.path().join("p.toml");
        std::fs::write(
            &config,
            "[upstreams.\"quay.io\"]\nprefix = \"quay\"\n\
             [ecr_setup.template]\nlifecycle_policy_file = \"lc.json\"\n",
        )
        .unwrap();
        let c = Config::load(&config).unwrap();
        assert_eq!(
            c.ecr_setup.template.lifecycle_policy,
            LifecyclePolicy::File(dir.path().join("lc.json"))
        );
        assert!(
            c.ecr_setup
                .template
                .lifecycle_policy
                .load()
                .unwrap()
                .is_some()
        );
    }
}
