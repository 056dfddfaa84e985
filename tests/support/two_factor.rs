//! One DecomposeTask and crafted subtasks of its answers, for the tests of
//! the service's task rules over a scripted backend (tests/fast/task_rules.rs,
//! tests/on_topic.rs): "Add two-factor authentication", complexity 6.

use rigger_inference::proto::{DecomposeTaskRequest, Task};
use serde_json::{Value, json};

pub fn decompose() -> DecomposeTaskRequest {
    DecomposeTaskRequest {
        task: Some(Task {
            title: "Add two-factor authentication".into(),
            complexity: Some(6),
            ..Default::default()
        }),
        ..Default::default()
    }
}

pub fn subtask(title: &str, description: &str, depends_on: &[u32]) -> Value {
    json!({
        "title": title,
        "description": description,
        "complexity": 3,
        "depends_on": depends_on,
        "reasoning": "The second factor of the authentication needs it."
    })
}

/// A decomposition of `subtasks`, as the model writes it.
pub fn answer(subtasks: &[Value]) -> String {
    json!({ "subtasks": subtasks }).to_string()
}

pub fn secret() -> Value {
    subtask(
        "Store a second-factor secret per user",
        "Add an encrypted column for each user's second-factor secret, with a migration.",
        &[],
    )
}

pub fn sign_in() -> Value {
    subtask(
        "Ask for a code at sign-in",
        "After the password check, ask users with a second factor for their current code and refuse a wrong one.",
        &[0],
    )
}

pub fn recovery_codes() -> Value {
    subtask(
        "Issue recovery codes",
        "Generate single-use recovery codes at two-factor enrolment and accept each once.",
        &[0],
    )
}

pub fn turn_off(depends_on: &[u32]) -> Value {
    subtask(
        "Let users turn the second factor off",
        "Add a settings action that removes the second-factor secret after a fresh password check.",
        depends_on,
    )
}

pub fn show_status() -> Value {
    subtask(
        "Show whether two-factor authentication is on",
        "Tell users on their account page whether two-factor authentication protects their account.",
        &[0],
    )
}
