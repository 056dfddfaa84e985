//! Models across backends: a call naming a model goes to the first backend
//! in failover order that serves it, and fails over only between those; a
//! name no backend serves is NOT_FOUND with the closest names; a call that
//! names none gets its role's model; ListModels lists every backend's
//! models; LoadModel and UnloadModel are refused by backends that do not
//! hold models themselves (the embedded engine's residency is
//! tests/models.rs, with real models).

use std::sync::Arc;

use rigger_inference::{
    backend::{Capabilities, SchemaSupport},
    proto::{DecomposeTaskRequest, ListModelsRequest, LoadModelRequest, Task, UnloadModelRequest},
};
use tonic::Code;
use tonic_types::StatusExt;

use super::{Client, serve, until};
use crate::support::{
    collect, greedy,
    scripted::{ErrorKind, Reply, ScriptedBackend},
};

const CAPABILITIES: Capabilities = Capabilities {
    json_schema: SchemaSupport::Requested,
    seed: false,
    no_repeat: false,
    text_patterns: false,
};

/// Rigger's roles on two backends: the router's and tester's models on the
/// first, the decomposer's and enhancer's on the second.
fn roles() -> (Arc<ScriptedBackend>, Arc<ScriptedBackend>) {
    (
        ScriptedBackend::with("first", CAPABILITIES, &["phi3", "mistral"]),
        ScriptedBackend::with("second", CAPABILITIES, &["orca2", "llama3.1", "mistral"]),
    )
}

/// The backend that answered a short generation on `model`, or the error.
async fn answered_on(client: &mut Client, model: &str) -> Result<String, tonic::Status> {
    let mut request = greedy("Say hello.", 4);
    request.model = model.to_owned();
    let stream = client.generate(request).await?.into_inner();
    let generated = collect(stream).await?;
    Ok(generated.summary.meta.expect("meta").backend)
}

#[tokio::test]
async fn a_named_model_goes_to_the_first_backend_that_serves_it() {
    let (first, second) = roles();
    let server = serve(&[], &[&first, &second]).await;
    let mut client = server.client().await;
    assert_eq!(answered_on(&mut client, "phi3").await.unwrap(), "first");
    assert_eq!(answered_on(&mut client, "orca2").await.unwrap(), "second");
    assert_eq!(answered_on(&mut client, "mistral").await.unwrap(), "first");
    assert_eq!(first.requests().len(), 2);
    assert_eq!(second.requests()[0].model.as_deref(), Some("orca2"));
}

#[tokio::test]
async fn failover_moves_only_between_backends_that_serve_the_model() {
    let (first, second) = roles();
    let server = serve(&[], &[&first, &second]).await;
    let mut client = server.client().await;
    first.always(Reply::refuse(ErrorKind::Unavailable));
    assert_eq!(answered_on(&mut client, "mistral").await.unwrap(), "second");
    let down = answered_on(&mut client, "phi3").await.unwrap_err();
    assert_eq!(down.code(), Code::Unavailable, "{down:?}");
    assert!(
        second
            .requests()
            .iter()
            .all(|request| request.model.as_deref() != Some("phi3")),
        "phi3 never went to a backend that does not serve it"
    );
}

#[tokio::test]
async fn a_model_no_backend_serves_is_not_found_with_the_closest_names() {
    let (first, second) = roles();
    let server = serve(&[], &[&first, &second]).await;
    let mut client = server.client().await;
    let status = answered_on(&mut client, "orca").await.unwrap_err();
    assert_eq!(status.code(), Code::NotFound, "{status:?}");
    assert!(
        status.message().contains("closest: orca2"),
        "{}",
        status.message()
    );
    let info = status.get_details_error_info().expect("ErrorInfo");
    assert_eq!(info.reason, "MODEL_NOT_FOUND");
    assert_eq!(info.metadata["model"], "orca");
    assert!(
        info.metadata["closest"].starts_with("orca2"),
        "{:?}",
        info.metadata
    );
    assert!(first.requests().is_empty() && second.requests().is_empty());
}

