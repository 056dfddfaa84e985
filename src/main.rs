//! The `rigger-inference` binary: parse configuration, set up logging, serve.

use clap::Parser;
use rigger_inference::{app, config::Config, server};

#[tokio::main]
async fn main() {
    let config = Config::parse();
    let export = server::init_tracing_with_export(config.log_format, &config.telemetry);
    let code = match app::run(config).await {
        Ok(()) => 0,
        Err(error) => {
            tracing::error!(%error, "rigger-inference stopped");
            eprintln!("rigger-inference: {error}");
            1
        }
    };
    export.shutdown().await;
    // Exits here rather than by returning: dropping the runtime would wait
    // for a model load still running on a blocking thread after an early
    // shutdown.
    std::process::exit(code);
}
