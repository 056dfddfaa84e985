//! Every prompt the service sends, in one place. Kept short and literal:
//! the default model has 135M parameters, and the schema (not the prompt)
//! carries the answer's shape.

use std::{borrow::Cow, fmt::Write, sync::LazyLock};

use serde::Deserialize;

use super::{DecomposeRequest, EnhanceRequest, ProjectContext, Rule, Subtask, TaskSpec, Violation};
use crate::backend::{Message, Role};

const ENHANCE_SYSTEM: &str = "You improve software tasks so a developer can start at once. \
Answer with JSON only. Fields: kind (clarify = remove ambiguity, specify = add concrete \
checkable detail, context = tie the task to its project and files), title (imperative, \
specific), description (two to four sentences: what to do and why), acceptance_criteria \
(short checkable statements). Use only facts from the task and its context: no names, \
versions, numbers or files that the task does not give. Plain sentences, no code or markup.";

const DECOMPOSE_SYSTEM: &str = "You split a software task into smaller subtasks. \
Answer with JSON only. Each subtask has: title (imperative, distinct, not the task's own \
title), description (what to do, concretely), complexity (1 to 10, smaller than the whole \
task), depends_on (positions, counting from 0, of earlier subtasks that must be done first), \
reasoning (one sentence on why the subtask is needed). Every subtask is part of this task, \
not of the examples. Use no names, versions, numbers or files that the task does not give. \
Plain sentences, no code or markup.";

/// The worked examples shown before each kind of request, one exchange
/// each: they teach a small model the shape and granularity wanted. They
/// live in `examples.json` so that what reads answers (the rules that catch
/// copied example content, the eval) reads the same text the model saw.
#[derive(Debug, Deserialize)]
pub struct Examples {
    pub enhance: Vec<Example>,
    pub decompose: Vec<Example>,
}

#[derive(Debug, Deserialize)]
pub struct Example {
    /// The user message, rendered as a real task is.
    pub task: String,
    /// The assistant's answer, valid under the answer schema.
    pub answer: serde_json::Value,
}

impl Example {
    fn exchange(&self) -> [Message; 2] {
        [
            Message::new(Role::User, self.task.clone()),
            Message::new(Role::Assistant, self.answer.to_string()),
        ]
    }
}

pub fn examples() -> &'static Examples {
    static EXAMPLES: LazyLock<Examples> = LazyLock::new(|| {
        serde_json::from_str(include_str!("examples.json"))
            .expect("examples.json is checked by the unit tests")
    });
    &EXAMPLES
}

/// The system message, each example exchange, then the request.
fn conversation(system: &str, examples: &[Example], user: String) -> Vec<Message> {
    std::iter::once(Message::new(Role::System, system))
        .chain(examples.iter().flat_map(Example::exchange))
        .chain(std::iter::once(Message::new(Role::User, user)))
        .collect()
}

/// Messages asking for an enhancement of the request's task.
pub fn enhance(request: &EnhanceRequest) -> Vec<Message> {
    let mut user = render_task(&request.task, &request.context);
    match request.kind {
        Some(kind) => {
            let _ = write!(user, "\nEnhancement kind: {}", kind.as_str());
        }
        None => user.push_str("\nEnhancement kind: choose the one that helps most"),
    }
    conversation(ENHANCE_SYSTEM, &examples().enhance, user)
}

/// Messages asking for a decomposition of the request's task.
pub fn decompose(request: &DecomposeRequest) -> Vec<Message> {
    let mut user = render_task(&request.task, &request.context);
    let (min, max) = (request.min_subtasks, request.max_subtasks);
    if min == max {
        let _ = write!(user, "\nSplit it into exactly {min} subtasks.");
    } else {
        let _ = write!(user, "\nSplit it into {min} to {max} subtasks.");
    }
    conversation(DECOMPOSE_SYSTEM, &examples().decompose, user)
}

/// Messages asking for `min..=max` more subtasks of the request's task
/// after `kept`, shown as the model's own answer: the good subtasks of an
/// answer that had too few stay, and only the missing ones are generated.
pub fn decompose_more(
    request: &DecomposeRequest,
    kept: &[Subtask],
    min: u32,
    max: u32,
    violation: &Violation,
) -> Vec<Message> {
    let mut messages = decompose(request);
    messages.push(Message::new(
        Role::Assistant,
        serde_json::json!({ "subtasks": kept }).to_string(),
    ));
    let count = if min == max {
        min.to_string()
    } else {
        format!("{min} to {max}")
    };
    messages.push(Message::new(
        Role::User,
        format!(
            "Some subtasks were left out: {}. Give {count} more subtasks of the same task, \
             different from the ones above. depends_on counts from 0 over all subtasks, \
             the ones above included.",
            feedback(violation)
        ),
    ));
    messages
}

/// The messages of a repair attempt: the first request, its task message
/// extended with what was wrong with the rejected answer. The rejected
/// answer itself is not shown: small models copy what they see.
pub fn corrected(first: &[Message], violation: &Violation) -> Vec<Message> {
    let mut messages = first.to_vec();
    if let Some(last) = messages.last_mut() {
        let _ = write!(
            last.content,
            "\nA previous answer was rejected: {}. Avoid that mistake.",
            feedback(violation)
        );
    }
    messages
}

