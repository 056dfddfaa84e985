//! Command-line and environment configuration: every setting is one flag with
//! an environment variable and its default stated here, nowhere else.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use clap::{Parser, ValueEnum};

/// Which backend serves requests.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum BackendChoice {
    /// First available, in order: MLX on Apple Silicon (or with a CUDA MLX
    /// build) when mlx-lm is installed, Ollama when reachable, an
    /// OpenAI-compatible server when `OPENAI_BASE_URL` is set and
    /// reachable, then the embedded engine.
    Auto,
    /// llama.cpp in this process, on the GGUF at `--model-path`.
    Embedded,
    /// A persistent mlx-lm worker (Apple's MLX): chosen by `auto` on Apple
    /// Silicon, and on Linux only with an accelerated (CUDA) MLX build.
    Mlx,
    /// Ollama's HTTP API (`OLLAMA_HOST`).
    Ollama,
    /// An OpenAI-compatible server: llama.cpp server, vLLM, mlx_lm.server (`OPENAI_BASE_URL`).
    Openai,
}

/// How calls spread over the instances of a backend (see `--routing`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum RoutingChoice {
    Prefix,
    LeastLoaded,
    Session,
    RoundRobin,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Clone, Debug, Parser)]
#[command(name = "rigger-inference", version, about)]
pub struct Config {
    /// Address the gRPC server listens on.
    #[arg(long, env = "RIGGER_LISTEN", default_value = "127.0.0.1:50051")]
    pub listen: SocketAddr,

    /// Backend to serve with.
    #[arg(long, env = "INFERENCE_BACKEND", value_enum, default_value_t = BackendChoice::Auto, ignore_case = true)]
    pub backend: BackendChoice,

