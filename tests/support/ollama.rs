//! An Ollama-compatible HTTP server for the tests, since no registry here
//! ships the Ollama binary. It follows Ollama's API documentation:
//! `GET /api/version`, `GET /api/tags`, `POST /api/chat` (NDJSON stream of
//! `{model, created_at, message, done}` lines ending in a `done: true` line
//! with `done_reason` and nanosecond statistics, or one JSON object when
//! `stream` is false), and `{"error": "…"}` bodies with Ollama's status codes.
//! Text comes from a real engine: the llama.cpp server, reached through the
//! crate's OpenAI-compatible backend.
//!
//! Test controls (not part of Ollama): `busy` answers 503 as a full queue
//! does; `fail_after` sends an `{"error": …}` line after that many text lines;
//! `cut_at` drops the connection in place of line `cut_at` (1 = before any
//! text), as a crashing server does; `abandoned` counts chat streams the
//! client dropped before their end; `trace_headers` records the
//! `traceparent`/`tracestate` of each chat request.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::Duration,
};

use axum::{
    Json, Router,
    body::Body,
    extract::State,
    http::{StatusCode, header},
    response::{IntoResponse, Response},
    routing::{get, post},
};
use futures_util::StreamExt;
use rigger_inference::backend::{
    Backend, Chunk, FinishReason, GenerationRequest, Message, Role, Sampling,
    openai::{OpenAiBackend, OpenAiSettings},
};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::{net::TcpListener, sync::oneshot};

/// The model the stand-in has "pulled".
pub const MODEL: &str = "smollm2:135m";
const CREATED_AT: &str = "2026-11-25T00:00:00Z";
/// Ollama's default `num_predict` is unbounded; the stand-in caps it.
const DEFAULT_NUM_PREDICT: u32 = 256;

#[derive(Default)]
pub struct Controls {
    pub busy: AtomicBool,
    pub fail_after: AtomicUsize,
    pub cut_at: AtomicUsize,
    pub trace_headers: std::sync::Mutex<Vec<(Option<String>, Option<String>)>>,
    pub abandoned: AtomicUsize,
    pub completed: AtomicUsize,
}

struct AppState {
    engine: OpenAiBackend,
    controls: Arc<Controls>,
}

pub struct OllamaStandIn {
    pub addr: SocketAddr,
    pub controls: Arc<Controls>,
    stop: Option<oneshot::Sender<()>>,
}

impl OllamaStandIn {
    /// Starts on a free loopback port, generating with the llama.cpp server
    /// at `engine_url` (its `/v1` base URL).
    pub async fn start(engine_url: &str) -> Self {
        Self::start_on("127.0.0.1:0".parse().expect("address"), engine_url).await
    }

    pub async fn start_on(addr: SocketAddr, engine_url: &str) -> Self {
        let listener = TcpListener::bind(addr).await.expect("bind loopback");
        let addr = listener.local_addr().expect("bound address");
        let controls = Arc::new(Controls::default());
        let engine = OpenAiBackend::new(
            reqwest::Client::new(),
            OpenAiSettings {
                base_url: engine_url.to_owned(),
                api_key: None,
                model: None,
                probe_timeout: Duration::from_secs(5),
            },
        );
        let state = Arc::new(AppState {
            engine,
            controls: controls.clone(),
        });
        let app = Router::new()
            .route("/api/version", get(version))
            .route("/api/tags", get(tags))
            .route("/api/chat", post(chat))
            .with_state(state);
        let (stop, stopped) = oneshot::channel::<()>();
        tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(async {
                    let _ = stopped.await;
                })
                .await
                .expect("stand-in server");
        });
        Self {
            addr,
            controls,
            stop: Some(stop),
        }
    }

    pub fn host(&self) -> String {
        format!("http://{}", self.addr)
    }
}

