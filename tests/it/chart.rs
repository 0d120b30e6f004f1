//! The Helm chart (`charts/pullthrough/`), rendered by the real, pinned helm (`scripts/deps`):
//! it lints with every example values file; every object it renders is a valid typed object and
//! has the safety properties of the kustomize manifests; a typo in values fails through the
//! schema; it does not drift from the kustomize manifests (and the comparison does fail when one
//! side changes alone); the config it renders is what the binary reads; the dashboard and the
//! alerts are one copy, complete, pass promtool's checks and unit tests, and use only metrics a
//! running mirror, node agent and webhook export; every value is documented.
//!
//! Renders are cached per process (`support::k8s`), so each values file is rendered once however
//! many tests look at it.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::apps::v1::{DaemonSet, Deployment};
use k8s_openapi::api::core::v1::{Container, PodSpec};
use pullthrough::config::Config;
use rstest::rstest;
use serde_json::Value;

use crate::manifests::{assert_locked_down, container, host_mounts, object, port_of};
use crate::support::k8s::{RELEASE, helm, helm_template, kustomize, kustomize_at, yaml_docs};
use crate::support::{repo_root, sha256_digest};

const CHART: &str = "charts/pullthrough";
/// `helm template`'s namespace (`support::k8s`): the kustomize manifests' namespace.
const NAMESPACE: &str = RELEASE;
const DEFAULTS: &str = "charts/pullthrough/ci/defaults-values.yaml";
const EVERY_VALUE: &str = "charts/pullthrough/ci/every-value-values.yaml";
const CERT_MANAGER: &str = "charts/pullthrough/ci/webhook-cert-manager-values.yaml";
const MONITORING: &str = "charts/pullthrough/ci/monitoring-values.yaml";

