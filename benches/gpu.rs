//! The GPU bench's load generator: one engine at a time, either through the
//! gateway (this service's gRPC API) or directly on an OpenAI-compatible
//! server (llama.cpp's `llama-server`, `mlx_lm.server`), at several
//! concurrency levels. Per level it reports decode tokens/s of a stream,
//! aggregate tokens/s, time to first token (p50, p99) and every failed
//! request; `--table` turns the JSON lines of several runs into the
//! markdown table of issue 15 with the gateway's relay ratio (gateway ÷
//! direct aggregate tokens/s, goal ≥ 0.97 at every concurrency).
//!
//! It starts no service: `scripts/device-gpu.sh` starts the runtimes and
//! the gateway on the GPU machine and runs this executable against each.
//! That machine has no Rust toolchain, so it is built here
//! (`cargo bench --bench gpu --no-run`, with build.env sourced), stripped,
//! carried there, and takes everything from its command line. Against the
//! gateway and directly it sends the same kind of prompts (built from the
//! request's index and `--prompt-set`), so the two runs of one runtime
//! differ only by the relay; a second run against one runtime process takes
//! another prompt set, or its prompt cache would serve the prompts:
//!
//!   gpu --openai http://127.0.0.1:8080 --label llama-server-direct \
//!       --streams 1,8,32,64 --tokens 128 --warm-up --json results.jsonl
//!   gpu --grpc 127.0.0.1:50051 --label llama-server-gateway --prompt-set 1 ...
//!   gpu --grpc 127.0.0.1:50051 --rpc decompose --label embedded-decompose ...
//!   gpu --table results.jsonl
//!
//! It exits non-zero when any measured request failed, after printing
//! everything.

// Shared with the other benchmarks, which use what this one does not.
#[allow(dead_code)]
mod common;
#[path = "../tests/support/mod.rs"]
mod support;

use std::{
    collections::BTreeMap,
    fs::OpenOptions,
    io::Write,
    path::{Path, PathBuf},
    process::ExitCode,
    time::{Duration, Instant, SystemTime},
};

use clap::{ArgGroup, Parser, ValueEnum};
use common::{median, percentile, try_grpc_run};
use futures_util::{StreamExt, future::join_all};
use rigger_inference::proto::{
    ChatMessage, DecomposeTaskRequest, EnhanceTaskRequest, GenerateRequest, GetStatusRequest,
    ResponseMeta, Role, SamplingOptions, Task, TaskContext,
    inference_service_client::InferenceServiceClient,
};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tonic::transport::{Channel, Endpoint};

