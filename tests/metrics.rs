//! Prometheus metrics on their own loopback address: calls by RPC, backend
//! and code, first-token times, admission state and backend health.

mod support;

use std::sync::Arc;

use async_trait::async_trait;
use futures_util::{StreamExt, stream};
use rigger_inference::{
    backend::{
        Backend, BackendError, Capabilities, Chunk, ChunkStream, Completion, FinishReason,
        GenerationRequest, ProbeReport, SchemaSupport,
    },
    config::MetricsListen,
    proto::{self, GenerateRequest},
    server::health::INFERENCE_SERVICE,
};
use support::{TestServer, config, free_port, generate, greedy};
use tokio::{net::TcpListener, sync::oneshot};
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

async fn scrape(address: &str) -> (String, String) {
    let response = reqwest::get(format!("http://{address}/metrics"))
        .await
        .expect("the metrics endpoint answers");
    assert!(response.status().is_success());
    let content_type = response.headers()["content-type"]
        .to_str()
        .unwrap()
        .to_owned();
    (content_type, response.text().await.unwrap())
}

#[tokio::test]
async fn metrics_count_calls_and_show_state() {
    let address = format!("127.0.0.1:{}", free_port());
    let mut settings = config(&["--backend", "embedded"]);
    settings.metrics_listen = MetricsListen(Some(address.parse().unwrap()));
    let server = TestServer::start(settings).await;
    let mut client = server.client().await;
    generate(&mut client, greedy("Name a colour.", 8))
        .await
        .expect("a generation");
    let refused = generate(
        &mut client,
        GenerateRequest {
            prompt: String::new(),
            ..Default::default()
        },
    )
    .await
    .expect_err("an empty prompt");
    assert_eq!(refused.code(), tonic::Code::InvalidArgument);

    let (content_type, text) = scrape(&address).await;
    assert!(content_type.starts_with("application/openmetrics-text"));
    for line in [
        "rigger_calls_total{rpc=\"generate\",backend=\"embedded\",code=\"Ok\"} 1",
        "rigger_calls_total{rpc=\"generate\",backend=\"embedded\",code=\"InvalidArgument\"} 1",
        "rigger_in_flight 0",
        "rigger_queue_depth{priority=\"batch\"} 0",
        "rigger_backend_up{backend=\"embedded\"} 1",
        "rigger_backend_active{backend=\"embedded\"} 1",
        "rigger_circuit_state{backend=\"embedded\"} 0",
        "rigger_backend_failures_total{backend=\"embedded\"} 0",
        "rigger_backend_retried_total{backend=\"embedded\"} 0",
        "rigger_time_to_first_token_seconds_count{rpc=\"generate\",backend=\"embedded\"} 1",
        "rigger_queue_wait_seconds_count{priority=\"interactive\"} 1",
    ] {
        assert!(text.contains(line), "{line} missing from\n{text}");
    }
}

/// An in-process backend that passes its probes; it answers every
/// generation with `answer`, or refuses it as down when there is none.
struct Scripted {
    name: &'static str,
    answer: Option<&'static str>,
}

#[async_trait]
impl Backend for Scripted {
    fn name(&self) -> &'static str {
        self.name
    }

    fn endpoint(&self) -> String {
        "in-process".to_owned()
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            streaming: true,
            json_schema: SchemaSupport::Enforced,
            seed: true,
        }
    }

    async fn probe(&self) -> Result<ProbeReport, BackendError> {
        Ok(ProbeReport {
            models: vec!["scripted".to_owned()],
            default_model: Some("scripted".to_owned()),
        })
    }

    async fn generate(&self, _request: GenerationRequest) -> Result<ChunkStream, BackendError> {
        let Some(answer) = self.answer else {
            return Err(BackendError::Unavailable {
                backend: self.name,
                endpoint: self.endpoint(),
                reason: "scripted to be down".to_owned(),
            });
        };
        let done = Chunk::Done(Completion {
            backend: self.name,
            model: "scripted".to_owned(),
            finish_reason: FinishReason::Stop,
            prompt_tokens: 8,
            completion_tokens: 4,
            cached_prompt_tokens: 0,
            engine_timings: None,
        });
        Ok(stream::iter([Ok(Chunk::Text(answer.to_owned())), Ok(done)]).boxed())
    }
}

const ENHANCEMENT: &str = r#"{"kind":"specify","title":"Match partial book titles in search","description":"Searching for part of a title finds nothing today; match partial, case-insensitive titles.","acceptance_criteria":["Searching 'potter' lists every Harry Potter book"]}"#;

#[tokio::test]
async fn a_unary_call_is_counted_under_the_backend_that_answered_after_failover() {
    let metrics_address = format!("127.0.0.1:{}", free_port());
    let mut settings = config(&[]);
    settings.metrics_listen = MetricsListen(Some(metrics_address.parse().unwrap()));
    // The first backend stays the active one: its probes pass, and one
    // failure does not open its circuit.
    let backends: Vec<Arc<dyn Backend>> = vec![
        Arc::new(Scripted {
            name: "failing",
            answer: None,
        }),
        Arc::new(Scripted {
            name: "answering",
            answer: Some(ENHANCEMENT),
        }),
    ];
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    let server = tokio::spawn(rigger_inference::app::serve_backends(
        listener,
        settings,
        backends,
        async {
            let _ = stopped.await;
        },
    ));
    let channel = tonic::transport::Channel::from_shared(format!("http://{address}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut watch = HealthClient::new(channel.clone())
        .watch(HealthCheckRequest {
            service: INFERENCE_SERVICE.into(),
        })
        .await
        .unwrap()
        .into_inner();
    while let Some(update) = watch.next().await {
        if update.unwrap().status == ServingStatus::Serving as i32 {
            break;
        }
    }

    let answer = proto::inference_service_client::InferenceServiceClient::new(channel)
        .enhance_task(proto::EnhanceTaskRequest {
            task: Some(proto::Task {
                id: "T-1".into(),
                title: "Fix search".into(),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .expect("the second backend answers")
        .into_inner();
    assert_eq!(answer.meta.unwrap().backend, "answering");

    let (_, text) = scrape(&metrics_address).await;
    for line in [
        "rigger_calls_total{rpc=\"enhance_task\",backend=\"answering\",code=\"Ok\"} 1",
        "rigger_backend_active{backend=\"failing\"} 1",
        "rigger_backend_retried_total{backend=\"failing\"} 1",
    ] {
        assert!(text.contains(line), "{line} missing from\n{text}");
    }
    assert!(
        !text.contains("rpc=\"enhance_task\",backend=\"failing\""),
        "counted under the backend that failed:\n{text}"
    );
    stop.send(()).unwrap();
    server.await.unwrap().unwrap();
}
