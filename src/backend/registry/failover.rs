//! Routing a generation across the backends in failover order: the first
//! backend that is up and whose circuit lets the call through gets it; a
//! backend that is down or full before the first token is left for the next
//! one (or tried again after a jittered backoff when none is left), within
//! a bounded number of attempts. Once text has reached the caller nothing
//! is retried: the caller would see it twice.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use futures_util::{StreamExt, future::BoxFuture, stream};

use super::{Entry, Pool};
use crate::backend::breaker::BreakerPolicy;
use crate::backend::{BackendError, ChunkStream, GenerationRequest, catalog::closest_names};

/// The longest wait before a backend that failed a call is tried again: the
/// call has sent nothing yet, and an interactive caller is better served by
/// an error after a couple of seconds than by a longer silence.
const MAX_BACKOFF: Duration = Duration::from_secs(2);

/// How long a call waits before trying again a backend it already tried,
/// after `attempts` attempts: drawn uniformly below
/// `min(cap, base · 2^(attempts - 1))` ("full jitter"), so callers retrying
/// together spread out. `fraction` is the random draw in [0, 1).
fn backoff(base: Duration, cap: Duration, attempts: u32, fraction: f64) -> Duration {
    let growth = 1u32
        .checked_shl(attempts.saturating_sub(1))
        .unwrap_or(u32::MAX);
    base.saturating_mul(growth)
        .min(cap)
        .mul_f64(fraction.clamp(0.0, 1.0))
}

/// How calls move between backends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FailoverPolicy {
    pub breaker: BreakerPolicy,
    /// Attempts after the first, before any token was sent.
    pub retries: u32,
    /// Base of the backoff before a backend that failed this call is tried
    /// again.
    pub backoff: Duration,
}

/// Backends a call has tried, in order.
#[derive(Clone, Default)]
struct Tried(Vec<usize>);

/// Backends a call may go to at all: those that serve its model.
#[derive(Clone)]
pub(super) struct Eligible(Vec<usize>);

impl Eligible {
    pub(super) fn indices(&self) -> impl Iterator<Item = usize> + '_ {
        self.0.iter().copied()
    }
}

impl Tried {
    fn attempts(&self) -> u32 {
        self.0.len() as u32
    }

    fn includes(&self, index: usize) -> bool {
        self.0.contains(&index)
    }
}

impl Pool {
    /// Starts `request` on the first backend that takes it. Errors before
    /// the stream starts are retried here; an error in place of the first
    /// chunk is retried when the stream is first read.
    pub(super) async fn route(
        self: Arc<Self>,
        request: GenerationRequest,
    ) -> Result<ChunkStream, BackendError> {
        let eligible = self.serving(request.model.as_deref())?;
        self.attempt(request, eligible, Tried::default()).await
    }

    /// The backends that serve `model` (every backend when the call names
    /// none): those whose last probe listed it, and those whose listing is
    /// unknown yet, in failover order. None at all is NOT_FOUND with the
    /// closest names served.
    pub(super) fn serving(&self, model: Option<&str>) -> Result<Eligible, BackendError> {
        let Some(model) = model else {
            return Ok(Eligible((0..self.entries.len()).collect()));
        };
        let eligible: Vec<usize> = (0..self.entries.len())
            .filter(|index| self.entries[*index].may_serve(model))
            .collect();
        if eligible.is_empty() {
            let served: Vec<String> = self.entries.iter().flat_map(Entry::listed).collect();
            return Err(BackendError::UnknownModel {
                model: model.to_owned(),
                closest: closest_names(model, served.iter().map(String::as_str)),
            });
        }
        Ok(Eligible(eligible))
    }

