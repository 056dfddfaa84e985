//! The rules a model answer can break, by stable name, and the similarity
//! test behind the "no repeats" rules.

use std::{collections::BTreeSet, fmt};

/// Declares a fieldless enum, its `ALL` constant (every variant, in order)
/// and the method giving each variant's stable name, from one list: a new
/// variant cannot be left out of `ALL` or go without a name.
macro_rules! named_variants {
    (
        $(#[$meta:meta])*
        $vis:vis enum $name:ident, named by $method:ident {
            $( $(#[$variant_meta:meta])* $variant:ident => $text:literal, )+
        }
    ) => {
        $(#[$meta])*
        $vis enum $name {
            $( $(#[$variant_meta])* $variant, )+
        }

        impl $name {
            pub const ALL: [$name; [$($text),+].len()] = [$(Self::$variant),+];

            pub fn $method(self) -> &'static str {
                match self {
                    $(Self::$variant => $text,)+
                }
            }
        }
    };
}
pub(crate) use named_variants;

named_variants! {
    /// A rule of EnhanceTask/DecomposeTask answers. Names are part of the API:
    /// callers see them in `ResponseMeta.repaired` and in the `rigger-violation`
    /// metadata of a failed call.
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
    pub enum Rule, named by name {
        /// Generation hit max_tokens before the JSON was complete.
        Truncated => "truncated",
        /// Not JSON, or not valid under the answer's schema.
        Schema => "schema",
        /// A text field is empty or only whitespace.
        BlankField => "blank_field",
        /// An enhancement of another kind than the one requested.
        WrongKind => "wrong_kind",
        /// Fewer or more subtasks than requested, with no repeats involved.
        SubtaskCount => "subtask_count",
        /// Too few subtasks once repeats (of the parent or of a sibling) are
        /// dropped.
        DuplicateSubtasks => "duplicate_subtasks",
        /// A subtask description that only restates its title.
        VagueDescription => "vague_description",
        /// Complexity outside 1–10, or above the parent's.
        Complexity => "complexity",
        /// A dependency on no sibling, or on the subtask itself.
        Dependency => "dependency",
        /// Dependencies that form a cycle.
        DependencyCycle => "dependency_cycle",
        /// Two acceptance criteria that say the same thing.
        DuplicateCriteria => "duplicate_criteria",
        /// An enhancement whose title and description restate the task's own.
        RestatesTask => "restates_task",
        /// Content of the prompt's worked example that the task does not have.
        CopiesExample => "copies_example",
        /// A version, figure, path, file or product name the task does not give.
        UnsupportedDetail => "unsupported_detail",
        /// Markup or code fragments (dict/JSON literal marks, stray leading
        /// punctuation) the task does not contain.
        MalformedText => "malformed_text",
        /// A subtask or acceptance criterion that shares no content word
        /// with the task.
        OffTopic => "off_topic",
    }
}

impl fmt::Display for Rule {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(self.name())
    }
}

/// One broken rule and what exactly broke it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Violation {
    pub rule: Rule,
    pub detail: String,
}

impl Violation {
    pub fn new(rule: Rule, detail: impl Into<String>) -> Self {
        Self {
            rule,
            detail: detail.into(),
        }
    }
}

impl fmt::Display for Violation {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(formatter, "{} ({})", self.detail, self.rule)
    }
}

/// Words that do not change what a title asks for.
const FILLER_WORDS: &[&str] = &[
    "a", "an", "the", "to", "of", "for", "and", "in", "on", "with", "from", "by", "into", "all",
    "each", "its", "their", "our", "new", "it", "this", "that",
];

/// Whether `word` (lowercased) is one of the [`FILLER_WORDS`].
pub(super) fn is_filler(word: &str) -> bool {
    FILLER_WORDS.contains(&word)
}

/// Two texts at least this similar (shared content words over all content
/// words) say the same thing: "Add the login form" and "Add login form"
/// (1.0) do, "Write unit tests" and "Write integration tests" (0.5) do not.
const SAME_MEANING: f64 = 0.8;

/// The content words of a text, lowercased, plurals made singular.
fn content_words(text: &str) -> BTreeSet<String> {
    text.split(|c: char| !c.is_alphanumeric())
        .filter(|word| !word.is_empty())
        .map(str::to_lowercase)
        .filter(|word| !FILLER_WORDS.contains(&word.as_str()))
        .map(|word| singular(&word).to_owned())
        .collect()
}

/// "users" → "user", leaving "class" and short words like "is" alone.
fn singular(word: &str) -> &str {
    match word.strip_suffix('s') {
        Some(stem) if stem.len() >= 3 && !stem.ends_with('s') => stem,
        _ => word,
    }
}

/// Whether two texts say the same thing, up to case, punctuation, filler
/// words and word order.
pub fn same_meaning(a: &str, b: &str) -> bool {
    let (a, b) = (content_words(a), content_words(b));
    if a.is_empty() || b.is_empty() {
        return a == b;
    }
    let shared = a.intersection(&b).count() as f64;
    let all = a.union(&b).count() as f64;
    shared / all >= SAME_MEANING
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn restatements_match_and_different_work_does_not() {
        assert!(same_meaning("Add the login form.", "add login form"));
        assert!(same_meaning("Set up CI", "Set up the CI"));
        assert!(same_meaning(
            "Write tests for the parser",
            "Write the parser tests"
        ));
        assert!(!same_meaning("Write unit tests", "Write integration tests"));
        assert!(!same_meaning("Add dark mode", "Add a dark mode toggle"));
        assert!(!same_meaning("Design the schema", "Migrate the data"));
        assert!(same_meaning("A user can log in", "Users can log in."));
    }

    #[test]
    fn every_rule_has_a_distinct_name() {
        let names: BTreeSet<&str> = Rule::ALL.iter().map(|rule| rule.name()).collect();
        assert_eq!(names.len(), Rule::ALL.len());
    }

    #[test]
    fn all_lists_every_rule_once_in_declaration_order() {
        let positions: Vec<usize> = Rule::ALL.iter().map(|&rule| rule as usize).collect();
        assert_eq!(positions, (0..Rule::ALL.len()).collect::<Vec<_>>());
    }
}
