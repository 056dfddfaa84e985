//! The `InferenceService` handlers: validate, hand to the task layer or the
//! backend, and relay the answer.

use std::{
    future::Future,
    pin::Pin,
    sync::{Arc, OnceLock},
    task::{Context, Poll},
    time::{Instant, SystemTime},
};

use futures_util::{Stream, StreamExt};
use tokio_util::sync::WaitForCancellationFutureOwned;
use tokio_util::task::task_tracker::TaskTrackerToken;
use tonic::{Code, Request, Response, Status};
use tracing::Instrument;

use super::{
    admission::{Admission, AdmissionStats, Permit, Priority},
    deadline::{Deadline, DeadlinePolicy},
    drain::Drain,
    metrics::Metrics,
    status::{schema_violation, starting},
    telemetry::{FinishedCall, SpanExport},
    validate::{self, Limits},
};
use crate::{
    backend::{
        Backend, BackendHealth, BackendRegistry, Chunk, ChunkStream, CircuitState, FinishReason,
        StreamClock,
    },
    json_schema::OutputSchema,
    proto::{self, inference_service_server::InferenceService},
    task::{AnswerStats, Answered, EnhancementKind, TaskError, TaskRunner, cache::CacheStats},
    trace_context::{TRACEPARENT, TRACESTATE, TraceContext},
};

/// The backends, once selected (and the embedded model loaded): calls
/// arriving before that get UNAVAILABLE.
pub(super) type Backends = Arc<OnceLock<Arc<BackendRegistry>>>;

/// What the handlers share.
pub(super) struct Shared {
    pub registry: Backends,
    pub deadlines: DeadlinePolicy,
    pub admission: Arc<Admission>,
    pub runner: TaskRunner,
    pub limits: Limits,
    pub drain: Drain,
    pub metrics: Arc<Metrics>,
    /// Where finished calls are exported as spans, when configured.
    pub spans: Option<Arc<SpanExport>>,
}

pub struct InferenceApi(Shared);

impl InferenceApi {
    pub(super) fn new(shared: Shared) -> Self {
        Self(shared)
    }

    fn registry(&self) -> Result<&BackendRegistry, Status> {
        self.0.registry.get().map(Arc::as_ref).ok_or_else(starting)
    }

