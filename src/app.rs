//! Building the service from its configuration: the one place that reads a
//! [`Config`] and turns it into what each layer takes — the backends and
//! their failover order, circuit and retry policies, the MLX worker's
//! settings, authentication, TLS and the gRPC edge's limits. Backends, the
//! registry and the server know plain settings only, never `Config`.
//!
//! `auto` follows the Rigger research's order: MLX where it is accelerated
//! (Apple Silicon, or a CUDA build) and mlx-lm imports, then Ollama when
//! reachable, then a configured OpenAI-compatible server when reachable,
//! then the embedded engine, loaded only when nothing else answers.

use std::{future::Future, path::PathBuf, sync::Arc, time::Duration};

use tokio::net::TcpListener;
use tonic::transport::{Certificate, Identity, ServerTlsConfig};

use crate::{
    backend::{
        Backend, BackendRegistry, BackendSnapshot, BreakerPolicy, FailoverPolicy, GenerationCheck,
        KeepAlive, ResidencyPolicy, SelectionError,
        catalog::{self, Catalog},
        embedded::{self, EmbeddedBackend, EmbeddedSettings, EngineShape},
        instances::{
            InstanceFactory, InstancePool, PoolSettings,
            discovery::Dns,
            prefix::PrefixSettings,
            routing::{PrefixRule, Routing},
        },
        mlx::{self, MlxBackend, MlxSettings, WorkerSettings},
        ollama::{self, OllamaBackend, OllamaSettings},
        openai::{OpenAiBackend, OpenAiSettings},
        residency,
    },
    config::{BackendChoice, Config, GpuLayers, MemoryBudget, RoutingChoice, cache_dir},
    meaning::Meaning,
    server::{
        self, AdmissionLimits, DeadlinePolicy, Limits, RoleModels, ServerError, ServerSettings,
        auth::BearerToken,
    },
    task::{CacheSettings, OnTopic, TaskRunner},
};

/// Longest wait between restarts of an MLX worker that keeps dying.
const MLX_MAX_RESTART_BACKOFF: Duration = Duration::from_secs(30);

/// Binds the configured address and serves until SIGTERM or SIGINT.
pub async fn run(config: Config) -> Result<(), ServerError> {
    let listener = TcpListener::bind(config.listen)
        .await
        .map_err(|source| ServerError::Bind {
            address: config.listen,
            source,
        })?;
    tracing::info!(address = %config.listen, "listening");
    serve(listener, config, server::termination()).await
}

