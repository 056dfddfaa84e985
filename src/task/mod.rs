//! Task intelligence: EnhanceTask and DecomposeTask on top of any backend.
//!
//! Each answer is generated under a JSON Schema (`schema`), from prompts that
//! live in one place (`prompt`), then parsed and checked against the rules of
//! its kind (`enhance`, `decompose`, each a [`Task`] that [`TaskRunner`]
//! runs the same way). An answer that breaks a rule is retried
//! a bounded number of times, telling the model what was wrong; after that
//! the caller gets an error that names the violation. Nothing is invented.

pub mod cache;
mod decompose;
mod enhance;
mod grounds;
pub mod prompt;
pub mod schema;
mod violation;

use std::{
    borrow::Cow,
    collections::HashMap,
    future::Future,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use futures_util::StreamExt;

pub use decompose::{DecomposeRequest, Subtask};
pub use enhance::{EnhanceRequest, Enhancement, EnhancementKind};
pub use violation::{Rule, Violation, same_meaning};

use self::cache::{CacheKey, CacheStats, KeyFields, ResultCache, cacheable};

use crate::{
    backend::{
        Backend, BackendError, Chunk, FinishReason, GenerationRequest, Message, NoRepeat, Sampling,
        StreamClock,
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
    #[error("the model gave no valid answer in {attempts} attempt(s); last problem: {violation}")]
    InvalidAnswer { attempts: u32, violation: Violation },
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
    /// Why each earlier attempt was rejected, in order.
    pub repaired: Vec<Violation>,
    /// Served from the result cache: counts and attempts are those of the
    /// original answer, times those of this call.
    pub cached: bool,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Answered<T> {
    pub value: T,
    pub stats: AnswerStats,
}

/// Frequency penalty of structured answers when the caller sets none: small
/// models otherwise repeat one subtask or criterion until the list is full.
const DEFAULT_TASK_FREQUENCY_PENALTY: f32 = 0.5;

/// Temperature of structured answers when the caller sets none: greedy, so
/// the same request gives the same answer (and can be served from cache).
const DEFAULT_TASK_TEMPERATURE: f32 = 0.0;

/// A repair attempt of a call that left temperature unset samples at this
/// temperature, seeded from the attempt number: a greedy model told what
/// was wrong mostly repeats its answer, while a sampled one finds another,
/// and the seed keeps the call reproducible.
const REPAIR_TEMPERATURE: f32 = 0.7;
const REPAIR_SEED: u64 = 0x5eed;

/// Structured answers avoid repeating any 4 tokens in a row of their own, and
/// a decomposition avoids restating the parent task's title whole: small
/// models otherwise copy one title until the list is full. Keys and
/// punctuation the schema forces are exempt (a ban never empties the choice).
const NO_REPEAT_NGRAM: u32 = 4;

/// What EnhanceTask and DecomposeTask differ in, implemented by their
/// requests: the answer's type, its schema, its prompt, how it is read and
/// the rules it obeys. [`TaskRunner`] does the rest (sampling defaults,
/// bounded repairs, the result cache) once for both.
pub trait Task: KeyFields + Clone + Send + Sync + 'static {
    /// The answer, once read and checked.
    type Answer: Clone + Send + Sync + 'static;
    /// Names the task in cache keys.
    const NAME: &'static str;

    fn model(&self) -> Option<&str>;
    fn sampling(&self) -> &Sampling;
    /// The request as put to the model, where it asks for more than the
    /// rules demand.
    fn asked(&self) -> Cow<'_, Self> {
        Cow::Borrowed(self)
    }
    /// The JSON Schema the answer is generated under.
    fn schema(&self) -> serde_json::Value;
    fn messages(&self) -> Vec<Message>;
    /// Text the answer should not repeat, beyond itself.
    fn already_said(&self) -> Vec<String> {
        Vec::new()
    }
    /// Reads a schema-valid answer and checks what the schema cannot say.
    fn parse(&self, value: serde_json::Value) -> Result<Self::Answer, Violation>;
    /// The runner's cache of these answers, when caching is on.
    fn cache(runner: &TaskRunner) -> Option<&ResultCache<Answered<Self::Answer>>>;
}

/// Size and age bounds of the result caches; 0 entries turns them off.
#[derive(Clone, Copy, Debug)]
pub struct CacheSettings {
    pub entries: usize,
    pub ttl: Duration,
}

impl CacheSettings {
    fn build<V: Clone>(self) -> Option<Arc<ResultCache<V>>> {
        (self.entries > 0).then(|| Arc::new(ResultCache::new(self.entries, self.ttl)))
    }
}

/// Runs structured tasks against a backend with bounded retries, answering
/// repeated reproducible requests from a cache.
#[derive(Clone)]
pub struct TaskRunner {
    attempts: u32,
    enhancements: Option<Arc<ResultCache<Answered<Enhancement>>>>,
    decompositions: Option<Arc<ResultCache<Answered<Vec<Subtask>>>>>,
    /// Compiled answer schemas by their JSON text. Few exist (an
    /// enhancement kind, a decomposition range and parent complexity, all
    /// bounded by validation), and compiling one costs more than the rest
    /// of a call's bookkeeping.
    schemas: Arc<Mutex<HashMap<String, Arc<OutputSchema>>>>,
}

impl TaskRunner {
    pub fn new(attempts: u32, cache: CacheSettings) -> Self {
        Self {
            attempts: attempts.max(1),
            enhancements: cache.build(),
            decompositions: cache.build(),
            schemas: Arc::default(),
        }
    }

    fn compiled(&self, schema: serde_json::Value) -> Arc<OutputSchema> {
        let text = schema.to_string();
        let mut schemas = self
            .schemas
            .lock()
            .unwrap_or_else(|poison| poison.into_inner());
        schemas
            .entry(text)
            .or_insert_with(|| {
                Arc::new(
                    OutputSchema::compile(schema)
                        .expect("the task schemas are fixed and valid JSON Schema"),
                )
            })
            .clone()
    }

    /// The cached answer of `request`, if there is one; lets callers skip
    /// admission for answers that cost nothing.
    pub fn cached<K: Task>(
        &self,
        backend: &dyn Backend,
        request: &K,
        started: Instant,
    ) -> Option<Answered<K::Answer>> {
        let cache = K::cache(self)?;
        let key = cache_key(backend, request)?;
        Some(from_cache(cache.peek(key)?, started))
    }

    /// Hits, misses and size of the EnhanceTask and DecomposeTask caches.
    pub fn cache_stats(&self) -> Option<(CacheStats, CacheStats)> {
        Some((
            self.enhancements.as_ref()?.stats(),
            self.decompositions.as_ref()?.stats(),
        ))
    }

    /// The answer to `request`: from the cache, else generated (and kept).
    pub async fn run<K: Task>(
        &self,
        backend: &dyn Backend,
        request: K,
        started: Instant,
    ) -> Result<Answered<K::Answer>, TaskError> {
        let cache = K::cache(self);
        let key = cache.and_then(|_| cache_key(backend, &request));
        let generate = self.answer(backend, request, started);
        remembered(cache, key, started, generate).await
    }

    /// Generates answers to `request` until one obeys the rules or the
    /// attempts run out.
    async fn answer<K: Task>(
        &self,
        backend: &dyn Backend,
        request: K,
        started: Instant,
    ) -> Result<Answered<K::Answer>, TaskError> {
        let asked = request.asked();
        let first_messages = asked.messages();
        let schema = self.compiled(asked.schema());
        let mut first_sampling = request.sampling().clone();
        first_sampling.no_repeat = Some(NoRepeat {
            ngram: NO_REPEAT_NGRAM,
            already_said: request.already_said(),
        });
        first_sampling.frequency_penalty = first_sampling
            .frequency_penalty
            .or(Some(DEFAULT_TASK_FREQUENCY_PENALTY));
        let repair_sampling = repair_sampling(&first_sampling);
        first_sampling.temperature = first_sampling
            .temperature
            .or(Some(DEFAULT_TASK_TEMPERATURE));
        let mut prompt_tokens = 0;
        let mut completion_tokens = 0;
        let mut cached_prompt_tokens = 0;
        let mut repaired: Vec<Violation> = Vec::new();
        for attempt in 1..=self.attempts {
            let (messages, sampling) = match repaired.last() {
                None => (first_messages.clone(), first_sampling.clone()),
                Some(violation) => (
                    prompt::corrected(&first_messages, violation),
                    repair_sampling(attempt),
                ),
            };
            let generation = generate_text(
                backend,
                GenerationRequest {
                    model: request.model().map(str::to_owned),
                    messages,
                    sampling,
                    stop: Vec::new(),
                    json_schema: Some(schema.schema().clone()),
                },
                started,
            )
            .await?;
            prompt_tokens += generation.prompt_tokens;
            completion_tokens += generation.completion_tokens;
            cached_prompt_tokens += generation.cached_prompt_tokens;
            let parse = |value| request.parse(value);
            match judge(&generation, first_sampling.max_tokens, &schema, parse) {
                Ok(value) => {
                    return Ok(Answered {
                        value,
                        stats: AnswerStats {
                            backend: generation.backend,
                            model: generation.model,
                            prompt_tokens,
                            completion_tokens,
                            cached_prompt_tokens,
                            time_to_first_token: generation.time_to_first_token,
                            total_time: started.elapsed(),
                            attempts: attempt,
                            repaired,
                            cached: false,
                        },
                    });
                }
                Err(violation) => {
                    tracing::warn!(attempt, %violation, "model answer rejected");
                    tracing::debug!(answer = %generation.text, "rejected answer");
                    repaired.push(violation);
                }
            }
        }
        Err(TaskError::InvalidAnswer {
            attempts: self.attempts,
            violation: repaired.pop().expect("at least one attempt was made"),
        })
    }
}

/// Reads a generated answer: complete, valid under the schema, then
/// obeying the rules `parse` checks.
fn judge<T>(
    generation: &GeneratedText,
    max_tokens: u32,
    schema: &OutputSchema,
    parse: impl Fn(serde_json::Value) -> Result<T, Violation>,
) -> Result<T, Violation> {
    if generation.finish_reason == FinishReason::Length {
        return Err(Violation::new(
            Rule::Truncated,
            format!(
                "the answer was cut off at max_tokens={max_tokens} before the JSON was complete"
            ),
        ));
    }
    schema
        .check(&generation.text)
        .map_err(|problem| Violation::new(Rule::Schema, problem))
        .and_then(parse)
}

/// Judges `text`, a whole answer that ended with `finish_reason`, under
/// `schema`, as the runner judges one.
#[cfg(any(test, fuzzing))]
fn judge_text<T>(
    text: &str,
    finish_reason: FinishReason,
    max_tokens: u32,
    schema: serde_json::Value,
    parse: impl Fn(serde_json::Value) -> Result<T, Violation>,
) -> Result<T, Violation> {
    let schema = OutputSchema::compile(schema).expect("the task schemas are valid JSON Schema");
    let generation = GeneratedText {
        text: text.to_owned(),
        backend: "judged",
        model: String::new(),
        finish_reason,
        prompt_tokens: 0,
        completion_tokens: 0,
        cached_prompt_tokens: 0,
        time_to_first_token: Duration::ZERO,
    };
    judge(&generation, max_tokens, &schema, parse)
}

/// Judges `text` as a complete answer to `request`: the entry point of the
/// structured-output fuzz target.
#[cfg(any(test, fuzzing))]
pub(crate) fn judge_answer<K: Task>(text: &str, request: &K) -> Result<K::Answer, Violation> {
    judge_text(
        text,
        FinishReason::Stop,
        request.sampling().max_tokens,
        request.schema(),
        |value| request.parse(value),
    )
}

/// The cache key of a reproducible request to `backend`; `None` for one
/// that asks for a fresh random answer.
fn cache_key<K: Task>(backend: &dyn Backend, request: &K) -> Option<CacheKey> {
    cacheable(request.sampling())
        .then(|| CacheKey::of(K::NAME, backend.name(), &backend.endpoint(), request))
}

fn from_cache<T>(mut answer: Answered<T>, started: Instant) -> Answered<T> {
    answer.stats.cached = true;
    answer.stats.time_to_first_token = started.elapsed();
    answer.stats.total_time = answer.stats.time_to_first_token;
    answer
}

/// The cached answer of `key`, else the generated one, kept when valid.
async fn remembered<T: Clone>(
    cache: Option<&ResultCache<Answered<T>>>,
    key: Option<CacheKey>,
    started: Instant,
    generate: impl Future<Output = Result<Answered<T>, TaskError>>,
) -> Result<Answered<T>, TaskError> {
    let Some((cache, key)) = cache.zip(key) else {
        return generate.await;
    };
    if let Some(answer) = cache.get(key) {
        return Ok(from_cache(answer, started));
    }
    let answer = generate.await?;
    cache.insert(key, answer.clone());
    Ok(answer)
}

/// Sampling of repair attempt `attempt` (2, 3, ...): the caller's, with
/// [`REPAIR_TEMPERATURE`] where the caller left temperature unset, and the
/// seed moved on by the attempt number where one applies.
fn repair_sampling(first: &Sampling) -> impl Fn(u32) -> Sampling + use<> {
    let first = first.clone();
    move |attempt| {
        let mut sampling = first.clone();
        let step = u64::from(attempt - 1);
        match (first.temperature, first.seed) {
            (None, seed) => {
                sampling.temperature = Some(REPAIR_TEMPERATURE);
                sampling.seed = Some(seed.unwrap_or(REPAIR_SEED).wrapping_add(step));
            }
            (Some(_), Some(seed)) => sampling.seed = Some(seed.wrapping_add(step)),
            (Some(_), None) => {}
        }
        sampling
    }
}

/// A whole generation, collected.
struct GeneratedText {
    text: String,
    backend: &'static str,
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
                    backend: completion.backend,
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

#[cfg(test)]
mod tests {
    use super::*;

    fn decompose_request() -> DecomposeRequest {
        DecomposeRequest {
            task: TaskSpec {
                title: "Add two-factor authentication".into(),
                complexity: Some(6),
                ..TaskSpec::default()
            },
            context: ProjectContext::default(),
            min_subtasks: 3,
            max_subtasks: 4,
            model: None,
            sampling: Sampling::default(),
        }
    }

    /// A crafted model output, judged as the runner judges a real one.
    fn judged(text: &str, finish_reason: FinishReason) -> Result<Vec<Subtask>, Violation> {
        let request = decompose_request();
        judge_text(
            text,
            finish_reason,
            256,
            schema::decomposition(3, 4, Some(6)),
            |value| decompose::parse(value, &request),
        )
    }

    fn subtask(title: &str, depends_on: &[u32]) -> serde_json::Value {
        serde_json::json!({
            "title": title,
            "description": "Carry out this part of the work and check that it behaves as expected.",
            "complexity": 3, "depends_on": depends_on, "reasoning": "It is a distinct step."
        })
    }

    fn answer(subtasks: &[serde_json::Value]) -> String {
        serde_json::json!({ "subtasks": subtasks }).to_string()
    }

    #[test]
    fn crafted_bad_outputs_are_rejected_with_their_rule() {
        let sound = answer(&[
            subtask("Choose the second factor", &[]),
            subtask("Store the enrolled secrets", &[0]),
            subtask("Ask for the code at login", &[1]),
        ]);
        assert_eq!(judged(&sound, FinishReason::Stop).unwrap().len(), 3);

        let cases = [
            (
                sound[..sound.len() / 2].to_owned(),
                FinishReason::Length,
                Rule::Truncated,
            ),
            (
                sound[..sound.len() / 2].to_owned(),
                FinishReason::Stop,
                Rule::Schema,
            ),
            (
                answer(&[
                    subtask("Choose the second factor", &[]),
                    subtask("Choose the second factors", &[]),
                    subtask("choose THE second factor.", &[]),
                ]),
                FinishReason::Stop,
                Rule::DuplicateSubtasks,
            ),
            (
                answer(&[
                    subtask("Add two-factor authentication", &[]),
                    subtask("Store the enrolled secrets", &[0]),
                    subtask("Ask for the code at login", &[1]),
                ]),
                FinishReason::Stop,
                Rule::DuplicateSubtasks,
            ),
            (
                answer(&[
                    subtask("Choose the second factor", &[1]),
                    subtask("Store the enrolled secrets", &[0]),
                    subtask("Ask for the code at login", &[]),
                ]),
                FinishReason::Stop,
                // The schema lets a subtask name earlier siblings only.
                Rule::Schema,
            ),
        ];
        for (text, finish_reason, rule) in cases {
            let violation = judged(&text, finish_reason).unwrap_err();
            assert_eq!(violation.rule, rule, "{text}: {violation:?}");
        }
    }
}
