//! Cache warming at admission: when the webhook admits a pod with a `name:tag@digest` image on a
//! configured upstream, it asks ECR for that tag, so that ECR's pull-through cache imports the
//! image the pod is about to pull by digest (ECR imports only on a pull by tag; a digest it does
//! not hold is answered as missing, and the node then pulls from the upstream registry).
//!
//! Admission must never wait for it or fail because of it, so the handler only offers the
//! images to a bounded queue ([`WarmQueue::offer`], which never blocks) and returns; a small pool
//! of workers ([`WarmWorkers`]) warms them with [`crate::ecr::warm::warm_image`], the same code as
//! `pullthrough ecr warm`. What is offered is decided by [`candidates`], with no IO:
//! - only images with both a tag and a digest: a plain tag is pulled by tag, which fills the
//!   cache by itself, and a digest alone has no tag to import by;
//! - not images the pod will not pull (`imagePullPolicy: Never`), nor images
//!   `webhook.exclude` names (kept off ECR on purpose, e.g. private ones);
//! - each (ECR repository, tag) once per `webhook.warm_dedupe` ([`Dedupe`]): a Deployment's
//!   replicas all carry the same image.
//!
//! A full queue drops the warm and counts it; so does one whose warm failed: both forget the
//! (repository, tag), so the next admission of that image offers it again.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use tokio::sync::{Semaphore, mpsc};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::mutate::{Decision, Image};
use super::rewrite::Reason;
use crate::config::upstreams::Upstream;
use crate::ecr::warm::{Class, Fetcher, Outcome, Pinned, WarmTarget, classify, warm_image};
use crate::oci::RegistryHost;

/// At most this many (repository, tag) pairs are remembered; past it, the expired ones are
/// forgotten, and if none has expired, all (the worst case is one extra warm each).
const MAX_REMEMBERED: usize = 1 << 16;

/// Labels of `pullthrough_webhook_warms_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WarmLabels {
    /// `queued`, `warmed`, `failed` or `dropped`.
    pub result: String,
}

/// What happened to one offered warm, for the metric.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WarmResult {
    /// Accepted into the queue.
    Queued,
    /// The tag was fetched through ECR.
    Warmed,
    /// Fetching the tag failed.
    Failed,
    /// The queue was full (or the workers had stopped).
    Dropped,
}

impl WarmResult {
    /// Every result, to show each on `/metrics` from the start.
    pub const ALL: [WarmResult; 4] = [
        WarmResult::Queued,
        WarmResult::Warmed,
        WarmResult::Failed,
        WarmResult::Dropped,
    ];

    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            WarmResult::Queued => "queued",
            WarmResult::Warmed => "warmed",
            WarmResult::Failed => "failed",
            WarmResult::Dropped => "dropped",
        }
    }
}

/// The warm counters, by result.
#[derive(Clone, Debug, Default)]
pub struct WarmCounters(pub Family<WarmLabels, Counter>);

impl WarmCounters {
    /// Counts one `result`.
    pub fn inc(&self, result: WarmResult) {
        self.0
            .get_or_create(&WarmLabels {
                result: result.as_str().to_owned(),
            })
            .inc();
    }

    /// Creates every series at 0, so dashboards see them before the first warm.
    pub fn init(&self) {
        for r in WarmResult::ALL {
            let _ = self.0.get_or_create(&WarmLabels {
                result: r.as_str().to_owned(),
            });
        }
    }
}

/// The images of an admitted pod worth warming: `name:tag@digest` on a configured upstream,
/// pulled (not `imagePullPolicy: Never`) and not excluded; each (repository, tag) once. Pure.
pub fn candidates(
    images: &[Image],
    upstreams: &BTreeMap<RegistryHost, Upstream>,
) -> Vec<WarmTarget> {
    let mut seen = HashSet::new();
    images
        .iter()
        .filter(|i| {
            !matches!(
                i.decision,
                Decision::PullPolicyNever | Decision::Unchanged(Reason::Excluded(_))
            )
        })
        .filter_map(|i| match classify(upstreams, &i.image).1 {
            Class::Warm(t) if t.pinned.is_some() => Some(t),
            _ => None,
        })
        .filter(|t| seen.insert((t.repository.clone(), t.tag.clone())))
        .collect()
}

