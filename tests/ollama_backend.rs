//! The Ollama backend against the Ollama stand-in (tests/support/ollama.rs),
//! which follows Ollama's documented wire format and generates with the real
//! llama.cpp server.

mod support;

use std::{sync::atomic::Ordering, time::Duration};

use futures_util::StreamExt;
use rigger_inference::{
    config::Config,
    proto::{
        EnhanceTaskRequest, GenerateRequest, ListModelsRequest, LoadModelRequest, ModelInfo,
        SamplingOptions, Task, UnloadModelRequest, generate_response::Event,
        inference_service_client::InferenceServiceClient,
    },
};
use serde_json::json;
use support::{
    TestServer, collect, config, greedy, llama,
    ollama::{LOADED_SIZE, MODEL, OllamaStandIn},
};
use tonic::{Code, transport::Channel};
use tonic_types::StatusExt;

fn ollama_config(stand_in: &OllamaStandIn, flags: &[&str]) -> Config {
    let host = stand_in.host();
    let mut args = vec!["--backend", "ollama", "--ollama-host", &host];
    args.extend_from_slice(flags);
    config(&args)
}

async fn serve_with(stand_in: &OllamaStandIn) -> TestServer {
    TestServer::start(ollama_config(stand_in, &[])).await
}

/// Ollama's models as ListModels reports them.
async fn listed(client: &mut InferenceServiceClient<Channel>) -> Vec<ModelInfo> {
    client
        .list_models(ListModelsRequest {
            backend: "ollama".to_owned(),
        })
        .await
        .expect("ListModels")
        .into_inner()
        .models
}

async fn load(client: &mut InferenceServiceClient<Channel>) -> Result<ModelInfo, tonic::Status> {
    let response = client
        .load_model(LoadModelRequest {
            model: MODEL.to_owned(),
            backend: String::new(),
        })
        .await?;
    Ok(response.into_inner().model.expect("the loaded model"))
}

fn reason(status: &tonic::Status) -> String {
    status.get_details_error_info().expect("ErrorInfo").reason
}

