//! The admission webhook: real `admission.k8s.io/v1` reviews decided and their patches applied
//! with json-patch, the HTTPS server with a certificate rotated under it, and
//! `pullthrough rewrite`'s golden output.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use base64::Engine;
use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use pullthrough::config::Config;
use pullthrough::webhook::mutate::{self, Policy};
use pullthrough::webhook::{Webhook, WebhookMetrics, WebhookServer};
use rstest::rstest;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use serde_json::Value;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

use crate::support::{ChildGuard, free_port, pullthrough_bin, repo_root};

const ECR: &str = "123456789012.dkr.ecr.eu-west-1.amazonaws.com";
/// The DNS name the API server dials, as in `deploy/webhook`.
const SERVICE_NAME: &str = "pullthrough-webhook.pullthrough.svc";

const CONFIG: &str = r#"
[ecr]
account = "123456789012"
region = "eu-west-1"

[webhook]
exclude = ["docker.io/acme/internal-*"]
"#;

fn fixture(name: &str) -> Value {
    let path = repo_root().join("tests/fixtures/admission").join(name);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path:?}: {e}"));
    serde_json::from_str(&text).unwrap()
}

fn policy(config_text: &str) -> Policy {
    let config = Config::from_toml_str(config_text, "test.toml").unwrap();
    let w = &config.webhook;
    let mut skip = w.skip_namespaces.clone();
    skip.insert("pullthrough".into());
    Policy {
        rules: pullthrough::webhook::rules(&config, None).unwrap(),
        mode: w.mode,
        skip_namespaces: skip,
        annotation: w.annotation.clone(),
    }
}

/// Checks the answer is a well-formed allowing review for `review`'s uid, and returns the
/// request's object with the answer's patch applied.
fn answer_applied(review: &Value, answer: &Value) -> Value {
    assert_eq!(answer["apiVersion"], "admission.k8s.io/v1");
    assert_eq!(answer["kind"], "AdmissionReview");
    assert!(answer.get("request").is_none());
    let resp = &answer["response"];
    assert_eq!(resp["uid"], review["request"]["uid"]);
    assert_eq!(resp["allowed"], true);
    let mut object = review["request"]["object"].clone();
    if let Some(patch) = resp.get("patch") {
        assert_eq!(resp["patchType"], "JSONPatch");
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(patch.as_str().expect("patch is base64 text"))
            .unwrap();
        let ops: json_patch::Patch = serde_json::from_slice(&bytes).unwrap();
        assert!(!ops.0.is_empty(), "an empty patch must be left out");
        json_patch::patch(&mut object, &ops).unwrap();
    } else {
        assert!(resp.get("patchType").is_none());
    }
    object
}

#[rstest]
#[case::deployment_pod("deployment-pod.json", Some("deployment-pod.expected.json"), CONFIG)]
#[case::ephemeral_container(
    "ephemeral-container.json",
    Some("ephemeral-container.expected.json"),
    CONFIG
)]
#[case::already_rewritten_gives_no_patch("already-rewritten.json", None, CONFIG)]
#[case::dry_run_mode_only_annotates(
    "dry-run.json",
    Some("dry-run.expected.json"),
    &format!("{CONFIG}mode = \"dry-run\"\n")
)]
#[case::skipped_namespace("skipped-namespace.json", None, CONFIG)]
#[case::warm_mode_changes_nothing(
    "deployment-pod.json",
    None,
    &format!("{CONFIG}mode = \"warm\"\n")
)]
fn fixtures(#[case] input: &str, #[case] expected: Option<&str>, #[case] config: &str) {
    let review = fixture(input);
    let body = serde_json::to_vec(&review).unwrap();
    let (answer, _) = mutate::admit(&body, &policy(config)).unwrap();
    let got = answer_applied(&review, &answer);
    let want = match expected {
        Some(e) => fixture(e),
        None => review["request"]["object"].clone(),
    };
    assert_eq!(
        got,
        want,
        "{input}: got\n{}",
        serde_json::to_string_pretty(&got).unwrap()
    );
}

#[test]
fn deployment_pod_decisions_by_container() {
    let body = serde_json::to_vec(&fixture("deployment-pod.json")).unwrap();
    let (_, m) = mutate::admit(&body, &policy(CONFIG)).unwrap();
    let got: Vec<(String, &str)> = m
        .images
        .iter()
        .map(|i| {
            (
                format!("{}/{}", i.field.as_str(), i.name),
                i.decision.label(),
            )
        })
        .collect();
    let want = [
        ("containers/web", "rewritten"),
        ("containers/exporter", "rewritten"),
        ("containers/pinned", "digest"),
        ("containers/agent", "excluded"),
        ("containers/legacy", "not-configured"),
        ("containers/latest", "rewritten"),
        ("initContainers/migrate", "rewritten"),
        ("initContainers/proxy", "rewritten"),
        ("initContainers/warm-cache", "pull-policy-never"),
        ("volumes/model", "rewritten"),
    ];
    let want: Vec<(String, &str)> = want.iter().map(|(k, v)| (k.to_string(), *v)).collect();
    assert_eq!(got, want);
    assert!(m.warnings.is_empty(), "{:?}", m.warnings);
}

#[test]
fn a_server_side_dry_run_request_is_patched_like_any_other() {
    let review = fixture("dry-run.json");
    assert_eq!(review["request"]["dryRun"], true);
    let (answer, _) =
        mutate::admit(&serde_json::to_vec(&review).unwrap(), &policy(CONFIG)).unwrap();
    let pod = answer_applied(&review, &answer);
    assert_eq!(
        pod["spec"]["containers"][1]["image"],
        format!("{ECR}/docker-hub/library/busybox:1.36")
    );
}

