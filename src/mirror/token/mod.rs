//! Signing: the node's ECR authorization token, fetched with `GetAuthorizationToken` through the
//! SDK's default credential chain and cached.
//!
//! One token serves every request (the token is valid for every registry the identity can read),
//! so the cache holds a single entry. Three properties matter on a busy node:
//! - N concurrent cold requests make exactly one API call (moka's `try_get_with` coalesces them);
//! - the token is refreshed in the background well before it expires, while requests keep using
//!   the old one;
//! - failures back off with jitter, because the API allows 20 TPS per account and region, and a
//!   fleet of nodes hammering it during an outage would only make it worse.
//!
//! Time is `tokio::time::Instant` so that tests can pause the clock. [`api`] is the AWS side:
//! the SDK config every command loads, and `GetAuthorizationToken` as a [`TokenSource`].

pub mod api;

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use http::{HeaderValue, Uri};
use moka::ops::compute::Op;
use tokio::time::Instant;

use super::metrics::Metrics;

pub use self::api::{EcrTokenSource, is_throttling, sdk_config};

/// Shortest lifetime we give a token. moto answers `expiresAt = 2015-01-01`, and a real node can
/// have a skewed clock: either way, trusting `expiresAt` would mean an API call per request.
pub const MIN_TOKEN_TTL: Duration = Duration::from_secs(5 * 60);
/// Stop using a token this long before it expires, so it never dies in flight.
const EXPIRY_MARGIN: Duration = Duration::from_secs(30);
const BACKOFF_BASE: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// The shortest wait before another call after throttling.
const MIN_THROTTLED_BACKOFF: Duration = Duration::from_millis(100);
/// The longest one `GetAuthorizationToken` may take, the SDK's own retries included. The SDK sets
/// only a connect timeout by default, so a token API (or IMDS, or STS) that accepts and never
/// answers would otherwise hold every request without a token, and the one background refresh,
/// for good: pulls would hang instead of falling back, and nothing would ever fetch again.
pub const FETCH_TIMEOUT: Duration = Duration::from_secs(10);
/// At most one token refetch per this interval because the registry refused a token. A 401
/// that no fresh token fixes (a missing permission, say) must not cost an API call per request.
pub const REFUSAL_REFETCH_INTERVAL: Duration = Duration::from_secs(10);

/// Why no token could be had.
#[derive(Debug, Clone, thiserror::Error)]
pub enum TokenError {
    /// The API call failed (credentials, network, the service).
    #[error("GetAuthorizationToken failed: {0}")]
    Api(String),
    /// The account's `GetAuthorizationToken` rate was exceeded, after the SDK's own retries. Every
    /// node of every cluster in the account and region shares that rate, so this is what a fleet
    /// scaling out meets; unlike a missing permission, it passes.
    #[error("GetAuthorizationToken was throttled: {0}")]
    Throttled(String),
    /// The API answered without a usable token.
    #[error("GetAuthorizationToken returned no usable authorization data")]
    Empty,
    /// The call took longer than [`FETCH_TIMEOUT`].
    #[error("GetAuthorizationToken took longer than {0:?}")]
    Timeout(Duration),
    /// A recent fetch failed; we do not call the API again until the backoff has passed.
    #[error("token unavailable (retrying in {retry_in:?}): {last}")]
    Backoff {
        /// Time until the next attempt.
        retry_in: Duration,
        /// The last failure.
        last: String,
    },
}

/// A secret string whose `Debug` never shows it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret.
    pub fn new(s: String) -> Self {
        Secret(s)
    }

    /// The secret itself; call only where it is sent, never where it is logged.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Secret(<redacted, {} bytes>)", self.0.len())
    }
}