/// Max tokens of the warm-up requests: enough to run every kernel of
/// prefill and decode once (a first CUDA call compiles them), too few to
/// cost device time.
const WARM_UP_TOKENS: u32 = 16;
/// Max tokens of Generate and chat completions when `--tokens` is not given.
const DEFAULT_GENERATION_TOKENS: u32 = 128;
/// Characters of the first error kept in the report.
const ERROR_CHARS: usize = 240;
/// The relay ratio issue 15 asks of the gateway at every concurrency.
const RELAY_GOAL: f64 = 0.97;
/// How long connecting to the gateway may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Parser)]
#[command(group(ArgGroup::new("mode").required(true).args(["grpc", "openai", "table"])))]
struct Args {
    /// The gateway's gRPC address (host:port).
    #[arg(long, env = "GPU_BENCH_GRPC")]
    grpc: Option<String>,
    /// An OpenAI-compatible server's base URL (`http://host:port`, with or
    /// without `/v1`); streams `/v1/chat/completions`.
    #[arg(long, env = "GPU_BENCH_OPENAI")]
    openai: Option<String>,
    /// No load: print the markdown table of these JSON-lines files.
    #[arg(long, num_args = 1.., value_delimiter = ',', env = "GPU_BENCH_TABLE")]
    table: Vec<PathBuf>,
    /// The gateway RPC to measure; the OpenAI target always streams chat.
    #[arg(long, value_enum, default_value_t = Rpc::Generate, env = "GPU_BENCH_RPC")]
    rpc: Rpc,
    /// The request's model; empty: the service's (or server's) default.
    #[arg(long, default_value = "", env = "GPU_BENCH_MODEL")]
    model: String,
    /// Concurrency levels: at each, that many requests start at once.
    #[arg(long, value_delimiter = ',', default_value = "1,8,32,64", value_parser = clap::value_parser!(u32).range(1..), env = "GPU_BENCH_STREAMS")]
    streams: Vec<u32>,
    /// Max tokens per request. Default: 128 for Generate and chat; for
    /// EnhanceTask and DecomposeTask the service's task default, since a
    /// structured answer cut short is a failed call.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..), env = "GPU_BENCH_TOKENS")]
    tokens: Option<u32>,
    /// Measured rounds per level; the median round (by aggregate tokens/s)
    /// is reported, failures of every round are counted.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..), env = "GPU_BENCH_ROUNDS")]
    rounds: u32,
    /// Run every level once, unmeasured, before measuring (with 16 max
    /// tokens for generation), so a GPU's kernel compilation is not measured.
    #[arg(long, env = "GPU_BENCH_WARM_UP")]
    warm_up: bool,
    /// Limit on one request, start to last byte.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "300s", env = "GPU_BENCH_TIMEOUT")]
    timeout: Duration,
    /// Which prompts: runs with the same set send the same prompts. A
    /// runtime that caches prompt prefixes (llama-server, mlx_lm.server)
    /// serves a second run of the same set from its cache, so runs against
    /// one runtime process take different sets, or the runtime restarts.
    #[arg(long, default_value_t = 0, env = "GPU_BENCH_PROMPT_SET")]
    prompt_set: u32,
    /// Name of the run in the report, e.g. `llama-server-direct`; pairs
    /// `X-gateway` / `X-direct` make the table's relay ratios.
    #[arg(long, env = "GPU_BENCH_LABEL")]
    label: Option<String>,
    /// Append one JSON object per level to this file.
    #[arg(long, env = "GPU_BENCH_JSON")]
    json: Option<PathBuf>,
    /// Passed by `cargo bench`; ignored.
    #[arg(long, hide = true)]
    bench: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Rpc {
    Generate,
    Enhance,
    Decompose,
}

impl Rpc {
    fn name(self) -> &'static str {
        match self {
            Self::Generate => "generate",
            Self::Enhance => "enhance",
            Self::Decompose => "decompose",
        }
    }
}

/// Where a request's completion-token count came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum TokenSource {
    /// Generate's summary (`meta.completion_tokens`).
    Summary,
    /// A task response's `meta.completion_tokens`.
    Meta,
    /// The OpenAI `usage` chunk (`completion_tokens`).
    Usage,
    /// Non-empty content deltas counted, for a server that sent no usage.
    Deltas,
    /// A task response whose meta had no completion tokens.
    None,
}

impl TokenSource {
    fn name(self) -> &'static str {
        match self {
            Self::Summary => "summary",
            Self::Meta => "meta",
            Self::Usage => "usage",
            Self::Deltas => "deltas",
            Self::None => "none",
        }
    }
}

/// One request as the client saw it.
#[derive(Clone, Copy, Debug)]
struct Outcome {
    tokens: u32,
    source: TokenSource,
    /// Streams only: when the first text arrived.
    first_token: Option<Duration>,
    total: Duration,
    /// A task answer the service's result cache gave without generating.
    cached: bool,
}

impl Outcome {
    /// Decode tokens/s after the first token; none for a unary call or a
    /// single token.
    fn decode_rate(&self) -> Option<f64> {
        let decoding = self.total.checked_sub(self.first_token?)?;
        (self.tokens > 1 && !decoding.is_zero())
            .then(|| f64::from(self.tokens - 1) / decoding.as_secs_f64())
    }
}

/// The endpoint under load.
#[derive(Clone)]
enum Target {
    Grpc {
        client: InferenceServiceClient<Channel>,
        rpc: Rpc,
    },
    OpenAi {
        http: reqwest::Client,
        url: String,
    },
}

/// One request, built before its level's clock starts.
enum Request {
    Generate(GenerateRequest),
    Enhance(EnhanceTaskRequest),
    Decompose(DecomposeTaskRequest),
    Chat(Value),
}