#[test]
fn reinvocation_after_another_webhook_added_a_sidecar_keeps_earlier_originals() {
    let mut review = fixture("already-rewritten.json");
    add_sidecar(&mut review["request"]["object"]);
    let (answer, _) =
        mutate::admit(&serde_json::to_vec(&review).unwrap(), &policy(CONFIG)).unwrap();
    let pod = answer_applied(&review, &answer);
    assert_eq!(
        pod["spec"]["containers"][1]["image"],
        format!("{ECR}/docker-hub/istio/proxyv2:1.24.0")
    );
    let originals: Value = serde_json::from_str(
        pod["metadata"]["annotations"]["pullthrough.io/original-images"]
            .as_str()
            .unwrap(),
    )
    .unwrap();
    assert_eq!(
        originals,
        serde_json::json!({
            "containers/mesh-proxy": "docker.io/istio/proxyv2:1.24.0",
            "containers/web": "nginx:1.27",
            "initContainers/proxy": "ghcr.io/acme/proxy:v2",
        })
    );
}

const DRY_RUN: &str = "mode = \"dry-run\"\n";

/// Decides `review`, then decides it again with the patched pod as a reinvocation would.
fn decide_twice(review: &Value, config: &str) -> (Value, Value) {
    let policy = policy(config);
    let (first, _) = mutate::admit(&serde_json::to_vec(review).unwrap(), &policy).unwrap();
    let mut again = review.clone();
    again["request"]["object"] = answer_applied(review, &first);
    let (second, _) = mutate::admit(&serde_json::to_vec(&again).unwrap(), &policy).unwrap();
    (first, second)
}

#[test]
fn dry_run_reinvocation_gives_no_patch() {
    let review = fixture("dry-run.json");
    let (first, second) = decide_twice(&review, &format!("{CONFIG}{DRY_RUN}"));
    assert!(first["response"].get("patch").is_some());
    assert!(
        second["response"].get("patch").is_none(),
        "reinvocation re-added the same annotation: {second}"
    );
}

#[test]
fn dry_run_reinvocation_after_a_sidecar_was_added_updates_the_annotation() {
    let review = fixture("dry-run.json");
    let config = format!("{CONFIG}{DRY_RUN}");
    let policy = policy(&config);
    let (first, _) = mutate::admit(&serde_json::to_vec(&review).unwrap(), &policy).unwrap();
    let mut again = review.clone();
    again["request"]["object"] = answer_applied(&review, &first);
    add_sidecar(&mut again["request"]["object"]);
    let (second, _) = mutate::admit(&serde_json::to_vec(&again).unwrap(), &policy).unwrap();
    let pod = answer_applied(&again, &second);
    let would: Value = serde_json::from_str(
        pod["metadata"]["annotations"][mutate::DRY_RUN_ANNOTATION]
            .as_str()
            .unwrap(),
    )
    .unwrap();
    assert_eq!(
        would["containers/mesh-proxy"],
        format!("{ECR}/docker-hub/istio/proxyv2:1.24.0")
    );
    // The images themselves are never changed in dry-run mode.
    assert_eq!(
        pod["spec"]["containers"],
        again["request"]["object"]["spec"]["containers"]
    );
}

#[test]
fn enforce_reinvocation_gives_no_patch() {
    let (_, second) = decide_twice(&fixture("deployment-pod.json"), CONFIG);
    assert!(second["response"].get("patch").is_none(), "{second}");
}

#[test]
fn dry_run_ephemeral_containers_get_warnings_not_a_patch() {
    let review = fixture("ephemeral-container.json");
    let (answer, m) = mutate::admit(
        &serde_json::to_vec(&review).unwrap(),
        &policy(&format!("{CONFIG}{DRY_RUN}")),
    )
    .unwrap();
    assert!(answer["response"].get("patch").is_none(), "{answer}");
    assert_eq!(
        answer["response"]["warnings"],
        serde_json::json!([format!(
            "pullthrough dry-run: would rewrite ephemeralContainers \"debugger-8x2kq\" to \
             {ECR}/docker-hub/nicolaka/netshoot:v0.13"
        )])
    );
    // Only the new container was looked at, not the one already running.
    let names: Vec<&str> = m.images.iter().map(|i| i.name.as_str()).collect();
    assert_eq!(names, ["debugger-8x2kq"]);
}

#[test]
fn an_ephemeral_containers_update_without_old_object_is_skipped_with_a_warning() {
    let mut review = fixture("ephemeral-container.json");
    review["request"]
        .as_object_mut()
        .unwrap()
        .remove("oldObject");
    let (answer, m) =
        mutate::admit(&serde_json::to_vec(&review).unwrap(), &policy(CONFIG)).unwrap();
    assert_eq!(m.skipped.as_ref().map(|s| s.label()), Some("unreadable"));
    assert!(m.images.is_empty());
    assert_eq!(
        answer_applied(&review, &answer),
        review["request"]["object"]
    );
    let warning = answer["response"]["warnings"][0].as_str().unwrap();
    assert!(warning.contains("without oldObject"), "{warning}");
}

