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
//! The policies run in turn, `BENCH_ROUNDS` times (default 2), so a
//! machine whose load drifts weighs on each alike; each figure is the
//! median over rounds. `BENCH_PREFIX_GAPS` (default `1,4`) lists the
//! `--prefix-max-load-gap` values `prefix` runs with.
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

/// A routing policy as the gateway is configured for it.
#[derive(Clone)]
struct Policy {
    label: String,
    routing: &'static str,
    /// `--prefix-max-load-gap`, for `prefix`.
    gap: Option<String>,
}

fn policies() -> Vec<Policy> {
    let gaps = std::env::var("BENCH_PREFIX_GAPS").unwrap_or_else(|_| "1,4".to_owned());
    let prefix = gaps.split(',').map(|gap| Policy {
        label: format!("prefix gap {gap}"),
        routing: "prefix",
        gap: Some(gap.trim().to_owned()),
    });
    let others = ["least-loaded", "round-robin"].map(|routing| Policy {
        label: routing.to_owned(),
        routing,
        gap: None,
    });
    prefix.chain(others).collect()
}

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
    policy: String,
    ttft_p50: Duration,
    ttft_p90: Duration,
    cached_share: f64,
    tokens_per_second: f64,
    calls_per_instance: Vec<u64>,
}

async fn measure(servers: &[LlamaServer], policy: &Policy, round: usize) -> Figures {
    let urls: Vec<String> = servers.iter().map(LlamaServer::openai_url).collect();
    let urls = urls.join(",");
    let mut settings = vec![
        ("INFERENCE_BACKEND", "openai"),
        ("OPENAI_BASE_URL", urls.as_str()),
        ("RIGGER_ROUTING", policy.routing),
    ];
    if let Some(gap) = &policy.gap {
        settings.push(("RIGGER_PREFIX_MAX_LOAD_GAP", gap));
    }
    let (_service, client) = Service::start(&settings).await;
    // A system prompt of this run's own: no run finds another's cached.
    let system = format!(
        "Run {} round {round}. You are the planner of a team that builds a web shop in Rust. {}",
        "Every answer names one concrete step, the module it touches and how to test it. "
            .repeat(12),
        policy.label
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
        policy: policy.label.clone(),
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

/// Each policy's figures, the median of its rounds (calls per instance:
/// the last round's).
fn medians(rounds: &[Figures], label: &str) -> Figures {
    let of = |pick: fn(&Figures) -> f64| {
        common::median(
            rounds
                .iter()
                .filter(|f| f.policy == label)
                .map(pick)
                .collect(),
        )
    };
    Figures {
        policy: label.to_owned(),
        ttft_p50: Duration::from_secs_f64(of(|f| f.ttft_p50.as_secs_f64())),
        ttft_p90: Duration::from_secs_f64(of(|f| f.ttft_p90.as_secs_f64())),
        cached_share: of(|f| f.cached_share),
        tokens_per_second: of(|f| f.tokens_per_second),
        calls_per_instance: rounds
            .iter()
            .rev()
            .find(|f| f.policy == label)
            .map(|f| f.calls_per_instance.clone())
            .unwrap_or_default(),
    }
}

#[tokio::main]
async fn main() {
    let rounds: usize = std::env::var("BENCH_ROUNDS")
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or(2);
    let servers: Vec<LlamaServer> = (0..3).map(|_| LlamaServer::start_with("1", "4")).collect();
    let policies = policies();
    let mut measured = Vec::new();
    for round in 0..rounds {
        for policy in &policies {
            measured.push(measure(&servers, policy, round).await);
        }
    }
    let figures: Vec<Figures> = policies
        .iter()
        .map(|policy| medians(&measured, &policy.label))
        .collect();
    println!(
        "{CONVERSATIONS} conversations x {TURNS} turns, 3 llama.cpp servers (1 thread, 4 slots), median of {rounds} rounds"
    );
    println!("policy           TTFT p50  TTFT p90  cached  tok/s  calls per instance");
    for f in &figures {
        println!(
            "{:<15} {:>7.0}ms {:>7.0}ms {:>6.1}% {:>6.1}  {:?}",
            f.policy,
            f.ttft_p50.as_secs_f64() * 1e3,
            f.ttft_p90.as_secs_f64() * 1e3,
            f.cached_share * 100.0,
            f.tokens_per_second,
            f.calls_per_instance
        );
    }
    let p90 = |label: &str| {
        figures
            .iter()
            .find(|f| f.policy == label)
            .map(|f| f.ttft_p90.as_secs_f64())
            .unwrap_or(f64::NAN)
    };
    let ratios: Vec<(String, f64)> = figures
        .iter()
        .filter(|f| f.policy.starts_with("prefix"))
        .map(|f| (f.policy.clone(), p90(&f.policy) / p90("round-robin")))
        .collect();
    for (label, ratio) in &ratios {
        println!(
            "{label}: p90 TTFT / round-robin {ratio:.2} (goal <= 0.5: {})",
            if *ratio <= 0.5 { "met" } else { "not met" }
        );
    }
    let results = json!({
        "conversations": CONVERSATIONS,
        "turns": TURNS,
        "answer_tokens": ANSWER_TOKENS,
        "instances": servers.len(),
        "rounds": rounds,
        "policies": figures.iter().map(|f| json!({
            "policy": f.policy,
            "ttft_p50_ms": f.ttft_p50.as_secs_f64() * 1e3,
            "ttft_p90_ms": f.ttft_p90.as_secs_f64() * 1e3,
            "cached_prompt_share": f.cached_share,
            "tokens_per_second": f.tokens_per_second,
            "calls_per_instance": f.calls_per_instance,
        })).collect::<Vec<_>>(),
        "prefix_over_round_robin_p90": ratios
            .iter()
            .map(|(label, ratio)| json!({ "policy": label, "ratio": ratio }))
            .collect::<Vec<_>>(),
    });
    let path = support::repo_path("benches/results/instances.json");
    std::fs::write(&path, serde_json::to_string_pretty(&results).unwrap())
        .expect("write benches/results/instances.json");
    println!("written to {}", path.display());
}
