//! OTLP export of call spans, over each protocol a collector speaks: gRPC
//! (the collector's `TraceService`, from `opentelemetry-proto`), HTTP with
//! protobuf bodies and HTTP with JSON bodies (an axum route at
//! `/v1/traces`). Each exported span is a SERVER span named after the
//! method called, in the caller's trace with the caller's span as parent,
//! the parent of the backend's request, and carries the RPC and status
//! attributes; a caller that does not sample keeps its spans unexported.
//! The backend is the Ollama stand-in, which records the trace headers it
//! receives. The binary reads the standard `OTEL_*` variables and exports
//! each call's log span under the call's span (`tracing-opentelemetry`).

mod support;

use std::{
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    time::Duration,
};

use axum::{
    Router,
    body::Bytes,
    extract::State,
    http::{HeaderMap, HeaderValue, StatusCode as HttpStatus, header::CONTENT_TYPE},
    routing::post,
};
use opentelemetry_proto::tonic::{
    collector::trace::v1::{
        ExportTraceServiceRequest, ExportTraceServiceResponse,
        trace_service_server::{TraceService, TraceServiceServer},
    },
    common::v1::{AnyValue, any_value::Value},
    trace::v1::{Span, span::SpanKind, status::StatusCode},
};
use prost::Message;
use rigger_inference::proto::{
    DecomposeTaskRequest, EnhanceTaskRequest, GenerateRequest, Task,
    inference_service_client::InferenceServiceClient,
};
use support::{TestServer, config, free_port, greedy, llama, ollama::OllamaStandIn, traced};
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::{Code, Request, Response, Status, transport::Channel};

const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const PARENT_SPAN: &str = "00f067aa0ba902b7";
const UNSAMPLED_TRACE_ID: &str = "0af7651916cd43dd8448eb211c80319c";
const SERVICE: &str = "rigger.inference.v1.InferenceService";

/// What a collector received.
type Received = Arc<Mutex<Vec<ExportTraceServiceRequest>>>;

/// A collector's `TraceService` keeping what it receives.
struct GrpcCollector(Received);

#[tonic::async_trait]
impl TraceService for GrpcCollector {
    async fn export(
        &self,
        request: Request<ExportTraceServiceRequest>,
    ) -> Result<Response<ExportTraceServiceResponse>, Status> {
        self.0.lock().unwrap().push(request.into_inner());
        Ok(Response::new(ExportTraceServiceResponse::default()))
    }
}

/// An OTLP/gRPC collector on loopback: its endpoint and what it receives.
async fn grpc_collector() -> (String, Received) {
    let received = Received::default();
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let endpoint = format!("http://{}", listener.local_addr().expect("address"));
    let service = TraceServiceServer::new(GrpcCollector(received.clone()));
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );
    (endpoint, received)
}

/// An OTLP/HTTP collector on loopback taking bodies of `content_type`
/// only (`application/x-protobuf` or `application/json`) and answering in
/// kind.
async fn http_collector(content_type: &'static str) -> (String, Received) {
    let export = move |State(received): State<Received>, headers: HeaderMap, body: Bytes| async move {
        let json = content_type == "application/json";
        if headers.get(CONTENT_TYPE).map(|kind| kind.as_bytes()) != Some(content_type.as_bytes()) {
            return (
                HttpStatus::UNSUPPORTED_MEDIA_TYPE,
                HeaderMap::new(),
                Vec::new(),
            );
        }
        let request = if json {
            serde_json::from_slice(&body).expect("an OTLP/JSON request")
        } else {
            ExportTraceServiceRequest::decode(body).expect("an OTLP/protobuf request")
        };
        received.lock().unwrap().push(request);
        let response = ExportTraceServiceResponse::default();
        let mut answer = HeaderMap::new();
        answer.insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
        let body = if json {
            serde_json::to_vec(&response).unwrap()
        } else {
            response.encode_to_vec()
        };
        (HttpStatus::OK, answer, body)
    };
    let received = Received::default();
    let app = Router::new()
        .route("/v1/traces", post(export))
        .with_state(received.clone());
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let endpoint = format!("http://{}", listener.local_addr().expect("address"));
    tokio::spawn(async move { axum::serve(listener, app).await });
    (endpoint, received)
}

async fn generate(client: &mut InferenceServiceClient<Channel>, request: Request<GenerateRequest>) {
    let stream = client.generate(request).await.expect("starts").into_inner();
    support::collect(stream).await.expect("completes");
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
}

fn attribute<'a>(span: &'a Span, key: &str) -> Option<&'a Value> {
    span.attributes
        .iter()
        .find(|attribute| attribute.key == key)
        .and_then(|attribute| attribute.value.as_ref())
        .and_then(|value: &AnyValue| value.value.as_ref())
}

fn string(value: &str) -> Option<Value> {
    Some(Value::StringValue(value.to_owned()))
}