#[tokio::test]
async fn a_body_over_the_limit_is_refused_with_413() {
    let (metrics, _) = WebhookMetrics::new();
    let webhook = Webhook::new(policy(CONFIG), metrics.clone());
    let big = Bytes::from(vec![b' '; 8 * 1024 * 1024 + 1]);
    let req = Request::post("/mutate").body(Full::new(big)).unwrap();
    let resp = webhook.handle(req).await;
    assert_eq!(resp.status(), StatusCode::PAYLOAD_TOO_LARGE);
    let bad = metrics
        .requests
        .get_or_create(&pullthrough::webhook::RequestLabels {
            outcome: "bad-request".into(),
            skip: "-".into(),
        })
        .get();
    assert_eq!(bad, 1);
    // A body just under the limit is read (and, not being a review, refused with 400).
    let mut under = vec![b' '; 8 * 1024 * 1024];
    under[0] = b'{';
    let req = Request::post("/mutate")
        .body(Full::new(Bytes::from(under)))
        .unwrap();
    assert_eq!(webhook.handle(req).await.status(), StatusCode::BAD_REQUEST);
}

/// Edits the deployment pod fixture, then returns what the webhook decided.
fn decide_edited(edit: impl FnOnce(&mut Value)) -> (Value, mutate::Mutation) {
    let mut review = fixture("deployment-pod.json");
    edit(&mut review);
    let (answer, m) =
        mutate::admit(&serde_json::to_vec(&review).unwrap(), &policy(CONFIG)).unwrap();
    (answer, m)
}

#[rstest]
#[case::own_namespace("namespace", |r: &mut Value| r["request"]["namespace"] = "pullthrough".into())]
#[case::skip_label("label", |r: &mut Value| {
    r["request"]["object"]["metadata"]["labels"]["pullthrough.io/skip"] = "true".into();
})]
#[case::mirror_pod("mirror-pod", |r: &mut Value| {
    r["request"]["object"]["metadata"]["annotations"]["kubernetes.io/config.mirror"] = "3f2a".into();
})]
#[case::pod_update("not-handled", |r: &mut Value| r["request"]["operation"] = "UPDATE".into())]
#[case::other_kind("not-handled", |r: &mut Value| {
    r["request"]["kind"] = serde_json::json!({"group": "apps", "version": "v1", "kind": "Deployment"});
})]
#[case::unreadable_pod("unreadable", |r: &mut Value| {
    r["request"]["object"]["spec"]["containers"] = "nginx".into();
})]
fn skipped_requests_are_allowed_unchanged(
    #[case] label: &str,
    #[case] edit: impl FnOnce(&mut Value),
) {
    let (answer, m) = decide_edited(edit);
    assert_eq!(m.skipped.as_ref().map(|s| s.label()), Some(label));
    let resp = &answer["response"];
    assert_eq!(resp["allowed"], true);
    assert_eq!(resp["uid"], "7b0d4a93-6a3e-4f4e-9a8c-3d1f2e5b6c70");
    assert!(resp.get("patch").is_none());
    if label == "unreadable" {
        let warning = resp["warnings"][0].as_str().unwrap();
        assert!(warning.contains("could not read this request"), "{warning}");
    }
}

#[test]
fn an_invalid_image_is_left_alone_with_a_warning() {
    let (answer, m) = decide_edited(|r| {
        r["request"]["object"]["spec"]["containers"][1]["image"] = "Bitnami/Exporter".into();
    });
    assert_eq!(m.images[1].decision.label(), "invalid");
    let warning = answer["response"]["warnings"][0].as_str().unwrap();
    assert!(
        warning.contains("\"Bitnami/Exporter\" left unchanged"),
        "{warning}"
    );
    // The rest of the pod is still rewritten.
    assert!(answer["response"].get("patch").is_some());
}

#[rstest]
#[case::not_json(b"<html>".as_slice(), "not JSON")]
#[case::other_kind(br#"{"kind":"Pod","apiVersion":"v1"}"#.as_slice(), "kind must be AdmissionReview")]
#[case::no_request(br#"{"kind":"AdmissionReview","apiVersion":"admission.k8s.io/v1"}"#.as_slice(), "request.uid is missing")]
fn not_a_review(#[case] body: &[u8], #[case] why: &str) {
    let err = mutate::admit(body, &policy(CONFIG)).unwrap_err();
    assert!(err.to_string().contains(why), "{err}");
}

// --- HTTPS ---

/// A `WebhookServer` running in this test's process on free loopback ports, serving the pair in
/// `certs` (as `scripts/webhook-certs` names it), with `extra` appended to its config. Returns
/// the HTTPS port, the ops port, the sender that stops it, and its task.
async fn run_webhook(
    certs: &Path,
    extra: &str,
) -> (
    u16,
    u16,
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<Result<bool, pullthrough::webhook::WebhookError>>,
) {
    let (port, ops_port) = (free_port(), free_port());
    let config = format!(
        "{CONFIG}listen = \"127.0.0.1:{port}\"\nops_listen = \"127.0.0.1:{ops_port}\"\n\
         cert_file = \"{}\"\nkey_file = \"{}\"\n{extra}",
        certs.join("tls.crt").display(),
        certs.join("tls.key").display()
    );
    let config = Config::from_toml_str(&config, "test.toml").unwrap();
    let server = WebhookServer::new(&config, None, Some("pullthrough")).unwrap();
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .unwrap();
    let ops = tokio::net::TcpListener::bind(("127.0.0.1", ops_port))
        .await
        .unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(server.run(listener, ops, async move {
        let _ = stopped.await;
    }));
    (port, ops_port, stop, running)
}

/// Writes a CA and a serving pair into `dir` with `scripts/webhook-certs` (`extra`: its flags).
pub(crate) fn make_certs(dir: &Path, extra: &[&str]) {
    let out = Command::new(repo_root().join("scripts/webhook-certs"))
        .args(["--out", dir.to_str().unwrap(), "--days", "2"])
        .args(extra)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "webhook-certs: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn pem_cert(path: &Path) -> CertificateDer<'static> {
    CertificateDer::from_pem_file(path).unwrap()
}