impl Drop for OllamaStandIn {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

async fn version() -> Json<Value> {
    Json(json!({ "version": "0.12.6" }))
}

async fn tags() -> Json<Value> {
    Json(json!({
        "models": [{
            "name": MODEL,
            "model": MODEL,
            "modified_at": CREATED_AT,
            "size": 98_362_432,
            "digest": "4f7c2c5b2a0e4f3b8f0d7c1e9a6b5d4c3b2a1f0e9d8c7b6a5f4e3d2c1b0a9f8e",
            "details": {
                "parent_model": "",
                "format": "gguf",
                "family": "llama",
                "families": ["llama"],
                "parameter_size": "135M",
                "quantization_level": "Q4_1"
            }
        }]
    }))
}

#[derive(Deserialize)]
struct ChatBody {
    model: String,
    messages: Vec<ChatMessage>,
    #[serde(default)]
    stream: Option<bool>,
    #[serde(default)]
    format: Option<Value>,
    #[serde(default)]
    options: ChatOptions,
}

#[derive(Deserialize)]
struct ChatMessage {
    role: String,
    content: String,
}

#[derive(Default, Deserialize)]
struct ChatOptions {
    temperature: Option<f32>,
    top_p: Option<f32>,
    seed: Option<u64>,
    frequency_penalty: Option<f32>,
    num_predict: Option<i64>,
    #[serde(default)]
    stop: Vec<String>,
}

fn error(status: StatusCode, message: &str) -> Response {
    (status, Json(json!({ "error": message }))).into_response()
}

fn nanos(duration: Duration) -> u64 {
    duration.as_nanos().try_into().unwrap_or(u64::MAX)
}

async fn chat(
    State(state): State<Arc<AppState>>,
    headers: axum::http::HeaderMap,
    Json(body): Json<ChatBody>,
) -> Response {
    let header = |name| {
        headers
            .get(name)
            .and_then(|value| value.to_str().ok())
            .map(str::to_owned)
    };
    state
        .controls
        .trace_headers
        .lock()
        .expect("trace headers")
        .push((header("traceparent"), header("tracestate")));
    if body.model != MODEL && format!("{}:latest", body.model) != MODEL {
        return error(
            StatusCode::NOT_FOUND,
            &format!("model \"{}\" not found, try pulling it first", body.model),
        );
    }
    if state.controls.busy.load(Ordering::SeqCst) {
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            "server busy, please try again.  maximum pending requests exceeded",
        );
    }
    let mut messages = Vec::new();
    for message in body.messages {
        let role = match message.role.as_str() {
            "system" => Role::System,
            "user" => Role::User,
            "assistant" => Role::Assistant,
            other => {
                return error(StatusCode::BAD_REQUEST, &format!("invalid role: {other}"));
            }
        };
        messages.push(Message::new(role, message.content));
    }
    let json_schema = match body.format {
        None => None,
        Some(Value::String(format)) if format == "json" => Some(json!({ "type": "object" })),
        Some(schema @ Value::Object(_)) => Some(schema),
        Some(other) => {
            return error(StatusCode::BAD_REQUEST, &format!("invalid format: {other}"));
        }
    };
    let max_tokens = match body.options.num_predict {
        Some(limit) if limit > 0 => limit.try_into().unwrap_or(u32::MAX),
        _ => DEFAULT_NUM_PREDICT,
    };
    let request = GenerationRequest {
        model: None,
        messages,
        sampling: Sampling {
            max_tokens,
            temperature: body.options.temperature,
            top_p: body.options.top_p,
            seed: body.options.seed,
            frequency_penalty: body.options.frequency_penalty,
            no_repeat: None,
        },
        stop: body.options.stop,
        json_schema,
        session: None,
    };
    let started = std::time::Instant::now();
    // Counts from here: a client that leaves while the engine still reads
    // the prompt abandons the request too.
    let mut guard = StreamGuard {
        controls: state.controls.clone(),
        finished: false,
    };
    let stream = match state.engine.generate(request).await {
        Ok(stream) => stream,
        Err(engine_error) => {
            guard.finish(false);
            return error(StatusCode::INTERNAL_SERVER_ERROR, &engine_error.to_string());
        }
    };
    let model = body.model;
    let line = move |content: &str| {
        json!({
            "model": model,
            "created_at": CREATED_AT,
            "message": { "role": "assistant", "content": content },
            "done": false
        })
    };
    let final_line = move |mut line: Value, completion: &rigger_inference::backend::Completion| {
        let timings =
            completion
                .engine_timings
                .unwrap_or(rigger_inference::backend::EngineTimings {
                    prompt: Duration::ZERO,
                    generation: Duration::ZERO,
                });
        let object = line.as_object_mut().expect("a JSON object");
        object.insert("done".into(), json!(true));
        object.insert(
            "done_reason".into(),
            json!(match completion.finish_reason {
                FinishReason::Stop => "stop",
                FinishReason::Length => "length",
            }),
        );
        object.insert("total_duration".into(), json!(nanos(started.elapsed())));
        object.insert("load_duration".into(), json!(0));
        object.insert("prompt_eval_count".into(), json!(completion.prompt_tokens));
        object.insert("prompt_eval_duration".into(), json!(nanos(timings.prompt)));
        object.insert("eval_count".into(), json!(completion.completion_tokens));
        object.insert("eval_duration".into(), json!(nanos(timings.generation)));
        line
    };

