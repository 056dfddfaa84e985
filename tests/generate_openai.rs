//! Generate through the OpenAI-compatible backend against a real llama.cpp
//! server: streaming, usage, stop sequences, JSON Schema, model lookup; and
//! against a port nothing listens on.

mod support;

use rigger_inference::proto::{ChatMessage, FinishReason, GenerateRequest, Role, SamplingOptions};
use support::{MODEL_ALIAS, TestServer, collect, config, free_port, openai_config};
use tonic::Code;

fn greedy(max_tokens: u32) -> Option<SamplingOptions> {
    Some(SamplingOptions {
        max_tokens: Some(max_tokens),
        temperature: Some(0.0),
        seed: Some(7),
        ..Default::default()
    })
}

#[tokio::test]
async fn streams_text_then_one_summary_with_usage_and_timings() {
    let server = TestServer::start(openai_config()).await;
    let mut client = server.client().await;
    let stream = client
        .generate(GenerateRequest {
            messages: vec![
                ChatMessage {
                    role: Role::System as i32,
                    content: "You answer briefly.".into(),
                },
                ChatMessage {
                    role: Role::User as i32,
                    content: "Name three colors.".into(),
                },
            ],
            sampling: greedy(12),
            ..Default::default()
        })
        .await
        .expect("Generate accepted")
        .into_inner();
    let support::Generated {
        text,
        summary,
        pieces,
    } = collect(stream).await.expect("generation succeeded");
    assert!(!text.trim().is_empty());
    assert!(pieces > 1, "text arrives in several messages, got {pieces}");
    let meta = summary.meta.expect("summary has meta");
    assert_eq!(meta.backend, "openai");
    assert_eq!(meta.model, MODEL_ALIAS);
    assert!(meta.prompt_tokens > 5, "{meta:?}");
    assert_eq!(meta.completion_tokens, 12, "greedy run to the token limit");
    assert_eq!(summary.finish_reason, FinishReason::Length as i32);
    let ttft = meta.time_to_first_token.expect("ttft");
    let total = meta.total_time.expect("total");
    assert!((ttft.seconds, ttft.nanos) <= (total.seconds, total.nanos));
    assert!(
        meta.backend_generation_time.is_some(),
        "llama.cpp reports its timings"
    );
}

#[tokio::test]
async fn same_seed_same_text_and_stop_sequences_end_the_output() {
    let server = TestServer::start(openai_config()).await;
    let mut client = server.client().await;
    let request = GenerateRequest {
        prompt: "Count from 1 to 20, separated by commas.".into(),
        sampling: greedy(40),
        ..Default::default()
    };
    let first = collect(client.generate(request.clone()).await.unwrap().into_inner())
        .await
        .unwrap();
    let second = collect(client.generate(request.clone()).await.unwrap().into_inner())
        .await
        .unwrap();
    assert_eq!(
        first.text, second.text,
        "same request, same seed: same text"
    );
    assert!(
        first.text.contains('5'),
        "the model counts: {:?}",
        first.text
    );

    let stopped = collect(
        client
            .generate(GenerateRequest {
                stop: vec!["5".into()],
                ..request
            })
            .await
            .unwrap()
            .into_inner(),
    )
    .await
    .unwrap();
    assert!(!stopped.text.contains('5'), "{:?}", stopped.text);
    assert_eq!(stopped.summary.finish_reason, FinishReason::Stop as i32);
}

#[tokio::test]
async fn json_schema_output_is_valid_json_of_that_schema() {
    let server = TestServer::start(openai_config()).await;
    let mut client = server.client().await;
    let schema = serde_json::json!({
        "type": "object",
        "properties": {
            "city": {"type": "string", "maxLength": 30},
            "population": {"type": "integer", "minimum": 0}
        },
        "required": ["city", "population"],
        "additionalProperties": false
    });
    let stream = client
        .generate(GenerateRequest {
            prompt: "Describe Paris as JSON.".into(),
            sampling: greedy(80),
            json_schema: schema.to_string(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let support::Generated { text, summary, .. } =
        collect(stream).await.expect("schema-valid output");
    assert_eq!(summary.finish_reason, FinishReason::Stop as i32);
    let value: serde_json::Value = serde_json::from_str(&text).expect("JSON output");
    assert!(
        value["city"].is_string() && value["population"].is_u64(),
        "{value}"
    );
    assert_eq!(value.as_object().unwrap().len(), 2);
}

#[tokio::test]
async fn an_unserved_model_is_not_found_and_names_it() {
    let server = TestServer::start(openai_config()).await;
    let mut client = server.client().await;
    let status = client
        .generate(GenerateRequest {
            prompt: "Hi".into(),
            model: "llama3.1".into(),
            ..Default::default()
        })
        .await
        .expect_err("unknown model");
    assert_eq!(status.code(), Code::NotFound);
    assert!(
        status.message().contains("llama3.1"),
        "{}",
        status.message()
    );

    let stream = client
        .generate(GenerateRequest {
            prompt: "Hi".into(),
            model: MODEL_ALIAS.into(),
            sampling: greedy(4),
            ..Default::default()
        })
        .await
        .expect("the served model by name")
        .into_inner();
    collect(stream).await.expect("generation succeeded");
}

#[tokio::test]
async fn a_stopped_server_is_unavailable() {
    let dead = format!("http://127.0.0.1:{}/v1", free_port());
    let server =
        TestServer::start(config(&["--backend", "openai", "--openai-base-url", &dead])).await;
    let mut client = server.client().await;
    let status = client
        .generate(GenerateRequest {
            prompt: "Hi".into(),
            ..Default::default()
        })
        .await
        .expect_err("nothing listens on the backend port");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(
        status.message().contains("backend openai is unavailable"),
        "{}",
        status.message()
    );
}
