//! Many instances: 8 multi-turn conversations × 6 turns, sharing one long
//! system prompt, through one gateway (the service as its own process)
//! over three llama.cpp servers (one thread, four slots each, loopback),
//! for each routing policy: time to first token p50/p90, the share of
//! prompt tokens served from the servers' prompt caches, and aggregate
//! throughput. The conversations run concurrently, each turn after the
//! last. Prints a table and writes `benches/results/instances.json`.
//!
//! Goal (issue 16): `prefix` p90 TTFT ≤ 0.5× `round-robin`.
//!
//! Run: `make bench-instances`.

// Shared with the other benchmarks, which use what this one does not.
#[allow(dead_code)]
mod common;
#[path = "../tests/support/mod.rs"]
mod support;

use std::time::{Duration, Instant};

use common::{Run, Service, grpc_run, percentile};
use futures_util::future::join_all;
use rigger_inference::proto::{
    ChatMessage, GenerateRequest, GetStatusRequest, Role,
    inference_service_client::InferenceServiceClient,
};
use serde_json::json;
use support::{LlamaServer, greedy};
use tonic::transport::Channel;

const CONVERSATIONS: usize = 8;
const TURNS: usize = 6;
const ANSWER_TOKENS: u32 = 16;
const POLICIES: [&str; 3] = ["prefix", "least-loaded", "round-robin"];

fn message(role: Role, content: String) -> ChatMessage {
    ChatMessage {
        role: role.into(),
        content,
    }
}

/// One conversation's turns, each sent with the whole history.
async fn conversation(
    mut client: InferenceServiceClient<Channel>,
    system: String,
    number: usize,
) -> Vec<Run> {
    let mut history = vec![message(Role::System, system)];
    let mut runs = Vec::with_capacity(TURNS);
    for turn in 0..TURNS {
        history.push(message(
            Role::User,
            format!(
                "Conversation {number}, turn {turn}. The feature touches checkout, stock, \
                 invoices and e-mail; list the next concrete step and the file it changes. {}",
                "Keep it short and specific to this shop. ".repeat(3)
            ),
        ));
        let request = GenerateRequest {
            prompt: String::new(),
            messages: history.clone(),
            ..greedy("", ANSWER_TOKENS)
        };
        let run = grpc_run(&mut client, request).await;
        history.push(message(Role::Assistant, run.text.clone()));
        runs.push(run);
    }
    runs
}

struct Figures {
    policy: &'static str,
    ttft_p50: Duration,
    ttft_p90: Duration,
    cached_share: f64,
    tokens_per_second: f64,
    calls_per_instance: Vec<u64>,
}

async fn measure(servers: &[LlamaServer], policy: &'static str) -> Figures {
    let urls: Vec<String> = servers.iter().map(LlamaServer::openai_url).collect();
    let urls = urls.join(",");
    let (_service, client) = Service::start(&[
        ("INFERENCE_BACKEND", "openai"),
        ("OPENAI_BASE_URL", &urls),
        ("RIGGER_ROUTING", policy),
    ])
    .await;
    // A system prompt of this run's own: no run finds another's cached.
    let system = format!(
        "Run {policy}. You are the planner of a team that builds a web shop in Rust. {}",
        "Every answer names one concrete step, the module it touches and how to test it. "
            .repeat(12)
    );
    let started = Instant::now();
    let runs: Vec<Run> = join_all(
        (0..CONVERSATIONS).map(|number| conversation(client.clone(), system.clone(), number)),
    )
    .await
    .into_iter()
    .flatten()
    .collect();
    let wall = started.elapsed();
    let ttfts: Vec<f64> = runs
        .iter()
        .map(|run| run.first_token.as_secs_f64())
        .collect();
    let prompt: u32 = runs.iter().map(|run| run.prompt_tokens).sum();
    let cached: u32 = runs.iter().map(|run| run.cached_prompt_tokens).sum();
    let generated: u32 = runs.iter().map(|run| run.tokens).sum();
    let status = client
        .clone()
        .get_status(GetStatusRequest {})
        .await
        .expect("GetStatus")
        .into_inner();
    Figures {
        policy,
        ttft_p50: Duration::from_secs_f64(percentile(ttfts.clone(), 0.5)),
        ttft_p90: Duration::from_secs_f64(percentile(ttfts, 0.9)),
        cached_share: f64::from(cached) / f64::from(prompt),
        tokens_per_second: f64::from(generated) / wall.as_secs_f64(),
        calls_per_instance: status.backends[0]
            .instances
            .iter()
            .map(|instance| instance.calls)
            .collect(),
    }
}

#[tokio::main]
async fn main() {
    let servers: Vec<LlamaServer> = (0..3).map(|_| LlamaServer::start_with("1", "4")).collect();
    let mut figures = Vec::new();
    for policy in POLICIES {
        figures.push(measure(&servers, policy).await);
    }
    println!(
        "{CONVERSATIONS} conversations x {TURNS} turns, 3 llama.cpp servers (1 thread, 4 slots)"
    );
    println!("policy        TTFT p50  TTFT p90  cached  tok/s  calls per instance");
    for f in &figures {
        println!(
            "{:<12} {:>7.0}ms {:>7.0}ms {:>6.1}% {:>6.1}  {:?}",
            f.policy,
            f.ttft_p50.as_secs_f64() * 1e3,
            f.ttft_p90.as_secs_f64() * 1e3,
            f.cached_share * 100.0,
            f.tokens_per_second,
            f.calls_per_instance
        );
    }
    let p90 = |policy: &str| {
        figures
            .iter()
            .find(|f| f.policy == policy)
            .map(|f| f.ttft_p90.as_secs_f64())
            .unwrap_or(f64::NAN)
    };
    let ratio = p90("prefix") / p90("round-robin");
    println!(
        "prefix p90 TTFT / round-robin: {ratio:.2} (goal <= 0.5: {})",
        if ratio <= 0.5 { "met" } else { "not met" }
    );
    let results = json!({
        "conversations": CONVERSATIONS,
        "turns": TURNS,
        "answer_tokens": ANSWER_TOKENS,
        "instances": servers.len(),
        "policies": figures.iter().map(|f| json!({
            "policy": f.policy,
            "ttft_p50_ms": f.ttft_p50.as_secs_f64() * 1e3,
            "ttft_p90_ms": f.ttft_p90.as_secs_f64() * 1e3,
            "cached_prompt_share": f.cached_share,
            "tokens_per_second": f.tokens_per_second,
            "calls_per_instance": f.calls_per_instance,
        })).collect::<Vec<_>>(),
        "prefix_over_round_robin_p90": ratio,
    });
    let path = support::repo_path("benches/results/instances.json");
    std::fs::write(&path, serde_json::to_string_pretty(&results).unwrap())
        .expect("write benches/results/instances.json");
    println!("written to {}", path.display());
}
