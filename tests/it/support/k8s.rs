//! The real `kubectl` and `helm` that `scripts/deps` puts in `.cache/k8s-tools/bin` (pinned,
//! from a hash-checked wheel), and the checks every rendered Kubernetes object gets.
//!
//! Shared by the kustomize tests (`manifests.rs`) and the chart tests (`chart.rs`): both render
//! with the same binaries and hold their output to the same rules, so a difference between the
//! two is a difference in the manifests, never in the tools or the checks. Renders are cached for
//! the test process: the same directory or values file is rendered once however many tests read
//! it (the outputs are pure functions of files the tests do not change).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

use serde::Deserialize;
use serde_json::Value;

use super::repo_root;

/// `.cache/k8s-tools/bin/<tool>` (`kubectl` or `helm`). Never the one on `PATH`: a distribution's
/// kubectl may embed a kustomize too old for components, and the tests must not depend on what
/// a machine happens to have.
pub fn tool(name: &str) -> PathBuf {
    let path = repo_root().join(".cache/k8s-tools/bin").join(name);
    assert!(
        path.is_file(),
        "{} is missing: run scripts/deps (it runs scripts/deps-k8s-tools)",
        path.display()
    );
    path
}

/// Every non-empty YAML document of `text`, as JSON values.
pub fn yaml_docs(text: &str) -> Vec<Value> {
    serde_yaml_ng::Deserializer::from_str(text)
        .map(|d| Value::deserialize(d).unwrap())
        .filter(|v| !v.is_null())
        .collect()
}

/// Runs `tool args…` in the repository root; its stdout, or its stderr as the error.
pub fn run(tool_name: &str, args: &[&str], dir: &Path) -> Result<String, String> {
    let out = Command::new(tool(tool_name))
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| panic!("run {tool_name}: {e}"));
    if out.status.success() {
        Ok(String::from_utf8(out.stdout).unwrap())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

/// Runs `f` once per `key` for the test process and hands out clones of its value.
fn cached(
    cache: &'static Mutex<BTreeMap<String, Vec<Value>>>,
    key: String,
    f: impl FnOnce() -> Vec<Value>,
) -> Vec<Value> {
    if let Some(v) = cache.lock().unwrap_or_else(|e| e.into_inner()).get(&key) {
        return v.clone();
    }
    // Rendered outside the lock: two tests asking at once both render, and either result is
    // the same.
    let v = f();
    cache
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(key, v.clone());
    v
}

/// `kubectl kustomize DIR` (relative to the repository root), every object checked with
/// [`check_object`]. Cached.
pub fn kustomize(dir: &str) -> Vec<Value> {
    static CACHE: Mutex<BTreeMap<String, Vec<Value>>> = Mutex::new(BTreeMap::new());
    cached(&CACHE, dir.to_owned(), || kustomize_at(&repo_root(), dir))
}

/// `kubectl kustomize DIR` run in `root` (a copy of the repository's `deploy/`, say); uncached.
pub fn kustomize_at(root: &Path, dir: &str) -> Vec<Value> {
    let text = run("kubectl", &["kustomize", dir], root)
        .unwrap_or_else(|e| panic!("kubectl kustomize {dir}: {e}"));
    let docs = yaml_docs(&text);
    for (i, d) in docs.iter().enumerate() {
        check_object(d, &format!("kubectl kustomize {dir} (object {})", i + 1));
    }
    docs
}

/// The release name and namespace every chart render uses: the kustomize base's names.
pub const RELEASE: &str = "pullthrough";

/// `helm template pullthrough charts/pullthrough --namespace pullthrough ARGS…`: the rendered
/// objects (every one checked with [`check_object`]), or helm's stderr.
pub fn helm_template(args: &[&str]) -> Result<Vec<Value>, String> {
    let mut all = vec![
        "template",
        RELEASE,
        "charts/pullthrough",
        "--namespace",
        RELEASE,
    ];
    all.extend_from_slice(args);
    let text = run("helm", &all, &repo_root())?;
    let docs = yaml_docs(&text);
    for (i, d) in docs.iter().enumerate() {
        check_object(
            d,
            &format!("helm template {} (object {})", args.join(" "), i + 1),
        );
    }
    Ok(docs)
}

/// [`helm_template`] that panics with helm's stderr on failure. Cached by `args`.
pub fn helm(args: &[&str]) -> Vec<Value> {
    static CACHE: Mutex<BTreeMap<String, Vec<Value>>> = Mutex::new(BTreeMap::new());
    cached(&CACHE, args.join("\0"), || {
        helm_template(args).unwrap_or_else(|e| panic!("helm template {args:?}: {e}"))
    })
}

/// Parses `doc` as `T` and back: equal only if every field was known to `T`.
fn roundtrip<T: serde::de::DeserializeOwned + serde::Serialize>(doc: &Value, what: &str) {
    let typed: T = serde_json::from_value(doc.clone())
        .unwrap_or_else(|e| panic!("{what}: not a valid object: {e}"));
    let back = serde_json::to_value(&typed).unwrap();
    assert_eq!(&back, doc, "{what}: fields were lost in parsing (a typo?)");
}

/// Checks one Kubernetes object; returns its kind. Built-in kinds round-trip through their
/// k8s-openapi type; the custom resources the manifests use (Prometheus Operator, cert-manager)
/// get their fields checked against the CRDs' field lists, which k8s-openapi does not have.
pub fn check_object(doc: &Value, what: &str) -> String {
    use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
    use k8s_openapi::api::apps::v1::{DaemonSet, Deployment};
    use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Secret, Service, ServiceAccount};
    use k8s_openapi::api::policy::v1::PodDisruptionBudget;
    use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding};
    let kind = doc["kind"]
        .as_str()
        .unwrap_or_else(|| panic!("{what}: no kind"))
        .to_owned();
    assert!(doc["apiVersion"].is_string(), "{what}: no apiVersion");
    if kind == "Kustomization" || kind == "Component" {
        return kind;
    }
    assert!(
        doc["metadata"]["name"].is_string(),
        "{what}: no metadata.name"
    );
    let what = format!("{what} ({kind} {})", doc["metadata"]["name"]);
    match kind.as_str() {
        "DaemonSet" => roundtrip::<DaemonSet>(doc, &what),
        "Deployment" => roundtrip::<Deployment>(doc, &what),
        "Namespace" => roundtrip::<Namespace>(doc, &what),
        "ServiceAccount" => roundtrip::<ServiceAccount>(doc, &what),
        "ConfigMap" => roundtrip::<ConfigMap>(doc, &what),
        "Secret" => roundtrip::<Secret>(doc, &what),
        "Service" => roundtrip::<Service>(doc, &what),
        "PodDisruptionBudget" => roundtrip::<PodDisruptionBudget>(doc, &what),
        "MutatingWebhookConfiguration" => roundtrip::<MutatingWebhookConfiguration>(doc, &what),
        "Role" => roundtrip::<Role>(doc, &what),
        "RoleBinding" => roundtrip::<RoleBinding>(doc, &what),
        "ClusterRole" => roundtrip::<ClusterRole>(doc, &what),
        "ClusterRoleBinding" => roundtrip::<ClusterRoleBinding>(doc, &what),
        "CronJob" => roundtrip::<k8s_openapi::api::batch::v1::CronJob>(doc, &what),
        "PodMonitor" | "ServiceMonitor" | "PrometheusRule" | "Certificate" | "Issuer"
        | "ClusterIssuer" => check_custom(doc, &kind, &what),
        other => panic!("{what}: no check for kind {other}: add one here"),
    }
    kind
}

