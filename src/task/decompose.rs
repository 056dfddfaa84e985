//! DecomposeTask: its request, its typed answer and the rules an answer
//! obeys: count of distinct subtasks in range, non-blank fields, a
//! description that says more than its title, complexity 1–10 and below
//! the parent's when known, dependencies on existing siblings without cycles.

use std::borrow::Cow;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{
    Answered, Ask, Parsed, ProjectContext, Rejection, Task, TaskRunner, TaskSpec, TextPattern,
    cache::ResultCache,
    enhance::non_blank,
    grounds::{Grounds, OnTopic, example_phrases},
    prompt, schema,
    schema::subtask_complexity_ceiling,
    violation::{Rule, Violation, same_meaning},
};
use crate::backend::{Message, Sampling};

/// Subtasks a follow-up asks for beyond those missing: a follow-up comes
/// after the model already broke a rule on this task, and breaks one again
/// in about half of its subtasks, so one spare seldom fills the gap.
const FOLLOW_UP_SPARE: u32 = 2;

#[derive(Clone, Debug, PartialEq)]
pub struct DecomposeRequest {
    pub task: TaskSpec,
    pub context: ProjectContext,
    pub min_subtasks: u32,
    pub max_subtasks: u32,
    pub model: Option<String>,
    pub sampling: Sampling,
}

#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Subtask {
    pub title: String,
    pub description: String,
    pub complexity: u8,
    /// Zero-based positions of sibling subtasks this one waits for.
    pub depends_on: Vec<u32>,
    pub reasoning: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Answer {
    subtasks: Vec<Subtask>,
}

impl Task for DecomposeRequest {
    type Answer = Vec<Subtask>;
    type Kept = Vec<Subtask>;
    const NAME: &'static str = "decompose";

    fn model(&self) -> Option<&str> {
        self.model.as_deref()
    }

    fn sampling(&self) -> &Sampling {
        &self.sampling
    }

    /// One subtask more than the minimum is asked for where the range
    /// allows: a subtask restating the task or a sibling is dropped, and
    /// the answer can still have enough.
    fn asked(&self) -> Cow<'_, Self> {
        Cow::Owned(Self {
            min_subtasks: (self.min_subtasks + 1).min(self.max_subtasks),
            ..self.clone()
        })
    }

    fn schema(&self, text_pattern: Option<&TextPattern>) -> Value {
        schema::decomposition(
            self.min_subtasks,
            self.max_subtasks,
            self.task.complexity,
            text_pattern,
        )
    }

    fn text_pattern(&self) -> TextPattern {
        TextPattern::of(&self.task, &self.context)
    }

    fn messages(&self) -> Vec<Message> {
        prompt::decompose(self)
    }

    /// The parent's title (small models otherwise copy it into the list)
    /// and the worked examples' phrases.
    fn already_said(&self) -> Vec<String> {
        let mut said = vec![self.task.title.clone()];
        said.extend(example_phrases(
            &self.task,
            &self.context,
            &prompt::examples().decompose,
        ));
        said
    }

    fn parse(
        &self,
        value: Value,
        on_topic: &OnTopic,
    ) -> Result<Parsed<Vec<Subtask>>, Rejection<Vec<Subtask>>> {
        parse(value, self, on_topic)
    }

    /// Asks for the missing subtasks alone, after the kept ones (shown as
    /// the model's own earlier answer): exactly [`FOLLOW_UP_SPARE`] more
    /// than are missing where the range allows (an exact count, since a
    /// model given a range writes its maximum).
    fn follow_up(&self, kept: &Vec<Subtask>, violation: &Violation) -> Ask {
        let given = kept.len() as u32;
        let room = self.max_subtasks.saturating_sub(given);
        let count = (self.min_subtasks.saturating_sub(given) + FOLLOW_UP_SPARE).min(room);
        let (min, max) = (count, count);
        let mut already_said = self.already_said();
        already_said.extend(kept.iter().map(|subtask| subtask.title.clone()));
        Ask {
            messages: prompt::decompose_more(&self.asked(), kept, min, max, violation),
            constraint: schema::continuation(
                given,
                min,
                max,
                self.task.complexity,
                Some(&self.text_pattern()),
            ),
            schema: schema::continuation(given, min, max, self.task.complexity, None),
            already_said,
        }
    }

    fn merged(&self, kept: &Vec<Subtask>, value: Value) -> Value {
        let mut subtasks: Vec<Value> = kept
            .iter()
            .map(|subtask| serde_json::to_value(subtask).expect("a subtask is plain data"))
            .collect();
        if let Value::Array(more) = &value["subtasks"] {
            subtasks.extend(more.iter().cloned());
        }
        serde_json::json!({ "subtasks": subtasks })
    }

    fn cache(runner: &TaskRunner) -> Option<&ResultCache<Answered<Vec<Subtask>>>> {
        runner.decompositions.as_deref()
    }
}

