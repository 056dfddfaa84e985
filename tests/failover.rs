//! Failover along `--backends` where it depends on what arrives over the
//! wire: a connection cut before the first token passes the call on and one
//! cut after it ends the stream UNAVAILABLE; a queue-full 503 passes calls
//! on without counting against the circuit. The routing itself (which
//! backend next, circuits, what is retried) is the fast tier's, in
//! tests/fast/failover.rs.
//!
//! The first backend is the Ollama stand-in (tests/support/ollama.rs, which
//! can be made busy or made to crash mid-stream); the second is the real
//! llama.cpp server through the `openai` backend.

mod support;

use std::{sync::atomic::Ordering, time::Duration};

use futures_util::StreamExt;
use rigger_inference::proto::{
    BackendStatus, CircuitState, GetStatusRequest, generate_response::Event,
    inference_service_client::InferenceServiceClient,
};
use support::{TestServer, config, generate, greedy, llama, ollama::OllamaStandIn};
use tonic::{Code, transport::Channel};

/// Ollama first, the llama.cpp server second. Probes are rare, so that
/// calls alone drive the circuits.
async fn serve(ollama_host: &str) -> TestServer {
    let mut config = config(&[
        "--backends",
        "ollama,openai",
        "--ollama-host",
        ollama_host,
        "--openai-base-url",
        &llama().openai_url(),
    ]);
    config.probe_interval = Duration::from_secs(3600);
    TestServer::start(config).await
}

async fn ollama_status(client: &mut InferenceServiceClient<Channel>) -> BackendStatus {
    let report = client
        .get_status(GetStatusRequest {})
        .await
        .expect("GetStatus")
        .into_inner();
    assert_eq!(report.backends[0].name, "ollama");
    report.backends[0].clone()
}

/// Which backend answered a short greedy generation.
async fn answered_by(client: &mut InferenceServiceClient<Channel>) -> String {
    let generated = generate(client, greedy("Say hello.", 4))
        .await
        .expect("the call succeeds");
    generated.summary.meta.expect("meta").backend
}

#[tokio::test]
async fn a_crash_before_the_first_token_moves_the_call_on_and_after_it_does_not() {
    let stand_in = OllamaStandIn::start(&llama().openai_url()).await;
    let server = serve(&stand_in.host()).await;
    let mut client = server.client().await;

    stand_in.controls.cut_at.store(1, Ordering::SeqCst);
    assert_eq!(
        answered_by(&mut client).await,
        "openai",
        "no text was sent, so another backend may answer"
    );

    stand_in.controls.cut_at.store(3, Ordering::SeqCst);
    let mut stream = client
        .generate(greedy("Tell a story.", 30))
        .await
        .expect("the stream starts")
        .into_inner();
    let mut texts = 0;
    let status = loop {
        match tokio::time::timeout(Duration::from_secs(30), stream.next())
            .await
            .expect("the stream ends, never hangs")
            .expect("the stream ends with an error, not silently")
        {
            Ok(message) => match message.event.expect("event") {
                Event::Text(_) => texts += 1,
                Event::Summary(summary) => panic!("no answer after a crash: {summary:?}"),
            },
            Err(status) => break status,
        }
    };
    // Two lines were written before the crash; the HTTP layer may lose the
    // last one unflushed when the connection drops.
    assert!(
        (1..=2).contains(&texts),
        "text before the crash is delivered, then the error: {texts}"
    );
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(status.message().contains("interrupted"), "{status:?}");
    let ollama = ollama_status(&mut client).await;
    assert_eq!(
        (ollama.failures, ollama.retried),
        (2, 1),
        "both crashes count; only the one before any text was retried"
    );
}

#[tokio::test]
async fn a_full_backend_passes_calls_on_without_counting_against_its_circuit() {
    let stand_in = OllamaStandIn::start(&llama().openai_url()).await;
    let server = serve(&stand_in.host()).await;
    let mut client = server.client().await;
    stand_in.controls.busy.store(true, Ordering::SeqCst);
    for _ in 0..3 {
        assert_eq!(answered_by(&mut client).await, "openai");
    }
    let ollama = ollama_status(&mut client).await;
    assert_eq!(ollama.circuit(), CircuitState::Closed, "busy is not down");
    assert_eq!((ollama.failures, ollama.retried), (0, 3));
}
