//! `pullthrough ecr`: the real binary against moto (repositories, tokens) and docker-registry
//! standing in for the ECR registry endpoint, behind the ECR-like stand-in ([`EcrFront`]) where
//! `warm` depends on how ECR's pull-through cache behaves. The rule, template and policy APIs moto lacks are
//! covered by aws-smithy-mocks in `src/ecr`.

use std::path::Path;
use std::process::{Command, Output};

use aws_sdk_ecr::config::{BehaviorVersion, Credentials, Region};

use crate::support::ecr_front::{EcrFront, FrontOptions};
use crate::support::image::Image;
use crate::support::moto::Moto;
use crate::support::pullthrough::TEST_TIMEOUTS;
use crate::support::registry::Registry;
use crate::support::{free_port, pullthrough_bin};

/// `pullthrough ecr <args>` with the ECR API pointed at `ecr_api` and no real identity.
fn ecr_command(args: &[&str], ecr_api: &str) -> Command {
    let mut c = Command::new(pullthrough_bin());
    c.arg("ecr").args(args);
    crate::support::pullthrough::test_aws_env(&mut c, ecr_api, "warn");
    c
}

/// Starts `pullthrough ecr cleanup --prefix docker-hub --apply` in the background, with its
/// output captured, for the tests that interrupt it.
fn spawn_cleanup_apply(config: &str, ecr_api: &str) -> std::process::Child {
    ecr_command(
        &[
            "cleanup",
            "--config",
            config,
            "--prefix",
            "docker-hub",
            "--apply",
        ],
        ecr_api,
    )
    .stdout(std::process::Stdio::piped())
    .stderr(std::process::Stdio::piped())
    .spawn()
    .expect("spawn pullthrough ecr cleanup")
}

/// Runs `pullthrough ecr <args>`; not a terminal here, so no progress bar: stdout is only the
/// report.
fn ecr(args: &[&str], ecr_api: &str) -> Output {
    ecr_command(args, ecr_api)
        .output()
        .expect("run pullthrough ecr")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn write_config(dir: &Path, text: &str) -> String {
    let path = dir.join("pullthrough.toml");
    std::fs::write(&path, text).expect("write config");
    path.display().to_string()
}

/// An SDK client on moto, for arranging and inspecting repositories.
fn moto_client(moto: &Moto) -> aws_sdk_ecr::Client {
    let http = pullthrough::mirror::forward::SdkHttpClient::new().expect("SDK HTTP client");
    let conf = aws_sdk_ecr::Config::builder()
        .behavior_version(BehaviorVersion::latest())
        .endpoint_url(moto.endpoint())
        .region(Region::new("us-east-1"))
        .credentials_provider(Credentials::new("testing", "testing", None, None, "test"))
        .http_client(http)
        .build();
    aws_sdk_ecr::Client::from_conf(conf)
}

async fn create_repositories(
    client: &aws_sdk_ecr::Client,
    names: impl IntoIterator<Item = String>,
) {
    for name in names {
        client
            .create_repository()
            .repository_name(name)
            .send()
            .await
            .expect("create repository");
    }
}

async fn repository_names(client: &aws_sdk_ecr::Client) -> Vec<String> {
    let mut names: Vec<String> = client
        .describe_repositories()
        .send()
        .await
        .expect("describe repositories")
        .repositories()
        .iter()
        .filter_map(|r| r.repository_name().map(str::to_owned))
        .collect();
    names.sort();
    names
}

const CLEANUP_CONFIG: &str = "[ecr]\nregion = \"us-east-1\"\naccount = \"123456789012\"\n\
    [upstreams.\"docker.io\"]\nprefix = \"docker-hub\"\n[upstreams.\"quay.io\"]\nprefix = \"quay\"\n";

#[tokio::test(flavor = "multi_thread")]
async fn cleanup_lists_then_deletes_exactly_the_prefixed_repositories() {
    let moto = Moto::start().await;
    let client = moto_client(&moto);
    // More than 100 repositories, plus neighbours that must survive: a sibling whose name merely
    // starts with the prefix, and another upstream's. moto answers DescribeRepositories in one
    // page whatever maxResults says, so this cannot catch a paging bug; the aws-smithy-mocks
    // test in src/ecr_ops/cleanup.rs lists and deletes three pages.
    const N: usize = 105;
    create_repositories(&client, (0..N).map(|i| format!("docker-hub/app-{i:03}"))).await;
    create_repositories(
        &client,
        ["docker-hubx/keep", "quay/org/keep"].map(String::from),
    )
    .await;
    let manifest = Image::small("cleanup").root;
    client
        .put_image()
        .repository_name("docker-hub/app-000")
        .image_manifest(String::from_utf8(manifest.bytes.to_vec()).unwrap())
        .image_manifest_media_type(manifest.media_type)
        .image_tag("1")
        .send()
        .await
        .expect("put image");

    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), CLEANUP_CONFIG);

    // Without --apply: a listing, nothing deleted.
    let out = ecr(
        &["cleanup", "--config", &config, "--prefix", "docker-hub"],
        &moto.endpoint(),
    );
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}{}",
        stdout(&out),
        stderr(&out)
    );
    let text = stdout(&out);
    let rows: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("docker-hub/"))
        .collect();
    assert_eq!(rows.len(), N, "{text}");
    assert!(
        rows[0].starts_with("docker-hub/app-000") && rows[0].contains("  1  "),
        "{}",
        rows[0]
    );
    assert!(
        text.contains(&format!("{N} repositories, 1 images,")),
        "{text}"
    );
    assert!(text.contains("Dry run: nothing deleted."), "{text}");
    assert_eq!(repository_names(&client).await.len(), N + 2);

    // A prefix outside the configured ones needs --any-prefix.
    let out = ecr(
        &["cleanup", "--config", &config, "--prefix", "docker-hubx"],
        &moto.endpoint(),
    );
    assert_eq!(out.status.code(), Some(64), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("--prefix \"docker-hubx\" is not one of the configured pull-through prefixes (docker-hub, quay); pass --any-prefix"),
        "{}",
        stderr(&out)
    );
    let out = ecr(
        &[
            "cleanup",
            "--config",
            &config,
            "--prefix",
            "docker-hubx",
            "--any-prefix",
        ],
        &moto.endpoint(),
    );
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("docker-hubx/keep"),
        "{}",
        stdout(&out)
    );
    assert_eq!(repository_names(&client).await.len(), N + 2);

    // With --apply: exactly the prefixed ones go.
    let out = ecr(
        &[
            "cleanup",
            "--config",
            &config,
            "--prefix",
            "docker-hub",
            "--apply",
        ],
        &moto.endpoint(),
    );
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}{}",
        stdout(&out),
        stderr(&out)
    );
    assert!(
        stdout(&out).contains(&format!("Deleted {N} of {N} repositories.")),
        "{}",
        stdout(&out)
    );
    assert_eq!(
        repository_names(&client).await,
        ["docker-hubx/keep", "quay/org/keep"]
    );
}

