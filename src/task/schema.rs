//! The JSON Schemas answers are generated under. Property order is the order
//! the model writes fields in, and every string and list is bounded so a
//! small model cannot ramble past its token budget.

use serde_json::{Value, json};

use super::{EnhancementKind, TextPattern};

pub const TITLE_MAX_CHARS: usize = 120;
pub const ENHANCED_DESCRIPTION_MAX_CHARS: usize = 800;
pub const SUBTASK_DESCRIPTION_MAX_CHARS: usize = 300;
/// Long enough that a description must say more than its title: small
/// models otherwise copy the title into it.
pub const SUBTASK_DESCRIPTION_MIN_CHARS: usize = 50;
pub const REASONING_MAX_CHARS: usize = 160;
pub const CRITERION_MAX_CHARS: usize = 160;
pub const MAX_CRITERIA: usize = 6;

/// Schema of an enhancement; a requested kind is the only allowed kind.
pub fn enhancement(kind: Option<EnhancementKind>, text_pattern: Option<&TextPattern>) -> Value {
    let kinds: Vec<&str> = match kind {
        Some(kind) => vec![kind.as_str()],
        None => EnhancementKind::ALL
            .iter()
            .map(|kind| kind.as_str())
            .collect(),
    };
    json!({
        "type": "object",
        "properties": {
            "kind": { "type": "string", "enum": kinds },
            "title": text(3, TITLE_MAX_CHARS, text_pattern),
            "description": about(10, ENHANCED_DESCRIPTION_MAX_CHARS, text_pattern),
            "acceptance_criteria": {
                "type": "array",
                "items": about(3, CRITERION_MAX_CHARS, text_pattern),
                "minItems": 1,
                "maxItems": MAX_CRITERIA
            }
        },
        "required": ["kind", "title", "description", "acceptance_criteria"],
        "additionalProperties": false
    })
}

/// Highest complexity a subtask may have: below its parent's when the parent
/// has one (1 stays 1), else the top of the scale.
pub fn subtask_complexity_ceiling(parent: Option<u8>) -> u8 {
    parent.map_or(10, |parent| parent.saturating_sub(1).max(1))
}

/// Schema of a decomposition into `min..=max` subtasks of a task whose
/// complexity is `parent_complexity`. Each position has its own item schema
/// so that `depends_on` can only name earlier positions: the dependency
/// graph is acyclic by construction.
pub fn decomposition(
    min: u32,
    max: u32,
    parent_complexity: Option<u8>,
    text_pattern: Option<&TextPattern>,
) -> Value {
    continuation(0, min, max, parent_complexity, text_pattern)
}

/// Schema of `min..=max` more subtasks following `first` subtasks already
/// given: they take positions from `first` on, and `depends_on` may name
/// any earlier position, given ones included.
pub fn continuation(
    first: u32,
    min: u32,
    max: u32,
    parent_complexity: Option<u8>,
    text_pattern: Option<&TextPattern>,
) -> Value {
    let ceiling = subtask_complexity_ceiling(parent_complexity);
    let positions: Vec<Value> = (first..first + max)
        .map(|position| subtask(position, ceiling, text_pattern))
        .collect();
    json!({
        "type": "object",
        "properties": {
            "subtasks": {
                "type": "array",
                "minItems": min,
                "maxItems": max,
                "prefixItems": positions
            }
        },
        "required": ["subtasks"],
        "additionalProperties": false
    })
}

/// A text field of `min..=max` characters, generated under `pattern` when
/// given. The length then goes into the pattern: llguidance cannot
/// intersect a pattern with `minLength`/`maxLength`. Answers are checked
/// without patterns (the rules judge the text), so the checking schema
/// stays the same for every task and is compiled once.
fn text(min: usize, max: usize, pattern: Option<&TextPattern>) -> Value {
    match pattern {
        Some(pattern) => json!({ "type": "string", "pattern": pattern.of_length(min, max) }),
        None => json!({ "type": "string", "minLength": min, "maxLength": max }),
    }
}

/// A text field that names the task's subject ([`TextPattern::about`]).
fn about(min: usize, max: usize, pattern: Option<&TextPattern>) -> Value {
    match pattern {
        Some(pattern) => json!({ "type": "string", "pattern": pattern.about(min, max) }),
        None => text(min, max, None),
    }
}

fn subtask(position: u32, complexity_ceiling: u8, text_pattern: Option<&TextPattern>) -> Value {
    json!({
        "type": "object",
        "properties": {
            "title": text(3, TITLE_MAX_CHARS, text_pattern),
            "description": about(
                SUBTASK_DESCRIPTION_MIN_CHARS,
                SUBTASK_DESCRIPTION_MAX_CHARS,
                text_pattern
            ),
            "complexity": { "type": "integer", "minimum": 1, "maximum": complexity_ceiling },
            "depends_on": {
                "type": "array",
                "items": { "type": "integer", "minimum": 0, "maximum": position.saturating_sub(1) },
                "maxItems": position
            },
            "reasoning": text(3, REASONING_MAX_CHARS, text_pattern)
        },
        "required": ["title", "description", "complexity", "depends_on", "reasoning"],
        "additionalProperties": false
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::json_schema::OutputSchema;

    #[test]
    fn every_task_schema_is_valid_json_schema() {
        for kind in [None].into_iter().chain(EnhancementKind::ALL.map(Some)) {
            OutputSchema::compile(enhancement(kind, None)).unwrap();
        }
        for (min, max, parent) in [(2, 2, None), (3, 6, Some(1)), (12, 12, Some(10))] {
            OutputSchema::compile(decomposition(min, max, parent, None)).unwrap();
        }
    }

    #[test]
    fn dependencies_can_only_point_backwards() {
        let schema = OutputSchema::compile(decomposition(2, 3, None, None)).unwrap();
        let subtask = |depends_on: &[u32]| {
            json!({
                "title": "Do a thing",
                "description": "Do the thing well, with tests and a short note for the team.",
                "complexity": 2,
                "depends_on": depends_on, "reasoning": "Needed."
            })
        };
        let answer = |items: Vec<Value>| json!({ "subtasks": items }).to_string();
        assert!(
            schema
                .check(&answer(vec![subtask(&[]), subtask(&[0])]))
                .is_ok()
        );
        assert!(
            schema
                .check(&answer(vec![subtask(&[0]), subtask(&[])]))
                .is_err()
        );
        assert!(
            schema
                .check(&answer(vec![subtask(&[]), subtask(&[1])]))
                .is_err()
        );
        let four = vec![subtask(&[]), subtask(&[0]), subtask(&[1]), subtask(&[2])];
        assert!(schema.check(&answer(four)).is_err(), "maxItems holds");
    }

    #[test]
    fn subtasks_are_simpler_than_their_parent() {
        assert_eq!(subtask_complexity_ceiling(Some(6)), 5);
        assert_eq!(subtask_complexity_ceiling(Some(1)), 1);
        assert_eq!(subtask_complexity_ceiling(None), 10);
        let schema = decomposition(2, 3, Some(6), None);
        assert_eq!(
            schema["properties"]["subtasks"]["prefixItems"][2]["properties"]["complexity"]["maximum"],
            json!(5)
        );
    }

    #[test]
    fn a_requested_kind_is_the_only_allowed_kind() {
        let schema = enhancement(Some(EnhancementKind::Specify), None);
        assert_eq!(schema["properties"]["kind"]["enum"], json!(["specify"]));
    }
}
