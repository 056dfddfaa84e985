//! Task intelligence: EnhanceTask and DecomposeTask on top of any backend.
//!
//! Each answer is generated under a JSON Schema (`schema`), from prompts that
//! live in one place (`prompt`), then parsed and checked against the rules of
//! its kind (`enhance`, `decompose`). An answer that breaks a rule is retried
//! a bounded number of times, telling the model what was wrong; after that
//! the caller gets an error that names the violation. Nothing is invented.

mod decompose;
mod enhance;
pub mod prompt;
pub mod schema;

use std::time::{Duration, Instant};

use futures_util::StreamExt;

pub use decompose::{DecomposeRequest, Subtask};
pub use enhance::{EnhanceRequest, Enhancement, EnhancementKind};

use crate::{
    backend::{
        Backend, BackendError, Chunk, FinishReason, GenerationRequest, Message, NoRepeat, Role,
        Sampling, StreamClock,
    },
    json_schema::OutputSchema,
};

/// The task as Rigger's task model carries it, validated.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct TaskSpec {
    pub id: String,
    pub title: String,
    pub description: Option<String>,
    pub parent_id: Option<String>,
    pub complexity: Option<u8>,
    pub reasoning: Option<String>,
    pub context_files: Vec<String>,
    pub dependencies: Vec<String>,
}

/// Caller-supplied context around a task.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ProjectContext {
    pub project: String,
    pub prd_excerpt: String,
}

#[derive(Debug, thiserror::Error)]
pub enum TaskError {
    #[error(transparent)]
    Backend(#[from] BackendError),
    #[error("the model gave no valid answer in {attempts} attempt(s); last problem: {reason}")]
    InvalidAnswer { attempts: u32, reason: String },
}

/// Provenance and cost of an answer.
#[derive(Clone, Debug, PartialEq)]
pub struct AnswerStats {
    pub backend: &'static str,
    pub model: String,
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
    pub cached_prompt_tokens: u32,
    pub time_to_first_token: Duration,
    pub total_time: Duration,
    pub attempts: u32,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Answered<T> {
    pub value: T,
    pub stats: AnswerStats,
}

/// Frequency penalty of structured answers when the caller sets none: small
/// models otherwise repeat one subtask or criterion until the list is full.
const DEFAULT_TASK_FREQUENCY_PENALTY: f32 = 0.5;

/// Structured answers avoid repeating any 4 tokens in a row of their own, and
/// a decomposition avoids restating the parent task's title whole: small
/// models otherwise copy one title until the list is full. Keys and
/// punctuation the schema forces are exempt (a ban never empties the choice).
const NO_REPEAT_NGRAM: u32 = 4;

/// Runs structured tasks against a backend with bounded retries.
#[derive(Clone, Copy, Debug)]
pub struct TaskRunner {
    attempts: u32,
}

impl TaskRunner {
    pub fn new(attempts: u32) -> Self {
        Self {
            attempts: attempts.max(1),
        }
    }

    pub async fn enhance(
        &self,
        backend: &dyn Backend,
        request: EnhanceRequest,
        started: Instant,
    ) -> Result<Answered<Enhancement>, TaskError> {
        let schema = schema::enhancement(request.kind);
        let messages = prompt::enhance(&request);
        self.answer(
            backend,
            Structured {
                already_said: Vec::new(),
                model: request.model,
                sampling: request.sampling,
                messages,
                schema,
            },
            |value| enhance::parse(value, request.kind),
            started,
        )
        .await
    }

    pub async fn decompose(
        &self,
        backend: &dyn Backend,
        request: DecomposeRequest,
        started: Instant,
    ) -> Result<Answered<Vec<Subtask>>, TaskError> {
        let schema = schema::decomposition(request.min_subtasks, request.max_subtasks);
        let messages = prompt::decompose(&request);
        self.answer(
            backend,
            Structured {
                already_said: vec![request.task.title.clone()],
                model: request.model.clone(),
                sampling: request.sampling.clone(),
                messages,
                schema,
            },
            |value| decompose::parse(value, &request),
            started,
        )
        .await
    }

