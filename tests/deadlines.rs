//! The client's gRPC deadline bounds the call, streams included: past it the
//! call ends and the backend request is dropped.
//!
//! tonic clients enforce their own deadline and report it as CANCELLED
//! "Timeout expired" (tonic maps its TimeoutExpired so); other gRPC clients
//! report DEADLINE_EXCEEDED.

mod support;

use std::{sync::atomic::Ordering, time::Duration};

use futures_util::StreamExt;
use rigger_inference::proto::{DecomposeTaskRequest, GenerateRequest, SamplingOptions, Task};
use support::{TestServer, config, llama, ollama::OllamaStandIn};
use tonic::{Code, Request};

fn assert_deadline_expired(status: &tonic::Status) {
    assert_eq!(status.code(), Code::Cancelled, "{status:?}");
    assert_eq!(status.message(), "Timeout expired", "{status:?}");
}

fn with_deadline<T>(message: T, deadline: Duration) -> Request<T> {
    let mut request = Request::new(message);
    request.set_timeout(deadline);
    request
}

#[tokio::test]
async fn unary_and_streaming_calls_end_at_the_deadline_and_stop_the_backend() {
    let stand_in = OllamaStandIn::start(&llama().openai_url()).await;
    let server = TestServer::start(config(&[
        "--backend",
        "ollama",
        "--ollama-host",
        &stand_in.host(),
    ]))
    .await;
    let mut client = server.client().await;

    let status = client
        .decompose_task(with_deadline(
            DecomposeTaskRequest {
                task: Some(Task {
                    title: "Plan a database migration".into(),
                    ..Default::default()
                }),
                ..Default::default()
            },
            Duration::from_millis(300),
        ))
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

    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while stand_in.controls.abandoned.load(Ordering::SeqCst) < 2 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "both backend requests must be dropped, saw {}",
            stand_in.controls.abandoned.load(Ordering::SeqCst)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(stand_in.controls.completed.load(Ordering::SeqCst), 0);
}
