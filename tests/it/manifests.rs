//! The Kubernetes manifests (`deploy/node/`, `deploy/`) and the IAM examples: every YAML document
//! parses into its typed Kubernetes object with nothing lost (so a misspelt field fails here,
//! not on a cluster), every kustomization renders with the pinned kubectl (`scripts/deps`), and
//! the DaemonSet has the properties the docs (docs/install.md) promise. The pod helpers here are
//! shared with the Helm chart's tests (`chart.rs`), which hold the chart to the same properties.

use std::path::{Path, PathBuf};

use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{Container, PodSpec};
use serde_json::Value;

use crate::support::k8s::{check_object, kustomize, yaml_docs};
use crate::support::repo_root;

fn yaml_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            yaml_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "yaml" || x == "yml") {
            out.push(p);
        }
    }
}

#[test]
#[should_panic(expected = "fields were lost in parsing")]
fn a_misspelt_field_fails_the_roundtrip() {
    let doc = yaml_docs(
        "apiVersion: apps/v1\nkind: DaemonSet\nmetadata: {name: x}\nspec:\n  selector: {}\n  template:\n    spec:\n      hostNetwrok: true\n      containers: []\n",
    );
    check_object(&doc[0], "typo");
}

#[test]
#[should_panic(expected = "unknown field \"podMetricEndpoints\"")]
fn a_misspelt_custom_resource_field_fails() {
    // CRDs drop unknown fields instead of refusing them: without this check a typo in a
    // PodMonitor would leave pullthrough unscraped, silently.
    let doc = yaml_docs(
        "apiVersion: monitoring.coreos.com/v1\nkind: PodMonitor\nmetadata: {name: x}\nspec:\n  selector: {matchLabels: {a: b}}\n  podMetricEndpoints: [{port: ops}]\n",
    );
    check_object(&doc[0], "typo");
}

/// Every directory with a `kustomization.yaml` of kind Kustomization (components are rendered
/// through the overlays that use them).
#[test]
fn every_kustomization_renders() {
    let mut files = Vec::new();
    yaml_files(&repo_root().join("deploy"), &mut files);
    let mut rendered = 0;
    for f in files.iter().filter(|f| f.ends_with("kustomization.yaml")) {
        let doc = &yaml_docs(&std::fs::read_to_string(f).unwrap())[0];
        if doc["kind"] == "Kustomization" {
            let dir = f.parent().unwrap().strip_prefix(repo_root()).unwrap();
            assert!(!kustomize(dir.to_str().unwrap()).is_empty(), "{dir:?}");
            rendered += 1;
        }
    }
    assert!(rendered >= 8, "{rendered}");
}

#[test]
fn every_yaml_document_is_a_valid_typed_object() {
    let mut files = Vec::new();
    yaml_files(&repo_root().join("deploy"), &mut files);
    assert!(files.len() >= 10, "{files:?}");
    for f in &files {
        let text = std::fs::read_to_string(f).unwrap();
        let docs = yaml_docs(&text);
        assert!(!docs.is_empty(), "{}: empty", f.display());
        for (i, doc) in docs.iter().enumerate() {
            let what = format!("{} (document {})", f.display(), i + 1);
            let kind = check_object(doc, &what);
            if f.file_name().is_some_and(|n| n == "kustomization.yaml") {
                assert!(
                    kind == "Kustomization" || kind == "Component",
                    "{what}: {kind}"
                );
            }
        }
    }
}

pub(crate) fn daemonset(docs: &[Value], name: &str) -> DaemonSet {
    let doc = docs
        .iter()
        .find(|d| d["kind"] == "DaemonSet" && d["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no DaemonSet {name}"));
    serde_json::from_value(doc.clone()).unwrap()
}

pub(crate) fn pod_spec(ds: &DaemonSet) -> PodSpec {
    ds.spec.template.spec.clone().unwrap()
}

pub(crate) fn container<'a>(pod: &'a PodSpec, name: &str) -> &'a Container {
    pod.containers
        .iter()
        .find(|c| c.name == name)
        .unwrap_or_else(|| panic!("no container {name}"))
}

