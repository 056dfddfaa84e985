//! Tiny random-weight models of several llama.cpp architectures
//! (`scripts/tiny_gguf.py`) load in the embedded engine and serve: the
//! service names each, a seeded answer repeats, and a JSON schema holds even
//! though the weights are noise. One test per architecture, so a failure
//! names the family that broke.

mod support;

use rigger_inference::proto::{FinishReason, GenerateRequest, GetStatusRequest, SamplingOptions};
use support::{
    Generated, TestServer, config, generate,
    tiny_models::{tiny_model, tiny_model_name},
};

/// Tokens of the free answer: enough to show decoding runs, few enough
/// to keep six models quick.
const ANSWER_TOKENS: u32 = 8;
/// Bounds of the schema's fields.
const NAME_MAX_CHARS: usize = 12;
const LEGS_MAX: u64 = 8;
/// Room for the schema's answer even at one character per token.
const SCHEMA_TOKENS: u32 = 48;
/// One short sequence: the tests send one request at a time.
const CTX_PER_SEQUENCE: &str = "256";

async fn serve(architecture: &str) -> TestServer {
    let path = tiny_model(architecture);
    TestServer::start(config(&[
        "--backend",
        "embedded",
        "--model-path",
        path.to_str().expect("UTF-8 path"),
        "--parallel",
        "1",
        "--ctx-per-sequence",
        CTX_PER_SEQUENCE,
    ]))
    .await
}

fn sampled(seed: u64, max_tokens: u32) -> SamplingOptions {
    SamplingOptions {
        max_tokens: Some(max_tokens),
        temperature: Some(1.0),
        seed: Some(seed),
        ..Default::default()
    }
}

async fn loads_repeats_seeded_answers_and_holds_schemas(architecture: &str) {
    let name = tiny_model_name(architecture);
    let server = serve(architecture).await;
    let mut client = server.client().await;
    let status = client
        .get_status(GetStatusRequest {})
        .await
        .expect("GetStatus")
        .into_inner();
    assert_eq!(
        (status.active_backend.as_str(), status.model.as_str()),
        ("embedded", name.as_str())
    );

    let request = GenerateRequest {
        prompt: "Write one sentence about the sea.".into(),
        sampling: Some(sampled(7, ANSWER_TOKENS)),
        ..Default::default()
    };
    let first = generate(&mut client, request.clone())
        .await
        .expect("a free answer");
    let meta = first.summary.meta.clone().expect("summary metadata");
    assert_eq!(meta.model, name);
    assert_eq!(
        (first.summary.finish_reason, meta.completion_tokens),
        (FinishReason::Length as i32, ANSWER_TOKENS),
        "noise weights almost never pick an end token: {first:?}"
    );
    let again = generate(&mut client, request)
        .await
        .expect("the same request");
    assert_eq!(again.text, first.text, "a seed fixes the answer");

    let schema = serde_json::json!({
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": NAME_MAX_CHARS},
            "legs": {"type": "integer", "minimum": 0, "maximum": LEGS_MAX}
        },
        "required": ["name", "legs"],
        "additionalProperties": false
    });
    let Generated { text, summary, .. } = generate(
        &mut client,
        GenerateRequest {
            prompt: "Describe a cat.".into(),
            json_schema: schema.to_string(),
            sampling: Some(sampled(7, SCHEMA_TOKENS)),
            ..Default::default()
        },
    )
    .await
    .expect("schema-constrained answer");
    assert_eq!(summary.finish_reason, FinishReason::Stop as i32, "{text}");
    let value: serde_json::Value = serde_json::from_str(&text).expect("JSON");
    let object = value.as_object().expect("an object");
    assert_eq!(object.len(), 2, "{value}");
    assert!(
        value["name"]
            .as_str()
            .expect("a string name")
            .chars()
            .count()
            <= NAME_MAX_CHARS,
        "{value}"
    );
    assert!(
        value["legs"].as_u64().expect("integer legs") <= LEGS_MAX,
        "{value}"
    );
}

#[tokio::test]
async fn tiny_llama_serves() {
    loads_repeats_seeded_answers_and_holds_schemas("llama").await;
}

#[tokio::test]
async fn tiny_qwen2_serves() {
    loads_repeats_seeded_answers_and_holds_schemas("qwen2").await;
}

#[tokio::test]
async fn tiny_qwen3_serves() {
    loads_repeats_seeded_answers_and_holds_schemas("qwen3").await;
}

#[tokio::test]
async fn tiny_phi3_serves() {
    loads_repeats_seeded_answers_and_holds_schemas("phi3").await;
}

#[tokio::test]
async fn tiny_gemma_serves() {
    loads_repeats_seeded_answers_and_holds_schemas("gemma").await;
}

#[tokio::test]
async fn tiny_starcoder2_serves() {
    loads_repeats_seeded_answers_and_holds_schemas("starcoder2").await;
}
