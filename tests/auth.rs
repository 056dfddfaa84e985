//! Bearer-token authentication: inference calls need the token, health and
//! reflection do not; a token file works like the flag.

mod support;

use rigger_inference::proto::GetStatusRequest;
use support::{TestServer, config, free_port};
use tonic::{Code, Request};
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

fn status_request(authorization: Option<&str>) -> Request<GetStatusRequest> {
    let mut request = Request::new(GetStatusRequest {});
    if let Some(value) = authorization {
        request
            .metadata_mut()
            .insert("authorization", value.parse().unwrap());
    }
    request
}

async fn assert_token_required(server: &TestServer, token: &str) {
    let mut client = server.client().await;
    for wrong in [None, Some("Bearer nope"), Some(token)] {
        let status = client
            .get_status(status_request(wrong))
            .await
            .expect_err("refused without the right token");
        assert_eq!(status.code(), Code::Unauthenticated, "{wrong:?}");
    }
    let bearer = format!("Bearer {token}");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        match client.get_status(status_request(Some(&bearer))).await {
            Ok(_) => break,
            // Past the token check: the backends are still being selected.
            Err(status) if status.code() == Code::Unavailable => {
                assert!(std::time::Instant::now() < deadline, "{status:?}");
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
            Err(status) => panic!("the token opens the door: {status:?}"),
        }
    }
    let mut health = HealthClient::new(server.channel().await);
    health
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .expect("health needs no token");
}

/// A backend that needs no model: calls are refused before reaching it.
fn flags(extra: &[&str]) -> Vec<String> {
    let no_ollama = format!("127.0.0.1:{}", free_port());
    let mut all: Vec<String> = ["--backend", "ollama", "--ollama-host", &no_ollama]
        .map(str::to_owned)
        .to_vec();
    all.extend(extra.iter().map(|flag| (*flag).to_owned()));
    all
}

#[tokio::test]
async fn inference_calls_need_the_token_and_probes_do_not() {
    let flags = flags(&["--auth-token", "s3cret-token"]);
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let server = TestServer::spawn(config(&flags)).await;
    assert_token_required(&server, "s3cret-token").await;
}

#[tokio::test]
async fn the_token_can_come_from_a_file() {
    let path = std::env::temp_dir().join(format!("rigger-token-{}", std::process::id()));
    std::fs::write(&path, "from-a-file\n").unwrap();
    let flags = flags(&["--auth-token-file", path.to_str().unwrap()]);
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let server = TestServer::spawn(config(&flags)).await;
    assert_token_required(&server, "from-a-file").await;
    let _ = std::fs::remove_file(path);
}
