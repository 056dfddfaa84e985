//! Errors reach clients as gRPC's standard error details (google.rpc): an
//! independent client, Python grpcio-status, decodes `BadRequest`,
//! `RetryInfo` and `ErrorInfo` from the live service, and tonic-types reads
//! the same from Rust.
//!
//! Each kind is provoked deterministically over the Ollama stand-in, whose
//! engine here is a scripted OpenAI-compatible server: it answers every
//! chat with JSON cut off by max_tokens (a broken task rule) and never
//! answers a prompt carrying [`HOLD`] (a held slot, a passed deadline). No
//! model, no runtime process.

mod support;

use std::{collections::BTreeMap, process::Command, sync::Arc, time::Duration};

use axum::{
    Json, Router,
    extract::State,
    http::header,
    response::{IntoResponse, Response},
    routing::{get, post},
};
use prost::Message;
use rigger_inference::proto::{
    EnhanceTaskRequest, GenerateRequest, SamplingOptions, Task,
    inference_service_client::InferenceServiceClient,
};
use serde_json::{Value, json};
use support::{
    TestServer, collect, config, free_port,
    ollama::{self, OllamaStandIn},
    python, repo_path,
};
use tokio::{net::TcpListener, sync::Notify};
use tonic::{Code, Status, transport::Channel};
use tonic_types::StatusExt;

/// A prompt carrying this is never answered by the scripted engine.
const HOLD: &str = "<hold>";
/// The deadline of calls to the main server that set none.
const DEFAULT_DEADLINE_MS: u64 = 300;
/// Deadline of every call the test means to end by itself.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);
const ENHANCE: &str = "/rigger.inference.v1.InferenceService/EnhanceTask";
const GENERATE: &str = "/rigger.inference.v1.InferenceService/Generate";
/// The token budget of the task call whose every answer is cut off.
const TASK_MAX_TOKENS: u32 = 64;

/// An OpenAI-compatible engine that answers from a script.
struct ScriptedEngine {
    url: String,
    /// Notified each time a held request arrives.
    held: Arc<Notify>,
}

impl ScriptedEngine {
    async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/v1", listener.local_addr().unwrap());
        let held = Arc::new(Notify::new());
        let app = Router::new()
            .route("/v1/models", get(models))
            .route("/v1/chat/completions", post(chat))
            .with_state(held.clone());
        tokio::spawn(async move { axum::serve(listener, app).await });
        Self { url, held }
    }
}

async fn models() -> Json<Value> {
    Json(json!({ "object": "list", "data": [{ "id": "scripted", "object": "model" }] }))
}

async fn chat(State(held): State<Arc<Notify>>, Json(body): Json<Value>) -> Response {
    if body["messages"].to_string().contains(HOLD) {
        held.notify_one();
        std::future::pending::<()>().await;
    }
    let chunks = [
        json!({ "choices": [{ "index": 0, "delta": { "content": "{\"title\": \"Add" }, "finish_reason": null }] }),
        json!({ "choices": [{ "index": 0, "delta": {}, "finish_reason": "length" }],
                "usage": { "prompt_tokens": 5, "completion_tokens": 4 } }),
    ];
    let mut stream: String = chunks
        .iter()
        .map(|chunk| format!("data: {chunk}\n\n"))
        .collect();
    stream.push_str("data: [DONE]\n\n");
    ([(header::CONTENT_TYPE, "text/event-stream")], stream).into_response()
}

async fn serve(ollama: &str, flags: &[&str]) -> TestServer {
    let mut args = vec!["--backend", "ollama", "--ollama-host", ollama];
    args.extend_from_slice(flags);
    TestServer::start(config(&args)).await
}

fn prompt(text: &str) -> GenerateRequest {
    GenerateRequest {
        prompt: text.into(),
        ..Default::default()
    }
}

enum Request {
    Enhance(EnhanceTaskRequest),
    Generate(GenerateRequest),
}

/// One call provoking one kind of error, and the details it must carry.
struct Case {
    name: &'static str,
    server: String,
    request: Request,
    /// Whether the call sets a deadline ([`CALL_TIMEOUT`]).
    timed: bool,
    expected: Value,
}

impl Case {
    /// The call as the Python client takes it.
    fn wire(&self) -> Value {
        let (method, bytes, streaming) = match &self.request {
            Request::Enhance(request) => (ENHANCE, request.encode_to_vec(), false),
            Request::Generate(request) => (GENERATE, request.encode_to_vec(), true),
        };
        let hex: String = bytes.iter().map(|byte| format!("{byte:02x}")).collect();
        json!({
            "name": self.name,
            "address": self.server,
            "method": method,
            "request": hex,
            "streaming": streaming,
            "timeout": self.timed.then_some(CALL_TIMEOUT.as_secs_f64()),
        })
    }

