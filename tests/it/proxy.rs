//! The mirror against real stand-ins: docker-registry (htpasswd Basic auth for `AWS`) as the
//! ECR registry endpoint and moto as the ECR API, with pullthrough in between.

use std::time::Duration;

use bytes::Bytes;
use http::{Method, StatusCode};
use http_body_util::BodyExt;

use crate::support::http::{get, header, request, send, send_streaming};
use crate::support::image::{ACCEPT, Blob, INDEX, Image, MANIFEST};
use crate::support::moto::Moto;
use crate::support::pullthrough::{BlackHole, Options, Pullthrough, RawUpstream, Recorder, Then};
use crate::support::registry::Registry;
use crate::support::{dead_port, eventually, sha256_digest};

/// The images every stack holds, at their pull-through paths.
struct Images {
    alpine: Image,
    user_app: Image,
    node_exporter: Image,
    multi: Image,
}

struct Stack {
    moto: Moto,
    registry: Registry,
    pt: Pullthrough,
    images: Images,
}

async fn stack() -> Stack {
    let moto = Moto::start().await;
    let registry = Registry::start(&moto.password()).await;
    let images = Images {
        alpine: Image::small("alpine"),
        user_app: Image::small("someorg-app"),
        node_exporter: Image::small("node-exporter"),
        multi: Image::multi_arch("multi"),
    };
    registry
        .push("docker-hub/library/alpine", "3.19", &images.alpine)
        .await;
    registry
        .push("docker-hub/someorg/app", "1", &images.user_app)
        .await;
    registry
        .push("quay/prometheus/node-exporter", "v1", &images.node_exporter)
        .await;
    registry
        .push("docker-hub/library/multi", "1", &images.multi)
        .await;
    registry.clear_requests();
    let pt = Pullthrough::start(Options::new(&registry.base_url(), &moto.endpoint())).await;
    Stack {
        moto,
        registry,
        pt,
        images,
    }
}

/// GET through the mirror, as containerd would send it.
async fn via(
    pt: &Pullthrough,
    path_and_query: &str,
    headers: &[(&str, &str)],
) -> http::Response<Bytes> {
    get(&format!("{}{path_and_query}", pt.url()), headers)
        .await
        .unwrap()
}

async fn direct(reg: &Registry, path: &str, headers: &[(&str, &str)]) -> http::Response<Bytes> {
    let auth = reg.auth_header().unwrap();
    let mut h = headers.to_vec();
    h.push(("authorization", &auth));
    get(&format!("{}{path}", reg.base_url()), &h).await.unwrap()
}

/// The request never reached the ECR stand-in.
fn assert_untouched(registry: &Registry) {
    let seen = registry.requests();
    assert!(seen.is_empty(), "the registry saw {seen:?}");
}

