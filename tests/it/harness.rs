//! Checks of the test harness itself, without pullthrough: each stand-in
//! starts, behaves as the other tests assume, and reports what it saw.

use http::StatusCode;
use serde_json::Value;

use rstest::rstest;

use crate::support::containerd::{
    Containerd, ContainerdVersion, mirror_hosts_toml, write_hosts_toml,
};
use crate::support::ecr_front::{EcrFront, FrontOptions};
use crate::support::http::{get, header};
use crate::support::image::{ACCEPT, INDEX, Image, MANIFEST};
use crate::support::moto::{DEFAULT_ACCOUNT, Moto};
use crate::support::registry::Registry;
use crate::support::{base64, basic_auth, dead_port, eventually, short_tempdir};

/// Pushed manifests, indexes and blobs come back byte for byte; auth,
/// password rotation, a missing blob and a restart behave as documented.
#[tokio::test]
async fn registry_serves_pushed_images_byte_for_byte() {
    let mut registry = Registry::start("first-password").await;
    let multi = Image::multi_arch("harness-multi");
    let single = Image::small("harness-single");
    registry.push("library/multi", "v1", &multi).await;
    registry.push("team/app", "1.0", &single).await;

    // The index by tag, then each platform manifest by digest.
    let resp = registry.get_manifest("library/multi", "v1").await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.body(), &multi.root.bytes);
    assert_eq!(header(&resp, "content-type"), INDEX);
    assert_eq!(header(&resp, "docker-content-digest"), multi.digest());
    for m in &multi.manifests {
        let resp = registry.get_manifest("library/multi", m.digest()).await;
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(resp.body(), &m.manifest.bytes);
        assert_eq!(header(&resp, "content-type"), MANIFEST);
    }
    for blob in multi.blobs() {
        let resp = registry.get_blob("library/multi", &blob.digest).await;
        assert_eq!(resp.status(), StatusCode::OK, "{}", blob.digest);
        assert_eq!(resp.body(), &blob.bytes, "{}", blob.digest);
    }
    let resp = registry.get_manifest("team/app", "1.0").await;
    assert_eq!(resp.body(), &single.root.bytes);
    assert_eq!(header(&resp, "docker-content-digest"), single.digest());

    // A multi-MiB layer goes up in one PUT and comes back intact.
    let big = Image::with_big_layer("harness-big", 8 << 20);
    registry.push("team/big", "1", &big).await;
    let layer = big.largest_layer();
    let resp = registry.get_blob("team/big", &layer.digest).await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(header(&resp, "content-length"), layer.size().to_string());
    assert!(resp.body() == &layer.bytes, "big layer differs");

    // Without credentials: 401, and the access log records it.
    registry.clear_requests();
    let url = format!("{}/v2/team/app/manifests/1.0", registry.base_url());
    let resp = get(&url, &[("accept", ACCEPT)])
        .await
        .expect("GET without auth");
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    let status = registry
        .wait_for_request("GET", "/v2/team/app/manifests/1.0")
        .await;
    assert_eq!(status, 401);
    assert_eq!(registry.paths_seen(), ["/v2/team/app/manifests/1.0"]);

    // The htpasswd file is re-read on change: no restart needed.
    let old_auth = basic_auth("AWS", "first-password");
    registry.set_password("second-password");
    let resp = get(&url, &[("authorization", &old_auth), ("accept", ACCEPT)])
        .await
        .expect("GET");
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    let new_auth = basic_auth("AWS", "second-password");
    let resp = get(&url, &[("authorization", &new_auth), ("accept", ACCEPT)])
        .await
        .expect("GET");
    assert_eq!(resp.status(), StatusCode::OK);
    // Distribution 2.8 answers 404 MANIFEST_UNKNOWN for an OCI manifest
    // unless the client's Accept lists OCI types: a proxy must pass Accept.
    let resp = get(&url, &[("authorization", &new_auth)])
        .await
        .expect("GET");
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);

    // An image whose manifest is there but one layer is not.
    let broken = Image::small("harness-broken");
    let layer = broken.manifests[0].layers[0].digest.clone();
    registry
        .push_without_blob("team/broken", "1", &broken, &layer)
        .await;
    let resp = registry.get_manifest("team/broken", "1").await;
    assert_eq!(resp.status(), StatusCode::OK);
    let resp = registry.get_blob("team/broken", &layer).await;
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);
    let config = &broken.manifests[0].config.digest;
    assert_eq!(
        registry.get_blob("team/broken", config).await.status(),
        StatusCode::OK
    );

    // A restart keeps port, storage, password and access log.
    let logged_before = registry.requests().len();
    registry.restart().await;
    let resp = registry.get_manifest("team/app", "1.0").await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.body(), &single.root.bytes);
    registry
        .wait_for_request("GET", "/v2/team/app/manifests/1.0")
        .await;
    assert!(registry.requests().len() > logged_before);
}

