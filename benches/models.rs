//! Many models on one embedded engine (the service as its own process, as
//! deployed): cold load time per model, the first token of an evicted model
//! against a resident one, the largest gap in a stream on one model while
//! another loads, resident memory with one to three models and after
//! unloading, and a Rigger-style pipeline (EnhanceTask on one model,
//! DecomposeTask on a second, Generate on a third) against the same
//! pipeline on one model and against one service per model, started and
//! stopped per stage (the only way before residency). Prints figures and
//! writes `benches/results/models.json`.
//!
//! Models: SmolLM2 under three names (same weights; what is measured is
//! the service's handling of three models) and the tiny random-weight
//! models of `$RIGGER_CACHE_DIR/test-models`.
//!
//! Run: `make bench-models` (`BENCH_PIPELINE_TASKS`, default 5, sets how
//! many corpus tasks the pipeline takes).

// Shared with the other benchmarks, which use what this one does not.
#[allow(dead_code)]
mod common;
#[path = "../tests/support/mod.rs"]
mod support;

use std::{
    path::Path,
    time::{Duration, Instant},
};

use common::{Service, grpc_run, median, status_mib};
use futures_util::StreamExt;
use rigger_inference::proto::{
    DecomposeTaskRequest, EnhanceTaskRequest, GenerateRequest, LoadModelRequest, SamplingOptions,
    Task, UnloadModelRequest, generate_response::Event,
    inference_service_client::InferenceServiceClient,
};
use serde::Deserialize;
use serde_json::json;
use tonic::transport::Channel;

type Client = InferenceServiceClient<Channel>;

const SMOL: [&str; 3] = ["smol-a", "smol-b", "smol-c"];
const TINY: [&str; 3] = ["llama", "qwen2", "phi3"];
/// Tokens of the stream watched while another model loads: long enough to
/// outlast the load.
const WATCHED_TOKENS: u32 = 192;

#[derive(Deserialize)]
struct CorpusTask {
    title: String,
    description: Option<String>,
}

/// SmolLM2 under three names and the tiny models, in a fresh directory.
fn models_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("a temporary directory");
    for name in SMOL {
        std::os::unix::fs::symlink(
            support::model_path(),
            dir.path().join(format!("{name}.gguf")),
        )
        .expect("link the model");
    }
    for architecture in TINY {
        std::os::unix::fs::symlink(
            support::tiny_models::tiny_model(architecture),
            dir.path().join(format!("tiny-{architecture}.gguf")),
        )
        .expect("link a tiny model");
    }
    dir
}

/// The service over `dir` with `default` as its default model.
async fn start(dir: &Path, default: &str, extra: &[(&str, &str)]) -> (Service, Client) {
    let default = dir.join(format!("{default}.gguf"));
    let mut settings = vec![
        ("INFERENCE_BACKEND", "embedded"),
        ("RIGGER_MODELS_DIR", dir.to_str().expect("UTF-8 path")),
        ("RIGGER_MODEL_PATH", default.to_str().expect("UTF-8 path")),
        ("RIGGER_THREADS", "1"),
        ("RIGGER_PARALLEL", "2"),
        ("RIGGER_ON_TOPIC_SIMILARITY", "0"),
    ];
    settings.extend_from_slice(extra);
    Service::start(&settings).await
}

fn on(model: &str, prompt: &str, max_tokens: u32) -> GenerateRequest {
    GenerateRequest {
        prompt: prompt.to_owned(),
        model: model.to_owned(),
        sampling: Some(SamplingOptions {
            max_tokens: Some(max_tokens),
            temperature: Some(0.0),
            ..Default::default()
        }),
        ..Default::default()
    }
}

async fn load(client: &mut Client, model: &str) -> Duration {
    let started = Instant::now();
    client
        .load_model(LoadModelRequest {
            model: model.to_owned(),
            backend: String::new(),
        })
        .await
        .expect("LoadModel");
    started.elapsed()
}

async fn unload(client: &mut Client, model: &str) {
    client
        .unload_model(UnloadModelRequest {
            model: model.to_owned(),
            backend: String::new(),
        })
        .await
        .expect("UnloadModel");
}

/// Cold load time of each model, as LoadModel's caller waits for it.
async fn cold_loads(dir: &Path) -> serde_json::Value {
    let (_service, mut client) = start(dir, "tiny-llama", &[]).await;
    let mut loads = serde_json::Map::new();
    for model in ["smol-b", "tiny-qwen2", "tiny-phi3"] {
        let took = load(&mut client, model).await;
        println!("cold load {model}: {:.0} ms", took.as_secs_f64() * 1e3);
        loads.insert(model.to_owned(), json!(took.as_secs_f64() * 1e3));
        unload(&mut client, model).await;
    }
    serde_json::Value::Object(loads)
}