fn oci_code(resp: &http::Response<Bytes>) -> String {
    let v: serde_json::Value = serde_json::from_slice(resp.body()).unwrap_or_default();
    v["errors"][0]["code"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

#[tokio::test]
async fn v2_root_is_answered_locally_without_a_challenge() {
    let s = stack().await;
    for path in ["/v2/", "/v2"] {
        let resp = via(&s.pt, path, &[]).await;
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(
            header(&resp, "docker-distribution-api-version"),
            "registry/2.0"
        );
        assert!(resp.headers().get("www-authenticate").is_none());
    }
    assert_untouched(&s.registry);
}

#[tokio::test]
async fn manifests_blobs_and_tags_are_byte_identical_to_direct() {
    let s = stack().await;
    let cases = [
        (
            "docker.io",
            "library/alpine",
            "docker-hub/library/alpine",
            "3.19",
            &s.images.alpine,
        ),
        (
            "docker.io",
            "alpine",
            "docker-hub/library/alpine",
            "3.19",
            &s.images.alpine,
        ),
        (
            "docker.io",
            "someorg/app",
            "docker-hub/someorg/app",
            "1",
            &s.images.user_app,
        ),
        (
            "quay.io",
            "prometheus/node-exporter",
            "quay/prometheus/node-exporter",
            "v1",
            &s.images.node_exporter,
        ),
        (
            "docker.io",
            "library/multi",
            "docker-hub/library/multi",
            "1",
            &s.images.multi,
        ),
    ];
    let accept = [("accept", ACCEPT)];
    for (ns, name, repo, tag, image) in cases {
        let q = format!("?ns={ns}");
        // The root (manifest or index) by tag, GET and HEAD.
        let proxied = via(&s.pt, &format!("/v2/{name}/manifests/{tag}{q}"), &accept).await;
        let plain = direct(&s.registry, &format!("/v2/{repo}/manifests/{tag}"), &accept).await;
        assert_eq!(proxied.status(), StatusCode::OK, "{name}:{tag}");
        assert_eq!(proxied.body(), plain.body());
        assert_eq!(proxied.body(), &image.root.bytes);
        for h in ["content-type", "docker-content-digest", "content-length"] {
            assert_eq!(
                header(&proxied, h),
                header(&plain, h),
                "{h} of {name}:{tag}"
            );
        }
        let head = send(request(
            Method::HEAD,
            &format!("{}/v2/{name}/manifests/{tag}{q}", s.pt.url()),
            &accept,
        ))
        .await
        .unwrap();
        assert_eq!(head.status(), StatusCode::OK);
        assert!(head.body().is_empty());
        assert_eq!(
            header(&head, "content-length"),
            image.root.bytes.len().to_string()
        );
        assert_eq!(header(&head, "docker-content-digest"), image.digest());
        assert_eq!(
            header(&head, "content-type"),
            header(&plain, "content-type")
        );

        // Every child manifest by digest, and every blob.
        for m in &image.manifests {
            if !image.is_index() {
                continue;
            }
            let resp = via(
                &s.pt,
                &format!("/v2/{name}/manifests/{}{q}", m.digest()),
                &accept,
            )
            .await;
            assert_eq!(resp.body(), &m.manifest.bytes);
        }
        for blob in image.blobs() {
            let path = format!("/v2/{name}/blobs/{}{q}", blob.digest);
            let resp = via(&s.pt, &path, &[]).await;
            assert_eq!(resp.status(), StatusCode::OK, "{path}");
            assert_eq!(resp.body(), &blob.bytes, "{path}");
            assert_eq!(header(&resp, "docker-content-digest"), blob.digest);
            let head = send(request(Method::HEAD, &format!("{}{path}", s.pt.url()), &[]))
                .await
                .unwrap();
            assert_eq!(head.status(), StatusCode::OK);
            assert_eq!(header(&head, "content-length"), blob.size().to_string());
        }

        // Tag lists, with paging parameters kept.
        let proxied = via(&s.pt, &format!("/v2/{name}/tags/list?n=10&ns={ns}"), &[]).await;
        let plain = direct(&s.registry, &format!("/v2/{repo}/tags/list?n=10"), &[]).await;
        assert_eq!(proxied.status(), StatusCode::OK);
        assert_eq!(proxied.body(), plain.body());
    }
    // What ECR saw: pull-through paths only, with `ns` stripped.
    let seen = s.registry.paths_seen();
    assert!(
        seen.contains(&"/v2/docker-hub/library/alpine/manifests/3.19".to_string()),
        "{seen:?}"
    );
    assert!(
        seen.contains(&"/v2/docker-hub/someorg/app/manifests/1".to_string()),
        "{seen:?}"
    );
    assert!(
        seen.contains(&"/v2/quay/prometheus/node-exporter/tags/list?n=10".to_string()),
        "{seen:?}"
    );
    assert!(seen.iter().all(|p| !p.contains("ns=")), "{seen:?}");
    assert!(
        !seen.iter().any(|p| p.contains("library/someorg")),
        "{seen:?}"
    );
}

#[tokio::test]
async fn range_requests_pass_through() {
    let s = stack().await;
    let layer = &s.images.alpine.manifests[0].layers[0];
    let path = format!("/v2/library/alpine/blobs/{}?ns=docker.io", layer.digest);
    let resp = via(&s.pt, &path, &[("range", "bytes=10-19")]).await;
    assert_eq!(resp.status(), StatusCode::PARTIAL_CONTENT);
    assert_eq!(resp.body(), &layer.bytes[10..20]);
    assert_eq!(
        header(&resp, "content-range"),
        format!("bytes 10-19/{}", layer.size())
    );
}

#[tokio::test]
async fn accept_negotiation_and_the_manifest_cache() {
    let s = stack().await;
    let index = &s.images.multi;
    let by_digest = format!(
        "/v2/library/multi/manifests/{}?ns=docker.io",
        index.digest()
    );
    let upstream_path = format!("/v2/docker-hub/library/multi/manifests/{}", index.digest());

    // An Accept without the index type gets what the registry gives such a client, because the
    // client's Accept is what reaches the registry.
    let only_manifest = [("accept", MANIFEST)];
    let proxied = via(
        &s.pt,
        "/v2/library/multi/manifests/1?ns=docker.io",
        &only_manifest,
    )
    .await;
    let plain = direct(
        &s.registry,
        "/v2/docker-hub/library/multi/manifests/1",
        &only_manifest,
    )
    .await;
    assert_eq!(proxied.status(), plain.status());
    if plain.status().is_success() {
        assert_eq!(proxied.body(), plain.body());
        assert_eq!(
            header(&proxied, "content-type"),
            header(&plain, "content-type")
        );
    } else {
        assert_eq!(oci_code(&proxied), oci_code(&plain));
    }
    // And with the index type accepted, the index itself.
    let proxied = via(
        &s.pt,
        "/v2/library/multi/manifests/1?ns=docker.io",
        &[("accept", INDEX)],
    )
    .await;
    assert_eq!(proxied.status(), StatusCode::OK);
    assert_eq!(proxied.body(), &index.root.bytes);

    // That GET by tag verified the index against ECR's digest header and cached it: reads by
    // digest are now served locally, without a request to ECR.
    let accept = [("accept", ACCEPT)];
    for _ in 0..3 {
        let resp = via(&s.pt, &by_digest, &accept).await;
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(resp.body(), &index.root.bytes);
        assert_eq!(header(&resp, "content-type"), INDEX);
        assert_eq!(header(&resp, "docker-content-digest"), index.digest());
    }
    let fetched = |reg: &Registry| {
        reg.paths_seen()
            .iter()
            .filter(|p| **p == upstream_path)
            .count()
    };
    assert_eq!(fetched(&s.registry), 0, "{:?}", s.registry.requests());
    let hits =
        s.pt.access_log()
            .iter()
            .filter(|l| l["cache"] == "hit")
            .count();
    assert_eq!(hits, 3);

    // A client that does not accept the cached type is not served from the cache.
    via(&s.pt, &by_digest, &only_manifest).await;
    assert_eq!(fetched(&s.registry), 1);
}

/// A burst of identical tag GETs (a node starting many pods of one image) makes one GET to ECR:
/// the requests that arrive while it is in flight share it, the ones after it find the tag's
/// answer in the tag cache; a HEAD shares it too, and so does a repeat within `tag_ttl`.
#[tokio::test]
async fn a_burst_of_identical_tag_gets_makes_one_upstream_request() {
    let s = stack().await;
    let path = "/v2/library/alpine/manifests/3.19?ns=docker.io";
    let url = format!("{}{path}", s.pt.url());
    let mut burst = tokio::task::JoinSet::new();
    for _ in 0..64 {
        let url = url.clone();
        burst.spawn(async move { get(&url, &[("accept", ACCEPT)]).await.unwrap() });
    }
    while let Some(resp) = burst.join_next().await {
        let resp = resp.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(resp.body(), &s.images.alpine.root.bytes);
    }
    let head = send(request(
        Method::HEAD,
        &format!("{}{path}", s.pt.url()),
        &[("accept", ACCEPT)],
    ))
    .await
    .unwrap();
    assert_eq!(head.status(), StatusCode::OK);
    assert_eq!(
        header(&head, "docker-content-digest"),
        s.images.alpine.digest()
    );
    let upstream = "/v2/docker-hub/library/alpine/manifests/3.19";
    s.registry.wait_for_request("GET", upstream).await;
    let count = || {
        s.registry
            .requests()
            .iter()
            .filter(|(_, p, _)| p == upstream)
            .count()
    };
    assert_eq!(count(), 1, "{:?}", s.registry.requests());
    let shared =
        s.pt.metric("pullthrough_manifest_coalesced_total")
            .await
            .unwrap();
    let tag_hits =
        s.pt.metric("pullthrough_manifest_tag_cache_hits_total")
            .await
            .unwrap();
    assert_eq!(
        shared + tag_hits,
        64.0,
        "63 GETs and the HEAD were local or shared"
    );
}

/// `tag_ttl = "0s"` turns the tag cache off: every GET by tag asks ECR again.
#[tokio::test]
async fn a_zero_tag_ttl_asks_ecr_for_every_tag_get() {
    let moto = Moto::start().await;
    let registry = Registry::start(&moto.password()).await;
    let alpine = Image::small("alpine-ttl");
    registry
        .push("docker-hub/library/alpine", "3.19", &alpine)
        .await;
    let mut opts = Options::new(&registry.base_url(), &moto.endpoint());
    opts.extra
        .push_str("\n[manifest_cache]\ntag_ttl = \"0s\"\n");
    let pt = Pullthrough::start(opts).await;
    let path = "/v2/library/alpine/manifests/3.19?ns=docker.io";
    for _ in 0..2 {
        let resp = via(&pt, path, &[("accept", ACCEPT)]).await;
        assert_eq!(resp.status(), StatusCode::OK);
    }
    let upstream = "/v2/docker-hub/library/alpine/manifests/3.19";
    registry.wait_for_request("GET", upstream).await;
    let gets = registry
        .requests()
        .iter()
        .filter(|(m, p, _)| m == "GET" && p == upstream)
        .count();
    assert_eq!(gets, 2);
}

#[tokio::test]
async fn head_by_tag_then_get_by_digest_costs_one_upstream_request() {
    let s = stack().await;
    let accept = [("accept", ACCEPT)];
    let head = send(request(
        Method::HEAD,
        &format!(
            "{}/v2/library/alpine/manifests/3.19?ns=docker.io",
            s.pt.url()
        ),
        &accept,
    ))
    .await
    .unwrap();
    assert_eq!(head.status(), StatusCode::OK, "{}", s.pt.log());
    let digest = header(&head, "docker-content-digest").to_owned();
    assert_eq!(digest, s.images.alpine.digest());
    let resp = via(
        &s.pt,
        &format!("/v2/library/alpine/manifests/{digest}?ns=docker.io"),
        &accept,
    )
    .await;
    assert_eq!(resp.body(), &s.images.alpine.root.bytes);
    let manifest_requests: Vec<_> = s
        .registry
        .requests()
        .into_iter()
        .filter(|(_, p, _)| p.contains("/manifests/"))
        .collect();
    // The HEAD went up as a GET (it may be what makes ECR import the image); the digest was local.
    assert_eq!(
        manifest_requests,
        vec![(
            "GET".to_string(),
            "/v2/docker-hub/library/alpine/manifests/3.19".to_string(),
            200
        )]
    );
}

#[tokio::test]
async fn client_credentials_never_reach_the_registry() {
    let moto = Moto::start().await;
    let recorder = Recorder::start().await;
    let mut opts = Options::new(&recorder.url(), &moto.endpoint());
    // The most verbose logging there is, SDK included: still no token.
    opts.rust_log = "trace".into();
    let pt = Pullthrough::start(opts).await;
    let resp = via(
        &pt,
        "/v2/alpine/tags/list?n=5&ns=docker.io&last=a",
        &[
            ("authorization", "Basic cG9kOnNlY3JldA=="),
            ("cookie", "session=pod"),
            ("proxy-authorization", "Basic cG9kOnNlY3JldA=="),
            ("x-pod-header", "1"),
            ("accept", "application/json"),
            ("range", "bytes=0-"),
            ("if-none-match", "\"abc\""),
            ("user-agent", "containerd/1.6.20"),
            // The request cannot choose the upstream host.
            ("host", "evil.example"),
        ],
    )
    .await;
    assert_eq!(resp.status(), StatusCode::OK);
    let seen = recorder.requests();
    assert_eq!(seen.len(), 1, "{seen:?}");
    let (line, h) = &seen[0];
    assert_eq!(
        line,
        "GET /v2/docker-hub/library/alpine/tags/list?n=5&last=a"
    );
    assert_eq!(
        h["authorization"],
        format!("Basic {}", moto.authorization_token())
    );
    for dropped in ["cookie", "proxy-authorization", "x-pod-header"] {
        assert!(!h.contains_key(dropped), "{dropped} was forwarded");
    }
    assert_eq!(h["accept"], "application/json");
    assert_eq!(h["range"], "bytes=0-");
    assert_eq!(h["if-none-match"], "\"abc\"");
    assert_eq!(h["user-agent"], "containerd/1.6.20");
    assert_eq!(h["host"], recorder.url().trim_start_matches("http://"));
    // An absolute-form request line (as sent to a forward proxy) cannot choose the host either.
    {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut conn = tokio::net::TcpStream::connect(pt.host()).await.unwrap();
        conn.write_all(
            b"GET http://evil.example/v2/alpine/tags/list?ns=docker.io HTTP/1.1\r\n\
              Host: evil.example\r\nConnection: close\r\n\r\n",
        )
        .await
        .unwrap();
        let mut answer = Vec::new();
        conn.read_to_end(&mut answer).await.unwrap();
        assert!(
            answer.starts_with(b"HTTP/1.1 200"),
            "{}",
            String::from_utf8_lossy(&answer)
        );
        let seen = recorder.requests();
        assert_eq!(seen.len(), 2);
        assert_eq!(seen[1].0, "GET /v2/docker-hub/library/alpine/tags/list");
        assert_eq!(
            seen[1].1["host"],
            recorder.url().trim_start_matches("http://")
        );
    }
    // And the token never shows up in pullthrough's own log, even at trace level.
    let log = pt.log();
    assert!(
        log.contains("GetAuthorizationToken"),
        "trace logging was on"
    );
    assert!(!log.contains(&moto.authorization_token()));
    assert!(!log.contains(&moto.password()));
}

#[tokio::test]
async fn a_hundred_concurrent_cold_requests_make_one_token_call() {
    let mut moto = Moto::start().await;
    let registry = Registry::start(&moto.password()).await;
    registry
        .push("docker-hub/library/alpine", "3.19", &Image::small("alpine"))
        .await;
    // pullthrough fetches a token at start-up. With the token API down then, that fetch fails and
    // the cache stays cold; /readyz saying so means the start-up fetch is over.
    moto.stop();
    let pt = Pullthrough::start(Options::new(&registry.base_url(), &moto.endpoint())).await;
    let mut ready = 0;
    for _ in 0..100 {
        ready = pt.ready_status().await;
        if ready == 503 && pt.log().contains("ECR token fetch failed") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(ready, 503);
    moto.restart_with_account(crate::support::moto::DEFAULT_ACCOUNT)
        .await;
    // Let the backoff after that failure (at most 1 s) run out, without asking for a token.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(
        moto.token_calls(),
        0,
        "nothing reached moto while it was down"
    );

    let url = format!("{}/v2/library/alpine/manifests/3.19?ns=docker.io", pt.url());
    let tasks: Vec<_> = (0..100)
        .map(|_| {
            let url = url.clone();
            tokio::spawn(async move { get(&url, &[("accept", ACCEPT)]).await })
        })
        .collect();
    // After a failed fetch no request waits for the next one (the SDK's retries take seconds):
    // each answers at once, 503 while the one background fetch runs, 200 once it is done.
    for t in tasks {
        let status = t.await.unwrap().unwrap().status();
        assert!(
            status == StatusCode::OK || status == StatusCode::SERVICE_UNAVAILABLE,
            "{status}"
        );
    }
    let mut status = StatusCode::SERVICE_UNAVAILABLE;
    for _ in 0..100 {
        status = get(&url, &[("accept", ACCEPT)]).await.unwrap().status();
        if status == StatusCode::OK {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(status, StatusCode::OK);
    assert_eq!(moto.token_calls(), 1);
}

#[tokio::test]
async fn a_rotated_token_is_recovered_through_one_401_retry() {
    let mut s = stack().await;
    let path = "/v2/library/alpine/manifests/3.19?ns=docker.io";
    assert_eq!(
        via(&s.pt, path, &[("accept", ACCEPT)]).await.status(),
        StatusCode::OK
    );
    assert_eq!(s.moto.token_calls(), 1);

    // ECR now hands out (and accepts) another token.
    s.moto.restart_with_account("210987654321").await;
    s.registry.set_password(&s.moto.password());
    s.registry.clear_requests();

    // Another image: the first one's tag is answered locally for a while (tag_ttl).
    let path = "/v2/someorg/app/manifests/1?ns=docker.io";
    let resp = via(&s.pt, path, &[("accept", ACCEPT)]).await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.body(), &s.images.user_app.root.bytes);
    assert_eq!(s.moto.token_calls(), 2);
    let statuses: Vec<u16> = s.registry.requests().iter().map(|(_, _, st)| *st).collect();
    assert_eq!(statuses, vec![401, 200]);
}

/// The same for a blob: one 401, one new token, one GET that succeeds, and the whole body.
#[tokio::test]
async fn a_rotated_token_is_recovered_through_one_401_retry_on_a_blob() {
    let mut s = stack().await;
    // Far larger than what can arrive with the response head.
    let layer = Blob::new(
        crate::support::image::LAYER_TAR,
        crate::support::image::random_bytes(1024 * 1024, 12),
    );
    s.registry
        .push_blob("docker-hub/library/alpine", &layer)
        .await;
    let path = format!("/v2/library/alpine/blobs/{}?ns=docker.io", layer.digest);
    assert_eq!(via(&s.pt, &path, &[]).await.status(), StatusCode::OK);
    assert_eq!(s.moto.token_calls(), 1);

    s.moto.restart_with_account("210987654321").await;
    s.registry.set_password(&s.moto.password());
    s.registry.clear_requests();

    let resp = via(&s.pt, &path, &[]).await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.body(), &layer.bytes);
    assert_eq!(s.moto.token_calls(), 2);
    let statuses: Vec<u16> = s.registry.requests().iter().map(|(_, _, st)| *st).collect();
    assert_eq!(statuses, vec![401, 200]);
}

#[tokio::test]
async fn unknown_registries_get_404_without_an_upstream_call() {
    let s = stack().await;
    for q in [
        "ns=ghcr.io",
        "ns=docker.io.evil.example",
        "ns=docker.io%2Fx",
        "",
    ] {
        let resp = via(
            &s.pt,
            &format!("/v2/library/alpine/manifests/3.19?{q}"),
            &[],
        )
        .await;
        assert_eq!(resp.status(), StatusCode::NOT_FOUND, "{q}");
        assert_eq!(oci_code(&resp), "NAME_UNKNOWN", "{q}");
    }
    assert_untouched(&s.registry);
}

#[tokio::test]
async fn bad_requests_are_refused_before_the_upstream() {
    let s = stack().await;
    let sha = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
    let long = vec!["abcdefghij"; 30].join("/");
    let cases: Vec<(Method, String, u16, &str)> = vec![
        (
            Method::GET,
            "/v2/library/../etc/manifests/1?ns=docker.io".into(),
            400,
            "NAME_INVALID",
        ),
        (
            Method::GET,
            "/v2/library%2Falpine/manifests/1?ns=docker.io".into(),
            400,
            "NAME_INVALID",
        ),
        (
            Method::GET,
            "/v2/library//alpine/manifests/1?ns=docker.io".into(),
            400,
            "NAME_INVALID",
        ),
        (
            Method::GET,
            "/v2/Library/alpine/manifests/1?ns=docker.io".into(),
            400,
            "NAME_INVALID",
        ),
        (
            Method::GET,
            format!("/v2/{long}/manifests/1?ns=docker.io"),
            400,
            "NAME_INVALID",
        ),
        (
            Method::GET,
            "/v2/alpine/manifests/-bad?ns=docker.io".into(),
            400,
            "TAG_INVALID",
        ),
        (
            Method::GET,
            "/v2/alpine/manifests/sha256:abc?ns=docker.io".into(),
            400,
            "TAG_INVALID",
        ),
        (
            Method::GET,
            "/v2/alpine/blobs/latest?ns=docker.io".into(),
            400,
            "DIGEST_INVALID",
        ),
        (
            Method::GET,
            "/v2/alpine/referrers/v1?ns=docker.io".into(),
            400,
            "DIGEST_INVALID",
        ),
        (Method::GET, "/v2/_catalog".into(), 404, "UNSUPPORTED"),
        (
            Method::PUT,
            "/v2/alpine/manifests/1?ns=docker.io".into(),
            405,
            "UNSUPPORTED",
        ),
        (
            Method::POST,
            "/v2/alpine/blobs/uploads/?ns=docker.io".into(),
            405,
            "UNSUPPORTED",
        ),
        (
            Method::DELETE,
            format!("/v2/alpine/blobs/{sha}?ns=docker.io"),
            405,
            "UNSUPPORTED",
        ),
    ];
    for (method, path, status, code) in cases {
        let resp = send(request(
            method.clone(),
            &format!("{}{path}", s.pt.url()),
            &[],
        ))
        .await
        .unwrap();
        assert_eq!(resp.status().as_u16(), status, "{method} {path}");
        assert_eq!(oci_code(&resp), code, "{method} {path}");
        assert_eq!(header(&resp, "content-type"), "application/json");
    }
    assert_untouched(&s.registry);
}

#[tokio::test]
async fn missing_images_are_404_so_containerd_falls_back() {
    let s = stack().await;
    let resp = via(
        &s.pt,
        "/v2/library/nothere/manifests/1?ns=docker.io",
        &[("accept", ACCEPT)],
    )
    .await;
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);
    assert_eq!(oci_code(&resp), "MANIFEST_UNKNOWN");
    let sha = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
    let resp = via(
        &s.pt,
        &format!("/v2/library/alpine/blobs/{sha}?ns=docker.io"),
        &[],
    )
    .await;
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);
    assert_eq!(oci_code(&resp), "BLOB_UNKNOWN");
}

