//! Checks every field of a request at the gRPC edge and turns it into the
//! domain request. Nothing below this module sees an invalid value; every
//! error names the field it is about.

use std::fmt;

use crate::{
    backend::{GenerationRequest, Message, Role, Sampling},
    json_schema::OutputSchema,
    proto,
    task::{DecomposeRequest, EnhanceRequest, EnhancementKind, ProjectContext, TaskSpec},
};

const MAX_ID_BYTES: usize = 256;
const MAX_TITLE_BYTES: usize = 512;
const MAX_TEXT_BYTES: usize = 16 * 1024;
const MAX_LIST_ENTRIES: usize = 64;
const MAX_LIST_ENTRY_BYTES: usize = 1024;
const MAX_MODEL_BYTES: usize = 256;
const MAX_MESSAGES: usize = 256;
const MAX_STOP_SEQUENCES: usize = 8;
const MAX_STOP_BYTES: usize = 64;
const MAX_TEMPERATURE: f32 = 2.0;
const MAX_PENALTY: f32 = 2.0;
const MAX_SUBTASKS: u32 = 12;
const MIN_SUBTASKS: u32 = 2;
const DEFAULT_MIN_SUBTASKS: u32 = 3;
const DEFAULT_MAX_SUBTASKS: u32 = 6;

#[derive(Debug, PartialEq, Eq)]
pub struct ValidationError {
    pub field: String,
    pub reason: String,
}

impl fmt::Display for ValidationError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid {}: {}", self.field, self.reason)
    }
}

fn invalid(field: impl Into<String>, reason: impl Into<String>) -> ValidationError {
    ValidationError {
        field: field.into(),
        reason: reason.into(),
    }
}

/// Token budgets, size limits and role models from the configuration.
#[derive(Clone, Debug)]
pub struct Limits {
    pub default_max_tokens: u32,
    pub task_max_tokens: u32,
    pub max_tokens_limit: u32,
    pub max_prompt_bytes: usize,
    pub role_models: RoleModels,
}

/// The model of each RPC's calls that name none (`--enhance-model`,
/// `--decompose-model`, `--generate-model`); unset: the backend's default.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RoleModels {
    pub enhance: Option<String>,
    pub decompose: Option<String>,
    pub generate: Option<String>,
}

