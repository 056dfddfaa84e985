//! The one place where errors of every layer become gRPC status codes.

use tonic::{Code, Status, metadata::MetadataValue};

use super::validate::ValidationError;
use crate::{backend::BackendError, task::TaskError};

impl From<ValidationError> for Status {
    fn from(error: ValidationError) -> Self {
        Status::invalid_argument(error.to_string())
    }
}

impl From<BackendError> for Status {
    fn from(error: BackendError) -> Self {
        let code = match &error {
            BackendError::Unavailable { .. }
            | BackendError::Busy { .. }
            | BackendError::CircuitsOpen { .. } => Code::Unavailable,
            BackendError::Overloaded { .. } => Code::ResourceExhausted,
            BackendError::ModelNotFound { .. } => Code::NotFound,
            BackendError::NoDefaultModel { .. } => Code::FailedPrecondition,
            BackendError::Rejected { .. } => Code::InvalidArgument,
            BackendError::Failed { .. } | BackendError::Protocol { .. } => Code::Internal,
        };
        Status::new(code, error.to_string())
    }
}

/// Trailer naming the rule an answer that stayed invalid broke last.
pub const VIOLATION_TRAILER: &str = "rigger-violation";

impl From<TaskError> for Status {
    fn from(error: TaskError) -> Self {
        match error {
            TaskError::Backend(error) => error.into(),
            TaskError::InvalidAnswer { ref violation, .. } => {
                let mut status = Status::internal(error.to_string());
                status.metadata_mut().insert(
                    VIOLATION_TRAILER,
                    MetadataValue::from_static(violation.rule.name()),
                );
                status
            }
        }
    }
}

/// A streamed output that does not satisfy the caller's JSON Schema.
pub(super) fn schema_violation(problem: &str) -> Status {
    Status::internal(format!(
        "generated output does not satisfy json_schema: {problem}"
    ))
}

/// A call that arrives while the backends are still being selected or the
/// embedded model loads.
pub(super) fn starting() -> Status {
    Status::unavailable(
        "rigger-inference is starting: its backend is being selected or its model loaded; retry shortly",
    )
}
