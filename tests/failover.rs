//! Failover along `--backends`: a backend that is down or full before the
//! first token passes the call to the next one; consecutive failures open
//! its circuit (calls skip it, health says NOT_SERVING), a trial after the
//! cooldown closes it again and calls move back, all without a restart.
//! Nothing is retried once text has reached the client.
//!
//! The first backend is the Ollama stand-in (tests/support/ollama.rs, which
//! can be stopped, restarted, made busy or made to crash mid-stream); the
//! second is the real llama.cpp server through the `openai` backend.

mod support;

use std::{
    sync::atomic::Ordering,
    time::{Duration, Instant},
};

use futures_util::StreamExt;
use rigger_inference::{
    proto::{
        BackendStatus, CircuitState, GenerateRequest, GetStatusRequest, generate_response::Event,
        inference_service_client::InferenceServiceClient,
    },
    server::health::INFERENCE_SERVICE,
};
use support::{TestServer, config, free_port, generate, greedy, llama, ollama::OllamaStandIn};
use tonic::{Code, transport::Channel};
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

const COOLDOWN: Duration = Duration::from_millis(1500);

/// Ollama first, the llama.cpp server second; two failures open a circuit.
/// Probes are rare unless asked, so that calls alone drive the circuits.
async fn serve(ollama_host: &str, probe_interval: Duration) -> TestServer {
    let mut config = config(&[
        "--backends",
        "ollama,openai",
        "--ollama-host",
        ollama_host,
        "--openai-base-url",
        &llama().openai_url(),
        "--breaker-failures",
        "2",
        "--breaker-cooldown",
        "1500ms",
    ]);
    config.probe_interval = probe_interval;
    TestServer::start(config).await
}

async fn backends(client: &mut InferenceServiceClient<Channel>) -> (String, Vec<BackendStatus>) {
    let report = client
        .get_status(GetStatusRequest {})
        .await
        .expect("GetStatus")
        .into_inner();
    (report.active_backend, report.backends)
}

async fn ollama_status(client: &mut InferenceServiceClient<Channel>) -> BackendStatus {
    let (_, backends) = backends(client).await;
    assert_eq!(backends[0].name, "ollama");
    backends[0].clone()
}

/// Which backend answered a short greedy generation.
async fn answered_by(client: &mut InferenceServiceClient<Channel>) -> String {
    let generated = generate(client, greedy("Say hello.", 4))
        .await
        .expect("the call succeeds");
    generated.summary.meta.expect("meta").backend
}

async fn health(channel: Channel, service: &str) -> ServingStatus {
    let response = HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: service.into(),
        })
        .await
        .expect("known service")
        .into_inner();
    ServingStatus::try_from(response.status).expect("a known status")
}

#[tokio::test]
async fn calls_fail_over_while_a_backend_is_down_and_move_back_after_a_trial() {
    let stand_in = OllamaStandIn::start(&llama().openai_url()).await;
    let addr = stand_in.addr;
    let server = serve(&stand_in.host(), Duration::from_secs(3600)).await;
    let mut client = server.client().await;
    assert_eq!(answered_by(&mut client).await, "ollama");

    drop(stand_in);
    let failing_over = Instant::now();
    assert_eq!(
        answered_by(&mut client).await,
        "openai",
        "the call moves on before its first token"
    );
    let failover_latency = failing_over.elapsed();
    let ollama = ollama_status(&mut client).await;
    assert_eq!(ollama.circuit(), CircuitState::Closed, "one failure of two");
    assert_eq!((ollama.consecutive_failures, ollama.retried), (1, 1));

    assert_eq!(answered_by(&mut client).await, "openai");
    let opened = Instant::now();
    let (active, statuses) = backends(&mut client).await;
    assert_eq!(statuses[0].circuit(), CircuitState::Open);
    assert_eq!(active, "openai");
    assert!(statuses[1].active && !statuses[0].active);
    let channel = server.channel().await;
    assert_eq!(
        health(channel.clone(), "rigger.backend.ollama").await,
        ServingStatus::NotServing
    );
    assert_eq!(
        health(channel.clone(), INFERENCE_SERVICE).await,
        ServingStatus::Serving,
        "the service still serves, from the next backend"
    );

    assert_eq!(answered_by(&mut client).await, "openai");
    let ollama = ollama_status(&mut client).await;
    assert_eq!(
        (ollama.failures, ollama.retried),
        (2, 2),
        "an open circuit is skipped, not tried"
    );

    let stand_in = OllamaStandIn::start_on(addr, &llama().openai_url()).await;
    tokio::time::sleep(COOLDOWN.saturating_sub(opened.elapsed())).await;
    let recovering = Instant::now();
    assert_eq!(
        answered_by(&mut client).await,
        "ollama",
        "after the cooldown a trial call goes to the first backend"
    );
    let (active, statuses) = backends(&mut client).await;
    assert_eq!(statuses[0].circuit(), CircuitState::Closed);
    assert_eq!(statuses[0].consecutive_failures, 0);
    assert_eq!(active, "ollama");
    assert_eq!(
        health(channel, "rigger.backend.ollama").await,
        ServingStatus::Serving
    );
    assert_eq!(stand_in.controls.completed.load(Ordering::SeqCst), 1);
    eprintln!(
        "failover call {failover_latency:?}; recovery call {:?} after a {COOLDOWN:?} cooldown",
        recovering.elapsed()
    );
}

