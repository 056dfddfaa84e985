//! EnhanceTask: its request, its typed answer and the rules an answer obeys.

use std::convert::Infallible;

use serde::Deserialize;
use serde_json::Value;

use super::{
    Answered, Ask, Parsed, ProjectContext, Rejection, Task, TaskRunner, TaskSpec, TextPattern,
    cache::ResultCache,
    grounds::{Grounds, OnTopic, example_phrases},
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
    type Kept = Infallible;
    const NAME: &'static str = "enhance";

    fn model(&self) -> Option<&str> {
        self.model.as_deref()
    }

    fn sampling(&self) -> &Sampling {
        &self.sampling
    }

    fn schema(&self, text_pattern: Option<&TextPattern>) -> Value {
        schema::enhancement(self.kind, text_pattern)
    }

    /// The worked examples' phrases.
    fn already_said(&self) -> Vec<String> {
        example_phrases(&self.task, &self.context, &prompt::examples().enhance)
    }

    fn text_pattern(&self) -> TextPattern {
        TextPattern::of(&self.task, &self.context)
    }

    fn messages(&self) -> Vec<Message> {
        prompt::enhance(self)
    }

    fn parse(
        &self,
        value: Value,
        on_topic: &OnTopic,
    ) -> Result<Parsed<Enhancement>, Rejection<Infallible>> {
        parse(value, self, on_topic)
    }

    /// An enhancement is small: it is asked for again whole, never in parts.
    fn follow_up(&self, kept: &Infallible, _: &Violation) -> Ask {
        match *kept {}
    }

    fn merged(&self, kept: &Infallible, _: Value) -> Value {
        match *kept {}
    }

    fn cache(runner: &TaskRunner) -> Option<&ResultCache<Answered<Enhancement>>> {
        runner.enhancements.as_deref()
    }
}

/// Reads a schema-valid answer and checks what the schema cannot say:
/// non-blank fields, the requested kind, that it says more than the task it
/// enhances, and that its title and description are well formed, invent
/// nothing and are about the task (`Grounds`). An acceptance criterion that
/// repeats an earlier one or breaks one of those rules is left out; the
/// answer stands while one criterion remains.
pub(super) fn parse(
    value: Value,
    request: &EnhanceRequest,
    on_topic: &OnTopic,
) -> Result<Parsed<Enhancement>, Rejection<Infallible>> {
    let mut answer: Enhancement = serde_json::from_value(value).map_err(|error| {
        Violation::new(Rule::Schema, format!("unexpected answer shape: {error}"))
    })?;
    if let Some(wanted) = request.kind
        && answer.kind != wanted
    {
        return Err(Violation::new(
            Rule::WrongKind,
            format!("kind must be {:?}", wanted.as_str()),
        )
        .into());
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
        )
        .into());
    }
    let grounds = Grounds::of(
        &request.task,
        &request.context,
        &prompt::examples().enhance,
        on_topic,
    );
    grounds.check("title", &answer.title)?;
    grounds.check("description", &answer.description)?;
    grounds.on_topic(
        "title and description",
        &format!("{}. {}", answer.title, answer.description),
        "",
    )?;
    // Criteria may build on what the accepted title and description add.
    let grounds = grounds.widened(&format!("{}\n{}", answer.title, answer.description));
    let (criteria, dropped) = criteria(&answer.acceptance_criteria, &grounds)?;
    answer.acceptance_criteria = criteria;
    Ok(Parsed {
        value: answer,
        dropped,
    })
}

/// The acceptance criteria that stand, and those left out with their rule;
/// a violation when none stands.
fn criteria(
    given: &[String],
    grounds: &Grounds,
) -> Result<(Vec<String>, Vec<Violation>), Violation> {
    let mut kept: Vec<String> = Vec::with_capacity(given.len());
    let mut dropped = Vec::new();
    for (index, criterion) in given.iter().enumerate() {
        let field = format!("acceptance_criteria[{index}]");
        let criterion = non_blank(&field, criterion)?;
        let judged = match kept.iter().position(|seen| same_meaning(seen, &criterion)) {
            Some(earlier) => Err(Violation::new(
                Rule::DuplicateCriteria,
                format!("{field} repeats acceptance_criteria[{earlier}]"),
            )),
            None => grounds
                .check(&field, &criterion)
                .and_then(|()| grounds.on_topic(&field, &criterion, "")),
        };
        match judged {
            Ok(()) => kept.push(criterion),
            Err(violation) => dropped.push(violation),
        }
    }
    if kept.is_empty() {
        let first = dropped.swap_remove(0);
        return Err(Violation::new(
            first.rule,
            format!("no acceptance criterion stands; {}", first.detail),
        ));
    }
    Ok((kept, dropped))
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
                    "Add the login",
                    "Users need to log in",
                    &["A user can log in"],
                ),
                Rule::RestatesTask,
                "restate the task",
            ),
        ];
        for (answer, rule, expected) in cases {
            let violation = parse(answer, &request(None), &OnTopic::lexical())
                .unwrap_err()
                .violation()
                .clone();
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
        assert!(parse(answer, &request, &OnTopic::lexical()).is_ok());
        let restated = super::tests::answer("Add the login", "Add login.", &["Users can log in"]);
        assert_eq!(
            parse(restated, &request, &OnTopic::lexical())
                .unwrap_err()
                .violation()
                .rule,
            Rule::RestatesTask
        );
    }

    #[test]
    fn a_kind_other_than_the_requested_one_is_a_violation() {
        let answer = answer("Add login", "Add a login form.", &["A user can log in"]);
        let rejection = parse(
            answer.clone(),
            &request(Some(EnhancementKind::Specify)),
            &OnTopic::lexical(),
        )
        .unwrap_err();
        assert_eq!(rejection.violation().rule, Rule::WrongKind);
        let parsed = parse(
            answer,
            &request(Some(EnhancementKind::Clarify)),
            &OnTopic::lexical(),
        )
        .unwrap();
        assert_eq!(parsed.value.title, "Add login");
    }

    #[test]
    fn criteria_that_break_a_rule_are_left_out_and_reported() {
        let parsed = parse(
            answer(
                "Add login",
                "Add a login form with a password field.",
                &[
                    "A user can log in",
                    "Users can log in.",
                    "A search that matches nothing says so",
                    "A wrong password shows an error",
                ],
            ),
            &request(None),
            &OnTopic::lexical(),
        )
        .unwrap();
        assert_eq!(
            parsed.value.acceptance_criteria,
            ["A user can log in", "A wrong password shows an error"]
        );
        let rules: Vec<Rule> = parsed.dropped.iter().map(|v| v.rule).collect();
        assert_eq!(rules, [Rule::DuplicateCriteria, Rule::CopiesExample]);
        assert!(
            parsed.dropped[0]
                .detail
                .contains("acceptance_criteria[1] repeats")
        );
        let none_left = parse(
            answer("Add login", "Add a login form.", &["Ship it to AWS"]),
            &request(None),
            &OnTopic::lexical(),
        )
        .unwrap_err();
        assert_eq!(none_left.violation().rule, Rule::UnsupportedDetail);
        assert!(
            none_left
                .violation()
                .detail
                .starts_with("no acceptance criterion stands"),
            "{none_left:?}"
        );
    }
}