/// A manifest by digest that ECR does not hold is counted per registry and logged once per
/// repository, since ECR's pull-through cache would never import it by digest.
#[tokio::test]
async fn digest_misses_are_counted_and_logged_once_per_repository() {
    let s = stack().await;
    let series = "pullthrough_digest_misses_total{registry=\"docker.io\"}";
    assert_eq!(s.pt.metric(series).await, None);
    for sha in [
        "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
        "sha256:1123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
    ] {
        let resp = via(
            &s.pt,
            &format!("/v2/library/pinned/manifests/{sha}?ns=docker.io"),
            &[("accept", ACCEPT)],
        )
        .await;
        assert_eq!(resp.status(), StatusCode::NOT_FOUND);
        assert_eq!(oci_code(&resp), "MANIFEST_UNKNOWN");
    }
    // A tag ECR does not have is not a digest miss.
    let resp = via(
        &s.pt,
        "/v2/library/pinned/manifests/1?ns=docker.io",
        &[("accept", ACCEPT)],
    )
    .await;
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);
    assert_eq!(s.pt.metric(series).await, Some(2.0));
    let log = s.pt.log();
    let lines: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("not in ECR's pull-through cache"))
        .collect();
    assert_eq!(lines.len(), 1, "{log}");
    assert!(
        lines[0].contains("library/pinned") && lines[0].contains("sha256:0123"),
        "{}",
        lines[0]
    );
}

