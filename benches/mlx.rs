//! MLX figures in one run, on MLX's Linux CPU build with OpenBLAS (the
//! worker's fast path) and SmolLM2-135M-Instruct converted from its GGUF:
//! - a 16-token request through the service's long-lived worker vs the
//!   research's approach of one `python -c` per call that loads the model
//!   and generates (reimplemented here only as the baseline);
//! - decode tokens/s through gRPC vs `mlx_lm.stream_generate` called
//!   directly in Python, same model and prompt;
//! - aggregate decode tokens/s at 1, 2 and 4 concurrent streams;
//! - EnhanceTask time to first token with the task prompt's prefix cached
//!   vs cold, and the worker's peak memory.
//!
//! Run: `make bench-mlx` (or `cargo bench --bench mlx` with build.env sourced).

// Shared with the other benchmarks, which use what this one does not.
#[allow(dead_code)]
mod common;
#[path = "../tests/support/mod.rs"]
mod support;

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use common::{Run, Service, grpc_run, median, peak_rss_mib, percentile};
use futures_util::future::join_all;
use rigger_inference::{
    config::cache_dir,
    proto::{EnhanceTaskRequest, Task, inference_service_client::InferenceServiceClient},
};
use support::{greedy, python};
use tonic::transport::Channel;

const ROUNDS: usize = 3;
const SHORT_TOKENS: u32 = 16;
const DECODE_TOKENS: u32 = 64;
const PROMPT: &str = "Write a short story about a lighthouse keeper.";

/// The research's per-call approach: a fresh interpreter that loads the
/// model and generates, with the prompt pasted into the source. Only the
/// benchmark runs this, as the baseline; the service never does.
const PER_CALL: &str = r#"
import sys, time
import mlx.core as mx
from mlx_lm import load, generate
from mlx_lm.utils import dequantize_model
model, tokenizer = load(sys.argv[1])
model = dequantize_model(model); model.set_dtype(mx.float32)
prompt = tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True)
generate(model, tokenizer, prompt, max_tokens=int(sys.argv[2]))
"#;

/// `mlx_lm.stream_generate` on the same model and prompt, in one warm
/// process: decode tokens/s of its last response, median of three.
const DIRECT: &str = r#"
import statistics, sys
import mlx.core as mx
from mlx_lm import load, stream_generate
from mlx_lm.sample_utils import make_sampler
from mlx_lm.utils import dequantize_model
model, tokenizer = load(sys.argv[1])
model = dequantize_model(model); model.set_dtype(mx.float32)
prompt = tokenizer.apply_chat_template([{"role": "user", "content": sys.argv[3]}], add_generation_prompt=True)
rates = []
for _ in range(4):
    for response in stream_generate(model, tokenizer, prompt, max_tokens=int(sys.argv[2]), sampler=make_sampler(0.0)):
        pass
    rates.append(response.generation_tps)
print(statistics.median(rates[1:]))
"#;

/// The OpenBLAS setup unpacked for the worker, as the service finds it.
fn blas() -> PathBuf {
    cache_dir().join(format!(
        "tools/blas/usr/lib/{}-linux-gnu/openblas-pthread/libopenblas.so.0",
        std::env::consts::ARCH
    ))
}

fn python_with_blas(script: &str, args: &[&str]) -> Command {
    let blas = blas();
    let mut command = Command::new(python());
    command
        .arg("-c")
        .arg(script)
        .args(args)
        .env("HF_HUB_OFFLINE", "1")
        .env("OPENBLAS_NUM_THREADS", "1");
    if blas.is_file() {
        let dir = blas.parent().expect("a directory");
        command.env("LD_PRELOAD", &blas).env(
            "LD_LIBRARY_PATH",
            std::env::join_paths([dir, dir.parent().expect("a parent")]).expect("paths"),
        );
    }
    command
}

/// The model directory the worker converted the GGUF into.
fn converted_model() -> PathBuf {
    std::fs::read_dir(cache_dir().join("mlx"))
        .expect("the MLX cache exists once the worker ran")
        .filter_map(Result::ok)
        .map(|entry| entry.path())
        .find(|path| {
            let name = path.file_name().unwrap().to_string_lossy();
            name.starts_with("SmolLM2-135M-Instruct.Q4_1-") && !name.contains(".partial")
        })
        .expect("a converted SmolLM2")
}

fn per_call_seconds(model: &Path) -> f64 {
    let script = PER_CALL.replace("PROMPT", &format!("{PROMPT:?}"));
    let started = Instant::now();
    let status = python_with_blas(
        &script,
        &[model.to_str().unwrap(), &SHORT_TOKENS.to_string()],
    )
    .stdout(std::process::Stdio::null())
    .stderr(std::process::Stdio::null())
    .status()
    .expect("python");
    assert!(status.success(), "the per-call baseline ran");
    started.elapsed().as_secs_f64()
}

async fn aggregate(client: &InferenceServiceClient<Channel>, streams: usize) -> f64 {
    let started = Instant::now();
    let runs: Vec<Run> = join_all((0..streams).map(|i| {
        let mut client = client.clone();
        async move {
            let prompt = format!("Tell story number {i} about a lighthouse.");
            grpc_run(&mut client, greedy(&prompt, DECODE_TOKENS)).await
        }
    }))
    .await;
    f64::from(runs.iter().map(|run| run.tokens).sum::<u32>()) / started.elapsed().as_secs_f64()
}

