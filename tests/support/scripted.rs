//! A backend in this process that does what a test tells it: answer at once
//! or after a delay, refuse or fail before the first token, hang, stream
//! some text and then fail or wait for the test's go-ahead. It records every
//! request it got and what became of each stream, so a test can prove that
//! a cancellation or deadline reached the backend: the service dropped the
//! stream before its end.
//!
//! The fast tier (tests/fast/) runs the whole gRPC service over it, with no
//! Python, model or runtime process.

use std::{
    collections::VecDeque,
    pin::Pin,
    sync::{Arc, Mutex, MutexGuard},
    task::{Context, Poll},
    time::Duration,
};

use async_trait::async_trait;
use futures_util::{Stream, StreamExt, stream};
use rigger_inference::backend::{
    Backend, BackendError, Capabilities, Chunk, ChunkStream, Completion, FinishReason,
    GenerationRequest, ProbeReport, SchemaSupport,
};
use tokio::sync::{Semaphore, watch};

/// How long a test waits for something the backend should see.
const WAIT: Duration = Duration::from_secs(10);

/// Prompt tokens every completion reports.
const PROMPT_TOKENS: u32 = 8;

/// A [`BackendError`] variant, without its details.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    Unavailable,
    Busy,
    Overloaded,
    ModelNotFound,
    NoDefaultModel,
    Rejected,
    Failed,
    Protocol,
    CircuitsOpen,
}

impl ErrorKind {
    /// The error of this kind that `backend` reports.
    pub fn error(self, backend: &'static str) -> BackendError {
        let reason = "scripted".to_owned();
        match self {
            Self::Unavailable => BackendError::Unavailable {
                backend,
                endpoint: ENDPOINT.to_owned(),
                reason,
            },
            Self::Busy => BackendError::Busy { backend, reason },
            Self::Overloaded => BackendError::Overloaded { backend, reason },
            Self::ModelNotFound => BackendError::ModelNotFound {
                backend,
                model: reason,
            },
            Self::NoDefaultModel => BackendError::NoDefaultModel { backend },
            Self::Rejected => BackendError::Rejected { backend, reason },
            Self::Failed => BackendError::Failed { backend, reason },
            Self::Protocol => BackendError::Protocol { backend, reason },
            Self::CircuitsOpen => BackendError::CircuitsOpen { circuits: reason },
        }
    }
}

/// Where a scripted backend says it is reached.
pub const ENDPOINT: &str = "in-process";

/// How a stream ends once its text is sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum End {
    /// A completion.
    Complete,
    /// An error in place of the rest.
    Fail(ErrorKind),
    /// Nothing more, ever: the stream stays open until dropped.
    Hang,
}

/// What one generation does.
#[derive(Clone, Debug)]
pub struct Reply {
    /// `generate` itself fails with this, before any stream exists.
    refusal: Option<ErrorKind>,
    /// Wait before the first chunk.
    delay: Duration,
    chunks: Vec<String>,
    /// After this many chunks the stream waits for [`ScriptedBackend::release`].
    held_after: Option<usize>,
    end: End,
}

impl Reply {
    /// Streams `chunks` at once, then completes.
    pub fn text<S: Into<String>>(chunks: impl IntoIterator<Item = S>) -> Self {
        Self {
            refusal: None,
            delay: Duration::ZERO,
            chunks: chunks.into_iter().map(Into::into).collect(),
            held_after: None,
            end: End::Complete,
        }
    }

    /// `generate` fails with `kind` before any stream exists.
    pub fn refuse(kind: ErrorKind) -> Self {
        Self {
            refusal: Some(kind),
            ..Self::text::<String>([])
        }
    }

    /// The stream's first item is an error: the backend accepted the
    /// request and failed before its first token.
    pub fn fail_first(kind: ErrorKind) -> Self {
        Self::text::<String>([]).then(End::Fail(kind))
    }

    /// A stream that never yields anything.
    pub fn hang() -> Self {
        Self::text::<String>([]).then(End::Hang)
    }

    /// Ends the stream with `end` instead of a completion, after the text.
    pub fn then(self, end: End) -> Self {
        Self { end, ..self }
    }

