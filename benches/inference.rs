//! Inference figures in one run, against llama.cpp's own server (PyPI
//! xllamacpp) on the same GGUF with the same thread count:
//! - the embedded engine: single-stream prefill and decode, aggregate decode at
//!   1/4/8 streams (batched answers checked against solo ones), time to first
//!   token of the last of 4 simultaneous requests vs one after another,
//!   EnhanceTask with and without the cached prompt prefix, the cost of schema
//!   enforcement, and peak memory;
//! - the OpenAI-compatible backend: what relaying through the service costs
//!   against calling the same llama.cpp server directly.
//!
//! Run: `make bench` (or `cargo bench --bench inference` with build.env sourced).

// Shared with the other benchmarks, which use what this one does not.
#[allow(dead_code)]
mod common;
#[path = "../tests/support/mod.rs"]
mod support;

use std::time::{Duration, Instant};

use common::{Run, Service, grpc_run, median, peak_rss_mib, percentile};
use futures_util::{StreamExt, future::join_all};
use rigger_inference::proto::{
    EnhanceTaskRequest, SamplingOptions, Task, inference_service_client::InferenceServiceClient,
};
use serde_json::json;
use support::{LlamaServer, MODEL_ALIAS, TestServer, config, greedy, model_path};
use tonic::transport::Channel;

const THREADS: &str = "1";
const DECODE_TOKENS: u32 = 96;

fn long_prompt(round: usize) -> String {
    format!(
        "Note {round}. You are reviewing a design document for a payment service. {} \
         Summarize the main risks in a long answer.",
        "The service stores card tokens, talks to three acquirers, retries failed captures, \
         and reconciles settlements nightly. "
            .repeat(6)
    )
}

/// The service on its embedded engine with `parallel` sequences.
async fn embedded_service(parallel: &str) -> (Service, InferenceServiceClient<Channel>) {
    let model = model_path();
    Service::start(&[
        ("INFERENCE_BACKEND", "embedded"),
        ("RIGGER_MODEL_PATH", model.to_str().expect("UTF-8 path")),
        ("RIGGER_THREADS", THREADS),
        ("RIGGER_PARALLEL", parallel),
    ])
    .await
}

/// A generation straight from the llama.cpp server. `cache_prompt` as our
/// openai backend leaves it (llama.cpp's default: on) for the relay
/// comparison, off to measure prefill.
async fn direct_run(
    http: &reqwest::Client,
    base: &str,
    prompt: &str,
    max_tokens: u32,
    cache_prompt: bool,
) -> Run {
    let started = Instant::now();
    let response = http
        .post(format!("{base}/chat/completions"))
        .json(&json!({
            "model": MODEL_ALIAS,
            "messages": [{"role": "user", "content": prompt}],
            "stream": true, "stream_options": {"include_usage": true},
            "max_tokens": max_tokens, "temperature": 0.0, "cache_prompt": cache_prompt,
        }))
        .send()
        .await
        .expect("llama.cpp server");
    let mut body = response.bytes_stream();
    let (mut pending, mut text, mut first_token) = (String::new(), String::new(), None);
    let (mut tokens, mut prompt_tokens, mut cached_prompt_tokens) = (0, 0, 0);
    while let Some(bytes) = body.next().await {
        pending.push_str(std::str::from_utf8(&bytes.expect("body")).expect("UTF-8"));
        while let Some(end) = pending.find('\n') {
            let line: String = pending.drain(..=end).collect();
            let Some(data) = line.trim().strip_prefix("data: ") else {
                continue;
            };
            let Ok(chunk) = serde_json::from_str::<serde_json::Value>(data) else {
                continue;
            };
            if let Some(piece) = chunk["choices"][0]["delta"]["content"].as_str() {
                first_token.get_or_insert_with(|| started.elapsed());
                text.push_str(piece);
            }
            if let Some(usage) = chunk.get("usage").filter(|usage| usage.is_object()) {
                tokens = usage["completion_tokens"].as_u64().unwrap_or(0) as u32;
                prompt_tokens = usage["prompt_tokens"].as_u64().unwrap_or(0) as u32;
                cached_prompt_tokens = usage["prompt_tokens_details"]["cached_tokens"]
                    .as_u64()
                    .unwrap_or(0) as u32;
            }
        }
    }
    Run {
        text,
        prompt_tokens,
        cached_prompt_tokens,
        tokens,
        first_token: first_token.expect("text"),
        total: started.elapsed(),
    }
}