/// What the token API returned.
#[derive(Debug, Clone)]
pub struct FetchedToken {
    /// `authorizationToken`: base64 of `AWS:<password>`, sent as `Basic` credentials.
    pub authorization_token: Secret,
    /// `expiresAt`.
    pub expires_at: Option<SystemTime>,
    /// `proxyEndpoint`, e.g. `https://123456789012.dkr.ecr.eu-west-1.amazonaws.com`.
    pub proxy_endpoint: Option<String>,
}

pub(crate) type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Where tokens come from: the real API, or a fake in unit tests.
pub trait TokenSource: Send + Sync + 'static {
    /// Calls `GetAuthorizationToken` (or pretends to).
    fn fetch(&self) -> BoxFuture<'_, Result<FetchedToken, TokenError>>;
}

/// How long a request waits for a token while the token API throttles, before it is answered
/// 503 and containerd pulls from the registry itself. containerd puts no deadline on a mirror's
/// answer, and a pull that waits here fills the cache instead of spending the registry's rate
/// limit during exactly the scale-out that throttles the token API (the fleet simulation in
/// `examples/fleet.rs`, BENCHMARKS.md).
pub const TOKEN_WAIT: Duration = Duration::from_secs(60);

/// Whether the mirror can serve requests now, as far as its token goes.
#[derive(Debug, Clone)]
pub enum Availability {
    /// A token is there.
    Ready,
    /// The token API throttles: requests wait for a token ([`TOKEN_WAIT`]).
    Throttled(TokenError),
    /// No token, and waiting would not bring one soon.
    Unavailable(TokenError),
}

impl Availability {
    /// Whether requests are served (at once, or after waiting out the throttling).
    pub fn serves_requests(&self) -> bool {
        !matches!(self, Availability::Unavailable(_))
    }
}

/// A cached token, ready to send.
#[derive(Clone)]
pub struct Token {
    header: HeaderValue,
    /// The registry URL the token API named, if it parsed.
    pub proxy_endpoint: Option<Uri>,
    refresh_at: Instant,
    usable_until: Instant,
}

impl Token {
    /// `Authorization: Basic …`, marked sensitive so hyper never logs it.
    pub fn authorization(&self) -> HeaderValue {
        self.header.clone()
    }

    /// Time the token may still be used.
    pub fn time_left(&self) -> Duration {
        self.usable_until.saturating_duration_since(Instant::now())
    }
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let Token {
            header: _,
            proxy_endpoint,
            refresh_at,
            usable_until,
        } = self;
        f.debug_struct("Token")
            .field("header", &"<redacted>")
            .field("proxy_endpoint", proxy_endpoint)
            .field("refresh_at", refresh_at)
            .field("usable_until", usable_until)
            .finish()
    }
}

#[derive(Debug, Default)]
struct Backoff {
    failures: u32,
    retry_at: Option<Instant>,
    last: String,
    /// Whether the last failure was the API's throttling.
    throttled: bool,
}

/// The token cache. Cheap to clone.
#[derive(Clone)]
pub struct TokenCache {
    inner: Arc<Inner>,
}

struct Inner {
    source: Arc<dyn TokenSource>,
    cache: moka::future::Cache<(), Arc<Token>>,
    backoff: Mutex<Backoff>,
    refreshing: AtomicBool,
    last_refusal_refetch: Mutex<Option<Instant>>,
    metrics: Metrics,
    /// Woken whenever a fetch ends, for requests waiting out throttling.
    fetched: tokio::sync::Notify,
}

impl fmt::Debug for TokenCache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenCache").finish_non_exhaustive()
    }
}

