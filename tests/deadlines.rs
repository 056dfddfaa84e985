//! The client's gRPC deadline (or the server's default) bounds the call,
//! streams included: past it the call ends with DEADLINE_EXCEEDED and the
//! backend request is dropped.

mod support;

use std::{sync::atomic::Ordering, time::Duration};

use futures_util::StreamExt;
use rigger_inference::proto::{DecomposeTaskRequest, GenerateRequest, SamplingOptions, Task};
use support::{TestServer, config, llama, ollama::OllamaStandIn};
use tonic::{Code, Request};

fn assert_deadline_expired(status: &tonic::Status) {
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    assert!(status.message().contains("deadline"), "{status:?}");
}

fn with_deadline<T>(message: T, deadline: Duration) -> Request<T> {
    let mut request = Request::new(message);
    request.set_timeout(deadline);
    request
}

/// A decomposition that takes longer than the deadlines below.
fn plan_migration(deadline: Duration) -> Request<DecomposeTaskRequest> {
    with_deadline(
        DecomposeTaskRequest {
            task: Some(Task {
                title: "Plan a database migration".into(),
                ..Default::default()
            }),
            ..Default::default()
        },
        deadline,
    )
}

async fn wait_until_abandoned(stand_in: &OllamaStandIn, count: usize) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while stand_in.controls.abandoned.load(Ordering::SeqCst) < count {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{count} backend requests must be dropped, saw {}",
            stand_in.controls.abandoned.load(Ordering::SeqCst)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(stand_in.controls.completed.load(Ordering::SeqCst), 0);
}

async fn ollama_server(stand_in: &OllamaStandIn, flags: &[&str]) -> TestServer {
    let host = stand_in.host();
    let mut all = vec!["--backend", "ollama", "--ollama-host", &host];
    all.extend_from_slice(flags);
    TestServer::start(config(&all)).await
}

#[tokio::test]
async fn unary_and_streaming_calls_end_at_the_deadline_and_stop_the_backend() {
    let stand_in = OllamaStandIn::start(&llama().openai_url()).await;
    let server = ollama_server(&stand_in, &[]).await;
    let mut client = server.client().await;

    let status = client
        .decompose_task(plan_migration(Duration::from_millis(300)))
        .await
        .expect_err("a decomposition takes longer than 300 ms");
    assert_deadline_expired(&status);

    let started = tokio::time::Instant::now();
    let outcome = async {
        let mut stream = client
            .generate(with_deadline(
                GenerateRequest {
                    prompt: "Write a very long essay about the sea.".into(),
                    sampling: Some(SamplingOptions {
                        max_tokens: Some(4000),
                        ..Default::default()
                    }),
                    ..Default::default()
                },
                Duration::from_millis(700),
            ))
            .await?
            .into_inner();
        while let Some(message) = stream.next().await {
            message?;
        }
        Ok::<_, tonic::Status>(())
    }
    .await;
    let status = outcome.expect_err("4000 tokens take longer than 700 ms");
    assert_deadline_expired(&status);
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "ended near the deadline"
    );

    wait_until_abandoned(&stand_in, 2).await;
}

#[tokio::test]
async fn calls_get_the_servers_default_deadline_and_at_most_its_maximum() {
    let stand_in = OllamaStandIn::start(&llama().openai_url()).await;
    let server = ollama_server(
        &stand_in,
        &["--default-deadline", "400ms", "--max-deadline", "600ms"],
    )
    .await;
    let mut client = server.client().await;
    let started = tokio::time::Instant::now();
    let mut stream = client
        .generate(GenerateRequest {
            prompt: "Write a very long essay about mountains.".into(),
            sampling: Some(SamplingOptions {
                max_tokens: Some(4000),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .expect("the stream starts")
        .into_inner();
    let status = loop {
        match stream.next().await {
            Some(Ok(_)) => {}
            Some(Err(status)) => break status,
            None => panic!("the stream ended without an error"),
        }
    };
    assert_deadline_expired(&status);
    assert!(started.elapsed() < Duration::from_secs(3));

    let started = tokio::time::Instant::now();
    let status = client
        .decompose_task(plan_migration(Duration::from_secs(3600)))
        .await
        .expect_err("the server's maximum is shorter than a decomposition");
    assert_deadline_expired(&status);
    assert!(started.elapsed() < Duration::from_secs(3));
    wait_until_abandoned(&stand_in, 2).await;
}