/// Opens a TLS connection trusting only `ca`, and returns it with the server's leaf certificate.
pub(crate) async fn connect(
    port: u16,
    ca: &Path,
) -> Result<(TlsStream<TcpStream>, Vec<u8>), String> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(pem_cert(ca)).unwrap();
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let tcp = TcpStream::connect(("127.0.0.1", port))
        .await
        .map_err(|e| e.to_string())?;
    let tls = TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from(SERVICE_NAME).unwrap(), tcp)
        .await
        .map_err(|e| e.to_string())?;
    let leaf = tls.get_ref().1.peer_certificates().unwrap()[0].to_vec();
    Ok((tls, leaf))
}

pub(crate) type Sender = hyper::client::conn::http1::SendRequest<Full<Bytes>>;

pub(crate) async fn http_over(tls: TlsStream<TcpStream>) -> Sender {
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .unwrap();
    tokio::spawn(conn);
    sender
}

pub(crate) async fn post(sender: &mut Sender, path: &str, body: Vec<u8>) -> (StatusCode, Bytes) {
    let req = Request::builder()
        .method(Method::POST)
        .uri(path)
        .header("host", SERVICE_NAME)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body)))
        .unwrap();
    let resp = sender.send_request(req).await.unwrap();
    let status = resp.status();
    (status, resp.into_body().collect().await.unwrap().to_bytes())
}