/// Serves calls with spans exported over `protocol` to `collector`, then
/// checks what arrived.
async fn calls_are_exported((endpoint, received): (String, Received), protocol: &str) {
    let stand_in = OllamaStandIn::start(&llama().openai_url()).await;
    let server = TestServer::start(config(&[
        "--backend",
        "ollama",
        "--ollama-host",
        &stand_in.host(),
        "--otlp-endpoint",
        &endpoint,
        "--otlp-protocol",
        protocol,
        "--otel-resource-attributes",
        "deployment.environment=test",
    ]))
    .await;
    let mut client = server.client().await;
    let parent = format!("00-{TRACE_ID}-{PARENT_SPAN}-01");
    generate(
        &mut client,
        traced(greedy("Say hi.", 2), &parent, Some("rojo=1")),
    )
    .await;
    generate(&mut client, Request::new(greedy("Say hi.", 2))).await;
    generate(
        &mut client,
        traced(
            greedy("Say hi.", 2),
            &format!("00-{UNSAMPLED_TRACE_ID}-b7ad6b7169203331-00"),
            None,
        ),
    )
    .await;
    let mut unknown_model = greedy("Say hi.", 2);
    unknown_model.model = "llama3.1".into();
    let status = client
        .generate(traced(unknown_model, &parent, None))
        .await
        .expect_err("not served");
    assert_eq!(status.code(), Code::NotFound);
    // Invalid (no title), so answered at once: their spans name their RPCs.
    let untitled = Some(Task::default());
    let enhance = EnhanceTaskRequest {
        task: untitled.clone(),
        ..Default::default()
    };
    let decompose = DecomposeTaskRequest {
        task: untitled,
        ..Default::default()
    };
    let enhanced = client.enhance_task(traced(enhance, &parent, None)).await;
    let decomposed = client
        .decompose_task(traced(decompose, &parent, None))
        .await;
    assert_eq!(enhanced.expect_err("invalid").code(), Code::InvalidArgument);
    assert_eq!(
        decomposed.expect_err("invalid").code(),
        Code::InvalidArgument
    );
    drop(client);
    // Stopping sends what is queued.
    server.stop().await.expect("clean stop");

    let requests = received.lock().unwrap().clone();
    assert!(!requests.is_empty(), "the collector received nothing");
    let resource = requests[0].resource_spans[0]
        .resource
        .clone()
        .expect("a resource");
    let resource_attribute = |key: &str| {
        resource
            .attributes
            .iter()
            .find(|attribute| attribute.key == key)
            .and_then(|attribute| attribute.value.clone())
            .and_then(|value| value.value)
    };
    assert_eq!(
        resource_attribute("service.name"),
        string("rigger-inference")
    );
    assert_eq!(resource_attribute("deployment.environment"), string("test"));
    let spans: Vec<Span> = requests
        .into_iter()
        .flat_map(|request| request.resource_spans)
        .flat_map(|resource| resource.scope_spans)
        .flat_map(|scope| scope.spans)
        .collect();
    assert_eq!(
        spans.len(),
        5,
        "every call but the unsampled one: {spans:#?}"
    );
    assert!(
        spans
            .iter()
            .all(|span| hex(&span.trace_id) != UNSAMPLED_TRACE_ID)
    );
    let seen = stand_in.controls.trace_headers.lock().unwrap().clone();
    let backend_parent = |call: usize| {
        let traceparent = seen[call].0.clone().expect("traceparent sent");
        let fields: Vec<&str> = traceparent.split('-').collect();
        (fields[1].to_owned(), fields[2].to_owned())
    };

    let continued = spans
        .iter()
        .find(|span| {
            hex(&span.trace_id) == TRACE_ID
                && attribute(span, "rigger.backend") == string("ollama").as_ref()
                && attribute(span, "rpc.grpc.status_code") == Some(&Value::IntValue(0))
        })
        .expect("the continued call's span");
    assert_eq!(hex(&continued.parent_span_id), PARENT_SPAN);
    assert_eq!(
        (TRACE_ID.to_owned(), hex(&continued.span_id)),
        backend_parent(0),
        "the backend's parent is the exported span"
    );
    assert_eq!(continued.name, format!("{SERVICE}/Generate"));
    assert_eq!(continued.kind, SpanKind::Server as i32);
    assert_eq!(continued.trace_state, "rojo=1");
    assert_eq!(attribute(continued, "rpc.system"), string("grpc").as_ref());
    assert_eq!(
        attribute(continued, "rpc.service"),
        string(SERVICE).as_ref()
    );
    assert_eq!(
        attribute(continued, "rpc.method"),
        string("Generate").as_ref()
    );
    assert!(continued.end_time_unix_nano > continued.start_time_unix_nano);

    let (root_trace, root_span) = backend_parent(1);
    let root = spans
        .iter()
        .find(|span| hex(&span.trace_id) == root_trace)
        .expect("the new trace's span");
    assert!(root.parent_span_id.is_empty(), "{root:?}");
    assert_eq!(hex(&root.span_id), root_span);

    let failed = spans
        .iter()
        .find(|span| attribute(span, "rpc.grpc.status_code") == Some(&Value::IntValue(5)))
        .expect("the NOT_FOUND call's span");
    assert_eq!(hex(&failed.parent_span_id), PARENT_SPAN);
    assert_eq!(
        failed.status.as_ref().map_or(0, |status| status.code),
        StatusCode::Unset as i32,
        "NOT_FOUND is the caller's error, not the server's"
    );

    for method in ["EnhanceTask", "DecomposeTask"] {
        let span = spans
            .iter()
            .find(|span| span.name == format!("{SERVICE}/{method}"))
            .unwrap_or_else(|| panic!("a {method} span: {spans:#?}"));
        assert_eq!(attribute(span, "rpc.method"), string(method).as_ref());
        assert_eq!(
            attribute(span, "rpc.grpc.status_code"),
            Some(&Value::IntValue(Code::InvalidArgument as i64))
        );
        assert_eq!(hex(&span.parent_span_id), PARENT_SPAN);
    }
}

