//! What the benchmarks share: a generation as the client saw it, the
//! service started as its own process, and the statistics they print.

use std::{
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use futures_util::StreamExt;
use rigger_inference::proto::{
    GenerateRequest, GetStatusRequest, generate_response::Event,
    inference_service_client::InferenceServiceClient,
};
use tonic::transport::Channel;

use crate::support::free_port;

/// One generation as the client saw it.
#[derive(Clone, Debug)]
pub struct Run {
    pub text: String,
    pub prompt_tokens: u32,
    /// Prompt tokens the runtime took from its prompt cache.
    pub cached_prompt_tokens: u32,
    pub tokens: u32,
    pub first_token: Duration,
    pub total: Duration,
}

impl Run {
    pub fn decode_rate(&self) -> f64 {
        f64::from(self.tokens.saturating_sub(1)) / (self.total - self.first_token).as_secs_f64()
    }
    pub fn prefill_rate(&self) -> f64 {
        f64::from(self.prompt_tokens) / self.first_token.as_secs_f64()
    }
}

/// Why a Generate stream could not be read as one whole generation.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("{}: {}", .0.code(), .0.message())]
    Status(#[from] tonic::Status),
    #[error("the stream {0}")]
    Incomplete(&'static str),
}

pub async fn grpc_run(
    client: &mut InferenceServiceClient<Channel>,
    request: GenerateRequest,
) -> Run {
    try_grpc_run(client, request).await.expect("Generate")
}

/// A Generate call read to its end; a load generator counts the error
/// where a benchmark of one call would stop.
pub async fn try_grpc_run(
    client: &mut InferenceServiceClient<Channel>,
    request: GenerateRequest,
) -> Result<Run, RunError> {
    let started = Instant::now();
    let mut stream = client.generate(request).await?.into_inner();
    let (mut text, mut first_token, mut summary) = (String::new(), None, None);
    while let Some(message) = stream.next().await {
        match message?
            .event
            .ok_or(RunError::Incomplete("carried a message without an event"))?
        {
            Event::Text(piece) => {
                first_token.get_or_insert_with(|| started.elapsed());
                text.push_str(&piece);
            }
            Event::Summary(last) => summary = Some(last),
        }
    }
    let meta = summary
        .ok_or(RunError::Incomplete("ended without a summary"))?
        .meta
        .ok_or(RunError::Incomplete("ended with a summary without meta"))?;
    Ok(Run {
        text,
        prompt_tokens: meta.prompt_tokens,
        cached_prompt_tokens: meta.cached_prompt_tokens,
        tokens: meta.completion_tokens,
        first_token: first_token.ok_or(RunError::Incomplete("carried no text"))?,
        total: started.elapsed(),
    })
}

/// The service binary in a process of its own, configured by environment.
pub struct Service {
    pub child: Child,
}

impl Service {
    /// Starts the service with `settings` (environment variables on top of
    /// a free port, metrics off and the result cache off, so engines' own
    /// caches are what is measured) and waits until it answers GetStatus.
    pub async fn start(settings: &[(&str, &str)]) -> (Self, InferenceServiceClient<Channel>) {
        let address = format!("127.0.0.1:{}", free_port());
        let child = Command::new(env!("CARGO_BIN_EXE_rigger-inference"))
            .env("RIGGER_LISTEN", &address)
            .env("RIGGER_METRICS_LISTEN", "off")
            .env("RIGGER_TASK_CACHE_ENTRIES", "0")
            .envs(settings.iter().copied())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start rigger-inference");
        let service = Self { child };
        let endpoint = Channel::from_shared(format!("http://{address}")).unwrap();
        // Ready once it answers GetStatus: the model loads after the port
        // is bound, and calls meanwhile are UNAVAILABLE.
        for _ in 0..2400 {
            if let Ok(channel) = endpoint.connect().await {
                let mut client = InferenceServiceClient::new(channel);
                if client.get_status(GetStatusRequest {}).await.is_ok() {
                    return (service, client);
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("rigger-inference did not start on {address}");
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Peak resident memory of a process, in MiB.
pub fn peak_rss_mib(pid: u32) -> f64 {
    status_mib(pid, "VmHWM:")
}

/// A memory figure of `/proc/<pid>/status` (given in kB, e.g. `VmRSS:`),
/// in MiB.
pub fn status_mib(pid: u32, field: &str) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|line| line.strip_prefix(field))
        .and_then(|value| {
            value
                .trim()
                .trim_end_matches("kB")
                .trim()
                .parse::<f64>()
                .ok()
        })
        .map_or(f64::NAN, |kib| kib / 1024.0)
}

pub fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

pub fn percentile(mut values: Vec<f64>, share: f64) -> f64 {
    values.sort_by(f64::total_cmp);
    let index = ((values.len() as f64 - 1.0) * share).round() as usize;
    values[index]
}