    /// Name of the backend calls go to now, for metrics.
    fn backend_name(&self) -> &'static str {
        self.0
            .registry
            .get()
            .map_or("none", |registry| registry.name())
    }

    fn observe<T>(
        &self,
        rpc: &'static str,
        call: Traced,
        result: &Result<T, Status>,
        started: Instant,
    ) {
        let code = result.as_ref().err().map_or(Code::Ok, Status::code);
        let backend = self.backend_name();
        self.0
            .metrics
            .call_ended(rpc, backend, code, started.elapsed());
        call.ended(
            self.0.spans.as_deref(),
            rpc,
            backend,
            code,
            started.elapsed(),
        );
    }

    /// The trace context of `request` (from its `traceparent`/`tracestate`
    /// metadata, or a new trace) and a log span naming it.
    fn traced<T>(&self, rpc: &'static str, request: &Request<T>) -> Traced {
        let metadata = request.metadata();
        let header = |name| metadata.get(name).and_then(|value| value.to_str().ok());
        let context = TraceContext::for_call(
            header(TRACEPARENT),
            header(TRACESTATE),
            self.0.spans.is_some(),
        );
        let span = tracing::info_span!(
            "call",
            rpc,
            trace_id = %context.trace_id(),
            span_id = %context.span_id()
        );
        Traced {
            context,
            span,
            started: SystemTime::now(),
        }
    }

    /// Waits for a generation slot, recording the wait.
    async fn admit(&self, priority: Priority) -> Result<Permit, Status> {
        let asked = Instant::now();
        let permit = self.0.admission.admit(priority).await?;
        self.0.metrics.waited(priority.name(), asked.elapsed());
        Ok(permit)
    }

    fn answered(&self, rpc: &'static str, stats: &AnswerStats) {
        if !stats.cached {
            self.0.metrics.answered(
                rpc,
                stats.backend,
                stats.time_to_first_token,
                stats.total_time,
                stats.completion_tokens,
            );
        }
    }

    /// A structured answer: the cached one when there is one (no slot
    /// needed), else `generate` run in an admitted slot within the deadline.
    async fn structured<T>(
        &self,
        rpc: &'static str,
        deadline: Deadline,
        priority: Priority,
        cached: Option<Answered<T>>,
        generate: impl Future<Output = Result<Answered<T>, TaskError>>,
    ) -> Result<Answered<T>, Status> {
        let answer = match cached {
            Some(answer) => answer,
            None => {
                deadline
                    .bound(async {
                        let _slot = self.admit(priority).await?;
                        Ok(generate.await?)
                    })
                    .await?
            }
        };
        self.answered(rpc, &answer.stats);
        Ok(answer)
    }

    // The handlers' bodies; the trait methods around them record metrics.

    async fn enhance_inner(
        &self,
        request: Request<proto::EnhanceTaskRequest>,
        started: Instant,
    ) -> Result<Response<proto::EnhanceTaskResponse>, Status> {
        let deadline = self.0.deadlines.of(&request);
        let priority = Priority::of(&request)?;
        let _open = self.0.drain.admit()?;
        let request = validate::enhance(request.into_inner(), &self.0.limits)?;
        let backends = self.registry()?;
        let runner = &self.0.runner;
        let cached = runner.cached_enhancement(backends, &request, started);
        let generate = runner.enhance(backends, request, started);
        let answer = self
            .structured("enhance_task", deadline, priority, cached, generate)
            .await?;
        let enhancement = answer.value;
        Ok(Response::new(proto::EnhanceTaskResponse {
            enhancement: Some(proto::Enhancement {
                kind: enhancement_kind(enhancement.kind) as i32,
                title: enhancement.title,
                description: enhancement.description,
                acceptance_criteria: enhancement.acceptance_criteria,
            }),
            meta: Some(answer_meta(&answer.stats)),
        }))
    }

    async fn decompose_inner(
        &self,
        request: Request<proto::DecomposeTaskRequest>,
        started: Instant,
    ) -> Result<Response<proto::DecomposeTaskResponse>, Status> {
        let deadline = self.0.deadlines.of(&request);
        let priority = Priority::of(&request)?;
        let _open = self.0.drain.admit()?;
        let request = validate::decompose(request.into_inner(), &self.0.limits)?;
        let backends = self.registry()?;
        let runner = &self.0.runner;
        let cached = runner.cached_decomposition(backends, &request, started);
        let generate = runner.decompose(backends, request, started);
        let answer = self
            .structured("decompose_task", deadline, priority, cached, generate)
            .await?;
        Ok(Response::new(proto::DecomposeTaskResponse {
            subtasks: answer
                .value
                .into_iter()
                .map(|subtask| proto::Subtask {
                    title: subtask.title,
                    description: subtask.description,
                    complexity: subtask.complexity.into(),
                    depends_on: subtask.depends_on,
                    reasoning: subtask.reasoning,
                })
                .collect(),
            meta: Some(answer_meta(&answer.stats)),
        }))
    }

    async fn generate_inner(
        &self,
        request: Request<proto::GenerateRequest>,
        started: Instant,
        call: Traced,
    ) -> Result<Response<GenerateStream>, Status> {
        let deadline = self.0.deadlines.of(&request);
        let priority = Priority::of(&request)?;
        let open = self.0.drain.admit()?;
        let (request, schema) = validate::generate(request.into_inner(), &self.0.limits)?;
        let backends = self.registry()?;
        let requested_model = request.model.clone().unwrap_or_default();
        let (slot, stream) = deadline
            .bound(async {
                let slot = self.admit(priority).await?;
                Ok((slot, backends.generate(request).await?))
            })
            .await?;
        let relay = Relay {
            stream,
            schema,
            output: String::new(),
            clock: StreamClock::start(started),
            backend: backends.name(),
            requested_model,
            metrics: self.0.metrics.clone(),
            spans: self.0.spans.clone(),
            deadline,
            timer: Box::pin(deadline.timer()),
            cut: Box::pin(self.0.drain.cut().cancelled_owned()),
            call: Some(call),
            _slot: slot,
            _open: open,
        };
        Ok(Response::new(Box::pin(relay)))
    }
}

type GenerateStream = Pin<Box<dyn Stream<Item = Result<proto::GenerateResponse, Status>> + Send>>;

/// A call's place in its trace, its log span and when it started.
#[derive(Clone)]
struct Traced {
    context: TraceContext,
    span: tracing::Span,
    started: SystemTime,
}