/// The example values files, `charts/pullthrough/ci/*.yaml` (where `helm lint` and
/// chart-testing look), relative to the repository root. A new file is tested by every test here.
fn ci_files() -> Vec<String> {
    let mut out: Vec<String> = std::fs::read_dir(repo_root().join(CHART).join("ci"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.ends_with(".yaml"))
        .map(|n| format!("{CHART}/ci/{n}"))
        .collect();
    out.sort();
    out
}

/// What the properties are checked on: the chart's own defaults (no values file, named
/// `values.yaml`) and each ci file, with their renders.
fn renders() -> Vec<(String, Vec<Value>)> {
    let mut out = vec![("values.yaml".to_owned(), helm(&[]))];
    for f in ci_files() {
        let docs = helm(&["-f", &f]);
        out.push((f, docs));
    }
    out
}

fn read(path: &str) -> String {
    std::fs::read_to_string(repo_root().join(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn yaml_file(path: &str) -> Value {
    yaml_docs(&read(path)).pop().unwrap_or(Value::Null)
}

/// The value at the dotted `path` of the values file `file` if it sets it, else the chart's
/// default (enough for the scalars and lists tested here: Helm replaces those whole).
fn value(file: &str, path: &str) -> Value {
    let pointer = format!("/{}", path.replace('.', "/"));
    let set = if file == "values.yaml" {
        None
    } else {
        yaml_file(file).pointer(&pointer).cloned()
    };
    set.or_else(|| {
        yaml_file(&format!("{CHART}/values.yaml"))
            .pointer(&pointer)
            .cloned()
    })
    .unwrap_or_else(|| panic!("no value {path}"))
}

fn on(file: &str, path: &str) -> bool {
    value(file, path).as_bool().unwrap()
}

fn of_kind<'a>(docs: &'a [Value], kind: &str) -> Vec<&'a Value> {
    docs.iter().filter(|d| d["kind"] == kind).collect()
}

fn typed<T: serde::de::DeserializeOwned>(doc: &Value) -> T {
    serde_json::from_value(doc.clone()).unwrap()
}

fn the_daemonset(docs: &[Value]) -> DaemonSet {
    let ds = of_kind(docs, "DaemonSet");
    assert_eq!(ds.len(), 1, "one DaemonSet");
    typed(ds[0])
}

fn pod_of(ds: &DaemonSet) -> PodSpec {
    ds.spec.template.spec.clone().unwrap()
}

/// The config a pod's `config` volume mounts: the ConfigMap's `key`, as text.
fn mounted_config(docs: &[Value], pod: &PodSpec, key: &str) -> String {
    let volumes = pod.volumes.clone().unwrap_or_default();
    let name = volumes
        .iter()
        .find(|v| v.name == "config")
        .and_then(|v| v.config_map.as_ref())
        .map(|c| c.name.clone())
        .expect("a config volume from a ConfigMap");
    object(docs, "ConfigMap", &name)["data"][key]
        .as_str()
        .unwrap_or_else(|| panic!("ConfigMap {name} has no {key}"))
        .to_owned()
}

fn parse_config(text: &str, what: &str) -> Config {
    Config::from_toml_str(text, what).unwrap_or_else(|e| panic!("{what}: {e}\n{text}"))
}

/// `matchLabels` all present in `labels`.
fn selects(match_labels: &Value, labels: &Value) -> bool {
    match_labels
        .as_object()
        .is_some_and(|m| !m.is_empty() && m.iter().all(|(k, v)| labels.get(k) == Some(v)))
}

// --- Lint, objects, safety ---------------------------------------------------------------------

#[test]
fn helm_lint_strict_passes_with_every_values_file() {
    let files = ci_files();
    for want in [
        "bottlerocket",
        "defaults",
        "every-value",
        "monitoring",
        "webhook-cert-manager",
    ] {
        let path = format!("{CHART}/ci/{want}-values.yaml");
        assert!(files.contains(&path), "{path} is missing: {files:?}");
    }
    for f in &files {
        // --strict: a lint warning fails too.
        let out = crate::support::k8s::run(
            "helm",
            &["lint", "--strict", CHART, "--namespace", NAMESPACE, "-f", f],
            &repo_root(),
        )
        .unwrap_or_else(|e| panic!("helm lint --strict -f {f}: {e}"));
        assert!(
            out.contains("1 chart(s) linted, 0 chart(s) failed"),
            "{f}: {out}"
        );
    }
}

/// Each values file renders exactly the objects its values turn on, each a valid typed object
/// (checked by `support::k8s` on every render), in the release namespace, with the release's and
/// the `commonLabels` labels; the monitors select the pods and name ports they have.
#[test]
fn every_values_file_renders_the_objects_it_turns_on() {
    for (file, docs) in renders() {
        let count = |kind: &str| of_kind(&docs, kind).len();
        let webhook = on(&file, "webhook.enabled");
        let cert_manager = webhook && on(&file, "webhook.certManager.enabled");
        let own_issuer = cert_manager
            && value(&file, "webhook.certManager.issuerRef")
                .as_object()
                .is_none_or(|m| m.is_empty());
        let monitors = 1 + usize::from(webhook);
        let want = [
            ("DaemonSet", 1),
            ("ServiceAccount", 1 + usize::from(webhook)),
            ("Deployment", usize::from(webhook)),
            ("MutatingWebhookConfiguration", usize::from(webhook)),
            (
                "PodDisruptionBudget",
                usize::from(webhook && on(&file, "webhook.podDisruptionBudget.enabled")),
            ),
            (
                "Certificate",
                usize::from(cert_manager) + usize::from(own_issuer),
            ),
            ("Issuer", 2 * usize::from(own_issuer)),
            (
                "PodMonitor",
                monitors * usize::from(on(&file, "monitoring.podMonitor.enabled")),
            ),
            (
                "ServiceMonitor",
                monitors * usize::from(on(&file, "monitoring.serviceMonitor.enabled")),
            ),
            (
                "PrometheusRule",
                usize::from(on(&file, "monitoring.prometheusRule.enabled")),
            ),
            (
                "ConfigMap",
                1 + usize::from(webhook) + usize::from(on(&file, "monitoring.dashboard.enabled")),
            ),
            (
                "Service",
                usize::from(webhook) + usize::from(on(&file, "monitoring.serviceMonitor.enabled")),
            ),
            // pullthrough never calls the Kubernetes API: no RBAC at all.
            ("Role", 0),
            ("RoleBinding", 0),
            ("ClusterRole", 0),
            ("ClusterRoleBinding", 0),
        ];
        for (kind, n) in want {
            assert_eq!(count(kind), n, "{file}: {kind}");
        }
        let listed: usize = want.iter().map(|(_, n)| n).sum();
        assert_eq!(docs.len(), listed, "{file}: objects of other kinds");

        let common = value(&file, "commonLabels");
        let dashboard_ns = value(&file, "monitoring.dashboard.namespace");
        for d in &docs {
            let what = format!("{file}: {} {}", d["kind"], d["metadata"]["name"]);
            let labels = &d["metadata"]["labels"];
            assert_eq!(labels["app.kubernetes.io/instance"], RELEASE, "{what}");
            assert_eq!(labels["app.kubernetes.io/managed-by"], "Helm", "{what}");
            for (k, v) in common.as_object().unwrap() {
                assert_eq!(&labels[k], v, "{what}: commonLabels.{k}");
            }
            let ns = &d["metadata"]["namespace"];
            if d["kind"] == "MutatingWebhookConfiguration" {
                assert!(ns.is_null(), "{what}: cluster-scoped");
            } else if d["metadata"]["name"]
                .as_str()
                .unwrap()
                .ends_with("-dashboard")
                && dashboard_ns != ""
            {
                assert_eq!(ns, &dashboard_ns, "{what}");
            } else {
                assert_eq!(ns, NAMESPACE, "{what}");
            }
        }

        // The monitors select the pods (or the Service) and scrape ports those have.
        let ports_of = |template: &Value| -> BTreeSet<String> {
            template["spec"]["containers"]
                .as_array()
                .unwrap()
                .iter()
                .flat_map(|c| c["ports"].as_array().cloned().unwrap_or_default())
                .map(|p| p["name"].as_str().unwrap().to_owned())
                .collect()
        };
        let workloads: Vec<&Value> = docs
            .iter()
            .filter(|d| d["kind"] == "DaemonSet" || d["kind"] == "Deployment")
            .collect();
        for pm in of_kind(&docs, "PodMonitor") {
            let selector = &pm["spec"]["selector"]["matchLabels"];
            let targets: Vec<&&Value> = workloads
                .iter()
                .filter(|w| selects(selector, &w["spec"]["template"]["metadata"]["labels"]))
                .collect();
            assert_eq!(
                targets.len(),
                1,
                "{file}: {} selects one workload",
                pm["metadata"]["name"]
            );
            let ports = ports_of(&targets[0]["spec"]["template"]);
            for e in pm["spec"]["podMetricsEndpoints"].as_array().unwrap() {
                let port = e["port"].as_str().unwrap();
                assert!(
                    ports.contains(port),
                    "{file}: no pod port {port}: {ports:?}"
                );
            }
        }
        for sm in of_kind(&docs, "ServiceMonitor") {
            let selector = &sm["spec"]["selector"]["matchLabels"];
            let services: Vec<&Value> = of_kind(&docs, "Service")
                .into_iter()
                .filter(|s| selects(selector, &s["metadata"]["labels"]))
                .collect();
            assert_eq!(
                services.len(),
                1,
                "{file}: {} selects one Service",
                sm["metadata"]["name"]
            );
            let svc = services[0];
            let pods: Vec<&&Value> = workloads
                .iter()
                .filter(|w| {
                    selects(
                        &svc["spec"]["selector"],
                        &w["spec"]["template"]["metadata"]["labels"],
                    )
                })
                .collect();
            assert_eq!(
                pods.len(),
                1,
                "{file}: {} selects one workload",
                svc["metadata"]["name"]
            );
            let pod_ports = ports_of(&pods[0]["spec"]["template"]);
            let svc_ports: BTreeMap<&str, &str> = svc["spec"]["ports"]
                .as_array()
                .unwrap()
                .iter()
                .map(|p| {
                    (
                        p["name"].as_str().unwrap(),
                        p["targetPort"].as_str().unwrap(),
                    )
                })
                .collect();
            for e in sm["spec"]["endpoints"].as_array().unwrap() {
                let port = e["port"].as_str().unwrap();
                let target = svc_ports
                    .get(port)
                    .unwrap_or_else(|| panic!("{file}: the Service has no port {port}"));
                assert!(pod_ports.contains(*target), "{file}: no pod port {target}");
            }
        }
    }
}

/// The properties the kustomize manifests have (manifests.rs), for the defaults and every
/// example values file: what makes pullthrough safe to run on every node.
#[test]
fn the_safety_properties_hold_for_every_values_file() {
    for (file, docs) in renders() {
        let ds = the_daemonset(&docs);
        let pod = pod_of(&ds);
        // The mirror on the node's loopback, where containerd finds it.
        assert_eq!(pod.host_network, Some(true), "{file}");
        assert_eq!(pod.automount_service_account_token, Some(false), "{file}");
        let text = mounted_config(&docs, &pod, "config.toml");
        let config = parse_config(&text, &format!("{file}: config.toml"));
        assert!(
            config.listen.ip().is_loopback(),
            "{file}: listen {}",
            config.listen
        );
        // In-flight pulls get timeouts.shutdown after SIGTERM, within the kubelet's grace.
        let grace = pod.termination_grace_period_seconds.unwrap();
        let shutdown = config.timeouts.shutdown.as_secs();
        assert!(
            u64::try_from(grace).unwrap() > shutdown,
            "{file}: terminationGracePeriodSeconds {grace}, shutdown {shutdown}s"
        );

        let mirror = container(&pod, "mirror");
        assert_eq!(
            port_of(mirror, "mirror"),
            i32::from(config.listen.port()),
            "{file}"
        );
        assert_eq!(
            port_of(mirror, "ops"),
            i32::from(config.ops_listen.port()),
            "{file}"
        );
        let sc = mirror.security_context.as_ref().unwrap();
        assert_eq!(sc.run_as_non_root, Some(true), "{file}");
        assert_eq!(sc.run_as_user, Some(65532), "{file}");
        assert!(
            host_mounts(&pod, mirror).is_empty(),
            "{file}: the mirror mounts nothing of the host"
        );
        for c in &pod.containers {
            assert_locked_down(c);
        }

        assert_eq!(
            pod.priority_class_name,
            value(&file, "priorityClassName")
                .as_str()
                .map(str::to_owned),
            "{file}"
        );
        assert_eq!(
            serde_json::to_value(pod.tolerations.clone().unwrap_or_default()).unwrap(),
            value(&file, "tolerations"),
            "{file}"
        );

        if on(&file, "bottlerocket.enabled") {
            let names: Vec<&str> = pod.containers.iter().map(|c| c.name.as_str()).collect();
            assert_eq!(names, ["mirror"], "{file}");
            let volumes = pod.volumes.clone().unwrap_or_default();
            assert!(
                volumes.iter().all(|v| v.host_path.is_none()),
                "{file}: a hostPath"
            );
        } else {
            let hosts = container(&pod, "hosts");
            let mut mounts = host_mounts(&pod, hosts);
            mounts.sort();
            assert_eq!(
                mounts,
                [
                    (
                        "/etc/containerd".into(),
                        "/host/etc/containerd".into(),
                        true
                    ),
                    (
                        "/etc/containerd/certs.d".into(),
                        "/host/etc/containerd/certs.d".into(),
                        false
                    ),
                    ("/etc/eks".into(), "/host/etc/eks".into(), true),
                ],
                "{file}: only certs.d is writable"
            );
        }

        if on(&file, "webhook.enabled") {
            check_webhook(&file, &docs);
        }
    }
    // By default: scheduled first, on every node whatever its taints.
    let pod = pod_of(&the_daemonset(&helm(&[])));
    assert_eq!(
        pod.priority_class_name.as_deref(),
        Some("system-node-critical")
    );
    let tolerations = pod.tolerations.unwrap();
    assert!(
        tolerations
            .iter()
            .any(|t| t.operator.as_deref() == Some("Exists")
                && t.key.is_none()
                && t.effect.is_none()),
        "{tolerations:?}"
    );
}

/// The webhook never blocks a pod, never its own namespace, runs locked down, and (with
/// cert-manager) gets the CA of the certificate it serves.
fn check_webhook(file: &str, docs: &[Value]) {
    let deployments = of_kind(docs, "Deployment");
    let deployment: Deployment = typed(deployments[0]);
    let pod = deployment.spec.template.spec.unwrap();
    let webhook: &Container = container(&pod, "webhook");
    assert_locked_down(webhook);
    let pod_sc = pod.security_context.as_ref().unwrap();
    assert_eq!(pod_sc.run_as_non_root, Some(true), "{file}");
    assert_eq!(pod.automount_service_account_token, Some(false), "{file}");

    let text = mounted_config(docs, &pod, "pullthrough.toml");
    let config = parse_config(&text, &format!("{file}: webhook pullthrough.toml"));
    assert_eq!(
        port_of_plain(webhook, "https"),
        i32::from(config.webhook.listen.port())
    );
    assert_eq!(
        port_of_plain(webhook, "ops"),
        i32::from(config.webhook.ops_listen.port())
    );
    // On SIGTERM: 5 s of answering with /readyz at 503, then up to timeouts.shutdown of
    // draining, all before the kill.
    let grace = pod.termination_grace_period_seconds.unwrap();
    let shutdown = config.timeouts.shutdown.as_secs();
    assert!(
        u64::try_from(grace).unwrap() > 5 + shutdown,
        "{file}: grace {grace}, shutdown {shutdown}"
    );

    let mwcs = of_kind(docs, "MutatingWebhookConfiguration");
    let mwc: MutatingWebhookConfiguration = typed(mwcs[0]);
    let hooks = mwc.webhooks.unwrap();
    assert_eq!(hooks.len(), 1);
    let hook = &hooks[0];
    assert_eq!(hook.failure_policy.as_deref(), Some("Ignore"), "{file}");
    assert_eq!(
        hook.reinvocation_policy.as_deref(),
        Some("IfNeeded"),
        "{file}"
    );
    // Warming has a side effect (an ECR import), skipped for dry-run requests.
    assert_eq!(hook.side_effects, "NoneOnDryRun", "{file}");
    let svc = hook.client_config.service.as_ref().unwrap();
    assert_eq!(svc.namespace, NAMESPACE);
    let service = object(docs, "Service", &svc.name);
    let https = service["spec"]["ports"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["port"] == svc.port.unwrap_or(443))
        .expect("the Service port the API server calls");
    assert_eq!(https["targetPort"], "https", "{file}");
    let not_in: Vec<String> = hook
        .namespace_selector
        .as_ref()
        .and_then(|s| s.match_expressions.clone())
        .unwrap_or_default()
        .into_iter()
        .filter(|e| e.key == "kubernetes.io/metadata.name" && e.operator == "NotIn")
        .flat_map(|e| e.values.unwrap_or_default())
        .collect();
    assert!(
        not_in.iter().any(|n| n == NAMESPACE),
        "{file}: the release namespace is never sent to the webhook: {not_in:?}"
    );
    for skip in value(file, "webhook.settings.skip_namespaces")
        .as_array()
        .unwrap()
    {
        assert!(
            not_in.iter().any(|n| n == skip),
            "{file}: {skip} not excluded"
        );
    }

    let secret = pod
        .volumes
        .clone()
        .unwrap_or_default()
        .into_iter()
        .find_map(|v| v.secret?.secret_name)
        .expect("the TLS Secret volume");
    let inject = mwcs[0]["metadata"]["annotations"]["cert-manager.io/inject-ca-from"].as_str();
    if on(file, "webhook.certManager.enabled") {
        // cert-manager's injector copies the ca.crt of <namespace>/<Certificate>: the one that
        // writes the Secret the pods mount, for the names the API server dials.
        let serving = of_kind(docs, "Certificate")
            .into_iter()
            .find(|c| c["spec"]["secretName"] == secret.as_str())
            .unwrap_or_else(|| panic!("{file}: no Certificate writes Secret {secret}"));
        let name = serving["metadata"]["name"].as_str().unwrap();
        assert_eq!(
            inject,
            Some(format!("{NAMESPACE}/{name}").as_str()),
            "{file}"
        );
        let dns = format!("{}.{NAMESPACE}.svc", svc.name);
        assert!(
            serving["spec"]["dnsNames"]
                .as_array()
                .unwrap()
                .iter()
                .any(|n| n == dns.as_str()),
            "{file}: the serving certificate lacks {dns}"
        );
        let issuer = &serving["spec"]["issuerRef"];
        if issuer["kind"] == "Issuer" {
            object(docs, "Issuer", issuer["name"].as_str().unwrap());
        }
    } else {
        assert_eq!(inject, None, "{file}");
    }
}

/// A named container port (no hostPort: the webhook is not on the host network).
fn port_of_plain(c: &Container, name: &str) -> i32 {
    c.ports
        .clone()
        .unwrap_or_default()
        .iter()
        .find(|p| p.name.as_deref() == Some(name))
        .unwrap_or_else(|| panic!("{}: no port {name}", c.name))
        .container_port
}

#[test]
fn a_typo_in_values_fails_through_the_schema() {
    let err = helm_template(&["-f", "charts/pullthrough/ci-invalid/typo-values.yaml"])
        .expect_err("a misspelt value must fail helm template");
    assert!(err.contains("toleratons"), "{err}");
    assert!(err.contains("schema"), "{err}");
}

// --- Drift between the chart and the kustomize manifests ---------------------------------------
//
// The rules are charts/pullthrough/README.md's ("Maintainers"), numbered as there.

/// Rule 1: Helm's bookkeeping labels.
const HELM_LABELS: &[&str] = &[
    "helm.sh/chart",
    "app.kubernetes.io/instance",
    "app.kubernetes.io/version",
    "app.kubernetes.io/managed-by",
];
/// Rule 5: the kinds compared. The RBAC kinds are absent on both sides; one that appears on a
/// side is reported like any other object found on one side only.
const COMPARED: &[&str] = &[
    "ServiceAccount",
    "ConfigMap",
    "DaemonSet",
    "Deployment",
    "Service",
    "PodDisruptionBudget",
    "MutatingWebhookConfiguration",
    "Issuer",
    "Certificate",
    "PodMonitor",
    "PrometheusRule",
    "Role",
    "RoleBinding",
    "ClusterRole",
    "ClusterRoleBinding",
];

/// One side's compared objects by (kind, name), normalised.
type Objects = BTreeMap<(String, String), Value>;
/// Rule 7: what a pair's values file turns on beyond its overlay, removed from both sides.
type Exceptions = fn(&mut Objects, &mut Objects);

/// kustomize directory, chart values file, and the pair's exceptions (rule 7).
const PAIRS: &[(&str, &str, Exceptions)] = &[
    ("deploy/node", DEFAULTS, |_, _| {}),
    (
        "deploy/examples/bottlerocket",
        "charts/pullthrough/ci/bottlerocket-values.yaml",
        bottlerocket_exceptions,
    ),
    (
        "deploy/examples/monitoring",
        MONITORING,
        monitoring_exceptions,
    ),
    (
        "deploy/examples/webhook-cert-manager",
        CERT_MANAGER,
        webhook_exceptions,
    ),
];

/// The values file adds a nodeSelector and ServiceMonitors (with their Service), to render them.
fn bottlerocket_exceptions(_k: &mut Objects, h: &mut Objects) {
    if let Some(Value::Object(spec)) = h
        .get_mut(&key("DaemonSet", "pullthrough"))
        .and_then(|d| d.pointer_mut("/spec/template/spec"))
    {
        spec.remove("nodeSelector");
    }
    h.retain(|(kind, _), _| kind != "ServiceMonitor" && kind != "Service");
}

/// The values file turns the webhook on (for its monitors) and names the ECR account (which the
/// webhook needs): compared are the monitoring objects and the dashboard; the DaemonSet is
/// compared in the defaults pair. Its monitors carry a `release` label and the dashboard a folder
/// annotation that the overlay has not.
fn monitoring_exceptions(k: &mut Objects, h: &mut Objects) {
    h.retain(|(_, name), _| !name.starts_with("pullthrough-webhook"));
    h.remove(&key("ConfigMap", "pullthrough-config"));
    k.remove(&key("ConfigMap", "pullthrough-config"));
    for kind in ["PodMonitor", "PrometheusRule"] {
        if let Some(Value::Object(labels)) = h
            .get_mut(&key(kind, "pullthrough"))
            .and_then(|d| d.pointer_mut("/metadata/labels"))
        {
            labels.remove("release");
        }
    }
    if let Some(Value::Object(meta)) = h
        .get_mut(&key("ConfigMap", "pullthrough-dashboard"))
        .and_then(|d| d.get_mut("metadata"))
    {
        meta.remove("annotations");
    }
}

/// The chart's webhook config lists `settings.upstreams` (the mirror's), the kustomize one none
/// (the console's defaults); the values file names the account, so the mirror's objects are
/// compared in the defaults pair; and it adds an IRSA annotation.
fn webhook_exceptions(k: &mut Objects, h: &mut Objects) {
    for side in [&mut *k, &mut *h] {
        if let Some(Value::Object(toml)) = side
            .get_mut(&key("ConfigMap", "pullthrough-webhook-config"))
            .and_then(|d| d.pointer_mut("/data/pullthrough.toml"))
        {
            toml.remove("upstreams");
        }
        for (kind, name) in [
            ("ConfigMap", "pullthrough-config"),
            ("DaemonSet", "pullthrough"),
            ("ServiceAccount", "pullthrough"),
        ] {
            side.remove(&key(kind, name));
        }
    }
    if let Some(Value::Object(meta)) = h
        .get_mut(&key("ServiceAccount", "pullthrough-webhook"))
        .and_then(|d| d.get_mut("metadata"))
    {
        meta.remove("annotations");
    }
}

fn key(kind: &str, name: &str) -> (String, String) {
    (kind.to_owned(), name.to_owned())
}

/// Rule 1, everywhere in an object: metadata, pod templates, selectors.
fn strip_helm_labels(v: &mut Value) {
    match v {
        Value::Object(map) => {
            for k in ["labels", "matchLabels", "selector"] {
                let Some(Value::Object(labels)) = map.get_mut(k) else {
                    continue;
                };
                // A Service's selector is a label map; a workload's holds matchLabels.
                if k == "selector" && !labels.values().all(Value::is_string) {
                    continue;
                }
                for l in HELM_LABELS {
                    labels.remove(*l);
                }
                if labels.is_empty() {
                    map.remove(k);
                }
            }
            map.values_mut().for_each(strip_helm_labels);
        }
        Value::Array(items) => items.iter_mut().for_each(strip_helm_labels),
        _ => {}
    }
}

/// Rule 3: the name without kustomize's configMapGenerator hash suffix: `-` and 10 characters
/// of its hash alphabet (hex digits with 0, 1, 3, a, e mapped to g, h, k, m, t).
fn without_hash_suffix(name: &str) -> Option<&str> {
    let (base, suffix) = name.rsplit_once('-')?;
    (suffix.len() == 10 && suffix.chars().all(|c| "2456789bcdfghkmt".contains(c))).then_some(base)
}

fn normalise(docs: &[Value], kustomize: bool) -> Objects {
    let renamed: BTreeMap<String, String> = docs
        .iter()
        .filter(|d| kustomize && d["kind"] == "ConfigMap")
        .filter_map(|d| {
            let name = d["metadata"]["name"].as_str()?;
            Some((name.to_owned(), without_hash_suffix(name)?.to_owned()))
        })
        .collect();
    let mut out = Objects::new();
    for d in docs {
        let kind = d["kind"].as_str().unwrap();
        if !COMPARED.contains(&kind) {
            continue;
        }
        let mut d = d.clone();
        let name = d["metadata"]["name"].as_str().unwrap().to_owned();
        let name = renamed.get(&name).cloned().unwrap_or(name);
        d["metadata"]["name"] = Value::String(name.clone());
        strip_helm_labels(&mut d);
        // Rule 2: the checksum annotation, and an annotations map it leaves empty.
        if let Some(Value::Object(meta)) = d.pointer_mut("/spec/template/metadata")
            && let Some(Value::Object(annotations)) = meta.get_mut("annotations")
        {
            annotations.remove("checksum/config");
            if annotations.is_empty() {
                meta.remove("annotations");
            }
        }
        // Rule 3, where pods mount the ConfigMaps.
        if let Some(Value::Array(volumes)) = d.pointer_mut("/spec/template/spec/volumes") {
            for v in volumes {
                if let Some(Value::String(cm)) = v.pointer_mut("/configMap/name")
                    && let Some(plain) = renamed.get(cm.as_str())
                {
                    *cm = plain.clone();
                }
            }
        }
        // Rule 4: TOML and JSON data compared parsed.
        if let Some(Value::Object(data)) = d.get_mut("data") {
            for (file, text) in data.iter_mut() {
                let Value::String(s) = text else { continue };
                let what = format!("ConfigMap {name}: {file}");
                if file.ends_with(".toml") {
                    let table: toml::Table =
                        toml::from_str(s).unwrap_or_else(|e| panic!("{what}: {e}"));
                    *text = serde_json::to_value(table).unwrap();
                } else if file.ends_with(".json") {
                    *text = serde_json::from_str(s).unwrap_or_else(|e| panic!("{what}: {e}"));
                }
            }
        }
        out.insert((kind.to_owned(), name), d);
    }
    out
}

/// `.key`, or `["key"]` for a key that is not a plain word (`config.toml`, label names).
fn path_step(key: &str) -> String {
    if key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
        format!(".{key}")
    } else {
        format!("[{key:?}]")
    }
}

/// One line per field that differs: `path: kustomize X, chart Y`.
fn differences(path: &str, k: &Value, h: &Value, out: &mut Vec<String>) {
    match (k, h) {
        (Value::Object(a), Value::Object(b)) => {
            let keys: BTreeSet<&String> = a.keys().chain(b.keys()).collect();
            for key in keys {
                let p = format!("{path}{}", path_step(key));
                match (a.get(key), b.get(key)) {
                    (Some(x), Some(y)) => differences(&p, x, y, out),
                    (Some(x), None) => out.push(format!("{p}: kustomize {x}, chart none")),
                    (None, Some(y)) => out.push(format!("{p}: kustomize none, chart {y}")),
                    (None, None) => unreachable!(),
                }
            }
        }
        (Value::Array(a), Value::Array(b)) if a.len() == b.len() => {
            for (i, (x, y)) in a.iter().zip(b).enumerate() {
                differences(&format!("{path}[{i}]"), x, y, out);
            }
        }
        _ if k != h => out.push(format!("{path}: kustomize {k}, chart {h}")),
        _ => {}
    }
}

/// The drift between a kustomize render and a chart render under the README's rules: one line
/// per difference (empty: none), and how many objects were compared.
fn drift(
    kustomize_docs: &[Value],
    helm_docs: &[Value],
    exceptions: Exceptions,
) -> (Vec<String>, usize) {
    let mut k = normalise(kustomize_docs, true);
    let mut h = normalise(helm_docs, false);
    exceptions(&mut k, &mut h);
    let mut out = Vec::new();
    let keys: BTreeSet<(String, String)> = k.keys().chain(h.keys()).cloned().collect();
    for key @ (kind, name) in &keys {
        let what = format!("{kind}/{name}");
        match (k.get_mut(key), h.get_mut(key)) {
            (Some(kd), Some(hd)) => {
                // Rule 6: an object's own labels: the chart's include the kustomize ones.
                let take = |d: &mut Value| match d["metadata"].as_object_mut() {
                    Some(m) => m.remove("labels").unwrap_or(Value::Null),
                    None => Value::Null,
                };
                let (kl, hl) = (take(kd), take(hd));
                for (label, v) in kl.as_object().into_iter().flatten() {
                    if hl.get(label) != Some(v) {
                        out.push(format!("{what}: the chart's labels lack {label}: {v}"));
                    }
                }
                differences(&what, kd, hd, &mut out);
            }
            (Some(_), None) => out.push(format!("{what}: only in kustomize")),
            (None, Some(_)) => out.push(format!("{what}: only in the chart")),
            (None, None) => unreachable!(),
        }
    }
    (out, keys.len())
}

#[test]
fn the_chart_renders_what_kustomize_renders() {
    for (dir, values, exceptions) in PAIRS {
        let (diff, compared) = drift(&kustomize(dir), &helm(&["-f", values]), *exceptions);
        assert!(
            diff.is_empty(),
            "{dir} and {values} drifted apart (charts/pullthrough/README.md, \"Maintainers\", \
             has the rules):\n{}",
            diff.join("\n")
        );
        assert!(compared >= 3, "{dir}: {compared} objects compared");
    }
}

/// The comparison is not vacuous: a change to either side alone is reported, as exactly the
/// field that changed; a reworded comment is not.
#[test]
fn drift_is_reported_when_one_side_changes_alone() {
    let (dir, values, exceptions) = PAIRS[0];
    let base = kustomize(dir);

    // The chart alone: its update strategy, its config.
    let (diff, _) = drift(
        &base,
        &helm(&[
            "-f",
            values,
            "--set",
            "updateStrategy.rollingUpdate.maxUnavailable=20%",
        ]),
        exceptions,
    );
    assert_eq!(
        diff,
        [
            r#"DaemonSet/pullthrough.spec.updateStrategy.rollingUpdate.maxUnavailable: kustomize "10%", chart "20%""#
        ]
    );
    let (diff, _) = drift(
        &base,
        &helm(&["-f", values, "--set", "settings.breaker.cooldown=6s"]),
        exceptions,
    );
    assert_eq!(
        diff,
        [
            r#"ConfigMap/pullthrough-config.data["config.toml"].breaker.cooldown: kustomize "5s", chart "6s""#
        ]
    );

    // kustomize alone, in a copy of deploy/.
    let tmp = tempfile::tempdir().unwrap();
    copy_dir(&repo_root().join("deploy"), &tmp.path().join("deploy"));
    let node = tmp.path().join("deploy/node");
    // A comment: the generated ConfigMap's name (its hash) changes, the compared TOML does not.
    edit(
        &node.join("config.toml"),
        "# The mirror containerd talks to.",
        "# Where containerd finds the mirror.",
    );
    let reworded = kustomize_at(tmp.path(), dir);
    assert_ne!(
        object_names(&reworded, "ConfigMap"),
        object_names(&base, "ConfigMap"),
        "the comment is in the hashed data"
    );
    let (diff, _) = drift(&reworded, &helm(&["-f", values]), exceptions);
    assert!(diff.is_empty(), "{diff:?}");
    edit(
        &node.join("daemonset.yaml"),
        "maxUnavailable: 10%",
        "maxUnavailable: 20%",
    );
    let (diff, _) = drift(
        &kustomize_at(tmp.path(), dir),
        &helm(&["-f", values]),
        exceptions,
    );
    assert_eq!(
        diff,
        [
            r#"DaemonSet/pullthrough.spec.updateStrategy.rollingUpdate.maxUnavailable: kustomize "20%", chart "10%""#
        ]
    );
}

fn object_names(docs: &[Value], kind: &str) -> Vec<String> {
    of_kind(docs, kind)
        .iter()
        .map(|d| d["metadata"]["name"].as_str().unwrap().to_owned())
        .collect()
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let target = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &target);
        } else {
            std::fs::copy(e.path(), target).unwrap();
        }
    }
}

