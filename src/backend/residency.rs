//! Which models a backend holds in memory: loaded on first use, one load
//! shared by every call that waits for it, least-recently-used idle models
//! evicted to make room under a memory budget and a count, pinned models
//! never evicted, idle models unloaded after a keep-alive.
//!
//! Generic over what a loaded model is, so the embedded engine and the MLX
//! workers share one policy. A model counts as in use while a [`Lease`] on
//! it lives; a backend keeps the lease inside the stream it returns, so a
//! model is never evicted under a generation.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, MutexGuard, Weak},
    time::{Duration, SystemTime},
};

use futures_util::{
    FutureExt,
    future::{BoxFuture, Shared},
};
// Tokio's clock, so tests can move time forward.
use tokio::{sync::Notify, time::Instant};

/// How often idle models are checked against the keep-alive: short against
/// any keep-alive an operator sets in seconds, long against the cost of a
/// lock and a scan of a handful of models.
const SWEEP_PERIOD: Duration = Duration::from_millis(250);

/// How long an idle model stays loaded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeepAlive {
    /// Until evicted for room or unloaded by request (Ollama's `-1`).
    Forever,
    /// Unloaded once idle this long; zero unloads after every call.
    Idle(Duration),
}

#[derive(Clone, Debug, PartialEq)]
pub struct ResidencyPolicy {
    /// Bytes every resident and loading model may take together.
    pub memory_budget: u64,
    /// Most models resident (or loading) at once.
    pub max_loaded: usize,
    pub keep_alive: KeepAlive,
    /// Models never evicted nor unloaded for idleness.
    pub pinned: Vec<String>,
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum ResidencyError {
    #[error(
        "model {model} needs about {} MiB, more than the whole model memory budget of {} MiB",
        mib(*needed),
        mib(*budget)
    )]
    TooLarge {
        model: String,
        needed: u64,
        budget: u64,
    },
    #[error("no room to load model {model} (about {} MiB): {why}", mib(*needed))]
    NoRoom {
        model: String,
        needed: u64,
        why: String,
    },
    #[error("model {model} failed to load: {reason}")]
    LoadFailed { model: String, reason: String },
    #[error("model {model} is serving {calls} call(s); unload it when they end")]
    InUse { model: String, calls: usize },
    #[error("model {model} is not loaded")]
    NotLoaded { model: String },
}

/// This machine's physical memory (on Apple Silicon the unified memory),
/// when it can be read.
pub fn physical_memory() -> Option<u64> {
    if cfg!(target_os = "macos") {
        let output = std::process::Command::new("sysctl")
            .args(["-n", "hw.memsize"])
            .output()
            .ok()?;
        return String::from_utf8_lossy(&output.stdout).trim().parse().ok();
    }
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = meminfo.lines().find(|line| line.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

fn mib(bytes: u64) -> u64 {
    bytes.div_ceil(1 << 20)
}

impl ResidencyPolicy {
    /// One model, never unloaded: for a backend built around one model.
    pub fn single() -> Self {
        Self {
            memory_budget: u64::MAX,
            max_loaded: 1,
            keep_alive: KeepAlive::Forever,
            pinned: Vec::new(),
        }
    }
}

/// A resident or loading model, for status reports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Residence {
    pub model: String,
    pub loading: bool,
    pub memory_bytes: u64,
    pub in_use: usize,
    pub pinned: bool,
    /// When a call last finished on it (or it finished loading).
    pub last_used: Option<SystemTime>,
    pub load_time: Option<Duration>,
}

/// What happened, for metrics.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ResidencyCounters {
    pub loads: u64,
    pub load_failures: u64,
    pub evictions: u64,
    pub idle_unloads: u64,
}

type LoadOutcome = Result<(), ResidencyError>;

/// Why no room could be made now.
enum Refusal {
    /// Models in use or loading hold the room; it frees when they end.
    Wait,
    Fail(ResidencyError),
}

enum Slot<M> {
    Loading {
        estimate: u64,
        done: Shared<BoxFuture<'static, LoadOutcome>>,
    },
    Resident(Resident<M>),
}

struct Resident<M> {
    model: Arc<M>,
    estimate: u64,
    in_use: usize,
    /// Loaded and not taken yet by a call: not evictable, so the calls
    /// that waited for the load get it before a call waiting for room can
    /// evict it.
    fresh: bool,
    last_used: Instant,
    last_used_wall: SystemTime,
    load_time: Duration,
}