/// `token_calls` counts exactly the GetAuthorizationToken calls made, and
/// the token decodes to `AWS:<account>-auth-token`.
#[tokio::test]
async fn moto_counts_token_calls_and_rotates_with_the_account() {
    let mut moto = Moto::start().await;
    assert_eq!(moto.token_calls(), 0);

    for n in 1..=3 {
        let answer = moto
            .get_authorization_token("eu-west-1")
            .await
            .expect("GetAuthorizationToken");
        assert_eq!(moto.token_calls(), n);
        let data = &answer["authorizationData"][0];
        assert_eq!(data["authorizationToken"], moto.authorization_token());
        assert_eq!(
            data["proxyEndpoint"],
            format!("https://{DEFAULT_ACCOUNT}.dkr.ecr.eu-west-1.amazonaws.com")
        );
        // Fixed in moto at 2015-01-01: already expired.
        assert_eq!(data["expiresAt"], Value::from(1_420_070_400));
    }
    assert_eq!(
        moto.authorization_token(),
        base64(format!("AWS:{DEFAULT_ACCOUNT}-auth-token").as_bytes())
    );
    assert_eq!(moto.password(), "123456789012-auth-token");

    // Requests that are not token calls are not counted.
    get(&moto.endpoint(), &[]).await.expect("GET /");
    assert_eq!(moto.token_calls(), 3);

    // Same port, new account, new token; the count carries over.
    let port = moto.port();
    moto.restart_with_account("210987654321").await;
    assert_eq!(moto.port(), port);
    let answer = moto
        .get_authorization_token("us-east-1")
        .await
        .expect("GetAuthorizationToken after restart");
    assert_eq!(moto.token_calls(), 4);
    assert_eq!(moto.password(), "210987654321-auth-token");
    assert_eq!(
        answer["authorizationData"][0]["authorizationToken"],
        moto.authorization_token()
    );
}

/// containerd in the sandbox pulls through a `hosts.toml` mirror, by CRI
/// and by ctr, single- and multi-arch, and the mirror sees `?ns=docker.io`.
#[rstest]
#[case::containerd_1_6(ContainerdVersion::V1_6)]
#[case::containerd_1_7(ContainerdVersion::V1_7)]
#[case::containerd_2_1(ContainerdVersion::V2_1)]
#[tokio::test]
async fn containerd_pulls_through_a_hosts_toml_mirror(#[case] version: ContainerdVersion) {
    let registry = Registry::start_open().await;
    let alpine = Image::small("harness-alpine");
    let multi = Image::multi_arch("harness-multi-arch");
    registry.push("library/alpine", "3.19", &alpine).await;
    registry.push("library/multi", "1", &multi).await;
    registry.clear_requests();

    let certs_d = short_tempdir("certs");
    write_hosts_toml(
        certs_d.path(),
        "docker.io",
        &mirror_hosts_toml(
            &format!("http://127.0.0.1:{}", dead_port()),
            &registry.base_url(),
        ),
    );
    let containerd = Containerd::start_version(version, certs_d.path()).await;

    // CRI, single-platform image.
    let image = "docker.io/library/alpine:3.19";
    containerd
        .pull_image(image)
        .await
        .unwrap_or_else(|e| panic!("{e}\ncontainerd log:\n{}", containerd.log()));
    assert_eq!(
        containerd.image_digest(image).await.expect("ImageStatus"),
        Some(alpine.digest().to_owned())
    );
    // containerd resolves the tag with HEAD, then GETs by digest; the
    // mirror sees the upstream namespace as `?ns=`.
    let status = registry
        .wait_for_request("HEAD", "/v2/library/alpine/manifests/3.19?ns=docker.io")
        .await;
    assert_eq!(status, 200);
    let manifest = alpine.digest();
    registry
        .wait_for_request(
            "GET",
            &format!("/v2/library/alpine/manifests/{manifest}?ns=docker.io"),
        )
        .await;
    let layer = &alpine.manifests[0].layers[0].digest;
    let status = registry
        .wait_for_request(
            "GET",
            &format!("/v2/library/alpine/blobs/{layer}?ns=docker.io"),
        )
        .await;
    assert_eq!(status, 200);

    // CRI, multi-arch index: resolves to the index digest and fetches only
    // this host's (amd64) manifest.
    let image = "docker.io/library/multi:1";
    containerd
        .pull_image(image)
        .await
        .unwrap_or_else(|e| panic!("{e}\ncontainerd log:\n{}", containerd.log()));
    assert_eq!(
        containerd.image_digest(image).await.expect("ImageStatus"),
        Some(multi.digest().to_owned())
    );
    let amd64 = multi.manifest_for("amd64").expect("amd64");
    let arm64 = multi.manifest_for("arm64").expect("arm64");
    registry
        .wait_for_request(
            "GET",
            &format!(
                "/v2/library/multi/manifests/{}?ns=docker.io",
                amd64.digest()
            ),
        )
        .await;
    let paths = registry.paths_seen();
    assert!(
        !paths.iter().any(|p| p.contains(arm64.digest())),
        "arm64 manifest fetched: {paths:?}"
    );

    // Removal works, so a test can pull the same image again.
    containerd.remove_image(image).await.expect("RemoveImage");
    assert_eq!(
        containerd.image_digest(image).await.expect("ImageStatus"),
        None
    );

    // ctr, with the same certs.d as its --hosts-dir.
    for (image, expected) in [
        ("docker.io/library/alpine:3.19", &alpine),
        ("docker.io/library/multi:1", &multi),
    ] {
        registry.clear_requests();
        containerd
            .ctr_pull(image, certs_d.path())
            .await
            .unwrap_or_else(|e| panic!("{e}\ncontainerd log:\n{}", containerd.log()));
        assert_eq!(
            containerd
                .ctr_image_digest(image)
                .await
                .expect("ctr images ls"),
            Some(expected.digest().to_owned())
        );
        let repo = image.trim_start_matches("docker.io/");
        let (name, tag) = repo.split_once(':').expect("tagged");
        registry
            .wait_for_request("HEAD", &format!("/v2/{name}/manifests/{tag}?ns=docker.io"))
            .await;
    }
    containerd
        .ctr_remove("docker.io/library/alpine:3.19")
        .await
        .expect("ctr images rm");
}

