//! SIGTERM on the real binary: readiness goes NOT_SERVING first, new calls
//! are refused, an open stream on the llama.cpp server finishes within the
//! grace period, and the process exits 0. What the drain does past the grace
//! period is the fast tier's (tests/fast/drain.rs): only the signal needs
//! the real binary.

mod support;

use std::{
    process::{Child, Command, Stdio},
    time::Duration,
};

use futures_util::StreamExt;
use rigger_inference::{
    proto::{
        FinishReason, generate_response::Event, inference_service_client::InferenceServiceClient,
    },
    server::health::INFERENCE_SERVICE,
};
use support::{free_port, greedy, llama};
use tonic::transport::Channel;
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

const STORY: &str = "Write a long story about a lighthouse keeper.";

struct Binary {
    child: Child,
    address: String,
}

impl Binary {
    fn start(grace: &str) -> Self {
        let address = format!("127.0.0.1:{}", free_port());
        let child = Command::new(env!("CARGO_BIN_EXE_rigger-inference"))
            .env("RIGGER_LISTEN", &address)
            .env("RIGGER_METRICS_LISTEN", "off")
            .env("INFERENCE_BACKEND", "openai")
            .env("OPENAI_BASE_URL", llama().openai_url())
            .env("RIGGER_PROBE_INTERVAL", "200ms")
            .env("RIGGER_SHUTDOWN_GRACE", grace)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start the binary");
        Self { child, address }
    }

    async fn channel(&self) -> Channel {
        let endpoint = Channel::from_shared(format!("http://{}", self.address)).unwrap();
        for _ in 0..200 {
            if let Ok(channel) = endpoint.connect().await {
                return channel;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("the binary did not start listening on {}", self.address);
    }

    fn terminate(&self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success());
    }

    async fn exit_code(mut self) -> Option<i32> {
        tokio::task::spawn_blocking(move || self.child.wait().expect("wait for the binary"))
            .await
            .unwrap()
            .code()
    }
}

#[tokio::test]
async fn sigterm_drains_open_streams_and_refuses_new_calls() {
    let binary = Binary::start("30s");
    let channel = binary.channel().await;
    let mut health = HealthClient::new(channel.clone());
    let mut inference = InferenceServiceClient::new(channel.clone());
    let mut watch = health
        .watch(HealthCheckRequest {
            service: INFERENCE_SERVICE.into(),
        })
        .await
        .unwrap()
        .into_inner();
    loop {
        let message = watch.next().await.expect("watch open").expect("no error");
        if message.status == ServingStatus::Serving as i32 {
            break;
        }
    }
    let mut stream = inference
        .generate(greedy(STORY, 120))
        .await
        .unwrap()
        .into_inner();
    assert!(
        matches!(stream.next().await, Some(Ok(_))),
        "generation started"
    );

    binary.terminate();
    let message = watch
        .next()
        .await
        .expect("a last health message")
        .expect("no error");
    assert_eq!(message.status, ServingStatus::NotServing as i32);
    assert!(
        watch.next().await.is_none(),
        "Watch ends instead of holding the drain open"
    );

    let refused = inference
        .generate(greedy(STORY, 4))
        .await
        .expect_err("no new calls while draining");
    assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused:?}");

    let mut summary = None;
    while let Some(message) = stream.next().await {
        if let Some(Event::Summary(last)) = message.expect("the open stream finishes").event {
            summary = Some(last);
        }
    }
    let summary = summary.expect("the open stream ends with its summary");
    assert_eq!(summary.finish_reason, FinishReason::Length as i32);
    assert_eq!(summary.meta.unwrap().completion_tokens, 120);
    drop((health, inference, channel));
    assert_eq!(binary.exit_code().await, Some(0));
}