/// Serves on `listener` with the backends the configuration selects, until
/// `shutdown` completes (see [`server::serve_with`]).
pub async fn serve(
    listener: TcpListener,
    config: Config,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServerError> {
    let settings = server_settings(&config)?;
    let selecting = async move { select_backends(&config).await };
    server::serve_with(listener, settings, selecting, shutdown).await
}

/// Serves like [`serve`], with `backends` (in failover order) instead of
/// those the configuration selects: for tests, benchmarks and programs that
/// embed the service with a runtime of their own.
pub async fn serve_backends(
    listener: TcpListener,
    config: Config,
    backends: Vec<Arc<dyn Backend>>,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServerError> {
    let settings = server_settings(&config)?;
    let registry = BackendRegistry::new(backends, config.probe_timeout, failover_policy(&config));
    server::serve_with(listener, settings, async { Ok(registry) }, shutdown).await
}

/// Everything the gRPC edge needs, from the configuration.
pub fn server_settings(config: &Config) -> Result<ServerSettings, ServerError> {
    let token = config.bearer_token().map_err(ServerError::Auth)?;
    Ok(ServerSettings {
        admission: AdmissionLimits {
            max_in_flight: config.admitted_generations(),
            max_queue: config.max_queue,
        },
        deadlines: DeadlinePolicy {
            default: config.default_deadline,
            max: config.max_deadline,
        },
        limits: Limits {
            default_max_tokens: config.default_max_tokens,
            task_max_tokens: config.task_max_tokens,
            max_prompt_bytes: config.max_prompt_bytes,
            max_tokens_limit: config.max_tokens_limit,
            role_models: RoleModels {
                enhance: config.enhance_model.clone(),
                decompose: config.decompose_model.clone(),
                generate: config.generate_model.clone(),
            },
        },
        runner: TaskRunner::new(
            config.task_attempts,
            CacheSettings {
                entries: config.task_cache_entries,
                ttl: config.task_cache_ttl,
            },
            on_topic(config)?,
        ),
        metrics_listen: config.metrics_listen.0,
        auth_token: token.map(|secret| BearerToken::new(secret.expose())),
        auth_exempt: config.auth_exempt.clone(),
        tls: tls(config)?,
        max_message_bytes: config.max_message_bytes,
        probe_interval: config.probe_interval,
        generation_check: (!config.readiness_generation_interval.is_zero()).then_some(
            GenerationCheck {
                interval: config.readiness_generation_interval,
                timeout: config.readiness_generation_timeout,
            },
        ),
        shutdown_grace: config.shutdown_grace,
        telemetry: config.telemetry.clone(),
    })
}

/// The on-topic check: semantic with the configured model; lexical when it
/// is turned off, or when the default model is not there (a model named
/// explicitly must load).
fn on_topic(config: &Config) -> Result<OnTopic, ServerError> {
    if config.on_topic_similarity == 0.0 {
        return Ok(OnTopic::lexical());
    }
    let path = config.topic_model_path();
    match Meaning::load(&path) {
        Ok(meaning) => Ok(OnTopic::semantic(
            Arc::new(meaning),
            config.on_topic_similarity as f32,
        )),
        Err(error) if config.topic_model.is_none() => {
            tracing::warn!(%error, "no on-topic model: parts of answers are held to their task by shared words only (`make` installs the model)");
            Ok(OnTopic::lexical())
        }
        Err(error) => Err(ServerError::TopicModel(error)),
    }
}

/// The gRPC port's TLS settings, when a certificate is configured.
fn tls(config: &Config) -> Result<Option<ServerTlsConfig>, ServerError> {
    let (Some(cert), Some(key)) = (&config.tls_cert, &config.tls_key) else {
        return Ok(None);
    };
    let read = |path: &PathBuf| {
        std::fs::read(path)
            .map_err(|error| ServerError::Tls(format!("cannot read {}: {error}", path.display())))
    };
    let mut tls = ServerTlsConfig::new().identity(Identity::from_pem(read(cert)?, read(key)?));
    if let Some(ca) = &config.tls_client_ca {
        tls = tls.client_ca_root(Certificate::from_pem(read(ca)?));
    }
    Ok(Some(tls))
}

/// How calls move between backends.
pub fn failover_policy(config: &Config) -> FailoverPolicy {
    FailoverPolicy {
        breaker: BreakerPolicy {
            failures: config.breaker_failures,
            cooldown: config.breaker_cooldown,
        },
        retries: config.retries,
        backoff: config.retry_backoff,
    }
}

/// The configured backends in failover order, built (and loaded) now, each
/// probed once so a freshly loaded engine is ready at once.
pub async fn select_backends(config: &Config) -> Result<BackendRegistry, SelectionError> {
    let candidates = HttpBackends::new(config)?;
    let (order, skipped) = match (config.backend, config.backends.as_slice()) {
        (BackendChoice::Auto, []) => auto_order(config, candidates).await,
        (single, []) => (vec![candidates.build(single, config).await?], Vec::new()),
        (_, listed) => (listed_order(config, &candidates, listed).await?, Vec::new()),
    };
    let registry = BackendRegistry::new(order, config.probe_timeout, failover_policy(config))
        .with_skipped(skipped);
    let snapshots = registry.probe_all().await;
    for snapshot in &snapshots {
        tracing::info!(
            backend = snapshot.name,
            endpoint = %snapshot.endpoint,
            health = ?snapshot.health,
            active = snapshot.active,
            "backend configured"
        );
    }
    held_models_exist(config, &snapshots)?;
    Ok(registry)
}

/// Every `--pin` and `--preload` names a model a backend that holds models
/// itself serves: each such backend loads the ones it serves, so a name
/// none serves would otherwise be ignored.
fn held_models_exist(config: &Config, snapshots: &[BackendSnapshot]) -> Result<(), SelectionError> {
    let held: Vec<&str> = snapshots
        .iter()
        .filter(|snapshot| snapshot.residency.is_some())
        .flat_map(|snapshot| snapshot.models.iter().map(String::as_str))
        .collect();
    let missing = config
        .pin
        .iter()
        .chain(&config.preload)
        .find(|model| !held.contains(&model.as_str()));
    match missing {
        None => Ok(()),
        Some(model) => Err(SelectionError::UnknownHeldModel {
            model: model.clone(),
            closest: catalog::closest_names(model, held.iter().copied()),
        }),
    }
}

/// The backends reached over HTTP, which cost nothing to build: Ollama
/// always (at its default address unless configured), the OpenAI-compatible
/// server when its URL is set.
struct HttpBackends {
    ollama: Arc<dyn Backend>,
    openai: Option<Arc<dyn Backend>>,
}

impl HttpBackends {
    fn new(config: &Config) -> Result<Self, SelectionError> {
        let client = reqwest::Client::builder()
            .connect_timeout(config.connect_timeout)
            .read_timeout(config.backend_idle_timeout)
            .tcp_nodelay(true)
            .build()?;
        let ollama_settings = {
            let client = client.clone();
            let model = config.model.clone();
            let keep_alive = config.ollama_keep_alive.clone();
            let probe_timeout = config.probe_timeout;
            move |host: &str| -> Arc<dyn Backend> {
                Arc::new(OllamaBackend::new(
                    client.clone(),
                    OllamaSettings {
                        host: host.to_owned(),
                        model: model.clone(),
                        keep_alive: keep_alive.clone(),
                        probe_timeout,
                    },
                ))
            }
        };
        let ollama_targets: Vec<String> = config
            .ollama_host
            .iter()
            .map(|host| ollama::base_url_from_host(host))
            .collect();
        let ollama = instance_pool(config, &ollama_targets, Box::new(ollama_settings))?;
        let openai = if config.openai_base_url.is_empty() {
            None
        } else {
            let api_key = config.openai_api_key.clone();
            let model = config.model.clone();
            let probe_timeout = config.probe_timeout;
            let build = move |url: &str| -> Arc<dyn Backend> {
                Arc::new(OpenAiBackend::new(
                    client.clone(),
                    OpenAiSettings {
                        base_url: url.to_owned(),
                        api_key: api_key.clone(),
                        model: model.clone(),
                        probe_timeout,
                    },
                ))
            };
            Some(instance_pool(
                config,
                &config.openai_base_url,
                Box::new(build),
            )?)
        };
        Ok(Self { ollama, openai })
    }

    /// The backend named by `choice`, built (or loaded) now.
    async fn build(
        &self,
        choice: BackendChoice,
        config: &Config,
    ) -> Result<Arc<dyn Backend>, SelectionError> {
        match choice {
            BackendChoice::Auto => Err(SelectionError::AutoInList),
            BackendChoice::Ollama => Ok(self.ollama.clone()),
            BackendChoice::Openai => self.openai.clone().ok_or(SelectionError::OpenAiWithoutUrl),
            BackendChoice::Embedded => load_embedded(config).await,
            BackendChoice::Mlx => load_mlx(config).await,
        }
    }
}

/// The instances at `targets` (found again every discovery interval), each
/// built by `build`, routed by `--routing`.
fn instance_pool(
    config: &Config,
    targets: &[String],
    build: InstanceFactory,
) -> Result<Arc<dyn Backend>, SelectionError> {
    let discover = Dns::new(targets).map_err(SelectionError::Targets)?;
    let first = targets
        .first()
        .ok_or_else(|| SelectionError::Targets("no target".to_owned()))?;
    let kind = build(first);
    Ok(Arc::new(InstancePool::new(
        kind.name(),
        targets.join(","),
        kind.capabilities(),
        Box::new(discover),
        build,
        PoolSettings {
            routing: routing(config),
            prefix: PrefixSettings {
                block_bytes: config.prefix_block_bytes as usize,
                capacity: config.prefix_capacity,
                ttl: config.prefix_ttl,
            },
            breaker: failover_policy(config).breaker,
            discovery_interval: config.discovery_interval,
            probe_timeout: config.probe_timeout,
        },
    )))
}

fn routing(config: &Config) -> Routing {
    match config.routing {
        RoutingChoice::Prefix => Routing::Prefix(PrefixRule {
            min_match: config.prefix_min_match,
            max_load_gap: config.prefix_max_load_gap,
        }),
        RoutingChoice::LeastLoaded => Routing::LeastLoaded,
        RoutingChoice::Session => Routing::Session,
        RoutingChoice::RoundRobin => Routing::RoundRobin,
    }
}

/// `--backends`: each listed backend, in order, once.
async fn listed_order(
    config: &Config,
    candidates: &HttpBackends,
    listed: &[BackendChoice],
) -> Result<Vec<Arc<dyn Backend>>, SelectionError> {
    let mut order: Vec<Arc<dyn Backend>> = Vec::with_capacity(listed.len());
    for choice in listed {
        let backend = candidates.build(*choice, config).await?;
        if order.iter().any(|earlier| earlier.name() == backend.name()) {
            return Err(SelectionError::Repeated(backend.name()));
        }
        order.push(backend);
    }
    Ok(order)
}

/// `auto`: MLX where preferred, Ollama, the OpenAI-compatible server, and
/// the embedded engine only when none of those answers a probe. Returns the
/// order and the backends left out, with the reason.
async fn auto_order(
    config: &Config,
    candidates: HttpBackends,
) -> (Vec<Arc<dyn Backend>>, Vec<(&'static str, String)>) {
    let mut skipped = Vec::new();
    let mlx = match auto_mlx(config).await {
        Ok(mlx) => Some(mlx),
        Err(reason) => {
            tracing::info!(%reason, "MLX skipped");
            skipped.push(("mlx", reason));
            None
        }
    };
    let order: Vec<Arc<dyn Backend>> = mlx
        .into_iter()
        .chain([candidates.ollama])
        .chain(candidates.openai)
        .collect();
    let probed = BackendRegistry::new(order.clone(), config.probe_timeout, failover_policy(config));
    if probed
        .probe_all()
        .await
        .iter()
        .any(BackendSnapshot::serving)
    {
        return (order, skipped);
    }
    match load_embedded(config).await {
        Ok(embedded) => (order.into_iter().chain([embedded]).collect(), skipped),
        Err(error) => {
            tracing::warn!(%error, "no runtime answers and the embedded engine cannot start");
            (order, skipped)
        }
    }
}

/// The MLX backend when `auto` should use it here, else why not.
async fn auto_mlx(config: &Config) -> Result<Arc<dyn Backend>, String> {
    mlx::preferred(&mlx_worker(config).python).await?;
    load_mlx(config).await.map_err(|error| {
        tracing::warn!(%error, "MLX preferred here but cannot start");
        error.to_string()
    })
}

async fn load_embedded(config: &Config) -> Result<Arc<dyn Backend>, SelectionError> {
    // `--model`, else the catalog's name for the file.
    let default_model = config
        .model
        .clone()
        .unwrap_or_else(|| catalog::model_name(&config.embedded_model_path()));
    let backend = EmbeddedBackend::load(EmbeddedSettings {
        catalog: model_catalog(
            config,
            (default_model.clone(), config.embedded_model_path()),
        )
        .await?,
        default_model,
        preload: config.preload.clone(),
        residency: residency_policy(config),
        shape: EngineShape {
            parallel: config.parallel,
            ctx_per_sequence: config.ctx_per_sequence,
            batch_tokens: config.batch_tokens,
            threads: config.embedded_threads() as i32,
            flash_attention: config.flash_attention,
        },
        gpu_layers: config.gpu_layers.map(|layers| match layers {
            GpuLayers::All => embedded::GpuLayers::All,
            GpuLayers::Count(layers) => embedded::GpuLayers::Count(layers),
        }),
        backend_dir: config.ggml_backend_dir.clone(),
        queue: config.queue,
    })
    .await?;
    Ok(Arc::new(backend))
}

/// The models on disk: `--models-dir`, the `--models` aliases and a
/// backend's default model (`(name, path)`), plus a Hugging Face cache when
/// one is configured. Reading headers blocks (a model on a slow disk, a
/// pipe): done off the async threads.
async fn model_catalog(
    config: &Config,
    default: (String, PathBuf),
) -> Result<Catalog, SelectionError> {
    let mut aliases = config.models.clone();
    if !aliases.iter().any(|(name, _)| *name == default.0) {
        aliases.push(default);
    }
    let dir = config.models_dir();
    let hf_cache = config.hf_cache.clone();
    let (catalog, skipped) = tokio::task::spawn_blocking(move || {
        Catalog::scan(
            dir.is_dir().then_some(dir.as_path()),
            &aliases,
            hf_cache.as_deref(),
        )
    })
    .await
    .map_err(|error| SelectionError::CatalogTask(error.to_string()))??;
    for skipped in skipped {
        tracing::warn!(path = %skipped.path.display(), reason = %skipped.reason, "not a model; skipped");
    }
    Ok(catalog)
}

/// How backends that hold models themselves keep them.
fn residency_policy(config: &Config) -> ResidencyPolicy {
    let physical = residency::physical_memory();
    if physical.is_none() && matches!(config.model_memory, MemoryBudget::Share(_)) {
        tracing::warn!("physical memory unknown: RIGGER_MODEL_MEMORY as a share sets no limit");
    }
    ResidencyPolicy {
        memory_budget: physical.map_or(u64::MAX, |bytes| config.model_memory.bytes(bytes)),
        max_loaded: config.max_loaded_models as usize,
        keep_alive: config
            .keep_alive
            .0
            .map_or(KeepAlive::Forever, KeepAlive::Idle),
        pinned: config.pin.clone(),
    }
}

async fn load_mlx(config: &Config) -> Result<Arc<dyn Backend>, SelectionError> {
    let worker = mlx_worker(config);
    let catalog = model_catalog(config, (worker.model_name.clone(), worker.model.clone())).await?;
    let backend = MlxBackend::start(MlxSettings {
        worker,
        catalog,
        preload: config.preload.clone(),
        residency: residency_policy(config),
        ctx_per_sequence: config.ctx_per_sequence,
    })
    .await
    .map_err(SelectionError::Mlx)?;
    Ok(Arc::new(backend))
}

/// The MLX worker's settings, resolved against the cache directory.
pub fn mlx_worker(config: &Config) -> WorkerSettings {
    let model = config
        .mlx_model
        .clone()
        .unwrap_or_else(|| config.embedded_model_path());
    WorkerSettings {
        python: config
            .mlx_python
            .clone()
            .unwrap_or_else(|| cache_dir().join("venv/bin/python")),
        model_name: config
            .model
            .clone()
            .unwrap_or_else(|| catalog::model_name(&model)),
        model,
        cache_dir: cache_dir().join("mlx"),
        max_batch: config.mlx_max_batch,
        prefill_step: config.mlx_prefill_step,
        blas: match &config.mlx_blas {
            Some(path) if path.as_os_str() == "off" => None,
            Some(path) => Some(path.clone()),
            None => default_blas(),
        },
        start_timeout: config.mlx_start_timeout,
        restart_backoff: config.mlx_restart_backoff,
        max_restart_backoff: MLX_MAX_RESTART_BACKOFF,
    }
}

/// An OpenBLAS for the MLX worker's fast path on Linux: the one setup
/// extracts into the cache, else the system's; none elsewhere.
fn default_blas() -> Option<PathBuf> {
    if !cfg!(target_os = "linux") {
        return None;
    }
    let triplet = format!("{}-linux-gnu", std::env::consts::ARCH);
    [
        cache_dir().join(format!(
            "tools/blas/usr/lib/{triplet}/openblas-pthread/libopenblas.so.0"
        )),
        PathBuf::from(format!("/usr/lib/{triplet}/libopenblas.so.0")),
    ]
    .into_iter()
    .find(|path| path.is_file())
}
