//! The semantic half of the on-topic rule: a part that names the task's
//! subject but is about something else is left out, with the similarity it
//! had. The service's own logic over a scripted backend (the answers are
//! crafted), with the real sentence-embedding model `make` unpacks, which
//! is why this is not in the fast tier. (The model's reading is checked
//! against the reference in tests/meaning.rs.)

mod support;

use std::sync::Arc;

use rigger_inference::{
    app,
    backend::Backend,
    proto::{ResponseMeta, Subtask},
};
use support::{
    TestServer, config,
    scripted::{Reply, ScriptedBackend},
    two_factor::{self, recovery_codes, secret, show_status, sign_in, subtask, turn_off},
};

/// Three subtasks about two-factor authentication and one that only names
/// it: similarities to the task 0.56, 0.38, 0.10 and 0.34 by the model.
fn answer() -> String {
    two_factor::answer(&[
        secret(),
        sign_in(),
        subtask(
            "Plan the team lunch",
            "Book a restaurant for the authentication team's lunch and order vegetarian food for everyone.",
            &[],
        ),
        recovery_codes(),
    ])
}

/// The answer to the task, given `answer()` and then `follow_ups`.
async fn decompose(flags: &[&str], follow_ups: &[String]) -> (Vec<Subtask>, ResponseMeta) {
    let backend = ScriptedBackend::new("scripted");
    for reply in std::iter::once(answer()).chain(follow_ups.iter().cloned()) {
        backend.next(Reply::text([reply]));
    }
    let server = TestServer::with_backends(config(flags), vec![backend as Arc<dyn Backend>]).await;
    let response = server
        .client()
        .await
        .decompose_task(two_factor::decompose())
        .await
        .expect("an answer")
        .into_inner();
    (response.subtasks, response.meta.expect("meta"))
}

fn titles(subtasks: &[Subtask]) -> Vec<&str> {
    subtasks
        .iter()
        .map(|subtask| subtask.title.as_str())
        .collect()
}

#[tokio::test]
async fn a_part_that_only_names_the_task_is_left_out_with_its_similarity() {
    let (subtasks, meta) = decompose(&[], &[]).await;
    assert_eq!(
        titles(&subtasks),
        [
            "Store a second-factor secret per user",
            "Ask for a code at sign-in",
            "Issue recovery codes"
        ]
    );
    assert_eq!(meta.dropped.len(), 1, "{meta:?}");
    let dropped = &meta.dropped[0];
    assert_eq!(dropped.rule, "off_topic");
    let similarity: f32 = dropped
        .detail
        .strip_prefix("subtasks[2] is not about the task: its similarity in meaning to it is ")
        .and_then(|rest| rest.strip_suffix(", under 0.15"))
        .and_then(|figure| figure.parse().ok())
        .unwrap_or_else(|| panic!("{dropped:?}"));
    assert!((0.0..0.15).contains(&similarity), "{dropped:?}");
}

#[tokio::test]
async fn with_the_semantic_check_off_shared_words_are_enough() {
    let (subtasks, meta) = decompose(&["--on-topic-similarity", "0"], &[]).await;
    assert_eq!(titles(&subtasks).len(), 4, "{subtasks:?}");
    assert!(meta.dropped.is_empty(), "{meta:?}");
}

#[tokio::test]
async fn a_stricter_threshold_leaves_out_more_and_asks_for_the_missing() {
    // Two more than are missing, as the follow-up asks.
    let more = two_factor::answer(&[
        turn_off(&[0]),
        show_status(),
        subtask(
            "Let users choose their second factor",
            "Offer an authenticator app or a security key as the second factor at enrolment.",
            &[0],
        ),
    ]);
    let (subtasks, meta) = decompose(&["--on-topic-similarity", "0.35"], &[more]).await;
    assert_eq!(
        titles(&subtasks),
        [
            "Store a second-factor secret per user",
            "Ask for a code at sign-in",
            "Let users turn the second factor off",
            "Show whether two-factor authentication is on",
            "Let users choose their second factor"
        ],
        "{meta:?}"
    );
    let dropped: Vec<&str> = meta.dropped.iter().map(|v| v.detail.as_str()).collect();
    assert_eq!(dropped.len(), 2, "{dropped:?}");
    assert!(
        dropped[0].starts_with("subtasks[2] is not about the task"),
        "{dropped:?}"
    );
    assert!(
        dropped[1].starts_with("subtasks[3] is not about the task")
            && dropped[1].ends_with("under 0.35"),
        "{dropped:?}"
    );
    assert_eq!(meta.attempts, 2);
}

#[test]
fn a_named_model_that_cannot_load_stops_startup_naming_it() {
    let missing = std::env::temp_dir().join("rigger-no-topic-model");
    let flags = ["--topic-model", missing.to_str().expect("a UTF-8 path")];
    let error = app::server_settings(&config(&flags))
        .err()
        .expect("startup fails");
    let message = error.to_string();
    assert!(
        message.starts_with("on-topic model: cannot read")
            && message.contains("rigger-no-topic-model"),
        "{message}"
    );
}
