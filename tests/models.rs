//! Many models on one embedded engine, with real llama.cpp models: the
//! catalog of a models directory, loading on first use, answers equal to
//! the model served alone, eviction under `--max-loaded-models` and the
//! memory budget, pins, keep-alive, a model too large or a file that does
//! not load, and the ListModels/LoadModel/UnloadModel RPCs.
//!
//! Routing by model across backends: the embedded engine's catalog beside
//! the MLX worker's and the Ollama stand-in's tags (tests/support/ollama.rs).
//!
//! Models: SmolLM2 (the default model) under three names, and the tiny
//! random-weight models of several architectures `make` writes into
//! `$RIGGER_CACHE_DIR/test-models` (scripts/tiny_gguf.py).

mod support;

use std::path::{Path, PathBuf};

use rigger_inference::proto::{
    DecomposeTaskRequest, EnhanceTaskRequest, GetStatusRequest, ListModelsRequest,
    LoadModelRequest, ModelMemory, SamplingOptions, Task, TaskContext, UnloadModelRequest,
    inference_service_client::InferenceServiceClient,
};
use support::{
    TestServer, config, generate, greedy, llama,
    ollama::{self, OllamaStandIn},
};
use tonic::{Code, transport::Channel};
use tonic_types::StatusExt;

type Client = InferenceServiceClient<Channel>;

/// The tiny models' architectures, as their files are named.
const TINY: [&str; 3] = ["tiny-llama", "tiny-qwen2", "tiny-phi3"];

fn tiny_model(name: &str) -> PathBuf {
    support::tiny_models::tiny_model(name.trim_start_matches("tiny-"))
}

/// A models directory: SmolLM2 as `smol-a`, `smol-b`, `smol-c`, the tiny
/// models, and whatever `extra` files a test adds.
fn models_dir(extra: &[(&str, &[u8])]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for name in ["smol-a", "smol-b", "smol-c"] {
        std::os::unix::fs::symlink(
            support::model_path(),
            dir.path().join(format!("{name}.gguf")),
        )
        .unwrap();
    }
    for name in TINY {
        std::os::unix::fs::symlink(tiny_model(name), dir.path().join(format!("{name}.gguf")))
            .unwrap();
    }
    for (name, bytes) in extra {
        std::fs::write(dir.path().join(name), bytes).unwrap();
    }
    dir
}

/// The service over `dir`, its embedded default model `smol-a`.
async fn serve(dir: &Path, flags: &[&str]) -> TestServer {
    serve_default(dir, "smol-a", flags).await
}

/// The service over `dir`, its embedded default model `dir/<default>.gguf`.
async fn serve_default(dir: &Path, default: &str, flags: &[&str]) -> TestServer {
    let dir = dir.to_str().unwrap();
    let default = format!("{dir}/{default}.gguf");
    // The embedded engine alone, unless the test lists the backends.
    let mut all = if flags.contains(&"--backends") {
        vec![]
    } else {
        vec!["--backend", "embedded"]
    };
    all.extend([
        "--models-dir",
        dir,
        "--model-path",
        &default,
        "--parallel",
        "2",
    ]);
    all.extend_from_slice(flags);
    TestServer::start(config(&all)).await
}

async fn text_of(client: &mut Client, model: &str, prompt: &str) -> Result<String, tonic::Status> {
    let mut request = greedy(prompt, 12);
    request.model = model.to_owned();
    let generated = generate(client, request).await?;
    assert_eq!(generated.summary.meta.unwrap().model, model);
    Ok(generated.text)
}

async fn memory(client: &mut Client) -> ModelMemory {
    let status = client
        .get_status(GetStatusRequest {})
        .await
        .unwrap()
        .into_inner();
    status.backends[0]
        .model_memory
        .clone()
        .expect("the embedded engine reports its models")
}

