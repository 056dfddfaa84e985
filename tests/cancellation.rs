//! A client that cancels stops the backend's work, during generation and
//! while the prompt is still being read, and leaves no generation slot
//! behind. The Ollama backend's case is in tests/ollama_backend.rs and the
//! embedded engine's freed sequence in tests/embedded_backend.rs.

mod support;

use std::time::{Duration, Instant};

use futures_util::StreamExt;
use rigger_inference::proto::{GenerateRequest, generate_response::Event};
use support::{LlamaServer, TestServer, admission, config, greedy};

/// A prompt of about `sentences` × 10 tokens, slow to read on purpose.
fn long_prompt(sentences: usize) -> String {
    let mut prompt = String::from("Repeat the last sentence below.\n");
    prompt.push_str(&"The quick brown fox jumps over the lazy dog again. ".repeat(sentences));
    prompt
}

/// Whether the llama.cpp server has a request in any slot (`GET /slots`).
async fn llama_busy(http: &reqwest::Client, llama: &LlamaServer) -> bool {
    let slots: Vec<serde_json::Value> = http
        .get(format!("http://127.0.0.1:{}/slots", llama.port))
        .send()
        .await
        .expect("GET /slots")
        .json()
        .await
        .expect("slots as JSON");
    slots
        .iter()
        .any(|slot| slot["is_processing"].as_bool() == Some(true))
}

async fn wait_for_llama(
    http: &reqwest::Client,
    llama: &LlamaServer,
    busy: bool,
    within: Duration,
) -> Duration {
    let started = Instant::now();
    while llama_busy(http, llama).await != busy {
        assert!(
            started.elapsed() < within,
            "llama.cpp server still {} after {within:?}",
            if busy { "idle" } else { "busy" }
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    started.elapsed()
}

/// Serving through `llama`.
fn openai_config_for(llama: &LlamaServer) -> rigger_inference::config::Config {
    config(&[
        "--backend",
        "openai",
        "--openai-base-url",
        &llama.openai_url(),
    ])
}

async fn wait_for_no_generation_in_flight(
    client: &mut rigger_inference::proto::inference_service_client::InferenceServiceClient<
        tonic::transport::Channel,
    >,
) {
    let started = Instant::now();
    while admission(client).await.0 != 0 {
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "a generation slot stayed taken"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn openai_backend_stops_when_the_client_cancels_mid_generation() {
    // A llama.cpp server of this test's own: its slots must show this
    // test's request only, whatever else runs at the same time.
    let llama = LlamaServer::start();
    let server = TestServer::start(openai_config_for(&llama)).await;
    let mut client = server.client().await;
    let http = reqwest::Client::new();
    let mut stream = client
        .generate(greedy("Write a very long story about a dragon.", 2000))
        .await
        .expect("starts")
        .into_inner();
    let first = stream.next().await.expect("a message").expect("no error");
    assert!(matches!(first.event, Some(Event::Text(_))));
    assert!(llama_busy(&http, &llama).await, "the server is generating");

    drop(stream);
    // 2000 tokens take about 30 s here; stopping takes a decode step plus
    // the server noticing the closed connection.
    let stopped = wait_for_llama(&http, &llama, false, Duration::from_secs(10)).await;
    wait_for_no_generation_in_flight(&mut client).await;
    eprintln!("llama.cpp server idle {stopped:?} after the client cancelled mid-generation");
}

#[tokio::test]
async fn openai_backend_stops_when_the_client_cancels_while_the_prompt_is_read() {
    let llama = LlamaServer::start();
    let server = TestServer::start(openai_config_for(&llama)).await;
    let mut client = server.client().await;
    let http = reqwest::Client::new();
    let request = GenerateRequest {
        prompt: long_prompt(100),
        ..greedy("", 2000)
    };
    let mut caller = client.clone();
    let call = tokio::spawn(async move {
        let mut stream = caller.generate(request).await?.into_inner();
        stream.next().await.transpose()
    });
    wait_for_llama(&http, &llama, true, Duration::from_secs(10)).await;
    call.abort();
    let cancelled = Instant::now();
    // llama.cpp reads the prompt in batches of 2048 tokens and checks for
    // cancellation between them; this prompt (~1000 tokens) is one batch.
    wait_for_llama(&http, &llama, false, Duration::from_secs(20)).await;
    wait_for_no_generation_in_flight(&mut client).await;
    eprintln!(
        "llama.cpp server idle {:?} after the client cancelled during the prompt",
        cancelled.elapsed()
    );
}

#[tokio::test]
async fn embedded_engine_drops_a_cancelled_prompt_within_one_chunk() {
    let server = TestServer::start(config(&["--backend", "embedded", "--parallel", "1"])).await;
    let mut client = server.client().await;
    let request = GenerateRequest {
        prompt: long_prompt(150),
        ..greedy("", 1)
    };
    let mut caller = client.clone();
    let call = tokio::spawn(async move {
        let mut stream = caller.generate(request).await?.into_inner();
        stream.next().await.transpose()
    });
    // The prompt (~1500 tokens) takes several seconds to read with one
    // sequence; cancel once reading is under way.
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert!(
        !call.is_finished(),
        "the long prompt is still being read: {:?}",
        call.await
    );
    call.abort();
    let cancelled = Instant::now();
    wait_for_no_generation_in_flight(&mut client).await;
    // The only sequence must be free for the next call long before the
    // cancelled prompt would have been read.
    let mut stream = client
        .generate(greedy("Say hi.", 1))
        .await
        .expect("starts")
        .into_inner();
    stream
        .next()
        .await
        .expect("a message")
        .expect("the next call is served");
    let freed = cancelled.elapsed();
    eprintln!("the next call's first token came {freed:?} after the cancel");
    assert!(
        freed < Duration::from_secs(4),
        "the cancelled prompt kept the engine busy for {freed:?}"
    );
}
