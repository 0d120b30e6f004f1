//! `ecr warm --from-pods`: the images a Kubernetes JSON document names. Pure, no IO.
//!
//! It reads what `kubectl get … -o json` prints: a `List` (or a typed list such as `PodList`) of
//! objects, or one object. Pods give their spec; Deployments, StatefulSets, DaemonSets,
//! ReplicaSets, ReplicationControllers, Jobs, CronJobs and PodTemplates give their pod template.
//! From each pod spec it takes the images of `containers`, `initContainers` (restartable
//! sidecars included), `ephemeralContainers` and image volumes (`volumes[].image.reference`):
//! everything the kubelet pulls. Objects of other kinds (a Service in `kubectl get all`) are
//! counted and left out, since they name no image.
//!
//! Each object is read with its k8s-openapi type, so a document that is not what it says (a
//! `containers` that is not a list, an `apiVersion` the kind does not have) is refused, naming
//! the item, rather than read halfway.

use std::collections::{BTreeMap, HashSet};

use k8s_openapi::api::apps::v1::{DaemonSet, Deployment, ReplicaSet, StatefulSet};
use k8s_openapi::api::batch::v1::{CronJob, Job};
use k8s_openapi::api::core::v1::{
    Pod, PodSpec, PodTemplate, PodTemplateSpec, ReplicationController,
};
use serde::de::DeserializeOwned;
use serde_json::Value;

/// What a document named.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Found {
    /// Every image, once per spelling, in the order first seen.
    pub images: Vec<String>,
    /// Objects read for a pod spec (a Deployment without a template still counts).
    pub objects: usize,
    /// Objects of kinds that hold no pod spec, by kind.
    pub ignored: BTreeMap<String, usize>,
}

/// Why a document could not be read. The caller adds the file name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PodsError {
    /// Not JSON at all.
    #[error("not JSON ({0}); give the output of `kubectl get pods -A -o json`")]
    NotJson(String),
    /// JSON, but not an object.
    #[error("not a Kubernetes object or list: the document is not a JSON object")]
    NotAnObject,
    /// An object without `kind`.
    #[error("{at}: no `kind`; give the output of `kubectl get pods -A -o json`")]
    NoKind {
        /// Which object.
        at: String,
    },
    /// A list whose `items` is not an array.
    #[error("{at}: `items` is not a list")]
    Items {
        /// Which list.
        at: String,
    },
    /// An object that does not read as its kind.
    #[error("{at}: not a valid {kind}: {message}")]
    Invalid {
        /// Which object.
        at: String,
        /// Its kind.
        kind: String,
        /// serde's complaint.
        message: String,
    },
}

/// Reads `text` and returns the images it names.
pub fn images_from_json(text: &str) -> Result<Found, PodsError> {
    let doc: Value = serde_json::from_str(text).map_err(|e| PodsError::NotJson(e.to_string()))?;
    if !doc.is_object() {
        return Err(PodsError::NotAnObject);
    }
    let mut found = Collector::default();
    let kind = doc.get("kind").and_then(Value::as_str).map(str::to_owned);
    match (kind.as_deref(), doc) {
        (Some(k), Value::Object(mut list))
            if k == "List" || (k.ends_with("List") && list.contains_key("items")) =>
        {
            // Taken out, not copied: a large cluster's pod list is tens of megabytes.
            let items = match list.remove("items") {
                None | Some(Value::Null) => Vec::new(),
                Some(Value::Array(items)) => items,
                Some(_) => {
                    return Err(PodsError::Items {
                        at: "the list".into(),
                    });
                }
            };
            // The API server's typed lists (`PodList`) leave `kind` out of their items.
            let item_kind = k.strip_suffix("List").filter(|s| !s.is_empty());
            for (i, item) in items.into_iter().enumerate() {
                found.object(item, item_kind, &format!("item {i}"))?;
            }
        }
        (_, doc) => found.object(doc, None, "the object")?,
    }
    Ok(found.done())
}

#[derive(Default)]
struct Collector {
    seen: HashSet<String>,
    found: Found,
}

impl Collector {
    fn done(self) -> Found {
        self.found
    }