#[tokio::test]
async fn calls_are_exported_over_grpc() {
    calls_are_exported(grpc_collector().await, "grpc").await;
}

#[tokio::test]
async fn calls_are_exported_over_http_with_protobuf() {
    calls_are_exported(
        http_collector("application/x-protobuf").await,
        "http/protobuf",
    )
    .await;
}

#[tokio::test]
async fn calls_are_exported_over_http_with_json() {
    calls_are_exported(http_collector("application/json").await, "http/json").await;
}

/// The binary, killed if a test fails before it exits.
struct Binary(Child);

impl Drop for Binary {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

// Several threads: the collector answers while this one waits for the exit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_reads_the_otel_variables_and_exports_log_spans_under_the_call() {
    let (endpoint, received) = grpc_collector().await;
    let address = format!("127.0.0.1:{}", free_port());
    let mut binary = Binary(
        Command::new(env!("CARGO_BIN_EXE_rigger-inference"))
            .env("RIGGER_LISTEN", &address)
            .env("RIGGER_METRICS_LISTEN", "off")
            .env("INFERENCE_BACKEND", "openai")
            .env("OPENAI_BASE_URL", llama().openai_url())
            .env("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint)
            .env("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")
            .env("OTEL_SERVICE_NAME", "from-variables")
            .env(
                "OTEL_RESOURCE_ATTRIBUTES",
                "deployment.environment=variables",
            )
            .env("OTEL_TRACES_SAMPLER", "parentbased_always_off")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start the binary"),
    );
    let channel = Channel::from_shared(format!("http://{address}")).unwrap();
    let mut client = loop {
        match channel.connect().await {
            Ok(channel) => break InferenceServiceClient::new(channel),
            Err(_) if binary.0.try_wait().unwrap().is_none() => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(error) => panic!("the binary exited: {error}"),
        }
    };
    let parent = format!("00-{TRACE_ID}-{PARENT_SPAN}-01");
    let request = || traced(greedy("Say hi.", 2), &parent, None);
    // Retried until the backend is selected.
    let stream = loop {
        match client.generate(request()).await {
            Err(status) if status.code() == Code::Unavailable => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            started => break started.expect("starts").into_inner(),
        }
    };
    support::collect(stream).await.expect("completes");
    generate(&mut client, Request::new(greedy("Say hi.", 2))).await;
    drop(client);
    let pid = binary.0.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    let child = &mut binary.0;
    let exited = tokio::task::block_in_place(|| child.wait().expect("wait for the binary"));
    assert!(exited.success(), "{exited}");

    let requests = received.lock().unwrap().clone();
    let resources: Vec<_> = requests
        .iter()
        .flat_map(|request| &request.resource_spans)
        .collect();
    for resource in &resources {
        let attributes = &resource.resource.as_ref().expect("a resource").attributes;
        let value = |key: &str| {
            attributes
                .iter()
                .find(|attribute| attribute.key == key)
                .and_then(|attribute| attribute.value.clone())
                .and_then(|value| value.value)
        };
        assert_eq!(value("service.name"), string("from-variables"));
        assert_eq!(value("deployment.environment"), string("variables"));
    }
    let spans: Vec<&Span> = resources
        .iter()
        .flat_map(|resource| &resource.scope_spans)
        .flat_map(|scope| &scope.spans)
        .collect();
    assert!(
        spans.iter().all(|span| hex(&span.trace_id) == TRACE_ID),
        "the call without a parent is not sampled: {spans:#?}"
    );
    // Calls refused while the backend was being selected have spans too.
    let server = spans
        .iter()
        .find(|span| {
            span.kind == SpanKind::Server as i32
                && attribute(span, "rpc.grpc.status_code") == Some(&Value::IntValue(0))
        })
        .unwrap_or_else(|| panic!("the call's span: {spans:#?}"));
    assert_eq!(hex(&server.parent_span_id), PARENT_SPAN);
    assert_eq!(
        attribute(server, "rigger.backend"),
        string("openai").as_ref()
    );
    let log = spans
        .iter()
        .find(|span| span.name == "call" && span.parent_span_id == server.span_id)
        .expect("the call's log span, under the call's span");
    assert_eq!(log.kind, SpanKind::Internal as i32);
    assert_eq!(attribute(log, "rpc"), string("generate").as_ref());
}
