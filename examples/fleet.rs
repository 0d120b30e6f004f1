//! The fleet simulation: N nodes start within a spread of seconds, each running the mirror's
//! real token cache ([`TokenCache`]) and its real request path for a token ([`TokenCache::get`],
//! or [`TokenCache::get_within`] with the mirror's wait), against a simulated
//! `GetAuthorizationToken` that throttles with the account's token bucket, retried the way the
//! AWS SDK's standard retry mode does. Deterministic: a paused tokio clock and seeded randomness,
//! so the same arguments print the same table.
//!
//! What one node does, from the moment its pod starts:
//! - the mirror fetches its token in the background (as `serve` does at start-up);
//! - the node agent asks the mirror's `/readyz` every second, and installs the `hosts.toml`
//!   files once it answers ready (as `pullthrough node` does);
//! - after [`FIRST_PULL_AFTER`], the node's first pods pull their images: [`PODS`] pulls of
//!   [`IMAGES`] distinct images at once. A pull goes upstream (Docker Hub: rate limits, egress)
//!   if the `hosts.toml` files are not installed yet, or if the mirror answers 503 for want of a
//!   token; otherwise it goes through ECR and costs manifest GETs against the account's
//!   `BatchGetImage` quota (two per image: the tag, then the platform manifest by digest, shared
//!   by every pod of the node through the mirror's single flight and caches);
//! - later pods keep pulling, one every [`LATER_PULL_EVERY`], which is what makes a mirror that
//!   failed its first fetch try again.
//!
//! `cargo run --release --example fleet -- [--design today|wait] [--nodes N] [--spread S]`
//! prints one row per scenario; with no arguments, every scenario of the benchmark.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use pullthrough::mirror::metrics::Metrics;
use pullthrough::mirror::token::{
    Availability, FetchedToken, Secret, TokenCache, TokenError, TokenSource,
};
use tokio::time::Instant;

/// From the mirror's start to the node's first image pulls.
const FIRST_PULL_AFTER: Duration = Duration::from_secs(10);
/// Pods pulling at once on a new node.
const PODS: u32 = 30;
/// Distinct images among them.
const IMAGES: u32 = 10;
/// After the first burst, another pull this often (a later pod, a restart).
const LATER_PULL_EVERY: Duration = Duration::from_secs(10);
/// How long the simulation follows a node.
const HORIZON: Duration = Duration::from_secs(20 * 60);
/// How often the node agent asks `/readyz` (its `READY_POLL`).
const READY_POLL: Duration = Duration::from_secs(1);
/// `/readyz` waits this long for a token (the mirror's `READY_WAIT`).
const READY_WAIT: Duration = Duration::from_millis(800);
/// One `GetAuthorizationToken` round trip.
const API_LATENCY: Duration = Duration::from_millis(80);
/// The SDK's standard retry mode: attempts, and the cap of its exponential backoff.
const SDK_ATTEMPTS: u32 = 3;
const SDK_MAX_BACKOFF: Duration = Duration::from_secs(20);

/// A token bucket: `rate` per second, `burst` at most, shared by every node of the account.
struct Bucket {
    tokens: f64,
    rate: f64,
    burst: f64,
    last: Instant,
}

impl Bucket {
    fn take(&mut self, now: Instant) -> bool {
        let dt = now.duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + dt * self.rate).min(self.burst);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// The account's `GetAuthorizationToken`, as the SDK sees it: each call is one to three attempts,
/// throttled ones retried after the standard mode's jittered exponential backoff.
struct Api {
    bucket: Mutex<Bucket>,
    attempts: AtomicU64,
    throttled: AtomicU64,
}

impl Api {
    fn new(rate: f64, burst: f64) -> Arc<Api> {
        Arc::new(Api {
            bucket: Mutex::new(Bucket {
                tokens: burst,
                rate,
                burst,
                last: Instant::now(),
            }),
            attempts: AtomicU64::new(0),
            throttled: AtomicU64::new(0),
        })
    }
}

struct NodeSource(Arc<Api>);

impl TokenSource for NodeSource {
    fn fetch(&self) -> Pin<Box<dyn Future<Output = Result<FetchedToken, TokenError>> + Send + '_>> {
        Box::pin(async move {
            for attempt in 1..=SDK_ATTEMPTS {
                tokio::time::sleep(API_LATENCY).await;
                self.0.attempts.fetch_add(1, Ordering::Relaxed);
                let granted = self
                    .0
                    .bucket
                    .lock()
                    .map(|mut b| b.take(Instant::now()))
                    .unwrap_or(false);
                if granted {
                    return Ok(FetchedToken {
                        authorization_token: Secret::new("QVdTOnNpbXVsYXRlZA==".into()),
                        expires_at: Some(SystemTime::now() + Duration::from_secs(12 * 3600)),
                        proxy_endpoint: None,
                    });
                }
                self.0.throttled.fetch_add(1, Ordering::Relaxed);
                if attempt < SDK_ATTEMPTS {
                    let cap = Duration::from_secs(1 << (attempt - 1)).min(SDK_MAX_BACKOFF);
                    tokio::time::sleep(cap.mul_f64(fastrand::f64())).await;
                }
            }
            Err(TokenError::throttled(
                "ThrottlingException: Rate exceeded (after the SDK's retries)",
            ))
        })
    }
}

