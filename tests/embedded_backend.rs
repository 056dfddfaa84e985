//! The embedded engine (llama.cpp in process) with the real model:
//! streaming, seeds, schemas enforced while decoding, batching that does not
//! change answers, cancellation, overload and bad input, and the device it
//! computes on.

mod support;

use std::time::Duration;

use futures_util::{StreamExt, future::join_all};
use rigger_inference::proto::{
    ComputeDeviceKind, FinishReason, GenerateRequest, GetStatusRequest, SamplingOptions,
    SchemaSupport,
};
use support::{Generated, TestServer, config, generate, greedy};
use tonic::Code;

const MODEL: &str = "SmolLM2-135M-Instruct.Q4_1";

async fn embedded(flags: &[&str]) -> TestServer {
    let mut all = vec!["--backend", "embedded"];
    all.extend_from_slice(flags);
    TestServer::start(config(&all)).await
}

#[tokio::test]
async fn streams_with_usage_and_reports_itself() {
    let server = embedded(&[]).await;
    let mut client = server.client().await;
    let Generated { text, summary, .. } = generate(
        &mut client,
        greedy("Write a long story about a lighthouse.", 16),
    )
    .await
    .unwrap();
    assert!(!text.trim().is_empty());
    assert_eq!(summary.finish_reason, FinishReason::Length as i32);
    let meta = summary.meta.unwrap();
    assert_eq!(
        (meta.backend.as_str(), meta.model.as_str()),
        ("embedded", MODEL)
    );
    assert_eq!(meta.completion_tokens, 16);
    assert!(meta.prompt_tokens > 5);
    assert!(meta.backend_generation_time.is_some());

    let status = client
        .get_status(GetStatusRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(status.active_backend, "embedded");
    assert_eq!(status.model, MODEL);
    let capabilities = status.backends[0].capabilities.unwrap();
    assert_eq!(capabilities.json_schema, SchemaSupport::Enforced as i32);
    assert!(capabilities.no_repeat, "the n-gram ban is honoured here");
}

#[tokio::test]
async fn the_status_names_the_cpu_when_no_layer_is_offloaded() {
    let server = embedded(&["--gpu-layers", "0"]).await;
    let status = server
        .client()
        .await
        .get_status(GetStatusRequest {})
        .await
        .unwrap()
        .into_inner();
    let device = status.backends[0]
        .device
        .clone()
        .expect("the embedded engine reports its device");
    assert_eq!(device.kind(), ComputeDeviceKind::Cpu);
    assert!(!device.name.is_empty(), "ggml names the CPU: {device:?}");
    assert!(device.memory_total_bytes > 0, "{device:?}");
    assert_eq!(
        device.memory_used_bytes, 0,
        "ggml measures no use of the CPU's memory"
    );
}

/// Off Apple, a build without a GPU backend has no GPU to offload to.
#[cfg(not(any(feature = "cuda", feature = "vulkan", target_os = "macos")))]
#[tokio::test]
async fn layers_asked_for_without_a_gpu_stop_the_start_naming_the_flag() {
    let asked = config(&["--backend", "embedded", "--gpu-layers", "all"]);
    let Err(error) = rigger_inference::app::select_backends(&asked).await else {
        panic!("--gpu-layers all started on a build without a GPU backend");
    };
    let message = error.to_string();
    assert!(message.contains("--gpu-layers all"), "{message}");
    assert!(message.contains("--features cuda"), "{message}");
}

/// A build with its backends linked in has no libraries to load: a
/// directory for them is a mistake, not something to ignore.
#[cfg(not(feature = "dynamic-backends"))]
#[tokio::test]
async fn a_backend_directory_for_a_build_with_linked_backends_stops_the_start() {
    let asked = config(&["--backend", "embedded", "--ggml-backend-dir", "/tmp"]);
    let Err(error) = rigger_inference::app::select_backends(&asked).await else {
        panic!("--ggml-backend-dir was ignored by a build with its backends linked in");
    };
    let message = error.to_string();
    assert!(message.contains("--ggml-backend-dir"), "{message}");
    assert!(message.contains("--features dynamic-backends"), "{message}");
}

#[tokio::test]
async fn a_seed_fixes_a_sampled_answer() {
    let server = embedded(&[]).await;
    let mut client = server.client().await;
    let sampled = |seed| GenerateRequest {
        prompt: "Write one sentence about the sea.".into(),
        sampling: Some(SamplingOptions {
            max_tokens: Some(24),
            temperature: Some(1.0),
            seed: Some(seed),
            ..Default::default()
        }),
        ..Default::default()
    };
    let first = generate(&mut client, sampled(11)).await.unwrap().text;
    let again = generate(&mut client, sampled(11)).await.unwrap().text;
    let other = generate(&mut client, sampled(12)).await.unwrap().text;
    assert_eq!(first, again);
    assert_ne!(first, other);
}

#[tokio::test]
async fn batched_answers_equal_solo_answers() {
    let server = embedded(&["--parallel", "4"]).await;
    let mut client = server.client().await;
    let prompts = [
        "Explain what a compiler does.",
        "List four fruits.",
        "Describe a rainy day.",
        "What is a database index?",
    ];
    let mut solo = Vec::new();
    for prompt in prompts {
        solo.push(
            generate(&mut client, greedy(prompt, 40))
                .await
                .unwrap()
                .text,
        );
    }
    let together = join_all(prompts.iter().map(|prompt| {
        let mut client = client.clone();
        async move {
            generate(&mut client, greedy(prompt, 40))
                .await
                .unwrap()
                .text
        }
    }))
    .await;
    assert_eq!(together, solo);
}

#[tokio::test]
async fn schemas_are_enforced_while_decoding() {
    let server = embedded(&[]).await;
    let mut client = server.client().await;
    let schema = serde_json::json!({
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 20},
            "legs": {"type": "integer", "minimum": 0, "maximum": 8},
            "tags": {"type": "array", "items": {"type": "string", "maxLength": 10}, "minItems": 1, "maxItems": 3}
        },
        "required": ["name", "legs", "tags"],
        "additionalProperties": false
    });
    for seed in 0..3 {
        let Generated { text, summary, .. } = generate(
            &mut client,
            GenerateRequest {
                prompt: "Describe a cat.".into(),
                json_schema: schema.to_string(),
                sampling: Some(SamplingOptions {
                    max_tokens: Some(120),
                    temperature: Some(1.0),
                    seed: Some(seed),
                    ..Default::default()
                }),
                ..Default::default()
            },
        )
        .await
        .expect("schema-valid output");
        assert_eq!(summary.finish_reason, FinishReason::Stop as i32, "{text}");
        let value: serde_json::Value = serde_json::from_str(&text).expect("JSON");
        assert!(value["legs"].as_u64().unwrap() <= 8, "{value}");
        assert!(!text.contains('\n'), "compact JSON: {text}");
    }
}