async fn aggregate_decode(
    client: &InferenceServiceClient<Channel>,
    streams: usize,
) -> (f64, Vec<String>) {
    let prompts: Vec<String> = (0..streams)
        .map(|i| format!("Tell story number {i} about a lighthouse."))
        .collect();
    let started = Instant::now();
    let runs = join_all(prompts.iter().map(|prompt| {
        let mut client = client.clone();
        async move { grpc_run(&mut client, greedy(prompt, DECODE_TOKENS)).await }
    }))
    .await;
    let tokens: u32 = runs.iter().map(|run| run.tokens).sum();
    (
        f64::from(tokens) / started.elapsed().as_secs_f64(),
        runs.into_iter().map(|run| run.text).collect(),
    )
}

/// Generate through the openai backend vs the same llama.cpp server directly.
async fn relay_overhead(http: &reqwest::Client, base: &str, rounds: usize) {
    let relay =
        TestServer::start(config(&["--backend", "openai", "--openai-base-url", base])).await;
    let mut client = relay.client().await;
    grpc_run(&mut client, greedy("Warm up.", 4)).await;
    let (mut relayed, mut direct) = (Vec::new(), Vec::new());
    for round in 0..rounds {
        relayed.push(
            grpc_run(
                &mut client,
                greedy(&long_prompt(round + 200), DECODE_TOKENS),
            )
            .await,
        );
        direct.push(direct_run(http, base, &long_prompt(round + 300), DECODE_TOKENS, true).await);
    }
    println!(
        "token relay, openai backend vs llama.cpp server called directly, medians of {rounds}"
    );
    println!(
        "{:<44} {:>12} {:>12} {:>7}",
        "", "relayed", "direct", "ratio"
    );
    let decode = |runs: &[Run]| median(runs.iter().map(Run::decode_rate).collect());
    let ttft = |runs: &[Run]| {
        median(
            runs.iter()
                .map(|run| run.first_token.as_secs_f64() * 1000.0)
                .collect(),
        )
    };
    let (a, b) = (decode(&relayed), decode(&direct));
    println!(
        "{:<44} {a:>12.1} {b:>12.1} {:>7.3}",
        "decode tokens/s",
        a / b
    );
    let (a, b) = (ttft(&relayed), ttft(&direct));
    println!(
        "{:<44} {a:>9.1} ms {b:>9.1} ms {:>7.3}",
        "time to first token",
        a / b
    );
    println!();
}