/// How the mirror and the node agent behave, before and after the fleet work.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Design {
    /// `/readyz` waits for a token, so `hosts.toml` is installed only once the mirror has one;
    /// a request without a token is answered 503 at once.
    Today,
    /// `/readyz` answers ready while the token API only throttles, so the files go in at once;
    /// a request waits for a token (the mirror's `TOKEN_WAIT`) while it is throttled.
    Wait,
}

/// What one node saw.
#[derive(Default, Clone)]
struct NodeReport {
    token_after: Option<Duration>,
    first_pulls_upstream: u32,
    manifest_gets: Vec<Duration>,
    /// How long the first pulls waited for the mirror's answer.
    first_pull_waits: Vec<Duration>,
}

async fn node(api: Arc<Api>, design: Design, wait: Duration, start: Duration) -> NodeReport {
    tokio::time::sleep(start).await;
    let t0 = Instant::now();
    let tokens = TokenCache::new(Arc::new(NodeSource(api)), Metrics::new().0);
    let report = Arc::new(Mutex::new(NodeReport::default()));
    let got = {
        let report = Arc::clone(&report);
        move |ok: bool| {
            if ok
                && let Ok(mut r) = report.lock()
                && r.token_after.is_none()
            {
                r.token_after = Some(t0.elapsed());
            }
        }
    };
    // The mirror's start-up fetch.
    {
        let (tokens, got) = (tokens.clone(), got.clone());
        tokio::spawn(async move { got(tokens.get().await.is_ok()) });
    }
    // The node agent: ready means hosts.toml installed.
    let installed = Arc::new(std::sync::atomic::AtomicBool::new(false));
    {
        let (tokens, got, installed) = (tokens.clone(), got.clone(), Arc::clone(&installed));
        tokio::spawn(async move {
            while t0.elapsed() < HORIZON {
                let ready = match design {
                    Design::Today => {
                        let r = tokio::time::timeout(READY_WAIT, tokens.get()).await;
                        let ok = matches!(r, Ok(Ok(_)));
                        got(ok);
                        ok
                    }
                    Design::Wait => {
                        let r = tokio::time::timeout(READY_WAIT, tokens.availability()).await;
                        got(matches!(r, Ok(Availability::Ready)));
                        matches!(r, Ok(a) if a.serves_requests())
                    }
                };
                if ready {
                    installed.store(true, Ordering::Relaxed);
                    return;
                }
                tokio::time::sleep(READY_POLL).await;
            }
        });
    }
    // The first burst of pulls.
    tokio::time::sleep(FIRST_PULL_AFTER).await;
    let through_mirror = installed.load(Ordering::Relaxed);
    let mut pulls = Vec::new();
    for _ in 0..PODS {
        let (tokens, got) = (tokens.clone(), got.clone());
        pulls.push(tokio::spawn(async move {
            if !through_mirror {
                return (false, Duration::ZERO);
            }
            let asked = Instant::now();
            let ok = request_token(&tokens, design, wait).await;
            got(ok);
            (ok, asked.elapsed())
        }));
    }
    let mut served = 0;
    let mut waits = Vec::new();
    for p in pulls {
        let (ok, waited) = p.await.unwrap_or((false, Duration::ZERO));
        served += u32::from(ok);
        waits.push(waited);
    }
    if let Ok(mut r) = report.lock() {
        r.first_pulls_upstream = PODS - served;
        if served > 0 {
            // One tag and one platform manifest per image, shared by the node's pods.
            r.manifest_gets = vec![start + t0.elapsed(); (2 * IMAGES) as usize];
        }
        r.first_pull_waits = waits;
    }
    // Later pulls, until the node has its token.
    while t0.elapsed() < HORIZON {
        if report
            .lock()
            .map(|r| r.token_after.is_some())
            .unwrap_or(true)
        {
            break;
        }
        tokio::time::sleep(LATER_PULL_EVERY).await;
        if installed.load(Ordering::Relaxed) {
            got(request_token(&tokens, design, wait).await);
        }
    }
    report.lock().map(|r| r.clone()).unwrap_or_default()
}

/// The mirror's token step for one request.
async fn request_token(tokens: &TokenCache, design: Design, wait: Duration) -> bool {
    match design {
        Design::Today => tokens.get().await.is_ok(),
        Design::Wait => tokens.get_within(wait).await.is_ok(),
    }
}

struct Scenario {
    design: Design,
    wait: Duration,
    nodes: u32,
    spread: u64,
    rate: f64,
    burst: f64,
}