/// The certificate's notAfter in Unix seconds, as openssl and date(1) read it.
fn openssl_not_after(cert: &Path) -> i64 {
    let out = Command::new("bash")
        .arg("-c")
        .arg(r#"date -u -d "$(openssl x509 -noout -enddate -in "$1" | cut -d= -f2)" +%s"#)
        .arg("-")
        .arg(cert)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

/// Replaces `to` with `from` by rename, as the kubelet updates a mounted Secret.
fn replace_file(from: &Path, to: &Path) {
    let tmp = to.with_extension("new");
    std::fs::copy(from, &tmp).unwrap();
    std::fs::rename(&tmp, to).unwrap();
}

#[tokio::test]
async fn https_mutate_and_certificate_rotation() {
    let dir = tempfile::tempdir().unwrap();
    let (live, first, second) = (
        dir.path().join("live"),
        dir.path().join("first"),
        dir.path().join("second"),
    );
    make_certs(&live, &[]);
    std::fs::create_dir_all(&first).unwrap();
    for f in ["ca.crt", "tls.crt", "tls.key"] {
        std::fs::copy(live.join(f), first.join(f)).unwrap();
    }
    // A rotation by a new CA, so that trusting only the old one tells the certificates apart.
    make_certs(&second, &[]);

    let (port, ops_port, stop, running) = run_webhook(&live, "").await;

    // A real AdmissionReview over HTTPS, the server verified against the test CA.
    let (tls, leaf) = connect(port, &first.join("ca.crt")).await.unwrap();
    assert_eq!(leaf, pem_cert(&first.join("tls.crt")).to_vec());
    let mut old_conn = http_over(tls).await;
    let review = fixture("deployment-pod.json");
    let (status, body) = post(
        &mut old_conn,
        "/mutate",
        serde_json::to_vec(&review).unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let answer: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(
        answer_applied(&review, &answer),
        fixture("deployment-pod.expected.json")
    );

    // Not an AdmissionReview: 400, never 5xx.
    let (status, _) = post(&mut old_conn, "/mutate", b"{}".to_vec()).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);

    // Rotate: key first, then certificate, as two renames (a reader can see the mismatched
    // pair in between, which must not replace the good one).
    replace_file(&second.join("tls.key"), &live.join("tls.key"));
    let (_, leaf) = connect(port, &first.join("ca.crt"))
        .await
        .expect("the previous certificate stays while the new pair is incomplete");
    assert_eq!(leaf, pem_cert(&first.join("tls.crt")).to_vec());
    replace_file(&second.join("tls.crt"), &live.join("tls.crt"));

    // A new handshake gets the new certificate; the old CA no longer verifies it.
    let (tls, leaf) = connect(port, &second.join("ca.crt")).await.unwrap();
    assert_eq!(leaf, pem_cert(&second.join("tls.crt")).to_vec());
    let err = connect(port, &first.join("ca.crt")).await.unwrap_err();
    assert!(err.contains("invalid peer certificate"), "{err}");
    // The connection opened before the rotation still works.
    let (status, _) = post(
        &mut old_conn,
        "/mutate",
        serde_json::to_vec(&review).unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let mut new_conn = http_over(tls).await;
    let (status, _) = post(
        &mut new_conn,
        "/mutate",
        serde_json::to_vec(&review).unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::OK);

    // A broken certificate file: logged, counted, the last good certificate stays.
    std::fs::write(
        live.join("tls.crt.new"),
        b"-----BEGIN CERTIFICATE-----\nnope\n",
    )
    .unwrap();
    std::fs::rename(live.join("tls.crt.new"), live.join("tls.crt")).unwrap();
    let (_, leaf) = connect(port, &second.join("ca.crt")).await.unwrap();
    assert_eq!(leaf, pem_cert(&second.join("tls.crt")).to_vec());

    // Ops: probes and metrics on plain HTTP.
    let health = ops_get(ops_port, "/healthz").await;
    assert_eq!(health.status(), StatusCode::OK);
    let metrics = ops_get(ops_port, "/metrics").await;
    let text = String::from_utf8_lossy(metrics.body()).into_owned();
    for line in [
        "pullthrough_webhook_requests_total{outcome=\"patched\",skip=\"-\"} 3",
        "pullthrough_webhook_requests_total{outcome=\"bad-request\",skip=\"-\"} 1",
        "pullthrough_webhook_patches_total{mode=\"enforce\"} 3",
        "pullthrough_webhook_images_total{result=\"rewritten\"} 18",
        "pullthrough_webhook_images_total{result=\"digest\"} 3",
        "pullthrough_webhook_cert_reloads_total 1",
        "pullthrough_webhook_cert_reload_errors_total 2",
        "pullthrough_webhook_request_duration_seconds_count 4",
    ] {
        assert!(text.contains(line), "metrics lack {line:?}:\n{text}");
    }
    let expiry = format!(
        "pullthrough_webhook_cert_not_after_timestamp_seconds {}",
        openssl_not_after(&second.join("tls.crt"))
    );
    assert!(text.contains(&expiry), "metrics lack {expiry:?}:\n{text}");

    stop.send(()).unwrap();
    drop((old_conn, new_conn));
    assert!(running.await.unwrap().unwrap(), "drained in time");
}

// --- pullthrough webhook / rewrite on the command line ---

fn write_config(dir: &Path, text: &str) -> PathBuf {
    let path = dir.join("pullthrough.toml");
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn webhook_with_a_missing_key_file_exits_64_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    make_certs(dir.path(), &[]);
    let text = format!(
        "{CONFIG}cert_file = \"{}\"\nkey_file = \"{}/missing.key\"\n",
        dir.path().join("tls.crt").display(),
        dir.path().display()
    );
    let path = write_config(dir.path(), &text);
    let out = Command::new(pullthrough_bin())
        .args(["webhook", "--config", path.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!(
            "{}:9: webhook.key_file: {}/missing.key: cannot read",
            path.display(),
            dir.path().display()
        )),
        "{err}"
    );
}

const GOLDEN_IMAGES: &[&str] = &[
    "nginx",
    "library/nginx:1.27",
    "index.docker.io/library/nginx",
    "registry-1.docker.io/nginx",
    "bitnami/redis:7.2",
    "quay.io:443/prometheus/node-exporter:v1.8.2",
    "registry.k8s.io/pause:3.10",
    "ghcr.io/acme/app:V2",
    "redis@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
    "docker.io.evil.example/x",
    "localhost:5000/dev/app",
    "[::1]:5000/app",
    "123456789012.dkr.ecr.eu-west-1.amazonaws.com/docker-hub/library/nginx:latest",
    "999999999999.dkr.ecr.us-east-1.amazonaws.com/team/app:1",
    "acme/internal-agent:2",
    "Nginx",
];

#[rstest]
#[case::text("text", "rewrite.txt")]
#[case::json("json", "rewrite.json")]
fn rewrite_golden_output(#[case] format: &str, #[case] golden: &str) {
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(dir.path(), CONFIG);
    let out = Command::new(pullthrough_bin())
        .args([
            "rewrite",
            "--config",
            path.to_str().unwrap(),
            "--output",
            format,
        ])
        .args(GOLDEN_IMAGES)
        .env_remove("AWS_REGION")
        .env_remove("PULLTHROUGH_CONFIG")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let want_path = repo_root().join("tests/fixtures/rewrite").join(golden);
    let got = String::from_utf8(out.stdout).unwrap();
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::write(&want_path, &got).unwrap();
    }
    let want = std::fs::read_to_string(&want_path).unwrap();
    assert_eq!(got, want, "differs from {want_path:?}");
}

#[test]
fn rewrite_without_a_known_registry_exits_64() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(dir.path(), "");
    let out = Command::new(pullthrough_bin())
        .args(["rewrite", "--config", path.to_str().unwrap(), "nginx"])
        .env_remove("AWS_REGION")
        .env_remove("AWS_DEFAULT_REGION")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("the ECR registry is not known"));
}

#[test]
fn the_manifests_config_is_valid_and_rewrites() {
    let path = repo_root().join("deploy/webhook/pullthrough.toml");
    let out = Command::new(pullthrough_bin())
        .args(["rewrite", "--config", path.to_str().unwrap(), "nginx:1.27"])
        .env_remove("AWS_REGION")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains(
        "ecr:        123456789012.dkr.ecr.us-east-1.amazonaws.com/docker-hub/library/nginx:1.27"
    ));
}

