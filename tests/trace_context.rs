//! W3C trace context: a caller's `traceparent` continues through the
//! service into the backend's HTTP request (same trace, the call's own span
//! as parent, flags and `tracestate` kept); a call without one, or with an
//! invalid one, starts a trace of its own, which nobody samples while
//! export is off. The backend is the Ollama stand-in, which records the
//! headers it receives. Export itself is `otlp_export.rs`.

mod support;

use rigger_inference::proto::GenerateRequest;
use support::{TestServer, config, greedy, llama, ollama::OllamaStandIn, traced};
use tonic::Request;

const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const PARENT_SPAN: &str = "00f067aa0ba902b7";

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
        traced(
            greedy("Say hi.", 2),
            &parent,
            Some("rojo=00f067aa0ba902b7,congo=t61rcWkgMzE"),
        ),
        Request::new(greedy("Say hi.", 2)),
        traced(
            greedy("Say hi.", 2),
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
