//! DecomposeTask: its request, its typed answer and the rules an answer
//! obeys: count of distinct subtasks in range, non-blank fields, complexity
//! 1–10 and at most the parent's when known, dependencies on existing
//! siblings without cycles.

use serde::Deserialize;
use serde_json::Value;

use super::{ProjectContext, TaskSpec, enhance::non_blank};
use crate::backend::Sampling;

#[derive(Clone, Debug, PartialEq)]
pub struct DecomposeRequest {
    pub task: TaskSpec,
    pub context: ProjectContext,
    pub min_subtasks: u32,
    pub max_subtasks: u32,
    pub model: Option<String>,
    pub sampling: Sampling,
}

#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
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

/// Reads a schema-valid answer and checks what the schema cannot say.
///
/// Repeats are removed before the rules are checked: a subtask whose title
/// restates the parent task or an earlier sibling adds nothing, so dropping
/// it loses nothing (dependencies on a dropped repeat move to its original).
/// Only what remains must satisfy the requested count.
pub(super) fn parse(value: Value, request: &DecomposeRequest) -> Result<Vec<Subtask>, String> {
    let Answer { subtasks } = serde_json::from_value(value)
        .map_err(|error| format!("unexpected answer shape: {error}"))?;
    let given = subtasks.len();
    let parent_title = normalized(&request.task.title);
    let mut kept: Vec<Subtask> = Vec::with_capacity(given);
    let mut kept_titles: Vec<String> = Vec::with_capacity(given);
    // Position in the answer -> position among the kept subtasks, if any.
    let mut moved_to: Vec<Option<usize>> = Vec::with_capacity(given);
    for (index, subtask) in subtasks.into_iter().enumerate() {
        let field = |name: &str| format!("subtasks[{index}].{name}");
        let title = non_blank(&field("title"), &subtask.title)?;
        let key = normalized(&title);
        if key == parent_title {
            moved_to.push(None);
            continue;
        }
        if let Some(original) = kept_titles.iter().position(|seen| *seen == key) {
            moved_to.push(Some(original));
            continue;
        }
        if !(1..=10).contains(&subtask.complexity) {
            return Err(format!("{} must be 1 to 10", field("complexity")));
        }
        if let Some(parent) = request.task.complexity
            && parent > 1
            && subtask.complexity > parent
        {
            return Err(format!(
                "{} is {}, above the parent's {parent}",
                field("complexity"),
                subtask.complexity
            ));
        }
        if let Some(bad) = subtask
            .depends_on
            .iter()
            .find(|&&dependency| dependency as usize >= given || dependency as usize == index)
        {
            return Err(format!(
                "{} names {bad}, which is not another subtask",
                field("depends_on")
            ));
        }
        moved_to.push(Some(kept.len()));
        kept_titles.push(key);
        kept.push(Subtask {
            title,
            description: non_blank(&field("description"), &subtask.description)?,
            complexity: subtask.complexity,
            depends_on: subtask.depends_on,
            reasoning: non_blank(&field("reasoning"), &subtask.reasoning)?,
        });
    }
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
    let range = request.min_subtasks as usize..=request.max_subtasks as usize;
    if !range.contains(&kept.len()) {
        let repeats = given - kept.len();
        let repeated = if repeats > 0 {
            format!(" ({repeats} of {given} repeated the task or an earlier subtask)")
        } else {
            String::new()
        };
        return Err(format!(
            "{} distinct subtasks given{repeated}; between {} and {} are wanted",
            kept.len(),
            range.start(),
            range.end()
        ));
    }
    if let Some(cycle) = find_cycle(&kept) {
        return Err(format!("dependencies form a cycle through subtask {cycle}"));
    }
    Ok(kept)
}

fn normalized(title: &str) -> String {
    title
        .split_whitespace()
        .map(str::to_lowercase)
        .collect::<Vec<_>>()
        .join(" ")
        .trim_end_matches('.')
        .to_owned()
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
            "title": title, "description": "Do this part of the work.",
            "complexity": complexity, "depends_on": depends_on, "reasoning": "It is needed."
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
        )
        .unwrap();
        assert_eq!(parsed[1].depends_on, vec![0]);
    }

    #[test]
    fn each_rule_names_its_violation() {
        let cases = [
            (
                vec![subtask("Only one", 2, &[])],
                "1 distinct subtasks given; between 2 and 4",
            ),
            (
                vec![subtask("Design", 2, &[]), subtask(" design ", 2, &[])],
                "1 distinct subtasks given (1 of 2 repeated the task or an earlier subtask)",
            ),
            (
                vec![
                    subtask("Build a login page.", 2, &[]),
                    subtask("Other", 2, &[]),
                ],
                "1 distinct subtasks given (1 of 2 repeated",
            ),
            (
                vec![subtask("A", 2, &[1]), subtask("B", 2, &[0])],
                "dependencies form a cycle",
            ),
            (
                vec![subtask("A", 2, &[1]), subtask("B", 2, &[1])],
                "subtasks[1].depends_on names 1",
            ),
            (
                vec![subtask("A", 2, &[7]), subtask("B", 2, &[])],
                "subtasks[0].depends_on names 7",
            ),
            (
                vec![subtask("A", 9, &[]), subtask("B", 2, &[])],
                "subtasks[0].complexity is 9, above the parent's 6",
            ),
            (
                vec![subtask("A", 0, &[]), subtask("B", 2, &[])],
                "subtasks[0].complexity must be 1 to 10",
            ),
        ];
        for (subtasks, expected) in cases {
            let error = parse(answer(subtasks), &request()).unwrap_err();
            assert!(
                error.contains(expected),
                "{error:?} should contain {expected:?}"
            );
        }
    }
}