    /// Reads one object; `default_kind` is the kind its list implies.
    fn object(
        &mut self,
        value: Value,
        default_kind: Option<&str>,
        at: &str,
    ) -> Result<(), PodsError> {
        let kind = value
            .get("kind")
            .and_then(Value::as_str)
            .or(default_kind)
            .map(str::to_owned)
            .ok_or_else(|| PodsError::NoKind { at: at.to_owned() })?;
        let at = describe(at, &kind, &value);
        let spec: Option<PodSpec> = match kind.as_str() {
            "Pod" => read::<Pod>(value, &kind, &at)?.spec,
            "Deployment" => read::<Deployment>(value, &kind, &at)?.spec.template.spec,
            "StatefulSet" => read::<StatefulSet>(value, &kind, &at)?.spec.template.spec,
            "DaemonSet" => read::<DaemonSet>(value, &kind, &at)?.spec.template.spec,
            "ReplicaSet" => template(read::<ReplicaSet>(value, &kind, &at)?.spec.template),
            "ReplicationController" => template(
                read::<ReplicationController>(value, &kind, &at)?
                    .spec
                    .and_then(|s| s.template),
            ),
            "Job" => read::<Job>(value, &kind, &at)?
                .spec
                .and_then(|s| s.template.spec),
            "CronJob" => read::<CronJob>(value, &kind, &at)?
                .spec
                .job_template
                .spec
                .and_then(|s| s.template.spec),
            "PodTemplate" => template(read::<PodTemplate>(value, &kind, &at)?.template),
            _ => {
                *self.found.ignored.entry(kind).or_default() += 1;
                return Ok(());
            }
        };
        self.found.objects += 1;
        if let Some(spec) = spec {
            for image in spec_images(&spec) {
                if self.seen.insert(image.clone()) {
                    self.found.images.push(image);
                }
            }
        }
        Ok(())
    }
}

fn read<T: DeserializeOwned>(value: Value, kind: &str, at: &str) -> Result<T, PodsError> {
    serde_json::from_value(value).map_err(|e| PodsError::Invalid {
        at: at.to_owned(),
        kind: kind.to_owned(),
        message: e.to_string(),
    })
}

fn template(t: Option<PodTemplateSpec>) -> Option<PodSpec> {
    t.and_then(|t| t.spec)
}

/// `item 3 (Deployment shop/web)`: where the object is, and what it says it is.
fn describe(at: &str, kind: &str, value: &Value) -> String {
    let name = value.pointer("/metadata/name").and_then(Value::as_str);
    let namespace = value.pointer("/metadata/namespace").and_then(Value::as_str);
    match (namespace, name) {
        (Some(ns), Some(n)) => format!("{at} ({kind} {ns}/{n})"),
        (None, Some(n)) => format!("{at} ({kind} {n})"),
        _ => format!("{at} ({kind})"),
    }
}

