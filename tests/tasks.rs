//! EnhanceTask and DecomposeTask with the real model through the
//! OpenAI-compatible backend: typed, rule-abiding answers.

mod support;

use rigger_inference::proto::{
    DecomposeTaskRequest, EnhanceTaskRequest, EnhancementKind, SamplingOptions, Task, TaskContext,
};
use support::{MODEL_ALIAS, TestServer, openai_config};

fn task() -> Task {
    Task {
        id: "T-42".into(),
        title: "Add password reset".into(),
        description: Some("Users who forget their password cannot log in.".into()),
        complexity: Some(6),
        context_files: vec!["src/auth/login.rs".into()],
        ..Default::default()
    }
}

fn context() -> Option<TaskContext> {
    Some(TaskContext {
        project: "A web shop written in Rust.".into(),
        prd_excerpt: "Users can reset a forgotten password by e-mail.".into(),
    })
}

fn greedy() -> Option<SamplingOptions> {
    Some(SamplingOptions {
        temperature: Some(0.0),
        seed: Some(1),
        ..Default::default()
    })
}

#[tokio::test]
async fn enhance_returns_a_typed_enhancement_of_the_requested_kind() {
    let server = TestServer::start(openai_config()).await;
    let mut client = server.client().await;
    let response = client
        .enhance_task(EnhanceTaskRequest {
            task: Some(task()),
            context: context(),
            kind: EnhancementKind::Specify as i32,
            sampling: greedy(),
            ..Default::default()
        })
        .await
        .expect("EnhanceTask succeeded")
        .into_inner();
    let enhancement = response.enhancement.expect("an enhancement");
    assert_eq!(enhancement.kind, EnhancementKind::Specify as i32);
    assert!(!enhancement.title.trim().is_empty());
    assert!(enhancement.title.chars().count() <= 120);
    assert!(!enhancement.description.trim().is_empty());
    assert!((1..=6).contains(&enhancement.acceptance_criteria.len()));
    assert!(
        enhancement
            .acceptance_criteria
            .iter()
            .all(|c| !c.trim().is_empty())
    );
    let meta = response.meta.expect("meta");
    assert_eq!(
        (meta.backend.as_str(), meta.model.as_str()),
        ("openai", MODEL_ALIAS)
    );
    assert!(meta.attempts >= 1 && meta.completion_tokens > 0, "{meta:?}");
}

// Rules and repairs are pinned by the validator's unit tests and, over many
// tasks, by tests/task_quality.rs; here the shape through llama.cpp's server,
// on a task SmolLM2-135M decomposes there (the server has no n-gram ban, so
// the model often repeats a subtask: see `make eval`).
#[tokio::test]
async fn decompose_returns_subtasks_within_the_range_and_rules() {
    let server = TestServer::start(openai_config()).await;
    let mut client = server.client().await;
    let response = client
        .decompose_task(DecomposeTaskRequest {
            task: Some(Task {
                title: "Add dark mode".into(),
                ..Default::default()
            }),
            min_subtasks: 3,
            max_subtasks: 6,
            ..Default::default()
        })
        .await
        .expect("DecomposeTask succeeded")
        .into_inner();
    let subtasks = response.subtasks;
    assert!((3..=6).contains(&subtasks.len()), "{subtasks:?}");
    let mut titles: Vec<String> = subtasks.iter().map(|s| s.title.to_lowercase()).collect();
    titles.sort();
    titles.dedup();
    assert_eq!(titles.len(), subtasks.len(), "distinct titles");
    for (index, subtask) in subtasks.iter().enumerate() {
        assert!((1..=10).contains(&subtask.complexity), "{subtask:?}");
        assert!(!subtask.description.trim().is_empty() && !subtask.reasoning.trim().is_empty());
        for &dependency in &subtask.depends_on {
            assert!(
                (dependency as usize) < index,
                "dependencies point to earlier subtasks"
            );
        }
    }
    let meta = response.meta.expect("meta");
    assert!(meta.attempts >= 1 && meta.prompt_tokens > 0, "{meta:?}");
}

#[tokio::test]
async fn a_token_budget_too_small_for_any_answer_is_an_error_not_an_invention() {
    let server = TestServer::start(openai_config()).await;
    let mut client = server.client().await;
    let status = client
        .decompose_task(DecomposeTaskRequest {
            task: Some(task()),
            sampling: Some(SamplingOptions {
                max_tokens: Some(8),
                temperature: Some(0.0),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .expect_err("eight tokens cannot hold three subtasks");
    assert_eq!(status.code(), tonic::Code::Internal);
    let attempts = format!("{} attempt(s)", support::config(&[]).task_attempts);
    assert!(
        status.message().contains("max_tokens=8") && status.message().contains(&attempts),
        "{}",
        status.message()
    );
    assert_eq!(
        status
            .metadata()
            .get("rigger-violation")
            .map(|rule| rule.to_str().unwrap()),
        Some("truncated")
    );
}