#[tokio::test]
async fn the_webhook_process_serves_skips_its_own_namespace_and_drains_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    make_certs(dir.path(), &[]);
    let (port, ops_port) = (free_port(), free_port());
    let text = format!(
        "{CONFIG}listen = \"127.0.0.1:{port}\"\nops_listen = \"127.0.0.1:{ops_port}\"\n\
         cert_file = \"{}\"\nkey_file = \"{}\"\n",
        dir.path().join("tls.crt").display(),
        dir.path().join("tls.key").display()
    );
    let path = write_config(dir.path(), &text);
    let mut child = ChildGuard::spawn(
        "pullthrough-webhook",
        Command::new(pullthrough_bin())
            .args(["webhook", "--config", path.to_str().unwrap()])
            .env("POD_NAMESPACE", "shop"),
        dir.path(),
    );
    child.wait_for_port(port).await;
    child.wait_for_port(ops_port).await;

    let (tls, _) = connect(port, &dir.path().join("ca.crt")).await.unwrap();
    let mut conn = http_over(tls).await;
    // The deployment pod is in "shop", which POD_NAMESPACE makes the webhook's own.
    let review = fixture("deployment-pod.json");
    let (status, body) = post(&mut conn, "/mutate", serde_json::to_vec(&review).unwrap()).await;
    assert_eq!(status, StatusCode::OK);
    let answer: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(
        answer_applied(&review, &answer),
        review["request"]["object"]
    );
    let (status, _) = post(&mut conn, "/nope", Vec::new()).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    drop(conn);

    let ready = ops_get(ops_port, "/readyz").await;
    assert_eq!(ready.status(), StatusCode::OK);
    let metrics = ops_get(ops_port, "/metrics").await;
    let text = String::from_utf8_lossy(metrics.body()).into_owned();
    assert!(
        text.contains(
            "pullthrough_webhook_requests_total{outcome=\"skipped\",skip=\"namespace\"} 1"
        ),
        "{text}"
    );

    // SIGTERM: /readyz turns 503 so the pod leaves the endpoints, but reviews are still
    // answered until the API server stops dialing this pod (DRAIN_DELAY), then exit 0.
    child.sigterm();
    let readyz = format!("http://127.0.0.1:{ops_port}/readyz");
    let mut ready_status = StatusCode::OK;
    for _ in 0..200 {
        ready_status = crate::support::http::get(&readyz, &[])
            .await
            .unwrap()
            .status();
        if ready_status != StatusCode::OK {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert_eq!(ready_status, StatusCode::SERVICE_UNAVAILABLE);
    let (tls, _) = connect(port, &dir.path().join("ca.crt"))
        .await
        .expect("still accepting while draining");
    let mut conn = http_over(tls).await;
    let review = fixture("deployment-pod.json");
    let (status, body) = post(&mut conn, "/mutate", serde_json::to_vec(&review).unwrap()).await;
    assert_eq!(status, StatusCode::OK);
    let answer: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(answer["response"]["allowed"], true);
    drop(conn);
    let status = child
        .wait_exit(std::time::Duration::from_secs(30))
        .await
        .expect("exits after SIGTERM");
    assert!(status.success(), "{status}: {}", child.stderr());
    assert!(
        connect(port, &dir.path().join("ca.crt")).await.is_err(),
        "the listener is closed after exit"
    );
}

/// `GET path` on the webhook's plain-HTTP ops listener.
async fn ops_get(ops_port: u16, path: &str) -> http::Response<bytes::Bytes> {
    crate::support::http::get(&format!("http://127.0.0.1:{ops_port}{path}"), &[])
        .await
        .unwrap()
}

/// What a second webhook (a service mesh, say) does between two calls: adds a sidecar
/// container, copied from the first one, with a Docker Hub image.
fn add_sidecar(pod: &mut serde_json::Value) {
    let containers = pod["spec"]["containers"].as_array_mut().unwrap();
    let mut sidecar = containers[0].clone();
    sidecar["name"] = "mesh-proxy".into();
    sidecar["image"] = "docker.io/istio/proxyv2:1.24.0".into();
    containers.push(sidecar);
}

/// `[server]` reaches the webhook's listeners: with one connection allowed, a second one to the
/// ops port is refused with 503 while the first is open, as on the mirror.
#[tokio::test]
async fn the_webhook_applies_the_server_connection_limit() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let dir = tempfile::tempdir().unwrap();
    make_certs(dir.path(), &[]);
    let (_, ops_port, stop, running) =
        run_webhook(dir.path(), "\n[server]\nmax_connections = 1\n").await;

    let request = b"GET /healthz HTTP/1.1\r\nHost: webhook\r\n\r\n";
    let guard = std::time::Duration::from_secs(30);
    // The first connection is admitted, and kept open (keep-alive) so it holds the one slot.
    let mut held = TcpStream::connect(("127.0.0.1", ops_port)).await.unwrap();
    held.write_all(request).await.unwrap();
    let mut buf = [0u8; 64];
    let n = tokio::time::timeout(guard, held.read(&mut buf))
        .await
        .unwrap()
        .unwrap();
    let head = String::from_utf8_lossy(&buf[..n]).to_string();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");

    // The second is over the limit: 503, then closed.
    let mut over = TcpStream::connect(("127.0.0.1", ops_port)).await.unwrap();
    over.write_all(request).await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(guard, over.read_to_end(&mut answer))
        .await
        .unwrap()
        .unwrap();
    let answer = String::from_utf8_lossy(&answer).to_string();
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    assert!(answer.contains("UNAVAILABLE"), "{answer}");

    drop(held);
    stop.send(()).unwrap();
    assert!(running.await.unwrap().unwrap(), "drained in time");
}

// --- Cache warming at admission ---

/// An `AdmissionReview` creating a pod in `shop` with one container per image.
fn pod_review(uid: &str, images: &[&str]) -> Value {
    let containers: Vec<Value> = images
        .iter()
        .enumerate()
        .map(|(i, image)| serde_json::json!({"name": format!("c{i}"), "image": image}))
        .collect();
    serde_json::json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": uid,
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "namespace": "shop",
            "operation": "CREATE",
            "userInfo": {"username": "system:serviceaccount:kube-system:replicaset-controller"},
            "object": {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {"generateName": "web-", "namespace": "shop"},
                "spec": {"containers": containers}
            }
        }
    })
}

