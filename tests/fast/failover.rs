//! Failover and circuits: a call moves to the next backend when the one it
//! tried is down or full before the first token, and never once text has
//! reached the client; errors about the request are not retried; outages
//! open a backend's circuit (calls skip it), a trial after the cooldown
//! closes it again; GetStatus shows all of it.

use std::sync::Arc;

use rigger_inference::{
    backend::{Capabilities, SchemaSupport},
    proto::{self, CircuitState, GenerateRequest, SchemaSupport as WireSchemaSupport},
};
use tonic::Code;

use super::{answered_by_backend, backend_status, serve, status, until};
use crate::support::{
    collect, generate, greedy,
    scripted::{End, ErrorKind, Reply, ScriptedBackend},
};

/// Two backends in failover order.
fn pair() -> (Arc<ScriptedBackend>, Arc<ScriptedBackend>) {
    (
        ScriptedBackend::new("first"),
        ScriptedBackend::new("second"),
    )
}

/// What an error before the first token does to a call.
struct Case {
    kind: ErrorKind,
    /// `None`: the next backend answers; else the call fails with it.
    code: Option<Code>,
    /// Whether it counts against the backend's circuit.
    outage: bool,
}

const CASES: [Case; 9] = [
    Case {
        kind: ErrorKind::Unavailable,
        code: None,
        outage: true,
    },
    Case {
        kind: ErrorKind::Busy,
        code: None,
        outage: false,
    },
    Case {
        kind: ErrorKind::Overloaded,
        code: None,
        outage: false,
    },
    Case {
        kind: ErrorKind::Failed,
        code: Some(Code::Internal),
        outage: true,
    },
    Case {
        kind: ErrorKind::Protocol,
        code: Some(Code::Internal),
        outage: true,
    },
    Case {
        kind: ErrorKind::ModelNotFound,
        code: Some(Code::NotFound),
        outage: false,
    },
    Case {
        kind: ErrorKind::NoDefaultModel,
        code: Some(Code::FailedPrecondition),
        outage: false,
    },
    Case {
        kind: ErrorKind::Rejected,
        code: Some(Code::InvalidArgument),
        outage: false,
    },
    Case {
        kind: ErrorKind::CircuitsOpen,
        code: Some(Code::Unavailable),
        outage: false,
    },
];

#[tokio::test]
async fn each_error_before_the_first_token_moves_the_call_on_or_ends_it() {
    for case in &CASES {
        for (how, reply) in [
            ("refused", Reply::refuse(case.kind)),
            ("failed first", Reply::fail_first(case.kind)),
        ] {
            let (first, second) = pair();
            first.next(reply);
            let server = serve(&[], &[&first, &second]).await;
            let mut client = server.client().await;
            let outcome = generate(&mut client, greedy("Hi", 4)).await;
            let what = format!("{:?} {how}", case.kind);
            match case.code {
                None => {
                    let answer = outcome.unwrap_or_else(|status| panic!("{what}: {status:?}"));
                    assert_eq!(
                        answer.summary.meta.expect("meta").backend,
                        "second",
                        "{what}"
                    );
                }
                Some(code) => {
                    let status = outcome.expect_err(&what);
                    assert_eq!(status.code(), code, "{what}: {status:?}");
                    assert!(second.requests().is_empty(), "{what}: not retried");
                }
            }
            let entry = backend_status(&mut client, "first").await;
            assert_eq!(entry.failures, u64::from(case.outage), "{what}");
            assert_eq!(entry.retried, u64::from(case.code.is_none()), "{what}");
        }
    }
}

#[tokio::test]
async fn nothing_is_retried_once_text_reached_the_client() {
    let (first, second) = pair();
    first.next(Reply::text(["Once", " upon"]).then(End::Fail(ErrorKind::Unavailable)));
    let server = serve(&[], &[&first, &second]).await;
    let mut client = server.client().await;
    let mut stream = client
        .generate(greedy("A story", 8))
        .await
        .expect("starts")
        .into_inner();
    let mut text = String::new();
    let status = loop {
        match futures_util::StreamExt::next(&mut stream)
            .await
            .expect("ends with an error, not silently")
        {
            Ok(proto::GenerateResponse {
                event: Some(proto::generate_response::Event::Text(piece)),
            }) => text.push_str(&piece),
            Ok(other) => panic!("no answer after the failure: {other:?}"),
            Err(status) => break status,
        }
    };
    assert_eq!(text, "Once upon", "the text before the failure arrives");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(
        second.requests().is_empty(),
        "the caller would see text twice"
    );
    let entry = backend_status(&mut client, "first").await;
    assert_eq!((entry.failures, entry.retried), (1, 0));
}

#[tokio::test]
async fn a_model_no_backend_lists_is_refused_before_any_backend_is_asked() {
    let (first, second) = pair();
    let server = serve(&[], &[&first, &second]).await;
    let mut client = server.client().await;
    let request = GenerateRequest {
        model: "model-z".into(),
        ..greedy("Hi", 4)
    };
    let status = generate(&mut client, request)
        .await
        .expect_err("nobody serves it");
    assert_eq!(status.code(), Code::NotFound, "{status:?}");
    assert!(first.requests().is_empty() && second.requests().is_empty());
    let served = GenerateRequest {
        model: "model-b".into(),
        ..greedy("Hi", 4)
    };
    let answer = generate(&mut client, served).await.expect("served");
    assert_eq!(answer.summary.meta.expect("meta").model, "model-b");
    assert_eq!(first.requests()[0].model.as_deref(), Some("model-b"));
}

