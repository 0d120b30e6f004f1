//! The registry policy statement that lets the nodes use the pull-through cache, merged into
//! whatever policy the registry already has. Pure, no IO.
//!
//! pullthrough owns exactly one statement, found by its `Sid` ([`STATEMENT_SID`]); every other
//! statement is someone else's and is kept byte for byte. ECR returns policies reformatted (and a
//! one-element list as a bare string), so statements are compared after [`normalize`], never as
//! text.

use serde_json::{Value, json};

/// The `Sid` of the statement pullthrough manages.
pub const STATEMENT_SID: &str = "PullthroughNodesPullThroughCache";
/// What the nodes need for a first pull through a rule.
pub const NODE_ACTIONS: [&str; 2] = ["ecr:BatchImportUpstreamImage", "ecr:CreateRepository"];

/// Why a policy cannot be merged.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    /// The existing policy is not JSON or not an object with a `Statement` list.
    #[error("the registry's current policy is not a policy document pullthrough can edit: {0}")]
    Unreadable(String),
}

/// The AWS partition of a region.
pub fn partition(region: &str) -> &'static str {
    if region.starts_with("cn-") {
        "aws-cn"
    } else if region.starts_with("us-gov-") {
        "aws-us-gov"
    } else {
        "aws"
    }
}

/// The repository ARN pattern for everything under `prefix`.
pub fn prefix_resource(region: &str, account: &str, prefix: &str) -> String {
    format!(
        "arn:{}:ecr:{region}:{account}:repository/{prefix}/*",
        partition(region)
    )
}

/// pullthrough's statement: the node roles may create repositories and import upstream images
/// under the given prefixes, and nowhere else.
pub fn node_statement(roles: &[String], resources: &[String]) -> Value {
    let mut roles = roles.to_vec();
    roles.sort();
    let mut resources = resources.to_vec();
    resources.sort();
    json!({
        "Sid": STATEMENT_SID,
        "Effect": "Allow",
        "Principal": { "AWS": roles },
        "Action": NODE_ACTIONS,
        "Resource": resources,
    })
}

/// A statement in a comparable shape: every string-or-list field becomes a sorted list.
pub fn normalize(v: &Value) -> Value {
    match v {
        Value::Object(m) => Value::Object(
            m.iter()
                .map(|(k, v)| {
                    let v = match v {
                        Value::String(_) if is_list_field(k) => Value::Array(vec![v.clone()]),
                        other => normalize(other),
                    };
                    (k.clone(), v)
                })
                .collect(),
        ),
        Value::Array(items) => {
            let mut items: Vec<Value> = items.iter().map(normalize).collect();
            if items.iter().all(Value::is_string) {
                items.sort_by(|a, b| a.as_str().cmp(&b.as_str()));
                items.dedup();
            }
            Value::Array(items)
        }
        other => other.clone(),
    }
}

fn is_list_field(k: &str) -> bool {
    matches!(
        k,
        "Action" | "NotAction" | "Resource" | "NotResource" | "AWS" | "Service" | "Federated"
    )
}

/// The outcome of merging pullthrough's statement into a policy.
#[derive(Debug, Clone, PartialEq)]
pub struct Merged {
    /// The whole policy to put (pretty JSON).
    pub policy: String,
    /// Whether it differs from the current one.
    pub changed: bool,
    /// Whether a statement with pullthrough's `Sid` was there before.
    pub replaced: bool,
}

/// Puts `ours` into `existing` (the registry's current policy text, if any): replaces the
/// statement with the same `Sid`, or appends it. Every other statement stays as it was.
pub fn merge(existing: Option<&str>, ours: &Value) -> Result<Merged, PolicyError> {
    let mut doc = match existing {
        None => json!({ "Version": "2012-10-17", "Statement": [] }),
        Some(text) => serde_json::from_str::<Value>(text)
            .map_err(|e| PolicyError::Unreadable(e.to_string()))?,
    };
    let obj = doc
        .as_object_mut()
        .ok_or_else(|| PolicyError::Unreadable("not a JSON object".into()))?;
    let statements = obj.entry("Statement").or_insert_with(|| json!([]));
    // A lone statement may be written as an object rather than a list.
    if statements.is_object() {
        *statements = Value::Array(vec![statements.clone()]);
    }
    let list = statements
        .as_array_mut()
        .ok_or_else(|| PolicyError::Unreadable("`Statement` is not a list".into()))?;
    let mut replaced = false;
    let mut changed = true;
    if let Some(slot) = list
        .iter_mut()
        .find(|s| s.get("Sid").and_then(Value::as_str) == Some(STATEMENT_SID))
    {
        replaced = true;
        changed = normalize(slot) != normalize(ours);
        *slot = ours.clone();
    } else {
        list.push(ours.clone());
    }
    let policy =
        serde_json::to_string_pretty(&doc).map_err(|e| PolicyError::Unreadable(e.to_string()))?;
    Ok(Merged {
        policy,
        changed,
        replaced,
    })
}