#[tokio::test]
async fn generate_streams_ollama_lines_and_reports_its_statistics() {
    let stand_in = OllamaStandIn::start(&llama().openai_url()).await;
    let server = serve_with(&stand_in).await;
    let mut client = server.client().await;
    let mut stream = client
        .generate(greedy("Name a fruit.", 10))
        .await
        .expect("Generate accepted")
        .into_inner();
    let mut text = String::new();
    let mut summary = None;
    while let Some(message) = stream.next().await {
        match message.expect("no error").event.expect("event") {
            Event::Text(piece) => text.push_str(&piece),
            Event::Summary(last) => summary = Some(last),
        }
    }
    let summary = summary.expect("a summary");
    let meta = summary.meta.expect("meta");
    assert!(!text.is_empty());
    assert_eq!(meta.backend, "ollama");
    assert_eq!(meta.model, MODEL, "the first pulled model is the default");
    assert_eq!(meta.completion_tokens, 10);
    assert!(meta.prompt_tokens > 0);
    let generation = meta
        .backend_generation_time
        .expect("Ollama's eval_duration, converted");
    assert!(
        generation.seconds > 0 || generation.nanos > 1_000_000,
        "{generation:?}"
    );
    assert_eq!(stand_in.controls.completed.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn structured_tasks_work_over_ollama() {
    let stand_in = OllamaStandIn::start(&llama().openai_url()).await;
    let server = serve_with(&stand_in).await;
    let mut client = server.client().await;
    let response = client
        .enhance_task(EnhanceTaskRequest {
            task: Some(Task {
                title: "Add a logout button".into(),
                ..Default::default()
            }),
            model: MODEL.into(),
            sampling: Some(SamplingOptions {
                temperature: Some(0.0),
                seed: Some(2),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .expect("EnhanceTask over Ollama")
        .into_inner();
    let enhancement = response.enhancement.expect("enhancement");
    assert!(!enhancement.title.is_empty() && !enhancement.acceptance_criteria.is_empty());
    assert_eq!(response.meta.expect("meta").backend, "ollama");
}

#[tokio::test]
async fn a_model_ollama_has_not_pulled_is_not_found() {
    let stand_in = OllamaStandIn::start(&llama().openai_url()).await;
    let server = serve_with(&stand_in).await;
    let mut client = server.client().await;
    let status = client
        .generate(GenerateRequest {
            model: "llama3.1".into(),
            ..greedy("Hi", 4)
        })
        .await
        .expect_err("llama3.1 is not pulled");
    assert_eq!(status.code(), Code::NotFound);
    assert!(
        status.message().contains("\"llama3.1\""),
        "{}",
        status.message()
    );
}

#[tokio::test]
async fn a_busy_ollama_is_unavailable() {
    let stand_in = OllamaStandIn::start(&llama().openai_url()).await;
    stand_in.controls.busy.store(true, Ordering::SeqCst);
    let server = serve_with(&stand_in).await;
    let mut client = server.client().await;
    let status = client.generate(greedy("Hi", 4)).await.expect_err("busy");
    assert_eq!(status.code(), Code::Unavailable);
    assert!(
        status
            .message()
            .contains("maximum pending requests exceeded"),
        "{}",
        status.message()
    );
}

#[tokio::test]
async fn an_error_line_mid_stream_ends_the_stream_with_that_error() {
    let stand_in = OllamaStandIn::start(&llama().openai_url()).await;
    stand_in.controls.fail_after.store(3, Ordering::SeqCst);
    let server = serve_with(&stand_in).await;
    let mut client = server.client().await;
    let mut stream = client
        .generate(greedy("Tell a story.", 30))
        .await
        .unwrap()
        .into_inner();
    let mut texts = 0;
    let status = loop {
        match stream
            .next()
            .await
            .expect("the stream ends with an error, not silently")
        {
            Ok(message) => match message.event.expect("event") {
                Event::Text(_) => texts += 1,
                Event::Summary(summary) => panic!("no summary after an error: {summary:?}"),
            },
            Err(status) => break status,
        }
    };
    assert_eq!(texts, 3, "the text before the error is delivered");
    assert_eq!(status.code(), Code::Internal);
    assert!(
        status
            .message()
            .contains("error was encountered while running the model"),
        "{}",
        status.message()
    );
}

#[tokio::test]
async fn a_client_that_goes_away_drops_the_request_to_ollama() {
    let stand_in = OllamaStandIn::start(&llama().openai_url()).await;
    let server = serve_with(&stand_in).await;
    let mut client = server.client().await;
    let mut stream = client
        .generate(greedy("Write a long essay about rivers.", 2000))
        .await
        .unwrap()
        .into_inner();
    assert!(
        matches!(stream.next().await, Some(Ok(_))),
        "generation started"
    );
    drop(stream);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while stand_in.controls.abandoned.load(Ordering::SeqCst) == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the /api/chat request was not dropped"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(stand_in.controls.completed.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn load_model_makes_the_model_resident_with_the_memory_ollama_reports() {
    let stand_in = OllamaStandIn::start(&llama().openai_url()).await;
    let server = serve_with(&stand_in).await;
    let mut client = server.client().await;
    let before = listed(&mut client).await;
    assert_eq!(before.len(), 1, "{before:?}");
    assert_eq!(before[0].name, MODEL);
    assert_eq!(before[0].residence, None, "nothing loaded yet");

    let loaded = load(&mut client).await.expect("LoadModel over Ollama");
    assert_eq!(loaded.backend, "ollama");
    assert_eq!(
        loaded.residence.expect("resident").memory_bytes,
        LOADED_SIZE
    );
    let after = listed(&mut client).await;
    let residence = after[0].residence.expect("listed as resident");
    assert_eq!(
        residence.memory_bytes, LOADED_SIZE,
        "the size /api/ps gives"
    );
    assert!(!residence.loading && !residence.pinned, "{residence:?}");
    assert_eq!(
        stand_in.controls.generate_bodies(),
        [json!({ "model": MODEL })],
        "a load is /api/generate naming the model, without a prompt"
    );
}

#[tokio::test]
async fn unload_model_sends_keep_alive_zero_and_frees_the_model() {
    let stand_in = OllamaStandIn::start(&llama().openai_url()).await;
    let server = serve_with(&stand_in).await;
    let mut client = server.client().await;
    load(&mut client).await.expect("LoadModel");
    let unload = UnloadModelRequest {
        model: MODEL.to_owned(),
        backend: String::new(),
    };
    let unloaded = client
        .unload_model(unload.clone())
        .await
        .expect("UnloadModel over Ollama")
        .into_inner();
    assert_eq!(unloaded.backends, ["ollama"], "the backend holding it");
    assert_eq!(listed(&mut client).await[0].residence, None);
    assert_eq!(
        stand_in.controls.generate_bodies(),
        [
            json!({ "model": MODEL }),
            json!({ "model": MODEL, "keep_alive": 0 })
        ]
    );

    for request in [
        unload.clone(),
        UnloadModelRequest {
            backend: "ollama".to_owned(),
            ..unload
        },
    ] {
        let again = client.unload_model(request).await.unwrap_err();
        assert_eq!(again.code(), Code::FailedPrecondition, "{again:?}");
        assert_eq!(reason(&again), "MODEL_NOT_LOADED");
    }
    assert_eq!(
        stand_in.controls.generate_bodies().len(),
        2,
        "a model Ollama does not hold is not sent an unload"
    );
}

#[tokio::test]
async fn load_model_sends_the_configured_keep_alive() {
    let stand_in = OllamaStandIn::start(&llama().openai_url()).await;
    let server = TestServer::start(ollama_config(&stand_in, &["--ollama-keep-alive", "10m"])).await;
    let mut client = server.client().await;
    load(&mut client).await.expect("LoadModel");
    assert_eq!(
        stand_in.controls.generate_bodies(),
        [json!({ "model": MODEL, "keep_alive": "10m" })]
    );
}

#[tokio::test]
async fn under_keep_alive_zero_a_loaded_model_stays_until_its_next_call() {
    let stand_in = OllamaStandIn::start(&llama().openai_url()).await;
    let server = TestServer::start(ollama_config(&stand_in, &["--ollama-keep-alive", "0"])).await;
    let mut client = server.client().await;
    load(&mut client).await.expect("LoadModel");
    assert_eq!(
        stand_in.controls.generate_bodies(),
        [json!({ "model": MODEL })],
        "a zero keep_alive with no prompt would unload at once"
    );
    assert!(listed(&mut client).await[0].residence.is_some());
    let stream = client.generate(greedy("Hi", 2)).await.unwrap().into_inner();
    collect(stream).await.expect("a generation");
    assert_eq!(
        listed(&mut client).await[0].residence,
        None,
        "the call's keep_alive of zero unloads it"
    );
}

#[tokio::test]
async fn loading_a_model_ollama_no_longer_has_is_not_found() {
    let stand_in = OllamaStandIn::start(&llama().openai_url()).await;
    let mut config = ollama_config(&stand_in, &[]);
    // The service keeps the listing from before the removal, so the load
    // reaches Ollama and meets its 404.
    config.probe_interval = Duration::from_secs(3600);
    let server = TestServer::start(config).await;
    let mut client = server.client().await;
    stand_in.controls.removed.store(true, Ordering::SeqCst);
    let status = load(&mut client).await.unwrap_err();
    assert_eq!(status.code(), Code::NotFound, "{status:?}");
    assert_eq!(reason(&status), "MODEL_NOT_FOUND");
    assert!(status.message().contains(MODEL), "{}", status.message());
    assert_eq!(
        stand_in.controls.generate_bodies(),
        [json!({ "model": MODEL })]
    );
}

#[tokio::test]
async fn load_and_unload_on_an_ollama_that_is_down_are_unavailable() {
    let stand_in = OllamaStandIn::start(&llama().openai_url()).await;
    let server = serve_with(&stand_in).await;
    let mut client = server.client().await;
    stand_in.stop().await;
    let loading = load(&mut client).await.unwrap_err();
    assert_eq!(loading.code(), Code::Unavailable, "{loading:?}");
    assert_eq!(reason(&loading), "BACKEND_UNAVAILABLE");
    for backend in ["", "ollama"] {
        let unloading = client
            .unload_model(UnloadModelRequest {
                model: MODEL.to_owned(),
                backend: backend.to_owned(),
            })
            .await
            .unwrap_err();
        assert_eq!(
            unloading.code(),
            Code::Unavailable,
            "not MODEL_NOT_LOADED: Ollama could not be asked ({unloading:?})"
        );
    }
}