#[tokio::test]
async fn registry_down_is_502() {
    let moto = Moto::start().await;
    let pt = Pullthrough::start(Options::new(
        &format!("http://127.0.0.1:{}", dead_port()),
        &moto.endpoint(),
    ))
    .await;
    let resp = via(&pt, "/v2/library/alpine/manifests/3.19?ns=docker.io", &[]).await;
    assert_eq!(resp.status(), StatusCode::BAD_GATEWAY);
    assert_eq!(oci_code(&resp), "UNKNOWN");
}

#[tokio::test]
async fn a_registry_that_never_answers_is_504() {
    let moto = Moto::start().await;
    let hole = BlackHole::start().await;
    // response_headers = 2s in the default test options.
    let pt = Pullthrough::start(Options::new(&hole.url(), &moto.endpoint())).await;
    let resp = via(&pt, "/v2/library/alpine/manifests/3.19?ns=docker.io", &[]).await;
    assert_eq!(resp.status(), StatusCode::GATEWAY_TIMEOUT);
    let v: serde_json::Value = serde_json::from_slice(resp.body()).unwrap();
    assert!(
        v["errors"][0]["message"].as_str().unwrap().contains("2s"),
        "{v}"
    );
}

#[tokio::test]
async fn token_api_down_means_not_ready_and_503() {
    let registry = Registry::start("unused").await;
    let pt = Pullthrough::start(Options::new(
        &registry.base_url(),
        &format!("http://127.0.0.1:{}", dead_port()),
    ))
    .await;
    assert_eq!(pt.ready_status().await, 503);
    let resp = via(&pt, "/v2/library/alpine/manifests/3.19?ns=docker.io", &[]).await;
    assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(oci_code(&resp), "UNAVAILABLE");
    assert_untouched(&registry);
}