/// First token of a resident model, and of one that must be loaded first
/// because it was evicted (one model at a time).
async fn first_tokens(dir: &Path) -> serde_json::Value {
    let (_service, mut client) = start(dir, "smol-a", &[("RIGGER_MAX_LOADED_MODELS", "1")]).await;
    let prompt = "Name a colour.";
    let mut resident = Vec::new();
    let mut evicted = Vec::new();
    for _ in 0..3 {
        resident.push(
            grpc_run(&mut client, on("smol-a", prompt, 1))
                .await
                .first_token,
        );
        evicted.push(
            grpc_run(&mut client, on("smol-b", prompt, 1))
                .await
                .first_token,
        );
        grpc_run(&mut client, on("smol-a", prompt, 1)).await;
    }
    let ms = |runs: Vec<Duration>| median(runs.iter().map(|run| run.as_secs_f64() * 1e3).collect());
    let (resident, evicted) = (ms(resident), ms(evicted));
    println!(
        "first token: resident {resident:.0} ms, evicted (load included) {evicted:.0} ms (medians of 3)"
    );
    json!({ "resident_ms": resident, "evicted_ms": evicted })
}

/// Gaps between the tokens of a stream on `smol-a` while `smol-b` loads.
async fn gap_while_loading(dir: &Path) -> serde_json::Value {
    let (_service, mut client) = start(dir, "smol-a", &[]).await;
    let mut stream = client
        .generate(on(
            "smol-a",
            "Count from one to one hundred in words.",
            WATCHED_TOKENS,
        ))
        .await
        .expect("Generate")
        .into_inner();
    let mut arrivals = Vec::new();
    let mut loader = None;
    let mut load_window = None;
    while let Some(message) = stream.next().await {
        if let Some(Event::Text(_)) = message.expect("no error").event {
            arrivals.push(Instant::now());
            // Start the load once the stream is going.
            if arrivals.len() == 8 {
                let mut client = client.clone();
                loader = Some(tokio::spawn(async move {
                    let started = Instant::now();
                    let took = load(&mut client, "smol-b").await;
                    (started, started + took)
                }));
            }
            if let Some(task) = &loader
                && task.is_finished()
                && load_window.is_none()
            {
                load_window = Some(loader.take().expect("checked").await.expect("load"));
            }
        }
    }
    if let Some(task) = loader {
        load_window = Some(task.await.expect("load"));
    }
    let (load_start, load_end) = load_window.expect("the load ran");
    let gaps: Vec<(Instant, f64)> = arrivals
        .windows(2)
        .map(|pair| (pair[1], (pair[1] - pair[0]).as_secs_f64() * 1e3))
        .collect();
    let typical = median(gaps.iter().map(|(_, gap)| *gap).collect());
    let during: Vec<f64> = gaps
        .iter()
        .filter(|(at, _)| *at >= load_start && *at <= load_end + Duration::from_millis(100))
        .map(|(_, gap)| *gap)
        .collect();
    let worst = during.iter().copied().fold(0.0, f64::max);
    let load_ms = (load_end - load_start).as_secs_f64() * 1e3;
    println!(
        "stream on smol-a while smol-b loads ({load_ms:.0} ms): median gap {typical:.1} ms, largest gap during the load {worst:.1} ms ({} tokens in the window)",
        during.len()
    );
    json!({ "load_ms": load_ms, "median_gap_ms": typical, "largest_gap_during_load_ms": worst, "tokens_during_load": during.len() })
}

/// Resident memory with one, two and three models, and after unloading
/// back to one.
async fn memory(dir: &Path) -> serde_json::Value {
    let (service, mut client) = start(dir, "smol-a", &[]).await;
    let pid = service.child.id();
    let prompt = "Name a colour.";
    let mut figures = Vec::new();
    grpc_run(&mut client, on("smol-a", prompt, 4)).await;
    figures.push(status_mib(pid, "VmRSS:"));
    for model in ["smol-b", "smol-c"] {
        grpc_run(&mut client, on(model, prompt, 4)).await;
        figures.push(status_mib(pid, "VmRSS:"));
    }
    for model in ["smol-b", "smol-c"] {
        unload(&mut client, model).await;
    }
    // Unloading runs on a blocking thread after the reply.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = status_mib(pid, "VmRSS:");
    println!(
        "RSS with 1, 2, 3 models: {:.0}, {:.0}, {:.0} MiB; after unloading two: {after:.0} MiB ({:+.1}% of one model's)",
        figures[0],
        figures[1],
        figures[2],
        (after / figures[0] - 1.0) * 100.0
    );
    json!({ "rss_mib": figures, "after_unload_mib": after })
}

fn task_of(task: &CorpusTask) -> Option<Task> {
    Some(Task {
        title: task.title.clone(),
        description: task.description.clone(),
        ..Default::default()
    })
}