impl TokenCache {
    /// A usable token, like [`get`](Self::get), but while the token API only throttles (the
    /// account's shared rate is exhausted, which passes), wait for one for at most `wait`,
    /// retrying with the backoff's full jitter. Any other failure (a missing permission, an
    /// unreachable API) answers at once, as [`get`](Self::get) does: waiting would only delay
    /// containerd's fallback to the registry itself.
    pub async fn get_within(&self, wait: Duration) -> Result<Arc<Token>, TokenError> {
        let deadline = Instant::now() + wait;
        loop {
            // Registered before asking, so a fetch that ends in between still wakes this caller.
            let fetched = self.inner.fetched.notified();
            tokio::pin!(fetched);
            fetched.as_mut().enable();
            let err = match self.get().await {
                Ok(t) => return Ok(t),
                Err(e) => e,
            };
            let now = Instant::now();
            if !self.throttled() || now >= deadline {
                return Err(err);
            }
            // While the backoff runs, the next fetch starts when it ends (the next `get` starts
            // it); once it has ended, `get` has started one, and its end wakes this caller.
            let wake = match self.retry_at() {
                Some(at) if at > now => at.min(deadline),
                _ => deadline,
            };
            tokio::select! {
                () = &mut fetched => {}
                () = tokio::time::sleep_until(wake) => {}
            }
        }
    }

    /// Whether requests can be served now or soon: a token is cached (or fetched within this
    /// call), or the token API throttles, which requests wait out ([`get_within`]). The mirror's
    /// `/readyz` answers with it.
    ///
    /// [`get_within`]: Self::get_within
    pub async fn availability(&self) -> Availability {
        match self.get().await {
            Ok(_) => Availability::Ready,
            Err(e) if self.throttled() => Availability::Throttled(e),
            Err(e) => Availability::Unavailable(e),
        }
    }

    /// A cache in front of `source`.
    pub fn new(source: Arc<dyn TokenSource>, metrics: Metrics) -> Self {
        Self {
            inner: Arc::new(Inner {
                source,
                cache: moka::future::Cache::new(1),
                backoff: Mutex::new(Backoff::default()),
                refreshing: AtomicBool::new(false),
                last_refusal_refetch: Mutex::new(None),
                metrics,
                fetched: tokio::sync::Notify::new(),
            }),
        }
    }

    /// A usable token: cached, or fetched (once, however many callers wait for it).
    pub async fn get(&self) -> Result<Arc<Token>, TokenError> {
        let now = Instant::now();
        if let Some(t) = self.inner.cache.get(&()).await {
            if now < t.usable_until {
                if now >= t.refresh_at {
                    self.spawn_refresh();
                }
                return Ok(t);
            }
            self.invalidate(&t).await;
        }
        if let Some(e) = self.backoff_error(now) {
            return Err(e);
        }
        // After a failed fetch, no request waits for the next one: the SDK's own retries take seconds (about 2 s against a refused loopback port,
        // more with connect timeouts or IMDS), every request of every pull would wait with them,
        // and containerd could be pulling upstream meanwhile (scripts/fault-matrix, scenario 7).
        // The fetch runs in the background and the next request finds its token.
        if let Some(last) = self.failing() {
            self.spawn_refresh();
            return Err(TokenError::Backoff {
                retry_in: Duration::ZERO,
                last,
            });
        }
        let inner = Arc::clone(&self.inner);
        let token = self
            .inner
            .cache
            .try_get_with((), async move { inner.fetch().await })
            .await
            .map_err(|e: Arc<TokenError>| (*e).clone());
        if token.is_ok() {
            self.inner.succeeded();
        }
        self.inner.fetched.notify_waiters();
        token
    }

    /// The registry refused `stale` (a 401). Returns whether retrying with another token makes
    /// sense: yes if the cache already holds a newer one, or if `stale` is now dropped so the next
    /// [`get`](Self::get) fetches one; no if a refusal already forced a refetch within
    /// [`REFUSAL_REFETCH_INTERVAL`].
    pub async fn refused(&self, stale: &Arc<Token>) -> bool {
        match self.inner.cache.get(&()).await {
            Some(current) if Arc::ptr_eq(&current, stale) => {}
            // Already replaced (or gone): the next `get` has a newer token or fetches one.
            _ => return true,
        }
        {
            let Ok(mut last) = self.inner.last_refusal_refetch.lock() else {
                return false;
            };
            let now = Instant::now();
            if last.is_some_and(|t| now.duration_since(t) < REFUSAL_REFETCH_INTERVAL) {
                return false;
            }
            *last = Some(now);
        }
        self.invalidate(stale).await;
        true
    }