/// The images of a pod spec, in spec order: containers, init containers, ephemeral containers,
/// image volumes. Empty strings are left out (the API server refuses them anyway).
pub fn spec_images(spec: &PodSpec) -> Vec<String> {
    let containers = spec.containers.iter().map(|c| c.image.as_ref());
    let init = spec
        .init_containers
        .iter()
        .flatten()
        .map(|c| c.image.as_ref());
    let ephemeral = spec
        .ephemeral_containers
        .iter()
        .flatten()
        .map(|c| c.image.as_ref());
    let volumes = spec
        .volumes
        .iter()
        .flatten()
        .map(|v| v.image.as_ref().and_then(|i| i.reference.as_ref()));
    containers
        .chain(init)
        .chain(ephemeral)
        .chain(volumes)
        .flatten()
        .filter(|i| !i.trim().is_empty())
        .cloned()
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rstest::rstest;
    use serde_json::json;

    fn pod_spec() -> Value {
        json!({
            "containers": [{"name": "web", "image": "nginx:1.27"}, {"name": "log", "image": "busybox"}],
            "initContainers": [{"name": "init", "image": "alpine:3"}],
            "ephemeralContainers": [{"name": "debug", "image": "busybox:1.36"}],
            "volumes": [{"name": "model", "image": {"reference": "quay.io/org/model:1"}}, {"name": "tmp", "emptyDir": {}}]
        })
    }

    fn with_template(api_version: &str, kind: &str, spec: Value) -> Value {
        json!({"apiVersion": api_version, "kind": kind, "metadata": {"name": "x", "namespace": "shop"}, "spec": spec})
    }

    fn template_of(spec: Value) -> Value {
        json!({"template": {"metadata": {}, "spec": spec}, "selector": {}})
    }

    const ALL: &[&str] = &[
        "nginx:1.27",
        "busybox",
        "alpine:3",
        "busybox:1.36",
        "quay.io/org/model:1",
    ];

    #[rstest]
    #[case::pod(with_template("v1", "Pod", pod_spec()), ALL)]
    #[case::deployment(with_template("apps/v1", "Deployment", template_of(pod_spec())), ALL)]
    #[case::stateful_set(with_template("apps/v1", "StatefulSet", template_of(pod_spec())), ALL)]
    #[case::daemon_set(with_template("apps/v1", "DaemonSet", template_of(pod_spec())), ALL)]
    #[case::replica_set(with_template("apps/v1", "ReplicaSet", template_of(pod_spec())), ALL)]
    #[case::replication_controller(
        with_template("v1", "ReplicationController", template_of(pod_spec())),
        ALL
    )]
    #[case::job(with_template("batch/v1", "Job", template_of(pod_spec())), ALL)]
    #[case::cron_job(
        with_template("batch/v1", "CronJob", json!({"schedule": "@hourly", "jobTemplate": {"spec": template_of(pod_spec())}})),
        ALL
    )]
    #[case::pod_template(json!({"apiVersion": "v1", "kind": "PodTemplate", "template": {"spec": pod_spec()}}), ALL)]
    #[case::pod_without_spec(json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"}}), &[])]
    #[case::deployment_without_spec(json!({"apiVersion": "apps/v1", "kind": "Deployment"}), &[])]
    #[case::kubectl_list(
        json!({"apiVersion": "v1", "kind": "List", "items": [
            with_template("v1", "Pod", json!({"containers": [{"name": "a", "image": "nginx:1.27"}]})),
            with_template("v1", "Pod", json!({"containers": [{"name": "a", "image": "nginx:1.27"}, {"name": "b", "image": "redis:7"}]})),
            with_template("apps/v1", "Deployment", template_of(json!({"containers": [{"name": "c", "image": "alpine:3"}]}))),
        ]}),
        &["nginx:1.27", "redis:7", "alpine:3"]
    )]
    #[case::typed_list_items_without_kind(
        json!({"apiVersion": "v1", "kind": "PodList", "items": [
            {"metadata": {"name": "p"}, "spec": {"containers": [{"name": "a", "image": "nginx:1.27"}]}},
        ]}),
        &["nginx:1.27"]
    )]
    #[case::empty_list(json!({"apiVersion": "v1", "kind": "List", "items": []}), &[])]
    #[case::list_without_items(json!({"apiVersion": "v1", "kind": "List"}), &[])]
    #[case::container_without_image(with_template("v1", "Pod", json!({"containers": [{"name": "a"}, {"name": "b", "image": ""}]})), &[])]
    fn images(#[case] doc: Value, #[case] want: &[&str]) {
        let found = images_from_json(&doc.to_string()).unwrap();
        assert_eq!(found.images, want);
    }

    #[test]
    fn other_kinds_are_counted_and_left_out() {
        let doc = json!({"apiVersion": "v1", "kind": "List", "items": [
            {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "s"}},
            {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "t"}},
            {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c"}},
            with_template("v1", "Pod", json!({"containers": [{"name": "a", "image": "nginx"}]})),
        ]});
        let found = images_from_json(&doc.to_string()).unwrap();
        assert_eq!(found.images, ["nginx"]);
        assert_eq!(found.objects, 1);
        assert_eq!(
            found.ignored,
            BTreeMap::from([("ConfigMap".to_owned(), 1), ("Service".to_owned(), 2)])
        );
    }

    #[rstest]
    #[case::not_json("{\"kind\": ", "not JSON (EOF while parsing")]
    #[case::not_an_object("[1, 2]", "the document is not a JSON object")]
    #[case::object_without_kind("{\"items\": []}", "the object: no `kind`")]
    #[case::list_item_without_kind(
        r#"{"kind": "List", "items": [{"metadata": {"name": "p"}}]}"#,
        "item 0: no `kind`"
    )]
    #[case::items_not_a_list(r#"{"kind": "List", "items": {}}"#, "the list: `items` is not a list")]
    #[case::containers_not_a_list(
        r#"{"kind": "List", "items": [{"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "web-1", "namespace": "shop"}, "spec": {"containers": "nginx"}}]}"#,
        "item 0 (Pod shop/web-1): not a valid Pod: invalid type: string \"nginx\", expected a sequence"
    )]
    #[case::wrong_api_version(
        r#"{"apiVersion": "extensions/v1beta1", "kind": "Deployment", "metadata": {"name": "web"}}"#,
        "the object (Deployment web): not a valid Deployment: invalid value: string \"extensions/v1beta1\", expected apps/v1"
    )]
    fn refused(#[case] text: &str, #[case] want: &str) {
        let err = images_from_json(text).unwrap_err().to_string();
        assert!(err.contains(want), "{err:?} does not contain {want:?}");
    }
}
