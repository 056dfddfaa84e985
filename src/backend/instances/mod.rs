//! Several instances of one runtime kind behind one backend: found by
//! `discovery`, each probed and behind its own circuit breaker, with its
//! calls in flight counted and the prompts it was sent indexed by prefix
//! (`prefix`); `routing` picks the instance a call goes to. A call that an
//! instance cannot take before its first token moves on to the next
//! instance of the kind; only when none can does the registry move on to
//! the next backend kind.
//!
//! Instances that disappear from discovery take no new calls and finish
//! the ones they have (draining); new ones are probed before their first
//! call.

pub mod discovery;
pub mod prefix;
pub mod routing;

use std::{
    fmt::Write as _,
    sync::{
        Arc, Mutex, MutexGuard, RwLock, Weak,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use async_trait::async_trait;
use futures_util::{StreamExt, future::join_all, stream};

use super::{
    Backend, BackendError, Capabilities, ChunkStream, GenerationRequest, Message, ModelInfo,
    ProbeReport,
    breaker::{Breaker, BreakerPolicy, CircuitState},
};
use discovery::Discover;
use prefix::{PrefixIndex, PrefixSettings, PromptBlocks};
use routing::{Call, Candidate, Reason, Routing};

/// Builds the backend of one instance from its endpoint.
pub type InstanceFactory = Box<dyn Fn(&str) -> Arc<dyn Backend> + Send + Sync>;

/// How a pool finds, watches and routes over its instances.
#[derive(Clone, Copy, Debug)]
pub struct PoolSettings {
    pub routing: Routing,
    pub prefix: PrefixSettings,
    pub breaker: BreakerPolicy,
    /// How often discovery runs again.
    pub discovery_interval: Duration,
    /// How long an instance's probe may take.
    pub probe_timeout: Duration,
}

/// An instance as status reports show it.
#[derive(Clone, Debug, PartialEq)]
pub struct InstanceStatus {
    pub endpoint: String,
    /// Its last probe succeeded.
    pub serving: bool,
    /// It left discovery and finishes the calls it has.
    pub draining: bool,
    pub circuit: CircuitState,
    pub in_flight: usize,
    /// Calls routed here since it was found.
    pub calls: u64,
    /// Calls routed here for their prompt prefix.
    pub prefix_routed: u64,
    pub models: Vec<String>,
    pub last_error: Option<String>,
    /// Prompt blocks remembered for prefix routing.
    pub prefix_blocks: usize,
}

struct Probed {
    serving: bool,
    report: ProbeReport,
    last_error: Option<String>,
}

struct Instance {
    endpoint: String,
    backend: Arc<dyn Backend>,
    probed: RwLock<Probed>,
    breaker: Mutex<Breaker>,
    in_flight: AtomicUsize,
    calls: AtomicU64,
    prefix_routed: AtomicU64,
    prefix: Mutex<PrefixIndex>,
}

fn locked<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poison| poison.into_inner())
}

impl Instance {
    fn new(endpoint: String, backend: Arc<dyn Backend>, settings: &PoolSettings) -> Self {
        Self {
            endpoint,
            backend,
            probed: RwLock::new(Probed {
                serving: false,
                report: ProbeReport::default(),
                last_error: Some("not probed yet".to_owned()),
            }),
            breaker: Mutex::new(Breaker::new(settings.breaker)),
            in_flight: AtomicUsize::new(0),
            calls: AtomicU64::new(0),
            prefix_routed: AtomicU64::new(0),
            prefix: Mutex::new(PrefixIndex::new(settings.prefix)),
        }
    }