    if body.stream == Some(false) {
        let mut text = String::new();
        let mut stream = stream;
        while let Some(chunk) = stream.next().await {
            match chunk {
                Ok(Chunk::Text(piece)) => text.push_str(&piece),
                Ok(Chunk::Done(completion)) => {
                    state.controls.completed.fetch_add(1, Ordering::SeqCst);
                    return Json(final_line(line(&text), &completion)).into_response();
                }
                Err(engine_error) => {
                    return error(StatusCode::INTERNAL_SERVER_ERROR, &engine_error.to_string());
                }
            }
        }
        return error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "engine stream ended early",
        );
    }

    let fail_after = state.controls.fail_after.load(Ordering::SeqCst);
    let cut_at = state.controls.cut_at.load(Ordering::SeqCst);
    let lines = futures_util::stream::unfold(
        (stream, guard, 0usize),
        move |(mut stream, mut guard, sent)| {
            let line = line.clone();
            async move {
                if guard.finished {
                    return None;
                }
                if cut_at > 0 && sent + 1 == cut_at {
                    guard.finish(false);
                    let crash = std::io::Error::other("the stand-in crashed");
                    return Some((Err(crash), (stream, guard, sent + 1)));
                }
                let value = if fail_after > 0 && sent == fail_after {
                    guard.finish(false);
                    json!({ "error": "an error was encountered while running the model" })
                } else {
                    match stream.next().await {
                        Some(Ok(Chunk::Text(piece))) => line(&piece),
                        Some(Ok(Chunk::Done(completion))) => {
                            guard.finish(true);
                            final_line(line(""), &completion)
                        }
                        Some(Err(engine_error)) => {
                            guard.finish(false);
                            json!({ "error": engine_error.to_string() })
                        }
                        None => return None,
                    }
                };
                let mut bytes = serde_json::to_vec(&value).expect("serialize a line");
                bytes.push(b'\n');
                Some((Ok::<_, std::io::Error>(bytes), (stream, guard, sent + 1)))
            }
        },
    );
    Response::builder()
        .header(header::CONTENT_TYPE, "application/x-ndjson")
        .body(Body::from_stream(lines))
        .expect("a valid response")
}

/// Counts a chat request as abandoned when it is dropped before its end.
struct StreamGuard {
    controls: Arc<Controls>,
    finished: bool,
}

impl StreamGuard {
    fn finish(&mut self, completed: bool) {
        self.finished = true;
        if completed {
            self.controls.completed.fetch_add(1, Ordering::SeqCst);
        }
    }
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        if !self.finished {
            self.controls.abandoned.fetch_add(1, Ordering::SeqCst);
        }
    }
}
