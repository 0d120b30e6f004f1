//! `pullthrough rewrite IMAGE...`: what the webhook would do with each image, for humans (text)
//! and scripts (JSON). Pure: the caller prints the strings.

use serde::Serialize;

use super::rewrite::{Rewrite, Rules, rewrite};
use crate::oci::reference::{Reference, ReferenceError};

/// One image, normalized and decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Explained {
    /// The image as given.
    pub input: String,
    /// The normalized reference, or why it is not one.
    pub normalized: Result<Reference, ReferenceError>,
    /// The decision.
    pub rewrite: Rewrite,
}

/// Normalizes and decides each image.
pub fn explain<S: AsRef<str>>(images: &[S], rules: &Rules) -> Vec<Explained> {
    images
        .iter()
        .map(|i| {
            let input = i.as_ref().to_owned();
            let normalized = Reference::parse(&input);
            let rewrite = match &normalized {
                Ok(r) => rewrite(r, rules),
                Err(e) => Rewrite::Unchanged(super::rewrite::Reason::Invalid(e.clone())),
            };
            Explained {
                input,
                normalized,
                rewrite,
            }
        })
        .collect()
}

/// Three lines per image: the input, then the normalized and the ECR reference, indented.
pub fn render_text(rows: &[Explained]) -> String {
    let mut out = String::new();
    for r in rows {
        let normalized = match &r.normalized {
            Ok(n) => n.to_string(),
            Err(e) => format!("invalid: {e}"),
        };
        let ecr = match &r.rewrite {
            Rewrite::Rewritten(to) => to.clone(),
            Rewrite::Unchanged(why) => format!("unchanged: {why}"),
        };
        out.push_str(&format!(
            "{}\n  normalized: {normalized}\n  ecr:        {ecr}\n",
            r.input
        ));
    }
    out
}

#[derive(Serialize)]
struct JsonRow<'a> {
    input: &'a str,
    /// `null` when the input is not a valid reference.
    normalized: Option<String>,
    /// `null` when unchanged.
    ecr: Option<&'a str>,
    /// `null` when rewritten; else a stable label (`not-configured`, `digest`, ...).
    reason: Option<&'a str>,
    /// The reason in words, or `null`.
    detail: Option<String>,
}

/// A JSON array, one object per image: `input`, `normalized`, `ecr`, `reason`, `detail`.
pub fn render_json(rows: &[Explained]) -> String {
    let rows: Vec<JsonRow<'_>> = rows
        .iter()
        .map(|r| {
            let (ecr, reason, detail) = match &r.rewrite {
                Rewrite::Rewritten(to) => (Some(to.as_str()), None, None),
                Rewrite::Unchanged(why) => (None, Some(why.label()), Some(why.to_string())),
            };
            JsonRow {
                input: &r.input,
                normalized: r.normalized.as_ref().ok().map(ToString::to_string),
                ecr,
                reason,
                detail,
            }
        })
        .collect();
    let mut s = serde_json::to_string_pretty(&rows).unwrap_or_else(|_| "[]".to_owned());
    s.push('\n');
    s
}
