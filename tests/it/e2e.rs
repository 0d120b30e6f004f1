//! End to end: a real containerd of each version EKS nodes run (1.6, 1.7, 2.1) pulls through
//! pullthrough, using the `hosts.toml` files that `pullthrough hosts` wrote, through the kubelet's
//! path (CRI `PullImage`) and through `ctr images pull --hosts-dir`. Every `server` in those files
//! is a dead loopback port, so a pull can only succeed through the mirror, and a broken test can
//! never reach the internet (the containerd 2.1 bypass test is the one exception, and says why).
//!
//! ECR is the ECR-like stand-in ([`EcrFront`]): it imports an image on its first pull by tag from
//! the registry its rule points at, answers 404 for a digest it never imported, and answers blob
//! GETs with a 307 to an S3-like server, as ECR's pull-through cache does.

use std::collections::BTreeSet;

use rstest::rstest;

use crate::support::containerd::{Containerd, ContainerdOptions, ContainerdVersion};
use crate::support::ecr_front::EcrFront;
use crate::support::image::Image;
use crate::support::moto::Moto;
use crate::support::pullthrough::{Options, Pullthrough, TEST_TIMEOUTS, upstreams_toml};
use crate::support::registry::Registry;
use crate::support::{eventually, short_tempdir};

struct Case {
    reference: &'static str,
    /// The repository in ECR (`<prefix>/<upstream repository>`).
    repository: &'static str,
    /// The repository on the upstream registry ECR's rule imports from.
    upstream: &'static str,
    tag: &'static str,
    image: Image,
}

fn cases() -> Vec<Case> {
    vec![
        Case {
            reference: "docker.io/library/alpine:3.19",
            repository: "docker-hub/library/alpine",
            upstream: "library/alpine",
            tag: "3.19",
            image: Image::small("alpine"),
        },
        Case {
            reference: "docker.io/someorg/app:1",
            repository: "docker-hub/someorg/app",
            upstream: "someorg/app",
            tag: "1",
            image: Image::small("someorg-app"),
        },
        Case {
            reference: "quay.io/prometheus/node-exporter:v1",
            repository: "quay/prometheus/node-exporter",
            upstream: "prometheus/node-exporter",
            tag: "v1",
            image: Image::small("node-exporter"),
        },
        Case {
            reference: "registry.k8s.io/pause:3.9",
            repository: "kubernetes/pause",
            upstream: "pause",
            tag: "3.9",
            image: Image::small("pause"),
        },
        Case {
            reference: "docker.io/library/multi:1",
            repository: "docker-hub/library/multi",
            upstream: "library/multi",
            tag: "1",
            image: Image::multi_arch("multi"),
        },
    ]
}

const DIGEST_MISSES: &str = "pullthrough_digest_misses_total{registry=\"docker.io\"}";