struct Row {
    attempts: u64,
    throttled: u64,
    p50: Option<Duration>,
    p99: Option<Duration>,
    max: Option<Duration>,
    without_token: u32,
    upstream_share: f64,
    peak_gets: u64,
    wait_p99: Duration,
}

fn simulate(s: &Scenario, seed: u64) -> Row {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
    {
        Ok(rt) => rt,
        Err(e) => panic!("runtime: {e}"),
    };
    rt.block_on(async {
        fastrand::seed(seed);
        let api = Api::new(s.rate, s.burst);
        let mut handles = Vec::new();
        for _ in 0..s.nodes {
            let start = Duration::from_secs_f64(fastrand::f64() * s.spread as f64);
            handles.push(tokio::spawn(node(
                Arc::clone(&api),
                s.design,
                s.wait,
                start,
            )));
        }
        let mut reports = Vec::new();
        for h in handles {
            reports.push(h.await.unwrap_or_default());
        }
        let mut times: Vec<Duration> = reports.iter().filter_map(|r| r.token_after).collect();
        times.sort();
        let pick = |q: f64| {
            (!times.is_empty()).then(|| times[((times.len() - 1) as f64 * q).round() as usize])
        };
        let upstream: u32 = reports.iter().map(|r| r.first_pulls_upstream).sum();
        let mut per_second: BTreeMap<u64, u64> = BTreeMap::new();
        for t in reports.iter().flat_map(|r| &r.manifest_gets) {
            *per_second.entry(t.as_secs()).or_default() += 1;
        }
        let mut waits: Vec<Duration> = reports
            .iter()
            .flat_map(|r| r.first_pull_waits.iter().copied())
            .collect();
        waits.sort();
        let wait_p99 = waits
            .get(((waits.len().max(1) - 1) as f64 * 0.99).round() as usize)
            .copied()
            .unwrap_or_default();
        Row {
            wait_p99,
            attempts: api.attempts.load(Ordering::Relaxed),
            throttled: api.throttled.load(Ordering::Relaxed),
            p50: pick(0.5),
            p99: pick(0.99),
            max: times.last().copied(),
            without_token: s.nodes - times.len() as u32,
            upstream_share: f64::from(upstream) / f64::from(s.nodes * PODS),
            peak_gets: per_second.values().copied().max().unwrap_or(0),
        }
    })
}

fn secs(d: Option<Duration>) -> String {
    d.map_or("–".into(), |d| format!("{:.1}", d.as_secs_f64()))
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let arg = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    let designs = match arg("--design").as_deref() {
        Some("today") => vec![Design::Today],
        Some("wait") => vec![Design::Wait],
        _ => vec![Design::Today, Design::Wait],
    };
    let nodes: Vec<u32> = arg("--nodes")
        .and_then(|n| n.parse().ok())
        .map_or(vec![100, 1000, 5000], |n| vec![n]);
    let spreads: Vec<u64> = arg("--spread")
        .and_then(|n| n.parse().ok())
        .map_or(vec![0, 60, 300], |n| vec![n]);
    let quotas = [(20.0, 200.0, "20/s, burst 200"), (500.0, 500.0, "500/s")];
    let wait = arg("--wait")
        .and_then(|w| w.parse().ok())
        .map_or(pullthrough::mirror::token::TOKEN_WAIT, Duration::from_secs);
    println!(
        "Fleet simulation (`cargo run --release --example fleet`): {PODS} pods of {IMAGES} images \
         per node, first pulls {}s after the mirror starts; paused clock, seed 1.\n",
        FIRST_PULL_AFTER.as_secs()
    );
    println!(
        "| design | token quota | nodes | start spread (s) | API calls | throttled | token p50 / p99 / max (s) | nodes without a token at 20 min | first pulls sent upstream | first pulls' wait p99 (s) | peak manifest GETs/s (without the single flight) |"
    );
    println!("|---|---|---:|---:|---:|---:|---|---:|---:|---:|---:|");
    for design in &designs {
        for &(rate, burst, quota) in &quotas {
            for &n in &nodes {
                for &spread in &spreads {
                    let s = Scenario {
                        design: *design,
                        wait,
                        nodes: n,
                        spread,
                        rate,
                        burst,
                    };
                    let r = simulate(&s, 1);
                    println!(
                        "| {} | {quota} | {n} | {spread} | {} | {} | {} / {} / {} | {} | {:.1} % | {:.1} | {} ({}) |",
                        match design {
                            Design::Today => "before",
                            Design::Wait => "after",
                        },
                        r.attempts,
                        r.throttled,
                        secs(r.p50),
                        secs(r.p99),
                        secs(r.max),
                        r.without_token,
                        r.upstream_share * 100.0,
                        r.wait_p99.as_secs_f64(),
                        r.peak_gets,
                        r.peak_gets * u64::from(PODS) / u64::from(IMAGES),
                    );
                }
            }
        }
    }
}