impl Target {
    fn name(&self) -> &'static str {
        match self {
            Self::Grpc { .. } => "grpc",
            Self::OpenAi { .. } => "openai",
        }
    }

    fn rpc(&self) -> &'static str {
        match self {
            Self::Grpc { rpc, .. } => rpc.name(),
            Self::OpenAi { .. } => "chat",
        }
    }

    fn request(&self, scenario: &Scenario, model: &str, max_tokens: Option<u32>) -> Request {
        let model = model.to_owned();
        let sampling = Some(SamplingOptions {
            max_tokens,
            temperature: Some(0.0),
            ..Default::default()
        });
        let (task, context) = (Some(scenario.task()), Some(scenario.context()));
        match self {
            Self::Grpc {
                rpc: Rpc::Generate, ..
            } => Request::Generate(GenerateRequest {
                messages: vec![ChatMessage {
                    role: Role::User.into(),
                    content: scenario.prompt(),
                }],
                model,
                sampling,
                ..Default::default()
            }),
            Self::Grpc {
                rpc: Rpc::Enhance, ..
            } => Request::Enhance(EnhanceTaskRequest {
                task,
                context,
                model,
                sampling,
                ..Default::default()
            }),
            Self::Grpc {
                rpc: Rpc::Decompose,
                ..
            } => Request::Decompose(DecomposeTaskRequest {
                task,
                context,
                model,
                sampling,
                ..Default::default()
            }),
            Self::OpenAi { .. } => {
                let mut body = json!({
                    "messages": [{"role": "user", "content": scenario.prompt()}],
                    "stream": true,
                    "stream_options": {"include_usage": true},
                    "max_tokens": max_tokens,
                    "temperature": 0.0,
                });
                // Both servers fall back to the model they were started
                // with when the field is absent.
                if !model.is_empty() {
                    body["model"] = json!(model);
                }
                Request::Chat(body)
            }
        }
    }

    async fn send(self, request: Request) -> Result<Outcome, String> {
        let started = Instant::now();
        match (self, request) {
            (Self::Grpc { mut client, .. }, Request::Generate(request)) => {
                let run = try_grpc_run(&mut client, request)
                    .await
                    .map_err(|error| error.to_string())?;
                Ok(Outcome {
                    tokens: run.tokens,
                    source: TokenSource::Summary,
                    first_token: Some(run.first_token),
                    total: run.total,
                    cached: false,
                })
            }
            (Self::Grpc { mut client, .. }, Request::Enhance(request)) => {
                let response = client.enhance_task(request).await.map_err(status)?;
                Ok(unary(started, response.into_inner().meta))
            }
            (Self::Grpc { mut client, .. }, Request::Decompose(request)) => {
                let response = client.decompose_task(request).await.map_err(status)?;
                Ok(unary(started, response.into_inner().meta))
            }
            (Self::OpenAi { http, url }, Request::Chat(body)) => chat(&http, &url, &body).await,
            _ => unreachable!("a target builds only its own requests"),
        }
    }
}

fn status(status: tonic::Status) -> String {
    format!("{}: {}", status.code(), status.message())
}

/// What kind of failure an error is: its text before the first ':', the
/// status code's description for a gRPC error ("Internal error", "Deadline
/// expired before operation could complete"), the HTTP or timeout failure
/// otherwise; a run then shows whether its failures were answers refused
/// by the task rules or calls that never ended.
fn error_kind(error: &str) -> &str {
    error.split_once(':').map_or(error, |(kind, _)| kind)
}

fn unary(started: Instant, meta: Option<ResponseMeta>) -> Outcome {
    let meta = meta.unwrap_or_default();
    Outcome {
        tokens: meta.completion_tokens,
        source: if meta.completion_tokens > 0 {
            TokenSource::Meta
        } else {
            TokenSource::None
        },
        first_token: None,
        total: started.elapsed(),
        cached: meta.cached,
    }
}

