//! The gRPC edge: the inference service, health, reflection, logging and
//! graceful shutdown.
//!
//! [`serve`] takes a bound listener and a shutdown future, so `main` and the
//! tests start the server the same way.

mod admission;
pub mod auth;
mod deadline;
mod drain;
pub mod health;
mod metrics;
mod rpc;
mod service;
mod status;
mod telemetry;
pub(crate) mod validate;

use std::{future::Future, sync::Arc};

use futures_util::StreamExt;
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Certificate, Identity, Server, ServerTlsConfig};

pub use admission::{AdmissionLimits, PRIORITY_HEADER, RETRY_AFTER};
pub use deadline::DeadlinePolicy;
use metrics::{Metrics, Snapshot};
pub use service::InferenceApi;
use service::{Backends, Shared};
pub use telemetry::TelemetryError;
pub use validate::{Limits, ValidationError};

use crate::{
    backend::{Backend, BackendRegistry, FailoverPolicy, GenerationCheck, SelectionError},
    config::{Config, LogFormat, TelemetryConfig},
    proto::{self, inference_service_server::InferenceServiceServer},
    task::{CacheSettings, TaskRunner},
};

/// How long open streams get to send their cancellation summary after the
/// grace period, and the transport to close, before connections are dropped.
const CUT_FLUSH: std::time::Duration = std::time::Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error(transparent)]
    Selection(#[from] SelectionError),
    #[error("cannot listen on {address}: {source}")]
    Bind {
        address: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error("gRPC transport failed: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error("cannot build the reflection service: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    #[error("{0}")]
    Auth(String),
    #[error("TLS: {0}")]
    Tls(String),
    #[error(transparent)]
    Telemetry(#[from] TelemetryError),
}

/// Installs the global tracing subscriber; `RUST_LOG` filters (default `info`).
pub fn init_tracing(format: LogFormat) {
    subscribe(format, None);
}

/// Installs the global tracing subscriber as [`init_tracing`] does; with an
/// OTLP endpoint, tracing's spans and events are exported too
/// (`tracing-opentelemetry`), each call's under its SERVER span. An
/// exporter that cannot be built is left to [`serve`] to report.
pub fn init_tracing_with_export(format: LogFormat, settings: &TelemetryConfig) -> TracingExport {
    let exported = settings
        .otlp_endpoint
        .as_ref()
        .and_then(|_| telemetry::Telemetry::start(settings).ok());
    subscribe(format, exported.as_ref());
    TracingExport(exported)
}

fn subscribe(format: LogFormat, exported: Option<&telemetry::Telemetry>) {
    use tracing_subscriber::{
        Layer, filter::filter_fn, fmt, layer::SubscriberExt, util::SubscriberInitExt,
    };

    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let export = exported.map(|telemetry| {
        tracing_opentelemetry::layer()
            .with_tracer(telemetry.tracer())
            // Backend requests keep naming the call's SERVER span as their
            // parent, as they do without this layer.
            .with_context_activation(false)
            // The exporter's own events would feed back into it.
            .with_filter(filter_fn(|metadata| {
                !metadata.target().starts_with("opentelemetry")
            }))
    });
    let registry = tracing_subscriber::registry().with(filter).with(export);
    match format {
        LogFormat::Text => registry.with(fmt::layer()).init(),
        LogFormat::Json => registry.with(fmt::layer().json()).init(),
    }
}

/// The export [`init_tracing_with_export`] started, flushed before the process exits.
pub struct TracingExport(Option<telemetry::Telemetry>);

impl TracingExport {
    pub async fn shutdown(self) {
        if let Some(telemetry) = self.0 {
            telemetry.shutdown().await;
        }
    }
}

/// Binds the configured address and serves until SIGTERM or SIGINT.
pub async fn run(config: Config) -> Result<(), ServerError> {
    let listener = TcpListener::bind(config.listen)
        .await
        .map_err(|source| ServerError::Bind {
            address: config.listen,
            source,
        })?;
    tracing::info!(address = %config.listen, "listening");
    serve(listener, config, termination()).await
}

async fn termination() {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut terminate) => {
                tokio::select! {
                    _ = interrupt => {}
                    _ = terminate.recv() => {}
                }
            }
            Err(error) => {
                tracing::warn!(%error, "cannot watch SIGTERM; stopping on SIGINT only");
                let _ = interrupt.await;
            }
        }
    }
    #[cfg(not(unix))]
    let _ = interrupt.await;
    tracing::info!("shutdown requested");
}