/// Which (repository, tag) pairs were offered lately, so each is warmed once per `window`.
#[derive(Debug)]
pub struct Dedupe {
    window: Duration,
    seen: HashMap<(String, String), Instant>,
}

impl Dedupe {
    /// Remembers pairs for `window`.
    pub fn new(window: Duration) -> Dedupe {
        Dedupe {
            window,
            seen: HashMap::new(),
        }
    }

    /// Whether `key` should be warmed at `now`: not offered within the window. If so, it is
    /// remembered from `now`.
    pub fn admit(&mut self, key: &(String, String), now: Instant) -> bool {
        if let Some(at) = self.seen.get(key)
            && now.saturating_duration_since(*at) < self.window
        {
            return false;
        }
        if self.seen.len() >= MAX_REMEMBERED {
            let window = self.window;
            self.seen
                .retain(|_, at| now.saturating_duration_since(*at) < window);
            if self.seen.len() >= MAX_REMEMBERED {
                self.seen.clear();
            }
        }
        self.seen.insert(key.clone(), now);
        true
    }

    /// Forgets `key`, so the next offer of it is warmed (after a drop or a failure).
    pub fn forget(&mut self, key: &(String, String)) {
        self.seen.remove(key);
    }
}

fn key(t: &WarmTarget) -> (String, String) {
    (t.repository.clone(), t.tag.clone())
}

/// The admission side: offers warms without ever waiting. Cheap to clone.
#[derive(Clone, Debug)]
pub struct WarmQueue {
    tx: mpsc::Sender<WarmTarget>,
    dedupe: Arc<Mutex<Dedupe>>,
    counters: WarmCounters,
}

impl WarmQueue {
    /// Queues each target not offered within the dedupe window; drops (and counts) what does
    /// not fit. Never blocks.
    pub fn offer(&self, targets: Vec<WarmTarget>) {
        for t in targets {
            let k = key(&t);
            let fresh = match self.dedupe.lock() {
                Ok(mut d) => d.admit(&k, Instant::now()),
                // A panic elsewhere poisoned it; warming is best effort, admission goes on.
                Err(_) => false,
            };
            if !fresh {
                continue;
            }
            let image = t.image.clone();
            match self.tx.try_send(t) {
                Ok(()) => {
                    self.counters.inc(WarmResult::Queued);
                    tracing::debug!(%image, "warm: queued");
                }
                Err(_) => {
                    self.counters.inc(WarmResult::Dropped);
                    self.forget(&k);
                    // At debug: a burst drops many at once, and the metric counts them.
                    tracing::debug!(%image, "warm: queue full, dropped");
                }
            }
        }
    }

    fn forget(&self, k: &(String, String)) {
        if let Ok(mut d) = self.dedupe.lock() {
            d.forget(k);
        }
    }
}

/// The worker side: takes warms off the queue, at most `workers` at a time.
#[derive(Debug)]
pub struct WarmWorkers {
    rx: mpsc::Receiver<WarmTarget>,
    workers: usize,
    queue: WarmQueue,
}

/// A queue of `capacity` warms, served by `workers` workers once [`WarmWorkers::run`] runs,
/// each (repository, tag) queued at most once per `dedupe`.
pub fn queue(
    capacity: usize,
    workers: usize,
    dedupe: Duration,
    counters: WarmCounters,
) -> (WarmQueue, WarmWorkers) {
    let (tx, rx) = mpsc::channel(capacity.max(1));
    let q = WarmQueue {
        tx,
        dedupe: Arc::new(Mutex::new(Dedupe::new(dedupe))),
        counters,
    };
    let w = WarmWorkers {
        rx,
        workers: workers.max(1),
        queue: q.clone(),
    };
    (q, w)
}