/// `pullthrough webhook` with warming, as deployed: its own AWS identity (here: moto's API and
/// test credentials in the environment), `ecr.endpoint` at `registry` (a docker-registry, or a
/// server that never answers), `extra` appended to `[webhook]`. Returns it with its HTTPS and
/// ops ports.
async fn spawn_warming_webhook(
    dir: &Path,
    moto: &crate::support::moto::Moto,
    registry: &str,
    extra: &str,
    timeouts: &str,
) -> (ChildGuard, u16, u16) {
    make_certs(dir, &[]);
    let (port, ops_port) = (free_port(), free_port());
    let text = format!(
        "[ecr]\nregion = \"us-east-1\"\nendpoint = \"{registry}\"\n\n\
         [webhook]\nlisten = \"127.0.0.1:{port}\"\nops_listen = \"127.0.0.1:{ops_port}\"\n\
         cert_file = \"{}\"\nkey_file = \"{}\"\n{extra}\n[timeouts]\n{timeouts}\n",
        dir.join("tls.crt").display(),
        dir.join("tls.key").display()
    );
    let path = write_config(dir, &text);
    let mut child = ChildGuard::spawn(
        "pullthrough-webhook",
        crate::support::pullthrough::test_aws_env(
            Command::new(pullthrough_bin())
                .args(["--log-format", "json", "webhook", "--config"])
                .arg(&path),
            &moto.endpoint(),
            "info,aws_config=warn,aws_smithy_runtime=warn",
        )
        .env("POD_NAMESPACE", "pullthrough"),
        dir,
    );
    child.wait_for_port(port).await;
    child.wait_for_port(ops_port).await;
    (child, port, ops_port)
}

/// A warm counter from the webhook's `/metrics`.
async fn warms(ops_port: u16, result: &str) -> f64 {
    let metrics = ops_get(ops_port, "/metrics").await;
    let text = String::from_utf8_lossy(metrics.body()).into_owned();
    let series = format!("pullthrough_webhook_warms_total{{result=\"{result}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&series))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {series} in\n{text}"))
}

/// Polls `warms(result)` until it is `want` (bounded like `support::eventually`).
async fn wait_for_warms(ops_port: u16, result: &str, want: f64) {
    let deadline = tokio::time::Instant::now() + crate::support::EVENTUALLY_TIMEOUT;
    loop {
        let got = warms(ops_port, result).await;
        if got == want {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "warms{{result={result}}} stayed {got}, want {want}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
}

/// Posts `review` on a fresh connection and returns the parsed answer.
async fn admit(port: u16, ca: &Path, review: &Value) -> Value {
    let (tls, _) = connect(port, ca).await.unwrap();
    let mut conn = http_over(tls).await;
    let (status, body) = post(&mut conn, "/mutate", serde_json::to_vec(review).unwrap()).await;
    assert_eq!(status, StatusCode::OK);
    serde_json::from_slice(&body).unwrap()
}

/// In warm mode an admitted `name:tag@digest` pod is admitted unchanged and leads to exactly one
/// GET of the tag through ECR; a second admission of it within `warm_dedupe` leads to none, and
/// images that are not `name:tag@digest` lead to none.
#[tokio::test(flavor = "multi_thread")]
async fn an_admitted_tag_at_digest_pod_is_warmed_once_by_tag() {
    use crate::support::ecr_front::EcrFront;
    use crate::support::image::Image;
    use crate::support::registry::Registry;
    let moto = crate::support::moto::Moto::start().await;
    // ECR as the ECR-like stand-in, importing from an upstream standing in for Docker Hub.
    let ecr = Registry::start(&moto.password()).await;
    let hub = Registry::start_open().await;
    let pinned = Image::small("wh-pinned");
    let other = Image::small("wh-other");
    hub.push("library/pinned", "1", &pinned).await;
    hub.push("library/other", "1", &other).await;
    let front = EcrFront::with_upstreams(&ecr, &[("docker-hub", &hub)]).await;
    let dir = tempfile::tempdir().unwrap();
    // One worker: warms run in queue order, so once a later one is done, an earlier one that
    // was queued is done too.
    let (_webhook, port, ops_port) = spawn_warming_webhook(
        dir.path(),
        &moto,
        &front.base_url(),
        "mode = \"warm\"\nwarm_workers = 1\n",
        "response_headers = \"10s\"",
    )
    .await;
    let ca = dir.path().join("ca.crt");
    assert_eq!(
        warms(ops_port, "queued").await,
        0.0,
        "every series from the start"
    );

    let image = format!("pinned:1@{}", pinned.digest());
    let review = pod_review(
        "warm-1",
        &[
            &image,
            "nginx:1.27",
            &format!("busybox@{}", pinned.digest()),
            &format!("registry.example.com/org/app:1@{}", pinned.digest()),
        ],
    );
    let answer = admit(port, &ca, &review).await;
    // Warm mode never changes the pod.
    assert_eq!(
        answer_applied(&review, &answer),
        review["request"]["object"]
    );
    // Queued before the answer was sent: only the one name:tag@digest image on an upstream.
    assert_eq!(warms(ops_port, "queued").await, 1.0);
    wait_for_warms(ops_port, "warmed", 1.0).await;
    let tag = "/v2/docker-hub/library/pinned/manifests/1";
    let warm = front.wait_for_ecr("GET", tag).await;
    assert_eq!(
        (warm.status, warm.tag_check.as_deref()),
        (Some(200), Some("imported")),
        "{}",
        front.log_text()
    );
    // Then ECR serves the pinned digest, which the pod's pull asks for.
    let by_digest = format!(
        "/v2/docker-hub/library/pinned/manifests/{}",
        pinned.digest()
    );
    assert_eq!(
        front.wait_for_ecr("GET", &by_digest).await.status,
        Some(200)
    );

    // The same image again (another pod of the Deployment): nothing queued.
    admit(port, &ca, &pod_review("warm-2", &[&image])).await;
    assert_eq!(warms(ops_port, "queued").await, 1.0);
    // Had it been queued, it would be warmed before this one.
    let second = format!("other:1@{}", other.digest());
    admit(port, &ca, &pod_review("warm-3", &[&second])).await;
    wait_for_warms(ops_port, "warmed", 2.0).await;
    front
        .wait_for_ecr("GET", "/v2/docker-hub/library/other/manifests/1")
        .await;
    let seen: Vec<(String, String)> = front
        .ecr_requests()
        .into_iter()
        .map(|r| (r.method, r.path))
        .collect();
    let tag_gets = seen.iter().filter(|(m, p)| m == "GET" && p == tag).count();
    assert_eq!(tag_gets, 1, "{seen:?}");
    assert_eq!(
        front.imports(),
        ["docker-hub/library/pinned:1", "docker-hub/library/other:1"],
        "{}",
        front.log_text()
    );
    // Nothing for the other images, and never a blob.
    assert!(
        seen.iter()
            .all(|(_, p)| p.contains("/pinned/manifests/") || p.contains("/other/manifests/")),
        "{seen:?}"
    );
    assert_eq!(warms(ops_port, "failed").await, 0.0);
    assert_eq!(warms(ops_port, "dropped").await, 0.0);
}

/// A registry endpoint that never answers, and records in `events`, in order, each request
/// line it reads (`request GET /v2/…`) and each connection the client closes (`closed GET …`).
/// The test adds its own events to the same list, so their order is observable.
struct HangingEcr {
    url: String,
    events: Arc<std::sync::Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl HangingEcr {
    async fn start() -> HangingEcr {
        use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0))
            .await
            .unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let events: Arc<std::sync::Mutex<Vec<String>>> = Arc::default();
        let log = Arc::clone(&events);
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let log = Arc::clone(&log);
                tokio::spawn(async move {
                    let mut reader = BufReader::new(stream);
                    let mut line = String::new();
                    if reader.read_line(&mut line).await.unwrap_or(0) == 0 {
                        return;
                    }
                    let request = line.split(" HTTP/").next().unwrap_or("").to_owned();
                    log.lock().unwrap().push(format!("request {request}"));
                    // Never answered; read until the client gives up.
                    let mut rest = Vec::new();
                    let _ = reader.read_to_end(&mut rest).await;
                    log.lock().unwrap().push(format!("closed {request}"));
                });
            }
        });
        HangingEcr { url, events, task }
    }

    fn push(&self, event: &str) {
        self.events.lock().unwrap().push(event.to_owned());
    }

    fn events(&self) -> Vec<String> {
        self.events.lock().unwrap().clone()
    }
}