/// Reads a schema-valid answer and checks what the schema cannot say.
///
/// A subtask that adds nothing or cannot be trusted is left out, and the
/// rest stand: a repeat (its title restates the parent task or an earlier
/// sibling, `same_meaning`; dependencies on it move to its original), a
/// description restating its title, text that is malformed, copies the
/// worked example, invents specifics or is off topic (`Grounds`). Only
/// what remains must satisfy the requested count; when it falls short, the
/// good subtasks are kept and only the missing ones are asked for.
pub(super) fn parse(
    value: Value,
    request: &DecomposeRequest,
    on_topic: &OnTopic,
) -> Result<Parsed<Vec<Subtask>>, Rejection<Vec<Subtask>>> {
    let Answer { subtasks } = serde_json::from_value(value).map_err(|error| {
        Violation::new(Rule::Schema, format!("unexpected answer shape: {error}"))
    })?;
    let grounds = Grounds::of(
        &request.task,
        &request.context,
        &prompt::examples().decompose,
        on_topic,
    );
    let given = subtasks.len();
    let mut kept: Vec<Subtask> = Vec::with_capacity(given);
    let mut dropped: Vec<Violation> = Vec::new();
    // Position in the answer -> position among the kept subtasks, if any.
    let mut moved_to: Vec<Option<usize>> = Vec::with_capacity(given);
    for (index, subtask) in subtasks.into_iter().enumerate() {
        let field = |name: &str| field(index, name);
        let subtask = Subtask {
            title: non_blank(&field("title"), &subtask.title)?,
            description: non_blank(&field("description"), &subtask.description)?,
            reasoning: non_blank(&field("reasoning"), &subtask.reasoning)?,
            ..subtask
        };
        check_complexity(&subtask, request.task.complexity, index)?;
        if let Some(bad) = subtask
            .depends_on
            .iter()
            .find(|&&dependency| dependency as usize >= given || dependency as usize == index)
        {
            return Err(Violation::new(
                Rule::Dependency,
                format!(
                    "{} names {bad}, which is not another subtask",
                    field("depends_on")
                ),
            )
            .into());
        }
        let repeated = if same_meaning(&subtask.title, &request.task.title) {
            Some((None, "the task".to_owned()))
        } else {
            kept.iter()
                .position(|seen| same_meaning(&seen.title, &subtask.title))
                .map(|original| (Some(original), format!("subtask {original}")))
        };
        if let Some((original, what)) = repeated {
            dropped.push(Violation::new(
                Rule::DuplicateSubtasks,
                format!("{} repeats {what}", field("title")),
            ));
            moved_to.push(original);
            continue;
        }
        if let Err(violation) = sound(&subtask, &grounds, index) {
            dropped.push(violation);
            moved_to.push(None);
            continue;
        }
        moved_to.push(Some(kept.len()));
        kept.push(subtask);
    }
    follow_moves(&mut kept, &moved_to);
    if let Some(cycle) = find_cycle(&kept) {
        return Err(Violation::new(
            Rule::DependencyCycle,
            format!("dependencies form a cycle through subtask {cycle}"),
        )
        .into());
    }
    let (min, max) = (request.min_subtasks, request.max_subtasks);
    if (min as usize..=max as usize).contains(&kept.len()) {
        return Ok(Parsed {
            value: kept,
            dropped,
        });
    }
    let wanted = if min == max {
        format!("exactly {min} wanted")
    } else {
        format!("between {min} and {max} wanted")
    };
    if dropped.is_empty() {
        return Err(Violation::new(
            Rule::SubtaskCount,
            format!("{} subtasks given; {wanted}", kept.len()),
        )
        .into());
    }
    // The first rule that is more than a repeat names the shortfall.
    let rule = dropped
        .iter()
        .map(|violation| violation.rule)
        .find(|&rule| rule != Rule::DuplicateSubtasks)
        .unwrap_or(Rule::DuplicateSubtasks);
    let reasons: Vec<String> = dropped.iter().map(ToString::to_string).collect();
    let violation = Violation::new(
        rule,
        format!(
            "{} distinct subtasks given ({} of {given} left out: {}); {wanted}",
            kept.len(),
            dropped.len(),
            reasons.join("; ")
        ),
    );
    if kept.is_empty() {
        return Err(Rejection::Whole(violation));
    }
    Err(Rejection::Short {
        kept,
        violation,
        dropped,
    })
}

