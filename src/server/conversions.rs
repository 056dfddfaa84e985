//! Domain values as the proto carries them: every `From` from the backend,
//! task and admission layers to a response message lives here, so the
//! handlers only choose what to answer, never how it is spelled.

use std::time::Duration;

use super::{admission::AdmissionStats, health};
use crate::{
    backend::{
        BackendHealth, BackendSnapshot, Capabilities, CircuitState, ComputeDevice, DeviceKind,
        FinishReason, ModelInfo, Residence, ResidencyStatus, SchemaSupport, catalog::ModelEntry,
        instances::InstanceStatus,
    },
    proto,
    task::{
        AnswerStats, Answered, Enhancement, EnhancementKind, Subtask, Violation, cache::CacheStats,
    },
};

/// A duration as the proto's; `None` for one beyond its range.
pub(super) fn duration(value: Duration) -> Option<prost_types::Duration> {
    prost_types::Duration::try_from(value).ok()
}

/// A model as ListModels and LoadModel report it, under the backend that
/// serves it.
pub(super) fn model_info(backend: &str, info: ModelInfo) -> proto::ModelInfo {
    proto::ModelInfo {
        name: info.name,
        backend: backend.to_owned(),
        facts: info.facts.as_ref().map(model_facts),
        residence: info.residence.map(Into::into),
    }
}

fn model_facts(entry: &ModelEntry) -> proto::ModelFacts {
    proto::ModelFacts {
        format: entry.format.as_str().to_owned(),
        architecture: entry.facts.architecture.clone(),
        parameters: entry.facts.parameters,
        quantization: entry.facts.quantization.clone(),
        context_length: entry.facts.context_length,
        size_bytes: entry.size_bytes,
        path: entry.path.display().to_string(),
    }
}

impl From<Residence> for proto::ModelResidence {
    fn from(residence: Residence) -> Self {
        Self {
            loading: residence.loading,
            memory_bytes: residence.memory_bytes,
            in_use: residence.in_use as u32,
            pinned: residence.pinned,
            last_used: residence.last_used.map(prost_types::Timestamp::from),
            load_time: residence.load_time.and_then(duration),
        }
    }
}

impl From<ResidencyStatus> for proto::ModelMemory {
    fn from(status: ResidencyStatus) -> Self {
        Self {
            budget_bytes: status.policy.memory_budget,
            used_bytes: status
                .residents
                .iter()
                .map(|residence| residence.memory_bytes)
                .sum(),
            max_loaded_models: status.policy.max_loaded as u32,
            resident: status
                .residents
                .into_iter()
                .map(|residence| proto::ModelInfo {
                    name: residence.model.clone(),
                    residence: Some(residence.into()),
                    ..Default::default()
                })
                .collect(),
            loads: status.counters.loads,
            load_failures: status.counters.load_failures,
            evictions: status.counters.evictions,
            idle_unloads: status.counters.idle_unloads,
        }
    }
}

impl From<BackendHealth> for proto::BackendHealth {
    fn from(health: BackendHealth) -> Self {
        match health {
            BackendHealth::Unknown => Self::Unknown,
            BackendHealth::Serving => Self::Serving,
            BackendHealth::NotServing => Self::NotServing,
        }
    }
}

impl From<SchemaSupport> for proto::SchemaSupport {
    fn from(support: SchemaSupport) -> Self {
        match support {
            SchemaSupport::Requested => Self::Requested,
            SchemaSupport::Enforced => Self::Enforced,
        }
    }
}

impl From<CircuitState> for proto::CircuitState {
    fn from(state: CircuitState) -> Self {
        match state {
            CircuitState::Closed => Self::Closed,
            CircuitState::Open => Self::Open,
            CircuitState::HalfOpen => Self::HalfOpen,
        }
    }
}

impl From<FinishReason> for proto::FinishReason {
    fn from(reason: FinishReason) -> Self {
        match reason {
            FinishReason::Stop => Self::Stop,
            FinishReason::Length => Self::Length,
        }
    }
}

impl From<EnhancementKind> for proto::EnhancementKind {
    fn from(kind: EnhancementKind) -> Self {
        match kind {
            EnhancementKind::Clarify => Self::Clarify,
            EnhancementKind::Specify => Self::Specify,
            EnhancementKind::Context => Self::Context,
        }
    }
}

impl From<Capabilities> for proto::BackendCapabilities {
    fn from(capabilities: Capabilities) -> Self {
        Self {
            no_repeat: capabilities.no_repeat,
            text_patterns: capabilities.text_patterns,
            json_schema: proto::SchemaSupport::from(capabilities.json_schema).into(),
            seed: capabilities.seed,
        }
    }
}