struct State<M> {
    slots: HashMap<String, Slot<M>>,
    counters: ResidencyCounters,
}

struct Inner<M> {
    policy: ResidencyPolicy,
    state: Mutex<State<M>>,
    /// Signalled whenever room may have been freed: a call ended, a load
    /// ended, a model was unloaded.
    changed: Notify,
}

/// The models one backend holds. Cheap to clone.
pub struct Residency<M> {
    inner: Arc<Inner<M>>,
}

impl<M> Clone for Residency<M> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
        }
    }
}

/// A model held for one call; the model stays resident while this lives.
pub struct Lease<M: Send + Sync + 'static> {
    model: Arc<M>,
    name: String,
    owner: Weak<Inner<M>>,
    /// Taken to load the model ahead of its calls: a keep-alive of zero
    /// does not unload it when this ends.
    warming: bool,
}

impl<M: Send + Sync + 'static> Lease<M> {
    pub fn model(&self) -> &Arc<M> {
        &self.model
    }

    /// Ends a lease taken only to load the model (LoadModel, preloading):
    /// the model stays loaded even under a keep-alive of zero.
    pub fn keep_loaded(mut self) {
        self.warming = true;
    }
}

impl<M: Send + Sync + 'static> Drop for Lease<M> {
    fn drop(&mut self) {
        if let Some(inner) = self.owner.upgrade() {
            inner.release(&self.name, self.warming);
        }
    }
}

