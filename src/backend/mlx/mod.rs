//! The MLX backend: a long-lived Python worker per loaded model, running
//! Apple's MLX through mlx-lm (`worker.py`, shipped inside the binary),
//! which loads its model once, batches concurrent requests with mlx-lm's
//! continuous batching, streams tokens as they are produced and constrains
//! JSON Schema output with llguidance. Prompts reach it only as JSON data
//! on stdin. Each worker process is supervised and restarted when it dies
//! (`worker`), so a crash takes down only its model's calls. Models of the
//! catalog load on first use under the memory budget (`residency`).

mod detect;
mod protocol;
mod worker;

use std::{
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use async_trait::async_trait;
use futures_util::{Stream, StreamExt};
use tokio_util::sync::DropGuard;

pub use detect::preferred;
pub use worker::{WorkerInfo, WorkerSettings, WorkerState};

use self::{protocol::Command, worker::Supervisor};
use super::{
    Backend, BackendError, Capabilities, Chunk, ChunkStream, ComputeDevice, GenerationRequest,
    ModelInfo, ProbeReport, ResidencyPolicy, ResidencyStatus, SchemaSupport,
    catalog::{Catalog, ModelEntry, ModelFormat},
    held::HeldModels,
    relay::RelayStream,
    residency::Lease,
};

const NAME: &str = "mlx";
/// Bytes of a weight as MLX holds it: float32 on the BLAS fast path, 16
/// bits once a GGUF's quantized weights are converted.
const F32_BYTES: u64 = 4;
const F16_BYTES: u64 = 2;

/// The worker's Python source, run with `python -c`.
const WORKER_SOURCE: &str = include_str!("worker.py");

/// The MLX backend's models and how their workers start.
pub struct MlxSettings {
    /// The default model's worker; another model's worker differs only in
    /// its model.
    pub worker: WorkerSettings,
    /// The models it may serve (GGUF files, converted once, and MLX
    /// directories); the default model is added when missing.
    pub catalog: Catalog,
    /// Loaded before the backend is ready, besides the default model and
    /// the pinned ones.
    pub preload: Vec<String>,
    pub residency: ResidencyPolicy,
    /// Context per request, for the KV cache in the memory estimate.
    pub ctx_per_sequence: u32,
}

impl MlxSettings {
    /// One model, never unloaded: the shape of tests that need one worker.
    pub fn one_model(worker: WorkerSettings) -> Self {
        Self {
            worker,
            catalog: Catalog::default(),
            preload: Vec::new(),
            residency: ResidencyPolicy::single(),
            ctx_per_sequence: 0,
        }
    }
}

/// One loaded model: its supervised worker.
struct MlxModel {
    supervisor: Arc<Supervisor>,
    _workers: DropGuard,
}

impl MlxModel {
    /// Starts the worker and waits until it has loaded the model (or failed
    /// to: the error says why, from the worker's own report).
    async fn start(settings: WorkerSettings) -> Result<Self, String> {
        let (supervisor, workers) = Supervisor::start(settings);
        match supervisor.started().await {
            WorkerState::Ready(info) => {
                tracing::info!(
                    model = %info.model,
                    device = %info.device,
                    fast_path = info.fast_path,
                    "MLX worker serving"
                );
                Ok(Self {
                    supervisor,
                    _workers: workers,
                })
            }
            WorkerState::Down(reason) => Err(reason),
            WorkerState::Starting => Err("the MLX worker did not start".to_owned()),
        }
    }
}

pub struct MlxBackend {
    template: WorkerSettings,
    held: HeldModels<MlxModel>,
    ctx_per_sequence: u32,
}

impl MlxBackend {
    /// Starts the workers of the default model, the pinned ones and those
    /// to preload; the backend is ready when this returns.
    pub async fn start(settings: MlxSettings) -> Result<Self, String> {
        let template = settings.worker;
        let mut entries = settings.catalog.entries().to_vec();
        if entries
            .iter()
            .all(|entry| entry.name != template.model_name)
        {
            entries.push(
                ModelEntry::read(template.model_name.clone(), &template.model)
                    .map_err(|error| error.to_string())?,
            );
        }
        let backend = Self {
            held: HeldModels::new(
                NAME,
                Catalog::from_entries(entries),
                template.model_name.clone(),
                settings.residency,
            ),
            ctx_per_sequence: settings.ctx_per_sequence,
            template,
        };
        let policy = backend.held.residency.policy();
        for model in backend.held.to_warm(&policy.pinned, &settings.preload) {
            backend
                .load_model(&model)
                .await
                .map_err(|error| error.to_string())?;
        }
        Ok(backend)
    }

    /// What the default model's worker reported, when it runs.
    pub fn worker(&self) -> Option<WorkerInfo> {
        let default = self.default_worker()?;
        match default.state() {
            WorkerState::Ready(info) => Some(info),
            _ => None,
        }
    }

    fn default_worker(&self) -> Option<Arc<Supervisor>> {
        self.held
            .residency
            .models()
            .into_iter()
            .find(|(name, _)| *name == self.template.model_name)
            .map(|(_, model)| model.supervisor.clone())
    }

    /// Bytes a model takes in the worker: its weights as MLX holds them
    /// (float32 on the BLAS fast path; a GGUF's quantized weights are
    /// widened to 16 bits when converted) and the KV cache of a full batch.
    fn estimate(&self, entry: &ModelEntry) -> u64 {
        let weights = if self.template.blas.is_some() {
            entry.facts.parameters * F32_BYTES
        } else if entry.format == ModelFormat::Gguf {
            entry.facts.parameters * F16_BYTES
        } else {
            entry.size_bytes
        };
        let positions = u64::from(self.template.max_batch) * u64::from(self.ctx_per_sequence);
        weights.max(entry.size_bytes) + entry.kv_bytes(positions)
    }

    /// The model's worker, started first when it is not running.
    async fn lease(&self, model: &str) -> Result<Lease<MlxModel>, BackendError> {
        let entry = self.held.entry(model)?;
        let settings = WorkerSettings {
            model: entry.path.clone(),
            model_name: entry.name.clone(),
            ..self.template.clone()
        };
        let start =
            move || -> futures_util::future::BoxFuture<'static, Result<MlxModel, String>> {
                Box::pin(MlxModel::start(settings.clone()))
            };
        self.held.acquire(entry, self.estimate(entry), start).await
    }
}

