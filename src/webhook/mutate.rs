//! The admission decision: an `AdmissionReview` body in, an `AdmissionReview` answer out, with
//! no IO (kube's `admission_controller` example: a thin handler around a pure function).
//!
//! The webhook must never be the reason a pod does not start. So every answer allows the
//! request; a review it cannot read as a pod gets `allowed: true` and a warning, and only a body
//! that is not an `AdmissionReview` at all (so there is no `uid` to answer) is refused, with 400.
//! The API server treats both like any webhook failure under `failurePolicy: Ignore`.
//!
//! What it patches, with JSON Patch on the object the API server sent:
//! - pod CREATE: `spec.containers[].image`, `spec.initContainers[].image` (restartable sidecars
//!   are init containers) and `spec.volumes[].image.reference` (image volumes);
//! - `pods/ephemeralcontainers` UPDATE: `spec.ephemeralContainers[].image` of the entries that
//!   are not in `oldObject`, and nothing else: the API server keeps only ephemeral-container
//!   changes from that subresource, so an annotation would be silently dropped. Such an update
//!   without `oldObject` is left alone with a warning: every entry would look new.
//!
//! In enforce mode a pod whose images change gets an annotation with the originals (JSON, keyed
//! `containers/<name>`, `initContainers/<name>`, `volumes/<name>`, `ephemeralContainers/<name>`),
//! merged with an existing one on reinvocation. In dry-run mode only [`DRY_RUN_ANNOTATION`] is
//! added, with the rewrites that enforce mode would make (warnings for ephemeral containers),
//! and not again when it already holds them, so reinvocation settles with an empty patch. In
//! warm mode nothing is patched and no warning is sent: the decision only lists the pod's
//! images, which the webhook then warms ([`super::warm`]).

use std::collections::{BTreeMap, BTreeSet};

use json_patch::jsonptr::PointerBuf;
use json_patch::{AddOperation, PatchOperation, ReplaceOperation};
use k8s_openapi::api::core::v1::Pod;
use kube_core::admission::{
    AdmissionRequest, AdmissionResponse, AdmissionReview, META_API_VERSION_V1, META_KIND, Operation,
};
use kube_core::{DynamicObject, TypeMeta};
use serde_json::Value;

use super::config::Mode;
use super::rewrite::{Reason, Rewrite, Rules, rewrite_str};

/// Pods (and namespaces, through the webhook's `namespaceSelector`) with this label set to
/// `"true"` are never changed.
pub const SKIP_LABEL: &str = "pullthrough.io/skip";
/// Set by the kubelet on the API copies of static pods.
pub const MIRROR_POD_ANNOTATION: &str = "kubernetes.io/config.mirror";
/// Dry-run mode's annotation: the rewrites enforce mode would make, as JSON.
pub const DRY_RUN_ANNOTATION: &str = "pullthrough.io/dry-run-rewrites";

/// Everything the decision depends on.
#[derive(Debug, Clone)]
pub struct Policy {
    /// ECR host, upstreams, digest policy and exclusions.
    pub rules: Rules,
    /// Enforce or dry-run.
    pub mode: Mode,
    /// Namespaces never changed (config, plus the webhook's own).
    pub skip_namespaces: BTreeSet<String>,
    /// Annotation key for the original images.
    pub annotation: String,
}

/// Where an image sits in the pod spec.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Field {
    /// `spec.containers`.
    Containers,
    /// `spec.initContainers`, sidecars included.
    InitContainers,
    /// `spec.ephemeralContainers`.
    EphemeralContainers,
    /// `spec.volumes[].image.reference`.
    Volumes,
}

impl Field {
    /// The pod spec field name.
    pub fn as_str(self) -> &'static str {
        match self {
            Field::Containers => "containers",
            Field::InitContainers => "initContainers",
            Field::EphemeralContainers => "ephemeralContainers",
            Field::Volumes => "volumes",
        }
    }
}

/// What happens to one image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Rewritten to this reference.
    Rewrite(String),
    /// Left as it is, for this reason.
    Unchanged(Reason),
    /// `imagePullPolicy: Never`: the image must already be on the node under its own name.
    PullPolicyNever,
}

impl Decision {
    /// `rewritten`, or the reason's label, for metrics.
    pub fn label(&self) -> &'static str {
        match self {
            Decision::Rewrite(_) => "rewritten",
            Decision::Unchanged(r) => r.label(),
            Decision::PullPolicyNever => "pull-policy-never",
        }
    }
}

/// One image of the pod and its decision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Image {
    /// Which list it is in.
    pub field: Field,
    /// Its index in that list (the JSON Patch path).
    pub index: usize,
    /// The container or volume name.
    pub name: String,
    /// The image as written.
    pub image: String,
    /// What happens to it.
    pub decision: Decision,
}