/// `(host path, mount path, read-only)` of every hostPath a container mounts.
pub(crate) fn host_mounts(pod: &PodSpec, c: &Container) -> Vec<(String, String, bool)> {
    let volumes = pod.volumes.clone().unwrap_or_default();
    c.volume_mounts
        .clone()
        .unwrap_or_default()
        .iter()
        .filter_map(|m| {
            let v = volumes.iter().find(|v| v.name == m.name).unwrap();
            v.host_path.as_ref().map(|h| {
                (
                    h.path.clone(),
                    m.mount_path.clone(),
                    m.read_only.unwrap_or(false),
                )
            })
        })
        .collect()
}

pub(crate) fn port_of(c: &Container, name: &str) -> i32 {
    c.ports
        .clone()
        .unwrap_or_default()
        .iter()
        .find(|p| p.name.as_deref() == Some(name))
        .map(|p| {
            // With hostNetwork the host port is the container port; declaring it lets the
            // scheduler see conflicts.
            assert_eq!(p.host_port, Some(p.container_port), "{name}");
            p.container_port
        })
        .unwrap_or_else(|| panic!("{}: no port {name}", c.name))
}

pub(crate) fn probe_target(probe: Option<&k8s_openapi::api::core::v1::Probe>) -> (String, String) {
    let get = probe
        .and_then(|p| p.http_get.as_ref())
        .expect("an httpGet probe");
    let port = match &get.port {
        k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::String(s) => s.clone(),
        other => panic!("probes name their port: {other:?}"),
    };
    (get.path.clone().unwrap_or_default(), port)
}

pub(crate) fn assert_locked_down(c: &Container) {
    let sc = c.security_context.as_ref().expect("securityContext");
    assert_eq!(sc.read_only_root_filesystem, Some(true), "{}", c.name);
    assert_eq!(sc.allow_privilege_escalation, Some(false), "{}", c.name);
    let caps = sc.capabilities.as_ref().unwrap();
    assert_eq!(
        caps.drop.as_deref(),
        Some(&["ALL".to_string()][..]),
        "{}",
        c.name
    );
    assert!(caps.add.is_none(), "{}", c.name);
    assert_ne!(sc.privileged, Some(true), "{}", c.name);
    let limits = c.resources.as_ref().and_then(|r| r.limits.clone()).unwrap();
    assert!(limits.contains_key("memory"), "{}: no memory limit", c.name);
}