    /// Waits `delay` before the first chunk.
    pub fn after(self, delay: Duration) -> Self {
        Self { delay, ..self }
    }

    /// Sends `chunks` chunks, then waits for [`ScriptedBackend::release`]
    /// before the rest.
    pub fn held_after(self, chunks: usize) -> Self {
        Self {
            held_after: Some(chunks),
            ..self
        }
    }
}

/// What became of the streams the backend started.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Streams {
    pub started: usize,
    /// Read to their last item (completion or error).
    pub finished: usize,
    /// Dropped before their last item: the service gave up on them.
    pub dropped: usize,
}

#[derive(Default)]
struct Script {
    /// Replies for the next calls, one each, before `default` applies.
    queued: VecDeque<Reply>,
    default: Option<Reply>,
    /// The probe fails with this when set.
    probe_failure: Option<ErrorKind>,
    requests: Vec<GenerationRequest>,
}

/// A backend that follows a script; the test keeps an `Arc` of it to change
/// the script and read what it recorded while the server uses it.
pub struct ScriptedBackend {
    name: &'static str,
    capabilities: Capabilities,
    models: Vec<String>,
    script: Mutex<Script>,
    streams: Arc<watch::Sender<Streams>>,
    /// Permits for held streams to go on.
    releases: Arc<Semaphore>,
}

impl ScriptedBackend {
    /// Serves `model-a` (its default) and `model-b`, enforces schemas,
    /// honours seeds, and answers `Reply::text(["Hello", " world"])`.
    pub fn new(name: &'static str) -> Arc<Self> {
        Self::with(
            name,
            Capabilities {
                no_repeat: false,
                text_patterns: false,
                json_schema: SchemaSupport::Enforced,
                seed: true,
            },
            &["model-a", "model-b"],
        )
    }

    /// A backend with the given capabilities, serving `models` (the first
    /// is its default).
    pub fn with(name: &'static str, capabilities: Capabilities, models: &[&str]) -> Arc<Self> {
        Arc::new(Self {
            name,
            capabilities,
            models: models.iter().map(|model| (*model).to_owned()).collect(),
            script: Mutex::new(Script {
                default: Some(Reply::text(["Hello", " world"])),
                ..Script::default()
            }),
            streams: Arc::new(watch::Sender::new(Streams::default())),
            releases: Arc::new(Semaphore::new(0)),
        })
    }

    fn script(&self) -> MutexGuard<'_, Script> {
        self.script
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
    }

    /// Every call from now on does `reply`, once the queued ones are used.
    pub fn always(&self, reply: Reply) {
        self.script().default = Some(reply);
    }

    /// The next call does `reply` (after those queued before it).
    pub fn next(&self, reply: Reply) {
        self.script().queued.push_back(reply);
    }

    /// Probes fail with `kind` from now on, or succeed again with `None`.
    pub fn probes_fail(&self, kind: Option<ErrorKind>) {
        self.script().probe_failure = kind;
    }

    /// Lets `streams` held streams go on past their hold.
    pub fn release(&self, streams: usize) {
        self.releases.add_permits(streams);
    }

    /// The requests `generate` got, in order.
    pub fn requests(&self) -> Vec<GenerationRequest> {
        self.script().requests.clone()
    }

    pub fn streams(&self) -> Streams {
        *self.streams.borrow()
    }

    /// Waits until the streams satisfy `condition`.
    pub async fn wait_for(&self, what: &str, condition: impl Fn(&Streams) -> bool) -> Streams {
        let mut streams = self.streams.subscribe();
        match tokio::time::timeout(WAIT, streams.wait_for(|now| condition(now))).await {
            Ok(Ok(streams)) => *streams,
            _ => panic!(
                "backend {}: {what} within {WAIT:?}; streams {:?}",
                self.name,
                self.streams()
            ),
        }
    }

    /// Waits until `count` streams in all were dropped before their end.
    pub async fn dropped(&self, count: usize) -> Streams {
        self.wait_for(&format!("{count} streams dropped"), |streams| {
            streams.dropped >= count
        })
        .await
    }

    /// Waits until `count` streams in all have started.
    pub async fn started(&self, count: usize) -> Streams {
        self.wait_for(&format!("{count} streams started"), |streams| {
            streams.started >= count
        })
        .await
    }

    fn completion(&self, model: String, chunks: usize) -> Chunk {
        Chunk::Done(Completion {
            backend: self.name,
            model,
            finish_reason: FinishReason::Stop,
            prompt_tokens: PROMPT_TOKENS,
            completion_tokens: chunks as u32,
            cached_prompt_tokens: 0,
            engine_timings: None,
        })
    }
}