impl Traced {
    async fn run<F: Future>(self, future: F) -> F::Output {
        self.context.scope(future.instrument(self.span)).await
    }

    /// Exports the call's span, when spans are exported.
    fn ended(
        self,
        spans: Option<&SpanExport>,
        rpc: &'static str,
        backend: &'static str,
        code: Code,
        duration: std::time::Duration,
    ) {
        if let Some(spans) = spans {
            spans.record(FinishedCall {
                context: self.context,
                rpc,
                backend,
                start: self.started,
                duration,
                code,
            });
        }
    }
}

#[tonic::async_trait]
impl InferenceService for InferenceApi {
    async fn enhance_task(
        &self,
        request: Request<proto::EnhanceTaskRequest>,
    ) -> Result<Response<proto::EnhanceTaskResponse>, Status> {
        let started = Instant::now();
        let call = self.traced("enhance_task", &request);
        let result = call.clone().run(self.enhance_inner(request, started)).await;
        self.observe("enhance_task", call, &result, started);
        result
    }

    async fn decompose_task(
        &self,
        request: Request<proto::DecomposeTaskRequest>,
    ) -> Result<Response<proto::DecomposeTaskResponse>, Status> {
        let started = Instant::now();
        let call = self.traced("decompose_task", &request);
        let result = call
            .clone()
            .run(self.decompose_inner(request, started))
            .await;
        self.observe("decompose_task", call, &result, started);
        result
    }

    type GenerateStream = GenerateStream;

    /// A stream that starts is recorded by its relay when it ends.
    async fn generate(
        &self,
        request: Request<proto::GenerateRequest>,
    ) -> Result<Response<Self::GenerateStream>, Status> {
        let started = Instant::now();
        let call = self.traced("generate", &request);
        let result = call
            .clone()
            .run(self.generate_inner(request, started, call.clone()))
            .await;
        if result.is_err() {
            self.observe("generate", call, &result, started);
        }
        result
    }
    async fn get_status(
        &self,
        _request: Request<proto::GetStatusRequest>,
    ) -> Result<Response<proto::GetStatusResponse>, Status> {
        let registry = self.registry()?;
        let snapshots = registry.snapshots();
        let caches = self.0.runner.cache_stats();
        let active = snapshots.iter().find(|snapshot| snapshot.active);
        Ok(Response::new(proto::GetStatusResponse {
            active_backend: active
                .map(|snapshot| snapshot.name.to_owned())
                .unwrap_or_default(),
            model: active
                .and_then(|snapshot| snapshot.default_model.clone())
                .unwrap_or_default(),
            platform: Some(proto::Platform {
                os: std::env::consts::OS.to_owned(),
                arch: std::env::consts::ARCH.to_owned(),
            }),
            backends: snapshots
                .into_iter()
                .map(|snapshot| proto::BackendStatus {
                    name: snapshot.name.to_owned(),
                    endpoint: snapshot.endpoint,
                    active: snapshot.active,
                    health: match snapshot.health {
                        BackendHealth::Unknown => proto::BackendHealth::Unknown,
                        BackendHealth::Serving => proto::BackendHealth::Serving,
                        BackendHealth::NotServing => proto::BackendHealth::NotServing,
                    } as i32,
                    default_model: snapshot.default_model.unwrap_or_default(),
                    models: snapshot.models,
                    capabilities: Some(proto::BackendCapabilities {
                        no_repeat: snapshot.capabilities.no_repeat,
                        json_schema: match snapshot.capabilities.json_schema {
                            crate::backend::SchemaSupport::Requested => {
                                proto::SchemaSupport::Requested
                            }
                            crate::backend::SchemaSupport::Enforced => {
                                proto::SchemaSupport::Enforced
                            }
                        } as i32,
                        seed: snapshot.capabilities.seed,
                    }),
                    last_error: snapshot.last_error.unwrap_or_default(),
                    health_service: super::health::backend_service(snapshot.name),
                    circuit: match snapshot.circuit {
                        CircuitState::Closed => proto::CircuitState::Closed,
                        CircuitState::Open => proto::CircuitState::Open,
                        CircuitState::HalfOpen => proto::CircuitState::HalfOpen,
                    } as i32,
                    consecutive_failures: snapshot.consecutive_failures,
                    failures: snapshot.failures,
                    retried: snapshot.retried,
                })
                .collect(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            admission: Some(admission_status(self.0.admission.stats())),
            enhance_cache: caches.map(|(enhance, _)| cache_status(enhance)),
            decompose_cache: caches.map(|(_, decompose)| cache_status(decompose)),
            skipped_backends: registry
                .skipped()
                .iter()
                .map(|(name, reason)| proto::SkippedBackend {
                    name: (*name).to_owned(),
                    reason: reason.clone(),
                })
                .collect(),
        }))
    }
}

/// Moves one generation from the backend to the client, as the response
/// stream itself: each message is produced when the transport asks for the
/// next one (no task or channel between the backend and the client, and
/// HTTP/2 flow control reaches the backend). Dropping it (the client went
/// away) drops the backend stream, which stops the backend's work, and
/// records the call as CANCELLED.
struct Relay {
    stream: ChunkStream,
    schema: Option<OutputSchema>,
    /// The text so far, when a schema must be checked at the end.
    output: String,
    clock: StreamClock,
    /// The backend serving the call: the active one when it started, the
    /// one that completed it once it has.
    backend: &'static str,
    requested_model: String,
    metrics: Arc<Metrics>,
    spans: Option<Arc<SpanExport>>,
    deadline: Deadline,
    timer: Pin<Box<tokio::time::Sleep>>,
    cut: Pin<Box<WaitForCancellationFutureOwned>>,
    /// Taken when the call ends and is recorded.
    call: Option<Traced>,
    _slot: Permit,
    _open: TaskTrackerToken,
}

impl Relay {
    /// Records how the call ended, once.
    fn ended(&mut self, code: Code) {
        if let Some(call) = self.call.take() {
            let elapsed = self.clock.elapsed();
            self.metrics
                .call_ended("generate", self.backend, code, elapsed);
            call.ended(
                self.spans.as_deref(),
                "generate",
                self.backend,
                code,
                elapsed,
            );
        }
    }