#[test]
fn the_daemonset_has_the_promised_properties() {
    let docs = kustomize("deploy/node");
    let ds = daemonset(&docs, "pullthrough");
    let spec = &ds.spec;
    let rolling = spec
        .update_strategy
        .as_ref()
        .unwrap()
        .rolling_update
        .as_ref()
        .unwrap();
    assert_eq!(
        rolling.max_unavailable,
        Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::String("10%".into()))
    );
    let pod = pod_spec(&ds);
    assert_eq!(pod.host_network, Some(true));
    assert_eq!(pod.dns_policy.as_deref(), Some("ClusterFirstWithHostNet"));
    assert_eq!(
        pod.priority_class_name.as_deref(),
        Some("system-node-critical")
    );
    assert_eq!(pod.automount_service_account_token, Some(false));
    let tolerations = pod.tolerations.clone().unwrap();
    assert!(
        tolerations
            .iter()
            .any(|t| t.operator.as_deref() == Some("Exists")
                && t.key.is_none()
                && t.effect.is_none()),
        "tolerates every taint: {tolerations:?}"
    );

    // The ConfigMap: kustomize's generated one, holding deploy/node/config.toml, mounted by both.
    let cm = docs.iter().find(|d| d["kind"] == "ConfigMap").unwrap();
    let text = cm["data"]["config.toml"].as_str().unwrap();
    assert_eq!(
        text,
        std::fs::read_to_string(repo_root().join("deploy/node/config.toml")).unwrap()
    );
    let config =
        pullthrough::config::Config::from_toml_str(text, "deploy/node/config.toml").unwrap();
    assert!(
        config.listen.ip().is_loopback(),
        "the mirror listens on loopback"
    );
    let volumes = pod.volumes.clone().unwrap();
    let cm_volume = volumes.iter().find(|v| v.config_map.is_some()).unwrap();
    assert_eq!(
        cm_volume.config_map.as_ref().unwrap().name,
        cm["metadata"]["name"].as_str().unwrap()
    );

    let mirror = container(&pod, "mirror");
    let ops = port_of(mirror, "ops");
    assert_eq!(ops, i32::from(config.ops_listen.port()));
    assert_eq!(port_of(mirror, "mirror"), i32::from(config.listen.port()));
    assert_eq!(
        probe_target(mirror.liveness_probe.as_ref()),
        ("/healthz".into(), "ops".into())
    );
    assert_eq!(
        probe_target(mirror.readiness_probe.as_ref()),
        ("/readyz".into(), "ops".into())
    );
    assert_locked_down(mirror);
    let sc = mirror.security_context.as_ref().unwrap();
    assert_eq!(sc.run_as_non_root, Some(true));
    assert!(sc.run_as_user.is_some_and(|u| u != 0));
    assert!(
        host_mounts(&pod, mirror).is_empty(),
        "the mirror mounts nothing of the host"
    );

    let hosts = container(&pod, "hosts");
    assert_eq!(hosts.args.as_ref().unwrap()[2], "node");
    assert_eq!(
        probe_target(hosts.readiness_probe.as_ref()),
        ("/readyz".into(), "node-ops".into())
    );
    assert_locked_down(hosts);
    let mut mounts = host_mounts(&pod, hosts);
    mounts.sort();
    assert_eq!(
        mounts,
        [
            (
                "/etc/containerd".to_string(),
                "/host/etc/containerd".to_string(),
                true
            ),
            (
                "/etc/containerd/certs.d".to_string(),
                "/host/etc/containerd/certs.d".to_string(),
                false
            ),
            ("/etc/eks".to_string(), "/host/etc/eks".to_string(), true),
        ],
        "only certs.d is writable; containerd's config and EKS's version file are read-only"
    );
    // No other hostPath anywhere in the pod.
    let host_paths = volumes.iter().filter(|v| v.host_path.is_some()).count();
    assert_eq!(host_paths, 3);
}

#[test]
fn uninstall_and_overlays_render() {
    let docs = kustomize("deploy/uninstall");
    let ds = daemonset(&docs, "pullthrough-uninstall");
    let pod = pod_spec(&ds);
    let remove = container(&pod, "remove");
    assert!(
        remove
            .args
            .as_ref()
            .unwrap()
            .contains(&"--remove".to_string())
    );
    assert_locked_down(remove);
    assert_eq!(
        host_mounts(&pod, remove),
        [(
            "/etc/containerd/certs.d".to_string(),
            "/host/etc/containerd/certs.d".to_string(),
            false
        )]
    );

    // Monitoring: the alerts and the dashboard alone, and with the DaemonSet and its PodMonitor.
    let kinds = |docs: &[Value]| -> Vec<String> {
        let mut k: Vec<String> = docs
            .iter()
            .map(|d| {
                format!(
                    "{}/{}",
                    d["kind"].as_str().unwrap(),
                    d["metadata"]["name"].as_str().unwrap()
                )
            })
            .collect();
        k.sort();
        k
    };
    assert_eq!(
        kinds(&kustomize("deploy/monitoring")),
        [
            "ConfigMap/pullthrough-dashboard",
            "PrometheusRule/pullthrough"
        ]
    );
    let monitoring = kinds(&kustomize("deploy/examples/monitoring"));
    for want in [
        "ConfigMap/pullthrough-dashboard",
        "DaemonSet/pullthrough",
        "PodMonitor/pullthrough",
        "PrometheusRule/pullthrough",
    ] {
        assert!(
            monitoring.iter().any(|k| k == want),
            "{want}: {monitoring:?}"
        );
    }

    // Bottlerocket: the mirror alone, nothing of the host mounted.
    let br = kustomize("deploy/examples/bottlerocket");
    let pod = pod_spec(&daemonset(&br, "pullthrough"));
    assert_eq!(pod.containers.len(), 1);
    assert_eq!(pod.containers[0].name, "mirror");
    assert!(pod.volumes.unwrap().iter().all(|v| v.host_path.is_none()));
}