impl Image {
    fn key(&self) -> String {
        format!("{}/{}", self.field.as_str(), self.name)
    }
}

/// Why a whole request is left alone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Skip {
    /// Not a pod, or an operation/subresource this webhook does not handle.
    NotHandled,
    /// The namespace is in the skip list.
    Namespace,
    /// The pod has `pullthrough.io/skip: "true"`.
    Label,
    /// A mirror pod of a static pod: the kubelet runs the static manifest, not this copy.
    MirrorPod,
    /// The review carries no pod, or one that cannot be read.
    Unreadable,
}

impl Skip {
    /// A short label for metrics.
    pub fn label(&self) -> &'static str {
        match self {
            Skip::NotHandled => "not-handled",
            Skip::Namespace => "namespace",
            Skip::Label => "label",
            Skip::MirrorPod => "mirror-pod",
            Skip::Unreadable => "unreadable",
        }
    }
}

/// The outcome for one request.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Mutation {
    /// Set when the request was left alone as a whole.
    pub skipped: Option<Skip>,
    /// Every image looked at.
    pub images: Vec<Image>,
    /// The JSON Patch; empty means no change.
    pub patch: Vec<PatchOperation>,
    /// Warnings for the API client (`kubectl` prints them).
    pub warnings: Vec<String>,
    /// A server-side dry run: the pod will not be created, so nothing will pull its images.
    pub dry_run: bool,
}

/// The body is not an `AdmissionReview`: nothing to answer but HTTP 400.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not an AdmissionReview: {0}")]
pub struct NotAReview(pub String);

/// Reads an `AdmissionReview` body and decides. `Ok` always holds a well-formed
/// `AdmissionReview` answer (JSON) that allows the request, and what was decided.
pub fn admit(body: &[u8], policy: &Policy) -> Result<(Value, Mutation), NotAReview> {
    let value: Value =
        serde_json::from_slice(body).map_err(|e| NotAReview(format!("not JSON: {e}")))?;
    let kind = value.get("kind").and_then(Value::as_str);
    let api_version = value.get("apiVersion").and_then(Value::as_str);
    if kind != Some(META_KIND) || api_version.is_none_or(|v| !v.starts_with("admission.k8s.io/")) {
        return Err(NotAReview(
            "kind must be AdmissionReview and apiVersion admission.k8s.io/v1".into(),
        ));
    }
    let uid = value
        .pointer("/request/uid")
        .and_then(Value::as_str)
        .filter(|u| !u.is_empty())
        .ok_or_else(|| NotAReview("request.uid is missing".into()))?
        .to_owned();
    let types = TypeMeta {
        api_version: api_version.unwrap_or(META_API_VERSION_V1).to_owned(),
        kind: META_KIND.to_owned(),
    };

    let request: Result<AdmissionRequest<Pod>, String> =
        serde_json::from_value::<AdmissionReview<Pod>>(value)
            .map_err(|e| e.to_string())
            .and_then(|r| r.try_into().map_err(|e| format!("{e}")));
    let (response, mutation) = match request {
        Ok(req) => {
            let mut mutation = mutate(&req, policy);
            mutation.dry_run = req.dry_run;
            let mut resp = AdmissionResponse::from(&req);
            if !mutation.warnings.is_empty() {
                resp.warnings = Some(mutation.warnings.clone());
            }
            (resp, mutation)
        }
        Err(e) => {
            // Allowed, with the reason where `kubectl` shows it.
            let mut resp = AdmissionResponse::invalid(&e);
            resp.types = types;
            resp.uid = uid;
            resp.allowed = true;
            let mutation = Mutation {
                skipped: Some(Skip::Unreadable),
                warnings: vec![clip_warning(&format!(
                    "pullthrough webhook could not read this request, pod left unchanged: {e}"
                ))],
                ..Mutation::default()
            };
            resp.warnings = Some(mutation.warnings.clone());
            (resp, mutation)
        }
    };
    Ok((to_json(response.into_review(), &mutation), mutation))
}

