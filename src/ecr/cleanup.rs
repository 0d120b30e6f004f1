//! `pullthrough ecr cleanup`: list the repositories a pull-through prefix created, with image
//! count and size, and delete them (with their images) only with `--apply`.
//!
//! Each repository is one `DeleteRepository` call with `force`, so it is either gone or
//! untouched; an interrupt (Ctrl-C) lets the call in flight finish and starts no other. The
//! listing before it only reads, so an interrupt stops it at once, with nothing deleted. The
//! prefix must be one of the configured pull-through prefixes (or under one) unless the caller
//! says `--any-prefix`: a typo must not empty someone else's repositories.

use std::fmt::Write as _;
use std::future::Future;

use aws_sdk_ecr::Client;
use tokio_util::sync::CancellationToken;

use super::EcrOpsError;
use super::aws::api_error;
use crate::config::Config;

/// A repository under the prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RepoInfo {
    /// Full repository name.
    pub name: String,
    /// Number of images.
    pub images: u64,
    /// Sum of `imageSizeInBytes`.
    pub bytes: u64,
}

/// Checks that `prefix` is a configured pull-through prefix or lies under one, unless
/// `any_prefix`. Returns the prefix without trailing slashes.
pub fn check_prefix(
    config: &Config,
    prefix: &str,
    any_prefix: bool,
) -> Result<String, EcrOpsError> {
    let p = prefix.trim_end_matches('/');
    if p.is_empty() || !crate::oci::valid_name(p) {
        return Err(EcrOpsError::Usage(format!(
            "--prefix {prefix:?} is not a repository name prefix"
        )));
    }
    let configured: Vec<&str> = config
        .upstreams
        .values()
        .map(|u| u.prefix.as_str())
        .collect();
    let inside = configured
        .iter()
        .any(|c| p == *c || p.strip_prefix(c).is_some_and(|rest| rest.starts_with('/')));
    if !inside && !any_prefix {
        return Err(EcrOpsError::Usage(format!(
            "--prefix {p:?} is not one of the configured pull-through prefixes ({}); pass \
             --any-prefix to clean up repositories outside them",
            configured.join(", ")
        )));
    }
    Ok(p.to_owned())
}

/// The repositories under a prefix.
#[derive(Debug, Default)]
pub struct Listing {
    /// The repositories to delete, by name.
    pub repos: Vec<RepoInfo>,
    /// Repositories whose images could not be listed (access denied): left alone, with why.
    pub skipped: Vec<(String, EcrOpsError)>,
    /// Repositories that disappeared while listing (deleted meanwhile): nothing left to do.
    pub gone: Vec<String>,
}

/// The error for an interrupt during the (read-only) listing.
fn interrupted_listing() -> EcrOpsError {
    EcrOpsError::Interrupted("interrupted while listing; nothing was deleted".into())
}

/// Awaits `call` unless `stop` fires first. Only for reads: dropping a read changes nothing.
async fn unless_stopped<T>(
    stop: &CancellationToken,
    call: impl Future<Output = Result<T, EcrOpsError>>,
) -> Result<T, EcrOpsError> {
    tokio::select! {
        biased;
        _ = stop.cancelled() => Err(interrupted_listing()),
        r = call => r,
    }
}

/// Every repository whose name starts with `prefix/`, all pages, with image count and size.
/// One repository whose images cannot be read is skipped (and reported), not the whole listing.
/// Stops at once, with [`EcrOpsError::Interrupted`], when `stop` fires.
pub async fn list(
    client: &Client,
    prefix: &str,
    stop: &CancellationToken,
) -> Result<Listing, EcrOpsError> {
    let under = format!("{prefix}/");
    let mut names = Vec::new();
    let mut next: Option<String> = None;
    loop {
        let call = client
            .describe_repositories()
            .max_results(1000)
            .set_next_token(next.take())
            .send();
        let page = unless_stopped(stop, async {
            call.await.map_err(|e| api_error("DescribeRepositories", e))
        })
        .await?;
        names.extend(
            page.repositories()
                .iter()
                .filter_map(|r| r.repository_name())
                .filter(|n| n.starts_with(&under))
                .map(str::to_owned),
        );
        match page.next_token() {
            Some(t) if !t.is_empty() => next = Some(t.to_owned()),
            _ => break,
        }
    }
    names.sort();
    let mut out = Listing::default();
    for name in names {
        match unless_stopped(stop, image_totals(client, &name)).await {
            Ok(Totals::Found(images, bytes)) => out.repos.push(RepoInfo {
                name,
                images,
                bytes,
            }),
            Ok(Totals::Gone) => out.gone.push(name),
            Err(e @ EcrOpsError::AccessDenied { .. }) => out.skipped.push((name, e)),
            Err(e) => return Err(e),
        }
    }
    Ok(out)
}