#[test]
fn iam_examples_grant_the_node_role_what_it_needs() {
    let read = |f: &str| -> Value {
        serde_json::from_str(
            &std::fs::read_to_string(repo_root().join("docs/iam").join(f)).unwrap(),
        )
        .unwrap()
    };
    let actions = |policy: &Value| -> Vec<String> {
        let mut out: Vec<String> = policy["Statement"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|s| match &s["Action"] {
                Value::String(a) => vec![a.clone()],
                Value::Array(a) => a.iter().map(|x| x.as_str().unwrap().to_owned()).collect(),
                other => panic!("{other}"),
            })
            .collect();
        out.sort();
        out
    };
    assert_eq!(
        actions(&read("node-role-policy.json")),
        [
            "ecr:BatchGetImage",
            "ecr:BatchImportUpstreamImage",
            "ecr:CreateRepository",
            "ecr:GetAuthorizationToken",
            "ecr:GetDownloadUrlForLayer"
        ]
    );
    let registry = read("registry-policy.json");
    assert_eq!(
        actions(&registry),
        ["ecr:BatchImportUpstreamImage", "ecr:CreateRepository"]
    );
    // The very statement `pullthrough ecr setup` writes (and later recognizes by its Sid) for
    // the DaemonSet's prefixes; the identity policy covers the same repositories.
    use pullthrough::ecr::policy;
    let config = pullthrough::config::Config::from_toml_str(
        &std::fs::read_to_string(repo_root().join("deploy/node/config.toml")).unwrap(),
        "deploy/node/config.toml",
    )
    .unwrap();
    let resources: Vec<String> = config
        .upstreams
        .values()
        .map(|u| policy::prefix_resource("REGION", "ACCOUNT_ID", &u.prefix))
        .collect();
    let want = policy::node_statement(
        &["arn:aws:iam::ACCOUNT_ID:role/NODE_ROLE_NAME".to_string()],
        &resources,
    );
    assert_eq!(
        policy::normalize(&registry["Statement"][0]),
        policy::normalize(&want)
    );
    let node = read("node-role-policy.json");
    assert_eq!(
        policy::normalize(&node["Statement"][1]["Resource"]),
        policy::normalize(&serde_json::json!(resources))
    );
}

/// The one document of `kind` named `name`.
pub(crate) fn object<'a>(docs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name}"))
}

