//! Backends: the runtimes that generate tokens, behind one trait.
//!
//! Everything above this module talks to [`Backend`] only; the concrete
//! runtimes (`embedded`, `mlx`, `ollama`, `openai`) and the choice among
//! them (`registry`) live here.

mod breaker;
pub mod catalog;
mod clock;
pub mod embedded;
mod error;
mod held;
pub(crate) mod http;
pub mod instances;
pub mod mlx;
mod models;
pub mod ollama;
pub mod openai;
mod registry;
mod relay;
pub mod residency;

use std::pin::Pin;

use async_trait::async_trait;
use futures_util::Stream;

pub use breaker::{BreakerPolicy, CircuitState};
pub use clock::StreamClock;
pub use error::BackendError;
pub use registry::{
    BackendHealth, BackendRegistry, BackendSnapshot, FailoverPolicy, GenerationCheck,
    SelectionError,
};
pub use relay::RELAY_CAPACITY;
pub use residency::{KeepAlive, Residence, ResidencyCounters, ResidencyError, ResidencyPolicy};

use catalog::ModelEntry;

/// Author of a chat message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    System,
    User,
    Assistant,
}

impl Role {
    /// The role's name on every chat wire format we speak.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::System => "system",
            Role::User => "user",
            Role::Assistant => "assistant",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Message {
    pub role: Role,
    pub content: String,
}

impl Message {
    pub fn new(role: Role, content: impl Into<String>) -> Self {
        Self {
            role,
            content: content.into(),
        }
    }
}

/// Sampling settings, already validated: every value is in range.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Sampling {
    pub max_tokens: u32,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub seed: Option<u64>,
    /// Penalty on tokens in proportion to how often they already appeared
    /// (OpenAI's `frequency_penalty`, which Ollama accepts too).
    pub frequency_penalty: Option<f32>,
    /// Set by the task layer for structured answers; honoured where
    /// [`Capabilities::no_repeat`] says so (HTTP runtimes have no such option).
    pub no_repeat: Option<NoRepeat>,
}

/// Avoid a token that would repeat an n-gram of `ngram` tokens already in the
/// answer, or complete one of the `already_said` texts whole, whenever
/// another token is allowed.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct NoRepeat {
    pub ngram: u32,
    pub already_said: Vec<String>,
}

/// One generation, already validated.
#[derive(Clone, Debug, PartialEq)]
pub struct GenerationRequest {
    /// Model asked for; `None` means the backend's default.
    pub model: Option<String>,
    pub messages: Vec<Message>,
    pub sampling: Sampling,
    pub stop: Vec<String>,
    /// JSON Schema the output must satisfy.
    pub json_schema: Option<serde_json::Value>,
    /// The caller's session (its `rigger-session` metadata), which
    /// session routing keeps on one instance.
    pub session: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FinishReason {
    Stop,
    Length,
}

/// How a generation ended, as the backend reported it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Completion {
    /// The backend that generated the answer (with failover, not always
    /// the one first asked).
    pub backend: &'static str,
    pub model: String,
    pub finish_reason: FinishReason,
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
    /// Prompt tokens the runtime took from its prompt cache instead of reading.
    pub cached_prompt_tokens: u32,
    /// The runtime's own timings, where it reports them.
    pub engine_timings: Option<EngineTimings>,
}

/// Time the runtime itself says it spent, excluding transport and queueing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EngineTimings {
    pub prompt: std::time::Duration,
    pub generation: std::time::Duration,
}

/// One item of a generation stream: text in order, then exactly one
/// [`Chunk::Done`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Chunk {
    Text(String),
    Done(Completion),
}

/// A generation in progress. Dropping it abandons the generation: the
/// backend's HTTP request is dropped with it, which is how runtimes learn to
/// stop.
pub type ChunkStream = Pin<Box<dyn Stream<Item = Result<Chunk, BackendError>> + Send>>;

/// What a backend guarantees about JSON Schema output. The service validates
/// every schema-carrying output whatever the backend says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SchemaSupport {
    /// The runtime is asked to follow the schema and may ignore it.
    Requested,
    /// The runtime constrains decoding to the schema.
    Enforced,
}