/// docker-registry as the ECR registry endpoint, with moto's token as its password.
async fn registry_config(dir: &Path, registry: &Registry, extra: &str) -> String {
    write_config(
        dir,
        &format!(
            "[ecr]\nregion = \"us-east-1\"\naccount = \"123456789012\"\nendpoint = \"{}\"\n{TEST_TIMEOUTS}\
             [upstreams.\"docker.io\"]\nprefix = \"docker-hub\"\n[upstreams.\"quay.io\"]\nprefix = \"quay\"\n{extra}",
            registry.base_url()
        ),
    )
}

/// The ECR-like stand-in before `registry`, importing from `hub` for both test upstreams, and a
/// config pointing `ecr.endpoint` at it.
async fn front_config(
    dir: &Path,
    registry: &Registry,
    hub: &Registry,
    options: FrontOptions,
) -> (EcrFront, String) {
    let options = options
        .upstream_registry("docker-hub", hub)
        .upstream_registry("quay", hub);
    let front = EcrFront::start(registry, options).await;
    let config = write_config(
        dir,
        &format!(
            "[ecr]\nregion = \"us-east-1\"\naccount = \"123456789012\"\nendpoint = \"{}\"\n{TEST_TIMEOUTS}\
             [upstreams.\"docker.io\"]\nprefix = \"docker-hub\"\n[upstreams.\"quay.io\"]\nprefix = \"quay\"\n",
            front.base_url()
        ),
    );
    (front, config)
}

