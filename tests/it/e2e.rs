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