/// Names a field of the subtask at `index` in violations.
fn field(index: usize, name: &str) -> String {
    format!("subtasks[{index}].{name}")
}

fn check_complexity(subtask: &Subtask, parent: Option<u8>, index: usize) -> Result<(), Violation> {
    let ceiling = subtask_complexity_ceiling(parent);
    if (1..=ceiling).contains(&subtask.complexity) {
        return Ok(());
    }
    let why = match parent {
        Some(parent) => format!("below the parent's {parent}"),
        None => "1 to 10".to_owned(),
    };
    Err(Violation::new(
        Rule::Complexity,
        format!(
            "{} is {}; it must be {why}",
            field(index, "complexity"),
            subtask.complexity
        ),
    ))
}

/// Whether a subtask's text can be returned: a description that says more
/// than its title, nothing malformed, copied or invented, and about the task.
fn sound(subtask: &Subtask, grounds: &Grounds, index: usize) -> Result<(), Violation> {
    if same_meaning(&subtask.description, &subtask.title) {
        return Err(Violation::new(
            Rule::VagueDescription,
            format!(
                "{} only restates the title {:?}",
                field(index, "description"),
                subtask.title
            ),
        ));
    }
    grounds.check(&field(index, "title"), &subtask.title)?;
    grounds.check(&field(index, "description"), &subtask.description)?;
    grounds.check(&field(index, "reasoning"), &subtask.reasoning)?;
    // What the subtask is about is its title and description; the
    // reasoning says why, mostly in words any subtask may use ("this comes
    // first"), so it counts for shared words only.
    grounds.on_topic(
        &format!("subtasks[{index}]"),
        &format!("{}. {}", subtask.title, subtask.description),
        &subtask.reasoning,
    )
}

/// Points dependencies at kept positions: one on a repeat moves to its
/// original, one on a left-out subtask goes.
fn follow_moves(kept: &mut [Subtask], moved_to: &[Option<usize>]) {
    for (position, subtask) in kept.iter_mut().enumerate() {
        let mut depends_on: Vec<u32> = subtask
            .depends_on
            .iter()
            .filter_map(|&dependency| moved_to.get(dependency as usize).copied().flatten())
            .filter(|&dependency| dependency != position)
            .map(|dependency| dependency as u32)
            .collect();
        depends_on.sort_unstable();
        depends_on.dedup();
        subtask.depends_on = depends_on;
    }
}