    /// Backends in failover order, comma-separated (`ollama,embedded`):
    /// calls go to the first one that is up and whose circuit is closed,
    /// and move back when an earlier one recovers. Instead of `--backend`.
    #[arg(
        long,
        env = "RIGGER_BACKENDS",
        value_enum,
        value_delimiter = ',',
        ignore_case = true,
        conflicts_with = "backend"
    )]
    pub backends: Vec<BackendChoice>,

    /// Consecutive failures of a backend (down, erroring, malformed
    /// answers) that open its circuit: calls then skip it.
    #[arg(long, env = "RIGGER_BREAKER_FAILURES", default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..))]
    pub breaker_failures: u32,

    /// How long an open circuit stays open before one trial call may test
    /// the backend again.
    #[arg(long, env = "RIGGER_BREAKER_COOLDOWN", value_parser = humantime::parse_duration, default_value = "10s")]
    pub breaker_cooldown: Duration,

    /// Extra attempts of a call whose backend is down or full before any
    /// token was sent: on the next backend in order, or on the same one
    /// after a jittered backoff. Nothing is retried once text has flowed.
    #[arg(long, env = "RIGGER_RETRIES", default_value_t = 2, value_parser = clap::value_parser!(u32).range(0..=10))]
    pub retries: u32,

    /// Base of the exponential backoff before a backend that already failed
    /// a call is tried again; each wait is drawn at random below its bound.
    #[arg(long, env = "RIGGER_RETRY_BACKOFF", value_parser = humantime::parse_duration, default_value = "50ms")]
    pub retry_backoff: Duration,

    /// Default model, used when a request names none. Empty: the backend's
    /// first listed model.
    #[arg(long, env = "RIGGER_MODEL")]
    pub model: Option<String>,

    /// Ollama servers, in Ollama's own `OLLAMA_HOST` form (scheme and port
    /// optional), comma-separated: each is an instance, and a host name is
    /// one instance per address it resolves to.
    #[arg(
        long,
        env = "OLLAMA_HOST",
        value_delimiter = ',',
        default_value = "http://127.0.0.1:11434"
    )]
    pub ollama_host: Vec<String>,

    /// How long Ollama keeps the model loaded after a request (`5m`, `-1`, `0`).
    /// Unset: Ollama's own default.
    #[arg(long, env = "RIGGER_OLLAMA_KEEP_ALIVE")]
    pub ollama_keep_alive: Option<String>,

    /// Base URLs of OpenAI-compatible servers, including `/v1`,
    /// comma-separated (instances as for `--ollama-host`). Setting it
    /// configures the `openai` backend.
    #[arg(long, env = "OPENAI_BASE_URL", value_delimiter = ',')]
    pub openai_base_url: Vec<String>,

    /// How calls spread over a backend's instances: `prefix` (to the
    /// instance that was sent the longest prefix of the prompt, within
    /// `--prefix-max-load-gap` of the least loaded), `least-loaded`,
    /// `session` (by the `rigger-session` metadata), `round-robin`.
    #[arg(long, env = "RIGGER_ROUTING", value_enum, default_value = "prefix")]
    pub routing: RoutingChoice,

    /// How often instance host names are resolved again.
    #[arg(long, env = "RIGGER_DISCOVERY_INTERVAL", value_parser = humantime::parse_duration, default_value = "30s")]
    pub discovery_interval: Duration,

    /// Share of a prompt an instance must have been sent for prefix routing
    /// to prefer it.
    #[arg(long, env = "RIGGER_PREFIX_MIN_MATCH", value_parser = parse_ratio, default_value_t = 0.3)]
    pub prefix_min_match: f64,

    /// Calls in flight a prefix-matching instance may have beyond the least
    /// loaded one before the call goes to the least loaded instead.
    #[arg(long, env = "RIGGER_PREFIX_MAX_LOAD_GAP", default_value_t = 4)]
    pub prefix_max_load_gap: usize,

    /// Bytes of prompt per prefix block: the granularity of a match.
    #[arg(long, env = "RIGGER_PREFIX_BLOCK_BYTES", value_parser = clap::value_parser!(u32).range(1..), default_value_t = 64)]
    pub prefix_block_bytes: u32,

    /// Prompt blocks remembered per instance.
    #[arg(long, env = "RIGGER_PREFIX_CAPACITY", default_value_t = 16384)]
    pub prefix_capacity: usize,

    /// How long a prompt block is remembered after it was last sent.
    #[arg(long, env = "RIGGER_PREFIX_TTL", value_parser = humantime::parse_duration, default_value = "10m")]
    pub prefix_ttl: Duration,

    /// Bearer token for the OpenAI-compatible server, if it wants one.
    #[arg(long, env = "OPENAI_API_KEY", hide_env_values = true)]
    pub openai_api_key: Option<String>,

    /// GGUF model of the embedded engine. Default: the model `make run`
    /// caches, `$RIGGER_CACHE_DIR/models/SmolLM2-135M-Instruct.Q4_1.gguf`.
    #[arg(long, env = "RIGGER_MODEL_PATH")]
    pub model_path: Option<PathBuf>,

    /// Directory scanned for models at start: GGUF files and MLX model
    /// directories (config.json, safetensors, tokenizer), each served under
    /// its file or directory name. Default: `$RIGGER_CACHE_DIR/models`.
    #[arg(long, env = "RIGGER_MODELS_DIR")]
    pub models_dir: Option<PathBuf>,

    /// Models by alias, `NAME=PATH,...`: served under NAME, wherever PATH
    /// is. A path that cannot be read stops the start.
    #[arg(long, env = "RIGGER_MODELS", value_delimiter = ',', value_parser = parse_alias)]
    pub models: Vec<(String, PathBuf)>,

    /// A Hugging Face hub cache (e.g. `~/.cache/huggingface/hub`) whose
    /// models are served too, as `ORG/NAME`. Unset: none.
    #[arg(long, env = "RIGGER_HF_CACHE")]
    pub hf_cache: Option<PathBuf>,

    /// Memory every loaded model may take together (weights plus KV cache,
    /// estimated before loading): bytes (`8GiB`, `512MiB`, `4000000000`) or
    /// a share of physical memory (`75%`). Least recently used idle models
    /// are evicted to make room.
    #[arg(long, env = "RIGGER_MODEL_MEMORY", default_value = "75%", value_parser = parse_memory)]
    pub model_memory: MemoryBudget,

    /// Most models loaded at once, per backend that holds models itself.
    #[arg(long, env = "RIGGER_MAX_LOADED_MODELS", default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_loaded_models: u32,

    /// How long an idle model stays loaded (Ollama's semantics): a duration
    /// (`5m`), `0` to unload after every call, `-1` to keep it until it is
    /// evicted for room or unloaded by UnloadModel.
    #[arg(long, env = "RIGGER_KEEP_ALIVE", default_value = "-1", value_parser = parse_keep_alive, allow_hyphen_values = true)]
    pub keep_alive: KeepAlive,

    /// Models loaded at start and never evicted nor unloaded for
    /// idleness, `NAME,...`.
    #[arg(long, env = "RIGGER_PIN", value_delimiter = ',')]
    pub pin: Vec<String>,

    /// Models loaded at start besides the default one, `NAME,...`; they may
    /// be evicted later.
    #[arg(long, env = "RIGGER_PRELOAD", value_delimiter = ',')]
    pub preload: Vec<String>,

    /// Model of EnhanceTask calls that name none. Unset: the backend's
    /// default model.
    #[arg(long, env = "RIGGER_ENHANCE_MODEL")]
    pub enhance_model: Option<String>,

    /// Model of DecomposeTask calls that name none.
    #[arg(long, env = "RIGGER_DECOMPOSE_MODEL")]
    pub decompose_model: Option<String>,

    /// Model of Generate calls that name none.
    #[arg(long, env = "RIGGER_GENERATE_MODEL")]
    pub generate_model: Option<String>,

    /// Python interpreter of the MLX worker (with `mlx` and `mlx-lm`).
    /// Default: the venv `make` sets up, `$RIGGER_CACHE_DIR/venv/bin/python`.
    #[arg(long, env = "MLX_PYTHON")]
    pub mlx_python: Option<PathBuf>,

    /// Model of the MLX worker: an mlx-lm model directory (config.json,
    /// safetensors, tokenizer) or a GGUF file, converted once into
    /// `$RIGGER_CACHE_DIR/mlx`. Default: `--model-path`'s GGUF.
    #[arg(long, env = "RIGGER_MLX_MODEL")]
    pub mlx_model: Option<PathBuf>,

    /// Requests the MLX worker decodes together (continuous batching).
    #[arg(long, env = "RIGGER_MLX_MAX_BATCH", default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=64))]
    pub mlx_max_batch: u32,

    /// Prompt tokens the MLX worker reads per step; a cancelled request
    /// stops at the next step.
    #[arg(long, env = "RIGGER_MLX_PREFILL_STEP", default_value_t = 256, value_parser = clap::value_parser!(u32).range(16..))]
    pub mlx_prefill_step: u32,

    /// BLAS library the MLX worker preloads to run in float32 (MLX's Linux
    /// CPU wheel links a slow reference BLAS), or `off`. Default on Linux:
    /// the OpenBLAS `make` extracts into `$RIGGER_CACHE_DIR/tools/blas`, else
    /// the system's; none on macOS.
    #[arg(long, env = "RIGGER_MLX_BLAS")]
    pub mlx_blas: Option<PathBuf>,

    /// How long the MLX worker may take to load its model (a first GGUF
    /// conversion included).
    #[arg(long, env = "RIGGER_MLX_START_TIMEOUT", value_parser = humantime::parse_duration, default_value = "5m")]
    pub mlx_start_timeout: Duration,

    /// First wait before restarting a dead MLX worker; doubles while it
    /// keeps dying, up to a 30 s cap.
    #[arg(long, env = "RIGGER_MLX_RESTART_BACKOFF", value_parser = humantime::parse_duration, default_value = "1s")]
    pub mlx_restart_backoff: Duration,

    /// Threads of the embedded engine. Default: one less than the CPUs (at
    /// least one), since llama.cpp's threads spin and starve the rest.
    #[arg(long, env = "RIGGER_THREADS")]
    pub threads: Option<u32>,

    /// Sequences the embedded engine decodes together; more requests wait.
    #[arg(long, env = "RIGGER_PARALLEL", default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=64))]
    pub parallel: u32,

    /// Tokens of context (prompt plus answer) of each embedded sequence.
    #[arg(long, env = "RIGGER_CTX_PER_SEQUENCE", default_value_t = 2048, value_parser = clap::value_parser!(u32).range(64..))]
    pub ctx_per_sequence: u32,

    /// Tokens the embedded engine decodes in one step, all sequences together.
    #[arg(long, env = "RIGGER_BATCH_TOKENS", default_value_t = 512, value_parser = clap::value_parser!(u32).range(16..))]
    pub batch_tokens: u32,

    /// Requests that may wait for a free embedded sequence; beyond that
    /// RESOURCE_EXHAUSTED.
    #[arg(long, env = "RIGGER_QUEUE", default_value_t = 32)]
    pub queue: usize,

    /// Let llama.cpp use flash attention where it helps. Faster on some
    /// machines, but an answer then depends on how its prompt was split into
    /// batches: off keeps answers reproducible.
    #[arg(long, env = "RIGGER_FLASH_ATTENTION", default_value_t = false)]
    pub flash_attention: bool,

    /// Layers of the embedded engine's models offloaded to the GPU, as
    /// llama.cpp's `-ngl`: a number (beyond the model's layers means all),
    /// `all`, or `-1` (all). Unset: all where llama.cpp finds a GPU (a
    /// `cuda` or `vulkan` build with one, any build on Apple Silicon), 0
    /// otherwise. Layers asked for with no GPU stop the start.
    #[arg(long, env = "RIGGER_GPU_LAYERS", value_parser = parse_gpu_layers, allow_hyphen_values = true)]
    pub gpu_layers: Option<GpuLayers>,

    /// Where a `dynamic-backends` build of the embedded engine loads ggml's
    /// backend libraries from (`libggml-cpu-*`, `libggml-cuda`, ...). Unset:
    /// the directory its build put them in. Set in a build with its
    /// backends linked in (the default), it stops the start.
    #[arg(long, env = "RIGGER_GGML_BACKEND_DIR")]
    pub ggml_backend_dir: Option<PathBuf>,

    /// How often every configured backend is probed for health.
    #[arg(long, env = "RIGGER_PROBE_INTERVAL", value_parser = humantime::parse_duration, default_value = "5s")]
    pub probe_interval: Duration,

    /// How long one health probe may take before the backend counts as down.
    #[arg(long, env = "RIGGER_PROBE_TIMEOUT", value_parser = humantime::parse_duration, default_value = "2s")]
    pub probe_timeout: Duration,

    /// Readiness also needs the active backend to have completed a
    /// generation within this interval; if none did, it must generate one
    /// token as a test. `0s` turns the test off (readiness then follows
    /// the cheap probes only).
    #[arg(long, env = "RIGGER_READINESS_GENERATION_INTERVAL", value_parser = humantime::parse_duration, default_value = "30s")]
    pub readiness_generation_interval: Duration,

    /// How long that test generation may take.
    #[arg(long, env = "RIGGER_READINESS_GENERATION_TIMEOUT", value_parser = humantime::parse_duration, default_value = "10s")]
    pub readiness_generation_timeout: Duration,

    /// How long connecting to a backend may take.
    #[arg(long, env = "RIGGER_CONNECT_TIMEOUT", value_parser = humantime::parse_duration, default_value = "2s")]
    pub connect_timeout: Duration,

    /// How long a backend may stay silent in the middle of an answer before
    /// the call fails as UNAVAILABLE.
    #[arg(long, env = "RIGGER_BACKEND_IDLE_TIMEOUT", value_parser = humantime::parse_duration, default_value = "120s")]
    pub backend_idle_timeout: Duration,

    /// Generations (Generate streams, Enhance/Decompose calls) running at
    /// once; more wait in the queue. Default: `--parallel`, the embedded
    /// engine's sequences; for Ollama or an OpenAI-compatible server match
    /// its parallelism (OLLAMA_NUM_PARALLEL, llama.cpp's `--parallel`, ...).
    #[arg(long, env = "RIGGER_MAX_IN_FLIGHT", value_parser = clap::value_parser!(u64).range(1..=4096))]
    pub max_in_flight: Option<u64>,

    /// Calls that may wait for a free generation slot (interactive ones
    /// first); beyond it RESOURCE_EXHAUSTED with a `retry-after` hint.
    #[arg(long, env = "RIGGER_MAX_QUEUE", default_value_t = 64)]
    pub max_queue: usize,

    /// Address of the Prometheus endpoint (`/metrics`), or `off`.
    #[arg(long, env = "RIGGER_METRICS_LISTEN", default_value = "127.0.0.1:9464", value_parser = parse_metrics_listen)]
    pub metrics_listen: MetricsListen,

    /// Deadline of calls whose client sets none; past it DEADLINE_EXCEEDED
    /// and the backend work is stopped.
    #[arg(long, env = "RIGGER_DEFAULT_DEADLINE", value_parser = humantime::parse_duration, default_value = "5m")]
    pub default_deadline: Duration,

    /// Longest deadline a call gets, whatever its client asks.
    #[arg(long, env = "RIGGER_MAX_DEADLINE", value_parser = humantime::parse_duration, default_value = "30m")]
    pub max_deadline: Duration,

    /// After SIGTERM/SIGINT, how long open calls may run before they are cut.
    #[arg(long, env = "RIGGER_SHUTDOWN_GRACE", value_parser = humantime::parse_duration, default_value = "10s")]
    pub shutdown_grace: Duration,

    /// Generated tokens when a Generate request sets no `max_tokens`.
    #[arg(long, env = "RIGGER_DEFAULT_MAX_TOKENS", default_value_t = 512)]
    pub default_max_tokens: u32,

    /// Generated tokens per attempt when an EnhanceTask or DecomposeTask
    /// request sets no `max_tokens`.
    #[arg(long, env = "RIGGER_TASK_MAX_TOKENS", default_value_t = 1024)]
    pub task_max_tokens: u32,

    /// Largest `max_tokens` a request may ask for.
    #[arg(long, env = "RIGGER_MAX_TOKENS_LIMIT", default_value_t = 8192)]
    pub max_tokens_limit: u32,

    /// Largest prompt a Generate request may carry, in bytes over all messages.
    #[arg(long, env = "RIGGER_MAX_PROMPT_BYTES", default_value_t = 256 * 1024)]
    pub max_prompt_bytes: usize,

    /// Largest gRPC request message accepted, in bytes.
    #[arg(long, env = "RIGGER_MAX_MESSAGE_BYTES", default_value_t = 4 * 1024 * 1024)]
    pub max_message_bytes: usize,

    /// Model answers tried per EnhanceTask/DecomposeTask before an invalid
    /// answer becomes an error; retries tell the model what was wrong. Four:
    /// a retry that only asks for missing subtasks costs a fraction of an
    /// answer.
    #[arg(long, env = "RIGGER_TASK_ATTEMPTS", default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=5))]
    pub task_attempts: u32,

    /// Least similarity in meaning (cosine) between a part of an answer (a
    /// subtask's title and description, an enhancement's title and
    /// description, an acceptance criterion) and the task's title and
    /// description, by `--topic-model`; a part below it is off topic and
    /// left out or asked for again. 0 turns the semantic check off (a part
    /// must still share a content word with the task). 0.15: in the eval
    /// corpus's judged answers (`eval/after/`), below it lie none of the
    /// parts the judge finds grounded and 29% (decompositions) and 26%
    /// (enhancements) of those it finds ungrounded; higher thresholds catch
    /// more and refuse more calls (README, "Answer quality").
    #[arg(long, env = "RIGGER_ON_TOPIC_SIMILARITY", default_value_t = 0.15, value_parser = parse_ratio)]
    pub on_topic_similarity: f64,

    /// Sentence-embedding model of the on-topic check: a directory holding
    /// `tokenizer.json` (byte-fallback BPE) and `model.safetensors` (one
    /// half-precision table of token vectors). Default: WordLlama's
    /// l2_supercat, which `make` unpacks from its PyPI wheel into
    /// `$RIGGER_CACHE_DIR/models/wordllama-l2-supercat-256`; where that is
    /// missing, the check is off and the log says so.
    #[arg(long, env = "RIGGER_TOPIC_MODEL")]
    pub topic_model: Option<PathBuf>,

    /// EnhanceTask/DecomposeTask answers kept per RPC for identical
    /// reproducible requests (greedy or seeded); 0 turns the cache off.
    #[arg(long, env = "RIGGER_TASK_CACHE_ENTRIES", default_value_t = 1024)]
    pub task_cache_entries: usize,

    /// How long a cached answer may be served.
    #[arg(long, env = "RIGGER_TASK_CACHE_TTL", value_parser = humantime::parse_duration, default_value = "10m")]
    pub task_cache_ttl: Duration,

    /// Bearer token every call must present (`authorization: Bearer
    /// <token>`), except calls to exempt services; unset: no authentication.
    #[arg(long, env = "RIGGER_AUTH_TOKEN", hide_env_values = true, value_parser = read_token)]
    pub auth_token: Option<Secret>,

    /// File holding the bearer token (a mounted Kubernetes Secret, say),
    /// read once at startup; surrounding whitespace is ignored.
    #[arg(long, env = "RIGGER_AUTH_TOKEN_FILE", conflicts_with = "auth_token")]
    pub auth_token_file: Option<PathBuf>,

    /// Services callable without the token (probes need no secret).
    #[arg(
        long,
        env = "RIGGER_AUTH_EXEMPT",
        value_delimiter = ',',
        default_value = "grpc.health.v1.Health,grpc.reflection.v1.ServerReflection,grpc.reflection.v1alpha.ServerReflection"
    )]
    pub auth_exempt: Vec<String>,

    /// PEM certificate (chain) of the gRPC port: with `--tls-key`, the port
    /// speaks TLS only.
    #[arg(long, env = "RIGGER_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,

    /// PEM private key of `--tls-cert`.
    #[arg(long, env = "RIGGER_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,

    /// PEM CA certificate(s) that client certificates must chain to: with
    /// it, clients without such a certificate are refused (mutual TLS).
    #[arg(long, env = "RIGGER_TLS_CLIENT_CA", requires = "tls_cert")]
    pub tls_client_ca: Option<PathBuf>,

    /// OpenTelemetry: trace export of inference calls.
    #[command(flatten)]
    pub telemetry: TelemetryConfig,

    /// Log format.
    #[arg(long, env = "RIGGER_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text, ignore_case = true)]
    pub log_format: LogFormat,
}

