//! The MLX backend on the real mlx-lm (MLX's Linux CPU build here, with
//! OpenBLAS preloaded) and the real SmolLM2 model, converted once from its
//! GGUF: streaming, answers matching llama.cpp's, enforced JSON Schemas,
//! batching, structured tasks, hostile prompts, a worker that crashes or
//! hangs, and the model families the research names. Generations are kept
//! short: this CPU build decodes about ten tokens per second.

mod support;

use std::{
    path::PathBuf,
    time::{Duration, Instant},
};

use futures_util::{StreamExt, future::join_all};
use rigger_inference::proto::{
    ComputeDevice, ComputeDeviceKind, DecomposeTaskRequest, EnhanceTaskRequest, GenerateRequest,
    GetStatusRequest, SchemaSupport, Task, generate_response::Event,
    inference_service_client::InferenceServiceClient,
};
use support::{Generated, TestServer, config, generate, greedy};
use tonic::{Code, Request};
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

const MODEL: &str = "SmolLM2-135M-Instruct.Q4_1";

async fn mlx(flags: &[&str]) -> TestServer {
    let mut all = vec!["--backend", "mlx"];
    all.extend_from_slice(flags);
    TestServer::start(config(&all)).await
}

#[tokio::test]
async fn streams_answers_that_match_llama_cpp_token_for_token() {
    let server = mlx(&[]).await;
    let mut client = server.client().await;
    let status = client
        .get_status(GetStatusRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(status.active_backend, "mlx");
    assert_eq!(status.model, MODEL);
    let capabilities = status.backends[0].capabilities.unwrap();
    assert_eq!(capabilities.json_schema(), SchemaSupport::Enforced);
    assert!(capabilities.no_repeat, "the n-gram ban is honoured here");

    let prompt = greedy("Name three colors.", 24);
    let Generated {
        text,
        summary,
        pieces,
    } = generate(&mut client, prompt.clone())
        .await
        .expect("generates");
    let meta = summary.meta.expect("meta");
    assert_eq!((meta.backend.as_str(), meta.model.as_str()), ("mlx", MODEL));
    assert!(pieces > 1, "streamed in pieces");
    assert!(meta.completion_tokens > 0 && meta.prompt_tokens > 0);
    assert!(meta.backend_generation_time.is_some());

    let again = generate(&mut client, prompt.clone())
        .await
        .expect("generates again");
    let again_meta = again.summary.meta.expect("meta");
    assert_eq!(
        again_meta.cached_prompt_tokens,
        again_meta.prompt_tokens - 1,
        "the prompt's KV cache is reused, all but the last token"
    );
    assert_eq!(again.text, text, "reuse changes no answer");

    let embedded = TestServer::start(config(&["--backend", "embedded"])).await;
    let reference = generate(&mut embedded.client().await, prompt)
        .await
        .expect("embedded generates");
    assert_eq!(text, reference.text, "same model, same greedy answer");
}

/// The MLX backend's device, as GetStatus reports it.
async fn device(client: &mut InferenceServiceClient<tonic::transport::Channel>) -> ComputeDevice {
    let status = client
        .get_status(GetStatusRequest {})
        .await
        .unwrap()
        .into_inner();
    status.backends[0]
        .device
        .clone()
        .expect("the MLX backend reports its device")
}

#[tokio::test]
async fn the_status_names_the_workers_device_and_the_memory_mlx_holds() {
    let server = mlx(&[]).await;
    let mut client = server.client().await;
    let ready = device(&mut client).await;
    assert_eq!(
        ready.kind(),
        ComputeDeviceKind::Cpu,
        "MLX's Linux CPU build"
    );
    assert!(!ready.name.is_empty(), "MLX names the CPU: {ready:?}");
    assert!(
        ready.memory_held_bytes > 0,
        "the loaded weights are held: {ready:?}"
    );
    generate(&mut client, greedy("Say hi.", 2))
        .await
        .expect("generates");
    let after = device(&mut client).await;
    assert_eq!((after.kind, &after.name), (ready.kind, &ready.name));
    assert!(
        after.memory_held_bytes > ready.memory_held_bytes,
        "the call's report counts the KV cache it left for reuse: {ready:?} then {after:?}"
    );
}

#[tokio::test]
async fn schemas_are_enforced_while_other_requests_share_the_batch() {
    let server = mlx(&[]).await;
    let client = server.client().await;
    let schema = r#"{"type":"object","properties":{"color":{"type":"string","maxLength":16},"warm":{"type":"boolean"}},"required":["color","warm"],"additionalProperties":false}"#;
    let requests = [
        GenerateRequest {
            json_schema: schema.into(),
            ..greedy("Describe your favourite color.", 40)
        },
        greedy("Count to five.", 12),
        greedy("Name a fruit.", 12),
    ];
    let answers = join_all(requests.into_iter().map(|request| {
        let mut client = client.clone();
        async move { generate(&mut client, request).await }
    }))
    .await;
    let constrained = answers[0].as_ref().expect("the constrained call succeeds");
    let value: serde_json::Value =
        serde_json::from_str(&constrained.text).expect("the output is JSON");
    assert!(
        value["color"].is_string() && value["warm"].is_boolean(),
        "{value}"
    );
    for answer in &answers[1..] {
        assert!(answer.is_ok(), "{answer:?}");
    }
}

#[tokio::test]
async fn enhance_task_answers_typed_on_mlx() {
    let server = mlx(&[]).await;
    let mut client = server.client().await;
    let response = client
        .enhance_task(EnhanceTaskRequest {
            task: Some(Task {
                title: "Add password reset".into(),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .expect("an enhancement")
        .into_inner();
    let enhancement = response.enhancement.expect("typed result");
    assert!(!enhancement.title.trim().is_empty());
    assert!(!enhancement.description.trim().is_empty());
    assert_eq!(response.meta.expect("meta").backend, "mlx");
}

#[tokio::test]
async fn hostile_prompts_are_data_and_the_protocol_stays_in_sync() {
    let server = mlx(&["--max-prompt-bytes", "2000000"]).await;
    let mut client = server.client().await;
    let canary: PathBuf =
        std::env::temp_dir().join(format!("rigger-canary-{}", std::process::id()));
    let touch = format!("__import__('os').system('touch {}')", canary.display());
    let prompts = [
        "'''".to_owned(),
        format!("\"\"\"); {touch} #"),
        touch.clone(),
        format!("'''\n{touch}\n'''"),
        "line one\nline two\r\n\"quoted\" end".to_owned(),
        "nul \u{0} inside".to_owned(),
        "{\"op\": \"cancel\", \"id\": 1}\n{\"op\": \"generate\"}".to_owned(),
        "\\u0000 \\\" \\n".to_owned(),
    ];
    for prompt in &prompts {
        let answer = generate(&mut client, greedy(prompt, 2)).await;
        assert!(answer.is_ok(), "{prompt:?}: {answer:?}");
    }
    // A 1 MB prompt is one protocol line too; its call ends at its deadline
    // while the worker still reads it.
    let mut huge = Request::new(greedy(&"a ".repeat(500_000), 1));
    huge.set_timeout(Duration::from_secs(3));
    let status = failure(&mut client, huge).await;
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    let answer = generate(&mut client, greedy("Say hi.", 2)).await;
    assert!(answer.is_ok(), "the next request works: {answer:?}");
    assert!(!canary.exists(), "a prompt ran code");
}

/// How a call that must fail ends, whether before or after its stream
/// starts.
async fn failure(
    client: &mut rigger_inference::proto::inference_service_client::InferenceServiceClient<
        tonic::transport::Channel,
    >,
    request: Request<GenerateRequest>,
) -> tonic::Status {
    match client.generate(request).await {
        Err(status) => status,
        Ok(response) => support::collect(response.into_inner())
            .await
            .expect_err("the call fails"),
    }
}

/// The MLX worker of the server whose model is named `marker` (`--model`
/// reaches the worker's command line as `--name`): a child of this test
/// process, which may run other tests' workers at the same time.
fn worker_pid(marker: &str) -> u32 {
    let me = std::process::id();
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").expect("procfs") {
        let path = entry.expect("entry").path();
        let Ok(pid) = path.file_name().unwrap().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let stat = std::fs::read_to_string(path.join("stat")).unwrap_or_default();
        let parent = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|ppid| ppid.parse::<u32>().ok());
        let cmdline = std::fs::read(path.join("cmdline")).unwrap_or_default();
        let cmdline = String::from_utf8_lossy(&cmdline);
        if parent == Some(me) && cmdline.contains("MLX worker") && cmdline.contains(marker) {
            found.push(pid);
        }
    }
    assert_eq!(found.len(), 1, "one MLX worker named {marker}: {found:?}");
    found[0]
}

fn signal(pid: u32, signal: &str) {
    let status = std::process::Command::new("kill")
        .args([signal, &pid.to_string()])
        .status()
        .expect("kill");
    assert!(status.success());
}

#[tokio::test]
async fn a_worker_killed_mid_stream_fails_its_calls_and_comes_back() {
    let server = mlx(&["--model", "killed-worker-model"]).await;
    let mut client = server.client().await;
    let mut health = HealthClient::new(server.channel().await)
        .watch(HealthCheckRequest {
            service: "rigger.backend.mlx".into(),
        })
        .await
        .expect("watch")
        .into_inner();
    let status_of = |message: Option<Result<_, tonic::Status>>| {
        let message: tonic_health::pb::HealthCheckResponse =
            message.expect("open").expect("no error");
        ServingStatus::try_from(message.status).expect("known")
    };
    assert_eq!(status_of(health.next().await), ServingStatus::Serving);

    let mut stream = client
        .generate(greedy("Write a long story about a dragon.", 400))
        .await
        .expect("starts")
        .into_inner();
    let first = stream.next().await.expect("a message").expect("text");
    assert!(matches!(first.event, Some(Event::Text(_))));
    let killed = Instant::now();
    signal(worker_pid("killed-worker-model"), "-KILL");
    let status = loop {
        match tokio::time::timeout(Duration::from_secs(30), stream.next())
            .await
            .expect("never hangs")
            .expect("ends with an error")
        {
            Ok(_) => continue,
            Err(status) => break status,
        }
    };
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(status.message().contains("MLX worker"), "{status:?}");
    let failed_after = killed.elapsed();

    assert_eq!(status_of(health.next().await), ServingStatus::NotServing);
    let back = tokio::time::timeout(Duration::from_secs(60), health.next())
        .await
        .expect("the worker restarts");
    assert_eq!(status_of(back), ServingStatus::Serving);
    let restarted_after = killed.elapsed();
    let answer = generate(&mut client, greedy("Say hi.", 2)).await;
    assert!(answer.is_ok(), "the next call succeeds: {answer:?}");
    eprintln!(
        "call failed {failed_after:?} after the kill; worker serving again after {restarted_after:?}"
    );
}

#[tokio::test]
async fn a_hung_worker_ends_calls_at_their_deadline() {
    let server = mlx(&["--model", "hung-worker-model"]).await;
    let mut client = server.client().await;
    let pid = worker_pid("hung-worker-model");
    signal(pid, "-STOP");
    let mut request = Request::new(greedy("Say hi.", 4));
    request.set_timeout(Duration::from_secs(2));
    let started = Instant::now();
    let status = failure(&mut client, request).await;
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    assert!(started.elapsed() < Duration::from_secs(3));
    signal(pid, "-CONT");
    let answer = generate(&mut client, greedy("Say hi.", 2)).await;
    assert!(answer.is_ok(), "the worker resumes: {answer:?}");
}

/// Builds a tiny random model of `kind` with mlx-lm's own classes, as
/// `dir/tiny-<kind>`.
fn tiny_model(dir: &std::path::Path, kind: &str) -> PathBuf {
    let model = dir.join(format!("tiny-{kind}"));
    let status = std::process::Command::new(support::python())
        .arg(support::repo_path("tests/support/tiny_mlx_model.py"))
        .arg(kind)
        .arg(&model)
        .status()
        .expect("run tiny_mlx_model.py");
    assert!(status.success(), "building a tiny {kind} model");
    model
}

#[tokio::test]
async fn llama_mistral_and_phi3_models_run_side_by_side_each_in_its_worker() {
    let dir = std::env::temp_dir().join(format!("rigger-tiny-mlx-{}", std::process::id()));
    let kinds = ["llama", "mistral", "phi3"];
    for kind in kinds {
        tiny_model(&dir, kind);
    }
    let server = mlx(&[
        "--models-dir",
        dir.to_str().unwrap(),
        "--max-loaded-models",
        "4",
    ])
    .await;
    let mut client = server.client().await;
    for kind in kinds {
        let mut request = greedy("Hello", 4);
        request.model = format!("tiny-{kind}");
        let generated = generate(&mut client, request)
            .await
            .unwrap_or_else(|status| panic!("{kind}: {status:?}"));
        let meta = generated.summary.meta.expect("meta");
        assert_eq!(meta.model, format!("tiny-{kind}"));
        assert!(meta.completion_tokens <= 4, "{kind}");
    }
    let default = generate(&mut client, greedy("Say hi.", 2)).await.unwrap();
    assert_eq!(
        default.summary.meta.unwrap().model,
        MODEL,
        "the default model still serves"
    );
    let workers: Vec<u32> = kinds
        .iter()
        .map(|kind| worker_pid(&format!("tiny-{kind}")))
        .collect();
    assert!(
        workers.windows(2).all(|pair| pair[0] != pair[1]),
        "one worker per model: {workers:?}"
    );
    let status = client
        .get_status(rigger_inference::proto::GetStatusRequest {})
        .await
        .unwrap()
        .into_inner();
    let memory = status.backends[0]
        .model_memory
        .clone()
        .expect("MLX holds models");
    assert_eq!(memory.resident.len(), 4);
    drop(server);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Rigger's pipeline on MLX: EnhanceTask, DecomposeTask and Generate each
/// on its own model (SmolLM2 under two more names, converted once each, and
/// a tiny llama), in one service, each model in its own worker.
#[tokio::test]
async fn the_roles_of_a_pipeline_run_on_three_mlx_models() {
    let dir = std::env::temp_dir().join(format!("rigger-mlx-roles-{}", std::process::id()));
    // Its own name: tests running beside this one have their tiny-llama.
    std::fs::rename(tiny_model(&dir, "llama"), dir.join("roles-llama")).unwrap();
    let smol = support::model_path();
    let aliases = format!("smol-b={path},smol-c={path}", path = smol.to_str().unwrap());
    let server = mlx(&[
        "--models-dir",
        dir.to_str().unwrap(),
        "--models",
        &aliases,
        "--enhance-model",
        "smol-b",
        "--decompose-model",
        "smol-c",
        "--generate-model",
        "roles-llama",
    ])
    .await;
    let mut client = server.client().await;
    let task = || {
        Some(Task {
            title: "Add password reset".into(),
            description: Some("Users who forget their password cannot log in.".into()),
            ..Default::default()
        })
    };
    let enhanced = client
        .enhance_task(EnhanceTaskRequest {
            task: task(),
            ..Default::default()
        })
        .await
        .expect("an enhancement")
        .into_inner();
    assert_eq!(enhanced.meta.expect("meta").model, "smol-b");
    assert!(!enhanced.enhancement.expect("typed").title.trim().is_empty());
    let decomposed = client
        .decompose_task(DecomposeTaskRequest {
            task: task(),
            min_subtasks: 2,
            max_subtasks: 2,
            ..Default::default()
        })
        .await
        .expect("a decomposition")
        .into_inner();
    assert_eq!(decomposed.meta.expect("meta").model, "smol-c");
    assert_eq!(decomposed.subtasks.len(), 2);
    let generated = generate(&mut client, greedy("Hello", 4)).await.unwrap();
    assert_eq!(generated.summary.meta.unwrap().model, "roles-llama");
    let workers: Vec<u32> = ["smol-b", "smol-c", "roles-llama"]
        .iter()
        .map(|model| worker_pid(model))
        .collect();
    assert!(
        workers[0] != workers[1] && workers[1] != workers[2] && workers[0] != workers[2],
        "one worker per model: {workers:?}"
    );
    drop(server);
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn a_worker_that_breaks_the_protocol_fails_calls_instead_of_hanging() {
    // An "interpreter" that announces itself like the worker, then answers
    // a request with a line that is not the protocol.
    let fake = std::env::temp_dir().join(format!("rigger-fake-worker-{}", std::process::id()));
    std::fs::write(
        &fake,
        "#!/bin/sh\n\
         echo '{\"event\": \"ready\", \"model\": \"fake\", \"device\": \"cpu\", \"fast_path\": false, \"load_seconds\": 0}'\n\
         read request\n\
         echo 'this is not the protocol'\n\
         sleep 30\n",
    )
    .expect("write the fake worker");
    std::process::Command::new("chmod")
        .args(["+x", fake.to_str().unwrap()])
        .status()
        .expect("chmod");
    let server = mlx(&["--mlx-python", fake.to_str().unwrap()]).await;
    let mut client = server.client().await;
    let mut request = Request::new(greedy("Say hi.", 2));
    request.set_timeout(Duration::from_secs(20));
    let started = Instant::now();
    let status = failure(&mut client, request).await;
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(status.message().contains("malformed line"), "{status:?}");
    assert!(started.elapsed() < Duration::from_secs(5), "no hang");
    let _ = std::fs::remove_file(&fake);
}
