//! The MLX backend: one long-lived Python worker running Apple's MLX
//! through mlx-lm (`worker.py`, shipped inside the binary), which loads the
//! model once, batches concurrent requests with mlx-lm's continuous
//! batching, streams tokens as they are produced and constrains JSON Schema
//! output with llguidance. Prompts reach it only as JSON data on stdin.
//! The worker process is supervised and restarted when it dies (`worker`).

mod detect;
mod protocol;
mod worker;

use std::{
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use async_trait::async_trait;
use futures_util::{Stream, StreamExt};
use tokio_util::sync::DropGuard;

pub use detect::preferred;
pub use worker::{WorkerInfo, WorkerSettings, WorkerState};

use self::{protocol::Command, worker::Supervisor};
use super::{
    Backend, BackendError, Capabilities, Chunk, ChunkStream, GenerationRequest, ProbeReport,
    SchemaSupport, relay::RelayStream,
};

const NAME: &str = "mlx";

/// The worker's Python source, run with `python -c`.
const WORKER_SOURCE: &str = include_str!("worker.py");

pub struct MlxBackend {
    supervisor: Arc<Supervisor>,
    model_name: String,
    _workers: DropGuard,
}

impl MlxBackend {
    /// Starts the worker and waits until it has loaded the model (or failed
    /// to: the error says why, from the worker's own report).
    pub async fn start(settings: WorkerSettings) -> Result<Self, String> {
        let model_name = settings.model_name.clone();
        let (supervisor, workers) = Supervisor::start(settings);
        match supervisor.started().await {
            WorkerState::Ready(_) => Ok(Self {
                supervisor,
                model_name,
                _workers: workers,
            }),
            WorkerState::Down(reason) => Err(reason),
            WorkerState::Starting => Err("the MLX worker did not start".to_owned()),
        }
    }

    /// What the running worker reported, when one runs.
    pub fn worker(&self) -> Option<WorkerInfo> {
        match self.supervisor.state() {
            WorkerState::Ready(info) => Some(info),
            _ => None,
        }
    }
}

/// The model name requests use for a model at `path`: a directory's name,
/// or a GGUF file's name without `.gguf`.
pub fn model_name(path: &std::path::Path) -> String {
    let name = if path.is_dir() {
        path.file_name()
    } else {
        path.file_stem()
    };
    name.map_or_else(
        || path.display().to_string(),
        |name| name.to_string_lossy().into_owned(),
    )
}

/// Ends the worker's request when the caller drops the stream first.
struct CancelOnDrop {
    supervisor: Arc<Supervisor>,
    id: u64,
}

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.supervisor.cancel(self.id);
    }
}

#[async_trait]
impl Backend for MlxBackend {
    fn name(&self) -> &'static str {
        NAME
    }

    fn endpoint(&self) -> String {
        self.supervisor.model_path().display().to_string()
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            json_schema: SchemaSupport::Enforced,
            seed: true,
            no_repeat: true,
            text_patterns: true,
        }
    }

    async fn probe(&self) -> Result<ProbeReport, BackendError> {
        match self.supervisor.state() {
            WorkerState::Ready(_) => Ok(ProbeReport {
                models: vec![self.model_name.clone()],
                default_model: Some(self.model_name.clone()),
            }),
            WorkerState::Starting => Err(BackendError::Unavailable {
                backend: NAME,
                endpoint: self.endpoint(),
                reason: "the MLX worker is starting".to_owned(),
            }),
            WorkerState::Down(reason) => Err(BackendError::Unavailable {
                backend: NAME,
                endpoint: self.endpoint(),
                reason,
            }),
        }
    }

    async fn generate(&self, request: GenerationRequest) -> Result<ChunkStream, BackendError> {
        if let Some(model) = &request.model
            && *model != self.model_name
        {
            return Err(BackendError::ModelNotFound {
                backend: NAME,
                model: model.clone(),
            });
        }
        let (id, replies) = self
            .supervisor
            .submit(|id| Command::generate(id, &request).line())?;
        Ok(Box::pin(WorkerReplies {
            _cancel: CancelOnDrop {
                supervisor: self.supervisor.clone(),
                id,
            },
            replies,
            model: self.model_name.clone(),
        }))
    }
}

/// A call's replies, with the model's name filled in. Its request is
/// cancelled before its relay goes, so the relay's last `on_room` finds no
/// request left to resume.
struct WorkerReplies {
    _cancel: CancelOnDrop,
    replies: RelayStream,
    model: String,
}

impl Stream for WorkerReplies {
    type Item = Result<Chunk, BackendError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let polled = self.replies.poll_next_unpin(cx);
        polled.map(|item| {
            item.map(|reply| {
                reply.map(|chunk| match chunk {
                    Chunk::Done(mut completion) => {
                        completion.model = self.model.clone();
                        Chunk::Done(completion)
                    }
                    text => text,
                })
            })
        })
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        self.replies.size_hint()
    }
}