/// A streamed chat completion read to `[DONE]`. Lines are split on bytes,
/// so a character cut across two network chunks stays whole.
async fn chat(http: &reqwest::Client, url: &str, body: &Value) -> Result<Outcome, String> {
    let started = Instant::now();
    let response = http
        .post(url)
        .json(body)
        .send()
        .await
        .map_err(|error| format!("POST {url}: {}", chain(&error)))?;
    if !response.status().is_success() {
        let code = response.status();
        return Err(format!(
            "HTTP {code}: {}",
            response.text().await.unwrap_or_default()
        ));
    }
    let mut stream = response.bytes_stream();
    let (mut pending, mut first_token, mut deltas, mut usage, mut done) =
        (Vec::new(), None, 0u32, None, false);
    while let Some(bytes) = stream.next().await {
        pending.extend_from_slice(
            &bytes.map_err(|error| format!("reading the stream: {}", chain(&error)))?,
        );
        while let Some(end) = pending.iter().position(|byte| *byte == b'\n') {
            let line: Vec<u8> = pending.drain(..=end).collect();
            let line = String::from_utf8_lossy(&line);
            let Some(data) = line.trim().strip_prefix("data:").map(str::trim) else {
                continue;
            };
            if data == "[DONE]" {
                done = true;
                continue;
            }
            let chunk: Value = serde_json::from_str(data)
                .map_err(|error| format!("a chunk that is not JSON ({error}): {data}"))?;
            if let Some(error) = chunk.get("error") {
                return Err(format!("error in the stream: {error}"));
            }
            let content = chunk["choices"][0]["delta"]["content"].as_str();
            if content.is_some_and(|content| !content.is_empty()) {
                first_token.get_or_insert_with(|| started.elapsed());
                deltas += 1;
            }
            if let Some(tokens) = chunk["usage"]["completion_tokens"].as_u64() {
                usage = Some(u32::try_from(tokens).unwrap_or(u32::MAX));
            }
        }
    }
    if !done {
        return Err("the stream ended without [DONE]".into());
    }
    Ok(Outcome {
        tokens: usage.unwrap_or(deltas),
        source: usage.map_or(TokenSource::Deltas, |_| TokenSource::Usage),
        first_token: Some(first_token.ok_or("the stream carried no content")?),
        total: started.elapsed(),
        cached: false,
    })
}

/// An error with its causes: reqwest's own message names only the step
/// that failed ("error sending request").
fn chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut cause = error.source();
    while let Some(inner) = cause {
        text.push_str(&format!(": {inner}"));
        cause = inner.source();
    }
    text
}

/// The deterministic content of request `index` of batch `batch`: a
/// system, a goal and a constraint from fixed lists, so every request of a
/// level differs and all are of one length class (≈80–100 tokens of
/// prompt), whichever target is measured.
struct Scenario {
    marker: String,
    system: &'static str,
    goal: &'static str,
    constraint: &'static str,
}

const SYSTEMS: [&str; 16] = [
    "a payment service that talks to three card acquirers",
    "a scheduler for a fleet of warehouse robots",
    "a hospital appointment booking site",
    "a city bike-sharing app",
    "a mobile banking backend",
    "a video transcoding pipeline",
    "a school timetable planner",
    "an airline crew rostering tool",
    "a farm irrigation controller",
    "a public library catalogue",
    "a ride-hailing dispatch system",
    "an energy-grid demand forecaster",
    "a newsroom publishing platform",
    "a matchmaking server for an online game",
    "a customs declaration portal",
    "a clinical laboratory results service",
];

const GOALS: [&str; 8] = [
    "cut the p99 latency of the busiest endpoint in half",
    "move the data to a new database without downtime",
    "add an audit trail that regulators can query",
    "serve ten times more users by next spring",
    "let customers export all of their data",
    "replace a nightly batch job with streaming updates",
    "roll out a redesigned permission model",
    "recover within five minutes from losing a region",
];

const CONSTRAINTS: [&str; 8] = [
    "the team has only three engineers",
    "the budget for new hardware is frozen",
    "two legacy clients cannot be changed",
    "every change needs a security review",
    "a release leaves every two weeks",
    "half of the traffic comes from old phones",
    "the on-call rotation is already overloaded",
    "all data must stay inside one country",
];

impl Scenario {
    fn new(prompt_set: u32, batch: u32, index: u32) -> Self {
        let index = index as usize;
        // The goal's stride differs from the system's, so requests 0..128
        // are 128 different pairs.
        Self {
            marker: format!("{prompt_set}.{batch}.{index}"),
            system: SYSTEMS[index % SYSTEMS.len()],
            goal: GOALS[(index + index / SYSTEMS.len()) % GOALS.len()],
            constraint: CONSTRAINTS[(index + index / 3) % CONSTRAINTS.len()],
        }
    }

    fn prompt(&self) -> String {
        let Self {
            marker,
            system,
            goal,
            constraint,
        } = self;
        format!(
            "Request {marker}. A team runs {system}. They need to {goal}, but {constraint}. \
             Write a detailed engineering plan for them: the architecture changes, the data \
             model, the failure modes and how to detect them, the tests to write, and a rollout \
             in stages. Give concrete numbers where you can and explain why each step comes in \
             that order."
        )
    }

