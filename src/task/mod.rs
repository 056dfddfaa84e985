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
pub use grounds::{OnTopic, TextPattern};
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
    /// Parts of the model's output left out of the answer (a subtask or
    /// criterion breaking a rule), with the rule each broke.
    pub dropped: Vec<Violation>,
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
    /// The JSON Schema of the answer: with the texts' patterns, the one it
    /// is generated under; without, the one it is checked against.
    fn schema(&self, text_pattern: Option<&TextPattern>) -> serde_json::Value;
    /// What the answer's texts are generated under.
    fn text_pattern(&self) -> TextPattern;
    fn messages(&self) -> Vec<Message>;
    /// Text the answer should not repeat, beyond itself.
    fn already_said(&self) -> Vec<String> {
        Vec::new()
    }
    /// What is kept of an answer that had too few good parts, so that only
    /// the missing ones are asked for again.
    type Kept: Clone + Send + Sync + 'static;
    /// Reads a schema-valid answer and checks what the schema cannot say,
    /// leaving out parts that break a rule where the rest can stand.
    fn parse(
        &self,
        value: serde_json::Value,
        on_topic: &OnTopic,
    ) -> Result<Parsed<Self::Answer>, Rejection<Self::Kept>>;
    /// The request for what `kept` lacks, after `violation`.
    fn follow_up(&self, kept: &Self::Kept, violation: &Violation) -> Ask;
    /// The whole answer: `kept`, then the parts a follow-up's `value` adds.
    fn merged(&self, kept: &Self::Kept, value: serde_json::Value) -> serde_json::Value;
    /// The runner's cache of these answers, when caching is on.
    fn cache(runner: &TaskRunner) -> Option<&ResultCache<Answered<Self::Answer>>>;
}

/// One request put to the model: its messages, the schema its answer is
/// generated under and the one it is checked against, and text the answer
/// should not repeat.
#[derive(Clone, Debug)]
pub struct Ask {
    pub messages: Vec<Message>,
    pub constraint: serde_json::Value,
    pub schema: serde_json::Value,
    pub already_said: Vec<String>,
}

/// A read answer and the parts of the model's output left out of it, each
/// with the rule it broke.
#[derive(Clone, Debug, PartialEq)]
pub struct Parsed<T> {
    pub value: T,
    pub dropped: Vec<Violation>,
}

/// Why a model's output was not accepted.
#[derive(Clone, Debug, PartialEq)]
pub enum Rejection<K> {
    /// Nothing of it can be kept: the answer is asked for again.
    Whole(Violation),
    /// Too little was left once the parts breaking a rule (`dropped`) were
    /// left out: `kept` stays, and only what is missing is asked for.
    Short {
        kept: K,
        violation: Violation,
        dropped: Vec<Violation>,
    },
}

impl<K> Rejection<K> {
    pub fn violation(&self) -> &Violation {
        match self {
            Self::Whole(violation) | Self::Short { violation, .. } => violation,
        }
    }
}

impl<K> From<Violation> for Rejection<K> {
    fn from(violation: Violation) -> Self {
        Self::Whole(violation)
    }
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
    /// How parts of answers are held to their task's topic.
    on_topic: OnTopic,
}