/// LoadModel's and UnloadModel's `model` (required) and `backend` (one of
/// `backends`, or empty for any).
pub fn model_operation(
    model: String,
    backend: String,
    backends: &[&'static str],
) -> Result<(String, Option<&'static str>), ValidationError> {
    let model = self::model(model)?.ok_or_else(|| invalid("model", "name the model"))?;
    Ok((model, backend_name(&backend, backends)?))
}

/// A `backend` field: empty for any, else one of `backends`.
pub fn backend_name(
    backend: &str,
    backends: &[&'static str],
) -> Result<Option<&'static str>, ValidationError> {
    if backend.is_empty() {
        return Ok(None);
    }
    backends
        .iter()
        .find(|name| **name == backend)
        .map(|name| Some(*name))
        .ok_or_else(|| {
            invalid(
                "backend",
                format!(
                    "{backend:?} is not a configured backend; configured: {}",
                    backends.join(", ")
                ),
            )
        })
}

/// The model a call asked for, else its role's.
fn model_or(requested: String, role: &Option<String>) -> Result<Option<String>, ValidationError> {
    Ok(model(requested)?.or_else(|| role.clone()))
}

pub fn enhance(
    request: proto::EnhanceTaskRequest,
    limits: &Limits,
) -> Result<EnhanceRequest, ValidationError> {
    let kind = match proto::EnhancementKind::try_from(request.kind) {
        Ok(proto::EnhancementKind::Unspecified) => None,
        Ok(proto::EnhancementKind::Clarify) => Some(EnhancementKind::Clarify),
        Ok(proto::EnhancementKind::Specify) => Some(EnhancementKind::Specify),
        Ok(proto::EnhancementKind::Context) => Some(EnhancementKind::Context),
        Err(_) => return Err(invalid("kind", format!("unknown value {}", request.kind))),
    };
    Ok(EnhanceRequest {
        task: task(request.task)?,
        context: context(request.context)?,
        kind,
        model: model_or(request.model, &limits.role_models.enhance)?,
        sampling: sampling(request.sampling, limits.task_max_tokens, limits)?,
    })
}

pub fn decompose(
    request: proto::DecomposeTaskRequest,
    limits: &Limits,
) -> Result<DecomposeRequest, ValidationError> {
    let min = match request.min_subtasks {
        0 => DEFAULT_MIN_SUBTASKS,
        min if (MIN_SUBTASKS..=MAX_SUBTASKS).contains(&min) => min,
        min => {
            return Err(invalid(
                "min_subtasks",
                format!("{min} is outside {MIN_SUBTASKS}..={MAX_SUBTASKS}"),
            ));
        }
    };
    let max = match request.max_subtasks {
        0 => DEFAULT_MAX_SUBTASKS.max(min),
        max if (min..=MAX_SUBTASKS).contains(&max) => max,
        max => {
            return Err(invalid(
                "max_subtasks",
                format!("{max} is outside min_subtasks ({min})..={MAX_SUBTASKS}"),
            ));
        }
    };
    Ok(DecomposeRequest {
        task: task(request.task)?,
        context: context(request.context)?,
        min_subtasks: min,
        max_subtasks: max,
        model: model_or(request.model, &limits.role_models.decompose)?,
        sampling: sampling(request.sampling, limits.task_max_tokens, limits)?,
    })
}

pub fn generate(
    request: proto::GenerateRequest,
    limits: &Limits,
) -> Result<(GenerationRequest, Option<OutputSchema>), ValidationError> {
    let messages = match (request.prompt.is_empty(), request.messages.is_empty()) {
        (false, true) => vec![Message::new(Role::User, request.prompt)],
        (true, false) => messages(request.messages)?,
        (false, false) => return Err(invalid("prompt", "set either prompt or messages, not both")),
        (true, true) => return Err(invalid("prompt", "set prompt or messages")),
    };
    let prompt_bytes: usize = messages.iter().map(|message| message.content.len()).sum();
    if prompt_bytes > limits.max_prompt_bytes {
        return Err(invalid(
            "messages",
            format!(
                "the prompt has {prompt_bytes} bytes; at most {} are accepted",
                limits.max_prompt_bytes
            ),
        ));
    }
    if request.stop.len() > MAX_STOP_SEQUENCES {
        return Err(invalid(
            "stop",
            format!("at most {MAX_STOP_SEQUENCES} stop sequences"),
        ));
    }
    for (index, stop) in request.stop.iter().enumerate() {
        if stop.is_empty() || stop.len() > MAX_STOP_BYTES {
            return Err(invalid(
                format!("stop[{index}]"),
                format!("must have 1 to {MAX_STOP_BYTES} bytes"),
            ));
        }
    }
    let schema = if request.json_schema.trim().is_empty() {
        None
    } else {
        let value = serde_json::from_str(&request.json_schema)
            .map_err(|error| invalid("json_schema", format!("not JSON: {error}")))?;
        Some(OutputSchema::compile(value).map_err(|reason| invalid("json_schema", reason))?)
    };
    Ok((
        GenerationRequest {
            model: model_or(request.model, &limits.role_models.generate)?,
            messages,
            sampling: sampling(request.sampling, limits.default_max_tokens, limits)?,
            stop: request.stop,
            json_schema: schema.as_ref().map(|schema| schema.schema().clone()),
            session: None,
        },
        schema,
    ))
}

fn messages(messages: Vec<proto::ChatMessage>) -> Result<Vec<Message>, ValidationError> {
    if messages.len() > MAX_MESSAGES {
        return Err(invalid(
            "messages",
            format!("at most {MAX_MESSAGES} messages"),
        ));
    }
    messages
        .into_iter()
        .enumerate()
        .map(|(index, message)| {
            let role = match proto::Role::try_from(message.role) {
                Ok(proto::Role::System) => Role::System,
                Ok(proto::Role::User) => Role::User,
                Ok(proto::Role::Assistant) => Role::Assistant,
                Ok(proto::Role::Unspecified) | Err(_) => {
                    return Err(invalid(
                        format!("messages[{index}].role"),
                        "must be ROLE_SYSTEM, ROLE_USER or ROLE_ASSISTANT",
                    ));
                }
            };
            if message.content.is_empty() {
                return Err(invalid(format!("messages[{index}].content"), "is empty"));
            }
            Ok(Message::new(role, message.content))
        })
        .collect()
}

fn task(task: Option<proto::Task>) -> Result<TaskSpec, ValidationError> {
    let task = task.ok_or_else(|| invalid("task", "is required"))?;
    if task.title.trim().is_empty() {
        return Err(invalid("task.title", "is empty"));
    }
    bounded("task.id", &task.id, MAX_ID_BYTES)?;
    bounded("task.title", &task.title, MAX_TITLE_BYTES)?;
    optional_bounded("task.description", &task.description, MAX_TEXT_BYTES)?;
    optional_bounded("task.parent_id", &task.parent_id, MAX_ID_BYTES)?;
    optional_bounded("task.reasoning", &task.reasoning, MAX_TEXT_BYTES)?;
    list("task.context_files", &task.context_files)?;
    list("task.dependencies", &task.dependencies)?;
    let complexity = match task.complexity {
        None => None,
        Some(value @ 1..=10) => Some(value as u8),
        Some(value) => {
            return Err(invalid(
                "task.complexity",
                format!("{value} is outside 1..=10"),
            ));
        }
    };
    Ok(TaskSpec {
        id: task.id,
        title: task.title.trim().to_owned(),
        description: task.description,
        parent_id: task.parent_id,
        complexity,
        reasoning: task.reasoning,
        context_files: task.context_files,
        dependencies: task.dependencies,
    })
}

fn context(context: Option<proto::TaskContext>) -> Result<ProjectContext, ValidationError> {
    let context = context.unwrap_or_default();
    bounded("context.project", &context.project, MAX_TEXT_BYTES)?;
    bounded("context.prd_excerpt", &context.prd_excerpt, MAX_TEXT_BYTES)?;
    Ok(ProjectContext {
        project: context.project,
        prd_excerpt: context.prd_excerpt,
    })
}

fn model(model: String) -> Result<Option<String>, ValidationError> {
    if model.is_empty() {
        return Ok(None);
    }
    bounded("model", &model, MAX_MODEL_BYTES)?;
    if model.trim() != model || model.chars().any(char::is_control) {
        return Err(invalid(
            "model",
            "must not contain surrounding whitespace or control characters",
        ));
    }
    Ok(Some(model))
}

fn sampling(
    options: Option<proto::SamplingOptions>,
    default_max_tokens: u32,
    limits: &Limits,
) -> Result<Sampling, ValidationError> {
    let options = options.unwrap_or_default();
    let max_tokens = options.max_tokens.unwrap_or(default_max_tokens);
    if !(1..=limits.max_tokens_limit).contains(&max_tokens) {
        return Err(invalid(
            "sampling.max_tokens",
            format!("{max_tokens} is outside 1..={}", limits.max_tokens_limit),
        ));
    }
    if let Some(temperature) = options.temperature
        && !(temperature.is_finite() && (0.0..=MAX_TEMPERATURE).contains(&temperature))
    {
        return Err(invalid(
            "sampling.temperature",
            format!("{temperature} is outside 0..={MAX_TEMPERATURE}"),
        ));
    }
    if let Some(top_p) = options.top_p
        && !(top_p.is_finite() && top_p > 0.0 && top_p <= 1.0)
    {
        return Err(invalid(
            "sampling.top_p",
            format!("{top_p} is outside (0, 1]"),
        ));
    }
    if let Some(penalty) = options.frequency_penalty
        && !(penalty.is_finite() && (-MAX_PENALTY..=MAX_PENALTY).contains(&penalty))
    {
        return Err(invalid(
            "sampling.frequency_penalty",
            format!("{penalty} is outside -{MAX_PENALTY}..={MAX_PENALTY}"),
        ));
    }
    Ok(Sampling {
        max_tokens,
        temperature: options.temperature,
        top_p: options.top_p,
        seed: options.seed,
        frequency_penalty: options.frequency_penalty,
        no_repeat: None,
    })
}

fn bounded(field: &str, value: &str, max_bytes: usize) -> Result<(), ValidationError> {
    if value.len() > max_bytes {
        return Err(invalid(
            field,
            format!(
                "has {} bytes; at most {max_bytes} are accepted",
                value.len()
            ),
        ));
    }
    Ok(())
}

fn optional_bounded(
    field: &str,
    value: &Option<String>,
    max_bytes: usize,
) -> Result<(), ValidationError> {
    value
        .as_deref()
        .map_or(Ok(()), |value| bounded(field, value, max_bytes))
}

fn list(field: &str, entries: &[String]) -> Result<(), ValidationError> {
    if entries.len() > MAX_LIST_ENTRIES {
        return Err(invalid(
            field,
            format!("at most {MAX_LIST_ENTRIES} entries"),
        ));
    }
    for (index, entry) in entries.iter().enumerate() {
        if entry.trim().is_empty() {
            return Err(invalid(format!("{field}[{index}]"), "is empty"));
        }
        bounded(&format!("{field}[{index}]"), entry, MAX_LIST_ENTRY_BYTES)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: Limits = Limits {
        default_max_tokens: 64,
        task_max_tokens: 256,
        max_tokens_limit: 1000,
        max_prompt_bytes: 100,
        role_models: RoleModels {
            enhance: None,
            decompose: None,
            generate: None,
        },
    };

    fn field_of(error: ValidationError) -> String {
        error.field
    }

    #[test]
    fn model_operations_name_a_model_and_a_configured_backend() {
        let backends = ["embedded", "ollama"];
        assert_eq!(
            model_operation("phi3".into(), String::new(), &backends),
            Ok(("phi3".to_owned(), None))
        );
        assert_eq!(
            model_operation("phi3".into(), "ollama".into(), &backends),
            Ok(("phi3".to_owned(), Some("ollama")))
        );
        assert_eq!(
            field_of(model_operation(String::new(), String::new(), &backends).unwrap_err()),
            "model"
        );
        let unknown = model_operation("phi3".into(), "vllm".into(), &backends).unwrap_err();
        assert_eq!(unknown.field, "backend");
        assert!(
            unknown.reason.contains("embedded, ollama"),
            "{}",
            unknown.reason
        );
    }

    #[test]
    fn a_call_without_a_model_gets_its_roles_model() {
        let limits = Limits {
            role_models: RoleModels {
                enhance: Some("enhancer".to_owned()),
                decompose: Some("decomposer".to_owned()),
                generate: None,
            },
            ..LIMITS
        };
        let task = || {
            Some(proto::Task {
                title: "Add a health check".to_owned(),
                ..Default::default()
            })
        };
        let enhance = |model: &str| proto::EnhanceTaskRequest {
            task: task(),
            model: model.to_owned(),
            ..Default::default()
        };
        assert_eq!(
            super::enhance(enhance(""), &limits)
                .unwrap()
                .model
                .as_deref(),
            Some("enhancer")
        );
        assert_eq!(
            super::enhance(enhance("mine"), &limits)
                .unwrap()
                .model
                .as_deref(),
            Some("mine"),
            "a named model wins"
        );
        let decompose = proto::DecomposeTaskRequest {
            task: task(),
            ..Default::default()
        };
        assert_eq!(
            super::decompose(decompose, &limits)
                .unwrap()
                .model
                .as_deref(),
            Some("decomposer")
        );
        let (generation, _) = generate(generate_request(), &limits).unwrap();
        assert_eq!(
            generation.model, None,
            "no role model: the backend's default"
        );
    }

    fn generate_request() -> proto::GenerateRequest {
        proto::GenerateRequest {
            prompt: "Hello".into(),
            ..Default::default()
        }
    }

    #[test]
    fn defaults_fill_unset_generation_options() {
        let (request, schema) = generate(generate_request(), &LIMITS).unwrap();
        assert_eq!(request.sampling.max_tokens, 64);
        assert_eq!(request.messages, vec![Message::new(Role::User, "Hello")]);
        assert!(schema.is_none());
    }

    #[test]
    fn each_bad_generation_field_is_named() {
        let cases: Vec<(proto::GenerateRequest, &str)> = vec![
            (proto::GenerateRequest::default(), "prompt"),
            (
                proto::GenerateRequest {
                    messages: vec![proto::ChatMessage {
                        role: 0,
                        content: "x".into(),
                    }],
                    ..Default::default()
                },
                "messages[0].role",
            ),
            (
                proto::GenerateRequest {
                    prompt: "x".repeat(101),
                    ..Default::default()
                },
                "messages",
            ),
            (
                proto::GenerateRequest {
                    sampling: Some(proto::SamplingOptions {
                        temperature: Some(f32::NAN),
                        ..Default::default()
                    }),
                    ..generate_request()
                },
                "sampling.temperature",
            ),
            (
                proto::GenerateRequest {
                    sampling: Some(proto::SamplingOptions {
                        max_tokens: Some(0),
                        ..Default::default()
                    }),
                    ..generate_request()
                },
                "sampling.max_tokens",
            ),
            (
                proto::GenerateRequest {
                    sampling: Some(proto::SamplingOptions {
                        top_p: Some(0.0),
                        ..Default::default()
                    }),
                    ..generate_request()
                },
                "sampling.top_p",
            ),
            (
                proto::GenerateRequest {
                    json_schema: r#"{"type": 12}"#.into(),
                    ..generate_request()
                },
                "json_schema",
            ),
            (
                proto::GenerateRequest {
                    stop: vec![String::new()],
                    ..generate_request()
                },
                "stop[0]",
            ),
            (
                proto::GenerateRequest {
                    model: " llama3.1".into(),
                    ..generate_request()
                },
                "model",
            ),
        ];
        for (request, field) in cases {
            let error = generate(request, &LIMITS).expect_err(field);
            assert_eq!(field_of(error), field);
        }
    }

    #[test]
    fn decomposition_range_defaults_and_bounds() {
        let request = |min, max| proto::DecomposeTaskRequest {
            task: Some(proto::Task {
                title: "Ship it".into(),
                ..Default::default()
            }),
            min_subtasks: min,
            max_subtasks: max,
            ..Default::default()
        };
        let parsed = decompose(request(0, 0), &LIMITS).unwrap();
        assert_eq!((parsed.min_subtasks, parsed.max_subtasks), (3, 6));
        let parsed = decompose(request(8, 0), &LIMITS).unwrap();
        assert_eq!((parsed.min_subtasks, parsed.max_subtasks), (8, 8));
        assert_eq!(
            field_of(decompose(request(1, 0), &LIMITS).unwrap_err()),
            "min_subtasks"
        );
        assert_eq!(
            field_of(decompose(request(4, 3), &LIMITS).unwrap_err()),
            "max_subtasks"
        );
        assert_eq!(
            sampling(None, LIMITS.task_max_tokens, &LIMITS)
                .unwrap()
                .max_tokens,
            256
        );
    }

    #[test]
    fn task_fields_are_checked() {
        let with = |task: proto::Task| proto::EnhanceTaskRequest {
            task: Some(task),
            ..Default::default()
        };
        let cases = vec![
            (proto::Task::default(), "task.title"),
            (
                proto::Task {
                    title: "x".into(),
                    complexity: Some(11),
                    ..Default::default()
                },
                "task.complexity",
            ),
            (
                proto::Task {
                    title: "x".into(),
                    context_files: vec![" ".into()],
                    ..Default::default()
                },
                "task.context_files[0]",
            ),
            (
                proto::Task {
                    title: "x".repeat(MAX_TITLE_BYTES + 1),
                    ..Default::default()
                },
                "task.title",
            ),
        ];
        for (task, field) in cases {
            assert_eq!(field_of(enhance(with(task), &LIMITS).unwrap_err()), field);
        }
        let missing = proto::EnhanceTaskRequest::default();
        assert_eq!(field_of(enhance(missing, &LIMITS).unwrap_err()), "task");
        let unknown_kind = proto::EnhanceTaskRequest {
            kind: 42,
            ..with(proto::Task {
                title: "x".into(),
                ..Default::default()
            })
        };
        assert_eq!(
            field_of(enhance(unknown_kind, &LIMITS).unwrap_err()),
            "kind"
        );
    }
}