#[tokio::test]
async fn ops_endpoints_report_health_readiness_and_metrics() {
    let s = stack().await;
    assert_eq!(
        get(&format!("{}/healthz", s.pt.ops_url()), &[])
            .await
            .unwrap()
            .status(),
        200
    );
    let mut ready = 0;
    for _ in 0..200 {
        ready = s.pt.ready_status().await;
        if ready == 200 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(ready, 200);
    via(
        &s.pt,
        "/v2/library/alpine/manifests/3.19?ns=docker.io",
        &[("accept", ACCEPT)],
    )
    .await;
    via(
        &s.pt,
        "/v2/library/alpine/manifests/9.9?ns=docker.io",
        &[("accept", ACCEPT)],
    )
    .await;
    let ok = r#"pullthrough_requests_total{registry="docker.io",kind="manifest",code="200"}"#;
    let missing = r#"pullthrough_requests_total{registry="docker.io",kind="manifest",code="404"}"#;
    assert_eq!(s.pt.metric(ok).await, Some(1.0));
    assert_eq!(s.pt.metric(missing).await, Some(1.0));
    let left = s.pt.metric("pullthrough_token_seconds_left").await.unwrap();
    assert!(
        left > 0.0 && left <= 300.0,
        "moto's token gets the 5 min floor: {left}"
    );
    // Each request wrote one access-log line with the fields operators filter on.
    let line =
        s.pt.wait_for_access("/v2/docker-hub/library/alpine/manifests/3.19")
            .await;
    assert_eq!(line["status"], 200);
    assert_eq!(line["registry"], "docker.io");
    assert_eq!(line["cache"], "miss");
    assert_eq!(line["bytes"], s.images.alpine.root.bytes.len());
}

/// A pullthrough with `shutdown` grace, streaming a 64 MiB blob to a client that has read only
/// the response head. The stand-ins come along so they outlive the test's use of them.
async fn big_blob_in_flight(
    shutdown: &str,
) -> (
    Moto,
    Registry,
    Pullthrough,
    Blob,
    http::Response<hyper::body::Incoming>,
) {
    let moto = Moto::start().await;
    let registry = Registry::start(&moto.password()).await;
    let image = Image::with_big_layer("big", 64 << 20);
    registry.push("docker-hub/library/big", "1", &image).await;
    let mut opts = Options::new(&registry.base_url(), &moto.endpoint());
    opts.extra = opts
        .extra
        .replace("shutdown = \"20s\"", &format!("shutdown = \"{shutdown}\""));
    let pt = Pullthrough::start(opts).await;
    let layer = image.largest_layer().clone();
    let url = format!(
        "{}/v2/library/big/blobs/{}?ns=docker.io",
        pt.url(),
        layer.digest
    );
    let resp = send_streaming(request(Method::GET, &url, &[]))
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    (moto, registry, pt, layer, resp)
}

#[tokio::test]
async fn sigterm_lets_an_in_flight_blob_finish() {
    let (_moto, _registry, mut pt, layer, resp) = big_blob_in_flight("20s").await;
    let mut body = resp.into_body();
    let mut received: Vec<u8> = Vec::with_capacity(layer.size());
    // Take the first bytes, so the stream is surely under way, then ask pullthrough to stop.
    let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
    received.extend_from_slice(&first);
    pt.sigterm();
    // New connections are refused once the listener is closed...
    eventually("listener closed", || {
        std::net::TcpStream::connect(pt.host())
            .is_err()
            .then_some(())
    })
    .await;
    // ...while the in-flight body runs to its end.
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame.unwrap().into_data() {
            received.extend_from_slice(&data);
        }
    }
    assert_eq!(received.len(), layer.size());
    assert_eq!(sha256_digest(&received), layer.digest);
    let status = pt
        .wait_exit(Duration::from_secs(30))
        .await
        .expect("pullthrough exits");
    assert!(status.success(), "{status}");
}