/// Warm against ECR's behaviour: each tag GET makes ECR import the image from its upstream, and
/// the platform manifests of an index are then served by digest.
#[tokio::test(flavor = "multi_thread")]
async fn warm_gets_the_tag_and_every_platform_manifest_of_an_index() {
    let moto = Moto::start().await;
    let registry = Registry::start(&moto.password()).await;
    let hub = Registry::start_open().await;
    let multi = Image::multi_arch("warm-multi");
    let single = Image::small("warm-single");
    hub.push("library/warmme", "1.0", &multi).await;
    hub.push("org/single", "2", &single).await;

    let dir = tempfile::tempdir().unwrap();
    let (front, config) = front_config(dir.path(), &registry, &hub, FrontOptions::new()).await;
    let list = dir.path().join("images.txt");
    std::fs::write(&list, "# from a file\nquay.io/org/single:2\n").unwrap();
    let out = ecr(
        &[
            "warm",
            "--config",
            &config,
            "--file",
            &list.display().to_string(),
            "warmme:1.0",
        ],
        &moto.endpoint(),
    );
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}{}",
        stdout(&out),
        stderr(&out)
    );
    let text = stdout(&out);
    assert!(
        text.contains("docker.io/library/warmme:1.0  docker-hub/library/warmme"),
        "{text}"
    );
    assert!(text.contains("ok (index, 2 platform manifests)"), "{text}");
    assert!(
        text.contains("2 of 2 images warmed, 4 manifests fetched."),
        "{text}"
    );

    // ECR imported each image on its tag GET, then served each child of the index by digest.
    let mut imports = front.imports();
    imports.sort();
    assert_eq!(
        imports,
        ["docker-hub/library/warmme:1.0", "quay/org/single:2"],
        "{}",
        front.log_text()
    );
    for m in &multi.manifests {
        let path = format!("/v2/docker-hub/library/warmme/manifests/{}", m.digest());
        assert_eq!(
            front.wait_for_ecr("GET", &path).await.status,
            Some(200),
            "{path}"
        );
    }
    // Only manifests: warm never pulls a blob.
    assert!(
        front
            .ecr_requests()
            .iter()
            .all(|r| !r.path.contains("/blobs/"))
            && front.s3_requests().is_empty(),
        "{}",
        front.log_text()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn warm_reports_failures_and_exits_1() {
    let moto = Moto::start().await;
    let registry = Registry::start(&moto.password()).await;
    let dir = tempfile::tempdir().unwrap();
    let config = registry_config(dir.path(), &registry, "").await;
    let out = ecr(
        &[
            "warm",
            "--config",
            &config,
            "alpine:missing",
            "ghcr.io/org/app:1",
        ],
        &moto.endpoint(),
    );
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}{}",
        stdout(&out),
        stderr(&out)
    );
    let text = stdout(&out);
    assert!(
        text.contains(
            "FAILED: ECR answered 404 Not Found for /v2/docker-hub/library/alpine/manifests/missing"
        ),
        "{text}"
    );
    assert!(
        text.contains("FAILED: ghcr.io is not a configured upstream"),
        "{text}"
    );
    assert!(text.contains("0 of 2 images warmed"), "{text}");

    let out = ecr(&["warm", "--config", &config], &moto.endpoint());
    assert_eq!(out.status.code(), Some(64));
    assert!(
        stderr(&out).contains("name at least one image, or --file"),
        "{}",
        stderr(&out)
    );
}

/// A `kubectl get … -o json` style `List` of pods and workloads naming `images` (one pod per
/// image, in `shop`), plus a Deployment, a CronJob and a Service.
fn pods_json(pod_images: &[String], deployment_image: &str, cron_image: &str) -> String {
    let mut items: Vec<serde_json::Value> = pod_images
        .iter()
        .enumerate()
        .map(|(i, image)| {
            serde_json::json!({
                "apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": format!("pod-{i}"), "namespace": "shop"},
                "spec": {"containers": [{"name": "app", "image": image}]}
            })
        })
        .collect();
    items.push(serde_json::json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": "web", "namespace": "shop"},
        "spec": {"selector": {}, "template": {"spec": {
            "initContainers": [{"name": "init", "image": deployment_image}],
            "containers": [{"name": "web", "image": deployment_image}]
        }}}
    }));
    items.push(serde_json::json!({
        "apiVersion": "batch/v1", "kind": "CronJob",
        "metadata": {"name": "nightly", "namespace": "shop"},
        "spec": {"schedule": "@daily", "jobTemplate": {"spec": {"template": {"spec": {
            "containers": [{"name": "job", "image": cron_image}]
        }}}}}
    }));
    items.push(serde_json::json!({
        "apiVersion": "v1", "kind": "Service", "metadata": {"name": "web", "namespace": "shop"}
    }));
    serde_json::json!({"apiVersion": "v1", "kind": "List", "items": items}).to_string()
}