async fn resident(client: &mut Client) -> Vec<String> {
    memory(client)
        .await
        .resident
        .into_iter()
        .map(|model| model.name)
        .collect()
}

#[tokio::test]
async fn each_model_answers_as_it_does_when_served_alone() {
    let dir = models_dir(&[]);
    let prompt = "Name a colour.";
    let mut together = Vec::new();
    {
        let server = serve(dir.path(), &[]).await;
        let mut client = server.client().await;
        for model in ["smol-b", TINY[0], TINY[1], TINY[2]] {
            together.push(text_of(&mut client, model, prompt).await.unwrap());
        }
        assert_eq!(
            resident(&mut client).await.len(),
            3,
            "the default --max-loaded-models"
        );
    }
    for (model, expected) in ["smol-b", TINY[0], TINY[1], TINY[2]]
        .into_iter()
        .zip(together)
    {
        let alone = tempfile::tempdir().unwrap();
        let path = if model == "smol-b" {
            support::model_path()
        } else {
            tiny_model(model)
        };
        let file = alone.path().join(format!("{model}.gguf"));
        std::os::unix::fs::symlink(path, &file).unwrap();
        let server = serve_default(alone.path(), model, &[]).await;
        let mut client = server.client().await;
        assert_eq!(
            text_of(&mut client, model, prompt).await.unwrap(),
            expected,
            "{model} alone"
        );
    }
}