    /// Drops `stale`, unless it has been replaced already.
    pub async fn invalidate(&self, stale: &Arc<Token>) {
        let stale = Arc::clone(stale);
        self.inner
            .cache
            .entry(())
            .and_compute_with(|cur| async move {
                match cur {
                    Some(e) if Arc::ptr_eq(e.value(), &stale) => Op::Remove,
                    _ => Op::Nop,
                }
            })
            .await;
    }

    /// Seconds the cached token may still be used; 0 without one. For the metrics gauge.
    pub async fn seconds_left(&self) -> f64 {
        match self.inner.cache.get(&()).await {
            Some(t) => t.time_left().as_secs_f64(),
            None => 0.0,
        }
    }

    fn backoff_error(&self, now: Instant) -> Option<TokenError> {
        let b = self.inner.backoff.lock().ok()?;
        let retry_at = b.retry_at?;
        (now < retry_at).then(|| TokenError::Backoff {
            retry_in: retry_at - now,
            last: b.last.clone(),
        })
    }

    /// `Some(why)` if the last fetch failed (and no token has been cached since): then a
    /// request without a token does not wait for a fetch.
    fn failing(&self) -> Option<String> {
        let b = self.inner.backoff.lock().ok()?;
        (b.failures > 0).then(|| b.last.clone())
    }

    /// Whether the last fetch failed because the API throttled (and none succeeded since).
    fn throttled(&self) -> bool {
        self.inner
            .backoff
            .lock()
            .is_ok_and(|b| b.failures > 0 && b.throttled)
    }

    /// When the backoff lets the next fetch start, if a fetch failed.
    fn retry_at(&self) -> Option<Instant> {
        self.inner.backoff.lock().ok()?.retry_at
    }

    fn spawn_refresh(&self) {
        // After a failed refresh, wait out the backoff: the old token is still good, and a
        // request-rate stream of API calls during an outage is what the backoff is for.
        if self.backoff_error(Instant::now()).is_some()
            || self.inner.refreshing.swap(true, Ordering::AcqRel)
        {
            return;
        }
        let inner = Arc::clone(&self.inner);
        tokio::spawn(async move {
            if let Ok(token) = inner.fetch().await {
                inner.cache.insert((), token).await;
                // Only now: until the token is in the cache, requests must not start a fetch.
                inner.succeeded();
            }
            inner.refreshing.store(false, Ordering::Release);
            inner.fetched.notify_waiters();
        });
    }
}

impl Inner {
    async fn fetch(&self) -> Result<Arc<Token>, TokenError> {
        self.metrics.token_fetches.inc();
        let fetched = tokio::time::timeout(FETCH_TIMEOUT, self.source.fetch())
            .await
            .unwrap_or(Err(TokenError::Timeout(FETCH_TIMEOUT)));
        match fetched {
            // The backoff is reset by the caller once the token is cached (`succeeded`).
            Ok(fetched) => Ok(Arc::new(make_token(fetched)?)),
            Err(e) => {
                self.metrics.token_errors.inc();
                let delay = self.record_failure(&e);
                tracing::warn!(error = %e, retry_in = ?delay, "ECR token fetch failed");
                Err(e)
            }
        }
    }

    /// A fetched token is in the cache: forget past failures.
    fn succeeded(&self) {
        if let Ok(mut b) = self.backoff.lock() {
            *b = Backoff::default();
        }
    }