impl<M: Send + Sync + 'static> Residency<M> {
    /// Starts the keep-alive sweep when idle models expire; it ends with
    /// the last clone of the residency.
    pub fn new(policy: ResidencyPolicy) -> Self {
        let inner = Arc::new(Inner {
            policy,
            state: Mutex::new(State {
                slots: HashMap::new(),
                counters: ResidencyCounters::default(),
            }),
            changed: Notify::new(),
        });
        if let KeepAlive::Idle(idle) = inner.policy.keep_alive
            && !idle.is_zero()
        {
            tokio::spawn(sweep(Arc::downgrade(&inner)));
        }
        Self { inner }
    }

    pub fn policy(&self) -> &ResidencyPolicy {
        &self.inner.policy
    }

    /// The model named `name`, loaded with `load` (estimated at `estimate`
    /// bytes) unless resident or already loading; held until the lease is
    /// dropped. When the models in use leave no room, waits until they do
    /// (the call's deadline bounds the wait); when they never can (pinned
    /// models hold the room), fails at once.
    pub async fn acquire<F>(
        &self,
        name: &str,
        estimate: u64,
        load: F,
    ) -> Result<Lease<M>, ResidencyError>
    where
        F: Fn() -> BoxFuture<'static, Result<M, String>>,
    {
        loop {
            let room_freed = self.inner.changed.notified();
            tokio::pin!(room_freed);
            let load_done = {
                let mut state = self.inner.lock();
                match state.slots.get_mut(name) {
                    Some(Slot::Resident(resident)) => {
                        resident.in_use += 1;
                        resident.fresh = false;
                        return Ok(self.lease(name, resident.model.clone()));
                    }
                    Some(Slot::Loading { done, .. }) => Some(done.clone()),
                    None => match self.inner.make_room(&mut state, name, estimate) {
                        Ok(evicted) => {
                            let unloaded = unload_off_thread(evicted);
                            let done =
                                self.start_load(&mut state, name, estimate, unloaded, load());
                            Some(done)
                        }
                        Err(Refusal::Wait) => {
                            // Registered before the lock is let go: a
                            // release in between is not missed.
                            room_freed.as_mut().enable();
                            None
                        }
                        Err(Refusal::Fail(error)) => return Err(error),
                    },
                }
            };
            match load_done {
                Some(done) => done.await?,
                None => room_freed.await,
            }
        }
    }

    /// Unloads `name` now; refused while calls use it.
    pub fn unload(&self, name: &str) -> Result<(), ResidencyError> {
        let mut state = self.inner.lock();
        match state.slots.get(name) {
            None | Some(Slot::Loading { .. }) => Err(ResidencyError::NotLoaded {
                model: name.to_owned(),
            }),
            Some(Slot::Resident(resident)) if resident.in_use > 0 => Err(ResidencyError::InUse {
                model: name.to_owned(),
                calls: resident.in_use,
            }),
            Some(Slot::Resident(_)) => {
                let unloaded = state.slots.remove(name);
                drop(state);
                self.inner.changed.notify_waiters();
                tracing::info!(model = name, "model unloaded on request");
                unload_off_thread(unloaded.into_iter().collect());
                Ok(())
            }
        }
    }

    /// Forgets a resident model whose engine broke, whatever its calls: the
    /// next call loads it again. Calls holding it keep it until they end.
    pub fn discard(&self, name: &str) {
        let mut state = self.inner.lock();
        if let Some(Slot::Resident(_)) = state.slots.get(name) {
            let discarded = state.slots.remove(name);
            drop(state);
            self.inner.changed.notify_waiters();
            tracing::warn!(model = name, "model discarded: its engine stopped");
            unload_off_thread(discarded.into_iter().collect());
        }
    }

    /// Resident and loading models, by name.
    pub fn residents(&self) -> Vec<Residence> {
        let state = self.inner.lock();
        let mut residents: Vec<Residence> = state
            .slots
            .iter()
            .map(|(name, slot)| {
                let pinned = self.inner.pinned(name);
                match slot {
                    Slot::Loading { estimate, .. } => Residence {
                        model: name.clone(),
                        loading: true,
                        memory_bytes: *estimate,
                        in_use: 0,
                        pinned,
                        last_used: None,
                        load_time: None,
                    },
                    Slot::Resident(resident) => Residence {
                        model: name.clone(),
                        loading: false,
                        memory_bytes: resident.estimate,
                        in_use: resident.in_use,
                        pinned,
                        last_used: Some(resident.last_used_wall),
                        load_time: Some(resident.load_time),
                    },
                }
            })
            .collect();
        residents.sort_by(|a, b| a.model.cmp(&b.model));
        residents
    }

    /// The resident models themselves.
    pub fn models(&self) -> Vec<(String, Arc<M>)> {
        self.inner
            .lock()
            .slots
            .iter()
            .filter_map(|(name, slot)| match slot {
                Slot::Resident(resident) => Some((name.clone(), resident.model.clone())),
                Slot::Loading { .. } => None,
            })
            .collect()
    }

    pub fn counters(&self) -> ResidencyCounters {
        self.inner.lock().counters.clone()
    }

    fn lease(&self, name: &str, model: Arc<M>) -> Lease<M> {
        Lease {
            model,
            name: name.to_owned(),
            owner: Arc::downgrade(&self.inner),
            warming: false,
        }
    }

    /// Records `name` as loading and runs `load` on its own task, so the
    /// load finishes for the other waiters even when the call that started
    /// it is cancelled.
    /// The load starts once the models evicted for it (`unloaded`) are
    /// gone, so memory never holds both.
    fn start_load(
        &self,
        state: &mut State<M>,
        name: &str,
        estimate: u64,
        unloaded: Option<tokio::task::JoinHandle<()>>,
        load: BoxFuture<'static, Result<M, String>>,
    ) -> Shared<BoxFuture<'static, LoadOutcome>> {
        let inner = Arc::downgrade(&self.inner);
        let model = name.to_owned();
        let task = tokio::spawn(async move {
            if let Some(unloaded) = unloaded {
                let _ = unloaded.await;
            }
            let started = Instant::now();
            let outcome = load.await;
            match inner.upgrade() {
                Some(inner) => inner.loaded(&model, estimate, started.elapsed(), outcome),
                None => Ok(()),
            }
        });
        let (model, owner) = (name.to_owned(), Arc::downgrade(&self.inner));
        let done = async move {
            task.await.unwrap_or_else(|error| {
                let failed = Err(format!("the load task failed: {error}"));
                // Frees the slot, which the task could not.
                match owner.upgrade() {
                    Some(inner) => inner.loaded(&model, estimate, Duration::ZERO, failed),
                    None => Err(ResidencyError::LoadFailed {
                        model,
                        reason: "the residency is gone".to_owned(),
                    }),
                }
            })
        }
        .boxed()
        .shared();
        state.slots.insert(
            name.to_owned(),
            Slot::Loading {
                estimate,
                done: done.clone(),
            },
        );
        done
    }
}

