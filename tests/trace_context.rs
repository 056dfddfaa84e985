//! W3C trace context: a caller's `traceparent` continues through the
//! service into the backend's HTTP request (same trace, the call's own span
//! as parent, flags and `tracestate` kept); a call without one, or with an
//! invalid one, starts a trace of its own. With `--otlp-endpoint` each
//! recorded call is exported as a span to an OTLP/HTTP collector (here a
//! loopback one that keeps what it receives). The backend is the Ollama
//! stand-in, which records the headers it receives.

mod support;

use std::sync::{Arc, Mutex};

use axum::{Json, Router, extract::State, routing::post};
use rigger_inference::proto::GenerateRequest;
use serde_json::Value;
use support::{TestServer, config, greedy, llama, ollama::OllamaStandIn};
use tokio::net::TcpListener;
use tonic::{Code, Request};

const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const PARENT_SPAN: &str = "00f067aa0ba902b7";

fn traced(traceparent: &str, tracestate: Option<&str>) -> Request<GenerateRequest> {
    let mut request = Request::new(greedy("Say hi.", 2));
    request
        .metadata_mut()
        .insert("traceparent", traceparent.parse().expect("ASCII"));
    if let Some(state) = tracestate {
        request
            .metadata_mut()
            .insert("tracestate", state.parse().expect("ASCII"));
    }
    request
}

/// The (trace id, parent span, flags) of a `traceparent` the backend got.
fn parts(traceparent: &str) -> (String, String, String) {
    let fields: Vec<&str> = traceparent.split('-').collect();
    assert_eq!(fields.len(), 4, "{traceparent}");
    assert_eq!(fields[0], "00");
    assert_eq!(
        (fields[1].len(), fields[2].len()),
        (32, 16),
        "{traceparent}"
    );
    (
        fields[1].to_owned(),
        fields[2].to_owned(),
        fields[3].to_owned(),
    )
}

#[tokio::test]
async fn the_callers_trace_reaches_the_backend_and_calls_without_one_get_their_own() {
    let stand_in = OllamaStandIn::start(&llama().openai_url()).await;
    let server = TestServer::start(config(&[
        "--backend",
        "ollama",
        "--ollama-host",
        &stand_in.host(),
    ]))
    .await;
    let mut client = server.client().await;
    let parent = format!("00-{TRACE_ID}-{PARENT_SPAN}-01");
    for request in [
        traced(&parent, Some("rojo=00f067aa0ba902b7,congo=t61rcWkgMzE")),
        Request::new(greedy("Say hi.", 2)),
        traced(
            &format!("00-{TRACE_ID}-0000000000000000-01"),
            Some("rojo=1"),
        ),
    ] {
        collect_one(&mut client, request).await;
    }

    let seen = stand_in.controls.trace_headers.lock().unwrap().clone();
    assert_eq!(seen.len(), 3, "{seen:?}");
    let (trace, span, flags) = parts(seen[0].0.as_deref().expect("traceparent sent"));
    assert_eq!(trace, TRACE_ID, "same trace");
    assert_ne!(span, PARENT_SPAN, "our own span is the backend's parent");
    assert_eq!(flags, "01", "the caller's sampling decision is kept");
    assert_eq!(
        seen[0].1.as_deref(),
        Some("rojo=00f067aa0ba902b7,congo=t61rcWkgMzE")
    );
    for (index, (traceparent, tracestate)) in seen.iter().enumerate().skip(1) {
        let (trace, _, flags) = parts(traceparent.as_deref().expect("a trace of its own"));
        assert_ne!(trace, TRACE_ID, "call {index} starts a new trace");
        assert_eq!(flags, "00", "call {index}: not sampled by anyone");
        assert_eq!(tracestate, &None, "call {index}");
    }
    assert_ne!(
        parts(seen[1].0.as_deref().unwrap()).0,
        parts(seen[2].0.as_deref().unwrap()).0,
        "each new trace is its own"
    );
}

async fn collect_one(
    client: &mut rigger_inference::proto::inference_service_client::InferenceServiceClient<
        tonic::transport::Channel,
    >,
    request: Request<GenerateRequest>,
) {
    let stream = client.generate(request).await.expect("starts").into_inner();
    support::collect(stream).await.expect("completes");
}

