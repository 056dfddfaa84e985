//! EnhanceTask/DecomposeTask answers that break a rule in some of their
//! parts: those parts are left out and reported (`meta.dropped`), the rest
//! stands, and when too few subtasks remain only the missing ones are asked
//! for, after the kept ones. (Which texts break which rule is unit-tested
//! in `src/task/grounds.rs`; this is the service's handling of them.)

use rigger_inference::{
    backend::Role,
    proto::{EnhanceTaskRequest, Task},
};
use serde_json::{Value, json};

use super::serve;
use crate::support::{
    scripted::{Reply, ScriptedBackend},
    two_factor::{
        answer, decompose, recovery_codes, secret, show_status, sign_in, subtask, turn_off,
    },
};

/// A worked example's content, in a task that does not mention it.
fn copied() -> Value {
    subtask(
        "Create password reset tokens",
        "Generate a single-use, expiring token for the second factor when a user asks to reset a forgotten password.",
        &[],
    )
}

/// A dict literal's key leaking into a title (the schema's pattern keeps
/// braces and brackets out, not quotes and colons).
fn malformed() -> Value {
    subtask(
        "The 'add': step of recovery codes",
        "Generate single-use recovery codes for the second factor at enrolment and store them hashed.",
        &[],
    )
}

fn rules(violations: &[rigger_inference::proto::Violation]) -> Vec<&str> {
    violations
        .iter()
        .map(|violation| violation.rule.as_str())
        .collect()
}

#[tokio::test]
async fn a_subtask_breaking_a_rule_is_left_out_and_the_rest_returned_at_once() {
    let backend = ScriptedBackend::new("scripted");
    backend.next(Reply::text([answer(&[
        secret(),
        copied(),
        sign_in(),
        recovery_codes(),
    ])]));
    let server = serve(&[], &[&backend]).await;
    let response = server
        .client()
        .await
        .decompose_task(decompose())
        .await
        .expect("an answer")
        .into_inner();
    let titles: Vec<&str> = response.subtasks.iter().map(|s| s.title.as_str()).collect();
    assert_eq!(
        titles,
        [
            "Store a second-factor secret per user",
            "Ask for a code at sign-in",
            "Issue recovery codes"
        ]
    );
    // The dependency on position 0 still names the secret subtask.
    assert_eq!(response.subtasks[1].depends_on, [0]);
    let meta = response.meta.expect("meta");
    assert_eq!(rules(&meta.dropped), ["copies_example"]);
    assert!(meta.dropped[0].detail.contains("subtasks[1]"), "{meta:?}");
    assert_eq!(meta.attempts, 1);
    assert!(meta.repaired.is_empty());
    assert_eq!(backend.requests().len(), 1);
}

#[tokio::test]
async fn too_few_good_subtasks_keep_the_good_ones_and_ask_only_for_the_missing() {
    let backend = ScriptedBackend::new("scripted");
    let first = answer(&[secret(), copied(), sign_in(), malformed()]);
    backend.next(Reply::text([first]));
    let more = answer(&[recovery_codes(), turn_off(&[0, 2]), show_status()]);
    backend.next(Reply::text([more]));
    let server = serve(&[], &[&backend]).await;
    let response = server
        .client()
        .await
        .decompose_task(decompose())
        .await
        .expect("an answer")
        .into_inner();

    let titles: Vec<&str> = response.subtasks.iter().map(|s| s.title.as_str()).collect();
    assert_eq!(
        titles,
        [
            "Store a second-factor secret per user",
            "Ask for a code at sign-in",
            "Issue recovery codes",
            "Let users turn the second factor off",
            "Show whether two-factor authentication is on"
        ]
    );
    assert_eq!(response.subtasks[3].depends_on, [0, 2]);
    let meta = response.meta.expect("meta");
    assert_eq!(meta.attempts, 2);
    assert_eq!(rules(&meta.dropped), ["copies_example", "malformed_text"]);
    assert_eq!(rules(&meta.repaired), ["copies_example"]);

    let requests = backend.requests();
    assert_eq!(requests.len(), 2);
    let follow_up = &requests[1];
    let kept: Value =
        serde_json::from_str(&follow_up.messages[follow_up.messages.len() - 2].content)
            .expect("the kept subtasks, as JSON");
    assert_eq!(
        follow_up.messages[follow_up.messages.len() - 2].role,
        Role::Assistant
    );
    assert_eq!(kept["subtasks"].as_array().map(Vec::len), Some(2));
    let ask = &follow_up.messages.last().expect("a request").content;
    assert!(ask.contains("Give 3 more subtasks"), "{ask}");
    // The missing subtasks take positions 2 on: the first new one may
    // depend on either kept subtask; two more than are missing are asked
    // for.
    let schema = follow_up.json_schema.as_ref().expect("a schema");
    let positions = schema["properties"]["subtasks"]["prefixItems"]
        .as_array()
        .expect("positions");
    assert_eq!(positions.len(), 3);
    assert_eq!(
        positions[0]["properties"]["depends_on"]["items"]["maximum"],
        json!(1)
    );
    // The kept titles are among what the follow-up must not repeat.
    let no_repeat = follow_up.sampling.no_repeat.as_ref().expect("no-repeat");
    assert!(
        no_repeat
            .already_said
            .contains(&"Ask for a code at sign-in".to_owned()),
        "{no_repeat:?}"
    );
}

#[tokio::test]
async fn an_enhancement_drops_a_copied_criterion_and_is_asked_again_for_an_invented_name() {
    let backend = ScriptedBackend::new("scripted");
    let invented = json!({
        "kind": "specify",
        "title": "Add async support for flask with Quart",
        "description": "Let flask views be declared async so they await slow calls.",
        "acceptance_criteria": ["An async flask view returns its response"]
    });
    let sound = json!({
        "kind": "specify",
        "title": "Let flask views be async",
        "description": "Let flask views be declared async so they await slow calls instead of blocking a worker.",
        "acceptance_criteria": [
            "An async flask view returns its response",
            "A search that matches nothing says so in flask"
        ]
    });
    backend.next(Reply::text([invented.to_string()]));
    backend.next(Reply::text([sound.to_string()]));
    let server = serve(&[], &[&backend]).await;
    let response = server
        .client()
        .await
        .enhance_task(EnhanceTaskRequest {
            task: Some(Task {
                title: "Add async support for flask".into(),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .expect("an answer")
        .into_inner();
    let enhancement = response.enhancement.expect("an enhancement");
    assert_eq!(enhancement.title, "Let flask views be async");
    assert_eq!(
        enhancement.acceptance_criteria,
        ["An async flask view returns its response"]
    );
    let meta = response.meta.expect("meta");
    assert_eq!(rules(&meta.repaired), ["unsupported_detail"]);
    assert!(meta.repaired[0].detail.contains("Quart"), "{meta:?}");
    assert_eq!(rules(&meta.dropped), ["copies_example"]);
    assert_eq!(backend.requests().len(), 2);
}
