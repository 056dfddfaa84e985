//! The `rigger-inference` binary: parse configuration, set up logging, serve.

use clap::Parser;
use rigger_inference::{config::Config, server};

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let config = Config::parse();
    server::init_tracing(config.log_format);
    match server::run(config).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!(%error, "rigger-inference stopped");
            eprintln!("rigger-inference: {error}");
            std::process::ExitCode::FAILURE
        }
    }
}