/// What a policy fails to grant one node role: the actions missing on each prefix resource.
/// Empty means covered. Only `Allow` statements are read; any `Deny` for the role counts as not
/// covered, since evaluating conditions is beyond a health check.
pub fn missing_grants(policy: Option<&str>, role: &str, resources: &[String]) -> Vec<String> {
    let all_missing = || {
        resources
            .iter()
            .flat_map(|r| NODE_ACTIONS.iter().map(move |a| format!("{a} on {r}")))
            .collect::<Vec<_>>()
    };
    let Some(doc) = policy.and_then(|p| serde_json::from_str::<Value>(p).ok()) else {
        return all_missing();
    };
    let statements: Vec<Value> = match &doc["Statement"] {
        Value::Array(a) => a.iter().map(normalize).collect(),
        Value::Object(_) => vec![normalize(&doc["Statement"])],
        _ => return all_missing(),
    };
    let account_root = role.split(':').nth(4).map(|acct| {
        format!(
            "arn:{}:iam::{acct}:root",
            role.split(':').nth(1).unwrap_or("aws")
        )
    });
    let names_role = |s: &Value| match &s["Principal"] {
        Value::String(p) => p == "*",
        p => p["AWS"].as_array().is_some_and(|list| {
            list.iter().filter_map(Value::as_str).any(|p| {
                p == "*"
                    || p == role
                    || Some(p) == account_root.as_deref()
                    || p.len() == 12 && role.contains(&format!(":{p}:"))
            })
        }),
    };
    let strs = |v: &Value| -> Vec<String> {
        v.as_array()
            .map(|a| {
                a.iter()
                    .filter_map(Value::as_str)
                    .map(str::to_owned)
                    .collect()
            })
            .unwrap_or_default()
    };
    if statements
        .iter()
        .any(|s| s["Effect"] == "Deny" && names_role(s) && s.get("Condition").is_none())
    {
        return all_missing();
    }
    let mut missing = Vec::new();
    for resource in resources {
        for action in NODE_ACTIONS {
            let granted = statements.iter().any(|s| {
                s["Effect"] == "Allow"
                    && s.get("Condition").is_none()
                    && names_role(s)
                    && strs(&s["Action"])
                        .iter()
                        .any(|a| glob(&a.to_ascii_lowercase(), &action.to_ascii_lowercase()))
                    && strs(&s["Resource"]).iter().any(|r| covers(r, resource))
            });
            if !granted {
                missing.push(format!("{action} on {resource}"));
            }
        }
    }
    missing
}

/// Whether the policy resource pattern `pattern` grants everything the pattern `wanted` does.
/// `*` in `wanted` is matched as a literal, so `repository/hub/*` covers `repository/hub/*`
/// and `repository/*` covers it too, but `repository/hub/a*` does not.
fn covers(pattern: &str, wanted: &str) -> bool {
    glob(pattern, wanted)
}