#[tokio::test]
async fn a_crash_before_the_first_token_moves_the_call_on_and_after_it_does_not() {
    let stand_in = OllamaStandIn::start(&llama().openai_url()).await;
    let server = serve(&stand_in.host(), Duration::from_secs(3600)).await;
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
    let server = serve(&stand_in.host(), Duration::from_secs(3600)).await;
    let mut client = server.client().await;
    stand_in.controls.busy.store(true, Ordering::SeqCst);
    for _ in 0..3 {
        assert_eq!(answered_by(&mut client).await, "openai");
    }
    let ollama = ollama_status(&mut client).await;
    assert_eq!(ollama.circuit(), CircuitState::Closed, "busy is not down");
    assert_eq!((ollama.failures, ollama.retried), (0, 3));
}

#[tokio::test]
async fn errors_about_the_request_are_not_retried() {
    let stand_in = OllamaStandIn::start(&llama().openai_url()).await;
    let server = serve(&stand_in.host(), Duration::from_secs(3600)).await;
    let mut client = server.client().await;
    let status = generate(
        &mut client,
        GenerateRequest {
            model: "llama3.1".into(),
            ..greedy("Hi", 4)
        },
    )
    .await
    .expect_err("no backend serves that model");
    assert_eq!(status.code(), Code::NotFound);
    let ollama = ollama_status(&mut client).await;
    assert_eq!((ollama.failures, ollama.retried), (0, 0));
}

#[tokio::test]
async fn a_first_backend_absent_at_start_takes_calls_once_it_appears() {
    let addr = format!("127.0.0.1:{}", free_port());
    let server = serve(&addr, Duration::from_millis(200)).await;
    let mut client = server.client().await;
    let channel = server.channel().await;
    assert_eq!(answered_by(&mut client).await, "openai");
    assert_eq!(
        health(channel.clone(), "rigger.backend.ollama").await,
        ServingStatus::NotServing
    );

    let stand_in =
        OllamaStandIn::start_on(addr.parse().expect("address"), &llama().openai_url()).await;
    let appeared = Instant::now();
    let mut watch = HealthClient::new(channel)
        .watch(HealthCheckRequest {
            service: "rigger.backend.ollama".into(),
        })
        .await
        .expect("watch")
        .into_inner();
    loop {
        let message = tokio::time::timeout(Duration::from_secs(10), watch.next())
            .await
            .expect("a probe sees the backend within the wait")
            .expect("open")
            .expect("no error");
        if message.status == ServingStatus::Serving as i32 {
            break;
        }
    }
    let detected = appeared.elapsed();
    assert_eq!(answered_by(&mut client).await, "ollama");
    assert_eq!(backends(&mut client).await.0, "ollama");
    assert_eq!(stand_in.controls.completed.load(Ordering::SeqCst), 1);
    eprintln!("the returning backend was seen after {detected:?} (probe interval 200ms)");
}