/// The fields of the custom resources the manifests use, from their CRDs (Prometheus Operator
/// `monitoring.coreos.com/v1`, cert-manager `cert-manager.io/v1`). Only the objects the
/// manifests write are listed; a field outside these lists is a typo the API server would prune
/// silently (CRDs drop unknown fields instead of refusing them).
mod crd {
    pub const OBJECT: &[&str] = &["apiVersion", "kind", "metadata", "spec"];
    pub const METADATA: &[&str] = &["name", "namespace", "labels", "annotations"];
    pub const LABEL_SELECTOR: &[&str] = &["matchLabels", "matchExpressions"];
    pub const MONITOR_SPEC: &[&str] = &[
        "jobLabel",
        "targetLabels",
        "podTargetLabels",
        "podMetricsEndpoints",
        "endpoints",
        "selector",
        "selectorMechanism",
        "namespaceSelector",
        "sampleLimit",
        "targetLimit",
        "scrapeProtocols",
        "fallbackScrapeProtocol",
        "labelLimit",
        "labelNameLengthLimit",
        "labelValueLengthLimit",
        "nativeHistogramBucketLimit",
        "nativeHistogramMinBucketFactor",
        "convertClassicHistogramsToNHCB",
        "scrapeClassicHistograms",
        "keepDroppedTargets",
        "attachMetadata",
        "scrapeClass",
        "bodySizeLimit",
        "serviceDiscoveryRole",
    ];
    pub const ENDPOINT: &[&str] = &[
        "port",
        "portNumber",
        "targetPort",
        "path",
        "scheme",
        "params",
        "interval",
        "scrapeTimeout",
        "honorLabels",
        "honorTimestamps",
        "trackTimestampsStaleness",
        "metricRelabelings",
        "relabelings",
        "proxyUrl",
        "followRedirects",
        "enableHttp2",
        "filterRunning",
        "authorization",
        "basicAuth",
        "oauth2",
        "tlsConfig",
        "bearerTokenFile",
        "bearerTokenSecret",
        "noProxy",
        "proxyFromEnvironment",
        "proxyConnectHeader",
    ];
    pub const RELABEL: &[&str] = &[
        "sourceLabels",
        "separator",
        "targetLabel",
        "regex",
        "modulus",
        "replacement",
        "action",
    ];
    pub const RULE_SPEC: &[&str] = &["groups"];
    pub const RULE_GROUP: &[&str] = &[
        "name",
        "labels",
        "interval",
        "rules",
        "partial_response_strategy",
        "limit",
        "query_offset",
    ];
    pub const RULE: &[&str] = &[
        "record",
        "alert",
        "expr",
        "for",
        "keep_firing_for",
        "labels",
        "annotations",
    ];
    pub const CERTIFICATE_SPEC: &[&str] = &[
        "subject",
        "literalSubject",
        "commonName",
        "duration",
        "renewBefore",
        "renewBeforePercentage",
        "dnsNames",
        "ipAddresses",
        "uris",
        "otherNames",
        "emailAddresses",
        "secretName",
        "secretTemplate",
        "keystores",
        "issuerRef",
        "isCA",
        "usages",
        "privateKey",
        "signatureAlgorithm",
        "encodeUsagesInRequest",
        "revisionHistoryLimit",
        "additionalOutputFormats",
        "nameConstraints",
    ];
    pub const PRIVATE_KEY: &[&str] = &["rotationPolicy", "encoding", "algorithm", "size"];
    pub const ISSUER_REF: &[&str] = &["name", "kind", "group"];
    pub const ISSUER_SPEC: &[&str] = &["acme", "ca", "vault", "selfSigned", "venafi"];
    pub const CA_ISSUER: &[&str] = &[
        "secretName",
        "crlDistributionPoints",
        "ocspServers",
        "issuingCertificateURL",
    ];
}