/// Every outcome of `--from-pods`, against ECR's behaviour (the stand-in, re-checking every tag
/// upstream on each GET, so a tag moved upstream moves in ECR at once), each image warmed once
/// however often it is named:
/// - a pinned digest the tag points at is cached; one that is an index's platform manifest too;
/// - a tag that moved: the pinned digest still cached from before, or never imported (then it
///   cannot enter by tag, which is reported but is no failure);
/// - a digest-only image and one on no configured upstream are skipped, not failed;
/// - only a failed warm makes the exit status 1.
#[tokio::test(flavor = "multi_thread")]
async fn warm_from_pods_reports_each_image_once_with_what_became_of_its_digest() {
    let moto = Moto::start().await;
    let registry = Registry::start(&moto.password()).await;
    let hub = Registry::start_open().await;
    let web = Image::small("fp-web");
    let multi = Image::multi_arch("fp-multi");
    let old = Image::small("fp-old");
    let new = Image::small("fp-new");
    let gone = Image::small("fp-never-pushed");
    let cron = Image::small("fp-cron");
    hub.push("library/web", "1", &web).await;
    hub.push("org/multi", "3", &multi).await;
    hub.push("library/moved", "2", &old).await;
    hub.push("acme/cron", "7", &cron).await;
    let dir = tempfile::tempdir().unwrap();
    let (front, config) = front_config(
        dir.path(),
        &registry,
        &hub,
        FrontOptions::new().tag_recheck("0"),
    )
    .await;
    // `moved:2` is cached while it points at `old`; then it moves upstream to `new`.
    let out = ecr(&["warm", "--config", &config, "moved:2"], &moto.endpoint());
    assert_eq!(out.status.code(), Some(0), "{}", stdout(&out));
    hub.push("library/moved", "2", &new).await;
    front.clear_log();

    let amd64 = multi.manifests[0].digest();
    let pods = [
        format!("web:1@{}", web.digest()),
        // The same image, spelt another way: warmed once.
        format!("docker.io/library/web:1@{}", web.digest()),
        format!("quay.io/org/multi:3@{amd64}"),
        format!("moved:2@{}", old.digest()),
        format!("docker.io/library/moved:2@{}", gone.digest()),
        format!("nginx@{}", web.digest()),
        "ghcr.io/org/app:1".to_owned(),
    ];
    let file = dir.path().join("pods.json");
    std::fs::write(
        &file,
        pods_json(&pods, "quay.io/org/multi:3", "acme/cron:7"),
    )
    .unwrap();
    let out = ecr(
        &[
            "warm",
            "--config",
            &config,
            "--from-pods",
            file.to_str().unwrap(),
        ],
        &moto.endpoint(),
    );
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(0), "{text}{}", stderr(&out));
    let row = |image: &str| -> String {
        text.lines()
            .find(|l| l.starts_with(&format!("{image} ")))
            .unwrap_or_else(|| panic!("no row for {image} in:\n{text}"))
            .to_owned()
    };
    assert!(
        text.starts_with(&format!(
            "--from-pods {}: 9 object(s) with a pod spec, 9 image(s) (left out, no pod spec: 1 Service).\n",
            file.display()
        )),
        "{text}"
    );
    let web_ref = format!("docker.io/library/web:1@{}", web.digest());
    assert!(
        row(&web_ref).ends_with("ok; pinned digest cached"),
        "{text}"
    );
    assert!(
        row(&format!("quay.io/org/multi:3@{amd64}"))
            .ends_with("ok (index, 2 platform manifests); pinned digest cached"),
        "{text}"
    );
    assert!(
        row(&format!("docker.io/library/moved:2@{}", old.digest())).ends_with(&format!(
            "ok; the tag moved to {}, the pinned digest is still cached",
            new.digest()
        )),
        "{text}"
    );
    assert!(
        row(&format!("docker.io/library/moved:2@{}", gone.digest())).ends_with(&format!(
            "TAG MOVED: the tag now points at {}; the pinned digest is not in ECR and cannot \
             enter the cache by tag",
            new.digest()
        )),
        "{text}"
    );
    assert!(
        row(&format!("docker.io/library/nginx@{}", web.digest()))
            .ends_with("skipped: no tag to import by: ECR fills its cache only from a pull by tag"),
        "{text}"
    );
    assert!(
        row("ghcr.io/org/app:1").ends_with(
            "skipped: ghcr.io is not a configured upstream, so it has no pull-through prefix"
        ),
        "{text}"
    );
    assert!(row("quay.io/org/multi:3").contains("ok (index, 2 platform manifests)"));
    assert!(row("docker.io/acme/cron:7").ends_with("  ok"), "{text}");
    // 9 images named, 8 after dedupe: 6 warmed, 2 skipped.
    assert!(
        text.lines()
            .last()
            .unwrap()
            .starts_with("6 of 8 images warmed,")
            && text.ends_with(
                " 1 pinned digest(s) cannot enter the cache by tag (the tag moved). 2 skipped.\n"
            ),
        "{text}"
    );

    // What ECR saw: each tag GET once per image naming it, the pinned digests by digest, and the
    // never-imported one answered 404 whatever the upstream has.
    let gets = |path: &str| {
        front
            .ecr_requests()
            .iter()
            .filter(|r| r.method == "GET" && r.path == path)
            .count()
    };
    assert_eq!(gets("/v2/docker-hub/library/web/manifests/1"), 1);
    assert_eq!(
        gets(&format!(
            "/v2/docker-hub/library/web/manifests/{}",
            web.digest()
        )),
        1
    );
    let missing = format!("/v2/docker-hub/library/moved/manifests/{}", gone.digest());
    assert_eq!(front.wait_for_ecr("GET", &missing).await.status, Some(404));
    // Nothing for the skipped ones, and never a blob.
    let paths: Vec<String> = front.ecr_requests().into_iter().map(|r| r.path).collect();
    assert!(
        paths
            .iter()
            .all(|p| !p.contains("/blobs/") && !p.contains("nginx") && !p.contains("ghcr")),
        "{paths:?}"
    );

    // A pod whose tag ECR cannot import fails the run (exit 1), and the rest are still warmed.
    let missing = format!("web:404@{}", web.digest());
    std::fs::write(&file, pods_json(&[missing], "acme/cron:7", "acme/cron:7")).unwrap();
    let out = ecr(
        &[
            "warm",
            "--config",
            &config,
            "--from-pods",
            file.to_str().unwrap(),
        ],
        &moto.endpoint(),
    );
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(1), "{text}{}", stderr(&out));
    assert!(
        text.contains(
            "FAILED: ECR answered 404 Not Found for /v2/docker-hub/library/web/manifests/404"
        ),
        "{text}"
    );
    assert!(
        text.ends_with("1 of 2 images warmed, 1 manifests fetched. 1 failed.\n"),
        "{text}"
    );
}

