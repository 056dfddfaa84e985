//! The one place where errors become gRPC statuses: a code, a message for
//! people, and gRPC's standard error details (google.rpc) for programs, so
//! that a client of any language reads them with its gRPC library rather
//! than parsing messages.
//!
//! - INVALID_ARGUMENT carries `BadRequest`: the field path and what is wrong.
//! - RESOURCE_EXHAUSTED carries `RetryInfo` (and the `retry-after` trailer
//!   that HTTP-minded clients read).
//! - Every other status, and a full queue too, carries `ErrorInfo`: a stable
//!   SCREAMING_SNAKE reason in the [`ERROR_DOMAIN`] domain, with metadata
//!   such as the backend, model or endpoint. A task answer that broke a rule
//!   has the rule's name as its reason (and in the `rigger-violation`
//!   trailer).
//!
//! The reasons are part of the API: the proto file's header and the README
//! list them all (a test checks it), and a test finds statuses built
//! anywhere else in the crate.

use std::{collections::HashMap, time::Duration};

use tonic::{
    Code, Status,
    metadata::{MetadataMap, MetadataValue},
};
use tonic_types::{ErrorDetails, FieldViolation, StatusExt};

use super::validate::ValidationError;
use crate::{
    backend::{BackendError, ResidencyError},
    task::TaskError,
};

/// Trailer giving the seconds after which a refused call may succeed, as
/// HTTP's Retry-After (also in the status's `RetryInfo`).
pub const RETRY_AFTER: &str = "retry-after";

/// The `ErrorInfo.domain` of every status this service sends.
pub const ERROR_DOMAIN: &str = "rigger.inference.v1";

/// Trailer naming the rule an answer that stayed invalid broke last.
pub const VIOLATION_TRAILER: &str = "rigger-violation";

/// Why the service itself, rather than a backend or a task rule, refused or
/// ended a call: the `ErrorInfo.reason` of those statuses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    /// UNAVAILABLE: the backends are still being selected or the model loaded.
    Starting,
    /// UNAVAILABLE: the server is draining after SIGTERM.
    ShuttingDown,
    /// UNAVAILABLE: admission stopped while the call waited in the queue.
    AdmissionClosed,
    /// RESOURCE_EXHAUSTED: every slot runs and the queue is full.
    QueueFull,
    /// DEADLINE_EXCEEDED: the call's deadline passed; its backend work stopped.
    DeadlineExceeded,
    /// INTERNAL: Generate's output does not satisfy the caller's json_schema.
    OutputSchemaViolated,
    /// INTERNAL: the backend ended a generation without completing it.
    GenerationIncomplete,
    /// UNAUTHENTICATED: no bearer token.
    MissingToken,
    /// UNAUTHENTICATED: a bearer token that is not the one configured.
    InvalidToken,
    /// NOT_FOUND: a health check for a service this server does not know.
    UnknownService,
}

impl Reason {
    pub fn name(self) -> &'static str {
        match self {
            Self::Starting => "STARTING",
            Self::ShuttingDown => "SHUTTING_DOWN",
            Self::AdmissionClosed => "ADMISSION_CLOSED",
            Self::QueueFull => "QUEUE_FULL",
            Self::DeadlineExceeded => "DEADLINE_EXCEEDED",
            Self::OutputSchemaViolated => "OUTPUT_SCHEMA_VIOLATED",
            Self::GenerationIncomplete => "GENERATION_INCOMPLETE",
            Self::MissingToken => "MISSING_TOKEN",
            Self::InvalidToken => "INVALID_TOKEN",
            Self::UnknownService => "UNKNOWN_SERVICE",
        }
    }
}

/// `ErrorInfo` details with `reason` and `metadata` in this service's domain.
fn error_info<'a>(
    reason: &str,
    metadata: impl IntoIterator<Item = (&'a str, String)>,
) -> ErrorDetails {
    let metadata: HashMap<String, String> = metadata
        .into_iter()
        .map(|(key, value)| (key.to_owned(), value))
        .collect();
    ErrorDetails::with_error_info(reason, ERROR_DOMAIN, metadata)
}

/// A status of the service's own making, with its reason.
fn refusal<'a>(
    code: Code,
    reason: Reason,
    message: impl Into<String>,
    metadata: impl IntoIterator<Item = (&'a str, String)>,
) -> Status {
    Status::with_error_details(code, message, error_info(reason.name(), metadata))
}

