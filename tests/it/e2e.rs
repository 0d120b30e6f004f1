//! End to end: a real containerd pulls through pullthrough, using the `hosts.toml` files that
//! `pullthrough hosts` wrote, through the kubelet's path (CRI `PullImage`) and through
//! `ctr images pull --hosts-dir`. Every `server` in those files is a dead loopback port, so a
//! pull can only succeed through the mirror, and a broken test can never reach the internet.

use crate::support::containerd::Containerd;
use crate::support::image::Image;
use crate::support::moto::Moto;
use crate::support::pullthrough::{Options, Pullthrough};
use crate::support::registry::Registry;
use crate::support::short_tempdir;

struct Case {
    reference: &'static str,
    repository: &'static str,
    tag: &'static str,
    image: Image,
}

#[tokio::test]
async fn containerd_pulls_every_image_through_pullthrough() {
    let moto = Moto::start().await;
    let registry = Registry::start(&moto.password()).await;
    let cases = vec![
        Case {
            reference: "docker.io/library/alpine:3.19",
            repository: "docker-hub/library/alpine",
            tag: "3.19",
            image: Image::small("alpine"),
        },
        Case {
            reference: "docker.io/someorg/app:1",
            repository: "docker-hub/someorg/app",
            tag: "1",
            image: Image::small("someorg-app"),
        },
        Case {
            reference: "quay.io/prometheus/node-exporter:v1",
            repository: "quay/prometheus/node-exporter",
            tag: "v1",
            image: Image::small("node-exporter"),
        },
        Case {
            reference: "registry.k8s.io/pause:3.9",
            repository: "kubernetes/pause",
            tag: "3.9",
            image: Image::small("pause"),
        },
        Case {
            reference: "docker.io/library/multi:1",
            repository: "docker-hub/library/multi",
            tag: "1",
            image: Image::multi_arch("multi"),
        },
    ];
    for c in &cases {
        registry.push(c.repository, c.tag, &c.image).await;
    }
    registry.clear_requests();

    let (opts, dead) = Options::with_dead_servers(&registry.base_url(), &moto.endpoint());
    let pt = Pullthrough::start(opts).await;

    // `pullthrough hosts` writes containerd's certs.d.
    let certs = short_tempdir("certs");
    pt.write_hosts(certs.path()).unwrap();
    for reg in ["docker.io", "quay.io", "registry.k8s.io"] {
        let text = std::fs::read_to_string(certs.path().join(reg).join("hosts.toml")).unwrap();
        assert!(text.contains(&format!("server = \"{dead}\"")), "{text}");
        assert!(text.contains(&format!("[host.\"{}\"]", pt.url())), "{text}");
    }

    let containerd = Containerd::start(certs.path()).await;
    for c in &cases {
        // The kubelet's path.
        containerd
            .pull_image(c.reference)
            .await
            .unwrap_or_else(|e| {
                panic!(
                    "CRI pull {}: {e}\npullthrough log:\n{}",
                    c.reference,
                    pt.log()
                )
            });
        let digest = containerd.image_digest(c.reference).await.unwrap();
        assert_eq!(
            digest.as_deref(),
            Some(c.image.digest()),
            "CRI {}",
            c.reference
        );
        containerd.remove_image(c.reference).await.unwrap();

        // ctr with the same hosts directory.
        containerd
            .ctr_pull(c.reference, certs.path())
            .await
            .unwrap_or_else(|e| panic!("ctr pull {}: {e}", c.reference));
        let digest = containerd.ctr_image_digest(c.reference).await.unwrap();
        assert_eq!(
            digest.as_deref(),
            Some(c.image.digest()),
            "ctr {}",
            c.reference
        );
    }

    // What the ECR stand-in saw: the pull-through paths, `library/` only for official images.
    let seen = registry.paths_seen();
    for c in &cases {
        let by_tag = format!("/v2/{}/manifests/{}", c.repository, c.tag);
        assert!(seen.contains(&by_tag), "{by_tag} not in {seen:?}");
        let amd64 = c.image.manifest_for("amd64").unwrap();
        for layer in &amd64.layers {
            let blob = format!("/v2/{}/blobs/{}", c.repository, layer.digest);
            assert!(seen.contains(&blob), "{blob} not in {seen:?}");
        }
        if let Some(arm) = c.image.manifest_for("arm64").filter(|_| c.image.is_index()) {
            assert!(
                !seen.iter().any(|p| p.contains(arm.digest())),
                "arm64 was fetched: {seen:?}"
            );
        }
    }
    assert!(seen.iter().all(|p| !p.contains("ns=")), "{seen:?}");
    assert!(
        !seen.iter().any(|p| p.contains("/library/someorg/")),
        "{seen:?}"
    );
    assert!(
        !seen.iter().any(|p| p.contains("/quay/library/")),
        "{seen:?}"
    );
    assert!(
        registry.requests().iter().all(|(_, _, st)| *st < 400),
        "{:?}",
        registry.requests()
    );

    // Every request containerd made was answered by the mirror with a success.
    let log = pt.access_log();
    assert!(!log.is_empty());
    let failed: Vec<_> = log
        .iter()
        .filter(|l| l["status"].as_u64().unwrap_or(0) >= 400)
        .collect();
    assert!(failed.is_empty(), "{failed:?}");
}