/// Ends the worker's request when the caller drops the stream first.
struct CancelOnDrop {
    supervisor: Arc<Supervisor>,
    id: u64,
}

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.supervisor.cancel(self.id);
    }
}

#[async_trait]
impl Backend for MlxBackend {
    fn name(&self) -> &'static str {
        NAME
    }

    /// The default model's path: the workers have no address.
    fn endpoint(&self) -> String {
        self.template.model.display().to_string()
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            json_schema: SchemaSupport::Enforced,
            seed: true,
            no_repeat: true,
            text_patterns: true,
        }
    }

    /// Serving while the default model's worker is (or while it is not
    /// loaded: it starts on the next call); the other models' workers
    /// fail only their own calls.
    async fn probe(&self) -> Result<ProbeReport, BackendError> {
        let state = self.default_worker().map(|worker| worker.state());
        let down = |reason: String| BackendError::Unavailable {
            backend: NAME,
            endpoint: self.endpoint(),
            reason,
        };
        match state {
            Some(WorkerState::Starting) => Err(down("the MLX worker is starting".to_owned())),
            Some(WorkerState::Down(reason)) => Err(down(reason)),
            Some(WorkerState::Ready(_)) | None => Ok(ProbeReport {
                models: self.held.names(),
                default_model: Some(self.template.model_name.clone()),
            }),
        }
    }

    async fn generate(&self, request: GenerationRequest) -> Result<ChunkStream, BackendError> {
        let model = self.held.requested(request.model.as_deref());
        let lease = self.lease(&model).await?;
        let supervisor = lease.model().supervisor.clone();
        let (id, replies) = supervisor.submit(|id| Command::generate(id, &request).line())?;
        Ok(Box::pin(WorkerReplies {
            _cancel: CancelOnDrop { supervisor, id },
            replies,
            model,
            _lease: lease,
        }))
    }

    async fn models(&self) -> Result<Vec<ModelInfo>, BackendError> {
        Ok(self.held.infos())
    }

    async fn load_model(&self, model: &str) -> Result<(), BackendError> {
        self.lease(model).await.map(Lease::keep_loaded)
    }

    async fn unload_model(&self, model: &str) -> Result<(), BackendError> {
        self.held.unload(model)
    }

    fn residency(&self) -> Option<ResidencyStatus> {
        Some(self.held.status())
    }

    /// The device its workers compute on (each reports the same), with the
    /// memory their MLX holds together as of each one's last report.
    fn device(&self) -> Option<ComputeDevice> {
        let workers: Vec<Arc<Supervisor>> = self
            .held
            .residency
            .models()
            .into_iter()
            .map(|(_, model)| model.supervisor.clone())
            .collect();
        let mut device = workers.iter().find_map(|worker| match worker.state() {
            WorkerState::Ready(info) => info.compute,
            _ => None,
        })?;
        let held: Vec<u64> = workers
            .iter()
            .filter_map(|worker| worker.held_memory())
            .collect();
        device.memory_held_bytes = (!held.is_empty()).then(|| held.iter().sum());
        Some(device)
    }
}

/// A call's replies, with the model's name filled in. Its request is
/// cancelled before its relay goes, so the relay's last `on_room` finds no
/// request left to resume; its model stays loaded while it streams.
struct WorkerReplies {
    _cancel: CancelOnDrop,
    replies: RelayStream,
    model: String,
    _lease: Lease<MlxModel>,
}

impl Stream for WorkerReplies {
    type Item = Result<Chunk, BackendError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let polled = self.replies.poll_next_unpin(cx);
        polled.map(|item| {
            item.map(|reply| {
                reply.map(|chunk| match chunk {
                    Chunk::Done(mut completion) => {
                        completion.model = self.model.clone();
                        Chunk::Done(completion)
                    }
                    text => text,
                })
            })
        })
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        self.replies.size_hint()
    }
}
