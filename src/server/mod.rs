//! The gRPC edge: the inference service, health, reflection, logging and
//! graceful shutdown.
//!
//! [`serve_with`] takes a bound listener, plain [`ServerSettings`], the
//! backends being selected and a shutdown future, so `main` and the tests
//! start the server the same way (through `crate::app`, which builds the
//! settings from the configuration).

mod admission;
pub mod auth;
mod conversions;
mod deadline;
mod drain;
pub mod health;
mod metrics;
mod rpc;
mod service;
mod session;
mod status;
mod telemetry;
pub(crate) mod validate;

use std::{future::Future, net::SocketAddr, sync::Arc, time::Duration};

use futures_util::StreamExt;
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tokio_util::sync::{CancellationToken, DropGuard};
use tonic::transport::{Server, ServerTlsConfig};

pub use admission::{AdmissionLimits, PRIORITY_HEADER};
pub use deadline::DeadlinePolicy;
use metrics::{Metrics, Snapshot};
pub use service::InferenceApi;
use service::{Backends, Shared};
pub use status::RETRY_AFTER;
pub use telemetry::TelemetryError;
pub use validate::{Limits, RoleModels, ValidationError};

use crate::{
    backend::{BackendRegistry, GenerationCheck, SelectionError},
    config::{LogFormat, TelemetryConfig},
    proto::{self, inference_service_server::InferenceServiceServer},
    task::TaskRunner,
};
pub use auth::BearerToken;

