//! The fast tier: the whole gRPC service on a loopback port over scripted
//! in-process backends (tests/support/scripted.rs). No Python, model or
//! runtime process, so it runs in seconds (`make test-fast`). One module per
//! concern; what only a real runtime can show stays in the other test files.

#[path = "../support/mod.rs"]
mod support;

mod admission;
mod auth;
mod cancellation;
mod deadlines;
mod drain;
mod failover;
mod health;
mod instances;
mod metrics;
mod models;
mod result_cache;
mod task_rules;
mod validation;

use std::{future::Future, sync::Arc, time::Duration};

use rigger_inference::{
    backend::Backend,
    config::Config,
    proto::{
        BackendStatus, GenerateResponse, GetStatusResponse,
        inference_service_client::InferenceServiceClient,
    },
};
use support::{TestServer, scripted::ScriptedBackend};
use tonic::transport::Channel;

/// How long a test waits for something that should happen.
const WAIT: Duration = Duration::from_secs(10);
/// How often a test looks again at state it can only poll (GetStatus).
const POLL: Duration = Duration::from_millis(10);

type Client = InferenceServiceClient<Channel>;

/// The service over `backends` (in failover order), configured by `flags`
/// on top of the tests' defaults.
async fn serve(flags: &[&str], backends: &[&Arc<ScriptedBackend>]) -> TestServer {
    serve_with(support::config(flags), backends).await
}

async fn serve_with(mut config: Config, backends: &[&Arc<ScriptedBackend>]) -> TestServer {
    // No model in this tier: parts are held to their task by shared words
    // (the semantic check, with its model, is tests/on_topic.rs).
    config.on_topic_similarity = 0.0;
    let backends = backends
        .iter()
        .map(|backend| Arc::clone(backend) as Arc<dyn Backend>)
        .collect();
    TestServer::with_backends(config, backends).await
}

/// Polls `condition` until it holds.
async fn until<F, Fut>(what: &str, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + WAIT;
    while !condition().await {
        assert!(tokio::time::Instant::now() < deadline, "{what}");
        tokio::time::sleep(POLL).await;
    }
}

/// Waits until admission shows `in_flight` running and `queued` waiting calls.
async fn until_admission(client: &Client, in_flight: u64, queued: u64) {
    until(
        &format!("{in_flight} calls running and {queued} waiting"),
        || {
            let mut client = client.clone();
            async move {
                let (running, waiting, _) = support::admission(&mut client).await;
                (running, waiting) == (in_flight, queued)
            }
        },
    )
    .await;
}

async fn status(client: &mut Client) -> GetStatusResponse {
    client
        .get_status(rigger_inference::proto::GetStatusRequest {})
        .await
        .expect("GetStatus")
        .into_inner()
}

/// The GetStatus entry of the backend called `name`.
async fn backend_status(client: &mut Client, name: &str) -> BackendStatus {
    status(client)
        .await
        .backends
        .into_iter()
        .find(|backend| backend.name == name)
        .unwrap_or_else(|| panic!("GetStatus lists {name}"))
}

/// Which backend answered a short generation.
async fn answered_by_backend(client: &mut Client) -> String {
    support::generate(client, support::greedy("Say hello.", 4))
        .await
        .expect("the call succeeds")
        .summary
        .meta
        .expect("meta")
        .backend
}

/// A Generate call started, its first message read.
async fn streaming(client: &mut Client, prompt: &str) -> tonic::Streaming<GenerateResponse> {
    let mut stream = client
        .generate(support::greedy(prompt, 8))
        .await
        .expect("starts")
        .into_inner();
    futures_util::StreamExt::next(&mut stream)
        .await
        .expect("a first message")
        .expect("no error");
    stream
}
