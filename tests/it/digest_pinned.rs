//! Digest-pinned images end to end: what ECR's pull-through cache does with them, and how
//! `pullthrough ecr warm --from-pods` makes them cacheable.
//!
//! ECR imports an image only on a pull by tag, and containerd pulls `name:tag@digest` by digest
//! alone, so such an image never enters the cache by its own pulls. Here the ECR-like stand-in
//! ([`EcrFront`]) behaves as ECR does, the system containerd (1.6) pulls through the kubelet's
//! path (CRI `PullImage`), and every `hosts.toml` `server` is a dead loopback port: a pull that
//! falls back fails, and one that succeeds came through pullthrough.

use std::process::Command;

use crate::support::containerd::Containerd;
use crate::support::ecr_front::EcrFront;
use crate::support::image::Image;
use crate::support::moto::Moto;
use crate::support::pullthrough::{Options, Pullthrough};
use crate::support::registry::Registry;
use crate::support::{eventually, pullthrough_bin, short_tempdir};

const DIGEST_MISSES: &str = "pullthrough_digest_misses_total{registry=\"docker.io\"}";

/// `kubectl get pods -A -o json` for one pod running `image` (as an init container too, so the
/// document names it twice).
fn pod_list(image: &str) -> String {
    serde_json::json!({
        "apiVersion": "v1",
        "kind": "List",
        "metadata": {"resourceVersion": ""},
        "items": [{
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "web-7c9f6d8b5d-x2x9z", "namespace": "shop"},
            "spec": {
                "initContainers": [{"name": "init", "image": image}],
                "containers": [{"name": "web", "image": image}]
            },
            "status": {"phase": "Pending"}
        }]
    })
    .to_string()
}

/// Before: a digest-pinned CRI pull misses ECR (404), falls back (to a dead `server`, so it
/// fails) and counts a digest miss. `ecr warm --from-pods` on the cluster's pod list pulls the
/// tag through ECR, which imports the image. After: the same CRI pull by digest is served through
/// pullthrough from ECR, with no request to the upstream registry.
#[tokio::test(flavor = "multi_thread")]
async fn a_digest_pinned_pull_is_served_from_ecr_after_warm_from_pods() {
    let moto = Moto::start().await;
    let ecr = Registry::start(&moto.password()).await;
    // Docker Hub as ECR's rule reaches it. Only the stand-in's imports reach it.
    let hub = Registry::start_open().await;
    let image = Image::multi_arch("pinned-e2e");
    hub.push("library/pinned", "1", &image).await;
    hub.clear_requests();
    let front = EcrFront::with_upstreams(&ecr, &[("docker-hub", &hub)]).await;

    let (opts, dead) = Options::with_dead_servers(&front.base_url(), &moto.endpoint());
    let pt = Pullthrough::start(opts).await;
    let certs = short_tempdir("certs");
    pt.write_hosts(certs.path()).unwrap();
    let hosts = std::fs::read_to_string(certs.path().join("docker.io/hosts.toml")).unwrap();
    assert!(hosts.contains(&format!("server = \"{dead}\"")), "{hosts}");
    let containerd = Containerd::start(certs.path()).await;

    let pinned = format!("docker.io/library/pinned:1@{}", image.digest());
    let by_digest = format!("/v2/docker-hub/library/pinned/manifests/{}", image.digest());

    // Before: ECR has never seen the tag, so the digest is missing there; containerd falls back
    // to the dead `server` and the pull fails.
    let err = containerd
        .pull_image(&pinned)
        .await
        .expect_err("a digest ECR never imported cannot come through the mirror");
    let misses = front
        .ecr_requests()
        .into_iter()
        .filter(|r| r.path == by_digest && r.status == Some(404))
        .count();
    assert!(misses >= 1, "{err}\n{}", front.log_text());
    let counted = pt.metric(DIGEST_MISSES).await.unwrap_or(0.0);
    assert!(counted >= 1.0, "{}", pt.log());
    assert!(front.imports().is_empty(), "{}", front.log_text());
    assert!(front.upstream_requests().is_empty(), "{}", front.log_text());

    // Warm: the pod list, through the same config as the mirror's.
    let dir = tempfile::tempdir().unwrap();
    let pods = dir.path().join("pods.json");
    std::fs::write(&pods, pod_list(&pinned)).unwrap();
    let out = crate::support::pullthrough::test_aws_env(
        Command::new(pullthrough_bin())
            .args(["ecr", "warm", "--config"])
            .arg(pt.config_path())
            .arg("--from-pods")
            .arg(&pods),
        &moto.endpoint(),
        "warm",
    )
    .output()
    .unwrap();
    let report = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{report}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        report.contains(&format!("{pinned}  docker-hub/library/pinned  "))
            && report.contains("ok (index, 2 platform manifests); pinned digest cached"),
        "{report}"
    );
    assert!(
        report.ends_with("1 of 1 images warmed, 4 manifests fetched.\n"),
        "{report}"
    );
    // The warm's tag GET is what made ECR import the image: once.
    assert_eq!(
        front.imports(),
        ["docker-hub/library/pinned:1"],
        "{}",
        front.log_text()
    );

    // After: the same pull by digest, served through pullthrough from ECR.
    front.clear_log();
    hub.clear_requests();
    let upstream_before = hub.requests().len();
    containerd
        .pull_image(&pinned)
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}\n{}", front.log_text(), pt.log()));
    assert_eq!(
        containerd.image_digest(&pinned).await.unwrap().as_deref(),
        Some(image.digest())
    );
    let served = front.wait_for_ecr("GET", &by_digest).await;
    assert_eq!(served.status, Some(200), "{}", front.log_text());
    // Through the mirror: the index and this platform's manifest, by digest, answered 200 (the
    // access log also holds the 404s of the pull before the warm).
    let amd64 = image.manifest_for("amd64").unwrap();
    let platform = format!("/v2/docker-hub/library/pinned/manifests/{}", amd64.digest());
    for path in [&by_digest, &platform] {
        eventually(
            &format!("a 200 for {path} in the mirror's access log"),
            || {
                pt.access_log()
                    .into_iter()
                    .find(|l| l["upstream_path"] == path.as_str() && l["status"] == 200)
            },
        )
        .await;
    }
    // Its layers came from ECR's S3 side.
    let layers = front.s3_blobs("docker-hub/library/pinned");
    for blob in amd64.blobs() {
        assert!(layers.contains(&blob.digest), "{layers:?}");
    }
    // No upstream request: not by the front (no import, no re-check), none at the hub.
    assert!(front.upstream_requests().is_empty(), "{}", front.log_text());
    assert_eq!(
        hub.requests().len(),
        upstream_before,
        "{:?}",
        hub.requests()
    );
    // And no new digest miss.
    assert_eq!(pt.metric(DIGEST_MISSES).await.unwrap_or(0.0), counted);
}