#[tokio::test]
async fn bad_requests_are_named() {
    let server = embedded(&["--ctx-per-sequence", "128"]).await;
    let mut client = server.client().await;
    let status = generate(&mut client, greedy(&"word ".repeat(400), 4))
        .await
        .expect_err("prompt longer than the context");
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(
        status
            .message()
            .contains("tokens; a sequence holds at most 128"),
        "{}",
        status.message()
    );

    let status = generate(
        &mut client,
        GenerateRequest {
            json_schema: r#"{"type": "string", "pattern": "(?<=a)b"}"#.into(),
            ..greedy("Hi", 4)
        },
    )
    .await
    .expect_err("a lookbehind cannot be enforced while decoding");
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(
        status.message().contains("json_schema cannot be enforced"),
        "{}",
        status.message()
    );

    let status = generate(
        &mut client,
        GenerateRequest {
            model: "llama3.1".into(),
            ..greedy("Hi", 4)
        },
    )
    .await
    .expect_err("unknown model");
    assert_eq!(status.code(), Code::NotFound);
}

#[tokio::test]
async fn a_full_engine_queues_then_refuses_and_cancelled_requests_free_their_sequence() {
    // Admission lets more calls through than the engine has sequences, so
    // that they reach the engine's own queue.
    let server = embedded(&["--parallel", "1", "--queue", "1", "--max-in-flight", "3"]).await;
    let mut client = server.client().await;
    let long = greedy("Write a very long story about a dragon.", 2000);
    let mut running = client.generate(long.clone()).await.unwrap().into_inner();
    assert!(
        matches!(running.next().await, Some(Ok(_))),
        "first request runs"
    );
    let waiting = client
        .generate(long.clone())
        .await
        .expect("second request waits in the queue");
    let status = client
        .generate(long.clone())
        .await
        .expect_err("third has no room");
    assert_eq!(status.code(), Code::ResourceExhausted);
    assert!(
        status.message().contains("all 1 sequences are busy"),
        "{}",
        status.message()
    );

    drop(running);
    let mut waiting = waiting.into_inner();
    let first = tokio::time::timeout(Duration::from_secs(10), waiting.next())
        .await
        .expect("the cancelled request left its sequence to the waiting one");
    assert!(matches!(first, Some(Ok(_))));
}