/// What the model is told about a violation. The rules about the task
/// name the offending text in their detail ("gives the name \"Windows\""),
/// and a small model told a word writes it again: those get advice instead.
fn feedback(violation: &Violation) -> Cow<'_, str> {
    let advice = match violation.rule {
        Rule::CopiesExample => "it copied the worked example; write about this task only",
        Rule::UnsupportedDetail => {
            "it named products, versions, numbers or files that the task does not give; \
             use only what the task gives"
        }
        Rule::MalformedText => "it held code or markup; write plain sentences",
        Rule::OffTopic => "part of it was not about this task; keep every part about this task",
        _ => return Cow::Borrowed(&violation.detail),
    };
    Cow::Borrowed(advice)
}

fn render_task(task: &TaskSpec, context: &ProjectContext) -> String {
    let mut text = format!("Task: {}", task.title);
    let mut line = |label: &str, value: &str| {
        if !value.trim().is_empty() {
            let _ = write!(text, "\n{label}: {}", value.trim());
        }
    };
    line("Description", task.description.as_deref().unwrap_or(""));
    line(
        "Complexity",
        &task
            .complexity
            .map(|complexity| format!("{complexity}/10"))
            .unwrap_or_default(),
    );
    line("Reasoning", task.reasoning.as_deref().unwrap_or(""));
    line("Relevant files", &task.context_files.join(", "));
    line("Depends on", &task.dependencies.join(", "));
    line("Project", &context.project);
    line("Requirements excerpt", &context.prd_excerpt);
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{backend::Sampling, task::EnhancementKind};

    fn task() -> TaskSpec {
        TaskSpec {
            id: "T-1".into(),
            title: "Add rate limiting".into(),
            description: Some("Protect the public API.".into()),
            complexity: Some(5),
            context_files: vec!["src/api.rs".into(), "src/limits.rs".into()],
            dependencies: vec!["T-0 auth".into()],
            ..TaskSpec::default()
        }
    }

    #[test]
    fn enhance_prompt_renders_every_given_field_and_skips_empty_ones() {
        let messages = enhance(&EnhanceRequest {
            task: task(),
            context: ProjectContext {
                project: "Billing service".into(),
                prd_excerpt: String::new(),
            },
            kind: Some(EnhancementKind::Specify),
            model: None,
            sampling: Sampling::default(),
        });
        let examples = &examples().enhance;
        assert_eq!(messages.len(), 2 + 2 * examples.len());
        assert_eq!(messages[0], Message::new(Role::System, ENHANCE_SYSTEM));
        assert_eq!(
            messages[1],
            Message::new(Role::User, examples[0].task.clone())
        );
        assert_eq!(
            messages[2],
            Message::new(Role::Assistant, examples[0].answer.to_string())
        );
        assert_eq!(
            messages.last().unwrap().content,
            "Task: Add rate limiting\n\
             Description: Protect the public API.\n\
             Complexity: 5/10\n\
             Relevant files: src/api.rs, src/limits.rs\n\
             Depends on: T-0 auth\n\
             Project: Billing service\n\
             Enhancement kind: specify"
        );
    }

    #[test]
    fn worked_examples_obey_their_own_schemas_and_rules() {
        use crate::{json_schema::OutputSchema, task::schema};
        let examples = examples();
        assert!(!examples.enhance.is_empty() && !examples.decompose.is_empty());
        for example in &examples.decompose {
            OutputSchema::compile(schema::decomposition(3, 4, Some(5), None))
                .unwrap()
                .check(&example.answer.to_string())
                .unwrap();
        }
        for example in &examples.enhance {
            OutputSchema::compile(schema::enhancement(None, None))
                .unwrap()
                .check(&example.answer.to_string())
                .unwrap();
        }
    }

    #[test]
    fn a_repair_repeats_the_request_and_names_the_violation_without_the_answer() {
        let first = vec![
            Message::new(Role::System, "system"),
            Message::new(Role::User, "Task: Ship v2"),
        ];
        let violation = Violation::new(
            crate::task::Rule::VagueDescription,
            "subtasks[1].description only restates the title \"Ship\"",
        );
        let repaired = corrected(&first, &violation);
        assert_eq!(repaired[0], first[0]);
        assert_eq!(
            repaired[1].content,
            "Task: Ship v2\nA previous answer was rejected: subtasks[1].description only \
             restates the title \"Ship\". Avoid that mistake."
        );
        assert_eq!(repaired.len(), first.len());
        let invented = Violation::new(
            Rule::UnsupportedDetail,
            "subtasks[2].title gives the name \"Windows\", which the task does not",
        );
        let repaired = corrected(&first, &invented);
        assert!(!repaired[1].content.contains("Windows"), "{repaired:?}");
        assert!(repaired[1].content.contains("use only what the task gives"));
    }

    #[test]
    fn decompose_prompt_states_the_range() {
        let request = DecomposeRequest {
            task: TaskSpec {
                title: "Ship v2".into(),
                ..TaskSpec::default()
            },
            context: ProjectContext::default(),
            min_subtasks: 3,
            max_subtasks: 5,
            model: None,
            sampling: Sampling::default(),
        };
        let messages = decompose(&request);
        assert_eq!(messages[0], Message::new(Role::System, DECOMPOSE_SYSTEM));
        assert_eq!(
            messages[2],
            Message::new(Role::Assistant, examples().decompose[0].answer.to_string())
        );
        assert_eq!(
            messages.last().unwrap().content,
            "Task: Ship v2\nSplit it into 3 to 5 subtasks."
        );
    }
}
