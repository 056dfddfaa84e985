//! The EnhanceTask/DecomposeTask result cache: a reproducible request asked
//! again is answered from the cache without reaching the backend; sampled
//! requests without a seed are neither looked up nor kept; `0` entries turn
//! it off. (That a seed fixes a sampled answer is the runtime's part,
//! proven on the embedded engine in `tests/task_quality.rs`.)

use rigger_inference::proto::{
    DecomposeTaskRequest, EnhanceTaskRequest, GetStatusRequest, SamplingOptions, Task,
};

use super::serve;
use crate::support::scripted::{Reply, ScriptedBackend};

/// A decomposition of "Add two-factor authentication" that passes the rules.
const DECOMPOSITION: &str = r#"{"subtasks":[{"title":"Store a second-factor secret per user account","description":"Add an encrypted column for each user's second-factor secret to the users table, with a migration for existing accounts.","complexity":3,"depends_on":[],"reasoning":"Codes of the second factor are derived from a per-user secret."},{"title":"Enrol users in two-factor authentication","description":"Show the second-factor secret on the security settings page as a scannable code and confirm enrolment with a first valid code.","complexity":3,"depends_on":[0],"reasoning":"Users load the second-factor secret into an authenticator app."},{"title":"Ask for a code at sign-in","description":"After the password check, ask users enrolled in two-factor authentication for a six-digit code and refuse a wrong one.","complexity":4,"depends_on":[0,1],"reasoning":"This is where the second factor protects the account."},{"title":"Issue one-time recovery codes","description":"Generate ten single-use recovery codes at two-factor enrolment, store them hashed and accept each once in place of a code.","complexity":2,"depends_on":[1],"reasoning":"A lost phone must not lock a user out of two-factor authentication."}]}"#;

/// An enhancement of "Add dark mode" that passes the rules.
const ENHANCEMENT: &str = r#"{"kind":"specify","title":"Offer a dark colour theme","description":"Users can switch the interface to a dark theme from the settings page; the choice is kept across sessions.","acceptance_criteria":["The settings page has a dark theme switch","The chosen dark theme is applied again after signing in"]}"#;

fn decompose(sampling: Option<SamplingOptions>) -> DecomposeTaskRequest {
    DecomposeTaskRequest {
        task: Some(Task {
            title: "Add two-factor authentication".into(),
            complexity: Some(6),
            ..Default::default()
        }),
        sampling,
        ..Default::default()
    }
}

fn enhance() -> EnhanceTaskRequest {
    EnhanceTaskRequest {
        task: Some(Task {
            title: "Add dark mode".into(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// A backend that answers every call with the decomposition.
fn tasks_backend() -> std::sync::Arc<ScriptedBackend> {
    let backend = ScriptedBackend::new("scripted");
    backend.always(Reply::text([DECOMPOSITION]));
    backend
}

#[tokio::test]
async fn reproducible_requests_are_answered_from_the_cache_without_the_backend() {
    let backend = tasks_backend();
    let server = serve(&[], &[&backend]).await;
    let mut client = server.client().await;
    let first = client
        .decompose_task(decompose(None))
        .await
        .expect("an answer")
        .into_inner();
    let again = client
        .decompose_task(decompose(None))
        .await
        .expect("an answer")
        .into_inner();
    assert!(!first.meta.as_ref().expect("meta").cached);
    let again_meta = again.meta.as_ref().expect("meta");
    assert!(again_meta.cached, "{again_meta:?}");
    assert_eq!(again.subtasks, first.subtasks);
    assert_eq!(
        again_meta.completion_tokens,
        first.meta.as_ref().expect("meta").completion_tokens
    );
    assert_eq!(
        backend.requests().len(),
        1,
        "the repeat never reached the backend"
    );

    // Sampled without a seed: a fresh answer each time, neither looked up
    // nor kept.
    let sampled = decompose(Some(SamplingOptions {
        temperature: Some(0.8),
        ..Default::default()
    }));
    for _ in 0..2 {
        let answer = client
            .decompose_task(sampled.clone())
            .await
            .expect("an answer");
        assert!(!answer.into_inner().meta.expect("meta").cached);
    }
    assert_eq!(backend.requests().len(), 3);

    backend.always(Reply::text([ENHANCEMENT]));
    client.enhance_task(enhance()).await.expect("an answer");
    let enhanced = client
        .enhance_task(enhance())
        .await
        .expect("an answer")
        .into_inner();
    assert!(enhanced.meta.expect("meta").cached);
    assert_eq!(backend.requests().len(), 4);

    let status = client
        .get_status(GetStatusRequest {})
        .await
        .expect("status")
        .into_inner();
    let decompose_cache = status.decompose_cache.expect("the cache is on");
    assert_eq!(
        (
            decompose_cache.hits,
            decompose_cache.misses,
            decompose_cache.entries
        ),
        (1, 1, 1)
    );
    assert_eq!(decompose_cache.capacity, 1024);
    let enhance_cache = status.enhance_cache.expect("the cache is on");
    assert_eq!((enhance_cache.hits, enhance_cache.misses), (1, 1));
}

#[tokio::test]
async fn with_no_entries_the_cache_is_off() {
    let backend = tasks_backend();
    let server = serve(&["--task-cache-entries", "0"], &[&backend]).await;
    let mut client = server.client().await;
    for _ in 0..2 {
        let answer = client
            .decompose_task(decompose(None))
            .await
            .expect("an answer");
        assert!(!answer.into_inner().meta.expect("meta").cached);
    }
    assert_eq!(backend.requests().len(), 2);
    let status = client
        .get_status(GetStatusRequest {})
        .await
        .expect("status")
        .into_inner();
    assert_eq!(status.decompose_cache, None);
    assert_eq!(status.enhance_cache, None);
}