    fn record_failure(&self, e: &TokenError) -> Duration {
        let Ok(mut b) = self.backoff.lock() else {
            return Duration::ZERO;
        };
        b.failures = b.failures.saturating_add(1);
        b.throttled = matches!(e, TokenError::Throttled(_));
        let step = BACKOFF_BASE
            .saturating_mul(1u32 << (b.failures - 1).min(5))
            .min(BACKOFF_MAX);
        let delay = if b.throttled {
            // Throttling means every node of the account is asking at once: full jitter over
            // the whole step spreads their next calls the most (the AWS retry guidance), so the
            // shared rate serves the fleet as fast as it can.
            step.mul_f64(fastrand::f64()).max(MIN_THROTTLED_BACKOFF)
        } else {
            // Jitter between half and all of the exponential step, so nodes spread out.
            step.mul_f64(0.5 + fastrand::f64() / 2.0)
        };
        b.retry_at = Some(Instant::now() + delay);
        b.last = e.to_string();
        delay
    }
}

fn make_token(f: FetchedToken) -> Result<Token, TokenError> {
    let mut header = HeaderValue::from_str(&format!("Basic {}", f.authorization_token.expose()))
        .map_err(|_| TokenError::Empty)?;
    header.set_sensitive(true);
    let remaining = f
        .expires_at
        .and_then(|t| t.duration_since(SystemTime::now()).ok())
        .unwrap_or_default();
    let lifetime = if remaining < MIN_TOKEN_TTL + EXPIRY_MARGIN {
        tracing::warn!(
            expires_in = ?remaining,
            floor = ?MIN_TOKEN_TTL,
            "ECR token expiresAt is in the past or too near (clock skew?); using the floor TTL"
        );
        MIN_TOKEN_TTL
    } else {
        remaining - EXPIRY_MARGIN
    };
    let now = Instant::now();
    Ok(Token {
        header,
        proxy_endpoint: f
            .proxy_endpoint
            .as_deref()
            .and_then(crate::config::ecr::parse_base_url),
        // Refresh at three quarters of the lifetime: 9 h into a 12 h ECR token.
        refresh_at: now + lifetime.mul_f64(0.75),
        usable_until: now + lifetime,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    /// A fake token API: counts calls, can fail, can be slow.
    struct Fake {
        calls: AtomicUsize,
        fail: AtomicBool,
        /// How many of the next calls are throttled.
        throttle: AtomicUsize,
        ttl: Option<Duration>,
        delay: Duration,
    }

    impl Fake {
        fn new(ttl: Option<Duration>) -> Arc<Fake> {
            Arc::new(Fake {
                calls: AtomicUsize::new(0),
                fail: AtomicBool::new(false),
                throttle: AtomicUsize::new(0),
                ttl,
                delay: Duration::from_millis(50),
            })
        }
        fn calls(&self) -> usize {
            self.calls.load(Ordering::SeqCst)
        }
    }

    impl TokenSource for Fake {
        fn fetch(&self) -> BoxFuture<'_, Result<FetchedToken, TokenError>> {
            Box::pin(async move {
                let n = self.calls.fetch_add(1, Ordering::SeqCst) + 1;
                tokio::time::sleep(self.delay).await;
                if self.fail.load(Ordering::SeqCst) {
                    return Err(TokenError::Api("boom".into()));
                }
                if self
                    .throttle
                    .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                    .is_ok()
                {
                    return Err(TokenError::throttled("ThrottlingException: Rate exceeded"));
                }
                Ok(FetchedToken {
                    authorization_token: Secret::new(format!("QVdTOnRva2VuLXtu}}{n}")),
                    expires_at: self.ttl.map(|d| SystemTime::now() + d),
                    proxy_endpoint: Some(
                        "https://123456789012.dkr.ecr.eu-west-1.amazonaws.com".into(),
                    ),
                })
            })
        }
    }

    fn cache(fake: &Arc<Fake>) -> TokenCache {
        TokenCache::new(fake.clone(), Metrics::new().0)
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_waits_out_throttling_for_its_token() {
        let fake = Fake::new(Some(Duration::from_secs(12 * 3600)));
        fake.throttle.store(3, Ordering::SeqCst);
        let cache = cache(&fake);
        let started = Instant::now();
        let token = cache.get_within(TOKEN_WAIT).await;
        assert!(token.is_ok(), "{token:?}");
        assert_eq!(fake.calls(), 4, "three throttled calls, then the token");
        assert!(started.elapsed() < TOKEN_WAIT);
        assert!(matches!(cache.availability().await, Availability::Ready));
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_gives_up_on_throttling_after_its_wait() {
        let fake = Fake::new(Some(Duration::from_secs(12 * 3600)));
        fake.throttle.store(usize::MAX, Ordering::SeqCst);
        let cache = cache(&fake);
        let started = Instant::now();
        let err = cache.get_within(Duration::from_secs(20)).await.unwrap_err();
        assert!(started.elapsed() >= Duration::from_secs(20), "{err}");
        assert!(err.to_string().contains("throttled"), "{err}");
        // Retried meanwhile, with the backoff between calls: more than one, far from a spin.
        let calls = fake.calls();
        assert!((2..=12).contains(&calls), "{calls} calls");
        // Ready all the same: requests wait, and containerd gets the files.
        let a = cache.availability().await;
        assert!(matches!(a, Availability::Throttled(_)), "{a:?}");
        assert!(a.serves_requests());
    }

    #[tokio::test(start_paused = true)]
    async fn other_failures_are_not_waited_for() {
        let fake = Fake::new(Some(Duration::from_secs(12 * 3600)));
        fake.fail.store(true, Ordering::SeqCst);
        let cache = cache(&fake);
        let started = Instant::now();
        let err = cache.get_within(TOKEN_WAIT).await.unwrap_err();
        assert!(matches!(err, TokenError::Api(_)), "{err:?}");
        assert_eq!(fake.calls(), 1);
        assert!(started.elapsed() < Duration::from_secs(1));
        let a = cache.availability().await;
        assert!(!a.serves_requests(), "{a:?}");
    }

    #[rstest::rstest]
    #[case::ecr("ThrottlingException", true)]
    #[case::generic("TooManyRequestsException", true)]
    #[case::ec2("RequestLimitExceeded", true)]
    #[case::denied("AccessDeniedException", false)]
    #[case::server("ServerException", false)]
    fn throttling_codes(#[case] code: &str, #[case] want: bool) {
        assert_eq!(is_throttling(code), want);
    }

    #[tokio::test(start_paused = true)]
    async fn concurrent_cold_requests_make_one_call() {
        let fake = Fake::new(Some(Duration::from_secs(12 * 3600)));
        let cache = cache(&fake);
        let tasks: Vec<_> = (0..100)
            .map(|_| {
                let c = cache.clone();
                tokio::spawn(async move { c.get().await.map(|t| t.authorization()) })
            })
            .collect();
        let mut headers = Vec::new();
        for t in tasks {
            headers.push(t.await.unwrap().unwrap());
        }
        assert_eq!(fake.calls(), 1);
        assert!(headers.iter().all(|h| *h == headers[0]));
        assert!(headers[0].is_sensitive());
    }

    #[tokio::test(start_paused = true)]
    async fn refreshes_in_background_before_expiry() {
        let fake = Fake::new(Some(Duration::from_secs(12 * 3600)));
        let cache = cache(&fake);
        let first = cache.get().await.unwrap().authorization();
        tokio::time::advance(Duration::from_secs(6 * 3600)).await;
        assert_eq!(cache.get().await.unwrap().authorization(), first);
        assert_eq!(fake.calls(), 1, "no refresh at half-life");
        tokio::time::advance(Duration::from_secs(3 * 3600 + 60)).await;
        // Past three quarters: the old token is still served while a refresh runs.
        assert_eq!(cache.get().await.unwrap().authorization(), first);
        tokio::time::sleep(Duration::from_secs(1)).await;
        let second = cache.get().await.unwrap().authorization();
        assert_ne!(second, first);
        assert_eq!(fake.calls(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn past_expiry_uses_floor_ttl() {
        // moto's behaviour: expiresAt in 2015.
        let fake = Fake::new(None);
        let cache = cache(&fake);
        let t = cache.get().await.unwrap();
        assert_eq!(t.time_left(), MIN_TOKEN_TTL);
        tokio::time::advance(MIN_TOKEN_TTL - Duration::from_secs(1)).await;
        cache.get().await.unwrap();
        tokio::time::advance(Duration::from_secs(2)).await;
        let t2 = cache.get().await.unwrap();
        assert_ne!(
            t2.authorization(),
            t.authorization(),
            "an expired token is never served"
        );
        assert!(fake.calls() >= 2);
    }

    #[tokio::test(start_paused = true)]
    async fn invalidate_drops_only_the_stale_token() {
        let fake = Fake::new(Some(Duration::from_secs(3600)));
        let cache = cache(&fake);
        let t1 = cache.get().await.unwrap();
        cache.invalidate(&t1).await;
        let t2 = cache.get().await.unwrap();
        assert_eq!(fake.calls(), 2);
        // A second 401 on the old token must not throw away the new one.
        cache.invalidate(&t1).await;
        assert_eq!(
            cache.get().await.unwrap().authorization(),
            t2.authorization()
        );
        assert_eq!(fake.calls(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn refusals_refetch_at_most_once_per_interval() {
        let fake = Fake::new(Some(Duration::from_secs(3600)));
        let cache = cache(&fake);
        let t1 = cache.get().await.unwrap();
        assert!(
            cache.refused(&t1).await,
            "first refusal: retry with a new token"
        );
        let t2 = cache.get().await.unwrap();
        assert_eq!(fake.calls(), 2);
        // A refusal of an already replaced token: retry with the current one, no new call.
        assert!(cache.refused(&t1).await);
        // The new token is refused too, right away: no second refetch.
        assert!(!cache.refused(&t2).await);
        assert_eq!(
            cache.get().await.unwrap().authorization(),
            t2.authorization()
        );
        assert_eq!(fake.calls(), 2);
        tokio::time::advance(REFUSAL_REFETCH_INTERVAL).await;
        assert!(cache.refused(&t2).await);
        cache.get().await.unwrap();
        assert_eq!(fake.calls(), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn failures_back_off_then_recover() {
        let fake = Fake::new(Some(Duration::from_secs(3600)));
        fake.fail.store(true, Ordering::SeqCst);
        let cache = cache(&fake);
        assert!(matches!(cache.get().await, Err(TokenError::Api(_))));
        // Within the backoff window, no API call is made.
        for _ in 0..10 {
            assert!(matches!(cache.get().await, Err(TokenError::Backoff { .. })));
        }
        assert_eq!(fake.calls(), 1);
        fake.fail.store(false, Ordering::SeqCst);
        tokio::time::advance(BACKOFF_BASE).await;
        // The retry runs in the background; this request does not wait for it.
        assert!(matches!(cache.get().await, Err(TokenError::Backoff { .. })));
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(cache.get().await.is_ok());
        assert_eq!(fake.calls(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn after_a_failure_no_request_waits_for_the_next_fetch() {
        let fake = Arc::new(Fake {
            calls: AtomicUsize::new(0),
            fail: AtomicBool::new(true),
            throttle: AtomicUsize::new(0),
            ttl: Some(Duration::from_secs(3600)),
            delay: FETCH_TIMEOUT / 2,
        });
        let cache = cache(&fake);
        assert!(matches!(cache.get().await, Err(TokenError::Api(_))));
        tokio::time::advance(BACKOFF_MAX).await;
        // A slow fetch (half the timeout) starts in the background; requests meanwhile answer at once (the
        // paused clock does not move) and start no other fetch.
        let t0 = Instant::now();
        for _ in 0..20 {
            assert!(matches!(cache.get().await, Err(TokenError::Backoff { .. })));
        }
        assert_eq!(Instant::now(), t0);
        tokio::time::sleep(Duration::from_millis(1)).await;
        assert_eq!(fake.calls(), 2);
        // It succeeds: the next request has the token, with no call of its own.
        fake.fail.store(false, Ordering::SeqCst);
        tokio::time::sleep(FETCH_TIMEOUT).await;
        assert!(cache.get().await.is_ok());
        assert_eq!(fake.calls(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn a_token_api_that_never_answers_times_out_and_is_retried() {
        let fake = Arc::new(Fake {
            calls: AtomicUsize::new(0),
            fail: AtomicBool::new(false),
            throttle: AtomicUsize::new(0),
            ttl: Some(Duration::from_secs(3600)),
            delay: Duration::from_secs(24 * 3600),
        });
        let cache = cache(&fake);
        // Cold: the request gets an error after the timeout, not a wait of a day.
        let t0 = Instant::now();
        assert!(matches!(cache.get().await, Err(TokenError::Timeout(_))));
        assert_eq!(Instant::now() - t0, FETCH_TIMEOUT);
        assert_eq!(fake.calls(), 1);
        // The background retry hangs too; it times out as well and does not stay "refreshing"
        // for good, so a later request starts another one.
        tokio::time::advance(BACKOFF_MAX).await;
        assert!(matches!(cache.get().await, Err(TokenError::Backoff { .. })));
        tokio::time::sleep(Duration::from_millis(1)).await;
        assert_eq!(fake.calls(), 2);
        tokio::time::sleep(FETCH_TIMEOUT + BACKOFF_MAX).await;
        assert!(matches!(cache.get().await, Err(TokenError::Backoff { .. })));
        tokio::time::sleep(Duration::from_millis(1)).await;
        assert_eq!(fake.calls(), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn a_refused_token_is_refetched_while_the_request_waits() {
        let fake = Fake::new(Some(Duration::from_secs(3600)));
        let cache = cache(&fake);
        let first = cache.get().await.unwrap();
        assert!(cache.refused(&first).await);
        // No failure happened: the retry after a 401 waits for its fresh token.
        let second = cache.get().await.unwrap();
        assert_ne!(second.authorization(), first.authorization());
        assert_eq!(fake.calls(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn failed_background_refresh_keeps_the_old_token_and_backs_off() {
        let fake = Fake::new(Some(Duration::from_secs(12 * 3600)));
        let cache = cache(&fake);
        let first = cache.get().await.unwrap().authorization();
        fake.fail.store(true, Ordering::SeqCst);
        tokio::time::advance(Duration::from_secs(10 * 3600)).await;
        // Requests past the refresh point during an outage keep the old token; while one refresh
        // runs, and during the backoff after it failed, no other call is made.
        for _ in 0..50 {
            assert_eq!(cache.get().await.unwrap().authorization(), first);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        for _ in 0..50 {
            assert_eq!(cache.get().await.unwrap().authorization(), first);
        }
        assert_eq!(fake.calls(), 2, "one initial fetch and one failed refresh");
        fake.fail.store(false, Ordering::SeqCst);
        tokio::time::advance(BACKOFF_MAX).await;
        cache.get().await.unwrap();
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_ne!(cache.get().await.unwrap().authorization(), first);
        assert_eq!(fake.calls(), 3);
    }

    #[test]
    fn debug_never_shows_the_token() {
        let s = Secret::new("QVdTOnNlY3JldA==".into());
        assert!(!format!("{s:?}").contains("QVdT"));
        let t = make_token(FetchedToken {
            authorization_token: s.clone(),
            expires_at: None,
            proxy_endpoint: None,
        })
        .unwrap();
        assert!(!format!("{t:?}").contains("QVdT"));
        let f = FetchedToken {
            authorization_token: s,
            expires_at: None,
            proxy_endpoint: None,
        };
        assert!(!format!("{f:?}").contains("QVdT"));
    }
}