#[rstest]
#[case::containerd_1_6(ContainerdVersion::V1_6)]
#[case::containerd_1_7(ContainerdVersion::V1_7)]
#[case::containerd_2_1(ContainerdVersion::V2_1)]
#[tokio::test]
async fn containerd_pulls_every_image_through_pullthrough(#[case] version: ContainerdVersion) {
    let moto = Moto::start().await;
    let ecr = Registry::start(&moto.password()).await;
    // Docker Hub, quay.io and registry.k8s.io as ECR's pull-through rules reach them: one open
    // registry (no repository names collide here). Nothing else reaches it: every `server` is dead.
    let hub = Registry::start_open().await;
    let cases = cases();
    for c in &cases {
        hub.push(c.upstream, c.tag, &c.image).await;
    }
    let pinned_image = Image::small("digest-first");
    hub.push("library/pinned", "1", &pinned_image).await;
    hub.clear_requests();
    let front = EcrFront::with_upstreams(
        &ecr,
        &[("docker-hub", &hub), ("quay", &hub), ("kubernetes", &hub)],
    )
    .await;

    let (opts, dead) = Options::with_dead_servers(&front.base_url(), &moto.endpoint());
    let pt = Pullthrough::start(opts).await;

    // `pullthrough hosts` writes containerd's certs.d.
    let certs = short_tempdir("certs");
    pt.write_hosts(certs.path()).unwrap();
    for reg in ["docker.io", "quay.io", "registry.k8s.io"] {
        let text = std::fs::read_to_string(certs.path().join(reg).join("hosts.toml")).unwrap();
        assert!(text.contains(&format!("server = \"{dead}\"")), "{text}");
        assert!(text.contains(&format!("[host.\"{}\"]", pt.url())), "{text}");
    }

    let containerd = Containerd::start_version(version, certs.path()).await;

    // Digest first: ECR's pull-through cache imports by tag only, so a digest never pulled by
    // tag is missing there, whatever the upstream has. The mirror answers 404, containerd falls
    // back to `server` (dead here), and the pull fails; the mirror counts the miss.
    let pinned = format!("docker.io/library/pinned@{}", pinned_image.digest());
    let err = containerd
        .pull_image(&pinned)
        .await
        .expect_err("a digest ECR never imported cannot come through the mirror");
    let by_digest = format!(
        "/v2/docker-hub/library/pinned/manifests/{}",
        pinned_image.digest()
    );
    let missed = crate::support::try_eventually(|| {
        front
            .ecr_requests()
            .iter()
            .any(|r| r.path == by_digest && r.status == Some(404))
            .then_some(())
    })
    .await;
    assert!(missed.is_some(), "{err}\n{}", front.log_text());
    assert!(front.upstream_requests().is_empty(), "{}", front.log_text());
    assert!(
        pt.metric(DIGEST_MISSES).await.unwrap_or(0.0) >= 1.0,
        "{}",
        pt.log()
    );
    // A pull by tag imports it; from then on the digest resolves in ECR.
    containerd
        .pull_image("docker.io/library/pinned:1")
        .await
        .unwrap_or_else(|e| panic!("{version}: {e}\n{}", front.log_text()));
    containerd
        .remove_image("docker.io/library/pinned:1")
        .await
        .unwrap();
    containerd
        .pull_image(&pinned)
        .await
        .unwrap_or_else(|e| panic!("{version}: {e}\n{}", front.log_text()));
    assert_eq!(
        containerd.image_digest(&pinned).await.unwrap().as_deref(),
        Some(pinned_image.digest())
    );

    for c in &cases {
        // The kubelet's path.
        containerd
            .pull_image(c.reference)
            .await
            .unwrap_or_else(|e| {
                panic!(
                    "{version}: CRI pull {}: {e}\npullthrough log:\n{}\necr-front log:\n{}",
                    c.reference,
                    pt.log(),
                    front.log_text()
                )
            });
        let digest = containerd.image_digest(c.reference).await.unwrap();
        assert_eq!(
            digest.as_deref(),
            Some(c.image.digest()),
            "{version}: CRI {}",
            c.reference
        );
        containerd.remove_image(c.reference).await.unwrap();

        // ctr of the same version with the same hosts directory.
        containerd
            .ctr_pull(c.reference, certs.path())
            .await
            .unwrap_or_else(|e| panic!("{version}: ctr pull {}: {e}", c.reference));
        let digest = containerd.ctr_image_digest(c.reference).await.unwrap();
        assert_eq!(
            digest.as_deref(),
            Some(c.image.digest()),
            "{version}: ctr {}",
            c.reference
        );
    }

    // What ECR saw: the pull-through paths, `library/` only for official images, each image
    // imported once (on its first pull by tag), blobs fetched from S3 without a credential.
    let seen: Vec<String> = front.ecr_requests().into_iter().map(|r| r.path).collect();
    let mut want_imports: BTreeSet<String> = cases
        .iter()
        .map(|c| format!("{}:{}", c.repository, c.tag))
        .collect();
    want_imports.insert("docker-hub/library/pinned:1".to_owned());
    let imports = eventually("every import in the front's log", || {
        let i = front.imports();
        (i.len() >= want_imports.len()).then_some(i)
    })
    .await;
    assert_eq!(imports.len(), want_imports.len(), "{imports:?}");
    assert_eq!(imports.into_iter().collect::<BTreeSet<_>>(), want_imports);
    for c in &cases {
        let by_tag = format!("/v2/{}/manifests/{}", c.repository, c.tag);
        assert!(seen.contains(&by_tag), "{by_tag} not in {seen:?}");
        let amd64 = c.image.manifest_for("amd64").unwrap();
        let from_s3 = front.s3_blobs(c.repository);
        for blob in amd64.blobs() {
            assert!(
                from_s3.contains(&blob.digest),
                "{}: {from_s3:?}",
                blob.digest
            );
        }
        // Only this machine's platform (amd64) is pulled: the arm64 layer never. containerd 2.1's
        // ctr (the transfer service) also fetches the other platforms' manifests and configs
        // (metadata, no layers); 1.6, 1.7 and CRI fetch nothing of arm64.
        if let Some(arm) = c.image.manifest_for("arm64").filter(|_| c.image.is_index()) {
            for layer in &arm.layers {
                assert!(
                    !seen.iter().any(|p| p.contains(&layer.digest)),
                    "{version}: the arm64 layer was fetched: {seen:?}"
                );
            }
            if version != ContainerdVersion::V2_1 {
                assert!(
                    !seen.iter().any(|p| p.contains(arm.digest())),
                    "{version}: the arm64 manifest was fetched: {seen:?}"
                );
            }
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
    let s3 = front.s3_requests();
    assert!(!s3.is_empty());
    assert!(
        s3.iter().all(|r| !r.authorization && r.status == Some(200)),
        "{s3:?}"
    );
    // Every request the upstream registry saw was one of ECR's imports.
    let upstream_requests = front.upstream_requests().len();
    eventually("the upstream's access log", || {
        (hub.requests().len() == upstream_requests).then_some(())
    })
    .await;

    // Every request containerd made was answered by the mirror with a success, but for the
    // digest ECR did not have yet.
    let log = pt.access_log();
    assert!(!log.is_empty());
    let failed: Vec<_> = log
        .iter()
        .filter(|l| l["status"].as_u64().unwrap_or(0) >= 400)
        // containerd asks for a digest it cannot resolve as a manifest as a blob too.
        .filter(|l| {
            !l["upstream_path"]
                .as_str()
                .is_some_and(|p| p.ends_with(pinned_image.digest()))
        })
        .collect();
    assert!(failed.is_empty(), "{failed:?}");
}

/// containerd 2.1 pulls through its transfer service, which reads a colon-separated
/// `config_path` as one directory: with `"<certs.d>:/etc/docker/certs.d"` (EKS AL2023's list) and
/// otherwise default settings it never finds a hosts.toml, and every pull skips the mirror
/// silently. A setting that forces the older local pull (AL2023's `discard_unpacked_layers =
/// true`) splits the list, and the pull goes through the mirror again.
///
/// The exception to "every `server` is a dead port": a bypassed containerd does not read the
/// hosts.toml at all, so it goes to the registry named in the image reference, which for docker.io
/// would be the internet. The image is therefore named after a loopback registry playing the real
/// upstream (`127.0.0.1:<port>/org/app:1`), which is also the hosts.toml's `server`, and the
/// pull succeeds either way; where it came from is what the test checks.
#[rstest]
#[case::containerd_2_1_colon_list_bypasses_the_mirror("", false)]
#[case::containerd_2_1_colon_list_with_discard_unpacked_layers_uses_the_mirror(
    "discard_unpacked_layers = true",
    true
)]
#[tokio::test]
async fn containerd_2_1_colon_config_path(#[case] extra: &str, #[case] through_mirror: bool) {
    let moto = Moto::start().await;
    let ecr = Registry::start(&moto.password()).await;
    let upstream = Registry::start_open().await;
    let registry = upstream.host();
    let image = Image::small("colon-list");
    upstream.push("org/app", "1", &image).await;
    ecr.push("local/org/app", "1", &image).await;
    upstream.clear_requests();
    ecr.clear_requests();

    // pullthrough mirrors the loopback registry like any other upstream (ECR prefix `local`).
    let mut opts = Options::new(&ecr.base_url(), &moto.endpoint());
    opts.extra = format!(
        "{TEST_TIMEOUTS}{}\n[upstreams.\"{registry}\"]\nprefix = \"local\"\nserver = \"{}\"\n",
        upstreams_toml(Some(&format!(
            "http://127.0.0.1:{}",
            crate::support::dead_port()
        ))),
        upstream.base_url()
    );
    let pt = Pullthrough::start(opts).await;
    let certs = short_tempdir("certs");
    pt.write_hosts(certs.path()).unwrap();
    let hosts = std::fs::read_to_string(certs.path().join(&registry).join("hosts.toml")).unwrap();
    assert!(
        hosts.contains(&format!("[host.\"{}\"]", pt.url())),
        "{hosts}"
    );

    let colon_list = format!("{}:/etc/docker/certs.d", certs.path().display());
    let mut options =
        ContainerdOptions::new(ContainerdVersion::V2_1, certs.path()).config_path(&colon_list);
    if !extra.is_empty() {
        options = options.extra(extra);
    }
    let containerd = Containerd::start_with(options).await;
    let reference = format!("{registry}/org/app:1");
    containerd
        .pull_image(&reference)
        .await
        .unwrap_or_else(|e| panic!("{e}\ncontainerd log:\n{}", containerd.log()));
    assert_eq!(
        containerd
            .image_digest(&reference)
            .await
            .unwrap()
            .as_deref(),
        Some(image.digest())
    );
    assert_eq!(
        containerd.cri_pulled_with_transfer_service(&reference),
        Some(!through_mirror),
        "containerd log:\n{}",
        containerd.log()
    );

    let manifest = "/v2/local/org/app/manifests/1";
    if through_mirror {
        ecr.wait_for_request("GET", manifest).await;
        assert!(
            !upstream
                .paths_seen()
                .iter()
                .any(|p| p.starts_with("/v2/org/app/")),
            "{:?}",
            upstream.paths_seen()
        );
    } else {
        upstream.wait_for_path("/v2/org/app/manifests/1").await;
        assert!(pt.access_log().is_empty(), "{:?}", pt.access_log());
        assert!(ecr.paths_seen().is_empty(), "{:?}", ecr.paths_seen());
    }
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

    // `skopeo inspect` reads the manifest through the mirror, but lists the repository's tags at
    // the registry the name says (quay.io itself: neither the mirror nor `location`), so it fails
    // here unless told `--no-tags`. That request goes to a proxy at a dead loopback port, so it
    // is refused without leaving the machine (not even a DNS lookup: Go leaves that to the proxy;
    // loopback is never proxied, so the mirror is reached as before).
    let proxy = format!("http://127.0.0.1:{}", crate::support::dead_port());
    let inspect = |extra: &[&str]| {
        std::process::Command::new("skopeo")
            .args(["inspect", "--retry-times=0"])
            .args(extra)
            .arg("docker://quay.io/org/app:1")
            .env("HOME", home.path())
            .env("HTTPS_PROXY", &proxy)
            .env("HTTP_PROXY", &proxy)
            .env("NO_PROXY", "127.0.0.1,localhost")
            .output()
            .unwrap()
    };
    let out = inspect(&[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("repository tags"), "{stderr}");
    assert!(stderr.contains("quay.io/v2/"), "{stderr}");
    assert!(
        stderr.contains(proxy.trim_start_matches("http://")),
        "{stderr}"
    );
    let out = inspect(&["--no-tags"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["Digest"], image.digest(), "{v}");
}