impl WarmWorkers {
    /// Serves the queue with `fetcher` until `stop`; then warms in flight are dropped (ECR
    /// finishes or forgets an import on its own; the next admission offers the image again).
    pub async fn run(mut self, fetcher: Fetcher, stop: CancellationToken) {
        let slots = Arc::new(Semaphore::new(self.workers));
        let mut running = tokio::task::JoinSet::new();
        loop {
            // A slot first, then a warm: while every worker is busy, warms wait in the queue,
            // where they count against its capacity.
            let slot = tokio::select! {
                () = stop.cancelled() => break,
                s = Arc::clone(&slots).acquire_owned() => match s {
                    Ok(s) => s,
                    Err(_) => break,
                },
            };
            let target = tokio::select! {
                () = stop.cancelled() => break,
                t = self.rx.recv() => match t {
                    Some(t) => t,
                    None => break,
                },
            };
            let fetcher = fetcher.clone();
            let queue = self.queue.clone();
            running.spawn(async move {
                let _slot = slot;
                warm_one(&fetcher, &queue, &target).await;
            });
            // Reap the finished ones so the set stays small.
            while running.try_join_next().is_some() {}
        }
        running.abort_all();
    }
}

async fn warm_one(fetcher: &Fetcher, queue: &WarmQueue, t: &WarmTarget) {
    let w = warm_image(fetcher, t).await;
    match &w.outcome {
        Outcome::Warmed { pinned, .. } => {
            queue.counters.inc(WarmResult::Warmed);
            match pinned {
                Some(Pinned::Uncacheable(now)) => tracing::warn!(
                    image = %t.image,
                    tag_now = %now,
                    "warm: the tag has moved upstream; the pinned digest is not in ECR and cannot \
                     enter the cache by tag, so this image is pulled from upstream"
                ),
                _ => tracing::info!(
                    image = %t.image,
                    repository = %t.repository,
                    manifests = w.manifests,
                    "warm: fetched the tag through ECR"
                ),
            }
        }
        Outcome::Failed(e) => {
            queue.counters.inc(WarmResult::Failed);
            queue.forget(&key(t));
            tracing::warn!(image = %t.image, error = %e, "warm: failed");
        }
        // Not produced for a single image; counted as a failure should that change.
        Outcome::Skipped(_) | Outcome::Interrupted => {
            queue.counters.inc(WarmResult::Failed);
            queue.forget(&key(t));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::webhook::mutate::Field;
    use rstest::rstest;

    const SHA: &str = "sha256:aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";

    fn upstreams() -> BTreeMap<RegistryHost, Upstream> {
        Config::from_toml_str(
            "[upstreams.\"docker.io\"]\nprefix = \"docker-hub\"\n[upstreams.\"quay.io\"]\nprefix = \"quay\"\n",
            "t.toml",
        )
        .unwrap()
        .upstreams
    }

    fn image(image: &str, decision: Decision) -> Image {
        Image {
            field: Field::Containers,
            index: 0,
            name: "c".into(),
            image: image.into(),
            decision,
        }
    }

    fn kept(image_ref: &str) -> Image {
        image(image_ref, Decision::Unchanged(Reason::Digest))
    }

    #[rstest]
    #[case::tag_and_digest(vec![kept(&format!("nginx:1.27@{SHA}"))], &["docker-hub/library/nginx:1.27"])]
    #[case::rewritten_tag_and_digest(
        vec![image(&format!("quay.io/org/app:2@{SHA}"), Decision::Rewrite("ecr/quay/org/app:2@x".into()))],
        &["quay/org/app:2"]
    )]
    #[case::tag_only(vec![image("nginx:1.27", Decision::Rewrite("x".into()))], &[])]
    #[case::digest_only(vec![kept(&format!("nginx@{SHA}"))], &[])]
    #[case::not_an_upstream(vec![image(&format!("ghcr.io/org/app:1@{SHA}"), Decision::Unchanged(Reason::NotConfigured("ghcr.io".into())))], &[])]
    #[case::pull_policy_never(vec![image(&format!("nginx:1.27@{SHA}"), Decision::PullPolicyNever)], &[])]
    #[case::excluded(vec![image(&format!("nginx:1.27@{SHA}"), Decision::Unchanged(Reason::Excluded("docker.io/*".into())))], &[])]
    #[case::invalid(vec![image("Nginx:1@sha256:zz", Decision::Unchanged(Reason::Digest))], &[])]
    #[case::same_tag_twice(
        vec![kept(&format!("nginx:1.27@{SHA}")), kept(&format!("docker.io/library/nginx:1.27@{SHA}"))],
        &["docker-hub/library/nginx:1.27"]
    )]
    #[case::two_tags(
        vec![kept(&format!("nginx:1.27@{SHA}")), kept(&format!("nginx:1.26@{SHA}"))],
        &["docker-hub/library/nginx:1.27", "docker-hub/library/nginx:1.26"]
    )]
    fn what_is_warmed(#[case] images: Vec<Image>, #[case] want: &[&str]) {
        let got: Vec<String> = candidates(&images, &upstreams())
            .iter()
            .map(|t| format!("{}:{}", t.repository, t.tag))
            .collect();
        assert_eq!(got, want);
    }

    #[test]
    fn dedupe_admits_once_per_window_and_after_forget() {
        let start = Instant::now();
        let mut d = Dedupe::new(Duration::from_secs(3600));
        let a = ("docker-hub/library/nginx".to_owned(), "1".to_owned());
        let b = ("docker-hub/library/nginx".to_owned(), "2".to_owned());
        assert!(d.admit(&a, start));
        assert!(
            !d.admit(&a, start + Duration::from_secs(3599)),
            "within the window"
        );
        assert!(d.admit(&b, start), "another tag is another key");
        assert!(
            d.admit(&a, start + Duration::from_secs(3600)),
            "the window has passed"
        );
        assert!(
            !d.admit(&a, start + Duration::from_secs(3601)),
            "remembered again"
        );
        d.forget(&a);
        assert!(d.admit(&a, start + Duration::from_secs(3602)), "forgotten");
    }

    #[test]
    fn dedupe_stays_bounded() {
        let start = Instant::now();
        let mut d = Dedupe::new(Duration::from_secs(3600));
        for i in 0..MAX_REMEMBERED + 10 {
            assert!(d.admit(&("r".to_owned(), i.to_string()), start));
        }
        assert!(d.seen.len() <= MAX_REMEMBERED);
    }

    /// The policy shipped for the warming identity (docs/iam/webhook-warm-policy.json) allows
    /// exactly what a warm does: the token, manifest GETs, and the import they cause. No layer
    /// download: warming never fetches a blob.
    #[test]
    fn the_shipped_policy_allows_what_warming_does_and_no_more() {
        let policy: serde_json::Value =
            serde_json::from_str(include_str!("../../docs/iam/webhook-warm-policy.json")).unwrap();
        let mut actions: Vec<String> = policy["Statement"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|s| match &s["Action"] {
                serde_json::Value::String(a) => vec![a.clone()],
                serde_json::Value::Array(a) => {
                    a.iter().map(|v| v.as_str().unwrap().to_owned()).collect()
                }
                other => panic!("{other}"),
            })
            .collect();
        actions.sort();
        assert_eq!(
            actions,
            [
                "ecr:BatchGetImage",
                "ecr:BatchImportUpstreamImage",
                "ecr:CreateRepository",
                "ecr:GetAuthorizationToken"
            ]
        );
        // One repository prefix per default upstream rule that has one in the console.
        let resources = policy["Statement"][1]["Resource"].as_array().unwrap();
        for u in upstreams().values() {
            assert!(
                resources.iter().any(|r| r
                    .as_str()
                    .unwrap()
                    .ends_with(&format!(":repository/{}/*", u.prefix))),
                "no repository/{}/* in the policy",
                u.prefix
            );
        }
    }

    fn target(tag: &str) -> WarmTarget {
        WarmTarget {
            image: format!("docker.io/library/x:{tag}@{SHA}"),
            repository: "docker-hub/library/x".into(),
            tag: tag.into(),
            pinned: Some(SHA.into()),
        }
    }

    fn count(c: &WarmCounters, r: WarmResult) -> u64 {
        c.0.get_or_create(&WarmLabels {
            result: r.as_str().into(),
        })
        .get()
    }

    /// With no worker taking from it, a queue of 2 takes two warms, drops the third, and drops
    /// nothing the dedupe window holds back; a dropped one is offered again next time.
    #[tokio::test]
    async fn a_full_queue_drops_and_counts() {
        let counters = WarmCounters::default();
        let (q, _workers) = queue(2, 1, Duration::from_secs(3600), counters.clone());
        q.offer(vec![target("1"), target("2"), target("3"), target("1")]);
        assert_eq!(count(&counters, WarmResult::Queued), 2);
        assert_eq!(count(&counters, WarmResult::Dropped), 1);
        q.offer(vec![target("3")]);
        assert_eq!(
            count(&counters, WarmResult::Dropped),
            2,
            "offered again, dropped again"
        );
    }
}
