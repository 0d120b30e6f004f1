//! `pullthrough ecr`: set up, check, warm and clean up the account's ECR pull-through cache,
//! driven by the same config file as the mirror.
//!
//! Every command that changes something computes a plan first and changes nothing without
//! `--apply`. The AWS calls sit behind a thin boundary ([`aws`]) so that what to do is decided
//! by pure functions with table tests:
//!
//! - [`settings`]: the `[ecr_setup]` config section (credentials, node roles, template);
//! - [`setup`]: desired state from config + observed state → a [`setup::Plan`] (pure), and its
//!   diff-like rendering;
//! - [`policy`]: merging pullthrough's registry-policy statement, and checking coverage (pure);
//! - [`aws`]: reading the observed state, applying a plan, mapping SDK errors to clear messages;
//! - [`check`]: the health report; [`warm`]: manifest GETs by tag through ECR (the webhook
//!   warms with it too); [`pods`]: the images a Kubernetes JSON document names, for
//!   `warm --from-pods`; [`cleanup`]: listing and deleting cached repositories under a prefix;
//! - [`cli`]: the clap subcommands and the runner `main.rs` calls.

pub mod aws;
pub mod check;
pub mod cleanup;
pub mod cli;
pub mod pods;
pub mod policy;
pub mod settings;
pub mod setup;
pub mod warm;
pub mod warm_report;

/// What went wrong in an `ecr` command.
#[derive(Debug, thiserror::Error)]
pub enum EcrOpsError {
    /// Bad usage or config the file-level checks could not catch (exit 64).
    #[error("{0}")]
    Usage(String),
    /// The caller lacks a permission.
    #[error(
        "{op}: access denied: the caller needs {permission} (docs/iam/ecr-admin-policy.json lists all): {message}"
    )]
    AccessDenied {
        /// The API operation.
        op: &'static str,
        /// The IAM action it needs.
        permission: String,
        /// ECR's message.
        message: String,
    },
    /// Throttled even after the SDK's own retries.
    #[error(
        "{op}: throttled by ECR even after retrying; wait a minute and run it again: {message}"
    )]
    Throttled {
        /// The API operation.
        op: &'static str,
        /// ECR's message.
        message: String,
    },
    /// ECR rejected the input.
    #[error("{op}: ECR rejected the request ({code}): {message}")]
    Rejected {
        /// The API operation.
        op: &'static str,
        /// ECR's error code.
        code: String,
        /// ECR's message, with a hint where one helps.
        message: String,
    },
    /// The plan has conflicts that setup will not resolve by itself.
    #[error("the plan has {0} conflict(s); nothing was changed")]
    Conflicts(usize),
    /// Anything else from the API (network, unexpected answers).
    #[error("{op}: {message}")]
    Api {
        /// The API operation.
        op: &'static str,
        /// What happened.
        message: String,
    },
    /// Stopped by a signal (Ctrl-C); the message says what was left undone.
    #[error("{0}")]
    Interrupted(String),
    /// Writing the report failed.
    #[error("writing output: {0}")]
    Output(#[from] std::io::Error),
}

impl EcrOpsError {
    /// Whether this is a usage error (exit 64) rather than a failure (exit 1).
    pub fn is_usage(&self) -> bool {
        matches!(self, EcrOpsError::Usage(_))
    }
}

#[cfg(test)]
mod tests {
    /// Every ECR operation the `ecr` commands call, read from the sources (each call goes
    /// through `api_error("Operation", …)`), must be in the admin IAM policy that docs/ecr-setup.md shows (docs/iam/ecr-admin-policy.json).
    #[test]
    fn the_documented_admin_policy_allows_every_call() {
        let sources = [
            include_str!("aws.rs"),
            include_str!("check.rs"),
            include_str!("cleanup.rs"),
        ];
        let mut ops: Vec<&str> = sources
            .iter()
            .flat_map(|s| s.split("api_error(\"").skip(1))
            .filter_map(|rest| rest.split('"').next())
            .filter(|op| op.chars().next().is_some_and(|c| c.is_ascii_uppercase()))
            .collect();
        // The token call is made by `sign::EcrTokenSource`.
        ops.push("GetAuthorizationToken");
        ops.sort();
        ops.dedup();
        // Registry GETs (warm, check --pull) need ecr:BatchGetImage, which the policy also grants.
        assert!(ops.len() >= 14, "found only {ops:?}");
        let policy: serde_json::Value =
            serde_json::from_str(include_str!("../../docs/iam/ecr-admin-policy.json")).unwrap();
        let allowed: Vec<String> = policy["Statement"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|s| match &s["Action"] {
                serde_json::Value::String(a) => vec![a.clone()],
                serde_json::Value::Array(a) => a
                    .iter()
                    .filter_map(|v| v.as_str().map(str::to_owned))
                    .collect(),
                _ => vec![],
            })
            .collect();
        for op in ops {
            assert!(
                allowed.contains(&format!("ecr:{op}")),
                "docs/iam/ecr-admin-policy.json does not allow ecr:{op}"
            );
        }
        // The first CreatePullThroughCacheRule makes ECR create its service-linked role as the
        // caller; the grant must be limited to ECR's service names.
        let slr = policy["Statement"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["Action"] == "iam:CreateServiceLinkedRole")
            .expect("no iam:CreateServiceLinkedRole statement");
        let names = &slr["Condition"]["StringEquals"]["iam:AWSServiceName"];
        assert!(
            names
                .as_array()
                .unwrap()
                .contains(&serde_json::json!("pullthroughcache.ecr.amazonaws.com")),
            "{slr}"
        );
    }
}
