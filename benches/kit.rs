//! The benchmark kit: what the gateway costs and how it scales, each figure
//! a ratio measured in one run on one machine, printed as a table and
//! written to `benches/results/kit.json` with a plot of the scaling
//! (`benches/results/scaling.svg`).
//! - gateway overhead: unary (EnhanceTask) and streaming (Generate) RPS and
//!   latency of the service over an instant in-process backend (used only
//!   here) vs a bare tonic server doing the same work, driven by the
//!   `rigger-load` engine;
//! - token relay: Generate's time to first token and decode rate through
//!   the service vs the same embedded engine called in process;
//! - concurrency scaling: aggregate decode tokens/s at 1, 2, 4 and 8
//!   streams on the embedded engine and on llama.cpp's server;
//! - memory: the service's resident memory idle and under 64 streams.
//!
//! Run: `make bench` (with the other benchmarks) or `cargo bench --bench kit`;
//! `cargo bench --bench kit -- --only gateway` runs the gateway overhead
//! alone (no model, no llama.cpp server, nothing written), e.g. on a quiet
//! machine (`scripts/bench-device.sh`).

// Shared with the other benchmarks, which use what this one does not.
#[allow(dead_code)]
mod common;
#[path = "../tests/support/mod.rs"]
mod support;

use std::{
    pin::Pin,
    sync::Arc,
    time::{Duration, Instant},
};

use async_trait::async_trait;
use clap::{Parser, ValueEnum};
use common::{Run, Service, grpc_run, median, peak_rss_mib, percentile, status_mib};
use futures_util::{Stream, StreamExt, future::join_all, stream};
use plotters::prelude::*;
use rigger_inference::{
    app,
    backend::{
        Backend, BackendError, Capabilities, Chunk, ChunkStream, Completion, FinishReason,
        GenerationRequest, Message, ProbeReport, Role, Sampling, SchemaSupport,
        embedded::{EmbeddedBackend, EmbeddedSettings, EngineShape},
    },
    loadgen::{self, Call, Plan, Report, Stop},
    proto::{
        self, EnhanceTaskRequest, Task,
        inference_service_client::InferenceServiceClient,
        inference_service_server::{InferenceService, InferenceServiceServer},
    },
};
use serde_json::json;
use support::{LlamaServer, config, free_port, greedy, model_path};
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::{Request, Response, Status, transport::Channel};

#[derive(Parser)]
struct Args {
    /// Run only this section and write no results.
    #[arg(long, env = "KIT_ONLY", value_enum)]
    only: Option<Section>,
    /// Passed by `cargo bench`; ignored.
    #[arg(long, hide = true)]
    bench: bool,
}

/// A section of the kit that runs on its own.
#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Section {
    /// The service over an instant backend vs a bare tonic server.
    Gateway,
}

/// Text pieces of an instant generation.
const PIECES: usize = 16;
const LOAD_CONCURRENCY: usize = 32;
const LOAD_SECONDS: u64 = 4;
const ROUNDS: usize = 3;
const DECODE_TOKENS: u32 = 96;
const STREAMS: [usize; 4] = [1, 2, 4, 8];

/// What both servers answer to EnhanceTask.
const ENHANCEMENT: &str = r#"{"kind":"ENHANCEMENT_KIND_SPECIFY","title":"Let users reset a forgotten password by e-mail","description":"Send a single-use link that expires after thirty minutes and lets the user choose a new password.","acceptance_criteria":["The link expires after thirty minutes","A used link cannot be used again"]}"#;

/// A backend that answers at once, to measure the gateway alone.
struct InstantBackend;

#[async_trait]
impl Backend for InstantBackend {
    fn name(&self) -> &'static str {
        "instant"
    }

    fn endpoint(&self) -> String {
        "in-process".to_owned()
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            json_schema: SchemaSupport::Enforced,
            seed: true,
            no_repeat: false,
            text_patterns: false,
        }
    }

    async fn probe(&self) -> Result<ProbeReport, BackendError> {
        Ok(ProbeReport {
            models: vec!["instant".to_owned()],
            default_model: Some("instant".to_owned()),
        })
    }

    async fn generate(&self, request: GenerationRequest) -> Result<ChunkStream, BackendError> {
        let pieces: Vec<String> = if request.json_schema.is_some() {
            vec![enhancement_json()]
        } else {
            (0..PIECES).map(|index| format!("word{index} ")).collect()
        };
        let count = pieces.len() as u32;
        let done = Chunk::Done(Completion {
            backend: "instant",
            model: "instant".to_owned(),
            finish_reason: FinishReason::Stop,
            prompt_tokens: 8,
            completion_tokens: count,
            cached_prompt_tokens: 0,
            engine_timings: None,
        });
        Ok(Box::pin(stream::iter(
            pieces
                .into_iter()
                .map(|piece| Ok(Chunk::Text(piece)))
                .chain([Ok(done)]),
        )))
    }
}

