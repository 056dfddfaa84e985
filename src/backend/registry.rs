//! The configured backends, which one is active, and what the last health
//! probe of each said. `auto` selection follows the Rigger research's order:
//! explicit choice, then (once it exists) MLX on Apple Silicon, then Ollama
//! when reachable, then a configured OpenAI-compatible server when reachable,
//! then the embedded engine, loaded only when chosen.

use std::{
    sync::{Arc, Mutex, RwLock},
    time::{Duration, Instant},
};

use futures_util::{StreamExt, future::join_all};

use super::{
    Backend, BackendError, Capabilities, Chunk, GenerationRequest, Message, ProbeReport, Role,
    Sampling,
    embedded::{EmbeddedBackend, EmbeddedSettings, EngineShape, LoadError},
    ollama::{OllamaBackend, OllamaSettings},
    openai::{OpenAiBackend, OpenAiSettings},
};
use crate::config::{BackendChoice, Config};

#[derive(Debug, thiserror::Error)]
pub enum SelectionError {
    #[error("INFERENCE_BACKEND=openai needs OPENAI_BASE_URL (e.g. http://127.0.0.1:8080/v1)")]
    OpenAiWithoutUrl,
    #[error(transparent)]
    Embedded(#[from] LoadError),
    #[error("cannot build the HTTP client for backends: {0}")]
    HttpClient(#[from] reqwest::Error),
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
}

impl Entry {
    fn new(backend: Arc<dyn Backend>) -> Self {
        Self {
            backend,
            state: RwLock::new(ProbeState {
                health: BackendHealth::Unknown,
                report: ProbeReport::default(),
                last_error: None,
            }),
            last_generated: Mutex::new(None),
        }
    }

    fn mark_generated(&self) {
        *self
            .last_generated
            .lock()
            .unwrap_or_else(|poison| poison.into_inner()) = Some(Instant::now());
    }

    fn generated_within(&self, interval: Duration) -> bool {
        self.last_generated
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
            .is_some_and(|at| at.elapsed() < interval)
    }
}

/// Readiness by generation: how often the active backend must prove it
/// can generate, and how long the proof may take.
#[derive(Clone, Copy, Debug)]
pub struct GenerationCheck {
    pub interval: Duration,
    pub timeout: Duration,
}

async fn load_embedded(config: &Config) -> Result<Arc<dyn Backend>, LoadError> {
    let backend = EmbeddedBackend::load(EmbeddedSettings {
        model_path: config.embedded_model_path(),
        model_name: config.model.clone(),
        shape: EngineShape {
            parallel: config.parallel,
            ctx_per_sequence: config.ctx_per_sequence,
            batch_tokens: config.batch_tokens,
            threads: config.embedded_threads() as i32,
            flash_attention: config.flash_attention,
        },
        queue: config.queue,
    })
    .await?;
    Ok(Arc::new(backend))
}

pub struct BackendRegistry {
    entries: Vec<Entry>,
    active: usize,
    probe_timeout: Duration,
}

impl BackendRegistry {
    /// Builds the configured backends and picks the active one; `auto` probes
    /// the candidates, so the chosen backend's first probe is already done.
    pub async fn from_config(config: &Config) -> Result<Self, SelectionError> {
        let client = reqwest::Client::builder()
            .connect_timeout(config.connect_timeout)
            .read_timeout(config.backend_idle_timeout)
            .tcp_nodelay(true)
            .build()?;
        let ollama: Arc<dyn Backend> = Arc::new(OllamaBackend::new(
            client.clone(),
            OllamaSettings {
                host: config.ollama_host.clone(),
                model: config.model.clone(),
                keep_alive: config.ollama_keep_alive.clone(),
                probe_timeout: config.probe_timeout,
            },
        ));
        let openai: Option<Arc<dyn Backend>> = config.openai_base_url.as_ref().map(|url| {
            Arc::new(OpenAiBackend::new(
                client.clone(),
                OpenAiSettings {
                    base_url: url.clone(),
                    api_key: config.openai_api_key.clone(),
                    model: config.model.clone(),
                    probe_timeout: config.probe_timeout,
                },
            )) as Arc<dyn Backend>
        });
        let explicit = |backend: Arc<dyn Backend>| vec![backend];
        let registry = match config.backend {
            BackendChoice::Ollama => Self::new(explicit(ollama), 0, config.probe_timeout),
            BackendChoice::Openai => Self::new(
                explicit(openai.ok_or(SelectionError::OpenAiWithoutUrl)?),
                0,
                config.probe_timeout,
            ),
            BackendChoice::Embedded => Self::new(
                explicit(load_embedded(config).await?),
                0,
                config.probe_timeout,
            ),
            BackendChoice::Auto => {
                let candidates: Vec<Arc<dyn Backend>> =
                    std::iter::once(ollama).chain(openai).collect();
                let mut registry = Self::new(candidates, 0, config.probe_timeout);
                registry.probe_all().await;
                match registry.first_serving() {
                    Some(serving) => registry.active = serving,
                    None => match load_embedded(config).await {
                        Ok(embedded) => {
                            registry.entries.push(Entry::new(embedded));
                            registry.active = registry.entries.len() - 1;
                        }
                        Err(error) => {
                            tracing::warn!(%error, "no runtime answers and the embedded engine cannot start");
                            registry.active = registry.entries.len() - 1;
                        }
                    },
                }
                registry
            }
        };
        // Start from the state of every backend, so a freshly loaded engine
        // is ready at once.
        registry.probe_all().await;
        tracing::info!(
            backend = registry.active().name(),
            endpoint = %registry.active().endpoint(),
            "active backend selected"
        );
        Ok(registry)
    }

    /// A registry over given backends; `active` indexes `backends`.
    pub fn new(backends: Vec<Arc<dyn Backend>>, active: usize, probe_timeout: Duration) -> Self {
        assert!(active < backends.len(), "active backend index out of range");
        let entries = backends.into_iter().map(Entry::new).collect();
        Self {
            entries,
            active,
            probe_timeout,
        }
    }

    pub fn active(&self) -> Arc<dyn Backend> {
        self.entries[self.active].backend.clone()
    }

    fn first_serving(&self) -> Option<usize> {
        self.snapshots()
            .iter()
            .position(|snapshot| snapshot.health == BackendHealth::Serving)
    }

    /// Probes every backend at once and records the results.
    pub async fn probe_all(&self) -> Vec<BackendSnapshot> {
        join_all(self.entries.iter().map(|entry| async move {
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

    /// Records that the active backend completed a generation: proof enough
    /// that it works, so no test generation is needed for a while.
    pub fn generated(&self) {
        self.entries[self.active].mark_generated();
    }

    /// Makes the active backend generate one token unless it completed a
    /// generation within `check.interval`; a failure marks it NOT_SERVING
    /// until a later check or probe succeeds. A backend too busy to take
    /// the test is alive: busy is not down.
    pub async fn check_generation(&self, check: GenerationCheck) {
        let entry = &self.entries[self.active];
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
        self.entries
            .iter()
            .enumerate()
            .map(|(index, entry)| {
                let state = entry
                    .state
                    .read()
                    .unwrap_or_else(|poison| poison.into_inner());
                BackendSnapshot {
                    name: entry.backend.name(),
                    endpoint: entry.backend.endpoint(),
                    active: index == self.active,
                    health: state.health,
                    default_model: state.report.default_model.clone(),
                    models: state.report.models.clone(),
                    capabilities: entry.backend.capabilities(),
                    last_error: state.last_error.clone(),
                }
            })
            .collect()
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