/// Replaces `from` (which must be there, so the edit is never a silent no-op) with `to`.
fn edit(file: &Path, from: &str, to: &str) {
    let text = std::fs::read_to_string(file).unwrap();
    assert!(text.contains(from), "{}: no {from:?}", file.display());
    std::fs::write(file, text.replacen(from, to, 1)).unwrap();
}

// --- The rendered config -----------------------------------------------------------------------

/// The pod template's `checksum/config`.
fn checksum(pod_template: &Value) -> String {
    pod_template["metadata"]["annotations"]["checksum/config"]
        .as_str()
        .expect("a checksum/config annotation")
        .to_owned()
}

#[test]
fn the_rendered_config_is_what_the_binary_reads_and_rolls_the_pods() {
    // Every TOML the chart renders is valid, and the pods' checksum is the hash of what they
    // mount: a change to the config (and only that) rolls them.
    for (file, docs) in renders() {
        for w in docs
            .iter()
            .filter(|d| d["kind"] == "DaemonSet" || d["kind"] == "Deployment")
        {
            let pod: PodSpec = typed(&w["spec"]["template"]["spec"]);
            let key = if w["kind"] == "DaemonSet" {
                "config.toml"
            } else {
                "pullthrough.toml"
            };
            let text = mounted_config(&docs, &pod, key);
            parse_config(&text, &format!("{file}: {key}"));
            let sum = checksum(&w["spec"]["template"]);
            assert_eq!(
                format!("sha256:{sum}"),
                sha256_digest(text.as_bytes()),
                "{file}: {}",
                w["kind"]
            );
        }
    }
    let cooldown =
        |docs: &[Value]| checksum(&object(docs, "DaemonSet", "pullthrough")["spec"]["template"]);
    assert_eq!(cooldown(&helm(&[])), cooldown(&helm(&["-f", DEFAULTS])));
    assert_ne!(
        cooldown(&helm(&[])),
        cooldown(&helm(&[
            "-f",
            DEFAULTS,
            "--set",
            "settings.breaker.cooldown=6s"
        ]))
    );

    // Every value reaches the config (the file sets each to something other than the default).
    let docs = helm(&["-f", EVERY_VALUE]);
    let ds = the_daemonset(&docs);
    let c = parse_config(
        &mounted_config(&docs, &pod_of(&ds), "config.toml"),
        "every-value",
    );
    assert_eq!(c.listen.to_string(), "127.0.0.1:6050");
    assert_eq!(c.ops_listen.to_string(), "0.0.0.0:6051");
    assert_eq!(
        c.default_upstream.as_ref().map(|r| r.as_str()),
        Some("docker.io")
    );
    assert_eq!(c.ecr.region.as_deref(), Some("eu-west-1"));
    assert_eq!(c.ecr.account.as_deref(), Some("123456789012"));
    assert_eq!(
        c.ecr.endpoint.as_ref().map(ToString::to_string).as_deref(),
        Some("https://123456789012.dkr.ecr-fips.eu-west-1.amazonaws.com/")
    );
    let upstreams: Vec<(&str, &str, &str)> = c
        .upstreams
        .iter()
        .map(|(r, u)| (r.as_str(), u.prefix.as_str(), u.server.as_str()))
        .collect();
    assert_eq!(
        upstreams,
        [
            ("docker.io", "docker-hub", "https://registry-1.docker.io"),
            (
                "registry.example.com:5000",
                "corp/mirror",
                "https://registry.example.com:5000"
            ),
        ]
    );
    assert_eq!(c.timeouts.connect, Duration::from_secs(2));
    assert_eq!(c.timeouts.response_headers, Duration::from_secs(10));
    assert_eq!(c.timeouts.shutdown, Duration::from_secs(15));
    assert_eq!(c.breaker.cooldown, Duration::from_millis(500));
    assert_eq!(c.manifest_cache.max_bytes, 33_554_432);
    assert_eq!(c.server.header_read_timeout, Duration::from_secs(20));
    assert_eq!(c.server.max_connections, 2048);
    let deployment: Deployment = typed(of_kind(&docs, "Deployment")[0]);
    let pod = deployment.spec.template.spec.unwrap();
    let w = parse_config(
        &mounted_config(&docs, &pod, "pullthrough.toml"),
        "every-value webhook",
    );
    assert_eq!(w.webhook.listen.to_string(), "0.0.0.0:9443");
    assert_eq!(w.webhook.ops_listen.to_string(), "0.0.0.0:9080");
    assert_eq!(w.webhook.mode, pullthrough::webhook::config::Mode::DryRun);
    assert_eq!(
        w.webhook.skip_namespaces.iter().collect::<Vec<_>>(),
        ["kube-node-lease", "kube-system"]
    );
    assert_eq!(w.webhook.exclude.len(), 2);
    assert_eq!(w.webhook.annotation, "example.com/original-images");
    assert_eq!(
        w.webhook.digest_refs,
        pullthrough::webhook::rewrite::DigestRefs::Rewrite
    );
    assert_eq!(w.timeouts.shutdown, Duration::from_secs(15));
    assert_eq!(w.server.max_connections, 2048);
    assert_eq!(
        w.upstreams.len(),
        2,
        "the webhook follows settings.upstreams"
    );
}