#[test]
fn the_webhook_manifests_have_the_promised_properties() {
    use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
    use k8s_openapi::api::apps::v1::Deployment;
    use k8s_openapi::api::policy::v1::PodDisruptionBudget;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelectorRequirement;
    use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

    let docs = kustomize("deploy/webhook");
    let mwc: MutatingWebhookConfiguration = serde_json::from_value(
        object(&docs, "MutatingWebhookConfiguration", "pullthrough-webhook").clone(),
    )
    .unwrap();
    let hooks = mwc.webhooks.unwrap();
    assert_eq!(hooks.len(), 1);
    let hook = &hooks[0];
    assert_eq!(hook.failure_policy.as_deref(), Some("Ignore"));
    assert_eq!(hook.reinvocation_policy.as_deref(), Some("IfNeeded"));
    assert_eq!(hook.side_effects, "NoneOnDryRun");
    assert_eq!(hook.timeout_seconds, Some(5));
    assert_eq!(hook.admission_review_versions, ["v1"]);
    let svc = hook.client_config.service.as_ref().unwrap();
    assert_eq!(
        (
            svc.name.as_str(),
            svc.namespace.as_str(),
            svc.path.as_deref()
        ),
        ("pullthrough-webhook", "pullthrough", Some("/mutate"))
    );
    let opt_in = LabelSelectorRequirement {
        key: "pull-through-enabled".into(),
        operator: "In".into(),
        values: Some(vec!["true".into()]),
    };
    let selector = |h: &k8s_openapi::api::admissionregistration::v1::MutatingWebhook| {
        h.namespace_selector
            .as_ref()
            .and_then(|s| s.match_expressions.clone())
            .unwrap_or_default()
    };
    let expressions = selector(hook);
    assert!(expressions.contains(&opt_in), "{expressions:?}");
    let rules: Vec<(Vec<String>, Vec<String>)> = hook
        .rules
        .clone()
        .unwrap()
        .into_iter()
        .map(|r| {
            assert_eq!(r.api_groups.as_deref(), Some(&[String::new()][..]));
            (r.operations.unwrap(), r.resources.unwrap())
        })
        .collect();
    assert_eq!(
        rules,
        [
            (vec!["CREATE".to_string()], vec!["pods".to_string()]),
            (
                vec!["UPDATE".to_string()],
                vec!["pods/ephemeralcontainers".to_string()]
            ),
        ]
    );

    let deployment: Deployment =
        serde_json::from_value(object(&docs, "Deployment", "pullthrough-webhook").clone()).unwrap();
    let spec = deployment.spec;
    assert_eq!(spec.replicas, Some(2));
    let pod = spec.template.spec.unwrap();
    let anti = pod
        .affinity
        .as_ref()
        .and_then(|a| a.pod_anti_affinity.as_ref())
        .expect("pod anti-affinity");
    let terms = anti
        .preferred_during_scheduling_ignored_during_execution
        .clone()
        .unwrap_or_default();
    assert!(
        terms
            .iter()
            .any(|t| t.pod_affinity_term.topology_key == "kubernetes.io/hostname"),
        "replicas spread over nodes: {terms:?}"
    );
    // On SIGTERM: 5 s of answering with /readyz at 503 (DRAIN_DELAY), then up to
    // timeouts.shutdown (20 s) of draining, all before the kill.
    let grace = pod.termination_grace_period_seconds.unwrap();
    assert!(grace > 5 + 20, "terminationGracePeriodSeconds {grace}");
    let webhook = container(&pod, "webhook");
    assert_eq!(
        probe_target(webhook.readiness_probe.as_ref()),
        ("/readyz".into(), "ops".into())
    );
    assert_eq!(
        probe_target(webhook.liveness_probe.as_ref()),
        ("/healthz".into(), "ops".into())
    );
    assert_locked_down(webhook);
    let pdb: PodDisruptionBudget =
        serde_json::from_value(object(&docs, "PodDisruptionBudget", "pullthrough-webhook").clone())
            .unwrap();
    let pdb = pdb.spec.unwrap();
    assert_eq!(pdb.min_available, Some(IntOrString::Int(1)));
    assert_eq!(
        pdb.selector.unwrap().match_labels,
        spec.selector.match_labels
    );
    let tls_secret = pod
        .volumes
        .unwrap_or_default()
        .into_iter()
        .find_map(|v| v.secret?.secret_name)
        .expect("the TLS secret volume");

    // cert-manager: the CA injector reads <namespace>/<Certificate> of the serving certificate,
    // the one writing the Secret the Deployment mounts.
    let cm = kustomize("deploy/examples/webhook-cert-manager");
    let serving = cm
        .iter()
        .find(|d| d["kind"] == "Certificate" && d["spec"]["secretName"] == tls_secret.as_str())
        .expect("a Certificate for the mounted Secret");
    let want = format!(
        "{}/{}",
        serving["metadata"]["namespace"].as_str().unwrap(),
        serving["metadata"]["name"].as_str().unwrap()
    );
    let annotation = |docs: &[Value]| {
        object(docs, "MutatingWebhookConfiguration", "pullthrough-webhook")["metadata"]
            ["annotations"]["cert-manager.io/inject-ca-from"]
            .as_str()
            .map(str::to_owned)
    };
    assert_eq!(annotation(&cm), Some(want.clone()));
    assert_eq!(
        object(&cm, "Service", "pullthrough-webhook")["metadata"]["namespace"],
        serving["metadata"]["namespace"]
    );

    // Cluster-wide: the opt-in expression is gone, the opt-outs stay.
    let wide = kustomize("deploy/examples/webhook-cluster-wide");
    assert_eq!(annotation(&wide), Some(want));
    let mwc: MutatingWebhookConfiguration = serde_json::from_value(
        object(&wide, "MutatingWebhookConfiguration", "pullthrough-webhook").clone(),
    )
    .unwrap();
    let wide_hook = &mwc.webhooks.unwrap()[0];
    let wide_expressions = selector(wide_hook);
    assert!(!wide_expressions.contains(&opt_in), "{wide_expressions:?}");
    let rest: Vec<_> = expressions.into_iter().filter(|e| *e != opt_in).collect();
    assert!(!rest.is_empty());
    assert_eq!(wide_expressions, rest);
}