    fn attempt(
        self: Arc<Self>,
        request: GenerationRequest,
        mut eligible: Eligible,
        mut tried: Tried,
    ) -> BoxFuture<'static, Result<ChunkStream, BackendError>> {
        Box::pin(async move {
            let mut last_error = None;
            loop {
                let Some(index) = self.pick(&eligible, &tried) else {
                    return Err(last_error.unwrap_or_else(|| self.circuits_open()));
                };
                if tried.includes(index) {
                    let wait = backoff(
                        self.policy.backoff,
                        MAX_BACKOFF,
                        tried.attempts(),
                        crate::random::fraction(),
                    );
                    tokio::time::sleep(wait).await;
                }
                tried.0.push(index);
                match self.entries[index].backend.generate(request.clone()).await {
                    Ok(stream) => {
                        return Ok(self
                            .clone()
                            .first_chunk(index, stream, request, eligible, tried));
                    }
                    Err(error) => {
                        self.failed(index, &error);
                        let named = request.model.is_some();
                        if named && error.is_about_the_model() && eligible.0.len() > 1 {
                            // Its listing was stale, or it cannot load the
                            // model: the others that serve it may. (A call
                            // naming no model gets each backend's default,
                            // so there is nothing to move on for.)
                            eligible.0.retain(|other| *other != index);
                        } else if !self.retry_after(index, &error, &tried) {
                            return Err(error);
                        }
                        last_error = Some(error);
                    }
                }
            }
        })
    }

    /// Whether a call that just failed on backend `index` tries again.
    fn retry_after(&self, index: usize, error: &BackendError, tried: &Tried) -> bool {
        let retry = error.is_transient() && tried.attempts() <= self.policy.retries;
        if retry {
            self.entries[index].note_retry();
            tracing::warn!(%error, attempt = tried.attempts(), "retrying the call before its first token");
        }
        retry
    }

    /// The stream of a started generation: an error in place of its first
    /// chunk moves the call on like an error from `generate`; after that,
    /// the stream is only watched, for the backend's circuit and health.
    fn first_chunk(
        self: Arc<Self>,
        index: usize,
        mut stream: ChunkStream,
        request: GenerationRequest,
        eligible: Eligible,
        tried: Tried,
    ) -> ChunkStream {
        let head = async move {
            match stream.next().await {
                Some(Err(error)) => {
                    self.failed(index, &error);
                    if !self.retry_after(index, &error, &tried) {
                        return stream::once(async { Err(error) }).boxed();
                    }
                    match self.clone().attempt(request, eligible, tried).await {
                        Ok(next) => next,
                        Err(error) => stream::once(async { Err(error) }).boxed(),
                    }
                }
                first => {
                    if first.is_some() {
                        self.succeeded(index);
                    }
                    let pool = self.clone();
                    stream::iter(first)
                        .chain(stream)
                        .inspect(move |item| pool.watch(index, item))
                        .boxed()
                }
            }
        };
        stream::once(head).flatten().boxed()
    }

    /// The backend a call tries next, among those eligible: backends up by
    /// their last probe before ones that failed it (which may have
    /// recovered since), configured order within each, and the ones this
    /// call has not tried before those it has; only those whose circuit
    /// lets a call through.
    fn pick(&self, eligible: &Eligible, tried: &Tried) -> Option<usize> {
        let now = Instant::now();
        let preferred: Vec<usize> = self
            .preference(now)
            .into_iter()
            .filter(|index| eligible.0.contains(index))
            .collect();
        let untried = preferred.iter().filter(|index| !tried.includes(**index));
        let again = preferred.iter().filter(|index| tried.includes(**index));
        untried
            .chain(again)
            .copied()
            .find(|index| self.entries[*index].admit(now))
    }

    /// The error of a call no backend could take because every circuit is
    /// open.
    fn circuits_open(&self) -> BackendError {
        let now = Instant::now();
        let circuits = self
            .entries
            .iter()
            .map(|entry| match entry.reopens_in(now) {
                Some(left) => format!(
                    "{} is open for {:.1}s more",
                    entry.backend.name(),
                    left.as_secs_f64()
                ),
                None => format!("{} is testing recovery", entry.backend.name()),
            })
            .collect::<Vec<_>>()
            .join("; ");
        BackendError::CircuitsOpen { circuits }
    }
}

#[cfg(test)]
mod tests {
    use async_trait::async_trait;

    use super::*;
    use crate::backend::{
        Backend, Capabilities, ProbeReport, SchemaSupport,
        registry::{BackendHealth, Entry},
    };

    /// A backend that is never asked to generate: routing is decided
    /// before that.
    struct Named(&'static str);

    #[async_trait]
    impl Backend for Named {
        fn name(&self) -> &'static str {
            self.0
        }

        fn endpoint(&self) -> String {
            "nowhere".to_owned()
        }

        fn capabilities(&self) -> Capabilities {
            Capabilities {
                no_repeat: false,
                text_patterns: false,
                json_schema: SchemaSupport::Requested,
                seed: false,
            }
        }

        async fn probe(&self) -> Result<ProbeReport, BackendError> {
            Ok(ProbeReport::default())
        }

        async fn generate(&self, _: GenerationRequest) -> Result<ChunkStream, BackendError> {
            unreachable!("routing decisions never generate")
        }
    }

    const POLICY: FailoverPolicy = FailoverPolicy {
        breaker: BreakerPolicy {
            failures: 2,
            cooldown: Duration::from_secs(3600),
        },
        retries: 2,
        backoff: Duration::from_millis(50),
    };

