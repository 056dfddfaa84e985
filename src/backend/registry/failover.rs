//! Routing a generation across the backends in failover order: the first
//! backend that is up and whose circuit lets the call through gets it; a
//! backend that is down or full before the first token is left for the next
//! one (or tried again after a jittered backoff when none is left), within
//! a bounded number of attempts. Once text has reached the caller nothing
//! is retried: the caller would see it twice.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use futures_util::{StreamExt, future::BoxFuture, stream};

use super::{Pool, breaker::BreakerPolicy};
use crate::backend::{BackendError, ChunkStream, GenerationRequest};

/// How calls move between backends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FailoverPolicy {
    pub breaker: BreakerPolicy,
    /// Attempts after the first, before any token was sent.
    pub retries: u32,
    /// Base of the backoff before a backend that failed this call is tried
    /// again.
    pub backoff: Duration,
}

/// Backends a call has tried, in order.
#[derive(Clone, Default)]
struct Tried(Vec<usize>);

impl Tried {
    fn attempts(&self) -> u32 {
        self.0.len() as u32
    }

    fn includes(&self, index: usize) -> bool {
        self.0.contains(&index)
    }
}

impl Pool {
    /// Starts `request` on the first backend that takes it. Errors before
    /// the stream starts are retried here; an error in place of the first
    /// chunk is retried when the stream is first read.
    pub(super) async fn route(
        self: Arc<Self>,
        request: GenerationRequest,
    ) -> Result<ChunkStream, BackendError> {
        self.attempt(request, Tried::default()).await
    }

    fn attempt(
        self: Arc<Self>,
        request: GenerationRequest,
        mut tried: Tried,
    ) -> BoxFuture<'static, Result<ChunkStream, BackendError>> {
        Box::pin(async move {
            let mut last_error = None;
            loop {
                let Some(index) = self.pick(&tried) else {
                    return Err(last_error.unwrap_or_else(|| self.circuits_open()));
                };
                if tried.includes(index) {
                    tokio::time::sleep(self.backoff(tried.attempts())).await;
                }
                tried.0.push(index);
                match self.entries[index].backend.generate(request.clone()).await {
                    Ok(stream) => {
                        return Ok(self.clone().first_chunk(index, stream, request, tried));
                    }
                    Err(error) => {
                        self.failed(index, &error);
                        if !self.retry_after(index, &error, &tried) {
                            return Err(error);
                        }
                        last_error = Some(error);
                    }
                }
            }
        })
    }

    /// Whether a call that just failed on backend `index` tries again.
    fn retry_after(&self, index: usize, error: &BackendError, tried: &Tried) -> bool {
        let retry = error.is_transient() && tried.attempts() <= self.policy.retries;
        if retry {
            self.entries[index].note_retry();
            tracing::warn!(%error, attempt = tried.attempts(), "retrying the call before its first token");
        }
        retry
    }

    /// The stream of a started generation: an error in place of its first
    /// chunk moves the call on like an error from `generate`; after that,
    /// the stream is only watched, for the backend's circuit and health.
    fn first_chunk(
        self: Arc<Self>,
        index: usize,
        mut stream: ChunkStream,
        request: GenerationRequest,
        tried: Tried,
    ) -> ChunkStream {
        let head = async move {
            match stream.next().await {
                Some(Err(error)) => {
                    self.failed(index, &error);
                    if !self.retry_after(index, &error, &tried) {
                        return stream::once(async { Err(error) }).boxed();
                    }
                    match self.clone().attempt(request, tried).await {
                        Ok(next) => next,
                        Err(error) => stream::once(async { Err(error) }).boxed(),
                    }
                }
                first => {
                    if first.is_some() {
                        self.succeeded(index);
                    }
                    let pool = self.clone();
                    stream::iter(first)
                        .chain(stream)
                        .inspect(move |item| pool.watch(index, item))
                        .boxed()
                }
            }
        };
        stream::once(head).flatten().boxed()
    }

    /// The backend a call tries next: backends up by their last probe before
    /// ones that failed it (which may have recovered since), configured
    /// order within each, and the ones this call has not tried before those
    /// it has; only those whose circuit lets a call through.
    fn pick(&self, tried: &Tried) -> Option<usize> {
        let now = Instant::now();
        let preferred = self.preference(now);
        let untried = preferred.iter().filter(|index| !tried.includes(**index));
        let again = preferred.iter().filter(|index| tried.includes(**index));
        untried
            .chain(again)
            .copied()
            .find(|index| self.entries[*index].admit(now))
    }

    /// The error of a call no backend could take because every circuit is
    /// open.
    fn circuits_open(&self) -> BackendError {
        let now = Instant::now();
        let circuits = self
            .entries
            .iter()
            .map(|entry| match entry.reopens_in(now) {
                Some(left) => format!(
                    "{} is open for {:.1}s more",
                    entry.backend.name(),
                    left.as_secs_f64()
                ),
                None => format!("{} is testing recovery", entry.backend.name()),
            })
            .collect::<Vec<_>>()
            .join("; ");
        BackendError::CircuitsOpen { circuits }
    }

    /// A wait drawn uniformly below `backoff · 2^(attempts - 1)` ("full
    /// jitter"), so callers retrying together spread out.
    fn backoff(&self, attempts: u32) -> Duration {
        let bound = self
            .policy
            .backoff
            .saturating_mul(1 << attempts.saturating_sub(1).min(16));
        bound.mul_f64(crate::random::fraction())
    }
}