/// A response head promising 1000 bytes, and 10 of them.
fn partial_response(content_type: &str) -> Vec<u8> {
    let mut r = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: {content_type}\r\nContent-Length: 1000\r\n\
         Docker-Content-Digest: sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef\r\n\r\n"
    )
    .into_bytes();
    r.extend_from_slice(b"0123456789");
    r
}

#[tokio::test]
async fn an_upstream_dying_mid_blob_aborts_the_client_connection() {
    let sha = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
    for then in [Then::Close, Then::Hold] {
        let moto = Moto::start().await;
        let upstream = RawUpstream::start(partial_response("application/octet-stream"), then).await;
        let pt = Pullthrough::start(Options::new(&upstream.url(), &moto.endpoint())).await;
        // Either the connection dies before the response head (when the failure is seen first),
        // or the head went out and the body fails; it must never end as if complete.
        let sent = send_streaming(request(
            Method::GET,
            &format!("{}/v2/alpine/blobs/{sha}?ns=docker.io", pt.url()),
            &[],
        ))
        .await;
        if let Ok(resp) = sent {
            assert_eq!(resp.status(), StatusCode::OK);
            assert_eq!(header(&resp, "content-length"), "1000");
            let body = resp.into_body().collect().await;
            assert!(body.is_err(), "{then:?}: a truncated blob was completed");
        }
        let line = pt
            .wait_for_access(&format!("/v2/docker-hub/library/alpine/blobs/{sha}"))
            .await;
        assert_eq!(line["body"], "upstream_failed", "{then:?}: {line}");
    }
}