async fn enhance(client: &mut Client, task: &CorpusTask, model: &str) -> bool {
    client
        .enhance_task(EnhanceTaskRequest {
            task: task_of(task),
            model: model.to_owned(),
            ..Default::default()
        })
        .await
        .is_ok()
}

async fn decompose(client: &mut Client, task: &CorpusTask, model: &str) -> bool {
    client
        .decompose_task(DecomposeTaskRequest {
            task: task_of(task),
            model: model.to_owned(),
            ..Default::default()
        })
        .await
        .is_ok()
}

async fn write(client: &mut Client, task: &CorpusTask, model: &str) -> bool {
    let prompt = format!(
        "Write the first step of this task in one sentence: {}",
        task.title
    );
    grpc_run(client, on(model, &prompt, 48)).await.tokens > 0
}

/// The roles' models: enhancer, decomposer, writer.
struct Roles<'a>([&'a str; 3]);

/// Each task through EnhanceTask, DecomposeTask and Generate in turn, on
/// one service; returns the seconds and the calls answered.
async fn pipeline(client: &mut Client, tasks: &[CorpusTask], roles: &Roles<'_>) -> (f64, usize) {
    let started = Instant::now();
    let mut answered = 0;
    for task in tasks {
        answered += usize::from(enhance(client, task, roles.0[0]).await);
        answered += usize::from(decompose(client, task, roles.0[1]).await);
        answered += usize::from(write(client, task, roles.0[2]).await);
    }
    (started.elapsed().as_secs_f64(), answered)
}

/// The same work with one service per model, each started for its stage
/// and stopped after it: every task through one stage before the next.
async fn pipeline_restarting(
    dir: &Path,
    tasks: &[CorpusTask],
    roles: &Roles<'_>,
) -> (f64, usize, f64) {
    let started = Instant::now();
    let mut answered = 0;
    let mut starts = Vec::new();
    for (stage, model) in roles.0.iter().enumerate() {
        let starting = Instant::now();
        let (_service, mut client) = start(dir, model, &[]).await;
        starts.push(starting.elapsed().as_secs_f64());
        for task in tasks {
            answered += usize::from(match stage {
                0 => enhance(&mut client, task, model).await,
                1 => decompose(&mut client, task, model).await,
                _ => write(&mut client, task, model).await,
            });
        }
    }
    (started.elapsed().as_secs_f64(), answered, median(starts))
}

async fn pipelines(dir: &Path) -> serde_json::Value {
    let count: usize = std::env::var("BENCH_PIPELINE_TASKS")
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or(5);
    let corpus: Vec<CorpusTask> = serde_json::from_slice(
        &std::fs::read(support::repo_path("eval/tasks.json")).expect("the eval corpus"),
    )
    .expect("corpus JSON");
    let tasks = &corpus[..count.min(corpus.len())];
    let three = Roles(["smol-b", "smol-c", "smol-a"]);
    let one = Roles(["smol-a", "smol-a", "smol-a"]);
    let calls = 3 * tasks.len();

    let (_service, mut client) = start(dir, "smol-a", &[]).await;
    let (many, many_answered) = pipeline(&mut client, tasks, &three).await;
    let (single, single_answered) = pipeline(&mut client, tasks, &one).await;
    drop(_service);
    let (restarting, restarting_answered, start_s) = pipeline_restarting(dir, tasks, &three).await;
    println!(
        "pipeline of {} tasks ({calls} calls): three models on one service {many:.1} s ({many_answered} answered); one model {single:.1} s ({single_answered}); one service per model, restarted per stage {restarting:.1} s ({restarting_answered}; a start takes {start_s:.2} s)",
        tasks.len()
    );
    json!({
        "tasks": tasks.len(),
        "three_models_one_service_s": many, "three_models_answered": many_answered,
        "one_model_s": single, "one_model_answered": single_answered,
        "service_per_model_s": restarting, "service_per_model_answered": restarting_answered,
        "service_start_s": start_s,
    })
}

#[tokio::main]
async fn main() {
    let dir = models_dir();
    let report = json!({
        "machine": { "cpus": std::thread::available_parallelism().map_or(0, |n| n.get()), "os": std::env::consts::OS, "arch": std::env::consts::ARCH },
        "cold_load_ms": cold_loads(dir.path()).await,
        "first_token": first_tokens(dir.path()).await,
        "stream_while_loading": gap_while_loading(dir.path()).await,
        "memory": memory(dir.path()).await,
        "pipeline": pipelines(dir.path()).await,
    });
    std::fs::create_dir_all(support::repo_path("benches/results")).expect("results directory");
    std::fs::write(
        support::repo_path("benches/results/models.json"),
        serde_json::to_string_pretty(&report).expect("JSON"),
    )
    .expect("write the results");
}