#[tokio::test]
async fn a_backend_whose_listing_was_stale_passes_the_call_to_the_next_that_lists_the_model() {
    let (first, second) = pair();
    first.next(Reply::refuse(ErrorKind::ModelNotFound));
    let server = serve(&[], &[&first, &second]).await;
    let mut client = server.client().await;
    let request = GenerateRequest {
        model: "model-b".into(),
        ..greedy("Hi", 4)
    };
    let answer = generate(&mut client, request).await.expect("served");
    assert_eq!(answer.summary.meta.expect("meta").backend, "second");
    let entry = backend_status(&mut client, "first").await;
    assert_eq!(
        (entry.failures, entry.retried),
        (0, 0),
        "not an outage, not a retry"
    );
}

#[tokio::test]
async fn a_circuit_opens_on_outages_half_opens_after_its_cooldown_and_closes_on_a_trial() {
    let (first, second) = pair();
    first.always(Reply::refuse(ErrorKind::Unavailable));
    let server = serve(
        &["--breaker-failures", "2", "--breaker-cooldown", "500ms"],
        &[&first, &second],
    )
    .await;
    let mut client = server.client().await;

    assert_eq!(answered_by_backend(&mut client).await, "second");
    let entry = backend_status(&mut client, "first").await;
    assert_eq!(entry.circuit(), CircuitState::Closed, "one failure of two");
    assert_eq!(entry.consecutive_failures, 1);
    assert_eq!(answered_by_backend(&mut client).await, "second");
    let report = status(&mut client).await;
    assert_eq!(report.backends[0].circuit(), CircuitState::Open);
    assert_eq!(report.active_backend, "second");
    assert!(!report.backends[0].active && report.backends[1].active);

    assert_eq!(answered_by_backend(&mut client).await, "second");
    assert_eq!(
        first.requests().len(),
        2,
        "an open circuit is skipped, not tried"
    );

    first.always(Reply::text(["Hi"]));
    until("the cooldown ends", || {
        let mut client = client.clone();
        async move {
            backend_status(&mut client, "first").await.circuit() == CircuitState::HalfOpen
        }
    })
    .await;
    assert_eq!(
        answered_by_backend(&mut client).await,
        "first",
        "the trial call"
    );
    let report = status(&mut client).await;
    assert_eq!(report.backends[0].circuit(), CircuitState::Closed);
    assert_eq!(report.backends[0].consecutive_failures, 0);
    assert_eq!(report.backends[0].failures, 2);
    assert_eq!(report.active_backend, "first");
}

#[tokio::test]
async fn with_every_circuit_open_calls_are_unavailable_at_once() {
    let only = ScriptedBackend::new("only");
    only.always(Reply::refuse(ErrorKind::Unavailable));
    let server = serve(&["--breaker-failures", "1"], &[&only]).await;
    let mut client = server.client().await;
    let status = generate(&mut client, greedy("Hi", 4))
        .await
        .expect_err("down");
    assert_eq!(status.code(), Code::Unavailable);
    let status = generate(&mut client, greedy("Hi", 4))
        .await
        .expect_err("open");
    assert_eq!(status.code(), Code::Unavailable);
    assert!(status.message().contains("only is open for"), "{status:?}");
    assert_eq!(
        only.requests().len(),
        1,
        "the open circuit kept the call away"
    );
}

#[tokio::test]
async fn get_status_reports_each_backends_models_and_capabilities() {
    let first = ScriptedBackend::with(
        "first",
        Capabilities {
            no_repeat: true,
            text_patterns: true,
            json_schema: SchemaSupport::Requested,
            seed: false,
        },
        &["small", "large"],
    );
    let second = ScriptedBackend::new("second");
    let server = serve(&[], &[&first, &second]).await;
    let mut client = server.client().await;
    until("the first probe", || {
        let mut client = client.clone();
        async move { !backend_status(&mut client, "first").await.models.is_empty() }
    })
    .await;
    let report = status(&mut client).await;
    assert_eq!(report.active_backend, "first");
    assert_eq!(report.model, "small", "the active backend's default");
    let entry = &report.backends[0];
    assert_eq!(entry.models, ["small", "large"]);
    assert_eq!(entry.default_model, "small");
    assert_eq!(entry.health_service, "rigger.backend.first");
    let capabilities = entry.capabilities.expect("capabilities");
    assert_eq!(capabilities.json_schema(), WireSchemaSupport::Requested);
    assert!(!capabilities.seed);
    assert!(capabilities.no_repeat);
    let second_capabilities = report.backends[1].capabilities.expect("capabilities");
    assert_eq!(
        second_capabilities.json_schema(),
        WireSchemaSupport::Enforced
    );
    assert!(!second_capabilities.no_repeat);
    let answer = collect(
        client
            .generate(greedy("Hi", 4))
            .await
            .expect("starts")
            .into_inner(),
    )
    .await
    .expect("served");
    assert_eq!(answer.summary.meta.expect("meta").model, "small");
}