/// The node lifecycle with a real containerd: a certs.d that already has a hand-written
/// `hosts.toml` (pointing at a second local registry that plays the real upstream), then
/// install, pull through the mirror, remove, and pull again straight from that upstream.
#[tokio::test]
async fn install_pull_remove_restores_the_node_and_pulls_go_upstream() {
    let moto = Moto::start().await;
    let ecr = Registry::start(&moto.password()).await;
    let upstream = Registry::start_open().await;
    let image = Image::small("app");
    ecr.push("quay/org/app", "1", &image).await;
    upstream.push("org/app", "1", &image).await;
    ecr.clear_requests();
    upstream.clear_requests();

    let (opts, _dead) = Options::with_dead_servers(&ecr.base_url(), &moto.endpoint());
    let mut pt = Pullthrough::start(opts).await;
    let certs = short_tempdir("certs");
    let hand = format!(
        "# Written by hand, long before pullthrough.\nserver = \"{}\"\n\n[host.\"{}\"]\n  capabilities = [\"pull\", \"resolve\"]\n",
        upstream.base_url(),
        upstream.base_url()
    );
    std::fs::create_dir_all(certs.path().join("quay.io")).unwrap();
    std::fs::write(certs.path().join("quay.io/hosts.toml"), &hand).unwrap();
    let before = std::fs::read_dir(certs.path()).unwrap().count();

    let out = pt.write_hosts(certs.path()).unwrap();
    assert!(out.contains("quay.io/hosts.toml: merged"), "{out}");
    let containerd = Containerd::start(certs.path()).await;

    // Installed: the pull goes through the mirror to the ECR stand-in.
    let reference = "quay.io/org/app:1";
    containerd.pull_image(reference).await.unwrap();
    assert_eq!(
        containerd.image_digest(reference).await.unwrap().as_deref(),
        Some(image.digest())
    );
    assert!(
        ecr.paths_seen()
            .contains(&"/v2/quay/org/app/manifests/1".to_string()),
        "{:?}",
        ecr.paths_seen()
    );
    assert!(
        upstream.paths_seen().is_empty(),
        "{:?}",
        upstream.paths_seen()
    );
    containerd.remove_image(reference).await.unwrap();

    // Removed: the hand-written file is back, byte for byte, and nothing else is left.
    let dir = certs.path().as_os_str();
    crate::support::pullthrough_ok(["hosts".as_ref(), "--remove".as_ref(), "--dir".as_ref(), dir]);
    assert_eq!(
        std::fs::read_to_string(certs.path().join("quay.io/hosts.toml")).unwrap(),
        hand
    );
    assert_eq!(std::fs::read_dir(certs.path()).unwrap().count(), before);
    assert_eq!(
        std::fs::read_dir(certs.path().join("quay.io"))
            .unwrap()
            .count(),
        1
    );

    // The next pull goes straight to the upstream; the mirror and ECR see nothing.
    ecr.clear_requests();
    let mirror_requests = pt.access_log().len();
    containerd.pull_image(reference).await.unwrap();
    assert_eq!(
        containerd.image_digest(reference).await.unwrap().as_deref(),
        Some(image.digest())
    );
    assert_saw_tag(&upstream);
    assert!(ecr.paths_seen().is_empty(), "{:?}", ecr.paths_seen());
    assert_eq!(pt.access_log().len(), mirror_requests);

    containerd.remove_image(reference).await.unwrap();

    // Installed again, and the mirror dies: the merged file's own hosts still serve the pull.
    let out = pt.write_hosts(certs.path()).unwrap();
    assert!(out.contains("quay.io/hosts.toml: merged"), "{out}");
    pt.kill();
    upstream.clear_requests();
    containerd.pull_image(reference).await.unwrap();
    assert_saw_tag(&upstream);
}