    async fn answer<T>(
        &self,
        backend: &dyn Backend,
        mut job: Structured,
        parse: impl Fn(serde_json::Value) -> Result<T, String>,
        started: Instant,
    ) -> Result<Answered<T>, TaskError> {
        job.sampling.no_repeat = Some(NoRepeat {
            ngram: NO_REPEAT_NGRAM,
            already_said: job.already_said.clone(),
        });
        job.sampling.frequency_penalty = job
            .sampling
            .frequency_penalty
            .or(Some(DEFAULT_TASK_FREQUENCY_PENALTY));
        let schema = OutputSchema::compile(job.schema)
            .expect("the task schemas are fixed and valid JSON Schema");
        let mut prompt_tokens = 0;
        let mut completion_tokens = 0;
        let mut cached_prompt_tokens = 0;
        let mut reason = String::new();
        for attempt in 1..=self.attempts {
            let generation = generate_text(
                backend,
                GenerationRequest {
                    model: job.model.clone(),
                    messages: job.messages.clone(),
                    sampling: job.sampling.clone(),
                    stop: Vec::new(),
                    json_schema: Some(schema.schema().clone()),
                },
                started,
            )
            .await?;
            prompt_tokens += generation.prompt_tokens;
            completion_tokens += generation.completion_tokens;
            cached_prompt_tokens += generation.cached_prompt_tokens;
            let outcome = if generation.finish_reason == FinishReason::Length {
                Err(format!(
                    "the answer was cut off at max_tokens={} before the JSON was complete",
                    job.sampling.max_tokens
                ))
            } else {
                schema.check(&generation.text).and_then(&parse)
            };
            match outcome {
                Ok(value) => {
                    return Ok(Answered {
                        value,
                        stats: AnswerStats {
                            backend: backend.name(),
                            model: generation.model,
                            prompt_tokens,
                            completion_tokens,
                            cached_prompt_tokens,
                            time_to_first_token: generation.time_to_first_token,
                            total_time: started.elapsed(),
                            attempts: attempt,
                        },
                    });
                }
                Err(problem) => {
                    tracing::warn!(attempt, %problem, "model answer rejected");
                    job.messages
                        .push(Message::new(Role::Assistant, generation.text));
                    job.messages
                        .push(Message::new(Role::User, prompt::correction(&problem)));
                    reason = problem;
                }
            }
        }
        Err(TaskError::InvalidAnswer {
            attempts: self.attempts,
            reason,
        })
    }
}

struct Structured {
    /// Text the answer should not repeat, beyond itself.
    already_said: Vec<String>,
    model: Option<String>,
    sampling: Sampling,
    messages: Vec<Message>,
    schema: serde_json::Value,
}

/// A whole generation, collected.
struct GeneratedText {
    text: String,
    model: String,
    finish_reason: FinishReason,
    prompt_tokens: u32,
    completion_tokens: u32,
    cached_prompt_tokens: u32,
    time_to_first_token: Duration,
}

async fn generate_text(
    backend: &dyn Backend,
    request: GenerationRequest,
    started: Instant,
) -> Result<GeneratedText, BackendError> {
    let mut clock = StreamClock::start(started);
    let mut stream = backend.generate(request).await?;
    let mut text = String::new();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk?;
        clock.observe(&chunk);
        match chunk {
            Chunk::Text(piece) => text.push_str(&piece),
            Chunk::Done(completion) => {
                return Ok(GeneratedText {
                    text,
                    model: completion.model,
                    finish_reason: completion.finish_reason,
                    prompt_tokens: completion.prompt_tokens,
                    completion_tokens: completion.completion_tokens,
                    cached_prompt_tokens: completion.cached_prompt_tokens,
                    time_to_first_token: clock.time_to_first_token(),
                });
            }
        }
    }
    Err(BackendError::Protocol {
        backend: backend.name(),
        reason: "the generation stream ended without completion".to_owned(),
    })
}