/// How long open streams get to send their cancellation summary after the
/// grace period, and the transport to close, before connections are dropped.
const CUT_FLUSH: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error(transparent)]
    Selection(#[from] SelectionError),
    #[error("cannot listen on {address}: {source}")]
    Bind {
        address: SocketAddr,
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
    #[error("on-topic model: {0}")]
    TopicModel(crate::meaning::MeaningError),
}

/// What the gRPC edge needs to serve, already resolved from the
/// configuration (`crate::app` builds it).
pub struct ServerSettings {
    pub admission: AdmissionLimits,
    pub deadlines: DeadlinePolicy,
    pub limits: Limits,
    /// EnhanceTask/DecomposeTask attempts and their result cache.
    pub runner: TaskRunner,
    /// Where `/metrics` is served; `None`: not served.
    pub metrics_listen: Option<SocketAddr>,
    /// The token every call must present, except to exempt services.
    pub auth_token: Option<BearerToken>,
    pub auth_exempt: Vec<String>,
    pub tls: Option<ServerTlsConfig>,
    pub max_message_bytes: usize,
    pub probe_interval: Duration,
    /// Readiness by generation; `None`: readiness follows the probes only.
    pub generation_check: Option<GenerationCheck>,
    pub shutdown_grace: Duration,
    /// Span export and sampling (the standard `OTEL_*` settings).
    pub telemetry: TelemetryConfig,
}

/// Installs the global tracing subscriber; `RUST_LOG` filters (default `info`).
pub fn init_tracing(format: LogFormat) {
    subscribe(format, None);
}

/// Installs the global tracing subscriber as [`init_tracing`] does; with an
/// OTLP endpoint, tracing's spans and events are exported too
/// (`tracing-opentelemetry`), each call's under its SERVER span. An
/// exporter that cannot be built is left to [`serve_with`] to report.
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

/// Completes on SIGTERM or SIGINT.
pub async fn termination() {
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

/// Serves on `listener` until `shutdown` completes, then drains: health goes
/// NOT_SERVING, new calls are refused, open calls get the grace period.
///
/// Health and reflection answer from the start; the backends are selected
/// (and the embedded model loaded) by `selecting` meanwhile, with readiness
/// NOT_SERVING and inference calls refused with UNAVAILABLE until that is
/// done. A selection that fails stops the server with its error.
pub async fn serve_with(
    listener: TcpListener,
    settings: ServerSettings,
    selecting: impl Future<Output = Result<BackendRegistry, SelectionError>> + Send,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServerError> {
    let telemetry = telemetry::Telemetry::start(&settings.telemetry)?;
    let served = Edge::new(settings, telemetry.clone())
        .serve(listener, selecting, shutdown)
        .await;
    telemetry.shutdown().await;
    served
}

/// The gRPC edge of one server and the state its services share: built
/// before the backends exist, so health and reflection answer at once.
struct Edge {
    settings: ServerSettings,
    board: Arc<health::HealthBoard>,
    /// Set once the backends are selected.
    backends: Backends,
    drain: drain::Drain,
    admission: Arc<admission::Admission>,
    metrics: Arc<Metrics>,
    telemetry: telemetry::Telemetry,
}

impl Edge {
    fn new(settings: ServerSettings, telemetry: telemetry::Telemetry) -> Self {
        Self {
            board: health::HealthBoard::starting(),
            backends: Arc::default(),
            drain: drain::Drain::default(),
            admission: admission::Admission::new(settings.admission),
            metrics: Arc::new(Metrics::default()),
            telemetry,
            settings,
        }
    }

    /// Serves until `shutdown`: the transport starts at once, the backends
    /// join when `selecting` is done, and the drain runs at the end.
    async fn serve(
        self,
        listener: TcpListener,
        selecting: impl Future<Output = Result<BackendRegistry, SelectionError>> + Send,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<(), ServerError> {
        tokio::pin!(shutdown);
        // Stops the metrics endpoint whichever way this function returns.
        let _stop_metrics = self.serve_metrics().await?;
        let stop_transport = CancellationToken::new();
        let server = self.transport(listener, stop_transport.clone())?;
        tokio::pin!(server);

        let selected = tokio::select! {
            result = &mut server => return result.map_err(ServerError::from),
            () = &mut shutdown => None,
            selected = selecting => Some(selected),
        };
        let registry = match selected {
            Some(Ok(registry)) => Arc::new(registry),
            unfinished => {
                self.board.shutting_down();
                stop_transport.cancel();
                let _ = tokio::time::timeout(CUT_FLUSH, &mut server).await;
                return match unfinished {
                    Some(Err(error)) => Err(error.into()),
                    _ => Ok(()),
                };
            }
        };
        let prober = self.start_backends(registry);
        let failed = tokio::select! {
            result = &mut server => Some(result),
            () = &mut shutdown => None,
        };
        prober.stop().await;
        if let Some(result) = failed {
            return result.map_err(ServerError::from);
        }
        self.board.shutting_down();
        tracing::info!(grace = ?self.settings.shutdown_grace, "draining open calls");
        // The transport keeps accepting meanwhile, so late callers get a
        // clear UNAVAILABLE rather than a connection refused.
        tokio::select! {
            result = &mut server => return result.map_err(ServerError::from),
            () = self.drain.run(self.settings.shutdown_grace, CUT_FLUSH) => {}
        }
        stop_transport.cancel();
        match tokio::time::timeout(CUT_FLUSH, &mut server).await {
            Ok(result) => result.map_err(ServerError::from),
            Err(_) => Ok(()),
        }
    }

    /// Starts `/metrics` when configured; dropping the guard stops it.
    async fn serve_metrics(&self) -> Result<Option<DropGuard>, ServerError> {
        let Some(address) = self.settings.metrics_listen else {
            return Ok(None);
        };
        let listener = TcpListener::bind(address)
            .await
            .map_err(|source| ServerError::Bind { address, source })?;
        tracing::info!(%address, "serving metrics at /metrics");
        let (metrics, admission, backends, runner) = (
            self.metrics.clone(),
            self.admission.clone(),
            self.backends.clone(),
            self.settings.runner.clone(),
        );
        let render = Arc::new(move || {
            metrics.render(&Snapshot {
                admission: admission.stats(),
                backends: backends
                    .get()
                    .map(|registry| registry.snapshots())
                    .unwrap_or_default(),
                caches: runner.cache_stats(),
            })
        });
        let stop = CancellationToken::new();
        tokio::spawn(metrics::serve(listener, render, stop.clone()));
        Ok(Some(stop.drop_guard()))
    }

    /// The inference service's handlers, over what the edge shares.
    fn api(&self) -> InferenceApi {
        InferenceApi::new(Shared {
            registry: self.backends.clone(),
            deadlines: self.settings.deadlines,
            admission: self.admission.clone(),
            runner: self.settings.runner.clone(),
            limits: self.settings.limits.clone(),
            drain: self.drain.clone(),
            metrics: self.metrics.clone(),
            telemetry: self.telemetry.clone(),
        })
    }

    /// The transport with every service behind its auth guard, accepting
    /// from `listener` until `stop`.
    fn transport(
        &self,
        listener: TcpListener,
        stop: CancellationToken,
    ) -> Result<impl Future<Output = Result<(), tonic::transport::Error>> + use<>, ServerError>
    {
        let reflection = || {
            tonic_reflection::server::Builder::configure()
                .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
                .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        };
        let token = self.settings.auth_token.as_ref();
        let exempt = &self.settings.auth_exempt;
        let mut builder = Server::builder();
        if let Some(tls) = self.settings.tls.clone() {
            builder = builder
                .tls_config(tls)
                .map_err(|error| ServerError::Tls(error.to_string()))?;
        }
        let incoming = TcpListenerStream::new(listener).map(|connection| {
            connection.inspect(|stream| {
                if let Err(error) = stream.set_nodelay(true) {
                    tracing::warn!(%error, "cannot turn off Nagle's algorithm");
                }
            })
        });
        Ok(builder
            .add_service(auth::guarded(
                health::HealthServer::from_arc(self.board.clone()),
                token,
                exempt,
            ))
            .add_service(auth::guarded(reflection().build_v1()?, token, exempt))
            .add_service(auth::guarded(reflection().build_v1alpha()?, token, exempt))
            .add_service(auth::guarded(
                InferenceServiceServer::new(self.api())
                    .max_decoding_message_size(self.settings.max_message_bytes),
                token,
                exempt,
            ))
            .serve_with_incoming_shutdown(incoming, stop.cancelled_owned()))
    }

    /// Hands the selected backends to the services and health, and starts
    /// probing them.
    fn start_backends(&self, registry: Arc<BackendRegistry>) -> Prober {
        self.board.register(&registry);
        let _ = self.backends.set(registry.clone());
        let stop = CancellationToken::new();
        let task = tokio::spawn(health::probe_until(
            registry,
            self.board.clone(),
            self.settings.probe_interval,
            self.settings.generation_check,
            stop.clone(),
        ));
        Prober { stop, task }
    }
}

/// The background prober of the selected backends.
struct Prober {
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl Prober {
    async fn stop(self) {
        self.stop.cancel();
        let _ = self.task.await;
    }
}