    fn task(&self) -> Task {
        let Self {
            marker,
            system,
            goal,
            constraint,
        } = self;
        Task {
            id: format!("gpu-bench-{marker}"),
            title: capitalized(goal),
            description: Some(format!(
                "Request {marker}. In {system}, we need to {goal}, but {constraint}. The \
                 work covers the architecture changes, the data model, the failure modes and \
                 how to detect them, the tests, and a rollout in stages."
            )),
            ..Default::default()
        }
    }

    fn context(&self) -> TaskContext {
        TaskContext {
            project: format!("The team runs {}.", self.system),
            ..Default::default()
        }
    }
}

fn capitalized(text: &str) -> String {
    let mut chars = text.chars();
    chars.next().map_or_else(String::new, |first| {
        first.to_uppercase().chain(chars).collect()
    })
}

/// One round of one level: every request started at once.
struct Round {
    wall: Duration,
    outcomes: Vec<Outcome>,
    errors: Vec<String>,
}

impl Round {
    fn tokens(&self) -> u32 {
        self.outcomes.iter().map(|outcome| outcome.tokens).sum()
    }

    fn aggregate(&self) -> f64 {
        f64::from(self.tokens()) / self.wall.as_secs_f64()
    }
}

async fn round(
    target: &Target,
    args: &Args,
    batch: u32,
    streams: u32,
    max_tokens: Option<u32>,
) -> Round {
    let requests: Vec<Request> = (0..streams)
        .map(|index| {
            target.request(
                &Scenario::new(args.prompt_set, batch, index),
                &args.model,
                max_tokens,
            )
        })
        .collect();
    let timeout = args.timeout;
    let started = Instant::now();
    // A task each, so reading 64 streams spreads over the runtime's threads.
    let calls = requests.into_iter().map(|request| {
        let target = target.clone();
        tokio::spawn(async move {
            tokio::time::timeout(timeout, target.send(request))
                .await
                .unwrap_or_else(|_| {
                    Err(format!(
                        "timed out after {}",
                        humantime::format_duration(timeout)
                    ))
                })
        })
    });
    let results = join_all(calls).await;
    let wall = started.elapsed();
    let (mut outcomes, mut errors) = (Vec::new(), Vec::new());
    for result in results {
        match result.unwrap_or_else(|error| Err(format!("the request's task failed: {error}"))) {
            Ok(outcome) => outcomes.push(outcome),
            Err(error) => errors.push(error),
        }
    }
    Round {
        wall,
        outcomes,
        errors,
    }
}

/// One level's figures: a stdout line and a JSON line, read back by
/// `--table`.
#[derive(Debug, Serialize, Deserialize)]
struct Row {
    label: String,
    target: String,
    rpc: String,
    model: String,
    streams: u32,
    /// Unset: the service's default.
    max_tokens: Option<u32>,
    rounds: u32,
    /// Requests of every round.
    completed: usize,
    failed: usize,
    first_error: Option<String>,
    /// Failures of every round by kind (`error_kind`).
    #[serde(default)]
    failures_by_kind: BTreeMap<String, usize>,
    /// The figures below are the median round's.
    wall_s: f64,
    aggregate_tok_s: f64,
    decode_tok_s_median: Option<f64>,
    ttft_p50_s: Option<f64>,
    ttft_p99_s: Option<f64>,
    latency_p50_s: Option<f64>,
    latency_p99_s: Option<f64>,
    mean_tokens: Option<f64>,
    token_source: String,
    #[serde(default)]
    cached_answers: usize,
    measured_at: String,
}

impl Row {
    fn line(&self) -> String {
        let figure = |value: Option<f64>, digits: usize| {
            value.map_or_else(|| "-".to_owned(), |value| format!("{value:.digits$}"))
        };
        format!(
            "{:<28} {:<6} {:<9} {:>7} {:>6} {:>9} {:>6} {:>8.2} {:>10.1} {:>10} {:>9} {:>9} {:>9} {:>8} {}",
            self.label,
            self.target,
            self.rpc,
            self.streams,
            self.max_tokens
                .map_or_else(|| "dflt".to_owned(), |tokens| tokens.to_string()),
            self.completed,
            self.failed,
            self.wall_s,
            self.aggregate_tok_s,
            figure(self.decode_tok_s_median, 1),
            figure(self.ttft_p50_s, 3),
            figure(self.ttft_p99_s, 3),
            figure(self.latency_p50_s, 3),
            figure(self.mean_tokens, 1),
            self.token_source,
        )
    }
}