    fn request<T>(&self, message: T) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        if self.timed {
            request.set_timeout(CALL_TIMEOUT);
        }
        request
    }

    /// The call through tonic.
    async fn call(&self) -> Status {
        let channel = Channel::from_shared(format!("http://{}", self.server))
            .unwrap()
            .connect()
            .await
            .unwrap();
        let mut client = InferenceServiceClient::new(channel);
        match &self.request {
            Request::Enhance(message) => client
                .enhance_task(self.request(message.clone()))
                .await
                .expect_err(self.name),
            Request::Generate(message) => {
                match client.generate(self.request(message.clone())).await {
                    Err(status) => status,
                    Ok(stream) => collect(stream.into_inner()).await.expect_err(self.name),
                }
            }
        }
    }
}

/// `Code::InvalidArgument` as gRPC names it: `INVALID_ARGUMENT`.
fn code_name(code: Code) -> String {
    let mut name = String::new();
    for (index, letter) in format!("{code:?}").chars().enumerate() {
        if letter.is_uppercase() && index > 0 {
            name.push('_');
        }
        name.push(letter.to_ascii_uppercase());
    }
    name
}

/// What tonic-types reads from `status`, in the Python client's shape.
fn read(status: &Status) -> Value {
    let trailers: BTreeMap<&str, &str> = ["retry-after", "rigger-violation"]
        .into_iter()
        .filter_map(|key| Some((key, status.metadata().get(key)?.to_str().ok()?)))
        .collect();
    let details = tonic_types::Status::decode(status.details())
        .unwrap()
        .details;
    let known = [
        status.get_details_bad_request().is_some(),
        status.get_details_retry_info().is_some(),
        status.get_details_error_info().is_some(),
    ];
    assert_eq!(
        details.len(),
        known.iter().filter(|known| **known).count(),
        "no other details: {details:?}"
    );
    json!({
        "code": code_name(status.code()),
        "message": status.message(),
        "trailers": trailers,
        "details": {
            "bad_request": status.get_details_bad_request().map(|bad| bad
                .field_violations
                .into_iter()
                .map(|violation| [violation.field, violation.description])
                .collect::<Vec<_>>()),
            "retry_info": status.get_details_retry_info().map(|retry| json!({
                "delay_ms": retry.retry_delay.map(|delay| delay.as_millis() as u64),
            })),
            "error_info": status.get_details_error_info().map(|info| json!({
                "reason": info.reason,
                "domain": info.domain,
                "metadata": info.metadata,
            })),
            "unknown": [],
        },
    })
}

/// What a call must report, but for its message.
fn expected(code: &str, trailers: Value, details: Value) -> Value {
    let mut all = json!({
        "bad_request": null, "retry_info": null, "error_info": null, "unknown": [],
    });
    for (key, value) in details.as_object().unwrap() {
        all[key] = value.clone();
    }
    json!({ "code": code, "trailers": trailers, "details": all })
}

fn error_info(reason: &str, metadata: Value) -> Value {
    json!({ "reason": reason, "domain": "rigger.inference.v1", "metadata": metadata })
}

fn without_message(mut report: Value) -> Value {
    report.as_object_mut().unwrap().remove("message");
    report
}