/// A document `--from-pods` cannot read is a usage error (exit 64) naming the file (or stdin)
/// and what is wrong, before any request.
#[rstest::rstest]
#[case::not_json("{\"kind\": \"List\", ", "not JSON")]
#[case::typed_field_wrong(
    r#"{"kind": "List", "items": [{"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "web-1", "namespace": "shop"}, "spec": {"containers": "nginx"}}]}"#,
    "item 0 (Pod shop/web-1): not a valid Pod: invalid type: string \"nginx\", expected a sequence"
)]
#[case::no_kind("{\"items\": []}", "the object: no `kind`")]
fn warm_from_pods_refuses_what_does_not_parse(
    #[case] doc: &str,
    #[case] want: &str,
    #[values(true, false)] stdin: bool,
) {
    use std::io::Write;
    // Nothing is listening here: a request would fail, not hang, and exit 1, not 64.
    let api = format!("http://127.0.0.1:{}", crate::support::dead_port());
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), CLEANUP_CONFIG);
    let file = dir.path().join("pods.json");
    std::fs::write(&file, doc).unwrap();
    let source = if stdin {
        "-".to_owned()
    } else {
        file.display().to_string()
    };
    let mut child = ecr_command(&["warm", "--config", &config, "--from-pods", &source], &api)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut input = child.stdin.take().unwrap();
    if stdin {
        input.write_all(doc.as_bytes()).unwrap();
    }
    drop(input);
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(64), "{}", stderr(&out));
    let label = if stdin {
        "- (stdin)".to_owned()
    } else {
        source
    };
    assert!(
        stderr(&out).contains(&format!("--from-pods {label}: {want}")),
        "{}",
        stderr(&out)
    );
    assert_eq!(stdout(&out), "");
}

/// An ECR registry endpoint that accepts connections, reads each request head, reports its
/// request line on `seen`, and never answers.
fn silent_registry(seen: std::sync::mpsc::Sender<String>) -> (String, std::net::TcpListener) {
    use std::io::{BufRead, BufReader};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let accepting = listener.try_clone().unwrap();
    std::thread::spawn(move || {
        for conn in accepting.incoming() {
            let Ok(conn) = conn else { return };
            let seen = seen.clone();
            std::thread::spawn(move || {
                let mut reader = BufReader::new(conn);
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap_or(0) > 0 {
                    let _ = seen.send(line.trim().to_owned());
                }
                // Held open, unanswered, until the client gives up.
                let mut rest = Vec::new();
                let _ = std::io::Read::read_to_end(&mut reader, &mut rest);
            });
        }
    });
    (url, listener)
}

