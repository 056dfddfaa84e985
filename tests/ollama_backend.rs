//! The Ollama backend against the Ollama stand-in (tests/support/ollama.rs),
//! which follows Ollama's documented wire format and generates with the real
//! llama.cpp server.

mod support;

use std::{sync::atomic::Ordering, time::Duration};

use futures_util::StreamExt;
use rigger_inference::proto::{
    EnhanceTaskRequest, GenerateRequest, SamplingOptions, Task, generate_response::Event,
};
use support::{
    TestServer, config, greedy, llama,
    ollama::{MODEL, OllamaStandIn},
};
use tonic::Code;

async fn serve_with(stand_in: &OllamaStandIn) -> TestServer {
    TestServer::start(config(&[
        "--backend",
        "ollama",
        "--ollama-host",
        &stand_in.host(),
    ]))
    .await
}

#[tokio::test]
async fn generate_streams_ollama_lines_and_reports_its_statistics() {
    let stand_in = OllamaStandIn::start(&llama().openai_url()).await;
    let server = serve_with(&stand_in).await;
    let mut client = server.client().await;
    let mut stream = client
        .generate(greedy("Name a fruit.", 10))
        .await
        .expect("Generate accepted")
        .into_inner();
    let mut text = String::new();
    let mut summary = None;
    while let Some(message) = stream.next().await {
        match message.expect("no error").event.expect("event") {
            Event::Text(piece) => text.push_str(&piece),
            Event::Summary(last) => summary = Some(last),
        }
    }
    let summary = summary.expect("a summary");
    let meta = summary.meta.expect("meta");
    assert!(!text.is_empty());
    assert_eq!(meta.backend, "ollama");
    assert_eq!(meta.model, MODEL, "the first pulled model is the default");
    assert_eq!(meta.completion_tokens, 10);
    assert!(meta.prompt_tokens > 0);
    let generation = meta
        .backend_generation_time
        .expect("Ollama's eval_duration, converted");
    assert!(
        generation.seconds > 0 || generation.nanos > 1_000_000,
        "{generation:?}"
    );
    assert_eq!(stand_in.controls.completed.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn structured_tasks_work_over_ollama() {
    let stand_in = OllamaStandIn::start(&llama().openai_url()).await;
    let server = serve_with(&stand_in).await;
    let mut client = server.client().await;
    let response = client
        .enhance_task(EnhanceTaskRequest {
            task: Some(Task {
                title: "Add a logout button".into(),
                ..Default::default()
            }),
            model: MODEL.into(),
            sampling: Some(SamplingOptions {
                temperature: Some(0.0),
                seed: Some(2),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .expect("EnhanceTask over Ollama")
        .into_inner();
    let enhancement = response.enhancement.expect("enhancement");
    assert!(!enhancement.title.is_empty() && !enhancement.acceptance_criteria.is_empty());
    assert_eq!(response.meta.expect("meta").backend, "ollama");
}

#[tokio::test]
async fn a_model_ollama_has_not_pulled_is_not_found() {
    let stand_in = OllamaStandIn::start(&llama().openai_url()).await;
    let server = serve_with(&stand_in).await;
    let mut client = server.client().await;
    let status = client
        .generate(GenerateRequest {
            model: "llama3.1".into(),
            ..greedy("Hi", 4)
        })
        .await
        .expect_err("llama3.1 is not pulled");
    assert_eq!(status.code(), Code::NotFound);
    assert!(
        status.message().contains("\"llama3.1\""),
        "{}",
        status.message()
    );
}

#[tokio::test]
async fn a_busy_ollama_is_unavailable() {
    let stand_in = OllamaStandIn::start(&llama().openai_url()).await;
    stand_in.controls.busy.store(true, Ordering::SeqCst);
    let server = serve_with(&stand_in).await;
    let mut client = server.client().await;
    let status = client.generate(greedy("Hi", 4)).await.expect_err("busy");
    assert_eq!(status.code(), Code::Unavailable);
    assert!(
        status
            .message()
            .contains("maximum pending requests exceeded"),
        "{}",
        status.message()
    );
}

#[tokio::test]
async fn an_error_line_mid_stream_ends_the_stream_with_that_error() {
    let stand_in = OllamaStandIn::start(&llama().openai_url()).await;
    stand_in.controls.fail_after.store(3, Ordering::SeqCst);
    let server = serve_with(&stand_in).await;
    let mut client = server.client().await;
    let mut stream = client
        .generate(greedy("Tell a story.", 30))
        .await
        .unwrap()
        .into_inner();
    let mut texts = 0;
    let status = loop {
        match stream
            .next()
            .await
            .expect("the stream ends with an error, not silently")
        {
            Ok(message) => match message.event.expect("event") {
                Event::Text(_) => texts += 1,
                Event::Summary(summary) => panic!("no summary after an error: {summary:?}"),
            },
            Err(status) => break status,
        }
    };
    assert_eq!(texts, 3, "the text before the error is delivered");
    assert_eq!(status.code(), Code::Internal);
    assert!(
        status
            .message()
            .contains("error was encountered while running the model"),
        "{}",
        status.message()
    );
}

#[tokio::test]
async fn a_client_that_goes_away_drops_the_request_to_ollama() {
    let stand_in = OllamaStandIn::start(&llama().openai_url()).await;
    let server = serve_with(&stand_in).await;
    let mut client = server.client().await;
    let mut stream = client
        .generate(greedy("Write a long essay about rivers.", 2000))
        .await
        .unwrap()
        .into_inner();
    assert!(
        matches!(stream.next().await, Some(Ok(_))),
        "generation started"
    );
    drop(stream);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while stand_in.controls.abandoned.load(Ordering::SeqCst) == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the /api/chat request was not dropped"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(stand_in.controls.completed.load(Ordering::SeqCst), 0);
}
