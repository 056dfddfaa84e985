//! OpenTelemetry for inference calls, through the ecosystem's crates: each
//! call is one SERVER span named and described as OpenTelemetry's RPC
//! conventions ask, a child of the caller's span when its metadata carries
//! W3C `traceparent`/`tracestate`, the root of a new trace otherwise. While
//! the call runs its span is the current OpenTelemetry context, so HTTP
//! backends pass it on (`backend::http`), and its ids are fields of the
//! call's log span.
//!
//! Each server owns its tracer provider: tests run several servers, each
//! with its own settings, in one process. With an OTLP endpoint, ended spans
//! go out from the SDK's batch processor, whose queue is bounded: when the
//! collector is slow or down, spans are dropped and counted (the count is
//! logged at shutdown), never held against calls. Without one, nothing is
//! exported and the service samples no trace of its own (a caller's
//! decision is passed on unchanged), yet ids are made for propagation.

use std::time::Duration;

use opentelemetry::{
    Context, InstrumentationScope, KeyValue,
    propagation::{Extractor, TextMapPropagator},
    trace::{SpanKind, Status as SpanStatus, TraceContextExt, Tracer, TracerProvider},
};
use opentelemetry_http::{Bytes, HttpClient, HttpError, Request, Response};
use opentelemetry_otlp::{
    ExporterBuildError, Protocol, SpanExporter, WithExportConfig, WithHttpConfig,
};
use opentelemetry_sdk::{
    Resource,
    propagation::TraceContextPropagator,
    resource::TelemetryResourceDetector,
    trace::{Sampler, SdkTracer, SdkTracerProvider},
};
use tonic::{
    Code,
    metadata::{KeyRef, MetadataMap},
};

use super::rpc::Rpc;
use crate::{
    config::{OtlpProtocol, TelemetryConfig, TracesSampler},
    proto::inference_service_server::SERVICE_NAME,
};

/// `service.name` when neither `OTEL_SERVICE_NAME` nor the resource
/// attributes give one.
const DEFAULT_SERVICE_NAME: &str = "rigger-inference";
/// OTLP's default export timeout, for the HTTP client.
const EXPORT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long shutdown waits for the last batch.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(5);
/// Path of the trace signal under an OTLP/HTTP base URL.
const TRACES_PATH: &str = "/v1/traces";

/// Attribute keys of OpenTelemetry's RPC semantic conventions, and ours.
const RPC_SYSTEM: &str = "rpc.system";
const RPC_SERVICE: &str = "rpc.service";
const RPC_METHOD: &str = "rpc.method";
const RPC_GRPC_STATUS_CODE: &str = "rpc.grpc.status_code";
const BACKEND: &str = "rigger.backend";