/// `config` (and `webhook.config`) arrive byte for byte: even text a YAML block scalar would
/// change (an indented first line, a whitespace-only line, trailing blank lines).
#[test]
fn a_raw_config_wins_byte_for_byte() {
    let dir = tempfile::tempdir().unwrap();
    let raw = "  # Raw, its first line indented.\nlisten = \"127.0.0.1:5050\"\n   \n\
               ops_listen = \"0.0.0.0:5051\"\n\n[upstreams.\"docker.io\"]\nprefix = \"hub\"\n\n\n";
    let raw_webhook = "[ecr]\naccount = \"123456789012\"\nregion = \"eu-west-1\"\n  \n\
                       [webhook]\nmode = \"dry-run\"";
    parse_config(raw, "raw");
    parse_config(raw_webhook, "raw webhook");
    let (path, webhook_path) = (dir.path().join("c.toml"), dir.path().join("w.toml"));
    std::fs::write(&path, raw).unwrap();
    std::fs::write(&webhook_path, raw_webhook).unwrap();
    let docs = helm_template(&[
        "--set-file",
        &format!("config={}", path.display()),
        "--set",
        "webhook.enabled=true",
        "--set-file",
        &format!("webhook.config={}", webhook_path.display()),
    ])
    .unwrap();
    let ds = object(&docs, "DaemonSet", "pullthrough");
    assert_eq!(
        mounted_config(&docs, &pod_of(&typed(ds)), "config.toml"),
        raw
    );
    let d: Deployment = typed(object(&docs, "Deployment", "pullthrough-webhook"));
    let pod = d.spec.template.spec.unwrap();
    assert_eq!(mounted_config(&docs, &pod, "pullthrough.toml"), raw_webhook);
    assert_eq!(
        format!("sha256:{}", checksum(&ds["spec"]["template"])),
        sha256_digest(raw.as_bytes())
    );
}