#[tokio::test]
async fn a_shared_prompt_prefix_is_read_once_and_changes_no_answer() {
    use rigger_inference::proto::{EnhanceTaskRequest, Task};
    // The result cache would answer the repeated request without the engine.
    let server = embedded(&["--parallel", "2", "--task-cache-entries", "0"]).await;
    let mut client = server.client().await;
    let enhance = |title: &str| EnhanceTaskRequest {
        task: Some(Task {
            title: title.into(),
            ..Default::default()
        }),
        sampling: Some(SamplingOptions {
            temperature: Some(0.0),
            max_tokens: Some(200),
            ..Default::default()
        }),
        ..Default::default()
    };
    let fresh = client
        .enhance_task(enhance("Add a logout button"))
        .await
        .unwrap()
        .into_inner();
    let fresh_meta = fresh.meta.clone().unwrap();
    assert_eq!(fresh_meta.cached_prompt_tokens, 0, "nothing cached yet");

    let other = client
        .enhance_task(enhance("Speed up the search page"))
        .await
        .unwrap()
        .into_inner();
    let other_meta = other.meta.unwrap();
    assert!(
        other_meta.cached_prompt_tokens > 150,
        "the system prompt and worked example come from the cache: {other_meta:?}"
    );

    let again = client
        .enhance_task(enhance("Add a logout button"))
        .await
        .unwrap()
        .into_inner();
    assert!(again.meta.unwrap().cached_prompt_tokens >= other_meta.cached_prompt_tokens);
    assert_eq!(
        again.enhancement, fresh.enhancement,
        "a cached prefix changes no answer"
    );
}

#[tokio::test]
async fn decompositions_do_not_repeat_a_title_on_the_embedded_engine() {
    use rigger_inference::proto::{DecomposeTaskRequest, Task};
    let server = embedded(&[]).await;
    let mut client = server.client().await;
    // Greedy SmolLM2-135M repeats one subtask until the list is full unless
    // repeated n-grams are avoided while sampling (it did on "Set up CI for
    // the repository", which it can no longer split without inventing
    // tools, so the rules refuse it).
    let response = client
        .decompose_task(DecomposeTaskRequest {
            task: Some(rigger_inference::proto::Task {
                title: "Add password reset".into(),
                ..Task::default()
            }),
            sampling: Some(SamplingOptions {
                temperature: Some(0.0),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .expect("a decomposition with distinct subtasks")
        .into_inner();
    let mut titles: Vec<String> = response
        .subtasks
        .iter()
        .map(|s| s.title.to_lowercase())
        .collect();
    assert!(titles.len() >= 3, "{titles:?}");
    titles.sort();
    titles.dedup();
    assert_eq!(titles.len(), response.subtasks.len(), "distinct titles");
    assert!(!titles.contains(&"add password reset".to_owned()));
}