/// The upstream registry was asked for `org/app:1`. The hand-written hosts.toml lists it as a
/// mirror host too, so containerd may add `?ns=`.
fn assert_saw_tag(upstream: &Registry) {
    let seen = upstream.paths_seen();
    assert!(
        seen.iter()
            .any(|p| p.starts_with("/v2/org/app/manifests/1")),
        "{seen:?}"
    );
}

/// CRI-O and podman use containers/image, as skopeo does: a pull by the plain image name goes
/// through the mirror with the `registries.conf` drop-in that `pullthrough hosts --format
/// registries-conf` prints. skopeo 1.9 ignores CONTAINERS_REGISTRIES_CONF, so the file goes in
/// `$HOME/.config/containers/registries.conf`.
#[tokio::test]
async fn skopeo_pulls_through_the_registries_conf_drop_in() {
    let moto = Moto::start().await;
    let ecr = Registry::start(&moto.password()).await;
    let image = Image::small("app");
    ecr.push("quay/org/app", "1", &image).await;
    ecr.push("docker-hub/library/alpine", "3.19", &image).await;
    let (opts, dead) = Options::with_dead_servers(&ecr.base_url(), &moto.endpoint());
    let pt = Pullthrough::start(opts).await;

    let config = pt.config_path().as_os_str();
    let conf = crate::support::pullthrough_ok([
        "hosts".as_ref(),
        "--format".as_ref(),
        "registries-conf".as_ref(),
        "--config".as_ref(),
        config,
    ]);
    // If the mirror failed, skopeo would go to `location`: a dead loopback port, never the internet.
    assert!(
        conf.contains(&format!(
            "location = \"{}\"",
            dead.trim_start_matches("http://")
        )),
        "{conf}"
    );
    let home = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(home.path().join(".config/containers")).unwrap();
    std::fs::write(
        home.path().join(".config/containers/registries.conf"),
        &conf,
    )
    .unwrap();

    for (reference, path) in [
        ("quay.io/org/app:1", "/v2/quay/org/app/manifests/1"),
        // Short Docker Hub names are normalized by containers/image itself.
        (
            "docker.io/alpine:3.19",
            "/v2/docker-hub/library/alpine/manifests/3.19",
        ),
    ] {
        let dest = home.path().join(reference.replace(['/', ':'], "_"));
        let out = std::process::Command::new("skopeo")
            .args(["copy", "--retry-times=0"])
            .arg(format!("docker://{reference}"))
            .arg(format!("dir:{}", dest.display()))
            .env("HOME", home.path())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{reference}: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            pt.log()
        );
        let manifest = std::fs::read(dest.join("manifest.json")).unwrap();
        assert_eq!(crate::support::sha256_digest(&manifest), image.digest());
        assert!(
            ecr.paths_seen().contains(&path.to_string()),
            "{path} not in {:?}",
            ecr.paths_seen()
        );
    }
}
