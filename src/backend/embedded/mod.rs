//! The embedded backend: llama.cpp in this process (crate `llama-cpp-2`), so
//! a machine with nothing else installed serves from one binary.
//!
//! It serves every GGUF model of the catalog: each is loaded on its first
//! call (or at start when preloaded or pinned) and held under the memory
//! budget (`residency`). Requests are prepared by the model they name
//! (`model`: chat template, tokenization, grammar) and handed to that
//! model's engine thread (`engine`), which decodes every active sequence in
//! one batch per step. JSON Schemas are enforced while sampling with
//! llguidance: each step only tokens the grammar allows can be drawn.
//! Layers go to a GPU where ggml has one (`device`).

mod device;
mod engine;
mod model;
mod sampler;
mod text;

use std::path::{Path, PathBuf};

use async_trait::async_trait;
use futures_util::{FutureExt, StreamExt, future::BoxFuture};

pub use device::{BackendLibraries, GpuLayers, NoGpu};
pub use engine::EngineShape;

use self::model::LoadedModel;
use super::{
    Backend, BackendError, Capabilities, ChunkStream, ComputeDevice, GenerationRequest, ModelInfo,
    ProbeReport, ResidencyStatus, SchemaSupport,
    catalog::{self, Catalog, ModelEntry, ModelFormat},
    held::HeldModels,
    residency::{Lease, ResidencyPolicy},
};

const NAME: &str = "embedded";

pub struct EmbeddedSettings {
    /// The models it may serve; only GGUF entries are taken.
    pub catalog: Catalog,
    /// The model of requests that name none.
    pub default_model: String,
    /// Loaded before the backend is ready, besides the default model and
    /// the pinned ones.
    pub preload: Vec<String>,
    pub residency: ResidencyPolicy,
    pub shape: EngineShape,
    /// Layers offloaded to the GPU; `None`: all of them where ggml has a
    /// GPU, none otherwise.
    pub gpu_layers: Option<GpuLayers>,
    /// Where a `dynamic-backends` build loads ggml's backends from; `None`:
    /// where its build put them. Process-wide: the first backend's holds.
    pub backend_dir: Option<PathBuf>,
    /// Requests that may wait for a free sequence of one model; beyond it
    /// RESOURCE_EXHAUSTED.
    pub queue: usize,
}

impl EmbeddedSettings {
    /// One GGUF model, served under its file name and never unloaded: the
    /// shape of tests and benchmarks that need one engine.
    pub fn one_model(path: &Path, shape: EngineShape, queue: usize) -> Result<Self, LoadError> {
        let name = catalog::model_name(path);
        let entry = ModelEntry::read(name.clone(), path).map_err(|error| LoadError::Model {
            model: name.clone(),
            reason: error.to_string(),
        })?;
        Ok(Self {
            catalog: Catalog::from_entries(vec![entry]),
            default_model: name,
            preload: Vec::new(),
            residency: ResidencyPolicy::single(),
            shape,
            gpu_layers: None,
            backend_dir: None,
            queue,
        })
    }
}