const HEADER: &str = "label                        target rpc       streams    max completed failed   wall s  agg tok/s  dec tok/s  ttft p50  ttft p99   lat p50  tok/req source";

fn row(args: &Args, target: &Target, model: &str, streams: u32, mut rounds: Vec<Round>) -> Row {
    let completed = rounds.iter().map(|round| round.outcomes.len()).sum();
    let failed = rounds.iter().map(|round| round.errors.len()).sum();
    let first_error = rounds
        .iter()
        .flat_map(|round| &round.errors)
        .next()
        .map(|error| error.chars().take(ERROR_CHARS).collect());
    let failures_by_kind =
        rounds
            .iter()
            .flat_map(|round| &round.errors)
            .fold(BTreeMap::new(), |mut kinds, error| {
                *kinds.entry(error_kind(error).to_owned()).or_default() += 1;
                kinds
            });
    let cached_answers = rounds
        .iter()
        .flat_map(|round| &round.outcomes)
        .filter(|outcome| outcome.cached)
        .count();
    rounds.sort_by(|a, b| a.aggregate().total_cmp(&b.aggregate()));
    let middle = rounds.swap_remove(rounds.len() / 2);
    let outcomes = &middle.outcomes;
    let of = |values: Vec<f64>, statistic: fn(Vec<f64>) -> f64| {
        (!values.is_empty()).then(|| statistic(values))
    };
    let ttfts = || -> Vec<f64> {
        outcomes
            .iter()
            .filter_map(|outcome| outcome.first_token)
            .map(|ttft| ttft.as_secs_f64())
            .collect()
    };
    let latencies = || -> Vec<f64> {
        outcomes
            .iter()
            .map(|outcome| outcome.total.as_secs_f64())
            .collect()
    };
    let mut sources: Vec<&str> = outcomes
        .iter()
        .map(|outcome| outcome.source.name())
        .collect();
    sources.sort_unstable();
    sources.dedup();
    Row {
        label: args
            .label
            .clone()
            .unwrap_or_else(|| format!("{}-{}", target.name(), target.rpc())),
        target: target.name().into(),
        rpc: target.rpc().into(),
        model: model.into(),
        streams,
        max_tokens: max_tokens(args, target),
        rounds: args.rounds,
        completed,
        failed,
        first_error,
        failures_by_kind,
        wall_s: middle.wall.as_secs_f64(),
        aggregate_tok_s: middle.aggregate(),
        decode_tok_s_median: of(
            outcomes.iter().filter_map(Outcome::decode_rate).collect(),
            median,
        ),
        ttft_p50_s: of(ttfts(), |values| percentile(values, 0.5)),
        ttft_p99_s: of(ttfts(), |values| percentile(values, 0.99)),
        latency_p50_s: of(latencies(), |values| percentile(values, 0.5)),
        latency_p99_s: of(latencies(), |values| percentile(values, 0.99)),
        mean_tokens: (!outcomes.is_empty())
            .then(|| f64::from(middle.tokens()) / outcomes.len() as f64),
        token_source: sources.join("+"),
        cached_answers,
        measured_at: humantime::format_rfc3339_seconds(SystemTime::now()).to_string(),
    }
}

/// Max tokens of the measured requests; `None` leaves the task RPCs to the
/// service's default.
fn max_tokens(args: &Args, target: &Target) -> Option<u32> {
    match target {
        Target::Grpc {
            rpc: Rpc::Enhance | Rpc::Decompose,
            ..
        } => args.tokens,
        _ => Some(args.tokens.unwrap_or(DEFAULT_GENERATION_TOKENS)),
    }
}