/// Starts `ecr warm` of three images, one at a time, against a registry that never answers, and
/// returns it once the first tag request is in flight.
fn spawn_hung_warm(
    moto: &Moto,
    dir: &Path,
    response_headers: &str,
) -> (
    std::process::Child,
    std::sync::mpsc::Receiver<String>,
    std::net::TcpListener,
) {
    let (tx, seen) = std::sync::mpsc::channel();
    let (url, listener) = silent_registry(tx);
    let config = write_config(
        dir,
        &format!(
            "[ecr]\nregion = \"us-east-1\"\naccount = \"123456789012\"\nendpoint = \"{url}\"\n\
             [timeouts]\nconnect = \"1s\"\nresponse_headers = \"{response_headers}\"\n\
             [upstreams.\"docker.io\"]\nprefix = \"docker-hub\"\n"
        ),
    );
    let child = ecr_command(
        &[
            "warm",
            "--config",
            &config,
            "--concurrency",
            "1",
            "one:1",
            "two:1",
            "three:1",
        ],
        &moto.endpoint(),
    )
    .stdout(std::process::Stdio::piped())
    .stderr(std::process::Stdio::piped())
    .spawn()
    .unwrap();
    let first = seen
        .recv_timeout(std::time::Duration::from_secs(60))
        .expect("the first warm never reached the registry");
    assert_eq!(first, "GET /v2/docker-hub/library/one/manifests/1 HTTP/1.1");
    (child, seen, listener)
}

/// Ctrl-C during warm starts no other warm, lets the one in flight end (here: its response
/// timeout), prints the report with what was not warmed, and exits 1.
#[tokio::test(flavor = "multi_thread")]
async fn ctrl_c_during_warm_lets_the_warm_in_flight_end_and_reports_the_rest() {
    let moto = Moto::start().await;
    let dir = tempfile::tempdir().unwrap();
    let (child, seen, _registry) = spawn_hung_warm(&moto, dir.path(), "2s");
    let status = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let out = child.wait_with_output().unwrap();
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(1), "{text}{}", stderr(&out));
    assert!(
        text.contains("FAILED: ") && text.matches("not warmed: interrupted").count() == 2,
        "{text}"
    );
    assert!(
        text.ends_with(
            "0 of 3 images warmed, 0 manifests fetched. 1 failed. 2 not warmed (interrupted).\n"
        ),
        "{text}"
    );
    assert!(
        stderr(&out).contains("interrupted: 2 image(s) not warmed (listed above)"),
        "{}",
        stderr(&out)
    );
    // No request was started after the signal.
    assert!(seen.try_recv().is_err());
}

/// A second Ctrl-C drops the warm in flight too: every image is reported as not warmed.
#[tokio::test(flavor = "multi_thread")]
async fn a_second_ctrl_c_drops_the_warm_in_flight() {
    let moto = Moto::start().await;
    let dir = tempfile::tempdir().unwrap();
    let (mut child, seen, _registry) = spawn_hung_warm(&moto, dir.path(), "1h");
    // Signals sent close together may arrive as one, so keep interrupting until it exits; the
    // warm in flight would wait an hour for its answer.
    for _ in 0..300 {
        if child.try_wait().unwrap().is_some() {
            break;
        }
        let _ = Command::new("kill")
            .args(["-INT", &child.id().to_string()])
            .status();
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    if child.try_wait().unwrap().is_none() {
        let _ = child.kill();
        panic!("repeated Ctrl-C did not end warm");
    }
    let out = child.wait_with_output().unwrap();
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(1), "{text}{}", stderr(&out));
    assert_eq!(text.matches("not warmed: interrupted").count(), 3, "{text}");
    assert!(seen.try_recv().is_err());
}

#[tokio::test(flavor = "multi_thread")]
async fn check_reports_the_token_and_a_pull_and_fails_on_missing_rules() {
    let moto = Moto::start().await;
    let registry = Registry::start(&moto.password()).await;
    registry
        .push("quay/org/small", "1", &Image::small("check"))
        .await;
    let dir = tempfile::tempdir().unwrap();
    let config = registry_config(dir.path(), &registry, "").await;
    let out = ecr(
        &[
            "check",
            "--config",
            &config,
            "--pull",
            "quay.io/org/small:1",
        ],
        &moto.endpoint(),
    );
    let text = stdout(&out);
    // moto has no pull-through rules API, so the rule checks fail: exit 1.
    assert_eq!(out.status.code(), Some(1), "{text}{}", stderr(&out));
    let line = |start: &str| {
        text.lines()
            .find(|l| l.starts_with(start))
            .unwrap_or_else(|| panic!("no line starting {start:?} in:\n{text}"))
            .to_owned()
    };
    assert!(
        line("pass  token").contains("GetAuthorizationToken answered"),
        "{text}"
    );
    let pull = line("pass  pull quay.io/org/small:1");
    assert!(
        pull.contains("quay/org/small:1 answered application/vnd.oci.image.manifest.v1+json"),
        "{pull}"
    );
    assert!(pull.contains("time to first byte"), "{pull}");
    assert!(
        line("FAIL  rules").contains("unexpected answer from the ECR API: HTTP 500"),
        "{text}"
    );
    // docker.io takes a credential and the config has none.
    assert!(
        line("FAIL  credential docker-hub").contains("ecr_setup.credentials.\"docker.io\""),
        "{text}"
    );
    assert!(
        line("warn  registry policy").contains("no ecr_setup.node_role_arns"),
        "{text}"
    );
    assert_eq!(
        registry
            .wait_for_request("GET", "/v2/quay/org/small/manifests/1")
            .await,
        200
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn check_fails_the_token_line_when_the_api_is_down() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), CLEANUP_CONFIG);
    let dead = format!("http://127.0.0.1:{}", free_port());
    let out = ecr(&["check", "--config", &config], &dead);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(
        text.lines()
            .any(|l| l.starts_with("FAIL  token") && l.contains("GetAuthorizationToken failed")),
        "{text}"
    );
}