impl From<BackendSnapshot> for proto::BackendStatus {
    fn from(snapshot: BackendSnapshot) -> Self {
        Self {
            name: snapshot.name.to_owned(),
            endpoint: snapshot.endpoint,
            active: snapshot.active,
            health: proto::BackendHealth::from(snapshot.health).into(),
            default_model: snapshot.default_model.unwrap_or_default(),
            models: snapshot.models,
            capabilities: Some(snapshot.capabilities.into()),
            last_error: snapshot.last_error.unwrap_or_default(),
            health_service: health::backend_service(snapshot.name),
            circuit: proto::CircuitState::from(snapshot.circuit).into(),
            consecutive_failures: snapshot.consecutive_failures,
            failures: snapshot.failures,
            retried: snapshot.retried,
            model_memory: snapshot.residency.map(Into::into),
            instances: snapshot.instances.into_iter().map(Into::into).collect(),
            device: snapshot.device.map(Into::into),
        }
    }
}

impl From<DeviceKind> for proto::ComputeDeviceKind {
    fn from(kind: DeviceKind) -> Self {
        match kind {
            DeviceKind::Cpu => Self::Cpu,
            DeviceKind::Metal => Self::Metal,
            DeviceKind::Cuda => Self::Cuda,
            DeviceKind::Vulkan => Self::Vulkan,
            DeviceKind::OtherGpu => Self::OtherGpu,
        }
    }
}

impl From<ComputeDevice> for proto::ComputeDevice {
    fn from(device: ComputeDevice) -> Self {
        Self {
            kind: proto::ComputeDeviceKind::from(device.kind).into(),
            name: device.name,
            memory_total_bytes: device.memory_total_bytes.unwrap_or_default(),
            memory_used_bytes: device.memory_used_bytes.unwrap_or_default(),
            memory_held_bytes: device.memory_held_bytes.unwrap_or_default(),
        }
    }
}

impl From<InstanceStatus> for proto::InstanceStatus {
    fn from(instance: InstanceStatus) -> Self {
        Self {
            endpoint: instance.endpoint,
            serving: instance.serving,
            draining: instance.draining,
            circuit: proto::CircuitState::from(instance.circuit).into(),
            in_flight: u32::try_from(instance.in_flight).unwrap_or(u32::MAX),
            calls: instance.calls,
            prefix_routed: instance.prefix_routed,
            models: instance.models,
            last_error: instance.last_error.unwrap_or_default(),
            prefix_blocks: instance.prefix_blocks as u64,
        }
    }
}

/// A backend `auto` left out, and why.
impl From<&(&'static str, String)> for proto::SkippedBackend {
    fn from((name, reason): &(&'static str, String)) -> Self {
        Self {
            name: (*name).to_owned(),
            reason: reason.clone(),
        }
    }
}

impl From<AdmissionStats> for proto::AdmissionStatus {
    fn from(stats: AdmissionStats) -> Self {
        let limits = stats.limits;
        Self {
            in_flight: stats.in_flight as u64,
            max_in_flight: limits.max_in_flight as u64,
            queued_interactive: stats.queued_interactive as u64,
            queued_batch: stats.queued_batch as u64,
            max_queue: limits.max_queue as u64,
            admitted: stats.admitted,
            rejected: stats.rejected,
            mean_wait: duration(stats.mean_wait),
        }
    }
}

impl From<CacheStats> for proto::ResultCacheStatus {
    fn from(stats: CacheStats) -> Self {
        Self {
            entries: stats.entries as u64,
            capacity: stats.capacity as u64,
            hits: stats.hits,
            misses: stats.misses,
        }
    }
}

impl From<&Violation> for proto::Violation {
    fn from(violation: &Violation) -> Self {
        Self {
            rule: violation.rule.name().to_owned(),
            detail: violation.detail.clone(),
        }
    }
}

/// The provenance and cost of a structured answer; the runtime's own
/// timings are not kept across repair attempts.
impl From<&AnswerStats> for proto::ResponseMeta {
    fn from(stats: &AnswerStats) -> Self {
        Self {
            backend: stats.backend.to_owned(),
            model: stats.model.clone(),
            prompt_tokens: stats.prompt_tokens,
            completion_tokens: stats.completion_tokens,
            cached_prompt_tokens: stats.cached_prompt_tokens,
            time_to_first_token: duration(stats.time_to_first_token),
            total_time: duration(stats.total_time),
            attempts: stats.attempts,
            backend_prompt_time: None,
            backend_generation_time: None,
            cached: stats.cached,
            repaired: stats.repaired.iter().map(proto::Violation::from).collect(),
            dropped: stats.dropped.iter().map(proto::Violation::from).collect(),
        }
    }
}

impl From<Enhancement> for proto::Enhancement {
    fn from(enhancement: Enhancement) -> Self {
        Self {
            kind: proto::EnhancementKind::from(enhancement.kind).into(),
            title: enhancement.title,
            description: enhancement.description,
            acceptance_criteria: enhancement.acceptance_criteria,
        }
    }
}

impl From<Subtask> for proto::Subtask {
    fn from(subtask: Subtask) -> Self {
        Self {
            title: subtask.title,
            description: subtask.description,
            complexity: subtask.complexity.into(),
            depends_on: subtask.depends_on,
            reasoning: subtask.reasoning,
        }
    }
}

impl From<Answered<Enhancement>> for proto::EnhanceTaskResponse {
    fn from(answer: Answered<Enhancement>) -> Self {
        Self {
            meta: Some((&answer.stats).into()),
            enhancement: Some(answer.value.into()),
        }
    }
}

impl From<Answered<Vec<Subtask>>> for proto::DecomposeTaskResponse {
    fn from(answer: Answered<Vec<Subtask>>) -> Self {
        Self {
            meta: Some((&answer.stats).into()),
            subtasks: answer.value.into_iter().map(proto::Subtask::from).collect(),
        }
    }
}

/// What GetStatus reports, read from the owners of each part.
pub(super) struct StatusReport<'a> {
    pub backends: Vec<BackendSnapshot>,
    pub skipped: &'a [(&'static str, String)],
    pub admission: AdmissionStats,
    pub caches: Option<(CacheStats, CacheStats)>,
}

