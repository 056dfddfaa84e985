//! Errors of the backend layer. The server maps them to gRPC status codes in
//! one place (`server::status`).

use super::residency::ResidencyError;

#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("backend {backend} is unavailable at {endpoint}: {reason}")]
    Unavailable {
        backend: &'static str,
        endpoint: String,
        reason: String,
    },
    #[error("backend {backend} is busy: {reason}")]
    Busy {
        backend: &'static str,
        reason: String,
    },
    #[error("backend {backend} is at capacity: {reason}")]
    Overloaded {
        backend: &'static str,
        reason: String,
    },
    #[error("model {model:?} is not served by backend {backend}")]
    ModelNotFound {
        backend: &'static str,
        model: String,
    },
    #[error(
        "backend {backend} has no default model: set RIGGER_MODEL or make the backend serve one"
    )]
    NoDefaultModel { backend: &'static str },
    #[error("backend {backend} rejected the request: {reason}")]
    Rejected {
        backend: &'static str,
        reason: String,
    },
    #[error("backend {backend} failed: {reason}")]
    Failed {
        backend: &'static str,
        reason: String,
    },
    #[error("backend {backend} sent a malformed response: {reason}")]
    Protocol {
        backend: &'static str,
        reason: String,
    },
    #[error("no backend can take the call: {circuits}")]
    CircuitsOpen { circuits: String },
    #[error("backend {backend}: {error}")]
    Residency {
        backend: &'static str,
        #[source]
        error: ResidencyError,
    },
    #[error("backend {backend} does not support {operation}")]
    Unsupported {
        backend: &'static str,
        operation: &'static str,
    },
    #[error("no backend serves model {model:?}; {}", closest_names(closest))]
    UnknownModel { model: String, closest: Vec<String> },
}

fn closest_names(closest: &[String]) -> String {
    if closest.is_empty() {
        "none is served".to_owned()
    } else {
        format!("closest: {}", closest.join(", "))
    }
}

impl BackendError {
    /// A stable name for the kind of error, in SCREAMING_SNAKE_CASE: the
    /// `ErrorInfo.reason` clients see, listed in the proto file's header.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Unavailable { .. } => "BACKEND_UNAVAILABLE",
            Self::Busy { .. } => "BACKEND_BUSY",
            Self::Overloaded { .. } => "BACKEND_OVERLOADED",
            Self::ModelNotFound { .. } => "MODEL_NOT_FOUND",
            Self::NoDefaultModel { .. } => "NO_DEFAULT_MODEL",
            Self::Rejected { .. } => "BACKEND_REJECTED",
            Self::Failed { .. } => "BACKEND_FAILED",
            Self::Protocol { .. } => "BACKEND_PROTOCOL_ERROR",
            Self::CircuitsOpen { .. } => "CIRCUITS_OPEN",
            Self::Residency { error, .. } => match error {
                ResidencyError::TooLarge { .. } => "MODEL_TOO_LARGE",
                ResidencyError::NoRoom { .. } => "MODEL_MEMORY_FULL",
                ResidencyError::LoadFailed { .. } => "MODEL_LOAD_FAILED",
                ResidencyError::InUse { .. } => "MODEL_IN_USE",
                ResidencyError::NotLoaded { .. } => "MODEL_NOT_LOADED",
            },
            Self::Unsupported { .. } => "UNSUPPORTED",
            Self::UnknownModel { .. } => "MODEL_NOT_FOUND",
        }
    }

    /// The backend itself is failing (down, erroring, speaking garbage) as
    /// opposed to refusing this request or being full: counts against its
    /// circuit breaker.
    pub fn is_outage(&self) -> bool {
        matches!(
            self,
            Self::Unavailable { .. } | Self::Failed { .. } | Self::Protocol { .. }
        )
    }

    /// Another attempt, on another backend or later on this one, may
    /// succeed: the backend is down or full. A backend's own error answer
    /// (`Failed`) may be about this request, so it is not tried again.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            Self::Unavailable { .. }
                | Self::Busy { .. }
                | Self::Overloaded { .. }
                | Self::Residency {
                    error: ResidencyError::NoRoom { .. },
                    ..
                }
        )
    }

    /// The backend cannot serve this model (it does not know it, or cannot
    /// load it) while another backend might: failover moves on to the next
    /// backend that lists the model, without counting it as a retry.
    pub fn is_about_the_model(&self) -> bool {
        matches!(
            self,
            Self::ModelNotFound { .. }
                | Self::Residency {
                    error: ResidencyError::TooLarge { .. } | ResidencyError::LoadFailed { .. },
                    ..
                }
        )
    }
}