#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("cannot build the OTLP exporter: {0}")]
    Exporter(#[from] ExporterBuildError),
    #[error("cannot build the OTLP/HTTP client: {0}")]
    HttpClient(#[from] reqwest::Error),
}

/// A server's tracer provider and the tracer its calls start spans with.
#[derive(Clone)]
pub(super) struct Telemetry {
    provider: SdkTracerProvider,
    tracer: SdkTracer,
    exporting: bool,
}

impl Telemetry {
    /// Builds the provider `settings` describe; exporting starts here (it
    /// needs the Tokio runtime, on which the exporter's requests run).
    pub(super) fn start(settings: &TelemetryConfig) -> Result<Self, TelemetryError> {
        let builder = SdkTracerProvider::builder().with_resource(resource(settings));
        let provider = match &settings.otlp_endpoint {
            Some(endpoint) => {
                tracing::info!(
                    endpoint,
                    protocol = ?settings.otlp_protocol,
                    "exporting call spans over OTLP"
                );
                builder
                    .with_sampler(sampler(settings))
                    .with_batch_exporter(exporter(endpoint, settings.otlp_protocol)?)
                    .build()
            }
            None => builder
                .with_sampler(Sampler::ParentBased(Box::new(Sampler::AlwaysOff)))
                .build(),
        };
        let tracer = provider.tracer_with_scope(
            InstrumentationScope::builder(DEFAULT_SERVICE_NAME)
                .with_version(env!("CARGO_PKG_VERSION"))
                .build(),
        );
        Ok(Self {
            provider,
            tracer,
            exporting: settings.otlp_endpoint.is_some(),
        })
    }

    pub(super) fn tracer(&self) -> SdkTracer {
        self.tracer.clone()
    }

    /// Starts the span of a call to `rpc` whose metadata is `metadata`.
    pub(super) fn call(&self, rpc: Rpc, metadata: &MetadataMap) -> CallSpan {
        let parent = TraceContextPropagator::new().extract(&Metadata(metadata));
        let span = self
            .tracer
            .span_builder(rpc.path())
            .with_kind(SpanKind::Server)
            .with_attributes([
                KeyValue::new(RPC_SYSTEM, "grpc"),
                KeyValue::new(RPC_SERVICE, SERVICE_NAME),
                KeyValue::new(RPC_METHOD, rpc.method()),
            ])
            .start_with_context(&self.tracer, &parent);
        CallSpan(parent.with_span(span))
    }

    /// Sends what is queued and stops exporting.
    pub(super) async fn shutdown(self) {
        if !self.exporting {
            return;
        }
        // The SDK's shutdown blocks until the batch thread has sent the
        // last batch, whose requests run on this runtime.
        let provider = self.provider;
        match tokio::task::spawn_blocking(move || provider.shutdown_with_timeout(FLUSH_TIMEOUT))
            .await
        {
            Ok(Ok(())) => {}
            Ok(Err(error)) => tracing::warn!(%error, "span export did not finish"),
            Err(error) => tracing::warn!(%error, "span export did not finish"),
        }
    }
}

/// A call's span, inside the OpenTelemetry context it is current in.
#[derive(Clone)]
pub(super) struct CallSpan(Context);

impl CallSpan {
    pub(super) fn context(&self) -> &Context {
        &self.0
    }

    /// Records how the call ended and ends its span.
    pub(super) fn ended(&self, backend: &'static str, code: Code) {
        let span = self.0.span();
        span.set_attributes([
            KeyValue::new(RPC_GRPC_STATUS_CODE, i64::from(code as i32)),
            KeyValue::new(BACKEND, backend),
        ]);
        if server_error(code) {
            span.set_status(SpanStatus::error(code.description()));
        }
        span.end();
    }
}

/// gRPC codes that mark a server span as failed, per OpenTelemetry's RPC
/// conventions; the others are the caller's doing.
fn server_error(code: Code) -> bool {
    matches!(
        code,
        Code::Unknown
            | Code::DeadlineExceeded
            | Code::Unimplemented
            | Code::Internal
            | Code::Unavailable
            | Code::DataLoss
    )
}

fn sampler(settings: &TelemetryConfig) -> Sampler {
    let ratio = settings.otel_traces_sampler_arg;
    let parent_based = |root| Sampler::ParentBased(Box::new(root));
    match settings.otel_traces_sampler {
        TracesSampler::AlwaysOn => Sampler::AlwaysOn,
        TracesSampler::AlwaysOff => Sampler::AlwaysOff,
        TracesSampler::Traceidratio => Sampler::TraceIdRatioBased(ratio),
        TracesSampler::ParentbasedAlwaysOn => parent_based(Sampler::AlwaysOn),
        TracesSampler::ParentbasedAlwaysOff => parent_based(Sampler::AlwaysOff),
        TracesSampler::ParentbasedTraceidratio => parent_based(Sampler::TraceIdRatioBased(ratio)),
    }
}

/// The resource: the SDK's own attributes, `service.version`, the
/// configured attributes, and `service.name`, which wins over theirs.
fn resource(settings: &TelemetryConfig) -> Resource {
    let attributes = &settings.otel_resource_attributes;
    let service_name = settings
        .otel_service_name
        .as_deref()
        .or_else(|| {
            attributes
                .iter()
                .find(|attribute| attribute.key == "service.name")
                .map(|attribute| attribute.value.as_str())
        })
        .unwrap_or(DEFAULT_SERVICE_NAME)
        .to_owned();
    Resource::builder_empty()
        .with_detector(Box::new(TelemetryResourceDetector))
        .with_attribute(KeyValue::new("service.version", env!("CARGO_PKG_VERSION")))
        .with_attributes(
            attributes
                .iter()
                .map(|attribute| KeyValue::new(attribute.key.clone(), attribute.value.clone())),
        )
        .with_service_name(service_name)
        .build()
}

/// The exporter to the collector at `endpoint`, a base URL as in
/// `OTEL_EXPORTER_OTLP_ENDPOINT`.
fn exporter(endpoint: &str, protocol: OtlpProtocol) -> Result<SpanExporter, TelemetryError> {
    let http = |protocol| -> Result<SpanExporter, TelemetryError> {
        Ok(SpanExporter::builder()
            .with_http()
            .with_protocol(protocol)
            .with_endpoint(format!("{}{TRACES_PATH}", endpoint.trim_end_matches('/')))
            .with_http_client(ExportClient::new()?)
            .build()?)
    };
    match protocol {
        OtlpProtocol::Grpc => Ok(SpanExporter::builder()
            .with_tonic()
            .with_endpoint(endpoint)
            .build()?),
        OtlpProtocol::HttpProtobuf => http(Protocol::HttpBinary),
        OtlpProtocol::HttpJson => http(Protocol::HttpJson),
    }
}

/// The OTLP/HTTP client: the batch processor exports from a thread of its
/// own, so each request is handed to the server's runtime, on the same
/// `reqwest` the backends use.
#[derive(Debug)]
struct ExportClient {
    client: reqwest::Client,
    runtime: tokio::runtime::Handle,
}

impl ExportClient {
    fn new() -> Result<Self, reqwest::Error> {
        Ok(Self {
            client: reqwest::Client::builder().timeout(EXPORT_TIMEOUT).build()?,
            runtime: tokio::runtime::Handle::current(),
        })
    }
}

#[async_trait::async_trait]
impl HttpClient for ExportClient {
    async fn send_bytes(&self, request: Request<Bytes>) -> Result<Response<Bytes>, HttpError> {
        let client = self.client.clone();
        let sent = self.runtime.spawn(async move {
            let response = client.execute(request.try_into()?).await?;
            let mut answer = Response::builder().status(response.status());
            if let Some(headers) = answer.headers_mut() {
                *headers = response.headers().clone();
            }
            Ok::<_, HttpError>(answer.body(response.bytes().await?)?)
        });
        sent.await?
    }
}

/// Reads W3C trace context from gRPC metadata.
struct Metadata<'a>(&'a MetadataMap);