/// deploy/warm: an hourly CronJob that never overlaps itself; the Kubernetes token only in the
/// init container, which may only list pods; both containers locked down; the main container
/// runs `ecr warm --from-pods` on what the init container wrote, with a config that loads.
#[test]
fn the_warm_cronjob_has_the_promised_properties() {
    use k8s_openapi::api::batch::v1::CronJob;
    use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};

    let docs = kustomize("deploy/warm");
    let cron: CronJob =
        serde_json::from_value(object(&docs, "CronJob", "pullthrough-warm").clone()).unwrap();
    let spec = cron.spec;
    assert_eq!(spec.schedule, "17 * * * *");
    assert_eq!(spec.concurrency_policy.as_deref(), Some("Forbid"));
    let job = spec.job_template.spec.unwrap();
    let pod = job.template.spec.unwrap();
    assert_eq!(
        pod.service_account_name.as_deref(),
        Some("pullthrough-warm")
    );
    assert_eq!(pod.automount_service_account_token, Some(false));
    assert_eq!(pod.restart_policy.as_deref(), Some("Never"));
    let psc = pod.security_context.as_ref().unwrap();
    assert_eq!(psc.run_as_non_root, Some(true));

    let init = &pod.init_containers.as_ref().unwrap()[0];
    let warm = container(&pod, "warm");
    for c in [init, warm] {
        assert_locked_down(c);
    }
    assert!(
        init.image
            .as_deref()
            .unwrap()
            .starts_with("registry.k8s.io/kubectl:")
    );
    let script = init.args.as_ref().unwrap().join(" ");
    assert!(
        script.contains("kubectl get pods --all-namespaces --output json")
            && script.contains("/work/pods.json"),
        "{script}"
    );
    let token = "/var/run/secrets/kubernetes.io/serviceaccount";
    let mounts = |c: &Container| -> Vec<String> {
        c.volume_mounts
            .iter()
            .flatten()
            .map(|m| m.mount_path.clone())
            .collect()
    };
    assert!(mounts(init).contains(&token.to_string()));
    assert!(!mounts(warm).iter().any(|m| m.starts_with(token)));
    assert!(
        warm.image
            .as_deref()
            .unwrap()
            .starts_with("ghcr.io/pullthrough/pullthrough:")
    );
    assert_eq!(
        warm.args.as_deref().unwrap(),
        [
            "ecr",
            "warm",
            "--from-pods",
            "/work/pods.json",
            "--config",
            "/etc/pullthrough/pullthrough.toml"
        ]
    );

    let role: ClusterRole =
        serde_json::from_value(object(&docs, "ClusterRole", "pullthrough-warm-pod-lister").clone())
            .unwrap();
    let rules = role.rules.unwrap();
    assert_eq!(rules.len(), 1);
    assert_eq!(
        rules[0].resources.as_deref(),
        Some(&["pods".to_string()][..])
    );
    assert_eq!(rules[0].verbs, ["list"]);
    let binding: ClusterRoleBinding = serde_json::from_value(
        object(&docs, "ClusterRoleBinding", "pullthrough-warm-pod-lister").clone(),
    )
    .unwrap();
    let subject = &binding.subjects.unwrap()[0];
    assert_eq!(
        (subject.name.as_str(), subject.namespace.as_deref()),
        ("pullthrough-warm", Some("pullthrough"))
    );
    let sa = object(&docs, "ServiceAccount", "pullthrough-warm");
    assert!(sa["metadata"]["annotations"]["eks.amazonaws.com/role-arn"].is_string());

    let path = repo_root().join("deploy/warm/pullthrough.toml");
    pullthrough::config::Config::load(&path).unwrap();
}