/// OpenTelemetry settings, under the standard `OTEL_*` variables. Export is
/// off until an endpoint is given; trace context is passed on to backends
/// either way.
#[derive(Clone, Debug, clap::Args)]
pub struct TelemetryConfig {
    /// OTLP collector to export one span per inference call to: its base URL
    /// (`http://127.0.0.1:4317` for gRPC; for HTTP `/v1/traces` is appended
    /// to it). Unset: no export.
    #[arg(long, env = "OTEL_EXPORTER_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,

    /// OTLP transport and encoding.
    #[arg(long, env = "OTEL_EXPORTER_OTLP_PROTOCOL", value_enum, default_value_t = OtlpProtocol::HttpProtobuf)]
    pub otlp_protocol: OtlpProtocol,

    /// `service.name` of the exported spans; unset: the `service.name` of
    /// `--otel-resource-attributes`, else `rigger-inference`.
    #[arg(long, env = "OTEL_SERVICE_NAME")]
    pub otel_service_name: Option<String>,

    /// Which new spans are recorded (a `parentbased_*` sampler follows the
    /// caller's decision when the call continues a trace).
    #[arg(long, env = "OTEL_TRACES_SAMPLER", value_enum, default_value_t = TracesSampler::ParentbasedAlwaysOn)]
    pub otel_traces_sampler: TracesSampler,