/// A subtask on a dependency cycle, if there is one.
fn find_cycle(subtasks: &[Subtask]) -> Option<usize> {
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        New,
        Open,
        Done,
    }
    fn visit(node: usize, subtasks: &[Subtask], marks: &mut [Mark]) -> Option<usize> {
        match marks[node] {
            Mark::Done => return None,
            Mark::Open => return Some(node),
            Mark::New => {}
        }
        marks[node] = Mark::Open;
        for &next in &subtasks[node].depends_on {
            if let Some(cycle) = visit(next as usize, subtasks, marks) {
                return Some(cycle);
            }
        }
        marks[node] = Mark::Done;
        None
    }
    let mut marks = vec![Mark::New; subtasks.len()];
    (0..subtasks.len()).find_map(|node| visit(node, subtasks, &mut marks))
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn request() -> DecomposeRequest {
        DecomposeRequest {
            task: TaskSpec {
                title: "Build a login page".into(),
                complexity: Some(6),
                ..TaskSpec::default()
            },
            context: ProjectContext::default(),
            min_subtasks: 2,
            max_subtasks: 4,
            model: None,
            sampling: Sampling::default(),
        }
    }

    fn subtask(title: &str, complexity: u8, depends_on: &[u32]) -> Value {
        json!({
            "title": title, "description": "Do this part of the login page.",
            "complexity": complexity, "depends_on": depends_on,
            "reasoning": "The login page needs it."
        })
    }

    fn answer(subtasks: Vec<Value>) -> Value {
        json!({ "subtasks": subtasks })
    }

    #[test]
    fn a_sound_decomposition_passes_with_dependencies_normalized() {
        let parsed = parse(
            answer(vec![
                subtask("Design the form", 2, &[]),
                subtask("Wire the API", 3, &[0, 0]),
            ]),
            &request(),
            &OnTopic::lexical(),
        )
        .unwrap()
        .value;
        assert_eq!(parsed[1].depends_on, vec![0]);
    }

    #[test]
    fn each_rule_names_its_violation() {
        let cases = [
            (
                vec![subtask("Only one", 2, &[])],
                Rule::SubtaskCount,
                "1 subtasks given; between 2 and 4",
            ),
            (
                vec![subtask("Design", 2, &[]), subtask(" design ", 2, &[])],
                Rule::DuplicateSubtasks,
                "1 distinct subtasks given (1 of 2 left out: subtasks[1].title repeats subtask 0",
            ),
            (
                vec![
                    subtask("Design the form", 2, &[]),
                    subtask("Design form.", 2, &[0]),
                    subtask("Design the FORM", 2, &[]),
                ],
                Rule::DuplicateSubtasks,
                "(2 of 3 left out",
            ),
            (
                vec![
                    subtask("Build the login page.", 2, &[]),
                    subtask("Other", 2, &[]),
                ],
                Rule::DuplicateSubtasks,
                "1 distinct subtasks given (1 of 2 left out: subtasks[0].title repeats the task",
            ),
            (
                vec![subtask("A", 2, &[1]), subtask("B", 2, &[0])],
                Rule::DependencyCycle,
                "dependencies form a cycle",
            ),
            (
                vec![subtask("A", 2, &[1]), subtask("B", 2, &[1])],
                Rule::Dependency,
                "subtasks[1].depends_on names 1",
            ),
            (
                vec![subtask("A", 2, &[7]), subtask("B", 2, &[])],
                Rule::Dependency,
                "subtasks[0].depends_on names 7",
            ),
            (
                vec![subtask("A", 9, &[]), subtask("B", 2, &[])],
                Rule::Complexity,
                "subtasks[0].complexity is 9; it must be below the parent's 6",
            ),
            (
                vec![subtask("A", 6, &[]), subtask("B", 2, &[])],
                Rule::Complexity,
                "subtasks[0].complexity is 6; it must be below the parent's 6",
            ),
            (
                vec![
                    subtask("A", 2, &[]),
                    json!({
                        "title": "Write the form", "description": "Write the form.",
                        "complexity": 2, "depends_on": [], "reasoning": "Needed."
                    }),
                ],
                Rule::VagueDescription,
                "subtasks[1].description only restates the title",
            ),
            (
                vec![
                    subtask("A", 2, &[]),
                    json!({
                        "title": "B", "description": "Do B well.",
                        "complexity": 2, "depends_on": [], "reasoning": " "
                    }),
                ],
                Rule::BlankField,
                "subtasks[1].reasoning is blank",
            ),
        ];
        for (subtasks, rule, expected) in cases {
            let violation = parse(answer(subtasks), &request(), &OnTopic::lexical())
                .unwrap_err()
                .violation()
                .clone();
            assert_eq!(violation.rule, rule, "{violation:?}");
            assert!(
                violation.detail.contains(expected),
                "{violation:?} should contain {expected:?}"
            );
        }
    }

    #[test]
    fn the_model_is_asked_for_one_subtask_more_than_the_minimum_within_the_range() {
        let mut request = request();
        let asked = request.asked();
        assert_eq!((asked.min_subtasks, asked.max_subtasks), (3, 4));
        assert_eq!(
            asked.messages().last().unwrap().content,
            "Task: Build a login page\nComplexity: 6/10\nSplit it into 3 to 4 subtasks."
        );
        assert_eq!(
            asked.schema(None)["properties"]["subtasks"]["minItems"],
            json!(3)
        );
        request.min_subtasks = 4;
        assert_eq!(request.asked().min_subtasks, 4);
    }

    #[test]
    fn near_duplicates_are_dropped_and_their_dependents_follow_the_original() {
        let parsed = parse(
            answer(vec![
                subtask("Design the form", 2, &[]),
                subtask("Design form", 2, &[]),
                subtask("Wire the API", 3, &[1]),
            ]),
            &request(),
            &OnTopic::lexical(),
        )
        .unwrap();
        let titles: Vec<&str> = parsed.value.iter().map(|s| s.title.as_str()).collect();
        assert_eq!(titles, ["Design the form", "Wire the API"]);
        assert_eq!(parsed.value[1].depends_on, vec![0]);
        assert_eq!(parsed.dropped.len(), 1);
        assert_eq!(parsed.dropped[0].rule, Rule::DuplicateSubtasks);
    }
}