/// An OTLP/HTTP collector on loopback that keeps the spans it receives.
async fn collector() -> (String, Arc<Mutex<Vec<Value>>>) {
    let spans: Arc<Mutex<Vec<Value>>> = Arc::default();
    let app = Router::new()
        .route(
            "/v1/traces",
            post(
                |State(spans): State<Arc<Mutex<Vec<Value>>>>, Json(body): Json<Value>| async move {
                    let received = body["resourceSpans"][0]["scopeSpans"][0]["spans"]
                        .as_array()
                        .cloned()
                        .unwrap_or_default();
                    assert_eq!(
                        body["resourceSpans"][0]["resource"]["attributes"][0]["value"]
                            ["stringValue"],
                        "rigger-inference"
                    );
                    spans.lock().unwrap().extend(received);
                    Json(serde_json::json!({}))
                },
            ),
        )
        .with_state(spans.clone());
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("address"));
    tokio::spawn(async move { axum::serve(listener, app).await });
    (url, spans)
}

fn attribute<'a>(span: &'a Value, key: &str) -> &'a Value {
    span["attributes"]
        .as_array()
        .expect("attributes")
        .iter()
        .find(|attribute| attribute["key"] == key)
        .map_or(&Value::Null, |attribute| &attribute["value"])
}

#[tokio::test]
async fn with_an_otlp_endpoint_recorded_calls_are_exported_as_spans() {
    let (endpoint, exported) = collector().await;
    let stand_in = OllamaStandIn::start(&llama().openai_url()).await;
    let server = TestServer::start(config(&[
        "--backend",
        "ollama",
        "--ollama-host",
        &stand_in.host(),
        "--otlp-endpoint",
        &endpoint,
    ]))
    .await;
    let mut client = server.client().await;
    collect_one(
        &mut client,
        traced(&format!("00-{TRACE_ID}-{PARENT_SPAN}-01"), None),
    )
    .await;
    collect_one(&mut client, Request::new(greedy("Say hi.", 2))).await;
    let unsampled = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00";
    collect_one(&mut client, traced(unsampled, None)).await;
    let mut unknown_model = traced(&format!("00-{TRACE_ID}-{PARENT_SPAN}-01"), None);
    unknown_model.get_mut().model = "llama3.1".into();
    let status = client
        .generate(unknown_model)
        .await
        .expect_err("not served");
    assert_eq!(status.code(), Code::NotFound);
    drop(client);
    server.stop().await.expect("clean stop");

    let spans = exported.lock().unwrap().clone();
    let seen = stand_in.controls.trace_headers.lock().unwrap().clone();
    assert_eq!(
        spans.len(),
        3,
        "the unsampled call is not exported: {spans:#?}"
    );
    let (_, backend_parent, _) = parts(seen[0].0.as_deref().unwrap());
    let continued = &spans[0];
    assert_eq!(continued["traceId"], TRACE_ID);
    assert_eq!(continued["parentSpanId"], PARENT_SPAN);
    assert_eq!(
        continued["spanId"], backend_parent,
        "the backend's parent is the exported span"
    );
    assert_eq!(
        continued["name"],
        "rigger.inference.v1.InferenceService/Generate"
    );
    assert_eq!(
        attribute(continued, "rigger.backend")["stringValue"],
        "ollama"
    );
    assert_eq!(
        attribute(continued, "rpc.grpc.status_code")["intValue"],
        "0"
    );
    let started: u64 = continued["startTimeUnixNano"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    let ended: u64 = continued["endTimeUnixNano"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(ended > started);

    let root = &spans[1];
    let (backend_trace, _, _) = parts(seen[1].0.as_deref().unwrap());
    assert_eq!(root["traceId"], backend_trace.as_str());
    assert!(root.get("parentSpanId").is_none(), "{root}");

    let failed = &spans[2];
    assert_eq!(attribute(failed, "rpc.grpc.status_code")["intValue"], "5");
    assert_eq!(
        failed["status"]["code"], 0,
        "NOT_FOUND is the caller's error, not the server's"
    );
}