#[test]
fn setup_without_a_required_credential_exits_64_before_calling_aws() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), CLEANUP_CONFIG);
    // A dead API endpoint: the usage error must come first.
    let dead = format!("http://127.0.0.1:{}", free_port());
    let out = ecr(&["setup", "--config", &config], &dead);
    assert_eq!(out.status.code(), Some(64), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("ecr_setup.credentials.\"docker.io\": Docker Hub pull-through rules need a Secrets Manager secret whose name starts with \"ecr-pullthroughcache/\""),
        "{}",
        stderr(&out)
    );
}

#[test]
fn a_secret_without_the_required_name_prefix_exits_64_naming_the_line() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(
        dir.path(),
        &format!(
            "{CLEANUP_CONFIG}[ecr_setup.credentials]\n\"docker.io\" = \"arn:aws:secretsmanager:us-east-1:123456789012:secret:dockerhub-AbCdEf\"\n"
        ),
    );
    let out = ecr(&["setup", "--config", &config], "http://127.0.0.1:9");
    assert_eq!(out.status.code(), Some(64));
    assert!(
        stderr(&out).contains(&format!(
            "{config}:9: ecr_setup.credentials.\"docker.io\": \"arn:aws:secretsmanager:us-east-1:123456789012:secret:dockerhub-AbCdEf\" names the secret \"dockerhub-AbCdEf\": ECR only uses secrets whose name starts with \"ecr-pullthroughcache/\""
        )),
        "{}",
        stderr(&out)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn ctrl_c_during_cleanup_leaves_every_repository_deleted_or_untouched() {
    let moto = Moto::start().await;
    let client = moto_client(&moto);
    const N: usize = 300;
    create_repositories(&client, (0..N).map(|i| format!("docker-hub/img-{i:03}"))).await;
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), CLEANUP_CONFIG);
    let child = spawn_cleanup_apply(&config, &moto.endpoint());
    // Interrupt as soon as the deleting has started.
    crate::support::eventually("the first repository deleted", || {
        let remaining = tokio::task::block_in_place(|| {
            tokio::runtime::Handle::current().block_on(repository_names(&client))
        });
        (remaining.len() < N).then_some(())
    })
    .await;
    let status = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let out = tokio::task::spawn_blocking(move || child.wait_with_output().unwrap())
        .await
        .unwrap();
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(1), "{text}{}", stderr(&out));
    let untouched: Vec<String> = text
        .lines()
        .filter_map(|l| l.strip_prefix("  not deleted (interrupted): "))
        .map(str::to_owned)
        .collect();
    assert!(
        !untouched.is_empty(),
        "the interrupt came too late to test anything:\n{text}"
    );
    assert!(
        text.contains(&format!(
            "Deleted {} of {N} repositories.",
            N - untouched.len()
        )),
        "{text}"
    );
    assert!(
        text.contains(&format!(
            "Interrupted: {} repositories were not touched:",
            untouched.len()
        )),
        "{text}"
    );
    // Exactly the ones reported untouched are still there; every other one is gone.
    let mut remaining = repository_names(&client).await;
    remaining.retain(|n| n.starts_with("docker-hub/"));
    let mut untouched = untouched;
    untouched.sort();
    assert_eq!(remaining, untouched);
}