// --- Dashboard and alerts ----------------------------------------------------------------------

const DASHBOARD: &str = "charts/pullthrough/files/dashboard.json";
const RULES: &str = "charts/pullthrough/files/prometheusrule.yaml";

#[test]
fn the_monitoring_files_are_one_copy_rendered_verbatim() {
    for f in ["dashboard.json", "prometheusrule.yaml"] {
        assert_eq!(
            read(&format!("deploy/monitoring/{f}")),
            read(&format!("charts/pullthrough/files/{f}")),
            "deploy/monitoring/{f} must be a copy of charts/pullthrough/files/{f}: copy it over"
        );
    }
    let docs = helm(&["-f", MONITORING]);
    let rule = object(&docs, "PrometheusRule", "pullthrough");
    assert_eq!(rule["spec"], yaml_file(RULES)["spec"]);
    let cm = object(&docs, "ConfigMap", "pullthrough-dashboard");
    assert_eq!(cm["data"]["pullthrough.json"], read(DASHBOARD));
    assert_eq!(cm["metadata"]["labels"]["grafana_dashboard"], "1");
    // kustomize's copy, byte for byte too.
    let k = kustomize("deploy/monitoring");
    assert_eq!(
        object(&k, "ConfigMap", "pullthrough-dashboard")["data"]["pullthrough.json"],
        read(DASHBOARD)
    );
}