/// EnhanceTask's time to first token, when its one attempt gave a valid
/// answer (the figure only comes with an answer).
async fn enhance_first_token(
    client: &mut InferenceServiceClient<Channel>,
    title: &str,
) -> Option<f64> {
    let response = client
        .enhance_task(EnhanceTaskRequest {
            task: Some(Task {
                title: title.into(),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .ok()?
        .into_inner();
    let first = response.meta?.time_to_first_token?;
    Some(first.seconds as f64 + f64::from(first.nanos) / 1e9)
}

#[tokio::main]
async fn main() {
    let (service, mut client) = Service::start(&[
        ("INFERENCE_BACKEND", "mlx"),
        ("RIGGER_MLX_MAX_BATCH", "4"),
        // One attempt per call: a repaired answer's first token counts from
        // the start of the call, so it would include the rejected attempts.
        ("RIGGER_TASK_ATTEMPTS", "1"),
    ])
    .await;
    let model = converted_model();
    println!(
        "MLX (Linux CPU build, OpenBLAS float32 path {}), SmolLM2-135M-Instruct from its GGUF, medians of {ROUNDS}",
        if blas().is_file() {
            "on"
        } else {
            "unavailable: off"
        }
    );

    let enhance_cold = enhance_first_token(&mut client, "Add dark mode")
        .await
        .unwrap_or(f64::NAN);
    let mut enhance_cached = Vec::new();
    for title in [
        "Add password reset",
        "Write API docs",
        "Add rate limiting",
        "Add search",
        "Export invoices as PDF",
        "Add two-factor authentication",
    ] {
        enhance_cached.extend(enhance_first_token(&mut client, title).await);
    }

    let mut ours = Vec::new();
    for _ in 0..ROUNDS {
        let started = Instant::now();
        grpc_run(&mut client, greedy(PROMPT, SHORT_TOKENS)).await;
        ours.push(started.elapsed().as_secs_f64());
    }
    let baseline: Vec<f64> = (0..ROUNDS).map(|_| per_call_seconds(&model)).collect();
    let (ours, baseline) = (median(ours), median(baseline));
    println!(
        "{:<52} {:>10} {:>10} {:>7}",
        "", "service", "baseline", "ratio"
    );
    println!(
        "{:<52} {:>10.2} {:>10.2} {:>7.2}",
        "16-token request, seconds (baseline: python -c per call)",
        ours,
        baseline,
        baseline / ours
    );

    let mut decode = Vec::new();
    let mut prefill = Vec::new();
    for round in 0..ROUNDS {
        // A new prompt each round, so prefill is not served from the cache.
        let prompt = format!("{PROMPT} Round {round}: make it about {round} ships.");
        let run = grpc_run(&mut client, greedy(&prompt, DECODE_TOKENS)).await;
        assert!(!run.text.is_empty(), "the model answered");
        prefill.push(run.prefill_rate());
        decode.push(run.decode_rate());
    }
    let output = python_with_blas(
        DIRECT,
        &[
            model.to_str().unwrap(),
            &DECODE_TOKENS.to_string(),
            &format!("{PROMPT} Round 0: make it about 0 ships."),
        ],
    )
    .output()
    .expect("python");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let direct: f64 = String::from_utf8_lossy(&output.stdout)
        .trim()
        .parse()
        .expect("a rate");
    let decode = median(decode);
    println!(
        "{:<52} {:>10.1} {:>10} {:>7}",
        "prefill tokens/s (chat prompt, cold)",
        median(prefill),
        "-",
        "-"
    );
    println!(
        "{:<52} {:>10.1} {:>10.1} {:>7.2}",
        "decode tokens/s (baseline: mlx_lm.stream_generate)",
        decode,
        direct,
        decode / direct
    );

    let single = aggregate(&client, 1).await;
    for streams in [2, 4] {
        let rate = aggregate(&client, streams).await;
        println!(
            "{:<52} {:>10.1} {:>10.1} {:>7.2}",
            format!("aggregate decode tokens/s, {streams} streams vs 1"),
            rate,
            single,
            rate / single
        );
    }
    if enhance_cached.is_empty() {
        println!("EnhanceTask first token: no valid single-attempt answer with the prefix cached");
    } else {
        println!(
            "{:<52} {:>10.0} {:>10.0} {:>7.2}",
            "EnhanceTask first token ms, prefix cached vs cold",
            median(enhance_cached.clone()) * 1000.0,
            enhance_cold * 1000.0,
            median(enhance_cached.clone()) / enhance_cold
        );
        println!(
            "EnhanceTask first token with the prefix cached, {} valid answers: p50 {:.0} ms, max {:.0} ms",
            enhance_cached.len(),
            percentile(enhance_cached.clone(), 0.5) * 1000.0,
            percentile(enhance_cached, 1.0) * 1000.0
        );
    }
    let worker = worker_of(service.child.id());
    println!(
        "peak RSS: service {:.0} MiB, MLX worker {:.0} MiB",
        peak_rss_mib(service.child.id()),
        worker.map_or(f64::NAN, peak_rss_mib)
    );
}

/// The worker process the service started.
fn worker_of(service: u32) -> Option<u32> {
    std::fs::read_dir("/proc")
        .ok()?
        .filter_map(Result::ok)
        .find_map(|entry| {
            let pid: u32 = entry.file_name().to_string_lossy().parse().ok()?;
            let stat = std::fs::read_to_string(entry.path().join("stat")).ok()?;
            let parent: u32 = stat
                .rsplit_once(')')?
                .1
                .split_whitespace()
                .nth(1)?
                .parse()
                .ok()?;
            (parent == service).then_some(pid)
        })
}