/// The gRPC port's TLS settings, when a certificate is configured.
fn tls_config(config: &Config) -> Result<Option<ServerTlsConfig>, ServerError> {
    let (Some(cert), Some(key)) = (&config.tls_cert, &config.tls_key) else {
        return Ok(None);
    };
    let read = |path: &std::path::PathBuf| {
        std::fs::read(path)
            .map_err(|error| ServerError::Tls(format!("cannot read {}: {error}", path.display())))
    };
    let mut tls = ServerTlsConfig::new().identity(Identity::from_pem(read(cert)?, read(key)?));
    if let Some(ca) = &config.tls_client_ca {
        tls = tls.client_ca_root(Certificate::from_pem(read(ca)?));
    }
    Ok(Some(tls))
}

/// Serves on `listener` until `shutdown` completes, then drains: health goes
/// NOT_SERVING, new calls are refused, open calls get the grace period.
///
/// Health and reflection answer from the start; the backends are selected
/// (and the embedded model loaded) meanwhile, with readiness NOT_SERVING
/// and inference calls refused with UNAVAILABLE until that is done. A
/// selection that fails stops the server with its error.
pub async fn serve(
    listener: TcpListener,
    config: Config,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServerError> {
    let selecting = {
        let config = config.clone();
        async move { BackendRegistry::from_config(&config).await }
    };
    serve_selected(listener, config, selecting, shutdown).await
}

/// Serves like [`serve`], with `backends` (in failover order) instead of
/// those the configuration selects: for benchmarks and for programs that
/// embed the service with a runtime of their own.
pub async fn serve_backends(
    listener: TcpListener,
    config: Config,
    backends: Vec<Arc<dyn Backend>>,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServerError> {
    let registry = BackendRegistry::new(
        backends,
        config.probe_timeout,
        FailoverPolicy::from_config(&config),
    );
    serve_selected(listener, config, async { Ok(registry) }, shutdown).await
}

async fn serve_selected(
    listener: TcpListener,
    config: Config,
    selecting: impl Future<Output = Result<BackendRegistry, SelectionError>> + Send,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServerError> {
    let telemetry = telemetry::Telemetry::start(&config.telemetry)?;
    let served = serve_calls(listener, config, selecting, shutdown, telemetry.clone()).await;
    telemetry.shutdown().await;
    served
}

async fn serve_calls(
    listener: TcpListener,
    config: Config,
    selecting: impl Future<Output = Result<BackendRegistry, SelectionError>> + Send,
    shutdown: impl Future<Output = ()> + Send,
    telemetry: telemetry::Telemetry,
) -> Result<(), ServerError> {
    let selecting = async move { selecting.await.map(Arc::new) };
    tokio::pin!(shutdown);
    let board = health::HealthBoard::starting();
    let backends: Backends = Arc::default();
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let drain = drain::Drain::default();
    let admission = admission::Admission::new(AdmissionLimits {
        max_in_flight: config.admitted_generations(),
        max_queue: config.max_queue,
    });
    let runner = TaskRunner::new(
        config.task_attempts,
        CacheSettings {
            entries: config.task_cache_entries,
            ttl: config.task_cache_ttl,
        },
    );
    let metrics = Arc::new(Metrics::default());
    // Stops the metrics endpoint whichever way this function returns.
    let _stop_metrics = match config.metrics_listen.0 {
        Some(address) => {
            let listener = TcpListener::bind(address)
                .await
                .map_err(|source| ServerError::Bind { address, source })?;
            tracing::info!(%address, "serving metrics at /metrics");
            let render = {
                let (metrics, admission, backends, runner) = (
                    metrics.clone(),
                    admission.clone(),
                    backends.clone(),
                    runner.clone(),
                );
                Arc::new(move || {
                    metrics.render(&Snapshot {
                        admission: admission.stats(),
                        backends: backends
                            .get()
                            .map(|registry| registry.snapshots())
                            .unwrap_or_default(),
                        caches: runner.cache_stats(),
                    })
                })
            };
            let stop = CancellationToken::new();
            tokio::spawn(metrics::serve(listener, render, stop.clone()));
            Some(stop.drop_guard())
        }
        None => None,
    };
    let api = InferenceApi::new(Shared {
        registry: backends.clone(),
        deadlines: DeadlinePolicy {
            default: config.default_deadline,
            max: config.max_deadline,
        },
        admission,
        runner,
        limits: Limits {
            default_max_tokens: config.default_max_tokens,
            task_max_tokens: config.task_max_tokens,
            max_tokens_limit: config.max_tokens_limit,
            max_prompt_bytes: config.max_prompt_bytes,
        },
        drain: drain.clone(),
        metrics,
        telemetry,
    });
    let token = config.bearer_token().map_err(ServerError::Auth)?;
    let exempt = &config.auth_exempt;
    let stop_transport = CancellationToken::new();
    let mut builder = Server::builder();
    if let Some(tls) = tls_config(&config)? {
        builder = builder
            .tls_config(tls)
            .map_err(|error| ServerError::Tls(error.to_string()))?;
    }
    let server = builder
        .add_service(auth::guarded(
            health::HealthServer::from_arc(board.clone()),
            token.as_ref(),
            exempt,
        ))
        .add_service(auth::guarded(
            reflection().build_v1()?,
            token.as_ref(),
            exempt,
        ))
        .add_service(auth::guarded(
            reflection().build_v1alpha()?,
            token.as_ref(),
            exempt,
        ))
        .add_service(auth::guarded(
            InferenceServiceServer::new(api).max_decoding_message_size(config.max_message_bytes),
            token.as_ref(),
            exempt,
        ))
        .serve_with_incoming_shutdown(
            TcpListenerStream::new(listener).map(|connection| {
                connection.inspect(|stream| {
                    if let Err(error) = stream.set_nodelay(true) {
                        tracing::warn!(%error, "cannot turn off Nagle's algorithm");
                    }
                })
            }),
            stop_transport.clone().cancelled_owned(),
        );
    tokio::pin!(server);

    let selected = tokio::select! {
        result = &mut server => return result.map_err(ServerError::from),
        () = &mut shutdown => None,
        selected = selecting => Some(selected),
    };
    let registry = match selected {
        Some(Ok(registry)) => registry,
        unfinished => {
            board.shutting_down();
            stop_transport.cancel();
            let _ = tokio::time::timeout(CUT_FLUSH, &mut server).await;
            return match unfinished {
                Some(Err(error)) => Err(error.into()),
                _ => Ok(()),
            };
        }
    };
    board.register(&registry);
    let _ = backends.set(registry.clone());
    let stop_probing = CancellationToken::new();
    let generation_check =
        (!config.readiness_generation_interval.is_zero()).then_some(GenerationCheck {
            interval: config.readiness_generation_interval,
            timeout: config.readiness_generation_timeout,
        });
    let prober = tokio::spawn(health::probe_until(
        registry,
        board.clone(),
        config.probe_interval,
        generation_check,
        stop_probing.clone(),
    ));

    tokio::select! {
        result = &mut server => {
            stop_probing.cancel();
            return result.map_err(ServerError::from);
        }
        () = &mut shutdown => {}
    }
    stop_probing.cancel();
    let _ = prober.await;
    board.shutting_down();
    tracing::info!(grace = ?config.shutdown_grace, "draining open calls");
    // The transport keeps accepting meanwhile, so late callers get a clear
    // UNAVAILABLE rather than a connection refused.
    tokio::select! {
        result = &mut server => return result.map_err(ServerError::from),
        () = drain.run(config.shutdown_grace, CUT_FLUSH) => {}
    }
    stop_transport.cancel();
    match tokio::time::timeout(CUT_FLUSH, &mut server).await {
        Ok(result) => result.map_err(ServerError::from),
        Err(_) => Ok(()),
    }
}