impl From<ValidationError> for Status {
    fn from(error: ValidationError) -> Self {
        let details = ErrorDetails::with_bad_request(vec![FieldViolation::new(
            error.field.clone(),
            error.reason.clone(),
        )]);
        Status::with_error_details(Code::InvalidArgument, error.to_string(), details)
    }
}

impl From<BackendError> for Status {
    fn from(error: BackendError) -> Self {
        let code = match &error {
            BackendError::Unavailable { .. }
            | BackendError::Busy { .. }
            | BackendError::CircuitsOpen { .. } => Code::Unavailable,
            BackendError::Overloaded { .. } => Code::ResourceExhausted,
            BackendError::ModelNotFound { .. } | BackendError::UnknownModel { .. } => {
                Code::NotFound
            }
            BackendError::Residency { error, .. } => match error {
                ResidencyError::TooLarge { .. } | ResidencyError::NoRoom { .. } => {
                    Code::ResourceExhausted
                }
                ResidencyError::LoadFailed { .. }
                | ResidencyError::InUse { .. }
                | ResidencyError::NotLoaded { .. } => Code::FailedPrecondition,
            },
            BackendError::Unsupported { .. } => Code::Unimplemented,
            BackendError::NoDefaultModel { .. } => Code::FailedPrecondition,
            BackendError::Rejected { .. } => Code::InvalidArgument,
            BackendError::Failed { .. } | BackendError::Protocol { .. } => Code::Internal,
        };
        let metadata = match &error {
            BackendError::Unavailable {
                backend, endpoint, ..
            } => vec![
                ("backend", backend.to_string()),
                ("endpoint", endpoint.clone()),
            ],
            BackendError::ModelNotFound { backend, model } => {
                vec![("backend", backend.to_string()), ("model", model.clone())]
            }
            BackendError::Busy { backend, .. }
            | BackendError::Overloaded { backend, .. }
            | BackendError::NoDefaultModel { backend }
            | BackendError::Rejected { backend, .. }
            | BackendError::Failed { backend, .. }
            | BackendError::Protocol { backend, .. } => vec![("backend", backend.to_string())],
            BackendError::CircuitsOpen { circuits } => vec![("circuits", circuits.clone())],
            BackendError::Residency { backend, error } => {
                residency_metadata(error, backend.to_string())
            }
            BackendError::Unsupported { backend, .. } => vec![("backend", backend.to_string())],
            BackendError::UnknownModel { model, closest } => {
                vec![("model", model.clone()), ("closest", closest.join(","))]
            }
        };
        let mut details = error_info(error.reason(), metadata);
        // A full engine frees up as its generations end, at a pace only
        // the engine knows: retrying is right, when is the client's guess.
        // A model larger than the whole budget never fits: no retry.
        let never_fits = matches!(
            error,
            BackendError::Residency {
                error: ResidencyError::TooLarge { .. },
                ..
            }
        );
        if code == Code::ResourceExhausted && !never_fits {
            details.set_retry_info(None);
        }
        Status::with_error_details(code, error.to_string(), details)
    }
}

/// A residency error's metadata: the backend, the model and, where the
/// refusal is about memory, the bytes asked and the bytes there are.
fn residency_metadata(error: &ResidencyError, backend: String) -> Vec<(&'static str, String)> {
    let mut metadata = vec![("backend", backend)];
    match error {
        ResidencyError::TooLarge {
            model,
            needed,
            budget,
        } => metadata.extend([
            ("model", model.clone()),
            ("needed_bytes", needed.to_string()),
            ("budget_bytes", budget.to_string()),
        ]),
        ResidencyError::NoRoom { model, needed, .. } => metadata.extend([
            ("model", model.clone()),
            ("needed_bytes", needed.to_string()),
        ]),
        ResidencyError::LoadFailed { model, .. } | ResidencyError::NotLoaded { model } => {
            metadata.push(("model", model.clone()))
        }
        ResidencyError::InUse { model, calls } => {
            metadata.extend([("model", model.clone()), ("calls", calls.to_string())])
        }
    }
    metadata
}

