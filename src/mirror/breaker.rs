//! The fail-fast circuit breaker in front of the ECR registry endpoint.
//!
//! containerd asks the mirror for the index, the manifest, the config and every layer, one
//! request each, and falls back to the real registry per request. With only a timeout, a hung
//! ECR endpoint costs one full response-header timeout on *every* one of those requests (about
//! 150 s for one pull with 30 s timeouts). So after a failed connect or a response-header timeout
//! the breaker *opens*: the mirror answers 503 at once (through [`super::respond`]) and
//! containerd goes upstream without waiting, while a background probe checks the endpoint every
//! `breaker.cooldown` (like Envoy's outlier detection). The first success, a probe's or a
//! request's already in flight, closes it. Error statuses (500, 503, 429) do not open it: they
//! arrive at once, so containerd already falls back fast.
//!
//! `/readyz` does not reflect the breaker, on purpose: `pullthrough node` waits on it before
//! installing `hosts.toml`, and kubelet marks the pod unready on it. An ECR outage is exactly
//! when the mirror must stay installed and answer fast 503s; flapping readiness would only
//! add alerts and, on a restarted node, delay the install, while containerd already falls back.
//!
//! [`Machine`] is the pure state machine (time is passed in); [`Breaker`] adds the lock, the
//! metrics and the probe task.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http::{HeaderMap, Method, Uri};
use serde::Deserialize;
use toml::Spanned;

use super::forward::{self, Forwarder};
use super::metrics::Metrics;
use crate::config::error::{ConfigError, Locator};

/// Default `breaker.cooldown`.
pub const DEFAULT_COOLDOWN: Duration = Duration::from_secs(5);

/// The path the probe asks for: the API root, which every registry answers (ECR and
/// distribution with 401 when unauthenticated). Any HTTP answer means the endpoint is back.
pub const PROBE_PATH: &str = "/v2/";

/// Why a request was not sent.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BreakerError {
    /// The breaker is open: the endpoint recently refused or hung.
    #[error(
        "the ECR endpoint failed recently (refused or timed out); failing fast while it is \
         probed, next probe in {next_probe:?}"
    )]
    Open {
        /// Time until the next probe is due (zero while one is in flight).
        next_probe: Duration,
    },
}

/// `[breaker]` as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawBreaker {
    cooldown: Option<Spanned<String>>,
}

/// `[breaker]`, validated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BreakerConfig {
    /// How long the mirror fails fast after a connect failure or a timeout before it probes the
    /// endpoint again.
    pub cooldown: Duration,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        Self {
            cooldown: DEFAULT_COOLDOWN,
        }
    }
}

/// Validates `[breaker]`.
pub(crate) fn validate(raw: &RawBreaker, at: Locator<'_>) -> Result<BreakerConfig, ConfigError> {
    let cooldown = at.positive_duration(&raw.cooldown, "breaker.cooldown", DEFAULT_COOLDOWN)?;
    Ok(BreakerConfig { cooldown })
}

/// The breaker's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Requests go to the endpoint.
    Closed,
    /// Requests fail fast; the next probe is due at `probe_at`.
    Open {
        /// When the probe may run.
        probe_at: Instant,
    },
}

/// What an event changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    /// Nothing.
    Unchanged,
    /// Closed → open: start the probe.
    Opened,
    /// Open → closed.
    Closed,
    /// Still open, next probe rescheduled.
    Reprobe,
}

/// The pure state machine. Every method takes the current time instead of reading a clock.
#[derive(Debug, Clone)]
pub struct Machine {
    state: State,
    cooldown: Duration,
    /// Counts openings. A probe task belongs to one opening: if the breaker closed and opened
    /// again meanwhile, the new opening has its own task, and the old one must stop rather than
    /// probe (and reschedule) on the old timetable beside it.
    opening: u64,
}

impl Machine {
    /// A closed breaker.
    pub fn new(cooldown: Duration) -> Self {
        Self {
            state: State::Closed,
            cooldown,
            opening: 0,
        }
    }

    /// The current opening, for the probe task that the `Opened` transition starts.
    pub fn opening(&self) -> u64 {
        self.opening
    }

    /// When the probe task of `opening` should probe next, or `None` if that task should end:
    /// the breaker closed, or it closed and opened again (another task's turn).
    pub fn probe_due(&self, opening: u64) -> Option<Instant> {
        match self.state {
            State::Open { probe_at } if opening == self.opening => Some(probe_at),
            _ => None,
        }
    }

    /// The current state.
    pub fn state(&self) -> State {
        self.state
    }

    /// May a request go to the endpoint now?
    pub fn admit(&self, now: Instant) -> Result<(), BreakerError> {
        match self.state {
            State::Closed => Ok(()),
            State::Open { probe_at } => Err(BreakerError::Open {
                next_probe: probe_at.saturating_duration_since(now),
            }),
        }
    }