    fn pool(size: usize) -> Pool {
        const NAMES: [&str; 3] = ["first", "second", "third"];
        Pool {
            entries: NAMES[..size]
                .iter()
                .map(|name| Entry::new(Arc::new(Named(name)), POLICY.breaker))
                .collect(),
            policy: POLICY,
            circuit_changed: tokio::sync::watch::Sender::new(()),
        }
    }

    fn tried(indices: &[usize]) -> Tried {
        Tried(indices.to_vec())
    }

    fn every(pool: &Pool) -> Eligible {
        pool.serving(None).unwrap()
    }

    fn listing(pool: &Pool, index: usize, models: &[&str]) {
        let mut state = pool.entries[index].state.write().unwrap();
        state.health = BackendHealth::Serving;
        state.report.models = models.iter().map(|model| (*model).to_owned()).collect();
    }

    #[test]
    fn a_named_model_goes_only_to_backends_that_serve_it() {
        let pool = pool(3);
        listing(&pool, 0, &["phi3", "orca2"]);
        listing(&pool, 1, &["mistral"]);
        // The third was never probed: its listing is unknown, so it may.
        let eligible = pool.serving(Some("mistral")).unwrap();
        assert_eq!(eligible.0, [1, 2]);
        assert_eq!(pool.pick(&eligible, &Tried::default()), Some(1));
        assert_eq!(pool.serving(Some("orca2")).unwrap().0, [0, 2]);
        listing(&pool, 2, &["llama3.1"]);
        assert_eq!(pool.serving(Some("mistral")).unwrap().0, [1]);
        let Err(BackendError::UnknownModel { model, closest }) = pool.serving(Some("orca")) else {
            panic!("expected an unknown model");
        };
        assert_eq!(model, "orca");
        assert_eq!(closest[0], "orca2");
        assert_eq!(pool.serving(None).unwrap().0, [0, 1, 2]);
    }

    fn down(backend: &'static str) -> BackendError {
        BackendError::Unavailable {
            backend,
            endpoint: "nowhere".to_owned(),
            reason: "test".to_owned(),
        }
    }

    fn probed(pool: &Pool, index: usize, health: BackendHealth) {
        pool.entries[index]
            .state
            .write()
            .expect("not poisoned")
            .health = health;
    }

    fn open_circuit(pool: &Pool, index: usize) {
        for _ in 0..POLICY.breaker.failures {
            pool.failed(index, &down("test"));
        }
    }

    #[test]
    fn calls_go_to_the_first_configured_backend_up_or_not_yet_probed() {
        let pool = pool(3);
        assert_eq!(
            pool.pick(&every(&pool), &Tried::default()),
            Some(0),
            "before any probe"
        );
        for index in 0..3 {
            probed(&pool, index, BackendHealth::Serving);
        }
        assert_eq!(pool.pick(&every(&pool), &Tried::default()), Some(0));
        assert_eq!(pool.preference(Instant::now()), [0, 1, 2]);
    }

    #[test]
    fn backends_a_call_has_not_tried_come_before_those_it_has() {
        let pool = pool(3);
        assert_eq!(pool.pick(&every(&pool), &tried(&[0])), Some(1));
        assert_eq!(pool.pick(&every(&pool), &tried(&[0, 1])), Some(2));
        assert_eq!(pool.pick(&every(&pool), &tried(&[1])), Some(0));
        assert_eq!(
            pool.pick(&every(&pool), &tried(&[0, 1, 2])),
            Some(0),
            "once all were tried, the configured order again"
        );
    }

    #[test]
    fn open_circuits_are_skipped_and_none_left_means_no_pick() {
        let pool = pool(2);
        open_circuit(&pool, 0);
        assert_eq!(pool.preference(Instant::now()), [1]);
        assert_eq!(pool.pick(&every(&pool), &Tried::default()), Some(1));
        assert_eq!(
            pool.pick(&every(&pool), &tried(&[1])),
            Some(1),
            "tried, but the only one"
        );
        open_circuit(&pool, 1);
        assert_eq!(pool.pick(&every(&pool), &Tried::default()), None);
        let BackendError::CircuitsOpen { circuits } = pool.circuits_open() else {
            panic!("every circuit is open");
        };
        assert!(
            circuits.contains("first is open for") && circuits.contains("second is open for"),
            "{circuits}"
        );
    }

    #[test]
    fn backends_failing_their_probes_come_last_but_are_not_dropped() {
        let pool = pool(3);
        probed(&pool, 0, BackendHealth::NotServing);
        probed(&pool, 1, BackendHealth::Serving);
        assert_eq!(
            pool.preference(Instant::now()),
            [1, 2, 0],
            "a probe can be stale, so a failing backend stays a last resort"
        );
        assert_eq!(pool.pick(&every(&pool), &Tried::default()), Some(1));
        assert_eq!(pool.pick(&every(&pool), &tried(&[1, 2])), Some(0));
        open_circuit(&pool, 0);
        assert_eq!(pool.preference(Instant::now()), [1, 2]);
    }

