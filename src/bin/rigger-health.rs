//! `rigger-health [ADDRESS] [SERVICE]`: asks a rigger-inference server's
//! gRPC health service for SERVICE's status (default `""`, the process) and
//! exits 0 when it is SERVING, 1 otherwise, naming what it saw. The
//! container image's HEALTHCHECK, and a probe for hosts without
//! `grpc_health_probe`.

use std::{process::ExitCode, time::Duration};

use clap::Parser;
use tonic::transport::Endpoint;
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

#[derive(Parser)]
#[command(name = "rigger-health", version, about)]
struct Args {
    /// Server address, host:port (plaintext gRPC).
    #[arg(env = "RIGGER_HEALTH_ADDRESS", default_value = "127.0.0.1:50051")]
    address: String,

    /// Health entry to check: `""` (the process), the inference service
    /// `rigger.inference.v1.InferenceService` (readiness), or
    /// `rigger.backend.<name>`.
    #[arg(env = "RIGGER_HEALTH_SERVICE", default_value = "")]
    service: String,

    /// How long connecting and asking may take.
    #[arg(long, env = "RIGGER_HEALTH_TIMEOUT", value_parser = humantime::parse_duration, default_value = "3s")]
    timeout: Duration,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let args = Args::parse();
    match check(&args).await {
        Ok(ServingStatus::Serving) => ExitCode::SUCCESS,
        Ok(status) => {
            eprintln!("{:?}: {}", args.service, status.as_str_name());
            ExitCode::FAILURE
        }
        Err(problem) => {
            eprintln!("{}: {problem}", args.address);
            ExitCode::FAILURE
        }
    }
}

async fn check(args: &Args) -> Result<ServingStatus, String> {
    let endpoint = Endpoint::from_shared(format!("http://{}", args.address))
        .map_err(|error| format!("invalid address: {error}"))?
        .connect_timeout(args.timeout)
        .timeout(args.timeout);
    let channel = endpoint
        .connect()
        .await
        .map_err(|error| format!("cannot connect: {error}"))?;
    let response = HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: args.service.clone(),
        })
        .await
        .map_err(|status| format!("{:?}: {}", status.code(), status.message()))?;
    ServingStatus::try_from(response.into_inner().status)
        .map_err(|_| "unknown serving status".to_owned())
}