/// One call per kind of error: `main` serves through the stand-in, `busy`
/// has its only slot held, `down` points at `nowhere`, a closed port.
fn cases(main: &TestServer, busy: &TestServer, down: &TestServer, nowhere: &str) -> Vec<Case> {
    vec![
        Case {
            name: "invalid_field",
            server: main.addr.to_string(),
            request: Request::Enhance(EnhanceTaskRequest {
                task: Some(Task {
                    title: "Add a logout button".into(),
                    complexity: Some(11),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            timed: true,
            expected: expected(
                "INVALID_ARGUMENT",
                json!({}),
                json!({ "bad_request": [["task.complexity", "11 is outside 1..=10"]] }),
            ),
        },
        Case {
            name: "queue_full",
            server: busy.addr.to_string(),
            request: Request::Generate(prompt("Hi")),
            timed: true,
            expected: expected(
                "RESOURCE_EXHAUSTED",
                json!({ "retry-after": "1" }),
                json!({
                    "retry_info": { "delay_ms": 1000 },
                    "error_info": error_info("QUEUE_FULL", json!({ "in_flight": "1", "queued": "0" })),
                }),
            ),
        },
        Case {
            name: "backend_down",
            server: down.addr.to_string(),
            request: Request::Generate(prompt("Hi")),
            timed: true,
            expected: expected(
                "UNAVAILABLE",
                json!({}),
                json!({ "error_info": error_info(
                "BACKEND_UNAVAILABLE",
                json!({ "backend": "ollama", "endpoint": nowhere }),
            ) }),
            ),
        },
        Case {
            name: "unknown_model",
            server: main.addr.to_string(),
            request: Request::Generate(GenerateRequest {
                model: "no-such-model".into(),
                ..prompt("Hi")
            }),
            timed: true,
            expected: expected(
                "NOT_FOUND",
                json!({}),
                json!({ "error_info": error_info(
                "MODEL_NOT_FOUND",
                // No backend lists it: refused before any is asked, with
                // the names served.
                json!({ "closest": ollama::MODEL, "model": "no-such-model" }),
            ) }),
            ),
        },
        Case {
            name: "deadline",
            server: main.addr.to_string(),
            request: Request::Generate(prompt(HOLD)),
            timed: false,
            expected: expected(
                "DEADLINE_EXCEEDED",
                json!({}),
                json!({ "error_info": error_info(
                "DEADLINE_EXCEEDED",
                json!({ "deadline_ms": DEFAULT_DEADLINE_MS.to_string() }),
            ) }),
            ),
        },
        Case {
            name: "broken_rule",
            server: main.addr.to_string(),
            request: Request::Enhance(EnhanceTaskRequest {
                task: Some(Task {
                    title: "Add a logout button".into(),
                    ..Default::default()
                }),
                sampling: Some(SamplingOptions {
                    max_tokens: Some(TASK_MAX_TOKENS),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            timed: true,
            expected: expected(
                "INTERNAL",
                json!({ "rigger-violation": "truncated" }),
                json!({ "error_info": error_info("TRUNCATED", json!({
                "rule": "truncated",
                "attempts": support::config(&[]).task_attempts.to_string(),
                "detail": format!(
                    "the answer was cut off at max_tokens={TASK_MAX_TOKENS} before the JSON was complete"
                ),
            })) }),
            ),
        },
    ]
}

/// What the Python client decodes from each call, by case name.
async fn decoded_by_grpcio_status(cases: &[Case]) -> Value {
    let calls = serde_json::to_vec(&cases.iter().map(Case::wire).collect::<Vec<_>>()).unwrap();
    let output = tokio::task::spawn_blocking(move || {
        use std::io::Write;
        let mut child = Command::new(python())
            .arg(repo_path("tests/python/error_details_client.py"))
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("run the error details client");
        child.stdin.take().unwrap().write_all(&calls).unwrap();
        child.wait_with_output().unwrap()
    })
    .await
    .unwrap();
    assert!(
        output.status.success(),
        "error details client failed:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).expect("JSON report")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpcio_status_and_tonic_types_decode_every_kind_from_the_live_service() {
    let engine = ScriptedEngine::start().await;
    let stand_in = OllamaStandIn::start(&engine.url).await;
    let deadline = format!("{DEFAULT_DEADLINE_MS}ms");
    let main = serve(&stand_in.host(), &["--default-deadline", &deadline]).await;
    let busy = serve(
        &stand_in.host(),
        &["--max-in-flight", "1", "--max-queue", "0"],
    )
    .await;
    let nowhere = format!("http://127.0.0.1:{}", free_port());
    // Its circuit never opens, so every call meets the closed port itself.
    let down = serve(&nowhere, &["--breaker-failures", &u32::MAX.to_string()]).await;

    // The only slot of `busy`, held to the end: its engine never answers.
    let mut holder = busy.client().await;
    let held = tokio::spawn(async move { holder.generate(prompt(HOLD)).await.map(|_| ()) });
    engine.held.notified().await;

    let cases = cases(&main, &busy, &down, &nowhere);
    let report = decoded_by_grpcio_status(&cases).await;

    for case in &cases {
        let decoded = &report[case.name];
        assert_eq!(
            without_message(decoded.clone()),
            case.expected,
            "grpcio-status, {}",
            case.name
        );
        let read = read(&case.call().await);
        assert_eq!(
            without_message(read.clone()),
            case.expected,
            "tonic-types, {}",
            case.name
        );
        assert_eq!(read["message"], decoded["message"], "{}", case.name);
    }
    assert!(
        !held.is_finished(),
        "the held call kept its slot throughout"
    );
    held.abort();
}