    /// What the backend's next chunk becomes: text, or the summary or error
    /// that ends the call.
    fn message(
        &mut self,
        next: Option<Result<Chunk, crate::backend::BackendError>>,
    ) -> Result<proto::GenerateResponse, Status> {
        let message = match next {
            Some(Ok(chunk)) => {
                self.clock.observe(&chunk);
                match chunk {
                    Chunk::Text(text) => {
                        if self.schema.is_some() {
                            self.output.push_str(&text);
                        }
                        return Ok(proto::GenerateResponse {
                            event: Some(proto::generate_response::Event::Text(text)),
                        });
                    }
                    Chunk::Done(completion) => self.completed(&completion),
                }
            }
            Some(Err(error)) => Err(error.into()),
            None => Err(Status::internal(format!(
                "backend {} ended the generation without completing it",
                self.backend
            ))),
        };
        self.ended(message.as_ref().err().map_or(Code::Ok, Status::code));
        message
    }

    /// The summary of a completed generation, or the schema violation its
    /// output turned out to be.
    fn completed(
        &mut self,
        completion: &crate::backend::Completion,
    ) -> Result<proto::GenerateResponse, Status> {
        self.backend = completion.backend;
        let verdict = match &self.schema {
            Some(schema) => schema.check(&self.output).map(|_| ()),
            None => Ok(()),
        };
        let finish_reason = match completion.finish_reason {
            FinishReason::Stop => proto::FinishReason::Stop,
            FinishReason::Length => proto::FinishReason::Length,
        };
        match verdict {
            // Output cut by max_tokens is reported as such, not as a schema
            // failure: the caller asked for the cut.
            Err(problem) if finish_reason == proto::FinishReason::Stop => {
                Err(schema_violation(&problem))
            }
            _ => {
                self.metrics.answered(
                    "generate",
                    self.backend,
                    self.clock.time_to_first_token(),
                    self.clock.elapsed(),
                    completion.completion_tokens,
                );
                Ok(self.summary(finish_reason, Some(completion)))
            }
        }
    }