impl From<TaskError> for Status {
    fn from(error: TaskError) -> Self {
        match error {
            TaskError::Backend(error) => error.into(),
            TaskError::InvalidAnswer {
                attempts,
                ref violation,
            } => {
                let rule = violation.rule.name();
                let details = error_info(
                    &rule.to_ascii_uppercase(),
                    [
                        ("rule", rule.to_owned()),
                        ("attempts", attempts.to_string()),
                        ("detail", violation.detail.clone()),
                    ],
                );
                let mut trailers = MetadataMap::new();
                trailers.insert(VIOLATION_TRAILER, MetadataValue::from_static(rule));
                Status::with_error_details_and_metadata(
                    Code::Internal,
                    error.to_string(),
                    details,
                    trailers,
                )
            }
        }
    }
}

/// A call that arrives while the backends are still being selected or the
/// embedded model loads.
pub(super) fn starting() -> Status {
    refusal(
        Code::Unavailable,
        Reason::Starting,
        "rigger-inference is starting: its backend is being selected or its model loaded; retry shortly",
        [],
    )
}

/// A call that arrives while the server drains.
pub(super) fn shutting_down() -> Status {
    refusal(
        Code::Unavailable,
        Reason::ShuttingDown,
        "rigger-inference is shutting down; retry on another replica",
        [],
    )
}

/// A queued call whose admission went away before a slot freed up.
pub(super) fn admission_closed() -> Status {
    refusal(
        Code::Unavailable,
        Reason::AdmissionClosed,
        "the service stopped admitting calls",
        [],
    )
}

/// A call refused because `in_flight` calls run and `queued` wait, with when
/// a slot is likely to free up, as `RetryInfo` and as the `retry-after`
/// trailer (whole seconds).
pub(super) fn queue_full(in_flight: usize, queued: usize, retry_after: Duration) -> Status {
    let seconds = retry_after.as_secs();
    let mut details = ErrorDetails::with_retry_info(Some(retry_after));
    details.set_error_info(
        Reason::QueueFull.name(),
        ERROR_DOMAIN,
        HashMap::from([
            ("in_flight".to_owned(), in_flight.to_string()),
            ("queued".to_owned(), queued.to_string()),
        ]),
    );
    let mut trailers = MetadataMap::new();
    trailers.insert(RETRY_AFTER, MetadataValue::from(seconds));
    Status::with_error_details_and_metadata(
        Code::ResourceExhausted,
        format!(
            "{in_flight} calls are running and {queued} waiting, the most allowed; retry in about {seconds} s"
        ),
        details,
        trailers,
    )
}

/// A call whose deadline, `budget` after it arrived, passed.
pub(super) fn deadline_exceeded(budget: Duration) -> Status {
    refusal(
        Code::DeadlineExceeded,
        Reason::DeadlineExceeded,
        format!("the call's deadline ({budget:?}) passed; its backend work was stopped"),
        [("deadline_ms", budget.as_millis().to_string())],
    )
}

/// A streamed output of `backend` that does not satisfy the caller's JSON
/// Schema.
pub(super) fn schema_violation(backend: &str, problem: &str) -> Status {
    refusal(
        Code::Internal,
        Reason::OutputSchemaViolated,
        format!("generated output does not satisfy json_schema: {problem}"),
        [("backend", backend.to_owned())],
    )
}

/// A generation `backend` ended without its completion.
pub(super) fn incomplete_generation(backend: &str) -> Status {
    refusal(
        Code::Internal,
        Reason::GenerationIncomplete,
        format!("backend {backend} ended the generation without completing it"),
        [("backend", backend.to_owned())],
    )
}

/// A call without the bearer token authentication asks for.
pub(super) fn missing_token() -> Status {
    refusal(
        Code::Unauthenticated,
        Reason::MissingToken,
        "missing `authorization: Bearer <token>` metadata",
        [],
    )
}

/// A call with a bearer token that is not the configured one (which no
/// status names).
pub(super) fn invalid_token() -> Status {
    refusal(
        Code::Unauthenticated,
        Reason::InvalidToken,
        "invalid bearer token",
        [],
    )
}

/// A health check for a service this server does not know: NOT_FOUND, as the
/// health protocol asks.
pub(super) fn unknown_service(service: &str) -> Status {
    refusal(
        Code::NotFound,
        Reason::UnknownService,
        format!("unknown service {service:?}"),
        [("service", service.to_owned())],
    )
}

#[cfg(test)]
mod tests {
    use std::{iter::successors, path::Path};

    use super::*;
    use crate::task::{Rule, Violation};