impl Drop for HangingEcr {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Admission never waits for a warm: while the only worker's warm hangs on ECR, pods are
/// admitted; the next warm waits in the queue (of 1), and the one after is dropped and counted.
/// Shown by order, not time: each answer arrives after ECR took the hanging request and before
/// the webhook gave up on it.
#[tokio::test(flavor = "multi_thread")]
async fn admission_answers_while_the_ecr_side_hangs_and_a_full_queue_drops() {
    let moto = crate::support::moto::Moto::start().await;
    let ecr = HangingEcr::start().await;
    let dir = tempfile::tempdir().unwrap();
    let (_webhook, port, ops_port) = spawn_warming_webhook(
        dir.path(),
        &moto,
        &ecr.url,
        // Enforce mode with warming on: the rewrite still happens.
        "warm = true\nwarm_workers = 1\nwarm_queue = 1\n",
        "response_headers = \"1h\"",
    )
    .await;
    let ca = dir.path().join("ca.crt");
    const SHA: &str = "sha256:aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";

    let a = format!("a:1@{SHA}");
    admit(port, &ca, &pod_review("hang-a", &[&a])).await;
    ecr.push("answered a");
    crate::support::eventually("the warm of a:1 at ECR", || {
        ecr.events()
            .contains(&"request GET /v2/docker-hub/library/a/manifests/1".to_owned())
            .then_some(())
    })
    .await;

    let b = format!("b:1@{SHA}");
    let answer = admit(port, &ca, &pod_review("hang-b", &[&b, "nginx:1.27"])).await;
    ecr.push("answered b");
    // Enforce mode still patches (the tag-only image), whatever warming does.
    assert!(answer["response"]["patch"].is_string(), "{answer}");
    admit(port, &ca, &pod_review("hang-c", &[&format!("c:1@{SHA}")])).await;
    ecr.push("answered c");

    let events = ecr.events();
    let at = |e: &str| {
        events
            .iter()
            .position(|x| x == e)
            .unwrap_or_else(|| panic!("no {e:?} in {events:?}"))
    };
    let held = at("request GET /v2/docker-hub/library/a/manifests/1");
    assert!(
        held < at("answered b") && at("answered b") < at("answered c"),
        "{events:?}"
    );
    assert!(
        !events.iter().any(|e| e.starts_with("closed")),
        "the warm of a:1 was still held open: {events:?}"
    );
    // One request reached ECR: b waits in the queue, c did not fit.
    assert_eq!(
        events.iter().filter(|e| e.starts_with("request")).count(),
        1,
        "{events:?}"
    );
    assert_eq!(warms(ops_port, "queued").await, 2.0);
    assert_eq!(warms(ops_port, "dropped").await, 1.0);
    assert_eq!(warms(ops_port, "warmed").await, 0.0);
}