#[tokio::main]
async fn main() {
    let rounds = 3;
    let (service, mut client) = embedded_service("8").await;
    let llama = LlamaServer::start_with(THREADS, "8");
    let http = reqwest::Client::new();
    let base = llama.openai_url();

    grpc_run(&mut client, greedy("Warm up.", 4)).await;
    direct_run(&http, &base, "Warm up.", 4, false).await;
    relay_overhead(&http, &base, rounds).await;

    let (mut ours, mut theirs) = (Vec::new(), Vec::new());
    for round in 0..rounds {
        ours.push(grpc_run(&mut client, greedy(&long_prompt(round), DECODE_TOKENS)).await);
        theirs.push(
            direct_run(
                &http,
                &base,
                &long_prompt(round + 100),
                DECODE_TOKENS,
                false,
            )
            .await,
        );
    }
    let rate = |runs: &[Run], f: fn(&Run) -> f64| median(runs.iter().map(f).collect());
    println!(
        "embedded engine vs llama.cpp server, SmolLM2-135M-Instruct Q4_1, {THREADS} thread, medians of {rounds}"
    );
    println!(
        "{:<44} {:>12} {:>12} {:>7}",
        "single stream", "embedded", "llama.cpp", "ratio"
    );
    for (name, f) in [
        ("prefill tokens/s", Run::prefill_rate as fn(&Run) -> f64),
        ("decode tokens/s", Run::decode_rate),
    ] {
        let (a, b) = (rate(&ours, f), rate(&theirs, f));
        println!("{name:<44} {a:>12.1} {b:>12.1} {:>7.2}", a / b);
    }

    let mut solo = Vec::new();
    for i in 0..4 {
        let prompt = format!("Tell story number {i} about a lighthouse.");
        solo.push(
            grpc_run(&mut client, greedy(&prompt, DECODE_TOKENS))
                .await
                .text,
        );
    }
    let (one, _) = aggregate_decode(&client, 1).await;
    let (four, four_texts) = aggregate_decode(&client, 4).await;
    let (eight, _) = aggregate_decode(&client, 8).await;
    println!(
        "{:<44} {:>12.1}",
        "aggregate decode tokens/s, 1 stream", one
    );
    println!(
        "{:<44} {:>12.1} {:>12} {:>7.2}",
        "aggregate decode tokens/s, 4 streams",
        four,
        "",
        four / one
    );
    println!(
        "{:<44} {:>12.1} {:>12} {:>7.2}",
        "aggregate decode tokens/s, 8 streams",
        eight,
        "",
        eight / one
    );
    println!(
        "{:<44} {:>12}",
        "4 batched answers identical to solo",
        four_texts == solo
    );

    let prompts: Vec<String> = (0..4)
        .map(|i| format!("Ticket {i}: the export button does nothing."))
        .collect();
    let serial_started = Instant::now();
    let mut serial_last = Duration::ZERO;
    for prompt in &prompts {
        let run = grpc_run(&mut client, greedy(prompt, 32)).await;
        serial_last = serial_started.elapsed() - run.total + run.first_token;
    }
    let together = join_all(prompts.iter().map(|prompt| {
        let mut client = client.clone();
        let prompt = format!("{prompt} (again)");
        async move { grpc_run(&mut client, greedy(&prompt, 32)).await.first_token }
    }))
    .await;
    let together_last = together.into_iter().max().unwrap_or_default();
    println!(
        "{:<44} {:>9.0} ms {:>9.0} ms {:>7.2}",
        "TTFT of the last of 4 (together vs serial)",
        together_last.as_secs_f64() * 1000.0,
        serial_last.as_secs_f64() * 1000.0,
        together_last.as_secs_f64() / serial_last.as_secs_f64()
    );

    drop(service);
    let (service, mut client) = embedded_service("4").await;
    let enhance = |title: String| EnhanceTaskRequest {
        task: Some(Task {
            title,
            ..Default::default()
        }),
        sampling: Some(SamplingOptions {
            temperature: Some(0.0),
            max_tokens: Some(400),
            ..Default::default()
        }),
        ..Default::default()
    };
    let ttft_of = |response: rigger_inference::proto::EnhanceTaskResponse| {
        let meta = response.meta.expect("meta");
        let ttft = meta.time_to_first_token.expect("ttft");
        (
            ttft.seconds as f64 + f64::from(ttft.nanos) / 1e9,
            meta.cached_prompt_tokens,
        )
    };
    let (cold, cold_cached) = ttft_of(
        client
            .enhance_task(enhance("Add a logout button".into()))
            .await
            .unwrap()
            .into_inner(),
    );
    let mut warm = Vec::new();
    let mut warm_cached = 0;
    for i in 0..5 {
        let (ttft, cached) = ttft_of(
            client
                .enhance_task(enhance(format!("Fix bug number {i} in search")))
                .await
                .unwrap()
                .into_inner(),
        );
        warm.push(ttft);
        warm_cached = cached;
    }
    println!(
        "{:<44} {:>9.0} ms {:>9.0} ms {:>7.2}",
        format!("EnhanceTask TTFT, prefix cached ({warm_cached}) vs cold ({cold_cached})"),
        median(warm.clone()) * 1000.0,
        cold * 1000.0,
        median(warm.clone()) / cold
    );
    println!(
        "{:<44} {:>9.0} ms {:>9.0} ms",
        "EnhanceTask TTFT with cached prefix p50 / p99",
        percentile(warm.clone(), 0.5) * 1000.0,
        percentile(warm, 0.99) * 1000.0
    );

    let schema = json!({"type": "object", "properties": {"story": {"type": "string"}}, "required": ["story"]});
    let (mut free, mut constrained) = (Vec::new(), Vec::new());
    for round in 0..rounds {
        let prompt = format!("Story {round}: write a long story about the sea as JSON.");
        free.push(
            grpc_run(&mut client, greedy(&prompt, DECODE_TOKENS))
                .await
                .decode_rate(),
        );
        let mut request = greedy(&prompt, DECODE_TOKENS);
        request.json_schema = schema.to_string();
        constrained.push(grpc_run(&mut client, request).await.decode_rate());
    }
    let (free, constrained) = (median(free), median(constrained));
    println!(
        "{:<44} {:>12.1} {:>12.1} {:>6.1}%",
        "decode tokens/s with schema vs without, cost",
        constrained,
        free,
        (1.0 - constrained / free) * 100.0
    );
    println!(
        "{:<44} {:>9.0} MiB {:>8.0} MiB",
        "peak RSS (embedded server vs llama.cpp server)",
        peak_rss_mib(service.child.id()),
        peak_rss_mib(llama.pid())
    );
}