/// The task layer's answer format: kinds in lower case.
fn enhancement_json() -> String {
    ENHANCEMENT.replace("ENHANCEMENT_KIND_SPECIFY", "specify")
}

/// A bare tonic server doing the same work as the service over the
/// instant backend, with nothing around it: the stack's own limit.
struct Bare;

type BareStream = Pin<Box<dyn Stream<Item = Result<proto::GenerateResponse, Status>> + Send>>;

#[tonic::async_trait]
impl InferenceService for Bare {
    async fn enhance_task(
        &self,
        _request: Request<EnhanceTaskRequest>,
    ) -> Result<Response<proto::EnhanceTaskResponse>, Status> {
        let value: serde_json::Value = serde_json::from_str(&enhancement_json()).unwrap();
        Ok(Response::new(proto::EnhanceTaskResponse {
            enhancement: Some(proto::Enhancement {
                kind: proto::EnhancementKind::Specify as i32,
                title: value["title"].as_str().unwrap().to_owned(),
                description: value["description"].as_str().unwrap().to_owned(),
                acceptance_criteria: value["acceptance_criteria"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|criterion| criterion.as_str().unwrap().to_owned())
                    .collect(),
            }),
            meta: Some(proto::ResponseMeta::default()),
        }))
    }

    async fn decompose_task(
        &self,
        _request: Request<proto::DecomposeTaskRequest>,
    ) -> Result<Response<proto::DecomposeTaskResponse>, Status> {
        Err(Status::unimplemented("not measured"))
    }

    type GenerateStream = BareStream;

    async fn generate(
        &self,
        _request: Request<proto::GenerateRequest>,
    ) -> Result<Response<Self::GenerateStream>, Status> {
        let texts = (0..PIECES).map(|index| {
            Ok(proto::GenerateResponse {
                event: Some(proto::generate_response::Event::Text(format!(
                    "word{index} "
                ))),
            })
        });
        let summary = Ok(proto::GenerateResponse {
            event: Some(proto::generate_response::Event::Summary(
                proto::GenerationSummary {
                    finish_reason: proto::FinishReason::Stop as i32,
                    meta: Some(proto::ResponseMeta::default()),
                },
            )),
        });
        Ok(Response::new(Box::pin(stream::iter(
            texts.chain([summary]),
        ))))
    }

    async fn get_status(
        &self,
        _request: Request<proto::GetStatusRequest>,
    ) -> Result<Response<proto::GetStatusResponse>, Status> {
        Err(Status::unimplemented("not measured"))
    }

    async fn list_models(
        &self,
        _request: Request<proto::ListModelsRequest>,
    ) -> Result<Response<proto::ListModelsResponse>, Status> {
        Err(Status::unimplemented("not measured"))
    }

    async fn load_model(
        &self,
        _request: Request<proto::LoadModelRequest>,
    ) -> Result<Response<proto::LoadModelResponse>, Status> {
        Err(Status::unimplemented("not measured"))
    }

    async fn unload_model(
        &self,
        _request: Request<proto::UnloadModelRequest>,
    ) -> Result<Response<proto::UnloadModelResponse>, Status> {
        Err(Status::unimplemented("not measured"))
    }
}

async fn listener() -> (TcpListener, String) {
    let listener = TcpListener::bind(format!("127.0.0.1:{}", free_port()))
        .await
        .expect("bind loopback");
    let address = listener.local_addr().expect("address").to_string();
    (listener, address)
}

