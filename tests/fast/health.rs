//! The gRPC health protocol: Check and Watch for the process, the
//! inference service (readiness) and each backend; backend entries follow
//! their circuits and probes; readiness can demand a real generation; the
//! `rigger-health` probe binary exits 0 only for a SERVING entry.

use std::time::Duration;

use rigger_inference::server::health::INFERENCE_SERVICE;
use tonic::Code;
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

use super::{answered_by_backend, backend_status, serve, serve_with};
use crate::support::{
    config, free_port,
    health::{check, next_status, watch, watch_until},
    scripted::{End, ErrorKind, Reply, ScriptedBackend},
};

/// How long a Watch stream must stay quiet to count as not repeating.
const QUIET: Duration = Duration::from_millis(300);

#[tokio::test]
async fn check_answers_for_the_process_the_service_and_each_backend() {
    let (first, second) = (
        ScriptedBackend::new("first"),
        ScriptedBackend::new("second"),
    );
    let server = serve(&[], &[&first, &second]).await;
    let channel = server.channel().await;
    watch_until(
        &mut watch(&channel, INFERENCE_SERVICE).await,
        ServingStatus::Serving,
    )
    .await;
    for service in ["", "rigger.backend.first", "rigger.backend.second"] {
        assert_eq!(
            check(&channel, service).await,
            ServingStatus::Serving,
            "{service:?}"
        );
    }
    let status = HealthClient::new(channel.clone())
        .check(HealthCheckRequest {
            service: "no.such.Service".into(),
        })
        .await
        .expect_err("Check on an unknown service");
    assert_eq!(status.code(), Code::NotFound);
    let mut unknown = watch(&channel, "no.such.Service").await;
    assert_eq!(
        next_status(&mut unknown).await,
        ServingStatus::ServiceUnknown
    );
    let quiet = tokio::time::timeout(QUIET, futures_util::StreamExt::next(&mut unknown)).await;
    assert!(
        quiet.is_err(),
        "the stream stays open without repeating: {quiet:?}"
    );
}

#[tokio::test]
async fn a_backend_entry_follows_its_circuit_while_readiness_holds() {
    let (first, second) = (
        ScriptedBackend::new("first"),
        ScriptedBackend::new("second"),
    );
    first.next(Reply::refuse(ErrorKind::Unavailable));
    let server = serve(
        &["--breaker-failures", "1", "--breaker-cooldown", "500ms"],
        &[&first, &second],
    )
    .await;
    let channel = server.channel().await;
    let mut client = server.client().await;
    let mut entry = watch(&channel, "rigger.backend.first").await;
    watch_until(&mut entry, ServingStatus::Serving).await;

    assert_eq!(answered_by_backend(&mut client).await, "second");
    assert_eq!(
        next_status(&mut entry).await,
        ServingStatus::NotServing,
        "published when the circuit opens, not at the next probe"
    );
    assert_eq!(
        check(&channel, INFERENCE_SERVICE).await,
        ServingStatus::Serving,
        "the service still serves, from the next backend"
    );
    assert_eq!(
        next_status(&mut entry).await,
        ServingStatus::Serving,
        "half-open"
    );
    assert_eq!(answered_by_backend(&mut client).await, "first", "the trial");
    assert_eq!(
        backend_status(&mut client, "first")
            .await
            .consecutive_failures,
        0
    );
}

#[tokio::test]
async fn readiness_follows_the_active_backends_probes() {
    let only = ScriptedBackend::new("only");
    let server = serve(&[], &[&only]).await;
    let channel = server.channel().await;
    let mut client = server.client().await;
    let mut ready = watch(&channel, INFERENCE_SERVICE).await;
    watch_until(&mut ready, ServingStatus::Serving).await;

    only.probes_fail(Some(ErrorKind::Unavailable));
    assert_eq!(
        next_status(&mut ready).await,
        ServingStatus::NotServing,
        "one change"
    );
    assert_eq!(
        check(&channel, "rigger.backend.only").await,
        ServingStatus::NotServing
    );
    assert_eq!(
        check(&channel, "").await,
        ServingStatus::Serving,
        "the process is alive"
    );
    let entry = backend_status(&mut client, "only").await;
    assert!(entry.last_error.contains("unavailable"), "{entry:?}");

    only.probes_fail(None);
    assert_eq!(next_status(&mut ready).await, ServingStatus::Serving);
}

#[tokio::test]
async fn readiness_needs_the_backend_to_generate_not_only_to_answer_probes() {
    let only = ScriptedBackend::new("only");
    let mut settings = config(&[]);
    settings.readiness_generation_interval = Duration::from_millis(200);
    let server = serve_with(settings, &[&only]).await;
    let channel = server.channel().await;
    let mut ready = watch(&channel, INFERENCE_SERVICE).await;
    watch_until(&mut ready, ServingStatus::Serving).await;

    // Probes still succeed, but every generation fails after its first token.
    only.always(Reply::text(["OK"]).then(End::Fail(ErrorKind::Failed)));
    watch_until(&mut ready, ServingStatus::NotServing).await;
    let entry = backend_status(&mut server.client().await, "only").await;
    assert!(
        entry.last_error.contains("test generation failed"),
        "{entry:?}"
    );

    only.always(Reply::text(["OK"]));
    watch_until(&mut ready, ServingStatus::Serving).await;
}

#[tokio::test]
async fn rigger_health_exits_zero_only_for_a_serving_entry() {
    let only = ScriptedBackend::new("only");
    let server = serve(&[], &[&only]).await;
    let channel = server.channel().await;
    watch_until(
        &mut watch(&channel, INFERENCE_SERVICE).await,
        ServingStatus::Serving,
    )
    .await;
    // Run without blocking the runtime the server shares with this test.
    let check_of = |address: String, service: &'static str| async move {
        tokio::process::Command::new(env!("CARGO_BIN_EXE_rigger-health"))
            .args([address.as_str(), service])
            .output()
            .await
            .expect("run rigger-health")
    };
    let run = |service| check_of(server.addr.to_string(), service);
    for service in ["", INFERENCE_SERVICE, "rigger.backend.only"] {
        let output = run(service).await;
        assert!(
            output.status.success(),
            "{service:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let unknown = run("no.such.Service").await;
    assert!(!unknown.status.success());
    assert!(String::from_utf8_lossy(&unknown.stderr).contains("NotFound"));
    only.probes_fail(Some(ErrorKind::Unavailable));
    watch_until(
        &mut watch(&channel, "rigger.backend.only").await,
        ServingStatus::NotServing,
    )
    .await;
    assert!(
        !run("rigger.backend.only").await.status.success(),
        "NOT_SERVING"
    );
    let nobody = check_of(format!("127.0.0.1:{}", free_port()), "").await;
    assert!(!nobody.status.success(), "no server, no health");
}