/// What a backend can do beyond streaming text, which every backend does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Capabilities {
    pub json_schema: SchemaSupport,
    /// Whether a seed makes sampling reproducible.
    pub seed: bool,
    /// Whether [`Sampling::no_repeat`] is honoured; elsewhere it is ignored.
    pub no_repeat: bool,
    /// Whether `pattern` in a JSON Schema's strings, with the regular
    /// expressions the task schemas use (negated classes, bounded
    /// repetition, alternatives in `(?:...)`), is enforced while decoding.
    /// llguidance (embedded engine, MLX) does; llama.cpp's grammar converter
    /// (its server, Ollama) takes a smaller syntax and silently drops what
    /// it cannot read, length limits included.
    pub text_patterns: bool,
}

/// A model a backend can serve: what is known of it without loading it
/// (only its name where the backend tells no more), and its residence when
/// loaded or loading.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ModelInfo {
    pub name: String,
    pub facts: Option<ModelEntry>,
    pub residence: Option<Residence>,
}

impl ModelInfo {
    pub fn named(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            ..Self::default()
        }
    }

    pub fn from_entry(entry: &ModelEntry, residence: Option<Residence>) -> Self {
        Self {
            name: entry.name.clone(),
            facts: Some(entry.clone()),
            residence,
        }
    }
}

/// The models a backend holds in memory, and the limits it holds them under.
#[derive(Clone, Debug, PartialEq)]
pub struct ResidencyStatus {
    pub policy: ResidencyPolicy,
    pub residents: Vec<Residence>,
    pub counters: ResidencyCounters,
}

impl ResidencyStatus {
    pub fn of<M: Send + Sync + 'static>(residency: &residency::Residency<M>) -> Self {
        Self {
            policy: residency.policy().clone(),
            residents: residency.residents(),
            counters: residency.counters(),
        }
    }
}

/// The hardware a backend computes on, as its runtime reports it; `None`
/// where the runtime does not give a figure.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ComputeDevice {
    pub kind: DeviceKind,
    /// The device's model: a GPU's (`NVIDIA H200`) or the CPU's.
    pub name: String,
    pub memory_total_bytes: Option<u64>,
    /// In use on the whole device, every process counted (total less free).
    pub memory_used_bytes: Option<u64>,
    /// Held by the backend's runtime itself.
    pub memory_held_bytes: Option<u64>,
}

/// What a device is, by the runtime's backend for it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceKind {
    Cpu,
    Metal,
    Cuda,
    Vulkan,
    /// A GPU through another backend (ROCm, OpenCL, ...).
    OtherGpu,
}

/// What a successful health probe learned.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ProbeReport {
    pub models: Vec<String>,
    pub default_model: Option<String>,
}

#[async_trait]
pub trait Backend: Send + Sync + 'static {
    /// Name accepted by `INFERENCE_BACKEND` and used in health entries.
    fn name(&self) -> &'static str;
    /// Where the backend is reached, for status reports.
    fn endpoint(&self) -> String;
    fn capabilities(&self) -> Capabilities;
    /// Proves the backend answers and learns which models it serves.
    async fn probe(&self) -> Result<ProbeReport, BackendError>;
    /// Starts a generation. Fails fast (before any text) when the backend is
    /// down or does not serve the model.
    async fn generate(&self, request: GenerationRequest) -> Result<ChunkStream, BackendError>;

    /// Whether `model` is one of the names its last probe `listed`; by
    /// default an exact match.
    fn serves(&self, listed: &[String], model: &str) -> bool {
        listed.iter().any(|name| name == model)
    }

    /// Every model the backend can serve; by default the ones its probe
    /// lists, known by name only.
    async fn models(&self) -> Result<Vec<ModelInfo>, BackendError> {
        let report = self.probe().await?;
        Ok(report.models.into_iter().map(ModelInfo::named).collect())
    }

    /// Loads a model ahead of its first call, where the backend holds
    /// models itself.
    async fn load_model(&self, _model: &str) -> Result<(), BackendError> {
        Err(BackendError::Unsupported {
            backend: self.name(),
            operation: "loading a model on request",
        })
    }

    /// Frees a loaded model's memory, where the backend holds models itself.
    async fn unload_model(&self, _model: &str) -> Result<(), BackendError> {
        Err(BackendError::Unsupported {
            backend: self.name(),
            operation: "unloading a model on request",
        })
    }

    /// The models held in memory, for backends that hold them themselves.
    fn residency(&self) -> Option<ResidencyStatus> {
        None
    }

    /// The runtime instances behind it, where it is a pool of them.
    fn instances(&self) -> Vec<instances::InstanceStatus> {
        Vec::new()
    }

    /// The device it computes on, where it runs in this service's care
    /// (in process, or a worker it supervises); a runtime reached over
    /// HTTP does not say.
    fn device(&self) -> Option<ComputeDevice> {
        None
    }
}