impl<M: Send + Sync + 'static> Inner<M> {
    fn lock(&self) -> MutexGuard<'_, State<M>> {
        self.state
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
    }

    fn pinned(&self, name: &str) -> bool {
        self.policy.pinned.iter().any(|pinned| pinned == name)
    }

    /// Evicts least-recently-used idle models until `estimate` more bytes
    /// and one more model fit; returns the evicted models, to be dropped
    /// outside the lock.
    fn make_room(
        &self,
        state: &mut State<M>,
        name: &str,
        estimate: u64,
    ) -> Result<Vec<Slot<M>>, Refusal> {
        let budget = self.policy.memory_budget;
        if estimate > budget {
            return Err(Refusal::Fail(ResidencyError::TooLarge {
                model: name.to_owned(),
                needed: estimate,
                budget,
            }));
        }
        if let Some(why) = self.pins_leave_no_room(state, estimate) {
            return Err(Refusal::Fail(ResidencyError::NoRoom {
                model: name.to_owned(),
                needed: estimate,
                why,
            }));
        }
        let mut used: u64 = state.slots.values().map(Slot::estimate).sum();
        let mut count = state.slots.len();
        let mut victims = Vec::new();
        for (victim, bytes) in self.eviction_order(state) {
            if used + estimate <= budget && count < self.policy.max_loaded {
                break;
            }
            used -= bytes;
            count -= 1;
            victims.push(victim);
        }
        if used + estimate > budget || count >= self.policy.max_loaded {
            // Evicting every idle model would not make room: evict none,
            // and wait for calls to end.
            return Err(Refusal::Wait);
        }
        let mut evicted = Vec::new();
        for victim in victims {
            tracing::info!(model = %victim, for_model = name, "evicting the least recently used idle model");
            state.counters.evictions += 1;
            evicted.extend(state.slots.remove(&victim));
        }
        Ok(evicted)
    }

    /// Why `estimate` more bytes can never fit beside the pinned models
    /// resident now, if they cannot.
    fn pins_leave_no_room(&self, state: &State<M>, estimate: u64) -> Option<String> {
        let pinned: Vec<u64> = state
            .slots
            .iter()
            .filter(|(name, _)| self.pinned(name))
            .map(|(_, slot)| slot.estimate())
            .collect();
        let held: u64 = pinned.iter().sum();
        if held + estimate > self.policy.memory_budget {
            Some(format!(
                "pinned models hold {} MiB of the {} MiB budget",
                mib(held),
                mib(self.policy.memory_budget)
            ))
        } else if pinned.len() >= self.policy.max_loaded {
            Some(format!(
                "pinned models take all {} model slots",
                self.policy.max_loaded
            ))
        } else {
            None
        }
    }

    /// The idle, unpinned resident models with their estimates, used
    /// longest ago first.
    fn eviction_order(&self, state: &State<M>) -> Vec<(String, u64)> {
        let mut idle: Vec<(Instant, &String, u64)> = state
            .slots
            .iter()
            .filter_map(|(name, slot)| match slot {
                Slot::Resident(resident)
                    if resident.in_use == 0 && !resident.fresh && !self.pinned(name) =>
                {
                    Some((resident.last_used, name, resident.estimate))
                }
                _ => None,
            })
            .collect();
        idle.sort();
        idle.into_iter()
            .map(|(_, name, bytes)| (name.clone(), bytes))
            .collect()
    }

    /// Ends a load: the model becomes resident, or its slot is freed and
    /// the waiters learn why.
    fn loaded(
        &self,
        name: &str,
        estimate: u64,
        load_time: Duration,
        outcome: Result<M, String>,
    ) -> LoadOutcome {
        let mut state = self.lock();
        match outcome {
            Ok(model) => {
                state.counters.loads += 1;
                state.slots.insert(
                    name.to_owned(),
                    Slot::Resident(Resident {
                        model: Arc::new(model),
                        estimate,
                        in_use: 0,
                        fresh: true,
                        last_used: Instant::now(),
                        last_used_wall: SystemTime::now(),
                        load_time,
                    }),
                );
                // No room was freed: a loading model already counted.
                tracing::info!(
                    model = name,
                    estimate_mib = mib(estimate),
                    load_ms = load_time.as_millis() as u64,
                    "model loaded"
                );
                Ok(())
            }
            Err(reason) => {
                state.counters.load_failures += 1;
                state.slots.remove(name);
                self.changed.notify_waiters();
                tracing::warn!(model = name, %reason, "model failed to load");
                Err(ResidencyError::LoadFailed {
                    model: name.to_owned(),
                    reason,
                })
            }
        }
    }

    /// A call on `name` ended; `warming`: one that only loaded it.
    fn release(&self, name: &str, warming: bool) {
        let mut state = self.lock();
        let Some(Slot::Resident(resident)) = state.slots.get_mut(name) else {
            return;
        };
        resident.in_use = resident.in_use.saturating_sub(1);
        resident.last_used = Instant::now();
        resident.last_used_wall = SystemTime::now();
        self.changed.notify_waiters();
        let unload_now = resident.in_use == 0
            && !warming
            && self.policy.keep_alive == KeepAlive::Idle(Duration::ZERO)
            && !self.pinned(name);
        if unload_now {
            state.counters.idle_unloads += 1;
            let unloaded = state.slots.remove(name);
            drop(state);
            unload_off_thread(unloaded.into_iter().collect());
        }
    }

    /// Unloads idle, unpinned models unused for the keep-alive.
    fn expire(&self, idle: Duration) {
        let now = Instant::now();
        let mut state = self.lock();
        let expired: Vec<String> = state
            .slots
            .iter()
            .filter_map(|(name, slot)| match slot {
                Slot::Resident(resident)
                    if resident.in_use == 0
                        && !self.pinned(name)
                        && now.duration_since(resident.last_used) >= idle =>
                {
                    Some(name.clone())
                }
                _ => None,
            })
            .collect();
        let mut unloaded = Vec::new();
        for name in expired {
            tracing::info!(model = %name, idle_s = idle.as_secs_f64(), "unloading an idle model");
            state.counters.idle_unloads += 1;
            unloaded.extend(state.slots.remove(&name));
        }
        drop(state);
        if !unloaded.is_empty() {
            self.changed.notify_waiters();
        }
        unload_off_thread(unloaded);
    }
}