#[tokio::test]
async fn a_truncated_manifest_is_502() {
    let moto = Moto::start().await;
    let upstream = RawUpstream::start(partial_response(MANIFEST), Then::Close).await;
    let pt = Pullthrough::start(Options::new(&upstream.url(), &moto.endpoint())).await;
    let resp = via(&pt, "/v2/alpine/manifests/1?ns=docker.io", &[]).await;
    assert_eq!(resp.status(), StatusCode::BAD_GATEWAY);
}

#[tokio::test]
async fn skopeo_pulls_through_the_path_prefix_form_and_default_upstream() {
    let s = stack().await;
    let mut opts = Options::new(&s.registry.base_url(), &s.moto.endpoint());
    opts.default_upstream = Some("docker.io".into());
    let with_default = Pullthrough::start(opts).await;
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        // CRI-O / podman `location = "<mirror>/docker.io"`.
        (
            format!("docker://{}/docker.io/library/alpine:3.19", s.pt.host()),
            s.images.alpine.digest(),
        ),
        (
            format!(
                "docker://{}/quay.io/prometheus/node-exporter:v1",
                s.pt.host()
            ),
            s.images.node_exporter.digest(),
        ),
        // A client that names no registry at all gets `default_upstream`.
        (
            format!("docker://{}/someorg/app:1", with_default.host()),
            s.images.user_app.digest(),
        ),
    ];
    for (n, (src, digest)) in cases.iter().enumerate() {
        let dest = dir.path().join(n.to_string());
        let out = std::process::Command::new("skopeo")
            .args(["copy", "--src-tls-verify=false", "--retry-times=0", src])
            .arg(format!("dir:{}", dest.display()))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{src}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let manifest = std::fs::read(dest.join("manifest.json")).unwrap();
        assert_eq!(sha256_digest(&manifest), *digest, "{src}");
    }
    let seen = s.registry.paths_seen();
    for p in [
        "/v2/docker-hub/library/alpine/manifests/3.19",
        "/v2/quay/prometheus/node-exporter/manifests/v1",
        "/v2/docker-hub/someorg/app/manifests/1",
    ] {
        assert!(seen.contains(&p.to_string()), "{p} not in {seen:?}");
    }
}

async fn through_raw(
    moto: &Moto,
    response: String,
    path: &str,
    method: Method,
) -> http::Response<Bytes> {
    let upstream = RawUpstream::start(response.into_bytes(), Then::Close).await;
    let pt = Pullthrough::start(Options::new(&upstream.url(), &moto.endpoint())).await;
    send(request(
        method,
        &format!("{}{path}", pt.url()),
        &[("accept", ACCEPT)],
    ))
    .await
    .unwrap()
}

