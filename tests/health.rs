//! Health against real runtimes: readiness that follows a llama.cpp server
//! as it stops and returns (a fresh connection after the restart), `auto`
//! selection among the runtimes that answer, and the embedded engine's
//! model load. The protocol itself (Check, Watch, entries that follow
//! circuits and probes, readiness by generation) is the fast tier's, in
//! tests/fast/health.rs.

mod support;

use futures_util::StreamExt;
use rigger_inference::{
    proto::{GenerateRequest, GetStatusRequest, SamplingOptions},
    server::health::INFERENCE_SERVICE,
};
use support::{
    LlamaServer, TestServer, config, free_port,
    health::{check, next_status, watch_until},
    llama,
};
use tonic::Code;
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

#[tokio::test]
async fn readiness_follows_the_backend_down_and_back_up() {
    let port = free_port();
    let mut backend = LlamaServer::start_on(port);
    let url = format!("http://127.0.0.1:{port}/v1");
    let server =
        TestServer::start(config(&["--backend", "openai", "--openai-base-url", &url])).await;
    let channel = server.channel().await;
    let mut health = HealthClient::new(channel.clone());
    let mut inference =
        rigger_inference::proto::inference_service_client::InferenceServiceClient::new(
            channel.clone(),
        );

    let mut watch = health
        .watch(HealthCheckRequest {
            service: INFERENCE_SERVICE.into(),
        })
        .await
        .unwrap()
        .into_inner();
    watch_until(&mut watch, ServingStatus::Serving).await;
    assert_eq!(check(&channel, "").await, ServingStatus::Serving);
    assert_eq!(
        check(&channel, "rigger.backend.openai").await,
        ServingStatus::Serving
    );

    backend.stop();
    assert_eq!(
        next_status(&mut watch).await,
        ServingStatus::NotServing,
        "one change, no repeats"
    );
    assert_eq!(
        check(&channel, "rigger.backend.openai").await,
        ServingStatus::NotServing
    );
    assert_eq!(
        check(&channel, "").await,
        ServingStatus::Serving,
        "the process is alive"
    );
    let status = inference
        .generate(GenerateRequest {
            prompt: "Hi".into(),
            ..Default::default()
        })
        .await
        .expect_err("backend is down");
    assert_eq!(status.code(), Code::Unavailable);
    let report = inference
        .get_status(GetStatusRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(
        report.backends[0].last_error.contains("unavailable"),
        "{report:?}"
    );

    let _backend = LlamaServer::start_on(port);
    assert_eq!(next_status(&mut watch).await, ServingStatus::Serving);
    let mut stream = inference
        .generate(GenerateRequest {
            prompt: "Hi".into(),
            sampling: Some(SamplingOptions {
                max_tokens: Some(3),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .expect("backend is back")
        .into_inner();
    while let Some(message) = stream.next().await {
        message.expect("generation succeeds");
    }
}

#[tokio::test]
async fn auto_picks_a_reachable_backend_over_an_absent_ollama() {
    let no_ollama = format!("127.0.0.1:{}", free_port());
    let server = TestServer::start(config(&[
        "--backend",
        "auto",
        "--ollama-host",
        &no_ollama,
        "--openai-base-url",
        &llama().openai_url(),
    ]))
    .await;
    let mut inference = server.client().await;
    let report = inference
        .get_status(GetStatusRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(report.active_backend, "openai");
    assert_eq!(report.model, support::MODEL_ALIAS);
    let names: Vec<&str> = report.backends.iter().map(|b| b.name.as_str()).collect();
    assert_eq!(names, ["ollama", "openai"]);
    assert!(!report.backends[0].active && report.backends[1].active);
    assert_eq!(report.backends[1].health_service, "rigger.backend.openai");
    let platform = report.platform.expect("platform");
    assert_eq!(platform.os, std::env::consts::OS);
    let channel = server.channel().await;
    assert_eq!(
        check(&channel, "rigger.backend.ollama").await,
        ServingStatus::NotServing
    );
    assert_eq!(
        check(&channel, INFERENCE_SERVICE).await,
        ServingStatus::Serving
    );
}

#[tokio::test]
async fn auto_falls_back_to_the_embedded_engine_when_no_runtime_answers() {
    let no_ollama = format!("127.0.0.1:{}", free_port());
    let server =
        TestServer::start(config(&["--backend", "auto", "--ollama-host", &no_ollama])).await;
    let mut inference = server.client().await;
    let report = inference
        .get_status(GetStatusRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(report.active_backend, "embedded");
    let names: Vec<&str> = report.backends.iter().map(|b| b.name.as_str()).collect();
    assert_eq!(names, ["ollama", "embedded"]);
    if cfg!(target_os = "linux") {
        let mlx = report
            .skipped_backends
            .iter()
            .find(|skipped| skipped.name == "mlx")
            .expect("auto says why MLX was left out");
        assert!(mlx.reason.contains("accelerator"), "{mlx:?}");
    }
    let channel = server.channel().await;
    assert_eq!(
        check(&channel, "rigger.backend.embedded").await,
        ServingStatus::Serving
    );
    assert_eq!(
        check(&channel, INFERENCE_SERVICE).await,
        ServingStatus::Serving,
        "ready once loaded"
    );
}

/// A model "file" that is a named pipe: loading blocks on it until the test
/// writes, so the test sees the server while its model loads, for sure.
#[cfg(unix)]
#[tokio::test]
async fn health_answers_while_the_model_loads_and_a_corrupt_model_stops_startup() {
    let fifo = std::env::temp_dir().join(format!("rigger-loading-{}.gguf", std::process::id()));
    let _ = std::fs::remove_file(&fifo);
    let made = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .expect("run mkfifo");
    assert!(made.success());
    let server = TestServer::spawn(config(&[
        "--backend",
        "embedded",
        "--model-path",
        fifo.to_str().unwrap(),
    ]))
    .await;

    let channel = server.channel().await;
    let mut health = HealthClient::new(channel.clone());
    assert_eq!(check(&channel, "").await, ServingStatus::Serving);
    assert_eq!(
        check(&channel, INFERENCE_SERVICE).await,
        ServingStatus::NotServing,
        "not ready while the model loads"
    );
    let mut backend_watch = health
        .watch(HealthCheckRequest {
            service: "rigger.backend.embedded".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        next_status(&mut backend_watch).await,
        ServingStatus::ServiceUnknown,
        "backend entries exist once the backends do"
    );
    let refused = server
        .client()
        .await
        .get_status(GetStatusRequest {})
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::Unavailable);
    assert!(refused.message().contains("starting"), "{refused:?}");

    let writer = std::thread::spawn({
        let fifo = fifo.clone();
        move || std::fs::write(fifo, b"not a model")
    });
    let error = server.exited().await.expect_err("startup fails");
    // The catalog sees a pipe's length as 0, so it may refuse the "file"
    // and close its end before these bytes land: a broken pipe then.
    match writer.join().unwrap() {
        Ok(()) => {}
        Err(error) => assert_eq!(error.kind(), std::io::ErrorKind::BrokenPipe, "{error}"),
    }
    let _ = std::fs::remove_file(&fifo);
    let message = error.to_string();
    assert!(
        message.contains(fifo.to_str().unwrap()) && message.contains("GGUF"),
        "{message}"
    );
}
