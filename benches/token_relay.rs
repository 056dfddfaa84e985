//! Token relay cost: Generate through rigger-inference against the same
//! llama.cpp server called directly, same prompt and settings, one request at
//! a time. Prints median tokens/s and time to first token for both paths.
//!
//! Run: `cargo bench --bench token_relay` (after `make test` or
//! `scripts/setup-python.sh` has installed the venv and model).
//! `RELAY_ROUNDS` (default 7) and `RELAY_MAX_TOKENS` (default 128) tune it.

#[path = "../tests/support/mod.rs"]
mod support;

use std::time::{Duration, Instant};

use futures_util::StreamExt;
use rigger_inference::proto::{GenerateRequest, SamplingOptions, generate_response::Event};
use serde_json::json;
use support::{LlamaServer, MODEL_ALIAS, TestServer, config};

const PROMPT: &str =
    "Write a short story about a lighthouse keeper who finds a message in a bottle.";

struct Run {
    tokens: u32,
    first_token: Duration,
    total: Duration,
}

impl Run {
    fn tokens_per_second(&self) -> f64 {
        f64::from(self.tokens) / self.total.as_secs_f64()
    }
}

async fn direct(client: &reqwest::Client, base_url: &str, max_tokens: u32) -> Run {
    let started = Instant::now();
    let response = client
        .post(format!("{base_url}/chat/completions"))
        .json(&json!({
            "model": MODEL_ALIAS,
            "messages": [{"role": "user", "content": PROMPT}],
            "stream": true,
            "stream_options": {"include_usage": true},
            "max_tokens": max_tokens,
            "temperature": 0.0,
            "seed": 1,
        }))
        .send()
        .await
        .expect("llama.cpp answers");
    let mut body = response.bytes_stream();
    let mut pending = String::new();
    let mut first_token = None;
    let mut tokens = 0;
    while let Some(bytes) = body.next().await {
        pending.push_str(std::str::from_utf8(&bytes.expect("body")).expect("UTF-8"));
        while let Some(end) = pending.find('\n') {
            let line: String = pending.drain(..=end).collect();
            let Some(data) = line.trim().strip_prefix("data: ") else {
                continue;
            };
            if data == "[DONE]" {
                continue;
            }
            let chunk: serde_json::Value = serde_json::from_str(data).expect("JSON chunk");
            if chunk["choices"][0]["delta"]["content"].is_string() && first_token.is_none() {
                first_token = Some(started.elapsed());
            }
            if let Some(count) = chunk["usage"]["completion_tokens"].as_u64() {
                tokens = count as u32;
            }
        }
    }
    Run {
        tokens,
        first_token: first_token.expect("some text"),
        total: started.elapsed(),
    }
}

async fn relayed(
    client: &mut rigger_inference::proto::inference_service_client::InferenceServiceClient<
        tonic::transport::Channel,
    >,
    max_tokens: u32,
) -> Run {
    let started = Instant::now();
    let mut stream = client
        .generate(GenerateRequest {
            prompt: PROMPT.into(),
            sampling: Some(SamplingOptions {
                max_tokens: Some(max_tokens),
                temperature: Some(0.0),
                seed: Some(1),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .expect("Generate accepted")
        .into_inner();
    let mut first_token = None;
    let mut tokens = 0;
    while let Some(message) = stream.next().await {
        match message.expect("no error").event.expect("event") {
            Event::Text(_) => {
                first_token.get_or_insert_with(|| started.elapsed());
            }
            Event::Summary(summary) => tokens = summary.meta.expect("meta").completion_tokens,
        }
    }
    Run {
        tokens,
        first_token: first_token.expect("some text"),
        total: started.elapsed(),
    }
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

fn env_or(name: &str, default: u32) -> u32 {
    std::env::var(name)
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or(default)
}

#[tokio::main]
async fn main() {
    let rounds = env_or("RELAY_ROUNDS", 7);
    let max_tokens = env_or("RELAY_MAX_TOKENS", 128);
    let llama = LlamaServer::start();
    let base_url = llama.openai_url();
    let server = TestServer::start(config(&[
        "--backend",
        "openai",
        "--openai-base-url",
        &base_url,
    ]))
    .await;
    let mut grpc = server.client().await;
    let http = reqwest::Client::new();

    direct(&http, &base_url, max_tokens).await;
    relayed(&mut grpc, max_tokens).await;
    let (mut direct_runs, mut relayed_runs) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        direct_runs.push(direct(&http, &base_url, max_tokens).await);
        relayed_runs.push(relayed(&mut grpc, max_tokens).await);
    }
    for run in direct_runs.iter().chain(&relayed_runs) {
        assert_eq!(
            run.tokens, max_tokens,
            "every run generates the full budget"
        );
    }
    let summarize = |runs: &[Run]| {
        (
            median(runs.iter().map(Run::tokens_per_second).collect()),
            median(
                runs.iter()
                    .map(|run| run.first_token.as_secs_f64() * 1000.0)
                    .collect(),
            ),
        )
    };
    let (direct_tps, direct_ttft) = summarize(&direct_runs);
    let (relayed_tps, relayed_ttft) = summarize(&relayed_runs);
    println!(
        "token relay: SmolLM2-135M-Instruct Q4_1 on llama.cpp server (1 thread), {max_tokens} tokens, greedy, {rounds} rounds, medians"
    );
    println!("{:<28} {:>12} {:>10}", "path", "tokens/s", "TTFT ms");
    println!(
        "{:<28} {:>12.1} {:>10.1}",
        "llama.cpp server direct", direct_tps, direct_ttft
    );
    println!(
        "{:<28} {:>12.1} {:>10.1}",
        "rigger-inference Generate", relayed_tps, relayed_ttft
    );
    println!(
        "ratio (relayed / direct): tokens/s {:.3}, TTFT {:.3}",
        relayed_tps / direct_tps,
        relayed_ttft / direct_ttft
    );
}