    fn probed(&self) -> std::sync::RwLockReadGuard<'_, Probed> {
        self.probed
            .read()
            .unwrap_or_else(|poison| poison.into_inner())
    }

    async fn probe(&self, timeout: Duration) -> Result<ProbeReport, BackendError> {
        let outcome = tokio::time::timeout(timeout, self.backend.probe())
            .await
            .unwrap_or_else(|_| {
                Err(BackendError::Unavailable {
                    backend: self.backend.name(),
                    endpoint: self.endpoint.clone(),
                    reason: format!("no answer within {timeout:?}"),
                })
            });
        let mut probed = self
            .probed
            .write()
            .unwrap_or_else(|poison| poison.into_inner());
        match &outcome {
            Ok(report) => {
                if !probed.serving {
                    tracing::info!(backend = self.backend.name(), instance = %self.endpoint, "instance serving");
                }
                *probed = Probed {
                    serving: true,
                    report: report.clone(),
                    last_error: None,
                };
            }
            Err(error) => {
                if probed.serving {
                    tracing::warn!(backend = self.backend.name(), instance = %self.endpoint, %error, "instance ejected");
                }
                probed.serving = false;
                probed.last_error = Some(error.to_string());
            }
        }
        outcome
    }

    /// Whether it may serve `model` (any model when `None`): its probe
    /// listed it, or listed nothing.
    fn serves(&self, model: Option<&str>) -> bool {
        let probed = self.probed();
        model.is_none_or(|model| {
            probed.report.models.is_empty() || self.backend.serves(&probed.report.models, model)
        })
    }

    /// Calls may go here: its last probe succeeded and its circuit is not
    /// open.
    fn routable(&self, now: Instant) -> bool {
        self.probed().serving && !self.open(now)
    }

    /// Its circuit refuses calls.
    fn open(&self, now: Instant) -> bool {
        locked(&self.breaker).state(now) == CircuitState::Open
    }

    fn failed(&self, error: &BackendError) {
        if error.is_outage() {
            let now = Instant::now();
            let mut breaker = locked(&self.breaker);
            breaker.failed(now);
            if breaker.state(now) == CircuitState::Open {
                tracing::warn!(backend = self.backend.name(), instance = %self.endpoint, %error, "instance circuit open");
            }
        }
    }

    fn status(&self, draining: bool) -> InstanceStatus {
        let probed = self.probed();
        InstanceStatus {
            endpoint: self.endpoint.clone(),
            serving: probed.serving,
            draining,
            circuit: locked(&self.breaker).state(Instant::now()),
            in_flight: self.in_flight.load(Ordering::Relaxed),
            calls: self.calls.load(Ordering::Relaxed),
            prefix_routed: self.prefix_routed.load(Ordering::Relaxed),
            models: probed.report.models.clone(),
            last_error: probed.last_error.clone(),
            prefix_blocks: locked(&self.prefix).len(),
        }
    }
}

/// Counts a call in flight on an instance until dropped with its stream.
struct InFlight(Arc<Instance>);

