//! Reflection serves the contracts on both protocol versions: v1alpha (what
//! grpcio, ghz and many grpcurl builds ask) through an independent Python
//! client that knows nothing but the address, and v1 through tonic's client.

mod support;

use std::process::Command;

use futures_util::StreamExt;
use support::{MODEL_ALIAS, TestServer, openai_config, python, repo_path};
use tonic_reflection::pb::v1::{
    ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
    server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_with_only_reflection_calls_every_rpc() {
    let server = TestServer::start(openai_config()).await;
    let address = server.addr.to_string();
    let output = tokio::task::spawn_blocking(move || {
        Command::new(python())
            .arg(repo_path("tests/python/reflection_client.py"))
            .arg(address)
            .output()
            .expect("run the reflection client")
    })
    .await
    .unwrap();
    assert!(
        output.status.success(),
        "reflection client failed:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&output.stdout).expect("JSON report");

    let services = report["services"].as_array().unwrap();
    for service in [
        "grpc.health.v1.Health",
        "rigger.inference.v1.InferenceService",
    ] {
        assert!(services.iter().any(|s| s == service), "{services:?}");
    }
    assert_eq!(report["health"], "SERVING");
    assert_eq!(report["unknown_health"], "NOT_FOUND");
    assert_eq!(report["status"]["activeBackend"], "openai");
    assert_eq!(report["status"]["model"], MODEL_ALIAS);

    let events = report["generate"].as_array().unwrap();
    let (summary, texts) = events.split_last().expect("events");
    assert!(texts.iter().all(|event| event["text"].is_string()));
    assert_eq!(summary["summary"]["finishReason"], "FINISH_REASON_LENGTH");
    assert_eq!(summary["summary"]["meta"]["completionTokens"], 8);

    assert_eq!(
        report["enhance"]["enhancement"]["kind"],
        "ENHANCEMENT_KIND_CLARIFY"
    );
    assert!(report["enhance"]["enhancement"]["acceptanceCriteria"].is_array());
    assert_eq!(report["models"]["models"][0]["name"], MODEL_ALIAS);
    assert_eq!(report["models"]["models"][0]["backend"], "openai");
    assert_eq!(
        report["load"], "UNIMPLEMENTED",
        "an OpenAI-compatible server loads its models itself"
    );
    assert_eq!(report["invalid"]["code"], "INVALID_ARGUMENT");
    assert_eq!(
        report["invalid"]["message"],
        "invalid task.complexity: 11 is outside 1..=10"
    );
}

#[tokio::test]
async fn reflection_v1_lists_the_services() {
    let server = TestServer::start(openai_config()).await;
    let mut client = ServerReflectionClient::new(server.channel().await);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut responses = client
        .server_reflection_info(futures_util::stream::iter([request]))
        .await
        .expect("reflection v1 is served")
        .into_inner();
    let response = responses
        .next()
        .await
        .expect("a response")
        .expect("no error");
    let Some(MessageResponse::ListServicesResponse(list)) = response.message_response else {
        panic!("unexpected reflection answer: {response:?}");
    };
    let names: Vec<String> = list
        .service
        .into_iter()
        .map(|service| service.name)
        .collect();
    assert!(
        names.contains(&"rigger.inference.v1.InferenceService".to_owned()),
        "{names:?}"
    );
    assert!(
        names.contains(&"grpc.health.v1.Health".to_owned()),
        "{names:?}"
    );
}