async fn connect(args: &Args) -> Result<(Target, String), String> {
    if let Some(address) = &args.grpc {
        let channel = Endpoint::from_shared(format!("http://{address}"))
            .map_err(|error| format!("--grpc {address}: {error}"))?
            .connect_timeout(CONNECT_TIMEOUT)
            .connect()
            .await
            .map_err(|error| format!("cannot connect to {address}: {}", chain(&error)))?;
        let mut client = InferenceServiceClient::new(channel);
        let served = client
            .get_status(GetStatusRequest {})
            .await
            .map_err(|error| format!("GetStatus on {address}: {}", status(error)))?
            .into_inner();
        println!(
            "gateway {address}: backend {}, default model {}, version {}",
            served.active_backend, served.model, served.version
        );
        let model = if args.model.is_empty() {
            served.model
        } else {
            args.model.clone()
        };
        return Ok((
            Target::Grpc {
                client,
                rpc: args.rpc,
            },
            model,
        ));
    }
    let base = args.openai.as_deref().expect("clap requires a target");
    if args.rpc != Rpc::Generate {
        return Err("--rpc enhance/decompose needs --grpc: an OpenAI server only chats".into());
    }
    let base = base.trim_end_matches('/');
    let base = base.strip_suffix("/v1").unwrap_or(base);
    // A connection per request, as independent callers have: an idle
    // pooled one can be closed by the server just as a request reuses it
    // (seen with llama-server: "connection closed before message completed").
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .map_err(|error| format!("an HTTP client: {error}"))?;
    let model = if args.model.is_empty() {
        served_model(&http, base).await
    } else {
        args.model.clone()
    };
    println!("openai {base}: model {model}");
    Ok((
        Target::OpenAi {
            http,
            url: format!("{base}/v1/chat/completions"),
        },
        model,
    ))
}

/// The first model an OpenAI-compatible server lists, to name what was
/// measured when the request names none; empty when it lists none.
async fn served_model(http: &reqwest::Client, base: &str) -> String {
    let listed = async {
        http.get(format!("{base}/v1/models"))
            .send()
            .await?
            .json::<Value>()
            .await
    };
    listed.await.ok().map_or_else(String::new, |models| {
        models["data"][0]["id"].as_str().unwrap_or_default().into()
    })
}

async fn measure(args: &Args) -> Result<bool, String> {
    let (target, model) = connect(args).await?;
    let measured_tokens = max_tokens(args, &target);
    if args.warm_up {
        // Task RPCs warm up at their measured length: cut to 16 tokens,
        // their structured answers would fail and be retried.
        let tokens = match target {
            Target::Grpc {
                rpc: Rpc::Enhance | Rpc::Decompose,
                ..
            } => measured_tokens,
            _ => Some(WARM_UP_TOKENS),
        };
        for &streams in &args.streams {
            // Batch 0 is the warm-up's own prompts: a runtime's prompt
            // cache must not serve the measured ones.
            let warm = round(&target, args, 0, streams, tokens).await;
            println!(
                "warm-up at {streams} streams: {:.2} s, {} failed",
                warm.wall.as_secs_f64(),
                warm.errors.len()
            );
            if let Some(error) = warm.errors.first() {
                eprintln!("warm-up error: {error}");
            }
        }
    }
    let mut output = match &args.json {
        Some(path) => Some(
            OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(|error| format!("{}: {error}", path.display()))?,
        ),
        None => None,
    };
    println!("{HEADER}");
    let mut any_failed = false;
    for &streams in &args.streams {
        let mut rounds = Vec::new();
        for batch in 1..=args.rounds {
            rounds.push(round(&target, args, batch, streams, measured_tokens).await);
        }
        let row = row(args, &target, &model, streams, rounds);
        println!("{}", row.line());
        if let Some(error) = &row.first_error {
            let kinds: Vec<String> = row
                .failures_by_kind
                .iter()
                .map(|(kind, count)| format!("{kind} ×{count}"))
                .collect();
            println!(
                "  {} failed ({}); first error: {error}",
                row.failed,
                kinds.join(", ")
            );
        }
        if row.cached_answers > 0 {
            println!(
                "  {} answers came from the service's result cache",
                row.cached_answers
            );
        }
        any_failed |= row.failed > 0;
        if let Some(file) = &mut output {
            let line = serde_json::to_string(&row).expect("a row serializes");
            writeln!(file, "{line}").map_err(|error| format!("writing JSON: {error}"))?;
        }
    }
    Ok(!any_failed)
}

/// Every row of JSON-lines files, in file order.
fn read_rows(files: &[PathBuf]) -> Result<Vec<Row>, String> {
    let mut rows = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(file)
            .map_err(|error| format!("{}: {error}", file.display()))?;
        for (number, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            rows.push(
                serde_json::from_str::<Row>(line)
                    .map_err(|error| format!("{}:{}: {error}", file.display(), number + 1))?,
            );
        }
    }
    Ok(rows)
}

