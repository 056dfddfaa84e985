//! Prometheus metrics on their own loopback address: calls by RPC, backend
//! and code, first-token times, admission state and backend health.

mod support;

use rigger_inference::{config::MetricsListen, proto::GenerateRequest};
use support::{TestServer, config, free_port, generate, greedy};

async fn scrape(address: &str) -> (String, String) {
    let response = reqwest::get(format!("http://{address}/metrics"))
        .await
        .expect("the metrics endpoint answers");
    assert!(response.status().is_success());
    let content_type = response.headers()["content-type"]
        .to_str()
        .unwrap()
        .to_owned();
    (content_type, response.text().await.unwrap())
}

#[tokio::test]
async fn metrics_count_calls_and_show_state() {
    let address = format!("127.0.0.1:{}", free_port());
    let mut settings = config(&["--backend", "embedded"]);
    settings.metrics_listen = MetricsListen(Some(address.parse().unwrap()));
    let server = TestServer::start(settings).await;
    let mut client = server.client().await;
    generate(&mut client, greedy("Name a colour.", 8))
        .await
        .expect("a generation");
    let refused = generate(
        &mut client,
        GenerateRequest {
            prompt: String::new(),
            ..Default::default()
        },
    )
    .await
    .expect_err("an empty prompt");
    assert_eq!(refused.code(), tonic::Code::InvalidArgument);

    let (content_type, text) = scrape(&address).await;
    assert!(content_type.starts_with("application/openmetrics-text"));
    for line in [
        "rigger_calls_total{rpc=\"generate\",backend=\"embedded\",code=\"Ok\"} 1",
        "rigger_calls_total{rpc=\"generate\",backend=\"embedded\",code=\"InvalidArgument\"} 1",
        "rigger_in_flight 0",
        "rigger_queue_depth{priority=\"batch\"} 0",
        "rigger_backend_up{backend=\"embedded\"} 1",
        "rigger_backend_active{backend=\"embedded\"} 1",
        "rigger_circuit_state{backend=\"embedded\"} 0",
        "rigger_backend_failures_total{backend=\"embedded\"} 0",
        "rigger_backend_retried_total{backend=\"embedded\"} 0",
        "rigger_time_to_first_token_seconds_count{rpc=\"generate\",backend=\"embedded\"} 1",
        "rigger_queue_wait_seconds_count{priority=\"interactive\"} 1",
    ] {
        assert!(text.contains(line), "{line} missing from\n{text}");
    }
}