    #[test]
    fn only_transient_errors_are_retried_and_only_within_the_retries() {
        let pool = pool(2);
        let transient = [
            down("first"),
            BackendError::Busy {
                backend: "first",
                reason: "test".to_owned(),
            },
            BackendError::Overloaded {
                backend: "first",
                reason: "test".to_owned(),
            },
        ];
        for error in &transient {
            for attempts in 1..=POLICY.retries {
                let tried = Tried(vec![0; attempts as usize]);
                assert!(
                    pool.retry_after(0, error, &tried),
                    "{error} after {attempts}"
                );
            }
            let spent = Tried(vec![0; POLICY.retries as usize + 1]);
            assert!(
                !pool.retry_after(0, error, &spent),
                "{error}: retries spent"
            );
        }
        let about_the_request = [
            BackendError::Failed {
                backend: "first",
                reason: "test".to_owned(),
            },
            BackendError::Protocol {
                backend: "first",
                reason: "test".to_owned(),
            },
            BackendError::ModelNotFound {
                backend: "first",
                model: "test".to_owned(),
            },
            BackendError::NoDefaultModel { backend: "first" },
            BackendError::Rejected {
                backend: "first",
                reason: "test".to_owned(),
            },
            BackendError::CircuitsOpen {
                circuits: "test".to_owned(),
            },
        ];
        for error in &about_the_request {
            assert!(!pool.retry_after(0, error, &tried(&[0])), "{error}");
        }
        let retried = pool.entries[0]
            .retried
            .load(std::sync::atomic::Ordering::Relaxed);
        assert_eq!(retried, transient.len() as u64 * u64::from(POLICY.retries));
    }

    #[test]
    fn only_outages_count_against_a_circuit() {
        let pool = pool(1);
        let full = BackendError::Busy {
            backend: "first",
            reason: "test".to_owned(),
        };
        for _ in 0..POLICY.breaker.failures {
            pool.failed(0, &full);
        }
        assert_eq!(
            pool.pick(&every(&pool), &Tried::default()),
            Some(0),
            "busy is not down"
        );
        let changes = pool.circuit_changed.subscribe();
        open_circuit(&pool, 0);
        assert!(
            changes.has_changed().expect("open"),
            "health learns at once"
        );
        assert_eq!(pool.pick(&every(&pool), &Tried::default()), None);
    }

    const BASE: Duration = Duration::from_millis(50);
    const CAP: Duration = Duration::from_secs(2);
    /// The largest draw `random::fraction` returns.
    const ALMOST_ONE: f64 = 1.0 - f64::EPSILON;

    #[test]
    fn backoff_bound_doubles_with_each_attempt() {
        assert_eq!(backoff(BASE, CAP, 1, 1.0), BASE);
        assert_eq!(backoff(BASE, CAP, 2, 1.0), BASE * 2);
        assert_eq!(backoff(BASE, CAP, 3, 1.0), BASE * 4);
        assert_eq!(
            backoff(BASE, CAP, 0, 1.0),
            BASE,
            "no attempt yet counts as one"
        );
    }

    #[test]
    fn backoff_stops_growing_at_its_cap_without_overflowing() {
        assert_eq!(
            backoff(BASE, CAP, 6, 1.0),
            BASE * 32,
            "1.6 s, below the cap"
        );
        assert_eq!(backoff(BASE, CAP, 7, 1.0), CAP, "3.2 s would be past it");
        for attempts in [8, 31, 32, 33, u32::MAX] {
            assert_eq!(backoff(BASE, CAP, attempts, 1.0), CAP, "{attempts}");
        }
        assert_eq!(backoff(Duration::MAX, CAP, 40, 0.5), CAP / 2);
    }

    #[test]
    fn backoff_is_drawn_between_zero_and_its_bound() {
        for attempts in 1..8 {
            let bound = backoff(BASE, CAP, attempts, 1.0);
            assert_eq!(backoff(BASE, CAP, attempts, 0.0), Duration::ZERO);
            assert_eq!(backoff(BASE, CAP, attempts, 0.25), bound.mul_f64(0.25));
            assert!(backoff(BASE, CAP, attempts, ALMOST_ONE) <= bound);
        }
        assert_eq!(backoff(BASE, CAP, 1, -1.0), Duration::ZERO, "clamped");
        assert_eq!(backoff(BASE, CAP, 1, 7.0), BASE, "clamped");
    }
}