/// The last row of each (label, streams), grouped by label in order of
/// first appearance, then by streams.
fn latest(rows: &[Row]) -> Vec<&Row> {
    let mut kept: Vec<&Row> = Vec::new();
    for row in rows {
        kept.retain(|earlier| (&earlier.label, earlier.streams) != (&row.label, row.streams));
        kept.push(row);
    }
    let order: Vec<&str> = rows.iter().fold(Vec::new(), |mut labels, row| {
        if !labels.contains(&row.label.as_str()) {
            labels.push(&row.label);
        }
        labels
    });
    kept.sort_by_key(|row| {
        (
            order.iter().position(|label| *label == row.label),
            row.streams,
        )
    });
    kept
}

/// The mean aggregate tok/s of the complete runs (no failed request) of
/// each (label, streams), with their count: one run of a level moves by
/// several percent, so the relay ratio compares means.
fn complete_means(rows: &[Row]) -> BTreeMap<(&str, u32), (f64, usize)> {
    let mut sums: BTreeMap<(&str, u32), (f64, usize)> = BTreeMap::new();
    for row in rows.iter().filter(|row| row.failed == 0) {
        let sum = sums.entry((row.label.as_str(), row.streams)).or_default();
        *sum = (sum.0 + row.aggregate_tok_s, sum.1 + 1);
    }
    sums.into_iter()
        .map(|(key, (sum, runs))| (key, (sum / runs as f64, runs)))
        .collect()
}

fn table(files: &[PathBuf]) -> Result<(), String> {
    let rows = read_rows(files)?;
    let cell = |value: Option<f64>, digits: usize| {
        value.map_or_else(|| "–".to_owned(), |value| format!("{value:.digits$}"))
    };
    println!(
        "| label | rpc | model | streams | decode tok/s (per stream) | aggregate tok/s | TTFT p50 s | TTFT p99 s | latency p50 s | completed/total |"
    );
    println!("|---|---|---|--:|--:|--:|--:|--:|--:|--:|");
    for row in latest(&rows) {
        println!(
            "| {} | {} | {} | {} | {} | {:.1} | {} | {} | {} | {}/{} |",
            row.label,
            row.rpc,
            model_name(&row.model),
            row.streams,
            cell(row.decode_tok_s_median, 1),
            row.aggregate_tok_s,
            cell(row.ttft_p50_s, 3),
            cell(row.ttft_p99_s, 3),
            cell(row.latency_p50_s, 3),
            row.completed,
            row.completed + row.failed,
        );
    }
    let means = complete_means(&rows);
    let mut ratios = Vec::new();
    for (&(label, streams), &(gateway, gateway_runs)) in &means {
        let Some(runtime) = label.strip_suffix("-gateway") else {
            continue;
        };
        let direct_label = format!("{runtime}-direct");
        if let Some(&(direct, direct_runs)) = means.get(&(direct_label.as_str(), streams)) {
            let ratio = gateway / direct;
            ratios.push(format!(
                "| {runtime} | {streams} | {gateway:.1} | {direct:.1} | {gateway_runs} / {direct_runs} | {ratio:.3} | {} |",
                if ratio >= RELAY_GOAL { "yes" } else { "no" },
            ));
        }
    }
    if !ratios.is_empty() {
        println!();
        println!(
            "Relay ratio: mean aggregate tok/s of the complete runs through the gateway ÷ direct (goal ≥ {RELAY_GOAL})."
        );
        println!();
        println!("| runtime | streams | gateway tok/s | direct tok/s | runs | ratio | ≥ goal |");
        println!("|---|--:|--:|--:|--:|--:|:-:|");
        for ratio in ratios {
            println!("{ratio}");
        }
    }
    Ok(())
}

/// A model as the table shows it: a path's file name.
fn model_name(model: &str) -> &str {
    Path::new(model)
        .file_name()
        .and_then(|name| name.to_str())
        .unwrap_or(model)
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    let outcome = if args.table.is_empty() {
        measure(&args).await
    } else {
        table(&args.table).map(|()| true)
    };
    match outcome {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => {
            eprintln!("gpu: some requests failed (see above)");
            ExitCode::FAILURE
        }
        Err(problem) => {
            eprintln!("gpu: {problem}");
            ExitCode::FAILURE
        }
    }
}