pub struct EmbeddedBackend {
    held: HeldModels<LoadedModel>,
    shape: EngineShape,
    gpu_layers: GpuLayers,
    queue: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("cannot load the model {model}: {reason}")]
    Model { model: String, reason: String },
    #[error(transparent)]
    NoGpu(#[from] NoGpu),
    #[error(transparent)]
    BackendLibraries(#[from] BackendLibraries),
}

impl EmbeddedBackend {
    /// Loads the default model, the pinned ones and those to preload, each
    /// with its engine thread warmed up; the backend is ready when this
    /// returns.
    pub async fn load(settings: EmbeddedSettings) -> Result<Self, LoadError> {
        let catalog = Catalog::from_entries(
            settings
                .catalog
                .entries()
                .iter()
                .filter(|entry| entry.format == ModelFormat::Gguf)
                .cloned()
                .collect(),
        );
        device::load_backends(settings.backend_dir.as_deref())?;
        let backend = Self {
            held: HeldModels::new(NAME, catalog, settings.default_model, settings.residency),
            shape: settings.shape,
            gpu_layers: device::resolve(settings.gpu_layers)?,
            queue: settings.queue,
        };
        let policy = backend.held.residency.policy();
        for model in backend.held.to_warm(&policy.pinned, &settings.preload) {
            backend
                .load_model(&model)
                .await
                .map_err(|error| LoadError::Model {
                    model,
                    reason: error.to_string(),
                })?;
        }
        Ok(backend)
    }

    /// Bytes a model takes once loaded: its weights (mapped from the file)
    /// and the KV cache of every sequence.
    fn estimate(&self, entry: &ModelEntry) -> u64 {
        let positions = u64::from(self.shape.parallel) * u64::from(self.shape.ctx_per_sequence);
        entry.size_bytes + entry.kv_bytes(positions)
    }

    /// The model, loading it first when it is not resident.
    async fn lease(&self, model: &str) -> Result<Lease<LoadedModel>, BackendError> {
        let entry = self.held.entry(model)?;
        let (name, path, shape, gpu_layers, queue) = (
            entry.name.clone(),
            entry.path.clone(),
            self.shape,
            self.gpu_layers,
            self.queue,
        );
        let load = move || -> BoxFuture<'static, Result<LoadedModel, String>> {
            let (name, path) = (name.clone(), path.clone());
            load_off_thread(name, path, shape, gpu_layers, queue).boxed()
        };
        self.held.acquire(entry, self.estimate(entry), load).await
    }
}

async fn load_off_thread(
    name: String,
    path: PathBuf,
    shape: EngineShape,
    gpu_layers: GpuLayers,
    queue: usize,
) -> Result<LoadedModel, String> {
    tokio::task::spawn_blocking(move || LoadedModel::load(&name, &path, shape, gpu_layers, queue))
        .await
        .map_err(|error| format!("loader thread failed: {error}"))?
}

#[async_trait]
impl Backend for EmbeddedBackend {
    fn name(&self) -> &'static str {
        NAME
    }

    /// The default model's file: there is no address in-process.
    fn endpoint(&self) -> String {
        self.held
            .catalog
            .get(&self.held.default_model)
            .map(|entry| entry.path.display().to_string())
            .unwrap_or_default()
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            json_schema: SchemaSupport::Enforced,
            seed: true,
            no_repeat: true,
            text_patterns: true,
        }
    }

    /// Serving while the default model's engine runs (or while it is not
    /// loaded: it loads on the next call); another model whose engine
    /// stopped fails only its own calls, and loads again on the next.
    async fn probe(&self) -> Result<ProbeReport, BackendError> {
        let default = &self.held.default_model;
        let default_stopped = self
            .held
            .residency
            .models()
            .into_iter()
            .any(|(name, model)| name == *default && !model.is_alive());
        if default_stopped {
            return Err(BackendError::Unavailable {
                backend: NAME,
                endpoint: self.endpoint(),
                reason: format!("the engine thread of model {default} stopped"),
            });
        }
        Ok(ProbeReport {
            models: self.held.names(),
            default_model: Some(default.clone()),
        })
    }

    async fn generate(&self, request: GenerationRequest) -> Result<ChunkStream, BackendError> {
        let model = self.held.requested(request.model.as_deref());
        let lease = self.lease(&model).await?;
        let stream = match lease.model().generate(request) {
            Ok(stream) => stream,
            Err(error @ BackendError::Unavailable { .. }) => {
                // Its engine thread stopped: the next call loads it again,
                // and the other models go on serving.
                self.held.residency.discard(&model);
                return Err(error);
            }
            Err(error) => return Err(error),
        };
        // The model stays resident while its answer streams.
        Ok(stream
            .map(move |chunk| {
                let _held = &lease;
                chunk
            })
            .boxed())
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

    fn device(&self) -> Option<ComputeDevice> {
        device::compute_device(self.gpu_layers)
    }
}