/// IAM-style glob: `*` any run, `?` one character.
pub fn glob(pattern: &str, text: &str) -> bool {
    let (p, t): (Vec<char>, Vec<char>) = (pattern.chars().collect(), text.chars().collect());
    let (mut pi, mut ti) = (0, 0);
    let (mut star, mut mark) = (None, 0);
    while ti < t.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == t[ti]) {
            pi += 1;
            ti += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some(pi);
            mark = ti;
            pi += 1;
        } else if let Some(s) = star {
            pi = s + 1;
            mark += 1;
            ti = mark;
        } else {
            return false;
        }
    }
    while pi < p.len() && p[pi] == '*' {
        pi += 1;
    }
    pi == p.len()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rstest::rstest;

    const ROLE: &str = "arn:aws:iam::123456789012:role/nodes";

    fn res(prefix: &str) -> String {
        prefix_resource("eu-west-1", "123456789012", prefix)
    }

    fn ours() -> Value {
        node_statement(&[ROLE.to_owned()], &[res("docker-hub"), res("quay")])
    }

    const OTHER: &str = r#"{"Version":"2012-10-17","Statement":[{"Sid":"Replication","Effect":"Allow","Principal":{"AWS":"arn:aws:iam::210987654321:root"},"Action":["ecr:CreateRepository","ecr:ReplicateImage"],"Resource":"arn:aws:ecr:eu-west-1:123456789012:repository/*"}]}"#;

    #[test]
    fn merging_into_no_policy_creates_one() {
        let m = merge(None, &ours()).unwrap();
        assert!(m.changed && !m.replaced);
        let doc: Value = serde_json::from_str(&m.policy).unwrap();
        assert_eq!(doc["Version"], "2012-10-17");
        assert_eq!(doc["Statement"].as_array().unwrap().len(), 1);
        assert_eq!(doc["Statement"][0]["Sid"], STATEMENT_SID);
    }

    #[test]
    fn merging_keeps_other_statements_exactly() {
        let m = merge(Some(OTHER), &ours()).unwrap();
        assert!(m.changed);
        let doc: Value = serde_json::from_str(&m.policy).unwrap();
        let before: Value = serde_json::from_str(OTHER).unwrap();
        assert_eq!(doc["Statement"][0], before["Statement"][0]);
        assert_eq!(doc["Statement"][1], ours());
    }

    #[test]
    fn our_statement_reformatted_by_ecr_is_unchanged() {
        let merged = merge(Some(OTHER), &ours()).unwrap().policy;
        // ECR hands a one-element list back as a bare string and may reorder lists.
        let mut doc: Value = serde_json::from_str(&merged).unwrap();
        doc["Statement"][1]["Principal"]["AWS"] = json!(ROLE);
        let r = doc["Statement"][1]["Resource"].as_array().unwrap().clone();
        doc["Statement"][1]["Resource"] = json!([r[1], r[0]]);
        let again = merge(Some(&doc.to_string()), &ours()).unwrap();
        assert!(!again.changed && again.replaced);
    }

    #[test]
    fn a_stale_statement_of_ours_is_replaced_not_duplicated() {
        let stale = node_statement(&[ROLE.to_owned()], &[res("docker-hub")]);
        let first = merge(Some(OTHER), &stale).unwrap().policy;
        let m = merge(Some(&first), &ours()).unwrap();
        assert!(m.changed && m.replaced);
        let doc: Value = serde_json::from_str(&m.policy).unwrap();
        assert_eq!(doc["Statement"].as_array().unwrap().len(), 2);
        assert_eq!(doc["Statement"][1], ours());
    }

    #[rstest]
    #[case::not_json("{")]
    #[case::statement_not_list(r#"{"Statement": 3}"#)]
    #[case::not_object("[]")]
    fn unreadable_policies_are_errors(#[case] text: &str) {
        assert!(matches!(
            merge(Some(text), &ours()),
            Err(PolicyError::Unreadable(_))
        ));
    }

    #[rstest]
    #[case::ours(Some(merge(None, &ours()).unwrap().policy), 0)]
    #[case::none(None, 4)]
    #[case::other_only(Some(OTHER.to_owned()), 4)]
    #[case::account_root_wildcards(Some(r#"{"Statement":{"Effect":"Allow","Principal":{"AWS":"arn:aws:iam::123456789012:root"},"Action":"ecr:*","Resource":"*"}}"#.to_owned()), 0)]
    #[case::one_action(Some(r#"{"Statement":[{"Effect":"Allow","Principal":{"AWS":"arn:aws:iam::123456789012:role/nodes"},"Action":"ecr:CreateRepository","Resource":"arn:aws:ecr:eu-west-1:123456789012:repository/*"}]}"#.to_owned()), 2)]
    #[case::one_prefix(Some(r#"{"Statement":[{"Effect":"Allow","Principal":{"AWS":["arn:aws:iam::123456789012:role/nodes"]},"Action":["ecr:CreateRepository","ecr:BatchImportUpstreamImage"],"Resource":"arn:aws:ecr:eu-west-1:123456789012:repository/quay/*"}]}"#.to_owned()), 2)]
    #[case::other_role(Some(r#"{"Statement":[{"Effect":"Allow","Principal":{"AWS":"arn:aws:iam::123456789012:role/ci"},"Action":"ecr:*","Resource":"*"}]}"#.to_owned()), 4)]
    #[case::denied(Some(r#"{"Statement":[{"Effect":"Allow","Principal":"*","Action":"ecr:*","Resource":"*"},{"Effect":"Deny","Principal":{"AWS":"arn:aws:iam::123456789012:role/nodes"},"Action":"ecr:*","Resource":"*"}]}"#.to_owned()), 4)]
    #[case::conditional_only(Some(r#"{"Statement":[{"Effect":"Allow","Principal":"*","Action":"ecr:*","Resource":"*","Condition":{"StringEquals":{"aws:PrincipalOrgID":"o-1"}}}]}"#.to_owned()), 4)]
    fn coverage(#[case] policy: Option<String>, #[case] missing: usize) {
        let got = missing_grants(policy.as_deref(), ROLE, &[res("docker-hub"), res("quay")]);
        assert_eq!(got.len(), missing, "{got:?}");
    }

    #[rstest]
    #[case::star("*", "anything", true)]
    #[case::prefix_star("arn:*:repository/*", "arn:x:repository/hub/*", true)]
    #[case::exact("ecr:createrepository", "ecr:createrepository", true)]
    #[case::narrower("arn:repository/hub/a*", "arn:repository/hub/*", false)]
    #[case::question("ecr:?et*", "ecr:getx", true)]
    #[case::empty_pattern("", "x", false)]
    fn globs(#[case] p: &str, #[case] t: &str, #[case] want: bool) {
        assert_eq!(glob(p, t), want);
    }

    #[rstest]
    #[case::commercial("eu-west-1", "aws")]
    #[case::china("cn-north-1", "aws-cn")]
    #[case::govcloud("us-gov-west-1", "aws-us-gov")]
    fn partitions(#[case] region: &str, #[case] want: &str) {
        assert_eq!(partition(region), want);
    }
}