    /// Every reason of the service's own. A new variant does not compile
    /// until it is put in the chain.
    fn reasons() -> Vec<Reason> {
        successors(Some(Reason::Starting), |reason| match reason {
            Reason::Starting => Some(Reason::ShuttingDown),
            Reason::ShuttingDown => Some(Reason::AdmissionClosed),
            Reason::AdmissionClosed => Some(Reason::QueueFull),
            Reason::QueueFull => Some(Reason::DeadlineExceeded),
            Reason::DeadlineExceeded => Some(Reason::OutputSchemaViolated),
            Reason::OutputSchemaViolated => Some(Reason::GenerationIncomplete),
            Reason::GenerationIncomplete => Some(Reason::MissingToken),
            Reason::MissingToken => Some(Reason::InvalidToken),
            Reason::InvalidToken => Some(Reason::UnknownService),
            Reason::UnknownService => None,
        })
        .collect()
    }

    /// One backend error of every kind, chained as [`reasons`] are.
    fn backend_errors() -> Vec<BackendError> {
        let first = BackendError::Unavailable {
            backend: "ollama",
            endpoint: "http://127.0.0.1:11434".to_owned(),
            reason: "connection refused".to_owned(),
        };
        let reason = || "why".to_owned();
        successors(Some(first), |error| match error {
            BackendError::Unavailable { backend, .. } => Some(BackendError::Busy {
                backend,
                reason: reason(),
            }),
            BackendError::Busy { backend, .. } => Some(BackendError::Overloaded {
                backend,
                reason: reason(),
            }),
            BackendError::Overloaded { backend, .. } => Some(BackendError::ModelNotFound {
                backend,
                model: "no-such-model".to_owned(),
            }),
            BackendError::ModelNotFound { backend, .. } => {
                Some(BackendError::NoDefaultModel { backend })
            }
            BackendError::NoDefaultModel { backend } => Some(BackendError::Rejected {
                backend,
                reason: reason(),
            }),
            BackendError::Rejected { backend, .. } => Some(BackendError::Failed {
                backend,
                reason: reason(),
            }),
            BackendError::Failed { backend, .. } => Some(BackendError::Protocol {
                backend,
                reason: reason(),
            }),
            BackendError::Protocol { .. } => Some(BackendError::CircuitsOpen {
                circuits: "ollama open".to_owned(),
            }),
            BackendError::CircuitsOpen { .. } => None,
            // Reached from `residency_errors`; `UnknownModel` shares
            // MODEL_NOT_FOUND with `ModelNotFound` on purpose.
            BackendError::Residency { .. }
            | BackendError::Unsupported { .. }
            | BackendError::UnknownModel { .. } => None,
        })
        .chain(residency_errors())
        .chain([BackendError::Unsupported {
            backend: "ollama",
            operation: "loading a model on request",
        }])
        .collect()
    }

    /// One residency refusal of every kind.
    fn residency_errors() -> Vec<BackendError> {
        let model = || "m".to_owned();
        [
            ResidencyError::TooLarge {
                model: model(),
                needed: 2,
                budget: 1,
            },
            ResidencyError::NoRoom {
                model: model(),
                needed: 1,
                why: "in use".to_owned(),
            },
            ResidencyError::LoadFailed {
                model: model(),
                reason: "bad file".to_owned(),
            },
            ResidencyError::InUse {
                model: model(),
                calls: 1,
            },
            ResidencyError::NotLoaded { model: model() },
        ]
        .into_iter()
        .map(|error| BackendError::Residency {
            backend: "embedded",
            error,
        })
        .collect()
    }

    fn every_reason() -> Vec<String> {
        let own = reasons().into_iter().map(|reason| reason.name().to_owned());
        let backend = backend_errors()
            .into_iter()
            .map(|error| error.reason().to_owned());
        let rules = Rule::ALL
            .iter()
            .map(|rule| rule.name().to_ascii_uppercase());
        own.chain(backend).chain(rules).collect()
    }

    fn repo_file(relative: &str) -> String {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(relative);
        std::fs::read_to_string(&path).unwrap_or_else(|error| panic!("{path:?}: {error}"))
    }

    #[test]
    fn every_reason_is_listed_in_the_proto_header_and_the_readme() {
        let proto = repo_file("proto/rigger/inference/v1/inference.proto");
        let header: String = proto
            .lines()
            .take_while(|line| line.starts_with("//") || line.is_empty())
            .collect();
        let readme = repo_file("README.md");
        let reasons = every_reason();
        let mut unique = reasons.clone();
        unique.sort();
        unique.dedup();
        assert_eq!(unique.len(), reasons.len(), "reasons are distinct");
        for reason in reasons {
            let listed = format!("`{reason}`");
            assert!(header.contains(&listed), "{reason} in the proto header");
            assert!(readme.contains(&listed), "{reason} in the README");
        }
    }

