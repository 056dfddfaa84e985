//! The caller's session: `rigger-session` metadata an orchestrator sets
//! (a pipeline run's id, say) so that `--routing session` keeps the
//! session's calls on one runtime instance, where its prompts are cached.

use std::sync::Arc;

use async_trait::async_trait;
use tonic::Status;

use super::validate::ValidationError;
use crate::backend::{
    Backend, BackendError, BackendRegistry, Capabilities, ChunkStream, GenerationRequest,
    ProbeReport,
};

pub const SESSION_HEADER: &str = "rigger-session";

/// The longest session key taken: an id, not a payload.
const MAX_SESSION_BYTES: usize = 256;

/// The call's session key, if it names one: printable ASCII of at most
/// `MAX_SESSION_BYTES`.
pub fn of<T>(request: &tonic::Request<T>) -> Result<Option<String>, Status> {
    let Some(value) = request.metadata().get(SESSION_HEADER) else {
        return Ok(None);
    };
    let invalid = |reason: String| -> Status {
        ValidationError {
            field: SESSION_HEADER.to_owned(),
            reason,
        }
        .into()
    };
    let key = value
        .to_str()
        .map_err(|_| invalid("must be printable ASCII".to_owned()))?;
    if key.is_empty() || key.len() > MAX_SESSION_BYTES {
        return Err(invalid(format!(
            "must be 1 to {MAX_SESSION_BYTES} bytes, not {}",
            key.len()
        )));
    }
    Ok(Some(key.to_owned()))
}

/// The backends as a task's generations see them: each generation carries
/// the call's session.
pub struct InSession {
    pub backends: Arc<BackendRegistry>,
    pub session: String,
}

#[async_trait]
impl Backend for InSession {
    fn name(&self) -> &'static str {
        self.backends.name()
    }

    fn endpoint(&self) -> String {
        self.backends.endpoint()
    }

    fn capabilities(&self) -> Capabilities {
        self.backends.capabilities()
    }

    async fn probe(&self) -> Result<ProbeReport, BackendError> {
        self.backends.probe().await
    }

    async fn generate(&self, mut request: GenerationRequest) -> Result<ChunkStream, BackendError> {
        request.session = Some(self.session.clone());
        self.backends.generate(request).await
    }
}