impl TaskRunner {
    pub fn new(attempts: u32, cache: CacheSettings, on_topic: OnTopic) -> Self {
        Self {
            on_topic,
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
    /// attempts run out. A rejected answer is asked for again, told what was
    /// wrong; one that lacked only some parts keeps the good ones and asks
    /// for the missing parts alone.
    async fn answer<K: Task>(
        &self,
        backend: &dyn Backend,
        request: K,
        started: Instant,
    ) -> Result<Answered<K::Answer>, TaskError> {
        let asked = request.asked();
        let first = Ask {
            messages: asked.messages(),
            constraint: asked.schema(Some(&request.text_pattern())),
            schema: asked.schema(None),
            already_said: request.already_said(),
        };
        let sampling = AttemptSampling::of(request.sampling());
        let mut spent = Spent::default();
        let mut repaired: Vec<Violation> = Vec::new();
        let mut dropped: Vec<Violation> = Vec::new();
        let mut kept: Option<K::Kept> = None;
        for attempt in 1..=self.attempts {
            let ask = match (&kept, repaired.last()) {
                (Some(kept), Some(violation)) => request.follow_up(kept, violation),
                (_, Some(violation)) => Ask {
                    messages: prompt::corrected(&first.messages, violation),
                    ..first.clone()
                },
                (_, None) => first.clone(),
            };
            let schema = self.compiled(ask.schema);
            let constraint = if backend.capabilities().text_patterns {
                ask.constraint
            } else {
                schema.schema().clone()
            };
            let generation = generate_text(
                backend,
                GenerationRequest {
                    model: request.model().map(str::to_owned),
                    messages: ask.messages,
                    sampling: sampling.of_attempt(attempt, ask.already_said),
                    stop: Vec::new(),
                    json_schema: Some(constraint),
                    session: None,
                },
                started,
            )
            .await?;
            spent.add(&generation);
            let parse = |value| match &kept {
                Some(kept) => request.parse(request.merged(kept, value), &self.on_topic),
                None => request.parse(value, &self.on_topic),
            };
            match judge(&generation, sampling.max_tokens(), &schema, parse) {
                Ok(parsed) => {
                    dropped.extend(parsed.dropped);
                    return Ok(Answered {
                        value: parsed.value,
                        stats: spent.stats(&generation, started, attempt, repaired, dropped),
                    });
                }
                Err(rejection) => {
                    tracing::warn!(attempt, violation = %rejection.violation(), "model answer rejected");
                    tracing::debug!(answer = %generation.text, "rejected answer");
                    match rejection {
                        Rejection::Whole(violation) => repaired.push(violation),
                        Rejection::Short {
                            kept: now_kept,
                            violation,
                            dropped: left_out,
                        } => {
                            dropped.extend(left_out);
                            repaired.push(violation);
                            kept = Some(now_kept);
                        }
                    }
                }
            }
        }
        Err(TaskError::InvalidAnswer {
            attempts: self.attempts,
            violation: repaired.pop().expect("at least one attempt was made"),
        })
    }
}

/// The sampling of each attempt: the caller's, with the task defaults
/// where the caller set none.
struct AttemptSampling {
    /// The caller's, with the default frequency penalty.
    caller: Sampling,
}

impl AttemptSampling {
    fn of(caller: &Sampling) -> Self {
        let mut caller = caller.clone();
        caller.frequency_penalty = caller
            .frequency_penalty
            .or(Some(DEFAULT_TASK_FREQUENCY_PENALTY));
        Self { caller }
    }

    fn max_tokens(&self) -> u32 {
        self.caller.max_tokens
    }

    /// Attempt 1 is greedy where the caller left temperature unset. Later
    /// ones sample at [`REPAIR_TEMPERATURE`] there, seeded from the attempt
    /// number, and move a caller's seed on by it.
    fn of_attempt(&self, attempt: u32, already_said: Vec<String>) -> Sampling {
        let mut sampling = self.caller.clone();
        let step = u64::from(attempt - 1);
        match (self.caller.temperature, self.caller.seed) {
            (None, _) if attempt == 1 => sampling.temperature = Some(DEFAULT_TASK_TEMPERATURE),
            (None, seed) => {
                sampling.temperature = Some(REPAIR_TEMPERATURE);
                sampling.seed = Some(seed.unwrap_or(REPAIR_SEED).wrapping_add(step));
            }
            (Some(_), Some(seed)) => sampling.seed = Some(seed.wrapping_add(step)),
            (Some(_), None) => {}
        }
        sampling.no_repeat = Some(NoRepeat {
            ngram: NO_REPEAT_NGRAM,
            already_said,
        });
        sampling
    }
}

/// Tokens spent on a call's attempts, summed.
#[derive(Default)]
struct Spent {
    prompt_tokens: u32,
    completion_tokens: u32,
    cached_prompt_tokens: u32,
}

impl Spent {
    fn add(&mut self, generation: &GeneratedText) {
        self.prompt_tokens += generation.prompt_tokens;
        self.completion_tokens += generation.completion_tokens;
        self.cached_prompt_tokens += generation.cached_prompt_tokens;
    }

    /// The stats of an answer accepted at `attempt`, `last` its generation.
    fn stats(
        &self,
        last: &GeneratedText,
        started: Instant,
        attempt: u32,
        repaired: Vec<Violation>,
        dropped: Vec<Violation>,
    ) -> AnswerStats {
        AnswerStats {
            backend: last.backend,
            model: last.model.clone(),
            prompt_tokens: self.prompt_tokens,
            completion_tokens: self.completion_tokens,
            cached_prompt_tokens: self.cached_prompt_tokens,
            time_to_first_token: last.time_to_first_token,
            total_time: started.elapsed(),
            attempts: attempt,
            repaired,
            dropped,
            cached: false,
        }
    }
}

/// Reads a generated answer: complete, valid under the schema, then
/// obeying the rules `parse` checks.
fn judge<T, E: From<Violation>>(
    generation: &GeneratedText,
    max_tokens: u32,
    schema: &OutputSchema,
    parse: impl Fn(serde_json::Value) -> Result<T, E>,
) -> Result<T, E> {
    if generation.finish_reason == FinishReason::Length {
        return Err(Violation::new(
            Rule::Truncated,
            format!(
                "the answer was cut off at max_tokens={max_tokens} before the JSON was complete"
            ),
        )
        .into());
    }
    let value = schema
        .check(&generation.text)
        .map_err(|problem| Violation::new(Rule::Schema, problem))?;
    parse(value)
}

/// Judges `text`, a whole answer that ended with `finish_reason`, under
/// `schema`, as the runner judges one.
#[cfg(any(test, fuzzing))]
fn judge_text<T, E: From<Violation>>(
    text: &str,
    finish_reason: FinishReason,
    max_tokens: u32,
    schema: serde_json::Value,
    parse: impl Fn(serde_json::Value) -> Result<T, E>,
) -> Result<T, E> {
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
pub(crate) fn judge_answer<K: Task>(
    text: &str,
    request: &K,
) -> Result<Parsed<K::Answer>, Rejection<K::Kept>> {
    judge_text(
        text,
        FinishReason::Stop,
        request.sampling().max_tokens,
        request.schema(None),
        |value| request.parse(value, &OnTopic::lexical()),
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
            decompose_request().schema(None),
            |value| decompose::parse(value, &request, &OnTopic::lexical()),
        )
        .map(|parsed| parsed.value)
        .map_err(|rejection| rejection.violation().clone())
    }

    fn subtask(title: &str, depends_on: &[u32]) -> serde_json::Value {
        serde_json::json!({
            "title": title,
            "description": "Carry out this part of the two-factor authentication and check it.",
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