#[tokio::test]
async fn a_call_that_names_no_model_gets_its_roles_model() {
    let (first, second) = roles();
    let server = serve(&["--decompose-model", "orca2"], &[&first, &second]).await;
    let mut client = server.client().await;
    second.always(Reply::text([r#"{"subtasks":[]}"#]));
    let _ = client
        .decompose_task(DecomposeTaskRequest {
            task: Some(Task {
                title: "Add a health check endpoint".to_owned(),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await;
    until("the decomposition reached the decomposer's backend", || {
        let second = second.clone();
        async move { !second.requests().is_empty() }
    })
    .await;
    assert_eq!(second.requests()[0].model.as_deref(), Some("orca2"));
    assert!(
        first.requests().is_empty(),
        "the first backend serves no orca2"
    );
    assert_eq!(
        answered_on(&mut client, "").await.unwrap(),
        "first",
        "Generate has no role model here"
    );
}

#[tokio::test]
async fn list_models_lists_every_backends_models_in_failover_order() {
    let (first, second) = roles();
    let server = serve(&[], &[&first, &second]).await;
    let mut client = server.client().await;
    let listed: Vec<(String, String)> = client
        .list_models(ListModelsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .models
        .into_iter()
        .map(|model| (model.backend, model.name))
        .collect();
    let expected = [
        ("first", "phi3"),
        ("first", "mistral"),
        ("second", "orca2"),
        ("second", "llama3.1"),
        ("second", "mistral"),
    ]
    .map(|(backend, name)| (backend.to_owned(), name.to_owned()));
    assert_eq!(listed, expected);
    let only_second = client
        .list_models(ListModelsRequest {
            backend: "second".to_owned(),
        })
        .await
        .unwrap()
        .into_inner()
        .models;
    assert_eq!(only_second.len(), 3);
    let unknown = client
        .list_models(ListModelsRequest {
            backend: "vllm".to_owned(),
        })
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), Code::InvalidArgument);
    let field = &unknown
        .get_details_bad_request()
        .expect("BadRequest")
        .field_violations[0];
    assert_eq!(field.field, "backend");
}

/// UnloadModel of `model` from every backend is refused: none holds it.
async fn assert_not_loaded(client: &mut Client, model: &str) {
    let not_loaded = client
        .unload_model(UnloadModelRequest {
            model: model.to_owned(),
            backend: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(
        not_loaded.code(),
        Code::FailedPrecondition,
        "{not_loaded:?}"
    );
    assert_eq!(
        not_loaded.get_details_error_info().unwrap().reason,
        "MODEL_NOT_LOADED"
    );
}

#[tokio::test]
async fn load_and_unload_are_refused_where_a_backend_holds_no_models_itself() {
    let (first, second) = roles();
    let server = serve(&[], &[&first, &second]).await;
    let mut client = server.client().await;
    let refused = client
        .load_model(LoadModelRequest {
            model: "orca2".to_owned(),
            backend: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::Unimplemented, "{refused:?}");
    assert_eq!(
        refused.get_details_error_info().unwrap().reason,
        "UNSUPPORTED"
    );
    assert_not_loaded(&mut client, "orca2").await;
    let unnamed = client
        .load_model(LoadModelRequest::default())
        .await
        .unwrap_err();
    assert_eq!(unnamed.code(), Code::InvalidArgument);
    let unknown = client
        .load_model(LoadModelRequest {
            model: "phi4".to_owned(),
            backend: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), Code::NotFound);
}

#[tokio::test]
async fn a_backend_holding_no_models_that_cannot_list_leaves_unload_not_loaded() {
    let (first, second) = roles();
    let server = serve(&[], &[&first, &second]).await;
    let mut client = server.client().await;
    // Unable to list, it is asked to unload in case it holds the model; it
    // holds none itself, so the answer stays MODEL_NOT_LOADED.
    second.probes_fail(Some(ErrorKind::Unavailable));
    assert_not_loaded(&mut client, "orca2").await;
}