    /// Ratio of traces the `*traceidratio` samplers record, 0 to 1.
    #[arg(long, env = "OTEL_TRACES_SAMPLER_ARG", default_value_t = 1.0, value_parser = parse_ratio)]
    pub otel_traces_sampler_arg: f64,

    /// Attributes of the exported resource, `key=value`, comma-separated
    /// (`deployment.environment=prod,service.namespace=rigger`).
    #[arg(long, env = "OTEL_RESOURCE_ATTRIBUTES", value_delimiter = ',', value_parser = parse_resource_attribute)]
    pub otel_resource_attributes: Vec<ResourceAttribute>,
}

/// The values of `OTEL_EXPORTER_OTLP_PROTOCOL`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum OtlpProtocol {
    /// OTLP/gRPC (collectors listen on 4317).
    #[value(name = "grpc")]
    Grpc,
    /// OTLP/HTTP with protobuf bodies (collectors listen on 4318).
    #[value(name = "http/protobuf")]
    HttpProtobuf,
    /// OTLP/HTTP with JSON bodies.
    #[value(name = "http/json")]
    HttpJson,
}

/// The values of `OTEL_TRACES_SAMPLER` that need no remote service.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
#[value(rename_all = "snake_case")]
pub enum TracesSampler {
    AlwaysOn,
    AlwaysOff,
    Traceidratio,
    ParentbasedAlwaysOn,
    ParentbasedAlwaysOff,
    ParentbasedTraceidratio,
}

