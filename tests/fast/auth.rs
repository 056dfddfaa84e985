//! Bearer-token authentication: inference calls need the token and never
//! reach a backend without it; exempt services (health and reflection by
//! default, or a configured list) do not; a token file works like the flag.

use rigger_inference::{proto::GetStatusRequest, server::health::INFERENCE_SERVICE};
use tonic::{Code, Request};
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

use super::serve;
use crate::support::{
    TestServer, greedy,
    scripted::{ErrorKind, ScriptedBackend},
};

fn with_authorization<T>(message: T, authorization: Option<&str>) -> Request<T> {
    let mut request = Request::new(message);
    if let Some(value) = authorization {
        request
            .metadata_mut()
            .insert("authorization", value.parse().expect("ASCII"));
    }
    request
}

async fn health_code(server: &TestServer) -> Code {
    let outcome = HealthClient::new(server.channel().await)
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await;
    outcome.map_or_else(|status| status.code(), |_| Code::Ok)
}

async fn assert_token_required(server: &TestServer, backend: &ScriptedBackend, token: &str) {
    let mut client = server.client().await;
    for wrong in [None, Some("Bearer nope"), Some(token)] {
        let status = client
            .get_status(with_authorization(GetStatusRequest {}, wrong))
            .await
            .expect_err("refused without the right token");
        assert_eq!(status.code(), Code::Unauthenticated, "{wrong:?}");
        assert!(!status.message().contains(token), "no secret in errors");
        let status = client
            .generate(with_authorization(greedy("Hi", 4), wrong))
            .await
            .expect_err("refused without the right token");
        assert_eq!(status.code(), Code::Unauthenticated, "{wrong:?}");
    }
    assert!(
        backend.requests().is_empty(),
        "refused calls never reach it"
    );
    let bearer = format!("Bearer {token}");
    client
        .get_status(with_authorization(GetStatusRequest {}, Some(&bearer)))
        .await
        .expect("the token opens the door");
    client
        .generate(with_authorization(greedy("Hi", 4), Some(&bearer)))
        .await
        .expect("the token opens the door");
    assert_eq!(health_code(server).await, Code::Ok, "health needs no token");
}

#[tokio::test]
async fn inference_calls_need_the_token_and_probes_do_not() {
    let backend = ScriptedBackend::new("first");
    // Health answers without a probe having succeeded: nothing here waits
    // on the backend.
    backend.probes_fail(Some(ErrorKind::Unavailable));
    let server = serve(&["--auth-token", "s3cret-token"], &[&backend]).await;
    assert_token_required(&server, &backend, "s3cret-token").await;
}

#[tokio::test]
async fn the_token_can_come_from_a_file() {
    let path = std::env::temp_dir().join(format!("rigger-fast-token-{}", std::process::id()));
    std::fs::write(&path, "from-a-file\n").expect("write the token file");
    let backend = ScriptedBackend::new("first");
    let server = serve(
        &["--auth-token-file", path.to_str().expect("UTF-8")],
        &[&backend],
    )
    .await;
    assert_token_required(&server, &backend, "from-a-file").await;
    let _ = std::fs::remove_file(path);
}

#[tokio::test]
async fn the_exempt_services_are_configurable() {
    let backend = ScriptedBackend::new("first");
    let server = serve(
        &[
            "--auth-token",
            "s3cret-token",
            "--auth-exempt",
            INFERENCE_SERVICE,
        ],
        &[&backend],
    )
    .await;
    let mut client = server.client().await;
    client
        .get_status(GetStatusRequest {})
        .await
        .expect("an exempt service needs no token");
    assert_eq!(
        health_code(&server).await,
        Code::Unauthenticated,
        "health is no longer exempt"
    );
}