    /// The associated functions of `Status` that read a status rather than
    /// build one.
    const READERS: &[&str] = &["code", "message", "details", "metadata", "metadata_mut"];

    /// `Status::<name>` paths in `source` that build a status.
    fn constructors(source: &str) -> Vec<String> {
        source
            .match_indices("Status::")
            .filter(|(at, _)| {
                source[..*at]
                    .chars()
                    .next_back()
                    .is_none_or(|before| !(before.is_alphanumeric() || before == '_'))
            })
            .map(|(at, path)| {
                source[at + path.len()..]
                    .chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_')
                    .collect::<String>()
            })
            .filter(|name| !READERS.contains(&name.as_str()))
            .collect()
    }

    fn rust_files(dir: &Path, found: &mut Vec<std::path::PathBuf>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                rust_files(&path, found);
            } else if path.extension().is_some_and(|extension| extension == "rs") {
                found.push(path);
            }
        }
    }

    #[test]
    fn statuses_are_built_here_and_nowhere_else_in_the_crate() {
        let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        let this = source.join("server/status.rs");
        let mut files = Vec::new();
        rust_files(&source, &mut files);
        assert!(files.contains(&this), "the walk reads every module");
        let stray: Vec<String> = files
            .iter()
            .filter(|path| **path != this)
            .flat_map(|path| {
                let text = std::fs::read_to_string(path).unwrap();
                constructors(&text)
                    .into_iter()
                    .map(move |name| format!("{}: Status::{name}", path.display()))
            })
            .collect();
        assert!(stray.is_empty(), "build these in status.rs: {stray:#?}");
        // The search itself finds what it looks for.
        let here = constructors(&std::fs::read_to_string(&this).unwrap());
        assert!(here.contains(&"with_error_details".to_owned()), "{here:?}");
        assert_eq!(
            constructors("Err(tonic::Status::internal(x)); ServingStatus::Serving; Status::code"),
            ["internal"]
        );
    }

    #[test]
    fn each_kind_carries_its_standard_details() {
        let invalid = Status::from(ValidationError {
            field: "task.title".to_owned(),
            reason: "is empty".to_owned(),
        });
        assert_eq!(invalid.code(), Code::InvalidArgument);
        assert_eq!(invalid.message(), "invalid task.title: is empty");
        let violations = invalid.get_details_bad_request().unwrap().field_violations;
        assert_eq!(
            (
                violations[0].field.as_str(),
                violations[0].description.as_str()
            ),
            ("task.title", "is empty")
        );

        let full = queue_full(1, 0, Duration::from_secs(3));
        assert_eq!(full.code(), Code::ResourceExhausted);
        assert_eq!(
            full.get_details_retry_info().unwrap().retry_delay,
            Some(Duration::from_secs(3))
        );
        assert_eq!(full.metadata().get(RETRY_AFTER).unwrap(), "3");
        assert_eq!(full.get_details_error_info().unwrap().reason, "QUEUE_FULL");

        let broken = Status::from(TaskError::InvalidAnswer {
            attempts: 3,
            violation: Violation::new(Rule::SubtaskCount, "2 subtasks, 3 asked"),
        });
        assert_eq!(broken.code(), Code::Internal);
        assert_eq!(
            broken.metadata().get(VIOLATION_TRAILER).unwrap(),
            "subtask_count"
        );
        let info = broken.get_details_error_info().unwrap();
        assert_eq!(
            (info.reason.as_str(), info.domain.as_str()),
            ("SUBTASK_COUNT", ERROR_DOMAIN)
        );
        assert_eq!(info.metadata["attempts"], "3");

        for error in backend_errors() {
            let reason = error.reason();
            let status = Status::from(error);
            let info = status.get_details_error_info().unwrap();
            assert_eq!(
                (info.reason.as_str(), info.domain.as_str()),
                (reason, ERROR_DOMAIN)
            );
            assert!(!info.metadata.is_empty(), "{reason} names what failed");
            assert_eq!(
                status.get_details_retry_info().is_some(),
                status.code() == Code::ResourceExhausted && reason != "MODEL_TOO_LARGE",
                "{reason}: a model larger than the budget never fits"
            );
        }
    }
}