#[tokio::test]
async fn the_roles_of_a_pipeline_run_on_different_models() {
    let dir = models_dir(&[]);
    let server = serve(
        dir.path(),
        &[
            "--enhance-model",
            "smol-b",
            "--decompose-model",
            "smol-c",
            "--generate-model",
            TINY[0],
        ],
    )
    .await;
    let mut client = server.client().await;
    // The task tests/tasks.rs answers with this model, seeded.
    let task = || {
        Some(Task {
            title: "Add password reset".into(),
            description: Some("Users who forget their password cannot log in.".into()),
            context_files: vec!["src/auth/login.rs".into()],
            ..Default::default()
        })
    };
    let context = || {
        Some(TaskContext {
            project: "A web shop written in Rust.".into(),
            prd_excerpt: "Users can reset a forgotten password by e-mail.".into(),
        })
    };
    let seeded = || {
        Some(SamplingOptions {
            temperature: Some(0.0),
            seed: Some(1),
            ..Default::default()
        })
    };
    let enhanced = client
        .enhance_task(EnhanceTaskRequest {
            task: task(),
            context: context(),
            sampling: seeded(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(enhanced.meta.unwrap().model, "smol-b");
    let decomposed = client
        .decompose_task(DecomposeTaskRequest {
            task: task(),
            context: context(),
            sampling: seeded(),
            min_subtasks: 3,
            max_subtasks: 3,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(decomposed.meta.unwrap().model, "smol-c");
    assert_eq!(decomposed.subtasks.len(), 3);
    let generated = generate(&mut client, greedy("Hello", 4)).await.unwrap();
    assert_eq!(generated.summary.meta.unwrap().model, TINY[0]);
}

#[tokio::test]
async fn the_least_recently_used_idle_model_is_evicted_and_pins_stay() {
    let dir = models_dir(&[]);
    let server = serve(dir.path(), &["--max-loaded-models", "2", "--pin", "smol-a"]).await;
    let mut client = server.client().await;
    assert_eq!(resident(&mut client).await, ["smol-a"]);
    for model in TINY {
        text_of(&mut client, model, "Hi").await.unwrap();
        assert_eq!(resident(&mut client).await, ["smol-a", model]);
    }
    let memory = memory(&mut client).await;
    assert_eq!(memory.evictions, 2);
    assert_eq!(memory.loads, 4);
    assert!(
        memory
            .resident
            .iter()
            .any(|model| model.residence.as_ref().unwrap().pinned)
    );
}

#[tokio::test]
async fn keep_alive_zero_unloads_after_each_call_but_not_the_pinned() {
    let dir = models_dir(&[]);
    let server = serve(dir.path(), &["--keep-alive", "0", "--pin", "smol-a"]).await;
    let mut client = server.client().await;
    text_of(&mut client, TINY[1], "Hi").await.unwrap();
    text_of(&mut client, "smol-a", "Hi").await.unwrap();
    assert_eq!(resident(&mut client).await, ["smol-a"]);
    assert_eq!(memory(&mut client).await.idle_unloads, 1);
}

/// The tiny llama model relabelled as an architecture llama.cpp does not
/// know: its metadata reads, its load fails. The name has the length of
/// `llama`, so every offset in the file stays right.
fn unknown_architecture() -> Vec<u8> {
    let bytes = std::fs::read(tiny_model(TINY[0])).unwrap();
    let mut relabelled = Vec::with_capacity(bytes.len());
    let mut rest = bytes.as_slice();
    while let Some(at) = rest.windows(5).position(|window| window == b"llama") {
        relabelled.extend_from_slice(&rest[..at]);
        relabelled.extend_from_slice(b"zlama");
        rest = &rest[at + 5..];
    }
    relabelled.extend_from_slice(rest);
    relabelled
}

#[tokio::test]
async fn a_file_that_does_not_load_fails_its_calls_and_the_rest_serve() {
    let mut broken = b"GGUF".to_vec();
    broken.extend_from_slice(&[0xff; 64]);
    let unknown = unknown_architecture();
    let dir = models_dir(&[("broken.gguf", &broken), ("zlama.gguf", &unknown)]);
    let server = serve(dir.path(), &[]).await;
    let mut client = server.client().await;
    let listed = client
        .list_models(ListModelsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .models;
    assert!(
        listed.iter().all(|model| model.name != "broken"),
        "a file whose metadata cannot be read is not listed"
    );
    let zlama = listed
        .iter()
        .find(|model| model.name == "zlama")
        .expect("listed");
    assert_eq!(zlama.facts.as_ref().unwrap().architecture, "zlama");
    for _ in 0..2 {
        let failed = text_of(&mut client, "zlama", "Hi").await.unwrap_err();
        assert_eq!(failed.code(), Code::FailedPrecondition, "{failed:?}");
        assert_eq!(
            failed.get_details_error_info().unwrap().reason,
            "MODEL_LOAD_FAILED"
        );
    }
    assert_eq!(
        memory(&mut client).await.load_failures,
        2,
        "each call tries again"
    );
    text_of(&mut client, "smol-a", "Hi").await.unwrap();
    text_of(&mut client, TINY[1], "Hi").await.unwrap();
}

#[tokio::test]
async fn a_model_larger_than_the_budget_is_refused_with_its_estimate() {
    let dir = models_dir(&[]);
    // Too small for SmolLM2, room for the tiny models: the start loads a
    // tiny default model.
    let server = serve_default(dir.path(), TINY[0], &["--model-memory", "40MiB"]).await;
    let mut client = server.client().await;
    let refused = text_of(&mut client, "smol-b", "Hi").await.unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    let info = refused.get_details_error_info().unwrap();
    assert_eq!(info.reason, "MODEL_TOO_LARGE");
    assert_eq!(info.metadata["budget_bytes"], (40u64 << 20).to_string());
    let needed: u64 = info.metadata["needed_bytes"].parse().unwrap();
    assert!(needed > 40 << 20, "{needed}");
    assert!(
        refused.get_details_retry_info().is_none(),
        "retrying cannot help"
    );
    text_of(&mut client, TINY[1], "Hi").await.unwrap();
}

#[tokio::test]
async fn list_load_and_unload_models() {
    let dir = models_dir(&[]);
    let server = serve(dir.path(), &[]).await;
    let mut client = server.client().await;
    let listed = client
        .list_models(ListModelsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .models;
    let names: Vec<&str> = listed.iter().map(|model| model.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "smol-a",
            "smol-b",
            "smol-c",
            "tiny-llama",
            "tiny-phi3",
            "tiny-qwen2"
        ]
    );
    let smol = &listed[0];
    let facts = smol.facts.as_ref().unwrap();
    assert_eq!(
        (facts.format.as_str(), facts.architecture.as_str()),
        ("gguf", "llama")
    );
    assert_eq!(facts.quantization, "Q4_1");
    assert!(
        smol.residence.is_some(),
        "the default model is loaded at start"
    );
    assert!(listed[1].residence.is_none());
    let architectures: Vec<&str> = listed[3..]
        .iter()
        .map(|model| model.facts.as_ref().unwrap().architecture.as_str())
        .collect();
    assert_eq!(architectures, ["llama", "phi3", "qwen2"]);

    let loaded = client
        .load_model(LoadModelRequest {
            model: TINY[2].to_owned(),
            backend: "embedded".to_owned(),
        })
        .await
        .unwrap()
        .into_inner()
        .model
        .unwrap();
    let residence = loaded.residence.unwrap();
    assert!(!residence.loading && residence.memory_bytes > 0);
    assert!(residence.load_time.is_some());
    assert_eq!(resident(&mut client).await, ["smol-a", TINY[2]]);

    let unloaded = client
        .unload_model(UnloadModelRequest {
            model: TINY[2].to_owned(),
            backend: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(unloaded.backends, ["embedded"]);
    assert_eq!(resident(&mut client).await, ["smol-a"]);
    let again = client
        .unload_model(UnloadModelRequest {
            model: TINY[2].to_owned(),
            backend: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(again.code(), Code::FailedPrecondition);
    let unknown = text_of(&mut client, "smol-d", "Hi").await.unwrap_err();
    assert_eq!(unknown.code(), Code::NotFound);
    assert!(
        unknown.message().contains("smol-a"),
        "{}",
        unknown.message()
    );
}

#[tokio::test]
async fn a_call_goes_to_the_backend_that_serves_its_model() {
    let stand_in = OllamaStandIn::start(&llama().openai_url()).await;
    let dir = models_dir(&[]);
    // An MLX model directory: only the MLX backend serves it.
    let built = std::process::Command::new(support::python())
        .arg(support::repo_path("tests/support/tiny_mlx_model.py"))
        .arg("llama")
        .arg(dir.path().join("tiny-mlx-llama"))
        .status()
        .expect("run tiny_mlx_model.py");
    assert!(built.success(), "building a tiny MLX model");
    let server = serve(
        dir.path(),
        &[
            "--backends",
            "embedded,mlx,ollama",
            "--ollama-host",
            &stand_in.host(),
        ],
    )
    .await;
    let mut client = server.client().await;
    let backend_of = |generated: support::Generated| generated.summary.meta.unwrap().backend;
    for (model, backend) in [
        (ollama::MODEL, "ollama"),
        ("tiny-mlx-llama", "mlx"),
        (TINY[1], "embedded"),
        ("smol-a", "embedded"),
    ] {
        let mut request = greedy("Hi", 4);
        request.model = model.to_owned();
        let generated = generate(&mut client, request).await.unwrap();
        assert_eq!(backend_of(generated), backend, "{model}");
    }
    let completed = stand_in
        .controls
        .completed
        .load(std::sync::atomic::Ordering::SeqCst);
    assert_eq!(completed, 1, "only the Ollama model went to Ollama");
    let listed = client
        .list_models(ListModelsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .models;
    assert!(
        listed
            .iter()
            .any(|model| model.backend == "ollama" && model.name == ollama::MODEL)
    );
    let unknown = text_of(&mut client, "smollm2:1.7b", "Hi")
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), Code::NotFound);
    assert!(
        unknown.message().contains(ollama::MODEL),
        "{}",
        unknown.message()
    );
}
