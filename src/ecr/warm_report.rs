//! How `ecr warm` reads and reports: the images file it takes, and the table of outcomes it
//! prints, one line per image and a summary. Pure; [`super::warm`] does the warming.

use std::fmt::Write as _;

use super::warm::{Outcome, Pinned, Warmed};

/// Parses an images file: one reference a line; blank lines and `#` comments are skipped.
pub fn parse_images_file(text: &str) -> Vec<String> {
    text.lines()
        .map(|l| l.split('#').next().unwrap_or("").trim())
        .filter(|l| !l.is_empty())
        .map(str::to_owned)
        .collect()
}

/// The RESULT column for one row.
fn result_text(outcome: &Outcome) -> String {
    match outcome {
        Outcome::Warmed { children, pinned } => {
            let mut s = match children {
                0 => "ok".to_owned(),
                n => format!("ok (index, {n} platform manifests)"),
            };
            match pinned {
                None => {}
                Some(Pinned::Cached) => s.push_str("; pinned digest cached"),
                Some(Pinned::StillCached(now)) => {
                    let _ = write!(
                        s,
                        "; the tag moved to {now}, the pinned digest is still cached"
                    );
                }
                Some(Pinned::Uncacheable(now)) => {
                    s = format!(
                        "TAG MOVED: the tag now points at {now}; the pinned digest is not in ECR \
                         and cannot enter the cache by tag"
                    );
                }
            }
            s
        }
        Outcome::Skipped(why) => format!("skipped: {why}"),
        Outcome::Failed(e) => format!("FAILED: {e}"),
        Outcome::Interrupted => "not warmed: interrupted".to_owned(),
    }
}

/// The report: one row per image, then a summary line. Pure.
pub fn render(results: &[Warmed]) -> String {
    let iw = results
        .iter()
        .map(|w| w.image.len())
        .max()
        .unwrap_or(0)
        .max("IMAGE".len());
    let rw = results
        .iter()
        .map(|w| w.repository.as_deref().map_or(1, str::len))
        .max()
        .unwrap_or(0)
        .max("ECR REPOSITORY".len());
    let mut out = format!(
        "{:<iw$}  {:<rw$}  {:>9}  {:>7}  RESULT\n",
        "IMAGE", "ECR REPOSITORY", "MANIFESTS", "TTFB"
    );
    for w in results {
        let ttfb = w
            .ttfb
            .map_or("-".to_owned(), |d| format!("{}ms", d.as_millis()));
        let _ = writeln!(
            out,
            "{:<iw$}  {:<rw$}  {:>9}  {:>7}  {}",
            w.image,
            w.repository.as_deref().unwrap_or("-"),
            w.manifests,
            ttfb,
            result_text(&w.outcome)
        );
    }
    let count = |f: fn(&Outcome) -> bool| results.iter().filter(|w| f(&w.outcome)).count();
    let warmed = count(|o| matches!(o, Outcome::Warmed { .. }));
    let _ = write!(
        out,
        "{warmed} of {} images warmed, {} manifests fetched.",
        results.len(),
        results.iter().map(|w| w.manifests).sum::<usize>()
    );
    let extras = [
        (
            count(|o| {
                matches!(
                    o,
                    Outcome::Warmed {
                        pinned: Some(Pinned::Uncacheable(_)),
                        ..
                    }
                )
            }),
            "pinned digest(s) cannot enter the cache by tag (the tag moved)",
        ),
        (count(|o| matches!(o, Outcome::Skipped(_))), "skipped"),
        (count(|o| matches!(o, Outcome::Failed(_))), "failed"),
        (
            count(|o| matches!(o, Outcome::Interrupted)),
            "not warmed (interrupted)",
        ),
    ];
    for (n, what) in extras {
        if n > 0 {
            let _ = write!(out, " {n} {what}.");
        }
    }
    out.push('\n');
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ecr::warm::WarmError;
    use rstest::rstest;
    use std::time::Duration;

    const SHA_B: &str = "sha256:bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb";

    #[test]
    fn images_file_skips_blanks_and_comments() {
        let got =
            parse_images_file("# base images\nalpine:3.19\n\n  nginx:1.27  # web\n#quay.io/x:1\n");
        assert_eq!(got, ["alpine:3.19", "nginx:1.27"]);
    }

    fn row(image: &str, repo: Option<&str>, manifests: usize, outcome: Outcome) -> Warmed {
        Warmed {
            image: image.into(),
            repository: repo.map(str::to_owned),
            manifests,
            ttfb: (manifests > 0).then(|| Duration::from_millis(42)),
            outcome,
        }
    }

    #[rstest]
    #[case::single("ok", Outcome::Warmed { children: 0, pinned: None })]
    #[case::index("ok (index, 2 platform manifests)", Outcome::Warmed { children: 2, pinned: None })]
    #[case::pinned_cached("ok; pinned digest cached", Outcome::Warmed { children: 0, pinned: Some(Pinned::Cached) })]
    #[case::tag_moved_but_cached(
        &format!("ok; the tag moved to {SHA_B}, the pinned digest is still cached"),
        Outcome::Warmed { children: 0, pinned: Some(Pinned::StillCached(SHA_B.into())) }
    )]
    #[case::tag_moved(
        &format!("TAG MOVED: the tag now points at {SHA_B}; the pinned digest is not in ECR and cannot enter the cache by tag"),
        Outcome::Warmed { children: 2, pinned: Some(Pinned::Uncacheable(SHA_B.into())) }
    )]
    #[case::skipped("skipped: why", Outcome::Skipped("why".into()))]
    #[case::failed("FAILED: why", Outcome::Failed(WarmError::Image("why".into())))]
    #[case::interrupted("not warmed: interrupted", Outcome::Interrupted)]
    fn result_column(#[case] want: &str, #[case] outcome: Outcome) {
        assert_eq!(result_text(&outcome), want);
    }

    #[test]
    fn golden_report() {
        let rows = vec![
            row(
                "docker.io/library/alpine:3.19",
                Some("docker-hub/library/alpine"),
                3,
                Outcome::Warmed {
                    children: 2,
                    pinned: None,
                },
            ),
            row(
                "ghcr.io/org/app:1",
                None,
                0,
                Outcome::Skipped(
                    "ghcr.io is not a configured upstream, so it has no pull-through prefix".into(),
                ),
            ),
            row(
                "quay.io/org/a:1",
                Some("quay/org/a"),
                0,
                Outcome::Failed(WarmError::Image("boom".into())),
            ),
            row(
                "quay.io/org/b:1",
                Some("quay/org/b"),
                0,
                Outcome::Interrupted,
            ),
        ];
        let want = "\
IMAGE                          ECR REPOSITORY             MANIFESTS     TTFB  RESULT
docker.io/library/alpine:3.19  docker-hub/library/alpine          3     42ms  ok (index, 2 platform manifests)
ghcr.io/org/app:1              -                                  0        -  skipped: ghcr.io is not a configured upstream, so it has no pull-through prefix
quay.io/org/a:1                quay/org/a                         0        -  FAILED: boom
quay.io/org/b:1                quay/org/b                         0        -  not warmed: interrupted
1 of 4 images warmed, 3 manifests fetched. 1 skipped. 1 failed. 1 not warmed (interrupted).
";
        assert_eq!(render(&rows), want, "got:\n{}", render(&rows));
        assert_eq!(
            rows.iter().map(Warmed::is_failure).collect::<Vec<_>>(),
            [false, false, true, true]
        );
    }
}