#[tokio::test]
async fn upstream_statuses_map_to_what_makes_containerd_fall_back() {
    let sha = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
    let blob = format!("/v2/alpine/blobs/{sha}?ns=docker.io");
    let moto = Moto::start().await;
    for (upstream, want, code) in [
        (500, 502, "UNKNOWN"),
        (503, 502, "UNKNOWN"),
        (429, 503, "UNAVAILABLE"),
        (408, 503, "UNAVAILABLE"),
        (403, 404, "BLOB_UNKNOWN"),
        (404, 404, "BLOB_UNKNOWN"),
    ] {
        let raw =
            format!("HTTP/1.1 {upstream} X\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
        let resp = through_raw(&moto, raw, &blob, Method::GET).await;
        assert_eq!(resp.status().as_u16(), want, "upstream {upstream}");
        assert_eq!(oci_code(&resp), code, "upstream {upstream}");
    }
}

#[tokio::test]
async fn blob_redirects_go_back_unchanged() {
    let sha = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
    let location = "https://prod-eu-west-1-starport-layer-bucket.s3.eu-west-1.amazonaws.com/x?X-Amz-Signature=abc";
    let raw = format!(
        "HTTP/1.1 307 Temporary Redirect\r\nLocation: {location}\r\nContent-Length: 0\r\n\r\n"
    );
    let resp = through_raw(
        &Moto::start().await,
        raw,
        &format!("/v2/alpine/blobs/{sha}?ns=docker.io"),
        Method::GET,
    )
    .await;
    assert_eq!(resp.status(), StatusCode::TEMPORARY_REDIRECT);
    assert_eq!(header(&resp, "location"), location);
}

#[tokio::test]
async fn manifest_without_a_digest_header_gets_its_sha256() {
    let body = r#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json"}"#;
    let raw = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: {MANIFEST}\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let resp = through_raw(
        &Moto::start().await,
        raw,
        "/v2/alpine/manifests/1?ns=docker.io",
        Method::HEAD,
    )
    .await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(
        header(&resp, "docker-content-digest"),
        sha256_digest(body.as_bytes())
    );
    assert_eq!(header(&resp, "content-length"), body.len().to_string());
    assert_eq!(header(&resp, "content-type"), MANIFEST);
}

#[tokio::test]
async fn a_manifest_that_does_not_match_its_digest_is_refused() {
    let body = r#"{"schemaVersion":2}"#;
    let raw = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: {MANIFEST}\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let sha = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
    let resp = through_raw(
        &Moto::start().await,
        raw,
        &format!("/v2/alpine/manifests/{sha}?ns=docker.io"),
        Method::GET,
    )
    .await;
    assert_eq!(resp.status(), StatusCode::BAD_GATEWAY);
    assert_eq!(oci_code(&resp), "MANIFEST_INVALID");
}

#[tokio::test]
async fn a_refusal_that_a_new_token_cannot_fix_is_404_after_one_retry() {
    let moto = Moto::start().await;
    // The registry does not take moto's token at all (a missing permission, say).
    let registry = Registry::start("another-password").await;
    let pt = Pullthrough::start(Options::new(&registry.base_url(), &moto.endpoint())).await;
    let path = "/v2/library/alpine/manifests/3.19?ns=docker.io";
    let resp = via(&pt, path, &[("accept", ACCEPT)]).await;
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);
    assert_eq!(oci_code(&resp), "MANIFEST_UNKNOWN");
    let statuses: Vec<u16> = registry.requests().iter().map(|(_, _, st)| *st).collect();
    assert_eq!(statuses, vec![401, 401], "one retry with a fresh token");
    let calls = moto.token_calls();
    assert_eq!(calls, 2, "start-up fetch and one refetch");
    // More refusals right after: no retry, no token call each.
    for _ in 0..5 {
        assert_eq!(
            via(&pt, path, &[("accept", ACCEPT)]).await.status(),
            StatusCode::NOT_FOUND
        );
    }
    assert_eq!(registry.requests().len(), 7);
    assert_eq!(moto.token_calls(), calls);
}

#[tokio::test]
async fn a_tag_whose_digest_header_lies_is_refused() {
    let body = r#"{"schemaVersion":2}"#;
    let sha = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
    let raw = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: {MANIFEST}\r\nDocker-Content-Digest: {sha}\r\n\
         Content-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let resp = through_raw(
        &Moto::start().await,
        raw,
        "/v2/alpine/manifests/1?ns=docker.io",
        Method::HEAD,
    )
    .await;
    assert_eq!(resp.status(), StatusCode::BAD_GATEWAY);
    assert!(resp.headers().get("docker-content-digest").is_none());
}

#[tokio::test]
async fn sigterm_exits_0_after_the_grace_period_even_with_a_stuck_client() {
    let (_moto, _registry, mut pt, _layer, resp) = big_blob_in_flight("1s").await;
    // The client reads nothing more: the drain cannot finish within the grace period.
    pt.sigterm();
    let status = pt
        .wait_exit(Duration::from_secs(30))
        .await
        .expect("pullthrough exits");
    assert_eq!(status.code(), Some(0));
    assert!(pt.log().contains("grace period over"), "{}", pt.log());
    drop(resp);
}

/// Blob bodies stream byte-exact, whole and ranged, with manifests before and after them on the
/// same kept-alive client connection, and every byte is counted.
#[tokio::test]
async fn blob_bodies_stream_byte_exact_on_a_kept_alive_connection() {
    use http_body_util::Empty;
    use hyper_util::rt::TokioIo;

    let s = stack().await;
    // Many reads of the upstream connection, and not a multiple of one.
    let blob = Blob::new(
        crate::support::image::LAYER_TAR,
        crate::support::image::random_bytes(3 * 1024 * 1024 + 12_345, 11),
    );
    s.registry
        .push_blob("docker-hub/library/alpine", &blob)
        .await;
    let stream = tokio::net::TcpStream::connect(s.pt.host()).await.unwrap();
    let (mut conn, driver) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(driver);
    let host = s.pt.host();
    let mut get_on_conn = async |path: &str, range: Option<&str>| {
        let mut req = http::Request::builder()
            .uri(path)
            .header("host", &host)
            .header("accept", ACCEPT);
        if let Some(r) = range {
            req = req.header("range", r);
        }
        let resp = conn
            .send_request(req.body(Empty::<Bytes>::new()).unwrap())
            .await
            .unwrap();
        let (parts, body) = resp.into_parts();
        (parts.status, body.collect().await.unwrap().to_bytes())
    };
    let manifest = "/v2/library/alpine/manifests/3.19?ns=docker.io";
    let blob_path = format!("/v2/library/alpine/blobs/{}?ns=docker.io", blob.digest);

    let (status, body) = get_on_conn(manifest, None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body, s.images.alpine.root.bytes);
    let (status, body) = get_on_conn(&blob_path, None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(sha256_digest(&body), blob.digest);
    let (status, body) = get_on_conn(&blob_path, Some("bytes=1000-600000")).await;
    assert_eq!(status, StatusCode::PARTIAL_CONTENT);
    assert_eq!(body, blob.bytes.slice(1000..600_001));
    let (status, body) = get_on_conn(manifest, None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body, s.images.alpine.root.bytes);

    let total = (blob.size() + 600_001 - 1000) as f64;
    let counted =
        s.pt.metric("pullthrough_upstream_body_bytes_total{registry=\"docker.io\",kind=\"blob\"}")
            .await;
    assert_eq!(counted, Some(total));
}
