//! EnhanceTask: its request, its typed answer and the rules an answer obeys.

use serde::Deserialize;
use serde_json::Value;

use super::{ProjectContext, TaskSpec};
use crate::backend::Sampling;

/// How an enhancement changed the task.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EnhancementKind {
    /// Removes ambiguity.
    Clarify,
    /// Adds concrete, checkable detail.
    Specify,
    /// Ties the task to its project, requirements, files and dependencies.
    Context,
}

impl EnhancementKind {
    pub const ALL: [EnhancementKind; 3] = [Self::Clarify, Self::Specify, Self::Context];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Clarify => "clarify",
            Self::Specify => "specify",
            Self::Context => "context",
        }
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

/// Reads a schema-valid answer and checks what the schema cannot say.
pub(super) fn parse(value: Value, wanted: Option<EnhancementKind>) -> Result<Enhancement, String> {
    let mut answer: Enhancement = serde_json::from_value(value)
        .map_err(|error| format!("unexpected answer shape: {error}"))?;
    if let Some(wanted) = wanted
        && answer.kind != wanted
    {
        return Err(format!("kind must be {:?}", wanted.as_str()));
    }
    answer.title = non_blank("title", &answer.title)?;
    answer.description = non_blank("description", &answer.description)?;
    answer.acceptance_criteria = answer
        .acceptance_criteria
        .iter()
        .enumerate()
        .map(|(index, criterion)| non_blank(&format!("acceptance_criteria[{index}]"), criterion))
        .collect::<Result<_, _>>()?;
    Ok(answer)
}

/// The trimmed text, or an error when nothing but whitespace is left.
pub(super) fn non_blank(field: &str, text: &str) -> Result<String, String> {
    let trimmed = text.trim();
    if trimmed.is_empty() {
        Err(format!("{field} is blank"))
    } else {
        Ok(trimmed.to_owned())
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn blank_fields_are_violations() {
        let answer = json!({
            "kind": "clarify", "title": "Add login", "description": "   ",
            "acceptance_criteria": ["works"]
        });
        assert_eq!(parse(answer, None).unwrap_err(), "description is blank");
        let answer = json!({
            "kind": "clarify", "title": "Add login", "description": "Add a login form.",
            "acceptance_criteria": ["works", " \n"]
        });
        assert_eq!(
            parse(answer, None).unwrap_err(),
            "acceptance_criteria[1] is blank"
        );
    }

    #[test]
    fn a_kind_other_than_the_requested_one_is_a_violation() {
        let answer = json!({
            "kind": "clarify", "title": "Add login", "description": "Add a login form.",
            "acceptance_criteria": ["A user can log in"]
        });
        assert!(parse(answer.clone(), Some(EnhancementKind::Specify)).is_err());
        let parsed = parse(answer, Some(EnhancementKind::Clarify)).unwrap();
        assert_eq!(parsed.title, "Add login");
    }
}
