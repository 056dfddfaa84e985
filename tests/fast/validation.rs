//! Validation: a table of bad fields per RPC, each refused with
//! INVALID_ARGUMENT naming the field, before any backend is asked.

use rigger_inference::proto::{
    ChatMessage, DecomposeTaskRequest, EnhanceTaskRequest, GenerateRequest, SamplingOptions, Task,
};
use tonic::Code;

use super::serve;
use crate::support::scripted::ScriptedBackend;

fn task(title: &str) -> Option<Task> {
    Some(Task {
        title: title.into(),
        ..Default::default()
    })
}

fn assert_invalid(status: tonic::Status, field: &str) {
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(
        status.message().starts_with(&format!("invalid {field}:")),
        "message should name {field}: {}",
        status.message()
    );
}

#[tokio::test]
async fn generate_fields_are_named() {
    let backend = ScriptedBackend::new("first");
    let server = serve(&[], &[&backend]).await;
    let mut client = server.client().await;
    let prompt = |sampling: SamplingOptions| GenerateRequest {
        prompt: "Hi".into(),
        sampling: Some(sampling),
        ..Default::default()
    };
    let cases = [
        (GenerateRequest::default(), "prompt"),
        (
            GenerateRequest {
                prompt: "Hi".into(),
                messages: vec![ChatMessage {
                    role: 2,
                    content: "Hi".into(),
                }],
                ..Default::default()
            },
            "prompt",
        ),
        (
            GenerateRequest {
                messages: vec![ChatMessage {
                    role: 2,
                    content: String::new(),
                }],
                ..Default::default()
            },
            "messages[0].content",
        ),
        (
            GenerateRequest {
                messages: vec![ChatMessage {
                    role: 9,
                    content: "Hi".into(),
                }],
                ..Default::default()
            },
            "messages[0].role",
        ),
        (
            prompt(SamplingOptions {
                max_tokens: Some(0),
                ..Default::default()
            }),
            "sampling.max_tokens",
        ),
        (
            prompt(SamplingOptions {
                max_tokens: Some(1_000_000),
                ..Default::default()
            }),
            "sampling.max_tokens",
        ),
        (
            prompt(SamplingOptions {
                temperature: Some(f32::NAN),
                ..Default::default()
            }),
            "sampling.temperature",
        ),
        (
            prompt(SamplingOptions {
                temperature: Some(-0.5),
                ..Default::default()
            }),
            "sampling.temperature",
        ),
        (
            prompt(SamplingOptions {
                top_p: Some(1.5),
                ..Default::default()
            }),
            "sampling.top_p",
        ),
        (
            prompt(SamplingOptions {
                frequency_penalty: Some(f32::INFINITY),
                ..Default::default()
            }),
            "sampling.frequency_penalty",
        ),
        (
            GenerateRequest {
                prompt: "Hi".into(),
                json_schema: "{not json".into(),
                ..Default::default()
            },
            "json_schema",
        ),
        (
            GenerateRequest {
                prompt: "Hi".into(),
                json_schema: r#"{"type": "object", "required": "name"}"#.into(),
                ..Default::default()
            },
            "json_schema",
        ),
        (
            GenerateRequest {
                prompt: "x".repeat(300 * 1024),
                ..Default::default()
            },
            "messages",
        ),
        (
            GenerateRequest {
                prompt: "Hi".into(),
                stop: vec!["s".repeat(65)],
                ..Default::default()
            },
            "stop[0]",
        ),
        (
            GenerateRequest {
                prompt: "Hi".into(),
                model: "bad\nname".into(),
                ..Default::default()
            },
            "model",
        ),
    ];
    for (request, field) in cases {
        let status = client.generate(request).await.expect_err(field);
        assert_invalid(status, field);
    }
    assert!(backend.requests().is_empty(), "refused before the backend");
}

#[tokio::test]
async fn task_fields_are_named() {
    let backend = ScriptedBackend::new("first");
    let server = serve(&[], &[&backend]).await;
    let mut client = server.client().await;
    let enhance_cases = [
        (EnhanceTaskRequest::default(), "task"),
        (
            EnhanceTaskRequest {
                task: task("  \t"),
                ..Default::default()
            },
            "task.title",
        ),
        (
            EnhanceTaskRequest {
                task: task(&"t".repeat(600)),
                ..Default::default()
            },
            "task.title",
        ),
        (
            EnhanceTaskRequest {
                task: Some(Task {
                    title: "Ship".into(),
                    complexity: Some(0),
                    ..Default::default()
                }),
                ..Default::default()
            },
            "task.complexity",
        ),
        (
            EnhanceTaskRequest {
                task: Some(Task {
                    title: "Ship".into(),
                    dependencies: vec![String::new()],
                    ..Default::default()
                }),
                ..Default::default()
            },
            "task.dependencies[0]",
        ),
        (
            EnhanceTaskRequest {
                task: task("Ship"),
                kind: 7,
                ..Default::default()
            },
            "kind",
        ),
    ];
    for (request, field) in enhance_cases {
        assert_invalid(client.enhance_task(request).await.expect_err(field), field);
    }
    let decompose_cases = [
        (
            DecomposeTaskRequest {
                task: task("Ship"),
                min_subtasks: 13,
                ..Default::default()
            },
            "min_subtasks",
        ),
        (
            DecomposeTaskRequest {
                task: task("Ship"),
                min_subtasks: 5,
                max_subtasks: 4,
                ..Default::default()
            },
            "max_subtasks",
        ),
        (
            DecomposeTaskRequest {
                task: task("Ship"),
                sampling: Some(SamplingOptions {
                    top_p: Some(0.0),
                    ..Default::default()
                }),
                ..Default::default()
            },
            "sampling.top_p",
        ),
    ];
    for (request, field) in decompose_cases {
        assert_invalid(
            client.decompose_task(request).await.expect_err(field),
            field,
        );
    }
    assert!(backend.requests().is_empty(), "refused before the backend");
}