/// The ECR-like front: 401 without the Basic credential, an unknown digest is 404 even when the
/// upstream has it, a tag GET imports the whole index (and only then does its digest resolve), a
/// blob is a 307 to the S3 server, which serves the bytes without `Authorization` and refuses a
/// request with it, and the front counts exactly the requests the upstream registry saw.
#[tokio::test]
async fn ecr_front_imports_on_a_tag_pull_and_redirects_blobs() {
    let backend = Registry::start("front-password").await;
    let upstream = Registry::start_open().await;
    let image = Image::multi_arch("harness-front");
    upstream.push("library/alpine", "3.19", &image).await;
    upstream.clear_requests();
    let front = EcrFront::with_upstreams(&backend, &[("docker-hub", &upstream)]).await;
    let auth = backend.auth_header().expect("backend has a password");
    let by_tag = format!(
        "{}/v2/docker-hub/library/alpine/manifests/3.19",
        front.base_url()
    );
    let by_digest = format!(
        "{}/v2/docker-hub/library/alpine/manifests/{}",
        front.base_url(),
        image.digest()
    );

    // Every /v2/ request needs the credential; a wrong one is refused by the backend's htpasswd.
    for (url, headers) in [
        (format!("{}/v2/", front.base_url()), vec![]),
        (by_tag.clone(), vec![("accept", ACCEPT)]),
        (
            by_tag.clone(),
            vec![("accept", ACCEPT), ("authorization", "Basic QVdTOndyb25n")],
        ),
    ] {
        let resp = get(&url, &headers).await.expect("GET");
        assert_eq!(resp.status(), StatusCode::UNAUTHORIZED, "{url}");
        assert!(
            header(&resp, "www-authenticate").starts_with("Basic "),
            "{url}"
        );
    }
    let resp = get(
        &format!("{}/v2/", front.base_url()),
        &[("authorization", &auth)],
    )
    .await
    .expect("GET /v2/");
    assert_eq!(resp.status(), StatusCode::OK);

    // A digest the cache does not hold is missing, though the upstream has it.
    let resp = get(&by_digest, &[("authorization", &auth), ("accept", ACCEPT)])
        .await
        .expect("GET by digest");
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);
    let body: Value = serde_json::from_slice(resp.body()).expect("OCI error body");
    assert_eq!(body["errors"][0]["code"], "MANIFEST_UNKNOWN", "{body}");
    assert!(front.upstream_requests().is_empty(), "{}", front.log_text());
    assert!(upstream.requests().is_empty(), "{:?}", upstream.requests());

    // The tag pull imports: the index, both platform manifests, every blob.
    front.clear_log();
    let resp = get(&by_tag, &[("authorization", &auth), ("accept", ACCEPT)])
        .await
        .expect("GET by tag");
    assert_eq!(resp.status(), StatusCode::OK, "{}", front.log_text());
    assert_eq!(resp.body(), &image.root.bytes);
    assert_eq!(header(&resp, "docker-content-digest"), image.digest());
    let first = front
        .wait_for_ecr("GET", "/v2/docker-hub/library/alpine/manifests/3.19")
        .await;
    assert_eq!(first.tag_check.as_deref(), Some("imported"), "{first:?}");
    assert_eq!(first.digest.as_deref(), Some(image.digest()));
    assert_eq!(front.imports(), ["docker-hub/library/alpine:3.19"]);
    let up = front.upstream_requests();
    assert!(
        up.iter()
            .all(|r| r.upstream == "docker-hub" && r.status == Some(200)),
        "{up:?}"
    );
    for m in &image.manifests {
        let path = format!("/v2/library/alpine/manifests/{}", m.digest());
        assert!(up.iter().any(|r| r.path == path), "{path} not in {up:?}");
    }
    // The front counts what the upstream saw, one for one.
    assert_eq!(up.len() as u64, first.upstream_requests);
    assert_eq!(
        upstream.requests().len(),
        up.len(),
        "{:?}",
        upstream.requests()
    );

    // Imported: the digest resolves now, and a second tag pull is served as held. A client may
    // send one Accept header per media type (containers/image does): all of them count.
    let resp = get(
        &by_digest,
        &[
            ("authorization", &auth),
            ("accept", MANIFEST),
            ("accept", INDEX),
        ],
    )
    .await
    .expect("GET by digest");
    assert_eq!(resp.status(), StatusCode::OK);
    get(&by_tag, &[("authorization", &auth), ("accept", ACCEPT)])
        .await
        .expect("GET by tag");
    assert_eq!(front.upstream_requests().len(), up.len());

    // A blob: 307 to the S3 server on another host name, with no credential needed there.
    let layer = &image.manifest_for("amd64").expect("amd64").layers[0];
    let blob_url = format!(
        "{}/v2/docker-hub/library/alpine/blobs/{}",
        front.base_url(),
        layer.digest
    );
    let resp = get(&blob_url, &[("authorization", &auth)])
        .await
        .expect("GET blob");
    assert_eq!(resp.status(), StatusCode::TEMPORARY_REDIRECT);
    let location = header(&resp, "location").to_owned();
    let s3 = format!(
        "http://localhost:{}/prod-local-starport-layer-bucket/docker-hub/library/alpine/{}?",
        front.s3_port(),
        layer.digest
    );
    assert!(location.starts_with(&s3), "{location}");
    let resp = get(&location, &[]).await.expect("GET S3");
    assert_eq!(resp.status(), StatusCode::OK);
    assert!(resp.body() == &layer.bytes, "S3 served other bytes");
    // As S3 does, a presigned URL with an Authorization header is refused.
    let resp = get(&location, &[("authorization", &auth)])
        .await
        .expect("GET S3");
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    let s3_log = eventually("two S3 log lines", || {
        let l = front.s3_requests();
        (l.len() == 2).then_some(l)
    })
    .await;
    assert_eq!(
        s3_log
            .iter()
            .map(|r| (r.authorization, r.status))
            .collect::<Vec<_>>(),
        [(false, Some(200)), (true, Some(400))]
    );
    assert_eq!(
        front.s3_blobs("docker-hub/library/alpine"),
        std::collections::BTreeSet::from([layer.digest.clone()])
    );
    // A blob the cache does not hold.
    let missing = format!(
        "{}/v2/docker-hub/library/alpine/blobs/sha256:{}",
        front.base_url(),
        "0".repeat(64)
    );
    let resp = get(&missing, &[("authorization", &auth)])
        .await
        .expect("GET blob");
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);

    // The tag moves upstream: with ECR's 24 h re-check the cache keeps the old image and asks
    // nothing; a front re-checking every time imports the new one.
    let moved = Image::small("harness-front-moved");
    upstream.push("library/alpine", "3.19", &moved).await;
    let resp = get(&by_tag, &[("authorization", &auth), ("accept", ACCEPT)])
        .await
        .expect("GET by tag");
    assert_eq!(header(&resp, "docker-content-digest"), image.digest());
    assert_eq!(front.upstream_requests().len(), up.len());
    let eager = EcrFront::start(
        &backend,
        FrontOptions::new()
            .upstream_registry("docker-hub", &upstream)
            .tag_recheck("0"),
    )
    .await;
    let eager_tag = by_tag.replace(&front.base_url(), &eager.base_url());
    let resp = get(&eager_tag, &[("authorization", &auth), ("accept", ACCEPT)])
        .await
        .expect("GET by tag");
    assert_eq!(
        header(&resp, "docker-content-digest"),
        image.digest(),
        "first sight: held"
    );
    let resp = get(&eager_tag, &[("authorization", &auth), ("accept", ACCEPT)])
        .await
        .expect("GET by tag");
    assert_eq!(header(&resp, "docker-content-digest"), moved.digest());
    // The front logs a request once it has answered it.
    eventually("the eager front's import", || {
        (eager.imports() == ["docker-hub/library/alpine:3.19"]).then_some(())
    })
    .await;
}