    /// A connect failure or a response-header timeout.
    pub fn failure(&mut self, now: Instant) -> Transition {
        match self.state {
            State::Closed => {
                self.state = State::Open {
                    probe_at: now + self.cooldown,
                };
                self.opening = self.opening.wrapping_add(1);
                Transition::Opened
            }
            // Requests sent before it opened fail late; they change nothing.
            State::Open { .. } => Transition::Unchanged,
        }
    }

    /// Any HTTP answer from the endpoint (a request's or a probe's).
    pub fn success(&mut self) -> Transition {
        match self.state {
            State::Closed => Transition::Unchanged,
            State::Open { .. } => {
                self.state = State::Closed;
                Transition::Closed
            }
        }
    }

    /// The probe of `opening` failed: stay open, probe again after another cool-down.
    pub fn probe_failed(&mut self, now: Instant, opening: u64) -> Transition {
        match self.state {
            // A request succeeded meanwhile, and maybe another failure opened it again with a
            // task of its own: a late answer to an old probe changes nothing.
            State::Open { .. } if opening != self.opening => Transition::Unchanged,
            State::Closed => Transition::Unchanged,
            State::Open { .. } => {
                self.state = State::Open {
                    probe_at: now + self.cooldown,
                };
                Transition::Reprobe
            }
        }
    }
}

/// The breaker the proxy uses: [`Machine`] behind a lock, plus metrics and the probe task.
/// Cheap to clone.
#[derive(Clone, Debug)]
pub struct Breaker {
    machine: Arc<Mutex<Machine>>,
    forwarder: Forwarder,
    metrics: Metrics,
}

impl Breaker {
    /// A closed breaker; `forwarder` sends the probes.
    pub fn new(config: BreakerConfig, forwarder: Forwarder, metrics: Metrics) -> Self {
        Self {
            machine: Arc::new(Mutex::new(Machine::new(config.cooldown))),
            forwarder,
            metrics,
        }
    }

    fn with<T>(&self, f: impl FnOnce(&mut Machine) -> T) -> T {
        // A panic while holding this lock cannot leave the machine half-updated (every method
        // assigns the state in one step), so a poisoned lock is still usable.
        let mut m = self
            .machine
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        f(&mut m)
    }

    /// `Err` (and counts a fast failure) while open.
    pub fn admit(&self) -> Result<(), BreakerError> {
        let r = self.with(|m| m.admit(Instant::now()));
        if r.is_err() {
            self.metrics.breaker_fast_failures.inc();
        }
        r
    }

    /// The endpoint answered.
    pub fn success(&self) {
        if self.with(Machine::success) == Transition::Closed {
            self.metrics.breaker_open.set(0);
            tracing::info!("the ECR endpoint answers again; circuit breaker closed");
        }
    }

    /// A connect failure or a timeout towards `base`: opens the breaker and starts probing.
    pub fn failure(&self, base: &Uri, error: &str) {
        let (transition, opening) = self.with(|m| (m.failure(Instant::now()), m.opening()));
        if transition == Transition::Opened {
            self.metrics.breaker_open.set(1);
            tracing::warn!(%error, "ECR endpoint failed; circuit breaker open, failing fast");
            let me = self.clone();
            let base = base.clone();
            tokio::spawn(async move { me.probe(base, opening).await });
        }
    }