/// One `key=value` of `OTEL_RESOURCE_ATTRIBUTES`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResourceAttribute {
    pub key: String,
    pub value: String,
}

fn parse_resource_attribute(entry: &str) -> Result<ResourceAttribute, String> {
    match entry.split_once('=') {
        Some((key, value)) if !key.trim().is_empty() => Ok(ResourceAttribute {
            key: key.trim().to_owned(),
            value: value.trim().to_owned(),
        }),
        _ => Err(format!("{entry:?} is not key=value")),
    }
}

fn parse_ratio(value: &str) -> Result<f64, String> {
    match value.parse::<f64>() {
        Ok(ratio) if (0.0..=1.0).contains(&ratio) => Ok(ratio),
        _ => Err(format!("{value:?} is not a ratio between 0 and 1")),
    }
}

/// `--gpu-layers`: how many of a model's layers go to the GPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GpuLayers {
    All,
    Count(u32),
}

fn parse_gpu_layers(value: &str) -> Result<GpuLayers, String> {
    let value = value.trim();
    if value.eq_ignore_ascii_case("all") || value == "-1" {
        return Ok(GpuLayers::All);
    }
    value
        .parse()
        .map(GpuLayers::Count)
        .map_err(|_| format!("{value:?} is not a number of layers (0 or more), `all` or -1"))
}

