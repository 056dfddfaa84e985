//! DecomposeTask: its request, its typed answer and the rules an answer
//! obeys: count in range, distinct non-blank fields, complexity 1–10 and
//! below the parent's when known, dependencies on existing siblings without
//! cycles.

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
pub(super) fn parse(value: Value, request: &DecomposeRequest) -> Result<Vec<Subtask>, String> {
    let Answer { subtasks } = serde_json::from_value(value)
        .map_err(|error| format!("unexpected answer shape: {error}"))?;
    let count = subtasks.len();
    let range = request.min_subtasks as usize..=request.max_subtasks as usize;
    if !range.contains(&count) {
        return Err(format!(
            "{count} subtasks given; between {} and {} are wanted",
            range.start(),
            range.end()
        ));
    }
    let parent_title = normalized(&request.task.title);
    let mut titles: Vec<String> = Vec::with_capacity(count);
    let subtasks = subtasks
        .into_iter()
        .enumerate()
        .map(|(index, subtask)| {
            let field = |name: &str| format!("subtasks[{index}].{name}");
            let title = non_blank(&field("title"), &subtask.title)?;
            let key = normalized(&title);
            if key == parent_title {
                return Err(format!("{} restates the parent task", field("title")));
            }
            if let Some(first) = titles.iter().position(|seen| *seen == key) {
                return Err(format!("subtasks {first} and {index} have the same title"));
            }
            titles.push(key);
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
            let mut depends_on = subtask.depends_on.clone();
            depends_on.sort_unstable();
            depends_on.dedup();
            if let Some(bad) = depends_on
                .iter()
                .find(|&&dependency| dependency as usize >= count || dependency as usize == index)
            {
                return Err(format!(
                    "{} names {bad}, which is not another subtask",
                    field("depends_on")
                ));
            }
            Ok(Subtask {
                title,
                description: non_blank(&field("description"), &subtask.description)?,
                complexity: subtask.complexity,
                depends_on,
                reasoning: non_blank(&field("reasoning"), &subtask.reasoning)?,
            })
        })
        .collect::<Result<Vec<_>, String>>()?;
    if let Some(cycle) = find_cycle(&subtasks) {
        return Err(format!("dependencies form a cycle through subtask {cycle}"));
    }
    Ok(subtasks)
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
            (vec![subtask("Only one", 2, &[])], "1 subtasks given"),
            (
                vec![subtask("Design", 2, &[]), subtask(" design ", 2, &[])],
                "subtasks 0 and 1 have the same title",
            ),
            (
                vec![
                    subtask("Build a login page.", 2, &[]),
                    subtask("Other", 2, &[]),
                ],
                "subtasks[0].title restates the parent task",
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