/// The answer as JSON, with the patch base64-encoded as the API requires (`[]byte` in Go).
/// kube-core's `with_patch` would write it as an array of numbers (kube-rs/kube#1781).
fn to_json(review: AdmissionReview<DynamicObject>, mutation: &Mutation) -> Value {
    use base64::Engine;
    let uid = review
        .response
        .as_ref()
        .map(|r| r.uid.clone())
        .unwrap_or_default();
    let mut json = match serde_json::to_value(&review) {
        Ok(v) => v,
        // Only strings and maps in there; should it ever fail, still allow, unchanged.
        Err(_) => {
            return serde_json::json!({
                "apiVersion": review.types.api_version,
                "kind": META_KIND,
                "response": {"uid": uid, "allowed": true}
            });
        }
    };
    if !mutation.patch.is_empty()
        && let Ok(patch) = serde_json::to_vec(&mutation.patch)
        && let Some(resp) = json.get_mut("response").and_then(Value::as_object_mut)
    {
        let encoded = base64::engine::general_purpose::STANDARD.encode(patch);
        resp.insert("patch".into(), Value::String(encoded));
        resp.insert("patchType".into(), Value::String("JSONPatch".into()));
    }
    json
}

/// Decides the patch for a readable request.
pub fn mutate(req: &AdmissionRequest<Pod>, policy: &Policy) -> Mutation {
    let skip = |s: Skip| Mutation {
        skipped: Some(s),
        ..Mutation::default()
    };
    if !req.kind.group.is_empty() || req.kind.kind != "Pod" {
        return skip(Skip::NotHandled);
    }
    let ephemeral = match (&req.operation, req.sub_resource.as_deref()) {
        (Operation::Create, None) => false,
        (Operation::Update, Some("ephemeralcontainers")) => true,
        _ => return skip(Skip::NotHandled),
    };
    if req
        .namespace
        .as_ref()
        .is_some_and(|ns| policy.skip_namespaces.contains(ns))
    {
        return skip(Skip::Namespace);
    }
    let Some(pod) = &req.object else {
        return skip(Skip::Unreadable);
    };
    let meta = &pod.metadata;
    if meta
        .labels
        .as_ref()
        .and_then(|l| l.get(SKIP_LABEL))
        .is_some_and(|v| v == "true")
    {
        return skip(Skip::Label);
    }
    let annotations = meta.annotations.as_ref();
    if annotations.is_some_and(|a| a.contains_key(MIRROR_POD_ANNOTATION)) {
        return skip(Skip::MirrorPod);
    }

    let images = if ephemeral {
        // Without the old pod every ephemeral container would look new, and ones already
        // running would be "rewritten" (the API server refuses changes to those anyway).
        let Some(old) = req.old_object.as_ref() else {
            return Mutation {
                skipped: Some(Skip::Unreadable),
                warnings: vec![
                    "pullthrough webhook: ephemeral-containers update without oldObject, \
                     pod left unchanged"
                        .to_owned(),
                ],
                ..Mutation::default()
            };
        };
        new_ephemeral_images(pod, old, &policy.rules)
    } else {
        pod_images(pod, &policy.rules)
    };
    let mut mutation = Mutation {
        images,
        ..Mutation::default()
    };
    if policy.mode == Mode::Warm {
        // The pod is never changed, so "left unchanged" would tell its owner nothing.
        return mutation;
    }
    for img in &mutation.images {
        if let Decision::Unchanged(Reason::Invalid(e)) = &img.decision {
            mutation.warnings.push(clip_warning(&format!(
                "pullthrough: {} {:?}: image {:?} left unchanged: {e}",
                img.field.as_str(),
                img.name,
                img.image
            )));
        }
    }
    let rewrites: Vec<(&Image, &str)> = mutation
        .images
        .iter()
        .filter_map(|i| match &i.decision {
            Decision::Rewrite(to) => Some((i, to.as_str())),
            _ => None,
        })
        .collect();
    if rewrites.is_empty() {
        return mutation;
    }

    let mut patch = Vec::new();
    match (policy.mode, ephemeral) {
        (Mode::Enforce, _) => {
            for (img, to) in &rewrites {
                patch.push(replace(image_path(img), to));
            }
            if !ephemeral {
                let mut originals = existing_map(annotations, &policy.annotation);
                for (img, _) in &rewrites {
                    originals
                        .entry(img.key())
                        .or_insert_with(|| img.image.clone());
                }
                patch.push(annotate(pod, &policy.annotation, &originals));
            }
        }
        (Mode::DryRun, false) => {
            let would: BTreeMap<String, String> = rewrites
                .iter()
                .map(|(img, to)| (img.key(), (*to).to_owned()))
                .collect();
            // On reinvocation the images are still the originals, so the same map comes out:
            // an unchanged annotation means no patch (reinvocation must settle).
            if existing_map(annotations, DRY_RUN_ANNOTATION) != would {
                patch.push(annotate(pod, DRY_RUN_ANNOTATION, &would));
            }
        }
        // Returned above: warm mode decides no patch.
        (Mode::Warm, _) => {}
        (Mode::DryRun, true) => {
            for (img, to) in &rewrites {
                mutation.warnings.push(clip_warning(&format!(
                    "pullthrough dry-run: would rewrite {} {:?} to {to}",
                    img.field.as_str(),
                    img.name
                )));
            }
        }
    }
    mutation.patch = patch;
    mutation
}