/// The config is shared with the DaemonSet, whose nodes lack the admin's lifecycle policy file:
/// only `ecr setup`/`ecr check` may read it, relative to the config file.
#[test]
fn a_missing_lifecycle_policy_file_fails_only_setup_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(
        dir.path(),
        "[ecr]\nregion = \"us-east-1\"\naccount = \"123456789012\"\n\
         [upstreams.\"quay.io\"]\nprefix = \"quay\"\n\
         [ecr_setup.template]\nlifecycle_policy_file = \"lifecycle.json\"\n",
    );
    // From another working directory, as the DaemonSet would load it.
    let elsewhere = tempfile::tempdir().unwrap();
    let out = Command::new(pullthrough_bin())
        .args(["check-config", "--config", &config])
        .current_dir(elsewhere.path())
        .env_clear()
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));

    let dead = format!("http://127.0.0.1:{}", free_port());
    let out = ecr(&["setup", "--config", &config], &dead);
    assert_eq!(out.status.code(), Some(64), "{}", stderr(&out));
    let want = format!(
        "ecr_setup.template.lifecycle_policy_file: {} is not a readable file",
        dir.path().join("lifecycle.json").display()
    );
    assert!(stderr(&out).contains(&want), "{}", stderr(&out));
}

/// Ctrl-C while cleanup is still listing (here: an API that never answers) stops it at once,
/// with nothing deleted.
#[test]
fn ctrl_c_while_listing_stops_at_once_with_nothing_deleted() {
    let api = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let endpoint = format!("http://{}", api.local_addr().unwrap());
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), CLEANUP_CONFIG);
    let child = spawn_cleanup_apply(&config, &endpoint);
    // The listing's first call has connected and waits for an answer that never comes.
    let (_held, _) = api.accept().unwrap();
    let status = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("interrupted while listing; nothing was deleted"),
        "{}",
        stderr(&out)
    );
    assert_eq!(stdout(&out), "");
}

/// A stand-in ECR API for the one thing neither moto nor a mock can do: a `DeleteRepository`
/// that never answers. It lists one repository with no images; the delete is held open and
/// reported on `deleting`.
fn api_with_a_stuck_delete(deleting: std::sync::mpsc::Sender<()>) -> String {
    use std::io::{BufRead, BufReader, Read, Write};
    let api = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let endpoint = format!("http://{}", api.local_addr().unwrap());
    std::thread::spawn(move || {
        for conn in api.incoming() {
            let Ok(conn) = conn else { return };
            let deleting = deleting.clone();
            std::thread::spawn(move || {
                let mut reader = BufReader::new(conn.try_clone().unwrap());
                let mut conn = conn;
                loop {
                    let (mut target, mut length) = (String::new(), 0usize);
                    loop {
                        let mut line = String::new();
                        if reader.read_line(&mut line).unwrap_or(0) == 0 {
                            return;
                        }
                        let lower = line.to_ascii_lowercase();
                        if let Some(v) = lower.strip_prefix("x-amz-target:") {
                            target = v.trim().to_owned();
                        } else if let Some(v) = lower.strip_prefix("content-length:") {
                            length = v.trim().parse().unwrap_or(0);
                        } else if line == "\r\n" {
                            break;
                        }
                    }
                    let mut body = vec![0; length];
                    if reader.read_exact(&mut body).is_err() {
                        return;
                    }
                    let answer = if target.ends_with(".describerepositories") {
                        r#"{"repositories":[{"repositoryName":"docker-hub/stuck"}]}"#
                    } else if target.ends_with(".describeimages") {
                        r#"{"imageDetails":[]}"#
                    } else if target.ends_with(".deleterepository") {
                        let _ = deleting.send(());
                        // Held open: the delete is in flight until the process gives up.
                        let _ = reader.read(&mut [0; 1]);
                        return;
                    } else {
                        "{}"
                    };
                    let _ = write!(
                        conn,
                        "HTTP/1.1 200 OK\r\ncontent-type: application/x-amz-json-1.1\r\ncontent-length: {}\r\n\r\n{answer}",
                        answer.len()
                    );
                }
            });
        }
    });
    endpoint
}

/// The first Ctrl-C waits for the delete in flight; a second one exits without it.
#[test]
fn a_second_ctrl_c_exits_without_waiting_for_the_delete_in_flight() {
    let (deleting, delete_started) = std::sync::mpsc::channel();
    let endpoint = api_with_a_stuck_delete(deleting);
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), CLEANUP_CONFIG);
    let mut child = spawn_cleanup_apply(&config, &endpoint);
    delete_started
        .recv_timeout(std::time::Duration::from_secs(60))
        .expect("the delete never started");
    // Signals sent close together may arrive as one, so keep interrupting until it exits: the
    // first only stops new deletes, and the delete in flight never ends, so only a later one
    // can end the process.
    for _ in 0..300 {
        if child.try_wait().unwrap().is_some() {
            break;
        }
        let _ = Command::new("kill")
            .args(["-INT", &child.id().to_string()])
            .status();
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    if child.try_wait().unwrap().is_none() {
        let _ = child.kill();
        panic!("repeated Ctrl-C did not end cleanup");
    }
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out)
            .contains("interrupted twice: stopped without waiting for the delete in flight"),
        "{}",
        stderr(&out)
    );
}