#[async_trait]
impl Backend for ScriptedBackend {
    fn name(&self) -> &'static str {
        self.name
    }

    fn endpoint(&self) -> String {
        ENDPOINT.to_owned()
    }

    fn capabilities(&self) -> Capabilities {
        self.capabilities
    }

    async fn probe(&self) -> Result<ProbeReport, BackendError> {
        if let Some(kind) = self.script().probe_failure {
            return Err(kind.error(self.name));
        }
        Ok(ProbeReport {
            models: self.models.clone(),
            default_model: self.models.first().cloned(),
        })
    }

    async fn generate(&self, request: GenerationRequest) -> Result<ChunkStream, BackendError> {
        let reply = {
            let mut script = self.script();
            script.requests.push(request.clone());
            let queued = script.queued.pop_front();
            queued
                .or_else(|| script.default.clone())
                .expect("a scripted backend always has a default reply")
        };
        if let Some(kind) = reply.refusal {
            return Err(kind.error(self.name));
        }
        let model = match request.model {
            Some(model) if !self.models.contains(&model) => {
                return Err(BackendError::ModelNotFound {
                    backend: self.name,
                    model,
                });
            }
            Some(model) => model,
            None => self.models.first().cloned().unwrap_or_default(),
        };
        let done = match reply.end {
            End::Complete => Some(Ok(self.completion(model, reply.chunks.len()))),
            End::Fail(kind) => Some(Err(kind.error(self.name))),
            End::Hang => None,
        };
        let script = Played {
            items: reply
                .chunks
                .into_iter()
                .map(|text| Ok(Chunk::Text(text)))
                .chain(done)
                .collect(),
            sent: 0,
            delay: reply.delay,
            held_after: reply.held_after,
            hang: reply.end == End::Hang,
            releases: self.releases.clone(),
        };
        let body = stream::unfold(script, |mut played| async move {
            let item = played.next().await?;
            Some((item, played))
        });
        self.streams.send_modify(|streams| streams.started += 1);
        Ok(Box::pin(Watched {
            inner: Box::pin(body),
            streams: self.streams.clone(),
            ended: false,
        }))
    }
}

/// A reply being played out, item by item.
struct Played {
    items: VecDeque<Result<Chunk, BackendError>>,
    /// Items sent so far.
    sent: usize,
    delay: Duration,
    held_after: Option<usize>,
    hang: bool,
    releases: Arc<Semaphore>,
}

impl Played {
    async fn next(&mut self) -> Option<Result<Chunk, BackendError>> {
        if self.sent == 0 {
            tokio::time::sleep(self.delay).await;
        }
        if self.held_after == Some(self.sent) {
            self.releases
                .acquire()
                .await
                .expect("the semaphore stays open")
                .forget();
        }
        match self.items.pop_front() {
            Some(item) => {
                self.sent += 1;
                Some(item)
            }
            None if self.hang => std::future::pending().await,
            None => None,
        }
    }
}

/// A scripted stream that tells its backend whether it was read to its end
/// or dropped before.
struct Watched {
    inner: Pin<Box<dyn Stream<Item = Result<Chunk, BackendError>> + Send>>,
    streams: Arc<watch::Sender<Streams>>,
    ended: bool,
}

impl Stream for Watched {
    type Item = Result<Chunk, BackendError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let next = self.inner.poll_next_unpin(cx);
        let last = matches!(next, Poll::Ready(Some(Ok(Chunk::Done(_)) | Err(_)) | None));
        if last && !self.ended {
            self.ended = true;
            self.streams.send_modify(|streams| streams.finished += 1);
        }
        next
    }
}

impl Drop for Watched {
    fn drop(&mut self) {
        if !self.ended {
            self.streams.send_modify(|streams| streams.dropped += 1);
        }
    }
}
