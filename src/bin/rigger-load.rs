//! `rigger-load`: load-tests a rigger-inference server with this crate's
//! own gRPC client and prints ghz's summary (or JSON). It takes ghz's JSON
//! config files (`deploy/ghz/*.json`); flags override what they say.
//!
//!   rigger-load --config deploy/ghz/generate.json --total 100 --concurrency 8

use std::{path::PathBuf, process::ExitCode, time::Duration};

use clap::{Parser, ValueEnum};
use rigger_inference::loadgen::{self, Call, GhzConfig, Plan, Stop};
use tonic::transport::Endpoint;

#[derive(Clone, Copy, ValueEnum)]
enum Format {
    Text,
    Json,
}

#[derive(Parser)]
#[command(name = "rigger-load", version, about)]
struct Args {
    /// ghz config file (JSON) naming the call, its data and the load.
    #[arg(long, env = "RIGGER_LOAD_CONFIG")]
    config: PathBuf,
    /// Server address, host:port; default: the config's `host`.
    #[arg(long, env = "RIGGER_LOAD_HOST")]
    host: Option<String>,
    /// Requests to send; default: the config's `total` (ghz: 200).
    #[arg(long, env = "RIGGER_LOAD_TOTAL")]
    total: Option<usize>,
    /// Run for this long instead of a total.
    #[arg(long, env = "RIGGER_LOAD_DURATION", value_parser = humantime::parse_duration)]
    duration: Option<Duration>,
    /// Requests in flight at once; default: the config's (ghz: 50).
    #[arg(long, env = "RIGGER_LOAD_CONCURRENCY")]
    concurrency: Option<usize>,
    /// Requests per second across all workers; default: unlimited.
    #[arg(long, env = "RIGGER_LOAD_RPS")]
    rps: Option<f64>,
    /// Requests sent first and left out of the report.
    #[arg(long, env = "RIGGER_LOAD_WARMUP")]
    warmup: Option<usize>,
    #[arg(long, env = "RIGGER_LOAD_FORMAT", value_enum, default_value = "text")]
    format: Format,
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    match run(args).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(problem) => {
            eprintln!("rigger-load: {problem}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> Result<(), String> {
    let text = std::fs::read_to_string(&args.config)
        .map_err(|error| format!("{}: {error}", args.config.display()))?;
    let config: GhzConfig = serde_json::from_str(&text)
        .map_err(|error| format!("{}: {error}", args.config.display()))?;
    let call = Call::from_ghz(&config.call, &config.data)?;
    let mut plan = Plan::from_ghz(&config)?;
    if let Some(total) = args.total {
        plan.stop = Stop::Total(total);
    }
    if let Some(duration) = args.duration {
        plan.stop = Stop::After(duration);
    }
    plan.concurrency = args.concurrency.unwrap_or(plan.concurrency).max(1);
    plan.rps = args.rps.or(plan.rps);
    plan.warmup = args.warmup.unwrap_or(plan.warmup);
    let host = args.host.unwrap_or(config.host);
    let channel = Endpoint::from_shared(format!("http://{host}"))
        .map_err(|error| format!("invalid host {host}: {error}"))?
        .connect()
        .await
        .map_err(|error| format!("cannot connect to {host}: {error}"))?;
    let report = loadgen::run(channel, call, plan).await;
    match args.format {
        Format::Text => print!("{}", report.to_text()),
        Format::Json => println!("{:#}", report.to_json()),
    }
    Ok(())
}
