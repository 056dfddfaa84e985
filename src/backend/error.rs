//! Errors of the backend layer. The server maps them to gRPC status codes in
//! one place (`server::status`).

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
}