/// `--model-memory`: fixed bytes, or a share of physical memory.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum MemoryBudget {
    Bytes(u64),
    Share(f64),
}

impl MemoryBudget {
    /// The budget in bytes on a machine with `physical` bytes of memory.
    pub fn bytes(self, physical: u64) -> u64 {
        match self {
            Self::Bytes(bytes) => bytes,
            Self::Share(share) => (physical as f64 * share) as u64,
        }
    }
}

fn parse_memory(value: &str) -> Result<MemoryBudget, String> {
    let value = value.trim();
    if let Some(percent) = value.strip_suffix('%') {
        return match percent.trim().parse::<f64>() {
            Ok(share) if share > 0.0 && share <= 100.0 => Ok(MemoryBudget::Share(share / 100.0)),
            _ => Err(format!("{value:?} is not a share between 0% and 100%")),
        };
    }
    let digits = value.trim_end_matches(|c: char| c.is_ascii_alphabetic());
    let unit = value[digits.len()..].to_ascii_lowercase();
    let scale: u64 = match unit.as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        "t" | "tb" | "tib" => 1 << 40,
        _ => {
            return Err(format!(
                "{value:?}: unknown unit {unit:?} (use B, KiB, MiB, GiB, TiB or %)"
            ));
        }
    };
    match digits.trim().parse::<f64>() {
        Ok(amount) if amount > 0.0 => Ok(MemoryBudget::Bytes((amount * scale as f64) as u64)),
        _ => Err(format!("{value:?} is not a positive amount of memory")),
    }
}

/// Parses one `--models` entry, `NAME=PATH`; a clap `value_parser`.
fn parse_alias(s: &str) -> Result<(String, PathBuf), String> {
    let (name, path) = s
        .split_once('=')
        .ok_or_else(|| format!("`{s}` is not NAME=PATH"))?;
    if name.is_empty() || path.is_empty() {
        return Err(format!("`{s}` is not NAME=PATH: both must be non-empty"));
    }
    if let Some(bad) = name
        .chars()
        .find(|c| c.is_whitespace() || *c == '=' || *c == ',')
    {
        return Err(format!("model name `{name}` contains {bad:?}"));
    }
    Ok((name.to_owned(), PathBuf::from(path)))
}

/// `--keep-alive`: how long an idle model stays loaded; `None` for as long
/// as it is not evicted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KeepAlive(pub Option<Duration>);

fn parse_keep_alive(value: &str) -> Result<KeepAlive, String> {
    let value = value.trim();
    // Ollama's forms: any negative number keeps a model, a bare number is
    // seconds, anything else a duration.
    if let Ok(seconds) = value.parse::<f64>() {
        return if seconds < 0.0 {
            Ok(KeepAlive(None))
        } else {
            Ok(KeepAlive(Some(Duration::from_secs_f64(seconds))))
        };
    }
    if value
        .strip_prefix('-')
        .is_some_and(|magnitude| humantime::parse_duration(magnitude).is_ok())
    {
        return Ok(KeepAlive(None));
    }
    humantime::parse_duration(value)
        .map(|idle| KeepAlive(Some(idle)))
        .map_err(|error| format!("{value:?} is neither a number of seconds (negative: forever) nor a duration: {error}"))
}

/// A secret setting: its `Debug` form never shows the value, so logging a
/// configuration cannot leak it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str("Secret(<redacted>)")
    }
}

/// A token as given (flag, variable or file): surrounding whitespace is
/// ignored, nothing else may be empty.
fn read_token(value: &str) -> Result<Secret, String> {
    let token = value.trim();
    if token.is_empty() {
        return Err("the token is empty".to_owned());
    }
    Ok(Secret(token.to_owned()))
}

/// Where metrics are served; `None` when turned off.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MetricsListen(pub Option<SocketAddr>);

fn parse_metrics_listen(value: &str) -> Result<MetricsListen, String> {
    if value.eq_ignore_ascii_case("off") {
        return Ok(MetricsListen(None));
    }
    value
        .parse()
        .map(|address| MetricsListen(Some(address)))
        .map_err(|error| {
            format!("{value:?} is neither an address (host:port) nor \"off\": {error}")
        })
}