    /// Probes until the breaker closes. One task runs per opening: only the `Opened` transition
    /// starts one, and a task ends as soon as its opening is over (closed, or closed and opened
    /// again, which started the next task).
    async fn probe(self, base: Uri, opening: u64) {
        let Some(uri) = forward::upstream_uri(&base, PROBE_PATH) else {
            // Cannot happen for a base the proxy just used; never stay open for it.
            self.success();
            return;
        };
        loop {
            let Some(probe_at) = self.with(|m| m.probe_due(opening)) else {
                return;
            };
            tokio::time::sleep_until(tokio::time::Instant::from_std(probe_at)).await;
            if self.with(|m| m.probe_due(opening)).is_none() {
                return;
            }
            self.metrics.breaker_probes.inc();
            match self
                .forwarder
                .send(Method::GET, uri.clone(), HeaderMap::new())
                .await
            {
                Ok(_) => self.success(),
                Err(e) => {
                    tracing::debug!(error = %e, "circuit breaker probe failed");
                    self.with(|m| m.probe_failed(Instant::now(), opening));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rstest::rstest;

    const COOL: Duration = Duration::from_secs(5);

    #[derive(Debug, Clone, Copy)]
    enum Ev {
        Fail(u64),
        Ok,
        ProbeFail(u64),
        /// A probe of the previous opening fails late.
        StaleProbeFail(u64),
    }

    /// Applies events (times in seconds from `t0`), returns the transitions and the final state.
    fn run(events: &[Ev]) -> (Vec<Transition>, Machine, Instant) {
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let mut m = Machine::new(COOL);
        let ts = events
            .iter()
            .map(|e| match *e {
                Ev::Fail(s) => m.failure(at(s)),
                Ev::Ok => m.success(),
                Ev::ProbeFail(s) => {
                    let o = m.opening();
                    m.probe_failed(at(s), o)
                }
                Ev::StaleProbeFail(s) => {
                    let o = m.opening().wrapping_sub(1);
                    m.probe_failed(at(s), o)
                }
            })
            .collect();
        (ts, m, t0)
    }

    use Transition as T;

    #[rstest]
    #[case::starts_closed(&[], &[], None)]
    #[case::failure_opens(&[Ev::Fail(0)], &[T::Opened], Some(5))]
    #[case::second_failure_keeps_the_first_deadline(&[Ev::Fail(0), Ev::Fail(3)], &[T::Opened, T::Unchanged], Some(5))]
    #[case::success_closes(&[Ev::Fail(0), Ev::Ok], &[T::Opened, T::Closed], None)]
    #[case::success_when_closed_is_nothing(&[Ev::Ok], &[T::Unchanged], None)]
    #[case::probe_failure_reschedules(&[Ev::Fail(0), Ev::ProbeFail(7)], &[T::Opened, T::Reprobe], Some(12))]
    #[case::late_probe_failure_after_close(&[Ev::Fail(0), Ev::Ok, Ev::ProbeFail(7)], &[T::Opened, T::Closed, T::Unchanged], None)]
    #[case::stale_probe_failure_keeps_the_new_deadline(&[Ev::Fail(0), Ev::Ok, Ev::Fail(20), Ev::StaleProbeFail(22)], &[T::Opened, T::Closed, T::Opened, T::Unchanged], Some(25))]
    #[case::reopens_after_close(&[Ev::Fail(0), Ev::Ok, Ev::Fail(20)], &[T::Opened, T::Closed, T::Opened], Some(25))]
    fn transitions(
        #[case] events: &[Ev],
        #[case] want: &[Transition],
        #[case] probe_at: Option<u64>,
    ) {
        let (ts, m, t0) = run(events);
        assert_eq!(ts, want);
        let want_state = match probe_at {
            None => State::Closed,
            Some(s) => State::Open {
                probe_at: t0 + Duration::from_secs(s),
            },
        };
        assert_eq!(m.state(), want_state);
    }

    #[test]
    fn only_the_current_openings_task_probes() {
        let t0 = Instant::now();
        let mut m = Machine::new(COOL);
        assert_eq!(m.probe_due(m.opening()), None);
        m.failure(t0);
        let first = m.opening();
        assert_eq!(m.probe_due(first), Some(t0 + COOL));
        m.success();
        assert_eq!(m.probe_due(first), None);
        m.failure(t0 + Duration::from_secs(1));
        let second = m.opening();
        assert_ne!(first, second);
        // The first opening's task, waking now, must end; the second one's probes.
        assert_eq!(m.probe_due(first), None);
        assert_eq!(
            m.probe_due(second),
            Some(t0 + Duration::from_secs(1) + COOL)
        );
    }

    #[rstest]
    #[case::absent("", Ok(DEFAULT_COOLDOWN))]
    #[case::millis("[breaker]\ncooldown = \"750ms\"\n", Ok(Duration::from_millis(750)))]
    #[case::zero(
        "[breaker]\ncooldown = \"0s\"\n",
        Err(
            "b.toml:2: breaker.cooldown: \"0s\" is not a positive duration, e.g. \"5s\" or \"500ms\""
        )
    )]
    #[case::words(
        "\n[breaker]\ncooldown = \"soon\"\n",
        Err(
            "b.toml:3: breaker.cooldown: \"soon\" is not a positive duration, e.g. \"5s\" or \"500ms\""
        )
    )]
    #[case::unknown_key(
        "[breaker]\nthreshold = 3\n",
        Err("b.toml:2: breaker.threshold: unknown field")
    )]
    fn config(#[case] text: &str, #[case] want: Result<Duration, &str>) {
        let got = crate::config::Config::from_toml_str(text, "b.toml")
            .map(|c| c.breaker.cooldown)
            .map_err(|e| e.to_string());
        match (got, want) {
            (Ok(g), Ok(w)) => assert_eq!(g, w),
            (Err(g), Err(w)) => assert!(g.starts_with(w), "{g}"),
            (g, w) => panic!("got {g:?}, want {w:?}"),
        }
    }

    #[rstest]
    #[case::closed_admits(&[], 0, None)]
    #[case::open_refuses_with_time_to_probe(&[Ev::Fail(0)], 1, Some(4))]
    #[case::open_past_deadline_still_refuses_while_probing(&[Ev::Fail(0)], 9, Some(0))]
    #[case::closed_again_admits(&[Ev::Fail(0), Ev::Ok], 1, None)]
    fn admit(#[case] events: &[Ev], #[case] now: u64, #[case] refused_for: Option<u64>) {
        let (_, m, t0) = run(events);
        let got = m.admit(t0 + Duration::from_secs(now));
        let want = match refused_for {
            None => Ok(()),
            Some(s) => Err(BreakerError::Open {
                next_probe: Duration::from_secs(s),
            }),
        };
        assert_eq!(got, want);
    }
}