impl Extractor for Metadata<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|value| value.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0
            .keys()
            .filter_map(|key| match key {
                KeyRef::Ascii(key) => Some(key.as_str()),
                KeyRef::Binary(_) => None,
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use opentelemetry::trace::TraceId;

    use super::*;
    use crate::config::ResourceAttribute;

    fn settings(flags: &[&str]) -> TelemetryConfig {
        use clap::Parser;
        crate::config::Config::parse_from(
            std::iter::once("rigger-inference").chain(flags.iter().copied()),
        )
        .telemetry
    }

    fn metadata(traceparent: &str) -> MetadataMap {
        let mut metadata = MetadataMap::new();
        metadata.insert("traceparent", traceparent.parse().unwrap());
        metadata
    }

    #[tokio::test]
    async fn without_export_only_the_callers_decision_is_passed_on() {
        let telemetry = Telemetry::start(&settings(&[])).unwrap();
        let sampled = telemetry.call(
            Rpc::Generate,
            &metadata("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
        );
        let context = sampled.context().span().span_context().clone();
        assert_eq!(
            context.trace_id(),
            TraceId::from_hex("4bf92f3577b34da6a3ce929d0e0e4736").unwrap()
        );
        assert!(context.is_sampled());
        let root = telemetry.call(Rpc::Generate, &MetadataMap::new());
        let root = root.context().span().span_context().clone();
        assert!(root.is_valid(), "ids are made for propagation");
        assert!(!root.is_sampled(), "nobody records it");
    }

    #[test]
    fn the_service_name_comes_from_its_variable_then_the_resource_attributes() {
        let name = |settings: &TelemetryConfig| {
            resource(settings)
                .get(&"service.name".into())
                .map(|value| value.to_string())
        };
        let mut configured = settings(&[]);
        assert_eq!(name(&configured).as_deref(), Some(DEFAULT_SERVICE_NAME));
        configured.otel_resource_attributes = vec![ResourceAttribute {
            key: "service.name".into(),
            value: "from-attributes".into(),
        }];
        assert_eq!(name(&configured).as_deref(), Some("from-attributes"));
        configured.otel_service_name = Some("from-variable".into());
        assert_eq!(name(&configured).as_deref(), Some("from-variable"));
    }

    #[test]
    fn only_server_faults_mark_a_span_failed() {
        assert!(server_error(Code::Unavailable));
        assert!(!server_error(Code::InvalidArgument));
        assert!(!server_error(Code::NotFound));
        assert!(!server_error(Code::Ok));
    }
}