impl Config {
    /// Generations admitted at once: `--max-in-flight`, else `--parallel`.
    pub fn admitted_generations(&self) -> usize {
        self.max_in_flight.unwrap_or(u64::from(self.parallel)) as usize
    }

    /// The bearer token calls must present: `--auth-token`, else the
    /// contents of `--auth-token-file`, else none.
    pub fn bearer_token(&self) -> Result<Option<Secret>, String> {
        if let Some(token) = &self.auth_token {
            return Ok(Some(token.clone()));
        }
        let Some(path) = &self.auth_token_file else {
            return Ok(None);
        };
        let text = std::fs::read_to_string(path).map_err(|error| {
            format!(
                "cannot read the auth token file {}: {error}",
                path.display()
            )
        })?;
        read_token(&text)
            .map(Some)
            .map_err(|problem| format!("auth token file {}: {problem}", path.display()))
    }

    /// The embedded engine's model: `--model-path`, else the cached default.
    pub fn embedded_model_path(&self) -> PathBuf {
        self.model_path
            .clone()
            .unwrap_or_else(|| cache_dir().join("models/SmolLM2-135M-Instruct.Q4_1.gguf"))
    }

    /// The directory scanned for models: `--models-dir`, else the cache's.
    pub fn models_dir(&self) -> PathBuf {
        self.models_dir
            .clone()
            .unwrap_or_else(|| cache_dir().join("models"))
    }

    /// The on-topic check's model: `--topic-model`, else the cached default.
    pub fn topic_model_path(&self) -> PathBuf {
        self.topic_model
            .clone()
            .unwrap_or_else(|| cache_dir().join("models/wordllama-l2-supercat-256"))
    }

    /// The embedded engine's threads: `--threads`, else one less than the CPUs.
    pub fn embedded_threads(&self) -> u32 {
        self.threads.unwrap_or_else(|| {
            let cpus = std::thread::available_parallelism().map_or(1, |cpus| cpus.get() as u32);
            cpus.saturating_sub(1).max(1)
        })
    }
}