impl From<StatusReport<'_>> for proto::GetStatusResponse {
    fn from(report: StatusReport<'_>) -> Self {
        let active = report.backends.iter().find(|snapshot| snapshot.active);
        Self {
            active_backend: active
                .map(|snapshot| snapshot.name.to_owned())
                .unwrap_or_default(),
            model: active
                .and_then(|snapshot| snapshot.default_model.clone())
                .unwrap_or_default(),
            platform: Some(proto::Platform {
                os: std::env::consts::OS.to_owned(),
                arch: std::env::consts::ARCH.to_owned(),
            }),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            admission: Some(report.admission.into()),
            enhance_cache: report.caches.map(|(enhance, _)| enhance.into()),
            decompose_cache: report.caches.map(|(_, decompose)| decompose.into()),
            skipped_backends: report.skipped.iter().map(Into::into).collect(),
            backends: report.backends.into_iter().map(Into::into).collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::server::admission::AdmissionLimits;

    fn snapshot(name: &'static str, active: bool) -> BackendSnapshot {
        BackendSnapshot {
            name,
            endpoint: format!("http://{name}"),
            active,
            health: BackendHealth::Serving,
            default_model: Some(format!("{name}-model")),
            models: Vec::new(),
            capabilities: Capabilities {
                no_repeat: true,
                text_patterns: true,
                json_schema: SchemaSupport::Enforced,
                seed: true,
            },
            last_error: None,
            circuit: CircuitState::HalfOpen,
            consecutive_failures: 2,
            failures: 5,
            retried: 1,
            instances: Vec::new(),
            residency: None,
            device: None,
        }
    }

    #[test]
    fn the_status_names_the_active_backend_and_its_model() {
        let skipped = [("mlx", "no worker".to_owned())];
        let status = proto::GetStatusResponse::from(StatusReport {
            backends: vec![snapshot("ollama", false), snapshot("embedded", true)],
            skipped: &skipped,
            admission: AdmissionStats {
                limits: AdmissionLimits {
                    max_in_flight: 2,
                    max_queue: 4,
                },
                in_flight: 1,
                queued_interactive: 0,
                queued_batch: 0,
                admitted: 3,
                rejected: 0,
                mean_wait: Duration::from_millis(5),
            },
            caches: None,
        });
        assert_eq!(status.active_backend, "embedded");
        assert_eq!(status.model, "embedded-model");
        assert_eq!(status.backends.len(), 2);
        let embedded = &status.backends[1];
        assert_eq!(embedded.circuit, proto::CircuitState::HalfOpen as i32);
        assert_eq!(embedded.health, proto::BackendHealth::Serving as i32);
        assert_eq!(
            embedded.capabilities.as_ref().unwrap().json_schema,
            proto::SchemaSupport::Enforced as i32
        );
        assert_eq!(status.skipped_backends[0].reason, "no worker");
        assert_eq!(status.admission.unwrap().max_queue, 4);
        assert_eq!(status.enhance_cache, None);
    }

    #[test]
    fn a_device_goes_out_with_unknown_figures_as_zero_and_none_stays_unset() {
        let gib = 1u64 << 30;
        let on_gpu = BackendSnapshot {
            device: Some(ComputeDevice {
                kind: DeviceKind::Cuda,
                name: "NVIDIA H200".to_owned(),
                memory_total_bytes: Some(140 * gib),
                memory_used_bytes: Some(3 * gib),
                memory_held_bytes: None,
            }),
            ..snapshot("embedded", true)
        };
        let device = proto::BackendStatus::from(on_gpu).device.expect("a device");
        assert_eq!(device.kind(), proto::ComputeDeviceKind::Cuda);
        assert_eq!(device.name, "NVIDIA H200");
        assert_eq!(
            (
                device.memory_total_bytes,
                device.memory_used_bytes,
                device.memory_held_bytes
            ),
            (140 * gib, 3 * gib, 0)
        );
        let remote = proto::BackendStatus::from(snapshot("ollama", false));
        assert_eq!(remote.device, None, "an HTTP runtime's device is unknown");
    }
}