enum Totals {
    /// Image count and bytes.
    Found(u64, u64),
    /// The repository no longer exists.
    Gone,
}

async fn image_totals(client: &Client, repo: &str) -> Result<Totals, EcrOpsError> {
    let (mut images, mut bytes) = (0u64, 0u64);
    let mut next: Option<String> = None;
    loop {
        let page = match client
            .describe_images()
            .repository_name(repo)
            .max_results(1000)
            .set_next_token(next.take())
            .send()
            .await
        {
            Ok(page) => page,
            Err(e)
                if e.as_service_error()
                    .is_some_and(|s| s.is_repository_not_found_exception()) =>
            {
                return Ok(Totals::Gone);
            }
            Err(e) => return Err(api_error("DescribeImages", e)),
        };
        for d in page.image_details() {
            images += 1;
            bytes += u64::try_from(d.image_size_in_bytes().unwrap_or(0)).unwrap_or(0);
        }
        match page.next_token() {
            Some(t) if !t.is_empty() => next = Some(t.to_owned()),
            _ => return Ok(Totals::Found(images, bytes)),
        }
    }
}

/// What a deletion run did.
#[derive(Debug, Default)]
pub struct Deleted {
    /// Repositories deleted.
    pub deleted: Vec<String>,
    /// Repositories whose deletion failed, with why.
    pub failed: Vec<(String, EcrOpsError)>,
    /// Repositories never touched because of the interrupt.
    pub untouched: Vec<String>,
}

/// Deletes `repos` one at a time (`force`: with their images). When `stop` is cancelled, the
/// call in flight completes and the rest are left untouched. `progress` is called after each.
pub async fn delete(
    client: &Client,
    repos: &[RepoInfo],
    stop: &CancellationToken,
    mut progress: impl FnMut(&str),
) -> Deleted {
    let mut out = Deleted::default();
    for (i, repo) in repos.iter().enumerate() {
        if stop.is_cancelled() {
            out.untouched
                .extend(repos[i..].iter().map(|r| r.name.clone()));
            break;
        }
        // Not raced against `stop`: dropping the future mid-call would leave us not knowing
        // whether the repository is gone.
        let result = client
            .delete_repository()
            .repository_name(&repo.name)
            .force(true)
            .send()
            .await;
        match result {
            Ok(_) => out.deleted.push(repo.name.clone()),
            Err(e)
                if e.as_service_error()
                    .is_some_and(|s| s.is_repository_not_found_exception()) =>
            {
                // Already gone (deleted meanwhile): the goal is reached.
                out.deleted.push(repo.name.clone());
            }
            Err(e) => out
                .failed
                .push((repo.name.clone(), api_error("DeleteRepository", e))),
        }
        progress(&repo.name);
    }
    out
}

/// `1.5 MiB`-style sizes.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

/// The listing table, its total line, and the repositories left out of it.
pub fn render_list(prefix: &str, listing: &Listing) -> String {
    let repos = &listing.repos;
    let width = repos
        .iter()
        .map(|r| r.name.len())
        .max()
        .unwrap_or(0)
        .max("REPOSITORY".len());
    let mut out = format!(
        "{:<width$}  {:>7}  {:>10}\n",
        "REPOSITORY", "IMAGES", "SIZE"
    );
    for r in repos {
        let _ = writeln!(
            out,
            "{:<width$}  {:>7}  {:>10}",
            r.name,
            r.images,
            human_bytes(r.bytes)
        );
    }
    let images: u64 = repos.iter().map(|r| r.images).sum();
    let bytes: u64 = repos.iter().map(|r| r.bytes).sum();
    let _ = writeln!(
        out,
        "{} repositories, {images} images, {} under {prefix}/",
        repos.len(),
        human_bytes(bytes)
    );
    for name in &listing.gone {
        let _ = writeln!(out, "  gone while listing (deleted meanwhile): {name}");
    }
    for (name, e) in &listing.skipped {
        let _ = writeln!(out, "  skipped, will not be deleted: {name}: {e}");
    }
    out
}