/// Where setup puts the venv and models, as `scripts/setup-python.sh` computes it.
pub fn cache_dir() -> PathBuf {
    let from_env = |name| std::env::var_os(name).filter(|value| !value.is_empty());
    if let Some(dir) = from_env("RIGGER_CACHE_DIR") {
        return PathBuf::from(dir);
    }
    from_env("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| from_env("HOME").map(|home| PathBuf::from(home).join(".cache")))
        .unwrap_or_else(|| PathBuf::from(".cache"))
        .join("rigger-inference")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_match_the_documented_values() {
        let config = Config::parse_from(["rigger-inference"]);
        assert_eq!(config.listen, "127.0.0.1:50051".parse().unwrap());
        assert_eq!(config.backend, BackendChoice::Auto);
        assert_eq!(config.ollama_host, ["http://127.0.0.1:11434"]);
        assert!(config.openai_base_url.is_empty());
        assert_eq!(config.routing, RoutingChoice::Prefix);
        assert_eq!(config.probe_interval, Duration::from_secs(5));
        assert_eq!(config.model_memory, MemoryBudget::Share(0.75));
        assert_eq!(config.max_loaded_models, 3);
        assert_eq!(config.keep_alive, KeepAlive(None));
    }

    #[test]
    fn model_memory_reads_bytes_with_units_and_shares() {
        let gib = 1u64 << 30;
        assert_eq!(parse_memory("8GiB"), Ok(MemoryBudget::Bytes(8 * gib)));
        assert_eq!(parse_memory("512mb"), Ok(MemoryBudget::Bytes(512 << 20)));
        assert_eq!(parse_memory("1.5G"), Ok(MemoryBudget::Bytes(gib * 3 / 2)));
        assert_eq!(parse_memory("4000"), Ok(MemoryBudget::Bytes(4000)));
        assert_eq!(
            parse_memory("50%").map(|budget| budget.bytes(10 * gib)),
            Ok(5 * gib)
        );
        for bad in ["0", "-1GiB", "8 parsecs", "120%", "0%", "GiB", ""] {
            assert!(parse_memory(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn aliases_parse_as_name_equals_path() {
        assert_eq!(
            parse_alias("fast=/models/a b.gguf"),
            Ok(("fast".into(), PathBuf::from("/models/a b.gguf")))
        );
        assert_eq!(
            parse_alias("org/name=x=y"),
            Ok(("org/name".into(), PathBuf::from("x=y")))
        );
        for bad in ["no-equals", "=path", "name=", "two words=p"] {
            assert!(parse_alias(bad).is_err(), "{bad} should not parse");
        }
        let error = parse_alias("a b=p").expect_err("whitespace");
        assert!(error.contains("' '"), "{error}");
    }

    #[test]
    fn keep_alive_reads_ollamas_forms() {
        assert_eq!(parse_keep_alive("-1"), Ok(KeepAlive(None)));
        assert_eq!(parse_keep_alive("-5m"), Ok(KeepAlive(None)));
        assert_eq!(parse_keep_alive("-3"), Ok(KeepAlive(None)));
        assert_eq!(parse_keep_alive("0"), Ok(KeepAlive(Some(Duration::ZERO))));
        assert_eq!(
            parse_keep_alive("300"),
            Ok(KeepAlive(Some(Duration::from_secs(300))))
        );
        assert_eq!(
            parse_keep_alive("5m"),
            Ok(KeepAlive(Some(Duration::from_secs(300))))
        );
        assert!(parse_keep_alive("soon").is_err());
        let config = Config::parse_from(["x", "--keep-alive", "-1", "--pin", "a,b"]);
        assert_eq!(config.keep_alive, KeepAlive(None));
        assert_eq!(config.pin, ["a", "b"]);
    }

    #[test]
    fn the_standard_otel_variables_parse_into_the_telemetry_settings() {
        let config = Config::parse_from([
            "x",
            "--otlp-endpoint",
            "http://127.0.0.1:4317",
            "--otlp-protocol",
            "grpc",
            "--otel-traces-sampler",
            "parentbased_traceidratio",
            "--otel-traces-sampler-arg",
            "0.25",
            "--otel-resource-attributes",
            "deployment.environment=prod, service.namespace = rigger",
        ]);
        let telemetry = config.telemetry;
        assert_eq!(telemetry.otlp_protocol, OtlpProtocol::Grpc);
        assert_eq!(
            telemetry.otel_traces_sampler,
            TracesSampler::ParentbasedTraceidratio
        );
        assert_eq!(telemetry.otel_traces_sampler_arg, 0.25);
        assert_eq!(
            telemetry.otel_resource_attributes[1],
            ResourceAttribute {
                key: "service.namespace".into(),
                value: "rigger".into()
            }
        );
        let defaults = Config::parse_from(["x"]).telemetry;
        assert_eq!(defaults.otlp_endpoint, None, "export is off by default");
        assert_eq!(defaults.otlp_protocol, OtlpProtocol::HttpProtobuf);
        for invalid in [
            ["--otlp-protocol", "http"],
            ["--otel-traces-sampler-arg", "1.5"],
            ["--otel-resource-attributes", "no-value"],
        ] {
            assert!(
                Config::try_parse_from(["x", invalid[0], invalid[1]]).is_err(),
                "{invalid:?}"
            );
        }
    }

    #[test]
    fn unknown_backend_is_rejected_with_the_valid_names() {
        let error = Config::try_parse_from(["rigger-inference", "--backend", "tensorflow"])
            .expect_err("unknown backend must not parse");
        let message = error.to_string();
        for name in ["auto", "embedded", "mlx", "ollama", "openai"] {
            assert!(message.contains(name), "{message}");
        }
    }

    #[test]
    fn metrics_listen_on_loopback_by_default_and_can_be_turned_off() {
        let config = Config::parse_from(["x"]);
        assert_eq!(
            config.metrics_listen,
            MetricsListen(Some("127.0.0.1:9464".parse().unwrap()))
        );
        let off = Config::parse_from(["x", "--metrics-listen", "off"]);
        assert_eq!(off.metrics_listen, MetricsListen(None));
        assert!(Config::try_parse_from(["x", "--metrics-listen", "nowhere"]).is_err());
    }

    #[test]
    fn backends_list_in_order_and_excludes_backend() {
        let config = Config::parse_from(["x", "--backends", "ollama,Embedded"]);
        assert_eq!(
            config.backends,
            [BackendChoice::Ollama, BackendChoice::Embedded]
        );
        assert!(
            Config::try_parse_from(["x", "--backends", "ollama", "--backend", "openai"]).is_err()
        );
    }

    #[test]
    fn tokens_are_trimmed_refused_when_empty_and_never_shown() {
        let config = Config::parse_from(["x", "--auth-token", "  s3cret \n"]);
        let token = config.bearer_token().unwrap().expect("a token");
        assert_eq!(token.expose(), "s3cret");
        assert!(!format!("{config:?}").contains("s3cret"));
        assert!(Config::try_parse_from(["x", "--auth-token", "   "]).is_err());
    }

    #[test]
    fn gpu_layers_read_llama_cpp_forms_and_default_to_unset() {
        let layers = |value: &str| Config::try_parse_from(["x", "--gpu-layers", value]);
        assert_eq!(Config::parse_from(["x"]).gpu_layers, None);
        assert_eq!(layers("0").unwrap().gpu_layers, Some(GpuLayers::Count(0)));
        assert_eq!(layers("33").unwrap().gpu_layers, Some(GpuLayers::Count(33)));
        assert_eq!(layers("all").unwrap().gpu_layers, Some(GpuLayers::All));
        assert_eq!(layers("ALL").unwrap().gpu_layers, Some(GpuLayers::All));
        assert_eq!(layers("-1").unwrap().gpu_layers, Some(GpuLayers::All));
        for bad in ["-2", "auto", "1.5", ""] {
            let message = layers(bad).expect_err(bad).to_string();
            assert!(message.contains("--gpu-layers"), "{bad}: {message}");
        }
    }

    #[test]
    fn durations_read_human_forms() {
        let config = Config::parse_from(["x", "--probe-interval", "250ms"]);
        assert_eq!(config.probe_interval, Duration::from_millis(250));
    }
}