impl<M> Slot<M> {
    fn estimate(&self) -> u64 {
        match self {
            Slot::Loading { estimate, .. } => *estimate,
            Slot::Resident(resident) => resident.estimate,
        }
    }
}

/// Unloading a model can wait for its engine's current step: done on a
/// blocking thread, never on the caller's.
fn unload_off_thread<M: Send + Sync + 'static>(
    slots: Vec<Slot<M>>,
) -> Option<tokio::task::JoinHandle<()>> {
    if slots.is_empty() {
        return None;
    }
    let unload = move || {
        drop(slots);
        return_freed_memory();
    };
    match tokio::runtime::Handle::try_current() {
        Ok(runtime) => Some(runtime.spawn_blocking(unload)),
        Err(_) => {
            unload();
            None
        }
    }
}

/// Hands freed heap pages back to the system: glibc keeps them for reuse,
/// so without this an unloaded model's KV cache and buffers would still
/// count as the process's memory.
fn return_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only releases free memory of the allocator.
    unsafe {
        libc::malloc_trim(0);
    }
}

async fn sweep<M: Send + Sync + 'static>(inner: Weak<Inner<M>>) {
    let mut ticks = tokio::time::interval(SWEEP_PERIOD);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        let Some(inner) = inner.upgrade() else {
            return;
        };
        if let KeepAlive::Idle(idle) = inner.policy.keep_alive {
            inner.expire(idle);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    const MIB: u64 = 1 << 20;

    fn policy(memory_mib: u64, max_loaded: usize) -> ResidencyPolicy {
        ResidencyPolicy {
            memory_budget: memory_mib * MIB,
            max_loaded,
            keep_alive: KeepAlive::Forever,
            pinned: Vec::new(),
        }
    }

    /// A loader that counts its loads and yields the model's name.
    #[derive(Clone, Default)]
    struct Loads(Arc<AtomicUsize>);

    impl Loads {
        fn of(
            &self,
            name: &str,
        ) -> impl Fn() -> BoxFuture<'static, Result<String, String>> + use<> {
            let (count, name) = (self.0.clone(), name.to_owned());
            move || {
                let (count, name) = (count.clone(), name.clone());
                async move {
                    count.fetch_add(1, Ordering::SeqCst);
                    tokio::task::yield_now().await;
                    Ok(name)
                }
                .boxed()
            }
        }

        fn count(&self) -> usize {
            self.0.load(Ordering::SeqCst)
        }
    }

    /// Loads `name` without holding it.
    trait Warm {
        async fn warm<F>(&self, name: &str, estimate: u64, load: F) -> Result<(), ResidencyError>
        where
            F: Fn() -> BoxFuture<'static, Result<String, String>>;
    }

    impl Warm for Residency<String> {
        async fn warm<F>(&self, name: &str, estimate: u64, load: F) -> Result<(), ResidencyError>
        where
            F: Fn() -> BoxFuture<'static, Result<String, String>>,
        {
            self.acquire(name, estimate, load)
                .await
                .map(Lease::keep_loaded)
        }
    }

    fn resident_names(residency: &Residency<String>) -> Vec<String> {
        residency
            .residents()
            .into_iter()
            .map(|residence| residence.model)
            .collect()
    }

    #[test]
    fn physical_memory_is_read_here() {
        let bytes = physical_memory().expect("Linux and macOS report it");
        assert!(bytes > 64 * MIB, "{bytes} bytes");
    }

    #[tokio::test]
    async fn concurrent_calls_for_a_cold_model_share_one_load() {
        let residency = Residency::new(policy(100, 4));
        let loads = Loads::default();
        let calls = (0..8).map(|_| residency.acquire("a", MIB, loads.of("a")));
        let leases = futures_util::future::try_join_all(calls).await.unwrap();
        assert_eq!(loads.count(), 1);
        assert!(leases.iter().all(|lease| lease.model().as_str() == "a"));
        assert_eq!(residency.residents()[0].in_use, 8);
        drop(leases);
        assert_eq!(residency.residents()[0].in_use, 0);
    }

    #[tokio::test]
    async fn the_least_recently_used_idle_model_is_evicted_for_room() {
        let residency = Residency::new(policy(30, 8));
        let loads = Loads::default();
        for name in ["a", "b", "c"] {
            residency
                .warm(name, 10 * MIB, loads.of(name))
                .await
                .unwrap();
        }
        // "a" used last: "b" is now the least recently used.
        residency.warm("a", 10 * MIB, loads.of("a")).await.unwrap();
        residency.warm("d", 10 * MIB, loads.of("d")).await.unwrap();
        assert_eq!(resident_names(&residency), ["a", "c", "d"]);
        assert_eq!(residency.counters().evictions, 1);
        assert_eq!(loads.count(), 4);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn calls_contending_for_one_slot_load_each_model_once_per_turn() {
        let residency = Residency::new(policy(1000, 1));
        let loads = Loads::default();
        let calls = (0..12).map(|call| {
            let (residency, name) = (residency.clone(), ["a", "b", "c"][call % 3]);
            let load = loads.of(name);
            tokio::spawn(async move { residency.acquire(name, MIB, load).await.map(drop) })
        });
        for call in futures_util::future::join_all(calls).await {
            call.unwrap().unwrap();
        }
        // Each load serves every call waiting for it: a model loads again
        // only after another took its slot, at most once per call.
        assert!(loads.count() <= 12, "{} loads", loads.count());
        assert_eq!(residency.counters().load_failures, 0);
    }

    #[tokio::test]
    async fn the_model_count_limit_evicts_too() {
        let residency = Residency::new(policy(1000, 2));
        let loads = Loads::default();
        for name in ["a", "b", "c"] {
            residency.warm(name, MIB, loads.of(name)).await.unwrap();
        }
        assert_eq!(resident_names(&residency), ["b", "c"]);
    }

    #[tokio::test]
    async fn a_call_waits_while_models_in_use_and_pinned_models_hold_the_room() {
        let mut pinned = policy(20, 8);
        pinned.pinned = vec!["p".to_owned()];
        let residency = Residency::new(pinned);
        let loads = Loads::default();
        residency.warm("p", 10 * MIB, loads.of("p")).await.unwrap();
        let busy = residency
            .acquire("a", 10 * MIB, loads.of("a"))
            .await
            .unwrap();
        let waiting = tokio::spawn({
            let (residency, load) = (residency.clone(), loads.of("b"));
            async move { residency.warm("b", 10 * MIB, load).await }
        });
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        assert!(!waiting.is_finished(), "b loaded while a was in use");
        assert_eq!(resident_names(&residency), ["a", "p"]);
        drop(busy);
        waiting.await.unwrap().unwrap();
        assert_eq!(resident_names(&residency), ["b", "p"]);
    }

    #[tokio::test]
    async fn a_model_that_cannot_fit_beside_the_pinned_ones_is_refused_at_once() {
        let mut pinned = policy(20, 8);
        pinned.pinned = vec!["p".to_owned()];
        let residency = Residency::new(pinned);
        let loads = Loads::default();
        residency.warm("p", 15 * MIB, loads.of("p")).await.unwrap();
        let refused = residency.acquire("b", 10 * MIB, loads.of("b")).await;
        let Err(ResidencyError::NoRoom { model, why, .. }) = refused else {
            panic!("expected no room");
        };
        assert_eq!(model, "b");
        assert_eq!(why, "pinned models hold 15 MiB of the 20 MiB budget");
    }

    #[tokio::test]
    async fn a_model_larger_than_the_budget_is_refused_before_loading() {
        let residency = Residency::new(policy(10, 8));
        let loads = Loads::default();
        let refused = residency.acquire("huge", 11 * MIB, loads.of("huge")).await;
        let Err(error @ ResidencyError::TooLarge { .. }) = refused else {
            panic!("expected too large");
        };
        assert_eq!(
            error.to_string(),
            "model huge needs about 11 MiB, more than the whole model memory budget of 10 MiB"
        );
        assert_eq!(loads.count(), 0);
    }

    #[tokio::test]
    async fn a_failed_load_fails_its_waiters_and_frees_the_slot() {
        let residency: Residency<String> = Residency::new(policy(100, 4));
        let failing = || -> BoxFuture<'static, Result<String, String>> {
            async { Err("bad file".to_owned()) }.boxed()
        };
        let (first, second) = tokio::join!(
            residency.acquire("bad", MIB, failing),
            residency.acquire("bad", MIB, failing)
        );
        for outcome in [first, second] {
            let Err(ResidencyError::LoadFailed { reason, .. }) = outcome else {
                panic!("expected a load failure");
            };
            assert_eq!(reason, "bad file");
        }
        assert!(residency.residents().is_empty());
        assert_eq!(residency.counters().load_failures, 1);
    }

    #[tokio::test]
    async fn keep_alive_zero_unloads_after_each_call() {
        let mut once = policy(100, 4);
        once.keep_alive = KeepAlive::Idle(Duration::ZERO);
        let residency = Residency::new(once);
        let loads = Loads::default();
        let lease = residency.acquire("a", MIB, loads.of("a")).await.unwrap();
        assert_eq!(resident_names(&residency), ["a"]);
        drop(lease);
        assert!(residency.residents().is_empty());
        residency.warm("a", MIB, loads.of("a")).await.unwrap();
        assert_eq!(loads.count(), 2);
        assert_eq!(
            resident_names(&residency),
            ["a"],
            "loaded ahead of its calls, it stays"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn idle_models_unload_after_the_keep_alive_unless_pinned() {
        let mut idle = policy(100, 4);
        idle.keep_alive = KeepAlive::Idle(Duration::from_secs(5));
        idle.pinned = vec!["p".to_owned()];
        let residency = Residency::new(idle);
        let loads = Loads::default();
        residency.warm("a", MIB, loads.of("a")).await.unwrap();
        residency.warm("p", MIB, loads.of("p")).await.unwrap();
        tokio::time::sleep(Duration::from_secs(4)).await;
        assert_eq!(resident_names(&residency), ["a", "p"]);
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_eq!(resident_names(&residency), ["p"]);
        assert_eq!(residency.counters().idle_unloads, 1);
    }

    #[tokio::test]
    async fn unloading_is_refused_while_calls_use_the_model() {
        let residency = Residency::new(policy(100, 4));
        let loads = Loads::default();
        let lease = residency.acquire("a", MIB, loads.of("a")).await.unwrap();
        let Err(ResidencyError::InUse { calls, .. }) = residency.unload("a") else {
            panic!("expected in use");
        };
        assert_eq!(calls, 1);
        drop(lease);
        residency.unload("a").unwrap();
        assert!(residency.residents().is_empty());
        assert!(matches!(
            residency.unload("a"),
            Err(ResidencyError::NotLoaded { .. })
        ));
    }
}