/// Every panel of the dashboard, rows' nested panels included.
fn panels(dashboard: &Value) -> Vec<&Value> {
    let mut out = Vec::new();
    for p in dashboard["panels"].as_array().unwrap() {
        out.push(p);
        out.extend(p["panels"].as_array().into_iter().flatten());
    }
    out
}

#[test]
fn the_dashboard_has_its_variables_and_uses_the_chosen_datasource() {
    let d: Value = serde_json::from_str(&read(DASHBOARD)).unwrap();
    assert!(d["schemaVersion"].as_u64().unwrap() >= 39, "Grafana 10.4+");
    let variables = d["templating"]["list"].as_array().unwrap();
    let variable = |name: &str| {
        variables
            .iter()
            .find(|v| v["name"] == name)
            .unwrap_or_else(|| panic!("no ${name} variable"))
    };
    assert_eq!(variable("datasource")["type"], "datasource");
    assert_eq!(variable("datasource")["query"], "prometheus");
    assert_eq!(variable("node")["type"], "query");
    let chosen = |v: &Value, what: &str| {
        assert_eq!(v["datasource"]["uid"], "${datasource}", "{what}");
        assert_eq!(v["datasource"]["type"], "prometheus", "{what}");
    };
    for v in variables.iter().filter(|v| v["type"] == "query") {
        chosen(v, &format!("variable {}", v["name"]));
    }
    let mut ids = BTreeSet::new();
    let mut queried = 0;
    for p in panels(&d) {
        let what = format!("panel {}", p["title"]);
        assert!(
            ids.insert(p["id"].as_u64().unwrap()),
            "{what}: id {} twice",
            p["id"]
        );
        if p["type"] == "row" {
            continue;
        }
        chosen(p, &what);
        let targets = p["targets"].as_array().unwrap();
        assert!(!targets.is_empty(), "{what}: no query");
        for t in targets {
            if t.get("datasource").is_some() {
                chosen(t, &what);
            }
            assert!(
                t["expr"].as_str().is_some_and(|e| !e.is_empty()),
                "{what}: no expr"
            );
            queried += 1;
        }
    }
    assert!(queried >= 20, "{queried} queries");
}

/// Every alert of the rule file (the one the chart and kustomize render).
fn alerts() -> Vec<Value> {
    yaml_file(RULES)["spec"]["groups"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|g| g["rules"].as_array().unwrap().clone())
        .collect()
}

/// GitHub's heading anchors (as scripts/check-links computes them): lowercase, punctuation other
/// than `-` and `_` dropped, spaces to `-`. Outside fenced code blocks.
fn heading_anchors(markdown: &str) -> BTreeSet<String> {
    let mut fenced = false;
    let mut out = BTreeSet::new();
    for line in markdown.lines() {
        if line.trim_start().starts_with("```") {
            fenced = !fenced;
        }
        if fenced {
            continue;
        }
        if let Some(text) = line
            .trim_start_matches('#')
            .strip_prefix(' ')
            .filter(|_| line.starts_with('#'))
        {
            out.insert(
                text.trim()
                    .to_lowercase()
                    .chars()
                    .filter(|c| c.is_alphanumeric() || *c == '-' || *c == '_' || *c == ' ')
                    .map(|c| if c == ' ' { '-' } else { c })
                    .collect(),
            );
        }
    }
    out
}

#[test]
fn every_alert_says_what_to_do_and_its_runbook_exists() {
    let anchors = heading_anchors(&read("docs/helm.md"));
    let promtool_tests = read("tests/fixtures/alerts/tests.yaml");
    let alerts = alerts();
    assert!(alerts.len() >= 10, "{} alerts", alerts.len());
    for a in &alerts {
        let name = a["alert"]
            .as_str()
            .expect("only alerts, no recording rules");
        assert!(
            ["info", "warning", "critical"]
                .contains(&a["labels"]["severity"].as_str().unwrap_or_default()),
            "{name}: severity"
        );
        for key in ["summary", "description", "runbook", "runbook_url"] {
            assert!(
                a["annotations"][key]
                    .as_str()
                    .is_some_and(|s| !s.trim().is_empty()),
                "{name}: no {key}"
            );
        }
        // scripts/check-links checks the Markdown's links; this one lives in YAML.
        let url = a["annotations"]["runbook_url"].as_str().unwrap();
        let anchor = url
            .strip_prefix("https://github.com/pullthrough/pullthrough/blob/main/docs/helm.md#")
            .unwrap_or_else(|| panic!("{name}: runbook_url {url} is not in docs/helm.md"));
        assert_eq!(anchor, name.to_lowercase(), "{name}: its own section");
        assert!(
            anchors.contains(anchor),
            "{name}: docs/helm.md has no heading #{anchor}"
        );
        assert!(
            promtool_tests.contains(&format!("alertname: {name}")),
            "{name}: no unit test in tests/fixtures/alerts/tests.yaml"
        );
    }
}

