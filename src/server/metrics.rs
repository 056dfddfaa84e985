//! Prometheus metrics, served on their own listen address
//! (`--metrics-listen`) so that scraping never competes with inference
//! traffic for the gRPC port. Names start with `rigger_`.
//!
//! Events (calls, first tokens, queue waits) are recorded as they happen;
//! states (in flight, queue depth, backend health, cache counts) are read
//! from their owners at scrape time.

use std::{sync::Arc, time::Duration};

use prometheus_client::{
    encoding::{EncodeLabelSet, text::encode},
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::{admission::AdmissionStats, rpc::Rpc};
use crate::{
    backend::{BackendHealth, BackendSnapshot, CircuitState},
    task::cache::CacheStats,
};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CallLabels {
    rpc: &'static str,
    backend: &'static str,
    code: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RpcLabels {
    rpc: &'static str,
    backend: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PriorityLabels {
    priority: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BackendLabels {
    backend: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ModelLabels {
    backend: String,
    model: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct InstanceLabels {
    backend: String,
    instance: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CacheLabels {
    rpc: &'static str,
}

/// Seconds, from 5 ms to about 80 s.
fn latency_buckets() -> Histogram {
    Histogram::new(exponential_buckets(0.005, 2.0, 15))
}

/// Tokens per second, from 1 to about 4000.
fn rate_buckets() -> Histogram {
    Histogram::new(exponential_buckets(1.0, 2.0, 13))
}

pub struct Metrics {
    registry: Registry,
    calls: Family<CallLabels, Counter>,
    call_seconds: Family<RpcLabels, Histogram>,
    first_token_seconds: Family<RpcLabels, Histogram>,
    decode_tokens_per_second: Family<RpcLabels, Histogram>,
    generated_tokens: Family<RpcLabels, Counter>,
    queue_wait_seconds: Family<PriorityLabels, Histogram>,
    in_flight: Gauge,
    queued: Family<PriorityLabels, Gauge>,
    admission_rejected: Counter,
    backend_up: Family<BackendLabels, Gauge>,
    backend_active: Family<BackendLabels, Gauge>,
    circuit_state: Family<BackendLabels, Gauge>,
    backend_failures: Family<BackendLabels, Counter>,
    backend_retried: Family<BackendLabels, Counter>,
    cache_hits: Family<CacheLabels, Counter>,
    cache_misses: Family<CacheLabels, Counter>,
    model_loads: Family<BackendLabels, Counter>,
    model_load_failures: Family<BackendLabels, Counter>,
    model_evictions: Family<BackendLabels, Counter>,
    model_idle_unloads: Family<BackendLabels, Counter>,
    model_memory_budget: Family<BackendLabels, Gauge>,
    model_memory: Family<ModelLabels, Gauge>,
    model_load_seconds: Family<ModelLabels, Gauge<f64, std::sync::atomic::AtomicU64>>,
    instance_up: Family<InstanceLabels, Gauge>,
    instance_in_flight: Family<InstanceLabels, Gauge>,
    instance_calls: Family<InstanceLabels, Counter>,
    instance_prefix_routed: Family<InstanceLabels, Counter>,
}

/// The states read at scrape time.
pub struct Snapshot {
    pub admission: AdmissionStats,
    pub backends: Vec<BackendSnapshot>,
    pub caches: Option<(CacheStats, CacheStats)>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("rigger");
        let metrics = Self {
            calls: Family::default(),
            call_seconds: Family::new_with_constructor(latency_buckets),
            first_token_seconds: Family::new_with_constructor(latency_buckets),
            decode_tokens_per_second: Family::new_with_constructor(rate_buckets),
            generated_tokens: Family::default(),
            queue_wait_seconds: Family::new_with_constructor(latency_buckets),
            in_flight: Gauge::default(),
            queued: Family::default(),
            admission_rejected: Counter::default(),
            backend_up: Family::default(),
            backend_active: Family::default(),
            circuit_state: Family::default(),
            backend_failures: Family::default(),
            backend_retried: Family::default(),
            cache_hits: Family::default(),
            cache_misses: Family::default(),
            model_loads: Family::default(),
            model_load_failures: Family::default(),
            model_evictions: Family::default(),
            model_idle_unloads: Family::default(),
            model_memory_budget: Family::default(),
            model_memory: Family::default(),
            model_load_seconds: Family::default(),
            instance_up: Family::default(),
            instance_in_flight: Family::default(),
            instance_calls: Family::default(),
            instance_prefix_routed: Family::default(),
            registry: Registry::default(),
        };
        registry.register(
            "calls",
            "Inference calls ended, by RPC, backend and gRPC status code",
            metrics.calls.clone(),
        );
        registry.register(
            "call_seconds",
            "Duration of inference calls",
            metrics.call_seconds.clone(),
        );
        registry.register(
            "time_to_first_token_seconds",
            "From receiving a call to its first generated text",
            metrics.first_token_seconds.clone(),
        );
        registry.register(
            "decode_tokens_per_second",
            "Generated tokens per second after the first token, per call",
            metrics.decode_tokens_per_second.clone(),
        );
        registry.register(
            "generated_tokens",
            "Tokens generated",
            metrics.generated_tokens.clone(),
        );
        registry.register(
            "queue_wait_seconds",
            "Time admitted calls waited for a generation slot",
            metrics.queue_wait_seconds.clone(),
        );
        registry.register(
            "in_flight",
            "Generations running",
            metrics.in_flight.clone(),
        );
        registry.register(
            "queue_depth",
            "Calls waiting for a generation slot",
            metrics.queued.clone(),
        );
        registry.register(
            "admission_rejected",
            "Calls refused with RESOURCE_EXHAUSTED because the queue was full",
            metrics.admission_rejected.clone(),
        );
        registry.register(
            "backend_up",
            "1 when the backend answered its last health probe",
            metrics.backend_up.clone(),
        );
        registry.register(
            "backend_active",
            "1 for the backend calls go to",
            metrics.backend_active.clone(),
        );
        registry.register(
            "circuit_state",
            "The backend's circuit breaker: 0 closed, 1 open (calls skip it), 2 half-open (testing recovery)",
            metrics.circuit_state.clone(),
        );
        registry.register(
            "backend_failures",
            "Backend failures counted against its circuit (down, erroring, malformed answers)",
            metrics.backend_failures.clone(),
        );
        registry.register(
            "backend_retried",
            "Calls that left the backend, down or full before their first token, for another attempt",
            metrics.backend_retried.clone(),
        );
        registry.register(
            "task_cache_hits",
            "EnhanceTask/DecomposeTask calls answered from the result cache",
            metrics.cache_hits.clone(),
        );
        registry.register(
            "task_cache_misses",
            "Cacheable EnhanceTask/DecomposeTask calls that were generated",
            metrics.cache_misses.clone(),
        );
        register_model_metrics(&mut registry, &metrics);
        Self {
            registry,
            ..metrics
        }
    }
}

fn register_model_metrics(registry: &mut Registry, metrics: &Metrics) {
    registry.register(
        "model_loads",
        "Models loaded by a backend that holds models itself",
        metrics.model_loads.clone(),
    );
    registry.register(
        "model_load_failures",
        "Model loads that failed (bad file, unsupported architecture)",
        metrics.model_load_failures.clone(),
    );
    registry.register(
        "model_evictions",
        "Idle models unloaded to make room for another",
        metrics.model_evictions.clone(),
    );
    registry.register(
        "model_idle_unloads",
        "Models unloaded after their keep-alive",
        metrics.model_idle_unloads.clone(),
    );
    registry.register(
        "model_memory_budget_bytes",
        "Bytes every loaded model may take together (--model-memory)",
        metrics.model_memory_budget.clone(),
    );
    registry.register(
        "model_memory_bytes",
        "Estimated bytes of each loaded or loading model; a model absent here is not loaded",
        metrics.model_memory.clone(),
    );
    registry.register(
        "model_load_seconds",
        "How long each loaded model took to load",
        metrics.model_load_seconds.clone(),
    );
    registry.register(
        "instance_up",
        "1 while a runtime instance passes its probes and takes calls; draining and vanished instances are absent",
        metrics.instance_up.clone(),
    );
    registry.register(
        "instance_in_flight",
        "Generations streaming from each runtime instance",
        metrics.instance_in_flight.clone(),
    );
    registry.register(
        "instance_calls",
        "Calls routed to each runtime instance since it was found",
        metrics.instance_calls.clone(),
    );
    registry.register(
        "instance_prefix_routed",
        "Calls routed to each runtime instance for the prompt prefix it was sent",
        metrics.instance_prefix_routed.clone(),
    );
}

impl Metrics {
    /// One inference call ended with `code` after `elapsed`.
    pub fn call_ended(
        &self,
        rpc: Rpc,
        backend: &'static str,
        code: tonic::Code,
        elapsed: Duration,
    ) {
        let rpc = rpc.as_str();
        self.calls
            .get_or_create(&CallLabels {
                rpc,
                backend,
                code: code_name(code),
            })
            .inc();
        self.call_seconds
            .get_or_create(&RpcLabels { rpc, backend })
            .observe(elapsed.as_secs_f64());
    }

    /// What one answer cost: its first token and its decoding pace.
    pub fn answered(
        &self,
        rpc: Rpc,
        backend: &'static str,
        first_token: Duration,
        total: Duration,
        completion_tokens: u32,
    ) {
        let labels = RpcLabels {
            rpc: rpc.as_str(),
            backend,
        };
        self.first_token_seconds
            .get_or_create(&labels)
            .observe(first_token.as_secs_f64());
        self.generated_tokens
            .get_or_create(&labels)
            .inc_by(u64::from(completion_tokens));
        let decoding = total.saturating_sub(first_token).as_secs_f64();
        if completion_tokens > 1 && decoding > 0.0 {
            self.decode_tokens_per_second
                .get_or_create(&labels)
                .observe(f64::from(completion_tokens - 1) / decoding);
        }
    }

    pub fn waited(&self, priority: &'static str, wait: Duration) {
        self.queue_wait_seconds
            .get_or_create(&PriorityLabels { priority })
            .observe(wait.as_secs_f64());
    }

    /// The OpenMetrics text of every metric, states as of `snapshot`.
    pub fn render(&self, snapshot: &Snapshot) -> String {
        let admission = &snapshot.admission;
        self.in_flight.set(admission.in_flight as i64);
        for (priority, depth) in [
            ("interactive", admission.queued_interactive),
            ("batch", admission.queued_batch),
        ] {
            self.queued
                .get_or_create(&PriorityLabels { priority })
                .set(depth as i64);
        }
        catch_up(&self.admission_rejected, admission.rejected);
        for backend in &snapshot.backends {
            let labels = BackendLabels {
                backend: backend.name.to_owned(),
            };
            let up = backend.health == BackendHealth::Serving;
            self.backend_up.get_or_create(&labels).set(i64::from(up));
            self.backend_active
                .get_or_create(&labels)
                .set(i64::from(backend.active));
            self.circuit_state
                .get_or_create(&labels)
                .set(match backend.circuit {
                    CircuitState::Closed => 0,
                    CircuitState::Open => 1,
                    CircuitState::HalfOpen => 2,
                });
            catch_up(
                &self.backend_failures.get_or_create(&labels),
                backend.failures,
            );
            catch_up(
                &self.backend_retried.get_or_create(&labels),
                backend.retried,
            );
        }
        self.render_models(&snapshot.backends);
        self.render_instances(&snapshot.backends);
        if let Some((enhance, decompose)) = snapshot.caches {
            for (rpc, stats) in [(Rpc::EnhanceTask, enhance), (Rpc::DecomposeTask, decompose)] {
                let labels = CacheLabels { rpc: rpc.as_str() };
                catch_up(&self.cache_hits.get_or_create(&labels), stats.hits);
                catch_up(&self.cache_misses.get_or_create(&labels), stats.misses);
            }
        }
        let mut text = String::new();
        encode(&mut text, &self.registry).expect("writing to a String cannot fail");
        text
    }
}

impl Metrics {
    /// Each backend's runtime instances: only the current ones are present,
    /// so a vanished instance's series end.
    fn render_instances(&self, backends: &[BackendSnapshot]) {
        self.instance_up.clear();
        self.instance_in_flight.clear();
        self.instance_calls.clear();
        self.instance_prefix_routed.clear();
        for backend in backends {
            for instance in backend
                .instances
                .iter()
                .filter(|instance| !instance.draining)
            {
                let labels = InstanceLabels {
                    backend: backend.name.to_owned(),
                    instance: instance.endpoint.clone(),
                };
                let up = instance.serving && instance.circuit != CircuitState::Open;
                self.instance_up.get_or_create(&labels).set(i64::from(up));
                self.instance_in_flight
                    .get_or_create(&labels)
                    .set(i64::try_from(instance.in_flight).unwrap_or(i64::MAX));
                catch_up(&self.instance_calls.get_or_create(&labels), instance.calls);
                catch_up(
                    &self.instance_prefix_routed.get_or_create(&labels),
                    instance.prefix_routed,
                );
            }
        }
    }

    /// The models each backend holds: only the resident ones are present,
    /// so an unloaded model's series ends.
    fn render_models(&self, backends: &[BackendSnapshot]) {
        self.model_memory.clear();
        self.model_load_seconds.clear();
        for backend in backends {
            let Some(residency) = &backend.residency else {
                continue;
            };
            let labels = BackendLabels {
                backend: backend.name.to_owned(),
            };
            let counters = &residency.counters;
            catch_up(&self.model_loads.get_or_create(&labels), counters.loads);
            catch_up(
                &self.model_load_failures.get_or_create(&labels),
                counters.load_failures,
            );
            catch_up(
                &self.model_evictions.get_or_create(&labels),
                counters.evictions,
            );
            catch_up(
                &self.model_idle_unloads.get_or_create(&labels),
                counters.idle_unloads,
            );
            self.model_memory_budget
                .get_or_create(&labels)
                .set(i64::try_from(residency.policy.memory_budget).unwrap_or(i64::MAX));
            for residence in &residency.residents {
                let model = ModelLabels {
                    backend: backend.name.to_owned(),
                    model: residence.model.clone(),
                };
                self.model_memory
                    .get_or_create(&model)
                    .set(i64::try_from(residence.memory_bytes).unwrap_or(i64::MAX));
                if let Some(load_time) = residence.load_time {
                    self.model_load_seconds
                        .get_or_create(&model)
                        .set(load_time.as_secs_f64());
                }
            }
        }
    }
}

/// A status code's name as label value (its Rust name, allocation-free).
fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code;
    match code {
        Code::Ok => "Ok",
        Code::Cancelled => "Cancelled",
        Code::Unknown => "Unknown",
        Code::InvalidArgument => "InvalidArgument",
        Code::DeadlineExceeded => "DeadlineExceeded",
        Code::NotFound => "NotFound",
        Code::AlreadyExists => "AlreadyExists",
        Code::PermissionDenied => "PermissionDenied",
        Code::ResourceExhausted => "ResourceExhausted",
        Code::FailedPrecondition => "FailedPrecondition",
        Code::Aborted => "Aborted",
        Code::OutOfRange => "OutOfRange",
        Code::Unimplemented => "Unimplemented",
        Code::Internal => "Internal",
        Code::Unavailable => "Unavailable",
        Code::DataLoss => "DataLoss",
        Code::Unauthenticated => "Unauthenticated",
    }
}

/// Moves a counter up to a total its owner keeps.
fn catch_up(counter: &Counter, total: u64) {
    counter.inc_by(total.saturating_sub(counter.get()));
}

/// Serves `GET /metrics` on `listener` until `stop`.
pub async fn serve(
    listener: TcpListener,
    render: Arc<dyn Fn() -> String + Send + Sync>,
    stop: CancellationToken,
) -> std::io::Result<()> {
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let render = render.clone();
            async move {
                (
                    [(
                        axum::http::header::CONTENT_TYPE,
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    )],
                    render(),
                )
            }
        }),
    );
    axum::serve(listener, app)
        .with_graceful_shutdown(stop.cancelled_owned())
        .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::server::admission::AdmissionLimits;

    #[test]
    fn calls_states_and_caches_are_rendered_with_the_prefix() {
        let metrics = Metrics::default();
        metrics.call_ended(
            Rpc::Generate,
            "embedded",
            tonic::Code::ResourceExhausted,
            Duration::from_millis(3),
        );
        metrics.answered(
            Rpc::Generate,
            "embedded",
            Duration::from_millis(100),
            Duration::from_millis(1100),
            51,
        );
        let snapshot = Snapshot {
            admission: AdmissionStats {
                limits: AdmissionLimits {
                    max_in_flight: 4,
                    max_queue: 8,
                },
                in_flight: 3,
                queued_interactive: 2,
                queued_batch: 1,
                admitted: 10,
                rejected: 4,
                mean_wait: Duration::ZERO,
            },
            backends: Vec::new(),
            caches: Some((
                CacheStats {
                    entries: 1,
                    capacity: 8,
                    hits: 5,
                    misses: 2,
                },
                CacheStats::default(),
            )),
        };
        let text = metrics.render(&snapshot);
        for line in [
            "rigger_calls_total{rpc=\"generate\",backend=\"embedded\",code=\"ResourceExhausted\"} 1",
            "rigger_in_flight 3",
            "rigger_queue_depth{priority=\"interactive\"} 2",
            "rigger_admission_rejected_total 4",
            "rigger_task_cache_hits_total{rpc=\"enhance_task\"} 5",
            "rigger_generated_tokens_total{rpc=\"generate\",backend=\"embedded\"} 51",
            "rigger_decode_tokens_per_second_bucket{le=\"64.0\",rpc=\"generate\",backend=\"embedded\"} 1",
        ] {
            assert!(text.contains(line), "{line} missing from\n{text}");
        }
        // Counters read from their owners never count twice.
        assert!(
            metrics
                .render(&snapshot)
                .contains("rigger_admission_rejected_total 4")
        );
    }
}