    fn summary(
        &self,
        finish_reason: proto::FinishReason,
        completion: Option<&crate::backend::Completion>,
    ) -> proto::GenerateResponse {
        let meta = proto::ResponseMeta {
            backend: self.backend.to_owned(),
            model: completion.map_or_else(
                || self.requested_model.clone(),
                |completion| completion.model.clone(),
            ),
            prompt_tokens: completion.map_or(0, |completion| completion.prompt_tokens),
            completion_tokens: completion.map_or(0, |completion| completion.completion_tokens),
            cached_prompt_tokens: completion
                .map_or(0, |completion| completion.cached_prompt_tokens),
            time_to_first_token: duration(self.clock.time_to_first_token()),
            total_time: duration(self.clock.elapsed()),
            attempts: 1,
            repaired: Vec::new(),
            cached: false,
            backend_prompt_time: completion
                .and_then(|completion| completion.engine_timings)
                .and_then(|timings| duration(timings.prompt)),
            backend_generation_time: completion
                .and_then(|completion| completion.engine_timings)
                .and_then(|timings| duration(timings.generation)),
        };
        proto::GenerateResponse {
            event: Some(proto::generate_response::Event::Summary(
                proto::GenerationSummary {
                    finish_reason: finish_reason as i32,
                    meta: Some(meta),
                },
            )),
        }
    }
}

impl Stream for Relay {
    type Item = Result<proto::GenerateResponse, Status>;

    /// The next message; an error when the call's deadline passes, and a
    /// CANCELLED summary when the shutdown grace period ends.
    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        let Some(call) = &this.call else {
            return Poll::Ready(None);
        };
        if this.timer.as_mut().poll(cx).is_ready() {
            this.ended(Code::DeadlineExceeded);
            return Poll::Ready(Some(Err(this.deadline.expired())));
        }
        if this.cut.as_mut().poll(cx).is_ready() {
            let summary = this.summary(proto::FinishReason::Cancelled, None);
            this.ended(Code::Ok);
            return Poll::Ready(Some(Ok(summary)));
        }
        // Polled by the transport, outside the handler: the call's trace
        // context and log span go along, since a failover may still start
        // a backend request.
        let _entered = call.span.enter();
        let next = call
            .context
            .clone()
            .sync_scope(|| this.stream.poll_next_unpin(cx));
        drop(_entered);
        match next {
            Poll::Pending => Poll::Pending,
            Poll::Ready(next) => Poll::Ready(Some(this.message(next))),
        }
    }
}

impl Drop for Relay {
    /// A relay dropped before the call ended: the client went away.
    fn drop(&mut self) {
        self.ended(Code::Cancelled);
    }
}

fn answer_meta(stats: &AnswerStats) -> proto::ResponseMeta {
    proto::ResponseMeta {
        backend: stats.backend.to_owned(),
        model: stats.model.clone(),
        prompt_tokens: stats.prompt_tokens,
        completion_tokens: stats.completion_tokens,
        cached_prompt_tokens: stats.cached_prompt_tokens,
        time_to_first_token: duration(stats.time_to_first_token),
        total_time: duration(stats.total_time),
        attempts: stats.attempts,
        backend_prompt_time: None,
        backend_generation_time: None,
        cached: stats.cached,
        repaired: stats
            .repaired
            .iter()
            .map(|violation| proto::Violation {
                rule: violation.rule.name().to_owned(),
                detail: violation.detail.clone(),
            })
            .collect(),
    }
}

fn admission_status(stats: AdmissionStats) -> proto::AdmissionStatus {
    let limits = stats.limits;
    proto::AdmissionStatus {
        in_flight: stats.in_flight as u64,
        max_in_flight: limits.max_in_flight as u64,
        queued_interactive: stats.queued_interactive as u64,
        queued_batch: stats.queued_batch as u64,
        max_queue: limits.max_queue as u64,
        admitted: stats.admitted,
        rejected: stats.rejected,
        mean_wait: duration(stats.mean_wait),
    }
}

fn cache_status(stats: CacheStats) -> proto::ResultCacheStatus {
    proto::ResultCacheStatus {
        entries: stats.entries as u64,
        capacity: stats.capacity as u64,
        hits: stats.hits,
        misses: stats.misses,
    }
}

fn duration(value: std::time::Duration) -> Option<prost_types::Duration> {
    prost_types::Duration::try_from(value).ok()
}

fn enhancement_kind(kind: EnhancementKind) -> proto::EnhancementKind {
    match kind {
        EnhancementKind::Clarify => proto::EnhancementKind::Clarify,
        EnhancementKind::Specify => proto::EnhancementKind::Specify,
        EnhancementKind::Context => proto::EnhancementKind::Context,
    }
}