async fn channel(address: &str) -> Channel {
    for _ in 0..200 {
        if let Ok(channel) = Channel::from_shared(format!("http://{address}"))
            .unwrap()
            .connect()
            .await
        {
            return channel;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("no server at {address}");
}

/// The service over `backends`, in this process, as `make run` configures
/// it except that admission does not limit the load.
async fn serve_ours(backends: Vec<Arc<dyn Backend>>) -> Channel {
    let (listener, address) = listener().await;
    let settings = config(&[
        "--task-cache-entries",
        "0",
        "--max-in-flight",
        "4096",
        "--max-queue",
        "4096",
    ]);
    tokio::spawn(app::serve_backends(
        listener,
        settings,
        backends,
        std::future::pending(),
    ));
    let channel = channel(&address).await;
    let mut client = InferenceServiceClient::new(channel.clone());
    while client.get_status(proto::GetStatusRequest {}).await.is_err() {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    channel
}

async fn serve_bare() -> Channel {
    let (listener, address) = listener().await;
    // Accepted connections without Nagle's algorithm, as the service has.
    let incoming = TcpListenerStream::new(listener).map(|connection| {
        connection.inspect(|stream| stream.set_nodelay(true).expect("TCP_NODELAY"))
    });
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(InferenceServiceServer::new(Bare))
            .serve_with_incoming(incoming),
    );
    channel(&address).await
}

fn load_plan() -> Plan {
    Plan {
        concurrency: LOAD_CONCURRENCY,
        stop: Stop::After(Duration::from_secs(LOAD_SECONDS)),
        rps: None,
        warmup: 200,
        timeout: Duration::from_secs(10),
        metadata: Default::default(),
    }
}

fn millis(value: Option<Duration>) -> f64 {
    value.map_or(f64::NAN, |value| value.as_secs_f64() * 1000.0)
}

/// Medians over rounds of (RPS, p50 ms, p99 ms), the two servers loaded
/// in turn.
async fn overhead(ours: &Channel, bare: &Channel, call: &Call) -> ([f64; 3], [f64; 3]) {
    let summary = |reports: &[Report]| {
        [
            median(reports.iter().map(Report::rps).collect()),
            median(reports.iter().map(|r| millis(r.percentile(0.5))).collect()),
            median(reports.iter().map(|r| millis(r.percentile(0.99))).collect()),
        ]
    };
    let (mut mine, mut theirs) = (Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        for (channel, reports) in [(ours, &mut mine), (bare, &mut theirs)] {
            let report = loadgen::run(channel.clone(), call.clone(), load_plan()).await;
            assert_eq!(
                report.codes.keys().collect::<Vec<_>>(),
                ["Ok"],
                "{:?}",
                report.codes
            );
            reports.push(report);
        }
    }
    (summary(&mine), summary(&theirs))
}

/// One generation straight from the engine, as a client of the service
/// would see it.
async fn direct_run(engine: &EmbeddedBackend, prompt: &str) -> Run {
    let started = Instant::now();
    let mut chunks = engine
        .generate(GenerationRequest {
            model: None,
            messages: vec![Message::new(Role::User, prompt)],
            sampling: Sampling {
                max_tokens: DECODE_TOKENS,
                temperature: Some(0.0),
                ..Sampling::default()
            },
            stop: Vec::new(),
            json_schema: None,
            session: None,
        })
        .await
        .expect("the engine takes the request");
    let (mut text, mut first_token) = (String::new(), None);
    let (mut tokens, mut prompt_tokens, mut cached_prompt_tokens) = (0, 0, 0);
    while let Some(chunk) = chunks.next().await {
        match chunk.expect("no error") {
            Chunk::Text(piece) => {
                first_token.get_or_insert_with(|| started.elapsed());
                text.push_str(&piece);
            }
            Chunk::Done(completion) => {
                tokens = completion.completion_tokens;
                prompt_tokens = completion.prompt_tokens;
                cached_prompt_tokens = completion.cached_prompt_tokens;
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

async fn aggregate(client: &InferenceServiceClient<Channel>, streams: usize) -> f64 {
    let started = Instant::now();
    let runs = join_all((0..streams).map(|index| {
        let mut client = client.clone();
        async move {
            let prompt = format!("Tell story number {index} about a lighthouse.");
            grpc_run(&mut client, greedy(&prompt, DECODE_TOKENS)).await
        }
    }))
    .await;
    f64::from(runs.iter().map(|run| run.tokens).sum::<u32>()) / started.elapsed().as_secs_f64()
}

fn plot(path: &str, series: &[(&str, Vec<f64>)]) {
    let top = series
        .iter()
        .flat_map(|(_, rates)| rates.iter().copied())
        .fold(0.0, f64::max)
        * 1.15;
    let root = SVGBackend::new(path, (720, 420)).into_drawing_area();
    root.fill(&WHITE).expect("draw");
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "Aggregate decode tokens/s by concurrent streams (SmolLM2-135M Q4_1)",
            ("sans-serif", 18),
        )
        .margin(16)
        .x_label_area_size(40)
        .y_label_area_size(56)
        .build_cartesian_2d(0.5f64..8.5f64, 0f64..top)
        .expect("chart");
    chart
        .configure_mesh()
        .x_desc("concurrent streams")
        .y_desc("tokens/s")
        .draw()
        .expect("mesh");
    let colors = [BLUE, RED, GREEN];
    for ((name, rates), color) in series.iter().zip(colors) {
        let points: Vec<(f64, f64)> = STREAMS
            .iter()
            .zip(rates)
            .map(|(streams, rate)| (*streams as f64, *rate))
            .collect();
        chart
            .draw_series(LineSeries::new(points.clone(), color.stroke_width(2)))
            .expect("line")
            .label(*name)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], color));
        chart
            .draw_series(
                points
                    .into_iter()
                    .map(|point| Circle::new(point, 4, color.filled())),
            )
            .expect("points");
    }
    chart
        .configure_series_labels()
        .border_style(BLACK)
        .background_style(WHITE)
        .draw()
        .expect("legend");
    root.present().expect("write the plot");
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    let started = Instant::now();
    println!(
        "{:<48} {:>12} {:>12} {:>7} {:>8}",
        "", "service", "baseline", "ratio", "goal"
    );
    let row = |name: &str, ours: f64, theirs: f64, goal: &str| {
        println!(
            "{name:<48} {ours:>12.1} {theirs:>12.1} {:>7.2} {goal:>8}",
            ours / theirs
        );
    };

    // Gateway overhead.
    let ours = serve_ours(vec![Arc::new(InstantBackend)]).await;
    let bare = serve_bare().await;
    let unary = Call::EnhanceTask(EnhanceTaskRequest {
        task: Some(Task {
            title: "Add password reset".into(),
            ..Default::default()
        }),
        ..Default::default()
    });
    let streaming = Call::Generate(greedy("Say hi.", PIECES as u32));
    let (unary_ours, unary_bare) = overhead(&ours, &bare, &unary).await;
    let (stream_ours, stream_bare) = overhead(&ours, &bare, &streaming).await;
    println!(
        "gateway overhead: instant backend vs bare tonic server, {LOAD_CONCURRENCY} concurrent, {LOAD_SECONDS} s, medians of {ROUNDS}"
    );
    for (kind, mine, theirs) in [
        ("unary EnhanceTask", unary_ours, unary_bare),
        ("streaming Generate", stream_ours, stream_bare),
    ] {
        row(&format!("{kind} requests/s"), mine[0], theirs[0], ">=0.90");
        row(&format!("{kind} p50 ms"), mine[1], theirs[1], "");
        row(&format!("{kind} p99 ms"), mine[2], theirs[2], "<=1.20");
    }
    if args.only == Some(Section::Gateway) {
        return;
    }

    // Token relay: the same engine through the service and called directly.
    let engine = Arc::new(
        EmbeddedBackend::load(
            EmbeddedSettings::one_model(
                &model_path(),
                EngineShape {
                    parallel: 8,
                    ctx_per_sequence: 2048,
                    batch_tokens: 512,
                    threads: 1,
                    flash_attention: false,
                },
                64,
            )
            .expect("the model's metadata reads"),
        )
        .await
        .expect("load the embedded engine"),
    );
    let relayed = serve_ours(vec![engine.clone() as Arc<dyn Backend>]).await;
    let mut client = InferenceServiceClient::new(relayed);
    let (mut through, mut direct) = (Vec::new(), Vec::new());
    for round in 0..ROUNDS {
        through.push(
            grpc_run(
                &mut client,
                greedy(
                    &format!("Story {round}: a lighthouse keeper's day."),
                    DECODE_TOKENS,
                ),
            )
            .await,
        );
        direct.push(
            direct_run(
                &engine,
                &format!("Story {}: a lighthouse keeper's day.", round + 50),
            )
            .await,
        );
    }
    assert!(
        through
            .iter()
            .chain(&direct)
            .all(|run| !run.text.is_empty()),
        "every run generated text"
    );
    let decode = |runs: &[Run]| median(runs.iter().map(Run::decode_rate).collect());
    let prefill = |runs: &[Run]| median(runs.iter().map(Run::prefill_rate).collect());
    let first_tokens = |runs: &[Run]| -> Vec<f64> {
        runs.iter()
            .map(|run| run.first_token.as_secs_f64() * 1000.0)
            .collect()
    };
    let first = |runs: &[Run]| median(first_tokens(runs));
    println!(
        "token relay: embedded engine through the service vs called in process, medians of {ROUNDS}"
    );
    row(
        "Generate decode tokens/s",
        decode(&through),
        decode(&direct),
        ">=0.97",
    );
    row(
        "Generate prefill tokens/s",
        prefill(&through),
        prefill(&direct),
        ">=0.97",
    );
    row(
        "Generate first token ms",
        first(&through),
        first(&direct),
        "",
    );
    row(
        "Generate first token ms, slowest",
        percentile(first_tokens(&through), 1.0),
        percentile(first_tokens(&direct), 1.0),
        "",
    );

    // Concurrency scaling.
    let mut embedded_rates = Vec::new();
    for streams in STREAMS {
        embedded_rates.push(aggregate(&client, streams).await);
    }
    drop(client);
    let llama = LlamaServer::start_with("1", "8");
    let openai = serve_ours(vec![Arc::new(
        rigger_inference::backend::openai::OpenAiBackend::new(
            reqwest::Client::new(),
            rigger_inference::backend::openai::OpenAiSettings {
                base_url: llama.openai_url(),
                api_key: None,
                model: None,
                probe_timeout: Duration::from_secs(5),
            },
        ),
    )])
    .await;
    let openai_client = InferenceServiceClient::new(openai);
    let mut openai_rates = Vec::new();
    for streams in STREAMS {
        openai_rates.push(aggregate(&openai_client, streams).await);
    }
    println!("concurrency scaling: aggregate decode tokens/s (1 thread each)");
    println!("{:<48} {:>12} {:>12}", "streams", "embedded", "llama.cpp");
    for (index, streams) in STREAMS.iter().enumerate() {
        println!(
            "{:<48} {:>12.1} {:>12.1}",
            streams, embedded_rates[index], openai_rates[index]
        );
    }

    // Memory of the service as its own process.
    let model = model_path();
    let (service, service_client) = Service::start(&[
        ("INFERENCE_BACKEND", "embedded"),
        ("RIGGER_MODEL_PATH", model.to_str().expect("UTF-8 path")),
        ("RIGGER_THREADS", "1"),
        ("RIGGER_PARALLEL", "8"),
        ("RIGGER_MAX_QUEUE", "64"),
    ])
    .await;
    let pid = service.child.id();
    let idle = status_mib(pid, "VmRSS:");
    let load = tokio::spawn({
        let client = service_client.clone();
        async move { aggregate(&client, 64).await }
    });
    let mut under_load = Vec::new();
    while !load.is_finished() {
        under_load.push(status_mib(pid, "VmRSS:"));
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    load.await.expect("the load ran");
    let after = status_mib(pid, "VmRSS:");
    let loaded = under_load.iter().copied().fold(idle, f64::max);
    println!(
        "memory: service RSS idle {idle:.0} MiB, under 64 streams up to {loaded:.0} MiB (peak {:.0}), after {after:.0} MiB",
        peak_rss_mib(pid)
    );

    std::fs::create_dir_all("benches/results").expect("results directory");
    let report = json!({
        "machine": { "cpus": std::thread::available_parallelism().map_or(0, |n| n.get()), "os": std::env::consts::OS, "arch": std::env::consts::ARCH },
        "gateway_overhead": {
            "concurrency": LOAD_CONCURRENCY, "seconds": LOAD_SECONDS,
            "unary": { "service": {"rps": unary_ours[0], "p50_ms": unary_ours[1], "p99_ms": unary_ours[2]},
                       "bare": {"rps": unary_bare[0], "p50_ms": unary_bare[1], "p99_ms": unary_bare[2]} },
            "streaming": { "service": {"rps": stream_ours[0], "p50_ms": stream_ours[1], "p99_ms": stream_ours[2]},
                           "bare": {"rps": stream_bare[0], "p50_ms": stream_bare[1], "p99_ms": stream_bare[2]} },
        },
        "token_relay_embedded": {
            "decode_tokens_per_s": {"service": decode(&through), "direct": decode(&direct)},
            "first_token_ms": {"service": first(&through), "direct": first(&direct)},
        },
        "scaling": { "streams": STREAMS, "embedded": embedded_rates, "llama_cpp_server": openai_rates },
        "memory_mib": { "idle": idle, "under_load": loaded, "peak": peak_rss_mib(pid), "after": after },
    });
    std::fs::write("benches/results/kit.json", format!("{report:#}\n")).expect("write kit.json");
    plot(
        "benches/results/scaling.svg",
        &[
            ("embedded", embedded_rates),
            ("llama.cpp server (openai backend)", openai_rates),
        ],
    );
    println!(
        "wrote benches/results/kit.json and benches/results/scaling.svg in {:.0} s",
        started.elapsed().as_secs_f64()
    );
}