/// The summary after deleting.
pub fn render_deleted(d: &Deleted, interrupted: bool) -> String {
    let mut out = String::new();
    let total = d.deleted.len() + d.failed.len() + d.untouched.len();
    let _ = writeln!(out, "Deleted {} of {total} repositories.", d.deleted.len());
    for (name, e) in &d.failed {
        let _ = writeln!(out, "  not deleted (failed): {name}: {e}");
    }
    if interrupted || !d.untouched.is_empty() {
        let _ = writeln!(
            out,
            "Interrupted: {} repositories were not touched:",
            d.untouched.len()
        );
        for name in &d.untouched {
            let _ = writeln!(out, "  not deleted (interrupted): {name}");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use rstest::rstest;

    fn config() -> Config {
        Config::from_toml_str(
            "[upstreams.\"docker.io\"]\nprefix = \"docker-hub\"\n[upstreams.\"quay.io\"]\nprefix = \"cache/quay\"\n",
            "t.toml",
        )
        .unwrap()
    }

    #[rstest]
    #[case::configured("docker-hub", false, Ok("docker-hub"))]
    #[case::trailing_slash("docker-hub/", false, Ok("docker-hub"))]
    #[case::nested_configured("cache/quay", false, Ok("cache/quay"))]
    #[case::under_configured("docker-hub/library", false, Ok("docker-hub/library"))]
    #[case::sibling_name(
        "docker-hubx",
        false,
        Err(
            "is not one of the configured pull-through prefixes (docker-hub, cache/quay); pass --any-prefix"
        )
    )]
    #[case::parent_of_configured("cache", false, Err("is not one of the configured"))]
    #[case::other_allowed("team-a", true, Ok("team-a"))]
    #[case::invalid("Team A", true, Err("is not a repository name prefix"))]
    #[case::empty("/", true, Err("is not a repository name prefix"))]
    fn prefix_gate(#[case] prefix: &str, #[case] any: bool, #[case] want: Result<&str, &str>) {
        match (check_prefix(&config(), prefix, any), want) {
            (Ok(p), Ok(w)) => assert_eq!(p, w),
            (Err(e), Err(w)) => {
                assert!(e.is_usage());
                assert!(e.to_string().contains(w), "{e}");
            }
            (got, want) => panic!("got {got:?}, want {want:?}"),
        }
    }

    #[rstest]
    #[case::bytes(512, "512 B")]
    #[case::kib(1536, "1.5 KiB")]
    #[case::mib(3 * 1024 * 1024, "3.0 MiB")]
    fn sizes(#[case] n: u64, #[case] want: &str) {
        assert_eq!(human_bytes(n), want);
    }

    #[test]
    fn golden_listing() {
        let repos = [
            RepoInfo {
                name: "docker-hub/library/alpine".into(),
                images: 2,
                bytes: 3 * 1024 * 1024 + 400 * 1024,
            },
            RepoInfo {
                name: "docker-hub/bitnami/redis".into(),
                images: 0,
                bytes: 0,
            },
        ];
        let want = "\
REPOSITORY                  IMAGES        SIZE
docker-hub/library/alpine        2     3.4 MiB
docker-hub/bitnami/redis         0         0 B
2 repositories, 2 images, 3.4 MiB under docker-hub/
";
        let listing = Listing {
            repos: repos.to_vec(),
            ..Default::default()
        };
        assert_eq!(render_list("docker-hub", &listing), want);
    }

    mod mocked {
        //! Pagination and interruption against aws-smithy-mocks; the real listing and deleting
        //! of >100 repositories runs against moto in the integration tests.
        use super::*;
        use aws_sdk_ecr::operation::delete_repository::DeleteRepositoryOutput;
        use aws_sdk_ecr::operation::describe_images::DescribeImagesOutput;
        use aws_sdk_ecr::operation::describe_repositories::DescribeRepositoriesOutput;
        use aws_sdk_ecr::types::{ImageDetail, Repository};
        use aws_smithy_mocks::{Rule, RuleMode, mock, mock_client};
        use std::sync::{Arc, Mutex};

        fn client(rules: &[Rule]) -> Client {
            let refs: Vec<&Rule> = rules.iter().collect();
            mock_client!(aws_sdk_ecr, RuleMode::MatchAny, refs)
        }

        fn repos(names: &[&str], next: Option<&str>) -> DescribeRepositoriesOutput {
            DescribeRepositoriesOutput::builder()
                .set_repositories(Some(
                    names
                        .iter()
                        .map(|n| Repository::builder().repository_name(*n).build())
                        .collect(),
                ))
                .set_next_token(next.map(str::to_owned))
                .build()
        }

        #[tokio::test]
        async fn lists_across_pages_only_under_the_prefix() {
            let p1 = mock!(Client::describe_repositories)
                .match_requests(|r| r.next_token().is_none())
                .then_output(|| repos(&["docker-hub/a", "docker-hubx/b", "quay/c"], Some("t2")));
            let p2 = mock!(Client::describe_repositories)
                .match_requests(|r| r.next_token() == Some("t2"))
                .then_output(|| repos(&["docker-hub/library/d"], None));
            let images = mock!(Client::describe_images).then_output(|| {
                DescribeImagesOutput::builder()
                    .image_details(ImageDetail::builder().image_size_in_bytes(1000).build())
                    .image_details(ImageDetail::builder().image_size_in_bytes(24).build())
                    .build()
            });
            let got = list(
                &client(&[p1, p2, images]),
                "docker-hub",
                &CancellationToken::new(),
            )
            .await
            .unwrap();
            assert!(got.skipped.is_empty() && got.gone.is_empty());
            assert_eq!(
                got.repos,
                [
                    RepoInfo {
                        name: "docker-hub/a".into(),
                        images: 2,
                        bytes: 1024
                    },
                    RepoInfo {
                        name: "docker-hub/library/d".into(),
                        images: 2,
                        bytes: 1024
                    },
                ]
            );
        }

        /// ECR pages DescribeRepositories at most 1000 at a time and may return fewer; moto
        /// returns everything in one page, so paging is only tested here: 100 + 100 + 5, end to
        /// end through list and delete, every repository seen and deleted exactly once.
        #[tokio::test]
        async fn three_pages_are_listed_and_deleted_each_exactly_once() {
            let name = |i: usize| format!("docker-hub/app-{i:03}");
            let page = move |range: std::ops::Range<usize>, next: Option<&str>| {
                let names: Vec<String> = range.map(name).collect();
                let refs: Vec<&str> = names.iter().map(String::as_str).collect();
                repos(&refs, next)
            };
            let p1 = mock!(Client::describe_repositories)
                .match_requests(|r| r.next_token().is_none())
                .then_output(move || page(0..100, Some("t2")));
            let p2 = mock!(Client::describe_repositories)
                .match_requests(|r| r.next_token() == Some("t2"))
                .then_output(move || page(100..200, Some("t3")));
            let p3 = mock!(Client::describe_repositories)
                .match_requests(|r| r.next_token() == Some("t3"))
                .then_output(move || page(200..205, None));
            let described = Arc::new(Mutex::new(Vec::<String>::new()));
            let log = Arc::clone(&described);
            let images = mock!(Client::describe_images).then_compute_output(move |r| {
                log.lock()
                    .unwrap()
                    .push(r.repository_name().unwrap().to_owned());
                DescribeImagesOutput::builder().build()
            });
            let deleted = Arc::new(Mutex::new(Vec::<String>::new()));
            let log = Arc::clone(&deleted);
            let delete_rule = mock!(Client::delete_repository).then_compute_output(move |r| {
                log.lock()
                    .unwrap()
                    .push(r.repository_name().unwrap().to_owned());
                DeleteRepositoryOutput::builder().build()
            });
            let client = client(&[p1, p2, p3, images, delete_rule]);
            let stop = CancellationToken::new();
            let listing = list(&client, "docker-hub", &stop).await.unwrap();
            let want: Vec<String> = (0..205).map(name).collect();
            let listed: Vec<String> = listing.repos.iter().map(|r| r.name.clone()).collect();
            assert_eq!(listed, want);
            assert_eq!(*described.lock().unwrap(), want, "each described once");
            let d = delete(&client, &listing.repos, &stop, |_| {}).await;
            assert_eq!(d.deleted, want);
            assert_eq!(*deleted.lock().unwrap(), want, "each deleted once");
            assert!(d.failed.is_empty() && d.untouched.is_empty());
        }

        #[tokio::test]
        async fn a_repository_whose_images_cannot_be_read_is_skipped_not_the_listing() {
            use aws_sdk_ecr::error::ErrorMetadata;
            use aws_sdk_ecr::operation::describe_images::DescribeImagesError;
            use aws_sdk_ecr::types::error::RepositoryNotFoundException;
            let page = mock!(Client::describe_repositories).then_output(|| {
                repos(
                    &["docker-hub/a", "docker-hub/denied", "docker-hub/gone"],
                    None,
                )
            });
            let denied = mock!(Client::describe_images)
                .match_requests(|r| r.repository_name() == Some("docker-hub/denied"))
                .then_error(|| {
                    DescribeImagesError::generic(
                        ErrorMetadata::builder()
                            .code("AccessDeniedException")
                            .message("not allowed")
                            .build(),
                    )
                });
            let gone = mock!(Client::describe_images)
                .match_requests(|r| r.repository_name() == Some("docker-hub/gone"))
                .then_error(|| {
                    DescribeImagesError::RepositoryNotFoundException(
                        RepositoryNotFoundException::builder().build(),
                    )
                });
            let fine = mock!(Client::describe_images)
                .then_output(|| DescribeImagesOutput::builder().build());
            let listing = list(
                &client(&[page, denied, gone, fine]),
                "docker-hub",
                &CancellationToken::new(),
            )
            .await
            .unwrap();
            let listed: Vec<&str> = listing.repos.iter().map(|r| r.name.as_str()).collect();
            assert_eq!(listed, ["docker-hub/a"]);
            assert_eq!(listing.gone, ["docker-hub/gone"]);
            let text = render_list("docker-hub", &listing);
            assert!(
                text.contains("  skipped, will not be deleted: docker-hub/denied: DescribeImages: access denied: the caller needs ecr:DescribeImages"),
                "{text}"
            );
            assert!(
                text.contains("  gone while listing (deleted meanwhile): docker-hub/gone\n"),
                "{text}"
            );
        }

        #[tokio::test]
        async fn an_interrupt_while_listing_stops_before_the_next_call() {
            let stop = CancellationToken::new();
            let page = mock!(Client::describe_repositories)
                .then_output(|| repos(&["docker-hub/a", "docker-hub/b", "docker-hub/c"], None));
            let described = Arc::new(Mutex::new(Vec::<String>::new()));
            let (trigger, log) = (stop.clone(), Arc::clone(&described));
            let images = mock!(Client::describe_images).then_compute_output(move |r| {
                log.lock()
                    .unwrap()
                    .push(r.repository_name().unwrap().to_owned());
                // Ctrl-C arrives while the first repository is being described.
                trigger.cancel();
                DescribeImagesOutput::builder().build()
            });
            let e = list(&client(&[page, images]), "docker-hub", &stop)
                .await
                .unwrap_err();
            assert_eq!(
                e.to_string(),
                "interrupted while listing; nothing was deleted"
            );
            assert_eq!(*described.lock().unwrap(), ["docker-hub/a"]);
        }

        #[tokio::test]
        async fn an_interrupt_finishes_the_current_delete_and_touches_no_other() {
            let stop = CancellationToken::new();
            let deleted = Arc::new(Mutex::new(Vec::<String>::new()));
            let (trigger, log) = (stop.clone(), Arc::clone(&deleted));
            let delete_rule = mock!(Client::delete_repository).then_compute_output(move |r| {
                assert_eq!(r.force(), Some(true), "deletes must be forced");
                log.lock()
                    .unwrap()
                    .push(r.repository_name().unwrap().to_owned());
                // Ctrl-C arrives while the second delete is in flight.
                if log.lock().unwrap().len() == 2 {
                    trigger.cancel();
                }
                DeleteRepositoryOutput::builder().build()
            });
            let repos: Vec<RepoInfo> = (0..5)
                .map(|i| RepoInfo {
                    name: format!("docker-hub/r{i}"),
                    images: 0,
                    bytes: 0,
                })
                .collect();
            let d = delete(&client(&[delete_rule]), &repos, &stop, |_| {}).await;
            assert_eq!(d.deleted, ["docker-hub/r0", "docker-hub/r1"]);
            assert_eq!(*deleted.lock().unwrap(), d.deleted);
            assert_eq!(
                d.untouched,
                ["docker-hub/r2", "docker-hub/r3", "docker-hub/r4"]
            );
            let report = render_deleted(&d, true);
            assert!(
                report.starts_with(
                    "Deleted 2 of 5 repositories.\nInterrupted: 3 repositories were not touched:\n"
                ),
                "{report}"
            );
            assert!(report.contains("  not deleted (interrupted): docker-hub/r4\n"));
        }
    }
}