/// `.cache/promtool/bin/promtool`, which `scripts/deps` unpacks (scripts/deps-promtool).
fn promtool(args: &[&str], dir: &Path) -> (bool, String) {
    let bin = repo_root().join(".cache/promtool/bin/promtool");
    assert!(
        bin.is_file(),
        "{} is missing: run scripts/deps (it runs scripts/deps-promtool)",
        bin.display()
    );
    let out = Command::new(bin)
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// The rule file passes `promtool check rules` (expressions and annotation templates parse), and
/// the alerts pass their unit tests, `tests/fixtures/alerts/tests.yaml`: each fires on the series
/// it is about and stays quiet on healthy ones. A rule changed alone fails them.
#[test]
fn the_alerts_pass_promtool_check_and_their_unit_tests() {
    let dir = tempfile::tempdir().unwrap();
    let spec = yaml_file(RULES)["spec"].clone();
    // JSON is YAML: promtool reads either.
    std::fs::write(dir.path().join("full.yaml"), spec.to_string()).unwrap();
    let (ok, out) = promtool(&["check", "rules", "full.yaml"], dir.path());
    assert!(ok, "{out}");
    assert!(
        out.contains(&format!("SUCCESS: {} rules found", alerts().len())),
        "{out}"
    );

    // The unit tests compare annotations verbatim, and those are prose: rules.yaml is the spec
    // without them (tests.yaml's header says so).
    let bare = |spec: &Value| {
        let mut spec = spec.clone();
        for g in spec["groups"].as_array_mut().unwrap() {
            for r in g["rules"].as_array_mut().unwrap() {
                r.as_object_mut().unwrap().remove("annotations");
            }
        }
        spec.to_string()
    };
    std::fs::write(dir.path().join("rules.yaml"), bare(&spec)).unwrap();
    std::fs::copy(
        repo_root().join("tests/fixtures/alerts/tests.yaml"),
        dir.path().join("tests.yaml"),
    )
    .unwrap();
    let (ok, out) = promtool(&["test", "rules", "tests.yaml"], dir.path());
    assert!(
        ok,
        "promtool test rules tests/fixtures/alerts/tests.yaml:\n{out}"
    );

    // Not vacuous: the mirror-down alert waiting 20 minutes instead of 5 fails its test.
    let mut slow = spec.clone();
    let rule = slow["groups"][0]["rules"]
        .as_array_mut()
        .unwrap()
        .iter_mut()
        .find(|r| r["alert"] == "PullthroughMirrorDown")
        .unwrap();
    rule["for"] = "20m".into();
    std::fs::write(dir.path().join("rules.yaml"), bare(&slow)).unwrap();
    let (ok, out) = promtool(&["test", "rules", "tests.yaml"], dir.path());
    assert!(!ok && out.contains("PullthroughMirrorDown"), "{out}");
}

// --- Metric names ------------------------------------------------------------------------------

/// The metric names a PromQL expression selects: identifiers that are not functions,
/// aggregations, keywords or label names, and the names of `__name__` matchers.
fn promql_metric_names(expr: &str) -> BTreeSet<String> {
    const NOT_METRICS: &[&str] = &[
        "sum",
        "min",
        "max",
        "avg",
        "group",
        "stddev",
        "stdvar",
        "count",
        "count_values",
        "bottomk",
        "topk",
        "quantile",
        "limitk",
        "limit_ratio",
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
        "bool",
        "and",
        "or",
        "unless",
        "offset",
        "atan2",
        "inf",
        "nan",
    ];
    const GROUPING: &[&str] = &[
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
    ];
    let is_ident = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == ':';
    let chars: Vec<char> = expr.chars().collect();
    let mut names = BTreeSet::new();
    let mut label_list_next = false;
    let mut i = 0;
    // Skips a quoted string starting at `i`; returns its contents.
    let string_at = |i: &mut usize| -> String {
        let quote = chars[*i];
        let mut s = String::new();
        *i += 1;
        while *i < chars.len() && chars[*i] != quote {
            if chars[*i] == '\\' && quote != '`' {
                *i += 1;
            }
            s.push(chars[*i]);
            *i += 1;
        }
        *i += 1;
        s
    };
    while i < chars.len() {
        let c = chars[i];
        match c {
            '"' | '\'' | '`' => {
                string_at(&mut i);
            }
            '{' => {
                // Label matchers: only `__name__` ones name metrics.
                i += 1;
                let mut matcher = String::new();
                while i < chars.len() && chars[i] != '}' {
                    if matches!(chars[i], '"' | '\'' | '`') {
                        let value = string_at(&mut i);
                        let m = matcher.replace(' ', "");
                        if let Some(op) = m.strip_prefix("__name__") {
                            let alternatives: Vec<&str> = match op {
                                "=" => vec![value.as_str()],
                                "=~" => value.split('|').collect(),
                                _ => vec![],
                            };
                            for a in alternatives {
                                assert!(
                                    !a.is_empty() && a.chars().all(is_ident),
                                    "{expr}: a __name__ regex this test cannot resolve: {value}"
                                );
                                names.insert(a.to_owned());
                            }
                        }
                        matcher.clear();
                    } else {
                        if chars[i] == ',' {
                            matcher.clear();
                        } else {
                            matcher.push(chars[i]);
                        }
                        i += 1;
                    }
                }
                i += 1;
            }
            '[' => {
                // Range and subquery durations.
                while i < chars.len() && chars[i] != ']' {
                    i += 1;
                }
                i += 1;
            }
            '(' if label_list_next => {
                // by (…), on (…) and the like: label names.
                while i < chars.len() && chars[i] != ')' {
                    i += 1;
                }
                i += 1;
                label_list_next = false;
            }
            '$' => {
                // A Grafana variable.
                i += 1;
                while i < chars.len() && (is_ident(chars[i]) || chars[i] == '{' || chars[i] == '}')
                {
                    i += 1;
                }
            }
            c if c.is_ascii_digit()
                || (c == '.' && chars.get(i + 1).is_some_and(char::is_ascii_digit)) =>
            {
                // Numbers and durations (1e3, 0x1f, 5m).
                while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '.') {
                    i += 1;
                }
            }
            c if c.is_ascii_alphabetic() || c == '_' || c == ':' => {
                let start = i;
                while i < chars.len() && is_ident(chars[i]) {
                    i += 1;
                }
                let ident: String = chars[start..i].iter().collect();
                let next = chars[i..].iter().find(|c| !c.is_whitespace());
                if GROUPING.contains(&ident.as_str()) {
                    label_list_next = true;
                } else if next != Some(&'(') && !NOT_METRICS.contains(&ident.as_str()) {
                    names.insert(ident);
                }
            }
            _ => i += 1,
        }
    }
    names
}

/// A Grafana variable query: `label_values(SELECTOR, label)` or PromQL.
fn variable_metric_names(query: &str) -> BTreeSet<String> {
    match query
        .trim()
        .strip_prefix("label_values(")
        .and_then(|q| q.strip_suffix(')'))
    {
        Some(args) => promql_metric_names(args.rsplit_once(',').map_or(args, |(s, _)| s)),
        None => promql_metric_names(query),
    }
}

#[rstest]
#[case::aggregation_with_grouping(
    "sum by (namespace, pod) (increase(pullthrough_token_fetch_errors_total[10m])) > 0",
    &["pullthrough_token_fetch_errors_total"]
)]
#[case::vector_matching(
    r#"(kube_pod_container_status_ready{container="mirror"} == 0) and on (namespace, pod) (up{container="mirror"} == 1)"#,
    &["kube_pod_container_status_ready", "up"]
)]
#[case::histogram_and_grafana_variables(
    r#"histogram_quantile(0.5, sum by (le, kind) (rate(x_seconds_bucket{node=~"$node"}[$__rate_interval])))"#,
    &["x_seconds_bucket"]
)]
#[case::numbers_and_functions("(m_seconds - time()) < 14 * 86400 + 1e3", &["m_seconds"])]
#[case::strings_are_not_names(
    r#"label_replace(sum by (code) (rate(r_total[5m])), "cause", "other ($1)", "code", "(.*)")"#,
    &["r_total"]
)]
#[case::name_matchers(r#"{__name__=~"a_b|c_d", job="x"} or {__name__="e"}"#, &["a_b", "c_d", "e"])]
#[case::aggregation_after(r#"sum(rate(a_total[1m])) by (le) / ignoring (x) b"#, &["a_total", "b"])]
fn promql_names_are_found(#[case] expr: &str, #[case] want: &[&str]) {
    let got: Vec<String> = promql_metric_names(expr).into_iter().collect();
    assert_eq!(got, want);
}

