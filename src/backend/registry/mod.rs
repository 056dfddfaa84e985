//! The backends in failover order, which one is active, and what the last
//! health probe of each said. Which backends there are, and in what order,
//! is decided where the service is built (`crate::app`); calls fail over
//! along that order (`failover`), each backend behind its own circuit
//! breaker (`crate::backend::breaker`).

mod failover;

use std::{
    sync::{
        Arc, Mutex, MutexGuard, RwLock,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use async_trait::async_trait;
use futures_util::{StreamExt, future::join_all};

pub use failover::FailoverPolicy;

use super::{
    Backend, BackendError, Capabilities, Chunk, ChunkStream, ComputeDevice, GenerationRequest,
    Message, ModelInfo, ProbeReport, ResidencyError, ResidencyStatus, Role, Sampling,
    breaker::{Breaker, BreakerPolicy, CircuitState},
    catalog::CatalogError,
    embedded::LoadError,
    instances::InstanceStatus,
};

#[derive(Debug, thiserror::Error)]
pub enum SelectionError {
    #[error("the openai backend needs OPENAI_BASE_URL (e.g. http://127.0.0.1:8080/v1)")]
    OpenAiWithoutUrl,
    #[error(transparent)]
    Embedded(#[from] LoadError),
    #[error(transparent)]
    Catalog(#[from] CatalogError),
    #[error("reading the model catalog failed: {0}")]
    CatalogTask(String),
    #[error(
        "--pin/--preload name {model:?}, which no embedded or MLX model is called; closest: {}",
        closest.join(", ")
    )]
    UnknownHeldModel { model: String, closest: Vec<String> },
    #[error("backend instances: {0}")]
    Targets(String),
    #[error("cannot build the HTTP client for backends: {0}")]
    HttpClient(#[from] reqwest::Error),
    #[error("the MLX backend cannot start: {0}")]
    Mlx(String),
    #[error("--backends lists {0} twice")]
    Repeated(&'static str),
    #[error("--backends names backends in order; `auto` is not one")]
    AutoInList,
}

/// Result of the last probe of a backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BackendHealth {
    Unknown,
    Serving,
    NotServing,
}

/// A backend's configuration and state, for status reports.
#[derive(Clone, Debug)]
pub struct BackendSnapshot {
    pub name: &'static str,
    pub endpoint: String,
    pub active: bool,
    pub health: BackendHealth,
    pub default_model: Option<String>,
    pub models: Vec<String>,
    pub capabilities: Capabilities,
    pub last_error: Option<String>,
    pub circuit: CircuitState,
    pub consecutive_failures: u32,
    /// Failures counted against the circuit since start.
    pub failures: u64,
    /// Calls that left this backend, down or full before their first
    /// token, for another attempt.
    pub retried: u64,
    /// The models it holds, where it holds them itself.
    pub residency: Option<ResidencyStatus>,
    /// The runtime instances behind it, where it is a pool of them.
    pub instances: Vec<InstanceStatus>,
    /// The device it computes on, where it knows.
    pub device: Option<ComputeDevice>,
}

impl BackendSnapshot {
    /// Whether calls can go to this backend: its last probe succeeded and
    /// its circuit is not open.
    pub fn serving(&self) -> bool {
        self.health == BackendHealth::Serving && self.circuit != CircuitState::Open
    }
}

struct ProbeState {
    health: BackendHealth,
    report: ProbeReport,
    last_error: Option<String>,
}

struct Entry {
    backend: Arc<dyn Backend>,
    state: RwLock<ProbeState>,
    /// When this backend last completed a generation.
    last_generated: Mutex<Option<Instant>>,
    breaker: Mutex<Breaker>,
    failures: AtomicU64,
    retried: AtomicU64,
}

fn locked<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poison| poison.into_inner())
}

impl Entry {
    fn new(backend: Arc<dyn Backend>, breaker: BreakerPolicy) -> Self {
        Self {
            backend,
            state: RwLock::new(ProbeState {
                health: BackendHealth::Unknown,
                report: ProbeReport::default(),
                last_error: None,
            }),
            last_generated: Mutex::new(None),
            breaker: Mutex::new(Breaker::new(breaker)),
            failures: AtomicU64::new(0),
            retried: AtomicU64::new(0),
        }
    }

    fn health(&self) -> BackendHealth {
        self.state
            .read()
            .unwrap_or_else(|poison| poison.into_inner())
            .health
    }

    /// The models its last probe listed.
    fn listed(&self) -> Vec<String> {
        self.state
            .read()
            .unwrap_or_else(|poison| poison.into_inner())
            .report
            .models
            .clone()
    }

    /// Whether it may serve `model`: its last probe listed it, or it has
    /// listed nothing (not probed yet, or a runtime that does not list).
    fn may_serve(&self, model: &str) -> bool {
        let state = self
            .state
            .read()
            .unwrap_or_else(|poison| poison.into_inner());
        state.report.models.is_empty() || self.backend.serves(&state.report.models, model)
    }

    /// Whether it may hold `model` in memory now: as its residency says,
    /// or, for a runtime that holds models out of process (Ollama), as its
    /// listing shows. One that cannot list now may hold it: the unload
    /// itself then says why it fails.
    async fn may_hold(&self, model: &str) -> bool {
        if let Some(status) = self.backend.residency() {
            return status
                .residents
                .iter()
                .any(|residence| residence.model == model);
        }
        match self.backend.models().await {
            Ok(models) => models
                .iter()
                .any(|info| info.name == model && info.residence.is_some()),
            Err(_) => true,
        }
    }

    fn mark_generated(&self) {
        *locked(&self.last_generated) = Some(Instant::now());
    }

    fn generated_within(&self, interval: Duration) -> bool {
        locked(&self.last_generated).is_some_and(|at| at.elapsed() < interval)
    }

    /// Calls may go here: not failing its probes, circuit not open.
    fn routable(&self, now: Instant) -> bool {
        self.health() != BackendHealth::NotServing
            && locked(&self.breaker).state(now) != CircuitState::Open
    }

    fn admit(&self, now: Instant) -> bool {
        locked(&self.breaker).admit(now)
    }

    fn reopens_in(&self, now: Instant) -> Option<Duration> {
        locked(&self.breaker).reopens_in(now)
    }

    /// Closes the circuit; true when it was not closed.
    fn succeeded(&self) -> bool {
        let mut breaker = locked(&self.breaker);
        let reopened = breaker.state(Instant::now()) != CircuitState::Closed;
        breaker.succeeded();
        if reopened {
            tracing::info!(backend = self.backend.name(), "circuit closed");
        }
        reopened
    }

    /// Counts an outage against the circuit (a refusal of the request or a
    /// full queue says nothing about the backend's health); true when the
    /// circuit opened.
    fn failed(&self, error: &BackendError) -> bool {
        if !error.is_outage() {
            return false;
        }
        self.failures.fetch_add(1, Ordering::Relaxed);
        let now = Instant::now();
        let mut breaker = locked(&self.breaker);
        let before = breaker.state(now);
        breaker.failed(now);
        let opened = before != CircuitState::Open && breaker.state(now) == CircuitState::Open;
        if opened {
            tracing::warn!(backend = self.backend.name(), %error, "circuit opened");
        }
        opened
    }

    fn note_retry(&self) {
        self.retried.fetch_add(1, Ordering::Relaxed);
    }
}

/// Readiness by generation: how often the active backend must prove it
/// can generate, and how long the proof may take.
#[derive(Clone, Copy, Debug)]
pub struct GenerationCheck {
    pub interval: Duration,
    pub timeout: Duration,
}

/// The backends in failover order, shared with the streams they serve.
struct Pool {
    entries: Vec<Entry>,
    policy: FailoverPolicy,
    /// Bumped when a circuit opens or closes, for health to publish.
    circuit_changed: tokio::sync::watch::Sender<()>,
}

impl Pool {
    fn succeeded(&self, index: usize) {
        if self.entries[index].succeeded() {
            self.circuit_changed.send_replace(());
        }
    }

    fn failed(&self, index: usize, error: &BackendError) {
        if self.entries[index].failed(error) {
            self.circuit_changed.send_replace(());
        }
    }

    /// Follows a started generation: its completion proves the backend
    /// works, an error mid-stream counts against it.
    fn watch(&self, index: usize, item: &Result<Chunk, BackendError>) {
        match item {
            Ok(Chunk::Done(_)) => self.entries[index].mark_generated(),
            Ok(Chunk::Text(_)) => {}
            Err(error) => self.failed(index, error),
        }
    }

    /// Indices of the backends calls may go to, best first: those up by
    /// their last probe in configured order, then those failing their
    /// probes (a probe can be stale). Open circuits are left out.
    fn preference(&self, now: Instant) -> Vec<usize> {
        let up = (0..self.entries.len()).filter(|index| self.entries[*index].routable(now));
        let failing_probes = (0..self.entries.len()).filter(|index| {
            let entry = &self.entries[*index];
            entry.health() == BackendHealth::NotServing
                && locked(&entry.breaker).state(now) != CircuitState::Open
        });
        up.chain(failing_probes).collect()
    }

    /// The backend calls go to now: the first routable one, else the first
    /// configured.
    fn active(&self) -> &Entry {
        let now = Instant::now();
        self.entries
            .iter()
            .find(|entry| entry.routable(now))
            .unwrap_or(&self.entries[0])
    }
}

pub struct BackendRegistry {
    pool: Arc<Pool>,
    probe_timeout: Duration,
    /// Backends `auto` left out, and why.
    skipped: Vec<(&'static str, String)>,
}

impl BackendRegistry {
    /// A registry over `backends`, in failover order.
    pub fn new(
        backends: Vec<Arc<dyn Backend>>,
        probe_timeout: Duration,
        policy: FailoverPolicy,
    ) -> Self {
        assert!(!backends.is_empty(), "a registry needs a backend");
        let entries = backends
            .into_iter()
            .map(|backend| Entry::new(backend, policy.breaker))
            .collect();
        Self {
            pool: Arc::new(Pool {
                entries,
                policy,
                circuit_changed: tokio::sync::watch::Sender::new(()),
            }),
            probe_timeout,
            skipped: Vec::new(),
        }
    }

    /// The registry, noting the backends `auto` considered and left out,
    /// with the reason.
    pub fn with_skipped(mut self, skipped: Vec<(&'static str, String)>) -> Self {
        self.skipped = skipped;
        self
    }

    /// Backends `auto` considered and left out, with the reason.
    pub fn skipped(&self) -> &[(&'static str, String)] {
        &self.skipped
    }

    /// Changes whenever a backend's circuit opens or closes.
    pub fn circuit_changes(&self) -> tokio::sync::watch::Receiver<()> {
        self.pool.circuit_changed.subscribe()
    }

    /// Probes every backend at once and records the results.
    pub async fn probe_all(&self) -> Vec<BackendSnapshot> {
        join_all(self.pool.entries.iter().map(|entry| async move {
            let outcome = tokio::time::timeout(self.probe_timeout, entry.backend.probe())
                .await
                .unwrap_or_else(|_| {
                    Err(BackendError::Unavailable {
                        backend: entry.backend.name(),
                        endpoint: entry.backend.endpoint(),
                        reason: format!("no answer within {:?}", self.probe_timeout),
                    })
                });
            let mut state = entry
                .state
                .write()
                .unwrap_or_else(|poison| poison.into_inner());
            match outcome {
                Ok(report) => {
                    state.health = BackendHealth::Serving;
                    state.report = report;
                    state.last_error = None;
                }
                Err(error) => {
                    state.health = BackendHealth::NotServing;
                    state.last_error = Some(error.to_string());
                }
            }
        }))
        .await;
        self.snapshots()
    }

    /// Makes the active backend generate one token unless it completed a
    /// generation within `check.interval`; a failure marks it NOT_SERVING
    /// until a later check or probe succeeds, so calls move on to the next
    /// backend. A backend too busy to take the test is alive: busy is not
    /// down.
    pub async fn check_generation(&self, check: GenerationCheck) {
        let entry = self.pool.active();
        if entry.generated_within(check.interval) {
            return;
        }
        let outcome = tokio::time::timeout(check.timeout, test_generation(entry.backend.as_ref()))
            .await
            .unwrap_or_else(|_| {
                Err(BackendError::Unavailable {
                    backend: entry.backend.name(),
                    endpoint: entry.backend.endpoint(),
                    reason: format!("a one-token test generation took over {:?}", check.timeout),
                })
            });
        match outcome {
            Ok(()) => entry.mark_generated(),
            Err(BackendError::Busy { .. } | BackendError::Overloaded { .. }) => {}
            Err(error) => {
                tracing::warn!(%error, "the active backend failed a test generation");
                let mut state = entry
                    .state
                    .write()
                    .unwrap_or_else(|poison| poison.into_inner());
                state.health = BackendHealth::NotServing;
                state.last_error = Some(format!("test generation failed: {error}"));
            }
        }
    }

    pub fn snapshots(&self) -> Vec<BackendSnapshot> {
        let now = Instant::now();
        let active = self.pool.active().backend.name();
        self.pool
            .entries
            .iter()
            .map(|entry| {
                let state = entry
                    .state
                    .read()
                    .unwrap_or_else(|poison| poison.into_inner());
                let breaker = locked(&entry.breaker);
                BackendSnapshot {
                    name: entry.backend.name(),
                    endpoint: entry.backend.endpoint(),
                    active: entry.backend.name() == active,
                    health: state.health,
                    default_model: state.report.default_model.clone(),
                    models: state.report.models.clone(),
                    capabilities: entry.backend.capabilities(),
                    last_error: state.last_error.clone(),
                    circuit: breaker.state(now),
                    consecutive_failures: breaker.consecutive_failures(),
                    failures: entry.failures.load(Ordering::Relaxed),
                    retried: entry.retried.load(Ordering::Relaxed),
                    residency: entry.backend.residency(),
                    instances: entry.backend.instances(),
                    device: entry.backend.device(),
                }
            })
            .collect()
    }
}

/// Models across backends: listing, loading ahead of use, unloading.
impl BackendRegistry {
    /// Names of the backends, in failover order.
    pub fn backend_names(&self) -> Vec<&'static str> {
        self.pool
            .entries
            .iter()
            .map(|entry| entry.backend.name())
            .collect()
    }

    fn entries_named<'a>(&'a self, backend: Option<&'a str>) -> impl Iterator<Item = &'a Entry> {
        self.pool
            .entries
            .iter()
            .filter(move |entry| backend.is_none_or(|name| entry.backend.name() == name))
    }

    /// Every model each backend (or only `backend`) can serve, in failover
    /// order. A backend that cannot be asked now is reported by the names
    /// its last probe listed.
    pub async fn models(&self, backend: Option<&str>) -> Vec<(&'static str, ModelInfo)> {
        let listings = join_all(self.entries_named(backend).map(|entry| async move {
            let models = entry.backend.models().await.unwrap_or_else(|error| {
                tracing::warn!(backend = entry.backend.name(), %error, "listing models failed; using the last probe's names");
                entry.listed().into_iter().map(ModelInfo::named).collect()
            });
            models
                .into_iter()
                .map(|model| (entry.backend.name(), model))
                .collect::<Vec<_>>()
        }))
        .await;
        listings.into_iter().flatten().collect()
    }

    /// Loads `model` on `backend`, or on the first backend in failover
    /// order that serves it and can load it.
    pub async fn load_model(
        &self,
        model: &str,
        backend: Option<&str>,
    ) -> Result<(&'static str, ModelInfo), BackendError> {
        let eligible = self.pool.serving(Some(model))?;
        let mut last_error = None;
        for index in eligible.indices() {
            let entry = &self.pool.entries[index];
            if backend.is_some_and(|name| entry.backend.name() != name) {
                continue;
            }
            match entry.backend.load_model(model).await {
                Ok(()) => {
                    let loaded = entry
                        .backend
                        .models()
                        .await?
                        .into_iter()
                        .find(|info| info.name == model);
                    return Ok((
                        entry.backend.name(),
                        loaded.unwrap_or_else(|| ModelInfo::named(model)),
                    ));
                }
                Err(error)
                    if error.is_about_the_model()
                        || matches!(error, BackendError::Unsupported { .. }) =>
                {
                    last_error = Some(error);
                }
                Err(error) => return Err(error),
            }
        }
        Err(last_error.unwrap_or_else(|| BackendError::UnknownModel {
            model: model.to_owned(),
            closest: Vec::new(),
        }))
    }

    /// Unloads `model` from `backend`, or from every backend holding it;
    /// returns the backends it left.
    pub async fn unload_model(
        &self,
        model: &str,
        backend: Option<&str>,
    ) -> Result<Vec<&'static str>, BackendError> {
        let eligible = self.pool.serving(Some(model))?;
        let named = eligible
            .indices()
            .map(|index| &self.pool.entries[index])
            .filter(|entry| backend.is_none_or(|name| entry.backend.name() == name));
        let holding: Vec<&Entry> = join_all(named.map(|entry| async move {
            (backend.is_some() || entry.may_hold(model).await).then_some(entry)
        }))
        .await
        .into_iter()
        .flatten()
        .collect();
        let mut unloaded = Vec::new();
        for entry in holding {
            match entry.backend.unload_model(model).await {
                Ok(()) => unloaded.push(entry.backend.name()),
                // Asked only because it could not list its models: it
                // holds none itself, so not this one.
                Err(BackendError::Unsupported { .. }) if backend.is_none() => {}
                Err(error) => return Err(error),
            }
        }
        if unloaded.is_empty() {
            let backend = eligible
                .indices()
                .next()
                .map_or("none", |index| self.pool.entries[index].backend.name());
            return Err(BackendError::Residency {
                backend,
                error: ResidencyError::NotLoaded {
                    model: model.to_owned(),
                },
            });
        }
        Ok(unloaded)
    }
}

/// The registry is itself a backend: the one calls go to now, with
/// failover behind it. Everything above it stays backend-agnostic.
#[async_trait]
impl Backend for BackendRegistry {
    fn name(&self) -> &'static str {
        self.pool.active().backend.name()
    }

    fn endpoint(&self) -> String {
        self.pool.active().backend.endpoint()
    }

    fn capabilities(&self) -> Capabilities {
        self.pool.active().backend.capabilities()
    }

    async fn probe(&self) -> Result<ProbeReport, BackendError> {
        self.pool.active().backend.probe().await
    }

    async fn generate(&self, request: GenerationRequest) -> Result<ChunkStream, BackendError> {
        self.pool.clone().route(request).await
    }
}

/// One greedy token from the backend's default model, read to its end.
async fn test_generation(backend: &dyn Backend) -> Result<(), BackendError> {
    let mut stream = backend
        .generate(GenerationRequest {
            model: None,
            messages: vec![Message::new(Role::User, "Say OK.")],
            sampling: Sampling {
                max_tokens: 1,
                temperature: Some(0.0),
                ..Sampling::default()
            },
            stop: Vec::new(),
            json_schema: None,
            session: None,
        })
        .await?;
    while let Some(chunk) = stream.next().await {
        if let Chunk::Done(_) = chunk? {
            return Ok(());
        }
    }
    Err(BackendError::Protocol {
        backend: backend.name(),
        reason: "the test generation ended without completing".to_owned(),
    })
}