fn decide(rules: &Rules, image: &str, pull_policy: Option<&str>) -> Decision {
    if pull_policy == Some("Never") {
        return Decision::PullPolicyNever;
    }
    match rewrite_str(image, rules) {
        Rewrite::Rewritten(to) => Decision::Rewrite(to),
        Rewrite::Unchanged(r) => Decision::Unchanged(r),
    }
}

fn pod_images(pod: &Pod, rules: &Rules) -> Vec<Image> {
    let mut out = Vec::new();
    let Some(spec) = &pod.spec else {
        return out;
    };
    let containers = [
        (Field::Containers, Some(&spec.containers)),
        (Field::InitContainers, spec.init_containers.as_ref()),
    ];
    for (field, list) in containers {
        for (index, c) in list.into_iter().flatten().enumerate() {
            if let Some(image) = &c.image {
                out.push(Image {
                    field,
                    index,
                    name: c.name.clone(),
                    image: image.clone(),
                    decision: decide(rules, image, c.image_pull_policy.as_deref()),
                });
            }
        }
    }
    for (index, v) in spec.volumes.iter().flatten().enumerate() {
        if let Some(src) = &v.image
            && let Some(image) = &src.reference
        {
            out.push(Image {
                field: Field::Volumes,
                index,
                name: v.name.clone(),
                image: image.clone(),
                decision: decide(rules, image, src.pull_policy.as_deref()),
            });
        }
    }
    out
}

/// Ephemeral containers in `pod` whose names are not in `old`.
fn new_ephemeral_images(pod: &Pod, old: &Pod, rules: &Rules) -> Vec<Image> {
    let existing: BTreeSet<&str> = old
        .spec
        .as_ref()
        .and_then(|s| s.ephemeral_containers.as_ref())
        .into_iter()
        .flatten()
        .map(|c| c.name.as_str())
        .collect();
    pod.spec
        .as_ref()
        .and_then(|s| s.ephemeral_containers.as_ref())
        .into_iter()
        .flatten()
        .enumerate()
        .filter(|(_, c)| !existing.contains(c.name.as_str()))
        .filter_map(|(index, c)| {
            let image = c.image.as_ref()?;
            Some(Image {
                field: Field::EphemeralContainers,
                index,
                name: c.name.clone(),
                image: image.clone(),
                decision: decide(rules, image, c.image_pull_policy.as_deref()),
            })
        })
        .collect()
}

fn image_path(img: &Image) -> PointerBuf {
    let index = img.index.to_string();
    match img.field {
        Field::Volumes => {
            PointerBuf::from_tokens(["spec", "volumes", &index, "image", "reference"])
        }
        f => PointerBuf::from_tokens(["spec", f.as_str(), &index, "image"]),
    }
}

fn replace(path: PointerBuf, value: &str) -> PatchOperation {
    PatchOperation::Replace(ReplaceOperation {
        path,
        value: Value::String(value.to_owned()),
    })
}

/// Sets annotation `key` to `map` as JSON, creating `metadata.annotations` if needed (JSON Patch
/// `add` on a missing parent fails, and on an existing key replaces it).
fn annotate(pod: &Pod, key: &str, map: &BTreeMap<String, String>) -> PatchOperation {
    let json = serde_json::to_string(map).unwrap_or_default();
    if pod.metadata.annotations.is_some() {
        PatchOperation::Add(AddOperation {
            path: PointerBuf::from_tokens(["metadata", "annotations", key]),
            value: Value::String(json),
        })
    } else {
        let mut obj = serde_json::Map::new();
        obj.insert(key.to_owned(), Value::String(json));
        PatchOperation::Add(AddOperation {
            path: PointerBuf::from_tokens(["metadata", "annotations"]),
            value: Value::Object(obj),
        })
    }
}

/// The originals recorded by an earlier invocation, so reinvocation adds to them. An
/// unreadable value is replaced.
fn existing_map(
    annotations: Option<&BTreeMap<String, String>>,
    key: &str,
) -> BTreeMap<String, String> {
    annotations
        .and_then(|a| a.get(key))
        .and_then(|v| serde_json::from_str(v).ok())
        .unwrap_or_default()
}

/// The API server truncates warnings over 256 characters; keep ours whole by keeping them short.
fn clip_warning(s: &str) -> String {
    const MAX: usize = 250;
    match s.char_indices().nth(MAX) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_owned(),
    }
}