#[test]
fn grafana_label_values_names_its_selector_only() {
    let got: Vec<String> =
        variable_metric_names(r#"label_values(a_left{namespace=~"$namespace"}, node)"#)
            .into_iter()
            .collect();
    assert_eq!(got, ["a_left"]);
}

/// Metric names the dashboard and the alerts use, with where.
fn used_metric_names() -> BTreeMap<String, BTreeSet<String>> {
    let mut used: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut add = |names: BTreeSet<String>, at: String| {
        for n in names {
            used.entry(n).or_default().insert(at.clone());
        }
    };
    let d: Value = serde_json::from_str(&read(DASHBOARD)).unwrap();
    for p in panels(&d) {
        for t in p["targets"].as_array().into_iter().flatten() {
            add(
                promql_metric_names(t["expr"].as_str().unwrap()),
                format!("dashboard panel {}", p["title"]),
            );
        }
    }
    for v in d["templating"]["list"].as_array().unwrap() {
        if let Some(q) = v["query"]["query"].as_str().or(v["definition"].as_str()) {
            add(
                variable_metric_names(q),
                format!("dashboard variable {}", v["name"]),
            );
        }
    }
    for a in alerts() {
        add(
            promql_metric_names(a["expr"].as_str().unwrap()),
            format!("alert {}", a["alert"]),
        );
    }
    used
}

/// The series names a `/metrics` page exports, from its `# TYPE` lines: a counter `x` is the
/// series `x_total`, a histogram `x` the series `x_bucket`, `x_sum` and `x_count` (what
/// Prometheus stores, and so what PromQL must name).
fn exported_series(metrics: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for line in metrics.lines() {
        let Some((name, kind)) = line.strip_prefix("# TYPE ").and_then(|l| l.split_once(' '))
        else {
            continue;
        };
        match kind.trim() {
            "counter" if name.ends_with("_total") => {
                out.insert(name.to_owned());
            }
            "counter" => {
                out.insert(format!("{name}_total"));
            }
            "histogram" | "gaugehistogram" => {
                for s in ["_bucket", "_sum", "_count"] {
                    out.insert(format!("{name}{s}"));
                }
            }
            "summary" => {
                for s in ["", "_sum", "_count"] {
                    out.insert(format!("{name}{s}"));
                }
            }
            "info" => {
                out.insert(format!("{name}_info"));
            }
            _ => {
                out.insert(name.to_owned());
            }
        }
    }
    out
}

/// Metrics of other exporters the dashboard and alerts use on purpose.
const OTHER_EXPORTERS: &[&str] = &[
    // Prometheus itself: whether a target answered the scrape.
    "up",
    // kube-state-metrics: the mirror container's readiness.
    "kube_pod_container_status_ready",
    // The API server: calls to the webhook that failed and were ignored (failurePolicy Ignore).
    "apiserver_admission_webhook_fail_open_count",
];

/// A renamed or removed metric breaks this test, not the dashboard: every name the dashboard and
/// the alerts use is exported by a running `pullthrough serve`, `node` or `webhook`, each having
/// handled real traffic first (a pull through the mirror, an install by the node agent, an
/// AdmissionReview), so that every labelled series exists too.
#[tokio::test]
async fn every_metric_the_dashboard_and_alerts_use_is_exported() {
    use crate::support::moto::Moto;
    use crate::support::pullthrough::{Options, Pullthrough};
    use crate::support::registry::Registry;
    use crate::support::{ChildGuard, free_port, http, image::Image, pullthrough_bin};

    const ACCEPT: &str = "application/vnd.oci.image.manifest.v1+json";
    let moto = Moto::start().await;
    let registry = Registry::start(&moto.password()).await;
    let image = Image::small("alpine");
    registry
        .push("docker-hub/library/alpine", "3.19", &image)
        .await;
    let (opts, _dead) = Options::with_dead_servers(&registry.base_url(), &moto.endpoint());
    let pt = Pullthrough::start(opts).await;
    for _ in 0..400 {
        if pt.ready_status().await == 200 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert_eq!(
        pt.ready_status().await,
        200,
        "the mirror never got ready: {}",
        pt.log()
    );

    // The mirror: a manifest twice (a cache miss, then a hit), a blob, a digest ECR lacks.
    let get = |path: String| {
        let url = format!("{}{path}", pt.url());
        async move {
            http::get(&url, &[("accept", ACCEPT)])
                .await
                .unwrap()
                .status()
                .as_u16()
        }
    };
    assert_eq!(
        get("/v2/library/alpine/manifests/3.19?ns=docker.io".into()).await,
        200
    );
    assert_eq!(
        get("/v2/library/alpine/manifests/3.19?ns=docker.io".into()).await,
        200
    );
    let layer = image.manifests[0].blobs().next().unwrap().digest.clone();
    assert_eq!(
        get(format!("/v2/library/alpine/blobs/{layer}?ns=docker.io")).await,
        200
    );
    let missing = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
    assert_eq!(
        get(format!(
            "/v2/library/alpine/manifests/{missing}?ns=docker.io"
        ))
        .await,
        404
    );

    // The node agent, once the mirror is ready: installs the files into a host root of its own.
    let host = tempfile::tempdir().unwrap();
    let etc = host.path().join("etc/containerd");
    std::fs::create_dir_all(etc.join("certs.d")).unwrap();
    std::fs::write(
        etc.join("config.toml"),
        "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\".registry]\nconfig_path = \"/etc/containerd/certs.d\"\n",
    )
    .unwrap();
    let node_port = free_port();
    let mut node = ChildGuard::spawn(
        "node",
        Command::new(pullthrough_bin())
            .args(["--log-format", "json", "node", "--config"])
            .arg(pt.config_path())
            .arg("--host-root")
            .arg(host.path())
            .args([
                "--listen",
                &format!("127.0.0.1:{node_port}"),
                "--resync",
                "1s",
            ])
            .env_clear()
            .env("RUST_LOG", "info"),
        host.path(),
    );
    node.wait_for_port(node_port).await;
    let node_url = format!("http://127.0.0.1:{node_port}");
    for _ in 0..400 {
        if http::get(&format!("{node_url}/readyz"), &[])
            .await
            .unwrap()
            .status()
            == 200
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(
        etc.join("certs.d/docker.io/hosts.toml").exists(),
        "the node agent installed nothing: {}",
        node.stderr()
    );

    // The webhook: one AdmissionReview over TLS.
    let certs = tempfile::tempdir().unwrap();
    crate::webhook::make_certs(certs.path(), &[]);
    let (https, webhook_ops) = (free_port(), free_port());
    let config = certs.path().join("pullthrough.toml");
    std::fs::write(
        &config,
        format!(
            "[ecr]\naccount = \"123456789012\"\nregion = \"eu-west-1\"\n\n[webhook]\n\
             listen = \"127.0.0.1:{https}\"\nops_listen = \"127.0.0.1:{webhook_ops}\"\n\
             cert_file = \"{}\"\nkey_file = \"{}\"\n",
            certs.path().join("tls.crt").display(),
            certs.path().join("tls.key").display()
        ),
    )
    .unwrap();
    let mut webhook = ChildGuard::spawn(
        "webhook",
        Command::new(pullthrough_bin())
            .args(["--log-format", "json", "webhook", "--config"])
            .arg(&config)
            .env_clear()
            .env("RUST_LOG", "info")
            .env("POD_NAMESPACE", NAMESPACE)
            .env("AWS_EC2_METADATA_DISABLED", "true"),
        certs.path(),
    );
    webhook.wait_for_port(https).await;
    webhook.wait_for_port(webhook_ops).await;
    let review = read("tests/fixtures/admission/deployment-pod.json");
    // Over TLS trusting only the test CA, for the Service name the API server dials.
    let (tls, _) = crate::webhook::connect(https, &certs.path().join("ca.crt"))
        .await
        .unwrap();
    let mut sender = crate::webhook::http_over(tls).await;
    let (status, answer) = crate::webhook::post(&mut sender, "/mutate", review.into_bytes()).await;
    let answer = String::from_utf8_lossy(&answer);
    assert_eq!(status, 200, "{answer}");
    assert!(
        answer.contains("\"patch\""),
        "the pod was rewritten: {answer}"
    );

    let mut exported = BTreeSet::new();
    for url in [
        format!("{}/metrics", pt.ops_url()),
        format!("{node_url}/metrics"),
        format!("http://127.0.0.1:{webhook_ops}/metrics"),
    ] {
        let resp = http::get(&url, &[]).await.unwrap();
        assert_eq!(resp.status(), 200, "{url}");
        exported.extend(exported_series(&String::from_utf8_lossy(resp.body())));
    }
    let used = used_metric_names();
    assert!(used.len() >= 20, "{used:?}");
    for other in OTHER_EXPORTERS {
        assert!(
            used.contains_key(*other),
            "{other} is no longer used: drop it from the list"
        );
    }
    let missing: Vec<String> = used
        .iter()
        .filter(|(name, _)| !exported.contains(*name) && !OTHER_EXPORTERS.contains(&name.as_str()))
        .map(|(name, at)| {
            format!(
                "{name} (used by {})",
                at.iter().cloned().collect::<Vec<_>>().join(", ")
            )
        })
        .collect();
    assert!(
        missing.is_empty(),
        "used by the dashboard or the alerts but exported by no pullthrough process:\n{}\n\nexported: {exported:?}",
        missing.join("\n")
    );
    node.terminate(Duration::from_secs(5));
    webhook.terminate(Duration::from_secs(5));
}

// --- Values documentation ----------------------------------------------------------------------

/// Dotted paths of the leaves of `v`: scalars, lists and empty maps.
fn leaves(prefix: &str, v: &Value, out: &mut Vec<String>) {
    match v {
        Value::Object(m) if !m.is_empty() => {
            for (k, v) in m {
                let p = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                leaves(&p, v, out);
            }
        }
        _ => out.push(prefix.to_owned()),
    }
}

#[test]
fn every_value_is_documented_in_the_chart_readme() {
    let readme = read("charts/pullthrough/README.md");
    let section = readme
        .split_once("\n## Values\n")
        .map(|(_, rest)| rest.split_once("\n## ").map_or(rest, |(values, _)| values))
        .expect("a \"## Values\" section");
    // The first cell of each values table row: | `path` | default | meaning |
    let documented: BTreeSet<&str> = section
        .lines()
        .filter_map(|l| l.strip_prefix("| `")?.split_once("` |").map(|(p, _)| p))
        .collect();
    let values = yaml_file(&format!("{CHART}/values.yaml"));
    let mut paths = Vec::new();
    leaves("", &values, &mut paths);
    assert!(paths.len() > 50, "{paths:?}");
    for p in &paths {
        // A row may document a whole map (`updateStrategy`, `mirror.resources`).
        let mut prefixes = p
            .match_indices('.')
            .map(|(i, _)| &p[..i])
            .chain([p.as_str()]);
        assert!(
            prefixes.any(|q| documented.contains(q)),
            "values.yaml's {p} has no row in charts/pullthrough/README.md"
        );
    }
    for d in &documented {
        assert!(
            values
                .pointer(&format!("/{}", d.replace('.', "/")))
                .is_some(),
            "charts/pullthrough/README.md documents {d}, which values.yaml does not have"
        );
    }
}