impl InFlight {
    fn enter(instance: &Arc<Instance>) -> Self {
        instance.in_flight.fetch_add(1, Ordering::Relaxed);
        Self(instance.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

struct Members {
    /// In discovery order.
    current: Vec<Arc<Instance>>,
    /// Gone from discovery with calls still in flight.
    draining: Vec<Arc<Instance>>,
    /// Why the last discovery failed, while it fails.
    discovery_error: Option<String>,
}

struct Shared {
    name: &'static str,
    settings: PoolSettings,
    discover: Box<dyn Discover>,
    build: InstanceFactory,
    members: RwLock<Members>,
    /// Serialises the first discovery; holds whether the periodic one runs.
    discovering: tokio::sync::Mutex<bool>,
    /// The first discovery is done (the fast path past `discovering`).
    started: std::sync::atomic::AtomicBool,
    turn: AtomicUsize,
}

/// A backend kind's instances, routed by policy.
pub struct InstancePool {
    shared: Arc<Shared>,
    capabilities: Capabilities,
    /// The configured targets, for status reports.
    targets: String,
}

impl InstancePool {
    /// A pool of `name` instances found by `discover`, each built by
    /// `build`. `capabilities` are the kind's (every instance is one).
    pub fn new(
        name: &'static str,
        targets: String,
        capabilities: Capabilities,
        discover: Box<dyn Discover>,
        build: InstanceFactory,
        settings: PoolSettings,
    ) -> Self {
        Self {
            shared: Arc::new(Shared {
                name,
                settings,
                discover,
                build,
                members: RwLock::new(Members {
                    current: Vec::new(),
                    draining: Vec::new(),
                    discovery_error: None,
                }),
                discovering: tokio::sync::Mutex::new(false),
                started: std::sync::atomic::AtomicBool::new(false),
                turn: AtomicUsize::new(0),
            }),
            capabilities,
            targets,
        }
    }

    fn members(&self) -> std::sync::RwLockReadGuard<'_, Members> {
        self.shared
            .members
            .read()
            .unwrap_or_else(|poison| poison.into_inner())
    }

    /// Runs the first discovery, and starts the periodic one, unless done.
    async fn discovered(&self) {
        if self.shared.started.load(Ordering::Acquire) {
            return;
        }
        let mut running = self.shared.discovering.lock().await;
        if *running {
            return;
        }
        discover(&self.shared).await;
        *running = true;
        self.shared.started.store(true, Ordering::Release);
        let shared = Arc::downgrade(&self.shared);
        tokio::spawn(rediscover(shared, self.shared.settings.discovery_interval));
    }

    fn current(&self) -> Vec<Arc<Instance>> {
        self.members().current.clone()
    }

    /// Instances, current ones then draining, as status reports show them.
    pub fn instances(&self) -> Vec<InstanceStatus> {
        let members = self.members();
        members
            .current
            .iter()
            .map(|instance| instance.status(false))
            .chain(
                members
                    .draining
                    .iter()
                    .map(|instance| instance.status(true)),
            )
            .collect()
    }

    /// Why no instance can take a call naming `model`.
    fn none_can_take(&self, model: Option<&str>, instances: &[Arc<Instance>]) -> BackendError {
        if let Some(model) = model
            && !instances.is_empty()
            && !instances
                .iter()
                .any(|instance| instance.serves(Some(model)))
        {
            return BackendError::ModelNotFound {
                backend: self.shared.name,
                model: model.to_owned(),
            };
        }
        let reason = if instances.is_empty() {
            let members = self.members();
            match &members.discovery_error {
                Some(error) => format!("no instances found: {error}"),
                None => "no instances found".to_owned(),
            }
        } else {
            let states: Vec<String> = instances
                .iter()
                .map(|instance| {
                    let why = instance
                        .probed()
                        .last_error
                        .clone()
                        .unwrap_or_else(|| "circuit open".to_owned());
                    format!("{}: {why}", instance.endpoint)
                })
                .collect();
            format!("no instance can take calls ({})", states.join("; "))
        };
        BackendError::Unavailable {
            backend: self.shared.name,
            endpoint: self.targets.clone(),
            reason,
        }
    }

    /// The call's candidates in routing order, with the reason for the
    /// first.
    fn route(
        &self,
        request: &GenerationRequest,
        blocks: &PromptBlocks,
        instances: &[Arc<Instance>],
    ) -> Option<(Vec<usize>, Reason)> {
        let now = Instant::now();
        let model = request.model.as_deref();
        let eligible = |up_only: bool| -> Vec<usize> {
            (0..instances.len())
                .filter(|index| {
                    let instance = &instances[*index];
                    instance.serves(model)
                        && if up_only {
                            instance.routable(now)
                        } else {
                            !instance.open(now)
                        }
                })
                .collect()
        };
        // None up by its last probe: those failing probes may have
        // recovered since (a probe can be stale), as the registry does.
        let up = eligible(true);
        let chosen = if up.is_empty() { eligible(false) } else { up };
        let candidates: Vec<Candidate> = chosen
            .into_iter()
            .map(|index| (index, &instances[index]))
            .map(|(index, instance)| Candidate {
                index,
                key: instance.endpoint.clone(),
                in_flight: instance.in_flight.load(Ordering::Relaxed),
                matched: locked(&instance.prefix).matched(blocks, now),
            })
            .collect();
        routing::order(
            self.shared.settings.routing,
            &candidates,
            Call {
                blocks: blocks.len(),
                session: request.session.as_deref(),
                turn: self.shared.turn.fetch_add(1, Ordering::Relaxed),
                draws: (crate::random::fraction(), crate::random::fraction()),
            },
        )
    }
}

/// Replaces the members with what discovery finds: new instances are
/// probed before they join, vanished ones drain, and a failed discovery
/// keeps the members it had.
async fn discover(shared: &Shared) {
    let found = match shared.discover.endpoints().await {
        Ok(found) => found,
        Err(error) => {
            tracing::warn!(backend = shared.name, %error, "discovery failed; keeping the instances found before");
            shared
                .members
                .write()
                .unwrap_or_else(|poison| poison.into_inner())
                .discovery_error = Some(error);
            return;
        }
    };
    let known = shared
        .members
        .read()
        .unwrap_or_else(|poison| poison.into_inner())
        .current
        .clone();
    let new: Vec<Arc<Instance>> = found
        .iter()
        .filter(|endpoint| !known.iter().any(|instance| &instance.endpoint == *endpoint))
        .map(|endpoint| {
            Arc::new(Instance::new(
                endpoint.clone(),
                (shared.build)(endpoint),
                &shared.settings,
            ))
        })
        .collect();
    join_all(
        new.iter()
            .map(|instance| instance.probe(shared.settings.probe_timeout)),
    )
    .await;
    let mut members = shared
        .members
        .write()
        .unwrap_or_else(|poison| poison.into_inner());
    members.discovery_error = None;
    let (kept, gone): (Vec<_>, Vec<_>) = members
        .current
        .drain(..)
        .partition(|instance| found.contains(&instance.endpoint));
    for instance in &gone {
        tracing::info!(backend = shared.name, instance = %instance.endpoint, "instance gone; draining");
    }
    for instance in &new {
        tracing::info!(backend = shared.name, instance = %instance.endpoint, "instance found");
    }
    members.draining.extend(gone);
    members
        .draining
        .retain(|instance| instance.in_flight.load(Ordering::Relaxed) > 0);
    members.current = found
        .iter()
        .filter_map(|endpoint| {
            kept.iter()
                .chain(&new)
                .find(|instance| &instance.endpoint == endpoint)
                .cloned()
        })
        .collect();
}

/// Discovery every `interval` while the pool lives.
async fn rediscover(shared: Weak<Shared>, interval: Duration) {
    loop {
        tokio::time::sleep(interval).await;
        let Some(shared) = shared.upgrade() else {
            return;
        };
        discover(&shared).await;
    }
}

/// The text prefix routing compares: the messages in order, each with its
/// role, as the runtime's chat template would see them.
fn prompt_text(messages: &[Message]) -> String {
    let mut text = String::new();
    for message in messages {
        let _ = writeln!(text, "<{}>{}", message.role.as_str(), message.content);
    }
    text
}

/// Starts `request` on `instance`, waiting for its first chunk so an
/// instance that fails before any text can be left for another. The
/// stream counts as in flight there until dropped; how it ends counts for
/// the instance's circuit.
async fn start(
    instance: &Arc<Instance>,
    request: GenerationRequest,
) -> Result<ChunkStream, BackendError> {
    let in_flight = InFlight::enter(instance);
    let mut stream = instance.backend.generate(request).await?;
    let first = match stream.next().await {
        Some(Err(error)) => return Err(error),
        first => first,
    };
    locked(&instance.breaker).succeeded();
    // The closure owns the guard: the call counts as in flight until the
    // stream is dropped.
    Ok(stream::iter(first)
        .chain(stream)
        .inspect(move |item| {
            if let Err(error) = item {
                in_flight.0.failed(error);
            }
        })
        .boxed())
}

#[async_trait]
impl Backend for InstancePool {
    fn name(&self) -> &'static str {
        self.shared.name
    }

    fn endpoint(&self) -> String {
        self.targets.clone()
    }

    fn capabilities(&self) -> Capabilities {
        self.capabilities
    }

    /// Probes every instance; serving while any serves. The models are
    /// those any serving instance lists.
    async fn probe(&self) -> Result<ProbeReport, BackendError> {
        self.discovered().await;
        let instances = self.current();
        let outcomes = join_all(
            instances
                .iter()
                .map(|instance| instance.probe(self.shared.settings.probe_timeout)),
        )
        .await;
        let mut report = ProbeReport::default();
        let mut serving = false;
        let mut first_error = None;
        for outcome in outcomes {
            match outcome {
                Ok(probed) => {
                    serving = true;
                    report.default_model = report.default_model.or(probed.default_model);
                    for model in probed.models {
                        if !report.models.contains(&model) {
                            report.models.push(model);
                        }
                    }
                }
                Err(error) => {
                    first_error.get_or_insert(error);
                }
            }
        }
        match (serving, first_error) {
            (true, _) => Ok(report),
            // One instance: its own error, as a single runtime reports it.
            (false, Some(error)) if instances.len() == 1 => Err(error),
            (false, _) => Err(self.none_can_take(None, &instances)),
        }
    }

    /// As the kind's instances read names (asked on every call, so no
    /// copy of the members).
    fn serves(&self, listed: &[String], model: &str) -> bool {
        self.members()
            .current
            .first()
            .map_or(listed.iter().any(|name| name == model), |instance| {
                instance.backend.serves(listed, model)
            })
    }

    async fn generate(&self, request: GenerationRequest) -> Result<ChunkStream, BackendError> {
        self.discovered().await;
        let instances = self.current();
        let blocks = match self.shared.settings.routing {
            Routing::Prefix(_) => PromptBlocks::of(
                &prompt_text(&request.messages),
                self.shared.settings.prefix.block_bytes,
            ),
            _ => PromptBlocks::default(),
        };
        let Some((order, reason)) = self.route(&request, &blocks, &instances) else {
            return Err(self.none_can_take(request.model.as_deref(), &instances));
        };
        let mut last_error = None;
        for (attempt, index) in order.into_iter().enumerate() {
            let instance = &instances[index];
            if !locked(&instance.breaker).admit(Instant::now()) {
                continue;
            }
            match start(instance, request.clone()).await {
                Ok(stream) => {
                    instance.calls.fetch_add(1, Ordering::Relaxed);
                    if attempt == 0 && reason == Reason::PrefixMatch {
                        instance.prefix_routed.fetch_add(1, Ordering::Relaxed);
                    }
                    locked(&instance.prefix).record(&blocks, Instant::now());
                    tracing::debug!(instance = %instance.endpoint, reason = reason.as_str(), attempt, "routed");
                    return Ok(stream);
                }
                Err(error) => {
                    instance.failed(&error);
                    let moves_on = error.is_transient()
                        || (request.model.is_some() && error.is_about_the_model());
                    if !moves_on {
                        return Err(error);
                    }
                    tracing::warn!(instance = %instance.endpoint, %error, "instance failed before its first token; trying another");
                    last_error = Some(error);
                }
            }
        }
        Err(last_error.unwrap_or_else(|| self.none_can_take(request.model.as_deref(), &instances)))
    }

    /// The models of every serving instance, each named once.
    async fn models(&self) -> Result<Vec<ModelInfo>, BackendError> {
        self.discovered().await;
        let now = Instant::now();
        let serving: Vec<Arc<Instance>> = self
            .current()
            .into_iter()
            .filter(|instance| instance.routable(now))
            .collect();
        let listings = join_all(serving.iter().map(|instance| instance.backend.models())).await;
        let mut models: Vec<ModelInfo> = Vec::new();
        let mut last_error = None;
        for listing in listings {
            match listing {
                Ok(listed) => {
                    for model in listed {
                        if !models.iter().any(|known| known.name == model.name) {
                            models.push(model);
                        }
                    }
                }
                Err(error) => last_error = Some(error),
            }
        }
        match last_error {
            Some(error) if models.is_empty() => Err(error),
            _ => Ok(models),
        }
    }

    /// Loads the model on every serving instance that serves it: the calls
    /// of a pipeline stage spread over them all.
    async fn load_model(&self, model: &str) -> Result<(), BackendError> {
        self.on_serving(model, |backend, model| async move {
            backend.load_model(&model).await
        })
        .await
    }

    async fn unload_model(&self, model: &str) -> Result<(), BackendError> {
        self.on_serving(model, |backend, model| async move {
            backend.unload_model(&model).await
        })
        .await
    }

    fn instances(&self) -> Vec<InstanceStatus> {
        InstancePool::instances(self)
    }
}

impl InstancePool {
    /// Runs `operation` for `model` on every serving instance that serves
    /// it; the first error wins, after all have run.
    async fn on_serving<F, Fut>(&self, model: &str, operation: F) -> Result<(), BackendError>
    where
        F: Fn(Arc<dyn Backend>, String) -> Fut,
        Fut: std::future::Future<Output = Result<(), BackendError>>,
    {
        self.discovered().await;
        let now = Instant::now();
        let instances: Vec<Arc<Instance>> = self
            .current()
            .into_iter()
            .filter(|instance| instance.routable(now) && instance.serves(Some(model)))
            .collect();
        if instances.is_empty() {
            return Err(self.none_can_take(Some(model), &self.current()));
        }
        let outcomes = join_all(
            instances
                .iter()
                .map(|instance| operation(instance.backend.clone(), model.to_owned())),
        )
        .await;
        outcomes.into_iter().collect()
    }
}
