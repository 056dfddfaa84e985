//! EnhanceTask: its request, its typed answer and the rules an answer obeys.

use serde::Deserialize;
use serde_json::Value;

use super::{
    Answered, ProjectContext, Task, TaskRunner, TaskSpec,
    cache::ResultCache,
    prompt, schema,
    violation::{Rule, Violation, named_variants, same_meaning},
};
use crate::backend::{Message, Sampling};

named_variants! {
    /// How an enhancement changed the task.
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Deserialize)]
    #[serde(rename_all = "lowercase")]
    pub enum EnhancementKind, named by as_str {
        /// Removes ambiguity.
        Clarify => "clarify",
        /// Adds concrete, checkable detail.
        Specify => "specify",
        /// Ties the task to its project, requirements, files and dependencies.
        Context => "context",
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct EnhanceRequest {
    pub task: TaskSpec,
    pub context: ProjectContext,
    /// `None` lets the model choose.
    pub kind: Option<EnhancementKind>,
    pub model: Option<String>,
    pub sampling: Sampling,
}

#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Enhancement {
    pub kind: EnhancementKind,
    pub title: String,
    pub description: String,
    pub acceptance_criteria: Vec<String>,
}

impl Task for EnhanceRequest {
    type Answer = Enhancement;
    const NAME: &'static str = "enhance";

    fn model(&self) -> Option<&str> {
        self.model.as_deref()
    }

    fn sampling(&self) -> &Sampling {
        &self.sampling
    }

    fn schema(&self) -> Value {
        schema::enhancement(self.kind)
    }

    fn messages(&self) -> Vec<Message> {
        prompt::enhance(self)
    }

    fn parse(&self, value: Value) -> Result<Enhancement, Violation> {
        parse(value, self)
    }

    fn cache(runner: &TaskRunner) -> Option<&ResultCache<Answered<Enhancement>>> {
        runner.enhancements.as_deref()
    }
}

/// Reads a schema-valid answer and checks what the schema cannot say:
/// non-blank fields, the requested kind, distinct acceptance criteria, and
/// that it says more than the task it enhances.
pub(super) fn parse(value: Value, request: &EnhanceRequest) -> Result<Enhancement, Violation> {
    let mut answer: Enhancement = serde_json::from_value(value).map_err(|error| {
        Violation::new(Rule::Schema, format!("unexpected answer shape: {error}"))
    })?;
    if let Some(wanted) = request.kind
        && answer.kind != wanted
    {
        return Err(Violation::new(
            Rule::WrongKind,
            format!("kind must be {:?}", wanted.as_str()),
        ));
    }
    answer.title = non_blank("title", &answer.title)?;
    answer.description = non_blank("description", &answer.description)?;
    // Keeping the title is fine when the description adds something: it
    // must neither repeat the task's description nor the title.
    let restated_description = request
        .task
        .description
        .as_deref()
        .is_some_and(|original| same_meaning(original, &answer.description))
        || same_meaning(&answer.title, &answer.description);
    if same_meaning(&request.task.title, &answer.title) && restated_description {
        return Err(Violation::new(
            Rule::RestatesTask,
            "the title and description restate the task without adding anything",
        ));
    }
    let mut criteria: Vec<String> = Vec::with_capacity(answer.acceptance_criteria.len());
    for (index, criterion) in answer.acceptance_criteria.iter().enumerate() {
        let criterion = non_blank(&format!("acceptance_criteria[{index}]"), criterion)?;
        if let Some(earlier) = criteria
            .iter()
            .position(|seen| same_meaning(seen, &criterion))
        {
            return Err(Violation::new(
                Rule::DuplicateCriteria,
                format!("acceptance_criteria[{index}] repeats acceptance_criteria[{earlier}]"),
            ));
        }
        criteria.push(criterion);
    }
    answer.acceptance_criteria = criteria;
    Ok(answer)
}

/// The trimmed text, or a violation when nothing but whitespace is left.
pub(super) fn non_blank(field: &str, text: &str) -> Result<String, Violation> {
    let trimmed = text.trim();
    if trimmed.is_empty() {
        Err(Violation::new(
            Rule::BlankField,
            format!("{field} is blank"),
        ))
    } else {
        Ok(trimmed.to_owned())
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn every_kind_reads_back_from_its_name() {
        for kind in EnhancementKind::ALL {
            assert_eq!(
                serde_json::from_value::<EnhancementKind>(json!(kind.as_str())).unwrap(),
                kind
            );
        }
    }

    fn request(kind: Option<EnhancementKind>) -> EnhanceRequest {
        EnhanceRequest {
            task: TaskSpec {
                title: "Add login".into(),
                description: Some("Users need to log in.".into()),
                ..TaskSpec::default()
            },
            context: ProjectContext::default(),
            kind,
            model: None,
            sampling: Sampling::default(),
        }
    }

    fn answer(title: &str, description: &str, criteria: &[&str]) -> Value {
        json!({
            "kind": "clarify", "title": title, "description": description,
            "acceptance_criteria": criteria
        })
    }

    #[test]
    fn each_rule_names_its_violation() {
        let cases = [
            (
                answer("Add login", "   ", &["works"]),
                Rule::BlankField,
                "description is blank",
            ),
            (
                answer("Add login", "Add a login form.", &["works", " \n"]),
                Rule::BlankField,
                "acceptance_criteria[1] is blank",
            ),
            (
                answer(
                    "Add login",
                    "Add a login form.",
                    &["A user can log in", "Users can log in."],
                ),
                Rule::DuplicateCriteria,
                "acceptance_criteria[1] repeats acceptance_criteria[0]",
            ),
            (
                answer(
                    "Add the login",
                    "Users need to log in",
                    &["A user can log in"],
                ),
                Rule::RestatesTask,
                "restate the task",
            ),
        ];
        for (answer, rule, expected) in cases {
            let violation = parse(answer, &request(None)).unwrap_err();
            assert_eq!(violation.rule, rule, "{violation:?}");
            assert!(violation.detail.contains(expected), "{violation:?}");
        }
    }

    #[test]
    fn keeping_the_title_is_fine_when_the_description_adds_something() {
        let mut request = request(None);
        request.task.description = None;
        let answer = answer(
            "Add login",
            "Add a login form with e-mail and password that starts a session.",
            &["A user with a valid password reaches the dashboard"],
        );
        assert!(parse(answer, &request).is_ok());
        let restated = super::tests::answer("Add the login", "Add login.", &["Users can log in"]);
        assert_eq!(
            parse(restated, &request).unwrap_err().rule,
            Rule::RestatesTask
        );
    }

    #[test]
    fn a_kind_other_than_the_requested_one_is_a_violation() {
        let answer = answer("Add login", "Add a login form.", &["A user can log in"]);
        let violation =
            parse(answer.clone(), &request(Some(EnhancementKind::Specify))).unwrap_err();
        assert_eq!(violation.rule, Rule::WrongKind);
        let parsed = parse(answer, &request(Some(EnhancementKind::Clarify))).unwrap();
        assert_eq!(parsed.title, "Add login");
    }
}