/// Every key of the object at `v` is in `allowed`; `v` must be an object.
fn closed(v: &Value, allowed: &[&str], what: &str) {
    let map = v
        .as_object()
        .unwrap_or_else(|| panic!("{what}: not an object: {v}"));
    for key in map.keys() {
        assert!(
            allowed.contains(&key.as_str()),
            "{what}: unknown field {key:?} (a typo? the CRD would drop it)"
        );
    }
}

/// The array at `v` (which must be one), each element checked by `each`.
fn each(v: &Value, what: &str, mut each: impl FnMut(&Value, &str)) {
    let items = v
        .as_array()
        .unwrap_or_else(|| panic!("{what}: not a list: {v}"));
    assert!(!items.is_empty(), "{what}: empty");
    for (i, item) in items.iter().enumerate() {
        each(item, &format!("{what}[{i}]"));
    }
}

fn string_at<'a>(v: &'a Value, key: &str, what: &str) -> &'a str {
    v[key]
        .as_str()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| panic!("{what}: no {key}"))
}

fn check_custom(doc: &Value, kind: &str, what: &str) {
    closed(doc, crd::OBJECT, what);
    closed(&doc["metadata"], crd::METADATA, &format!("{what}.metadata"));
    let spec = &doc["spec"];
    let at = |p: &str| format!("{what}.spec.{p}");
    match kind {
        "PodMonitor" | "ServiceMonitor" => {
            closed(spec, crd::MONITOR_SPEC, &at(""));
            closed(&spec["selector"], crd::LABEL_SELECTOR, &at("selector"));
            assert!(
                spec["selector"]["matchLabels"]
                    .as_object()
                    .is_some_and(|m| !m.is_empty()),
                "{}: selects nothing, or everything",
                at("selector")
            );
            let list = if kind == "PodMonitor" {
                "podMetricsEndpoints"
            } else {
                "endpoints"
            };
            each(&spec[list], &at(list), |e, what| {
                closed(e, crd::ENDPOINT, what);
                string_at(e, "port", what);
                if let Some(r) = e.get("relabelings") {
                    each(r, &format!("{what}.relabelings"), |r, what| {
                        closed(r, crd::RELABEL, what);
                    });
                }
            });
        }
        "PrometheusRule" => {
            closed(spec, crd::RULE_SPEC, &at(""));
            each(&spec["groups"], &at("groups"), |g, what| {
                closed(g, crd::RULE_GROUP, what);
                string_at(g, "name", what);
                each(&g["rules"], &format!("{what}.rules"), |r, what| {
                    closed(r, crd::RULE, what);
                    assert!(
                        r["alert"].is_string() != r["record"].is_string(),
                        "{what}: one of alert and record"
                    );
                    string_at(r, "expr", what);
                });
            });
        }
        "Certificate" => {
            closed(spec, crd::CERTIFICATE_SPEC, &at(""));
            string_at(spec, "secretName", &at(""));
            closed(&spec["issuerRef"], crd::ISSUER_REF, &at("issuerRef"));
            string_at(&spec["issuerRef"], "name", &at("issuerRef"));
            if let Some(k) = spec.get("privateKey") {
                closed(k, crd::PRIVATE_KEY, &at("privateKey"));
            }
            assert!(
                spec["dnsNames"].is_array() || spec["commonName"].is_string(),
                "{}: names nothing",
                at("")
            );
        }
        "Issuer" | "ClusterIssuer" => {
            closed(spec, crd::ISSUER_SPEC, &at(""));
            let map = spec.as_object().unwrap();
            assert_eq!(map.len(), 1, "{}: exactly one issuer type", at(""));
            if let Some(ca) = spec.get("ca") {
                closed(ca, crd::CA_ISSUER, &at("ca"));
                string_at(ca, "secretName", &at("ca"));
            }
        }
        _ => unreachable!("{kind}"),
    }
}
