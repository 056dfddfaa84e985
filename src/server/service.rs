//! The `InferenceService` handlers: validate, hand to the task layer or the
//! backend, and relay the answer.

use std::{
    future::Future,
    pin::Pin,
    sync::{Arc, OnceLock},
    task::{Context, Poll},
    time::Instant,
};

use futures_util::{Stream, StreamExt};
use opentelemetry::{context::FutureExt, trace::TraceContextExt};
use tokio_util::sync::WaitForCancellationFutureOwned;
use tokio_util::task::task_tracker::TaskTrackerToken;
use tonic::{Code, Request, Response, Status};
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use super::{
    admission::{Admission, Permit, Priority},
    conversions::{StatusReport, duration, model_info},
    deadline::{Deadline, DeadlinePolicy},
    drain::Drain,
    metrics::Metrics,
    rpc::Rpc,
    session::{self, InSession},
    status::{incomplete_generation, schema_violation, starting},
    telemetry::{CallSpan, Telemetry},
    validate::{self, Limits, ValidationError},
};
use crate::{
    backend::{Backend, BackendRegistry, Chunk, ChunkStream, StreamClock},
    json_schema::OutputSchema,
    proto::{self, inference_service_server::InferenceService},
    task::{AnswerStats, Answered, DecomposeRequest, EnhanceRequest, Task, TaskRunner},
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
    /// Where calls' spans start (and are exported, when configured).
    pub telemetry: Telemetry,
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

    /// Records a call that ended with `result`, under the backend that
    /// answered it (after a failover, not the one calls went to at first);
    /// without an answer, under the one calls go to now.
    fn observe<T>(
        &self,
        rpc: Rpc,
        call: Traced,
        result: &Result<T, Status>,
        started: Instant,
        answered_by: Option<&'static str>,
    ) {
        let code = result.as_ref().err().map_or(Code::Ok, Status::code);
        let backend = answered_by.unwrap_or_else(|| self.backend_name());
        self.0
            .metrics
            .call_ended(rpc, backend, code, started.elapsed());
        call.span.ended(backend, code);
    }

    /// The span of a call to `rpc` (in the trace of `request`'s
    /// `traceparent`/`tracestate` metadata, or a new one) and a log span
    /// naming it.
    fn traced<T>(&self, rpc: Rpc, request: &Request<T>) -> Traced {
        let span = self.0.telemetry.call(rpc, request.metadata());
        let ids = span.context().span().span_context().clone();
        let log = tracing::info_span!(
            "call",
            rpc = rpc.as_str(),
            trace_id = %ids.trace_id(),
            span_id = %ids.span_id()
        );
        // Exported only where `init_tracing_with_export` installed its layer; an error
        // says it did not.
        let _ = log.set_parent(span.context().clone());
        Traced { span, log }
    }

    /// A call about models (listing, loading, unloading): traced and
    /// counted like the others, outside admission, since it generates
    /// nothing.
    async fn model_call<Req, Resp, F, Fut>(
        &self,
        rpc: Rpc,
        request: Request<Req>,
        handle: F,
    ) -> Result<Response<Resp>, Status>
    where
        F: FnOnce(Arc<BackendRegistry>, Req) -> Fut,
        Fut: Future<Output = Result<Resp, Status>>,
    {
        let started = Instant::now();
        let call = self.traced(rpc, &request);
        let registry = self.0.registry.get().cloned().ok_or_else(starting);
        let result = match registry {
            Ok(registry) => {
                call.clone()
                    .run(handle(registry, request.into_inner()))
                    .await
            }
            Err(status) => Err(status),
        };
        self.observe(rpc, call, &result, started, None);
        result.map(Response::new)
    }

    /// Waits for a generation slot, recording the wait.
    async fn admit(&self, priority: Priority) -> Result<Permit, Status> {
        let asked = Instant::now();
        let permit = self.0.admission.admit(priority).await?;
        self.0.metrics.waited(priority.name(), asked.elapsed());
        Ok(permit)
    }

    fn answered(&self, rpc: Rpc, stats: &AnswerStats) {
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

    /// EnhanceTask or DecomposeTask, recorded when it ends.
    async fn task_call<K: TaskRpc>(
        &self,
        request: Request<K::Request>,
    ) -> Result<Response<K::Response>, Status> {
        let started = Instant::now();
        let call = self.traced(K::RPC, &request);
        let result = call.clone().run(self.answer::<K>(request, started)).await;
        let answered_by = result.as_ref().ok().map(|answer| answer.stats.backend);
        self.observe(K::RPC, call, &result, started, answered_by);
        result.map(|answer| Response::new(answer.into()))
    }

    /// A structured answer: the cached one when there is one (no slot
    /// needed), else one generated in an admitted slot within the deadline.
    async fn answer<K: TaskRpc>(
        &self,
        request: Request<K::Request>,
        started: Instant,
    ) -> Result<Answered<K::Answer>, Status> {
        let deadline = self.0.deadlines.of(&request);
        let priority = Priority::of(&request)?;
        let session = session::of(&request)?;
        let _open = self.0.drain.admit()?;
        let request = K::validate(request.into_inner(), &self.0.limits)?;
        let registry = self.0.registry.get().cloned().ok_or_else(starting)?;
        let backends = registry.as_ref();
        let in_session = session.map(|session| InSession {
            backends: registry.clone(),
            session,
        });
        let generating: &dyn Backend = match &in_session {
            Some(in_session) => in_session,
            None => backends,
        };
        let runner = &self.0.runner;
        let answer = match runner.cached(backends, &request, started) {
            Some(answer) => answer,
            None => {
                deadline
                    .bound(async {
                        let _slot = self.admit(priority).await?;
                        Ok(runner.run(generating, request, started).await?)
                    })
                    .await?
            }
        };
        self.answered(K::RPC, &answer.stats);
        Ok(answer)
    }

    async fn generate_inner(
        &self,
        request: Request<proto::GenerateRequest>,
        started: Instant,
        call: Traced,
    ) -> Result<Response<GenerateStream>, Status> {
        let deadline = self.0.deadlines.of(&request);
        let priority = Priority::of(&request)?;
        let session = session::of(&request)?;
        let open = self.0.drain.admit()?;
        let (mut request, schema) = validate::generate(request.into_inner(), &self.0.limits)?;
        request.session = session;
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

/// A task RPC: its wire request, validated into the task, and its wire
/// response, made from the answer.
trait TaskRpc: Task {
    type Request: Send + 'static;
    type Response: From<Answered<Self::Answer>> + Send;
    const RPC: Rpc;

    fn validate(request: Self::Request, limits: &Limits) -> Result<Self, ValidationError>;
}

impl TaskRpc for EnhanceRequest {
    type Request = proto::EnhanceTaskRequest;
    type Response = proto::EnhanceTaskResponse;
    const RPC: Rpc = Rpc::EnhanceTask;

    fn validate(request: Self::Request, limits: &Limits) -> Result<Self, ValidationError> {
        validate::enhance(request, limits)
    }
}

impl TaskRpc for DecomposeRequest {
    type Request = proto::DecomposeTaskRequest;
    type Response = proto::DecomposeTaskResponse;
    const RPC: Rpc = Rpc::DecomposeTask;

    fn validate(request: Self::Request, limits: &Limits) -> Result<Self, ValidationError> {
        validate::decompose(request, limits)
    }
}

/// A call's span and its log span.
#[derive(Clone)]
struct Traced {
    span: CallSpan,
    log: tracing::Span,
}

impl Traced {
    async fn run<F: Future>(self, future: F) -> F::Output {
        future
            .instrument(self.log)
            .with_context(self.span.context().clone())
            .await
    }
}

#[tonic::async_trait]
impl InferenceService for InferenceApi {
    async fn enhance_task(
        &self,
        request: Request<proto::EnhanceTaskRequest>,
    ) -> Result<Response<proto::EnhanceTaskResponse>, Status> {
        self.task_call::<EnhanceRequest>(request).await
    }

    async fn decompose_task(
        &self,
        request: Request<proto::DecomposeTaskRequest>,
    ) -> Result<Response<proto::DecomposeTaskResponse>, Status> {
        self.task_call::<DecomposeRequest>(request).await
    }

    type GenerateStream = GenerateStream;

    /// A stream that starts is recorded by its relay when it ends.
    async fn generate(
        &self,
        request: Request<proto::GenerateRequest>,
    ) -> Result<Response<Self::GenerateStream>, Status> {
        let started = Instant::now();
        let call = self.traced(Rpc::Generate, &request);
        let result = call
            .clone()
            .run(self.generate_inner(request, started, call.clone()))
            .await;
        if result.is_err() {
            self.observe(Rpc::Generate, call, &result, started, None);
        }
        result
    }

    async fn list_models(
        &self,
        request: Request<proto::ListModelsRequest>,
    ) -> Result<Response<proto::ListModelsResponse>, Status> {
        self.model_call(Rpc::ListModels, request, |registry, request| async move {
            let backend = validate::backend_name(&request.backend, &registry.backend_names())?;
            let models = registry
                .models(backend)
                .await
                .into_iter()
                .map(|(backend, info)| model_info(backend, info))
                .collect();
            Ok(proto::ListModelsResponse { models })
        })
        .await
    }

    async fn load_model(
        &self,
        request: Request<proto::LoadModelRequest>,
    ) -> Result<Response<proto::LoadModelResponse>, Status> {
        self.model_call(Rpc::LoadModel, request, |registry, request| async move {
            let (model, backend) = validate::model_operation(
                request.model,
                request.backend,
                &registry.backend_names(),
            )?;
            let (backend, info) = registry.load_model(&model, backend).await?;
            Ok(proto::LoadModelResponse {
                model: Some(model_info(backend, info)),
            })
        })
        .await
    }

    async fn unload_model(
        &self,
        request: Request<proto::UnloadModelRequest>,
    ) -> Result<Response<proto::UnloadModelResponse>, Status> {
        self.model_call(Rpc::UnloadModel, request, |registry, request| async move {
            let (model, backend) = validate::model_operation(
                request.model,
                request.backend,
                &registry.backend_names(),
            )?;
            let backends = registry.unload_model(&model, backend).await?;
            Ok(proto::UnloadModelResponse {
                backends: backends.into_iter().map(str::to_owned).collect(),
            })
        })
        .await
    }

    /// Logged in a span of its own, but neither counted nor exported: it
    /// generates nothing.
    async fn get_status(
        &self,
        _request: Request<proto::GetStatusRequest>,
    ) -> Result<Response<proto::GetStatusResponse>, Status> {
        let _entered = tracing::info_span!("call", rpc = Rpc::GetStatus.as_str()).entered();
        let registry = self.registry()?;
        Ok(Response::new(
            StatusReport {
                backends: registry.snapshots(),
                skipped: registry.skipped(),
                admission: self.0.admission.stats(),
                caches: self.0.runner.cache_stats(),
            }
            .into(),
        ))
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
                .call_ended(Rpc::Generate, self.backend, code, elapsed);
            call.span.ended(self.backend, code);
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
            None => Err(incomplete_generation(self.backend)),
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
        let finish_reason = proto::FinishReason::from(completion.finish_reason);
        match verdict {
            // Output cut by max_tokens is reported as such, not as a schema
            // failure: the caller asked for the cut.
            Err(problem) if finish_reason == proto::FinishReason::Stop => {
                Err(schema_violation(self.backend, &problem))
            }
            _ => {
                self.metrics.answered(
                    Rpc::Generate,
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
            dropped: Vec::new(),
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
        let _entered = call.log.enter();
        let _attached = call.span.context().clone().attach();
        let next = this.stream.poll_next_unpin(cx);
        drop((_attached, _entered));
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
