//! Prometheus metrics on their own loopback address: calls by RPC, backend
//! and code (a client that leaves counts as CANCELLED), first-token times,
//! admission state, and each backend's health, circuit and retries.

use rigger_inference::{
    config::MetricsListen,
    proto::{EnhanceTaskRequest, GenerateRequest, Task},
};
use tonic::Code;

use super::{serve_with, streaming};
use crate::support::{
    config, free_port, generate, greedy,
    scripted::{End, ErrorKind, Reply, ScriptedBackend},
};

async fn scrape(address: &str) -> (String, String) {
    let response = reqwest::get(format!("http://{address}/metrics"))
        .await
        .expect("the metrics endpoint answers");
    assert!(response.status().is_success());
    let content_type = response.headers()["content-type"]
        .to_str()
        .expect("ASCII")
        .to_owned();
    (content_type, response.text().await.expect("a body"))
}

#[tokio::test]
async fn metrics_count_calls_and_show_state() {
    let (first, second) = (
        ScriptedBackend::new("first"),
        ScriptedBackend::new("second"),
    );
    first.next(Reply::refuse(ErrorKind::Busy));
    first.next(Reply::text(["Once"]).then(End::Hang));
    let address = format!("127.0.0.1:{}", free_port());
    let mut settings = config(&[]);
    settings.metrics_listen = MetricsListen(Some(address.parse().expect("an address")));
    let server = serve_with(settings, &[&first, &second]).await;
    let mut client = server.client().await;

    let passed_on = generate(&mut client, greedy("Name a colour.", 8))
        .await
        .expect("the second backend answers");
    assert_eq!(passed_on.summary.meta.expect("meta").backend, "second");
    drop(streaming(&mut client, "A story").await);
    first.dropped(1).await;
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
    assert_eq!(refused.code(), Code::InvalidArgument);

    let (content_type, text) = scrape(&address).await;
    assert!(content_type.starts_with("application/openmetrics-text"));
    for line in [
        "rigger_calls_total{rpc=\"generate\",backend=\"second\",code=\"Ok\"} 1",
        "rigger_calls_total{rpc=\"generate\",backend=\"first\",code=\"Ok\"} 1",
        "rigger_calls_total{rpc=\"generate\",backend=\"first\",code=\"Cancelled\"} 1",
        "rigger_calls_total{rpc=\"generate\",backend=\"first\",code=\"InvalidArgument\"} 1",
        "rigger_in_flight 0",
        "rigger_queue_depth{priority=\"batch\"} 0",
        "rigger_backend_up{backend=\"first\"} 1",
        "rigger_backend_active{backend=\"first\"} 1",
        "rigger_backend_active{backend=\"second\"} 0",
        "rigger_circuit_state{backend=\"first\"} 0",
        "rigger_backend_failures_total{backend=\"first\"} 0",
        "rigger_backend_retried_total{backend=\"first\"} 1",
        "rigger_time_to_first_token_seconds_count{rpc=\"generate\",backend=\"first\"} 1",
        "rigger_time_to_first_token_seconds_count{rpc=\"generate\",backend=\"second\"} 1",
        "rigger_queue_wait_seconds_count{priority=\"interactive\"} 3",
    ] {
        assert!(text.contains(line), "{line} missing from\n{text}");
    }
}

/// A structured answer that passes the enhancement rules.
const ENHANCEMENT: &str = r#"{"kind":"specify","title":"Make search tolerate typos","description":"Search finds nothing when a query has a typo today; make it tolerate one typo per word.","acceptance_criteria":["A search with one typo finds the intended results"]}"#;

#[tokio::test]
async fn a_unary_call_is_counted_under_the_backend_that_answered() {
    let (first, second) = (
        ScriptedBackend::new("first"),
        ScriptedBackend::new("second"),
    );
    first.next(Reply::refuse(ErrorKind::Unavailable));
    second.next(Reply::text([ENHANCEMENT]));
    let address = format!("127.0.0.1:{}", free_port());
    let mut settings = config(&[]);
    settings.metrics_listen = MetricsListen(Some(address.parse().expect("an address")));
    let server = serve_with(settings, &[&first, &second]).await;
    let answer = server
        .client()
        .await
        .enhance_task(EnhanceTaskRequest {
            task: Some(Task {
                title: "Fix search".into(),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .expect("the second backend answers")
        .into_inner();
    assert_eq!(answer.meta.expect("meta").backend, "second");

    let (_, text) = scrape(&address).await;
    for line in [
        "rigger_calls_total{rpc=\"enhance_task\",backend=\"second\",code=\"Ok\"} 1",
        "rigger_backend_active{backend=\"first\"} 1",
        "rigger_backend_retried_total{backend=\"first\"} 1",
    ] {
        assert!(text.contains(line), "{line} missing from\n{text}");
    }
    assert!(
        !text.contains("rigger_calls_total{rpc=\"enhance_task\",backend=\"first\""),
        "the call is counted under the backend that answered, not the active one:\n{text}"
    );
}
